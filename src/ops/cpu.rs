//! Shared pieces of the CPU kernels: element types, contiguous slices of storages, and a
//! strided matrix product on the `gemm` crate (the one candle's CPU matmul uses).

use std::borrow::Cow;

use candle_core::{bail, CpuStorage, Layout, Result, WithDType};
use rayon::prelude::*;

/// The element types the CPU kernels run in (f32, and f64 for finite-difference tests), with
/// the row loops that f32 runs vectorised ([`super::lanes`]).
pub(crate) trait Real: WithDType + num_traits::Float + Send + Sync + std::iter::Sum + 'static {
    /// Softmax of one row in place (max-subtracted).
    fn softmax_row(row: &mut [Self]) {
        let max = row.iter().copied().fold(Self::neg_infinity(), num_traits::Float::max);
        let mut sum = Self::zero();
        for v in row.iter_mut() {
            *v = (*v - max).exp();
            sum += *v;
        }
        let inv = Self::one() / sum;
        row.iter_mut().for_each(|v| *v *= inv);
    }

    /// The sum and the sum of squares of a row, in f64.
    fn sum_and_squares(row: &[Self]) -> (f64, f64) {
        super::lanes::sum_and_squares_of(row)
    }
    /// `max[i] = max(max[i], row[i])` (see [`super::lanes::column_max`]).
    fn column_max(row: &[Self], max: &mut [Self]) {
        for (m, &v) in max.iter_mut().zip(row) {
            *m = num_traits::Float::max(*m, v);
        }
    }
    /// `row[i] = exp(row[i] - max[i])`, `sum[i] += row[i]` (see [`super::lanes::exp_sub_sum`]).
    fn exp_sub_sum(row: &mut [Self], max: &[Self], sum: &mut [Self]) {
        for ((v, &m), s) in row.iter_mut().zip(max).zip(sum.iter_mut()) {
            *v = (*v - m).exp();
            *s += *v;
        }
    }
    /// SiLU in place: `x / (1 + exp(-x))`.
    fn silu(xs: &mut [Self]) {
        xs.iter_mut().for_each(|x| *x = *x / (Self::one() + (-*x).exp()));
    }

    /// The gradient through SiLU in place: `ys` holds SiLU's inputs `y` and becomes
    /// `dy * s (1 + y (1 - s))`, `s = sigmoid(y)`.
    fn silu_grad(ys: &mut [Self], dy: &[Self]) {
        for (y, &g) in ys.iter_mut().zip(dy) {
            let s = Self::one() / (Self::one() + (-*y).exp());
            *y = g * s * (Self::one() + *y * (Self::one() - s));
        }
    }

    /// GEGLU of one row, `o = a * gelu(b)` (exact GELU, computed in f64).
    fn geglu(o: &mut [Self], a: &[Self], b: &[Self]) {
        for ((o, &a), &b) in o.iter_mut().zip(a).zip(b) {
            let b64 = <Self as WithDType>::to_f64(b);
            *o = a * <Self as WithDType>::from_f64(b64 * gelu_parts(b64).0);
        }
    }

    /// GEGLU's gradient of one row: `da = dy gelu(b)`, `db = dy a gelu'(b)`.
    fn geglu_grad(da: &mut [Self], db: &mut [Self], a: &[Self], b: &[Self], dy: &[Self]) {
        let wide = <Self as WithDType>::to_f64;
        for j in 0..da.len() {
            let (g, b64) = (wide(dy[j]), wide(b[j]));
            let (cdf, xpdf) = gelu_parts(b64);
            da[j] = <Self as WithDType>::from_f64(g * b64 * cdf);
            db[j] = <Self as WithDType>::from_f64(g * wide(a[j]) * (cdf + xpdf));
        }
    }
}

/// `(Phi(x), x phi(x))` in f64: GELU is `x Phi(x)`, its derivative `Phi(x) + x phi(x)`.
fn gelu_parts(x: f64) -> (f64, f64) {
    let cdf = 0.5 * (1.0 + candle_core::cpu::erf::erf_f64(x * std::f64::consts::FRAC_1_SQRT_2));
    let pdf = (-0.5 * x * x).exp() / (2.0 * std::f64::consts::PI).sqrt();
    (cdf, x * pdf)
}

impl Real for f32 {
    fn softmax_row(row: &mut [f32]) {
        super::lanes::softmax_row(row);
    }

    fn sum_and_squares(row: &[f32]) -> (f64, f64) {
        super::lanes::sum_and_squares(row)
    }
    fn column_max(row: &[f32], max: &mut [f32]) {
        super::lanes::column_max(row, max);
    }
    fn exp_sub_sum(row: &mut [f32], max: &[f32], sum: &mut [f32]) {
        super::lanes::exp_sub_sum(row, max, sum);
    }
    fn silu(xs: &mut [f32]) {
        super::lanes::silu(xs);
    }

    fn silu_grad(ys: &mut [f32], dy: &[f32]) {
        super::lanes::silu_grad(ys, dy);
    }

