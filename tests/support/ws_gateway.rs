//! `walcast gateway` as a child process on a free port.

use std::time::Duration;

use tokio::net::TcpStream;

use super::{Daemon, eventually, free_port};

/// A running gateway.
pub struct WsGateway {
    /// The process (its log: `process.log()`).
    pub process: Daemon,
    /// Where it listens, on 127.0.0.1.
    pub port: u16,
}

impl WsGateway {
    /// Starts a gateway with id `id` on the bus at `redis_url`, verifying
    /// tokens with `secret`; returns once it is registered and listening.
    pub async fn spawn(redis_url: &str, secret: &str, id: &str) -> WsGateway {
        WsGateway::spawn_on(redis_url, false, secret, id).await
    }

    /// As [`spawn`](Self::spawn), on a Redis Cluster when `cluster`
    /// (`redis_url` its nodes).
    pub async fn spawn_on(redis_url: &str, cluster: bool, secret: &str, id: &str) -> WsGateway {
        let port = free_port();
        let env = [
            ("WALCAST_REDIS_URL", redis_url.to_owned()),
            ("WALCAST_REDIS_CLUSTER", cluster.to_string()),
            ("WALCAST_JWT_SECRET", secret.to_owned()),
            ("WALCAST_GATEWAY_ADDR", format!("127.0.0.1:{port}")),
            ("WALCAST_GATEWAY_ID", id.to_owned()),
            ("WALCAST_LOG", "walcast=debug".to_owned()),
        ];
        let process = Daemon::spawn(&["gateway"], &env);
        eventually(
            &format!("gateway on the bus and listening\n{}", process.log()),
            Duration::from_secs(30),
            || async {
                process.log().contains("gateway registered on the bus")
                    && TcpStream::connect(("127.0.0.1", port)).await.is_ok()
            },
        )
        .await;
        WsGateway { process, port }
    }

    /// The base URL Supabase clients are given: `ws://127.0.0.1:PORT/realtime/v1`
    /// (they append `/websocket` and the query).
    pub fn realtime_url(&self) -> String {
        format!("ws://127.0.0.1:{}/realtime/v1", self.port)
    }
}
