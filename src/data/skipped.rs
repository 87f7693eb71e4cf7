//! Records left out of a run, and how they are reported: one line each for people (capped, with
//! a count of the rest) and `skipped_records.jsonl` for programs, one JSON object per record:
//! `{"file", "index", ["line"], "reason"}` (`index` 0-based as in error messages, `line` 1-based
//! for records that are lines of a text file).

use std::path::{Path, PathBuf};

use super::dataset::RecordLocation;
use crate::weights::store::write_atomic;
use crate::{Error, Result};

/// A record left out, with the reason.
pub type SkippedRecord = (RecordLocation, String);

/// The file name of the list of skipped records in a run's output folder.
pub const SKIPPED_FILE: &str = "skipped_records.jsonl";

/// How many skipped records are named one by one on the terminal before the rest are counted.
pub const SHOWN_SKIPPED: usize = 20;

/// `file: record I (line L): reason`.
pub fn describe((loc, reason): &SkippedRecord) -> String {
    match loc.line {
        Some(line) => format!("{loc} (line {line}): {reason}"),
        None => format!("{loc}: {reason}"),
    }
}

/// One line per record for the first `cap`, then `... and N more`.
pub fn summary_lines(skipped: &[SkippedRecord], cap: usize) -> Vec<String> {
    let mut lines: Vec<String> = skipped.iter().take(cap).map(describe).collect();
    if skipped.len() > cap {
        lines.push(format!("... and {} more", skipped.len() - cap));
    }
    lines
}

/// Why a dataset has no usable pair: how many records were skipped and the first reasons.
pub fn explain_empty(path: &Path, skipped: &[SkippedRecord]) -> String {
    let why = if skipped.is_empty() {
        "the data holds no pairs (blank lines are ignored; ties are dropped unless drop_ties = false; \
         limit = 0 reads none)"
            .to_string()
    } else {
        let first: Vec<String> = skipped.iter().take(3).map(describe).collect();
        format!(
            "all {} record(s) were skipped, first: {}",
            skipped.len(),
            first.join("; ")
        )
    };
    format!("{}: no usable preference pairs: {why}", path.display())
}

/// Appends to `list` the records of `more` whose location it does not hold yet.
pub fn merge(list: &mut Vec<SkippedRecord>, more: &[SkippedRecord]) {
    let mut held: std::collections::HashSet<RecordLocation> = list.iter().map(|(loc, _)| loc.clone()).collect();
    for s in more {
        if held.insert(s.0.clone()) {
            list.push(s.clone());
        }
    }
}

/// The JSON object of one skipped record.
fn to_json((loc, reason): &SkippedRecord) -> serde_json::Value {
    let mut v = serde_json::json!({"file": loc.file, "index": loc.index, "reason": reason});
    if let Some(line) = loc.line {
        v["line"] = line.into();
    }
    v
}

/// Writes `skipped` to `path` as JSONL, atomically (a temporary file, then a rename).
pub fn write_skipped(path: &Path, skipped: &[SkippedRecord]) -> Result<()> {
    let text: String = skipped.iter().map(|s| format!("{}\n", to_json(s))).collect();
    write_atomic(path, text)
}

/// Reads a list written by [`write_skipped`]; a missing file is an empty list.
pub fn read_skipped(path: &Path) -> Result<Vec<SkippedRecord>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(path, e)),
    };
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let bad = |what: &str| Error::Record {
            file: path.to_path_buf(),
            index: i,
            reason: format!("expected {{\"file\", \"index\", \"reason\"}}, {what}"),
        };
        let v: serde_json::Value = serde_json::from_str(line).map_err(|e| bad(&e.to_string()))?;
        let (Some(file), Some(index), Some(reason)) = (v["file"].as_str(), v["index"].as_u64(), v["reason"].as_str())
        else {
            return Err(bad(&format!("got {line}")));
        };
        let mut loc = RecordLocation::new(PathBuf::from(file), index as usize);
        loc.line = v["line"].as_u64().map(|l| l as usize);
        out.push((loc, reason.to_string()));
    }
    Ok(out)
}
