//! Pretraining a small Stable Diffusion pipeline from scratch on the shapes world
//! ([`super::world`]): first the VAE (reconstruction MSE plus a small KL term), then its latent
//! scale (`1 / std` of the latents, as SD's `scaling_factor`), then the CLIP text encoder and the
//! UNet together with the ordinary denoising loss (epsilon MSE at uniform timesteps, captions
//! dropped to "" at a rate for classifier-free guidance). The standard diffusion loss is also the
//! "SFT" baseline of the preference papers. The result is a diffusers folder.
//!
//! The recipe (`pipelines/pretrain-shapes.toml`):
//! ```toml
//! [world]    # resolution, seed
//! [model]    # configs (a diffusers folder of config files), tokenizer (a tokenizer folder)
//! [vae]      # steps, batch_size, lr, kl_weight
//! [denoiser] # steps, batch_size, lr, warmup_steps, empty_caption_prob
//! [output]   # dir, dtype (of the saved weights)
//! ```

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};
use serde::Deserialize;

use super::{Prompt, Scene};
use crate::models::clip::text_model::{ClipTextConfig, ClipTextLayout, ClipTextModel};
use crate::models::unet::{UNet2DConditionConfig, UNet2DConditionModel};
use crate::models::vae::{AutoencoderKL, AutoencoderKLConfig};
use crate::optim::{clip_grad_norm, AdamWConfig, LrSchedule, Optimizer};
use crate::rng::Rng;
use crate::schedulers::{NoiseSchedule, SchedulerConfig};
use crate::text::ClipTokenizer;
use crate::weights::copy::{copy_file, copy_files};
use crate::weights::store::write_atomic;
use crate::weights::{save_safetensors, VarBuilder};
use crate::{Error, Result};

/// `[world]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorldSection {
    /// Image side in pixels.
    pub resolution: usize,
    /// Seed of the scenes, the initialisation and the noise.
    #[serde(default)]
    pub seed: u64,
}

/// `[model]`: the configs and tokenizer the pretrained model is built from.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigsSection {
    /// A diffusers folder of configs: `model_index.json`, `scheduler/`, and `config.json` in
    /// `unet/`, `vae/`, `text_encoder/` (relative paths are relative to the recipe's folder's
    /// parent, i.e. the repository root for recipes in `pipelines/`).
    pub configs: PathBuf,
    /// The CLIP tokenizer files to ship with the model.
    pub tokenizer: PathBuf,
}

/// `[vae]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VaeSection {
    /// Optimizer steps.
    pub steps: usize,
    /// Images per step.
    pub batch_size: usize,
    /// AdamW learning rate (cosine schedule).
    pub lr: f64,
    /// Weight of the KL term.
    pub kl_weight: f64,
}

/// `[denoiser]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DenoiserSection {
    /// Optimizer steps.
    pub steps: usize,
    /// Images per step.
    pub batch_size: usize,
    /// AdamW learning rate (cosine schedule with warm-up).
    pub lr: f64,
    /// Warm-up steps.
    #[serde(default)]
    pub warmup_steps: usize,
    /// Probability of an empty caption (for classifier-free guidance).
    #[serde(default)]
    pub empty_caption_prob: f64,
    /// Scenes encoded once by the VAE and sampled from (at least one batch).
    #[serde(default = "default_pool")]
    pub pool: usize,
}

fn default_pool() -> usize {
    4096
}

/// `[reward]`: the shapes world's learned reward, a small CLIP trained contrastively on scenes
/// and their captions (soft targets where a batch repeats a caption), saved as a transformers
/// `CLIPModel` folder (a `clipscore` / `pickscore` reward).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RewardSection {
    /// A folder with the `CLIPModel` `config.json` and `preprocessor_config.json`.
    pub configs: PathBuf,
    /// Optimizer steps.
    pub steps: usize,
    /// Scenes per step.
    pub batch_size: usize,
    /// AdamW learning rate (cosine schedule).
    pub lr: f64,
    /// The folder to write.
    pub dir: PathBuf,
}

