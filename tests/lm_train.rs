//! Language-model training on generated pairs: DPO raises held-out reward accuracy, BT and GPM
//! reward models train and are scored by `lm eval-rm`, and a GPM head fits a preference cycle
//! that no Bradley-Terry reward can.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{DType, Device, Tensor};
use diffalign::lm::data::load_pairs;
use diffalign::lm::synthetic;
use diffalign::models::llama::LlamaForCausalLM;
use diffalign::nn::Linear;
use diffalign::optim::{AdamWConfig, Optimizer};
use diffalign::preference::heads::{bt_loss, gpm_loss, gpm_score, GpmHead};
use diffalign::preference::{LossType, Objective};
use diffalign::train::lm::{evaluate_policy, train_policy, PolicyData, TrainSettings};
use diffalign::weights::{LoadOptions, VarBuilder};

const VOCAB: usize = 512;

/// A copy of the fixture's tiny Llama with a word-level tokenizer for the generated world.
fn model_dir(root: &Path, fixture: &str) -> PathBuf {
    let dir = root.join(fixture);
    std::fs::create_dir_all(&dir).unwrap();
    let src = common::shared_fixtures().join("lm").join(fixture);
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(src.join(f), dir.join(f)).unwrap();
    }
    std::fs::write(
        dir.join("tokenizer.json"),
        synthetic::word_level_tokenizer_json(VOCAB).unwrap(),
    )
    .unwrap();
    dir
}

/// A temp folder with the tiny Llama (`policy/`), `n_train` training pairs from `seed` and
/// `n_held` held-out pairs from `seed + 1`.
fn world(n_train: usize, n_held: usize, seed: u64) -> (tempfile::TempDir, PathBuf, PathBuf, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let policy = model_dir(tmp.path(), "policy");
    let (train, held) = (tmp.path().join("train.jsonl"), tmp.path().join("held.jsonl"));
    write_pairs(&train, n_train, seed);
    write_pairs(&held, n_held, seed + 1);
    (tmp, policy, train, held)
}

fn write_pairs(path: &Path, n: usize, seed: u64) {
    std::fs::write(path, synthetic::to_jsonl(&synthetic::pairs(n, seed, VOCAB))).unwrap();
}

fn settings(steps: usize, lr: f64) -> TrainSettings {
    TrainSettings {
        device: Device::Cpu,
        steps,
        batch_size: 8,
        lr,
        seed: 3,
        max_grad_norm: Some(1.0),
        optimizer: AdamWConfig {
            weight_decay: 0.0,
            ..Default::default()
        }
        .into(),
    }
}

#[test]
fn dpo_on_generated_pairs_raises_held_out_reward_accuracy() {
    let (tmp, policy, train, held) = world(96, 40, 1);
    // Tokenisation: <s>, the prompt words, then the completion words and </s>.
    let train_pairs = load_pairs(&train, &policy, Some(2)).unwrap();
    let p0 = &train_pairs[0].chosen;
    assert_eq!(p0.tokens[0], 1);
    assert_eq!(*p0.tokens.last().unwrap(), 2);
    assert!(p0.tokens[p0.completion_start..p0.tokens.len() - 1]
        .iter()
        .all(|t| t % 4 == 0));
    let held_pairs = load_pairs(&held, &policy, Some(2)).unwrap();

    let objective = Objective::Dpo {
        loss_type: LossType::Sigmoid,
        beta: 0.1,
        label_smoothing: 0.0,
    };
    let out = tmp.path().join("out");
    let mut losses = Vec::new();
    let data = PolicyData::Pairs {
        pairs: &train_pairs,
        objective,
    };
    let records = train_policy(&policy, data, &settings(40, 2e-3), None, &out, &mut |r| {
        losses.push(r.loss)
    })
    .unwrap();
    assert_eq!(records.len(), 40);
    let load = |d: &Path| LlamaForCausalLM::from_pretrained(d, &LoadOptions::default()).unwrap().0;
    let (base, tuned) = (load(&policy), load(&out));
    let before = evaluate_policy(&base, &base, &held_pairs, 16).unwrap();
    let after = evaluate_policy(&tuned, &base, &held_pairs, 16).unwrap();
    assert!(
        after.reward_accuracy >= 0.9 && after.reward_accuracy > before.reward_accuracy,
        "held-out reward accuracy {before:?} -> {after:?}"
    );
    assert!(
        after.ranking_accuracy > before.ranking_accuracy,
        "{before:?} -> {after:?}"
    );
    let head: f64 = losses[..5].iter().sum::<f64>() / 5.0;
    let tail: f64 = losses[losses.len() - 5..].iter().sum::<f64>() / 5.0;
    assert!(tail < head, "loss {head} -> {tail}");
    let lines = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    assert_eq!(lines.lines().count(), 40);
}

