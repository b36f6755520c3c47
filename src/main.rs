//! The `elastic-edge` command line: parse, call the library, print.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};

use std::io::Write;

use elastic_edge::bench::{self, BenchConfig, Case};
use elastic_edge::error::error_chain;
use elastic_edge::eval::dataset;
use elastic_edge::eval::sweep::{self, SweepConfig};
use elastic_edge::generate::{
    prefill_chunk_setting, GenerateParams, Generator, ImageInput, Sampling, DEFAULT_PREFILL_CHUNK,
};
use elastic_edge::kv::budget::{check_fits_memory, human_bytes, largest_budget, memory_available};
use elastic_edge::kv::{KeepRatio, KvBudget, KvCache, KvDtype, KvShape, PolicyConfig, PolicyKind, PoolBacking};
use elastic_edge::memory::MemoryOptions;
use elastic_edge::model::{self, Device, LoadOptions, Model, ProviderOptions};
use elastic_edge::runtime;
use elastic_edge::sampling;
use elastic_edge::serve::{self, ServeConfig};
use elastic_edge::source::{Backoff, Grabber, SourceOptions, SourceSpec, SourceState, StopFlag};
use elastic_edge::stream::{
    self, AnswerRecord, CaptionRecord, CaptionSink, JsonLines, MemoryRecord, MemoryStreamConfig, StreamConfig,
    StreamEnd,
};

/// `println!` that returns a closed stdout (a pipe whose reader left) as an
/// error instead of panicking.
macro_rules! outln {
    ($($arg:tt)*) => {
        writeln!(std::io::stdout(), $($arg)*).map_err(stdout_error)?
    };
}

/// `print!`, as [`outln!`].
macro_rules! out {
    ($($arg:tt)*) => {
        write!(std::io::stdout(), $($arg)*).map_err(stdout_error)?
    };
}

fn stdout_error(source: std::io::Error) -> elastic_edge::Error {
    elastic_edge::Error::Output {
        target: "stdout".into(),
        source,
    }
}

/// Whether file descriptor 1 was closed when the process started
/// (`elastic-edge caption ... >&-`). Rust's runtime then opens /dev/null on
/// it before `main`, so every write would succeed and the output be lost;
/// this looks before that, from the program's initialisers.
#[cfg(target_os = "linux")]
mod stdout_at_start {
    use std::sync::atomic::{AtomicBool, Ordering};

    static CLOSED: AtomicBool = AtomicBool::new(false);

    extern "C" fn look() {
        // SAFETY: fcntl(F_GETFD) on a descriptor number only reads the
        // process's descriptor table; it fails with EBADF for a closed one.
        let closed = unsafe { libc::fcntl(1, libc::F_GETFD) } == -1;
        CLOSED.store(closed, Ordering::Relaxed);
    }

    // Run by the C runtime before main, hence before Rust's runtime fills in
    // closed standard descriptors.
    #[used]
    #[link_section = ".init_array"]
    static LOOK: extern "C" fn() = look;

    pub fn closed() -> bool {
        CLOSED.load(Ordering::Relaxed)
    }
}

#[cfg(not(target_os = "linux"))]
mod stdout_at_start {
    pub fn closed() -> bool {
        false
    }
}

#[derive(Parser)]
#[command(
    name = "elastic-edge",
    version,
    // A flag given twice takes its last value (a script's defaults, then
    // the ablation's override).
    args_override_self = true,
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
    /// Caption a camera or a stream of pictures continuously, as JSON Lines.
    Stream(StreamArgs),
    /// The robot service: a camera captioned (or remembered) continuously,
    /// HTTP health, metrics, captions, POST /caption and POST /memory/ask,
    /// systemd notifications.
    Serve(ServeArgs),
    /// Speed: time to first token, prefill and decode tokens/s, step time as the
    /// answer grows, peak RSS and pool bytes per policy, against the memory-bandwidth floor.
    Bench(BenchArgs),
}

#[derive(Args)]
#[command(
    after_long_help = "HTTP (default 127.0.0.1:8080): GET /healthz (200 ok, 503 degraded), GET /metrics \
                       (Prometheus), GET /caption/latest, GET /captions/stream or /events (server-sent events), \
                       POST /caption[?prompt=...] with an image as the body (409 while the memory is on), \
                       POST /memory/ask with {\"question\": \"...\", \"max_tokens\": 64} when [memory] enabled = true \
                       (the camera's frames in one bounded context; docs/memory.md). Under systemd (Type=notify): READY=1 \
                       once the model is loaded and HTTP listens, WATCHDOG=1 while the captioning loop is alive, \
                       STOPPING=1 on SIGTERM or SIGINT, which stop after the caption in flight. \
                       scripts/elastic-edge.toml is a commented config; scripts/install-service.sh installs the unit."
)]
struct ServeArgs {
    /// The service's TOML config.
    #[arg(long, value_name = "FILE")]
    config: PathBuf,

    /// Check the config, the model's files, the KV budget and the source,
    /// print the memory the service needs (MemoryMax), and exit.
    #[arg(long)]
    check: bool,
}

#[derive(Args)]
#[command(
    after_long_help = "Each caption is one JSON line on stdout (or --output): time, unix_ms, frame_id, \
                       frame_time, caption, timings_ms, cache statistics and counters (frames received, \
                       dropped, corrupt, source losses, captions, errors). Progress goes to stderr. \
                       Latest frame wins: a live source's frames that arrive while a caption is being made \
                       are dropped (counted); file sources are captioned one by one. A lost live source \
                       reconnects with backoff (0.5 s doubling to 30 s). SIGINT or SIGTERM stops after the \
                       caption in flight (a second SIGINT exits at once)."
)]
struct StreamArgs {
    /// Where frames come from: file:, dir:, glob:, stdin:mjpeg, stdin:ppm,
    /// gst:PIPELINE, or a bare path (--help lists the forms).
    #[arg(long, value_name = "SPEC", long_help = elastic_edge::source::SOURCE_SPEC_HELP, value_parser = parse_source)]
    source: SourceSpec,

    /// File sources: start again after the last file.
    #[arg(long = "loop")]
    looping: bool,

    /// What to ask about each frame (default: the model's captioning prompt).
    #[arg(long)]
    prompt: Option<String>,

    /// Time between the starts of two captions (2s, 500ms, 1m); 0 captions
    /// as fast as the model allows.
    #[arg(long, default_value = "0", value_parser = parse_every, allow_hyphen_values = true)]
    every: std::time::Duration,

    /// Append the JSON lines to this file instead of writing them to stdout.
    #[arg(long, value_name = "FILE")]
    output: Option<PathBuf>,

    /// Stop after this many captions (with --memory: frames taken in), at
    /// least 1; without it the stream runs until its source ends.
    #[arg(long, value_name = "N", value_parser = parse_max_frames, allow_negative_numbers = true)]
    max_frames: Option<u64>,

