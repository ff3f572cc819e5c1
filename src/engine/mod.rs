//! Statistics on demand: per-phone answers from the cache or computed on the worker
//! pool, one computation per phone however many tasks miss it at once; the data version
//! being served, swapped whole on a reload and joined segment by segment; the cache's
//! snapshot on disk.
//!
//! | module | owns |
//! |---|---|
//! | [`lookup`] | [`Engine`]: lookups, single flight, data swaps and segment joins |
//! | [`cache`] | the bounded TTL map of answers (CLOCK eviction), tagged by data epoch |
//! | [`compute`] | a list of phones' statistics, split across the pool |
//! | `flight` | one computation's result, awaited by every task that missed the phone meanwhile |
//! | [`reload`] | watching the data path, indexing what changed, swapping or joining it in |
//! | [`snapshot`] | the cache's files (base and journal) and the write-behind thread |
//!
//! It knows nothing of the broker: the delivery wing asks it for answers.

pub mod cache;
pub mod compute;
mod flight;
pub mod lookup;
pub mod reload;
pub mod snapshot;

pub use cache::Answer;
pub use lookup::{CacheSettings, Engine, EngineBuilder, EngineError, Joined, Loaded};
