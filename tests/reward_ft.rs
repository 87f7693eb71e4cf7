//! Reward fine-tuning (DRaFT, AlignProp, ReFL) on the tiny sd15 pipeline with its LoRA and the
//! tiny aesthetic reward: the reward gradient with respect to the LoRA through the last K DDIM
//! steps (and ReFL's one-step x0 prediction) matches diffusers (`tests/fixtures/gen_reward_ft.py`);
//! AlignProp's checkpointed steps give the plain steps' gradient and its truncation draws follow
//! the seed; an interrupted and resumed run ends exactly where an uninterrupted one does; bad
//! recipe values are errors naming the key.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{Tensor, Var};
use common::*;
use diffalign::recipe::reward_ft::{PlannedReward, RewardFtPlan, RewardMethod};
use diffalign::recipe::Plan;
use diffalign::reno::WeightedReward;
use diffalign::reward::{load_reward, RewardKind, RewardSpec};
use diffalign::rng::Rng;
use diffalign::sampling::pipeline::PipelineSources;
use diffalign::sampling::StableDiffusionPipeline;
use diffalign::train::reward_ft::RewardFt;
use diffalign::weights::lora::LoraSource;
use diffalign::weights::LoadOptions;

/// Relative error in norm allowed on each LoRA tensor's gradient against diffusers.
const REWARD_GRAD_RTOL: f64 = 1e-3;

fn expected() -> std::collections::HashMap<String, Tensor> {
    load(&own_fixtures().join("reward_ft/expected.safetensors"))
}

fn aesthetic_dir() -> PathBuf {
    own_fixtures().join("reward/aesthetic")
}

/// The sd15 pipeline with the shared LoRA as trainable adapters, and those adapters by file key.
fn lora_pipeline() -> (StableDiffusionPipeline, Vec<(String, Var)>) {
    let lora = shared_fixtures().join("sd15-losses/policy_lora/pytorch_lora_weights.safetensors");
    let opts = LoadOptions {
        lora: Some(std::sync::Arc::new(LoraSource::from_file(&lora, "unet", true).unwrap())),
        ..Default::default()
    };
    let root = shared_fixtures().join("sd15");
    let (policy, vb) =
        diffalign::models::unet::UNet2DConditionModel::from_pretrained(&root.join("unet"), &opts).unwrap();
    let sources = PipelineSources {
        root,
        ..Default::default()
    };
    let pipe = StableDiffusionPipeline::load_with_unet(&sources, &opts.without_lora(), policy).unwrap();
    (pipe, vb.lora_vars())
}

fn ft(pipe: &StableDiffusionPipeline, vars: &[(String, Var)], method: RewardMethod, seed: u64) -> RewardFt {
    let plan = RewardFtPlan {
        method,
        sample_steps: 4,
        guidance: 3.0,
        rewards: vec![PlannedReward {
            spec: RewardSpec {
                kind: RewardKind::Aesthetic,
                path: aesthetic_dir(),
            },
            weight: Some(1.0),
        }],
    };
    let reward = load_reward(RewardKind::Aesthetic, &aesthetic_dir(), &LoadOptions::default()).unwrap();
    let trainable = vars.iter().map(|(_, v)| v.as_tensor().clone()).collect();
    RewardFt::new(
        &plan,
        vec![WeightedReward::new(reward, Some(1.0))],
        pipe,
        trainable,
        seed,
    )
    .unwrap()
}

/// The loss and the LoRA gradients of `method` from the fixture's noise, gradients from
/// `grad_from`.
fn loss_and_grads(method: RewardMethod, grad_from: usize) -> (f64, Vec<(String, Tensor)>) {
    let (pipe, vars) = lora_pipeline();
    let ft = ft(&pipe, &vars, method, 0);
    let noise = &expected()["noise"];
    let prompt = "a red circle on a blue background";
    let out = ft
        .loss_from_noise(&pipe, &pipe.unet, prompt, (64, 64), noise, grad_from, &mut Rng::new(0))
        .unwrap();
    let grads = out.loss.backward().unwrap();
    let g = vars
        .iter()
        .map(|(k, v)| (k.clone(), grads.get(v.as_tensor()).unwrap().clone()))
        .collect();
    (out.loss.to_scalar::<f32>().unwrap() as f64, g)
}

