//! The command line: subcommands and the flags that override settings.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::config::{self, Layer, Settings};

/// walcast: realtime change-data-capture from Postgres to Redis.
#[derive(Debug, Parser)]
#[command(version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Stream the publication's changes from the replication slot to Redis.
    Run(RunArgs),
    /// Check that the database, the slot and Redis are ready for walcast (exit 1 if something blocks replication).
    Check(CheckArgs),
    /// Apply sql/ to a database as an administrator: the publication, walcast's role, optionally auth helpers.
    Setup(SetupArgs),
    /// Serve Supabase Realtime clients over WebSocket (Postgres Changes), through the Redis bus.
    Gateway(GatewayArgs),
}

/// Flags of `walcast gateway`. Each overrides the environment variable and
/// the config file key of the same name.
#[derive(Debug, Args)]
pub struct GatewayArgs {
    /// TOML config file [env: WALCAST_CONFIG].
    #[arg(long, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Redis url, or a cluster's nodes comma-separated [env: WALCAST_REDIS_URL] [default: redis://127.0.0.1:6379]
    #[arg(long, value_name = "URL")]
    pub redis_url: Option<String>,
    /// The bus is a Redis Cluster: true or false [env: WALCAST_REDIS_CLUSTER] [default: false]
    #[arg(long, value_name = "BOOL")]
    pub redis_cluster: Option<String>,
    /// Tenant id used in bus channel names [env: WALCAST_TENANT] [default: default]
    #[arg(long)]
    pub tenant: Option<String>,
    /// Address the WebSocket server listens on [env: WALCAST_GATEWAY_ADDR] [default: 0.0.0.0:4000]
    #[arg(long, value_name = "ADDR")]
    pub gateway_addr: Option<String>,
    /// HMAC secret of client JWTs; prefer the environment, flags show in `ps` [env: WALCAST_JWT_SECRET]
    #[arg(long, value_name = "SECRET")]
    pub jwt_secret: Option<String>,
    /// JWKS of RS*/ES*/EdDSA client JWTs, found by kid: a JSON document or a file path [env: WALCAST_JWT_JWKS]
    #[arg(long, value_name = "JWKS")]
    pub jwt_jwks: Option<String>,
    /// Claims every client JWT must have, exactly: a JSON object, e.g. '{"iss":"supabase"}' [env: WALCAST_JWT_CLAIM_VALIDATORS] [default: {}]
    #[arg(long, value_name = "JSON")]
    pub jwt_claim_validators: Option<String>,
    /// Sockets open at once; more get HTTP 429 [env: WALCAST_MAX_CONCURRENT_USERS] [default: 200]
    #[arg(long, value_name = "N")]
    pub max_concurrent_users: Option<String>,
    /// Channels one socket may join [env: WALCAST_MAX_CHANNELS_PER_CLIENT] [default: 100]
    #[arg(long, value_name = "N")]
    pub max_channels_per_client: Option<String>,
    /// Channel joins per second, all sockets together [env: WALCAST_MAX_JOINS_PER_SECOND] [default: 100]
    #[arg(long, value_name = "N")]
    pub max_joins_per_second: Option<String>,
    /// Bytes of a channel topic [env: WALCAST_MAX_TOPIC_BYTES] [default: 1024]
    #[arg(long, value_name = "N")]
    pub max_topic_bytes: Option<String>,
    /// postgres_changes bindings of one join [env: WALCAST_MAX_BINDINGS_PER_CHANNEL] [default: 100]
    #[arg(long, value_name = "N")]
    pub max_bindings_per_channel: Option<String>,
    /// Bytes of one postgres_changes binding [env: WALCAST_MAX_BINDING_BYTES] [default: 4096]
    #[arg(long, value_name = "N")]
    pub max_binding_bytes: Option<String>,
    /// Bytes of a client JWT [env: WALCAST_MAX_JWT_BYTES] [default: 16384]
    #[arg(long, value_name = "N")]
    pub max_jwt_bytes: Option<String>,
    /// Sockets one client address may hold; 0 for no limit [env: WALCAST_MAX_SOCKETS_PER_ADDRESS] [default: 0]
    #[arg(long, value_name = "N")]
    pub max_sockets_per_address: Option<String>,
    /// Broadcast messages per second in and out, one-minute average [env: WALCAST_MAX_EVENTS_PER_SECOND] [default: 100]
    #[arg(long, value_name = "N")]
    pub max_events_per_second: Option<String>,
    /// Largest broadcast payload or presence meta, in KB [env: WALCAST_MAX_PAYLOAD_SIZE_IN_KB] [default: 3000]
    #[arg(long, value_name = "KB")]
    pub max_payload_size_in_kb: Option<String>,
    /// Presence messages per second, one-minute average [env: WALCAST_MAX_PRESENCE_EVENTS_PER_SECOND] [default: 1000]
    #[arg(long, value_name = "N")]
    pub max_presence_events_per_second: Option<String>,
    /// Presence calls one channel may make per window [env: WALCAST_MAX_CLIENT_PRESENCE_EVENTS_PER_WINDOW] [default: 5]
    #[arg(long, value_name = "N")]
    pub max_client_presence_events_per_window: Option<String>,
    /// That window [env: WALCAST_CLIENT_PRESENCE_WINDOW] [default: 30s]
    #[arg(long, value_name = "DURATION")]
    pub client_presence_window: Option<String>,
    /// Lifetime of the gateway's lease on the bus [env: WALCAST_GATEWAY_LEASE] [default: 30s]
    #[arg(long, value_name = "DURATION")]
    pub gateway_lease: Option<String>,
    /// This gateway's id on the bus [env: WALCAST_GATEWAY_ID] [default: hostname:port:random]
    #[arg(long, value_name = "ID")]
    pub gateway_id: Option<String>,
    /// Log format: text or json [env: WALCAST_LOG_FORMAT] [default: text]
    #[arg(long, value_name = "FORMAT")]
    pub log_format: Option<String>,
    /// Log filter, e.g. info or walcast=debug [env: WALCAST_LOG] [default: info]
    #[arg(long, value_name = "FILTER")]
    pub log: Option<String>,
}

