//! Integer parsing for the scanner: SWAR (eight digits per step) for the hot path,
//! with the JSON number grammar enforced by the callers in `scan`.
//!
//! This module only turns runs of ASCII digits into values; it knows nothing of
//! records, keys or error reporting.

/// Sets bit 7 of every byte of `word` that is *not* an ASCII digit, without carries
/// between bytes (each byte is handled in its own nibble lanes).
#[inline(always)]
fn non_digit_mask(word: u64) -> u64 {
    let high_nibble_not_3 = (word & 0xF0F0_F0F0_F0F0_F0F0) ^ 0x3030_3030_3030_3030;
    // Low nibble + 6 reaches 0x10 exactly when the low nibble is 10..=15.
    let low_nibble_over_9 = ((word & 0x0F0F_0F0F_0F0F_0F0F) + 0x0606_0606_0606_0606) & 0xF0F0_F0F0_F0F0_F0F0;
    high_nibble_not_3 | low_nibble_over_9
}

/// Number of leading ASCII digits in the eight bytes of `word` (first byte = lowest).
#[inline(always)]
fn leading_digits(word: u64) -> usize {
    (non_digit_mask(word).trailing_zeros() / 8) as usize
}

/// Value of the first `count` (1..=8) digit bytes of `word`.
#[inline(always)]
fn digits_value(word: u64, count: usize) -> u64 {
    debug_assert!((1..=8).contains(&count));
    // Bytes past `count` may borrow from higher bytes during the subtraction, but
    // borrows only travel upwards and the shift discards every byte past `count`.
    let mut v = word.wrapping_sub(0x3030_3030_3030_3030) << (8 * (8 - count));
    // Pairwise, then by four, then by eight (the classic simdjson reduction).
    v = v.wrapping_mul(10).wrapping_add(v >> 8);
    let mask = 0x0000_00FF_0000_00FF;
    let mul1 = 100 + (1_000_000 << 32);
    let mul2 = 1 + (10_000 << 32);
    ((v & mask).wrapping_mul(mul1).wrapping_add(((v >> 16) & mask).wrapping_mul(mul2))) >> 32
}

const POW10: [u64; 9] = [1, 10, 100, 1_000, 10_000, 100_000, 1_000_000, 10_000_000, 100_000_000];

/// Parses the run of ASCII digits starting at `bytes[pos]`.
///
/// Returns the value and the number of digits (0 when `bytes[pos]` is not a digit),
/// or `None` when the run does not fit in a `u64`. Leading zeros are accepted here;
/// the JSON grammar check is the caller's.
#[inline(always)]
pub(super) fn parse_digits(bytes: &[u8], pos: usize) -> Option<(u64, usize)> {
    let mut value = 0u64;
    let mut count = 0usize;
    // Two SWAR steps cover 16 digits, which cannot overflow (10^16 < 2^64).
    while count < 16 {
        let Some(chunk) = bytes.get(pos + count..pos + count + 8) else {
            break;
        };
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        let word = u64::from_le_bytes(word);
        let n = leading_digits(word);
        if n == 0 {
            return Some((value, count));
        }
        value = value * POW10[n] + digits_value(word, n);
        count += n;
        if n < 8 {
            return Some((value, count));
        }
    }
    // Tail (or the last bytes of the input): one digit at a time, checked.
    while let Some(&c) = bytes.get(pos + count) {
        if !c.is_ascii_digit() {
            break;
        }
        value = value.checked_mul(10)?.checked_add(u64::from(c - b'0'))?;
        count += 1;
    }
    Some((value, count))
}

#[inline(always)]
fn load8(bytes: &[u8], pos: usize) -> Option<u64> {
    let mut word = [0u8; 8];
    word.copy_from_slice(bytes.get(pos..pos + 8)?);
    Some(u64::from_le_bytes(word))
}

/// The two overlapping words holding thirteen digits at `pos`: digits 0..8 and 5..13.
///
/// With `VALIDATE`, `None` unless all thirteen are digits and the first is not zero.
/// Without it the bytes are known to be one valid JSON integer token (the index checked
/// them) followed, at `pos + 13`, by the literal the caller expects; then only the first
/// and last bytes need checking: a digit last means the token is not shorter and padded
/// with whitespace, a digit first means it has no sign.
#[inline(always)]
fn thirteen_digit_words<const VALIDATE: bool>(bytes: &[u8], pos: usize) -> Option<(u64, u64)> {
    let high = load8(bytes, pos)?;
    let low = load8(bytes, pos + 5)?;
    let valid = if VALIDATE {
        non_digit_mask(high) | non_digit_mask(low) == 0 && high & 0xFF != u64::from(b'0')
    } else {
        (high as u8).is_ascii_digit() && ((low >> 56) as u8).is_ascii_digit()
    };
    valid.then_some((high, low))
}

