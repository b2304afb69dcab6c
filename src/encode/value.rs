//! One column value → JSON.

use crate::pgoutput::Oid;

const BOOL: Oid = 16;
const INT8: Oid = 20;
const INT2: Oid = 21;
const INT4: Oid = 23;
const JSON: Oid = 114;
const FLOAT4: Oid = 700;
const FLOAT8: Oid = 701;
const NUMERIC: Oid = 1700;
const JSONB: Oid = 3802;

/// Writes the JSON for a value of type `type_id` given its text output.
pub fn write_value(out: &mut Vec<u8>, type_id: Oid, text: &[u8]) {
    match type_id {
        BOOL => out.extend_from_slice(if text == b"t" { b"true" } else { b"false" }),
        INT2 | INT4 | INT8 => out.extend_from_slice(text),
        // to_jsonb writes non-finite numbers as strings: JSON has no NaN.
        FLOAT4 | FLOAT8 | NUMERIC => match text {
            b"NaN" | b"Infinity" | b"-Infinity" => write_json_string(out, text),
            _ => out.extend_from_slice(text),
        },
        // Postgres validated both on input; jsonb's output is normalised,
        // json's is the text as written.
        JSON | JSONB => out.extend_from_slice(text),
        _ => write_json_string(out, text),
    }
}

/// Writes `text` as a JSON string, escaping as Postgres's `escape_json`
/// does. Invalid UTF-8 (never sent with client_encoding UTF8) is replaced
/// with U+FFFD rather than passed through.
pub fn write_json_string(out: &mut Vec<u8>, text: &[u8]) {
    let text = String::from_utf8_lossy(text);
    out.reserve(text.len() + 2);
    out.push(b'"');
    let bytes = text.as_bytes();
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let escape: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0x08 => b"\\b",
            0x0c => b"\\f",
            0x00..=0x1f => b"",
            _ => continue,
        };
        out.extend_from_slice(bytes.get(start..i).unwrap_or_default());
        if escape.is_empty() {
            out.extend_from_slice(format!("\\u{b:04x}").as_bytes());
        } else {
            out.extend_from_slice(escape);
        }
        start = i + 1;
    }
    out.extend_from_slice(bytes.get(start..).unwrap_or_default());
    out.push(b'"');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json(type_id: Oid, text: &str) -> String {
        let mut out = Vec::new();
        write_value(&mut out, type_id, text.as_bytes());
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn numbers_keep_their_digits() {
        assert_eq!(json(INT8, "-9223372036854775808"), "-9223372036854775808");
        assert_eq!(json(NUMERIC, "1.50"), "1.50");
        assert_eq!(
            json(NUMERIC, "12345678901234567890.123456789"),
            "12345678901234567890.123456789"
        );
        assert_eq!(json(FLOAT8, "3.141592653589793"), "3.141592653589793");
        assert_eq!(json(FLOAT8, "1e+20"), "1e+20");
    }

    #[test]
    fn non_finite_numbers_are_strings() {
        assert_eq!(json(NUMERIC, "NaN"), "\"NaN\"");
        assert_eq!(json(FLOAT4, "Infinity"), "\"Infinity\"");
        assert_eq!(json(FLOAT8, "-Infinity"), "\"-Infinity\"");
    }

    #[test]
    fn bools_json_and_text() {
        assert_eq!(json(BOOL, "t"), "true");
        assert_eq!(json(BOOL, "f"), "false");
        assert_eq!(json(JSONB, "{\"a\": [1, 2]}"), "{\"a\": [1, 2]}");
        assert_eq!(
            json(25, "say \"hi\"\\\n\t\u{1}é"),
            "\"say \\\"hi\\\"\\\\\\n\\t\\u0001é\""
        );
        assert_eq!(json(25, ""), "\"\"");
    }
}
