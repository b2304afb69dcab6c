//! Timestamps as `to_jsonb` writes them (XSD style): the text output with
//! `T` between date and time and a `+hh:mm` offset. The daemon's session
//! pins `DateStyle=ISO` and `TimeZone=UTC`, so the input is ISO text.

/// `2024-01-02 03:04:05.5` → `"2024-01-02T03:04:05.5"`; `infinity` stays.
pub fn write_timestamp(out: &mut Vec<u8>, text: &[u8]) {
    out.push(b'"');
    write_with_t(out, text);
    out.push(b'"');
}

/// `2024-01-02 03:04:05+00` → `"2024-01-02T03:04:05+00:00"`; a `BC`
/// suffix stays after the offset, as Postgres puts it.
pub fn write_timestamptz(out: &mut Vec<u8>, text: &[u8]) {
    out.push(b'"');
    let (body, bc) = match text.strip_suffix(b" BC") {
        Some(body) => (body, true),
        None => (text, false),
    };
    write_with_t(out, body);
    // The offset is the last `+`/`-` after the time started.
    let time_start = body.iter().position(|&b| b == b' ').unwrap_or(body.len());
    let offset = body
        .get(time_start..)
        .and_then(|time| time.iter().rposition(|&b| b == b'+' || b == b'-'))
        .map(|i| &body[time_start + i..]);
    if offset.is_some_and(|o| !o.contains(&b':')) {
        out.extend_from_slice(b":00");
    }
    if bc {
        out.extend_from_slice(b" BC");
    }
    out.push(b'"');
}

fn write_with_t(out: &mut Vec<u8>, text: &[u8]) {
    match text.iter().position(|&b| b == b' ') {
        // `infinity` and `-infinity` have no space.
        Some(space) if text.first().is_some_and(u8::is_ascii_digit) => {
            out.extend_from_slice(&text[..space]);
            out.push(b'T');
            out.extend_from_slice(&text[space + 1..]);
        }
        _ => out.extend_from_slice(text),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(f: fn(&mut Vec<u8>, &[u8]), text: &str) -> String {
        let mut out = Vec::new();
        f(&mut out, text.as_bytes());
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn timestamps_get_a_t() {
        assert_eq!(
            ts(write_timestamp, "2024-01-02 03:04:05.123456"),
            "\"2024-01-02T03:04:05.123456\""
        );
        assert_eq!(
            ts(write_timestamp, "0044-03-15 12:00:00 BC"),
            "\"0044-03-15T12:00:00 BC\""
        );
        assert_eq!(ts(write_timestamp, "infinity"), "\"infinity\"");
        assert_eq!(ts(write_timestamp, "-infinity"), "\"-infinity\"");
    }

    #[test]
    fn offsets_get_minutes() {
        assert_eq!(
            ts(write_timestamptz, "2024-01-02 01:04:05.5+00"),
            "\"2024-01-02T01:04:05.5+00:00\""
        );
        assert_eq!(
            ts(write_timestamptz, "2024-01-02 01:04:05-05:30"),
            "\"2024-01-02T01:04:05-05:30\""
        );
        assert_eq!(
            ts(write_timestamptz, "0044-03-15 12:00:00+00 BC"),
            "\"0044-03-15T12:00:00+00:00 BC\""
        );
        assert_eq!(
            ts(write_timestamptz, "294276-12-31 23:59:59+00"),
            "\"294276-12-31T23:59:59+00:00\""
        );
        assert_eq!(ts(write_timestamptz, "-infinity"), "\"-infinity\"");
    }
}
