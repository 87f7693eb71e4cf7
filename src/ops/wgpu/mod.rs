//! The wgpu backend of the hot-op kernels: the WGSL compute shaders of `kernels/wgsl/` run on any
//! Vulkan, Metal or DX12 adapter. Tensors stay in candle's CPU storage; each op uploads its
//! inputs, dispatches one or more passes and reads its outputs back (f32 only).
//!
//! One [`Context`] per process, made on first use: the adapter, device and queue, the compiled
//! pipelines (by shader, entry point, override constants and bindings) and a pool of buffers
//! reused across calls. GPU work is serialised through one lock: the queue runs one job at a
//! time anyway, and it keeps error scopes (which are per device) paired with their job.
//!
//! Binding convention of every shader: `@binding(0)` is a uniform block of up to
//! [`PARAM_WORDS`] 32-bit words; the other bindings are storage buffers, as each job lists them.

pub(crate) mod attention;
pub(crate) mod conv2d;
pub(crate) mod mse;
mod pool;
pub(crate) mod row_norm;
pub(crate) mod softmax;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

use self::pool::{Pool, Usage};
use crate::{Error, Result};

/// Words in the uniform parameter block (64 bytes).
pub(crate) const PARAM_WORDS: usize = 16;

/// Threads per workgroup of every kernel (`WG` in `common.wgsl`).
pub(crate) const WORKGROUP: u32 = 256;

/// Workgroups per dimension of one dispatch (the WebGPU minimum of `maxComputeWorkgroupsPerDimension`).
const MAX_GROUPS_PER_DIM: u32 = 65535;

/// One WGSL source (a kernel family) with the shared helpers of `common.wgsl` in front.
pub(crate) struct Shader {
    /// The file stem in `kernels/wgsl/`, used as label and cache key.
    pub name: &'static str,
    /// The full WGSL text.
    pub source: &'static str,
}

impl Shader {
    /// A dispatch of `entry` over `groups` workgroups, without override constants.
    pub(crate) fn pass(&'static self, entry: &'static str, groups: u32) -> Pass<'static> {
        Pass {
            shader: self,
            entry,
            constants: &[],
            groups,
        }
    }
}

/// Declares a [`Shader`] from `kernels/wgsl/<name>.wgsl`, prefixed with `common.wgsl`.
macro_rules! shader {
    ($name:literal) => {
        $crate::ops::wgpu::Shader {
            name: $name,
            source: concat!(
                include_str!("../../../kernels/wgsl/common.wgsl"),
                include_str!(concat!("../../../kernels/wgsl/", $name, ".wgsl"))
            ),
        }
    };
}
pub(crate) use shader;

/// One dispatch: an entry point of a shader, its override constants, and how many workgroups
/// (a linear count, split over x and y when above the per-dimension limit; the shaders read
/// their index back with `group_index`).
pub(crate) struct Pass<'a> {
    pub shader: &'a Shader,
    pub entry: &'static str,
    pub constants: &'a [(&'static str, f64)],
    pub groups: u32,
}

/// A storage buffer of a job: uploaded input, output read back, or scratch kept on the device.
enum Slot<'a> {
    In(&'a [f32]),
    Out(usize),
    Scratch(usize),
}

/// One op call: parameters, storage buffers by binding number (inputs, the one output, scratch),
/// and passes run in order (each sees the writes of the previous ones).
pub(crate) struct Job<'a> {
    /// The op's name, for errors.
    pub op: &'static str,
    pub params: &'a [u32],
    /// Uploaded inputs: binding, values.
    pub inputs: &'a [(u32, &'a [f32])],
    /// The output read back: binding, elements.
    pub output: (u32, usize),
    /// Buffers kept on the device between passes: binding, elements.
    pub scratch: &'a [(u32, usize)],
    pub passes: &'a [Pass<'a>],
}

