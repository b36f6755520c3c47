//! The paper's protocol over a dataset: for every policy and keep ratio,
//! ROUGE-L of the greedy answer against the full cache's greedy answer, and
//! the perplexity of a reference answer (the dataset's, or the full cache's)
//! under teacher forcing with the policy applied after every step.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use sha2::{Digest, Sha256};

use super::dataset::{PromptKind, Sample};
use super::report::{self, io_error};
use super::rouge::rouge_l_f;
use crate::error::{error_chain, Error, Result};
use crate::generate::{EncodedPrompt, GenerateParams, Generator, Sampling};
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

/// One policy at one keep ratio on one sample: a line of `samples.csv`.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct SampleResult {
    pub policy: PolicyKind,
    pub keep: f64,
    /// The sample's id in the dataset.
    pub id: String,
    pub kind: PromptKind,
    /// ROUGE-L F against the full cache's answer.
    pub rouge_l: f64,
    /// Summed NLL of the scored reference tokens (0 when none was scored).
    pub nll: f64,
    pub scored_tokens: usize,
    /// Cache entries after the reference was scored (0 when none was).
    pub cache_entries: usize,
}

/// What [`run`] measured: one [`Row`] per policy and keep ratio, and one
/// [`SampleResult`] per policy, keep ratio and sample (in run order, and
/// within a run in dataset order). Iterating it yields the rows.
#[derive(Clone, Debug)]
pub struct SweepOutput {
    pub rows: Vec<Row>,
    pub samples: Vec<SampleResult>,
}

impl IntoIterator for SweepOutput {
    type Item = Row;
    type IntoIter = std::vec::IntoIter<Row>;
    fn into_iter(self) -> Self::IntoIter {
        self.rows.into_iter()
    }
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

/// One model's full-cache greedy answers to a dataset's samples, in order
/// ([`full_cache_answers`]): what [`run_against`] scores another model by.
#[derive(Clone, Debug)]
pub struct References {
    answers: Vec<Reference>,
}

/// `model`'s full-cache answers to `samples` (cached in `config.out`'s
/// `references.jsonl` under that model's key), to score another build of
/// the same weights against (an int4 model against fp32).
pub fn full_cache_answers(
    model: &mut Model,
    samples: &[Sample],
    config: &SweepConfig,
    progress: Progress<'_>,
) -> Result<References> {
    std::fs::create_dir_all(&config.out).map_err(|e| io_error(&config.out, e))?;
    let mut done = 0;
    let total = 2 * samples.len() as u64;
    let answers = full_cache_references(model, samples, config, &mut done, total, progress)?;
    Ok(References { answers })
}

/// Runs the sweep and writes `results.csv`, `samples.csv`, `results.md`
/// and `results.svg` into `config.out` (see [`report::write`]). Full-cache
/// answers are cached in `references.jsonl` there, so a rerun or an added
/// policy reuses them. Results are written under `.partial` names first and
/// renamed when the sweep is complete.
pub fn run(model: &mut Model, samples: &[Sample], config: &SweepConfig, progress: Progress<'_>) -> Result<SweepOutput> {
    run_against(model, samples, config, None, progress)
}

/// [`run`], scored against `references` (another model's full-cache
/// answers) when given: then the full cache of `model` answers too, and
/// every row's ROUGE-L and perplexity are against those answers.
pub fn run_against(
    model: &mut Model,
    samples: &[Sample],
    config: &SweepConfig,
    references: Option<References>,
    progress: Progress<'_>,
) -> Result<SweepOutput> {
    std::fs::create_dir_all(&config.out).map_err(|e| io_error(&config.out, e))?;
    if references.as_ref().is_some_and(|r| r.answers.len() != samples.len()) {
        return Err(Error::Plan("reference answers for another set of samples".into()));
    }
    let compressing: Vec<PolicyKind> = config
        .policies
        .iter()
        .copied()
        .filter(|&p| p != PolicyKind::Full)
        .collect();
    let total = (samples.len() * (2 + 2 * compressing.len() * config.keeps.len())) as u64;
    let mut done = 0u64;

    let own_references = references.is_none();
    let references = match references {
        Some(references) => references.answers,
        None => full_cache_references(model, samples, config, &mut done, total, progress)?,
    };
    let mut rows = Vec::new();
    let mut results = Vec::new(); // per-sample results
    let mut prompts = EncodedPrompts::new(samples.len());
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
        for (index, (sample, reference)) in samples.iter().zip(&references).enumerate() {
            let at = at_sample(sample);
            let images = sample.image_inputs();
            let prompt = prompts.get(&mut generator, index, sample).map_err(at)?;
            let answer = if policy == PolicyKind::Full && own_references {
                reference.text.clone()
            } else {
                let params = GenerateParams {
                    max_new_tokens: config.max_new_tokens,
                    sampling: Sampling::GREEDY,
                    stop_strings: Vec::new(),
                    ignore_stop: false,
                };
                match prompt.as_ref() {
                    Some(prompt) => {
                        generator
                            .generate_encoded(prompt, &params, &mut |_| {})
                            .map_err(at)?
                            .text
                    }
                    None => {
                        generator
                            .generate(&images, Some(&sample.prompt), &params, &mut |_| {})
                            .map_err(at)?
                            .text
                    }
                }
            };
            let rouge = rouge_l_f(&answer, &reference.text).unwrap_or(0.0);
            rouge_sum += rouge;
            done += 1;
            progress(done, total, &label);
            let target = match &sample.reference {
                Some(text) => generator.model().prompt.encode(text).map_err(|e| at(e.into()))?,
                None => reference.ids.clone(),
            };
            let mut result = SampleResult::unscored(policy, keep, sample, rouge); // per-sample results
            if !target.is_empty() {
                let (sample_nll, count) = match prompt.as_ref() {
                    Some(prompt) => generator.score_encoded(prompt, &target),
                    None => generator.score(&images, Some(&sample.prompt), &target),
                }
                .map_err(at)?;
                nll += sample_nll;
                tokens += count;
                entries += generator.cache().pool().len();
                (result.nll, result.scored_tokens) = (sample_nll, count); // per-sample results
                result.cache_entries = generator.cache().pool().len(); // per-sample results
            }
            results.push(result); // per-sample results
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
        report::write(&config.out, &rows, &results, true)?;
    }
    report::write(&config.out, &rows, &results, false)?;
    Ok(SweepOutput { rows, samples: results })
}

/// Each sample's prompt encoded once for every policy and keep ratio (the
/// prompt's K/V and attention sums do not depend on the policy), kept
/// while they fit [`EncodedPrompts::MAX_BYTES`]; past that a prompt is
/// encoded once per run, still once for its answer and its score.
struct EncodedPrompts {
    kept: Vec<Option<EncodedPrompt>>,
    bytes: usize,
}

impl EncodedPrompts {
    const MAX_BYTES: usize = 4 << 30;

