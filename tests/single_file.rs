//! Single-file (LDM-layout) checkpoints: `tests/fixtures/single_file/*.safetensors`, made by
//! `tests/fixtures/gen_single_file.py` from the fixture pipelines and checked there against
//! diffusers' `from_single_file`, must load into the same weights and images as the folders, with
//! every file tensor used or explicitly skipped, and bad files must fail clearly.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{DType, Device, Tensor};
use common::*;
use diffalign::models::clip::text_model::{ClipTextConfig, ClipTextModel};
use diffalign::models::unet::{UNet2DConditionConfig, UNet2DConditionModel};
use diffalign::models::vae::{AutoencoderKL, AutoencoderKLConfig};
use diffalign::sampling::pipeline::PipelineSources;
use diffalign::sampling::{GenerateRequest, StableDiffusionPipeline};
use diffalign::weights::single_file::{Architecture, SingleFile};
use diffalign::weights::store::ViewTransform;
use diffalign::weights::{LoadOptions, TensorStore, VarBuilder};
use diffalign::Error;

fn single(name: &str) -> PathBuf {
    own_fixtures().join("single_file").join(format!("{name}.safetensors"))
}

/// `(single file, its diffusers folder, architecture)` for every case.
fn cases() -> Vec<(PathBuf, PathBuf, Architecture)> {
    vec![
        (single("sd15"), shared_fixtures().join("sd15"), Architecture::Sd1),
        (single("turbo"), shared_fixtures().join("turbo"), Architecture::Sd2),
        (single("sdxl"), own_fixtures().join("sdxl"), Architecture::Sdxl),
    ]
}

fn json_list(meta: &HashMap<String, String>, key: &str) -> Option<Vec<String>> {
    let v = meta.get(key)?;
    if v == "null" {
        return None;
    }
    Some(serde_json::from_str(v).unwrap_or_else(|e| panic!("metadata {key}: {e}")))
}

fn load_single(file: &Path, root: &Path) -> diffalign::Result<StableDiffusionPipeline> {
    let sf = SingleFile::open(file)?;
    StableDiffusionPipeline::load_single_file(
        &sf,
        &PipelineSources {
            root: root.to_path_buf(),
            ..Default::default()
        },
        &LoadOptions::default(),
    )
}

/// Loads `file` with `dir`'s configs and compares the run `prefix` with diffusers' images.
fn check_images(file: &Path, dir: &Path, prefix: &str, negatives_key: &str) {
    let reference = dir.join("reference.safetensors");
    let meta = metadata(&reference);
    let r = load(&reference);
    let pipe = load_single(file, dir).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    let req = GenerateRequest {
        prompts: json_list(&meta, "prompts").unwrap(),
        negative_prompts: json_list(&meta, negatives_key),
        steps: meta["steps"].parse().unwrap(),
        guidance: meta["guidance_scale"].parse().unwrap(),
        height: meta["height"].parse().unwrap(),
        width: meta["width"].parse().unwrap(),
        init_noise: r[&format!("{prefix}.init_noise")].clone(),
        scheduler: None,
        seed: 0,
        time_ids: None,
    };
    let out = pipe.generate(&req, &mut |_, _| {}).unwrap();
    assert_close(
        &format!("{} {prefix}.images", file.display()),
        &out.images,
        &r[&format!("{prefix}.images")],
        IMAGE_ATOL,
    );
}

#[test]
fn single_file_sd15_images_match_diffusers() {
    check_images(
        &single("sd15"),
        &shared_fixtures().join("sd15"),
        "pipe",
        "negative_prompts",
    );
}

#[test]
fn single_file_sd2_open_clip_layout_images_match_diffusers() {
    check_images(
        &single("turbo"),
        &shared_fixtures().join("turbo"),
        "pipe",
        "negative_prompts",
    );
}

#[test]
fn single_file_sdxl_images_match_diffusers_with_and_without_negative_prompts() {
    let dir = own_fixtures().join("sdxl");
    check_images(&single("sdxl"), &dir, "pipe", "negative_prompts");
    check_images(&single("sdxl"), &dir, "pipe_noneg", "pipe_noneg.negative_prompts");
}

