//! Replaying a fuzz target's committed corpus through its check as an ordinary test (no
//! nightly toolchain, no libFuzzer). Shared, by `#[path]`, by the replay tests of this
//! crate (`tests/fuzz_replay.rs`) and of the service (`tests/it/fuzz_replay.rs`).

/// Runs `check` on every file in `dir`, in name order; a panic names the input. Returns
/// how many inputs there were.
pub(crate) fn replay(dir: &std::path::Path, check: fn(&[u8])) -> usize {
    let mut inputs: Vec<_> = std::fs::read_dir(dir)
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
