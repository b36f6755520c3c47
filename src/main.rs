//! The `elastic-edge` command line: parse, call the library, print.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};

use std::io::Write;

use elastic_edge::bench::{self, BenchConfig, Case};
use elastic_edge::error::error_chain;
use elastic_edge::eval::dataset;
use elastic_edge::eval::sweep::{self, SweepConfig};
use elastic_edge::generate::{GenerateParams, Generator, ImageInput, Sampling};
use elastic_edge::kv::{KeepRatio, KvBudget, KvCache, KvDtype, KvPool, KvShape, PolicyConfig, PolicyKind, PoolBacking};
use elastic_edge::model::{self, Device, LoadOptions, Model, ProviderOptions};
use elastic_edge::runtime;

#[derive(Parser)]
#[command(
    name = "elastic-edge",
    version,
    about = "Vision-language inference for edge devices with a fixed, Elastic-Cache-compressed KV pool",
    long_about = "Runs vision-language models exported to ONNX with ONNX Runtime. The KV cache is one \
                  memory-mapped pool sized once from a byte budget; Elastic Cache (importance-driven \
                  merging) keeps any keep ratio within that budget."
)]
struct Cli {
    /// ONNX Runtime library to load (default: ORT_DYLIB_PATH, next to the
    /// binary, the checkout's .cache/onnxruntime, then the system path).
    #[arg(long, global = true, value_name = "PATH")]
    onnxruntime: Option<PathBuf>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Caption images (or answer a question about them) with one model and one KV pool.
    Caption(CaptionArgs),
    /// Check the set-up: which ONNX Runtime loads, and what a KV budget buys.
    Doctor(DoctorArgs),
    /// The paper's evaluation: ROUGE-L and perplexity for every policy and keep ratio.
    Eval(EvalArgs),
    /// Speed: time to first token, prefill and decode tokens/s, step time as the
    /// answer grows, peak RSS and pool bytes per policy, against the memory-bandwidth floor.
    Bench(BenchArgs),
}

#[derive(Args)]
struct BenchArgs {
    #[command(flatten)]
    model: ModelArgs,

    /// Prompt length: the project's own text, tokenised, repeated and cut to exactly this many tokens.
    #[arg(long, default_value_t = 512)]
    prompt_tokens: usize,

    /// Tokens generated (greedy, through any stop token).
    #[arg(long, default_value_t = 512)]
    gen_tokens: usize,

    /// Also run the long-context case: 2048 prompt tokens + 512 generated.
    #[arg(long)]
    long_context: bool,

    /// Policies to run, each on a fresh pool.
    #[arg(long, value_delimiter = ',', default_value = "full,elastic", value_parser = parse_policy)]
    policies: Vec<PolicyKind>,

    /// Keep ratio of the compressing policies.
    #[arg(long, default_value = "0.2", value_parser = parse_keep)]
    keep: KeepRatio,

    /// One KV budget for every run (bytes like 64MiB, or 4096tokens). Default:
    /// each pool is sized for its run, the whole sequence for full and the
    /// keep ratio of it (plus one slot) for the others.
    #[arg(long, value_parser = parse_budget)]
    kv_budget: Option<KvBudget>,

    /// Most prompt tokens per decoder run (default: the whole prompt when the
    /// pool holds it). Bounds prefill memory, which grows with the square of
    /// the chunk.
    #[arg(long, value_name = "TOKENS")]
    prefill_chunk: Option<usize>,

    /// Tokens of the untimed warm-up generation before each timed run (0: none).
    #[arg(long, default_value_t = 8)]
    warmup_tokens: usize,

    /// Print the report as one JSON object instead of a markdown table.
    #[arg(long)]
    json: bool,

    /// Only measure the memory bandwidth (no model is loaded).
    #[arg(long)]
    memory_bandwidth: bool,

    /// Skip the memory-bandwidth measurement (no floor is reported).
    #[arg(long, conflicts_with = "memory_bandwidth")]
    no_bandwidth: bool,

