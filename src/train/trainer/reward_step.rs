//! The trainer's step for the reward methods (draft, alignprop, refl; see
//! [`crate::train::reward_ft`]): each sample's loss is computed and differentiated on its own,
//! its gradient summed in f64, and the step ends as the preference methods' does
//! ([`Trainer::apply_gradients`]). The prompts come from a prompt file or, for pair data, from
//! the batches' captions (whose preferred images also give ReFL's pre-training loss).

use candle_core::DType;

use super::{TrainOptions, Trainer};
use crate::data::DataFormat;
use crate::recipe::reward_ft::{RewardFtPlan, RewardMethod};
use crate::recipe::Plan;
use crate::reno::WeightedReward;
use crate::reward::load_reward;
use crate::sampling::StableDiffusionPipeline;
use crate::train::records::StepRecord;
use crate::train::reward_ft::{pretrain_loss, PromptList, RewardFt};
use crate::weights::{LoadOptions, VarBuilder};
use crate::{Error, Result};

/// A reward method's run: the method with its rewards, and the prompt file when the data is one.
pub(super) struct RewardRun {
    ft: RewardFt,
    /// `[data] format = "prompts"`: the prompts; `None` takes the pair batches' captions.
    pub(super) prompts: Option<PromptList>,
}

impl RewardRun {
    /// Loads the rewards of `rp` and the prompt file of the recipe's data, if it is one.
    pub(super) fn new(
        plan: &Plan,
        rp: &RewardFtPlan,
        pipe: &StableDiffusionPipeline,
        policy_vb: &VarBuilder,
        opts: &TrainOptions,
    ) -> Result<Self> {
        let r = &plan.raw;
        let load = LoadOptions {
            device: opts.device.clone(),
            ..Default::default()
        };
        let rewards = rp
            .rewards
            .iter()
            .map(|pr| {
                Ok(WeightedReward::new(
                    load_reward(pr.spec.kind, &pr.spec.path, &load)?,
                    pr.weight,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        let vars = if r.lora.is_some() {
            policy_vb.lora_vars()
        } else {
            policy_vb.vars()
        };
        let trainable = vars.iter().map(|(_, v)| v.as_tensor().clone()).collect();
        let ft = RewardFt::new(rp, rewards, pipe, trainable, r.train.seed)?;
        let prompts = match r.data.format {
            DataFormat::Prompts => Some(PromptList::read(&r.data.path, r.train.seed)?),
            _ => None,
        };
        Ok(RewardRun { ft, prompts })
    }
}

impl Trainer {
    /// One optimizer step of a reward method over `grad_accum` micro-batches of `batch_size`
    /// samples on every rank.
    pub(super) fn reward_step(&mut self) -> Result<StepRecord> {
        let t = &self.plan.raw.train;
        let lr = t.lr_schedule.lr(t.lr, self.state.step, t.warmup_steps, t.steps);
        let (grad_accum, batch_size, res) = (t.grad_accum, t.batch_size, t.resolution);
        let samples = (grad_accum * batch_size * self.comm.size()) as f64;
        let mut grads = self.zero_grads()?;
        let scale = self.state.loss_scale;
        let weight = scale.map_or(1.0, |s| s.scale) / samples;
        let (step, rank) = (self.state.step as u64, self.comm.rank() as u64);
        // Sums over this rank's samples: loss, pre-training MSE, non-finite losses.
        let mut sums = [0.0f64; 3];
        let run = self.reward_ft.as_ref().expect("a reward method has its run");
        for micro in 0..grad_accum as u64 {
            let batch = match &mut self.batches {
                Some(b) => Some(
                    b.next_batch(
                        &self.pipe,
                        self.schedule.num_train_timesteps(),
                        &mut self.state,
                        &self.comm,
                    )?
                    .into_pairs()?,
                ),
                None => None,
            };
            let prompts: Vec<String> = match (&batch, &run.prompts) {
                (Some(b), _) => b.captions_w.clone(),
                (None, Some(p)) => (0..batch_size as u64)
                    .map(|i| {
                        let index = ((step * grad_accum as u64 + micro) * self.comm.size() as u64 + rank)
                            * batch_size as u64
                            + i;
                        p.get(index).to_string()
                    })
                    .collect(),
                (None, None) => return Err(Error::input("data", "a reward run has a prompt file or pair data")),
            };
            for (i, prompt) in prompts.iter().enumerate() {
                let key = [step, micro, rank, i as u64];
                let out = run.ft.sample_loss(&self.pipe, &self.policy, prompt, (res, res), &key)?;
                let mut loss = out.loss;
                if let (RewardMethod::Refl { pretrain_weight, .. }, Some(b)) = (run.ft.method(), &batch) {
                    if pretrain_weight > 0.0 {
                        let pair = b.pair(i)?;
                        let cond = crate::train::pair_conditioning(&self.pipe, &pair, self.plan.method)?;
                        let mse = pretrain_loss(&self.policy, &self.schedule, &pair, &cond)?;
                        sums[1] += mse.to_dtype(DType::F64)?.to_scalar::<f64>()?;
                        loss = (loss + (mse * pretrain_weight)?)?;
                    }
                }
                let value = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
                sums[0] += value;
                if !value.is_finite() {
                    sums[2] += 1.0;
                }
                // After a non-finite loss the step is skipped: no gradient is needed.
                if sums[2] > 0.0 {
                    continue;
                }
                let g = (loss * weight)?.backward()?;
                for (acc, p) in grads.iter_mut().zip(&self.opt.params) {
                    if let Some(gi) = g.get(p.var.as_tensor()) {
                        *acc = (&*acc + gi.to_dtype(DType::F64)?)?;
                    }
                }
            }
        }
        self.comm.sum_f64(&mut sums);
        let [loss, mse, nonfinite] = sums.map(|v| v / samples);
        let (grad_norm, skipped) = self.apply_gradients(grads, nonfinite == 0.0, scale, lr)?;
        Ok(StepRecord {
            step: self.state.step,
            loss,
            implicit_acc: None,
            reward_margin: None,
            mse_w: mse,
            mse_l: 0.0,
            ref_mse_w: None,
            ref_mse_l: None,
            lr,
            grad_norm,
            skipped,
            loss_scale: scale.map(|s| s.scale),
            bad_records: Vec::new(),
        })
    }
}
