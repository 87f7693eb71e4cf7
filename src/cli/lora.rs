//! `diffalign lora`: fuse a LoRA into a UNet (`merge`), or rewrite a LoRA file in another key form
//! (`convert`). Applying a LoRA without merging is `--lora` on any command that loads a model.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context};
use candle_core::{DType, Device};
use clap::{Args, Subcommand, ValueEnum};
use diffalign::weights::lora::{fuse_store, save_kohya_parts, save_peft_parts, LdmNames, LoraPart};
use diffalign::weights::LoraSource;
use diffalign::weights::{layout, save_safetensors, WeightFile};

/// Flags of `diffalign lora`.
#[derive(Debug, Args)]
pub struct LoraArgs {
    #[command(subcommand)]
    command: LoraCommand,
}

#[derive(Debug, Subcommand)]
enum LoraCommand {
    /// Fuse a LoRA into the UNet's weights (W + scale * B @ A) and write a diffusers `unet/`
    /// folder (config.json and diffusion_pytorch_model.safetensors), usable as `--unet`; its
    /// text-encoder adapters, if any, into text-encoder folders (`--out-text-encoder`, `-2`).
    Merge(MergeArgs),
    /// Rewrite a LoRA (UNet and text-encoder parts) in diffusers/PEFT or kohya (A1111, ComfyUI) form.
    Convert(ConvertArgs),
}

/// Flags of `diffalign lora merge`.
#[derive(Debug, Args)]
struct MergeArgs {
    /// A diffusers pipeline folder, a Hugging Face repo id found in the local cache, or a `unet/`
    /// folder itself.
    #[arg(long)]
    model: String,
    /// Cache revision (branch, tag or snapshot hash) of a repo id.
    #[arg(long)]
    revision: Option<String>,
    /// Weight-file variant: `fp16` reads `diffusion_pytorch_model.fp16.safetensors`.
    #[arg(long)]
    variant: Option<String>,
    /// The LoRA (diffusers/PEFT, old diffusers or kohya safetensors).
    #[arg(long)]
    lora: PathBuf,
    /// The `unet/` folder to write; it must not exist, or be empty. Needed when the LoRA has
    /// UNet keys.
    #[arg(long)]
    out: Option<PathBuf>,
    /// The `text_encoder/` folder to write (config.json, model.safetensors) when the LoRA has
    /// keys for the first text encoder (`text_encoder.*`, `lora_te_*`, `lora_te1_*`); `--model`
    /// must then be a pipeline.
    #[arg(long)]
    out_text_encoder: Option<PathBuf>,
    /// The `text_encoder_2/` folder to write when the LoRA has keys for SDXL's second text
    /// encoder (`text_encoder_2.*`, `lora_te2_*`).
    #[arg(long)]
    out_text_encoder_2: Option<PathBuf>,
    /// Dtype of the merged weights: f32, f16 or bf16 (default: the stored dtype). The fusion
    /// itself is computed in f32.
    #[arg(long)]
    dtype: Option<String>,
}

/// Key form of `diffalign lora convert --to`.
#[derive(Debug, Clone, Copy, ValueEnum)]
enum Form {
    /// `lora_unet_<module>.lora_down.weight` / `.lora_up.weight` / `.alpha`.
    Kohya,
    /// `unet.<module>.lora_A.weight` / `.lora_B.weight` with `lora_adapter_metadata`.
    Peft,
}

/// Flags of `diffalign lora convert`.
#[derive(Debug, Args)]
struct ConvertArgs {
    /// The LoRA to read (any supported form).
    #[arg(long)]
    lora: PathBuf,
    /// The base model (pipeline folder, cached repo id, or `unet/` folder). kohya output then
    /// uses the naming sd-scripts uses for its architecture: LDM block names
    /// (`input_blocks_4_1_...`) for SDXL, diffusers paths otherwise (also without `--model`).
    /// Needed to read a kohya file with LDM names. Text-encoder modules then follow the model's
    /// own paths (with or without `text_model.`).
    #[arg(long)]
    model: Option<String>,
    /// Cache revision (branch, tag or snapshot hash) of a repo id.
    #[arg(long)]
    revision: Option<String>,
    /// The form to write.
    #[arg(long, value_enum)]
    to: Form,
    /// The file to write.
    #[arg(long)]
    out: PathBuf,
}

