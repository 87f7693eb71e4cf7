//! CLIP's byte-level BPE tokenizer, equal to Hugging Face's `CLIPTokenizer` (transformers 5, backed
//! by `tokenizers`) and `CLIPTokenizerFast`.
//!
//! Counterparts: `transformers/models/clip/tokenization_clip.py` (the `tokenizers` pipeline it
//! builds) and openai/CLIP's `simple_tokenizer.py`. [`ClipTokenizer::from_dir`] reads a diffusers
//! `tokenizer/` or `tokenizer_2/` folder; [`ClipTokenizer::encode_padded`] gives the `[max_length]`
//! ids diffusers feeds the text encoder (`padding="max_length", truncation=True`).
//!
//! A prompt goes through these steps, as in `tokenizers`:
//! 1. added tokens (`<|startoftext|>`, `<|endoftext|>`, the pad token, ...) are split out of the raw
//!    text and map straight to their ids, so with SDXL's `pad_token` "!" every "!" becomes id 0;
//! 2. normalisation: NFC, each run of whitespace to one space, per-character lowercase;
//! 3. pre-tokenisation: CLIP's regex, then GPT-2's byte-level regex on each piece;
//! 4. each piece's UTF-8 bytes become printable characters (`bytes_to_unicode`), the last one gets
//!    the `</w>` end-of-word suffix, and merges apply lowest rank first (leftmost on ties).
//!
//! Like transformers, there is no ftfy fix-up and no HTML unescaping; NFC uses the same Unicode
//! tables as `tokenizers`.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use candle_core::{Device, Tensor};
use regex::Regex;
use serde::Deserialize;
use serde_json::Value;

use crate::{Error, Result};

/// CLIP's pre-tokenisation regex (`tokenization_clip.py`; lowercase text, so no case flag).
const CLIP_PATTERN: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";
/// GPT-2's regex, which `ByteLevel(use_regex=True)` applies to each CLIP piece. Its optional
/// leading spaces and whitespace alternatives are left out: CLIP pieces hold no whitespace. It
/// only changes pieces such as `<|startoftext|>` written in capitals (`<|`, `startoftext`, `|>`).
const BYTE_LEVEL_PATTERN: &str = r"'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}+|[^\s\p{L}\p{N}]+";

/// `model_max_length` when `tokenizer_config.json` has none: CLIP's 77 positions.
const DEFAULT_MAX_LENGTH: usize = 77;
/// Largest `model_max_length` accepted (transformers writes 1e30 for "no limit").
const MAX_MAX_LENGTH: usize = 1 << 16;
/// CLIP's special tokens, transformers' defaults for `CLIPTokenizer`.
const DEFAULT_BOS: &str = "<|startoftext|>";
const DEFAULT_EOS: &str = "<|endoftext|>";
const DEFAULT_PAD: &str = "<|endoftext|>";
const DEFAULT_UNK: &str = "<|endoftext|>";
/// CLIP's end-of-word suffix, for `vocab.json` + `merges.txt` folders.
const END_OF_WORD: &str = "</w>";
/// Words cached at most, and the longest word cached (in bytes), as in `tokenizers`' BPE.
const CACHE_CAPACITY: usize = 10_000;
const CACHE_MAX_WORD: usize = 256;

/// CLIP's byte-level BPE tokenizer, loaded from a diffusers `tokenizer/` folder.
pub struct ClipTokenizer {
    /// BPE vocabulary: token -> id.
    vocab: HashMap<String, u32>,
    /// `(left id, right id)` -> `(rank, merged id)`.
    merges: HashMap<(u32, u32), (u32, u32)>,
    /// Id of each byte's character, inside a word and at its end (with the suffix).
    byte_ids: [u32; 256],
    byte_end_ids: [u32; 256],
    /// Added tokens matched on the raw text (`normalized: false`) and on the normalised text.
    raw_added: Option<AddedTokens>,
    normalized_added: Option<AddedTokens>,
    clip_split: Regex,
    byte_level_split: Regex,
    bos_id: u32,
    eos_id: u32,
    pad_id: u32,
    max_length: usize,
    /// BPE result per word.
    cache: Mutex<HashMap<String, Vec<u32>>>,
}

/// Added tokens of one kind (raw or normalised) and the pattern that finds them.
#[derive(Clone)]
struct AddedTokens {
    /// Alternation of the escaped contents, longest first, so the leftmost-longest one matches.
    pattern: Regex,
    ids: HashMap<String, u32>,
}

