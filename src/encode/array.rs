//! Postgres array text (`{1,2}`, `[0:1]={"a b",NULL}`, `{{1,2},{3,4}}`) →
//! JSON arrays, each element rendered by its type. Lower bounds are
//! dropped, as `to_jsonb` drops them.

use super::value::{Malformed, write_value_checked};
use crate::catalog::TypeInfo;

/// Writes the JSON array for array text of element type `element`.
pub fn write_array(out: &mut Vec<u8>, element: &TypeInfo, text: &[u8]) -> Result<(), Malformed> {
    // Optional dimension decoration: `[1:3]={...}`.
    let body = if text.first() == Some(&b'[') {
        let eq = text.iter().position(|&b| b == b'=').ok_or(Malformed)?;
        &text[eq + 1..]
    } else {
        text
    };
    let mut parser = Parser {
        text: body,
        pos: 0,
        element,
        scratch: Vec::new(),
    };
    parser.skip_space();
    parser.level(out, 0)?;
    parser.skip_space();
    if parser.pos == body.len() {
        Ok(())
    } else {
        Err(Malformed)
    }
}

/// Writes the JSON array for `int2vector`/`oidvector` text (`1 2 3`).
pub fn write_vector(out: &mut Vec<u8>, element: &TypeInfo, text: &[u8]) -> Result<(), Malformed> {
    out.push(b'[');
    for (i, item) in text
        .split(|&b| b == b' ')
        .filter(|s| !s.is_empty())
        .enumerate()
    {
        if i > 0 {
            out.push(b',');
        }
        write_value_checked(out, element, item)?;
    }
    out.push(b']');
    Ok(())
}

/// Deeper than Postgres's MAXDIM (6) is not an array Postgres wrote.
const MAX_DIMENSIONS: usize = 6;

struct Parser<'a> {
    text: &'a [u8],
    pos: usize,
    element: &'a TypeInfo,
    /// Unescaped text of the current quoted element.
    scratch: Vec<u8>,
}

impl Parser<'_> {
    fn level(&mut self, out: &mut Vec<u8>, depth: usize) -> Result<(), Malformed> {
        if depth >= MAX_DIMENSIONS || self.next() != Some(b'{') {
            return Err(Malformed);
        }
        out.push(b'[');
        self.skip_space();
        if self.peek() == Some(b'}') {
            self.pos += 1;
            out.push(b']');
            return Ok(());
        }
        loop {
            self.skip_space();
            match self.peek() {
                Some(b'{') => self.level(out, depth + 1)?,
                Some(b'"') => self.quoted(out)?,
                Some(_) => self.unquoted(out)?,
                None => return Err(Malformed),
            }
            self.skip_space();
            match self.next() {
                Some(b'}') => break,
                Some(d) if d == self.element.delimiter => out.push(b','),
                _ => return Err(Malformed),
            }
        }
        out.push(b']');
        Ok(())
    }

    fn quoted(&mut self, out: &mut Vec<u8>) -> Result<(), Malformed> {
        self.pos += 1;
        self.scratch.clear();
        loop {
            match self.next().ok_or(Malformed)? {
                b'"' => break,
                b'\\' => {
                    let escaped = self.next().ok_or(Malformed)?;
                    self.scratch.push(escaped);
                }
                b => self.scratch.push(b),
            }
        }
        let scratch = std::mem::take(&mut self.scratch);
        let written = write_value_checked(out, self.element, &scratch);
        self.scratch = scratch;
        written
    }

    fn unquoted(&mut self, out: &mut Vec<u8>) -> Result<(), Malformed> {
        let start = self.pos;
        while let Some(b) = self.peek() {
            if b == b'}' || b == self.element.delimiter || b == b'"' || b == b'{' {
                break;
            }
            self.pos += 1;
        }
        let item = self.text[start..self.pos].trim_ascii();
        if item.is_empty() {
            return Err(Malformed);
        }
        if item.eq_ignore_ascii_case(b"NULL") {
            out.extend_from_slice(b"null");
            Ok(())
        } else {
            write_value_checked(out, self.element, item)
        }
    }

    fn peek(&self) -> Option<u8> {
        self.text.get(self.pos).copied()
    }

    fn next(&mut self) -> Option<u8> {
        let b = self.peek()?;
        self.pos += 1;
        Some(b)
    }

    fn skip_space(&mut self) {
        while self.peek().is_some_and(|b| b.is_ascii_whitespace()) {
            self.pos += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::builtin;

    fn array(element: u32, text: &str) -> Result<String, Malformed> {
        let mut out = Vec::new();
        write_array(&mut out, &builtin(element).unwrap(), text.as_bytes())?;
        Ok(String::from_utf8(out).unwrap())
    }

    #[test]
    fn nested_null_quoted_and_bounded_arrays() {
        assert_eq!(array(23, "{1,2,3}").unwrap(), "[1,2,3]");
        assert_eq!(array(23, "{}").unwrap(), "[]");
        assert_eq!(array(23, "{{1,2},{3,NULL}}").unwrap(), "[[1,2],[3,null]]");
        assert_eq!(array(23, "[0:1]={7,8}").unwrap(), "[7,8]");
        assert_eq!(
            array(25, r#"{"a b","NULL",NULL,"say \"hi\"","back\\slash",""}"#).unwrap(),
            r#"["a b","NULL",null,"say \"hi\"","back\\slash",""]"#
        );
        assert_eq!(array(16, "{t,f}").unwrap(), "[true,false]");
        assert_eq!(
            array(701, "{NaN,1e+20,-0}").unwrap(),
            r#"["NaN",100000000000000000000,0]"#
        );
        assert_eq!(
            array(3802, r#"{"{\"a\": 1}","[1, 2]"}"#).unwrap(),
            r#"[{"a": 1},[1, 2]]"#
        );
    }

    #[test]
    fn box_arrays_use_the_semicolon_delimiter() {
        assert_eq!(
            array(603, "{(1,1),(0,0);(2,2),(1,1)}").unwrap(),
            r#"["(1,1),(0,0)","(2,2),(1,1)"]"#
        );
    }

    #[test]
    fn malformed_text_is_an_error_not_a_panic() {
        for bad in [
            "",
            "{",
            "{1,2",
            "{1,,2}",
            "1,2",
            "{1}x",
            "[1:2]{1,2}",
            "{\"a}",
            "{{{{{{{1}}}}}}}",
            "{\"a\\",
        ] {
            assert_eq!(array(23, bad), Err(Malformed), "{bad:?}");
        }
    }
}
