//! OpenAI's chat completions API over the service: `POST
//! /v1/chat/completions` and `GET /v1/models`, in the shapes OpenAI's
//! clients read (`chat.completion`, `chat.completion.chunk` server-sent
//! events ending with `data: [DONE]`, `{"error": {"message", "type",
//! "param", "code"}}`). What is ours (the cache policy, its figures, the
//! timings) is in one extra field, `elastic_edge`, which clients ignore.
//!
//! A request is turned into a [`ChatJob`] here, on the HTTP thread, so a
//! bad one is refused before it queues: roles (`system` and `developer`,
//! `user`, `assistant`; the last message must be the user's), content as
//! text or `text` / `image_url` parts (images inline as `data:image/...;
//! base64,` URLs; `http(s)://` URLs are refused, as the device may be
//! offline), `max_tokens` / `max_completion_tokens`, `temperature`,
//! `top_p`, `seed`, `stop` (generation ends at a stop string), `stream`,
//! `n` (1 only), and, as llama-server and vLLM take them beside OpenAI's
//! fields, `top_k` and `repetition_penalty`. Other fields OpenAI defines
//! are accepted and ignored, as other servers do.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use serde::Serialize;
use serde_json::{json, Map, Value};

use super::config::MAX_NEW_TOKENS_LIMIT;
use super::http::Response;
use crate::generate::{GenerateParams, StopReason, Timings};
use crate::kv::PolicyKind;
use crate::model::prompt::ChatRole;
use crate::sampling::{check_repetition_penalty, check_temperature, check_top_p, Sampling};

/// The `model` that asks the camera memory (with `[memory] enabled`).
pub const MEMORY_MODEL: &str = "memory";

/// Most stop strings in one request (OpenAI's limit).
const MAX_STOPS: usize = 4;

/// A refused request: the status and OpenAI's error fields.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: u16,
    pub message: String,
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

impl ApiError {
    pub fn new(status: u16, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            param: None,
            code: None,
        }
    }

    fn bad(param: impl Into<String>, message: impl Into<String>) -> Self {
        ApiError {
            status: 400,
            message: message.into(),
            param: Some(param.into()),
            code: None,
        }
    }

    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    /// OpenAI's error type for a status.
    fn kind(&self) -> &'static str {
        match self.status {
            401 => "authentication_error",
            404 => "not_found_error",
            409 => "conflict_error",
            500..=599 => "server_error",
            _ => "invalid_request_error",
        }
    }

    /// The error's JSON object (`{"error": {...}}`).
    pub fn body(&self) -> Value {
        json!({
            "error": {
                "message": self.message,
                "type": self.kind(),
                "param": self.param,
                "code": self.code,
            }
        })
    }

    pub fn response(&self) -> Response {
        let response = Response::json(self.status, &self.body());
        match self.status {
            503 => response.with_header("Retry-After", "5"),
            401 => response.with_header("WWW-Authenticate", "Bearer"),
            _ => response,
        }
    }
}

/// One turn of a conversation, owning its text and pictures.
#[derive(Debug, Clone, PartialEq)]
pub struct Turn {
    pub role: ChatRole,
    pub text: String,
    /// The pictures' encoded bytes (PNG, JPEG, ...), in the order given.
    pub images: Vec<Vec<u8>>,
}

/// A checked chat request, for the captioning thread.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatJob {
    /// The system and developer messages, joined (`None`: the template's).
    pub system: Option<String>,
    pub turns: Vec<Turn>,
    /// With the request's `stop` strings.
    pub params: GenerateParams,
    /// `"model": "memory"`: a question for the camera memory.
    pub memory: bool,
    pub stream: bool,
    /// `stream_options.include_usage`: a last chunk with the usage.
    pub include_usage: bool,
    /// The `model` asked for, echoed back.
    pub model: String,
}

/// The answer to a chat job.
#[derive(Debug, Clone)]
pub struct ChatAnswer {
    pub text: String,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub stop: StopReason,
    pub extension: Extension,
}

/// Our figures, in `elastic_edge`.
#[derive(Debug, Clone, Serialize)]
pub struct Extension {
    pub policy: PolicyKind,
    pub keep: f64,
    pub pool_bytes: u64,
    pub pool_slots: usize,
    pub cache_entries: usize,
    pub merged: u64,
    pub evicted: u64,
    /// Why generation ended: `stop_token`, `max_tokens`, or `stop_string`
    /// (the text reached a `stop` string).
    pub stop: &'static str,
    pub total_ms: f64,
    pub timings_ms: Timings,
    /// For `"model": "memory"`: the newest frame in memory.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub frame_id: Option<u64>,
}