/// A token named in `tokenizer_config.json`, `special_tokens_map.json` or `tokenizer.json`.
#[derive(Clone, Debug)]
struct TokenSpec {
    content: String,
    /// Matched on normalised text rather than raw text.
    normalized: bool,
    /// The file that names it, for errors.
    file: PathBuf,
}

/// What `tokenizer_config.json` (and `special_tokens_map.json`) says.
struct TokenizerConfig {
    max_length: usize,
    bos: TokenSpec,
    eos: TokenSpec,
    pad: TokenSpec,
    unk: Option<TokenSpec>,
    /// `added_tokens_decoder`: id -> token.
    added: Vec<(u32, TokenSpec)>,
}

/// The BPE model of `tokenizer.json`, or of `vocab.json` + `merges.txt`.
struct BpeModel {
    vocab: HashMap<String, u32>,
    merges: HashMap<(u32, u32), (u32, u32)>,
    end_of_word_suffix: String,
    unk_token: Option<String>,
    /// `tokenizer.json`'s `added_tokens`.
    added: Vec<(u32, TokenSpec)>,
    /// The file the vocabulary came from, for errors.
    file: PathBuf,
}

#[derive(Deserialize)]
struct TokenizerJson {
    model: BpeJson,
    #[serde(default)]
    added_tokens: Vec<AddedTokenJson>,
}

#[derive(Deserialize)]
struct BpeJson {
    #[serde(rename = "type")]
    kind: Option<String>,
    vocab: HashMap<String, u32>,
    merges: Vec<MergeJson>,
    #[serde(default)]
    end_of_word_suffix: Option<String>,
    #[serde(default)]
    continuing_subword_prefix: Option<String>,
    #[serde(default)]
    unk_token: Option<String>,
    #[serde(default)]
    dropout: Option<f64>,
}

/// A merge: `"a b"` (tokenizers < 0.20) or `["a", "b"]`.
#[derive(Deserialize)]
#[serde(untagged)]
enum MergeJson {
    Joined(String),
    Pair(String, String),
}

#[derive(Deserialize)]
struct AddedTokenJson {
    id: u32,
    content: String,
    #[serde(default)]
    single_word: bool,
    #[serde(default)]
    normalized: bool,
}

