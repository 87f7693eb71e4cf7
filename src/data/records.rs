//! What the pair and labelled-image datasets share: decoding a record under the `bad_records`
//! policy, and leaving out records found bad only when decoded, after opening (an image that
//! does not decode, a file gone since), listed in the order found. [`Listing`] is the
//! object-safe part (counts and skips), [`Records`] adds decoding.

use std::collections::HashSet;
use std::sync::Mutex;

use super::dataset::RecordLocation;
use super::skipped::{explain_empty, SkippedRecord};
use super::spec::{BadRecordPolicy, DataSpec};
use crate::{Error, Result};

/// The records a dataset left out after opening: which indices and, in the order found, where
/// and why. Send + Sync, so loader threads can share it.
#[derive(Default)]
pub struct LateSkips(Mutex<Inner>);

#[derive(Default)]
struct Inner {
    indices: HashSet<usize>,
    list: Vec<SkippedRecord>,
}

impl LateSkips {
    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A dataset's usable records and those left out.
pub trait Listing {
    /// Number of usable records when opened (those left out later included).
    fn len(&self) -> usize;
    /// Where record `i` (< `len()`) came from.
    fn location(&self, i: usize) -> RecordLocation;
    /// Records left out when opening, with the reason (empty with `bad_records = "error"`).
    fn skipped(&self) -> &[SkippedRecord];
    /// The spec the dataset was opened with.
    fn spec(&self) -> &DataSpec;
    /// The records left out after opening.
    fn late(&self) -> &LateSkips;
    /// A 16-hex-digit fingerprint of the data's identity, for cache keys.
    fn fingerprint(&self) -> String;

    /// Whether no record was usable when opened.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether record `i` was left out after opening.
    fn is_skipped(&self, i: usize) -> bool {
        self.late().inner().indices.contains(&i)
    }

    /// Leaves record `i` out for `reason` and lists it in [`Self::late_skipped`] (once); fails
    /// when no usable record is left, counting every record skipped.
    fn skip(&self, i: usize, reason: String) -> Result<()> {
        let mut late = self.late().inner();
        if !late.indices.insert(i) {
            return Ok(());
        }
        late.list.push((self.location(i), reason));
        if late.indices.len() == self.len() {
            let all: Vec<SkippedRecord> = self.skipped().iter().chain(&late.list).cloned().collect();
            return Err(Error::input("data", explain_empty(&self.spec().path, &all)));
        }
        Ok(())
    }

    /// Records left out after opening, in the order found, from the `from`-th on.
    fn late_skipped(&self, from: usize) -> Vec<SkippedRecord> {
        self.late().inner().list.get(from..).unwrap_or_default().to_vec()
    }
}

/// A dataset whose records are decoded on demand.
pub trait Records: Listing {
    /// One decoded record.
    type Record;
    /// Record `i`, decoded; an image that cannot be read or decoded is [`Error::Record`].
    fn get(&self, i: usize) -> Result<Self::Record>;

    /// Record `i` as [`Self::get`] reads it, or, under `bad_records = "skip"`, why it cannot be
    /// read or decoded (for [`Listing::skip`]; nothing is listed yet).
    fn try_get(&self, i: usize) -> Result<std::result::Result<Self::Record, String>> {
        match self.get(i) {
            Ok(r) => Ok(Ok(r)),
            Err(Error::Record { reason, .. }) if self.spec().bad_records == BadRecordPolicy::Skip => Ok(Err(reason)),
            Err(e) => Err(e),
        }
    }

    /// Record `i` as [`Self::get`] reads it; but under `bad_records = "skip"` a record that
    /// cannot be read or decoded is `None`, listed in [`Listing::late_skipped`] and not read
    /// again. Fails when that leaves no usable record.
    fn get_or_skip(&self, i: usize) -> Result<Option<Self::Record>> {
        if self.is_skipped(i) {
            return Ok(None);
        }
        match self.try_get(i)? {
            Ok(r) => Ok(Some(r)),
            Err(reason) => {
                self.skip(i, reason)?;
                Ok(None)
            }
        }
    }
}
