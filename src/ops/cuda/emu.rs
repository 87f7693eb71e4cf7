//! The CPU emulator of the CUDA kernels (the `cuda-emu` feature): the sources of `kernels/cuda/`
//! compiled as C++ against `kernels/cuda/emu/emu.h` by `build.rs`, run on host slices. It takes
//! the same [`Job`]s as [`super::device`], so tests check the kernels and their launch
//! arguments without a GPU. Slow (each block's threads are fibers on one core) and f32 only: a
//! test tool.

use std::ffi::{c_char, c_void, CString};

use candle_core::{CpuStorage, DType};

use super::{op_error, Arg, Job, Slot, BLOCK};
use crate::Result;

extern "C" {
    /// Runs kernel `name` on `blocks` blocks of `threads` threads; 0, or 1 for an unknown name.
    fn diffalign_emu_launch(name: *const c_char, blocks: u32, threads: u32, args: *mut *mut c_void) -> i32;
}

/// One argument's value, which the launcher reads through a pointer.
enum Value {
    Ptr(*mut f32),
    U32(u32),
    F32(f32),
}

/// Runs `job` on host slices and returns its output.
pub(crate) fn run(job: Job<&[f32]>) -> Result<CpuStorage> {
    let op = job.op;
    if job.dtype != DType::F32 {
        return Err(op_error(op, "the CUDA emulator runs f32 only"));
    }
    let out = job.output()?;
    let mut owned: Vec<Vec<f32>> = job
        .slots
        .iter()
        .map(|s| match s {
            Slot::In(_) => Vec::new(),
            Slot::Out(n) | Slot::Scratch(n) => vec![0.0; *n],
        })
        .collect();
    let bufs: Vec<(*mut f32, usize)> = job
        .slots
        .iter()
        .zip(owned.iter_mut())
        .map(|(s, o)| match s {
            // The kernels only read their inputs.
            Slot::In(x) => (x.as_ptr().cast_mut(), x.len()),
            _ => (o.as_mut_ptr(), o.len()),
        })
        .collect();
    for launch in &job.launches {
        let name = format!("{}_f32", launch.name);
        let mut values = launch
            .args
            .iter()
            .map(|a| match *a {
                Arg::Buf(i, offset) => match bufs.get(i) {
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
        // SAFETY: `pointers` holds one pointer per kernel parameter, to values of the parameter's
        // type, alive for the call; buffers are as long as the job's sizes say.
        let rc = unsafe { diffalign_emu_launch(c_name.as_ptr(), launch.blocks, BLOCK, pointers.as_mut_ptr()) };
        if rc != 0 {
            return Err(op_error(
                op,
                format!("the emulator has no kernel {name} (kernels/cuda/{}.cu)", launch.module),
            ));
        }
        super::count_launch();
    }
    Ok(CpuStorage::F32(std::mem::take(&mut owned[out])))
}
