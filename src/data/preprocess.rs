//! Images to training tensors as the official scripts prepare them, and caption dropout.
//!
//! Per image (Diffusion-DPO's `train_transforms`): resize so the image covers the resolution
//! (for a square resolution: shorter side to the resolution, longer side `int(res * long / short)`,
//! as torchvision's `Resize(int)`), with Pillow's antialiased bilinear filter ([`mod@super::resize`]);
//! crop to the resolution, centred (torchvision's `CenterCrop`: offsets `round((H - h) / 2)` with
//! ties to even) or at a uniform random offset; optionally flip horizontally; then
//! `(byte / 255 - 0.5) / 0.5`, so values are in [-1, 1], as `ToTensor` + `Normalize([0.5], [0.5])`.
//!
//! Pairs ([`Preprocess::pair`]): Diffusion-DPO transforms the two images independently (one flip
//! decision and one random crop each). With `flip_pair_together` (MaPO's stacked-pair transform,
//! research notes §2.2) the rejected image is first brought to the preferred image's size (Pillow
//! bicubic, the default of the `image.resize(size)` MaPO calls) and both then share one flip
//! decision and one crop. Deviations from MaPO, all below one byte or a one-column shift: MaPO
//! matches jpg_1 to jpg_0 (file order) where we match the rejected image to the preferred one,
//! resizes the stacked float tensor where we resize bytes, and flips before cropping where we crop
//! before flipping (the two differ only for a centre crop with an odd margin).
//!
//! The RNG is drawn in a fixed order: flip coin(s) first (w, then l when independent), then the
//! crop offsets of w (top, left), then of l; nothing is drawn for a centre crop or without flips.

use candle_core::{Device, Tensor};
use image::RgbImage;

use super::dataset::PreferencePair;
use super::resize::{resize, ResampleFilter};
use crate::rng::Rng;
use crate::{Error, Result};

/// Image and caption preparation settings.
#[derive(Debug, Clone, PartialEq)]
pub struct Preprocess {
    /// Output size `(height, width)` in pixels.
    pub resolution: (usize, usize),
    /// Centre crop (true; the official default) or a uniform random crop.
    pub center_crop: bool,
    /// Random horizontal flips with probability 0.5 (official default: on).
    pub random_flip: bool,
    /// One flip decision and one crop for both images of a pair, the rejected image resized to
    /// the preferred image's size first (MaPO); otherwise independent per image (Diffusion-DPO).
    pub flip_pair_together: bool,
    /// Probability of replacing the caption by "" (official Diffusion-DPO default 0.2; 0 for DCPO).
    pub empty_caption_prob: f64,
}

/// A prepared image with the geometry SDXL's `add_time_ids` need.
#[derive(Debug, Clone)]
pub struct PreparedImage {
    /// f32 `[3, H, W]` in [-1, 1], on the CPU.
    pub pixels: Tensor,
    /// Whether it was flipped horizontally.
    pub flipped: bool,
    /// Size `(height, width)` of the decoded image before resizing.
    pub original_size: (usize, usize),
    /// Size `(height, width)` after resizing, before cropping.
    pub resized_size: (usize, usize),
    /// Crop offsets `(top, left)` in the resized image (before the flip).
    pub crop_top_left: (usize, usize),
}

impl Preprocess {
    fn check(&self) -> Result<()> {
        let (h, w) = self.resolution;
        if h == 0 || w == 0 || h > u32::MAX as usize || w > u32::MAX as usize {
            return Err(Error::input("resolution", format!("must be positive, got {h}x{w}")));
        }
        Ok(())
    }

    /// The size `(height, width)` an `h x w` image is resized to: the smallest that covers the
    /// resolution keeping the aspect ratio, the other side rounded down (torchvision's rule).
    pub fn resized_size(&self, (h, w): (usize, usize)) -> (usize, usize) {
        let (th, tw) = self.resolution;
        if th * w >= tw * h {
            (th, (w * th / h).max(tw))
        } else {
            ((h * tw / w).max(th), tw)
        }
    }

    /// Crop offsets `(top, left)` in an image of size `(h, w)` (>= the resolution).
    fn crop_offsets(&self, (h, w): (usize, usize), rng: &mut Rng) -> (usize, usize) {
        let (dh, dw) = (h - self.resolution.0, w - self.resolution.1);
        if self.center_crop {
            let centre = |d: usize| (d as f64 / 2.0).round_ties_even() as usize;
            (centre(dh), centre(dw))
        } else {
            (rng.below(dh as u64 + 1) as usize, rng.below(dw as u64 + 1) as usize)
        }
    }

    fn resized(&self, img: &RgbImage) -> Result<RgbImage> {
        self.check()?;
        let (h, w) = (img.height() as usize, img.width() as usize);
        if h == 0 || w == 0 {
            return Err(Error::input("image", format!("empty image ({w}x{h})")));
        }
        let (nh, nw) = self.resized_size((h, w));
        Ok(if (nh, nw) == (h, w) {
            img.clone()
        } else {
            resize(img, nw as u32, nh as u32, ResampleFilter::Bilinear)
        })
    }

