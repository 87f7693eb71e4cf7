//! Preference losses for diffusion models: the denoising-error proxy, the four methods'
//! specifics, and the one-batch format `diffalign loss` reads.
//!
//! For each pair the preferred and rejected latents share one noise tensor and one timestep
//! (Diffusion-DPO's `noise.chunk(2)[0].repeat(2)`); the proxy is `-0.5 * MSE`, the per-sample
//! mean over C, H, W of `(prediction - target)^2` in f32, target = the noise (epsilon models) or
//! the velocity (v-prediction). Methods:
//! - DPO: both sides conditioned on the preferred caption; frozen reference.
//! - DCPO: the rejected side conditioned on its own caption.
//! - MaPO: reference-free margin objective on the policy MSEs.
//! - SmPO: per-pair weight `10 * (2p - 1)` from the soft label `p`, and `x_t` made by ReNoise
//!   inversion of the clean latent with the policy (no gradient) instead of by noising.

use std::path::Path;

use candle_core::{DType, Device, Tensor};

use super::objective::{LossType, Objective, PairScores, PreferenceLoss};
use crate::models::unet::{AddedCond, UNet2DConditionModel};
use crate::schedulers::{
    DDIMInverseScheduler, DdimSettings, NoiseSchedule, PredictionType, Scheduler, TimestepSpacing,
};
use crate::weights::{LoraSwitch, TensorStore};
use crate::{Error, Result};

/// How `x_t` and the conditioning are made for a method.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// Diffusion-DPO (Wallace et al., 2023).
    Dpo,
    /// Dual Caption Preference Optimization: the rejected image keeps its own caption.
    Dcpo,
    /// Margin-aware Preference Optimization (reference-free).
    Mapo,
    /// Smoothed Preference Optimization with `inversion_steps` ReNoise inversion steps.
    Smpo {
        /// Number of inverse-DDIM steps over the whole schedule (5 for SD 1.5, 10 for SDXL); 0
        /// noises forward as Diffusion-DPO does (the smoothed loss alone, an ablation).
        inversion_steps: usize,
    },
    /// Diffusion-KTO (Li et al. 2024): single images labelled desirable or undesirable
    /// ([`super::diffusion_kto`]); on pairs, the preferred image is desirable.
    Kto,
    /// Diffusion-NPO (Wang et al., ICLR 2025): Diffusion-DPO with the labels swapped, which
    /// trains the negative-preference adapter that guidance uses in its negative branch.
    Npo,
}

impl Method {
    /// Parses `dpo`, `dcpo`, `mapo`, `smpo` (SmPO with `inversion_steps`) or `kto`.
    pub fn parse(s: &str, inversion_steps: usize) -> Result<Self> {
        Ok(match s {
            "dpo" => Method::Dpo,
            "dcpo" => Method::Dcpo,
            "mapo" => Method::Mapo,
            "smpo" => Method::Smpo { inversion_steps },
            "kto" => Method::Kto,
            "npo" => Method::Npo,
            other => {
                return Err(Error::input(
                    "--method",
                    format!("expected one of dpo, dcpo, mapo, smpo, kto, npo, got {other:?}"),
                ))
            }
        })
    }

    /// The papers' beta: DPO 5000, DCPO 500, MaPO 0.1, SmPO 2000 (SD 1.5 settings); KTO 1000,
    /// the official script's `--beta_dpo` default; NPO, Diffusion-DPO with the labels swapped,
    /// DPO's.
    pub fn default_beta(self) -> f64 {
        match self {
            Method::Dpo | Method::Npo => 5000.0,
            Method::Dcpo => 500.0,
            Method::Mapo => 0.1,
            Method::Smpo { .. } => 2000.0,
            Method::Kto => 1000.0,
        }
    }

    /// The method's name as the CLI spells it.
    pub fn name(self) -> &'static str {
        match self {
            Method::Dpo => "dpo",
            Method::Dcpo => "dcpo",
            Method::Mapo => "mapo",
            Method::Smpo { .. } => "smpo",
            Method::Kto => "kto",
            Method::Npo => "npo",
        }
    }
}

