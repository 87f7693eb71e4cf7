//! Scaled dot-product attention, `softmax(q k^T * scale + mask) v`. The fused kernel works one
//! (batch, head) slice at a time and keeps no attention matrix for the backward pass: it
//! recomputes the scores there (the memory-efficient attention recipe).
//!
//! The optional mask is additive (`-inf` blocks a key) and broadcasts to `[..., Lq, Lk]`, `...`
//! being q's leading dims: `[Lq, Lk]`, `[1, 1, Lq, Lk]` (causal), `[B, 1, 1, Lk]` (padded keys),
//! `[B, H, Lq, Lk]`, ... The fused kernels take it too: they keep one `[Lq, Lk]` copy per distinct
//! mask slice (one for a mask shared by every head and batch row, `B` for a per-batch mask) and
//! read slice `i`'s through an index map, never a copy per (batch, head) slice. No gradient flows
//! to the mask: every caller in the crate passes a constant, and the fused kernels carry it
//! detached, so even a mask that is a variable gets no gradient from them (the reference, and the
//! composed fallback, would give it one). A query row whose keys are all blocked gives NaN in
//! the fused kernels as in the reference (`0 / 0` in the softmax), and the NaN spreads through
//! the backward pass the same way: that row of dq, and dk and dv of its whole slice.

use std::borrow::Cow;
use std::sync::Arc;

#[cfg(any(feature = "wgpu", feature = "cuda-emu"))]
use candle_core::CpuStorage;
#[cfg(feature = "cuda")]
use candle_core::{backend::BackendStorage, CudaStorage};
use candle_core::{DType, Layout, Result, Shape, Storage, Tensor, D};

use super::cpu::{for_each_chunk, matmul, slice, Mat, Real, PAR_MIN_ELEMENTS};
use super::kernel::{Fused, Kernel};
use super::{compute_dtype, gemm_dtype};

/// The composed reference for `q` `[..., Lq, D]`, `k` `[..., Lk, D]`, `v` `[..., Lk, Dv]`; the
/// mask, when given, is added to the scores (use `-inf` to block). Scores and softmax run in f32
/// for half-precision inputs.
pub fn reference(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, mask: Option<&Tensor>) -> Result<Tensor> {
    composed(q, k, v, scale, mask, super::softmax::reference)
}

/// Attention from tensor ops, with the softmax `softmax`.
fn composed(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    mask: Option<&Tensor>,
    softmax: fn(&Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    let dtype = q.dtype();
    let compute = compute_dtype(dtype);
    let q32 = q.to_dtype(compute)?;
    let k32 = k.to_dtype(compute)?;
    let scores = (q32.contiguous()?.matmul(&k32.t()?.contiguous()?)? * scale)?;
    let scores = match mask {
        Some(m) => scores.broadcast_add(&m.to_dtype(compute)?)?,
        None => scores,
    };
    let p = softmax(&scores)?;
    let gemm = gemm_dtype(v);
    let out = p.to_dtype(gemm)?.matmul(&v.to_dtype(gemm)?.contiguous()?)?;
    out.to_dtype(dtype)
}

/// Attention of `q`, `k`, `v` (and the additive `mask`) as in [`reference`]: the fused kernel
/// on CPU (or wgpu) for f32 and f64, else tensor ops around the [`super::softmax::softmax`]
/// kernel. The fused kernel gives the mask no gradient (see the module doc).
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, mask: Option<&Tensor>) -> Result<Tensor> {
    let fused = super::use_kernel(super::KernelOp::Attention, &[q, k, v])
        && mask.is_none_or(|m| m.device().same_device(q.device()));
    if !fused || q.rank() < 3 || k.rank() != q.rank() || v.rank() != q.rank() {
        return composed(q, k, v, scale, mask, super::softmax::softmax);
    }
    let dims = q.dims().to_vec();
    let lead = &dims[..dims.len() - 2];
    let (lq, d) = (dims[dims.len() - 2], dims[dims.len() - 1]);
    let (lk, dv) = (k.dim(D::Minus2)?, v.dim(D::Minus1)?);
    let n: usize = lead.iter().product();
    if k.dims()[..k.rank() - 2] != *lead
        || v.dims()[..v.rank() - 2] != *lead
        || v.dim(D::Minus2)? != lk
        || k.dim(D::Minus1)? != d
    {
        return composed(q, k, v, scale, mask, super::softmax::softmax);
    }
    let kernel_mask = match mask {
        // The CPU kernels compute half types in f32, and read the mask in f32.
        Some(m) => match Mask::new(m, lead, lq, lk, kernel_dtype(q))? {
            // A mask that does not broadcast: the composed ops report it.
            None => return composed(q, k, v, scale, Some(m), super::softmax::softmax),
            some => some,
        },
        None => None,
    };
    if !q.device().is_cpu() && !cuda_takes(d, dv, kernel_mask.as_ref()) {
        return composed(q, k, v, scale, mask, super::softmax::softmax);
    }
    let q3 = q.contiguous()?.reshape((n, lq, d))?;
    let k3 = k.contiguous()?.reshape((n, lk, d))?;
    let v3 = v.contiguous()?.reshape((n, lk, dv))?;
    let op = Attention::<false> {
        scale,
        mask: kernel_mask,
        heads: 1,
    };
    let out = q3.apply_op3(&k3, &v3, Fused(op))?;
    let mut out_dims = dims;
    *out_dims.last_mut().expect("rank checked") = dv;
    out.reshape(out_dims)
}

