//! Device and dtype choice: the names the command line takes, parsed once into types.

use std::fmt;
use std::str::FromStr;

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

/// The processor's model name (`/proc/cpuinfo` on Linux; the architecture elsewhere), for
/// benchmark lines.
pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, name)| name.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string())
}

/// The widest vector instruction set this processor offers the CPU kernels, detected at run
/// time: `avx512` (with `+bf16` when it has avx512_bf16), `avx2`, `neon` or `scalar`.
pub fn cpu_isa() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            return if std::arch::is_x86_feature_detected!("avx512bf16") {
                "avx512+bf16"
            } else {
                "avx512"
            };
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            return "avx2";
        }
    }
    #[cfg(target_arch = "aarch64")]
    {
        return "neon";
    }
    #[allow(unreachable_code)]
    "scalar"
}

/// The dtype a recipe's `dtype` key defaults to: `f32`.
pub fn default_dtype_name() -> String {
    "f32".into()
}

/// Where tensors live and who runs the hot ops, as `--device` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceSpec {
    /// The CPU (the default).
    #[default]
    Cpu,
    /// CUDA device N (builds with the `cuda` feature).
    Cuda(usize),
    /// Tensors on the CPU, the hot-op kernels of `crate::ops` as WGSL shaders on a wgpu adapter
    /// (builds with the `wgpu` feature); the kernel choice is `crate::ops::KernelConfig`'s.
    Wgpu,
}

impl DeviceSpec {
    /// The candle device tensors are created on (`Device::Cpu` for [`DeviceSpec::Wgpu`]).
    pub fn device(self) -> Result<Device> {
        match self {
            DeviceSpec::Cpu | DeviceSpec::Wgpu => Ok(Device::Cpu),
            DeviceSpec::Cuda(n) => {
                Device::new_cuda(n).map_err(|e| Error::input("--device", format!("cannot use {self}: {e}")))
            }
        }
    }
}

impl FromStr for DeviceSpec {
    type Err = Error;

    /// `cpu`, `cuda` / `cuda:N` (builds with the `cuda` feature, checked when the device is
    /// opened), or `wgpu` (builds with the `wgpu` feature, checked here).
    fn from_str(s: &str) -> Result<Self> {
        let lower = s.to_ascii_lowercase();
        let bad = || Error::input("--device", format!("expected cpu, cuda[:N] or wgpu, got {s:?}"));
        match lower.as_str() {
            "cpu" => Ok(DeviceSpec::Cpu),
            "wgpu" if cfg!(feature = "wgpu") => Ok(DeviceSpec::Wgpu),
            "wgpu" => Err(Error::input(
                "--device",
                "wgpu needs a build with the `wgpu` feature (cargo build --features wgpu)",
            )),
            "cuda" => Ok(DeviceSpec::Cuda(0)),
            _ => match lower.strip_prefix("cuda:") {
                Some(n) => n
                    .parse()
                    .map(DeviceSpec::Cuda)
                    .map_err(|_| Error::input("--device", format!("bad cuda ordinal in {s:?}"))),
                None => Err(bad()),
            },
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Cpu => f.write_str("cpu"),
            DeviceSpec::Cuda(n) => write!(f, "cuda:{n}"),
            DeviceSpec::Wgpu => f.write_str("wgpu"),
        }
    }
}