impl ClipTokenizer {
    /// Loads a diffusers `tokenizer/` folder: `tokenizer.json` when present, else `vocab.json` +
    /// `merges.txt`; special tokens and `model_max_length` (default 77) from `tokenizer_config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::MissingFile {
                path: dir.to_path_buf(),
                what: "tokenizer folder".into(),
            });
        }
        let config = TokenizerConfig::load(dir)?;
        let tokenizer_json = dir.join("tokenizer.json");
        let model = if tokenizer_json.is_file() {
            BpeModel::from_tokenizer_json(&tokenizer_json)?
        } else {
            BpeModel::from_vocab_merges(&dir.join("vocab.json"), &dir.join("merges.txt"))?
        };
        Self::new(model, config)
    }

    fn new(model: BpeModel, config: TokenizerConfig) -> Result<Self> {
        let unk_id = match model
            .unk_token
            .as_deref()
            .or(config.unk.as_ref().map(|t| t.content.as_str()))
        {
            Some(unk) => model.vocab.get(unk).copied(),
            None => None,
        };
        let chars = bytes_to_unicode();
        let mut byte_ids = [0u32; 256];
        let mut byte_end_ids = [0u32; 256];
        for (b, c) in chars.iter().enumerate() {
            let inner = c.to_string();
            let end = format!("{c}{}", model.end_of_word_suffix);
            for (token, slot) in [(inner, &mut byte_ids[b]), (end, &mut byte_end_ids[b])] {
                *slot = match model.vocab.get(&token).copied().or(unk_id) {
                    Some(id) => id,
                    None => {
                        return Err(Error::config(
                            &model.file,
                            "vocab",
                            format!("byte token {token:?} is missing and there is no unknown token"),
                        ))
                    }
                };
            }
        }

        // Added tokens, first source wins: tokenizer.json, added_tokens_decoder, then the named ones.
        fn add_new(added: &mut Vec<(u32, TokenSpec)>, id: u32, spec: &TokenSpec) {
            if !added.iter().any(|(_, t)| t.content == spec.content) {
                added.push((id, spec.clone()));
            }
        }
        let mut added = Vec::new();
        for (id, spec) in model.added.iter().chain(&config.added) {
            add_new(&mut added, *id, spec);
        }
        let resolve = |key: &str, spec: &TokenSpec| -> Result<u32> {
            added
                .iter()
                .find(|(_, t)| t.content == spec.content)
                .map(|(id, _)| *id)
                .or_else(|| model.vocab.get(&spec.content).copied())
                .ok_or_else(|| {
                    Error::config(
                        &spec.file,
                        key,
                        format!("token {:?} is not in the vocabulary", spec.content),
                    )
                })
        };
        let bos_id = resolve("bos_token", &config.bos)?;
        let eos_id = resolve("eos_token", &config.eos)?;
        let pad_id = resolve("pad_token", &config.pad)?;
        let unk = match &config.unk {
            Some(unk) => Some((resolve("unk_token", unk)?, unk)),
            None => None,
        };
        for (id, spec) in [(bos_id, &config.bos), (eos_id, &config.eos), (pad_id, &config.pad)]
            .into_iter()
            .chain(unk)
        {
            add_new(&mut added, id, spec);
        }
        let (normalized, raw): (Vec<_>, Vec<_>) = added.into_iter().partition(|(_, t)| t.normalized);
        let normalized = normalized
            .into_iter()
            .map(|(id, t)| {
                let content = normalize(&t.content)
                    .map_err(|e| Error::config(&t.file, "added tokens", format!("{:?}: {e}", t.content)))?;
                Ok((id, TokenSpec { content, ..t }))
            })
            .collect::<Result<Vec<_>>>()?;

        Ok(Self {
            vocab: model.vocab,
            merges: model.merges,
            byte_ids,
            byte_end_ids,
            raw_added: AddedTokens::new(raw),
            normalized_added: AddedTokens::new(normalized),
            clip_split: Regex::new(CLIP_PATTERN).expect("CLIP_PATTERN is a valid regex"),
            byte_level_split: Regex::new(BYTE_LEVEL_PATTERN).expect("BYTE_LEVEL_PATTERN is a valid regex"),
            bos_id,
            eos_id,
            pad_id,
            max_length: config.max_length,
            cache: Mutex::new(HashMap::new()),
        })
    }

    /// Token ids of `text`, without start/end tokens and without truncation.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids = Vec::new();
        for raw in split_added(self.raw_added.as_ref(), text) {
            let raw = match raw {
                Segment::Added(id) => {
                    ids.push(id);
                    continue;
                }
                Segment::Text(raw) => raw,
            };
            let normalized = normalize(raw)?;
            for segment in split_added(self.normalized_added.as_ref(), &normalized) {
                match segment {
                    Segment::Added(id) => ids.push(id),
                    Segment::Text(text) => {
                        for piece in self.clip_split.find_iter(text) {
                            for word in self.byte_level_split.find_iter(piece.as_str()) {
                                self.encode_word(word.as_str(), &mut ids);
                            }
                        }
                    }
                }
            }
        }
        Ok(ids)
    }

    /// `[max_length]` ids as diffusers makes them: bos, the tokens truncated to `max_length - 2`,
    /// eos, then the pad id (`padding="max_length", truncation=True`).
    pub fn encode_padded(&self, text: &str) -> Result<Vec<u32>> {
        let tokens = self.encode(text)?;
        let mut ids = Vec::with_capacity(self.max_length);
        ids.push(self.bos_id);
        ids.extend(tokens.iter().take(self.max_length - 2));
        ids.push(self.eos_id);
        ids.resize(self.max_length, self.pad_id);
        Ok(ids)
    }

    /// [`Self::encode_padded`] for each text: `B` rows of `max_length` ids.
    pub fn encode_batch_padded<S: AsRef<str>>(&self, texts: &[S]) -> Result<Vec<Vec<u32>>> {
        texts.iter().map(|t| self.encode_padded(t.as_ref())).collect()
    }

    /// [`Self::encode_batch_padded`] as a U32 tensor of shape `[B, max_length]` on `device`.
    pub fn encode_batch_tensor<S: AsRef<str>>(&self, texts: &[S], device: &Device) -> Result<Tensor> {
        let rows = self.encode_batch_padded(texts)?;
        let flat: Vec<u32> = rows.into_iter().flatten().collect();
        Ok(Tensor::from_vec(flat, (texts.len(), self.max_length), device)?)
    }

    /// Id of the padding token (`pad_token`; 49407 `<|endoftext|>` for SD 1.x, 0 `!` for SDXL's
    /// second tokenizer and SD 2.x).
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// Id of the end-of-text token (`eos_token`, 49407 for CLIP).
    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }

    /// Id of the start-of-text token (`bos_token`, 49406 for CLIP).
    pub fn bos_id(&self) -> u32 {
        self.bos_id
    }

    /// Padded length, `model_max_length` (77 for CLIP), start and end tokens included.
    pub fn max_length(&self) -> usize {
        self.max_length
    }

    /// Number of entries in the BPE vocabulary (49,408 for CLIP).
    pub fn vocab_size(&self) -> usize {
        self.vocab.len()
    }

    /// Id of `token` in the vocabulary or among the added tokens (exact, unnormalised string).
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.vocab
            .get(token)
            .or_else(|| self.raw_added.as_ref().and_then(|a| a.ids.get(token)))
            .or_else(|| self.normalized_added.as_ref().and_then(|a| a.ids.get(token)))
            .copied()
    }

    /// Appends the BPE ids of one pre-tokenised word, through the cache.
    fn encode_word(&self, word: &str, out: &mut Vec<u32>) {
        if let Some(ids) = self.cache.lock().ok().and_then(|cache| cache.get(word).cloned()) {
            out.extend(ids);
            return;
        }
        let ids = self.bpe(word.as_bytes());
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
    fn bpe(&self, bytes: &[u8]) -> Vec<u32> {
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

impl Clone for ClipTokenizer {
    /// A copy with an empty word cache.
    fn clone(&self) -> Self {
        Self {
            vocab: self.vocab.clone(),
            merges: self.merges.clone(),
            byte_ids: self.byte_ids,
            byte_end_ids: self.byte_end_ids,
            raw_added: self.raw_added.clone(),
            normalized_added: self.normalized_added.clone(),
            clip_split: self.clip_split.clone(),
            byte_level_split: self.byte_level_split.clone(),
            bos_id: self.bos_id,
            eos_id: self.eos_id,
            pad_id: self.pad_id,
            max_length: self.max_length,
            cache: Mutex::new(HashMap::new()),
        }
    }
}

impl std::fmt::Debug for ClipTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClipTokenizer")
            .field("vocab_size", &self.vocab.len())
            .field("merges", &self.merges.len())
            .field("bos_id", &self.bos_id)
            .field("eos_id", &self.eos_id)
            .field("pad_id", &self.pad_id)
            .field("max_length", &self.max_length)
            .finish_non_exhaustive()
    }
}

