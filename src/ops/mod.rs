//! Custom ops for the hot paths of training and ReNO, each with a forward and a backward pass.
//!
//! Every op has a `reference` written in plain candle tensor ops: it is the spec, the test oracle
//! and the fallback. The fused kernels run where they exist (CPU tensors in f32 and f64; CUDA
//! tensors in f32, f16 and bf16 for the op families a [`KernelConfig`] turns on); other devices
//! and dtypes take the reference.
//!
//! Which kernels run is one [`KernelConfig`], built by the command line from `--device` and the
//! environment and put in force once by [`install`] ([`config`]): for CPU tensors, the CPU
//! kernels, or for f32 (in builds with the `wgpu` feature) the WGSL shaders of `kernels/wgsl/`
//! through `ops::wgpu`, or (with `cuda-emu`, for tests) the CUDA kernels of `kernels/cuda/` on a
//! CPU emulator; f64 keeps the CPU kernels. Tensors stay in CPU storage either way. CUDA tensors
//! take the CUDA kernels through each op's `cuda_fwd` (`ops::cuda`).
//!
//! - [`conv2d`]: implicit-GEMM (im2col) convolution with input and weight gradients.
//! - [`group_norm`] (optionally fused with SiLU) and [`layer_norm`]: one row-normalisation kernel.
//! - [`softmax`]: softmax over the last dimension.
//! - [`attention`]: scaled dot-product attention (with an optional additive mask) that
//!   recomputes the scores in its backward pass instead of keeping the attention matrix.
//! - [`mse`]: the per-sample mean squared error of the preference losses.
//! - [`linear`]: `x W^T + b` with a trainable weight and bias, gradients as single products.
//! - [`frozen`]: `x W^T` with a frozen weight, whose backward gives the input's gradient only.
//! - [`geglu`]: `a * gelu(b)` of the feed-forward blocks, keeping no `gelu(b)` for the backward.

pub mod attention;
pub mod config;
pub mod conv2d;
pub(crate) mod cpu;
#[cfg(any(feature = "cuda", feature = "cuda-emu"))]
pub mod cuda;
pub mod frozen;
pub mod geglu;
pub mod group_norm;
mod kernel;
mod lanes;
pub mod layer_norm;
pub mod linear;
pub mod mse;
pub(crate) mod row_norm;
pub mod softmax;
#[cfg(feature = "wgpu")]
pub mod wgpu;

use candle_core::{DType, Tensor};

pub use config::{
    backend, cuda_kernel_enabled, fused_enabled, install, installed, parse_cuda_kernels, Backend, KernelConfig,
    KernelOp,
};

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
/// one of f32, f64, bf16 or f16 (the half types computed in f32), or (with
/// [`cuda_kernel_enabled`]) all on one CUDA device in f32, f16 or bf16.
pub(crate) fn use_kernel(op: KernelOp, tensors: &[&Tensor]) -> bool {
    let Some(first) = tensors.first() else { return false };
    let dtype = first.dtype();
    if !fused_enabled() || tensors.iter().any(|t| t.dtype() != dtype) {
        return false;
    }
    let device = first.device();
    if device.is_cpu() {
        matches!(dtype, DType::F32 | DType::F64 | DType::BF16 | DType::F16)
            && tensors.iter().all(|t| t.device().is_cpu())
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
