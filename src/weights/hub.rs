//! Downloading a diffusers pipeline from the Hugging Face Hub into the standard cache (feature
//! `download`; only when the user asks with `--download`). Only what the loader reads is fetched:
//! `model_index.json`, and in each component folder it lists the configs, tokenizer files and
//! the safetensors weights of the requested variant.

use std::path::{Path, PathBuf};

use hf_hub::api::sync::ApiBuilder;
use hf_hub::{Cache, Repo, RepoType};

use crate::{Error, Result};

/// Whether `file` (a repo path) is one the loader needs, given the component folders and the
/// weight variant.
pub fn wanted(file: &str, components: &[String], variant: Option<&str>) -> bool {
    if file == "model_index.json" {
        return true;
    }
    let Some((dir, name)) = file.split_once('/') else {
        return false;
    };
    if name.contains('/') || !components.iter().any(|c| c == dir) {
        return false;
    }
    if name.ends_with(".json") && !name.contains(".safetensors.index") {
        return true;
    }
    if matches!(name, "merges.txt" | "vocab.txt") {
        return true;
    }
    let is_weights = name.ends_with(".safetensors") || name.contains(".safetensors.index");
    if !is_weights {
        return false;
    }
    // Variant files look like `model.fp16.safetensors`, shards `model.fp16-00001-of-00002.safetensors`
    // and indexes `model.safetensors.index.fp16.json`.
    let variant_of = |n: &str| -> Option<String> {
        if let Some(rest) = n.strip_suffix(".json") {
            return rest.rsplit_once(".safetensors.index.").map(|(_, v)| v.to_string());
        }
        let stem = n.strip_suffix(".safetensors")?;
        let (_, tail) = stem.split_once('.')?;
        Some(tail.split('-').next().unwrap_or(tail).to_string())
    };
    variant_of(name).as_deref() == variant
}

/// Downloads `repo_id` (at `revision`, default `main`) into the hub cache `cache` and returns the
/// snapshot folder.
pub fn download_pipeline(
    repo_id: &str,
    revision: Option<&str>,
    variant: Option<&str>,
    cache: &Path,
) -> Result<PathBuf> {
    let net = |e: hf_hub::api::sync::ApiError| Error::input("--download", format!("{repo_id}: {e}"));
    let api = ApiBuilder::from_cache(Cache::new(cache.to_path_buf()))
        .with_progress(true)
        .build()
        .map_err(net)?;
    let repo = api.repo(Repo::with_revision(
        repo_id.to_string(),
        RepoType::Model,
        revision.unwrap_or("main").to_string(),
    ));
    let info = repo.info().map_err(net)?;
    let index_path = repo.get("model_index.json").map_err(net)?;
    let index: serde_json::Value = crate::json::read_json(&index_path, "model index")?;
    let components: Vec<String> = index
        .as_object()
        .map(|o| {
            o.iter()
                .filter(|(k, v)| !k.starts_with('_') && v.as_array().is_some_and(|a| a.iter().any(|x| !x.is_null())))
                .map(|(k, _)| k.clone())
                .collect()
        })
        .unwrap_or_default();
    let files: Vec<&str> = info
        .siblings
        .iter()
        .map(|s| s.rfilename.as_str())
        .filter(|f| wanted(f, &components, variant))
        .collect();
    for f in &files {
        repo.get(f).map_err(net)?;
    }
    Ok(index_path.parent().map(Path::to_path_buf).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::wanted;

    #[test]
    fn download_selects_component_files_of_the_variant() {
        let comps = vec!["unet".to_string(), "text_encoder".to_string(), "tokenizer".to_string()];
        let yes = |f: &str, v: Option<&str>| assert!(wanted(f, &comps, v), "{f} {v:?}");
        let no = |f: &str, v: Option<&str>| assert!(!wanted(f, &comps, v), "{f} {v:?}");
        yes("model_index.json", None);
        yes("unet/config.json", None);
        yes("tokenizer/merges.txt", None);
        yes("unet/diffusion_pytorch_model.safetensors", None);
        no("unet/diffusion_pytorch_model.fp16.safetensors", None);
        yes("unet/diffusion_pytorch_model.fp16.safetensors", Some("fp16"));
        no("unet/diffusion_pytorch_model.safetensors", Some("fp16"));
        yes("unet/diffusion_pytorch_model.safetensors.index.json", None);
        yes("unet/diffusion_pytorch_model-00001-of-00002.safetensors", None);
        yes(
            "unet/diffusion_pytorch_model.fp16-00001-of-00002.safetensors",
            Some("fp16"),
        );
        yes("unet/diffusion_pytorch_model.safetensors.index.fp16.json", Some("fp16"));
        no("unet/diffusion_pytorch_model.bin", None);
        no("v1-5-pruned.safetensors", None);
        no("safety_checker/model.safetensors", None);
        no("vae/config.json", None);
    }
}
