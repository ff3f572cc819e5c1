//! Task messages: classifying a body as a task to answer (perhaps with invalid phones,
//! which earns an error report) or a message to dead-letter.
//!
//! Everything here is bounded by the body's size and by [`MAX_TASK_DEPTH`]: nesting is
//! checked by an iterative scan before any recursive parse (sonic-rs's DOM parse recurses
//! once per level, so a 200 KB body of `[` would overflow any thread's stack), and every
//! rendering of a client's value in an error message is cut short.

use serde::Serialize;
use sonic_rs::{JsonContainerTrait, JsonValueTrait, RawNumber, Value};

/// A task's id, echoed in its report exactly as the task wrote it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum CorrelationId {
    /// A JSON integer, kept as its exact text (any size).
    Integer(RawNumber),
    /// A JSON string (1 to 255 bytes).
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
    /// `MAX_TASK_BYTES`: larger bodies are dead-lettered unread.
    pub max_task_bytes: usize,
    /// `MAX_PHONES_PER_TASK`: tasks with more phones get an error report.
    pub max_phones: usize,
}

/// The deepest nesting of arrays and objects a task body may have. A task is an object
/// holding an array (depth 2); the margin leaves room for clients' own metadata fields,
/// and is far below what any parser's recursion could choke on.
pub const MAX_TASK_DEPTH: usize = 16;

/// The most bytes of a client's text quoted in an error message or dead-letter header.
pub const MAX_DETAIL_BYTES: usize = 256;

/// Why a message cannot be answered at all (it goes to the dead-letter queue).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    /// The body is over `MAX_TASK_BYTES`.
    #[error("body is {size} bytes, over the {limit}-byte limit")]
    TooLarge {
        /// The body's size.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// The body nests deeper than [`MAX_TASK_DEPTH`].
    #[error("body nests arrays or objects deeper than {limit} levels")]
    TooDeep {
        /// The limit.
        limit: usize,
    },
    /// The body does not parse.
    #[error("body is not JSON: {detail}")]
    NotJson {
        /// The parser's message, at most [`MAX_DETAIL_BYTES`].
        detail: String,
    },
    /// Neither the body nor the properties carry an id to answer with.
    #[error("no usable correlation id (an integer or a string of 1 to 255 bytes) in the body or the AMQP properties")]
    NoCorrelationId,
}

impl Rejection {
    /// Stable reason code, used in dead-letter headers and metrics labels.
    pub fn code(&self) -> &'static str {
        match self {
            Rejection::TooLarge { .. } => "too_large",
            Rejection::TooDeep { .. } => "too_deep",
            Rejection::NotJson { .. } => "not_json",
            Rejection::NoCorrelationId => "no_correlation_id",
        }
    }
}

/// Why a task's `phones` cannot be served (answered with an error report).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidPhones {
    /// No `phones` field.
    #[error("the task has no `phones` field")]
    Missing,
    /// `phones` is not an array.
    #[error("`phones` must be an array of phone numbers")]
    NotArray,
    /// An entry is not a `u64`.
    #[error("phones[{index}] is {value}; expected a non-negative integer no larger than 18446744073709551615")]
    BadEntry {
        /// Its position in `phones`.
        index: usize,
        /// Its JSON text, at most [`MAX_DETAIL_BYTES`].
        value: String,
    },
    /// More than `MAX_PHONES_PER_TASK` entries.
    #[error("the task has {count} phones; at most {limit} are allowed")]
    TooMany {
        /// How many the task has.
        count: usize,
        /// `MAX_PHONES_PER_TASK`.
        limit: usize,
    },
}

impl InvalidPhones {
    /// Stable error code, used in error reports and metrics labels.
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
    /// The id its report carries.
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
    if nesting_exceeds(body, MAX_TASK_DEPTH) {
        return Err(Rejection::TooDeep { limit: MAX_TASK_DEPTH });
    }
    let doc: Value =
        sonic_rs::from_slice(body).map_err(|e| Rejection::NotJson { detail: clip_detail(e.to_string()) })?;
    let correlation_id = body_correlation_id(body, &doc)
        .or_else(|| {
            property_id
                .filter(|id| !id.is_empty() && id.len() <= MAX_CORRELATION_ID_BYTES)
                .map(|id| CorrelationId::Text(id.to_owned()))
        })
        .ok_or(Rejection::NoCorrelationId)?;
    Ok(Task { correlation_id, phones: phones_of(body, &doc, limits.max_phones) })
}

