//! The sweep's files in its output directory:
//!
//! - `results.csv`: one line per policy and keep ratio ([`RESULTS_HEADER`]);
//! - `samples.csv`: one line per policy, keep ratio and sample
//!   ([`SAMPLES_HEADER`]; an id with a comma, a quote or a line break is
//!   quoted as RFC 4180 does, numbers are written to round-trip exactly);
//! - `results.md`: the overall table, the same table for each prompt kind,
//!   and for each keep ratio the paired bootstrap differences between every
//!   two compressing policies (pairs with `elastic` first);
//! - `results.svg`: ROUGE-L and PPL against the keep ratio, overall, then
//!   one figure per prompt kind when there are several kinds.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::Path;

use super::dataset::PromptKind;
use super::stats::{self, Difference, Interval, Score};
use super::sweep::{Row, SampleResult};
use crate::error::{Error, Result};
use crate::kv::PolicyKind;

/// The columns of `results.csv`.
pub const RESULTS_HEADER: &str = "policy,keep,samples,rouge_l,ppl,scored_tokens,mean_entries,seconds";
/// The columns of `samples.csv`.
pub const SAMPLES_HEADER: &str = "policy,keep,id,kind,rouge_l,nll,scored_tokens,cache_entries";

const FILES: [&str; 4] = ["results.csv", "samples.csv", "results.md", "results.svg"];

/// Writes the four files into `dir`; `partial` ones go to `*.partial`
/// names, the final ones replace them.
pub fn write(dir: &Path, rows: &[Row], samples: &[SampleResult], partial: bool) -> Result<()> {
    let suffix = if partial { ".partial" } else { "" };
    let texts = [
        results_csv(rows),
        samples_csv(samples),
        markdown(rows, samples),
        plot(rows, samples),
    ];
    for (name, text) in FILES.iter().zip(texts) {
        let path = dir.join(format!("{name}{suffix}"));
        std::fs::write(&path, text).map_err(|e| io_error(&path, e))?;
    }
    if !partial {
        for name in FILES {
            let _ = std::fs::remove_file(dir.join(format!("{name}.partial")));
        }
    }
    Ok(())
}

/// Rewrites `results.md` and `results.svg` in `dir` from its `results.csv`
/// and `samples.csv`. Without `samples.csv` (a sweep from before it
/// existed) only the overall table and plot are drawn.
pub fn replot(dir: &Path) -> Result<(Vec<Row>, Vec<SampleResult>)> {
    let rows = read_rows(&dir.join("results.csv"))?;
    let samples_path = dir.join("samples.csv");
    let samples = if samples_path.exists() {
        read_samples(&samples_path)?
    } else {
        Vec::new()
    };
    for (name, text) in [
        ("results.md", markdown(&rows, &samples)),
        ("results.svg", plot(&rows, &samples)),
    ] {
        let path = dir.join(name);
        std::fs::write(&path, text).map_err(|e| io_error(&path, e))?;
    }
    Ok((rows, samples))
}

pub(crate) fn io_error(path: &Path, e: std::io::Error) -> Error {
    Error::Dataset {
        path: path.to_path_buf(),
        line: 0,
        reason: e.to_string(),
    }
}

fn results_csv(rows: &[Row]) -> String {
    let mut csv = format!("{RESULTS_HEADER}\n");
    for row in rows {
        let _ = writeln!(
            csv,
            "{},{},{},{:.6},{:.6},{},{:.1},{:.1}",
            row.policy, row.keep, row.samples, row.rouge_l, row.ppl, row.scored_tokens, row.mean_entries, row.seconds
        );
    }
    csv
}

fn samples_csv(samples: &[SampleResult]) -> String {
    let mut csv = format!("{SAMPLES_HEADER}\n");
    for s in samples {
        let _ = writeln!(
            csv,
            "{},{},{},{},{},{},{},{}",
            s.policy,
            s.keep,
            csv_field(&s.id),
            s.kind,
            s.rouge_l,
            s.nll,
            s.scored_tokens,
            s.cache_entries
        );
    }
    csv
}