    /// Camera memory: keep one continuing context across frames instead of
    /// captioning each on its own. Each frame adds a header (its id and
    /// time) and its picture; the pool is never reset, and the policy
    /// compresses whenever --kv-budget binds, so memory stays flat however
    /// long the stream runs. Records carry frames_in_memory, cache_entries,
    /// pool_bytes, merged, evicted and max_position (docs/memory.md).
    #[arg(long)]
    memory: bool,

    /// --memory: also caption each frame and keep the caption in the memory.
    #[arg(long, requires = "memory")]
    memory_captions: bool,

    /// --memory: questions, JSON Lines {"at_frame": N, "question": "...",
    /// "max_tokens": M (optional)}; each is answered from the memory after
    /// the first frame whose id is N or more, as a JSON line with
    /// "question", "answer", "frame_id" and the cache figures. Questions and
    /// answers stay in the memory. Bad lines are reported and skipped.
    #[arg(long, value_name = "FILE", requires = "memory")]
    questions: Option<PathBuf>,

    #[command(flatten)]
    model: ModelArgs,

    #[command(flatten)]
    cache: CacheArgs,

    #[command(flatten)]
    sampling: SamplingArgs,
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

    /// Most prompt tokens per decoder run, as `caption` runs them; 0 runs the
    /// whole prompt at once. Prefill memory grows with the square of a run.
    #[arg(long, value_name = "TOKENS", default_value_t = DEFAULT_PREFILL_CHUNK, allow_negative_numbers = true)]
    prefill_chunk: usize,

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

    #[command(flatten)]
    knobs: PolicyConfig,
}

#[derive(Args)]
struct EvalArgs {
    /// Dataset, JSON Lines: {"id", "kind" (caption, detail, question, text,
    /// multi-image), "images" (up to 3, relative to the file), "prompt",
    /// "reference" (optional)}; see datasets/README.md.
    #[arg(long, value_name = "FILE", required_unless_present = "replot")]
    data: Option<PathBuf>,

    /// Only redraw results.md and results.svg from --out's results.csv and samples.csv.
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

    /// Most tokens per answer (1 to 4096, and fewer than the model's positions).
    #[arg(long, default_value_t = 256, value_parser = parse_max_new_tokens, allow_negative_numbers = true)]
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

    /// Evaluate the camera memory instead: sequences of N of the dataset's
    /// single pictures shown as frames of one memory, then a question about
    /// the first frame and one about the last, each policy's pool cut to
    /// --keep of the entries the full cache held after the frames. Writes
    /// memory.csv, memory-samples.csv and memory.md into --out.
    #[arg(long, value_name = "N", conflicts_with = "replot")]
    memory_frames: Option<usize>,

    /// Score --model against this model's full-cache answers instead of its
    /// own: e.g. the fp32 build when --model is the int4 or fp16 build of
    /// the same weights (the tokenizers must be the same file). Every row,
    /// full included, is then ROUGE-L against those answers and the
    /// perplexity of those answers under --model. Loaded first (same
    /// --device and --threads), its answers cached in --out, then dropped.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["replot", "memory_frames"])]
    reference_model: Option<PathBuf>,

    /// The knobs apply to every policy that uses them (the ablations).
    #[command(flatten)]
    knobs: PolicyConfig,
}

/// `--kv-budget`'s default, the same for caption, stream and doctor (and
/// the service's `cache.kv_budget`).
const DEFAULT_KV_BUDGET: &str = "32MiB";
/// `--keep`'s default, as `--kv-budget`'s.
const DEFAULT_KEEP: &str = "1";

/// What caption's help says of the cache's words.
const CACHE_WORDS: &str = "The KV cache holds the keys and values of every token the model has read or written. \
    The pool is its memory: one block sized once from --kv-budget, never grown. The keep ratio (--keep) is the \
    share of the tokens processed so far that the cache keeps; below 1 the policy compresses as the answer \
    grows, at 1 only when the pool is full. The policy (--policy) chooses what goes: elastic merges the least \
    important entries into those it keeps, h2o and local drop entries, full drops nothing and fails when the \
    pool is full (docs/policies.md).";

#[derive(Args)]
#[command(after_help = CACHE_WORDS)]
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

    /// Put every --image into one prompt, in the order given, and answer
    /// once (two cameras, before and after): each picture's tokens go where
    /// the model's chat template puts a picture. Without it, each picture
    /// is captioned on its own.
    #[arg(long)]
    together: bool,
}

/// Which model, and where it runs.
#[derive(Args, Clone)]
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

    /// Intra-op threads per graph, at most the CPUs this process may use
    /// (default: one per core).
    #[arg(long, value_parser = parse_threads, allow_negative_numbers = true)]
    threads: Option<usize>,

    /// TensorRT: cache built engines in this folder.
    #[arg(long, value_name = "DIR")]
    tensorrt_cache: Option<PathBuf>,

    /// TensorRT: allow fp16 kernels.
    #[arg(long)]
    tensorrt_fp16: bool,

    /// Load only the decoder graph with attention sums, not the fast graph
    /// without them that steps reading no sums run (one session instead of
    /// two over the same weights: for comparing their speed and memory).
    #[arg(long)]
    single_graph: bool,
}

/// The KV cache: its hard budget and its policy.
#[derive(Args)]
struct CacheArgs {
    /// Cache policy, how the cache makes room: elastic (Elastic Cache with
    /// this project's components: merges the least important entries into
    /// kept ones), elastic-paper (the paper's algorithm), elastic-ref (the
    /// authors' code), h2o (keeps heavy hitters and recent tokens), local
    /// (keeps the first and the latest tokens: StreamingLLM), full (keeps
    /// everything; fails when the pool is full).
    #[arg(long, default_value = "elastic", value_parser = parse_policy)]
    policy: PolicyKind,

    /// Keep ratio: the share of processed tokens the cache keeps, in (0, 1]
    /// (ignored by full). At 1 the policy acts only when the budget is full.
    #[arg(long, default_value = DEFAULT_KEEP, value_parser = parse_keep)]
    keep: KeepRatio,

    #[command(flatten)]
    knobs: PolicyConfig,

    /// Hard KV budget, the pool's size: bytes (32MiB, 1GB) or slots
    /// (4096tokens), at most the memory available.
    #[arg(long, default_value = DEFAULT_KV_BUDGET, value_parser = parse_budget)]
    kv_budget: KvBudget,

    /// Back the pool with this file (e.g. /dev/shm/elastic-edge.kv).
    #[arg(long, value_name = "PATH")]
    kv_file: Option<PathBuf>,

    /// With --kv-file on a disk: allow a budget larger than the memory
    /// available (refused otherwise, naming the largest that fits).
    #[arg(long, requires = "kv_file")]
    kv_over_memory: bool,

    /// Most prompt tokens per decoder run; 0 runs the whole prompt at once.
    /// Prefill memory grows with the square of a run; the policy's choices
    /// do not depend on it.
    #[arg(long, value_name = "TOKENS", default_value_t = DEFAULT_PREFILL_CHUNK, allow_negative_numbers = true)]
    prefill_chunk: usize,
}