impl AddedTokens {
    fn new(tokens: Vec<(u32, TokenSpec)>) -> Option<Self> {
        if tokens.is_empty() {
            return None;
        }
        let mut contents: Vec<&str> = tokens.iter().map(|(_, t)| t.content.as_str()).collect();
        contents.sort_by_key(|c| Reverse(c.len()));
        let alternation = contents.iter().map(|c| regex::escape(c)).collect::<Vec<_>>().join("|");
        let pattern = Regex::new(&alternation).expect("escaped literals form a valid regex");
        let ids = tokens.into_iter().map(|(id, t)| (t.content, id)).collect();
        Some(Self { pattern, ids })
    }
}

/// A piece of text between added tokens, or an added token's id.
enum Segment<'a> {
    Text(&'a str),
    Added(u32),
}

/// Splits `text` on the added tokens (none: one segment).
fn split_added<'a>(added: Option<&AddedTokens>, text: &'a str) -> Vec<Segment<'a>> {
    let Some(added) = added else {
        return vec![Segment::Text(text)];
    };
    let mut out = Vec::new();
    let mut start = 0;
    for m in added.pattern.find_iter(text) {
        if m.start() > start {
            out.push(Segment::Text(&text[start..m.start()]));
        }
        if let Some(&id) = added.ids.get(m.as_str()) {
            out.push(Segment::Added(id));
        }
        start = m.end();
    }
    if start < text.len() {
        out.push(Segment::Text(&text[start..]));
    }
    out
}

/// The normaliser: NFC, each whitespace run to one space, per-character lowercase.
fn normalize(text: &str) -> Result<String> {
    use unicode_normalization_alignments::UnicodeNormalization;
    let mut out = String::with_capacity(text.len());
    let mut in_space = false;
    for (c, _) in text.nfc() {
        if c.is_whitespace() {
            if !in_space {
                out.push(' ');
            }
            in_space = true;
        } else {
            in_space = false;
            out.extend(c.to_lowercase());
        }
    }
    Ok(out)
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

/// Reads a whole text file; a missing file is [`Error::MissingFile`] saying what it should hold.
fn read_file(path: &Path, what: &str) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => Error::MissingFile {
            path: path.to_path_buf(),
            what: what.into(),
        },
        _ => Error::io(path, e),
    })
}

