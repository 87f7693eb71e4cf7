//! Text-encoder LoRA training (`[lora] text_encoder = true`, issue 21): every adapter gets a
//! gradient, which matches finite differences; the reference is conditioned by the base
//! encoders; a trained file (PEFT and kohya, SD and SDXL) loads back and gives the prompt
//! embeddings diffusers' `load_lora_weights` gives (tests/fixtures/gen_lora.py `te-trained`); a
//! resumed run ends exactly where an uninterrupted one does.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use common::pairs::{recipe_for, sorted_tensors, train, write_pairs};
use common::*;
use diffalign::preference::diffusion::{DiffusionPreference, Method, PreferenceBatch, Reference};
use diffalign::preference::{LossType, Objective};
use diffalign::rng::Rng;
use diffalign::sampling::pipeline::PipelineSources;
use diffalign::sampling::StableDiffusionPipeline;
use diffalign::schedulers::NoiseSchedule;
use diffalign::train::pair_conditioning;
use diffalign::train::text_lora::{TextEncoderLora, DEFAULT_TEXT_ENCODER_TARGETS};
use diffalign::weights::lora::{LoraConfig, LoraSource};
use diffalign::weights::LoadOptions;

/// The prompt of gen_lora.py's text-encoder cases (`TE_PROMPT`).
const TE_PROMPT: &str = "a red disc on a grey background";

fn sd15() -> PathBuf {
    shared_fixtures().join("sd15")
}

fn pipeline(root: &Path, opts: &LoadOptions) -> StableDiffusionPipeline {
    let sources = PipelineSources {
        root: root.to_path_buf(),
        ..Default::default()
    };
    StableDiffusionPipeline::load(&sources, opts).unwrap()
}

/// The pipeline `root` in `dtype` with fresh rank-2 text-encoder adapters whose B are moved off
/// zero (at B = 0, A gets no gradient).
fn adapted(root: &Path, dtype: DType) -> (StableDiffusionPipeline, TextEncoderLora) {
    let load = LoadOptions {
        dtype,
        ..Default::default()
    };
    let mut pipe = pipeline(root, &load);
    let cfg = LoraConfig {
        rank: 2,
        alpha: 4.0,
        target_modules: DEFAULT_TEXT_ENCODER_TARGETS.map(String::from).to_vec(),
        init_seed: 3,
    };
    let te = TextEncoderLora::attach(&mut pipe, root, &load, &cfg).unwrap();
    let mut rng = Rng::new(5);
    for (name, var) in te.vars() {
        if name.contains("lora_B") {
            var.set(&(rng.randn(var.dims(), &Device::Cpu).unwrap() * 0.3).unwrap())
                .unwrap();
        }
    }
    (pipe, te)
}

fn batch(dtype: DType) -> PreferenceBatch {
    let mut rng = Rng::new(11);
    let mut randn = |shape: &[usize]| rng.randn(shape, &Device::Cpu).unwrap().to_dtype(dtype).unwrap();
    PreferenceBatch {
        noise: randn(&[1, 4, 8, 8]),
        latents_w: randn(&[1, 4, 8, 8]),
        latents_l: randn(&[1, 4, 8, 8]),
        timesteps: Tensor::new(&[400f32], &Device::Cpu).unwrap(),
        soft_label: None,
        time_ids: None,
        captions_w: vec![TE_PROMPT.to_string()],
        captions_l: vec![TE_PROMPT.to_string()],
    }
}

