//! Fuzzes `checks/data_index.rs` (what it asserts is written there; the test suite replays the
//! committed corpus through the same check).
#![no_main]

#[path = "../checks/data_index.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::check(data));
