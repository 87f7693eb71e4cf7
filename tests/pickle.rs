//! PyTorch pickle checkpoints: files written by the real `torch.save` (zip and legacy formats,
//! `tests/fixtures/gen_pickle.py`) must read back to exactly the tensors torch holds, through every
//! loader that takes a file, and malicious pickles must be refused, naming the global.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{DType, Device, Tensor};
use common::*;
use diffalign::weights::pickle::read_pickle;
use diffalign::weights::single_file::{Architecture, SingleFile};
use diffalign::weights::{layout, LoraSource, WeightFile};
use diffalign::Error;

fn fixture(name: &str) -> PathBuf {
    own_fixtures().join("pickle").join(name)
}

/// Every tensor of a safetensors file, in its stored dtype.
fn expected(path: &Path) -> BTreeMap<String, Tensor> {
    let f = WeightFile::open(path).unwrap();
    f.names()
        .into_iter()
        .map(|n| {
            let t = f.load(&n, &Device::Cpu).unwrap();
            (n, t)
        })
        .collect()
}

/// Same names, dtypes, shapes and values (bit for bit, through f64).
fn assert_same(what: &str, got: &BTreeMap<String, Tensor>, want: &BTreeMap<String, Tensor>) {
    let names = |m: &BTreeMap<String, Tensor>| m.keys().cloned().collect::<Vec<_>>();
    assert_eq!(names(got), names(want), "{what}: names");
    for (name, w) in want {
        let g = &got[name];
        assert_eq!(g.dtype(), w.dtype(), "{what}: {name}: dtype");
        assert_eq!(g.dims(), w.dims(), "{what}: {name}: shape");
        let flat = |t: &Tensor| {
            t.to_dtype(DType::F64)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap()
        };
        assert_eq!(flat(g), flat(w), "{what}: {name}: values");
    }
}

#[test]
fn pickle_zip_and_legacy_match_torch() {
    let want = expected(&fixture("expected.safetensors"));
    for file in ["state_zip.pt", "state_legacy.pt", "big_endian.pt"] {
        assert_same(file, &read_pickle(&fixture(file)).unwrap(), &want);
    }
}

#[test]
fn pickle_views_are_rebuilt_from_their_storage() {
    // `base_t` (transpose), `base_strided` (offset 6, strides [6, 2]) and `expanded` (stride 0)
    // share `base`'s storage; each must equal the contiguous copy torch made.
    let got = read_pickle(&fixture("state_legacy.pt")).unwrap();
    let base = &got["base"];
    assert_eq!(max_abs_diff(&got["base_t"], &base.t().unwrap()), 0.0);
    let strided = base.narrow(0, 1, 3).unwrap().contiguous().unwrap();
    let cols: Vec<Tensor> = (0..3).map(|j| strided.narrow(1, 2 * j, 1).unwrap()).collect();
    assert_eq!(max_abs_diff(&got["base_strided"], &Tensor::cat(&cols, 1).unwrap()), 0.0);
}

#[test]
fn pickle_ckpt_steps_into_state_dict() {
    let want = expected(&fixture("nested.safetensors"));
    for file in ["nested_zip.ckpt", "nested_legacy.ckpt"] {
        let got = read_pickle(&fixture(file)).unwrap();
        assert_same(file, &got, &want);
    }
}

#[test]
fn pickle_malicious_is_refused_naming_the_global() {
    for (file, global) in [
        ("evil_system.pkl", "posix.system"),
        ("evil_exec.pkl", "builtins.exec"),
        ("evil_zip.pt", "posix.system"),
        ("evil_legacy.pt", "posix.system"),
    ] {
        let err = match WeightFile::open(&fixture(file)) {
            Err(e) => e,
            Ok(_) => panic!("{file}: a malicious pickle was accepted"),
        };
        let msg = err.to_string();
        assert!(
            matches!(&err, Error::UnsafePickle { global: g, .. } if g == global),
            "{file}: {msg}"
        );
        assert!(msg.contains(file) && msg.contains(&format!("`{global}`")), "{msg}");
    }
}