impl GatewayArgs {
    /// Resolves the gateway's settings: config file, then environment
    /// (read through `env`), then these flags.
    pub fn settings(
        &self,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<config::GatewaySettings, config::Error> {
        let mut layers = Vec::with_capacity(3);
        if let Some(path) = self
            .config
            .clone()
            .or_else(|| env("WALCAST_CONFIG").map(PathBuf::from))
        {
            layers.push(Layer::from_toml_file(&path)?);
        }
        layers.push(Layer::from_env(env));
        layers.push(Layer::from_flags([
            (&config::REDIS_URL, self.redis_url.clone()),
            (&config::REDIS_CLUSTER, self.redis_cluster.clone()),
            (&config::TENANT, self.tenant.clone()),
            (&config::GATEWAY_ADDR, self.gateway_addr.clone()),
            (&config::JWT_SECRET, self.jwt_secret.clone()),
            (&config::JWT_JWKS, self.jwt_jwks.clone()),
            (
                &config::JWT_CLAIM_VALIDATORS,
                self.jwt_claim_validators.clone(),
            ),
            (
                &config::MAX_CONCURRENT_USERS,
                self.max_concurrent_users.clone(),
            ),
            (
                &config::MAX_CHANNELS_PER_CLIENT,
                self.max_channels_per_client.clone(),
            ),
            (
                &config::MAX_JOINS_PER_SECOND,
                self.max_joins_per_second.clone(),
            ),
            (&config::MAX_TOPIC_BYTES, self.max_topic_bytes.clone()),
            (
                &config::MAX_BINDINGS_PER_CHANNEL,
                self.max_bindings_per_channel.clone(),
            ),
            (&config::MAX_BINDING_BYTES, self.max_binding_bytes.clone()),
            (&config::MAX_JWT_BYTES, self.max_jwt_bytes.clone()),
            (
                &config::MAX_SOCKETS_PER_ADDRESS,
                self.max_sockets_per_address.clone(),
            ),
            (
                &config::MAX_EVENTS_PER_SECOND,
                self.max_events_per_second.clone(),
            ),
            (
                &config::MAX_PAYLOAD_SIZE_IN_KB,
                self.max_payload_size_in_kb.clone(),
            ),
            (
                &config::MAX_PRESENCE_EVENTS_PER_SECOND,
                self.max_presence_events_per_second.clone(),
            ),
            (
                &config::MAX_CLIENT_PRESENCE_EVENTS_PER_WINDOW,
                self.max_client_presence_events_per_window.clone(),
            ),
            (
                &config::CLIENT_PRESENCE_WINDOW,
                self.client_presence_window.clone(),
            ),
            (&config::GATEWAY_LEASE, self.gateway_lease.clone()),
            (&config::GATEWAY_ID, self.gateway_id.clone()),
            (&config::LOG_FORMAT, self.log_format.clone()),
            (&config::LOG, self.log.clone()),
        ]));
        config::GatewaySettings::resolve(&layers)
    }
}

/// Flags of `walcast check`: those of `walcast run`, resolved the same way,
/// and the output format.
#[derive(Debug, Args)]
pub struct CheckArgs {
    /// The settings, exactly as `walcast run` takes them.
    #[command(flatten)]
    pub run: RunArgs,
    /// Print one JSON document instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Flags of `walcast setup`.
#[derive(Debug, Args)]
pub struct SetupArgs {
    /// Database url of a superuser (or the database owner) on the tenant database
    #[arg(
        long,
        value_name = "URL",
        env = "WALCAST_ADMIN_DATABASE_URL",
        hide_env_values = true
    )]
    pub admin_url: String,
    /// Login role to create for walcast (LOGIN REPLICATION, never a superuser)
    #[arg(long, value_name = "NAME", default_value = crate::setup::DEFAULT_ROLE)]
    pub role: String,
    /// Publication to create (empty) if missing
    #[arg(long, value_name = "NAME", default_value = "supabase_realtime")]
    pub publication: String,
    /// Also create auth.uid(), auth.role() and auth.jwt() where missing (for plain Postgres; existing ones are never replaced)
    #[arg(long)]
    pub auth_helpers: bool,
}

