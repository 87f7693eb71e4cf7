//! Copying model files into an output folder (configs, tokenizers) beside saved weights.

use std::path::Path;

use crate::{Error, Result};

/// Copies `from` to `to`, creating `to`'s folder.
pub fn copy_file(from: &Path, to: &Path) -> Result<()> {
    if let Some(dir) = to.parent() {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    std::fs::copy(from, to).map_err(|e| Error::io(from, e)).map(|_| ())
}

/// Copies every file of the folder `from` into `to` (nothing when they are the same folder).
pub fn copy_files(from: &Path, to: &Path) -> Result<()> {
    if std::fs::canonicalize(from).ok() == std::fs::canonicalize(to).ok() {
        return Ok(());
    }
    for entry in std::fs::read_dir(from).map_err(|e| Error::io(from, e))? {
        let entry = entry.map_err(|e| Error::io(from, e))?;
        copy_file(&entry.path(), &to.join(entry.file_name()))?;
    }
    Ok(())
}
