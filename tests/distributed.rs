//! Data-parallel training (issue 17): the launchers' variables (torchrun's rendezvous port and
//! each rank's GPU too), the refusal of launches this build cannot serve, and, with the `mpi` feature and OpenMPI's `mpirun`, runs of two processes
//! that equal one process taking the whole global batch, interrupted and resumed too.
//!
//! Without the feature the same equality is checked in one process: a micro-batch of four pairs
//! against two accumulated micro-batches of two, which takes the same pairs with the same draws.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use candle_core::{Device, Tensor};
use common::pairs::{recipe_for, write_pairs};
use common::*;
use diffalign::device::DeviceSpec;
use diffalign::dist::rendezvous::Endpoint;
use diffalign::dist::{Comm, Launch, Launcher};

fn env_of<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
    move |k| vars.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())
}

/// Variables, and the launcher, rank, world size and local rank they mean.
type Case<'a> = (&'a [(&'a str, &'a str)], Launcher, usize, usize, usize);

#[test]
fn each_launcher_is_recognised_from_its_variables() {
    let cases: [Case; 6] = [
        (&[], Launcher::Alone, 0, 1, 0),
        (
            &[
                ("OMPI_COMM_WORLD_RANK", "1"),
                ("OMPI_COMM_WORLD_SIZE", "4"),
                ("OMPI_COMM_WORLD_LOCAL_RANK", "1"),
                // mpirun inside a Slurm allocation: OpenMPI's own variables win.
                ("SLURM_PROCID", "0"),
                ("SLURM_NTASKS", "1"),
            ],
            Launcher::OpenMpi,
            1,
            4,
            1,
        ),
        (
            &[("PMI_RANK", "2"), ("PMI_SIZE", "3"), ("MPI_LOCALRANKID", "0")],
            Launcher::Mpich,
            2,
            3,
            0,
        ),
        (
            &[
                ("SLURM_PROCID", "5"),
                ("SLURM_NTASKS", "16"),
                ("SLURM_STEP_NUM_TASKS", "8"),
                ("SLURM_LOCALID", "1"),
            ],
            Launcher::Slurm,
            5,
            8,
            1,
        ),
        (
            &[("SLURM_PROCID", "0"), ("SLURM_NTASKS", "2")],
            Launcher::Slurm,
            0,
            2,
            0,
        ),
        (
            &[
                ("RANK", "3"),
                ("WORLD_SIZE", "4"),
                ("LOCAL_RANK", "3"),
                ("MASTER_ADDR", "10.0.0.1"),
                ("MASTER_PORT", "29500"),
            ],
            Launcher::Torchrun,
            3,
            4,
            3,
        ),
    ];
    for (vars, launcher, rank, size, local) in cases {
        let l = Launch::from_env(env_of(vars)).unwrap();
        assert_eq!(
            (l.launcher, l.rank, l.world_size, l.local_rank),
            (launcher, rank, size, local),
            "{vars:?}"
        );
    }
    let torchrun = Launch::from_env(env_of(&[
        ("RANK", "0"),
        ("WORLD_SIZE", "2"),
        ("MASTER_ADDR", "node1"),
        ("MASTER_PORT", "29500"),
    ]))
    .unwrap();
    assert_eq!(torchrun.master.as_deref(), Some("node1:29500"));
    // torchrun's own store holds MASTER_PORT: the NCCL id goes through the port above it.
    let at = |host: &str, port| {
        Some(Endpoint {
            host: host.into(),
            port,
        })
    };
    assert_eq!(torchrun.rendezvous, at("node1", 29501));
    let chosen = Launch::from_env(env_of(&[
        ("RANK", "1"),
        ("WORLD_SIZE", "2"),
        ("MASTER_ADDR", "10.0.0.1"),
        ("MASTER_PORT", "29500"),
        ("DIFFALIGN_RENDEZVOUS_PORT", "40000"),
    ]))
    .unwrap();
    assert_eq!(chosen.rendezvous, at("10.0.0.1", 40000));
    // Only torchrun's processes rendezvous through MASTER_ADDR.
    let mpi = Launch::from_env(env_of(&[
        ("OMPI_COMM_WORLD_RANK", "0"),
        ("OMPI_COMM_WORLD_SIZE", "2"),
        ("MASTER_ADDR", "node1"),
        ("MASTER_PORT", "29500"),
    ]))
    .unwrap();
    assert_eq!((mpi.master, mpi.rendezvous), (None, None));
}