/// The sampling fields a request may give (`POST /caption`'s query and
/// OpenAI's body alike), each absent or as given.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SamplingFields {
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<usize>,
    pub repetition_penalty: Option<f32>,
    pub seed: Option<u64>,
}

impl SamplingFields {
    /// The sampling asked for, or the field that cannot be used and why.
    /// Greedy unless the request samples: a temperature above 0, or a
    /// nucleus or top-k alone (at OpenAI's default temperature of 1). A
    /// repetition penalty alone stays greedy.
    pub fn sampling(&self) -> Result<Sampling, (&'static str, String)> {
        let refuse = |field: &'static str, value: f32| move |reason| (field, format!("{field} {value} {reason}"));
        if let Some(t) = self.temperature {
            check_temperature(t).map_err(refuse("temperature", t))?;
        }
        if let Some(p) = self.top_p {
            check_top_p(p).map_err(refuse("top_p", p))?;
        }
        if let Some(p) = self.repetition_penalty {
            check_repetition_penalty(p).map_err(refuse("repetition_penalty", p))?;
        }
        let samples = self.top_p.is_some() || self.top_k.is_some_and(|k| k > 0);
        let temperature = self.temperature.unwrap_or(if samples { 1.0 } else { 0.0 });
        Ok(Sampling {
            temperature,
            top_p: self.top_p.unwrap_or(1.0),
            top_k: self.top_k.unwrap_or(0),
            repetition_penalty: self.repetition_penalty.unwrap_or(1.0),
            // Unseeded draws differ from request to request, as OpenAI's do.
            seed: self
                .seed
                .unwrap_or_else(|| if temperature > 0.0 { rand::random() } else { 0 }),
        })
    }
}

