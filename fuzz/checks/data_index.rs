//! The `data_index` fuzz target's check, shared with the corpus replay in the test suite
//! (`tests/it/fuzz_replay.rs`): any bytes as data.json: never a panic or a hang; the
//! serial, single-bucket build and the speculative parallel, bucketed ones, with regions
//! keeping per-phone lists to the end or moving them into buckets part way, agree (same
//! phones and spans, or the same first error).

use report_service::data::{BuildShape, DataError, PhoneIndex};
use report_service::platform::pool::WorkerPool;
use std::sync::OnceLock;

fn pool() -> &'static WorkerPool {
    static POOL: OnceLock<WorkerPool> = OnceLock::new();
    POOL.get_or_init(|| WorkerPool::new("fuzz", 2).expect("pool"))
}

pub(crate) fn check(data: &[u8]) {
    let serial = PhoneIndex::build_shaped(data, pool(), BuildShape { regions: 1, bucket_bits: 0, few_phones: 0 });
    for few_phones in [2, 4096] {
        let parallel = PhoneIndex::build_shaped(data, pool(), BuildShape { regions: 5, bucket_bits: 3, few_phones });
        agree(&serial, &parallel);
    }
}

fn agree(serial: &Result<PhoneIndex, DataError>, parallel: &Result<PhoneIndex, DataError>) {
    match (serial, parallel) {
        (Ok(a), Ok(b)) => {
            assert_eq!(a.summary().records, b.summary().records);
            assert_eq!(a.summary().negative_durations, b.summary().negative_durations);
            let mut phones = b.phones().to_vec();
            phones.sort_unstable();
            assert_eq!(a.phones(), phones, "the same phones");
            for &phone in &phones {
                assert_eq!(a.spans(phone), b.spans(phone), "the same spans of {phone}");
            }
        }
        (Err(a), Err(b)) => assert_eq!(a.to_string(), b.to_string(), "different first errors"),
        _ => panic!("serial {serial:?} but parallel {parallel:?}"),
    }
}
