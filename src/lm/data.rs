//! Text preference pairs for language models and their tokenisation: JSONL or parquet records
//! with `prompt`, `chosen`, `rejected` (and RewardBench's `subset`), a `tokenizer.json`
//! (Hugging Face tokenizers), or the pre-tokenised safetensors batch format.
//!
//! JSONL fields may also be TRL's conversational format, lists of `{"role", "content"}`
//! messages, rendered with the tokenizer folder's chat template as TRL does
//! (`trl/data_utils.py`): without `prompt`, the messages `chosen` and `rejected` share before
//! they differ are the prompt (`maybe_extract_prompt`); the prompt is rendered with
//! `add_generation_prompt`, each completion is what rendering `prompt + completion` adds after
//! the text both share (`maybe_apply_chat_template`), and the ids are those of the texts without
//! special tokens, the completion's followed by the end-of-sequence id (`DPOTrainer.tokenize_row`).

use std::path::Path;

use candle_core::{DType, Device};
use serde::Serialize;

use super::batch::{PairBatch, Sequences};
use crate::text::chat_template::{ChatTemplate, Message};
use crate::{Error, Result};

/// A prompt or a completion: plain text, or chat messages (TRL's conversational format).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Text {
    /// Plain text, tokenised as is.
    Plain(String),
    /// Messages, rendered with the chat template.
    Chat(Vec<Message>),
}

impl From<String> for Text {
    fn from(s: String) -> Self {
        Text::Plain(s)
    }
}

impl Text {
    /// A JSON string or list of `{"role", "content"}` messages; `None` when absent or null.
    fn from_json(v: Option<&serde_json::Value>, key: &str) -> std::result::Result<Option<Self>, String> {
        match v {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(serde_json::Value::String(s)) => Ok(Some(Text::Plain(s.clone()))),
            Some(list @ serde_json::Value::Array(_)) => serde_json::from_value(list.clone())
                .map(|m| Some(Text::Chat(m)))
                .map_err(|e| format!("field {key:?}: expected a list of {{\"role\", \"content\"}} messages: {e}")),
            Some(other) => Err(format!(
                "field {key:?}: expected a string or a list of messages, got {other}"
            )),
        }
    }
}

/// One text pair; `subset` is RewardBench's subset name, when given.
#[derive(Debug, Clone, PartialEq)]
pub struct TextPair {
    /// The prompt.
    pub prompt: Text,
    /// The preferred completion.
    pub chosen: Text,
    /// The rejected completion.
    pub rejected: Text,
    /// RewardBench subset.
    pub subset: Option<String>,
}

/// A tokenised sequence: prompt and completion tokens, and where the completion starts.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenSeq {
    /// All tokens.
    pub tokens: Vec<u32>,
    /// Index of the first completion token (at least 1).
    pub completion_start: usize,
}

/// A tokenised pair.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenPair {
    /// The preferred sequence.
    pub chosen: TokenSeq,
    /// The rejected sequence.
    pub rejected: TokenSeq,
    /// RewardBench subset.
    pub subset: Option<String>,
}

/// One unpaired example (KTO): a prompt, a completion and whether it is desirable.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenExample {
    /// The tokenised prompt and completion.
    pub seq: TokenSeq,
    /// The label.
    pub desirable: bool,
}

/// Pairs as unpaired examples, as TRL's `unpair_preference_dataset`: each chosen completion is
/// desirable, each rejected one undesirable.
pub fn unpair(pairs: &[TokenPair]) -> Vec<TokenExample> {
    pairs
        .iter()
        .flat_map(|p| {
            [
                TokenExample {
                    seq: p.chosen.clone(),
                    desirable: true,
                },
                TokenExample {
                    seq: p.rejected.clone(),
                    desirable: false,
                },
            ]
        })
        .collect()
}

/// Fails when a sequence of `seqs` (record index, sequence) is longer than `max_positions`
/// tokens, naming `source`, the record and the model's limit, before a batch of it is allocated.
pub fn check_positions<'a>(
    seqs: impl IntoIterator<Item = (usize, &'a TokenSeq)>,
    max_positions: usize,
    source: &Path,
) -> Result<()> {
    for (index, seq) in seqs {
        if seq.tokens.len() > max_positions {
            return Err(Error::Record {
                file: source.to_path_buf(),
                index,
                reason: super::batch::too_long(seq.tokens.len(), max_positions),
            });
        }
    }
    Ok(())
}

/// The sequences of `pairs` with their record index, for [`check_positions`].
pub fn pair_seqs(pairs: &[TokenPair]) -> impl Iterator<Item = (usize, &TokenSeq)> {
    pairs
        .iter()
        .enumerate()
        .flat_map(|(i, p)| [(i, &p.chosen), (i, &p.rejected)])
}

