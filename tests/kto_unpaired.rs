//! `train` with kto and npo from unpaired data (`[data] unpaired = true`) on the tiny sd15
//! pipeline: the first step against the library's KTO loss on the batch rebuilt here, a split
//! Pick-a-Pic set, exact resume, bad records skipped and listed, NPO as KTO with the labels
//! swapped, recipe errors; and `eval --npo-lora` with a zero adapter as plain `eval`.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use candle_core::{DType, Device, Tensor};
use common::pairs::{assert_resume_exact, disc, recipe_for, sorted_tensors, train};
use common::*;
use diffalign::data::Preprocess;
use diffalign::models::unet::UNet2DConditionModel;
use diffalign::preference::diffusion::{DiffusionPreference, Method, Reference};
use diffalign::preference::diffusion_kto::LabelledBatch;
use diffalign::preference::kto::{Kto, Utility};
use diffalign::preference::Objective;
use diffalign::rng::Rng;
use diffalign::sampling::pipeline::PipelineSources;
use diffalign::sampling::StableDiffusionPipeline;
use diffalign::schedulers::NoiseSchedule;
use diffalign::train::labelled_conditioning;
use diffalign::weights::LoadOptions;

const SEED: u64 = 7;

/// `n` labelled images in `dir/labels.jsonl`: a red disc (even `i`) or a blue one on grey,
/// labelled `label(i)`; returns the JSONL file.
fn write_labelled(dir: &Path, n: usize, label: impl Fn(usize) -> bool) -> PathBuf {
    std::fs::create_dir_all(dir.join("img")).unwrap();
    let mut rng = Rng::new(3);
    let mut lines = String::new();
    for i in 0..n {
        let good = label(i);
        let fg = if i % 2 == 0 { [220, 30, 30] } else { [30, 30, 220] };
        disc(fg, [128, 128, 128], &mut rng)
            .save(dir.join(format!("img/{i}.png")))
            .unwrap();
        let line = serde_json::json!({"image": format!("img/{i}.png"), "prompt": "a disc", "label": good});
        lines.push_str(&format!("{line}\n"));
    }
    let path = dir.join("labels.jsonl");
    std::fs::write(&path, lines).unwrap();
    path
}

/// A kto (or npo) recipe in `dir` over `data` read as unpaired images, `extra` in `[train]`.
fn unpaired_recipe(dir: &Path, data: &Path, method: &str, extra: &str) -> PathBuf {
    let path = recipe_for(&shared_fixtures().join("sd15"), dir, data, method, extra);
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, text.replace("[data]\n", "[data]\nunpaired = true\n")).unwrap();
    path
}

fn run_train(recipe: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_diffalign"))
        .arg("train")
        .arg(recipe)
        .args(args)
        .output()
        .unwrap()
}

/// The per-step lines of `out/metrics.jsonl`.
fn steps(out: &Path) -> Vec<serde_json::Value> {
    read_jsonl(&out.join("metrics.jsonl"))
        .into_iter()
        .filter(|v| v.get("event").is_none())
        .collect()
}

