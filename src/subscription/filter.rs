//! Supabase's filter grammar: `col=[not.]op.value`, several joined by
//! top-level commas meaning AND.
//!
//! The parser reproduces Supabase Realtime's (`CDC/subscriptions.ex`
//! `parse_filters/1`) step by step, so the same text is accepted, split
//! and unquoted the same way and refused with the same message:
//!
//! ```text
//! "id=gt.0, status=not.in.(open,\"a,b\")"
//!   trim ─▶ split at commas outside (...) and "..." ─▶ per segment:
//!   trim ─▶ column = up to the first '=' ─▶ optional "not." ─▶ op = up to the next '.'
//!        ─▶ value: `in` → a Postgres array literal's elements; others → unquoted once
//! ```
//!
//! An `in` list is what Supabase stores as the array literal `{...}` and
//! casts to the column type's array, so its elements follow Postgres's
//! `array_in` rules (unquoted `NULL` is a NULL element, whitespace around
//! unquoted elements is dropped, `\` escapes). Column names are kept
//! exactly as given: they are matched against the catalog, never spliced
//! into SQL.

use std::borrow::Cow;
use std::fmt::Write as _;

use super::list;

/// Most values an `in` filter may list (Supabase's limit).
pub const MAX_IN_VALUES: usize = 100;

/// One parsed filter: `column=[not.]op.operand`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Filter {
    /// The column name, exactly as written.
    pub column: String,
    /// The operator.
    pub op: Op,
    /// Whether `not.` negates the result (a NULL result stays NULL).
    pub negated: bool,
    /// What the column is compared with.
    pub operand: Operand,
}

/// A filter operator, with its SQL meaning.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    /// `eq`: `=`.
    Eq,
    /// `neq`: `<>`.
    Neq,
    /// `lt`: `<`.
    Lt,
    /// `lte`: `<=`.
    Lte,
    /// `gt`: `>`.
    Gt,
    /// `gte`: `>=`.
    Gte,
    /// `in`: `= ANY(list::type[])`.
    In,
    /// `like`: `LIKE`.
    Like,
    /// `ilike`: `ILIKE`.
    Ilike,
    /// `is`: `IS NULL / TRUE / FALSE / UNKNOWN`.
    Is,
    /// `match`: `~` (POSIX regular expression).
    Match,
    /// `imatch`: `~*` (case-insensitive regular expression).
    Imatch,
    /// `isdistinct`: `IS DISTINCT FROM`.
    IsDistinct,
}

impl Op {
    /// Every operator, in Supabase's order.
    pub const ALL: [Op; 13] = [
        Op::Eq,
        Op::Neq,
        Op::Lt,
        Op::Lte,
        Op::Gt,
        Op::Gte,
        Op::In,
        Op::Like,
        Op::Ilike,
        Op::Is,
        Op::Match,
        Op::Imatch,
        Op::IsDistinct,
    ];

    /// The operator as the filter grammar spells it (`eq`, `isdistinct`).
    pub fn name(self) -> &'static str {
        match self {
            Op::Eq => "eq",
            Op::Neq => "neq",
            Op::Lt => "lt",
            Op::Lte => "lte",
            Op::Gt => "gt",
            Op::Gte => "gte",
            Op::In => "in",
            Op::Like => "like",
            Op::Ilike => "ilike",
            Op::Is => "is",
            Op::Match => "match",
            Op::Imatch => "imatch",
            Op::IsDistinct => "isdistinct",
        }
    }

    /// The operator named `name` (case-sensitive, as Supabase).
    pub fn from_name(name: &str) -> Option<Op> {
        Op::ALL.into_iter().find(|op| op.name() == name)
    }
}

/// The right-hand side of a filter, as written (canonicalized later, when
/// the filter is compiled against its column's type).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Operand {
    /// One value (every operator but `in` and `is`), unquoted.
    Value(String),
    /// The elements of an `in` list; `None` is an unquoted `NULL`.
    List(Vec<Option<String>>),
    /// The keyword of an `is` filter.
    Is(IsTarget),
}

/// What `is` tests for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IsTarget {
    /// `IS NULL` (any type).
    Null,
    /// `IS TRUE` (boolean columns).
    True,
    /// `IS FALSE` (boolean columns).
    False,
    /// `IS UNKNOWN` (boolean columns; the same as `IS NULL` there).
    Unknown,
}

