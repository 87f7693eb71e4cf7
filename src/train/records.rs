//! What a diffusion run logs: one [`StepRecord`] per optimizer step, appended to
//! `metrics.jsonl` (beside event lines such as an allowed recipe change), and read back, cut at
//! the checkpoint's step, when a run resumes.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::data::skipped::SkippedRecord;
use crate::weights::store::write_atomic;
use crate::{Error, Result};

/// What one optimizer step logged.
#[derive(Debug, Clone, Serialize)]
pub struct StepRecord {
    /// Optimizer step (1-based).
    pub step: usize,
    /// Mean loss over the accumulated passes.
    pub loss: f64,
    /// Mean implicit accuracy (DPO family).
    pub implicit_acc: Option<f64>,
    /// Mean reward margin (DPO family).
    pub reward_margin: Option<f64>,
    /// Mean policy MSE of the preferred and rejected images.
    pub mse_w: f64,
    /// See `mse_w`.
    pub mse_l: f64,
    /// Mean reference MSEs, when the reference runs.
    pub ref_mse_w: Option<f64>,
    /// See `ref_mse_w`.
    pub ref_mse_l: Option<f64>,
    /// Learning rate used.
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Whether the step was skipped for a non-finite loss or gradient.
    pub skipped: bool,
    /// f16 runs: the loss scale this step used.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub loss_scale: Option<f64>,
    /// Records left out while building this step's batches (an image that does not decode,
    /// under `bad_records = "skip"`); not written to `metrics.jsonl`.
    #[serde(skip)]
    pub bad_records: Vec<SkippedRecord>,
}

/// A run's `metrics.jsonl`.
pub(super) struct MetricsLog {
    path: PathBuf,
}

impl MetricsLog {
    /// The log of the run writing to `out`.
    pub(super) fn new(out: &Path) -> Self {
        MetricsLog {
            path: out.join("metrics.jsonl"),
        }
    }

    /// The file.
    pub(super) fn path(&self) -> &Path {
        &self.path
    }

    /// Empties the log, for a fresh start.
    pub(super) fn clear(&self) -> Result<()> {
        write_atomic(&self.path, "")
    }

    /// The records of the steps up to `step` (a resumed run's checkpoint); later lines are
    /// dropped from the file, event lines up to there kept.
    pub(super) fn read_until(&self, step: usize) -> Result<Vec<StepRecord>> {
        let path = self.path.clone();
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(Error::io(&path, e)),
        };
        let mut kept = String::new();
        let mut records = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let v: serde_json::Value = serde_json::from_str(line).map_err(|e| Error::Record {
                file: path.clone(),
                index: i,
                reason: e.to_string(),
            })?;
            let line_step = v["step"].as_u64().unwrap_or(u64::MAX) as usize;
            if line_step > step {
                break;
            }
            kept.push_str(line);
            kept.push('\n');
            if v.get("event").is_some() {
                continue;
            }
            records.push(StepRecord {
                step: line_step,
                loss: v["loss"].as_f64().unwrap_or(f64::NAN),
                implicit_acc: v["implicit_acc"].as_f64(),
                reward_margin: v["reward_margin"].as_f64(),
                mse_w: v["mse_w"].as_f64().unwrap_or(f64::NAN),
                mse_l: v["mse_l"].as_f64().unwrap_or(f64::NAN),
                ref_mse_w: v["ref_mse_w"].as_f64(),
                ref_mse_l: v["ref_mse_l"].as_f64(),
                lr: v["lr"].as_f64().unwrap_or(0.0),
                grad_norm: v["grad_norm"].as_f64().unwrap_or(f64::NAN),
                skipped: v["skipped"].as_bool().unwrap_or(false),
                loss_scale: v["loss_scale"].as_f64(),
                bad_records: Vec::new(),
            });
        }
        write_atomic(&path, kept)?;
        Ok(records)
    }

    /// Appends `record` as one line.
    pub(super) fn append(&self, record: &StepRecord) -> Result<()> {
        self.append_line(&serde_json::to_string(record).expect("record serialises"))
    }

    /// Appends one line to `metrics.jsonl`.
    pub(super) fn append_line(&self, line: &str) -> Result<()> {
        let path = &self.path;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| Error::io(path, e))?;
        writeln!(f, "{line}").map_err(|e| Error::io(path, e))
    }
}
