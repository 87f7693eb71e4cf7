//! Image reward models: in-graph preprocessing against torch/torchvision, PickScore/CLIPScore on the
//! shared `turbo-reno` fixture (tensors, PNGs, token ids, ReNO's loss), HPSv2 and the aesthetic
//! predictor on tiny models from `tests/fixtures/gen_reward.py`, gradients (finite differences in
//! f64, every vision weight reached), errors and the `score` CLI.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};
use common::{
    assert_close, assert_every_var_has_gradient, device, load_on_device, load_options, metadata, own_fixtures,
    shared_fixtures,
};
use diffalign::models::clip::clip_model::{ClipModel, OpenClipConfig};
use diffalign::models::clip::vision_model::{ClipKeyLayout, ClipVisionConfig, ClipVisionModel};
use diffalign::reward::preprocess::{bicubic_aa_weights, resize_bicubic_aa, resize_shorter_and_center_crop};
use diffalign::reward::{load_reward, ClipPreprocess, ClipReward, ImageReward, RewardKind, RewardSpec};
use diffalign::sampling::image_io::load_image;
use diffalign::text::ClipTokenizer;
use diffalign::weights::{LoadOptions, TensorStore, VarBuilder};
use diffalign::Error;

/// Relative tolerance on reward scores against the Python reference.
const SCORE_RTOL: f64 = 1e-4;

fn reno_dir() -> PathBuf {
    shared_fixtures().join("turbo-reno")
}

fn reward_clip() -> PathBuf {
    reno_dir().join("reward_clip")
}

fn own_reward() -> PathBuf {
    own_fixtures().join("reward")
}

fn prompt() -> String {
    metadata(&reno_dir().join("expected.safetensors"))["prompt"].clone()
}

use common::f64s;

fn assert_scores(what: &str, got: &Tensor, want: &Tensor) {
    let (g, w) = (f64s(got), f64s(want));
    assert_eq!(g.len(), w.len(), "{what}: length");
    for (i, (g, w)) in g.iter().zip(&w).enumerate() {
        assert!(
            (g - w).abs() <= SCORE_RTOL * w.abs().max(1e-3),
            "{what}[{i}]: got {g}, want {w}"
        );
    }
}

fn f32_opts() -> LoadOptions {
    load_options()
}

fn load_pickscore() -> Box<dyn ImageReward> {
    load_reward(RewardKind::PickScore, &reward_clip(), &f32_opts()).unwrap()
}

/// `[H, W, 3]` image files as one `[N, 3, H, W]` batch.
fn png_batch(paths: &[PathBuf]) -> Tensor {
    let images: Vec<Tensor> = paths
        .iter()
        .map(|p| load_image(p).unwrap().permute((2, 0, 1)).unwrap())
        .collect();
    Tensor::stack(&images, 0).unwrap()
}

/// A temporary HPSv2 folder: the tiny open_clip model plus the shared CLIP BPE files.
fn hpsv2_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for name in ["open_clip_config.json", "open_clip_model.safetensors"] {
        std::fs::copy(own_reward().join("hpsv2").join(name), dir.path().join(name)).unwrap();
    }
    for name in ["vocab.json", "merges.txt", "tokenizer_config.json"] {
        std::fs::copy(reward_clip().join(name), dir.path().join(name)).unwrap();
    }
    dir
}

// ---------------------------------------------------------------------------------------------
// Preprocessing

