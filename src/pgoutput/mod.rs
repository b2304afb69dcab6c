//! pgoutput: bytes in, typed messages out.
//!
//! A sans-I/O decoder for the logical replication protocol that the
//! `pgoutput` plugin speaks inside `XLogData` frames: every protocol-1
//! message plus the protocol-2 `Stream*` family. It never panics on any
//! input and never does I/O; tuple values are zero-copy slices of the frame.
//!
//! Reference: <https://www.postgresql.org/docs/current/protocol-logicalrep-message-formats.html>.
//!
//! This module depends on nothing else in the crate but [`crate::lsn`].

mod decode;
mod error;
mod message;

pub use decode::Decoder;
pub use error::Error;
pub use message::*;
