//! The demo on the embedded shapes-world model: sample preference pairs from the base model,
//! label them with the ground-truth rater (Bradley-Terry noise), align the model with DPO, DCPO,
//! MaPO and SmPO, run ReNO with the learned shapes reward plus a pair head fitted on the labelled
//! pairs, and judge every result against the base model on held-out prompts with the same seeds,
//! by the ground-truth rater.
//!
//! Honesty rules: prompts are split once (every fifth of a fixed shuffle is held out); the
//! rater only labels training pairs (with DCPO-c it also names what a rejected image shows, as a
//! captioner would); the pair head sees only those pairs; evaluation images of base and aligned
//! models share their seeds.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use super::{preference_probability, rate, Prompt};
use crate::eval::{mean, WinRate};
use crate::models::unet::UNet2DConditionModel;
use crate::rng::Rng;
use crate::sampling::image_io::save_png;
use crate::sampling::pipeline::{PipelineSources, StableDiffusionPipeline};
use crate::sampling::GenerateRequest;
use crate::schedulers::SchedulerKind;
use crate::weights::LoadOptions;
use crate::{Error, Result};

/// The preference methods the demo trains (KTO on the pairs split into labelled images).
pub const METHODS: [&str; 5] = ["dpo", "dcpo", "mapo", "smpo", "kto"];

/// The demo row of the DPO model guided by an NPO model trained on the same pairs (Diffusion-NPO).
pub const DPO_NPO: &str = "dpo+npo";

/// How much the demo does.
#[derive(Debug, Clone)]
pub struct DemoConfig {
    /// Pairs sampled per training prompt.
    pub pairs_per_prompt: usize,
    /// Training prompts used (all when larger than the split).
    pub train_prompts: usize,
    /// Held-out prompts evaluated.
    pub eval_prompts: usize,
    /// Seeds per held-out prompt.
    pub eval_seeds: u64,
    /// Optimizer steps per method.
    pub train_steps: usize,
    /// Pairs per training step.
    pub batch_size: usize,
    /// Learning rate of the aligned UNet.
    pub lr: f64,
    /// DDIM steps of every generation (ReNO backpropagates through them).
    pub steps: usize,
    /// Classifier-free guidance.
    pub guidance: f64,
    /// ReNO iterations per held-out image.
    pub reno_iters: usize,
    /// Temperature of the Bradley-Terry labelling noise.
    pub temperature: f64,
    /// Per-method beta overrides (by method name); the defaults are in [`method_recipe`].
    pub betas: std::collections::BTreeMap<String, f64>,
    /// How DCPO's caption of each rejected image is made.
    pub dcpo_caption: DcpoCaption,
    /// SmPO's ReNoise inversion steps (0: forward noising, the smoothed loss alone).
    pub inversion_steps: usize,
    /// ReNO's weight on the pair head fitted on the labelled pairs (0: CLIP score alone).
    pub head_weight: f64,
    /// The run's seed: it moves every random draw (pair noise, labels, captions, training,
    /// evaluation noise); the prompt split stays.
    pub seed: u64,
    /// Where the models run.
    pub device: Device,
}

impl DemoConfig {
    /// The full demo (about four and a half minutes on two cores).
    pub fn full() -> Self {
        DemoConfig {
            pairs_per_prompt: 3,
            train_prompts: usize::MAX,
            eval_prompts: usize::MAX,
            eval_seeds: 6,
            train_steps: 240,
            batch_size: 8,
            lr: 3e-5,
            steps: 8,
            guidance: 3.0,
            reno_iters: 2,
            temperature: 0.05,
            betas: Default::default(),
            dcpo_caption: DcpoCaption::Perturbed,
            // SmPO's smoothed loss with forward noising: its ReNoise inversion makes this model
            // worse at every step count tried (README).
            inversion_steps: 0,
            head_weight: 10.0,
            seed: 0,
            device: Device::Cpu,
        }
    }

    /// A quick pass through every phase (under three minutes).
    pub fn quick() -> Self {
        DemoConfig {
            pairs_per_prompt: 1,
            train_prompts: 8,
            eval_prompts: 3,
            eval_seeds: 2,
            train_steps: 3,
            batch_size: 4,
            steps: 4,
            reno_iters: 2,
            ..Self::full()
        }
    }
}