/// Reads a request body into a job. `default_tokens` is the answer length
/// when the request gives none; `memory` whether `[memory]` is on.
pub fn parse_request(body: &[u8], default_tokens: usize, memory: bool) -> Result<ChatJob, ApiError> {
    // Into a Value: serde_json's syntax errors never quote the input, and
    // the fields below are checked by hand, their values quoted with {:?}.
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::new(400, format!("the body is not JSON: {e}")).with_code("invalid_json"))?;
    let Value::Object(request) = value else {
        return Err(ApiError::new(400, "the body must be a JSON object"));
    };
    let model = match request.get("model") {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(name)) => name.clone(),
        Some(_) => return Err(ApiError::bad("model", "model must be a string")),
    };
    let wants_memory = model == MEMORY_MODEL;
    if wants_memory && !memory {
        return Err(ApiError::new(
            409,
            "\"model\": \"memory\" asks the camera memory, which is off: set [memory] enabled = true in the config",
        )
        .with_code("memory_off"));
    }
    if memory && !wants_memory {
        return Err(ApiError::new(
            409,
            "the camera memory is on ([memory] enabled): a one-off chat would reset the pool it lives in; \
             ask the memory with \"model\": \"memory\"",
        )
        .with_code("memory_on"));
    }

    let messages = match request.get("messages") {
        Some(Value::Array(messages)) if !messages.is_empty() => messages,
        Some(Value::Array(_)) => return Err(ApiError::bad("messages", "messages is empty")),
        Some(_) => return Err(ApiError::bad("messages", "messages must be a list")),
        None => return Err(ApiError::bad("messages", "messages is missing")),
    };
    let mut system: Vec<String> = Vec::new();
    let mut turns: Vec<Turn> = Vec::new();
    for (i, message) in messages.iter().enumerate() {
        let at = format!("messages[{i}]");
        let Value::Object(message) = message else {
            return Err(ApiError::bad(at, "a message must be an object"));
        };
        let role = match message.get("role") {
            Some(Value::String(role)) => role.as_str(),
            _ => return Err(ApiError::bad(format!("{at}.role"), "a message needs a role")),
        };
        let (text, images) = content(message.get("content"), &format!("{at}.content"))?;
        match role {
            "system" | "developer" => {
                if !images.is_empty() {
                    return Err(ApiError::bad(
                        format!("{at}.content"),
                        "a system message cannot hold images",
                    ));
                }
                system.push(text);
            }
            "user" => turns.push(Turn {
                role: ChatRole::User,
                text,
                images,
            }),
            "assistant" => {
                if !images.is_empty() {
                    return Err(ApiError::bad(
                        format!("{at}.content"),
                        "an assistant message cannot hold images",
                    ));
                }
                turns.push(Turn {
                    role: ChatRole::Assistant,
                    text,
                    images,
                });
            }
            other => {
                return Err(ApiError::bad(
                    format!("{at}.role"),
                    format!("unknown role {other:?}: system, developer, user or assistant"),
                ))
            }
        }
    }
    match turns.last() {
        None => return Err(ApiError::bad("messages", "no user message: the model answers the user")),
        Some(turn) if turn.role != ChatRole::User => {
            return Err(ApiError::bad(
                "messages",
                "the last message must be the user's: the model answers it",
            ))
        }
        Some(turn) if turn.text.trim().is_empty() && turn.images.is_empty() => {
            return Err(ApiError::bad("messages", "the last user message is empty"))
        }
        Some(_) => {}
    }
    if wants_memory && (turns.len() > 1 || !system.is_empty() || turns.iter().any(|t| !t.images.is_empty())) {
        return Err(ApiError::bad(
            "messages",
            "the memory answers one question from the camera's frames: send one user message of text only",
        ));
    }

    let tokens = |name: &str| -> Result<Option<usize>, ApiError> {
        match request.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(value) => match value.as_u64() {
                Some(0) | None => Err(ApiError::bad(
                    name,
                    format!("{name} must be a whole number from 1 to {MAX_NEW_TOKENS_LIMIT}"),
                )),
                Some(n) if n > MAX_NEW_TOKENS_LIMIT as u64 => Err(ApiError::bad(
                    name,
                    format!("{name} {n} is over {MAX_NEW_TOKENS_LIMIT}"),
                )),
                Some(n) => Ok(Some(n as usize)),
            },
        }
    };
    let max_new_tokens = tokens("max_completion_tokens")?
        .or(tokens("max_tokens")?)
        .unwrap_or(default_tokens);

    let number = |name: &str| -> Result<Option<f32>, ApiError> {
        match request.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(value) => value
                .as_f64()
                .map(|v| Some(v as f32))
                .ok_or_else(|| ApiError::bad(name, format!("{name} must be a number"))),
        }
    };
    let top_k = match request.get("top_k") {
        None | Some(Value::Null) => None,
        Some(value) => Some(
            value
                .as_u64()
                .and_then(|k| usize::try_from(k).ok())
                .ok_or_else(|| ApiError::bad("top_k", "top_k must be a whole number, 0 (off) or more"))?,
        ),
    };
    let seed = match request.get("seed") {
        None | Some(Value::Null) => None,
        // OpenAI's seeds are any integer: a negative one as its bits.
        Some(value) => Some(
            value
                .as_u64()
                .or(value.as_i64().map(|s| s as u64))
                .ok_or_else(|| ApiError::bad("seed", "seed must be an integer"))?,
        ),
    };
    let fields = SamplingFields {
        temperature: number("temperature")?,
        top_p: number("top_p")?,
        top_k,
        repetition_penalty: number("repetition_penalty")?,
        seed,
    };
    let sampling = fields
        .sampling()
        .map_err(|(field, message)| ApiError::bad(field, message))?;

    let stop = match request.get("stop") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(list)) => list
            .iter()
            .map(|s| s.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| ApiError::bad("stop", "stop must be a string or a list of strings"))?,
        Some(_) => return Err(ApiError::bad("stop", "stop must be a string or a list of strings")),
    };
    if stop.len() > MAX_STOPS || stop.iter().any(String::is_empty) {
        return Err(ApiError::bad(
            "stop",
            format!("stop takes up to {MAX_STOPS} strings, none empty"),
        ));
    }

    match request.get("n") {
        None | Some(Value::Null) => {}
        Some(n) if n.as_u64() == Some(1) => {}
        Some(_) => return Err(ApiError::bad("n", "n must be 1: one answer per request")),
    }
    let stream = match request.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(ApiError::bad("stream", "stream must be true or false")),
    };
    let include_usage = request
        .get("stream_options")
        .and_then(|o| o.get("include_usage"))
        .and_then(Value::as_bool)
        .unwrap_or(false);

    Ok(ChatJob {
        system: (!system.is_empty()).then(|| system.join("\n\n")),
        turns,
        params: GenerateParams {
            max_new_tokens,
            sampling,
            stop_strings: stop,
            ignore_stop: false,
        },
        memory: wants_memory,
        stream,
        include_usage,
        model,
    })
}

