//! Language-model preference components against `../shared/fixtures/lm` (transformers + TRL
//! formulas) and the project's own cases in `tests/fixtures/lm`.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use common::{load, metadata, shared_fixtures};
use diffalign::lm::batch::PairBatch;
use diffalign::lm::completion_logps;
use diffalign::lm::reward_model::{RewardModel, RewardOutput};
use diffalign::models::llama::LlamaForCausalLM;
use diffalign::preference::heads::{bt_loss, gpm_probability, gpm_score_matrix};
use diffalign::preference::{metrics, transform, LossType, Objective, PairScores, LOSS_TYPES};
use diffalign::weights::LoadOptions;

fn lm_dir() -> PathBuf {
    shared_fixtures().join("lm")
}

fn vec1(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// Largest |got - want| over the reference's largest magnitude.
fn rel_err(got: &Tensor, want: &Tensor) -> f64 {
    let (g, w) = (vec1(got), vec1(want));
    assert_eq!(g.len(), w.len(), "sizes differ");
    let scale = w.iter().fold(0f64, |m, x| m.max(x.abs())).max(1e-12);
    g.iter().zip(&w).fold(0f64, |m, (a, b)| m.max((a - b).abs())) / scale
}

fn assert_rel(what: &str, got: &Tensor, want: &Tensor, tol: f64) {
    let e = rel_err(got, want);
    assert!(e <= tol, "{what}: relative error {e:e} > {tol:e}");
}

fn load_policy(dir: &Path, trainable: bool) -> (LlamaForCausalLM, diffalign::weights::VarBuilder) {
    let opts = LoadOptions {
        trainable,
        ..Default::default()
    };
    LlamaForCausalLM::from_pretrained(dir, &opts).unwrap()
}

fn fixture_loss(name: &str, beta: f64, eps: f64) -> Objective {
    let mut loss_type: LossType = name.parse().unwrap();
    if let LossType::Simpo { .. } = loss_type {
        loss_type = loss_type.with_simpo_gamma(0.5).unwrap();
    }
    Objective::Dpo {
        loss_type,
        beta,
        label_smoothing: eps,
    }
}

/// Every fixture loss's settings: beta 2 (ORPO's lambda 0.1), eps 0.1 for robust and exo_pair.
fn fixture_settings(name: &str) -> (f64, f64) {
    match name {
        "orpo" => (0.1, 0.0),
        "robust" | "exo_pair" => (2.0, 0.1),
        _ => (2.0, 0.0),
    }
}

#[test]
fn lm_logps_losses_and_gradients_match_the_fixture() {
    let dir = lm_dir();
    let expected = load(&dir.join("expected.safetensors"));
    let meta = metadata(&dir.join("expected.safetensors"));
    let batch = PairBatch::from_file(&dir.join("batch.safetensors"), &Device::Cpu).unwrap();
    let (policy, vb) = load_policy(&dir.join("policy"), true);
    let (reference, _) = load_policy(&dir.join("reference"), false);

    let (lw, nw) = completion_logps(&policy, &batch.chosen).unwrap();
    let (ll, nl) = completion_logps(&policy, &batch.rejected).unwrap();
    let (rw, _) = completion_logps(&reference, &batch.chosen).unwrap();
    let (rl, _) = completion_logps(&reference, &batch.rejected).unwrap();
    for (name, got) in [
        ("logp_w", &lw),
        ("logp_l", &ll),
        ("ref_logp_w", &rw),
        ("ref_logp_l", &rl),
        ("n_w", &nw),
        ("n_l", &nl),
    ] {
        assert_rel(name, got, &expected[name], 1e-5);
    }
    let rho_w: Vec<f64> = vec1(&lw).iter().zip(vec1(&rw)).map(|(a, b)| a - b).collect();
    let rho_l: Vec<f64> = vec1(&ll).iter().zip(vec1(&rl)).map(|(a, b)| a - b).collect();
    let acc = metrics::reward_accuracy(&rho_w, &rho_l).unwrap();
    assert!((acc - vec1(&expected["reward_accuracy"])[0]).abs() < 1e-6);
    let rank = metrics::ranking_accuracy(&vec1(&lw), &vec1(&ll)).unwrap();
    assert!((rank - vec1(&expected["ranking_accuracy"])[0]).abs() < 1e-6);

    let grad_keys: Vec<String> = serde_json::from_str(&meta["grad_keys"]).unwrap();
    let vars: HashMap<String, candle_core::Var> = vb.vars().into_iter().collect();
    for name in LOSS_TYPES.iter().filter(|n| **n != "aot_unpaired") {
        let (beta, eps) = fixture_settings(name);
        let objective = fixture_loss(name, beta, eps);
        let scores = PairScores {
            policy_w: lw.clone(),
            policy_l: ll.clone(),
            reference: objective.needs_reference().then(|| (rw.clone(), rl.clone())),
            weights: None,
            lengths: Some((nw.clone(), nl.clone())),
        };
        let out = objective.evaluate(&scores).unwrap();
        let want = &expected[&format!("loss.{name}")];
        assert_rel(&format!("loss.{name}"), &out.loss.reshape(1).unwrap(), want, 1e-5);
        let grads = out.loss.backward().unwrap();
        for key in &grad_keys {
            let g = grads
                .get(vars[key].as_tensor())
                .unwrap_or_else(|| panic!("{name}: no gradient for {key}"));
            assert_rel(
                &format!("grad.{name}.{key}"),
                g,
                &expected[&format!("grad.{name}.{key}")],
                1e-4,
            );
        }
    }
}

#[test]
fn every_lm_parameter_gets_a_gradient() {
    let dir = lm_dir();
    let batch = PairBatch::from_file(&dir.join("batch.safetensors"), &Device::Cpu).unwrap();
    let (policy, vb) = load_policy(&dir.join("policy"), true);
    let logits = policy
        .forward(&batch.chosen.input_ids, Some(&batch.chosen.attention_mask))
        .unwrap();
    common::assert_every_var_has_gradient(&logits, &vb);
}

#[test]
fn bt_reward_model_matches_the_fixture() {
    let dir = lm_dir();
    let expected = load(&dir.join("expected.safetensors"));
    let batch = PairBatch::from_file(&dir.join("batch.safetensors"), &Device::Cpu).unwrap();
    let opts = LoadOptions {
        trainable: true,
        ..Default::default()
    };
    let (rm, vb) = RewardModel::from_pretrained(&dir.join("reward_model"), &opts).unwrap();
    let reward = |s| match rm.forward(s).unwrap() {
        RewardOutput::Rewards(r) => r,
        other => panic!("expected rewards, got {other:?}"),
    };
    let (r_w, r_l) = (reward(&batch.chosen), reward(&batch.rejected));
    assert_rel("bt.reward_w", &r_w, &expected["bt.reward_w"], 1e-5);
    assert_rel("bt.reward_l", &r_l, &expected["bt.reward_l"], 1e-5);
    let loss = bt_loss(&r_w, &r_l, 1.0).unwrap();
    assert_rel("bt.loss", &loss.reshape(1).unwrap(), &expected["bt.loss"], 1e-5);
    let grads = loss.backward().unwrap();
    let score = vb.vars().into_iter().find(|(n, _)| n == "score.weight").unwrap().1;
    assert_rel(
        "bt.grad.score.weight",
        grads.get(score.as_tensor()).unwrap(),
        &expected["bt.grad.score.weight"],
        1e-4,
    );
}

#[test]
fn gpm_scores_and_reward_transform_match_the_fixture() {
    let dir = lm_dir();
    let expected = load(&dir.join("expected.safetensors"));
    let meta = metadata(&dir.join("expected.safetensors"));
    let tau: f64 = meta["gpm_tau"].parse().unwrap();
    let v = &expected["gpm.embeddings"];
    let gate = diffalign::nn::softmax(&expected["gpm.gate_logits"]).unwrap();
    let s = gpm_score_matrix(v, Some(&gate)).unwrap();
    assert_rel("gpm.scores", &s, &expected["gpm.scores"], 1e-5);
    assert_rel(
        "gpm.probs",
        &gpm_probability(&s, tau).unwrap(),
        &expected["gpm.probs"],
        1e-5,
    );

    let refs = vec1(&expected["transform.ref"]);
    let combined = transform::combine(&expected["transform.rewards"], &refs).unwrap();
    assert_rel("transform.combined", &combined, &expected["transform.combined"], 1e-5);
}
