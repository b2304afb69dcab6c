//! The pooled SQL connection to the tenant database, for everything that is
//! not the replication stream: catalog lookups now, RLS checks later.
//!
//! Built from the same [`DatabaseUrl`] as the replication connection and
//! with the same TLS policy. `RecyclingMethod::Clean` resets role and
//! settings whenever a connection goes back to the pool, so a check
//! cancelled half-way can never hand its role or claims to the next user.

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::config::SslMode as PgSslMode;

use crate::config::{DatabaseUrl, Host, SslMode};
use crate::replication::tls;

/// Why the pool could not be built.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// TLS could not be configured (e.g. an unreadable `sslrootcert`).
    #[error(transparent)]
    Tls(#[from] crate::replication::Error),
    /// deadpool refused the configuration.
    #[error("building the connection pool: {0}")]
    Build(String),
}

/// A tokio-postgres configuration for `url`, with the session settings the
/// replication connection pins too, so text output agrees between them.
pub fn pg_config(url: &DatabaseUrl) -> tokio_postgres::Config {
    let mut config = tokio_postgres::Config::new();
    match &url.host {
        Host::Tcp(host) => config.host(host),
        Host::Unix(dir) => config.host_path(dir),
    };
    if let Some(addr) = url.hostaddr.as_deref().and_then(|a| a.parse().ok()) {
        config.hostaddr(addr);
    }
    config
        .port(url.port)
        .user(&url.user)
        .dbname(&url.dbname)
        .application_name(&url.application_name)
        .connect_timeout(url.connect_timeout)
        .options("-c DateStyle=ISO -c IntervalStyle=postgres -c extra_float_digits=3 -c TimeZone=UTC -c bytea_output=hex")
        .ssl_mode(match url.ssl_mode {
            SslMode::Disable => PgSslMode::Disable,
            SslMode::Prefer => PgSslMode::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => PgSslMode::Require,
        });
    if let Some(password) = &url.password {
        config.password(password);
    }
    config
}

/// A pool of at most `size` connections to `url`; every statement on them
/// runs under `statement_timeout` when given (the daemon's `rls_timeout`),
/// so that no query the stream waits on — a catalog lookup, a filter a
/// client chose that only the server can evaluate — can stall the tenant.
/// (A session default: `DISCARD ALL` on recycling keeps it.)
pub fn build(
    url: &DatabaseUrl,
    size: usize,
    statement_timeout: Option<std::time::Duration>,
) -> Result<Pool, Error> {
    let mut config = pg_config(url);
    if let Some(timeout) = statement_timeout {
        let millis = timeout.as_millis().clamp(1, i32::MAX as u128);
        let options = config.get_options().unwrap_or_default().to_owned();
        config.options(format!("{options} -c statement_timeout={millis}"));
    }
    let manager_config = ManagerConfig {
        recycling_method: RecyclingMethod::Clean,
    };
    let manager = match tls::client_config(url)? {
        Some(tls) => Manager::from_config(
            config,
            tokio_postgres_rustls::MakeRustlsConnect::new((*tls).clone()),
            manager_config,
        ),
        None => Manager::from_config(config, tokio_postgres::NoTls, manager_config),
    };
    Pool::builder(manager)
        .max_size(size)
        .build()
        .map_err(|e| Error::Build(e.to_string()))
}
