//! Chat templates: real templates (Llama 3, Llama 3.1, Qwen2, Mistral) rendered as transformers'
//! `apply_chat_template` renders them, and TRL's conversational preference pairs tokenised as
//! TRL's DPO trainer does; expectations from `tests/fixtures/gen_chat_templates.py`.

mod common;

use std::path::PathBuf;

use common::*;
use diffalign::lm::data::{load_pairs, LmTokenizer};
use diffalign::text::chat_template::{ChatTemplate, Message};
use diffalign::Error;
use serde_json::Value;

const TEMPLATES: [&str; 4] = ["llama3", "llama3_1", "qwen2", "mistral"];

fn dir(name: &str) -> PathBuf {
    own_fixtures().join("chat_templates").join(name)
}

fn expected(name: &str) -> Value {
    let text = std::fs::read_to_string(dir(name).join("expected.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn chat_template_renders_as_transformers() {
    for name in TEMPLATES {
        let template = ChatTemplate::from_dir(&dir(name))
            .unwrap()
            .expect("the folder has a template");
        let tok = tokenizers::Tokenizer::from_file(dir(name).join("tokenizer.json")).unwrap();
        let e = expected(name);
        let renders = e["renders"].as_array().unwrap();
        assert!(renders.len() >= 6);
        for (i, case) in renders.iter().enumerate() {
            let messages: Vec<Message> = serde_json::from_value(case["messages"].clone()).unwrap();
            let gen = case["add_generation_prompt"].as_bool().unwrap();
            let got = template.render(&messages, gen);
            match case.get("error").and_then(Value::as_str) {
                Some(error) => {
                    let err = got.expect_err("transformers raised");
                    assert!(err.to_string().contains(error), "{name} case {i}: {err}");
                }
                None => {
                    let text = got.unwrap_or_else(|e| panic!("{name} case {i}: {e}"));
                    assert_eq!(text, case["text"].as_str().unwrap(), "{name} case {i}");
                    let got_ids = tok.encode(text.as_str(), false).unwrap().get_ids().to_vec();
                    assert_eq!(got_ids, ids(&case["ids"]), "{name} case {i}: ids");
                }
            }
        }
    }
}

#[test]
fn conversational_pairs_tokenize_as_trl() {
    let data = own_fixtures().join("chat_templates").join("pairs.jsonl");
    for name in TEMPLATES {
        let e = expected(name);
        let eos = e["eos_token_id"].as_u64().unwrap() as u32;
        let pairs = load_pairs(&data, &dir(name), Some(eos)).unwrap();
        let want = e["pairs"].as_array().unwrap();
        assert_eq!(pairs.len(), want.len(), "{name}");
        for (i, (p, w)) in pairs.iter().zip(want).enumerate() {
            assert_eq!(p.chosen.tokens, ids(&w["chosen"]), "{name} pair {i}: chosen");
            assert_eq!(p.rejected.tokens, ids(&w["rejected"]), "{name} pair {i}: rejected");
            assert_eq!(p.chosen.completion_start as u64, w["chosen_start"].as_u64().unwrap());
            assert_eq!(
                p.rejected.completion_start as u64,
                w["rejected_start"].as_u64().unwrap()
            );
        }
        assert_eq!(pairs[1].subset.as_deref(), Some("chat"));
    }
}

#[test]
fn conversational_pairs_need_a_chat_template() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::copy(dir("qwen2").join("tokenizer.json"), tmp.path().join("tokenizer.json")).unwrap();
    let data = own_fixtures().join("chat_templates").join("pairs.jsonl");
    let err = match load_pairs(&data, tmp.path(), Some(1)) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("conversational pairs loaded without a chat template"),
    };
    assert!(
        err.contains("pairs.jsonl: record 0") && err.contains("chat template"),
        "{err}"
    );
    assert!(LmTokenizer::from_dir(tmp.path(), None).is_ok());
}

#[test]
fn conversational_record_errors_name_the_record() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("bad.jsonl");
    let cases = [
        (
            r#"{"prompt": "plain", "chosen": [{"role": "assistant", "content": "a"}], "rejected": "b"}"#,
            "all be strings or all be lists",
        ),
        (
            r#"{"prompt": [{"role": "user"}], "chosen": "a", "rejected": "b"}"#,
            "field \"prompt\"",
        ),
        (
            r#"{"prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}], "chosen": [{"role": "assistant", "content": "a"}], "rejected": [{"role": "assistant", "content": "b"}]}"#,
            "Conversation roles must alternate",
        ),
    ];
    for (line, want) in cases {
        std::fs::write(&data, format!("{line}\n")).unwrap();
        match load_pairs(&data, &dir("mistral"), Some(2)) {
            Err(e @ Error::Record { index: 0, .. }) => assert!(e.to_string().contains(want), "{e}"),
            Err(e) => panic!("{line}: unexpected error {e}"),
            Ok(_) => panic!("{line}: accepted"),
        }
    }
}
