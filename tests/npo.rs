//! Diffusion-NPO: guidance with the negative-preference adapter against a diffusers-based
//! reference (`tests/fixtures/gen_npo.py`, case `npo-sd15/`), plain guidance unchanged at
//! weight 0, and the NPO objective as Diffusion-DPO with the labels swapped.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::Tensor;
use common::*;

fn case_dir() -> PathBuf {
    own_fixtures().join("npo-sd15")
}

fn npo_lora() -> PathBuf {
    shared_fixtures().join("sd15-losses/policy_lora/pytorch_lora_weights.safetensors")
}

/// Runs `generate` on the shared SD 1.5 pipeline with the fixture's prompt and noise.
fn generate(out: &Path, extra: &[&str]) {
    let meta = metadata(&case_dir().join("expected.safetensors"));
    let o = Command::new(env!("CARGO_BIN_EXE_diffalign"))
        .args(["generate", "--model"])
        .arg(shared_fixtures().join("sd15"))
        .args([
            "--prompt",
            &meta["prompt"],
            "--steps",
            &meta["steps"],
            "--guidance",
            &meta["guidance"],
        ])
        .arg("--init-noise")
        .arg(case_dir().join("init_noise.safetensors"))
        .args(extra)
        .arg("--out")
        .arg(out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

fn png_as_floats(path: &Path) -> Tensor {
    let img = image::open(path).unwrap().to_rgb8();
    let (w, h) = img.dimensions();
    let data: Vec<f32> = img.into_raw().into_iter().map(|v| v as f32 / 255.0).collect();
    Tensor::from_vec(data, (h as usize, w as usize, 3), &candle_core::Device::Cpu).unwrap()
}

#[test]
fn npo_guidance_matches_diffusers_reference() {
    let tmp = tempfile::tempdir().unwrap();
    let expected = load(&case_dir().join("expected.safetensors"));
    let lora = npo_lora();
    for w in ["1.0", "0.5"] {
        let out = tmp.path().join(format!("w{w}.png"));
        generate(&out, &["--npo-lora", lora.to_str().unwrap(), "--npo-weight", w]);
        assert_close(
            &format!("npo weight {w}"),
            &png_as_floats(&out),
            &expected[&format!("images.w{w}")],
            IMAGE_ATOL,
        );
    }
}

#[test]
fn npo_at_weight_zero_is_plain_guidance_byte_for_byte() {
    let tmp = tempfile::tempdir().unwrap();
    let (plain, zero, one) = (
        tmp.path().join("p.png"),
        tmp.path().join("z.png"),
        tmp.path().join("o.png"),
    );
    let lora = npo_lora();
    generate(&plain, &[]);
    generate(&zero, &["--npo-lora", lora.to_str().unwrap(), "--npo-weight", "0"]);
    generate(&one, &["--npo-lora", lora.to_str().unwrap()]);
    assert_eq!(std::fs::read(&plain).unwrap(), std::fs::read(&zero).unwrap());
    assert_ne!(std::fs::read(&plain).unwrap(), std::fs::read(&one).unwrap());
}

/// `loss --method M` on the shared loss case's batch file `batch`; the JSON report.
fn loss_report(method: &str, batch: &Path) -> serde_json::Value {
    let o = Command::new(env!("CARGO_BIN_EXE_diffalign"))
        .args(["loss", "--model"])
        .arg(shared_fixtures().join("sd15"))
        .arg("--unet")
        .arg(shared_fixtures().join("sd15-losses/policy_unet"))
        .args(["--method", method, "--batch"])
        .arg(batch)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

#[test]
fn npo_loss_is_dpo_with_the_labels_swapped() {
    let tmp = tempfile::tempdir().unwrap();
    let batch = shared_fixtures().join("sd15-losses/batch.safetensors");
    let mut tensors = load(&batch);
    let (w, l) = (tensors["latents_w"].clone(), tensors["latents_l"].clone());
    tensors.insert("latents_w".into(), l);
    tensors.insert("latents_l".into(), w);
    let swapped = tmp.path().join("swapped.safetensors");
    diffalign::weights::save_safetensors(&swapped, &tensors, Some(metadata(&batch))).unwrap();
    let npo = loss_report("npo", &batch);
    let dpo = loss_report("dpo", &swapped);
    for key in ["loss", "implicit_acc", "mse_w", "mse_l", "ref_mse_w", "ref_mse_l"] {
        assert_eq!(npo[key], dpo[key], "{key}");
    }
    assert_eq!(npo["beta"], 5000.0);
}