/// MaPO's margin multiplier `T` (the number of training timesteps) and its `snr_value`, as in
/// the paper's code.
const MAPO_MARGIN_SCALE: f64 = 1000.0;
const MAPO_SNR: f64 = 0.5;

impl Objective {
    /// The objective of a diffusion `method`, validated: `beta` (the method's paper value when
    /// `None`) and, for every method but MaPO, the DPO-family `loss_type` and `label_smoothing`.
    /// MaPO is a loss of its own with its paper's constants, so it takes neither: an error
    /// naming the setting when they are not the defaults (sigmoid, 0). Errors are
    /// [`Error::Input`] naming the setting (`beta`, `loss_type`, `label_smoothing`, ...).
    pub fn for_method(
        method: Method,
        beta: Option<f64>,
        loss_type: LossType,
        label_smoothing: f64,
    ) -> Result<Objective> {
        let beta = beta.unwrap_or(method.default_beta());
        if !matches!(method, Method::Mapo | Method::Kto) {
            return Objective::dpo(loss_type, beta, label_smoothing);
        }
        let name = method.name();
        if loss_type != LossType::Sigmoid {
            return Err(Error::input(
                "loss_type",
                format!("applies to dpo, dcpo and smpo, not {name}, got {loss_type}"),
            ));
        }
        if label_smoothing != 0.0 {
            return Err(Error::input(
                "label_smoothing",
                format!("applies to dpo, dcpo and smpo, not {name}, got {label_smoothing}"),
            ));
        }
        if method == Method::Kto {
            return Objective::kto(beta, super::kto::Kto::default(), super::kto::Utility::Sigmoid);
        }
        let objective = Objective::Mapo {
            beta,
            margin_scale: MAPO_MARGIN_SCALE,
            snr: MAPO_SNR,
        };
        objective.validate()?;
        Ok(objective)
    }
}

/// One batch of preference pairs, as stored in a safetensors file (see the module docs).
#[derive(Debug, Clone)]
pub struct PreferenceBatch {
    /// Preferred latents, already times the VAE scaling factor, `[B, C, h, w]`.
    pub latents_w: Tensor,
    /// Rejected latents, `[B, C, h, w]`.
    pub latents_l: Tensor,
    /// Noise shared by each pair, `[B, C, h, w]`.
    pub noise: Tensor,
    /// Timestep shared by each pair, `[B]`, integers in 0..T.
    pub timesteps: Tensor,
    /// SmPO's soft preference label of the preferred image, `[B]` in [0.5, 1].
    pub soft_label: Option<Tensor>,
    /// SDXL micro-conditioning `[B, 6]`, used for both images of a pair.
    pub time_ids: Option<Tensor>,
    /// Caption of each preferred image.
    pub captions_w: Vec<String>,
    /// Caption of each rejected image (DCPO).
    pub captions_l: Vec<String>,
}

