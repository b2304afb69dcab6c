//! Settings: one table of keys, resolved from the TOML file, then `WALCAST_*`
//! environment variables, then command-line flags (each later source wins).
//!
//! Every value is parsed by the same function whatever its source, and an
//! invalid value is reported with its key and where it came from.

mod database_url;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

pub use database_url::{DatabaseUrl, Host, SslMode, UrlError};

use crate::gateway::auth::{ClaimValidators, KeySet};
use crate::gateway::limits::Limits;

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// The daemon's resolved settings.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The tenant database (replication and, later, the pool).
    pub database_url: DatabaseUrl,
    /// The Redis bus: one server, or a cluster's seed nodes, comma-separated.
    pub redis_url: String,
    /// The bus is a Redis Cluster: sharded pub/sub, hash-tagged names.
    pub redis_cluster: bool,
    /// Tenant id used in bus channel names.
    pub tenant: String,
    /// Logical replication slot name.
    pub slot: String,
    /// Make the slot a failover slot (PostgreSQL 17+), synchronized to
    /// standby servers that have `sync_replication_slots` on.
    pub slot_failover: bool,
    /// A physical standby server of the database, where `walcast check`
    /// looks for the synchronized slot.
    pub standby_database_url: Option<DatabaseUrl>,
    /// Publication whose tables are streamed.
    pub publication: String,
    /// Publish every change unfiltered on the tenant's firehose channel.
    pub firehose: bool,
    /// How often a standby status update is sent to Postgres.
    pub status_interval: Duration,
    /// The longest pause between reconnection attempts.
    pub reconnect_max_delay: Duration,
    /// Roles subscriptions may check visibility as.
    pub allowed_roles: Vec<String>,
    /// Above this many bytes of `record` + `old_record` JSON, values over
    /// 64 bytes are dropped and the payload says `Error 413`.
    pub max_record_bytes: usize,
    /// Where the admin server (`/metrics`, `/health`, `/ready`) listens.
    pub admin_addr: SocketAddr,
    /// Above this many bytes of WAL retained by the slot, a warning is logged.
    pub retained_wal_warn_bytes: u64,
    /// How subscribers' visibility is decided in batches.
    pub rls: RlsSettings,
    /// The publication of `realtime.messages` (Broadcast from Database),
    /// streamed beside `publication` when it exists.
    pub messages_publication: String,
    /// How long `realtime.messages` keeps a day's partition after the day.
    pub messages_retention: Duration,
    /// Log line format.
    pub log_format: LogFormat,
    /// Log filter (`tracing_subscriber::EnvFilter` syntax).
    pub log: String,
}

/// How changes that need Row Level Security checks are batched: latency
/// against throughput. One check of a table costs about as much per
/// subscriber group for one row as for thousands, so a burst is checked
/// together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RlsSettings {
    /// Changes decided together at most (one check per table for all).
    pub batch_size: usize,
    /// How long a change waits for more to be checked with it.
    pub batch_wait: Duration,
    /// The longest a single check statement may run (`statement_timeout`);
    /// its groups are denied when it does not finish in time.
    pub timeout: Duration,
    /// Checks of one batch run on this many pooled connections at once.
    pub connections: usize,
    /// Whether many unfiltered groups may search the batch's sorted keys.
    pub sorted_keys: crate::rls::SortedKeys,
}

/// One setting: its TOML key, environment variable, flag and default.
#[derive(Debug)]
pub struct Key {
    /// Key in the TOML file.
    pub toml: &'static str,
    /// Environment variable.
    pub env: &'static str,
    /// Command-line flag.
    pub flag: &'static str,
    /// Default, if the setting is optional.
    pub default: Option<&'static str>,
}

macro_rules! keys {
    ($($name:ident: $toml:literal, $env:literal, $flag:literal, $default:expr;)*) => {
        $(
            #[doc = concat!("The `", $toml, "` setting.")]
            pub const $name: Key = Key { toml: $toml, env: $env, flag: $flag, default: $default };
        )*
        /// Every setting, in documentation order.
        pub const KEYS: &[Key] = &[$($name),*];
    };
}

