//! Reading diffusers / transformers `config.json` files into typed configs.

use std::collections::BTreeMap;
use std::path::Path;

use serde::de::DeserializeOwned;
use serde::Deserialize;

use crate::{Error, Result};

/// Reads and parses a JSON config file ([`crate::json::read_json`] of a "config file").
pub fn read_config<T: DeserializeOwned>(path: &Path) -> Result<T> {
    crate::json::read_json(path, "config file")
}

/// Loads a diffusers model folder `dir`: `config.json` through `read`, then the model `build`
/// makes from it and `diffusion_pytorch_model*.safetensors`; every tensor of the checkpoint must
/// be used. Returns the model and its builder (whose `vars()` are the trainable parameters when
/// `opts.trainable`).
pub(crate) fn from_diffusers_folder<C, M>(
    dir: &Path,
    opts: &crate::weights::LoadOptions,
    read: fn(&Path) -> Result<C>,
    build: fn(&C, &Path, crate::weights::VarBuilder) -> Result<M>,
) -> Result<(M, crate::weights::VarBuilder)> {
    let config_file = dir.join("config.json");
    let cfg = read(&config_file)?;
    let vb = opts.open(dir, "diffusion_pytorch_model")?;
    let model = build(&cfg, &config_file, vb.clone())?;
    crate::weights::check_all_used(&vb, |_| false)?;
    Ok((model, vb))
}

/// Keys of a config that the model does not read: `extra` minus bookkeeping keys (`_class_name`,
/// `_diffusers_version`, `_name_or_path`, ...), sorted, for a warning.
pub fn unknown_keys(extra: &BTreeMap<String, serde_json::Value>) -> Vec<String> {
    extra.keys().filter(|k| !k.starts_with('_')).cloned().collect()
}

/// A config value given once for all blocks or once per block (`attention_head_dim: 8` or
/// `[5, 10, 20, 20]`).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum PerBlock<T> {
    /// The same value for every block.
    One(T),
    /// One value per block.
    Many(Vec<T>),
}

impl<T: Clone> PerBlock<T> {
    /// The per-block values for `n` blocks; a list of another length is an error naming `key`.
    pub fn expand(&self, n: usize, file: &Path, key: &str) -> Result<Vec<T>> {
        match self {
            PerBlock::One(v) => Ok(vec![v.clone(); n]),
            PerBlock::Many(vs) if vs.len() == n => Ok(vs.clone()),
            PerBlock::Many(vs) => Err(Error::config(
                file,
                key,
                format!(
                    "must have one entry per block ({n}, as down_block_types), got {}",
                    vs.len()
                ),
            )),
        }
    }
}
