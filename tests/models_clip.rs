//! CLIP text encoder: parity with transformers (shared sd15/turbo fixtures and our own cases from
//! `tests/fixtures/gen_clip.py`), gradients (every weight reached, finite differences in f64),
//! config and loading errors.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};
use common::{assert_close, device, load, load_on_device, own_fixtures, shared_fixtures, MODULE_ATOL};
use diffalign::models::clip::{
    is_known_buffer, pooled_positions, ClipPooling, ClipTextArchitecture, ClipTextConfig, ClipTextForwardOptions,
    ClipTextLayout, ClipTextModel, ClipTextOutput,
};
use diffalign::nn::Activation;
use diffalign::rng::Rng;
use diffalign::weights::{save_safetensors, TensorStore, VarBuilder};
use diffalign::Error;

/// A text encoder folder: `config.json` + `model.safetensors`, on the test device.
fn open(dir: &Path, dtype: DType, trainable: bool) -> (ClipTextConfig, VarBuilder) {
    let cfg = ClipTextConfig::from_file(dir.join("config.json")).unwrap();
    let store = TensorStore::open_file(&dir.join("model.safetensors")).unwrap();
    let vb = if trainable {
        VarBuilder::trainable_from_store(store, dtype, &device())
    } else {
        VarBuilder::from_store(store, dtype, &device())
    };
    (cfg, vb)
}

fn load_model(dir: &Path) -> ClipTextModel {
    let (cfg, vb) = open(dir, DType::F32, false);
    ClipTextModel::load(&cfg, vb).unwrap()
}

fn own_case(name: &str) -> PathBuf {
    own_fixtures().join("clip").join(name)
}

fn check_shared(case: &str, act: Activation) {
    let dir = shared_fixtures().join(case);
    let model = load_model(&dir.join("text_encoder"));
    assert_eq!(model.config().hidden_act, act);
    let r = load_on_device(&dir.join("reference.safetensors"));
    let out = model.forward(&r["text.input_ids"]).unwrap();
    assert_close(
        &format!("{case} last_hidden_state"),
        &out.last_hidden_state,
        &r["text.last_hidden_state"],
        MODULE_ATOL,
    );
    assert_close(
        &format!("{case} penultimate_hidden_state"),
        &out.penultimate_hidden_state,
        &r["text.penultimate_hidden_state"],
        MODULE_ATOL,
    );
    assert_close(
        &format!("{case} pooler_output"),
        &out.pooler_output,
        &r["text.pooler_output"],
        MODULE_ATOL,
    );
    assert!(out.text_embeds.is_none());
    assert!(out.hidden_states.is_none());
}

#[test]
fn clip_text_sd15_matches_transformers() {
    check_shared("sd15", Activation::QuickGelu);
}

#[test]
fn clip_text_turbo_matches_transformers() {
    check_shared("turbo", Activation::Gelu);
}

/// Compares every output of an own case, with all hidden states.
fn check_own(case: &str) -> ClipTextOutput {
    let dir = own_case(case);
    let model = load_model(&dir);
    let e = load_on_device(&dir.join("expected.safetensors"));
    let opts = ClipTextForwardOptions {
        output_hidden_states: true,
    };
    let out = model.forward_with(&e["input_ids"], &opts).unwrap();
    assert_close(
        &format!("{case} last_hidden_state"),
        &out.last_hidden_state,
        &e["last_hidden_state"],
        MODULE_ATOL,
    );
    assert_close(
        &format!("{case} penultimate_hidden_state"),
        &out.penultimate_hidden_state,
        &e["penultimate_hidden_state"],
        MODULE_ATOL,
    );
    assert_close(
        &format!("{case} pooler_output"),
        &out.pooler_output,
        &e["pooler_output"],
        MODULE_ATOL,
    );
    let hs = out.hidden_states.as_ref().unwrap();
    assert_eq!(hs.len(), model.config().num_hidden_layers + 1);
    for (i, h) in hs.iter().enumerate() {
        assert_close(
            &format!("{case} hidden_states.{i}"),
            h,
            &e[&format!("hidden_states.{i}")],
            MODULE_ATOL,
        );
    }
    match (&out.text_embeds, e.get("text_embeds")) {
        (Some(got), Some(want)) => assert_close(&format!("{case} text_embeds"), got, want, MODULE_ATOL),
        (None, None) => {}
        (got, want) => panic!(
            "{case}: text_embeds present: ours {}, transformers {}",
            got.is_some(),
            want.is_some()
        ),
    }
    // u32 ids give the same result as i64 ids.
    let ids_u32 = e["input_ids"].to_dtype(DType::U32).unwrap();
    let out32 = model.forward(&ids_u32).unwrap();
    assert_close(
        &format!("{case} u32 ids"),
        &out32.pooler_output,
        &e["pooler_output"],
        MODULE_ATOL,
    );
    out
}