keys! {
    DATABASE_URL: "database_url", "WALCAST_DATABASE_URL", "--database-url", None;
    REDIS_URL: "redis_url", "WALCAST_REDIS_URL", "--redis-url", Some("redis://127.0.0.1:6379");
    REDIS_CLUSTER: "redis_cluster", "WALCAST_REDIS_CLUSTER", "--redis-cluster", Some("false");
    TENANT: "tenant", "WALCAST_TENANT", "--tenant", Some("default");
    SLOT: "slot", "WALCAST_SLOT", "--slot", Some("walcast");
    SLOT_FAILOVER: "slot_failover", "WALCAST_SLOT_FAILOVER", "--slot-failover", Some("false");
    STANDBY_DATABASE_URL: "standby_database_url", "WALCAST_STANDBY_DATABASE_URL", "--standby-database-url", None;
    PUBLICATION: "publication", "WALCAST_PUBLICATION", "--publication", Some("supabase_realtime");
    FIREHOSE: "firehose", "WALCAST_FIREHOSE", "--firehose", Some("false");
    STATUS_INTERVAL: "status_interval", "WALCAST_STATUS_INTERVAL", "--status-interval", Some("1s");
    RECONNECT_MAX_DELAY: "reconnect_max_delay", "WALCAST_RECONNECT_MAX_DELAY", "--reconnect-max-delay", Some("10s");
    ALLOWED_ROLES: "allowed_roles", "WALCAST_ALLOWED_ROLES", "--allowed-roles", Some("anon,authenticated");
    MAX_RECORD_BYTES: "max_record_bytes", "WALCAST_MAX_RECORD_BYTES", "--max-record-bytes", Some("1048576");
    ADMIN_ADDR: "admin_addr", "WALCAST_ADMIN_ADDR", "--admin-addr", Some("127.0.0.1:9187");
    RETAINED_WAL_WARN_BYTES: "retained_wal_warn_bytes", "WALCAST_RETAINED_WAL_WARN_BYTES", "--retained-wal-warn-bytes", Some("1073741824");
    RLS_BATCH_SIZE: "rls_batch_size", "WALCAST_RLS_BATCH_SIZE", "--rls-batch-size", Some("4096");
    RLS_BATCH_WAIT: "rls_batch_wait", "WALCAST_RLS_BATCH_WAIT", "--rls-batch-wait", Some("20ms");
    RLS_TIMEOUT: "rls_timeout", "WALCAST_RLS_TIMEOUT", "--rls-timeout", Some("5s");
    RLS_CONNECTIONS: "rls_connections", "WALCAST_RLS_CONNECTIONS", "--rls-connections", Some("2");
    RLS_SORTED_KEYS: "rls_sorted_keys", "WALCAST_RLS_SORTED_KEYS", "--rls-sorted-keys", Some("auto");
    MESSAGES_PUBLICATION: "messages_publication", "WALCAST_MESSAGES_PUBLICATION", "--messages-publication", Some("supabase_realtime_messages_publication");
    MESSAGES_RETENTION: "messages_retention", "WALCAST_MESSAGES_RETENTION", "--messages-retention", Some("72h");
    LOG_FORMAT: "log_format", "WALCAST_LOG_FORMAT", "--log-format", Some("text");
    LOG: "log", "WALCAST_LOG", "--log", Some("info");
    GATEWAY_ADDR: "gateway_addr", "WALCAST_GATEWAY_ADDR", "--gateway-addr", Some("0.0.0.0:4000");
    JWT_SECRET: "jwt_secret", "WALCAST_JWT_SECRET", "--jwt-secret", None;
    GATEWAY_ID: "gateway_id", "WALCAST_GATEWAY_ID", "--gateway-id", None;
    JWT_JWKS: "jwt_jwks", "WALCAST_JWT_JWKS", "--jwt-jwks", None;
    JWT_CLAIM_VALIDATORS: "jwt_claim_validators", "WALCAST_JWT_CLAIM_VALIDATORS", "--jwt-claim-validators", Some("{}");
    MAX_CONCURRENT_USERS: "max_concurrent_users", "WALCAST_MAX_CONCURRENT_USERS", "--max-concurrent-users", Some("200");
    MAX_CHANNELS_PER_CLIENT: "max_channels_per_client", "WALCAST_MAX_CHANNELS_PER_CLIENT", "--max-channels-per-client", Some("100");
    MAX_JOINS_PER_SECOND: "max_joins_per_second", "WALCAST_MAX_JOINS_PER_SECOND", "--max-joins-per-second", Some("100");
    MAX_TOPIC_BYTES: "max_topic_bytes", "WALCAST_MAX_TOPIC_BYTES", "--max-topic-bytes", Some("1024");
    MAX_BINDINGS_PER_CHANNEL: "max_bindings_per_channel", "WALCAST_MAX_BINDINGS_PER_CHANNEL", "--max-bindings-per-channel", Some("100");
    MAX_BINDING_BYTES: "max_binding_bytes", "WALCAST_MAX_BINDING_BYTES", "--max-binding-bytes", Some("4096");
    MAX_JWT_BYTES: "max_jwt_bytes", "WALCAST_MAX_JWT_BYTES", "--max-jwt-bytes", Some("16384");
    MAX_SOCKETS_PER_ADDRESS: "max_sockets_per_address", "WALCAST_MAX_SOCKETS_PER_ADDRESS", "--max-sockets-per-address", Some("0");
    MAX_EVENTS_PER_SECOND: "max_events_per_second", "WALCAST_MAX_EVENTS_PER_SECOND", "--max-events-per-second", Some("100");
    MAX_PAYLOAD_SIZE_IN_KB: "max_payload_size_in_kb", "WALCAST_MAX_PAYLOAD_SIZE_IN_KB", "--max-payload-size-in-kb", Some("3000");
    MAX_PRESENCE_EVENTS_PER_SECOND: "max_presence_events_per_second", "WALCAST_MAX_PRESENCE_EVENTS_PER_SECOND", "--max-presence-events-per-second", Some("1000");
    MAX_CLIENT_PRESENCE_EVENTS_PER_WINDOW: "max_client_presence_events_per_window", "WALCAST_MAX_CLIENT_PRESENCE_EVENTS_PER_WINDOW", "--max-client-presence-events-per-window", Some("5");
    CLIENT_PRESENCE_WINDOW: "client_presence_window", "WALCAST_CLIENT_PRESENCE_WINDOW", "--client-presence-window", Some("30s");
    GATEWAY_LEASE: "gateway_lease", "WALCAST_GATEWAY_LEASE", "--gateway-lease", Some("30s");
}

/// Why settings could not be resolved.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The TOML file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The TOML file is not valid TOML.
    #[error("config file {path} is not valid TOML: {source}")]
    Toml {
        /// The file.
        path: String,
        /// The parse error (with line and column).
        source: toml::de::Error,
    },
    /// The TOML file has a key walcast does not know.
    #[error("config file {path} has an unknown key `{key}` (known keys: {known})")]
    UnknownKey {
        /// The file.
        path: String,
        /// The unknown key.
        key: String,
        /// The known keys.
        known: String,
    },
    /// A required setting was given nowhere.
    #[error("`{key}` is required: set {env}, pass {flag}, or put `{key} = ...` in the config file")]
    Missing {
        /// The TOML key.
        key: &'static str,
        /// The environment variable.
        env: &'static str,
        /// The flag.
        flag: &'static str,
    },
    /// A value does not parse.
    #[error("invalid value for `{key}` (from {origin}): {reason}")]
    Invalid {
        /// The TOML key.
        key: &'static str,
        /// Where the value came from.
        origin: String,
        /// What is wrong and what would be accepted.
        reason: String,
    },
}

