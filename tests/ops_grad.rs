//! Finite-difference checks of every differentiable op on the model paths (f64, on the test
//! device: the CPU unless `DIFFALIGN_TEST_DEVICE` says otherwise): the autograd gradient of each
//! parameter and of the input must match central differences.

mod common;

use candle_core::{DType, Tensor, Var};
use diffalign::models::attention::Attention;
use diffalign::models::resnet::{Downsample2D, ResnetBlock2D, ResnetOptions, Upsample2D};
use diffalign::nn::conv::Conv2dConfig;
use diffalign::nn::{scaled_dot_product_attention, softmax, Activation, Conv2d, GroupNorm, LayerNorm, Linear};
use diffalign::rng::Rng;
use diffalign::weights::VarBuilder;

const H: f64 = 1e-6;
const RTOL: f64 = 1e-5;

fn randn(rng: &mut Rng, shape: &[usize]) -> Tensor {
    rng.randn(shape, &common::device())
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
}

/// Random, trainable f64 weights; norm scales and biases are perturbed away from 1 and 0 so a
/// wrong gradient cannot hide behind them.
fn weights(seed: u64) -> VarBuilder {
    VarBuilder::random(seed, DType::F64, &common::device(), true)
}

fn perturb_all(vb: &VarBuilder, seed: u64) {
    let mut rng = Rng::new(seed);
    for (_, v) in vb.vars() {
        let noise = randn(&mut rng, v.dims());
        v.set(&(v.as_tensor() + (noise * 0.1).unwrap()).unwrap()).unwrap();
    }
}

fn to_vec(t: &Tensor) -> Vec<f64> {
    t.flatten_all().unwrap().to_vec1::<f64>().unwrap()
}

/// Checks d loss / d var against central differences at a few entries of `var`.
fn check_var(name: &str, var: &Var, loss: &dyn Fn() -> Tensor, rng: &mut Rng) {
    let grads = loss().backward().unwrap();
    let g = grads
        .get(var.as_tensor())
        .unwrap_or_else(|| panic!("{name}: no gradient"));
    let g = to_vec(g);
    let base = to_vec(var.as_tensor());
    let n = base.len();
    let picks: Vec<usize> = (0..4.min(n)).map(|_| rng.below(n as u64) as usize).collect();
    let scale = g.iter().fold(0f64, |m, x| m.max(x.abs())).max(1e-3);
    for &i in &picks {
        let eval = |delta: f64| {
            let mut v = base.clone();
            v[i] += delta;
            var.set(&Tensor::from_vec(v, var.dims(), &common::device()).unwrap())
                .unwrap();
            loss().to_scalar::<f64>().unwrap()
        };
        let fd = (eval(H) - eval(-H)) / (2.0 * H);
        var.set(&Tensor::from_vec(base.clone(), var.dims(), &common::device()).unwrap())
            .unwrap();
        let err = (fd - g[i]).abs() / scale;
        assert!(
            err < RTOL,
            "{name}[{i}]: autograd {} vs finite difference {fd} (rel err {err:e})",
            g[i]
        );
    }
}

/// Builds a layer from fresh weights, then checks the gradients of `sum(f(x) * w)` for every
/// parameter and for the input `x` of shape `x_shape`.
fn check_layer<L>(what: &str, x_shape: &[usize], build: impl Fn(VarBuilder) -> L, f: impl Fn(&L, &Tensor) -> Tensor) {
    let vb = weights(1);
    let layer = build(vb.clone());
    perturb_all(&vb, 2);
    let mut rng = Rng::new(3);
    let x = Var::from_tensor(&randn(&mut rng, x_shape)).unwrap();
    let out_shape = f(&layer, x.as_tensor()).dims().to_vec();
    let w = randn(&mut rng, &out_shape);
    let loss = || (f(&layer, x.as_tensor()) * &w).unwrap().sum_all().unwrap();
    check_var(&format!("{what} input"), &x, &loss, &mut rng);
    for (name, var) in vb.vars() {
        check_var(&format!("{what} {name}"), &var, &loss, &mut rng);
    }
}

#[test]
fn layer_norm_gradients_match_finite_differences() {
    check_layer(
        "layer_norm",
        &[2, 3, 6],
        |vb| LayerNorm::new(6, 1e-5, vb.pp("ln")).unwrap(),
        |l, x| l.forward(x).unwrap(),
    );
}

#[test]
fn group_norm_gradients_match_finite_differences() {
    check_layer(
        "group_norm",
        &[2, 6, 3, 3],
        |vb| GroupNorm::new(3, 6, 1e-6, vb.pp("gn")).unwrap(),
        |l, x| l.forward(x).unwrap(),
    );
}

#[test]
fn softmax_gradient_matches_finite_differences() {
    check_layer("softmax", &[2, 3, 5], |_| (), |_, x| softmax(x).unwrap());
}

