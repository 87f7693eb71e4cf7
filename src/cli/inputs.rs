//! Inputs several commands share: prompts, initial noise and reward models.

use std::collections::BTreeSet;
use std::path::Path;

use anyhow::{bail, Context};
use candle_core::{DType, Device, Tensor};
use diffalign::reward::{load_reward, ImageReward, RewardSpec};
use diffalign::sampling::StableDiffusionPipeline;
use diffalign::weights::{LoadOptions, TensorStore};

/// The prompts of `--prompt TEXT` or `--prompts FILE` (one per line, blank lines skipped).
pub fn read_prompts(prompt: Option<&str>, file: Option<&Path>) -> anyhow::Result<Vec<String>> {
    match (prompt, file) {
        (Some(p), None) => Ok(vec![p.to_string()]),
        (None, Some(file)) => {
            let text = std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
            let prompts: Vec<String> = text
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(String::from)
                .collect();
            if prompts.is_empty() {
                bail!("{}: no prompts in the file", file.display());
            }
            Ok(prompts)
        }
        _ => bail!("give --prompt TEXT or --prompts FILE"),
    }
}

/// The tensor `init_noise` `[1, C, h, w]` of a safetensors file, in f32 on the CPU.
pub fn load_init_noise(path: &Path) -> anyhow::Result<Tensor> {
    let store = TensorStore::open_file(path)?;
    let t = store.get("init_noise", None, DType::F32, &Device::Cpu)?;
    if t.rank() != 4 || t.dim(0)? != 1 {
        bail!(
            "{}: init_noise: expected shape [1, C, h, w], got {:?}",
            path.display(),
            t.dims()
        );
    }
    Ok(t)
}

/// The image size in pixels: `--height`/`--width` when given, else the initial noise's size, else
/// the UNet's sample size, times the VAE factor.
pub fn image_size(
    pipe: &StableDiffusionPipeline,
    init_noise: Option<&Tensor>,
    height: Option<usize>,
    width: Option<usize>,
) -> anyhow::Result<(usize, usize)> {
    let f = pipe.vae_scale_factor();
    Ok(match (init_noise, height, width) {
        (_, Some(h), Some(w)) => (h, w),
        (Some(n), h, w) => (h.unwrap_or(n.dim(2)? * f), w.unwrap_or(n.dim(3)? * f)),
        (None, h, w) => {
            let (sh, sw) = pipe.unet.sample_size().unwrap_or((64, 64));
            (h.unwrap_or(sh * f), w.unwrap_or(sw * f))
        }
    })
}

/// Parses `--reward KIND=PATH` for clap.
pub fn parse_reward_spec(s: &str) -> Result<RewardSpec, String> {
    s.parse().map_err(|e: diffalign::Error| e.to_string())
}

/// The `--reward` list, or the embedded shapes-world reward (`clipscore`) when none is given.
pub fn reward_specs_or_default(specs: &[RewardSpec]) -> anyhow::Result<Vec<RewardSpec>> {
    if !specs.is_empty() {
        return Ok(specs.to_vec());
    }
    Ok(vec![RewardSpec {
        kind: diffalign::reward::RewardKind::ClipScore,
        path: diffalign::shapes::assets::shapes_reward_dir(&super::assets_cache())?,
    }])
}

/// Loads every `--reward` (each kind at most once), naming the kind and folder on failure.
pub fn load_rewards(specs: &[RewardSpec], opts: &LoadOptions) -> anyhow::Result<Vec<Box<dyn ImageReward>>> {
    let mut seen = BTreeSet::new();
    for spec in specs {
        if !seen.insert(spec.kind) {
            bail!("--reward: {} given twice", spec.kind);
        }
    }
    specs
        .iter()
        .map(|spec| {
            load_reward(spec.kind, &spec.path, opts)
                .with_context(|| format!("loading the {} reward from {}", spec.kind, spec.path.display()))
        })
        .collect()
}
