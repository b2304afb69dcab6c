//! A column value's text output, read as a key that compares exactly as
//! Postgres compares the typed value — for the few types where that is
//! provable. Whatever does not parse is left to the server by the caller.
//!
//! | scalar | Postgres's rule reproduced |
//! |---|---|
//! | `Int` | int2/int4/int8 integer order |
//! | `Float` | float4/float8: NaN = NaN and NaN > everything, -0 = 0 (`float8_cmp_internal`) |
//! | `Numeric` | exact decimal order, scale ignored (1.50 = 1.5); -Infinity < numbers < Infinity < NaN = NaN |
//! | `Bool` | false < true |
//! | `Bytes` | byte order, which equals the type's order for uuid (canonical lower-case hex) and for text under a C/POSIX collation, and the type's equality for text under any deterministic collation and for enum labels |
//! | `Date`, `Timestamp`, `TimestampTz` | -infinity < instants < infinity; BC years and years past 9999 by their value, offsets applied |

use std::cmp::Ordering;

/// How a type's text output is read into a [`Key`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Scalar {
    /// int2, int4, int8.
    Int,
    /// float4, float8: the shortest text that reads back exactly.
    Float,
    /// numeric.
    Numeric,
    /// bool (`t` / `f`).
    Bool,
    /// The text's bytes.
    Bytes,
    /// date (ISO).
    Date,
    /// timestamp (ISO).
    Timestamp,
    /// timestamptz (ISO, with an offset).
    TimestampTz,
}

/// A comparable value; `B` holds bytes (borrowed from a change, or owned
/// by a compiled filter).
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Key<B> {
    /// An integer.
    Int(i64),
    /// A float.
    Float(f64),
    /// A numeric.
    Numeric(Numeric<B>),
    /// A boolean.
    Bool(bool),
    /// Raw bytes.
    Bytes(B),
    /// A date (days) or timestamp (microseconds), UTC for timestamptz.
    Time(Time),
}

/// A numeric, normalized: no leading zeros in `int`, no trailing zeros in
/// `frac`, zero never negative.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) enum Numeric<B> {
    /// `-Infinity`.
    NegInfinity,
    /// A number.
    Finite {
        /// Below zero.
        negative: bool,
        /// Integer digits.
        int: B,
        /// Fraction digits.
        frac: B,
    },
    /// `Infinity`.
    Infinity,
    /// `NaN`: equal to itself, above everything.
    NaN,
}

/// A point in time or date, with the infinities at the ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(super) enum Time {
    /// `-infinity`.
    NegInfinity,
    /// Days (dates) or microseconds (timestamps) since 1970-01-01.
    At(i128),
    /// `infinity`.
    Infinity,
}

impl Scalar {
    /// Reads `text` (the type's text output); `None` if it is not in the
    /// expected form.
    pub(super) fn parse(self, text: &[u8]) -> Option<Key<&[u8]>> {
        Some(match self {
            Scalar::Int => Key::Int(std::str::from_utf8(text).ok()?.parse().ok()?),
            Scalar::Float => Key::Float(std::str::from_utf8(text).ok()?.parse().ok()?),
            Scalar::Numeric => Key::Numeric(parse_numeric(text)?),
            Scalar::Bool => Key::Bool(match text {
                b"t" => true,
                b"f" => false,
                _ => return None,
            }),
            Scalar::Bytes => Key::Bytes(text),
            Scalar::Date => Key::Time(parse_time(text, false, false)?),
            Scalar::Timestamp => Key::Time(parse_time(text, true, false)?),
            Scalar::TimestampTz => Key::Time(parse_time(text, true, true)?),
        })
    }
}

impl<B: AsRef<[u8]>> Key<B> {
    /// The same key, borrowing its bytes.
    pub(super) fn view(&self) -> Key<&[u8]> {
        match self {
            Key::Int(i) => Key::Int(*i),
            Key::Float(f) => Key::Float(*f),
            Key::Numeric(n) => Key::Numeric(match n {
                Numeric::NegInfinity => Numeric::NegInfinity,
                Numeric::Finite {
                    negative,
                    int,
                    frac,
                } => Numeric::Finite {
                    negative: *negative,
                    int: int.as_ref(),
                    frac: frac.as_ref(),
                },
                Numeric::Infinity => Numeric::Infinity,
                Numeric::NaN => Numeric::NaN,
            }),
            Key::Bool(b) => Key::Bool(*b),
            Key::Bytes(b) => Key::Bytes(b.as_ref()),
            Key::Time(t) => Key::Time(*t),
        }
    }
}

