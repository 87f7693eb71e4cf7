//! CLIP-similarity rewards: PickScore and CLIPScore (transformers `CLIPModel` checkpoints) and
//! HPSv2 (an open_clip checkpoint). ReNO: `rewards/pickscore.py`, `rewards/clip.py`,
//! `rewards/hps.py`; both features are L2-normalised (`BaseRewardLoss.process_features`).
//!
//! Scores, per image: PickScore and CLIPScore `exp(logit_scale) · cos(img, txt)` (ReNO's
//! CLIPScore is this, not torchmetrics' `max(100 · cos, 0)`; for the LAION ViT-H-14 checkpoint
//! `exp(logit_scale)` is 100), HPSv2 the raw cosine.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;

use candle_core::Tensor;

use super::preprocess::ClipPreprocess;
use super::{l2_normalize, ImageReward, RewardKind};
use crate::models::clip::clip_model::ClipModel;
use crate::text::ClipTokenizer;
use crate::weights::{LoadOptions, VarBuilder};
use crate::{Error, Result};

/// How the cosine becomes the score.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClipScoreScale {
    /// `exp(logit_scale) · cos` (PickScore, CLIPScore).
    LogitScale,
    /// `cos` (HPSv2).
    Cosine,
}

impl ClipScoreScale {
    /// The scale of the CLIP reward `kind`: the raw cosine for HPSv2, else the logit scale.
    pub fn of(kind: RewardKind) -> Self {
        match kind {
            RewardKind::Hpsv2 => ClipScoreScale::Cosine,
            _ => ClipScoreScale::LogitScale,
        }
    }
}

/// A CLIP model, its tokenizer and preprocessing, scoring image-prompt similarity.
pub struct ClipReward {
    kind: RewardKind,
    model: ClipModel,
    tokenizer: ClipTokenizer,
    preprocess: ClipPreprocess,
    vb: VarBuilder,
    /// Normalised text embeddings `[1, P]` by prompt, detached.
    text_cache: Mutex<HashMap<String, Tensor>>,
}

impl ClipReward {
    /// Assembles a reward from its parts; `kind` decides the score's scale
    /// ([`ClipScoreScale::of`]).
    pub fn new(
        kind: RewardKind,
        model: ClipModel,
        tokenizer: ClipTokenizer,
        preprocess: ClipPreprocess,
        vb: VarBuilder,
    ) -> Self {
        ClipReward {
            kind,
            model,
            tokenizer,
            preprocess,
            vb,
            text_cache: Mutex::new(HashMap::new()),
        }
    }

    /// PickScore or CLIPScore from a transformers `CLIPModel` folder: `config.json`,
    /// `model*.safetensors`, the tokenizer files (`tokenizer.json` or `vocab.json` +
    /// `merges.txt`, with `tokenizer_config.json`) and optionally `preprocessor_config.json`
    /// (its `image_mean`/`image_std`; CLIP's otherwise).
    pub fn from_clip_model(kind: RewardKind, dir: &Path, opts: &LoadOptions) -> Result<Self> {
        if !matches!(kind, RewardKind::PickScore | RewardKind::ClipScore) {
            return Err(Error::input(
                "reward",
                format!("{kind} is not a transformers CLIPModel reward (pickscore, clipscore)"),
            ));
        }
        let (model, vb) = ClipModel::from_pretrained(dir, opts)?;
        let tokenizer = ClipTokenizer::from_dir(dir)?;
        let size = model.vision().config().image_size;
        let preprocess = ClipPreprocess::from_preprocessor_config(&dir.join("preprocessor_config.json"), size)?;
        Ok(Self::new(kind, model, tokenizer, preprocess, vb))
    }

