//! Flags shared by every command that loads a pipeline: which model, which files, which dtype.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::Args;
use diffalign::sampling::pipeline::PipelineSources;
use diffalign::sampling::StableDiffusionPipeline;
use diffalign::weights::single_file::{summarize_skipped, SingleFile};
use diffalign::weights::{layout, LoadOptions, LoraSource};

use super::device_arg::DeviceArg;

/// Where the model comes from and how it is loaded.
#[derive(Debug, Args)]
pub struct ModelArgs {
    /// A diffusers pipeline folder, a Hugging Face repo id (`stabilityai/sd-turbo`) found in the
    /// local cache (`HF_HUB_CACHE`, `HF_HOME/hub` or `~/.cache/huggingface/hub`), or a single-file
    /// SD 1.x / 2.x / XL checkpoint (`.safetensors` in the original layout, as A1111 and ComfyUI
    /// keep them; needs --config). Default: the embedded shapes-world model (`assets/shapes`).
    #[arg(long)]
    pub model: Option<String>,
    /// For a single-file --model: the diffusers pipeline (folder or cached repo id, like --model)
    /// of the same architecture that gives the configs, tokenizers and scheduler.
    #[arg(long)]
    pub config: Option<String>,
    /// Cache revision (branch, tag or snapshot hash) of a repo id.
    #[arg(long)]
    pub revision: Option<String>,
    /// Replace the pipeline's VAE with this `vae/` folder (e.g. an fp16-fixed SDXL VAE).
    #[arg(long)]
    pub vae: Option<PathBuf>,
    /// Replace the pipeline's UNet with this `unet/` folder (e.g. a fine-tuned one).
    #[arg(long)]
    pub unet: Option<PathBuf>,
    /// A LoRA applied to the UNet and, where it has keys for them, the text encoders: a
    /// safetensors file in diffusers/PEFT (`unet.*`, `text_encoder.*`, `text_encoder_2.*`), old
    /// diffusers (`lora.down`/`lora.up`) or kohya (`lora_unet_*`, `lora_te_*`, `lora_te1_*`,
    /// `lora_te2_*`) form.
    #[arg(long)]
    pub lora: Option<PathBuf>,
    /// Weight-file variant: `fp16` loads `*.fp16.safetensors`.
    #[arg(long)]
    pub variant: Option<String>,
    /// Compute dtype: f32, f16 or bf16.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    #[command(flatten)]
    pub device: DeviceArg,
    /// Download a repo id that is not in the cache (configs, tokenizers and safetensors weights
    /// of the chosen variant) into the Hugging Face cache. Nothing is downloaded without it.
    #[arg(long)]
    pub download: bool,
}

impl ModelArgs {
    /// The single-file checkpoint `--model` names, if it names a file.
    /// `--model`, or the embedded shapes-world pipeline when it is not given.
    fn model_spec(&self) -> anyhow::Result<String> {
        match &self.model {
            Some(m) => Ok(m.clone()),
            None => Ok(diffalign::shapes::assets::shapes_model_dir(&super::assets_cache())?
                .to_string_lossy()
                .into_owned()),
        }
    }

