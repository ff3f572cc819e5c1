//! Report messages: the exact JSON clients expect (README, "Message contract").

use super::task::{CorrelationId, InvalidPhones};
use crate::data::stats::CallStats;
use serde::Serialize;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// `status` of a report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Status {
    /// Every requested phone is in `data`.
    Complete,
    /// The task was refused; `error` says why and `data` is empty.
    Error,
}

/// `cnt_att_dur`: calls counted by duration band.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct DurationCounts {
    /// `10_sec`: calls of at most 10 s.
    #[serde(rename = "10_sec")]
    pub up_to_10s: u64,
    /// `10_30_sec`: calls over 10 s and at most 30 s.
    #[serde(rename = "10_30_sec")]
    pub from_10_to_30s: u64,
    /// `30_sec`: calls over 30 s.
    #[serde(rename = "30_sec")]
    pub over_30s: u64,
}

/// One phone's entry in a report's `data`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PhoneReport {
    /// The phone asked for.
    pub phone: u64,
    /// Its calls.
    pub cnt_all_attempts: u64,
    /// Its calls by duration band.
    pub cnt_att_dur: DurationCounts,
    /// The cheapest call's price (`null` without calls).
    pub min_price_att: Option<f64>,
    /// The dearest call's price (`null` without calls).
    pub max_price_att: Option<f64>,
    /// The mean duration in seconds (`null` without calls).
    pub avg_dur_att: Option<f64>,
    /// The total price of calls over 15 s.
    pub sum_price_att_over_15: f64,
}

impl PhoneReport {
    /// The entry for `phone` with statistics `stats`.
    pub fn new(phone: u64, stats: &CallStats) -> PhoneReport {
        PhoneReport {
            phone,
            cnt_all_attempts: stats.records,
            cnt_att_dur: DurationCounts {
                up_to_10s: stats.up_to_10s,
                from_10_to_30s: stats.from_10_to_30s,
                over_30s: stats.over_30s,
            },
            min_price_att: stats.min_price(),
            max_price_att: stats.max_price(),
            avg_dur_att: stats.avg_duration(),
            sum_price_att_over_15: stats.sum_price_over_15s(),
        }
    }
}

/// `error` of an error report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ReportError {
    /// A stable, machine-readable code (README, "Message contract").
    pub code: &'static str,
    /// What was wrong, for a person.
    pub message: String,
}

/// A report message, field order as the starting service wrote it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    /// The task's id, as the task wrote it.
    pub correlation_id: CorrelationId,
    /// Complete or error.
    pub status: Status,
    /// UTC, `%Y-%m-%d %H:%M:%S.%f`.
    pub task_received: String,
    /// Always `report_service`.
    pub from: &'static str,
    /// Always `client`.
    pub to: &'static str,
    /// Why the task was refused (error reports only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<ReportError>,
    /// One entry per requested phone, in the task's order.
    pub data: Vec<PhoneReport>,
    /// Seconds from receipt of the task to the report being ready.
    pub total_duration: f64,
}

impl Report {
    /// A complete report of `data`.
    pub fn complete(
        correlation_id: CorrelationId,
        received: SystemTime,
        data: Vec<PhoneReport>,
        took: Duration,
    ) -> Report {
        Report {
            correlation_id,
            status: Status::Complete,
            task_received: format_timestamp(received),
            from: "report_service",
            to: "client",
            error: None,
            data,
            total_duration: took.as_secs_f64(),
        }
    }

    /// An error report for a task whose phones are invalid.
    pub fn error(correlation_id: CorrelationId, received: SystemTime, error: &InvalidPhones, took: Duration) -> Report {
        Report {
            status: Status::Error,
            error: Some(ReportError { code: error.code(), message: error.to_string() }),
            ..Report::complete(correlation_id, received, Vec::new(), took)
        }
    }

    /// The message body.
    pub fn to_json(&self) -> Vec<u8> {
        // Sized up front: growing by doubling cost more than the serialisation itself.
        let mut out = Vec::with_capacity(256 + 256 * self.data.len());
        // Infallible: writing to a Vec cannot fail, every map key is a string, and no
        // field has a fallible Serialize (non-finite floats are written as null).
        let _ = sonic_rs::to_writer(&mut out, self);
        out
    }
}

