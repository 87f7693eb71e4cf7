//! Pairs listed in a JSONL file, one JSON object per line:
//!
//! ```json
//! {"prompt": "a cat", "chosen": "img/0_w.png", "rejected": "img/0_l.jpg"}
//! {"prompt": "a dog", "chosen": "img/1_w.png", "rejected": "img/1_l.png",
//!  "caption_chosen": "a dog on grass", "caption_rejected": "a blurry dog", "soft_label": 0.7}
//! ```
//!
//! `chosen` is preferred over `rejected`; both are PNG or JPEG paths relative to the JSONL file's
//! folder, or absolute; they may leave that folder (`../`) unless `root_only` is set. `caption` is accepted for `prompt`. With `dual_captions` (DCPO)
//! `caption_chosen` and `caption_rejected` are required and `prompt` is not; `soft_label` (SmPO) is
//! the probability, in [0.5, 1], that the chosen image wins. `path` is the file, or a folder
//! holding `pairs.jsonl`. Blank lines are ignored; other keys are ignored; a leading UTF-8
//! byte-order mark is ignored. Record indices are 0-based line numbers. A line that is not such an object, or whose image files do not exist,
//! is a bad record.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::dataset::{
    check_inside, check_soft_label, handle_bad, read_image, read_text, PairSource, PreferencePair, RecordLocation,
};
use super::spec::DataSpec;
use crate::Result;

#[derive(Debug, Clone, Deserialize)]
struct Line {
    #[serde(default, alias = "caption")]
    prompt: Option<String>,
    chosen: String,
    rejected: String,
    #[serde(default)]
    caption_chosen: Option<String>,
    #[serde(default)]
    caption_rejected: Option<String>,
    #[serde(default)]
    soft_label: Option<f64>,
}

/// One usable line: its index, captions, image paths and soft label.
struct Record {
    line: usize,
    caption_w: String,
    caption_l: String,
    chosen: PathBuf,
    rejected: PathBuf,
    soft_label: Option<f32>,
}

pub(super) struct JsonlPairs {
    file: PathBuf,
    records: Vec<Record>,
    skipped: Vec<(RecordLocation, String)>,
}

/// Validates one parsed line into a record, or says why it is bad.
fn check(line: Line, index: usize, dir: &Path, spec: &DataSpec) -> std::result::Result<Record, String> {
    let dual = spec.dual_captions;
    let (caption_w, caption_l) = if dual {
        match (line.caption_chosen, line.caption_rejected) {
            (Some(w), Some(l)) => (w, l),
            _ => return Err("dual_captions needs caption_chosen and caption_rejected".into()),
        }
    } else {
        let p = line.prompt.ok_or("missing field `prompt`")?;
        (p.clone(), p)
    };
    let chosen = dir.join(&line.chosen);
    let rejected = dir.join(&line.rejected);
    for (what, p) in [("chosen", &chosen), ("rejected", &rejected)] {
        if !p.is_file() {
            return Err(format!("{what} image {} not found", p.display()));
        }
        if spec.root_only {
            check_inside(p, dir, what)?;
        }
    }
    let soft_label = line.soft_label.map(check_soft_label).transpose()?;
    Ok(Record {
        line: index,
        caption_w,
        caption_l,
        chosen,
        rejected,
        soft_label,
    })
}

/// The JSONL file `spec` names (`default_name` inside a folder), its text, and the folder its
/// image paths are relative to.
pub(super) fn read_jsonl(spec: &DataSpec, default_name: &str) -> Result<(PathBuf, String, PathBuf)> {
    let file = if spec.path.is_dir() {
        spec.path.join(default_name)
    } else {
        spec.path.clone()
    };
    let text = read_text(&file)?;
    let dir = match file.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    Ok((file, text, dir))
}

impl JsonlPairs {
    pub(super) fn open(spec: &DataSpec) -> Result<Self> {
        let (file, text, dir) = read_jsonl(spec, "pairs.jsonl")?;
        let limit = spec.limit.unwrap_or(usize::MAX);
        let mut records = Vec::new();
        let mut skipped = Vec::new();
        for (i, line) in text.lines().enumerate() {
            if records.len() >= limit {
                break;
            }
            if line.trim().is_empty() {
                continue;
            }
            let parsed = serde_json::from_str::<Line>(line).map_err(|e| format!("not a pair object: {e}"));
            match parsed.and_then(|l| check(l, i, &dir, spec)) {
                Ok(r) => records.push(r),
                Err(reason) => handle_bad(
                    spec.bad_records,
                    RecordLocation::at_line(&file, i),
                    reason,
                    &mut skipped,
                )?,
            }
        }
        Ok(JsonlPairs { file, records, skipped })
    }
}

impl PairSource for JsonlPairs {
    fn len(&self) -> usize {
        self.records.len()
    }

    fn get(&self, i: usize) -> Result<PreferencePair> {
        let r = &self.records[i];
        let loc = self.location(i);
        Ok(PreferencePair {
            caption_w: r.caption_w.clone(),
            caption_l: r.caption_l.clone(),
            image_w: read_image(&r.chosen, &loc, "chosen")?,
            image_l: read_image(&r.rejected, &loc, "rejected")?,
            soft_label: r.soft_label,
            location: loc,
        })
    }

    fn skipped(&self) -> &[(RecordLocation, String)] {
        &self.skipped
    }

    fn location(&self, i: usize) -> RecordLocation {
        RecordLocation::at_line(&self.file, self.records[i].line)
    }

    fn files(&self) -> Vec<PathBuf> {
        vec![self.file.clone()]
    }
}
