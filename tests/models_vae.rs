//! VAE parity with diffusers (shared fixtures) and gradient coverage.

mod common;

use common::*;
use diffalign::models::vae::AutoencoderKL;
use diffalign::weights::LoadOptions;

fn check_vae_fixture(dir: &std::path::Path) {
    let case = dir.display();
    let (vae, _) = AutoencoderKL::from_pretrained(&dir.join("vae"), &load_options()).unwrap();
    let r = load_on_device(&dir.join("reference.safetensors"));
    let decoded = vae.decode(&r["vae.latents"]).unwrap();
    assert_close(&format!("{case} vae.decoded"), &decoded, &r["vae.decoded"], MODULE_ATOL);
    let dist = vae.encode(&r["vae.image"]).unwrap();
    assert_close(
        &format!("{case} vae.encoded_mean"),
        &dist.mean,
        &r["vae.encoded_mean"],
        MODULE_ATOL,
    );
    assert_close(
        &format!("{case} vae.encoded_std"),
        &dist.std,
        &r["vae.encoded_std"],
        MODULE_ATOL,
    );
}

#[test]
fn vae_sd15_matches_diffusers() {
    check_vae_fixture(&shared_fixtures().join("sd15"));
}

#[test]
fn vae_turbo_matches_diffusers() {
    check_vae_fixture(&shared_fixtures().join("turbo"));
}

#[test]
fn vae_own_cases_match_diffusers() {
    for case in ["sd21v", "sdxl", "sdxl-turbo"] {
        check_vae_fixture(&own_fixtures().join(case));
    }
}

#[test]
fn vae_decoder_and_encoder_every_parameter_gets_a_gradient() {
    let dir = shared_fixtures().join("sd15/vae");
    let opts = LoadOptions {
        trainable: true,
        ..load_options()
    };
    let (vae, vb) = AutoencoderKL::from_pretrained(&dir, &opts).unwrap();
    let dev = device();
    let mut rng = diffalign::rng::Rng::new(11);
    let image = rng.randn((1, 3, 32, 32), &dev).unwrap();
    let dist = vae.encode(&image).unwrap();
    let z = dist.sample(&mut rng).unwrap();
    let out = vae.decode(&z).unwrap();
    assert_every_var_has_gradient(&out, &vb);
}
