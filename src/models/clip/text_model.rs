//! The CLIP text encoder (Radford et al. 2021, "Learning Transferable Visual Models From Natural
//! Language Supervision", arXiv 2103.00020), as transformers'
//! `src/transformers/models/clip/modeling_clip.py` (`CLIPTextModel`, `CLIPTextModelWithProjection`
//! and the text half of `CLIPModel`), with exact numerics and a backward pass through every
//! weight (our own [`LayerNorm`], softmax and activations, see `crate::nn`).
//!
//! Input: token ids `[B, L]` (u32 or i64, `L <= max_position_embeddings`). Output
//! ([`ClipTextOutput`]): the final-layer-normed `last_hidden_state` `[B, L, D]`, the
//! `penultimate_hidden_state` `[B, L, D]` (`hidden_states[-2]`, no final layer norm: what SDXL
//! conditions on), optionally every hidden state, the `pooler_output` `[B, D]` (the final state at
//! the end-of-text token) and, with a projection, `text_embeds` `[B, projection_dim]`.
//!
//! Attention is causal with no padding mask, as diffusers calls the encoder. There is no dropout:
//! `attention_dropout` is read and ignored (it is 0 in every released checkpoint).

use candle_core::{DType, Tensor};

pub use super::config::{ClipPooling, ClipTextArchitecture, ClipTextConfig};
use super::encoder::{causal_mask, ClipEncoder, ClipKeyLayout};
use crate::nn::{LayerNorm, Linear};
use crate::weights::VarBuilder;
use crate::{Error, Result};

/// Where a checkpoint keeps the text transformer's tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClipTextLayout {
    /// Under `text_model.`: `CLIPTextModel` saved by transformers 4 (the SD checkpoints on the
    /// Hub), `CLIPTextModelWithProjection` and `CLIPModel`.
    Prefixed,
    /// At the root (`embeddings.`, `encoder.`, `final_layer_norm.`): `CLIPTextModel` saved by
    /// transformers 5, which strips the prefix (its `PrefixChange(prefix_to_remove="text_model")`).
    Flat,
}

impl ClipTextLayout {
    /// Reads the layout off the checkpoint under `vb`: which of
    /// `text_model.embeddings.token_embedding.weight` and `embeddings.token_embedding.weight` it
    /// holds. Neither, or both, is an error naming the checkpoint. Random weights are `Prefixed`.
    pub fn detect(vb: &VarBuilder) -> Result<Self> {
        let Some(store) = vb.store() else {
            return Ok(ClipTextLayout::Prefixed);
        };
        const PROBE: &str = "embeddings.token_embedding.weight";
        let prefixed = vb.pp("text_model").path(PROBE);
        let flat = vb.path(PROBE);
        match (store.contains(&prefixed), store.contains(&flat)) {
            (true, false) => Ok(ClipTextLayout::Prefixed),
            (false, true) => Ok(ClipTextLayout::Flat),
            (false, false) => Err(Error::MissingTensor {
                file: store.label().to_path_buf(),
                name: format!("{prefixed} (or {flat}): not a CLIP text encoder checkpoint"),
            }),
            (true, true) => Err(Error::BadSafetensors {
                file: store.label().to_path_buf(),
                reason: format!("holds both {prefixed} and {flat}, so the CLIP text encoder's key layout is ambiguous"),
            }),
        }
    }
}

/// Whether `name` is a known non-parameter buffer of a CLIP text checkpoint, which the model
/// does not read: `position_ids` (`arange(max_position_embeddings)`, saved by transformers 4).
/// For [`crate::weights::TensorStore::check_all_used`].
pub fn is_known_buffer(name: &str) -> bool {
    matches!(name, "text_model.embeddings.position_ids" | "embeddings.position_ids")
}

/// Runtime choices for [`ClipTextModel::forward_with`].
#[derive(Debug, Clone, Copy, Default)]
pub struct ClipTextForwardOptions {
    /// Also return every hidden state in [`ClipTextOutput::hidden_states`] (default false).
    pub output_hidden_states: bool,
}

/// What the text encoder computes for a batch of token ids `[B, L]`.
#[derive(Debug, Clone)]
pub struct ClipTextOutput {
    /// The last layer's output after `final_layer_norm`, `[B, L, D]` (SD 1.x/2.x conditioning).
    pub last_hidden_state: Tensor,
    /// The second-to-last layer's output, `hidden_states[-2]`, no final layer norm, `[B, L, D]`
    /// (SDXL conditioning). With one layer, the embeddings.
    pub penultimate_hidden_state: Tensor,
    /// With [`ClipTextForwardOptions::output_hidden_states`]: the embeddings then each layer's
    /// output (`num_hidden_layers + 1` tensors `[B, L, D]`, none final-layer-normed).
    pub hidden_states: Option<Vec<Tensor>>,
    /// `last_hidden_state` at each row's end-of-text position (see [`ClipPooling`]), `[B, D]`.
    pub pooler_output: Tensor,
    /// `pooler_output @ text_projection^T`, `[B, projection_dim]`, when the model has a projection.
    pub text_embeds: Option<Tensor>,
}