/// Raw values from one source, by TOML key.
#[derive(Debug, Default, Clone)]
pub struct Layer {
    values: BTreeMap<&'static str, (String, String)>,
}

impl Layer {
    /// Values from a TOML file. Unknown keys are an error.
    pub fn from_toml_file(path: &Path) -> Result<Layer, Error> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
            path: shown.clone(),
            source,
        })?;
        Layer::from_toml_str(&text, &shown)
    }

    /// Values from TOML text; `path` names it in errors.
    pub fn from_toml_str(text: &str, path: &str) -> Result<Layer, Error> {
        let table: toml::Table = toml::from_str(text).map_err(|source| Error::Toml {
            path: path.to_owned(),
            source,
        })?;
        let mut layer = Layer::default();
        for (name, value) in table {
            let Some(key) = KEYS.iter().find(|k| k.toml == name) else {
                return Err(Error::UnknownKey {
                    path: path.to_owned(),
                    key: name,
                    known: KEYS.iter().map(|k| k.toml).collect::<Vec<_>>().join(", "),
                });
            };
            let text = match value {
                toml::Value::String(s) => s,
                other => other.to_string(),
            };
            layer
                .values
                .insert(key.toml, (text, format!("config file {path}")));
        }
        Ok(layer)
    }

    /// Values from `WALCAST_*` environment variables, read through `get`.
    pub fn from_env(get: impl Fn(&str) -> Option<String>) -> Layer {
        let mut layer = Layer::default();
        for key in KEYS {
            if let Some(value) = get(key.env) {
                layer.values.insert(
                    key.toml,
                    (value, format!("environment variable {}", key.env)),
                );
            }
        }
        layer
    }

    /// Values given as command-line flags, by TOML key.
    pub fn from_flags<'a>(flags: impl IntoIterator<Item = (&'a Key, Option<String>)>) -> Layer {
        let mut layer = Layer::default();
        for (key, value) in flags {
            if let Some(value) = value {
                layer
                    .values
                    .insert(key.toml, (value, format!("flag {}", key.flag)));
            }
        }
        layer
    }
}

impl Settings {
    /// Resolves settings from layers given lowest precedence first.
    pub fn resolve(layers: &[Layer]) -> Result<Settings, Error> {
        let lookup = |key: &'static Key| -> Result<(String, String), Error> {
            for layer in layers.iter().rev() {
                if let Some((value, origin)) = layer.values.get(key.toml) {
                    return Ok((value.clone(), origin.clone()));
                }
            }
            match key.default {
                Some(default) => Ok((default.to_owned(), "default".to_owned())),
                None => Err(Error::Missing {
                    key: key.toml,
                    env: key.env,
                    flag: key.flag,
                }),
            }
        };
        fn parse<T>(
            key: &'static Key,
            (value, origin): (String, String),
            f: impl FnOnce(&str) -> Result<T, String>,
        ) -> Result<T, Error> {
            f(&value).map_err(|reason| Error::Invalid {
                key: key.toml,
                origin,
                reason,
            })
        }
        let redis_cluster = parse(&REDIS_CLUSTER, lookup(&REDIS_CLUSTER)?, parse_bool)?;
        Ok(Settings {
            database_url: parse(&DATABASE_URL, lookup(&DATABASE_URL)?, |v| {
                DatabaseUrl::parse(v).map_err(|e| e.to_string())
            })?,
            redis_url: parse(&REDIS_URL, lookup(&REDIS_URL)?, |v| {
                parse_redis_url(v, redis_cluster)
            })?,
            redis_cluster,
            tenant: parse(&TENANT, lookup(&TENANT)?, parse_tenant)?,
            slot: parse(&SLOT, lookup(&SLOT)?, parse_slot)?,
            slot_failover: parse(&SLOT_FAILOVER, lookup(&SLOT_FAILOVER)?, parse_bool)?,
            standby_database_url: match lookup(&STANDBY_DATABASE_URL) {
                Ok(found) => Some(parse(&STANDBY_DATABASE_URL, found, |v| {
                    DatabaseUrl::parse(v).map_err(|e| e.to_string())
                })?),
                Err(Error::Missing { .. }) => None,
                Err(e) => return Err(e),
            },
            publication: parse(&PUBLICATION, lookup(&PUBLICATION)?, parse_publication)?,
            firehose: parse(&FIREHOSE, lookup(&FIREHOSE)?, parse_bool)?,
            status_interval: parse(&STATUS_INTERVAL, lookup(&STATUS_INTERVAL)?, parse_duration)?,
            reconnect_max_delay: parse(
                &RECONNECT_MAX_DELAY,
                lookup(&RECONNECT_MAX_DELAY)?,
                parse_duration,
            )?,
            allowed_roles: parse(&ALLOWED_ROLES, lookup(&ALLOWED_ROLES)?, parse_roles)?,
            max_record_bytes: parse(&MAX_RECORD_BYTES, lookup(&MAX_RECORD_BYTES)?, parse_bytes)?,
            admin_addr: parse(&ADMIN_ADDR, lookup(&ADMIN_ADDR)?, parse_socket_addr)?,
            retained_wal_warn_bytes: parse(
                &RETAINED_WAL_WARN_BYTES,
                lookup(&RETAINED_WAL_WARN_BYTES)?,
                |v| parse_bytes(v).map(|n| n as u64),
            )?,
            rls: RlsSettings {
                batch_size: parse(&RLS_BATCH_SIZE, lookup(&RLS_BATCH_SIZE)?, |v| {
                    parse_count(v, 1_000_000)
                })?,
                batch_wait: parse(&RLS_BATCH_WAIT, lookup(&RLS_BATCH_WAIT)?, parse_duration)?,
                timeout: parse(&RLS_TIMEOUT, lookup(&RLS_TIMEOUT)?, parse_duration)?,
                connections: parse(&RLS_CONNECTIONS, lookup(&RLS_CONNECTIONS)?, |v| {
                    parse_count(v, 64)
                })?,
                sorted_keys: parse(&RLS_SORTED_KEYS, lookup(&RLS_SORTED_KEYS)?, |v| {
                    crate::rls::SortedKeys::parse(v)
                        .ok_or_else(|| format!("expected auto, on or off, got {v:?}"))
                })?,
            },
            messages_publication: parse(
                &MESSAGES_PUBLICATION,
                lookup(&MESSAGES_PUBLICATION)?,
                parse_publication,
            )?,
            messages_retention: parse(
                &MESSAGES_RETENTION,
                lookup(&MESSAGES_RETENTION)?,
                parse_duration,
            )?,
            log_format: parse(&LOG_FORMAT, lookup(&LOG_FORMAT)?, parse_log_format)?,
            log: lookup(&LOG)?.0,
        })
    }
}

