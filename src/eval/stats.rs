//! Paired bootstrap confidence intervals of the difference between two
//! policies scored on the same samples (at the same keep ratio).
//!
//! A resample draws `n` sample indices with replacement; both policies are
//! measured on those same indices (the pairing), and the statistic is the
//! difference `a - b`:
//!
//! - ROUGE-L: the difference of the resample's means;
//! - PPL: the difference of the resample's pooled perplexities,
//!   `exp(sum nll / sum tokens)` of each policy.
//!
//! The interval is the percentile interval of [`RESAMPLES`] resamples drawn
//! from a fixed seed, so a report is the same every time it is written.

/// Resamples per interval.
pub const RESAMPLES: usize = 2000;
/// The seed of every interval's resamples.
pub const SEED: u64 = 0x0e1a_571c_cac4_e5ed;
/// The confidence level of the intervals.
pub const LEVEL: f64 = 0.95;

/// One policy's measurements on one sample.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Score {
    /// ROUGE-L F against the full cache's answer.
    pub rouge_l: f64,
    /// Summed negative log-likelihood of the scored tokens.
    pub nll: f64,
    /// Scored tokens.
    pub tokens: usize,
}

/// A point estimate and its confidence interval.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Interval {
    pub estimate: f64,
    pub lo: f64,
    pub hi: f64,
}

impl Interval {
    /// Whether the interval excludes 0.
    pub fn significant(&self) -> bool {
        self.lo > 0.0 || self.hi < 0.0
    }
}

/// Policy `a` minus policy `b` on the same samples.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Difference {
    pub samples: usize,
    /// Mean ROUGE-L of `a` minus that of `b`.
    pub rouge_l: Interval,
    /// Pooled PPL of `a` minus that of `b`; `None` when no token was scored.
    pub ppl: Option<Interval>,
}

/// The mean ROUGE-L of `scores` (NaN for none).
pub fn mean_rouge_l(scores: &[Score]) -> f64 {
    scores.iter().map(|s| s.rouge_l).sum::<f64>() / scores.len() as f64
}

/// `exp(sum nll / sum tokens)` of `scores` (NaN when no token was scored).
pub fn pooled_ppl(scores: &[Score]) -> f64 {
    let (nll, tokens) = scores
        .iter()
        .fold((0.0, 0usize), |(nll, tokens), s| (nll + s.nll, tokens + s.tokens));
    if tokens == 0 {
        f64::NAN
    } else {
        (nll / tokens as f64).exp()
    }
}

/// The paired bootstrap of `a - b` (see the module documentation), with the
/// crate's [`RESAMPLES`] and [`SEED`] at [`LEVEL`].
pub fn compare(a: &[Score], b: &[Score]) -> Option<Difference> {
    paired_bootstrap(a, b, RESAMPLES, SEED, LEVEL)
}

/// The paired bootstrap of `a - b`: `a[i]` and `b[i]` are the two policies
/// on sample `i`. `None` when the slices are empty or differ in length.
pub fn paired_bootstrap(a: &[Score], b: &[Score], resamples: usize, seed: u64, level: f64) -> Option<Difference> {
    let n = a.len();
    if n == 0 || b.len() != n || resamples == 0 {
        return None;
    }
    let mut rng = SplitMix64(seed);
    let mut rouge = Vec::with_capacity(resamples);
    let mut ppl = Vec::with_capacity(resamples);
    for _ in 0..resamples {
        let (mut rouge_sum, mut nll_a, mut nll_b, mut tokens_a, mut tokens_b) = (0.0, 0.0, 0.0, 0usize, 0usize);
        for _ in 0..n {
            let i = rng.below(n);
            rouge_sum += a[i].rouge_l - b[i].rouge_l;
            nll_a += a[i].nll;
            nll_b += b[i].nll;
            tokens_a += a[i].tokens;
            tokens_b += b[i].tokens;
        }
        rouge.push(rouge_sum / n as f64);
        if tokens_a > 0 && tokens_b > 0 {
            let difference = (nll_a / tokens_a as f64).exp() - (nll_b / tokens_b as f64).exp();
            if difference.is_finite() {
                ppl.push(difference);
            }
        }
    }
    let rouge_estimate = a.iter().zip(b).map(|(a, b)| a.rouge_l - b.rouge_l).sum::<f64>() / n as f64;
    let ppl_estimate = pooled_ppl(a) - pooled_ppl(b);
    Some(Difference {
        samples: n,
        rouge_l: percentile_interval(rouge_estimate, &mut rouge, level),
        ppl: (ppl_estimate.is_finite() && !ppl.is_empty()).then(|| percentile_interval(ppl_estimate, &mut ppl, level)),
    })
}

