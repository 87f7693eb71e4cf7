//! A coarse estimate of the memory one generation needs, checked against the machine's available
//! memory before the first large allocation, so that a size typed by mistake (`--width 100000`,
//! a `sample_size` of 1000000 in a config) fails in a moment with an error instead of being
//! killed by the kernel minutes later.
//!
//! The estimate is meant to err on the high side for large sizes: it counts the attention score
//! matrices as the kernels hold them (the fused CPU kernel one `[Lq, Lk]` slice per thread, the
//! composed ops scores and probabilities for every slice at once), the UNet's skip activations,
//! a generous multiple of the widest activation for the temporaries, and the VAE decoder at full
//! resolution. Only host memory is checked (`MemAvailable` of `/proc/meminfo`); on a GPU the
//! host-side buffers are checked and the device's own memory is left to the device.

use candle_core::{DType, Device};

use crate::models::unet::UNet2DConditionConfig;
use crate::models::vae::AutoencoderKLConfig;

/// Bytes in a gigabyte, as the messages count them.
const GB: f64 = 1e9;

/// Live activations of one resolution level counted on top of the skip connections: the input,
/// a norm, a convolution, the residual sum, and the transformer's feed-forward (GEGLU: 8x the
/// channels) with its inputs.
const TEMPORARIES_PER_LEVEL: f64 = 16.0;

/// Live full-resolution tensors of the VAE decoder's last levels (input, norm, activation,
/// convolution, residual), each of the widest full-resolution channel count.
const VAE_TEMPORARIES: f64 = 6.0;

/// One part of a job's memory, for messages: what it is and its size in bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct Part {
    /// What holds the memory: "the UNet's self-attention at level 0".
    pub what: String,
    /// Bytes.
    pub bytes: f64,
}

/// The estimated peak memory of a generation.
#[derive(Debug, Clone, PartialEq)]
pub struct MemoryEstimate {
    /// Peak bytes on the compute device (the host, for a CPU device).
    pub device: f64,
    /// Bytes on the host beyond the device's (initial noise, decoded images) even on a GPU.
    pub host: f64,
    /// The part that dominates the peak.
    pub largest: Part,
}

impl MemoryEstimate {
    /// The bytes `device` takes from host memory: everything on a CPU, the host buffers on a GPU.
    pub fn host_bytes(&self, device: &Device) -> f64 {
        if device.is_cpu() {
            self.device + self.host
        } else {
            self.host
        }
    }
}

/// What a generation is: images per call, guidance (which doubles the UNet's batch), latent
/// size, the compute dtype and the device.
#[derive(Debug, Clone, Copy)]
pub struct Job<'a> {
    /// Images per call.
    pub batch: usize,
    /// Whether classifier-free guidance runs (the UNet then sees `2 * batch` rows).
    pub guided: bool,
    /// Latent `(h, w)`.
    pub latent: (usize, usize),
    /// The UNet's compute dtype.
    pub dtype: DType,
    /// Where the models run.
    pub device: &'a Device,
    /// How many times the activations of one UNet call are kept at once: 1 for sampling, the
    /// number of differentiated steps (times about 3 for the backward) for ReNO.
    pub retained_calls: usize,
}

fn dtype_bytes(dtype: DType) -> f64 {
    dtype.size_in_bytes() as f64
}

/// Bytes of the score matrices one attention call holds: `slices` `[lq, lk]` matrices in f32.
/// The fused CPU kernel (f32 and f64) runs one slice per thread; the composed ops keep scores and
/// probabilities of every slice.
fn attention_bytes(slices: usize, tokens: usize, dtype: DType, device: &Device) -> f64 {
    let per_slice = tokens as f64 * tokens as f64 * 4.0;
    let fused_cpu = device.is_cpu() && matches!(dtype, DType::F32 | DType::F64);
    if fused_cpu {
        slices.min(rayon::current_num_threads().max(1)) as f64 * per_slice
    } else {
        2.0 * slices as f64 * per_slice
    }
}

/// Heads of the UNet's attention at each down level (diffusers' quirk: `attention_head_dim` is
/// the number of heads when `num_attention_heads` is null); 8 where a config lists too few.
fn unet_heads(cfg: &UNet2DConditionConfig, levels: usize) -> Vec<usize> {
    use crate::models::config::PerBlock;
    let per_block = cfg.num_attention_heads.as_ref().unwrap_or(&cfg.attention_head_dim);
    (0..levels)
        .map(|i| match per_block {
            PerBlock::One(h) => *h,
            PerBlock::Many(hs) => hs.get(i).copied().unwrap_or(8),
        })
        .collect()
}