/// `[output]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PretrainOutput {
    /// The pipeline folder to write (relative paths as for `[model]`).
    pub dir: PathBuf,
    /// Dtype of the saved weights: f32, f16 or bf16.
    #[serde(default = "crate::device::default_dtype_name")]
    pub dtype: String,
}

/// A pretraining recipe.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PretrainRecipe {
    /// The world.
    pub world: WorldSection,
    /// Configs and tokenizer.
    pub model: ConfigsSection,
    /// VAE training.
    pub vae: VaeSection,
    /// Text encoder and UNet training.
    pub denoiser: DenoiserSection,
    /// Where to write.
    pub output: PretrainOutput,
    /// The learned reward model, if any.
    #[serde(default)]
    pub reward: Option<RewardSection>,
}

impl PretrainRecipe {
    /// Reads a recipe; relative paths are resolved against `root`.
    pub fn load(path: &Path, root: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let mut r: PretrainRecipe =
            toml::from_str(&text).map_err(|e| Error::config(path, "recipe", e.message().to_string()))?;
        let mut paths = vec![&mut r.model.configs, &mut r.model.tokenizer, &mut r.output.dir];
        if let Some(reward) = &mut r.reward {
            paths.push(&mut reward.configs);
            paths.push(&mut reward.dir);
        }
        for p in paths {
            if p.is_relative() {
                *p = root.join(&*p);
            }
        }
        crate::device::parse_dtype(&r.output.dtype).map_err(|e| Error::config(path, "output.dtype", e.to_string()))?;
        for (key, v) in [
            ("world.resolution", r.world.resolution),
            ("vae.batch_size", r.vae.batch_size),
            ("denoiser.batch_size", r.denoiser.batch_size),
        ] {
            if v == 0 {
                return Err(Error::config(path, key, "must be at least 1"));
            }
        }
        Ok(r)
    }
}

/// What a phase reports after each step: `(phase, step, steps, loss)`.
pub type Progress<'a> = dyn FnMut(&str, usize, usize, f64) + 'a;

/// A batch of `n` random scenes: images `[n, 3, R, R]` in [-1, 1] and their prompts.
pub fn scene_batch(n: usize, resolution: usize, rng: &mut Rng) -> Result<(Tensor, Vec<Prompt>)> {
    let mut data = Vec::with_capacity(n * 3 * resolution * resolution);
    let mut prompts = Vec::with_capacity(n);
    for _ in 0..n {
        let prompt = Prompt::random(rng);
        let img = Scene::random(prompt, rng).render(resolution);
        for c in 0..3 {
            for y in 0..resolution {
                for x in 0..resolution {
                    let v = img.get_pixel(x as u32, y as u32).0[c];
                    data.push(f32::from(v) / 127.5 - 1.0);
                }
            }
        }
        prompts.push(prompt);
    }
    let images = Tensor::from_vec(data, (n, 3, resolution, resolution), &Device::Cpu)?;
    Ok((images, prompts))
}

fn grads_for(loss: &Tensor, vars: &[(String, Var)]) -> Result<Vec<Tensor>> {
    let grads = loss.backward()?;
    vars.iter()
        .map(|(_, v)| match grads.get(v.as_tensor()) {
            Some(g) => Ok(g.clone()),
            None => Ok(v.as_tensor().zeros_like()?),
        })
        .collect()
}

fn adamw() -> AdamWConfig {
    AdamWConfig {
        weight_decay: 0.0,
        ..AdamWConfig::default()
    }
}