/// Attention over `heads` heads kept side by side in the last dim: `q` `[B, Lq, heads * D]`,
/// `k` `[B, Lk, heads * D]`, `v` `[B, Lk, heads * Dv]` to `[B, Lq, heads * Dv]`, as the
/// projections give them and the output projection takes them. On the CPU kernels this reads
/// each head's columns in place, so the graph keeps no head-split copies of q, k, v and the
/// output; elsewhere it splits the heads and runs [`attention`]. The mask broadcasts to
/// `[B, heads, Lq, Lk]`.
pub fn attention_heads(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    scale: f64,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    let split = |t: &Tensor| -> Result<Tensor> {
        let (b, l, w) = t.dims3()?;
        if heads == 0 || w % heads != 0 {
            candle_core::bail!("attention: {w} channels do not split into {heads} heads")
        }
        t.reshape((b, l, heads, w / heads))?.transpose(1, 2)
    };
    let (q4, k4, v4) = (split(q)?, split(k)?, split(v)?);
    let (b, lq, lk) = (q.dim(0)?, q.dim(1)?, k.dim(1)?);
    let in_place = q.device().is_cpu()
        && super::backend() == super::Backend::Cpu
        && super::use_kernel(super::KernelOp::Attention, &[q, k, v])
        && k.dim(0)? == b
        && v.dims()[..2] == [b, lk]
        && q4.dim(3)? == k4.dim(3)?;
    let kernel_mask = match mask {
        Some(m) if in_place => Mask::new(m, &[b, heads], lq, lk, kernel_dtype(q))?,
        _ => None,
    };
    if !in_place || (mask.is_some() && kernel_mask.is_none()) {
        let out = attention(&q4, &k4, &v4, scale, mask)?;
        let (b, h, l, d) = out.dims4()?;
        return out.transpose(1, 2)?.reshape((b, l, h * d));
    }
    let op = Attention::<false> {
        scale,
        mask: kernel_mask,
        heads,
    };
    q.contiguous()?.apply_op3(&k.contiguous()?, &v.contiguous()?, Fused(op))
}

/// The dtype the kernels compute `q`'s attention in: f32 for half types on the CPU (see
/// [`super::kernel`]), else `q`'s own.
fn kernel_dtype(q: &Tensor) -> DType {
    if q.device().is_cpu() {
        compute_dtype(q.dtype())
    } else {
        q.dtype()
    }
}

/// Whether the CUDA kernels take a call of widths `d` and `dv` with this mask: widths up to
/// their register budget, and a mask whose slices they can index.
fn cuda_takes(d: usize, dv: usize, mask: Option<&Mask>) -> bool {
    #[cfg(any(feature = "cuda", feature = "cuda-emu"))]
    return d.max(dv) <= super::cuda::attention::MAX_WIDTH && mask.is_none_or(|m| m.strided().is_some());
    #[cfg(not(any(feature = "cuda", feature = "cuda-emu")))]
    {
        let _ = (d, dv, mask);
        false
    }
}

/// An additive mask as the kernels take it: `values` `[m, lq, lk]` (contiguous, in q's dtype,
/// detached), one per distinct mask slice, and `slice_of[i]`, the mask slice of (batch, head)
/// slice `i`.
#[derive(Debug, Clone)]
struct Mask {
    values: Tensor,
    slice_of: Arc<[usize]>,
}

