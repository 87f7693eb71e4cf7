//! Memory-efficient attention on wgpu (`kernels/wgsl/attention.wgsl`): per query (or key) row,
//! online softmax, scores recomputed in the backward pass.

use candle_core::CpuStorage;

use super::{f32_word, groups_for, run_one, shader, word, Job, Shader, Slot};
use crate::Result;

static SHADER: Shader = shader!("attention");

/// `n` slices of `lq` queries and `lk` keys, widths `d` and `dv`, and the score scale.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Sizes {
    pub n: usize,
    pub lq: usize,
    pub lk: usize,
    pub d: usize,
    pub dv: usize,
    pub scale: f64,
}

impl Sizes {
    fn params(&self, op: &'static str) -> Result<[u32; 6]> {
        Ok([
            word(op, "n", self.n)?,
            word(op, "lq", self.lq)?,
            word(op, "lk", self.lk)?,
            word(op, "d", self.d)?,
            word(op, "dv", self.dv)?,
            f32_word(self.scale),
        ])
    }
}

/// `O` `[n, lq, dv]` from `q` `[n, lq, d]`, `k` `[n, lk, d]`, `v` `[n, lk, dv]`.
pub(crate) fn forward(s: &Sizes, q: &[f32], k: &[f32], v: &[f32]) -> Result<CpuStorage> {
    let op = "attention";
    let params = s.params(op)?;
    run_one(&Job {
        op,
        params: &params,
        slots: &[
            (1, Slot::In(q)),
            (2, Slot::In(k)),
            (3, Slot::In(v)),
            (5, Slot::Out(s.n * s.lq * s.dv)),
        ],
        passes: &[SHADER.pass("attention_fwd_f32", groups_for(op, s.n * s.lq, 1)?)],
    })
}

/// `[dq | dk | dv]` from `q`, `kv` `[n, lk, d + dv]` (keys and values side by side) and `go`
/// `[n, lq, dv + 1]` (the output gradient and `rowsum(dO * O)`).
pub(crate) fn backward(s: &Sizes, q: &[f32], kv: &[f32], go: &[f32]) -> Result<CpuStorage> {
    let op = "attention-grad";
    let params = s.params(op)?;
    // The shader reads keys and values as separate arrays.
    let (mut k, mut v) = (
        Vec::with_capacity(s.n * s.lk * s.d),
        Vec::with_capacity(s.n * s.lk * s.dv),
    );
    for row in kv.chunks(s.d + s.dv) {
        k.extend_from_slice(&row[..s.d]);
        v.extend_from_slice(&row[s.d..]);
    }
    let total = s.n * (s.lq * s.d + s.lk * s.d + s.lk * s.dv);
    run_one(&Job {
        op,
        params: &params,
        slots: &[
            (1, Slot::In(q)),
            (2, Slot::In(&k)),
            (3, Slot::In(&v)),
            (4, Slot::In(go)),
            (5, Slot::Out(total)),
            (6, Slot::Scratch(s.n * s.lq)),
        ],
        passes: &[
            SHADER.pass("attention_bwd_q_f32", groups_for(op, s.n * s.lq, 1)?),
            SHADER.pass("attention_bwd_kv_f32", groups_for(op, s.n * s.lk, 1)?),
        ],
    })
}
