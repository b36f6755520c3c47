//! One error type for the library. Every variant says what failed and carries
//! the values a user needs to fix it; the binary prints it as one line.

use std::path::PathBuf;

/// Everything the library can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A `--kv-budget` string that is not a size or a token count.
    #[error("invalid KV budget {input:?}: {reason} (examples: 64MiB, 512KiB, 1GB, 4096tokens)")]
    BudgetSyntax { input: String, reason: String },

    /// The byte budget does not hold the slots the cache needs.
    #[error(
        "KV budget too small: {budget_bytes} bytes hold {slots} slot(s) of {bytes_per_slot} bytes, \
         but at least {min_slots} are needed ({why}); raise --kv-budget to at least {min_bytes} bytes"
    )]
    BudgetTooSmall {
        budget_bytes: u64,
        bytes_per_slot: u64,
        slots: usize,
        min_slots: usize,
        min_bytes: u64,
        why: &'static str,
    },

    /// A pool larger than the memory available (`MemAvailable`) once the
    /// model's files and a margin are set aside.
    #[error(
        "a KV pool of {budget_bytes} bytes does not fit in memory: {available_text} available, and after \
         the model's files ({model_bytes} bytes) and a 150 MiB margin the largest budget that fits is \
         {largest} bytes ({largest_text})"
    )]
    BudgetOverMemory {
        budget_bytes: u64,
        available: u64,
        model_bytes: u64,
        largest: u64,
        largest_text: String,
        available_text: String,
    },

    /// A request whose settings cannot be served (a memory question's
    /// token limit of 0, or more tokens than the pool holds).
    #[error("invalid request: {0}")]
    Request(String),

    /// An answer length that cannot be generated (none, past the limit, or
    /// more than the model's positions hold).
    #[error("max_new_tokens {max_new_tokens}: {reason}")]
    NewTokens { max_new_tokens: usize, reason: String },

    /// A sampling setting that cannot be used (a NaN or negative
    /// temperature, a top-p outside (0, 1], a repetition penalty of 0).
    #[error("{what} {value}: {reason}")]
    Sampling {
        what: &'static str,
        value: f32,
        reason: &'static str,
    },

    /// Stop strings that cannot be used (an empty one, too many).
    #[error("stop strings: {0}")]
    StopStrings(String),

    /// A question to a memory that holds no frame yet.
    #[error("the memory holds no frame yet: ask after the first frame")]
    MemoryEmpty,

    /// A keep ratio outside (0, 1].
    #[error("keep ratio {0} is outside (0, 1]: it is the fraction of processed tokens the cache keeps")]
    KeepRatio(f64),

    /// A pool or step shape with a zero or inconsistent dimension.
    #[error("invalid shape: {0}")]
    Shape(String),

    /// The pool is full and the policy may not remove anything (the `full` policy).
    #[error(
        "the KV pool is full: {needed} entries needed, {capacity} fit in the budget; \
         the smallest budget that holds them is --kv-budget {needed}tokens, or use a compressing policy \
         (elastic, h2o, local)"
    )]
    CapacityExceeded { needed: usize, capacity: usize },

    /// A file-backed pool whose file cannot be created, sized or mapped.
    #[error("cannot map KV pool file {path}: {source}")]
    PoolFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// An anonymous mapping the kernel refused (usually: not enough memory).
    #[error("cannot allocate the {bytes}-byte KV pool: {source}")]
    PoolAlloc {
        bytes: u64,
        #[source]
        source: std::io::Error,
    },

    /// A compaction plan that breaks the pool's invariants (a bug in a policy).
    #[error("invalid cache plan: {0}")]
    Plan(String),

    /// A view asked for in a dtype other than the pool's.
    #[error("the KV pool holds {pool} but {asked} was requested")]
    DtypeMismatch { pool: &'static str, asked: &'static str },

    /// An unknown policy name or bad policy option.
    #[error("invalid cache policy {0}")]
    Policy(String),

    /// ONNX Runtime's shared library could not be loaded.
    #[error("cannot load ONNX Runtime from {path} (given by {found_by}): {reason}. {hint}")]
    RuntimeLoad {
        path: PathBuf,
        found_by: &'static str,
        reason: String,
        hint: &'static str,
    },

    /// No ONNX Runtime library was found where we look.
    #[error("ONNX Runtime library not found; looked in: {tried}. Run scripts/setup.sh, or set ORT_DYLIB_PATH to libonnxruntime.so")]
    RuntimeMissing { tried: String },

    /// No usable model where one was expected.
    #[error("no model in {dir}: {reason}. Build the demo model with scripts/build-demo-model.sh, or pass --model DIR")]
    ModelMissing { dir: PathBuf, reason: String },

    /// A manifest field that is missing, malformed, or breaks the graph contract.
    #[error("{path}: field {field}: {reason}")]
    Manifest {
        path: PathBuf,
        field: String,
        reason: String,
    },

    /// A model file that is missing, truncated or altered.
    #[error("model file {path}: {reason}")]
    ModelFile { path: PathBuf, reason: String },

    /// A picture that cannot be read, decoded or is too large.
    #[error(transparent)]
    Image(#[from] crate::model::image::ImageError),

    /// A prompt, tokenizer or chat template problem.
    #[error(transparent)]
    Prompt(#[from] crate::model::prompt::PromptError),

    /// A dataset file or line that cannot be used.
    #[error("{path}: line {line}: {reason}")]
    Dataset { path: PathBuf, line: usize, reason: String },

    /// A dataset file that cannot be used as a whole (not a regular file,
    /// too large, no usable line).
    #[error("{path}: {reason}")]
    DatasetFile { path: PathBuf, reason: String },

    /// One sample of a sweep that failed, with its line in the dataset.
    #[error("sample {id} (line {line}): {reason}")]
    Sample { id: String, line: usize, reason: String },

    /// A service configuration (`serve --config`) that cannot be used: a
    /// syntax error, an unknown key, a value of the wrong type or out of
    /// range. `key` is the dotted path (`cache.keep`).
    #[error("{path}: {key}: {reason}")]
    Config { path: PathBuf, key: String, reason: String },

    /// The service's own I/O: binding the HTTP address, the notify socket.
    /// (Writing captions is [`Error::Output`].)
    #[error("{what}: {source}")]
    ServiceIo {
        what: String,
        #[source]
        source: std::io::Error,
    },

    /// Any other ONNX Runtime failure, with what we were doing.
    #[error("ONNX Runtime: {context}: {reason}")]
    Runtime { context: String, reason: String },

    /// A frame source that cannot work as given: a spec that does not parse,
    /// a pipeline string GStreamer rejects, an empty folder. Fatal: the
    /// configuration must change.
    #[error("source {spec}: {reason}")]
    SourceConfig { spec: String, reason: String },

    /// One frame that cannot be decoded. The source goes on: the frame is
    /// skipped and counted.
    #[error("source {spec}: corrupt frame {frame}: {reason}")]
    FrameCorrupt {
        spec: String,
        frame: String,
        reason: String,
    },

    /// The source stopped delivering (a camera unplugged, a stream closed
    /// mid-frame, a pipeline error). It may come back: reconnect.
    #[error("source {spec} lost: {reason}")]
    SourceLost { spec: String, reason: String },

    /// An interval (`--every`) that is not a number with a unit.
    #[error("invalid interval {input:?}: {reason} (examples: 2s, 500ms, 1.5m, 0)")]
    Interval { input: String, reason: String },

    /// A thread the library needs could not be started.
    #[error("cannot start the {what} thread: {source}")]
    Thread {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },

    /// Writing results (a caption record to `--output`, say) failed.
    #[error("writing {target}: {source}")]
    Output {
        target: String,
        #[source]
        source: std::io::Error,
    },
}

/// How a frame source's error is handled (see [`Error::source_failure`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SourceFailure {
    /// Skip the frame, count it, read the next one.
    CorruptFrame,
    /// Reconnect with backoff.
    Lost,
    /// Stop: retrying cannot help.
    Fatal,
}

impl Error {
    /// What a frame source's error means for the stream: skip, reconnect or
    /// stop. Errors that are not a source's own are fatal.
    pub fn source_failure(&self) -> SourceFailure {
        match self {
            Error::FrameCorrupt { .. } => SourceFailure::CorruptFrame,
            Error::SourceLost { .. } => SourceFailure::Lost,
            _ => SourceFailure::Fatal,
        }
    }
}

/// The library's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// `text` on one line, its runs of whitespace (line breaks included) as one
/// space: parsers quote what they read (serde names an unknown field as
/// sent, and a JSON key may hold a `\n`), and an error is one line of a log.
pub fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Formats an error with its whole `source()` chain: `ort` hides the real
/// dlopen reason (a missing `libcublas.so.13`, say) behind a generic message.
pub fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}