/// The gateway's resolved settings (`walcast gateway`): it needs Redis and
/// the JWT secret or a JWKS, never the database.
#[derive(Clone)]
pub struct GatewaySettings {
    /// The Redis bus: one server, or a cluster's seed nodes, comma-separated.
    pub redis_url: String,
    /// The bus is a Redis Cluster: sharded pub/sub, hash-tagged names.
    pub redis_cluster: bool,
    /// Tenant id used in bus channel names.
    pub tenant: String,
    /// Where the WebSocket server listens.
    pub gateway_addr: SocketAddr,
    /// The HMAC secret HS* client JWTs are signed with (kept out of
    /// `Debug`); optional only when a JWKS is given.
    pub jwt_secret: Option<String>,
    /// Keys of asymmetrically signed JWTs (RS*, ES*, EdDSA), by `kid`.
    pub jwt_jwks: Option<KeySet>,
    /// Claims every client JWT must carry with exactly these values.
    pub jwt_claim_validators: ClaimValidators,
    /// Sockets, channels per socket and joins per second.
    pub limits: Limits,
    /// The gateway's id on the bus, if configured (else `hostname:port:random`).
    pub gateway_id: Option<String>,
    /// How long the gateway's lease on the bus lives: after it dies, its
    /// presences leave within this plus 5 s.
    pub gateway_lease: Duration,
    /// Log line format.
    pub log_format: LogFormat,
    /// Log filter (`tracing_subscriber::EnvFilter` syntax).
    pub log: String,
}

impl std::fmt::Debug for GatewaySettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GatewaySettings")
            .field("redis_url", &self.redis_url)
            .field("redis_cluster", &self.redis_cluster)
            .field("tenant", &self.tenant)
            .field("gateway_addr", &self.gateway_addr)
            .field(
                "jwt_secret",
                &self.jwt_secret.as_ref().map(|_| "<redacted>"),
            )
            .field("jwt_jwks", &self.jwt_jwks)
            .field("jwt_claim_validators", &self.jwt_claim_validators)
            .field("limits", &self.limits)
            .field("gateway_id", &self.gateway_id)
            .field("gateway_lease", &self.gateway_lease)
            .field("log_format", &self.log_format)
            .field("log", &self.log)
            .finish()
    }
}

