//! The CPU emulator of the CUDA kernels (the `cuda-emu` feature): the sources of `kernels/cuda/`
//! compiled as C++ against `kernels/cuda/emu/emu.h` by `build.rs`, run on host slices. It takes
//! the same [`Job`]s as [`super::device`], so tests check the kernels and their launch
//! arguments without a GPU. Slow (each block's threads are fibers on one core) and f32 only: a
//! test tool.
//!
//! Blocks, and a block's threads between two barriers, run one at a time, in the order of the
//! calling thread's [`Schedule`]. A kernel without races gives bit-identical results under every
//! order; one that lacks a barrier, or whose blocks depend on each other, does not, which is
//! what [`with_schedule`] lets tests check.

use std::cell::Cell;
use std::ffi::{c_char, c_void, CString};

use candle_core::{CpuStorage, DType};

use super::{op_error, Arg, Job, Launch, Slot, BLOCK};
use crate::Result;

extern "C" {
    /// Runs kernel `name` on `blocks` blocks of `threads` threads in the order `schedule` (0 in
    /// order, 1 reversed, 2 shuffled from `seed`); 0, 1 for an unknown name, 2 when fibers
    /// cannot be set up, 3 for an unknown schedule.
    fn diffalign_emu_launch(
        name: *const c_char,
        blocks: u32,
        threads: u32,
        args: *mut *mut c_void,
        schedule: u32,
        seed: u64,
    ) -> i32;
}

/// The order in which the emulator runs blocks, and each block's threads between barriers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Schedule {
    /// Blocks and threads by increasing index (the default).
    InOrder,
    /// By decreasing index.
    Reversed,
    /// A fresh random permutation for the blocks and for every round of threads, from this seed.
    Shuffled(u64),
}

impl Schedule {
    /// The launcher's `(schedule, seed)` arguments.
    fn code(self) -> (u32, u64) {
        match self {
            Schedule::InOrder => (0, 0),
            Schedule::Reversed => (1, 0),
            Schedule::Shuffled(seed) => (2, seed),
        }
    }
}

thread_local! {
    static SCHEDULE: Cell<Schedule> = const { Cell::new(Schedule::InOrder) };
}

/// Runs `f` with the emulator's launches from this thread in the order `schedule`, then restores
/// the previous order (also when `f` panics).
pub fn with_schedule<R>(schedule: Schedule, f: impl FnOnce() -> R) -> R {
    struct Restore(Schedule);
    impl Drop for Restore {
        fn drop(&mut self) {
            SCHEDULE.with(|s| s.set(self.0));
        }
    }
    let _restore = Restore(SCHEDULE.with(|s| s.replace(schedule)));
    f()
}

/// When each thread of a `blocks`-block launch ran under `schedule`, in emulator steps: entries
/// `2 (b * 256 + t)` and `2 (b * 256 + t) + 1` for thread `t` of block `b`, before and after a
/// barrier. A check of the scheduler itself, which the race tests rely on.
pub fn schedule_trace(blocks: u32, schedule: Schedule) -> Result<Vec<u32>> {
    let job: Job<&[f32]> = Job {
        op: "schedule_trace",
        dtype: DType::F32,
        slots: vec![Slot::Out(blocks as usize * BLOCK as usize * 2)],
        launches: vec![Launch {
            module: "emu",
            name: "schedule_trace",
            blocks,
            args: vec![Arg::Buf(0, 0)],
        }],
    };
    let steps = with_schedule(schedule, || run_host(job))?;
    // Steps stay far below 2^24, so f32 holds them exactly.
    Ok(steps.into_iter().map(|s| s as u32).collect())
}

/// A deliberate mistake of the emulator's bounds probe, for tests of its guards (the values are
/// the probe kernel's `mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Misstep {
    /// None: the probe copies its input to its output.
    None = 0,
    /// Writes one element past the end of the output.
    WritePastEnd = 1,
    /// Writes one element before the start of the output.
    WriteBeforeStart = 2,
    /// Writes into the input.
    WriteInput = 3,
    /// Leaves the last element of the output unwritten.
    SkipLast = 4,
}

/// Runs the bounds probe: a kernel that copies `input` to its output and makes `misstep`. The
/// emulator's guards turn the writes into errors and the unwritten element into NaN.
pub fn bounds_probe(input: &[f32], misstep: Misstep) -> Result<Vec<f32>> {
    let op = "bounds_probe";
    let job = Job {
        op,
        dtype: DType::F32,
        slots: vec![Slot::In(input), Slot::Out(input.len())],
        launches: vec![Launch {
            module: "emu",
            name: "bounds_probe",
            blocks: 1,
            args: vec![
                Arg::Buf(0, 0),
                Arg::Buf(1, 0),
                super::word(op, "len", input.len())?,
                Arg::U32(misstep as u32),
            ],
        }],
    };
    run_host(job)
}

/// One argument's value, which the launcher reads through a pointer.
enum Value {
    Ptr(*mut f32),
    U32(u32),
    F32(f32),
}

/// Floats of poison kept before and after every buffer: a kernel that writes there is caught
/// after its launch, and one that reads there gets NaN into its results.
const GUARD: usize = 256;

/// The poison of unwritten outputs and scratch: a quiet NaN with a payload no arithmetic makes.
const POISON: u32 = 0x7fc0_dead;

/// The poison of buffer `i`'s guards: NaNs whose payload names the buffer, since arithmetic on a
/// NaN keeps its payload, and a value read past one buffer's end and written past another's
/// must still differ from the guard it lands on.
fn guard_poison(i: usize) -> u32 {
    0x7fd0_0000 | (i as u32 & 0xffff)
}

