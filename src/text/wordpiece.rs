//! BERT's WordPiece tokenizer from a `vocab.txt`, as transformers 5's `BertTokenizer` builds it
//! on `tokenizers` (`transformers/models/bert/tokenization_bert.py`), with BLIP's added tokens
//! (`ImageReward/models/BLIP/blip.py`, `init_tokenizer`: `[DEC]` as `bos_token`, `[ENC]` as an
//! additional special token).
//!
//! A prompt goes through, as in `tokenizers`:
//! 1. special tokens (`[PAD]`, `[UNK]`, `[CLS]`, `[SEP]`, `[MASK]`, `[DEC]`, `[ENC]`) are split
//!    out of the raw text and map straight to their ids;
//! 2. `BertNormalizer`: control characters dropped, whitespace to spaces, spaces around CJK
//!    ideographs, lower-casing, and accents stripped (NFD, marks removed) since it lower-cases;
//! 3. `BertPreTokenizer`: split on whitespace and around every punctuation character;
//! 4. WordPiece: greedy longest-match-first with the `##` continuation prefix; a word with no
//!    split, or longer than 100 characters, becomes `[UNK]`;
//! 5. `[CLS] ... [SEP]`, truncated to `max_length` and padded with `[PAD]` to it
//!    (`padding="max_length", truncation=True`), with the attention mask.
//!
//! The added tokens get the next free ids, `[DEC]` first (30522 and 30523 for bert-base-uncased),
//! unless `vocab.txt` already holds them.

use std::path::Path;

use tokenizers::models::wordpiece::WordPiece;
use tokenizers::normalizers::BertNormalizer;
use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
use tokenizers::processors::bert::BertProcessing;
use tokenizers::{
    AddedToken, PaddingDirection, PaddingParams, PaddingStrategy, Tokenizer, TruncationDirection, TruncationParams,
    TruncationStrategy,
};

use crate::{Error, Result};

/// BERT's special tokens, which `vocab.txt` must hold.
const SPECIAL: [&str; 5] = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"];
/// BLIP's decoder start token (`bos_token`).
pub const DEC_TOKEN: &str = "[DEC]";
/// BLIP's encoder token (`enc_token_id`).
pub const ENC_TOKEN: &str = "[ENC]";

/// One prompt's ids and attention mask, both `max_length` long.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BertEncoding {
    /// Token ids, `[CLS]` first, padded with `[PAD]`.
    pub input_ids: Vec<u32>,
    /// 1 for a token, 0 for padding.
    pub attention_mask: Vec<u32>,
}

/// `bert-base-uncased`'s WordPiece tokenizer with BLIP's `[DEC]` and `[ENC]`, padding and
/// truncating to a fixed length.
#[derive(Clone)]
pub struct BertTokenizer {
    inner: Tokenizer,
    enc_token_id: u32,
    dec_token_id: u32,
}

impl BertTokenizer {
    /// Loads `vocab` (one token per line, the line number its id) and pads or truncates every
    /// prompt to `max_length` tokens (ImageReward: 35). A missing file or a vocabulary without
    /// one of BERT's special tokens is an error naming the file.
    pub fn from_vocab(vocab: &Path, max_length: usize) -> Result<Self> {
        if !vocab.is_file() {
            return Err(Error::MissingFile {
                path: vocab.to_path_buf(),
                what: "the BERT WordPiece vocabulary (bert-base-uncased's vocab.txt)".into(),
            });
        }
        if max_length < 2 {
            return Err(Error::input(
                "max_length",
                format!("must be >= 2 ([CLS] and [SEP]), got {max_length}"),
            ));
        }
        let text = std::fs::read_to_string(vocab).map_err(|e| Error::io(vocab, e))?;
        let bad = |reason: String| Error::config(vocab, "(vocabulary)", reason);
        let words = WordPiece::read_bytes(text.as_bytes()).map_err(|e| bad(e.to_string()))?;
        if let Some(missing) = SPECIAL.iter().find(|t| !words.contains_key(**t)) {
            return Err(bad(format!("missing BERT's special token {missing}")));
        }
        let id = |t: &str| words[t];
        let (cls, sep, pad) = (id("[CLS]"), id("[SEP]"), id("[PAD]"));
        let model = WordPiece::builder()
            .vocab(words)
            .unk_token("[UNK]".into())
            .build()
            .map_err(|e| bad(e.to_string()))?;
        let mut inner = Tokenizer::new(model);
        inner
            .with_normalizer(Some(BertNormalizer::new(true, true, None, true)))
            .with_pre_tokenizer(Some(BertPreTokenizer))
            .with_post_processor(Some(BertProcessing::new(("[SEP]".into(), sep), ("[CLS]".into(), cls))));
        let specials: Vec<AddedToken> = SPECIAL
            .iter()
            .chain(&[DEC_TOKEN, ENC_TOKEN])
            .map(|t| AddedToken::from(t.to_string(), true))
            .collect();
        inner.add_special_tokens(&specials);
        inner
            .with_truncation(Some(TruncationParams {
                direction: TruncationDirection::Right,
                max_length,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
            }))
            .map_err(|e| bad(e.to_string()))?;
        inner.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::Fixed(max_length),
            direction: PaddingDirection::Right,
            pad_to_multiple_of: None,
            pad_id: pad,
            pad_type_id: 0,
            pad_token: "[PAD]".into(),
        }));
        let added = |t: &str| inner.token_to_id(t).expect("added just above");
        let (dec_token_id, enc_token_id) = (added(DEC_TOKEN), added(ENC_TOKEN));
        Ok(BertTokenizer {
            inner,
            enc_token_id,
            dec_token_id,
        })
    }

    /// Tokenises `text`: `[CLS] ... [SEP]`, padded or truncated to `max_length`.
    pub fn encode(&self, text: &str) -> Result<BertEncoding> {
        let enc = self
            .inner
            .encode(text, true)
            .map_err(|e| Error::input("prompt", format!("cannot tokenise {text:?}: {e}")))?;
        Ok(BertEncoding {
            input_ids: enc.get_ids().to_vec(),
            attention_mask: enc.get_attention_mask().to_vec(),
        })
    }

    /// The id of `[ENC]` (BLIP's `enc_token_id`).
    pub fn enc_token_id(&self) -> u32 {
        self.enc_token_id
    }

    /// The id of `[DEC]` (BLIP's `bos_token_id`).
    pub fn dec_token_id(&self) -> u32 {
        self.dec_token_id
    }

    /// Number of ids, the added tokens included (30524 for bert-base-uncased with BLIP's).
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}
