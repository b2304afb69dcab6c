//! Numbers as jsonb prints them: jsonb keeps every number as `numeric`, so
//! a float's `1e+20` becomes `100000000000000000000` and `1.5e-07` becomes
//! `0.00000015` (numeric_in's scale rule), and `-0` becomes `0`.

/// Writes `text` (a JSON or float number) as `numeric_out(numeric_in(text))`
/// would. Returns `false`, writing nothing, if `text` is not a number.
pub fn write_normalized(out: &mut Vec<u8>, text: &[u8]) -> bool {
    let Some(number) = Parsed::new(text) else {
        return false;
    };
    // Fast path: plain decimals without leading zeros print as they are.
    if number.exponent == 0 && !number.is_zero() && number.integer_digits_are_canonical() {
        out.extend_from_slice(text);
        return true;
    }
    number.write(out);
    true
}

/// A decimal number split into its parts.
struct Parsed<'a> {
    negative: bool,
    integer: &'a [u8],
    fraction: &'a [u8],
    exponent: i64,
}

impl<'a> Parsed<'a> {
    fn new(text: &'a [u8]) -> Option<Self> {
        let (negative, rest) = match text.split_first() {
            Some((b'-', rest)) => (true, rest),
            Some((b'+', rest)) => (false, rest),
            _ => (false, text),
        };
        let mantissa_end = rest
            .iter()
            .position(|b| matches!(b, b'e' | b'E'))
            .unwrap_or(rest.len());
        let (mantissa, exponent) = rest.split_at(mantissa_end);
        let (integer, fraction) = match mantissa.iter().position(|&b| b == b'.') {
            Some(dot) => (&mantissa[..dot], &mantissa[dot + 1..]),
            None => (mantissa, &mantissa[mantissa.len()..]),
        };
        let all_digits = |s: &[u8]| s.iter().all(u8::is_ascii_digit);
        if integer.is_empty() && fraction.is_empty()
            || !all_digits(integer)
            || !all_digits(fraction)
        {
            return None;
        }
        let exponent = match exponent.split_first() {
            None => 0,
            Some((_, digits)) => {
                let digits = std::str::from_utf8(digits).ok()?;
                // Postgres caps exponents far below this; reject absurd ones.
                let e: i64 = digits.parse().ok()?;
                if e.abs() > 100_000 {
                    return None;
                }
                e
            }
        };
        Some(Parsed {
            negative,
            integer,
            fraction,
            exponent,
        })
    }

    fn is_zero(&self) -> bool {
        self.integer.iter().chain(self.fraction).all(|&b| b == b'0')
    }

    fn integer_digits_are_canonical(&self) -> bool {
        !self.integer.is_empty() && (self.integer.len() == 1 || self.integer[0] != b'0')
    }

    fn write(&self, out: &mut Vec<u8>) {
        // The digits are integer ++ fraction; `point` is where the decimal
        // point falls among them once the exponent is applied. Positions
        // outside the digits are zeros.
        let digit_at = |i: i64| -> u8 {
            let i = usize::try_from(i).ok();
            let fraction_index = i.and_then(|i| i.checked_sub(self.integer.len()));
            i.and_then(|i| self.integer.get(i))
                .or_else(|| fraction_index.and_then(|f| self.fraction.get(f)))
                .copied()
                .unwrap_or(b'0')
        };
        let point = self.integer.len() as i64 + self.exponent;
        let scale = (self.fraction.len() as i64 - self.exponent).max(0);
        if self.negative && !self.is_zero() {
            out.push(b'-');
        }
        // Integer part, without leading zeros.
        let start = out.len();
        for i in 0..point.max(0) {
            let digit = digit_at(i);
            if out.len() == start && digit == b'0' {
                continue;
            }
            out.push(digit);
        }
        if out.len() == start {
            out.push(b'0');
        }
        if scale > 0 {
            out.push(b'.');
            for i in point..point + scale {
                out.push(digit_at(i));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(text: &str) -> String {
        let mut out = Vec::new();
        assert!(
            write_normalized(&mut out, text.as_bytes()),
            "{text} rejected"
        );
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn expands_exponents_like_numeric_in() {
        assert_eq!(norm("1e+20"), "100000000000000000000");
        assert_eq!(norm("1.5e-07"), "0.00000015");
        assert_eq!(
            norm("3.4028235e+38"),
            "340282350000000000000000000000000000000"
        );
        assert_eq!(norm("1.234e+2"), "123.4");
        assert_eq!(norm("1E2"), "100");
        assert_eq!(norm("-2.5e-3"), "-0.0025");
        assert_eq!(norm("5e-324").len(), "0.".len() + 324);
    }

    #[test]
    fn keeps_plain_decimals_and_scale() {
        for same in [
            "0",
            "1.50",
            "-7",
            "123.456",
            "0.0001",
            "12345678901234567890.123456789",
        ] {
            assert_eq!(norm(same), same);
        }
    }

    #[test]
    fn zero_has_no_sign_and_leading_zeros_go() {
        assert_eq!(norm("-0"), "0");
        assert_eq!(norm("-0.00"), "0.00");
        assert_eq!(norm("007"), "7");
        assert_eq!(norm("0e5"), "0");
    }

    #[test]
    fn rejects_non_numbers() {
        for bad in [
            "",
            "-",
            "NaN",
            "Infinity",
            "1e",
            "e5",
            ".",
            "1.2.3",
            "0x10",
            "1e999999999",
        ] {
            assert!(
                !write_normalized(&mut Vec::new(), bad.as_bytes()),
                "{bad} accepted"
            );
        }
    }
}
