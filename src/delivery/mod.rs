//! The task queue, end to end: which queues the service uses, the consume loop, one
//! delivery to one confirmed answer and its ack decision, retries, and every message the
//! service publishes besides reports' bodies (their properties, dead-letter and retry
//! copies), including the sweep of messages lapin cannot decode.
//!
//! | module | owns |
//! |---|---|
//! | [`topology`] | the service's queues, their arguments, the least permissions it needs |
//! | [`consumer`] | sessions, reconnects with backoff, the drain at shutdown |
//! | [`pipeline`] | one delivery to one confirmed answer; the ack decision (`disposition`) |
//! | [`retry`] | the retry policy: attempts, delays, retry queues (pure) |
//! | [`outgoing`] | the properties of every message the service publishes, and the one property-copy routine (pure) |
//! | [`sweeper`] | moving undecodable messages to the DLQ with the raw client |

pub mod consumer;
pub mod outgoing;
pub mod pipeline;
pub mod retry;
pub mod sweeper;
pub mod topology;

pub use topology::Topology;
