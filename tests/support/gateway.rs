//! A stand-in gateway speaking the bus contract (docs/bus.md) directly:
//! it holds a lease, registers subscriptions and records what the daemon
//! sends it. The real gateway does the same on behalf of WebSocket clients.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use redis::AsyncCommands;
use serde_json::{Value, json};
use tokio::task::JoinHandle;

use super::eventually;

/// Lease lifetime the stand-in sets; tests of expiry delete the key.
const LEASE_SECS: u64 = 60;

/// A gateway on the bus.
pub struct BusGateway {
    /// Its id.
    pub id: String,
    tenant: String,
    conn: redis::aio::MultiplexedConnection,
    received: Arc<Mutex<Vec<Value>>>,
    task: JoinHandle<()>,
}

impl BusGateway {
    /// Registers gateway `id` of `tenant` (lease, gateway set) and listens on
    /// its channel.
    pub async fn start(redis_url: &str, tenant: &str, id: &str) -> BusGateway {
        let client = redis::Client::open(redis_url).expect("redis url");
        let mut pubsub = client.get_async_pubsub().await.expect("pubsub");
        pubsub
            .subscribe(format!("walcast:{tenant}:gateway:{id}"))
            .await
            .expect("subscribe");
        let received = Arc::new(Mutex::new(Vec::new()));
        let sink = received.clone();
        let task = tokio::spawn(async move {
            let mut stream = pubsub.into_on_message();
            while let Some(msg) = stream.next().await {
                let text: String = msg.get_payload().expect("utf-8");
                let value: Value = serde_json::from_str(&text)
                    .unwrap_or_else(|e| panic!("invalid json from the daemon {text}: {e}"));
                sink.lock().expect("lock").push(value);
            }
        });
        let mut conn = client
            .get_multiplexed_async_connection()
            .await
            .expect("redis connection");
        let _: () = conn
            .set_ex(
                format!("walcast:{tenant}:gateway:{id}:lease"),
                "1",
                LEASE_SECS,
            )
            .await
            .expect("lease");
        let _: () = conn
            .sadd(format!("walcast:{tenant}:gateways"), id)
            .await
            .expect("sadd");
        BusGateway {
            id: id.to_owned(),
            tenant: tenant.to_owned(),
            conn,
            received,
            task,
        }
    }

    /// Stores `subscription` (which has an `id`) in the registry hash and
    /// announces it on the control channel.
    pub async fn subscribe(&mut self, subscription: Value) {
        let id = subscription["id"]
            .as_str()
            .expect("subscription id")
            .to_owned();
        let _: () = self
            .conn
            .hset(
                format!("walcast:{}:gateway:{}:subscriptions", self.tenant, self.id),
                &id,
                subscription.to_string(),
            )
            .await
            .expect("hset");
        self.control(
            json!({"v": 1, "gateway": self.id, "op": "subscribe", "subscription": subscription}),
        )
        .await;
    }

    /// Removes a subscription: from the registry hash, then announced.
    pub async fn unsubscribe(&mut self, id: &str) {
        self.forget(id).await;
        self.control(json!({"v": 1, "gateway": self.id, "op": "unsubscribe", "id": id}))
            .await;
    }

    /// Deletes a subscription from the registry hash without announcing
    /// it, as if its `unsubscribe` had been lost.
    pub async fn forget(&mut self, id: &str) {
        let _: () = self
            .conn
            .hdel(
                format!("walcast:{}:gateway:{}:subscriptions", self.tenant, self.id),
                id,
            )
            .await
            .expect("hdel");
    }

    /// Publishes raw text on the control channel.
    pub async fn control_raw(&mut self, text: &str) {
        let _: i64 = self
            .conn
            .publish(format!("walcast:{}:control", self.tenant), text)
            .await
            .expect("publish");
    }

    async fn control(&mut self, message: Value) {
        self.control_raw(&message.to_string()).await;
    }

    /// Deletes the lease key, as if the gateway had died.
    pub async fn drop_lease(&mut self) {
        let _: () = self
            .conn
            .del(format!("walcast:{}:gateway:{}:lease", self.tenant, self.id))
            .await
            .expect("del");
    }

    /// Everything received so far.
    pub fn received(&self) -> Vec<Value> {
        self.received.lock().expect("lock").clone()
    }

    /// The `change` events received so far.
    pub fn events(&self) -> Vec<Value> {
        self.received()
            .into_iter()
            .filter(|m| m["type"] == "change")
            .collect()
    }

    /// Waits for the daemon's answer about subscription `id` (the latest one
    /// after `after` earlier answers) and returns it.
    pub async fn reply(&self, id: &str, nth: usize) -> Value {
        let answers = || -> Vec<Value> {
            self.received()
                .into_iter()
                .filter(|m| (m["type"] == "subscribed" || m["type"] == "rejected") && m["id"] == id)
                .collect()
        };
        eventually(
            &format!("answer {nth} about subscription {id}"),
            Duration::from_secs(30),
            || async { answers().len() > nth },
        )
        .await;
        answers()[nth].clone()
    }

    /// Waits for at least `n` change events and returns them.
    pub async fn wait_events(&self, n: usize) -> Vec<Value> {
        eventually(
            &format!("{n} change events"),
            Duration::from_secs(30),
            || async { self.events().len() >= n },
        )
        .await;
        self.events()
    }
}

impl Drop for BusGateway {
    fn drop(&mut self) {
        self.task.abort();
    }
}
