//! Issue 23 (reliability): hostile but ordinary inputs give clear errors naming the file, tensor,
//! key or flag at fault, within seconds, instead of black images, `null` losses or the kernel's
//! out-of-memory killer. <https://github.com/diffalign/diffalign/issues/23>

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use common::*;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_diffalign"))
}

/// Runs the binary with `args` and returns its output and how long it took.
fn run(args: &[&str]) -> (Output, Duration) {
    let start = Instant::now();
    let out = bin().args(args).output().unwrap();
    (out, start.elapsed())
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Asserts that the command failed and that its error mentions every one of `needles`.
fn assert_fails_naming(o: &Output, needles: &[&str]) {
    let err = stderr(o);
    assert!(!o.status.success(), "expected a failure, got success; stderr: {err}");
    for n in needles {
        assert!(err.contains(n), "the error should name {n:?}: {err}");
    }
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A copy of the shared fixture `name` in a fresh temporary folder.
fn fixture_copy(name: &str) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join(name);
    copy_dir(&shared_fixtures().join(name), &dir);
    (tmp, dir)
}

/// Rewrites the f32 tensor `name` of the safetensors file `path` in place with `edit`, keeping
/// every other tensor and the metadata.
fn edit_f32_tensor(path: &Path, name: &str, edit: impl FnOnce(&mut [f32])) {
    let bytes = std::fs::read(path).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut owned: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, v.dtype(), v.shape().to_vec(), v.data().to_vec()))
        .collect();
    let target = owned.iter_mut().find(|t| t.0 == name).expect("tensor in file");
    assert_eq!(target.1, safetensors::Dtype::F32);
    let mut values: Vec<f32> = target
        .3
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    edit(&mut values);
    target.3 = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = owned
        .iter()
        .map(|(n, d, shape, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*d, shape.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, meta.metadata().clone(), path).unwrap();
}