impl Mask {
    /// `mask` for q's leading dims `lead` and `lq` queries, `lk` keys; `None` when it does not
    /// broadcast to `[lead..., lq, lk]`. Only the mask's last two dims are expanded (to
    /// `[lq, lk]`); its leading dims stay as they are, broadcast ones through `slice_of`.
    fn new(mask: &Tensor, lead: &[usize], lq: usize, lk: usize, dtype: DType) -> Result<Option<Self>> {
        let rank = lead.len() + 2;
        if mask.rank() > rank {
            return Ok(None);
        }
        let mut dims = vec![1; rank - mask.rank()];
        dims.extend_from_slice(mask.dims());
        let full = [lead, &[lq, lk]].concat();
        if dims.iter().zip(&full).any(|(&m, &f)| m != 1 && m != f) {
            return Ok(None);
        }
        let mask_lead = &dims[..rank - 2];
        let m: usize = mask_lead.iter().product();
        let values = mask
            .detach()
            .to_dtype(dtype)?
            .reshape(dims.as_slice())?
            .broadcast_as([mask_lead, &[lq, lk]].concat())?
            .contiguous()?
            .reshape((m, lq, lk))?;
        // Slice `i` is row-major over `lead`; its mask slice is row-major over `mask_lead`, with
        // the index of every broadcast (size-1) dim at 0.
        let n: usize = lead.iter().product();
        let slice_of = (0..n)
            .map(|i| {
                let (mut rest, mut at, mut stride) = (i, 0, 1);
                for (&l, &ml) in lead.iter().zip(mask_lead).rev() {
                    if ml != 1 {
                        at += (rest % l) * stride;
                        stride *= ml;
                    }
                    rest /= l;
                }
                at
            })
            .collect();
        Ok(Some(Mask { values, slice_of }))
    }

    /// Checks the mask fits a call of sizes `dims`.
    fn check(&self, op: &str, dims: &Dims) -> Result<()> {
        let &[m, lq, lk] = self.values.dims() else {
            candle_core::bail!("{op}: expected a 3-D mask, got {:?}", self.values.dims())
        };
        if (lq, lk) != (dims.lq, dims.lk) || self.slice_of.len() != dims.n || self.slice_of.iter().any(|&s| s >= m) {
            candle_core::bail!(
                "{op}: a mask of {:?} for {} slices of {}x{} scores",
                self.values.dims(),
                dims.n,
                dims.lq,
                dims.lk
            );
        }
        Ok(())
    }

    /// `(div, slices)` such that slice `i` reads mask slice `(i / div) % slices`, the form the
    /// CUDA kernels take (a mask shared by all slices, one per batch row, per head, or per
    /// slice); `None` for other broadcast patterns.
    #[cfg(any(feature = "cuda", feature = "cuda-emu"))]
    fn strided(&self) -> Option<(usize, usize)> {
        let slices = self.values.dim(0).ok()?.max(1);
        let div = self.slice_of.iter().position(|&s| s != 0).unwrap_or(1).max(1);
        let fits = self.slice_of.iter().enumerate().all(|(i, &s)| s == (i / div) % slices);
        fits.then_some((div, slices))
    }

    /// The mask as the CUDA kernels take it, its values being `values`.
    #[cfg(any(feature = "cuda", feature = "cuda-emu"))]
    fn input<I>(&self, op: &str, values: I) -> Result<super::cuda::attention::MaskInput<I>> {
        let Some((div, slices)) = self.strided() else {
            candle_core::bail!("{op}: the CUDA kernels cannot index this mask's slices")
        };
        Ok(super::cuda::attention::MaskInput { values, div, slices })
    }
}

/// A mask's values as a kernel reads them: `values` `[m, lq, lk]` and the mask slice of each
/// (batch, head) slice.
#[derive(Clone, Copy)]
pub(crate) struct MaskView<'a, T> {
    pub values: &'a [T],
    pub slice_of: &'a [usize],
}

impl<'a, T> MaskView<'a, T> {
    /// The mask of slice `i`, `len` (`lq * lk`) values.
    pub fn slice(&self, i: usize, len: usize) -> &'a [T] {
        let s = self.slice_of[i];
        &self.values[s * len..(s + 1) * len]
    }
}

/// `f` of the view of `mask` (or of `None`) for a call of sizes `dims`, its values read in place
/// from the tensor's storage.
fn with_mask<T: candle_core::WithDType, R>(
    op: &str,
    dims: &Dims,
    mask: Option<&Mask>,
    f: impl FnOnce(Option<MaskView<'_, T>>) -> R,
) -> Result<R> {
    let Some(mask) = mask else { return Ok(f(None)) };
    mask.check(op, dims)?;
    let (storage, layout) = mask.values.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        candle_core::bail!("{op}: the mask must be on the CPU")
    };
    let values = slice(op, cpu, layout)?;
    Ok(f(Some(MaskView {
        values,
        slice_of: &mask.slice_of,
    })))
}

