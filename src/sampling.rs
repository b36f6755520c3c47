//! How the next token is chosen from the decoder's logits, and where the
//! text ends on a stop string.
//!
//! The steps run in the order transformers and llama.cpp use: the
//! repetition penalty, then either the most likely token (greedy) or
//! temperature, top-k, top-p and a seeded draw. Nothing here allocates per
//! token: the caller owns vocabulary-sized buffers for the whole generation.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::error::{Error, Result};

/// How tokens are chosen. [`Sampling::GREEDY`], the default, takes the most
/// likely token, so evaluations are repeatable.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sampling {
    /// 0 is greedy; above 0, tokens are drawn from `softmax(logits /
    /// temperature)`, cut by `top_k` and `top_p`.
    pub temperature: f32,
    /// Nucleus: a draw keeps the most likely tokens whose probabilities
    /// reach this, in (0, 1]; 1 keeps them all.
    pub top_p: f32,
    /// A draw keeps only this many most likely tokens; 0 keeps them all.
    pub top_k: usize,
    /// CTRL's repetition penalty (Keskar et al., 2019), greedy or not: the
    /// logit of a token this answer has already generated is divided by it
    /// when positive and multiplied by it when negative. 1 is off; above 1
    /// discourages repeats, below 1 favours them.
    ///
    /// Only the answer's own tokens count, not the prompt's (transformers
    /// and llama.cpp also count the prompt): the prompt here is the chat
    /// template around picture rows, and the template holds the end-of-turn
    /// token, which a penalty on it would keep the answer from reaching.
    pub repetition_penalty: f32,
    /// Seed of the draw.
    pub seed: u64,
}

impl Sampling {
    /// The most likely token every step, no penalty.
    pub const GREEDY: Sampling = Sampling {
        temperature: 0.0,
        top_p: 1.0,
        top_k: 0,
        repetition_penalty: 1.0,
        seed: 0,
    };

    /// Whether tokens are the most likely ones (after the penalty), not drawn.
    pub fn is_greedy(&self) -> bool {
        self.temperature <= 0.0
    }

    /// Refuses settings that would make the probabilities NaN or empty: the
    /// error names the setting (`temperature -1: must be ...`).
    pub fn check(&self) -> Result<()> {
        let refuse =
            |what: &'static str, value: f32| move |reason: &'static str| Error::Sampling { what, value, reason };
        check_temperature(self.temperature).map_err(refuse("temperature", self.temperature))?;
        check_top_p(self.top_p).map_err(refuse("top_p", self.top_p))?;
        check_repetition_penalty(self.repetition_penalty).map_err(refuse("repetition_penalty", self.repetition_penalty))
    }
}

impl Default for Sampling {
    fn default() -> Self {
        Sampling::GREEDY
    }
}

/// Why a sampling temperature cannot be used, if it cannot.
pub fn check_temperature(temperature: f32) -> std::result::Result<(), &'static str> {
    if !temperature.is_finite() || temperature < 0.0 {
        return Err("must be a finite number, 0 or more (0 is greedy)");
    }
    Ok(())
}

/// Why a nucleus (top-p) cannot be used, if it cannot.
pub fn check_top_p(top_p: f32) -> std::result::Result<(), &'static str> {
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err("must be a number in (0, 1]: the probability the kept tokens reach");
    }
    Ok(())
}

/// Why a repetition penalty cannot be used, if it cannot.
pub fn check_repetition_penalty(penalty: f32) -> std::result::Result<(), &'static str> {
    if !(penalty.is_finite() && penalty > 0.0) {
        return Err("must be a finite number above 0 (1 is off, above 1 discourages repeats)");
    }
    Ok(())
}

/// Chooses the next token from logits, after [`Sampling`].
#[derive(Debug)]
pub struct Sampler {
    sampling: Sampling,
    rng: StdRng,
}

impl Sampler {
    pub fn new(sampling: Sampling) -> Self {
        Sampler {
            sampling,
            rng: StdRng::seed_from_u64(sampling.seed),
        }
    }