/// The DPO loss with the policy's conditioning from the adapted encoders and the reference's
/// from the base ones (the trainer's, with the pipeline's UNet as policy and reference).
fn dpo_loss(pipe: &StableDiffusionPipeline, te: &TextEncoderLora, batch: &PreferenceBatch) -> Tensor {
    let schedule = NoiseSchedule::from_config(&pipe.scheduler_config).unwrap();
    let eval = DiffusionPreference {
        policy: &pipe.unet,
        reference: Some(Reference::Unet(&pipe.unet)),
        schedule: &schedule,
        method: Method::Dpo,
        objective: Objective::Dpo {
            loss_type: LossType::Sigmoid,
            beta: 500.0,
            label_smoothing: 0.0,
        },
    };
    let cond = pair_conditioning(pipe, batch, Method::Dpo).unwrap();
    let ref_cond = te.reference_conditioning(pipe, batch, Method::Dpo).unwrap();
    eval.loss_with_reference_conditioning(batch, &cond, Some(&ref_cond))
        .unwrap()
        .loss
        .loss
}

#[test]
fn text_encoder_lora_every_adapter_gets_a_gradient_and_the_reference_sees_the_base() {
    let (pipe, te) = adapted(&sd15(), DType::F32);
    let vars = te.vars();
    // 2 layers x q/k/v/out_proj x (A, B).
    assert_eq!(vars.len(), 16, "{:?}", vars.iter().map(|v| &v.0).collect::<Vec<_>>());
    assert!(vars.iter().all(|(n, _)| n.starts_with("text_encoder.encoder.layers.")));
    let b = batch(DType::F32);
    let grads = dpo_loss(&pipe, &te, &b).backward().unwrap();
    for (name, var) in &vars {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{name}: no gradient"));
        assert!(max_abs(g) > 0.0, "{name}: zero gradient");
    }
    // The reference's states are the base encoder's; the policy's differ.
    let base = pipeline(&sd15(), &LoadOptions::default())
        .encode_text(&[TE_PROMPT])
        .unwrap();
    let reference = te.reference_conditioning(&pipe, &b, Method::Dpo).unwrap();
    assert_eq!(max_abs_diff(&reference.context_w, &base.context), 0.0);
    let policy = pipe.encode_text(&[TE_PROMPT]).unwrap();
    assert!(max_abs_diff(&policy.context, &base.context) > 1e-4);
}

/// The DPO loss of [`dpo_loss`] computed in f64 throughout (the library's denoising errors are
/// f32, too coarse for finite differences): `-log sigmoid(-beta/2 ((mse_w - ref_w) - (mse_l - ref_l)))`.
fn dpo_loss_f64(pipe: &StableDiffusionPipeline, te: &TextEncoderLora, b: &PreferenceBatch) -> f64 {
    let schedule = NoiseSchedule::from_config(&pipe.scheduler_config).unwrap();
    let ts = b.timesteps.to_dtype(DType::F64).unwrap();
    let mse = |x0: &Tensor, context: &Tensor| -> Tensor {
        let x_t = schedule.add_noise(x0, &b.noise, &ts).unwrap();
        let target = schedule.training_target(x0, &b.noise, &ts).unwrap();
        let pred = pipe.unet.forward(&x_t, &b.timesteps, context, None).unwrap();
        (pred - target).unwrap().sqr().unwrap().mean_all().unwrap()
    };
    let cond = pair_conditioning(pipe, b, Method::Dpo).unwrap();
    let ref_cond = te.reference_conditioning(pipe, b, Method::Dpo).unwrap();
    let diff_w = (mse(&b.latents_w, &cond.context_w) - mse(&b.latents_w, &ref_cond.context_w)).unwrap();
    let diff_l = (mse(&b.latents_l, &cond.context_l) - mse(&b.latents_l, &ref_cond.context_l)).unwrap();
    let inside = -0.5 * 500.0 * (diff_w - diff_l).unwrap().to_scalar::<f64>().unwrap();
    (1.0 + (-inside).exp()).ln()
}

