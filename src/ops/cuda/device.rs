//! Runs [`Job`]s on candle's CUDA device: the PTX of `kernels/cuda/` (compiled by `build.rs`) is
//! loaded once per device and module, buffers come from the device's stream, and the launches
//! are queued on that stream like candle's own kernels.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, DevicePtr, DeviceRepr, LaunchConfig, PushKernelArg, ValidAsZeroBits,
};
use candle_core::cuda_backend::{CudaDType, CudaStorage, WrapErr};
use candle_core::{DType, Layout};

use super::{op_error, Arg, Job, Slot, BLOCK};
use crate::Result;

/// An input as `cuda_fwd` receives it.
pub(crate) type Input<'a> = (&'a CudaStorage, &'a Layout);

/// The PTX of one kernel file.
fn ptx(module: &str) -> Option<&'static str> {
    Some(match module {
        "attention" => include_str!(concat!(env!("OUT_DIR"), "/attention.ptx")),
        "conv2d" => include_str!(concat!(env!("OUT_DIR"), "/conv2d.ptx")),
        "mse" => include_str!(concat!(env!("OUT_DIR"), "/mse.ptx")),
        "row_norm" => include_str!(concat!(env!("OUT_DIR"), "/row_norm.ptx")),
        "softmax" => include_str!(concat!(env!("OUT_DIR"), "/softmax.ptx")),
        _ => return None,
    })
}

/// The suffix of a kernel's entry point for `dtype`, or an error naming `op`.
fn suffix(op: &str, dtype: DType) -> Result<&'static str> {
    match dtype {
        DType::F32 => Ok("f32"),
        DType::F16 => Ok("f16"),
        DType::BF16 => Ok("bf16"),
        other => Err(op_error(
            op,
            format!("the CUDA kernels take f32, f16 or bf16, not {other:?}"),
        )),
    }
}

/// Runs `job` on the device of its inputs and returns its output.
pub(crate) fn run(job: Job<Input<'_>>) -> candle_core::Result<CudaStorage> {
    match job.dtype {
        DType::F32 => run_typed::<f32>(job),
        DType::F16 => run_typed::<half::f16>(job),
        DType::BF16 => run_typed::<half::bf16>(job),
        other => Err(candle_core::Error::wrap(op_error(
            job.op,
            format!("the CUDA kernels take f32, f16 or bf16, not {other:?}"),
        ))),
    }
}

/// One argument's value, which the launch reads through a reference.
enum Value {
    Ptr(u64),
    U32(u32),
    F32(f32),
}

fn run_typed<T: CudaDType + DeviceRepr + ValidAsZeroBits>(job: Job<Input<'_>>) -> candle_core::Result<CudaStorage> {
    let op = job.op;
    let sfx = suffix(op, job.dtype).map_err(candle_core::Error::wrap)?;
    let out_slot = job.output().map_err(candle_core::Error::wrap)?;
    let Some(dev) = job.slots.iter().find_map(|s| match s {
        Slot::In((storage, _)) => Some(storage.device().clone()),
        _ => None,
    }) else {
        return Err(candle_core::Error::wrap(op_error(op, "job without inputs")));
    };
    let stream = dev.cuda_stream();
    let mut outs: Vec<Option<CudaSlice<T>>> = Vec::with_capacity(job.slots.len());
    let mut scratch: Vec<Option<CudaSlice<f32>>> = Vec::with_capacity(job.slots.len());
    for slot in &job.slots {
        let (o, s) = match slot {
            Slot::In(_) => (None, None),
            Slot::Out(n) => (Some(dev.alloc_zeros::<T>((*n).max(1))?), None),
            Slot::Scratch(n) => (None, Some(dev.alloc_zeros::<f32>((*n).max(1))?)),
        };
        outs.push(o);
        scratch.push(s);
    }
    {
        // Device addresses of every slot and their element sizes; the guards record the reads
        // and writes on the stream once the launches are queued.
        let mut guards = Vec::with_capacity(job.slots.len());
        let mut addrs: Vec<(u64, u64)> = Vec::with_capacity(job.slots.len());
        for (i, slot) in job.slots.iter().enumerate() {
            let (addr, guard, size) = match slot {
                Slot::In((storage, layout)) => {
                    let Some((start, _)) = layout.contiguous_offsets() else {
                        return Err(candle_core::Error::wrap(op_error(op, "inputs must be contiguous")));
                    };
                    let (p, g) = storage.as_cuda_slice::<T>()?.device_ptr(&stream);
                    (p + (start * size_of::<T>()) as u64, g, size_of::<T>())
                }
                Slot::Out(_) => {
                    let (p, g) = outs[i].as_ref().expect("allocated above").device_ptr(&stream);
                    (p, g, size_of::<T>())
                }
                Slot::Scratch(_) => {
                    let (p, g) = scratch[i].as_ref().expect("allocated above").device_ptr(&stream);
                    (p, g, size_of::<f32>())
                }
            };
            guards.push(guard);
            addrs.push((addr, size as u64));
        }
        for launch in &job.launches {
            let name = format!("{}_{sfx}", launch.name);
            let code = ptx(launch.module)
                .ok_or_else(|| candle_core::Error::wrap(op_error(op, format!("no kernel file {}", launch.module))))?;
            let func = dev.get_or_load_custom_func(&name, &format!("diffalign_{}", launch.module), code)?;
            let values = launch
                .args
                .iter()
                .map(|a| match *a {
                    Arg::Buf(i, offset) => Value::Ptr(addrs[i].0 + offset as u64 * addrs[i].1),
                    Arg::Null => Value::Ptr(0),
                    Arg::U32(v) => Value::U32(v),
                    Arg::F32(v) => Value::F32(v),
                })
                .collect::<Vec<_>>();
            let mut builder = func.builder();
            for v in &values {
                match v {
                    Value::Ptr(p) => builder.arg(p),
                    Value::U32(u) => builder.arg(u),
                    Value::F32(f) => builder.arg(f),
                };
            }
            let cfg = LaunchConfig {
                grid_dim: (launch.blocks, 1, 1),
                block_dim: (BLOCK, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: the arguments match the kernel's parameters in number, order and type
            // (pointers as 64-bit device addresses into buffers as long as the job says).
            unsafe { builder.launch(cfg) }.w()?;
            super::count_launch();
        }
    }
    let out = outs[out_slot].take().expect("the output slot was allocated");
    Ok(T::wrap_cuda_slice(out, dev))
}
