//! The camera memory's quality: the dataset's pictures shown in turn as
//! frames of one memory, then a question about the first frame and one
//! about the last, under each policy with the pool cut to a share of what
//! the full cache used. The paper's protocol, per question: ROUGE-L of the
//! policy's answer against the full cache's, and the perplexity of the full
//! cache's answer under the policy (teacher forced).
//!
//! Sequence `k` shows the distinct single pictures `k, k+1, ...` (wrapping),
//! so every picture is the early frame once. The "keep" of a run is the
//! pool's capacity over the entries the full cache held after the frames;
//! a keep too small for one frame is raised to the memory's minimum and the
//! capacity actually used is reported.

use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use crate::error::{Error, Result};
use crate::eval::dataset::Sample;
use crate::eval::rouge::rouge_l_f;
use crate::eval::stats::{self, Score};
use crate::eval::sweep::Progress;
use crate::generate::{GenerateParams, Generator, ImageInput, Sampling};
use crate::kv::{KeepRatio, KvCache, KvPool, PolicyConfig, PolicyKind, PoolBacking};
use crate::memory::{Memory, MemoryOptions};
use crate::model::Model;

#[derive(Clone, Debug)]
pub struct MemoryEvalConfig {
    pub policies: Vec<PolicyKind>,
    pub keeps: Vec<KeepRatio>,
    /// Frames per sequence.
    pub frames: usize,
    pub max_new_tokens: usize,
    pub policy_config: PolicyConfig,
    pub out: PathBuf,
}

/// One run of one sequence: the two answers and what the memory held.
#[derive(Clone, Debug)]
struct SequenceRun {
    answers: [String; 2],
    answer_ids: [Vec<u32>; 2],
    /// Whether the first frame had entries left when it was asked about.
    early_frame_kept: bool,
    /// Entries after the frames, before the first question.
    entries_after_frames: usize,
}

/// One policy at one keep over every sequence.
#[derive(Clone, Debug, serde::Serialize)]
pub struct MemoryRow {
    pub policy: PolicyKind,
    pub keep: f64,
    pub sequences: usize,
    /// Mean pool slots used.
    pub capacity: f64,
    pub early_rouge_l: f64,
    pub last_rouge_l: f64,
    pub early_ppl: f64,
    pub last_ppl: f64,
    /// Share of early answers identical to the full cache's.
    pub early_same: f64,
    /// Share of runs where the first frame still had entries when asked.
    pub early_frame_kept: f64,
    pub seconds: f64,
}

/// The question about frame `i` of a sequence.
fn question(frame: usize, last: bool) -> String {
    match last {
        false => format!("What was seen in frame {frame}? Answer in one short sentence."),
        true => format!("What is seen in frame {frame}? Answer in one short sentence."),
    }
}

/// Sequences of `frames` distinct single pictures from `samples`.
pub fn sequences(samples: &[Sample], frames: usize) -> Result<Vec<Vec<PathBuf>>> {
    let mut seen = HashSet::new();
    let pictures: Vec<PathBuf> = samples
        .iter()
        .filter(|s| s.images.len() == 1)
        .filter(|s| seen.insert(s.images[0].clone()))
        .map(|s| s.images[0].clone())
        .collect();
    if frames < 2 || pictures.len() < frames {
        return Err(Error::Plan(format!(
            "memory sequences of {frames} frames need at least 2 frames and as many distinct pictures; the dataset has {}",
            pictures.len()
        )));
    }
    Ok((0..pictures.len())
        .map(|k| {
            (0..frames)
                .map(|j| pictures[(k + j) % pictures.len()].clone())
                .collect()
        })
        .collect())
}