/// Exactly thirteen digits at `pos` (epoch milliseconds from 2001 to 2286), without a
/// leading zero, as two overlapping eight-byte loads.
///
/// Unlike [`parse_digits`], where the position of the next field depends on the digit
/// count found, the caller knows where the number ends before reading it, so
/// consecutive records parse without a serial dependency between them. Whether a
/// fourteenth digit follows is the caller's check (it expects a literal there).
#[inline(always)]
pub(super) fn thirteen_digits(bytes: &[u8], pos: usize) -> Option<u64> {
    let (high, low) = thirteen_digit_words::<true>(bytes, pos)?;
    // `low` holds digits 5..13; its first three bytes repeat digits 5..8 of `high`.
    Some(digits_value(high, 8) * 100_000 + digits_value(low >> 24, 5))
}

/// Whether the thirteen-digit number at `end_at` is smaller than the one at
/// `start_at`, both checked as [`thirteen_digits`] checks them (`None` otherwise).
///
/// Numbers of the same digit count without leading zeros order as their digits do, so
/// the index build, which needs only the sign of a call's duration, compares the two
/// numbers' bytes (most significant first) instead of converting them.
#[inline(always)]
pub(super) fn thirteen_digits_descend(bytes: &[u8], start_at: usize, end_at: usize) -> Option<bool> {
    let (start_high, start_low) = thirteen_digit_words::<true>(bytes, start_at)?;
    let (end_high, end_low) = thirteen_digit_words::<true>(bytes, end_at)?;
    // Little-endian loads: swapping the bytes puts the first digit most significant.
    Some((end_high.swap_bytes(), end_low.swap_bytes()) < (start_high.swap_bytes(), start_low.swap_bytes()))
}

/// The run of one to sixteen ASCII digits at `pos` and its length; `None` when there is
/// no digit there, more than sixteen, or too few bytes left to tell.
///
/// The index build's phone reader: two eight-byte loads, no loop, so the record's
/// length (which the next record's position depends on) is known after a few
/// instructions. Longer phones take [`parse_digits`] through the general path.
#[inline(always)]
pub(super) fn up_to_sixteen_digits(bytes: &[u8], pos: usize) -> Option<(u64, usize)> {
    let high = load8(bytes, pos)?;
    let low = load8(bytes, pos + 8)?;
    let in_high = leading_digits(high);
    if in_high < 8 {
        return (in_high > 0).then(|| (digits_value(high, in_high), in_high));
    }
    match leading_digits(low) {
        0 => Some((digits_value(high, 8), 8)),
        8 => match bytes.get(pos + 16) {
            Some(next) if !next.is_ascii_digit() => Some((digits_value(high, 8) * POW10[8] + digits_value(low, 8), 16)),
            _ => None,
        },
        in_low => Some((digits_value(high, 8) * POW10[in_low] + digits_value(low, in_low), 8 + in_low)),
    }
}

