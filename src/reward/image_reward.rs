//! ImageReward (Xu et al. 2023, arXiv 2304.05977, <https://github.com/THUDM/ImageReward>
//! `ImageReward/ImageReward.py`; ReNO `rewards/imagereward.py`): BLIP's ViT encodes the image, BLIP's
//! BERT reads the prompt while cross-attending to the image tokens, and an MLP on the `[CLS]`
//! state gives the reward, standardised with the model's published statistics:
//! `(mlp(cls) - 0.16717362830052426) / 1.0333394966054072`.
//!
//! The image goes through the in-graph CLIP preprocessing ([`ClipPreprocess`]: bicubic resize of
//! the shorter side to the ViT's input size, centre crop, CLIP's mean and std), as ReNO feeds
//! ImageReward its generated images. `diffalign score` gives image files the package's own
//! `score(prompt, path)` pipeline instead ([`ImageReward::file_resize`]): Pillow's bicubic resize
//! of the 8-bit image (`crate::data::resize`), centre crop, `/ 255`; at the ViT's size the
//! in-graph preprocessing then only normalises.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use candle_core::{DType, Device, Tensor};

use super::aesthetic::AestheticMlp;
use super::preprocess::ClipPreprocess;
use super::{ImageReward, RewardKind};
use crate::models::blip::{BlipTextEncoder, BlipVisionConfig, BlipVisionTransformer, MedConfig};
use crate::text::wordpiece::BertEncoding;
use crate::text::BertTokenizer;
use crate::weights::{LoadOptions, TensorStore, VarBuilder};
use crate::{Error, Result};

/// The mean of the MLP output that the package subtracts (`ImageReward.mean`).
pub const IMAGE_REWARD_MEAN: f64 = 0.16717362830052426;
/// The standard deviation it divides by (`ImageReward.std`).
pub const IMAGE_REWARD_STD: f64 = 1.0333394966054072;
/// Prompt length in tokens, `[CLS]` and `[SEP]` included (`max_length=35` in the package).
pub const MAX_PROMPT_TOKENS: usize = 35;
/// Checkpoint file names looked for in the folder, in order: a safetensors conversion first.
pub const CHECKPOINT_NAMES: [&str; 2] = ["ImageReward.safetensors", "ImageReward.pt"];

/// Tensors of the official checkpoint that scoring does not use: BLIP's contrastive projections
/// (`blip.vision_proj`, `blip.text_proj`) and the `position_ids` buffer.
fn is_unused_by_scoring(name: &str) -> bool {
    name.starts_with("blip.vision_proj.")
        || name.starts_with("blip.text_proj.")
        || name == "blip.text_encoder.embeddings.position_ids"
}

/// ImageReward: BLIP towers, the WordPiece tokenizer and the MLP head.
pub struct ImageRewardModel {
    visual_encoder: BlipVisionTransformer,
    text_encoder: BlipTextEncoder,
    mlp: AestheticMlp,
    tokenizer: BertTokenizer,
    preprocess: ClipPreprocess,
    dtype: DType,
    device: Device,
    /// Token ids and attention mask `[1, L]` (u32) by prompt.
    prompt_cache: Mutex<HashMap<String, (Tensor, Tensor)>>,
}

impl ImageRewardModel {
    /// Loads a folder holding
    /// - the checkpoint: `ImageReward.safetensors` (e.g. `diffalign convert ImageReward.pt
    ///   ImageReward.safetensors`) or `ImageReward.pt` (the `state_dict` `torch.save` wrote, read
    ///   by the restricted unpickler), any float dtype;
    /// - `med_config.json`: the BERT text encoder's config;
    /// - `vocab.txt`: `bert-base-uncased`'s WordPiece vocabulary.
    ///
    /// The ViT's width, depth, patch and input size come from the checkpoint's shapes (heads =
    /// width / 64), the MLP's widths from its weights. Every tensor must be used except BLIP's
    /// contrastive projections and the `position_ids` buffer.
    pub fn load(dir: &Path, opts: &LoadOptions) -> Result<Self> {
        let file = find_checkpoint(dir)?;
        let med = MedConfig::from_file(&dir.join("med_config.json"))?;
        let tokenizer = BertTokenizer::from_vocab(&dir.join("vocab.txt"), MAX_PROMPT_TOKENS)?;
        if tokenizer.vocab_size() > med.vocab_size {
            return Err(Error::config(
                dir.join("med_config.json"),
                "vocab_size",
                format!(
                    "vocab.txt with [DEC] and [ENC] has {} tokens, more than vocab_size {}",
                    tokenizer.vocab_size(),
                    med.vocab_size
                ),
            ));
        }
        let store = TensorStore::open_file(&file)?;
        let vision = BlipVisionConfig::from_store(&store, "blip.visual_encoder")?;
        let vb = opts.var_builder(store);
        let model = Self::new(&vision, &med, tokenizer, vb.clone())?;
        crate::weights::check_all_used(&vb, is_unused_by_scoring)?;
        Ok(model)
    }

