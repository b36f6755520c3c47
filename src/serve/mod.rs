//! `elastic-edge serve`: the captioning service.

pub mod config;
pub mod events;
pub mod health;
pub mod http;
pub mod metrics;
pub mod notify;