/// Reads `results.csv`.
pub fn read_rows(path: &Path) -> Result<Vec<Row>> {
    let text = std::fs::read_to_string(path).map_err(|e| io_error(path, e))?;
    let records = csv_records(&text).map_err(|line| bad_csv(path, line, "quoting"))?;
    let mut rows = Vec::new();
    for (line, fields) in records.into_iter().skip(1) {
        let bad = |what: &str| bad_csv(path, line, what);
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
    Ok(rows)
}

/// Reads `samples.csv`.
pub fn read_samples(path: &Path) -> Result<Vec<SampleResult>> {
    let text = std::fs::read_to_string(path).map_err(|e| io_error(path, e))?;
    let records = csv_records(&text).map_err(|line| bad_csv(path, line, "quoting"))?;
    let mut records = records.into_iter();
    match records.next() {
        Some((_, header)) if header.join(",") == SAMPLES_HEADER => {}
        _ => return Err(bad_csv(path, 1, &format!("header (expected {SAMPLES_HEADER})"))),
    }
    let mut samples = Vec::new();
    for (line, fields) in records {
        let bad = |what: &str| bad_csv(path, line, what);
        if fields.len() != 8 {
            return Err(bad("number of fields"));
        }
        let float = |i: usize| fields[i].parse::<f64>().map_err(|_| bad("number"));
        let count = |i: usize| fields[i].parse::<usize>().map_err(|_| bad("count"));
        samples.push(SampleResult {
            policy: fields[0].parse().map_err(|_| bad("policy"))?,
            keep: float(1)?,
            id: fields[2].clone(),
            kind: fields[3].parse().map_err(|_| bad("kind"))?,
            rouge_l: float(4)?,
            nll: float(5)?,
            scored_tokens: count(6)?,
            cache_entries: count(7)?,
        });
    }
    Ok(samples)
}

fn bad_csv(path: &Path, line: usize, what: &str) -> Error {
    Error::Dataset {
        path: path.to_path_buf(),
        line,
        reason: format!("bad {what}"),
    }
}

/// `value` as a CSV field: quoted, quotes doubled, when it holds a comma, a
/// quote or a line break.
fn csv_field(value: &str) -> Cow<'_, str> {
    if value.contains([',', '"', '\n', '\r']) {
        Cow::Owned(format!("\"{}\"", value.replace('"', "\"\"")))
    } else {
        Cow::Borrowed(value)
    }
}

/// The records of a CSV text with the line each starts on; empty lines are
/// skipped. `Err(line)`: a quote opened on `line` is never closed.
fn csv_records(text: &str) -> std::result::Result<Vec<(usize, Vec<String>)>, usize> {
    let mut records = Vec::new();
    let mut fields = Vec::new();
    let mut field = String::new();
    let (mut quoted, mut started) = (false, false);
    let (mut line, mut start) = (1, 1);
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if quoted {
            match c {
                '"' if chars.peek() == Some(&'"') => {
                    chars.next();
                    field.push('"');
                }
                '"' => quoted = false,
                _ => {
                    if c == '\n' {
                        line += 1;
                    }
                    field.push(c);
                }
            }
            continue;
        }
        match c {
            '"' => quoted = true,
            ',' => fields.push(std::mem::take(&mut field)),
            '\r' if chars.peek() == Some(&'\n') => continue,
            '\n' => {
                if started {
                    fields.push(std::mem::take(&mut field));
                    records.push((start, std::mem::take(&mut fields)));
                }
                line += 1;
                start = line;
                started = false;
                continue;
            }
            _ => field.push(c),
        }
        started = true;
    }
    if quoted {
        return Err(start);
    }
    if started {
        fields.push(field);
        records.push((start, fields));
    }
    Ok(records)
}

