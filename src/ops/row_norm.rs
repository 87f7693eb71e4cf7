//! The row-normalisation kernel behind [`super::layer_norm`] and [`super::group_norm`]: each row
//! of `x` is normalised to zero mean and unit variance, then scaled and shifted per segment
//! (layer norm: every element is a segment with its own weight; group norm: a row is a group,
//! its segments the channels, each `H * W` long), optionally followed by SiLU.
//! The backward pass is one kernel that returns the input, weight and bias gradients together.

#[cfg(feature = "wgpu")]
use candle_core::CpuStorage;
#[cfg(any(feature = "cuda", feature = "cuda-emu"))]
use candle_core::DType;
use candle_core::{Layout, Result, Shape, Tensor};

use super::cpu::{for_each_chunk, for_each_chunk2, Real, PAR_MIN_ELEMENTS};
#[cfg(any(feature = "cuda", feature = "cuda-emu"))]
use super::cuda::Job;
use super::kernel::{Fused, Kernel};

/// How the rows of a normalised tensor map onto the affine parameters.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RowNorm {
    /// Elements per row.
    pub row_len: usize,
    /// Elements sharing one weight (1 for layer norm, `H * W` for group norm).
    pub segment: usize,
    /// Rows per cycle of parameters: row `r` uses parameters from `(r % groups) * segments`.
    pub groups: usize,
    pub eps: f64,
    pub silu: bool,
}

impl RowNorm {
    fn segments(&self) -> usize {
        self.row_len / self.segment
    }

    pub(crate) fn params(&self) -> usize {
        self.groups * self.segments()
    }

    /// Applies the op to `x` (any shape whose element count divides into rows), `weight` and
    /// `bias` of [`Self::params`] elements each.
    pub fn apply(self, x: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
        x.contiguous()?
            .apply_op3(&weight.contiguous()?, &bias.contiguous()?, Fused(self))
    }

    fn check(&self, op: &str, x: &Layout, p: &Layout) -> Result<usize> {
        let n = x.shape().elem_count();
        if self.row_len == 0 || self.segment == 0 || self.row_len % self.segment != 0 || n % self.row_len != 0 {
            candle_core::bail!("{op}: {n} elements do not split into rows of {}", self.row_len);
        }
        if p.shape().elem_count() != self.params() {
            candle_core::bail!(
                "{op}: {} parameters, expected {}",
                p.shape().elem_count(),
                self.params()
            );
        }
        Ok(n / self.row_len)
    }

    /// Mean and `1 / sqrt(var + eps)` of a row, accumulated in f64: rows of group norms run to
    /// many thousands of elements, where f32 running sums drift.
    fn stats<T: Real>(&self, row: &[T]) -> (T, T) {
        let n = row.len() as f64;
        // One pass over the row: sum and sum of squares. In f64 the cancellation of
        // E[x^2] - mean^2 costs nothing visible at f32 precision.
        let (sum, sq) = T::sum_and_squares(row);
        let mean = sum / n;
        let var = (sq / n - mean * mean).max(0.0);
        (T::from_f64(mean), T::from_f64(1.0 / (var + self.eps).sqrt()))
    }

    fn forward<T: Real>(&self, x: &[T], w: &[T], b: &[T]) -> Vec<T> {
        // The activation is a type-level choice: with a runtime branch in the loop, the compiler
        // turns it into a select and evaluates exp for every element even without SiLU.
        if self.silu {
            self.forward_with::<T, true>(x, w, b)
        } else {
            self.forward_with::<T, false>(x, w, b)
        }
    }

