//! The record grammar: one JSON object of the call-record schema at a byte offset.
//!
//! Two parsers agree on every input: a fast path that recognises the compact reference
//! layout (`{"phone":N,"start_date":N,"end_date":N}`) with fixed literals and SWAR digit
//! parsing, and a general parser for any valid JSON object (any whitespace, key order,
//! escaped keys, extra fields of any type). The fast path never fails: when the bytes are
//! not exactly the compact shape it declines and the general parser decides, so every
//! error carries the general parser's exact offset and expectation.
//!
//! This module owns no state and allocates only when skipping nested extra fields.

use super::number::{parse_digits, thirteen_digit_difference, thirteen_digits};
use std::fmt;

/// One call record as stored in data.json (dates in epoch milliseconds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record {
    pub phone: u64,
    pub start_date: i64,
    pub end_date: i64,
}

/// A required field of a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    Phone,
    StartDate,
    EndDate,
}

impl Field {
    pub fn name(self) -> &'static str {
        match self {
            Field::Phone => "phone",
            Field::StartDate => "start_date",
            Field::EndDate => "end_date",
        }
    }
}

/// What the scanner expected where it stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expected {
    /// The file must be one JSON array.
    ArrayStart,
    /// Every element of the array must be an object.
    Record,
    /// After a record: another one or the end of the array.
    CommaOrArrayEnd,
    /// After an element of a nested array.
    CommaOrNestedArrayEnd,
    /// After a member of an object.
    CommaOrObjectEnd,
    Key,
    Colon,
    Value,
    /// A JSON number literal (in an ignored field).
    Number,
    /// `true`, `false` or `null`.
    Literal,
    /// A string character: control characters must be escaped.
    StringChar,
    /// A valid escape sequence.
    Escape,
    /// Strings must be valid UTF-8.
    Utf8,
    /// `phone` must be a non-negative integer that fits in u64.
    PhoneInteger,
    /// Dates must be integers that fit in i64.
    DateInteger,
    /// A record must have this field.
    Field(Field),
    /// A record must not repeat this field.
    UniqueField(Field),
    /// Nothing but whitespace may follow the array.
    EndOfInput,
}

impl fmt::Display for Expected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Expected::ArrayStart => f.write_str("`[` opening the array of records"),
            Expected::Record => f.write_str("`{` opening a record"),
            Expected::CommaOrArrayEnd => f.write_str("`,` or `]` after a record"),
            Expected::CommaOrNestedArrayEnd => f.write_str("`,` or `]` in an array"),
            Expected::CommaOrObjectEnd => f.write_str("`,` or `}` in an object"),
            Expected::Key => f.write_str("a string key"),
            Expected::Colon => f.write_str("`:` after a key"),
            Expected::Value => f.write_str("a JSON value"),
            Expected::Number => f.write_str("a valid JSON number"),
            Expected::Literal => f.write_str("`true`, `false` or `null`"),
            Expected::StringChar => f.write_str("a string character (control characters must be escaped)"),
            Expected::Escape => f.write_str("a valid string escape"),
            Expected::Utf8 => f.write_str("valid UTF-8 in a string"),
            Expected::PhoneInteger => f.write_str("a non-negative integer `phone` no larger than 18446744073709551615"),
            Expected::DateInteger => f.write_str("an integer date in epoch milliseconds (64-bit signed)"),
            Expected::Field(field) => write!(f, "a `{}` field in the record starting here", field.name()),
            Expected::UniqueField(field) => write!(f, "a single `{}` key per record", field.name()),
            Expected::EndOfInput => f.write_str("end of input after the array"),
        }
    }
}

/// What the scanner found where it stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Found {
    EndOfInput,
    Byte(u8),
}

impl fmt::Display for Found {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Found::EndOfInput => f.write_str("end of file (truncated?)"),
            Found::Byte(b) if b.is_ascii_graphic() => write!(f, "`{}`", *b as char),
            Found::Byte(b) => write!(f, "byte {b:#04x}"),
        }
    }
}

/// Where and why scanning stopped. Small and `Copy` so the hot path stays cheap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Malformed {
    pub offset: usize,
    pub expected: Expected,
    pub found: Found,
}

impl Malformed {
    #[cold]
    pub fn at(bytes: &[u8], offset: usize, expected: Expected) -> Self {
        let found = bytes.get(offset).map_or(Found::EndOfInput, |&b| Found::Byte(b));
        Malformed { offset, expected, found }
    }
}

type Scan<T> = Result<T, Malformed>;

