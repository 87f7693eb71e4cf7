//! bitsandbytes' 8-bit AdamW (Dettmers et al. 2022, "8-bit Optimizers via Block-wise
//! Quantization"; `bnb.optim.AdamW8bit`), written from bitsandbytes' CUDA kernels
//! (`kOptimizerStatic8bit2StateBlockwise`, `kOptimizer32bit2State`).
//!
//! Both moments live as one 8-bit code per element plus one f32 absmax per block of
//! [`BLOCK_SIZE`] elements: the first moment on the signed dynamic map, the second on the unsigned
//! one ([`dynamic_map`]). Each step dequantizes (`code[c] * absmax`), updates in f32, takes each
//! block's new absmax and requantizes to the nearest code. Like bitsandbytes, a parameter with
//! fewer than `min_8bit_size` (4096) elements keeps f32 moments, updated by the same formulas
//! without quantization; only the master weights are ours (bitsandbytes updates the parameter
//! itself).
//!
//! The update, as the kernels write it (f32): `m = β1 m + (1-β1) g`, `v = β2 v + (1-β2) g²`,
//! `w += -lr·√(1-β2ᵗ)/(1-β1ᵗ) · m / (√v + eps·√(1-β2ᵗ))`, then `w *= 1 - lr·wd` when `wd > 0`:
//! the decoupled decay comes after the update (torch's AdamW decays first; the two differ by
//! `lr²·wd·update`). The bias corrections are computed in f64 and rounded to f32 once (the
//! kernel's `__powf` is an approximation of the same). Requantizing keeps the first moment's
//! sign: a small negative value whose nearest code is 0 takes the smallest negative code, as the
//! kernel does. Ties between two codes go to the lower one.
//!
//! Checkpoint names: `m.<param>` and `v.<param>` (u8 codes, the parameter's shape) with
//! `m_absmax.<param>` and `v_absmax.<param>` (f32, one per block); for a small parameter,
//! `m.<param>` and `v.<param>` in f32.

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use super::{tensor_bytes, ParamState, StateReader};
use crate::Result;

/// Elements per quantization block (bitsandbytes' blockwise optimizers use 256).
pub const BLOCK_SIZE: usize = 256;

/// 8-bit AdamW hyperparameters (bitsandbytes' `AdamW8bit` defaults).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdamW8bitConfig {
    /// First-moment decay.
    #[serde(default = "super::default_beta1")]
    pub beta1: f64,
    /// Second-moment decay.
    #[serde(default = "super::default_beta2")]
    pub beta2: f64,
    /// Denominator epsilon.
    #[serde(default = "super::default_eps")]
    pub eps: f64,
    /// Decoupled weight decay.
    #[serde(default = "super::default_weight_decay")]
    pub weight_decay: f64,
    /// Parameters with fewer elements keep f32 moments (bitsandbytes' `min_8bit_size`).
    #[serde(default = "default_min_8bit_size")]
    pub min_8bit_size: usize,
}

fn default_min_8bit_size() -> usize {
    4096
}

impl Default for AdamW8bitConfig {
    fn default() -> Self {
        AdamW8bitConfig {
            beta1: super::default_beta1(),
            beta2: super::default_beta2(),
            eps: super::default_eps(),
            weight_decay: super::default_weight_decay(),
            min_8bit_size: default_min_8bit_size(),
        }
    }
}

/// bitsandbytes' dynamic 8-bit map (`create_dynamic_map(signed, 7, 8)`), sorted: for each
/// exponent `i` in 0..7, the midpoints of `linspace(0.1, 1, n_i + 1)` (f32) times `10^(i-6)`
/// (`n_i = 2^i` with a sign, `2^(i+1)` without), their negatives when signed, then 0 and 1.
pub fn dynamic_map(signed: bool) -> Vec<f32> {
    let mut data = Vec::with_capacity(256);
    for i in 0..7i32 {
        let n = if signed { 1usize << i } else { 1 << (i + 1) };
        let bounds = linspace(0.1, 1.0, n + 1);
        let scale = 10f64.powi(i - 6) as f32;
        for w in bounds.windows(2) {
            let mean = (w[0] + w[1]) / 2.0;
            data.push(scale * mean);
            if signed {
                data.push(-scale * mean);
            }
        }
    }
    data.push(0.0);
    data.push(1.0);
    data.sort_by(f32::total_cmp);
    data
}

/// `torch.linspace(start, end, steps)` in f32 as torch computes it on a CPU: the first half
/// counted up from `start`, the second down from `end`, each point one fused multiply-add.
fn linspace(start: f32, end: f32, steps: usize) -> Vec<f32> {
    let step = (end - start) / (steps - 1) as f32;
    (0..steps)
        .map(|i| {
            if i < steps / 2 {
                step.mul_add(i as f32, start)
            } else {
                (-step).mul_add((steps - 1 - i) as f32, end)
            }
        })
        .collect()
}

