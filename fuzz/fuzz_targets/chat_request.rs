//! The JSON body of `POST /v1/chat/completions` through
//! `serve::openai::parse_request` (messages and roles, text and
//! `image_url` parts, `data:` URLs with base64 pictures, the sampling and
//! length fields), with the camera memory off and on; each picture of an
//! accepted request then goes through decoding and preprocessing, as the
//! captioning thread takes it.
//!
//! Contract: a refusal is a 4xx with a one-line message, never a panic; an
//! accepted request ends with a user turn that says something, has a
//! length in 1..=MAX_NEW_TOKENS_LIMIT, usable sampling settings, at most 4
//! non-empty stop strings, pictures only in user turns and only in a known
//! format, and none of them with the memory.
#![no_main]

use elastic_edge::sampling::{check_temperature, check_top_p, Sampling};
use elastic_edge::model::image::Resize;
use elastic_edge::model::prompt::ChatRole;
use elastic_edge::serve::config::MAX_NEW_TOKENS_LIMIT;
use elastic_edge::serve::openai::parse_request;
use elastic_edge_fuzz::{assert_one_line, check_load_bytes, preprocess};
use libfuzzer_sys::fuzz_target;

const DEFAULT_TOKENS: usize = 64;

fuzz_target!(|data: &[u8]| {
    for memory in [false, true] {
        let job = match parse_request(data, DEFAULT_TOKENS, memory) {
            Ok(job) => job,
            Err(e) => {
                assert!(
                    (400..500).contains(&e.status),
                    "status {} for a bad request: {}",
                    e.status,
                    e.message
                );
                assert_one_line(&e.message);
                continue;
            }
        };
        assert_eq!(job.memory, memory, "the memory's setting and the job's differ");
        let last = job.turns.last().expect("a job without turns");
        assert_eq!(last.role, ChatRole::User);
        assert!(!last.text.trim().is_empty() || !last.images.is_empty());
        assert!((1..=MAX_NEW_TOKENS_LIMIT).contains(&job.params.max_new_tokens));
        let sampling: Sampling = job.params.sampling;
        if !sampling.is_greedy() {
            check_temperature(sampling.temperature).expect("an accepted temperature");
            check_top_p(sampling.top_p).expect("an accepted top_p");
        }
        sampling.check().expect("accepted sampling settings");
        assert!(job.params.stop_strings.len() <= 4 && job.params.stop_strings.iter().all(|s| !s.is_empty()));
        if memory {
            assert_eq!(job.turns.len(), 1);
            assert!(job.system.is_none());
        }
        let squash = preprocess(Resize::BilinearSquash, 6, 4);
        for turn in &job.turns {
            if turn.role != ChatRole::User {
                assert!(turn.images.is_empty(), "a picture in a {:?} turn", turn.role);
            }
            for picture in &turn.images {
                assert!(image::guess_format(picture).is_ok());
                check_load_bytes(&squash, picture);
            }
        }
    }
});
