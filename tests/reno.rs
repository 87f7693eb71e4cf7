//! ReNO: three iterations on the shared `turbo-reno` fixture (scores, losses, gradient on the
//! noise, the noise after each step), the optimiser and regulariser on their own, and the `reno`
//! CLI (its iterations.jsonl against the fixture, and bad input).

mod common;

use std::path::PathBuf;
use std::process::Command;

use candle_core::{DType, Tensor};
use common::{device, load, load_on_device, load_options, max_abs_diff, metadata, shared_fixtures};
use diffalign::reno::{
    noise_regularizer, IterationRecord, IterationTensors, Reno, RenoConfig, Sampler, WeightedReward,
};
use diffalign::reward::{load_reward, RewardKind};
use diffalign::sampling::pipeline::{PipelineSources, StableDiffusionPipeline};

/// Relative tolerance on scores and losses (the fixture README's 1e-3 on losses).
const LOSS_RTOL: f64 = 1e-3;
/// Relative tolerance in norm on gradients (the fixture README's).
const GRAD_RTOL: f32 = 1e-2;

fn reno_dir() -> PathBuf {
    shared_fixtures().join("turbo-reno")
}

fn turbo_dir() -> PathBuf {
    shared_fixtures().join("turbo")
}

/// The fixture's tensors, on the test device.
fn expected() -> std::collections::HashMap<String, Tensor> {
    load_on_device(&reno_dir().join("expected.safetensors"))
}

fn prompt() -> String {
    metadata(&reno_dir().join("expected.safetensors"))["prompt"].clone()
}

fn scalar(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()[0]
}

fn assert_rel(what: &str, got: f64, want: f64, rtol: f64) {
    assert!(
        (got - want).abs() <= rtol * want.abs().max(1e-3),
        "{what}: got {got}, want {want}"
    );
}

/// `|a − b| / |b|` over the whole tensor.
fn rel_norm_diff(a: &Tensor, b: &Tensor) -> f32 {
    let d = (a - b)
        .unwrap()
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
        .sqrt();
    let n = b.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap().sqrt();
    d / n.max(1e-12)
}

fn turbo_pipeline() -> StableDiffusionPipeline {
    let sources = PipelineSources {
        root: turbo_dir(),
        ..Default::default()
    };
    StableDiffusionPipeline::load(&sources, &load_options()).unwrap()
}

fn pickscore() -> Vec<WeightedReward> {
    let reward = load_reward(RewardKind::PickScore, &reno_dir().join("reward_clip"), &load_options()).unwrap();
    vec![WeightedReward::new(reward, None)]
}

#[test]
fn reno_three_iterations_match_shared_fixture() {
    let e = expected();
    let pipe = turbo_pipeline();
    let rewards = pickscore();
    let config = RenoConfig {
        iters: 4,
        ..RenoConfig::default()
    };
    let reno = Reno::new(&pipe, &rewards, Sampler::Scheduler { kind: None, steps: 1 }, config, 0).unwrap();
    let mut seen: Vec<(IterationRecord, IterationTensors)> = Vec::new();
    let outcome = reno
        .run(&prompt(), &e["reno.z0"], &mut |r, t| {
            seen.push((r.clone(), t.clone()));
            Ok(())
        })
        .unwrap();
    assert_eq!(outcome.records.len(), 4);
    assert!(
        seen[3].1.grad.is_none() && seen[3].1.next_noise.is_none(),
        "the last iteration only evaluates"
    );
    for (i, (record, tensors)) in seen.iter().take(3).enumerate() {
        let key = |name: &str| format!("reno.iter{i}.{name}");
        assert_eq!(record.iter, i);
        assert_eq!(record.scores[0].0, RewardKind::PickScore);
        assert_rel(&key("score"), record.scores[0].1, scalar(&e[&key("score")]), LOSS_RTOL);
        assert_rel(
            &key("reward_loss"),
            record.reward_loss,
            scalar(&e[&key("reward_loss")]),
            LOSS_RTOL,
        );
        assert_rel(
            &key("reg_loss"),
            record.reg_loss,
            scalar(&e[&key("reg_loss")]),
            LOSS_RTOL,
        );
        let image_diff = max_abs_diff(&tensors.image, &e[&key("image")]);
        assert!(image_diff < 1e-4, "{}: max abs diff {image_diff}", key("image"));
        let grad = tensors.grad.as_ref().unwrap();
        let g = rel_norm_diff(grad, &e[&key("grad")]);
        assert!(g < GRAD_RTOL, "{}: relative difference in norm {g}", key("grad"));
        let next = tensors.next_noise.as_ref().unwrap();
        let z_diff = max_abs_diff(next, &e[&key("z_after")]);
        assert!(z_diff < 1e-4, "{}: max abs diff {z_diff}", key("z_after"));
    }
    // The kept image is the one with the lowest reward loss.
    let best = outcome
        .records
        .iter()
        .min_by(|a, b| a.reward_loss.total_cmp(&b.reward_loss))
        .unwrap();
    assert_eq!(outcome.best_iter, best.iter);
    assert_eq!(max_abs_diff(&outcome.best_image, &seen[best.iter].1.image), 0.0);
    assert_eq!(max_abs_diff(&outcome.initial_image, &seen[0].1.image), 0.0);
}

