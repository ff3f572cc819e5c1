//! The wire contract: task messages in, report messages out (SPEC section 4).
//!
//! Parsing a task classifies every body into a usable task (possibly with invalid
//! phones, which earns an error report) or a rejection (which is dead-lettered).
//! Building a report turns per-phone statistics into the exact JSON clients expect.
//! No I/O here: the broker module moves bytes, the service module decides.

use crate::stats::CallStats;
use serde::Serialize;
use sonic_rs::{JsonContainerTrait, JsonValueTrait, RawNumber, Value};
use std::time::{Duration, SystemTime};

/// The id a client matches its report by, echoed with its JSON type.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum CorrelationId {
    /// A JSON integer, kept as its exact text (any size).
    Integer(RawNumber),
    Text(String),
}

impl CorrelationId {
    /// An integer id from its decimal text (`-`? digits), as given on a command line.
    pub fn integer(text: &str) -> Option<CorrelationId> {
        is_integer_literal(text).then(|| sonic_rs::from_str(text).ok().map(CorrelationId::Integer)).flatten()
    }

    /// The id as the AMQP `correlation_id` property carries it.
    pub fn as_property(&self) -> &str {
        match self {
            CorrelationId::Integer(n) => n.as_str(),
            CorrelationId::Text(s) => s,
        }
    }
}

impl Serialize for CorrelationId {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            CorrelationId::Integer(n) => n.serialize(serializer),
            CorrelationId::Text(s) => serializer.serialize_str(s),
        }
    }
}

/// `-`? (`0` | [1-9][0-9]*)
fn is_integer_literal(text: &str) -> bool {
    let digits = text.strip_prefix('-').unwrap_or(text);
    !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) && (digits == "0" || !digits.starts_with('0'))
}

/// Input limits (from configuration).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_task_bytes: usize,
    pub max_phones: usize,
}

/// Why a message cannot be answered at all (it goes to the dead-letter queue).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    #[error("body is {size} bytes, over the {limit}-byte limit")]
    TooLarge { size: usize, limit: usize },
    #[error("body is not JSON: {detail}")]
    NotJson { detail: String },
    #[error("no usable correlation id in the body or the AMQP properties")]
    NoCorrelationId,
}

impl Rejection {
    /// Stable reason code, used in dead-letter headers and metrics labels.
    pub fn code(&self) -> &'static str {
        match self {
            Rejection::TooLarge { .. } => "too_large",
            Rejection::NotJson { .. } => "not_json",
            Rejection::NoCorrelationId => "no_correlation_id",
        }
    }
}

/// Why a task's `phones` cannot be served (answered with an error report).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidPhones {
    #[error("the task has no `phones` field")]
    Missing,
    #[error("`phones` must be an array of phone numbers")]
    NotArray,
    #[error("phones[{index}] is {value}; expected a non-negative integer no larger than 18446744073709551615")]
    BadEntry { index: usize, value: String },
    #[error("the task has {count} phones; at most {limit} are allowed")]
    TooMany { count: usize, limit: usize },
}

impl InvalidPhones {
    pub fn code(&self) -> &'static str {
        match self {
            InvalidPhones::Missing => "missing_phones",
            InvalidPhones::NotArray => "phones_not_array",
            InvalidPhones::BadEntry { .. } => "invalid_phone",
            InvalidPhones::TooMany { .. } => "too_many_phones",
        }
    }
}

/// A task that can be answered: a report, or an error report for bad phones.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Task {
    pub correlation_id: CorrelationId,
    /// Distinct phones in first-seen order, or why they cannot be served.
    pub phones: Result<Vec<u64>, InvalidPhones>,
}

/// Parses a task body. `property_id` is the AMQP `correlation_id` property, used when
/// the body has no usable one (an integer or a non-empty string).
pub fn parse_task(body: &[u8], property_id: Option<&str>, limits: Limits) -> Result<Task, Rejection> {
    if body.len() > limits.max_task_bytes {
        return Err(Rejection::TooLarge { size: body.len(), limit: limits.max_task_bytes });
    }
    let doc: Value = sonic_rs::from_slice(body).map_err(|e| Rejection::NotJson { detail: e.to_string() })?;
    let correlation_id = body_correlation_id(body, &doc)
        .or_else(|| property_id.filter(|id| !id.is_empty()).map(|id| CorrelationId::Text(id.to_owned())))
        .ok_or(Rejection::NoCorrelationId)?;
    Ok(Task { correlation_id, phones: phones_of(&doc, limits.max_phones) })
}