#[derive(Args)]
struct SamplingArgs {
    /// Most tokens to generate (1 to 4096, and fewer than the model's positions).
    #[arg(long, default_value_t = 64, value_parser = parse_max_new_tokens, allow_negative_numbers = true)]
    max_new_tokens: usize,

    /// Sampling temperature, 0 or more; 0 is greedy.
    #[arg(long, default_value_t = 0.0, value_parser = parse_temperature, allow_hyphen_values = true)]
    temperature: f32,

    /// Nucleus sampling: smallest set of tokens whose probability reaches
    /// this, in (0, 1].
    #[arg(long, default_value_t = 0.9, value_parser = parse_top_p, allow_hyphen_values = true)]
    top_p: f32,

    /// Sample only from this many most likely tokens (with --temperature above 0); 0 is off.
    #[arg(long, value_name = "K", default_value_t = 0, value_parser = parse_top_k, allow_negative_numbers = true)]
    top_k: usize,

    /// Divide (multiply, if negative) the logit of every token this answer already generated by this; 1 is off, greedy too.
    #[arg(long, value_name = "PENALTY", default_value_t = 1.0, value_parser = parse_repetition_penalty, allow_hyphen_values = true)]
    repetition_penalty: f32,

    /// Seed of the sampler.
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    seed: u64,

    /// End the answer where its text first contains STRING, which is not printed (repeatable).
    #[arg(long = "stop", value_name = "STRING", value_parser = parse_stop_string, allow_hyphen_values = true)]
    stop_strings: Vec<String>,

    /// Generate through stop tokens, up to --max-new-tokens (for timing long outputs).
    #[arg(long)]
    ignore_stop: bool,
}

#[derive(Args)]
struct DoctorArgs {
    /// Model folder to check, or a Hugging Face checkpoint folder (config.json,
    /// no manifest.json) to size (default: as for caption).
    #[arg(long, value_name = "DIR")]
    model: Option<PathBuf>,

    #[command(flatten)]
    pool: PoolArgs,

    /// Cache policy whose protected entries the budget must hold.
    #[arg(long, default_value = "elastic", value_parser = parse_policy)]
    policy: PolicyKind,

    /// Keep ratio: the share of processed tokens the cache keeps, in (0, 1]
    /// (default: caption's).
    #[arg(long, default_value = DEFAULT_KEEP, value_parser = parse_keep)]
    keep: KeepRatio,

    /// Picture size, WIDTHxHEIGHT, that the model (an exported one, or a
    /// Hugging Face checkpoint folder: config.json, no manifest.json) is
    /// sized for: what one picture costs in image tokens, and how many a
    /// budget holds (default: a 720p camera frame).
    #[arg(long, value_name = "WxH", default_value = "1280x720", value_parser = parse_picture)]
    picture: (u32, u32),

    #[command(flatten)]
    knobs: PolicyConfig,
}

/// The KV pool's geometry and budget. The geometry is the model's when one
/// is found, else these flags (default: the demo model's decoder,
/// SmolLM2-135M: 30 layers, 3 KV heads of 64).
#[derive(Args)]
struct PoolArgs {
    /// KV pool budget: bytes (64MiB, 1.5GB, 65536) or slots (4096tokens)
    /// (default: caption's).
    #[arg(long, default_value = DEFAULT_KV_BUDGET, value_parser = parse_budget)]
    kv_budget: KvBudget,

    /// Back the pool with this file (e.g. /dev/shm/elastic-edge.kv) instead
    /// of anonymous memory.
    #[arg(long, value_name = "PATH")]
    kv_file: Option<PathBuf>,

    /// With --kv-file on a disk: allow a budget larger than the memory
    /// available (refused otherwise, naming the largest that fits).
    #[arg(long, requires = "kv_file")]
    kv_over_memory: bool,

    /// Layers of the pool, when no model is found (default 30; refused
    /// with a model, whose geometry is used).
    #[arg(long)]
    layers: Option<usize>,
    /// KV heads, when no model is found (default 3).
    #[arg(long)]
    kv_heads: Option<usize>,
    /// Dimensions per head, when no model is found (default 64).
    #[arg(long)]
    head_dim: Option<usize>,
    /// Element type of the cache, f16 or f32, when no model is found
    /// (default f16).
    #[arg(long, value_parser = parse_dtype)]
    dtype: Option<KvDtype>,
}

impl PoolArgs {
    /// The geometry flags given, by name.
    fn geometry_flags(&self) -> Vec<&'static str> {
        [
            ("--layers", self.layers.is_some()),
            ("--kv-heads", self.kv_heads.is_some()),
            ("--head-dim", self.head_dim.is_some()),
            ("--dtype", self.dtype.is_some()),
        ]
        .into_iter()
        .filter_map(|(name, given)| given.then_some(name))
        .collect()
    }
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

/// A byte size that is not a KV budget (the bandwidth buffer).
fn parse_bytes(s: &str) -> Result<u64, String> {
    elastic_edge::kv::parse_bytes(s).map_err(|reason| format!("{reason} (examples: 256MiB, 1GiB, 1073741824)"))
}

/// `WIDTHxHEIGHT`, both at least 1.
fn parse_picture(s: &str) -> Result<(u32, u32), String> {
    let (width, height) = s
        .trim()
        .split_once(['x', 'X'])
        .ok_or("not WIDTHxHEIGHT (for example 1280x720)")?;
    let side = |text: &str, what: &str| match text.trim().parse::<u32>() {
        Ok(0) => Err(format!("the {what} must be at least 1 pixel")),
        Ok(n) => Ok(n),
        Err(_) => Err(format!(
            "the {what} {text:?} is not a whole number (for example 1280x720)"
        )),
    };
    Ok((side(width, "width")?, side(height, "height")?))
}

fn parse_max_frames(s: &str) -> Result<u64, String> {
    match s.trim().parse::<u64>() {
        Ok(0) => Err("must be at least 1 (leave it out to run until the source ends)".into()),
        Ok(n) => Ok(n),
        Err(_) => Err("not a whole number".into()),
    }
}

fn parse_temperature(s: &str) -> Result<f32, String> {
    let value: f32 = s.trim().parse().map_err(|_| "not a number".to_string())?;
    sampling::check_temperature(value)?;
    Ok(value)
}

fn parse_top_p(s: &str) -> Result<f32, String> {
    let value: f32 = s.trim().parse().map_err(|_| "not a number".to_string())?;
    sampling::check_top_p(value)?;
    Ok(value)
}

fn parse_top_k(s: &str) -> Result<usize, String> {
    s.trim()
        .parse()
        .map_err(|_| "not a whole number, 0 (off) or more".to_string())
}

fn parse_repetition_penalty(s: &str) -> Result<f32, String> {
    let value: f32 = s.trim().parse().map_err(|_| "not a number".to_string())?;
    sampling::check_repetition_penalty(value)?;
    Ok(value)
}

