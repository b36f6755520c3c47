//! `serve --config FILE`: the service's TOML configuration.
//!
//! Every table and key is known (`deny_unknown_fields`); a bad file is one
//! [`Error::Config`] naming the dotted key (`cache.keep`) and the reason,
//! so a unit that will not start says why in one journal line. Values that
//! need the model (whether the budget holds the policy's entries) are
//! checked when the service builds its cache, under the same key.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::error::{one_line, Error, Result};
use crate::generate::{prefill_chunk_setting, DEFAULT_PREFILL_CHUNK};
use crate::kv::{KeepRatio, KvBudget, PolicyConfig, PolicyKind};
use crate::model::Device;
use crate::source::SourceSpec;
use crate::stream::parse_interval;

use super::http::Limits;

pub use crate::generate::MAX_NEW_TOKENS_LIMIT;

/// The largest `http.max_body`: a body is held whole in memory (a chat
/// request's pictures are decoded from it), and an edge board has little.
pub const MAX_BODY_LIMIT: u64 = 64 << 20;

/// `http.max_connections` when not set, and the most it may be: each open
/// connection holds a file descriptor (systemd's default soft limit is
/// 1024), and each request in progress a thread.
pub const DEFAULT_MAX_CONNECTIONS: usize = 512;
pub const MAX_CONNECTIONS_LIMIT: usize = 4096;
/// `http.header_timeout` and `http.idle_timeout` when not set.
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// The largest config file read (the commented example is 4 KB).
const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// The service's settings, checked.
#[derive(Clone, Debug)]
pub struct ServeConfig {
    /// The file these came from (for messages).
    pub path: PathBuf,
    pub model: ModelConfig,
    pub cache: CacheConfig,
    pub caption: CaptionConfig,
    pub stream: StreamSettings,
    pub memory: MemorySettings,
    pub http: HttpConfig,
}

#[derive(Clone, Debug)]
pub struct ModelConfig {
    /// The model folder (relative paths are relative to the config file).
    pub dir: PathBuf,
    pub device: Device,
    pub device_id: i32,
    pub threads: Option<usize>,
    pub onnxruntime: Option<PathBuf>,
    pub tensorrt_cache: Option<PathBuf>,
    pub tensorrt_fp16: bool,
}

#[derive(Clone, Debug)]
pub struct CacheConfig {
    pub kv_budget: KvBudget,
    pub policy: PolicyKind,
    pub keep: KeepRatio,
    pub kv_file: Option<PathBuf>,
    /// A file-backed pool may be larger than the memory available
    /// (`kv_over_memory = true`, only with `kv_file`).
    pub kv_over_memory: bool,
    /// Most prompt tokens per decoder run (`None`: the whole prompt).
    pub prefill_chunk: Option<usize>,
    /// The policy's knobs: the same keys as the command line's flags
    /// (`distance = 0.05`, `protect_instruction = true`, ...).
    pub knobs: PolicyConfig,
}

#[derive(Clone, Debug)]
pub struct CaptionConfig {
    /// The question asked of every frame, and of a POST without `?prompt=`
    /// (default: the model's captioning prompt).
    pub prompt: Option<String>,
    pub max_new_tokens: usize,
}

#[derive(Clone, Debug)]
pub struct StreamSettings {
    /// The camera: a source spec (see [`SourceSpec`]); none means the
    /// service only captions what is POSTed.
    pub source: Option<SourceSpec>,
    /// File sources: start again after the last file.
    pub looping: bool,
    /// One caption of the latest frame this often (0: back to back).
    pub interval: Duration,
    /// Append each stream caption to this JSON Lines file.
    pub jsonl: Option<PathBuf>,
}

/// `[memory]`: the camera's frames in one continuing context, questioned
/// with `POST /memory/ask`.
#[derive(Clone, Debug, Default)]
pub struct MemorySettings {
    pub enabled: bool,
    /// Also caption each frame into the memory.
    pub captions: bool,
}

#[derive(Clone, Debug)]
pub struct HttpConfig {
    pub listen: SocketAddr,
    /// The largest request body, in bytes (at most [`MAX_BODY_LIMIT`]).
    pub max_body: u64,
    /// `api_key` (or the variable `api_key_env` names): when set, every
    /// route but `/healthz` wants `Authorization: Bearer KEY`.
    pub api_key: Option<ApiKey>,
    /// `max_connections`, `header_timeout`, `idle_timeout`.
    pub limits: Limits,
}