/// How DCPO's second caption, the rejected image's, is made: the paper's three variants, with
/// the world's captioner ([`caption_of`]) and its caption generator ([`Prompt::perturbed`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DcpoCaption {
    /// DCPO-c: what the captioner says the rejected image shows.
    Captioned,
    /// DCPO-p: the prompt with one attribute changed.
    Perturbed,
    /// DCPO-h: the captioner's caption of the rejected image with one attribute changed.
    Hybrid,
}

impl std::str::FromStr for DcpoCaption {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let names = [
            ("captioned", DcpoCaption::Captioned),
            ("perturbed", DcpoCaption::Perturbed),
            ("hybrid", DcpoCaption::Hybrid),
        ];
        crate::error::one_of("--dcpo-caption", s, &names)
    }
}

/// Training and held-out prompts: the world's prompts in a fixed shuffled order (seed 5), every
/// fifth one held out, so that held-out prompts cover every shape, colour and background.
pub fn split_prompts() -> (Vec<Prompt>, Vec<Prompt>) {
    let mut all = Prompt::all();
    let mut rng = Rng::new(5);
    for i in (1..all.len()).rev() {
        all.swap(i, rng.below(i as u64 + 1) as usize);
    }
    let (mut train, mut held) = (Vec::new(), Vec::new());
    for (i, p) in all.into_iter().enumerate() {
        if i % 5 == 4 {
            held.push(p);
        } else {
            train.push(p);
        }
    }
    (train, held)
}

/// The demo's generator: one pipeline, DDIM with fixed steps and guidance.
pub struct Generator {
    /// The base pipeline.
    pub pipe: StableDiffusionPipeline,
    steps: usize,
    guidance: f64,
}

impl Generator {
    /// Loads the pipeline folder `dir`.
    pub fn load(dir: &Path, cfg: &DemoConfig) -> Result<Self> {
        let sources = PipelineSources {
            root: dir.to_path_buf(),
            ..Default::default()
        };
        let opts = LoadOptions {
            device: cfg.device.clone(),
            ..Default::default()
        };
        Ok(Generator {
            pipe: StableDiffusionPipeline::load(&sources, &opts)?,
            steps: cfg.steps,
            guidance: cfg.guidance,
        })
    }

    /// The noise of `seed`.
    pub fn noise(&self, seed: u64) -> Result<Tensor> {
        let (h, w) = self.latent_size();
        // Drawn on the CPU whatever the device, so that a seed gives the same noise everywhere.
        Ok(Rng::new(seed)
            .randn((1, self.pipe.unet.in_channels(), h, w), &Device::Cpu)?
            .to_device(self.pipe.device())?)
    }

    /// The latent size of the model's images.
    pub fn latent_size(&self) -> (usize, usize) {
        self.pipe.unet.sample_size().unwrap_or((8, 8))
    }

    /// The image `[H, W, 3]` in [0, 1] of `prompt` from `noise` with `unet`.
    pub fn generate(&self, unet: &UNet2DConditionModel, prompt: &Prompt, noise: &Tensor, seed: u64) -> Result<Tensor> {
        self.generate_guided(unet, None, prompt, noise, seed)
    }

    /// [`Self::generate`] with Diffusion-NPO's `negative` model in guidance's negative branch.
    pub fn generate_guided(
        &self,
        unet: &UNet2DConditionModel,
        negative: Option<&UNet2DConditionModel>,
        prompt: &Prompt,
        noise: &Tensor,
        seed: u64,
    ) -> Result<Tensor> {
        let f = self.pipe.vae_scale_factor();
        let (h, w) = (noise.dim(2)? * f, noise.dim(3)? * f);
        let req = GenerateRequest {
            scheduler: Some(SchedulerKind::Ddim),
            ..GenerateRequest::new(
                prompt.to_string(),
                noise.clone(),
                seed,
                self.steps,
                self.guidance,
                (h, w),
            )
        };
        Ok(self
            .pipe
            .generate_npo(unet, negative, &req, &mut |_, _| {})?
            .images
            .get(0)?)
    }
}