/// Runs `diffalign lora`.
pub fn run(args: LoraArgs) -> anyhow::Result<()> {
    match args.command {
        LoraCommand::Merge(a) => merge(a),
        LoraCommand::Convert(a) => convert(a),
    }
}

const STEM: &str = "diffusion_pytorch_model";

/// The `unet/` folder `--model` names: the folder itself when it holds a UNet config, else the
/// `unet/` of a pipeline folder or cached repo.
fn unet_dir(model: &str, revision: Option<&str>) -> anyhow::Result<PathBuf> {
    let direct = Path::new(model);
    if direct.join("config.json").is_file() && !direct.join("model_index.json").is_file() {
        return Ok(direct.to_path_buf());
    }
    let cache = layout::hub_cache_dir(|k| std::env::var(k).ok());
    let root = layout::resolve_model(model, cache.as_deref(), revision)?;
    Ok(root.join("unet"))
}

/// The dtype a component's weights are stored in (of its first file's first tensor).
fn stored_dtype(dir: &Path, stem: &str, variant: Option<&str>) -> anyhow::Result<DType> {
    let suffix = variant.map(|v| format!(".{v}")).unwrap_or_default();
    let single = dir.join(format!("{stem}{suffix}.safetensors"));
    let file = if single.is_file() {
        single
    } else {
        let index = dir.join(format!("{stem}.safetensors.index{suffix}.json"));
        let json: serde_json::Value = diffalign::json::read_json(&index, "sharded checkpoint index")?;
        let first = json["weight_map"]
            .as_object()
            .and_then(|m| m.values().next())
            .and_then(|v| v.as_str())
            .with_context(|| format!("{}: no weight_map entries", index.display()))?;
        dir.join(first)
    };
    let f = WeightFile::open(&file)?;
    let name = f
        .names()
        .into_iter()
        .next()
        .with_context(|| format!("{}: no tensors", file.display()))?;
    Ok(f.load(&name, &Device::Cpu)?.dtype())
}

fn merge(args: MergeArgs) -> anyhow::Result<()> {
    let source = Arc::new(LoraSource::from_file_all(&args.lora, false).context("--lora")?);
    let unet = unet_dir(&args.model, args.revision.as_deref())?;
    let parts: Vec<Arc<LoraSource>> = std::iter::once(source.clone())
        .chain(source.others().iter().cloned())
        .collect();
    // Every output is checked before any is written.
    let mut jobs = Vec::new();
    for part in parts {
        let component = part.component();
        let (dir, stem, out, flag) = match component {
            "unet" => (unet.clone(), STEM, &args.out, "--out"),
            "text_encoder" => (
                unet.with_file_name(component),
                "model",
                &args.out_text_encoder,
                "--out-text-encoder",
            ),
            _ => (
                unet.with_file_name(component),
                "model",
                &args.out_text_encoder_2,
                "--out-text-encoder-2",
            ),
        };
        let Some(out) = out else {
            bail!(
                "--lora {}: it has {component} keys; give {flag} DIR to write the merged {component}",
                args.lora.display()
            );
        };
        if out.exists() && !(out.is_dir() && std::fs::read_dir(out)?.next().is_none()) {
            bail!("{flag} {}: already exists and is not an empty folder", out.display());
        }
        jobs.push((part, dir, stem, out));
    }
    for (part, dir, stem, out) in jobs {
        merge_component(&args, &part, &dir, stem, out)?;
    }
    Ok(())
}

