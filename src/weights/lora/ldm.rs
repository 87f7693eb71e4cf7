//! kohya's LDM (sgm) module names for SDXL UNets. sd-scripts trains SD 1.x/2.x on the diffusers
//! UNet, so those LoRAs name modules by diffusers path (`lora_unet_down_blocks_1_attentions_0_...`),
//! but it trains SDXL on its own copy of the original LDM UNet (`sdxl_original_unet.py`), so SDXL
//! LoRAs say `lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`. [`LdmNames`] maps one
//! UNet's diffusers paths to LDM paths and back, as diffusers' `_maybe_map_sgm_blocks_to_diffusers`
//! plus `_convert_unet_lora_key` do (`loaders/lora_conversion_utils.py`), but for any layer layout:
//! the block numbering is read off the UNet's own module tree (per block, its resnets, whether it
//! has attentions, a down/upsampler), which is its config's `down_block_types`, `up_block_types`
//! and `layers_per_block` as built.
//!
//! LDM layout: `input_blocks.0.0` is `conv_in`; then per down block, one input block per layer
//! (`.0` the resnet, `.1` the attention) and one for the downsampler (`.0.op`); `middle_block`
//! interleaves resnets and attentions; per up block, one output block per layer (resnet `.0`,
//! attention `.1`, the upsampler after them on the last layer, `.1.conv` or `.2.conv`).
//! Resnet inner names: `in_layers.0`/`.2` (norm1, conv1), `emb_layers.1` (time_emb_proj),
//! `out_layers.0`/`.3` (norm2, conv2), `skip_connection` (conv_shortcut). Elsewhere:
//! `time_embed.0`/`.2`, `label_emb.0.0`/`.0.2` (add_embedding), `out.0`/`out.2` (conv_norm_out, conv_out).

use std::collections::BTreeSet;

use super::save::kohya_to_module;