/// `diffalign lm train` of the policy in `policy` on `train`, evaluated on `held`, into `out`,
/// with `extra` flags; the final JSON report.
fn lm_train_cli(policy: &Path, train: &Path, held: &Path, out: &Path, extra: &[&str]) -> serde_json::Value {
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let (policy, train, held, out) = (s(policy), s(train), s(held), s(out));
    let mut args = vec![
        "lm",
        "train",
        "--policy",
        &policy,
        "--data",
        &train,
        "--eval-data",
        &held,
        "--out",
        &out,
    ];
    args.extend_from_slice(extra);
    run_cli(&args)
}

fn run_cli(args: &[&str]) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_diffalign"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "diffalign {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    serde_json::from_str(stdout.lines().last().unwrap()).unwrap()
}

/// `diffalign lm train-rm` of a `head` reward model on `base` and `train` into `out`: 40 steps of
/// 8 pairs at lr 3e-3, with `extra` flags.
fn train_rm(base: &Path, train: &Path, out: &Path, head: &str, extra: &[&str]) {
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let (base, train, out) = (s(base), s(train), s(out));
    let mut args = vec![
        "lm",
        "train-rm",
        "--model",
        &base,
        "--head",
        head,
        "--data",
        &train,
        "--out",
        &out,
        "--steps",
        "40",
        "--lr",
        "3e-3",
        "--batch-size",
        "8",
    ];
    args.extend_from_slice(extra);
    run_cli(&args);
}

#[test]
fn a_bt_reward_model_trains_with_8bit_adamw_and_adafactor_too() {
    let (tmp, base, train, held) = world(96, 50, 5);
    let s = |p: &Path| p.to_str().unwrap().to_string();
    for optimizer in ["adamw8bit", "adafactor"] {
        let out = tmp.path().join(format!("rm-{optimizer}"));
        train_rm(&base, &train, &out, "bt", &["--optimizer", optimizer]);
        let report = run_cli(&["lm", "eval-rm", "--model", &s(&out), "--data", &s(&held)]);
        let acc = report["accuracy"].as_f64().unwrap();
        assert!(acc >= 0.9, "{optimizer}: held-out accuracy {acc}: {report}");
    }
}

#[test]
fn bt_and_gpm_reward_models_train_and_score_on_rewardbench_format() {
    let (tmp, base, train, held) = world(96, 50, 5);
    let s = |p: &Path| p.to_str().unwrap().to_string();
    for (head, extra) in [("bt", vec![]), ("gpm", vec!["--prompt-gate", "--value-head-dim", "4"])] {
        let out = tmp.path().join(format!("rm-{head}"));
        train_rm(&base, &train, &out, head, &extra);
        let report = run_cli(&["lm", "eval-rm", "--model", &s(&out), "--data", &s(&held)]);
        let acc = report["accuracy"].as_f64().unwrap();
        assert!(acc >= 0.9, "{head}: held-out accuracy {acc}: {report}");
        assert_eq!(report["n"], 50);
        // Every section of the generated subsets is scored, and the score is their mean.
        let sections = report["sections"].as_object().unwrap();
        assert_eq!(sections.len(), 4, "{report}");
        let mean = sections.values().map(|v| v.as_f64().unwrap()).sum::<f64>() / 4.0;
        assert!((report["score"].as_f64().unwrap() - mean).abs() < 1e-9);
        // The saved model reloads as what it is, and `lm reward` reads it.
        let cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
        let arch = cfg["architectures"][0].as_str().unwrap();
        assert!(arch.ends_with(if head == "bt" {
            "ForSequenceClassification"
        } else {
            "ForGeneralPreference"
        }));
        let batch = common::shared_fixtures().join("lm/batch.safetensors");
        let r = run_cli(&["lm", "reward", "--model", &s(&out), "--batch", &s(&batch)]);
        let key = if head == "bt" { "reward_w" } else { "score" };
        assert_eq!(r[key].as_array().unwrap().len(), 3, "{r}");
    }
}

