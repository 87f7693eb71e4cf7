//! Device and dtype choice.

use std::sync::atomic::{AtomicU8, Ordering};

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

/// Who runs the fused kernels of f32 tensors in CPU storage (`crate::ops`): the CPU, a wgpu
/// adapter, or the CPU emulator of the CUDA kernels. (Tensors on a CUDA device take the CUDA
/// kernels, see `crate::ops::set_cuda_kernels`.)
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelBackend {
    /// The multithreaded CPU kernels (the default).
    Cpu,
    /// The WGSL compute shaders on a wgpu adapter (builds with the `wgpu` feature).
    Wgpu,
    /// The CUDA kernels compiled as C++ and run on a CPU emulator (builds with the `cuda-emu`
    /// feature): slow, for testing the kernel sources without a GPU.
    CudaEmu,
}

impl KernelBackend {
    /// The name `DIFFALIGN_KERNELS` takes: `cpu`, `wgpu`, `cuda-emu`.
    pub fn name(self) -> &'static str {
        match self {
            KernelBackend::Cpu => "cpu",
            KernelBackend::Wgpu => "wgpu",
            KernelBackend::CudaEmu => "cuda-emu",
        }
    }

    /// Whether this build has the backend.
    pub fn is_built(self) -> bool {
        match self {
            KernelBackend::Cpu => true,
            KernelBackend::Wgpu => cfg!(feature = "wgpu"),
            KernelBackend::CudaEmu => cfg!(feature = "cuda-emu"),
        }
    }
}

// 0: not read yet, else 1 + the index in ALL_BACKENDS.
static KERNEL_BACKEND: AtomicU8 = AtomicU8::new(0);

const ALL_BACKENDS: [KernelBackend; 3] = [KernelBackend::Cpu, KernelBackend::Wgpu, KernelBackend::CudaEmu];

/// Selects the kernel backend for the whole process, unchecked (`crate::ops::set_backend`
/// checks that it can run first).
pub fn set_kernel_backend(backend: KernelBackend) {
    let index = ALL_BACKENDS.iter().position(|&b| b == backend).unwrap_or(0);
    KERNEL_BACKEND.store(index as u8 + 1, Ordering::Relaxed);
}

/// The kernel backend: [`KernelBackend::Cpu`] unless set, or named by `DIFFALIGN_KERNELS`
/// (`wgpu`, `cuda-emu`) in the environment. A backend this build lacks warns once and stays on
/// the CPU; a missing wgpu adapter surfaces as the error of the first op.
pub fn kernel_backend() -> KernelBackend {
    match KERNEL_BACKEND.load(Ordering::Relaxed) {
        0 => {
            let wanted = std::env::var("DIFFALIGN_KERNELS")
                .ok()
                .and_then(|v| ALL_BACKENDS.into_iter().find(|b| b.name() == v));
            let b = match wanted {
                Some(b) if !b.is_built() => {
                    eprintln!(
                        "warning: DIFFALIGN_KERNELS={} ignored: built without the `{}` feature",
                        b.name(),
                        b.name()
                    );
                    KernelBackend::Cpu
                }
                Some(b) => b,
                None => KernelBackend::Cpu,
            };
            set_kernel_backend(b);
            b
        }
        v => ALL_BACKENDS[usize::from(v - 1).min(ALL_BACKENDS.len() - 1)],
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
        // A missing adapter surfaces as the first kernel's error, which names the problem.
        set_kernel_backend(KernelBackend::Wgpu);
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
