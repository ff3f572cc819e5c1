//! The wire contract: task messages in, report messages out (README, "Message contract").
//!
//! No I/O here: the broker module moves bytes, the service module decides.

mod report;
mod task;

pub use report::*;
pub use task::*;