fn parse_stop_string(s: &str) -> Result<String, String> {
    match s.is_empty() {
        true => Err("an empty stop string would end every answer before it starts".into()),
        false => Ok(s.to_string()),
    }
}

fn parse_threads(s: &str) -> Result<usize, String> {
    let threads: usize = s.trim().parse().map_err(|_| "not a whole number".to_string())?;
    model::check_threads(threads)?;
    Ok(threads)
}

fn parse_max_new_tokens(s: &str) -> Result<usize, String> {
    let limit = elastic_edge::generate::MAX_NEW_TOKENS_LIMIT;
    match s.trim().parse::<usize>() {
        Ok(n) if (1..=limit).contains(&n) => Ok(n),
        _ => Err(format!("must be a whole number from 1 to {limit}")),
    }
}

/// The answer length against the model's positions, before any pool is
/// sized or image read.
fn check_new_tokens(model: &Model, params: &GenerateParams) -> anyhow::Result<()> {
    params.check(&model.manifest).map_err(|e| match e {
        elastic_edge::Error::NewTokens { max_new_tokens, reason } => {
            anyhow::anyhow!("--max-new-tokens {max_new_tokens}: {reason}")
        }
        other => other.into(),
    })
}

fn parse_dtype(s: &str) -> Result<KvDtype, String> {
    s.parse().map_err(|e: elastic_edge::Error| e.to_string())
}

fn parse_source(s: &str) -> Result<SourceSpec, String> {
    s.parse().map_err(|e: elastic_edge::Error| e.to_string())
}

fn parse_every(s: &str) -> Result<std::time::Duration, String> {
    stream::parse_interval(s).map_err(|e| e.to_string())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The service logs what it does (journald keeps it); commands stay quiet.
    // (`serve --check` is a command: its report is on stdout.)
    let level = if matches!(&cli.command, Command::Serve(args) if !args.check) {
        "info,ort=warn"
    } else {
        "warn"
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(level)).init();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // One line: the context, then each cause not already quoted.
            // (A closed stderr is not worth a panic.)
            let _ = writeln!(std::io::stderr(), "elastic-edge: {}", error_chain(err.as_ref()));
            ExitCode::FAILURE
        }
    }
}

/// Whether the command's results go to stdout.
fn writes_stdout(command: &Command) -> bool {
    match command {
        Command::Stream(args) => args.output.is_none(),
        Command::Serve(args) => args.check,
        Command::Caption(_) | Command::Doctor(_) | Command::Eval(_) | Command::Bench(_) => true,
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    if writes_stdout(&cli.command) && stdout_at_start::closed() {
        anyhow::bail!("stdout is closed: the results would be lost (redirect it to a file, or to /dev/null)");
    }
    run_command(cli)?;
    // What is still buffered (a line without its newline) must get out too.
    std::io::stdout().flush().map_err(stdout_error)?;
    Ok(())
}

fn run_command(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Caption(args) => caption(cli.onnxruntime, &args),
        Command::Doctor(args) => doctor(cli.onnxruntime.as_deref(), &args),
        Command::Eval(args) => eval(cli.onnxruntime, &args),
        Command::Stream(args) => stream_command(cli.onnxruntime, &args),
        Command::Serve(args) => serve(cli.onnxruntime, &args),
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
            outln!("{}", serde_json::to_string(&bw)?);
        } else {
            outln!(
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
        prefill_chunk: prefill_chunk_setting(args.prefill_chunk),
        threads,
        knobs: args.knobs.clone(),
    };
    if let Some(budget) = args.kv_budget {
        check_pool_memory(&args.model, budget, false)?;
    }
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
        outln!("{}", serde_json::to_string(&report)?);
    } else {
        out!("{}", bench::markdown(&report));
    }
    Ok(())
}