/// The values of an image `[H, W, 3]` as the rater reads them, with `(H, W)`.
fn pixels(image: &Tensor) -> Result<(Vec<f32>, usize, usize)> {
    let (h, w, _) = image.dims3()?;
    Ok((image.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?, h, w))
}

/// The rater's score of an image `[H, W, 3]` for `prompt`.
pub fn true_reward(image: &Tensor, prompt: &Prompt) -> Result<f64> {
    let (data, h, w) = pixels(image)?;
    Ok(rate(&data, h, w, prompt)?.score)
}

/// The prompt of the world that best describes `image` by the rater: the world's captioner.
pub fn caption_of(image: &Tensor) -> Result<Prompt> {
    let (data, h, w) = pixels(image)?;
    let mut best: Option<(f64, Prompt)> = None;
    for p in Prompt::all() {
        let s = rate(&data, h, w, &p)?.score;
        if best.is_none_or(|b| s > b.0) {
            best = Some((s, p));
        }
    }
    Ok(best.expect("the world has prompts").1)
}

/// Samples and labels preference pairs into `dir` (`pairs.jsonl` and PNGs): two seeds per pair,
/// the label drawn from `sigmoid((r_a − r_b) / T)`, `soft_label` that probability for the
/// chosen image, `caption_rejected` DCPO's caption of the rejected image (see [`DcpoCaption`]).
/// Also labels every image on its own for Diffusion-KTO ([`PER_IMAGE_LABELS`]): desirable with
/// probability `sigmoid((r − m) / T)`, the rater against the median image `m` of its prompt with
/// the same Bradley-Terry noise. Returns the pairs file.
pub fn sample_pairs(
    gen: &Generator,
    prompts: &[Prompt],
    cfg: &DemoConfig,
    dir: &Path,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let mut rng = Rng::new(1234 + cfg.seed);
    // Its own stream, so that every DCPO variant sees the same labels.
    let mut caption_rng = Rng::new(4321 + cfg.seed);
    // Pair noise seeds start at 100,000 and take 1,000,000 per run seed, clear of evaluation's.
    let base = 100_000 + 1_000_000 * cfg.seed;
    let total = prompts.len() * cfg.pairs_per_prompt;
    let mut lines = String::new();
    let mut singles: Vec<(String, String, f64)> = Vec::with_capacity(2 * total);
    for (i, prompt) in prompts
        .iter()
        .flat_map(|p| std::iter::repeat_n(p, cfg.pairs_per_prompt))
        .enumerate()
    {
        let seeds = [base + 2 * i as u64, base + 1 + 2 * i as u64];
        let mut images = Vec::with_capacity(2);
        for (k, &seed) in seeds.iter().enumerate() {
            let image = gen.generate(&gen.pipe.unet, prompt, &gen.noise(seed)?, seed)?;
            let name = format!("{i:04}-{k}.png");
            save_png(&image, &dir.join(&name))?;
            let reward = true_reward(&image, prompt)?;
            singles.push((name.clone(), prompt.to_string(), reward));
            images.push((name, reward, image));
        }
        let p_a = preference_probability(images[0].1, images[1].1, cfg.temperature);
        let a_wins = rng.uniform() < p_a;
        let (w, l, p) = if a_wins { (0, 1, p_a) } else { (1, 0, 1.0 - p_a) };
        let line = serde_json::json!({
            "prompt": prompt.to_string(),
            "chosen": images[w].0,
            "rejected": images[l].0,
            "caption_chosen": prompt.to_string(),
            "caption_rejected": match cfg.dcpo_caption {
                DcpoCaption::Captioned => caption_of(&images[l].2)?,
                DcpoCaption::Perturbed => prompt.perturbed(&mut caption_rng),
                DcpoCaption::Hybrid => caption_of(&images[l].2)?.perturbed(&mut caption_rng),
            }
            .to_string(),
            "soft_label": p,
        });
        lines.push_str(&line.to_string());
        lines.push('\n');
        progress(i + 1, total);
    }
    let path = dir.join("pairs.jsonl");
    std::fs::write(&path, lines).map_err(|e| Error::io(&path, e))?;
    write_image_labels(&singles, cfg, &dir.join(PER_IMAGE_LABELS))?;
    Ok(path)
}

/// The file beside `pairs.jsonl` with one labelled image a line (`{"image", "prompt", "label"}`).
pub const PER_IMAGE_LABELS: &str = "labels.jsonl";

