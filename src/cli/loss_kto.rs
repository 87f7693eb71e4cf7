//! `diffalign loss --method kto`: the Diffusion-KTO loss of one labelled batch, with its
//! metrics and gradients.

use std::path::Path;

use candle_core::{DType, Tensor, Var};
use clap::Args;
use diffalign::preference::diffusion::{DiffusionPreference, Method};
use diffalign::preference::diffusion_kto::LabelledBatch;
use diffalign::preference::kto::KtoSettings;
use diffalign::preference::Objective;
use diffalign::sampling::StableDiffusionPipeline;
use diffalign::train::labelled_conditioning;

/// KTO's settings, for `loss` (as `train`'s `kto_lambda_d`, `kto_lambda_u`, `halo`).
#[derive(Debug, Args)]
pub struct KtoArgs {
    /// KTO: weight of desirable images (lambda_D).
    #[arg(long, default_value_t = 1.0)]
    kto_lambda_d: f64,
    /// KTO: weight of undesirable images (lambda_U).
    #[arg(long, default_value_t = 1.0)]
    kto_lambda_u: f64,
    /// KTO's value function: sigmoid (Kahneman-Tversky), linear or log_sigmoid.
    #[arg(long, default_value = "sigmoid")]
    halo: String,
}

impl KtoArgs {
    /// `objective` with these settings for `kto`; an error when one is set for another method.
    pub fn apply(&self, method: Method, objective: Objective) -> anyhow::Result<Objective> {
        let settings = KtoSettings {
            kto_lambda_d: self.kto_lambda_d,
            kto_lambda_u: self.kto_lambda_u,
            halo: self.halo.clone(),
        };
        Ok(settings.apply(method == Method::Kto, objective)?)
    }
}

fn to_list(t: &Tensor) -> anyhow::Result<Vec<f64>> {
    Ok(t.to_dtype(DType::F64)?.to_vec1::<f64>()?)
}

/// Evaluates the labelled batch at `batch_file`, writes the gradients of the `trainable`
/// tensors to `grads_out` if given, and prints the JSON report.
pub fn run(
    pipe: &StableDiffusionPipeline,
    eval: &DiffusionPreference,
    batch_file: &Path,
    grads_out: Option<&Path>,
    trainable: Vec<(String, Var)>,
) -> anyhow::Result<()> {
    let batch = LabelledBatch::from_file(batch_file)?;
    let (context, added) = labelled_conditioning(pipe, &batch)?;
    let out = eval.labelled_loss(&batch, &context, added.as_ref())?;
    if let Some(path) = grads_out {
        super::loss::write_grads(&out.loss.loss, trainable, path)?;
    }
    let m = &out.loss.metrics;
    let mut report = serde_json::json!({
        "method": "kto",
        "loss": m.loss,
        "implicit_acc": m.implicit_acc,
        "reward_margin": m.reward_margin,
        "mse": to_list(&out.mse)?,
        "ref_mse": to_list(&out.ref_mse)?,
    });
    if let Objective::Kto { kto, .. } = eval.objective {
        report["beta"] = kto.beta.into();
    }
    println!("{report}");
    Ok(())
}