fn body_correlation_id(body: &[u8], doc: &Value) -> Option<CorrelationId> {
    let value = doc.as_object()?.get(&"correlation_id")?;
    if let Some(text) = value.as_str() {
        return (!text.is_empty()).then(|| CorrelationId::Text(text.to_owned()));
    }
    if value.is_number() {
        // The DOM holds numbers as u64/i64/f64; the exact text comes from the body.
        let raw = sonic_rs::get_from_slice(body, &["correlation_id"]).ok()?;
        return CorrelationId::integer(raw.as_raw_str());
    }
    None
}

fn phones_of(doc: &Value, max_phones: usize) -> Result<Vec<u64>, InvalidPhones> {
    let value = doc.as_object().and_then(|o| o.get(&"phones")).ok_or(InvalidPhones::Missing)?;
    let entries = value.as_array().ok_or(InvalidPhones::NotArray)?;
    if entries.len() > max_phones {
        return Err(InvalidPhones::TooMany { count: entries.len(), limit: max_phones });
    }
    let phones = entries
        .iter()
        .enumerate()
        .map(|(index, entry)| entry.as_u64().ok_or_else(|| InvalidPhones::BadEntry { index, value: excerpt(entry) }))
        .collect::<Result<Vec<u64>, _>>()?;
    Ok(dedup_phones(phones))
}

/// Drops repeated phones, keeping the first occurrence of each in order.
pub fn dedup_phones(phones: impl IntoIterator<Item = u64>) -> Vec<u64> {
    let mut seen = ahash::AHashSet::new();
    phones.into_iter().filter(|phone| seen.insert(*phone)).collect()
}

/// A short JSON rendering of a bad value for an error message.
fn excerpt(value: &Value) -> String {
    let mut text = sonic_rs::to_string(value).unwrap_or_else(|_| "a value".to_owned());
    if text.len() > 64 {
        let cut = (0..=61).rev().find(|&i| text.is_char_boundary(i)).unwrap_or(0);
        text.truncate(cut);
        text.push_str("...");
    }
    text
}

/// `status` of a report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Status {
    Complete,
    Error,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct DurationCounts {
    #[serde(rename = "10_sec")]
    pub up_to_10s: u64,
    #[serde(rename = "10_30_sec")]
    pub from_10_to_30s: u64,
    #[serde(rename = "30_sec")]
    pub over_30s: u64,
}

/// One phone's entry in a report's `data`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PhoneReport {
    pub phone: u64,
    pub cnt_all_attempts: u64,
    pub cnt_att_dur: DurationCounts,
    pub min_price_att: Option<f64>,
    pub max_price_att: Option<f64>,
    pub avg_dur_att: Option<f64>,
    pub sum_price_att_over_15: f64,
}

impl PhoneReport {
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
    pub code: &'static str,
    pub message: String,
}

/// A report message, field order as the starting service wrote it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    pub correlation_id: CorrelationId,
    pub status: Status,
    /// UTC, `%Y-%m-%d %H:%M:%S.%f`.
    pub task_received: String,
    pub from: &'static str,
    pub to: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<ReportError>,
    pub data: Vec<PhoneReport>,
    /// Seconds from receipt of the task to the report being ready.
    pub total_duration: f64,
}

impl Report {
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

    pub fn error(correlation_id: CorrelationId, received: SystemTime, error: &InvalidPhones, took: Duration) -> Report {
        Report {
            status: Status::Error,
            error: Some(ReportError { code: error.code(), message: error.to_string() }),
            ..Report::complete(correlation_id, received, Vec::new(), took)
        }
    }

    /// The message body.
    pub fn to_json(&self) -> Vec<u8> {
        // Infallible: writing to a Vec cannot fail, every map key is a string, and no
        // field has a fallible Serialize (non-finite floats are written as null).
        sonic_rs::to_vec(self).unwrap_or_default()
    }
}

