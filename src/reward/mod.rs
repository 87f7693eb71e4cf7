//! Differentiable image reward models behind one [`ImageReward`] trait, for ReNO (Eyring et al.
//! 2024, arXiv 2406.04312, <https://github.com/ExplainableML/ReNO> `rewards/*.py`) and for scoring.
//!
//! Every reward maps images `[B, 3, H, W]` in [0, 1] and a prompt to scores `[B]`, with a
//! gradient to the images: the CLIP preprocessing runs in the graph ([`preprocess`]). Kinds and
//! the checkpoint folder each expects ([`load_reward`]):
//!
//! | kind | score | folder |
//! |---|---|---|
//! | `pickscore` | `exp(logit_scale) · cos(img, txt)` | transformers `CLIPModel` + tokenizer (`yuvalkirstain/PickScore_v1` with the `laion/CLIP-ViT-H-14-laion2B-s32B-b79K` tokenizer files) |
//! | `clipscore` | `exp(logit_scale) · cos(img, txt)` (ReNO's CLIPScore) | transformers `CLIPModel` + tokenizer (`laion/CLIP-ViT-H-14-laion2B-s32B-b79K`) |
//! | `hpsv2` | `cos(img, txt)` | open_clip layout, see [`clip_reward::ClipReward::from_open_clip`] |
//! | `aesthetic` | LAION aesthetic predictor v2 on normalised CLIP ViT-L/14 image embeddings | see [`aesthetic::AestheticReward::load`] |
//! | `pairhead` | a linear Bradley-Terry head on a CLIP image tower's patch tokens, fitted on labelled pairs | see [`pair_head::PairHeadReward::load`] |
//! | `imagereward` | `(mlp(cls) − mean) / std` of BLIP's BERT cross-attending to its ViT | `ImageReward.pt` (or `.safetensors`), `med_config.json`, `vocab.txt`, see [`image_reward::ImageRewardModel::load`] |
//!
//! [`RewardKind::reno_loss`] is the one table of ReNO's per-reward losses and default weights.

pub mod aesthetic;
pub mod clip_reward;
pub mod image_reward;
pub mod pair_head;
pub mod preprocess;

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use candle_core::Tensor;

use crate::weights::LoadOptions;
use crate::{Error, Result};

pub use aesthetic::AestheticReward;
pub use clip_reward::ClipReward;
pub use image_reward::ImageRewardModel;
pub use pair_head::PairHeadReward;
pub use preprocess::ClipPreprocess;

/// Which reward model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RewardKind {
    /// PickScore (Kirstain et al. 2023): a CLIP-H/14 fine-tuned on Pick-a-Pic preferences.
    PickScore,
    /// CLIPScore as ReNO computes it: LAION CLIP-H/14, `exp(logit_scale) · cos` (≈ 100 · cos).
    ClipScore,
    /// HPSv2 / HPSv2.1 (Wu et al. 2023): an open_clip ViT-H-14, raw cosine.
    Hpsv2,
    /// The LAION aesthetic predictor v2 (an MLP on CLIP ViT-L/14 image embeddings).
    Aesthetic,
    /// ImageReward (Xu et al. 2023): BLIP's BERT cross-attending to its ViT, an MLP head.
    ImageReward,
    /// A Bradley-Terry head on CLIP patch tokens fitted on labelled pairs ([`pair_head`]).
    PairHead,
}

/// ReNO's loss for one reward: `weight · (offset − score)` per image (lower is better), or with
/// `centred` the log-sigmoid-centred transform of Wang et al. 2024 (arXiv 2402.00742):
/// `−weight · logsigmoid(score − r_ref)`. Summed over rewards, the centred losses are the
/// negative log-probability that the image is better than the reference on every reward.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RenoLoss {
    /// The constant the score is subtracted from.
    pub offset: f64,
    /// ReNO's default weight (`arguments.py`).
    pub weight: f64,
    /// The reference reward `r_ref` of the centred form, `None` for ReNO's linear loss.
    pub centred: Option<f64>,
}

impl RenoLoss {
    /// The loss, elementwise, in the score's dtype.
    pub fn apply(&self, score: &Tensor) -> Result<Tensor> {
        match self.centred {
            None => Ok(score.affine(-self.weight, self.weight * self.offset)?),
            Some(r_ref) => {
                Ok(crate::preference::transform::log_sigmoid_centered(score, r_ref)?.affine(-self.weight, 0.0)?)
            }
        }
    }
}

impl RewardKind {
    /// Every kind, in the order of the table in the module docs.
    pub const ALL: [RewardKind; 6] = [
        RewardKind::PickScore,
        RewardKind::ClipScore,
        RewardKind::Hpsv2,
        RewardKind::Aesthetic,
        RewardKind::ImageReward,
        RewardKind::PairHead,
    ];