fn eval(onnxruntime: Option<PathBuf>, args: &EvalArgs) -> anyhow::Result<()> {
    if args.replot {
        let rows = sweep::replot(&args.out)?;
        outln!("redrew {} rows in {}", rows.len(), args.out.display());
        return Ok(());
    }
    let Some(data) = &args.data else {
        anyhow::bail!("--data is required");
    };
    let (samples, skipped) = dataset::load(data, args.strict)?;
    let report_skipped = |skipped: &[dataset::Skipped]| {
        for skip in skipped {
            eprintln!(
                "elastic-edge: {}: line {}: {} (skipped)",
                data.display(),
                skip.line,
                skip.reason
            );
        }
    };
    report_skipped(&skipped);
    check_pool_memory(&args.model, args.kv_budget, false)?;
    let mut model = load_model(onnxruntime, &args.model)?;
    // Every picture read once the way the model reads it, before the sweep.
    let (samples, bad_pictures) = dataset::check_pictures(data, samples, model.preprocess.as_ref(), args.strict)?;
    report_skipped(&bad_pictures);
    let skipped = [skipped, bad_pictures].concat();
    check_new_tokens(
        &model,
        &GenerateParams {
            max_new_tokens: args.max_new_tokens,
            ..GenerateParams::default()
        },
    )?;
    let bar = indicatif::ProgressBar::new(0).with_style(
        indicatif::ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} ETA {eta} {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    if let Some(frames) = args.memory_frames {
        let config = elastic_edge::eval::memory::MemoryEvalConfig {
            policies: args.policies.clone(),
            keeps: args.keeps.clone(),
            frames,
            max_new_tokens: args.max_new_tokens,
            policy_config: args.knobs.clone(),
            out: args.out.clone(),
        };
        let rows = elastic_edge::eval::memory::run(&mut model, &samples, &config, &mut |done, total, what| {
            bar.set_length(total);
            bar.set_position(done);
            bar.set_message(what.to_string());
        })?;
        bar.finish_and_clear();
        out!(
            "{}",
            std::fs::read_to_string(args.out.join("memory.md")).unwrap_or_default()
        );
        outln!("{} runs; results in {}", rows.len(), args.out.display());
        return Ok(());
    }
    let config = SweepConfig {
        policies: args.policies.clone(),
        keeps: args.keeps.clone(),
        max_new_tokens: args.max_new_tokens,
        budget: args.kv_budget,
        policy_config: args.knobs.clone(),
        out: args.out.clone(),
    };
    let mut progress = |done, total, what: &str| {
        bar.set_length(total);
        bar.set_position(done);
        bar.set_message(what.to_string());
    };
    let references = match &args.reference_model {
        Some(dir) => {
            let reference_args = ModelArgs {
                model: Some(dir.clone()),
                ..args.model.clone()
            };
            // ONNX Runtime is loaded once per process: this gets --model's.
            let mut reference = load_model(None, &reference_args)?;
            let tokenizer = |m: &Model| {
                m.manifest
                    .file_hashes
                    .get(&m.manifest.files.tokenizer)
                    .map(|h| h.sha256.clone())
            };
            if tokenizer(&reference) != tokenizer(&model) || reference.manifest.vocab != model.manifest.vocab {
                anyhow::bail!(
                    "--reference-model {}: its tokenizer is not --model's, so its answers' token ids mean other words",
                    dir.display()
                );
            }
            let answers = sweep::full_cache_answers(&mut reference, &samples, &config, &mut progress)?;
            Some(answers)
        }
        None => None,
    };
    let rows = sweep::run_against(&mut model, &samples, &config, references, &mut progress)?;
    bar.finish_and_clear();
    outln!(
        "{} samples ({} skipped); results in {}",
        samples.len(),
        skipped.len(),
        args.out.display()
    );
    outln!("{:<12} {:>5} {:>8} {:>9}", "policy", "keep", "ROUGE-L", "PPL");
    for row in rows {
        outln!(
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
        single_graph: args.single_graph,
    };
    Ok(Model::load(&dir, &options)?)
}

/// The pool a budget sizes against the memory available, before the model
/// loads, as `doctor` computes it: the model's files and a margin set aside.
/// (A manifest that does not load is left for the model's loading to report.)
fn check_pool_memory(model: &ModelArgs, budget: KvBudget, over_memory: bool) -> anyhow::Result<()> {
    if over_memory {
        return Ok(());
    }
    let dir = model.model.clone().unwrap_or_else(model::default_model_dir);
    let Ok(manifest) = model::Manifest::load(&dir) else {
        return Ok(());
    };
    let pool_bytes = budget.pool_bytes(manifest.kv_shape().bytes_per_slot());
    check_fits_memory(pool_bytes, manifest.files_bytes()).map_err(|e| {
        anyhow::anyhow!("--kv-budget: {e}; lower it (or, for a pool on disk, pass --kv-file PATH --kv-over-memory)")
    })
}

fn build_cache(model: &Model, args: &CacheArgs) -> anyhow::Result<KvCache> {
    Ok(KvCache::with_budget(
        model.manifest.kv_shape(),
        args.kv_budget,
        &PoolBacking::from_file(args.kv_file.as_deref()),
        args.policy,
        &args.knobs,
        args.keep,
    )?)
}

/// The flags' settings, checked together (each flag was checked alone).
fn generate_params(args: &SamplingArgs) -> anyhow::Result<GenerateParams> {
    sampling::check_stop_strings(&args.stop_strings)?;
    Ok(GenerateParams {
        max_new_tokens: args.max_new_tokens,
        ignore_stop: args.ignore_stop,
        sampling: Sampling {
            temperature: args.temperature,
            top_p: args.top_p,
            top_k: args.top_k,
            repetition_penalty: args.repetition_penalty,
            seed: args.seed,
        },
        stop_strings: args.stop_strings.clone(),
    })
}

/// A stop flag that SIGINT and SIGTERM set. A second signal while stopping
/// exits at once (a caption can take seconds); the first only sets the flag.
fn stop_on_signals() -> anyhow::Result<StopFlag> {
    let stop = StopFlag::new();
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register_conditional_shutdown(signal, 130, Arc::clone(stop.atomic()))
            .context("installing the signal handlers")?;
        signal_hook::flag::register(signal, Arc::clone(stop.atomic())).context("installing the signal handlers")?;
    }
    Ok(stop)
}

fn serve(onnxruntime: Option<PathBuf>, args: &ServeArgs) -> anyhow::Result<()> {
    let mut config = ServeConfig::load(&args.config)?;
    if onnxruntime.is_some() {
        config.model.onnxruntime = onnxruntime;
    }
    if args.check {
        let report = serve::check(&config)?;
        outln!("config ok: {}", config.path.display());
        outln!("model {}: {} bytes of files", report.model, report.model_bytes);
        outln!("kv pool: {} bytes, {} slots", report.pool_bytes, report.pool_slots);
        outln!("memory_max_bytes={}", report.memory_max_bytes);
        return Ok(());
    }
    let stop = stop_on_signals()?;
    serve::run(&config, &stop)?;
    Ok(())
}

/// The stream command's sink: JSON lines out, a progress line on stderr.
struct StreamOutput<W: Write> {
    lines: JsonLines<W>,
    /// Stopped when the output's reader is gone (a closed pipe): nothing
    /// more could be shown, so nothing more is captioned.
    stop: StopFlag,
    broken: Option<String>,
}

impl<W: Write> StreamOutput<W> {
    fn new(lines: JsonLines<W>, stop: &StopFlag) -> Self {
        StreamOutput {
            lines,
            stop: stop.clone(),
            broken: None,
        }
    }

    fn write(&mut self, record: &impl serde::Serialize) -> elastic_edge::Result<()> {
        let result = self.lines.write(record);
        if let Err(err @ elastic_edge::Error::Output { source, .. }) = &result {
            if source.kind() == std::io::ErrorKind::BrokenPipe && self.broken.is_none() {
                self.broken = Some(err.to_string());
                self.stop.stop();
            }
        }
        result
    }
}

impl<W: Write> CaptionSink for StreamOutput<W> {
    fn on_memory_record(&mut self, record: &MemoryRecord) -> elastic_edge::Result<()> {
        let m = &record.memory;
        eprintln!(
            "elastic-edge: frame {} in memory in {:.2} s: {} frames, {} entries, {} evicted, {} merged, position {}{}",
            record.frame_id,
            record.frame_ms / 1e3,
            m.frames_in_memory,
            m.cache_entries,
            m.evicted,
            m.merged,
            m.max_position,
            record.caption.as_ref().map(|c| format!(": {c:?}")).unwrap_or_default()
        );
        self.write(record)
    }

    fn on_answer(&mut self, record: &AnswerRecord) -> elastic_edge::Result<()> {
        eprintln!(
            "elastic-edge: after frame {}: {:?} -> {:?}",
            record.frame_id, record.question, record.answer
        );
        self.write(record)
    }

    fn on_record(&mut self, record: &CaptionRecord) -> elastic_edge::Result<()> {
        let c = &record.counters;
        eprintln!(
            "elastic-edge: frame {} captioned in {:.2} s ({} received, {} dropped, {} corrupt, {} losses): {:?}",
            record.frame_id,
            record.result.caption_ms / 1e3,
            c.source.frames_received,
            c.source.frames_dropped,
            c.source.frames_corrupt,
            c.source.source_losses,
            record.result.caption
        );
        self.write(record)
    }
}

fn stream_command(onnxruntime: Option<PathBuf>, args: &StreamArgs) -> anyhow::Result<()> {
    let stop = stop_on_signals()?;
    let options = SourceOptions {
        looping: args.looping,
        ..SourceOptions::default()
    };
    // The source first: a bad spec or pipeline fails before the model loads.
    let source = args.source.open(&options, &stop)?;
    if let Some(path) = &args.questions {
        // Not a FIFO or a device, and before the model loads.
        elastic_edge::regular_file::check(path).with_context(|| format!("--questions {}", path.display()))?;
    }
    let params = generate_params(&args.sampling)?;
    check_pool_memory(&args.model, args.cache.kv_budget, args.cache.kv_over_memory)?;
    let mut model = load_model(onnxruntime, &args.model)?;
    check_new_tokens(&model, &params)?;
    let cache = build_cache(&model, &args.cache)?;
    let mut generator = Generator::new(&mut model, cache)?;
    generator.set_prefill_chunk(prefill_chunk_setting(args.cache.prefill_chunk));
    let memory = match args.memory {
        false => None,
        true => {
            let questions = match &args.questions {
                None => Vec::new(),
                Some(path) => {
                    let (questions, warnings) = stream::read_questions(path)?;
                    for warning in warnings {
                        eprintln!("elastic-edge: {warning}");
                    }
                    questions
                }
            };
            Some(MemoryStreamConfig {
                options: MemoryOptions {
                    captions: args.memory_captions,
                    caption_prompt: args.prompt.clone(),
                    caption_params: params.clone(),
                },
                questions,
                answer_params: params.clone(),
            })
        }
    };
    let config = StreamConfig {
        prompt: args.prompt.clone(),
        every: args.every,
        max_captions: args.max_frames,
        params,
        memory,
        ..StreamConfig::default()
    };
    stream::check_prompt(&generator, &config)?;
    let (summary, broken) = match &args.output {
        Some(path) => {
            let mut output = StreamOutput::new(JsonLines::append_to(path)?, &stop);
            (
                run_stream(&mut generator, source, &config, &stop, &mut output)?,
                output.broken,
            )
        }
        None => {
            let mut output = StreamOutput::new(JsonLines::new(std::io::stdout(), "stdout"), &stop);
            (
                run_stream(&mut generator, source, &config, &stop, &mut output)?,
                output.broken,
            )
        }
    };
    let (end, status) = summary;
    let c = status.counters;
    let why = match end {
        StreamEnd::SourceEnded => "the source ended",
        StreamEnd::Stopped if broken.is_some() => "the output is closed",
        StreamEnd::Stopped => "stopped",
        StreamEnd::MaxCaptions => "--max-frames reached",
    };
    eprintln!(
        "elastic-edge: stream done ({why}): {} captions, {} frames received, {} dropped, {} corrupt, \
         {} source losses, {} reconnection attempts, {} caption errors, {} output errors",
        c.captions,
        c.source.frames_received,
        c.source.frames_dropped,
        c.source.frames_corrupt,
        c.source.source_losses,
        c.source.reconnect_attempts,
        c.caption_errors,
        c.output_errors
    );
    if args.memory {
        eprintln!(
            "elastic-edge: memory: {} questions answered, {} skipped",
            c.questions_answered, c.questions_skipped
        );
    }
    if let Some(broken) = broken {
        anyhow::bail!("{broken}: its reader is gone; stopped after {} captions", c.captions);
    }
    if let SourceState::Failed { error } = status.state {
        anyhow::bail!("{error}");
    }
    anyhow::ensure!(
        c.output_errors == 0,
        "{} of {} captions could not be written",
        c.output_errors,
        c.captions
    );
    Ok(())
}

/// Runs the stream loop over a grabber and returns how it ended with the
/// grabber's final state.
fn run_stream(
    generator: &mut Generator<'_>,
    source: Box<dyn elastic_edge::source::FrameSource>,
    config: &StreamConfig,
    stop: &StopFlag,
    sink: &mut dyn CaptionSink,
) -> anyhow::Result<(StreamEnd, StreamStatus)> {
    let grabber = Grabber::start(source, Backoff::default(), stop.clone())?;
    let summary = stream::run(generator, &grabber, config, stop, sink)?;
    let source_status = grabber.finish();
    let mut counters = summary.counters;
    counters.source = source_status.counters;
    Ok((
        summary.end,
        StreamStatus {
            state: source_status.state,
            counters,
        },
    ))
}

struct StreamStatus {
    state: SourceState,
    counters: stream::StreamCounters,
}

fn caption(onnxruntime: Option<PathBuf>, args: &CaptionArgs) -> anyhow::Result<()> {
    if let Some(prompt) = &args.prompt {
        anyhow::ensure!(!prompt.trim().is_empty(), "the prompt is empty");
    }
    let params = generate_params(&args.sampling)?;
    check_pool_memory(&args.model, args.cache.kv_budget, args.cache.kv_over_memory)?;
    let mut model = load_model(onnxruntime, &args.model)?;
    check_new_tokens(&model, &params)?;
    let cache = build_cache(&model, &args.cache)?;
    let mut generator = Generator::new(&mut model, cache)?;
    generator.set_prefill_chunk(prefill_chunk_setting(args.cache.prefill_chunk));
    // One prompt per picture, or one prompt with them all.
    let prompts: Vec<&[PathBuf]> = if args.together {
        vec![&args.images[..]]
    } else {
        args.images.chunks(1).collect()
    };
    let several = prompts.len() > 1;
    let mut failed = 0;
    for images in &prompts {
        let label = images
            .iter()
            .map(|image| image.display().to_string())
            .collect::<Vec<_>>()
            .join(" + ");
        let mut stdout = std::io::stdout().lock();
        let mut started = false;
        // A closed stdout ends the generation at the next piece.
        let mut stream = |piece: &str| -> elastic_edge::Result<()> {
            if args.json {
                return Ok(());
            }
            if !started && several {
                write!(stdout, "{label}: ").map_err(stdout_error)?;
            }
            started = true;
            stdout.write_all(piece.as_bytes()).map_err(stdout_error)?;
            stdout.flush().map_err(stdout_error)
        };
        let inputs: Vec<ImageInput<'_>> = images.iter().map(|image| ImageInput::File(image)).collect();
        match generator.try_generate(&inputs, args.prompt.as_deref(), &params, &mut stream) {
            Ok(generation) => {
                if args.json {
                    // Names that are not UTF-8 lossily (serde refuses them).
                    let names: Vec<String> = images
                        .iter()
                        .map(|image| image.to_string_lossy().into_owned())
                        .collect();
                    let mut record = serde_json::json!({
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
                    if args.together {
                        record["images"] = names.into();
                    } else {
                        record["image"] = names.concat().into();
                    }
                    writeln!(stdout, "{record}").map_err(stdout_error)?;
                } else {
                    writeln!(stdout).map_err(stdout_error)?;
                }
            }
            // Nothing more can be shown: stop, whatever is left to caption.
            Err(err @ elastic_edge::Error::Output { .. }) => return Err(err.into()),
            Err(err) => {
                if started {
                    writeln!(stdout).map_err(stdout_error)?;
                }
                if !several {
                    return Err(anyhow::Error::new(err).context(label));
                }
                failed += 1;
                eprintln!("elastic-edge: {label}: {}", error_chain(&err));
            }
        }
    }
    anyhow::ensure!(failed == 0, "{failed} of {} images failed", args.images.len());
    Ok(())
}

fn doctor(onnxruntime: Option<&std::path::Path>, args: &DoctorArgs) -> anyhow::Result<()> {
    let dir = args.model.clone().unwrap_or_else(model::default_model_dir);
    // A Hugging Face checkpoint folder, not exported: sized from its config.
    let checkpoint = !dir.join("manifest.json").exists() && dir.join("config.json").is_file();
    // The geometry flags were silently ignored when a model was found (its
    // geometry wins): refused before anything is printed.
    let flags = args.pool.geometry_flags();
    let shape_flags: Vec<&str> = flags.iter().copied().filter(|f| *f != "--dtype").collect();
    if checkpoint && !shape_flags.is_empty() {
        anyhow::bail!(
            "the pool's geometry flags ({}) apply only when no model is found, but {} is a checkpoint whose \
             config.json gives the decoder's geometry: leave {} out (--dtype chooses the pool's element type)",
            shape_flags.join(", "),
            dir.display(),
            if shape_flags.len() == 1 { "it" } else { "them" }
        );
    }
    if let (false, Ok(manifest)) = (flags.is_empty(), model::Manifest::load(&dir)) {
        anyhow::bail!(
            "the pool's geometry flags ({}) apply only when no model is found, but model {} in {} has its own \
             ({} layers, {} KV heads of {}, {}): leave {} out, or point --model at a folder without a model",
            flags.join(", "),
            manifest.name,
            dir.display(),
            manifest.layers,
            manifest.kv_heads,
            manifest.head_dim,
            manifest.kv_shape().dtype.name(),
            if flags.len() == 1 { "it" } else { "them" }
        );
    }
    let library = runtime::load(onnxruntime)?;
    outln!("onnxruntime {}: {}", library.version, library.path.display());
    outln!("  found by: {}", library.found_by);
    outln!("  build: {}", library.build_info);
    let providers = runtime::available_providers()?;
    outln!("  execution providers in this build: {}", providers.join(", "));
    for device in [Device::Cuda, Device::Tensorrt] {
        let options = ProviderOptions {
            device,
            ..ProviderOptions::default()
        };
        match model::providers::check(library.environment(), &options) {
            Ok(()) => outln!("  --device {device}: available"),
            Err(err) => outln!("  --device {device}: unavailable: {}", error_chain(&err)),
        }
    }
    if checkpoint {
        return doctor_checkpoint(&dir, args);
    }

    // The model, if one is found: its manifest and files, and its geometry.
    let mut weights_bytes = 0;
    let mut picture_tokens = None;
    let mut shape = KvShape {
        layers: args.pool.layers.unwrap_or(30),
        kv_heads: args.pool.kv_heads.unwrap_or(3),
        head_dim: args.pool.head_dim.unwrap_or(64),
        dtype: args.pool.dtype.unwrap_or(KvDtype::F16),
        layout: elastic_edge::kv::KvLayout::HeadMajor,
    };
    // Every file hashed, whatever .verified says: a file that rotted in
    // place keeps its size and modification time.
    match model::Manifest::load(&dir).and_then(|m| m.verify_files_fully(&dir).map(|checked| (m, checked))) {
        Ok((manifest, checked)) => {
            weights_bytes = manifest.files_bytes();
            shape = manifest.kv_shape();
            outln!(
                "model {}: {} (files check out: {checked})\n  {} layers, {} KV heads of {}, {}, {} image tokens, {:.0} MB of files",
                manifest.name,
                dir.display(),
                manifest.layers,
                manifest.kv_heads,
                manifest.head_dim,
                manifest.dtype,
                manifest.vision.as_ref().map_or(0, |v| v.image_tokens),
                weights_bytes as f64 / 1e6
            );
            if let (Some(split), Some(vision)) = (manifest.split(), &manifest.vision) {
                match split.splitting {
                    true => outln!(
                        "  image splitting: long side to {}, tiles of {} ({:?}): up to {} frames a picture, {} tokens each",
                        split.longest_edge,
                        split.tile,
                        split.resample,
                        split.max_frames(),
                        vision.image_tokens
                    ),
                    false => outln!(
                        "  no image splitting: long side to {}, then the {}x{} square ({:?}): {} tokens a picture",
                        split.longest_edge,
                        split.tile,
                        split.tile,
                        split.resample,
                        vision.image_tokens
                    ),
                }
            }
            if let Some(spec) = manifest.vision.as_ref().and_then(|v| v.preprocess.dynamic.as_ref()) {
                outln!(
                    "  dynamic resolution: {} to {} pixels a picture, tokens of {}x{} pixels: up to {} tokens a picture",
                    spec.min_pixels,
                    spec.max_pixels,
                    spec.factor(),
                    spec.factor(),
                    spec.max_tokens()
                );
            }
            outln!(
                "  KV per token: {} bytes ({})",
                manifest.kv_shape().kv_bytes_per_slot(),
                manifest.kv_shape().dtype.name(),
            );
            if let Some(vision) = &manifest.vision {
                let (width, height) = args.picture;
                match model::family::exported_picture_cost(vision, width, height) {
                    Ok((tokens, how)) => {
                        picture_tokens = Some(tokens);
                        outln!("  a {width}x{height} picture (--picture): {how}: {tokens} image tokens");
                    }
                    Err(err) => outln!("  a {width}x{height} picture (--picture): {}", error_chain(&err)),
                }
            }
            // Which decoder graph runs, and whether this runtime and each
            // device can run it (the check `caption` makes before loading).
            outln!("  decoder: {}", model::describe_decoder(&manifest));
            for device in [Device::Cpu, Device::Cuda, Device::Tensorrt] {
                match model::check_decoder_support(&dir, &manifest, &library.version, device) {
                    Ok(()) => outln!("    on --device {device} with onnxruntime {}: runs", library.version),
                    Err(err) => outln!("    on --device {device}: does not run: {}", error_chain(&err)),
                }
            }
        }
        Err(err) => outln!("model: {}", error_chain(&err)),
    }

    shape.validate()?;
    let backing = PoolBacking::from_file(args.pool.kv_file.as_deref());
    let per_slot = shape.bytes_per_slot();
    let available = memory_available();
    let memory_line = |available: u64| {
        let largest = largest_budget(available, weights_bytes);
        format!(
            "memory: {} available; after the model files and a 150 MiB margin the largest --kv-budget is {} ({} slots)",
            human_bytes(available),
            human_bytes(largest),
            largest / per_slot
        )
    };
    if !args.pool.kv_over_memory {
        // The same check as caption's, before the pool is mapped (its pages
        // are populated at once).
        if let Err(err) = check_fits_memory(args.pool.kv_budget.pool_bytes(per_slot), weights_bytes) {
            if let Some(available) = available {
                outln!("{}", memory_line(available));
            }
            anyhow::bail!(
                "--kv-budget: {err}; lower it (or, for a pool on disk, pass --kv-file PATH --kv-over-memory)"
            );
        }
    }
    let cache = KvCache::with_budget(
        shape,
        args.pool.kv_budget,
        &backing,
        args.policy,
        &args.knobs,
        args.keep,
    )
    .with_context(|| format!("sizing the KV pool from {}", args.pool.kv_budget))?;
    let pool = cache.pool();
    outln!(
        "kv pool: {} slots, {} bytes ({} per slot)",
        pool.capacity(),
        pool.bytes(),
        per_slot
    );
    outln!(
        "  shape: {} layers x {} kv heads x {} dims, {}",
        shape.layers,
        shape.kv_heads,
        shape.head_dim,
        shape.dtype.name()
    );
    outln!(
        "  policy {} at keep {}: holds a sequence of up to {} processed tokens before the budget binds",
        args.policy,
        cache.keep().get(),
        (pool.capacity() as f64 / cache.keep().get()).floor()
    );
    if let Some(tokens) = picture_tokens.filter(|&t| t > 0) {
        // Pictures alone, without the text around them: an upper bound.
        let keep = cache.keep().get();
        outln!(
            "  pictures of --picture's size it holds: {} at full cache, about {} at --keep {keep} (policy elastic)",
            pool.capacity() / tokens,
            (pool.capacity() as f64 / (tokens as f64 * keep)).floor()
        );
    }
    if let Some(available) = available {
        outln!("{}", memory_line(available));
    }
    Ok(())
}

/// The text tokens and answer tokens of the prompt `doctor` checks a budget
/// against, beside one picture.
const DOCTOR_TEXT_TOKENS: u64 = 50;
const DOCTOR_ANSWER_TOKENS: u64 = 512;

/// `doctor` on a Hugging Face checkpoint folder: its family's decoder
/// geometry, what `--picture` costs, and what `--kv-budget` buys.
fn doctor_checkpoint(dir: &std::path::Path, args: &DoctorArgs) -> anyhow::Result<()> {
    use elastic_edge::model::family::{BudgetFit, FamilySizing, ImageRule, PictureSizing};

    let sizing = FamilySizing::load(dir)?;
    let decoder = sizing.decoder;
    outln!(
        "checkpoint {}: {}, {} (sized from its config files; no weights read)",
        dir.display(),
        sizing.architecture,
        sizing.family.rule()
    );
    let head_dim = if decoder.head_dim_given {
        "head_dim from config.json".to_string()
    } else {
        format!("hidden {} / {} heads", decoder.hidden, decoder.heads)
    };
    outln!(
        "  decoder: {} layers, {} KV heads of {} ({head_dim})",
        decoder.layers,
        decoder.kv_heads,
        decoder.head_dim
    );
    outln!(
        "  KV per token: {} bytes in f16, {} in f32 (2 x {} layers x {} KV heads x {} x 2 or 4 bytes)",
        decoder.kv_bytes_per_token(KvDtype::F16),
        decoder.kv_bytes_per_token(KvDtype::F32),
        decoder.layers,
        decoder.kv_heads,
        decoder.head_dim
    );
    let (width, height) = args.picture;
    let picture = sizing
        .picture(width, height)
        .map_err(|e| anyhow::anyhow!("--picture: {e}"))?;
    let how = match (picture, sizing.image) {
        (PictureSizing::Qwen(grid), ImageRule::Qwen {
            patch_size,
            merge_size,
            min_pixels,
            max_pixels,
        }) => format!(
            "smart_resize to {}x{} (multiples of {}, {min_pixels} to {max_pixels} pixels), {}x{} patches of {patch_size} \
             merged {merge_size}x{merge_size}",
            grid.resized.1,
            grid.resized.0,
            patch_size * merge_size,
            grid.patches.1,
            grid.patches.0
        ),
        (PictureSizing::Idefics3(split), ImageRule::Idefics3(params)) => {
            let resized = match params.longest_edge {
                Some(edge) => format!("resized to {}x{} (long side {edge})", split.resized.1, split.resized.0),
                None => "not resized (do_resize false)".to_string(),
            };
            if split.rows > 0 {
                format!(
                    "{resized}, then {}x{} (multiples of {}): {} x {} tiles of {} + 1 global image = {} images of {} tokens",
                    split.encoder_size.1,
                    split.encoder_size.0,
                    params.tile,
                    split.rows,
                    split.cols,
                    params.tile,
                    split.images,
                    params.image_seq_len
                )
            } else {
                format!(
                    "{resized}: one image of {}x{}, not split, {} tokens",
                    params.tile, params.tile, params.image_seq_len
                )
            }
        }
        (PictureSizing::Llava { side, .. }, ImageRule::Llava {
            patch_size, keep_cls, ..
        }) => format!(
            "short side to {side} and centre-cropped to {side}x{side}: ({side} / {patch_size})^2 patches{}",
            if keep_cls { " + the CLS token (strategy full)" } else { "" }
        ),
        // FamilySizing::picture answers each rule with its own variant.
        _ => unreachable!("FamilySizing::picture follows its own rule"),
    };
    outln!("  picture {width}x{height}: {how}: {} image tokens", picture.tokens());

    let shape = decoder.shape(args.pool.dtype.unwrap_or(KvDtype::F16));
    shape.validate()?;
    let per_slot = shape.bytes_per_slot();
    let budget = args.pool.kv_budget;
    let slots = budget.pool_bytes(per_slot) / per_slot;
    let keep = args.keep.get();
    let fit = BudgetFit::new(slots, picture.tokens(), keep, DOCTOR_TEXT_TOKENS, DOCTOR_ANSWER_TOKENS);
    outln!(
        "  --kv-budget {} ({}): {slots} slots of {per_slot} bytes ({} K and V plus the pool's metadata)",
        budget,
        human_bytes(budget.bytes(per_slot)),
        shape.dtype.name()
    );
    let compresses = keep < 1.0 && args.policy != PolicyKind::Full;
    let verdict = |fits: bool| if fits { "fits" } else { "does not fit" };
    if compresses {
        outln!(
            "  pictures it holds: {} at full cache, about {} at --keep {keep} (policy {})",
            fit.pictures,
            fit.pictures_at_keep,
            args.policy
        );
        outln!(
            "  one picture + {DOCTOR_TEXT_TOKENS} text + {DOCTOR_ANSWER_TOKENS} answer tokens: {} slots at full cache: {}; \
             about {} at --keep {keep}: {}",
            fit.prompt_slots,
            verdict(fit.fits()),
            fit.prompt_slots_at_keep,
            verdict(fit.fits_at_keep())
        );
    } else {
        outln!("  pictures it holds: {} at full cache", fit.pictures);
        outln!(
            "  one picture + {DOCTOR_TEXT_TOKENS} text + {DOCTOR_ANSWER_TOKENS} answer tokens: {} slots at full cache: {}",
            fit.prompt_slots,
            verdict(fit.fits())
        );
    }
    if let Some(available) = memory_available() {
        let largest = largest_budget(available, 0);
        outln!(
            "memory: {} available; with a 150 MiB margin, before the weights, the largest --kv-budget is {} ({} slots)",
            human_bytes(available),
            human_bytes(largest),
            largest / per_slot
        );
    }
    Ok(())
}
