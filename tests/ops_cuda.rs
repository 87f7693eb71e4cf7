//! The CUDA kernels of `kernels/cuda/` on an NVIDIA GPU, against the composed references (candle's
//! CUDA ops): f32 forward values and every input's gradient within 1e-4 of the reference's largest
//! magnitude, over the emulator's shapes and Stable Diffusion sizes; and f16 / bf16 storage (f32
//! compute) against the f32 reference on the same rounded inputs. Needs a build with the `cuda`
//! feature and `DIFFALIGN_TEST_DEVICE=cuda` (`device/run-tests.sh` sets it); fails, saying so,
//! on any other device.
#![cfg(feature = "cuda")]

mod common;

use candle_core::{DType, Tensor, Var};
use diffalign::ops;
use diffalign::rng::Rng;

use common::ops_check::{self, randn};

/// Checks the test device is a GPU and turns the CUDA kernels on.
fn use_cuda_kernels() {
    assert!(
        common::device().is_cuda(),
        "the CUDA kernel tests need DIFFALIGN_TEST_DEVICE=cuda"
    );
    let config = ops::KernelConfig {
        cuda_ops: ops::KernelOp::ALL.to_vec(),
        ..Default::default()
    };
    ops::install(&config).expect("the default backend is always available");
}

#[test]
fn cuda_kernels_really_launch() {
    use_cuda_kernels();
    let before = ops::cuda::launch_count();
    let x = randn(&mut Rng::new(40), &[4, 300]);
    let y = ops::softmax::softmax(&x).unwrap();
    assert!(ops_check::rel_err(&y, &ops::softmax::reference(&x).unwrap()) < ops_check::KERNEL_REL_TOL);
    assert!(
        ops::cuda::launch_count() > before,
        "softmax did not launch a CUDA kernel"
    );
}

#[test]
fn conv2d_cuda_matches_reference() {
    use_cuda_kernels();
    ops_check::check_conv2d_cases(41, ops_check::GPU_CONV2D_CASES);
    // Stable Diffusion: a 320-channel ResNet convolution at 32x32, a downsampler, and the
    // long weight-gradient reduction of a 256-channel input into 4 latent channels.
    ops_check::check_conv2d_cases(
        51,
        &[
            (2, 320, 32, 32, 320, 3, 1, 1),
            (2, 64, 32, 32, 64, 3, 2, 1),
            (2, 256, 64, 64, 4, 3, 1, 1),
        ],
    );
}

#[test]
fn group_norm_cuda_matches_reference() {
    use_cuda_kernels();
    ops_check::check_group_norm_cases(42, ops_check::GPU_GROUP_NORM_CASES);
    ops_check::check_group_norm_cases(52, &[(&[2, 320, 32, 32], 32)]);
}

#[test]
fn layer_norm_cuda_matches_reference() {
    use_cuda_kernels();
    ops_check::check_layer_norm_cases(43, ops_check::GPU_LAYER_NORM_SHAPES);
    ops_check::check_layer_norm_cases(53, &[&[2, 1024, 320]]);
}

#[test]
fn softmax_cuda_matches_reference() {
    use_cuda_kernels();
    ops_check::check_softmax_cases(44, ops_check::GPU_SOFTMAX_SHAPES);
    ops_check::check_softmax_cases(54, &[&[16, 256, 1024]]);
}

#[test]
fn attention_cuda_matches_reference() {
    use_cuda_kernels();
    ops_check::check_attention_cases(45, ops_check::GPU_ATTENTION_CASES);
    // Long key rows, and Stable Diffusion's self- and cross-attention at 32x32 latents (8 heads
    // of 40, 77 text tokens).
    ops_check::check_attention_cases(
        55,
        &[
            (&[1], 40, 1100, 16, 16),
            (&[2, 8], 1024, 1024, 40, 40),
            (&[2, 8], 1024, 77, 40, 40),
        ],
    );
    ops_check::check_masked_attention_cases(56, ops_check::MASKED_ATTENTION_CASES);
    ops_check::check_attention_fully_masked_row(57);
}

#[test]
fn per_sample_mse_cuda_matches_reference() {
    use_cuda_kernels();
    ops_check::check_mse_cases(46, ops_check::GPU_MSE_SHAPES);
    ops_check::check_mse_cases(58, &[&[4, 4, 64, 64]]);
}