#[test]
fn each_rank_takes_the_gpu_of_its_local_rank() {
    let l = Launch::from_env(env_of(&[("RANK", "5"), ("WORLD_SIZE", "8"), ("LOCAL_RANK", "1")])).unwrap();
    assert_eq!(l.rank_device(DeviceSpec::Cuda(0)), DeviceSpec::Cuda(1));
    assert_eq!(l.rank_device(DeviceSpec::Cuda(2)), DeviceSpec::Cuda(3));
    assert_eq!(l.rank_device(DeviceSpec::Cpu), DeviceSpec::Cpu);
    assert_eq!(Launch::alone().rank_device(DeviceSpec::Cuda(0)), DeviceSpec::Cuda(0));
}

#[test]
fn bad_rendezvous_ports_are_errors_naming_the_variable() {
    let torchrun = |port: &'static str, chosen: Option<&'static str>| {
        let mut vars = vec![
            ("RANK", "0"),
            ("WORLD_SIZE", "2"),
            ("MASTER_ADDR", "node1"),
            ("MASTER_PORT", port),
        ];
        vars.extend(chosen.map(|c| ("DIFFALIGN_RENDEZVOUS_PORT", c)));
        Launch::from_env(env_of(&vars)).unwrap_err().to_string()
    };
    let e = torchrun("65535", None);
    assert!(
        e.contains("MASTER_PORT") && e.contains("DIFFALIGN_RENDEZVOUS_PORT"),
        "{e}"
    );
    let e = torchrun("port", None);
    assert!(e.contains("MASTER_PORT") && e.contains("\"port\""), "{e}");
    let e = torchrun("29500", Some("70000"));
    assert!(
        e.contains("DIFFALIGN_RENDEZVOUS_PORT") && e.contains("\"70000\""),
        "{e}"
    );
}

#[test]
fn bad_launcher_variables_are_errors_naming_them() {
    let e = Launch::from_env(env_of(&[("OMPI_COMM_WORLD_RANK", "x"), ("OMPI_COMM_WORLD_SIZE", "2")]))
        .unwrap_err()
        .to_string();
    assert!(e.contains("OMPI_COMM_WORLD_RANK") && e.contains("\"x\""), "{e}");
    let e = Launch::from_env(env_of(&[("RANK", "2"), ("WORLD_SIZE", "2")]))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("RANK") && e.contains("WORLD_SIZE") && e.contains("rank 2"),
        "{e}"
    );
}

#[test]
fn a_world_of_one_on_the_cpu_connects_without_a_library() {
    let launch = Launch::from_env(env_of(&[("RANK", "0"), ("WORLD_SIZE", "1")])).unwrap();
    let one = Comm::connect(&launch, &Device::Cpu).unwrap();
    assert_eq!((one.rank(), one.size(), one.is_main()), (0, 1, true));
    let mut sums = [1.5f64, -2.0];
    one.sum_f64(&mut sums);
    assert_eq!(sums, [1.5, -2.0]);
    assert_eq!(one.all_gather(&vec![3u32]).unwrap(), vec![vec![3u32]]);
}

#[test]
fn a_torchrun_world_on_the_cpu_is_refused_saying_why() {
    let launch = Launch::from_env(env_of(&[
        ("RANK", "0"),
        ("WORLD_SIZE", "2"),
        ("MASTER_ADDR", "127.0.0.1"),
        ("MASTER_PORT", "29500"),
    ]))
    .unwrap();
    let e = Comm::connect(&launch, &Device::Cpu).unwrap_err().to_string();
    if cfg!(feature = "nccl") {
        assert!(e.contains("rank 0 of 2") && e.contains("--device cuda"), "{e}");
    } else {
        assert!(
            e.contains("torchrun") && e.contains("--features nccl") && e.contains("mpirun"),
            "{e}"
        );
    }
}