impl GatewaySettings {
    /// Resolves the gateway's settings from layers given lowest precedence first.
    pub fn resolve(layers: &[Layer]) -> Result<GatewaySettings, Error> {
        let lookup = |key: &'static Key| -> Option<(String, String)> {
            layers
                .iter()
                .rev()
                .find_map(|layer| layer.values.get(key.toml).cloned())
                .or_else(|| key.default.map(|d| (d.to_owned(), "default".to_owned())))
        };
        let required = |key: &'static Key| {
            lookup(key).ok_or(Error::Missing {
                key: key.toml,
                env: key.env,
                flag: key.flag,
            })
        };
        let parse = |key: &'static Key,
                     f: &dyn Fn(&str) -> Result<String, String>|
         -> Result<String, Error> {
            let (value, origin) = required(key)?;
            f(&value).map_err(|reason| Error::Invalid {
                key: key.toml,
                origin,
                reason,
            })
        };
        let (addr, addr_origin) = required(&GATEWAY_ADDR)?;
        let (format, format_origin) = required(&LOG_FORMAT)?;
        let invalid = |key: &'static Key, origin: String| {
            move |reason: String| Error::Invalid {
                key: key.toml,
                origin,
                reason,
            }
        };
        // Both read by the same function whatever the source, like
        // every other value; a JWKS may come inline or from a file.
        let jwt_jwks = lookup(&JWT_JWKS)
            .map(|(v, origin)| parse_jwks(&v).map_err(invalid(&JWT_JWKS, origin)))
            .transpose()?;
        let (validators, validators_origin) = required(&JWT_CLAIM_VALIDATORS)?;
        let count = |key: &'static Key| -> Result<usize, Error> {
            let (value, origin) = required(key)?;
            parse_count(&value, 1_000_000).map_err(invalid(key, origin))
        };
        // Without a JWKS the secret is the only way to verify a token.
        let jwt_secret = match (lookup(&JWT_SECRET), &jwt_jwks) {
            (None, Some(_)) => None,
            _ => Some(parse(&JWT_SECRET, &|v| {
                if v.is_empty() {
                    Err("the JWT secret must not be empty".to_owned())
                } else {
                    Ok(v.to_owned())
                }
            })?),
        };
        let (cluster, cluster_origin) = required(&REDIS_CLUSTER)?;
        let redis_cluster =
            parse_bool(&cluster).map_err(invalid(&REDIS_CLUSTER, cluster_origin))?;
        Ok(GatewaySettings {
            redis_url: parse(&REDIS_URL, &|v| parse_redis_url(v, redis_cluster))?,
            redis_cluster,
            tenant: parse(&TENANT, &parse_tenant)?,
            gateway_addr: parse_socket_addr(&addr).map_err(invalid(&GATEWAY_ADDR, addr_origin))?,
            jwt_secret,
            jwt_jwks,
            jwt_claim_validators: ClaimValidators::parse(&validators)
                .map_err(invalid(&JWT_CLAIM_VALIDATORS, validators_origin))?,
            limits: Limits {
                max_concurrent_users: count(&MAX_CONCURRENT_USERS)?,
                max_channels_per_client: count(&MAX_CHANNELS_PER_CLIENT)?,
                max_joins_per_second: count(&MAX_JOINS_PER_SECOND)? as u32,
                max_topic_bytes: count(&MAX_TOPIC_BYTES)?,
                max_bindings_per_channel: count(&MAX_BINDINGS_PER_CHANNEL)?,
                max_binding_bytes: count(&MAX_BINDING_BYTES)?,
                max_jwt_bytes: count(&MAX_JWT_BYTES)?,
                max_sockets_per_address: {
                    let (value, origin) = required(&MAX_SOCKETS_PER_ADDRESS)?;
                    if value == "0" {
                        0
                    } else {
                        parse_count(&value, 1_000_000)
                            .map_err(|e| format!("{e} (or 0 for no limit)"))
                            .map_err(invalid(&MAX_SOCKETS_PER_ADDRESS, origin))?
                    }
                },
                max_events_per_second: count(&MAX_EVENTS_PER_SECOND)? as u32,
                max_payload_size_in_kb: count(&MAX_PAYLOAD_SIZE_IN_KB)?,
                max_presence_events_per_second: count(&MAX_PRESENCE_EVENTS_PER_SECOND)? as u32,
                max_client_presence_events_per_window: count(
                    &MAX_CLIENT_PRESENCE_EVENTS_PER_WINDOW,
                )? as u32,
                client_presence_window: {
                    let (value, origin) = required(&CLIENT_PRESENCE_WINDOW)?;
                    parse_duration(&value).map_err(invalid(&CLIENT_PRESENCE_WINDOW, origin))?
                },
            },
            gateway_lease: {
                let (value, origin) = required(&GATEWAY_LEASE)?;
                parse_duration(&value)
                    .and_then(|d| {
                        if d < Duration::from_secs(3) {
                            Err("must be at least 3s (it is refreshed every third of it)"
                                .to_owned())
                        } else {
                            Ok(d)
                        }
                    })
                    .map_err(invalid(&GATEWAY_LEASE, origin))?
            },
            gateway_id: lookup(&GATEWAY_ID)
                .map(|(v, origin)| parse_gateway_id(&v).map_err(invalid(&GATEWAY_ID, origin)))
                .transpose()?,
            log_format: parse_log_format(&format).map_err(invalid(&LOG_FORMAT, format_origin))?,
            log: required(&LOG)?.0,
        })
    }
}

/// A JWKS document given inline (it starts with `{`) or as a file path.
fn parse_jwks(v: &str) -> Result<KeySet, String> {
    let trimmed = v.trim_start();
    let keys = if trimmed.starts_with('{') {
        KeySet::parse(trimmed)?
    } else {
        let text = std::fs::read_to_string(v).map_err(|e| {
            format!("cannot read the JWKS file {v:?} ({e}); give a JWKS JSON document or the path of one")
        })?;
        KeySet::parse(&text).map_err(|e| format!("in {v}: {e}"))?
    };
    if keys.is_empty() {
        return Err("the JWKS has no keys".to_owned());
    }
    Ok(keys)
}

fn parse_bool(v: &str) -> Result<bool, String> {
    match v.to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" => Ok(false),
        _ => Err(format!("expected true or false, got {v:?}")),
    }
}

fn parse_duration(v: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(v)
        .map_err(|e| format!("expected a duration like \"500ms\" or \"10s\", got {v:?} ({e})"))?;
    if d.is_zero() {
        return Err("must be greater than zero".to_owned());
    }
    Ok(d)
}

fn parse_roles(v: &str) -> Result<Vec<String>, String> {
    let roles: Vec<String> = v
        .split(',')
        .map(str::trim)
        .filter(|r| !r.is_empty())
        .map(str::to_owned)
        .collect();
    if roles.is_empty() {
        return Err(
            "expected a comma-separated list of role names, e.g. \"anon,authenticated\"".to_owned(),
        );
    }
    Ok(roles)
}

fn parse_bytes(v: &str) -> Result<usize, String> {
    match v.parse::<usize>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(format!("expected a positive number of bytes, got {v:?}")),
    }
}

fn parse_count(v: &str, max: usize) -> Result<usize, String> {
    match v.parse::<usize>() {
        Ok(n) if (1..=max).contains(&n) => Ok(n),
        _ => Err(format!(
            "expected a whole number from 1 to {max}, got {v:?}"
        )),
    }
}

fn parse_socket_addr(v: &str) -> Result<SocketAddr, String> {
    v.parse().map_err(|_| {
        format!(
            "expected an ip address and port like \"127.0.0.1:9187\" or \"[::]:9187\", got {v:?}"
        )
    })
}