/// Trains the VAE; returns it and its builder.
fn train_vae(r: &PretrainRecipe, rng: &mut Rng, progress: &mut Progress) -> Result<(AutoencoderKL, VarBuilder)> {
    let path = r.model.configs.join("vae/config.json");
    let cfg = AutoencoderKLConfig::from_file(&path)?;
    let vb = VarBuilder::random(r.world.seed, DType::F32, &Device::Cpu, true);
    let vae = AutoencoderKL::new(&cfg, &path, vb.clone())?;
    let vars = vb.vars();
    let mut opt = Optimizer::new(vars.clone(), adamw())?;
    let s = &r.vae;
    for step in 0..s.steps {
        let (x, _) = scene_batch(s.batch_size, r.world.resolution, rng)?;
        let post = vae.encode(&x)?;
        let z = post.sample(rng)?;
        let recon = vae.decode(&z)?;
        let mse = (recon - &x)?.sqr()?.mean_all()?;
        let var = post.std.sqr()?;
        let kl = (((post.mean.sqr()? + &var)? - 1.0)? - var.log()?)?;
        let kl = (kl.sum_all()? * (0.5 / s.batch_size as f64))?;
        let loss = (mse + (kl * s.kl_weight)?)?;
        let mut grads = grads_for(&loss, &vars)?;
        clip_grad_norm(&mut grads, Some(1.0))?;
        let lr = LrSchedule::Cosine.lr(s.lr, step, 0, s.steps);
        opt.update(&grads, lr)?;
        progress("vae", step + 1, s.steps, loss.to_scalar::<f32>()? as f64);
    }
    Ok((vae, vb))
}

/// `1 / std` of the VAE's latent samples over 256 scenes.
fn latent_scale(vae: &AutoencoderKL, r: &PretrainRecipe, rng: &mut Rng) -> Result<f64> {
    let (x, _) = scene_batch(256, r.world.resolution, rng)?;
    let z = vae.encode(&x)?.sample(rng)?.detach();
    let mean = z.mean_all()?.to_scalar::<f32>()? as f64;
    let var = (z.sqr()?.mean_all()?.to_scalar::<f32>()? as f64 - mean * mean).max(1e-12);
    Ok(1.0 / var.sqrt())
}

