//! `diffalign convert IN OUT.safetensors`: a PyTorch checkpoint (`.ckpt`, `.pt`, `.pth`, `.bin`,
//! read by the restricted unpickler, which runs no code) rewritten as safetensors, every tensor
//! under its name (nested dicts as dotted names, `state_dict` stepped into).

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::bail;
use candle_core::Device;
use clap::Args;
use diffalign::weights::{save_safetensors, WeightFile};

/// Flags of `diffalign convert`.
#[derive(Debug, Args)]
pub struct ConvertArgs {
    /// The checkpoint to read: a PyTorch pickle (zip or legacy `torch.save` format) or a
    /// safetensors file. Any Python global other than tensor storages, dtypes and OrderedDict
    /// makes it fail, naming the global.
    input: PathBuf,
    /// The `.safetensors` file to write (through a temporary file and a rename).
    output: PathBuf,
}

pub fn run(args: ConvertArgs) -> anyhow::Result<()> {
    if args.output.extension().is_none_or(|e| e != "safetensors") {
        bail!("{}: the output must be a .safetensors file", args.output.display());
    }
    let file = WeightFile::open(&args.input)?;
    let names = file.names();
    if names.is_empty() {
        bail!("{}: no tensors to convert", args.input.display());
    }
    let mut tensors = HashMap::with_capacity(names.len());
    let mut bytes = 0;
    for name in names {
        let t = file.load(&name, &Device::Cpu)?;
        bytes += t.elem_count() * t.dtype().size_in_bytes();
        tensors.insert(name, t);
    }
    // The entry transformers' `save_pretrained` writes, which its loaders expect.
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    save_safetensors(&args.output, &tensors, Some(metadata))?;
    println!(
        "{}",
        serde_json::json!({"in": args.input, "out": args.output, "tensors": tensors.len(), "bytes": bytes})
    );
    Ok(())
}
