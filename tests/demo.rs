//! `diffalign demo --quick` on the embedded model: every file, and the schemas of
//! `metrics.json` and `gallery/manifest.json`.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Runs `diffalign demo --quick ARGS --out TMP/demo` with its asset cache in `tmp`, asserts it
/// succeeded, and returns the output folder and its `metrics.json`.
fn quick_demo(tmp: &Path, args: &[&str]) -> (PathBuf, serde_json::Value) {
    let out = tmp.join("demo");
    let o = Command::new(env!("CARGO_BIN_EXE_diffalign"))
        .args(["demo", "--quick"])
        .args(args)
        .arg("--out")
        .arg(&out)
        .env("DIFFALIGN_CACHE", tmp.join("cache"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let metrics = serde_json::from_str(&std::fs::read_to_string(out.join("metrics.json")).unwrap()).unwrap();
    (out, metrics)
}

#[test]
fn quick_demo_writes_every_file_with_its_schema() {
    let tmp = tempfile::tempdir().unwrap();
    // The folder may exist already.
    std::fs::create_dir_all(tmp.path().join("demo")).unwrap();
    std::fs::write(tmp.path().join("demo/notes.txt"), "kept").unwrap();
    let (out, metrics) = quick_demo(tmp.path(), &[]);
    assert_eq!(std::fs::read_to_string(out.join("notes.txt")).unwrap(), "kept");
    assert!(std::fs::read_to_string(out.join("index.html"))
        .unwrap()
        .contains("<svg"));

    for method in ["dpo", "dcpo", "mapo", "smpo", "kto", "dpo+npo", "draft", "reno"] {
        let m = &metrics["methods"][method];
        let win = m["win_rate"].as_f64().unwrap_or_else(|| panic!("{method}: win_rate"));
        let ci = m["ci95"].as_array().unwrap();
        let (lo, hi) = (ci[0].as_f64().unwrap(), ci[1].as_f64().unwrap());
        assert!((0.0..=1.0).contains(&win) && lo <= win && win <= hi, "{method}: {m}");
        assert!(m["n"].as_u64().unwrap() > 0);
        for key in ["true_reward", "base_true_reward"] {
            assert!(
                m[key].as_f64().is_some_and(|v| (0.0..=1.0).contains(&v)),
                "{method}: {key}"
            );
        }
    }

    // Diffusion-NPO's row is also judged against the dpo images.
    let npo = &metrics["methods"]["dpo+npo"];
    let ci = npo["ci95_vs_dpo"].as_array().unwrap();
    let win = npo["win_rate_vs_dpo"].as_f64().unwrap();
    assert!(
        ci[0].as_f64().unwrap() <= win && win <= ci[1].as_f64().unwrap(),
        "{npo}"
    );

    // ReNO's pair head: fitted on the pairs, saved as a loadable `pairhead` folder.
    let head = &metrics["pair_head"];
    assert!(
        head["held_out_accuracy"]
            .as_f64()
            .is_some_and(|a| (0.0..=1.0).contains(&a)),
        "{head}"
    );
    assert!(head["pairs"].as_u64().unwrap() > 0);
    assert!(out.join("reward/pair_head.safetensors").is_file());
    assert!(out.join("reward/clip/config.json").is_file());

    // DCPO-p (the default): each rejected image's caption is its prompt with one attribute changed.
    let pairs = std::fs::read_to_string(out.join("pairs/pairs.jsonl")).unwrap();
    for line in pairs.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let parse = |k: &str| v[k].as_str().unwrap().parse::<diffalign::shapes::Prompt>().unwrap();
        let (p, c) = (parse("prompt"), parse("caption_rejected"));
        let changed = [p.colour != c.colour, p.background != c.background, p.shape != c.shape];
        assert_eq!(changed.iter().filter(|&&x| x).count(), 1, "{line}");
    }

    let manifest: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(out.join("gallery/manifest.json")).unwrap()).unwrap();
    let methods = ["base", "dpo", "dcpo", "mapo", "smpo", "kto", "dpo+npo", "draft", "reno"];
    for m in methods {
        assert!(manifest.iter().any(|g| g["method"] == m), "no {m} image");
    }
    for g in &manifest {
        let path = out.join(g["path"].as_str().unwrap());
        assert!(path.is_file(), "{path:?}");
        assert!(methods.contains(&g["method"].as_str().unwrap()));
        g["prompt"]
            .as_str()
            .unwrap()
            .parse::<diffalign::shapes::Prompt>()
            .unwrap();
        assert!(g["seed"].as_u64().is_some());
    }
    // Same seeds for base and every method: the same (prompt, seed) cases.
    let cases = |m: &str| -> Vec<(String, u64)> {
        manifest
            .iter()
            .filter(|g| g["method"] == m)
            .map(|g| (g["prompt"].as_str().unwrap().to_string(), g["seed"].as_u64().unwrap()))
            .collect()
    };
    for m in &methods[1..] {
        assert_eq!(cases(m), cases("base"), "{m}");
    }
}

