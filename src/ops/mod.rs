//! Custom ops for the hot paths of training and ReNO, each with a forward and a backward pass.
//!
//! Every op has a `reference` written in plain candle tensor ops: it is the spec, the test oracle
//! and the fallback. The fused kernels run where they exist (CPU tensors in f32 and f64; CUDA
//! tensors in f32, f16 and bf16 once [`set_cuda_kernels`] turns them on); other devices and
//! dtypes take the reference. [`set_fused`] (or `DIFFALIGN_KERNELS=reference` in the environment)
//! switches the fused kernels off everywhere, for benchmarks and A/B checks.
//!
//! For CPU tensors, [`backend`] picks who computes them: the CPU kernels, or for f32 (in builds
//! with the `wgpu` feature) the WGSL shaders of `kernels/wgsl/` through `ops::wgpu`, or (with
//! `cuda-emu`, for tests) the CUDA kernels of `kernels/cuda/` on a CPU emulator; f64 keeps the
//! CPU kernels. Tensors stay in CPU storage either way. [`set_backend`] (or
//! `DIFFALIGN_KERNELS=wgpu|cuda-emu`, or `--device wgpu`) switches it for the whole process. CUDA
//! tensors take the CUDA kernels through each op's `cuda_fwd` (`ops::cuda`).
//!
//! - [`conv2d`]: implicit-GEMM (im2col) convolution with input and weight gradients.
//! - [`group_norm`] (optionally fused with SiLU) and [`layer_norm`]: one row-normalisation kernel.
//! - [`softmax`]: softmax over the last dimension.
//! - [`attention`]: scaled dot-product attention (with an optional additive mask) that
//!   recomputes the scores in its backward pass instead of keeping the attention matrix.
//! - [`mse`]: the per-sample mean squared error of the preference losses.

pub mod attention;
pub mod conv2d;
pub(crate) mod cpu;
#[cfg(any(feature = "cuda", feature = "cuda-emu"))]
pub mod cuda;
pub mod group_norm;
mod lanes;
pub mod layer_norm;
pub mod mse;
pub(crate) mod row_norm;
pub mod softmax;
#[cfg(feature = "wgpu")]
pub mod wgpu;

use std::sync::atomic::{AtomicU8, Ordering};

use candle_core::{DType, Tensor};

use crate::Result;

// 0: not read yet, 1: fused kernels on, 2: off.
static FUSED: AtomicU8 = AtomicU8::new(0);

/// Turns the fused kernels on or off for the whole process (the references run when off).
pub fn set_fused(on: bool) {
    FUSED.store(if on { 1 } else { 2 }, Ordering::Relaxed);
}

/// Whether the fused kernels are on: by default yes, unless `DIFFALIGN_KERNELS=reference`.
pub fn fused_enabled() -> bool {
    match FUSED.load(Ordering::Relaxed) {
        0 => {
            let on = std::env::var("DIFFALIGN_KERNELS").map_or(true, |v| v != "reference");
            set_fused(on);
            on
        }
        v => v == 1,
    }
}

pub use crate::device::KernelBackend as Backend;

/// Selects the kernel backend for the whole process. [`Backend::Wgpu`] fails in builds without
/// the `wgpu` feature, and when no adapter can be opened (the error names the problem);
/// [`Backend::CudaEmu`] fails in builds without the `cuda-emu` feature.
pub fn set_backend(backend: Backend) -> Result<()> {
    match backend {
        Backend::Wgpu => wgpu_available()?,
        Backend::CudaEmu if !backend.is_built() => {
            return Err(crate::Error::Op {
                op: "kernels".into(),
                device: "cuda-emu".into(),
                reason: "this build has no CUDA emulator (rebuild with `--features cuda-emu`)".into(),
            })
        }
        _ => {}
    }
    crate::device::set_kernel_backend(backend);
    Ok(())
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

    /// The family's bit in [`CUDA_KERNELS`].
    fn bit(self) -> u8 {
        1 << (self as u8)
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
                format!(
                    "DIFFALIGN_CUDA_KERNELS: unknown op {name:?} (known: {}, or 1/all, 0/none)",
                    known.join(", ")
                )
            })
        })
        .collect()
}

/// The op families whose CUDA kernels are on, one bit each ([`KernelOp::bit`]); `UNREAD` until
/// set or read from the environment.
static CUDA_KERNELS: AtomicU8 = AtomicU8::new(UNREAD);
const UNREAD: u8 = 0x80;

/// Turns the CUDA kernels of `kernels/cuda/` on or off, all of them, for tensors on a CUDA device
/// (builds with the `cuda` feature). Off, those tensors take the composed references (candle's
/// CUDA ops).
pub fn set_cuda_kernels(on: bool) {
    set_cuda_kernel_ops(if on { &KernelOp::ALL } else { &[] });
}

/// Turns the CUDA kernels on for exactly the op families `ops`.
pub fn set_cuda_kernel_ops(ops: &[KernelOp]) {
    CUDA_KERNELS.store(ops.iter().fold(0, |bits, op| bits | op.bit()), Ordering::Relaxed);
}

