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
    // (batch, c_in, h, w, c_out, kernel, stride, padding): padded, strided, 1x1 and 5x5
    // convolutions, and outputs and reductions that are not multiples of the 64 x 64 x 16 tiles.
    ops_check::check_conv2d_cases(
        31,
        &[
            (2, 3, 8, 8, 5, 3, 1, 1),
            (1, 4, 9, 7, 6, 3, 2, 1),
            (3, 2, 11, 10, 3, 3, 2, 0),
            (1, 5, 5, 5, 2, 5, 1, 2),
            (1, 3, 70, 9, 65, 3, 1, 1),
            (2, 24, 6, 6, 20, 1, 1, 0),
            (1, 2, 12, 12, 3, 5, 3, 2),
        ],
    );
}

#[test]
fn group_norm_cuda_emu_matches_reference() {
    use_emulator();
    ops_check::check_group_norm_cases(
        32,
        &[
            (vec![2, 8, 5, 5], 4),
            (vec![1, 6, 3, 7], 6),
            (vec![3, 4, 4, 4], 1),
            (vec![2, 12, 9], 3),
            // Rows of 646 elements: three partial passes of 256 threads.
            (vec![2, 6, 17, 19], 3),
        ],
    );
}

#[test]
fn layer_norm_cuda_emu_matches_reference() {
    use_emulator();
    ops_check::check_layer_norm_cases(33, &[vec![2, 5, 16], vec![7, 3], vec![3, 300], vec![4, 9, 80]]);
}

#[test]
fn softmax_cuda_emu_matches_reference() {
    use_emulator();
    ops_check::check_softmax_cases(34, &[vec![3, 7], vec![2, 4, 33], vec![5], vec![2, 3, 600]]);
}

#[test]
fn attention_cuda_emu_matches_reference() {
    use_emulator();
    // (leading dims, lq, lk, d, dv): self-attention, cross-attention (other key length and value
    // width), a single query, query and key lengths over several 256-row tiles, and Stable
    // Diffusion's head widths (40, 80).
    ops_check::check_attention_cases(
        37,
        &[
            (vec![2, 3], 10, 10, 8, 8),
            (vec![2, 4], 16, 7, 8, 8),
            (vec![1], 5, 9, 4, 6),
            (vec![3, 2], 1, 3, 5, 5),
            (vec![1, 2], 300, 270, 16, 12),
            (vec![2], 33, 20, 40, 80),
        ],
    );
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
    // [2, 3, 50, 50]: 7,500 elements per sample, two partial sums of 4,096.
    ops_check::check_mse_cases(35, &[vec![4, 3, 5, 5], vec![2, 7], vec![1, 1], vec![2, 3, 50, 50]]);
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
