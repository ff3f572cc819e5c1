//! What a scanning error says: the offset, what was expected there, what was found.

use super::lex::Field;
use std::fmt;

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
    /// A member's key (a string).
    Key,
    /// The `:` after a key.
    Colon,
    /// Any JSON value.
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
    /// The file ended.
    EndOfInput,
    /// This byte.
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
    /// Where scanning stopped.
    pub offset: usize,
    /// What would have been valid there.
    pub expected: Expected,
    /// What is there.
    pub found: Found,
}

impl Malformed {
    /// Scanning stopped at `offset` of `bytes`, expecting `expected`.
    #[cold]
    pub fn at(bytes: &[u8], offset: usize, expected: Expected) -> Self {
        let found = bytes.get(offset).map_or(Found::EndOfInput, |&b| Found::Byte(b));
        Malformed { offset, expected, found }
    }
}

/// A scan's result: the value, or where and why the bytes are not a valid record.
pub(crate) type Scan<T> = Result<T, Malformed>;