/// The estimated peak memory of generating `job` with a UNet of config `unet` and a VAE of config
/// `vae`: the larger of the UNet's peak (attention scores of its largest attention level, skip
/// activations and temporaries) and the VAE decoder's (its mid-block attention over every latent
/// and its full-resolution activations), plus the noise and the decoded images on the host.
pub fn estimate(job: &Job, unet: &UNet2DConditionConfig, vae: &AutoencoderKLConfig) -> MemoryEstimate {
    let (lh, lw) = job.latent;
    let elem = dtype_bytes(job.dtype).max(4.0);
    let mut parts = vec![unet_peak(job, unet)];
    let factor = vae.downscale_factor();
    let (h, w) = (lh * factor, lw * factor);
    let latent_tokens = lh * lw;
    let vae_elem = if vae.force_upcast { 4.0 } else { elem };
    let vae_attention = if vae.mid_block_add_attention {
        attention_bytes(job.batch, latent_tokens, DType::F32, job.device)
    } else {
        0.0
    };
    // The decoder's widest full-resolution input is its last level's, upsampled from the level
    // before (block_out_channels reversed: [512, 512, 256, 128] ends with 256 -> 128).
    let full_res_channels = vae.block_out_channels.iter().take(2).copied().max().unwrap_or(128);
    let vae_activations =
        job.batch as f64 * h as f64 * w as f64 * full_res_channels as f64 * vae_elem * VAE_TEMPORARIES;
    let vae_peak = vae_attention + vae_activations;
    parts.push(Part {
        what: if vae_attention >= vae_activations {
            format!("the VAE decoder's attention over {latent_tokens} latent tokens")
        } else {
            format!("the VAE decoder's activations at {w}x{h} pixels")
        },
        bytes: vae_peak,
    });
    let largest = parts
        .into_iter()
        .max_by(|a, b| a.bytes.total_cmp(&b.bytes))
        .expect("two parts");
    // Noise and latents, and the decoded images as f32 `[B, 3, H, W]`, permuted, and as bytes.
    let channels = unet.in_channels as f64;
    let host = job.batch as f64 * (4.0 * channels * latent_tokens as f64 * 4.0 + 3.0 * (h * w) as f64 * 9.0);
    MemoryEstimate {
        device: largest.bytes,
        host,
        largest,
    }
}

/// The UNet's peak over `job`'s calls: the attention scores of its largest attention level, its
/// skip activations and temporaries, times the calls retained; named after the larger of the
/// attention and the rest.
pub fn unet_peak(job: &Job, unet: &UNet2DConditionConfig) -> Part {
    let (lh, lw) = job.latent;
    let rows = job.batch * if job.guided { 2 } else { 1 };
    let elem = dtype_bytes(job.dtype).max(4.0);
    let heads = unet_heads(unet, unet.block_out_channels.len());
    let mut skips = 0.0;
    let mut widest = 0.0f64;
    let mut attention = Part {
        what: String::new(),
        bytes: 0.0,
    };
    for (i, &channels) in unet.block_out_channels.iter().enumerate() {
        // Each down level halves the latent (rounding up, as the strided convolutions do).
        let tokens = lh.div_ceil(1 << i) * lw.div_ceil(1 << i);
        let activation = rows as f64 * channels as f64 * tokens as f64 * elem;
        skips += activation * (unet_layers(unet, i) + 1) as f64;
        widest = widest.max(activation);
        if has_attention(unet, i) {
            let bytes = attention_bytes(rows * heads[i], tokens, job.dtype, job.device);
            if bytes > attention.bytes {
                attention = Part {
                    what: format!("the UNet's self-attention over {tokens} tokens at level {i}"),
                    bytes,
                };
            }
        }
    }
    let retained = job.retained_calls.max(1) as f64;
    let bytes = retained * (attention.bytes + skips + TEMPORARIES_PER_LEVEL * widest);
    let activations = bytes - retained * attention.bytes;
    Part {
        what: if attention.bytes >= activations {
            attention.what
        } else {
            "the UNet's activations".into()
        },
        bytes,
    }
}

fn has_attention(cfg: &UNet2DConditionConfig, level: usize) -> bool {
    cfg.down_block_types.get(level).is_some_and(|t| t.contains("Attn"))
}

/// Parameters of a UNet, counted from its config without building it: at each level the ResNet
/// layers' two 3x3 convolutions (18 c^2) and, at attention levels, the transformer's projections
/// and GEGLU feed-forward (about 16 c^2 per layer), on the down and the up path. A slight
/// underestimate (norms, biases, the time embedding and the mid block are left out), enough to
/// refuse a config of 10^9 channels before its weights are allocated.
pub fn unet_parameters(cfg: &UNet2DConditionConfig) -> f64 {
    let per_path: f64 = cfg
        .block_out_channels
        .iter()
        .enumerate()
        .map(|(i, &c)| {
            let c2 = c as f64 * c as f64;
            let attention = if has_attention(cfg, i) { 16.0 * c2 } else { 0.0 };
            unet_layers(cfg, i) as f64 * (18.0 * c2 + attention)
        })
        .sum();
    2.0 * per_path
}

/// How many f32 copies of the policy's parameters a full fine-tune keeps besides the optimizer's
/// state: the master weights and their gradients.
const TRAINED_COPIES: f64 = 2.0;

/// How many times a forward's activations a forward + backward holds at its peak: the
/// activations kept for the backward, their gradients and the backward's temporaries.
pub const BACKWARD_FACTOR: usize = 3;

