//! Commit timestamps as Supabase shows them.

/// Microseconds from 1970-01-01 to 2000-01-01.
const POSTGRES_EPOCH_UNIX_MICROS: i64 = 946_684_800_000_000;

/// Writes `"YYYY-MM-DDTHH:MM:SS.mmmZ"` (UTC, milliseconds truncated) for a
/// Postgres timestamp in microseconds since 2000-01-01.
pub fn write_commit_timestamp(out: &mut Vec<u8>, postgres_micros: i64) {
    let unix_micros = postgres_micros.saturating_add(POSTGRES_EPOCH_UNIX_MICROS);
    let secs = unix_micros.div_euclid(1_000_000);
    let millis = unix_micros.rem_euclid(1_000_000) / 1_000;
    let (days, secs_of_day) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (year, month, day) = civil_from_days(days);
    // Written digit by digit: this runs once per change.
    out.push(b'"');
    if !(0..=9999).contains(&year) {
        // Outside what a commit time can be; keep it readable anyway.
        out.extend_from_slice(year.to_string().as_bytes());
    } else {
        push_digits(out, year as u32, 4);
    }
    out.push(b'-');
    push_digits(out, month, 2);
    out.push(b'-');
    push_digits(out, day, 2);
    out.push(b'T');
    push_digits(out, (secs_of_day / 3600) as u32, 2);
    out.push(b':');
    push_digits(out, (secs_of_day / 60 % 60) as u32, 2);
    out.push(b':');
    push_digits(out, (secs_of_day % 60) as u32, 2);
    out.push(b'.');
    push_digits(out, millis as u32, 3);
    out.extend_from_slice(b"Z\"");
}

/// Appends `value` as exactly `width` decimal digits (zero-padded).
pub(super) fn push_digits(out: &mut Vec<u8>, value: u32, width: u32) {
    let mut divisor = 10u32.pow(width.saturating_sub(1));
    while divisor > 0 {
        out.push(b'0' + (value / divisor % 10) as u8);
        divisor /= 10;
    }
}

/// Proleptic Gregorian date from days since 1970-01-01 (Howard Hinnant's
/// `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(micros: i64) -> String {
        let mut out = Vec::new();
        write_commit_timestamp(&mut out, micros);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn truncates_to_milliseconds_in_utc() {
        assert_eq!(render(0), "\"2000-01-01T00:00:00.000Z\"");
        assert_eq!(render(123_999), "\"2000-01-01T00:00:00.123Z\"");
        // 2026-11-22 20:57:22.459871 UTC
        let micros = 1_795_381_042_459_871 - POSTGRES_EPOCH_UNIX_MICROS;
        assert_eq!(render(micros), "\"2026-11-22T20:57:22.459Z\"");
        // 2024-02-29 23:59:59.999999: a leap day.
        let micros = 1_709_251_199_999_999 - POSTGRES_EPOCH_UNIX_MICROS;
        assert_eq!(render(micros), "\"2024-02-29T23:59:59.999Z\"");
    }
}
