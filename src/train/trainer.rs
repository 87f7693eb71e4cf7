//! The training loop: the preference loss on the policy UNet against the frozen reference (for a
//! LoRA, the same UNet with its adapters off) over micro-batches (`super::batches`), gradient
//! accumulation, clipping, the recipe's optimizer with f32 master weights, a non-finite guard,
//! checkpoints, validation images, per-step metrics ([`super::records`]) and the final weights
//! and report.
//!
//! Data-parallel runs ([`crate::dist`]): each rank computes its share of every micro-batch
//! ([`super::batches`]); the gradients are summed over the ranks once per optimizer step, after
//! accumulation, so every rank takes the same step; metrics are averaged over the ranks; rank 0
//! alone writes files.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use candle_core::{DType, Device, Tensor};

use super::batches::TrainBatches;
use super::checkpoint::{self, TrainState};
use super::loss_scale::LossScale;
use super::records::{MetricsLog, StepRecord};
use super::report::{write_report, Curve, ImageRow};
use super::resume::{change_event, describe_changes, plan_start, RecipeChange, Resume};
use super::text_lora::TextEncoderLora;
use crate::data::skipped::{self, SkippedRecord};
use crate::data::{LatentCache, Preprocess};
use crate::dist::Comm;
use crate::models::unet::UNet2DConditionModel;
use crate::optim::{clip_grad_norm, Optimizer};
use crate::preference::diffusion::Method;
use crate::recipe::Plan;
use crate::rng::Rng;
use crate::sampling::image_io::save_png;
use crate::sampling::pipeline::PipelineSources;
use crate::sampling::{GenerateRequest, StableDiffusionPipeline};
use crate::schedulers::NoiseSchedule;
use crate::weights::store::write_atomic;
use crate::weights::{layout, save_safetensors, LoadOptions, VarBuilder};
use crate::{Error, Result};

mod piece_loss;
mod reward_step;

/// Run-time choices that are not part of the recipe.
#[derive(Debug, Clone)]
pub struct TrainOptions {
    /// Whether to continue from the newest checkpoint in the output folder.
    pub resume: Resume,
    /// Resume even when the recipe changed in a key that alters the run, recording the change
    /// in `metrics.jsonl`.
    pub allow_recipe_change: bool,
    /// Stop after this many optimizer steps in this invocation (a later `resume` continues).
    pub max_steps_this_run: Option<usize>,
    /// Where to compute.
    pub device: Device,
    /// The Hugging Face cache folder for repo ids.
    pub hub_cache: Option<PathBuf>,
    /// The processes of a data-parallel run ([`Comm::alone`] for one).
    pub comm: Rc<Comm>,
}

/// A training run.
pub struct Trainer {
    plan: Plan,
    pipe: StableDiffusionPipeline,
    policy: UNet2DConditionModel,
    policy_unet_dir: PathBuf,
    opt: Optimizer,
    schedule: NoiseSchedule,
    batches: Option<TrainBatches>,
    /// The reward method's run (draft, alignprop, refl); `None` for a preference method.
    reward_ft: Option<reward_step::RewardRun>,
    metrics: MetricsLog,
    state: TrainState,
    out: PathBuf,
    records: Vec<StepRecord>,
    policy_vb: VarBuilder,
    /// The text encoders' adapters, with `[lora] text_encoder = true`.
    text_lora: Option<TextEncoderLora>,
    /// Every record left out, as listed in `skipped_records.jsonl`.
    skipped: Vec<SkippedRecord>,
    /// How many of the dataset's late skips are already in `skipped`.
    late_seen: usize,
    /// Things the caller should tell the user about how the run started.
    notes: Vec<String>,
    comm: Rc<Comm>,
}

fn mean(t: &Tensor) -> Result<f64> {
    Ok(t.mean_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?)
}