    fn forward_with<T: Real, const SILU: bool>(&self, x: &[T], w: &[T], b: &[T]) -> Vec<T> {
        // Written straight into uninitialised memory: zeroing first would be a third pass over
        // the output, as long as the normalisation itself.
        let mut out: Vec<T> = Vec::with_capacity(x.len());
        let (seg, nseg) = (self.segment, self.segments());
        let (len, parallel) = (self.row_len, x.len() >= PAR_MIN_ELEMENTS);
        for_each_chunk(&mut out.spare_capacity_mut()[..x.len()], len, parallel, |r, o| {
            let xr = &x[r * len..(r + 1) * len];
            let (mean, rstd) = self.stats(xr);
            let base = (r % self.groups) * nseg;
            if seg == 1 {
                // One weight per element (layer norm): a straight zip, which vectorises.
                let (w, b) = (&w[base..base + nseg], &b[base..base + nseg]);
                for (((o, &v), &g), &sh) in o.iter_mut().zip(xr).zip(w).zip(b) {
                    o.write((v - mean) * rstd * g + sh);
                }
                return;
            }
            for t in 0..nseg {
                // y = x * (rstd g) + (sh - mean rstd g): one multiply-add per element.
                let scale = rstd * w[base + t];
                let shift = b[base + t] - mean * scale;
                for (o, &v) in o[t * seg..(t + 1) * seg].iter_mut().zip(&xr[t * seg..(t + 1) * seg]) {
                    o.write(v * scale + shift);
                }
            }
        });
        // SAFETY: the row chunks cover all `x.len()` elements and each was written above.
        unsafe { out.set_len(x.len()) };
        if SILU {
            // A pass of its own: inside the affine loop, exp stops the loop from vectorising.
            for_each_chunk(&mut out, len, parallel, |_, o| T::silu(o));
        }
        out
    }

    /// `[dx (x.len()) | dweight (params) | dbias (params)]`.
    fn backward<T: Real>(&self, x: &[T], dy: &[T], w: &[T], b: &[T]) -> Vec<T> {
        if self.silu {
            self.backward_with::<T, true>(x, dy, w, b)
        } else {
            self.backward_with::<T, false>(x, dy, w, b)
        }
    }

    fn backward_with<T: Real, const SILU: bool>(&self, x: &[T], dy: &[T], w: &[T], b: &[T]) -> Vec<T> {
        let (seg, nseg) = (self.segment, self.segments());
        let rows = x.len() / self.row_len;
        let mut dx = vec![T::zero(); x.len()];
        // Per row and segment: (sum dy * xhat, sum dy), reduced over rows afterwards.
        let mut partial = vec![T::zero(); rows * nseg * 2];
        let parallel = x.len() >= PAR_MIN_ELEMENTS;
        for_each_chunk2(
            (&mut dx, self.row_len),
            (&mut partial, nseg * 2),
            parallel,
            |r, dxr, part| {
                let xr = &x[r * self.row_len..(r + 1) * self.row_len];
                let dyr = &dy[r * self.row_len..(r + 1) * self.row_len];
                let (mean, rstd) = self.stats(xr);
                let base = (r % self.groups) * nseg;
                let (mut c1, mut c2) = (T::zero(), T::zero());
                for t in 0..nseg {
                    let (g, sh) = (w[base + t], b[base + t]);
                    let (mut sx, mut s) = (T::zero(), T::zero());
                    let range = t * seg..(t + 1) * seg;
                    if SILU {
                        // dx holds the gradient through SiLU, computed in a vectorised pass.
                        for (d, &v) in dxr[range.clone()].iter_mut().zip(&xr[range.clone()]) {
                            *d = (v - mean) * rstd * g + sh;
                        }
                        T::silu_grad(&mut dxr[range.clone()], &dyr[range.clone()]);
                    }
                    for ((d, &v), &gy) in dxr[range.clone()].iter_mut().zip(&xr[range.clone()]).zip(&dyr[range]) {
                        let xhat = (v - mean) * rstd;
                        let gy = if SILU { *d } else { gy };
                        sx += gy * xhat;
                        s += gy;
                        // dx holds d(xhat) until the second pass.
                        *d = gy * g;
                        c1 += *d;
                        c2 += *d * xhat;
                    }
                    part[2 * t] = sx;
                    part[2 * t + 1] = s;
                }
                let n = T::from_f64(self.row_len as f64);
                let (c1, c2) = (c1 / n, c2 / n);
                for (d, &v) in dxr.iter_mut().zip(xr) {
                    let xhat = (v - mean) * rstd;
                    *d = rstd * (*d - c1 - xhat * c2);
                }
            },
        );
        let p = self.params();
        let mut grads = vec![T::zero(); 2 * p];
        for (r, part) in partial.chunks(nseg * 2).enumerate() {
            let base = (r % self.groups) * nseg;
            for t in 0..nseg {
                grads[base + t] += part[2 * t];
                grads[p + base + t] += part[2 * t + 1];
            }
        }
        dx.extend(grads);
        dx
    }
}

