//! ReNO: three iterations on the shared `turbo-reno` fixture (scores, losses, gradient on the
//! noise, the noise after each step), the optimiser and regulariser on their own, and the `reno`
//! CLI (its iterations.jsonl against the fixture, and bad input).

mod common;

use std::path::PathBuf;
use std::process::Command;

use candle_core::{DType, Device, Tensor};
use common::{load, max_abs_diff, metadata, shared_fixtures};
use diffalign::reno::{noise_regularizer, IterationRecord, IterationTensors, Reno, RenoConfig, Sampler, WeightedReward};
use diffalign::reward::{load_reward, RewardKind};
use diffalign::sampling::pipeline::{PipelineSources, StableDiffusionPipeline};
use diffalign::train::optim::Sgd;
use diffalign::weights::LoadOptions;

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

fn expected() -> std::collections::HashMap<String, Tensor> {
    load(&reno_dir().join("expected.safetensors"))
}

fn prompt() -> String {
    metadata(&reno_dir().join("expected.safetensors"))["prompt"].clone()
}

fn scalar(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap()[0]
}

fn assert_rel(what: &str, got: f64, want: f64, rtol: f64) {
    assert!(
        (got - want).abs() <= rtol * want.abs().max(1e-3),
        "{what}: got {got}, want {want}"
    );
}

/// `|a − b| / |b|` over the whole tensor.
fn rel_norm_diff(a: &Tensor, b: &Tensor) -> f32 {
    let d = (a - b).unwrap().sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap().sqrt();
    let n = b.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap().sqrt();
    d / n.max(1e-12)
}

fn turbo_pipeline() -> StableDiffusionPipeline {
    let sources = PipelineSources {
        root: turbo_dir(),
        ..Default::default()
    };
    StableDiffusionPipeline::load(&sources, &LoadOptions::default()).unwrap()
}

fn pickscore() -> Vec<WeightedReward> {
    let reward = load_reward(RewardKind::PickScore, &reno_dir().join("reward_clip"), &LoadOptions::default()).unwrap();
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
    assert!(seen[3].1.grad.is_none() && seen[3].1.next_noise.is_none(), "the last iteration only evaluates");
    for (i, (record, tensors)) in seen.iter().take(3).enumerate() {
        let key = |name: &str| format!("reno.iter{i}.{name}");
        assert_eq!(record.iter, i);
        assert_eq!(record.scores[0].0, RewardKind::PickScore);
        assert_rel(&key("score"), record.scores[0].1, scalar(&e[&key("score")]), LOSS_RTOL);
        assert_rel(&key("reward_loss"), record.reward_loss, scalar(&e[&key("reward_loss")]), LOSS_RTOL);
        assert_rel(&key("reg_loss"), record.reg_loss, scalar(&e[&key("reg_loss")]), LOSS_RTOL);
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
    let cond = pipe
        .conditioning(&[prompt()], None, 1.0, (64, 64), None)
        .unwrap();
    let default = Reno::new(&pipe, &rewards, Sampler::Scheduler { kind: None, steps: 1 }, RenoConfig::default(), 0).unwrap();
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
    let dev = Device::Cpu;
    let values: Vec<f64> = (0..24).map(|i| ((i * 37 % 11) as f64 - 5.0) / 3.0).collect();
    let z = Tensor::from_vec(values.clone(), (1, 2, 3, 4), &dev).unwrap();
    let got = scalar(&noise_regularizer(&z, 0.01).unwrap());
    let sq: f64 = values.iter().map(|v| v * v).sum();
    let want = 0.01 * (0.5 * sq - 23.0 * sq.sqrt().ln());
    assert_rel("regulariser", got, want, 1e-6);
}

#[test]
fn sgd_nesterov_matches_torch_update_rule() {
    // torch.optim.SGD(momentum=0.9, nesterov=True): b1 = g1, p1 = p0 − lr(g1 + m·b1);
    // b2 = m·b1 + g2, p2 = p1 − lr(g2 + m·b2).
    let dev = Device::Cpu;
    let p0 = Tensor::new(&[1.0f64, -2.0], &dev).unwrap();
    let (g1, g2) = (
        Tensor::new(&[0.5f64, 0.25], &dev).unwrap(),
        Tensor::new(&[-1.0f64, 2.0], &dev).unwrap(),
    );
    let mut sgd = Sgd::new(0.1, 0.9, true);
    let p1 = sgd.step(&p0, &g1).unwrap();
    let p2 = sgd.step(&p1, &g2).unwrap();
    let p1_want = [1.0 - 0.1 * (0.5 + 0.9 * 0.5), -2.0 - 0.1 * (0.25 + 0.9 * 0.25)];
    let b2 = [0.9 * 0.5 - 1.0, 0.9 * 0.25 + 2.0];
    let p2_want = [p1_want[0] - 0.1 * (-1.0 + 0.9 * b2[0]), p1_want[1] - 0.1 * (2.0 + 0.9 * b2[1])];
    for (got, want) in [(p1, p1_want), (p2, p2_want)] {
        let got = got.to_vec1::<f64>().unwrap();
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-12, "got {got:?}, want {want:?}");
        }
    }
}

#[test]
fn reno_rejects_bad_settings() {
    let pipe = turbo_pipeline();
    let rewards = pickscore();
    let sampler = Sampler::Scheduler { kind: None, steps: 1 };
    let bad = [
        (RenoConfig { iters: 0, ..RenoConfig::default() }, "iters"),
        (RenoConfig { lr: f64::NAN, ..RenoConfig::default() }, "lr"),
        (RenoConfig { grad_clip: Some(0.0), ..RenoConfig::default() }, "grad clip"),
    ];
    for (config, what) in bad {
        let err = Reno::new(&pipe, &rewards, sampler, config, 0).err().unwrap().to_string();
        assert!(err.contains(what), "{what}: {err}");
    }
    let err = Reno::new(&pipe, &[], sampler, RenoConfig::default(), 0).err().unwrap().to_string();
    assert!(err.contains("reward"), "{err}");
    let reno = Reno::new(&pipe, &rewards, sampler, RenoConfig::default(), 0).unwrap();
    let wrong = Tensor::zeros((1, 3, 16, 16), DType::F32, &Device::Cpu).unwrap();
    let err = reno.run(&prompt(), &wrong, &mut |_, _| Ok(())).err().unwrap().to_string();
    assert!(err.contains("channels"), "{err}");
}
