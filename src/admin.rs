//! The admin HTTP server: Prometheus metrics, liveness and readiness.
//!
//! ```text
//! GET /metrics ─▶ PrometheusHandle::render()          (text exposition format)
//! GET /health  ─▶ 200 while the process runs
//! GET /ready   ─▶ 200 while replication streams and Redis answers, else 503
//!                   ▲ streaming: set by the session loop (START_REPLICATION ok / session ended)
//!                   ▲ redis: a PING every second, and cleared when publishing fails
//! ```
//!
//! [`Admin::start`] spawns the server and its probes (Redis PING, the
//! slot's retained WAL, metrics upkeep). They are telemetry: they never
//! stop the daemon, and they are aborted when the [`Admin`] is dropped, so
//! they cannot keep the process alive after shutdown. A port that is taken
//! is logged and retried rather than fatal: a standby daemon on the same
//! host then serves once the port is free.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::bus::server::{Connection, Server};
use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use deadpool_postgres::Pool;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;
use tracing::{debug, info, warn};

use crate::config::Settings;
use crate::metrics;

/// How often Redis is pinged for readiness.
const REDIS_PING_INTERVAL: Duration = Duration::from_secs(1);
/// How long a readiness PING (or its connection) may take.
const REDIS_PING_TIMEOUT: Duration = Duration::from_secs(1);
/// How long to wait before trying a taken admin address again.
const BIND_RETRY: Duration = Duration::from_secs(5);
/// Content type of the Prometheus text exposition format.
const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Why the admin surface could not start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The metrics recorder could not be installed.
    #[error(transparent)]
    Metrics(#[from] metrics::Error),
}

/// Whether the daemon can do its job right now; cheap to clone and share.
#[derive(Debug, Clone)]
pub struct Readiness(Arc<Flags>);

#[derive(Debug)]
struct Flags {
    streaming: AtomicBool,
    redis: AtomicBool,
    stopping: CancellationToken,
}

impl Readiness {
    /// Not ready yet; not ready for good once `stopping` is cancelled.
    pub fn new(stopping: CancellationToken) -> Self {
        Readiness(Arc::new(Flags {
            streaming: AtomicBool::new(false),
            redis: AtomicBool::new(false),
            stopping,
        }))
    }

    /// The replication stream started (`true`) or the session ended.
    pub fn set_streaming(&self, streaming: bool) {
        self.0.streaming.store(streaming, Ordering::Relaxed);
    }

    /// Redis answered (`true`) or failed.
    pub fn set_redis(&self, answers: bool) {
        self.0.redis.store(answers, Ordering::Relaxed);
    }

    /// What is not ready, in words; empty when ready.
    pub fn problems(&self) -> Vec<&'static str> {
        let mut problems = Vec::new();
        if self.0.stopping.is_cancelled() {
            problems.push("shutting down");
        }
        if !self.0.streaming.load(Ordering::Relaxed) {
            problems.push("replication is not streaming");
        }
        if !self.0.redis.load(Ordering::Relaxed) {
            problems.push("redis does not answer");
        }
        problems
    }
}

/// The running admin server and probes; dropping it aborts them.
#[derive(Debug)]
pub struct Admin {
    readiness: Readiness,
    _tasks: Vec<AbortOnDropHandle<()>>,
}

impl Admin {
    /// Installs the metrics recorder and spawns the server on
    /// `settings.admin_addr`, the Redis readiness probe, the slot's
    /// retained-WAL reader and metrics upkeep. `cancel` marks shutdown
    /// (`/ready` turns 503); the tasks end when the `Admin` is dropped.
    pub fn start(
        settings: &Settings,
        server: &Server,
        pool: &Pool,
        cancel: &CancellationToken,
    ) -> Result<Admin, Error> {
        let handle = metrics::install()?;
        let readiness = Readiness::new(cancel.clone());
        let app = router(handle.clone(), readiness.clone());
        let tasks = vec![
            AbortOnDropHandle::new(tokio::spawn(serve(settings.admin_addr, app))),
            AbortOnDropHandle::new(tokio::spawn(watch_redis(server.clone(), readiness.clone()))),
            AbortOnDropHandle::new(tokio::spawn(metrics::watch_retained_wal(
                pool.clone(),
                settings.slot.clone(),
                settings.retained_wal_warn_bytes,
            ))),
            AbortOnDropHandle::new(tokio::spawn(metrics::upkeep(handle))),
        ];
        Ok(Admin {
            readiness,
            _tasks: tasks,
        })
    }