    /// Buffer of the bandwidth measurement (default: 16x the last-level cache, at least 256MiB).
    #[arg(long, value_parser = parse_bytes)]
    bandwidth_buffer: Option<u64>,

    /// Passes over that buffer; the best counts.
    #[arg(long, default_value_t = 10)]
    bandwidth_passes: usize,

    /// Write the first case's prompt token ids to FILE as a JSON array (for other engines).
    #[arg(long, value_name = "FILE")]
    write_prompt: Option<PathBuf>,
}

#[derive(Args)]
struct EvalArgs {
    /// Dataset, JSON Lines: {"id", "image" (relative to the file, optional), "prompt", "reference" (optional)}.
    #[arg(long, value_name = "FILE", required_unless_present = "replot")]
    data: Option<PathBuf>,

    /// Only redraw results.md and results.svg from --out's results.csv.
    #[arg(long)]
    replot: bool,

    #[command(flatten)]
    model: ModelArgs,

    /// Policies to compare (full is always run: it is the reference).
    #[arg(long, value_delimiter = ',', default_value = "local,h2o,elastic,elastic-ref", value_parser = parse_policy)]
    policies: Vec<PolicyKind>,

    /// Keep ratios to sweep.
    #[arg(long = "keep", value_delimiter = ',', default_value = "0.1,0.2,0.3,0.5,0.7,0.9", value_parser = parse_keep)]
    keeps: Vec<KeepRatio>,

    /// Most tokens per answer.
    #[arg(long, default_value_t = 256)]
    max_new_tokens: usize,

    /// Hard KV budget of every run (large enough that only the keep ratio binds).
    #[arg(long, default_value = "256MiB", value_parser = parse_budget)]
    kv_budget: KvBudget,

    /// Where results.csv, results.md, results.svg and the cached full-cache answers go.
    #[arg(long, value_name = "DIR", default_value = "eval-results")]
    out: PathBuf,

    /// Stop at the first bad dataset line instead of skipping it.
    #[arg(long)]
    strict: bool,

    /// Ablation: elastic merges the entry leaving at the fixed point into
    /// its nearest neighbour instead of evicting it.
    #[arg(long)]
    merge_on_evict: bool,

    /// Ablation: elastic gives new tokens the cache length as their rotary
    /// position (as the authors' code does) instead of the true position.
    #[arg(long)]
    cache_length_positions: bool,
}

#[derive(Args)]
struct CaptionArgs {
    /// Image to caption; repeat for several (they share the pool and sessions).
    #[arg(long = "image", value_name = "FILE", required = true)]
    images: Vec<PathBuf>,

    /// What to ask (default: the model's captioning prompt).
    #[arg(long)]
    prompt: Option<String>,

    #[command(flatten)]
    model: ModelArgs,

    #[command(flatten)]
    cache: CacheArgs,

    #[command(flatten)]
    sampling: SamplingArgs,

    /// Print one JSON object per image (caption, timings, cache statistics)
    /// instead of streaming the text.
    #[arg(long)]
    json: bool,
}

/// Which model, and where it runs.
#[derive(Args)]
struct ModelArgs {
    /// Model folder with manifest.json (default: $ELASTIC_EDGE_MODEL, then
    /// the demo model built by scripts/build-demo-model.sh).
    #[arg(long, value_name = "DIR")]
    model: Option<PathBuf>,

    /// Execution provider.
    #[arg(long, value_enum, default_value_t = Device::Cpu)]
    device: Device,

    /// CUDA device ordinal.
    #[arg(long, default_value_t = 0)]
    device_id: i32,

    /// Intra-op threads per graph (default: one per core).
    #[arg(long)]
    threads: Option<usize>,

    /// TensorRT: cache built engines in this folder.
    #[arg(long, value_name = "DIR")]
    tensorrt_cache: Option<PathBuf>,

    /// TensorRT: allow fp16 kernels.
    #[arg(long)]
    tensorrt_fp16: bool,
}

