//! ReNO: reward-based noise optimisation (Eyring et al. 2024, arXiv 2406.04312; the official
//! `training/trainer.py` of <https://github.com/ExplainableML/ReNO>).
//!
//! A one-step (or few-step) model turns noise `z` into an image; reward models score it; the loss
//! `Σ_k w_k·(offset_k − score_k) + λ·(½|z|² − (d−1)·log|z|)` is minimised over `z` by SGD with
//! Nesterov momentum, the gradient on `z` clipped to a norm before each step. The regulariser
//! keeps `|z|` near `sqrt(d−1)`, where a d-dimensional standard normal lives. As in the official
//! loop, iteration `i` evaluates `z_i` and then updates it (the last iteration only evaluates),
//! and the image with the lowest reward loss (regulariser excluded) is kept.

use candle_core::{DType, Tensor, Var};

use crate::models::unet::UNet2DConditionModel;
use crate::optim::{clip_grad_norm, Sgd};
use crate::reward::{ImageReward, RenoLoss, RewardKind};
use crate::rng::Rng;
use crate::sampling::pipeline::{Conditioning, StableDiffusionPipeline};
use crate::schedulers::{EulerDiscreteScheduler, NoiseSchedule, Scheduler, SchedulerKind};
use crate::{Error, Result};

/// The optimiser settings (ReNO's defaults: 50 iterations, lr 5, momentum 0.9, clip 0.1, λ 0.01).
#[derive(Debug, Clone, PartialEq)]
pub struct RenoConfig {
    /// Evaluations of the noise; there are `iters − 1` updates.
    pub iters: usize,
    /// SGD learning rate.
    pub lr: f64,
    /// Nesterov momentum.
    pub momentum: f64,
    /// Maximum L2 norm of the gradient on the noise; `None` disables clipping.
    pub grad_clip: Option<f64>,
    /// Weight λ of the noise-norm regulariser.
    pub reg_weight: f64,
}

impl Default for RenoConfig {
    fn default() -> Self {
        RenoConfig {
            iters: 50,
            lr: 5.0,
            momentum: 0.9,
            grad_clip: Some(0.1),
            reg_weight: 0.01,
        }
    }
}

/// How the noise becomes an image.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Sampler {
    /// The checkpoint's scheduler (or `kind`) with `steps` steps: a Turbo checkpoint with one step
    /// runs at its trailing timestep.
    Scheduler {
        /// Sampler override.
        kind: Option<SchedulerKind>,
        /// Inference steps.
        steps: usize,
    },
    /// One Euler step from this timestep to σ = 0 (see [`NoiseSchedule::one_step_sigmas`]).
    Timestep(f64),
}

/// A reward model with its ReNO loss `weight·(offset − score)`.
pub struct WeightedReward {
    /// The model.
    pub reward: Box<dyn ImageReward>,
    /// The loss; `RewardKind::reno_loss` gives ReNO's default weight.
    pub loss: RenoLoss,
}

impl WeightedReward {
    /// `reward` with ReNO's default weight, or `weight` when given.
    pub fn new(reward: Box<dyn ImageReward>, weight: Option<f64>) -> Self {
        let mut loss = reward.kind().reno_loss();
        if let Some(w) = weight {
            loss.weight = w;
        }
        WeightedReward { reward, loss }
    }
}

/// One evaluation of the noise.
#[derive(Debug, Clone)]
pub struct Evaluation {
    /// The image `[1, 3, H, W]` in [0, 1], detached.
    pub image: Tensor,
    /// Each reward's score, in the order the rewards were given.
    pub scores: Vec<(RewardKind, f64)>,
    /// `Σ_k w_k·(offset_k − score_k)`.
    pub reward_loss: f64,
    /// `λ·(½|z|² − (d−1)·log|z|)`.
    pub reg_loss: f64,
    /// The gradient of the total loss on the noise, before clipping, when asked for.
    pub grad: Option<Tensor>,
}

/// One line of the trajectory: the evaluation of `z_iter`, before its update.
#[derive(Debug, Clone)]
pub struct IterationRecord {
    /// 0 for the initial noise.
    pub iter: usize,
    /// Each reward's score.
    pub scores: Vec<(RewardKind, f64)>,
    /// The weighted reward loss.
    pub reward_loss: f64,
    /// The regulariser.
    pub reg_loss: f64,
    /// L2 norm of the noise.
    pub noise_norm: f64,
    /// L2 norm of the gradient before clipping (`None` on the last iteration, which is not updated).
    pub grad_norm: Option<f64>,
}

impl IterationRecord {
    /// The scores as a JSON object keyed by reward kind.
    pub fn scores_json(&self) -> serde_json::Value {
        let scores: serde_json::Map<String, serde_json::Value> = self
            .scores
            .iter()
            .map(|(k, s)| (k.name().to_string(), (*s).into()))
            .collect();
        scores.into()
    }

    /// The JSON line of `iterations.jsonl`.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "iter": self.iter,
            "scores": self.scores_json(),
            "reward_loss": self.reward_loss,
            "reg_loss": self.reg_loss,
            "noise_norm": self.noise_norm,
            "grad_norm": self.grad_norm,
        })
    }
}

