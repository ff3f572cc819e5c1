//! The lexing every parser of the grammar shares: the record and field types, whitespace,
//! literals and the JSON integers of phones and dates.

use crate::data::number::parse_digits;

/// One call record as stored in data.json (dates in epoch milliseconds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record {
    /// The caller's phone.
    pub phone: u64,
    /// When the call started.
    pub start_date: i64,
    /// When it ended.
    pub end_date: i64,
}

/// A required field of a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(missing_docs)] // each is the record field of its name
pub enum Field {
    Phone,
    StartDate,
    EndDate,
}

impl Field {
    /// Its key in data.json.
    pub fn name(self) -> &'static str {
        match self {
            Field::Phone => "phone",
            Field::StartDate => "start_date",
            Field::EndDate => "end_date",
        }
    }
}

#[inline(always)]
pub(super) fn is_ws(b: u8) -> bool {
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
pub(super) fn literal(bytes: &[u8], pos: usize, lit: &[u8]) -> Option<usize> {
    let end = pos + lit.len();
    (bytes.get(pos..end)? == lit).then_some(end)
}

/// A JSON integer literal at `pos` (`-`? `0`|[1-9][0-9]*, no fraction or exponent),
/// as sign and magnitude. `None` for anything else, including overflow of u64.
#[inline(always)]
pub(super) fn json_integer(bytes: &[u8], pos: usize) -> Option<(bool, u64, usize)> {
    let negative = bytes.get(pos) == Some(&b'-');
    let digits_at = pos + usize::from(negative);
    let (magnitude, count) = parse_digits(bytes, digits_at)?;
    if count == 0 || (count > 1 && bytes[digits_at] == b'0') {
        return None;
    }
    let end = digits_at + count;
    // `-0` is rejected: JSON readers disagree on it (serde_json, the test suite's
    // reference, reads it as the float -0.0), and no real date or phone is written so.
    if matches!(bytes.get(end), Some(b'.' | b'e' | b'E')) || (negative && magnitude == 0) {
        return None;
    }
    Some((negative, magnitude, end))
}

#[inline(always)]
pub(super) fn phone_at(bytes: &[u8], pos: usize) -> Option<(u64, usize)> {
    match json_integer(bytes, pos)? {
        (false, value, end) => Some((value, end)),
        (true, _, _) => None,
    }
}

#[inline(always)]
pub(super) fn date_at(bytes: &[u8], pos: usize) -> Option<(i64, usize)> {
    let (negative, magnitude, end) = json_integer(bytes, pos)?;
    let value = if negative { 0i64.checked_sub_unsigned(magnitude)? } else { i64::try_from(magnitude).ok()? };
    Some((value, end))
}
