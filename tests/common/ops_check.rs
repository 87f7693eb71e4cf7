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

/// Compares `ours` with `reference` on `inputs`: the outputs, then the gradients of
/// `sum(out * r)` (fixed random `r`) with respect to every input.
pub fn check(
    what: &str,
    inputs: &[Tensor],
    ours: impl Fn(&[Tensor]) -> Tensor,
    reference: impl Fn(&[Tensor]) -> Tensor,
) {
    let vars: Vec<Var> = inputs.iter().map(|t| Var::from_tensor(t).unwrap()).collect();
    let xs: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let (a, b) = (ours(&xs), reference(&xs));
    let err = rel_err(&a, &b);
    assert!(err < KERNEL_REL_TOL, "{what}: forward relative error {err:e}");
    let r = randn(&mut Rng::new(99), b.dims());
    let ga = (a * &r).unwrap().sum_all().unwrap().backward().unwrap();
    let gb = (b * &r).unwrap().sum_all().unwrap().backward().unwrap();
    for (i, x) in xs.iter().enumerate() {
        let da = ga
            .get(x)
            .unwrap_or_else(|| panic!("{what}: input {i} has no gradient (fused)"));
        let db = gb
            .get(x)
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
    }
}

/// Checks `group_norm`, with and without SiLU, on each `(shape, groups)` case.
pub fn check_group_norm_cases(seed: u64, cases: &[(Vec<usize>, usize)]) {
    let mut rng = Rng::new(seed);
    for (shape, groups) in cases {
        let groups = *groups;
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
pub fn check_layer_norm_cases(seed: u64, shapes: &[Vec<usize>]) {
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
pub fn check_softmax_cases(seed: u64, shapes: &[Vec<usize>]) {
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
pub fn check_attention_cases(seed: u64, cases: &[(Vec<usize>, usize, usize, usize, usize)]) {
    let mut rng = Rng::new(seed);
    for (lead, lq, lk, d, dv) in cases {
        let (lq, lk, d, dv) = (*lq, *lk, *d, *dv);
        let shape = |l: usize, w: usize| [lead.clone(), vec![l, w]].concat();
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

/// Checks causally masked attention (`[2, 6, 4]` inputs): the composed path around the softmax
/// kernel.
pub fn check_masked_attention(seed: u64) {
    let mut rng = Rng::new(seed);
    let inputs = [
        randn(&mut rng, &[2, 6, 4]),
        randn(&mut rng, &[2, 6, 4]),
        randn(&mut rng, &[2, 6, 4]),
    ];
    let mask = Tensor::tril2(6, candle_core::DType::F32, &super::device())
        .unwrap()
        .log()
        .unwrap();
    check(
        "causal attention",
        &inputs,
        |x| ops::attention::attention(&x[0], &x[1], &x[2], 0.5, Some(&mask)).unwrap(),
        |x| ops::attention::reference(&x[0], &x[1], &x[2], 0.5, Some(&mask)).unwrap(),
    );
}

/// Checks `per_sample_mse` on each shape.
pub fn check_mse_cases(seed: u64, shapes: &[Vec<usize>]) {
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