    fn geglu(o: &mut [f32], a: &[f32], b: &[f32]) {
        super::lanes::geglu(o, a, b);
    }

    fn geglu_grad(da: &mut [f32], db: &mut [f32], a: &[f32], b: &[f32], dy: &[f32]) {
        super::lanes::geglu_grad(da, db, a, b, dy);
    }
}

impl Real for f64 {}

/// Calls `$body` with `$t` bound to the Rust type of `$storage` (f32 or f64), else errors naming
/// the op.
macro_rules! dispatch_real {
    ($op:expr, $storage:expr, $t:ident => $body:expr) => {{
        use candle_core::WithDType as _;
        match $storage {
            candle_core::CpuStorage::F32(_) => {
                type $t = f32;
                $body
            }
            candle_core::CpuStorage::F64(_) => {
                type $t = f64;
                $body
            }
            _ => candle_core::bail!("{}: unsupported dtype (the CPU kernels take f32 or f64)", $op),
        }
    }};
}
pub(crate) use dispatch_real;

/// The contiguous elements of `storage` under `layout`, or an error naming `op`.
pub(crate) fn slice<'a, T: WithDType>(op: &str, storage: &'a CpuStorage, layout: &Layout) -> Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&T::cpu_storage_as_slice(storage)?[start..end]),
        None => bail!("{op}: the input must be contiguous"),
    }
}

/// A read-only strided matrix: element `(i, j)` is `data[i * rs + j * cs]`.
#[derive(Clone, Copy)]
pub(crate) struct Mat<'a, T> {
    pub data: &'a [T],
    pub rs: usize,
    pub cs: usize,
}

impl<'a, T> Mat<'a, T> {
    /// A row-major matrix with `cols` columns.
    pub fn rows(data: &'a [T], cols: usize) -> Self {
        Mat { data, rs: cols, cs: 1 }
    }

    /// The transpose of a row-major matrix with `cols` columns.
    pub fn rows_t(data: &'a [T], cols: usize) -> Self {
        Mat { data, rs: 1, cs: cols }
    }
}

/// Whether the index range a `m x n` matrix with these strides touches fits `len`.
fn fits(len: usize, m: usize, n: usize, rs: usize, cs: usize) -> bool {
    m == 0 || n == 0 || (m - 1) * rs + (n - 1) * cs < len
}

/// `dst = (accumulate ? dst : 0) + alpha * lhs @ rhs` for `lhs` `m x k`, `rhs` `k x n`, `dst`
/// `m x n` row-major with row stride `dst_rs`; threaded when `parallel` and the product is big.
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul<T: Real>(
    dst: &mut [T],
    dst_rs: usize,
    lhs: Mat<T>,
    rhs: Mat<T>,
    (m, n, k): (usize, usize, usize),
    alpha: T,
    accumulate: bool,
    parallel: bool,
) {
    assert!(fits(dst.len(), m, n, dst_rs, 1), "matmul: dst out of bounds");
    if k == 0 && !accumulate {
        for i in 0..m {
            dst[i * dst_rs..i * dst_rs + n].fill(T::zero());
        }
    }
    // SAFETY: `dst` holds the `m x n` matrix (checked above) and is borrowed mutably, so it
    // cannot alias the inputs.
    unsafe {
        gemm_into(
            dst.as_mut_ptr(),
            dst_rs,
            lhs,
            rhs,
            (m, n, k),
            alpha,
            accumulate,
            parallel,
        )
    }
}

/// `alpha * lhs @ rhs` as a new row-major `m x n` matrix, written by the product without being
/// zero-filled first (a memset of every output otherwise).
pub(crate) fn product<T: Real>(
    lhs: Mat<T>,
    rhs: Mat<T>,
    (m, n, k): (usize, usize, usize),
    alpha: T,
    parallel: bool,
) -> Vec<T> {
    if k == 0 {
        return vec![T::zero(); m * n];
    }
    let mut out = Vec::with_capacity(m * n);
    // SAFETY: the spare capacity holds `m * n` elements; with `accumulate` false the product
    // writes every one of them without reading any, so all are initialised before `set_len`.
    unsafe {
        gemm_into(out.as_mut_ptr(), n, lhs, rhs, (m, n, k), alpha, false, parallel);
        out.set_len(m * n);
    }
    out
}

/// The product of [`matmul`] into the `m x n` matrix at `dst` (row stride `dst_rs`).
///
/// # Safety
/// `dst` must be valid for writes (and, when `accumulate`, reads) of the matrix, and must not
/// alias `lhs` or `rhs`; with `k > 0` every element is written.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_into<T: Real>(
    dst: *mut T,
    dst_rs: usize,
    lhs: Mat<T>,
    rhs: Mat<T>,
    (m, n, k): (usize, usize, usize),
    alpha: T,
    accumulate: bool,
    parallel: bool,
) {
    assert!(fits(lhs.data.len(), m, k, lhs.rs, lhs.cs), "matmul: lhs out of bounds");
    assert!(fits(rhs.data.len(), k, n, rhs.rs, rhs.cs), "matmul: rhs out of bounds");
    if m == 0 || n == 0 || k == 0 {
        return;
    }
    let threads = candle_core::utils::get_num_threads();
    // Below ~2M multiply-adds (a fraction of a millisecond) the hand-off to the pool costs more.
    let par = if parallel && threads > 1 && m * n * k > 1 << 21 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the inputs' bounds were checked above; the caller vouches for `dst`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_rs as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs.cs as isize,
            lhs.rs as isize,
            rhs.data.as_ptr(),
            rhs.cs as isize,
            rhs.rs as isize,
            T::one(),
            alpha,
            false,
            false,
            false,
            par,
        )
    }
}

