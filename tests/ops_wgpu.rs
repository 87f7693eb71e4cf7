//! The wgpu kernels of `diffalign::ops` (the WGSL shaders of `kernels/wgsl/`) against the composed
//! references: forward values and the gradient of every input, within 1e-4 of the reference's
//! largest magnitude, over shapes that are not multiples of the workgroup tiles (64 x 64 GEMM
//! tiles, 256-thread rows), strided and padded convolutions, cross-attention and odd group sizes.
//! Every test switches the process to the wgpu backend and fails, naming the problem, when no
//! adapter exists: CI must really run these (on Linux without a GPU, Mesa's lavapipe).
#![cfg(feature = "wgpu")]

mod common;

use candle_core::DType;
use diffalign::ops::{self, Backend};
use diffalign::rng::Rng;

use common::ops_check::{self, check, randn};

/// Switches the kernels to wgpu, or fails the test with the reason there is no adapter.
fn use_wgpu() {
    let config = ops::KernelConfig {
        backend: Backend::Wgpu,
        ..Default::default()
    };
    if let Err(e) = ops::install(&config) {
        panic!("the wgpu kernel tests need a wgpu adapter: {e}");
    }
}

#[test]
fn wgpu_backend_runs_the_kernels() {
    use_wgpu();
    let before = ops::wgpu::transfer_totals();
    let x = randn(&mut Rng::new(10), &[4, 300]);
    let y = ops::softmax::softmax(&x).unwrap();
    assert!(ops_check::rel_err(&y, &ops::softmax::reference(&x).unwrap()) < ops_check::KERNEL_REL_TOL);
    let after = ops::wgpu::transfer_totals();
    assert!(
        after.download_bytes >= before.download_bytes + 4 * 1200,
        "softmax did not read its output back from the wgpu device"
    );
    assert_eq!(ops::backend(), Backend::Wgpu);
}

#[test]
fn conv2d_wgpu_matches_reference() {
    use_wgpu();
    ops_check::check_conv2d_cases(11, ops_check::GPU_CONV2D_CASES);
    // A stride wider than the padding with 70 output channels.
    ops_check::check_conv2d_cases(21, &[(2, 17, 13, 11, 70, 3, 2, 1)]);
}

#[test]
fn group_norm_wgpu_matches_reference() {
    use_wgpu();
    ops_check::check_group_norm_cases(12, ops_check::GPU_GROUP_NORM_CASES);
    ops_check::check_group_norm_cases(22, &[(&[1, 32, 9, 9], 32)]);
}

#[test]
fn layer_norm_wgpu_matches_reference() {
    use_wgpu();
    ops_check::check_layer_norm_cases(13, ops_check::GPU_LAYER_NORM_SHAPES);
    ops_check::check_layer_norm_cases(26, &[&[1, 1, 64], &[4, 33, 80]]);
}

#[test]
fn softmax_wgpu_matches_reference() {
    use_wgpu();
    ops_check::check_softmax_cases(14, ops_check::GPU_SOFTMAX_SHAPES);
    ops_check::check_softmax_cases(27, &[&[3, 50, 256]]);
}

#[test]
fn attention_wgpu_matches_reference() {
    use_wgpu();
    ops_check::check_attention_cases(15, ops_check::GPU_ATTENTION_CASES);
    // Long rows: lavapipe stops any invocation's loops after 65,535 iterations in all.
    ops_check::check_attention_cases(28, &[(&[1], 40, 1100, 16, 16), (&[1], 1100, 40, 16, 16)]);
}

#[test]
fn masked_attention_wgpu_matches_reference() {
    use_wgpu();
    use ops_check::MaskKind::*;
    ops_check::check_masked_attention_cases(16, ops_check::MASKED_ATTENTION_CASES);
    // ((batch, heads), lq, lk, d, dv, mask): query and key lengths over several 256-row tiles,
    // and rows long enough for lavapipe's loop cap.
    ops_check::check_masked_attention_cases(
        25,
        &[
            ((1, 2), 300, 270, 16, 12, CausalPadded),
            ((1, 1), 40, 1100, 16, 16, PaddedKeys),
            ((1, 1), 1100, 40, 16, 16, Causal),
        ],
    );
}

#[test]
fn masked_attention_wgpu_fully_masked_row_matches_reference_nans() {
    use_wgpu();
    ops_check::check_attention_fully_masked_row(23);
}

#[test]
fn masked_attention_wgpu_takes_the_fused_kernel() {
    use_wgpu();
    ops_check::check_masked_attention_is_fused(24);
}

#[test]
fn per_sample_mse_wgpu_matches_reference() {
    use_wgpu();
    ops_check::check_mse_cases(17, ops_check::GPU_MSE_SHAPES);
}

#[test]
fn f64_stays_on_the_cpu_kernels_under_wgpu() {
    use_wgpu();
    let x = randn(&mut Rng::new(18), &[3, 40]).to_dtype(DType::F64).unwrap();
    let y = ops::softmax::softmax(&x).unwrap();
    assert_eq!(y.dtype(), DType::F64);
    // f32 shaders could not come this close.
    assert!(ops_check::rel_err(&y, &ops::softmax::reference(&x).unwrap()) < 1e-12);
}

#[test]
fn conv2d_wgpu_long_reductions() {
    use_wgpu();
    // The weight gradient reduces over B * Ho * Wo = 8,192 positions and the forward over
    // C_in * 9 = 2,304: 512 and 144 tiles of depth 16.
    ops_check::check_conv2d_cases(20, &[(2, 256, 64, 64, 4, 3, 1, 1)]);
}

#[test]
fn conv2d_wgpu_large_output_spans_many_tiles() {
    use_wgpu();
    let mut rng = Rng::new(19);
    let inputs = [
        randn(&mut rng, &[1, 32, 40, 40]),
        (randn(&mut rng, &[40, 32, 3, 3]) * 0.1).unwrap(),
    ];
    check(
        "conv2d 40x40",
        &inputs,
        |x| ops::conv2d::conv2d(&x[0], &x[1], 1, 1).unwrap(),
        |x| ops::conv2d::reference(&x[0], &x[1], 1, 1).unwrap(),
    );
}

#[test]
fn device_wgpu_keeps_tensors_on_the_cpu_and_selects_the_wgpu_kernels() {
    let spec: diffalign::device::DeviceSpec = "wgpu".parse().unwrap_or_else(|e| panic!("--device wgpu: {e}"));
    assert!(spec.device().unwrap().is_cpu());
    let config = ops::KernelConfig::from_settings(spec, None, None).unwrap();
    assert_eq!(config.backend, Backend::Wgpu);
}
