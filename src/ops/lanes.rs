//! f32 row loops of the CPU kernels written sixteen lanes wide, so that they vectorise: the
//! exponential and the normal CDF as polynomials (libm's `expf` and `erf` are a call per
//! element, which nothing vectorises), the softmax of a row, SiLU and GEGLU. Each runs with
//! AVX-512 or AVX2 where the CPU has it and SSE2 otherwise, chosen at run time; the lanes do the
//! same unfused multiplies and adds either way, so all give the same bits.

/// Lanes of the accumulators (one AVX-512 register of f32).
const LANES: usize = 16;

/// `exp(x)` within 2 ulp for `x` in [-87.3, 88.3]; 0 below, infinity above, NaN for NaN.
///
/// `x = n ln2 + r` with `n` the nearest integer to `x / ln2` and `|r| <= ln2 / 2`, then
/// `exp(x) = 2^n exp(r)`, `exp(r)` by Cephes' `expf` polynomial and `2^n` built in the exponent
/// bits. `ln2` is split in two so that `r` keeps its precision.
#[inline(always)]
fn exp(x: f32) -> f32 {
    // Adding 1.5 * 2^23 rounds to an integer (ties to even) in the last mantissa bits.
    const SHIFTER: f32 = 12_582_912.0;
    const SHIFTER_BITS: i32 = 0x4B40_0000;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // exp(-87.336) is the smallest normal f32, and 2^127 * exp(r) overflows above 88.376.
    const LOW: f32 = -87.336_55;
    const HIGH: f32 = 88.376_26;
    let t = x * std::f32::consts::LOG2_E + SHIFTER;
    let n = t - SHIFTER;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let e = (p * (r * r) + r) + 1.0;
    // n + 127 in the exponent field; garbage outside [LOW, HIGH], which the selects replace.
    let scale = f32::from_bits(((t.to_bits() as i32).wrapping_sub(SHIFTER_BITS).wrapping_add(127) as u32) << 23);
    let y = e * scale;
    let y = if x < LOW { 0.0 } else { y };
    if x > HIGH {
        f32::INFINITY
    } else {
        y
    }
}

/// Runs `$portable(args)` compiled for AVX-512 or AVX2 when the CPU has it (the body is inlined
/// into a function with the feature enabled), else as built (SSE2 on x86-64).
macro_rules! dispatch {
    ($portable:ident, $avx512:ident, $avx2:ident, ($($arg:ident: $ty:ty),*) -> $ret:ty) => {{
        #[cfg(target_arch = "x86_64")]
        {
            /// # Safety
            /// The CPU must have AVX-512F.
            #[target_feature(enable = "avx512f")]
            unsafe fn $avx512($($arg: $ty),*) -> $ret {
                $portable($($arg),*)
            }
            /// # Safety
            /// The CPU must have AVX2.
            #[target_feature(enable = "avx2")]
            unsafe fn $avx2($($arg: $ty),*) -> $ret {
                $portable($($arg),*)
            }
            if std::arch::is_x86_feature_detected!("avx512f") {
                // SAFETY: the CPU has AVX-512F.
                return unsafe { $avx512($($arg),*) };
            }
            if std::arch::is_x86_feature_detected!("avx2") {
                // SAFETY: the CPU has AVX2.
                return unsafe { $avx2($($arg),*) };
            }
        }
        $portable($($arg),*)
    }};
}

/// Softmax of `row` in place: `exp(x - max) / sum`. A row whose largest value is `-inf` (every
/// key masked) becomes NaN, as in the composed reference.
pub(crate) fn softmax_row(row: &mut [f32]) {
    dispatch!(softmax_row_lanes, softmax_row_avx512, softmax_row_avx2, (row: &mut [f32]) -> ())
}

#[inline(always)]
fn softmax_row_lanes(row: &mut [f32]) {
    let mut m = [f32::NEG_INFINITY; LANES];
    let chunks = row.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for l in 0..LANES {
            m[l] = if c[l] > m[l] { c[l] } else { m[l] };
        }
    }
    for (l, &v) in tail.iter().enumerate() {
        m[l] = if v > m[l] { v } else { m[l] };
    }
    let max = m.into_iter().fold(f32::NEG_INFINITY, |a, b| if b > a { b } else { a });
    let mut s = [0f32; LANES];
    let mut chunks = row.chunks_exact_mut(LANES);
    for c in chunks.by_ref() {
        for l in 0..LANES {
            let e = exp(c[l] - max);
            c[l] = e;
            s[l] += e;
        }
    }
    for (l, v) in chunks.into_remainder().iter_mut().enumerate() {
        *v = exp(*v - max);
        s[l] += *v;
    }
    let inv = 1.0 / s.into_iter().sum::<f32>();
    row.iter_mut().for_each(|v| *v *= inv);
}

