//! Unpaired data for Diffusion-KTO: single images, each labelled desirable or undesirable, in
//! three layouts chosen by the `[data]` format:
//! - `jsonl`: a JSONL file (or a folder holding `labels.jsonl`) of
//!   `{"image": PATH, "prompt": TEXT, "label": true|false}` per line (`caption` is accepted for
//!   `prompt`), image paths relative to the file's folder or absolute, as the paired JSONL layout;
//! - `folders`: `good/` (desirable) and `bad/` (undesirable) image folders with one caption per
//!   file name in `captions.jsonl` or `captions.txt` at the root, as the paired `w/` `l/` layout
//!   (a name may appear in both folders; it then has one caption);
//! - `pickapic`: the pairs of the Pick-a-Pic layout split into single images, the preferred one
//!   desirable and the rejected one undesirable, ties dropped, as the Diffusion-KTO paper does.
//!
//! Bad records follow `bad_records` as for pairs ([`super::dataset`]): a line that is not such an
//! object, a label that is not a boolean, a missing image file, a name without a caption, an
//! image outside the root under `root_only`; an image that does not decode is found by
//! [`UnpairedDataset::get`] and is [`crate::Error::Record`] naming the file and the record;
//! [`Records::get_or_skip`] leaves it out during training under `bad_records = "skip"`, as for
//! pairs.
//! Record indices are 0-based line numbers (jsonl), positions in the sorted listing of `good/`
//! then `bad/` (folders), or pair indices (pickapic, both images of a pair sharing one).

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::dataset::{check_inside, files_fingerprint, handle_bad, read_image, PairDataset, RecordLocation};
use super::folders;
use super::records::{LateSkips, Listing, Records};
use super::skipped::{explain_empty, SkippedRecord};
use super::spec::{DataFormat, DataSpec};
use crate::{Error, Result};

/// One labelled image, decoded.
#[derive(Debug, Clone)]
pub struct LabelledImage {
    /// The image's prompt.
    pub caption: String,
    /// The image.
    pub image: image::RgbImage,
    /// Whether the image is desirable (a thumbs-up).
    pub desirable: bool,
    /// Where it came from.
    pub location: RecordLocation,
}

/// A usable record: an image file with its caption and label, or one side of a pair.
enum Record {
    File {
        path: PathBuf,
        caption: String,
        desirable: bool,
        location: RecordLocation,
    },
    Side {
        pair: usize,
        desirable: bool,
    },
}

/// The usable labelled images of a [`DataSpec`], indexed when opened, decoded on demand.
pub struct UnpairedDataset {
    records: Vec<Record>,
    skipped: Vec<SkippedRecord>,
    /// The pairs the `pickapic` layout splits.
    pairs: Option<PairDataset>,
    spec: DataSpec,
    /// The index files read (the JSONL file, the captions file), for the fingerprint.
    files: Vec<PathBuf>,
    late: LateSkips,
}

#[derive(Deserialize)]
struct Line {
    image: String,
    #[serde(alias = "caption")]
    prompt: String,
    label: bool,
}

impl UnpairedDataset {
    /// Opens and indexes the data; `limit` counts images (pairs for `pickapic`). Structural
    /// problems (a missing file or folder, both caption files) are errors whatever the policy.
    pub fn open(spec: &DataSpec) -> Result<Self> {
        if !spec.path.exists() {
            return Err(Error::MissingFile {
                path: spec.path.clone(),
                what: "labelled image data".into(),
            });
        }
        if spec.dual_captions {
            return Err(Error::config(
                &spec.path,
                "dual_captions",
                "unpaired images have one caption each",
            ));
        }
        let mut skipped = Vec::new();
        let mut files = Vec::new();
        let (records, pairs) = match spec.format {
            DataFormat::Jsonl => (jsonl_records(spec, &mut skipped, &mut files)?, None),
            DataFormat::Folders => (folder_records(spec, &mut skipped, &mut files)?, None),
            DataFormat::Pickapic => {
                let pairs = PairDataset::open(spec)?;
                skipped.extend_from_slice(pairs.skipped());
                let records = (0..pairs.len())
                    .flat_map(|pair| [true, false].map(|desirable| Record::Side { pair, desirable }))
                    .collect();
                (records, Some(pairs))
            }
            DataFormat::Prompts => {
                return Err(Error::input(
                    spec.path.display().to_string(),
                    "format = \"prompts\" holds prompts, not labelled images",
                ))
            }
        };
        Ok(UnpairedDataset {
            records,
            skipped,
            pairs,
            spec: spec.clone(),
            files,
            late: LateSkips::default(),
        })
    }

    /// Number of usable images.
    pub fn len(&self) -> usize {
        self.records.len()
    }

    /// Whether no image is usable.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// Fails when no image is usable, saying how many records were skipped and the first reasons.
    pub fn ensure_usable(&self) -> Result<()> {
        if self.is_empty() {
            return Err(Error::input("data", explain_empty(&self.spec.path, &self.skipped)));
        }
        Ok(())
    }

    /// Records left out when opening, with the reason (empty with `bad_records = "error"`).
    pub fn skipped(&self) -> &[SkippedRecord] {
        &self.skipped
    }

    /// Whether image `i` (< `len()`) is desirable, without decoding it.
    pub fn desirable(&self, i: usize) -> bool {
        match &self.records[i] {
            Record::File { desirable, .. } | Record::Side { desirable, .. } => *desirable,
        }
    }