/// Labels each `(image, prompt, true reward)` against the median reward of its prompt's images
/// (a thumbs-up for an image better than the prompt usually gets, not for an easy prompt) with
/// Bradley-Terry noise (its own random stream, so the pairs' labels do not move), into `path`.
fn write_image_labels(images: &[(String, String, f64)], cfg: &DemoConfig, path: &Path) -> Result<()> {
    let mut by_prompt: HashMap<&str, Vec<f64>> = HashMap::new();
    for (_, prompt, reward) in images {
        by_prompt.entry(prompt).or_default().push(*reward);
    }
    let medians: HashMap<&str, f64> = by_prompt
        .into_iter()
        .map(|(p, mut r)| {
            r.sort_by(f64::total_cmp);
            // The mean of the middle two for an even count, so that half fall on each side.
            let m = (r[(r.len() - 1) / 2] + r[r.len() / 2]) / 2.0;
            (p, m)
        })
        .collect();
    let mut rng = Rng::new(5678 + cfg.seed);
    let mut lines = String::new();
    for (image, prompt, reward) in images {
        let median = medians[prompt.as_str()];
        let desirable = rng.uniform() < preference_probability(*reward, median, cfg.temperature);
        let line = serde_json::json!({"image": image, "prompt": prompt, "label": desirable});
        lines.push_str(&line.to_string());
        lines.push('\n');
    }
    std::fs::write(path, lines).map_err(|e| Error::io(path, e))
}

/// The pair head fitted for ReNO: where it was saved and how it did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PairHeadReport {
    /// The reward folder (`clip/` and the head), loadable as `pairhead=DIR`.
    pub dir: PathBuf,
    /// Pairs it was fitted on.
    pub pairs: usize,
    /// Agreement with the labels of the pairs held out of a first fit (every fifth).
    pub held_out_accuracy: f64,
    /// Agreement with the labels of all pairs after the final fit on all of them.
    pub train_accuracy: f64,
}