/// A code table on a device: the codes and the 255 midpoints between neighbours.
#[derive(Debug, Clone)]
struct CodeTable {
    code: Tensor,
    bounds: Tensor,
    signed: bool,
}

impl CodeTable {
    fn new(signed: bool, dev: &Device) -> Result<Self> {
        let code = dynamic_map(signed);
        let bounds: Vec<f32> = code.windows(2).map(|w| (w[0] + w[1]) * 0.5).collect();
        Ok(CodeTable {
            code: Tensor::new(code.as_slice(), dev)?,
            bounds: Tensor::new(bounds.as_slice(), dev)?,
            signed,
        })
    }
}

/// One moment held blockwise-quantized: u8 codes (the parameter's shape) and f32 absmax per block.
#[derive(Debug)]
pub struct Quantized {
    /// One code per element.
    pub codes: Tensor,
    /// One scale per block of [`BLOCK_SIZE`] elements (the last block may be shorter).
    pub absmax: Tensor,
}

/// `x` (flat, `n` elements) padded with zeros to whole blocks, as `[blocks, BLOCK_SIZE]`.
fn blocks_of(x: &Tensor) -> Result<Tensor> {
    let n = x.elem_count();
    let blocks = n.div_ceil(BLOCK_SIZE);
    let pad = blocks * BLOCK_SIZE - n;
    let x = if pad > 0 {
        Tensor::cat(&[x, &Tensor::zeros(pad, x.dtype(), x.device())?], 0)?
    } else {
        x.clone()
    };
    Ok(x.reshape((blocks, BLOCK_SIZE))?)
}

impl Quantized {
    /// The f32 values `code[c] * absmax[block]`, flat.
    fn dequantize(&self, table: &CodeTable) -> Result<Tensor> {
        let n = self.codes.elem_count();
        let ids = self.codes.flatten_all()?.to_dtype(DType::U32)?;
        let vals = blocks_of(&table.code.index_select(&ids, 0)?)?;
        let out = vals.broadcast_mul(&self.absmax.unsqueeze(1)?)?;
        Ok(out.flatten_all()?.narrow(0, 0, n)?)
    }

    /// `x` (flat f32) quantized blockwise to the nearest code of `table`, codes shaped `shape`.
    fn quantize(x: &Tensor, table: &CodeTable, shape: &[usize]) -> Result<Self> {
        let n = x.elem_count();
        let xb = blocks_of(x)?;
        let absmax = xb.abs()?.max_keepdim(1)?;
        // An all-zero block scales by the smallest normal float instead of 0, so its codes are
        // those of 0 rather than of NaN.
        let scaled = xb.broadcast_div(&absmax.maximum(f32::MIN_POSITIVE as f64)?)?;
        let scaled = scaled.flatten_all()?.narrow(0, 0, n)?;
        // The nearest code is the number of midpoints below the value: a binary search over the
        // 255 midpoints, all elements at once.
        let dev = x.device();
        let mut idx = Tensor::zeros(n, DType::U32, dev)?;
        for step in [128u32, 64, 32, 16, 8, 4, 2, 1] {
            let cand = idx.broadcast_add(&Tensor::new(step, dev)?)?;
            let below = cand.broadcast_sub(&Tensor::new(1u32, dev)?)?;
            let bound = table.bounds.index_select(&below, 0)?;
            idx = scaled.gt(&bound)?.where_cond(&cand, &idx)?;
        }
        if table.signed {
            // The kernel keeps the sign: a negative value (or -0) rounded to the code of 0
            // (index 127) takes the smallest negative code instead.
            let zero_code = Tensor::new(127u32, dev)?;
            let negative = scaled.recip()?.lt(0f64)?;
            let at_zero = idx.broadcast_eq(&zero_code)?;
            let fix = (negative * at_zero)?;
            let lower = Tensor::full(126u32, n, dev)?;
            idx = fix.where_cond(&lower, &idx)?;
        }
        Ok(Quantized {
            codes: idx.to_dtype(DType::U8)?.reshape(shape)?,
            absmax: absmax.squeeze(1)?,
        })
    }
}

/// The moments of one parameter: quantized, or f32 for a small parameter.
#[derive(Debug)]
enum Moments {
    Quantized {
        m: Quantized,
        v: Quantized,
        signed: CodeTable,
        unsigned: CodeTable,
    },
    Full {
        m: Tensor,
        v: Tensor,
    },
}

/// The 8-bit AdamW state of one parameter.
#[derive(Debug)]
pub(super) struct State {
    config: AdamW8bitConfig,
    moments: Moments,
}

/// The state of a parameter with f32 master weights `master`: quantized zero moments when it has
/// at least `min_8bit_size` elements.
pub(super) fn new_state(config: AdamW8bitConfig, master: &Tensor) -> Result<Box<dyn ParamState>> {
    let dev = master.device();
    let moments = if master.elem_count() >= config.min_8bit_size {
        let zero = || -> Result<Quantized> {
            Ok(Quantized {
                codes: Tensor::zeros(master.shape(), DType::U8, dev)?,
                absmax: Tensor::zeros(master.elem_count().div_ceil(BLOCK_SIZE), DType::F32, dev)?,
            })
        };
        Moments::Quantized {
            m: zero()?,
            v: zero()?,
            signed: CodeTable::new(true, dev)?,
            unsigned: CodeTable::new(false, dev)?,
        }
    } else {
        Moments::Full {
            m: master.zeros_like()?,
            v: master.zeros_like()?,
        }
    };
    Ok(Box::new(State { config, moments }))
}