/// SDXL: both encoders' adapters get gradients, except those of the first encoder's last layer,
/// whose output SDXL does not use (it takes the penultimate states).
#[test]
fn text_encoder_lora_on_sdxl_every_used_adapter_gets_a_gradient() {
    let (pipe, te) = adapted(&own_fixtures().join("sdxl"), DType::F32);
    let vars = te.vars();
    // (2 layers of the first encoder + 3 of the second) x q/k/v/out_proj x (A, B).
    assert_eq!(vars.len(), 40);
    let grads = dpo_loss(&pipe, &te, &batch(DType::F32)).backward().unwrap();
    for (name, var) in &vars {
        let g = grads.get(var.as_tensor()).map_or(0.0, max_abs);
        let unused = name.starts_with("text_encoder.encoder.layers.1.");
        assert_eq!(g > 0.0, !unused, "{name}: gradient max abs {g}");
    }
}

#[test]
fn text_encoder_lora_gradient_matches_finite_differences() {
    let (pipe, te) = adapted(&sd15(), DType::F64);
    let b = batch(DType::F64);
    let vars = te.vars();
    let loss = dpo_loss(&pipe, &te, &b);
    let value = loss.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap();
    let value_f64 = dpo_loss_f64(&pipe, &te, &b);
    assert!(
        (value - value_f64).abs() < 1e-4,
        "loss {value} vs its f64 form {value_f64}"
    );
    let grads = loss.backward().unwrap();
    for name in [
        "text_encoder.encoder.layers.0.self_attn.q_proj.lora_A.weight",
        "text_encoder.encoder.layers.1.self_attn.out_proj.lora_B.weight",
    ] {
        let var = &vars.iter().find(|(n, _)| n == name).unwrap().1;
        let analytic = f64s(grads.get(var.as_tensor()).unwrap())[1];
        let x = var.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let at = |v: f32| -> (f64, f64) {
            let mut y = x.clone();
            y[1] = v;
            var.set(&Tensor::from_vec(y, var.dims(), &Device::Cpu).unwrap())
                .unwrap();
            (v as f64, dpo_loss_f64(&pipe, &te, &b))
        };
        let h = 1e-3 * x[1].abs().max(0.1);
        let (xp, lp) = at(x[1] + h);
        let (xm, lm) = at(x[1] - h);
        at(x[1]);
        let numeric = (lp - lm) / (xp - xm);
        let rel = (analytic - numeric).abs() / numeric.abs().max(1e-12);
        assert!(
            rel < 1e-4,
            "{name}[1]: autograd {analytic:e}, finite differences {numeric:e} (relative {rel:e})"
        );
    }
}

/// `--set` arguments of a rank-2 LoRA run with text-encoder adapters, `steps` steps.
fn te_run(steps: usize) -> Vec<String> {
    [
        "lora.rank=2",
        "lora.alpha=4",
        "lora.text_encoder=true",
        &format!("train.steps={steps}"),
        "train.lr=1e-2",
    ]
    .iter()
    .flat_map(|s| ["--set".to_string(), s.to_string()])
    .collect()
}

/// Trains a text-encoder LoRA for 3 steps on the pipeline `model` in `dir`; gives the output folder.
fn trained(model: &Path, dir: &Path) -> PathBuf {
    let data = write_pairs(&dir.join("data"), 3, 5);
    let r = recipe_for(model, dir, &data, "dpo", "");
    let args = te_run(3);
    train(&r, &args.iter().map(String::as_str).collect::<Vec<_>>());
    dir.join("out")
}

/// `model`'s prompt embeddings (context, pooled) with the LoRA `file` (all its components), or without.
fn embeddings(model: &Path, file: Option<&Path>) -> (Tensor, Option<Tensor>) {
    let opts = LoadOptions {
        lora: file.map(|f| Arc::new(LoraSource::from_file_all(f, false).unwrap())),
        ..Default::default()
    };
    let e = pipeline(model, &opts).encode_text(&[TE_PROMPT]).unwrap();
    (e.context, e.pooled)
}