/// `2026-11-27 21:22:03.049772` (UTC, microseconds).
pub fn format_timestamp(at: SystemTime) -> String {
    let format =
        time::macros::format_description!("[year]-[month]-[day] [hour]:[minute]:[second].[subsecond digits:6]");
    time::OffsetDateTime::from(at).format(&format).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits { max_task_bytes: 1024, max_phones: 8 };

    fn task(body: &str) -> Result<Task, Rejection> {
        parse_task(body.as_bytes(), None, LIMITS)
    }

    fn json(report: &Report) -> String {
        String::from_utf8(report.to_json()).expect("utf-8")
    }

    #[test]
    fn a_task_echoes_its_integer_id_exactly_and_dedups_phones_in_first_seen_order() {
        let t = task(r#"{"correlation_id": 13242421424214, "phones": [1, 2, 3, 3, 5, 1, 0]}"#).unwrap();
        assert_eq!(t.correlation_id.as_property(), "13242421424214");
        assert_eq!(t.phones, Ok(vec![1, 2, 3, 5, 0]));
        let huge = task(r#"{"correlation_id": 123456789012345678901234567890, "phones": []}"#).unwrap();
        assert_eq!(huge.correlation_id.as_property(), "123456789012345678901234567890");
    }

    #[test]
    fn string_ids_stay_strings_and_the_property_is_the_fallback() {
        let t = task(r#"{"correlation_id": "abc-1", "phones": [79161234567]}"#).unwrap();
        assert_eq!(t.correlation_id, CorrelationId::Text("abc-1".into()));
        assert_eq!(t.phones, Ok(vec![79_161_234_567]));
        let from_property = parse_task(br#"{"phones": [1]}"#, Some("p-7"), LIMITS).unwrap();
        assert_eq!(from_property.correlation_id, CorrelationId::Text("p-7".into()));
        let float_id = parse_task(br#"{"correlation_id": 1.5, "phones": [1]}"#, Some("p-8"), LIMITS).unwrap();
        assert_eq!(float_id.correlation_id, CorrelationId::Text("p-8".into()));
    }

    #[test]
    fn unusable_bodies_are_rejected_with_a_reason() {
        assert_eq!(task("").unwrap_err().code(), "not_json");
        assert_eq!(task("hello").unwrap_err().code(), "not_json");
        assert_eq!(task(r#"{"correlation_id": 1, "phones": [1"#).unwrap_err().code(), "not_json");
        assert_eq!(parse_task(b"{\"correlation_id\": \"\xff\"}", None, LIMITS).unwrap_err().code(), "not_json");
        assert_eq!(task("[1, 2]").unwrap_err(), Rejection::NoCorrelationId);
        assert_eq!(task(r#"{"phones": [1]}"#).unwrap_err(), Rejection::NoCorrelationId);
        assert_eq!(task(r#"{"correlation_id": "", "phones": [1]}"#).unwrap_err(), Rejection::NoCorrelationId);
        assert_eq!(task(r#"{"correlation_id": null, "phones": [1]}"#).unwrap_err(), Rejection::NoCorrelationId);
        let big = format!(r#"{{"correlation_id": 1, "phones": [{}]}}"#, "1,".repeat(600));
        assert_eq!(task(&big).unwrap_err(), Rejection::TooLarge { size: big.len(), limit: 1024 });
    }

    #[test]
    fn bad_phones_are_named_by_code() {
        let code = |body: &str| task(body).unwrap().phones.unwrap_err().code();
        assert_eq!(code(r#"{"correlation_id": 1}"#), "missing_phones");
        assert_eq!(code(r#"{"correlation_id": 1, "phones": "1,2"}"#), "phones_not_array");
        assert_eq!(code(r#"{"correlation_id": 1, "phones": null}"#), "phones_not_array");
        assert_eq!(code(r#"{"correlation_id": 1, "phones": [1, -2]}"#), "invalid_phone");
        assert_eq!(code(r#"{"correlation_id": 1, "phones": [1.5]}"#), "invalid_phone");
        assert_eq!(code(r#"{"correlation_id": 1, "phones": [1.0]}"#), "invalid_phone");
        assert_eq!(code(r#"{"correlation_id": 1, "phones": ["3"]}"#), "invalid_phone");
        assert_eq!(code(r#"{"correlation_id": 1, "phones": [18446744073709551616]}"#), "invalid_phone");
        assert_eq!(code(r#"{"correlation_id": 1, "phones": [1,2,3,4,5,6,7,8,9]}"#), "too_many_phones");
        let message = task(r#"{"correlation_id": 1, "phones": [1, "x"]}"#).unwrap().phones.unwrap_err().to_string();
        assert!(message.starts_with(r#"phones[1] is "x";"#), "{message}");
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
}