/// The KV cache: its hard budget and its policy.
#[derive(Args)]
struct CacheArgs {
    /// Cache policy: elastic, h2o, local, full, elastic-ref.
    #[arg(long, default_value = "elastic", value_parser = parse_policy)]
    policy: PolicyKind,

    /// Fraction of processed tokens the cache keeps, in (0, 1] (ignored by
    /// full). At 1 the policy acts only when the budget is full.
    #[arg(long, default_value = "1", value_parser = parse_keep)]
    keep: KeepRatio,

    /// Hard KV budget: bytes (32MiB, 1GB) or slots (4096tokens).
    #[arg(long, default_value = "32MiB", value_parser = parse_budget)]
    kv_budget: KvBudget,

    /// Back the pool with this file (e.g. /dev/shm/elastic-edge.kv).
    #[arg(long, value_name = "PATH")]
    kv_file: Option<PathBuf>,
}

#[derive(Args)]
struct SamplingArgs {
    /// Most tokens to generate.
    #[arg(long, default_value_t = 64)]
    max_new_tokens: usize,

    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,

    /// Nucleus sampling: smallest set of tokens whose probability reaches this.
    #[arg(long, default_value_t = 0.9)]
    top_p: f32,

    /// Seed of the sampler.
    #[arg(long, default_value_t = 0)]
    seed: u64,

    /// Generate through stop tokens, up to --max-new-tokens (for timing long outputs).
    #[arg(long)]
    ignore_stop: bool,
}

#[derive(Args)]
struct DoctorArgs {
    /// Model folder to check (default: as for caption).
    #[arg(long, value_name = "DIR")]
    model: Option<PathBuf>,

    #[command(flatten)]
    pool: PoolArgs,

    /// Cache policy whose protected entries the budget must hold.
    #[arg(long, default_value = "elastic", value_parser = parse_policy)]
    policy: PolicyKind,

    /// Fraction of processed tokens the cache keeps, in (0, 1].
    #[arg(long, default_value = "0.5", value_parser = parse_keep)]
    keep: KeepRatio,
}

/// The KV pool's geometry and budget. The geometry is the model's when one
/// is found, else these flags (default: the demo model's decoder,
/// SmolLM2-135M: 30 layers, 3 KV heads of 64).
#[derive(Args)]
struct PoolArgs {
    /// KV pool budget: bytes (64MiB, 1.5GB, 65536) or slots (4096tokens).
    #[arg(long, default_value = "64MiB", value_parser = parse_budget)]
    kv_budget: KvBudget,

    /// Back the pool with this file (e.g. /dev/shm/elastic-edge.kv) instead
    /// of anonymous memory.
    #[arg(long, value_name = "PATH")]
    kv_file: Option<PathBuf>,

    #[arg(long, default_value_t = 30)]
    layers: usize,
    #[arg(long, default_value_t = 3)]
    kv_heads: usize,
    #[arg(long, default_value_t = 64)]
    head_dim: usize,
    /// Element type of the cache: f16 or f32.
    #[arg(long, default_value = "f16", value_parser = parse_dtype)]
    dtype: KvDtype,
}

fn parse_budget(s: &str) -> Result<KvBudget, String> {
    s.parse().map_err(|e: elastic_edge::Error| e.to_string())
}

fn parse_keep(s: &str) -> Result<KeepRatio, String> {
    s.parse().map_err(|e: elastic_edge::Error| e.to_string())
}

fn parse_policy(s: &str) -> Result<PolicyKind, String> {
    s.parse().map_err(|e: elastic_edge::Error| e.to_string())
}

fn parse_bytes(s: &str) -> Result<u64, String> {
    match s.parse::<KvBudget>().map_err(|e| e.to_string())? {
        KvBudget::Bytes(bytes) => Ok(bytes),
        KvBudget::Tokens(_) => Err(format!("{s:?} is a token count; give bytes (512MiB, 1GB)")),
    }
}

