//! LoRA: the diffusers/PEFT, old diffusers and kohya forms against diffusers' `load_lora_weights`
//! (`tests/fixtures/lora/`, made by `tests/fixtures/gen_lora.py`), fusing, the `lora merge` and
//! `lora convert` commands, `generate --lora`, fresh trainable adapters and their gradients,
//! saving (checked in diffusers), and errors.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use common::*;
use diffalign::models::unet::UNet2DConditionModel;
use diffalign::nn::conv::Conv2dConfig;
use diffalign::nn::{Conv2d, Linear};
use diffalign::rng::Rng;
use diffalign::sampling::load::load_text_encoder;
use diffalign::sampling::pipeline::PipelineSources;
use diffalign::sampling::StableDiffusionPipeline;
use diffalign::weights::lora::{
    fuse_store, kohya_to_module, module_to_kohya, save_kohya, save_peft, LdmNames, LoraFormat, METADATA_KEY,
};
use diffalign::weights::{LoadOptions, LoraConfig, LoraSource, TensorStore, VarBuilder};
use diffalign::Error;

fn sd15() -> PathBuf {
    shared_fixtures().join("sd15")
}

fn unet_weights() -> PathBuf {
    sd15().join("unet/diffusion_pytorch_model.safetensors")
}

/// The shared PEFT LoRA: rank 4, alpha 8 (scale 2) on to_q, to_k, to_v, to_out.0.
fn policy_lora() -> PathBuf {
    shared_fixtures().join("sd15-losses/policy_lora/pytorch_lora_weights.safetensors")
}

fn lora_fixtures() -> PathBuf {
    own_fixtures().join("lora")
}

fn expected() -> HashMap<String, Tensor> {
    load(&lora_fixtures().join("expected.safetensors"))
}

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_diffalign"))
}

fn opts_with(source: LoraSource) -> LoadOptions {
    LoadOptions {
        lora: Some(Arc::new(source)),
        ..Default::default()
    }
}

/// The sd15 UNet with `source` attached through [`LoadOptions::lora`].
fn unet_with(source: LoraSource) -> (UNet2DConditionModel, VarBuilder) {
    UNet2DConditionModel::from_pretrained(&sd15().join("unet"), &opts_with(source)).unwrap()
}

fn try_unet_with(path: &Path) -> diffalign::Result<UNet2DConditionModel> {
    let source = LoraSource::from_file(path, "unet", false)?;
    Ok(UNet2DConditionModel::from_pretrained(&sd15().join("unet"), &opts_with(source))?.0)
}

/// The UNet's output on the sd15 fixture's `unet.sample/timesteps/encoder_hidden_states`.
fn unet_output(unet: &UNet2DConditionModel) -> Tensor {
    let r = load(&sd15().join("reference.safetensors"));
    unet.forward(
        &r["unet.sample"],
        &r["unet.timesteps"],
        &r["unet.encoder_hidden_states"],
        None,
    )
    .unwrap()
}

fn base_output() -> Tensor {
    load(&sd15().join("reference.safetensors"))["unet.output"].clone()
}

/// Checks the UNet with LoRA file `path` against diffusers' output `expected[key]`, and that the
/// LoRA changes the output well beyond the tolerance.
fn check_against_diffusers(path: &Path, key: &str) {
    let (unet, vb) = unet_with(LoraSource::from_file(path, "unet", false).unwrap());
    assert!(!vb.lora_adapters().is_empty());
    let out = unet_output(&unet);
    assert_close(
        &format!("{} vs diffusers {key}", path.display()),
        &out,
        &expected()[key],
        MODULE_ATOL,
    );
    let moved = max_abs_diff(&out, &base_output());
    assert!(
        moved > 100.0 * MODULE_ATOL,
        "{key}: the LoRA barely changes the output ({moved})"
    );
}

/// Writes `tensors` with `metadata` to `path`.
fn write(path: &Path, tensors: &HashMap<String, Tensor>, metadata: Option<HashMap<String, String>>) {
    diffalign::weights::save_safetensors(path, tensors, metadata).unwrap();
}

/// The shared LoRA's tensors (no metadata).
fn policy_tensors() -> HashMap<String, Tensor> {
    load(&policy_lora())
}

fn sum_abs(t: &Tensor) -> f32 {
    t.abs()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

// ---------------------------------------------------------------------------------------------
// Files against diffusers

#[test]
fn lora_peft_shared_fixture_attaches_every_module_and_matches_diffusers() {
    let source = LoraSource::from_file(&policy_lora(), "unet", false).unwrap();
    assert_eq!(source.format(), Some(LoraFormat::Peft));
    assert!(source.ignored_keys().is_empty());
    let n_keys = source.keys().len();
    let (unet, vb) = unet_with(source);
    let adapters = vb.lora_adapters();
    assert_eq!(2 * adapters.len(), n_keys, "every A/B pair attaches");
    for (module, a) in &adapters {
        assert_eq!(a.rank(), 4, "{module}");
        assert_eq!(a.scale, 2.0, "{module}: alpha 8 / r 4");
        assert!(
            ["to_q", "to_k", "to_v", "to_out.0"].iter().any(|t| module.ends_with(t)),
            "{module}"
        );
    }
    assert!(vb.lora_vars().is_empty(), "a frozen LoRA has no Vars");
    assert!(vb.vars().is_empty());
    let out = unet_output(&unet);
    assert_close("peft", &out, &expected()["peft.output"], MODULE_ATOL);
}

#[test]
fn lora_peft_without_metadata_has_scale_one_and_matches_diffusers() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("no_metadata.safetensors");
    write(&path, &policy_tensors(), None);
    let (_, vb) = unet_with(LoraSource::from_file(&path, "unet", false).unwrap());
    assert!(vb.lora_adapters().iter().all(|(_, a)| a.scale == 1.0));
    check_against_diffusers(&path, "peft_no_metadata.output");
}

/// rsLoRA with ordered `alpha_pattern` keys (the first match wins: `to_k` before `attn2.to_k`)
/// and a `rank_pattern`, as PEFT reads them; the metadata is the one gen_lora.py gave diffusers.
#[test]
fn lora_peft_rank_alpha_patterns_and_rslora_match_diffusers() {
    let meta = metadata(&lora_fixtures().join("expected.safetensors"));
    let config = meta["peft_patterns.lora_adapter_metadata"].clone();
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("patterns.safetensors");
    write(
        &path,
        &policy_tensors(),
        Some(HashMap::from([(METADATA_KEY.to_string(), config)])),
    );
    let (_, vb) = unet_with(LoraSource::from_file(&path, "unet", false).unwrap());
    let scales: HashMap<String, f64> = vb.lora_adapters().into_iter().map(|(m, a)| (m, a.scale)).collect();
    // lora_alpha 8, r 4, rslora: 8 / 2; `to_k` (listed first) gives every to_k alpha 2.
    assert_eq!(
        scales["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_v"],
        4.0
    );
    assert_eq!(
        scales["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"],
        1.0
    );
    assert_eq!(scales["mid_block.attentions.0.transformer_blocks.0.attn1.to_q"], 8.0);
    check_against_diffusers(&path, "peft_patterns.output");
}

