//! Softmax over the last dimension; the backward pass `dx = y * (dy - sum(dy * y))` is its own
//! kernel.

#[cfg(feature = "cuda-emu")]
use candle_core::DType;
#[cfg(feature = "cuda")]
use candle_core::{backend::BackendStorage, CudaStorage};
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor, D};

use super::cpu::{dispatch_real, for_each_chunk, slice, sum_zip, Real, PAR_MIN_ELEMENTS};

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
    xs.contiguous()?.apply_op1(Softmax)
}

/// `dx = y * (dy - sum(dy * y))` for one row, written into `dy`.
pub(crate) fn softmax_grad_row<T: Real>(y: &[T], dy: &mut [T]) {
    // In lanes: a single running sum is bound by the latency of each addition.
    let dot = T::from_f64(sum_zip(y, dy, |a, b| a * b));
    for (d, &p) in dy.iter_mut().zip(y) {
        *d = p * (*d - dot);
    }
}

struct Softmax;

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let d = l.dims().last().copied().unwrap_or(1).max(1);
        super::on_wgpu!(
            s,
            super::wgpu::softmax::run("softmax", d, slice(self.name(), s, l)?, None)
                .map(|out| (out, l.shape().clone()))
        );
        super::on_cuda_emu!(
            s,
            super::cuda::softmax::job(
                "softmax",
                DType::F32,
                d,
                l.shape().elem_count(),
                slice(self.name(), s, l)?,
                None
            ),
            l.shape().clone()
        );
        let out = dispatch_real!("softmax", s, T => {
            let mut y = slice::<T>("softmax", s, l)?.to_vec();
            let parallel = y.len() >= PAR_MIN_ELEMENTS;
            for_each_chunk(&mut y, d, parallel, |_, row| T::softmax_row(row));
            T::to_cpu_storage_owned(y)
        });
        Ok((out, l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        let d = l.dims().last().copied().unwrap_or(1).max(1);
        let job = super::cuda::softmax::job(self.name(), s.dtype(), d, l.shape().elem_count(), (s, l), None)
            .map_err(candle_core::Error::wrap)?;
        Ok((super::cuda::device::run(job)?, l.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(res.apply_op2_no_bwd(&grad.contiguous()?, &SoftmaxGrad)?))
    }
}

/// The backward kernel: inputs `(y, dy)`.
struct SoftmaxGrad;

impl CustomOp2 for SoftmaxGrad {
    fn name(&self) -> &'static str {
        "softmax-grad"
    }

    fn cpu_fwd(&self, ys: &CpuStorage, yl: &Layout, ds: &CpuStorage, dl: &Layout) -> Result<(CpuStorage, Shape)> {
        if yl.shape() != dl.shape() {
            candle_core::bail!("softmax-grad: output {:?} but gradient {:?}", yl.dims(), dl.dims());
        }
        let d = yl.dims().last().copied().unwrap_or(1).max(1);
        super::on_wgpu!(ys, {
            let (y, dy) = (slice(self.name(), ys, yl)?, slice(self.name(), ds, dl)?);
            super::wgpu::softmax::run("softmax-grad", d, y, Some(dy)).map(|out| (out, yl.shape().clone()))
        });
        super::on_cuda_emu!(
            ys,
            super::cuda::softmax::job(
                "softmax-grad",
                DType::F32,
                d,
                yl.shape().elem_count(),
                slice(self.name(), ys, yl)?,
                Some(slice(self.name(), ds, dl)?)
            ),
            yl.shape().clone()
        );
        let out = dispatch_real!("softmax-grad", ys, T => {
            let y: &[T] = slice("softmax-grad", ys, yl)?;
            let mut dx = slice::<T>("softmax-grad", ds, dl)?.to_vec();
            let parallel = dx.len() >= PAR_MIN_ELEMENTS;
            for_each_chunk(&mut dx, d, parallel, |r, g| softmax_grad_row(&y[r * d..(r + 1) * d], g));
            T::to_cpu_storage_owned(dx)
        });
        Ok((out, yl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, ys: &CudaStorage, yl: &Layout, ds: &CudaStorage, dl: &Layout) -> Result<(CudaStorage, Shape)> {
        if yl.shape() != dl.shape() {
            candle_core::bail!("softmax-grad: output {:?} but gradient {:?}", yl.dims(), dl.dims());
        }
        let d = yl.dims().last().copied().unwrap_or(1).max(1);
        let n = yl.shape().elem_count();
        let job = super::cuda::softmax::job(self.name(), ys.dtype(), d, n, (ys, yl), Some((ds, dl)))
            .map_err(candle_core::Error::wrap)?;
        Ok((super::cuda::device::run(job)?, yl.shape().clone()))
    }
}
