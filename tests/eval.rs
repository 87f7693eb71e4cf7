//! `diffalign eval`: same-seed images of base and tuned models (checked against `generate`), the
//! summary recomputed from the per-image scores, the Wilson interval, and bad input.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{own_fixtures, shared_fixtures};
use diffalign::eval::{wilson_interval, WinRate};

fn diffalign() -> Command {
    Command::new(env!("CARGO_BIN_EXE_diffalign"))
}

fn sd15() -> PathBuf {
    shared_fixtures().join("sd15")
}

fn lora() -> PathBuf {
    shared_fixtures().join("sd15-losses/policy_lora/pytorch_lora_weights.safetensors")
}

fn reward() -> String {
    format!(
        "pickscore={}",
        shared_fixtures().join("turbo-reno/reward_clip").display()
    )
}

fn png_bytes(path: &Path) -> Vec<u8> {
    image::open(path).unwrap().to_rgb8().into_raw()
}

#[test]
fn wilson_interval_matches_the_textbook_values() {
    // 8 of 10: (0.4902, 0.9433); 0 of 5: (0, 0.4345); 1 of 1: (0.2065, 1) (Wilson 1927, z = 1.96).
    for (p, n, lo, hi) in [(0.8, 10, 0.4902, 0.9433), (0.0, 5, 0.0, 0.4345), (1.0, 1, 0.2065, 1.0)] {
        let (l, h) = wilson_interval(p, n, 1.959963984540054);
        assert!(
            (l - lo).abs() < 1e-4 && (h - hi).abs() < 1e-4,
            "{p} of {n}: got ({l}, {h})"
        );
    }
    let w = WinRate::from_scores(&[1.0, 2.0, 3.0, 4.0], &[2.0, 2.0, 1.0, 5.0]).unwrap();
    assert_eq!((w.n, w.wins, w.ties), (4, 2, 1));
    assert!((w.rate - 0.625).abs() < 1e-12 && w.low < w.rate && w.rate < w.high);
    assert!(WinRate::from_scores(&[], &[]).is_none());
    assert!(WinRate::from_scores(&[1.0], &[1.0, 2.0]).is_none());
}

#[test]
fn eval_pairs_base_and_tuned_images_from_the_same_seeds() {
    let tmp = tempfile::tempdir().unwrap();
    let prompts = tmp.path().join("prompts.txt");
    std::fs::write(&prompts, "a red circle on a blue background\n\na green square\n").unwrap();
    let out = tmp.path().join("eval");
    let common_args = ["--steps", "2", "--scheduler", "ddim", "--guidance", "3"];
    let o = diffalign()
        .arg("eval")
        .arg("--model")
        .arg(sd15())
        .arg("--lora")
        .arg(lora())
        .arg("--prompts")
        .arg(&prompts)
        .args(["--reward", &reward(), "--seeds", "2", "--out"])
        .arg(&out)
        .args(common_args)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let full: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("eval.json")).unwrap()).unwrap();
    let images = full["images"].as_array().unwrap();
    assert_eq!(images.len(), 4);

    // Seed 1 of prompt 1, base and tuned, equal `generate` and `generate --lora` with that seed.
    let rec = &images[3];
    assert_eq!(
        (rec["prompt"].as_str().unwrap(), rec["seed"].as_u64().unwrap()),
        ("a green square", 1)
    );
    for (side, with_lora) in [("base", false), ("tuned", true)] {
        let png = tmp.path().join(format!("{side}.png"));
        let mut cmd = diffalign();
        cmd.arg("generate").arg("--model").arg(sd15());
        if with_lora {
            cmd.arg("--lora").arg(lora());
        }
        let o = cmd
            .args(["--prompt", "a green square", "--seed", "1", "--out"])
            .arg(&png)
            .args(common_args)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let written = out.join(rec[side]["image"].as_str().unwrap());
        assert_eq!(png_bytes(&written), png_bytes(&png), "{side}: eval and generate differ");
    }
    assert_ne!(
        png_bytes(&out.join(rec["base"]["image"].as_str().unwrap())),
        png_bytes(&out.join(rec["tuned"]["image"].as_str().unwrap())),
        "the LoRA changes the image"
    );

    // The summary is the mean and win rate of the per-image scores.
    let base: Vec<f64> = images
        .iter()
        .map(|r| r["base"]["scores"]["pickscore"].as_f64().unwrap())
        .collect();
    let tuned: Vec<f64> = images
        .iter()
        .map(|r| r["tuned"]["scores"]["pickscore"].as_f64().unwrap())
        .collect();
    let summary: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(summary, full["summary"]);
    let s = &summary["rewards"]["pickscore"];
    let mean = |xs: &[f64]| xs.iter().sum::<f64>() / xs.len() as f64;
    assert!((s["base_mean"].as_f64().unwrap() - mean(&base)).abs() < 1e-9);
    assert!((s["tuned_mean"].as_f64().unwrap() - mean(&tuned)).abs() < 1e-9);
    let want = WinRate::from_scores(&base, &tuned).unwrap();
    assert_eq!(s["win_rate"]["wins"].as_u64().unwrap() as usize, want.wins);
    assert!((s["win_rate"]["rate"].as_f64().unwrap() - want.rate).abs() < 1e-12);
    let html = std::fs::read_to_string(out.join("index.html")).unwrap();
    assert!(html.contains("images/001-1-tuned.png") && html.contains("pickscore"));
}

