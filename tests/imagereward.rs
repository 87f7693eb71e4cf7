//! ImageReward against the `image-reward` package on the tiny BLIP of
//! `tests/fixtures/gen_imagereward.py`: scores and image gradients (to the raw image and to the
//! preprocessed pixels), the WordPiece tokenizer against transformers' `BertTokenizer` with BLIP's
//! added tokens, the official `ImageReward.pt` layout through the restricted unpickler and its
//! safetensors conversion, load errors, and `score --reward imagereward=DIR`.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};
use common::{device, load, load_options, metadata, own_fixtures};
use diffalign::reward::{load_reward, ImageReward, ImageRewardModel, RewardKind};
use diffalign::sampling::image_io::load_image;
use diffalign::text::BertTokenizer;
use diffalign::weights::{save_safetensors, WeightFile};

/// Relative tolerance on scores and gradients against the package (the 1e-4).
const RTOL: f64 = 1e-4;
/// Prompts whose gradients the generator recorded (`GRAD_PROMPTS`).
const GRAD_PROMPTS: [usize; 2] = [0, 2];

fn dir() -> PathBuf {
    own_fixtures().join("imagereward")
}

fn reference() -> HashMap<String, Tensor> {
    load(&dir().join("reference.safetensors"))
}

/// Every prompt of the reference (tokenised), and how many of them are scored.
fn prompts() -> (Vec<String>, usize) {
    let meta = metadata(&dir().join("reference.safetensors"));
    let prompts: Vec<String> = serde_json::from_str(&meta["prompts"]).unwrap();
    (prompts, meta["scored_prompts"].parse().unwrap())
}

fn image(j: usize) -> Tensor {
    load_image(&dir().join(format!("img{j}.png")))
        .unwrap()
        .permute((2, 0, 1))
        .unwrap()
        .unsqueeze(0)
        .unwrap()
        .to_device(&device())
        .unwrap()
}

fn model() -> ImageRewardModel {
    ImageRewardModel::load(&dir(), &load_options()).unwrap()
}