impl Trainer {
    /// Loads the model, the data and (with `resume`) the newest checkpoint; fails before loading
    /// anything when the start `resume` asks for is not possible (see [`super::resume`]).
    pub fn new(plan: Plan, opts: &TrainOptions) -> Result<Self> {
        let r = &plan.raw;
        let comm = opts.comm.clone();
        // Rank 0 removes what an interrupted run left; the others then find the same start.
        let start = comm.rank0_first(|| {
            plan_start(
                &r.output.dir,
                &plan.resolved_toml,
                opts.resume,
                opts.allow_recipe_change,
            )
        })?;
        let root = layout::resolve_model(&r.model.path, opts.hub_cache.as_deref(), r.model.revision.as_deref())?;
        let load = LoadOptions {
            dtype: plan.dtype,
            device: opts.device.clone(),
            variant: r.model.variant.clone(),
            ..Default::default()
        };
        let vae = match &r.model.vae {
            Some(v) => Some(layout::resolve_model(v, opts.hub_cache.as_deref(), None)?),
            None => None,
        };
        let sources = PipelineSources {
            root: root.clone(),
            vae,
            ..Default::default()
        };
        let policy_unet_dir = root.join("unet");
        let (pipe, policy, policy_vb, text_lora) = match &r.lora {
            // LoRA: a fresh adapter (PEFT's gaussian init, B = 0) on the frozen UNet, which is
            // also the pipeline's: the reference is the policy with its adapters off.
            Some(l) => {
                let cfg = crate::weights::lora::LoraConfig {
                    rank: l.rank,
                    alpha: l.alpha.unwrap_or(l.rank as f64),
                    target_modules: l.targets.clone(),
                    init_seed: r.train.seed,
                };
                let source = std::sync::Arc::new(crate::weights::lora::LoraSource::fresh(&cfg));
                let lopts = LoadOptions {
                    lora: Some(source),
                    ..load.without_lora()
                };
                let (policy, vb) = UNet2DConditionModel::from_pretrained(&policy_unet_dir, &lopts)?;
                let mut pipe = StableDiffusionPipeline::load_with_unet(&sources, &load, policy.clone())?;
                let te_cfg = l.text_encoder_config(r.train.seed);
                let text_lora = l
                    .text_encoder
                    .then(|| TextEncoderLora::attach(&mut pipe, &root, &load, &te_cfg))
                    .transpose()?;
                (pipe, policy, vb, text_lora)
            }
            None => {
                let pipe = StableDiffusionPipeline::load(&sources, &load)?;
                let lopts = LoadOptions {
                    trainable: true,
                    ..load.without_lora()
                };
                let (policy, vb) = UNet2DConditionModel::from_pretrained(&policy_unet_dir, &lopts)?;
                (pipe, policy, vb, None)
            }
        };
        let vars = if r.lora.is_some() {
            let mut vars = policy_vb.lora_vars();
            vars.extend(text_lora.iter().flat_map(TextEncoderLora::vars));
            vars
        } else {
            policy_vb.vars()
        };
        policy.set_gradient_checkpointing(r.train.gradient_checkpointing);
        let opt = Optimizer::new(vars, r.train.optimizer_config())?;
        let schedule = NoiseSchedule::from_config(&pipe.scheduler_config)?;
        let out = r.output.dir.clone();
        std::fs::create_dir_all(&out).map_err(|e| Error::io(&out, e))?;
        let reward_ft = match &plan.reward_ft {
            Some(rp) => Some(reward_step::RewardRun::new(&plan, rp, &pipe, &policy_vb, opts)?),
            None => None,
        };
        // A reward method with a prompt file has no pairs to batch.
        let batches = match &reward_ft {
            Some(run) if run.prompts.is_some() => None,
            _ => Some(Self::open_batches(&plan, opts, &sources, &out)?),
        };
        let state = TrainState {
            step: 0,
            epoch: 0,
            position: 0,
            world_size: comm.size(),
            nonfinite_in_a_row: 0,
            loss_scale: (plan.dtype == DType::F16).then(LossScale::new),
        };
        let mut trainer = Trainer {
            metrics: MetricsLog::new(&out),
            batches,
            reward_ft,
            plan,
            pipe,
            policy,
            policy_unet_dir,
            opt,
            schedule,
            state,
            out,
            records: Vec::new(),
            policy_vb,
            text_lora,
            skipped: Vec::new(),
            late_seen: 0,
            notes: Vec::new(),
            comm: comm.clone(),
        };
        comm.rank0_first(|| trainer.begin(&start.checkpoint, &start.changes))?;
        trainer.share_weights()?;
        trainer.notes.extend(start.removed_tmp.iter().map(|p| {
            format!(
                "removed {}, left by a run stopped while writing a checkpoint",
                p.display()
            )
        }));
        Ok(trainer)
    }