impl PreferenceBatch {
    /// Reads a batch file; errors name the file and the tensor or metadata key.
    pub fn from_file(path: &Path) -> Result<Self> {
        let store = TensorStore::open_file(path)?;
        let dev = Device::Cpu;
        let f32_tensor = |name: &str| store.get(name, None, DType::F32, &dev);
        let optional = |name: &str| {
            if store.contains(name) {
                f32_tensor(name).map(Some)
            } else {
                Ok(None)
            }
        };
        let latents_w = f32_tensor("latents_w")?;
        let dims = latents_w.dims().to_vec();
        let bad = |name: &str, expected: Vec<usize>, got: &[usize]| Error::ShapeMismatch {
            file: path.to_path_buf(),
            name: name.to_string(),
            expected,
            got: got.to_vec(),
        };
        if dims.len() != 4 {
            return Err(Error::Record {
                file: path.to_path_buf(),
                index: 0,
                reason: format!("latents_w: expected shape [B, C, h, w], got {dims:?}"),
            });
        }
        let b = dims[0];
        let latents_l = f32_tensor("latents_l")?;
        let noise = f32_tensor("noise")?;
        for (name, t) in [("latents_l", &latents_l), ("noise", &noise)] {
            if t.dims() != dims.as_slice() {
                return Err(bad(name, dims.clone(), t.dims()));
            }
        }
        let timesteps = store.get("timesteps", None, DType::F32, &dev)?;
        if timesteps.dims() != [b] {
            return Err(bad("timesteps", vec![b], timesteps.dims()));
        }
        let soft_label = optional("soft_label")?;
        if let Some(s) = &soft_label {
            if s.dims() != [b] {
                return Err(bad("soft_label", vec![b], s.dims()));
            }
        }
        let time_ids = optional("time_ids")?;
        if let Some(t) = &time_ids {
            if t.dims() != [b, 6] {
                return Err(bad("time_ids", vec![b, 6], t.dims()));
            }
        }
        let meta = store.metadata();
        let captions = |key: &str| -> Result<Vec<String>> {
            let text = meta
                .get(key)
                .ok_or_else(|| Error::config(path, key, "missing from the file's metadata"))?;
            let list: Vec<String> = serde_json::from_str(text)
                .map_err(|e| Error::config(path, key, format!("expected a JSON list of strings: {e}")))?;
            if list.len() != b {
                return Err(Error::config(
                    path,
                    key,
                    format!("expected {b} captions (one per pair), got {}", list.len()),
                ));
            }
            Ok(list)
        };
        let captions_w = captions("captions_w")?;
        let captions_l = if meta.contains_key("captions_l") {
            captions("captions_l")?
        } else {
            captions_w.clone()
        };
        Ok(PreferenceBatch {
            latents_w,
            latents_l,
            noise,
            timesteps,
            soft_label,
            time_ids,
            captions_w,
            captions_l,
        })
    }

    /// Number of pairs.
    pub fn len(&self) -> usize {
        self.captions_w.len()
    }

    /// Whether the batch is empty.
    pub fn is_empty(&self) -> bool {
        self.captions_w.is_empty()
    }

    /// Pair `i` alone, as a batch of one.
    pub fn pair(&self, i: usize) -> Result<Self> {
        let one = |t: &Tensor| t.narrow(0, i, 1);
        Ok(PreferenceBatch {
            latents_w: one(&self.latents_w)?,
            latents_l: one(&self.latents_l)?,
            noise: one(&self.noise)?,
            timesteps: one(&self.timesteps)?,
            soft_label: self.soft_label.as_ref().map(one).transpose()?,
            time_ids: self.time_ids.as_ref().map(one).transpose()?,
            captions_w: vec![self.captions_w[i].clone()],
            captions_l: vec![self.captions_l[i].clone()],
        })
    }
}

/// Text conditioning of a batch: per side, the UNet's text states and SDXL's added inputs.
#[derive(Debug, Clone)]
pub struct PairConditioning {
    /// Text states of the preferred side, `[B, L, D]`.
    pub context_w: Tensor,
    /// Text states of the rejected side (the preferred caption's, except for DCPO).
    pub context_l: Tensor,
    /// SDXL pooled embeddings and time ids of the preferred side.
    pub added_w: Option<AddedCond>,
    /// SDXL pooled embeddings and time ids of the rejected side.
    pub added_l: Option<AddedCond>,
}

/// Everything `diffalign loss` reports for one batch.
#[derive(Debug, Clone)]
pub struct DiffusionLoss {
    /// The loss and its metrics.
    pub loss: PreferenceLoss,
    /// Policy MSE per pair, preferred side, `[B]`.
    pub mse_w: Tensor,
    /// Policy MSE per pair, rejected side.
    pub mse_l: Tensor,
    /// Reference MSEs `(w, l)` (computed for every method, for the metrics).
    pub ref_mse: Option<(Tensor, Tensor)>,
    /// SmPO's inverted latents `(w, l)`.
    pub inverted: Option<(Tensor, Tensor)>,
}