/// The sum and the sum of squares of `row`, in f64 (see [`sum_and_squares_of`]).
pub(crate) fn sum_and_squares(row: &[f32]) -> (f64, f64) {
    dispatch!(sum_and_squares_of, sum_and_squares_avx512, sum_and_squares_avx2, (row: &[f32]) -> (f64, f64))
}

/// The sum and the sum of squares of `row`, accumulated in f64 in eight lanes each (a single
/// running sum would be bound by the latency of each addition).
#[inline(always)]
pub(crate) fn sum_and_squares_of<T: candle_core::WithDType>(row: &[T]) -> (f64, f64) {
    let (mut s1, mut s2) = ([0f64; 8], [0f64; 8]);
    let chunks = row.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for l in 0..8 {
            let v = c[l].to_f64();
            s1[l] += v;
            s2[l] += v * v;
        }
    }
    let mut sum = s1.iter().sum::<f64>();
    let mut sq = s2.iter().sum::<f64>();
    for &v in rest {
        let v = v.to_f64();
        sum += v;
        sq += v * v;
    }
    (sum, sq)
}

/// `max[i] = max(max[i], row[i])`: one row of keys into the running maxima of a block of
/// queries (the transposed scores of attention, a query per lane).
pub(crate) fn column_max(row: &[f32], max: &mut [f32]) {
    dispatch!(column_max_lanes, column_max_avx512, column_max_avx2, (row: &[f32], max: &mut [f32]) -> ())
}

#[inline(always)]
fn column_max_lanes(row: &[f32], max: &mut [f32]) {
    for (m, &v) in max.iter_mut().zip(row) {
        *m = if v > *m { v } else { *m };
    }
}

/// `row[i] = exp(row[i] - max[i])` and `sum[i] += row[i]`: one row of keys of the transposed
/// scores into exponentials and the queries' running sums.
pub(crate) fn exp_sub_sum(row: &mut [f32], max: &[f32], sum: &mut [f32]) {
    dispatch!(exp_sub_sum_lanes, exp_sub_sum_avx512, exp_sub_sum_avx2, (row: &mut [f32], max: &[f32], sum: &mut [f32]) -> ())
}

#[inline(always)]
fn exp_sub_sum_lanes(row: &mut [f32], max: &[f32], sum: &mut [f32]) {
    for ((v, &m), s) in row.iter_mut().zip(max).zip(sum.iter_mut()) {
        *v = exp(*v - m);
        *s += *v;
    }
}

/// SiLU in place: `x / (1 + exp(-x))`.
pub(crate) fn silu(xs: &mut [f32]) {
    dispatch!(silu_lanes, silu_avx512, silu_avx2, (xs: &mut [f32]) -> ())
}

#[inline(always)]
fn silu_lanes(xs: &mut [f32]) {
    xs.iter_mut().for_each(|x| *x = *x / (1.0 + exp(-*x)));
}

/// The gradient through SiLU in place: `ys` holds SiLU's inputs `y` and becomes
/// `dy * s (1 + y (1 - s))`, `s = sigmoid(y)`.
pub(crate) fn silu_grad(ys: &mut [f32], dy: &[f32]) {
    dispatch!(silu_grad_lanes, silu_grad_avx512, silu_grad_avx2, (ys: &mut [f32], dy: &[f32]) -> ())
}

#[inline(always)]
fn silu_grad_lanes(ys: &mut [f32], dy: &[f32]) {
    for (y, &g) in ys.iter_mut().zip(dy) {
        let s = 1.0 / (1.0 + exp(-*y));
        *y = g * s * (1.0 + *y * (1.0 - s));
    }
}

