//! The KV cache: a fixed memory-mapped pool ([`pool`]), the budget that
//! sizes it ([`budget`]), the policies that compress it ([`policy`]) and the
//! cache that ties them to a generation loop ([`cache`]).

pub mod budget;
pub mod cache;
pub mod kind;
pub mod policy;
pub mod pool;
pub mod rope;

pub use budget::{parse_bytes, KeepRatio, KvBudget};
pub use cache::{CacheStats, KvCache, PositionMap, PromptSnapshot};
pub use kind::{KindClass, TokenKind};
pub use policy::{CachePolicy, Compression, Phase, PolicyConfig, PolicyKind};
pub use pool::{KvDtype, KvElement, KvLayout, KvPool, KvShape, LayerStepView, PoolBacking, PoolSnapshot};
pub use rope::Rope;
