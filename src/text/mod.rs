//! Tokenizers: CLIP's byte-level BPE ([`clip_tokenizer`]), loaded from a diffusers `tokenizer/`
//! folder (`tokenizer.json`, or `vocab.json` + `merges.txt`), with diffusers' padding and truncation;
//! and the chat templates of language-model tokenizers ([`chat_template`]).

mod bpe;
pub mod chat_template;
pub mod clip_tokenizer;
mod pre_tokenize;
mod tokenizer_files;

pub use clip_tokenizer::ClipTokenizer;