/// A message's content: its text (parts joined by newlines) and pictures.
fn content(value: Option<&Value>, at: &str) -> Result<(String, Vec<Vec<u8>>), ApiError> {
    let parts = match value {
        None | Some(Value::Null) => return Ok((String::new(), Vec::new())),
        Some(Value::String(text)) => return Ok((text.clone(), Vec::new())),
        Some(Value::Array(parts)) => parts,
        Some(_) => return Err(ApiError::bad(at, "content must be a string or a list of parts")),
    };
    let mut texts: Vec<&str> = Vec::new();
    let mut images = Vec::new();
    for (j, part) in parts.iter().enumerate() {
        let at = format!("{at}[{j}]");
        match part.get("type").and_then(Value::as_str) {
            Some("text") => match part.get("text") {
                Some(Value::String(text)) => texts.push(text),
                _ => return Err(ApiError::bad(format!("{at}.text"), "a text part needs its text")),
            },
            Some("image_url") => {
                let url = part
                    .get("image_url")
                    .and_then(|u| u.get("url").or(Some(u)))
                    .and_then(Value::as_str)
                    .ok_or_else(|| {
                        ApiError::bad(
                            format!("{at}.image_url"),
                            "an image_url part needs {\"url\": \"data:...\"}",
                        )
                    })?;
                images.push(data_url(url, &format!("{at}.image_url.url"))?);
            }
            Some(other) => {
                return Err(ApiError::bad(
                    format!("{at}.type"),
                    format!("unsupported content part {other:?}: text and image_url only"),
                ))
            }
            None => return Err(ApiError::bad(format!("{at}.type"), "a content part needs a type")),
        }
    }
    Ok((texts.join("\n"), images))
}

/// The picture in a `data:image/...;base64,` URL, checked to be one.
fn data_url(url: &str, at: &str) -> Result<Vec<u8>, ApiError> {
    let lower = url.get(..8).unwrap_or(url).to_ascii_lowercase();
    if lower.starts_with("http://") || lower.starts_with("https://") {
        return Err(ApiError::bad(
            at,
            "image URLs are not fetched (the device may be offline): send the picture inline, as \
             data:image/png;base64,... or data:image/jpeg;base64,...",
        )
        .with_code("image_url_not_supported"));
    }
    let Some(rest) = url.strip_prefix("data:") else {
        return Err(ApiError::bad(
            at,
            "an image URL must be a data: URL (data:image/png;base64,...)",
        ));
    };
    let Some((media, data)) = rest.split_once(',') else {
        return Err(ApiError::bad(at, "a data: URL needs a comma before its data"));
    };
    let Some(mime) = media.strip_suffix(";base64") else {
        return Err(ApiError::bad(
            at,
            "the image's data: URL must be base64 (data:image/png;base64,...)",
        ));
    };
    if !mime.to_ascii_lowercase().starts_with("image/") {
        return Err(ApiError::bad(at, format!("{mime:?} is not an image type")).with_code("invalid_image"));
    }
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(data.trim())
        .map_err(|e| ApiError::bad(at, format!("the image is not valid base64: {e}")).with_code("invalid_image"))?;
    if image::guess_format(&bytes).is_err() {
        return Err(
            ApiError::bad(at, "the data is not a picture in a known format (PNG, JPEG, WebP, ...)")
                .with_code("invalid_image"),
        );
    }
    Ok(bytes)
}

/// `created`: now, in unix seconds.
fn now_unix() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// A new completion id, `chatcmpl-` and a number unique to this process.
pub fn completion_id() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("chatcmpl-{:x}{n:04x}", now_unix())
}

/// OpenAI's `finish_reason`: `stop` for a stop token or string.
fn finish_reason(stop: StopReason) -> &'static str {
    match stop {
        StopReason::StopToken | StopReason::StopString => "stop",
        StopReason::MaxTokens => "length",
    }
}

fn usage(answer: &ChatAnswer, completion_tokens: usize) -> Value {
    json!({
        "prompt_tokens": answer.prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": answer.prompt_tokens + completion_tokens,
    })
}