/// Token plus position embeddings: transformers' `text_model.embeddings`
/// (`token_embedding.weight`, `position_embedding.weight`), or open_clip's `token_embedding.weight`
/// and `positional_embedding`.
#[derive(Debug, Clone)]
pub(super) struct ClipTextEmbeddings {
    /// `[vocab_size, D]`.
    pub(super) token_embedding: Tensor,
    /// `[max_position_embeddings, D]`.
    pub(super) position_embedding: Tensor,
}

impl ClipTextEmbeddings {
    fn new(cfg: &ClipTextConfig, vb: VarBuilder) -> Result<Self> {
        let token_embedding = vb
            .pp("token_embedding")
            .get(&[cfg.vocab_size, cfg.hidden_size], "weight")?;
        let position_embedding = vb
            .pp("position_embedding")
            .get(&[cfg.max_position_embeddings, cfg.hidden_size], "weight")?;
        Ok(ClipTextEmbeddings {
            token_embedding,
            position_embedding,
        })
    }

    /// Checks `input_ids` `[B, L]` (see [`read_ids`]; `positions_key` names the position table's
    /// size in errors) and embeds them: the ids on the host and the embeddings `[B, L, D]`.
    pub(super) fn forward(&self, input_ids: &Tensor, positions_key: &str) -> Result<(Vec<Vec<i64>>, Tensor)> {
        let (vocab, d) = self.token_embedding.dims2()?;
        let positions = self.position_embedding.dim(0)?;
        let ids = read_ids(input_ids, vocab, (positions_key, positions))?;
        let (b, l) = (ids.len(), ids[0].len());
        let flat: Vec<u32> = ids.iter().flatten().map(|&id| id as u32).collect();
        let flat = Tensor::from_vec(flat, b * l, self.token_embedding.device())?;
        let tokens = self.token_embedding.index_select(&flat, 0)?.reshape((b, l, d))?;
        let positions = self.position_embedding.narrow(0, 0, l)?;
        Ok((ids, tokens.broadcast_add(&positions)?))
    }
}

/// transformers' `CLIPTextModel` body: `embeddings`, `encoder`, `final_layer_norm`.
#[derive(Debug, Clone)]
struct ClipTextTransformer {
    embeddings: ClipTextEmbeddings,
    encoder: ClipEncoder,
    final_layer_norm: LayerNorm,
}

impl ClipTextTransformer {
    fn new(cfg: &ClipTextConfig, vb: VarBuilder) -> Result<Self> {
        let embeddings = ClipTextEmbeddings::new(cfg, vb.pp("embeddings"))?;
        let encoder = ClipEncoder::new(
            &cfg.encoder(),
            ClipKeyLayout::Transformers,
            vb.pp("encoder").pp("layers"),
        )?;
        let final_layer_norm = LayerNorm::new(cfg.hidden_size, cfg.layer_norm_eps, vb.pp("final_layer_norm"))?;
        Ok(ClipTextTransformer {
            embeddings,
            encoder,
            final_layer_norm,
        })
    }
}

/// A CLIP text encoder with transformers' outputs, optionally with `text_projection`.
#[derive(Debug, Clone)]
pub struct ClipTextModel {
    text_model: ClipTextTransformer,
    text_projection: Option<Linear>,
    config: ClipTextConfig,
}

impl ClipTextModel {
    /// Builds the model from `vb` at the checkpoint root: the transformer where `layout` says,
    /// plus `text_projection.weight` `[projection_dim, hidden_size]` when `cfg.architecture` has
    /// a projection. Does not audit unused tensors (see [`ClipTextModel::load`]).
    pub fn new(cfg: &ClipTextConfig, layout: ClipTextLayout, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        let body_vb = match layout {
            ClipTextLayout::Prefixed => vb.pp("text_model"),
            ClipTextLayout::Flat => vb.clone(),
        };
        let text_model = ClipTextTransformer::new(cfg, body_vb)?;
        let text_projection = if cfg.architecture.has_projection() {
            Some(Linear::new(
                cfg.hidden_size,
                cfg.projection_dim,
                false,
                vb.pp("text_projection"),
            )?)
        } else {
            None
        };
        Ok(ClipTextModel {
            text_model,
            text_projection,
            config: cfg.clone(),
        })
    }

    /// Builds the model from a checkpoint that holds this text encoder only (a `text_encoder/`
    /// folder's weights): detects the [`ClipTextLayout`], calls [`ClipTextModel::new`], then fails
    /// if a tensor of the checkpoint went unused, except the buffers of [`is_known_buffer`].
    pub fn load(cfg: &ClipTextConfig, vb: VarBuilder) -> Result<Self> {
        let model = Self::new(cfg, ClipTextLayout::detect(&vb)?, vb.clone())?;
        if let Some(store) = vb.store() {
            store.check_all_used(is_known_buffer)?;
        }
        Ok(model)
    }

