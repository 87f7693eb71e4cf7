//! Writing LoRA files (diffusers/PEFT and kohya forms) and naming modules the kohya way.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use super::{LdmNames, LoraAdapter, METADATA_KEY};
use crate::weights::store::save_safetensors;
use crate::{Error, Result};

/// Segment names of diffusers' UNet and transformers' CLIP module paths that contain
/// underscores, for turning kohya names back into paths.
const SEGMENTS: [&str; 36] = [
    "conv_norm_out",
    "time_emb_proj",
    "conv_shortcut",
    "transformer_blocks",
    "down_blocks",
    "up_blocks",
    "mid_block",
    "to_q",
    "to_k",
    "to_v",
    "to_out",
    "proj_in",
    "proj_out",
    "conv_in",
    "conv_out",
    "time_embedding",
    "add_embedding",
    "class_embedding",
    "encoder_hid_proj",
    "linear_1",
    "linear_2",
    "norm_out",
    "time_proj",
    "add_time_proj",
    "to_add_out",
    "norm_cross",
    // CLIP text models (kohya `lora_te*_` names).
    "text_model",
    "self_attn",
    "q_proj",
    "k_proj",
    "v_proj",
    "out_proj",
    "final_layer_norm",
    "layer_norm1",
    "layer_norm2",
    "text_projection",
];

/// A kohya module name (`down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0`) as a
/// diffusers path (`down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0`), joining
/// underscored tokens into the UNet's known segment names, longest first.
pub fn kohya_to_module(name: &str) -> String {
    let tokens: Vec<&str> = name.split('_').collect();
    let mut segments: Vec<String> = Vec::new();
    let mut i = 0;
    while i < tokens.len() {
        let joined = (2..=3)
            .rev()
            .filter(|n| i + n <= tokens.len())
            .map(|n| (n, tokens[i..i + n].join("_")))
            .find(|(_, s)| SEGMENTS.contains(&s.as_str()));
        match joined {
            Some((n, s)) => {
                segments.push(s);
                i += n;
            }
            None => {
                segments.push(tokens[i].to_string());
                i += 1;
            }
        }
    }
    segments.join(".")
}

/// The kohya name of a module path: dots as underscores.
pub fn module_to_kohya(module: &str) -> String {
    module.replace('.', "_")
}

/// The most frequent value (ties: the smallest).
fn most_common(values: impl Iterator<Item = u64>) -> Option<u64> {
    let mut counts: BTreeMap<u64, usize> = BTreeMap::new();
    for v in values {
        *counts.entry(v).or_default() += 1;
    }
    let max = *counts.values().max()?;
    counts.into_iter().find(|(_, c)| *c == max).map(|(v, _)| v)
}

/// The most common rank and the most common alpha (`scale * rank`) of `adapters`, for the `r`
/// and `lora_alpha` of [`save_peft`] (the others go into its patterns); `None` when empty.
pub fn dominant_rank_alpha(adapters: &[(String, LoraAdapter)]) -> Option<(usize, f64)> {
    let rank = most_common(adapters.iter().map(|(_, a)| a.rank() as u64))?;
    let alpha = most_common(adapters.iter().map(|(_, a)| (a.scale * a.rank() as f64).to_bits()))?;
    Some((rank as usize, f64::from_bits(alpha)))
}

fn json_number(x: f64) -> serde_json::Value {
    if x.fract() == 0.0 && x.abs() < 1e15 {
        serde_json::Value::from(x as i64)
    } else {
        serde_json::Value::from(x)
    }
}

/// One component's adapters, for the files that hold several ([`save_peft_parts`],
/// [`save_kohya_parts`]).
#[derive(Debug, Clone, Copy)]
pub struct LoraPart<'a> {
    /// `unet`, `text_encoder` or `text_encoder_2`.
    pub component: &'a str,
    /// (module path, adapter).
    pub adapters: &'a [(String, LoraAdapter)],
    /// The UNet's LDM names for kohya output (an SDXL UNet), `None` for module paths.
    pub ldm: Option<&'a LdmNames>,
}