fn parse_dtype(s: &str) -> Result<KvDtype, String> {
    s.parse().map_err(|e: elastic_edge::Error| e.to_string())
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // One line: the context, then each cause not already quoted.
            eprintln!("elastic-edge: {}", error_chain(err.as_ref()));
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Caption(args) => caption(cli.onnxruntime, &args),
        Command::Doctor(args) => doctor(cli.onnxruntime.as_deref(), &args),
        Command::Eval(args) => eval(cli.onnxruntime, &args),
        Command::Bench(args) => bench(cli.onnxruntime, &args),
    }
}

fn bench(onnxruntime: Option<PathBuf>, args: &BenchArgs) -> anyhow::Result<()> {
    let threads = args
        .model
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let measure_bandwidth = || -> anyhow::Result<bench::Bandwidth> {
        let buffer = args
            .bandwidth_buffer
            .unwrap_or_else(bench::bandwidth::default_buffer_bytes);
        eprintln!(
            "[bench] memory bandwidth: reading {} MiB with {threads} threads, {} passes",
            buffer >> 20,
            args.bandwidth_passes
        );
        Ok(bench::bandwidth::measure(buffer, threads, args.bandwidth_passes)?)
    };
    if args.memory_bandwidth {
        let bw = measure_bandwidth()?;
        if args.json {
            println!("{}", serde_json::to_string(&bw)?);
        } else {
            println!(
                "memory bandwidth (streaming read, {} threads, {} MiB buffer, best of {}): {:.2} GB/s (median {:.2} GB/s)",
                bw.threads,
                bw.buffer_bytes >> 20,
                bw.passes,
                bw.bytes_per_s / 1e9,
                bw.median_bytes_per_s / 1e9
            );
        }
        return Ok(());
    }
    let mut cases = vec![Case {
        prompt_tokens: args.prompt_tokens,
        gen_tokens: args.gen_tokens,
    }];
    if args.long_context && !cases.contains(&bench::LONG_CONTEXT) {
        cases.push(bench::LONG_CONTEXT);
    }
    let config = BenchConfig {
        cases,
        policies: args.policies.clone(),
        keep: args.keep,
        budget: args.kv_budget,
        warmup_tokens: args.warmup_tokens,
        prefill_chunk: args.prefill_chunk,
        threads,
    };
    let mut model = load_model(onnxruntime, &args.model)?;
    bench::check(&model, &config)?;
    if let Some(path) = &args.write_prompt {
        let ids = bench::prompt_ids(&model, config.cases[0].prompt_tokens)?;
        std::fs::write(path, serde_json::to_string(&ids)?).with_context(|| format!("writing {}", path.display()))?;
    }
    let bandwidth = if args.no_bandwidth {
        None
    } else {
        Some(measure_bandwidth()?)
    };
    let report = bench::run(&mut model, &config, bandwidth, &mut |line| eprintln!("[bench] {line}"))?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", bench::markdown(&report));
    }
    Ok(())
}