#[cfg(not(feature = "mpi"))]
#[test]
fn an_mpirun_launch_without_the_mpi_feature_says_how_to_build() {
    let o = Command::new(env!("CARGO_BIN_EXE_diffalign"))
        .args(["train", "no-such-recipe.toml"])
        .env("OMPI_COMM_WORLD_RANK", "0")
        .env("OMPI_COMM_WORLD_SIZE", "2")
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(e.contains("rank 0 of 2") && e.contains("--features mpi"), "{e}");
}

#[cfg(not(feature = "nccl"))]
#[test]
fn a_torchrun_launch_without_the_nccl_feature_says_how_to_build() {
    let o = Command::new(env!("CARGO_BIN_EXE_diffalign"))
        .args(["train", "no-such-recipe.toml"])
        .envs([
            ("RANK", "1"),
            ("WORLD_SIZE", "2"),
            ("LOCAL_RANK", "1"),
            ("MASTER_ADDR", "127.0.0.1"),
            ("MASTER_PORT", "29500"),
        ])
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(e.contains("rank 1 of 2") && e.contains("--features nccl"), "{e}");
}

// ----------------------------------------------------------------------------------------------
// Runs that must equal one another.

/// Per step, the logged loss.
fn losses(out: &Path) -> Vec<(u64, f64)> {
    read_jsonl(&out.join("metrics.jsonl"))
        .iter()
        .filter(|v| v.get("event").is_none())
        .map(|v| (v["step"].as_u64().unwrap(), v["loss"].as_f64().unwrap()))
        .collect()
}

/// The two runs' per-step losses and LoRA tensors agree within 1e-5 relative (a tensor's
/// difference relative to its largest element); the skipped records are the same.
fn assert_same_run(what: &str, a: &Path, b: &Path) {
    let (la, lb) = (losses(a), losses(b));
    assert_eq!(la.len(), lb.len(), "{what}: steps logged");
    assert!(!la.is_empty(), "{what}: no step logged");
    for ((sa, x), (sb, y)) in la.iter().zip(&lb) {
        assert_eq!(sa, sb, "{what}");
        let rel = (x - y).abs() / x.abs().max(1e-12);
        assert!(
            rel <= 1e-5,
            "{what}: step {sa}: loss {x} against {y} ({rel:e} relative)"
        );
    }
    let file = "pytorch_lora_weights.safetensors";
    let (wa, wb): (HashMap<String, Tensor>, HashMap<String, Tensor>) = (load(&a.join(file)), load(&b.join(file)));
    assert_eq!(wa.len(), wb.len(), "{what}: LoRA tensors");
    let mut moved = 0;
    for (k, t) in &wa {
        let (d, m) = (max_abs_diff(t, &wb[k]), max_abs(t));
        assert!(
            d <= 1e-5 * m.max(1e-12),
            "{what}: {k}: differs by {d} (largest element {m})"
        );
        moved += usize::from(m > 0.0);
    }
    assert!(moved > 0, "{what}: every LoRA tensor is zero");
    let skipped = |d: &Path| std::fs::read_to_string(d.join("skipped_records.jsonl")).unwrap_or_default();
    assert_eq!(skipped(a), skipped(b), "{what}: skipped records");
}

/// Seven good pairs in `dir/data` and an eighth whose preferred image is not a PNG (skipped,
/// the default policy).
fn pairs_with_a_bad_one(dir: &Path) -> PathBuf {
    let data = write_pairs(&dir.join("data"), 7, 11);
    std::fs::write(dir.join("data/img/bad.png"), b"not a png").unwrap();
    let mut text = std::fs::read_to_string(&data).unwrap();
    text.push_str(
        &serde_json::json!({
            "prompt": "a disc on a grey background",
            "chosen": "img/bad.png",
            "rejected": "img/0_l.png",
            "caption_chosen": "a red disc",
            "caption_rejected": "a blue disc",
            "soft_label": 0.7,
        })
        .to_string(),
    );
    text.push('\n');
    std::fs::write(&data, text).unwrap();
    data
}

/// A LoRA recipe for `method` on `data` in `dir` with `grad_accum = 2` and caption dropout;
/// [`RUN`] adds 4 steps and random flips, so every kind of draw is made.
fn lora_recipe(dir: &Path, data: &Path, method: &str) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    recipe_for(
        &shared_fixtures().join("sd15"),
        dir,
        data,
        method,
        "grad_accum = 2\nempty_caption_prob = 0.3\n\n[lora]\nrank = 4",
    )
}