/// Adds `adapters` of `component` to a PEFT file's `tensors` and `config` (see [`save_peft`]).
fn add_peft(
    tensors: &mut HashMap<String, Tensor>,
    config: &mut BTreeMap<String, serde_json::Value>,
    component: &str,
    adapters: &[(String, LoraAdapter)],
    (rank, alpha): (usize, f64),
    target_modules: &[String],
) -> Result<()> {
    let mut rank_pattern = serde_json::Map::new();
    let mut alpha_pattern = serde_json::Map::new();
    for (module, ad) in adapters {
        let r = ad.rank();
        let module_alpha = ad.scale * r as f64;
        if r != rank {
            rank_pattern.insert(module.clone(), r.into());
        }
        if (module_alpha - alpha).abs() > 1e-6 * alpha.abs().max(1.0) {
            alpha_pattern.insert(module.clone(), json_number(module_alpha));
        }
        tensors.insert(
            format!("{component}.{module}.lora_A.weight"),
            ad.a.to_dtype(DType::F32)?,
        );
        tensors.insert(
            format!("{component}.{module}.lora_B.weight"),
            ad.b.to_dtype(DType::F32)?,
        );
    }
    let targets: Vec<String> = if target_modules.is_empty() {
        adapters.iter().map(|(m, _)| m.clone()).collect()
    } else {
        target_modules.to_vec()
    };
    let entries: [(&str, serde_json::Value); 13] = [
        ("r", rank.into()),
        ("lora_alpha", json_number(alpha)),
        ("target_modules", targets.into()),
        ("rank_pattern", rank_pattern.into()),
        ("alpha_pattern", alpha_pattern.into()),
        ("use_rslora", false.into()),
        ("use_dora", false.into()),
        ("lora_bias", false.into()),
        ("lora_dropout", 0.0.into()),
        ("bias", "none".into()),
        ("fan_in_fan_out", false.into()),
        ("init_lora_weights", "gaussian".into()),
        ("peft_type", "LORA".into()),
    ];
    config.extend(entries.into_iter().map(|(k, v)| (format!("{component}.{k}"), v)));
    Ok(())
}

fn write_peft(
    path: &Path,
    tensors: &HashMap<String, Tensor>,
    config: &BTreeMap<String, serde_json::Value>,
) -> Result<()> {
    let json = serde_json::to_string_pretty(config).expect("a JSON map serialises");
    let metadata = HashMap::from([
        ("format".to_string(), "pt".to_string()),
        (METADATA_KEY.to_string(), json),
    ]);
    save_safetensors(path, tensors, Some(metadata))
}

/// Writes `adapters` (module path, adapter) as a diffusers/PEFT LoRA file that diffusers'
/// `load_lora_weights` reads: `unet.<module>.lora_A.weight` / `.lora_B.weight` (f32) and the
/// metadata entry `lora_adapter_metadata`, the PEFT `LoraConfig` as JSON with `unet.`-prefixed
/// keys (sorted, as diffusers writes it) with `r = rank`, `lora_alpha = alpha`; modules whose
/// rank or `scale * rank` differ go into `rank_pattern` / `alpha_pattern` under their full path.
/// `target_modules` empty writes the modules' full paths. Written via a temporary file and rename.
pub fn save_peft(
    path: &Path,
    adapters: &[(String, LoraAdapter)],
    rank: usize,
    alpha: f64,
    target_modules: &[String],
) -> Result<()> {
    let (mut tensors, mut config) = (HashMap::new(), BTreeMap::new());
    add_peft(
        &mut tensors,
        &mut config,
        "unet",
        adapters,
        (rank, alpha),
        target_modules,
    )?;
    write_peft(path, &tensors, &config)
}

