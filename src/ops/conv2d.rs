//! 2-D convolution (groups 1, no dilation) as an implicit GEMM: the input is unfolded (im2col)
//! a band of output rows at a time, so the unfolded buffer stays small, and both gradients are
//! GEMMs too (the input gradient folds back with col2im). candle's own CPU backward runs a direct
//! conv_transpose2d loop for the input gradient, which dominates training time.

#[cfg(any(feature = "wgpu", feature = "cuda-emu"))]
use candle_core::CpuStorage;
use candle_core::{DType, Layout, Result, Shape, Tensor};

use super::cpu::{for_each_chunk, matmul, Mat, Real, PAR_MIN_ELEMENTS};
use super::kernel::{Fused, Kernel};

/// The composed reference: candle's `conv2d` (`x` `[B, C_in, H, W]`, `w` `[C_out, C_in, kh, kw]`).
pub fn reference(x: &Tensor, w: &Tensor, stride: usize, padding: usize) -> Result<Tensor> {
    x.conv2d(w, padding, stride, 1, 1)
}

/// Whether the fused kernel takes a convolution of `x` by `w` in `groups` groups (given a
/// stride of at least 1 and a kernel that fits the padded input).
pub fn kernel_takes(x: &Tensor, w: &Tensor, groups: usize) -> bool {
    groups == 1 && super::use_kernel(super::KernelOp::Conv2d, &[x, w])
}

/// `x * w` with zero padding `padding` and stride `stride`: the fused kernel on CPU, else the
/// reference.
pub fn conv2d(x: &Tensor, w: &Tensor, stride: usize, padding: usize) -> Result<Tensor> {
    if !kernel_takes(x, w, 1) || stride == 0 {
        return reference(x, w, stride, padding);
    }
    let (_, c_in, h, wd) = x.dims4()?;
    let (_, wc, kh, kw) = w.dims4()?;
    if wc != c_in || h + 2 * padding < kh || wd + 2 * padding < kw {
        return reference(x, w, stride, padding);
    }
    x.contiguous()?
        .apply_op2(&w.contiguous()?, Fused(Conv2dOp { stride, padding }))
}

/// `x * w + b`, `b` per output channel (`[C_out]`) or per sample and channel (`[B, C_out]`, a
/// bias plus a ResNet block's time embedding): on the CPU one fused op that writes the bias into
/// the product's output, so the graph keeps one output-sized tensor instead of the product and
/// its sum with the bias; elsewhere [`conv2d`] and a broadcast add.
pub fn conv2d_biased(x: &Tensor, w: &Tensor, b: &Tensor, stride: usize, padding: usize) -> Result<Tensor> {
    let ((batch, c_in, h, wd), (c_out, wc, kh, kw)) = (x.dims4()?, w.dims4()?);
    let fits = wc == c_in && h + 2 * padding >= kh && wd + 2 * padding >= kw;
    let per_sample = match b.dims() {
        [c] if *c == c_out => false,
        [n, c] if *n == batch && *c == c_out => true,
        _ => candle_core::bail!("conv2d: bias {:?} for {batch} samples of {c_out} channels", b.dims()),
    };
    if stride == 0 || !fits || !x.device().is_cpu() || !kernel_takes(x, w, 1) || b.dtype() != x.dtype() {
        let ys = conv2d(x, w, stride, padding)?;
        let b = if per_sample {
            b.reshape((batch, c_out, 1, 1))?
        } else {
            b.reshape((1, c_out, 1, 1))?
        };
        return ys.broadcast_add(&b);
    }
    x.contiguous()?.apply_op3(
        &w.contiguous()?,
        &b.contiguous()?,
        Fused(Conv2dBiasOp(Conv2dOp { stride, padding })),
    )
}

/// Sizes of one convolution.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Geometry {
    pub b: usize,
    pub c_in: usize,
    pub h: usize,
    pub w: usize,
    pub c_out: usize,
    pub kh: usize,
    pub kw: usize,
    pub ho: usize,
    pub wo: usize,
    pub stride: usize,
    pub pad: usize,
}

/// Which product of the convolution a GPU kernel computes: each is one implicit GEMM
/// `C[M, N] = A[M, K] B[K, N]` (see `kernels/cuda/conv2d.cu`).
#[cfg(any(feature = "wgpu", feature = "cuda", feature = "cuda-emu"))]
#[derive(Debug, Clone, Copy)]
pub(crate) enum Product {
    /// `y` from `(x, w)`.
    Forward,
    /// `dx` from `(dy, w)`.
    InputGrad,
    /// `dw` from `(x, dy)`.
    WeightGrad,
}