fn extension(answer: &ChatAnswer) -> Value {
    serde_json::to_value(&answer.extension).unwrap_or(Value::Null)
}

/// The `chat.completion` object of an answer.
pub fn completion(id: &str, model: &str, answer: &ChatAnswer) -> Value {
    json!({
        "id": id,
        "object": "chat.completion",
        "created": now_unix(),
        "model": model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": answer.text, "refusal": null},
            "logprobs": null,
            "finish_reason": finish_reason(answer.stop),
        }],
        "usage": usage(answer, answer.completion_tokens),
        "system_fingerprint": null,
        "elastic_edge": extension(answer),
    })
}

/// A `chat.completion.chunk` with `delta` (and `finish_reason`).
pub fn chunk(id: &str, model: &str, delta: Value, finish: Option<&str>) -> Value {
    json!({
        "id": id,
        "object": "chat.completion.chunk",
        "created": now_unix(),
        "model": model,
        "system_fingerprint": null,
        "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}],
    })
}

/// The last chunks of a stream: the finish reason with our figures, then
/// (`include_usage`) the usage with no choices.
pub fn final_chunks(id: &str, model: &str, answer: &ChatAnswer, include_usage: bool) -> Vec<Value> {
    let mut last = chunk(id, model, json!({}), Some(finish_reason(answer.stop)));
    if let Value::Object(map) = &mut last {
        map.insert("elastic_edge".into(), extension(answer));
    }
    let mut chunks = vec![last];
    if include_usage {
        let mut usage_chunk = Map::new();
        usage_chunk.insert("id".into(), json!(id));
        usage_chunk.insert("object".into(), json!("chat.completion.chunk"));
        usage_chunk.insert("created".into(), json!(now_unix()));
        usage_chunk.insert("model".into(), json!(model));
        usage_chunk.insert("choices".into(), json!([]));
        usage_chunk.insert("usage".into(), usage(answer, answer.completion_tokens));
        chunks.push(Value::Object(usage_chunk));
    }
    chunks
}

