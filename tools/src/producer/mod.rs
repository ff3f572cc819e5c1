//! The client side: sending tasks, the starting service's sample tasks, a load test
//! with latency percentiles, and a bare echo consumer that measures what the broker
//! alone can do. Used by the `producer` binary and by the tests.
//!
//! Clients declare the task queue exactly as the starting service's clients did (plain
//! durable, no arguments) and receive replies on their own exclusive, server-named queue.
//! The load test lives in `load`, the echo baseline in `echo`.

mod client;
mod echo;
mod freshness;
mod load;

pub use echo::echo;
pub use freshness::{Freshness, FreshnessError, FreshnessOptions, freshness};
pub use load::{Latency, LoadOptions, LoadSummary, Progress, load};

pub use client::{Client, ClientError, FIRST_SAMPLE_ID, SAMPLE_TASKS, is_error_report, send_one, task_body};
