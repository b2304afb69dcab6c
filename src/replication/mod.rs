//! The walsender conversation, on our own code over postgres-protocol.
//!
//! ```text
//! connect ── TLS? ── startup(replication=database, pinned formats) ── auth
//!    └─ IDENTIFY_SYSTEM, SHOW wal_level, publication check, ensure slot
//!         └─ START_REPLICATION ... (proto_version '1') ── CopyBoth:
//!              ◀── XLogData (pgoutput bytes), keepalives
//!              ──▶ standby status updates (acknowledged LSN, never backwards)
//! ```
//!
//! tokio-postgres has no CopyBoth, so this module owns the connection; the
//! daemon decides what to acknowledge (see `crate::daemon`).

mod commands;
mod connection;
mod error;
mod stream;
pub(crate) mod tls;

pub use commands::{Slot, SystemId};
pub(crate) use commands::{quote_ident, quote_literal};
pub use connection::Connection;
pub use error::{DbError, Error};
pub use stream::{ReplicationStream, StreamEvent, postgres_now};