/// A secret: its `Debug` does not show it, so a logged config cannot leak
/// it; [`ApiKey::matches`] compares in constant time.
#[derive(Clone)]
pub struct ApiKey(String);

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiKey(redacted)")
    }
}

impl ApiKey {
    /// Whether `given` is the key. Both are hashed first, and the digests
    /// compared without an early exit, so the time taken says nothing of
    /// where a guess first differs, nor of the key's length.
    pub fn matches(&self, given: &str) -> bool {
        use sha2::{Digest, Sha256};
        let (want, got) = (Sha256::digest(self.0.as_bytes()), Sha256::digest(given.as_bytes()));
        want.iter().zip(got.iter()).fold(0u8, |diff, (a, b)| diff | (a ^ b)) == 0
    }
}

// The file as written: every key optional except the model folder, unknown
// keys refused. Strings that carry units are parsed after deserializing so
// the error can name the key.

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    model: RawModel,
    #[serde(default)]
    cache: RawCache,
    #[serde(default)]
    caption: RawCaption,
    #[serde(default)]
    stream: RawStream,
    #[serde(default)]
    memory: RawMemory,
    #[serde(default)]
    http: RawHttp,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawModel {
    dir: PathBuf,
    #[serde(default)]
    device: Device,
    #[serde(default)]
    device_id: i32,
    threads: Option<usize>,
    onnxruntime: Option<PathBuf>,
    tensorrt_cache: Option<PathBuf>,
    #[serde(default)]
    tensorrt_fp16: bool,
}

// The policy's knobs share the table: every other key is collected here
// and read as a `PolicyConfig` afterwards, which names a bad or unknown
// key (serde cannot deny unknown keys through a flatten).
#[derive(Deserialize, Default)]
struct RawCache {
    kv_budget: Option<String>,
    policy: Option<PolicyKind>,
    keep: Option<f64>,
    kv_file: Option<PathBuf>,
    #[serde(default)]
    kv_over_memory: bool,
    prefill_chunk: Option<usize>,
    #[serde(flatten)]
    knobs: toml::Table,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawCaption {
    prompt: Option<String>,
    max_new_tokens: Option<usize>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawStream {
    source: Option<String>,
    #[serde(rename = "loop", default)]
    looping: bool,
    interval: Option<String>,
    jsonl: Option<PathBuf>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawMemory {
    #[serde(default)]
    enabled: bool,
    #[serde(default)]
    captions: bool,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawHttp {
    listen: Option<String>,
    max_body: Option<String>,
    api_key: Option<String>,
    api_key_env: Option<String>,
    max_connections: Option<usize>,
    header_timeout: Option<String>,
    idle_timeout: Option<String>,
}

/// `[http]`'s connection limits, checked; the error names its key.
fn http_limits(raw: &RawHttp) -> std::result::Result<Limits, (&'static str, String)> {
    let max_connections = raw.max_connections.unwrap_or(DEFAULT_MAX_CONNECTIONS);
    if !(1..=MAX_CONNECTIONS_LIMIT).contains(&max_connections) {
        return Err((
            "http.max_connections",
            format!("{max_connections} is outside 1..={MAX_CONNECTIONS_LIMIT}"),
        ));
    }
    let timeout = |key: &'static str, text: &Option<String>, default: Duration, range: (Duration, Duration)| {
        let value = match text {
            Some(text) => parse_interval(text).map_err(|e| (key, e.to_string()))?,
            None => default,
        };
        if value < range.0 || value > range.1 {
            return Err((key, format!("{value:?} is outside {:?}..={:?}", range.0, range.1)));
        }
        Ok(value)
    };
    Ok(Limits {
        max_connections,
        header_timeout: timeout(
            "http.header_timeout",
            &raw.header_timeout,
            DEFAULT_HEADER_TIMEOUT,
            (Duration::from_millis(100), Duration::from_secs(600)),
        )?,
        idle_timeout: timeout(
            "http.idle_timeout",
            &raw.idle_timeout,
            DEFAULT_IDLE_TIMEOUT,
            (Duration::from_millis(100), Duration::from_secs(3600)),
        )?,
    })
}

impl ServeConfig {
    /// Reads and checks a config file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = crate::regular_file::read_to_string(path, MAX_CONFIG_BYTES).map_err(|e| Error::Config {
            path: path.to_path_buf(),
            key: "(file)".into(),
            reason: format!("cannot read it: {e}"),
        })?;
        Self::parse(&text, path)
    }

