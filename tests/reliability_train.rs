//! `diffalign train` on bad data and interrupted runs (issue 23): every skipped record is named
//! on stderr and listed in `skipped_records.jsonl`; `--resume` never quietly starts over or
//! continues a different run; stale temporary checkpoint folders are removed.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{read_jsonl, shared_fixtures};
use diffalign::train::resume::recipe_changes;

/// A JSONL dataset in `dir` whose first `good` lines are usable pairs, followed by `extra` lines.
fn write_data(dir: &Path, good: usize, extra: &[String]) -> PathBuf {
    std::fs::create_dir_all(dir.join("img")).unwrap();
    let mut lines = Vec::new();
    for i in 0..good {
        for (side, c) in [("w", [200u8, 40, 40]), ("l", [40u8, 40, 200])] {
            image::RgbImage::from_pixel(64, 64, image::Rgb(c))
                .save(dir.join(format!("img/{i}_{side}.png")))
                .unwrap();
        }
        lines.push(
            serde_json::json!({"prompt": "a square", "chosen": format!("img/{i}_w.png"), "rejected": format!("img/{i}_l.png")})
                .to_string(),
        );
    }
    lines.extend(extra.iter().cloned());
    let path = dir.join("pairs.jsonl");
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    path
}

/// A small DPO recipe on the sd15 fixture writing into `dir/out`.
fn recipe(dir: &Path, data: &Path, steps: usize) -> PathBuf {
    let text = format!(
        r#"
[model]
path = "{model}"

[data]
format = "jsonl"
path = "{data}"

[train]
method = "dpo"
steps = {steps}
batch_size = 2
lr = 1e-3
resolution = 64
random_flip = false
seed = 7

[output]
dir = "{out}"
"#,
        model = shared_fixtures().join("sd15").display(),
        data = data.display(),
        out = dir.join("out").display(),
    );
    let path = dir.join("recipe.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn train(recipe: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_diffalign"))
        .arg("train")
        .arg(recipe)
        .args(args)
        .output()
        .unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn assert_ok(o: &Output) {
    assert!(o.status.success(), "train failed: {}", stderr(o));
}

fn steps_logged(out: &Path) -> Vec<u64> {
    read_jsonl(&out.join("metrics.jsonl"))
        .iter()
        .filter(|v| v.get("event").is_none())
        .map(|v| v["step"].as_u64().unwrap())
        .collect()
}

