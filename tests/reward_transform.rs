//! The log-sigmoid-centred reward transform as ReNO's loss (`reno --reward-ref`), on the embedded
//! shapes-world model and reward.

mod common;

use std::process::Command;

use common::read_jsonl as jsonl;

#[test]
fn reno_with_a_centred_reward_logs_its_transformed_loss() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let r_ref = 25.0;
    let o = Command::new(env!("CARGO_BIN_EXE_diffalign"))
        .args([
            "reno",
            "--prompt",
            "a red circle on a blue background",
            "--iters",
            "3",
            "--steps",
            "2",
        ])
        .args(["--reward-ref", &format!("clipscore={r_ref}"), "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let lines = jsonl(&out.join("iterations.jsonl"));
    assert_eq!(lines.len(), 3);
    for line in &lines {
        let score = line["scores"]["clipscore"].as_f64().unwrap();
        let x = score - r_ref;
        let want = -(x.min(0.0) - (-x.abs()).exp().ln_1p());
        let got = line["reward_loss"].as_f64().unwrap();
        assert!((got - want).abs() <= 1e-4 * want.abs().max(1.0), "{line}: want {want}");
    }

    let o = Command::new(env!("CARGO_BIN_EXE_diffalign"))
        .args([
            "reno",
            "--prompt",
            "a red circle on a blue background",
            "--reward-ref",
            "pickscore=1",
            "--out",
        ])
        .arg(tmp.path().join("bad"))
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("--reward-ref pickscore"), "{err}");
}
