//! `POST /caption`'s query string through `serve::http::Request::query_param`
//! (percent-decoding with `+` as a space): the one piece of HTTP parsing
//! that is ours now that hyper parses the heads.
//!
//! Contract: it ends, never panics; an accepted value is no longer than the
//! query; a query without `%` decodes to exactly its text with `+` as a
//! space; a parameter absent from the query is `None`.
#![no_main]

use elastic_edge::serve::http::Request;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(query) = std::str::from_utf8(data) else {
        return;
    };
    let request = Request {
        method: "POST".into(),
        path: "/caption".into(),
        query: Some(query.to_string()),
        content_length: None,
        authorization: None,
    };
    for name in ["prompt", "stop", "temperature", ""] {
        match request.query_param(name) {
            Ok(Some(value)) => {
                assert!(value.len() <= query.len());
                if !query.contains('%') {
                    let raw = query
                        .split('&')
                        .find_map(|pair| {
                            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
                            (key.replace('+', " ") == name).then_some(value)
                        })
                        .expect("a value comes from a pair with that name");
                    assert_eq!(value, raw.replace('+', " "));
                }
            }
            Ok(None) => {
                if !query.contains('%') && !query.contains('+') {
                    assert!(!query
                        .split('&')
                        .any(|pair| pair.split_once('=').map_or(pair, |(k, _)| k) == name));
                }
            }
            Err(reason) => {
                assert!(!reason.contains('\n'), "{reason}");
                assert!(query.contains('%'), "only escapes can be bad: {reason}");
            }
        }
    }
});
