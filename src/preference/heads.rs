//! Reward heads over a backbone's embedding of a response: the Bradley-Terry scalar reward and
//! the General Preference Model's skew-symmetric score (Zhang et al., arXiv 2410.02197; the
//! official `general-preference-model` repository's inference form). Both take hidden states
//! `[B, hidden]` from any backbone: an LM's last token or a CLIP image embedding.

use candle_core::Tensor;

use super::objective::{log_sigmoid, sigmoid};
use crate::nn::{l2_normalize, softmax, Linear};
use crate::weights::VarBuilder;
use crate::{Error, Result};

/// Bradley-Terry loss `mean(-logsigmoid((r_w - r_l) / tau))` of rewards `[B]`.
pub fn bt_loss(r_w: &Tensor, r_l: &Tensor, tau: f64) -> Result<Tensor> {
    Ok(log_sigmoid(&((r_w - r_l)? / tau)?)?.mean_all()?.neg()?)
}

/// The GPM embedding head: `value_head` `hidden -> 2k` (no bias), L2-normalised, and the optional
/// prompt gate `prompt_head` `hidden -> k` (no bias) whose softmax weighs the k blocks.
#[derive(Debug, Clone)]
pub struct GpmHead {
    value_head: Linear,
    prompt_head: Option<Linear>,
    /// The temperature of `P = sigmoid(s / tau)`.
    pub tau: f64,
}

impl GpmHead {
    /// Loads `value_head.weight` `[2k, hidden]` and, with `gate`, `prompt_head.weight` `[k, hidden]`.
    pub fn new(hidden: usize, dim: usize, gate: bool, tau: f64, vb: VarBuilder) -> Result<Self> {
        if dim == 0 || dim % 2 != 0 {
            return Err(Error::input(
                "value_head_dim",
                format!("must be even and positive, got {dim}"),
            ));
        }
        crate::error::positive("tau", tau)?;
        Ok(GpmHead {
            value_head: Linear::new(hidden, dim, false, vb.pp("value_head"))?,
            prompt_head: if gate {
                Some(Linear::new(hidden, dim / 2, false, vb.pp("prompt_head"))?)
            } else {
                None
            },
            tau,
        })
    }

    /// Whether the head has the prompt-dependent gate.
    pub fn has_gate(&self) -> bool {
        self.prompt_head.is_some()
    }

    /// Unit embeddings `[B, 2k]` of response states `[B, hidden]`.
    pub fn embed(&self, h: &Tensor) -> Result<Tensor> {
        l2_normalize(&self.value_head.forward(h)?)
    }

    /// Gate weights `[B, k]` (softmax of the prompt head) from prompt states `[B, hidden]`;
    /// `None` without a gate (all blocks weigh 1).
    pub fn gate(&self, h_prompt: &Tensor) -> Result<Option<Tensor>> {
        self.prompt_head
            .as_ref()
            .map(|p| Ok(softmax(&p.forward(h_prompt)?)?))
            .transpose()
    }
}

/// GPM score `s(i > j) = sum_l gate_l * (v_i[2l] v_j[2l+1] - v_i[2l+1] v_j[2l])` for rows of
/// `v_i`, `v_j` `[B, 2k]` and `gate` `[B, k]` (1 when `None`); `[B]`. Skew-symmetric.
pub fn gpm_score(v_i: &Tensor, v_j: &Tensor, gate: Option<&Tensor>) -> Result<Tensor> {
    let (b, d) = v_i.dims2()?;
    let k = d / 2;
    let vi = v_i.reshape((b, k, 2))?;
    let vj = v_j.reshape((b, k, 2))?;
    let per_block =
        ((vi.narrow(2, 0, 1)? * vj.narrow(2, 1, 1)?)? - (vi.narrow(2, 1, 1)? * vj.narrow(2, 0, 1)?)?)?.squeeze(2)?;
    let weighted = match gate {
        Some(g) => (per_block * g)?,
        None => per_block,
    };
    Ok(weighted.sum(1)?)
}

/// The score matrix `[N, N]`, `S[i, j] = s(i > j)`, of embeddings `[N, 2k]` under one gate `[k]`.
pub fn gpm_score_matrix(v: &Tensor, gate: Option<&Tensor>) -> Result<Tensor> {
    let (n, d) = v.dims2()?;
    let k = d / 2;
    let even = v.reshape((n, k, 2))?.narrow(2, 0, 1)?.squeeze(2)?;
    let odd = v.reshape((n, k, 2))?.narrow(2, 1, 1)?.squeeze(2)?;
    let (even_g, odd_g) = match gate {
        Some(g) => (even.broadcast_mul(g)?, odd.broadcast_mul(g)?),
        None => (even.clone(), odd.clone()),
    };
    Ok((even_g.matmul(&odd.t()?)? - odd_g.matmul(&even.t()?)?)?)
}

/// `P(i > j) = sigmoid(s / tau)`.
pub fn gpm_probability(s: &Tensor, tau: f64) -> Result<Tensor> {
    sigmoid(&(s / tau)?)
}

/// GPM loss `mean(-logsigmoid(s(w > l) / tau))`.
pub fn gpm_loss(s: &Tensor, tau: f64) -> Result<Tensor> {
    Ok(log_sigmoid(&(s / tau)?)?.mean_all()?.neg()?)
}