#[test]
fn single_file_architecture_is_detected_from_keys() {
    for (file, _, arch) in cases() {
        assert_eq!(
            SingleFile::open(&file).unwrap().architecture(),
            arch,
            "{}",
            file.display()
        );
    }
}

/// Every component store of `sf` (with `dir`'s configs), paired with the folder's store.
fn component_stores(sf: &SingleFile, dir: &Path) -> Vec<(&'static str, TensorStore, TensorStore)> {
    let folder = |c: &str, stem: &str| diffalign::weights::layout::open_weights(&dir.join(c), stem, None).unwrap();
    let cfg = |c: &str| dir.join(c).join("config.json");
    let mut v = vec![
        (
            "unet",
            sf.unet(&cfg("unet")).unwrap(),
            folder("unet", "diffusion_pytorch_model"),
        ),
        (
            "vae",
            sf.vae(&cfg("vae")).unwrap(),
            folder("vae", "diffusion_pytorch_model"),
        ),
        (
            "text_encoder",
            sf.text_encoder(&cfg("text_encoder")).unwrap(),
            folder("text_encoder", "model"),
        ),
    ];
    if sf.architecture() == Architecture::Sdxl {
        v.push((
            "text_encoder_2",
            sf.text_encoder_2(&cfg("text_encoder_2")).unwrap(),
            folder("text_encoder_2", "model"),
        ));
    }
    v
}

/// transformers 5 saves `CLIPTextModel` without the `text_model.` prefix; the views always have it.
fn folder_name(component: &str, name: &str) -> String {
    let text = component.starts_with("text_encoder");
    if text && !name.starts_with("text_model.") && name != "text_projection.weight" {
        format!("text_model.{name}")
    } else {
        name.to_string()
    }
}

#[test]
fn single_file_views_equal_the_folder_weights_tensor_for_tensor() {
    for (file, dir, _) in cases() {
        let sf = SingleFile::open(&file).unwrap();
        for (component, views, folder) in component_stores(&sf, &dir) {
            let want: BTreeSet<String> = folder.names().iter().map(|n| folder_name(component, n)).collect();
            let got: BTreeSet<String> = views.names().into_iter().collect();
            assert_eq!(got, want, "{} {component}: names", file.display());
            for name in folder.names() {
                let a = folder.get(&name, None, DType::F32, &Device::Cpu).unwrap();
                let ours = folder_name(component, &name);
                let b = views.get(&ours, Some(a.dims()), DType::F32, &Device::Cpu).unwrap();
                let d = max_abs_diff(&a, &b);
                assert!(d == 0.0, "{} {component}: {ours} differs by {d}", file.display());
            }
            assert_eq!(views.unused(), Vec::<String>::new(), "{} {component}", file.display());
        }
    }
}

/// Builds each model from its store and returns the stores, for the audit checks.
fn build_models(sf: &SingleFile, dir: &Path) -> Vec<(&'static str, VarBuilder)> {
    let cfg = |c: &str| dir.join(c).join("config.json");
    let vb = |store: TensorStore| VarBuilder::from_store(store, DType::F32, &Device::Cpu);
    let mut out = Vec::new();
    let unet_vb = vb(sf.unet(&cfg("unet")).unwrap());
    let unet_cfg = UNet2DConditionConfig::from_file(&cfg("unet")).unwrap();
    UNet2DConditionModel::new(&unet_cfg, &cfg("unet"), unet_vb.clone()).unwrap();
    out.push(("unet", unet_vb));
    let vae_vb = vb(sf.vae(&cfg("vae")).unwrap());
    let vae_cfg = AutoencoderKLConfig::from_file(&cfg("vae")).unwrap();
    AutoencoderKL::new(&vae_cfg, &cfg("vae"), vae_vb.clone()).unwrap();
    out.push(("vae", vae_vb));
    let te_vb = vb(sf.text_encoder(&cfg("text_encoder")).unwrap());
    ClipTextModel::load(&ClipTextConfig::from_file(cfg("text_encoder")).unwrap(), te_vb.clone()).unwrap();
    out.push(("text_encoder", te_vb));
    if sf.architecture() == Architecture::Sdxl {
        let te2_vb = vb(sf.text_encoder_2(&cfg("text_encoder_2")).unwrap());
        let te2_cfg = ClipTextConfig::from_file(cfg("text_encoder_2")).unwrap();
        ClipTextModel::load(&te2_cfg, te2_vb.clone()).unwrap();
        out.push(("text_encoder_2", te2_vb));
    }
    out
}