#[inline(always)]
fn is_ws(b: u8) -> bool {
    matches!(b, b' ' | b'\n' | b'\r' | b'\t')
}

/// Position of the first non-whitespace byte at or after `pos` (or `bytes.len()`).
#[inline(always)]
pub fn skip_ws(bytes: &[u8], mut pos: usize) -> usize {
    while let Some(&b) = bytes.get(pos) {
        if !is_ws(b) {
            break;
        }
        pos += 1;
    }
    pos
}

/// Position just after the literal `lit` at `pos`, if it is there.
#[inline(always)]
fn literal(bytes: &[u8], pos: usize, lit: &[u8]) -> Option<usize> {
    let end = pos + lit.len();
    (bytes.get(pos..end)? == lit).then_some(end)
}

/// A JSON integer literal at `pos` (`-`? `0`|[1-9][0-9]*, no fraction or exponent),
/// as sign and magnitude. `None` for anything else, including overflow of u64.
#[inline(always)]
fn json_integer(bytes: &[u8], pos: usize) -> Option<(bool, u64, usize)> {
    let negative = bytes.get(pos) == Some(&b'-');
    let digits_at = pos + usize::from(negative);
    let (magnitude, count) = parse_digits(bytes, digits_at)?;
    if count == 0 || (count > 1 && bytes[digits_at] == b'0') {
        return None;
    }
    let end = digits_at + count;
    if matches!(bytes.get(end), Some(b'.' | b'e' | b'E')) {
        return None;
    }
    Some((negative, magnitude, end))
}

#[inline(always)]
fn phone_at(bytes: &[u8], pos: usize) -> Option<(u64, usize)> {
    match json_integer(bytes, pos)? {
        // `-0` is zero, not a negative number (serde_json agrees).
        (false, value, end) | (true, value @ 0, end) => Some((value, end)),
        (true, _, _) => None,
    }
}

#[inline(always)]
fn date_at(bytes: &[u8], pos: usize) -> Option<(i64, usize)> {
    let (negative, magnitude, end) = json_integer(bytes, pos)?;
    let value = if negative { 0i64.checked_sub_unsigned(magnitude)? } else { i64::try_from(magnitude).ok()? };
    Some((value, end))
}

const COMPACT_PHONE: &[u8] = b"{\"phone\":";
const COMPACT_START: &[u8] = b",\"start_date\":";
const COMPACT_END: &[u8] = b",\"end_date\":";
/// Room for the longest compact record: prefix, two dates, `,"end_date":`, `}`, and
/// the eight-byte loads that read them.
const RECORD_WINDOW: usize = 96;

/// The compact reference layout from the dates on: `N,"end_date":N}` after `,"start_date":`.
#[inline(always)]
fn compact_dates(bytes: &[u8], pos: usize) -> Option<(i64, i64, usize)> {
    thirteen_digit_dates(bytes, pos).or_else(|| any_width_dates(bytes, pos))
}

/// The common case: both dates have thirteen digits (2001..2286), so every position is
/// known up front and consecutive records parse in parallel in the CPU's pipeline.
#[inline(always)]
fn thirteen_digit_dates(bytes: &[u8], pos: usize) -> Option<(i64, i64, usize)> {
    let start_date = thirteen_digits(bytes, pos)?;
    let pos = literal(bytes, pos + 13, COMPACT_END)?;
    let end_date = thirteen_digits(bytes, pos)?;
    let pos = literal(bytes, pos + 13, b"}")?;
    // Thirteen digits are below 10^13, far inside i64.
    Some((start_date as i64, end_date as i64, pos))
}

#[inline(never)]
fn any_width_dates(bytes: &[u8], pos: usize) -> Option<(i64, i64, usize)> {
    let (start_date, pos) = date_at(bytes, pos)?;
    let pos = literal(bytes, pos, COMPACT_END)?;
    let (end_date, pos) = date_at(bytes, pos)?;
    let pos = literal(bytes, pos, b"}")?;
    Some((start_date, end_date, pos))
}

/// Fast path: the record at `pos` in exactly the compact reference layout.
#[inline(always)]
pub fn compact_record(bytes: &[u8], pos: usize) -> Option<(Record, usize)> {
    let pos = literal(bytes, pos, COMPACT_PHONE)?;
    let (phone, pos) = phone_at(bytes, pos)?;
    let pos = literal(bytes, pos, COMPACT_START)?;
    let (start_date, end_date, pos) = compact_dates(bytes, pos)?;
    Some((Record { phone, start_date, end_date }, pos))
}

