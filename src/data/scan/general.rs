//! The general parser: one record object in any valid JSON layout (any whitespace and
//! key order, escaped keys, extra fields of any type, validated and skipped).

use super::lex::{Field, Record, date_at, literal, phone_at, skip_ws};
use super::malformed::{Expected, Malformed, Scan};

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
