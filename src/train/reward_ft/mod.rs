//! Reward fine-tuning: the policy samples images from seeded noise with the pipeline's DDIM
//! sampler (eta 0), the recipe's rewards score the decoded images, and the gradient of their
//! loss flows back into the UNet (or its LoRA) through some of the sampler steps:
//!
//! - DRaFT-K (Clark et al. 2024, arXiv 2309.17400): through the last K steps.
//! - DRaFT-LV: the final latents, noised again to the last step's timestep N times (fresh noise
//!   each), each denoised by the last step with gradients; the loss is the mean over the N
//!   copies (the paper's Algorithm 2; the un-noised sample itself gives no gradient).
//! - AlignProp (Prabhudesai et al. 2023, arXiv 2310.03739): through the last k steps, k drawn
//!   uniformly from `[1, K]` per sample, each of those steps checkpointed
//!   ([`rollout::Rollout::checkpoint`]).
//! - ReFL (Xu et al. 2023, THUDM/ImageReward `ReFL.py`): the sampler runs without gradients up to
//!   a step drawn uniformly among those whose timestep lies in `[t_lo, t_hi]`; that step predicts
//!   x0 in one go, with gradients, and the decoded prediction is scored; plus the denoising loss
//!   on a data batch ([`pretrain_loss`]) when the data has images.
//!
//! The loss of a sample is each reward's ReNO loss `Σ_k w_k·(offset_k − score_k)`
//! ([`crate::reward::RenoLoss`]): its gradient is that of `−Σ_k w_k·score_k`, and the offsets only
//! make the logged loss read as a distance to a good score. (The official ReFL clips its loss at 0
//! with a ReLU; we do not, so that a reward above its offset still counts.)
//!
//! Every random draw of a sample (its noise, AlignProp's k, ReFL's step, DRaFT-LV's noise) comes
//! from [`Rng::keyed`] on the run's seed and the sample's key (step, index), so a resumed run
//! draws exactly what an uninterrupted one does.

pub mod prompts;
pub mod rollout;

use candle_core::{DType, Device, Tensor};

use crate::models::unet::UNet2DConditionModel;
use crate::nn::checkpoint::Recompute;
use crate::preference::diffusion::{per_sample_mse, PairConditioning, PreferenceBatch};
use crate::recipe::reward_ft::{RewardFtPlan, RewardMethod};
use crate::reno::WeightedReward;
use crate::rng::Rng;
use crate::sampling::StableDiffusionPipeline;
use crate::schedulers::{DDIMScheduler, NoiseSchedule, Scheduler};
use crate::{Error, Result};

pub use prompts::PromptList;
pub use rollout::Rollout;

/// What one sample gave.
pub struct SampleLoss {
    /// The sample's loss (a scalar with its graph to the trainable parameters).
    pub loss: Tensor,
    /// Each reward's mean score over the decoded images that carry the gradient.
    pub scores: Vec<f64>,
    /// Sampler steps with gradients (ReFL: 1; DRaFT-LV: 1 per copy).
    pub grad_steps: usize,
    /// The index of the first step with gradients.
    pub grad_from: usize,
}

/// A reward fine-tuning method ready to run on a pipeline.
pub struct RewardFt {
    method: RewardMethod,
    guidance: f64,
    rewards: Vec<WeightedReward>,
    scheduler: DDIMScheduler,
    recompute: Option<Recompute>,
    seed: u64,
    /// ReFL: the sampler steps whose timestep is in `[t_lo, t_hi]`.
    refl_steps: Vec<usize>,
}

impl RewardFt {
    /// The method of `plan` with `rewards` (loaded, with their weights) on a pipeline whose
    /// scheduler config is `pipe`'s; `trainable` are the tensors AlignProp's checkpointed steps
    /// return gradients for; `seed` keys every random draw.
    pub fn new(
        plan: &RewardFtPlan,
        rewards: Vec<WeightedReward>,
        pipe: &StableDiffusionPipeline,
        trainable: Vec<Tensor>,
        seed: u64,
    ) -> Result<Self> {
        if rewards.is_empty() {
            return Err(Error::input(
                "reward",
                "reward fine-tuning needs at least one reward model",
            ));
        }
        let scheduler = DDIMScheduler::from_config(&pipe.scheduler_config, plan.sample_steps)?;
        let refl_steps = match plan.method {
            RewardMethod::Refl { t_lo, t_hi, .. } => {
                let ts = scheduler.timesteps();
                let steps: Vec<usize> = (0..ts.len())
                    .filter(|&i| (t_lo as f64..=t_hi as f64).contains(&ts[i]))
                    .collect();
                if steps.is_empty() {
                    return Err(Error::input(
                        "reward_ft.refl_t_lo",
                        format!(
                            "no sampler timestep lies in [{t_lo}, {t_hi}]; the {} steps are {ts:?}",
                            ts.len()
                        ),
                    ));
                }
                steps
            }
            _ => Vec::new(),
        };
        let recompute = matches!(plan.method, RewardMethod::AlignProp { .. }).then(|| Recompute::always(trainable));
        Ok(RewardFt {
            method: plan.method,
            guidance: plan.guidance,
            rewards,
            scheduler,
            recompute,
            seed,
            refl_steps,
        })
    }

    /// The method.
    pub fn method(&self) -> RewardMethod {
        self.method
    }

    /// The rewards, in recipe order.
    pub fn rewards(&self) -> &[WeightedReward] {
        &self.rewards
    }

    /// The random draws of the sample `key`, in the order they are made.
    fn rng(&self, key: &[u64]) -> Rng {
        Rng::keyed(self.seed, key)
    }

