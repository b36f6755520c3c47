//! `serve --config` TOML text through `ServeConfig::parse` (every key,
//! the policy's knobs, sizes, intervals, source specs, the listen address,
//! the API key).
//!
//! Contract: an error is one line naming its key, never a panic; an
//! accepted config re-validates: parsing it again gives the same config,
//! and each checked value, written back in its canonical form, goes
//! through the same parser to the same value.
#![no_main]

use std::path::Path;

use elastic_edge::kv::{KeepRatio, KvBudget};
use elastic_edge::serve::config::{parse_bytes, MAX_NEW_TOKENS_LIMIT};
use elastic_edge::serve::ServeConfig;
use elastic_edge::source::SourceSpec;
use elastic_edge_fuzz::assert_one_line;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // `ServeConfig::load` reads the file as UTF-8 text.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = Path::new("/nonexistent/etc/serve.toml");
    let config = match ServeConfig::parse(text, path) {
        Ok(config) => config,
        Err(e) => return assert_one_line(&e.to_string()),
    };
    let again = ServeConfig::parse(text, path).expect("an accepted config refused the second time");
    assert_eq!(format!("{config:?}"), format!("{again:?}"));

    assert!(!config.model.dir.as_os_str().is_empty());
    if let Some(threads) = config.model.threads {
        elastic_edge::model::check_threads(threads).expect("accepted threads");
    }
    let budget = config.cache.kv_budget;
    let canonical = match budget {
        KvBudget::Bytes(bytes) => bytes.to_string(),
        KvBudget::Tokens(tokens) => format!("{tokens}tokens"),
    };
    assert_eq!(canonical.parse::<KvBudget>().expect("a canonical budget"), budget);
    let keep = config.cache.keep.get();
    assert_eq!(KeepRatio::new(keep).expect("an accepted keep ratio").get(), keep);
    if config.cache.kv_over_memory {
        assert!(config.cache.kv_file.is_some());
    }
    if let Some(chunk) = config.cache.prefill_chunk {
        assert!(chunk > 0);
    }
    let tokens = config.caption.max_new_tokens;
    assert!((1..=MAX_NEW_TOKENS_LIMIT).contains(&tokens));
    if let Some(prompt) = &config.caption.prompt {
        assert!(!prompt.trim().is_empty());
    }
    if let Some(source) = &config.stream.source {
        let written = source.to_string();
        let reparsed: SourceSpec = written.parse().expect("a source spec's Display");
        assert_eq!(&reparsed, source, "{written:?} parses to another source");
    }
    // Whole milliseconds below 2^32 s survive f64 exactly enough (1 ms).
    let interval = config.stream.interval;
    if interval.as_secs() < 1 << 32 {
        let written = format!("{}ms", interval.as_millis());
        let reparsed = elastic_edge::stream::parse_interval(&written).expect("an interval in ms");
        assert!(
            reparsed.as_millis().abs_diff(interval.as_millis()) <= 1,
            "{written:?} is {reparsed:?}"
        );
    }
    if config.memory.enabled {
        assert!(config.stream.source.is_some());
    }
    if config.memory.captions {
        assert!(config.memory.enabled);
    }
    let listen = config.http.listen;
    assert_eq!(listen.to_string().parse::<std::net::SocketAddr>().ok(), Some(listen));
    let max_body = config.http.max_body;
    assert_eq!(parse_bytes(&max_body.to_string()), Ok(max_body));
    assert!(max_body >= 1);
});
