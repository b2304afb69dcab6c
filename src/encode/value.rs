//! One column value → JSON, by the column type's [`Encoding`].

use super::{array, composite, datetime, json, number};
use crate::catalog::{Encoding, TypeInfo};

/// Text that does not have the shape its type promises. Postgres wrote it,
/// so this means a bug or a type whose text output we misjudged; the value
/// is then sent as a JSON string of its text rather than lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Malformed;

/// Writes the JSON for a value of type `ty` given its text output.
pub fn write_value(out: &mut Vec<u8>, ty: &TypeInfo, text: &[u8]) {
    let start = out.len();
    if write_value_checked(out, ty, text).is_err() {
        out.truncate(start);
        write_json_string(out, text);
    }
}

/// As [`write_value`], but reports text that does not parse as its type.
pub(super) fn write_value_checked(
    out: &mut Vec<u8>,
    ty: &TypeInfo,
    text: &[u8],
) -> Result<(), Malformed> {
    match &ty.encoding {
        Encoding::Bool => match text {
            b"t" => out.extend_from_slice(b"true"),
            b"f" => out.extend_from_slice(b"false"),
            _ => return Err(Malformed),
        },
        Encoding::Integer => {
            if text.is_empty()
                || !text
                    .iter()
                    .enumerate()
                    .all(|(i, b)| b.is_ascii_digit() || (i == 0 && *b == b'-'))
            {
                return Err(Malformed);
            }
            out.extend_from_slice(text);
        }
        // JSON has no NaN or infinities: to_jsonb makes them strings.
        Encoding::Float | Encoding::Numeric => match text {
            b"NaN" | b"Infinity" | b"-Infinity" => write_json_string(out, text),
            _ if number::write_normalized(out, text) => {}
            _ => return Err(Malformed),
        },
        Encoding::Json => json::write_normalized(out, text)?,
        // jsonb's text output is already normalized JSON.
        Encoding::Jsonb => out.extend_from_slice(text),
        Encoding::Timestamp => datetime::write_timestamp(out, text),
        Encoding::TimestampTz => datetime::write_timestamptz(out, text),
        Encoding::Array(element) => array::write_array(out, element, text)?,
        Encoding::Vector(element) => array::write_vector(out, element, text)?,
        Encoding::Composite(fields) => composite::write_composite(out, fields, text)?,
        // Rendering a json cast needs the server; until then, the text.
        Encoding::Text | Encoding::JsonCast => write_json_string(out, text),
    }
    Ok(())
}

/// Writes `text` as a JSON string, escaping as Postgres's `escape_json`
/// does. Invalid UTF-8 (never sent with client_encoding UTF8) is replaced
/// with U+FFFD rather than passed through.
pub fn write_json_string(out: &mut Vec<u8>, text: &[u8]) {
    // ASCII (most values) needs no UTF-8 check; anything else is checked
    // once, and only invalid text pays for a lossy copy.
    if text.is_ascii() || std::str::from_utf8(text).is_ok() {
        write_escaped(out, text);
    } else {
        write_escaped(out, String::from_utf8_lossy(text).as_bytes());
    }
}

/// Writes valid UTF-8 `bytes` as a JSON string.
fn write_escaped(out: &mut Vec<u8>, bytes: &[u8]) {
    out.reserve(bytes.len() + 2);
    out.push(b'"');
    let mut rest = bytes;
    while let Some(at) = first_to_escape(rest) {
        out.extend_from_slice(&rest[..at]);
        write_escape(out, rest[at]);
        rest = &rest[at + 1..];
    }
    out.extend_from_slice(rest);
    out.push(b'"');
}

/// Where the first byte JSON wants escaped is: a control character, `"`
/// or `\`. Text is mostly without any, so it is skipped eight bytes at a
/// time (wide text columns spent most of their encoding time here).
fn first_to_escape(bytes: &[u8]) -> Option<usize> {
    let (words, _) = bytes.as_chunks::<8>();
    let clean = words
        .iter()
        .take_while(|word| !word_needs_escape(u64::from_le_bytes(**word)))
        .count()
        * 8;
    bytes[clean..]
        .iter()
        .position(|&b| needs_escape(b))
        .map(|at| clean + at)
}

fn needs_escape(b: u8) -> bool {
    b < 0x20 || b == b'"' || b == b'\\'
}

/// Whether any byte of `word` [`needs_escape`]. Exact: the bit tricks can
/// misflag a byte only above one that truly matches.
fn word_needs_escape(word: u64) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH_BITS: u64 = 0x8080_8080_8080_8080;
    // A byte below n (n <= 0x80) borrows into its high bit, which the byte
    // itself did not have; a byte of 0x80 or more has it, and `!x` masks
    // it out.
    let has_below = |x: u64, n: u8| x.wrapping_sub(ONES * u64::from(n)) & !x & HIGH_BITS != 0;
    let has_byte = |x: u64, b: u8| has_below(x ^ (ONES * u64::from(b)), 1);
    has_below(word, 0x20) || has_byte(word, b'"') || has_byte(word, b'\\')
}