/// Per-sample mean over all but the first dimension of `(prediction - target)^2`, in f32.
pub fn per_sample_mse(prediction: &Tensor, target: &Tensor) -> Result<Tensor> {
    let (p, t) = (prediction.to_dtype(DType::F32)?, target.to_dtype(DType::F32)?);
    Ok(crate::ops::mse::per_sample_mse(&p, &t)?)
}

fn cat_added(a: &Option<AddedCond>, b: &Option<AddedCond>) -> Result<Option<AddedCond>> {
    Ok(match (a, b) {
        (Some(a), Some(b)) => Some(AddedCond {
            text_embeds: Tensor::cat(&[&a.text_embeds, &b.text_embeds], 0)?,
            time_ids: Tensor::cat(&[&a.time_ids, &b.time_ids], 0)?,
        }),
        _ => None,
    })
}

/// `sqrt(abar_t)` and `sqrt(1 - abar_t)` per sample, `[B, 1, 1, 1]` f32 (f32 arithmetic, as
/// diffusers gathers them from its f32 table).
fn alpha_coefficients(schedule: &NoiseSchedule, timesteps: &[usize], device: &Device) -> Result<(Tensor, Tensor)> {
    let ac = schedule.alphas_cumprod();
    let a: Vec<f32> = timesteps.iter().map(|&t| (ac[t] as f32).sqrt()).collect();
    let s: Vec<f32> = timesteps.iter().map(|&t| (1.0 - ac[t] as f32).sqrt()).collect();
    let n = timesteps.len();
    Ok((
        Tensor::from_vec(a, (n, 1, 1, 1), device)?,
        Tensor::from_vec(s, (n, 1, 1, 1), device)?,
    ))
}

/// The frozen reference model of the methods that have one.
#[derive(Debug, Clone, Copy)]
pub enum Reference<'a> {
    /// A UNet of its own (full fine-tuning, or a LoRA on another base).
    Unet(&'a UNet2DConditionModel),
    /// The policy with its LoRA adapters switched off: the base it adapts, held once.
    PolicyWithoutAdapters(&'a LoraSwitch),
}

/// The evaluator of one method's loss: the UNets, the noise schedule and the objective.
pub struct DiffusionPreference<'a> {
    /// The model being trained.
    pub policy: &'a UNet2DConditionModel,
    /// The frozen reference (its outputs carry no gradient).
    pub reference: Option<Reference<'a>>,
    /// The pipeline's training noise schedule.
    pub schedule: &'a NoiseSchedule,
    /// The method.
    pub method: Method,
    /// The objective (loss form and beta), validated when it was built
    /// ([`Objective::for_method`], [`Objective::validate`]).
    pub objective: Objective,
}