/// Loads unpaired examples: JSONL records `{"prompt", "completion", "label": bool}` (TRL's KTO
/// format), tokenised with `model_dir`'s tokenizer; or any pair data, unpaired ([`unpair`]).
pub fn load_examples(path: &Path, model_dir: &Path, eos: Option<u32>) -> Result<Vec<TokenExample>> {
    let is_jsonl = path.extension().is_some_and(|e| e == "jsonl");
    if is_jsonl {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let first: Option<serde_json::Value> = text
            .lines()
            .find(|l| !l.trim().is_empty())
            .and_then(|l| serde_json::from_str(l).ok());
        if first.is_some_and(|v| v.get("completion").is_some()) {
            let tok = LmTokenizer::from_dir(model_dir, eos)?;
            let mut out = Vec::new();
            for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
                let record = |reason: String| Error::Record {
                    file: path.to_path_buf(),
                    index: i,
                    reason,
                };
                let v: serde_json::Value = serde_json::from_str(line).map_err(|e| record(format!("not JSON: {e}")))?;
                let get = |k: &str| {
                    v.get(k)
                        .and_then(|x| x.as_str())
                        .ok_or_else(|| record(format!("missing string field {k:?}")))
                };
                let desirable = v
                    .get("label")
                    .and_then(|x| x.as_bool())
                    .ok_or_else(|| record("missing boolean field \"label\"".into()))?;
                out.push(TokenExample {
                    seq: tok.encode_pair(get("prompt")?, get("completion")?)?,
                    desirable,
                });
            }
            return Ok(out);
        }
    }
    Ok(unpair(&load_pairs(path, model_dir, eos)?))
}

/// Reads text pairs from a `.jsonl` file or a `.parquet` file / folder of shards. Errors name the
/// file and record.
pub fn read_text_pairs(path: &Path) -> Result<Vec<TextPair>> {
    let is_parquet = path.is_dir() || path.extension().is_some_and(|e| e == "parquet");
    let pairs = if is_parquet {
        read_parquet(path)?
    } else {
        read_jsonl(path)?
    };
    if pairs.is_empty() {
        return Err(Error::input(path.display().to_string(), "no preference pairs"));
    }
    Ok(pairs)
}

fn read_jsonl(path: &Path) -> Result<Vec<TextPair>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let record = |reason: String| Error::Record {
            file: path.to_path_buf(),
            index: i,
            reason,
        };
        let v: serde_json::Value = serde_json::from_str(line).map_err(|e| record(format!("not JSON: {e}")))?;
        let get = |key: &str| Text::from_json(v.get(key), key).map_err(&record);
        let need = |key: &str| get(key)?.ok_or_else(|| record(format!("missing field {key:?}")));
        let (chosen, rejected) = (need("chosen")?, need("rejected")?);
        let (prompt, chosen, rejected) = match (get("prompt")?, chosen, rejected) {
            (Some(p), c, r) => (p, c, r),
            (None, Text::Chat(c), Text::Chat(r)) => extract_prompt(c, r).map_err(&record)?,
            (None, ..) => {
                return Err(record(
                    "missing field \"prompt\" (only conversational pairs may leave it implicit)".into(),
                ))
            }
        };
        let plain = |t: &Text| matches!(t, Text::Plain(_));
        if plain(&prompt) != plain(&chosen) || plain(&prompt) != plain(&rejected) {
            return Err(record(
                "prompt, chosen and rejected must all be strings or all be lists of messages".into(),
            ));
        }
        out.push(TextPair {
            prompt,
            chosen,
            rejected,
            subset: v.get("subset").and_then(|x| x.as_str()).map(str::to_string),
        });
    }
    Ok(out)
}

/// TRL's `maybe_extract_prompt` on messages: the prompt is `chosen` up to the first message
/// where it differs from `rejected` (when none differs, up to the last message both have, as
/// TRL's loop leaves its index).
fn extract_prompt(chosen: Vec<Message>, rejected: Vec<Message>) -> std::result::Result<(Text, Text, Text), String> {
    let n = chosen.len().min(rejected.len());
    let at = (0..n)
        .find(|&i| chosen[i] != rejected[i])
        .unwrap_or(n.saturating_sub(1));
    if at == 0 {
        return Err("no \"prompt\", and chosen and rejected share no first message to take as one".into());
    }
    Ok((
        Text::Chat(chosen[..at].to_vec()),
        Text::Chat(chosen[at..].to_vec()),
        Text::Chat(rejected[at..].to_vec()),
    ))
}

