//! Composite (row) text — `(1,"x y",)` — → a JSON object keyed by field
//! name, each field rendered by its type. An empty unquoted field is NULL;
//! inside quotes `""` is one quote and a backslash escapes the next byte.

use super::value::{Malformed, write_json_string, write_value_checked};
use crate::catalog::Field;

/// Writes the JSON object for composite text with `fields`.
pub fn write_composite(out: &mut Vec<u8>, fields: &[Field], text: &[u8]) -> Result<(), Malformed> {
    let inner = text
        .strip_prefix(b"(")
        .and_then(|t| t.strip_suffix(b")"))
        .ok_or(Malformed)?;
    let mut pos = 0;
    let mut scratch = Vec::new();
    out.push(b'{');
    for (i, field) in fields.iter().enumerate() {
        if i > 0 {
            if inner.get(pos) != Some(&b',') {
                return Err(Malformed);
            }
            pos += 1;
            out.push(b',');
        }
        write_json_string(out, field.name.as_bytes());
        out.push(b':');
        scratch.clear();
        let mut quoted = false;
        while let Some(&b) = inner.get(pos) {
            match b {
                b',' if !quoted => break,
                b'"' if quoted && inner.get(pos + 1) == Some(&b'"') => {
                    scratch.push(b'"');
                    pos += 1;
                }
                b'"' => quoted = !quoted,
                b'\\' => {
                    pos += 1;
                    scratch.push(*inner.get(pos).ok_or(Malformed)?);
                }
                _ => scratch.push(b),
            }
            pos += 1;
        }
        if quoted {
            return Err(Malformed);
        }
        let was_empty_unquoted = scratch.is_empty() && !inner[..pos].ends_with(b"\"");
        if was_empty_unquoted {
            out.extend_from_slice(b"null");
        } else {
            write_value_checked(out, &field.ty, &scratch)?;
        }
    }
    if pos != inner.len() {
        return Err(Malformed);
    }
    out.push(b'}');
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::catalog::{Encoding, TypeInfo, builtin};

    fn field(name: &str, oid: u32) -> Field {
        Field {
            name: name.into(),
            ty: builtin(oid).unwrap(),
        }
    }

    fn render(fields: &[Field], text: &str) -> Result<String, Malformed> {
        let mut out = Vec::new();
        write_composite(&mut out, fields, text.as_bytes())?;
        Ok(String::from_utf8(out).unwrap())
    }

    #[test]
    fn fields_nulls_quotes_and_nesting() {
        let pair = [field("a", 23), field("b", 25)];
        assert_eq!(
            render(&pair, r#"(1,"x y")"#).unwrap(),
            r#"{"a":1,"b":"x y"}"#
        );
        assert_eq!(render(&pair, "(,)").unwrap(), r#"{"a":null,"b":null}"#);
        assert_eq!(render(&pair, r#"(2,"")"#).unwrap(), r#"{"a":2,"b":""}"#);
        assert_eq!(
            render(&pair, r#"(3,"say ""hi"" \\ ok")"#).unwrap(),
            r#"{"a":3,"b":"say \"hi\" \\ ok"}"#
        );
        let inner = Arc::new(TypeInfo {
            oid: 90000,
            name: "pair".into(),
            sql_name: "pair".into(),
            delimiter: b',',
            encoding: Encoding::Composite(pair.to_vec()),
        });
        let outer = [
            Field {
                name: "p".into(),
                ty: inner,
            },
            field("tags", 1009),
        ];
        assert_eq!(
            render(&outer, r#"("(1,""x y"")","{a,""b c""}")"#).unwrap(),
            r#"{"p":{"a":1,"b":"x y"},"tags":["a","b c"]}"#
        );
    }

    #[test]
    fn malformed_text_is_an_error_not_a_panic() {
        let pair = [field("a", 23), field("b", 25)];
        for bad in ["", "(", "1,2", "(1)", "(1,2,3)", "(1,\"x)", "(1,x\\)"] {
            assert_eq!(render(&pair, bad), Err(Malformed), "{bad:?}");
        }
    }
}
