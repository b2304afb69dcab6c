//! `walcast gateway`: Phoenix Channels over WebSocket, as Supabase
//! Realtime's clients speak them: Postgres Changes, Broadcast and
//! Presence on one channel. It talks to Redis only (never to Postgres) and
//! keeps no state a restart would lose, so a deployment scales by running
//! more of them.
//!
//! ```text
//! client ──ws──▶ socket (one select! per session) ──register──▶ bus ──HSET, PUBLISH control──▶ Redis ──▶ daemon
//!    ▲                 │ frame (v1 objects, v2 arrays)              │
//!    └──phx_reply, system, postgres_changes ◀── channel ◀── Delivery ◀── SUBSCRIBE gateway channel
//! ```
//!
//! | module | job |
//! |---|---|
//! | [`frame`] | Phoenix frames ↔ text, no I/O |
//! | [`auth`] | JWT verification with Supabase's error codes |
//! | [`channel`] | a joined channel: its token, its config, its `postgres_changes` bindings, ids, echo, readiness |
//! | [`broadcast`] | Broadcast: client messages to the room, binary frames, their rendering, `POST /api/broadcast` |
//! | [`presence`] | Presence: `config.presence`, track/untrack, a room's presences, `phx_ref`s |
//! | [`private`] | private channels: joins waiting for the daemon's read check, writes waiting for its write check, Supabase's texts |
//! | [`socket`] | one session: socket, deliveries, heartbeat, shutdown |
//! | [`bus`] | the gateway's side of `docs/bus.md`: lease, registry, routing, each event once per subscription across daemon takeovers; [`bus::rooms`]: room channels and presences |
//! | [`render`] | a change's frames, each rendered once for every socket that shows it the same way |
//! | [`limits`] | sockets, channels per socket and joins per second, as Supabase limits them; what one join may carry |
//! | [`quiet`] | client text clipped in logs, client-triggered warnings rate-limited |
//! | [`metrics`] | what `GET /metrics` renders |
//!
//! Besides the WebSocket paths the router serves `POST /api/broadcast`
//! ([`broadcast::rest`]), `GET /health` (200 while the bus is connected to
//! Redis, else 503) and `GET /metrics`.