#[test]
fn attention_core_gradient_matches_finite_differences() {
    // q, k and v all derive from x, so each of their gradient paths is exercised.
    check_layer(
        "sdpa",
        &[2, 4, 6],
        |_| (),
        |_, x| {
            let q = x.narrow(2, 0, 2).unwrap();
            let k = (x.narrow(2, 2, 2).unwrap() * 1.3).unwrap();
            let v = x.narrow(2, 4, 2).unwrap();
            scaled_dot_product_attention(&q, &k, &v, 0.7, None).unwrap()
        },
    );
}

#[test]
fn masked_attention_core_gradient_matches_finite_differences() {
    // A [B, 1, Lq, Lk] mask (causal, batch row 1's last key padded, a bias elsewhere) on
    // [2, 3, 5, 2] heads: the f64 fused kernel with a mask shared across heads.
    let mask: Vec<f64> = (0..2 * 5 * 5)
        .map(|e| {
            let (b, i, j) = (e / 25, (e / 5) % 5, e % 5);
            if j > i || (b == 1 && j == 4 && i > 0) {
                f64::NEG_INFINITY
            } else {
                0.1 * ((e % 7) as f64 - 3.0)
            }
        })
        .collect();
    let mask = Tensor::from_vec(mask, (2, 1, 5, 5), &common::device()).unwrap();
    check_layer(
        "masked sdpa",
        &[2, 3, 5, 6],
        |_| (),
        |_, x| {
            let q = x.narrow(3, 0, 2).unwrap();
            let k = (x.narrow(3, 2, 2).unwrap() * 1.3).unwrap();
            let v = x.narrow(3, 4, 2).unwrap();
            scaled_dot_product_attention(&q, &k, &v, 0.7, Some(&mask)).unwrap()
        },
    );
}

#[test]
fn activations_gradients_match_finite_differences() {
    for act in [
        Activation::Silu,
        Activation::Gelu,
        Activation::GeluTanh,
        Activation::QuickGelu,
    ] {
        check_layer(&format!("{act:?}"), &[3, 7], |_| (), |_, x| act.forward(x).unwrap());
    }
}

#[test]
fn linear_gradients_match_finite_differences() {
    check_layer(
        "linear",
        &[2, 3, 5],
        |vb| Linear::new(5, 4, true, vb.pp("fc")).unwrap(),
        |l, x| l.forward(x).unwrap(),
    );
}

#[test]
fn conv2d_gradients_match_finite_differences() {
    let cfg = Conv2dConfig {
        stride: 2,
        padding: 1,
        groups: 1,
    };
    check_layer(
        "conv2d",
        &[2, 3, 5, 5],
        |vb| Conv2d::new(3, 4, 3, cfg, vb.pp("conv")).unwrap(),
        |l, x| l.forward(x).unwrap(),
    );
}

#[test]
fn resamplers_gradients_match_finite_differences() {
    check_layer(
        "downsample_pad0",
        &[1, 2, 5, 4],
        |vb| Downsample2D::new(2, 0, vb.pp("d")).unwrap(),
        |l, x| l.forward(x).unwrap(),
    );
    check_layer(
        "upsample",
        &[1, 2, 3, 2],
        |vb| Upsample2D::new(2, vb.pp("u")).unwrap(),
        |l, x| l.forward(x, None).unwrap(),
    );
    check_layer(
        "upsample_to_size",
        &[1, 2, 2, 2],
        |vb| Upsample2D::new(2, vb.pp("u")).unwrap(),
        |l, x| l.forward(x, Some((4, 3))).unwrap(),
    );
}

#[test]
fn resnet_block_gradients_match_finite_differences() {
    let opts = ResnetOptions {
        temb_channels: Some(5),
        groups: 2,
        eps: 1e-5,
        act: Activation::Silu,
        output_scale_factor: 1.0,
    };
    let mut rng = Rng::new(9);
    let temb = randn(&mut rng, &[2, 5]);
    check_layer(
        "resnet",
        &[2, 4, 3, 3],
        |vb| ResnetBlock2D::new(4, 6, opts, vb.pp("r")).unwrap(),
        |l, x| l.forward(x, Some(&temb)).unwrap(),
    );
}

#[test]
fn attention_gradients_match_finite_differences() {
    let mut rng = Rng::new(10);
    let ctx = randn(&mut rng, &[2, 3, 5]);
    check_layer(
        "cross_attention",
        &[2, 4, 6],
        |vb| Attention::new(6, Some(5), 2, 4, true, vb.pp("attn")).unwrap(),
        |l, x| l.forward(x, Some(&ctx)).unwrap(),
    );
}