/// Flags of `walcast run`. Each overrides the environment variable and the
/// config file key of the same name.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// TOML config file [env: WALCAST_CONFIG].
    #[arg(long, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Tenant database url, postgres://user:password@host:port/db?sslmode=... [env: WALCAST_DATABASE_URL]
    #[arg(long, value_name = "URL")]
    pub database_url: Option<String>,
    /// Redis url, or a cluster's nodes comma-separated [env: WALCAST_REDIS_URL] [default: redis://127.0.0.1:6379]
    #[arg(long, value_name = "URL")]
    pub redis_url: Option<String>,
    /// The bus is a Redis Cluster: true or false [env: WALCAST_REDIS_CLUSTER] [default: false]
    #[arg(long, value_name = "BOOL")]
    pub redis_cluster: Option<String>,
    /// Tenant id used in bus channel names [env: WALCAST_TENANT] [default: default]
    #[arg(long)]
    pub tenant: Option<String>,
    /// Replication slot name [env: WALCAST_SLOT] [default: walcast]
    #[arg(long)]
    pub slot: Option<String>,
    /// Make the slot a failover slot, synchronized to standby servers (PostgreSQL 17+): true or false [env: WALCAST_SLOT_FAILOVER] [default: false]
    #[arg(long, value_name = "BOOL")]
    pub slot_failover: Option<String>,
    /// A physical standby of the database, where `walcast check` looks for the synchronized slot [env: WALCAST_STANDBY_DATABASE_URL]
    #[arg(long, value_name = "URL")]
    pub standby_database_url: Option<String>,
    /// Publication to stream [env: WALCAST_PUBLICATION] [default: supabase_realtime]
    #[arg(long)]
    pub publication: Option<String>,
    /// Publish every change on the tenant's firehose channel: true or false [env: WALCAST_FIREHOSE] [default: false]
    #[arg(long, value_name = "BOOL")]
    pub firehose: Option<String>,
    /// Interval between standby status updates [env: WALCAST_STATUS_INTERVAL] [default: 1s]
    #[arg(long, value_name = "DURATION")]
    pub status_interval: Option<String>,
    /// Longest pause between reconnection attempts [env: WALCAST_RECONNECT_MAX_DELAY] [default: 10s]
    #[arg(long, value_name = "DURATION")]
    pub reconnect_max_delay: Option<String>,
    /// Roles subscriptions may use, comma-separated [env: WALCAST_ALLOWED_ROLES] [default: anon,authenticated]
    #[arg(long, value_name = "ROLES")]
    pub allowed_roles: Option<String>,
    /// Bytes of record + old_record above which large values are dropped (Error 413) [env: WALCAST_MAX_RECORD_BYTES] [default: 1048576]
    #[arg(long, value_name = "BYTES")]
    pub max_record_bytes: Option<String>,
    /// Address of the admin server: /metrics, /health, /ready [env: WALCAST_ADMIN_ADDR] [default: 127.0.0.1:9187]
    #[arg(long, value_name = "ADDR")]
    pub admin_addr: Option<String>,
    /// Warn when the slot retains more WAL than this many bytes [env: WALCAST_RETAINED_WAL_WARN_BYTES] [default: 1073741824]
    #[arg(long, value_name = "BYTES")]
    pub retained_wal_warn_bytes: Option<String>,
    /// Changes whose RLS checks are batched together at most [env: WALCAST_RLS_BATCH_SIZE] [default: 4096]
    #[arg(long, value_name = "N")]
    pub rls_batch_size: Option<String>,
    /// Longest wait for more changes to check together [env: WALCAST_RLS_BATCH_WAIT] [default: 20ms]
    #[arg(long, value_name = "DURATION")]
    pub rls_batch_wait: Option<String>,
    /// Longest one RLS check statement may run before its subscribers are denied [env: WALCAST_RLS_TIMEOUT] [default: 5s]
    #[arg(long, value_name = "DURATION")]
    pub rls_timeout: Option<String>,
    /// Pooled connections one batch's RLS checks run on at once [env: WALCAST_RLS_CONNECTIONS] [default: 2]
    #[arg(long, value_name = "N")]
    pub rls_connections: Option<String>,
    /// Let many unfiltered RLS groups search the batch's sorted keys: auto, on or off [env: WALCAST_RLS_SORTED_KEYS] [default: auto]
    #[arg(long, value_name = "MODE")]
    pub rls_sorted_keys: Option<String>,
    /// Publication of realtime.messages (Broadcast from Database), streamed too when it exists [env: WALCAST_MESSAGES_PUBLICATION] [default: supabase_realtime_messages_publication]
    #[arg(long, value_name = "NAME")]
    pub messages_publication: Option<String>,
    /// How long realtime.messages keeps a day's partition [env: WALCAST_MESSAGES_RETENTION] [default: 72h]
    #[arg(long, value_name = "DURATION")]
    pub messages_retention: Option<String>,
    /// Log format: text or json [env: WALCAST_LOG_FORMAT] [default: text]
    #[arg(long, value_name = "FORMAT")]
    pub log_format: Option<String>,
    /// Log filter, e.g. info or walcast=debug [env: WALCAST_LOG] [default: info]
    #[arg(long, value_name = "FILTER")]
    pub log: Option<String>,
}