    /// Builds the model from `vb` at the checkpoint root (`blip.visual_encoder`,
    /// `blip.text_encoder`, `mlp.layers`).
    pub fn new(vision: &BlipVisionConfig, med: &MedConfig, tokenizer: BertTokenizer, vb: VarBuilder) -> Result<Self> {
        let blip = vb.pp("blip");
        Ok(ImageRewardModel {
            visual_encoder: BlipVisionTransformer::new(vision, blip.pp("visual_encoder"))?,
            text_encoder: BlipTextEncoder::new(med, vision.hidden_size, blip.pp("text_encoder"))?,
            mlp: AestheticMlp::new(med.hidden_size, vb.pp("mlp"))?,
            tokenizer,
            preprocess: ClipPreprocess::new(vision.image_size),
            dtype: vb.dtype(),
            device: vb.device().clone(),
            prompt_cache: Mutex::new(HashMap::new()),
        })
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &BertTokenizer {
        &self.tokenizer
    }

    /// The in-graph preprocessing.
    pub fn preprocess(&self) -> &ClipPreprocess {
        &self.preprocess
    }

    /// `prompt`'s ids and mask as `[1, L]` u32 tensors, tokenised once per prompt.
    fn prompt_tensors(&self, prompt: &str, device: &Device) -> Result<(Tensor, Tensor)> {
        if let Some(t) = self.prompt_cache.lock().expect("prompt cache lock").get(prompt) {
            return Ok(t.clone());
        }
        let BertEncoding {
            input_ids,
            attention_mask,
        } = self.tokenizer.encode(prompt)?;
        let l = input_ids.len();
        let t = (
            Tensor::from_vec(input_ids, (1, l), device)?,
            Tensor::from_vec(attention_mask, (1, l), device)?,
        );
        self.prompt_cache
            .lock()
            .expect("prompt cache lock")
            .insert(prompt.to_string(), t.clone());
        Ok(t)
    }

    /// The package's `score_gard`: rewards `[B]` of preprocessed `pixel_values` `[B, 3, S, S]`.
    pub fn score_pixels(&self, pixel_values: &Tensor, prompt: &str) -> Result<Tensor> {
        let (input_ids, attention_mask) = self.prompt_tensors(prompt, pixel_values.device())?;
        let image_tokens = self.visual_encoder.forward(pixel_values)?;
        let hidden = self.text_encoder.forward(&input_ids, &attention_mask, &image_tokens)?;
        let cls = hidden.narrow(1, 0, 1)?.squeeze(1)?;
        let raw = self.mlp.forward(&cls)?;
        Ok(raw.affine(1.0 / IMAGE_REWARD_STD, -IMAGE_REWARD_MEAN / IMAGE_REWARD_STD)?)
    }
}

/// The first of [`CHECKPOINT_NAMES`] present in `dir`.
fn find_checkpoint(dir: &Path) -> Result<PathBuf> {
    CHECKPOINT_NAMES
        .iter()
        .map(|name| dir.join(name))
        .find(|p| p.is_file())
        .ok_or_else(|| Error::MissingFile {
            path: dir.to_path_buf(),
            what: format!("the ImageReward checkpoint ({})", CHECKPOINT_NAMES.join(" or ")),
        })
}

impl ImageReward for ImageRewardModel {
    fn kind(&self) -> RewardKind {
        RewardKind::ImageReward
    }

    fn set_gradient_checkpointing(&self, on: bool) {
        self.visual_encoder.set_gradient_checkpointing(on);
    }

    fn file_resize(&self) -> Option<usize> {
        Some(self.preprocess.image_size)
    }

    fn score(&self, images: &Tensor, prompt: &str) -> Result<Tensor> {
        let images = images.to_device(&self.device)?.to_dtype(self.dtype)?;
        let pixel_values = self.preprocess.forward(&images)?;
        self.score_pixels(&pixel_values, prompt)
    }
}
