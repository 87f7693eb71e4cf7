//! Shared test helpers: fixture paths, tolerances, comparisons.
#![allow(dead_code)]

pub mod ops_check;
pub mod pairs;

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};

/// Absolute tolerance for f32 module outputs against the Python reference.
pub const MODULE_ATOL: f32 = 1e-4;
/// Tolerance on 8-bit images (in [0,1] units).
pub const IMAGE_ATOL: f32 = 2.0 / 255.0;

/// `../shared/fixtures`, next to the repository.
pub fn shared_fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures")
}

/// `tests/fixtures`, the project's own generated cases.
pub fn own_fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// The device the model-stack tests compute on: `DIFFALIGN_TEST_DEVICE` as `--device` takes it
/// (`cpu`, the default, or `cuda` / `cuda:N` in a build with the `cuda` feature). One device per
/// test binary: candle refuses to mix tensors of two `Device::new_cuda` calls.
pub fn device() -> Device {
    static DEVICE: std::sync::OnceLock<Device> = std::sync::OnceLock::new();
    DEVICE
        .get_or_init(|| {
            let name = std::env::var("DIFFALIGN_TEST_DEVICE").unwrap_or_else(|_| "cpu".into());
            name.parse::<diffalign::device::DeviceSpec>()
                .and_then(|spec| spec.device())
                .unwrap_or_else(|e| panic!("DIFFALIGN_TEST_DEVICE={name:?}: cannot create the device: {e}"))
        })
        .clone()
}

/// Default [`LoadOptions`](diffalign::weights::LoadOptions) with the weights on [`device()`].
pub fn load_options() -> diffalign::weights::LoadOptions {
    diffalign::weights::LoadOptions {
        device: device(),
        ..Default::default()
    }
}

/// Loads every tensor of a safetensors file onto the CPU.
pub fn load(path: &std::path::Path) -> std::collections::HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Loads every tensor of a safetensors file onto [`device()`] (model inputs).
pub fn load_on_device(path: &std::path::Path) -> std::collections::HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &device()).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The `__metadata__` map of a safetensors file.
pub fn metadata(path: &std::path::Path) -> std::collections::HashMap<String, String> {
    let bytes = std::fs::read(path).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    meta.metadata().clone().unwrap_or_default()
}

/// Largest absolute difference between two tensors of the same shape (as f32, on the CPU, so
/// either may live on [`device()`]).
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    let a = a.to_device(&Device::Cpu).unwrap().to_dtype(DType::F32).unwrap();
    let b = b.to_device(&Device::Cpu).unwrap().to_dtype(DType::F32).unwrap();
    max_abs(&(a - b).unwrap())
}

/// Largest element of an f32 CPU tensor in absolute value.
pub fn max_abs(t: &Tensor) -> f32 {
    t.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Asserts `got` matches `want` within `atol`, naming `what` on failure.
pub fn assert_close(what: &str, got: &Tensor, want: &Tensor, atol: f32) {
    let d = max_abs_diff(got, want);
    assert!(d <= atol, "{what}: max abs diff {d} > {atol}");
}

/// Backpropagates `sum(out * w)` for a fixed random `w` and asserts that every `Var` handed out
/// by `vb` received a nonzero gradient.
pub fn assert_every_var_has_gradient(out: &Tensor, vb: &diffalign::weights::VarBuilder) {
    let mut rng = diffalign::rng::Rng::new(1234);
    let w = rng
        .randn(out.dims(), out.device())
        .unwrap()
        .to_dtype(out.dtype())
        .unwrap();
    let loss = (out * w).unwrap().sum_all().unwrap();
    let grads = loss.backward().unwrap();
    let vars = vb.vars();
    assert!(!vars.is_empty(), "no trainable parameters");
    let missing: Vec<&String> = vars
        .iter()
        .filter(|(_, v)| {
            grads.get(v.as_tensor()).is_none_or(|g| {
                g.abs()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_dtype(DType::F32)
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap()
                    == 0.0
            })
        })
        .map(|(n, _)| n)
        .collect();
    assert!(
        missing.is_empty(),
        "{} of {} parameters without gradient: {missing:?}",
        missing.len(),
        vars.len()
    );
}

/// Copies a fixture folder recursively into `dst` (for tests that edit a pipeline).
pub fn copy_dir(src: &std::path::Path, dst: &std::path::Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        let to = dst.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to);
        } else {
            std::fs::copy(e.path(), &to).unwrap();
        }
    }
}

/// Every element of `t` as f64, flattened.
pub fn f64s(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// The JSON objects of a JSONL file, one per line.
pub fn read_jsonl(path: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}
