//! Flags shared by every command that loads a pipeline: which model, which files, which dtype.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use diffalign::sampling::pipeline::PipelineSources;
use diffalign::sampling::StableDiffusionPipeline;
use diffalign::weights::{layout, LoadOptions};

/// Where the model comes from and how it is loaded.
#[derive(Debug, Args)]
pub struct ModelArgs {
    /// A diffusers pipeline folder, or a Hugging Face repo id (`stabilityai/sd-turbo`) found in
    /// the local cache (`HF_HUB_CACHE`, `HF_HOME/hub` or `~/.cache/huggingface/hub`).
    #[arg(long)]
    pub model: String,
    /// Cache revision (branch, tag or snapshot hash) of a repo id.
    #[arg(long)]
    pub revision: Option<String>,
    /// Replace the pipeline's VAE with this `vae/` folder (e.g. an fp16-fixed SDXL VAE).
    #[arg(long)]
    pub vae: Option<PathBuf>,
    /// Replace the pipeline's UNet with this `unet/` folder (e.g. a fine-tuned one).
    #[arg(long)]
    pub unet: Option<PathBuf>,
    /// Weight-file variant: `fp16` loads `*.fp16.safetensors`.
    #[arg(long)]
    pub variant: Option<String>,
    /// Compute dtype: f32, f16 or bf16.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Device: cpu, or cuda[:N] in builds with the `cuda` feature.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Download a repo id that is not in the cache (configs, tokenizers and safetensors weights
    /// of the chosen variant) into the Hugging Face cache. Nothing is downloaded without it.
    #[arg(long)]
    pub download: bool,
}

impl ModelArgs {
    /// The model folder (resolved offline) and the load options the flags give.
    pub fn resolve(&self) -> anyhow::Result<(PathBuf, LoadOptions)> {
        let cache = layout::hub_cache_dir(|k| std::env::var(k).ok());
        let root = match layout::resolve_model(&self.model, cache.as_deref(), self.revision.as_deref()) {
            Ok(root) => root,
            Err(e) if self.download => download(&self.model, self.revision.as_deref(), self.variant.as_deref(), cache)
                .with_context(|| format!("{e:#}; downloading it"))?,
            Err(e) => return Err(e.into()),
        };
        let opts = LoadOptions {
            dtype: diffalign::device::parse_dtype(&self.dtype)?,
            device: diffalign::device::parse_device(&self.device)?,
            variant: self.variant.clone(),
            trainable: false,
        };
        Ok((root, opts))
    }

    /// Resolves the model folder (offline) and loads the pipeline.
    pub fn load_pipeline(&self) -> anyhow::Result<StableDiffusionPipeline> {
        let (root, opts) = self.resolve()?;
        let sources = PipelineSources {
            root: root.clone(),
            vae: self.vae.clone(),
            unet: self.unet.clone(),
        };
        StableDiffusionPipeline::load(&sources, &opts).with_context(|| format!("loading model {}", root.display()))
    }
}

#[cfg(feature = "download")]
fn download(
    repo: &str,
    revision: Option<&str>,
    variant: Option<&str>,
    cache: Option<PathBuf>,
) -> anyhow::Result<PathBuf> {
    let cache = cache.context("no Hugging Face cache folder: set HF_HUB_CACHE or HF_HOME")?;
    Ok(diffalign::weights::hub::download_pipeline(
        repo, revision, variant, &cache,
    )?)
}

#[cfg(not(feature = "download"))]
fn download(repo: &str, _: Option<&str>, _: Option<&str>, _: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    anyhow::bail!("--download: {repo}: this build has no download support (build with --features download)")
}