#[cfg(any(feature = "wgpu", feature = "cuda", feature = "cuda-emu"))]
impl Product {
    /// `(M, N, K)` of the product's GEMM for the convolution `g`.
    pub fn gemm(self, g: &Geometry) -> (usize, usize, usize) {
        let (kk, l, hw) = (g.kh * g.kw, g.ho * g.wo, g.h * g.w);
        match self {
            Product::Forward => (g.c_out, g.b * l, g.c_in * kk),
            Product::InputGrad => (g.c_in, g.b * hw, g.c_out * kk),
            Product::WeightGrad => (g.c_out, g.c_in * kk, g.b * l),
        }
    }
}

/// Elements of the unfolded buffer of one band (about 16 MB of f32).
const BAND_ELEMENTS: usize = 1 << 22;

impl Geometry {
    fn new(x: &[usize], w: &[usize], stride: usize, pad: usize) -> Result<Self> {
        let (&[b, c_in, h, wd], &[c_out, wc, kh, kw]) = (x, w) else {
            candle_core::bail!("conv2d: expected 4-D input and weight, got {x:?} and {w:?}")
        };
        if wc != c_in {
            candle_core::bail!("conv2d: input has {c_in} channels, the weight {wc}");
        }
        Ok(Geometry {
            b,
            c_in,
            h,
            w: wd,
            c_out,
            kh,
            kw,
            ho: (h + 2 * pad - kh) / stride + 1,
            wo: (wd + 2 * pad - kw) / stride + 1,
            stride,
            pad,
        })
    }