/// `sum f(a_i, b_i)` over two equally long slices, blocked: sixteen lanes in the element type
/// within blocks of 256 elements (rounding stays at the level of a 16-term sum), the blocks
/// added in f64. A single running sum would be bound by the latency of each addition and drift
/// in f32; lanes vectorise.
pub(crate) fn sum_zip<T: Real>(a: &[T], b: &[T], f: impl Fn(T, T) -> T) -> f64 {
    const LANES: usize = 16;
    const BLOCK: usize = 256;
    let mut total = 0f64;
    for (ba, bb) in a.chunks(BLOCK).zip(b.chunks(BLOCK)) {
        let mut acc = [T::zero(); LANES];
        let (ca, cb) = (ba.chunks_exact(LANES), bb.chunks_exact(LANES));
        let (ra, rb) = (ca.remainder(), cb.remainder());
        for (x, y) in ca.zip(cb) {
            for l in 0..LANES {
                acc[l] += f(x[l], y[l]);
            }
        }
        total += acc.iter().map(|&v| WithDType::to_f64(v)).sum::<f64>();
        total += ra
            .iter()
            .zip(rb)
            .map(|(&x, &y)| WithDType::to_f64(f(x, y)))
            .sum::<f64>();
    }
    total
}

/// Elements a kernel must touch before it hands work to the thread pool: a job sent from outside
/// the pool costs a thread switch each way, more than small tensors (the tiny demo model's) take.
pub(crate) const PAR_MIN_ELEMENTS: usize = 1 << 16;

/// Chunks per thread-pool task for chunks of `len` elements: short rows (layer norm, softmax)
/// are batched to about 16K elements a task, so each task has work.
fn chunks_per_task(len: usize) -> usize {
    (16384 / len.max(1)).max(1)
}

/// Runs `f(i, chunk_i)` over the `len`-element chunks of `out`: on the thread pool when
/// `parallel`, else on the calling thread.
pub(crate) fn for_each_chunk<U: Send>(
    out: &mut [U],
    len: usize,
    parallel: bool,
    f: impl Fn(usize, &mut [U]) + Sync + Send,
) {
    let len = len.max(1);
    if parallel {
        out.par_chunks_mut(len)
            .enumerate()
            .with_min_len(chunks_per_task(len))
            .for_each(|(i, c)| f(i, c));
    } else {
        out.chunks_mut(len).enumerate().for_each(|(i, c)| f(i, c));
    }
}

/// [`for_each_chunk`] over two outputs chunked in step: `f(i, a_i, b_i)`.
pub(crate) fn for_each_chunk2<U: Send, V: Send>(
    (a, la): (&mut [U], usize),
    (b, lb): (&mut [V], usize),
    parallel: bool,
    f: impl Fn(usize, &mut [U], &mut [V]) + Sync + Send,
) {
    let (la, lb) = (la.max(1), lb.max(1));
    if parallel {
        a.par_chunks_mut(la)
            .zip(b.par_chunks_mut(lb))
            .enumerate()
            .with_min_len(chunks_per_task(la))
            .for_each(|(i, (x, y))| f(i, x, y));
    } else {
        a.chunks_mut(la)
            .zip(b.chunks_mut(lb))
            .enumerate()
            .for_each(|(i, (x, y))| f(i, x, y));
    }
}

/// The elements of `storage` as `T`: borrowed when they are `T` already, else widened from bf16
/// or f16 (exactly, as a cast would).
pub(crate) fn widened<'a, T: candle_core::WithDType + num_traits::Float>(
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

/// The elements of a contiguous CPU tensor's storage as `T` (see [`widened`]), or an error
/// naming `op`.
pub(crate) fn tensor_values<'a, T: candle_core::WithDType + num_traits::Float>(
    op: &str,
    storage: &'a candle_core::Storage,
    layout: &Layout,
) -> Result<Cow<'a, [T]>> {
    let candle_core::Storage::Cpu(cpu) = storage else {
        bail!("{op}: a tensor is not on the CPU");
    };
    widened::<T>(op, cpu, layout)
}

/// `values` rounded to the half type of `like` (bf16 unless it is f16).
pub(crate) fn narrowed(like: &CpuStorage, values: Vec<f32>) -> CpuStorage {
    match like {
        CpuStorage::F16(_) => CpuStorage::F16(values.into_iter().map(half::f16::from_f32).collect()),
        _ => CpuStorage::BF16(values.into_iter().map(half::bf16::from_f32).collect()),
    }
}
