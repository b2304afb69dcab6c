//! `TypeInfo`: how a column type's text output becomes JSON, following the
//! categories Postgres's own `to_jsonb` uses (`jsonb_categorize_type`).

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use super::builtin::BUILTIN_TYPES;

/// A Postgres type oid.
pub type Oid = u32;

/// A type as the encoder needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TypeInfo {
    /// The type's oid.
    pub oid: Oid,
    /// `typname`, as the Supabase `columns` list shows it (`int4`, `_text`,
    /// a domain's or enum's own name).
    pub name: Arc<str>,
    /// The type as SQL names it (`public.pair`, `integer[]`), quoted by
    /// Postgres's `format_type`: safe to splice into a cast.
    pub sql_name: Arc<str>,
    /// The element delimiter when this type is an array element (`,`; `;`
    /// for `box`).
    pub delimiter: u8,
    /// How values become JSON.
    pub encoding: Encoding,
}

/// How `to_jsonb` renders a value of the type. Domains take their base
/// type's encoding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Encoding {
    /// `true` / `false`.
    Bool,
    /// int2, int4, int8: the text is the JSON number.
    Integer,
    /// float4, float8: a JSON number as `numeric` would print it (no
    /// exponent), or `"NaN"` / `"Infinity"` / `"-Infinity"`.
    Float,
    /// numeric: digits and scale kept; `"NaN"`, `"Infinity"`, `"-Infinity"`.
    Numeric,
    /// json: re-rendered the way jsonb normalizes it.
    Json,
    /// jsonb: the text is already normalized JSON.
    Jsonb,
    /// timestamp: ISO 8601 with `T`.
    Timestamp,
    /// timestamptz: ISO 8601 with `T` and a `+hh:mm` offset.
    TimestampTz,
    /// Everything else (text, date, uuid, enums, ranges, bytea, ...): the
    /// text output as a JSON string.
    Text,
    /// A true array: a JSON array of its elements.
    Array(Arc<TypeInfo>),
    /// int2vector / oidvector: space-separated elements, a JSON array.
    Vector(Arc<TypeInfo>),
    /// A composite type: a JSON object of its fields.
    Composite(Vec<Field>),
    /// A user type with a cast to json: `to_jsonb` calls the cast. Only
    /// the server can render it.
    JsonCast,
}

/// One field of a composite type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Field {
    /// Attribute name.
    pub name: String,
    /// Its type.
    pub ty: Arc<TypeInfo>,
}

impl TypeInfo {
    /// Whether rendering a value needs the server (a json cast somewhere inside).
    pub fn needs_server(&self) -> bool {
        match &self.encoding {
            Encoding::JsonCast => true,
            Encoding::Array(e) | Encoding::Vector(e) => e.needs_server(),
            Encoding::Composite(fields) => fields.iter().any(|f| f.ty.needs_server()),
            _ => false,
        }
    }
}

const BOOL: Oid = 16;
const INT8: Oid = 20;
const INT2: Oid = 21;
const INT2VECTOR: Oid = 22;
const INT4: Oid = 23;
const OIDVECTOR: Oid = 30;
const JSON: Oid = 114;
const FLOAT4: Oid = 700;
const FLOAT8: Oid = 701;
const TIMESTAMP: Oid = 1114;
const TIMESTAMPTZ: Oid = 1184;
const NUMERIC: Oid = 1700;
const JSONB: Oid = 3802;

/// The encoding of a base type by oid (domains already resolved).
pub(super) fn scalar_encoding(oid: Oid) -> Encoding {
    match oid {
        BOOL => Encoding::Bool,
        INT2 | INT4 | INT8 => Encoding::Integer,
        FLOAT4 | FLOAT8 => Encoding::Float,
        NUMERIC => Encoding::Numeric,
        JSON => Encoding::Json,
        JSONB => Encoding::Jsonb,
        TIMESTAMP => Encoding::Timestamp,
        TIMESTAMPTZ => Encoding::TimestampTz,
        _ => Encoding::Text,
    }
}

/// A built-in type (oid < 10000, not a catalog row type), if `oid` is one.
pub fn builtin(oid: Oid) -> Option<Arc<TypeInfo>> {
    static TYPES: OnceLock<HashMap<Oid, Arc<TypeInfo>>> = OnceLock::new();
    TYPES.get_or_init(build_builtins).get(&oid).cloned()
}

fn build_builtins() -> HashMap<Oid, Arc<TypeInfo>> {
    let mut types: HashMap<Oid, Arc<TypeInfo>> = HashMap::new();
    // Scalars first, so arrays can point at their elements.
    for &(oid, name, element, delimiter) in BUILTIN_TYPES {
        if element == 0 {
            types.insert(
                oid,
                Arc::new(TypeInfo {
                    oid,
                    name: Arc::from(name),
                    sql_name: Arc::from(name),
                    delimiter,
                    encoding: scalar_encoding(oid),
                }),
            );
        }
    }
    for &(oid, name, element, delimiter) in BUILTIN_TYPES {
        // Arrays of catalog row types are left to the catalog lookup.
        let Some(element) = types.get(&element).cloned().filter(|_| element != 0) else {
            continue;
        };
        let encoding = match oid {
            INT2VECTOR | OIDVECTOR => Encoding::Vector(element),
            _ => Encoding::Array(element),
        };
        types.insert(
            oid,
            Arc::new(TypeInfo {
                oid,
                name: Arc::from(name),
                sql_name: Arc::from(name),
                delimiter,
                encoding,
            }),
        );
    }
    types
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtins_know_scalars_arrays_and_names() {
        let int4 = builtin(23).unwrap();
        assert_eq!((&*int4.name, &int4.encoding), ("int4", &Encoding::Integer));
        let ints = builtin(1007).unwrap();
        assert_eq!(&*ints.name, "_int4");
        assert_eq!(ints.encoding, Encoding::Array(int4));
        assert_eq!(
            builtin(1020).unwrap().encoding,
            Encoding::Array(builtin(603).unwrap())
        );
        assert_eq!(builtin(603).unwrap().delimiter, b';');
        assert_eq!(builtin(1184).unwrap().encoding, Encoding::TimestampTz);
        assert!(matches!(builtin(22).unwrap().encoding, Encoding::Vector(_)));
        assert_eq!(builtin(16384), None);
        // pg_type's row type is a composite: the catalog describes it.
        assert_eq!(builtin(71), None);
    }
}
