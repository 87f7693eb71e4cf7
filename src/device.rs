//! Device and dtype choice.

use candle_core::{DType, Device};

use crate::{Error, Result};

/// Parses a dtype name as the CLI takes it: `f32`, `f16` (or `fp16`), `bf16`.
pub fn parse_dtype(s: &str) -> Result<DType> {
    match s.to_ascii_lowercase().as_str() {
        "f32" | "fp32" | "float32" => Ok(DType::F32),
        "f16" | "fp16" | "float16" => Ok(DType::F16),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        other => Err(Error::input(
            "--dtype",
            format!("expected one of f32, f16, bf16, got {other:?}"),
        )),
    }
}

/// Parses a device name: `cpu`, `cuda` / `cuda:N` where built with the `cuda` feature, or `wgpu`
/// where built with the `wgpu` feature. `wgpu` keeps tensors on the CPU (candle's `Device::Cpu`)
/// and switches the hot-op kernels of [`crate::ops`] to the wgpu adapter for the whole process.
pub fn parse_device(s: &str) -> Result<Device> {
    let s = s.to_ascii_lowercase();
    if s == "cpu" {
        return Ok(Device::Cpu);
    }
    if s == "wgpu" {
        if !cfg!(feature = "wgpu") {
            return Err(Error::input(
                "--device",
                "wgpu needs a build with the `wgpu` feature (cargo build --features wgpu)",
            ));
        }
        crate::ops::set_backend(crate::ops::Backend::Wgpu)
            .map_err(|e| Error::input("--device", format!("cannot use wgpu: {e}")))?;
        return Ok(Device::Cpu);
    }
    if let Some(rest) = s.strip_prefix("cuda") {
        let ordinal = match rest.strip_prefix(':') {
            Some(n) => n
                .parse::<usize>()
                .map_err(|_| Error::input("--device", format!("bad cuda ordinal in {s:?}")))?,
            None if rest.is_empty() => 0,
            None => {
                return Err(Error::input(
                    "--device",
                    format!("expected cpu, cuda[:N] or wgpu, got {s:?}"),
                ))
            }
        };
        return Device::new_cuda(ordinal).map_err(|e| Error::input("--device", format!("cannot use {s}: {e}")));
    }
    Err(Error::input(
        "--device",
        format!("expected cpu, cuda[:N] or wgpu, got {s:?}"),
    ))
}