    /// The sizes the GPU kernels take, in their order: the geometry, then `(M, N, K)` of
    /// `product`.
    #[cfg(any(feature = "wgpu", feature = "cuda", feature = "cuda-emu"))]
    pub fn kernel_sizes(&self, product: Product) -> [(&'static str, usize); 14] {
        let (m, n, k) = product.gemm(self);
        [
            ("batch", self.b),
            ("c_in", self.c_in),
            ("h", self.h),
            ("w", self.w),
            ("c_out", self.c_out),
            ("kh", self.kh),
            ("kw", self.kw),
            ("ho", self.ho),
            ("wo", self.wo),
            ("stride", self.stride),
            ("pad", self.pad),
            ("m", m),
            ("n", n),
            ("k", k),
        ]
    }

    /// Rows of the unfolded matrix (`C_in * kh * kw`).
    fn k(&self) -> usize {
        self.c_in * self.kh * self.kw
    }

    /// Output positions per image.
    fn l(&self) -> usize {
        self.ho * self.wo
    }

    /// A 1x1 convolution that reads the input as it is (no unfolding needed).
    fn is_pointwise(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.stride == 1 && self.pad == 0
    }

    /// Output-row bands `[oh0, oh1)` whose unfolded buffer fits [`BAND_ELEMENTS`].
    fn bands(&self) -> impl Iterator<Item = (usize, usize)> {
        let rows = (BAND_ELEMENTS / (self.k() * self.wo).max(1)).clamp(1, self.ho.max(1));
        let ho = self.ho;
        (0..ho).step_by(rows).map(move |r| (r, (r + rows).min(ho)))
    }

    /// Calls `f(band, cols, band_len)` for each band of output rows of image `x`, `cols` being
    /// its unfolded `[K, band_len]` matrix: `x` itself for a pointwise convolution, else im2col
    /// into `buf`.
    fn for_each_unfolded<T: Real>(&self, x: &[T], buf: &mut Vec<T>, mut f: impl FnMut((usize, usize), &[T], usize)) {
        if self.is_pointwise() {
            f((0, self.ho), x, self.l());
            return;
        }
        for band in self.bands() {
            let lc = (band.1 - band.0) * self.wo;
            buf.resize(self.k() * lc, T::zero());
            self.im2col(x, band, buf);
            f(band, buf, lc);
        }
    }

    /// For kernel offset `kj`: the output columns `[lo, hi)` whose input column is inside the image.
    fn valid_cols(&self, kj: usize) -> (usize, usize) {
        valid_range(kj, self.pad, self.stride, self.w, self.wo)
    }

    fn valid_rows(&self, ki: usize) -> (usize, usize) {
        valid_range(ki, self.pad, self.stride, self.h, self.ho)
    }

    /// Unfolds output rows `[oh0, oh1)` of image `x` (`[C_in, H, W]`) into `col` `[K, band]`.
    fn im2col<T: Real>(&self, x: &[T], (oh0, oh1): (usize, usize), col: &mut [T]) {
        let lc = (oh1 - oh0) * self.wo;
        let (kh, kw) = (self.kh, self.kw);
        let parallel = col.len() >= PAR_MIN_ELEMENTS;
        for_each_chunk(col, kh * kw * lc, parallel, |c, block| {
            let plane = &x[c * self.h * self.w..(c + 1) * self.h * self.w];
            for ki in 0..kh {
                let (r_lo, r_hi) = self.valid_rows(ki);
                for kj in 0..kw {
                    let (c_lo, c_hi) = self.valid_cols(kj);
                    let row = &mut block[(ki * kw + kj) * lc..(ki * kw + kj + 1) * lc];
                    for oh in oh0..oh1 {
                        let out = &mut row[(oh - oh0) * self.wo..(oh - oh0 + 1) * self.wo];
                        if oh < r_lo || oh >= r_hi || c_lo >= c_hi {
                            out.fill(T::zero());
                            continue;
                        }
                        let ih = oh * self.stride + ki - self.pad;
                        let src = &plane[ih * self.w..(ih + 1) * self.w];
                        out[..c_lo].fill(T::zero());
                        out[c_hi..].fill(T::zero());
                        if self.stride == 1 {
                            // A run of the input row: a copy, which the indexed loop is not.
                            out[c_lo..c_hi].copy_from_slice(&src[c_lo + kj - self.pad..c_hi + kj - self.pad]);
                            continue;
                        }
                        for (ow, o) in out.iter_mut().enumerate().take(c_hi).skip(c_lo) {
                            *o = src[ow * self.stride + kj - self.pad];
                        }
                    }
                }
            }
        });
    }

    /// Adds the unfolded gradient `col` `[K, band]` of output rows `[oh0, oh1)` back onto `dx`
    /// (`[C_in, H, W]`).
    fn col2im_add<T: Real>(&self, col: &[T], (oh0, oh1): (usize, usize), dx: &mut [T]) {
        let lc = (oh1 - oh0) * self.wo;
        let (kh, kw) = (self.kh, self.kw);
        let parallel = col.len() >= PAR_MIN_ELEMENTS;
        for_each_chunk(dx, self.h * self.w, parallel, |c, plane| {
            let block = &col[c * kh * kw * lc..(c + 1) * kh * kw * lc];
            for ki in 0..kh {
                let (r_lo, r_hi) = self.valid_rows(ki);
                for kj in 0..kw {
                    let (c_lo, c_hi) = self.valid_cols(kj);
                    let row = &block[(ki * kw + kj) * lc..(ki * kw + kj + 1) * lc];
                    for oh in oh0.max(r_lo)..oh1.min(r_hi) {
                        let ih = oh * self.stride + ki - self.pad;
                        let src = &row[(oh - oh0) * self.wo..(oh - oh0 + 1) * self.wo];
                        let dst = &mut plane[ih * self.w..(ih + 1) * self.w];
                        if self.stride == 1 {
                            let dst = &mut dst[c_lo + kj - self.pad..c_hi + kj - self.pad];
                            dst.iter_mut().zip(&src[c_lo..c_hi]).for_each(|(d, &g)| *d += g);
                            continue;
                        }
                        for (ow, &g) in src.iter().enumerate().take(c_hi).skip(c_lo) {
                            dst[ow * self.stride + kj - self.pad] += g;
                        }
                    }
                }
            }
        });
    }
}

/// The outputs `[lo, hi)` (of `n_out`) whose input `o * stride + k - pad` lies in `[0, n_in)`.
fn valid_range(k: usize, pad: usize, stride: usize, n_in: usize, n_out: usize) -> (usize, usize) {
    let lo = if k >= pad { 0 } else { (pad - k).div_ceil(stride) };
    // o * stride + k - pad <= n_in - 1  <=>  o <= (n_in - 1 + pad - k) / stride
    let hi = if n_in + pad > k {
        ((n_in - 1 + pad - k) / stride + 1).min(n_out)
    } else {
        0
    };
    (lo.min(hi), hi)
}

/// One of the three products of a convolution as a kernel: the forward, the input gradient or
/// the weight gradient, each from two inputs.
trait ConvKernel: Send + Sync {
    /// The op's name.
    const NAME: &'static str;

    /// The product the GPU kernels compute.
    #[cfg(any(feature = "wgpu", feature = "cuda", feature = "cuda-emu"))]
    const PRODUCT: Product;