    /// The preference pairs (or labelled images) of the recipe's data, batched, with the latent
    /// cache under `out`.
    fn open_batches(plan: &Plan, opts: &TrainOptions, sources: &PipelineSources, out: &Path) -> Result<TrainBatches> {
        let (r, comm) = (&plan.raw, &opts.comm);
        let root = &sources.root;
        let t = &r.train;
        let preprocess = Preprocess {
            resolution: (t.resolution, t.resolution),
            center_crop: t.center_crop,
            random_flip: t.random_flip,
            flip_pair_together: t.flip_pair_together.unwrap_or(plan.method == Method::Mapo),
            empty_caption_prob: t.empty_caption_prob,
        };
        let mut batches = TrainBatches::open(&r.data, preprocess, t.seed, t.batch_size, plan.method)?;
        let data = batches.data();
        if t.cache_latents && t.center_crop {
            let identity = format!(
                "data {} {:?} {} {:?} dual={} ties={} limit={:?}; {} pairs; resolution {}; center crop; vae {}",
                data.fingerprint(),
                r.data.format,
                r.data.path.display(),
                r.data.columns,
                r.data.dual_captions,
                r.data.drop_ties,
                r.data.limit,
                data.len(),
                t.resolution,
                sources.vae.as_ref().unwrap_or(&root.join("vae")).display()
            );
            let cache = comm.rank0_first(|| LatentCache::open(&out.join("latents"), &identity))?;
            batches.set_cache(cache.with_device(opts.device.clone()));
        }
        Ok(batches)
    }

    /// Continues from `checkpoint` (recording allowed recipe `changes` in the metrics) or
    /// clears the metrics of an earlier, checkpoint-less start; writes `recipe.toml` and the
    /// list of skipped records.
    /// Only rank 0 writes.
    fn begin(&mut self, checkpoint: &Option<PathBuf>, changes: &[RecipeChange]) -> Result<()> {
        let skipped_path = self.out.join(skipped::SKIPPED_FILE);
        let main = self.comm.is_main();
        match checkpoint {
            Some(ck) => {
                self.state = checkpoint::load(ck, &mut self.opt)?;
                if self.state.world_size != self.comm.size() {
                    return Err(Error::input(
                        ck.display().to_string(),
                        format!(
                            "written by a run of {} process(es); this run has {}: resume with the same number of processes",
                            self.state.world_size,
                            self.comm.size()
                        ),
                    ));
                }
                // A dtype changed on resume (allowed by `--allow-recipe-change`) starts or ends
                // the loss scaling.
                let f16 = self.plan.dtype == DType::F16;
                self.state.loss_scale = f16.then(|| self.state.loss_scale.unwrap_or_default());
                if main {
                    self.records = self.metrics.read_until(self.state.step)?;
                }
                // Pairs found undecodable before the interruption stay listed.
                self.skipped = skipped::read_skipped(&skipped_path)?;
                if !changes.is_empty() && main {
                    self.metrics
                        .append_line(&change_event(self.state.step, changes).to_string())?;
                    self.notes.push(format!(
                        "recipe changed since the checkpoint at step {} ({}); recorded in {}",
                        self.state.step,
                        describe_changes(changes),
                        self.metrics.path().display()
                    ));
                }
            }
            None if main => self.metrics.clear()?,
            None => {}
        }
        if let Some(b) = &self.batches {
            skipped::merge(&mut self.skipped, b.data().skipped());
        }
        if !main {
            return Ok(());
        }
        skipped::write_skipped(&skipped_path, &self.skipped)?;
        write_atomic(&self.out.join("recipe.toml"), &self.plan.resolved_toml)
    }

    /// Gives every rank rank 0's trainable weights (a no-op for one process).
    fn share_weights(&mut self) -> Result<()> {
        if self.comm.size() == 1 {
            return Ok(());
        }
        let mut masters: Vec<Tensor> = self.opt.params.iter().map(|p| p.master.clone()).collect();
        self.comm.broadcast_tensors(&mut masters)?;
        for (p, m) in self.opt.params.iter_mut().zip(masters) {
            p.var.set(&m.to_dtype(p.var.dtype())?)?;
            p.master = m;
        }
        Ok(())
    }

    /// Notes on how the run started (stale temporary folders removed, an allowed recipe
    /// change), for the caller to show.
    pub fn notes(&self) -> &[String] {
        &self.notes
    }

    /// Every record left out so far, as listed in `skipped_records.jsonl`.
    pub fn skipped_records(&self) -> &[SkippedRecord] {
        &self.skipped
    }

    /// Pairs (labelled images with `[data] unpaired = true`) in use: the usable ones less those
    /// found undecodable so far.
    pub fn pairs_used(&self) -> usize {
        self.batches.as_ref().map_or(0, |b| b.data().len()) - self.late_seen
    }