fn read_parquet(path: &Path) -> Result<Vec<TextPair>> {
    use parquet::file::reader::FileReader;
    let mut out = Vec::new();
    for file in crate::data::pickapic::parquet_files(path)? {
        let reader = crate::data::pickapic::open_reader(&file)?;
        let rows = reader
            .get_row_iter(None)
            .map_err(|e| Error::config(&file, "parquet", e.to_string()))?;
        for (i, row) in rows.enumerate() {
            let record = |reason: String| Error::Record {
                file: file.clone(),
                index: i,
                reason,
            };
            let row = row.map_err(|e| record(format!("cannot read row: {e}")))?;
            let mut fields: std::collections::HashMap<&str, Option<String>> = std::collections::HashMap::new();
            for (name, f) in row.get_column_iter() {
                if matches!(name.as_str(), "prompt" | "chosen" | "rejected" | "subset") {
                    let t = crate::data::pickapic::text(f)
                        .map_err(|g| record(format!("column {name}: expected a string, got {g}")))?;
                    fields.insert(name.as_str(), t);
                }
            }
            let mut get = |key: &str| -> Result<String> {
                fields
                    .remove(key)
                    .flatten()
                    .ok_or_else(|| record(format!("missing or null string column {key:?}")))
            };
            let (prompt, chosen, rejected) = (get("prompt")?, get("chosen")?, get("rejected")?);
            out.push(TextPair {
                prompt: prompt.into(),
                chosen: chosen.into(),
                rejected: rejected.into(),
                subset: fields.remove("subset").flatten(),
            });
        }
    }
    Ok(out)
}

/// A Hugging Face `tokenizer.json` with the model's end-of-sequence id and the folder's chat
/// template, if it has one.
pub struct LmTokenizer {
    inner: tokenizers::Tokenizer,
    eos: Option<u32>,
    chat: Option<ChatTemplate>,
    dir: std::path::PathBuf,
}

impl LmTokenizer {
    /// Loads `dir/tokenizer.json` and the chat template of `dir` ([`ChatTemplate::from_dir`]);
    /// `eos` is appended to every completion when given.
    pub fn from_dir(dir: &Path, eos: Option<u32>) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.is_file() {
            return Err(Error::MissingFile {
                path,
                what: "tokenizer (text data needs the model's tokenizer.json; pre-tokenised batches do not)".into(),
            });
        }
        let inner =
            tokenizers::Tokenizer::from_file(&path).map_err(|e| Error::config(&path, "(tokenizer)", e.to_string()))?;
        Ok(LmTokenizer {
            inner,
            eos,
            chat: ChatTemplate::from_dir(dir)?,
            dir: dir.to_path_buf(),
        })
    }

    fn encode(&self, text: &str, special: bool) -> Result<Vec<u32>> {
        Ok(self
            .inner
            .encode(text, special)
            .map_err(|e| Error::input("tokenizer", format!("cannot encode {text:?}: {e}")))?
            .get_ids()
            .to_vec())
    }

    /// The prompt with the tokenizer's special tokens, then the completion without them and the
    /// end-of-sequence token.
    pub fn encode_pair(&self, prompt: &str, completion: &str) -> Result<TokenSeq> {
        let mut tokens = self.encode(prompt, true)?;
        if tokens.is_empty() {
            return Err(Error::input("prompt", format!("{prompt:?} encodes to no tokens")));
        }
        let completion_start = tokens.len();
        tokens.extend(self.encode(completion, false)?);
        tokens.extend(self.eos);
        Ok(TokenSeq {
            tokens,
            completion_start,
        })
    }

    /// A conversational prompt and its completions as TRL tokenises them (see the module docs):
    /// one sequence per completion.
    pub fn encode_chat(&self, prompt: &[Message], completions: &[&[Message]]) -> Result<Vec<TokenSeq>> {
        let chat = self.chat.as_ref().ok_or_else(|| {
            Error::input(
                "conversational data",
                format!(
                    "needs a chat template, and {} has none (tokenizer_config.json's chat_template or chat_template.jinja)",
                    self.dir.display()
                ),
            )
        })?;
        if prompt.last().is_some_and(|m| m.role == "assistant") {
            return Err(Error::input(
                "conversational data",
                "a prompt ending with an assistant message (TRL's continue_final_message) is not supported",
            ));
        }
        let mut prompt_text = chat.render(prompt, true)?;
        let mut texts = Vec::with_capacity(completions.len());
        for completion in completions {
            let whole: Vec<Message> = prompt.iter().chain(completion.iter()).cloned().collect();
            let full = chat.render(&whole, false)?;
            // TRL narrows the prompt to the text it shares with each rendering in turn.
            let shared = prompt_text
                .char_indices()
                .zip(full.chars())
                .find(|((_, a), b)| a != b)
                .map_or(prompt_text.len().min(full.len()), |((i, _), _)| i);
            prompt_text.truncate(shared);
            texts.push(full[shared..].to_string());
        }
        let prompt_ids = self.encode(&prompt_text, false)?;
        if prompt_ids.is_empty() {
            return Err(Error::input("prompt", "the rendered prompt encodes to no tokens"));
        }
        texts
            .iter()
            .map(|t| {
                let mut tokens = prompt_ids.clone();
                tokens.extend(self.encode(t, false)?);
                tokens.extend(self.eos);
                Ok(TokenSeq {
                    tokens,
                    completion_start: prompt_ids.len(),
                })
            })
            .collect()
    }

    /// Tokenises text pairs; errors name `source` and the record.
    pub fn encode_pairs(&self, pairs: &[TextPair], source: &Path) -> Result<Vec<TokenPair>> {
        pairs
            .iter()
            .enumerate()
            .map(|(index, p)| {
                let (chosen, rejected) = match (&p.prompt, &p.chosen, &p.rejected) {
                    (Text::Plain(pr), Text::Plain(c), Text::Plain(r)) => {
                        (self.encode_pair(pr, c)?, self.encode_pair(pr, r)?)
                    }
                    (Text::Chat(pr), Text::Chat(c), Text::Chat(r)) => {
                        let mut seqs = self.encode_chat(pr, &[c, r]).map_err(|e| Error::Record {
                            file: source.to_path_buf(),
                            index,
                            reason: e.to_string(),
                        })?;
                        let rejected = seqs.pop().expect("two completions");
                        (seqs.pop().expect("two completions"), rejected)
                    }
                    _ => {
                        return Err(Error::Record {
                            file: source.to_path_buf(),
                            index,
                            reason: "prompt, chosen and rejected mix strings and message lists".into(),
                        })
                    }
                };
                Ok(TokenPair {
                    chosen,
                    rejected,
                    subset: p.subset.clone(),
                })
            })
            .collect()
    }
}