/// Writes the escape for `b`, one of the bytes [`needs_escape`] accepts, as
/// Postgres's `escape_json` does.
fn write_escape(out: &mut Vec<u8>, b: u8) {
    match b {
        b'"' => out.extend_from_slice(b"\\\""),
        b'\\' => out.extend_from_slice(b"\\\\"),
        b'\n' => out.extend_from_slice(b"\\n"),
        b'\r' => out.extend_from_slice(b"\\r"),
        b'\t' => out.extend_from_slice(b"\\t"),
        0x08 => out.extend_from_slice(b"\\b"),
        0x0c => out.extend_from_slice(b"\\f"),
        _ => {
            const HEX: &[u8; 16] = b"0123456789abcdef";
            out.extend_from_slice(b"\\u00");
            out.push(HEX[usize::from(b >> 4)]);
            out.push(HEX[usize::from(b & 0xF)]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::builtin;

    fn json(oid: u32, text: &str) -> String {
        let mut out = Vec::new();
        write_value(&mut out, &builtin(oid).unwrap(), text.as_bytes());
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn numbers_keep_their_digits_and_floats_lose_exponents() {
        assert_eq!(json(20, "-9223372036854775808"), "-9223372036854775808");
        assert_eq!(json(1700, "1.50"), "1.50");
        assert_eq!(
            json(1700, "12345678901234567890.123456789"),
            "12345678901234567890.123456789"
        );
        assert_eq!(json(701, "3.141592653589793"), "3.141592653589793");
        assert_eq!(json(701, "1e+20"), "100000000000000000000");
        assert_eq!(json(700, "-0"), "0");
    }

    #[test]
    fn non_finite_numbers_are_strings() {
        assert_eq!(json(1700, "NaN"), "\"NaN\"");
        assert_eq!(json(700, "Infinity"), "\"Infinity\"");
        assert_eq!(json(701, "-Infinity"), "\"-Infinity\"");
    }

    #[test]
    fn bools_json_text_and_dates() {
        assert_eq!(json(16, "t"), "true");
        assert_eq!(json(16, "f"), "false");
        assert_eq!(json(3802, "{\"a\": [1, 2]}"), "{\"a\": [1, 2]}");
        assert_eq!(json(114, "{\"b\":1,  \"a\":2}"), "{\"a\":2,\"b\":1}");
        assert_eq!(
            json(25, "say \"hi\"\\\n\t\u{1}é"),
            "\"say \\\"hi\\\"\\\\\\n\\t\\u0001é\""
        );
        assert_eq!(json(25, ""), "\"\"");
        assert_eq!(json(1082, "0044-03-15 BC"), "\"0044-03-15 BC\"");
        assert_eq!(json(1114, "2024-01-02 03:04:05"), "\"2024-01-02T03:04:05\"");
        assert_eq!(json(17, "\\xdeadbeef"), "\"\\\\xdeadbeef\"");
    }

    #[test]
    fn text_that_does_not_fit_its_type_is_kept_as_a_string() {
        assert_eq!(json(23, "12a"), "\"12a\"");
        assert_eq!(json(1007, "{1,"), "\"{1,\"");
        assert_eq!(json(16, "maybe"), "\"maybe\"");
    }

    #[test]
    fn every_escape_is_postgres_escape_json() {
        assert_eq!(
            json(25, "\u{8}\u{c}\n\r\t\u{0}\u{1f}\"\\/\u{7f}"),
            "\"\\b\\f\\n\\r\\t\\u0000\\u001f\\\"\\\\/\u{7f}\""
        );
    }

    #[test]
    fn a_word_needs_escaping_exactly_when_one_of_its_bytes_does() {
        for background in [b'a', 0x7f, 0xc3, 0xff, b' '] {
            for position in 0..8 {
                for b in 0..=255u8 {
                    let mut word = [background; 8];
                    word[position] = b;
                    assert_eq!(
                        word_needs_escape(u64::from_le_bytes(word)),
                        needs_escape(b),
                        "byte {b:#04x} at {position} among {background:#04x}"
                    );
                }
            }
        }
    }

    /// The escaper's loop as it was, a byte at a time (with the same
    /// escape table, which `every_escape_is_postgres_escape_json` checks).
    fn escaped_bytewise(bytes: &[u8]) -> Vec<u8> {
        let mut out = vec![b'"'];
        for &b in bytes {
            if needs_escape(b) {
                write_escape(&mut out, b);
            } else {
                out.push(b);
            }
        }
        out.push(b'"');
        out
    }

    #[test]
    fn escaping_a_word_at_a_time_matches_a_byte_at_a_time() {
        // Bytes around every boundary the word test draws, and plain text.
        const ALPHABET: &[u8] =
            b"\x00\x01\x08\x09\x0a\x0c\x0d\x1f\x20\x21\x22\x23\x5b\x5c\x5d\x7f\x80\xc3\xa9\xffab";
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..20_000 {
            let len = usize::try_from(next() % 40).unwrap_or(0);
            let sparse = next() % 2 == 0;
            let text: Vec<u8> = (0..len)
                .map(|_| {
                    let r = next();
                    if sparse && r % 8 != 0 {
                        b'x'
                    } else {
                        ALPHABET[usize::try_from(r % ALPHABET.len() as u64).unwrap_or(0)]
                    }
                })
                .collect();
            let mut out = Vec::new();
            write_escaped(&mut out, &text);
            assert_eq!(out, escaped_bytewise(&text), "{text:?}");
        }
    }
}