impl<'a> Job<'a> {
    /// Every storage buffer, by binding number.
    fn slots(&self) -> Vec<(u32, Slot<'a>)> {
        let mut slots: Vec<_> = self.inputs.iter().map(|&(b, data)| (b, Slot::In(data))).collect();
        slots.push((self.output.0, Slot::Out(self.output.1)));
        slots.extend(self.scratch.iter().map(|&(b, n)| (b, Slot::Scratch(n))));
        slots.sort_by_key(|&(b, _)| b);
        slots
    }
}

/// Parameter words: integers as they are, floats by their bits.
pub(crate) fn f32_word(v: f64) -> u32 {
    (v as f32).to_bits()
}

/// A `u32` parameter, or an error naming `op` when the size does not fit 32 bits.
pub(crate) fn word(op: &'static str, what: &str, v: usize) -> Result<u32> {
    u32::try_from(v).map_err(|_| {
        op_error(
            op,
            format!("{what} = {v} does not fit the 32-bit indices of the kernel"),
        )
    })
}

/// Workgroups for `n` items at `per_group` items per workgroup.
pub(crate) fn groups_for(op: &'static str, n: usize, per_group: usize) -> Result<u32> {
    word(op, "workgroups", n.div_ceil(per_group.max(1)))
}

/// An [`Error::Op`] on the wgpu device.
pub(crate) fn op_error(op: &str, reason: impl Into<String>) -> Error {
    Error::Op {
        op: op.into(),
        device: "wgpu".into(),
        reason: reason.into(),
    }
}

/// Runs `job`, returning the contents of its output buffer.
pub(crate) fn run(job: &Job) -> Result<Vec<f32>> {
    let ctx = context()?;
    let mut state = ctx
        .state
        .lock()
        .map_err(|_| op_error(job.op, "the wgpu context lock is poisoned"))?;
    let mut outs = state.run(ctx, job)?;
    Ok(outs.swap_remove(0))
}

/// Runs `job` and returns its output as a candle storage, the result of an op's `cpu_fwd`.
pub(crate) fn run_one(job: &Job) -> Result<candle_core::CpuStorage> {
    run(job).map(candle_core::CpuStorage::F32)
}

/// The name and backend of the adapter, creating the context if needed: fails when there is
/// none.
pub fn adapter_info() -> Result<String> {
    let ctx = context()?;
    Ok(format!("{} ({:?})", ctx.adapter.name, ctx.adapter.backend))
}

/// Time spent moving data, summed over every job of the process so far.
#[derive(Debug, Clone, Copy, Default)]
pub struct TransferTotals {
    /// Seconds writing inputs into device buffers, until the device has them.
    pub upload_s: f64,
    /// Seconds copying outputs into mappable buffers and reading them back.
    pub download_s: f64,
    /// Bytes uploaded.
    pub upload_bytes: u64,
    /// Bytes read back.
    pub download_bytes: u64,
}

static UPLOAD_NS: AtomicU64 = AtomicU64::new(0);
static DOWNLOAD_NS: AtomicU64 = AtomicU64::new(0);
static UPLOAD_BYTES: AtomicU64 = AtomicU64::new(0);
static DOWNLOAD_BYTES: AtomicU64 = AtomicU64::new(0);

/// The transfer totals so far (for benchmarks: take the difference around a measurement).
pub fn transfer_totals() -> TransferTotals {
    TransferTotals {
        upload_s: UPLOAD_NS.load(Ordering::Relaxed) as f64 * 1e-9,
        download_s: DOWNLOAD_NS.load(Ordering::Relaxed) as f64 * 1e-9,
        upload_bytes: UPLOAD_BYTES.load(Ordering::Relaxed),
        download_bytes: DOWNLOAD_BYTES.load(Ordering::Relaxed),
    }
}

/// Adds the time since `start` to `ns`.
fn record(ns: &AtomicU64, bytes: &AtomicU64, start: Instant, n: u64) {
    ns.fetch_add(start.elapsed().as_nanos() as u64, Ordering::Relaxed);
    bytes.fetch_add(n, Ordering::Relaxed);
}

