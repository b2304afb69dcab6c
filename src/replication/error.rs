//! Why the replication connection failed, and whether to retry.

use std::fmt;

/// An error the server sent (`ErrorResponse`), with the fields operators need.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DbError {
    /// `ERROR`, `FATAL`, `PANIC`.
    pub severity: String,
    /// SQLSTATE, e.g. `28P01`.
    pub code: String,
    /// The primary message.
    pub message: String,
    /// Optional detail.
    pub detail: Option<String>,
    /// Optional hint.
    pub hint: Option<String>,
}

impl fmt::Display for DbError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}: {}", self.severity, self.code, self.message)?;
        if let Some(detail) = &self.detail {
            write!(f, " (detail: {detail})")?;
        }
        if let Some(hint) = &self.hint {
            write!(f, " (hint: {hint})")?;
        }
        Ok(())
    }
}

/// A failure of the replication connection.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// TCP or Unix socket connect failed.
    #[error("could not connect to {addr}: {source}")]
    Connect {
        /// Where we tried to connect.
        addr: String,
        /// The socket error.
        source: std::io::Error,
    },
    /// Reading or writing the socket failed, or the server closed it.
    #[error("connection to postgres lost while {context}: {source}")]
    Io {
        /// What we were doing.
        context: &'static str,
        /// The socket error.
        source: std::io::Error,
    },
    /// A step took longer than allowed.
    #[error("timed out while {0}")]
    Timeout(&'static str),
    /// TLS could not be set up or the server's certificate was rejected.
    #[error("tls: {0}")]
    Tls(String),
    /// `sslmode` demands TLS and the server does not offer it.
    #[error(
        "the server does not support TLS but sslmode requires it; enable ssl on the server or use sslmode=prefer"
    )]
    TlsUnsupported,
    /// The server asked for an authentication method walcast cannot do.
    #[error("authentication: {0}")]
    Auth(String),
    /// The server sent an error.
    #[error("postgres: {0}")]
    Db(DbError),
    /// The server sent something the protocol does not allow here.
    #[error("unexpected message from postgres: {0}")]
    Protocol(String),
    /// The server's `wal_level` is too low for logical decoding.
    #[error(
        "wal_level is {0:?} but logical replication needs 'logical': run ALTER SYSTEM SET wal_level = logical; and restart postgres"
    )]
    WalLevel(String),
    /// The configured publication does not exist.
    #[error(
        "publication {0:?} does not exist in this database: create it with CREATE PUBLICATION {0} (empty) and ALTER PUBLICATION {0} ADD TABLE ..."
    )]
    PublicationMissing(String),
    /// Another process streams from the slot; we wait and retry as a standby.
    #[error(
        "replication slot {slot:?} is in use by another process ({detail}); waiting as a standby"
    )]
    SlotInUse {
        /// The slot.
        slot: String,
        /// The server's message.
        detail: String,
    },
}

impl Error {
    /// Whether reconnecting later may succeed (`true`), or an operator must
    /// fix something first (`false`).
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Connect { .. }
            | Error::Io { .. }
            | Error::Timeout(_)
            | Error::SlotInUse { .. } => true,
            Error::Db(db) => is_transient_sqlstate(&db.code),
            Error::Tls(_)
            | Error::TlsUnsupported
            | Error::Auth(_)
            | Error::Protocol(_)
            | Error::WalLevel(_)
            | Error::PublicationMissing(_) => false,
        }
    }

    pub(crate) fn io(context: &'static str) -> impl FnOnce(std::io::Error) -> Error {
        move |source| Error::Io { context, source }
    }
}

/// SQLSTATE classes that describe a server going away or overloaded rather
/// than a configuration mistake.
fn is_transient_sqlstate(code: &str) -> bool {
    matches!(
        code.get(..2),
        Some("08" /* connection exception */ | "53" /* insufficient resources */ | "57" /* operator intervention: shutdown, starting up */ | "58" /* system error */ | "40" /* transaction rollback */)
    ) || code == "55006" /* object in use */
        || code == "XX000" /* internal error: e.g. a walsender terminated mid-stream */
}

#[cfg(test)]
mod tests {
    use super::*;

    fn db(code: &str) -> Error {
        Error::Db(DbError {
            code: code.into(),
            ..DbError::default()
        })
    }

    #[test]
    fn shutdowns_and_overload_are_transient_configuration_is_not() {
        for code in ["57P01", "57P03", "53300", "08006", "55006"] {
            assert!(db(code).is_transient(), "{code}");
        }
        for code in ["28P01", "28000", "3D000", "42501", "42704", "55000"] {
            assert!(!db(code).is_transient(), "{code}");
        }
    }
}
