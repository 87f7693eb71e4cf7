//! Reading JSON files (configs, tokenizer files, checkpoint indexes) with errors that name the
//! file, say what it should have held, and give serde_json's line and column.

use std::path::Path;

use serde::de::DeserializeOwned;

use crate::{Error, Result};

/// Reads and parses the JSON file `path` as `T`. A missing file is [`Error::MissingFile`] naming
/// `what` it should hold ("config file", "tokenizer", ...); bad JSON or content that does not fit
/// `T` is an [`Error::Config`] on key `(file)` with serde_json's line and column.
pub fn read_json<T: DeserializeOwned>(path: &Path, what: &str) -> Result<T> {
    parse_json(&read_text(path, what)?, path, what)
}

/// Parses JSON `text` as `T`; `source` names it in errors and `what` says what it should be, as
/// [`read_json`].
pub fn parse_json<T: DeserializeOwned>(text: &str, source: &Path, what: &str) -> Result<T> {
    serde_json::from_str(text).map_err(|e| {
        let reason = match e.classify() {
            serde_json::error::Category::Data => format!("not a valid {what}: {e}"),
            _ => format!("malformed JSON: {e}"),
        };
        Error::config(source, "(file)", reason)
    })
}

/// The text of the file `path` (a JSON file or a companion such as `merges.txt`); a missing file
/// is [`Error::MissingFile`] naming `what` it should hold.
pub fn read_text(path: &Path, what: &str) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => Error::MissingFile {
            path: path.to_path_buf(),
            what: what.into(),
        },
        _ => Error::io(path, e),
    })
}