/// Fits a Bradley-Terry pair head ([`crate::reward::pair_head`]) on the patch tokens of the
/// reward CLIP at `clip_dir` from the labelled pairs of `pairs_file` (their images and soft
/// labels; nothing else of the rater), and saves it with a copy of the CLIP into `out`.
pub fn fit_demo_pair_head(pairs_file: &Path, clip_dir: &Path, out: &Path, cfg: &DemoConfig) -> Result<PairHeadReport> {
    use crate::reward::pair_head::{fit_pair_head, load_clip_tower, patch_features, PairHeadFit, PairHeadReward};
    let opts = LoadOptions {
        device: cfg.device.clone(),
        ..Default::default()
    };
    let (clip, preprocess) = load_clip_tower(clip_dir, &opts)?;
    let dir = pairs_file.parent().unwrap_or(Path::new("."));
    let text = std::fs::read_to_string(pairs_file).map_err(|e| Error::io(pairs_file, e))?;
    let (mut chosen, mut rejected, mut soft) = (Vec::new(), Vec::new(), Vec::new());
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line)
            .map_err(|e| Error::input(pairs_file.display().to_string(), format!("line {}: {e}", i + 1)))?;
        let field = |k: &str| {
            v.get(k)
                .ok_or_else(|| Error::input(pairs_file.display().to_string(), format!("line {}: no {k:?}", i + 1)))
        };
        let image = |k: &str| -> Result<Tensor> {
            let name = field(k)?.as_str().unwrap_or_default();
            Ok(crate::sampling::image_io::load_image(&dir.join(name))?.permute((2, 0, 1))?)
        };
        chosen.push(image("chosen")?);
        rejected.push(image("rejected")?);
        soft.push(field("soft_label")?.as_f64().unwrap_or(1.0));
    }
    let features = |images: &[Tensor]| -> Result<Tensor> {
        let parts = images
            .chunks(32)
            .map(|c| {
                let batch = Tensor::stack(c, 0)?.to_device(&cfg.device)?;
                Ok(patch_features(&clip, &preprocess, &batch)?.detach())
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Tensor::cat(&parts, 0)?)
    };
    let (f_w, f_l) = (features(&chosen)?, features(&rejected)?);
    let fit = PairHeadFit::default();
    // The pairs `idx`: their features on both sides and their soft labels.
    let select = |idx: &[usize]| -> Result<(Tensor, Tensor, Vec<f64>)> {
        let t = Tensor::from_vec(
            idx.iter().map(|&i| i as u32).collect::<Vec<_>>(),
            idx.len(),
            f_w.device(),
        )?;
        Ok((
            f_w.index_select(&t, 0)?,
            f_l.index_select(&t, 0)?,
            idx.iter().map(|&i| soft[i]).collect(),
        ))
    };
    // How often the head with weight `w` agrees with the labels of the pairs `idx`.
    let accuracy = |w: &Tensor, idx: &[usize]| -> Result<f64> {
        let (a, b, s) = select(idx)?;
        let z: Vec<f32> = (a - b)?.broadcast_mul(w)?.sum(1)?.to_vec1()?;
        let agree = z.iter().zip(&s).filter(|(&z, &p)| (z > 0.0) == (p >= 0.5)).count();
        Ok(agree as f64 / idx.len().max(1) as f64)
    };
    let n = soft.len();
    let (held, kept): (Vec<usize>, Vec<usize>) = (0..n).partition(|i| i % 5 == 4);
    let (a, b, s) = select(&kept)?;
    let held_out_accuracy = if held.is_empty() {
        f64::NAN
    } else {
        accuracy(&fit_pair_head(&a, &b, &s, &fit)?.0, &held)?
    };
    let (weight, bias) = fit_pair_head(&f_w, &f_l, &soft, &fit)?;
    let all: Vec<usize> = (0..n).collect();
    let train_accuracy = accuracy(&weight, &all)?;
    let clip_out = out.join("clip");
    std::fs::create_dir_all(&clip_out).map_err(|e| Error::io(&clip_out, e))?;
    for name in ["config.json", "model.safetensors", "preprocessor_config.json"] {
        let from = clip_dir.join(name);
        if from.is_file() {
            std::fs::copy(&from, clip_out.join(name)).map_err(|e| Error::io(&from, e))?;
        }
    }
    PairHeadReward::save_head(&weight, &bias, out)?;
    Ok(PairHeadReport {
        dir: out.to_path_buf(),
        pairs: n,
        held_out_accuracy,
        train_accuracy,
    })
}

/// The recipe that aligns the pipeline at `model` with `method` on `pairs`, into `out`.
pub fn method_recipe(method: &str, model: &Path, pairs: &Path, out: &Path, cfg: &DemoConfig) -> toml::Table {
    // Measured on the embedded model (README): a smaller beta lets SmPO shrink the shapes, a
    // larger one lets MaPO's margin term undo its gains; DCPO-p wins at 1000 to 5000.
    let beta = cfg.betas.get(method).copied().unwrap_or(match method {
        "mapo" => 0.02,
        "smpo" => 200.0,
        "dcpo" => 2000.0,
        // Diffusion-KTO's beta multiplies the whole MSE difference, DPO's half of it.
        "kto" => 500.0,
        _ => 1000.0,
    });
    let path = |p: &Path| toml::Value::from(p.display().to_string());
    let count = |n: usize| toml::Value::from(n as i64);
    toml::Table::from_iter(
        [
            ("model", table([("path", path(model))])),
            (
                "data",
                if method == "kto" {
                    // Diffusion-KTO learns from the images labelled one at a time (a batch of
                    // twice the pairs' size below: the same images a step).
                    let labels = pairs.with_file_name(PER_IMAGE_LABELS);
                    table([
                        ("format", "jsonl".into()),
                        ("path", path(&labels)),
                        ("unpaired", true.into()),
                    ])
                } else {
                    table([
                        ("format", "jsonl".into()),
                        ("path", path(pairs)),
                        ("dual_captions", (method == "dcpo").into()),
                    ])
                },
            ),
            (
                "train",
                table([
                    ("method", method.into()),
                    ("beta", beta.into()),
                    ("steps", count(cfg.train_steps)),
                    (
                        "batch_size",
                        count(cfg.batch_size * if method == "kto" { 2 } else { 1 }),
                    ),
                    ("lr", cfg.lr.into()),
                    ("resolution", count(32)),
                    ("random_flip", false.into()),
                    ("seed", toml::Value::from(cfg.seed as i64)),
                    ("inversion_steps", count(cfg.inversion_steps)),
                ]),
            ),
            ("output", table([("dir", path(out))])),
        ]
        .map(|(k, v)| (k.to_string(), v)),
    )
}

