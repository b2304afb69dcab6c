//! `walcast setup`: applies `sql/` to a tenant database, as an
//! administrator, in one transaction.
//!
//! The SQL files are the source of truth (operators may run them with psql
//! instead); they are embedded here and take their names from the custom
//! settings `walcast.publication` and `walcast.role`, which this sets with
//! `set_config($1)` so no name is ever spliced into SQL. Every step reports
//! what it did as a `NOTICE`, which is what `walcast setup` prints.

use std::future::poll_fn;

use tokio::sync::mpsc;
use tokio_postgres::AsyncMessage;

use crate::check::describe;
use crate::config::{DatabaseUrl, UrlError};
use crate::replication::tls;

/// `sql/publication.sql`: the publication, created empty if missing.
pub const PUBLICATION_SQL: &str = include_str!("../sql/publication.sql");
/// `sql/role.sql`: walcast's least-privileged login role.
pub const ROLE_SQL: &str = include_str!("../sql/role.sql");
/// `sql/auth_helpers.sql`: `auth.uid()`, `auth.role()`, `auth.jwt()` for plain Postgres.
pub const AUTH_HELPERS_SQL: &str = include_str!("../sql/auth_helpers.sql");

/// `sql/realtime.sql`: Supabase's `realtime` schema (messages, send,
/// broadcast_changes, topic) where it is missing.
pub const REALTIME_SQL: &str = crate::messages::INSTALL_SQL;

/// How long a day's messages are kept unless told otherwise (Supabase's
/// 72 hours).
pub const DEFAULT_RETENTION: std::time::Duration = std::time::Duration::from_secs(72 * 3600);

/// The role name used when none is given.
pub const DEFAULT_ROLE: &str = "walcast";
/// Postgres truncates longer names, which would make the SQL's "does it
/// exist?" checks miss on a second run.
const MAX_NAME_BYTES: usize = 63;

/// What to set up.
#[derive(Debug, Clone)]
pub struct Options {
    /// A superuser (or the database owner with enough rights) on the tenant database.
    pub admin_url: DatabaseUrl,
    /// The login role to create for walcast.
    pub role: String,
    /// The publication to create if missing.
    pub publication: String,
    /// Also apply `sql/auth_helpers.sql`.
    pub auth_helpers: bool,
    /// Partitions of `realtime.messages` older than this are dropped.
    pub messages_retention: std::time::Duration,
}

/// What one SQL file did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// The file, e.g. `sql/role.sql`.
    pub file: &'static str,
    /// Its notices, in order: one line per step.
    pub notices: Vec<String>,
}

