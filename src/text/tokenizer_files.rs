//! The files a diffusers `tokenizer/` folder holds, as transformers reads them: the BPE model
//! from `tokenizer.json` or `vocab.json` + `merges.txt`, and the special tokens and length from
//! `tokenizer_config.json` (and the legacy `special_tokens_map.json`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;

use super::bpe::build_merges;
use crate::json::{read_json, read_text};
use crate::{Error, Result};

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

/// A token named in `tokenizer_config.json`, `special_tokens_map.json` or `tokenizer.json`.
#[derive(Clone, Debug)]
pub(super) struct TokenSpec {
    pub(super) content: String,
    /// Matched on normalised text rather than raw text.
    pub(super) normalized: bool,
    /// The file that names it, for errors.
    pub(super) file: PathBuf,
}

/// What `tokenizer_config.json` (and `special_tokens_map.json`) says.
pub(super) struct TokenizerConfig {
    pub(super) max_length: usize,
    pub(super) bos: TokenSpec,
    pub(super) eos: TokenSpec,
    pub(super) pad: TokenSpec,
    pub(super) unk: Option<TokenSpec>,
    /// `added_tokens_decoder`: id -> token.
    pub(super) added: Vec<(u32, TokenSpec)>,
}

/// The BPE model of `tokenizer.json`, or of `vocab.json` + `merges.txt`.
pub(super) struct BpeModel {
    pub(super) vocab: HashMap<String, u32>,
    pub(super) merges: HashMap<(u32, u32), (u32, u32)>,
    pub(super) end_of_word_suffix: String,
    pub(super) unk_token: Option<String>,
    /// `tokenizer.json`'s `added_tokens`.
    pub(super) added: Vec<(u32, TokenSpec)>,
    /// The file the vocabulary came from, for errors.
    pub(super) file: PathBuf,
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

impl BpeModel {
    /// Reads a `tokenizer.json` holding a BPE model.
    pub(super) fn from_tokenizer_json(path: &Path) -> Result<Self> {
        let json: TokenizerJson = read_json(path, "tokenizers JSON file with a BPE model")?;
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

    /// Reads a `vocab.json` and its `merges.txt`.
    pub(super) fn from_vocab_merges(vocab_path: &Path, merges_path: &Path) -> Result<Self> {
        let vocab: HashMap<String, u32> =
            read_json(vocab_path, "tokenizer vocabulary (vocab.json, or tokenizer.json)")?;
        let merges_text = read_text(merges_path, "BPE merges")?;
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

impl TokenizerConfig {
    /// Reads `tokenizer_config.json`; without `added_tokens_decoder` there, `special_tokens_map.json`
    /// overrides its special tokens (transformers' legacy loading, which gives SD 2.x its "!" pad).
    pub(super) fn load(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer_config.json");
        let json: serde_json::Map<String, Value> = read_json(&path, "tokenizer config")?;

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
            let map: serde_json::Map<String, Value> = read_json(&map_path, "special tokens map")?;
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
