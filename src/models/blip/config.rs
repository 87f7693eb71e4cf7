//! BLIP's configurations as ImageReward builds them (`ImageReward/models/BLIP/blip_pretrain.py`):
//! the text side from `med_config.json` (a transformers `BertConfig`, [`MedConfig`]), the vision
//! side from the checkpoint's shapes ([`BlipVisionConfig::from_store`]), since `create_vit` only
//! knows ViT-B and ViT-L by name.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::models::clip::config::{check_divides, check_positive, ClipEncoderConfig};
use crate::nn::Activation;
use crate::weights::TensorStore;
use crate::{Error, Result};

/// BLIP's ViT head width: heads = width / 64 (ViT-B 768/12, ViT-L 1024/16).
pub const VIT_HEAD_DIM: usize = 64;
/// The ViT's LayerNorm epsilon (`partial(nn.LayerNorm, eps=1e-6)` in `vit.py`).
pub const VIT_LAYER_NORM_EPS: f64 = 1e-6;

/// Keys of `med_config.json` that play no part in inference (dropout, initialisation, the
/// unused token-type vocabulary, bookkeeping), read without a warning.
const IGNORED_MED_KEYS: &[&str] = &[
    "architectures",
    "model_type",
    "attention_probs_dropout_prob",
    "hidden_dropout_prob",
    "initializer_range",
    "type_vocab_size",
    "pad_token_id",
    "transformers_version",
];

fn default_layer_norm_eps() -> f64 {
    1e-12
}

fn default_max_position_embeddings() -> usize {
    512
}

fn default_position_embedding_type() -> String {
    "absolute".into()
}

fn default_true() -> bool {
    true
}

/// BLIP's `med_config.json`: the BERT text encoder with cross-attention ("mixture of
/// encoder-decoder"). Defaults are `BertConfig`'s.
#[derive(Debug, Clone, Deserialize)]
pub struct MedConfig {
    /// Vocabulary size (30524 for ImageReward: bert-base-uncased plus `[DEC]` and `[ENC]`).
    pub vocab_size: usize,
    /// Width of the hidden states (768).
    pub hidden_size: usize,
    /// Number of layers (12).
    pub num_hidden_layers: usize,
    /// Attention heads per layer (12); divides `hidden_size`.
    pub num_attention_heads: usize,
    /// Width of the feed-forward layer (3072).
    pub intermediate_size: usize,
    /// Feed-forward activation (`gelu`, exact).
    pub hidden_act: Activation,
    /// LayerNorm epsilon (1e-12).
    #[serde(default = "default_layer_norm_eps")]
    pub layer_norm_eps: f64,
    /// Rows of the position embedding table (512).
    #[serde(default = "default_max_position_embeddings")]
    pub max_position_embeddings: usize,
    /// Only `absolute` is supported (BLIP's `relative_key` variants are unused by ImageReward).
    #[serde(default = "default_position_embedding_type")]
    pub position_embedding_type: String,
    /// Whether every layer has cross-attention to the image tokens; ImageReward needs it.
    #[serde(default = "default_true")]
    pub add_cross_attention: bool,
    /// The file's `encoder_width`; `BLIP_Pretrain` overwrites it with the ViT's width, and so does
    /// the loader (the key width of the cross-attention is read from the vision tower).
    #[serde(default)]
    pub encoder_width: Option<usize>,
    /// Keys not read by the model, for a warning.
    #[serde(flatten)]
    extra: BTreeMap<String, serde_json::Value>,
}

impl MedConfig {
    /// Reads `med_config.json` and validates it ([`MedConfig::validate`]).
    pub fn from_file(path: &Path) -> Result<Self> {
        if !path.is_file() {
            return Err(Error::MissingFile {
                path: path.to_path_buf(),
                what: "BLIP's text encoder config (med_config.json)".into(),
            });
        }
        let cfg: MedConfig = crate::models::config::read_config(path)?;
        cfg.validate(path)?;
        Ok(cfg)
    }

    /// Positive sizes, heads dividing the width, absolute positions, cross-attention on.
    pub fn validate(&self, source: &Path) -> Result<()> {
        check_positive(
            source,
            &[
                ("vocab_size", self.vocab_size),
                ("max_position_embeddings", self.max_position_embeddings),
            ],
        )?;
        self.encoder().validate(source)?;
        if self.position_embedding_type != "absolute" {
            return Err(Error::config(
                source,
                "position_embedding_type",
                format!("only \"absolute\" is supported, got {:?}", self.position_embedding_type),
            ));
        }
        if !self.add_cross_attention {
            return Err(Error::config(
                source,
                "add_cross_attention",
                "ImageReward's text encoder attends to the image: must be true, got false",
            ));
        }
        Ok(())
    }

