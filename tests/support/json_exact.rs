//! JSON compared as values, with numbers compared by their exact text
//! (`1.50` is not `1.5`), object keys in any order, duplicates rejected.
//! Independent of walcast's own JSON code, so it can judge it.

use std::collections::BTreeMap;

/// A parsed JSON value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exact {
    /// `null`.
    Null,
    /// `true` / `false`.
    Bool(bool),
    /// A number, as written.
    Number(String),
    /// A string, unescaped.
    String(String),
    /// An array.
    Array(Vec<Exact>),
    /// An object; a duplicate key is a parse error.
    Object(BTreeMap<String, Exact>),
}

/// Parses `text`, or says why not.
pub fn parse(text: &str) -> Result<Exact, String> {
    let mut p = P {
        s: text.as_bytes(),
        i: 0,
    };
    let v = p.value()?;
    p.ws();
    if p.i != p.s.len() {
        return Err(format!("trailing text at {}", p.i));
    }
    Ok(v)
}

struct P<'a> {
    s: &'a [u8],
    i: usize,
}

impl P<'_> {
    fn ws(&mut self) {
        while self.i < self.s.len() && b" \t\r\n".contains(&self.s[self.i]) {
            self.i += 1;
        }
    }

    fn eat(&mut self, b: u8) -> Result<(), String> {
        self.ws();
        if self.s.get(self.i) == Some(&b) {
            self.i += 1;
            Ok(())
        } else {
            Err(format!("expected {:?} at {}", b as char, self.i))
        }
    }

    fn value(&mut self) -> Result<Exact, String> {
        self.ws();
        match self.s.get(self.i).copied() {
            Some(b'{') => {
                self.i += 1;
                let mut map = BTreeMap::new();
                self.ws();
                if self.s.get(self.i) == Some(&b'}') {
                    self.i += 1;
                    return Ok(Exact::Object(map));
                }
                loop {
                    self.ws();
                    let key = self.string()?;
                    self.eat(b':')?;
                    let value = self.value()?;
                    if map.insert(key.clone(), value).is_some() {
                        return Err(format!("duplicate key {key:?}"));
                    }
                    self.ws();
                    match self.s.get(self.i) {
                        Some(b',') => self.i += 1,
                        Some(b'}') => {
                            self.i += 1;
                            return Ok(Exact::Object(map));
                        }
                        _ => return Err(format!("bad object at {}", self.i)),
                    }
                }
            }
            Some(b'[') => {
                self.i += 1;
                let mut items = Vec::new();
                self.ws();
                if self.s.get(self.i) == Some(&b']') {
                    self.i += 1;
                    return Ok(Exact::Array(items));
                }
                loop {
                    items.push(self.value()?);
                    self.ws();
                    match self.s.get(self.i) {
                        Some(b',') => self.i += 1,
                        Some(b']') => {
                            self.i += 1;
                            return Ok(Exact::Array(items));
                        }
                        _ => return Err(format!("bad array at {}", self.i)),
                    }
                }
            }
            Some(b'"') => Ok(Exact::String(self.string()?)),
            Some(b't') if self.s[self.i..].starts_with(b"true") => {
                self.i += 4;
                Ok(Exact::Bool(true))
            }
            Some(b'f') if self.s[self.i..].starts_with(b"false") => {
                self.i += 5;
                Ok(Exact::Bool(false))
            }
            Some(b'n') if self.s[self.i..].starts_with(b"null") => {
                self.i += 4;
                Ok(Exact::Null)
            }
            Some(b'-' | b'0'..=b'9') => {
                let start = self.i;
                while self.i < self.s.len() && b"+-.eE0123456789".contains(&self.s[self.i]) {
                    self.i += 1;
                }
                let text =
                    std::str::from_utf8(&self.s[start..self.i]).map_err(|e| e.to_string())?;
                text.parse::<f64>()
                    .map_err(|_| format!("bad number {text}"))?;
                Ok(Exact::Number(text.to_owned()))
            }
            _ => Err(format!("unexpected input at {}", self.i)),
        }
    }

    fn string(&mut self) -> Result<String, String> {
        let bad = |i| format!("bad string at {i}");
        if self.s.get(self.i) != Some(&b'"') {
            return Err(bad(self.i));
        }
        self.i += 1;
        let mut out: Vec<u16> = Vec::new();
        let mut bytes = Vec::new();
        let flush = |bytes: &mut Vec<u8>, out: &mut Vec<u16>| -> Result<(), String> {
            let s = std::str::from_utf8(bytes).map_err(|e| e.to_string())?;
            out.extend(s.encode_utf16());
            bytes.clear();
            Ok(())
        };
        loop {
            let b = *self.s.get(self.i).ok_or_else(|| bad(self.i))?;
            self.i += 1;
            match b {
                b'"' => break,
                b'\\' => {
                    flush(&mut bytes, &mut out)?;
                    let e = *self.s.get(self.i).ok_or_else(|| bad(self.i))?;
                    self.i += 1;
                    match e {
                        b'u' => {
                            let hex = self.s.get(self.i..self.i + 4).ok_or_else(|| bad(self.i))?;
                            let hex = std::str::from_utf8(hex).map_err(|e| e.to_string())?;
                            out.push(u16::from_str_radix(hex, 16).map_err(|e| e.to_string())?);
                            self.i += 4;
                        }
                        b'n' => out.push(u16::from(b'\n')),
                        b't' => out.push(u16::from(b'\t')),
                        b'r' => out.push(u16::from(b'\r')),
                        b'b' => out.push(8),
                        b'f' => out.push(12),
                        other => out.push(u16::from(other)),
                    }
                }
                _ => bytes.push(b),
            }
        }
        flush(&mut bytes, &mut out)?;
        String::from_utf16(&out).map_err(|e| e.to_string())
    }
}