/// diffusers' ResnetBlock2D module names and their LDM `ResBlock` names.
const RESNET: [(&str, &str); 6] = [
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("time_emb_proj", "emb_layers.1"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("conv_shortcut", "skip_connection"),
];

/// Modules outside the block structure: diffusers path, LDM path.
const TOP: [(&str, &str); 7] = [
    ("conv_in", "input_blocks.0.0"),
    ("time_embedding.linear_1", "time_embed.0"),
    ("time_embedding.linear_2", "time_embed.2"),
    ("add_embedding.linear_1", "label_emb.0.0"),
    ("add_embedding.linear_2", "label_emb.0.2"),
    ("conv_norm_out", "out.0"),
    ("conv_out", "out.2"),
];

/// The first segments of LDM kohya names (after `lora_unet_`), by which a file is recognised.
pub(super) const LDM_HEADS: [&str; 6] = [
    "input_blocks_",
    "middle_block_",
    "output_blocks_",
    "time_embed_",
    "label_emb_",
    "out_",
];

/// How a prefix's inner names translate.
#[derive(Debug, Clone, Copy)]
enum Inner {
    /// The prefix is itself the module (no inner part).
    Exact,
    /// A resnet: inner names through [`RESNET`].
    Resnet,
    /// An attention (Transformer2DModel / SpatialTransformer): the same inner names.
    Same,
}

/// The diffusers-to-LDM module name map of one UNet (see the module docs).
#[derive(Debug, Clone)]
pub struct LdmNames {
    /// (diffusers prefix, LDM prefix, inner rule).
    prefixes: Vec<(String, String, Inner)>,
    sdxl: bool,
}

/// The distinct indices `j` of `{prefix}.{j}.` among `modules`, ascending.
fn indices(modules: &BTreeSet<String>, prefix: &str) -> Vec<usize> {
    let head = format!("{prefix}.");
    let found: BTreeSet<usize> = modules
        .iter()
        .filter_map(|m| m.strip_prefix(&head)?.split('.').next()?.parse().ok())
        .collect();
    found.into_iter().collect()
}

impl LdmNames {
    /// The map for the UNet whose checkpoint has tensors `names` (`down_blocks.1.resnets.0.conv1.
    /// weight`, ...). [`LdmNames::is_sdxl`] tells whether sd-scripts names it this way.
    pub fn from_names<S: AsRef<str>>(names: &[S]) -> Self {
        let modules: BTreeSet<String> = names.iter().map(|n| n.as_ref().to_string()).collect();
        let has = |prefix: &str| {
            let head = format!("{prefix}.");
            modules.iter().any(|m| m.starts_with(&head))
        };
        let mut prefixes: Vec<(String, String, Inner)> = TOP
            .iter()
            .map(|(d, l)| (d.to_string(), l.to_string(), Inner::Exact))
            .collect();
        let mut input = 1;
        for b in indices(&modules, "down_blocks") {
            let attn = has(&format!("down_blocks.{b}.attentions"));
            for j in indices(&modules, &format!("down_blocks.{b}.resnets")) {
                prefixes.push((
                    format!("down_blocks.{b}.resnets.{j}"),
                    format!("input_blocks.{input}.0"),
                    Inner::Resnet,
                ));
                if attn {
                    prefixes.push((
                        format!("down_blocks.{b}.attentions.{j}"),
                        format!("input_blocks.{input}.1"),
                        Inner::Same,
                    ));
                }
                input += 1;
            }
            if has(&format!("down_blocks.{b}.downsamplers.0")) {
                prefixes.push((
                    format!("down_blocks.{b}.downsamplers.0.conv"),
                    format!("input_blocks.{input}.0.op"),
                    Inner::Exact,
                ));
                input += 1;
            }
        }
        let mid_attn = indices(&modules, "mid_block.attentions");
        let mut middle = 0;
        for j in indices(&modules, "mid_block.resnets") {
            prefixes.push((
                format!("mid_block.resnets.{j}"),
                format!("middle_block.{middle}"),
                Inner::Resnet,
            ));
            middle += 1;
            if mid_attn.contains(&j) {
                prefixes.push((
                    format!("mid_block.attentions.{j}"),
                    format!("middle_block.{middle}"),
                    Inner::Same,
                ));
                middle += 1;
            }
        }
        let mut output = 0;
        for b in indices(&modules, "up_blocks") {
            let attn = has(&format!("up_blocks.{b}.attentions"));
            let layers = indices(&modules, &format!("up_blocks.{b}.resnets"));
            for (n, j) in layers.iter().enumerate() {
                prefixes.push((
                    format!("up_blocks.{b}.resnets.{j}"),
                    format!("output_blocks.{output}.0"),
                    Inner::Resnet,
                ));
                if attn {
                    prefixes.push((
                        format!("up_blocks.{b}.attentions.{j}"),
                        format!("output_blocks.{output}.1"),
                        Inner::Same,
                    ));
                }
                if n + 1 == layers.len() && has(&format!("up_blocks.{b}.upsamplers.0")) {
                    let slot = if attn { 2 } else { 1 };
                    prefixes.push((
                        format!("up_blocks.{b}.upsamplers.0.conv"),
                        format!("output_blocks.{output}.{slot}.conv"),
                        Inner::Exact,
                    ));
                }
                output += 1;
            }
        }
        // SDXL's added `text_time` conditioning is the one with a learned `add_embedding` MLP.
        let sdxl = modules.contains("add_embedding.linear_1.weight");
        LdmNames { prefixes, sdxl }
    }

    /// Whether sd-scripts names this UNet's modules the LDM way: an SDXL-architecture UNet
    /// (`addition_embed_type = "text_time"`, seen as its `add_embedding` MLP).
    pub fn is_sdxl(&self) -> bool {
        self.sdxl
    }

    /// The LDM path of diffusers module `module` (`down_blocks.1.attentions.0.proj_in` gives
    /// `input_blocks.4.1.proj_in` on SDXL), `None` for a module outside the map.
    pub fn to_ldm(&self, module: &str) -> Option<String> {
        self.prefixes.iter().find_map(|(d, l, inner)| {
            if module == d {
                return matches!(inner, Inner::Exact).then(|| l.clone());
            }
            let rest = module.strip_prefix(d.as_str())?.strip_prefix('.')?;
            match inner {
                Inner::Exact => None,
                Inner::Same => Some(format!("{l}.{rest}")),
                Inner::Resnet => RESNET
                    .iter()
                    .find(|(dn, _)| *dn == rest)
                    .map(|(_, ln)| format!("{l}.{ln}")),
            }
        })
    }

    /// The kohya name of `module` (without `lora_unet_`): its LDM path with dots as underscores.
    pub fn to_kohya(&self, module: &str) -> Option<String> {
        self.to_ldm(module).map(|l| l.replace('.', "_"))
    }

    /// The diffusers path of an LDM kohya name (without `lora_unet_`), `None` when it names no
    /// module of this UNet.
    pub fn from_kohya(&self, name: &str) -> Option<String> {
        self.prefixes.iter().find_map(|(d, l, inner)| {
            let lu = l.replace('.', "_");
            if name == lu {
                return matches!(inner, Inner::Exact).then(|| d.clone());
            }
            let rest = name.strip_prefix(lu.as_str())?.strip_prefix('_')?;
            match inner {
                Inner::Exact => None,
                Inner::Same => Some(format!("{d}.{}", kohya_to_module(rest))),
                Inner::Resnet => RESNET
                    .iter()
                    .find(|(_, ln)| ln.replace('.', "_") == rest)
                    .map(|(dn, _)| format!("{d}.{dn}")),
            }
        })
    }
}