/// Whether tensors on a CUDA device take the CUDA kernel of `op`: off unless turned on with
/// [`set_cuda_kernels`], [`set_cuda_kernel_ops`] or `DIFFALIGN_CUDA_KERNELS` (see
/// [`parse_cuda_kernels`]; a value it rejects turns none on, and the CLI reports it). They stay
/// opt-in until they have passed their parity tests on a GPU (the CPU emulator checks their
/// sources in CI).
pub fn cuda_kernel_enabled(op: KernelOp) -> bool {
    let mut bits = CUDA_KERNELS.load(Ordering::Relaxed);
    if bits == UNREAD {
        let ops = std::env::var("DIFFALIGN_CUDA_KERNELS")
            .ok()
            .and_then(|v| parse_cuda_kernels(&v).ok())
            .unwrap_or_default();
        set_cuda_kernel_ops(&ops);
        bits = CUDA_KERNELS.load(Ordering::Relaxed);
    }
    bits & op.bit() != 0
}

/// The kernel backend ([`crate::device::kernel_backend`]).
pub fn backend() -> Backend {
    crate::device::kernel_backend()
}

/// Ok when the wgpu backend can run: built with the feature and an adapter found.
fn wgpu_available() -> Result<()> {
    #[cfg(feature = "wgpu")]
    return wgpu::adapter_info().map(|_| ());
    #[cfg(not(feature = "wgpu"))]
    Err(crate::Error::Op {
        op: "kernels".into(),
        device: "wgpu".into(),
        reason: "this build has no wgpu backend (rebuild with `--features wgpu`)".into(),
    })
}

/// Inside a kernel's `cpu_fwd`: when the wgpu backend is on and `$storage` is f32, returns the
/// result of `$wgpu_call` (a `crate::Result` of the output storage) from the enclosing function.
macro_rules! on_wgpu {
    ($storage:expr, $wgpu_call:expr) => {
        #[cfg(feature = "wgpu")]
        if matches!($storage, candle_core::CpuStorage::F32(_)) && $crate::ops::backend() == $crate::ops::Backend::Wgpu {
            return $wgpu_call.map_err(candle_core::Error::wrap);
        }
    };
}
pub(crate) use on_wgpu;

/// Inside a kernel's `cpu_fwd`: when the CUDA emulator backend is on and `$storage` is f32, runs
/// the job `$job` (a `crate::Result` of a `cuda::Job` on host slices) on the emulator and returns
/// its output with the shape `$shape` from the enclosing function.
macro_rules! on_cuda_emu {
    ($storage:expr, $job:expr, $shape:expr) => {
        #[cfg(feature = "cuda-emu")]
        if matches!($storage, candle_core::CpuStorage::F32(_))
            && $crate::ops::backend() == $crate::ops::Backend::CudaEmu
        {
            return $job
                .and_then($crate::ops::cuda::emu::run)
                .map(|out| (out, $shape))
                .map_err(candle_core::Error::wrap);
        }
    };
}
pub(crate) use on_cuda_emu;

/// The dtype matmuls and convolutions on `t` run in: candle's CPU backend has no bf16 kernels
/// for them, so bf16 tensors on the CPU compute in f32 (and the result is cast back).
pub(crate) fn gemm_dtype(t: &Tensor) -> DType {
    if t.dtype() == DType::BF16 && t.device().is_cpu() {
        DType::F32
    } else {
        t.dtype()
    }
}

/// The dtype statistics and scores are computed in: f32 for half types, else the input's own.
pub(crate) fn compute_dtype(dtype: DType) -> DType {
    match dtype {
        DType::F16 | DType::BF16 => DType::F32,
        other => other,
    }
}

/// Whether the fused kernels of `op` can take these tensors: kernels on, and all on the CPU in
/// f32 or all in f64, or (with [`cuda_kernel_enabled`]) all on one CUDA device in f32, f16 or
/// bf16.
pub(crate) fn use_kernel(op: KernelOp, tensors: &[&Tensor]) -> bool {
    let Some(first) = tensors.first() else { return false };
    let dtype = first.dtype();
    if !fused_enabled() || tensors.iter().any(|t| t.dtype() != dtype) {
        return false;
    }
    let device = first.device();
    if device.is_cpu() {
        matches!(dtype, DType::F32 | DType::F64) && tensors.iter().all(|t| t.device().is_cpu())
    } else {
        device.is_cuda()
            && cfg!(feature = "cuda")
            && cuda_kernel_enabled(op)
            && matches!(dtype, DType::F32 | DType::F16 | DType::BF16)
            && tensors.iter().all(|t| t.device().same_device(device))
    }
}

/// `(max_abs_err, max_rel_err)` of `got` against `want`: the largest absolute difference, and
/// that divided by the largest magnitude of `want` (how kernels are judged against references).
pub fn compare(got: &Tensor, want: &Tensor) -> candle_core::Result<(f64, f64)> {
    if got.shape() != want.shape() {
        candle_core::bail!("compare: shapes {:?} and {:?} differ", got.dims(), want.dims());
    }
    let (g, w) = (got.to_dtype(DType::F64)?, want.to_dtype(DType::F64)?);
    let diff = (g - &w)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?;
    let scale = w.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?;
    Ok((diff, diff / scale.max(1e-30)))
}
