//! The `task_message` fuzz target's check, shared with the corpus replay in the test
//! suite (`tests/it/fuzz_replay.rs`): any bytes as a task body, with and without an AMQP
//! correlation id: never a panic (nor a stack overflow: fuzz it with bodies up to
//! MAX_TASK_BYTES, `-max_len=1048576`), and every accepted task satisfies the contract's
//! invariants.

use report_service::message::{Limits, MAX_TASK_DEPTH, nesting_exceeds, parse_task};

pub(crate) fn check(data: &[u8]) {
    let limits = Limits { max_task_bytes: 1 << 20, max_phones: 64 };
    for property in [None, Some("from-property")] {
        if let Ok(task) = parse_task(data, property, limits) {
            assert!(!nesting_exceeds(data, MAX_TASK_DEPTH), "a body nested too deep was parsed");
            let id = task.correlation_id.as_property();
            assert!(!id.is_empty() && id.len() <= 255, "unusable id accepted: {id:?}");
            if let Ok(phones) = &task.phones {
                assert!(phones.len() <= limits.max_phones);
                let mut distinct = phones.clone();
                distinct.sort_unstable();
                distinct.dedup();
                assert_eq!(distinct.len(), phones.len(), "duplicates kept");
            }
        }
    }
}