/// `f` of `mask` as the CUDA kernels take it (or of `None`), its values read in place from the
/// tensor's device storage.
#[cfg(feature = "cuda")]
fn with_cuda_mask<R>(
    op: &str,
    dims: &Dims,
    mask: Option<&Mask>,
    f: impl FnOnce(Option<super::cuda::attention::MaskInput<super::cuda::device::Input<'_>>>) -> Result<R>,
) -> Result<R> {
    let Some(mask) = mask else { return f(None) };
    mask.check(op, dims)?;
    let (storage, layout) = mask.values.storage_and_layout();
    let Storage::Cuda(cuda) = &*storage else {
        candle_core::bail!("{op}: the mask must be on the CUDA device")
    };
    f(Some(mask.input(op, (cuda, layout))?))
}

/// The emulator's form of `mask`, whose values `view` holds.
#[cfg(feature = "cuda-emu")]
fn emulator_mask<'m>(
    op: &str,
    mask: Option<&Mask>,
    view: Option<MaskView<'m, f32>>,
) -> Result<Option<super::cuda::attention::MaskInput<&'m [f32]>>> {
    mask.zip(view).map(|(m, v)| m.input(op, v.values)).transpose()
}

/// Sizes of one call: `n` slices of `lq` queries and `lk` keys, widths `d` and `dv`, the
/// tensors holding `heads` heads side by side in their rows (`[n / heads, l, heads * width]`;
/// one head is the packed `[n, l, width]`).
#[derive(Debug, Clone, Copy)]
struct Dims {
    n: usize,
    lq: usize,
    lk: usize,
    d: usize,
    dv: usize,
    heads: usize,
}

impl Dims {
    /// Whether the call is big enough for the thread pool (by score-matrix elements).
    fn parallel(&self) -> bool {
        self.n > 1 && self.n * self.lq * self.lk >= PAR_MIN_ELEMENTS
    }

    fn new(op: &str, heads: usize, q: &Layout, k: &Layout, v: &Layout) -> Result<Self> {
        let (&[n, lq, wq], &[nk, lk, wk], &[nv, lv, wv]) = (q.dims(), k.dims(), v.dims()) else {
            candle_core::bail!(
                "{op}: expected 3-D q, k, v, got {:?}, {:?}, {:?}",
                q.dims(),
                k.dims(),
                v.dims()
            )
        };
        if nk != n || nv != n || wk != wq || lv != lk || heads == 0 || wq % heads != 0 || wv % heads != 0 {
            candle_core::bail!(
                "{op}: mismatched q {:?}, k {:?}, v {:?} for {heads} heads",
                q.dims(),
                k.dims(),
                v.dims()
            );
        }
        Ok(Dims {
            n: n * heads,
            lq,
            lk,
            d: wq / heads,
            dv: wv / heads,
            heads,
        })
    }

    /// The sizes of a backward call from its packed inputs `q`, `[k | v]` and `[dO | delta]`
    /// (each row holding every head's columns of the first part, then every head's of the
    /// second).
    fn packed(op: &str, heads: usize, q: &Layout, kv: &Layout, go: &Layout) -> Result<Self> {
        let (&[n, lq, wq], &[_, lk, wkv], &[_, _, wg]) = (q.dims(), kv.dims(), go.dims()) else {
            candle_core::bail!("{op}: expected 3-D inputs");
        };
        let fits = heads > 0 && wq % heads == 0 && wkv % heads == 0 && wkv >= wq;
        if !fits || wg != wkv - wq + heads {
            candle_core::bail!(
                "{op}: mismatched packed inputs {:?}, {:?} for {heads} heads",
                kv.dims(),
                go.dims()
            );
        }
        Ok(Dims {
            n: n * heads,
            lq,
            lk,
            d: wq / heads,
            dv: (wkv - wq) / heads,
            heads,
        })
    }