/// A 3-cycle A > B > C > A over fixed response features: a scalar reward ranks at most two of
/// the three pairs right; the GPM head ranks all three.
#[test]
fn gpm_fits_a_preference_cycle_that_bt_cannot() {
    let dev = Device::Cpu;
    // One-hot features of A, B, C; pairs (A, B), (B, C), (C, A) with the first preferred.
    let eye = Tensor::eye(3, DType::F32, &dev).unwrap();
    let idx = |v: &[u32]| Tensor::new(v, &dev).unwrap();
    let (w, l) = (
        eye.index_select(&idx(&[0, 1, 2]), 0).unwrap(),
        eye.index_select(&idx(&[1, 2, 0]), 0).unwrap(),
    );
    let accuracy = |margins: Tensor| -> f64 {
        let m: Vec<f32> = margins.to_vec1().unwrap();
        m.iter().filter(|&&x| x > 0.0).count() as f64 / m.len() as f64
    };
    for seed in 0..8 {
        let vb = VarBuilder::random(seed, DType::F32, &dev, true);
        let bt = Linear::new(3, 1, false, vb.pp("score")).unwrap();
        let reward = |x: &Tensor| bt.forward(x).unwrap().squeeze(1).unwrap();
        adam_fit(&vb, &|| bt_loss(&reward(&w), &reward(&l), 1.0).unwrap());
        let bt_acc = accuracy((reward(&w) - reward(&l)).unwrap());
        assert!(bt_acc <= 2.0 / 3.0 + 1e-9, "BT cannot fit a cycle, got {bt_acc}");

        // 2k = 6, the GPM default; with k = 1 gradient descent often collapses all three
        // embeddings onto one direction (a stationary point of the cycle), at 2k >= 4 it does not.
        let scores = fit_gpm(&w, &l, seed);
        assert_eq!(accuracy(scores.clone()), 1.0, "seed {seed}: GPM scores {scores}");
    }
}

/// `lm train --lora-rank`: only the targeted linear layers change, by exactly the saved PEFT
/// adapters' `scale * B A`, and the policy learns the held-out preference.
#[test]
fn lora_policy_training_through_the_cli() {
    let (tmp, policy, train, held) = world(64, 32, 11);
    let out = tmp.path().join("out");
    let report = lm_train_cli(
        &policy,
        &train,
        &held,
        &out,
        &[
            "--loss-type",
            "sigmoid",
            "--beta",
            "0.1",
            "--steps",
            "80",
            "--lr",
            "1e-2",
            "--lora-rank",
            "4",
            "--lora-alpha",
            "8",
            "--lora-targets",
            "q_proj,v_proj,down_proj,lm_head",
        ],
    );
    let after = report["eval_after"]["reward_accuracy"].as_f64().unwrap();
    assert!(after >= 0.8, "{report}");
    let base = common::load(&policy.join("model.safetensors"));
    let merged = common::load(&out.join("model.safetensors"));
    let adapters = common::load(&out.join("adapter_model.safetensors"));
    assert_eq!(
        adapters.len(),
        2 * (3 * 2 + 1),
        "A and B for 3 modules in 2 layers and the head"
    );
    for (name, w) in &base {
        let module = name.strip_suffix(".weight").unwrap_or(name);
        let a_key = format!("base_model.model.{module}.lora_A.weight");
        let delta = (&merged[name] - w).unwrap();
        match adapters.get(&a_key) {
            Some(a) => {
                let b = &adapters[&format!("base_model.model.{module}.lora_B.weight")];
                let want = (b.matmul(a).unwrap() * 2.0).unwrap();
                common::assert_close(name, &delta, &want, 1e-5);
                assert!(
                    common::max_abs_diff(&delta, &delta.zeros_like().unwrap()) > 0.0,
                    "{name} did not train"
                );
            }
            None => assert_eq!(common::max_abs_diff(&merged[name], w), 0.0, "{name} changed"),
        }
    }
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(cfg["r"], 4);
    assert_eq!(cfg["task_type"], "CAUSAL_LM");
}

