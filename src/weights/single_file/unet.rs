//! The UNet's key map: LDM's `input_blocks` / `middle_block` / `output_blocks` to diffusers'
//! `down_blocks` / `mid_block` / `up_blocks`, driven by the UNet's `config.json`.

use std::path::Path;

use super::required_array;
use crate::{Error, Result};

/// The parts of a UNet config the key map needs.
pub(super) struct UnetShape {
    layers_per_block: Vec<usize>,
    down_attention: Vec<bool>,
    up_attention: Vec<bool>,
}

impl UnetShape {
    /// Reads the block structure off the UNet's `config.json`.
    pub(super) fn from_config(cfg: &serde_json::Value, file: &Path) -> Result<Self> {
        let n = required_array(cfg, "block_out_channels", file)?.len();
        let layers_per_block = match cfg.get("layers_per_block") {
            Some(v) if v.is_u64() => vec![v.as_u64().expect("checked") as usize; n],
            Some(serde_json::Value::Array(a)) if a.len() == n && a.iter().all(|x| x.is_u64()) => {
                a.iter().map(|x| x.as_u64().expect("checked") as usize).collect()
            }
            other => {
                return Err(Error::config(
                    file,
                    "layers_per_block",
                    format!("expected a number or {n} numbers, got {other:?}"),
                ))
            }
        };
        let attention = |key: &str| -> Result<Vec<bool>> {
            let types = required_array(cfg, key, file)?;
            if types.len() != n {
                return Err(Error::config(
                    file,
                    key,
                    format!("must have {n} entries (as block_out_channels), got {}", types.len()),
                ));
            }
            types
                .iter()
                .map(|t| match t.as_str() {
                    Some(s) => Ok(s.starts_with("CrossAttn")),
                    None => Err(Error::config(file, key, format!("expected block names, got {t}"))),
                })
                .collect()
        };
        Ok(UnetShape {
            layers_per_block,
            down_attention: attention("down_block_types")?,
            up_attention: attention("up_block_types")?,
        })
    }
}

/// How the names under a prefix continue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Leaves {
    /// As in diffusers (convolutions, linears, norms, transformer blocks).
    Same,
    /// An LDM `ResBlock`: `in_layers.0` -> `norm1`, ...
    Resnet,
}

/// `(LDM prefix, our prefix, leaves)` for every block of the UNet.
pub(super) fn unet_rules(shape: &UnetShape) -> Vec<(String, String, Leaves)> {
    use Leaves::{Resnet, Same};
    let mut rules: Vec<(String, String, Leaves)> = [
        ("input_blocks.0.0", "conv_in", Same),
        ("time_embed.0", "time_embedding.linear_1", Same),
        ("time_embed.2", "time_embedding.linear_2", Same),
        ("label_emb.0.0", "add_embedding.linear_1", Same),
        ("label_emb.0.2", "add_embedding.linear_2", Same),
        ("middle_block.0", "mid_block.resnets.0", Resnet),
        ("middle_block.1", "mid_block.attentions.0", Same),
        ("middle_block.2", "mid_block.resnets.1", Resnet),
        ("out.0", "conv_norm_out", Same),
        ("out.2", "conv_out", Same),
    ]
    .into_iter()
    .map(|(a, b, l)| (a.to_string(), b.to_string(), l))
    .collect();
    let mut rule = |ldm: String, ours: String, leaves| rules.push((ldm, ours, leaves));
    let n = shape.layers_per_block.len();
    let mut k = 1;
    for b in 0..n {
        for j in 0..shape.layers_per_block[b] {
            rule(
                format!("input_blocks.{k}.0"),
                format!("down_blocks.{b}.resnets.{j}"),
                Resnet,
            );
            if shape.down_attention[b] {
                rule(
                    format!("input_blocks.{k}.1"),
                    format!("down_blocks.{b}.attentions.{j}"),
                    Same,
                );
            }
            k += 1;
        }
        if b + 1 < n {
            rule(
                format!("input_blocks.{k}.0.op"),
                format!("down_blocks.{b}.downsamplers.0.conv"),
                Same,
            );
            k += 1;
        }
    }
    let mut k = 0;
    for u in 0..n {
        let layers = shape.layers_per_block[n - 1 - u] + 1;
        for j in 0..layers {
            rule(
                format!("output_blocks.{k}.0"),
                format!("up_blocks.{u}.resnets.{j}"),
                Resnet,
            );
            if shape.up_attention[u] {
                rule(
                    format!("output_blocks.{k}.1"),
                    format!("up_blocks.{u}.attentions.{j}"),
                    Same,
                );
            }
            // The upsampler follows the last resnet (and its attention, if any).
            if j + 1 == layers && u + 1 < n {
                let slot = if shape.up_attention[u] { 2 } else { 1 };
                rule(
                    format!("output_blocks.{k}.{slot}.conv"),
                    format!("up_blocks.{u}.upsamplers.0.conv"),
                    Same,
                );
            }
            k += 1;
        }
    }
    rules
}

/// Our name for the UNet tensor `rest` (past `model.diffusion_model.`); no name leaves it to the
/// audit.
pub(super) fn unet_name(rules: &[(String, String, Leaves)], rest: &str) -> Option<String> {
    let best = rules
        .iter()
        .filter(|(ldm, _, _)| {
            rest.len() > ldm.len() && rest.starts_with(ldm.as_str()) && rest.as_bytes()[ldm.len()] == b'.'
        })
        .max_by_key(|(ldm, _, _)| ldm.len());
    let (ldm, ours, leaves) = best?;
    let leaf = &rest[ldm.len() + 1..];
    let leaf = match leaves {
        Leaves::Same => Some(leaf.to_string()),
        Leaves::Resnet => resnet_leaf(leaf),
    };
    leaf.map(|l| format!("{ours}.{l}"))
}

fn resnet_leaf(leaf: &str) -> Option<String> {
    const MAP: &[(&str, &str)] = &[
        ("in_layers.0.", "norm1."),
        ("in_layers.2.", "conv1."),
        ("out_layers.0.", "norm2."),
        ("out_layers.3.", "conv2."),
        ("emb_layers.1.", "time_emb_proj."),
        ("skip_connection.", "conv_shortcut."),
    ];
    MAP.iter()
        .find_map(|(ldm, ours)| leaf.strip_prefix(ldm).map(|rest| format!("{ours}{rest}")))
}
