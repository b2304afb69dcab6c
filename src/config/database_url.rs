//! `DatabaseUrl`: where and how to reach the tenant database.
//!
//! Parsed from a libpq-style URL,
//! `postgres://user:password@host:port/dbname?sslmode=verify-full&sslrootcert=/ca.pem`.
//! Our own parser because tokio-postgres's does not know `verify-ca` and
//! `verify-full`, and the replication connection is our own code anyway.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

/// How the connection uses TLS, as libpq's `sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    /// Never TLS.
    Disable,
    /// TLS if the server offers it, without verifying the certificate (libpq's default).
    Prefer,
    /// TLS or fail; the certificate is not verified.
    Require,
    /// TLS or fail; the certificate chain must verify against the trusted roots.
    VerifyCa,
    /// As `VerifyCa`, and the certificate must name the host.
    VerifyFull,
}

/// Where the server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Host {
    /// A host name or IP address, reached over TCP.
    Tcp(String),
    /// A directory holding the server's Unix socket (`host=/var/run/postgresql`).
    Unix(PathBuf),
}

/// A parsed database URL. `Debug` and `Display` never show the password.
#[derive(Clone, PartialEq, Eq)]
pub struct DatabaseUrl {
    /// Where the server listens.
    pub host: Host,
    /// An IP address to connect to instead of resolving `host`, which then
    /// only names the server for TLS verification (libpq's `hostaddr`).
    pub hostaddr: Option<String>,
    /// TCP port, also the Unix socket's suffix.
    pub port: u16,
    /// Login role.
    pub user: String,
    /// Password, if the server asks for one.
    pub password: Option<String>,
    /// Database name.
    pub dbname: String,
    /// TLS policy.
    pub ssl_mode: SslMode,
    /// PEM file with the CA certificates to trust instead of the system's.
    pub ssl_root_cert: Option<PathBuf>,
    /// `application_name` reported to the server.
    pub application_name: String,
    /// How long to wait for TCP connect and the startup handshake.
    pub connect_timeout: Duration,
}

/// Why a database URL was rejected.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UrlError {
    /// The scheme is not `postgres://` or `postgresql://`.
    #[error("database url must start with postgres:// or postgresql://")]
    Scheme,
    /// The port is not a number in 1..=65535.
    #[error("database url has an invalid port {0:?}")]
    Port(String),
    /// A `%XX` escape is malformed or decodes to invalid UTF-8.
    #[error("database url has an invalid percent-escape in {0:?}")]
    Escape(String),
    /// A query parameter's value is not allowed.
    #[error("database url parameter {name}={value:?} is invalid: {expected}")]
    Parameter {
        /// Parameter name.
        name: String,
        /// The value given.
        value: String,
        /// What would be accepted.
        expected: &'static str,
    },
    /// A query parameter walcast does not know.
    #[error(
        "database url parameter {0:?} is not supported (supported: host, hostaddr, port, user, password, dbname, sslmode, sslrootcert, application_name, connect_timeout)"
    )]
    UnknownParameter(String),
}

impl DatabaseUrl {
    /// Parses a `postgres://` URL.
    pub fn parse(url: &str) -> Result<Self, UrlError> {
        let rest = url
            .strip_prefix("postgres://")
            .or_else(|| url.strip_prefix("postgresql://"))
            .ok_or(UrlError::Scheme)?;
        let (rest, query) = match rest.split_once('?') {
            Some((r, q)) => (r, Some(q)),
            None => (rest, None),
        };
        let (authority, path) = match rest.split_once('/') {
            Some((a, p)) => (a, p),
            None => (rest, ""),
        };
        let (userinfo, hostport) = match authority.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, authority),
        };
        let mut parsed = DatabaseUrl {
            host: Host::Tcp("localhost".to_owned()),
            hostaddr: None,
            port: 5432,
            user: "postgres".to_owned(),
            password: None,
            dbname: String::new(),
            ssl_mode: SslMode::Prefer,
            ssl_root_cert: None,
            application_name: "walcast".to_owned(),
            connect_timeout: Duration::from_secs(10),
        };
        if let Some(userinfo) = userinfo {
            let (user, password) = match userinfo.split_once(':') {
                Some((u, p)) => (u, Some(p)),
                None => (userinfo, None),
            };
            if !user.is_empty() {
                parsed.user = decode(user)?;
            }
            parsed.password = password.map(decode).transpose()?;
        }
        let (host, port) = split_host_port(hostport);
        if !host.is_empty() {
            parsed.host = Host::Tcp(decode(host)?);
        }
        if let Some(port) = port {
            parsed.port = parse_port(port)?;
        }
        if !path.is_empty() {
            parsed.dbname = decode(path)?;
        }
        for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            parsed.apply_parameter(&decode(name)?, decode(value)?)?;
        }
        if parsed.dbname.is_empty() {
            parsed.dbname = parsed.user.clone();
        }
        Ok(parsed)
    }

    fn apply_parameter(&mut self, name: &str, value: String) -> Result<(), UrlError> {
        let invalid = |expected| UrlError::Parameter {
            name: name.to_owned(),
            value: value.clone(),
            expected,
        };
        match name {
            "host" if value.starts_with('/') => self.host = Host::Unix(PathBuf::from(&value)),
            "host" => self.host = Host::Tcp(value),
            "hostaddr" => self.hostaddr = Some(value),
            "port" => self.port = parse_port(&value)?,
            "user" => self.user = value,
            "password" => self.password = Some(value),
            "dbname" => self.dbname = value,
            "application_name" => self.application_name = value,
            "sslrootcert" => self.ssl_root_cert = Some(PathBuf::from(value)),
            "sslmode" => {
                self.ssl_mode = match value.as_str() {
                    "disable" => SslMode::Disable,
                    "prefer" => SslMode::Prefer,
                    "require" => SslMode::Require,
                    "verify-ca" => SslMode::VerifyCa,
                    "verify-full" => SslMode::VerifyFull,
                    _ => {
                        return Err(invalid(
                            "one of disable, prefer, require, verify-ca, verify-full",
                        ));
                    }
                }
            }
            "connect_timeout" => {
                let secs: u64 = value
                    .parse()
                    .map_err(|_| invalid("a whole number of seconds"))?;
                self.connect_timeout = Duration::from_secs(secs.max(1));
            }
            _ => return Err(UrlError::UnknownParameter(name.to_owned())),
        }
        Ok(())
    }

    /// The URL as it can be logged: everything but the password.
    pub fn redacted(&self) -> String {
        let host = match &self.host {
            Host::Tcp(h) => h.clone(),
            Host::Unix(dir) => dir.display().to_string(),
        };
        format!(
            "postgres://{}@{host}:{}/{}",
            self.user, self.port, self.dbname
        )
    }
}

