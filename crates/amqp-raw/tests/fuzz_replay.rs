//! The `amqp_headers` fuzz target's committed corpus replayed through its check as an
//! ordinary test (no nightly toolchain, no libFuzzer). The check is the fuzz target's own
//! file, not a copy.

#[path = "../fuzz/checks/amqp_headers.rs"]
mod amqp_headers;
#[path = "../fuzz/checks/replay.rs"]
mod replay;

#[test]
fn the_amqp_headers_corpus_passes_its_check() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    let replayed = replay::replay(&dir, amqp_headers::check);
    assert!(replayed >= 500, "{replayed} inputs");
}