impl IsTarget {
    /// The keyword (`null`, `true`, `false`, `unknown`).
    pub fn name(self) -> &'static str {
        match self {
            IsTarget::Null => "null",
            IsTarget::True => "true",
            IsTarget::False => "false",
            IsTarget::Unknown => "unknown",
        }
    }
}

/// Why a filter string was refused. The messages are Supabase's where it
/// has one, so clients see what they saw before.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FilterError {
    /// A segment is not `column=[not.]op.value`, or names an unknown
    /// operator; Supabase shows the parts it found, as Elixir prints a
    /// list (`["foo", "hey"]`).
    #[error("Error parsing `filter` params: {}", inspect_list(.0))]
    Malformed(Vec<String>),
    /// Two commas in a row, or a comma at either end.
    #[error(
        "Error parsing `filter` params: filter must not contain empty segments (check for extra commas)"
    )]
    EmptySegment,
    /// `in.` not followed by `(...)`.
    #[error("Error parsing `filter` params: `in` filter value must be wrapped by parentheses")]
    InWithoutParentheses,
    /// An `in` list longer than [`MAX_IN_VALUES`].
    #[error("too many values for `in` filter. Maximum 100")]
    TooManyValues,
    /// An `in` list that is not a flat Postgres array literal (Postgres's
    /// message; nested `{...}` lists are refused too).
    #[error("malformed array literal: \"{literal}\": {detail}")]
    MalformedList {
        /// The array literal Supabase would have cast, `{...}`.
        literal: String,
        /// What is wrong with it.
        detail: &'static str,
    },
    /// `is.` followed by something else than null, true, false or unknown.
    #[error("invalid value for is filter: must be null, true, false, or unknown")]
    IsValue,
}

/// Parses a subscription's filter string. Empty or whitespace-only text
/// means no filter (an empty list); several filters must all hold.
pub fn parse(text: &str) -> Result<Vec<Filter>, FilterError> {
    let text = text.trim();
    if text.is_empty() {
        return Ok(Vec::new());
    }
    split_top_level(text)
        .into_iter()
        .map(parse_segment)
        .collect()
}

/// Splits at commas outside parentheses and double quotes. A quote opens
/// only after `.`, `(` or `,` (so a quote inside a word is a character),
/// and inside quotes `\` escapes the next byte, as Supabase's splitter.
fn split_top_level(text: &str) -> Vec<&str> {
    let bytes = text.as_bytes();
    let mut segments = Vec::new();
    let (mut depth, mut quoted, mut prev, mut start, mut i) = (0usize, false, 0u8, 0usize, 0usize);
    while let Some(&byte) = bytes.get(i) {
        if quoted {
            match (byte, bytes.get(i + 1)) {
                (b'\\', Some(&next)) => {
                    prev = next;
                    i += 2;
                    continue;
                }
                (b'"', _) => quoted = false,
                _ => {}
            }
            prev = byte;
        } else {
            match byte {
                b'"' if matches!(prev, b'.' | b'(' | b',') => quoted = true,
                b'(' => depth += 1,
                b')' => depth = depth.saturating_sub(1),
                b',' if depth == 0 => {
                    // Commas are ASCII: `start..i` stays on char boundaries.
                    segments.push(&text[start..i]);
                    start = i + 1;
                    prev = 0;
                    i += 1;
                    continue;
                }
                _ => {}
            }
            prev = byte;
        }
        i += 1;
    }
    segments.push(&text[start..]);
    segments
}

fn parse_segment(segment: &str) -> Result<Filter, FilterError> {
    let segment = segment.trim();
    if segment.is_empty() {
        return Err(FilterError::EmptySegment);
    }
    let Some((column, rest)) = segment.split_once('=') else {
        return Err(FilterError::Malformed(vec![segment.to_owned()]));
    };
    let (negated, op_value) = match rest.strip_prefix("not.") {
        Some(op_value) => (true, op_value),
        None => (false, rest),
    };
    let Some((name, value)) = op_value.split_once('.') else {
        return Err(FilterError::Malformed(vec![op_value.to_owned()]));
    };
    let Some(op) = Op::from_name(name) else {
        return Err(FilterError::Malformed(vec![
            name.to_owned(),
            value.to_owned(),
        ]));
    };
    let operand = match op {
        Op::In => {
            let inner = value
                .strip_prefix('(')
                .and_then(|v| v.strip_suffix(')'))
                .ok_or(FilterError::InWithoutParentheses)?;
            Operand::List(list::parse(inner)?)
        }
        Op::Is => Operand::Is(match &*unquote(value) {
            v if v.eq_ignore_ascii_case("null") => IsTarget::Null,
            v if v.eq_ignore_ascii_case("true") => IsTarget::True,
            v if v.eq_ignore_ascii_case("false") => IsTarget::False,
            v if v.eq_ignore_ascii_case("unknown") => IsTarget::Unknown,
            _ => return Err(FilterError::IsValue),
        }),
        _ => Operand::Value(unquote(value).into_owned()),
    };
    Ok(Filter {
        column: column.to_owned(),
        op,
        negated,
        operand,
    })
}