    /// The convolution and the output shape, checked against the two inputs' layouts.
    fn geometry(&self, l1: &Layout, l2: &Layout) -> Result<(Geometry, Shape)>;

    /// The product on the CPU.
    fn run<T: Real>(&self, g: &Geometry, a: &[T], b: &[T]) -> Vec<T>;

    /// The gradients of the two inputs (the forward only; the gradient products have none).
    fn grads(&self, _inputs: [&Tensor; 2], _grad: &Tensor) -> Result<[Option<Tensor>; 2]> {
        Err(candle_core::Error::BackwardNotSupported {
            op: <Self as ConvKernel>::NAME,
        })
    }
}

impl<K: ConvKernel> Kernel<2> for K {
    const NAME: &'static str = <K as ConvKernel>::NAME;

    type Call = Geometry;

    fn call(&self, [l1, l2]: [&Layout; 2]) -> Result<(Geometry, Shape)> {
        self.geometry(l1, l2)
    }

    fn cpu<T: Real>(&self, g: &Geometry, [a, b]: [&[T]; 2]) -> Result<Vec<T>> {
        Ok(self.run(g, a, b))
    }

    #[cfg(feature = "wgpu")]
    fn wgpu(&self, g: &Geometry, [a, b]: [&[f32]; 2]) -> crate::Result<CpuStorage> {
        super::wgpu::conv2d::run(<K as Kernel<2>>::NAME, g, K::PRODUCT, a, b)
    }

    #[cfg(any(feature = "cuda", feature = "cuda-emu"))]
    fn cuda_job<I>(&self, g: &Geometry, dtype: DType, [a, b]: [I; 2]) -> crate::Result<super::cuda::Job<I>> {
        super::cuda::conv2d::job(<K as Kernel<2>>::NAME, dtype, g, K::PRODUCT, a, b)
    }

    fn backward(&self, inputs: [&Tensor; 2], _res: &Tensor, grad: &Tensor) -> Result<[Option<Tensor>; 2]> {
        self.grads(inputs, grad)
    }
}

/// The forward convolution; its backward runs [`InputGrad`] and [`WeightGrad`].
struct Conv2dOp {
    stride: usize,
    padding: usize,
}

impl ConvKernel for Conv2dOp {
    const NAME: &'static str = "conv2d";

    #[cfg(any(feature = "wgpu", feature = "cuda", feature = "cuda-emu"))]
    const PRODUCT: Product = Product::Forward;

    fn geometry(&self, xl: &Layout, wl: &Layout) -> Result<(Geometry, Shape)> {
        let g = Geometry::new(xl.dims(), wl.dims(), self.stride, self.padding)?;
        Ok((g, Shape::from((g.b, g.c_out, g.ho, g.wo))))
    }

    fn run<T: Real>(&self, g: &Geometry, x: &[T], w: &[T]) -> Vec<T> {
        self.run_biased(g, x, w, None)
    }

    fn grads(&self, [x, w]: [&Tensor; 2], grad: &Tensor) -> Result<[Option<Tensor>; 2]> {
        self.input_and_weight_grads([x, w], grad)
    }
}

impl Conv2dOp {
    /// The product, each output channel starting from its `bias` (zero without one).
    fn run_biased<T: Real>(&self, g: &Geometry, x: &[T], w: &[T], bias: Option<&[T]>) -> Vec<T> {
        let (k, l) = (g.k(), g.l());
        let mut out = vec![T::zero(); g.b * g.c_out * l];
        if let Some(bias) = bias {
            for (row, &bv) in out.chunks_mut(l).zip(bias.iter().cycle()) {
                row.fill(bv);
            }
        }
        let mut col = Vec::new();
        for (xb, ob) in x.chunks(g.c_in * g.h * g.w).zip(out.chunks_mut(g.c_out * l)) {
            g.for_each_unfolded(xb, &mut col, |band, cols, lc| {
                let (lhs, rhs) = (Mat::rows(w, k), Mat::rows(cols, lc));
                matmul(
                    &mut ob[band.0 * g.wo..],
                    l,
                    lhs,
                    rhs,
                    (g.c_out, lc, k),
                    T::one(),
                    bias.is_some(),
                    true,
                );
            });
        }
        out
    }

