//! Where a pipeline's files are: a diffusers folder's components, their weight files (single,
//! sharded with an index, `.fp16`-style variants) and the Hugging Face hub cache layout
//! (`models--org--name/snapshots/<revision>`), all offline.

use std::path::{Path, PathBuf};

use super::TensorStore;
use crate::{Error, Result};

/// The weight file and shard index of `stem` in format `ext` (`safetensors`, `bin`).
fn weight_paths(dir: &Path, stem: &str, ext: &str, variant: Option<&str>) -> (PathBuf, PathBuf) {
    match variant {
        Some(v) => (
            dir.join(format!("{stem}.{v}.{ext}")),
            dir.join(format!("{stem}.{ext}.index.{v}.json")),
        ),
        None => (
            dir.join(format!("{stem}.{ext}")),
            dir.join(format!("{stem}.{ext}.index.json")),
        ),
    }
}

/// Opens the weights of one component: `dir/{stem}[.{variant}].safetensors`, or the shards
/// listed by `dir/{stem}.safetensors.index[.{variant}].json`; without either, the pickled
/// weights transformers and diffusers fall back to, `{stem}.bin` (`pytorch_model.bin` for the
/// stem `model`) or its shard index `{stem}.bin.index.json`, read by the restricted unpickler.
pub fn open_weights(dir: &Path, stem: &str, variant: Option<&str>) -> Result<TensorStore> {
    let (single, index) = weight_paths(dir, stem, "safetensors", variant);
    // A folder under the weights' name is named as such, not reported missing.
    if single.is_file() || single.is_dir() {
        return TensorStore::open_file(&single);
    }
    if index.is_dir() {
        return Err(Error::input(
            index.display().to_string(),
            "a folder, not a sharded checkpoint index",
        ));
    }
    if index.is_file() {
        return open_sharded(&index);
    }
    let bin_stem = if stem == "model" { "pytorch_model" } else { stem };
    let (bin, bin_index) = weight_paths(dir, bin_stem, "bin", variant);
    if bin.is_file() {
        return TensorStore::open_file(&bin);
    }
    if bin_index.is_file() {
        return open_sharded(&bin_index);
    }
    if !dir.is_dir() {
        return Err(Error::MissingFile {
            path: dir.to_path_buf(),
            what: "component folder".into(),
        });
    }
    let found: Vec<String> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(stem))
        .collect();
    let hint = if found.is_empty() {
        String::new()
    } else {
        format!(" (found {}; pick one with --variant)", found.join(", "))
    };
    Err(Error::MissingFile {
        path: single,
        what: format!(
            "weights{}{hint}",
            variant.map(|v| format!(" for variant {v:?}")).unwrap_or_default()
        ),
    })
}

/// Opens a sharded checkpoint from its `*.safetensors.index.json` or `*.bin.index.json`
/// (`{"weight_map": {name: file}}`).
pub fn open_sharded(index: &Path) -> Result<TensorStore> {
    let json: serde_json::Value = crate::json::read_json(index, "sharded checkpoint index")?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| Error::config(index, "weight_map", "missing or not an object"))?;
    let dir = index.parent().unwrap_or(Path::new("."));
    let mut files: Vec<PathBuf> = Vec::new();
    for (name, file) in map {
        let file = file
            .as_str()
            .ok_or_else(|| Error::config(index, format!("weight_map.{name}"), "not a file name"))?;
        let path = dir.join(file);
        if !files.contains(&path) {
            files.push(path);
        }
    }
    files.sort();
    let store = TensorStore::open(index, &files)?;
    for name in map.keys() {
        if !store.contains(name) {
            return Err(Error::MissingTensor {
                file: dir.join(map[name].as_str().unwrap_or("?")),
                name: name.clone(),
            });
        }
    }
    Ok(store)
}

/// The Hugging Face hub cache folder from the standard variables, as `huggingface_hub` reads
/// them: `HF_HUB_CACHE`, else `HF_HOME/hub`, else `~/.cache/huggingface/hub`. `get` looks a
/// variable up (the CLI passes `std::env::var`), so the library reads no environment itself.
pub fn hub_cache_dir(get: impl Fn(&str) -> Option<String>) -> Option<PathBuf> {
    if let Some(p) = get("HF_HUB_CACHE").filter(|s| !s.is_empty()) {
        return Some(PathBuf::from(p));
    }
    if let Some(p) = get("HF_HOME").filter(|s| !s.is_empty()) {
        return Some(PathBuf::from(p).join("hub"));
    }
    let home = get("XDG_CACHE_HOME")
        .filter(|s| !s.is_empty())
        .map(PathBuf::from)
        .or_else(|| get("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(home.join("huggingface").join("hub"))
}

/// The snapshot folder of `repo_id` (`org/name`) in the hub cache `cache`: the revision named
/// by `refs/<revision>` (default `main`), or `revision` itself when it is a snapshot hash.
pub fn cached_snapshot(cache: &Path, repo_id: &str, revision: Option<&str>) -> Result<PathBuf> {
    let repo_dir = cache.join(format!("models--{}", repo_id.replace('/', "--")));
    if !repo_dir.is_dir() {
        return Err(Error::MissingFile {
            path: repo_dir,
            what: format!("cached model {repo_id:?} (nothing is downloaded unless --download is given)"),
        });
    }
    let revision = revision.unwrap_or("main");
    let ref_file = repo_dir.join("refs").join(revision);
    let hash = if ref_file.is_file() {
        std::fs::read_to_string(&ref_file)
            .map_err(|e| Error::io(&ref_file, e))?
            .trim()
            .to_string()
    } else {
        revision.to_string()
    };
    let snapshot = repo_dir.join("snapshots").join(&hash);
    if snapshot.is_dir() {
        Ok(snapshot)
    } else {
        Err(Error::MissingFile {
            path: snapshot,
            what: format!("snapshot {hash:?} of cached model {repo_id:?}"),
        })
    }
}

/// Resolves a `--model` argument: an existing folder as is, else a hub repo id looked up in
/// `cache` (offline).
pub fn resolve_model(spec: &str, cache: Option<&Path>, revision: Option<&str>) -> Result<PathBuf> {
    let path = Path::new(spec);
    if path.is_dir() {
        return Ok(path.to_path_buf());
    }
    let looks_like_repo = spec.split('/').count() == 2 && !spec.starts_with('.') && !spec.starts_with('/');
    match (looks_like_repo, cache) {
        (true, Some(cache)) => cached_snapshot(cache, spec, revision),
        _ => Err(Error::MissingFile {
            path: path.to_path_buf(),
            what: "model folder".into(),
        }),
    }
}