#[test]
fn preprocess_resize_matches_torch_interpolate() {
    let r = load_on_device(&own_reward().join("resize.safetensors"));
    let mut n = 0;
    for (key, input) in &r {
        let Some(case) = key.strip_prefix("resize.").and_then(|k| k.strip_suffix(".input")) else {
            continue;
        };
        let want = &r[&format!("resize.{case}.output")];
        let (_, _, h, w) = want.dims4().unwrap();
        let got = resize_bicubic_aa(input, h, w).unwrap();
        assert_eq!(got.dtype(), input.dtype(), "{case}: dtype");
        let diff = (got.to_dtype(DType::F64).unwrap() - want.to_dtype(DType::F64).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        let tol = if input.dtype() == DType::F64 { 1e-12 } else { 2e-6 };
        assert!(diff <= tol, "resize {case}: max abs diff {diff} > {tol}");
        n += 1;
    }
    assert_eq!(n, 6, "resize cases");
}

#[test]
fn preprocess_crop_matches_torchvision_resize_center_crop() {
    let r = load_on_device(&own_reward().join("resize.safetensors"));
    let mut n = 0;
    for (key, input) in &r {
        let Some(case) = key.strip_prefix("crop.").and_then(|k| k.strip_suffix(".input")) else {
            continue;
        };
        let got = resize_shorter_and_center_crop(input, 32).unwrap();
        assert_close(&format!("crop {case}"), &got, &r[&format!("crop.{case}.output")], 2e-6);
        n += 1;
    }
    assert_eq!(n, 5, "crop cases");
}

#[test]
fn bicubic_weights_rows_sum_to_one_and_equal_sizes_are_identity() {
    for (from, to) in [(64, 32), (20, 32), (97, 14), (7, 50)] {
        let m = bicubic_aa_weights(from, to, false);
        for row in m.chunks(from) {
            let s: f64 = row.iter().sum();
            assert!((s - 1.0).abs() < 1e-12, "{from}->{to}: row sum {s}");
        }
    }
    let m = bicubic_aa_weights(9, 9, true);
    for i in 0..9 {
        for j in 0..9 {
            assert_eq!(m[i * 9 + j], if i == j { 1.0 } else { 0.0 });
        }
    }
}

#[test]
fn preprocess_normalises_with_preprocessor_config_and_rejects_non_rgb() {
    let pre = ClipPreprocess::from_preprocessor_config(&reward_clip().join("preprocessor_config.json"), 32).unwrap();
    assert_eq!(pre.image_size, 32);
    assert!((pre.image_mean[0] - 0.48145467042922974).abs() < 1e-12);
    let missing = ClipPreprocess::from_preprocessor_config(Path::new("/nonexistent/preprocessor_config.json"), 32);
    assert_eq!(missing.unwrap(), ClipPreprocess::new(32));
    let grey = Tensor::zeros((1, 3, 32, 32), DType::F32, &device()).unwrap();
    let out = pre.forward(&grey).unwrap();
    let want = -pre.image_mean[2] / pre.image_std[2];
    let got = f64s(&out.narrow(1, 2, 1).unwrap())[0];
    assert!((got - want).abs() < 1e-6, "normalised 0: got {got}, want {want}");
    let rgba = Tensor::zeros((1, 4, 32, 32), DType::F32, &device()).unwrap();
    let err = pre.forward(&rgba).unwrap_err().to_string();
    assert!(err.contains("3 channels"), "{err}");
    let hwc = Tensor::zeros((32, 32, 3), DType::F32, &device()).unwrap();
    let err = pre.forward(&hwc).unwrap_err().to_string();
    assert!(err.contains("[B, C, H, W]"), "{err}");
}

// ---------------------------------------------------------------------------------------------
// PickScore / CLIPScore on the shared fixture

#[test]
fn pickscore_scores_match_shared_fixture() {
    let e = load_on_device(&reno_dir().join("expected.safetensors"));
    let reward = load_pickscore();
    assert_eq!(reward.kind(), RewardKind::PickScore);
    let scores = reward.score(&e["reward.images"], &prompt()).unwrap();
    assert_eq!(scores.dims(), &[2]);
    assert_scores("reward.scores", &scores, &e["reward.scores"]);
}

#[test]
fn pickscore_input_ids_match_shared_fixture() {
    let e = load_on_device(&reno_dir().join("expected.safetensors"));
    let tok = ClipTokenizer::from_dir(&reward_clip()).unwrap();
    let ids = tok.encode_batch_tensor(&[prompt()], &Device::Cpu).unwrap();
    let want: Vec<i64> = e["reward.input_ids"].flatten_all().unwrap().to_vec1().unwrap();
    let got: Vec<i64> = f64s(&ids).into_iter().map(|v| v as i64).collect();
    assert_eq!(got, want);
}

#[test]
fn pickscore_png_scores_match_json() {
    let json: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(reno_dir().join("reward_image_scores.json")).unwrap()).unwrap();
    let paths: Vec<PathBuf> = json
        .iter()
        .map(|r| reno_dir().join(r["image"].as_str().unwrap()))
        .collect();
    let want: Vec<f32> = json.iter().map(|r| r["score"].as_f64().unwrap() as f32).collect();
    let reward = load_pickscore();
    let scores = reward
        .score(&png_batch(&paths), json[0]["prompt"].as_str().unwrap())
        .unwrap();
    assert_scores(
        "png scores",
        &scores,
        &Tensor::new(want.as_slice(), &Device::Cpu).unwrap(),
    );
}

