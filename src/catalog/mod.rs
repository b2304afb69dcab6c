//! What the daemon knows of the tenant database's catalog.
//!
//! For now: the names of built-in types. Types created by users arrive on
//! the stream as pgoutput `Type` messages; looking up the rest through the
//! pool comes with exact value encoding.

mod builtin;

/// The `typname` of a built-in type, e.g. `int4` for 23, `_text` for 1009.
pub fn builtin_type_name(oid: u32) -> Option<&'static str> {
    builtin::BUILTIN_TYPES
        .binary_search_by_key(&oid, |(o, _)| *o)
        .ok()
        .and_then(|i| builtin::BUILTIN_TYPES.get(i))
        .map(|(_, name)| *name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn knows_common_and_array_types() {
        assert_eq!(builtin_type_name(16), Some("bool"));
        assert_eq!(builtin_type_name(23), Some("int4"));
        assert_eq!(builtin_type_name(1007), Some("_int4"));
        assert_eq!(builtin_type_name(3802), Some("jsonb"));
        assert_eq!(builtin_type_name(1184), Some("timestamptz"));
        assert_eq!(builtin_type_name(16384), None);
    }
}
