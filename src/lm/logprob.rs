//! Sequence log-probabilities of completions under a causal LM.

use candle_core::{DType, Tensor, D};

use crate::{Error, Result};

/// `log_softmax` over the last dimension, composed of ops with a backward pass (the maximum is
/// detached: it cancels out).
pub fn log_softmax(logits: &Tensor) -> Result<Tensor> {
    let max = logits.max_keepdim(D::Minus1)?.detach();
    let shifted = logits.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    Ok(shifted.broadcast_sub(&lse)?)
}

/// Per-token log-probabilities `[B, T]` of `input_ids` `[B, T]`: position `t` holds
/// `log softmax(logits[t - 1])[input_ids[t]]` (f32); position 0 holds 0 (it has no prediction).
pub fn token_logps(logits: &Tensor, input_ids: &Tensor) -> Result<Tensor> {
    let (b, t, _) = logits.dims3()?;
    if input_ids.dims() != [b, t] {
        return Err(Error::input(
            "input_ids",
            format!(
                "shape {:?} does not match the logits {:?}",
                input_ids.dims(),
                logits.dims()
            ),
        ));
    }
    if t < 2 {
        return Ok(Tensor::zeros((b, t), DType::F32, logits.device())?);
    }
    let lp = log_softmax(&logits.narrow(1, 0, t - 1)?.to_dtype(DType::F32)?)?;
    let targets = input_ids
        .narrow(1, 1, t - 1)?
        .to_dtype(DType::U32)?
        .to_device(logits.device())?
        .unsqueeze(2)?
        .contiguous()?;
    let picked = lp.contiguous()?.gather(&targets, 2)?.squeeze(2)?;
    let zero = Tensor::zeros((b, 1), DType::F32, logits.device())?;
    Ok(Tensor::cat(&[&zero, &picked], 1)?)
}

/// The sum over completion tokens of their log-probabilities, `[B]` f32, and the completion
/// lengths `[B]` f32. `completion_mask` `[B, T]` is 1 on the counted tokens (never position 0).
pub fn sequence_logps(logits: &Tensor, input_ids: &Tensor, completion_mask: &Tensor) -> Result<(Tensor, Tensor)> {
    let per_token = token_logps(logits, input_ids)?;
    let mask = completion_mask.to_dtype(DType::F32)?.to_device(logits.device())?;
    crate::error::same_shape("completion_mask", mask.dims(), "input_ids", per_token.dims())?;
    let first = mask.narrow(1, 0, 1)?.sum_all()?.to_scalar::<f32>()?;
    if first != 0.0 {
        return Err(Error::input(
            "completion_mask",
            "position 0 cannot be a completion token (nothing predicts it)",
        ));
    }
    Ok(((per_token * &mask)?.sum(1)?, mask.sum(1)?))
}
