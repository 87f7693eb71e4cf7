//! Preference-pair data: the `[data]` spec ([`spec`]), the pair index ([`dataset`]) over three
//! layouts ([`pickapic`] parquet, [`jsonl`], [`folders`]), image and caption preparation
//! ([`preprocess`], with Pillow-exact resampling in [`mod@resize`]), and the VAE latent cache
//! ([`latent_cache`]) that encodes each image once.
//!
//! Every pair is ordered preferred-first. A bad record (a missing or null field, a label outside
//! {0, 0.5, 1}, a soft label outside [0.5, 1], a missing image file, a name without its partner) is
//! skipped and listed in [`PairDataset::skipped`], or is an error, as `bad_records` says; it
//! never becomes a silently wrong pair. An image that does not decode is found by
//! [`PairDataset::get`] and reported as [`crate::Error::Record`] naming the file, the record and
//! the column or side; [`Records::get_or_skip`] skips and lists it instead under
//! `bad_records = "skip"`. [`skipped`] formats the lists for people and for
//! `skipped_records.jsonl`. [`unpaired`] reads single labelled images (Diffusion-KTO) from the
//! same three layouts.

pub mod dataset;
pub mod folders;
pub mod jsonl;
pub mod latent_cache;
pub mod pickapic;
pub mod preprocess;
pub mod records;
pub mod resize;
pub mod skipped;
pub mod spec;
pub mod unpaired;

pub use dataset::{PairDataset, PreferencePair, RecordLocation};
pub use latent_cache::{LatentCache, LatentKey};
pub use preprocess::{PreparedImage, Preprocess};
pub use records::{Listing, Records};
pub use resize::{resize, ResampleFilter};
pub use skipped::SkippedRecord;
pub use spec::{BadRecordPolicy, ColumnNames, DataFormat, DataSpec};
pub use unpaired::{LabelledImage, UnpairedDataset};
