//! The paper's protocol over a dataset: for every policy and keep ratio,
//! ROUGE-L of the greedy answer against the full cache's greedy answer, and
//! the perplexity of a reference answer (the dataset's, or the full cache's)
//! under teacher forcing with the policy applied after every step.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use sha2::{Digest, Sha256};

use super::dataset::Sample;
use super::rouge::rouge_l_f;
use crate::error::{Error, Result};
use crate::generate::{GenerateParams, Generator, ImageInput, Sampling};
use crate::kv::{KeepRatio, KvBudget, KvCache, PolicyConfig, PolicyKind, PoolBacking};
use crate::model::Model;

#[derive(Clone, Debug)]
pub struct SweepConfig {
    pub policies: Vec<PolicyKind>,
    pub keeps: Vec<KeepRatio>,
    pub max_new_tokens: usize,
    pub budget: KvBudget,
    pub policy_config: PolicyConfig,
    pub out: PathBuf,
}

/// One policy at one keep ratio, over the whole dataset.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Row {
    pub policy: PolicyKind,
    pub keep: f64,
    pub samples: usize,
    /// Mean ROUGE-L F against the full cache's answers.
    pub rouge_l: f64,
    /// `exp(total NLL / scored tokens)` over all samples.
    pub ppl: f64,
    pub scored_tokens: usize,
    /// Mean cache entries after the reference answer was scored (prompt
    /// and answer processed, the policy applied).
    pub mean_entries: f64,
    pub seconds: f64,
}

/// The full cache's greedy answer to one sample.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
struct Reference {
    key: String,
    id: String,
    text: String,
    ids: Vec<u32>,
}

/// Progress: `(done, total, what)`.
pub type Progress<'a> = &'a mut dyn FnMut(u64, u64, &str);

/// Runs the sweep and writes `results.csv`, `results.md` and `results.svg`
/// into `config.out`. Full-cache answers are cached in
/// `references.jsonl` there, so a rerun or an added policy reuses them.
/// Results are written under `.partial` names first and renamed when the
/// sweep is complete.
pub fn run(model: &mut Model, samples: &[Sample], config: &SweepConfig, progress: Progress<'_>) -> Result<Vec<Row>> {
    std::fs::create_dir_all(&config.out).map_err(|e| io_error(&config.out, e))?;
    let compressing: Vec<PolicyKind> = config
        .policies
        .iter()
        .copied()
        .filter(|&p| p != PolicyKind::Full)
        .collect();
    let total = (samples.len() * (2 + 2 * compressing.len() * config.keeps.len())) as u64;
    let mut done = 0u64;

    let references = full_cache_references(model, samples, config, &mut done, total, progress)?;
    let mut rows = Vec::new();
    let mut runs = vec![(PolicyKind::Full, KeepRatio::FULL)];
    for &policy in &compressing {
        for &keep in &config.keeps {
            runs.push((policy, keep));
        }
    }
    for (policy, keep) in runs {
        let started = Instant::now();
        let label = format!("{policy} keep {}", keep.get());
        let cache = new_cache(model.manifest.kv_shape(), config, policy, keep)?;
        let mut generator = Generator::new(model, cache)?;
        let (mut rouge_sum, mut nll, mut tokens, mut entries) = (0.0, 0.0, 0, 0usize);
        for (sample, reference) in samples.iter().zip(&references) {
            let image = sample.image.as_deref().map(ImageInput::File);
            let answer = if policy == PolicyKind::Full {
                reference.text.clone()
            } else {
                let params = GenerateParams {
                    max_new_tokens: config.max_new_tokens,
                    sampling: Sampling::Greedy,
                    ignore_stop: false,
                };
                generator
                    .generate(image.as_slice(), Some(&sample.prompt), &params, &mut |_| {})?
                    .text
            };
            rouge_sum += rouge_l_f(&answer, &reference.text).unwrap_or(0.0);
            done += 1;
            progress(done, total, &label);
            let target = match &sample.reference {
                Some(text) => generator.model().prompt.encode(text)?,
                None => reference.ids.clone(),
            };
            if !target.is_empty() {
                let (sample_nll, count) = generator.score(image.as_slice(), Some(&sample.prompt), &target)?;
                nll += sample_nll;
                tokens += count;
                entries += generator.cache().pool().len();
            }
            done += 1;
            progress(done, total, &label);
        }
        let n = samples.len().max(1) as f64;
        rows.push(Row {
            policy,
            keep: keep.get(),
            samples: samples.len(),
            rouge_l: rouge_sum / n,
            ppl: if tokens > 0 {
                (nll / tokens as f64).exp()
            } else {
                f64::NAN
            },
            scored_tokens: tokens,
            mean_entries: entries as f64 / n,
            seconds: started.elapsed().as_secs_f64(),
        });
        write_reports(&config.out, &rows, true)?;
    }
    write_reports(&config.out, &rows, false)?;
    Ok(rows)
}