/// The tensors of one iteration, as [`Reno::run`] shows them to its observer.
#[derive(Debug, Clone)]
pub struct IterationTensors {
    /// The image of `noise`, `[1, 3, H, W]` in [0, 1].
    pub image: Tensor,
    /// `z_i`.
    pub noise: Tensor,
    /// The gradient of the total loss on `z_i`, before clipping (`None` on the last iteration).
    pub grad: Option<Tensor>,
    /// `z_{i+1}` (`None` on the last iteration).
    pub next_noise: Option<Tensor>,
}

/// The result of a run.
#[derive(Debug, Clone)]
pub struct RenoOutcome {
    /// Every iteration, in order.
    pub records: Vec<IterationRecord>,
    /// The image of the initial noise `[1, 3, H, W]`.
    pub initial_image: Tensor,
    /// The image with the lowest reward loss.
    pub best_image: Tensor,
    /// Its iteration.
    pub best_iter: usize,
    /// Its noise.
    pub best_noise: Tensor,
}

/// `λ·(½|z|² − (d−1)·log|z|)` in f32, with `d` the elements per sample (`z` is `[1, ...]`).
pub fn noise_regularizer(z: &Tensor, weight: f64) -> Result<Tensor> {
    let d = z.elem_count() / z.dim(0)?.max(1);
    let z = z.to_dtype(DType::F32)?;
    let sq = z.sqr()?.sum_all()?;
    let log_norm = (sq.log()? * 0.5)?;
    let reg = ((sq * 0.5)? - (log_norm * (d as f64 - 1.0))?)?;
    Ok((reg * weight)?)
}

/// ReNO on a pipeline, for one prompt.
pub struct Reno<'a> {
    pipeline: &'a StableDiffusionPipeline,
    unet: &'a UNet2DConditionModel,
    rewards: &'a [WeightedReward],
    sampler: Sampler,
    config: RenoConfig,
    seed: u64,
}

impl<'a> Reno<'a> {
    /// ReNO with `pipeline`'s own UNet; `seed` drives any noise a stochastic sampler adds (the
    /// same at every iteration, as in the official code).
    pub fn new(
        pipeline: &'a StableDiffusionPipeline,
        rewards: &'a [WeightedReward],
        sampler: Sampler,
        config: RenoConfig,
        seed: u64,
    ) -> Result<Self> {
        if rewards.is_empty() {
            return Err(Error::input("reward", "ReNO needs at least one reward model"));
        }
        if config.iters == 0 {
            return Err(Error::input("iters", "must be at least 1"));
        }
        for (what, v) in [
            ("lr", config.lr),
            ("momentum", config.momentum),
            ("reg weight", config.reg_weight),
        ] {
            if !v.is_finite() || v < 0.0 {
                return Err(Error::input(what, format!("must be a finite value >= 0, got {v}")));
            }
        }
        if let Some(c) = config.grad_clip.filter(|c| !(c.is_finite() && *c > 0.0)) {
            return Err(Error::input(
                "grad clip",
                format!("must be a finite value > 0, got {c}"),
            ));
        }
        // Build the sampler once so that a bad timestep or scheduler fails before any work.
        let reno = Reno {
            pipeline,
            unet: &pipeline.unet,
            rewards,
            sampler,
            config,
            seed,
        };
        reno.scheduler()?;
        Ok(reno)
    }

    /// The settings.
    pub fn config(&self) -> &RenoConfig {
        &self.config
    }

    fn scheduler(&self) -> Result<Box<dyn Scheduler>> {
        let cfg = &self.pipeline.scheduler_config;
        match self.sampler {
            Sampler::Scheduler { kind, steps } => cfg.build(kind, steps),
            Sampler::Timestep(t) => {
                let schedule = NoiseSchedule::from_config(cfg)?;
                let sigmas = schedule.one_step_sigmas(t)?;
                Ok(Box::new(EulerDiscreteScheduler::new(&schedule, sigmas)))
            }
        }
    }

    /// The image of noise `z` `[1, C, h, w]` (differentiable in `z`), `[1, 3, H, W]` in [0, 1].
    pub fn generate(&self, cond: &Conditioning, z: &Tensor) -> Result<Tensor> {
        let mut scheduler = self.scheduler()?;
        let mut rng = Rng::new(self.seed);
        let latents = self
            .pipeline
            .denoise(self.unet, cond, scheduler.as_mut(), z, &mut rng, &mut |_, _| {})?;
        self.pipeline.decode_images(&latents)
    }

