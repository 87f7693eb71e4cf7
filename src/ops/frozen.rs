//! A linear layer whose weight and bias take no gradient (a LoRA run's base, a reference
//! model), with its LoRA update if any, as one op: `y = x W^T + b + s (x A^T) B^T`.
//!
//! candle's matmul backward computes the gradient of both operands whether or not anything
//! reads it, so a frozen layer would cost a weight-sized product per backward pass; and as
//! composed ops the layer keeps every partial result alive in the graph until the backward
//! pass (the base product, the LoRA product, its scaled copy, their sum, the bias sum: four
//! output-sized tensors besides the output). This op keeps only its output, and its backward
//! gives the input's gradient and the adapter's.

use candle_core::{CpuStorage, CustomOp1, CustomOp3, DType, Layout, Result, Shape, Tensor};

use super::cpu::{dispatch_real, matmul, narrowed, product, slice, tensor_values, widened, Mat};

/// `xs W^T (+ bias) (+ scale (xs A^T) B^T)` for `xs` `[rows, in]`, `weight` `[out, in]`,
/// `bias` `[out]`, and a LoRA `(A [r, in], B [out, r], scale)`; differentiable in `xs`, `A`
/// and `B`. `None` when the op does not take the call, which it does for CPU inputs with a
/// weight and bias that need no gradient. The input may be f32, f64, bf16 or f16 (half types
/// computed in f32, the output rounded back); the weight, bias and adapter may be stored in a
/// narrower float type (bf16, f16). What is widened is widened per call, so no widened copy
/// stays alive in the graph until the backward pass.
pub fn frozen_linear(
    xs: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    lora: Option<(&Tensor, &Tensor, f64)>,
) -> crate::Result<Option<Tensor>> {
    // Half types compute in f32; every other tensor is read in the compute type.
    let compute = super::compute_dtype(xs.dtype());
    let widenable = |t: &Tensor| t.dtype() == compute || matches!(t.dtype(), DType::BF16 | DType::F16);
    let frozen = |t: &Tensor| !t.track_op() && widenable(t) && t.device().is_cpu();
    let takes = xs.device().is_cpu()
        && matches!(xs.dtype(), DType::F32 | DType::F64 | DType::BF16 | DType::F16)
        && frozen(weight)
        && bias.is_none_or(frozen)
        && lora.is_none_or(|(a, b, _)| widenable(a) && widenable(b) && a.device().is_cpu() && b.device().is_cpu());
    if !takes {
        return Ok(None);
    }
    let op = FrozenLinear {
        weight: weight.contiguous()?,
        bias: bias.map(Tensor::contiguous).transpose()?,
        scale: lora.map_or(0.0, |(_, _, s)| s),
    };
    let xs = xs.contiguous()?;
    Ok(Some(match lora {
        Some((a, b, _)) => xs.apply_op3(&a.contiguous()?, &b.contiguous()?, op)?,
        None => xs.apply_op1(op)?,
    }))
}

/// The frozen layer: its weight and bias, and the LoRA scale when it is applied as a
/// [`CustomOp3`] over `(x, A, B)`.
struct FrozenLinear {
    weight: Tensor,
    bias: Option<Tensor>,
    scale: f64,
}

impl FrozenLinear {
    /// `x W^T + b`, plus `scale (x A^T) B^T` with `lora = (A, r, B)`, as `[rows, out]`.
    fn forward<T: super::cpu::Real + num_traits::Float>(
        &self,
        x: &[T],
        (rows, inner): (usize, usize),
        lora: Option<(&[T], usize, &[T])>,
    ) -> Result<Vec<T>> {
        let op = "frozen-linear";
        let (out, w_inner) = self.weight.dims2()?;
        if inner != w_inner {
            candle_core::bail!("{op}: input [{rows}, {inner}] does not fit weight [{out}, {w_inner}]");
        }
        let (ws, wl) = self.weight.storage_and_layout();
        let w = tensor_values::<T>(op, &ws, wl)?;
        let bias = self.bias.as_ref().map(Tensor::storage_and_layout);
        let b = bias.as_ref().map(|(s, l)| tensor_values::<T>(op, s, l)).transpose()?;
        let mut y = super::linear::forward(x, &w, b.as_deref(), (rows, inner, out));
        if let Some((a, r, b)) = lora {
            let h = product(
                Mat::rows(x, inner),
                Mat::rows_t(a, inner),
                (rows, r, inner),
                T::one(),
                true,
            );
            matmul(
                &mut y,
                out,
                Mat::rows(&h, r),
                Mat::rows_t(b, r),
                (rows, out, r),
                T::from(self.scale).unwrap_or_else(T::nan),
                true,
                true,
            );
        }
        Ok(y)
    }