#[test]
fn explicit_timestep_999_equals_the_turbo_one_step_schedule() {
    let e = expected();
    let pipe = turbo_pipeline();
    let rewards = pickscore();
    let z0 = &e["reno.z0"];
    let cond = pipe.conditioning(&[prompt()], None, 1.0, (64, 64), None).unwrap();
    let default = Reno::new(
        &pipe,
        &rewards,
        Sampler::Scheduler { kind: None, steps: 1 },
        RenoConfig::default(),
        0,
    )
    .unwrap();
    let explicit = Reno::new(&pipe, &rewards, Sampler::Timestep(999.0), RenoConfig::default(), 0).unwrap();
    let a = default.generate(&cond, z0).unwrap();
    let b = explicit.generate(&cond, z0).unwrap();
    assert_eq!(max_abs_diff(&a, &b), 0.0);
    // Another timestep gives another image; out of range is an error naming the range.
    let mid = Reno::new(&pipe, &rewards, Sampler::Timestep(500.0), RenoConfig::default(), 0).unwrap();
    assert!(max_abs_diff(&mid.generate(&cond, z0).unwrap(), &a) > 1e-3);
    let err = Reno::new(&pipe, &rewards, Sampler::Timestep(1000.0), RenoConfig::default(), 0)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("timestep") && err.contains("999"), "{err}");
}

#[test]
fn regulariser_matches_its_formula_in_f64() {
    let dev = device();
    let values: Vec<f64> = (0..24).map(|i| ((i * 37 % 11) as f64 - 5.0) / 3.0).collect();
    let z = Tensor::from_vec(values.clone(), (1, 2, 3, 4), &dev).unwrap();
    let got = scalar(&noise_regularizer(&z, 0.01).unwrap());
    let sq: f64 = values.iter().map(|v| v * v).sum();
    let want = 0.01 * (0.5 * sq - 23.0 * sq.sqrt().ln());
    assert_rel("regulariser", got, want, 1e-6);
}

#[test]
fn reno_rejects_bad_settings() {
    let pipe = turbo_pipeline();
    let rewards = pickscore();
    let sampler = Sampler::Scheduler { kind: None, steps: 1 };
    let bad = [
        (
            RenoConfig {
                iters: 0,
                ..RenoConfig::default()
            },
            "iters",
        ),
        (
            RenoConfig {
                lr: f64::NAN,
                ..RenoConfig::default()
            },
            "lr",
        ),
        (
            RenoConfig {
                grad_clip: Some(0.0),
                ..RenoConfig::default()
            },
            "grad clip",
        ),
    ];
    for (config, what) in bad {
        let err = Reno::new(&pipe, &rewards, sampler, config, 0)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains(what), "{what}: {err}");
    }
    let err = Reno::new(&pipe, &[], sampler, RenoConfig::default(), 0)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("reward"), "{err}");
    let reno = Reno::new(&pipe, &rewards, sampler, RenoConfig::default(), 0).unwrap();
    let wrong = Tensor::zeros((1, 3, 16, 16), DType::F32, &device()).unwrap();
    let err = reno
        .run(&prompt(), &wrong, &mut |_, _| Ok(()))
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("channels"), "{err}");
}

// ---------------------------------------------------------------------------------------------
// The `reno` command

fn diffalign() -> Command {
    Command::new(env!("CARGO_BIN_EXE_diffalign"))
}

/// `reno.z0` as `init_noise` in a safetensors file under `dir`.
fn write_z0(dir: &std::path::Path) -> PathBuf {
    let path = dir.join("z0.safetensors");
    let z0 = load(&reno_dir().join("expected.safetensors"))["reno.z0"].clone();
    let tensors = std::collections::HashMap::from([("init_noise".to_string(), z0)]);
    diffalign::weights::store::save_safetensors(&path, &tensors, None).unwrap();
    path
}