fn values(t: &Tensor) -> Vec<f64> {
    t.to_device(&Device::Cpu)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// `|got - want| <= RTOL * max|want|` elementwise.
fn assert_rel_close(what: &str, got: &Tensor, want: &Tensor) {
    assert_eq!(got.dims(), want.dims(), "{what}: shape");
    let (g, w) = (values(got), values(want));
    let scale = w.iter().fold(0.0f64, |m, x| m.max(x.abs()));
    assert!(scale > 0.0, "{what}: the reference is all zeros");
    for (i, (g, w)) in g.iter().zip(&w).enumerate() {
        assert!(
            (g - w).abs() <= RTOL * scale,
            "{what}[{i}]: got {g}, want {w} (scale {scale})"
        );
    }
}

#[test]
fn imagereward_scores_match_package() {
    let reward = load_reward(RewardKind::ImageReward, &dir(), &load_options()).unwrap();
    assert_eq!(reward.kind(), RewardKind::ImageReward);
    let reference = reference();
    let (prompts, scored) = prompts();
    for (i, prompt) in prompts.iter().take(scored).enumerate() {
        for j in 0..2 {
            let got = reward.score(&image(j), prompt).unwrap();
            assert_rel_close(
                &format!("score.{i}.img{j}"),
                &got,
                &reference[&format!("score.{i}.img{j}")],
            );
        }
    }
}

#[test]
fn imagereward_image_gradients_match_package() {
    let model = model();
    let reference = reference();
    let (prompts, _) = prompts();
    for i in GRAD_PROMPTS {
        for j in 0..2 {
            let raw = Var::from_tensor(&image(j)).unwrap();
            let pixels = Var::from_tensor(&model.preprocess().forward(raw.as_tensor()).unwrap()).unwrap();
            // Through the preprocessing: d score / d image in [0, 1].
            let grads = model
                .score(raw.as_tensor(), &prompts[i])
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let g_raw = grads.get(raw.as_tensor()).unwrap();
            let key = format!("grad.{i}.img{j}");
            match j {
                0 => assert_rel_close(&format!("{key}.raw"), g_raw, &reference[&format!("{key}.raw")]),
                _ => assert_rel_close(
                    &format!("{key}.raw_rows"),
                    &g_raw.narrow(2, 100, 16).unwrap(),
                    &reference[&format!("{key}.raw_rows")],
                ),
            }
            // To the preprocessed pixels (the package's `score_gard` input).
            let grads = model
                .score_pixels(pixels.as_tensor(), &prompts[i])
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let g = grads.get(pixels.as_tensor()).unwrap();
            assert_rel_close(
                &format!("{key}.pixel_rows"),
                &g.narrow(2, 96, 16).unwrap(),
                &reference[&format!("{key}.pixel_rows")],
            );
            let sum = g.sum_all().unwrap().reshape(1).unwrap();
            let sq = g.sqr().unwrap().sum_all().unwrap().reshape(1).unwrap();
            let want_sq = values(&reference[&format!("{key}.pixel_sq")])[0];
            assert!((values(&sq)[0] - want_sq).abs() <= RTOL * want_sq, "{key}.pixel_sq");
            // The sum cancels: compare it on the scale of the gradient's L1 size instead.
            let want_sum = values(&reference[&format!("{key}.pixel_sum")])[0];
            let l1 = values(&g.abs().unwrap().sum_all().unwrap())[0];
            assert!((values(&sum)[0] - want_sum).abs() <= RTOL * l1, "{key}.pixel_sum");
        }
    }
}

#[test]
fn imagereward_batch_scores_equal_single_scores() {
    let model = model();
    let img = image(1).contiguous().unwrap();
    let batch = Tensor::cat(&[&img, &img.flip(&[3]).unwrap()], 0).unwrap();
    let (prompts, _) = prompts();
    let both = values(&model.score(&batch, &prompts[1]).unwrap());
    let first = values(&model.score(&img, &prompts[1]).unwrap());
    assert!(
        (both[0] - first[0]).abs() <= 1e-6 * first[0].abs(),
        "{both:?} vs {first:?}"
    );
    assert!(
        (both[0] - both[1]).abs() > 1e-6,
        "a flipped image should score differently: {both:?}"
    );
}

#[test]
fn wordpiece_ids_match_transformers_bert_tokenizer() {
    let tok = BertTokenizer::from_vocab(&dir().join("vocab.txt"), 35).unwrap();
    let reference = reference();
    let (prompts, _) = prompts();
    assert!(prompts.len() >= 10);
    for (i, prompt) in prompts.iter().enumerate() {
        let enc = tok.encode(prompt).unwrap();
        let ids: Vec<i64> = reference[&format!("tokens.{i}.input_ids")].to_vec1().unwrap();
        let mask: Vec<i64> = reference[&format!("tokens.{i}.attention_mask")].to_vec1().unwrap();
        let got_ids: Vec<i64> = enc.input_ids.iter().map(|&x| x as i64).collect();
        let got_mask: Vec<i64> = enc.attention_mask.iter().map(|&x| x as i64).collect();
        assert_eq!(got_ids, ids, "{prompt:?}");
        assert_eq!(got_mask, mask, "{prompt:?}");
    }
    // BLIP's added tokens follow the vocabulary, [DEC] first (the package's `init_tokenizer`).
    let n = std::fs::read_to_string(dir().join("vocab.txt"))
        .unwrap()
        .lines()
        .count() as u32;
    assert_eq!((tok.dec_token_id(), tok.enc_token_id()), (n, n + 1));
    assert_eq!(tok.vocab_size(), n as usize + 2);
}

#[test]
fn imagereward_pt_is_read_by_the_restricted_unpickler() {
    let file = WeightFile::open(&dir().join("ImageReward.pt")).unwrap();
    assert!(file.is_pickle());
    let names = file.names();
    for name in [
        "blip.visual_encoder.pos_embed",
        "blip.text_encoder.encoder.layer.1.crossattention.self.key.weight",
        "blip.text_encoder.embeddings.position_ids",
        "mlp.layers.7.bias",
    ] {
        assert!(names.iter().any(|n| n == name), "{name} missing from {names:?}");
    }
}

/// A copy of the fixture folder in a temp dir, the checkpoint as safetensors with `edit`
/// applied to its tensors.
fn converted(edit: impl FnOnce(&mut HashMap<String, Tensor>)) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    for f in ["med_config.json", "vocab.txt"] {
        std::fs::copy(dir().join(f), tmp.path().join(f)).unwrap();
    }
    let file = WeightFile::open(&dir().join("ImageReward.pt")).unwrap();
    let mut tensors: HashMap<String, Tensor> = file
        .names()
        .into_iter()
        .map(|n| {
            let t = file.load(&n, &Device::Cpu).unwrap();
            (n, t)
        })
        .collect();
    edit(&mut tensors);
    save_safetensors(&tmp.path().join("ImageReward.safetensors"), &tensors, None).unwrap();
    tmp
}

