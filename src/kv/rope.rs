//! Rotary position embedding, as the decoder graphs apply it (LLaMA's
//! "rotate half": dimension `i` and `i + d/2` of a head form one pair,
//! rotated by `position * theta^(-2i/d)`).
//!
//! The pool stores keys after RoPE, so moving an entry from position `p` to
//! `p'` is one more rotation of its key by `p' - p` (rotations compose):
//! that is how a long-running memory re-bases positions without running the
//! model again ([`crate::kv::KvPool::remap_positions`]). Values carry no
//! position and do not change.

use crate::error::{Error, Result};
use crate::kv::pool::KvElement;

/// The per-pair frequencies of one head.
#[derive(Clone, Debug, PartialEq)]
pub struct Rope {
    /// `inv_freq[i] = theta^(-2i/d)`, `d/2` of them; angles and rotations
    /// are computed in f64 so their rounding stays far below the keys' f32
    /// precision.
    inv_freq: Vec<f64>,
}

impl Rope {
    /// RoPE over a whole head of `head_dim` (even) with base `theta`.
    pub fn new(head_dim: usize, theta: f64) -> Result<Self> {
        if head_dim == 0 || !head_dim.is_multiple_of(2) {
            return Err(Error::Shape(format!("RoPE needs an even head_dim, not {head_dim}")));
        }
        if !(theta.is_finite() && theta > 1.0) {
            return Err(Error::Shape(format!(
                "RoPE needs a finite rope_theta above 1, not {theta}"
            )));
        }
        let half = head_dim / 2;
        // As the exporter computes them (in f32, then baked into the graph),
        // so a rotation here turns by the same angles the graph used.
        let inv_freq = (0..half)
            .map(|i| f64::from(1.0 / (theta as f32).powf((2 * i) as f32 / head_dim as f32)))
            .collect();
        Ok(Rope { inv_freq })
    }

    pub fn head_dim(&self) -> usize {
        2 * self.inv_freq.len()
    }

    /// Rotates every head of `row` (`[heads][head_dim]`) by `delta`
    /// positions, in place.
    pub fn rotate<E: KvElement>(&self, row: &mut [E], delta: i64) {
        if delta == 0 {
            return;
        }
        let half = self.inv_freq.len();
        for head in row.chunks_exact_mut(2 * half) {
            let (low, high) = head.split_at_mut(half);
            for ((x, y), &f) in low.iter_mut().zip(high.iter_mut()).zip(&self.inv_freq) {
                let (sin, cos) = (delta as f64 * f).sin_cos();
                let (a, b) = (f64::from(x.to_f32()), f64::from(y.to_f32()));
                *x = E::from_f32((a * cos - b * sin) as f32);
                *y = E::from_f32((b * cos + a * sin) as f32);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rotated(rope: &Rope, raw: &[f32], position: i64) -> Vec<f32> {
        let mut row = raw.to_vec();
        rope.rotate(&mut row, position);
        row
    }

    fn dot(a: &[f32], b: &[f32]) -> f32 {
        a.iter().zip(b).map(|(x, y)| x * y).sum()
    }

    /// The proof: attention logits `q . k` between a query and keys
    /// stored post-RoPE are the same before and after every position moves
    /// by one offset (the keys rotated in place, the query at its new
    /// position), within 1e-5 in fp32, up to the demo model's 8192.
    #[test]
    fn a_uniform_rebase_keeps_attention_logits() {
        let rope = Rope::new(64, 100_000.0).unwrap();
        let mut seed = 7u64;
        let mut next = move || {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((seed >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
        };
        let raw_keys: Vec<Vec<f32>> = (0..32).map(|_| (0..64).map(|_| next()).collect()).collect();
        let raw_query: Vec<f32> = (0..64).map(|_| next()).collect();
        let positions: Vec<i64> = (0..32).map(|i| 7000 + 37 * i).collect();
        let query_at = 8191;
        let offset = 6990;

        let mut worst = 0f32;
        for (raw, &p) in raw_keys.iter().zip(&positions) {
            let stored = rotated(&rope, raw, p);
            let before = dot(&rotated(&rope, &raw_query, query_at), &stored);
            let mut moved = stored.clone();
            rope.rotate(&mut moved, -offset);
            let after = dot(&rotated(&rope, &raw_query, query_at - offset), &moved);
            worst = worst.max((before - after).abs());
        }
        assert!(worst < 1e-5, "logits moved by {worst}");
    }

    #[test]
    fn rotations_compose_and_undo() {
        let rope = Rope::new(8, 10_000.0).unwrap();
        let raw = [0.5f32, -1.0, 0.25, 2.0, 1.5, -0.5, 0.0, 1.0];
        let twice = rotated(&rope, &rotated(&rope, &raw, 300), 45);
        let once = rotated(&rope, &raw, 345);
        for (a, b) in twice.iter().zip(&once) {
            assert!((a - b).abs() < 1e-5, "{twice:?} vs {once:?}");
        }
        let back = rotated(&rope, &once, -345);
        for (a, b) in back.iter().zip(&raw) {
            assert!((a - b).abs() < 1e-5, "{back:?} vs {raw:?}");
        }
        // A rotation keeps each pair's length.
        let norm = |v: &[f32]| dot(v, v);
        assert!((norm(&once) - norm(&raw)).abs() < 1e-4);
    }

    #[test]
    fn bad_shapes_are_refused() {
        assert!(Rope::new(7, 10_000.0).is_err());
        assert!(Rope::new(0, 10_000.0).is_err());
        assert!(Rope::new(8, f64::NAN).is_err());
        assert!(Rope::new(8, 1.0).is_err());
    }
}
