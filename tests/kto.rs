//! Diffusion-KTO against the PyTorch transcription of the official loss
//! (`tests/fixtures/gen_kto.py`, case `kto-sd15/` on `../shared/fixtures/sd15`): loss, metrics,
//! MSEs and gradients for a full-UNet and a LoRA policy, every value function; and the labelled
//! batch's errors.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{DType, Tensor};
use common::*;

/// Relative tolerance on losses, as for the other preference losses.
const LOSS_RTOL: f64 = 1e-3;
/// Relative tolerance, in norm, on gradients.
const GRAD_RTOL: f64 = 1e-2;

fn case_dir() -> PathBuf {
    own_fixtures().join("kto-sd15")
}

fn scalar(t: &Tensor) -> f64 {
    f64s(t)[0]
}

fn assert_rel(what: &str, got: f64, want: f64, rtol: f64) {
    let err = (got - want).abs() / want.abs().max(1e-12);
    assert!(err <= rtol, "{what}: got {got}, want {want} (rel err {err:e})");
}

fn loss_command(batch: &Path, policy: &[&str], settings: &[String]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_diffalign"));
    cmd.args(["loss", "--model"])
        .arg(shared_fixtures().join("sd15"))
        .args(policy)
        .args(["--method", "kto", "--batch"])
        .arg(batch)
        .args(settings);
    cmd
}

/// Every case of the fixture with one policy; gradients compared under `grad_keys`.
fn check_policy(kind: &str, policy: &[&str], grad_keys_meta: &str) {
    let expected = load(&case_dir().join("expected.safetensors"));
    let meta = metadata(&case_dir().join("expected.safetensors"));
    let cases: serde_json::Map<String, serde_json::Value> = serde_json::from_str(&meta["cases"]).unwrap();
    let keys: Vec<String> = serde_json::from_str(&meta[grad_keys_meta]).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    for (name, s) in &cases {
        let s = s.as_array().unwrap();
        let settings = vec![
            "--beta".to_string(),
            s[0].as_f64().unwrap().to_string(),
            "--kto-lambda-d".into(),
            s[1].as_f64().unwrap().to_string(),
            "--kto-lambda-u".into(),
            s[2].as_f64().unwrap().to_string(),
            "--halo".into(),
            s[3].as_str().unwrap().to_string(),
            "--grads-out".into(),
            tmp.path().join("g.safetensors").to_str().unwrap().to_string(),
        ];
        let o = loss_command(&case_dir().join("batch.safetensors"), policy, &settings)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "{kind}.{name}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        let prefix = format!("{kind}.{name}");
        let e = |k: &str| &expected[&format!("{prefix}.{k}")];
        assert_rel(&prefix, report["loss"].as_f64().unwrap(), scalar(e("loss")), LOSS_RTOL);
        assert_eq!(
            report["implicit_acc"].as_f64().unwrap(),
            scalar(e("implicit_acc")),
            "{prefix}"
        );
        for key in ["mse", "ref_mse"] {
            let got: Vec<f64> = report[key]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap())
                .collect();
            for (g, w) in got.iter().zip(f64s(e(key))) {
                assert_rel(&format!("{prefix}.{key}"), *g, w, 1e-5);
            }
        }
        let grads = load(&tmp.path().join("g.safetensors"));
        for k in &keys {
            let want = e(&format!("grad.{k}"));
            let g = grads.get(k).unwrap_or_else(|| panic!("{prefix}: no gradient for {k}"));
            let diff = (g - want).unwrap().sqr().unwrap().sum_all().unwrap().sqrt().unwrap();
            let norm = want.sqr().unwrap().sum_all().unwrap().sqrt().unwrap();
            let rel = scalar(&diff) / scalar(&norm).max(1e-30);
            assert!(rel <= GRAD_RTOL, "{prefix}.grad.{k}: relative error in norm {rel:e}");
        }
    }
}

#[test]
fn kto_loss_full_unet_policy_matches_reference() {
    let policy = shared_fixtures().join("sd15-losses/policy_unet");
    check_policy("full", &["--unet", policy.to_str().unwrap()], "grad_keys_full");
}

#[test]
fn kto_loss_lora_policy_matches_reference() {
    let lora = shared_fixtures().join("sd15-losses/policy_lora/pytorch_lora_weights.safetensors");
    check_policy("lora", &["--lora", lora.to_str().unwrap()], "grad_keys_lora");
}

/// Runs `loss --method kto` on the fixture batch with `edit` applied; returns its stderr.
fn failing_run(
    edit: impl FnOnce(&mut std::collections::HashMap<String, Tensor>),
    meta: Option<&str>,
    extra: &[&str],
) -> String {
    let tmp = tempfile::tempdir().unwrap();
    let mut tensors = load(&case_dir().join("batch.safetensors"));
    edit(&mut tensors);
    let bad = tmp.path().join("bad.safetensors");
    let captions = metadata(&case_dir().join("batch.safetensors"))["captions"].clone();
    let mut m = std::collections::HashMap::new();
    m.insert("captions".to_string(), meta.map(str::to_string).unwrap_or(captions));
    diffalign::weights::save_safetensors(&bad, &tensors, Some(m)).unwrap();
    let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
    let o = loss_command(&bad, &[], &extra).output().unwrap();
    assert!(!o.status.success());
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn kto_loss_rejects_bad_batches_naming_the_problem() {
    let dev = candle_core::Device::Cpu;
    let err = failing_run(
        |t| {
            t.insert("labels".into(), Tensor::new(&[1f32, 0.5, 0.0, 1.0], &dev).unwrap());
        },
        None,
        &[],
    );
    assert!(
        err.contains("bad.safetensors") && err.contains("labels") && err.contains("0.5"),
        "{err}"
    );
    let err = failing_run(
        |t| {
            t.insert("noise".into(), Tensor::zeros((4, 4, 8, 8), DType::F32, &dev).unwrap());
        },
        None,
        &[],
    );
    assert!(err.contains("noise") && err.contains("bad.safetensors"), "{err}");
    let err = failing_run(
        |t| {
            t.remove("labels");
        },
        None,
        &[],
    );
    assert!(err.contains("labels"), "{err}");
    let err = failing_run(|_| {}, Some(r#"["only one"]"#), &[]);
    assert!(err.contains("captions") && err.contains("expected 4"), "{err}");
    let err = failing_run(|_| {}, None, &["--halo", "cubic"]);
    assert!(err.contains("halo") && err.contains("cubic"), "{err}");
    let err = failing_run(|_| {}, None, &["--kto-lambda-u=-1"]);
    assert!(err.contains("kto_lambda_u"), "{err}");
}
