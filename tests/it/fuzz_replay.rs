//! The fuzz targets' committed corpora replayed through their checks as ordinary tests
//! (no nightly toolchain, no libFuzzer): every input the fuzzer kept must still pass.
//! The checks are the fuzz targets' own files, not copies.

#[path = "../../fuzz/checks/data_index.rs"]
mod data_index;
#[path = "../../fuzz/checks/task_message.rs"]
mod task_message;
// The replay loop the raw client's crate uses for its own corpus.
#[path = "../../crates/amqp-raw/fuzz/checks/replay.rs"]
mod replay;

/// Runs `check` on every file of `fuzz/corpus/<target>`; returns how many there were.
fn replay_target(target: &str, check: fn(&[u8])) -> usize {
    replay::replay(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus").join(target), check)
}

#[test]
fn the_task_message_corpus_passes_its_check() {
    let replayed = replay_target("task_message", task_message::check);
    assert!(replayed >= 3_000, "{replayed} inputs");
}

#[test]
fn the_data_index_corpus_passes_its_check() {
    let replayed = replay_target("data_index", data_index::check);
    assert!(replayed >= 1_900, "{replayed} inputs");
}
