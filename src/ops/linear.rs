//! A linear layer with a trainable weight (and bias), `y = x W^T + b`, as one CPU op.
//!
//! As composed candle ops the layer is a transpose, a matmul and a broadcast bias sum: the graph
//! keeps the product and the sum (two output-sized tensors), the backward pass runs a reduction
//! over the rows for the bias and an accumulation per graph edge, and the matmul zero-fills its
//! output before writing it. This op writes the product onto the bias once, keeps only its
//! output, and its backward gives each gradient in one product (the bias's as column sums).

use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor};

use super::cpu::{dispatch_real, matmul, narrowed, product, tensor_values, widened, Mat, Real};

/// `xs W^T (+ bias)` for `xs` `[rows, in]`, `weight` `[out, in]` and `bias` `[out]`,
/// differentiable in all three. `None` when the op does not take the call, which it does for
/// CPU tensors of one float type (half types computed in f32, the output rounded back) with the
/// fused kernels on.
pub fn linear(xs: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> crate::Result<Option<Tensor>> {
    let takes = |t: &Tensor| t.device().is_cpu() && t.dtype() == xs.dtype();
    if !super::fused_enabled()
        || !matches!(xs.dtype(), DType::F32 | DType::F64 | DType::BF16 | DType::F16)
        || !takes(xs)
        || !takes(weight)
        || !bias.is_none_or(takes)
    {
        return Ok(None);
    }
    let (xs, weight) = (xs.contiguous()?, weight.contiguous()?);
    Ok(Some(match bias {
        Some(b) => xs.apply_op3(&weight, &b.contiguous()?, Linear)?,
        None => xs.apply_op2(&weight, Linear)?,
    }))
}

/// The op (a [`CustomOp2`] over `(x, W)` or a [`CustomOp3`] over `(x, W, b)`).
struct Linear;

const NAME: &str = "linear";

/// `(rows, in, out)` of a call, checked against the layouts.
fn sizes(xl: &Layout, wl: &Layout, bl: Option<&Layout>) -> Result<(usize, usize, usize)> {
    let (rows, inner) = xl.shape().dims2()?;
    let (out, w_inner) = wl.shape().dims2()?;
    if inner != w_inner {
        candle_core::bail!("{NAME}: input [{rows}, {inner}] does not fit weight [{out}, {w_inner}]");
    }
    if let Some(bl) = bl {
        if bl.dims() != [out] {
            candle_core::bail!("{NAME}: bias {:?} for weight [{out}, {inner}]", bl.dims());
        }
    }
    Ok((rows, inner, out))
}

/// `x W^T + b` as `[rows, out]`: each row starts from the bias and the product is added onto it.
pub(super) fn forward<T: Real>(x: &[T], w: &[T], b: Option<&[T]>, (rows, inner, out): (usize, usize, usize)) -> Vec<T> {
    let (lhs, rhs) = (Mat::rows(x, inner), Mat::rows_t(w, inner));
    match b {
        Some(b) => {
            let mut y: Vec<T> = b.iter().copied().cycle().take(rows * out).collect();
            matmul(&mut y, out, lhs, rhs, (rows, out, inner), T::one(), true, true);
            y
        }
        None => product(lhs, rhs, (rows, out, inner), T::one(), true),
    }
}

/// The forward pass on CPU storages: f32 or f64 as they are, half types widened to f32.
fn cpu_fwd(
    x: (&CpuStorage, &Layout),
    w: (&CpuStorage, &Layout),
    b: Option<(&CpuStorage, &Layout)>,
) -> Result<(CpuStorage, Shape)> {
    let dims = sizes(x.1, w.1, b.map(|b| b.1))?;
    let y = match x.0 {
        CpuStorage::BF16(_) | CpuStorage::F16(_) => {
            let (xv, wv) = (widened::<f32>(NAME, x.0, x.1)?, widened::<f32>(NAME, w.0, w.1)?);
            let bv = b.map(|(s, l)| widened::<f32>(NAME, s, l)).transpose()?;
            narrowed(x.0, forward(&xv, &wv, bv.as_deref(), dims))
        }
        _ => dispatch_real!(NAME, x.0, T => {
            let (xv, wv) = (widened::<T>(NAME, x.0, x.1)?, widened::<T>(NAME, w.0, w.1)?);
            let bv = b.map(|(s, l)| widened::<T>(NAME, s, l)).transpose()?;
            T::to_cpu_storage_owned(forward(&xv, &wv, bv.as_deref(), dims))
        }),
    };
    Ok((y, Shape::from((dims.0, dims.2))))
}

/// The column sums of the `[rows, out]` matrix `dy`, in blocks of rows so that rounding stays at
/// the level of a block's sum.
fn column_sums<T: Real>(dy: &[T], out: usize) -> Vec<T> {
    const BLOCK: usize = 128;
    let mut total = vec![T::zero(); out];
    let mut part = vec![T::zero(); out];
    for block in dy.chunks(BLOCK * out.max(1)) {
        part.fill(T::zero());
        for row in block.chunks(out.max(1)) {
            part.iter_mut().zip(row).for_each(|(p, &v)| *p += v);
        }
        total.iter_mut().zip(&part).for_each(|(t, &p)| *t += p);
    }
    total
}

/// The gradients `(dx, dW, db)` that `need` asks for, in `T`, from `dy` `[rows, out]`.
fn grads<T: Real>(
    dy: &[T],
    x: &[T],
    w: &[T],
    (rows, inner, out): (usize, usize, usize),
    need: [bool; 3],
) -> [Option<Vec<T>>; 3] {
    let dx = need[0].then(|| {
        product(
            Mat::rows(dy, out),
            Mat::rows(w, inner),
            (rows, inner, out),
            T::one(),
            true,
        )
    });
    let dw = need[1].then(|| {
        product(
            Mat::rows_t(dy, out),
            Mat::rows(x, inner),
            (out, inner, rows),
            T::one(),
            true,
        )
    });
    let db = need[2].then(|| column_sums(dy, out));
    [dx, dw, db]
}

/// The backward pass: the gradient of each input that depends on a variable, in that input's
/// dtype, computed in f32 for half types.
fn backward(x: &Tensor, w: &Tensor, b: Option<&Tensor>, grad: &Tensor) -> Result<[Option<Tensor>; 3]> {
    let need = [x.track_op(), w.track_op(), b.is_some_and(Tensor::track_op)];
    if need == [false; 3] {
        return Ok([None, None, None]);
    }
    let grad = grad.contiguous()?;
    match super::compute_dtype(grad.dtype()) {
        DType::F64 => backward_in::<f64>(x, w, b, &grad, need),
        _ => backward_in::<f32>(x, w, b, &grad, need),
    }
}

/// [`backward`] computed in `T`.
fn backward_in<T: Real>(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    grad: &Tensor,
    need: [bool; 3],
) -> Result<[Option<Tensor>; 3]> {
    let ((rows, inner), out) = (x.dims2()?, w.dim(0)?);
    let (gs, gl) = grad.storage_and_layout();
    let (xs, xl) = x.storage_and_layout();
    let (ws, wl) = w.storage_and_layout();
    let (dy, xv, wv) = (
        tensor_values::<T>(NAME, &gs, gl)?,
        tensor_values::<T>(NAME, &xs, xl)?,
        tensor_values::<T>(NAME, &ws, wl)?,
    );
    let likes = [x, w, b.unwrap_or(w)];
    let shapes = [x.shape().clone(), w.shape().clone(), Shape::from(out)];
    let mut tensors = [None, None, None];
    for (i, g) in grads(&dy, &xv, &wv, (rows, inner, out), need).into_iter().enumerate() {
        if let Some(g) = g {
            let t = Tensor::from_vec(g, shapes[i].clone(), likes[i].device())?;
            tensors[i] = Some(t.to_dtype(likes[i].dtype())?);
        }
    }
    Ok(tensors)
}

impl CustomOp2 for Linear {
    fn name(&self) -> &'static str {
        NAME
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout, ws: &CpuStorage, wl: &Layout) -> Result<(CpuStorage, Shape)> {
        cpu_fwd((xs, xl), (ws, wl), None)
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let [dx, dw, _] = backward(x, w, None, grad)?;
        Ok((dx, dw))
    }
}

impl CustomOp3 for Linear {
    fn name(&self) -> &'static str {
        NAME
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        cpu_fwd((xs, xl), (ws, wl), Some((bs, bl)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let [dx, dw, db] = backward(x, w, Some(b), grad)?;
        Ok((dx, dw, db))
    }
}
