//! Weight offsets between checkpoints of one architecture: `target + weight * (plus - minus)`,
//! tensor by tensor. Diffusion-NPO guides a fine-tuned model with the fine-tuned weights plus the
//! NPO offset learned on the base model (the official `gen.py` / `gen_xl.py`:
//! `negative = npo + (1 - merge_weight) * (dpo - origin)`, that is `dpo + (npo - origin)` at
//! their default `merge_weight = 0`).

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};

use super::TensorStore;
use crate::{Error, Result};

/// Every tensor of `target` plus `weight` times the difference `plus - minus` of the same tensor,
/// computed in f32 and returned as `dtype`. The three stores must hold the same names with the
/// same shapes; an error names the tensor and the store that differs.
pub fn add_offset(
    target: &TensorStore,
    plus: &TensorStore,
    minus: &TensorStore,
    weight: f64,
    dtype: DType,
    device: &Device,
) -> Result<HashMap<String, Tensor>> {
    let names = target.names();
    for store in [plus, minus] {
        if let Some(extra) = store.names().into_iter().find(|n| !target.contains(n)) {
            return Err(Error::input(
                store.label().display().to_string(),
                format!("tensor {extra} is not in {}", target.label().display()),
            ));
        }
    }
    let mut out = HashMap::with_capacity(names.len());
    for name in names {
        let shape = target.shape(&name).unwrap_or_default();
        let t = target.get(&name, None, DType::F32, device)?;
        let p = plus.get(&name, Some(&shape), DType::F32, device)?;
        let m = minus.get(&name, Some(&shape), DType::F32, device)?;
        let merged = (t + ((p - m)? * weight)?)?;
        out.insert(name, merged.to_dtype(dtype)?);
    }
    Ok(out)
}