impl Key<&[u8]> {
    /// An owned copy, to keep in a compiled filter.
    pub(super) fn to_owned_key(&self) -> Key<Box<[u8]>> {
        match self {
            Key::Int(i) => Key::Int(*i),
            Key::Float(f) => Key::Float(*f),
            Key::Numeric(n) => Key::Numeric(match n {
                Numeric::NegInfinity => Numeric::NegInfinity,
                Numeric::Finite {
                    negative,
                    int,
                    frac,
                } => Numeric::Finite {
                    negative: *negative,
                    int: Box::from(*int),
                    frac: Box::from(*frac),
                },
                Numeric::Infinity => Numeric::Infinity,
                Numeric::NaN => Numeric::NaN,
            }),
            Key::Bool(b) => Key::Bool(*b),
            Key::Bytes(b) => Key::Bytes(Box::from(*b)),
            Key::Time(t) => Key::Time(*t),
        }
    }
}

/// Postgres's order of `a` and `b`; `None` if they are of different kinds.
pub(super) fn compare(a: &Key<&[u8]>, b: &Key<&[u8]>) -> Option<Ordering> {
    Some(match (a, b) {
        (Key::Int(a), Key::Int(b)) => a.cmp(b),
        (Key::Float(a), Key::Float(b)) => match (a.is_nan(), b.is_nan()) {
            (true, true) => Ordering::Equal,
            (true, false) => Ordering::Greater,
            (false, true) => Ordering::Less,
            // Neither is NaN: a total order, with -0 == 0.
            (false, false) => a.partial_cmp(b)?,
        },
        (Key::Numeric(a), Key::Numeric(b)) => compare_numeric(a, b),
        (Key::Bool(a), Key::Bool(b)) => a.cmp(b),
        (Key::Bytes(a), Key::Bytes(b)) => a.cmp(b),
        (Key::Time(a), Key::Time(b)) => a.cmp(b),
        _ => return None,
    })
}

fn numeric_rank<B>(n: &Numeric<B>) -> u8 {
    match n {
        Numeric::NegInfinity => 0,
        Numeric::Finite { .. } => 1,
        Numeric::Infinity => 2,
        Numeric::NaN => 3,
    }
}

fn compare_numeric(a: &Numeric<&[u8]>, b: &Numeric<&[u8]>) -> Ordering {
    match (a, b) {
        (
            Numeric::Finite {
                negative: an,
                int: ai,
                frac: af,
            },
            Numeric::Finite {
                negative: bn,
                int: bi,
                frac: bf,
            },
        ) => match (an, bn) {
            (false, true) => Ordering::Greater,
            (true, false) => Ordering::Less,
            // Without leading zeros, more integer digits is bigger; without
            // trailing zeros, fractions compare as digit strings.
            (false, false) => (ai.len(), ai, af).cmp(&(bi.len(), bi, bf)),
            (true, true) => (bi.len(), bi, bf).cmp(&(ai.len(), ai, af)),
        },
        _ => numeric_rank(a).cmp(&numeric_rank(b)),
    }
}