    /// Checks a config's text; `path` names it in errors and anchors its
    /// relative paths.
    pub fn parse(text: &str, path: &Path) -> Result<Self> {
        let bad = |key: &str, reason: String| Error::Config {
            path: path.to_path_buf(),
            key: key.to_string(),
            reason,
        };
        let raw: RawConfig = deserialize(text, path)?;
        let base = path.parent().unwrap_or(Path::new("."));
        let anchor = |p: PathBuf| if p.is_relative() { base.join(p) } else { p };

        if raw.model.dir.as_os_str().is_empty() {
            return Err(bad("model.dir", "is empty".into()));
        }
        if let Some(threads) = raw.model.threads {
            crate::model::check_threads(threads).map_err(|reason| bad("model.threads", reason))?;
        }
        let model = ModelConfig {
            dir: anchor(raw.model.dir),
            device: raw.model.device,
            device_id: raw.model.device_id,
            threads: raw.model.threads,
            onnxruntime: raw.model.onnxruntime.map(anchor),
            tensorrt_cache: raw.model.tensorrt_cache.map(anchor),
            tensorrt_fp16: raw.model.tensorrt_fp16,
        };

        let kv_budget = match raw.cache.kv_budget {
            Some(text) => text.parse().map_err(|e: Error| bad("cache.kv_budget", e.to_string()))?,
            None => KvBudget::Bytes(32 << 20),
        };
        let keep = match raw.cache.keep {
            Some(keep) => KeepRatio::new(keep).map_err(|e| bad("cache.keep", e.to_string()))?,
            None => KeepRatio::FULL,
        };
        let knobs: PolicyConfig =
            serde_path_to_error::deserialize(toml::Value::Table(raw.cache.knobs)).map_err(|e| {
                let key = format!("cache.{}", e.path());
                bad(&key, one_line(&e.into_inner().to_string()))
            })?;
        let cache = CacheConfig {
            knobs,
            kv_budget,
            policy: raw.cache.policy.unwrap_or(PolicyKind::Elastic),
            keep,
            kv_file: raw.cache.kv_file.map(anchor),
            kv_over_memory: raw.cache.kv_over_memory,
            prefill_chunk: prefill_chunk_setting(raw.cache.prefill_chunk.unwrap_or(DEFAULT_PREFILL_CHUNK)),
        };

        if cache.kv_over_memory && cache.kv_file.is_none() {
            return Err(bad(
                "cache.kv_over_memory",
                "only a file-backed pool (cache.kv_file) may be larger than the memory available".into(),
            ));
        }

        if let Some(prompt) = &raw.caption.prompt {
            if prompt.trim().is_empty() {
                return Err(bad(
                    "caption.prompt",
                    "is empty (leave it out for the model's captioning prompt)".into(),
                ));
            }
        }
        let max_new_tokens = raw.caption.max_new_tokens.unwrap_or(64);
        if max_new_tokens == 0 || max_new_tokens > MAX_NEW_TOKENS_LIMIT {
            return Err(bad(
                "caption.max_new_tokens",
                format!("{max_new_tokens} is outside 1..={MAX_NEW_TOKENS_LIMIT}"),
            ));
        }
        let caption = CaptionConfig {
            prompt: raw.caption.prompt,
            max_new_tokens,
        };

        let source = match &raw.stream.source {
            Some(text) if text.trim().is_empty() => {
                return Err(bad(
                    "stream.source",
                    "is empty (leave it out to caption only POSTed images)".into(),
                ))
            }
            Some(text) => Some(anchor_spec(text, base).map_err(|e| bad("stream.source", e.to_string()))?),
            None => None,
        };
        let interval = match &raw.stream.interval {
            Some(text) => parse_interval(text).map_err(|e| bad("stream.interval", e.to_string()))?,
            None => Duration::from_secs(2),
        };
        let stream = StreamSettings {
            source,
            looping: raw.stream.looping,
            interval,
            jsonl: raw.stream.jsonl.map(anchor),
        };

        if raw.memory.enabled && stream.source.is_none() {
            return Err(bad(
                "memory.enabled",
                "needs a camera to remember: set stream.source".into(),
            ));
        }
        if raw.memory.enabled && cache.policy == PolicyKind::Full {
            return Err(bad(
                "memory.enabled",
                "needs a cache policy that compresses (cache.policy is \"full\", which would fill the pool and stop)"
                    .into(),
            ));
        }
        if raw.memory.captions && !raw.memory.enabled {
            return Err(bad("memory.captions", "needs memory.enabled = true".into()));
        }
        let memory = MemorySettings {
            enabled: raw.memory.enabled,
            captions: raw.memory.captions,
        };

        let listen = match &raw.http.listen {
            Some(text) => text.parse().map_err(|_| {
                bad(
                    "http.listen",
                    format!("{text:?} is not an address and port (like 127.0.0.1:8080 or [::1]:8080)"),
                )
            })?,
            None => SocketAddr::from(([127, 0, 0, 1], 8080)),
        };
        let max_body = match &raw.http.max_body {
            Some(text) => parse_bytes(text).map_err(|reason| bad("http.max_body", reason))?,
            None => 8 << 20,
        };
        if max_body > MAX_BODY_LIMIT {
            return Err(bad(
                "http.max_body",
                format!(
                    "{:?} is over the cap of {} MiB (a request's body is held in memory while it is read)",
                    raw.http.max_body.as_deref().unwrap_or_default(),
                    MAX_BODY_LIMIT >> 20
                ),
            ));
        }
        let limits = http_limits(&raw.http).map_err(|(key, reason)| bad(key, reason))?;
        let api_key = match (raw.http.api_key, &raw.http.api_key_env) {
            (Some(_), Some(_)) => {
                return Err(bad(
                    "http.api_key_env",
                    "give the key (http.api_key) or the variable that holds it (http.api_key_env), not both".into(),
                ))
            }
            (Some(key), None) => Some(("http.api_key", key)),
            (None, Some(name)) => match std::env::var(name) {
                Ok(key) => Some(("http.api_key_env", key)),
                Err(std::env::VarError::NotPresent) => {
                    return Err(bad(
                        "http.api_key_env",
                        format!("the environment variable {name:?} is not set"),
                    ))
                }
                Err(std::env::VarError::NotUnicode(_)) => {
                    return Err(bad(
                        "http.api_key_env",
                        format!("the environment variable {name:?} is not UTF-8"),
                    ))
                }
            },
            (None, None) => None,
        };
        let api_key = match api_key {
            // The reasons never include the key.
            Some((key, text)) if text.trim().is_empty() => return Err(bad(key, "the key is empty".into())),
            Some((key, text)) if text.trim() != text || !text.bytes().all(|b| b.is_ascii_graphic()) => {
                return Err(bad(
                    key,
                    "the key must be printable ASCII without spaces (it travels in a header)".into(),
                ))
            }
            Some((_, text)) => Some(ApiKey(text)),
            None => None,
        };
        Ok(ServeConfig {
            path: path.to_path_buf(),
            model,
            cache,
            caption,
            stream,
            memory,
            http: HttpConfig {
                listen,
                max_body,
                api_key,
                limits,
            },
        })
    }

