//! Fuzzes `checks/task_message.rs` (what it asserts is written there; the test suite replays the
//! committed corpus through the same check).
#![no_main]

#[path = "../checks/task_message.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::check(data));