    /// The configuration the model was built with.
    pub fn config(&self) -> &ClipTextConfig {
        &self.config
    }

    /// Runs the encoder on `input_ids` `[B, L]` (u32 or i64, on any device).
    pub fn forward(&self, input_ids: &Tensor) -> Result<ClipTextOutput> {
        self.forward_with(input_ids, &ClipTextForwardOptions::default())
    }

    /// [`ClipTextModel::forward`] with options.
    pub fn forward_with(&self, input_ids: &Tensor, opts: &ClipTextForwardOptions) -> Result<ClipTextOutput> {
        let (ids, xs) = self
            .text_model
            .embeddings
            .forward(input_ids, "max_position_embeddings")?;
        let mask = causal_mask(ids[0].len(), xs.device())?;

        let encoder = &self.text_model.encoder;
        let n = encoder.num_layers();
        let mut all = opts.output_hidden_states.then(|| Vec::with_capacity(n + 1));
        let mut penultimate = None;
        let xs = encoder.forward_inspect(&xs, Some(&mask), |i, xs| {
            if let Some(all) = all.as_mut() {
                all.push(xs.clone());
            }
            if i + 1 == n {
                penultimate = Some(xs.clone());
            }
        })?;
        if let Some(all) = all.as_mut() {
            all.push(xs.clone());
        }
        let penultimate_hidden_state = penultimate.expect("validated: num_hidden_layers >= 1");
        let last_hidden_state = self.text_model.final_layer_norm.forward(&xs)?;

        let pooler_output = pool(&last_hidden_state, &ids, self.config.pooling())?;
        let text_embeds = match &self.text_projection {
            Some(p) => Some(p.forward(&pooler_output)?),
            None => None,
        };
        Ok(ClipTextOutput {
            last_hidden_state,
            penultimate_hidden_state,
            hidden_states: all,
            pooler_output,
            text_embeds,
        })
    }
}

/// Checks `input_ids` (rank 2, non-empty, integer, ids inside a vocabulary of `vocab` tokens,
/// length within the position table, whose size is `positions.1` under the key `positions.0`)
/// and reads them to the host.
fn read_ids(input_ids: &Tensor, vocab: usize, positions: (&str, usize)) -> Result<Vec<Vec<i64>>> {
    let bad = |reason: String| Error::input("input_ids", reason);
    let (b, l) = input_ids
        .dims2()
        .map_err(|_| bad(format!("expected shape [B, L], got {:?}", input_ids.dims())))?;
    if b == 0 || l == 0 {
        return Err(bad(format!("expected a non-empty batch, got shape [{b}, {l}]")));
    }
    let (positions_key, positions) = positions;
    if l > positions {
        return Err(bad(format!(
            "sequence length must be <= {positions_key} ({positions}), got {l}"
        )));
    }
    let ids: Vec<Vec<i64>> = match input_ids.dtype() {
        DType::U32 => input_ids
            .to_vec2::<u32>()?
            .into_iter()
            .map(|r| r.into_iter().map(i64::from).collect())
            .collect(),
        DType::I64 => input_ids.to_vec2::<i64>()?,
        other => return Err(bad(format!("expected dtype u32 or i64, got {other:?}"))),
    };
    let vocab = vocab as i64;
    for (r, row) in ids.iter().enumerate() {
        if let Some((c, &id)) = row.iter().enumerate().find(|(_, &id)| id < 0 || id >= vocab) {
            return Err(bad(format!(
                "id at [{r}, {c}] must be in 0..{vocab} (vocab_size), got {id}"
            )));
        }
    }
    Ok(ids)
}

/// The states `xs` `[B, L, D]` at each row's pooled position of `ids` under `rule`, `[B, D]`.
pub(super) fn pool(xs: &Tensor, ids: &[Vec<i64>], rule: ClipPooling) -> Result<Tensor> {
    let (b, l, d) = xs.dims3()?;
    let rows: Vec<u32> = pooled_positions(ids, rule)
        .into_iter()
        .enumerate()
        .map(|(row, pos)| (row * l + pos) as u32)
        .collect();
    let rows = Tensor::from_vec(rows, b, xs.device())?;
    Ok(xs.reshape((b * l, d))?.index_select(&rows, 0)?)
}

/// The pooled position of each row of `ids` under `rule` (transformers' `pooled_output` index).
pub fn pooled_positions(ids: &[Vec<i64>], rule: ClipPooling) -> Vec<usize> {
    ids.iter()
        .map(|row| match rule {
            // First maximum, as torch.argmax.
            ClipPooling::ArgmaxId => {
                row.iter()
                    .enumerate()
                    .fold((0, i64::MIN), |best, (i, &id)| if id > best.1 { (i, id) } else { best })
                    .0
            }
            ClipPooling::FirstEos(eos) => row.iter().position(|&id| id == eos).unwrap_or(0),
        })
        .collect()
}