#[test]
fn clip_text_with_projection_legacy_eos_matches_transformers() {
    let dir = own_case("with_projection_legacy_eos");
    let cfg = ClipTextConfig::from_file(dir.join("config.json")).unwrap();
    assert_eq!(cfg.architecture, ClipTextArchitecture::TextModelWithProjection);
    assert_eq!(cfg.pooling(), ClipPooling::ArgmaxId);
    assert_eq!(cfg.hidden_act, Activation::Gelu);
    let out = check_own("with_projection_legacy_eos");
    assert_eq!(out.text_embeds.unwrap().dims(), &[3, 24]);
}

#[test]
fn clip_text_quick_gelu_prefixed_matches_transformers() {
    let dir = own_case("quick_gelu_prefixed");
    let cfg = ClipTextConfig::from_file(dir.join("config.json")).unwrap();
    assert_eq!(cfg.architecture, ClipTextArchitecture::TextModel);
    assert_eq!(cfg.pooling(), ClipPooling::FirstEos(999));
    // The transformers 4 layout with its position_ids buffer (allowed by the audit).
    let store = TensorStore::open_file(&dir.join("model.safetensors")).unwrap();
    assert!(store.contains("text_model.embeddings.position_ids"));
    assert!(is_known_buffer("text_model.embeddings.position_ids"));
    check_own("quick_gelu_prefixed");
}

#[test]
fn clip_text_layout_detects_prefix() {
    let (_, vb) = open(&own_case("quick_gelu_prefixed"), DType::F32, false);
    assert_eq!(ClipTextLayout::detect(&vb).unwrap(), ClipTextLayout::Prefixed);
    let (_, vb) = open(&shared_fixtures().join("sd15/text_encoder"), DType::F32, false);
    assert_eq!(ClipTextLayout::detect(&vb).unwrap(), ClipTextLayout::Flat);
}

#[test]
fn clip_text_pooled_positions_follow_transformers_rules() {
    let ids = vec![vec![5, 9, 7, 9, 0], vec![1, 2, 3, 4, 4], vec![3, 3, 3, 3, 3]];
    assert_eq!(pooled_positions(&ids, ClipPooling::ArgmaxId), vec![1, 3, 0]);
    assert_eq!(pooled_positions(&ids, ClipPooling::FirstEos(4)), vec![0, 3, 0]);
    assert_eq!(pooled_positions(&ids, ClipPooling::FirstEos(9)), vec![1, 0, 0]);
}

/// `sum(last * r1) + sum(penultimate * r2) + sum(pooled * r3) + sum(text_embeds * r4)`, with
/// fixed random weights, in the model's dtype.
struct Probe {
    weights: Vec<Tensor>,
}

impl Probe {
    fn new(out: &ClipTextOutput, dtype: DType) -> Self {
        let mut rng = Rng::new(11);
        let mut shapes = vec![
            out.last_hidden_state.dims().to_vec(),
            out.penultimate_hidden_state.dims().to_vec(),
        ];
        shapes.push(out.pooler_output.dims().to_vec());
        if let Some(t) = &out.text_embeds {
            shapes.push(t.dims().to_vec());
        }
        let weights = shapes
            .into_iter()
            .map(|s| {
                rng.randn(s, out.last_hidden_state.device())
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap()
            })
            .collect();
        Probe { weights }
    }

    fn loss(&self, out: &ClipTextOutput) -> Tensor {
        let mut parts = vec![
            &out.last_hidden_state,
            &out.penultimate_hidden_state,
            &out.pooler_output,
        ];
        if let Some(t) = &out.text_embeds {
            parts.push(t);
        }
        assert_eq!(parts.len(), self.weights.len());
        let terms: Vec<Tensor> = parts
            .iter()
            .zip(&self.weights)
            .map(|(p, w)| (*p * w).unwrap().sum_all().unwrap())
            .collect();
        Tensor::stack(&terms, 0).unwrap().sum_all().unwrap()
    }
}

