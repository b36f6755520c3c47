//! Quality evaluation: the paper's protocol (ROUGE-L of a policy's greedy
//! answer against the full cache's, perplexity of a reference) over a
//! dataset, for every policy and keep ratio.

pub mod dataset;
pub mod rouge;
pub mod sweep;