#[test]
fn lora_kohya_form_with_per_module_alpha_matches_diffusers() {
    let path = lora_fixtures().join("kohya.safetensors");
    let source = LoraSource::from_file(&path, "unet", false).unwrap();
    assert_eq!(source.format(), Some(LoraFormat::Kohya));
    check_against_diffusers(&path, "kohya.output");
}

#[test]
fn lora_old_diffusers_form_matches_diffusers() {
    let path = lora_fixtures().join("old_format.safetensors");
    let source = LoraSource::from_file(&path, "unet", false).unwrap();
    assert_eq!(source.format(), Some(LoraFormat::OldDiffusers));
    check_against_diffusers(&path, "old_format.output");
}

/// A LoRA saved by [`save_peft`] (rank 2, alpha 3, on attention, feed-forward, projection,
/// resnet and strided downsampler convolutions, with one rank-1 module and per-module alphas)
/// loads in diffusers, which gives the same UNet output as diffalign.
#[test]
fn lora_rust_saved_peft_loads_in_diffusers_with_the_same_output() {
    check_against_diffusers(
        &lora_fixtures().join("rust_saved_peft.safetensors"),
        "rust_saved_peft.output",
    );
}

/// The same adapters (before the rank-1 and alpha changes) written by [`save_kohya`], as
/// diffusers reads kohya files.
#[test]
fn lora_rust_saved_kohya_loads_in_diffusers_with_the_same_output() {
    check_against_diffusers(
        &lora_fixtures().join("rust_saved_kohya.safetensors"),
        "rust_saved_kohya.output",
    );
}

/// With one set of options for the whole pipeline, the LoRA reaches the UNet only (the VAE also
/// has `to_q`/`to_k`/`to_v`/`to_out.0` layers).
#[test]
fn lora_in_load_options_reaches_only_the_unet_of_a_pipeline() {
    let opts = opts_with(LoraSource::from_file(&policy_lora(), "unet", false).unwrap());
    let sources = PipelineSources {
        root: sd15(),
        vae: None,
        unet: None,
    };
    let pipe = StableDiffusionPipeline::load(&sources, &opts).unwrap();
    assert_close(
        "pipeline unet",
        &unet_output(&pipe.unet),
        &expected()["peft.output"],
        MODULE_ATOL,
    );
}

// ---------------------------------------------------------------------------------------------
// Fusing, merging, converting

fn store_vb(source: LoraSource) -> VarBuilder {
    VarBuilder::from_store(
        TensorStore::open_file(&unet_weights()).unwrap(),
        DType::F32,
        &Device::Cpu,
    )
    .with_lora(Arc::new(source))
}

/// Sets every B of `vb`'s LoRA to `std * N(0, 1)` (B is zero at init).
fn perturb_b(vb: &VarBuilder, seed: u64, std: f64) {
    let mut rng = Rng::new(seed);
    for (name, var) in vb.lora_vars() {
        if name.ends_with("lora_B.weight") {
            let v = (rng.randn(var.dims(), &Device::Cpu).unwrap() * std).unwrap();
            var.set(&v).unwrap();
        }
    }
}

#[test]
fn lora_fused_weights_equal_adapter_outputs() {
    // Linear, from the shared file.
    let vb = store_vb(LoraSource::from_file(&policy_lora(), "unet", false).unwrap());
    let path = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_out.0";
    let lin = Linear::new(64, 64, true, vb.pp(path)).unwrap();
    assert!(lin.lora().is_some());
    let x = Rng::new(1).randn((2, 5, 64), &Device::Cpu).unwrap();
    let bias = vb.pp(path).get(&[64], "bias").unwrap();
    let fused = x
        .broadcast_matmul(&lin.fused_weight().unwrap().t().unwrap())
        .unwrap()
        .broadcast_add(&bias)
        .unwrap();
    assert_close("linear fused", &lin.forward(&x).unwrap(), &fused, 1e-5);
    let plain = x
        .broadcast_matmul(&lin.weight().t().unwrap())
        .unwrap()
        .broadcast_add(&bias)
        .unwrap();
    assert!(max_abs_diff(&lin.forward(&x).unwrap(), &plain) > 1e-3);

    // Conv2d: a 3x3 resnet conv and a strided downsampler whose windows leave a column unread.
    let cfg = LoraConfig {
        rank: 3,
        alpha: 5.0,
        target_modules: vec!["conv1".into(), "downsamplers.0.conv".into()],
        init_seed: 4,
    };
    let vb = store_vb(LoraSource::fresh(&cfg));
    let conv1 = Conv2d::same(32, 32, 3, vb.pp("down_blocks.0.resnets.0.conv1")).unwrap();
    let stride2 = Conv2dConfig {
        stride: 2,
        padding: 1,
        groups: 1,
    };
    let down = Conv2d::new(32, 32, 3, stride2, vb.pp("down_blocks.0.downsamplers.0.conv")).unwrap();
    perturb_b(&vb, 9, 0.2);
    for (name, conv, padding, stride) in [("conv1", &conv1, 1, 1), ("downsampler", &down, 1, 2)] {
        let x = Rng::new(2).randn((1, 32, 9, 9), &Device::Cpu).unwrap();
        let w = conv.fused_weight().unwrap();
        // The bias, broadcast: the layer on zeros (the adapter adds nothing there).
        let bias = conv.forward(&x.zeros_like().unwrap()).unwrap();
        let want = (x.conv2d(&w, padding, stride, 1, 1).unwrap() + bias).unwrap();
        assert_close(&format!("{name} fused"), &conv.forward(&x).unwrap(), &want, 1e-5);
        let plain = x.conv2d(conv.weight(), padding, stride, 1, 1).unwrap();
        assert!(
            max_abs_diff(
                &conv.forward(&x).unwrap(),
                &(plain + conv.forward(&x.zeros_like().unwrap()).unwrap()).unwrap()
            ) > 1e-3
        );
    }
}

#[test]
fn lora_merge_cli_writes_a_unet_folder_equal_to_the_adapter() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("merged_unet");
    let status = bin()
        .args(["lora", "merge", "--model"])
        .arg(sd15())
        .arg("--lora")
        .arg(policy_lora())
        .arg("--out")
        .arg(&out)
        .status()
        .unwrap();
    assert!(status.success());
    assert!(out.join("config.json").is_file());
    let (merged, _) = UNet2DConditionModel::from_pretrained(&out, &LoadOptions::default()).unwrap();
    let got = unet_output(&merged);
    assert_close("merged vs diffusers", &got, &expected()["peft.output"], MODULE_ATOL);
    let (adapted, _) = unet_with(LoraSource::from_file(&policy_lora(), "unet", false).unwrap());
    assert_close("merged vs adapter", &got, &unet_output(&adapted), MODULE_ATOL);
    // The folder is not overwritten.
    let again = bin()
        .args(["lora", "merge", "--model"])
        .arg(sd15().join("unet"))
        .arg("--lora")
        .arg(policy_lora())
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already exists"));
}