    /// The first sampler step with gradients for the sample `key` (the draw of AlignProp's k or
    /// ReFL's step is the first of the sample's stream).
    pub fn grad_from(&self, key: &[u64]) -> usize {
        self.grad_from_with(&mut self.rng(key))
    }

    fn grad_from_with(&self, rng: &mut Rng) -> usize {
        let n = self.scheduler.timesteps().len();
        match self.method {
            RewardMethod::Draft { k, .. } => n - k,
            RewardMethod::AlignProp { k } => n - (1 + rng.below(k as u64) as usize),
            RewardMethod::Refl { .. } => self.refl_steps[rng.below(self.refl_steps.len() as u64) as usize],
        }
    }

    /// The loss of one sample of `prompt` by `unet` at `(height, width)` pixels, its noise and
    /// draws keyed by `key`.
    pub fn sample_loss(
        &self,
        pipe: &StableDiffusionPipeline,
        unet: &UNet2DConditionModel,
        prompt: &str,
        size: (usize, usize),
        key: &[u64],
    ) -> Result<SampleLoss> {
        let mut rng = self.rng(key);
        let grad_from = self.grad_from_with(&mut rng);
        let (h, w) = pipe.check_size(size.0, size.1)?;
        // Drawn on the CPU whatever the device, so that a key gives the same noise everywhere.
        let noise = rng
            .randn((1, unet.in_channels(), h, w), &Device::Cpu)?
            .to_device(pipe.device())?;
        self.loss_from_noise(pipe, unet, prompt, size, &noise, grad_from, &mut rng)
    }

    /// [`Self::sample_loss`] from the unscaled noise `noise` `[1, C, h, w]` with gradients from
    /// step `grad_from` on (ReFL: the step of the x0 prediction); `rng` draws DRaFT-LV's noise.
    #[allow(clippy::too_many_arguments)]
    pub fn loss_from_noise(
        &self,
        pipe: &StableDiffusionPipeline,
        unet: &UNet2DConditionModel,
        prompt: &str,
        size: (usize, usize),
        noise: &Tensor,
        grad_from: usize,
        rng: &mut Rng,
    ) -> Result<SampleLoss> {
        let n = self.scheduler.timesteps().len();
        if grad_from >= n {
            return Err(Error::input(
                "grad_from",
                format!("must be < the {n} sampler steps, got {grad_from}"),
            ));
        }
        let cond = pipe.conditioning(&[prompt.to_string()], None, self.guidance, size, None)?;
        let rollout = Rollout {
            unet,
            cond: &cond,
            scheduler: &self.scheduler,
            checkpoint: self.recompute.as_ref(),
        };
        let x_t = (noise.to_dtype(DType::F32)? * self.scheduler.init_noise_sigma())?;
        let (finals, grad_steps) = match self.method {
            RewardMethod::Draft { lv, .. } if lv > 0 => {
                let x0 = rollout.run(&x_t, 0, n, n)?;
                let last = n - 1;
                let t = Tensor::new(&[self.scheduler.timesteps()[last] as f32], x0.device())?;
                let schedule = self.scheduler.schedule();
                let mut finals = Vec::with_capacity(lv);
                for _ in 0..lv {
                    let eps = rng.randn(x0.shape(), &Device::Cpu)?.to_device(x0.device())?;
                    let x1 = schedule.add_noise(&x0, &eps, &t)?;
                    finals.push(rollout.step(&x1, last, true)?);
                }
                (finals, lv)
            }
            RewardMethod::Refl { .. } => {
                let x = rollout.run(&x_t, 0, grad_from, n)?;
                (vec![rollout.predict_x0(&x, grad_from)?], 1)
            }
            _ => (vec![rollout.run(&x_t, 0, n, grad_from)?], n - grad_from),
        };
        let copies = finals.len() as f64;
        let mut total: Option<Tensor> = None;
        let mut scores = vec![0.0; self.rewards.len()];
        for latents in &finals {
            let image = pipe.decode_images(latents)?;
            for (r, s) in self.rewards.iter().zip(scores.iter_mut()) {
                let score = r.reward.score(&image, prompt)?.to_dtype(DType::F32)?;
                *s += score.to_dtype(DType::F64)?.mean_all()?.to_scalar::<f64>()? / copies;
                let loss = (r.loss.apply(&score)?.sum_all()? / copies)?;
                total = Some(match total {
                    None => loss,
                    Some(t) => (t + loss)?,
                });
            }
        }
        Ok(SampleLoss {
            loss: total.expect("at least one reward and one image"),
            scores,
            grad_steps,
            grad_from,
        })
    }
}

/// The denoising loss of `unet` on the preferred images of a pair batch: the per-sample MSE
/// between its output at the batch's noised latents and the training target, averaged over the
/// batch (ReFL's pre-training loss, as diffusers' text-to-image fine-tuning computes it).
pub fn pretrain_loss(
    unet: &UNet2DConditionModel,
    schedule: &NoiseSchedule,
    batch: &PreferenceBatch,
    cond: &PairConditioning,
) -> Result<Tensor> {
    let noisy = schedule.add_noise(&batch.latents_w, &batch.noise, &batch.timesteps)?;
    let target = schedule.training_target(&batch.latents_w, &batch.noise, &batch.timesteps)?;
    let dtype = cond.context_w.dtype();
    let pred = unet.forward(
        &noisy.to_dtype(dtype)?,
        &batch.timesteps,
        &cond.context_w,
        cond.added_w.as_ref(),
    )?;
    Ok(per_sample_mse(&pred, &target)?.mean_all()?)
}
