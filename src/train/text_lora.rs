//! Text-encoder LoRA training (`[lora] text_encoder = true`): fresh adapters on the pipeline's
//! CLIP text encoder (both encoders for SDXL), trained with the UNet's adapters, since the
//! captions are encoded anew at every step.
//!
//! The choices follow diffusers' LoRA scripts (`train_text_to_image_lora_sdxl.py`,
//! `train_dreambooth_lora_sdxl.py`), which PEFT-wrap the text encoders with their own config:
//! - targets `q_proj`, `k_proj`, `v_proj`, `out_proj` ([`DEFAULT_TEXT_ENCODER_TARGETS`]);
//!   sd-scripts' `networks/lora.py` also adapts the MLP (`fc1`, `fc2`), which
//!   `text_encoder_targets` can add;
//! - the UNet's rank and alpha, PEFT's gaussian init (A ~ N(0, 1/r), B = 0), so the run starts
//!   from the base encoders; each encoder's A has its own seed;
//! - the UNet's learning rate, or `text_encoder_lr` on the same schedule ([`lr_factor`]), as
//!   the scripts' `--text_encoder_lr` parameter group.
//!
//! diffusers' Diffusion-DPO script trains no text encoder, so the reference of the DPO family is
//! our choice, PEFT's: the frozen reference is the base model as a whole, its conditioning
//! computed with these adapters switched off ([`TextEncoderLora::reference_conditioning`]), as
//! its UNet is the policy with the UNet's adapters off.
//!
//! The LoRA written at the end holds every component ([`TextEncoderLora::save`]): PEFT keys
//! `unet.*`, `text_encoder.*`, `text_encoder_2.*` as diffusers' `save_lora_weights` writes them,
//! and kohya keys `lora_unet_*` with `lora_te_*` (one encoder) or `lora_te1_*` / `lora_te2_*`
//! (SDXL), as sd-scripts does. The adapters' `Var`s (`text_encoder.<module>.lora_A.weight`, ...)
//! join the optimizer, so checkpoints hold them and their optimizer state.

use std::path::Path;
use std::sync::Arc;

use candle_core::Var;

use crate::preference::diffusion::{Method, PairConditioning, PreferenceBatch};
use crate::sampling::load::load_text_encoder_with_builder;
use crate::sampling::StableDiffusionPipeline;
use crate::weights::lora::{save_kohya_parts, save_peft_parts, LdmNames, LoraConfig, LoraPart, LoraSource};
use crate::weights::{LoadOptions, LoraAdapter, VarBuilder};
use crate::{Error, Result};

pub use crate::weights::lora::DEFAULT_TEXT_ENCODER_TARGETS;

/// The factor on the scheduled learning rate of the optimizer parameter `name`:
/// `text_encoder_lr / lr` for a text encoder's adapter when `text_encoder_lr` is set, else 1.
pub fn lr_factor(text_encoder_lr: Option<f64>, lr: f64, name: &str) -> f64 {
    match text_encoder_lr {
        Some(te) if name.starts_with("text_encoder") => te / lr,
        _ => 1.0,
    }
}

/// The trainable adapters of a pipeline's text encoders.
pub struct TextEncoderLora {
    /// Each adapted encoder's component name and the builder holding its adapters.
    encoders: Vec<(&'static str, VarBuilder)>,
}

impl TextEncoderLora {
    /// Rebuilds the text encoder(s) of `pipe` from `root/text_encoder` (and SDXL's
    /// `root/text_encoder_2`) with fresh adapters of `cfg` (its seed offset per encoder), in
    /// place of the pipeline's frozen ones. Fails when a target matches no module.
    pub fn attach(
        pipe: &mut StableDiffusionPipeline,
        root: &Path,
        load: &LoadOptions,
        cfg: &LoraConfig,
    ) -> Result<Self> {
        let components: &[&'static str] = if pipe.text_encoder_2.is_some() {
            &["text_encoder", "text_encoder_2"]
        } else {
            &["text_encoder"]
        };
        let mut encoders = Vec::with_capacity(components.len());
        for (i, &component) in components.iter().enumerate() {
            let cfg = LoraConfig {
                init_seed: cfg.init_seed.wrapping_add(i as u64 + 1),
                ..cfg.clone()
            };
            let opts = LoadOptions {
                lora: Some(Arc::new(LoraSource::fresh_for(&cfg, component))),
                ..load.without_lora()
            };
            let dir = root.join(component);
            let (model, vb) = load_text_encoder_with_builder(&dir, &opts)?;
            if vb.lora_source().is_none() {
                // `LoraSource::applies_to`: the first encoder has no projection, SDXL's second has one.
                return Err(Error::input(
                    dir.display().to_string(),
                    format!("is not the CLIP text model a pipeline's {component} is; cannot attach its LoRA"),
                ));
            }
            match component {
                "text_encoder" => pipe.text_encoder = model,
                _ => pipe.text_encoder_2 = Some(model),
            }
            encoders.push((component, vb));
        }
        Ok(TextEncoderLora { encoders })
    }

    /// The adapters' `Var`s under their PEFT names (`text_encoder.<module>.lora_A.weight`, ...),
    /// encoder by encoder, sorted by module, A before B.
    pub fn vars(&self) -> Vec<(String, Var)> {
        self.encoders.iter().flat_map(|(_, vb)| vb.lora_vars()).collect()
    }

    /// Each encoder's component name and adapters (module path, adapter), with their current values.
    pub fn adapters(&self) -> Vec<(&'static str, Vec<(String, LoraAdapter)>)> {
        self.encoders.iter().map(|(c, vb)| (*c, vb.lora_adapters())).collect()
    }

    /// Both sides' conditioning of `batch` by the base text encoders (adapters off), without
    /// gradient: what the frozen reference sees.
    pub fn reference_conditioning(
        &self,
        pipe: &StableDiffusionPipeline,
        batch: &PreferenceBatch,
        method: Method,
    ) -> Result<PairConditioning> {
        let _off: Vec<_> = self
            .encoders
            .iter()
            .filter_map(|(_, vb)| vb.lora_switch())
            .map(|s| s.off())
            .collect();
        let c = super::pair_conditioning(pipe, batch, method)?;
        let detach = |a: Option<crate::models::unet::AddedCond>| {
            a.map(|a| crate::models::unet::AddedCond {
                text_embeds: a.text_embeds.detach(),
                time_ids: a.time_ids,
            })
        };
        Ok(PairConditioning {
            context_w: c.context_w.detach(),
            context_l: c.context_l.detach(),
            added_w: detach(c.added_w),
            added_l: detach(c.added_l),
        })
    }

    /// Writes the UNet's adapters `unet` and these encoders' as one PEFT file `peft` and one
    /// kohya file `kohya`, the UNet named by `unet_ldm` there (an SDXL UNet's LDM names).
    pub fn save(
        &self,
        peft: &Path,
        kohya: &Path,
        unet: &[(String, LoraAdapter)],
        unet_ldm: Option<&LdmNames>,
    ) -> Result<()> {
        let encoders = self.adapters();
        let kohya_parts: Vec<LoraPart> = std::iter::once(LoraPart {
            component: "unet",
            adapters: unet,
            ldm: unet_ldm,
        })
        .chain(encoders.iter().map(|(component, adapters)| LoraPart {
            component,
            adapters,
            ldm: None,
        }))
        .collect();
        // PEFT files name every module by its path.
        let peft_parts: Vec<LoraPart> = kohya_parts.iter().map(|p| LoraPart { ldm: None, ..*p }).collect();
        save_peft_parts(peft, &peft_parts)?;
        save_kohya_parts(kohya, &kohya_parts)
    }
}
