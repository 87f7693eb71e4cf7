//! Diffusion-KTO (Li et al. 2024, "Aligning Diffusion Models by Optimizing Human Utility",
//! arXiv 2404.04465; official code `jacklishufan/diffusion-kto`, `train.py --loss kto --halo
//! sigmoid`): single images labelled desirable or undesirable, and the batch format
//! `diffalign loss --method kto` reads.
//!
//! The formula, as the official script computes it (`train_kto_sd_v1.5.py`, `--loss kto`, its
//! default `--bce_offset none`):
//! - each image gets its own noise and timestep; `L` and `L_ref` are the policy's and the frozen
//!   reference's per-sample MSE of the noise (or velocity) prediction, as in Diffusion-DPO;
//! - the implicit reward is `rho = -(L - L_ref)` (`policy_KL_logps - reference_KL_logps`), scaled
//!   by `beta` (the script's `--beta_dpo`, default 1000);
//! - the reference point `z = max(0, mean_batch(rho))`, detached (the script's `kl`, averaged over
//!   the images of every process's micro-batch; ours over the micro-batch);
//! - `x = beta * (rho - z)` for desirable and `beta * (z - rho)` for undesirable images; the
//!   loss is `mean(lambda * (1 - U(x)))` with `lambda` = `kto_lambda_d` or `kto_lambda_u` and
//!   `U` the value function (`--halo`): sigmoid (the default, Kahneman-Tversky), log-sigmoid (the
//!   script's `loss_averse`) or linear (risk-neutral), see [`Utility`].
//!
//! The batch file holds `latents` `[B, C, h, w]` (times the VAE scaling factor), `noise`
//! `[B, C, h, w]`, `timesteps` `[B]`, `labels` `[B]` (1 desirable, 0 undesirable), optionally
//! SDXL `time_ids` `[B, 6]`, and the metadata `captions` (a JSON list, one per image).

use std::path::Path;

use candle_core::{DType, Device, Tensor};

use super::diffusion::{DiffusionPreference, PreferenceBatch};
use super::kto::{Kto, Utility};
use super::objective::{Objective, PreferenceLoss};
use crate::models::unet::AddedCond;
use crate::weights::TensorStore;
use crate::{Error, Result};

impl Objective {
    /// The KTO objective with `beta` and `kto`'s weights (its beta is replaced), validated.
    pub fn kto(beta: f64, kto: Kto, utility: Utility) -> Result<Objective> {
        let objective = Objective::Kto {
            kto: Kto { beta, ..kto },
            utility,
        };
        objective.validate()?;
        Ok(objective)
    }

    /// A KTO objective with other desirable / undesirable weights and value function; an error
    /// naming `kto_lambda_d` for any other objective.
    pub fn with_kto_settings(self, lambda_d: f64, lambda_u: f64, utility: Utility) -> Result<Objective> {
        match self {
            Objective::Kto { kto, .. } => Objective::kto(
                kto.beta,
                Kto {
                    desirable_weight: lambda_d,
                    undesirable_weight: lambda_u,
                    ..kto
                },
                utility,
            ),
            _ => Err(Error::input("kto_lambda_d", "applies to the kto method only")),
        }
    }
}

/// A batch of single images with binary labels (see the module docs).
#[derive(Debug, Clone)]
pub struct LabelledBatch {
    /// Latents, already times the VAE scaling factor, `[B, C, h, w]`.
    pub latents: Tensor,
    /// Noise of each image, `[B, C, h, w]`.
    pub noise: Tensor,
    /// Timestep of each image, `[B]`, integers in 0..T.
    pub timesteps: Tensor,
    /// Whether each image is desirable.
    pub labels: Vec<bool>,
    /// SDXL micro-conditioning `[B, 6]`.
    pub time_ids: Option<Tensor>,
    /// Caption of each image.
    pub captions: Vec<String>,
}