/// `end - start` of two thirteen-digit numbers at `start_at` and `end_at`; with
/// `VALIDATE`, `None` unless both are thirteen digits without a leading zero. Without
/// it, the caller vouches for the digits (the index validated them).
///
/// When their first five digits agree (a call shorter than 27 hours that does not
/// cross a 10^8 ms boundary: nearly always) only the last eight digits of each are
/// converted.
#[inline(always)]
pub(super) fn thirteen_digit_difference<const VALIDATE: bool>(
    bytes: &[u8],
    start_at: usize,
    end_at: usize,
) -> Option<i64> {
    let (start_high, start_low) = thirteen_digit_words::<VALIDATE>(bytes, start_at)?;
    let (end_high, end_low) = thirteen_digit_words::<VALIDATE>(bytes, end_at)?;
    // Values below 10^13 fit in i64 with room to spare.
    if (start_high ^ end_high) & 0xFF_FFFF_FFFF == 0 {
        Some(digits_value(end_low, 8) as i64 - digits_value(start_low, 8) as i64)
    } else {
        let value = |high, low| (digits_value(high, 8) * 100_000 + digits_value(low >> 24, 5)) as i64;
        Some(value(end_high, end_low) - value(start_high, start_low))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn scalar(bytes: &[u8]) -> Option<(u64, usize)> {
        let digits: Vec<u8> = bytes.iter().copied().take_while(u8::is_ascii_digit).collect();
        if digits.is_empty() {
            return Some((0, 0));
        }
        std::str::from_utf8(&digits).ok()?.parse::<u64>().ok().map(|v| (v, digits.len()))
    }

    #[test]
    fn parses_reference_dates_and_stops_at_the_first_non_digit() {
        assert_eq!(parse_digits(b"1684957028364,\"end", 0), Some((1_684_957_028_364, 13)));
        assert_eq!(parse_digits(b"x12", 1), Some((12, 2)));
        assert_eq!(parse_digits(b"}", 0), Some((0, 0)));
        assert_eq!(parse_digits(b"", 0), Some((0, 0)));
    }

    #[test]
    fn u64_max_fits_and_one_more_overflows() {
        assert_eq!(parse_digits(b"18446744073709551615]", 0), Some((u64::MAX, 20)));
        assert_eq!(parse_digits(b"18446744073709551616]", 0), None);
        assert_eq!(parse_digits(b"99999999999999999999999", 0), None);
    }

    #[test]
    fn every_byte_value_is_classified_like_is_ascii_digit() {
        for b in 0u8..=255 {
            let word = u64::from_le_bytes([b, b'1', b'1', b'1', b'1', b'1', b'1', b'1']);
            assert_eq!(leading_digits(word) > 0, b.is_ascii_digit(), "byte {b:#x}");
        }
    }

    #[test]
    fn thirteen_digits_needs_exactly_thirteen_leading_digits_and_no_leading_zero() {
        assert_eq!(thirteen_digits(b"1684957028364,", 0), Some(1_684_957_028_364));
        assert_eq!(thirteen_digits(b"x9999999999999}", 1), Some(9_999_999_999_999));
        assert_eq!(thirteen_digits(b"1000000000000", 0), Some(1_000_000_000_000));
        assert_eq!(thirteen_digits(b"0684957028364,", 0), None);
        assert_eq!(thirteen_digits(b"168495702836,", 0), None);
        assert_eq!(thirteen_digits(b"16849570.8364,", 0), None);
        assert_eq!(thirteen_digits(b"168495702836", 0), None);
    }

    proptest! {
        #[test]
        fn thirteen_digit_difference_is_the_exact_difference(a in 1_000_000_000_000u64..10_000_000_000_000, delta in -200_000_000i64..200_000_000, near in any::<bool>()) {
            let b = if near { a.saturating_add_signed(delta).clamp(1_000_000_000_000, 9_999_999_999_999) } else { 9_999_999_999_999 - a + 1_000_000_000_000 };
            let text = format!("{a},{b}");
            prop_assert_eq!(thirteen_digit_difference::<true>(text.as_bytes(), 0, 14), Some(b as i64 - a as i64));
            prop_assert_eq!(thirteen_digit_difference::<false>(text.as_bytes(), 0, 14), Some(b as i64 - a as i64));
        }

        #[test]
        fn thirteen_digits_agrees_with_str_parse(text in "[1-9][0-9]{12}", tail in "[^0-9]?") {
            let full = format!("{text}{tail}");
            prop_assert_eq!(thirteen_digits(full.as_bytes(), 0), text.parse::<u64>().ok());
        }

        #[test]
        fn thirteen_digits_descend_is_the_order_of_the_values(a in 1_000_000_000_000u64..10_000_000_000_000, delta in -1_000i64..1_000, far in any::<bool>()) {
            let b = if far { 10_999_999_999_999 - a } else { a.saturating_add_signed(delta).clamp(1_000_000_000_000, 9_999_999_999_999) };
            let text = format!("{a},{b}");
            prop_assert_eq!(thirteen_digits_descend(text.as_bytes(), 0, 14), Some(b < a));
        }

        #[test]
        fn up_to_sixteen_digits_agrees_with_str_parse(digits in "[0-9]{0,20}", suffix in "[^0-9]{16}") {
            let text = format!("{digits}{suffix}");
            let expected = (1..=16).contains(&digits.len()).then(|| (digits.parse::<u64>().unwrap(), digits.len()));
            prop_assert_eq!(up_to_sixteen_digits(text.as_bytes(), 0), expected);
        }

        #[test]
        fn agrees_with_str_parse(prefix in "[0-9]{0,24}", suffix in "[^0-9]{0,3}", lead in 0usize..3) {
            let text = format!("{}{prefix}{suffix}", "-".repeat(lead));
            prop_assert_eq!(parse_digits(text.as_bytes(), lead), scalar(&text.as_bytes()[lead..]));
        }
    }
}
