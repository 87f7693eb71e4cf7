//! Activation recomputation by block (`set_gradient_checkpointing`): the same loss and the same
//! gradient on every trainable tensor as without it, for a full UNet, a LoRA policy, the VAE
//! decoder, the CLIP vision tower, and ReNO's gradient on the noise.

mod common;

use candle_core::{DType, Tensor};
use common::{load, max_abs_diff, shared_fixtures};
use diffalign::models::unet::UNet2DConditionModel;
use diffalign::nn::checkpoint::recomputed_blocks;
use diffalign::weights::lora::LoraSource;
use diffalign::weights::{LoadOptions, VarBuilder};

/// `sum(out * w)` for a fixed random `w`.
fn weighted_sum(out: &Tensor) -> Tensor {
    let w = diffalign::rng::Rng::new(77).randn(out.dims(), out.device()).unwrap();
    (out * w).unwrap().sum_all().unwrap()
}

/// Runs `forward` with recomputation off then on (via `set`), and checks the outputs are equal
/// and every tensor in `params` gets the same gradient (1e-5 relative to the largest entry).
fn check_same_gradients(params: &[Tensor], set: &dyn Fn(bool), forward: &dyn Fn() -> Tensor) {
    assert!(!params.is_empty());
    let mut runs = Vec::new();
    for on in [false, true] {
        set(on);
        let before = recomputed_blocks();
        let out = forward();
        let grads = weighted_sum(&out).backward().unwrap();
        if on {
            assert!(recomputed_blocks() > before, "no block was recomputed");
        }
        let g: Vec<Tensor> = params
            .iter()
            .map(|p| grads.get(p).cloned().expect("every trainable tensor gets a gradient"))
            .collect();
        runs.push((out, g));
    }
    set(false);
    assert_eq!(max_abs_diff(&runs[0].0, &runs[1].0), 0.0, "outputs differ");
    for (i, (a, b)) in runs[0].1.iter().zip(&runs[1].1).enumerate() {
        let scale = a
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            .max(1e-12);
        let d = max_abs_diff(a, b);
        assert!(
            d <= 1e-5 * scale,
            "parameter {i}: gradients differ by {d} (scale {scale})"
        );
    }
}

fn unet_inputs() -> (Tensor, Tensor, Tensor) {
    let r = load(&shared_fixtures().join("sd15/reference.safetensors"));
    (
        r["unet.sample"].clone(),
        r["unet.timesteps"].to_dtype(DType::F32).unwrap(),
        r["unet.encoder_hidden_states"].clone(),
    )
}

#[test]
fn unet_full_weights_same_gradients_with_recomputation() {
    let opts = LoadOptions {
        trainable: true,
        ..LoadOptions::default()
    };
    let (unet, vb) = UNet2DConditionModel::from_pretrained(&shared_fixtures().join("sd15/unet"), &opts).unwrap();
    let params: Vec<Tensor> = vb.vars().into_iter().map(|(_, v)| v.as_tensor().clone()).collect();
    let (x, t, ctx) = unet_inputs();
    // The input also needs its gradient (ReNO's case): make it a variable.
    let x = candle_core::Var::from_tensor(&x).unwrap();
    let mut all = params.clone();
    all.push(x.as_tensor().clone());
    check_same_gradients(&all, &|on| unet.set_gradient_checkpointing(on), &|| {
        unet.forward(x.as_tensor(), &t, &ctx, None).unwrap()
    });
}

#[test]
fn unet_lora_same_gradients_with_recomputation() {
    let cfg = diffalign::weights::lora::LoraConfig {
        rank: 2,
        alpha: 2.0,
        target_modules: vec!["to_q".into(), "to_v".into(), "conv1".into(), "proj_in".into()],
        init_seed: 3,
    };
    let opts = LoadOptions {
        lora: Some(std::sync::Arc::new(LoraSource::fresh(&cfg))),
        ..LoadOptions::default()
    };
    let (unet, vb) = UNet2DConditionModel::from_pretrained(&shared_fixtures().join("sd15/unet"), &opts).unwrap();
    let params: Vec<Tensor> = vb.lora_vars().into_iter().map(|(_, v)| v.as_tensor().clone()).collect();
    let (x, t, ctx) = unet_inputs();
    check_same_gradients(&params, &|on| unet.set_gradient_checkpointing(on), &|| {
        unet.forward(&x, &t, &ctx, None).unwrap()
    });
}

#[test]
fn vae_decoder_and_clip_vision_same_gradients_with_recomputation() {
    use diffalign::models::clip::vision_model::{ClipKeyLayout, ClipVisionConfig, ClipVisionModel};
    use diffalign::models::vae::{AutoencoderKL, AutoencoderKLConfig};
    let vae_cfg_path = shared_fixtures().join("sd15/vae/config.json");
    let vae_cfg = AutoencoderKLConfig::from_file(&vae_cfg_path).unwrap();
    let vb = VarBuilder::random(1, DType::F32, &candle_core::Device::Cpu, true);
    let vae = AutoencoderKL::new(&vae_cfg, &vae_cfg_path, vb.clone()).unwrap();
    let z = diffalign::rng::Rng::new(2)
        .randn((1, 4, 8, 8), &candle_core::Device::Cpu)
        .unwrap();
    let decoder_params: Vec<Tensor> = vb
        .vars()
        .into_iter()
        .filter(|(n, _)| n.starts_with("decoder.") || n.starts_with("post_quant_conv."))
        .map(|(_, v)| v.as_tensor().clone())
        .collect();
    check_same_gradients(&decoder_params, &|on| vae.set_gradient_checkpointing(on), &|| {
        vae.decode(&z).unwrap()
    });

    let clip_cfg_path = shared_fixtures().join("turbo-reno/reward_clip/config.json");
    let clip_cfg = ClipVisionConfig::from_file(&clip_cfg_path).unwrap();
    let vb = VarBuilder::random(4, DType::F32, &candle_core::Device::Cpu, true);
    let clip = ClipVisionModel::new(&clip_cfg, ClipKeyLayout::Transformers, vb.pp("vision_model")).unwrap();
    let s = clip_cfg.image_size;
    let pixels = diffalign::rng::Rng::new(5)
        .randn((2, 3, s, s), &candle_core::Device::Cpu)
        .unwrap();
    let params: Vec<Tensor> = vb.vars().into_iter().map(|(_, v)| v.as_tensor().clone()).collect();
    check_same_gradients(&params, &|on| clip.set_gradient_checkpointing(on), &|| {
        clip.forward(&pixels).unwrap().image_embeds
    });
}
