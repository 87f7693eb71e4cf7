//! The prompts of a reward fine-tuning run from `[data] format = "prompts"`: a text file, one
//! prompt per line (blank lines skipped), visited in a fresh seeded shuffle each pass.

use std::path::Path;

use crate::rng::Rng;
use crate::{Error, Result};

/// The prompts of a text file, one a line, trimmed, blank lines skipped; fails naming the file
/// when it holds none.
pub fn read_prompt_file(path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let prompts: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect();
    if prompts.is_empty() {
        return Err(Error::input(path.display().to_string(), "no prompts in the file"));
    }
    Ok(prompts)
}

/// Key of the shuffle streams, apart from every sample's own.
const SHUFFLE_KEY: u64 = 0x5052_4f4d_5054;

/// A prompt file's prompts.
#[derive(Debug, Clone)]
pub struct PromptList {
    prompts: Vec<String>,
    seed: u64,
}

impl PromptList {
    /// Reads `path` ([`read_prompt_file`]).
    pub fn read(path: &Path, seed: u64) -> Result<Self> {
        Self::new(read_prompt_file(path)?, seed)
    }

    /// `prompts` shuffled by `seed`; fails when empty.
    pub fn new(prompts: Vec<String>, seed: u64) -> Result<Self> {
        if prompts.is_empty() {
            return Err(Error::input("prompts", "no prompt given"));
        }
        Ok(PromptList { prompts, seed })
    }

    /// Number of prompts.
    pub fn len(&self) -> usize {
        self.prompts.len()
    }

    /// Whether there is no prompt (never, once built).
    pub fn is_empty(&self) -> bool {
        self.prompts.is_empty()
    }

    /// The prompt at position `index` of the run's sequence: pass `index / len` visits every
    /// prompt once, in its own shuffle, so a resumed run sees the same prompts.
    pub fn get(&self, index: u64) -> &str {
        let n = self.prompts.len() as u64;
        let (pass, pos) = (index / n, index % n);
        let mut order: Vec<usize> = (0..self.prompts.len()).collect();
        let mut rng = Rng::keyed(self.seed, &[SHUFFLE_KEY, pass]);
        for i in (1..order.len()).rev() {
            order.swap(i, rng.below(i as u64 + 1) as usize);
        }
        &self.prompts[order[pos as usize]]
    }
}