    /// Lists the records the dataset left out since the last call; returns them.
    fn take_late_skips(&mut self) -> Result<Vec<SkippedRecord>> {
        let Some(batches) = &self.batches else {
            return Ok(Vec::new());
        };
        let new = batches.data().late_skipped(self.late_seen);
        if !new.is_empty() {
            self.late_seen += new.len();
            skipped::merge(&mut self.skipped, &new);
            if self.comm.is_main() {
                skipped::write_skipped(&self.out.join(skipped::SKIPPED_FILE), &self.skipped)?;
            }
        }
        Ok(new)
    }

    fn checkpoint_dir(&self) -> PathBuf {
        self.out.join("checkpoints")
    }

    /// One optimizer step over `grad_accum` micro-batches (of every rank). Each pair's
    /// gradient is computed on its own and summed in f64, so the sum does not depend on how
    /// the pairs are grouped into micro-batches and processes: the same run on any number of
    /// processes takes the same steps, up to the last bit of an f32 in all but rare elements.
    /// KTO, whose reference point is a mean over a batch, is evaluated a micro-batch at a time.
    fn step(&mut self) -> Result<StepRecord> {
        if self.reward_ft.is_some() {
            return self.reward_step();
        }
        let t = &self.plan.raw.train;
        let lr = t.lr_schedule.lr(t.lr, self.state.step, t.warmup_steps, t.steps);
        let grad_accum = t.grad_accum;
        // The step's loss is the mean over every pair of every micro-batch and rank.
        let pairs = (grad_accum * t.batch_size * self.comm.size()) as f64;
        let mut grads = self.zero_grads()?;
        let scale = self.state.loss_scale;
        // Sums over this rank's pairs: loss, accuracy, margin, the four MSEs, non-finite losses.
        let mut sums = [0.0f64; 8];
        for _ in 0..grad_accum {
            let batch = self
                .batches
                .as_mut()
                .expect("a preference method has pairs")
                .next_batch(
                    &self.pipe,
                    self.schedule.num_train_timesteps(),
                    &mut self.state,
                    &self.comm,
                )?;
            for piece in batch.pieces(self.plan.method)? {
                let out = self.piece_loss(&piece)?;
                let (n, m) = (out.n, &out.loss.metrics);
                sums[0] += n * m.loss;
                sums[1] += n * m.implicit_acc.unwrap_or(0.0);
                sums[2] += n * m.reward_margin.unwrap_or(0.0);
                for (sum, mse) in sums[3..7].iter_mut().zip(out.mse) {
                    *sum += n * mse;
                }
                if !m.loss.is_finite() {
                    sums[7] += 1.0;
                }
                // After a non-finite loss the step is skipped: no gradient is needed.
                if sums[7] > 0.0 {
                    continue;
                }
                let weight = n * scale.map_or(1.0, |s| s.scale) / pairs;
                let g = (out.loss.loss * weight)?.backward()?;
                for (acc, p) in grads.iter_mut().zip(&self.opt.params) {
                    if let Some(gi) = g.get(p.var.as_tensor()) {
                        *acc = (&*acc + gi.to_dtype(DType::F64)?)?;
                    }
                }
            }
        }
        // Every rank's sums (a no-op for one process), then the means.
        self.comm.sum_f64(&mut sums);
        let [loss, acc, margin, mw, ml, rw, rl, nonfinite] = sums.map(|v| v / pairs);
        let (grad_norm, skipped) = self.apply_gradients(grads, nonfinite == 0.0, scale, lr)?;
        let dpo = self.plan.objective.needs_reference();
        Ok(StepRecord {
            step: self.state.step,
            loss,
            implicit_acc: dpo.then_some(acc),
            reward_margin: dpo.then_some(margin),
            mse_w: mw,
            mse_l: ml,
            ref_mse_w: dpo.then_some(rw),
            ref_mse_l: dpo.then_some(rl),
            lr,
            grad_norm,
            skipped,
            loss_scale: scale.map(|s| s.scale),
            bad_records: Vec::new(),
        })
    }

    /// Zero f64 gradient accumulators, one per trainable tensor.
    fn zero_grads(&self) -> Result<Vec<Tensor>> {
        Ok(self
            .opt
            .params
            .iter()
            .map(|p| p.master.zeros_like()?.to_dtype(DType::F64))
            .collect::<candle_core::Result<_>>()?)
    }