/// `(Phi(x), x phi(x))`: the standard normal CDF and `x` times its density, from which GELU
/// (`x Phi(x)`) and its derivative (`Phi(x) + x phi(x)`) follow.
///
/// `Phi(x) = erfc(-x / sqrt 2) / 2`, with `erfc(z) = t exp(-z^2 + P(t))`, `t = 1 / (1 + z/2)`
/// for `z >= 0` (Numerical Recipes' `erfcc`, relative error below 1.2e-7 for every `z >= 0`)
/// and `erfc(-z) = 2 - erfc(z)`.
#[inline(always)]
fn normal_parts(x: f32) -> (f32, f32) {
    let z = x.abs() * std::f32::consts::FRAC_1_SQRT_2;
    let t = 1.0 / (1.0 + 0.5 * z);
    let mut p = 0.170_872_77_f32;
    p = p * t - 0.822_152_23;
    p = p * t + 1.488_515_9;
    p = p * t - 1.135_204;
    p = p * t + 0.278_868_07;
    p = p * t - 0.186_288_06;
    p = p * t + 0.096_784_18;
    p = p * t + 0.374_091_96;
    p = p * t + 1.000_023_7;
    p = p * t - 1.265_512_2;
    // -z^2 as -x^2 / 2: one rounding instead of three.
    let g = exp(-0.5 * (x * x));
    // erfc(|x| / sqrt 2) / 2, the tail beyond |x|.
    let tail = 0.5 * t * g * exp(p);
    let cdf = if x < 0.0 { tail } else { 1.0 - tail };
    // phi(x) = exp(-x^2 / 2) / sqrt(2 pi) = g / sqrt(2 pi).
    (cdf, x * g * 0.398_942_3)
}

/// GEGLU of one row: `o = a * gelu(b)`.
pub(crate) fn geglu(o: &mut [f32], a: &[f32], b: &[f32]) {
    dispatch!(geglu_lanes, geglu_avx512, geglu_avx2, (o: &mut [f32], a: &[f32], b: &[f32]) -> ())
}

#[inline(always)]
fn geglu_lanes(o: &mut [f32], a: &[f32], b: &[f32]) {
    for ((o, &a), &b) in o.iter_mut().zip(a).zip(b) {
        *o = a * (b * normal_parts(b).0);
    }
}

/// GEGLU's gradient of one row: `da = dy gelu(b)`, `db = dy a gelu'(b)`.
pub(crate) fn geglu_grad(da: &mut [f32], db: &mut [f32], a: &[f32], b: &[f32], dy: &[f32]) {
    dispatch!(geglu_grad_lanes, geglu_grad_avx512, geglu_grad_avx2,
        (da: &mut [f32], db: &mut [f32], a: &[f32], b: &[f32], dy: &[f32]) -> ())
}