#[test]
fn pickscore_non_square_image_matches_torchvision_pipeline() {
    let e = load_on_device(&own_reward().join("expected.safetensors"));
    let scores = load_pickscore().score(&e["pickscore.images"], &prompt()).unwrap();
    assert_scores("pickscore.scores", &scores, &e["pickscore.scores"]);
}

#[test]
fn pickscore_reno_iterations_score_and_loss_match_shared_fixture() {
    let e = load_on_device(&reno_dir().join("expected.safetensors"));
    let reward = load_pickscore();
    for i in 0..3 {
        let score = reward.score(&e[&format!("reno.iter{i}.image")], &prompt()).unwrap();
        assert_scores(
            &format!("reno.iter{i}.score"),
            &score,
            &e[&format!("reno.iter{i}.score")],
        );
        let loss = reward.loss(&score).unwrap();
        assert_scores(
            &format!("reno.iter{i}.reward_loss"),
            &loss,
            &e[&format!("reno.iter{i}.reward_loss")],
        );
    }
}

#[test]
fn clipscore_scores_like_pickscore_with_its_own_loss() {
    let e = load_on_device(&reno_dir().join("expected.safetensors"));
    let reward = load_reward(RewardKind::ClipScore, &reward_clip(), &f32_opts()).unwrap();
    assert_eq!(reward.kind(), RewardKind::ClipScore);
    let s = reward.score(&e["reward.images"], &prompt()).unwrap();
    assert_scores("clipscore", &s, &e["reward.scores"]);
    let loss = f64s(&reward.loss(&s).unwrap());
    for (l, s) in loss.iter().zip(f64s(&s)) {
        assert!((l - 0.01 * (100.0 - s)).abs() < 1e-4, "loss {l} for score {s}");
    }
}

#[test]
fn reno_loss_table_matches_reno_defaults() {
    let table: Vec<(RewardKind, f64, f64)> = RewardKind::ALL
        .iter()
        .map(|k| (*k, k.reno_loss().offset, k.reno_loss().weight))
        .collect();
    assert_eq!(
        table,
        vec![
            (RewardKind::PickScore, 30.0, 0.05),
            (RewardKind::ClipScore, 100.0, 0.01),
            (RewardKind::Hpsv2, 1.0, 5.0),
            (RewardKind::Aesthetic, 10.0, 0.0),
            (RewardKind::ImageReward, 2.0, 1.0),
            // Ours, not ReNO's: the head's logit, maximised.
            (RewardKind::PairHead, 0.0, 1.0),
        ]
    );
    let s = Tensor::new(&[0.25f32, 0.5], &device()).unwrap();
    assert_eq!(f64s(&RewardKind::Hpsv2.reno_loss().apply(&s).unwrap()), vec![3.75, 2.5]);
}