fn new_cache(shape: crate::kv::KvShape, config: &SweepConfig, policy: PolicyKind, keep: KeepRatio) -> Result<KvCache> {
    KvCache::with_budget(
        shape,
        config.budget,
        &PoolBacking::Anonymous,
        policy,
        &config.policy_config,
        keep,
    )
}

fn full_cache_references(
    model: &mut Model,
    samples: &[Sample],
    config: &SweepConfig,
    done: &mut u64,
    total: u64,
    progress: Progress<'_>,
) -> Result<Vec<Reference>> {
    let path = config.out.join("references.jsonl");
    let mut cached: HashMap<String, Reference> = HashMap::new();
    if let Ok(text) = std::fs::read_to_string(&path) {
        for line in text.lines() {
            if let Ok(reference) = serde_json::from_str::<Reference>(line) {
                cached.insert(reference.key.clone(), reference);
            }
        }
    }
    let model_key = model
        .manifest
        .file_hashes
        .get(&model.manifest.files.decoder)
        .map(|h| h.sha256.clone())
        .unwrap_or_default();
    let shape = model.manifest.kv_shape();
    let cache = new_cache(shape, config, PolicyKind::Full, KeepRatio::FULL)?;
    let mut generator = Generator::new(model, cache)?;
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(|e| io_error(&path, e))?;
    let mut references = Vec::with_capacity(samples.len());
    for sample in samples {
        let key = reference_key(&model_key, sample, config.max_new_tokens);
        let reference = match cached.get(&key) {
            Some(reference) => reference.clone(),
            None => {
                let params = GenerateParams {
                    max_new_tokens: config.max_new_tokens,
                    sampling: Sampling::Greedy,
                    ignore_stop: false,
                };
                let image = sample.image.as_deref().map(ImageInput::File);
                let generation = generator.generate(image.as_slice(), Some(&sample.prompt), &params, &mut |_| {})?;
                let mut ids = generation.token_ids;
                ids.extend(generation.stop_token);
                let reference = Reference {
                    key,
                    id: sample.id.clone(),
                    text: generation.text,
                    ids,
                };
                let line = serde_json::to_string(&reference).map_err(|e| Error::Shape(e.to_string()))?;
                writeln!(file, "{line}").map_err(|e| io_error(&path, e))?;
                reference
            }
        };
        references.push(reference);
        *done += 2;
        progress(*done, total, "full-cache answers");
    }
    Ok(references)
}

