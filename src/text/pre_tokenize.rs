//! Pre-tokenisation of CLIP's tokenizer: added tokens split out of the text, normalisation, and
//! the regexes that cut the rest into words.

use std::cmp::Reverse;
use std::collections::HashMap;

use regex::Regex;

use super::tokenizer_files::TokenSpec;
use crate::Result;

/// CLIP's pre-tokenisation regex (`tokenization_clip.py`; lowercase text, so no case flag).
pub(super) const CLIP_PATTERN: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";
/// GPT-2's regex, which `ByteLevel(use_regex=True)` applies to each CLIP piece. Its optional
/// leading spaces and whitespace alternatives are left out: CLIP pieces hold no whitespace. It
/// only changes pieces such as `<|startoftext|>` written in capitals (`<|`, `startoftext`, `|>`).
pub(super) const BYTE_LEVEL_PATTERN: &str = r"'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}+|[^\s\p{L}\p{N}]+";

/// Added tokens of one kind (raw or normalised) and the pattern that finds them.
#[derive(Clone)]
pub(super) struct AddedTokens {
    /// Alternation of the escaped contents, longest first, so the leftmost-longest one matches.
    pattern: Regex,
    pub(super) ids: HashMap<String, u32>,
}

impl AddedTokens {
    /// The matcher of `tokens`, none when there are none.
    pub(super) fn new(tokens: Vec<(u32, TokenSpec)>) -> Option<Self> {
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
pub(super) enum Segment<'a> {
    /// Text between added tokens.
    Text(&'a str),
    /// An added token's id.
    Added(u32),
}

/// Splits `text` on the added tokens (none: one segment).
pub(super) fn split_added<'a>(added: Option<&AddedTokens>, text: &'a str) -> Vec<Segment<'a>> {
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
pub(super) fn normalize(text: &str) -> Result<String> {
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
