//! elastic-edge: vision-language models on edge devices.
//!
//! A frame goes through the vision graph to image embeddings, then through
//! the decoder graph, which reads the past keys and values straight from a
//! fixed memory-mapped pool ([`kv::KvPool`]) and writes the new ones straight
//! into it; a cache policy ([`kv::policy`]) keeps the pool within its budget
//! with Elastic Cache's importance-driven merging.

pub mod bench;
pub mod error;
pub mod eval;
pub mod generate;
pub mod kv;
pub mod memory;
pub mod model;
pub mod regular_file;
pub mod runtime;
pub mod sampling;
pub mod serve;
pub mod source;
pub mod stream;

pub use error::{Error, Result};
