//! VAE parity with diffusers (shared fixtures) and gradient coverage.

mod common;

use candle_core::DType;
use common::*;
use diffalign::models::vae::AutoencoderKL;
use diffalign::weights::LoadOptions;

fn check_vae_fixture(case: &str) {
    let dir = shared_fixtures().join(case);
    let (vae, _) = AutoencoderKL::from_pretrained(&dir.join("vae"), &LoadOptions::default()).unwrap();
    let r = load(&dir.join("reference.safetensors"));
    let decoded = vae.decode(&r["vae.latents"]).unwrap();
    assert_close(&format!("{case} vae.decoded"), &decoded, &r["vae.decoded"], MODULE_ATOL);
    let dist = vae.encode(&r["vae.image"]).unwrap();
    assert_close(&format!("{case} vae.encoded_mean"), &dist.mean, &r["vae.encoded_mean"], MODULE_ATOL);
    assert_close(&format!("{case} vae.encoded_std"), &dist.std, &r["vae.encoded_std"], MODULE_ATOL);
}

#[test]
fn vae_sd15_matches_diffusers() {
    check_vae_fixture("sd15");
}

#[test]
fn vae_turbo_matches_diffusers() {
    check_vae_fixture("turbo");
}

#[test]
fn vae_decoder_and_encoder_every_parameter_gets_a_gradient() {
    let dir = shared_fixtures().join("sd15/vae");
    let opts = LoadOptions { trainable: true, ..Default::default() };
    let (vae, vb) = AutoencoderKL::from_pretrained(&dir, &opts).unwrap();
    let dev = candle_core::Device::Cpu;
    let mut rng = diffalign::rng::Rng::new(11);
    let image = rng.randn((1, 3, 32, 32), &dev).unwrap();
    let dist = vae.encode(&image).unwrap();
    let z = dist.sample(&mut rng).unwrap();
    let out = vae.decode(&z).unwrap();
    let w = rng.randn(out.dims(), &dev).unwrap();
    let loss = (out * w).unwrap().sum_all().unwrap();
    let grads = loss.backward().unwrap();
    let missing: Vec<String> = vb
        .vars()
        .into_iter()
        .filter(|(_, v)| {
            grads.get(v.as_tensor()).is_none_or(|g| {
                g.abs().unwrap().sum_all().unwrap().to_dtype(DType::F32).unwrap().to_scalar::<f32>().unwrap() == 0.0
            })
        })
        .map(|(n, _)| n)
        .collect();
    assert!(missing.is_empty(), "parameters without gradient: {missing:?}");
}
