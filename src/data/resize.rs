//! Image resampling that reproduces Pillow's `Image.resize` on RGB images (Pillow's
//! `libImaging/Resample.c`): a separable convolution whose filter widens with the downscale factor
//! (antialiasing), horizontal pass first, 8-bit fixed-point coefficients (22 fractional bits) and
//! rounding to bytes after each pass. torchvision's `Resize` on PIL images calls exactly this, so
//! the training transforms of the official Diffusion-DPO, MaPO and DCPO scripts see the same
//! bytes as ours.

use image::RgbImage;

/// A resampling filter, as Pillow defines it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResampleFilter {
    /// `Image.BILINEAR`: the triangle filter, support 1 (torchvision `InterpolationMode.BILINEAR`).
    Bilinear,
    /// `Image.BICUBIC`: Keys' cubic with a = -0.5, support 2 (Pillow's default for `resize`).
    Bicubic,
}

impl ResampleFilter {
    fn support(self) -> f64 {
        match self {
            ResampleFilter::Bilinear => 1.0,
            ResampleFilter::Bicubic => 2.0,
        }
    }

    fn weight(self, x: f64) -> f64 {
        let x = x.abs();
        match self {
            ResampleFilter::Bilinear => {
                if x < 1.0 {
                    1.0 - x
                } else {
                    0.0
                }
            }
            ResampleFilter::Bicubic => {
                const A: f64 = -0.5;
                if x < 1.0 {
                    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * A
                } else {
                    0.0
                }
            }
        }
    }
}

const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Per output position: the first input index, the number of taps, and fixed-point weights.
struct Coeffs {
    ksize: usize,
    bounds: Vec<(usize, usize)>,
    weights: Vec<i64>,
}

/// Pillow's `precompute_coeffs` followed by `normalize_coeffs_8bpc`, for the box `[0, in_size)`.
fn coeffs(in_size: usize, out_size: usize, filter: ResampleFilter) -> Coeffs {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = filter.support() * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let mut bounds = Vec::with_capacity(out_size);
    let mut weights = vec![0i64; out_size * ksize];
    let mut k = vec![0f64; ksize];
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        let ss = 1.0 / filterscale;
        // C's (int) truncates toward zero; negative values are clamped to 0 anyway.
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64).max(xmin as i64) as usize;
        let n = (xmax - xmin).min(ksize);
        let mut total = 0.0;
        for (x, kx) in k.iter_mut().enumerate().take(n) {
            *kx = filter.weight(((x + xmin) as f64 - center + 0.5) * ss);
            total += *kx;
        }
        for (x, &kx) in k.iter().enumerate().take(n) {
            let w = if total != 0.0 { kx / total } else { kx };
            let fixed = w * (1u64 << PRECISION_BITS) as f64;
            weights[xx * ksize + x] = if w < 0.0 {
                (fixed - 0.5) as i64
            } else {
                (fixed + 0.5) as i64
            };
        }
        bounds.push((xmin, n));
    }
    Coeffs { ksize, bounds, weights }
}

#[inline]
fn clip8(acc: i64) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// One pass over an interleaved RGB buffer of `lines` lines: `along_x` resamples within each row
/// (`src` is `lines x in_len`), otherwise within each column (`src` is `in_len x lines`).
fn pass(src: &[u8], lines: usize, in_len: usize, out_len: usize, filter: ResampleFilter, along_x: bool) -> Vec<u8> {
    let c = coeffs(in_len, out_len, filter);
    let mut out = vec![0u8; lines * out_len * 3];
    let half = 1i64 << (PRECISION_BITS - 1);
    for line in 0..lines {
        for (o, &(start, n)) in c.bounds.iter().enumerate() {
            let w = &c.weights[o * c.ksize..o * c.ksize + n];
            let mut acc = [half; 3];
            for (t, &wt) in w.iter().enumerate() {
                let i = start + t;
                let p = if along_x {
                    (line * in_len + i) * 3
                } else {
                    (i * lines + line) * 3
                };
                for ch in 0..3 {
                    acc[ch] += src[p + ch] as i64 * wt;
                }
            }
            let q = if along_x {
                (line * out_len + o) * 3
            } else {
                (o * lines + line) * 3
            };
            for ch in 0..3 {
                out[q + ch] = clip8(acc[ch]);
            }
        }
    }
    out
}

/// `img` resized to `width x height` as Pillow's `img.resize((width, height), filter)` does.
/// Both sizes must be > 0 (the caller checks); an unchanged size returns a copy.
pub fn resize(img: &RgbImage, width: u32, height: u32, filter: ResampleFilter) -> RgbImage {
    let (w0, h0) = (img.width() as usize, img.height() as usize);
    let (w1, h1) = (width as usize, height as usize);
    let mut buf = img.as_raw().clone();
    if w1 != w0 {
        buf = pass(&buf, h0, w0, w1, filter, true);
    }
    if h1 != h0 {
        buf = pass(&buf, w1, h0, h1, filter, false);
    }
    RgbImage::from_raw(width, height, buf).expect("buffer holds width * height * 3 bytes")
}