impl Sequences {
    /// The rows as token sequences, padding stripped (by the attention mask).
    pub fn to_token_seqs(&self) -> Result<Vec<TokenSeq>> {
        let ids = self.input_ids.to_dtype(DType::U32)?.to_vec2::<u32>()?;
        let att = self.attention_mask.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        let starts = self.last_prompt_positions()?;
        Ok(ids
            .into_iter()
            .zip(att)
            .zip(starts)
            .map(|((row, mask), last_prompt)| TokenSeq {
                tokens: row
                    .into_iter()
                    .zip(mask)
                    .filter(|(_, m)| *m > 0.0)
                    .map(|(t, _)| t)
                    .collect(),
                completion_start: last_prompt + 1,
            })
            .collect())
    }
}

impl PairBatch {
    /// The batch's pairs as token sequences.
    pub fn to_token_pairs(&self) -> Result<Vec<TokenPair>> {
        let w = self.chosen.to_token_seqs()?;
        let l = self.rejected.to_token_seqs()?;
        Ok(w.into_iter()
            .zip(l)
            .map(|(chosen, rejected)| TokenPair {
                chosen,
                rejected,
                subset: None,
            })
            .collect())
    }

    /// A right-padded batch of `pairs` (padding with `pad_id`).
    pub fn from_pairs(pairs: &[&TokenPair], pad_id: u32, device: &Device) -> Result<Self> {
        let rows = |f: fn(&TokenPair) -> &TokenSeq| -> Vec<(Vec<u32>, usize)> {
            pairs
                .iter()
                .map(|p| {
                    let s = f(p);
                    (s.tokens.clone(), s.completion_start)
                })
                .collect()
        };
        Ok(PairBatch {
            chosen: Sequences::from_rows(&rows(|p| &p.chosen), pad_id, device)?,
            rejected: Sequences::from_rows(&rows(|p| &p.rejected), pad_id, device)?,
        })
    }
}

/// Loads pairs for training or evaluation: a pre-tokenised `.safetensors` batch, or JSONL /
/// parquet text tokenised with the model's `tokenizer.json` from `model_dir`.
pub fn load_pairs(path: &Path, model_dir: &Path, eos: Option<u32>) -> Result<Vec<TokenPair>> {
    if path.extension().is_some_and(|e| e == "safetensors") {
        return PairBatch::from_file(path, &Device::Cpu)?.to_token_pairs();
    }
    let text = read_text_pairs(path)?;
    LmTokenizer::from_dir(model_dir, eos)?.encode_pairs(&text, path)
}
