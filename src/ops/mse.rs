//! The per-sample mean squared error of the preference losses: `mean((a - b)^2)` over every
//! dimension but the first, in one pass; its backward pass is one kernel too.

#[cfg(feature = "wgpu")]
use candle_core::CpuStorage;
#[cfg(any(feature = "cuda", feature = "cuda-emu"))]
use candle_core::DType;
use candle_core::{Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::cpu::{for_each_chunk2, sum_zip, Real, PAR_MIN_ELEMENTS};
#[cfg(any(feature = "cuda", feature = "cuda-emu"))]
use super::cuda::Job;
use super::kernel::{Fused, Kernel};

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
    a.contiguous()?.apply_op2(&b.contiguous()?, Fused(Mse))
}

/// Rows `[B]` and elements per row of a `[B, ...]` layout.
fn rows(l: &Layout) -> (usize, usize) {
    let b = l.dims()[0];
    (b, l.shape().elem_count() / b.max(1))
}

struct Mse;

impl Kernel<2> for Mse {
    const NAME: &'static str = "per-sample-mse";

    /// Rows `b` and elements per row `m`.
    type Call = (usize, usize);

    fn call(&self, [l1, _]: [&Layout; 2]) -> Result<((usize, usize), Shape)> {
        let (b, m) = rows(l1);
        Ok(((b, m), Shape::from(b)))
    }

    fn cpu<T: Real>(&self, &(b, m): &(usize, usize), [x, y]: [&[T]; 2]) -> Result<Vec<T>> {
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
        Ok(partial
            .chunks(k)
            .map(|p| T::from_f64(p.iter().sum::<f64>() / m as f64))
            .collect())
    }

    #[cfg(feature = "wgpu")]
    fn wgpu(&self, &(_, m): &(usize, usize), [x, y]: [&[f32]; 2]) -> crate::Result<CpuStorage> {
        super::wgpu::mse::forward(m, x, y)
    }

    #[cfg(any(feature = "cuda", feature = "cuda-emu"))]
    fn cuda_job<I>(&self, &(b, m): &(usize, usize), dtype: DType, [x, y]: [I; 2]) -> crate::Result<Job<I>> {
        super::cuda::mse::forward(dtype, m, b * m, x, y)
    }

    fn backward(&self, [a, b]: [&Tensor; 2], _res: &Tensor, grad: &Tensor) -> Result<[Option<Tensor>; 2]> {
        let both = a.apply_op3_no_bwd(b, &grad.contiguous()?, &Fused(MseGrad))?;
        let n = a.elem_count();
        let da = both.narrow(0, 0, n)?.reshape(a.shape())?;
        let db = both.narrow(0, n, n)?.reshape(b.shape())?;
        Ok([Some(da), Some(db)])
    }
}

/// The backward kernel: `da = 2 (a - b) g_row / n` and `db = -da`, inputs `(a, b, g)`, output
/// `[da | db]` flattened.
struct MseGrad;

impl Kernel<3> for MseGrad {
    const NAME: &'static str = "per-sample-mse-grad";

    /// Rows `b` and elements per row `m`.
    type Call = (usize, usize);

    fn call(&self, [l1, _, lg]: [&Layout; 3]) -> Result<((usize, usize), Shape)> {
        let (b, m) = rows(l1);
        if lg.shape().elem_count() != b {
            candle_core::bail!("{}: {} gradients for {b} samples", Self::NAME, lg.shape().elem_count());
        }
        Ok(((b, m), Shape::from(2 * b * m)))
    }

    fn cpu<T: Real>(&self, &(_, m): &(usize, usize), [x, y, g]: [&[T]; 3]) -> Result<Vec<T>> {
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
        Ok(both)
    }

    #[cfg(feature = "wgpu")]
    fn wgpu(&self, &(_, m): &(usize, usize), [x, y, g]: [&[f32]; 3]) -> crate::Result<CpuStorage> {
        super::wgpu::mse::backward(m, x, y, g)
    }

    #[cfg(any(feature = "cuda", feature = "cuda-emu"))]
    fn cuda_job<I>(&self, &(b, m): &(usize, usize), dtype: DType, [x, y, g]: [I; 3]) -> crate::Result<Job<I>> {
        super::cuda::mse::backward(dtype, m, b * m, x, y, g)
    }
}