    fn single_file(&self) -> anyhow::Result<Option<PathBuf>> {
        let spec = self.model_spec()?;
        let path = Path::new(&spec);
        if !path.is_file() {
            return Ok(None);
        }
        // PyTorch checkpoints are read by the restricted unpickler (no code runs).
        if !matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("safetensors" | "ckpt" | "pt" | "pth" | "bin")
        ) {
            bail!(
                "--model {}: a single-file checkpoint must be .safetensors or a PyTorch checkpoint (.ckpt, .pt, .pth, .bin)",
                path.display()
            );
        }
        Ok(Some(path.to_path_buf()))
    }

    /// A pipeline folder or repo id, resolved offline (downloaded with --download).
    fn resolve_folder(&self, spec: &str) -> anyhow::Result<PathBuf> {
        let cache = layout::hub_cache_dir(|k| std::env::var(k).ok());
        match layout::resolve_model(spec, cache.as_deref(), self.revision.as_deref()) {
            Ok(root) => Ok(root),
            Err(e) if self.download => download(spec, self.revision.as_deref(), self.variant.as_deref(), cache)
                .with_context(|| format!("{e:#}; downloading it")),
            Err(e) => Err(e.into()),
        }
    }

    /// The dtype, device, variant and LoRA the flags give.
    pub fn load_options(&self) -> anyhow::Result<LoadOptions> {
        Ok(LoadOptions {
            dtype: diffalign::device::parse_dtype(&self.dtype)?,
            device: self.device.device()?,
            variant: self.variant.clone(),
            trainable: false,
            lora: self.lora_source()?,
        })
    }

    /// The `--lora` file, read for each component it has keys for (UNet, text encoders).
    fn lora_source(&self) -> anyhow::Result<Option<Arc<LoraSource>>> {
        let Some(path) = &self.lora else {
            return Ok(None);
        };
        let source = LoraSource::from_file_all(path, false).context("--lora")?;
        let parts: Vec<&str> = std::iter::once(source.component())
            .chain(source.others().iter().map(|o| o.component()))
            .collect();
        eprintln!("note: {}: LoRA for {}", path.display(), parts.join(", "));
        Ok(Some(Arc::new(source)))
    }

    /// The model folder (resolved offline) and the load options the flags give. A single-file
    /// `--model` is an error here: callers of this read the folder's weights themselves.
    pub fn resolve(&self) -> anyhow::Result<(PathBuf, LoadOptions)> {
        if let Some(file) = self.single_file()? {
            bail!(
                "--model {}: a single-file checkpoint; this command needs a diffusers pipeline folder or repo id",
                file.display()
            );
        }
        if let Some(config) = &self.config {
            bail!(
                "--config {config}: only for a single-file --model, but --model {} is not a file",
                self.model_spec()?
            );
        }
        Ok((self.resolve_folder(&self.model_spec()?)?, self.load_options()?))
    }

    /// Resolves the model (offline) and loads the pipeline: from a diffusers folder, or from a
    /// single-file checkpoint with --config's folder.
    pub fn load_pipeline(&self) -> anyhow::Result<StableDiffusionPipeline> {
        let Some(file) = self.single_file()? else {
            let (root, opts) = self.resolve()?;
            let sources = PipelineSources {
                root: root.clone(),
                vae: self.vae.clone(),
                unet: self.unet.clone(),
            };
            return StableDiffusionPipeline::load(&sources, &opts)
                .with_context(|| format!("loading model {}", root.display()));
        };
        let config = self.config.as_deref().with_context(|| {
            format!(
                "--model {}: a single-file checkpoint holds weights only; pass --config with a diffusers \
                 pipeline folder or repo id of the same architecture for its configs, tokenizers and scheduler",
                file.display()
            )
        })?;
        let root = self.resolve_folder(config).context("--config")?;
        let opts = self.load_options()?;
        let checkpoint = SingleFile::open(&file)?;
        let sources = PipelineSources {
            root: root.clone(),
            vae: self.vae.clone(),
            unet: self.unet.clone(),
        };
        let pipe = StableDiffusionPipeline::load_single_file(&checkpoint, &sources, &opts).with_context(|| {
            format!(
                "loading {} checkpoint {} with configs from {}",
                checkpoint.architecture().name(),
                file.display(),
                root.display()
            )
        })?;
        for (flag, replaced, prefix) in [
            ("--unet", &self.unet, "model.diffusion_model.*"),
            ("--vae", &self.vae, "first_stage_model.*"),
        ] {
            if let Some(dir) = replaced {
                eprintln!(
                    "note: {}: {prefix} not loaded ({flag} {} replaces it)",
                    file.display(),
                    dir.display()
                );
            }
        }
        for line in summarize_skipped(&checkpoint.skipped()) {
            eprintln!("note: {}: skipped {line}", file.display());
        }
        Ok(pipe)
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