#[test]
fn single_file_every_tensor_is_used_or_explicitly_skipped() {
    for (file, dir, _) in cases() {
        let sf = SingleFile::open(&file).unwrap();
        let models = build_models(&sf, &dir);
        let mut covered: BTreeSet<String> = BTreeSet::new();
        for (component, vb) in &models {
            let store = vb.store().unwrap();
            assert_eq!(store.unused(), Vec::<String>::new(), "{} {component}", file.display());
            store.check_all_used(|_| false).unwrap();
            for name in store.names() {
                covered.insert(store.view(&name).unwrap().source.clone());
            }
        }
        let skipped: BTreeSet<String> = sf.skipped().into_iter().map(|(n, _)| n).collect();
        assert!(
            covered.is_disjoint(&skipped),
            "{}: a skipped tensor was read",
            file.display()
        );
        let all: BTreeSet<String> = diffalign::weights::WeightFile::open(&file)
            .unwrap()
            .names()
            .into_iter()
            .collect();
        let accounted: BTreeSet<String> = covered.union(&skipped).cloned().collect();
        assert_eq!(accounted, all, "{}: tensors neither used nor skipped", file.display());
    }
}

#[test]
fn single_file_skips_exactly_the_allow_listed_tensors_with_reasons() {
    let skipped = |name: &str| -> Vec<(String, String)> {
        let (file, dir, _) = cases().into_iter().find(|(f, _, _)| f == &single(name)).unwrap();
        let sf = SingleFile::open(&file).unwrap();
        build_models(&sf, &dir);
        sf.skipped()
    };
    let names = |s: &[(String, String)]| -> Vec<String> { s.iter().map(|(n, _)| n.clone()).collect() };

    let sd15 = skipped("sd15");
    let n = names(&sd15);
    assert!(n.contains(&"cond_stage_model.transformer.text_model.embeddings.position_ids".to_string()));
    assert!(n.contains(&"model_ema.decay".to_string()) && n.contains(&"model_ema.num_updates".to_string()));
    assert!(n.contains(&"alphas_cumprod".to_string()));
    assert_eq!(n.len(), 1 + 2 + 12, "{n:?}");
    assert!(sd15.iter().all(|(_, reason)| !reason.is_empty()));

    // SD 2.x: the 3rd OpenCLIP block of a 2-layer encoder (24 of 23 in real files), the unused
    // projection and logit scale, plus the LDM extras.
    let turbo = names(&skipped("turbo"));
    let last_block: Vec<&String> = turbo
        .iter()
        .filter(|n| n.starts_with("cond_stage_model.model.transformer.resblocks.2."))
        .collect();
    assert_eq!(last_block.len(), 12, "{turbo:?}");
    assert!(turbo.contains(&"cond_stage_model.model.text_projection".to_string()));
    assert!(turbo.contains(&"cond_stage_model.model.logit_scale".to_string()));
    assert_eq!(turbo.len(), 12 + 2 + 2 + 12, "{turbo:?}");

    let sdxl = names(&skipped("sdxl"));
    assert_eq!(
        sdxl,
        [
            "conditioner.embedders.0.transformer.text_model.embeddings.position_ids",
            "conditioner.embedders.1.model.logit_scale",
        ]
    );
}