    /// A 16-hex-digit fingerprint of the data's identity, for cache keys, as
    /// [`PairDataset::fingerprint`]'s: the layout, the settings that select images, their
    /// number, the index files (or the split pairs' fingerprint).
    pub fn fingerprint(&self) -> String {
        let s = &self.spec;
        let text = format!(
            "unpaired format={} columns={:?} drop_ties={} limit={:?} images={} pairs={}",
            s.format.name(),
            s.columns,
            s.drop_ties,
            s.limit,
            self.len(),
            self.pairs.as_ref().map_or(String::new(), PairDataset::fingerprint)
        );
        files_fingerprint(text, self.files.clone())
    }

    /// Image `i`, decoded; an image that cannot be read or decoded is [`Error::Record`].
    pub fn get(&self, i: usize) -> Result<LabelledImage> {
        let record = self
            .records
            .get(i)
            .ok_or_else(|| Error::input("image index", format!("must be < {}, got {i}", self.len())))?;
        match record {
            Record::File {
                path,
                caption,
                desirable,
                location,
            } => Ok(LabelledImage {
                caption: caption.clone(),
                image: read_image(path, location, if *desirable { "good" } else { "bad" })?,
                desirable: *desirable,
                location: location.clone(),
            }),
            Record::Side { pair, desirable } => {
                let pairs = self.pairs.as_ref().expect("pair sides come with their pairs");
                let p = pairs.get(*pair)?;
                let (caption, image) = if *desirable {
                    (p.caption_w, p.image_w)
                } else {
                    (p.caption_l, p.image_l)
                };
                Ok(LabelledImage {
                    caption,
                    image,
                    desirable: *desirable,
                    location: p.location,
                })
            }
        }
    }
}

impl Listing for UnpairedDataset {
    fn len(&self) -> usize {
        self.records.len()
    }
    /// For a split pair, the pair's record.
    fn location(&self, i: usize) -> RecordLocation {
        match &self.records[i] {
            Record::File { location, .. } => location.clone(),
            Record::Side { pair, .. } => self
                .pairs
                .as_ref()
                .expect("pair sides come with their pairs")
                .location(*pair),
        }
    }
    fn skipped(&self) -> &[SkippedRecord] {
        &self.skipped
    }
    fn spec(&self) -> &DataSpec {
        &self.spec
    }
    fn late(&self) -> &LateSkips {
        &self.late
    }
    fn fingerprint(&self) -> String {
        UnpairedDataset::fingerprint(self)
    }
}

impl Records for UnpairedDataset {
    type Record = LabelledImage;
    fn get(&self, i: usize) -> Result<LabelledImage> {
        UnpairedDataset::get(self, i)
    }
}

/// The records of the JSONL layout.
fn jsonl_records(spec: &DataSpec, skipped: &mut Vec<SkippedRecord>, files: &mut Vec<PathBuf>) -> Result<Vec<Record>> {
    let (file, text, dir) = super::jsonl::read_jsonl(spec, "labels.jsonl")?;
    files.push(file.clone());
    let limit = spec.limit.unwrap_or(usize::MAX);
    let mut records = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if records.len() >= limit {
            break;
        }
        if line.trim().is_empty() {
            continue;
        }
        let location = RecordLocation::at_line(&file, i);
        let checked = serde_json::from_str::<Line>(line)
            .map_err(|e| format!("expected {{\"image\", \"prompt\", \"label\": true|false}}: {e}"))
            .and_then(|l| {
                let path = dir.join(&l.image);
                check_image(&path, &dir, spec.root_only, "image")?;
                Ok(Record::File {
                    path,
                    caption: l.prompt,
                    desirable: l.label,
                    location: location.clone(),
                })
            });
        match checked {
            Ok(r) => records.push(r),
            Err(reason) => handle_bad(spec.bad_records, location, reason, skipped)?,
        }
    }
    Ok(records)
}

/// Fails unless `path` is a file (inside `root` under `root_only`).
fn check_image(path: &Path, root: &Path, root_only: bool, what: &str) -> std::result::Result<(), String> {
    if !path.is_file() {
        return Err(format!("{what} {} not found", path.display()));
    }
    if root_only {
        check_inside(path, root, what)?;
    }
    Ok(())
}

/// The records of the `good/` `bad/` folders layout.
fn folder_records(spec: &DataSpec, skipped: &mut Vec<SkippedRecord>, files: &mut Vec<PathBuf>) -> Result<Vec<Record>> {
    let root = &spec.path;
    let (captions_file, captions) = folders::read_captions(spec, skipped)?;
    files.push(captions_file.clone());
    let limit = spec.limit.unwrap_or(usize::MAX);
    let mut records = Vec::new();
    let mut index = 0;
    for (side, desirable) in [("good", true), ("bad", false)] {
        for name in folders::list(&root.join(side))? {
            if records.len() >= limit {
                return Ok(records);
            }
            let path = root.join(side).join(&name);
            let location = RecordLocation::new(&path, index);
            index += 1;
            let problem = match captions.get(&name) {
                None => Some(format!("no caption for {name} in {}", captions_file.display())),
                Some(_) => check_image(&path, root, spec.root_only, side).err(),
            };
            match problem {
                Some(reason) => handle_bad(spec.bad_records, location, reason, skipped)?,
                None => records.push(Record::File {
                    caption: captions[&name].clone(),
                    path,
                    desirable,
                    location,
                }),
            }
        }
    }
    Ok(records)
}