fn parse_log_format(v: &str) -> Result<LogFormat, String> {
    match v {
        "text" => Ok(LogFormat::Text),
        "json" => Ok(LogFormat::Json),
        _ => Err(format!("expected text or json, got {v:?}")),
    }
}

/// One server's url, or with `cluster` the seed nodes' urls,
/// comma-separated (TCP only: a cluster tells its nodes by address).
fn parse_redis_url(v: &str, cluster: bool) -> Result<String, String> {
    let tcp = |u: &str| u.starts_with("redis://") || u.starts_with("rediss://");
    if cluster {
        if v.split(',').all(|u| tcp(u.trim())) {
            Ok(v.to_owned())
        } else {
            Err(
                "expected the cluster's nodes as redis:// or rediss:// urls, comma-separated"
                    .to_owned(),
            )
        }
    } else if v.contains(',') {
        Err("several urls are a cluster's nodes: set redis_cluster = true".to_owned())
    } else if tcp(v) || v.starts_with("unix://") {
        Ok(v.to_owned())
    } else {
        Err("expected a redis://, rediss:// or unix:// url".to_owned())
    }
}

fn parse_tenant(v: &str) -> Result<String, String> {
    let ok = !v.is_empty()
        && v.len() <= 64
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if ok {
        Ok(v.to_owned())
    } else {
        Err(format!(
            "{v:?} is not a tenant id: use 1 to 64 of A-Z a-z 0-9 - _ . (it becomes part of Redis channel names)"
        ))
    }
}

fn parse_gateway_id(v: &str) -> Result<String, String> {
    let ok = !v.is_empty()
        && v.len() <= 128
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b));
    if ok {
        Ok(v.to_owned())
    } else {
        Err(format!(
            "{v:?} is not a gateway id: use 1 to 128 of A-Z a-z 0-9 - _ . : (it becomes part of Redis channel names)"
        ))
    }
}

fn parse_slot(v: &str) -> Result<String, String> {
    let ok = !v.is_empty()
        && v.len() <= 63
        && v.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if ok {
        Ok(v.to_owned())
    } else {
        Err(format!(
            "{v:?} is not a replication slot name: Postgres allows 1 to 63 of a-z 0-9 _"
        ))
    }
}

