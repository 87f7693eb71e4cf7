//! CLIP preprocessing inside the autograd graph, as ReNO does it on the generated image
//! (`rewards/utils.py`: torchvision `Resize(S, BICUBIC)`, `CenterCrop(S)`, `Normalize(mean, std)`
//! on a float tensor): images `[B, 3, H, W]` in [0, 1] become `pixel_values` `[B, 3, S, S]`.
//!
//! The resize equals `torch.nn.functional.interpolate(mode="bicubic", antialias=True,
//! align_corners=False)` (what torchvision's tensor `Resize` calls), whose weights come from
//! `_compute_indices_min_size_weights_aa` in ATen's `native/cpu/UpSampleKernel.cpp`: Keys' cubic
//! with a = -0.5, support scaled by the downscale factor, taps cut at the border and renormalised.
//! It is linear, so it is applied as two matmuls `R_h · X · R_wᵀ` with precomputed weight matrices
//! (candle's `upsample_bilinear2d` has no backward); the centre crop keeps rows of `R_h` and `R_w`.
//! Weights are computed with torch's own float32 rounding for every dtype but f64.

use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::models::config::read_config;
use crate::{Error, Result};

/// OpenAI CLIP's per-channel mean, the default of `CLIPImageProcessor` and of ReNO.
pub const CLIP_MEAN: [f64; 3] = [0.48145466, 0.4578275, 0.40821073];
/// OpenAI CLIP's per-channel standard deviation.
pub const CLIP_STD: [f64; 3] = [0.26862954, 0.26130258, 0.27577711];

/// The `[out_size, in_size]` matrix (row-major) of a 1-D antialiased bicubic resize from
/// `in_size` to `out_size` samples, as torch computes it for `align_corners=False` and no explicit
/// scale factor. `single`: reproduce torch's float32 arithmetic (for f32/f16/bf16 tensors);
/// otherwise double precision (f64 tensors). Equal sizes give the identity.
pub fn bicubic_aa_weights(in_size: usize, out_size: usize, single: bool) -> Vec<f64> {
    let r = |x: f64| if single { x as f32 as f64 } else { x };
    let scale = r(in_size as f64 / out_size as f64);
    // interp_size 4 for cubic; the support grows with the downscale factor.
    let support = if scale >= 1.0 { r(2.0 * scale) } else { 2.0 };
    let invscale = if scale >= 1.0 { r(1.0 / scale) } else { 1.0 };
    let max_interp = (support.ceil() as i64) * 2 + 1;
    const A: f64 = -0.5;
    let filter = |x: f64| -> f64 {
        let x = r(x).abs();
        if x < 1.0 {
            r(r(r(r(r((A + 2.0) * x) - (A + 3.0)) * x) * x) + 1.0)
        } else if x < 2.0 {
            r(r(r(r(r(r(A * x) - 5.0 * A) * x) + 8.0 * A) * x) - 4.0 * A)
        } else {
            0.0
        }
    };
    let mut m = vec![0.0; out_size * in_size];
    for i in 0..out_size {
        let center = r(scale * (i as f64 + 0.5));
        // `static_cast<int64_t>` truncates toward zero, as `as` does.
        let xmin = ((r(center - support) + 0.5) as i64).max(0);
        let xmax = ((r(center + support) + 0.5) as i64).min(in_size as i64);
        let xsize = (xmax - xmin).clamp(0, max_interp);
        let w: Vec<f64> = (0..xsize)
            .map(|j| filter((r((j + xmin) as f64 - center) + 0.5) * invscale))
            .collect();
        let total = w.iter().fold(0.0, |t, &x| r(t + x));
        for (j, &wj) in w.iter().enumerate() {
            let v = if total != 0.0 { r(wj / total) } else { wj };
            m[i * in_size + (xmin as usize + j)] = v;
        }
    }
    m
}

/// Output size of torchvision's `Resize(size)` (an int: the shorter side) for an `h x w` input:
/// the shorter side becomes `size`, the longer `int(size * long / short)`. Gives `(h', w')`.
pub fn shorter_side_size(h: usize, w: usize, size: usize) -> (usize, usize) {
    let (short, long) = if w <= h { (w, h) } else { (h, w) };
    let new_long = (size as f64 * long as f64 / short as f64) as usize;
    if w <= h {
        (new_long, size)
    } else {
        (size, new_long)
    }
}