fn convert(from: &Path, to: &str, out: &Path) {
    let o = bin()
        .args(["lora", "convert", "--lora"])
        .arg(from)
        .args(["--to", to, "--out"])
        .arg(out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn lora_convert_cli_between_peft_and_kohya_keeps_the_output() {
    let tmp = tempfile::tempdir().unwrap();
    // PEFT -> kohya -> PEFT, from the shared file.
    let kohya = tmp.path().join("kohya.safetensors");
    convert(&policy_lora(), "kohya", &kohya);
    let k = LoraSource::from_file(&kohya, "unet", false).unwrap();
    assert_eq!(k.format(), Some(LoraFormat::Kohya));
    assert!(k.keys().iter().all(|n| n.starts_with("lora_unet_")));
    check_against_diffusers(&kohya, "peft.output");
    let peft = tmp.path().join("peft.safetensors");
    convert(&kohya, "peft", &peft);
    assert!(metadata(&peft).contains_key(METADATA_KEY));
    check_against_diffusers(&peft, "peft.output");
    // kohya with per-module alphas -> PEFT (alpha_pattern).
    let peft2 = tmp.path().join("peft2.safetensors");
    convert(&lora_fixtures().join("kohya.safetensors"), "peft", &peft2);
    check_against_diffusers(&peft2, "kohya.output");
    // A Rust-saved file with a rank pattern and conv adapters, to kohya.
    let kohya2 = tmp.path().join("kohya2.safetensors");
    convert(&lora_fixtures().join("rust_saved_peft.safetensors"), "kohya", &kohya2);
    check_against_diffusers(&kohya2, "rust_saved_peft.output");
}

#[test]
fn lora_kohya_names_map_back_to_every_sd15_module() {
    let store = TensorStore::open_file(&unet_weights()).unwrap();
    let mut n = 0;
    for name in store.names() {
        let Some(module) = name.strip_suffix(".weight") else {
            continue;
        };
        if matches!(store.shape(&name).unwrap().len(), 2 | 4) {
            assert_eq!(kohya_to_module(&module_to_kohya(module)), module);
            n += 1;
        }
    }
    assert!(n > 50);
}

/// `generate --lora` gives the image of `generate --unet <merged folder>`, not the base image.
#[test]
fn lora_generate_cli_flag_applies_the_lora() {
    let tmp = tempfile::tempdir().unwrap();
    let merged = tmp.path().join("unet");
    let status = bin()
        .args(["lora", "merge", "--model"])
        .arg(sd15())
        .arg("--lora")
        .arg(policy_lora())
        .arg("--out")
        .arg(&merged)
        .status()
        .unwrap();
    assert!(status.success());
    let run = |extra: &[&std::ffi::OsStr], name: &str| -> Tensor {
        let out = tmp.path().join(name);
        let o = bin()
            .args(["generate", "--model"])
            .arg(sd15())
            .args([
                "--prompt",
                "a red circle",
                "--steps",
                "2",
                "--height",
                "64",
                "--width",
                "64",
                "--seed",
                "3",
            ])
            .args(extra)
            .arg("--out")
            .arg(&out)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        diffalign::sampling::image_io::load_image(&out)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
    };
    let with_lora = run(&["--lora".as_ref(), policy_lora().as_os_str()], "lora.png");
    let with_merged = run(&["--unet".as_ref(), merged.as_os_str()], "merged.png");
    let base = run(&[], "base.png");
    assert_close("--lora vs merged --unet", &with_lora, &with_merged, IMAGE_ATOL);
    assert!(max_abs_diff(&with_lora, &base) > 0.05, "--lora changed nothing");
}

// ---------------------------------------------------------------------------------------------
// Fresh trainable adapters

fn fresh_config() -> LoraConfig {
    LoraConfig {
        rank: 4,
        alpha: 4.0,
        target_modules: ["to_q", "to_k", "to_v", "to_out.0"].map(String::from).to_vec(),
        init_seed: 0,
    }
}

/// Backpropagates `sum(out * w)` for a fixed random `w`.
fn backward(out: &Tensor) -> candle_core::backprop::GradStore {
    let w = Rng::new(1234)
        .randn(out.dims(), out.device())
        .unwrap()
        .to_dtype(out.dtype())
        .unwrap();
    (out * w).unwrap().sum_all().unwrap().backward().unwrap()
}

/// B is zero at init, so the adapted UNet equals the base one, B's gradients are nonzero and A's
/// are exactly zero; once B moves (as after one optimiser step), every A and B gets a gradient.
/// The base weights are constants: no `Var`s, no gradients.
#[test]
fn lora_fresh_every_var_gets_a_gradient_and_base_weights_none() {
    let (unet, vb) = unet_with(LoraSource::fresh(&fresh_config()));
    assert!(vb.vars().is_empty(), "base weights are frozen");
    let vars = vb.lora_vars();
    assert_eq!(vars.len(), 2 * vb.lora_adapters().len());
    assert!(vars.len() >= 2 * 4 * 7, "{} LoRA vars", vars.len());
    for (name, var) in &vars {
        assert!(name.starts_with("unet.") && (name.ends_with(".lora_A.weight") || name.ends_with(".lora_B.weight")));
        assert_eq!(var.dtype(), DType::F32);
    }
    let out = unet_output(&unet);
    assert_close("fresh LoRA is the identity", &out, &base_output(), MODULE_ATOL);
    let grads = backward(&out);
    for (name, var) in &vars {
        let g = sum_abs(
            grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{name}: no gradient")),
        );
        if name.ends_with("lora_B.weight") {
            assert!(g > 0.0, "{name}: zero gradient");
        } else {
            assert_eq!(g, 0.0, "{name}: A's gradient is zero while B is zero");
        }
    }
    perturb_b(&vb, 3, 0.01);
    let out = unet_output(&unet);
    assert!(
        max_abs_diff(&out, &base_output()) > 0.0,
        "B's update shows through the model"
    );
    let grads = backward(&out);
    let missing: Vec<&String> = vars
        .iter()
        .filter(|(_, v)| grads.get(v.as_tensor()).is_none_or(|g| sum_abs(g) == 0.0))
        .map(|(n, _)| n)
        .collect();
    assert!(missing.is_empty(), "without gradient: {missing:?}");
}

#[test]
fn lora_fresh_linear_base_weight_is_a_constant_without_gradient() {
    let vb = store_vb(LoraSource::fresh(&fresh_config()));
    let lin = Linear::new(
        32,
        32,
        false,
        vb.pp("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"),
    )
    .unwrap();
    perturb_b(&vb, 5, 0.1);
    assert!(!lin.weight().is_variable());
    let out = lin.forward(&Rng::new(2).randn((3, 32), &Device::Cpu).unwrap()).unwrap();
    let grads = backward(&out);
    assert!(grads.get(lin.weight()).is_none());
    for (name, var) in vb.lora_vars() {
        assert!(sum_abs(grads.get(var.as_tensor()).unwrap()) > 0.0, "{name}");
    }
}

/// In a half-precision model the adapters stay f32 master weights; forward casts them.
#[test]
fn lora_fresh_adapters_stay_f32_in_an_f16_model() {
    let vb = VarBuilder::from_store(
        TensorStore::open_file(&unet_weights()).unwrap(),
        DType::F16,
        &Device::Cpu,
    )
    .with_lora(Arc::new(LoraSource::fresh(&fresh_config())));
    let lin = Linear::new(
        32,
        32,
        false,
        vb.pp("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"),
    )
    .unwrap();
    perturb_b(&vb, 5, 0.1);
    assert_eq!(lin.lora().unwrap().a.dtype(), DType::F32);
    let x = Rng::new(2)
        .randn((3, 32), &Device::Cpu)
        .unwrap()
        .to_dtype(DType::F16)
        .unwrap();
    let out = lin.forward(&x).unwrap();
    assert_eq!(out.dtype(), DType::F16);
    let grads = backward(&out);
    for (name, var) in vb.lora_vars() {
        let g = grads.get(var.as_tensor()).unwrap();
        assert_eq!(g.dtype(), DType::F32, "{name}");
        assert!(sum_abs(g) > 0.0, "{name}");
    }
}

/// A trained (perturbed) fresh LoRA saved by `save_peft` / `save_kohya` loads back to the same
/// UNet output; its `lora_vars` names are the saved file's keys.
#[test]
fn lora_fresh_saved_peft_and_kohya_load_back_to_the_same_output() {
    let cfg = fresh_config();
    let (unet, vb) = unet_with(LoraSource::fresh(&cfg));
    let mut rng = Rng::new(8);
    for (_, var) in vb.lora_vars() {
        let v = (rng.randn(var.dims(), &Device::Cpu).unwrap() * 0.05).unwrap();
        var.set(&v).unwrap();
    }
    let want = unet_output(&unet);
    let tmp = tempfile::tempdir().unwrap();
    let peft = tmp.path().join("peft.safetensors");
    save_peft(&peft, &vb.lora_adapters(), cfg.rank, cfg.alpha, &cfg.target_modules).unwrap();
    let saved: Vec<String> = {
        let mut k: Vec<String> = load(&peft).into_keys().collect();
        k.sort();
        k
    };
    let mut names: Vec<String> = vb.lora_vars().into_iter().map(|(n, _)| n).collect();
    names.sort();
    assert_eq!(saved, names, "lora_vars are named as in the saved file");
    let config: serde_json::Value = serde_json::from_str(&metadata(&peft)[METADATA_KEY]).unwrap();
    assert_eq!(config["unet.r"], 4);
    assert_eq!(config["unet.lora_alpha"], 4);
    let (reloaded, _) = unet_with(LoraSource::from_file(&peft, "unet", false).unwrap());
    assert_close("peft reload", &unet_output(&reloaded), &want, 1e-5);
    let kohya = tmp.path().join("kohya.safetensors");
    save_kohya(&kohya, &vb.lora_adapters(), None).unwrap();
    let (reloaded, _) = unet_with(LoraSource::from_file(&kohya, "unet", false).unwrap());
    assert_close("kohya reload", &unet_output(&reloaded), &want, 1e-5);
}

/// A file LoRA loaded as trainable: its Vars carry the file's own key names (for gradients
/// written "under the LoRA file's own key names"), all get gradients.
#[test]
fn lora_trainable_file_vars_use_the_file_key_names() {
    let (unet, vb) = unet_with(LoraSource::from_file(&policy_lora(), "unet", true).unwrap());
    let mut names: Vec<String> = vb.lora_vars().into_iter().map(|(n, _)| n).collect();
    names.sort();
    let mut keys: Vec<String> = policy_tensors().into_keys().collect();
    keys.sort();
    assert_eq!(names, keys);
    let out = unet_output(&unet);
    assert_close("trainable peft", &out, &expected()["peft.output"], MODULE_ATOL);
    let grads = backward(&out);
    for (name, var) in vb.lora_vars() {
        assert!(sum_abs(grads.get(var.as_tensor()).unwrap()) > 0.0, "{name}");
    }
}

/// The modules of the Rust-saved fixture LoRAs: attention, feed-forward, projection, resnet and
/// strided downsampler layers.
const SAVED_TARGETS: [&str; 12] = [
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "ff.net.0.proj",
    "ff.net.2",
    "proj_in",
    "proj_out",
    "conv1",
    "conv2",
    "time_emb_proj",
    "downsamplers.0.conv",
];

/// Regenerates `tests/fixtures/lora/rust_saved_{peft,kohya}.safetensors`, which gen_lora.py then
/// loads in diffusers (see its docstring):
/// `cargo test --test lora -- --ignored lora_write_rust_saved_fixtures`.
#[test]
#[ignore = "regenerates committed fixtures"]
fn lora_write_rust_saved_fixtures() {
    let cfg = LoraConfig {
        rank: 2,
        alpha: 3.0,
        target_modules: SAVED_TARGETS.map(String::from).to_vec(),
        init_seed: 11,
    };
    let (_, vb) = unet_with(LoraSource::fresh(&cfg));
    perturb_b(&vb, 12, 0.1);
    let dir = lora_fixtures();
    std::fs::create_dir_all(&dir).unwrap();
    // kohya: one rank and alpha throughout (diffusers 0.42.1 drops per-module kohya alphas; see
    // gen_lora.py).
    save_kohya(&dir.join("rust_saved_kohya.safetensors"), &vb.lora_adapters(), None).unwrap();
    let mut adapters = vb.lora_adapters();
    for (module, a) in adapters.iter_mut() {
        // One module of rank 1 (rank_pattern) and per-module alphas (alpha_pattern).
        if module == "mid_block.attentions.0.transformer_blocks.0.attn1.to_q" {
            a.a = a.a.narrow(0, 0, 1).unwrap().contiguous().unwrap();
            a.b = a.b.narrow(1, 0, 1).unwrap().contiguous().unwrap();
        }
        if module.ends_with("attn2.to_k") {
            a.scale = 2.0;
        }
    }
    save_peft(
        &dir.join("rust_saved_peft.safetensors"),
        &adapters,
        cfg.rank,
        cfg.alpha,
        &cfg.target_modules,
    )
    .unwrap();
}

// ---------------------------------------------------------------------------------------------
// SDXL kohya files with LDM block names

/// The tiny SDXL-architecture UNet (down blocks DownBlock2D, CrossAttn, CrossAttn; 2 layers each).
fn sdxl_unet() -> PathBuf {
    own_fixtures().join("sdxl/unet")
}

fn sdxl_store() -> TensorStore {
    TensorStore::open_file(&sdxl_unet().join("diffusion_pytorch_model.safetensors")).unwrap()
}

/// `lora` fused into the SDXL fixture UNet by `fuse_store` equals diffusers' adapted weights of
/// `case` in sdxl_expected.safetensors (gen_lora.py `sdxl`), module by module, and adapts no other.
fn check_sdxl_fused(lora: &Path, case: &str) {
    let want = load(&lora_fixtures().join("sdxl_expected.safetensors"));
    let source = LoraSource::from_file(lora, "unet", false).unwrap();
    let store = sdxl_store();
    let fused: HashMap<String, Tensor> = fuse_store(&store, &source, DType::F32, &Device::Cpu)
        .unwrap()
        .into_iter()
        .collect();
    let prefix = format!("{case}.");
    let mut n = 0;
    for (key, w) in want.iter().filter(|(k, _)| k.starts_with(&prefix)) {
        let name = format!("{}.weight", &key[prefix.len()..]);
        assert_close(&name, &fused[&name], w, 1e-5);
        n += 1;
    }
    assert_eq!(n, source.keys().len() / 3, "{case}: one expected weight per adapter");
    for (name, w) in &fused {
        let module = name.strip_suffix(".weight").unwrap_or(name);
        if !want.contains_key(&format!("{prefix}{module}")) {
            let base = store.get(name, None, DType::F32, &Device::Cpu).unwrap();
            assert_eq!(max_abs_diff(w, &base), 0.0, "{name} changed");
        }
    }
}

#[test]
fn lora_sdxl_kohya_ldm_names_give_diffusers_adapted_weights() {
    let path = lora_fixtures().join("sdxl_kohya.safetensors");
    let source = LoraSource::from_file(&path, "unet", false).unwrap();
    assert!(source.has_ldm_names());
    assert!(source
        .keys()
        .iter()
        .any(|k| k.starts_with("lora_unet_input_blocks_4_1_")));
    check_sdxl_fused(&path, "sdxl_kohya");
}

#[test]
fn lora_sdxl_kohya_attaches_to_every_module_through_load_options() {
    let path = lora_fixtures().join("sdxl_kohya.safetensors");
    let source = LoraSource::from_file(&path, "unet", false).unwrap();
    let n = source.keys().len() / 3;
    let (_, vb) = UNet2DConditionModel::from_pretrained(&sdxl_unet(), &opts_with(source)).unwrap();
    assert_eq!(vb.lora_adapters().len(), n);
    assert!(vb.kohya_names().is_some(), "an SDXL UNet takes LDM kohya names");
}

#[test]
fn lora_ldm_names_map_back_to_every_module_and_only_sdxl_uses_them() {
    for (store, sdxl) in [
        (sdxl_store(), true),
        (TensorStore::open_file(&unet_weights()).unwrap(), false),
    ] {
        let names = LdmNames::from_names(&store.names());
        assert_eq!(names.is_sdxl(), sdxl);
        let mut n = 0;
        for name in store.names() {
            let Some(module) = name.strip_suffix(".weight") else {
                continue;
            };
            if matches!(store.shape(&name).unwrap().len(), 2 | 4) {
                let kohya = names
                    .to_kohya(module)
                    .unwrap_or_else(|| panic!("{module}: no LDM name"));
                assert_eq!(names.from_kohya(&kohya).as_deref(), Some(module), "{kohya}");
                n += 1;
            }
        }
        assert!(n > 50);
    }
    let names = LdmNames::from_names(&sdxl_store().names());
    for (module, ldm) in [
        ("down_blocks.0.downsamplers.0.conv", "input_blocks.3.0.op"),
        ("down_blocks.1.attentions.1.proj_in", "input_blocks.5.1.proj_in"),
        ("mid_block.resnets.1.time_emb_proj", "middle_block.2.emb_layers.1"),
        ("up_blocks.0.upsamplers.0.conv", "output_blocks.2.2.conv"),
        (
            "up_blocks.2.resnets.2.conv_shortcut",
            "output_blocks.8.0.skip_connection",
        ),
        ("add_embedding.linear_2", "label_emb.0.2"),
    ] {
        assert_eq!(names.to_ldm(module).as_deref(), Some(ldm));
    }
}

fn sdxl_fresh_config() -> LoraConfig {
    LoraConfig {
        rank: 2,
        alpha: 3.0,
        // Every Linear and Conv2d kind: SAVED_TARGETS plus shortcuts, upsamplers and the top level.
        target_modules: SAVED_TARGETS
            .into_iter()
            .chain([
                "conv_shortcut",
                "upsamplers.0.conv",
                "conv_in",
                "conv_out",
                "linear_1",
                "linear_2",
            ])
            .map(String::from)
            .collect(),
        init_seed: 21,
    }
}

/// A trained (perturbed) fresh LoRA on the SDXL fixture UNet saved in kohya form takes LDM names,
/// as sd-scripts writes SDXL files.
fn save_sdxl_fresh_kohya(out: &Path) {
    let source = LoraSource::fresh(&sdxl_fresh_config());
    let (_, vb) = UNet2DConditionModel::from_pretrained(&sdxl_unet(), &opts_with(source)).unwrap();
    perturb_b(&vb, 22, 0.1);
    save_kohya(out, &vb.lora_adapters(), vb.kohya_names()).unwrap();
}

/// Regenerates `tests/fixtures/lora/rust_saved_sdxl_kohya.safetensors`, which `gen_lora.py sdxl`
/// loads in diffusers: `cargo test --test lora -- --ignored lora_write_rust_saved_sdxl_fixture`.
#[test]
#[ignore = "regenerates committed fixtures"]
fn lora_write_rust_saved_sdxl_fixture() {
    save_sdxl_fresh_kohya(&lora_fixtures().join("rust_saved_sdxl_kohya.safetensors"));
}

#[test]
fn lora_rust_saved_sdxl_kohya_gives_diffusers_adapted_weights() {
    let path = lora_fixtures().join("rust_saved_sdxl_kohya.safetensors");
    let source = LoraSource::from_file(&path, "unet", false).unwrap();
    assert!(source.has_ldm_names());
    check_sdxl_fused(&path, "rust_saved_sdxl_kohya");
    // The fixture is what the saver writes today.
    let tmp = tempfile::tempdir().unwrap();
    let again = tmp.path().join("again.safetensors");
    save_sdxl_fresh_kohya(&again);
    let (a, b) = (load(&path), load(&again));
    assert_eq!(a.len(), b.len());
    for (k, t) in &a {
        assert_eq!(max_abs_diff(t, &b[k]), 0.0, "{k}");
    }
}

/// `train` with `[lora]` on the SDXL fixture writes its kohya copy with LDM names (as sd-scripts
/// does for SDXL) that adapts the UNet exactly as its PEFT file; `gen_lora.py --check-sdxl` then
/// checks such a file in diffusers (see the README).
#[test]
fn lora_trained_on_sdxl_saves_kohya_with_ldm_names() {
    let tmp = tempfile::tempdir().unwrap();
    let data = common::pairs::write_pairs(&tmp.path().join("data"), 2, 3);
    let extra = "[lora]\nrank = 2\nalpha = 4\ntargets = [\"to_q\", \"to_out.0\", \"conv1\", \"proj_in\"]";
    let r = common::pairs::recipe_for(&own_fixtures().join("sdxl"), tmp.path(), &data, "dpo", "");
    let text = std::fs::read_to_string(&r)
        .unwrap()
        .replace("[output]", &format!("{extra}\n\n[output]"));
    std::fs::write(&r, text).unwrap();
    let o = bin()
        .arg("train")
        .arg(&r)
        .args(["--set", "train.steps=2", "--set", "train.lr=1e-2"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = tmp.path().join("out");
    let kohya = LoraSource::from_file(&out.join("lora_kohya.safetensors"), "unet", false).unwrap();
    assert!(kohya.has_ldm_names());
    let peft = LoraSource::from_file(&out.join("pytorch_lora_weights.safetensors"), "unet", false).unwrap();
    let store = sdxl_store();
    let fused = |s: &LoraSource| fuse_store(&store, s, DType::F32, &Device::Cpu).unwrap();
    let mut changed = 0;
    for ((name, k), (_, p)) in fused(&kohya).iter().zip(fused(&peft).iter()) {
        assert_eq!(max_abs_diff(k, p), 0.0, "{name}");
        let base = store.get(name, None, DType::F32, &Device::Cpu).unwrap();
        changed += usize::from(max_abs_diff(k, &base) > 0.0);
    }
    assert_eq!(changed, kohya.keys().len() / 3, "every adapter trained away from zero");
}

#[test]
fn lora_convert_cli_sdxl_kohya_uses_the_base_model_naming() {
    let tmp = tempfile::tempdir().unwrap();
    let src = lora_fixtures().join("sdxl_kohya.safetensors");
    let model = own_fixtures().join("sdxl");
    let run = |from: &Path, to: &str, out: &Path, model: Option<&Path>| {
        let mut c = bin();
        c.args(["lora", "convert", "--lora"])
            .arg(from)
            .args(["--to", to, "--out"])
            .arg(out);
        if let Some(m) = model {
            c.arg("--model").arg(m);
        }
        c.output().unwrap()
    };
    // LDM names cannot be read without the base UNet.
    let o = run(&src, "peft", &tmp.path().join("x.safetensors"), None);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--model"));
    // kohya (LDM) -> PEFT -> kohya: LDM names again, and the same adapted weights.
    let peft = tmp.path().join("peft.safetensors");
    assert!(run(&src, "peft", &peft, Some(&model)).status.success());
    let p = LoraSource::from_file(&peft, "unet", false).unwrap();
    assert_eq!(p.format(), Some(LoraFormat::Peft));
    let kohya = tmp.path().join("kohya.safetensors");
    let o = run(&peft, "kohya", &kohya, Some(&model));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let k = LoraSource::from_file(&kohya, "unet", false).unwrap();
    assert!(k.has_ldm_names());
    let mut keys = k.keys();
    let mut want = LoraSource::from_file(&src, "unet", false).unwrap().keys();
    keys.sort();
    want.sort();
    assert_eq!(keys, want);
    check_sdxl_fused(&kohya, "sdxl_kohya");
}

// ---------------------------------------------------------------------------------------------
// Text-encoder LoRAs

/// Both text encoders of `te_{form}.safetensors` fused by `fuse_store` equal diffusers' adapted
/// weights (te_expected.safetensors, gen_lora.py `te`), and no other weight changes.
fn check_te_fused(path: &Path) {
    let want = load(&lora_fixtures().join("te_expected.safetensors"));
    let form = path.display();
    let strip = |s: &str| s.strip_prefix("text_model.").unwrap_or(s).to_string();
    let mut n = 0;
    for component in ["text_encoder", "text_encoder_2"] {
        let source = LoraSource::from_file(path, component, false).unwrap();
        assert!(!source.ignored_keys().is_empty(), "the other encoder's keys are listed");
        let store =
            TensorStore::open_file(&own_fixtures().join(format!("sdxl/{component}/model.safetensors"))).unwrap();
        assert!(source.applies_to(&store));
        let want: HashMap<String, &Tensor> = want
            .iter()
            .filter_map(|(k, v)| Some((strip(k.strip_prefix(&format!("{component}."))?), v)))
            .collect();
        for (name, w) in fuse_store(&store, &source, DType::F32, &Device::Cpu).unwrap() {
            let module = strip(name.strip_suffix(".weight").unwrap_or(&name));
            match want.get(&module) {
                Some(t) => {
                    assert_close(&format!("{form} {component} {name}"), &w, t, 1e-5);
                    n += 1;
                }
                None => {
                    let base = store.get(&name, None, DType::F32, &Device::Cpu).unwrap();
                    assert_eq!(max_abs_diff(&w, &base), 0.0, "{name} changed");
                }
            }
        }
    }
    assert_eq!(n, want.keys().filter(|k| k.starts_with("text_encoder")).count());
}

#[test]
fn lora_text_encoder_kohya_te1_te2_give_diffusers_adapted_weights() {
    check_te_fused(&lora_fixtures().join("te_kohya.safetensors"));
}

#[test]
fn lora_text_encoder_peft_saved_by_diffusers_gives_the_same_adapted_weights() {
    check_te_fused(&lora_fixtures().join("te_peft.safetensors"));
}

/// `lora convert` keeps both text-encoder parts: kohya -> PEFT (`text_encoder.*`,
/// `text_encoder_2.*`) -> kohya (`lora_te1_*`, `lora_te2_*`), with the same adapted weights.
#[test]
fn lora_convert_cli_keeps_text_encoder_parts() {
    let tmp = tempfile::tempdir().unwrap();
    let peft = tmp.path().join("peft.safetensors");
    // With --model, the PEFT paths are the model's own (its first encoder, saved by transformers
    // 5, has no `text_model.`), as diffusers' `save_lora_weights` writes them (te_peft.safetensors).
    let o = bin()
        .args(["lora", "convert", "--lora"])
        .arg(lora_fixtures().join("te_kohya.safetensors"))
        .args(["--to", "peft", "--model"])
        .arg(own_fixtures().join("sdxl"))
        .arg("--out")
        .arg(&peft)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let mut keys = load(&peft).into_keys().collect::<Vec<_>>();
    let mut diffusers_keys = load(&lora_fixtures().join("te_peft.safetensors"))
        .into_keys()
        .collect::<Vec<_>>();
    keys.sort();
    diffusers_keys.sort();
    assert_eq!(keys, diffusers_keys);
    assert!(
        keys.iter().any(|k| k.starts_with("text_encoder.")) && keys.iter().any(|k| k.starts_with("text_encoder_2."))
    );
    check_te_fused(&peft);
    let kohya = tmp.path().join("kohya.safetensors");
    convert(&peft, "kohya", &kohya);
    let mut keys = load(&kohya).into_keys().collect::<Vec<_>>();
    let mut want = load(&lora_fixtures().join("te_kohya.safetensors"))
        .into_keys()
        .collect::<Vec<_>>();
    keys.sort();
    want.sort();
    assert_eq!(keys, want);
    check_te_fused(&kohya);
}

/// A pipeline loaded with a whole-file source (`generate --lora`'s) encodes prompts through both
/// LoRA-adapted encoders as diffusers does after `load_lora_weights`.
#[test]
fn lora_text_encoder_pipeline_prompt_embeds_match_diffusers() {
    let path = lora_fixtures().join("te_kohya.safetensors");
    let want = load(&lora_fixtures().join("te_expected.safetensors"));
    let prompt = metadata(&lora_fixtures().join("te_expected.safetensors"))["prompt"].clone();
    let source = LoraSource::from_file_all(&path, false).unwrap();
    assert_eq!(source.component(), "text_encoder");
    assert_eq!(source.others().len(), 1);
    let sources = PipelineSources {
        root: own_fixtures().join("sdxl"),
        ..Default::default()
    };
    let pipe = StableDiffusionPipeline::load(&sources, &opts_with(source)).unwrap();
    let e = pipe.encode_text(&[prompt.as_str()]).unwrap();
    assert_close("prompt_embeds", &e.context, &want["pipe.prompt_embeds"], MODULE_ATOL);
    assert_close(
        "pooled_prompt_embeds",
        e.pooled.as_ref().unwrap(),
        &want["pipe.pooled_prompt_embeds"],
        MODULE_ATOL,
    );
    let base = StableDiffusionPipeline::load(&sources, &LoadOptions::default()).unwrap();
    let b = base.encode_text(&[prompt.as_str()]).unwrap();
    assert!(
        max_abs_diff(&b.context, &e.context) > 1e-2,
        "the LoRA changes the embeddings"
    );
}

/// `lora merge` writes each text encoder the LoRA adapts, with diffusers' adapted weights; a
/// missing output flag for a component the LoRA has is an error naming the flag.
#[test]
fn lora_merge_cli_writes_adapted_text_encoders() {
    let tmp = tempfile::tempdir().unwrap();
    let lora = lora_fixtures().join("te_kohya.safetensors");
    let merge = |extra: &[&str]| {
        bin()
            .args(["lora", "merge", "--model"])
            .arg(own_fixtures().join("sdxl"))
            .arg("--lora")
            .arg(&lora)
            .args(extra)
            .output()
            .unwrap()
    };
    let (te, te2) = (tmp.path().join("te"), tmp.path().join("te2"));
    let o = merge(&["--out-text-encoder", te.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--out-text-encoder-2"));
    let o = merge(&[
        "--out-text-encoder",
        te.to_str().unwrap(),
        "--out-text-encoder-2",
        te2.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let want = load(&lora_fixtures().join("te_expected.safetensors"));
    let strip = |s: &str| s.strip_prefix("text_model.").unwrap_or(s).to_string();
    let mut n = 0;
    for (component, dir) in [("text_encoder", &te), ("text_encoder_2", &te2)] {
        assert!(dir.join("config.json").is_file());
        let merged = load(&dir.join("model.safetensors"));
        for (k, w) in &want {
            let Some(module) = k.strip_prefix(&format!("{component}.")) else {
                continue;
            };
            let got = merged
                .iter()
                .find(|(name, _)| strip(name) == format!("{}.weight", strip(module)))
                .map(|(_, t)| t)
                .unwrap_or_else(|| panic!("{k} not in the merged {component}"));
            assert_close(k, got, w, 1e-5);
            n += 1;
        }
    }
    assert_eq!(n, 30);
}

#[test]
fn lora_text_encoder_attaches_to_its_encoder_only() {
    let path = lora_fixtures().join("te_kohya.safetensors");
    for component in ["text_encoder", "text_encoder_2"] {
        let source = Arc::new(LoraSource::from_file(&path, component, false).unwrap());
        let opts = LoadOptions {
            lora: Some(source),
            ..Default::default()
        };
        // Every key of the component must attach, or loading fails (check_all_used).
        load_text_encoder(&own_fixtures().join(format!("sdxl/{component}")), &opts).unwrap();
        // The UNet is not a text encoder: nothing attaches there.
        let (_, vb) = UNet2DConditionModel::from_pretrained(&sdxl_unet(), &opts).unwrap();
        assert!(vb.lora_adapters().is_empty());
    }
}

// ---------------------------------------------------------------------------------------------
// Errors

fn peft_pair(module: &str, a: &[usize], b: &[usize]) -> HashMap<String, Tensor> {
    HashMap::from([
        (
            format!("unet.{module}.lora_A.weight"),
            Tensor::zeros(a, DType::F32, &Device::Cpu).unwrap(),
        ),
        (
            format!("unet.{module}.lora_B.weight"),
            Tensor::zeros(b, DType::F32, &Device::Cpu).unwrap(),
        ),
    ])
}

#[test]
fn lora_keys_matching_no_unet_module_are_an_error_naming_them() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("other_arch.safetensors");
    let mut t = policy_tensors();
    // An SDXL-like module the sd15 UNet does not have, and a misspelled one.
    t.extend(peft_pair(
        "down_blocks.2.attentions.0.transformer_blocks.0.attn1.to_q",
        &[4, 64],
        &[64, 4],
    ));
    t.extend(peft_pair(
        "mid_block.attentions.0.transformer_blocks.0.attn1.to_query",
        &[4, 64],
        &[64, 4],
    ));
    write(&path, &t, None);
    let err = try_unet_with(&path).unwrap_err();
    let msg = err.to_string();
    match &err {
        Error::UnusedTensors { file, names } => {
            assert_eq!(file, &path);
            assert_eq!(names.len(), 4, "{names:?}");
        }
        other => panic!("unexpected error: {other}"),
    }
    assert!(
        msg.contains("unet.down_blocks.2.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight"),
        "{msg}"
    );
    assert!(msg.contains("to_query"), "{msg}");
}

#[test]
fn lora_rank_mismatched_pair_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("rank.safetensors");
    let module = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q";
    write(&path, &peft_pair(module, &[4, 32], &[32, 3]), None);
    let msg = LoraSource::from_file(&path, "unet", false).unwrap_err().to_string();
    assert!(msg.contains(&format!("unet.{module}.lora_A.weight")), "{msg}");
    assert!(msg.contains(&format!("unet.{module}.lora_B.weight")), "{msg}");
    assert!(msg.contains("[4, 32]") && msg.contains("[32, 3]"), "{msg}");
}

#[test]
fn lora_tensor_not_fitting_its_module_names_key_file_and_shapes() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("shape.safetensors");
    let module = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q";
    write(&path, &peft_pair(module, &[4, 33], &[32, 4]), None);
    let err = try_unet_with(&path).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains(&path.display().to_string()), "{msg}");
    assert!(msg.contains(&format!("unet.{module}.lora_A.weight")), "{msg}");
    assert!(msg.contains("[4, 32]") && msg.contains("[4, 33]"), "{msg}");
}

#[test]
fn lora_truncated_file_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("truncated.safetensors");
    let bytes = std::fs::read(policy_lora()).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let msg = LoraSource::from_file(&path, "unet", false).unwrap_err().to_string();
    assert!(
        msg.contains(&path.display().to_string()) && msg.contains("truncated"),
        "{msg}"
    );
}

#[test]
fn lora_text_encoder_keys_are_listed_and_not_applied() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("with_te.safetensors");
    let mut t = policy_tensors();
    let te = "text_encoder.text_model.encoder.layers.0.self_attn.q_proj";
    t.insert(
        format!("{te}.lora_A.weight"),
        Tensor::zeros((4, 32), DType::F32, &Device::Cpu).unwrap(),
    );
    t.insert(
        format!("{te}.lora_B.weight"),
        Tensor::zeros((32, 4), DType::F32, &Device::Cpu).unwrap(),
    );
    t.insert(
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha".into(),
        Tensor::new(4f32, &Device::Cpu).unwrap(),
    );
    write(&path, &t, None);
    let source = LoraSource::from_file(&path, "unet", false).unwrap();
    assert_eq!(source.ignored_keys().len(), 3);
    assert!(source
        .ignored_keys()
        .iter()
        .all(|k| k.starts_with("text_encoder.") || k.starts_with("lora_te_")));
    let (unet, _) = unet_with(source);
    assert_close(
        "with te keys",
        &unet_output(&unet),
        &expected()["peft_no_metadata.output"],
        MODULE_ATOL,
    );
}

#[test]
fn lora_unsupported_keys_are_an_error_naming_them() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("dora.safetensors");
    let mut t = policy_tensors();
    let key = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_magnitude_vector";
    t.insert(key.into(), Tensor::zeros(32, DType::F32, &Device::Cpu).unwrap());
    t.insert(
        "lora_unet_down_blocks_0_resnets_0_conv1.hada_w1_a".into(),
        Tensor::zeros((4, 4), DType::F32, &Device::Cpu).unwrap(),
    );
    write(&path, &t, None);
    let msg = LoraSource::from_file(&path, "unet", false).unwrap_err().to_string();
    assert!(msg.contains(key) && msg.contains("hada_w1_a"), "{msg}");
}

/// Each known adapter kind that is not implemented is refused by name, with the first key.
#[test]
fn lora_dora_and_lycoris_keys_are_refused_naming_the_kind_and_key() {
    let tmp = tempfile::tempdir().unwrap();
    let kohya = load(&lora_fixtures().join("kohya.safetensors"));
    let module = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q";
    for (key, kind) in [
        (format!("{module}.dora_scale"), "DoRA"),
        (
            "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_magnitude_vector".into(),
            "DoRA",
        ),
        (
            "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.dora_scale".into(),
            "DoRA",
        ),
        (format!("{module}.hada_w1_a"), "LoHa"),
        (format!("{module}.lokr_w1"), "LoKr"),
        (format!("{module}.lora_mid.weight"), "Tucker"),
        (format!("{module}.diff"), "weight difference"),
    ] {
        let mut t = kohya.clone();
        t.insert(key.clone(), Tensor::zeros(4, DType::F32, &Device::Cpu).unwrap());
        let path = tmp.path().join("x.safetensors");
        write(&path, &t, None);
        let msg = LoraSource::from_file(&path, "unet", false).unwrap_err().to_string();
        assert!(
            msg.contains(&key) && msg.contains(kind) && msg.contains("x.safetensors"),
            "{msg}"
        );
    }
}

/// kohya alphas as A1111 and ComfyUI files hold them: a 0-d f32 scalar, or `[1]`-shaped in f16.
#[test]
fn lora_kohya_alpha_in_f16_of_shape_one_reads_as_the_scalar() {
    let tmp = tempfile::tempdir().unwrap();
    let mut t = load(&lora_fixtures().join("kohya.safetensors"));
    for (k, v) in t.iter_mut() {
        if k.ends_with(".alpha") {
            *v = v.reshape(1).unwrap().to_dtype(DType::F16).unwrap();
        }
    }
    let path = tmp.path().join("alpha_f16.safetensors");
    write(&path, &t, None);
    let (unet, _) = unet_with(LoraSource::from_file(&path, "unet", false).unwrap());
    assert_close(
        "f16 alphas",
        &unet_output(&unet),
        &expected()["kohya.output"],
        MODULE_ATOL,
    );
}

#[test]
fn lora_fresh_target_matching_no_module_is_an_error() {
    let cfg = LoraConfig {
        target_modules: vec!["to_q".into(), "to_qq".into()],
        ..fresh_config()
    };
    let msg = UNet2DConditionModel::from_pretrained(&sd15().join("unet"), &opts_with(LoraSource::fresh(&cfg)))
        .map(|_| ())
        .unwrap_err()
        .to_string();
    assert!(msg.contains("to_qq") && !msg.contains("\"to_q\""), "{msg}");
}

#[test]
fn lora_only_unet_component_is_supported() {
    assert!(LoraSource::from_file(&policy_lora(), "text_encoder", false).is_err());
}

/// Old diffusers keys without the `unet.` prefix (files without text-encoder keys).
#[test]
fn lora_old_diffusers_form_without_unet_prefix_matches_diffusers() {
    let src = lora_fixtures().join("old_format.safetensors");
    let t: HashMap<String, Tensor> = load(&src)
        .into_iter()
        .map(|(k, v)| (k.strip_prefix("unet.").unwrap().to_string(), v))
        .collect();
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("unprefixed.safetensors");
    write(&path, &t, Some(metadata(&src)));
    check_against_diffusers(&path, "old_format.output");
}