/// One policy at one keep ratio over a set of samples: a table line.
#[derive(Clone, Debug)]
struct Summary {
    policy: PolicyKind,
    keep: f64,
    samples: usize,
    rouge_l: f64,
    ppl: f64,
    scored_tokens: usize,
    mean_entries: f64,
}

impl From<&Row> for Summary {
    fn from(row: &Row) -> Self {
        Summary {
            policy: row.policy,
            keep: row.keep,
            samples: row.samples,
            rouge_l: row.rouge_l,
            ppl: row.ppl,
            scored_tokens: row.scored_tokens,
            mean_entries: row.mean_entries,
        }
    }
}

fn score(sample: &SampleResult) -> Score {
    Score {
        rouge_l: sample.rouge_l,
        nll: sample.nll,
        tokens: sample.scored_tokens,
    }
}

/// `samples` grouped by policy and keep ratio, in order of first appearance
/// (each group in the order of `samples`).
fn groups<'a>(samples: impl IntoIterator<Item = &'a SampleResult>) -> Vec<(PolicyKind, f64, Vec<&'a SampleResult>)> {
    let mut groups: Vec<(PolicyKind, f64, Vec<&SampleResult>)> = Vec::new();
    let mut index: HashMap<(PolicyKind, u64), usize> = HashMap::new();
    for sample in samples {
        let at = *index.entry((sample.policy, sample.keep.to_bits())).or_insert_with(|| {
            groups.push((sample.policy, sample.keep, Vec::new()));
            groups.len() - 1
        });
        groups[at].2.push(sample);
    }
    groups
}

fn summaries<'a>(samples: impl IntoIterator<Item = &'a SampleResult>) -> Vec<Summary> {
    groups(samples)
        .into_iter()
        .map(|(policy, keep, group)| {
            let scores: Vec<Score> = group.iter().map(|s| score(s)).collect();
            Summary {
                policy,
                keep,
                samples: group.len(),
                rouge_l: stats::mean_rouge_l(&scores),
                ppl: stats::pooled_ppl(&scores),
                scored_tokens: group.iter().map(|s| s.scored_tokens).sum(),
                mean_entries: group.iter().map(|s| s.cache_entries).sum::<usize>() as f64 / group.len() as f64,
            }
        })
        .collect()
}

/// The prompt kinds in `samples`, in [`PromptKind::ALL`] order.
fn kinds(samples: &[SampleResult]) -> Vec<PromptKind> {
    PromptKind::ALL
        .into_iter()
        .filter(|&kind| samples.iter().any(|s| s.kind == kind))
        .collect()
}

/// Policy `a` against policy `b` at one keep ratio, paired over samples.
#[derive(Clone, Debug, PartialEq)]
pub struct Comparison {
    pub keep: f64,
    pub a: PolicyKind,
    pub b: PolicyKind,
    /// `a - b`.
    pub difference: Difference,
}

