//! UNet parity with diffusers (shared fixtures) and gradient coverage.

mod common;

use candle_core::Tensor;
use common::*;
use diffalign::models::unet::{AddedCond, UNet2DConditionModel};
use diffalign::weights::LoadOptions;

fn check_unet_fixture(dir: &std::path::Path) {
    let (unet, _) = UNet2DConditionModel::from_pretrained(&dir.join("unet"), &load_options()).unwrap();
    let r = load_on_device(&dir.join("reference.safetensors"));
    let added = r.get("unet.time_ids").map(|ids| AddedCond {
        text_embeds: r["unet.text_embeds"].clone(),
        time_ids: ids.clone(),
    });
    let out = unet
        .forward(
            &r["unet.sample"],
            &r["unet.timesteps"],
            &r["unet.encoder_hidden_states"],
            added.as_ref(),
        )
        .unwrap();
    assert_close(
        &format!("{} unet.output", dir.display()),
        &out,
        &r["unet.output"],
        MODULE_ATOL,
    );
}

#[test]
fn unet_sd15_matches_diffusers() {
    check_unet_fixture(&shared_fixtures().join("sd15"));
}

#[test]
fn unet_turbo_linear_projection_matches_diffusers() {
    check_unet_fixture(&shared_fixtures().join("turbo"));
}

#[test]
fn unet_sd21_v_prediction_per_block_heads_matches_diffusers() {
    check_unet_fixture(&own_fixtures().join("sd21v"));
}

#[test]
fn unet_sdxl_text_time_and_transformer_depths_match_diffusers() {
    check_unet_fixture(&own_fixtures().join("sdxl"));
    check_unet_fixture(&own_fixtures().join("sdxl-turbo"));
}

#[test]
fn unet_sdxl_every_parameter_gets_a_gradient() {
    let dir = own_fixtures().join("sdxl/unet");
    let opts = LoadOptions {
        trainable: true,
        ..load_options()
    };
    let (unet, vb) = UNet2DConditionModel::from_pretrained(&dir, &opts).unwrap();
    let r = load_on_device(&own_fixtures().join("sdxl/reference.safetensors"));
    let added = AddedCond {
        text_embeds: r["unet.text_embeds"].clone(),
        time_ids: r["unet.time_ids"].clone(),
    };
    let out = unet
        .forward(
            &r["unet.sample"],
            &r["unet.timesteps"],
            &r["unet.encoder_hidden_states"],
            Some(&added),
        )
        .unwrap();
    assert_every_var_has_gradient(&out, &vb);
}

#[test]
fn unet_every_parameter_gets_a_gradient() {
    check_all_gradients(8, 8);
}

/// Odd, non-square latents: strided convs leave different remainders in h and w, and the up
/// path upsamples by non-integer factors (4x3 -> 2x2 -> 4x3).
#[test]
fn unet_every_parameter_gets_a_gradient_non_square_odd() {
    check_all_gradients(8, 6);
}

fn check_all_gradients(h: usize, w: usize) {
    let dir = shared_fixtures().join("sd15/unet");
    let opts = LoadOptions {
        trainable: true,
        ..load_options()
    };
    let (unet, vb) = UNet2DConditionModel::from_pretrained(&dir, &opts).unwrap();
    let dev = device();
    let mut rng = diffalign::rng::Rng::new(3);
    let x = rng.randn((2, 4, h, w), &dev).unwrap();
    let ctx = rng.randn((2, 5, 32), &dev).unwrap();
    let t = Tensor::new(&[10f32, 700.0], &dev).unwrap();
    let out = unet.forward(&x, &t, &ctx, None).unwrap();
    assert!(
        vb.vars().len() > 100,
        "expected many parameters, got {}",
        vb.vars().len()
    );
    assert_every_var_has_gradient(&out, &vb);
}

#[test]
fn unet_config_without_block_out_channels_names_that_key() {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&shared_fixtures().join("sd15").join("unet"), dir.path());
    let config_file = dir.path().join("config.json");
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&config_file).unwrap()).unwrap();
    cfg.as_object_mut().unwrap().remove("block_out_channels");
    std::fs::write(&config_file, cfg.to_string()).unwrap();
    let err = UNet2DConditionModel::from_pretrained(dir.path(), &load_options())
        .err()
        .expect("a config whose block count no longer matches is an error");
    match err {
        diffalign::Error::Config { file, key, reason } => {
            assert_eq!(file, config_file);
            assert_eq!(key, "block_out_channels", "{reason}");
            assert!(reason.contains("missing"), "{reason}");
        }
        other => panic!("expected a config error, got {other}"),
    }
}
