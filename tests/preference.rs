//! Preference losses against the reference implementation's numbers
//! (`../shared/fixtures/sd15-losses`): loss, metrics, MSEs, SmPO's inverted latents and gradients.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{DType, Tensor};
use common::*;
use diffalign::models::unet::UNet2DConditionModel;
use diffalign::preference::diffusion::{DiffusionPreference, Method, PreferenceBatch, Reference};
use diffalign::preference::objective::log_sigmoid;
use diffalign::preference::{LossType, Objective, PairScores};
use diffalign::sampling::pipeline::PipelineSources;
use diffalign::sampling::StableDiffusionPipeline;
use diffalign::schedulers::NoiseSchedule;

/// Relative tolerance on losses (beta in the thousands amplifies f32 rounding of the MSEs).
const LOSS_RTOL: f64 = 1e-3;
/// Relative tolerance, in norm, on gradients.
const GRAD_RTOL: f64 = 1e-2;

fn losses_dir() -> PathBuf {
    shared_fixtures().join("sd15-losses")
}

fn scalar(t: &Tensor) -> f64 {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()[0]
}

fn as_vec(t: &Tensor) -> Vec<f64> {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()
}

fn assert_rel(what: &str, got: f64, want: f64, rtol: f64) {
    let err = (got - want).abs() / want.abs().max(1e-12);
    assert!(err <= rtol, "{what}: got {got}, want {want} (rel err {err:e})");
}

