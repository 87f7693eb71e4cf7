//! Preference fine-tuning: the diffusion loop ([`trainer`]), resumable checkpoints
//! ([`checkpoint`]), how a run starts or resumes in its output folder ([`resume`]), the
//! end-of-run report ([`report`]), f16 loss scaling ([`loss_scale`]), text-encoder LoRAs
//! ([`text_lora`]), reward fine-tuning through the sampler ([`reward_ft`]: DRaFT, AlignProp,
//! ReFL), and the language-model trainers ([`lm`]). The optimizer and
//! schedules are `crate::optim`'s.

mod batches;
pub mod checkpoint;
pub mod lm;
pub mod loss_scale;
pub mod records;
pub mod report;
pub mod resume;
pub mod reward_ft;
pub mod text_lora;
pub mod trainer;

use candle_core::Tensor;

use crate::models::unet::AddedCond;
use crate::preference::diffusion::{Method, PairConditioning, PreferenceBatch};
use crate::preference::diffusion_kto::LabelledBatch;
use crate::sampling::StableDiffusionPipeline;
use crate::Result;

pub use records::StepRecord;
pub use resume::Resume;
pub use trainer::{TrainOptions, Trainer};

/// Both sides' text conditioning of a batch: the preferred captions for both sides, except
/// DCPO's rejected side, which keeps its own caption. SDXL time ids come from the batch or are
/// `(H, W, 0, 0, H, W)` with `H, W` the image size the latents decode to, as the official
/// Diffusion-DPO code sets them.
pub fn pair_conditioning(
    pipe: &StableDiffusionPipeline,
    batch: &PreferenceBatch,
    method: Method,
) -> Result<PairConditioning> {
    let enc_w = pipe.encode_text(&batch.captions_w)?;
    let enc_l = if method == Method::Dcpo {
        pipe.encode_text(&batch.captions_l)?
    } else {
        enc_w.clone()
    };
    let time_ids = time_ids(pipe, batch.time_ids.as_ref(), &batch.latents_w)?;
    let added = |pooled: &Option<Tensor>| {
        pooled.as_ref().map(|p| AddedCond {
            text_embeds: p.clone(),
            time_ids: time_ids.clone(),
        })
    };
    Ok(PairConditioning {
        added_w: added(&enc_w.pooled),
        added_l: added(&enc_l.pooled),
        context_w: enc_w.context,
        context_l: enc_l.context,
    })
}

/// The batch's SDXL time ids, or `(H, W, 0, 0, H, W)` per sample with `H, W` the image size the
/// `latents` `[B, C, h, w]` decode to, as the official Diffusion-DPO code sets them.
fn time_ids(pipe: &StableDiffusionPipeline, given: Option<&Tensor>, latents: &Tensor) -> Result<Tensor> {
    Ok(match given {
        Some(t) => t.to_device(pipe.device())?,
        None => {
            let f = pipe.vae_scale_factor() as f32;
            let (b, _, h, w) = latents.dims4()?;
            let (h, w) = (h as f32 * f, w as f32 * f);
            Tensor::from_vec([h, w, 0.0, 0.0, h, w].repeat(b), (b, 6), pipe.device())?
        }
    })
}

/// A labelled batch's text states `[B, L, D]` and, for SDXL, its added inputs (time ids as
/// [`pair_conditioning`] makes them).
pub fn labelled_conditioning(
    pipe: &StableDiffusionPipeline,
    batch: &LabelledBatch,
) -> Result<(Tensor, Option<AddedCond>)> {
    let enc = pipe.encode_text(&batch.captions)?;
    let added = match enc.pooled {
        Some(p) => Some(AddedCond {
            text_embeds: p,
            time_ids: time_ids(pipe, batch.time_ids.as_ref(), &batch.latents)?,
        }),
        None => None,
    };
    Ok((enc.context, added))
}
