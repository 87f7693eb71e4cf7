//! Every fused kernel of `diffalign::ops` against its composed reference: forward values and the
//! gradients of every input, over several shapes, within 1e-4 of the reference's largest
//! magnitude (f32). The f64 finite-difference checks of the same ops are in `ops_grad.rs`.

mod common;

use candle_core::{DType, Tensor, Var};
use diffalign::ops;
use diffalign::rng::Rng;

use common::ops_check::{self, check, randn};

#[test]
fn conv2d_matches_reference() {
    // (batch, c_in, h, w, c_out, kernel, stride, padding)
    ops_check::check_conv2d_cases(
        1,
        &[
            (2, 3, 8, 8, 5, 3, 1, 1),
            (1, 4, 9, 7, 6, 3, 2, 1),
            (2, 8, 6, 6, 4, 1, 1, 0),
            (3, 2, 11, 10, 3, 3, 2, 0),
            (1, 5, 5, 5, 2, 5, 1, 2),
            (2, 16, 16, 16, 8, 3, 1, 1),
        ],
    );
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
    ops_check::check_group_norm_cases(
        3,
        &[
            (&[2, 8, 5, 5], 4),
            (&[1, 6, 3, 7], 6),
            (&[3, 4, 4, 4], 1),
            (&[2, 12, 9], 3),
        ],
    );
}

#[test]
fn layer_norm_matches_reference() {
    ops_check::check_layer_norm_cases(4, &[&[2, 5, 16], &[7, 3], &[1, 1, 64], &[4, 256, 80]]);
}

#[test]
fn softmax_matches_reference() {
    ops_check::check_softmax_cases(5, &[&[3, 7], &[2, 4, 33], &[5], &[3, 100, 256]]);
}

#[test]
fn attention_matches_reference() {
    // (leading dims, lq, lk, d, dv): self-attention, cross-attention, a single head.
    ops_check::check_attention_cases(
        6,
        &[
            (&[2, 3], 10, 10, 8, 8),
            (&[2, 4], 16, 7, 8, 8),
            (&[1], 5, 9, 4, 6),
            (&[3, 2], 1, 3, 5, 5),
            // Big enough for the thread pool (slices in parallel).
            (&[2, 4], 96, 96, 8, 8),
            // Several query blocks of the CPU kernel (64K probabilities each), the last short.
            (&[1, 2], 200, 700, 8, 12),
        ],
    );
}

/// GEGLU as one op against `a * gelu_erf(b)` composed: forward and the input's gradient, on
/// small, odd and thread-pool-sized inputs.
#[test]
fn geglu_matches_reference() {
    let mut rng = Rng::new(24);
    for shape in [&[3, 8][..], &[2, 5, 14], &[1, 1, 2], &[2, 256, 640]] {
        let inputs = [randn(&mut rng, shape)];
        ops_check::check(
            &format!("geglu {shape:?}"),
            &inputs,
            |x| ops::geglu::geglu(&x[0]).unwrap(),
            |x| ops::geglu::reference(&x[0]).unwrap(),
        );
    }
    let odd = randn(&mut rng, &[2, 3]);
    let err = ops::geglu::geglu(&odd).unwrap_err().to_string();
    assert!(err.contains("does not split"), "{err}");
}

/// Heads side by side in the projections' rows, as the UNet's and CLIP's attention pass them:
/// the kernels read each head's columns in place.
#[test]
fn attention_heads_matches_reference() {
    let mut cases: Vec<_> = [
        ((2, 3), 10, 10, 8, 8),
        ((2, 4), 16, 7, 8, 8),
        ((1, 1), 5, 9, 4, 6),
        ((3, 2), 1, 3, 5, 7),
        ((2, 4), 96, 96, 8, 8),
        ((1, 2), 200, 700, 16, 8),
    ]
    .into_iter()
    .map(|(bh, lq, lk, d, dv)| (bh, lq, lk, d, dv, None))
    .collect();
    cases.extend(
        ops_check::MASKED_ATTENTION_CASES
            .iter()
            .map(|&(bh, lq, lk, d, dv, kind)| (bh, lq, lk, d, dv, Some(kind))),
    );
    ops_check::check_attention_heads_cases(23, &cases);
}

