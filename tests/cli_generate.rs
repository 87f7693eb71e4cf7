//! `diffalign generate` end to end: PNGs against diffusers' images, and clear errors.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{DType, Tensor};
use common::*;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_diffalign"))
}

/// Writes row `i` of the fixture's `pipe.init_noise` as an `--init-noise` file.
fn write_init_noise(dir: &Path, reference: &Path, key: &str, i: usize) -> PathBuf {
    let r = load(reference);
    let noise = r[key].narrow(0, i, 1).unwrap().contiguous().unwrap();
    let path = dir.join(format!("noise{i}.safetensors"));
    candle_core::safetensors::save(&[("init_noise".to_string(), noise)].into_iter().collect(), &path).unwrap();
    path
}

fn png_as_tensor(path: &Path) -> Tensor {
    diffalign::sampling::image_io::load_image(path)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
}

/// Runs `generate` for image `i` of a fixture with its prompt, negative prompt, steps, guidance
/// and noise, and compares the PNG with diffusers' 8-bit image.
fn check_generate(case_dir: &Path, i: usize) {
    check_generate_run(case_dir, i, "pipe", "negative_prompts", "reference");
}

/// As [`check_generate`] for the run `prefix` of the fixture (its noise `prefix.init_noise`, its
/// negative prompts under `negatives_key`, its PNGs `png_stem_{i}.png`).
fn check_generate_run(case_dir: &Path, i: usize, prefix: &str, negatives_key: &str, png_stem: &str) {
    let reference = case_dir.join("reference.safetensors");
    let meta = metadata(&reference);
    let prompts: Vec<String> = serde_json::from_str(&meta["prompts"]).unwrap();
    let negatives: Option<Vec<String>> = serde_json::from_str(&meta[negatives_key]).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let noise = write_init_noise(tmp.path(), &reference, &format!("{prefix}.init_noise"), i);
    let out = tmp.path().join("out.png");
    let mut cmd = bin();
    cmd.args(["generate", "--model"])
        .arg(case_dir)
        .args([
            "--prompt",
            &prompts[i],
            "--steps",
            &meta["steps"],
            "--guidance",
            &meta["guidance_scale"],
        ])
        .args(["--height", &meta["height"], "--width", &meta["width"]])
        .arg("--init-noise")
        .arg(&noise)
        .arg("--out")
        .arg(&out);
    if let Some(n) = &negatives {
        cmd.args(["--negative-prompt", &n[i]]);
    }
    let o = cmd.output().unwrap();
    assert!(
        o.status.success(),
        "generate failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let got = png_as_tensor(&out);
    let want = png_as_tensor(&case_dir.join(format!("{png_stem}_{i}.png")));
    assert_close(&format!("{} image {i}", case_dir.display()), &got, &want, IMAGE_ATOL);
}

#[test]
fn generate_sd15_png_matches_diffusers() {
    for i in 0..2 {
        check_generate(&shared_fixtures().join("sd15"), i);
    }
}

/// Issue 21: a folder laid out like `runwayml/stable-diffusion-v1-5` (its `model_index.json` and
/// PNDM `scheduler_config.json`, tiny weights from `../shared/fixtures/sd15`) generates with its
/// own PNDM scheduler when `--scheduler` is not given, as diffusers does
/// (`tests/fixtures/gen_samplers.py`, `images.pndm_sd15_hub`).
#[test]
fn generate_sd15_hub_layout_uses_its_pndm_scheduler_by_default() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("stable-diffusion-v1-5");
    let shared = shared_fixtures().join("sd15");
    for comp in ["unet", "vae", "text_encoder", "tokenizer", "scheduler"] {
        copy_dir(&shared.join(comp), &model.join(comp));
    }
    let hub = own_fixtures().join("samplers/sd15_pndm");
    std::fs::copy(hub.join("model_index.json"), model.join("model_index.json")).unwrap();
    std::fs::copy(
        hub.join("scheduler_config.json"),
        model.join("scheduler/scheduler_config.json"),
    )
    .unwrap();

    let reference = shared.join("reference.safetensors");
    let meta = metadata(&reference);
    let prompts: Vec<String> = serde_json::from_str(&meta["prompts"]).unwrap();
    let negatives: Vec<String> = serde_json::from_str(&meta["negative_prompts"]).unwrap();
    let images = load(&own_fixtures().join("samplers/images.safetensors"));
    let images_meta = metadata(&own_fixtures().join("samplers/images.safetensors"));
    let cases: Vec<serde_json::Value> = serde_json::from_str(&images_meta["cases"]).unwrap();
    let case = cases.iter().find(|c| c["name"] == "pndm_sd15_hub").unwrap();
    for i in 0..2 {
        let noise = write_init_noise(tmp.path(), &reference, "pipe.init_noise", i);
        let out = tmp.path().join(format!("out{i}.png"));
        let o = bin()
            .args(["generate", "--model"])
            .arg(&model)
            .args(["--prompt", &prompts[i], "--negative-prompt", &negatives[i]])
            .args([
                "--steps",
                &case["steps"].to_string(),
                "--guidance",
                &meta["guidance_scale"],
            ])
            .args(["--height", &meta["height"], "--width", &meta["width"]])
            .arg("--init-noise")
            .arg(&noise)
            .arg("--out")
            .arg(&out)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "generate failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let want = images["images.pndm_sd15_hub"]
            .get(i)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        assert_close(&format!("PNDM image {i}"), &png_as_tensor(&out), &want, IMAGE_ATOL);
    }
}