/// The trained PEFT and kohya files hold `prefixes` (and the UNet's adapters), and both give
/// the same prompt embeddings through our reader, which differ from the base model's.
fn assert_trained_files_load_back(model: &Path, out: &Path, peft_prefixes: &[&str], kohya_prefixes: &[&str]) {
    let peft = out.join("pytorch_lora_weights.safetensors");
    let kohya = out.join("lora_kohya.safetensors");
    for (file, prefixes) in [(&peft, peft_prefixes), (&kohya, kohya_prefixes)] {
        let keys: Vec<String> = load(file).into_keys().collect();
        for p in prefixes {
            assert!(keys.iter().any(|k| k.starts_with(p)), "{}: no {p}* key", file.display());
        }
    }
    let meta = metadata(&peft)["lora_adapter_metadata"].clone();
    assert!(meta.contains("\"text_encoder.r\": 2"), "{meta}");
    let base = embeddings(model, None);
    let (ctx_p, pooled_p) = embeddings(model, Some(&peft));
    let (ctx_k, pooled_k) = embeddings(model, Some(&kohya));
    assert!(
        max_abs_diff(&ctx_p, &base.0) > 1e-6,
        "the trained text-encoder LoRA changes nothing"
    );
    assert_close("context, peft vs kohya", &ctx_p, &ctx_k, 1e-6);
    if let (Some(p), Some(k)) = (pooled_p, pooled_k) {
        assert_close("pooled, peft vs kohya", &p, &k, 1e-6);
    }
}

#[test]
fn text_encoder_lora_training_saves_peft_and_kohya_files_that_load_back() {
    let tmp = tempfile::tempdir().unwrap();
    let out = trained(&sd15(), tmp.path());
    assert_trained_files_load_back(&sd15(), &out, &["unet.", "text_encoder."], &["lora_unet_", "lora_te_"]);
}

#[test]
fn text_encoder_lora_training_on_sdxl_trains_both_encoders() {
    let tmp = tempfile::tempdir().unwrap();
    let model = own_fixtures().join("sdxl");
    let out = trained(&model, tmp.path());
    assert_trained_files_load_back(
        &model,
        &out,
        &["unet.", "text_encoder.", "text_encoder_2."],
        &["lora_unet_input_blocks_", "lora_te1_", "lora_te2_"],
    );
}

#[test]
fn text_encoder_lora_resumed_run_equals_uninterrupted_run() {
    let tmp = tempfile::tempdir().unwrap();
    let data = write_pairs(&tmp.path().join("data"), 5, 3);
    let run = |name: &str, calls: &[&[&str]]| -> (String, Vec<(String, Tensor)>) {
        let dir = tmp.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let r = recipe_for(&sd15(), &dir, &data, "dpo", "grad_accum = 2");
        let args = te_run(4);
        for extra in calls {
            let mut a: Vec<&str> = args.iter().map(String::as_str).collect();
            a.extend_from_slice(extra);
            train(&r, &a);
        }
        let metrics = std::fs::read_to_string(dir.join("out/metrics.jsonl")).unwrap();
        (
            metrics,
            sorted_tensors(&dir.join("out/pytorch_lora_weights.safetensors")),
        )
    };
    let (straight, lora_a) = run("straight", &[&[]]);
    let (resumed, lora_b) = run("resumed", &[&["--max-steps-this-run", "2"], &["--resume"]]);
    assert_eq!(straight, resumed, "metrics of the resumed run differ");
    assert_eq!(lora_a.len(), lora_b.len());
    for ((ka, a), (kb, b)) in lora_a.iter().zip(&lora_b) {
        assert_eq!(ka, kb);
        assert_eq!(max_abs_diff(a, b), 0.0, "{ka}: resumed run differs");
    }
    let te_moved = lora_a
        .iter()
        .filter(|(k, _)| k.starts_with("text_encoder.") && k.contains("lora_B"))
        .any(|(_, t)| max_abs(t) > 0.0);
    assert!(te_moved, "training left every text-encoder lora_B at zero");
}

