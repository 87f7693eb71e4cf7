//! The `[data]` table of a recipe: which layout, where, which columns, and what to do with ties
//! and bad records.

use std::path::PathBuf;

use serde::Deserialize;

/// What to do with a bad record (a missing field, a label outside {0, 0.5, 1}, a soft label
/// outside [0.5, 1], a missing image file, a name without its partner).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum BadRecordPolicy {
    /// Leave it out and list it, with the reason, in [`super::PairDataset::skipped`] (default).
    #[default]
    Skip,
    /// Fail with [`crate::Error::Record`] naming the file and the record.
    Error,
}

/// The on-disk layouts of preference pairs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DataFormat {
    /// Pick-a-Pic v2 style parquet (`yuvalkirstain/pickapic_v2`, `DualCPO/pick-double-caption`):
    /// one `.parquet` file, or a folder whose `*.parquet` shards are read in name order.
    Pickapic,
    /// A JSONL file (or a folder holding `pairs.jsonl`) of
    /// `{"prompt", "chosen", "rejected", ["caption_chosen", "caption_rejected"], ["soft_label"]}`.
    Jsonl,
    /// A folder with `w/` (preferred) and `l/` (rejected) image folders of matching file names and
    /// `captions.jsonl` (`{"file", "caption"}` per line) or `captions.txt` (`NAME<TAB>caption`).
    Folders,
    /// A text file of prompts, one per line, with no images: the prompts of the reward
    /// fine-tuning methods (draft, alignprop, refl), which sample their own images.
    Prompts,
}

impl DataFormat {
    /// The name used in recipes (`pickapic`, `jsonl`, `folders`, `prompts`).
    pub fn name(self) -> &'static str {
        match self {
            DataFormat::Pickapic => "pickapic",
            DataFormat::Jsonl => "jsonl",
            DataFormat::Folders => "folders",
            DataFormat::Prompts => "prompts",
        }
    }
}

/// Column names of the parquet layout; Pick-a-Pic v2's by default, each one renameable.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ColumnNames {
    /// The prompt, shared by both images (default `caption`); not read with `dual_captions`.
    pub caption: String,
    /// Caption of image 0 (default `caption_0`; Pick-Double Caption, read with `dual_captions`).
    pub caption_0: String,
    /// Caption of image 1 (default `caption_1`).
    pub caption_1: String,
    /// Encoded image 0, PNG or JPEG bytes, or a `{bytes, path}` struct (default `jpg_0`).
    pub jpg_0: String,
    /// Encoded image 1 (default `jpg_1`).
    pub jpg_1: String,
    /// 1 when image 0 is preferred, 0 when image 1 is, 0.5 for a tie (default `label_0`).
    pub label_0: String,
    /// SmPO's soft label: the probability, in [0.5, 1], that the preferred image (after ordering)
    /// wins. No default: read only when named.
    pub soft_label: Option<String>,
}

impl Default for ColumnNames {
    fn default() -> Self {
        ColumnNames {
            caption: "caption".into(),
            caption_0: "caption_0".into(),
            caption_1: "caption_1".into(),
            jpg_0: "jpg_0".into(),
            jpg_1: "jpg_1".into(),
            label_0: "label_0".into(),
            soft_label: None,
        }
    }
}

fn yes() -> bool {
    true
}

/// A data source as a recipe's `[data]` table describes it.
///
/// ```toml
/// [data]
/// format = "pickapic"            # pickapic | jsonl | folders
/// path = "data/pickapic_v2/train" # a .parquet file or a folder of shards
/// dual_captions = false           # DCPO: caption_0 / caption_1 (jsonl: caption_chosen / caption_rejected)
/// bad_records = "skip"            # skip | error
/// root_only = false               # jsonl, folders: refuse images outside the dataset's folder
/// unpaired = false                # kto, npo: single labelled images (see `super::unpaired`)
/// limit = 20000
/// [data.columns]
/// soft_label = "pickscore_prob"   # SmPO
/// ```
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSpec {
    /// The layout.
    pub format: DataFormat,
    /// A file or folder, as the format says.
    pub path: PathBuf,
    /// Parquet column names (pickapic only).
    #[serde(default)]
    pub columns: ColumnNames,
    /// Drop ties (`label_0 == 0.5`) as the official Diffusion-DPO and DCPO code do (default true);
    /// when false a tie is kept with image 0 first, as the diffusers port does (pickapic only).
    #[serde(default = "yes")]
    pub drop_ties: bool,
    /// Per-image captions (DCPO) instead of the shared prompt (default false).
    #[serde(default)]
    pub dual_captions: bool,
    /// What to do with bad records (default skip).
    #[serde(default)]
    pub bad_records: BadRecordPolicy,
    /// Use the first `limit` usable pairs; scanning stops there, so later shards are not read.
    #[serde(default)]
    pub limit: Option<usize>,
    /// Refuse image files outside the dataset's folder (the JSONL file's folder, or the folders
    /// layout's root), after resolving `..` and symbolic links; such a record is a bad record.
    /// Default false: absolute paths and `../` are allowed, as real datasets often use them.
    #[serde(default)]
    pub root_only: bool,
    /// Read single images labelled desirable or undesirable (Diffusion-KTO's data, for the kto
    /// and npo methods) instead of pairs: `jsonl` lines `{"image", "prompt", "label"}`,
    /// `folders` with `good/` and `bad/`, or `pickapic` pairs split into their two images
    /// ([`super::UnpairedDataset`]). Default false.
    #[serde(default)]
    pub unpaired: bool,
}

impl DataSpec {
    /// A spec with the defaults for everything but the layout and the path.
    pub fn new(format: DataFormat, path: impl Into<PathBuf>) -> Self {
        DataSpec {
            format,
            path: path.into(),
            columns: ColumnNames::default(),
            drop_ties: true,
            dual_captions: false,
            bad_records: BadRecordPolicy::Skip,
            limit: None,
            root_only: false,
            unpaired: false,
        }
    }
}
