//! Preference fine-tuning: the diffusion loop ([`trainer`]), resumable checkpoints
//! ([`checkpoint`]), how a run starts or resumes in its output folder ([`resume`]), the
//! end-of-run report ([`report`]), f16 loss scaling ([`loss_scale`]), reward fine-tuning through
//! the sampler ([`reward_ft`]: DRaFT, AlignProp, ReFL), and the language-model trainers ([`lm`]). The optimizer and
//! schedules are `crate::optim`'s.

mod batches;
pub mod checkpoint;
pub mod lm;
pub mod loss_scale;
pub mod records;
pub mod report;
pub mod resume;
pub mod reward_ft;
pub mod trainer;

use candle_core::Tensor;

use crate::models::unet::AddedCond;
use crate::preference::diffusion::{Method, PairConditioning, PreferenceBatch};
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
    let b = batch.len();
    let time_ids = match &batch.time_ids {
        Some(t) => t.to_device(pipe.device())?,
        None => {
            let f = pipe.vae_scale_factor() as f32;
            let (_, _, h, w) = batch.latents_w.dims4()?;
            let (h, w) = (h as f32 * f, w as f32 * f);
            Tensor::from_vec([h, w, 0.0, 0.0, h, w].repeat(b), (b, 6), pipe.device())?
        }
    };
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