/// A LoRA with text-encoder adapters (both SDXL encoders): the tuned side runs them, so its image
/// equals `generate --lora` with that file, and differs from the base.
#[test]
fn eval_lora_with_text_encoder_adapters_equals_generate_with_it() {
    let tmp = tempfile::tempdir().unwrap();
    let sdxl = own_fixtures().join("sdxl");
    let te_lora = own_fixtures().join("lora/te_kohya.safetensors");
    let prompts = tmp.path().join("prompts.txt");
    std::fs::write(&prompts, "a red circle\n").unwrap();
    let out = tmp.path().join("eval");
    let common_args = ["--steps", "2", "--scheduler", "ddim", "--guidance", "3"];
    let o = diffalign()
        .arg("eval")
        .arg("--model")
        .arg(&sdxl)
        .arg("--lora")
        .arg(&te_lora)
        .arg("--prompts")
        .arg(&prompts)
        .args(["--reward", &reward(), "--seeds", "1", "--out"])
        .arg(&out)
        .args(common_args)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let png = tmp.path().join("tuned.png");
    let g = diffalign()
        .arg("generate")
        .arg("--model")
        .arg(&sdxl)
        .arg("--lora")
        .arg(&te_lora)
        .args(["--prompt", "a red circle", "--seed", "0", "--out"])
        .arg(&png)
        .args(common_args)
        .output()
        .unwrap();
    assert!(g.status.success(), "{}", String::from_utf8_lossy(&g.stderr));
    let tuned = out.join("images/000-0-tuned.png");
    assert_eq!(png_bytes(&tuned), png_bytes(&png), "eval and generate --lora differ");
    assert_ne!(
        png_bytes(&out.join("images/000-0-base.png")),
        png_bytes(&tuned),
        "the LoRA changes the image"
    );
}

#[test]
fn eval_needs_a_tuned_model_and_known_rewards() {
    let tmp = tempfile::tempdir().unwrap();
    let prompts = tmp.path().join("prompts.txt");
    std::fs::write(&prompts, "a prompt\n").unwrap();
    let run = |extra: &[&str], reward: &str| {
        let o = diffalign()
            .arg("eval")
            .arg("--model")
            .arg(sd15())
            .arg("--prompts")
            .arg(&prompts)
            .args(["--reward", reward, "--steps", "1", "--scheduler", "ddim", "--out"])
            .arg(tmp.path().join("out"))
            .args(extra)
            .output()
            .unwrap();
        assert!(!o.status.success());
        String::from_utf8_lossy(&o.stderr).into_owned()
    };
    let err = run(&[], &reward());
    assert!(err.contains("--lora FILE") && err.contains("--unet DIR"), "{err}");
    let lora = lora();
    let err = run(&["--lora", lora.to_str().unwrap()], "beauty=/x");
    assert!(err.contains("unknown reward kind"), "{err}");
}
