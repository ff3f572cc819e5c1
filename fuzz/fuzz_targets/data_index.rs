//! Any bytes as data.json: never a panic or a hang; the serial and the speculative
//! parallel index builds agree (same result, same first error); an accepted file's
//! statistics count exactly its records.
#![no_main]

use libfuzzer_sys::fuzz_target;
use report_service::data::PhoneIndex;
use std::sync::OnceLock;

fn pool() -> &'static rayon::ThreadPool {
    static POOL: OnceLock<rayon::ThreadPool> = OnceLock::new();
    POOL.get_or_init(|| rayon::ThreadPoolBuilder::new().num_threads(2).build().expect("pool"))
}

fuzz_target!(|data: &[u8]| {
    let serial = PhoneIndex::build_in_regions(data, pool(), 1);
    let parallel = PhoneIndex::build_in_regions(data, pool(), 5);
    match (&serial, &parallel) {
        (Ok(a), Ok(b)) => {
            assert_eq!(a.summary().records, b.summary().records);
            assert_eq!(a.summary().negative_durations, b.summary().negative_durations);
            assert_eq!(a.phones(), b.phones());
        }
        (Err(a), Err(b)) => assert_eq!(a.to_string(), b.to_string(), "different first errors"),
        _ => panic!("serial {serial:?} but parallel {parallel:?}"),
    }
});
