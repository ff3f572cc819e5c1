//! The record grammar: one JSON object of the call-record schema at a byte offset.
//!
//! Two parsers agree on every input: a fast path that recognises the compact reference
//! layout (`{"phone":N,"start_date":N,"end_date":N}`) with fixed literals and SWAR digit
//! parsing, and a general parser for any valid JSON object (any whitespace, key order,
//! escaped keys, extra fields of any type). The fast path never fails: when the bytes are
//! not exactly the compact shape it declines and the general parser decides, so every
//! error carries the general parser's exact offset and expectation. The index build
//! reads compact records through a narrower fast path of its own (`compact_indexed`:
//! the phone and the duration's sign only), which declines the same way.
//!
//! This module owns no state and allocates only when skipping nested extra fields.
//!
//! Layout: `compact` (the fast path), `general` (any valid JSON object), `malformed` (what
//! an error says), `lex` (the lexing primitives they share); this file holds the entry
//! points.

mod compact;
mod general;
mod lex;
mod malformed;

#[cfg(test)]
use compact::RECORD_WINDOW;
use compact::compact_indexed;
pub use compact::{PhonePrefix, compact_record};
pub use general::{general_record, skip_value};
pub use malformed::{Expected, Found, Malformed};

pub use lex::{Field, Record, skip_ws};
pub(crate) use malformed::Scan;

/// What indexing needs of a record: its phone and whether its duration is negative.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexedRecord {
    /// The caller's phone.
    pub phone: u64,
    /// Whether `end_date < start_date`.
    pub negative: bool,
}

/// The phone an index scan tries first: files grouped by phone repeat the previous
/// record's phone, and matching its prefix is far cheaper than parsing the record.
#[derive(Debug, Clone, Copy)]
pub struct LastPhone {
    prefix: PhonePrefix,
    /// The previous record's phone. The prefix is rebuilt (formatting the number) only
    /// when a phone repeats: in a time-ordered file consecutive phones rarely do, and
    /// rebuilding it for every record cost a third of the scan.
    previous: u64,
}

impl LastPhone {
    /// No previous record yet (phone 0 is tried first).
    pub fn new() -> LastPhone {
        LastPhone { prefix: PhonePrefix::new(0), previous: 0 }
    }

    /// The previous record's phone.
    pub fn phone(&self) -> u64 {
        self.previous
    }
}

impl Default for LastPhone {
    fn default() -> Self {
        LastPhone::new()
    }
}

/// The record at `pos`, in any valid layout, fully validated; `last` holds the phone of
/// the previous record, tried first because files are often grouped by phone, and is
/// updated.
#[inline(always)]
pub fn index_record(bytes: &[u8], pos: usize, last: &mut LastPhone) -> Scan<(IndexedRecord, usize)> {
    if let Some((ms, end)) = last.prefix.duration::<true>(bytes, pos) {
        return Ok((IndexedRecord { phone: last.prefix.phone(), negative: ms < 0 }, end));
    }
    let (found, end) = match compact_indexed(bytes, pos) {
        Some((phone, negative, end)) => (IndexedRecord { phone, negative }, end),
        None => {
            let (record, end) = record(bytes, pos)?;
            (IndexedRecord { phone: record.phone, negative: record.end_date < record.start_date }, end)
        }
    };
    if found.phone == last.previous && found.phone != last.prefix.phone() {
        last.prefix = PhonePrefix::new(found.phone);
    }
    last.previous = found.phone;
    Ok((found, end))
}

