//! The buffer pool of the wgpu context: buffers are taken by use and size class and handed back
//! after each job, so repeated calls of an op allocate nothing.

use std::collections::HashMap;

/// What a pooled buffer is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) enum Usage {
    Uniform,
    Storage,
    Readback,
}

impl Usage {
    fn flags(self) -> wgpu::BufferUsages {
        use wgpu::BufferUsages as U;
        match self {
            Usage::Uniform => U::UNIFORM | U::COPY_DST,
            Usage::Storage => U::STORAGE | U::COPY_DST | U::COPY_SRC,
            Usage::Readback => U::MAP_READ | U::COPY_DST,
        }
    }
}

/// Buffers kept per size class: enough for the inputs, outputs and scratch of the largest job.
const POOL_PER_CLASS: usize = 8;

/// The allocation size for `bytes`: powers of two up to 1 MiB, then whole MiB, so that buffers
/// of similar calls are shared without doubling large ones.
fn size_class(bytes: u64) -> u64 {
    const MIB: u64 = 1 << 20;
    let bytes = bytes.max(256);
    if bytes <= MIB {
        bytes.next_power_of_two()
    } else {
        bytes.div_ceil(MIB) * MIB
    }
}

/// Free buffers by use and size class.
#[derive(Default)]
pub(super) struct Pool {
    free: HashMap<(Usage, u64), Vec<wgpu::Buffer>>,
}

impl Pool {
    /// A buffer of at least `bytes` for `usage`: a pooled one of the size class, or a new one.
    pub(super) fn take(&mut self, device: &wgpu::Device, usage: Usage, bytes: u64) -> wgpu::Buffer {
        let size = size_class(bytes);
        if let Some(b) = self.free.get_mut(&(usage, size)).and_then(Vec::pop) {
            return b;
        }
        device.create_buffer(&wgpu::BufferDescriptor {
            label: None,
            size,
            usage: usage.flags(),
            mapped_at_creation: false,
        })
    }

    /// Keeps `buffer` for later calls, unless its class already holds [`POOL_PER_CLASS`].
    pub(super) fn give_back(&mut self, usage: Usage, buffer: wgpu::Buffer) {
        let list = self.free.entry((usage, buffer.size())).or_default();
        if list.len() < POOL_PER_CLASS {
            list.push(buffer);
        }
    }
}