    /// Slice `i`'s `rows` rows of the given parts of a tensor with rows of `row_len`, each part
    /// `(offset, width)` holding every head's `width` columns from `offset`: packed, one head's
    /// parts after another. Borrowed where the slice is already one contiguous block.
    fn gather<'a, T: Copy>(
        &self,
        src: &'a [T],
        i: usize,
        (rows, row_len): (usize, usize),
        parts: &[(usize, usize)],
    ) -> Cow<'a, [T]> {
        let (b, h) = (i / self.heads, i % self.heads);
        let block = &src[b * rows * row_len..(b + 1) * rows * row_len];
        if self.heads == 1 && parts.iter().map(|&(_, w)| w).sum::<usize>() == row_len {
            return Cow::Borrowed(block);
        }
        let mut out = Vec::with_capacity(rows * row_len / self.heads);
        for row in block.chunks(row_len) {
            for &(offset, w) in parts {
                out.extend_from_slice(&row[offset + h * w..offset + (h + 1) * w]);
            }
        }
        Cow::Owned(out)
    }

    /// Appends to `out` the tensor of per-slice blocks `[rows, width]` (at `offset` in each of
    /// `per_slice`'s chunks of `stride`) in this call's layout, `[n / heads, rows, heads * width]`.
    fn scatter<T: Real>(
        &self,
        per_slice: &[T],
        stride: usize,
        (offset, rows, width): (usize, usize, usize),
        out: &mut Vec<T>,
    ) {
        let start = out.len();
        out.resize(start + self.n * rows * width, T::zero());
        let dst = &mut out[start..];
        let row_len = self.heads * width;
        for (i, slice) in per_slice.chunks(stride).enumerate() {
            let (b, h) = (i / self.heads, i % self.heads);
            for (r, src) in slice[offset..offset + rows * width].chunks(width.max(1)).enumerate() {
                let at = (b * rows + r) * row_len + h * width;
                dst[at..at + width].copy_from_slice(src);
            }
        }
    }

    /// Elements of the backward output `[dq | dk | dv]`.
    fn grad_len(&self) -> usize {
        self.n * (self.lq * self.d + self.lk * self.d + self.lk * self.dv)
    }

    /// The sizes as the GPU kernels take them.
    #[cfg(any(feature = "wgpu", feature = "cuda", feature = "cuda-emu"))]
    fn sizes(&self, scale: f64) -> Sizes {
        let Dims { n, lq, lk, d, dv, .. } = *self;
        Sizes {
            n,
            lq,
            lk,
            d,
            dv,
            scale,
        }
    }
}

/// The sizes of one call as the GPU kernels take them: `n` slices of `lq` queries and `lk` keys,
/// widths `d` and `dv`, and the score scale.
#[cfg(any(feature = "wgpu", feature = "cuda", feature = "cuda-emu"))]
#[derive(Debug, Clone, Copy)]
pub(crate) struct Sizes {
    pub n: usize,
    pub lq: usize,
    pub lk: usize,
    pub d: usize,
    pub dv: usize,
    pub scale: f64,
}