    /// Ends an optimizer step on this rank's summed gradients `grads` (scaled by `scale` when
    /// loss scaling): sums them over the ranks, unscales, clips and updates at `lr` when `finite`
    /// (every loss of the step was finite) and the norm is finite; counts the step. Returns the
    /// gradient norm before clipping and whether the update was skipped.
    fn apply_gradients(
        &mut self,
        mut grads: Vec<Tensor>,
        finite: bool,
        scale: Option<LossScale>,
        lr: f64,
    ) -> Result<(f64, bool)> {
        let max_grad_norm = self.plan.raw.train.max_grad_norm;
        if finite {
            self.comm.sum_tensors(&mut grads)?;
        }
        let unscale = scale.map_or(1.0, |s| s.inverse());
        let mut grads: Vec<Tensor> = grads
            .iter()
            .map(|g| {
                if finite && unscale != 1.0 {
                    g.affine(unscale, 0.0)?.to_dtype(DType::F32)
                } else {
                    g.to_dtype(DType::F32)
                }
            })
            .collect::<candle_core::Result<_>>()?;
        let max_norm = (max_grad_norm > 0.0).then_some(max_grad_norm);
        let grad_norm = if finite {
            clip_grad_norm(&mut grads, max_norm)?
        } else {
            f64::NAN
        };
        let skipped = !(finite && grad_norm.is_finite());
        if let Some(s) = self.state.loss_scale.as_mut() {
            s.update(!skipped);
        }
        if !skipped {
            self.state.nonfinite_in_a_row = 0;
            let te_lr = self.plan.raw.lora.as_ref().and_then(|l| l.text_encoder_lr);
            let base_lr = self.plan.raw.train.lr;
            self.opt
                .update_scaled(&grads, lr, |p| super::text_lora::lr_factor(te_lr, base_lr, &p.name))?;
        } else if scale.is_none() || !finite {
            // With loss scaling an overflow of the scaled gradients is routine (the scale backs
            // off), so only a non-finite loss counts towards stopping the run.
            self.state.nonfinite_in_a_row += 1;
        }
        self.state.step += 1;
        Ok((grad_norm, skipped))
    }

    /// Runs to the recipe's step count (or `max_steps_this_run`); `on_step` sees each record.
    pub fn run(&mut self, opts: &TrainOptions, on_step: &mut dyn FnMut(&StepRecord, usize)) -> Result<()> {
        let total = self.plan.raw.train.steps;
        let o = self.plan.raw.output.clone();
        let main = self.comm.is_main();
        if self.state.step == 0 && main {
            self.validation_images(0)?;
        }
        let mut done_here = 0;
        while self.state.step < total {
            if opts.max_steps_this_run.is_some_and(|m| done_here >= m) {
                self.save_checkpoint()?;
                return Ok(());
            }
            let mut record = self.step()?;
            record.bad_records = self.take_late_skips()?;
            done_here += 1;
            if main {
                self.metrics.append(&record)?;
            }
            on_step(&record, total);
            self.records.push(record);
            if self.state.nonfinite_in_a_row >= self.plan.raw.train.max_nonfinite_steps {
                self.save_checkpoint()?;
                return Err(Error::input(
                    "training",
                    format!(
                        "{} non-finite steps in a row at step {}; stopped",
                        self.state.nonfinite_in_a_row, self.state.step
                    ),
                ));
            }
            let step = self.state.step;
            if o.checkpoint_every > 0 && step % o.checkpoint_every == 0 && step < total {
                self.save_checkpoint()?;
            }
            if o.validation_every > 0 && step % o.validation_every == 0 && step < total && main {
                self.validation_images(step)?;
            }
        }
        self.save_checkpoint()?;
        if main {
            self.validation_images(total)?;
            self.save_weights()?;
            self.write_report()?;
        }
        Ok(())
    }

    /// Rank 0 writes the checkpoint; every rank waits for it.
    fn save_checkpoint(&mut self) -> Result<()> {
        if self.comm.is_main() {
            checkpoint::save(&self.checkpoint_dir(), &self.opt, &self.state)?;
        }
        self.comm.barrier();
        Ok(())
    }

    fn validation_path(&self, step: usize, prompt: usize, seed: u64) -> PathBuf {
        self.out
            .join("validation")
            .join(format!("step-{step:06}-p{prompt}-s{seed}.png"))
    }