/// Epoch `epoch`'s data order of `n` records under `seed`, as `train` documents it: a
/// Fisher-Yates shuffle driven by `Rng::new(seed ^ (epoch + 1) * 0x9E3779B97F4A7C15)`.
fn data_order(seed: u64, epoch: u64, n: usize) -> Vec<usize> {
    let mut rng = Rng::new(seed ^ (epoch + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let mut order: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        order.swap(i, rng.below(i as u64 + 1) as usize);
    }
    order
}

fn assert_rel(what: &str, got: f64, want: f64, rtol: f64) {
    assert!(
        (got - want).abs() <= rtol * want.abs().max(1e-12),
        "{what}: train logged {got}, expected {want}"
    );
}

/// The first step of `train` with kto on 4 unpaired images (one micro-batch of all of them)
/// against [`DiffusionPreference::labelled_loss`] (parity-tested against the PyTorch
/// transcription of the official loss in `tests/kto.rs`) fed with the batch rebuilt here from the
/// documented per-image draws: the data order, then per image `Rng::keyed(seed, [epoch,
/// position])` drawing the VAE posterior sample, the noise and the timestep. The loss at step 0
/// is the same for any batch (the policy is the reference), so the MSEs and the gradient norm,
/// which depend on the images, noise and timesteps, carry the check.
#[test]
fn unpaired_kto_first_step_matches_labelled_loss_on_the_rebuilt_batch() {
    let tmp = tempfile::tempdir().unwrap();
    let labels = [true, false, false, true];
    let data = write_labelled(&tmp.path().join("data"), 4, |i| labels[i]);
    let recipe = unpaired_recipe(tmp.path(), &data, "kto", "kto_lambda_u = 1.5\nbeta = 2000");
    train(&recipe, &["--set", "train.steps=1", "--set", "train.batch_size=4"]);
    let logged = &steps(&tmp.path().join("out"))[0];

    let root = shared_fixtures().join("sd15");
    let sources = PipelineSources {
        root: root.clone(),
        ..Default::default()
    };
    let cpu = LoadOptions::default();
    let pipe = StableDiffusionPipeline::load(&sources, &cpu).unwrap();
    let trainable = LoadOptions {
        trainable: true,
        ..Default::default()
    };
    let (policy, vb) = UNet2DConditionModel::from_pretrained(&root.join("unet"), &trainable).unwrap();
    let schedule = NoiseSchedule::from_config(&pipe.scheduler_config).unwrap();
    let preprocess = Preprocess {
        resolution: (64, 64),
        center_crop: true,
        random_flip: false,
        flip_pair_together: false,
        empty_caption_prob: 0.0,
    };
    let (mut latents, mut noise, mut ts, mut want_labels) = (vec![], vec![], vec![], vec![]);
    for (position, &index) in data_order(SEED, 0, 4).iter().enumerate() {
        let mut rng = Rng::keyed(SEED, &[0, position as u64]);
        let img = image::open(tmp.path().join(format!("data/img/{index}.png")))
            .unwrap()
            .to_rgb8();
        let pixels = preprocess.image(&img, &mut rng, false).unwrap();
        let d = pipe.vae.encode(&pixels.unsqueeze(0).unwrap()).unwrap();
        let (m, s) = (d.mean.squeeze(0).unwrap(), d.std.squeeze(0).unwrap());
        let eps = rng.randn(m.dims(), &Device::Cpu).unwrap();
        let z = ((m + (s * eps).unwrap()).unwrap() * pipe.vae.config().scaling_factor).unwrap();
        noise.push(rng.randn(z.dims(), &Device::Cpu).unwrap());
        ts.push(rng.below(schedule.num_train_timesteps() as u64) as f32);
        latents.push(z);
        want_labels.push(labels[index]);
    }
    let batch = LabelledBatch {
        latents: Tensor::stack(&latents, 0).unwrap(),
        noise: Tensor::stack(&noise, 0).unwrap(),
        timesteps: Tensor::new(ts.as_slice(), &Device::Cpu).unwrap(),
        labels: want_labels.clone(),
        time_ids: None,
        captions: vec!["a disc".to_string(); 4],
    };
    let kto = Kto {
        beta: 2000.0,
        desirable_weight: 1.0,
        undesirable_weight: 1.5,
    };
    let eval = DiffusionPreference {
        policy: &policy,
        reference: Some(Reference::Unet(&pipe.unet)),
        schedule: &schedule,
        method: Method::Kto,
        objective: Objective::kto(2000.0, kto, Utility::Sigmoid).unwrap(),
    };
    let (context, added) = labelled_conditioning(&pipe, &batch).unwrap();
    let out = eval.labelled_loss(&batch, &context, added.as_ref()).unwrap();
    let grads = out.loss.loss.backward().unwrap();
    let mut sq = 0.0;
    for (_, v) in vb.vars() {
        if let Some(g) = grads.get(v.as_tensor()) {
            sq += g
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap()
                .to_scalar::<f64>()
                .unwrap();
        }
    }
    let mse = f64s(&out.mse);
    let ref_mse = f64s(&out.ref_mse);
    let mean_of = |v: &[f64], want: bool| {
        let picked: Vec<f64> = v
            .iter()
            .zip(&want_labels)
            .filter(|(_, &l)| l == want)
            .map(|(x, _)| *x)
            .collect();
        picked.iter().sum::<f64>() / picked.len() as f64
    };
    let field = |k: &str| logged[k].as_f64().unwrap();
    assert_rel("loss", field("loss"), out.loss.metrics.loss, 1e-5);
    assert_rel("mse_w", field("mse_w"), mean_of(&mse, true), 1e-5);
    assert_rel("mse_l", field("mse_l"), mean_of(&mse, false), 1e-5);
    assert_rel("ref_mse_w", field("ref_mse_w"), mean_of(&ref_mse, true), 1e-5);
    assert_rel("ref_mse_l", field("ref_mse_l"), mean_of(&ref_mse, false), 1e-5);
    assert_rel("grad_norm", field("grad_norm"), sq.sqrt(), 1e-4);
    // At step 0 the policy is the reference: every x is 0 and the loss is mean(lambda) / 2.
    assert_rel("loss at step 0", field("loss"), (1.0 + 1.5) / 2.0 / 2.0, 1e-6);
}

#[test]
fn unpaired_pickapic_pairs_split_into_images_train() {
    let tmp = tempfile::tempdir().unwrap();
    let data = own_fixtures().join("data/pickapic_tiny.parquet");
    let recipe = unpaired_recipe(tmp.path(), &data, "kto", "");
    // 8 steps of 2 images draw more than the 8 usable images: every image is met.
    let o = run_train(
        &recipe,
        &["--set", "train.steps=8", "--set", "data.format=\"pickapic\""],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let logged = steps(&tmp.path().join("out"));
    assert_eq!(logged.len(), 8);
    for s in &logged {
        assert!(s["loss"].as_f64().unwrap().is_finite(), "{s}");
    }
    // At beta 5000 later steps may saturate the sigmoid; the first one learns.
    assert!(logged[0]["grad_norm"].as_f64().unwrap() > 0.0, "{}", logged[0]);
    let summary: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    // The fixture's 8 rows: a tie dropped and 3 bad rows skipped when opening leave 4 pairs, 8
    // images; row 3's corrupt jpg_1 takes both of its images out once met (listed once).
    assert_eq!(summary["pairs_used"], 6, "{summary}");
    assert_eq!(summary["records_skipped"], 4, "{summary}");
    let listed = read_jsonl(&tmp.path().join("out/skipped_records.jsonl"));
    let corrupt: Vec<_> = listed.iter().filter(|v| v["index"] == 3).collect();
    assert_eq!(corrupt.len(), 1, "{listed:?}");
    assert!(corrupt[0]["reason"].as_str().unwrap().contains("jpg_1"), "{listed:?}");
    assert!(tmp.path().join("out/unet/diffusion_pytorch_model.safetensors").exists());
}

#[test]
fn unpaired_interrupted_and_resumed_run_equals_uninterrupted_run() {
    let tmp = tempfile::tempdir().unwrap();
    let data = write_labelled(&tmp.path().join("data"), 5, |i| i % 3 != 1);
    let extra = "grad_accum = 2\nrandom_flip = true\nkto_lambda_u = 1.5\n\n[lora]\nrank = 4";
    assert_resume_exact(
        tmp.path(),
        |dir| {
            let r = unpaired_recipe(dir, &data, "kto", extra);
            let text = std::fs::read_to_string(&r).unwrap();
            std::fs::write(&r, text.replace("random_flip = false\n", "")).unwrap();
            r
        },
        "kto from unpaired images",
    );
}

#[test]
fn unpaired_bad_records_are_skipped_named_and_listed() {
    let tmp = tempfile::tempdir().unwrap();
    let data = write_labelled(&tmp.path().join("data"), 2, |i| i == 0);
    std::fs::write(tmp.path().join("data/img/bad.png"), b"not a png").unwrap();
    let bad = [
        r#"{"image": "img/0.png", "prompt": "#,
        r#"{"image": "img/missing.png", "prompt": "gone", "label": true}"#,
        r#"{"image": "img/1.png", "prompt": "p", "label": "yes"}"#,
        r#"{"image": "img/bad.png", "prompt": "undecodable", "label": false}"#,
    ];
    let mut text = std::fs::read_to_string(&data).unwrap();
    text.extend(bad.iter().map(|l| format!("{l}\n")));
    std::fs::write(&data, text).unwrap();
    let recipe = unpaired_recipe(tmp.path(), &data, "kto", "");
    // Two steps of two images draw all three candidates, so the undecodable one is met.
    let o = run_train(&recipe, &["--set", "train.steps=2"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    let want = [
        "expected {\"image\", \"prompt\", \"label\": true|false}",
        "img/missing.png not found",
        "invalid type: string \"yes\"",
        "cannot decode",
    ];
    let listed = read_jsonl(&tmp.path().join("out/skipped_records.jsonl"));
    assert_eq!(listed.len(), want.len(), "{listed:?}");
    for (k, want) in want.iter().enumerate() {
        let line = 3 + k as u64;
        let entry = listed
            .iter()
            .find(|v| v["line"].as_u64() == Some(line))
            .unwrap_or_else(|| panic!("line {line} not listed: {listed:?}"));
        assert!(entry["file"].as_str().unwrap().ends_with("labels.jsonl"), "{entry}");
        assert!(entry["reason"].as_str().unwrap().contains(want), "line {line}: {entry}");
        assert!(
            err.contains(&format!("labels.jsonl: record {} (line {line}): ", line - 1)),
            "line {line} not named on stderr: {err}"
        );
    }
    let summary: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(summary["records_skipped"], 4);
    assert_eq!(summary["pairs_used"], 2);
    assert!(err.contains("used 2 images, skipped 4 records"), "{err}");
}

/// NPO from unpaired images is KTO with the labels swapped: npo on a set and kto on the same
/// images with the opposite labels take the same steps, bit for bit.
#[test]
fn unpaired_npo_is_kto_with_the_labels_swapped() {
    let tmp = tempfile::tempdir().unwrap();
    let label = |i: usize| i % 3 == 0;
    let data = write_labelled(&tmp.path().join("npo/data"), 4, label);
    let swapped = write_labelled(&tmp.path().join("kto/data"), 4, |i| !label(i));
    let extra = "kto_lambda_u = 1.5\n\n[lora]\nrank = 4";
    let npo = unpaired_recipe(&tmp.path().join("npo"), &data, "npo", extra);
    let kto = unpaired_recipe(&tmp.path().join("kto"), &swapped, "kto", extra);
    for r in [&npo, &kto] {
        train(r, &["--set", "train.steps=2"]);
    }
    let (a, b) = (tmp.path().join("npo/out"), tmp.path().join("kto/out"));
    let metrics = |o: &Path| std::fs::read_to_string(o.join("metrics.jsonl")).unwrap();
    assert_eq!(metrics(&a), metrics(&b));
    let lora = |o: &Path| sorted_tensors(&o.join("pytorch_lora_weights.safetensors"));
    let (la, lb) = (lora(&a), lora(&b));
    assert_eq!(la.len(), lb.len());
    for ((ka, ta), (kb, tb)) in la.iter().zip(&lb) {
        assert_eq!(ka, kb);
        assert!(max_abs_diff(ta, tb) == 0.0, "{ka} differs");
    }
    // And the swap matters: npo on the unswapped labels is another run.
    std::fs::create_dir_all(tmp.path().join("other")).unwrap();
    let other = unpaired_recipe(&tmp.path().join("other"), &data, "kto", extra);
    train(&other, &["--set", "train.steps=2"]);
    assert_ne!(metrics(&a), metrics(&tmp.path().join("other/out")));
}

#[test]
fn unpaired_recipe_errors_name_the_key() {
    let tmp = tempfile::tempdir().unwrap();
    let data = write_labelled(&tmp.path().join("data"), 2, |i| i == 0);
    for (method, extra, key) in [
        ("dpo", "", "data.unpaired"),
        ("kto", "[lora]\ntext_encoder = true", "lora.text_encoder"),
    ] {
        let recipe = unpaired_recipe(tmp.path(), &data, method, extra);
        let o = run_train(&recipe, &[]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success());
        assert!(err.contains(&format!("recipe.toml: {key}")), "{err}");
    }
}

/// Runs `eval` on the tiny sd15 pipeline (one prompt, one seed, 2 steps) into `out`.
fn eval(out: &Path, extra: &[&str]) {
    let prompts = out.with_extension("txt");
    std::fs::write(&prompts, "a red disc\n").unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_diffalign"))
        .args(["eval", "--model"])
        .arg(shared_fixtures().join("sd15"))
        .arg("--prompts")
        .arg(&prompts)
        .args(["--seeds", "1", "--steps", "2"])
        .args(extra)
        .arg("--out")
        .arg(out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// With a zero NPO adapter (the fixture LoRA with its up-projections zeroed) `eval --npo-lora`
/// guides exactly as plain guidance: its tuned images equal a plain `eval` of the base UNet
/// byte for byte, and so do the scores; the fixture adapter itself changes them.
#[test]
fn eval_npo_lora_zero_adapter_equals_plain_eval() {
    let tmp = tempfile::tempdir().unwrap();
    let lora = shared_fixtures().join("sd15-losses/policy_lora/pytorch_lora_weights.safetensors");
    let zero = tmp.path().join("zero.safetensors");
    let tensors: std::collections::HashMap<String, Tensor> = load(&lora)
        .into_iter()
        .map(|(k, t)| {
            let t = if k.contains("lora_B") {
                t.zeros_like().unwrap()
            } else {
                t
            };
            (k, t)
        })
        .collect();
    candle_core::safetensors::save(&tensors, &zero).unwrap();
    let base_unet = shared_fixtures().join("sd15/unet");
    let (plain, npo, full) = (
        tmp.path().join("plain"),
        tmp.path().join("npo"),
        tmp.path().join("full"),
    );
    eval(&plain, &["--unet", base_unet.to_str().unwrap()]);
    eval(&npo, &["--npo-lora", zero.to_str().unwrap()]);
    eval(&full, &["--npo-lora", lora.to_str().unwrap()]);
    let image = |d: &Path, side: &str| std::fs::read(d.join(format!("images/000-0-{side}.png"))).unwrap();
    assert_eq!(image(&plain, "tuned"), image(&npo, "tuned"));
    assert_eq!(image(&plain, "base"), image(&npo, "tuned"));
    assert_eq!(
        std::fs::read_to_string(plain.join("eval.json")).unwrap(),
        std::fs::read_to_string(npo.join("eval.json")).unwrap()
    );
    assert_ne!(image(&full, "tuned"), image(&npo, "tuned"));
    assert_eq!(image(&full, "base"), image(&npo, "base"));
}

/// The `good/` `bad/` folders layout trains exactly as the same images, captions and labels in
/// JSONL listed in the folders' order (good then bad, each sorted by name).
#[test]
fn unpaired_folders_train_as_the_same_images_in_jsonl() {
    let tmp = tempfile::tempdir().unwrap();
    let jsonl = write_labelled(&tmp.path().join("j/data"), 4, |i| i < 2);
    let root = tmp.path().join("f/data");
    let mut captions = String::new();
    for i in 0..4 {
        let (side, name) = (if i < 2 { "good" } else { "bad" }, format!("{}.png", i % 2));
        std::fs::create_dir_all(root.join(side)).unwrap();
        std::fs::copy(
            tmp.path().join(format!("j/data/img/{i}.png")),
            root.join(side).join(&name),
        )
        .unwrap();
        if i < 2 {
            captions.push_str(&format!("{name}\ta disc\n"));
        }
    }
    std::fs::write(root.join("captions.txt"), captions).unwrap();
    let j = unpaired_recipe(&tmp.path().join("j"), &jsonl, "kto", "");
    let f = unpaired_recipe(&tmp.path().join("f"), &root, "kto", "");
    train(&j, &["--set", "train.steps=3"]);
    train(&f, &["--set", "train.steps=3", "--set", "data.format=\"folders\""]);
    let metrics = |d: &str| std::fs::read_to_string(tmp.path().join(d).join("out/metrics.jsonl")).unwrap();
    assert_eq!(metrics("j"), metrics("f"));
    assert_eq!(steps(&tmp.path().join("f/out")).len(), 3);
}