#[cfg(any(feature = "wgpu", feature = "cuda", feature = "cuda-emu"))]
impl Sizes {
    /// The integer sizes the GPU kernels take first, in their order.
    pub fn named(&self) -> [(&'static str, usize); 5] {
        [
            ("n", self.n),
            ("lq", self.lq),
            ("lk", self.lk),
            ("d", self.d),
            ("dv", self.dv),
        ]
    }
}

/// `p = softmax(scale * q k^T + mask)` for `rows` queries of one slice, into `p` `[rows, lk]`.
fn probabilities<T: Real>(
    (rows, lk, d): (usize, usize, usize),
    (q, k): (&[T], &[T]),
    mask: Option<&[T]>,
    scale: T,
    p: &mut [T],
    parallel: bool,
) {
    matmul(
        p,
        lk,
        Mat::rows(q, d),
        Mat::rows_t(k, d),
        (rows, lk, d),
        scale,
        false,
        parallel,
    );
    if let Some(mask) = mask {
        p.iter_mut().zip(mask).for_each(|(s, &m)| *s += m);
    }
    p.chunks_mut(lk.max(1)).for_each(T::softmax_row);
}

/// The exponentials of the forward pass, transposed: `e^T = exp(s^T - max)` of the scores
/// `s^T = scale * k q^T + mask^T` for `rows` queries of one slice into `et` `[lk, rows]`, a query
/// per column, and each query's `1 / sum` into `inv` (`max` is scratch). The softmax then runs
/// down the rows of keys with the queries in the vector lanes, and the product with `v` has the
/// queries, not the head width, as its long side: with narrow heads (8 or 16 channels) the
/// row-major product runs gemm's narrowest tiles, half empty. (The backward pass keeps the
/// row-major blocks of [`probabilities`] and turns its key-side products around instead:
/// transposed blocks there made gemm repack them, measured slower.)
fn exponentials_t<T: Real>(
    (rows, lk, d): (usize, usize, usize),
    (q, k): (&[T], &[T]),
    mask: Option<&[T]>,
    scale: T,
    et: &mut [T],
    (max, inv): (&mut [T], &mut [T]),
    parallel: bool,
) {
    matmul(
        et,
        rows,
        Mat::rows(k, d),
        Mat::rows_t(q, d),
        (lk, rows, d),
        scale,
        false,
        parallel,
    );
    if let Some(mask) = mask {
        for (j, row) in et.chunks_mut(rows).enumerate() {
            row.iter_mut().enumerate().for_each(|(r, s)| *s += mask[r * lk + j]);
        }
    }
    max.fill(T::neg_infinity());
    et.chunks(rows).for_each(|row| T::column_max(row, max));
    inv.fill(T::zero());
    et.chunks_mut(rows).for_each(|row| T::exp_sub_sum(row, max, inv));
    inv.iter_mut().for_each(|s| *s = T::one() / *s);
}

/// Writes the transpose of the row-major `[rows, cols]` matrix `src` into `dst` (`[cols, rows]`).
fn transpose_into<T: Copy>(src: &[T], (rows, cols): (usize, usize), dst: &mut [T]) {
    for (c, out) in dst.chunks_mut(rows.max(1)).take(cols).enumerate() {
        out.iter_mut().enumerate().for_each(|(r, v)| *v = src[r * cols + c]);
    }
}

/// Query rows per block of a slice, so that a block's probabilities (and, backward, their
/// gradient) stay in the core's cache instead of a whole `lq x lk` matrix going to memory
/// between the product that writes it, the softmax and the product that reads it; at least 64,
/// the inner dimension of the key-side gradient products.
fn query_block(lq: usize, lk: usize) -> usize {
    (QUERY_BLOCK_ELEMENTS / lk.max(1)).max(64).min(lq.max(1))
}

/// Probabilities per query block (64K f32, 256 KiB).
const QUERY_BLOCK_ELEMENTS: usize = 1 << 16;

/// The fused attention kernels with their mask: the forward pass on `(q, k, v)`, or (`GRAD`)
/// the backward pass on `(q, [k | v], [dO | delta])`, output `[dq | dk | dv]` flattened.
struct Attention<const GRAD: bool> {
    scale: f64,
    mask: Option<Mask>,
    /// Heads side by side in the tensors' rows (1: packed slices), see [`attention_heads`].
    heads: usize,
}

impl<const GRAD: bool> Attention<GRAD> {
    /// `O` `[n, lq, dv]` from `(q, k, v)`.
    fn cpu_forward<T: Real>(&self, dims: &Dims, (q, k, v): (&[T], &[T], &[T]), mask: Option<MaskView<T>>) -> Vec<T> {
        let Dims { lq, lk, d, dv, .. } = *dims;
        let scale = T::from_f64(self.scale);
        let mut out = vec![T::zero(); dims.n * lq * dv];
        // Threads across slices when there are several, else inside the products.
        let inner = !dims.parallel();
        let qb = query_block(lq, lk);
        for_each_chunk(&mut out, lq * dv, dims.parallel(), |i, o| {
            if lk == 0 {
                // No keys: an empty sum, as the composed ops give.
                return;
            }
            let (mut et, mut ot) = (vec![T::zero(); qb * lk], vec![T::zero(); qb * dv]);
            let (mut max, mut inv) = (vec![T::zero(); qb], vec![T::zero(); qb]);
            let h = dims.heads;
            let qi = dims.gather(q, i, (lq, h * d), &[(0, d)]);
            let ki = dims.gather(k, i, (lk, h * d), &[(0, d)]);
            let vi = dims.gather(v, i, (lk, h * dv), &[(0, dv)]);
            let mi = mask.map(|m| m.slice(i, lq * lk));
            for q0 in (0..lq).step_by(qb) {
                let rows = qb.min(lq - q0);
                let (et, ot) = (&mut et[..lk * rows], &mut ot[..dv * rows]);
                let (max, inv) = (&mut max[..rows], &mut inv[..rows]);
                exponentials_t(
                    (rows, lk, d),
                    (&qi[q0 * d..(q0 + rows) * d], &ki),
                    mi.map(|m| &m[q0 * lk..(q0 + rows) * lk]),
                    scale,
                    et,
                    (max, inv),
                    inner,
                );
                // O^T = V^T E^T [dv, rows], then O = (O^T)^T / sum.
                matmul(
                    ot,
                    rows,
                    Mat::rows_t(&vi, dv),
                    Mat::rows(et, rows),
                    (dv, rows, lk),
                    T::one(),
                    false,
                    inner,
                );
                let ob = &mut o[q0 * dv..(q0 + rows) * dv];
                transpose_into(ot, (dv, rows), ob);
                for (orow, &s) in ob.chunks_mut(dv.max(1)).zip(inv.iter()) {
                    orow.iter_mut().for_each(|v| *v *= s);
                }
            }
        });
        if dims.heads == 1 {
            return out;
        }
        let mut placed = Vec::new();
        dims.scatter(&out, lq * dv, (0, lq, dv), &mut placed);
        placed
    }

