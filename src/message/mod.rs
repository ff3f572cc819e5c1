//! The wire contract: task messages in, report messages out (README, "Message contract").
//!
//! No I/O here: the broker wing moves bytes, the delivery wing decides what to send and
//! when to ack; `task` parses what arrives and `report` renders what leaves.

mod report;
mod task;

pub use report::*;
pub use task::*;
