//! Where a diffusion run's micro-batches come from: the usable pairs in a seeded order per
//! epoch, preprocessing (crops, flips, caption dropout), VAE latents (through the latent cache
//! when it is on), and the run's RNG for those choices and for noise and timesteps.

use candle_core::{DType, Tensor};

use super::checkpoint::TrainState;
use crate::data::{LatentCache, LatentKey, PairDataset, PreferencePair, Preprocess};
use crate::preference::diffusion::{Method, PreferenceBatch};
use crate::rng::Rng;
use crate::sampling::StableDiffusionPipeline;
use crate::{Error, Result};

/// The batch source of a run.
pub(super) struct Batches {
    /// The usable pairs.
    pub(super) data: PairDataset,
    preprocess: Preprocess,
    cache: Option<LatentCache>,
    /// Every random choice of the run (saved in its checkpoints).
    pub(super) rng: Rng,
    seed: u64,
    batch_size: usize,
    method: Method,
}

/// The data order of `epoch`: a permutation of `0..n` fixed by the seed.
fn epoch_order(seed: u64, epoch: usize, n: usize) -> Vec<usize> {
    let mut rng = Rng::new(seed ^ (epoch as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let mut order: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        order.swap(i, j);
    }
    order
}

impl Batches {
    /// Batches of `batch_size` pairs of `data` for `method`, ordered by `seed`.
    pub(super) fn new(
        data: PairDataset,
        preprocess: Preprocess,
        cache: Option<LatentCache>,
        rng: Rng,
        seed: u64,
        batch_size: usize,
        method: Method,
    ) -> Self {
        Batches {
            data,
            preprocess,
            cache,
            rng,
            seed,
            batch_size,
            method,
        }
    }

    /// The next `n` usable pairs in this run's order, with their dataset indices; pairs that
    /// turn out bad are passed over (skip mode) and listed by the dataset.
    fn next_pairs(&mut self, n: usize, state: &mut TrainState) -> Result<Vec<(usize, PreferencePair)>> {
        let len = self.data.len();
        let mut out = Vec::with_capacity(n);
        let mut order = epoch_order(self.seed, state.epoch, len);
        while out.len() < n {
            if state.position >= len {
                state.epoch += 1;
                state.position = 0;
                order = epoch_order(self.seed, state.epoch, len);
            }
            let i = order[state.position];
            state.position += 1;
            if let Some(pair) = self.data.get_or_skip(i)? {
                out.push((i, pair));
            }
        }
        Ok(out)
    }

    /// Encodes one preprocessed image `[3, H, W]` to a latent sample (times the scaling factor).
    fn latent(&mut self, pipe: &StableDiffusionPipeline, image: &Tensor, key: Option<LatentKey>) -> Result<Tensor> {
        let vae = &pipe.vae;
        let device = pipe.device().clone();
        let encode = || -> Result<(Tensor, Tensor)> {
            let d = vae.encode(&image.to_device(&device)?.unsqueeze(0)?.to_dtype(vae.dtype())?)?;
            Ok((
                d.mean.squeeze(0)?.to_dtype(DType::F32)?,
                d.std.squeeze(0)?.to_dtype(DType::F32)?,
            ))
        };
        let (m, s) = match (&self.cache, key) {
            (Some(cache), Some(key)) => cache.get_or_encode(&key, encode)?,
            _ => encode()?,
        };
        let noise = self.rng.randn(m.dims(), m.device())?;
        Ok(((m + (s * noise)?)? * vae.config().scaling_factor)?)
    }

    /// Builds the next micro-batch, advancing the data order in `state`; `num_train_timesteps`
    /// bounds the sampled timesteps.
    pub(super) fn next_batch(
        &mut self,
        pipe: &StableDiffusionPipeline,
        num_train_timesteps: usize,
        state: &mut TrainState,
    ) -> Result<PreferenceBatch> {
        let pairs = self.next_pairs(self.batch_size, state)?;
        let (mut lw, mut ll, mut noise, mut ts, mut soft) = (vec![], vec![], vec![], vec![], vec![]);
        let (mut cw, mut cl) = (vec![], vec![]);
        for (i, pair) in pairs {
            let (img_w, img_l, flip_w, flip_l) = self.preprocess.pair(&pair, &mut self.rng)?;
            let key_w = self.cache.as_ref().map(|_| LatentKey::new(i, true, flip_w));
            let key_l = self.cache.as_ref().map(|_| LatentKey::new(i, false, flip_l));
            let zw = self.latent(pipe, &img_w, key_w)?;
            let zl = self.latent(pipe, &img_l, key_l)?;
            noise.push(self.rng.randn(zw.dims(), zw.device())?);
            ts.push(self.rng.below(num_train_timesteps as u64) as f32);
            let caption_w = self.preprocess.caption(&pair.caption_w, &mut self.rng);
            let caption_l = if self.method == Method::Dcpo {
                pair.caption_l.clone()
            } else {
                caption_w.clone()
            };
            cw.push(caption_w);
            cl.push(caption_l);
            if let Method::Smpo { .. } = self.method {
                let p = pair.soft_label.ok_or_else(|| Error::Record {
                    file: pair.location.file.clone(),
                    index: pair.location.index,
                    reason: "smpo needs a soft label for every pair".into(),
                })?;
                soft.push(p);
            }
            lw.push(zw);
            ll.push(zl);
        }
        let b = cw.len();
        let device = pipe.device().clone();
        Ok(PreferenceBatch {
            latents_w: Tensor::stack(&lw, 0)?,
            latents_l: Tensor::stack(&ll, 0)?,
            noise: Tensor::stack(&noise, 0)?,
            timesteps: Tensor::from_vec(ts, b, &device)?,
            soft_label: if soft.is_empty() {
                None
            } else {
                Some(Tensor::from_vec(soft, b, &device)?)
            },
            time_ids: None,
            captions_w: cw,
            captions_l: cl,
        })
    }
}