impl LabelledBatch {
    /// Reads a batch file; errors name the file and the tensor, record or metadata key.
    pub fn from_file(path: &Path) -> Result<Self> {
        let store = TensorStore::open_file(path)?;
        let dev = Device::Cpu;
        let get = |name: &str| store.get(name, None, DType::F32, &dev);
        let latents = get("latents")?;
        let dims = latents.dims().to_vec();
        if dims.len() != 4 {
            return Err(Error::Record {
                file: path.to_path_buf(),
                index: 0,
                reason: format!("latents: expected shape [B, C, h, w], got {dims:?}"),
            });
        }
        let b = dims[0];
        let bad = |name: &str, expected: Vec<usize>, got: &[usize]| Error::ShapeMismatch {
            file: path.to_path_buf(),
            name: name.to_string(),
            expected,
            got: got.to_vec(),
        };
        let noise = get("noise")?;
        if noise.dims() != dims.as_slice() {
            return Err(bad("noise", dims.clone(), noise.dims()));
        }
        let timesteps = get("timesteps")?;
        let raw_labels = get("labels")?;
        for (name, t) in [("timesteps", &timesteps), ("labels", &raw_labels)] {
            if t.dims() != [b] {
                return Err(bad(name, vec![b], t.dims()));
            }
        }
        let labels = raw_labels
            .to_vec1::<f32>()?
            .into_iter()
            .enumerate()
            .map(|(i, v)| match v {
                1.0 => Ok(true),
                0.0 => Ok(false),
                other => Err(Error::Record {
                    file: path.to_path_buf(),
                    index: i,
                    reason: format!("labels: expected 1 (desirable) or 0 (undesirable), got {other}"),
                }),
            })
            .collect::<Result<Vec<bool>>>()?;
        let time_ids = if store.contains("time_ids") {
            let t = get("time_ids")?;
            if t.dims() != [b, 6] {
                return Err(bad("time_ids", vec![b, 6], t.dims()));
            }
            Some(t)
        } else {
            None
        };
        let meta = store.metadata();
        let text = meta
            .get("captions")
            .ok_or_else(|| Error::config(path, "captions", "missing from the file's metadata"))?;
        let captions: Vec<String> = serde_json::from_str(text)
            .map_err(|e| Error::config(path, "captions", format!("expected a JSON list of strings: {e}")))?;
        if captions.len() != b {
            return Err(Error::config(
                path,
                "captions",
                format!("expected {b} captions (one per image), got {}", captions.len()),
            ));
        }
        Ok(LabelledBatch {
            latents,
            noise,
            timesteps,
            labels,
            time_ids,
            captions,
        })
    }

    /// The pairs of `batch` as single images: every preferred image (desirable), then every
    /// rejected one (undesirable), each pair's noise and timestep on both of its images.
    pub fn from_pairs(batch: &PreferenceBatch) -> Result<Self> {
        let b = batch.len();
        let twice = |t: &Tensor| Tensor::cat(&[t, t], 0);
        Ok(LabelledBatch {
            latents: Tensor::cat(&[&batch.latents_w, &batch.latents_l], 0)?,
            noise: twice(&batch.noise)?,
            timesteps: twice(&batch.timesteps)?,
            labels: (0..2 * b).map(|i| i < b).collect(),
            time_ids: batch.time_ids.as_ref().map(twice).transpose()?,
            captions: batch.captions_w.iter().chain(&batch.captions_l).cloned().collect(),
        })
    }

    /// Number of images.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether the batch is empty.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }
}

/// What the KTO loss of one labelled batch reports.
#[derive(Debug, Clone)]
pub struct LabelledLoss {
    /// The loss and its metrics (`implicit_acc`: the fraction of images with `x > 0`).
    pub loss: PreferenceLoss,
    /// Policy MSE per image, `[B]`.
    pub mse: Tensor,
    /// Reference MSE per image, `[B]`.
    pub ref_mse: Tensor,
}

impl DiffusionPreference<'_> {
    /// The KTO loss of `batch` with its text states `context` `[B, L, D]` (and SDXL's added
    /// inputs); an error unless the objective is KTO and there is a reference.
    pub fn labelled_loss(
        &self,
        batch: &LabelledBatch,
        context: &Tensor,
        added: Option<&AddedCond>,
    ) -> Result<LabelledLoss> {
        let Objective::Kto { kto, utility } = self.objective else {
            return Err(Error::input("method", "labelled batches need the kto objective"));
        };
        if self.reference.is_none() {
            return Err(Error::input("reference", "kto needs a reference UNet"));
        }
        let device = self.policy.device().clone();
        let t_idx = self.timestep_indices(&batch.timesteps)?;
        let ts = Tensor::from_vec(
            t_idx.iter().map(|&t| t as f32).collect::<Vec<_>>(),
            t_idx.len(),
            &device,
        )?;
        let x0 = batch.latents.to_device(&device)?;
        let noise = batch.noise.to_device(&device)?;
        let x_t = self.schedule.add_noise(&x0, &noise, &ts)?;
        let target = self.schedule.training_target(&x0, &noise, &ts)?;
        let (mse, ref_mse) = self.errors(&x_t, &ts, (context, added), None, &target)?;
        let ref_mse = ref_mse.expect("checked above: there is a reference");
        let proxy = |m: &Tensor| m.neg();
        let loss = kto.evaluate_unpaired(utility, &proxy(&mse)?, &proxy(&ref_mse)?, &batch.labels)?;
        Ok(LabelledLoss { loss, mse, ref_mse })
    }
}
