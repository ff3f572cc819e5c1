//! The fuzz targets' committed corpora replayed through their checks as ordinary tests
//! (no nightly toolchain, no libFuzzer): every input the fuzzer kept must still pass.
//! The checks are the fuzz targets' own files, not copies.

#[path = "../../fuzz/checks/data_index.rs"]
mod data_index;
#[path = "../../fuzz/checks/task_message.rs"]
mod task_message;

/// Runs `check` on every file of `fuzz/corpus/<target>`; returns how many there were.
fn replay(target: &str, check: fn(&[u8])) -> usize {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus").join(target);
    let mut inputs: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.expect("corpus entry").path())
        .collect();
    inputs.sort();
    for input in &inputs {
        let data = std::fs::read(input).expect("corpus input");
        if let Err(panic) = std::panic::catch_unwind(|| check(&data)) {
            std::panic::resume_unwind(Box::new(format!("{}: {panic:?}", input.display())));
        }
    }
    inputs.len()
}

#[test]
fn the_task_message_corpus_passes_its_check() {
    let replayed = replay("task_message", task_message::check);
    assert!(replayed >= 3_000, "{replayed} inputs");
}

#[test]
fn the_data_index_corpus_passes_its_check() {
    let replayed = replay("data_index", data_index::check);
    assert!(replayed >= 1_900, "{replayed} inputs");
}
