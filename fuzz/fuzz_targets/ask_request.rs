//! The JSON body of `POST /memory/ask` (`{"question": "...",
//! "max_tokens": N}`) through `serve::api::parse_ask`.
//!
//! Contract: a refusal is a one-line 400 message, never a panic; an
//! accepted body has a question that is not blank and a length in
//! 1..=MAX_NEW_TOKENS_LIMIT.
#![no_main]

use elastic_edge::serve::api::parse_ask;
use elastic_edge::serve::config::MAX_NEW_TOKENS_LIMIT;
use elastic_edge_fuzz::assert_one_line;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match parse_ask(data) {
        Ok(ask) => {
            assert!(!ask.question.trim().is_empty());
            assert!((1..=MAX_NEW_TOKENS_LIMIT).contains(&ask.max_tokens));
        }
        Err(message) => assert_one_line(&message),
    }
});
