//! Column values and changes → JSON.
//!
//! Values follow what Postgres's own `to_jsonb` gives for the column type;
//! this first version knows bool, the integer and float types, numeric,
//! json and jsonb, and renders every other type as its text output in a JSON
//! string. The change payload is the `data` object Supabase clients read.

mod payload;
mod time;
mod value;

pub use payload::write_data;
pub use time::write_commit_timestamp;
pub use value::{write_json_string, write_value};
