//! The CLIP tokenizer against transformers: the shared fixtures' `text.input_ids`, the cases of
//! `tests/fixtures/tokenizer/expected.json` (made by `tests/fixtures/gen_tokenizer.py`), and load errors.

mod common;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use diffalign::text::ClipTokenizer;
use serde_json::Value;

fn sd15_dir() -> PathBuf {
    common::shared_fixtures().join("sd15/tokenizer")
}

fn turbo_dir() -> PathBuf {
    common::shared_fixtures().join("turbo/tokenizer")
}

fn load(dir: &Path) -> ClipTokenizer {
    ClipTokenizer::from_dir(dir).unwrap_or_else(|e| panic!("{e}"))
}

/// A tempdir holding sd15's vocab.json and merges.txt and its tokenizer_config.json as edited by `edit`.
fn sd15_copy(edit: impl FnOnce(&mut serde_json::Map<String, Value>)) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for name in ["vocab.json", "merges.txt"] {
        std::fs::copy(sd15_dir().join(name), dir.path().join(name)).unwrap();
    }
    let text = std::fs::read_to_string(sd15_dir().join("tokenizer_config.json")).unwrap();
    let mut config: serde_json::Map<String, Value> = serde_json::from_str(&text).unwrap();
    edit(&mut config);
    std::fs::write(
        dir.path().join("tokenizer_config.json"),
        serde_json::to_string(&config).unwrap(),
    )
    .unwrap();
    dir
}

struct Case {
    prompt: String,
    ids: Vec<u32>,
    padded: Vec<u32>,
    ids_bang: Vec<u32>,
    padded_bang: Vec<u32>,
}

fn expected(group: &str) -> Vec<Case> {
    let path = common::own_fixtures().join("tokenizer/expected.json");
    let json: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let ids = |case: &Value, key: &str| -> Vec<u32> {
        case[key]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect()
    };
    json[group]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| Case {
            prompt: c["prompt"].as_str().unwrap().to_string(),
            ids: ids(c, "ids"),
            padded: ids(c, "padded"),
            ids_bang: ids(c, "ids_bang"),
            padded_bang: ids(c, "padded_bang"),
        })
        .collect()
}