    /// The next token after `generated` (this answer's tokens so far).
    /// `scores` must be as long as `logits` and `candidates` have room for
    /// as many ids: both are scratch, so a step allocates nothing.
    pub fn sample(&mut self, logits: &[f32], generated: &[u32], scores: &mut [f32], candidates: &mut Vec<u32>) -> u32 {
        let Sampling {
            temperature,
            top_p,
            top_k,
            repetition_penalty,
            ..
        } = self.sampling;
        let penalised = repetition_penalty != 1.0 && !generated.is_empty();
        if self.sampling.is_greedy() && !penalised {
            return argmax(logits);
        }
        let scores = &mut scores[..logits.len()];
        scores.copy_from_slice(logits);
        if penalised {
            // From the logits, not the scores: a token generated twice is
            // penalised once.
            for &id in generated {
                if let (Some(score), Some(&logit)) = (scores.get_mut(id as usize), logits.get(id as usize)) {
                    *score = penalise(logit, repetition_penalty);
                }
            }
        }
        if self.sampling.is_greedy() {
            return argmax(scores);
        }
        // Probabilities, unnormalised, in place.
        let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut total = 0.0f64;
        for score in scores.iter_mut() {
            *score = ((*score - max) / temperature).exp();
            total += *score as f64;
        }
        let probabilities = &*scores;
        let by_probability = |a: &u32, b: &u32| probabilities[*b as usize].total_cmp(&probabilities[*a as usize]);
        candidates.clear();
        candidates.extend(0..logits.len() as u32);
        if top_k > 0 && top_k < candidates.len() {
            candidates.select_nth_unstable_by(top_k - 1, by_probability);
            candidates.truncate(top_k);
            // Top-p and the draw see the top-k tokens renormalised.
            total = candidates.iter().map(|&c| probabilities[c as usize] as f64).sum();
        }
        candidates.sort_unstable_by(by_probability);
        let mut kept = 0.0f64;
        let mut cut = candidates.len();
        for (i, &c) in candidates.iter().enumerate() {
            kept += probabilities[c as usize] as f64 / total;
            if kept >= top_p as f64 {
                cut = i + 1;
                break;
            }
        }
        let mut draw = self.rng.random::<f64>() * kept;
        for &c in &candidates[..cut] {
            draw -= probabilities[c as usize] as f64 / total;
            if draw <= 0.0 {
                return c;
            }
        }
        candidates[cut - 1]
    }
}

/// CTRL's rule: a positive logit divided by the penalty, a negative one
/// multiplied, so a penalty above 1 always lowers it.
fn penalise(logit: f32, penalty: f32) -> f32 {
    if logit > 0.0 {
        logit / penalty
    } else {
        logit * penalty
    }
}

/// The index of the largest logit; the first one on ties.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// Most stop strings one generation takes (OpenAI's API allows 4).
pub const MAX_STOP_STRINGS: usize = 16;

/// Why stop strings cannot be used, if they cannot.
pub fn check_stop_strings(stops: &[String]) -> Result<()> {
    if stops.len() > MAX_STOP_STRINGS {
        return Err(Error::StopStrings(format!(
            "{} given, at most {MAX_STOP_STRINGS}",
            stops.len()
        )));
    }
    if stops.iter().any(String::is_empty) {
        return Err(Error::StopStrings("a stop string is empty".into()));
    }
    Ok(())
}

/// Ends generated text on its first stop string. The text is given out as
/// it grows, except an end that could be the start of a stop string: that
/// is held back until the next piece shows it is not (or the text ends).
#[derive(Debug)]
pub struct StopStrings<'a> {
    stops: &'a [String],
    /// Bytes of the text given out. No stop string starts before this: an
    /// end that could have begun one was held back.
    released: usize,
}

/// What [`StopStrings::advance`] found.
#[derive(Debug, PartialEq, Eq)]
pub struct Advance {
    /// The bytes of the text that may be given out now.
    pub ready: std::ops::Range<usize>,
    /// A stop string was found; the text now ends before it.
    pub stopped: bool,
}

impl<'a> StopStrings<'a> {
    pub fn new(stops: &'a [String]) -> Self {
        StopStrings { stops, released: 0 }
    }

    /// After `text` grew: cuts it before a stop string it now contains, and
    /// says what may be given out. Allocates nothing.
    pub fn advance(&mut self, text: &mut String) -> Advance {
        let start = self.released;
        let unreleased = &text[start..];
        if let Some(at) = self.stops.iter().filter_map(|s| unreleased.find(s.as_str())).min() {
            text.truncate(start + at);
            self.released = text.len();
            return Advance {
                ready: start..self.released,
                stopped: true,
            };
        }
        let held = self
            .stops
            .iter()
            .filter_map(|stop| {
                (1..stop.len().min(unreleased.len() + 1))
                    .rev()
                    .filter(|&n| stop.is_char_boundary(n))
                    .find(|&n| unreleased.ends_with(&stop[..n]))
            })
            .max()
            .unwrap_or(0);
        self.released = text.len() - held;
        Advance {
            ready: start..self.released,
            stopped: false,
        }
    }

