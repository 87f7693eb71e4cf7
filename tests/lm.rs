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

use common::f64s as vec1;

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

/// The project's own cases: Qwen2 (q/k/v biases, one KV head, tied embeddings, top-level
/// `rope_theta`), Mistral (explicit head_dim, sharded weights) and a Llama reward model.
#[test]
fn other_architectures_match_transformers() {
    use diffalign::lm::batch::Sequences;
    let root = common::own_fixtures().join("lm");
    for case in ["qwen2", "mistral", "llama_rm"] {
        let dir = root.join(case);
        let t = load(&dir.join("case.safetensors"));
        let meta = metadata(&dir.join("case.safetensors"));
        let seq = Sequences {
            input_ids: t["input_ids"].to_dtype(DType::U32).unwrap(),
            attention_mask: t["attention_mask"].to_dtype(DType::F32).unwrap(),
            completion_mask: t["completion_mask"].to_dtype(DType::F32).unwrap(),
        };
        let opts = LoadOptions {
            trainable: true,
            ..Default::default()
        };
        let (out, vb) = if case == "llama_rm" {
            let (rm, vb) = RewardModel::from_pretrained(&dir.join("model"), &opts).unwrap();
            let RewardOutput::Rewards(r) = rm.forward(&seq).unwrap() else {
                panic!("{case}: expected rewards")
            };
            assert_rel(&format!("{case} rewards"), &r, &t["rewards"], 1e-5);
            (r, vb)
        } else {
            let (lm, vb) = LlamaForCausalLM::from_pretrained(&dir.join("model"), &opts).unwrap();
            let logits = lm.forward(&seq.input_ids, Some(&seq.attention_mask)).unwrap();
            assert_rel(&format!("{case} logits"), &logits, &t["logits"], 1e-5);
            let (logp, _) = completion_logps(&lm, &seq).unwrap();
            assert_rel(&format!("{case} logp"), &logp, &t["logp"], 1e-5);
            (logp, vb)
        };
        let grads = out.sum_all().unwrap().backward().unwrap();
        let vars: HashMap<String, candle_core::Var> = vb.vars().into_iter().collect();
        let keys: Vec<String> = serde_json::from_str(&meta["grad_keys"]).unwrap();
        assert!(!keys.is_empty());
        for key in keys {
            let g = grads
                .get(vars[&key].as_tensor())
                .unwrap_or_else(|| panic!("{case}: no gradient for {key}"));
            assert_rel(&format!("{case} grad {key}"), g, &t[&format!("grad.{key}")], 1e-4);
        }
    }
}

#[test]
fn bad_lm_inputs_give_clear_errors() {
    let dir = lm_dir();
    let tmp = tempfile::tempdir().unwrap();
    // A batch without its rejected side names the missing tensor.
    let mut t = load(&dir.join("batch.safetensors"));
    t.retain(|k, _| k.ends_with("_w"));
    let path = tmp.path().join("half.safetensors");
    candle_core::safetensors::save(&t, &path).unwrap();
    let err = PairBatch::from_file(&path, &Device::Cpu).unwrap_err().to_string();
    assert!(err.contains("input_ids_l"), "{err}");
    // An unknown loss type lists the valid ones.
    let err = "dpo".parse::<LossType>().unwrap_err().to_string();
    assert!(err.contains("sigmoid") && err.contains("orpo"), "{err}");
    // A token id outside the vocabulary is named.
    let (policy, _) = load_policy(&dir.join("policy"), false);
    let ids = Tensor::new(&[[1u32, 999]], &Device::Cpu).unwrap();
    let err = policy.forward(&ids, None).unwrap_err().to_string();
    assert!(err.contains("999"), "{err}");
    // An unsupported RoPE type names the key.
    let cfg_dir = tmp.path().join("m");
    std::fs::create_dir_all(&cfg_dir).unwrap();
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("policy/config.json")).unwrap()).unwrap();
    cfg["rope_parameters"]["rope_type"] = "yarn".into();
    std::fs::write(cfg_dir.join("config.json"), cfg.to_string()).unwrap();
    let err = diffalign::models::llama::LlamaConfig::from_file(&cfg_dir.join("config.json"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("rope_type") && err.contains("yarn"), "{err}");
}

/// SimPO, ORPO, KTO and the metrics on hand-computed values (f64, independent formulas).
#[test]
fn kto_and_metrics_match_their_formulas() {
    use diffalign::preference::kto::Kto;
    let dev = Device::Cpu;
    let t = |v: &[f64]| Tensor::new(v, &dev).unwrap();
    let (lp, rlp) = ([-3.0, -5.0, -2.0, -4.0], [-3.5, -4.0, -2.5, -3.0]);
    let (kl, rkl) = ([-6.0, -7.0, -5.0, -8.0], [-6.5, -7.2, -5.1, -8.4]);
    let desirable = [true, false, true, false];
    let kto = Kto {
        beta: 0.5,
        desirable_weight: 1.0,
        undesirable_weight: 1.33,
    };
    let got = kto.loss(&t(&lp), &t(&rlp), &desirable, &t(&kl), &t(&rkl)).unwrap();
    let z = ((0..4).map(|i| kl[i] - rkl[i]).sum::<f64>() / 4.0).max(0.0);
    let sig = |x: f64| 1.0 / (1.0 + (-x).exp());
    let want = (0..4)
        .map(|i| {
            let rho = lp[i] - rlp[i];
            if desirable[i] {
                1.0 - sig(0.5 * (rho - z))
            } else {
                1.33 * (1.0 - sig(0.5 * (z - rho)))
            }
        })
        .sum::<f64>()
        / 4.0;
    assert!((got.to_scalar::<f64>().unwrap() - want).abs() < 1e-12, "kto");

    assert_eq!(
        metrics::reward_accuracy(&[1.0, 0.0, 2.0], &[0.0, 0.0, 3.0]).unwrap(),
        1.0 / 3.0
    );
    assert_eq!(
        metrics::ranking_accuracy(&[1.0, 0.0, 2.0], &[0.0, 0.0, 3.0]).unwrap(),
        2.0 / 3.0
    );
    let ideal = metrics::idealized_ranking_accuracy(&[-5.0, -2.0], &[-4.0, -3.0], &[0.9, 0.6], 1.0).unwrap();
    // Pair 1: -1 + ln 9 > 0; pair 2: 1 + ln 1.5 > 0.
    assert_eq!(ideal, 1.0);
    let ideal = metrics::idealized_ranking_accuracy(&[-5.0, -2.0], &[-4.0, -3.0], &[0.9, 0.6], 10.0).unwrap();
    // At beta 10 pair 1 gives -1 + ln(9) / 10 < 0.
    assert_eq!(ideal, 0.5);
    let (c, threshold) = metrics::flip_threshold(-5.0, -4.0, 0.1);
    assert_eq!(c, 1.0);
    assert!((threshold - (1.0 + (-0.1f64).exp()).ln()).abs() < 1e-12);
    // The quantile reference of the transform interpolates like numpy.
    assert_eq!(transform::quantile(&[1.0, 2.0, 3.0, 4.0], 0.5).unwrap(), 2.5);
}