/// `2026-11-27 21:22:03.049772` (UTC, microseconds; `%Y-%m-%d %H:%M:%S.%f`). Times
/// before 1970 are written as the epoch.
pub fn format_timestamp(at: SystemTime) -> String {
    let since = at.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (year, month, day) = civil_from_days(secs / 86_400);
    let of_day = secs % 86_400;
    let mut out = String::with_capacity(26);
    let mut put = |value: u64, width: usize, then: &str| {
        let digits = itoa::Buffer::new().format(value).to_owned();
        out.extend(std::iter::repeat_n('0', width.saturating_sub(digits.len())));
        out.push_str(&digits);
        out.push_str(then);
    };
    put(year, 4, "-");
    put(month, 2, "-");
    put(day, 2, " ");
    put(of_day / 3600, 2, ":");
    put(of_day % 3600 / 60, 2, ":");
    put(of_day % 60, 2, ".");
    put(u64::from(since.subsec_micros()), 6, "");
    out
}

/// (year, month, day) of a day count since 1970-01-01 (Howard Hinnant's
/// `civil_from_days`, for non-negative counts).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + u64::from(month <= 2), month, day)
}

/// One phone's entry of a report's `data`, serialised once: a cache hit appends these
/// bytes instead of formatting nine numbers again. Written by hand, the same bytes as
/// serde's `PhoneReport` through sonic-rs (a test holds them equal on any statistics):
/// every miss writes ten of these, and the generic serializer (its key escaping, a
/// growable buffer copied once more into the `Arc`) was about 5 % of the worker's CPU on
/// a load of misses.
pub fn phone_json(phone: u64, stats: &CallStats) -> Arc<[u8]> {
    let mut out = Entry::default();
    out.put(b"{\"phone\":");
    out.int(phone);
    out.put(b",\"cnt_all_attempts\":");
    out.int(stats.records);
    out.put(b",\"cnt_att_dur\":{\"10_sec\":");
    out.int(stats.up_to_10s);
    out.put(b",\"10_30_sec\":");
    out.int(stats.from_10_to_30s);
    out.put(b",\"30_sec\":");
    out.int(stats.over_30s);
    out.put(b"},\"min_price_att\":");
    out.float(stats.min_price());
    out.put(b",\"max_price_att\":");
    out.float(stats.max_price());
    out.put(b",\"avg_dur_att\":");
    out.float(stats.avg_duration());
    out.put(b",\"sum_price_att_over_15\":");
    out.float(Some(stats.sum_price_over_15s()));
    out.put(b"}");
    Arc::from(out.bytes())
}

/// A report entry being written, on the stack: the keys and braces (153 bytes), five
/// integers of at most 20 digits and four floats of at most 24 characters (a sign, 17
/// digits, the point, `e-308`) make at most 349.
struct Entry {
    bytes: [u8; Entry::CAPACITY],
    len: usize,
}

impl Default for Entry {
    fn default() -> Entry {
        Entry { bytes: [0; Entry::CAPACITY], len: 0 }
    }
}

impl Entry {
    const CAPACITY: usize = 352;

    #[inline]
    fn put(&mut self, part: &[u8]) {
        // Cannot overflow (see the type); if it ever did, this panics rather than writes
        // past the buffer, and the task is retried as any panicking task.
        self.bytes[self.len..self.len + part.len()].copy_from_slice(part);
        self.len += part.len();
    }

    #[inline]
    fn int(&mut self, value: u64) {
        self.put(itoa::Buffer::new().format(value).as_bytes());
    }

    /// As sonic-rs writes an `Option<f64>`: `null` for none and for a non-finite value,
    /// else the shortest decimal that reads back as the same double.
    #[inline]
    fn float(&mut self, value: Option<f64>) {
        match value {
            Some(value) if value.is_finite() => self.put(zmij::Buffer::new().format_finite(value).as_bytes()),
            _ => self.put(b"null"),
        }
    }

    fn bytes(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

/// A complete report from pre-serialised phone entries: the same bytes as
/// `Report::complete(..).to_json()` (a test holds them equal), without re-serialising
/// the data. `took` is read last, just before the report is finished.
pub fn complete_report_json<'a>(
    correlation_id: &CorrelationId,
    received: SystemTime,
    phones: impl ExactSizeIterator<Item = &'a [u8]> + Clone,
    took: impl FnOnce() -> Duration,
) -> Vec<u8> {
    let data_len: usize = phones.clone().map(|p| p.len() + 1).sum();
    let mut out = Vec::with_capacity(192 + data_len);
    out.extend_from_slice(b"{\"correlation_id\":");
    // Infallible: writing to a Vec.
    let _ = sonic_rs::to_writer(&mut out, correlation_id);
    out.extend_from_slice(b",\"status\":\"Complete\",\"task_received\":\"");
    out.extend_from_slice(format_timestamp(received).as_bytes());
    out.extend_from_slice(b"\",\"from\":\"report_service\",\"to\":\"client\",\"data\":[");
    for (i, phone) in phones.enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(phone);
    }
    out.extend_from_slice(b"],\"total_duration\":");
    // Infallible: writing a finite float to a Vec.
    let _ = sonic_rs::to_writer(&mut out, &took().as_secs_f64());
    out.push(b'}');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json(report: &Report) -> String {
        String::from_utf8(report.to_json()).expect("utf-8")
    }