/// Parses a JSON file, naming it on error.
fn parse_json<T: serde::de::DeserializeOwned>(path: &Path, text: &str, expected: &str) -> Result<T> {
    serde_json::from_str(text).map_err(|e| Error::config(path, "(file)", format!("expected {expected}: {e}")))
}

impl BpeModel {
    fn from_tokenizer_json(path: &Path) -> Result<Self> {
        let text = read_file(path, "tokenizer")?;
        let json: TokenizerJson = parse_json(path, &text, "a tokenizers JSON file with a BPE model")?;
        let model = json.model;
        if let Some(kind) = model.kind.as_deref().filter(|k| *k != "BPE") {
            return Err(Error::config(
                path,
                "model.type",
                format!("expected \"BPE\", got {kind:?}"),
            ));
        }
        if let Some(prefix) = model.continuing_subword_prefix.as_deref().filter(|p| !p.is_empty()) {
            return Err(Error::config(
                path,
                "model.continuing_subword_prefix",
                format!("not supported by CLIP's BPE, got {prefix:?}"),
            ));
        }
        if let Some(dropout) = model.dropout.filter(|d| *d > 0.0) {
            return Err(Error::config(
                path,
                "model.dropout",
                format!("BPE dropout is not supported, got {dropout}"),
            ));
        }
        let pairs = model.merges.iter().enumerate().map(|(i, m)| match m {
            MergeJson::Pair(a, b) => Ok((i, a.as_str(), b.as_str())),
            MergeJson::Joined(s) => s.split_once(' ').map(|(a, b)| (i, a, b)).ok_or_else(|| Error::Record {
                file: path.to_path_buf(),
                index: i,
                reason: format!("model.merges: expected \"left right\", got {s:?}"),
            }),
        });
        let merges = build_merges(&model.vocab, pairs, path)?;
        let mut added = Vec::with_capacity(json.added_tokens.len());
        for (i, t) in json.added_tokens.into_iter().enumerate() {
            if t.single_word {
                return Err(Error::config(
                    path,
                    format!("added_tokens[{i}].single_word"),
                    format!("single-word added tokens are not supported, got {:?}", t.content),
                ));
            }
            added.push((
                t.id,
                TokenSpec {
                    content: t.content,
                    normalized: t.normalized,
                    file: path.to_path_buf(),
                },
            ));
        }
        Ok(Self {
            vocab: model.vocab,
            merges,
            end_of_word_suffix: model.end_of_word_suffix.unwrap_or_default(),
            unk_token: model.unk_token,
            added,
            file: path.to_path_buf(),
        })
    }

    fn from_vocab_merges(vocab_path: &Path, merges_path: &Path) -> Result<Self> {
        let vocab_text = read_file(vocab_path, "tokenizer vocabulary (vocab.json, or tokenizer.json)")?;
        let vocab: HashMap<String, u32> = parse_json(vocab_path, &vocab_text, "a JSON object of token -> id")?;
        let merges_text = read_file(merges_path, "BPE merges")?;
        let pairs = merges_text
            .lines()
            .enumerate()
            .filter(|(_, line)| !line.starts_with("#version") && !line.trim().is_empty())
            .map(|(i, line)| {
                let mut parts = line.split(' ');
                match (parts.next(), parts.next(), parts.next()) {
                    (Some(a), Some(b), None) => Ok((i, a, b)),
                    _ => Err(Error::Record {
                        file: merges_path.to_path_buf(),
                        index: i,
                        reason: format!("expected \"left right\", got {line:?}"),
                    }),
                }
            });
        let merges = build_merges(&vocab, pairs, merges_path)?;
        Ok(Self {
            vocab,
            merges,
            end_of_word_suffix: END_OF_WORD.into(),
            unk_token: None,
            added: Vec::new(),
            file: vocab_path.to_path_buf(),
        })
    }
}

/// The merge table from `(record index, left, right)` in rank order; every token must be in `vocab`.
fn build_merges<'a>(
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

