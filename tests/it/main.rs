//! The integration tests, one binary (as zero-to-production's `tests/api/`): each
//! module tests one face of the service; `support` holds the reference implementation,
//! the broker client, the child-process harness and the TCP proxy they share.
//!
//! Tests that talk to the broker run side by side on their own randomly named queues;
//! the one that restarts the broker waits for the broker to itself (`support::broker`).

mod architecture;
mod cluster;
mod datagen;
mod differential;
mod faults;
mod fuzz_replay;
mod golden;
mod hostile;
mod malformed_data;
mod monitoring;
mod persisted_index;
mod producer;
mod production;
mod reload;
mod segments;
mod service;
mod shutdown;
mod support;
