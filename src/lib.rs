//! report-service: call-statistics reports over RabbitMQ from a memory-mapped data.json.
//!
//! The worker's library, in wings grouped by what they serve. Dependencies point down
//! this list, never up (a wing uses only the wings listed after it), and no two modules
//! depend on each other; `tests/it/architecture.rs` checks both on every `cargo test`.
//!
//! | wing | serves | modules |
//! |---|---|---|
//! | [`app`] | wiring: a [`Config`] to a running service, startup and shutdown order | |
//! | [`config`] | the settings, from variables and flags, each with its range | |
//! | [`delivery`] | the task queue: one delivery to one confirmed answer | `topology`, `consumer`, `pipeline`, `retry`, `outgoing`, `sweeper` |
//! | [`broker`] | RabbitMQ plumbing, no service policy | `session` (lapin), `tls` |
//! | [`engine`] | statistics on demand: cache, single flight, reloads, snapshot | `lookup`, `cache`, `compute`, `reload`, `snapshot` |
//! | [`message`] | the wire contract: task parsing, report JSON | `task`, `report` |
//! | [`data`] | data.json: mapping, validation, the phone index, exact statistics | `segments`, `index`, `scan`, `stats`, ... |
//! | [`ops`] | what operators see: `/health`, `/metrics`, JSON logs | `http`, `health`, `metrics`, `telemetry` |
//! | [`platform`] | process plumbing: clock, shutdown, thread pool, stacks, files | `clock`, `shutdown`, `pool`, `stack`, `heap`, `atomic_file` |
//!
//! Two crates of the workspace live beside this one: `amqp-raw` (the minimal AMQP client
//! the sweeper uses for messages lapin cannot decode) and `report-tools` (the `producer`
//! and `datagen` binaries). The binary `src/bin/report-service.rs` only parses arguments
//! and calls [`app`].
//!
//! The items re-exported below are the front a user of the library needs: start a
//! worker, compute one report without a broker, read its settings. The wings are public
//! for the integration tests, the benches and the tools crate; their items are not a
//! stable API.

pub mod app;
pub mod broker;
pub mod config;
pub mod data;
pub mod delivery;
pub mod engine;
pub mod message;
pub mod ops;
pub mod platform;

pub use app::{Running, report_once, start};
pub use config::Config;
pub use data::{CallStats, DataError, Segments};
pub use engine::Engine;
pub use message::{CorrelationId, Report};