#[test]
fn pickscore_text_embedding_is_computed_once_per_prompt() {
    let reward = ClipReward::from_clip_model(RewardKind::PickScore, &reward_clip(), &f32_opts()).unwrap();
    let a = reward.text_embedding("a cat").unwrap();
    let b = reward.text_embedding("a cat").unwrap();
    assert_eq!(a.id(), b.id(), "second call should hit the cache");
    let c = reward.text_embedding("a dog").unwrap();
    assert_ne!(a.id(), c.id());
    let norm = f64s(&a.sqr().unwrap().sum_all().unwrap())[0];
    assert!((norm - 1.0).abs() < 1e-5, "text embedding norm^2 {norm}");
}

// ---------------------------------------------------------------------------------------------
// Gradients

#[test]
fn pickscore_image_gradient_matches_finite_differences_f64() {
    let opts = LoadOptions {
        dtype: DType::F64,
        ..load_options()
    };
    let reward = ClipReward::from_clip_model(RewardKind::PickScore, &reward_clip(), &opts).unwrap();
    let e = load_on_device(&reno_dir().join("expected.safetensors"));
    let image = e["reward.images"]
        .narrow(0, 0, 1)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap();
    let var = Var::from_tensor(&image).unwrap();
    let p = prompt();
    let score = |x: &Tensor| -> f64 { f64s(&reward.score(x, &p).unwrap().sum_all().unwrap())[0] };
    let out = reward.score(var.as_tensor(), &p).unwrap().sum_all().unwrap();
    let grads = out.backward().unwrap();
    let grad = grads.get(var.as_tensor()).expect("gradient on the image");
    let g = f64s(grad);
    assert!(g.iter().all(|v| v.is_finite()));
    let flat = f64s(&image);
    let eps = 1e-5;
    // Pixels spread over channels, rows and columns, corners included.
    for idx in [
        0usize,
        63,
        64 * 31 + 17,
        4096 + 64 * 5 + 40,
        2 * 4096 + 64 * 63 + 63,
        2 * 4096 + 64 * 20 + 2,
    ] {
        let mut plus = flat.clone();
        plus[idx] += eps;
        let mut minus = flat.clone();
        minus[idx] -= eps;
        let t = |v: Vec<f64>| Tensor::from_vec(v, (1, 3, 64, 64), &device()).unwrap();
        let fd = (score(&t(plus)) - score(&t(minus))) / (2.0 * eps);
        let tol = 1e-6 * (1.0 + fd.abs());
        assert!(
            (g[idx] - fd).abs() <= tol,
            "pixel {idx}: autograd {} vs finite difference {fd}",
            g[idx]
        );
    }
}

#[test]
fn clip_vision_every_parameter_gets_gradient_through_preprocessing() {
    let cfg = ClipVisionConfig::from_file(reward_clip().join("config.json")).unwrap();
    let store = TensorStore::open_file(&reward_clip().join("model.safetensors")).unwrap();
    let vb = VarBuilder::trainable_from_store(store, DType::F32, &device());
    let model = ClipVisionModel::new(&cfg, ClipKeyLayout::Transformers, vb.clone()).unwrap();
    assert!(vb
        .vars()
        .iter()
        .all(|(n, _)| n.starts_with("vision_model.") || n == "visual_projection.weight"));
    let e = load_on_device(&reno_dir().join("expected.safetensors"));
    let pixels = ClipPreprocess::new(cfg.image_size)
        .forward(&e["reward.images"])
        .unwrap();
    let out = model.forward(&pixels).unwrap();
    assert_every_var_has_gradient(&out.image_embeds, &vb);
}

// ---------------------------------------------------------------------------------------------
// HPSv2 (open_clip layout) and the aesthetic predictor, tiny models