/// The process-wide wgpu state.
pub(crate) struct Context {
    device: wgpu::Device,
    queue: wgpu::Queue,
    adapter: wgpu::AdapterInfo,
    limits: wgpu::Limits,
    state: Mutex<State>,
}

/// Caches and the buffer pool, behind the context's lock.
#[derive(Default)]
struct State {
    modules: HashMap<&'static str, wgpu::ShaderModule>,
    layouts: HashMap<Vec<(u32, bool)>, (wgpu::BindGroupLayout, wgpu::PipelineLayout)>,
    pipelines: HashMap<PipelineKey, wgpu::ComputePipeline>,
    pool: Pool,
}

/// Shader, entry point, override constants (by bits) and binding signature.
type PipelineKey = (&'static str, &'static str, Vec<(&'static str, u64)>, Vec<(u32, bool)>);

static CONTEXT: OnceLock<std::result::Result<Context, String>> = OnceLock::new();

/// The context, created on first use; an error naming the problem when no adapter or device can
/// be had (the same error on every later call).
pub(crate) fn context() -> Result<&'static Context> {
    CONTEXT
        .get_or_init(Context::new)
        .as_ref()
        .map_err(|reason| op_error("kernels", reason.clone()))
}

impl Context {
    fn new() -> std::result::Result<Self, String> {
        let instance = wgpu::Instance::new(&wgpu::InstanceDescriptor::default());
        let adapter = pollster::block_on(instance.request_adapter(&wgpu::RequestAdapterOptions {
            power_preference: wgpu::PowerPreference::HighPerformance,
            ..Default::default()
        }))
        .map_err(|e| {
            format!(
                "no wgpu adapter found ({e}); install a Vulkan driver (on Linux without a GPU: \
                 mesa-vulkan-drivers and libvulkan1 for the lavapipe software device)"
            )
        })?;
        // Everything the adapter allows: large activations exceed the default 128 MiB bindings.
        let limits = adapter.limits();
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("diffalign-ops"),
            required_limits: limits.clone(),
            ..Default::default()
        }))
        .map_err(|e| format!("adapter {:?}: cannot create a device: {e}", adapter.get_info().name))?;
        // Validation errors are caught by error scopes around each job; anything that escapes
        // them is reported instead of aborting the process.
        device.on_uncaptured_error(std::sync::Arc::new(|e| eprintln!("wgpu: uncaptured error: {e}")));
        Ok(Context {
            device,
            queue,
            adapter: adapter.get_info(),
            limits,
            state: Mutex::new(State::default()),
        })
    }

    /// Fails with an error naming `op` when `bytes` exceed what one binding may hold.
    fn check_size(&self, op: &'static str, bytes: u64) -> Result<()> {
        let max = u64::from(self.limits.max_storage_buffer_binding_size).min(self.limits.max_buffer_size);
        if bytes > max {
            return Err(op_error(
                op,
                format!("a buffer of {bytes} bytes exceeds the adapter's limit of {max} bytes per binding"),
            ));
        }
        Ok(())
    }
}

impl State {
    fn buffer(&mut self, ctx: &Context, usage: Usage, bytes: u64) -> wgpu::Buffer {
        self.pool.take(&ctx.device, usage, bytes)
    }

    fn give_back(&mut self, usage: Usage, buffer: wgpu::Buffer) {
        self.pool.give_back(usage, buffer);
    }

