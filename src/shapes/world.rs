//! The shapes world: small RGB images of one shape in one colour on a background colour, at a
//! position and size, with captions such as "a red circle on a blue background". Everything is
//! deterministic from a seed, so datasets, prompts and held-out splits are reproducible.

use std::fmt;
use std::str::FromStr;

use crate::rng::Rng;
use crate::{Error, Result};

/// A shape kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Shape {
    /// A filled disc.
    Circle,
    /// An axis-aligned filled square.
    Square,
    /// An upright filled isosceles triangle.
    Triangle,
}

impl Shape {
    /// Every shape.
    pub const ALL: [Shape; 3] = [Shape::Circle, Shape::Square, Shape::Triangle];

    /// The word in captions.
    pub fn name(self) -> &'static str {
        match self {
            Shape::Circle => "circle",
            Shape::Square => "square",
            Shape::Triangle => "triangle",
        }
    }

    /// The share of its bounding box the shape fills (π/4, 1, 1/2).
    pub fn fill_ratio(self) -> f64 {
        match self {
            Shape::Circle => std::f64::consts::FRAC_PI_4,
            Shape::Square => 1.0,
            Shape::Triangle => 0.5,
        }
    }

    /// Whether the point `(x, y)` lies inside the shape centred at `(cx, cy)` with half extent
    /// `r` (all in image units, y down).
    fn contains(self, x: f64, y: f64, cx: f64, cy: f64, r: f64) -> bool {
        let (dx, dy) = (x - cx, y - cy);
        match self {
            Shape::Circle => dx * dx + dy * dy <= r * r,
            Shape::Square => dx.abs() <= r && dy.abs() <= r,
            // Apex at (cx, cy − r), base from (cx − r, cy + r) to (cx + r, cy + r).
            Shape::Triangle => dy <= r && dy >= -r && dx.abs() <= (dy + r) / 2.0,
        }
    }
}

/// A colour of the palette.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Colour {
    /// (220, 40, 40).
    Red,
    /// (40, 170, 60).
    Green,
    /// (40, 80, 220).
    Blue,
    /// (240, 210, 40).
    Yellow,
    /// (150, 60, 190).
    Purple,
    /// (240, 240, 240).
    White,
}

impl Colour {
    /// Every colour.
    pub const ALL: [Colour; 6] = [
        Colour::Red,
        Colour::Green,
        Colour::Blue,
        Colour::Yellow,
        Colour::Purple,
        Colour::White,
    ];

    /// The word in captions.
    pub fn name(self) -> &'static str {
        match self {
            Colour::Red => "red",
            Colour::Green => "green",
            Colour::Blue => "blue",
            Colour::Yellow => "yellow",
            Colour::Purple => "purple",
            Colour::White => "white",
        }
    }

    /// RGB in [0, 1].
    pub fn rgb(self) -> [f64; 3] {
        let c = match self {
            Colour::Red => [220, 40, 40],
            Colour::Green => [40, 170, 60],
            Colour::Blue => [40, 80, 220],
            Colour::Yellow => [240, 210, 40],
            Colour::Purple => [150, 60, 190],
            Colour::White => [240, 240, 240],
        };
        c.map(|v| f64::from(v) / 255.0)
    }
}

/// What a caption asks for: shape, colour and background.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Prompt {
    /// The shape.
    pub shape: Shape,
    /// Its colour.
    pub colour: Colour,
    /// The background colour (never the shape's).
    pub background: Colour,
}

impl Prompt {
    /// Every prompt of the world (shape x colour x a different background), in a fixed order.
    pub fn all() -> Vec<Prompt> {
        let mut out = Vec::new();
        for shape in Shape::ALL {
            for colour in Colour::ALL {
                for background in Colour::ALL {
                    if background != colour {
                        out.push(Prompt {
                            shape,
                            colour,
                            background,
                        });
                    }
                }
            }
        }
        out
    }