/// The bytes a compact record of one phone starts with, up to its start date:
/// `{"phone":P,"start_date":`. Matching it replaces parsing the phone (whose digit count
/// would otherwise sit on the critical path from one record to the next).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PhonePrefix {
    phone: u64,
    len: usize,
    bytes: [u8; PhonePrefix::MAX_LEN],
}

impl PhonePrefix {
    const MAX_LEN: usize = 48;

    pub fn new(phone: u64) -> PhonePrefix {
        let mut bytes = [0u8; PhonePrefix::MAX_LEN];
        let mut digits = itoa::Buffer::new();
        let parts: [&[u8]; 3] = [COMPACT_PHONE, digits.format(phone).as_bytes(), COMPACT_START];
        let mut len = 0;
        for part in parts {
            bytes[len..len + part.len()].copy_from_slice(part);
            len += part.len();
        }
        PhonePrefix { phone, len, bytes }
    }

    pub fn phone(&self) -> u64 {
        self.phone
    }

    /// Position after the prefix when the bytes at `pos` start with it.
    #[inline(always)]
    fn matches(&self, bytes: &[u8], pos: usize) -> Option<usize> {
        // 24..=43 bytes: compared as two or three overlapping 16-byte words.
        let load = |b: &[u8], at: usize| -> Option<u128> {
            let mut word = [0u8; 16];
            word.copy_from_slice(b.get(at..at + 16)?);
            Some(u128::from_le_bytes(word))
        };
        let len = self.len;
        let ours = &self.bytes[..];
        let same = |at: usize| Some(load(bytes, pos + at)? == load(ours, at)?);
        let all = same(0)? && same(len - 16)? && (len <= 32 || same(16)?);
        all.then_some(pos + len)
    }

    /// The dates of the compact record of this phone at `pos`.
    #[inline(always)]
    pub fn dates(&self, bytes: &[u8], pos: usize) -> Option<(i64, i64, usize)> {
        compact_dates(bytes, self.matches(bytes, pos)?)
    }

    /// The hot path: the duration in ms of the compact record of this phone at `pos`,
    /// when both its dates have thirteen digits, and where it ends. `VALIDATE` checks
    /// every digit (indexing); without it only the record's literals are checked, for
    /// bytes the index already validated (aggregation).
    ///
    /// Reads through one fixed-size window so the compiler can prove every access in
    /// bounds; the last [`RECORD_WINDOW`] bytes of a file take the general path.
    #[inline(always)]
    pub fn duration<const VALIDATE: bool>(&self, bytes: &[u8], pos: usize) -> Option<(i64, usize)> {
        let window: &[u8; RECORD_WINDOW] = bytes.get(pos..pos + RECORD_WINDOW)?.try_into().ok()?;
        // Always within these bounds by construction; saying so lets the compiler drop
        // the bounds checks on every offset below.
        let len = self.len.clamp(16, PhonePrefix::MAX_LEN);
        let word = |b: &[u8], at: usize| -> Option<u128> {
            let mut word = [0u8; 16];
            word.copy_from_slice(b.get(at..at + 16)?);
            Some(u128::from_le_bytes(word))
        };
        let same = |at: usize| Some(word(window, at)? == word(&self.bytes, at)?);
        if !(same(0)? && same(len - 16)? && (len <= 32 || same(16)?)) {
            return None;
        }
        let (start_at, end_at) = (len, len + 13 + COMPACT_END.len());
        literal(window, start_at + 13, COMPACT_END)?;
        literal(window, end_at + 13, b"}")?;
        Some((thirteen_digit_difference::<VALIDATE>(window, start_at, end_at)?, pos + end_at + 14))
    }
}

/// What indexing needs of a record: its phone and whether its duration is negative.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexedRecord {
    pub phone: u64,
    pub negative: bool,
}

/// The record at `pos`, in any valid layout, fully validated; `last` is the phone of
/// the previous record, tried first because files are usually grouped by phone, and
/// updated.
#[inline(always)]
pub fn index_record(bytes: &[u8], pos: usize, last: &mut PhonePrefix) -> Scan<(IndexedRecord, usize)> {
    if let Some((ms, end)) = last.duration::<true>(bytes, pos) {
        return Ok((IndexedRecord { phone: last.phone, negative: ms < 0 }, end));
    }
    let (record, end) = record(bytes, pos)?;
    if record.phone != last.phone {
        *last = PhonePrefix::new(record.phone);
    }
    Ok((IndexedRecord { phone: record.phone, negative: record.end_date < record.start_date }, end))
}