/// The kernels' f32 update of `m`, `v` (f32, `g`'s shape) and the master weights.
fn adam_update(
    c: &AdamW8bitConfig,
    master: &Tensor,
    m: &Tensor,
    v: &Tensor,
    g: &Tensor,
    lr: f64,
    step: usize,
) -> Result<(Tensor, Tensor, Tensor)> {
    // The kernels take the hyperparameters as f32 and form 1 - beta in f32.
    let (b1, b2) = (c.beta1 as f32, c.beta2 as f32);
    let m = ((m * b1 as f64)? + (g * (1.0f32 - b1) as f64)?)?;
    let v = ((v * b2 as f64)? + ((g * (1.0f32 - b2) as f64)? * g)?)?;
    let correction1 = 1.0 - c.beta1.powi(step as i32);
    let correction2 = (1.0 - c.beta2.powi(step as i32)).sqrt();
    let step_size = (-lr * correction2 / correction1) as f32;
    let eps = (c.eps * correction2) as f32;
    let update = (&m / (v.sqrt()? + eps as f64)?)?;
    let mut w = (master + (update * step_size as f64)?)?;
    if c.weight_decay > 0.0 {
        w = (w * (1.0 - lr * c.weight_decay) as f32 as f64)?;
    }
    Ok((w.detach(), m.detach(), v.detach()))
}

impl ParamState for State {
    fn update(&mut self, master: &Tensor, g: &Tensor, lr: f64, step: usize) -> Result<Tensor> {
        let c = self.config;
        match &mut self.moments {
            Moments::Full { m, v } => {
                let (w, m2, v2) = adam_update(&c, master, m, v, g, lr, step)?;
                (*m, *v) = (m2, v2);
                Ok(w)
            }
            Moments::Quantized { m, v, signed, unsigned } => {
                let shape = master.dims().to_vec();
                let m_f = m.dequantize(signed)?;
                let v_f = v.dequantize(unsigned)?;
                let flat = |t: &Tensor| t.flatten_all();
                let (w, m2, v2) = adam_update(&c, &flat(master)?, &m_f, &v_f, &flat(g)?, lr, step)?;
                *m = Quantized::quantize(&m2, signed, &shape)?;
                *v = Quantized::quantize(&v2, unsigned, &shape)?;
                Ok(w.reshape(shape)?)
            }
        }
    }

    fn tensors(&self, name: &str) -> Vec<(String, Tensor)> {
        match &self.moments {
            Moments::Full { m, v } => vec![(format!("m.{name}"), m.clone()), (format!("v.{name}"), v.clone())],
            Moments::Quantized { m, v, .. } => vec![
                (format!("m.{name}"), m.codes.clone()),
                (format!("m_absmax.{name}"), m.absmax.clone()),
                (format!("v.{name}"), v.codes.clone()),
                (format!("v_absmax.{name}"), v.absmax.clone()),
            ],
        }
    }

    fn load(&mut self, name: &str, shape: &[usize], read: &mut StateReader) -> Result<()> {
        match &mut self.moments {
            Moments::Full { m, v } => {
                *m = read(&format!("m.{name}"), shape, DType::F32)?;
                *v = read(&format!("v.{name}"), shape, DType::F32)?;
            }
            Moments::Quantized { m, v, .. } => {
                let blocks = [m.absmax.elem_count()];
                for (key, q) in [("m", m), ("v", v)] {
                    q.codes = read(&format!("{key}.{name}"), shape, DType::U8)?;
                    q.absmax = read(&format!("{key}_absmax.{name}"), &blocks, DType::F32)?;
                }
            }
        }
        Ok(())
    }

    fn bytes(&self) -> usize {
        match &self.moments {
            Moments::Full { m, v } => tensor_bytes(m) + tensor_bytes(v),
            Moments::Quantized { m, v, .. } => [m, v]
                .iter()
                .map(|q| tensor_bytes(&q.codes) + tensor_bytes(&q.absmax))
                .sum(),
        }
    }
}

/// Dequantizes `codes` (u8) with per-block `absmax` on bitsandbytes' signed (`signed`) or
/// unsigned dynamic map: `map[c] * absmax[i / 256]`, flat. For inspecting saved state.
pub fn dequantize(codes: &Tensor, absmax: &Tensor, signed: bool) -> Result<Tensor> {
    let table = CodeTable::new(signed, codes.device())?;
    Quantized {
        codes: codes.clone(),
        absmax: absmax.clone(),
    }
    .dequantize(&table)
}