/// Every two compressing policies at each keep ratio (ascending) that both
/// have results on the same samples: pairs with `elastic` first (as `a`),
/// then the others in the order the policies first appear.
pub fn comparisons(samples: &[SampleResult]) -> Vec<Comparison> {
    let groups = groups(samples.iter().filter(|s| s.policy != PolicyKind::Full));
    let mut policies: Vec<PolicyKind> = Vec::new();
    let mut keeps: Vec<f64> = Vec::new();
    for (policy, keep, _) in &groups {
        if !policies.contains(policy) {
            policies.push(*policy);
        }
        if !keeps.iter().any(|k| k.to_bits() == keep.to_bits()) {
            keeps.push(*keep);
        }
    }
    keeps.sort_by(f64::total_cmp);
    let mut pairs = Vec::new();
    if policies.contains(&PolicyKind::Elastic) {
        for &other in policies.iter().filter(|&&p| p != PolicyKind::Elastic) {
            pairs.push((PolicyKind::Elastic, other));
        }
    }
    for (i, &a) in policies.iter().enumerate() {
        for &b in &policies[i + 1..] {
            if a != PolicyKind::Elastic && b != PolicyKind::Elastic {
                pairs.push((a, b));
            }
        }
    }
    let find = |policy: PolicyKind, keep: f64| {
        groups
            .iter()
            .find(|(p, k, _)| *p == policy && k.to_bits() == keep.to_bits())
            .map(|(_, _, group)| group)
    };
    let mut comparisons = Vec::new();
    for &keep in &keeps {
        for &(a, b) in &pairs {
            let (Some(group_a), Some(group_b)) = (find(a, keep), find(b, keep)) else {
                continue;
            };
            let same_samples = group_a.len() == group_b.len() && group_a.iter().zip(group_b).all(|(x, y)| x.id == y.id);
            if !same_samples {
                continue;
            }
            let scores_a: Vec<Score> = group_a.iter().map(|s| score(s)).collect();
            let scores_b: Vec<Score> = group_b.iter().map(|s| score(s)).collect();
            if let Some(difference) = stats::compare(&scores_a, &scores_b) {
                comparisons.push(Comparison { keep, a, b, difference });
            }
        }
    }
    comparisons
}

/// `results.md`: the overall table, the tables by prompt kind and the
/// differences between policies.
fn markdown(rows: &[Row], samples: &[SampleResult]) -> String {
    let mut md = String::from("## All samples\n\n");
    md.push_str(
        "| policy | keep | ROUGE-L | PPL | samples | scored tokens | cache entries | seconds |\n|---|---|---|---|---|---|---|---|\n",
    );
    for row in rows {
        let _ = writeln!(
            md,
            "| {} | {} | {:.3} | {:.3} | {} | {} | {:.1} | {:.0} |",
            row.policy, row.keep, row.rouge_l, row.ppl, row.samples, row.scored_tokens, row.mean_entries, row.seconds
        );
    }
    if samples.is_empty() {
        md.push_str("\nNo `samples.csv`: no tables by prompt kind and no differences between policies.\n");
        return md;
    }

    md.push_str("\n## By prompt kind\n");
    for kind in kinds(samples) {
        let of_kind = summaries(samples.iter().filter(|s| s.kind == kind));
        let count = of_kind.first().map_or(0, |s| s.samples);
        let _ = write!(
            md,
            "\n### {kind} ({count} sample{})\n\n| policy | keep | ROUGE-L | PPL | scored tokens | cache entries |\n|---|---|---|---|---|---|\n",
            if count == 1 { "" } else { "s" }
        );
        for s in of_kind {
            let _ = writeln!(
                md,
                "| {} | {} | {:.3} | {:.3} | {} | {:.1} |",
                s.policy, s.keep, s.rouge_l, s.ppl, s.scored_tokens, s.mean_entries
            );
        }
    }

    let comparisons = comparisons(samples);
    if comparisons.is_empty() {
        return md;
    }
    let _ = write!(
        md,
        "\n## Differences between policies\n\n\
         Paired bootstrap over the samples: {} resamples with a fixed seed, each drawing the samples \
         with replacement and measuring both policies on the same draw; {:.0}% percentile intervals. \
         ΔROUGE-L is the first policy's mean ROUGE-L minus the second's (positive: the first stays \
         closer to the full cache); ΔPPL is the first policy's pooled PPL minus the second's \
         (negative: the first is better). `*`: the interval excludes 0.\n",
        stats::RESAMPLES,
        stats::LEVEL * 100.0
    );
    let mut keep = None;
    for c in &comparisons {
        if keep != Some(c.keep.to_bits()) {
            keep = Some(c.keep.to_bits());
            let _ = write!(
                md,
                "\n### keep {}\n\n| policies | samples | ΔROUGE-L [95% CI] | ΔPPL [95% CI] |\n|---|---|---|---|\n",
                c.keep
            );
        }
        let _ = writeln!(
            md,
            "| {} vs {} | {} | {} | {} |",
            c.a,
            c.b,
            c.difference.samples,
            interval(&c.difference.rouge_l),
            c.difference.ppl.as_ref().map_or("n/a".into(), interval)
        );
    }
    md
}

