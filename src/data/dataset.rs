//! [`PairDataset`]: the usable pairs of a [`DataSpec`], indexed when opened, decoded on demand;
//! plus the record helpers the three layouts share.

use std::fmt;
use std::path::{Path, PathBuf};

use super::records::{LateSkips, Listing, Records};
use super::skipped::{explain_empty, SkippedRecord};
use super::spec::{BadRecordPolicy, DataFormat, DataSpec};
use super::{folders, jsonl, pickapic};
use crate::{Error, Result};

/// Where a record came from, for messages: the data file and the row (parquet), line (JSONL) or
/// entry (folders) index, 0-based.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RecordLocation {
    /// The data file (parquet shard, JSONL file, or the image file of a folder pair).
    pub file: PathBuf,
    /// Row, line or entry index (0-based).
    pub index: usize,
    /// The 1-based line number, when the record is a line of a text file (JSONL, captions).
    pub line: Option<usize>,
}

impl RecordLocation {
    /// A location that is not a line of a text file (a parquet row, a folder entry).
    pub fn new(file: impl Into<PathBuf>, index: usize) -> Self {
        RecordLocation {
            file: file.into(),
            index,
            line: None,
        }
    }

    /// The location of the line with 0-based index `index` of a text file.
    pub fn at_line(file: impl Into<PathBuf>, index: usize) -> Self {
        RecordLocation {
            line: Some(index + 1),
            ..Self::new(file, index)
        }
    }

    /// [`Error::Record`] at this location.
    pub fn error(&self, reason: impl Into<String>) -> Error {
        Error::Record {
            file: self.file.clone(),
            index: self.index,
            reason: reason.into(),
        }
    }
}

impl fmt::Display for RecordLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: record {}", self.file.display(), self.index)
    }
}

/// One preference pair, decoded, preferred image first.
#[derive(Debug, Clone)]
pub struct PreferencePair {
    /// Caption of the preferred image: the prompt, or its own caption with `dual_captions`.
    pub caption_w: String,
    /// Caption of the rejected image: equal to `caption_w` unless the data has per-image captions
    /// and `dual_captions` is on (DCPO).
    pub caption_l: String,
    /// The preferred image.
    pub image_w: image::RgbImage,
    /// The rejected image.
    pub image_l: image::RgbImage,
    /// SmPO: probability that the preferred image wins, in [0.5, 1]; `None` when the data has none.
    pub soft_label: Option<f32>,
    /// Where the pair came from.
    pub location: RecordLocation,
}

/// A layout's index of usable records.
pub(super) trait PairSource: Send + Sync {
    /// Number of usable records.
    fn len(&self) -> usize;
    /// Record `i` (< `len()`), decoded.
    fn get(&self, i: usize) -> Result<PreferencePair>;
    /// Records left out when indexing.
    fn skipped(&self) -> &[(RecordLocation, String)];
    /// Where record `i` (< `len()`) came from.
    fn location(&self, i: usize) -> RecordLocation;
    /// The index files read (parquet shards, the JSONL file, the captions file), for fingerprints.
    fn files(&self) -> Vec<PathBuf>;
}

/// The usable pairs of a [`DataSpec`]: [`Self::open`] scans and validates the records (labels,
/// captions, soft labels, image presence where cheap) without decoding images; [`Self::get`]
/// decodes one pair; [`Records::get_or_skip`] also leaves out, under `bad_records = "skip"`, a
/// pair found bad only when decoded. Send + Sync, so loader threads can share it.
pub struct PairDataset {
    source: Box<dyn PairSource>,
    spec: DataSpec,
    late: LateSkips,
}

impl PairDataset {
    /// Opens and indexes the data. Ties are dropped (unless `drop_ties = false`), bad records are
    /// skipped and listed or returned as an error (`bad_records`), and scanning stops after
    /// `limit` usable pairs. Structural problems (a missing file or column, a column of the wrong
    /// type, an unsupported parquet codec) are errors whatever the policy.
    pub fn open(spec: &DataSpec) -> Result<Self> {
        if !spec.path.exists() {
            return Err(Error::MissingFile {
                path: spec.path.clone(),
                what: "preference data".into(),
            });
        }
        let source: Box<dyn PairSource> = match spec.format {
            DataFormat::Pickapic => Box::new(pickapic::PickapicPairs::open(spec)?),
            DataFormat::Jsonl => Box::new(jsonl::JsonlPairs::open(spec)?),
            DataFormat::Folders => Box::new(folders::FolderPairs::open(spec)?),
            DataFormat::Prompts => {
                return Err(Error::input(
                    spec.path.display().to_string(),
                    "format = \"prompts\" holds prompts, not preference pairs: only the reward methods \
                     (draft, alignprop, refl) read it",
                ))
            }
        };
        Ok(PairDataset {
            source,
            spec: spec.clone(),
            late: LateSkips::default(),
        })
    }

    /// Fails when no pair is usable, saying how many records were skipped and the first reasons.
    pub fn ensure_usable(&self) -> Result<()> {
        if self.is_empty() {
            return Err(Error::input("data", explain_empty(&self.spec.path, self.skipped())));
        }
        Ok(())
    }

    /// Number of usable pairs.
    pub fn len(&self) -> usize {
        self.source.len()
    }

    /// Whether there is no usable pair.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Pair `i`, decoded and ordered preferred-first. An image that cannot be read or decoded is
    /// [`Error::Record`] naming the file, the record and the column or side.
    pub fn get(&self, i: usize) -> Result<PreferencePair> {
        if i >= self.len() {
            return Err(Error::input("pair index", format!("must be < {}, got {i}", self.len())));
        }
        self.source.get(i)
    }