#[test]
fn hpsv2_tiny_open_clip_matches_open_clip() {
    let dir = hpsv2_dir();
    let e = load_on_device(&own_reward().join("expected.safetensors"));
    let reward = ClipReward::from_open_clip(dir.path(), &f32_opts()).unwrap();
    assert_eq!(reward.kind(), RewardKind::Hpsv2);
    // preprocess_cfg of open_clip_config.json replaces CLIP's constants.
    assert_eq!(reward.preprocess().image_mean, [0.5; 3]);
    assert_eq!(reward.preprocess().image_std, [0.5; 3]);

    let model = reward.model();
    let text = model.get_text_features(&e["hpsv2.input_ids"]).unwrap();
    assert_close(
        "hpsv2 text features (open_clip ids)",
        &text,
        &e["hpsv2.text_features"],
        1e-5,
    );
    // Our tokenizer pads with the end-of-text id, open_clip with 0: the same features.
    let ids = reward.tokenizer().encode_batch_tensor(&[prompt()], &device()).unwrap();
    let text = model.get_text_features(&ids).unwrap();
    assert_close("hpsv2 text features (our ids)", &text, &e["hpsv2.text_features"], 1e-5);

    let pixels = reward.preprocess().forward(&e["hpsv2.images"]).unwrap();
    let image = model.get_image_features(&pixels).unwrap();
    assert_close("hpsv2 image features", &image, &e["hpsv2.image_features"], 1e-5);
    let scale = f64s(model.logit_scale())[0];
    assert!((scale - f64s(&e["hpsv2.logit_scale"])[0]).abs() < 1e-6);

    let via_trait = load_reward(RewardKind::Hpsv2, dir.path(), &f32_opts()).unwrap();
    let scores = via_trait.score(&e["hpsv2.images"], &prompt()).unwrap();
    assert_scores("hpsv2.scores", &scores, &e["hpsv2.scores"]);
    let loss = f64s(&via_trait.loss(&scores).unwrap());
    for (l, s) in loss.iter().zip(f64s(&scores)) {
        assert!((l - 5.0 * (1.0 - s)).abs() < 1e-5);
    }
}

#[test]
fn hpsv2_open_clip_weights_all_get_gradient() {
    let dir = hpsv2_dir();
    let cfg = OpenClipConfig::from_file(dir.path().join("open_clip_config.json")).unwrap();
    let store = TensorStore::open_file(&dir.path().join("open_clip_model.safetensors")).unwrap();
    let vb = VarBuilder::trainable_from_store(store, DType::F32, &device());
    let model = ClipVisionModel::new(&cfg.vision_config(), ClipKeyLayout::OpenClip, vb.clone()).unwrap();
    let e = load_on_device(&own_reward().join("expected.safetensors"));
    let pixels = ClipPreprocess::new(32).forward(&e["hpsv2.images"]).unwrap();
    assert_every_var_has_gradient(&model.forward(&pixels).unwrap().image_embeds, &vb);
}

#[test]
fn aesthetic_tiny_predictor_matches_reference() {
    let e = load_on_device(&own_reward().join("expected.safetensors"));
    let dir = own_reward().join("aesthetic");
    let reward = load_reward(RewardKind::Aesthetic, &dir, &f32_opts()).unwrap();
    assert_eq!(reward.kind(), RewardKind::Aesthetic);
    let scores = reward.score(&e["aesthetic.images"], "ignored").unwrap();
    assert_scores("aesthetic.scores", &scores, &e["aesthetic.scores"]);

    // The CLIPVisionModelWithProjection folder (quick_gelu, transformers 4 position_ids buffer).
    let (vision, _) = ClipVisionModel::from_pretrained(&dir.join("clip"), &f32_opts()).unwrap();
    let pixels = ClipPreprocess::new(28).forward(&e["aesthetic.images"]).unwrap();
    let out = vision.forward(&pixels).unwrap();
    assert_close(
        "aesthetic.image_embeds",
        &out.image_embeds,
        &e["aesthetic.image_embeds"],
        1e-5,
    );
    assert_close(
        "aesthetic.last_hidden_state",
        &out.last_hidden_state,
        &e["aesthetic.last_hidden_state"],
        1e-5,
    );
}