pub mod auth;
pub mod broadcast;
pub mod bus;
pub mod channel;
pub mod frame;
pub mod limits;
pub mod metrics;
pub mod presence;
pub mod private;
pub mod quiet;
pub mod render;
pub mod socket;

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{ConnectInfo, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use self::auth::{AuthError, Verifier};
use self::frame::Vsn;
use self::limits::{JoinRate, Limits, PerAddress, RateCounter, Sockets};
use self::metrics::GatewayMetrics;
use crate::bus::Names;
use crate::bus::server::Server;
use crate::config::GatewaySettings;

/// Supabase accepts frames up to this many bytes.
const MAX_FRAME_BYTES: usize = 5_000_000;
/// Bytes each socket reads at a time; larger client frames still arrive
/// whole (the buffer grows), up to [`MAX_FRAME_BYTES`]. tungstenite
/// zero-fills this much at every poll of the socket, and a session polls
/// it once per delivery: 8 KiB was 7% of a gateway's time fanning out
/// paced broadcasts; 2 KiB took 4.8% off its CPU per message (5,000
/// sockets, 20 sends/s; docs/benchmarks.md).
const READ_BUFFER_BYTES: usize = 2 * 1024;
/// How long open sockets get to close on shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// Content type of the Prometheus text exposition format.
const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Why the gateway could not run.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The listening address is taken or not ours.
    #[error(
        "cannot listen on {addr}: {source}; set gateway_addr (WALCAST_GATEWAY_ADDR) to a free address"
    )]
    Bind {
        /// The address.
        addr: std::net::SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The HTTP server failed.
    #[error("gateway server failed: {0}")]
    Serve(#[source] std::io::Error),
    /// `redis_url` cannot be used.
    #[error("redis_url cannot be used: {0}")]
    Redis(#[source] redis::RedisError),
}

/// What every session shares.
pub struct Context {
    /// This gateway's id on the bus.
    pub gateway: String,
    /// Verifies client tokens.
    pub verifier: Verifier,
    /// The bus handle.
    pub bus: bus::Bus,
    /// The limits' values.
    pub limits: Limits,
    /// What `/metrics` renders.
    pub metrics: GatewayMetrics,
    /// Joins per second, all sockets together.
    pub joins: JoinRate,
    /// Broadcasts in and out against `max_events_per_second`.
    pub events: RateCounter,
    /// Presence tracks, states and diffs against
    /// `max_presence_events_per_second`.
    pub presence_events: RateCounter,
    /// Open sockets against `max_concurrent_users`.
    open: Arc<Sockets>,
    /// Open sockets per client address against `max_sockets_per_address`.
    per_address: Arc<PerAddress>,
    /// Warnings clients can trigger, rate-limited.
    warnings: quiet::Throttle,
    /// The last socket id handed out.
    sockets: AtomicU64,
    tracker: TaskTracker,
    cancel: CancellationToken,
}

impl Context {
    /// A context for the sockets of gateway `gateway`, verified by
    /// `verifier`, on `bus`, within `limits`.
    pub fn new(
        gateway: String,
        verifier: Verifier,
        bus: bus::Bus,
        limits: Limits,
        metrics: GatewayMetrics,
        cancel: CancellationToken,
    ) -> Context {
        let open = Arc::new(Sockets::new(
            limits.max_concurrent_users,
            metrics.sockets.clone(),
        ));
        Context {
            gateway,
            verifier,
            bus,
            limits,
            metrics,
            joins: JoinRate::new(limits.max_joins_per_second),
            events: RateCounter::new(limits.max_events_per_second),
            presence_events: RateCounter::new(limits.max_presence_events_per_second),
            open,
            per_address: Arc::new(PerAddress::new(limits.max_sockets_per_address)),
            warnings: quiet::Throttle::default(),
            sockets: AtomicU64::new(0),
            tracker: TaskTracker::new(),
            cancel,
        }
    }
}

impl Context {
    /// Whether a warning of `kind` that a client caused may be logged now;
    /// one that may not is counted in
    /// [`WARNINGS_SUPPRESSED`](metrics::WARNINGS_SUPPRESSED).
    pub fn may_warn(&self, kind: &'static str) -> bool {
        let allowed = self.warnings.allow(kind);
        if !allowed {
            self.metrics.warning_suppressed(kind);
        }
        allowed
    }
}

/// Serves until `cancel` fires; then closes every socket (1001) and leaves
/// the bus.
pub async fn run(settings: &GatewaySettings, cancel: CancellationToken) -> Result<(), Error> {
    let listener = tokio::net::TcpListener::bind(settings.gateway_addr)
        .await
        .map_err(|source| Error::Bind {
            addr: settings.gateway_addr,
            source,
        })?;
    let gateway = settings
        .gateway_id
        .clone()
        .unwrap_or_else(|| default_id(settings.gateway_addr.port()));
    let server = Server::open(&settings.redis_url, settings.redis_cluster).map_err(Error::Redis)?;
    let metrics = GatewayMetrics::new();
    let (bus, bus_task) = bus::new(
        server.clone(),
        Names::on(&server, &settings.tenant),
        gateway.clone(),
        metrics.bus_reconnects.clone(),
        metrics.subscriptions_restored.clone(),
        metrics.duplicates_dropped.clone(),
    );
    let bus_task = bus_task.with_lease(settings.gateway_lease);
    let bus_cancel = CancellationToken::new();
    let bus_handle = tokio::spawn(bus_task.run(bus_cancel.clone()));
    let verifier = Verifier::with_keys(
        settings.jwt_secret.as_deref().map(str::as_bytes),
        settings.jwt_jwks.clone().unwrap_or_default(),
        settings.jwt_claim_validators.clone(),
    )
    .max_bytes(settings.limits.max_jwt_bytes);
    let ctx = Arc::new(Context::new(
        gateway.clone(),
        verifier,
        bus,
        settings.limits,
        metrics,
        cancel.clone(),
    ));
    info!(
        addr = %settings.gateway_addr,
        %gateway,
        tenant = %settings.tenant,
        max_concurrent_users = settings.limits.max_concurrent_users,
        max_channels_per_client = settings.limits.max_channels_per_client,
        max_joins_per_second = settings.limits.max_joins_per_second,
        max_topic_bytes = settings.limits.max_topic_bytes,
        max_bindings_per_channel = settings.limits.max_bindings_per_channel,
        max_binding_bytes = settings.limits.max_binding_bytes,
        max_jwt_bytes = settings.limits.max_jwt_bytes,
        max_sockets_per_address = settings.limits.max_sockets_per_address,
        max_events_per_second = settings.limits.max_events_per_second,
        max_payload_size_in_kb = settings.limits.max_payload_size_in_kb,
        max_presence_events_per_second = settings.limits.max_presence_events_per_second,
        gateway_lease = ?settings.gateway_lease,
        jwks_keys = settings.jwt_jwks.as_ref().map_or(0, auth::KeySet::len),
        claim_validators = ?settings.jwt_claim_validators.claims().collect::<Vec<_>>(),
        "gateway listening"
    );
    // Frames are small and latency matters: without TCP_NODELAY, Nagle's
    // algorithm held frames for up to 40 ms (p99 46 ms against 4.7 ms at
    // 1k commits/s to one socket).
    let listener = axum::serve::ListenerExt::tap_io(listener, |stream| {
        if let Err(e) = stream.set_nodelay(true) {
            debug!(error = %e, "could not set TCP_NODELAY on a connection");
        }
    });
    let served = axum::serve(
        listener,
        router(ctx.clone()).into_make_service_with_connect_info::<std::net::SocketAddr>(),
    )
    .with_graceful_shutdown(cancel.clone().cancelled_owned())
    .await
    .map_err(Error::Serve);
    ctx.tracker.close();
    if tokio::time::timeout(SHUTDOWN_GRACE, ctx.tracker.wait())
        .await
        .is_err()
    {
        warn!("sockets still open after the shutdown grace period");
    }
    bus_cancel.cancel();
    let _ = bus_handle.await;
    info!("gateway stopped");
    served
}

/// The WebSocket routes, `POST /api/broadcast`, `/health` and `/metrics`.
pub fn router(ctx: Arc<Context>) -> Router {
    let rest = post(broadcast::rest::post)
        .options(broadcast::rest::preflight)
        .layer(DefaultBodyLimit::max(broadcast::rest::MAX_BODY_BYTES));
    let single = post(broadcast::rest::post_single)
        .options(broadcast::rest::preflight)
        .layer(DefaultBodyLimit::max(broadcast::rest::MAX_BODY_BYTES));
    Router::new()
        .route("/socket/websocket", get(upgrade))
        .route("/realtime/v1/websocket", get(upgrade))
        .route("/api/broadcast", rest.clone())
        .route("/realtime/v1/api/broadcast", rest)
        .route("/api/broadcast/{topic}/events/{event}", single.clone())
        .route("/realtime/v1/api/broadcast/{topic}/events/{event}", single)
        .route("/health", get(health))
        .route("/metrics", get(render_metrics))
        .with_state(ctx)
}

/// 200 while the bus is registered on Redis (deliveries can flow), else
/// 503: a load balancer then sends new clients to another gateway.
async fn health(State(ctx): State<Arc<Context>>) -> Response {
    let (status, body) = if ctx.bus.connected() {
        (StatusCode::OK, r#"{"status":"ok","redis":"up"}"#)
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            r#"{"status":"unavailable","redis":"down"}"#,
        )
    };
    (
        status,
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        body,
    )
        .into_response()
}

async fn render_metrics(State(ctx): State<Arc<Context>>) -> Response {
    (
        [(axum::http::header::CONTENT_TYPE, PROMETHEUS_TEXT)],
        ctx.metrics.render(),
    )
        .into_response()
}

/// `hostname:port:random`, or a random id when the hostname is unknown.
/// The random part makes it unique per process: two gateways started with
/// the same host and port (a restart, containers sharing a hostname) never
/// take each other's registry or answers.
fn default_id(port: u16) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| {
            !h.is_empty()
                && h.len() <= 64
                && h.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        });
    // RandomState's keys come from the OS's randomness.
    let random = RandomState::new().hash_one((port, std::process::id()));
    match host {
        Some(host) => format!("{host}:{port}:{:08x}", random as u32),
        None => format!("{random:016x}"),
    }
}

