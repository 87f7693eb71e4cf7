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