/// Runs the whole recipe and writes the pipeline folder; `progress` sees every step.
pub fn pretrain(r: &PretrainRecipe, progress: &mut Progress) -> Result<PathBuf> {
    let mut rng = Rng::new(r.world.seed);
    let (vae, vae_vb) = train_vae(r, &mut rng, progress)?;
    let scale = latent_scale(&vae, r, &mut rng)?;

    let te_path = r.model.configs.join("text_encoder/config.json");
    let te_cfg = ClipTextConfig::from_file(&te_path)?;
    let te_vb = VarBuilder::random(r.world.seed + 1, DType::F32, &Device::Cpu, true);
    let text_encoder = ClipTextModel::new(&te_cfg, ClipTextLayout::Prefixed, te_vb.clone())?;
    let unet_path = r.model.configs.join("unet/config.json");
    let unet_cfg = UNet2DConditionConfig::from_file(&unet_path)?;
    let unet_vb = VarBuilder::random(r.world.seed + 2, DType::F32, &Device::Cpu, true);
    let unet = UNet2DConditionModel::new(&unet_cfg, &unet_path, unet_vb.clone())?;
    let tokenizer = ClipTokenizer::from_dir(&r.model.tokenizer)?;
    let schedule = NoiseSchedule::from_config(&SchedulerConfig::from_file(
        r.model.configs.join("scheduler/scheduler_config.json"),
    )?)?;
    let t_max = schedule.num_train_timesteps() as u64;

    // The scenes the denoiser learns from, encoded once: posterior means and deviations.
    let pool = r.denoiser.pool.max(r.denoiser.batch_size);
    let mut pool_prompts = Vec::with_capacity(pool);
    let (mut means, mut stds) = (Vec::new(), Vec::new());
    while pool_prompts.len() < pool {
        let n = (pool - pool_prompts.len()).min(64);
        let (x, prompts) = scene_batch(n, r.world.resolution, &mut rng)?;
        let post = vae.encode(&x)?;
        means.push(post.mean.detach());
        stds.push(post.std.detach());
        pool_prompts.extend(prompts);
        progress("encode", pool_prompts.len(), pool, 0.0);
    }
    let (means, stds) = (Tensor::cat(&means, 0)?, Tensor::cat(&stds, 0)?);

    let mut vars = te_vb.vars();
    vars.extend(unet_vb.vars());
    let mut opt = Optimizer::new(vars.clone(), adamw())?;
    let d = &r.denoiser;
    for step in 0..d.steps {
        let idx: Vec<u32> = (0..d.batch_size).map(|_| rng.below(pool as u64) as u32).collect();
        let prompts: Vec<Prompt> = idx.iter().map(|&i| pool_prompts[i as usize]).collect();
        let idx = Tensor::from_vec(idx, d.batch_size, &Device::Cpu)?;
        let (mean, std) = (means.index_select(&idx, 0)?, stds.index_select(&idx, 0)?);
        let eps = rng.randn(mean.dims(), &Device::Cpu)?;
        let latents = ((mean + (std * eps)?)? * scale)?;
        let captions: Vec<String> = prompts
            .iter()
            .map(|p| {
                if rng.uniform() < d.empty_caption_prob {
                    String::new()
                } else {
                    p.to_string()
                }
            })
            .collect();
        let ids = tokenizer.encode_batch_tensor(&captions, &Device::Cpu)?;
        let context = text_encoder.forward(&ids)?.last_hidden_state;
        let noise = rng.randn(latents.dims(), &Device::Cpu)?;
        let ts: Vec<f32> = (0..d.batch_size).map(|_| rng.below(t_max) as f32).collect();
        let ts = Tensor::from_vec(ts, d.batch_size, &Device::Cpu)?;
        let noisy = schedule.add_noise(&latents, &noise, &ts)?;
        let target = schedule.training_target(&latents, &noise, &ts)?;
        let pred = unet.forward(&noisy, &ts, &context, None)?;
        let loss = (pred - target)?.sqr()?.mean_all()?;
        let mut grads = grads_for(&loss, &vars)?;
        clip_grad_norm(&mut grads, Some(1.0))?;
        let lr = LrSchedule::Cosine.lr(d.lr, step, d.warmup_steps, d.steps);
        opt.update(&grads, lr)?;
        progress("denoiser", step + 1, d.steps, loss.to_scalar::<f32>()? as f64);
    }
    write_pipeline(
        r,
        scale,
        &[("vae", &vae_vb), ("text_encoder", &te_vb), ("unet", &unet_vb)],
    )?;
    Ok(r.output.dir.clone())
}

/// Writes the diffusers folder: configs (the VAE's with its scale), tokenizer and weights.
fn write_pipeline(r: &PretrainRecipe, scale: f64, parts: &[(&str, &VarBuilder)]) -> Result<()> {
    let out = &r.output.dir;
    let dtype = crate::device::parse_dtype(&r.output.dtype)?;
    for name in ["model_index.json", "scheduler/scheduler_config.json"] {
        copy_file(&r.model.configs.join(name), &out.join(name))?;
    }
    copy_files(&r.model.tokenizer, &out.join("tokenizer"))?;
    for (name, vb) in parts {
        let dir = out.join(name);
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        let config_src = r.model.configs.join(name).join("config.json");
        let mut config: serde_json::Value = crate::json::read_json(&config_src, "config file")?;
        if *name == "vae" {
            config["scaling_factor"] = scale.into();
        }
        let config = serde_json::to_string_pretty(&config).expect("a JSON value serialises");
        write_atomic(&dir.join("config.json"), config)?;
        let file = if *name == "text_encoder" {
            "model.safetensors"
        } else {
            "diffusion_pytorch_model.safetensors"
        };
        save_vars(vb, dtype, &dir.join(file))?;
    }
    Ok(())
}

