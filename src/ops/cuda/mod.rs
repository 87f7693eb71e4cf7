//! The CUDA kernels of `kernels/cuda/`: each op family is one `.cu` file, compiled to PTX by
//! `build.rs` in builds with the `cuda` feature. The files here turn one op call into a [`Job`]
//! (buffers and launches, independent of where it runs); [`device`] runs jobs on candle's CUDA
//! device, and [`emu`] (the `cuda-emu` feature, for tests) runs the same kernel sources, compiled
//! as C++, on a CPU emulator of the CUDA execution model, so that CI checks them without a GPU.
//!
//! Kernels compute in f32 and read and write f32, f16 or bf16 (the emulator runs f32). Every
//! kernel runs [`BLOCK`] threads per block on a 1-D grid.

pub(crate) mod attention;
pub(crate) mod conv2d;
#[cfg(feature = "cuda")]
pub(crate) mod device;
#[cfg(feature = "cuda-emu")]
pub mod emu;
pub(crate) mod mse;
pub(crate) mod row_norm;
pub(crate) mod softmax;

use std::sync::atomic::{AtomicU64, Ordering};

use candle_core::DType;

use crate::{Error, Result};

/// Threads per block of every kernel (`BLOCK` in `kernels/cuda/common.cuh`).
pub(crate) const BLOCK: u32 = 256;

static LAUNCHES: AtomicU64 = AtomicU64::new(0);

/// CUDA kernel launches queued so far in this process, on a device or the emulator (tests check
/// that the kernels really ran).
pub fn launch_count() -> u64 {
    LAUNCHES.load(Ordering::Relaxed)
}

/// Counts one launch.
fn count_launch() {
    LAUNCHES.fetch_add(1, Ordering::Relaxed);
}

/// A buffer of a job: an input, the output (in the job's dtype), or f32 scratch kept between
/// launches. `I` is how the runner holds an input (a device storage, or a host slice).
pub(crate) enum Slot<I> {
    In(I),
    Out(usize),
    Scratch(usize),
}

/// One kernel argument: a buffer (by slot index, at an element offset), a null pointer, or a
/// scalar.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Arg {
    Buf(usize, usize),
    Null,
    U32(u32),
    F32(f32),
}

/// One launch: the kernel `<module>/<name>_<dtype>` on `blocks` blocks of [`BLOCK`] threads.
pub(crate) struct Launch {
    pub module: &'static str,
    pub name: &'static str,
    pub blocks: u32,
    pub args: Vec<Arg>,
}

/// One op call: its buffers, and launches run in order (each sees the writes of the previous
/// ones). Exactly one slot is [`Slot::Out`]: the result.
pub(crate) struct Job<I> {
    pub op: &'static str,
    pub dtype: DType,
    pub slots: Vec<Slot<I>>,
    pub launches: Vec<Launch>,
}

impl<I> Job<I> {
    /// The index of the output slot.
    pub fn output(&self) -> Result<usize> {
        self.slots
            .iter()
            .position(|s| matches!(s, Slot::Out(_)))
            .ok_or_else(|| op_error(self.op, "job without an output"))
    }
}

/// A `u32` kernel argument, or an error naming `op` when the size does not fit 32 bits.
pub(crate) fn word(op: &str, what: &str, v: usize) -> Result<Arg> {
    u32::try_from(v)
        .map(Arg::U32)
        .map_err(|_| op_error(op, format!("{what} = {v} does not fit 32 bits")))
}

/// Blocks for `n` items at `per_block` items per block (at least one).
pub(crate) fn blocks_for(op: &str, n: usize, per_block: usize) -> Result<u32> {
    u32::try_from(n.div_ceil(per_block.max(1)).max(1))
        .map_err(|_| op_error(op, format!("{n} items need too many blocks")))
}

/// An [`Error::Op`] on the CUDA kernels.
pub(crate) fn op_error(op: &str, reason: impl Into<String>) -> Error {
    Error::Op {
        op: op.into(),
        device: "cuda".into(),
        reason: reason.into(),
    }
}