    /// Scores, losses and (with `with_grad`) the gradient of the total loss for noise `z`.
    pub fn evaluate(&self, cond: &Conditioning, prompt: &str, z: &Tensor, with_grad: bool) -> Result<Evaluation> {
        let var = Var::from_tensor(&z.to_dtype(DType::F32)?.detach())?;
        let z = if with_grad {
            var.as_tensor().clone()
        } else {
            var.as_tensor().detach()
        };
        let image = self.generate(cond, &z)?;
        let mut scores = Vec::with_capacity(self.rewards.len());
        let mut total: Option<Tensor> = None;
        let mut reward_loss = 0.0;
        for r in self.rewards {
            let score = r.reward.score(&image, prompt)?.to_dtype(DType::F32)?;
            let loss = r.loss.apply(&score)?.sum_all()?;
            scores.push((
                r.reward.kind(),
                score.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()?,
            ));
            reward_loss += loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            total = Some(match total {
                None => loss,
                Some(t) => (t + loss)?,
            });
        }
        let reg = noise_regularizer(&z, self.config.reg_weight)?;
        let reg_loss = reg.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        let grad = if with_grad {
            let total = (total.expect("at least one reward") + reg)?;
            let grads = total.backward()?;
            let grad = grads
                .get(var.as_tensor())
                .cloned()
                .ok_or_else(|| Error::input("noise", "no gradient reached the noise"))?;
            Some(grad.detach())
        } else {
            None
        };
        Ok(Evaluation {
            image: image.detach(),
            scores,
            reward_loss,
            reg_loss,
            grad,
        })
    }

    /// Runs `config.iters` iterations from `z0` `[1, C, h, w]` for `prompt`; `observe` sees each
    /// record with its tensors as soon as they are computed (to write it out) and may stop the run by
    /// failing. A non-finite loss or gradient stops the run with an error naming the iteration.
    pub fn run(
        &self,
        prompt: &str,
        z0: &Tensor,
        observe: &mut dyn FnMut(&IterationRecord, &IterationTensors) -> Result<()>,
    ) -> Result<RenoOutcome> {
        if z0.rank() != 4 || z0.dim(0)? != 1 {
            return Err(Error::input(
                "init noise",
                format!("expected one noise tensor [1, C, h, w], got shape {:?}", z0.dims()),
            ));
        }
        let cond = self
            .pipeline
            .conditioning(&[prompt.to_string()], None, 1.0, self.image_size(z0)?, None)?;
        self.run_with(&cond, prompt, z0, observe)
    }

    /// [`Self::run`] with conditioning prepared by the caller (e.g. with guidance).
    pub fn run_with(
        &self,
        cond: &Conditioning,
        prompt: &str,
        z0: &Tensor,
        observe: &mut dyn FnMut(&IterationRecord, &IterationTensors) -> Result<()>,
    ) -> Result<RenoOutcome> {
        let mut sgd = Sgd::new(self.config.lr, self.config.momentum, true);
        let mut z = z0.to_dtype(DType::F32)?.detach();
        let mut records = Vec::with_capacity(self.config.iters);
        let mut initial_image = None;
        let mut best: Option<(f64, usize, Tensor, Tensor)> = None;
        for iter in 0..self.config.iters {
            let last = iter + 1 == self.config.iters;
            let eval = self.evaluate(cond, prompt, &z, !last)?;
            if !(eval.reward_loss.is_finite() && eval.reg_loss.is_finite()) {
                return Err(Error::input(
                    "reno",
                    format!(
                        "iteration {iter}: non-finite loss (reward {}, regulariser {})",
                        eval.reward_loss, eval.reg_loss
                    ),
                ));
            }
            let noise_norm = z.sqr()?.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?.sqrt();
            let mut grad_norm = None;
            let next = match &eval.grad {
                Some(g) => {
                    let mut g = [g.clone()];
                    let norm = clip_grad_norm(&mut g, self.config.grad_clip)?;
                    if !norm.is_finite() {
                        return Err(Error::input(
                            "reno",
                            format!("iteration {iter}: the gradient on the noise is not finite (norm {norm})"),
                        ));
                    }
                    grad_norm = Some(norm);
                    Some(sgd.step(&z, &g[0])?)
                }
                None => None,
            };
            let record = IterationRecord {
                iter,
                scores: eval.scores,
                reward_loss: eval.reward_loss,
                reg_loss: eval.reg_loss,
                noise_norm,
                grad_norm,
            };
            if initial_image.is_none() {
                initial_image = Some(eval.image.clone());
            }
            if best.as_ref().is_none_or(|b| record.reward_loss < b.0) {
                best = Some((record.reward_loss, iter, eval.image.clone(), z.clone()));
            }
            let tensors = IterationTensors {
                image: eval.image,
                noise: z.clone(),
                grad: eval.grad,
                next_noise: next,
            };
            observe(&record, &tensors)?;
            records.push(record);
            if let Some(n) = tensors.next_noise {
                z = n;
            }
        }
        let (_, best_iter, best_image, best_noise) = best.expect("at least one iteration");
        Ok(RenoOutcome {
            records,
            initial_image: initial_image.expect("at least one iteration"),
            best_image,
            best_iter,
            best_noise,
        })
    }

    /// The pixel size that noise `z` `[1, C, h, w]` decodes to.
    pub fn image_size(&self, z: &Tensor) -> Result<(usize, usize)> {
        let (_, c, h, w) = z.dims4()?;
        if c != self.unet.in_channels() {
            return Err(Error::input(
                "init noise",
                format!("expected {} channels (the UNet's), got {c}", self.unet.in_channels()),
            ));
        }
        let f = self.pipeline.vae_scale_factor();
        Ok((h * f, w * f))
    }
}