    /// Records left out when opening, with the reason (empty with `bad_records = "error"`).
    pub fn skipped(&self) -> &[(RecordLocation, String)] {
        self.source.skipped()
    }

    /// The spec this dataset was opened with.
    pub fn spec(&self) -> &DataSpec {
        &self.spec
    }

    /// A 16-hex-digit fingerprint of the data's identity, for cache keys: the format, the
    /// settings that select and order pairs (columns, ties, dual captions, limit), the number of
    /// usable pairs, and each index file's canonical path, size and modification time. Image
    /// files of the JSONL and folder layouts are not part of it: replacing an image in place
    /// under the same name needs a fresh cache.
    pub fn fingerprint(&self) -> String {
        let s = &self.spec;
        let text = format!(
            "format={} columns={:?} drop_ties={} dual_captions={} limit={:?} pairs={}",
            s.format.name(),
            s.columns,
            s.drop_ties,
            s.dual_captions,
            s.limit,
            self.len()
        );
        files_fingerprint(text, self.source.files())
    }
}

impl Listing for PairDataset {
    fn len(&self) -> usize {
        self.source.len()
    }
    fn location(&self, i: usize) -> RecordLocation {
        self.source.location(i)
    }
    fn skipped(&self) -> &[SkippedRecord] {
        self.source.skipped()
    }
    fn spec(&self) -> &DataSpec {
        &self.spec
    }
    fn late(&self) -> &LateSkips {
        &self.late
    }
    fn fingerprint(&self) -> String {
        PairDataset::fingerprint(self)
    }
}

impl Records for PairDataset {
    type Record = PreferencePair;
    fn get(&self, i: usize) -> Result<PreferencePair> {
        PairDataset::get(self, i)
    }
}

/// A 16-hex-digit hash of `text` and each of `files`' canonical path, size and modification time.
pub(crate) fn files_fingerprint(mut text: String, files: Vec<PathBuf>) -> String {
    for f in files {
        let path = std::fs::canonicalize(&f).unwrap_or(f);
        let (size, modified) = match std::fs::metadata(&path) {
            Ok(m) => {
                let t = m
                    .modified()
                    .ok()
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok());
                (m.len(), t.map(|d| d.as_nanos()).unwrap_or(0))
            }
            Err(_) => (0, 0),
        };
        text.push_str(&format!(" file={}:{size}:{modified}", path.display()));
    }
    format!("{:016x}", fnv1a(text.as_bytes()))
}

/// FNV-1a 64, a short stable hash for fingerprints (not cryptographic).
pub(crate) fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Decodes PNG or JPEG bytes to RGB within the limits of
/// [`decode_image_bytes`](crate::sampling::image_io::decode_image_bytes), so that a small file
/// declaring a huge size is a bad record, not gigabytes allocated; an error names the record and
/// `what` (column or side).
pub(crate) fn decode_image(bytes: &[u8], loc: &RecordLocation, what: &str) -> Result<image::RgbImage> {
    let img = crate::sampling::image_io::decode_image_bytes(bytes, what).map_err(|e| loc.error(e.to_string()))?;
    Ok(img.to_rgb8())
}

/// Reads and decodes an image file; an error names the record, `what` and the image path.
pub(crate) fn read_image(path: &Path, loc: &RecordLocation, what: &str) -> Result<image::RgbImage> {
    let bytes = std::fs::read(path).map_err(|e| loc.error(format!("{what}: {}: {e}", path.display())))?;
    decode_image(&bytes, loc, &format!("{what} ({})", path.display()))
}

/// Lists a bad record in `skipped`, or returns it as an error, as `policy` says.
pub(crate) fn handle_bad(
    policy: BadRecordPolicy,
    loc: RecordLocation,
    reason: String,
    skipped: &mut Vec<(RecordLocation, String)>,
) -> Result<()> {
    match policy {
        BadRecordPolicy::Skip => {
            skipped.push((loc, reason));
            Ok(())
        }
        BadRecordPolicy::Error => Err(loc.error(reason)),
    }
}

/// Under `root_only`, fails unless the existing file `path` lies inside `root` once `..` and
/// symbolic links are resolved.
pub(crate) fn check_inside(path: &Path, root: &Path, what: &str) -> std::result::Result<(), String> {
    let canonical = |p: &Path| std::fs::canonicalize(p).map_err(|e| format!("{what}: {}: {e}", p.display()));
    if canonical(path)?.starts_with(canonical(root)?) {
        Ok(())
    } else {
        Err(format!(
            "{what} image {} is outside the dataset folder {} (data.root_only = true)",
            path.display(),
            root.display()
        ))
    }
}

/// The text of a data file with a leading UTF-8 byte-order mark removed (Windows editors write one).
pub(crate) fn read_text(path: &Path) -> Result<String> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    Ok(match text.strip_prefix('\u{feff}') {
        Some(rest) => rest.to_string(),
        None => text,
    })
}

/// Checks a soft label: a probability that the preferred image wins, so in [0.5, 1].
pub(crate) fn check_soft_label(p: f64) -> std::result::Result<f32, String> {
    if (0.5..=1.0).contains(&p) {
        Ok(p as f32)
    } else {
        Err(format!(
            "soft label must be in [0.5, 1] (the probability that the preferred image wins), got {p}"
        ))
    }
}
