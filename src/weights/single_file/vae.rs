//! The VAE's key map: LDM's `{en,de}coder.{down,up}.N.block.M`, `mid.*` and 1x1-convolution
//! attention to diffusers' names.

use crate::weights::store::ViewTransform;

/// Our name (and transform) for the VAE tensor `rest` (past `first_stage_model.`) of shape
/// `shape`, in a VAE of `levels` levels.
pub(super) fn vae_name(rest: &str, levels: usize, shape: &[usize]) -> Option<(String, ViewTransform)> {
    let same = |n: String| Some((n, ViewTransform::Identity));
    let parts: Vec<&str> = rest.split('.').collect();
    let resnet = |leaf: &[&str]| leaf.join(".").replace("nin_shortcut.", "conv_shortcut.");
    let level = |s: &str| s.parse::<usize>().ok().filter(|&i| i < levels);
    match parts.as_slice() {
        ["quant_conv" | "post_quant_conv", ..] => same(rest.to_string()),
        [coder @ ("encoder" | "decoder"), "conv_in" | "conv_out", ..] => {
            same(format!("{coder}.{}", &rest[coder.len() + 1..]))
        }
        [coder @ ("encoder" | "decoder"), "norm_out", leaf] => same(format!("{coder}.conv_norm_out.{leaf}")),
        ["encoder", "down", i, "block", j, leaf @ ..] if level(i).is_some() => {
            same(format!("encoder.down_blocks.{i}.resnets.{j}.{}", resnet(leaf)))
        }
        ["encoder", "down", i, "downsample", "conv", leaf] if level(i).is_some() => {
            same(format!("encoder.down_blocks.{i}.downsamplers.0.conv.{leaf}"))
        }
        ["decoder", "up", i, "block", j, leaf @ ..] => level(i).and_then(|i| {
            same(format!(
                "decoder.up_blocks.{}.resnets.{j}.{}",
                levels - 1 - i,
                resnet(leaf)
            ))
        }),
        ["decoder", "up", i, "upsample", "conv", leaf] => {
            level(i).and_then(|i| same(format!("decoder.up_blocks.{}.upsamplers.0.conv.{leaf}", levels - 1 - i)))
        }
        [coder, "mid", block @ ("block_1" | "block_2"), leaf @ ..] => {
            let r = if *block == "block_1" { 0 } else { 1 };
            same(format!("{coder}.mid_block.resnets.{r}.{}", resnet(leaf)))
        }
        [coder, "mid", "attn_1", part, leaf] => {
            let ours = match *part {
                "norm" => "group_norm",
                "q" => "to_q",
                "k" => "to_k",
                "v" => "to_v",
                "proj_out" => "to_out.0",
                _ => return None,
            };
            let name = format!("{coder}.mid_block.attentions.0.{ours}.{leaf}");
            // LDM's attention projections are 1x1 convolutions: [C, C, 1, 1] -> linear [C, C].
            let transform = match shape {
                [o, i, rest @ ..] if *part != "norm" && !rest.is_empty() && rest.iter().all(|&d| d == 1) => {
                    ViewTransform::Reshape(vec![*o, *i])
                }
                _ => ViewTransform::Identity,
            };
            Some((name, transform))
        }
        _ => None,
    }
}