/// The record at `pos`, in any valid layout.
#[inline(always)]
pub fn record(bytes: &[u8], pos: usize) -> Scan<(Record, usize)> {
    match compact_record(bytes, pos) {
        Some(found) => Ok(found),
        None => general_record(bytes, pos),
    }
}

/// Which field a key names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Key {
    Known(Field),
    Other,
}

fn key_of(name: &[u8]) -> Key {
    match name {
        b"phone" => Key::Known(Field::Phone),
        b"start_date" => Key::Known(Field::StartDate),
        b"end_date" => Key::Known(Field::EndDate),
        _ => Key::Other,
    }
}

/// The general parser: one record object at `pos` in any valid JSON layout.
#[cold]
#[inline(never)]
pub fn general_record(bytes: &[u8], start: usize) -> Scan<(Record, usize)> {
    if bytes.get(start) != Some(&b'{') {
        return Err(Malformed::at(bytes, start, Expected::Record));
    }
    let mut phone = None;
    let mut start_date = None;
    let mut end_date = None;
    let mut pos = skip_ws(bytes, start + 1);
    if bytes.get(pos) == Some(&b'}') {
        return Err(Malformed::at(bytes, start, Expected::Field(Field::Phone)));
    }
    loop {
        let key_at = pos;
        let (key, after_key) = object_key(bytes, pos)?;
        pos = colon(bytes, after_key)?;
        match key {
            Key::Known(field) => {
                let duplicate = match field {
                    Field::Phone => phone.is_some(),
                    Field::StartDate => start_date.is_some(),
                    Field::EndDate => end_date.is_some(),
                };
                if duplicate {
                    return Err(Malformed::at(bytes, key_at, Expected::UniqueField(field)));
                }
                pos = match field {
                    Field::Phone => {
                        let (value, end) =
                            phone_at(bytes, pos).ok_or_else(|| Malformed::at(bytes, pos, Expected::PhoneInteger))?;
                        phone = Some(value);
                        end
                    }
                    Field::StartDate | Field::EndDate => {
                        let (value, end) =
                            date_at(bytes, pos).ok_or_else(|| Malformed::at(bytes, pos, Expected::DateInteger))?;
                        if field == Field::StartDate {
                            start_date = Some(value);
                        } else {
                            end_date = Some(value);
                        }
                        end
                    }
                };
            }
            Key::Other => pos = skip_value(bytes, pos)?,
        }
        pos = skip_ws(bytes, pos);
        match bytes.get(pos) {
            Some(b',') => pos = skip_ws(bytes, pos + 1),
            Some(b'}') => {
                pos += 1;
                break;
            }
            _ => return Err(Malformed::at(bytes, pos, Expected::CommaOrObjectEnd)),
        }
    }
    let missing = |field| Malformed::at(bytes, start, Expected::Field(field));
    let record = Record {
        phone: phone.ok_or_else(|| missing(Field::Phone))?,
        start_date: start_date.ok_or_else(|| missing(Field::StartDate))?,
        end_date: end_date.ok_or_else(|| missing(Field::EndDate))?,
    };
    Ok((record, pos))
}

/// After a key: whitespace, `:`, whitespace; returns where the value starts.
fn colon(bytes: &[u8], pos: usize) -> Scan<usize> {
    let pos = skip_ws(bytes, pos);
    if bytes.get(pos) != Some(&b':') {
        return Err(Malformed::at(bytes, pos, Expected::Colon));
    }
    Ok(skip_ws(bytes, pos + 1))
}

/// A key string at `pos`, classified (escapes decoded, so `"ph\u006fne"` is `phone`).
fn object_key(bytes: &[u8], pos: usize) -> Scan<(Key, usize)> {
    if bytes.get(pos) != Some(&b'"') {
        return Err(Malformed::at(bytes, pos, Expected::Key));
    }
    let (end, escaped) = string_end(bytes, pos)?;
    let raw = &bytes[pos + 1..end - 1];
    let key = if escaped { decoded_key(raw) } else { key_of(raw) };
    Ok((key, end))
}

