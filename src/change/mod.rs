//! Change records from pgoutput messages.
//!
//! [`Assembler`] keeps the relation cache and the open transaction, and turns
//! each row message into a [`Change`] stamped with its transaction's commit
//! LSN, commit time and position. Protocol 1 only delivers committed
//! transactions, whole and in commit order, so a change can be passed on as
//! soon as it is decoded; the transaction's `Commit` then says which LSN may
//! be acknowledged once everything before it is published.

mod assemble;
mod record;
mod relation;

pub use assemble::{Assembler, Error, Event};
pub use record::{Change, ChangeKind, Datum, OldRow, Row};
pub use relation::{Column, Described, Relation, RelationCache};
