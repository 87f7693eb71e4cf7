//! Every fused kernel of `diffalign::ops` against its composed reference: forward values and the
//! gradients of every input, over several shapes, within 1e-4 of the reference's largest
//! magnitude (f32). The f64 finite-difference checks of the same ops are in `ops_grad.rs`.

mod common;

use candle_core::{DType, Tensor, Var};
use diffalign::ops;
use diffalign::rng::Rng;

const TOL: f64 = 1e-4;

fn randn(rng: &mut Rng, shape: &[usize]) -> Tensor {
    rng.randn(shape, &common::device()).unwrap()
}

/// Largest absolute difference over the reference's largest magnitude.
fn rel_err(got: &Tensor, want: &Tensor) -> f64 {
    ops::compare(got, want).unwrap().1
}

/// Compares `ours` with `reference` on `inputs`: the outputs, then the gradients of
/// `sum(out * r)` (fixed random `r`) with respect to every input.
fn check(what: &str, inputs: &[Tensor], ours: impl Fn(&[Tensor]) -> Tensor, reference: impl Fn(&[Tensor]) -> Tensor) {
    let vars: Vec<Var> = inputs.iter().map(|t| Var::from_tensor(t).unwrap()).collect();
    let xs: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let (a, b) = (ours(&xs), reference(&xs));
    let err = rel_err(&a, &b);
    assert!(err < TOL, "{what}: forward relative error {err:e}");
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
        assert!(err < TOL, "{what}: gradient of input {i}: relative error {err:e}");
    }
}

/// The reference convolution on the explicitly padded input cut to the rows and columns the
/// windows read: candle's own backward fails on strided cases whose leftovers differ in height
/// and width, and the cut does not change the result.
fn conv2d_reference_covered(x: &Tensor, w: &Tensor, s: usize, p: usize) -> Tensor {
    let k = w.dim(2).unwrap();
    let padded = x.pad_with_zeros(2, p, p).unwrap().pad_with_zeros(3, p, p).unwrap();
    let (_, _, hp, wp) = padded.dims4().unwrap();
    let cut = |n: usize| n - (n - k) % s;
    let cropped = padded.narrow(2, 0, cut(hp)).unwrap().narrow(3, 0, cut(wp)).unwrap();
    ops::conv2d::reference(&cropped, w, s, 0).unwrap()
}