/// Saves the trainable tensors of `vb`, under their checkpoint names, in `dtype`.
pub(crate) fn save_vars(vb: &VarBuilder, dtype: DType, path: &Path) -> Result<()> {
    let tensors: HashMap<String, Tensor> = vb
        .vars()
        .into_iter()
        .map(|(k, v)| Ok((k, v.as_tensor().to_dtype(dtype)?)))
        .collect::<Result<_>>()?;
    save_safetensors(path, &tensors, None)
}

/// `−mean_i Σ_j targets_ij · log_softmax(logits)_ij` over rows.
fn soft_cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let max = logits.max_keepdim(1)?.detach();
    let shifted = logits.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(1)?.log()?;
    let log_probs = shifted.broadcast_sub(&lse)?;
    Ok((targets * log_probs)?.sum(1)?.mean_all()?.neg()?)
}

/// Trains the shapes world's reward CLIP and writes it to `[reward].dir`.
pub fn pretrain_reward(r: &PretrainRecipe, progress: &mut Progress) -> Result<PathBuf> {
    use crate::models::clip::clip_model::ClipModel;
    use crate::models::clip::vision_model::ClipVisionConfig;
    use crate::reward::ClipPreprocess;

    let s = r
        .reward
        .as_ref()
        .ok_or_else(|| Error::input("recipe", "no [reward] section"))?;
    let config = s.configs.join("config.json");
    let text_cfg = ClipTextConfig::from_clip_model_file(&config)?;
    let vision_cfg = ClipVisionConfig::from_file(&config)?;
    let vb = VarBuilder::random(r.world.seed + 3, DType::F32, &Device::Cpu, true);
    let model = ClipModel::new(&text_cfg, &vision_cfg, vb.clone())?;
    let preprocess =
        ClipPreprocess::from_preprocessor_config(&s.configs.join("preprocessor_config.json"), vision_cfg.image_size)?;
    let tokenizer = ClipTokenizer::from_dir(&r.model.tokenizer)?;
    let mut rng = Rng::new(r.world.seed + 3);
    let vars = vb.vars();
    let mut opt = Optimizer::new(vars.clone(), adamw())?;
    let n = s.batch_size;
    for step in 0..s.steps {
        let (x, prompts) = scene_batch(n, r.world.resolution, &mut rng)?;
        let images = ((x + 1.0)? * 0.5)?;
        let img = crate::reward::l2_normalize(&model.get_image_features(&preprocess.forward(&images)?)?)?;
        let captions: Vec<String> = prompts.iter().map(|p| p.to_string()).collect();
        let ids = tokenizer.encode_batch_tensor(&captions, &Device::Cpu)?;
        let txt = crate::reward::l2_normalize(&model.get_text_features(&ids)?)?;
        let logits = img.matmul(&txt.t()?)?.broadcast_mul(&model.logit_scale().exp()?)?;
        let same: Vec<f32> = (0..n * n)
            .map(|k| f32::from(u8::from(prompts[k / n] == prompts[k % n])))
            .collect();
        let same = Tensor::from_vec(same, (n, n), &Device::Cpu)?;
        let targets = same.broadcast_div(&same.sum_keepdim(1)?)?;
        let loss = ((soft_cross_entropy(&logits, &targets)? + soft_cross_entropy(&logits.t()?, &targets)?)? * 0.5)?;
        let mut grads = grads_for(&loss, &vars)?;
        clip_grad_norm(&mut grads, Some(1.0))?;
        opt.update(&grads, LrSchedule::Cosine.lr(s.lr, step, 0, s.steps))?;
        progress("reward", step + 1, s.steps, loss.to_scalar::<f32>()? as f64);
    }
    let dir = &s.dir;
    for name in ["config.json", "preprocessor_config.json"] {
        copy_file(&s.configs.join(name), &dir.join(name))?;
    }
    copy_files(&r.model.tokenizer, dir)?;
    save_vars(
        &vb,
        crate::device::parse_dtype(&r.output.dtype)?,
        &dir.join("model.safetensors"),
    )?;
    Ok(dir.clone())
}
