//! Pairs as two image folders: `w/NAME` is preferred over `l/NAME`, with one caption per name in
//! `captions.jsonl` (`{"file": NAME, "caption": ...}` per line) or `captions.txt` (`NAME<TAB>caption`
//! per line). Names are taken from both folders in sorted order (hidden files ignored); the record
//! index is the position in that order, and the record's file is `w/NAME` (`l/NAME` when only the
//! loser exists). A name in only one folder, a name without a caption, a malformed or duplicate
//! caption line is a bad record; so is, with `root_only`, an image that is a symbolic link to a
//! file outside the root. A leading UTF-8 byte-order mark in the captions file is ignored. No
//! per-image captions or soft labels in this layout.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use super::dataset::{check_inside, handle_bad, read_image, read_text, PairSource, PreferencePair, RecordLocation};
use super::spec::DataSpec;
use crate::{Error, Result};

pub(super) struct FolderPairs {
    root: PathBuf,
    captions_file: PathBuf,
    /// (entry index, name, caption).
    pairs: Vec<(usize, String, String)>,
    skipped: Vec<(RecordLocation, String)>,
}

/// The non-hidden file names of `dir`.
pub(super) fn list(dir: &Path) -> Result<BTreeSet<String>> {
    if !dir.is_dir() {
        return Err(Error::MissingFile {
            path: dir.to_path_buf(),
            what: "image folder".into(),
        });
    }
    let mut names = BTreeSet::new();
    for e in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let e = e.map_err(|e| Error::io(dir, e))?;
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with('.') && e.path().is_file() {
            names.insert(name);
        }
    }
    Ok(names)
}

/// Reads the captions file into name -> caption; bad lines go through the policy.
pub(super) fn read_captions(
    spec: &DataSpec,
    skipped: &mut Vec<(RecordLocation, String)>,
) -> Result<(PathBuf, HashMap<String, String>)> {
    let jsonl = spec.path.join("captions.jsonl");
    let txt = spec.path.join("captions.txt");
    let (file, is_jsonl) = match (jsonl.is_file(), txt.is_file()) {
        (true, true) => {
            return Err(Error::config(
                &spec.path,
                "captions",
                "both captions.jsonl and captions.txt exist; keep one",
            ))
        }
        (true, false) => (jsonl, true),
        (false, true) => (txt, false),
        (false, false) => {
            return Err(Error::MissingFile {
                path: jsonl,
                what: "captions file (captions.jsonl or captions.txt)".into(),
            })
        }
    };
    let text = read_text(&file)?;
    let mut captions = HashMap::new();
    let mut first_line = HashMap::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let parsed: std::result::Result<(String, String), String> = if is_jsonl {
            #[derive(serde::Deserialize)]
            struct Entry {
                file: String,
                caption: String,
            }
            serde_json::from_str::<Entry>(line)
                .map(|e| (e.file, e.caption))
                .map_err(|e| format!("expected {{\"file\": ..., \"caption\": ...}}: {e}"))
        } else {
            line.split_once('\t')
                .map(|(n, c)| (n.to_string(), c.to_string()))
                .ok_or_else(|| "expected NAME<TAB>caption".to_string())
        };
        let loc = RecordLocation::at_line(&file, i);
        match parsed {
            Err(reason) => handle_bad(spec.bad_records, loc, reason, skipped)?,
            Ok((name, _)) if first_line.contains_key(&name) => {
                let reason = format!("second caption for {name} (first on line {})", first_line[&name]);
                handle_bad(spec.bad_records, loc, reason, skipped)?;
            }
            Ok((name, caption)) => {
                first_line.insert(name.clone(), i);
                captions.insert(name, caption);
            }
        }
    }
    Ok((file, captions))
}

impl FolderPairs {
    pub(super) fn open(spec: &DataSpec) -> Result<Self> {
        if spec.dual_captions {
            return Err(Error::config(
                &spec.path,
                "dual_captions",
                "the folders layout has one caption per pair; use jsonl or pickapic for per-image captions",
            ));
        }
        let root = spec.path.clone();
        let mut skipped = Vec::new();
        let (captions_file, captions) = read_captions(spec, &mut skipped)?;
        let w = list(&root.join("w"))?;
        let l = list(&root.join("l"))?;
        let limit = spec.limit.unwrap_or(usize::MAX);
        let mut pairs = Vec::new();
        for (i, name) in w.union(&l).enumerate() {
            if pairs.len() >= limit {
                break;
            }
            let (in_w, in_l) = (w.contains(name), l.contains(name));
            let loc = RecordLocation::new(root.join(if in_w { "w" } else { "l" }).join(name), i);
            let problem = if !in_l {
                Some(format!("l/{name} is missing"))
            } else if !in_w {
                Some(format!("w/{name} is missing"))
            } else if !captions.contains_key(name) {
                Some(format!("no caption for {name} in {}", captions_file.display()))
            } else if spec.root_only {
                ["w", "l"]
                    .into_iter()
                    .find_map(|side| check_inside(&root.join(side).join(name), &root, side).err())
            } else {
                None
            };
            match problem {
                Some(reason) => handle_bad(spec.bad_records, loc, reason, &mut skipped)?,
                None => pairs.push((i, name.clone(), captions[name].clone())),
            }
        }
        Ok(FolderPairs {
            root,
            captions_file,
            pairs,
            skipped,
        })
    }
}

impl PairSource for FolderPairs {
    fn len(&self) -> usize {
        self.pairs.len()
    }

    fn get(&self, i: usize) -> Result<PreferencePair> {
        let (_, name, caption) = &self.pairs[i];
        let path_w = self.root.join("w").join(name);
        let loc = self.location(i);
        Ok(PreferencePair {
            caption_w: caption.clone(),
            caption_l: caption.clone(),
            image_w: read_image(&path_w, &loc, "w")?,
            image_l: read_image(&self.root.join("l").join(name), &loc, "l")?,
            soft_label: None,
            location: loc,
        })
    }

    fn skipped(&self) -> &[(RecordLocation, String)] {
        &self.skipped
    }

    fn location(&self, i: usize) -> RecordLocation {
        let (index, name, _) = &self.pairs[i];
        RecordLocation::new(self.root.join("w").join(name), *index)
    }

    fn files(&self) -> Vec<PathBuf> {
        vec![self.captions_file.clone()]
    }
}
