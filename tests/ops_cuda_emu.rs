//! The CUDA kernels of `kernels/cuda/` on the CPU emulator of the CUDA execution model
//! (`cargo test --features cuda-emu --test ops_cuda_emu`): the kernel sources, compiled as C++,
//! and the launch jobs `--device cuda` runs, against the composed references, forward values and
//! the gradient of every input within 1e-4 of the reference's largest magnitude. The shapes are
//! not multiples of the kernels' tiles (64 x 64 GEMM tiles, 256-thread rows and key tiles).
//! The emulator runs a block's threads as fibers on one core, so the cases are small.
//! Beyond tolerance, the kernels must give the same bits whatever order their blocks and threads
//! run in (no races), and must not write outside their buffers (the emulator's guards).
#![cfg(feature = "cuda-emu")]

mod common;

use candle_core::{DType, Tensor};
use diffalign::ops::cuda::emu::{bounds_probe, schedule_trace, with_schedule, Misstep, Schedule};
use diffalign::ops::{self, Backend};
use diffalign::rng::Rng;

use common::ops_check::{self, randn};

/// Switches the kernels to the CUDA emulator.
fn use_emulator() {
    let config = ops::KernelConfig {
        backend: Backend::CudaEmu,
        ..Default::default()
    };
    ops::install(&config).expect("a build with the cuda-emu feature");
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

#[test]
fn emulator_schedules_reorder_blocks_and_threads() {
    const T: usize = 256;
    let blocks = 3;
    let in_order = schedule_trace(blocks as u32, Schedule::InOrder).unwrap();
    let reversed = schedule_trace(blocks as u32, Schedule::Reversed).unwrap();
    let shuffled = schedule_trace(blocks as u32, Schedule::Shuffled(5)).unwrap();
    for b in 0..blocks {
        for t in 0..T {
            let i = 2 * (b * T + t);
            // Block b runs its threads before the barrier, then after it, at steps 2T b ...
            assert_eq!(in_order[i..i + 2], [(2 * T * b + t) as u32, (2 * T * b + T + t) as u32]);
            let (rb, rt) = (blocks - 1 - b, T - 1 - t);
            assert_eq!(
                reversed[i..i + 2],
                [(2 * T * rb + rt) as u32, (2 * T * rb + T + rt) as u32]
            );
        }
    }
    // Shuffled: every block still runs as a whole, all its threads before the barrier and then
    // all after it, but in orders that differ from block to block and round to round.
    let mut block_starts = Vec::new();
    let mut rounds = Vec::new();
    for b in 0..blocks {
        let steps = &shuffled[2 * b * T..2 * (b + 1) * T];
        let start = *steps.iter().min().unwrap() as usize;
        assert_eq!(start % (2 * T), 0, "block {b} starts mid-way through another block");
        for phase in 0..2 {
            let mut order: Vec<usize> = (0..T)
                .map(|t| steps[2 * t + phase] as usize - start - phase * T)
                .collect();
            let mut sorted = order.clone();
            sorted.sort_unstable();
            assert_eq!(
                sorted,
                (0..T).collect::<Vec<_>>(),
                "block {b} phase {phase} is not one round"
            );
            order.dedup();
            rounds.push(order);
        }
        block_starts.push(start / (2 * T));
    }
    assert_ne!(
        block_starts,
        (0..blocks).collect::<Vec<_>>(),
        "shuffled blocks ran in order"
    );
    let identity: Vec<usize> = (0..T).collect();
    for (k, round) in rounds.iter().enumerate() {
        assert_ne!(round, &identity, "shuffled round {k} ran in order");
        assert!(
            rounds[..k].iter().all(|r| r != round),
            "shuffled round {k} repeats an earlier one"
        );
    }
}

/// The forward output and the gradient of `sum(out * r)` with respect to each input, as bits.
fn outputs_and_gradients(inputs: &[Tensor], f: &dyn Fn(&[Tensor]) -> Tensor) -> Vec<Vec<u32>> {
    let (out, grads) = ops_check::output_and_gradients(inputs, 98, f);
    let bits = |t: &Tensor| -> Vec<u32> {
        let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        v.into_iter().map(f32::to_bits).collect()
    };
    let mut all = vec![bits(&out)];
    all.extend(
        grads
            .iter()
            .map(|g| bits(g.as_ref().expect("an input without a gradient"))),
    );
    all
}

/// A kernel without races gives the same bits whatever order its blocks and threads run in; a
/// missing barrier or a dependence between blocks shows up as a difference.
#[test]
fn kernels_give_the_same_bits_under_every_schedule() {
    use_emulator();
    let mut rng = Rng::new(44);
    let mut n = |shape: &[usize]| randn(&mut rng, shape);
    let (q, k, v) = (n(&[2, 2, 21, 12]), n(&[2, 2, 19, 12]), n(&[2, 2, 19, 10]));
    let mask = ops_check::attention_mask(&mut Rng::new(45), ops_check::MaskKind::CausalPadded, (2, 2), 21, 19);
    type Case = (&'static str, Vec<Tensor>, Box<dyn Fn(&[Tensor]) -> Tensor>);
    let cases: Vec<Case> = vec![
        (
            "softmax",
            vec![n(&[3, 600])],
            Box::new(|x| ops::softmax::softmax(&x[0]).unwrap()),
        ),
        (
            "layer_norm",
            vec![n(&[5, 300]), n(&[300]), n(&[300])],
            Box::new(|x| ops::layer_norm::layer_norm(&x[0], &x[1], &x[2], 1e-5).unwrap()),
        ),
        (
            "group_norm + silu",
            vec![n(&[2, 12, 9, 9]), n(&[12]), n(&[12])],
            Box::new(|x| ops::group_norm::group_norm(&x[0], &x[1], &x[2], 4, 1e-5, true).unwrap()),
        ),
        (
            "conv2d",
            vec![n(&[2, 5, 11, 13]), n(&[70, 5, 3, 3])],
            Box::new(|x| ops::conv2d::conv2d(&x[0], &x[1], 1, 1).unwrap()),
        ),
        (
            "attention",
            vec![q.clone(), k.clone(), v.clone()],
            Box::new(|x| ops::attention::attention(&x[0], &x[1], &x[2], 0.3, None).unwrap()),
        ),
        (
            "masked attention",
            vec![q, k, v],
            Box::new(move |x| ops::attention::attention(&x[0], &x[1], &x[2], 0.3, Some(&mask)).unwrap()),
        ),
        (
            "per_sample_mse",
            vec![n(&[2, 3, 50, 50]), n(&[2, 3, 50, 50])],
            Box::new(|x| ops::mse::per_sample_mse(&x[0], &x[1]).unwrap()),
        ),
    ];
    for (what, inputs, f) in &cases {
        let before = ops::cuda::launch_count();
        let want = outputs_and_gradients(inputs, f.as_ref());
        assert!(ops::cuda::launch_count() > before, "{what} launched no emulated kernel");
        for schedule in [Schedule::Reversed, Schedule::Shuffled(1), Schedule::Shuffled(2)] {
            let got = with_schedule(schedule, || outputs_and_gradients(inputs, f.as_ref()));
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                let part = if i == 0 {
                    "output".to_string()
                } else {
                    format!("gradient of input {}", i - 1)
                };
                let differ = g.iter().zip(w).filter(|(a, b)| a != b).count();
                assert_eq!(
                    differ,
                    0,
                    "{what}: {part} differs in {differ} of {} values under {schedule:?}",
                    w.len()
                );
            }
        }
    }
}

#[test]
fn emulator_guards_catch_stray_writes_and_unwritten_outputs() {
    let input: Vec<f32> = (0..300).map(|i| i as f32 * 0.5).collect();
    assert_eq!(bounds_probe(&input, Misstep::None).unwrap(), input);
    for (misstep, says) in [
        (Misstep::WritePastEnd, "wrote outside buffer 1"),
        (Misstep::WriteBeforeStart, "wrote outside buffer 1"),
        (Misstep::WriteInput, "wrote into its input buffer 0"),
    ] {
        let err = bounds_probe(&input, misstep).expect_err("a stray write went unnoticed");
        assert!(err.to_string().contains(says), "{misstep:?}: {err}");
    }
    let out = bounds_probe(&input, Misstep::SkipLast).unwrap();
    assert_eq!(out[..299], input[..299]);
    assert!(out[299].is_nan(), "an unwritten output element reads {}", out[299]);
}