fn refuse(status: StatusCode, message: &str) -> Response {
    let body = serde_json::json!({ "error": message }).to_string();
    (
        status,
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        body,
    )
        .into_response()
}

async fn upgrade(
    State(ctx): State<Arc<Context>>,
    ConnectInfo(peer): ConnectInfo<std::net::SocketAddr>,
    Query(params): Query<HashMap<String, String>>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    let Some(vsn) = Vsn::parse(params.get("vsn").map(String::as_str)) else {
        return refuse(
            StatusCode::BAD_REQUEST,
            "Unsupported serializer version: use vsn=1.0.0 or vsn=2.0.0",
        );
    };
    let token = headers
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .or_else(|| params.get("apikey").map(String::as_str))
        .unwrap_or_default()
        .to_owned();
    if let Err(e) = ctx.verifier.verify(&token) {
        ctx.metrics.connection_refused(e.code());
        if matches!(e, AuthError::Claim { .. }) {
            // The client is told only Supabase's generic error.
            if ctx.may_warn("claim_refused") {
                info!(error = %e, "connection refused");
            }
        } else {
            debug!(error = %e, "connection refused");
        }
        let (status, message) = e.http_refusal();
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::FORBIDDEN);
        return refuse(status, &message);
    }
    // walcast's per-address share first (off by default), then Supabase's
    // `TenantRateLimiters.check_tenant`, after authentication: the
    // concurrent sockets, then the join rate.
    let Some(address_slot) = ctx.per_address.admit(peer.ip()) else {
        ctx.metrics.connection_refused("AddressRateLimitReached");
        if ctx.may_warn("connection_refused") {
            warn!(
                max_sockets_per_address = ctx.limits.max_sockets_per_address,
                address = %peer.ip(),
                "connection refused: too many sockets from one address"
            );
        }
        return refuse(
            StatusCode::TOO_MANY_REQUESTS,
            "Too many connections from this address",
        );
    };
    let Some(slot) = ctx.open.admit() else {
        ctx.metrics.connection_refused("ConnectionRateLimitReached");
        if ctx.may_warn("connection_refused") {
            warn!(
                max_concurrent_users = ctx.limits.max_concurrent_users,
                "connection refused: too many connected users"
            );
        }
        return refuse(StatusCode::TOO_MANY_REQUESTS, "Too many connected users");
    };
    if ctx.joins.exhausted(Instant::now()) {
        ctx.metrics.connection_refused("JoinsRateLimitReached");
        if ctx.may_warn("connection_refused") {
            warn!(
                max_joins_per_second = ctx.limits.max_joins_per_second,
                "connection refused: too many joins per second"
            );
        }
        return refuse(StatusCode::TOO_MANY_REQUESTS, "Too many joins per second");
    }
    let id = ctx.sockets.fetch_add(1, Ordering::Relaxed) + 1;
    // tungstenite zero-fills its whole read buffer before each read (128
    // KiB by default): a memset per frame sent, a fifth of the gateway's
    // time, and 138 KB of memory per idle socket. Client frames are small.
    ws.read_buffer_size(READ_BUFFER_BYTES)
        .max_message_size(MAX_FRAME_BYTES)
        .max_frame_size(MAX_FRAME_BYTES)
        .on_upgrade(move |socket| {
            let cancel = ctx.cancel.clone();
            let tracker = ctx.tracker.clone();
            tracker.track_future(async move {
                socket::serve(socket, ctx, id, vsn, token, cancel).await;
                // The places are free once the session has ended.
                drop((slot, address_slot));
            })
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_ids_are_unique_per_process_and_valid_bus_names() {
        let (a, b) = (default_id(4000), default_id(4000));
        assert_ne!(a, b, "two gateways on one host and port share no id");
        for id in [&a, &b] {
            assert!(
                id.len() <= 128
                    && id
                        .bytes()
                        .all(|c| c.is_ascii_alphanumeric() || b"-_.:".contains(&c)),
                "{id}"
            );
            // hostname:4000:xxxxxxxx, or 16 hex digits without a hostname.
            match id.rsplit_once(':') {
                Some((head, random)) => {
                    assert!(head.ends_with(":4000"), "{id}");
                    assert_eq!(random.len(), 8, "{id}");
                }
                None => assert_eq!(id.len(), 16, "{id}"),
            }
        }
    }
}