/// A value that is exactly one double-quoted token loses its quotes and
/// `\` escapes; anything else (including a malformed quote) is kept as is.
fn unquote(value: &str) -> Cow<'_, str> {
    let Some(rest) = value.strip_prefix('"') else {
        return Cow::Borrowed(value);
    };
    let mut out = String::with_capacity(rest.len());
    let mut chars = rest.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' if chars.as_str().is_empty() => return Cow::Owned(out),
            '"' => return Cow::Borrowed(value),
            '\\' => match chars.next() {
                Some(escaped) => out.push(escaped),
                None => return Cow::Borrowed(value),
            },
            c => out.push(c),
        }
    }
    Cow::Borrowed(value)
}

/// A list of strings as Elixir's `inspect` prints it: `["foo", "hey"]`.
fn inspect_list(items: &[String]) -> String {
    let mut out = String::from("[");
    for (n, item) in items.iter().enumerate() {
        if n > 0 {
            out.push_str(", ");
        }
        inspect_string(&mut out, item);
    }
    out.push(']');
    out
}

/// One string as Elixir's `inspect`: quoted with escapes when printable,
/// else as its bytes (`<<1, 2>>`).
fn inspect_string(out: &mut String, s: &str) {
    let printable = |c: char| {
        matches!(c as u32, 0x20..=0x7e | 0xa0..=0xd7ff | 0xe000..=0xfffd | 0x10000..=0x10ffff)
            || matches!(
                c,
                '\n' | '\r' | '\t' | '\x0b' | '\x08' | '\x0c' | '\x1b' | '\x7f' | '\x07'
            )
    };
    if !s.chars().all(printable) {
        out.push_str("<<");
        for (n, b) in s.bytes().enumerate() {
            let _ = write!(out, "{}{b}", if n > 0 { ", " } else { "" });
        }
        out.push_str(">>");
        return;
    }
    out.push('"');
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '#' if chars.peek() == Some(&'{') => out.push_str("\\#"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\x0b' => out.push_str("\\v"),
            '\x08' => out.push_str("\\b"),
            '\x0c' => out.push_str("\\f"),
            '\x1b' => out.push_str("\\e"),
            '\x7f' => out.push_str("\\d"),
            '\x07' => out.push_str("\\a"),
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(text: &str) -> Filter {
        let mut filters = parse(text).unwrap_or_else(|e| panic!("{text}: {e}"));
        assert_eq!(filters.len(), 1, "{text}");
        filters.remove(0)
    }

    fn value(column: &str, op: Op, negated: bool, v: &str) -> Filter {
        Filter {
            column: column.into(),
            op,
            negated,
            operand: Operand::Value(v.into()),
        }
    }

    fn list(items: &[Option<&str>]) -> Operand {
        Operand::List(items.iter().map(|i| i.map(str::to_owned)).collect())
    }

    fn err(text: &str) -> String {
        match parse(text) {
            Ok(f) => panic!("{text}: parsed as {f:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn every_operator_parses_with_and_without_not() {
        for op in Op::ALL {
            let operand = match op {
                Op::In => "(1)",
                Op::Is => "null",
                _ => "1",
            };
            for negated in [false, true] {
                let not = if negated { "not." } else { "" };
                let f = one(&format!("c={not}{}.{operand}", op.name()));
                assert_eq!((f.column.as_str(), f.op, f.negated), ("c", op, negated));
            }
        }
    }

    #[test]
    fn shapes() {
        assert_eq!(parse("").unwrap(), vec![]);
        assert_eq!(parse("  \t\n ").unwrap(), vec![]);
        assert_eq!(
            one("subject=eq.hey"),
            value("subject", Op::Eq, false, "hey")
        );
        assert_eq!(one("  id=not.gte.5  "), value("id", Op::Gte, true, "5"));
        // Only the first '=' and the first '.' after the op split.
        assert_eq!(one("a=eq.b=c.d"), value("a", Op::Eq, false, "b=c.d"));
        assert_eq!(one("a=eq."), value("a", Op::Eq, false, ""));
        assert_eq!(one("a=like.hey%"), value("a", Op::Like, false, "hey%"));
    }

    #[test]
    fn and_splits_at_top_level_commas_only() {
        assert_eq!(
            parse("id=gt.0,id=lt.100").unwrap(),
            vec![
                value("id", Op::Gt, false, "0"),
                value("id", Op::Lt, false, "100")
            ]
        );
        assert_eq!(
            parse(r#"a=eq."x,y", b=in.(1,2) ,c=is.NULL"#).unwrap(),
            vec![
                value("a", Op::Eq, false, "x,y"),
                Filter {
                    column: "b".into(),
                    op: Op::In,
                    negated: false,
                    operand: list(&[Some("1"), Some("2")]),
                },
                Filter {
                    column: "c".into(),
                    op: Op::Is,
                    negated: false,
                    operand: Operand::Is(IsTarget::Null),
                },
            ]
        );
        // A quote inside a word does not open quoting: the comma splits.
        assert_eq!(
            parse(r#"a=eq.x"y,b=eq.z""#).unwrap(),
            vec![
                value("a", Op::Eq, false, "x\"y"),
                value("b", Op::Eq, false, "z\"")
            ]
        );
        // Escaped quote inside quotes.
        assert_eq!(one(r#"a=eq."x\",y""#), value("a", Op::Eq, false, "x\",y"));
    }

    #[test]
    fn unquoting_is_all_or_nothing() {
        assert_eq!(one(r#"a=eq."hey""#), value("a", Op::Eq, false, "hey"));
        assert_eq!(
            one(r#"a=eq."a\\b\"c""#),
            value("a", Op::Eq, false, r#"a\b"c"#)
        );
        assert_eq!(one(r#"a=eq."a"b"#), value("a", Op::Eq, false, r#""a"b"#));
        assert_eq!(one(r#"a=eq."abc"#), value("a", Op::Eq, false, r#""abc"#));
        assert_eq!(one(r#"a=eq."abc\"#), value("a", Op::Eq, false, r#""abc\"#));
        assert_eq!(one(r#"a=eq.""#), value("a", Op::Eq, false, r#"""#));
        assert_eq!(one(r#"a=eq."""#), value("a", Op::Eq, false, ""));
        assert_eq!(one(r#"a=eq.x"y""#), value("a", Op::Eq, false, r#"x"y""#));
        assert_eq!(one(r#"a=eq."é😀""#), value("a", Op::Eq, false, "é😀"));
    }

    #[test]
    fn in_values_are_a_list_in_parentheses() {
        assert_eq!(
            one(r#"c=not.in.(open,"a,b",NULL)"#),
            Filter {
                column: "c".into(),
                op: Op::In,
                negated: true,
                operand: list(&[Some("open"), Some("a,b"), None]),
            }
        );
        assert_eq!(
            one(r#"c=in.("x)y",z)"#).operand,
            list(&[Some("x)y"), Some("z")])
        );
        assert_eq!(
            err("c=in.(a,{b})"),
            "malformed array literal: \"{a,{b}}\": Unexpected \"{\" character (lists do not nest)."
        );
    }

    #[test]
    fn errors_carry_supabase_texts() {
        assert_eq!(
            err("subject=foo.hey"),
            r#"Error parsing `filter` params: ["foo", "hey"]"#
        );
        assert_eq!(
            err("undefined"),
            r#"Error parsing `filter` params: ["undefined"]"#
        );
        assert_eq!(err("a=eq"), r#"Error parsing `filter` params: ["eq"]"#);
        assert_eq!(err("a=not."), r#"Error parsing `filter` params: [""]"#);
        assert_eq!(
            err("a=not.not.1"),
            r#"Error parsing `filter` params: ["not", "1"]"#
        );
        assert_eq!(
            err("a=EQ.1"),
            r#"Error parsing `filter` params: ["EQ", "1"]"#
        );
        assert_eq!(
            err(r#"a=fts.#{x}"\"#),
            r#"Error parsing `filter` params: ["fts", "\#{x}\"\\"]"#
        );
        assert_eq!(
            err("a=x.\u{1}"),
            r#"Error parsing `filter` params: ["x", <<1>>]"#
        );
        assert_eq!(
            err("a=x.\nb"),
            r#"Error parsing `filter` params: ["x", "\nb"]"#
        );
        assert_eq!(
            err("id=gt.0,,id=lt.1"),
            "Error parsing `filter` params: filter must not contain empty segments (check for extra commas)"
        );
        assert_eq!(err("id=gt.0,"), err(",id=gt.0"));
        assert_eq!(
            err("a=in.1,2"),
            "Error parsing `filter` params: `in` filter value must be wrapped by parentheses"
        );
        assert_eq!(err("a=in.("), err("a=in.)"));
        assert_eq!(err("a=in.x)"), err("a=in.(x"));
        assert_eq!(
            err("a=is.nil"),
            "invalid value for is filter: must be null, true, false, or unknown"
        );
        let many = (0..=MAX_IN_VALUES)
            .map(|n| n.to_string())
            .collect::<Vec<_>>()
            .join(",");
        assert_eq!(
            err(&format!("a=in.({many})")),
            "too many values for `in` filter. Maximum 100"
        );
        let hundred = (0..MAX_IN_VALUES)
            .map(|n| n.to_string())
            .collect::<Vec<_>>()
            .join(",");
        assert!(
            matches!(&one(&format!("a=in.({hundred})")).operand, Operand::List(l) if l.len() == 100)
        );
    }

    #[test]
    fn is_takes_four_keywords_in_any_case() {
        for (text, target) in [
            ("null", IsTarget::Null),
            ("NULL", IsTarget::Null),
            ("True", IsTarget::True),
            ("false", IsTarget::False),
            ("UNKNOWN", IsTarget::Unknown),
            ("\"null\"", IsTarget::Null),
        ] {
            assert_eq!(
                one(&format!("c=not.is.{text}")).operand,
                Operand::Is(target)
            );
        }
        assert_eq!(parse("c=is. null"), Err(FilterError::IsValue));
    }

    #[test]
    fn column_names_are_kept_verbatim() {
        let f = one(r#"a"; DROP TABLE t; --=eq.1"#);
        assert_eq!(f.column, r#"a"; DROP TABLE t; --"#);
        assert_eq!(one(" Weird Name =eq.1").column, "Weird Name ");
        assert_eq!(one("=eq.1").column, "");
        assert_eq!(one("x->>y=eq.1").column, "x->>y");
    }

    #[test]
    fn sql_in_values_is_just_text() {
        assert_eq!(
            one("id=eq.1); DROP TABLE t; --"),
            value("id", Op::Eq, false, "1); DROP TABLE t; --")
        );
        assert_eq!(
            one("name=eq.'; DROP TABLE t; --"),
            value("name", Op::Eq, false, "'; DROP TABLE t; --")
        );
        assert_eq!(
            one(r#"name=in.("x'); DROP TABLE t; --",b)"#).operand,
            list(&[Some("x'); DROP TABLE t; --"), Some("b")])
        );
    }

    #[test]
    fn every_prefix_of_every_fixture_parses_or_errs_without_panicking() {
        let fixtures = [
            r#"id=gt.0,status=not.in.(open,"a,b",NULL),name=ilike."%x\"y%""#,
            r#"a=is.unknown, b=isdistinct."q,(",c=match.^a(b|c)$,d=in.( "x" , y\,z )"#,
            "é=eq.😀,ü=not.imatch.ß",
            r#"a=in.("x)y",{z}),b=eq."unterminated"#,
        ];
        for fixture in fixtures {
            for (end, _) in fixture.char_indices().chain([(fixture.len(), ' ')]) {
                let _ = parse(&fixture[..end]);
                let _ = parse(&fixture[end..]);
            }
        }
    }

    #[test]
    fn hostile_shapes_do_not_panic() {
        let commas = ",".repeat(10_000);
        assert_eq!(parse(&commas), Err(FilterError::EmptySegment));
        let in_commas = format!("a=in.({commas})");
        assert!(parse(&in_commas).is_err());
        let many = format!("a=in.({})", "1,".repeat(10_000) + "1");
        assert_eq!(parse(&many), Err(FilterError::TooManyValues));
        let parens = "(".repeat(10_000);
        assert!(parse(&format!("a=eq.{parens}")).is_ok());
        assert!(parse(&format!("a=in.{parens}")).is_err());
        let quotes = "\"".repeat(10_001);
        let _ = parse(&format!("a=eq.{quotes}"));
        let _ = parse(&format!("a=in.({quotes})"));
        let _ = parse(&"\\".repeat(10_000));
        let _ = parse("a=in.(\"\\");
        let _ = parse("\0=eq.\0");
        let filters = parse(&vec!["a=eq.1"; 10_000].join(",")).unwrap();
        assert_eq!(filters.len(), 10_000);
    }
}
