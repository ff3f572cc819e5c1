//! The fast path: records in exactly the compact reference layout
//! (`{"phone":N,"start_date":N,"end_date":N}`), read with fixed literals and SWAR digits.
//! It never fails: anything else declines (`None`) and the general parser decides.

use super::lex::{Record, date_at, literal, phone_at};
use crate::data::number::{thirteen_digit_difference, thirteen_digits, thirteen_digits_descend, up_to_sixteen_digits};

const COMPACT_PHONE: &[u8] = b"{\"phone\":";
const COMPACT_START: &[u8] = b",\"start_date\":";
const COMPACT_END: &[u8] = b",\"end_date\":";
/// Room for the longest compact record: prefix, two dates, `,"end_date":`, `}`, and
/// the eight-byte loads that read them.
pub(crate) const RECORD_WINDOW: usize = 96;

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

/// The index build's fast path, for records in exactly the compact layout with phones
/// of up to sixteen digits and thirteen-digit dates: the phone, whether the duration is
/// negative, and where the record ends. `None` for anything else (the general parser
/// decides); where it answers, it agrees with [`compact_record`].
///
/// A time-ordered file or a phone book changes phone at every record, so the build reads
/// each one afresh; this reader is cut to what the index needs: the phone's digits in
/// two loads, the literals at offsets that follow from the phone's length, and the
/// dates only compared, never converted. Reads through one fixed-size window, like
/// [`PhonePrefix::duration`].
#[inline(always)]
pub(super) fn compact_indexed(bytes: &[u8], pos: usize) -> Option<(u64, bool, usize)> {
    let window: &[u8; RECORD_WINDOW] = bytes.get(pos..pos + RECORD_WINDOW)?.try_into().ok()?;
    let phone_at = literal(window, 0, COMPACT_PHONE)?;
    let (phone, digits) = up_to_sixteen_digits(window, phone_at)?;
    if digits > 1 && window[phone_at] == b'0' {
        return None;
    }
    let start_at = literal(window, phone_at + digits, COMPACT_START)?;
    let end_at = literal(window, start_at + 13, COMPACT_END)?;
    let after = literal(window, end_at + 13, b"}")?;
    let negative = thirteen_digits_descend(window, start_at, end_at)?;
    Some((phone, negative, pos + after))
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

    /// The prefix of a compact record of `phone`.
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

    /// The phone it matches.
    pub fn phone(&self) -> u64 {
        self.phone
    }

    /// The prefix's length, after the bytes at the start of `window` proved to be this
    /// prefix (24..=43 bytes, compared as two or three overlapping 16-byte words).
    #[inline(always)]
    fn matches(&self, window: &[u8; RECORD_WINDOW]) -> Option<usize> {
        // Always within these bounds by construction; saying so lets the compiler drop
        // the bounds checks on every offset derived from it.
        let len = self.len.clamp(16, PhonePrefix::MAX_LEN);
        let word = |b: &[u8], at: usize| -> Option<u128> {
            let mut word = [0u8; 16];
            word.copy_from_slice(b.get(at..at + 16)?);
            Some(u128::from_le_bytes(word))
        };
        let same = |at: usize| Some(word(window, at)? == word(&self.bytes, at)?);
        (same(0)? && same(len - 16)? && (len <= 32 || same(16)?)).then_some(len)
    }

    /// The hot path: the duration in ms of the compact record of this phone at `pos`,
    /// when both its dates have thirteen digits, and where it ends. `VALIDATE` checks
    /// every digit (indexing); without it only the record's literals are checked, for
    /// bytes the index already validated (aggregation).
    ///
    /// Reads through one fixed-size window so the compiler can prove every access in
    /// bounds; the last `RECORD_WINDOW` bytes of a file take the general path.
    #[inline(always)]
    pub fn duration<const VALIDATE: bool>(&self, bytes: &[u8], pos: usize) -> Option<(i64, usize)> {
        let window: &[u8; RECORD_WINDOW] = bytes.get(pos..pos + RECORD_WINDOW)?.try_into().ok()?;
        let len = self.matches(window)?;
        let (start_at, end_at) = (len, len + 13 + COMPACT_END.len());
        literal(window, start_at + 13, COMPACT_END)?;
        literal(window, end_at + 13, b"}")?;
        Some((thirteen_digit_difference::<VALIDATE>(window, start_at, end_at)?, pos + end_at + 14))
    }
}