    fn new(samples: usize) -> Self {
        EncodedPrompts {
            kept: vec![None; samples],
            bytes: 0,
        }
    }

    /// The encoded prompt of sample `index` (`None`: it does not fit the
    /// pool whole; the caller encodes it the usual way).
    fn get(
        &mut self,
        generator: &mut Generator<'_>,
        index: usize,
        sample: &Sample,
    ) -> Result<Option<Cow<'_, EncodedPrompt>>> {
        if self.kept[index].is_none() {
            let Some(prompt) = generator.encode_prompt(&sample.image_inputs(), Some(&sample.prompt))? else {
                return Ok(None);
            };
            if self.bytes + prompt.bytes() > Self::MAX_BYTES {
                return Ok(Some(Cow::Owned(prompt)));
            }
            self.bytes += prompt.bytes();
            self.kept[index] = Some(prompt);
        }
        Ok(self.kept[index].as_ref().map(Cow::Borrowed))
    }
}

impl SampleResult {
    /// `sample` under `policy` at `keep` with its ROUGE-L, before scoring.
    fn unscored(policy: PolicyKind, keep: KeepRatio, sample: &Sample, rouge_l: f64) -> Self {
        SampleResult {
            policy,
            keep: keep.get(),
            id: sample.id.clone(),
            kind: sample.kind,
            rouge_l,
            nll: 0.0,
            scored_tokens: 0,
            cache_entries: 0,
        }
    }
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
    // The decoder graph and, apart from it, its weights: a format-2 graph
    // holds none of its own.
    let files = &model.manifest.files;
    let model_key: String = [Some(&files.decoder), files.decoder_weights.as_ref()]
        .into_iter()
        .flatten()
        .filter_map(|file| model.manifest.file_hashes.get(file))
        .map(|h| h.sha256.as_str())
        .collect::<Vec<_>>()
        .join("+");
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
                    sampling: Sampling::GREEDY,
                    stop_strings: Vec::new(),
                    ignore_stop: false,
                };
                let images = sample.image_inputs();
                let generation = generator
                    .generate(&images, Some(&sample.prompt), &params, &mut |_| {})
                    .map_err(at_sample(sample))?;
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

/// A sample's failure, with its id and its line in the dataset.
fn at_sample(sample: &Sample) -> impl Fn(Error) -> Error + Copy + '_ {
    move |e| Error::Sample {
        id: sample.id.clone(),
        line: sample.line,
        reason: error_chain(&e),
    }
}

fn reference_key(model_key: &str, sample: &Sample, max_new_tokens: usize) -> String {
    let mut hasher = Sha256::new();
    hasher.update(model_key.as_bytes());
    hasher.update(sample.prompt.as_bytes());
    hasher.update([0]);
    // Every picture in order (one picture hashes as it always did).
    for image in &sample.images {
        hasher.update(image.to_string_lossy().as_bytes());
    }
    hasher.update(max_new_tokens.to_le_bytes());
    hasher.finalize().iter().take(16).fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// Rewrites `results.md` and `results.svg` in `dir` from its `results.csv`
/// and `samples.csv` (see [`report::replot`]).
pub fn replot(dir: &Path) -> Result<Vec<Row>> {
    Ok(report::replot(dir)?.0)
}
