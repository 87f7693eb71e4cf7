//! The DDIM sampling loop (eta 0) with gradients through chosen steps only: the steps before
//! them run and are detached, so their graphs are dropped at once; the chosen steps keep theirs,
//! or, with a [`Recompute`], keep only each step's input and output and run the UNet again in
//! the backward pass (AlignProp's per-step checkpointing: memory does not grow with the number
//! of steps beyond one latent per step).

use candle_core::Tensor;

use crate::models::unet::UNet2DConditionModel;
use crate::nn::checkpoint::Recompute;
use crate::sampling::pipeline::Conditioning;
use crate::schedulers::{DDIMScheduler, Scheduler};
use crate::weights::store::check_finite;
use crate::Result;

/// One sampler step's denoiser call, as a recomputable block.
#[derive(Clone)]
struct StepBlock {
    unet: UNet2DConditionModel,
    cond: Conditioning,
    t: f64,
}

impl StepBlock {
    fn forward(&self, input: &Tensor, _: Option<&Tensor>) -> Result<Tensor> {
        self.cond.guided_prediction(&self.unet, input, self.t)
    }
}

/// A DDIM sampling run of `unet` under `cond`.
pub struct Rollout<'a> {
    /// The denoiser (the policy).
    pub unet: &'a UNet2DConditionModel,
    /// Text states and guidance.
    pub cond: &'a Conditioning,
    /// The DDIM grid (eta 0).
    pub scheduler: &'a DDIMScheduler,
    /// Recompute each step with gradients in the backward pass (AlignProp); `None` keeps the
    /// steps' graphs.
    pub checkpoint: Option<&'a Recompute>,
}

impl Rollout<'_> {
    /// Number of sampler steps.
    pub fn steps(&self) -> usize {
        self.scheduler.timesteps().len()
    }

    /// The guided model output of step `i` at `latents`, with a gradient when `grad`.
    fn prediction(&self, latents: &Tensor, i: usize, grad: bool) -> Result<Tensor> {
        let t = self.scheduler.timesteps()[i];
        let input = self.scheduler.scale_model_input(latents, i)?;
        let pred = match (grad, self.checkpoint) {
            (false, _) => self.cond.guided_prediction(self.unet, &input.detach(), t)?.detach(),
            (true, None) => self.cond.guided_prediction(self.unet, &input, t)?,
            (true, Some(rc)) => {
                let block = StepBlock {
                    unet: self.unet.clone(),
                    cond: self.cond.clone(),
                    t,
                };
                rc.run(&block, StepBlock::forward, &input, None)?
            }
        };
        check_finite(&pred, || {
            format!(
                "sampler step {} of {} (timestep {t}): the unet output",
                i + 1,
                self.steps()
            )
        })?;
        Ok(pred)
    }

    /// Step `i` from `latents` (DDIM, eta 0); with `grad` the result is differentiable in
    /// `latents` and the UNet's parameters, otherwise detached.
    pub fn step(&self, latents: &Tensor, i: usize, grad: bool) -> Result<Tensor> {
        let pred = self.prediction(latents, i, grad)?;
        let next = self.scheduler.step_with_noise(&pred, i, latents, None)?;
        Ok(if grad { next } else { next.detach() })
    }

    /// Steps `from..to` from `latents`, gradients through those at or after `grad_from`.
    pub fn run(&self, latents: &Tensor, from: usize, to: usize, grad_from: usize) -> Result<Tensor> {
        let mut x = latents.clone();
        for i in from..to {
            x = self.step(&x, i, i >= grad_from)?;
        }
        Ok(x)
    }

    /// The one-step prediction of the clean latents from `latents` at step `i` (diffusers'
    /// `pred_original_sample`), differentiable.
    pub fn predict_x0(&self, latents: &Tensor, i: usize) -> Result<Tensor> {
        let pred = self.prediction(latents, i, true)?;
        let mut mv = self.scheduler.step_move(i)?;
        // A DDIM move to ᾱ = 1 with no noise lands on the predicted x0.
        mv.alpha_prod_to = 1.0;
        mv.std_dev = 0.0;
        mv.apply(&pred, latents, None)
    }
}