/// Sets key `key` of the JSON file `path` to `value`.
fn edit_json(path: &Path, key: &str, value: serde_json::Value) {
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    v[key] = value;
    std::fs::write(path, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

fn generate_args<'a>(model: &'a str, out: &'a str) -> Vec<&'a str> {
    vec![
        "generate", "--model", model, "--prompt", "a cat", "--steps", "1", "--out", out,
    ]
}

// ---- non-finite values ----

#[test]
fn issue_23_generate_nan_unet_weight_names_the_tensor() {
    let (tmp, model) = fixture_copy("sd15");
    edit_f32_tensor(
        &model.join("unet/diffusion_pytorch_model.safetensors"),
        "conv_in.weight",
        |v| v[3] = f32::NAN,
    );
    let out = tmp.path().join("x.png");
    let (o, _) = run(&generate_args(s(&model), s(&out)));
    assert_fails_naming(
        &o,
        &[
            "diffusion_pytorch_model.safetensors",
            "conv_in.weight",
            "NaN",
            "index 3",
        ],
    );
    assert!(!out.exists(), "no image is written");
}

#[test]
fn issue_23_generate_vae_scaling_factor_zero_names_the_key() {
    let (tmp, model) = fixture_copy("sd15");
    edit_json(&model.join("vae/config.json"), "scaling_factor", 0.into());
    let out = tmp.path().join("x.png");
    let (o, _) = run(&generate_args(s(&model), s(&out)));
    assert_fails_naming(&o, &["vae/config.json", "scaling_factor"]);
}

#[test]
fn issue_23_generate_non_finite_guidance_is_rejected() {
    let tmp = tempfile::tempdir().unwrap();
    let model = shared_fixtures().join("sd15");
    let out = tmp.path().join("x.png");
    for bad in ["--guidance=inf", "--guidance=NaN", "--guidance=-inf"] {
        let mut args = generate_args(s(&model), s(&out));
        args.push(bad);
        let (o, _) = run(&args);
        assert_fails_naming(&o, &["--guidance", "finite"]);
    }
}

#[test]
fn issue_23_generate_nan_init_noise_names_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let mut values = vec![0.5f32; 4 * 16 * 16];
    values[7] = f32::NAN;
    let noise = Tensor::from_vec(values, (1, 4, 16, 16), &Device::Cpu).unwrap();
    let path = tmp.path().join("noise.safetensors");
    candle_core::safetensors::save(&[("init_noise".to_string(), noise)].into_iter().collect(), &path).unwrap();
    let out = tmp.path().join("x.png");
    let model = shared_fixtures().join("sd15");
    let mut args = generate_args(s(&model), s(&out));
    args.extend(["--init-noise", s(&path)]);
    let (o, _) = run(&args);
    assert_fails_naming(&o, &["noise.safetensors", "init_noise", "NaN"]);
}

/// A NaN that reaches the UNet stops sampling at the first step, naming it; a NaN latent stops
/// the decoder, naming it.
#[test]
fn issue_23_sampling_checks_unet_and_vae_outputs() {
    use diffalign::sampling::pipeline::PipelineSources;
    use diffalign::sampling::{GenerateRequest, StableDiffusionPipeline};
    let sources = PipelineSources {
        root: shared_fixtures().join("sd15"),
        ..Default::default()
    };
    let pipe = StableDiffusionPipeline::load(&sources, &Default::default()).unwrap();
    let mut values = vec![0.1f32; 4 * 16 * 16];
    values[0] = f32::NAN;
    let noise = Tensor::from_vec(values, (1, 4, 16, 16), &Device::Cpu).unwrap();
    let req = GenerateRequest {
        prompts: vec!["a cat".into()],
        negative_prompts: None,
        steps: 2,
        guidance: 1.0,
        height: 64,
        width: 64,
        init_noise: noise.clone(),
        scheduler: None,
        seed: 0,
        time_ids: None,
    };
    let err = pipe.generate(&req, &mut |_, _| {}).unwrap_err().to_string();
    assert!(
        err.contains("sampling step 1 of 2") && err.contains("unet output"),
        "{err}"
    );
    let err = pipe.decode_images(&noise).unwrap_err().to_string();
    assert!(err.contains("vae output"), "{err}");
}

#[test]
fn issue_23_loss_nan_latent_names_the_tensor() {
    let (tmp, dir) = fixture_copy("sd15-losses");
    let batch = dir.join("batch.safetensors");
    edit_f32_tensor(&batch, "latents_w", |v| v[0] = f32::NAN);
    let model = shared_fixtures().join("sd15");
    let (o, _) = run(&["loss", "--model", s(&model), "--method", "dpo", "--batch", s(&batch)]);
    assert_fails_naming(&o, &["batch.safetensors", "latents_w", "NaN"]);
    drop(tmp);
}

#[test]
fn issue_23_loss_soft_label_out_of_range_names_the_record() {
    let (_tmp, dir) = fixture_copy("sd15-losses");
    let batch = dir.join("batch.safetensors");
    edit_f32_tensor(&batch, "soft_label", |v| v[1] = 2.0);
    let model = shared_fixtures().join("sd15");
    let (o, _) = run(&["loss", "--model", s(&model), "--method", "smpo", "--batch", s(&batch)]);
    assert_fails_naming(&o, &["batch.safetensors", "soft_label", "record 1", "got 2"]);
}

#[test]
fn issue_23_lora_merge_refuses_a_nan_adapter() {
    let (tmp, dir) = fixture_copy("sd15-losses");
    let lora = dir.join("policy_lora/pytorch_lora_weights.safetensors");
    let bytes = std::fs::read(&lora).unwrap();
    let name = safetensors::SafeTensors::deserialize(&bytes)
        .unwrap()
        .names()
        .into_iter()
        .find(|n| n.contains("lora_A"))
        .unwrap()
        .to_string();
    edit_f32_tensor(&lora, &name, |v| v[0] = f32::INFINITY);
    let out = tmp.path().join("merged");
    let model = shared_fixtures().join("sd15");
    let (o, _) = run(&[
        "lora",
        "merge",
        "--model",
        s(&model),
        "--lora",
        s(&lora),
        "--out",
        s(&out),
    ]);
    assert_fails_naming(&o, &[&name, "inf"]);
    assert!(!out.join("diffusion_pytorch_model.safetensors").exists());
}

#[test]
fn issue_23_lm_batch_negative_token_id_names_the_record() {
    let (_tmp, dir) = fixture_copy("lm");
    let batch = dir.join("batch.safetensors");
    let bytes = std::fs::read(&batch).unwrap();
    let dtype = safetensors::SafeTensors::deserialize(&bytes)
        .unwrap()
        .tensor("input_ids_l")
        .unwrap()
        .dtype();
    // The fixture's ids are integers; write them back as f32 with one -5 in row 1.
    let mut tensors = candle_core::safetensors::load(&batch, &Device::Cpu).unwrap();
    let ids = tensors["input_ids_l"].to_dtype(DType::F32).unwrap();
    let (b, t) = ids.dims2().unwrap();
    assert!(b > 1, "the fixture batch has {b} rows ({dtype:?})");
    let mut values = ids.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    values[t + 2] = -5.0;
    tensors.insert(
        "input_ids_l".into(),
        Tensor::from_vec(values, (b, t), &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&tensors, &batch).unwrap();
    let err = diffalign::lm::batch::PairBatch::from_file(&batch, &Device::Cpu)
        .expect_err("a negative id is an error")
        .to_string();
    assert!(
        err.contains("batch.safetensors")
            && err.contains("record 1")
            && err.contains("input_ids_l")
            && err.contains("-5"),
        "{err}"
    );
}

#[test]
fn lm_batch_longer_than_the_model_positions_is_refused() {
    let path = shared_fixtures().join("lm/batch.safetensors");
    let batch = diffalign::lm::batch::PairBatch::from_file(&path, &Device::Cpu).unwrap();
    let t = batch
        .chosen
        .input_ids
        .dim(1)
        .unwrap()
        .max(batch.rejected.input_ids.dim(1).unwrap());
    batch.check_positions(t, &path).unwrap();
    let err = batch.check_positions(t - 1, &path).unwrap_err().to_string();
    assert!(
        err.contains("batch.safetensors")
            && err.contains("max_position_embeddings")
            && err.contains(&format!("{t} tokens")),
        "{err}"
    );
}

/// Writes a one-pair LM batch of `t` tokens per sequence (ids 1, the first token the prompt).
fn long_lm_batch(path: &Path, t: usize) {
    let ones = Tensor::ones((1, t), DType::F32, &Device::Cpu).unwrap();
    let mut completion = vec![1f32; t];
    completion[0] = 0.0;
    let completion = Tensor::from_vec(completion, (1, t), &Device::Cpu).unwrap();
    let mut tensors = std::collections::HashMap::new();
    for side in ["w", "l"] {
        tensors.insert(format!("input_ids_{side}"), ones.clone());
        tensors.insert(format!("attention_mask_{side}"), ones.clone());
        tensors.insert(format!("completion_mask_{side}"), completion.clone());
    }
    candle_core::safetensors::save(&tensors, path).unwrap();
}

/// A 100,000-token batch against a model of 128 positions is refused by every `lm` command,
/// naming the batch and the limit, within seconds.
#[test]
fn issue_23_lm_commands_refuse_sequences_longer_than_the_positions() {
    let tmp = tempfile::tempdir().unwrap();
    let batch = tmp.path().join("long.safetensors");
    long_lm_batch(&batch, 100_000);
    let lm = shared_fixtures().join("lm");
    let (policy, rm) = (lm.join("policy"), lm.join("reward_model"));
    let out = tmp.path().join("out");
    let commands: [Vec<&str>; 5] = [
        vec![
            "lm",
            "loss",
            "--policy",
            s(&policy),
            "--loss-type",
            "simpo",
            "--batch",
            s(&batch),
        ],
        vec!["lm", "reward", "--model", s(&rm), "--batch", s(&batch)],
        vec![
            "lm",
            "train",
            "--policy",
            s(&policy),
            "--loss-type",
            "simpo",
            "--data",
            s(&batch),
            "--out",
            s(&out),
        ],
        vec![
            "lm",
            "train-rm",
            "--model",
            s(&rm),
            "--data",
            s(&batch),
            "--out",
            s(&out),
        ],
        vec!["lm", "eval-rm", "--model", s(&rm), "--data", s(&batch)],
    ];
    for args in commands {
        let (o, took) = run(&args);
        assert_fails_naming(
            &o,
            &["long.safetensors", "100000 tokens", "max_position_embeddings 128"],
        );
        assert!(took < Duration::from_secs(20), "{args:?} took {took:?}");
    }
    assert!(!out.exists(), "nothing is written");
}

/// `lm loss --policy <a UNet folder>` says the folder's config is not a causal LM.
#[test]
fn issue_23_lm_loss_policy_unet_folder_is_not_a_causal_lm() {
    let unet = shared_fixtures().join("sd15/unet");
    let batch = shared_fixtures().join("lm/batch.safetensors");
    let (o, _) = run(&[
        "lm",
        "loss",
        "--policy",
        s(&unet),
        "--loss-type",
        "simpo",
        "--batch",
        s(&batch),
    ]);
    assert_fails_naming(&o, &["sd15/unet/config.json", "_class_name", "not a causal-LM config"]);
}

// ---- memory bounded by input ----

/// A size far beyond the machine's memory fails within seconds, naming the flag and the estimate.
#[test]
fn issue_23_generate_huge_size_fails_fast_naming_the_flag() {
    let tmp = tempfile::tempdir().unwrap();
    let model = shared_fixtures().join("sd15");
    let out = tmp.path().join("w.png");
    let mut args = generate_args(s(&model), s(&out));
    args.extend(["--width", "100000", "--height", "64"]);
    let (o, took) = run(&args);
    assert_fails_naming(&o, &["--width 100000", "available", "GB"]);
    assert!(took < Duration::from_secs(10), "took {took:?}");
    let mut args = generate_args(s(&model), s(&out));
    args.extend(["--width", "400000", "--height", "400000"]);
    let (o, took) = run(&args);
    assert_fails_naming(&o, &["--height 400000", "available"]);
    assert!(took < Duration::from_secs(10), "took {took:?}");
}

#[test]
fn issue_23_generate_huge_sample_size_names_the_config_key() {
    let (tmp, model) = fixture_copy("sd15");
    edit_json(&model.join("unet/config.json"), "sample_size", 1_000_000.into());
    let out = tmp.path().join("w.png");
    let (o, took) = run(&generate_args(s(&model), s(&out)));
    assert_fails_naming(&o, &["unet/config.json", "sample_size", "available"]);
    assert!(took < Duration::from_secs(10), "took {took:?}");
}

#[test]
fn issue_23_generate_sample_size_zero_names_the_config_key() {
    let (tmp, model) = fixture_copy("sd15");
    edit_json(&model.join("unet/config.json"), "sample_size", 0.into());
    let out = tmp.path().join("w.png");
    let (o, _) = run(&generate_args(s(&model), s(&out)));
    assert_fails_naming(&o, &["unet/config.json", "sample_size 0x0", "multiple of 4"]);
}

/// A recipe on the sd15 fixture with one JSONL pair, `train` keys `extra`; returns its path.
fn train_recipe(dir: &Path, extra: &str) -> PathBuf {
    for name in ["w.png", "l.png"] {
        image::RgbImage::new(8, 8).save(dir.join(name)).unwrap();
    }
    let data = dir.join("pairs.jsonl");
    std::fs::write(&data, r#"{"prompt": "p", "chosen": "w.png", "rejected": "l.png"}"#).unwrap();
    let text = format!(
        "[model]\npath = {model:?}\n\n[data]\nformat = \"jsonl\"\npath = {data:?}\n\n\
         [train]\nmethod = \"dpo\"\nsteps = 1\nbatch_size = 1\nlr = 1e-3\n{extra}\n\n\
         [output]\ndir = {out:?}\n",
        model = s(&shared_fixtures().join("sd15")),
        data = s(&data),
        out = s(&dir.join("out")),
    );
    let path = dir.join("recipe.toml");
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn issue_23_train_huge_resolution_fails_fast_naming_the_key() {
    let tmp = tempfile::tempdir().unwrap();
    let recipe = train_recipe(tmp.path(), "resolution = 100000");
    let (o, took) = run(&["train", s(&recipe)]);
    assert_fails_naming(&o, &["train.resolution = 100000", "recipe.toml", "GB are available"]);
    assert!(took < Duration::from_secs(5), "took {took:?}");
    assert!(!tmp.path().join("out").exists(), "nothing is written");
}

#[test]
fn issue_23_train_resolution_off_the_vae_factor_names_the_key() {
    let tmp = tempfile::tempdir().unwrap();
    let recipe = train_recipe(tmp.path(), "resolution = 63");
    let (o, _) = run(&["train", s(&recipe)]);
    assert_fails_naming(&o, &["recipe.toml", "train.resolution", "multiple of 4", "63"]);
}

#[test]
fn issue_23_bench_huge_channels_fail_fast_naming_the_config() {
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("config.json");
    std::fs::copy(shared_fixtures().join("sd15/unet/config.json"), &config).unwrap();
    edit_json(
        &config,
        "block_out_channels",
        serde_json::json!([1_000_000_000u64, 1_000_000_000u64, 1_000_000_000u64]),
    );
    for suite in ["unet", "dpo-step"] {
        let (o, took) = run(&["bench", "--suite", suite, "--config", s(&config), "--repeats", "1"]);
        assert_fails_naming(&o, &["config.json", "weights", "GB are available"]);
        assert!(took < Duration::from_secs(5), "{suite} took {took:?}");
    }
    let lm = tmp.path().join("lm.json");
    std::fs::copy(shared_fixtures().join("lm/policy/config.json"), &lm).unwrap();
    edit_json(&lm, "hidden_size", serde_json::json!(1_000_000_000u64));
    let (o, took) = run(&["bench", "--suite", "lm", "--config", s(&lm), "--repeats", "1"]);
    assert_fails_naming(&o, &["lm.json", "--seq 256", "weights", "GB are available"]);
    assert!(took < Duration::from_secs(5), "lm took {took:?}");
}

/// The training estimate of the recipes' usual sizes fits a workstation, and grows with the
/// resolution, the batch and a reference.
#[test]
fn training_memory_estimate_accepts_the_usual_sizes() {
    use diffalign::models::unet::UNet2DConditionConfig;
    use diffalign::models::vae::AutoencoderKLConfig;
    use diffalign::sampling::budget::{estimate_training, TrainingJob};
    let sd15 = shared_fixtures().join("sd15");
    let unet = UNet2DConditionConfig::from_file(&sd15.join("unet/config.json")).unwrap();
    let vae = AutoencoderKLConfig::from_file(&sd15.join("vae/config.json")).unwrap();
    let job = TrainingJob {
        pairs: 2,
        latent: (64, 64),
        dtype: DType::F32,
        device: &Device::Cpu,
        reference: true,
        full_fine_tune: true,
        optimizer_state: 8.0,
    };
    let bytes = |j: &TrainingJob| estimate_training(j, &unet, &vae).device;
    let usual = bytes(&job);
    assert!(usual > 0.0 && usual < 16e9, "{usual}");
    // 8-bit AdamW's state (about 2.1 bytes per parameter instead of 8) lowers the estimate.
    assert!(
        bytes(&TrainingJob {
            optimizer_state: 2.1,
            ..job
        }) < usual
    );
    assert!(bytes(&TrainingJob { pairs: 4, ..job }) > usual);
    assert!(
        bytes(&TrainingJob {
            latent: (128, 128),
            ..job
        }) > usual
    );
    assert!(
        bytes(&TrainingJob {
            reference: false,
            ..job
        }) < usual
    );
    // A LoRA run holds one base UNet: its reference pass adds activations but, unlike a full
    // fine-tune's, no second copy of the weights.
    let lora = TrainingJob {
        full_fine_tune: false,
        ..job
    };
    let reference_cost = |j: &TrainingJob| bytes(j) - bytes(&TrainingJob { reference: false, ..*j });
    let unet_weights = diffalign::sampling::budget::unet_parameters(&unet) * 4.0;
    let saved = reference_cost(&job) - reference_cost(&lora);
    assert!((saved - unet_weights).abs() < 1.0, "{saved} vs {unet_weights}");
}

#[test]
fn memory_estimate_accepts_the_usual_sizes() {
    use diffalign::models::unet::UNet2DConditionConfig;
    use diffalign::models::vae::AutoencoderKLConfig;
    use diffalign::sampling::budget::{estimate, Job};
    // SD 1.5's and SDXL's block layout at their native sizes, with guidance, in f32 on a CPU.
    let sd15: UNet2DConditionConfig = serde_json::from_value(serde_json::json!({
        "block_out_channels": [320, 640, 1280, 1280], "attention_head_dim": 8, "cross_attention_dim": 768,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        "in_channels": 4, "out_channels": 4, "layers_per_block": 2
    }))
    .unwrap();
    let sdxl: UNet2DConditionConfig = serde_json::from_value(serde_json::json!({
        "block_out_channels": [320, 640, 1280], "attention_head_dim": [5, 10, 20], "cross_attention_dim": 2048,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "in_channels": 4, "out_channels": 4, "layers_per_block": 2, "transformer_layers_per_block": [1, 2, 10]
    }))
    .unwrap();
    let vae: AutoencoderKLConfig = serde_json::from_value(serde_json::json!({
        "block_out_channels": [128, 256, 512, 512], "latent_channels": 4
    }))
    .unwrap();
    let job = |latent| Job {
        batch: 1,
        guided: true,
        latent,
        dtype: DType::F32,
        device: &Device::Cpu,
        retained_calls: 1,
    };
    let gb = |bytes: f64| bytes / 1e9;
    let e15 = estimate(&job((64, 64)), &sd15, &vae);
    let exl = estimate(&job((128, 128)), &sdxl, &vae);
    assert!(gb(e15.host_bytes(&Device::Cpu)) < 12.0, "{e15:?}");
    assert!(gb(exl.host_bytes(&Device::Cpu)) < 16.0, "{exl:?}");
    // At 100000x64 pixels the VAE's attention alone over 12500x8 latents is 100000^2 f32 scores.
    let huge = estimate(&job((8, 12500)), &sd15, &vae);
    assert!(
        huge.host_bytes(&Device::Cpu) >= 100_000f64 * 100_000.0 * 4.0,
        "{huge:?}"
    );
}

#[test]
fn mem_available_is_read_in_bytes() {
    let text = "MemTotal:       24000000 kB\nMemFree:         1000 kB\nMemAvailable:   21000000 kB\n";
    assert_eq!(
        diffalign::sampling::budget::parse_mem_available(text),
        Some(21_000_000.0 * 1024.0)
    );
    assert_eq!(
        diffalign::sampling::budget::parse_mem_available("MemTotal: 1 kB\n"),
        None
    );
}

/// Writes a PNG that declares `w`x`h` pixels and holds no image data.
fn png_header_only(path: &Path, w: u32, h: u32) {
    fn crc32(bytes: &[u8]) -> u32 {
        let mut crc = 0xffff_ffffu32;
        for &b in bytes {
            crc ^= b as u32;
            for _ in 0..8 {
                crc = if crc & 1 != 0 {
                    (crc >> 1) ^ 0xedb8_8320
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }
    let mut ihdr = b"IHDR".to_vec();
    ihdr.extend(w.to_be_bytes());
    ihdr.extend(h.to_be_bytes());
    ihdr.extend([8, 2, 0, 0, 0]); // 8-bit RGB, deflate, no filter, no interlace
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    for chunk in [ihdr, b"IDAT".to_vec(), b"IEND".to_vec()] {
        png.extend((chunk.len() as u32 - 4).to_be_bytes());
        png.extend(&chunk);
        png.extend(crc32(&chunk).to_be_bytes());
    }
    std::fs::write(path, png).unwrap();
}

#[test]
fn issue_23_score_image_declaring_huge_size_names_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("huge.png");
    png_header_only(&img, 20000, 20000);
    let (o, took) = run(&["score", "--prompt", "a cat", s(&img)]);
    assert_fails_naming(&o, &["huge.png", "20000x20000"]);
    assert!(took < Duration::from_secs(10), "took {took:?}");
}

/// A training image declaring 20000x20000 pixels is a skipped record under `bad_records = "skip"`
/// and a record error under `"error"`, naming the image, its size and the record, without decoding.
#[test]
fn issue_23_dataset_image_declaring_huge_size_is_a_bad_record() {
    use diffalign::data::{BadRecordPolicy, DataFormat, DataSpec, Listing, PairDataset, Records};
    let tmp = tempfile::tempdir().unwrap();
    png_header_only(&tmp.path().join("huge.png"), 20000, 20000);
    image::RgbImage::new(8, 8).save(tmp.path().join("small.png")).unwrap();
    let line = r#"{"prompt": "p", "chosen": "huge.png", "rejected": "small.png"}"#;
    std::fs::write(tmp.path().join("pairs.jsonl"), format!("{line}\n{line}\n")).unwrap();
    let mut spec = DataSpec::new(DataFormat::Jsonl, tmp.path());
    let started = Instant::now();
    let ds = PairDataset::open(&spec).unwrap();
    assert!(ds.get_or_skip(0).unwrap().is_none());
    let skipped = ds.late_skipped(0);
    assert_eq!(skipped.len(), 1);
    let reason = &skipped[0].1;
    assert!(
        reason.contains("huge.png") && reason.contains("20000x20000"),
        "{reason}"
    );
    // Every pair skipped leaves none usable: an error, with the reason.
    let err = ds.get_or_skip(1).unwrap_err().to_string();
    assert!(err.contains("20000x20000"), "{err}");

    spec.bad_records = BadRecordPolicy::Error;
    let ds = PairDataset::open(&spec).unwrap();
    let err = ds.get_or_skip(0).unwrap_err().to_string();
    assert!(
        err.contains("pairs.jsonl: record 0") && err.contains("huge.png") && err.contains("20000x20000"),
        "{err}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
}

// ---- errors that name what is at fault ----

#[test]
fn issue_23_generate_unet_of_another_architecture_names_both_files() {
    let tmp = tempfile::tempdir().unwrap();
    let model = shared_fixtures().join("sd15");
    let unet = shared_fixtures().join("turbo/unet");
    let out = tmp.path().join("x.png");
    let mut args = generate_args(s(&model), s(&out));
    args.extend(["--unet", s(&unet)]);
    let (o, _) = run(&args);
    assert_fails_naming(
        &o,
        &[
            "turbo/unet/config.json",
            "cross_attention_dim",
            "text_encoder/config.json",
        ],
    );
}

#[test]
fn issue_23_loss_policy_unet_of_another_architecture_names_its_config() {
    let model = shared_fixtures().join("sd15");
    let unet = shared_fixtures().join("turbo/unet");
    let batch = shared_fixtures().join("sd15-losses/batch.safetensors");
    let (o, _) = run(&[
        "loss",
        "--model",
        s(&model),
        "--unet",
        s(&unet),
        "--method",
        "dpo",
        "--batch",
        s(&batch),
    ]);
    assert_fails_naming(&o, &["turbo/unet/config.json", "cross_attention_dim", "48", "32"]);
}

#[test]
fn issue_23_model_index_unet_3d_is_an_error() {
    let (tmp, model) = fixture_copy("sd15");
    edit_json(
        &model.join("model_index.json"),
        "unet",
        serde_json::json!(["diffusers", "UNet3DConditionModel"]),
    );
    let out = tmp.path().join("x.png");
    let (o, _) = run(&generate_args(s(&model), s(&out)));
    assert_fails_naming(&o, &["model_index.json", "UNet3DConditionModel"]);
}

#[test]
fn issue_23_output_in_a_missing_folder_names_the_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let model = shared_fixtures().join("sd15");
    let batch = shared_fixtures().join("sd15-losses/batch.safetensors");
    let grads = tmp.path().join("missing/grads.safetensors");
    let (o, _) = run(&[
        "loss",
        "--model",
        s(&model),
        "--method",
        "dpo",
        "--batch",
        s(&batch),
        "--grads-out",
        s(&grads),
    ]);
    let err = stderr(&o);
    assert_fails_naming(&o, &["missing", "folder"]);
    assert!(
        !err.contains("grads.safetensors.") && !err.contains("not a valid safetensors"),
        "{err}"
    );
}

#[test]
fn issue_23_weights_path_that_is_a_folder_says_so() {
    let tmp = tempfile::tempdir().unwrap();
    let model = shared_fixtures().join("sd15");
    let out = tmp.path().join("x.png");
    let mut args = generate_args(s(&model), s(&out));
    args.extend(["--init-noise", s(tmp.path())]);
    let (o, _) = run(&args);
    let err = stderr(&o);
    assert_fails_naming(&o, &["a folder"]);
    assert!(!err.contains("not found"), "{err}");
}

#[test]
fn issue_23_component_weights_file_that_is_a_folder_says_so() {
    let (tmp, model) = fixture_copy("sd15");
    let weights = model.join("unet/diffusion_pytorch_model.safetensors");
    std::fs::remove_file(&weights).unwrap();
    std::fs::create_dir(&weights).unwrap();
    let out = tmp.path().join("x.png");
    let (o, _) = run(&generate_args(s(&model), s(&out)));
    let err = stderr(&o);
    assert_fails_naming(&o, &["unet/diffusion_pytorch_model.safetensors", "a folder"]);
    assert!(!err.contains("not found"), "{err}");
}

/// The demo's float flags refuse NaN, infinity and values out of range, naming the flag, before
/// writing anything.
#[test]
fn issue_23_demo_float_flags_name_the_flag() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("demo");
    for (flag, value) in [
        ("--lr", "NaN"),
        ("--lr", "0"),
        ("--lr", "inf"),
        ("--head-weight", "-1"),
        ("--head-weight", "NaN"),
        ("--beta", "dpo=NaN"),
    ] {
        let arg = format!("{flag}={value}");
        let (o, took) = run(&["demo", "--quick", "--out", s(&out), &arg]);
        assert_fails_naming(&o, &[flag]);
        assert!(took < Duration::from_secs(5), "{arg} took {took:?}");
        assert!(!out.exists(), "{arg} wrote {}", out.display());
    }
}

#[test]
fn io_errors_print_the_os_error_once() {
    let e = diffalign::Error::io("some/file", std::io::Error::from_raw_os_error(21));
    let chain = format!("{:#}", anyhow::Error::from(e));
    assert_eq!(chain.matches("os error 21").count(), 1, "{chain}");
}

// ---- reno defaults from the checkpoint ----

/// The embedded reward's score of the first image, from `reno`'s summary line.
fn initial_score(o: &Output) -> f64 {
    let line: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    line["initial"]["clipscore"].as_f64().unwrap()
}

/// `reno` on the embedded model with no sampling flags runs the model's whole sampler (its
/// first image is a picture), where one step gives noise and a warning.
#[test]
fn issue_23_reno_embedded_defaults_give_an_image() {
    let tmp = tempfile::tempdir().unwrap();
    let prompt = "a yellow triangle on a blue background";
    let default_out = tmp.path().join("r");
    let (default_run, _) = run(&["reno", "--prompt", prompt, "--iters", "1", "--out", s(&default_out)]);
    assert!(default_run.status.success(), "{}", stderr(&default_run));
    assert!(!stderr(&default_run).contains("warning"), "{}", stderr(&default_run));
    let one_step_out = tmp.path().join("r1");
    let (o, _) = run(&[
        "reno",
        "--prompt",
        prompt,
        "--iters",
        "1",
        "--steps",
        "1",
        "--out",
        s(&one_step_out),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("warning: --steps 1"), "{}", stderr(&o));
    // The shapes-world CLIP scores a picture of the prompt well above coloured noise.
    let (picture, noise) = (initial_score(&default_run), initial_score(&o));
    assert!(picture > noise + 3.0, "default {picture}, one step {noise}");
    assert!(default_out.join("initial.png").is_file());
}
