//! Which kernels run, chosen once per process: the command line builds a [`KernelConfig`] from
//! its flags and environment, and [`install`] checks it (the backend is built and can run) and
//! puts it in force. The library reads no environment variable; until `install` is called the
//! default holds: the fused CPU kernels, no CUDA kernels.

use std::sync::atomic::{AtomicU8, Ordering};

use crate::device::DeviceSpec;
use crate::{Error, Result};

/// Who runs the fused kernels of f32 tensors in CPU storage: the CPU, a wgpu adapter, or the
/// CPU emulator of the CUDA kernels. (Tensors on a CUDA device take the CUDA kernels of
/// [`KernelConfig::cuda_ops`].)
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Backend {
    /// The multithreaded CPU kernels (the default).
    #[default]
    Cpu,
    /// The WGSL compute shaders on a wgpu adapter (builds with the `wgpu` feature).
    Wgpu,
    /// The CUDA kernels compiled as C++ and run on a CPU emulator (builds with the `cuda-emu`
    /// feature): slow, for testing the kernel sources without a GPU.
    CudaEmu,
}

impl Backend {
    const ALL: [Backend; 3] = [Backend::Cpu, Backend::Wgpu, Backend::CudaEmu];

    /// The name `DIFFALIGN_KERNELS` takes: `cpu`, `wgpu`, `cuda-emu`.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Cpu => "cpu",
            Backend::Wgpu => "wgpu",
            Backend::CudaEmu => "cuda-emu",
        }
    }

    /// Whether this build has the backend.
    pub fn is_built(self) -> bool {
        match self {
            Backend::Cpu => true,
            Backend::Wgpu => cfg!(feature = "wgpu"),
            Backend::CudaEmu => cfg!(feature = "cuda-emu"),
        }
    }
}

/// The op families of the fused kernels, as `DIFFALIGN_CUDA_KERNELS` names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelOp {
    /// `conv2d` and its gradients.
    Conv2d,
    /// `group_norm` (with and without SiLU).
    GroupNorm,
    /// `layer_norm`.
    LayerNorm,
    /// `softmax`.
    Softmax,
    /// `attention`, masked or not.
    Attention,
    /// `per_sample_mse`.
    Mse,
}

impl KernelOp {
    /// Every op family.
    pub const ALL: [KernelOp; 6] = [
        KernelOp::Conv2d,
        KernelOp::GroupNorm,
        KernelOp::LayerNorm,
        KernelOp::Softmax,
        KernelOp::Attention,
        KernelOp::Mse,
    ];

    /// The family's name in `DIFFALIGN_CUDA_KERNELS`.
    pub fn name(self) -> &'static str {
        match self {
            KernelOp::Conv2d => "conv2d",
            KernelOp::GroupNorm => "group_norm",
            KernelOp::LayerNorm => "layer_norm",
            KernelOp::Softmax => "softmax",
            KernelOp::Attention => "attention",
            KernelOp::Mse => "mse",
        }
    }

    /// The family's bit in the installed set.
    fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

/// The kernel choice of a process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelConfig {
    /// Who runs the fused kernels of CPU tensors.
    pub backend: Backend,
    /// Whether the fused kernels run at all (off: every op takes its composed reference, for
    /// benchmarks and A/B checks).
    pub fused: bool,
    /// The op families whose CUDA kernels run on tensors on a CUDA device (the others take
    /// candle's composed CUDA ops). Opt-in until they have passed their parity tests on a GPU.
    pub cuda_ops: Vec<KernelOp>,
}

impl Default for KernelConfig {
    fn default() -> Self {
        KernelConfig {
            backend: Backend::Cpu,
            fused: true,
            cuda_ops: Vec::new(),
        }
    }
}

impl KernelConfig {
    /// The configuration for `device` given the values of `DIFFALIGN_KERNELS` (`cpu`, `wgpu`,
    /// `cuda-emu`, or `reference` to turn the fused kernels off) and `DIFFALIGN_CUDA_KERNELS`
    /// (see [`parse_cuda_kernels`]); `--device wgpu` selects the wgpu backend. Unknown names
    /// are errors naming the variable.
    pub fn from_settings(device: DeviceSpec, kernels: Option<&str>, cuda_kernels: Option<&str>) -> Result<Self> {
        let mut config = KernelConfig::default();
        match kernels.map(str::trim) {
            None | Some("") => {}
            Some("reference") => config.fused = false,
            Some(name) => {
                config.backend = Backend::ALL.into_iter().find(|b| b.name() == name).ok_or_else(|| {
                    Error::input(
                        "DIFFALIGN_KERNELS",
                        format!("expected cpu, wgpu, cuda-emu or reference, got {name:?}"),
                    )
                })?;
            }
        }
        if device == DeviceSpec::Wgpu {
            config.backend = Backend::Wgpu;
        }
        if let Some(spec) = cuda_kernels {
            config.cuda_ops = parse_cuda_kernels(spec).map_err(|e| Error::input("DIFFALIGN_CUDA_KERNELS", e))?;
        }
        Ok(config)
    }

