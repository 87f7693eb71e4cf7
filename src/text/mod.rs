//! Tokenizers: CLIP's byte-level BPE ([`clip_tokenizer`]), loaded from a diffusers `tokenizer/`
//! folder (`tokenizer.json`, or `vocab.json` + `merges.txt`), with diffusers' padding and truncation.

mod bpe;
pub mod clip_tokenizer;
mod pre_tokenize;
mod tokenizer_files;

pub use clip_tokenizer::ClipTokenizer;