/// `+0.123 [-0.010, +0.250]`, with ` *` when significant.
fn interval(i: &Interval) -> String {
    format!(
        "{:+.3} [{:+.3}, {:+.3}]{}",
        i.estimate,
        i.lo,
        i.hi,
        if i.significant() { " *" } else { "" }
    )
}

/// The overall figure, then one per prompt kind when there are several.
fn plot(rows: &[Row], samples: &[SampleResult]) -> String {
    let mut figures: Vec<(String, Vec<Summary>)> = vec![(String::new(), rows.iter().map(Summary::from).collect())];
    let kinds = kinds(samples);
    if kinds.len() > 1 {
        for kind in kinds {
            figures.push((
                format!("{kind}: "),
                summaries(samples.iter().filter(|s| s.kind == kind)),
            ));
        }
    }
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{}\" height=\"{}\" font-family=\"sans-serif\" font-size=\"11\">\n",
        2.0 * FIGURE_W,
        figures.len() as f64 * FIGURE_H
    );
    for (i, (label, summaries)) in figures.iter().enumerate() {
        let _ = writeln!(svg, "<g transform=\"translate(0,{})\">", i as f64 * FIGURE_H);
        figure(&mut svg, label, summaries);
        svg.push_str("</g>\n");
    }
    svg.push_str("</svg>\n");
    svg
}

/// Width of one panel.
const FIGURE_W: f64 = 360.0;
/// Height of one figure (two panels side by side).
const FIGURE_H: f64 = 290.0;