/// Diffusion-NPO's negative model for the fine-tuned UNet folder `tuned`, as the official code
/// builds it for a DPO model (`gen.py`, `merge_weight = 0`): the fine-tuned weights plus the NPO
/// offset `npo - base` learned from the base model, written as a UNet folder at `out`.
pub fn npo_negative_unet(tuned: &Path, npo: &Path, base: &Path, out: &Path) -> Result<()> {
    use crate::weights::layout::open_weights;
    const STEM: &str = "diffusion_pytorch_model";
    let open = |dir: &Path| open_weights(dir, STEM, None);
    let merged =
        crate::weights::offset::add_offset(&open(tuned)?, &open(npo)?, &open(base)?, 1.0, DType::F32, &Device::Cpu)?;
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let config = tuned.join("config.json");
    std::fs::copy(&config, out.join("config.json")).map_err(|e| Error::io(&config, e))?;
    crate::weights::save_safetensors(&out.join(format!("{STEM}.safetensors")), &merged, None)
}

/// A TOML table of `entries`.
fn table<const N: usize>(entries: [(&str, toml::Value); N]) -> toml::Value {
    toml::Value::Table(entries.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
}

/// One method's judgement against the base model.
#[derive(Debug, Clone, serde::Serialize)]
pub struct MethodResult {
    /// Win rate of the method over the base model by the rater.
    pub win_rate: f64,
    /// Its 95% Wilson interval.
    pub ci95: [f64; 2],
    /// Pairs compared.
    pub n: usize,
    /// The method's mean rater score.
    pub true_reward: f64,
    /// The base model's mean rater score on the same prompts and seeds.
    pub base_true_reward: f64,
    /// `dpo+npo` only: the win rate over the `dpo` images of the same cases.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub win_rate_vs_dpo: Option<f64>,
    /// `dpo+npo` only: its 95% Wilson interval.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ci95_vs_dpo: Option<[f64; 2]>,
}

impl MethodResult {
    /// From paired rater scores.
    pub fn from_scores(base: &[f64], tuned: &[f64]) -> Result<Self> {
        let w = WinRate::from_scores(base, tuned).ok_or_else(|| Error::input("scores", "no pairs to compare"))?;
        Ok(MethodResult {
            win_rate: w.rate,
            ci95: [w.low, w.high],
            n: w.n,
            true_reward: mean(tuned),
            base_true_reward: mean(base),
            win_rate_vs_dpo: None,
            ci95_vs_dpo: None,
        })
    }

    /// [`Self::from_scores`] with the win rate over the `dpo` scores of the same cases.
    pub fn with_dpo(base: &[f64], dpo: &[f64], tuned: &[f64]) -> Result<Self> {
        let w = WinRate::from_scores(dpo, tuned).ok_or_else(|| Error::input("scores", "no pairs to compare"))?;
        Ok(MethodResult {
            win_rate_vs_dpo: Some(w.rate),
            ci95_vs_dpo: Some([w.low, w.high]),
            ..Self::from_scores(base, tuned)?
        })
    }
}

/// Gallery entries: `path` (relative), `prompt`, `method`, `seed`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct GalleryImage {
    /// Relative to the demo folder.
    pub path: String,
    /// The caption.
    pub prompt: String,
    /// `base` or a method.
    pub method: String,
    /// The seed of its noise.
    pub seed: u64,
}

/// The held-out evaluation cases: `(prompt, seed)`, seeds `1000·run seed + 0..eval_seeds`.
pub fn eval_cases(held_out: &[Prompt], cfg: &DemoConfig) -> Vec<(Prompt, u64)> {
    held_out
        .iter()
        .take(cfg.eval_prompts)
        .flat_map(|p| (0..cfg.eval_seeds).map(move |s| (*p, 1000 * cfg.seed + s)))
        .collect()
}

/// Per-method rater scores by case, for the page.
pub type Scores = HashMap<String, Vec<f64>>;