#[test]
fn generate_turbo_png_matches_diffusers() {
    for i in 0..2 {
        check_generate(&shared_fixtures().join("turbo"), i);
    }
}

#[test]
fn generate_sd21_v_prediction_non_square_png_matches_diffusers() {
    check_generate(&own_fixtures().join("sd21v"), 0);
}

#[test]
fn generate_sdxl_png_matches_diffusers_with_and_without_negative_prompt() {
    let dir = own_fixtures().join("sdxl");
    check_generate(&dir, 1);
    check_generate_run(&dir, 0, "pipe_noneg", "pipe_noneg.negative_prompts", "reference_noneg");
}

#[test]
fn generate_sdxl_turbo_png_matches_diffusers() {
    check_generate(&own_fixtures().join("sdxl-turbo"), 0);
}

/// Runs `generate` with `args` after the model, expects failure, no output file, and an error
/// mentioning every one of `needles`.
fn expect_error(model: &Path, args: &[&str], needles: &[&str]) {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out.png");
    let o = bin()
        .args(["generate", "--model"])
        .arg(model)
        .args(["--prompt", "a red circle", "--steps", "1"])
        .args(args)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "expected failure, stderr: {err}");
    assert!(!err.contains("panicked"), "panic instead of an error: {err}");
    for n in needles {
        assert!(err.contains(n), "error should mention {n:?}: {err}");
    }
    let leftovers: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().collect();
    assert!(leftovers.is_empty(), "left files behind: {leftovers:?}");
}

#[test]
fn an_unknown_cuda_kernel_name_is_a_clear_error() {
    let o = bin()
        .env("DIFFALIGN_CUDA_KERNELS", "conv2d,flash")
        .args(["bench", "--suite", "kernels", "--op", "none"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "expected failure, stderr: {err}");
    assert!(!err.contains("panicked"), "panic instead of an error: {err}");
    for n in ["DIFFALIGN_CUDA_KERNELS", "\"flash\"", "conv2d, group_norm"] {
        assert!(err.contains(n), "error should mention {n}: {err}");
    }
}

#[test]
fn generate_rejects_size_not_divisible_by_vae_factor() {
    expect_error(
        &shared_fixtures().join("sd15"),
        &["--height", "62", "--width", "64"],
        &["height", "multiple of 4"],
    );
}

#[test]
fn generate_rejects_unknown_scheduler() {
    expect_error(
        &shared_fixtures().join("sd15"),
        &["--scheduler", "plms-fancy"],
        &["plms-fancy"],
    );
}

#[test]
fn generate_rejects_missing_model_folder() {
    expect_error(Path::new("/nonexistent/model"), &[], &["/nonexistent/model"]);
}

#[test]
fn generate_prompts_file_writes_one_png_per_prompt_and_seed() {
    let tmp = tempfile::tempdir().unwrap();
    let prompts = tmp.path().join("prompts.txt");
    std::fs::write(&prompts, "a red circle\n\na blue square\n").unwrap();
    let out = tmp.path().join("img.png");
    let o = bin()
        .args(["generate", "--model"])
        .arg(shared_fixtures().join("turbo"))
        .arg("--prompts")
        .arg(&prompts)
        .args([
            "--num-images",
            "2",
            "--steps",
            "1",
            "--guidance",
            "0",
            "--seed",
            "5",
            "--out",
        ])
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 4);
    let seeds: Vec<u64> = lines.iter().map(|l| l["seed"].as_u64().unwrap()).collect();
    assert_eq!(seeds, [5, 6, 5, 6]);
    for (p, k) in [(0, 0), (0, 1), (1, 0), (1, 1)] {
        assert!(tmp.path().join(format!("img-{p:03}-{k}.png")).is_file());
    }
    // The same seed reproduces the same image: prompt 0 image 0 equals a single run with seed 5.
    let single = tmp.path().join("single.png");
    let o = bin()
        .args(["generate", "--model"])
        .arg(shared_fixtures().join("turbo"))
        .args([
            "--prompt",
            "a red circle",
            "--steps",
            "1",
            "--guidance",
            "0",
            "--seed",
            "5",
            "--out",
        ])
        .arg(&single)
        .output()
        .unwrap();
    assert!(o.status.success());
    assert_eq!(
        std::fs::read(&single).unwrap(),
        std::fs::read(tmp.path().join("img-000-0.png")).unwrap()
    );
}

#[test]
fn generate_warns_about_config_keys_it_does_not_read() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("turbo");
    copy_dir(&shared_fixtures().join("turbo"), &model);
    let cfg = model.join("unet/config.json");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replacen('{', "{\n  \"some_future_key\": 3,", 1);
    std::fs::write(&cfg, text).unwrap();
    let out = tmp.path().join("x.png");
    let o = bin()
        .args(["generate", "--model"])
        .arg(&model)
        .args(["--prompt", "a circle", "--steps", "1", "--guidance", "0", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("warning") && err.contains("some_future_key") && err.contains("unet/config.json"),
        "{err}"
    );
    // The unmodified fixture gives no warning.
    let o = bin()
        .args(["generate", "--model"])
        .arg(shared_fixtures().join("turbo"))
        .args(["--prompt", "a circle", "--steps", "1", "--guidance", "0", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&o.stderr).contains("warning"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}