    #[test]
    fn a_report_serialises_in_the_contract_format() {
        let mut stats = CallStats::EMPTY;
        for s in [0i64, 10, 11, 30, 31, 120] {
            stats.record(0, s * 1000);
        }
        let received = SystemTime::UNIX_EPOCH + Duration::from_micros(1_795_814_523_049_772);
        let id = CorrelationId::integer("13242421424214").unwrap();
        let report = Report::complete(
            id,
            received,
            vec![PhoneReport::new(1, &stats), PhoneReport::new(2, &CallStats::EMPTY)],
            Duration::from_micros(12_300),
        );
        assert_eq!(
            json(&report),
            concat!(
                r#"{"correlation_id":13242421424214,"status":"Complete","task_received":"2026-11-27 21:22:03.049772","#,
                r#""from":"report_service","to":"client","data":["#,
                r#"{"phone":1,"cnt_all_attempts":6,"cnt_att_dur":{"10_sec":2,"10_30_sec":2,"30_sec":2},"#,
                r#""min_price_att":0.0,"max_price_att":1200.0,"avg_dur_att":33.666666666666664,"sum_price_att_over_15":1810.0},"#,
                r#"{"phone":2,"cnt_all_attempts":0,"cnt_att_dur":{"10_sec":0,"10_30_sec":0,"30_sec":0},"#,
                r#""min_price_att":null,"max_price_att":null,"avg_dur_att":null,"sum_price_att_over_15":0.0}],"#,
                r#""total_duration":0.0123}"#
            )
        );
    }

    #[test]
    fn an_error_report_has_status_error_code_message_and_empty_data() {
        let report = Report::error(
            CorrelationId::Text("x".into()),
            SystemTime::UNIX_EPOCH,
            &InvalidPhones::NotArray,
            Duration::ZERO,
        );
        let text = json(&report);
        assert!(
            text.contains(r#""status":"Error","task_received":"1970-01-01 00:00:00.000000","from":"report_service","to":"client","error":{"code":"phones_not_array","message":"`phones` must be an array of phone numbers"},"data":[],"#),
            "{text}"
        );
    }

    #[test]
    fn timestamps_match_the_time_crate() {
        let format =
            time::macros::format_description!("[year]-[month]-[day] [hour]:[minute]:[second].[subsecond digits:6]");
        for micros in
            [0u64, 1, 951_782_400_000_000, 1_795_814_523_049_772, 4_102_444_799_999_999, 253_402_300_799_999_999]
        {
            let at = SystemTime::UNIX_EPOCH + Duration::from_micros(micros);
            assert_eq!(format_timestamp(at), time::OffsetDateTime::from(at).format(&format).unwrap(), "{micros}");
        }
        assert_eq!(format_timestamp(SystemTime::UNIX_EPOCH - Duration::from_secs(1)), "1970-01-01 00:00:00.000000");
    }

    /// The serde path, the reference the hand-written entry is held to.
    fn serde_entry(phone: u64, stats: &CallStats) -> String {
        sonic_rs::to_string(&PhoneReport::new(phone, stats)).unwrap()
    }

    #[test]
    fn entries_at_the_extremes_are_written_as_serde_writes_them() {
        let extremes = [i64::MIN, i64::MIN + 1, -1, 0, 1, 9_999, 10_000, 10_001, 15_001, 30_001, i64::MAX];
        let mut all = CallStats::EMPTY;
        for &start in &extremes {
            for &end in &extremes {
                let mut one = CallStats::EMPTY;
                one.record(start, end);
                all.record(start, end);
                for phone in [0, 1, 79_000_000_000, u64::MAX] {
                    assert_eq!(String::from_utf8_lossy(&phone_json(phone, &one)), serde_entry(phone, &one));
                }
            }
        }
        let counted =
            CallStats { records: u64::MAX, up_to_10s: u64::MAX, from_10_to_30s: u64::MAX, over_30s: u64::MAX, ..all };
        for stats in [CallStats::EMPTY, all, counted] {
            assert_eq!(String::from_utf8_lossy(&phone_json(u64::MAX, &stats)), serde_entry(u64::MAX, &stats));
        }
        assert_eq!(
            String::from_utf8_lossy(&phone_json(7, &CallStats::EMPTY)),
            concat!(
                r#"{"phone":7,"cnt_all_attempts":0,"cnt_att_dur":{"10_sec":0,"10_30_sec":0,"30_sec":0},"#,
                r#""min_price_att":null,"max_price_att":null,"avg_dur_att":null,"sum_price_att_over_15":0.0}"#
            ),
            "and as the contract says, independently of serde"
        );
    }

    /// No statistic is ever infinite or NaN (prices and the mean are an i128 over a
    /// positive divisor), but if one were, the entry would stay JSON: `null`, as sonic-rs
    /// writes it.
    #[test]
    fn a_float_that_is_not_finite_is_written_as_null_as_serde_writes_it() {
        for value in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            let mut entry = Entry::default();
            entry.float(Some(value));
            assert_eq!(entry.bytes(), b"null");
            assert_eq!(sonic_rs::to_string(&Some(value)).unwrap(), "null");
        }
    }