/// Runs the memory evaluation and writes `memory.csv`, `memory-samples.csv`
/// and `memory.md` into `config.out`.
pub fn run(
    model: &mut Model,
    samples: &[Sample],
    config: &MemoryEvalConfig,
    progress: Progress<'_>,
) -> Result<Vec<MemoryRow>> {
    std::fs::create_dir_all(&config.out).map_err(|e| io_error(&config.out, e))?;
    let sequences = sequences(samples, config.frames)?;
    let compressing: Vec<PolicyKind> = config
        .policies
        .iter()
        .copied()
        .filter(|&p| p != PolicyKind::Full)
        .collect();
    let total = (sequences.len() * 2 * (1 + compressing.len() * config.keeps.len())) as u64;
    let mut done = 0;
    let params = GenerateParams {
        max_new_tokens: config.max_new_tokens,
        sampling: Sampling::GREEDY,
        stop_strings: Vec::new(),
        ignore_stop: false,
    };
    let shape = model.manifest.kv_shape();
    let full_slots = |frames: usize| frames * 200 + 4 * config.max_new_tokens + 400;

    // The full cache: the references and their own perplexity.
    let started = Instant::now();
    let mut references = Vec::with_capacity(sequences.len());
    let mut per_sequence: Vec<(String, f64, [Score; 2], bool, usize)> = Vec::new();
    let mut full_scores = Vec::new();
    for (k, pictures) in sequences.iter().enumerate() {
        progress(done, total, &format!("full sequence {k}"));
        let cache = memory_cache(
            shape,
            PolicyKind::Full,
            &config.policy_config,
            full_slots(pictures.len()),
        )?;
        let mut generator = Generator::new(model, cache)?;
        let run = show_and_ask(&mut generator, pictures, &params, true)?;
        done += 1;
        let nll = show_and_score(&mut generator, pictures, &run.answer_ids, true)?;
        done += 1;
        let scores = [0, 1].map(|q| Score {
            rouge_l: 1.0,
            nll: nll[q].0,
            tokens: nll[q].1,
        });
        full_scores.push(scores);
        references.push(run);
    }
    let mut rows = vec![row(
        PolicyKind::Full,
        1.0,
        &references
            .iter()
            .map(|r| r.entries_after_frames as f64)
            .collect::<Vec<_>>(),
        &full_scores,
        &vec![true; references.len()],
        &vec![true; references.len()],
        started.elapsed(),
    )];
    for (k, scores) in full_scores.iter().enumerate() {
        per_sequence.push((
            format!("full,1,{k}"),
            references[k].entries_after_frames as f64,
            *scores,
            true,
            // The full cache's answer is its own reference.
            1,
        ));
    }

    let mut all_scores: Vec<(PolicyKind, f64, Vec<[Score; 2]>)> = vec![(PolicyKind::Full, 1.0, full_scores)];
    for &policy in &compressing {
        for &keep in &config.keeps {
            let started = Instant::now();
            let (mut capacities, mut scores, mut same, mut kept) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            for (k, pictures) in sequences.iter().enumerate() {
                progress(done, total, &format!("{policy} keep {} sequence {k}", keep.get()));
                let reference = &references[k];
                let wanted = (keep.get() * reference.entries_after_frames as f64).ceil() as usize;
                let slots = fitted_slots(model, policy, &config.policy_config, wanted)?;
                let cache = memory_cache(shape, policy, &config.policy_config, slots)?;
                let mut generator = Generator::new(model, cache)?;
                let run = show_and_ask(&mut generator, pictures, &params, false)?;
                done += 1;
                let nll = show_and_score(&mut generator, pictures, &reference.answer_ids, false)?;
                done += 1;
                let pair = [0, 1].map(|q| Score {
                    rouge_l: rouge_l_f(&run.answers[q], &reference.answers[q]).unwrap_or(1.0),
                    nll: nll[q].0,
                    tokens: nll[q].1,
                });
                capacities.push(slots as f64);
                same.push(run.answers[0] == reference.answers[0]);
                kept.push(run.early_frame_kept);
                per_sequence.push((
                    format!("{policy},{},{k}", keep.get()),
                    slots as f64,
                    pair,
                    run.early_frame_kept,
                    usize::from(run.answers[0] == reference.answers[0]),
                ));
                scores.push(pair);
            }
            rows.push(row(
                policy,
                keep.get(),
                &capacities,
                &scores,
                &same,
                &kept,
                started.elapsed(),
            ));
            all_scores.push((policy, keep.get(), scores));
        }
    }
    progress(done, total, "writing");
    write_reports(&config.out, &rows, &all_scores, &per_sequence)?;
    Ok(rows)
}