#[test]
fn masked_attention_matches_reference() {
    ops_check::check_masked_attention_cases(7, ops_check::MASKED_ATTENTION_CASES);
    // Big enough for the thread pool (slices in parallel).
    ops_check::check_masked_attention_cases(8, &[((2, 4), 96, 96, 8, 8, ops_check::MaskKind::CausalPadded)]);
    ops_check::check_masked_attention_cases(9, &[((1, 2), 150, 600, 8, 8, ops_check::MaskKind::CausalPadded)]);
}

#[test]
fn masked_attention_fully_masked_row_matches_reference_nans() {
    ops_check::check_attention_fully_masked_row(21);
}

#[test]
fn masked_attention_takes_the_fused_kernel() {
    ops_check::check_masked_attention_is_fused(22);
}

#[test]
fn per_sample_mse_matches_reference() {
    ops_check::check_mse_cases(8, &[&[4, 3, 5, 5], &[2, 7], &[1, 1], &[2, 4, 96, 96]]);
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

#[cfg(not(feature = "wgpu"))]
#[test]
fn device_wgpu_without_the_feature_names_it() {
    let err = "wgpu".parse::<diffalign::device::DeviceSpec>().unwrap_err().to_string();
    assert!(err.contains("`wgpu` feature"), "{err}");
    let config = ops::KernelConfig {
        backend: ops::Backend::Wgpu,
        ..Default::default()
    };
    let err = ops::install(&config).unwrap_err().to_string();
    assert!(err.contains("`--features wgpu`"), "{err}");
    assert_eq!(ops::backend(), ops::Backend::Cpu);
}

#[test]
fn cuda_kernel_selection_reads_names_and_rejects_unknown_ones() {
    use ops::{parse_cuda_kernels, KernelOp};
    assert_eq!(parse_cuda_kernels("1").unwrap(), KernelOp::ALL);
    assert_eq!(parse_cuda_kernels("all").unwrap(), KernelOp::ALL);
    for none in ["0", "", "none"] {
        assert!(parse_cuda_kernels(none).unwrap().is_empty(), "{none:?}");
    }
    assert_eq!(
        parse_cuda_kernels(" conv2d, group_norm,").unwrap(),
        [KernelOp::Conv2d, KernelOp::GroupNorm]
    );
    let err = parse_cuda_kernels("conv2d,flash").unwrap_err();
    assert!(err.contains("\"flash\"") && err.contains("attention"), "{err}");

    // The environment's values reach the configuration, and an unknown name is an error that
    // names its variable.
    let cpu = diffalign::device::DeviceSpec::Cpu;
    let config = ops::KernelConfig::from_settings(cpu, Some("reference"), Some("softmax,attention")).unwrap();
    assert!(!config.fused);
    assert_eq!(config.cuda_ops, [KernelOp::Softmax, KernelOp::Attention]);
    let err = ops::KernelConfig::from_settings(cpu, None, Some("flash"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("DIFFALIGN_CUDA_KERNELS") && err.contains("\"flash\""),
        "{err}"
    );
    let err = ops::KernelConfig::from_settings(cpu, Some("tpu"), None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("DIFFALIGN_KERNELS") && err.contains("\"tpu\""), "{err}");

    // Only tensors on a CUDA device read this set, so the CPU tests beside this one are
    // unaffected.
    ops::install(&ops::KernelConfig {
        cuda_ops: vec![KernelOp::Softmax, KernelOp::Attention],
        ..Default::default()
    })
    .unwrap();
    let on: Vec<KernelOp> = KernelOp::ALL
        .into_iter()
        .filter(|&op| ops::cuda_kernel_enabled(op))
        .collect();
    assert_eq!(on, [KernelOp::Softmax, KernelOp::Attention]);
    assert_eq!(ops::installed().cuda_ops, on);
    ops::install(&ops::KernelConfig::default()).unwrap();
    assert!(!KernelOp::ALL.into_iter().any(ops::cuda_kernel_enabled));
}