/// `numeric_out`'s forms: `NaN`, `Infinity`, `-Infinity`, `-?\d+(\.\d+)?`.
fn parse_numeric(text: &[u8]) -> Option<Numeric<&[u8]>> {
    match text {
        b"NaN" => return Some(Numeric::NaN),
        b"Infinity" => return Some(Numeric::Infinity),
        b"-Infinity" => return Some(Numeric::NegInfinity),
        _ => {}
    }
    let (negative, digits) = match text.strip_prefix(b"-") {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let (int, frac) = match digits.iter().position(|&b| b == b'.') {
        Some(dot) => (&digits[..dot], &digits[dot + 1..]),
        None => (digits, &digits[digits.len()..]),
    };
    if int.is_empty() || !int.iter().chain(frac).all(u8::is_ascii_digit) {
        return None;
    }
    let int = &int[int.iter().position(|&b| b != b'0').unwrap_or(int.len())..];
    let frac = &frac[..frac.iter().rposition(|&b| b != b'0').map_or(0, |p| p + 1)];
    let zero = int.is_empty() && frac.is_empty();
    Some(Numeric::Finite {
        negative: negative && !zero,
        int,
        frac,
    })
}

/// Reads ISO `date`, `timestamp` and `timestamptz` output:
/// `Y+-MM-DD[ HH:MM:SS[.ffffff][±HH[:MM[:SS]]]][ BC]`, or `±infinity`.
/// Dates become days and timestamps microseconds since 1970-01-01 (UTC
/// for timestamptz), in the proleptic Gregorian calendar Postgres uses.
fn parse_time(text: &[u8], with_time: bool, with_zone: bool) -> Option<Time> {
    match text {
        b"infinity" => return Some(Time::Infinity),
        b"-infinity" => return Some(Time::NegInfinity),
        _ => {}
    }
    let (text, bc) = match text.strip_suffix(b" BC") {
        Some(rest) => (rest, true),
        None => (text, false),
    };
    let mut p = Cursor(text);
    let year = p.number(1, 7)?;
    p.expect(b'-')?;
    let month = p.number(2, 2)?;
    p.expect(b'-')?;
    let day = p.number(2, 2)?;
    if year == 0 || !(1..=12).contains(&month) || !(1..=31).contains(&day) {
        return None;
    }
    let year = if bc { 1 - year } else { year };
    let days = days_from_civil(year, month, day);
    if !with_time {
        return p.0.is_empty().then_some(Time::At(days));
    }
    p.expect(b' ')?;
    let hour = p.number(2, 2)?;
    p.expect(b':')?;
    let minute = p.number(2, 2)?;
    p.expect(b':')?;
    let second = p.number(2, 2)?;
    if hour > 24 || minute > 59 || second > 60 {
        return None;
    }
    let mut micros = 0;
    if p.0.first() == Some(&b'.') {
        p.expect(b'.')?;
        let digits = p.0.iter().take_while(|b| b.is_ascii_digit()).count();
        if !(1..=6).contains(&digits) {
            return None;
        }
        micros = p.number(digits, digits)? * 10i128.pow(6 - digits as u32);
    }
    let mut offset = 0;
    if with_zone {
        let sign = match p.0.first() {
            Some(b'+') => 1,
            Some(b'-') => -1,
            _ => return None,
        };
        p.0 = &p.0[1..];
        let mut seconds = p.number(2, 2)? * 3600;
        if p.0.first() == Some(&b':') {
            p.expect(b':')?;
            seconds += p.number(2, 2)? * 60;
            if p.0.first() == Some(&b':') {
                p.expect(b':')?;
                seconds += p.number(2, 2)?;
            }
        }
        offset = sign * seconds;
    }
    if !p.0.is_empty() {
        return None;
    }
    let seconds = days * 86_400 + hour * 3600 + minute * 60 + second - offset;
    Some(Time::At(seconds * 1_000_000 + micros))
}

/// A reader over ASCII bytes.
struct Cursor<'a>(&'a [u8]);