impl DiffusionPreference<'_> {
    /// Computes the loss of `batch` with the given conditioning (already encoded per side).
    pub fn loss(&self, batch: &PreferenceBatch, cond: &PairConditioning) -> Result<DiffusionLoss> {
        self.loss_with_reference_conditioning(batch, cond, None)
    }

    /// [`DiffusionPreference::loss`] with the reference conditioned on `ref_cond` when given:
    /// the base text encoders' states when the policy's text encoders carry trained adapters.
    pub fn loss_with_reference_conditioning(
        &self,
        batch: &PreferenceBatch,
        cond: &PairConditioning,
        ref_cond: Option<&PairConditioning>,
    ) -> Result<DiffusionLoss> {
        let b = batch.len();
        let device = self.policy.device().clone();
        let t_idx = self.timestep_indices(&batch.timesteps)?;
        // NPO learns the opposite preference: the rejected image takes the preferred side.
        let sides = match self.method {
            Method::Npo => [&batch.latents_l, &batch.latents_w],
            _ => [&batch.latents_w, &batch.latents_l],
        };
        let x0 = Tensor::cat(&sides, 0)?.to_device(&device)?;
        let t2: Vec<usize> = t_idx.iter().chain(t_idx.iter()).copied().collect();
        let context = Tensor::cat(&[&cond.context_w, &cond.context_l], 0)?;
        let added = cat_added(&cond.added_w, &cond.added_l)?;
        let ts = Tensor::from_vec(t2.iter().map(|&t| t as f32).collect::<Vec<_>>(), 2 * b, &device)?;

        let (x_t, target, inverted) = match self.method {
            Method::Smpo { inversion_steps } if inversion_steps > 0 => {
                let x_t = self.renoise_invert(&x0, &t2, &context, added.as_ref(), inversion_steps)?;
                let (sa, s1a) = alpha_coefficients(self.schedule, &t2, &device)?;
                let eps = (x_t.broadcast_sub(&x0.broadcast_mul(&sa)?)?).broadcast_div(&s1a)?;
                let target = match self.schedule.prediction_type() {
                    PredictionType::Epsilon => eps,
                    PredictionType::VPrediction => (eps.broadcast_mul(&sa)? - x0.broadcast_mul(&s1a)?)?,
                    PredictionType::Sample => x0.clone(),
                };
                let inv = (x_t.narrow(0, 0, b)?, x_t.narrow(0, b, b)?);
                (x_t, target, Some(inv))
            }
            _ => {
                let noise = batch.noise.to_device(&device)?;
                let noise2 = Tensor::cat(&[&noise, &noise], 0)?;
                let x_t = self.schedule.add_noise(&x0, &noise2, &ts)?;
                let target = self.schedule.training_target(&x0, &noise2, &ts)?;
                (x_t, target, None)
            }
        };

        let ref_cond = ref_cond
            .map(|c| {
                Ok::<_, Error>((
                    Tensor::cat(&[&c.context_w, &c.context_l], 0)?.detach(),
                    cat_added(&c.added_w, &c.added_l)?,
                ))
            })
            .transpose()?;
        let ref_cond = ref_cond.as_ref().map(|(c, a)| (c, a.as_ref()));
        let (mse, ref_mse) = self.errors(&x_t, &ts, (&context, added.as_ref()), ref_cond, &target)?;
        let (mse_w, mse_l) = (mse.narrow(0, 0, b)?, mse.narrow(0, b, b)?);
        let ref_mse = ref_mse
            .map(|m| Ok::<_, Error>((m.narrow(0, 0, b)?, m.narrow(0, b, b)?)))
            .transpose()?;
        if self.objective.needs_reference() && ref_mse.is_none() {
            return Err(Error::input(
                "reference",
                format!("{} needs a reference UNet", self.method.name()),
            ));
        }
        let weights = match self.method {
            Method::Smpo { .. } => {
                let p = batch
                    .soft_label
                    .as_ref()
                    .ok_or_else(|| Error::input("soft_label", "smpo needs a soft_label per pair"))?;
                Some(((p.to_device(&device)? * 2.0)? - 1.0)?.affine(10.0, 0.0)?)
            }
            _ => None,
        };
        let proxy = |m: &Tensor| m.affine(-0.5, 0.0);
        let scores = PairScores {
            policy_w: proxy(&mse_w)?,
            policy_l: proxy(&mse_l)?,
            reference: ref_mse
                .as_ref()
                .map(|(w, l)| Ok::<_, Error>((proxy(w)?, proxy(l)?)))
                .transpose()?,
            weights,
            lengths: None,
        };
        let loss = self.objective.evaluate(&scores)?;
        Ok(DiffusionLoss {
            loss,
            mse_w,
            mse_l,
            ref_mse,
            inverted,
        })
    }

    /// The batch's timesteps `[N]` as indices into the training schedule; an error names any
    /// that is not an integer in `0..T`.
    pub fn timestep_indices(&self, timesteps: &Tensor) -> Result<Vec<usize>> {
        let n = self.schedule.num_train_timesteps();
        timesteps
            .to_dtype(DType::F64)?
            .to_vec1::<f64>()?
            .into_iter()
            .map(|t| {
                if t.fract() == 0.0 && t >= 0.0 && (t as usize) < n {
                    Ok(t as usize)
                } else {
                    Err(Error::input(
                        "timesteps",
                        format!("expected integers in 0..{n}, got {t}"),
                    ))
                }
            })
            .collect()
    }

    /// The policy's per-sample MSE `[N]` of its prediction at `x_t` under `cond` (context and
    /// added conditioning) against `target`, and the reference's (detached) under
    /// `reference_cond` (else `cond`), when there is a reference.
    pub fn errors(
        &self,
        x_t: &Tensor,
        ts: &Tensor,
        cond: (&Tensor, Option<&AddedCond>),
        reference_cond: Option<(&Tensor, Option<&AddedCond>)>,
        target: &Tensor,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let dtype = self.policy_dtype();
        let run = |unet: &UNet2DConditionModel, (context, added): (&Tensor, Option<&AddedCond>)| -> Result<Tensor> {
            let pred = unet.forward(&x_t.to_dtype(dtype)?, ts, &context.to_dtype(dtype)?, added)?;
            per_sample_mse(&pred, target)
        };
        let mse = run(self.policy, cond)?;
        let ref_cond = reference_cond.unwrap_or(cond);
        let ref_mse = match self.reference {
            Some(Reference::Unet(unet)) => Some(run(unet, ref_cond)?.detach()),
            Some(Reference::PolicyWithoutAdapters(switch)) => {
                let _off = switch.off();
                Some(run(self.policy, ref_cond)?.detach())
            }
            None => None,
        };
        Ok((mse, ref_mse))
    }

    fn policy_dtype(&self) -> DType {
        self.policy.dtype()
    }

    /// SmPO's ReNoise inversion: from clean latents `x0` `[N, C, h, w]` up to each row's
    /// timestep `t[i]`, with inverse-DDIM steps at `{1, 1 + T/n, ...}` (leading spacing, offset
    /// 1, no clipping, `alphas_cumprod[0]` below the first) that lie below `t[i]`, each refined
    /// once: `e1 = unet(x, s)`, `x1 = step(e1)`, `e2 = unet(x1, s)`, `x = step((e1 + e2) / 2)`.
    /// The policy runs without gradient.
    pub fn renoise_invert(
        &self,
        x0: &Tensor,
        t: &[usize],
        context: &Tensor,
        added: Option<&AddedCond>,
        steps: usize,
    ) -> Result<Tensor> {
        let settings = DdimSettings {
            timestep_spacing: TimestepSpacing::Leading,
            steps_offset: 1,
            set_alpha_to_one: false,
            clip: None,
        };
        let inverse = DDIMInverseScheduler::new(self.schedule, settings, steps)?;
        let device = x0.device().clone();
        let dtype = self.policy_dtype();
        let n = x0.dim(0)?;
        let context = context.to_dtype(dtype)?;
        let mut x = x0.clone();
        for &s in inverse.timesteps() {
            let s = s as usize;
            let active: Vec<f32> = t.iter().map(|&ti| if s < ti { 1.0 } else { 0.0 }).collect();
            if active.iter().all(|&a| a == 0.0) {
                continue;
            }
            let mask = Tensor::from_vec(active, (n, 1, 1, 1), &device)?;
            let ts = Tensor::from_vec(vec![s as f32; n], n, &device)?;
            let eval = |x: &Tensor| -> Result<Tensor> {
                Ok(self
                    .policy
                    .forward(&x.to_dtype(dtype)?, &ts, &context, added)?
                    .to_dtype(DType::F32)?
                    .detach())
            };
            let e1 = eval(&x)?;
            let x1 = inverse.step_to(&e1, s, &x)?;
            let e2 = eval(&x1)?;
            let stepped = inverse.step_to(&((e1 + e2)? * 0.5)?, s, &x)?;
            // Rows whose timestep is not above s keep their latent.
            x = (stepped.broadcast_mul(&mask)? + x.broadcast_mul(&(1.0 - &mask)?)?)?;
        }
        Ok(x)
    }
}