    /// Validation images of the policy at `step`, from the same seeds every time.
    fn validation_images(&self, step: usize) -> Result<()> {
        let o = &self.plan.raw.output;
        let res = self.plan.raw.train.resolution;
        let (lh, lw) = self.pipe.check_size(res, res)?;
        for (pi, prompt) in o.validation_prompts.iter().enumerate() {
            for &seed in &o.validation_seeds {
                let noise = Rng::new(seed).randn((1, self.policy.in_channels(), lh, lw), &Device::Cpu)?;
                let req = GenerateRequest::new(
                    prompt.clone(),
                    noise,
                    seed,
                    o.validation_steps,
                    o.validation_guidance,
                    (res, res),
                );
                let img = self.pipe.generate_with(&self.policy, &req, &mut |_, _| {})?.images;
                save_png(&img.get(0)?, &self.validation_path(step, pi, seed))?;
            }
        }
        Ok(())
    }

    /// The trained weights: a PEFT LoRA (which diffusers' `load_lora_weights` reads) plus a kohya
    /// copy for ComfyUI and A1111, or a diffusers `unet/` folder.
    fn save_weights(&self) -> Result<()> {
        if let Some(l) = &self.plan.raw.lora {
            let adapters = self.policy_vb.lora_adapters();
            let alpha = l.alpha.unwrap_or(l.rank as f64);
            let peft = self.out.join("pytorch_lora_weights.safetensors");
            crate::weights::lora::save_peft(&peft, &adapters, l.rank, alpha, &l.targets)?;
            let kohya = self.out.join("lora_kohya.safetensors");
            if let Some(te) = &self.text_lora {
                return te.save(&peft, &kohya, &adapters, self.policy_vb.kohya_names());
            }
            return crate::weights::lora::save_kohya(&kohya, &adapters, self.policy_vb.kohya_names());
        }
        let dir = self.out.join("unet");
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        let cfg = self.policy_unet_dir.join("config.json");
        std::fs::copy(&cfg, dir.join("config.json")).map_err(|e| Error::io(&cfg, e))?;
        let tensors: HashMap<String, Tensor> = self
            .opt
            .params
            .iter()
            .map(|p| (p.name.clone(), p.master.clone()))
            .collect();
        save_safetensors(&dir.join("diffusion_pytorch_model.safetensors"), &tensors, None)
    }

    fn write_report(&self) -> Result<()> {
        let pts = |f: &dyn Fn(&StepRecord) -> Option<f64>| -> Vec<(f64, f64)> {
            self.records
                .iter()
                .filter_map(|r| f(r).filter(|v| v.is_finite()).map(|v| (r.step as f64, v)))
                .collect()
        };
        let curves = [
            Curve {
                title: "loss",
                points: pts(&|r| Some(r.loss)),
            },
            Curve {
                title: "implicit accuracy",
                points: pts(&|r| r.implicit_acc),
            },
            Curve {
                title: "reward margin",
                points: pts(&|r| r.reward_margin),
            },
            Curve {
                title: "policy MSE, preferred",
                points: pts(&|r| Some(r.mse_w)),
            },
        ];
        let o = &self.plan.raw.output;
        let total = self.plan.raw.train.steps;
        let rel = |p: PathBuf| {
            p.strip_prefix(&self.out)
                .map(Path::to_path_buf)
                .unwrap_or(p)
                .display()
                .to_string()
        };
        let mut rows = Vec::new();
        for (pi, prompt) in o.validation_prompts.iter().enumerate() {
            for &seed in &o.validation_seeds {
                rows.push(ImageRow {
                    prompt: prompt.clone(),
                    seed,
                    before: rel(self.validation_path(0, pi, seed)),
                    after: rel(self.validation_path(total, pi, seed)),
                });
            }
        }
        let summary = format!(
            "recipe: {}\nmethod: {} ({:?})\nsteps: {}\npairs: {} used, {} records skipped (see {})\n",
            self.plan.source.display(),
            self.plan
                .reward_ft
                .as_ref()
                .map_or(self.plan.method.name(), |r| r.method.name()),
            self.plan.objective,
            self.state.step,
            self.pairs_used(),
            self.skipped.len(),
            skipped::SKIPPED_FILE
        );
        write_report(
            &self.out.join("report.html"),
            "diffalign training report",
            &summary,
            &curves,
            &rows,
        )
    }

    /// Steps done so far.
    pub fn step_count(&self) -> usize {
        self.state.step
    }
}