#[test]
fn aesthetic_uses_only_the_image_tower_of_a_clip_model() {
    let dir = tempfile::tempdir().unwrap();
    let clip = dir.path().join("clip");
    std::fs::create_dir(&clip).unwrap();
    for name in ["config.json", "model.safetensors"] {
        std::fs::copy(reward_clip().join(name), clip.join(name)).unwrap();
    }
    // The tiny predictor expects 12 inputs; the shared CLIPModel projects to 16.
    std::fs::copy(
        own_reward().join("aesthetic/aesthetic.safetensors"),
        dir.path().join("aesthetic.safetensors"),
    )
    .unwrap();
    let err = load_reward(RewardKind::Aesthetic, dir.path(), &f32_opts())
        .err()
        .unwrap();
    assert!(
        matches!(&err, Error::ShapeMismatch { name, expected, got, .. }
            if name == "layers.0.weight" && expected == &vec![32, 16] && got == &vec![32, 12]),
        "{err}"
    );
}

#[test]
fn clip_model_loads_every_tensor_of_the_shared_checkpoint() {
    let (model, vb) = ClipModel::from_pretrained(&reward_clip(), &f32_opts()).unwrap();
    assert!(vb.store().unwrap().unused().is_empty());
    let e = load_on_device(&reno_dir().join("expected.safetensors"));
    let text = model.get_text_features(&e["reward.input_ids"]).unwrap();
    assert_eq!(text.dims(), &[1, 16]);
}

// ---------------------------------------------------------------------------------------------
// Errors

#[test]
fn reward_kind_unknown_lists_kinds() {
    for k in RewardKind::ALL {
        assert_eq!(k.name().parse::<RewardKind>().unwrap(), k);
    }
    assert_eq!("PickScore".parse::<RewardKind>().unwrap(), RewardKind::PickScore);
    let err = "hps".parse::<RewardKind>().unwrap_err().to_string();
    assert!(
        err.contains("\"hps\"") && err.contains("pickscore, clipscore, hpsv2, aesthetic, imagereward"),
        "{err}"
    );
}

#[test]
fn reward_spec_parses_kind_equals_path() {
    let spec: RewardSpec = "hpsv2=/models/hps".parse().unwrap();
    assert_eq!(spec.kind, RewardKind::Hpsv2);
    assert_eq!(spec.path, PathBuf::from("/models/hps"));
    let err = "pickscore".parse::<RewardSpec>().unwrap_err().to_string();
    assert!(err.contains("KIND=PATH"), "{err}");
    let err = "pickscore=".parse::<RewardSpec>().unwrap_err().to_string();
    assert!(err.contains("empty checkpoint path"), "{err}");
    let err = "pick=/x".parse::<RewardSpec>().unwrap_err().to_string();
    assert!(err.contains("unknown reward kind"), "{err}");
}

#[test]
fn load_reward_errors_name_what_is_missing() {
    let opts = f32_opts();
    let err = load_reward(RewardKind::PickScore, Path::new("/nonexistent/pick"), &opts)
        .err()
        .unwrap();
    assert!(matches!(err, Error::MissingFile { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("/nonexistent/pick: pickscore reward model folder not found"),
        "{err}"
    );

    let err = load_reward(RewardKind::ImageReward, Path::new("/x"), &opts)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("/x: imagereward reward model folder not found"), "{err}");

    let empty = tempfile::tempdir().unwrap();
    let err = load_reward(RewardKind::Aesthetic, empty.path(), &opts)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("clip") && err.contains("not found"), "{err}");
    let err = load_reward(RewardKind::Hpsv2, empty.path(), &opts)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("open_clip_config.json"), "{err}");
    let err = load_reward(RewardKind::ClipScore, empty.path(), &opts)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("config.json"), "{err}");
}