/// candle's conv2d backward takes the output padding from the height alone: a strided conv
/// whose height and width leave different remainders must still have exact gradients.
#[test]
fn conv2d_strided_non_square_gradients_match_finite_differences() {
    for (cfg, shape) in [
        (
            Conv2dConfig {
                stride: 2,
                padding: 1,
                groups: 1,
            },
            [1, 2, 4, 3],
        ),
        (
            Conv2dConfig {
                stride: 2,
                padding: 0,
                groups: 1,
            },
            [1, 2, 6, 5],
        ),
        (
            Conv2dConfig {
                stride: 3,
                padding: 1,
                groups: 1,
            },
            [1, 2, 7, 5],
        ),
    ] {
        check_layer(
            "conv2d_strided",
            &shape,
            |vb| Conv2d::new(2, 3, 3, cfg, vb.pp("conv")).unwrap(),
            |l, x| l.forward(x).unwrap(),
        );
    }
}

/// Frozen weights (a LoRA run's base): the input gradient of a Linear and a Conv2d matches
/// finite differences, and the weights get no gradient.
#[test]
fn frozen_weight_layers_give_input_gradients_only() {
    let vb = VarBuilder::random(1, DType::F64, &common::device(), false);
    let linear = Linear::new(6, 5, true, vb.pp("linear")).unwrap();
    let cfg = Conv2dConfig {
        padding: 1,
        stride: 2,
        ..Default::default()
    };
    let conv = Conv2d::new(3, 4, 3, cfg, vb.pp("conv")).unwrap();
    let mut rng = Rng::new(4);
    for (what, shape) in [("linear", &[2usize, 3, 6][..]), ("conv", &[2, 3, 7, 7])] {
        let x = Var::from_tensor(&randn(&mut rng, shape)).unwrap();
        let f = |x: &Tensor| match what {
            "linear" => linear.forward(x).unwrap(),
            _ => conv.forward(x).unwrap(),
        };
        let w = randn(&mut rng, f(x.as_tensor()).dims());
        let loss = || (f(x.as_tensor()) * &w).unwrap().sum_all().unwrap();
        check_var(&format!("frozen {what} input"), &x, &loss, &mut rng);
        let grads = loss().backward().unwrap();
        let weight = match what {
            "linear" => linear.weight().clone(),
            _ => conv.weight().clone(),
        };
        assert!(grads.get(&weight).is_none(), "{what}: a frozen weight got a gradient");
    }
}

/// `x W^T + b + s (x A^T) B^T` as composed candle ops, for checking the fused frozen layer.
fn composed_lora_linear(x: &Tensor, w: &Tensor, b: &Tensor, a: &Tensor, up: &Tensor, s: f64) -> Tensor {
    let dt = x.dtype();
    let base = x
        .matmul(&w.to_dtype(dt).unwrap().t().unwrap())
        .unwrap()
        .broadcast_add(&b.to_dtype(dt).unwrap())
        .unwrap();
    let h = x.matmul(&a.to_dtype(dt).unwrap().t().unwrap()).unwrap();
    let delta = (h.matmul(&up.to_dtype(dt).unwrap().t().unwrap()).unwrap() * s).unwrap();
    (base + delta).unwrap()
}

/// The fused frozen linear layer with a LoRA equals the composed layer, and its gradients in the
/// input and both adapter factors match finite differences (the frozen weight and bias get none).
#[test]
fn frozen_lora_linear_equals_the_composed_layer_and_has_exact_gradients() {
    use diffalign::ops::frozen::frozen_linear;
    let mut rng = Rng::new(6);
    let (w, b) = (randn(&mut rng, &[5, 6]), randn(&mut rng, &[5]));
    let x = Var::from_tensor(&randn(&mut rng, &[4, 6])).unwrap();
    let a = Var::from_tensor(&randn(&mut rng, &[2, 6])).unwrap();
    let up = Var::from_tensor(&randn(&mut rng, &[5, 2])).unwrap();
    let s = 0.75;
    let f = || {
        frozen_linear(x.as_tensor(), &w, Some(&b), Some((a.as_tensor(), up.as_tensor(), s)))
            .unwrap()
            .expect("the op takes a CPU f64 call")
    };
    let want = composed_lora_linear(x.as_tensor(), &w, &b, a.as_tensor(), up.as_tensor(), s);
    common::assert_close("frozen LoRA linear", &f(), &want, 1e-12);
    let probe = randn(&mut rng, want.dims());
    let loss = || (f() * &probe).unwrap().sum_all().unwrap();
    for (name, var) in [("input", &x), ("lora A", &a), ("lora B", &up)] {
        check_var(&format!("frozen LoRA linear {name}"), var, &loss, &mut rng);
    }
    let grads = loss().backward().unwrap();
    assert!(
        grads.get(&w).is_none() && grads.get(&b).is_none(),
        "a frozen tensor got a gradient"
    );
}