    use proptest::prelude::*;

    proptest! {
        /// Any statistics at all (fields set directly, not only reachable by recording
        /// calls): the hand-written entry is serde's, byte for byte.
        #[test]
        fn any_entry_is_written_as_serde_writes_it(
            phone: u64,
            counts: (u64, u64, u64, u64),
            ms: (i128, i128, i128, i128),
            small in (-1_000_000_000i128..1_000_000_000, 1u64..1_000),
        ) {
            let wide = CallStats {
                records: counts.0, up_to_10s: counts.1, from_10_to_30s: counts.2, over_30s: counts.3,
                min_ms: ms.0, max_ms: ms.1, total_ms: ms.2, over_15s_total_ms: ms.3,
            };
            let usual = CallStats { records: small.1, min_ms: small.0, max_ms: small.0 + 1, total_ms: small.0 * 3, over_15s_total_ms: small.0.abs(), ..wide };
            for stats in [wide, usual] {
                let entry = String::from_utf8(phone_json(phone, &stats).to_vec()).unwrap();
                prop_assert_eq!(entry, serde_entry(phone, &stats));
            }
        }

        #[test]
        fn any_timestamp_matches_the_time_crate(micros in 0u64..253_402_300_799_999_999) {
            let format = time::macros::format_description!("[year]-[month]-[day] [hour]:[minute]:[second].[subsecond digits:6]");
            let at = SystemTime::UNIX_EPOCH + Duration::from_micros(micros);
            prop_assert_eq!(format_timestamp(at), time::OffsetDateTime::from(at).format(&format).unwrap());
        }

        /// The fast path (cached entries, hand-written envelope) writes exactly the bytes
        /// of the serde path.
        #[test]
        fn pre_serialised_reports_equal_serde_reports(
            durations in prop::collection::vec(prop::collection::vec(-5_000i64..200_000, 0..5), 0..12),
            id in prop_oneof![
                (-1_000_000_000_000i64..1_000_000_000_000).prop_map(|n| n.to_string()),
                "[ -~]{1,20}|[\\u{80}-\\u{10FFFF}\"\\\\]{1,8}".prop_map(String::from),
            ],
            micros in 0u64..4_102_444_799_999_999,
            took_ns in 0u64..100_000_000_000,
        ) {
            let id = CorrelationId::integer(&id).unwrap_or(CorrelationId::Text(id));
            let stats: Vec<CallStats> = durations.iter().map(|ds| {
                let mut s = CallStats::EMPTY;
                for &d in ds { s.record(0, d); }
                s
            }).collect();
            let at = SystemTime::UNIX_EPOCH + Duration::from_micros(micros);
            let took = Duration::from_nanos(took_ns);
            let data = stats.iter().enumerate().map(|(p, s)| PhoneReport::new(p as u64 * 7, s)).collect();
            let reference = Report::complete(id.clone(), at, data, took).to_json();
            let entries: Vec<Arc<[u8]>> = stats.iter().enumerate().map(|(p, s)| phone_json(p as u64 * 7, s)).collect();
            let fast = complete_report_json(&id, at, entries.iter().map(|e| &e[..]), || took);
            prop_assert_eq!(String::from_utf8_lossy(&fast), String::from_utf8_lossy(&reference));
        }
    }
}
