//! A generated preference world for language models, for tests, examples and benchmarks: a
//! word-level vocabulary `w3 .. w{V-1}` (ids 3..V, with `<pad>` 0, `<s>` 1, `</s>` 2), prompts of
//! random words, and pairs whose preferred completion draws its words from the "good" ids
//! (`id % 4 == 0`) and the rejected one from the "bad" ids (`id % 4 == 2`). A reward that counts
//! good words ranks every pair right; a policy that learns to favour good words does too.

use crate::rng::Rng;
use crate::{Error, Result};

use super::data::TextPair;

/// RewardBench subsets the generated pairs cycle through (one per section and a second chat one).
pub const SUBSETS: [&str; 5] = [
    "alpacaeval-easy",
    "mt-bench-med",
    "llmbar-natural",
    "donotanswer",
    "hep-rust",
];

/// A `tokenizer.json` for the vocabulary: a WordLevel model on whitespace, `<s>` prepended.
pub fn word_level_tokenizer_json(vocab: usize) -> Result<String> {
    if vocab < 8 {
        return Err(Error::input("vocabulary", format!("needs at least 8 ids, got {vocab}")));
    }
    let mut words = serde_json::Map::new();
    for (i, w) in ["<pad>", "<s>", "</s>"].iter().enumerate() {
        words.insert(w.to_string(), i.into());
    }
    for i in 3..vocab {
        words.insert(format!("w{i}"), i.into());
    }
    let special = |id: usize, content: &str| {
        serde_json::json!({"id": id, "content": content, "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": true})
    };
    let json = serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [special(0, "<pad>"), special(1, "<s>"), special(2, "</s>")],
        "normalizer": null,
        "pre_tokenizer": {"type": "WhitespaceSplit"},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}
        },
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": words, "unk_token": "<pad>"}
    });
    Ok(serde_json::to_string_pretty(&json).expect("plain JSON"))
}

fn words(rng: &mut Rng, vocab: usize, len: usize, residue: Option<usize>) -> String {
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        let id = 3 + rng.below((vocab - 3) as u64) as usize;
        if residue.is_none_or(|r| id % 4 == r) {
            out.push(format!("w{id}"));
        }
    }
    out.join(" ")
}

/// `n` generated pairs from `seed` over a vocabulary of `vocab` ids, subsets cycling through
/// [`SUBSETS`].
pub fn pairs(n: usize, seed: u64, vocab: usize) -> Vec<TextPair> {
    let mut rng = Rng::new(seed);
    (0..n)
        .map(|i| {
            let prompt_len = 2 + rng.below(3) as usize;
            let prompt = words(&mut rng, vocab, prompt_len, None);
            let (lw, ll) = (2 + rng.below(4) as usize, 2 + rng.below(4) as usize);
            TextPair {
                prompt: prompt.into(),
                chosen: words(&mut rng, vocab, lw, Some(0)).into(),
                rejected: words(&mut rng, vocab, ll, Some(2)).into(),
                subset: Some(SUBSETS[i % SUBSETS.len()].to_string()),
            }
        })
        .collect()
}

/// Writes pairs as JSONL (`prompt`, `chosen`, `rejected`, `subset`).
pub fn to_jsonl(pairs: &[TextPair]) -> String {
    pairs
        .iter()
        .map(|p| {
            serde_json::json!({"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected, "subset": p.subset})
                .to_string()
                + "\n"
        })
        .collect()
}