fn check_every_var_gets_gradient(dir: &Path, ids: &Tensor) {
    let (cfg, vb) = open(dir, DType::F32, true);
    let model = ClipTextModel::load(&cfg, vb.clone()).unwrap();
    let out = model.forward(ids).unwrap();
    let probe = Probe::new(&out, DType::F32);
    let grads = probe.loss(&out).backward().unwrap();
    let vars = vb.vars();
    let store_names = vb
        .store()
        .unwrap()
        .names()
        .into_iter()
        .filter(|n| !is_known_buffer(n))
        .count();
    assert_eq!(vars.len(), store_names, "every parameter of the file is a Var");
    let mut norms = HashMap::new();
    for (name, var) in &vars {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{name}: no gradient"));
        assert_eq!(g.dims(), var.as_tensor().dims(), "{name}");
        let norm = g.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(norm > 0.0 && norm.is_finite(), "{name}: gradient norm {norm}");
        norms.insert(name.clone(), norm);
    }
    // The key bias adds the same q.b to every score of a query row, which the softmax cancels: its
    // true gradient is zero and what autograd returns is rounding noise, far below the value bias's.
    for (name, norm) in &norms {
        if let Some(layer) = name.strip_suffix("self_attn.k_proj.bias") {
            let v = norms[&format!("{layer}self_attn.v_proj.bias")];
            assert!(*norm < 1e-3 * v, "{name}: gradient norm {norm}, v_proj.bias {v}");
        }
    }
}

#[test]
fn clip_text_grad_reaches_every_weight_with_projection() {
    let dir = own_case("with_projection_legacy_eos");
    let ids = load_on_device(&dir.join("expected.safetensors"))["input_ids"].clone();
    check_every_var_gets_gradient(&dir, &ids);
}

#[test]
fn clip_text_grad_reaches_every_weight_sd15() {
    let ids = load_on_device(&shared_fixtures().join("sd15/reference.safetensors"))["text.input_ids"].clone();
    check_every_var_gets_gradient(&shared_fixtures().join("sd15/text_encoder"), &ids);
}

/// Sets entry `index` (row-major) of `var` to `value`.
fn set_entry(var: &Var, index: usize, value: f64) {
    let t = var.as_tensor();
    let mut data = t.flatten_all().unwrap().to_vec1::<f64>().unwrap();
    data[index] = value;
    var.set(&Tensor::from_vec(data, t.dims(), t.device()).unwrap()).unwrap();
}

#[test]
fn clip_text_grad_matches_finite_differences_f64() {
    let dir = own_case("with_projection_legacy_eos");
    // A short prefix of the fixture's ids keeps the loss small (less rounding noise).
    let ids = load_on_device(&dir.join("expected.safetensors"))["input_ids"]
        .narrow(1, 0, 16)
        .unwrap();
    let (cfg, vb) = open(&dir, DType::F64, true);
    let model = ClipTextModel::load(&cfg, vb.clone()).unwrap();
    let out = model.forward(&ids).unwrap();
    let probe = Probe::new(&out, DType::F64);
    let grads = probe.loss(&out).backward().unwrap();
    let vars: HashMap<String, Var> = vb.vars().into_iter().collect();
    let token = ids.get(1).unwrap().get(2).unwrap().to_scalar::<i64>().unwrap() as usize;
    let d = cfg.hidden_size;
    let checks: Vec<(&str, usize)> = vec![
        ("text_model.embeddings.token_embedding.weight", token * d + 3),
        ("text_model.embeddings.position_embedding.weight", 2 * d + 5),
        ("text_model.encoder.layers.0.layer_norm1.weight", 3),
        ("text_model.encoder.layers.0.self_attn.q_proj.weight", 5 * d + 7),
        ("text_model.encoder.layers.1.self_attn.v_proj.bias", 4),
        ("text_model.encoder.layers.1.mlp.fc1.weight", 2 * d + 1),
        ("text_model.encoder.layers.2.layer_norm2.bias", 6),
        ("text_model.final_layer_norm.weight", 9),
        ("text_projection.weight", 4 * d + 2),
    ];
    // The shared layer norm and attention compute in f32 even for f64 inputs, so the loss carries
    // f32 rounding noise of about 1e-5: with a step of 1e-2 the errors measured were <= 5e-4
    // relative (1e-3 gives up to 1e-2, noise over 2h), well inside the tolerance, and a missing
    // or wrong gradient path would be off by O(1).
    let h = 1e-2;
    for (name, index) in checks {
        let var = &vars[name];
        let autograd = grads
            .get(var.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap()[index];
        let w = var.as_tensor().flatten_all().unwrap().to_vec1::<f64>().unwrap()[index];
        let f = |v: f64| {
            set_entry(var, index, v);
            probe.loss(&model.forward(&ids).unwrap()).to_scalar::<f64>().unwrap()
        };
        let fd = (f(w + h) - f(w - h)) / (2.0 * h);
        set_entry(var, index, w);
        let err = (fd - autograd).abs();
        eprintln!("{name}[{index}]: autograd {autograd:.6e}, finite difference {fd:.6e}, error {err:.2e}");
        assert!(
            err <= 2e-3 * autograd.abs().max(1.0),
            "{name}[{index}]: autograd {autograd}, finite difference {fd}, error {err}"
        );
        assert!(
            autograd.abs() > 1e-3,
            "{name}[{index}]: gradient too small to test ({autograd})"
        );
    }
}

/// Writes `model.safetensors` of `src` without `drop` and with `replace` to a temp folder; gives
/// (folder, weights path).
fn modified_copy(src: &Path, drop: Option<&str>, replace: Option<(&str, Tensor)>) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let mut tensors = load(&src.join("model.safetensors"));
    if let Some(name) = drop {
        assert!(tensors.remove(name).is_some(), "{name} not in the fixture");
    }
    if let Some((name, t)) = replace {
        tensors.insert(name.to_string(), t);
    }
    let path = tmp.path().join("model.safetensors");
    save_safetensors(&path, &tensors, None).unwrap();
    (tmp, path)
}