#[test]
fn conv2d_matches_reference() {
    // (batch, c_in, h, w, c_out, kernel, stride, padding)
    let cases = [
        (2, 3, 8, 8, 5, 3, 1, 1),
        (1, 4, 9, 7, 6, 3, 2, 1),
        (2, 8, 6, 6, 4, 1, 1, 0),
        (3, 2, 11, 10, 3, 3, 2, 0),
        (1, 5, 5, 5, 2, 5, 1, 2),
        (2, 16, 16, 16, 8, 3, 1, 1),
    ];
    let mut rng = Rng::new(1);
    for (b, ci, h, w, co, k, s, p) in cases {
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

#[test]
fn conv2d_large_input_uses_several_bands() {
    // 64 channels, 3x3, 130 columns: 80 output rows need two bands of at most 4M elements.
    let mut rng = Rng::new(2);
    let inputs = [randn(&mut rng, &[1, 64, 80, 130]), randn(&mut rng, &[4, 64, 3, 3])];
    check(
        "conv2d banded",
        &inputs,
        |x| ops::conv2d::conv2d(&x[0], &x[1], 1, 1).unwrap(),
        |x| ops::conv2d::reference(&x[0], &x[1], 1, 1).unwrap(),
    );
}

#[test]
fn group_norm_matches_reference() {
    let mut rng = Rng::new(3);
    for (shape, groups) in [
        (vec![2, 8, 5, 5], 4),
        (vec![1, 6, 3, 7], 6),
        (vec![3, 4, 4, 4], 1),
        (vec![2, 12, 9], 3),
    ] {
        for silu in [false, true] {
            let c = shape[1];
            let inputs = [
                randn(&mut rng, &shape),
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

#[test]
fn layer_norm_matches_reference() {
    let mut rng = Rng::new(4);
    for shape in [vec![2, 5, 16], vec![7, 3], vec![1, 1, 64], vec![4, 256, 80]] {
        let d = *shape.last().unwrap();
        let inputs = [
            randn(&mut rng, &shape).affine(3.0, 1.0).unwrap(),
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

#[test]
fn softmax_matches_reference() {
    let mut rng = Rng::new(5);
    for shape in [vec![3, 7], vec![2, 4, 33], vec![5], vec![3, 100, 256]] {
        let inputs = [(randn(&mut rng, &shape) * 4.0).unwrap()];
        check(
            &format!("softmax {shape:?}"),
            &inputs,
            |x| ops::softmax::softmax(&x[0]).unwrap(),
            |x| ops::softmax::reference(&x[0]).unwrap(),
        );
    }
}

#[test]
fn attention_matches_reference() {
    let mut rng = Rng::new(6);
    // (leading dims, lq, lk, d, dv): self-attention, cross-attention, a single head.
    for (lead, lq, lk, d, dv) in [
        (vec![2, 3], 10, 10, 8, 8),
        (vec![2, 4], 16, 7, 8, 8),
        (vec![1], 5, 9, 4, 6),
        (vec![3, 2], 1, 3, 5, 5),
        // Big enough for the thread pool (slices in parallel).
        (vec![2, 4], 96, 96, 8, 8),
    ] {
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

#[test]
fn masked_attention_matches_reference() {
    let mut rng = Rng::new(7);
    let inputs = [
        randn(&mut rng, &[2, 6, 4]),
        randn(&mut rng, &[2, 6, 4]),
        randn(&mut rng, &[2, 6, 4]),
    ];
    let mask = Tensor::tril2(6, DType::F32, &common::device()).unwrap().log().unwrap();
    check(
        "causal attention",
        &inputs,
        |x| ops::attention::attention(&x[0], &x[1], &x[2], 0.5, Some(&mask)).unwrap(),
        |x| ops::attention::reference(&x[0], &x[1], &x[2], 0.5, Some(&mask)).unwrap(),
    );
}

#[test]
fn per_sample_mse_matches_reference() {
    let mut rng = Rng::new(8);
    for shape in [vec![4, 3, 5, 5], vec![2, 7], vec![1, 1], vec![2, 4, 96, 96]] {
        let inputs = [randn(&mut rng, &shape), randn(&mut rng, &shape)];
        check(
            &format!("per_sample_mse {shape:?}"),
            &inputs,
            |x| ops::mse::per_sample_mse(&x[0], &x[1]).unwrap(),
            |x| ops::mse::reference(&x[0], &x[1]).unwrap(),
        );
    }
}

#[test]
fn per_sample_mse_gradient_matches_finite_differences() {
    let dev = common::device();
    let mut rng = Rng::new(9);
    let a = Var::from_tensor(&randn(&mut rng, &[3, 2, 4]).to_dtype(DType::F64).unwrap()).unwrap();
    let b = randn(&mut rng, &[3, 2, 4]).to_dtype(DType::F64).unwrap();
    let w = Tensor::new(&[0.3f64, -1.2, 2.0], &dev).unwrap();
    let loss = |a: &Tensor| {
        (ops::mse::per_sample_mse(a, &b).unwrap() * &w)
            .unwrap()
            .sum_all()
            .unwrap()
    };
    let grad = loss(a.as_tensor()).backward().unwrap();
    let g = common::f64s(grad.get(a.as_tensor()).unwrap());
    let base = common::f64s(a.as_tensor());
    for i in 0..base.len() {
        let at = |delta: f64| {
            let mut v = base.clone();
            v[i] += delta;
            let t = Tensor::from_vec(v, (3, 2, 4), &dev).unwrap();
            loss(&t).to_scalar::<f64>().unwrap()
        };
        let fd = (at(1e-6) - at(-1e-6)) / 2e-6;
        assert!(
            (fd - g[i]).abs() < 1e-6 * (1.0 + fd.abs()),
            "entry {i}: autograd {} vs {fd}",
            g[i]
        );
    }
}

#[test]
fn fused_kernels_reject_bad_input_with_errors() {
    let dev = common::device();
    let x = Tensor::zeros((1, 6, 4, 4), DType::F32, &dev).unwrap();
    let w = Tensor::ones(6, DType::F32, &dev).unwrap();
    let err = ops::group_norm::group_norm(&x, &w, &w, 4, 1e-5, false).unwrap_err();
    assert!(err.to_string().contains("groups"), "{err}");
    let err = ops::mse::per_sample_mse(&x, &x.narrow(1, 0, 3).unwrap()).unwrap_err();
    assert!(err.to_string().contains("differ"), "{err}");
}
