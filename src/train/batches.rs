//! Where a diffusion run's micro-batches come from: the usable records (preference pairs, or
//! labelled images with `[data] unpaired = true`) in a seeded order per epoch, split between
//! the ranks of a data-parallel run, preprocessing (crops, flips, caption dropout), VAE latents
//! (through the latent cache when it is on), and each record's random draws for those choices
//! and for noise and timesteps.
//!
//! A micro-batch of the run is `batch_size × world size` records in the data order; rank `r`
//! takes the `r`-th `batch_size` of them. Every draw of a record comes from an RNG keyed by the
//! run's seed and the record's place in the data order (epoch, position), so a run computes
//! the same global batches whatever the number of processes. Pairs and labelled images share
//! the walk, the bad-record handling and the latents ([`Batches`] over [`Records`]); only how
//! a record becomes part of a batch differs.

use std::collections::HashMap;

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use super::checkpoint::TrainState;
use crate::data::{DataSpec, LatentCache, LatentKey, Listing, PairDataset, Preprocess, Records, UnpairedDataset};
use crate::dist::Comm;
use crate::preference::diffusion::{Method, PreferenceBatch};
use crate::preference::diffusion_kto::LabelledBatch;
use crate::rng::Rng;
use crate::sampling::StableDiffusionPipeline;
use crate::{Error, Result};

/// The batch source of a run over records of `D`.
pub(super) struct Batches<D> {
    /// The usable records.
    data: D,
    preprocess: Preprocess,
    cache: Option<LatentCache>,
    seed: u64,
    batch_size: usize,
    method: Method,
}

/// A record's place in the run: its epoch, its position in that epoch's order, its dataset index.
#[derive(Debug, Clone, Copy)]
struct Slot {
    epoch: usize,
    position: usize,
    index: usize,
}

/// A record found bad on some rank, as the ranks tell each other.
#[derive(Serialize, Deserialize)]
struct BadRecord {
    index: usize,
    reason: String,
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

impl<D: Records> Batches<D>
where
    D::Record: Clone,
{
    /// Batches of `batch_size` records of `data` for `method`, ordered by `seed`, without a
    /// latent cache.
    fn new(data: D, preprocess: Preprocess, seed: u64, batch_size: usize, method: Method) -> Self {
        Batches {
            data,
            preprocess,
            cache: None,
            seed,
            batch_size,
            method,
        }
    }

    /// The next `n` records in the data order from `(epoch, position)` that are not known to be
    /// bad, and the place after the last one.
    fn walk(&self, mut epoch: usize, mut position: usize, n: usize) -> (Vec<Slot>, (usize, usize)) {
        let len = self.data.len();
        let mut order = epoch_order(self.seed, epoch, len);
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            if position >= len {
                epoch += 1;
                position = 0;
                order = epoch_order(self.seed, epoch, len);
            }
            let index = order[position];
            if !self.data.is_skipped(index) {
                out.push(Slot { epoch, position, index });
            }
            position += 1;
        }
        (out, (epoch, position))
    }

    /// This rank's records of the next global micro-batch, decoded, advancing the data order in
    /// `state`. A record found bad (skip mode) on any rank is left out on every rank and the
    /// micro-batch is chosen again, so all ranks agree on it, as one process would.
    fn next_records(&mut self, state: &mut TrainState, comm: &Comm) -> Result<Vec<(Slot, D::Record)>> {
        let mine = comm.rank() * self.batch_size..(comm.rank() + 1) * self.batch_size;
        let mut decoded: HashMap<usize, D::Record> = HashMap::new();
        loop {
            let (slots, next) = self.walk(state.epoch, state.position, self.batch_size * comm.size());
            let mut bad = Vec::new();
            for slot in &slots[mine.clone()] {
                if decoded.contains_key(&slot.index) || bad.iter().any(|b: &BadRecord| b.index == slot.index) {
                    continue;
                }
                match self.data.try_get(slot.index)? {
                    Ok(record) => {
                        decoded.insert(slot.index, record);
                    }
                    Err(reason) => bad.push(BadRecord {
                        index: slot.index,
                        reason,
                    }),
                }
            }
            let found: Vec<BadRecord> = comm.all_gather(&bad)?.into_iter().flatten().collect();
            if found.is_empty() {
                (state.epoch, state.position) = next;
                return Ok(slots[mine].iter().map(|s| (*s, decoded[&s.index].clone())).collect());
            }
            // In rank order, which is the data order: the list matches one process's.
            for b in found {
                self.data.skip(b.index, b.reason)?;
            }
        }
    }