impl fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DatabaseUrl")
            .field("url", &self.redacted())
            .field("ssl_mode", &self.ssl_mode)
            .finish_non_exhaustive()
    }
}

impl fmt::Display for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

fn split_host_port(hostport: &str) -> (&str, Option<&str>) {
    // `[::1]:5432`: the brackets protect the address's own colons.
    if let Some((addr, rest)) = hostport.strip_prefix('[').and_then(|i| i.split_once(']')) {
        return (addr, rest.strip_prefix(':'));
    }
    match hostport.rsplit_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (hostport, None),
    }
}

fn parse_port(port: &str) -> Result<u16, UrlError> {
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(UrlError::Port(port.to_owned())),
    }
}

fn decode(text: &str) -> Result<String, UrlError> {
    let err = || UrlError::Escape(text.to_owned());
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        if b == b'%' {
            let hex = bytes.get(i + 1..i + 3).ok_or_else(err)?;
            let hex = std::str::from_utf8(hex).map_err(|_| err())?;
            out.push(u8::from_str_radix(hex, 16).map_err(|_| err())?);
            i += 3;
        } else {
            out.push(b);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| err())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_full_url() {
        let url = DatabaseUrl::parse(
            "postgres://wal%40cast:p%3Ass@db.example.com:6543/tenant_1?sslmode=verify-full&sslrootcert=/ca.pem&application_name=x&connect_timeout=3",
        )
        .unwrap();
        assert_eq!(url.host, Host::Tcp("db.example.com".into()));
        assert_eq!(url.port, 6543);
        assert_eq!(url.user, "wal@cast");
        assert_eq!(url.password.as_deref(), Some("p:ss"));
        assert_eq!(url.dbname, "tenant_1");
        assert_eq!(url.ssl_mode, SslMode::VerifyFull);
        assert_eq!(url.ssl_root_cert, Some(PathBuf::from("/ca.pem")));
        assert_eq!(url.application_name, "x");
        assert_eq!(url.connect_timeout, Duration::from_secs(3));
    }

    #[test]
    fn defaults_follow_libpq() {
        let url = DatabaseUrl::parse("postgresql://alice@/").unwrap();
        assert_eq!(url.host, Host::Tcp("localhost".into()));
        assert_eq!(url.port, 5432);
        assert_eq!(url.dbname, "alice");
        assert_eq!(url.ssl_mode, SslMode::Prefer);
    }

    #[test]
    fn ipv6_and_unix_socket_hosts() {
        let url = DatabaseUrl::parse("postgres://u@[::1]:5433/d").unwrap();
        assert_eq!((url.host, url.port), (Host::Tcp("::1".into()), 5433));
        let url = DatabaseUrl::parse("postgres:///d?host=/var/run/postgresql").unwrap();
        assert_eq!(url.host, Host::Unix(PathBuf::from("/var/run/postgresql")));
    }

    #[test]
    fn debug_and_display_hide_the_password() {
        let url = DatabaseUrl::parse("postgres://u:secret@h/d").unwrap();
        assert!(!format!("{url:?} {url}").contains("secret"));
    }

    #[test]
    fn rejects_bad_input_naming_it() {
        assert_eq!(DatabaseUrl::parse("mysql://x"), Err(UrlError::Scheme));
        assert_eq!(
            DatabaseUrl::parse("postgres://h:99999/d"),
            Err(UrlError::Port("99999".into()))
        );
        assert_eq!(
            DatabaseUrl::parse("postgres://h/d?sslmode=always")
                .unwrap_err()
                .to_string(),
            "database url parameter sslmode=\"always\" is invalid: one of disable, prefer, require, verify-ca, verify-full"
        );
        assert_eq!(
            DatabaseUrl::parse("postgres://h/d?foo=1"),
            Err(UrlError::UnknownParameter("foo".into()))
        );
        assert_eq!(
            DatabaseUrl::parse("postgres://u%zz@h/d"),
            Err(UrlError::Escape("u%zz".into()))
        );
    }
}
