//! The CUDA kernels of `kernels/cuda/` on the CPU emulator of the CUDA execution model
//! (`cargo test --features cuda-emu --test ops_cuda_emu`): the kernel sources, compiled as C++,
//! and the launch jobs `--device cuda` runs, against the composed references, forward values and
//! the gradient of every input within 1e-4 of the reference's largest magnitude. The shapes are
//! not multiples of the kernels' tiles (64 x 64 GEMM tiles, 256-thread rows and key tiles).
//! The emulator runs a block's threads as fibers on one core, so the cases are small.
#![cfg(feature = "cuda-emu")]

mod common;

use candle_core::DType;
use diffalign::ops::{self, Backend};
use diffalign::rng::Rng;

use common::ops_check::{self, randn};

/// Switches the kernels to the CUDA emulator.
fn use_emulator() {
    ops::set_backend(Backend::CudaEmu).expect("a build with the cuda-emu feature");
}

#[test]
fn emulator_backend_runs_the_kernels() {
    use_emulator();
    let before = ops::cuda::launch_count();
    let x = randn(&mut Rng::new(30), &[4, 300]);
    let y = ops::softmax::softmax(&x).unwrap();
    assert!(ops_check::rel_err(&y, &ops::softmax::reference(&x).unwrap()) < ops_check::KERNEL_REL_TOL);
    assert!(
        ops::cuda::launch_count() > before,
        "softmax did not launch an emulated CUDA kernel"
    );
    assert_eq!(ops::backend(), Backend::CudaEmu);
}

#[test]
fn conv2d_cuda_emu_matches_reference() {
    use_emulator();
    ops_check::check_conv2d_cases(31, ops_check::GPU_CONV2D_CASES);
}

#[test]
fn group_norm_cuda_emu_matches_reference() {
    use_emulator();
    ops_check::check_group_norm_cases(32, ops_check::GPU_GROUP_NORM_CASES);
}

#[test]
fn layer_norm_cuda_emu_matches_reference() {
    use_emulator();
    ops_check::check_layer_norm_cases(33, ops_check::GPU_LAYER_NORM_SHAPES);
    ops_check::check_layer_norm_cases(42, &[&[4, 9, 80]]);
}

#[test]
fn softmax_cuda_emu_matches_reference() {
    use_emulator();
    ops_check::check_softmax_cases(34, ops_check::GPU_SOFTMAX_SHAPES);
}

#[test]
fn attention_cuda_emu_matches_reference() {
    use_emulator();
    ops_check::check_attention_cases(37, ops_check::GPU_ATTENTION_CASES);
    // The widest heads the kernels take (160, Stable Diffusion 1.x's deepest level), and wider
    // ones, which take the composed ops.
    ops_check::check_attention_cases(43, &[(&[2], 20, 19, 160, 160), (&[1], 5, 7, 200, 8)]);
}

#[test]
fn masked_attention_cuda_emu_matches_reference() {
    use_emulator();
    ops_check::check_masked_attention_cases(38, ops_check::MASKED_ATTENTION_CASES);
    ops_check::check_masked_attention_cases(39, &[((1, 2), 300, 270, 16, 12, ops_check::MaskKind::CausalPadded)]);
}

#[test]
fn masked_attention_cuda_emu_fully_masked_row_matches_reference_nans() {
    use_emulator();
    ops_check::check_attention_fully_masked_row(40);
}

#[test]
fn masked_attention_cuda_emu_takes_the_kernel() {
    use_emulator();
    let before = ops::cuda::launch_count();
    ops_check::check_masked_attention_is_fused(41);
    assert!(
        ops::cuda::launch_count() > before,
        "masked attention launched no emulated kernel"
    );
}

#[test]
fn per_sample_mse_cuda_emu_matches_reference() {
    use_emulator();
    ops_check::check_mse_cases(35, ops_check::GPU_MSE_SHAPES);
}

#[test]
fn f64_stays_on_the_cpu_kernels_under_the_emulator() {
    use_emulator();
    let x = randn(&mut Rng::new(36), &[3, 40]).to_dtype(DType::F64).unwrap();
    let y = ops::softmax::softmax(&x).unwrap();
    assert_eq!(y.dtype(), DType::F64);
    // f32 kernels could not come this close.
    assert!(ops_check::rel_err(&y, &ops::softmax::reference(&x).unwrap()) < 1e-12);
}