/// [`save_peft`] for several components, each under its own prefix (`unet.`, `text_encoder.`,
/// `text_encoder_2.`, as diffusers' `save_lora_weights` writes them), with its most common rank
/// and alpha ([`dominant_rank_alpha`]) and its modules' paths as `target_modules`.
pub fn save_peft_parts(path: &Path, parts: &[LoraPart]) -> Result<()> {
    let (mut tensors, mut config) = (HashMap::new(), BTreeMap::new());
    for part in parts {
        if let Some(ra) = dominant_rank_alpha(part.adapters) {
            add_peft(&mut tensors, &mut config, part.component, part.adapters, ra, &[])?;
        }
    }
    write_peft(path, &tensors, &config)
}

/// Writes `adapters` (module path, adapter) in kohya form, as A1111 and ComfyUI read it:
/// `lora_unet_<module_underscored>.lora_down.weight` (A), `.lora_up.weight` (B), both f32, and
/// `.alpha` (`scale * rank`, an f32 scalar). With `ldm` (an SDXL UNet's map, see
/// [`super::LdmNames`]) modules are named by LDM path, as sd-scripts does for SDXL; a module
/// outside the map is an error naming it. Written via a temporary file and rename.
pub fn save_kohya(path: &Path, adapters: &[(String, LoraAdapter)], ldm: Option<&LdmNames>) -> Result<()> {
    save_kohya_parts(
        path,
        &[LoraPart {
            component: "unet",
            adapters,
            ldm,
        }],
    )
}

/// [`save_kohya`] for several components: `lora_unet_`, and for the text encoders sd-scripts'
/// prefixes, `lora_te_` for SD 1.x/2.x's one encoder, `lora_te1_` and `lora_te2_` when the
/// parts include a second one (SDXL), with CLIP module paths under `text_model_`.
pub fn save_kohya_parts(path: &Path, parts: &[LoraPart]) -> Result<()> {
    let two_encoders = parts.iter().any(|p| p.component == "text_encoder_2");
    let mut tensors = HashMap::new();
    for part in parts {
        let prefix = match part.component {
            "unet" => "lora_unet_",
            "text_encoder" if two_encoders => "lora_te1_",
            "text_encoder" => "lora_te_",
            _ => "lora_te2_",
        };
        for (module, ad) in part.adapters {
            let kohya = match part.ldm {
                None if part.component == "unet" => module_to_kohya(module),
                None => module_to_kohya(&format!(
                    "text_model.{}",
                    module.strip_prefix("text_model.").unwrap_or(module)
                )),
                Some(names) => names.to_kohya(module).ok_or_else(|| {
                    Error::input(
                        path.display().to_string(),
                        format!("{module}: no LDM (SDXL kohya) name for this module"),
                    )
                })?,
            };
            let name = format!("{prefix}{kohya}");
            let alpha = ad.scale * ad.rank() as f64;
            tensors.insert(format!("{name}.lora_down.weight"), ad.a.to_dtype(DType::F32)?);
            tensors.insert(format!("{name}.lora_up.weight"), ad.b.to_dtype(DType::F32)?);
            tensors.insert(format!("{name}.alpha"), Tensor::new(alpha as f32, &Device::Cpu)?);
        }
    }
    let all = || parts.iter().flat_map(|p| p.adapters.iter());
    let dim = most_common(all().map(|(_, a)| a.rank() as u64)).unwrap_or(0);
    let alpha = most_common(all().map(|(_, a)| (a.scale * a.rank() as f64).to_bits())).map(f64::from_bits);
    let metadata = HashMap::from([
        ("format".to_string(), "pt".to_string()),
        ("ss_network_module".to_string(), "networks.lora".to_string()),
        ("ss_network_dim".to_string(), dim.to_string()),
        ("ss_network_alpha".to_string(), alpha.unwrap_or(0.0).to_string()),
    ]);
    save_safetensors(path, &tensors, Some(metadata))
}
