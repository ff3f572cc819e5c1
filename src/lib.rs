//! report-service: call-statistics reports over RabbitMQ from a memory-mapped data.json.
//!
//! Layout, from the bytes up:
//!
//! - [`data`]: data.json mapped read-only, validated and indexed once (phone -> spans).
//! - [`stats`]: exact per-phone aggregation in integer milliseconds; pure.
//! - [`compute`]: the statistics of a list of phones, in parallel on a rayon pool.
//! - [`message`]: the wire contract (task parsing, report JSON).
//! - [`datagen`]: deterministic data.json generation for tests, benches and users.
//! - [`cpu`]: the startup check for the CPU features the build assumes.
//!
//! The binaries in `src/bin` only parse arguments and call into these modules.

pub mod compute;
pub mod cpu;
pub mod data;
pub mod datagen;
pub mod message;
pub mod stats;
