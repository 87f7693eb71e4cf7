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

use std::path::Path;

use candle_core::{Device, Tensor};
use regex::Regex;

use super::bpe::Bpe;
use super::pre_tokenize::{normalize, split_added, AddedTokens, Segment, BYTE_LEVEL_PATTERN, CLIP_PATTERN};
use super::tokenizer_files::{BpeModel, TokenSpec, TokenizerConfig};
use crate::{Error, Result};

/// CLIP's byte-level BPE tokenizer, loaded from a diffusers `tokenizer/` folder.
#[derive(Clone)]
pub struct ClipTokenizer {
    /// The BPE model (vocabulary, merges, per-word cache; a clone starts with an empty cache).
    bpe: Bpe,
    /// Added tokens matched on the raw text (`normalized: false`) and on the normalised text.
    raw_added: Option<AddedTokens>,
    normalized_added: Option<AddedTokens>,
    clip_split: Regex,
    byte_level_split: Regex,
    bos_id: u32,
    eos_id: u32,
    pad_id: u32,
    max_length: usize,
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
        let bpe = Bpe::new(
            model.vocab,
            model.merges,
            &model.end_of_word_suffix,
            unk_id,
            &model.file,
        )?;

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
                .or_else(|| bpe.token_id(&spec.content))
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
            bpe,
            raw_added: AddedTokens::new(raw),
            normalized_added: AddedTokens::new(normalized),
            clip_split: Regex::new(CLIP_PATTERN).expect("CLIP_PATTERN is a valid regex"),
            byte_level_split: Regex::new(BYTE_LEVEL_PATTERN).expect("BYTE_LEVEL_PATTERN is a valid regex"),
            bos_id,
            eos_id,
            pad_id,
            max_length: config.max_length,
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
                                self.bpe.encode_word(word.as_str(), &mut ids);
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
        self.bpe.vocab_size()
    }

    /// Id of `token` in the vocabulary or among the added tokens (exact, unnormalised string).
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.bpe.token_id(token).or_else(|| {
            self.raw_added
                .as_ref()
                .and_then(|a| a.ids.get(token))
                .or_else(|| self.normalized_added.as_ref().and_then(|a| a.ids.get(token)))
                .copied()
        })
    }
}

impl std::fmt::Debug for ClipTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClipTokenizer")
            .field("vocab_size", &self.bpe.vocab_size())
            .field("merges", &self.bpe.num_merges())
            .field("bos_id", &self.bos_id)
            .field("eos_id", &self.eos_id)
            .field("pad_id", &self.pad_id)
            .field("max_length", &self.max_length)
            .finish_non_exhaustive()
    }
}