/// Runs `diffalign loss` and returns its JSON report; gradients go to `grads_out` if given.
fn run_loss(model: &Path, policy: &[&str], method: &str, batch: &Path, grads_out: Option<&Path>) -> serde_json::Value {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_diffalign"));
    cmd.args(["loss", "--model"])
        .arg(model)
        .args(policy)
        .args(["--method", method, "--batch"])
        .arg(batch);
    if let Some(g) = grads_out {
        cmd.arg("--grads-out").arg(g);
    }
    let o = cmd.output().unwrap();
    assert!(
        o.status.success(),
        "loss {method} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).unwrap()
}

/// Compares a `diffalign loss` report and gradient file with `dir/expected.safetensors` under `prefix`.
fn check_against_expected(dir: &Path, prefix: &str, report: &serde_json::Value, grads: &Path, grad_keys: &[String]) {
    let expected = load(&dir.join("expected.safetensors"));
    let e = |k: &str| &expected[&format!("{prefix}.{k}")];
    assert_rel(
        &format!("{prefix}.loss"),
        report["loss"].as_f64().unwrap(),
        scalar(e("loss")),
        LOSS_RTOL,
    );
    if let Some(acc) = expected.get(&format!("{prefix}.implicit_acc")) {
        assert_eq!(
            report["implicit_acc"].as_f64().unwrap(),
            scalar(acc),
            "{prefix}.implicit_acc"
        );
    }
    for key in ["mse_w", "mse_l", "ref_mse_w", "ref_mse_l"] {
        let got: Vec<f64> = report[key]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        for (g, w) in got.iter().zip(as_vec(e(key))) {
            assert_rel(&format!("{prefix}.{key}"), *g, w, 1e-5);
        }
    }
    let got = load(grads);
    for k in grad_keys {
        let want = e(&format!("grad.{k}"));
        let g = got.get(k).unwrap_or_else(|| panic!("{prefix}: no gradient for {k}"));
        let diff = (g - want).unwrap().sqr().unwrap().sum_all().unwrap().sqrt().unwrap();
        let norm = want.sqr().unwrap().sum_all().unwrap().sqrt().unwrap();
        let rel = scalar(&diff) / scalar(&norm).max(1e-30);
        assert!(rel <= GRAD_RTOL, "{prefix}.grad.{k}: relative error in norm {rel:e}");
    }
}

fn grad_keys(dir: &Path, meta_key: &str) -> Vec<String> {
    serde_json::from_str(&metadata(&dir.join("expected.safetensors"))[meta_key]).unwrap()
}

/// Every method with the full-UNet policy of the loss case in `dir` on the pipeline `model`.
fn check_full_policy_case(model: &Path, dir: &Path) {
    let tmp = tempfile::tempdir().unwrap();
    let policy = dir.join("policy_unet");
    let meta = metadata(&dir.join("expected.safetensors"));
    let steps = meta.get("inversion_steps").cloned().unwrap_or_else(|| "5".into());
    let policy_arg = ["--unet", policy.to_str().unwrap(), "--inversion-steps", &steps];
    for method in ["dpo", "dcpo", "mapo", "smpo"] {
        let grads = tmp.path().join(format!("{method}.safetensors"));
        let report = run_loss(model, &policy_arg, method, &dir.join("batch.safetensors"), Some(&grads));
        check_against_expected(
            dir,
            &format!("full.{method}"),
            &report,
            &grads,
            &grad_keys(dir, "grad_keys_full"),
        );
    }
}

/// Every method with the LoRA policy of the loss case in `dir`: gradients under the file's keys.
fn check_lora_policy_case(model: &Path, dir: &Path) {
    let tmp = tempfile::tempdir().unwrap();
    let lora = dir.join("policy_lora/pytorch_lora_weights.safetensors");
    let meta = metadata(&dir.join("expected.safetensors"));
    let steps = meta.get("inversion_steps").cloned().unwrap_or_else(|| "5".into());
    let policy_arg = ["--lora", lora.to_str().unwrap(), "--inversion-steps", &steps];
    for method in ["dpo", "dcpo", "mapo", "smpo"] {
        let grads = tmp.path().join(format!("{method}.safetensors"));
        let report = run_loss(model, &policy_arg, method, &dir.join("batch.safetensors"), Some(&grads));
        check_against_expected(
            dir,
            &format!("lora.{method}"),
            &report,
            &grads,
            &grad_keys(dir, "grad_keys_lora"),
        );
    }
}

#[test]
fn loss_lora_policy_matches_reference_for_every_method() {
    check_lora_policy_case(&shared_fixtures().join("sd15"), &losses_dir());
    check_lora_policy_case(&own_fixtures().join("sd21v"), &own_fixtures().join("losses-sd21v"));
    check_lora_policy_case(&own_fixtures().join("sdxl"), &own_fixtures().join("losses-sdxl"));
}

#[test]
fn loss_full_unet_policy_matches_reference_for_every_method() {
    check_full_policy_case(&shared_fixtures().join("sd15"), &losses_dir());
}

#[test]
fn loss_sd21_v_prediction_matches_reference_for_every_method() {
    check_full_policy_case(&own_fixtures().join("sd21v"), &own_fixtures().join("losses-sd21v"));
}

#[test]
fn loss_sdxl_matches_reference_for_every_method() {
    check_full_policy_case(&own_fixtures().join("sdxl"), &own_fixtures().join("losses-sdxl"));
}

/// The shared SD 1.5 pipeline, the loss case's policy UNet, the noise schedule and the batch.
fn sd15_loss_case() -> (
    StableDiffusionPipeline,
    UNet2DConditionModel,
    NoiseSchedule,
    PreferenceBatch,
) {
    let opts = load_options();
    let pipe = StableDiffusionPipeline::load(
        &PipelineSources {
            root: shared_fixtures().join("sd15"),
            ..Default::default()
        },
        &opts,
    )
    .unwrap();
    let (policy, _) = UNet2DConditionModel::from_pretrained(&losses_dir().join("policy_unet"), &opts).unwrap();
    let schedule = NoiseSchedule::from_config(&pipe.scheduler_config).unwrap();
    let batch = PreferenceBatch::from_file(&losses_dir().join("batch.safetensors")).unwrap();
    (pipe, policy, schedule, batch)
}

#[test]
fn smpo_renoise_inversion_matches_reference() {
    let (pipe, policy, schedule, batch) = sd15_loss_case();
    let method = Method::Smpo { inversion_steps: 5 };
    let cond = diffalign_cli_conditioning(&pipe, &batch);
    let eval = DiffusionPreference {
        policy: &policy,
        reference: Some(Reference::Unet(&pipe.unet)),
        schedule: &schedule,
        method,
        objective: Objective::Dpo {
            loss_type: LossType::Sigmoid,
            beta: 2000.0,
            label_smoothing: 0.0,
        },
    };
    let out = eval.loss(&batch, &cond).unwrap();
    let expected = load(&losses_dir().join("expected.safetensors"));
    let (w, l) = out.inverted.unwrap();
    assert_close("smpo inverted_w", &w, &expected["full.smpo.inverted_w"], MODULE_ATOL);
    assert_close("smpo inverted_l", &l, &expected["full.smpo.inverted_l"], MODULE_ATOL);
}

/// SmPO with no inversion steps noises forward as Diffusion-DPO (same MSEs) and weighs each
/// pair's margin by `10·(2p − 1)`: its loss, computed here in f64 from those MSEs.
#[test]
fn smpo_without_inversion_is_dpo_noising_with_smoothed_weights() {
    let (pipe, policy, schedule, batch) = sd15_loss_case();
    let cond = diffalign_cli_conditioning(&pipe, &batch);
    let beta = 2000.0;
    let run = |method| {
        DiffusionPreference {
            policy: &policy,
            reference: Some(Reference::Unet(&pipe.unet)),
            schedule: &schedule,
            method,
            objective: Objective::Dpo {
                loss_type: LossType::Sigmoid,
                beta,
                label_smoothing: 0.0,
            },
        }
        .loss(&batch, &cond)
        .unwrap()
    };
    let dpo = run(Method::Dpo);
    let smpo = run(Method::Smpo { inversion_steps: 0 });
    assert!(smpo.inverted.is_none());
    assert_close("smpo mse_w", &smpo.mse_w, &dpo.mse_w, 1e-7);
    assert_close("smpo mse_l", &smpo.mse_l, &dpo.mse_l, 1e-7);
    let (mw, ml) = (f64s(&smpo.mse_w), f64s(&smpo.mse_l));
    let (rw, rl) = smpo.ref_mse.as_ref().map(|(w, l)| (f64s(w), f64s(l))).unwrap();
    let p = f64s(batch.soft_label.as_ref().expect("the fixture batch has soft labels"));
    let want: f64 = (0..p.len())
        .map(|i| {
            let inside = -0.5 * beta * 10.0 * (2.0 * p[i] - 1.0) * ((mw[i] - ml[i]) - (rw[i] - rl[i]));
            (1.0 + (-inside).exp()).ln()
        })
        .sum::<f64>()
        / p.len() as f64;
    let got = scalar(&smpo.loss.loss);
    assert!((got - want).abs() <= 1e-5 * want.abs().max(1.0), "loss {got} vs {want}");
}

/// The preferred caption's conditioning on both sides (what DPO, MaPO and SmPO use).
fn diffalign_cli_conditioning(
    pipe: &StableDiffusionPipeline,
    batch: &PreferenceBatch,
) -> diffalign::preference::diffusion::PairConditioning {
    let enc = pipe.encode_text(&batch.captions_w).unwrap();
    diffalign::preference::diffusion::PairConditioning {
        context_w: enc.context.clone(),
        context_l: enc.context,
        added_w: None,
        added_l: None,
    }
}

/// The loss table against its formulas, computed here independently in f64.
#[test]
fn objective_loss_types_match_their_formulas() {
    let dev = device();
    let t = |v: &[f64]| Tensor::new(v, &dev).unwrap();
    let (pw, pl, rw, rl) = (
        [-0.2, -0.5, -0.1],
        [-0.4, -0.1, -0.05],
        [-0.3, -0.2, -0.15],
        [-0.3, -0.3, -0.02],
    );
    let scores = PairScores {
        policy_w: t(&pw),
        policy_l: t(&pl),
        reference: Some((t(&rw), t(&rl))),
        weights: None,
        lengths: None,
    };
    let (beta, eps) = (2.0, 0.1);
    let ls = |x: f64| x.min(0.0) - (-x.abs()).exp().ln_1p();
    let h: Vec<f64> = (0..3).map(|i| (pw[i] - rw[i]) - (pl[i] - rl[i])).collect();
    let mean = |f: &dyn Fn(f64) -> f64| h.iter().map(|&h| f(h)).sum::<f64>() / 3.0;
    let cases: [(LossType, f64, f64); 5] = [
        (LossType::Sigmoid, 0.0, mean(&|h| -ls(beta * h))),
        (
            LossType::Sigmoid,
            eps,
            mean(&|h| -(1.0 - eps) * ls(beta * h) - eps * ls(-beta * h)),
        ),
        (
            LossType::Robust,
            eps,
            mean(&|h| (-(1.0 - eps) * ls(beta * h) + eps * ls(-beta * h)) / (1.0 - 2.0 * eps)),
        ),
        (LossType::Hinge, 0.0, mean(&|h| (1.0 - beta * h).max(0.0))),
        (LossType::Ipo, 0.0, mean(&|h| (h - 1.0 / (2.0 * beta)).powi(2))),
    ];
    for (loss_type, label_smoothing, want) in cases {
        let obj = Objective::Dpo {
            loss_type,
            beta,
            label_smoothing,
        };
        let got = obj.evaluate(&scores).unwrap().metrics.loss;
        assert_rel(&format!("{loss_type:?} eps {label_smoothing}"), got, want, 1e-12);
    }
    // MaPO on MSEs L = -2 * proxy, f(L) = 0.5 L / expm1(0.5 L), margin 1000, beta 0.1.
    let f = |l: f64| 0.5 * l / (0.5 * l).exp_m1();
    let want = (0..3).map(|i| -2.0 * pw[i]).sum::<f64>() / 3.0
        - 0.1
            * (0..3)
                .map(|i| ls(1000.0 * (f(-2.0 * pw[i]) - f(-2.0 * pl[i]))))
                .sum::<f64>()
            / 3.0;
    let mapo = Objective::Mapo {
        beta: 0.1,
        margin_scale: 1000.0,
        snr: 0.5,
    };
    assert_rel("mapo", mapo.evaluate(&scores).unwrap().metrics.loss, want, 1e-12);
    // log_sigmoid stays finite far out in both tails.
    let v = as_vec(&log_sigmoid(&t(&[-800.0, 800.0])).unwrap());
    assert_rel("logsigmoid(-800)", v[0], -800.0, 1e-12);
    assert!(v[1].abs() < 1e-300 || v[1] == 0.0);
}

#[test]
fn loss_rejects_bad_input_with_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    // A batch whose noise has the wrong shape.
    let mut tensors = load(&losses_dir().join("batch.safetensors"));
    tensors.insert(
        "noise".into(),
        Tensor::zeros((2, 4, 8, 8), DType::F32, &candle_core::Device::Cpu).unwrap(),
    );
    let bad = tmp.path().join("bad.safetensors");
    candle_core::safetensors::save(&tensors, &bad).unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_diffalign"))
        .args(["loss", "--model"])
        .arg(shared_fixtures().join("sd15"))
        .args(["--method", "dpo", "--batch"])
        .arg(&bad)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("noise") && err.contains("bad.safetensors"),
        "{err}"
    );
    // An unknown method.
    let o = Command::new(env!("CARGO_BIN_EXE_diffalign"))
        .args(["loss", "--model"])
        .arg(shared_fixtures().join("sd15"))
        .args(["--method", "ppo", "--batch"])
        .arg(losses_dir().join("batch.safetensors"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("ppo"), "{err}");
}

