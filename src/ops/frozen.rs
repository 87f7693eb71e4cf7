//! `x W^T` for a weight that takes no gradient (a LoRA run's base, a reference model). candle's
//! matmul backward computes the gradient of both operands whether or not anything reads it, so
//! every frozen linear layer would cost a weight-sized product and a weight-sized entry in the
//! gradient store per backward pass. This op's backward gives the input's gradient only.

use std::borrow::Cow;

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};

use num_traits::{One, Zero};

use super::cpu::{dispatch_real, matmul, slice, Mat};

/// `xs W^T` for `xs` `[rows, in]` and `weight` `[out, in]`; differentiable in `xs` only. CPU
/// inputs in f32 or f64 with a weight that needs no gradient take the op; the weight may be
/// stored in a narrower float type (bf16, f16), which the op widens per call instead of keeping
/// a widened copy alive in the graph until the backward pass. Others (CUDA, a trainable weight)
/// take candle's matmul on the weight in `xs`'s dtype, whose result is the same product.
pub fn frozen_weight_product(xs: &Tensor, weight: &Tensor) -> crate::Result<Tensor> {
    let takes = !weight.track_op()
        && xs.device().is_cpu()
        && matches!(xs.dtype(), DType::F32 | DType::F64)
        && (weight.dtype() == xs.dtype() || matches!(weight.dtype(), DType::BF16 | DType::F16));
    if takes {
        Ok(xs.contiguous()?.apply_op2(&weight.contiguous()?, FrozenWeightProduct)?)
    } else {
        Ok(xs.matmul(&weight.to_dtype(xs.dtype())?.t()?)?)
    }
}

struct FrozenWeightProduct;

/// The weight's elements as `T`: borrowed when they are `T` already, else widened from bf16 or
/// f16 (exactly, as a cast would).
fn weight_as<'a, T: candle_core::WithDType + num_traits::Float>(
    op: &str,
    storage: &'a CpuStorage,
    layout: &Layout,
) -> Result<Cow<'a, [T]>> {
    let widen = |x: f32| T::from(x).unwrap_or_else(T::nan);
    Ok(match storage {
        CpuStorage::BF16(_) => Cow::Owned(
            slice::<half::bf16>(op, storage, layout)?
                .iter()
                .map(|x| widen(x.to_f32()))
                .collect(),
        ),
        CpuStorage::F16(_) => Cow::Owned(
            slice::<half::f16>(op, storage, layout)?
                .iter()
                .map(|x| widen(x.to_f32()))
                .collect(),
        ),
        _ => Cow::Borrowed(slice::<T>(op, storage, layout)?),
    })
}

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
            let (x, w) = (slice::<T>(op, xs, xl)?, weight_as::<T>(op, ws, wl)?);
            let mut y = vec![T::zero(); rows * out];
            matmul(
                &mut y,
                out,
                Mat::rows(x, inner),
                Mat::rows_t(&w, inner),
                (rows, out, inner),
                T::one(),
                false,
                true,
            );
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
        Ok((Some(grad.matmul(&weight.to_dtype(grad.dtype())?)?), None))
    }
}