impl Kernel<3> for RowNorm {
    const NAME: &'static str = "row-norm";

    /// Rows.
    type Call = usize;

    fn call(&self, [xl, wl, _]: [&Layout; 3]) -> Result<(usize, Shape)> {
        Ok((self.check(Self::NAME, xl, wl)?, xl.shape().clone()))
    }

    fn cpu<T: Real>(&self, _: &usize, [x, w, b]: [&[T]; 3]) -> Result<Vec<T>> {
        Ok(self.forward(x, w, b))
    }

    #[cfg(feature = "wgpu")]
    fn wgpu(&self, _: &usize, [x, w, b]: [&[f32]; 3]) -> crate::Result<CpuStorage> {
        super::wgpu::row_norm::forward(self, x, &[w, b].concat())
    }

    #[cfg(any(feature = "cuda", feature = "cuda-emu"))]
    fn cuda_job<I>(&self, &rows: &usize, dtype: DType, [x, w, b]: [I; 3]) -> crate::Result<Job<I>> {
        super::cuda::row_norm::forward(dtype, self, rows * self.row_len, x, w, b)
    }

    fn backward(&self, [x, w, b]: [&Tensor; 3], _res: &Tensor, grad: &Tensor) -> Result<[Option<Tensor>; 3]> {
        let params = Tensor::cat(&[w.flatten_all()?, b.flatten_all()?], 0)?;
        let all = x.apply_op3_no_bwd(&grad.contiguous()?, &params, &Fused(RowNormGrad(*self)))?;
        let (n, p) = (x.elem_count(), self.params());
        let dx = all.narrow(0, 0, n)?.reshape(x.shape())?;
        let dw = all.narrow(0, n, p)?.reshape(w.shape())?;
        let db = all.narrow(0, n + p, p)?.reshape(b.shape())?;
        Ok([Some(dx), Some(dw), Some(db)])
    }
}

/// The backward kernel: inputs `(x, dy, [weight | bias])`, output all three gradients flattened.
struct RowNormGrad(RowNorm);

impl Kernel<3> for RowNormGrad {
    const NAME: &'static str = "row-norm-grad";

    /// Elements of `x`.
    type Call = usize;

    fn call(&self, [xl, dl, pl]: [&Layout; 3]) -> Result<(usize, Shape)> {
        let p = self.0.params();
        if pl.shape().elem_count() != 2 * p || dl.shape() != xl.shape() {
            candle_core::bail!("{}: mismatched gradient or parameter sizes", Self::NAME);
        }
        let n = xl.shape().elem_count();
        Ok((n, Shape::from(n + 2 * p)))
    }

    fn cpu<T: Real>(&self, _: &usize, [x, dy, params]: [&[T]; 3]) -> Result<Vec<T>> {
        let (w, b) = params.split_at(self.0.params());
        Ok(self.0.backward(x, dy, w, b))
    }

    #[cfg(feature = "wgpu")]
    fn wgpu(&self, _: &usize, [x, dy, params]: [&[f32]; 3]) -> crate::Result<CpuStorage> {
        super::wgpu::row_norm::backward(&self.0, x, dy, params)
    }

    #[cfg(any(feature = "cuda", feature = "cuda-emu"))]
    fn cuda_job<I>(&self, &n: &usize, dtype: DType, [x, dy, params]: [I; 3]) -> crate::Result<Job<I>> {
        super::cuda::row_norm::backward(dtype, &self.0, n, x, dy, params)
    }
}
