//! Byte sizes (`--kv-budget`, `cache.kv_budget`, `http.max_body`:
//! `64MiB`, `1.5GB`, `1e9`, `4096tokens`) through `kv::parse_bytes` and
//! `KvBudget::from_str`.
//!
//! Contract: an error is one line, never a panic; an accepted size is
//! 1..=MAX_BYTES and its digits parse back to it; a plain count of bytes
//! is taken exactly; a budget agrees with `parse_bytes` and its token
//! counts are 1..=MAX_TOKENS.
#![no_main]

use elastic_edge::kv::budget::{MAX_BYTES, MAX_TOKENS};
use elastic_edge::kv::{parse_bytes, KvBudget};
use elastic_edge_fuzz::assert_one_line;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let bytes = parse_bytes(text);
    match &bytes {
        Ok(n) => {
            assert!((1..=MAX_BYTES).contains(n), "{text:?} accepted as {n} bytes");
            assert_eq!(parse_bytes(&n.to_string()), Ok(*n));
            assert_eq!(parse_bytes(&format!("{n} B")), Ok(*n));
        }
        Err(reason) => assert_one_line(reason),
    }
    let trimmed = text.trim();
    if !trimmed.is_empty() && trimmed.bytes().all(|b| b.is_ascii_digit()) {
        match trimmed.parse::<u64>() {
            Ok(n) if (1..=MAX_BYTES).contains(&n) => assert_eq!(bytes, Ok(n), "{text:?}"),
            _ => assert!(bytes.is_err(), "{text:?} accepted as {bytes:?}"),
        }
    }
    match text.parse::<KvBudget>() {
        Ok(KvBudget::Bytes(n)) => assert_eq!(bytes, Ok(n)),
        Ok(KvBudget::Tokens(t)) => {
            assert!((1..=MAX_TOKENS).contains(&(t as u64)));
            assert!(bytes.is_err(), "{text:?} is both {t} tokens and {bytes:?}");
        }
        Err(e) => {
            assert_one_line(&e.to_string());
            // Only a token count can fail where the bytes parse.
            if bytes.is_ok() {
                panic!("{text:?} is {bytes:?} bytes but not a budget: {e}");
            }
        }
    }
});