#[test]
fn train_names_and_lists_every_skipped_record() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::create_dir_all(dir.join("img")).unwrap();
    std::fs::write(dir.join("img/bad.png"), b"not a png").unwrap();
    let pair = |extra: &str| format!(r#"{{"chosen": "img/0_w.png", "rejected": "img/0_l.png"{extra}}}"#);
    let bad = [
        r#"{"prompt": "broken", "chosen": "#.to_string(),
        r#"{"prompt": "gone", "chosen": "img/missing.png", "rejected": "img/0_l.png"}"#.to_string(),
        pair(""),
        pair(r#", "prompt": 5"#),
        pair(r#", "prompt": "p", "soft_label": 7.5"#),
        r#"{"prompt": "undecodable", "chosen": "img/bad.png", "rejected": "img/0_l.png"}"#.to_string(),
    ];
    let data = write_data(&dir.join("data"), 2, &bad);
    std::fs::copy(dir.join("img/bad.png"), dir.join("data/img/bad.png")).unwrap();
    // Two steps of two pairs draw all three candidates, so the undecodable one is met.
    let o = train(&recipe(dir, &data, 2), &[]);
    assert_ok(&o);
    let err = stderr(&o);
    // Lines 3..8 of the file (1-based) are the bad ones, in that order.
    let want_reasons = [
        "not a pair object",
        "img/missing.png not found",
        "missing field `prompt`",
        "invalid type: integer `5`",
        "soft label must be in [0.5, 1] (the probability that the preferred image wins), got 7.5",
        "cannot decode",
    ];
    let listed = read_jsonl(&dir.join("out/skipped_records.jsonl"));
    assert_eq!(listed.len(), want_reasons.len(), "{listed:?}");
    for (k, want) in want_reasons.iter().enumerate() {
        let line = 3 + k as u64;
        let entry = listed
            .iter()
            .find(|v| v["line"].as_u64() == Some(line))
            .unwrap_or_else(|| panic!("line {line} not listed: {listed:?}"));
        assert_eq!(entry["index"].as_u64(), Some(line - 1));
        assert!(entry["file"].as_str().unwrap().ends_with("pairs.jsonl"), "{entry}");
        let reason = entry["reason"].as_str().unwrap();
        assert!(reason.contains(want), "line {line}: {reason}");
        assert!(
            err.contains(&format!("pairs.jsonl: record {} (line {line}): ", line - 1)),
            "line {line} not named on stderr: {err}"
        );
    }
    let summary: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(summary["records_skipped"], 6);
    assert_eq!(summary["pairs_used"], 2);
    assert!(err.contains("used 2 pairs, skipped 6 records"), "{err}");
}

#[test]
fn train_on_byte_order_marked_jsonl_uses_every_pair() {
    let tmp = tempfile::tempdir().unwrap();
    let data = write_data(&tmp.path().join("data"), 2, &[]);
    let text = std::fs::read_to_string(&data).unwrap();
    std::fs::write(&data, format!("\u{feff}{text}")).unwrap();
    let o = train(&recipe(tmp.path(), &data, 1), &[]);
    assert_ok(&o);
    let summary: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        (summary["pairs_used"].as_u64(), summary["records_skipped"].as_u64()),
        (Some(2), Some(0))
    );
    assert_eq!(
        std::fs::read_to_string(tmp.path().join("out/skipped_records.jsonl")).unwrap(),
        ""
    );
}

#[test]
fn no_usable_pairs_says_how_many_were_skipped_and_why() {
    let tmp = tempfile::tempdir().unwrap();
    let lines = [
        r#"{"prompt": "a", "chosen": "img/x.png", "rejected": "img/y.png"}"#.to_string(),
        "{".to_string(),
    ];
    let data = write_data(&tmp.path().join("data"), 0, &lines);
    let o = train(&recipe(tmp.path(), &data, 1), &[]);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(
        err.contains("no usable preference pairs: all 2 record(s) were skipped"),
        "{err}"
    );
    assert!(
        err.contains("img/x.png not found") && err.contains("(line 2): not a pair object"),
        "{err}"
    );
}

#[test]
fn resume_on_an_empty_output_folder_is_an_error_naming_it() {
    let tmp = tempfile::tempdir().unwrap();
    let data = write_data(&tmp.path().join("data"), 2, &[]);
    let r = recipe(tmp.path(), &data, 2);
    let o = train(&r, &["--resume"]);
    assert!(!o.status.success());
    let out = tmp.path().join("out");
    let err = stderr(&o);
    assert!(
        err.contains(&format!("{}: no checkpoint to resume from", out.display())),
        "{err}"
    );
    assert!(!out.join("metrics.jsonl").exists(), "nothing was trained");
}

#[test]
fn resume_if_possible_starts_fresh_then_continues_without_repeating_steps() {
    let tmp = tempfile::tempdir().unwrap();
    let data = write_data(&tmp.path().join("data"), 2, &[]);
    let r = recipe(tmp.path(), &data, 3);
    let out = tmp.path().join("out");
    assert_ok(&train(&r, &["--resume-if-possible", "--max-steps-this-run", "2"]));
    assert_eq!(steps_logged(&out), [1, 2]);
    // A fresh start over the checkpoint would repeat steps 1 and 2: refused.
    let o = train(&r, &[]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("pass --resume to continue it"), "{}", stderr(&o));
    assert_ok(&train(&r, &["--resume-if-possible"]));
    assert_eq!(steps_logged(&out), [1, 2, 3]);
}

#[test]
fn resume_refuses_a_changed_method_unless_allowed_and_then_records_it() {
    let tmp = tempfile::tempdir().unwrap();
    let data = write_data(&tmp.path().join("data"), 2, &[]);
    let r = recipe(tmp.path(), &data, 2);
    let out = tmp.path().join("out");
    assert_ok(&train(&r, &["--max-steps-this-run", "1"]));
    let recipe_before = std::fs::read_to_string(out.join("recipe.toml")).unwrap();

    let mapo = ["--resume", "--set", "train.method=mapo"];
    let o = train(&r, &mapo);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(
        err.contains("train.method") && err.contains(r#""dpo" -> "mapo""#),
        "{err}"
    );
    assert!(err.contains("--allow-recipe-change"), "{err}");
    assert_eq!(
        std::fs::read_to_string(out.join("recipe.toml")).unwrap(),
        recipe_before,
        "a refused resume leaves recipe.toml alone"
    );

    // More steps and another checkpoint interval change nothing a step computes.
    assert_ok(&train(
        &r,
        &[
            "--resume",
            "--set",
            "train.steps=3",
            "--set",
            "output.checkpoint_every=1",
            "--max-steps-this-run",
            "1",
        ],
    ));

    let o = train(
        &r,
        &[&mapo[..], &["--set", "train.steps=3", "--allow-recipe-change"]].concat(),
    );
    assert_ok(&o);
    let events: Vec<serde_json::Value> = read_jsonl(&out.join("metrics.jsonl"))
        .into_iter()
        .filter(|v| v["event"] == "recipe_change")
        .collect();
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["step"], 2);
    let changes = events[0]["changes"].as_array().unwrap();
    assert_eq!(changes.len(), 1, "{changes:?}");
    assert_eq!(
        (&changes[0]["key"], &changes[0]["old"], &changes[0]["new"]),
        (&"train.method".into(), &"dpo".into(), &"mapo".into())
    );
    assert!(stderr(&o).contains("recipe changed since the checkpoint at step 2"));
    assert_eq!(steps_logged(&out), [1, 2, 3]);
}

#[test]
fn stale_temporary_checkpoint_folders_are_removed_on_start() {
    let tmp = tempfile::tempdir().unwrap();
    let data = write_data(&tmp.path().join("data"), 2, &[]);
    let r = recipe(tmp.path(), &data, 1);
    let stale = tmp.path().join("out/checkpoints/.tmp-step-00000001-99999");
    std::fs::create_dir_all(&stale).unwrap();
    std::fs::write(stale.join("params.safetensors"), b"half written").unwrap();
    let o = train(&r, &[]);
    assert_ok(&o);
    assert!(!stale.exists(), "stale folder kept");
    assert!(
        stderr(&o).contains(&format!("removed {}", stale.display())),
        "{}",
        stderr(&o)
    );
}

#[test]
fn recipe_changes_ignore_steps_and_output_but_not_the_objective() {
    let old = "[train]\nmethod = \"dpo\"\nsteps = 10\nlr = 1e-5\n[output]\ndir = \"a\"\n[lora]\nrank = 4\n";
    let new = "[train]\nmethod = \"dpo\"\nsteps = 20\nlr = 1e-5\nbeta = 500.0\n[output]\ndir = \"b\"\nvalidation_every = 5\n[lora]\nrank = 8\n";
    let changes = recipe_changes(old, Path::new("recipe.toml"), new).unwrap();
    let described: Vec<String> = changes.iter().map(|c| c.describe()).collect();
    assert_eq!(described, ["lora.rank: 4 -> 8", "train.beta: (unset) -> 500.0"]);
    assert!(recipe_changes(old, Path::new("recipe.toml"), old).unwrap().is_empty());
}