/// `wanted` slots, or the fewest a memory can run in when that is more.
fn fitted_slots(model: &mut Model, policy: PolicyKind, config: &PolicyConfig, wanted: usize) -> Result<usize> {
    let shape = model.manifest.kv_shape();
    let cache = match memory_cache(shape, policy, config, wanted.max(1)) {
        Ok(cache) => cache,
        Err(Error::BudgetTooSmall { min_slots, .. }) => memory_cache(shape, policy, config, min_slots)?,
        Err(other) => return Err(other),
    };
    let mut generator = Generator::new(model, cache)?;
    match Memory::new(&mut generator, MemoryOptions::default(), true) {
        Ok(_) => Ok(wanted.max(generator.cache().pool().capacity())),
        Err(Error::BudgetTooSmall { min_slots, .. }) => Ok(min_slots),
        Err(other) => Err(other),
    }
}

fn memory_cache(shape: crate::kv::KvShape, policy: PolicyKind, config: &PolicyConfig, slots: usize) -> Result<KvCache> {
    let pool = KvPool::with_capacity(shape, slots, &PoolBacking::Anonymous)?;
    KvCache::new(pool, policy, config, KeepRatio::FULL)
}

/// Deterministic frame times: 08:00:00 on a fixed day, a second apart.
fn frame_time(i: usize) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_798_790_400 + 8 * 3600 + i as u64)
}

/// A new memory with the pictures as its frames, a second apart.
fn show_frames(generator: &mut Generator<'_>, pictures: &[PathBuf], allow_full: bool) -> Result<Memory> {
    let mut memory = Memory::new(generator, MemoryOptions::default(), allow_full)?;
    for (i, picture) in pictures.iter().enumerate() {
        memory.add_frame(
            generator,
            i as u64,
            frame_time(i),
            ImageInput::File(picture),
            &mut |_| {},
        )?;
    }
    Ok(memory)
}

/// Shows the pictures as frames, then asks about the first and the last.
fn show_and_ask(
    generator: &mut Generator<'_>,
    pictures: &[PathBuf],
    params: &GenerateParams,
    allow_full: bool,
) -> Result<SequenceRun> {
    let mut memory = show_frames(generator, pictures, allow_full)?;
    let entries_after_frames = generator.cache().pool().len();
    memory.figures(generator);
    let early_frame_kept = memory.frame_ids().next() == Some(0);
    let last = pictures.len() - 1;
    let early = memory.ask(generator, &question(0, false), params, &mut |_| {})?;
    let late = memory.ask(generator, &question(last, true), params, &mut |_| {})?;
    Ok(SequenceRun {
        answers: [early.text.trim().to_string(), late.text.trim().to_string()],
        answer_ids: [early.token_ids, late.token_ids],
        early_frame_kept,
        entries_after_frames,
    })
}

/// Shows the pictures, then scores the full cache's two answers in turn.
fn show_and_score(
    generator: &mut Generator<'_>,
    pictures: &[PathBuf],
    answers: &[Vec<u32>; 2],
    allow_full: bool,
) -> Result<[(f64, usize); 2]> {
    let mut memory = show_frames(generator, pictures, allow_full)?;
    let last = pictures.len() - 1;
    let mut score = |q: usize, text: String| -> Result<(f64, usize)> {
        match answers[q].is_empty() {
            true => Ok((0.0, 0)),
            false => memory.score(generator, &text, &answers[q]),
        }
    };
    Ok([score(0, question(0, false))?, score(1, question(last, true))?])
}

fn row(
    policy: PolicyKind,
    keep: f64,
    capacities: &[f64],
    scores: &[[Score; 2]],
    same: &[bool],
    kept: &[bool],
    elapsed: Duration,
) -> MemoryRow {
    let n = scores.len();
    let share = |flags: &[bool]| flags.iter().filter(|&&f| f).count() as f64 / flags.len().max(1) as f64;
    let of = |q: usize| scores.iter().map(|s| s[q]).collect::<Vec<_>>();
    MemoryRow {
        policy,
        keep,
        sequences: n,
        capacity: capacities.iter().sum::<f64>() / capacities.len().max(1) as f64,
        early_rouge_l: stats::mean_rouge_l(&of(0)),
        last_rouge_l: stats::mean_rouge_l(&of(1)),
        early_ppl: stats::pooled_ppl(&of(0)),
        last_ppl: stats::pooled_ppl(&of(1)),
        early_same: share(same),
        early_frame_kept: share(kept),
        seconds: elapsed.as_secs_f64(),
    }
}