    /// An error about this file's `key`.
    pub fn error(&self, key: &str, reason: impl Into<String>) -> Error {
        Error::Config {
            path: self.path.clone(),
            key: key.to_string(),
            reason: reason.into(),
        }
    }
}

/// TOML into the raw tables, with the dotted path of whatever fails and its
/// line, on one line.
fn deserialize(text: &str, path: &Path) -> Result<RawConfig> {
    let line_of =
        |span: Option<std::ops::Range<usize>>| span.map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1);
    let syntax = |e: toml::de::Error| Error::Config {
        path: path.to_path_buf(),
        key: match line_of(e.span()) {
            Some(line) => format!("line {line}"),
            None => "(syntax)".into(),
        },
        reason: one_line(e.message()),
    };
    let deserializer = toml::Deserializer::parse(text).map_err(syntax)?;
    serde_path_to_error::deserialize(deserializer).map_err(|e| {
        let key = e.path().to_string();
        let inner = e.into_inner();
        let line = line_of(inner.span())
            .map(|l| format!(" (line {l})"))
            .unwrap_or_default();
        Error::Config {
            path: path.to_path_buf(),
            // The root ('.') only for a table missing altogether.
            key: if key == "." { "(top level)".into() } else { key },
            reason: format!("{}{line}", one_line(inner.message())),
        }
    })
}