/// The record at `pos`, in any valid layout.
#[inline(always)]
pub fn record(bytes: &[u8], pos: usize) -> Scan<(Record, usize)> {
    match compact_record(bytes, pos) {
        Some(found) => Ok(found),
        None => general_record(bytes, pos),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(text: &str) -> Scan<Record> {
        record(text.as_bytes(), 0).map(|(r, end)| {
            assert_eq!(end, text.len(), "record must end at the closing brace");
            r
        })
    }

    fn err(text: &str) -> (usize, Expected) {
        let e = rec(text).expect_err("must be rejected");
        (e.offset, e.expected)
    }

    const R: Record = Record { phone: 7, start_date: 1000, end_date: 2500 };

    #[test]
    fn compact_layout_takes_the_fast_path() {
        let text = br#"{"phone":7,"start_date":1000,"end_date":2500}"#;
        assert_eq!(compact_record(text, 0), Some((R, text.len())));
    }

    #[test]
    fn any_key_order_whitespace_and_extra_fields_parse_to_the_same_record() {
        for text in [
            r#"{ "end_date" : 2500 , "phone":7,"start_date":1000 }"#,
            "{\n\t\"start_date\": 1000,\r\n \"x\": {\"a\": [1, {\"}\": \"],{\"}], \"b\": null},\n \"phone\": 7, \"end_date\": 2500}",
            r#"{"note":"he said \"},{\" \\ \u00e9 \ud83d\ude00","phone":7,"tags":[true,false,null,-1.5e+3,0,[]],"start_date":1000,"end_date":2500,"o":{}}"#,
            r#"{"ph\u006fne":7,"start_date":1000,"end_date":2500}"#,
            "{\"phone\":7,\"start_date\":1000,\"end_date\":2500,\"é\":\"ü\"}",
        ] {
            assert_eq!(compact_record(text.as_bytes(), 0), None, "{text}");
            assert_eq!(rec(text), Ok(R), "{text}");
        }
    }

    #[test]
    fn phone_bounds_are_u64() {
        assert_eq!(rec(r#"{"phone":18446744073709551615,"start_date":0,"end_date":0}"#).unwrap().phone, u64::MAX);
        assert_eq!(err(r#"{"phone":18446744073709551616,"start_date":0,"end_date":0}"#), (9, Expected::PhoneInteger));
        assert_eq!(err(r#"{"phone":-1,"start_date":0,"end_date":0}"#), (9, Expected::PhoneInteger));
        assert_eq!(err(r#"{"phone":-0,"start_date":0,"end_date":0}"#), (9, Expected::PhoneInteger));
        assert_eq!(err(r#"{"phone":0,"start_date":-0,"end_date":0}"#), (24, Expected::DateInteger));
        assert_eq!(err(r#"{"phone":1.0,"start_date":0,"end_date":0}"#), (9, Expected::PhoneInteger));
        assert_eq!(err(r#"{"phone":1e3,"start_date":0,"end_date":0}"#), (9, Expected::PhoneInteger));
        assert_eq!(err(r#"{"phone":"1","start_date":0,"end_date":0}"#), (9, Expected::PhoneInteger));
        assert_eq!(err(r#"{"phone":01,"start_date":0,"end_date":0}"#), (9, Expected::PhoneInteger));
    }

    #[test]
    fn dates_are_signed_64_bit_integers() {
        let r = rec(r#"{"phone":0,"start_date":-9223372036854775808,"end_date":9223372036854775807}"#).unwrap();
        assert_eq!((r.start_date, r.end_date), (i64::MIN, i64::MAX));
        assert_eq!(err(r#"{"phone":0,"start_date":9223372036854775808,"end_date":0}"#), (24, Expected::DateInteger));
        assert_eq!(err(r#"{"phone":0,"start_date":1.5,"end_date":0}"#), (24, Expected::DateInteger));
        assert_eq!(err(r#"{"phone":0,"start_date":0,"end_date":2E3}"#), (37, Expected::DateInteger));
        assert_eq!(err(r#"{"phone":0,"start_date":null,"end_date":0}"#), (24, Expected::DateInteger));
    }

    #[test]
    fn missing_and_repeated_fields_are_named() {
        assert_eq!(err(r#"{"phone":0,"start_date":0}"#), (0, Expected::Field(Field::EndDate)));
        assert_eq!(err(r#"{}"#), (0, Expected::Field(Field::Phone)));
        assert_eq!(err(r#"{"start_date":0,"end_date":0}"#), (0, Expected::Field(Field::Phone)));
        assert_eq!(
            err(r#"{"phone":0,"phone":1,"start_date":0,"end_date":0}"#),
            (11, Expected::UniqueField(Field::Phone))
        );
    }

    #[test]
    fn broken_syntax_is_reported_where_it_happens() {
        assert_eq!(err(r#"[1]"#), (0, Expected::Record));
        assert_eq!(err(r#"{"phone" 0}"#), (9, Expected::Colon));
        assert_eq!(err(r#"{phone:0}"#), (1, Expected::Key));
        assert_eq!(err(r#"{"phone":0 "start_date":0}"#), (11, Expected::CommaOrObjectEnd));
        assert_eq!(err(r#"{"phone":0,"x":tru,"start_date":0,"end_date":0}"#), (15, Expected::Literal));
        assert_eq!(err(r#"{"phone":0,"x":[1 2],"start_date":0,"end_date":0}"#), (18, Expected::CommaOrNestedArrayEnd));
        assert_eq!(err(r#"{"phone":0,"x":{"a" 1},"start_date":0,"end_date":0}"#), (20, Expected::Colon));
        assert_eq!(err(r#"{"phone":0,"x":"\q","start_date":0,"end_date":0}"#), (17, Expected::Escape));
        assert_eq!(err("{\"phone\":0,\"x\":\"\n\",\"start_date\":0,\"end_date\":0}"), (16, Expected::StringChar));
        assert_eq!(err(r#"{"phone":0,"x":01,"start_date":0,"end_date":0}"#), (16, Expected::CommaOrObjectEnd));
        assert_eq!(err(r#"{"phone":0,"x":1.,"start_date":0,"end_date":0}"#), (17, Expected::Number));
        assert_eq!(err(r#"{"phone":0,"x":-,"start_date":0,"end_date":0}"#), (16, Expected::Number));
        assert_eq!(err(r#"{"phone":0,"x":,"start_date":0,"end_date":0}"#), (15, Expected::Value));
    }

    #[test]
    fn invalid_utf8_in_a_string_is_rejected() {
        let mut text = br#"{"phone":0,"x":"ab"#.to_vec();
        text.extend_from_slice(&[0xFF, b'"', b'}']);
        let e = record(&text, 0).unwrap_err();
        assert_eq!((e.offset, e.expected), (18, Expected::Utf8));
    }

    #[test]
    fn truncation_anywhere_is_an_error_at_end_of_input() {
        let text = r#"{"phone":7,"x":[{"y":"z"}],"start_date":1000,"end_date":2500}"#;
        for cut in 0..text.len() {
            let e = record(&text.as_bytes()[..cut], 0).expect_err("a cut record is never valid");
            assert_eq!(e.found, Found::EndOfInput, "cut at {cut}: {e:?}");
        }
    }

    #[test]
    fn deep_nesting_in_an_ignored_field_does_not_recurse() {
        let depth = 100_000;
        let text =
            format!(r#"{{"x":{}{},"phone":1,"start_date":0,"end_date":0}}"#, "[".repeat(depth), "]".repeat(depth));
        assert_eq!(rec(&text).unwrap().phone, 1);
    }

    #[test]
    fn a_phone_prefix_matches_only_its_own_phone() {
        let record = r#"{"phone":17,"start_date":1684957028364,"end_date":1684957028374}"#;
        let text = format!("{record}{}", " ".repeat(RECORD_WINDOW));
        assert_eq!(PhonePrefix::new(17).duration::<true>(text.as_bytes(), 0), Some((10, record.len())));
        assert_eq!(PhonePrefix::new(1).duration::<true>(text.as_bytes(), 0), None);
        assert_eq!(PhonePrefix::new(170).duration::<true>(text.as_bytes(), 0), None);
        let long = r#"{"phone":18446744073709551615,"start_date":1684957028364,"end_date":1684957074364}"#;
        let text = format!("{long}{}", " ".repeat(RECORD_WINDOW));
        assert_eq!(PhonePrefix::new(u64::MAX).duration::<false>(text.as_bytes(), 0), Some((46_000, long.len())));
        assert_eq!(PhonePrefix::new(u64::MAX - 1).duration::<false>(text.as_bytes(), 0), None);
    }

    #[test]
    fn the_duration_fast_path_needs_thirteen_digit_dates_and_a_full_window() {
        let record = r#"{"phone":17,"start_date":1684957028364,"end_date":1684957074365}"#;
        let padded = format!("{record}{}", " ".repeat(RECORD_WINDOW));
        let phone = PhonePrefix::new(17);
        assert_eq!(phone.duration::<true>(padded.as_bytes(), 0), Some((46_001, record.len())));
        assert_eq!(phone.duration::<false>(padded.as_bytes(), 0), Some((46_001, record.len())));
        assert_eq!(phone.duration::<true>(record.as_bytes(), 0), None, "too close to the end");
        for other in [
            r#"{"phone":17,"start_date":5,"end_date":1684957074365}"#,
            r#"{"phone":17,"start_date":16849570283640,"end_date":1684957074365}"#,
            r#"{"phone":17,"start_date":0684957028364,"end_date":1684957074365}"#,
            r#"{"phone":17,"start_date":168495702836x,"end_date":1684957074365}"#,
        ] {
            let padded = format!("{other}{}", " ".repeat(RECORD_WINDOW));
            assert_eq!(phone.duration::<true>(padded.as_bytes(), 0), None, "{other}");
        }
        // Valid JSON whose literals line up with a thirteen-digit layout: even the
        // unvalidated path must notice the shorter or signed number.
        for other in [
            r#"{"phone":17,"start_date":168495702836 ,"end_date":1684957074365}"#,
            r#"{"phone":17,"start_date":1684957028364,"end_date":168495707436 }"#,
            r#"{"phone":17,"start_date":-684957028364,"end_date":1684957074365}"#,
        ] {
            let padded = format!("{other}{}", " ".repeat(RECORD_WINDOW));
            assert_eq!(phone.duration::<false>(padded.as_bytes(), 0), None, "{other}");
        }
    }

    #[test]
    fn index_record_follows_phone_changes() {
        let record = |phone: u64, ms: u64| {
            format!(r#"{{"phone":{phone},"start_date":1684957028364,"end_date":{}}}"#, 1_684_957_028_364 + ms)
        };
        let records = [record(1, 5), record(2, 7), record(2, 9), record(2, 11), record(1, 13)];
        let text = format!("{}{}", records.join(","), " ".repeat(RECORD_WINDOW));
        let mut last = LastPhone::new();
        let mut pos = 0;
        let mut seen = Vec::new();
        for expected in [1, 2, 2, 2, 1] {
            let (indexed, end) = index_record(text.as_bytes(), pos, &mut last).unwrap();
            assert_eq!((indexed.phone, last.phone()), (expected, expected));
            seen.push(last.prefix.phone());
            pos = end + 1;
        }
        // The prefix follows a phone once it repeats, and not before.
        assert_eq!(seen, [0, 0, 2, 2, 2]);
    }

    /// What `compact_indexed` must say of `text` (padded to a full window), worked out
    /// by the general parser alone.
    fn indexed_by_general(padded: &[u8]) -> Option<(u64, bool, usize)> {
        general_record(padded, 0).ok().map(|(r, end)| (r.phone, r.end_date < r.start_date, end))
    }

    #[test]
    fn the_index_fast_path_reads_compact_records_at_their_limits() {
        let cases: [(&str, u64, bool); 7] = [
            (r#"{"phone":0,"start_date":1684957028364,"end_date":1684957028364}"#, 0, false),
            (r#"{"phone":7,"start_date":1684957028364,"end_date":1684957028363}"#, 7, true),
            (r#"{"phone":12345678,"start_date":1000000000000,"end_date":9999999999999}"#, 12_345_678, false),
            (r#"{"phone":123456789,"start_date":9999999999999,"end_date":1000000000000}"#, 123_456_789, true),
            (r#"{"phone":79001234567,"start_date":1684957028364,"end_date":1684957028365}"#, 79_001_234_567, false),
            (
                r#"{"phone":9999999999999999,"start_date":1684957028365,"end_date":1684957028364}"#,
                9_999_999_999_999_999,
                true,
            ),
            // A duration negative only in the first digit, and only in the last.
            (r#"{"phone":5,"start_date":2684957028364,"end_date":1684957028364}"#, 5, true),
        ];
        for (text, phone, negative) in cases {
            let padded = format!("{text}{}", " ".repeat(RECORD_WINDOW));
            assert_eq!(compact_indexed(padded.as_bytes(), 0), Some((phone, negative, text.len())), "{text}");
            assert_eq!(indexed_by_general(padded.as_bytes()), Some((phone, negative, text.len())), "{text}");
        }
        // Valid, but for the general path: seventeen digits and more, other date widths,
        // whitespace; and a record too close to the end of the input for the window.
        for text in [
            r#"{"phone":18446744073709551615,"start_date":1684957028364,"end_date":1684957028365}"#,
            r#"{"phone":10000000000000000,"start_date":1684957028364,"end_date":1684957028365}"#,
            r#"{"phone":7,"start_date":5,"end_date":1684957028365}"#,
            r#"{"phone":7,"start_date":1684957028364,"end_date":16849570283650}"#,
            r#"{"phone":7, "start_date":1684957028364,"end_date":1684957028365}"#,
        ] {
            let padded = format!("{text}{}", " ".repeat(RECORD_WINDOW));
            assert_eq!(compact_indexed(padded.as_bytes(), 0), None, "{text}");
            assert!(indexed_by_general(padded.as_bytes()).is_some(), "{text}");
        }
        let text = r#"{"phone":7,"start_date":1684957028364,"end_date":1684957028365}"#;
        assert_eq!(compact_indexed(text.as_bytes(), 0), None, "no full window");
    }

    #[test]
    fn the_index_fast_path_never_disagrees_with_the_general_parser_on_any_byte_changed() {
        let records = [
            r#"{"phone":7,"start_date":1684957028364,"end_date":1684957028363}"#,
            r#"{"phone":79001234567,"start_date":1684957028364,"end_date":1684957099999}"#,
            r#"{"phone":1234567812345678,"start_date":1000000000000,"end_date":9999999999999}"#,
        ];
        let substitutes = b"0159-+.eE \"\\,:{}[]ax\x00\xff";
        let mut answered = 0;
        for record in records {
            for at in 0..record.len() {
                for &byte in substitutes.iter() {
                    let mut padded = format!("{record}{}", " ".repeat(RECORD_WINDOW)).into_bytes();
                    padded[at] = byte;
                    if let Some(fast) = compact_indexed(&padded, 0) {
                        assert_eq!(Some(fast), indexed_by_general(&padded), "{}", String::from_utf8_lossy(&padded));
                        answered += 1;
                    }
                }
            }
        }
        // Digits replaced by digits (other than a leading zero) stay valid compact records.
        assert!(answered > 300, "the fast path answered only {answered} variants");
    }
}
