//! Tokenizers: CLIP's byte-level BPE ([`clip_tokenizer`]), loaded from a diffusers `tokenizer/`
//! folder (`tokenizer.json`, or `vocab.json` + `merges.txt`), with diffusers' padding and truncation;
//! BERT's WordPiece with BLIP's added tokens ([`wordpiece`], for ImageReward); and the chat
//! templates of language-model tokenizers ([`chat_template`]).

mod bpe;
pub mod chat_template;
pub mod clip_tokenizer;
mod pre_tokenize;
mod tokenizer_files;
pub mod wordpiece;

pub use clip_tokenizer::ClipTokenizer;
pub use wordpiece::BertTokenizer;