    fn layout(&mut self, ctx: &Context, sig: &[(u32, bool)]) -> &(wgpu::BindGroupLayout, wgpu::PipelineLayout) {
        self.layouts.entry(sig.to_vec()).or_insert_with(|| {
            let buffer = |binding, ty| wgpu::BindGroupLayoutEntry {
                binding,
                visibility: wgpu::ShaderStages::COMPUTE,
                ty: wgpu::BindingType::Buffer {
                    ty,
                    has_dynamic_offset: false,
                    min_binding_size: None,
                },
                count: None,
            };
            let mut entries = vec![buffer(0, wgpu::BufferBindingType::Uniform)];
            entries.extend(
                sig.iter()
                    .map(|&(b, read_only)| buffer(b, wgpu::BufferBindingType::Storage { read_only })),
            );
            let bgl = ctx.device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
                label: None,
                entries: &entries,
            });
            let pl = ctx.device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
                label: None,
                bind_group_layouts: &[&bgl],
                push_constant_ranges: &[],
            });
            (bgl, pl)
        })
    }

    fn pipeline(&mut self, ctx: &Context, pass: &Pass, sig: &[(u32, bool)]) -> wgpu::ComputePipeline {
        let consts = pass.constants.iter().map(|&(k, v)| (k, v.to_bits())).collect();
        let key = (pass.shader.name, pass.entry, consts, sig.to_vec());
        if let Some(p) = self.pipelines.get(&key) {
            return p.clone();
        }
        let module = self
            .modules
            .entry(pass.shader.name)
            .or_insert_with(|| {
                ctx.device.create_shader_module(wgpu::ShaderModuleDescriptor {
                    label: Some(pass.shader.name),
                    source: wgpu::ShaderSource::Wgsl(pass.shader.source.into()),
                })
            })
            .clone();
        let layout = self.layout(ctx, sig).1.clone();
        let pipeline = ctx.device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some(pass.entry),
            layout: Some(&layout),
            module: &module,
            entry_point: Some(pass.entry),
            compilation_options: wgpu::PipelineCompilationOptions {
                constants: pass.constants,
                zero_initialize_workgroup_memory: false,
            },
            cache: None,
        });
        self.pipelines.insert(key, pipeline.clone());
        pipeline
    }

    fn run(&mut self, ctx: &'static Context, job: &Job) -> Result<Vec<Vec<f32>>> {
        if job.params.len() > PARAM_WORDS {
            return Err(op_error(
                job.op,
                format!("{} parameter words, at most {PARAM_WORDS}", job.params.len()),
            ));
        }
        ctx.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let result = self.run_scoped(ctx, job);
        let scope = pollster::block_on(ctx.device.pop_error_scope());
        match (result, scope) {
            (Err(e), _) => Err(e),
            (Ok(_), Some(e)) => Err(op_error(job.op, format!("wgpu validation: {e}"))),
            (Ok(out), None) => Ok(out),
        }
    }

    fn run_scoped(&mut self, ctx: &'static Context, job: &Job) -> Result<Vec<Vec<f32>>> {
        let slots = job.slots();
        let sig: Vec<(u32, bool)> = slots.iter().map(|(b, s)| (*b, matches!(s, Slot::In(_)))).collect();
        let pipelines: Vec<_> = job.passes.iter().map(|p| self.pipeline(ctx, p, &sig)).collect();

        // Upload: the parameters and every input, until the device has them.
        let start = Instant::now();
        let mut words = [0u32; PARAM_WORDS];
        words[..job.params.len()].copy_from_slice(job.params);
        let uniform = self.buffer(ctx, Usage::Uniform, (PARAM_WORDS * 4) as u64);
        ctx.queue.write_buffer(&uniform, 0, bytemuck::cast_slice(&words));
        let mut buffers = Vec::with_capacity(slots.len());
        let mut uploaded = 0u64;
        for (_, slot) in &slots {
            let len = match slot {
                Slot::In(data) => data.len(),
                Slot::Out(n) | Slot::Scratch(n) => *n,
            };
            let bytes = (len as u64 * 4).max(4);
            // On errors the buffers taken so far are dropped rather than pooled.
            ctx.check_size(job.op, bytes)?;
            let buffer = self.buffer(ctx, Usage::Storage, bytes);
            if let Slot::In(data) = slot {
                ctx.queue.write_buffer(&buffer, 0, bytemuck::cast_slice(data));
                uploaded += bytes;
            }
            buffers.push((buffer, bytes));
        }
        ctx.queue.submit([]);
        wait(ctx, job.op)?;
        record(&UPLOAD_NS, &UPLOAD_BYTES, start, uploaded);

        // Compute.
        let bgl = self.layout(ctx, &sig).0.clone();
        let mut entries = vec![wgpu::BindGroupEntry {
            binding: 0,
            resource: uniform.as_entire_binding(),
        }];
        for ((binding, _), (buffer, bytes)) in slots.iter().zip(&buffers) {
            entries.push(wgpu::BindGroupEntry {
                binding: *binding,
                resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                    buffer,
                    offset: 0,
                    size: wgpu::BufferSize::new(*bytes),
                }),
            });
        }
        let bind_group = ctx.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some(job.op),
            layout: &bgl,
            entries: &entries,
        });
        let mut encoder = ctx.device.create_command_encoder(&Default::default());
        {
            let mut cpass = encoder.begin_compute_pass(&Default::default());
            cpass.set_bind_group(0, &bind_group, &[]);
            for (pass, pipeline) in job.passes.iter().zip(&pipelines) {
                if pass.groups == 0 {
                    continue;
                }
                let x = pass.groups.min(MAX_GROUPS_PER_DIM);
                let y = pass.groups.div_ceil(x);
                if y > MAX_GROUPS_PER_DIM {
                    return Err(op_error(
                        job.op,
                        format!("{} workgroups exceed one dispatch", pass.groups),
                    ));
                }
                cpass.set_pipeline(pipeline);
                cpass.dispatch_workgroups(x, y, 1);
            }
        }
        ctx.queue.submit([encoder.finish()]);
        wait(ctx, job.op)?;

        // Download: copy outputs into mappable buffers, map and read them.
        let start = Instant::now();
        let mut encoder = ctx.device.create_command_encoder(&Default::default());
        let mut staging = Vec::new();
        for ((_, slot), (buffer, bytes)) in slots.iter().zip(&buffers) {
            if let Slot::Out(n) = slot {
                let rb = self.buffer(ctx, Usage::Readback, *bytes);
                encoder.copy_buffer_to_buffer(buffer, 0, &rb, 0, *bytes);
                staging.push((rb, *n));
            }
        }
        ctx.queue.submit([encoder.finish()]);
        let (tx, rx) = std::sync::mpsc::channel();
        for (rb, n) in &staging {
            let tx = tx.clone();
            rb.slice(..(*n as u64 * 4).max(4))
                .map_async(wgpu::MapMode::Read, move |r| tx.send(r).unwrap_or(()));
        }
        wait(ctx, job.op)?;
        for _ in &staging {
            match rx.try_recv() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(op_error(job.op, format!("reading the output back: {e}"))),
                Err(_) => {
                    return Err(op_error(
                        job.op,
                        "reading the output back: the mapping did not complete",
                    ))
                }
            }
        }
        let mut outs = Vec::with_capacity(staging.len());
        let mut downloaded = 0u64;
        for (rb, n) in staging {
            {
                let view = rb.slice(..(n as u64 * 4).max(4)).get_mapped_range();
                outs.push(bytemuck::cast_slice::<u8, f32>(&view)[..n].to_vec());
            }
            rb.unmap();
            downloaded += n as u64 * 4;
            self.give_back(Usage::Readback, rb);
        }
        record(&DOWNLOAD_NS, &DOWNLOAD_BYTES, start, downloaded);

        self.give_back(Usage::Uniform, uniform);
        for (b, _) in buffers {
            self.give_back(Usage::Storage, b);
        }
        Ok(outs)
    }
}

/// Blocks until the device has finished the submitted work.
fn wait(ctx: &Context, op: &'static str) -> Result<()> {
    ctx.device
        .poll(wgpu::PollType::wait_indefinitely())
        .map(|_| ())
        .map_err(|e| op_error(op, format!("waiting for the device: {e:?}")))
}