    /// The name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            RewardKind::PickScore => "pickscore",
            RewardKind::ClipScore => "clipscore",
            RewardKind::Hpsv2 => "hpsv2",
            RewardKind::Aesthetic => "aesthetic",
            RewardKind::ImageReward => "imagereward",
            RewardKind::PairHead => "pairhead",
        }
    }

    /// ReNO's loss for this reward (`rewards/*.py` `compute_loss`, weights from `arguments.py`):
    ///
    /// | kind | loss | default weight |
    /// |---|---|---|
    /// | hpsv2 | 1 − score | 5.0 |
    /// | imagereward | 2 − score | 1.0 |
    /// | clipscore | 100 − score | 0.01 |
    /// | pickscore | 30 − score | 0.05 |
    /// | aesthetic | 10 − score | 0.0 (ReNO disables it by default; pass your own weight) |
    /// | pairhead | −score (a Bradley-Terry logit) | 1.0 (ours; not in ReNO) |
    pub fn reno_loss(self) -> RenoLoss {
        let (offset, weight) = match self {
            RewardKind::Hpsv2 => (1.0, 5.0),
            RewardKind::ImageReward => (2.0, 1.0),
            RewardKind::ClipScore => (100.0, 0.01),
            RewardKind::PickScore => (30.0, 0.05),
            RewardKind::Aesthetic => (10.0, 0.0),
            RewardKind::PairHead => (0.0, 1.0),
        };
        RenoLoss {
            offset,
            weight,
            centred: None,
        }
    }
}

impl fmt::Display for RewardKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for RewardKind {
    type Err = Error;

    /// Parses a kind name (case-insensitive); an unknown name lists the known ones.
    fn from_str(s: &str) -> Result<Self> {
        let lower = s.to_ascii_lowercase();
        RewardKind::ALL.into_iter().find(|k| k.name() == lower).ok_or_else(|| {
            let names: Vec<&str> = RewardKind::ALL.iter().map(|k| k.name()).collect();
            Error::input(
                "reward",
                format!("unknown reward kind {s:?}; expected one of {}", names.join(", ")),
            )
        })
    }
}

/// A reward kind and its checkpoint folder, as the CLI takes it: `KIND=PATH`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RewardSpec {
    /// The reward.
    pub kind: RewardKind,
    /// Its folder.
    pub path: PathBuf,
}

impl FromStr for RewardSpec {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let (kind, path) = s.split_once('=').ok_or_else(|| {
            Error::input(
                "--reward",
                format!("expected KIND=PATH (e.g. pickscore=/models/PickScore_v1), got {s:?}"),
            )
        })?;
        let kind = kind.trim().parse()?;
        if path.is_empty() {
            return Err(Error::input(
                "--reward",
                format!("{kind}: empty checkpoint path in {s:?}"),
            ));
        }
        Ok(RewardSpec {
            kind,
            path: PathBuf::from(path),
        })
    }
}

/// A differentiable image reward.
pub trait ImageReward: Send + Sync {
    /// Which reward this is.
    fn kind(&self) -> RewardKind;

    /// Scores `images` `[B, 3, H, W]` (values in [0, 1], any size: they are resized and
    /// cropped in the graph) for `prompt`: `[B]`, in the model's dtype, differentiable with
    /// respect to `images`. Text-side results are cached per prompt and carry no gradient.
    fn score(&self, images: &Tensor, prompt: &str) -> Result<Tensor>;

    /// The side to which the reward's own package resizes an image file (Pillow's bicubic on the
    /// 8-bit image, shorter side) and centre-crops it before scoring, where that differs from the
    /// in-graph preprocessing: ImageReward's `score(prompt, path)` (224). `None` (the default):
    /// files are scored as tensors.
    fn file_resize(&self) -> Option<usize> {
        None
    }

    /// Turns activation recomputation by layer on or off in the image tower (see
    /// [`crate::nn::checkpoint`]).
    fn set_gradient_checkpointing(&self, on: bool);

    /// ReNO's loss for `score` `[B]` with ReNO's default weight ([`RewardKind::reno_loss`]): `[B]`.
    fn loss(&self, score: &Tensor) -> Result<Tensor> {
        self.kind().reno_loss().apply(score)
    }
}

/// Loads the reward `kind` from its folder `path` (see the module docs for each layout).
pub fn load_reward(kind: RewardKind, path: &Path, opts: &LoadOptions) -> Result<Box<dyn ImageReward>> {
    if !path.is_dir() {
        return Err(Error::MissingFile {
            path: path.to_path_buf(),
            what: format!("{kind} reward model folder"),
        });
    }
    Ok(match kind {
        RewardKind::PickScore | RewardKind::ClipScore => Box::new(ClipReward::from_clip_model(kind, path, opts)?),
        RewardKind::Hpsv2 => Box::new(ClipReward::from_open_clip(path, opts)?),
        RewardKind::Aesthetic => Box::new(AestheticReward::load(path, opts)?),
        RewardKind::PairHead => Box::new(PairHeadReward::load(path, opts)?),
        RewardKind::ImageReward => Box::new(ImageRewardModel::load(path, opts)?),
    })
}

pub use crate::nn::l2_normalize;