#[test]
fn single_file_open_clip_projection_is_transposed_and_qkv_sliced() {
    let sf = SingleFile::open(&single("sdxl")).unwrap();
    let te2 = sf
        .text_encoder_2(&own_fixtures().join("sdxl/text_encoder_2/config.json"))
        .unwrap();
    let proj = te2.view("text_projection.weight").unwrap();
    assert_eq!(proj.source, "conditioner.embedders.1.model.text_projection");
    assert_eq!(proj.transform, ViewTransform::Transpose);
    assert_eq!(te2.shape("text_projection.weight").unwrap(), [32, 16]);
    let k = te2.view("text_model.encoder.layers.1.self_attn.k_proj.weight").unwrap();
    assert_eq!(
        k.source,
        "conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_weight"
    );
    assert_eq!(
        k.transform,
        ViewTransform::Narrow {
            dim: 0,
            start: 16,
            len: 16
        }
    );
    let sf = SingleFile::open(&single("sd15")).unwrap();
    let vae = sf.vae(&shared_fixtures().join("sd15/vae/config.json")).unwrap();
    let q = vae.view("decoder.mid_block.attentions.0.to_q.weight").unwrap();
    assert_eq!(q.source, "first_stage_model.decoder.mid.attn_1.q.weight");
    assert_eq!(q.transform, ViewTransform::Reshape(vec![32, 32]));
}

#[test]
fn view_transform_shapes_and_their_errors() {
    assert_eq!(ViewTransform::Identity.shape(&[2, 3]).unwrap(), [2, 3]);
    assert_eq!(ViewTransform::Transpose.shape(&[2, 3]).unwrap(), [3, 2]);
    assert!(ViewTransform::Transpose.shape(&[2, 3, 1]).is_err());
    assert_eq!(ViewTransform::Reshape(vec![4, 4]).shape(&[4, 4, 1, 1]).unwrap(), [4, 4]);
    assert!(ViewTransform::Reshape(vec![4, 5]).shape(&[4, 4, 1, 1]).is_err());
    let narrow = |start, len| ViewTransform::Narrow { dim: 0, start, len };
    assert_eq!(narrow(4, 2).shape(&[6, 3]).unwrap(), [2, 3]);
    assert!(narrow(5, 2).shape(&[6, 3]).is_err());
}

#[test]
fn single_file_shape_mismatch_names_both_names() {
    let sf = SingleFile::open(&single("sd15")).unwrap();
    let store = sf.unet(&shared_fixtures().join("sd15/unet/config.json")).unwrap();
    let err = store
        .get("conv_in.weight", Some(&[32, 9, 3, 3]), DType::F32, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(err.contains("sd15.safetensors"), "{err}");
    assert!(err.contains("conv_in.weight"), "{err}");
    assert!(err.contains("model.diffusion_model.input_blocks.0.0.weight"), "{err}");
    let err = store
        .get("nonexistent.weight", None, DType::F32, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("nonexistent.weight") && err.contains("model.diffusion_model."),
        "{err}"
    );
}

// ----------------------------------------------------------------------------------------------
// Errors

fn write(path: &Path, tensors: Vec<(&str, Tensor)>) {
    let map: HashMap<String, Tensor> = tensors.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
    candle_core::safetensors::save(&map, path).unwrap();
}

fn zeros(shape: &[usize]) -> Tensor {
    Tensor::zeros(shape, DType::F32, &Device::Cpu).unwrap()
}

#[test]
fn single_file_without_recognisable_keys_is_an_error_naming_the_file_and_expected_keys() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("mystery.safetensors");
    write(&path, vec![("foo.weight", zeros(&[2])), ("bar.bias", zeros(&[2]))]);
    let Err(err) = SingleFile::open(&path) else {
        panic!("opened a file without Stable Diffusion keys")
    };
    let msg = err.to_string();
    assert!(matches!(err, Error::MissingTensor { .. }), "{msg}");
    for needle in [
        "mystery.safetensors",
        "model.diffusion_model.",
        "cond_stage_model.transformer.",
        "cond_stage_model.model.",
        "conditioner.embedders.",
        "foo.*",
    ] {
        assert!(msg.contains(needle), "error should mention {needle:?}: {msg}");
    }
    // A diffusers-named component file is not an LDM checkpoint either.
    let unet = shared_fixtures().join("sd15/unet/diffusion_pytorch_model.safetensors");
    let msg = SingleFile::open(&unet).err().unwrap().to_string();
    assert!(
        msg.contains("conv_in.*") && msg.contains("diffusion_pytorch_model.safetensors"),
        "{msg}"
    );
}