/// The same GPM head on frozen CLIP image embeddings (the embedded shapes-world reward's vision
/// tower): three rendered scenes in a preference cycle are all ranked right.
#[test]
fn gpm_head_fits_a_cycle_over_clip_image_embeddings() {
    use diffalign::reward::{ClipReward, RewardKind};
    use diffalign::shapes::world::{Prompt, Scene};
    let dev = Device::Cpu;
    let tmp = tempfile::tempdir().unwrap();
    let dir = diffalign::shapes::assets::shapes_reward_dir(tmp.path()).unwrap();
    let clip = ClipReward::from_clip_model(RewardKind::ClipScore, &dir, &LoadOptions::default()).unwrap();
    let mut rng = diffalign::rng::Rng::new(4);
    let images: Vec<Tensor> = Prompt::all()
        .into_iter()
        .step_by(31)
        .take(3)
        .map(|p| {
            let img = Scene::random(p, &mut rng).render(32);
            Tensor::from_vec(img.into_raw(), (32, 32, 3), &dev)
                .unwrap()
                .permute((2, 0, 1))
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
                .affine(1.0 / 255.0, 0.0)
                .unwrap()
        })
        .collect();
    let emb = clip
        .image_embedding(&Tensor::stack(&images, 0).unwrap())
        .unwrap()
        .detach();
    let idx = |v: &[u32]| Tensor::new(v, &dev).unwrap();
    let (w, l) = (
        emb.index_select(&idx(&[0, 1, 2]), 0).unwrap(),
        emb.index_select(&idx(&[1, 2, 0]), 0).unwrap(),
    );
    let s: Vec<f32> = fit_gpm(&w, &l, 0).to_vec1().unwrap();
    assert!(s.iter().all(|&x| x > 0.0), "GPM scores over CLIP embeddings {s:?}");
}

/// `lm train --loss-type kto` on unpaired JSONL (TRL's `prompt`, `completion`, `label`) learns the
/// preference the held-out pairs measure.
#[test]
fn kto_on_unpaired_examples_through_the_cli() {
    let tmp = tempfile::tempdir().unwrap();
    let policy = model_dir(tmp.path(), "policy");
    let unpaired: String = synthetic::pairs(48, 21, VOCAB)
        .iter()
        .flat_map(|p| {
            [(&p.chosen, true), (&p.rejected, false)].map(|(c, label)| {
                serde_json::json!({"prompt": p.prompt, "completion": c, "label": label}).to_string() + "\n"
            })
        })
        .collect();
    let (train, held) = (tmp.path().join("kto.jsonl"), tmp.path().join("held.jsonl"));
    std::fs::write(&train, unpaired).unwrap();
    write_pairs(&held, 32, 22);
    let out = tmp.path().join("out");
    let report = lm_train_cli(
        &policy,
        &train,
        &held,
        &out,
        &["--loss-type", "kto", "--beta", "0.5", "--steps", "40", "--lr", "2e-3"],
    );
    assert_eq!(report["examples"], 96);
    let after = report["eval_after"]["reward_accuracy"].as_f64().unwrap();
    assert!(after >= 0.9, "{report}");
}

/// Trains a GPM head (2k = 6, no gate, tau 0.1) from seed `seed` on pairs `w[i] > l[i]` of fixed
/// features (300 AdamW steps, lr 0.05); the final scores `s(w > l)`.
fn fit_gpm(w: &Tensor, l: &Tensor, seed: u64) -> Tensor {
    let vb = VarBuilder::random(seed, DType::F32, w.device(), true);
    let gpm = GpmHead::new(w.dim(1).unwrap(), 6, false, 0.1, vb.clone()).unwrap();
    let score = || gpm_score(&gpm.embed(w).unwrap(), &gpm.embed(l).unwrap(), None).unwrap();
    adam_fit(&vb, &|| gpm_loss(&score(), gpm.tau).unwrap());
    score()
}

/// 300 AdamW steps (lr 0.05, no weight decay) on every `Var` of `vb`.
fn adam_fit(vb: &VarBuilder, loss_of: &dyn Fn() -> Tensor) {
    let cfg = AdamWConfig {
        weight_decay: 0.0,
        ..Default::default()
    };
    let mut opt = Optimizer::new(vb.vars(), cfg).unwrap();
    for _ in 0..300 {
        let grads = loss_of().backward().unwrap();
        let g: Vec<Tensor> = opt
            .params
            .iter()
            .map(|p| grads.get(p.var.as_tensor()).unwrap().clone())
            .collect();
        opt.update(&g, 0.05).unwrap();
    }
}
