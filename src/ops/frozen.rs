//! `x W^T` for a weight that takes no gradient (a LoRA run's base, a reference model). candle's
//! matmul backward computes the gradient of both operands whether or not anything reads it, so
//! every frozen linear layer would cost a weight-sized product and a weight-sized entry in the
//! gradient store per backward pass. This op's backward gives the input's gradient only.

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};

use num_traits::{One, Zero};

use super::cpu::{dispatch_real, matmul, slice, Mat};

/// `xs W^T` for `xs` `[rows, in]` and `weight` `[out, in]`; differentiable in `xs` only. CPU
/// tensors in f32 or f64 that do not need a weight gradient take the op; others (CUDA, half
/// precision, a trainable weight) take candle's matmul, whose result is the same product.
pub fn frozen_weight_product(xs: &Tensor, weight: &Tensor) -> crate::Result<Tensor> {
    let takes = !weight.track_op()
        && xs.device().is_cpu()
        && matches!(xs.dtype(), candle_core::DType::F32 | candle_core::DType::F64)
        && xs.dtype() == weight.dtype();
    if takes {
        Ok(xs.contiguous()?.apply_op2(&weight.contiguous()?, FrozenWeightProduct)?)
    } else {
        Ok(xs.matmul(&weight.t()?)?)
    }
}

struct FrozenWeightProduct;

impl CustomOp2 for FrozenWeightProduct {
    fn name(&self) -> &'static str {
        "frozen-weight-product"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout, ws: &CpuStorage, wl: &Layout) -> Result<(CpuStorage, Shape)> {
        let op = self.name();
        let (rows, inner) = xl.shape().dims2()?;
        let (out, w_inner) = wl.shape().dims2()?;
        if inner != w_inner {
            candle_core::bail!("{op}: input [{rows}, {inner}] does not fit weight [{out}, {w_inner}]");
        }
        let y = dispatch_real!(op, xs, T => {
            let (x, w) = (slice::<T>(op, xs, xl)?, slice::<T>(op, ws, wl)?);
            let mut y = vec![T::zero(); rows * out];
            matmul(&mut y, out, Mat::rows(x, inner), Mat::rows_t(w, inner), (rows, out, inner), T::one(), false, true);
            T::to_cpu_storage_owned(y)
        });
        Ok((y, Shape::from((rows, out))))
    }

    fn bwd(
        &self,
        _xs: &Tensor,
        weight: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(grad.matmul(weight)?), None))
    }
}