#[test]
fn imagereward_safetensors_conversion_scores_the_same() {
    let tmp = converted(|_| {});
    let from_st = ImageRewardModel::load(tmp.path(), &load_options()).unwrap();
    let from_pt = model();
    let (prompts, _) = prompts();
    let img = image(0);
    let a = values(&from_st.score(&img, &prompts[2]).unwrap());
    let b = values(&from_pt.score(&img, &prompts[2]).unwrap());
    assert_eq!(a, b);
}

fn load_err(path: &Path) -> String {
    match ImageRewardModel::load(path, &load_options()) {
        Ok(_) => panic!("{} loaded", path.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn imagereward_missing_files_are_named() {
    let tmp = converted(|_| {});
    std::fs::remove_file(tmp.path().join("vocab.txt")).unwrap();
    let err = load_err(tmp.path());
    assert!(err.contains("vocab.txt") && err.contains("not found"), "{err}");

    let tmp = converted(|_| {});
    std::fs::remove_file(tmp.path().join("med_config.json")).unwrap();
    let err = load_err(tmp.path());
    assert!(err.contains("med_config.json") && err.contains("not found"), "{err}");

    let tmp = converted(|_| {});
    std::fs::remove_file(tmp.path().join("ImageReward.safetensors")).unwrap();
    let err = load_err(tmp.path());
    assert!(err.contains("ImageReward.safetensors or ImageReward.pt"), "{err}");
}

#[test]
fn imagereward_bad_shapes_and_configs_are_named() {
    let key = "blip.text_encoder.encoder.layer.0.crossattention.self.key.weight";
    let tmp = converted(|t| {
        t.insert(key.into(), Tensor::zeros((32, 48), DType::F32, &Device::Cpu).unwrap());
    });
    let err = load_err(tmp.path());
    assert!(
        err.contains(key) && err.contains("[32, 64]") && err.contains("[32, 48]"),
        "{err}"
    );

    let tmp = converted(|t| {
        t.insert(
            "blip.visual_encoder.pos_embed".into(),
            Tensor::zeros((1, 196, 64), DType::F32, &Device::Cpu).unwrap(),
        );
    });
    let err = load_err(tmp.path());
    assert!(
        err.contains("blip.visual_encoder.pos_embed") && err.contains("[1, 196, 64]"),
        "{err}"
    );

    let tmp = converted(|t| {
        t.remove("mlp.layers.4.weight");
    });
    let err = load_err(tmp.path());
    assert!(err.contains("missing tensor mlp.layers.4.weight"), "{err}");

    let tmp = converted(|t| {
        t.insert("blip.extra".into(), Tensor::zeros(2, DType::F32, &Device::Cpu).unwrap());
    });
    let err = load_err(tmp.path());
    assert!(err.contains("not used") && err.contains("blip.extra"), "{err}");

    let tmp = converted(|_| {});
    let cfg = tmp.path().join("med_config.json");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("\"num_attention_heads\": 2", "\"num_attention_heads\": 3");
    std::fs::write(&cfg, text).unwrap();
    let err = load_err(tmp.path());
    assert!(err.contains("med_config.json: num_attention_heads"), "{err}");

    let tmp = converted(|_| {});
    std::fs::write(tmp.path().join("vocab.txt"), "[PAD]\n[CLS]\n[SEP]\n").unwrap();
    let err = load_err(tmp.path());
    assert!(err.contains("vocab.txt") && err.contains("[UNK]"), "{err}");
}

/// `score` reads files as the package's `score(prompt, path)` does (Pillow's bicubic resize of the
/// 8-bit image, centre crop): its scores equal the package's on the PNGs.
#[test]
fn score_cli_scores_image_files_as_the_package_does() {
    let reference = reference();
    let (prompts, scored) = prompts();
    let spec = format!("imagereward={}", dir().display());
    let imgs: Vec<String> = (0..2)
        .map(|j| dir().join(format!("img{j}.png")).display().to_string())
        .collect();
    for (i, prompt) in prompts.iter().take(scored).enumerate() {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_diffalign"))
            .args(["score", "--reward", &spec, "--prompt", prompt, &imgs[0], &imgs[1]])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let lines: Vec<serde_json::Value> = String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        for (j, line) in lines.iter().enumerate() {
            let got = line["scores"]["imagereward"].as_f64().unwrap();
            let want = values(&reference[&format!("file_score.{i}.img{j}")])[0];
            assert!(
                (got - want).abs() <= RTOL * want.abs(),
                "prompt {i} img{j}: {got} vs {want}"
            );
        }
    }
}

#[test]
fn reno_cli_combines_imagereward_with_reno_default_weights() {
    let reno = common::shared_fixtures().join("turbo-reno");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let pick = format!("pickscore={}", reno.join("reward_clip").display());
    let ir = format!("imagereward={}", dir().display());
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_diffalign"))
        .arg("reno")
        .arg("--model")
        .arg(common::shared_fixtures().join("turbo"))
        .args(["--prompt", "a photo of a cat", "--reward", &pick, "--reward", &ir])
        .args(["--iters", "2", "--seed", "3", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let lines = common::read_jsonl(&out.join("iterations.jsonl"));
    assert_eq!(lines.len(), 2);
    for line in &lines {
        let (p, r) = (
            line["scores"]["pickscore"].as_f64().unwrap(),
            line["scores"]["imagereward"].as_f64().unwrap(),
        );
        // ReNO's losses: 0.05 (30 - PickScore) + 1.0 (2 - ImageReward).
        let want = 0.05 * (30.0 - p) + (2.0 - r);
        let got = line["reward_loss"].as_f64().unwrap();
        assert!((got - want).abs() <= 1e-5 * want.abs(), "{got} vs {want}");
    }
    // `KIND=PATH:W` sets the weight as `--weight KIND=W` does.
    let weighted = format!("{ir}:0.5");
    let out2 = tmp.path().join("weighted");
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_diffalign"))
        .arg("reno")
        .arg("--model")
        .arg(common::shared_fixtures().join("turbo"))
        .args(["--prompt", "a photo of a cat", "--reward", &pick, "--reward", &weighted])
        .args(["--iters", "1", "--seed", "3", "--out"])
        .arg(&out2)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let line = &common::read_jsonl(&out2.join("iterations.jsonl"))[0];
    let (p, r) = (
        line["scores"]["pickscore"].as_f64().unwrap(),
        line["scores"]["imagereward"].as_f64().unwrap(),
    );
    let want = 0.05 * (30.0 - p) + 0.5 * (2.0 - r);
    let got = line["reward_loss"].as_f64().unwrap();
    assert!((got - want).abs() <= 1e-5 * want.abs(), "{got} vs {want}");

    // The first iteration scores the saved initial image (up to its 8-bit rounding).
    let model = model();
    let initial = load_image(&out.join("initial.png"))
        .unwrap()
        .permute((2, 0, 1))
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let s = values(&model.score(&initial, "a photo of a cat").unwrap())[0];
    let r0 = lines[0]["scores"]["imagereward"].as_f64().unwrap();
    assert!((s - r0).abs() <= 1e-2 * r0.abs(), "{s} vs {r0}");
}

#[test]
fn imagereward_recompute_and_bf16_keep_the_score() {
    let model = model();
    let (prompts, _) = prompts();
    let img = image(0);
    let grad = |m: &ImageRewardModel| {
        let raw = Var::from_tensor(&img).unwrap();
        let s = m.score(raw.as_tensor(), &prompts[0]).unwrap();
        let g = s.sum_all().unwrap().backward().unwrap();
        (values(&s)[0], g.get(raw.as_tensor()).unwrap().clone())
    };
    let (s, g) = grad(&model);
    model.set_gradient_checkpointing(true);
    let (s2, g2) = grad(&model);
    assert_eq!(s, s2);
    assert_rel_close("gradient with recomputation", &g2, &g);

    let opts = diffalign::weights::LoadOptions {
        dtype: DType::BF16,
        ..load_options()
    };
    let half = ImageRewardModel::load(&dir(), &opts).unwrap();
    let got = values(&half.score(&img, &prompts[0]).unwrap())[0];
    assert!((got - s).abs() <= 0.05 * s.abs(), "bf16 {got} vs f32 {s}");
}

#[test]
fn med_config_lists_only_unknown_keys() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("med_config.json");
    let text = std::fs::read_to_string(dir().join("med_config.json"))
        .unwrap()
        .replacen('{', "{\n  \"foo_bar\": 1,", 1);
    std::fs::write(&path, text).unwrap();
    let cfg = diffalign::models::blip::MedConfig::from_file(&path).unwrap();
    // The file's dropout, initialiser and bookkeeping keys are known and inert.
    assert_eq!(cfg.unknown_keys(), vec!["foo_bar".to_string()]);
    assert_eq!(
        (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads),
        (32, 2, 2)
    );
}