/// The sum of `t`'s elements as f64 (the value of a one-element tensor).
fn scalar(t: &Tensor) -> f64 {
    t.to_dtype(candle_core::DType::F64)
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

fn rel_norm(got: &Tensor, want: &Tensor) -> f64 {
    let diff = (got - want).unwrap().sqr().unwrap().sum_all().unwrap().sqrt().unwrap();
    let norm = want.sqr().unwrap().sum_all().unwrap().sqrt().unwrap();
    scalar(&diff) / scalar(&norm).max(1e-30)
}

fn check_case(prefix: &str, loss: f64, grads: &[(String, Tensor)]) {
    let e = expected();
    let want_loss = scalar(&e[&format!("{prefix}.loss")]);
    let rel = (loss - want_loss).abs() / want_loss.abs();
    assert!(rel <= 1e-5, "{prefix}.loss: got {loss}, want {want_loss}");
    assert_eq!(grads.len(), 176, "every LoRA tensor has a gradient");
    let mut worst = 0f64;
    for (k, g) in grads {
        let want = &e[&format!("{prefix}.grad.{k}")];
        assert!(
            scalar(&want.abs().unwrap().sum_all().unwrap()) > 0.0,
            "{prefix}.{k}: zero reference"
        );
        let rel = rel_norm(g, want);
        worst = worst.max(rel);
        assert!(
            rel <= REWARD_GRAD_RTOL,
            "{prefix}.grad.{k}: relative error in norm {rel:e}"
        );
    }
    eprintln!("{prefix}: worst relative gradient error {worst:e}");
}

#[test]
fn draft_gradient_through_last_k_steps_matches_diffusers_for_k_1_and_2() {
    for k in [1, 2] {
        let (loss, grads) = loss_and_grads(RewardMethod::Draft { k, lv: 0 }, 4 - k);
        check_case(&format!("draft_k{k}"), loss, &grads);
    }
}

#[test]
fn refl_one_step_prediction_gradient_matches_diffusers() {
    let refl = RewardMethod::Refl {
        t_lo: 0,
        t_hi: 1000,
        pretrain_weight: 0.0,
    };
    let (loss, grads) = loss_and_grads(refl, 2);
    check_case("refl_i2", loss, &grads);
}

#[test]
fn alignprop_checkpointed_steps_give_the_plain_steps_gradient() {
    let before = diffalign::nn::checkpoint::recomputed_blocks();
    let (loss_c, checkpointed) = loss_and_grads(RewardMethod::AlignProp { k: 4 }, 1);
    assert!(
        diffalign::nn::checkpoint::recomputed_blocks() >= before + 3,
        "the three steps with gradients were recomputed"
    );
    let (loss_p, plain) = loss_and_grads(RewardMethod::Draft { k: 3, lv: 0 }, 1);
    assert_eq!(loss_c, loss_p);
    for ((k, a), (_, b)) in checkpointed.iter().zip(&plain) {
        let rel = rel_norm(a, b);
        assert!(rel <= 1e-5, "{k}: checkpointed gradient differs by {rel:e}");
    }
}

#[test]
fn alignprop_truncation_draws_follow_the_seed() {
    let (pipe, vars) = lora_pipeline();
    let draws = |seed: u64| -> Vec<usize> {
        let ft = ft(&pipe, &vars, RewardMethod::AlignProp { k: 3 }, seed);
        (0..64u64).map(|i| ft.grad_from(&[i / 4, 0, 0, i % 4])).collect()
    };
    let a = draws(3);
    assert_eq!(a, draws(3), "same seed, same draws");
    assert_ne!(a, draws(4), "another seed, other draws");
    // Gradients through 1, 2 or 3 final steps of 4: the first step with gradients is 1, 2 or 3.
    for v in 1..=3 {
        assert!(a.contains(&v), "{v} never drawn in {a:?}");
    }
    assert!(a.iter().all(|v| (1..=3).contains(v)), "{a:?}");
    // DRaFT-K is not random.
    let draft = ft(&pipe, &vars, RewardMethod::Draft { k: 2, lv: 0 }, 3);
    assert!((0..8u64).all(|i| draft.grad_from(&[i]) == 2));
}

/// A LoRA reward recipe on the sd15 pipeline over a prompt file, writing to `dir/out`.
fn reward_recipe(dir: &Path, method: &str, extra: &str) -> PathBuf {
    let prompts = dir.join("prompts.txt");
    std::fs::write(
        &prompts,
        "a red circle on a blue background\n\na green square\na blue triangle on white\n",
    )
    .unwrap();
    let text = format!(
        r#"[model]
path = "{model}"

[data]
format = "prompts"
path = "{prompts}"

[train]
method = "{method}"
steps = 4
batch_size = 2
grad_accum = 2
lr = 1e-3
resolution = 64
seed = 5

[reward_ft]
sample_steps = 3
guidance = 3.0
{extra}

[[reward]]
kind = "aesthetic"
path = "{reward}"
weight = 1.0

[lora]
rank = 2

[output]
dir = "{out}"
"#,
        model = shared_fixtures().join("sd15").display(),
        prompts = prompts.display(),
        reward = aesthetic_dir().display(),
        out = dir.join("out").display(),
    );
    let path = dir.join("recipe.toml");
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn interrupted_and_resumed_reward_run_equals_uninterrupted_run() {
    for (method, extra) in [("alignprop", "alignprop_k = 2"), ("draft", "draft_lv = 2")] {
        let tmp = tempfile::tempdir().unwrap();
        let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
        std::fs::create_dir_all(&a).unwrap();
        std::fs::create_dir_all(&b).unwrap();
        let (ra, rb) = (reward_recipe(&a, method, extra), reward_recipe(&b, method, extra));
        pairs::train(&ra, &[]);
        pairs::train(&rb, &["--max-steps-this-run", "1"]);
        pairs::train(&rb, &["--resume", "--max-steps-this-run", "2"]);
        pairs::train(&rb, &["--resume"]);
        let file = "out/pytorch_lora_weights.safetensors";
        let (wa, wb) = (load(&a.join(file)), load(&b.join(file)));
        assert_eq!(wa.len(), wb.len());
        let mut moved = 0.0;
        for (k, t) in &wa {
            let d = max_abs_diff(t, &wb[k]);
            assert!(d == 0.0, "{method}: {k}: resumed run differs by {d}");
            moved += scalar(&t.abs().unwrap().sum_all().unwrap());
        }
        assert!(moved > 0.0, "{method}: the LoRA did not move");
        let ma = std::fs::read_to_string(a.join("out/metrics.jsonl")).unwrap();
        let mb = std::fs::read_to_string(b.join("out/metrics.jsonl")).unwrap();
        assert_eq!(ma, mb, "{method}: metrics of the resumed run differ");
    }
}

#[test]
fn bad_reward_recipes_are_errors_naming_the_key() {
    let tmp = tempfile::tempdir().unwrap();
    let cases: [(&str, &str, &str); 8] = [
        (
            "draft",
            "draft_k = 0",
            "reward_ft.draft_k: must be in [1, sample_steps = 3], got 0",
        ),
        (
            "draft",
            "draft_k = 4",
            "reward_ft.draft_k: must be in [1, sample_steps = 3], got 4",
        ),
        (
            "draft",
            "draft_k = 2\ndraft_lv = 2",
            "reward_ft.draft_lv: DRaFT-LV noises copies of the last step only",
        ),
        (
            "alignprop",
            "alignprop_k = 9",
            "reward_ft.alignprop_k: must be in [1, sample_steps = 3], got 9",
        ),
        (
            "refl",
            "refl_t_lo = 500\nrefl_t_hi = 100",
            "reward_ft.refl_t_lo: must be <= refl_t_hi = 100, got 500",
        ),
        (
            "refl",
            "refl_pretrain_weight = -1.0",
            "reward_ft.refl_pretrain_weight: must be a finite value >= 0",
        ),
        (
            "draft",
            "guidance = -2.0",
            "reward_ft.guidance: must be a finite value >= 0, got -2",
        ),
        (
            "draft",
            "sample_steps = 0",
            "reward_ft.sample_steps: must be > 0, got 0",
        ),
    ];
    for (method, extra, want) in cases {
        // The template sets guidance and sample_steps: those cases override them with --set.
        let (extra, sets) = match extra.split_once(" = ") {
            Some((k @ ("guidance" | "sample_steps"), v)) => ("", vec![format!("reward_ft.{k}={v}")]),
            _ => (extra, Vec::new()),
        };
        let recipe = reward_recipe(tmp.path(), method, extra);
        let err = Plan::load(&recipe, &sets).unwrap_err().to_string();
        assert!(err.contains("recipe.toml") && err.contains(want), "{extra}: {err}");
    }
    let recipe = reward_recipe(tmp.path(), "draft", "");
    let set = |s: &str| Plan::load(&recipe, &[s.to_string()]).unwrap_err().to_string();
    let err = set("reward=[]");
    assert!(
        err.contains("reward: the draft method needs at least one [[reward]] table"),
        "{err}"
    );
    let err = set("train.method=dpo");
    assert!(
        err.contains("reward_ft: only the reward methods (draft, alignprop, refl) read it, got method \"dpo\""),
        "{err}"
    );
    let err = Plan::load(&recipe, &["reward_ft.draft_kk=1".into()])
        .unwrap_err()
        .to_string();
    assert!(err.contains("draft_kk"), "{err}");
    // A kind that does not exist, and a preference method on a prompt file.
    let text = std::fs::read_to_string(&recipe)
        .unwrap()
        .replace("kind = \"aesthetic\"", "kind = \"beauty\"");
    std::fs::write(&recipe, text).unwrap();
    let err = Plan::load(&recipe, &[]).unwrap_err().to_string();
    assert!(
        err.contains("reward[0].kind") && err.contains("unknown reward kind \"beauty\""),
        "{err}"
    );
    let refl = reward_recipe(tmp.path(), "refl", "refl_t_lo = 990\nrefl_t_hi = 995");
    let o = Command::new(env!("CARGO_BIN_EXE_diffalign"))
        .arg("train")
        .arg(&refl)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("no sampler timestep lies in [990, 995]"),
        "{err}"
    );
}

#[test]
fn refl_on_pair_data_adds_the_pretraining_loss_of_the_preferred_images() {
    let tmp = tempfile::tempdir().unwrap();
    let data = common::pairs::write_pairs(&tmp.path().join("data"), 4, 3);
    let recipe = reward_recipe(tmp.path(), "refl", "refl_t_hi = 1000");
    let text = std::fs::read_to_string(&recipe)
        .unwrap()
        .replace("format = \"prompts\"", "format = \"jsonl\"")
        .replace(
            &tmp.path().join("prompts.txt").display().to_string(),
            &data.display().to_string(),
        );
    std::fs::write(&recipe, text).unwrap();
    pairs::train(&recipe, &["--set", "train.steps=2"]);
    let metrics = read_jsonl(&tmp.path().join("out/metrics.jsonl"));
    assert_eq!(metrics.len(), 2);
    for m in &metrics {
        // The pair images' denoising MSE is logged as mse_w and is part of the loss.
        let mse = m["mse_w"].as_f64().unwrap();
        assert!(mse > 0.0 && mse.is_finite(), "{m}");
        assert!(m["loss"].as_f64().unwrap().is_finite(), "{m}");
    }
}
