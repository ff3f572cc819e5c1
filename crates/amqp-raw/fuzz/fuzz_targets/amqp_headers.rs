//! Fuzzes `checks/amqp_headers.rs` (what it asserts is written there; the crate's tests
//! replay the committed corpus through the same check).
#![no_main]

#[path = "../checks/amqp_headers.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::check(data));
