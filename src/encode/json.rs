//! `json` text → the JSON `to_jsonb` makes of it: jsonb keeps the last of
//! duplicate keys, orders keys shorter-first then bytewise, decodes string
//! escapes, and stores numbers as `numeric`.

use super::number;
use super::value::{Malformed, write_json_string};

/// Postgres's own json parser has a similar nesting limit (stack depth).
const MAX_DEPTH: usize = 1000;

/// Writes `text` (valid json, as Postgres stores it) normalized like jsonb.
pub fn write_normalized(out: &mut Vec<u8>, text: &[u8]) -> Result<(), Malformed> {
    let mut parser = Parser { text, pos: 0 };
    parser.value(out, 0)?;
    parser.skip_space();
    if parser.pos == text.len() {
        Ok(())
    } else {
        Err(Malformed)
    }
}

struct Parser<'a> {
    text: &'a [u8],
    pos: usize,
}

impl Parser<'_> {
    fn value(&mut self, out: &mut Vec<u8>, depth: usize) -> Result<(), Malformed> {
        if depth > MAX_DEPTH {
            return Err(Malformed);
        }
        self.skip_space();
        match self.peek().ok_or(Malformed)? {
            b'{' => self.object(out, depth),
            b'[' => self.array(out, depth),
            b'"' => {
                let s = self.string()?;
                write_json_string(out, s.as_bytes());
                Ok(())
            }
            b't' => self.literal(out, b"true"),
            b'f' => self.literal(out, b"false"),
            b'n' => self.literal(out, b"null"),
            _ => self.number(out),
        }
    }

    fn object(&mut self, out: &mut Vec<u8>, depth: usize) -> Result<(), Malformed> {
        self.pos += 1;
        let mut members: Vec<(String, Vec<u8>)> = Vec::new();
        self.skip_space();
        if self.peek() == Some(b'}') {
            self.pos += 1;
        } else {
            loop {
                self.skip_space();
                let key = self.string()?;
                self.skip_space();
                if self.next() != Some(b':') {
                    return Err(Malformed);
                }
                let mut value = Vec::new();
                self.value(&mut value, depth + 1)?;
                members.push((key, value));
                self.skip_space();
                match self.next() {
                    Some(b',') => {}
                    Some(b'}') => break,
                    _ => return Err(Malformed),
                }
            }
        }
        // jsonb order; a stable sort keeps duplicates in input order, and
        // the last of them wins.
        members.sort_by(|(a, _), (b, _)| {
            a.len()
                .cmp(&b.len())
                .then_with(|| a.as_bytes().cmp(b.as_bytes()))
        });
        out.push(b'{');
        let mut first = true;
        for (i, (key, value)) in members.iter().enumerate() {
            if members.get(i + 1).is_some_and(|(next, _)| next == key) {
                continue;
            }
            if !first {
                out.push(b',');
            }
            first = false;
            write_json_string(out, key.as_bytes());
            out.push(b':');
            out.extend_from_slice(value);
        }
        out.push(b'}');
        Ok(())
    }

    fn array(&mut self, out: &mut Vec<u8>, depth: usize) -> Result<(), Malformed> {
        self.pos += 1;
        out.push(b'[');
        self.skip_space();
        if self.peek() == Some(b']') {
            self.pos += 1;
        } else {
            loop {
                self.value(out, depth + 1)?;
                self.skip_space();
                match self.next() {
                    Some(b',') => out.push(b','),
                    Some(b']') => break,
                    _ => return Err(Malformed),
                }
            }
        }
        out.push(b']');
        Ok(())
    }

    fn string(&mut self) -> Result<String, Malformed> {
        if self.next() != Some(b'"') {
            return Err(Malformed);
        }
        let mut bytes = Vec::new();
        loop {
            match self.next().ok_or(Malformed)? {
                b'"' => break,
                b'\\' => match self.next().ok_or(Malformed)? {
                    b'"' => bytes.push(b'"'),
                    b'\\' => bytes.push(b'\\'),
                    b'/' => bytes.push(b'/'),
                    b'b' => bytes.push(0x08),
                    b'f' => bytes.push(0x0c),
                    b'n' => bytes.push(b'\n'),
                    b'r' => bytes.push(b'\r'),
                    b't' => bytes.push(b'\t'),
                    b'u' => {
                        let c = self.unicode_escape()?;
                        let mut buf = [0; 4];
                        bytes.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                    }
                    _ => return Err(Malformed),
                },
                b => bytes.push(b),
            }
        }
        String::from_utf8(bytes).map_err(|_| Malformed)
    }

    fn unicode_escape(&mut self) -> Result<char, Malformed> {
        let high = self.hex4()?;
        if (0xD800..0xDC00).contains(&high) {
            if self.next() != Some(b'\\') || self.next() != Some(b'u') {
                return Err(Malformed);
            }
            let low = self.hex4()?;
            if !(0xDC00..0xE000).contains(&low) {
                return Err(Malformed);
            }
            let code = 0x10000 + ((high - 0xD800) << 10) + (low - 0xDC00);
            return char::from_u32(code).ok_or(Malformed);
        }
        char::from_u32(high).ok_or(Malformed)
    }

    fn hex4(&mut self) -> Result<u32, Malformed> {
        let digits = self.text.get(self.pos..self.pos + 4).ok_or(Malformed)?;
        self.pos += 4;
        let digits = std::str::from_utf8(digits).map_err(|_| Malformed)?;
        u32::from_str_radix(digits, 16).map_err(|_| Malformed)
    }

    fn number(&mut self, out: &mut Vec<u8>) -> Result<(), Malformed> {
        let start = self.pos;
        while self
            .peek()
            .is_some_and(|b| b.is_ascii_digit() || matches!(b, b'-' | b'+' | b'.' | b'e' | b'E'))
        {
            self.pos += 1;
        }
        if number::write_normalized(out, &self.text[start..self.pos]) {
            Ok(())
        } else {
            Err(Malformed)
        }
    }

    fn literal(&mut self, out: &mut Vec<u8>, word: &[u8]) -> Result<(), Malformed> {
        if self.text.get(self.pos..self.pos + word.len()) != Some(word) {
            return Err(Malformed);
        }
        self.pos += word.len();
        out.extend_from_slice(word);
        Ok(())
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
        while self
            .peek()
            .is_some_and(|b| matches!(b, b' ' | b'\t' | b'\n' | b'\r'))
        {
            self.pos += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(text: &str) -> Result<String, Malformed> {
        let mut out = Vec::new();
        write_normalized(&mut out, text.as_bytes())?;
        Ok(String::from_utf8(out).unwrap())
    }

    #[test]
    fn normalizes_like_jsonb() {
        assert_eq!(
            norm(r#" {"b": 1, "a" :[1 , 2.50, 1e2, -0], "a": "last", "aa": {}} "#).unwrap(),
            r#"{"a":"last","b":1,"aa":{}}"#
        );
        assert_eq!(
            norm(r#"{"long key": true, "z": null}"#).unwrap(),
            r#"{"z":null,"long key":true}"#
        );
        assert_eq!(
            norm(r#"["\u00e9\ud83d\ude00", "\/\"\n"]"#).unwrap(),
            "[\"é😀\",\"/\\\"\\n\"]"
        );
        assert_eq!(norm("\"just a string\"").unwrap(), "\"just a string\"");
        assert_eq!(norm("[1e2, 0.0]").unwrap(), "[100,0.0]");
    }

    #[test]
    fn malformed_json_is_an_error_not_a_panic() {
        for bad in [
            "",
            "{",
            "[1,]",
            "{\"a\"}",
            "tru",
            "\"\\ud800\"",
            "\"\\u12\"",
            "01x",
            "[1] 2",
            "{\"a\":1,}",
        ] {
            assert_eq!(norm(bad), Err(Malformed), "{bad:?}");
        }
    }
}