/// Relative tolerance of half-precision storage: outputs and gradients are rounded to 8 (bf16)
/// or 11 (f16) significant bits after f32 compute, and some backward intermediates (attention's
/// `rowsum(dO * O)`) are candle ops in the half type. A wrong kernel is off by order one.
fn half_tol(dtype: DType) -> f64 {
    if dtype == DType::BF16 {
        3e-2
    } else {
        1e-2
    }
}

/// `ours` on `inputs` stored in `dtype` against `reference` in f32 on the same rounded inputs:
/// the outputs and the gradients of `sum(out * r)`.
fn check_half(
    what: &str,
    dtype: DType,
    inputs: &[Tensor],
    ours: impl Fn(&[Tensor]) -> Tensor,
    reference: impl Fn(&[Tensor]) -> Tensor,
) {
    let rounded: Vec<Tensor> = inputs.iter().map(|t| t.to_dtype(dtype).unwrap()).collect();
    let half: Vec<Var> = rounded.iter().map(|t| Var::from_tensor(t).unwrap()).collect();
    let full: Vec<Var> = rounded
        .iter()
        .map(|t| Var::from_tensor(&t.to_dtype(DType::F32).unwrap()).unwrap())
        .collect();
    let hx: Vec<Tensor> = half.iter().map(|v| v.as_tensor().clone()).collect();
    let fx: Vec<Tensor> = full.iter().map(|v| v.as_tensor().clone()).collect();
    let (a, b) = (ours(&hx), reference(&fx));
    assert_eq!(a.dtype(), dtype, "{what}: output dtype");
    let tol = half_tol(dtype);
    let err = ops_check::rel_err(&a, &b);
    assert!(err < tol, "{what} {dtype:?}: forward relative error {err:e}");
    let r = randn(&mut Rng::new(98), b.dims());
    let ga = (a * r.to_dtype(dtype).unwrap())
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let gb = (b * &r).unwrap().sum_all().unwrap().backward().unwrap();
    for (i, (x, y)) in hx.iter().zip(&fx).enumerate() {
        let (da, db) = (ga.get(x).unwrap(), gb.get(y).unwrap());
        let err = ops_check::rel_err(da, db);
        assert!(
            err < tol,
            "{what} {dtype:?}: gradient of input {i}: relative error {err:e}"
        );
    }
}

#[test]
fn half_precision_kernels_match_f32_reference() {
    use_cuda_kernels();
    let mut rng = Rng::new(47);
    for dtype in [DType::BF16, DType::F16] {
        let conv = [
            randn(&mut rng, &[2, 16, 12, 12]),
            (randn(&mut rng, &[24, 16, 3, 3]) * 0.1).unwrap(),
        ];
        check_half(
            "conv2d",
            dtype,
            &conv,
            |x| ops::conv2d::conv2d(&x[0], &x[1], 1, 1).unwrap(),
            |x| ops::conv2d::reference(&x[0], &x[1], 1, 1).unwrap(),
        );
        let gn = [
            randn(&mut rng, &[2, 32, 8, 8]),
            randn(&mut rng, &[32]),
            randn(&mut rng, &[32]),
        ];
        check_half(
            "group_norm + silu",
            dtype,
            &gn,
            |x| ops::group_norm::group_norm(&x[0], &x[1], &x[2], 8, 1e-5, true).unwrap(),
            |x| ops::group_norm::reference(&x[0], &x[1], &x[2], 8, 1e-5, true).unwrap(),
        );
        let attn = [
            randn(&mut rng, &[4, 64, 40]),
            randn(&mut rng, &[4, 77, 40]),
            randn(&mut rng, &[4, 77, 40]),
        ];
        let scale = 1.0 / 40f64.sqrt();
        check_half(
            "attention",
            dtype,
            &attn,
            |x| ops::attention::attention(&x[0], &x[1], &x[2], scale, None).unwrap(),
            |x| ops::attention::reference(&x[0], &x[1], &x[2], scale, None).unwrap(),
        );
        let mse = [randn(&mut rng, &[4, 4, 16, 16]), randn(&mut rng, &[4, 4, 16, 16])];
        check_half(
            "per_sample_mse",
            dtype,
            &mse,
            |x| ops::mse::per_sample_mse(&x[0], &x[1]).unwrap(),
            |x| ops::mse::reference(&x[0], &x[1]).unwrap(),
        );
    }
}
