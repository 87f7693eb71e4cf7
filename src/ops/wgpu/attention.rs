//! Memory-efficient attention on wgpu (`kernels/wgsl/attention.wgsl`): per query (or key) row,
//! online softmax, scores recomputed in the backward pass, an optional additive mask.
//!
//! WGSL lets a shader assume there are no infinities, so the mask reaches the shader with `-inf`
//! (a blocked key) as the most negative finite f32, which the shader treats as blocked (and so
//! does any mask value at or below it). A query row whose keys are all blocked is NaN in the
//! reference (`0 / 0` in its softmax), and so is everything computed from it; the shader leaves
//! such rows finite and the host writes NaN where the reference has it: that row of the output
//! and of dq, and dk and dv of the row's whole (batch, head) slice.

use candle_core::CpuStorage;

use super::{f32_word, groups_for, run, shader, word, Job, Shader};
use crate::ops::attention::{MaskView, Sizes};
use crate::Result;

static SHADER: Shader = shader!("attention");

impl Sizes {
    fn params(&self, op: &'static str, masked: bool) -> Result<[u32; 7]> {
        let [n, lq, lk, d, dv] = self.named().map(|(what, v)| word(op, what, v));
        Ok([n?, lq?, lk?, d?, dv?, f32_word(self.scale), u32::from(masked)])
    }
}

/// The mask buffers of the shader (binding 7: values `[m, lq, lk]` with `-inf` as `f32::MIN`,
/// binding 8: the mask slice of each slice), one-element placeholders when there is no mask, and
/// the query rows (over all `n * lq`) whose keys are all blocked.
struct ShaderMask {
    values: Vec<f32>,
    slice_of: Vec<u32>,
    dead: Vec<bool>,
}

impl ShaderMask {
    fn new(op: &'static str, s: &Sizes, mask: Option<MaskView<f32>>) -> Result<Self> {
        let Some(mask) = mask else {
            return Ok(ShaderMask {
                values: vec![0.0],
                slice_of: vec![0],
                dead: vec![false; s.n * s.lq],
            });
        };
        let values = mask.values.iter().map(|&x| x.max(f32::MIN)).collect();
        let slice_of = mask
            .slice_of
            .iter()
            .map(|&i| word(op, "mask slice", i))
            .collect::<Result<_>>()?;
        let mut dead = Vec::with_capacity(s.n * s.lq);
        for i in 0..s.n {
            let rows = mask.slice(i, s.lq * s.lk).chunks(s.lk.max(1));
            dead.extend(rows.map(|r| s.lk > 0 && r.iter().all(|&x| x == f32::NEG_INFINITY)));
        }
        Ok(ShaderMask { values, slice_of, dead })
    }

    fn inputs(&self) -> [(u32, &[f32]); 2] {
        [(7, &self.values), (8, bytemuck::cast_slice(&self.slice_of))]
    }

    /// Writes NaN into the rows of `[n * lq, width]` that belong to fully blocked query rows.
    fn poison_rows(&self, out: &mut [f32], width: usize) {
        for (row, _) in self.dead.iter().enumerate().filter(|(_, &d)| d) {
            out[row * width..(row + 1) * width].fill(f32::NAN);
        }
    }

    /// Writes NaN into the `per_slice` values of each slice of `out` that has a fully blocked
    /// query row.
    fn poison_slices(&self, s: &Sizes, out: &mut [f32], per_slice: usize) {
        for (i, rows) in self.dead.chunks(s.lq.max(1)).enumerate() {
            if rows.iter().any(|&d| d) {
                out[i * per_slice..(i + 1) * per_slice].fill(f32::NAN);
            }
        }
    }
}

/// `O` `[n, lq, dv]` from `q` `[n, lq, d]`, `k` `[n, lk, d]`, `v` `[n, lk, dv]` and the mask.
pub(crate) fn forward(s: &Sizes, [q, k, v]: [&[f32]; 3], mask: Option<MaskView<f32>>) -> Result<CpuStorage> {
    let op = "attention";
    let params = s.params(op, mask.is_some())?;
    let mask = ShaderMask::new(op, s, mask)?;
    let [m7, m8] = mask.inputs();
    let mut out = run(&Job {
        op,
        params: &params,
        inputs: &[(1, q), (2, k), (3, v), m7, m8],
        output: (5, s.n * s.lq * s.dv),
        scratch: &[],
        passes: &[SHADER.pass("attention_fwd_f32", groups_for(op, s.n * s.lq, 1)?)],
    })?;
    mask.poison_rows(&mut out, s.dv);
    Ok(CpuStorage::F32(out))
}

/// `[dq | dk | dv]` from `q`, `kv` `[n, lk, d + dv]` (keys and values side by side), `go`
/// `[n, lq, dv + 1]` (the output gradient and `rowsum(dO * O)`) and the forward's mask.
pub(crate) fn backward(s: &Sizes, [q, kv, go]: [&[f32]; 3], mask: Option<MaskView<f32>>) -> Result<CpuStorage> {
    let op = "attention-grad";
    let params = s.params(op, mask.is_some())?;
    let mask = ShaderMask::new(op, s, mask)?;
    let [m7, m8] = mask.inputs();
    // The shader reads keys and values as separate arrays.
    let (mut k, mut v) = (
        Vec::with_capacity(s.n * s.lk * s.d),
        Vec::with_capacity(s.n * s.lk * s.dv),
    );
    for row in kv.chunks(s.d + s.dv) {
        k.extend_from_slice(&row[..s.d]);
        v.extend_from_slice(&row[s.d..]);
    }
    let (nq, nk) = (s.n * s.lq * s.d, s.n * s.lk * s.d);
    let total = nq + nk + s.n * s.lk * s.dv;
    let mut all = run(&Job {
        op,
        params: &params,
        inputs: &[(1, q), (2, &k), (3, &v), (4, go), m7, m8],
        output: (5, total),
        scratch: &[(6, s.n * s.lq)],
        passes: &[
            SHADER.pass("attention_bwd_q_f32", groups_for(op, s.n * s.lq, 1)?),
            SHADER.pass("attention_bwd_kv_f32", groups_for(op, s.n * s.lk, 1)?),
        ],
    })?;
    let (dq, rest) = all.split_at_mut(nq);
    let (dk, dv) = rest.split_at_mut(nk);
    mask.poison_rows(dq, s.d);
    mask.poison_slices(s, dk, s.lk * s.d);
    mask.poison_slices(s, dv, s.lk * s.dv);
    Ok(CpuStorage::F32(all))
}
