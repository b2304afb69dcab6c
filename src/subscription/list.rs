//! The elements of an `in` filter's list. Supabase stores `in.(a,b)` as
//! the array literal `{a,b}` and casts it to the column type's array, so
//! the elements are what Postgres's `array_in` reads there: unquoted
//! `NULL` is a NULL element, whitespace around unquoted elements is
//! dropped, `"..."` quotes and `\` escapes. Parsing here lets walcast count
//! them (at most [`MAX_IN_VALUES`]) and compare them in-process.

use super::filter::{FilterError, MAX_IN_VALUES};

/// Postgres's whitespace in array literals (`scanner_isspace`).
fn is_array_space(byte: u8) -> bool {
    matches!(byte, b' ' | b'\t' | b'\n' | b'\r' | b'\x0b' | b'\x0c')
}

/// The elements of the array literal `{inner}`, as Postgres's `array_in`
/// (PostgreSQL 17's stricter rules: an element is quoted whole or not at
/// all) reads a one-dimensional array of a type whose delimiter is `,`.
pub(super) fn parse(inner: &str) -> Result<Vec<Option<String>>, FilterError> {
    let malformed = |detail| FilterError::MalformedList {
        literal: format!("{{{inner}}}"),
        detail,
    };
    let bytes = inner.as_bytes();
    let mut items = Vec::new();
    let mut i = 0;
    let skip_space = |mut i: usize| {
        while bytes.get(i).is_some_and(|&b| is_array_space(b)) {
            i += 1;
        }
        i
    };
    i = skip_space(i);
    if i == bytes.len() {
        return Ok(items);
    }
    loop {
        if items.len() == MAX_IN_VALUES {
            return Err(FilterError::TooManyValues);
        }
        let mut element = Vec::new();
        match bytes.get(i) {
            None => return Err(malformed("Unexpected end of input.")),
            Some(b'{') => return Err(malformed("Unexpected \"{\" character (lists do not nest).")),
            Some(b'}') => return Err(malformed("Unexpected \"}\" character.")),
            Some(b',') => return Err(malformed("Unexpected \",\" character.")),
            Some(b'"') => {
                i += 1;
                loop {
                    match bytes.get(i) {
                        None => return Err(malformed("Unexpected end of input.")),
                        Some(b'\\') => match bytes.get(i + 1) {
                            Some(&b) => {
                                element.push(b);
                                i += 2;
                            }
                            None => return Err(malformed("Unexpected end of input.")),
                        },
                        Some(b'"') => {
                            i += 1;
                            break;
                        }
                        Some(&b) => {
                            element.push(b);
                            i += 1;
                        }
                    }
                }
                i = skip_space(i);
                if !matches!(bytes.get(i), None | Some(b',')) {
                    return Err(malformed("Incorrectly quoted array element."));
                }
                items.push(Some(utf8(element)));
            }
            Some(_) => {
                // Trailing whitespace is dropped; escaped bytes count as text.
                let (mut kept, mut escaped) = (0usize, false);
                loop {
                    match bytes.get(i) {
                        None | Some(b',') => break,
                        Some(b'{') => return Err(malformed("Unexpected \"{\" character.")),
                        Some(b'}') => return Err(malformed("Junk after closing right brace.")),
                        Some(b'"') => return Err(malformed("Incorrectly quoted array element.")),
                        Some(b'\\') => match bytes.get(i + 1) {
                            Some(&b) => {
                                element.push(b);
                                kept = element.len();
                                escaped = true;
                                i += 2;
                            }
                            None => return Err(malformed("Unexpected end of input.")),
                        },
                        Some(&b) => {
                            element.push(b);
                            if !is_array_space(b) {
                                kept = element.len();
                            }
                            i += 1;
                        }
                    }
                }
                element.truncate(kept);
                items.push(
                    (escaped || !element.eq_ignore_ascii_case(b"NULL")).then(|| utf8(element)),
                );
            }
        }
        match bytes.get(i) {
            None => return Ok(items),
            // `,`: the next element follows, after optional whitespace.
            Some(_) => i = skip_space(i + 1),
        }
    }
}

/// Bytes cut from a `&str` at ASCII delimiters (escapes copy whole bytes,
/// and a multi-byte character's bytes follow each other), so valid UTF-8.
fn utf8(bytes: Vec<u8>) -> String {
    String::from_utf8(bytes).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_lists_follow_postgres_array_literals() {
        let cases: &[(&str, &[Option<&str>])] = &[
            ("()", &[]),
            ("( )", &[]),
            ("(a)", &[Some("a")]),
            ("(open,done)", &[Some("open"), Some("done")]),
            (r#"(open,"a,b")"#, &[Some("open"), Some("a,b")]),
            ("( a , b c ,d\t)", &[Some("a"), Some("b c"), Some("d")]),
            (
                "(NULL,null,\"NULL\",\\NULL)",
                &[None, None, Some("NULL"), Some("NULL")],
            ),
            (r#"("",x)"#, &[Some(""), Some("x")]),
            (
                r#"("a\"b","c\\d",e\,f)"#,
                &[Some("a\"b"), Some("c\\d"), Some("e,f")],
            ),
            ("(a\\ ,b)", &[Some("a "), Some("b")]),
            (r#"("x)y",z)"#, &[Some("x)y"), Some("z")]),
            ("(é,😀)", &[Some("é"), Some("😀")]),
            ("(1,2,3)", &[Some("1"), Some("2"), Some("3")]),
        ];
        for (text, items) in cases {
            let inner = text
                .strip_prefix('(')
                .and_then(|t| t.strip_suffix(')'))
                .unwrap();
            let expected: Vec<Option<String>> =
                items.iter().map(|i| i.map(str::to_owned)).collect();
            assert_eq!(parse(inner), Ok(expected), "{text}");
        }
    }

    #[test]
    fn malformed_lists_are_refused_as_postgres_does() {
        for (inner, detail) in [
            ("a,,b", "Unexpected \",\" character."),
            ("a,", "Unexpected end of input."),
            (",a", "Unexpected \",\" character."),
            ("{a}", "Unexpected \"{\" character (lists do not nest)."),
            ("a{", "Unexpected \"{\" character."),
            ("a}", "Junk after closing right brace."),
            ("a\"b\"", "Incorrectly quoted array element."),
            ("\"a\"b", "Incorrectly quoted array element."),
            ("\"a", "Unexpected end of input."),
            ("a\\", "Unexpected end of input."),
        ] {
            assert_eq!(
                parse(inner),
                Err(FilterError::MalformedList {
                    literal: format!("{{{inner}}}"),
                    detail
                }),
                "{inner}"
            );
        }
    }
}