impl TokenizerConfig {
    /// Reads `tokenizer_config.json`; without `added_tokens_decoder` there, `special_tokens_map.json`
    /// overrides its special tokens (transformers' legacy loading, which gives SD 2.x its "!" pad).
    fn load(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer_config.json");
        let text = read_file(&path, "tokenizer config")?;
        let json: serde_json::Map<String, Value> = parse_json(&path, &text, "a JSON object")?;

        let max_length = match json.get("model_max_length") {
            None | Some(Value::Null) => DEFAULT_MAX_LENGTH,
            Some(v) => v
                .as_u64()
                .and_then(|n| usize::try_from(n).ok())
                .filter(|n| (2..=MAX_MAX_LENGTH).contains(n))
                .ok_or_else(|| {
                    Error::config(
                        &path,
                        "model_max_length",
                        format!("expected an integer in 2..={MAX_MAX_LENGTH}, got {v}"),
                    )
                })?,
        };

        let mut added = Vec::new();
        if let Some(decoder) = json.get("added_tokens_decoder") {
            let Value::Object(decoder) = decoder else {
                return Err(Error::config(
                    &path,
                    "added_tokens_decoder",
                    format!("expected an object, got {decoder}"),
                ));
            };
            for (id, token) in decoder {
                let key = format!("added_tokens_decoder.{id}");
                let id: u32 = id
                    .parse()
                    .map_err(|_| Error::config(&path, &key, "expected an integer id"))?;
                match token_spec(&path, &key, token)? {
                    Some(spec) => added.push((id, spec)),
                    None => return Err(Error::config(&path, &key, "expected a token, got null")),
                }
            }
            added.sort_by_key(|(id, _)| *id);
        }

        let mut named: HashMap<&str, (PathBuf, Option<TokenSpec>)> = HashMap::new();
        for key in ["bos_token", "eos_token", "pad_token", "unk_token"] {
            if let Some(v) = json.get(key) {
                named.insert(key, (path.clone(), token_spec(&path, key, v)?));
            }
        }
        let map_path = dir.join("special_tokens_map.json");
        if !json.contains_key("added_tokens_decoder") && map_path.is_file() {
            let text = read_file(&map_path, "special tokens map")?;
            let map: serde_json::Map<String, Value> = parse_json(&map_path, &text, "a JSON object")?;
            for key in ["bos_token", "eos_token", "pad_token", "unk_token"] {
                if let Some(v) = map.get(key) {
                    named.insert(key, (map_path.clone(), token_spec(&map_path, key, v)?));
                }
            }
        }
        let default = |content: &str| TokenSpec {
            content: content.into(),
            normalized: false,
            file: path.clone(),
        };
        let required = |key: &str, fallback: &str| -> Result<TokenSpec> {
            match named.get(key) {
                None => Ok(default(fallback)),
                Some((_, Some(spec))) => Ok(spec.clone()),
                Some((file, None)) => Err(Error::config(file, key, "is null; padded encoding needs it")),
            }
        };
        Ok(Self {
            max_length,
            bos: required("bos_token", DEFAULT_BOS)?,
            eos: required("eos_token", DEFAULT_EOS)?,
            pad: required("pad_token", DEFAULT_PAD)?,
            unk: match named.get("unk_token") {
                None => Some(default(DEFAULT_UNK)),
                Some((_, spec)) => spec.clone(),
            },
            added,
        })
    }
}

/// A token given as a string, as `{"content": ..., "normalized": ...}`, or as null (None).
/// `lstrip`/`rstrip` are ignored: CLIP never makes tokens of whitespace, so stripping it is a no-op.
fn token_spec(file: &Path, key: &str, value: &Value) -> Result<Option<TokenSpec>> {
    let spec = match value {
        Value::Null => return Ok(None),
        Value::String(s) => TokenSpec {
            content: s.clone(),
            normalized: false,
            file: file.to_path_buf(),
        },
        Value::Object(o) => match o.get("content").and_then(Value::as_str) {
            _ if o.get("single_word").and_then(Value::as_bool) == Some(true) => {
                return Err(Error::config(file, key, "single-word added tokens are not supported"))
            }
            Some(content) => TokenSpec {
                content: content.to_string(),
                normalized: o.get("normalized").and_then(Value::as_bool).unwrap_or(false),
                file: file.to_path_buf(),
            },
            None => {
                return Err(Error::config(
                    file,
                    key,
                    format!("expected an object with \"content\", got {value}"),
                ))
            }
        },
        _ => {
            return Err(Error::config(
                file,
                key,
                format!("expected a string or an object, got {value}"),
            ))
        }
    };
    if spec.content.is_empty() {
        return Err(Error::config(file, key, "expected a token, got an empty string"));
    }
    Ok(Some(spec))
}