/// Two panels like the paper's Figure 2: ROUGE-L and PPL against the keep
/// ratio, one line per policy; the full cache as a dashed level.
fn figure(svg: &mut String, label: &str, rows: &[Summary]) {
    const W: f64 = FIGURE_W;
    const H: f64 = FIGURE_H - 30.0;
    const M: f64 = 45.0;
    let colors = [
        ("local", "#1f77b4"),
        ("h2o", "#ff7f0e"),
        ("elastic", "#2ca02c"),
        ("elastic-ref", "#9467bd"),
    ];
    // PPL on a log scale: the worst policies are orders of magnitude off.
    for (panel, (title, value, log)) in [
        (
            "ROUGE-L vs full cache (higher is better)",
            (|r: &Summary| r.rouge_l) as fn(&Summary) -> f64,
            false,
        ),
        ("PPL, log scale (lower is better)", |r: &Summary| r.ppl.ln(), true),
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
        let _ = writeln!(svg, "<text x=\"{}\" y=\"16\">{label}{title}</text>", x0 + M);
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
            if y.is_finite() {
                let _ = writeln!(
                    svg,
                    "<line x1=\"{}\" y1=\"{y}\" x2=\"{}\" y2=\"{y}\" stroke=\"gray\" stroke-dasharray=\"4 3\"/>",
                    px(0.0),
                    px(1.0)
                );
            }
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
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEEPS: [f64; 2] = [0.3, 0.5];

    /// A sweep of full, local, h2o and elastic at [`KEEPS`] over `n`
    /// samples of three kinds; elastic is better than the others.
    fn sweep(n: usize) -> (Vec<Row>, Vec<SampleResult>) {
        let kinds = [PromptKind::Caption, PromptKind::Text, PromptKind::MultiImage];
        let mut runs = vec![(PolicyKind::Full, 1.0)];
        for policy in [PolicyKind::Local, PolicyKind::H2o, PolicyKind::Elastic] {
            runs.extend(KEEPS.map(|k| (policy, k)));
        }
        let mut rows = Vec::new();
        let mut samples = Vec::new();
        for (policy, keep) in runs {
            let quality = match policy {
                PolicyKind::Full => 1.0,
                PolicyKind::Elastic => 0.8 * keep + 0.2,
                PolicyKind::H2o => 0.6 * keep,
                _ => 0.5 * keep,
            };
            let start = samples.len();
            for i in 0..n {
                let wobble = if policy == PolicyKind::Full {
                    0.0
                } else {
                    ((i * 7919) % 13) as f64 / 13.0 * 0.2
                };
                let tokens = 10 + i % 5;
                samples.push(SampleResult {
                    policy,
                    keep,
                    id: if i == 0 {
                        "a, \"quoted\"\nid".into()
                    } else {
                        format!("s{i}")
                    },
                    kind: kinds[i % 3],
                    rouge_l: (quality - wobble).clamp(0.0, 1.0),
                    nll: tokens as f64 * (1.0 - quality + wobble + 0.1),
                    scored_tokens: tokens,
                    cache_entries: (100.0 * keep) as usize + i,
                });
            }
            let scores: Vec<Score> = samples[start..].iter().map(score).collect();
            rows.push(Row {
                policy,
                keep,
                samples: n,
                rouge_l: stats::mean_rouge_l(&scores),
                ppl: stats::pooled_ppl(&scores),
                scored_tokens: scores.iter().map(|s| s.tokens).sum(),
                mean_entries: 50.0,
                seconds: 3.0,
            });
        }
        (rows, samples)
    }

    #[test]
    fn samples_round_trip_through_the_csv() {
        let dir = tempfile::tempdir().unwrap();
        let (rows, samples) = sweep(12);
        write(dir.path(), &rows, &samples, false).unwrap();
        let text = std::fs::read_to_string(dir.path().join("samples.csv")).unwrap();
        assert!(text.starts_with("policy,keep,id,kind,rouge_l,nll,scored_tokens,cache_entries\n"));
        assert!(text.contains("full,1,\"a, \"\"quoted\"\"\nid\",caption,1,"), "{text}");
        assert_eq!(read_samples(&dir.path().join("samples.csv")).unwrap(), samples);
        let read = read_rows(&dir.path().join("results.csv")).unwrap();
        assert_eq!(read.len(), rows.len());
        assert_eq!((read[3].policy, read[3].keep), (rows[3].policy, rows[3].keep));
        assert!((read[3].ppl - rows[3].ppl).abs() < 1e-6);
    }

    #[test]
    fn partial_files_are_replaced_by_the_final_ones() {
        let dir = tempfile::tempdir().unwrap();
        let (rows, samples) = sweep(6);
        write(dir.path(), &rows[..2], &samples[..12], true).unwrap();
        for name in FILES {
            assert!(dir.path().join(format!("{name}.partial")).is_file(), "{name}");
            assert!(!dir.path().join(name).exists(), "{name}");
        }
        write(dir.path(), &rows, &samples, false).unwrap();
        for name in FILES {
            assert!(!dir.path().join(format!("{name}.partial")).exists(), "{name}");
            assert!(dir.path().join(name).is_file(), "{name}");
        }
    }

    #[test]
    fn replot_redraws_the_same_report() {
        let dir = tempfile::tempdir().unwrap();
        let (rows, samples) = sweep(9);
        write(dir.path(), &rows, &samples, false).unwrap();
        let md = std::fs::read_to_string(dir.path().join("results.md")).unwrap();
        let svg = std::fs::read_to_string(dir.path().join("results.svg")).unwrap();
        std::fs::remove_file(dir.path().join("results.md")).unwrap();
        let (read_rows, read_samples) = replot(dir.path()).unwrap();
        assert_eq!((read_rows.len(), read_samples), (rows.len(), samples));
        assert_eq!(std::fs::read_to_string(dir.path().join("results.md")).unwrap(), md);
        assert_eq!(std::fs::read_to_string(dir.path().join("results.svg")).unwrap(), svg);

        // Without samples.csv: the overall table only.
        std::fs::remove_file(dir.path().join("samples.csv")).unwrap();
        replot(dir.path()).unwrap();
        let md = std::fs::read_to_string(dir.path().join("results.md")).unwrap();
        assert!(
            md.contains("| elastic | 0.5 |") && md.contains("No `samples.csv`"),
            "{md}"
        );
        assert!(!md.contains("By prompt kind"));
    }

    #[test]
    fn the_report_has_tables_by_kind_and_differences_with_elastic_first() {
        let (rows, samples) = sweep(30);
        let md = markdown(&rows, &samples);
        for heading in [
            "## All samples",
            "### caption (10 samples)",
            "### text (10 samples)",
            "### multi-image (10 samples)",
            "### keep 0.3",
            "### keep 0.5",
        ] {
            assert!(md.contains(heading), "{heading}: {md}");
        }
        assert!(!md.contains("### question"));
        let pairs: Vec<&str> = md
            .lines()
            .filter(|l| l.contains(" vs "))
            .map(|l| l.split(" | ").next().unwrap())
            .collect();
        let order = ["| elastic vs local", "| elastic vs h2o", "| local vs h2o"];
        assert_eq!(pairs, [order, order].concat());
        // Elastic is better by construction: significant, positive ROUGE-L
        // and negative PPL differences.
        let line = md.lines().find(|l| l.starts_with("| elastic vs local")).unwrap();
        assert!(line.contains("| 30 | +") && line.matches(" *").count() == 2, "{line}");

        let c = comparisons(&samples);
        assert_eq!(c.len(), 6);
        assert_eq!(
            (c[0].keep, c[0].a, c[0].b),
            (0.3, PolicyKind::Elastic, PolicyKind::Local)
        );
        assert!(c[0].difference.rouge_l.estimate > 0.0 && c[0].difference.ppl.unwrap().estimate < 0.0);
        let by_kind = md.split("### text").nth(1).unwrap();
        assert!(by_kind.contains("| full | 1 | 1.000 |"), "{by_kind}");

        let svg = plot(&rows, &samples);
        assert_eq!(svg.matches("<g transform").count(), 4, "overall and three kinds");
        assert!(svg.contains("multi-image: ROUGE-L"));
    }

    #[test]
    fn a_policy_without_every_keep_is_compared_where_it_has_results() {
        let (_, samples) = sweep(5);
        // Drop elastic at 0.5, as a sweep cut short would.
        let samples: Vec<SampleResult> = samples
            .into_iter()
            .filter(|s| !(s.policy == PolicyKind::Elastic && s.keep == 0.5))
            .collect();
        let c = comparisons(&samples);
        let at_half: Vec<(PolicyKind, PolicyKind)> = c.iter().filter(|c| c.keep == 0.5).map(|c| (c.a, c.b)).collect();
        assert_eq!(at_half, vec![(PolicyKind::Local, PolicyKind::H2o)]);
        assert_eq!(c.iter().filter(|c| c.keep == 0.3).count(), 3);
    }

    #[test]
    fn csv_records_handle_quotes_and_line_breaks() {
        let records = csv_records("a,b\r\n\n\"x,\"\"y\"\"\nz\",2\nlast,").unwrap();
        assert_eq!(
            records,
            vec![
                (1, vec!["a".to_string(), "b".to_string()]),
                (3, vec!["x,\"y\"\nz".to_string(), "2".to_string()]),
                (5, vec!["last".to_string(), String::new()]),
            ]
        );
        assert_eq!(csv_records("ok\n\"open,\n"), Err(2));
        assert_eq!(csv_field("plain"), "plain");
        assert_eq!(csv_field("a\"b"), "\"a\"\"b\"");
    }
}
