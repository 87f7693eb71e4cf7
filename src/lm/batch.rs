//! Batches of language-model preference pairs: the pre-tokenised safetensors format
//! (`input_ids_{w,l}`, `attention_mask_{w,l}`, `completion_mask_{w,l}`, each `[B, T]`, right
//! padded) and the same built from tokenised records.

use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::weights::TensorStore;
use crate::{Error, Result};

/// One side of a batch: token ids, attention mask and completion mask, each `[B, T]`.
#[derive(Debug, Clone)]
pub struct Sequences {
    /// Token ids, u32.
    pub input_ids: Tensor,
    /// 1 on tokens, 0 on padding (f32).
    pub attention_mask: Tensor,
    /// 1 on the completion tokens whose log-probabilities count (f32).
    pub completion_mask: Tensor,
}

/// A batch of pairs: the preferred (`w`) and rejected (`l`) sequences.
#[derive(Debug, Clone)]
pub struct PairBatch {
    /// Preferred sequences.
    pub chosen: Sequences,
    /// Rejected sequences.
    pub rejected: Sequences,
}

impl Sequences {
    /// Number of rows.
    pub fn len(&self) -> usize {
        self.input_ids.dim(0).unwrap_or(0)
    }

    /// Whether there are no rows.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Right-padded sequences from `(tokens, completion_start)` rows: tokens before
    /// `completion_start` are the prompt; `pad_id` fills the rest.
    pub fn from_rows(rows: &[(Vec<u32>, usize)], pad_id: u32, device: &Device) -> Result<Self> {
        let t = rows.iter().map(|(r, _)| r.len()).max().unwrap_or(0).max(1);
        let b = rows.len();
        let mut ids = vec![pad_id; b * t];
        let mut att = vec![0f32; b * t];
        let mut comp = vec![0f32; b * t];
        for (i, (r, start)) in rows.iter().enumerate() {
            if *start == 0 || *start > r.len() {
                return Err(Error::input(
                    "pair",
                    format!("row {i}: the completion must start after at least one prompt token"),
                ));
            }
            for (j, &tok) in r.iter().enumerate() {
                ids[i * t + j] = tok;
                att[i * t + j] = 1.0;
                comp[i * t + j] = if j >= *start { 1.0 } else { 0.0 };
            }
        }
        Ok(Sequences {
            input_ids: Tensor::from_vec(ids, (b, t), device)?,
            attention_mask: Tensor::from_vec(att, (b, t), device)?,
            completion_mask: Tensor::from_vec(comp, (b, t), device)?,
        })
    }

    /// The position of each row's last prompt token (before its first completion token).
    pub fn last_prompt_positions(&self) -> Result<Vec<usize>> {
        let rows = self.completion_mask.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        rows.iter()
            .enumerate()
            .map(|(i, r)| {
                r.iter()
                    .position(|&m| m > 0.0)
                    .filter(|&p| p > 0)
                    .map(|p| p - 1)
                    .ok_or_else(|| Error::input("completion_mask", format!("row {i} has no completion after a prompt")))
            })
            .collect()
    }
}

/// Fails, naming the file, tensor and row, unless every value of `ids` `[B, T]` is a whole
/// number in `0..=u32::MAX`: a conversion would silently turn -5 into 0 and 2.5 into 2.
fn check_token_ids(path: &Path, key: &str, ids: &Tensor) -> Result<()> {
    for (row, values) in ids.to_vec2::<f64>()?.iter().enumerate() {
        if let Some((pos, v)) = values
            .iter()
            .enumerate()
            .find(|(_, v)| !(v.fract() == 0.0 && (0.0..=u32::MAX as f64).contains(*v)))
        {
            return Err(Error::Record {
                file: path.to_path_buf(),
                index: row,
                reason: format!("{key}: position {pos}: token ids must be whole numbers from 0, got {v}"),
            });
        }
    }
    Ok(())
}

impl PairBatch {
    /// Reads the pre-tokenised format; errors name the file and the tensor.
    pub fn from_file(path: &Path, device: &Device) -> Result<Self> {
        let store = TensorStore::open_file(path)?;
        let side = |s: &str| -> Result<Sequences> {
            let get = |name: &str, dtype: DType| -> Result<Tensor> {
                let key = format!("{name}_{s}");
                if !store.contains(&key) {
                    return Err(Error::input(
                        path.display().to_string(),
                        format!("missing tensor {key:?} (a batch has input_ids, attention_mask and completion_mask for w and l)"),
                    ));
                }
                let t = store.get(&key, None, DType::F64, &Device::Cpu)?;
                if t.rank() != 2 {
                    return Err(Error::input(
                        format!("{}: {key}", path.display()),
                        format!("expected [B, T], got {:?}", t.dims()),
                    ));
                }
                if dtype == DType::U32 {
                    check_token_ids(path, &key, &t)?;
                }
                Ok(t.to_dtype(dtype)?.to_device(device)?)
            };
            let seq = Sequences {
                input_ids: get("input_ids", DType::U32)?,
                attention_mask: get("attention_mask", DType::F32)?,
                completion_mask: get("completion_mask", DType::F32)?,
            };
            let dims = seq.input_ids.dims().to_vec();
            for (n, t) in [
                ("attention_mask", &seq.attention_mask),
                ("completion_mask", &seq.completion_mask),
            ] {
                if t.dims() != dims.as_slice() {
                    return Err(Error::input(
                        format!("{}: {n}_{s}", path.display()),
                        format!("shape {:?} differs from input_ids_{s} {:?}", t.dims(), dims),
                    ));
                }
            }
            Ok(seq)
        };
        let batch = PairBatch {
            chosen: side("w")?,
            rejected: side("l")?,
        };
        if batch.chosen.len() != batch.rejected.len() {
            return Err(Error::input(
                path.display().to_string(),
                format!(
                    "{} chosen rows but {} rejected",
                    batch.chosen.len(),
                    batch.rejected.len()
                ),
            ));
        }
        Ok(batch)
    }

    /// Number of pairs.
    pub fn len(&self) -> usize {
        self.chosen.len()
    }

    /// Fails, naming `source` (the batch file) and the model's `max_position_embeddings`, when
    /// the sequences are longer than the model's positions: the attention mask alone of a
    /// 100,000-token batch would take 40 GB.
    pub fn check_positions(&self, max_positions: usize, source: &Path) -> Result<()> {
        for (side, seq) in [("w", &self.chosen), ("l", &self.rejected)] {
            let t = seq.input_ids.dim(1)?;
            if t > max_positions {
                return Err(Error::input(
                    format!("{}: input_ids_{side}", source.display()),
                    format!("{} per sequence", too_long(t, max_positions)),
                ));
            }
        }
        Ok(())
    }

    /// Whether the batch is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Why a sequence of `tokens` does not fit a model of `max_positions` positions.
pub(crate) fn too_long(tokens: usize, max_positions: usize) -> String {
    format!("{tokens} tokens, more than the model's max_position_embeddings {max_positions}")
}