    /// Encodes one preprocessed image `[3, H, W]` to a latent sample (times the scaling factor).
    fn latent(
        &self,
        pipe: &StableDiffusionPipeline,
        image: &Tensor,
        key: Option<LatentKey>,
        rng: &mut Rng,
    ) -> Result<Tensor> {
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
        let noise = rng.randn(m.dims(), m.device())?;
        Ok(((m + (s * noise)?)? * vae.config().scaling_factor)?)
    }

    /// A record's diffusion noise (shaped as its latent `z`) and timestep in
    /// `0..num_train_timesteps`, drawn in that order after its latents.
    fn noise_and_timestep(&self, z: &Tensor, num_train_timesteps: usize, rng: &mut Rng) -> Result<(Tensor, f32)> {
        let noise = rng.randn(z.dims(), z.device())?;
        Ok((noise, rng.below(num_train_timesteps as u64) as f32))
    }
}

impl Batches<PairDataset> {
    /// Builds this rank's part of the next micro-batch, advancing the data order in `state`;
    /// `num_train_timesteps` bounds the sampled timesteps.
    pub(super) fn next_batch(
        &mut self,
        pipe: &StableDiffusionPipeline,
        num_train_timesteps: usize,
        state: &mut TrainState,
        comm: &Comm,
    ) -> Result<PreferenceBatch> {
        let pairs = self.next_records(state, comm)?;
        let (mut lw, mut ll, mut noise, mut ts, mut soft) = (vec![], vec![], vec![], vec![], vec![]);
        let (mut cw, mut cl) = (vec![], vec![]);
        for (slot, pair) in pairs {
            let mut rng = Rng::keyed(self.seed, &[slot.epoch as u64, slot.position as u64]);
            let (img_w, img_l, flip_w, flip_l) = self.preprocess.pair(&pair, &mut rng)?;
            let i = slot.index;
            let key_w = self.cache.as_ref().map(|_| LatentKey::new(i, true, flip_w));
            let key_l = self.cache.as_ref().map(|_| LatentKey::new(i, false, flip_l));
            let zw = self.latent(pipe, &img_w, key_w, &mut rng)?;
            let zl = self.latent(pipe, &img_l, key_l, &mut rng)?;
            let (n, t) = self.noise_and_timestep(&zw, num_train_timesteps, &mut rng)?;
            noise.push(n);
            ts.push(t);
            let caption_w = self.preprocess.caption(&pair.caption_w, &mut rng);
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

impl Batches<UnpairedDataset> {
    /// Builds this rank's part of the next micro-batch of labelled images, advancing the data
    /// order in `state`; `num_train_timesteps` bounds the sampled timesteps. Each image draws,
    /// from its own RNG, its flip, crop, latent sample, noise, timestep and caption dropout.
    /// NPO learns the opposite preference: its labels are swapped.
    pub(super) fn next_batch(
        &mut self,
        pipe: &StableDiffusionPipeline,
        num_train_timesteps: usize,
        state: &mut TrainState,
        comm: &Comm,
    ) -> Result<LabelledBatch> {
        let images = self.next_records(state, comm)?;
        let swap = self.method == Method::Npo;
        let (mut latents, mut noise, mut ts, mut labels, mut captions) = (vec![], vec![], vec![], vec![], vec![]);
        for (slot, image) in images {
            let mut rng = Rng::keyed(self.seed, &[slot.epoch as u64, slot.position as u64]);
            let (pixels, flip) = self.preprocess.single(&image.image, &mut rng)?;
            let key = self
                .cache
                .as_ref()
                .map(|_| LatentKey::new(slot.index, image.desirable, flip));
            let z = self.latent(pipe, &pixels, key, &mut rng)?;
            let (n, t) = self.noise_and_timestep(&z, num_train_timesteps, &mut rng)?;
            noise.push(n);
            ts.push(t);
            captions.push(self.preprocess.caption(&image.caption, &mut rng));
            labels.push(image.desirable != swap);
            latents.push(z);
        }
        let b = labels.len();
        Ok(LabelledBatch {
            latents: Tensor::stack(&latents, 0)?,
            noise: Tensor::stack(&noise, 0)?,
            timesteps: Tensor::from_vec(ts, b, pipe.device())?,
            labels,
            time_ids: None,
            captions,
        })
    }
}

/// A run's batch source: pairs, or labelled images (`[data] unpaired = true`).
pub(super) enum TrainBatches {
    /// Preference pairs.
    Pairs(Box<Batches<PairDataset>>),
    /// Single images labelled desirable or undesirable.
    Images(Box<Batches<UnpairedDataset>>),
}

/// One micro-batch (or a piece of one) of either kind.
pub(super) enum Batch {
    /// Preference pairs.
    Pairs(PreferenceBatch),
    /// Labelled images.
    Images(LabelledBatch),
}

impl TrainBatches {
    /// The recipe's data batched: labelled images with `[data] unpaired = true`, else pairs;
    /// fails when no record is usable.
    pub(super) fn open(
        spec: &DataSpec,
        preprocess: Preprocess,
        seed: u64,
        batch_size: usize,
        method: Method,
    ) -> Result<Self> {
        Ok(if spec.unpaired {
            let data = UnpairedDataset::open(spec)?;
            data.ensure_usable()?;
            TrainBatches::Images(Box::new(Batches::new(data, preprocess, seed, batch_size, method)))
        } else {
            let data = PairDataset::open(spec)?;
            data.ensure_usable()?;
            TrainBatches::Pairs(Box::new(Batches::new(data, preprocess, seed, batch_size, method)))
        })
    }

    /// Encodes latents through `cache` from now on.
    pub(super) fn set_cache(&mut self, cache: LatentCache) {
        match self {
            TrainBatches::Pairs(b) => b.cache = Some(cache),
            TrainBatches::Images(b) => b.cache = Some(cache),
        }
    }

    /// The dataset's records and those left out.
    pub(super) fn data(&self) -> &dyn Listing {
        match self {
            TrainBatches::Pairs(b) => &b.data,
            TrainBatches::Images(b) => &b.data,
        }
    }

    /// This rank's part of the next micro-batch, advancing the data order in `state`.
    pub(super) fn next_batch(
        &mut self,
        pipe: &StableDiffusionPipeline,
        num_train_timesteps: usize,
        state: &mut TrainState,
        comm: &Comm,
    ) -> Result<Batch> {
        Ok(match self {
            TrainBatches::Pairs(b) => Batch::Pairs(b.next_batch(pipe, num_train_timesteps, state, comm)?),
            TrainBatches::Images(b) => Batch::Images(b.next_batch(pipe, num_train_timesteps, state, comm)?),
        })
    }
}

impl Batch {
    /// The parts whose losses are computed and differentiated on their own: each pair, except
    /// that KTO, whose reference point is a mean over the micro-batch, is evaluated whole (as
    /// are labelled images, which only KTO reads).
    pub(super) fn pieces(self, method: Method) -> Result<Vec<Batch>> {
        match self {
            Batch::Pairs(b) if method != Method::Kto => (0..b.len()).map(|i| Ok(Batch::Pairs(b.pair(i)?))).collect(),
            whole => Ok(vec![whole]),
        }
    }

    /// The pairs; an error for labelled images.
    pub(super) fn into_pairs(self) -> Result<PreferenceBatch> {
        match self {
            Batch::Pairs(b) => Ok(b),
            Batch::Images(_) => Err(Error::input(
                "data",
                "this method reads pairs, not labelled images (unpaired)",
            )),
        }
    }
}