/// A LoRA run holds one UNet: the reference pass through the policy with its adapters switched
/// off gives bit for bit the loss, metrics and adapter gradients of a separately loaded base
/// UNet, for every method that has a reference, and the adapters are back on afterwards.
#[test]
fn lora_reference_with_adapters_off_is_bitwise_the_base_unet() {
    use diffalign::weights::lora::LoraSource;
    use diffalign::weights::LoadOptions;

    let (pipe, _, schedule, batch) = sd15_loss_case();
    let lora = losses_dir().join("policy_lora/pytorch_lora_weights.safetensors");
    let opts = LoadOptions {
        lora: Some(std::sync::Arc::new(LoraSource::from_file(&lora, "unet", true).unwrap())),
        ..load_options()
    };
    let (policy, vb) = UNet2DConditionModel::from_pretrained(&shared_fixtures().join("sd15/unet"), &opts).unwrap();
    let switch = vb.lora_switch().unwrap();
    let cond = diffalign_cli_conditioning(&pipe, &batch);
    for method in [Method::Dpo, Method::Dcpo, Method::Smpo { inversion_steps: 2 }] {
        let run = |reference| {
            let out = DiffusionPreference {
                policy: &policy,
                reference: Some(reference),
                schedule: &schedule,
                method,
                objective: Objective::for_method(method, None, LossType::Sigmoid, 0.0).unwrap(),
            }
            .loss(&batch, &cond)
            .unwrap();
            let grads = out.loss.loss.backward().unwrap();
            let g: Vec<Tensor> = vb
                .lora_vars()
                .iter()
                .map(|(_, v)| grads.get(v.as_tensor()).unwrap().clone())
                .collect();
            (out, g)
        };
        let (separate, g_separate) = run(Reference::Unet(&pipe.unet));
        let (shared, g_shared) = run(Reference::PolicyWithoutAdapters(switch));
        let name = method.name();
        assert!(switch.is_on(), "{name}: adapters left off");
        assert_eq!(
            separate.loss.metrics.loss.to_bits(),
            shared.loss.metrics.loss.to_bits(),
            "{name}: loss"
        );
        let (rw, rl) = separate.ref_mse.unwrap();
        let (sw, sl) = shared.ref_mse.unwrap();
        assert_eq!(max_abs_diff(&rw, &sw), 0.0, "{name}: reference MSE, preferred");
        assert_eq!(max_abs_diff(&rl, &sl), 0.0, "{name}: reference MSE, rejected");
        assert!(!g_separate.is_empty());
        for (a, b) in g_separate.iter().zip(&g_shared) {
            assert_eq!(max_abs_diff(a, b), 0.0, "{name}: adapter gradient");
        }
    }
}