#[test]
fn pickle_deep_or_cyclic_is_an_error_not_a_crash() {
    for (file, why) in [
        ("deep.pkl", "not a torch.save file"),
        ("cyclic.pt", "nested deeper than"),
    ] {
        match WeightFile::open(&fixture(file)) {
            Err(e @ Error::BadPickle { .. }) => assert!(e.to_string().contains(why), "{e}"),
            Err(e) => panic!("{file}: unexpected error {e}"),
            Ok(_) => panic!("{file}: accepted"),
        }
    }
}

#[test]
fn pickle_truncated_is_an_error_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    for file in ["state_zip.pt", "state_legacy.pt"] {
        let bytes = std::fs::read(fixture(file)).unwrap();
        let cut = dir.path().join(file);
        std::fs::write(&cut, &bytes[..bytes.len() * 2 / 3]).unwrap();
        match WeightFile::open(&cut) {
            Err(e @ Error::BadPickle { .. }) => assert!(e.to_string().contains(file), "{e}"),
            Err(e) => panic!("{file}: unexpected error {e}"),
            Ok(_) => panic!("{file}: a truncated checkpoint was accepted"),
        }
    }
}

#[test]
fn single_file_ckpt_loads_like_safetensors() {
    let sf = SingleFile::open(&fixture("tiny_sd15.ckpt")).unwrap();
    assert_eq!(sf.architecture(), Architecture::Sd1);
    assert!(sf.skipped().iter().any(|(n, _)| n == "betas"));
    let want = expected(&fixture("tiny_sd15.safetensors"));
    let file = WeightFile::open(&fixture("tiny_sd15.ckpt")).unwrap();
    let got: BTreeMap<String, Tensor> = file
        .names()
        .into_iter()
        .map(|n| {
            let t = file.load(&n, &Device::Cpu).unwrap();
            (n, t)
        })
        .collect();
    assert_same("tiny_sd15.ckpt", &got, &want);
}

#[test]
fn lora_pt_reads_as_its_safetensors() {
    let adapters = |path: &Path| {
        LoraSource::from_file(path, "unet", false)
            .unwrap()
            .file_adapters(None, &Device::Cpu)
            .unwrap()
    };
    let got = adapters(&fixture("kohya.pt"));
    let want = adapters(&own_fixtures().join("lora").join("kohya.safetensors"));
    assert_eq!(got.len(), want.len());
    assert!(!got.is_empty());
    for ((m, g), (n, w)) in got.iter().zip(&want) {
        assert_eq!(m, n);
        assert_eq!(g.scale, w.scale, "{m}");
        assert_eq!(max_abs_diff(&g.a, &w.a), 0.0, "{m}");
        assert_eq!(max_abs_diff(&g.b, &w.b), 0.0, "{m}");
    }
}

#[test]
fn layout_reads_bin_weights_without_safetensors() {
    let root = fixture("bin_folder");
    for (sub, stem) in [
        ("unet", "diffusion_pytorch_model"),
        ("text_encoder", "model"),
        ("sharded", "model"),
    ] {
        let store = layout::open_weights(&root.join(sub), stem, None).unwrap();
        let want = expected(&root.join(format!("{sub}.expected.safetensors")));
        let got: BTreeMap<String, Tensor> = store
            .names()
            .into_iter()
            .map(|n| {
                let t = store.get(&n, None, want[&n].dtype(), &Device::Cpu).unwrap();
                (n, t)
            })
            .collect();
        assert_same(sub, &got, &want);
        store.check_all_used(|_| false).unwrap();
    }
}

#[test]
fn convert_writes_the_same_tensors_as_safetensors() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("state.safetensors");
    let o = Command::new(env!("CARGO_BIN_EXE_diffalign"))
        .args(["convert"])
        .arg(fixture("state_legacy.pt"))
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_same(
        "converted",
        &expected(&out),
        &expected(&fixture("expected.safetensors")),
    );

    let o = Command::new(env!("CARGO_BIN_EXE_diffalign"))
        .args(["convert"])
        .arg(fixture("evil_zip.pt"))
        .arg(dir.path().join("evil.safetensors"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && stderr.contains("posix.system"), "{stderr}");
    assert!(!dir.path().join("evil.safetensors").exists());
}
