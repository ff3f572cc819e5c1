//! report-service's user tools, as a library for the two binaries (`producer`,
//! `datagen`) and for the worker's own tests and benches.
//!
//! - [`datagen`]: deterministic data.json generation in the reference shape and others.
//! - [`producer`]: the client side of the contract: send a task, the sample tasks, the
//!   load test, the broker's echo baseline, the freshness probe.
//!
//! It depends on the worker's library for what both sides must agree on (the settings
//! and how they are read, broker addresses and failover, TLS), never the other way round
//! (the worker's tests and benches use it as a dev-dependency).

pub mod datagen;
pub mod producer;
