//! A seeded, portable random number generator for all noise (candle's CPU generator cannot be
//! seeded). The same seed gives the same numbers on every machine and backend, since sampling
//! happens here, on the host, before tensors are made.

use candle_core::{Device, Shape, Tensor};

use crate::Result;

/// xoshiro256++ seeded through splitmix64, with Box-Muller normals.
#[derive(Debug, Clone)]
pub struct Rng {
    s: [u64; 4],
    spare_normal: Option<f64>,
}

fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Rng {
    /// A generator whose whole stream is fixed by `seed`.
    pub fn new(seed: u64) -> Self {
        let mut sm = seed;
        let s = [
            splitmix64(&mut sm),
            splitmix64(&mut sm),
            splitmix64(&mut sm),
            splitmix64(&mut sm),
        ];
        Rng { s, spare_normal: None }
    }

    /// A generator for one item of a seeded run, fixed by the run's `seed` and the item's `key`
    /// alone (say its epoch and position in the data order), so the item draws the same numbers
    /// however the run's work is split into batches and processes.
    pub fn keyed(seed: u64, key: &[u64]) -> Self {
        let mut h = seed;
        for &k in key {
            let mut s = h ^ k.wrapping_mul(0xD1B5_4A32_D192_ED03);
            h = splitmix64(&mut s);
        }
        Rng::new(h)
    }

    /// The full generator state, for checkpoints: the four state words, then the cached second
    /// normal's bits with a presence flag.
    pub fn state(&self) -> [u64; 6] {
        let (flag, bits) = match self.spare_normal {
            Some(z) => (1, z.to_bits()),
            None => (0, 0),
        };
        [self.s[0], self.s[1], self.s[2], self.s[3], flag, bits]
    }

    /// A generator that continues exactly where the one that gave `state` was.
    pub fn from_state(state: [u64; 6]) -> Self {
        let spare_normal = (state[4] == 1).then(|| f64::from_bits(state[5]));
        Rng {
            s: [state[0], state[1], state[2], state[3]],
            spare_normal,
        }
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let s = &mut self.s;
        let result = (s[0].wrapping_add(s[3])).rotate_left(23).wrapping_add(s[0]);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    /// A uniform sample in [0, 1) with 53 random bits.
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// A uniform integer in [0, n); `n` must be > 0.
    pub fn below(&mut self, n: u64) -> u64 {
        // Lemire's multiply-shift with rejection, so there is no modulo bias.
        let mut m = (self.next_u64() as u128) * (n as u128);
        if (m as u64) < n {
            let threshold = n.wrapping_neg() % n;
            while (m as u64) < threshold {
                m = (self.next_u64() as u128) * (n as u128);
            }
        }
        (m >> 64) as u64
    }

    /// A standard normal sample.
    pub fn normal(&mut self) -> f64 {
        if let Some(z) = self.spare_normal.take() {
            return z;
        }
        // Box-Muller; 1 - u keeps the logarithm's argument in (0, 1].
        let u1 = 1.0 - self.uniform();
        let u2 = self.uniform();
        let r = (-2.0 * u1.ln()).sqrt();
        let theta = 2.0 * std::f64::consts::PI * u2;
        self.spare_normal = Some(r * theta.sin());
        r * theta.cos()
    }

    /// An f32 tensor of standard normal samples, filled in row-major order.
    pub fn randn(&mut self, shape: impl Into<Shape>, device: &Device) -> Result<Tensor> {
        let shape = shape.into();
        let data: Vec<f32> = (0..shape.elem_count()).map(|_| self.normal() as f32).collect();
        Ok(Tensor::from_vec(data, shape, device)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rng_same_seed_same_stream() {
        let mut a = Rng::new(7);
        let mut b = Rng::new(7);
        let mut c = Rng::new(8);
        let xa: Vec<u64> = (0..16).map(|_| a.next_u64()).collect();
        let xb: Vec<u64> = (0..16).map(|_| b.next_u64()).collect();
        let xc: Vec<u64> = (0..16).map(|_| c.next_u64()).collect();
        assert_eq!(xa, xb);
        assert_ne!(xa, xc);
    }

    #[test]
    fn rng_state_round_trip_continues_the_stream() {
        let mut a = Rng::new(42);
        a.normal();
        let mut b = Rng::from_state(a.state());
        let xa: Vec<f64> = (0..9).map(|_| a.normal()).collect();
        let xb: Vec<f64> = (0..9).map(|_| b.normal()).collect();
        assert_eq!(xa, xb);
    }

    #[test]
    fn rng_normal_moments() {
        let mut r = Rng::new(123);
        let n = 200_000;
        let xs: Vec<f64> = (0..n).map(|_| r.normal()).collect();
        let mean = xs.iter().sum::<f64>() / n as f64;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n as f64;
        assert!(mean.abs() < 0.01, "mean {mean}");
        assert!((var - 1.0).abs() < 0.01, "var {var}");
    }

    #[test]
    fn rng_below_in_range_and_covers() {
        let mut r = Rng::new(5);
        let mut seen = [false; 10];
        for _ in 0..1000 {
            let v = r.below(10) as usize;
            seen[v] = true;
        }
        assert!(seen.iter().all(|&s| s));
    }
}