    /// The text ended: what was held back may go out.
    pub fn finish(&mut self, text: &str) -> std::ops::Range<usize> {
        let start = self.released;
        self.released = text.len();
        start..self.released
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn draws(sampling: Sampling, logits: &[f32], generated: &[u32], count: usize) -> Vec<u32> {
        let mut scores = vec![0.0; logits.len()];
        let mut candidates = Vec::with_capacity(logits.len());
        let mut sampler = Sampler::new(sampling);
        (0..count)
            .map(|_| sampler.sample(logits, generated, &mut scores, &mut candidates))
            .collect()
    }

    fn sampled(temperature: f32, top_p: f32, top_k: usize, seed: u64) -> Sampling {
        Sampling {
            temperature,
            top_p,
            top_k,
            seed,
            ..Sampling::GREEDY
        }
    }

    #[test]
    fn settings_are_checked_and_the_error_names_the_setting() {
        assert!(Sampling::GREEDY.check().is_ok() && Sampling::default() == Sampling::GREEDY);
        assert!(sampled(0.7, 0.9, 40, 0).check().is_ok());
        let bad = [
            (sampled(-1.0, 0.9, 0, 0), "temperature -1: "),
            (sampled(f32::NAN, 0.9, 0, 0), "temperature NaN: "),
            (sampled(f32::INFINITY, 0.9, 0, 0), "temperature inf: "),
            (sampled(0.7, f32::NAN, 0, 0), "top_p NaN: "),
            (sampled(0.7, 0.0, 0, 0), "top_p 0: "),
            (sampled(0.5, 2.0, 0, 0), "top_p 2: "),
        ];
        let penalty = |repetition_penalty| Sampling {
            repetition_penalty,
            ..Sampling::GREEDY
        };
        let bad = bad.into_iter().chain([
            (penalty(0.0), "repetition_penalty 0: "),
            (penalty(-1.3), "repetition_penalty -1.3: "),
            (penalty(f32::NAN), "repetition_penalty NaN: "),
            (penalty(f32::INFINITY), "repetition_penalty inf: "),
        ]);
        for (sampling, start) in bad {
            let err = sampling.check().unwrap_err();
            assert!(matches!(err, Error::Sampling { .. }), "{sampling:?}: {err}");
            assert!(err.to_string().starts_with(start), "{err}");
        }
        assert!(penalty(0.8).check().is_ok() && penalty(1.3).check().is_ok());
    }

    #[test]
    fn argmax_takes_the_first_maximum() {
        assert_eq!(argmax(&[0.1, 0.7, 0.7, -1.0]), 1);
        assert_eq!(argmax(&[3.0]), 0);
    }

    #[test]
    fn top_p_is_seeded_and_stays_in_the_nucleus() {
        let logits = [0.0, 5.0, 4.9, -3.0, 1.0];
        let sampling = sampled(1.0, 0.9, 0, 7);
        let first = draws(sampling, &logits, &[], 50);
        assert_eq!(first, draws(sampling, &logits, &[], 50), "same seed, same tokens");
        assert!(first.iter().all(|&t| t == 1 || t == 2), "{first:?}");
        assert!(first.contains(&1) && first.contains(&2));
        assert_ne!(first, draws(sampled(1.0, 0.9, 0, 8), &logits, &[], 50), "another seed");
    }

    #[test]
    fn top_k_keeps_the_k_most_likely() {
        // Nearly flat: without top-k every token is drawn.
        let logits = [0.3, 0.0, 0.25, 0.1, 0.2, 0.05];
        let all = draws(sampled(1.0, 1.0, 0, 1), &logits, &[], 400);
        assert!((0..6).all(|t| all.contains(&t)), "{all:?}");
        let top3 = draws(sampled(1.0, 1.0, 3, 1), &logits, &[], 400);
        assert!(top3.iter().all(|t| [0, 2, 4].contains(t)), "{top3:?}");
        assert!([0, 2, 4].iter().all(|t| top3.contains(t)), "{top3:?}");
        assert!(draws(sampled(1.0, 1.0, 1, 1), &logits, &[], 50).iter().all(|&t| t == 0));
        // Past the vocabulary it is off; with top-p, the nucleus is taken
        // within the top k (0.3 and 0.25 reach half of the top 3).
        assert_eq!(draws(sampled(1.0, 1.0, 99, 1), &logits, &[], 400), all);
        let nucleus = draws(sampled(1.0, 0.6, 3, 1), &logits, &[], 400);
        assert!(
            nucleus.iter().all(|t| [0, 2].contains(t)) && nucleus.contains(&2),
            "{nucleus:?}"
        );
    }

    #[test]
    fn a_repetition_penalty_changes_what_greedy_picks_and_counts_a_token_once() {
        let logits = [1.0, 3.0, 2.5, -1.0, -1.1];
        let greedy = |repetition_penalty, generated: &[u32]| {
            let sampling = Sampling {
                repetition_penalty,
                ..Sampling::GREEDY
            };
            draws(sampling, &logits, generated, 1)[0]
        };
        assert_eq!(greedy(1.0, &[1, 1, 1]), 1, "off at 1");
        assert_eq!(greedy(1.3, &[]), 1, "nothing generated yet");
        // 3 / 1.3 = 2.31 < 2.5: token 2 wins.
        assert_eq!(greedy(1.3, &[1]), 2);
        // Counted once: three 1s are still 3 / 1.3, not 3 / 1.3^3.
        assert_eq!(greedy(1.15, &[1, 1, 1]), 1);
        // Negative logits are multiplied: -1 * 1.3 = -1.3 < -1.1.
        let negative = [-1.0, -1.1];
        let sampling = Sampling {
            repetition_penalty: 1.3,
            ..Sampling::GREEDY
        };
        assert_eq!(draws(sampling, &negative, &[], 1)[0], 0);
        assert_eq!(draws(sampling, &negative, &[0], 1)[0], 1);
        // Below 1 it favours repeats; ids outside the logits are ignored.
        assert_eq!(greedy(0.5, &[2, 99]), 2);
        // A draw sees the penalised logits too.
        let peaked = [10.0, 9.0];
        let drawn = draws(
            Sampling {
                repetition_penalty: 2.0,
                ..sampled(0.5, 1.0, 0, 3)
            },
            &peaked,
            &[0],
            20,
        );
        assert!(drawn.iter().all(|&t| t == 1), "{drawn:?}");
    }

    #[test]
    fn stop_strings_are_checked() {
        assert!(check_stop_strings(&[]).is_ok());
        assert!(check_stop_strings(&["\n".into(), "Demon".into()]).is_ok());
        let err = check_stop_strings(&["x".into(), String::new()]).unwrap_err();
        assert_eq!(err.to_string(), "stop strings: a stop string is empty");
        let many = vec!["x".to_string(); MAX_STOP_STRINGS + 1];
        assert!(check_stop_strings(&many).unwrap_err().to_string().contains("at most"));
    }

    /// Feeds `pieces` through [`StopStrings`] as the decode loop does;
    /// returns what was given out and whether a stop string ended it.
    fn stream(stops: &[&str], pieces: &[&str]) -> (Vec<String>, String, bool) {
        let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
        let mut stop = StopStrings::new(&stops);
        let mut text = String::new();
        let mut out = Vec::new();
        for piece in pieces {
            text.push_str(piece);
            let advance = stop.advance(&mut text);
            out.push(text[advance.ready].to_string());
            if advance.stopped {
                return (out, text, true);
            }
        }
        out.push(text[stop.finish(&text)].to_string());
        (out, text, false)
    }

    #[test]
    fn a_stop_string_ends_the_text_and_its_start_is_held_back() {
        let (out, text, stopped) = stream(
            &["STOP", "\n\n"],
            &["Hello ", "S", "T", "rong ", "wor", "ld ST", "OP and more"],
        );
        assert!(stopped);
        assert_eq!(text, "Hello STrong world ");
        assert_eq!(out, ["Hello ", "", "", "STrong ", "wor", "ld ", ""]);
        // Not a stop after all: held, then given out at the end.
        let (out, text, stopped) = stream(&["STOP"], &["ends with S", "T"]);
        assert!(!stopped);
        assert_eq!(out, ["ends with ", "", "ST"]);
        assert_eq!(text, "ends with ST");
        // Found inside one piece, across pieces, at the very start; the
        // earliest of two wins.
        assert_eq!(stream(&["Demon"], &["WhatDemonWhat"]).1, "What");
        assert_eq!(stream(&["Demon"], &["WhatDe", "mon"]).0, ["What", ""]);
        assert_eq!(stream(&["What"], &["What"]), (vec![String::new()], String::new(), true));
        assert_eq!(stream(&["b", "a"], &["xxab"]).1, "xx");
        // No stop strings: everything goes out as it comes.
        assert_eq!(stream(&[], &["a", "b"]).0, ["a", "b", ""]);
        // Multi-byte stop strings are held on character boundaries.
        let (out, text, stopped) = stream(&["日本語"], &["x日", "本", "人"]);
        assert_eq!(
            (out.concat(), text, stopped),
            ("x日本人".to_string(), "x日本人".to_string(), false)
        );
        assert_eq!(stream(&["日本語"], &["x日", "本"]).0, ["x", "", "日本"]);
        assert_eq!(stream(&["語"], &["日本語です"]).1, "日本");
    }
}
