//! report-service: call-statistics reports over RabbitMQ from a memory-mapped data.json.
//!
//! Layout, from the bytes up (one concept a module; dependencies point up this list,
//! never down):
//!
//! - [`data`]: data.json mapped read-only, validated and indexed once (phone -> spans).
//! - [`stats`]: exact per-phone aggregation in integer milliseconds; pure.
//! - [`pool`]: the worker threads for CPU work, and how async code awaits them.
//! - [`compute`]: the statistics of a list of phones, split across the pool.
//! - [`cache`]: the bounded TTL map of per-phone answers, tagged by data version.
//! - [`engine`]: cache lookups, single-flight computation, data swaps.
//! - [`snapshot`]: the cache's files (base and journal) and its write-behind thread;
//!   [`atomic_file`]: replacing a file by rename.
//! - [`reload`]: notices a replaced data.json, indexes it, swaps it in.
//! - [`message`]: the wire contract (task parsing, report JSON).
//! - [`dead_letter`], [`retry`]: the dead-letter copy and the retry policy (pure).
//! - [`broker`]: RabbitMQ connection, topology, consume and confirmed publish; its `raw`
//!   client reads what lapin cannot decode.
//! - [`poison`]: moving messages the AMQP client cannot decode to the DLQ.
//! - [`pipeline`]: one delivery to one confirmed answer, and the ack decision.
//! - [`consumer`]: the consume loop: sessions, reconnects, shutdown steps.
//! - [`app`]: wiring from a [`config::Config`] to a running service.
//! - [`http`], [`health`], [`metrics`], [`telemetry`]: what operators see.
//! - [`tls`]: the certificates `amqps://` trusts and presents, for both AMQP clients.
//! - [`config`], [`clock`], [`shutdown`], [`stack`], [`heap`]: inputs and process set-up.
//! - [`datagen`]: deterministic data.json generation for tests, benches and users.
//! - [`producer`]: the client side: send, sample tasks, load test, echo baseline.
//!
//! The binaries in `src/bin` only parse arguments and call into these modules.

pub mod app;
pub mod atomic_file;
pub mod broker;
pub mod cache;
pub mod clock;
pub mod compute;
pub mod config;
pub mod consumer;
pub mod data;
pub mod datagen;
pub mod dead_letter;
pub mod engine;
pub mod health;
pub mod heap;
pub mod http;
pub mod message;
pub mod metrics;
pub mod pipeline;
pub mod poison;
pub mod pool;
pub mod producer;
pub mod reload;
pub mod retry;
pub mod shutdown;
pub mod snapshot;
pub mod stack;
pub mod stats;
pub mod telemetry;
pub mod tls;