    /// The gradients of the input and the weight, each only where the graph needs it.
    fn input_and_weight_grads(&self, [x, w]: [&Tensor; 2], grad: &Tensor) -> Result<[Option<Tensor>; 2]> {
        let grad = grad.contiguous()?;
        let (_, _, h, wd) = x.dims4()?;
        let (_, _, kh, kw) = w.dims4()?;
        let (stride, padding) = (self.stride, self.padding);
        // Only the gradients the graph needs: a frozen weight (a LoRA run's base, a reference
        // model) gets no `dw`, and an input that depends on no variable (the noisy latents into
        // `conv_in`) no `dx`, which saves their products and the gradient store's memory.
        let dx = x
            .track_op()
            .then(|| {
                grad.apply_op2_no_bwd(
                    w,
                    &Fused(InputGrad {
                        stride,
                        padding,
                        h,
                        w: wd,
                    }),
                )
            })
            .transpose()?;
        let dw = w
            .track_op()
            .then(|| {
                x.apply_op2_no_bwd(
                    &grad,
                    &Fused(WeightGrad {
                        stride,
                        padding,
                        kh,
                        kw,
                    }),
                )
            })
            .transpose()?;
        Ok([dx, dw])
    }
}

/// [`Conv2dOp`] with the bias (`[C_out]` or `[B, C_out]`) as a third input, written into the output (CPU, and wgpu with the
/// bias added on the host; the CUDA kernels are not given it, see [`conv2d_biased`]).
struct Conv2dBiasOp(Conv2dOp);

impl Kernel<3> for Conv2dBiasOp {
    const NAME: &'static str = "conv2d-bias";

    type Call = Geometry;

    fn call(&self, [xl, wl, bl]: [&Layout; 3]) -> Result<(Geometry, Shape)> {
        let (g, shape) = self.0.geometry(xl, wl)?;
        if bl.dims() != [g.c_out] && bl.dims() != [g.b, g.c_out] {
            candle_core::bail!("{}: bias {:?} for {} output channels", Self::NAME, bl.dims(), g.c_out)
        }
        Ok((g, shape))
    }

    fn cpu<T: Real>(&self, g: &Geometry, [x, w, b]: [&[T]; 3]) -> Result<Vec<T>> {
        Ok(self.0.run_biased(g, x, w, Some(b)))
    }

    #[cfg(feature = "wgpu")]
    fn wgpu(&self, g: &Geometry, [x, w, b]: [&[f32]; 3]) -> crate::Result<CpuStorage> {
        let product = super::wgpu::conv2d::run(Self::NAME, g, Product::Forward, x, w)?;
        let mut out = product.as_slice::<f32>()?.to_vec();
        for (row, &bv) in out.chunks_mut(g.l()).zip(b.iter().cycle()) {
            row.iter_mut().for_each(|v| *v += bv);
        }
        Ok(CpuStorage::F32(out))
    }

    #[cfg(feature = "cuda-emu")]
    fn cuda_emu(&self, _g: &Geometry, _inputs: [&[f32]; 3]) -> crate::Result<Option<CpuStorage>> {
        Ok(None)
    }

    fn backward(&self, [x, w, b]: [&Tensor; 3], _res: &Tensor, grad: &Tensor) -> Result<[Option<Tensor>; 3]> {
        let [dx, dw] = self.0.input_and_weight_grads([x, w], grad)?;
        let db = b.track_op().then(|| channel_sums(grad, b.rank() == 2)).transpose()?;
        Ok([dx, dw, db])
    }
}

/// The bias gradient from `grad` `[B, C, H, W]` (on the CPU): its sums over the positions, per
/// sample and channel (`[B, C]`) when `per_sample`, else per channel (`[C]`). One pass over each
/// channel's contiguous run, where candle reduces over the strided dims element by element.
fn channel_sums(grad: &Tensor, per_sample: bool) -> Result<Tensor> {
    let grad = grad.contiguous()?;
    let (b, c, _, _) = grad.dims4()?;
    let sums = match super::compute_dtype(grad.dtype()) {
        DType::F64 => run_sums::<f64>(&grad)?,
        _ => run_sums::<f32>(&grad)?,
    };
    let sums = Tensor::from_vec(sums, (b, c), grad.device())?;
    let sums = if per_sample { sums } else { sums.sum(0)? };
    sums.to_dtype(grad.dtype())
}

/// The sums of the `[H, W]` runs of the `[B, C, H, W]` CPU tensor `t`, in `f64`.
fn run_sums<T: Real>(t: &Tensor) -> Result<Vec<f64>> {
    let (b, c, h, w) = t.dims4()?;
    if h * w == 0 {
        return Ok(vec![0.0; b * c]);
    }
    let (storage, layout) = t.storage_and_layout();
    let values = super::cpu::tensor_values::<T>("conv2d-bias", &storage, layout)?;
    Ok(values
        .chunks(h * w)
        .map(|run| super::cpu::sum_zip(run, run, |x, _| x))
        .collect())
}

/// The input gradient: `col = W^T dY`, folded back with col2im. Inputs `(dY, W)`.
struct InputGrad {
    stride: usize,
    padding: usize,
    h: usize,
    w: usize,
}

impl ConvKernel for InputGrad {
    const NAME: &'static str = "conv2d-input-grad";

