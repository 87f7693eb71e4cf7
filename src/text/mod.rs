//! Tokenizers: CLIP's byte-level BPE ([`clip_tokenizer`]), loaded from a diffusers `tokenizer/`
//! folder (`tokenizer.json`, or `vocab.json` + `merges.txt`), with diffusers' padding and truncation.

pub mod clip_tokenizer;

pub use clip_tokenizer::ClipTokenizer;
