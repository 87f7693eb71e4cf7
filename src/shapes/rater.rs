//! The shapes world's ground-truth rater: how well an image shows its caption, plus a stated
//! taste. It measures the image directly (no learned model), so it is the truth preference
//! labels are drawn from and that aligned models are judged by.
//!
//! With `d(c, t)` the RGB distance in [0, 1] units and `sim(c, t) = exp(−d²/(2·0.2²))`:
//! - background: mean `sim` to the background colour over the image border (one pixel wide);
//! - foreground mass `w = 1 − sim(c, background)` per pixel; colour: the `w`-weighted mean `sim`
//!   to the shape's colour;
//! - shape: the foreground's fill ratio of its bounding box (weighted, with a square box of the
//!   larger side) against the shape's (π/4, 1, 1/2): `exp(−(ratio − ideal)²/(2·0.1²))`;
//! - taste, "prefers large, centred shapes": size `min(area / 0.2, 1)` and centring
//!   `1 − min(2·|centroid − centre|, 1)`, averaged.
//!
//! The score is `0.75 · mean(background, colour, shape) + 0.25 · taste`, in [0, 1].

use super::world::Prompt;
use crate::{Error, Result};

/// The parts of a rating, each in [0, 1].
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Rating {
    /// Background colour adherence.
    pub background: f64,
    /// Shape colour adherence.
    pub colour: f64,
    /// Shape kind adherence.
    pub shape: f64,
    /// The taste term (size and centring).
    pub taste: f64,
    /// The overall score.
    pub score: f64,
}

const SIGMA: f64 = 0.2;

fn sim(c: [f64; 3], t: [f64; 3]) -> f64 {
    let d2: f64 = (0..3).map(|i| (c[i] - t[i]).powi(2)).sum();
    (-d2 / (2.0 * SIGMA * SIGMA)).exp()
}

/// Rates `image` (`h x w` RGB, row-major, values in [0, 1]) against `prompt`.
pub fn rate(image: &[f32], h: usize, w: usize, prompt: &Prompt) -> Result<Rating> {
    if h < 3 || w < 3 || image.len() != h * w * 3 {
        return Err(Error::input(
            "image",
            format!("expected {h}x{w}x3 values (at least 3x3), got {}", image.len()),
        ));
    }
    let px = |x: usize, y: usize| -> [f64; 3] {
        let i = (y * w + x) * 3;
        [image[i], image[i + 1], image[i + 2]].map(|v| f64::from(v).clamp(0.0, 1.0))
    };
    let bg = prompt.background.rgb();
    let fg = prompt.colour.rgb();

    let mut border = (0.0, 0usize);
    for y in 0..h {
        for x in 0..w {
            if x == 0 || y == 0 || x == w - 1 || y == h - 1 {
                border.0 += sim(px(x, y), bg);
                border.1 += 1;
            }
        }
    }
    let background = border.0 / border.1 as f64;

    let (mut mass, mut colour_sum, mut sx, mut sy) = (0.0, 0.0, 0.0, 0.0);
    let (mut x0, mut x1, mut y0, mut y1) = (w, 0, h, 0);
    for y in 0..h {
        for x in 0..w {
            let c = px(x, y);
            let m = 1.0 - sim(c, bg);
            mass += m;
            colour_sum += m * sim(c, fg);
            sx += m * (x as f64 + 0.5);
            sy += m * (y as f64 + 0.5);
            if m > 0.5 {
                x0 = x0.min(x);
                x1 = x1.max(x);
                y0 = y0.min(y);
                y1 = y1.max(y);
            }
        }
    }
    let area = mass / (h * w) as f64;
    if mass < 1.0 || x1 < x0 {
        // Nothing stands out from the background.
        let taste = 0.0;
        let score = 0.75 * background / 3.0 + 0.25 * taste;
        return Ok(Rating {
            background,
            colour: 0.0,
            shape: 0.0,
            taste,
            score,
        });
    }
    let colour = colour_sum / mass;
    let side = ((x1 - x0 + 1).max(y1 - y0 + 1)) as f64;
    let ratio = mass / (side * side);
    let shape = (-(ratio - prompt.shape.fill_ratio()).powi(2) / (2.0 * 0.1 * 0.1)).exp();
    let (cx, cy) = (sx / mass / w as f64, sy / mass / h as f64);
    let off = ((cx - 0.5).powi(2) + (cy - 0.5).powi(2)).sqrt();
    let taste = 0.5 * (area / 0.2).min(1.0) + 0.5 * (1.0 - (2.0 * off).min(1.0));
    let score = 0.75 * (background + colour + shape) / 3.0 + 0.25 * taste;
    Ok(Rating {
        background,
        colour,
        shape,
        taste,
        score,
    })
}

/// The probability that an image with score `a` is preferred to one with score `b` under
/// Bradley-Terry noise of temperature `temperature`: `sigmoid((a − b) / temperature)`.
pub fn preference_probability(a: f64, b: f64, temperature: f64) -> f64 {
    1.0 / (1.0 + (-(a - b) / temperature).exp())
}