fn load_err(dir: &Path, weights: &Path) -> Error {
    let cfg = ClipTextConfig::from_file(dir.join("config.json")).unwrap();
    let vb = VarBuilder::from_store(TensorStore::open_file(weights).unwrap(), DType::F32, &Device::Cpu);
    ClipTextModel::load(&cfg, vb).unwrap_err()
}

#[test]
fn clip_text_missing_tensor_names_it_and_file() {
    let dir = own_case("quick_gelu_prefixed");
    let (_tmp, path) = modified_copy(&dir, Some("text_model.final_layer_norm.weight"), None);
    let err = load_err(&dir, &path);
    let msg = err.to_string();
    match err {
        Error::MissingTensor { file, name } => {
            assert_eq!(file, path);
            assert_eq!(name, "text_model.final_layer_norm.weight");
        }
        other => panic!("expected MissingTensor, got {other}"),
    }
    assert!(
        msg.contains("model.safetensors") && msg.contains("text_model.final_layer_norm.weight"),
        "{msg}"
    );
}

#[test]
fn clip_text_misshapen_tensor_names_it_and_file() {
    let dir = own_case("with_projection_legacy_eos");
    let bad = Tensor::zeros((24, 31), DType::F32, &Device::Cpu).unwrap();
    let (_tmp, path) = modified_copy(&dir, None, Some(("text_projection.weight", bad)));
    let err = load_err(&dir, &path);
    let msg = err.to_string();
    match err {
        Error::ShapeMismatch {
            file,
            name,
            expected,
            got,
        } => {
            assert_eq!(file, path);
            assert_eq!(name, "text_projection.weight");
            assert_eq!(expected, vec![24, 32]);
            assert_eq!(got, vec![24, 31]);
        }
        other => panic!("expected ShapeMismatch, got {other}"),
    }
    assert!(
        msg.contains("text_projection.weight") && msg.contains("[24, 31]"),
        "{msg}"
    );
}

#[test]
fn clip_text_unused_tensor_fails_audit() {
    // A projection in a checkpoint whose config says CLIPTextModel is an unused tensor, not
    // silently ignored.
    let dir = own_case("quick_gelu_prefixed");
    let extra = Tensor::zeros((16, 16), DType::F32, &Device::Cpu).unwrap();
    let (_tmp, path) = modified_copy(&dir, None, Some(("text_projection.weight", extra)));
    match load_err(&dir, &path) {
        Error::UnusedTensors { file, names } => {
            assert_eq!(file, path);
            assert_eq!(names, vec!["text_projection.weight".to_string()]);
        }
        other => panic!("expected UnusedTensors, got {other}"),
    }
}

#[test]
fn clip_text_layout_rejects_non_clip_checkpoint() {
    let dir = own_case("quick_gelu_prefixed");
    let (_tmp, path) = modified_copy(&dir, Some("text_model.embeddings.token_embedding.weight"), None);
    let msg = load_err(&dir, &path).to_string();
    assert!(
        msg.contains("model.safetensors") && msg.contains("embeddings.token_embedding.weight"),
        "{msg}"
    );
}

