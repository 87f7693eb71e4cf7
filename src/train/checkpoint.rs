//! Resumable checkpoints: f32 master weights, the optimizer's state (whatever its kind), and the
//! loop state (step, data position, world size), written to a temporary folder and renamed into place, so a checkpoint is
//! either complete or absent.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use super::loss_scale::LossScale;
use crate::optim::Optimizer;
use crate::weights::{save_safetensors, TensorStore};
use crate::{Error, Result};

/// The loop's position, enough to continue exactly.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TrainState {
    /// Optimizer steps done.
    pub step: usize,
    /// Passes over the data started.
    pub epoch: usize,
    /// Next position in this epoch's order.
    pub position: usize,
    /// Processes of the run (data-parallel runs resume with the same number).
    #[serde(default = "one")]
    pub world_size: usize,
    /// Non-finite steps in a row so far.
    pub nonfinite_in_a_row: usize,
    /// f16 runs: the dynamic loss scale.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss_scale: Option<LossScale>,
}

fn one() -> usize {
    1
}

const PARAMS: &str = "params.safetensors";
const OPTIMIZER: &str = "optimizer.safetensors";
const STATE: &str = "state.json";
/// Metadata key of `optimizer.safetensors` naming the optimizer kind.
const KIND: &str = "optimizer";
/// The kind of a checkpoint without [`KIND`].
const DEFAULT_KIND: &str = "adamw";

/// Writes `checkpoints/step-NNNNNNNN/` under `dir` atomically; returns its path.
pub fn save(dir: &Path, opt: &Optimizer, state: &TrainState) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let final_dir = dir.join(format!("step-{:08}", state.step));
    let tmp = dir.join(format!(".tmp-step-{:08}-{}", state.step, std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    let write = || -> Result<()> {
        let params: HashMap<String, Tensor> = opt.params.iter().map(|p| (p.name.clone(), p.master.clone())).collect();
        save_safetensors(&tmp.join(PARAMS), &params, None)?;
        let moments: HashMap<String, Tensor> = opt.state_tensors().into_iter().collect();
        let mut meta = HashMap::from([("adam_step".to_string(), opt.step.to_string())]);
        // AdamW checkpoints stay as they were before there was a choice: no kind means adamw.
        if opt.config.kind() != DEFAULT_KIND {
            meta.insert(KIND.to_string(), opt.config.kind().to_string());
        }
        save_safetensors(&tmp.join(OPTIMIZER), &moments, Some(meta))?;
        let json = serde_json::to_string_pretty(state).expect("state serialises");
        std::fs::write(tmp.join(STATE), json).map_err(|e| Error::io(tmp.join(STATE), e))?;
        if final_dir.exists() {
            std::fs::remove_dir_all(&final_dir).map_err(|e| Error::io(&final_dir, e))?;
        }
        std::fs::rename(&tmp, &final_dir).map_err(|e| Error::io(&final_dir, e))
    };
    let r = write();
    if r.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    r.map(|_| final_dir)
}

/// Removes the temporary folders (`.tmp-step-*`) a run killed while writing a checkpoint left in
/// `dir`; returns the folders removed.
pub fn remove_stale_tmp(dir: &Path) -> Result<Vec<PathBuf>> {
    if !dir.is_dir() {
        return Ok(Vec::new());
    }
    let mut removed = Vec::new();
    for e in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let p = e.map_err(|e| Error::io(dir, e))?.path();
        let stale = p
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with(".tmp-step-"));
        if stale && p.is_dir() {
            std::fs::remove_dir_all(&p).map_err(|e| Error::io(&p, e))?;
            removed.push(p);
        }
    }
    removed.sort();
    Ok(removed)
}

/// The newest complete checkpoint under `dir`, if any.
pub fn latest(dir: &Path) -> Result<Option<PathBuf>> {
    if !dir.is_dir() {
        return Ok(None);
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("step-"))
                && p.join(STATE).is_file()
        })
        .collect();
    found.sort();
    Ok(found.pop())
}

/// Restores `opt` (master weights into the model's `Var`s, optimizer state, step) from the
/// checkpoint folder `path` and returns the loop state. Names, shapes and the optimizer kind must
/// match the current run.
pub fn load(path: &Path, opt: &mut Optimizer) -> Result<TrainState> {
    let state_file = path.join(STATE);
    let state: TrainState = crate::json::read_json(&state_file, "training state")?;
    let params = TensorStore::open_file(&path.join(PARAMS))?;
    let moments = TensorStore::open_file(&path.join(OPTIMIZER))?;
    let dev = opt
        .params
        .first()
        .map(|p| p.master.device().clone())
        .unwrap_or(candle_core::Device::Cpu);
    let meta = moments.metadata();
    let saved_kind = meta.get(KIND).map_or(DEFAULT_KIND, String::as_str);
    if saved_kind != opt.config.kind() {
        return Err(Error::input(
            path.join(OPTIMIZER).display().to_string(),
            format!(
                "written by the {saved_kind} optimizer, but the recipe's train.optimizer is {}",
                opt.config.kind()
            ),
        ));
    }
    for p in opt.params.iter_mut() {
        let shape = p.master.dims().to_vec();
        p.master = params.get(&p.name, Some(&shape), DType::F32, &dev)?;
        p.var.set(&p.master.to_dtype(p.var.dtype())?)?;
    }
    opt.load_state(&mut |name, shape, dtype| moments.get(name, Some(shape), dtype, &dev))?;
    params.check_all_used(|_| false)?;
    let adam_step = meta.get("adam_step").and_then(|s| s.parse().ok()).unwrap_or(state.step);
    opt.step = adam_step;
    Ok(state)
}