    /// The readiness state the daemon updates.
    pub fn readiness(&self) -> &Readiness {
        &self.readiness
    }
}

#[derive(Clone)]
struct AppState {
    metrics: PrometheusHandle,
    readiness: Readiness,
}

/// The routes, on their state.
fn router(metrics: PrometheusHandle, readiness: Readiness) -> Router {
    Router::new()
        .route("/metrics", get(render_metrics))
        .route("/health", get(health))
        .route("/ready", get(ready))
        .with_state(AppState { metrics, readiness })
}

async fn render_metrics(State(state): State<AppState>) -> impl IntoResponse {
    state.metrics.run_upkeep();
    (
        [(header::CONTENT_TYPE, PROMETHEUS_TEXT)],
        state.metrics.render(),
    )
}

async fn health() -> &'static str {
    "ok\n"
}

async fn ready(State(state): State<AppState>) -> (StatusCode, String) {
    let problems = state.readiness.problems();
    if problems.is_empty() {
        (StatusCode::OK, "ready\n".to_owned())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {}\n", problems.join("; ")),
        )
    }
}

/// Serves `app` on `addr` until aborted; a taken address is retried.
async fn serve(addr: SocketAddr, app: Router) {
    let mut warned = false;
    let listener = loop {
        match TcpListener::bind(addr).await {
            Ok(listener) => break listener,
            Err(e) if !warned => {
                warn!(%addr, error = %e, retry_in = ?BIND_RETRY, "admin server cannot listen; metrics and health are not served until it can");
                warned = true;
            }
            Err(e) => debug!(%addr, error = %e, "admin server still cannot listen"),
        }
        tokio::time::sleep(BIND_RETRY).await;
    };
    info!(%addr, "admin server listening");
    if let Err(e) = axum::serve(listener, app).await {
        warn!(%addr, error = %e, "admin server stopped");
    }
}

/// PINGs Redis every second on its own connection and records whether it
/// answered. Runs until aborted.
async fn watch_redis(server: Server, readiness: Readiness) {
    let mut conn: Option<Connection> = None;
    let mut tick = tokio::time::interval(REDIS_PING_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if conn.is_none() {
            conn = match tokio::time::timeout(REDIS_PING_TIMEOUT, server.connect()).await {
                Ok(Ok(c)) => Some(c),
                Ok(Err(e)) => {
                    debug!(error = %e, "redis readiness probe cannot connect");
                    None
                }
                Err(_) => None,
            };
        }
        let answers = match conn.as_mut() {
            Some(c) => matches!(
                tokio::time::timeout(REDIS_PING_TIMEOUT, redis::cmd("PING").query_async::<()>(c))
                    .await,
                Ok(Ok(()))
            ),
            None => false,
        };
        if !answers {
            conn = None;
        }
        readiness.set_redis(answers);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_when_streaming_and_redis_answers() {
        let cancel = CancellationToken::new();
        let r = Readiness::new(cancel.clone());
        assert_eq!(
            r.problems(),
            ["replication is not streaming", "redis does not answer"]
        );
        r.set_streaming(true);
        assert_eq!(r.problems(), ["redis does not answer"]);
        r.set_redis(true);
        assert!(r.problems().is_empty());
        cancel.cancel();
        assert_eq!(r.problems(), ["shutting down"]);
    }
}