fn reference_key(model_key: &str, sample: &Sample, max_new_tokens: usize) -> String {
    let mut hasher = Sha256::new();
    hasher.update(model_key.as_bytes());
    hasher.update(sample.prompt.as_bytes());
    hasher.update([0]);
    if let Some(image) = &sample.image {
        hasher.update(image.to_string_lossy().as_bytes());
    }
    hasher.update(max_new_tokens.to_le_bytes());
    hasher.finalize().iter().take(16).fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

fn io_error(path: &Path, e: std::io::Error) -> Error {
    Error::Dataset {
        path: path.to_path_buf(),
        line: 0,
        reason: e.to_string(),
    }
}

/// Rewrites `results.md` and `results.svg` in `dir` from its `results.csv`.
pub fn replot(dir: &Path) -> Result<Vec<Row>> {
    let path = dir.join("results.csv");
    let text = std::fs::read_to_string(&path).map_err(|e| io_error(&path, e))?;
    let mut rows = Vec::new();
    for (index, line) in text.lines().enumerate().skip(1) {
        let bad = |what: &str| Error::Dataset {
            path: path.clone(),
            line: index + 1,
            reason: format!("bad {what}"),
        };
        let fields: Vec<&str> = line.split(',').collect();
        if fields.len() != 8 {
            return Err(bad("number of fields"));
        }
        let number = |i: usize| fields[i].parse::<f64>().map_err(|_| bad("number"));
        rows.push(Row {
            policy: fields[0].parse().map_err(|_| bad("policy"))?,
            keep: number(1)?,
            samples: number(2)? as usize,
            rouge_l: number(3)?,
            ppl: number(4)?,
            scored_tokens: number(5)? as usize,
            mean_entries: number(6)?,
            seconds: number(7)?,
        });
    }
    write_reports(dir, &rows, false)?;
    Ok(rows)
}

/// Writes the CSV, the markdown table and the plot; `partial` ones go to
/// `*.partial` names, the final ones replace them.
fn write_reports(dir: &Path, rows: &[Row], partial: bool) -> Result<()> {
    let suffix = if partial { ".partial" } else { "" };
    let mut csv = String::from("policy,keep,samples,rouge_l,ppl,scored_tokens,mean_entries,seconds\n");
    let mut md = String::from(
        "| policy | keep | ROUGE-L | PPL | samples | scored tokens | cache entries | seconds |\n|---|---|---|---|---|---|---|---|\n",
    );
    for row in rows {
        let _ = writeln!(
            csv,
            "{},{},{},{:.6},{:.6},{},{:.1},{:.1}",
            row.policy, row.keep, row.samples, row.rouge_l, row.ppl, row.scored_tokens, row.mean_entries, row.seconds
        );
        let _ = writeln!(
            md,
            "| {} | {} | {:.3} | {:.3} | {} | {} | {:.1} | {:.0} |",
            row.policy, row.keep, row.rouge_l, row.ppl, row.samples, row.scored_tokens, row.mean_entries, row.seconds
        );
    }
    for (name, text) in [("results.csv", csv), ("results.md", md), ("results.svg", plot(rows))] {
        let path = dir.join(format!("{name}{suffix}"));
        std::fs::write(&path, text).map_err(|e| io_error(&path, e))?;
    }
    if !partial {
        for name in ["results.csv", "results.md", "results.svg"] {
            let _ = std::fs::remove_file(dir.join(format!("{name}.partial")));
        }
    }
    Ok(())
}

/// Two panels like the paper's Figure 2: ROUGE-L and PPL against the keep
/// ratio, one line per policy; the full cache as a dashed level.
fn plot(rows: &[Row]) -> String {
    const W: f64 = 360.0;
    const H: f64 = 260.0;
    const M: f64 = 45.0;
    let colors = [
        ("local", "#1f77b4"),
        ("h2o", "#ff7f0e"),
        ("elastic", "#2ca02c"),
        ("elastic-ref", "#9467bd"),
    ];
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{}\" height=\"{}\" font-family=\"sans-serif\" font-size=\"11\">\n",
        2.0 * W,
        H + 30.0
    );
    // PPL on a log scale: the worst policies are orders of magnitude off.
    for (panel, (title, value, log)) in [
        (
            "ROUGE-L vs full cache (higher is better)",
            (|r: &Row| r.rouge_l) as fn(&Row) -> f64,
            false,
        ),
        ("PPL, log scale (lower is better)", |r: &Row| r.ppl.ln(), true),
    ]
    .into_iter()
    .enumerate()
    {
        let x0 = panel as f64 * W;
        let values: Vec<f64> = rows.iter().map(value).filter(|v| v.is_finite()).collect();
        let (mut lo, mut hi) = values
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &v| (a.min(v), b.max(v)));
        if !lo.is_finite() {
            continue;
        }
        if hi - lo < 1e-9 {
            lo -= 0.5;
            hi += 0.5;
        }
        let px = |keep: f64| x0 + M + keep * (W - 2.0 * M);
        let py = |v: f64| H - M + 10.0 - (v - lo) / (hi - lo) * (H - 2.0 * M);
        let _ = writeln!(svg, "<text x=\"{}\" y=\"16\">{title}</text>", x0 + M);
        let _ = writeln!(
            svg,
            "<line x1=\"{0}\" y1=\"{1}\" x2=\"{2}\" y2=\"{1}\" stroke=\"black\"/><line x1=\"{0}\" y1=\"{1}\" x2=\"{0}\" y2=\"{3}\" stroke=\"black\"/>",
            px(0.0),
            py(lo),
            px(1.0),
            py(hi)
        );
        for tick in [0.1, 0.3, 0.5, 0.7, 0.9] {
            let _ = writeln!(
                svg,
                "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{tick}</text>",
                px(tick),
                py(lo) + 14.0
            );
        }
        for v in [lo, (lo + hi) / 2.0, hi] {
            let shown = if log { v.exp() } else { v };
            let _ = writeln!(
                svg,
                "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{shown:.2}</text>",
                px(0.0) - 4.0,
                py(v) + 4.0
            );
        }
        let _ = writeln!(
            svg,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">keep ratio</text>",
            px(0.5),
            py(lo) + 28.0
        );
        if let Some(full) = rows.iter().find(|r| r.policy == PolicyKind::Full) {
            let y = py(value(full));
            let _ = writeln!(
                svg,
                "<line x1=\"{}\" y1=\"{y}\" x2=\"{}\" y2=\"{y}\" stroke=\"gray\" stroke-dasharray=\"4 3\"/>",
                px(0.0),
                px(1.0)
            );
        }
        for (i, (name, color)) in colors.iter().enumerate() {
            let mut points: Vec<(f64, f64)> = rows
                .iter()
                .filter(|r| r.policy.name() == *name && value(r).is_finite())
                .map(|r| (px(r.keep), py(value(r))))
                .collect();
            if points.is_empty() {
                continue;
            }
            points.sort_by(|a, b| a.0.total_cmp(&b.0));
            let path: Vec<String> = points.iter().map(|(x, y)| format!("{x:.1},{y:.1}")).collect();
            let _ = writeln!(
                svg,
                "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"2\" points=\"{}\"/>",
                path.join(" ")
            );
            let _ = writeln!(
                svg,
                "<text x=\"{}\" y=\"{}\" fill=\"{color}\">{name}</text>",
                x0 + W - M - 60.0,
                40.0 + 14.0 * i as f64
            );
        }
    }
    svg.push_str("</svg>\n");
    svg
}
