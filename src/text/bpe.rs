//! The byte-level BPE core of CLIP's tokenizer (`tokenizers`' `models/bpe`): each byte of a
//! word becomes a printable character (GPT-2's `bytes_to_unicode`), the last one with the
//! end-of-word suffix, then merges apply lowest rank first, leftmost on ties.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::path::Path;
use std::sync::Mutex;

use crate::{Error, Result};

/// Words cached at most, and the longest word cached (in bytes), as in `tokenizers`' BPE.
const CACHE_CAPACITY: usize = 10_000;
const CACHE_MAX_WORD: usize = 256;

/// A BPE vocabulary and merge table, with a per-word cache.
pub(super) struct Bpe {
    /// BPE vocabulary: token -> id.
    vocab: HashMap<String, u32>,
    /// `(left id, right id)` -> `(rank, merged id)`.
    merges: HashMap<(u32, u32), (u32, u32)>,
    /// Id of each byte's character, inside a word and at its end (with the suffix).
    byte_ids: [u32; 256],
    byte_end_ids: [u32; 256],
    /// BPE result per word.
    cache: Mutex<HashMap<String, Vec<u32>>>,
}

impl Bpe {
    /// The model of `vocab` and `merges` (from [`build_merges`]); each byte's character, alone
    /// and followed by `end_of_word_suffix`, must be in `vocab` or fall back to `unk_id`, else it
    /// is an error naming `file`.
    pub(super) fn new(
        vocab: HashMap<String, u32>,
        merges: HashMap<(u32, u32), (u32, u32)>,
        end_of_word_suffix: &str,
        unk_id: Option<u32>,
        file: &Path,
    ) -> Result<Self> {
        let chars = bytes_to_unicode();
        let mut byte_ids = [0u32; 256];
        let mut byte_end_ids = [0u32; 256];
        for (b, c) in chars.iter().enumerate() {
            let inner = c.to_string();
            let end = format!("{c}{end_of_word_suffix}");
            for (token, slot) in [(inner, &mut byte_ids[b]), (end, &mut byte_end_ids[b])] {
                *slot = match vocab.get(&token).copied().or(unk_id) {
                    Some(id) => id,
                    None => {
                        return Err(Error::config(
                            file,
                            "vocab",
                            format!("byte token {token:?} is missing and there is no unknown token"),
                        ))
                    }
                };
            }
        }
        Ok(Self {
            vocab,
            merges,
            byte_ids,
            byte_end_ids,
            cache: Mutex::new(HashMap::new()),
        })
    }

    /// Id of `token` in the vocabulary.
    pub(super) fn token_id(&self, token: &str) -> Option<u32> {
        self.vocab.get(token).copied()
    }

    /// Number of entries in the vocabulary.
    pub(super) fn vocab_size(&self) -> usize {
        self.vocab.len()
    }

    /// Number of merges.
    pub(super) fn num_merges(&self) -> usize {
        self.merges.len()
    }

    /// Appends the BPE ids of one pre-tokenised word, through the cache.
    pub(super) fn encode_word(&self, word: &str, out: &mut Vec<u32>) {
        if let Some(ids) = self.cache.lock().ok().and_then(|cache| cache.get(word).cloned()) {
            out.extend(ids);
            return;
        }
        let ids = self.merge_word(word.as_bytes());
        out.extend(&ids);
        if word.len() <= CACHE_MAX_WORD {
            if let Ok(mut cache) = self.cache.lock() {
                if cache.len() < CACHE_CAPACITY {
                    cache.insert(word.to_string(), ids);
                }
            }
        }
    }

    /// BPE of one word's bytes: repeatedly merges the lowest-ranked adjacent pair, leftmost first
    /// (`tokenizers`' `Word::merge_all`, a heap over a linked list).
    fn merge_word(&self, bytes: &[u8]) -> Vec<u32> {
        let n = bytes.len();
        let mut ids: Vec<u32> = bytes
            .iter()
            .enumerate()
            .map(|(i, &b)| {
                if i + 1 == n {
                    self.byte_end_ids[b as usize]
                } else {
                    self.byte_ids[b as usize]
                }
            })
            .collect();
        if n < 2 {
            return ids;
        }
        const NONE: usize = usize::MAX;
        let mut next: Vec<usize> = (1..n).chain([NONE]).collect();
        let mut prev: Vec<usize> = [NONE].into_iter().chain(0..n - 1).collect();
        let mut alive = vec![true; n];
        let mut heap = BinaryHeap::new();
        for i in 0..n - 1 {
            if let Some(&(rank, merged)) = self.merges.get(&(ids[i], ids[i + 1])) {
                heap.push(Reverse((rank, i, merged)));
            }
        }
        while let Some(Reverse((rank, pos, merged))) = heap.pop() {
            let right = next[pos];
            if !alive[pos] || right == NONE || self.merges.get(&(ids[pos], ids[right])) != Some(&(rank, merged)) {
                continue; // stale: one side was merged since
            }
            ids[pos] = merged;
            alive[right] = false;
            let after = next[right];
            next[pos] = after;
            if after != NONE {
                prev[after] = pos;
                if let Some(&(r, m)) = self.merges.get(&(ids[pos], ids[after])) {
                    heap.push(Reverse((r, pos, m)));
                }
            }
            let before = prev[pos];
            if before != NONE {
                if let Some(&(r, m)) = self.merges.get(&(ids[before], ids[pos])) {
                    heap.push(Reverse((r, before, m)));
                }
            }
        }
        ids.into_iter()
            .zip(alive)
            .filter_map(|(id, a)| a.then_some(id))
            .collect()
    }
}

impl Clone for Bpe {
    /// A copy with an empty word cache.
    fn clone(&self) -> Self {
        Self {
            vocab: self.vocab.clone(),
            merges: self.merges.clone(),
            byte_ids: self.byte_ids,
            byte_end_ids: self.byte_end_ids,
            cache: Mutex::new(HashMap::new()),
        }
    }
}

/// GPT-2's reversible map from bytes to printable characters (`bytes_to_unicode`).
fn bytes_to_unicode() -> [char; 256] {
    let printable = |b: u32| (0x21..=0x7E).contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b);
    let mut chars = ['\0'; 256];
    let mut shifted = 0;
    for (b, slot) in chars.iter_mut().enumerate() {
        let b = b as u32;
        let code = if printable(b) {
            b
        } else {
            shifted += 1;
            255 + shifted
        };
        *slot = char::from_u32(code).expect("code points below 0x200 are characters");
    }
    chars
}

/// The merge table from `(record index, left, right)` in rank order; every token must be in `vocab`.
pub(super) fn build_merges<'a>(
    vocab: &HashMap<String, u32>,
    pairs: impl Iterator<Item = Result<(usize, &'a str, &'a str)>>,
    file: &Path,
) -> Result<HashMap<(u32, u32), (u32, u32)>> {
    let mut merges = HashMap::new();
    let mut joined = String::new();
    for (rank, pair) in pairs.enumerate() {
        let (index, a, b) = pair?;
        joined.clear();
        joined.push_str(a);
        joined.push_str(b);
        let id = |token: &str| {
            vocab.get(token).copied().ok_or_else(|| Error::Record {
                file: file.to_path_buf(),
                index,
                reason: format!("merge \"{a} {b}\": token {token:?} is not in the vocabulary"),
            })
        };
        let rank = u32::try_from(rank).map_err(|_| Error::Record {
            file: file.to_path_buf(),
            index,
            reason: "more than 2^32 merges".into(),
        })?;
        merges.insert((id(a)?, id(b)?), (rank, id(&joined)?));
    }
    Ok(merges)
}