#[test]
fn single_file_truncated_is_an_error_naming_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("cut.safetensors");
    let bytes = std::fs::read(single("sd15")).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let msg = SingleFile::open(&path).err().unwrap().to_string();
    assert!(msg.contains("cut.safetensors") && msg.contains("truncated"), "{msg}");
    std::fs::write(&path, &bytes[..5]).unwrap();
    let msg = SingleFile::open(&path).err().unwrap().to_string();
    assert!(msg.contains("cut.safetensors"), "{msg}");
}

#[test]
fn single_file_tensors_outside_every_component_are_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("extra.safetensors");
    write(
        &path,
        vec![
            ("model.diffusion_model.input_blocks.0.0.weight", zeros(&[2])),
            (
                "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",
                zeros(&[2]),
            ),
            ("model_ema.decay", zeros(&[1])),
            ("lora_unet_down.alpha", zeros(&[1])),
        ],
    );
    let Err(err) = SingleFile::open(&path) else {
        panic!("accepted an unknown tensor")
    };
    let msg = err.to_string();
    assert!(matches!(err, Error::UnusedTensors { .. }), "{msg}");
    assert!(
        msg.contains("extra.safetensors") && msg.contains("lora_unet_down.alpha"),
        "{msg}"
    );
    assert!(!msg.contains("model_ema"), "model_ema.* is allow-listed: {msg}");
}

#[test]
fn single_file_unmapped_tensor_inside_a_component_fails_the_audit() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("sd15-extra.safetensors");
    let mut tensors = load(&single("sd15"));
    let odd = "model.diffusion_model.input_blocks.1.0.extra_gate.weight";
    tensors.insert(odd.to_string(), zeros(&[3]));
    candle_core::safetensors::save(&tensors, &path).unwrap();
    let Err(err) = load_single(&path, &shared_fixtures().join("sd15")) else {
        panic!("loaded a checkpoint with an unmapped UNet tensor")
    };
    let msg = err.to_string();
    assert!(matches!(err, Error::UnusedTensors { .. }), "{msg}");
    assert!(msg.contains("sd15-extra.safetensors") && msg.contains(odd), "{msg}");
}

#[test]
fn single_file_sdxl_with_sd1_config_is_an_error_naming_both() {
    let Err(err) = load_single(&single("sdxl"), &shared_fixtures().join("sd15")) else {
        panic!("loaded an SDXL checkpoint with an SD 1.5 config folder")
    };
    let msg = err.to_string();
    for needle in [
        "model_index.json",
        "sdxl.safetensors",
        "SDXL",
        "StableDiffusionXLPipeline",
    ] {
        assert!(msg.contains(needle), "error should mention {needle:?}: {msg}");
    }
    let Err(err) = load_single(&single("sd15"), &own_fixtures().join("sdxl")) else {
        panic!("loaded an SD 1.5 checkpoint with an SDXL config folder")
    };
    let msg = err.to_string();
    assert!(msg.contains("sd15.safetensors") && msg.contains("SD 1.x"), "{msg}");
}

#[test]
fn single_file_sd1_with_sd2_config_fails_on_shapes_naming_the_tensor() {
    let Err(err) = load_single(&single("sd15"), &shared_fixtures().join("turbo")) else {
        panic!("loaded an SD 1.5 checkpoint with an SD 2 config folder")
    };
    let msg = err.to_string();
    assert!(
        msg.contains("sd15.safetensors") && msg.contains("expected shape"),
        "{msg}"
    );
}

#[test]
fn single_file_replacement_vae_folder_is_used_instead_of_the_files() {
    let dir = shared_fixtures().join("sd15");
    let sf = SingleFile::open(&single("sd15")).unwrap();
    let pipe = StableDiffusionPipeline::load_single_file(
        &sf,
        &PipelineSources {
            root: dir.clone(),
            vae: Some(dir.join("vae")),
            unet: None,
        },
        &LoadOptions::default(),
    )
    .unwrap();
    assert_eq!(pipe.vae_scale_factor(), 4);
}

// ----------------------------------------------------------------------------------------------
// CLI

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_diffalign"))
}