    /// `dy W` for the output gradient `dy`, in `dy`'s compute dtype.
    fn input_grad(&self, dy: &Tensor) -> Result<Tensor> {
        dy.matmul(&self.weight.to_dtype(dy.dtype())?)
    }
}

impl CustomOp1 for FrozenLinear {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout) -> Result<(CpuStorage, Shape)> {
        let op = CustomOp1::name(self);
        let (rows, inner) = xl.shape().dims2()?;
        let out = self.weight.dim(0)?;
        let y = match xs {
            CpuStorage::BF16(_) | CpuStorage::F16(_) => {
                narrowed(xs, self.forward(&widened::<f32>(op, xs, xl)?, (rows, inner), None)?)
            }
            _ => dispatch_real!(op, xs, T => {
                T::to_cpu_storage_owned(self.forward(slice::<T>(op, xs, xl)?, (rows, inner), None)?)
            }),
        };
        Ok((y, Shape::from((rows, out))))
    }

    fn bwd(&self, _xs: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let dy = grad.to_dtype(super::compute_dtype(grad.dtype()))?;
        Ok(Some(self.input_grad(&dy)?.to_dtype(grad.dtype())?))
    }
}

impl CustomOp3 for FrozenLinear {
    fn name(&self) -> &'static str {
        "frozen-linear-lora"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        a_s: &CpuStorage,
        al: &Layout,
        b_s: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let op = CustomOp3::name(self);
        let (rows, inner) = xl.shape().dims2()?;
        let out = self.weight.dim(0)?;
        let (r, a_inner) = al.shape().dims2()?;
        let (b_out, b_r) = bl.shape().dims2()?;
        if a_inner != inner || b_out != out || b_r != r {
            candle_core::bail!(
                "{op}: LoRA A {:?} and B {:?} do not fit input [{rows}, {inner}] and output width {out}",
                al.dims(),
                bl.dims()
            );
        }
        let y = match xs {
            CpuStorage::BF16(_) | CpuStorage::F16(_) => {
                let (a, b) = (widened::<f32>(op, a_s, al)?, widened::<f32>(op, b_s, bl)?);
                let x = widened::<f32>(op, xs, xl)?;
                narrowed(xs, self.forward(&x, (rows, inner), Some((&a, r, &b)))?)
            }
            _ => dispatch_real!(op, xs, T => {
                let (a, b) = (widened::<T>(op, a_s, al)?, widened::<T>(op, b_s, bl)?);
                let x = slice::<T>(op, xs, xl)?;
                T::to_cpu_storage_owned(self.forward(x, (rows, inner), Some((&a, r, &b)))?)
            }),
        };
        Ok((y, Shape::from((rows, out))))
    }

    fn bwd(
        &self,
        xs: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // In the compute dtype (f32 for half types), each gradient in its tensor's dtype.
        let dt = super::compute_dtype(grad.dtype());
        let (x, dy) = (xs.to_dtype(dt)?, grad.to_dtype(dt)?);
        let (aw, bw) = (a.to_dtype(dt)?, b.to_dtype(dt)?);
        // h = x A^T is small (rank columns): recomputed rather than kept.
        let h = x.matmul(&aw.t()?)?;
        let dh = (dy.matmul(&bw)? * self.scale)?;
        let db = (dy.t()?.matmul(&h)? * self.scale)?;
        let da = dh.t()?.matmul(&x)?;
        let dx = (self.input_grad(&dy)? + dh.matmul(&aw)?)?;
        Ok((
            Some(dx.to_dtype(xs.dtype())?),
            Some(da.to_dtype(a.dtype())?),
            Some(db.to_dtype(b.dtype())?),
        ))
    }
}