    /// `[dq | dk | dv]`, each over all slices.
    fn cpu_backward<T: Real>(&self, dims: &Dims, (q, kv, go): (&[T], &[T], &[T]), mask: Option<MaskView<T>>) -> Vec<T> {
        let Dims {
            n,
            lq,
            lk,
            d,
            dv,
            heads,
        } = *dims;
        let scale = T::from_f64(self.scale);
        // Per slice `[dq_i | dk_i | dv_i]`, regrouped by tensor at the end.
        let (sq, sk, sv) = (lq * d, lk * d, lk * dv);
        let mut per_slice = vec![T::zero(); n * (sq + sk + sv)];
        let inner = !dims.parallel();
        let qb = query_block(lq, lk);
        for_each_chunk(&mut per_slice, sq + sk + sv, dims.parallel(), |i, out| {
            let (dqi, rest) = out.split_at_mut(sq);
            let (dki, dvi) = rest.split_at_mut(sk);
            let qi = dims.gather(q, i, (lq, heads * d), &[(0, d)]);
            let ki = dims.gather(kv, i, (lk, heads * (d + dv)), &[(0, d)]);
            let vi = dims.gather(kv, i, (lk, heads * (d + dv)), &[(heads * d, dv)]);
            let goi = dims.gather(go, i, (lq, heads * (dv + 1)), &[(0, dv), (heads * dv, 1)]);
            let mi = mask.map(|m| m.slice(i, lq * lk));
            let (mut p, mut dp) = (vec![T::zero(); qb * lk], vec![T::zero(); qb * lk]);
            // dV^T and dK^T `[width, lk]`: with the keys as the products' long side, gemm runs
            // wide tiles and reads the row-major P and dS without repacking them (dV and dK
            // themselves, `[lk, width]`, put the head width there: 8 to 40 for the UNets).
            let (mut dvt, mut dkt) = (vec![T::zero(); dv * lk], vec![T::zero(); d * lk]);
            for q0 in (0..lq).step_by(qb) {
                let rows = qb.min(lq - q0);
                let (p, dp) = (&mut p[..rows * lk], &mut dp[..rows * lk]);
                let qr = &qi[q0 * d..(q0 + rows) * d];
                let gr = &goi[q0 * (dv + 1)..(q0 + rows) * (dv + 1)];
                let g = Mat {
                    data: gr,
                    rs: dv + 1,
                    cs: 1,
                };
                probabilities(
                    (rows, lk, d),
                    (qr, &ki),
                    mi.map(|m| &m[q0 * lk..(q0 + rows) * lk]),
                    scale,
                    p,
                    inner,
                );
                // dV^T += dO^T P; dP = dO V^T; dS = P * (dP - delta), over this block's queries.
                let more = q0 > 0;
                let go_t = Mat {
                    data: gr,
                    rs: 1,
                    cs: dv + 1,
                };
                matmul(
                    &mut dvt,
                    lk,
                    go_t,
                    Mat::rows(p, lk),
                    (dv, lk, rows),
                    T::one(),
                    more,
                    inner,
                );
                matmul(dp, lk, g, Mat::rows_t(&vi, dv), (rows, lk, dv), T::one(), false, inner);
                for (r, (dpr, pr)) in dp.chunks_mut(lk.max(1)).zip(p.chunks(lk.max(1))).enumerate() {
                    let delta = gr[r * (dv + 1) + dv];
                    for (x, &pv) in dpr.iter_mut().zip(pr) {
                        *x = pv * (*x - delta);
                    }
                }
                // dQ = scale dS K; dK^T += scale Q^T dS.
                matmul(
                    &mut dqi[q0 * d..(q0 + rows) * d],
                    d,
                    Mat::rows(dp, lk),
                    Mat::rows(&ki, d),
                    (rows, d, lk),
                    scale,
                    false,
                    inner,
                );
                matmul(
                    &mut dkt,
                    lk,
                    Mat::rows_t(qr, d),
                    Mat::rows(dp, lk),
                    (d, lk, rows),
                    scale,
                    more,
                    inner,
                );
            }
            transpose_into(&dvt, (dv, lk), dvi);
            transpose_into(&dkt, (d, lk), dki);
        });
        let mut out = Vec::with_capacity(per_slice.len());
        for part in [(0, lq, d), (sq, lk, d), (sq + sk, lk, dv)] {
            dims.scatter(&per_slice, sq + sk + sv, part, &mut out);
        }
        out
    }

    /// The CUDA job of this pass with `mask`.
    #[cfg(any(feature = "cuda", feature = "cuda-emu"))]
    fn job<I>(
        &self,
        dtype: DType,
        dims: &Dims,
        [a, b, c]: [I; 3],
        mask: Option<super::cuda::attention::MaskInput<I>>,
    ) -> crate::Result<super::cuda::Job<I>> {
        let sizes = dims.sizes(self.scale);
        if GRAD {
            super::cuda::attention::backward(dtype, &sizes, (a, b, c), mask)
        } else {
            super::cuda::attention::forward(dtype, &sizes, (a, b, c), mask)
        }
    }
}

impl<const GRAD: bool> Kernel<3> for Attention<GRAD> {
    const NAME: &'static str = if GRAD { "attention-grad" } else { "attention" };