/// The committed trained files (written by `te_lora_write_trained_fixtures`) as diffusers'
/// `load_lora_weights` applies them: prompt embeddings within 1e-5 (te_trained_expected.safetensors).
#[test]
fn text_encoder_lora_trained_files_give_diffusers_prompt_embeddings() {
    let dir = own_fixtures().join("lora");
    let want = load(&dir.join("te_trained_expected.safetensors"));
    for (case, model) in [("sd15", sd15()), ("sdxl", own_fixtures().join("sdxl"))] {
        for form in ["peft", "kohya"] {
            let name = format!("te_trained_{case}_{form}");
            let (ctx, pooled) = embeddings(&model, Some(&dir.join(format!("{name}.safetensors"))));
            assert_close(
                &format!("{name}: prompt_embeds"),
                &ctx,
                &want[&format!("{name}.prompt_embeds")],
                1e-5,
            );
            if let Some(p) = pooled {
                assert_close(
                    &format!("{name}: pooled_prompt_embeds"),
                    &p,
                    &want[&format!("{name}.pooled_prompt_embeds")],
                    1e-5,
                );
            }
        }
    }
}

/// Writes tests/fixtures/lora/te_trained_{sd15,sdxl}_{peft,kohya}.safetensors from 3-step runs;
/// then `gen_lora.py te-trained` writes diffusers' embeddings for them.
#[test]
#[ignore]
fn te_lora_write_trained_fixtures() {
    let tmp = tempfile::tempdir().unwrap();
    let dest = own_fixtures().join("lora");
    for (case, model) in [("sd15", sd15()), ("sdxl", own_fixtures().join("sdxl"))] {
        let out = trained(&model, &tmp.path().join(case));
        for (form, file) in [("peft", "pytorch_lora_weights"), ("kohya", "lora_kohya")] {
            std::fs::copy(
                out.join(format!("{file}.safetensors")),
                dest.join(format!("te_trained_{case}_{form}.safetensors")),
            )
            .unwrap();
        }
    }
}

#[test]
fn text_encoder_lr_scales_only_the_text_encoder_adapters() {
    let tmp = tempfile::tempdir().unwrap();
    let data = write_pairs(&tmp.path().join("data"), 3, 5);
    let run = |name: &str, te_lr: Option<&str>| -> Vec<(String, Tensor)> {
        let dir = tmp.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let r = recipe_for(&sd15(), &dir, &data, "dpo", "");
        let mut args = te_run(2);
        if let Some(v) = te_lr {
            args.extend(["--set".to_string(), format!("lora.text_encoder_lr={v}")]);
        }
        train(&r, &args.iter().map(String::as_str).collect::<Vec<_>>());
        sorted_tensors(&dir.join("out/pytorch_lora_weights.safetensors"))
    };
    let moved = |w: &[(String, Tensor)], prefix: &str| {
        w.iter()
            .filter(|(k, _)| k.starts_with(prefix) && k.contains("lora_B"))
            .any(|(_, t)| max_abs(t) > 0.0)
    };
    let default = run("default", None);
    // The recipe's lr (te_run's 1e-2) given as text_encoder_lr is the default run, bit for bit.
    let same = run("same", Some("1e-2"));
    for ((k, a), (_, b)) in default.iter().zip(&same) {
        assert_eq!(max_abs_diff(a, b), 0.0, "{k}");
    }
    let frozen = run("frozen", Some("0.0"));
    assert!(moved(&frozen, "unet.") && !moved(&frozen, "text_encoder."));
    assert!(moved(&default, "text_encoder."));

    let r = recipe_for(&sd15(), tmp.path(), &data, "dpo", "");
    let sets = ["lora.rank=2".to_string(), "lora.text_encoder_lr=1e-4".to_string()];
    let e = diffalign::recipe::Plan::load(&r, &sets)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        e.contains("lora.text_encoder_lr") && e.contains("text_encoder = true"),
        "{e}"
    );
}