#[test]
fn demo_runs_only_the_methods_asked_for() {
    let tmp = tempfile::tempdir().unwrap();
    let args = ["--methods", "dcpo", "--dcpo-caption", "captioned", "--seed", "2"];
    let (out, metrics) = quick_demo(tmp.path(), &args);
    let methods: Vec<&String> = metrics["methods"].as_object().unwrap().keys().collect();
    assert_eq!(methods, ["dcpo"]);
    assert_eq!(metrics["config"]["dcpo_caption"], "captioned");
    assert!(!out.join("reward").exists(), "no ReNO, no pair head");
    // The run seed moves the evaluation noise: seeds 2000 and 2001 in quick mode.
    let manifest: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(out.join("gallery/manifest.json")).unwrap()).unwrap();
    let mut seeds: Vec<u64> = manifest.iter().map(|g| g["seed"].as_u64().unwrap()).collect();
    seeds.sort_unstable();
    seeds.dedup();
    assert_eq!(seeds, [2000, 2001]);

    let o = Command::new(env!("CARGO_BIN_EXE_diffalign"))
        .args(["demo", "--quick", "--methods", "dpo,sft"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("unknown method \"sft\""));
}

#[test]
fn pretrain_writes_pipelines_that_load_and_generate() {
    // Two steps of every phase of the shipped recipe: the folders load as a diffusers pipeline and
    // a clipscore reward, and generate/score run on them.
    let tmp = tempfile::tempdir().unwrap();
    let (model, reward) = (tmp.path().join("model"), tmp.path().join("reward"));
    let o = Command::new(env!("CARGO_BIN_EXE_diffalign"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["pretrain", "pipelines/pretrain-shapes.toml", "--steps", "2", "--out"])
        .arg(&model)
        .arg("--reward-out")
        .arg(&reward)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let log = std::fs::read_to_string(model.join("pretrain.jsonl")).unwrap();
    for phase in ["vae", "denoiser", "reward"] {
        assert!(log.contains(&format!("\"phase\":\"{phase}\"")), "{phase} not logged");
    }
    let vae: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(model.join("vae/config.json")).unwrap()).unwrap();
    assert!(vae["scaling_factor"]
        .as_f64()
        .is_some_and(|s| s > 0.0 && s.is_finite() && s != 1.0));
    let png = tmp.path().join("x.png");
    let o = Command::new(env!("CARGO_BIN_EXE_diffalign"))
        .args([
            "generate",
            "--prompt",
            "a red circle on a blue background",
            "--steps",
            "2",
            "--model",
        ])
        .arg(&model)
        .arg("--out")
        .arg(&png)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = Command::new(env!("CARGO_BIN_EXE_diffalign"))
        .args(["score", "--prompt", "a red circle on a blue background", "--reward"])
        .arg(format!("clipscore={}", reward.display()))
        .arg(&png)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let line: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(line["scores"]["clipscore"].as_f64().is_some_and(f64::is_finite));
}

#[test]
fn demo_dpo_npo_runs_dpo_and_kto_alone_kto_on_per_image_labels() {
    let tmp = tempfile::tempdir().unwrap();
    let (out, metrics) = quick_demo(tmp.path(), &["--methods", "kto,dpo+npo"]);
    let methods: Vec<&String> = metrics["methods"].as_object().unwrap().keys().collect();
    assert_eq!(methods, ["dpo", "dpo+npo", "kto"]);
    assert!(metrics["methods"]["kto"]["win_rate_vs_dpo"].is_null());
    // KTO learns from every pair image labelled on its own, both labels present.
    let pairs = std::fs::read_to_string(out.join("pairs/pairs.jsonl")).unwrap();
    let labels: Vec<serde_json::Value> = std::fs::read_to_string(out.join("pairs/labels.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(labels.len(), 2 * pairs.lines().count());
    assert!(labels
        .iter()
        .all(|l| out.join("pairs").join(l["image"].as_str().unwrap()).is_file()));
    let desirable = labels.iter().filter(|l| l["label"].as_bool().unwrap()).count();
    assert!(
        0 < desirable && desirable < labels.len(),
        "{desirable} of {}",
        labels.len()
    );
    let recipe = std::fs::read_to_string(out.join("runs/kto/recipe.toml")).unwrap();
    assert!(
        recipe.contains("unpaired = true") && recipe.contains("labels.jsonl"),
        "{recipe}"
    );
    // The NPO negative model is the DPO model plus the NPO offset from the base.
    assert!(out.join("runs/npo/negative-unet/config.json").is_file());
}
