//! Every kind of malformed data.json stops indexing with the byte offset and what was
//! expected, on the serial and the parallel build, and the CLI exits non-zero.

use crate::support;

use report_service::data::{BuildShape, DataError, Dataset, Expected, Field, Found};
use report_tools::datagen::{self, Options};
use std::process::Command;
use support::{pool, temp_file};

const GOOD: &str = r#"{"phone":1,"start_date":1000,"end_date":2000}"#;

fn open(bytes: &[u8], regions: usize) -> Result<Dataset, DataError> {
    let (_dir, path) = temp_file(bytes);
    Dataset::open_with(&path, &pool(2), Some(BuildShape { regions, bucket_bits: 2, few_phones: 4096 }))
}

/// Offset, expectation and what was found, identical for 1 and 4 regions.
fn malformed(text: &str) -> (u64, Expected, Found) {
    let mut seen = None;
    for regions in [1, 4] {
        let found = match open(text.as_bytes(), regions) {
            Err(DataError::Malformed { offset, expected, found }) => (offset, expected, found),
            other => panic!("{text:?}: expected a malformed-data error, got {other:?}"),
        };
        assert!(seen.is_none_or(|s| s == found), "{text:?}: serial and parallel builds disagree");
        seen = Some(found);
    }
    seen.expect("checked above")
}

#[test]
fn a_file_that_is_not_json_is_rejected_at_byte_zero() {
    assert_eq!(malformed("phone,start_date,end_date\n1,2,3\n"), (0, Expected::ArrayStart, Found::Byte(b'p')));
}

#[test]
fn an_empty_file_is_rejected_as_truncated() {
    assert_eq!(malformed(""), (0, Expected::ArrayStart, Found::EndOfInput));
    assert_eq!(malformed("  \n"), (3, Expected::ArrayStart, Found::EndOfInput));
}

#[test]
fn a_json_value_that_is_not_an_array_is_rejected() {
    assert_eq!(malformed(GOOD), (0, Expected::ArrayStart, Found::Byte(b'{')));
    assert_eq!(malformed("\"records\""), (0, Expected::ArrayStart, Found::Byte(b'"')));
}

#[test]
fn an_array_element_that_is_not_an_object_is_rejected() {
    assert_eq!(malformed(&format!("[{GOOD}, 5]")), (48, Expected::Record, Found::Byte(b'5')));
}

#[test]
fn a_record_missing_a_field_is_rejected_at_its_start() {
    let text = format!(r#"[{GOOD},{{"phone":2,"end_date":5}}]"#);
    assert_eq!(malformed(&text), (47, Expected::Field(Field::StartDate), Found::Byte(b'{')));
}

#[test]
fn a_non_integer_or_negative_phone_is_rejected_at_the_value() {
    for (value, found) in [("1.5", b'1'), ("-3", b'-'), ("\"7\"", b'"'), ("null", b'n'), ("1e2", b'1')] {
        let text = format!(r#"[{GOOD},{{"phone":{value},"start_date":0,"end_date":0}}]"#);
        assert_eq!(malformed(&text), (56, Expected::PhoneInteger, Found::Byte(found)), "{value}");
    }
}

#[test]
fn a_float_date_is_rejected_at_the_value() {
    let text = format!(r#"[{GOOD},{{"phone":2,"start_date":1684957028364.5,"end_date":0}}]"#);
    assert_eq!(malformed(&text), (71, Expected::DateInteger, Found::Byte(b'1')));
}

#[test]
fn a_truncated_file_is_rejected_at_its_end() {
    let text = format!("[{GOOD},{GOOD}");
    let cut = &text[..text.len() - 5];
    assert_eq!(malformed(cut), (cut.len() as u64, Expected::DateInteger, Found::EndOfInput));
    assert_eq!(malformed(&text), (text.len() as u64, Expected::CommaOrArrayEnd, Found::EndOfInput));
}

#[test]
fn trailing_garbage_after_the_array_is_rejected() {
    let text = format!("[{GOOD}]\n,[]");
    assert_eq!(malformed(&text), (48, Expected::EndOfInput, Found::Byte(b',')));
}

#[test]
fn an_empty_array_is_a_valid_empty_dataset() {
    let dataset = open(b" [ ] \n", 1).expect("valid");
    assert_eq!(dataset.index().summary().records, 0);
}

/// A large file, so the parallel build cuts it into regions; the first of two errors
/// is the one reported, wherever the regions fall.
#[test]
fn the_parallel_build_reports_the_first_error_in_file_order() {
    let mut bytes = Vec::new();
    datagen::generate(&Options { phones: 20, per_phone: 5_000, ..Options::default() }, &mut bytes, &|_| {})
        .expect("generate");
    assert!(bytes.len() > 6 << 20, "big enough for several regions: {}", bytes.len());
    let first = bytes.len() * 2 / 3;
    let first = first + bytes[first..].iter().position(|&b| b == b':').expect("a colon") + 1;
    let second = bytes.len() * 5 / 6;
    let second = second + bytes[second..].iter().position(|&b| b == b':').expect("a colon") + 1;
    bytes[first] = b'x';
    bytes[second] = b'x';
    let (_dir, path) = temp_file(&bytes);
    match Dataset::open(&path, &pool(2)) {
        Err(DataError::Malformed { offset, found: Found::Byte(b'x'), .. }) => assert_eq!(offset, first as u64),
        other => panic!("expected the error at byte {first}, got {other:?}"),
    }
}

#[test]
fn the_report_command_exits_non_zero_naming_the_offset() {
    let (_dir, path) = temp_file(format!(r#"[{GOOD},{{"phone":2}}"#).as_bytes());
    let out = Command::new(env!("CARGO_BIN_EXE_report-service"))
        .args(["report", "--phones", "1", "--data"])
        .arg(&path)
        .output()
        .expect("run report-service");
    assert!(!out.status.success());
    assert!(out.stdout.is_empty(), "nothing on stdout: {:?}", String::from_utf8_lossy(&out.stdout));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("malformed data at byte 47: expected a `start_date` field"), "{stderr}");
}

#[test]
fn the_report_command_prints_exactly_one_report_object() {
    let (_dir, path) = temp_file(format!("[{GOOD},{GOOD}]").as_bytes());
    let out = Command::new(env!("CARGO_BIN_EXE_report-service"))
        .args(["report", "--phones", "1,9,1", "--correlation-id", "77", "--data"])
        .arg(&path)
        .output()
        .expect("run report-service");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object on stdout");
    assert_eq!(report["correlation_id"], 77);
    assert_eq!(report["status"], "Complete");
    assert_eq!(report["data"][0]["cnt_all_attempts"], 2);
    assert_eq!(report["data"][0]["avg_dur_att"], 1.0);
    assert_eq!(report["data"][1]["phone"], 9);
    assert_eq!(report["data"][1]["min_price_att"], serde_json::Value::Null);
    assert_eq!(report["data"].as_array().map(Vec::len), Some(2));
}
