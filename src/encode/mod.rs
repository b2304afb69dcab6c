//! Column values and changes → JSON.
//!
//! Values follow what Postgres's own `to_jsonb(value)` gives for the column
//! type (the [`crate::catalog::Encoding`] says which rule applies): numbers
//! keep their digits, non-finite numbers become strings, timestamps get a
//! `T`, arrays and composites are parsed from their text form and nested,
//! json is normalized as jsonb normalizes it, jsonb is copied as it is.
//! The change payload is the `data` object Supabase clients read.

mod array;
mod composite;
mod datetime;
mod json;
mod number;
mod payload;
mod time;
mod value;

pub use payload::{NO_PRIMARY_KEY, PAYLOAD_TOO_LARGE, PayloadEncoder, UNAUTHORIZED, View};
pub use time::write_commit_timestamp;
pub use value::{Malformed, write_json_string, write_value};
