//! The `amqp_headers` fuzz target's committed corpus replayed through its check as an
//! ordinary test (no nightly toolchain, no libFuzzer). The check is the fuzz target's own
//! file, not a copy.

#[path = "../fuzz/checks/amqp_headers.rs"]
mod amqp_headers;

#[test]
fn the_amqp_headers_corpus_passes_its_check() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    let mut inputs: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.expect("corpus entry").path())
        .collect();
    inputs.sort();
    for input in &inputs {
        let data = std::fs::read(input).expect("corpus input");
        if let Err(panic) = std::panic::catch_unwind(|| amqp_headers::check(&data)) {
            std::panic::resume_unwind(Box::new(format!("{}: {panic:?}", input.display())));
        }
    }
    assert!(inputs.len() >= 500, "{} inputs", inputs.len());
}