#[inline(always)]
fn geglu_grad_lanes(da: &mut [f32], db: &mut [f32], a: &[f32], b: &[f32], dy: &[f32]) {
    for ((((da, db), &a), &b), &g) in da.iter_mut().zip(db.iter_mut()).zip(a).zip(b).zip(dy) {
        let (cdf, xpdf) = normal_parts(b);
        *da = g * (b * cdf);
        *db = g * (a * (cdf + xpdf));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Largest error of `exp` in ulp of the correctly rounded f64 value, over a dense grid.
    #[test]
    fn exp_is_within_two_ulp_of_f64() {
        let mut worst = 0f64;
        let mut x = -87.3f32;
        while x < 88.3 {
            let want = (x as f64).exp();
            let ulp = {
                let w = want as f32;
                (f32::from_bits(w.to_bits() + 1) - w) as f64
            };
            worst = worst.max((exp(x) as f64 - want).abs() / ulp);
            x += 0.000_731;
        }
        assert!(worst <= 2.0, "worst error {worst} ulp");
    }

    #[test]
    fn exp_limits_and_nan() {
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(-100.0), 0.0);
        assert_eq!(exp(f32::INFINITY), f32::INFINITY);
        assert_eq!(exp(100.0), f32::INFINITY);
        assert!(exp(f32::NAN).is_nan());
        assert_eq!(exp(0.0), 1.0);
    }

    /// `normal_parts` against the f64 CDF and density over [-12, 12]: the CDF within
    /// `(3 + x^2 / 2) 1.2e-7` of its value below 0 (the rounding of `x^2` grows with it) and
    /// 2e-7 of 1 above, `x phi(x)` alike.
    #[test]
    fn normal_parts_match_f64() {
        let mut x = -12.0f32;
        while x < 12.0 {
            let xd = x as f64;
            let cdf = 0.5 * candle_core::cpu::erf::erfc_f64(-xd * std::f64::consts::FRAC_1_SQRT_2);
            let xpdf = xd * (-0.5 * xd * xd).exp() / (2.0 * std::f64::consts::PI).sqrt();
            let (c, p) = normal_parts(x);
            let rel = (3.0 + xd * xd / 2.0) * 1.2e-7;
            let tol = if xd < 0.0 { rel * cdf } else { 2e-7 };
            assert!((c as f64 - cdf).abs() <= tol + 1e-37, "cdf({x}) = {c}, want {cdf}");
            assert!(
                (p as f64 - xpdf).abs() <= rel * xpdf.abs() + 1e-37,
                "x pdf({x}) = {p}, want {xpdf}"
            );
            x += 0.001_37;
        }
    }

    fn bits(xs: &[f32]) -> Vec<u32> {
        xs.iter().map(|v| v.to_bits()).collect()
    }

    /// The AVX2 build of the lanes gives the bits of the portable build.
    #[test]
    fn dispatched_and_portable_rows_agree_bitwise() {
        let mut rng = crate::rng::Rng::new(3);
        for len in [1, 7, 8, 9, 77, 1000] {
            let row: Vec<f32> = (0..len).map(|_| rng.normal() as f32 * 6.0).collect();
            let (mut a, mut b) = (row.clone(), row.clone());
            softmax_row(&mut a);
            softmax_row_lanes(&mut b);
            assert_eq!(bits(&a), bits(&b));
            let (sums, portable) = (sum_and_squares(&row), sum_and_squares_of(&row));
            assert_eq!(
                (sums.0.to_bits(), sums.1.to_bits()),
                (portable.0.to_bits(), portable.1.to_bits())
            );
            let (mut a, mut b) = (vec![-1f32; len], vec![-1f32; len]);
            column_max(&row, &mut a);
            column_max_lanes(&row, &mut b);
            assert_eq!(bits(&a), bits(&b));
            let (mut ra, mut rb, mut sa, mut sb) = (row.clone(), row.clone(), vec![1f32; len], vec![1f32; len]);
            exp_sub_sum(&mut ra, &a, &mut sa);
            exp_sub_sum_lanes(&mut rb, &b, &mut sb);
            assert_eq!((bits(&ra), bits(&sa)), (bits(&rb), bits(&sb)));
            let (mut a, mut b) = (row.clone(), row.clone());
            silu(&mut a);
            silu_lanes(&mut b);
            assert_eq!(bits(&a), bits(&b));
            let dy: Vec<f32> = (0..len).map(|_| rng.normal() as f32).collect();
            let (mut a, mut b) = (row.clone(), row.clone());
            silu_grad(&mut a, &dy);
            silu_grad_lanes(&mut b, &dy);
            assert_eq!(bits(&a), bits(&b));
            let (mut a, mut b) = (vec![0f32; len], vec![0f32; len]);
            geglu(&mut a, &row, &dy);
            geglu_lanes(&mut b, &row, &dy);
            assert_eq!(bits(&a), bits(&b));
            let (mut a, mut b, mut c, mut d) = (vec![0f32; len], vec![0f32; len], vec![0f32; len], vec![0f32; len]);
            geglu_grad(&mut a, &mut b, &row, &dy, &row);
            geglu_grad_lanes(&mut c, &mut d, &row, &dy, &row);
            assert_eq!((bits(&a), bits(&b)), (bits(&c), bits(&d)));
        }
    }

    #[test]
    fn softmax_row_matches_f64_and_masked_rows_are_nan() {
        let mut rng = crate::rng::Rng::new(4);
        let row: Vec<f32> = (0..300).map(|_| rng.normal() as f32 * 8.0).collect();
        let mut got = row.clone();
        softmax_row(&mut got);
        let max = row.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b as f64));
        let sum: f64 = row.iter().map(|&v| (v as f64 - max).exp()).sum();
        for (g, &v) in got.iter().zip(&row) {
            let want = (v as f64 - max).exp() / sum;
            assert!((*g as f64 - want).abs() <= 3e-6 * want + 1e-12, "{g} vs {want}");
        }
        let mut masked = vec![f32::NEG_INFINITY; 11];
        softmax_row(&mut masked);
        assert!(masked.iter().all(|v| v.is_nan()));
    }
}