    /// The sizes shared with CLIP's stacks (width, depth, heads, activation, epsilon), validated
    /// the same way.
    pub fn encoder(&self) -> ClipEncoderConfig {
        ClipEncoderConfig {
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_hidden_layers: self.num_hidden_layers,
            num_attention_heads: self.num_attention_heads,
            hidden_act: self.hidden_act,
            layer_norm_eps: self.layer_norm_eps,
        }
    }

    /// Keys the model does not read (beyond the known inert ones), sorted, for a warning.
    pub fn unknown_keys(&self) -> Vec<String> {
        crate::models::config::unknown_keys(&self.extra)
            .into_iter()
            .filter(|k| !IGNORED_MED_KEYS.contains(&k.as_str()))
            .collect()
    }
}

/// BLIP's `VisionTransformer` sizes (`vit.py`): patch embedding with bias, class token, learned
/// positions, pre-norm blocks (fused qkv with bias, GELU MLP), final LayerNorm.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BlipVisionConfig {
    /// Square input side S (224 for ImageReward).
    pub image_size: usize,
    /// Patch side p (16).
    pub patch_size: usize,
    /// Width D (1024 for ViT-L).
    pub hidden_size: usize,
    /// Number of blocks (24 for ViT-L).
    pub depth: usize,
    /// MLP width (4 D).
    pub intermediate_size: usize,
}

impl BlipVisionConfig {
    /// Reads the sizes from the tensors under `prefix` (e.g. `blip.visual_encoder`): width and
    /// patch from `patch_embed.proj.weight` `[D, 3, p, p]`, the grid from `pos_embed`
    /// `[1, 1 + (S/p)^2, D]`, the depth from the `blocks.N` present, the MLP width from
    /// `blocks.0.mlp.fc1.weight`. Errors name the file and tensor.
    pub fn from_store(store: &TensorStore, prefix: &str) -> Result<Self> {
        let file: PathBuf = store.label().to_path_buf();
        let shape = |name: &str| -> Result<Vec<usize>> {
            let full = format!("{prefix}.{name}");
            store.shape(&full).ok_or(Error::MissingTensor {
                file: file.clone(),
                name: full,
            })
        };
        let mismatch = |name: &str, expected: Vec<usize>, got: Vec<usize>| Error::ShapeMismatch {
            file: file.clone(),
            name: format!("{prefix}.{name}"),
            expected,
            got,
        };
        let patch = shape("patch_embed.proj.weight")?;
        let (hidden_size, patch_size) = match patch[..] {
            [d, 3, p, q] if p == q && d > 0 && p > 0 => (d, p),
            _ => return Err(mismatch("patch_embed.proj.weight", vec![0, 3, 16, 16], patch)),
        };
        let pos = shape("pos_embed")?;
        let grid = match pos[..] {
            [1, n, d] if d == hidden_size && n > 1 => {
                let g = ((n - 1) as f64).sqrt().round() as usize;
                (g * g == n - 1).then_some(g)
            }
            _ => None,
        }
        .ok_or_else(|| mismatch("pos_embed", vec![1, 197, hidden_size], pos.clone()))?;
        let depth = (0..)
            .take_while(|i| store.contains(&format!("{prefix}.blocks.{i}.norm1.weight")))
            .count();
        if depth == 0 {
            return Err(Error::MissingTensor {
                file,
                name: format!("{prefix}.blocks.0.norm1.weight"),
            });
        }
        let fc1 = shape("blocks.0.mlp.fc1.weight")?;
        let intermediate_size = match fc1[..] {
            [m, d] if d == hidden_size && m > 0 => m,
            _ => {
                return Err(mismatch(
                    "blocks.0.mlp.fc1.weight",
                    vec![4 * hidden_size, hidden_size],
                    fc1,
                ))
            }
        };
        let cfg = BlipVisionConfig {
            image_size: grid * patch_size,
            patch_size,
            hidden_size,
            depth,
            intermediate_size,
        };
        check_divides(
            &file,
            ("head width (BLIP's 64)", VIT_HEAD_DIM),
            (&format!("{prefix}.patch_embed.proj.weight width"), hidden_size),
        )?;
        Ok(cfg)
    }

    /// Number of attention heads, width / 64.
    pub fn num_heads(&self) -> usize {
        self.hidden_size / VIT_HEAD_DIM
    }

    /// Patches per side, S / p.
    pub fn grid_size(&self) -> usize {
        self.image_size / self.patch_size
    }

    /// The block stack's sizes, run by [`crate::models::clip::encoder::ClipEncoder`].
    pub fn encoder(&self) -> ClipEncoderConfig {
        ClipEncoderConfig {
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_hidden_layers: self.depth,
            num_attention_heads: self.num_heads(),
            hidden_act: Activation::Gelu,
            layer_norm_eps: VIT_LAYER_NORM_EPS,
        }
    }
}