/// The settings `recipe_for` fixes otherwise.
const RUN: [&str; 4] = ["--set", "train.steps=4", "--set", "train.random_flip=true"];

fn diffalign_train(recipe: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_diffalign"))
        .arg("train")
        .arg(recipe)
        .args(RUN)
        .args(args)
        .output()
        .unwrap()
}

fn assert_ok(what: &str, o: &Output) {
    assert!(
        o.status.success(),
        "{what} failed:\n{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn one_micro_batch_of_four_equals_two_accumulated_micro_batches_of_two() {
    for method in ["dpo", "smpo"] {
        let tmp = tempfile::tempdir().unwrap();
        let data = pairs_with_a_bad_one(tmp.path());
        let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
        let ra = lora_recipe(&a, &data, method);
        let rb = lora_recipe(&b, &data, method);
        let o = diffalign_train(&ra, &["--set", "train.batch_size=4", "--set", "train.grad_accum=1"]);
        assert_ok("batch 4", &o);
        let o = diffalign_train(&rb, &["--set", "train.batch_size=2", "--set", "train.grad_accum=2"]);
        assert_ok("batch 2, accumulated twice", &o);
        assert_same_run(method, &a.join("out"), &b.join("out"));
    }
}

#[cfg(feature = "mpi")]
mod mpi {
    use super::*;

    /// `mpirun -np 2 diffalign train RECIPE ARGS`, one compute thread per process.
    fn mpirun_train(recipe: &Path, args: &[&str]) -> Output {
        Command::new("mpirun")
            .args(["-np", "2", "--oversubscribe", "--bind-to", "none"])
            .arg(env!("CARGO_BIN_EXE_diffalign"))
            .arg("train")
            .arg(recipe)
            .args(RUN)
            .args(args)
            // CI runs as root in a container: allow it, and copy through memory without ptrace.
            .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
            .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
            .env("OMPI_MCA_btl_vader_single_copy_mechanism", "none")
            .env("RAYON_NUM_THREADS", "1")
            .output()
            .unwrap()
    }

    #[test]
    fn two_processes_equal_one_taking_the_global_batch_also_when_interrupted_and_resumed() {
        for method in ["dpo", "smpo"] {
            let tmp = tempfile::tempdir().unwrap();
            let (one, two, resumed) = (
                tmp.path().join("one"),
                tmp.path().join("two"),
                tmp.path().join("resumed"),
            );
            let data = pairs_with_a_bad_one(tmp.path());
            let r1 = lora_recipe(&one, &data, method);
            let r2 = lora_recipe(&two, &data, method);
            let r3 = lora_recipe(&resumed, &data, method);
            assert_ok("one process", &diffalign_train(&r1, &["--set", "train.batch_size=4"]));
            let o = mpirun_train(&r2, &["--set", "train.batch_size=2"]);
            assert_ok("mpirun -np 2", &o);
            assert_same_run(&format!("{method}, 2 processes"), &one.join("out"), &two.join("out"));
            // Only rank 0 prints the summary line.
            let summaries = String::from_utf8_lossy(&o.stdout).matches("\"pairs_used\"").count();
            assert_eq!(summaries, 1, "{}", String::from_utf8_lossy(&o.stdout));

            let first = ["--set", "train.batch_size=2", "--max-steps-this-run", "2"];
            assert_ok("mpirun -np 2, first 2 steps", &mpirun_train(&r3, &first));
            let alone = diffalign_train(&r3, &["--set", "train.batch_size=2", "--resume"]);
            let e = String::from_utf8_lossy(&alone.stderr);
            assert!(
                !alone.status.success() && e.contains("2 process(es)") && e.contains("this run has 1"),
                "{e}"
            );
            let o = mpirun_train(&r3, &["--set", "train.batch_size=2", "--resume"]);
            assert_ok("mpirun -np 2, resumed", &o);
            assert_same_run(
                &format!("{method}, 2 processes resumed"),
                &one.join("out"),
                &resumed.join("out"),
            );
        }
    }
}