    #[cfg(any(feature = "wgpu", feature = "cuda", feature = "cuda-emu"))]
    const PRODUCT: Product = Product::InputGrad;

    /// The convolution and the shape of `dx`, checking the gradient `dY` against the weight.
    fn geometry(&self, dl: &Layout, wl: &Layout) -> Result<(Geometry, Shape)> {
        let b = dl.dims()[0];
        let c_in = wl.dims()[1];
        let g = Geometry::new(&[b, c_in, self.h, self.w], wl.dims(), self.stride, self.padding)?;
        if dl.dims() != [b, g.c_out, g.ho, g.wo] {
            candle_core::bail!(
                "conv2d-input-grad: gradient of shape {:?} for output {:?}",
                dl.dims(),
                (g.ho, g.wo)
            );
        }
        Ok((g, Shape::from((b, c_in, self.h, self.w))))
    }

    fn run<T: Real>(&self, g: &Geometry, dy: &[T], w: &[T]) -> Vec<T> {
        let (k, l) = (g.k(), g.l());
        let mut dx = vec![T::zero(); g.b * g.c_in * g.h * g.w];
        let mut col = Vec::new();
        for (db, xb) in dy.chunks(g.c_out * l).zip(dx.chunks_mut(g.c_in * g.h * g.w)) {
            if g.is_pointwise() {
                matmul(
                    xb,
                    l,
                    Mat::rows_t(w, k),
                    Mat::rows(db, l),
                    (k, l, g.c_out),
                    T::one(),
                    false,
                    true,
                );
                continue;
            }
            for band in g.bands() {
                let lc = (band.1 - band.0) * g.wo;
                col.resize(k * lc, T::zero());
                let rhs = Mat::rows(&db[band.0 * g.wo..], l);
                matmul(
                    &mut col,
                    lc,
                    Mat::rows_t(w, k),
                    rhs,
                    (k, lc, g.c_out),
                    T::one(),
                    false,
                    true,
                );
                g.col2im_add(&col, band, xb);
            }
        }
        dx
    }
}

/// The weight gradient: `dW = sum_b dY_b col_b^T`. Inputs `(X, dY)`.
struct WeightGrad {
    stride: usize,
    padding: usize,
    kh: usize,
    kw: usize,
}

impl ConvKernel for WeightGrad {
    const NAME: &'static str = "conv2d-weight-grad";

    #[cfg(any(feature = "wgpu", feature = "cuda", feature = "cuda-emu"))]
    const PRODUCT: Product = Product::WeightGrad;

    /// The convolution and the shape of `dW`, checking the gradient `dY` against the input.
    fn geometry(&self, xl: &Layout, dl: &Layout) -> Result<(Geometry, Shape)> {
        let (c_out, c_in) = (dl.dims()[1], xl.dims()[1]);
        let g = Geometry::new(xl.dims(), &[c_out, c_in, self.kh, self.kw], self.stride, self.padding)?;
        if dl.dims() != [g.b, c_out, g.ho, g.wo] {
            candle_core::bail!(
                "conv2d-weight-grad: gradient of shape {:?} for output {:?}",
                dl.dims(),
                (g.ho, g.wo)
            );
        }
        Ok((g, Shape::from((c_out, c_in, self.kh, self.kw))))
    }

    fn run<T: Real>(&self, g: &Geometry, x: &[T], dy: &[T]) -> Vec<T> {
        let (k, l) = (g.k(), g.l());
        let mut dw = vec![T::zero(); g.c_out * k];
        let mut col = Vec::new();
        for (xb, db) in x.chunks(g.c_in * g.h * g.w).zip(dy.chunks(g.c_out * l)) {
            g.for_each_unfolded(xb, &mut col, |band, cols, lc| {
                let (lhs, rhs) = (Mat::rows(&db[band.0 * g.wo..], l), Mat::rows_t(cols, lc));
                matmul(&mut dw, k, lhs, rhs, (g.c_out, k, lc), T::one(), true, true);
            });
        }
        dw
    }
}