/// `GET /v1/models`: the loaded model (and `memory`, when it is on).
pub fn models(name: &str, memory: bool, created: u64) -> Value {
    let model = |id: &str| json!({"id": id, "object": "model", "created": created, "owned_by": "elastic-edge"});
    let mut data = vec![model(name)];
    if memory {
        data.push(model(MEMORY_MODEL));
    }
    json!({"object": "list", "data": data})
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A value holding a line break, quoted by serde as sent: one line.
    #[test]
    fn a_quoted_line_break_in_an_error_is_one_line() {
        for body in [
            &br#"{"messages": [{"role": "us\ner", "content": "hi"}]}"#[..],
            br#"{"messages": [{"role": "user", "content": [{"type": "te\nxt", "text": "hi"}]}]}"#,
            br#"{"messages": "x\ny"}"#,
        ] {
            let e = parse_request(body, 16, false).unwrap_err();
            assert!(!e.message.contains(['\n', '\r']), "{:?}", e.message);
        }
    }

    const PNG_1X1: &str =
        "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4z8AAAAMBAQDJ/pLvAAAAAElFTkSuQmCC";

    fn parse(body: Value) -> Result<ChatJob, ApiError> {
        parse_request(body.to_string().as_bytes(), 16, false)
    }

    #[test]
    fn a_conversation_with_a_picture_becomes_a_job() {
        let job = parse(json!({
            "model": "tiny",
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": [
                    {"type": "text", "text": "What is this?"},
                    {"type": "image_url", "image_url": {"url": format!("data:image/png;base64,{PNG_1X1}")}}
                ]},
                {"role": "assistant", "content": "A dot."},
                {"role": "user", "content": "And its colour?"}
            ],
            "max_tokens": 8, "temperature": 0.7, "seed": 3, "stop": ["\n"], "frequency_penalty": 0,
            "top_k": 40, "repetition_penalty": 1.3
        }))
        .unwrap();
        assert_eq!(job.system.as_deref(), Some("Be brief."));
        assert_eq!(job.turns.len(), 3);
        assert_eq!(job.turns[0].images.len(), 1);
        assert_eq!(job.turns[1].role, ChatRole::Assistant);
        assert_eq!(job.params.max_new_tokens, 8);
        assert_eq!(
            job.params.sampling,
            Sampling {
                temperature: 0.7,
                top_p: 1.0,
                top_k: 40,
                repetition_penalty: 1.3,
                seed: 3
            }
        );
        assert_eq!(job.params.stop_strings, vec!["\n".to_string()]);
        let user = json!({"role": "user", "content": "hi"});
        let greedy = parse(json!({"messages": [user], "stop": "Demon"})).unwrap();
        assert!(greedy.params.sampling.is_greedy());
        assert_eq!(greedy.params.stop_strings, ["Demon"]);
        assert_eq!(greedy.params.max_new_tokens, 16, "the config's default");
        // A penalty alone stays greedy; a top-k alone samples at OpenAI's
        // default temperature.
        let penalised = parse(json!({"messages": [user], "repetition_penalty": 1.2})).unwrap();
        assert!(penalised.params.sampling.is_greedy());
        assert_eq!(penalised.params.sampling.repetition_penalty, 1.2);
        let top_k = parse(json!({"messages": [user], "top_k": 5})).unwrap();
        assert_eq!(
            (top_k.params.sampling.temperature, top_k.params.sampling.top_k),
            (1.0, 5)
        );
    }

    #[test]
    fn bad_requests_name_their_field() {
        let param = |body: Value| parse(body).unwrap_err().param;
        let user = json!({"role": "user", "content": "hi"});
        let e = parse_request(b"{not json", 16, false).unwrap_err();
        assert_eq!((e.status, e.code), (400, Some("invalid_json")));
        assert_eq!(param(json!({"messages": []})).as_deref(), Some("messages"));
        assert_eq!(
            param(json!({"messages": [{"role": "system", "content": "x"}]})).as_deref(),
            Some("messages")
        );
        assert_eq!(
            param(json!({"messages": [{"role": "robot", "content": "x"}, user]})).as_deref(),
            Some("messages[0].role")
        );
        for tokens in [json!(0), json!(5000), json!(-1), json!("8")] {
            assert_eq!(
                param(json!({"messages": [user], "max_tokens": tokens})).as_deref(),
                Some("max_tokens")
            );
        }
        assert_eq!(
            param(json!({"messages": [user], "temperature": -1})).as_deref(),
            Some("temperature")
        );
        assert_eq!(param(json!({"messages": [user], "top_p": 0})).as_deref(), Some("top_p"));
        for top_k in [json!(-1), json!(2.5), json!("40")] {
            assert_eq!(
                param(json!({"messages": [user], "top_k": top_k})).as_deref(),
                Some("top_k")
            );
        }
        for penalty in [json!(0), json!(-1.3), json!("1.3")] {
            assert_eq!(
                param(json!({"messages": [user], "repetition_penalty": penalty})).as_deref(),
                Some("repetition_penalty")
            );
        }
        for stop in [json!(""), json!(["a", "b", "c", "d", "e"]), json!([1]), json!(7)] {
            assert_eq!(
                param(json!({"messages": [user], "stop": stop})).as_deref(),
                Some("stop")
            );
        }
        assert_eq!(param(json!({"messages": [user], "n": 2})).as_deref(), Some("n"));
        let image = |url: &str| json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]});
        for url in [
            "https://example.com/a.png",
            "data:image/png;base64,!!!!",
            "data:image/png;base64,aGVsbG8gd29ybGQ=",
            "data:text/plain;base64,aGVsbG8=",
            "file:///etc/passwd",
        ] {
            let e = parse(image(url)).unwrap_err();
            assert_eq!(e.status, 400, "{url}");
            assert_eq!(
                e.param.as_deref(),
                Some("messages[0].content[0].image_url.url"),
                "{url}"
            );
        }
        assert!(parse(image(&format!("data:image/png;base64,{PNG_1X1}"))).is_ok());
        let memory = parse_request(br#"{"messages": [{"role": "user", "content": "hi"}]}"#, 16, true).unwrap_err();
        assert_eq!(memory.status, 409);
        let memory = parse(json!({"model": "memory", "messages": [user]})).unwrap_err();
        assert_eq!(memory.status, 409);
    }

    #[test]
    fn errors_are_in_openai_shape() {
        let e = ApiError::bad("max_tokens", "too many");
        assert_eq!(
            e.body(),
            json!({"error": {"message": "too many", "type": "invalid_request_error", "param": "max_tokens", "code": null}})
        );
        assert_eq!(ApiError::new(503, "busy").response().status, 503);
    }
}