/// Compares `encode` and `encode_padded` with transformers on every case; lists all mismatches.
fn check_cases(tok: &ClipTokenizer, cases: &[Case], bang: bool, what: &str) {
    let mut failures = Vec::new();
    for case in cases {
        let (ids, padded) = if bang {
            (&case.ids_bang, &case.padded_bang)
        } else {
            (&case.ids, &case.padded)
        };
        let got = tok
            .encode(&case.prompt)
            .unwrap_or_else(|e| panic!("{what}: {:?}: {e}", case.prompt));
        if &got != ids {
            failures.push(format!("encode {:?}:\n  got  {got:?}\n  want {ids:?}", case.prompt));
        }
        let got = tok.encode_padded(&case.prompt).unwrap();
        if &got != padded {
            failures.push(format!(
                "encode_padded {:?}:\n  got  {got:?}\n  want {padded:?}",
                case.prompt
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{what}: {} mismatch(es):\n{}",
        failures.len(),
        failures.join("\n")
    );
}

fn check_reference_input_ids(model: &str, tokenizer_dir: &Path) {
    let path = common::shared_fixtures().join(model).join("reference.safetensors");
    let reference = common::load(&path);
    let want = &reference["text.input_ids"];
    assert_eq!(want.dims(), &[2, 77]);
    let prompts: Vec<String> = serde_json::from_str(&common::metadata(&path)["prompts"]).unwrap();
    let tok = load(tokenizer_dir);

    let rows = tok.encode_batch_padded(&prompts).unwrap();
    let want_rows: Vec<Vec<u32>> = want
        .to_vec2::<i64>()
        .unwrap()
        .into_iter()
        .map(|r| r.into_iter().map(|v| v as u32).collect())
        .collect();
    assert_eq!(rows, want_rows, "{model}: input ids of {prompts:?}");

    let got = tok.encode_batch_tensor(&prompts, &Device::Cpu).unwrap();
    assert_eq!(got.dtype(), DType::U32);
    assert_eq!(got.dims(), &[2, 77]);
    assert_eq!(
        got.to_dtype(DType::I64).unwrap().to_vec2::<i64>().unwrap(),
        want.to_vec2::<i64>().unwrap()
    );
}

#[test]
fn clip_tokenizer_reproduces_sd15_input_ids_from_vocab_and_merges() {
    check_reference_input_ids("sd15", &sd15_dir());
}

#[test]
fn clip_tokenizer_reproduces_turbo_input_ids_from_tokenizer_json() {
    assert!(turbo_dir().join("tokenizer.json").is_file());
    check_reference_input_ids("turbo", &turbo_dir());
}

#[test]
fn clip_tokenizer_special_ids_match_transformers() {
    for dir in [sd15_dir(), turbo_dir()] {
        let tok = load(&dir);
        assert_eq!(
            (tok.bos_id(), tok.eos_id(), tok.pad_id(), tok.max_length()),
            (49406, 49407, 49407, 77)
        );
        assert_eq!(tok.vocab_size(), 49408);
        assert_eq!(tok.token_to_id("<|startoftext|>"), Some(49406));
        assert_eq!(tok.token_to_id("a</w>"), Some(320));
    }
}

#[test]
fn clip_tokenizer_matches_transformers_from_vocab_and_merges() {
    check_cases(
        &load(&sd15_dir()),
        &expected("cases"),
        false,
        "sd15 (vocab.json + merges.txt)",
    );
}

#[test]
fn clip_tokenizer_matches_transformers_from_tokenizer_json() {
    check_cases(&load(&turbo_dir()), &expected("cases"), false, "turbo (tokenizer.json)");
}

#[test]
fn clip_tokenizer_matches_transformers_with_bang_pad_token() {
    let dir = sd15_copy(|c| {
        c.insert("pad_token".into(), "!".into());
    });
    let tok = load(dir.path());
    assert_eq!(tok.pad_id(), 0);
    check_cases(&tok, &expected("cases"), true, "pad_token \"!\"");
}

#[test]
fn clip_tokenizer_reads_pad_token_object_and_added_tokens_decoder() {
    // The SDXL tokenizer_2 layout: pad token as an object, "!" also in added_tokens_decoder.
    let bang = serde_json::json!({"content": "!", "lstrip": false, "normalized": false, "rstrip": false,
        "single_word": false, "special": true});
    let dir = sd15_copy(|c| {
        c.insert("pad_token".into(), bang.clone());
        c.insert("added_tokens_decoder".into(), serde_json::json!({ "0": bang }));
    });
    let tok = load(dir.path());
    assert_eq!(tok.pad_id(), 0);
    check_cases(&tok, &expected("cases"), true, "pad_token object");
}

#[test]
fn clip_tokenizer_special_tokens_map_overrides_config_pad_token() {
    // SD 2.x: tokenizer_config.json says "<|endoftext|>", special_tokens_map.json says "!", and
    // transformers (no added_tokens_decoder) takes the map's.
    let dir = sd15_copy(|_| {});
    std::fs::write(dir.path().join("special_tokens_map.json"), r#"{"pad_token": "!"}"#).unwrap();
    let tok = load(dir.path());
    assert_eq!(tok.pad_id(), 0);
    check_cases(&tok, &expected("cases"), true, "special_tokens_map.json pad_token");
}

#[test]
fn clip_tokenizer_reads_merges_written_as_strings() {
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(turbo_dir().join("tokenizer.json")).unwrap();
    let mut json: Value = serde_json::from_str(&text).unwrap();
    let merges = json["model"]["merges"].as_array_mut().unwrap();
    assert!(merges[0].is_array(), "the fixture's merges are pairs");
    for m in merges.iter_mut() {
        *m = format!("{} {}", m[0].as_str().unwrap(), m[1].as_str().unwrap()).into();
    }
    std::fs::write(dir.path().join("tokenizer.json"), serde_json::to_string(&json).unwrap()).unwrap();
    std::fs::copy(
        turbo_dir().join("tokenizer_config.json"),
        dir.path().join("tokenizer_config.json"),
    )
    .unwrap();
    check_cases(&load(dir.path()), &expected("cases"), false, "string merges");
}

#[test]
fn clip_tokenizer_applies_nfc_like_transformers() {
    // Decomposed accents, compatibility characters and combining-mark orders that NFC rewrites.
    let tok = load(&sd15_dir());
    for case in expected("nfc_cases") {
        assert_eq!(tok.encode(&case.prompt).unwrap(), case.ids, "{:?}", case.prompt);
    }
    assert_eq!(tok.encode("cafe\u{301}").unwrap(), tok.encode("caf\u{e9}").unwrap());
}

#[test]
fn clip_tokenizer_truncates_and_pads_to_max_length() {
    let tok = load(&sd15_dir());
    let long = "cat ".repeat(200);
    assert_eq!(tok.encode(&long).unwrap().len(), 200);
    let ids = tok.encode_padded(&long).unwrap();
    assert_eq!(ids.len(), 77);
    assert_eq!((ids[0], ids[76]), (49406, 49407));
    assert!(ids[1..76].iter().all(|&id| id == ids[1]));
    let empty = tok.encode_padded("").unwrap();
    assert_eq!(&empty[..3], &[49406, 49407, 49407]);
    let batch = tok.encode_batch_tensor(&["a", "b", "c"], &Device::Cpu).unwrap();
    assert_eq!(batch.dims(), &[3, 77]);
    assert_eq!(
        tok.encode_batch_tensor::<&str>(&[], &Device::Cpu).unwrap().dims(),
        &[0, 77]
    );
}

#[test]
fn clip_tokenizer_loads_quickly() {
    for dir in [sd15_dir(), turbo_dir()] {
        let start = std::time::Instant::now();
        load(&dir);
        let elapsed = start.elapsed();
        println!("{}: loaded in {elapsed:?}", dir.display());
        // Well under a second in the optimised test profile; generous for slow CI machines.
        assert!(
            elapsed.as_secs_f64() < 5.0,
            "{}: loading took {elapsed:?}",
            dir.display()
        );
    }
}

fn load_err(dir: &Path) -> String {
    match ClipTokenizer::from_dir(dir) {
        Ok(_) => panic!("{}: loaded", dir.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn clip_tokenizer_missing_folder_is_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no_tokenizer");
    let msg = load_err(&missing);
    assert!(msg.contains("no_tokenizer") && msg.contains("not found"), "{msg}");
}

#[test]
fn clip_tokenizer_missing_merges_is_an_error_naming_it() {
    let dir = sd15_copy(|_| {});
    std::fs::remove_file(dir.path().join("merges.txt")).unwrap();
    let msg = load_err(dir.path());
    assert!(msg.contains("merges.txt") && msg.contains("not found"), "{msg}");
}

#[test]
fn clip_tokenizer_missing_vocab_is_an_error_naming_it() {
    let dir = sd15_copy(|_| {});
    std::fs::remove_file(dir.path().join("vocab.json")).unwrap();
    let msg = load_err(dir.path());
    assert!(msg.contains("vocab.json") && msg.contains("tokenizer.json"), "{msg}");
}

#[test]
fn clip_tokenizer_missing_config_is_an_error_naming_it() {
    let dir = sd15_copy(|_| {});
    std::fs::remove_file(dir.path().join("tokenizer_config.json")).unwrap();
    let msg = load_err(dir.path());
    assert!(msg.contains("tokenizer_config.json"), "{msg}");
}

#[test]
fn clip_tokenizer_malformed_vocab_is_an_error_naming_it() {
    let dir = sd15_copy(|_| {});
    for bad in ["{\"a\": 1,", "[1, 2]", "{\"a\": -1}", ""] {
        std::fs::write(dir.path().join("vocab.json"), bad).unwrap();
        let msg = load_err(dir.path());
        assert!(msg.contains("vocab.json"), "{bad:?}: {msg}");
    }
}

#[test]
fn clip_tokenizer_malformed_tokenizer_json_is_an_error_naming_it() {
    let dir = sd15_copy(|_| {});
    std::fs::write(
        dir.path().join("tokenizer.json"),
        r#"{"model": {"type": "BPE", "vocab": {}}}"#,
    )
    .unwrap();
    let msg = load_err(dir.path());
    assert!(msg.contains("tokenizer.json") && msg.contains("merges"), "{msg}");
    std::fs::write(
        dir.path().join("tokenizer.json"),
        r#"{"model": {"type": "WordPiece", "vocab": {}, "merges": []}}"#,
    )
    .unwrap();
    let msg = load_err(dir.path());
    assert!(
        msg.contains("tokenizer.json: model.type") && msg.contains("WordPiece"),
        "{msg}"
    );
}

#[test]
fn clip_tokenizer_bad_merge_line_is_an_error_naming_file_and_line() {
    let dir = sd15_copy(|_| {});
    std::fs::write(dir.path().join("merges.txt"), "#version: 0.2\ni n\nt h e\n").unwrap();
    let msg = load_err(dir.path());
    assert!(msg.contains("merges.txt: record 2") && msg.contains("t h e"), "{msg}");
    std::fs::write(dir.path().join("merges.txt"), "#version: 0.2\nq\u{e9} z\n").unwrap();
    let msg = load_err(dir.path());
    assert!(
        msg.contains("merges.txt: record 1") && msg.contains("not in the vocabulary"),
        "{msg}"
    );
}

#[test]
fn clip_tokenizer_bad_config_values_are_errors_naming_the_key() {
    let cases: [(&str, Value, &str); 4] = [
        ("model_max_length", serde_json::json!(1e30), "model_max_length"),
        ("model_max_length", serde_json::json!("77"), "model_max_length"),
        ("pad_token", serde_json::json!("<not a token>"), "pad_token"),
        ("pad_token", Value::Null, "pad_token"),
    ];
    for (key, value, named) in cases {
        let dir = sd15_copy(|c| {
            c.insert(key.into(), value.clone());
        });
        let msg = load_err(dir.path());
        assert!(
            msg.contains(&format!("tokenizer_config.json: {named}")),
            "{key}={value}: {msg}"
        );
    }
}