/// Classifies a validated key that contains escapes. Keys longer than the longest field
/// name cannot match and are not decoded further.
fn decoded_key(raw: &[u8]) -> Key {
    let mut buf = [0u8; 16];
    let mut len = 0;
    let mut i = 0;
    while i < raw.len() {
        let mut utf8 = [0u8; 4];
        let (piece, used): (&[u8], usize) = if raw[i] == b'\\' {
            match escaped_char(raw, i) {
                (Some(c), used) => (c.encode_utf8(&mut utf8).as_bytes(), used),
                // A lone surrogate: no field name contains one.
                (None, _) => return Key::Other,
            }
        } else {
            (&raw[i..i + 1], 1)
        };
        let Some(slot) = buf.get_mut(len..len + piece.len()) else {
            return Key::Other;
        };
        slot.copy_from_slice(piece);
        len += piece.len();
        i += used;
    }
    key_of(&buf[..len])
}

/// Decodes the (already validated) escape at `raw[i]`; returns the char (None for a
/// lone surrogate) and the number of bytes consumed.
fn escaped_char(raw: &[u8], i: usize) -> (Option<char>, usize) {
    let simple = |c: char| (Some(c), 2);
    match raw[i + 1] {
        b'"' => simple('"'),
        b'\\' => simple('\\'),
        b'/' => simple('/'),
        b'b' => simple('\u{8}'),
        b'f' => simple('\u{c}'),
        b'n' => simple('\n'),
        b'r' => simple('\r'),
        b't' => simple('\t'),
        _ => {
            let unit = |at: usize| -> Option<u32> {
                let hex = std::str::from_utf8(raw.get(at..at + 4)?).ok()?;
                u32::from_str_radix(hex, 16).ok()
            };
            let Some(first) = unit(i + 2) else {
                return (None, 6);
            };
            if (0xD800..0xDC00).contains(&first)
                && raw.get(i + 6..i + 8) == Some(b"\\u")
                && let Some(second) = unit(i + 8).filter(|s| (0xDC00..0xE000).contains(s))
            {
                let code = 0x10000 + ((first - 0xD800) << 10) + (second - 0xDC00);
                return (char::from_u32(code), 12);
            }
            (char::from_u32(first), 6)
        }
    }
}

/// Validates the string starting with `"` at `pos`; returns the position after its
/// closing quote and whether it contains escapes.
fn string_end(bytes: &[u8], pos: usize) -> Scan<(usize, bool)> {
    let body = pos + 1;
    let mut i = body;
    let mut escaped = false;
    let mut non_ascii = false;
    loop {
        let Some(&b) = bytes.get(i) else {
            return Err(Malformed::at(bytes, i, Expected::StringChar));
        };
        match b {
            b'"' => break,
            b'\\' => {
                escaped = true;
                i = escape_end(bytes, i)?;
            }
            0x00..=0x1F => return Err(Malformed::at(bytes, i, Expected::StringChar)),
            0x80.. => {
                non_ascii = true;
                i += 1;
            }
            _ => i += 1,
        }
    }
    if non_ascii && let Err(e) = std::str::from_utf8(&bytes[body..i]) {
        return Err(Malformed::at(bytes, body + e.valid_up_to(), Expected::Utf8));
    }
    Ok((i + 1, escaped))
}