/// bf16 weights, bias and adapter factors are widened inside the op, per call: the output and
/// the gradients are those of the composed layer on the widened tensors.
#[test]
fn frozen_bf16_linear_equals_the_widened_composed_layer() {
    use diffalign::ops::frozen::frozen_linear;
    let dev = candle_core::Device::Cpu;
    let mut rng = Rng::new(5);
    let bf16 = |rng: &mut Rng, shape: (usize, usize)| rng.randn(shape, &dev).unwrap().to_dtype(DType::BF16).unwrap();
    let (w, a, up) = (bf16(&mut rng, (5, 6)), bf16(&mut rng, (2, 6)), bf16(&mut rng, (5, 2)));
    let b = rng.randn(5, &dev).unwrap().to_dtype(DType::BF16).unwrap();
    let x = Var::from_tensor(&rng.randn((3, 6), &dev).unwrap()).unwrap();
    let (av, upv) = (Var::from_tensor(&a).unwrap(), Var::from_tensor(&up).unwrap());
    let y = frozen_linear(
        x.as_tensor(),
        &w,
        Some(&b),
        Some((av.as_tensor(), upv.as_tensor(), 2.0)),
    )
    .unwrap()
    .expect("the op takes an f32 call with bf16 weights");
    let widened = composed_lora_linear(x.as_tensor(), &w, &b, av.as_tensor(), upv.as_tensor(), 2.0);
    common::assert_close("bf16 frozen LoRA linear", &y, &widened, 1e-5);
    let grads = |t: &Tensor| (t * t).unwrap().sum_all().unwrap().backward().unwrap();
    let (gy, gw) = (grads(&y), grads(&widened));
    for (name, t) in [("input", x.as_tensor()), ("A", av.as_tensor()), ("B", upv.as_tensor())] {
        let (got, want) = (gy.get(t).unwrap(), gw.get(t).unwrap());
        assert_eq!(got.dtype(), t.dtype(), "{name}: gradient dtype");
        let tol = if t.dtype() == DType::BF16 { 0.05 } else { 1e-4 };
        common::assert_close(&format!("bf16 frozen LoRA linear, gradient of {name}"), got, want, tol);
    }
}

/// The trainable linear op equals `x W^T + b` as composed candle ops (computed in f32 for bf16),
/// and so do the gradients of the input, the weight and the bias, with and without a bias, over
/// more rows than one block of the bias's column sums; each gradient comes in its tensor's dtype.
#[test]
fn trainable_linear_op_equals_the_composed_layer() {
    use diffalign::ops::linear::linear;
    let dev = candle_core::Device::Cpu;
    for (dtype, rows, tol) in [(DType::F64, 300, 1e-9), (DType::F32, 300, 1e-3), (DType::BF16, 40, 0.1)] {
        let mut rng = Rng::new(8);
        let mut var = |shape: &[usize]| {
            let t = rng.randn(shape, &dev).unwrap().to_dtype(dtype).unwrap();
            Var::from_tensor(&t).unwrap()
        };
        let (x, w, b) = (var(&[rows, 24]), var(&[17, 24]), var(&[17]));
        let probe = rng.randn((rows, 17), &dev).unwrap().to_dtype(dtype).unwrap();
        for bias in [true, false] {
            let fused = linear(x.as_tensor(), w.as_tensor(), bias.then_some(b.as_tensor()))
                .unwrap()
                .expect("the op takes a CPU call");
            let wide = |t: &Tensor| {
                t.to_dtype(if dtype == DType::BF16 { DType::F32 } else { dtype })
                    .unwrap()
            };
            let product = wide(x.as_tensor()).matmul(&wide(w.as_tensor()).t().unwrap()).unwrap();
            let composed = if bias {
                product.broadcast_add(&wide(b.as_tensor())).unwrap()
            } else {
                product
            };
            assert_eq!(fused.dtype(), dtype);
            let what = format!("{dtype:?} linear, bias {bias}");
            common::assert_close(&what, &wide(&fused), &composed, tol as f32);
            let grads = |y: &Tensor| (wide(y) * wide(&probe)).unwrap().sum_all().unwrap().backward().unwrap();
            let (gf, gc) = (grads(&fused), grads(&composed));
            let mut checked = vec![("input", x.as_tensor()), ("weight", w.as_tensor())];
            if bias {
                checked.push(("bias", b.as_tensor()));
            } else {
                assert!(gf.get(b.as_tensor()).is_none(), "{what}: an unused bias got a gradient");
            }
            for (name, t) in checked {
                let (got, want) = (gf.get(t).unwrap(), gc.get(t).unwrap());
                assert_eq!(got.dtype(), dtype, "{what}: gradient dtype of {name}");
                common::assert_close(
                    &format!("{what}, gradient of {name}"),
                    &wide(got),
                    &wide(want),
                    tol as f32,
                );
            }
        }
    }
}