/// The central `level` percentile interval of `values` around `estimate`.
fn percentile_interval(estimate: f64, values: &mut [f64], level: f64) -> Interval {
    values.sort_by(f64::total_cmp);
    let tail = (1.0 - level) / 2.0;
    Interval {
        estimate,
        lo: quantile(values, tail),
        hi: quantile(values, 1.0 - tail),
    }
}

/// The `q` quantile of sorted `values`, interpolating linearly between the
/// nearest order statistics.
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    match sorted.len() {
        0 => f64::NAN,
        1 => sorted[0],
        len => {
            let position = q.clamp(0.0, 1.0) * (len - 1) as f64;
            let below = position.floor() as usize;
            let above = (below + 1).min(len - 1);
            let fraction = position - below as f64;
            sorted[below] + fraction * (sorted[above] - sorted[below])
        }
    }
}

/// SplitMix64: a small generator whose sequence is fixed by its definition,
/// so intervals do not change with a dependency's version.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A uniform index in `0..n` (multiply-shift; the bias is below 2^-32
    /// for any dataset size).
    fn below(&mut self, n: usize) -> usize {
        ((self.next() as u128 * n as u128) >> 64) as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `n` pairs of noisy scores, `b` worse than `a` on average.
    fn scores(n: usize, seed: u64) -> (Vec<Score>, Vec<Score>) {
        let mut rng = SplitMix64(seed);
        let mut uniform = move || (rng.next() >> 11) as f64 / (1u64 << 53) as f64;
        let mut a = Vec::new();
        let mut b = Vec::new();
        for _ in 0..n {
            let tokens = 5 + (uniform() * 40.0) as usize;
            let base = uniform();
            a.push(Score {
                rouge_l: (base * 0.6 + 0.3 * uniform()).min(1.0),
                nll: tokens as f64 * (0.5 + uniform()),
                tokens,
            });
            b.push(Score {
                rouge_l: (base * 0.5 + 0.3 * uniform()).min(1.0),
                nll: tokens as f64 * (0.7 + uniform()),
                tokens,
            });
        }
        (a, b)
    }

    fn width(i: &Interval) -> f64 {
        i.hi - i.lo
    }

    #[test]
    fn the_interval_contains_the_point_estimate() {
        for (n, seed) in [(10, 1), (30, 2), (200, 3)] {
            let (a, b) = scores(n, seed);
            let d = compare(&a, &b).unwrap();
            assert_eq!(d.samples, n);
            let rouge = d.rouge_l;
            assert!(rouge.lo <= rouge.estimate && rouge.estimate <= rouge.hi, "{rouge:?}");
            let ppl = d.ppl.unwrap();
            assert!(ppl.lo <= ppl.estimate && ppl.estimate <= ppl.hi, "{ppl:?}");
            assert!((rouge.estimate - (mean_rouge_l(&a) - mean_rouge_l(&b))).abs() < 1e-12);
            assert!((ppl.estimate - (pooled_ppl(&a) - pooled_ppl(&b))).abs() < 1e-12);
        }
    }

    #[test]
    fn the_interval_shrinks_with_more_samples() {
        let (a, b) = scores(20, 7);
        let small = compare(&a, &b).unwrap();
        let (a, b) = scores(500, 7);
        let large = compare(&a, &b).unwrap();
        assert!(
            width(&large.rouge_l) < width(&small.rouge_l) / 2.0,
            "{small:?} {large:?}"
        );
        assert!(width(&large.ppl.unwrap()) < width(&small.ppl.unwrap()) / 2.0);
        // With 500 samples the built-in gap is clear.
        assert!(large.rouge_l.significant() && large.ppl.unwrap().significant());
    }

    #[test]
    fn intervals_are_deterministic() {
        let (a, b) = scores(40, 11);
        assert_eq!(compare(&a, &b), compare(&a, &b));
        let other_seed = paired_bootstrap(&a, &b, RESAMPLES, SEED + 1, LEVEL);
        assert_ne!(compare(&a, &b), other_seed);
    }

    #[test]
    fn a_constant_difference_has_a_zero_width_interval_at_that_constant() {
        let (a, _) = scores(25, 5);
        // b is a with every ROUGE-L 0.125 lower and the same NLL: the
        // ROUGE-L difference is 0.125 and the PPL difference 0 on every
        // resample.
        let b: Vec<Score> = a
            .iter()
            .map(|s| Score {
                rouge_l: s.rouge_l - 0.125,
                ..*s
            })
            .collect();
        let d = compare(&a, &b).unwrap();
        assert!(
            (d.rouge_l.lo - 0.125).abs() < 1e-12 && (d.rouge_l.hi - 0.125).abs() < 1e-12,
            "{d:?}"
        );
        assert!((d.rouge_l.estimate - 0.125).abs() < 1e-12);
        assert!(d.rouge_l.significant());
        let ppl = d.ppl.unwrap();
        assert_eq!((ppl.lo, ppl.estimate, ppl.hi), (0.0, 0.0, 0.0));
        assert!(!ppl.significant());

        // Every sample at the same per-token NLL: pooled PPLs are exp(1)
        // and exp(1.5) on every resample.
        let a: Vec<Score> = (1..=30)
            .map(|t| Score {
                rouge_l: 0.5,
                nll: t as f64,
                tokens: t,
            })
            .collect();
        let b: Vec<Score> = a.iter().map(|s| Score { nll: 1.5 * s.nll, ..*s }).collect();
        let d = compare(&a, &b).unwrap();
        let expected = 1f64.exp() - 1.5f64.exp();
        let ppl = d.ppl.unwrap();
        for v in [ppl.lo, ppl.estimate, ppl.hi] {
            assert!((v - expected).abs() < 1e-9, "{ppl:?}");
        }
        assert!(ppl.significant());
        assert_eq!((d.rouge_l.lo, d.rouge_l.hi), (0.0, 0.0));
        assert!(!d.rouge_l.significant());
    }

    #[test]
    fn mismatched_or_unscored_samples() {
        let (a, b) = scores(5, 3);
        assert_eq!(compare(&a, &b[..4]), None);
        assert_eq!(compare(&[], &[]), None);
        let unscored: Vec<Score> = a
            .iter()
            .map(|s| Score {
                nll: 0.0,
                tokens: 0,
                ..*s
            })
            .collect();
        let d = compare(&unscored, &unscored).unwrap();
        assert_eq!(d.ppl, None);
        assert!(pooled_ppl(&unscored).is_nan());
    }

    #[test]
    fn quantiles_interpolate() {
        let v = [1.0, 2.0, 3.0, 5.0];
        assert_eq!(quantile(&v, 0.0), 1.0);
        assert_eq!(quantile(&v, 1.0), 5.0);
        assert_eq!(quantile(&v, 0.5), 2.5);
        assert!((quantile(&v, 5.0 / 6.0) - 4.0).abs() < 1e-12);
        assert_eq!(quantile(&[7.0], 0.3), 7.0);
        assert!(quantile(&[], 0.3).is_nan());
    }

    #[test]
    fn indices_cover_the_range_uniformly() {
        let mut rng = SplitMix64(42);
        let mut counts = [0usize; 7];
        for _ in 0..70_000 {
            counts[rng.below(7)] += 1;
        }
        assert!(counts.iter().all(|&c| (9_400..10_600).contains(&c)), "{counts:?}");
    }
}