fn reno_cmd(out: &std::path::Path, z0: &std::path::Path, reward: &str) -> Command {
    let mut cmd = diffalign();
    cmd.arg("reno")
        .arg("--model")
        .arg(turbo_dir())
        .args(["--prompt", &prompt(), "--reward", reward, "--init-noise"])
        .arg(z0)
        .arg("--out")
        .arg(out);
    cmd
}

use common::read_jsonl as jsonl;

#[test]
fn reno_cli_writes_iterations_matching_the_fixture() {
    let e = expected();
    let tmp = tempfile::tempdir().unwrap();
    let z0 = write_z0(tmp.path());
    let out = tmp.path().join("new/run");
    let reward = format!("pickscore={}", reno_dir().join("reward_clip").display());
    let o = reno_cmd(&out, &z0, &reward).args(["--iters", "3"]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let lines = jsonl(&out.join("iterations.jsonl"));
    assert_eq!(lines.len(), 3);
    for (i, line) in lines.iter().enumerate() {
        assert_eq!(line["iter"], i);
        let key = |name: &str| format!("reno.iter{i}.{name}");
        let score = line["scores"]["pickscore"].as_f64().unwrap();
        assert_rel(&key("score"), score, scalar(&e[&key("score")]), LOSS_RTOL);
        let reward_loss = line["reward_loss"].as_f64().unwrap();
        assert_rel(
            &key("reward_loss"),
            reward_loss,
            scalar(&e[&key("reward_loss")]),
            LOSS_RTOL,
        );
        let reg_loss = line["reg_loss"].as_f64().unwrap();
        assert_rel(&key("reg_loss"), reg_loss, scalar(&e[&key("reg_loss")]), LOSS_RTOL);
    }
    for name in ["initial.png", "best.png", "best_noise.safetensors", "index.html"] {
        assert!(out.join(name).is_file(), "{name} missing");
    }
    // The summary names the best iteration; its noise regenerates its image.
    let summary: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let best = summary["best_iter"].as_u64().unwrap() as usize;
    let best_loss = lines[best]["reward_loss"].as_f64().unwrap();
    assert!(lines.iter().all(|l| l["reward_loss"].as_f64().unwrap() >= best_loss));
    let best_noise = load(&out.join("best_noise.safetensors"))["init_noise"].clone();
    let z_best = if best == 0 {
        e["reno.z0"].clone()
    } else {
        e[&format!("reno.iter{}.z_after", best - 1)].clone()
    };
    assert!(max_abs_diff(&best_noise, &z_best) < 1e-4);
    let html = std::fs::read_to_string(out.join("index.html")).unwrap();
    assert!(html.contains("<svg") && html.contains("best.png") && html.contains("pickscore score"));

    // With block recomputation the trajectory is the same.
    let out2 = tmp.path().join("recompute");
    let o = reno_cmd(&out2, &z0, &reward)
        .args(["--iters", "3", "--recompute"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for (a, b) in lines.iter().zip(jsonl(&out2.join("iterations.jsonl"))) {
        let (a, b) = (a["reward_loss"].as_f64().unwrap(), b["reward_loss"].as_f64().unwrap());
        assert_rel("reward loss with --recompute", b, a, 1e-5);
    }
}

#[test]
fn reno_cli_prompts_file_gives_one_folder_per_prompt() {
    let tmp = tempfile::tempdir().unwrap();
    let prompts = tmp.path().join("prompts.txt");
    std::fs::write(&prompts, "a red circle\n\na blue square\n").unwrap();
    let out = tmp.path().join("out");
    let reward = format!("pickscore={}", reno_dir().join("reward_clip").display());
    let o = diffalign()
        .arg("reno")
        .arg("--model")
        .arg(turbo_dir())
        .arg("--prompts")
        .arg(&prompts)
        .args([
            "--reward",
            &reward,
            "--weight",
            "pickscore=1",
            "--iters",
            "2",
            "--seed",
            "3",
            "--out",
        ])
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let summaries: Vec<serde_json::Value> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(summaries.len(), 2);
    assert_eq!(summaries[1]["prompt"], "a blue square");
    for p in ["000", "001"] {
        let lines = jsonl(&out.join(p).join("iterations.jsonl"));
        assert_eq!(lines.len(), 2);
        // --weight pickscore=1: the reward loss is 30 − score.
        let (s, l) = (
            lines[1]["scores"]["pickscore"].as_f64().unwrap(),
            lines[1]["reward_loss"].as_f64().unwrap(),
        );
        assert_rel("reward loss at weight 1", l, 30.0 - s, 1e-6);
    }
    assert!(std::fs::read_to_string(out.join("index.html"))
        .unwrap()
        .contains("001/best.png"));
}

#[test]
fn reno_cli_stops_on_a_non_finite_loss_and_keeps_what_it_wrote() {
    let tmp = tempfile::tempdir().unwrap();
    let z0 = write_z0(tmp.path());
    let out = tmp.path().join("run");
    let reward = format!("pickscore={}", reno_dir().join("reward_clip").display());
    // A learning rate of 1e30 sends |z| past f32's range after the first step.
    let o = reno_cmd(&out, &z0, &reward)
        .args(["--iters", "5", "--lr", "1e30"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("iteration 1") && err.contains("non-finite"), "{err}");
    let lines = jsonl(&out.join("iterations.jsonl"));
    assert_eq!(lines.len(), 1, "only iteration 0 was finite");
    for name in ["initial.png", "best.png", "index.html"] {
        assert!(out.join(name).is_file(), "{name} missing");
    }
    assert!(!std::fs::read_dir(&out)
        .unwrap()
        .any(|e| e.unwrap().file_name().to_string_lossy().ends_with(".tmp")));
}

#[test]
fn reno_cli_rejects_bad_rewards_with_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let z0 = write_z0(tmp.path());
    let out = tmp.path().join("run");
    // An aesthetic predictor whose MLP expects 12 features over a CLIP that projects to 16.
    let aesthetic = tmp.path().join("aesthetic");
    std::fs::create_dir_all(aesthetic.join("clip")).unwrap();
    for name in ["config.json", "model.safetensors"] {
        std::fs::copy(
            reno_dir().join("reward_clip").join(name),
            aesthetic.join("clip").join(name),
        )
        .unwrap();
    }
    std::fs::copy(
        common::own_fixtures().join("reward/aesthetic/aesthetic.safetensors"),
        aesthetic.join("aesthetic.safetensors"),
    )
    .unwrap();
    let cases = [
        ("imagescore=/x".to_string(), vec!["unknown reward kind", "pickscore"]),
        (
            format!("pickscore={}", tmp.path().join("missing").display()),
            vec!["missing", "pickscore reward model folder"],
        ),
        (
            format!("aesthetic={}", aesthetic.display()),
            vec!["layers.0.weight", "[32, 16]", "[32, 12]"],
        ),
    ];
    for (reward, needles) in cases {
        let o = reno_cmd(&out, &z0, &reward).output().unwrap();
        assert!(!o.status.success(), "{reward}");
        let err = String::from_utf8_lossy(&o.stderr);
        for n in needles {
            assert!(err.contains(n), "{reward}: {n:?} not in {err}");
        }
    }
    let reward = format!("pickscore={}", reno_dir().join("reward_clip").display());
    let o = reno_cmd(&out, &z0, &reward)
        .args(["--weight", "hpsv2=1"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--weight hpsv2"));
}

#[test]
fn sdxl_turbo_noise_gradient_matches_a_central_difference() {
    // SDXL-Turbo: two text encoders, time ids, one Euler-ancestral step at the trailing timestep.
    let sources = PipelineSources {
        root: common::own_fixtures().join("sdxl-turbo"),
        ..Default::default()
    };
    let pipe = StableDiffusionPipeline::load(&sources, &load_options()).unwrap();
    let rewards = pickscore();
    let reno = Reno::new(
        &pipe,
        &rewards,
        Sampler::Scheduler { kind: None, steps: 1 },
        RenoConfig::default(),
        0,
    )
    .unwrap();
    let (lh, lw) = (8, 12);
    let z = diffalign::rng::Rng::new(5).randn((1, 4, lh, lw), &device()).unwrap();
    let size = reno.image_size(&z).unwrap();
    let cond = pipe.conditioning(&[prompt()], None, 0.0, size, None).unwrap();
    let eval = reno.evaluate(&cond, &prompt(), &z, true).unwrap();
    let grad = eval.grad.unwrap();
    let norm = grad
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
        .sqrt() as f64;
    assert!(norm > 0.0 && norm.is_finite());
    let total = |z: &Tensor| {
        let e = reno.evaluate(&cond, &prompt(), z, false).unwrap();
        e.reward_loss + e.reg_loss
    };
    let eps = 1e-2;
    let dir = (&grad / norm).unwrap();
    let plus = total(&(&z + (&dir * eps).unwrap()).unwrap());
    let minus = total(&(&z - (&dir * eps).unwrap()).unwrap());
    let directional = (plus - minus) / (2.0 * eps);
    assert_rel("directional derivative along the gradient", directional, norm, 0.05);
}