/// Validates the escape whose backslash is at `pos`; returns the position after it.
fn escape_end(bytes: &[u8], pos: usize) -> Scan<usize> {
    match bytes.get(pos + 1) {
        Some(b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => Ok(pos + 2),
        Some(b'u') => {
            for at in pos + 2..pos + 6 {
                if !bytes.get(at).is_some_and(u8::is_ascii_hexdigit) {
                    return Err(Malformed::at(bytes, at, Expected::Escape));
                }
            }
            Ok(pos + 6)
        }
        _ => Err(Malformed::at(bytes, pos + 1, Expected::Escape)),
    }
}

/// Validates the number at `pos` (full JSON grammar); returns the position after it.
fn number_end(bytes: &[u8], pos: usize) -> Scan<usize> {
    let digits = |from: usize| {
        let mut i = from;
        while bytes.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        i
    };
    let mut i = pos;
    if bytes.get(i) == Some(&b'-') {
        i += 1;
    }
    match bytes.get(i) {
        Some(b'0') => i += 1,
        Some(b'1'..=b'9') => i = digits(i),
        _ => return Err(Malformed::at(bytes, i, Expected::Number)),
    }
    if bytes.get(i) == Some(&b'.') {
        let after = digits(i + 1);
        if after == i + 1 {
            return Err(Malformed::at(bytes, after, Expected::Number));
        }
        i = after;
    }
    if matches!(bytes.get(i), Some(b'e' | b'E')) {
        i += 1;
        if matches!(bytes.get(i), Some(b'+' | b'-')) {
            i += 1;
        }
        let after = digits(i);
        if after == i {
            return Err(Malformed::at(bytes, after, Expected::Number));
        }
        i = after;
    }
    Ok(i)
}

/// Validates and skips any JSON value at `pos` (an ignored extra field). Iterative, so
/// arbitrarily deep nesting cannot overflow the stack.
pub fn skip_value(bytes: &[u8], pos: usize) -> Scan<usize> {
    // Closing bracket of each open container, innermost last.
    let mut open: Vec<u8> = Vec::new();
    let mut pos = pos;
    loop {
        // A value starts at `pos`.
        pos = skip_ws(bytes, pos);
        match bytes.get(pos) {
            Some(b'"') => pos = string_end(bytes, pos)?.0,
            Some(b'{') => {
                pos = skip_ws(bytes, pos + 1);
                if bytes.get(pos) == Some(&b'}') {
                    pos += 1;
                } else {
                    open.push(b'}');
                    pos = member_value_start(bytes, pos)?;
                    continue;
                }
            }
            Some(b'[') => {
                pos = skip_ws(bytes, pos + 1);
                if bytes.get(pos) == Some(&b']') {
                    pos += 1;
                } else {
                    open.push(b']');
                    continue;
                }
            }
            Some(b't') => {
                pos = literal(bytes, pos, b"true").ok_or_else(|| Malformed::at(bytes, pos, Expected::Literal))?
            }
            Some(b'f') => {
                pos = literal(bytes, pos, b"false").ok_or_else(|| Malformed::at(bytes, pos, Expected::Literal))?
            }
            Some(b'n') => {
                pos = literal(bytes, pos, b"null").ok_or_else(|| Malformed::at(bytes, pos, Expected::Literal))?
            }
            Some(b'-' | b'0'..=b'9') => pos = number_end(bytes, pos)?,
            _ => return Err(Malformed::at(bytes, pos, Expected::Value)),
        }
        // A value ended: close finished containers until one continues.
        loop {
            let Some(&close) = open.last() else {
                return Ok(pos);
            };
            pos = skip_ws(bytes, pos);
            match bytes.get(pos) {
                Some(b',') if close == b'}' => {
                    pos = member_value_start(bytes, skip_ws(bytes, pos + 1))?;
                    break;
                }
                Some(b',') => {
                    pos += 1;
                    break;
                }
                Some(&b) if b == close => {
                    open.pop();
                    pos += 1;
                }
                _ if close == b'}' => return Err(Malformed::at(bytes, pos, Expected::CommaOrObjectEnd)),
                _ => return Err(Malformed::at(bytes, pos, Expected::CommaOrNestedArrayEnd)),
            }
        }
    }
}

/// A `"key" :` at `pos` inside an ignored object; returns where its value starts.
fn member_value_start(bytes: &[u8], pos: usize) -> Scan<usize> {
    if bytes.get(pos) != Some(&b'"') {
        return Err(Malformed::at(bytes, pos, Expected::Key));
    }
    let (end, _) = string_end(bytes, pos)?;
    colon(bytes, end)
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
        assert_eq!(rec(r#"{"phone":-0,"start_date":0,"end_date":0}"#).unwrap().phone, 0);
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
        let text = br#"{"phone":17,"start_date":-5,"end_date":10}"#;
        assert_eq!(PhonePrefix::new(17).dates(text, 0), Some((-5, 10, text.len())));
        assert_eq!(PhonePrefix::new(1).dates(text, 0), None);
        assert_eq!(PhonePrefix::new(170).dates(text, 0), None);
        let long = br#"{"phone":18446744073709551615,"start_date":1684957028364,"end_date":1684957074364}"#;
        assert_eq!(PhonePrefix::new(u64::MAX).dates(long, 0), Some((1_684_957_028_364, 1_684_957_074_364, long.len())));
        assert_eq!(PhonePrefix::new(u64::MAX - 1).dates(long, 0), None);
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
        let first = r#"{"phone":1,"start_date":1684957028364,"end_date":1684957074364}"#;
        let text = format!("{first},{{\"phone\":2,\"start_date\":6,\"end_date\":5}}{}", " ".repeat(RECORD_WINDOW));
        let mut last = PhonePrefix::new(1);
        let indexed = |phone, negative| IndexedRecord { phone, negative };
        assert_eq!(index_record(text.as_bytes(), 0, &mut last), Ok((indexed(1, false), first.len())));
        assert_eq!(
            index_record(text.as_bytes(), first.len() + 1, &mut last),
            Ok((indexed(2, true), first.len() + 1 + 39))
        );
        assert_eq!(last.phone(), 2);
    }
}