impl Cursor<'_> {
    fn expect(&mut self, byte: u8) -> Option<()> {
        self.0 = self.0.strip_prefix(&[byte])?;
        Some(())
    }

    /// Between `min` and `max` decimal digits (as many as there are).
    fn number(&mut self, min: usize, max: usize) -> Option<i128> {
        let n = self
            .0
            .iter()
            .take(max)
            .take_while(|b| b.is_ascii_digit())
            .count();
        if n < min {
            return None;
        }
        let value = self.0[..n]
            .iter()
            .fold(0i128, |acc, &d| acc * 10 + i128::from(d - b'0'));
        self.0 = &self.0[n..];
        Some(value)
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (astronomical
/// year: 1 BC is 0), after Howard Hinnant's `days_from_civil`.
fn days_from_civil(year: i128, month: i128, day: i128) -> i128 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmp(scalar: Scalar, a: &str, b: &str) -> Ordering {
        let (ka, kb) = (scalar.parse(a.as_bytes()), scalar.parse(b.as_bytes()));
        let (Some(ka), Some(kb)) = (ka, kb) else {
            panic!("{scalar:?}: {a} or {b} does not parse");
        };
        compare(&ka, &kb).unwrap()
    }

    /// Each list is in Postgres's ascending order; neighbours in a group
    /// (separated by `=`) are equal.
    fn assert_order(scalar: Scalar, sorted: &[&str]) {
        let groups: Vec<Vec<&str>> = sorted.split(|s| *s == "=").map(<[&str]>::to_vec).collect();
        let flat: Vec<(usize, &str)> = groups
            .iter()
            .enumerate()
            .flat_map(|(g, items)| items.iter().map(move |i| (g, *i)))
            .collect();
        for (ga, a) in &flat {
            for (gb, b) in &flat {
                let expected = match (ga, gb) {
                    _ if a == b => Ordering::Equal,
                    _ => ga.cmp(gb),
                };
                assert_eq!(cmp(scalar, a, b), expected, "{scalar:?}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn integers() {
        for w in [
            "-9223372036854775808",
            "-1",
            "0",
            "7",
            "9223372036854775807",
        ]
        .windows(2)
        {
            assert_eq!(cmp(Scalar::Int, w[0], w[1]), Ordering::Less);
        }
        assert_eq!(Scalar::Int.parse(b"1.5"), None);
        assert_eq!(Scalar::Int.parse(b"99999999999999999999"), None);
    }

    #[test]
    fn floats_order_as_postgres() {
        let sorted = [
            "-Infinity",
            "-1.7976931348623157e+308",
            "-1",
            "-5e-324",
            "0",
            "-0",
            "5e-324",
            "0.1",
            "0.30000000000000004",
            "1e+20",
            "Infinity",
            "NaN",
        ];
        for (i, a) in sorted.iter().enumerate() {
            for (j, b) in sorted.iter().enumerate() {
                let expected = match (*a, *b) {
                    ("0" | "-0", "0" | "-0") => Ordering::Equal,
                    _ => i.cmp(&j),
                };
                assert_eq!(cmp(Scalar::Float, a, b), expected, "{a} vs {b}");
            }
        }
    }

    #[test]
    fn numerics_are_exact_decimals() {
        assert_order(
            Scalar::Numeric,
            &[
                "-Infinity",
                "=",
                "-123456789012345678901234567890.5",
                "=",
                "-10",
                "=",
                "-9.99",
                "=",
                "-0.000000001",
                "=",
                "0",
                "0.0",
                "0.000",
                "=",
                "0.000000001",
                "=",
                "1.5",
                "1.50",
                "1.500000",
                "=",
                "1.51",
                "=",
                "10",
                "10.0",
                "=",
                "123456789012345678901234567890.5",
                "=",
                "Infinity",
                "=",
                "NaN",
            ],
        );
        assert_eq!(Scalar::Numeric.parse(b"1e5"), None);
        assert_eq!(Scalar::Numeric.parse(b".5"), None);
        assert_eq!(Scalar::Numeric.parse(b"-"), None);
    }

    #[test]
    fn dates_and_timestamps() {
        assert_order(
            Scalar::Date,
            &[
                "-infinity",
                "=",
                "4713-01-01 BC",
                "=",
                "0044-03-15 BC",
                "=",
                "0001-12-31 BC",
                "=",
                "0001-01-01",
                "=",
                "1970-01-01",
                "=",
                "2024-02-29",
                "=",
                "2024-03-01",
                "=",
                "5874897-12-31",
                "=",
                "infinity",
            ],
        );
        assert_eq!(
            Scalar::Date.parse(b"1970-01-02"),
            Some(Key::Time(Time::At(1)))
        );
        assert_eq!(Scalar::Date.parse(b"0000-01-01"), None);
        assert_order(
            Scalar::Timestamp,
            &[
                "-infinity",
                "=",
                "0044-03-15 12:00:00 BC",
                "=",
                "1999-12-31 23:59:59.999999",
                "=",
                "2000-01-01 00:00:00",
                "=",
                "2000-01-01 00:00:00.5",
                "=",
                "10000-01-01 00:00:00",
                "=",
                "infinity",
            ],
        );
        assert_order(
            Scalar::TimestampTz,
            &[
                "0044-03-15 12:00:00+00 BC",
                "=",
                "2000-01-01 00:00:00+00",
                "2000-01-01 05:30:00+05:30",
                "1999-12-31 16:00:00-08",
                "2000-01-01 00:53:28+00:53:28",
                "=",
                "2000-01-01 00:00:00.000001+00",
                "=",
                "2000-01-01 00:00:01+00",
                "=",
                "infinity",
            ],
        );
        for bad in [
            "2024-01-02",
            "2024-01-02 03:04",
            "2024-01-02 03:04:05.1234567+00",
            "x",
        ] {
            assert_eq!(Scalar::TimestampTz.parse(bad.as_bytes()), None, "{bad}");
        }
        assert_eq!(Scalar::Timestamp.parse(b"2024-01-02 03:04:05+00"), None);
    }

    #[test]
    fn bytes_and_bools() {
        assert_order(Scalar::Bool, &["f", "=", "t"]);
        assert_eq!(Scalar::Bool.parse(b"true"), None);
        assert_order(
            Scalar::Bytes,
            &["", "=", "A", "=", "a", "=", "a b", "=", "ab", "=", "é"],
        );
    }

    #[test]
    fn mixed_kinds_do_not_compare() {
        let a = Scalar::Int.parse(b"1").unwrap();
        let b = Scalar::Bytes.parse(b"1").unwrap();
        assert_eq!(compare(&a, &b), None);
    }

    #[test]
    fn owned_keys_compare_as_borrowed() {
        let k = Scalar::Numeric.parse(b"-001.500").unwrap();
        let owned = k.to_owned_key();
        assert_eq!(compare(&owned.view(), &k), Some(Ordering::Equal));
    }
}