fn png_as_tensor(path: &Path) -> Tensor {
    diffalign::sampling::image_io::load_image(path)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
}

/// `diffalign generate --model FILE --config DIR` for image `i` of the fixture in `dir`.
fn check_cli(file: &Path, dir: &Path, i: usize) {
    let reference = dir.join("reference.safetensors");
    let meta = metadata(&reference);
    let prompts: Vec<String> = serde_json::from_str(&meta["prompts"]).unwrap();
    let negatives: Option<Vec<String>> = serde_json::from_str(&meta["negative_prompts"]).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let noise = tmp.path().join("noise.safetensors");
    let r = load(&reference);
    let row = r["pipe.init_noise"].narrow(0, i, 1).unwrap().contiguous().unwrap();
    candle_core::safetensors::save(&[("init_noise".to_string(), row)].into_iter().collect(), &noise).unwrap();
    let out = tmp.path().join("out.png");
    let mut cmd = bin();
    cmd.args(["generate", "--model"])
        .arg(file)
        .arg("--config")
        .arg(dir)
        .args(["--prompt", &prompts[i], "--steps", &meta["steps"]])
        .args(["--guidance", &meta["guidance_scale"]])
        .args(["--height", &meta["height"], "--width", &meta["width"]])
        .arg("--init-noise")
        .arg(&noise)
        .arg("--out")
        .arg(&out);
    if let Some(n) = &negatives {
        cmd.args(["--negative-prompt", &n[i]]);
    }
    let o = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "generate failed: {stderr}");
    let got = png_as_tensor(&out);
    let want = png_as_tensor(&dir.join(format!("reference_{i}.png")));
    assert_close(&format!("{} image {i}", file.display()), &got, &want, IMAGE_ATOL);
}

#[test]
fn cli_generate_single_file_pngs_match_diffusers() {
    check_cli(&single("sd15"), &shared_fixtures().join("sd15"), 0);
    check_cli(&single("turbo"), &shared_fixtures().join("turbo"), 1);
    check_cli(&single("sdxl"), &own_fixtures().join("sdxl"), 1);
}

#[test]
fn cli_generate_single_file_notes_what_it_skipped() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out.png");
    let o = bin()
        .args(["generate", "--model"])
        .arg(single("turbo"))
        .arg("--config")
        .arg(shared_fixtures().join("turbo"))
        .args(["--prompt", "a red circle", "--steps", "1", "--guidance", "0"])
        .args(["--height", "32", "--width", "32", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    assert!(out.is_file());
    for needle in ["turbo.safetensors", "penultimate", "EMA", "logit scale"] {
        assert!(stderr.contains(needle), "stderr should mention {needle:?}: {stderr}");
    }
}

fn expect_cli_error(args: &[&std::ffi::OsStr], needles: &[&str]) {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out.png");
    let o = bin()
        .arg("generate")
        .args(args)
        .args(["--prompt", "a red circle", "--steps", "1", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "expected failure, stderr: {err}");
    assert!(!err.contains("panicked"), "panic instead of an error: {err}");
    for n in needles {
        assert!(err.contains(n), "error should mention {n:?}: {err}");
    }
    assert!(!out.exists());
}

#[test]
fn cli_single_file_needs_config_and_config_needs_single_file() {
    let file = single("sd15");
    let folder = shared_fixtures().join("sd15");
    expect_cli_error(
        &["--model".as_ref(), file.as_os_str()],
        &["sd15.safetensors", "--config"],
    );
    expect_cli_error(
        &[
            "--model".as_ref(),
            folder.as_os_str(),
            "--config".as_ref(),
            folder.as_os_str(),
        ],
        &["--config", "only for a single-file --model"],
    );
    expect_cli_error(
        &[
            "--model".as_ref(),
            single("sdxl").as_os_str(),
            "--config".as_ref(),
            folder.as_os_str(),
        ],
        &["sdxl.safetensors", "StableDiffusionXLPipeline"],
    );
    expect_cli_error(
        &[
            "--model".as_ref(),
            file.as_os_str(),
            "--config".as_ref(),
            "/nonexistent/config".as_ref(),
        ],
        &["--config", "/nonexistent/config"],
    );
}