    /// Crops the resized image at `top_left`, flips, scales to [-1, 1].
    fn finish(
        &self,
        resized: &RgbImage,
        original: &RgbImage,
        top_left: (usize, usize),
        flip: bool,
    ) -> Result<PreparedImage> {
        let (th, tw) = self.resolution;
        let (dy, dx) = top_left;
        let src_w = resized.width() as usize;
        let raw = resized.as_raw();
        let mut data = vec![0f32; 3 * th * tw];
        for y in 0..th {
            let row = (dy + y) * src_w;
            for x in 0..tw {
                let sx = dx + if flip { tw - 1 - x } else { x };
                let p = (row + sx) * 3;
                for c in 0..3 {
                    data[c * th * tw + y * tw + x] = (raw[p + c] as f32 / 255.0 - 0.5) / 0.5;
                }
            }
        }
        Ok(PreparedImage {
            pixels: Tensor::from_vec(data, (3, th, tw), &Device::Cpu)?,
            flipped: flip,
            original_size: (original.height() as usize, original.width() as usize),
            resized_size: (resized.height() as usize, src_w),
            crop_top_left: top_left,
        })
    }

    /// `img` resized, cropped (random offsets from `rng`), flipped if `flip`, with its geometry.
    pub fn prepare(&self, img: &RgbImage, rng: &mut Rng, flip: bool) -> Result<PreparedImage> {
        let resized = self.resized(img)?;
        let top_left = self.crop_offsets((resized.height() as usize, resized.width() as usize), rng);
        self.finish(&resized, img, top_left, flip)
    }

    /// `img` as f32 `[3, H, W]` in [-1, 1] on the CPU: resized, cropped (random offsets from
    /// `rng` unless `center_crop`), flipped horizontally if `flip` (the caller decides; see
    /// [`Self::pair`] for the random rule).
    pub fn image(&self, img: &RgbImage, rng: &mut Rng, flip: bool) -> Result<Tensor> {
        Ok(self.prepare(img, rng, flip)?.pixels)
    }

    /// The caption, or "" with probability `empty_caption_prob` (one uniform draw when > 0).
    pub fn caption(&self, caption: &str, rng: &mut Rng) -> String {
        if self.empty_caption_prob > 0.0 && rng.uniform() < self.empty_caption_prob {
            String::new()
        } else {
            caption.to_string()
        }
    }

    fn coin(&self, rng: &mut Rng) -> bool {
        self.random_flip && rng.uniform() < 0.5
    }

    /// Both images of a pair with the flip rule, with their geometry: `(w, l)`.
    pub fn prepare_pair(&self, pair: &PreferencePair, rng: &mut Rng) -> Result<(PreparedImage, PreparedImage)> {
        if !self.flip_pair_together {
            let flip_w = self.coin(rng);
            let flip_l = self.coin(rng);
            let w = self.prepare(&pair.image_w, rng, flip_w)?;
            let l = self.prepare(&pair.image_l, rng, flip_l)?;
            return Ok((w, l));
        }
        let flip = self.coin(rng);
        let resized_w = self.resized(&pair.image_w)?;
        let matched;
        let image_l = if pair.image_l.dimensions() == pair.image_w.dimensions() {
            &pair.image_l
        } else {
            matched = resize(
                &pair.image_l,
                pair.image_w.width(),
                pair.image_w.height(),
                ResampleFilter::Bicubic,
            );
            &matched
        };
        let resized_l = self.resized(image_l)?;
        let top_left = self.crop_offsets((resized_w.height() as usize, resized_w.width() as usize), rng);
        let w = self.finish(&resized_w, &pair.image_w, top_left, flip)?;
        let mut l = self.finish(&resized_l, image_l, top_left, flip)?;
        l.original_size = (pair.image_l.height() as usize, pair.image_l.width() as usize);
        Ok((w, l))
    }

    /// One image with a random flip (when `random_flip`) drawn before its crop, as each image
    /// of a pair: `(pixels, flipped)`, f32 `[3, H, W]` in [-1, 1] on the CPU.
    pub fn single(&self, img: &RgbImage, rng: &mut Rng) -> Result<(Tensor, bool)> {
        let flip = self.coin(rng);
        Ok((self.image(img, rng, flip)?, flip))
    }

    /// Both images of a pair with the flip rule: `(w, l, flipped_w, flipped_l)`, each f32
    /// `[3, H, W]` in [-1, 1] on the CPU.
    pub fn pair(&self, pair: &PreferencePair, rng: &mut Rng) -> Result<(Tensor, Tensor, bool, bool)> {
        let (w, l) = self.prepare_pair(pair, rng)?;
        Ok((w.pixels, l.pixels, w.flipped, l.flipped))
    }
}