/// What a preference-training step is, for [`estimate_training`].
#[derive(Debug, Clone, Copy)]
pub struct TrainingJob<'a> {
    /// Pairs per step (`train.batch_size`); the UNet sees both images of each.
    pub pairs: usize,
    /// Latent `(h, w)` of the training resolution.
    pub latent: (usize, usize),
    /// The UNet's compute dtype.
    pub dtype: DType,
    /// Where the models run.
    pub device: &'a Device,
    /// Whether a frozen reference UNet runs beside the policy (DPO and its kin).
    pub reference: bool,
    /// Whether every UNet weight trains (else a LoRA, whose state is small).
    pub full_fine_tune: bool,
    /// Bytes of optimizer state per trained parameter (8 for AdamW's f32 moments).
    pub optimizer_state: f64,
}

/// The estimated peak memory of one training step: the policy UNet's forward on both images of
/// every pair with its activations kept for the backward ([`BACKWARD_FACTOR`] forwards' worth),
/// the reference's forward beside them, the VAE at the training resolution, and the weights of
/// the policy (with master weights, gradients and optimizer state for a full fine-tune) and of
/// the reference (a UNet of its own for a full fine-tune; a LoRA's reference is its policy with
/// the adapters off).
pub fn estimate_training(job: &TrainingJob, unet: &UNet2DConditionConfig, vae: &AutoencoderKLConfig) -> MemoryEstimate {
    let calls = Job {
        batch: 2 * job.pairs,
        guided: false,
        latent: job.latent,
        dtype: job.dtype,
        device: job.device,
        retained_calls: BACKWARD_FACTOR + usize::from(job.reference),
    };
    let elem = dtype_bytes(job.dtype);
    let params = unet_parameters(unet);
    let copies = if job.full_fine_tune {
        elem + TRAINED_COPIES * 4.0 + job.optimizer_state
    } else {
        elem
    };
    let reference = if job.reference && job.full_fine_tune {
        params * elem
    } else {
        0.0
    };
    let weights = Part {
        what: "the UNets' weights (with gradients and optimiser state)".into(),
        bytes: params * copies + reference,
    };
    with_weights(estimate(&calls, unet, vae), weights)
}

/// The peak of `calls` of a UNet alone (no VAE, nothing on the host) beside `weights`.
pub fn estimate_unet(calls: &Job, unet: &UNet2DConditionConfig, weights: Part) -> MemoryEstimate {
    let activations = unet_peak(calls, unet);
    let alone = MemoryEstimate {
        device: activations.bytes,
        host: 0.0,
        largest: activations,
    };
    with_weights(alone, weights)
}

/// `e` with `weights` resident beside its peak; the weights name the estimate when they are its
/// larger part.
pub fn with_weights(mut e: MemoryEstimate, weights: Part) -> MemoryEstimate {
    e.device += weights.bytes;
    if weights.bytes > e.largest.bytes {
        e.largest = weights;
    }
    e
}

fn unet_layers(cfg: &UNet2DConditionConfig, level: usize) -> usize {
    use crate::models::config::PerBlock;
    match &cfg.layers_per_block {
        PerBlock::One(n) => *n,
        PerBlock::Many(ns) => ns.get(level).copied().unwrap_or(2),
    }
}

/// The memory the kernel says is available to a new allocation without swapping
/// (`MemAvailable` in `/proc/meminfo`), in bytes; `None` where that file does not exist.
pub fn available_memory() -> Option<f64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    parse_mem_available(&text)
}

/// `MemAvailable` of a `/proc/meminfo` text, in bytes.
pub fn parse_mem_available(meminfo: &str) -> Option<f64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let mut fields = line.split_whitespace().skip(1);
    let value: f64 = fields.next()?.parse().ok()?;
    let scale = match fields.next() {
        Some("kB") => 1024.0,
        None => 1.0,
        Some(_) => return None,
    };
    Some(value * scale)
}

/// `bytes` as gigabytes for messages: `38 GB`, `0.4 GB`, `3e+06 GB`.
pub fn gigabytes(bytes: f64) -> String {
    let gb = bytes / GB;
    if gb >= 1e6 {
        format!("{gb:.0e} GB")
    } else if gb >= 10.0 {
        format!("{gb:.0} GB")
    } else {
        format!("{gb:.1} GB")
    }
}

/// Why `estimate` does not fit in `available` bytes of host memory, or `None` when it fits:
/// "the VAE decoder's attention over 100000 latent tokens would need about 80 GB; 21 GB are
/// available".
pub fn shortfall(estimate: &MemoryEstimate, device: &Device, available: f64) -> Option<String> {
    let need = estimate.host_bytes(device);
    let what = if device.is_cpu() {
        estimate.largest.what.as_str()
    } else {
        "the initial noise and the decoded images on the host"
    };
    (need > available).then(|| {
        format!(
            "{what} would need about {}; {} are available",
            gigabytes(need),
            gigabytes(available)
        )
    })
}
