//! The embedded defaults: the shapes-world pipeline (`assets/shapes`) and its learned reward
//! (`assets/shapes-reward`), compiled into the library and written once to a cache folder, so
//! that every loader reads them like any diffusers or transformers folder and nothing is
//! downloaded. `pipelines/pretrain-shapes.toml` reproduces them.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// One embedded folder: its name and its files (relative path, bytes).
struct Embedded {
    name: &'static str,
    files: &'static [(&'static str, &'static [u8])],
}

macro_rules! embed {
    ($dir:literal: $($file:literal),+ $(,)?) => {
        &[$(($file, include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/assets/", $dir, "/", $file)) as &[u8])),+]
    };
}

const SHAPES: Embedded = Embedded {
    name: "shapes",
    files: embed!("shapes":
        "model_index.json",
        "scheduler/scheduler_config.json",
        "text_encoder/config.json",
        "text_encoder/model.safetensors",
        "tokenizer/merges.txt",
        "tokenizer/tokenizer_config.json",
        "tokenizer/vocab.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/config.json",
        "vae/diffusion_pytorch_model.safetensors",
    ),
};

const SHAPES_REWARD: Embedded = Embedded {
    name: "shapes-reward",
    files: embed!("shapes-reward":
        "config.json",
        "preprocessor_config.json",
        "model.safetensors",
        "merges.txt",
        "tokenizer_config.json",
        "vocab.json",
    ),
};

/// The embedded shapes-world pipeline, as a diffusers folder under `cache` (see [`cache_root`]).
pub fn shapes_model_dir(cache: &Path) -> Result<PathBuf> {
    materialize(&SHAPES, cache)
}

/// The embedded shapes-world reward (a transformers `CLIPModel` folder, kind `clipscore`), under
/// `cache`.
pub fn shapes_reward_dir(cache: &Path) -> Result<PathBuf> {
    materialize(&SHAPES_REWARD, cache)
}

/// Where embedded folders are written: `$DIFFALIGN_CACHE`, else `$XDG_CACHE_HOME/diffalign`,
/// else `~/.cache/diffalign`, else the system temp folder. `env` looks a variable up (the CLI
/// passes `std::env::var_os`), so the library reads no environment itself.
pub fn cache_root(env: impl Fn(&str) -> Option<OsString>) -> PathBuf {
    let var = |k: &str| env(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    var("DIFFALIGN_CACHE")
        .or_else(|| var("XDG_CACHE_HOME").map(|p| p.join("diffalign")))
        .or_else(|| var("HOME").map(|p| p.join(".cache").join("diffalign")))
        .unwrap_or_else(|| std::env::temp_dir().join("diffalign"))
}

/// FNV-1a over every file's name and bytes: the folder name changes with the content.
fn content_hash(e: &Embedded) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for (name, bytes) in e.files {
        for b in name.bytes().chain(bytes.iter().copied()) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x100000001b3);
        }
    }
    h
}

/// Writes `e` once to `root/NAME-HASH` (through a temporary folder and a rename, so a folder
/// that exists is complete) and returns that folder.
fn materialize(e: &Embedded, root: &Path) -> Result<PathBuf> {
    let dir = root.join(format!("{}-{:016x}", e.name, content_hash(e)));
    if dir.is_dir() {
        return Ok(dir);
    }
    let tmp = root.join(format!(".{}-{}.tmp", e.name, std::process::id()));
    let write = |tmp: &Path| -> Result<()> {
        for (name, bytes) in e.files {
            let path = tmp.join(name);
            let parent = path.parent().expect("a file in a folder");
            std::fs::create_dir_all(parent).map_err(|err| Error::io(parent, err))?;
            std::fs::write(&path, bytes).map_err(|err| Error::io(&path, err))?;
        }
        Ok(())
    };
    let result = write(&tmp).and_then(|_| match std::fs::rename(&tmp, &dir) {
        Ok(()) => Ok(()),
        // Another process wrote it first.
        Err(_) if dir.is_dir() => {
            let _ = std::fs::remove_dir_all(&tmp);
            Ok(())
        }
        Err(err) => Err(Error::io(&dir, err)),
    });
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result.map(|_| dir)
}
