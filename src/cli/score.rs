//! `diffalign score`: reward-model scores of image files for one prompt, one JSON object per
//! image: `{"image": PATH, "scores": {KIND: SCORE, ...}}`.

use std::path::PathBuf;

use anyhow::Context;
use candle_core::{DType, Tensor};
use clap::Args;
use diffalign::reward::RewardSpec;
use diffalign::sampling::image_io::load_image;
use diffalign::weights::LoadOptions;

use super::device_arg::DeviceArg;
use super::inputs::{load_rewards, parse_reward_spec, reward_specs_or_default};

/// Flags of `diffalign score`.
#[derive(Debug, Args)]
pub struct ScoreArgs {
    /// A reward model as KIND=PATH, repeatable. Kinds: pickscore, clipscore (transformers
    /// CLIPModel folders), hpsv2 (open_clip folder), aesthetic (folder with `clip/` and
    /// `aesthetic.safetensors`), imagereward (folder with `ImageReward.pt`, `med_config.json`,
    /// `vocab.txt`). Default: the embedded
    /// shapes-world reward (clipscore).
    #[arg(long = "reward", value_parser = parse_reward_spec)]
    rewards: Vec<RewardSpec>,
    /// The prompt the images are scored against.
    #[arg(long)]
    prompt: String,
    /// Compute dtype: f32, f16 or bf16.
    #[arg(long, default_value = "f32")]
    dtype: String,
    #[command(flatten)]
    pub device: DeviceArg,
    /// Image files (PNG or JPEG); each is scored on its own, at its own size.
    #[arg(required = true)]
    images: Vec<PathBuf>,
}

pub fn run(args: ScoreArgs) -> anyhow::Result<()> {
    let opts = LoadOptions {
        dtype: diffalign::device::parse_dtype(&args.dtype)?,
        device: args.device.device()?,
        variant: None,
        trainable: false,
        lora: None,
    };
    let rewards = load_rewards(&reward_specs_or_default(&args.rewards)?, &opts)?;
    for path in &args.images {
        let image: Tensor = load_image(path)
            .with_context(|| format!("reading image {}", path.display()))?
            .permute((2, 0, 1))?
            .unsqueeze(0)?
            .to_device(&opts.device)?;
        let mut scores = serde_json::Map::new();
        for reward in &rewards {
            let image = match reward.file_resize() {
                Some(size) => pillow_resized(path, size)?.to_device(&opts.device)?,
                None => image.clone(),
            };
            let s = reward
                .score(&image, &args.prompt)
                .with_context(|| format!("{}: scoring with {}", path.display(), reward.kind()))?;
            let s = s.to_dtype(DType::F64)?.to_vec1::<f64>()?[0];
            scores.insert(reward.kind().name().to_string(), s.into());
        }
        println!("{}", serde_json::json!({ "image": path, "scores": scores }));
    }
    Ok(())
}

/// `path` as a reward's package reads it (torchvision's `Resize(size)` and `CenterCrop(size)` on
/// the Pillow image, bicubic, then `ToTensor`): `[1, 3, size, size]` in [0, 1].
fn pillow_resized(path: &std::path::Path, size: usize) -> anyhow::Result<Tensor> {
    use diffalign::data::resize::{resize, ResampleFilter};
    use diffalign::reward::preprocess::{center_crop_offset, shorter_side_size};
    let img = diffalign::sampling::image_io::read_image_file(path)?.to_rgb8();
    let (w, h) = (img.width() as usize, img.height() as usize);
    let (rh, rw) = shorter_side_size(h, w, size);
    let resized = resize(&img, rw as u32, rh as u32, ResampleFilter::Bicubic);
    let (top, left) = (center_crop_offset(rh, size), center_crop_offset(rw, size));
    let data: Vec<f32> = resized.into_raw().into_iter().map(|b| f32::from(b) / 255.0).collect();
    Ok(Tensor::from_vec(data, (rh, rw, 3), &candle_core::Device::Cpu)?
        .narrow(0, top, size)?
        .narrow(1, left, size)?
        .permute((2, 0, 1))?
        .unsqueeze(0)?)
}
