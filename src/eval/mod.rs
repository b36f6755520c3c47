//! Quality evaluation: the paper's protocol (ROUGE-L of a policy's greedy
//! answer against the full cache's, perplexity of a reference) over a
//! dataset, for every policy and keep ratio, with per-sample results, tables
//! by prompt kind and paired bootstrap intervals of the differences between
//! policies.

pub mod dataset;
pub mod memory;
pub mod report;
pub mod rouge;
pub mod stats;
pub mod sweep;
