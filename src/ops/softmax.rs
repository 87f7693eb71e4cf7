//! Softmax over the last dimension; the backward pass `dx = y * (dy - sum(dy * y))` is its own
//! kernel.

#[cfg(feature = "wgpu")]
use candle_core::CpuStorage;
#[cfg(any(feature = "cuda", feature = "cuda-emu"))]
use candle_core::DType;
use candle_core::{Layout, Result, Shape, Tensor, D};

use super::cpu::{for_each_chunk, sum_zip, Real, PAR_MIN_ELEMENTS};
#[cfg(any(feature = "cuda", feature = "cuda-emu"))]
use super::cuda::Job;
use super::kernel::{Fused, Kernel};

/// The composed reference. The subtracted maximum is detached: it cancels out of the result, so
/// its gradient is zero.
pub fn reference(xs: &Tensor) -> Result<Tensor> {
    let max = xs.max_keepdim(D::Minus1)?.detach();
    let e = xs.broadcast_sub(&max)?.exp()?;
    let sum = e.sum_keepdim(D::Minus1)?;
    e.broadcast_div(&sum)
}

/// Softmax of `xs` over its last dimension: the fused kernel on CPU, else the reference.
pub fn softmax(xs: &Tensor) -> Result<Tensor> {
    if !super::use_kernel(super::KernelOp::Softmax, &[xs]) || xs.rank() == 0 {
        return reference(xs);
    }
    xs.contiguous()?.apply_op1(Fused(Softmax))
}

/// `dx = y * (dy - sum(dy * y))` for one row, written into `dy`.
pub(crate) fn softmax_grad_row<T: Real>(y: &[T], dy: &mut [T]) {
    // In lanes: a single running sum is bound by the latency of each addition.
    let dot = T::from_f64(sum_zip(y, dy, |a, b| a * b));
    for (d, &p) in dy.iter_mut().zip(y) {
        *d = p * (*d - dot);
    }
}

/// Row length `d` of a layout (its last dimension, at least 1).
fn row_len(l: &Layout) -> usize {
    l.dims().last().copied().unwrap_or(1).max(1)
}

struct Softmax;

impl Kernel<1> for Softmax {
    const NAME: &'static str = "softmax";

    /// Row length `d` and elements.
    type Call = (usize, usize);

    fn call(&self, [l]: [&Layout; 1]) -> Result<((usize, usize), Shape)> {
        Ok(((row_len(l), l.shape().elem_count()), l.shape().clone()))
    }

    fn cpu<T: Real>(&self, &(d, _): &(usize, usize), [x]: [&[T]; 1]) -> Result<Vec<T>> {
        let mut y = x.to_vec();
        let parallel = y.len() >= PAR_MIN_ELEMENTS;
        for_each_chunk(&mut y, d, parallel, |_, row| T::softmax_row(row));
        Ok(y)
    }

    #[cfg(feature = "wgpu")]
    fn wgpu(&self, &(d, _): &(usize, usize), [x]: [&[f32]; 1]) -> crate::Result<CpuStorage> {
        super::wgpu::softmax::run(Self::NAME, d, x, None)
    }

    #[cfg(any(feature = "cuda", feature = "cuda-emu"))]
    fn cuda_job<I>(&self, &(d, n): &(usize, usize), dtype: DType, [x]: [I; 1]) -> crate::Result<Job<I>> {
        super::cuda::softmax::job(Self::NAME, dtype, d, n, x, None)
    }

    fn backward(&self, _: [&Tensor; 1], res: &Tensor, grad: &Tensor) -> Result<[Option<Tensor>; 1]> {
        Ok([Some(res.apply_op2_no_bwd(&grad.contiguous()?, &Fused(SoftmaxGrad))?)])
    }
}

/// The backward kernel: inputs `(y, dy)`.
struct SoftmaxGrad;

impl Kernel<2> for SoftmaxGrad {
    const NAME: &'static str = "softmax-grad";

    /// Row length `d` and elements.
    type Call = (usize, usize);

    fn call(&self, [yl, dl]: [&Layout; 2]) -> Result<((usize, usize), Shape)> {
        if yl.shape() != dl.shape() {
            candle_core::bail!("softmax-grad: output {:?} but gradient {:?}", yl.dims(), dl.dims());
        }
        Ok(((row_len(yl), yl.shape().elem_count()), yl.shape().clone()))
    }

    fn cpu<T: Real>(&self, &(d, _): &(usize, usize), [y, dy]: [&[T]; 2]) -> Result<Vec<T>> {
        let mut dx = dy.to_vec();
        let parallel = dx.len() >= PAR_MIN_ELEMENTS;
        for_each_chunk(&mut dx, d, parallel, |r, g| softmax_grad_row(&y[r * d..(r + 1) * d], g));
        Ok(dx)
    }

    #[cfg(feature = "wgpu")]
    fn wgpu(&self, &(d, _): &(usize, usize), [y, dy]: [&[f32]; 2]) -> crate::Result<CpuStorage> {
        super::wgpu::softmax::run(Self::NAME, d, y, Some(dy))
    }

    #[cfg(any(feature = "cuda", feature = "cuda-emu"))]
    fn cuda_job<I>(&self, &(d, n): &(usize, usize), dtype: DType, [y, dy]: [I; 2]) -> crate::Result<Job<I>> {
        super::cuda::softmax::job(Self::NAME, dtype, d, n, y, Some(dy))
    }
}