fn eval(onnxruntime: Option<PathBuf>, args: &EvalArgs) -> anyhow::Result<()> {
    if args.replot {
        let rows = sweep::replot(&args.out)?;
        println!("redrew {} rows in {}", rows.len(), args.out.display());
        return Ok(());
    }
    let Some(data) = &args.data else {
        anyhow::bail!("--data is required");
    };
    let (samples, skipped) = dataset::load(data, args.strict)?;
    for skip in &skipped {
        eprintln!(
            "elastic-edge: {}: line {}: {} (skipped)",
            data.display(),
            skip.line,
            skip.reason
        );
    }
    let mut model = load_model(onnxruntime, &args.model)?;
    let config = SweepConfig {
        policies: args.policies.clone(),
        keeps: args.keeps.clone(),
        max_new_tokens: args.max_new_tokens,
        budget: args.kv_budget,
        policy_config: PolicyConfig {
            merge_on_evict: args.merge_on_evict,
            cache_length_positions: args.cache_length_positions,
            ..PolicyConfig::default()
        },
        out: args.out.clone(),
    };
    let bar = indicatif::ProgressBar::new(0).with_style(
        indicatif::ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} ETA {eta} {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let rows = sweep::run(&mut model, &samples, &config, &mut |done, total, what| {
        bar.set_length(total);
        bar.set_position(done);
        bar.set_message(what.to_string());
    })?;
    bar.finish_and_clear();
    println!(
        "{} samples ({} skipped); results in {}",
        samples.len(),
        skipped.len(),
        args.out.display()
    );
    println!("{:<12} {:>5} {:>8} {:>9}", "policy", "keep", "ROUGE-L", "PPL");
    for row in rows {
        println!(
            "{:<12} {:>5} {:>8.3} {:>9.3}",
            row.policy.name(),
            row.keep,
            row.rouge_l,
            row.ppl
        );
    }
    Ok(())
}

fn load_model(onnxruntime: Option<PathBuf>, args: &ModelArgs) -> anyhow::Result<Model> {
    let dir = args.model.clone().unwrap_or_else(model::default_model_dir);
    let options = LoadOptions {
        providers: ProviderOptions {
            device: args.device,
            device_id: args.device_id,
            tensorrt_cache: args.tensorrt_cache.clone(),
            tensorrt_fp16: args.tensorrt_fp16,
        },
        threads: args.threads,
        onnxruntime,
    };
    Ok(Model::load(&dir, &options)?)
}

fn build_cache(model: &Model, args: &CacheArgs) -> anyhow::Result<KvCache> {
    let shape = model.manifest.kv_shape();
    let backing = match &args.kv_file {
        Some(path) => PoolBacking::File(path.clone()),
        None => PoolBacking::Anonymous,
    };
    let pool = KvPool::with_budget(shape, args.kv_budget.bytes(shape.bytes_per_slot()), &backing)?;
    Ok(KvCache::new(pool, args.policy, &PolicyConfig::default(), args.keep)?)
}

fn caption(onnxruntime: Option<PathBuf>, args: &CaptionArgs) -> anyhow::Result<()> {
    if let Some(prompt) = &args.prompt {
        anyhow::ensure!(!prompt.trim().is_empty(), "the prompt is empty");
    }
    let mut model = load_model(onnxruntime, &args.model)?;
    let cache = build_cache(&model, &args.cache)?;
    let mut generator = Generator::new(&mut model, cache)?;
    let params = GenerateParams {
        max_new_tokens: args.sampling.max_new_tokens,
        ignore_stop: args.sampling.ignore_stop,
        sampling: if args.sampling.temperature > 0.0 {
            Sampling::TopP {
                temperature: args.sampling.temperature,
                top_p: args.sampling.top_p,
                seed: args.sampling.seed,
            }
        } else {
            Sampling::Greedy
        },
    };
    let several = args.images.len() > 1;
    let mut failed = 0;
    for image in &args.images {
        let mut stdout = std::io::stdout().lock();
        let mut started = false;
        let mut stream = |piece: &str| {
            if args.json {
                return;
            }
            if !started && several {
                let _ = write!(stdout, "{}: ", image.display());
            }
            started = true;
            let _ = stdout.write_all(piece.as_bytes());
            let _ = stdout.flush();
        };
        match generator.generate(
            Some(ImageInput::File(image)),
            args.prompt.as_deref(),
            &params,
            &mut stream,
        ) {
            Ok(generation) => {
                if args.json {
                    let record = serde_json::json!({
                        "image": image,
                        "caption": generation.text.trim(),
                        "tokens": generation.token_ids.len(),
                        "prompt_tokens": generation.prompt_tokens,
                        "stop": generation.stop,
                        "timings_ms": generation.timings,
                        "policy": args.cache.policy,
                        "keep": args.cache.keep.get(),
                        "pool_bytes": generation.pool_bytes,
                        "pool_slots": generation.pool_capacity,
                        "cache_entries": generation.cache_entries,
                        "merged": generation.cache.merged,
                        "evicted": generation.cache.evicted,
                    });
                    writeln!(stdout, "{record}")?;
                } else {
                    writeln!(stdout)?;
                }
            }
            Err(err) => {
                if started {
                    writeln!(stdout)?;
                }
                if !several {
                    return Err(anyhow::Error::new(err).context(image.display().to_string()));
                }
                failed += 1;
                eprintln!("elastic-edge: {}: {}", image.display(), error_chain(&err));
            }
        }
    }
    anyhow::ensure!(failed == 0, "{failed} of {} images failed", args.images.len());
    Ok(())
}

fn doctor(onnxruntime: Option<&std::path::Path>, args: &DoctorArgs) -> anyhow::Result<()> {
    let library = runtime::load(onnxruntime)?;
    println!("onnxruntime {}: {}", library.version, library.path.display());
    println!("  found by: {}", library.found_by);
    println!("  build: {}", library.build_info);
    let providers = runtime::available_providers()?;
    println!("  execution providers in this build: {}", providers.join(", "));
    for device in [Device::Cuda, Device::Tensorrt] {
        let options = ProviderOptions {
            device,
            ..ProviderOptions::default()
        };
        match model::providers::check(library.environment(), &options) {
            Ok(()) => println!("  --device {device}: available"),
            Err(err) => println!("  --device {device}: unavailable: {}", error_chain(&err)),
        }
    }

    // The model, if one is found: its manifest and files, and its geometry.
    let dir = args.model.clone().unwrap_or_else(model::default_model_dir);
    let mut weights_bytes = 0;
    let mut shape = KvShape {
        layers: args.pool.layers,
        kv_heads: args.pool.kv_heads,
        head_dim: args.pool.head_dim,
        dtype: args.pool.dtype,
    };
    match model::Manifest::load(&dir).and_then(|m| m.verify_files(&dir).map(|()| m)) {
        Ok(manifest) => {
            weights_bytes = manifest.file_hashes.values().map(|f| f.bytes).sum();
            shape = manifest.kv_shape();
            println!(
                "model {}: {} (files check out: sizes and sha256)\n  {} layers, {} KV heads of {}, {}, {} image tokens, {:.0} MB of files",
                manifest.name,
                dir.display(),
                manifest.layers,
                manifest.kv_heads,
                manifest.head_dim,
                manifest.dtype,
                manifest.vision.as_ref().map_or(0, |v| v.image_tokens),
                weights_bytes as f64 / 1e6
            );
        }
        Err(err) => println!("model: {}", error_chain(&err)),
    }

    shape.validate()?;
    let backing = match &args.pool.kv_file {
        Some(path) => PoolBacking::File(path.clone()),
        None => PoolBacking::Anonymous,
    };
    let per_slot = shape.bytes_per_slot();
    let budget = args.pool.kv_budget.bytes(per_slot);
    let pool = KvPool::with_budget(shape, budget, &backing)
        .with_context(|| format!("sizing the KV pool from {}", args.pool.kv_budget))?;
    let cache = KvCache::new(pool, args.policy, &PolicyConfig::default(), args.keep)?;
    let pool = cache.pool();
    println!(
        "kv pool: {} slots, {} bytes ({} per slot)",
        pool.capacity(),
        pool.bytes(),
        per_slot
    );
    println!(
        "  shape: {} layers x {} kv heads x {} dims, {}",
        shape.layers,
        shape.kv_heads,
        shape.head_dim,
        shape.dtype.name()
    );
    println!(
        "  policy {} at keep {}: holds a sequence of up to {} processed tokens before the budget binds",
        args.policy,
        cache.keep().get(),
        (pool.capacity() as f64 / cache.keep().get()).floor()
    );
    if let Some(available) = memory_available() {
        // Weights are mapped by ONNX Runtime (counted once); keep a margin
        // for activations, the runtime and this process.
        let margin: u64 = 150 << 20;
        let largest = available.saturating_sub(weights_bytes + margin);
        println!(
            "memory: {:.1} GiB available; after the model files and a 150 MiB margin the largest --kv-budget is {:.2} GiB ({} slots)",
            available as f64 / (1u64 << 30) as f64,
            largest as f64 / (1u64 << 30) as f64,
            largest / per_slot
        );
    }
    Ok(())
}

/// `MemAvailable` from /proc/meminfo, in bytes.
fn memory_available() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}