    type Call = Dims;

    fn call(&self, [l1, l2, l3]: [&Layout; 3]) -> Result<(Dims, Shape)> {
        if GRAD {
            let dims = Dims::packed(Self::NAME, self.heads, l1, l2, l3)?;
            Ok((dims, Shape::from(dims.grad_len())))
        } else {
            let dims = Dims::new(Self::NAME, self.heads, l1, l2, l3)?;
            let shape = (dims.n / self.heads, dims.lq, dims.dv * self.heads);
            Ok((dims, Shape::from(shape)))
        }
    }

    fn cpu<T: Real>(&self, dims: &Dims, [a, b, c]: [&[T]; 3]) -> Result<Vec<T>> {
        with_mask(Self::NAME, dims, self.mask.as_ref(), |mask| {
            if GRAD {
                self.cpu_backward(dims, (a, b, c), mask)
            } else {
                self.cpu_forward(dims, (a, b, c), mask)
            }
        })
    }

    #[cfg(feature = "wgpu")]
    fn wgpu(&self, dims: &Dims, inputs: [&[f32]; 3]) -> crate::Result<CpuStorage> {
        // The shaders take packed slices; side-by-side heads never reach them (see
        // `attention_heads`), and would run here on the CPU.
        if self.heads > 1 {
            return Ok(CpuStorage::F32(self.cpu(dims, inputs)?));
        }
        with_mask(Self::NAME, dims, self.mask.as_ref(), |mask| {
            let sizes = dims.sizes(self.scale);
            if GRAD {
                super::wgpu::attention::backward(&sizes, inputs, mask)
            } else {
                super::wgpu::attention::forward(&sizes, inputs, mask)
            }
        })?
    }

    #[cfg(feature = "cuda-emu")]
    fn cuda_emu(&self, dims: &Dims, inputs: [&[f32]; 3]) -> crate::Result<Option<CpuStorage>> {
        if self.heads > 1 || !cuda_takes(dims.d, dims.dv, self.mask.as_ref()) {
            return Ok(None);
        }
        let out = with_mask(Self::NAME, dims, self.mask.as_ref(), |view| {
            let mask = emulator_mask(Self::NAME, self.mask.as_ref(), view)?;
            self.job(DType::F32, dims, inputs, mask).and_then(super::cuda::emu::run)
        })??;
        Ok(Some(out))
    }

    #[cfg(feature = "cuda")]
    fn cuda(&self, dims: &Dims, inputs: [super::cuda::device::Input<'_>; 3]) -> Result<CudaStorage> {
        if self.heads > 1 {
            candle_core::bail!("{}: the CUDA kernels take packed heads only", Self::NAME)
        }
        with_cuda_mask(Self::NAME, dims, self.mask.as_ref(), |mask| {
            let job = self
                .job(inputs[0].0.dtype(), dims, inputs, mask)
                .map_err(candle_core::Error::wrap)?;
            super::cuda::device::run(job)
        })
    }

    fn backward(&self, [q, k, v]: [&Tensor; 3], res: &Tensor, grad: &Tensor) -> Result<[Option<Tensor>; 3]> {
        if GRAD {
            return Err(candle_core::Error::BackwardNotSupported { op: Self::NAME });
        }
        // Packed so that the backward kernel fits three inputs: [k | v] and [dO | rowsum(dO * O)].
        // In the kernels' dtype (f32 for half types on the CPU): rowsum(dO * O) rounded to
        // bf16 would cancel badly against dP in the kernel.
        let dt = kernel_dtype(q);
        let grad = grad.contiguous()?.to_dtype(dt)?;
        let (n, l, w) = grad.dims3()?;
        let per_head = (n, l, self.heads, w / self.heads);
        let delta = (grad.reshape(per_head)? * res.to_dtype(dt)?.reshape(per_head)?)?.sum(D::Minus1)?;
        let kv = Tensor::cat(&[k, v], D::Minus1)?;
        let go = Tensor::cat(&[&grad, &delta], D::Minus1)?;
        let grad_op = Attention::<true> {
            scale: self.scale,
            mask: self.mask.clone(),
            heads: self.heads,
        };
        let all = q.apply_op3_no_bwd(&kv, &go, &Fused(grad_op))?;
        let (nq, nk, nv) = (q.elem_count(), k.elem_count(), v.elem_count());
        let dq = all.narrow(0, 0, nq)?.reshape(q.shape())?;
        let dk = all.narrow(0, nq, nk)?.reshape(k.shape())?;
        let dv = all.narrow(0, nq + nk, nv)?.reshape(v.shape())?;
        Ok([Some(dq), Some(dk), Some(dv)])
    }
}