    /// A uniformly random prompt.
    pub fn random(rng: &mut Rng) -> Prompt {
        let all = Prompt::all();
        all[rng.below(all.len() as u64) as usize]
    }

    /// The prompt with its colour or background replaced by another colour (a plausible wrong
    /// caption, e.g. for DCPO's second caption).
    pub fn perturbed(self, rng: &mut Rng) -> Prompt {
        loop {
            let c = Colour::ALL[rng.below(Colour::ALL.len() as u64) as usize];
            let p = if rng.below(2) == 0 {
                Prompt { colour: c, ..self }
            } else {
                Prompt { background: c, ..self }
            };
            if p != self && p.colour != p.background {
                return p;
            }
        }
    }
}

impl fmt::Display for Prompt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "a {} {} on a {} background",
            self.colour.name(),
            self.shape.name(),
            self.background.name()
        )
    }
}

impl FromStr for Prompt {
    type Err = Error;

    /// Parses "a COLOUR SHAPE on a COLOUR background" (case and extra spaces ignored).
    fn from_str(s: &str) -> Result<Prompt> {
        let lower = s.to_ascii_lowercase();
        let words: Vec<&str> = lower.split_whitespace().collect();
        let bad = || {
            Error::input(
                "caption",
                format!("{s:?} is not a shapes-world caption (\"a red circle on a blue background\")"),
            )
        };
        let [a, colour, shape, on, a2, background, bg] = words.as_slice() else {
            return Err(bad());
        };
        if (*a, *on, *a2, *bg) != ("a", "on", "a", "background") {
            return Err(bad());
        }
        let colour_of = |w: &str| Colour::ALL.into_iter().find(|c| c.name() == w).ok_or_else(bad);
        let prompt = Prompt {
            shape: Shape::ALL.into_iter().find(|x| x.name() == *shape).ok_or_else(bad)?,
            colour: colour_of(colour)?,
            background: colour_of(background)?,
        };
        if prompt.colour == prompt.background {
            return Err(bad());
        }
        Ok(prompt)
    }
}

/// One scene: a prompt and where the shape is.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scene {
    /// What is drawn.
    pub prompt: Prompt,
    /// Centre x in [0, 1].
    pub cx: f64,
    /// Centre y in [0, 1] (down).
    pub cy: f64,
    /// Half extent in [0, 1] units.
    pub half: f64,
}

impl Scene {
    /// A random scene for `prompt`: half extent in [0.12, 0.36], fully inside the image.
    pub fn random(prompt: Prompt, rng: &mut Rng) -> Scene {
        let half = 0.12 + 0.24 * rng.uniform();
        let cx = half + (1.0 - 2.0 * half) * rng.uniform();
        let cy = half + (1.0 - 2.0 * half) * rng.uniform();
        Scene { prompt, cx, cy, half }
    }

    /// Renders the scene as `size x size` RGB bytes (row-major), antialiased with 4x4 samples per
    /// pixel.
    pub fn render(&self, size: usize) -> image::RgbImage {
        const SS: usize = 4;
        let fg = self.prompt.colour.rgb();
        let bg = self.prompt.background.rgb();
        let mut img = image::RgbImage::new(size as u32, size as u32);
        for py in 0..size {
            for px in 0..size {
                let mut inside = 0usize;
                for sy in 0..SS {
                    for sx in 0..SS {
                        let x = (px as f64 + (sx as f64 + 0.5) / SS as f64) / size as f64;
                        let y = (py as f64 + (sy as f64 + 0.5) / SS as f64) / size as f64;
                        if self.prompt.shape.contains(x, y, self.cx, self.cy, self.half) {
                            inside += 1;
                        }
                    }
                }
                let a = inside as f64 / (SS * SS) as f64;
                let rgb = [0, 1, 2].map(|c| ((a * fg[c] + (1.0 - a) * bg[c]) * 255.0).round() as u8);
                img.put_pixel(px as u32, py as u32, image::Rgb(rgb));
            }
        }
        img
    }
}