/// Parses a source spec with its relative paths taken from `base` (the
/// config's folder), not from the service's working directory.
fn anchor_spec(text: &str, base: &Path) -> Result<SourceSpec> {
    let spec: SourceSpec = text.parse()?;
    let relative = |p: &Path| p.is_relative();
    Ok(match spec {
        // A bare relative path: parse again from the config's folder, where
        // it may turn out to be a folder.
        SourceSpec::File(path) if relative(&path) && !text.starts_with("file:") => {
            base.join(text).to_string_lossy().parse()?
        }
        SourceSpec::File(path) if relative(&path) => SourceSpec::File(base.join(path)),
        SourceSpec::Dir(path) if relative(&path) => SourceSpec::Dir(base.join(path)),
        SourceSpec::Glob(pattern) if relative(Path::new(&pattern)) => {
            SourceSpec::Glob(base.join(pattern).to_string_lossy().into_owned())
        }
        other => other,
    })
}

/// `8MiB`, `512KiB`, `1000000`: a positive byte count.
pub fn parse_bytes(text: &str) -> std::result::Result<u64, String> {
    crate::kv::parse_bytes(text).map_err(|reason| format!("{text:?}: {reason} (like 8MiB, 512KiB)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<ServeConfig> {
        ServeConfig::parse(text, Path::new("/etc/elastic-edge/serve.toml"))
    }

    fn key_of(text: &str) -> (String, String) {
        match parse(text) {
            Err(Error::Config { key, reason, .. }) => (key, reason),
            other => panic!("expected a config error for {text:?}, got {other:?}"),
        }
    }

    #[test]
    fn defaults_fill_everything_but_the_model() {
        let config = parse("[model]\ndir = \"models/tiny\"\n").unwrap();
        assert_eq!(config.model.dir, Path::new("/etc/elastic-edge/models/tiny"));
        assert_eq!(config.http.listen, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(config.http.max_body, 8 << 20);
        assert_eq!(config.http.limits.max_connections, DEFAULT_MAX_CONNECTIONS);
        assert_eq!(config.http.limits.header_timeout, DEFAULT_HEADER_TIMEOUT);
        assert_eq!(config.http.limits.idle_timeout, DEFAULT_IDLE_TIMEOUT);
        assert_eq!(config.cache.policy, PolicyKind::Elastic);
        assert_eq!(config.cache.keep, KeepRatio::FULL);
        assert_eq!(config.stream.interval, Duration::from_secs(2));
        assert!(config.stream.source.is_none() && config.stream.jsonl.is_none());
        assert_eq!(config.caption.max_new_tokens, 64);
        assert_eq!(config.cache.prefill_chunk, Some(DEFAULT_PREFILL_CHUNK));
        assert!(!config.memory.enabled && !config.memory.captions);
        let memory =
            parse("[model]\ndir = \"m\"\n[stream]\nsource = \"x.png\"\n[memory]\nenabled = true\ncaptions = true\n")
                .unwrap();
        assert!(memory.memory.enabled && memory.memory.captions);
    }

    #[test]
    fn the_api_key_comes_from_the_file_or_a_variable_and_is_never_shown() {
        let config = parse("[model]\ndir = \"m\"\n[http]\napi_key = \"s3cret-key\"\n").unwrap();
        let key = config.http.api_key.as_ref().unwrap();
        assert!(key.matches("s3cret-key"));
        assert!(!key.matches("s3cret-kex") && !key.matches("s3cret") && !key.matches(""));
        assert!(!format!("{config:?}").contains("s3cret"), "Debug shows no key");
        assert!(parse("[model]\ndir = \"m\"\n").unwrap().http.api_key.is_none());
        // A variable only this test sets.
        let name = "ELASTIC_EDGE_TEST_API_KEY_7F3A";
        std::env::set_var(name, "from-env");
        let config = parse(&format!("[model]\ndir = \"m\"\n[http]\napi_key_env = \"{name}\"\n")).unwrap();
        assert!(config.http.api_key.unwrap().matches("from-env"));
        for (text, key) in [
            (format!("api_key_env = \"{name}_UNSET\""), "http.api_key_env"),
            (format!("api_key = \"a\"\napi_key_env = \"{name}\""), "http.api_key_env"),
            ("api_key = \"\"".to_string(), "http.api_key"),
            ("api_key = \"has space\"".to_string(), "http.api_key"),
        ] {
            let err = parse(&format!("[model]\ndir = \"m\"\n[http]\n{text}\n")).unwrap_err();
            match err {
                Error::Config { key: got, reason, .. } => {
                    assert_eq!(got, key, "{text}: {reason}");
                    assert!(!reason.contains("has space"), "{reason}");
                }
                other => panic!("{other}"),
            }
        }
    }

    #[test]
    fn a_prefill_chunk_of_zero_is_the_whole_prompt() {
        let knobs =
            parse("[model]\ndir = \"m\"\n[cache]\ndistance = 0.05\nprotect_instruction = true\nrecent = 0.25\n")
                .unwrap();
        assert_eq!(
            knobs.cache.knobs.distance,
            Some(crate::kv::policy::Distance::Fraction(0.05))
        );
        assert_eq!(knobs.cache.knobs.protect_instruction, Some(true));
        assert_eq!(knobs.cache.knobs.recent_fraction, 0.25);
        let counted = parse("[model]\ndir = \"m\"\n[cache]\ndistance = 8\nmerge_window = \"off\"\n").unwrap();
        assert_eq!(
            counted.cache.knobs.distance,
            Some(crate::kv::policy::Distance::Entries(8))
        );
        let (key, _) = key_of("[model]\ndir = \"m\"\n[cache]\ndistanse = 8\n");
        assert_eq!(key, "cache.distanse");
        for (bad, knob) in [
            ("distance = 1.5", "distance"),
            ("distance = -3", "distance"),
            ("recent = 1.0", "recent"),
            ("merge_kind = 3", "merge_kind"),
            ("decode_eviction = \"lru\"", "decode_eviction"),
            ("merge_window = \"far\"", "merge_window"),
        ] {
            let (key, _) = key_of(&format!("[model]\ndir = \"m\"\n[cache]\n{bad}\n"));
            assert_eq!(key, format!("cache.{knob}"), "{bad}");
        }
        let whole = parse("[model]\ndir = \"m\"\n[cache]\nprefill_chunk = 0\n").unwrap();
        assert_eq!(whole.cache.prefill_chunk, None);
        let runs = parse("[model]\ndir = \"m\"\n[cache]\nprefill_chunk = 32\n").unwrap();
        assert_eq!(runs.cache.prefill_chunk, Some(32));
        let (key, _) = key_of("[model]\ndir = \"m\"\n[cache]\nprefill_chunk = -1\n");
        assert_eq!(key, "cache.prefill_chunk");
    }

    #[test]
    fn the_shipped_example_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/elastic-edge.toml");
        let config = ServeConfig::load(&path).unwrap();
        assert_eq!(config.http.listen, "127.0.0.1:8080".parse().unwrap());
        assert!(config.stream.source.is_some());
    }

    #[test]
    fn unknown_keys_are_named_with_their_table() {
        let (key, reason) = key_of("[model]\ndir = \"m\"\n[cache]\nkepp = 0.5\n");
        assert_eq!(key, "cache.kepp");
        assert!(reason.contains("unknown field"), "{reason}");
        let (key, _) = key_of("[model]\ndir = \"m\"\n[camera]\nsource = \"x\"\n");
        assert_eq!(key, "camera");
    }

    #[test]
    fn wrong_types_and_bad_values_name_the_key() {
        let cases = [
            (
                "[model]\ndir = \"m\"\n[cache]\nkeep = 1.5\n",
                "cache.keep",
                "outside (0, 1]",
            ),
            (
                "[model]\ndir = \"m\"\n[cache]\nkeep = 0\n",
                "cache.keep",
                "outside (0, 1]",
            ),
            (
                "[model]\ndir = \"m\"\n[cache]\nkeep = \"half\"\n",
                "cache.keep",
                "invalid type",
            ),
            (
                "[model]\ndir = \"m\"\n[cache]\nkv_budget = \"lots\"\n",
                "cache.kv_budget",
                "invalid KV budget",
            ),
            (
                "[model]\ndir = \"m\"\n[cache]\npolicy = \"lru\"\n",
                "cache.policy",
                "unknown variant",
            ),
            ("[model]\ndir = \"m\"\nthreads = 0\n", "model.threads", "at least 1"),
            (
                "[model]\ndir = \"m\"\nthreads = 100000\n",
                "model.threads",
                "more than the",
            ),
            ("[model]\ndir = \"m\"\nthreads = -2\n", "model.threads", "invalid value"),
            (
                "[model]\ndir = \"m\"\ndevice = \"tpu\"\n",
                "model.device",
                "unknown variant",
            ),
            (
                "[model]\ndir = \"m\"\n[http]\nlisten = \"localhost\"\n",
                "http.listen",
                "not an address",
            ),
            (
                "[model]\ndir = \"m\"\n[http]\nmax_body = \"10tokens\"\n",
                "http.max_body",
                "a token count is not a size",
            ),
            (
                "[model]\ndir = \"m\"\n[stream]\ninterval = \"2 days\"\n",
                "stream.interval",
                "unknown unit",
            ),
            (
                "[model]\ndir = \"m\"\n[http]\nmax_body = \"100GB\"\n",
                "http.max_body",
                "over the cap of 64 MiB",
            ),
            (
                "[model]\ndir = \"m\"\n[http]\nmax_connections = 0\n",
                "http.max_connections",
                "outside 1..=4096",
            ),
            (
                "[model]\ndir = \"m\"\n[http]\nheader_timeout = \"0s\"\n",
                "http.header_timeout",
                "outside",
            ),
            (
                "[model]\ndir = \"m\"\n[http]\nidle_timeout = \"2 weeks\"\n",
                "http.idle_timeout",
                "unknown unit",
            ),
            (
                "[model]\ndir = \"m\"\n[stream]\ninterval = 2\n",
                "stream.interval",
                "invalid type",
            ),
            (
                "[model]\ndir = \"m\"\n[stream]\nsource = \"stdin:gif\"\n",
                "stream.source",
                "stdin:mjpeg or stdin:ppm",
            ),
            (
                "[model]\ndir = \"m\"\n[stream]\nloop = \"yes\"\n",
                "stream.loop",
                "invalid type",
            ),
            (
                "[model]\ndir = \"m\"\n[memory]\nenabled = true\n",
                "memory.enabled",
                "stream.source",
            ),
            (
                "[model]\ndir = \"m\"\n[stream]\nsource = \"x.png\"\n[cache]\npolicy = \"full\"\n[memory]\nenabled = true\n",
                "memory.enabled",
                "compresses",
            ),
            (
                "[model]\ndir = \"m\"\n[memory]\ncaptions = true\n",
                "memory.captions",
                "memory.enabled",
            ),
            (
                "[model]\ndir = \"m\"\n[memory]\nenable = true\n",
                "memory.enable",
                "unknown field",
            ),
            (
                "[model]\ndir = \"m\"\n[caption]\nmax_new_tokens = 0\n",
                "caption.max_new_tokens",
                "outside",
            ),
            (
                "[model]\ndir = \"m\"\n[caption]\nprompt = \" \"\n",
                "caption.prompt",
                "empty",
            ),
            ("[cache]\nkeep = 0.5\n", "(top level)", "missing field `model`"),
        ];
        for (text, want_key, want_reason) in cases {
            let (key, reason) = key_of(text);
            assert_eq!(key, want_key, "{text}");
            assert!(reason.contains(want_reason), "{text}: {reason}");
            assert!(!reason.contains('\n'));
        }
    }

    #[test]
    fn relative_source_paths_start_at_the_config() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("frames")).unwrap();
        let config_path = dir.path().join("serve.toml");
        for (spec, expected) in [
            ("frames", SourceSpec::Dir(dir.path().join("frames"))),
            ("dir:frames", SourceSpec::Dir(dir.path().join("frames"))),
            ("file:a.png", SourceSpec::File(dir.path().join("a.png"))),
            (
                "frames/*.png",
                SourceSpec::Glob(format!("{}/frames/*.png", dir.path().display())),
            ),
            ("/abs/*.png", SourceSpec::Glob("/abs/*.png".into())),
            ("stdin:ppm", SourceSpec::Stdin(crate::source::PipeFormat::Ppm)),
        ] {
            let text = format!("[model]\ndir = \"m\"\n[stream]\nsource = \"{spec}\"\nloop = true\n");
            let config = ServeConfig::parse(&text, &config_path).unwrap();
            assert_eq!(config.stream.source, Some(expected), "{spec}");
            assert!(config.stream.looping);
        }
    }

    #[test]
    fn syntax_errors_give_the_line() {
        let (key, reason) = key_of("[model]\ndir = \"m\"\n\n[cache\n");
        assert_eq!(key, "line 4");
        assert!(!reason.is_empty() && !reason.contains('\n'), "{reason}");
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_bytes("8MiB").unwrap(), 8 << 20);
        assert_eq!(parse_bytes("1000").unwrap(), 1000);
        assert!(parse_bytes("0").is_err());
    }
}