#[test]
fn clip_vision_rejects_wrong_image_size() {
    let (vision, _) = ClipVisionModel::from_pretrained(&reward_clip(), &f32_opts()).unwrap();
    let x = Tensor::zeros((1, 3, 30, 30), DType::F32, &device()).unwrap();
    let err = vision.forward(&x).unwrap_err().to_string();
    assert!(
        err.contains("pixel_values") && err.contains("image_size 32") && err.contains("[1, 3, 30, 30]"),
        "{err}"
    );
}

#[test]
fn open_clip_config_rejects_unsupported_architectures() {
    let base = serde_json::json!({
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 8, "patch_size": 8},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 8, "heads": 2, "layers": 2}
    });
    let parse =
        |v: &serde_json::Value| OpenClipConfig::from_object(v.as_object().unwrap().clone(), Path::new("c.json"));
    let cfg = parse(&base).unwrap();
    assert_eq!(cfg.vision_config().num_attention_heads, 4);
    assert_eq!(cfg.vision_config().intermediate_size, 128);
    assert!(cfg.image_mean.is_none());

    let mut v = base.clone();
    v["vision_cfg"]["ls_init_value"] = serde_json::json!(1e-5);
    let err = parse(&v).unwrap_err().to_string();
    assert!(
        err.contains("c.json: vision_cfg.ls_init_value: only the standard CLIP architecture"),
        "{err}"
    );
    let mut v = base.clone();
    v["text_cfg"]["hf_model_name"] = serde_json::json!("xlm-roberta-large");
    assert!(parse(&v).unwrap_err().to_string().contains("text_cfg.hf_model_name"));
    let mut v = base.clone();
    v["vision_cfg"]["head_width"] = serde_json::json!(5);
    assert!(parse(&v)
        .unwrap_err()
        .to_string()
        .contains("vision_cfg.head_width: must divide"));
    let mut v = base;
    v["vision_cfg"]["surprise"] = serde_json::json!(1);
    assert_eq!(
        parse(&v).unwrap().unknown_keys(),
        vec!["vision_cfg.surprise".to_string()]
    );
}

// ---------------------------------------------------------------------------------------------
// CLI

fn diffalign(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_diffalign"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn score_cli_prints_one_json_line_per_image() {
    let json: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(reno_dir().join("reward_image_scores.json")).unwrap()).unwrap();
    let hps = hpsv2_dir();
    let clip = reward_clip();
    let images: Vec<String> = json
        .iter()
        .map(|r| reno_dir().join(r["image"].as_str().unwrap()).display().to_string())
        .collect();
    let pick = format!("pickscore={}", clip.display());
    let clipscore = format!("clipscore={}", clip.display());
    let hpsv2 = format!("hpsv2={}", hps.path().display());
    let p = prompt();
    let mut args = vec![
        "score", "--reward", &pick, "--reward", &clipscore, "--reward", &hpsv2, "--prompt", &p,
    ];
    args.extend(images.iter().map(String::as_str));
    let out = diffalign(&args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let lines: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    for (line, want) in lines.iter().zip(&json) {
        assert!(line["image"]
            .as_str()
            .unwrap()
            .ends_with(want["image"].as_str().unwrap()));
        let scores: HashMap<String, f64> = serde_json::from_value(line["scores"].clone()).unwrap();
        assert_eq!(scores.len(), 3);
        let w = want["score"].as_f64().unwrap();
        for kind in ["pickscore", "clipscore"] {
            assert!(
                (scores[kind] - w).abs() <= SCORE_RTOL * w.abs(),
                "{kind}: {} vs {w}",
                scores[kind]
            );
        }
        assert!(scores["hpsv2"].abs() <= 1.0);
    }
}