/// Offset of torchvision's `CenterCrop`: `int(round((from - to) / 2))`, Python's round (half to
/// even).
pub fn center_crop_offset(from: usize, to: usize) -> usize {
    ((from - to) as f64 / 2.0).round_ties_even() as usize
}

/// The resize matrix from `in_size` to `resized` samples, keeping the `keep` rows from
/// `offset`, as a `[keep, in_size]` tensor of `dtype`.
fn resize_matrix(
    in_size: usize,
    resized: usize,
    offset: usize,
    keep: usize,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    let full = bicubic_aa_weights(in_size, resized, dtype != DType::F64);
    let rows = full[offset * in_size..(offset + keep) * in_size].to_vec();
    Ok(Tensor::from_vec(rows, (keep, in_size), device)?.to_dtype(dtype)?)
}

fn check_images(images: &Tensor) -> Result<(usize, usize, usize, usize)> {
    let dims = images.dims();
    match *dims {
        [b, c, h, w] if b > 0 && c > 0 && h > 0 && w > 0 => Ok((b, c, h, w)),
        _ => Err(Error::input(
            "images",
            format!("expected a non-empty batch of shape [B, C, H, W], got {dims:?}"),
        )),
    }
}

/// Applies `[H', H]` and `[W', W]` matrices to `xs` `[B, C, H, W]`: `R_h · X · R_wᵀ`, width first
/// as torch does, each skipped when it is `None` (size unchanged).
fn apply_separable(xs: &Tensor, r_h: Option<&Tensor>, r_w: Option<&Tensor>) -> Result<Tensor> {
    let (b, c, h, w) = xs.dims4()?;
    let xs = match r_w {
        Some(r_w) => {
            let w2 = r_w.dim(0)?;
            xs.reshape((b * c * h, w))?.matmul(&r_w.t()?)?.reshape((b, c, h, w2))?
        }
        None => xs.clone(),
    };
    let w2 = xs.dim(3)?;
    Ok(match r_h {
        Some(r_h) => {
            let h2 = r_h.dim(0)?;
            xs.transpose(2, 3)?
                .contiguous()?
                .reshape((b * c * w2, h))?
                .matmul(&r_h.t()?)?
                .reshape((b, c, w2, h2))?
                .transpose(2, 3)?
                .contiguous()?
        }
        None => xs,
    })
}

/// `interpolate(xs, size=(out_h, out_w), mode="bicubic", antialias=True, align_corners=False)`
/// for `xs` `[B, C, H, W]`, differentiable (f32/f64; half types compute in f32).
pub fn resize_bicubic_aa(xs: &Tensor, out_h: usize, out_w: usize) -> Result<Tensor> {
    check_images(xs)?;
    crop_resize(xs, (out_h, out_w), (0, 0), (out_h, out_w))
}

/// Resizes `xs` `[B, C, H, W]` to `resized`, then keeps the window at `offset` of size `keep`.
fn crop_resize(xs: &Tensor, resized: (usize, usize), offset: (usize, usize), keep: (usize, usize)) -> Result<Tensor> {
    let (_, _, h, w) = xs.dims4()?;
    if resized.0 == 0 || resized.1 == 0 || offset.0 + keep.0 > resized.0 || offset.1 + keep.1 > resized.1 {
        return Err(Error::input(
            "resize",
            format!("cannot crop {keep:?} at {offset:?} from {resized:?}"),
        ));
    }
    let dtype = match xs.dtype() {
        DType::F64 => DType::F64,
        _ => DType::F32,
    };
    let x = xs.to_dtype(dtype)?;
    let device = xs.device();
    let r_h = if (h, 0, h) == (resized.0, offset.0, keep.0) {
        None
    } else {
        Some(resize_matrix(h, resized.0, offset.0, keep.0, dtype, device)?)
    };
    let r_w = if (w, 0, w) == (resized.1, offset.1, keep.1) {
        None
    } else {
        Some(resize_matrix(w, resized.1, offset.1, keep.1, dtype, device)?)
    };
    Ok(apply_separable(&x, r_h.as_ref(), r_w.as_ref())?.to_dtype(xs.dtype())?)
}