/// A buffer of a launch with [`GUARD`] floats of poison on each side.
struct Guarded {
    data: Vec<f32>,
    len: usize,
    guard: u32,
}

impl Guarded {
    /// `body` between two guards of buffer `i`'s poison.
    fn new(i: usize, body: impl IntoIterator<Item = f32>) -> Self {
        let guard = guard_poison(i);
        let poison = || std::iter::repeat_n(f32::from_bits(guard), GUARD);
        let data: Vec<f32> = poison().chain(body).chain(poison()).collect();
        let len = data.len() - 2 * GUARD;
        Guarded { data, len, guard }
    }

    /// The first element of the body.
    fn ptr(&mut self) -> *mut f32 {
        self.data[GUARD..].as_mut_ptr()
    }

    /// The body.
    fn body(&self) -> &[f32] {
        &self.data[GUARD..GUARD + self.len]
    }

    /// Whether both guards still hold their poison.
    fn guards_intact(&self) -> bool {
        let (head, rest) = self.data.split_at(GUARD);
        head.iter().chain(&rest[self.len..]).all(|v| v.to_bits() == self.guard)
    }
}

/// Runs `job` on host slices and returns its output as a CPU storage (see [`run_host`]).
pub(crate) fn run(job: Job<&[f32]>) -> Result<CpuStorage> {
    run_host(job).map(CpuStorage::F32)
}

/// Runs `job` on host slices and returns its output. Every buffer sits between guards, and
/// outputs and scratch start as poison, not zeros: after each launch, a write outside a buffer
/// or into an input is an error, and a read outside a buffer, or of an element no launch wrote,
/// turns results into NaN.
fn run_host(job: Job<&[f32]>) -> Result<Vec<f32>> {
    let op = job.op;
    if job.dtype != DType::F32 {
        return Err(op_error(op, "the CUDA emulator runs f32 only"));
    }
    let out = job.output()?;
    let mut bufs: Vec<Guarded> = job
        .slots
        .iter()
        .enumerate()
        .map(|(i, s)| match s {
            Slot::In(x) => Guarded::new(i, x.iter().copied()),
            Slot::Out(n) | Slot::Scratch(n) => Guarded::new(i, std::iter::repeat_n(f32::from_bits(POISON), *n)),
        })
        .collect();
    for launch in &job.launches {
        let name = format!("{}_f32", launch.name);
        // Taken afresh for each launch, after the previous checks read the buffers.
        let bases: Vec<(*mut f32, usize)> = bufs.iter_mut().map(|b| (b.ptr(), b.len)).collect();
        let mut values = launch
            .args
            .iter()
            .map(|a| match *a {
                Arg::Buf(i, offset) => match bases.get(i) {
                    Some(&(ptr, len)) if offset <= len => Ok(Value::Ptr(ptr.wrapping_add(offset))),
                    _ => Err(op_error(op, format!("{name}: bad buffer argument {i} + {offset}"))),
                },
                Arg::Null => Ok(Value::Ptr(std::ptr::null_mut())),
                Arg::U32(v) => Ok(Value::U32(v)),
                Arg::F32(v) => Ok(Value::F32(v)),
            })
            .collect::<Result<Vec<Value>>>()?;
        let mut pointers: Vec<*mut c_void> = values
            .iter_mut()
            .map(|v| match v {
                Value::Ptr(p) => std::ptr::from_mut(p).cast(),
                Value::U32(u) => std::ptr::from_mut(u).cast(),
                Value::F32(f) => std::ptr::from_mut(f).cast(),
            })
            .collect();
        let c_name = CString::new(name.clone()).map_err(|_| op_error(op, "kernel name with a NUL byte"))?;
        let (schedule, seed) = SCHEDULE.with(Cell::get).code();
        // SAFETY: `pointers` holds one pointer per kernel parameter, to values of the parameter's
        // type, alive for the call; buffers are as long as the job's sizes say.
        let rc = unsafe {
            diffalign_emu_launch(
                c_name.as_ptr(),
                launch.blocks,
                BLOCK,
                pointers.as_mut_ptr(),
                schedule,
                seed,
            )
        };
        match rc {
            0 => {}
            1 => {
                return Err(op_error(
                    op,
                    format!("the emulator has no kernel {name} (kernels/cuda/{}.cu)", launch.module),
                ))
            }
            2 => {
                return Err(op_error(
                    op,
                    format!("{name}: the emulator could not set up its fibers"),
                ))
            }
            _ => {
                return Err(op_error(
                    op,
                    format!("{name}: the emulator refused the launch (code {rc})"),
                ))
            }
        }
        super::count_launch();
        check_buffers(op, &name, &job.slots, &bufs)?;
    }
    Ok(bufs[out].body().to_vec())
}

/// After a launch of `name` (for `op`): an error when it wrote past the ends of a buffer or into an input.
fn check_buffers(op: &str, name: &str, slots: &[Slot<&[f32]>], bufs: &[Guarded]) -> Result<()> {
    for (i, (slot, buf)) in slots.iter().zip(bufs).enumerate() {
        if !buf.guards_intact() {
            return Err(op_error(
                op,
                format!("{name} wrote outside buffer {i} ({} floats)", buf.len),
            ));
        }
        if let Slot::In(x) = slot {
            if buf.body().iter().zip(x.iter()).any(|(a, b)| a.to_bits() != b.to_bits()) {
                return Err(op_error(op, format!("{name} wrote into its input buffer {i}")));
            }
        }
    }
    Ok(())
}