#[test]
fn score_cli_reports_bad_arguments() {
    let png = reno_dir().join("reward_image_0.png").display().to_string();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (vec!["--reward".into(), "pickscore".into()], "KIND=PATH"),
        (vec!["--reward".into(), "nope=/x".into()], "unknown reward kind"),
        (
            vec!["--reward".into(), "pickscore=/nonexistent/pick".into()],
            "pickscore reward model folder not found",
        ),
        (
            vec![
                "--reward".into(),
                format!("pickscore={}", reward_clip().display()),
                "--reward".into(),
                format!("pickscore={}", reward_clip().display()),
            ],
            "given twice",
        ),
    ];
    for (mut reward_args, want) in cases {
        let mut args: Vec<String> = vec!["score".into()];
        args.append(&mut reward_args);
        args.extend(["--prompt".into(), "x".into(), png.clone()]);
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = diffalign(&refs);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} should fail");
        assert!(stderr.contains(want), "{args:?}: {stderr}");
    }
    let out = diffalign(&[
        "score",
        "--reward",
        &format!("pickscore={}", reward_clip().display()),
        "--prompt",
        "x",
        "/nonexistent.png",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent.png"));
}

// ---------------------------------------------------------------------------------------------
// The pair head (`tests/fixtures/gen_pair_head.py`)

#[test]
fn pair_head_scores_and_image_gradients_match_transformers() {
    use diffalign::reward::PairHeadReward;
    let e = load_on_device(&own_reward().join("pair_head.safetensors"));
    let dir = tempfile::tempdir().unwrap();
    let clip = dir.path().join("clip");
    std::fs::create_dir_all(&clip).unwrap();
    for entry in std::fs::read_dir(own_reward().join("aesthetic").join("clip")).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, clip.join(path.file_name().unwrap())).unwrap();
    }
    PairHeadReward::save_head(&e["score.weight"], &e["score.bias"], dir.path()).unwrap();
    let reward = load_reward(RewardKind::PairHead, dir.path(), &f32_opts()).unwrap();
    assert_eq!(reward.kind(), RewardKind::PairHead);

    let images = Var::from_tensor(&e["score.images"]).unwrap();
    let scores = reward.score(images.as_tensor(), "ignored").unwrap();
    assert_scores("score.scores", &scores, &e["score.scores"]);
    let grads = scores.sum_all().unwrap().backward().unwrap();
    let grad = grads.get(images.as_tensor()).expect("the images get a gradient");
    assert_close("score.image_grad", grad, &e["score.image_grad"], 1e-4);

    // A head of the wrong width is named in the error.
    let wrong = Tensor::zeros((1, 10), DType::F32, &Device::Cpu).unwrap();
    PairHeadReward::save_head(&wrong, &e["score.bias"], dir.path()).unwrap();
    let err = load_reward(RewardKind::PairHead, dir.path(), &f32_opts())
        .err()
        .expect("wrong width fails");
    assert!(err.to_string().contains("weight"), "{err}");
}

#[test]
fn pair_head_fit_matches_torch_adam() {
    use diffalign::reward::pair_head::{fit_pair_head, PairHeadFit};
    let e = load_on_device(&own_reward().join("pair_head.safetensors"));
    let soft: Vec<f64> = f64s(&e["fit.soft"]);
    let fit = PairHeadFit {
        steps: 300,
        lr: 0.01,
        l2: 0.1,
    };
    let (weight, bias) = fit_pair_head(&e["fit.f_w"], &e["fit.f_l"], &soft, &fit).unwrap();
    assert_close("fit.weight", &weight, &e["fit.weight"], 1e-4);
    assert_close("fit.bias", &bias, &e["fit.bias"], 1e-4);
    // Mismatched labels are an error, not a panic.
    assert!(fit_pair_head(&e["fit.f_w"], &e["fit.f_l"], &soft[..3], &fit).is_err());
}