    /// Ok when this configuration can run: its backend is built, and for wgpu an adapter opens
    /// (the error names the problem).
    pub fn check(&self) -> Result<()> {
        let unavailable = |reason: &str| Error::Op {
            op: "kernels".into(),
            device: self.backend.name().into(),
            reason: reason.into(),
        };
        match self.backend {
            Backend::Cpu => Ok(()),
            Backend::Wgpu => {
                #[cfg(feature = "wgpu")]
                return super::wgpu::adapter_info().map(|_| ());
                #[cfg(not(feature = "wgpu"))]
                Err(unavailable(
                    "this build has no wgpu backend (rebuild with `--features wgpu`)",
                ))
            }
            Backend::CudaEmu if self.backend.is_built() => Ok(()),
            Backend::CudaEmu => Err(unavailable(
                "this build has no CUDA emulator (rebuild with `--features cuda-emu`)",
            )),
        }
    }
}

/// Reads a `DIFFALIGN_CUDA_KERNELS` value: `1` or `all` for every op family, `0` or nothing for
/// none, else a comma-separated list of names (`conv2d,group_norm`); an unknown name is an error
/// that lists the known ones.
pub fn parse_cuda_kernels(spec: &str) -> std::result::Result<Vec<KernelOp>, String> {
    match spec.trim() {
        "1" | "all" => return Ok(KernelOp::ALL.to_vec()),
        "0" | "" | "none" => return Ok(Vec::new()),
        _ => {}
    }
    spec.split(',')
        .map(str::trim)
        .filter(|name| !name.is_empty())
        .map(|name| {
            KernelOp::ALL.into_iter().find(|op| op.name() == name).ok_or_else(|| {
                let known: Vec<&str> = KernelOp::ALL.iter().map(|op| op.name()).collect();
                format!("unknown op {name:?} (known: {}, or 1/all, 0/none)", known.join(", "))
            })
        })
        .collect()
}

// The installed configuration, read on every op (so atomics, not a lock): the backend's index in
// `Backend::ALL`, the fused switch, and one bit per CUDA op family.
static BACKEND: AtomicU8 = AtomicU8::new(0);
static FUSED: AtomicU8 = AtomicU8::new(1);
static CUDA_OPS: AtomicU8 = AtomicU8::new(0);

/// Checks `config` ([`KernelConfig::check`]) and puts it in force for the whole process.
pub fn install(config: &KernelConfig) -> Result<()> {
    config.check()?;
    let index = Backend::ALL.iter().position(|&b| b == config.backend).unwrap_or(0);
    BACKEND.store(index as u8, Ordering::Relaxed);
    FUSED.store(u8::from(config.fused), Ordering::Relaxed);
    CUDA_OPS.store(
        config.cuda_ops.iter().fold(0, |bits, op| bits | op.bit()),
        Ordering::Relaxed,
    );
    Ok(())
}

/// The configuration in force.
pub fn installed() -> KernelConfig {
    KernelConfig {
        backend: backend(),
        fused: fused_enabled(),
        cuda_ops: KernelOp::ALL
            .into_iter()
            .filter(|&op| cuda_kernel_enabled(op))
            .collect(),
    }
}

/// The backend in force.
pub fn backend() -> Backend {
    Backend::ALL[usize::from(BACKEND.load(Ordering::Relaxed)).min(Backend::ALL.len() - 1)]
}

/// Whether the fused kernels are on.
pub fn fused_enabled() -> bool {
    FUSED.load(Ordering::Relaxed) == 1
}

/// Whether tensors on a CUDA device take the CUDA kernel of `op`.
pub fn cuda_kernel_enabled(op: KernelOp) -> bool {
    CUDA_OPS.load(Ordering::Relaxed) & op.bit() != 0
}
