//! How a run starts in its output folder: fresh, or from the newest checkpoint, never quietly
//! the wrong one. `--resume` without a checkpoint is an error naming the folder; a fresh start
//! over an earlier run's checkpoints is an error; a resumed run whose recipe changed in a key
//! that alters what the steps compute is refused unless the change is allowed, and then
//! recorded. Temporary checkpoint folders left by a killed run are removed first.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::checkpoint;
use crate::{Error, Result};

/// Whether to continue from the newest checkpoint of the output folder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Resume {
    /// Start fresh; an output folder that holds checkpoints is an error (default).
    #[default]
    Never,
    /// Continue from the newest checkpoint; none is an error naming the folder (`--resume`).
    Required,
    /// Continue when there is a checkpoint, else start fresh (`--resume-if-possible`, for job
    /// schedulers that restart a job blindly).
    IfPossible,
}

/// Recipe keys a resumed run may change without notice: they do not alter what each step
/// computes (the step count, the non-finite guard, activation recomputation, and everything in
/// `[output]`: checkpoint and validation intervals, prompts, the folder's spelling).
const HARMLESS_KEYS: &[&str] = &[
    "train.steps",
    "train.max_nonfinite_steps",
    "train.gradient_checkpointing",
    "output",
];

/// One recipe key whose value differs between the checkpointed run and this one.
#[derive(Debug, Clone, PartialEq)]
pub struct RecipeChange {
    /// The dotted key (`train.method`).
    pub key: String,
    /// The value in the checkpointed run's `recipe.toml`; `None` when it was not set.
    pub old: Option<toml::Value>,
    /// The value now; `None` when it is no longer set.
    pub new: Option<toml::Value>,
}

impl RecipeChange {
    /// `{"key", "old", "new"}`, unset values as null.
    pub fn to_json(&self) -> serde_json::Value {
        let value = |v: &Option<toml::Value>| v.as_ref().map(|v| serde_json::to_value(v).unwrap_or_default());
        serde_json::json!({"key": self.key, "old": value(&self.old), "new": value(&self.new)})
    }

    /// `key: old -> new`, unset values as `(unset)`.
    pub fn describe(&self) -> String {
        let value = |v: &Option<toml::Value>| v.as_ref().map_or("(unset)".to_string(), |v| v.to_string());
        format!("{}: {} -> {}", self.key, value(&self.old), value(&self.new))
    }
}

/// `key: old -> new; ...` for all of `changes`.
pub fn describe_changes(changes: &[RecipeChange]) -> String {
    let described: Vec<String> = changes.iter().map(RecipeChange::describe).collect();
    described.join("; ")
}

/// The `metrics.jsonl` line recording recipe changes allowed when resuming at `step`:
/// `{"event": "recipe_change", "step", "changes": [{"key", "old", "new"}]}`.
pub fn change_event(step: usize, changes: &[RecipeChange]) -> serde_json::Value {
    let changes: Vec<serde_json::Value> = changes.iter().map(RecipeChange::to_json).collect();
    serde_json::json!({"event": "recipe_change", "step": step, "changes": changes})
}

/// Whether `key` (dotted) is one a resumed run may change freely.
fn harmless(key: &str) -> bool {
    HARMLESS_KEYS
        .iter()
        .any(|h| key == *h || key.strip_prefix(h).is_some_and(|rest| rest.starts_with('.')))
}

/// The leaves of `table` by dotted key; arrays are leaves.
fn flatten(prefix: &str, table: &toml::Table, out: &mut BTreeMap<String, toml::Value>) {
    for (k, v) in table {
        let key = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        match v {
            toml::Value::Table(t) => flatten(&key, t, out),
            other => {
                out.insert(key, other.clone());
            }
        }
    }
}

fn parse(text: &str, file: &Path) -> Result<BTreeMap<String, toml::Value>> {
    let table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| Error::config(file, "(toml)", e.to_string()))?;
    let mut flat = BTreeMap::new();
    flatten("", &table, &mut flat);
    Ok(flat)
}

/// The keys, other than the harmless ones, whose values differ between the recipe `old` (the
/// text of `old_file`) and `new`. A key set in one and unset in the other counts as changed,
/// even when the set value is the default.
pub fn recipe_changes(old: &str, old_file: &Path, new: &str) -> Result<Vec<RecipeChange>> {
    let (old, new) = (parse(old, old_file)?, parse(new, Path::new("(recipe)"))?);
    let keys: std::collections::BTreeSet<&String> = old.keys().chain(new.keys()).collect();
    Ok(keys
        .into_iter()
        .filter(|k| !harmless(k) && old.get(*k) != new.get(*k))
        .map(|k| RecipeChange {
            key: k.clone(),
            old: old.get(k).cloned(),
            new: new.get(k).cloned(),
        })
        .collect())
}

/// Where a run starts, as [`plan_start`] decided.
#[derive(Debug, Clone, Default)]
pub struct Start {
    /// The checkpoint to continue from; `None` for a fresh start.
    pub checkpoint: Option<PathBuf>,
    /// Recipe changes allowed by `allow_recipe_change` (empty otherwise), to be recorded.
    pub changes: Vec<RecipeChange>,
    /// Stale temporary checkpoint folders removed.
    pub removed_tmp: Vec<PathBuf>,
}

/// Decides how a run with the recipe `resolved_toml` starts in the output folder `out`: removes
/// stale temporary checkpoint folders, finds the newest checkpoint, and checks that the start
/// `resume` asks for is possible and that a resumed recipe keeps its meaning (unless
/// `allow_recipe_change`). Reads only small files, so it fails before any model is loaded.
pub fn plan_start(out: &Path, resolved_toml: &str, resume: Resume, allow_recipe_change: bool) -> Result<Start> {
    let dir = out.join("checkpoints");
    let removed_tmp = checkpoint::remove_stale_tmp(&dir)?;
    let latest = checkpoint::latest(&dir)?;
    let checkpoint = match (resume, latest) {
        (Resume::Never, Some(ck)) => {
            return Err(Error::input(
                "train",
                format!(
                    "{}: holds the checkpoint {} of an earlier run; pass --resume to continue it, or choose \
                     another output.dir",
                    out.display(),
                    ck.display()
                ),
            ))
        }
        (Resume::Required, None) => {
            return Err(Error::input(
                "--resume",
                format!(
                    "{}: no checkpoint to resume from (no complete {}/step-*); run without --resume to start, \
                     or with --resume-if-possible",
                    out.display(),
                    dir.display()
                ),
            ))
        }
        (_, found) => found,
    };
    let recipe_file = out.join("recipe.toml");
    let changes = match (&checkpoint, std::fs::read_to_string(&recipe_file)) {
        (Some(_), Ok(old)) => recipe_changes(&old, &recipe_file, resolved_toml)?,
        (Some(_), Err(e)) if e.kind() != std::io::ErrorKind::NotFound => return Err(Error::io(&recipe_file, e)),
        _ => Vec::new(),
    };
    if !changes.is_empty() && !allow_recipe_change {
        let keys: Vec<&str> = changes.iter().map(|c| c.key.as_str()).collect();
        return Err(Error::config(
            &recipe_file,
            keys.join(", "),
            format!(
                "changed since the checkpoint ({}); resuming would continue the run as a different one. \
                 Restore the recipe, start a new output.dir, or pass --allow-recipe-change (recorded in \
                 metrics.jsonl)",
                describe_changes(&changes)
            ),
        ));
    }
    Ok(Start {
        checkpoint,
        changes,
        removed_tmp,
    })
}