/// torchvision's `Resize(size)` then `CenterCrop(size)` on a float batch `[B, C, H, W]`:
/// `[B, C, size, size]`, differentiable.
pub fn resize_shorter_and_center_crop(xs: &Tensor, size: usize) -> Result<Tensor> {
    let (_, _, h, w) = check_images(xs)?;
    if size == 0 {
        return Err(Error::input("image_size", "must be > 0, got 0"));
    }
    let (rh, rw) = shorter_side_size(h, w, size);
    let offset = (center_crop_offset(rh, size), center_crop_offset(rw, size));
    crop_resize(xs, (rh, rw), offset, (size, size))
}

/// The reward models' image preprocessing: [`resize_shorter_and_center_crop`] to `image_size`,
/// then `(x - mean) / std` per channel.
#[derive(Debug, Clone, PartialEq)]
pub struct ClipPreprocess {
    /// Side of the square model input (the vision config's `image_size`).
    pub image_size: usize,
    /// Per-channel mean (default [`CLIP_MEAN`]).
    pub image_mean: [f64; 3],
    /// Per-channel standard deviation (default [`CLIP_STD`]).
    pub image_std: [f64; 3],
}

impl ClipPreprocess {
    /// CLIP's mean and std at `image_size`.
    pub fn new(image_size: usize) -> Self {
        ClipPreprocess {
            image_size,
            image_mean: CLIP_MEAN,
            image_std: CLIP_STD,
        }
    }

    /// `image_mean` and `image_std` of a transformers `preprocessor_config.json` when the file
    /// and the keys exist, else CLIP's; the size is the model's `image_size` (the file's
    /// `size`/`crop_size` describe the PIL pipeline of the original checkpoint).
    pub fn from_preprocessor_config(path: &Path, image_size: usize) -> Result<Self> {
        let mut pre = Self::new(image_size);
        if !path.is_file() {
            return Ok(pre);
        }
        let map: serde_json::Map<String, serde_json::Value> = read_config(path)?;
        for (key, slot) in [("image_mean", &mut pre.image_mean), ("image_std", &mut pre.image_std)] {
            if let Some(v) = map.get(key) {
                *slot = serde_json::from_value(v.clone())
                    .map_err(|e| Error::config(path, key, format!("expected three numbers: {e}")))?;
            }
        }
        pre.validate(path)?;
        Ok(pre)
    }

    /// Checks that every standard deviation is positive and finite; `source` names the origin.
    pub fn validate(&self, source: &Path) -> Result<()> {
        if let Some(s) = self.image_std.iter().find(|s| !(s.is_finite() && **s > 0.0)) {
            return Err(Error::config(source, "image_std", format!("must be > 0, got {s}")));
        }
        if let Some(m) = self.image_mean.iter().find(|m| !m.is_finite()) {
            return Err(Error::config(source, "image_mean", format!("must be finite, got {m}")));
        }
        Ok(())
    }

    /// `images` `[B, 3, H, W]` in [0, 1] (any float dtype) to `pixel_values` `[B, 3, S, S]` of
    /// the same dtype, differentiable.
    pub fn forward(&self, images: &Tensor) -> Result<Tensor> {
        let (_, c, _, _) = check_images(images)?;
        if c != 3 {
            return Err(Error::input("images", format!("expected 3 channels (RGB), got {c}")));
        }
        let xs = resize_shorter_and_center_crop(images, self.image_size)?;
        let device = images.device();
        let dtype = images.dtype();
        let mean = Tensor::new(&self.image_mean, device)?
            .to_dtype(dtype)?
            .reshape((1, 3, 1, 1))?;
        let std = Tensor::new(&self.image_std, device)?
            .to_dtype(dtype)?
            .reshape((1, 3, 1, 1))?;
        Ok(xs.broadcast_sub(&mean)?.broadcast_div(&std)?)
    }
}