/// Whether arrays and objects in `body` nest deeper than `limit`. One pass, no
/// recursion; brackets inside strings (escapes included) do not count. It does not
/// validate: the parser that runs next rejects what is not JSON.
pub fn nesting_exceeds(body: &[u8], limit: usize) -> bool {
    let mut depth = 0usize;
    let mut in_string = false;
    let mut bytes = body.iter();
    while let Some(&b) = bytes.next() {
        if in_string {
            match b {
                b'\\' => {
                    bytes.next();
                }
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > limit {
                    return true;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    false
}

/// `text` cut to at most [`MAX_DETAIL_BYTES`] (at a character boundary), marked when cut.
pub fn clip_detail(mut text: String) -> String {
    if text.len() > MAX_DETAIL_BYTES {
        let cut = (0..=MAX_DETAIL_BYTES - 3).rev().find(|&i| text.is_char_boundary(i)).unwrap_or(0);
        text.truncate(cut);
        text.push_str("...");
    }
    text
}

/// An id longer than this cannot be carried in the AMQP `correlation_id` property (a
/// short string), which every report sets; such an id is not usable.
pub const MAX_CORRELATION_ID_BYTES: usize = 255;

fn body_correlation_id(body: &[u8], doc: &Value) -> Option<CorrelationId> {
    let value = doc.as_object()?.get(&"correlation_id")?;
    let id = if let Some(text) = value.as_str() {
        (!text.is_empty()).then(|| CorrelationId::Text(text.to_owned()))?
    } else if value.is_number() {
        // The DOM holds numbers as u64/i64/f64; the exact text comes from the body.
        let raw = sonic_rs::get_from_slice(body, &["correlation_id"]).ok()?;
        CorrelationId::integer(raw.as_raw_str())?
    } else {
        return None;
    };
    (id.as_property().len() <= MAX_CORRELATION_ID_BYTES).then_some(id)
}

fn phones_of(body: &[u8], doc: &Value, max_phones: usize) -> Result<Vec<u64>, InvalidPhones> {
    let value = doc.as_object().and_then(|o| o.get(&"phones")).ok_or(InvalidPhones::Missing)?;
    let entries = value.as_array().ok_or(InvalidPhones::NotArray)?;
    if entries.len() > max_phones {
        return Err(InvalidPhones::TooMany { count: entries.len(), limit: max_phones });
    }
    let phones = entries
        .iter()
        .enumerate()
        .map(|(index, entry)| {
            entry.as_u64().ok_or_else(|| InvalidPhones::BadEntry { index, value: excerpt(body, index) })
        })
        .collect::<Result<Vec<u64>, _>>()?;
    Ok(dedup_phones(phones))
}

/// Drops repeated phones, keeping the first occurrence of each in order.
pub fn dedup_phones(phones: impl IntoIterator<Item = u64>) -> Vec<u64> {
    let mut seen = ahash::AHashSet::new();
    phones.into_iter().filter(|phone| seen.insert(*phone)).collect()
}

/// The most bytes of a bad phone entry quoted in an error report.
const MAX_EXCERPT_BYTES: usize = 64;

/// The text of `phones[index]` as the client wrote it, cut short: read from the body,
/// never re-serialised, so a huge entry costs no more than a small one.
fn excerpt(body: &[u8], index: usize) -> String {
    let Ok(raw) = sonic_rs::get_from_slice(body, &sonic_rs::pointer!["phones", index]) else {
        return "a value".to_owned();
    };
    let text = raw.as_raw_str();
    if text.len() <= MAX_EXCERPT_BYTES {
        return text.to_owned();
    }
    let cut = (0..=MAX_EXCERPT_BYTES - 3).rev().find(|&i| text.is_char_boundary(i)).unwrap_or(0);
    format!("{}...", &text[..cut])
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits { max_task_bytes: 1024, max_phones: 8 };

    fn task(body: &str) -> Result<Task, Rejection> {
        parse_task(body.as_bytes(), None, LIMITS)
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
        let long_id = format!(r#"{{"correlation_id": "{}", "phones": [1]}}"#, "x".repeat(256));
        assert_eq!(task(&long_id).unwrap_err(), Rejection::NoCorrelationId);
        let longest = format!(r#"{{"correlation_id": "{}", "phones": [1]}}"#, "x".repeat(255));
        assert!(task(&longest).is_ok());
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

    /// Every limit at its edge, counted by hand: the phone limit itself is allowed; a
    /// zero id is an integer; siblings do not add depth; details and excerpts are cut to
    /// their byte budget with a marker.
    #[test]
    fn limits_hold_exactly_at_their_edges() {
        let phones = (1..=LIMITS.max_phones as u64).map(|p| p.to_string()).collect::<Vec<_>>().join(",");
        let at_limit = task(&format!(r#"{{"correlation_id": 1, "phones": [{phones}]}}"#)).unwrap();
        assert_eq!(at_limit.phones.unwrap().len(), LIMITS.max_phones);
        let zero = task(r#"{"correlation_id": 0, "phones": []}"#).unwrap();
        assert_eq!(zero.correlation_id.as_property(), "0");
        assert!(matches!(zero.correlation_id, CorrelationId::Integer(_)));
        let siblings = format!("{{\"phones\": [{}]}}", vec!["[[]]"; 100].join(","));
        assert!(!nesting_exceeds(siblings.as_bytes(), 4), "100 siblings three deep are not 300 deep");
        assert_eq!(clip_detail("d".repeat(MAX_DETAIL_BYTES)), "d".repeat(MAX_DETAIL_BYTES));
        let clipped = clip_detail("d".repeat(MAX_DETAIL_BYTES + 1));
        assert_eq!(clipped, format!("{}...", "d".repeat(253)));
        let long = format!(r#"{{"correlation_id": 1, "phones": ["{}"]}}"#, "x".repeat(100));
        let message = task(&long).unwrap().phones.unwrap_err().to_string();
        // 64 bytes of the entry as written (its quote and 60 x's), then the marker.
        assert!(message.starts_with(&format!("phones[0] is \"{}...;", "x".repeat(60))), "{message}");
    }

    #[test]
    fn nesting_is_measured_outside_strings_only() {
        assert!(!nesting_exceeds(br#"{"correlation_id": 1, "phones": [1]}"#, 2));
        assert!(nesting_exceeds(br#"{"phones": [[1]]}"#, 2));
        assert!(!nesting_exceeds(br#"{"s": "[[[[{{{{", "t": "\"[[[["}"#, 1));
        assert!(nesting_exceeds(br#"{"s": "\\", "t": [[1]]}"#, 2), "an escaped backslash ends no string");
        assert!(!nesting_exceeds(b"]]]]}}}}[", 1), "stray closers never go below zero");
    }

    #[test]
    fn bodies_nested_too_deep_are_rejected_before_any_recursive_parse() {
        let limits = Limits { max_task_bytes: 4 << 20, max_phones: 8 };
        let deep_object = format!("{}1{}", r#"{"a":"#.repeat(100_000), "}".repeat(100_000));
        let deep_phones = format!(r#"{{"correlation_id": 1, "phones": [1, {}2{}]}}"#, "[".repeat(50), "]".repeat(50));
        for body in ["[".repeat(200_000), deep_object, deep_phones] {
            assert_eq!(parse_task(body.as_bytes(), None, limits), Err(Rejection::TooDeep { limit: MAX_TASK_DEPTH }));
        }
        let at_limit = format!(r#"{{"correlation_id": 1, "phones": [1], "x": {}0{}}}"#, "[".repeat(14), "]".repeat(14));
        assert!(parse_task(at_limit.as_bytes(), None, limits).is_ok());
    }

    /// The whole classification of a 1 MiB body of `[` fits in a thread with a 2 MiB
    /// stack, the size of tokio's and rayon's worker threads.
    #[test]
    fn a_mebibyte_of_open_brackets_parses_on_a_two_mebibyte_stack() {
        let body = vec![b'['; 1 << 20];
        let limits = Limits { max_task_bytes: 1 << 20, max_phones: 8 };
        let outcome = std::thread::Builder::new()
            .stack_size(2 << 20)
            .spawn(move || parse_task(&body, Some("id"), limits))
            .unwrap()
            .join()
            .expect("no stack overflow");
        assert_eq!(outcome.unwrap_err().code(), "too_deep");
    }

    #[test]
    fn rendered_values_are_bounded() {
        let limits = Limits { max_task_bytes: 1 << 20, max_phones: 8 };
        let body = format!(r#"{{"correlation_id": 1, "phones": ["{}"]}}"#, "é".repeat(100_000));
        let message = parse_task(body.as_bytes(), None, limits).unwrap().phones.unwrap_err().to_string();
        assert!(message.len() < 200, "{} bytes", message.len());
        assert!(message.starts_with("phones[0] is \"éé") && message.contains("...;"), "{message}");
        let garbage = format!("{{{}", "x".repeat(100_000));
        let Err(Rejection::NotJson { detail }) = parse_task(garbage.as_bytes(), None, limits) else { panic!() };
        assert!(detail.len() <= MAX_DETAIL_BYTES, "{} bytes", detail.len());
        let long_property = "p".repeat(300);
        assert_eq!(parse_task(br#"{"phones": []}"#, Some(&long_property), limits), Err(Rejection::NoCorrelationId));
    }

    use proptest::prelude::*;

    proptest! {
        /// Fuzzing in the test suite (see fuzz/ for the coverage-guided version): any
        /// bytes, or JSON-looking text, never panic, and accepted tasks keep the contract.
        #[test]
        fn any_body_is_classified_without_panicking(
            body in prop_oneof![
                prop::collection::vec(any::<u8>(), 0..300),
                "[{}\\[\\]\",:0-9a-z_ .eE+-]{0,120}".prop_map(String::into_bytes),
                r#"\{"correlation_id": ?(-?[0-9]{1,30}|"[^"]{0,300}"|null|\[\]), ?"phones": ?\[(-?[0-9]{1,22}(\.[0-9])?, ?){0,12}\]\}"#.prop_map(String::into_bytes),
            ],
            property in prop::option::of("[ -~]{0,20}"),
        ) {
            if let Ok(task) = parse_task(&body, property.as_deref(), LIMITS) {
                let id = task.correlation_id.as_property();
                prop_assert!(!id.is_empty() && id.len() <= MAX_CORRELATION_ID_BYTES);
                if let Ok(phones) = task.phones {
                    prop_assert!(phones.len() <= LIMITS.max_phones);
                }
            }
        }
    }
}