fn parse_publication(v: &str) -> Result<String, String> {
    if v.is_empty() || v.len() > 63 || v.contains('\0') {
        Err(format!("{v:?} is not a publication name (1 to 63 bytes)"))
    } else {
        Ok(v.to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Layer {
        let pairs: Vec<(String, String)> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        Layer::from_env(|name| {
            pairs
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
        })
    }

    #[test]
    fn defaults_apply_when_only_the_database_is_given() {
        let s = Settings::resolve(&[env(&[("WALCAST_DATABASE_URL", "postgres://u@h/d")])]).unwrap();
        assert_eq!(s.redis_url, "redis://127.0.0.1:6379");
        assert_eq!(s.tenant, "default");
        assert_eq!(s.slot, "walcast");
        assert_eq!(s.publication, "supabase_realtime");
        assert!(!s.firehose);
        assert_eq!(s.status_interval, Duration::from_secs(1));
        assert_eq!(s.log_format, LogFormat::Text);
        assert_eq!(s.admin_addr, SocketAddr::from(([127, 0, 0, 1], 9187)));
        assert_eq!(s.retained_wal_warn_bytes, 1 << 30);
        assert_eq!(
            s.rls,
            RlsSettings {
                batch_size: 4096,
                batch_wait: Duration::from_millis(20),
                timeout: Duration::from_secs(5),
                connections: 2,
                sorted_keys: crate::rls::SortedKeys::Auto,
            }
        );
    }

    #[test]
    fn rls_counts_must_be_in_range() {
        for (env_name, value, key, max) in [
            ("WALCAST_RLS_BATCH_SIZE", "0", "rls_batch_size", 1_000_000),
            ("WALCAST_RLS_CONNECTIONS", "65", "rls_connections", 64),
            ("WALCAST_RLS_CONNECTIONS", "two", "rls_connections", 64),
        ] {
            let err = Settings::resolve(&[env(&[
                ("WALCAST_DATABASE_URL", "postgres://h/d"),
                (env_name, value),
            ])])
            .unwrap_err();
            assert_eq!(
                err.to_string(),
                format!(
                    "invalid value for `{key}` (from environment variable {env_name}): expected a whole number from 1 to {max}, got {value:?}"
                )
            );
        }
    }

    #[test]
    fn admin_addr_must_be_an_ip_and_port() {
        let err = Settings::resolve(&[env(&[
            ("WALCAST_DATABASE_URL", "postgres://h/d"),
            ("WALCAST_ADMIN_ADDR", "localhost"),
        ])])
        .unwrap_err();
        assert!(
            err.to_string().starts_with(
                "invalid value for `admin_addr` (from environment variable WALCAST_ADMIN_ADDR): expected an ip address and port"
            ),
            "{err}"
        );
    }

    #[test]
    fn flags_beat_environment_which_beats_the_file() {
        let file = Layer::from_toml_str(
            "database_url = \"postgres://file@h/d\"\nslot = \"from_file\"\ntenant = \"file\"\nfirehose = true\n",
            "walcast.toml",
        )
        .unwrap();
        let env = env(&[("WALCAST_SLOT", "from_env"), ("WALCAST_TENANT", "env")]);
        let flags = Layer::from_flags([(&TENANT, Some("flag".to_owned())), (&SLOT, None)]);
        let s = Settings::resolve(&[file, env, flags]).unwrap();
        assert_eq!(s.database_url.user, "file");
        assert_eq!(s.slot, "from_env");
        assert_eq!(s.tenant, "flag");
        assert!(s.firehose);
    }

    #[test]
    fn a_cluster_is_a_list_of_seed_nodes_only_with_redis_cluster() {
        let url = ("WALCAST_DATABASE_URL", "postgres://u@h/d");
        let nodes = "redis://a:7000, redis://b:7001";
        let s = Settings::resolve(&[env(&[
            url,
            ("WALCAST_REDIS_URL", nodes),
            ("WALCAST_REDIS_CLUSTER", "true"),
        ])])
        .unwrap();
        assert!(s.redis_cluster);
        assert_eq!(s.redis_url, nodes);
        let err = Settings::resolve(&[env(&[url, ("WALCAST_REDIS_URL", nodes)])]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid value for `redis_url` (from environment variable WALCAST_REDIS_URL): several urls are a cluster's nodes: set redis_cluster = true"
        );
        let err = Settings::resolve(&[env(&[
            url,
            ("WALCAST_REDIS_URL", "unix:///tmp/r.sock"),
            ("WALCAST_REDIS_CLUSTER", "true"),
        ])])
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid value for `redis_url` (from environment variable WALCAST_REDIS_URL): expected the cluster's nodes as redis:// or rediss:// urls, comma-separated"
        );
        let gateway = GatewaySettings::resolve(&[env(&[
            ("WALCAST_JWT_SECRET", "hush"),
            ("WALCAST_REDIS_URL", nodes),
            ("WALCAST_REDIS_CLUSTER", "true"),
        ])])
        .unwrap();
        assert!(gateway.redis_cluster);
    }

    #[test]
    fn the_failover_settings_are_off_and_absent_by_default() {
        let url = ("WALCAST_DATABASE_URL", "postgres://u@h/d");
        let s = Settings::resolve(&[env(&[url])]).unwrap();
        assert!(!s.slot_failover);
        assert!(s.standby_database_url.is_none());
        let s = Settings::resolve(&[env(&[
            url,
            ("WALCAST_SLOT_FAILOVER", "true"),
            ("WALCAST_STANDBY_DATABASE_URL", "postgres://u@standby/d"),
        ])])
        .unwrap();
        assert!(s.slot_failover);
        assert_eq!(
            s.standby_database_url.map(|u| u.to_string()),
            Some("postgres://u@standby:5432/d".to_owned())
        );
        let err = Settings::resolve(&[env(&[url, ("WALCAST_STANDBY_DATABASE_URL", "mysql://x")])])
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid value for `standby_database_url` (from environment variable WALCAST_STANDBY_DATABASE_URL): database url must start with postgres:// or postgresql://"
        );
    }

    #[test]
    fn invalid_values_name_the_key_and_the_source() {
        let err = Settings::resolve(&[env(&[
            ("WALCAST_DATABASE_URL", "postgres://u@h/d"),
            ("WALCAST_FIREHOSE", "maybe"),
        ])])
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid value for `firehose` (from environment variable WALCAST_FIREHOSE): expected true or false, got \"maybe\""
        );
        let file = Layer::from_toml_str("status_interval = \"soon\"", "w.toml").unwrap();
        let err = Settings::resolve(&[file, env(&[("WALCAST_DATABASE_URL", "postgres://h/d")])])
            .unwrap_err();
        assert!(
            err.to_string().starts_with(
                "invalid value for `status_interval` (from config file w.toml): expected a duration"
            ),
            "{err}"
        );
    }

    #[test]
    fn a_missing_database_url_says_how_to_set_it() {
        let err = Settings::resolve(&[]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "`database_url` is required: set WALCAST_DATABASE_URL, pass --database-url, or put `database_url = ...` in the config file"
        );
    }

    #[test]
    fn the_gateway_needs_a_jwt_secret_but_no_database() {
        let err = GatewaySettings::resolve(&[]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "`jwt_secret` is required: set WALCAST_JWT_SECRET, pass --jwt-secret, or put `jwt_secret = ...` in the config file"
        );
        let s = GatewaySettings::resolve(&[env(&[("WALCAST_JWT_SECRET", "hush")])]).unwrap();
        assert_eq!(s.gateway_addr, SocketAddr::from(([0, 0, 0, 0], 4000)));
        assert_eq!(
            (s.tenant.as_str(), s.gateway_id.as_deref()),
            ("default", None)
        );
        assert!(!format!("{s:?}").contains("hush"));
        let err = GatewaySettings::resolve(&[env(&[
            ("WALCAST_JWT_SECRET", "hush"),
            ("WALCAST_GATEWAY_ID", "a b"),
        ])])
        .unwrap_err();
        assert!(
            matches!(
                err,
                Error::Invalid {
                    key: "gateway_id",
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn gateway_limits_and_jwt_settings_default_to_supabases() {
        let s = GatewaySettings::resolve(&[env(&[("WALCAST_JWT_SECRET", "hush")])]).unwrap();
        assert_eq!(
            s.limits,
            Limits {
                max_concurrent_users: 200,
                max_channels_per_client: 100,
                max_joins_per_second: 100,
                max_topic_bytes: 1024,
                max_bindings_per_channel: 100,
                max_binding_bytes: 4096,
                max_jwt_bytes: 16_384,
                max_sockets_per_address: 0,
                max_events_per_second: 100,
                max_payload_size_in_kb: 3000,
                max_presence_events_per_second: 1000,
                max_client_presence_events_per_window: 5,
                client_presence_window: Duration::from_secs(30),
            }
        );
        assert_eq!(s.gateway_lease, Duration::from_secs(30));
        assert_eq!(s.limits, Limits::default());
        assert!(s.jwt_claim_validators.is_empty());
        assert!(s.jwt_jwks.is_none());
        assert_eq!(s.jwt_secret.as_deref(), Some("hush"));
    }

    #[test]
    fn invalid_gateway_values_name_the_key_and_the_source() {
        for (name, value, says) in [
            (
                "WALCAST_JWT_CLAIM_VALIDATORS",
                "iss=supabase",
                "invalid value for `jwt_claim_validators` (from environment variable WALCAST_JWT_CLAIM_VALIDATORS): expected a JSON object of claims",
            ),
            (
                "WALCAST_JWT_CLAIM_VALIDATORS",
                r#"{"exp":1}"#,
                "invalid value for `jwt_claim_validators` (from environment variable WALCAST_JWT_CLAIM_VALIDATORS): `exp` cannot be matched exactly",
            ),
            (
                "WALCAST_JWT_JWKS",
                "/nonexistent/jwks.json",
                "invalid value for `jwt_jwks` (from environment variable WALCAST_JWT_JWKS): cannot read the JWKS file \"/nonexistent/jwks.json\"",
            ),
            (
                "WALCAST_JWT_JWKS",
                r#"{"keys":[]}"#,
                "invalid value for `jwt_jwks` (from environment variable WALCAST_JWT_JWKS): the JWKS has no keys",
            ),
            (
                "WALCAST_JWT_JWKS",
                r#"{"keys":[{"kty":"oct","k":"YQ"}]}"#,
                "invalid value for `jwt_jwks` (from environment variable WALCAST_JWT_JWKS): key 0 has no \"kid\"",
            ),
            (
                "WALCAST_MAX_CHANNELS_PER_CLIENT",
                "0",
                "invalid value for `max_channels_per_client` (from environment variable WALCAST_MAX_CHANNELS_PER_CLIENT): expected a whole number from 1 to 1000000, got \"0\"",
            ),
            (
                "WALCAST_MAX_CONCURRENT_USERS",
                "many",
                "invalid value for `max_concurrent_users` (from environment variable WALCAST_MAX_CONCURRENT_USERS): expected a whole number from 1 to 1000000, got \"many\"",
            ),
            (
                "WALCAST_MAX_JOINS_PER_SECOND",
                "-1",
                "invalid value for `max_joins_per_second` (from environment variable WALCAST_MAX_JOINS_PER_SECOND): expected a whole number from 1 to 1000000, got \"-1\"",
            ),
        ] {
            let err =
                GatewaySettings::resolve(&[env(&[("WALCAST_JWT_SECRET", "hush"), (name, value)])])
                    .unwrap_err();
            assert!(err.to_string().starts_with(says), "{name}={value}: {err}");
        }
    }

    #[test]
    fn a_jwks_replaces_the_secret_and_toml_takes_json_strings() {
        let jwks = r#"{"keys":[{"kty":"oct","kid":"h1","k":"YQ"}]}"#;
        let s = GatewaySettings::resolve(&[env(&[("WALCAST_JWT_JWKS", jwks)])]).unwrap();
        assert_eq!(
            (s.jwt_secret.as_deref(), s.jwt_jwks.map(|k| k.len())),
            (None, Some(1))
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jwks.json");
        std::fs::write(&path, jwks).unwrap();
        let file = Layer::from_toml_str(
            &format!(
                "jwt_jwks = {:?}\njwt_claim_validators = '{{\"iss\":\"supabase\"}}'\nmax_joins_per_second = 7\n",
                path.display().to_string()
            ),
            "gw.toml",
        )
        .unwrap();
        let s = GatewaySettings::resolve(&[file]).unwrap();
        assert_eq!(s.jwt_jwks.map(|k| k.len()), Some(1));
        assert_eq!(s.jwt_claim_validators.claims().collect::<Vec<_>>(), ["iss"]);
        assert_eq!(s.limits.max_joins_per_second, 7);
        // An inline TOML table is not JSON: the message says to quote it.
        let file =
            Layer::from_toml_str("jwt_claim_validators = { iss = \"x\" }", "gw.toml").unwrap();
        let err =
            GatewaySettings::resolve(&[file, env(&[("WALCAST_JWT_SECRET", "hush")])]).unwrap_err();
        assert!(
            err.to_string().starts_with("invalid value for `jwt_claim_validators` (from config file gw.toml): expected a JSON object")
                && err.to_string().contains("as a quoted string"),
            "{err}"
        );
    }

    #[test]
    fn the_example_config_file_resolves_for_the_gateway_with_the_defaults() {
        let file = Layer::from_toml_str(include_str!("../../config/walcast.toml"), "walcast.toml")
            .unwrap();
        let s = GatewaySettings::resolve(&[file.clone(), env(&[("WALCAST_JWT_SECRET", "hush")])])
            .unwrap();
        let defaults = GatewaySettings::resolve(&[env(&[("WALCAST_JWT_SECRET", "hush")])]).unwrap();
        assert_eq!(s.limits, defaults.limits);
        assert!(s.jwt_claim_validators.is_empty());
        assert!(Settings::resolve(&[file]).is_ok());
    }

    #[test]
    fn unknown_toml_keys_are_rejected() {
        let err = Layer::from_toml_str("slto = \"x\"", "w.toml").unwrap_err();
        assert!(
            err.to_string()
                .starts_with("config file w.toml has an unknown key `slto`")
        );
    }

    #[test]
    fn slot_and_tenant_names_are_checked() {
        for (key, value) in [("WALCAST_SLOT", "Bad-Slot"), ("WALCAST_TENANT", "a:b")] {
            let err = Settings::resolve(&[env(&[
                ("WALCAST_DATABASE_URL", "postgres://h/d"),
                (key, value),
            ])])
            .unwrap_err();
            assert!(matches!(err, Error::Invalid { .. }), "{err}");
        }
    }
}
