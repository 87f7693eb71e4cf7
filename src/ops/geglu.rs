//! GEGLU, `a * gelu(b)` for `[a | b]` the two halves of the last dim (diffusers' `GEGLU`, exact
//! GELU), as one op. Composed, the graph keeps `gelu(b)` beside the input and the output until
//! the backward pass, an output-sized tensor per feed-forward block; this op keeps the input
//! and its output only, and recomputes `gelu(b)` in its backward pass.

#[cfg(any(feature = "wgpu", feature = "cuda-emu"))]
use candle_core::CpuStorage;
use candle_core::{DType, Layout, Result, Shape, Tensor, D};

use super::cpu::{for_each_chunk, Real, PAR_MIN_ELEMENTS};
use super::kernel::{Fused, Kernel};

/// The composed reference: `a * gelu_erf(b)` for `h = [a | b]`.
pub fn reference(h: &Tensor) -> Result<Tensor> {
    let halves = h.chunk(2, D::Minus1)?;
    &halves[0] * halves[1].gelu_erf()?
}

/// `a * gelu(b)` for `h = [a | b]` split in the last dim (of even size): one op on the CPU,
/// else the reference.
pub fn geglu(h: &Tensor) -> Result<Tensor> {
    let w = h.dim(D::Minus1)?;
    if w % 2 != 0 {
        candle_core::bail!("geglu: the last dim ({w}) does not split in two halves")
    }
    // Not a kernel family of its own: it runs whenever the fused CPU kernels are on.
    let takes = h.device().is_cpu()
        && super::fused_enabled()
        && matches!(h.dtype(), DType::F32 | DType::F64 | DType::BF16 | DType::F16);
    if !takes || h.elem_count() == 0 {
        return reference(h);
    }
    h.contiguous()?.apply_op1(Fused(Geglu::<false>))
}

/// The forward pass on `h` `[.., 2w]` (output `[.., w]`), or (`GRAD`) the backward pass on
/// `(h, dY)`, output `dh` `[.., 2w]`.
struct Geglu<const GRAD: bool>;

/// Rows and the half width `w` of `h`'s layout.
fn rows_and_half(l: &Layout) -> (usize, usize) {
    let w2 = l.dims().last().copied().unwrap_or(0);
    (l.shape().elem_count() / w2.max(1), w2 / 2)
}

impl Kernel<1> for Geglu<false> {
    const NAME: &'static str = "geglu";

    type Call = (usize, usize);

    fn call(&self, [l]: [&Layout; 1]) -> Result<((usize, usize), Shape)> {
        let (rows, w) = rows_and_half(l);
        let mut dims = l.dims().to_vec();
        *dims.last_mut().expect("geglu checks the rank") = w;
        Ok(((rows, w), Shape::from(dims)))
    }

    fn cpu<T: Real>(&self, &(rows, w): &(usize, usize), [h]: [&[T]; 1]) -> Result<Vec<T>> {
        let mut out = vec![T::zero(); rows * w];
        let parallel = out.len() >= PAR_MIN_ELEMENTS;
        for_each_chunk(&mut out, w, parallel, |r, o| {
            let (a, b) = h[r * 2 * w..(r + 1) * 2 * w].split_at(w);
            T::geglu(o, a, b);
        });
        Ok(out)
    }

    #[cfg(feature = "wgpu")]
    fn wgpu(&self, call: &(usize, usize), inputs: [&[f32]; 1]) -> crate::Result<CpuStorage> {
        // No shader: elementwise and memory-bound, it runs on the CPU next to the tensors.
        Ok(CpuStorage::F32(self.cpu(call, inputs)?))
    }

    #[cfg(feature = "cuda-emu")]
    fn cuda_emu(&self, _call: &(usize, usize), _inputs: [&[f32]; 1]) -> crate::Result<Option<CpuStorage>> {
        Ok(None)
    }

    fn backward(&self, [h]: [&Tensor; 1], _res: &Tensor, grad: &Tensor) -> Result<[Option<Tensor>; 1]> {
        let grad = grad.contiguous()?.to_dtype(h.dtype())?;
        Ok([Some(h.apply_op2_no_bwd(&grad, &Fused(Geglu::<true>))?)])
    }
}

impl Kernel<2> for Geglu<true> {
    const NAME: &'static str = "geglu-grad";

    type Call = (usize, usize);

    fn call(&self, [l, _]: [&Layout; 2]) -> Result<((usize, usize), Shape)> {
        Ok((rows_and_half(l), l.shape().clone()))
    }

    fn cpu<T: Real>(&self, &(rows, w): &(usize, usize), [h, dy]: [&[T]; 2]) -> Result<Vec<T>> {
        let mut dh = vec![T::zero(); rows * 2 * w];
        let parallel = dh.len() >= PAR_MIN_ELEMENTS;
        // Rows of `h` and `dh` share their index; `dy` rows are half as wide.
        for_each_chunk(&mut dh, 2 * w, parallel, |r, dhr| {
            let (a, b) = h[r * 2 * w..(r + 1) * 2 * w].split_at(w);
            let (da, db) = dhr.split_at_mut(w);
            T::geglu_grad(da, db, a, b, &dy[r * w..(r + 1) * w]);
        });
        Ok(dh)
    }

    #[cfg(feature = "wgpu")]
    fn wgpu(&self, call: &(usize, usize), inputs: [&[f32]; 2]) -> crate::Result<CpuStorage> {
        Ok(CpuStorage::F32(self.cpu(call, inputs)?))
    }

    #[cfg(feature = "cuda-emu")]
    fn cuda_emu(&self, _call: &(usize, usize), _inputs: [&[f32]; 2]) -> crate::Result<Option<CpuStorage>> {
        Ok(None)
    }
}
