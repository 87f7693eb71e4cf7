//! The per-sample mean squared error of the preference losses: `mean((a - b)^2)` over every
//! dimension but the first, in one pass; its backward pass is one kernel too.

#[cfg(feature = "cuda-emu")]
use candle_core::DType;
#[cfg(feature = "cuda")]
use candle_core::{backend::BackendStorage, CudaStorage};
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::cpu::{dispatch_real, for_each_chunk2, slice, sum_zip, PAR_MIN_ELEMENTS};

/// The composed reference: `[B]` from `a`, `b` `[B, ...]`.
pub fn reference(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let n = a.dim(0)?;
    (a - b)?.sqr()?.reshape((n, ()))?.mean(1)
}

/// The per-sample MSE of `a` and `b` (same shape `[B, ...]`): the fused kernel on CPU, else the
/// reference.
pub fn per_sample_mse(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if a.shape() != b.shape() {
        candle_core::bail!("per_sample_mse: shapes {:?} and {:?} differ", a.dims(), b.dims());
    }
    if !super::use_kernel(super::KernelOp::Mse, &[a, b]) || a.rank() == 0 || a.elem_count() == 0 {
        return reference(a, b);
    }
    a.contiguous()?.apply_op2(&b.contiguous()?, Mse)
}

/// Rows `[B]` and elements per row of a `[B, ...]` layout.
fn rows(l: &Layout) -> (usize, usize) {
    let b = l.dims()[0];
    (b, l.shape().elem_count() / b.max(1))
}

struct Mse;

impl CustomOp2 for Mse {
    fn name(&self) -> &'static str {
        "per-sample-mse"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let op = self.name();
        let (b, m) = rows(l1);
        super::on_wgpu!(s1, {
            let (x, y) = (slice(op, s1, l1)?, slice(op, s2, l2)?);
            super::wgpu::mse::forward(m, x, y).map(|out| (out, Shape::from(b)))
        });
        super::on_cuda_emu!(
            s1,
            super::cuda::mse::forward(DType::F32, m, b * m, slice(op, s1, l1)?, slice(op, s2, l2)?),
            Shape::from(b)
        );
        let out = dispatch_real!(op, s1, T => {
            let (x, y): (&[T], &[T]) = (slice(op, s1, l1)?, slice(op, s2, l2)?);
            // Accumulated in f64: beta in the thousands amplifies the rounding of these means.
            // Rows are cut into pieces of at most PIECE elements so that even one sample keeps
            // every thread busy; the partial sums are added per row afterwards.
            const PIECE: usize = 8192;
            let k = m.div_ceil(PIECE).max(1);
            let piece = |p: usize| {
                let (r, j) = (p / k, p % k);
                let range = r * m + j * m / k..r * m + (j + 1) * m / k;
                sum_zip(&x[range.clone()], &y[range], |a, b| (a - b) * (a - b))
            };
            let partial: Vec<f64> = if x.len() >= PAR_MIN_ELEMENTS {
                (0..b * k).into_par_iter().map(piece).collect()
            } else {
                (0..b * k).map(piece).collect()
            };
            let out: Vec<T> = partial.chunks(k).map(|p| T::from_f64(p.iter().sum::<f64>() / m as f64)).collect();
            T::to_cpu_storage_owned(out)
        });
        Ok((out, Shape::from(b)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s1: &CudaStorage, l1: &Layout, s2: &CudaStorage, l2: &Layout) -> Result<(CudaStorage, Shape)> {
        let (b, m) = rows(l1);
        let job =
            super::cuda::mse::forward(s1.dtype(), m, b * m, (s1, l1), (s2, l2)).map_err(candle_core::Error::wrap)?;
        Ok((super::cuda::device::run(job)?, Shape::from(b)))
    }

    fn bwd(&self, a: &Tensor, b: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let both = a.apply_op3_no_bwd(b, &grad.contiguous()?, &MseGrad)?;
        let n = a.elem_count();
        let da = both.narrow(0, 0, n)?.reshape(a.shape())?;
        let db = both.narrow(0, n, n)?.reshape(b.shape())?;
        Ok((Some(da), Some(db)))
    }
}

/// The backward kernel: `da = 2 (a - b) g_row / n` and `db = -da`, inputs `(a, b, g)`, output
/// `[da | db]` flattened.
struct MseGrad;

impl CustomOp3 for MseGrad {
    fn name(&self) -> &'static str {
        "per-sample-mse-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        sg: &CpuStorage,
        lg: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let op = self.name();
        let (b, m) = rows(l1);
        if lg.shape().elem_count() != b {
            candle_core::bail!("{op}: {} gradients for {b} samples", lg.shape().elem_count());
        }
        super::on_wgpu!(s1, {
            let (x, y, g) = (slice(op, s1, l1)?, slice(op, s2, l2)?, slice(op, sg, lg)?);
            super::wgpu::mse::backward(m, x, y, g).map(|both| (both, Shape::from(2 * l1.shape().elem_count())))
        });
        super::on_cuda_emu!(
            s1,
            super::cuda::mse::backward(
                DType::F32,
                m,
                b * m,
                slice(op, s1, l1)?,
                slice(op, s2, l2)?,
                slice(op, sg, lg)?
            ),
            Shape::from(2 * b * m)
        );
        let out = dispatch_real!(op, s1, T => {
            let (x, y, g): (&[T], &[T], &[T]) = (slice(op, s1, l1)?, slice(op, s2, l2)?, slice(op, sg, lg)?);
            let n = x.len();
            // Written straight into uninitialised memory: zeroing first would be one more pass
            // over an output twice the input's size.
            let mut both: Vec<T> = Vec::with_capacity(2 * n);
            let (da, db) = both.spare_capacity_mut()[..2 * n].split_at_mut(n);
            for_each_chunk2((da, m), (db, m), n >= PAR_MIN_ELEMENTS, |r, da, db| {
                let c = T::from_f64(2.0 / m as f64) * g[r];
                let (xr, yr) = (&x[r * m..(r + 1) * m], &y[r * m..(r + 1) * m]);
                for (((da, db), &a), &b) in da.iter_mut().zip(db.iter_mut()).zip(xr).zip(yr) {
                    da.write((a - b) * c);
                    db.write((b - a) * c);
                }
            });
            // SAFETY: the row chunks of both halves cover all 2n elements, each written above.
            unsafe { both.set_len(2 * n) };
            T::to_cpu_storage_owned(both)
        });
        Ok((out, Shape::from(2 * l1.shape().elem_count())))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        sg: &CudaStorage,
        lg: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (b, m) = rows(l1);
        if lg.shape().elem_count() != b {
            candle_core::bail!("{}: {} gradients for {b} samples", self.name(), lg.shape().elem_count());
        }
        let job = super::cuda::mse::backward(s1.dtype(), m, b * m, (s1, l1), (s2, l2), (sg, lg))
            .map_err(candle_core::Error::wrap)?;
        Ok((super::cuda::device::run(job)?, Shape::from(2 * b * m)))
    }
}
