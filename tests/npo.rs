//! Diffusion-NPO: guidance with the negative-preference adapter against a diffusers-based
//! reference (`tests/fixtures/gen_npo.py`, case `npo-sd15/`), alone and beside a positive LoRA,
//! plain guidance unchanged at weight 0, and the NPO objective as Diffusion-DPO with the labels swapped.

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

/// With a positive `--lora`, the negative branch is the model with both adapters, as the
/// official `gen.py` composes them (`images.pos.w1.0`).
#[test]
fn npo_with_a_positive_lora_guides_with_both_adapters() {
    let tmp = tempfile::tempdir().unwrap();
    let expected = load(&case_dir().join("expected.safetensors"));
    let (lora, positive) = (npo_lora(), case_dir().join("positive_lora.safetensors"));
    let out = tmp.path().join("pos.png");
    generate(
        &out,
        &[
            "--lora",
            positive.to_str().unwrap(),
            "--npo-lora",
            lora.to_str().unwrap(),
        ],
    );
    assert_close(
        "npo with a positive LoRA",
        &png_as_floats(&out),
        &expected["images.pos.w1.0"],
        IMAGE_ATOL,
    );
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

/// The weight offset behind the official `dpo+npo` negative model: `target + w (plus - minus)`
/// per tensor, checked elementwise in f64; a tensor missing from the target names both files.
#[test]
fn weight_offset_adds_the_difference_of_two_checkpoints() {
    use diffalign::weights::offset::add_offset;
    use diffalign::weights::{save_safetensors, TensorStore};
    use std::collections::HashMap;
    let tmp = tempfile::tempdir().unwrap();
    let dev = candle_core::Device::Cpu;
    let values = |seed: f32| -> Vec<f32> { (0..6).map(|i| (i as f32 * 0.37 + seed).sin()).collect() };
    let write = |name: &str, seed: f32, extra: bool| -> TensorStore {
        let mut m = HashMap::new();
        m.insert(
            "a.weight".to_string(),
            Tensor::from_vec(values(seed), (2, 3), &dev).unwrap(),
        );
        m.insert(
            "b.bias".to_string(),
            Tensor::from_vec(values(seed + 1.0)[..2].to_vec(), 2, &dev).unwrap(),
        );
        if extra {
            m.insert(
                "c.weight".to_string(),
                Tensor::zeros(1, candle_core::DType::F32, &dev).unwrap(),
            );
        }
        let path = tmp.path().join(name);
        save_safetensors(&path, &m, None).unwrap();
        TensorStore::open_file(&path).unwrap()
    };
    let (t, p, m) = (
        write("t.st", 0.0, false),
        write("p.st", 2.0, false),
        write("m.st", 5.0, false),
    );
    let out = add_offset(&t, &p, &m, 0.5, candle_core::DType::F32, &dev).unwrap();
    for (name, n, shift) in [("a.weight", 6, 0.0), ("b.bias", 2, 1.0)] {
        let got: Vec<f32> = out[name].flatten_all().unwrap().to_vec1().unwrap();
        for (i, g) in got.iter().enumerate().take(n) {
            let v = |s: f32| ((i as f32 * 0.37 + s + shift).sin()) as f64;
            let want = v(0.0) + 0.5 * (v(2.0) - v(5.0));
            assert!((*g as f64 - want).abs() < 1e-6, "{name}[{i}]: {g} vs {want}");
        }
    }
    let extra = write("x.st", 1.0, true);
    let err = add_offset(&t, &extra, &m, 1.0, candle_core::DType::F32, &dev)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("x.st") && err.contains("c.weight") && err.contains("t.st"),
        "{err}"
    );
}