    /// HPSv2 from an open_clip folder laid out as the Hub stores open_clip models:
    /// - `open_clip_config.json`: open_clip's model config, bare (`{"embed_dim": 1024,
    ///   "vision_cfg": {...}, "text_cfg": {...}}`, e.g. open_clip's `model_configs/ViT-H-14.json`)
    ///   or wrapped as `{"model_cfg": {...}, "preprocess_cfg": {"mean": [...], "std": [...]}}`
    ///   (the file of `laion/CLIP-ViT-H-14-laion2B-s32B-b79K`); `preprocess_cfg` mean and std
    ///   replace CLIP's when present;
    /// - `open_clip_model.safetensors`: the `state_dict` of `HPS_v2.1_compressed.pt`
    ///   (`torch.load(p)["state_dict"]`, saved with `safetensors.torch.save_file`), open_clip
    ///   names, any float dtype;
    /// - the CLIP tokenizer files (`vocab.json` + `merges.txt` or `tokenizer.json`, optional
    ///   `tokenizer_config.json`), e.g. those of `laion/CLIP-ViT-H-14-laion2B-s32B-b79K`.
    pub fn from_open_clip(dir: &Path, opts: &LoadOptions) -> Result<Self> {
        let (model, cfg, vb) = ClipModel::from_open_clip(dir, opts)?;
        let tokenizer = ClipTokenizer::from_dir(dir)?;
        let mut preprocess = ClipPreprocess::new(cfg.vision_cfg.image_size);
        if let Some(mean) = cfg.image_mean {
            preprocess.image_mean = mean;
        }
        if let Some(std) = cfg.image_std {
            preprocess.image_std = std;
        }
        preprocess.validate(&cfg.source)?;
        Ok(Self::new(RewardKind::Hpsv2, model, tokenizer, preprocess, vb))
    }

    /// The CLIP model.
    pub fn model(&self) -> &ClipModel {
        &self.model
    }

    /// The in-graph preprocessing.
    pub fn preprocess(&self) -> &ClipPreprocess {
        &self.preprocess
    }

    /// The builder the weights came from (its `vars()` when loaded trainable).
    pub fn var_builder(&self) -> &VarBuilder {
        &self.vb
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &ClipTokenizer {
        &self.tokenizer
    }

    /// The normalised text embedding of `prompt`, `[1, P]`, computed once per prompt and
    /// detached.
    pub fn text_embedding(&self, prompt: &str) -> Result<Tensor> {
        if let Some(t) = self.text_cache.lock().expect("text cache lock").get(prompt) {
            return Ok(t.clone());
        }
        let device = self.model.logit_scale().device();
        let ids = self.tokenizer.encode_batch_tensor(&[prompt], device)?;
        let embeds = l2_normalize(&self.model.get_text_features(&ids)?)?.detach();
        self.text_cache
            .lock()
            .expect("text cache lock")
            .insert(prompt.to_string(), embeds.clone());
        Ok(embeds)
    }

    /// The normalised image embeddings `[B, P]` of `images` `[B, 3, H, W]` in [0, 1].
    pub fn image_embedding(&self, images: &Tensor) -> Result<Tensor> {
        let scale = self.model.logit_scale();
        let images = images.to_device(scale.device())?.to_dtype(scale.dtype())?;
        let pixel_values = self.preprocess.forward(&images)?;
        l2_normalize(&self.model.get_image_features(&pixel_values)?)
    }
}

impl ImageReward for ClipReward {
    fn kind(&self) -> RewardKind {
        self.kind
    }

    fn set_gradient_checkpointing(&self, on: bool) {
        self.model.vision().set_gradient_checkpointing(on);
    }

    fn score(&self, images: &Tensor, prompt: &str) -> Result<Tensor> {
        let text = self.text_embedding(prompt)?;
        let image = self.image_embedding(images)?;
        let cos = image.broadcast_mul(&text)?.sum(1)?;
        Ok(match ClipScoreScale::of(self.kind) {
            ClipScoreScale::LogitScale => cos.broadcast_mul(&self.model.logit_scale().exp()?)?,
            ClipScoreScale::Cosine => cos,
        })
    }
}