/// Fuses `source` into the component in `dir` (weights `{stem}*.safetensors`) and writes `out`
/// (its config.json and `{stem}.safetensors`), via a temporary folder and rename.
fn merge_component(args: &MergeArgs, source: &LoraSource, dir: &Path, stem: &str, out: &Path) -> anyhow::Result<()> {
    let store = layout::open_weights(dir, stem, args.variant.as_deref())?;
    let dtype = match &args.dtype {
        Some(d) => diffalign::device::parse_dtype(d)?,
        None => stored_dtype(dir, stem, args.variant.as_deref())?,
    };
    let tensors = fuse_store(&store, source, dtype, &Device::Cpu)
        .with_context(|| format!("merging {} into {}", args.lora.display(), dir.display()))?;
    let name = out.file_name().context("--out: needs a folder name")?.to_string_lossy();
    let tmp = out.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
    let write = || -> anyhow::Result<()> {
        std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        let config = dir.join("config.json");
        // Written, not copied: a copy would keep a read-only source's permissions.
        let text = std::fs::read(&config).with_context(|| format!("reading {}", config.display()))?;
        std::fs::write(tmp.join("config.json"), text).with_context(|| format!("writing {}", tmp.display()))?;
        let map: HashMap<String, _> = tensors.into_iter().collect();
        let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
        save_safetensors(&tmp.join(format!("{stem}.safetensors")), &map, Some(metadata))?;
        if out.exists() {
            std::fs::remove_dir(out).with_context(|| format!("replacing the empty folder {}", out.display()))?;
        }
        std::fs::rename(&tmp, out).with_context(|| format!("moving {} to {}", tmp.display(), out.display()))?;
        Ok(())
    };
    if let Err(e) = write() {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    eprintln!(
        "merged {} {} LoRA tensor(s) of {} into {} ({dtype:?})",
        source.keys().len(),
        source.component(),
        args.lora.display(),
        out.display()
    );
    Ok(())
}

fn convert(args: ConvertArgs) -> anyhow::Result<()> {
    let source = Arc::new(LoraSource::from_file_all(&args.lora, false).context("--lora")?);
    let parts: Vec<Arc<LoraSource>> = std::iter::once(source.clone())
        .chain(source.others().iter().cloned())
        .collect();
    let ldm = match &args.model {
        Some(model) => {
            let dir = unet_dir(model, args.revision.as_deref())?;
            let store = layout::open_weights(&dir, STEM, None)?;
            Some(LdmNames::from_names(&store.names()))
        }
        None if parts.iter().any(|p| p.has_ldm_names()) => bail!(
            "--lora {}: kohya LoRA with LDM (SDXL) block names; pass the base model as --model",
            args.lora.display()
        ),
        None => None,
    };
    let adapters = parts
        .iter()
        .map(|p| {
            let ldm = ldm.as_ref().filter(|_| p.component() == "unet");
            let mut adapters = p.file_adapters(ldm, &Device::Cpu)?;
            if let (Some(model), true) = (&args.model, p.component() != "unet") {
                let dir = unet_dir(model, args.revision.as_deref())?.with_file_name(p.component());
                clip_layout(&mut adapters, &layout::open_weights(&dir, "model", None)?);
            }
            Ok((p.component(), adapters))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let kohya_ldm = ldm.as_ref().filter(|n| n.is_sdxl());
    let out_parts: Vec<LoraPart> = adapters
        .iter()
        .map(|(component, adapters)| LoraPart {
            component,
            adapters,
            ldm: kohya_ldm.filter(|_| *component == "unet"),
        })
        .collect();
    match args.to {
        Form::Kohya => save_kohya_parts(&args.out, &out_parts)?,
        Form::Peft => save_peft_parts(&args.out, &out_parts)?,
    }
    let counts: Vec<String> = adapters.iter().map(|(c, a)| format!("{} {c}", a.len())).collect();
    eprintln!(
        "wrote {} adapter(s) of {} to {}",
        counts.join(", "),
        args.lora.display(),
        args.out.display()
    );
    Ok(())
}

/// Names text-encoder modules as `store` does: with the `text_model.` prefix (transformers 4, and
/// transformers 5's CLIPTextModelWithProjection) or without (transformers 5's CLIPTextModel), so
/// that PEFT output loads into that model.
fn clip_layout(adapters: &mut [(String, diffalign::weights::LoraAdapter)], store: &diffalign::weights::TensorStore) {
    let prefixed = store.contains("text_model.embeddings.token_embedding.weight");
    for (module, _) in adapters.iter_mut() {
        let bare = module.strip_prefix("text_model.").unwrap_or(module);
        *module = if prefixed {
            format!("text_model.{bare}")
        } else {
            bare.to_string()
        };
    }
}
