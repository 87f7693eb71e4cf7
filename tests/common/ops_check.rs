//! Kernel-versus-reference checks shared by `tests/ops.rs` (CPU kernels) and `tests/ops_wgpu.rs`
//! (the same ops on wgpu): forward values and the gradient of every input.

use candle_core::{Tensor, Var};
use diffalign::ops;
use diffalign::rng::Rng;

/// Largest absolute difference allowed, relative to the reference's largest magnitude (f32).
pub const KERNEL_REL_TOL: f64 = 1e-4;

/// Standard normal values of `shape` on [`super::device()`].
pub fn randn(rng: &mut Rng, shape: &[usize]) -> Tensor {
    rng.randn(shape, &super::device()).unwrap()
}

/// Largest absolute difference over the reference's largest magnitude.
pub fn rel_err(got: &Tensor, want: &Tensor) -> f64 {
    ops::compare(got, want).unwrap().1
}

/// `f(inputs)` and the gradients of `sum(f * r)` (`r` random from `seed`) with respect to each
/// input, `None` for an input the result does not depend on.
pub fn output_and_gradients(
    inputs: &[Tensor],
    seed: u64,
    f: &dyn Fn(&[Tensor]) -> Tensor,
) -> (Tensor, Vec<Option<Tensor>>) {
    let vars: Vec<Var> = inputs.iter().map(|t| Var::from_tensor(t).unwrap()).collect();
    let xs: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let out = f(&xs);
    let r = randn(&mut Rng::new(seed), out.dims());
    let grads = (&out * &r).unwrap().sum_all().unwrap().backward().unwrap();
    let dxs = xs.iter().map(|x| grads.get(x).cloned()).collect();
    (out, dxs)
}

/// Compares `ours` with `reference` on `inputs`: the outputs, then the gradients of
/// `sum(out * r)` (fixed random `r`) with respect to every input.
pub fn check(
    what: &str,
    inputs: &[Tensor],
    ours: impl Fn(&[Tensor]) -> Tensor,
    reference: impl Fn(&[Tensor]) -> Tensor,
) {
    let (a, ga) = output_and_gradients(inputs, 99, &ours);
    let (b, gb) = output_and_gradients(inputs, 99, &reference);
    let err = rel_err(&a, &b);
    assert!(err < KERNEL_REL_TOL, "{what}: forward relative error {err:e}");
    for (i, (da, db)) in ga.iter().zip(&gb).enumerate() {
        let da = da
            .as_ref()
            .unwrap_or_else(|| panic!("{what}: input {i} has no gradient (fused)"));
        let db = db
            .as_ref()
            .unwrap_or_else(|| panic!("{what}: input {i} has no gradient (reference)"));
        let err = rel_err(da, db);
        assert!(
            err < KERNEL_REL_TOL,
            "{what}: gradient of input {i}: relative error {err:e}"
        );
    }
}

/// The reference convolution on the explicitly padded input cut to the rows and columns the
/// windows read: candle's own backward fails on strided cases whose leftovers differ in height
/// and width, and the cut does not change the result.
pub fn conv2d_reference_covered(x: &Tensor, w: &Tensor, s: usize, p: usize) -> Tensor {
    let k = w.dim(2).unwrap();
    let padded = x.pad_with_zeros(2, p, p).unwrap().pad_with_zeros(3, p, p).unwrap();
    let (_, _, hp, wp) = padded.dims4().unwrap();
    let cut = |n: usize| n - (n - k) % s;
    let cropped = padded.narrow(2, 0, cut(hp)).unwrap().narrow(3, 0, cut(wp)).unwrap();
    ops::conv2d::reference(&cropped, w, s, 0).unwrap()
}

/// One convolution case: `(batch, c_in, h, w, c_out, kernel, stride, padding)`.
pub type ConvCase = (usize, usize, usize, usize, usize, usize, usize, usize);