/// Why setup failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The admin url does not parse.
    #[error("invalid --admin-url (WALCAST_ADMIN_DATABASE_URL): {0}")]
    Url(#[from] UrlError),
    /// A role or publication name Postgres would not keep as given.
    #[error("invalid --{flag} {value:?}: use 1 to 63 bytes, without NUL")]
    Name {
        /// The flag.
        flag: &'static str,
        /// The value given.
        value: String,
    },
    /// TLS could not be configured for the admin url.
    #[error(transparent)]
    Tls(#[from] crate::replication::Error),
    /// The admin connection failed.
    #[error("cannot connect with --admin-url: {}", describe(.0))]
    Connect(#[source] tokio_postgres::Error),
    /// The partitions of realtime.messages could not be created (the SQL
    /// files were applied).
    #[error("{0}")]
    Partitions(#[source] crate::messages::partitions::Error),
    /// A SQL file failed; nothing was changed (one transaction).
    #[error("{file} failed, nothing was changed: {}", describe(.source))]
    Apply {
        /// The file.
        file: &'static str,
        /// The server's error (with its hint).
        source: tokio_postgres::Error,
    },
}

impl Error {
    /// Whether the options were wrong (exit code 2) rather than the database (1).
    pub fn is_usage(&self) -> bool {
        matches!(self, Error::Url(_) | Error::Name { .. })
    }
}

impl Options {
    /// Options from the command line's raw values.
    pub fn new(
        admin_url: &str,
        role: &str,
        publication: &str,
        auth_helpers: bool,
    ) -> Result<Options, Error> {
        Ok(Options {
            admin_url: DatabaseUrl::parse(admin_url)?,
            role: name("role", role)?,
            publication: name("publication", publication)?,
            auth_helpers,
            messages_retention: DEFAULT_RETENTION,
        })
    }
}

fn name(flag: &'static str, value: &str) -> Result<String, Error> {
    if value.is_empty() || value.len() > MAX_NAME_BYTES || value.contains('\0') {
        Err(Error::Name {
            flag,
            value: value.to_owned(),
        })
    } else {
        Ok(value.to_owned())
    }
}

/// The files to apply, in order.
fn files(options: &Options) -> Vec<(&'static str, &'static str)> {
    let mut files = vec![
        ("sql/publication.sql", PUBLICATION_SQL),
        ("sql/role.sql", ROLE_SQL),
        ("sql/rls.sql", crate::rls::INSTALL_SQL),
        ("sql/realtime.sql", REALTIME_SQL),
    ];
    if options.auth_helpers {
        files.push(("sql/auth_helpers.sql", AUTH_HELPERS_SQL));
    }
    files
}

/// Applies the SQL files in one transaction and returns what each did.
pub async fn apply(options: &Options) -> Result<Vec<Applied>, Error> {
    let (mut client, mut notices) = connect(&options.admin_url).await?;
    let failed = |file| move |source| Error::Apply { file, source };
    let tx = client
        .transaction()
        .await
        .map_err(failed("starting a transaction"))?;
    tx.execute(
        "SELECT pg_catalog.set_config('walcast.role', $1, true), \
                pg_catalog.set_config('walcast.publication', $2, true)",
        &[&options.role, &options.publication],
    )
    .await
    .map_err(failed("setting walcast.role and walcast.publication"))?;
    let mut applied = Vec::new();
    for (file, sql) in files(options) {
        tx.batch_execute(sql).await.map_err(failed(file))?;
        // The connection task forwards each notice before the reply that
        // completes the statement, so they are all queued by now.
        let mut lines = Vec::new();
        while let Ok(line) = notices.try_recv() {
            lines.push(line);
        }
        applied.push(Applied {
            file,
            notices: lines,
        });
    }
    tx.commit().await.map_err(failed("committing"))?;
    // Partitions are created by the same code the daemon's janitor runs.
    let done = crate::messages::partitions::maintain(&mut client, options.messages_retention)
        .await
        .map_err(Error::Partitions)?;
    applied.push(Applied {
        file: "realtime.messages partitions",
        notices: done
            .created
            .iter()
            .map(|p| format!("created partition realtime.{p}"))
            .chain(
                done.dropped
                    .iter()
                    .map(|p| format!("dropped partition realtime.{p}")),
            )
            .collect(),
    });
    Ok(applied)
}

/// What `walcast setup` prints: each file's steps, then what is left to do.
pub fn render(applied: &[Applied], options: &Options) -> String {
    let mut text = String::new();
    for step in applied {
        for notice in &step.notices {
            text.push_str(&format!("{}: {notice}\n", step.file));
        }
    }
    if !options.auth_helpers {
        text.push_str("sql/auth_helpers.sql: skipped (pass --auth-helpers to add auth.uid(), auth.role(), auth.jwt() to plain Postgres)\n");
    }
    text.push_str(&format!(
        "done. next: give role {role:?} a password (psql: \\password {role}), allow it in pg_hba.conf for this database and for replication, put it in database_url, and run walcast check\n",
        role = options.role
    ));
    text
}

/// Connects with `url`'s TLS policy; notices arrive on the receiver.
async fn connect(
    url: &DatabaseUrl,
) -> Result<(tokio_postgres::Client, mpsc::UnboundedReceiver<String>), Error> {
    let config = crate::pool::pg_config(url);
    let (tx, rx) = mpsc::unbounded_channel();
    let client = match tls::client_config(url)? {
        Some(tls) => {
            let tls = tokio_postgres_rustls::MakeRustlsConnect::new((*tls).clone());
            let (client, connection) = config.connect(tls).await.map_err(Error::Connect)?;
            tokio::spawn(forward_notices(connection, tx));
            client
        }
        None => {
            let (client, connection) = config
                .connect(tokio_postgres::NoTls)
                .await
                .map_err(Error::Connect)?;
            tokio::spawn(forward_notices(connection, tx));
            client
        }
    };
    Ok((client, rx))
}

/// Drives the connection, sending each notice's message to `tx`.
async fn forward_notices<S, T>(
    mut connection: tokio_postgres::Connection<S, T>,
    tx: mpsc::UnboundedSender<String>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    while let Some(Ok(message)) = poll_fn(|cx| connection.poll_message(cx)).await {
        if let AsyncMessage::Notice(notice) = message {
            let _ = tx.send(notice.message().to_owned());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_postgres_would_truncate_are_refused() {
        let url = "postgres://postgres@localhost/app";
        assert!(Options::new(url, "walcast", "supabase_realtime", false).is_ok());
        let long = "r".repeat(64);
        let err = Options::new(url, &long, "supabase_realtime", false).unwrap_err();
        assert!(err.is_usage());
        assert_eq!(
            err.to_string(),
            format!("invalid --role {long:?}: use 1 to 63 bytes, without NUL")
        );
        assert!(
            Options::new(url, "walcast", "", false)
                .unwrap_err()
                .is_usage()
        );
        assert!(
            Options::new("mysql://x", "walcast", "p", false)
                .unwrap_err()
                .is_usage()
        );
    }

    #[test]
    fn auth_helpers_come_last_and_only_when_asked() {
        let mut options =
            Options::new("postgres://h/d", "walcast", "supabase_realtime", false).unwrap();
        let names = |o: &Options| files(o).iter().map(|(f, _)| *f).collect::<Vec<_>>();
        assert_eq!(
            names(&options),
            [
                "sql/publication.sql",
                "sql/role.sql",
                "sql/rls.sql",
                "sql/realtime.sql"
            ]
        );
        options.auth_helpers = true;
        assert_eq!(
            names(&options),
            [
                "sql/publication.sql",
                "sql/role.sql",
                "sql/rls.sql",
                "sql/realtime.sql",
                "sql/auth_helpers.sql"
            ]
        );
    }
}