#[test]
fn clip_text_config_defaults_match_transformers() {
    let cfg = ClipTextConfig::from_json(
        "{\"unknown_thing\": 3, \"_name_or_path\": \"x\", \"dtype\": \"float32\"}",
        "c.json",
    )
    .unwrap();
    let want = ClipTextConfig {
        source: "c.json".into(),
        ..ClipTextConfig::default()
    };
    assert_eq!(cfg.vocab_size, 49408);
    assert_eq!(cfg.hidden_size, 512);
    assert_eq!(cfg.hidden_act, Activation::QuickGelu);
    assert_eq!(cfg.eos_token_id, 49407);
    assert_eq!(cfg.architecture, ClipTextArchitecture::TextModel);
    assert_eq!(cfg.unknown_keys(), vec!["unknown_thing".to_string()]);
    assert_eq!(
        ClipTextConfig {
            other: Default::default(),
            ..cfg
        },
        want
    );
}

#[test]
fn clip_text_config_errors_name_file_and_key() {
    let cases = [
        (
            "{\"hidden_size\": 30, \"num_attention_heads\": 4}",
            "num_attention_heads",
        ),
        ("{\"hidden_size\": \"big\"}", "hidden_size"),
        ("{\"hidden_act\": \"relu6\"}", "hidden_act"),
        ("{\"num_hidden_layers\": 0}", "num_hidden_layers"),
        ("{\"layer_norm_eps\": -1.0}", "layer_norm_eps"),
        ("{\"architectures\": [\"BertModel\"]}", "architectures"),
        ("{\"architectures\": [\"CLIPModel\"]}", "architectures"),
        ("[1, 2]", "(file)"),
    ];
    for (json, key) in cases {
        match ClipTextConfig::from_json(json, "te/config.json") {
            Err(Error::Config { file, key: k, reason }) => {
                assert_eq!(file, PathBuf::from("te/config.json"), "{json}");
                assert_eq!(k, key, "{json}: {reason}");
            }
            other => panic!("{json}: expected a config error on {key}, got {other:?}"),
        }
    }
    let missing = ClipTextConfig::from_file("/nonexistent/config.json").unwrap_err();
    assert!(missing.to_string().contains("/nonexistent/config.json"), "{missing}");
}

#[test]
fn clip_text_config_reads_clip_model_text_config() {
    let dir = shared_fixtures().join("turbo-reno/reward_clip");
    let cfg = ClipTextConfig::from_clip_model_file(dir.join("config.json")).unwrap();
    assert_eq!(cfg.architecture, ClipTextArchitecture::ClipModel);
    assert_eq!(
        cfg.projection_dim, 16,
        "the top-level projection_dim, not text_config's"
    );
    assert_eq!(cfg.hidden_size, 32);
    assert_eq!(cfg.hidden_act, Activation::Gelu);
    // The text half reads every text tensor; the rest belongs to the vision half.
    let store = TensorStore::open_file(&dir.join("model.safetensors")).unwrap();
    let vb = VarBuilder::from_store(store, DType::F32, &device());
    let model = ClipTextModel::new(&cfg, ClipTextLayout::Prefixed, vb.clone()).unwrap();
    let unused = vb.store().unwrap().unused();
    assert!(
        unused
            .iter()
            .all(|n| n.starts_with("vision_model.") || n == "logit_scale" || n == "visual_projection.weight"),
        "{unused:?}"
    );
    let ids = Tensor::new(&[[49406u32, 320, 736, 49407, 49407]], &device()).unwrap();
    let out = model.forward(&ids).unwrap();
    assert_eq!(out.text_embeds.unwrap().dims(), &[1, 16]);

    // text_config_dict overrides text_config, as in transformers.
    let json = r#"{"projection_dim": 8, "text_config": {"hidden_size": 16, "num_attention_heads": 2},
        "text_config_dict": {"hidden_size": 24}}"#;
    let cfg = ClipTextConfig::from_clip_model_json(json, "clip.json").unwrap();
    assert_eq!(
        (cfg.hidden_size, cfg.num_attention_heads, cfg.projection_dim),
        (24, 2, 8)
    );
}

#[test]
fn clip_text_rejects_bad_input_ids() {
    let model = load_model(&own_case("quick_gelu_prefixed"));
    let cases = [
        Tensor::new(&[[998i64, 1000, 999]], &device()).unwrap(),
        Tensor::new(&[[998i64, -1, 999]], &device()).unwrap(),
        Tensor::new(&[998u32, 3, 999], &device()).unwrap(),
        Tensor::zeros((1, 78), DType::U32, &device()).unwrap(),
        Tensor::zeros((1, 3), DType::F32, &device()).unwrap(),
    ];
    for ids in cases {
        match model.forward(&ids) {
            Err(Error::Input { what, .. }) => assert_eq!(what, "input_ids"),
            other => panic!("{ids}: expected an input error, got {:?}", other.map(|_| ())),
        }
    }
}