fn write_reports(
    out: &Path,
    rows: &[MemoryRow],
    all: &[(PolicyKind, f64, Vec<[Score; 2]>)],
    per_sequence: &[(String, f64, [Score; 2], bool, usize)],
) -> Result<()> {
    let mut csv = String::from(
        "policy,keep,sequences,capacity,early_rouge_l,last_rouge_l,early_ppl,last_ppl,early_same,early_frame_kept,seconds\n",
    );
    for r in rows {
        csv.push_str(&format!(
            "{},{},{},{:.1},{:.6},{:.6},{:.6},{:.6},{:.4},{:.4},{:.1}\n",
            r.policy,
            r.keep,
            r.sequences,
            r.capacity,
            r.early_rouge_l,
            r.last_rouge_l,
            r.early_ppl,
            r.last_ppl,
            r.early_same,
            r.early_frame_kept,
            r.seconds
        ));
    }
    write(&out.join("memory.csv"), &csv)?;
    let mut samples = String::from(
        "policy,keep,sequence,capacity,early_rouge_l,early_nll,early_tokens,last_rouge_l,last_nll,last_tokens,early_frame_kept,early_same\n",
    );
    for (key, capacity, s, kept, same) in per_sequence {
        samples.push_str(&format!(
            "{key},{capacity},{:.6},{:.6},{},{:.6},{:.6},{},{},{}\n",
            s[0].rouge_l, s[0].nll, s[0].tokens, s[1].rouge_l, s[1].nll, s[1].tokens, kept, same
        ));
    }
    write(&out.join("memory-samples.csv"), &samples)?;

    let mut md = String::from(
        "| policy | keep | pool slots | early ROUGE-L | last ROUGE-L | early PPL | last PPL | early answer as full | first frame still held |\n|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        md.push_str(&format!(
            "| {} | {} | {:.0} | {:.3} | {:.3} | {:.2} | {:.2} | {:.0}% | {:.0}% |\n",
            r.policy,
            r.keep,
            r.capacity,
            r.early_rouge_l,
            r.last_rouge_l,
            r.early_ppl,
            r.last_ppl,
            100.0 * r.early_same,
            100.0 * r.early_frame_kept
        ));
    }
    md.push_str(
        "\nPaired bootstrap 95% intervals of elastic minus each baseline, over both questions of every sequence:\n\n\
         | keep | baseline | ROUGE-L difference | PPL difference |\n|---|---|---|---|\n",
    );
    for (policy, keep, scores) in all {
        if *policy != PolicyKind::Elastic {
            continue;
        }
        let ours: Vec<Score> = scores.iter().flatten().copied().collect();
        for (other, other_keep, theirs) in all {
            if *other == PolicyKind::Elastic || *other == PolicyKind::Full || other_keep != keep {
                continue;
            }
            let theirs: Vec<Score> = theirs.iter().flatten().copied().collect();
            if let Some(d) = stats::compare(&ours, &theirs) {
                let ppl = d.ppl.map_or("-".to_string(), |p| {
                    format!("{:+.2} [{:+.2}, {:+.2}]", p.estimate, p.lo, p.hi)
                });
                md.push_str(&format!(
                    "| {keep} | {other} | {:+.3} [{:+.3}, {:+.3}] | {ppl} |\n",
                    d.rouge_l.estimate, d.rouge_l.lo, d.rouge_l.hi
                ));
            }
        }
    }
    write(&out.join("memory.md"), &md)
}

fn write(path: &Path, text: &str) -> Result<()> {
    let mut file = std::fs::File::create(path).map_err(|e| io_error(path, e))?;
    file.write_all(text.as_bytes()).map_err(|e| io_error(path, e))
}

fn io_error(path: &Path, source: std::io::Error) -> Error {
    Error::Output {
        target: path.display().to_string(),
        source,
    }
}
