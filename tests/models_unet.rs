//! UNet parity with diffusers (shared fixtures) and gradient coverage.

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use diffalign::models::unet::UNet2DConditionModel;
use diffalign::weights::LoadOptions;

fn check_unet_fixture(case: &str) {
    let dir = shared_fixtures().join(case);
    let (unet, _) = UNet2DConditionModel::from_pretrained(&dir.join("unet"), &LoadOptions::default()).unwrap();
    let r = load(&dir.join("reference.safetensors"));
    let out = unet.forward(&r["unet.sample"], &r["unet.timesteps"], &r["unet.encoder_hidden_states"], None).unwrap();
    assert_close(&format!("{case} unet.output"), &out, &r["unet.output"], MODULE_ATOL);
}

#[test]
fn unet_sd15_matches_diffusers() {
    check_unet_fixture("sd15");
}

#[test]
fn unet_turbo_linear_projection_matches_diffusers() {
    check_unet_fixture("turbo");
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
    let opts = LoadOptions { trainable: true, ..Default::default() };
    let (unet, vb) = UNet2DConditionModel::from_pretrained(&dir, &opts).unwrap();
    let dev = Device::Cpu;
    let mut rng = diffalign::rng::Rng::new(3);
    let x = rng.randn((2, 4, h, w), &dev).unwrap();
    let ctx = rng.randn((2, 5, 32), &dev).unwrap();
    let t = Tensor::new(&[10f32, 700.0], &dev).unwrap();
    let out = unet.forward(&x, &t, &ctx, None).unwrap();
    let w = rng.randn(out.dims(), &dev).unwrap();
    let loss = (out * w).unwrap().sum_all().unwrap();
    let grads = loss.backward().unwrap();
    let vars = vb.vars();
    assert!(vars.len() > 100, "expected many parameters, got {}", vars.len());
    let missing: Vec<&String> = vars
        .iter()
        .filter(|(_, v)| match grads.get(v.as_tensor()) {
            Some(g) => g.abs().unwrap().sum_all().unwrap().to_dtype(DType::F32).unwrap().to_scalar::<f32>().unwrap() == 0.0,
            None => true,
        })
        .map(|(n, _)| n)
        .collect();
    assert!(missing.is_empty(), "parameters without gradient: {missing:?}");
}