/// One attention case: `(leading dims, lq, lk, d, dv)`.
pub type AttentionCase = (&'static [usize], usize, usize, usize, usize);

/// The cases every GPU kernel suite (wgpu, the CUDA emulator, CUDA) runs, small enough for the
/// emulator; each suite adds its own. Convolutions: padded, strided, 1x1 and 5x5, and outputs and
/// reductions that are not multiples of the 64 x 64 x 16 tiles.
pub const GPU_CONV2D_CASES: &[ConvCase] = &[
    (2, 3, 8, 8, 5, 3, 1, 1),
    (1, 4, 9, 7, 6, 3, 2, 1),
    (3, 2, 11, 10, 3, 3, 2, 0),
    (1, 5, 5, 5, 2, 5, 1, 2),
    (1, 3, 70, 9, 65, 3, 1, 1),
    (2, 24, 6, 6, 20, 1, 1, 0),
    (1, 2, 12, 12, 3, 5, 3, 2),
];

/// Group norms for the GPU suites: `(shape, groups)`, rows of 646 elements among them (three
/// partial passes of 256 threads).
pub const GPU_GROUP_NORM_CASES: &[(&[usize], usize)] = &[
    (&[2, 8, 5, 5], 4),
    (&[1, 6, 3, 7], 6),
    (&[3, 4, 4, 4], 1),
    (&[2, 12, 9], 3),
    (&[2, 6, 17, 19], 3),
];

/// Layer-norm shapes for the GPU suites.
pub const GPU_LAYER_NORM_SHAPES: &[&[usize]] = &[&[2, 5, 16], &[7, 3], &[3, 300]];

/// Softmax shapes for the GPU suites, rows up to 600 long.
pub const GPU_SOFTMAX_SHAPES: &[&[usize]] = &[&[3, 7], &[2, 4, 33], &[5], &[2, 3, 600]];

/// Attention for the GPU suites: self-attention, cross-attention (other key length and value
/// width), a single query, query and key lengths over several 256-row tiles, and Stable
/// Diffusion's head widths (40, 80).
pub const GPU_ATTENTION_CASES: &[AttentionCase] = &[
    (&[2, 3], 10, 10, 8, 8),
    (&[2, 4], 16, 7, 8, 8),
    (&[1], 5, 9, 4, 6),
    (&[3, 2], 1, 3, 5, 5),
    (&[1, 2], 300, 270, 16, 12),
    (&[2], 33, 20, 40, 80),
];

/// Per-sample MSE shapes for the GPU suites: `[2, 3, 50, 50]` has 7,500 elements per sample, two
/// partial sums of 4,096.
pub const GPU_MSE_SHAPES: &[&[usize]] = &[&[4, 3, 5, 5], &[2, 7], &[1, 1], &[2, 3, 50, 50]];

/// Checks `conv2d` on each case.
pub fn check_conv2d_cases(seed: u64, cases: &[ConvCase]) {
    let mut rng = Rng::new(seed);
    for &(b, ci, h, w, co, k, s, p) in cases {
        let inputs = [randn(&mut rng, &[b, ci, h, w]), randn(&mut rng, &[co, ci, k, k])];
        let what = format!("conv2d x[{b},{ci},{h},{w}] w[{co},{ci},{k},{k}] stride {s} pad {p}");
        check(
            &what,
            &inputs,
            |x| ops::conv2d::conv2d(&x[0], &x[1], s, p).unwrap(),
            |x| conv2d_reference_covered(&x[0], &x[1], s, p),
        );
        let inputs = [inputs[0].clone(), inputs[1].clone(), randn(&mut rng, &[co])];
        check(
            &format!("{what} with bias"),
            &inputs,
            |x| ops::conv2d::conv2d_biased(&x[0], &x[1], &x[2], s, p).unwrap(),
            |x| {
                let bias = x[2].reshape((1, co, 1, 1)).unwrap();
                conv2d_reference_covered(&x[0], &x[1], s, p)
                    .broadcast_add(&bias)
                    .unwrap()
            },
        );
        // Per sample and channel, as a ResNet block's bias plus time embedding.
        let inputs = [inputs[0].clone(), inputs[1].clone(), randn(&mut rng, &[b, co])];
        check(
            &format!("{what} with a per-sample bias"),
            &inputs,
            |x| ops::conv2d::conv2d_biased(&x[0], &x[1], &x[2], s, p).unwrap(),
            |x| {
                let bias = x[2].reshape((b, co, 1, 1)).unwrap();
                conv2d_reference_covered(&x[0], &x[1], s, p)
                    .broadcast_add(&bias)
                    .unwrap()
            },
        );
    }
}

/// Checks `group_norm`, with and without SiLU, on each `(shape, groups)` case.
pub fn check_group_norm_cases(seed: u64, cases: &[(&[usize], usize)]) {
    let mut rng = Rng::new(seed);
    for &(shape, groups) in cases {
        for silu in [false, true] {
            let c = shape[1];
            let inputs = [
                randn(&mut rng, shape),
                randn(&mut rng, &[c]).affine(0.5, 1.0).unwrap(),
                (randn(&mut rng, &[c]) * 0.5).unwrap(),
            ];
            check(
                &format!("group_norm {shape:?} groups {groups} silu {silu}"),
                &inputs,
                |x| ops::group_norm::group_norm(&x[0], &x[1], &x[2], groups, 1e-5, silu).unwrap(),
                |x| ops::group_norm::reference(&x[0], &x[1], &x[2], groups, 1e-5, silu).unwrap(),
            );
        }
    }
}

/// Checks `layer_norm` over the last dimension of each shape.
pub fn check_layer_norm_cases(seed: u64, shapes: &[&[usize]]) {
    let mut rng = Rng::new(seed);
    for shape in shapes {
        let d = *shape.last().unwrap();
        let inputs = [
            randn(&mut rng, shape).affine(3.0, 1.0).unwrap(),
            randn(&mut rng, &[d]).affine(0.5, 1.0).unwrap(),
            (randn(&mut rng, &[d]) * 0.5).unwrap(),
        ];
        check(
            &format!("layer_norm {shape:?}"),
            &inputs,
            |x| ops::layer_norm::layer_norm(&x[0], &x[1], &x[2], 1e-5).unwrap(),
            |x| ops::layer_norm::reference(&x[0], &x[1], &x[2], 1e-5).unwrap(),
        );
    }
}

/// Checks `softmax` over the last dimension of each shape.
pub fn check_softmax_cases(seed: u64, shapes: &[&[usize]]) {
    let mut rng = Rng::new(seed);
    for shape in shapes {
        let inputs = [(randn(&mut rng, shape) * 4.0).unwrap()];
        check(
            &format!("softmax {shape:?}"),
            &inputs,
            |x| ops::softmax::softmax(&x[0]).unwrap(),
            |x| ops::softmax::reference(&x[0]).unwrap(),
        );
    }
}

/// Checks unmasked `attention` on each `(leading dims, lq, lk, d, dv)` case.
pub fn check_attention_cases(seed: u64, cases: &[AttentionCase]) {
    let mut rng = Rng::new(seed);
    for &(lead, lq, lk, d, dv) in cases {
        let shape = |l: usize, w: usize| [lead, &[l, w]].concat();
        let inputs = [
            randn(&mut rng, &shape(lq, d)),
            randn(&mut rng, &shape(lk, d)),
            randn(&mut rng, &shape(lk, dv)),
        ];
        let scale = 1.0 / (d as f64).sqrt();
        check(
            &format!("attention {lead:?} lq {lq} lk {lk} d {d} dv {dv}"),
            &inputs,
            |x| ops::attention::attention(&x[0], &x[1], &x[2], scale, None).unwrap(),
            |x| ops::attention::reference(&x[0], &x[1], &x[2], scale, None).unwrap(),
        );
    }
}

/// The additive mask of a masked-attention case, named by its shape. Blocked keys are `-inf`;
/// every other entry gets a random bias (N(0, 0.5^2)), so the masks test addition, not only
/// blocking. No query row has all its keys blocked.
#[derive(Debug, Clone, Copy)]
pub enum MaskKind {
    /// `[Lq, Lk]`: causal (query `i` sees keys up to `i + Lk - Lq`, at least key 0), as the
    /// CLIP text tower's.
    Causal2d,
    /// `[1, 1, Lq, Lk]`: causal, shared by every batch row and head.
    Causal,
    /// `[B, 1, 1, Lk]`: the last `2b + 1` keys of batch row `b` blocked (padding), capped to
    /// leave one key.
    PaddedKeys,
    /// `[B, 1, Lq, Lk]`: causal and padded per batch row, as Llama's.
    CausalPadded,
    /// `[B, H, Lq, Lk]`: about a fifth of the keys blocked at random (never key 0), a different
    /// mask per slice.
    PerSlice,
}

/// The mask of `kind` for `b` batch rows, `h` heads, `lq` queries and `lk` keys.
pub fn attention_mask(rng: &mut Rng, kind: MaskKind, (b, h): (usize, usize), lq: usize, lk: usize) -> Tensor {
    let shape = match kind {
        MaskKind::Causal2d => vec![lq, lk],
        MaskKind::Causal => vec![1, 1, lq, lk],
        MaskKind::PaddedKeys => vec![b, 1, 1, lk],
        MaskKind::CausalPadded => vec![b, 1, lq, lk],
        MaskKind::PerSlice => vec![b, h, lq, lk],
    };
    let count: usize = shape.iter().product();
    let rows = shape[shape.len() - 2];
    let per_batch = count / if shape.len() == 4 { shape[0] } else { 1 };
    let causal = |i: usize, j: usize| j > i + lk.saturating_sub(lq);
    let padded = |batch: usize, j: usize| j + (2 * batch + 1).min(lk - 1) >= lk;
    let values = (0..count)
        .map(|e| {
            let (batch, i, j) = (e / per_batch, (e / lk) % rows, e % lk);
            let (bias, noise) = (0.5 * rng.normal() as f32, rng.uniform());
            let blocked = match kind {
                MaskKind::Causal2d | MaskKind::Causal => causal(i, j),
                MaskKind::PaddedKeys => padded(batch, j),
                MaskKind::CausalPadded => causal(i, j) || padded(batch, j),
                MaskKind::PerSlice => j != 0 && noise < 0.2,
            };
            if blocked {
                f32::NEG_INFINITY
            } else {
                bias
            }
        })
        .collect();
    Tensor::from_vec(values, shape, &super::device()).unwrap()
}

/// One masked-attention case: `((batch, heads), lq, lk, d, dv, mask)`.
pub type MaskedCase = ((usize, usize), usize, usize, usize, usize, MaskKind);

/// The masked-attention cases both kernel suites run: causal self- and cross-attention (Lq != Lk
/// both ways), padded keys, Llama's causal + padding mask, a mask per slice, odd sizes, one query.
pub const MASKED_ATTENTION_CASES: &[MaskedCase] = &[
    ((2, 3), 10, 10, 8, 8, MaskKind::Causal),
    ((2, 3), 7, 12, 5, 6, MaskKind::Causal),
    ((2, 2), 13, 6, 8, 8, MaskKind::Causal2d),
    ((3, 2), 9, 13, 8, 8, MaskKind::PaddedKeys),
    ((2, 4), 11, 11, 4, 4, MaskKind::CausalPadded),
    ((1, 3), 1, 9, 8, 8, MaskKind::CausalPadded),
    ((2, 2), 6, 5, 3, 7, MaskKind::PerSlice),
];

/// Random `q` `[b, h, lq, d]`, `k` `[b, h, lk, d]`, `v` `[b, h, lk, dv]`.
fn attention_inputs(rng: &mut Rng, (b, h): (usize, usize), lq: usize, lk: usize, d: usize, dv: usize) -> [Tensor; 3] {
    [
        randn(rng, &[b, h, lq, d]),
        randn(rng, &[b, h, lk, d]),
        randn(rng, &[b, h, lk, dv]),
    ]
}

/// Checks masked `attention` on each case: forward and the gradients of q, k and v.
pub fn check_masked_attention_cases(seed: u64, cases: &[MaskedCase]) {
    let mut rng = Rng::new(seed);
    for &(bh, lq, lk, d, dv, kind) in cases {
        let inputs = attention_inputs(&mut rng, bh, lq, lk, d, dv);
        let mask = attention_mask(&mut rng, kind, bh, lq, lk);
        let scale = 1.0 / (d as f64).sqrt();
        check(
            &format!(
                "attention {bh:?} lq {lq} lk {lk} d {d} dv {dv} mask {kind:?} {:?}",
                mask.dims()
            ),
            &inputs,
            |x| ops::attention::attention(&x[0], &x[1], &x[2], scale, Some(&mask)).unwrap(),
            |x| ops::attention::reference(&x[0], &x[1], &x[2], scale, Some(&mask)).unwrap(),
        );
    }
}

/// `((batch, heads), lq, lk, d, dv, mask)`: an `attention_heads` case.
pub type HeadsCase = ((usize, usize), usize, usize, usize, usize, Option<MaskKind>);

/// Checks `attention_heads` (heads side by side in the rows) against the reference on the
/// head-split tensors, on each case with its mask or none: forward and the three gradients.
pub fn check_attention_heads_cases(seed: u64, cases: &[HeadsCase]) {
    let mut rng = Rng::new(seed);
    for &((b, h), lq, lk, d, dv, kind) in cases {
        let inputs = [
            randn(&mut rng, &[b, lq, h * d]),
            randn(&mut rng, &[b, lk, h * d]),
            randn(&mut rng, &[b, lk, h * dv]),
        ];
        let mask = kind.map(|kind| attention_mask(&mut rng, kind, (b, h), lq, lk));
        let scale = 1.0 / (d as f64).sqrt();
        let split = |t: &Tensor, w: usize| {
            let (_, l, _) = t.dims3().unwrap();
            t.reshape((b, l, h, w)).unwrap().transpose(1, 2).unwrap()
        };
        check(
            &format!("attention_heads b {b} heads {h} lq {lq} lk {lk} d {d} dv {dv} mask {kind:?}"),
            &inputs,
            |x| ops::attention::attention_heads(&x[0], &x[1], &x[2], h, scale, mask.as_ref()).unwrap(),
            |x| {
                let out = ops::attention::reference(
                    &split(&x[0], d),
                    &split(&x[1], d),
                    &split(&x[2], dv),
                    scale,
                    mask.as_ref(),
                );
                out.unwrap().transpose(1, 2).unwrap().reshape((b, lq, h * dv)).unwrap()
            },
        );
    }
}

/// `ops::attention::attention` or `ops::attention::reference`.
type AttentionFn = fn(&Tensor, &Tensor, &Tensor, f64, Option<&Tensor>) -> candle_core::Result<Tensor>;

/// Asserts that `got` is NaN exactly where `want` is, and elsewhere within [`KERNEL_REL_TOL`]
/// of `want`'s largest finite magnitude.
pub fn assert_same_nans_and_close(what: &str, got: &Tensor, want: &Tensor) {
    let (g, w) = (super::f64s(got), super::f64s(want));
    assert_eq!(g.len(), w.len(), "{what}: sizes differ");
    let nan_at = |x: &[f64]| x.iter().map(|v| v.is_nan()).collect::<Vec<_>>();
    assert_eq!(nan_at(&g), nan_at(&w), "{what}: NaN patterns differ");
    let scale = w.iter().filter(|v| !v.is_nan()).fold(1e-30f64, |m, v| m.max(v.abs()));
    let err = g
        .iter()
        .zip(&w)
        .filter(|(_, b)| !b.is_nan())
        .fold(0f64, |m, (a, b)| m.max((a - b).abs()));
    assert!(
        err / scale < KERNEL_REL_TOL,
        "{what}: relative error {:e} outside the NaNs",
        err / scale
    );
}

/// Attention with query row 2 of batch row 0 fully blocked (`[2, 1, 5, 7]` mask, 2 heads): the
/// reference gives NaN in that row of the output and of dq, and in dk and dv of both heads of
/// batch row 0; the fused path must give NaN in exactly those places and match elsewhere.
pub fn check_attention_fully_masked_row(seed: u64) {
    let mut rng = Rng::new(seed);
    let bh = (2, 2);
    let xs = attention_inputs(&mut rng, bh, 5, 7, 4, 3);
    let mask = attention_mask(&mut rng, MaskKind::CausalPadded, bh, 5, 7);
    let blocked = Tensor::full(f32::NEG_INFINITY, (1, 1, 1, 7), &super::device()).unwrap();
    let mask = mask.slice_assign(&[0..1, 0..1, 2..3, 0..7], &blocked).unwrap();
    let vars: Vec<Var> = xs.iter().map(|t| Var::from_tensor(t).unwrap()).collect();
    let xs: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let r = randn(&mut rng, &[2, 2, 5, 3]);
    let run = |f: AttentionFn| {
        let out = f(&xs[0], &xs[1], &xs[2], 0.5, Some(&mask)).unwrap();
        let grads = (&out * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let mut all = vec![out];
        all.extend(xs.iter().map(|x| grads.get(x).unwrap().clone()));
        all
    };
    let (ours, reference) = (run(ops::attention::attention), run(ops::attention::reference));
    for (name, (a, b)) in ["output", "dq", "dk", "dv"].iter().zip(ours.iter().zip(&reference)) {
        assert_same_nans_and_close(&format!("fully masked row: {name}"), a, b);
    }
    // The pattern is the documented one: one query row, and whole slices of dk and dv.
    let nans = |t: &Tensor| super::f64s(t).iter().filter(|v| v.is_nan()).count();
    assert_eq!(nans(&reference[0]), 2 * 3, "output");
    assert_eq!(nans(&reference[1]), 2 * 4, "dq");
    assert_eq!(nans(&reference[2]), 2 * 7 * 4, "dk");
    assert_eq!(nans(&reference[3]), 2 * 7 * 3, "dv");
}

/// The fused path carries the mask detached, so a mask that is a variable gets no gradient
/// there, while the composed reference gives it one: this tells the paths apart.
pub fn check_masked_attention_is_fused(seed: u64) {
    let mut rng = Rng::new(seed);
    let bh = (2, 3);
    let xs = attention_inputs(&mut rng, bh, 6, 6, 4, 4);
    let mask = Var::from_tensor(&attention_mask(&mut rng, MaskKind::CausalPadded, bh, 6, 6)).unwrap();
    let mask = mask.as_tensor();
    for (path, f, mask_grad) in [
        ("fused", ops::attention::attention as AttentionFn, false),
        ("reference", ops::attention::reference, true),
    ] {
        let out = f(&xs[0], &xs[1], &xs[2], 0.5, Some(mask)).unwrap();
        let grads = out.sum_all().unwrap().backward().unwrap();
        assert_eq!(grads.get(mask).is_some(), mask_grad, "{path}: gradient of the mask");
    }
}

/// Checks `per_sample_mse` on each shape.
pub fn check_mse_cases(seed: u64, shapes: &[&[usize]]) {
    let mut rng = Rng::new(seed);
    for shape in shapes {
        let inputs = [randn(&mut rng, shape), randn(&mut rng, shape)];
        check(
            &format!("per_sample_mse {shape:?}"),
            &inputs,
            |x| ops::mse::per_sample_mse(&x[0], &x[1]).unwrap(),
            |x| ops::mse::reference(&x[0], &x[1]).unwrap(),
        );
    }
}