impl RunArgs {
    /// Resolves settings: config file, then environment (read through
    /// `env`), then these flags.
    pub fn settings(
        &self,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Settings, config::Error> {
        let mut layers = Vec::with_capacity(3);
        if let Some(path) = self
            .config
            .clone()
            .or_else(|| env("WALCAST_CONFIG").map(PathBuf::from))
        {
            layers.push(Layer::from_toml_file(&path)?);
        }
        layers.push(Layer::from_env(env));
        layers.push(Layer::from_flags([
            (&config::DATABASE_URL, self.database_url.clone()),
            (&config::REDIS_URL, self.redis_url.clone()),
            (&config::REDIS_CLUSTER, self.redis_cluster.clone()),
            (&config::TENANT, self.tenant.clone()),
            (&config::SLOT, self.slot.clone()),
            (&config::SLOT_FAILOVER, self.slot_failover.clone()),
            (
                &config::STANDBY_DATABASE_URL,
                self.standby_database_url.clone(),
            ),
            (&config::PUBLICATION, self.publication.clone()),
            (&config::FIREHOSE, self.firehose.clone()),
            (&config::STATUS_INTERVAL, self.status_interval.clone()),
            (
                &config::RECONNECT_MAX_DELAY,
                self.reconnect_max_delay.clone(),
            ),
            (&config::ALLOWED_ROLES, self.allowed_roles.clone()),
            (&config::MAX_RECORD_BYTES, self.max_record_bytes.clone()),
            (&config::ADMIN_ADDR, self.admin_addr.clone()),
            (
                &config::RETAINED_WAL_WARN_BYTES,
                self.retained_wal_warn_bytes.clone(),
            ),
            (&config::RLS_BATCH_SIZE, self.rls_batch_size.clone()),
            (&config::RLS_BATCH_WAIT, self.rls_batch_wait.clone()),
            (&config::RLS_TIMEOUT, self.rls_timeout.clone()),
            (&config::RLS_CONNECTIONS, self.rls_connections.clone()),
            (&config::RLS_SORTED_KEYS, self.rls_sorted_keys.clone()),
            (
                &config::MESSAGES_PUBLICATION,
                self.messages_publication.clone(),
            ),
            (&config::MESSAGES_RETENTION, self.messages_retention.clone()),
            (&config::LOG_FORMAT, self.log_format.clone()),
            (&config::LOG, self.log.clone()),
        ]));
        Settings::resolve(&layers)
    }
}
