//! A whole pipeline for a test: its own Postgres and Redis, a database with
//! the publication, a firehose subscriber, and the daemon's environment.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::Value;
use tokio::task::JoinHandle;
use tokio_postgres::Client;
use walcast::lsn::Lsn;

use super::gateway::BusGateway;
use super::{Daemon, PgOptions, TestPostgres, TestRedis, eventually};

/// The database every stack test uses (each test has its own cluster).
pub const DB: &str = "walcast_test";

/// Postgres + Redis + a database with an empty `supabase_realtime` publication.
pub struct Stack {
    /// The cluster.
    pub pg: TestPostgres,
    /// The bus.
    pub redis: TestRedis,
    /// A superuser client on [`DB`].
    pub client: Client,
}

impl Stack {
    /// Starts both servers; commit timestamps are tracked so tests can
    /// check `commit_timestamp` exactly.
    pub async fn start() -> Stack {
        Stack::start_with(PgOptions::default()).await
    }

    /// As [`start`](Self::start), with cluster options.
    pub async fn start_with(mut options: PgOptions) -> Stack {
        options
            .extra_conf
            .push("track_commit_timestamp = on".into());
        let pg = TestPostgres::start_with(options);
        let redis = TestRedis::start();
        let client = pg.setup_test_db(DB).await;
        Stack { pg, redis, client }
    }

    /// The daemon's environment: firehose on, fast status updates and retries.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("WALCAST_DATABASE_URL", self.pg.url("postgres", DB)),
            ("WALCAST_REDIS_URL", self.redis.url()),
            ("WALCAST_FIREHOSE", "true".into()),
            ("WALCAST_STATUS_INTERVAL", "100ms".into()),
            ("WALCAST_RECONNECT_MAX_DELAY", "1s".into()),
            ("WALCAST_LOG", "walcast=debug".into()),
            // Each daemon its own admin port, so parallel tests do not
            // compete for the default one.
            (
                "WALCAST_ADMIN_ADDR",
                format!("127.0.0.1:{}", super::free_port()),
            ),
        ]
    }

    /// `walcast run` with [`env`](Self::env).
    pub fn spawn_daemon(&self) -> Daemon {
        Daemon::spawn(&["run"], &self.env())
    }

    /// [`env`](Self::env) without the firehose: events go to gateways only.
    pub fn gateway_env(&self) -> Vec<(&'static str, String)> {
        let mut env = self.env();
        env.retain(|(k, _)| *k != "WALCAST_FIREHOSE");
        env
    }

    /// `walcast run` with [`gateway_env`](Self::gateway_env), once its
    /// slot streams.
    pub async fn spawn_gateway_daemon(&self) -> Daemon {
        let daemon = Daemon::spawn(&["run"], &self.gateway_env());
        self.wait_streaming("walcast", &daemon).await;
        daemon
    }

    /// A stack with `setup` and `sql/rls.sql` applied, a streaming daemon
    /// without the firehose, and a stand-in gateway `g1` on its bus.
    pub async fn with_bus_gateway(setup: &str) -> (Stack, Daemon, BusGateway) {
        let stack = Stack::start().await;
        stack.client.batch_execute(setup).await.expect("setup");
        stack
            .client
            .batch_execute(walcast::rls::INSTALL_SQL)
            .await
            .expect("install sql/rls.sql");
        let daemon = stack.spawn_gateway_daemon().await;
        let gateway = BusGateway::start(&stack.redis.url(), "default", "g1").await;
        (stack, daemon, gateway)
    }

    /// Waits until a walsender streams from `slot`. (A slot being created
    /// is active too, with no confirmed position until its snapshot is
    /// consistent: under load, that could pass for streaming.)
    pub async fn wait_streaming(&self, slot: &str, daemon: &Daemon) {
        let sql = format!(
            "SELECT active AND confirmed_flush_lsn IS NOT NULL FROM pg_replication_slots WHERE slot_name = '{slot}'"
        );
        eventually(&format!("slot {slot} active\n--- daemon log ---\n{}", daemon.log()), Duration::from_secs(30), || async {
            matches!(self.client.query_opt(&sql, &[]).await, Ok(Some(row)) if row.get::<_, bool>(0))
        })
        .await;
    }

    /// The slot's `confirmed_flush_lsn`.
    pub async fn confirmed_flush(&self, slot: &str) -> Option<Lsn> {
        let sql = format!(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = '{slot}'"
        );
        let row = self.client.query_opt(&sql, &[]).await.ok()??;
        row.get::<_, Option<String>>(0)?.parse().ok()
    }

    /// `pg_current_wal_lsn()`.
    pub async fn current_wal(&self) -> Lsn {
        let row = self
            .client
            .query_one("SELECT pg_current_wal_lsn()::text", &[])
            .await
            .expect("pg_current_wal_lsn");
        row.get::<_, String>(0).parse().expect("lsn")
    }
}

/// Everything published on a firehose channel, in arrival order. The
/// subscriber reconnects by itself when Redis goes away.
pub struct Firehose {
    messages: Arc<Mutex<Vec<String>>>,
    subscriptions: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl Firehose {
    /// Subscribes to `walcast:{tenant}:firehose` on `redis_url` and returns
    /// once the subscription is confirmed.
    pub async fn subscribe(redis_url: &str, tenant: &str) -> Firehose {
        let client = redis::Client::open(redis_url).expect("redis url");
        let channel = format!("walcast:{tenant}:firehose");
        let messages = Arc::new(Mutex::new(Vec::new()));
        let subscriptions = Arc::new(AtomicUsize::new(0));
        let (sink, count) = (messages.clone(), subscriptions.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok(mut pubsub) = client.get_async_pubsub().await else {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                if pubsub.subscribe(&channel).await.is_err() {
                    continue;
                }
                count.fetch_add(1, Ordering::SeqCst);
                let mut stream = pubsub.into_on_message();
                while let Some(msg) = stream.next().await {
                    let payload: String = msg.get_payload().expect("utf-8 payload");
                    sink.lock().expect("lock").push(payload);
                }
            }
        });
        let firehose = Firehose {
            messages,
            subscriptions,
            task,
        };
        firehose.wait_subscribed(1).await;
        firehose
    }

    /// Waits until the subscriber has subscribed `n` times in all (once
    /// at start, once more after each Redis restart).
    pub async fn wait_subscribed(&self, n: usize) {
        eventually("firehose subscription", Duration::from_secs(30), || async {
            self.subscriptions.load(Ordering::SeqCst) >= n
        })
        .await;
    }

    /// How many messages arrived so far.
    pub fn len(&self) -> usize {
        self.messages.lock().expect("lock").len()
    }

    /// The messages so far, parsed.
    pub fn parsed(&self) -> Vec<Value> {
        self.messages
            .lock()
            .expect("lock")
            .iter()
            .map(|m| serde_json::from_str(m).unwrap_or_else(|e| panic!("invalid json {m}: {e}")))
            .collect()
    }

    /// The raw messages so far.
    pub fn raw(&self) -> Vec<String> {
        self.messages.lock().expect("lock").clone()
    }

    /// Waits for at least `n` messages and returns them, parsed.
    pub async fn wait_for(&self, n: usize, timeout: Duration, daemon: &Daemon) -> Vec<Value> {
        eventually(
            &format!(
                "{n} firehose messages (have {})\n--- daemon log ---\n{}",
                self.len(),
                super::tail(&daemon.log(), 60)
            ),
            timeout,
            || async { self.len() >= n },
        )
        .await;
        self.parsed()
    }
}

impl Drop for Firehose {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// `(lsn, seq)` of a bus message.
pub fn position(message: &Value) -> (Lsn, u64) {
    let lsn = message["lsn"]
        .as_str()
        .expect("lsn is a string")
        .parse()
        .expect("lsn parses");
    (lsn, message["seq"].as_u64().expect("seq is a number"))
}

/// Checks the at-least-once, in-order contract over everything received:
/// the first occurrences of `(lsn, seq)` strictly increase, and every
/// duplicate is byte-identical to its first occurrence. Returns the
/// distinct messages in order.
pub fn check_order_and_duplicates(raw: &[String]) -> Vec<Value> {
    let mut first: HashMap<(Lsn, u64), &str> = HashMap::new();
    let mut distinct = Vec::new();
    let mut last: Option<(Lsn, u64)> = None;
    for text in raw {
        let value: Value = serde_json::from_str(text).expect("json");
        let pos = position(&value);
        match first.get(&pos) {
            Some(seen) => assert_eq!(
                *seen,
                text.as_str(),
                "a duplicate of {pos:?} differs from the first copy"
            ),
            None => {
                if let Some(last) = last {
                    assert!(
                        pos > last,
                        "new message {pos:?} after {last:?}: not in commit order"
                    );
                }
                last = Some(pos);
                first.insert(pos, text);
                distinct.push(value);
            }
        }
    }
    distinct
}

/// The `id`s in `record`s of INSERT messages for `table`.
pub fn inserted_ids(messages: &[Value], table: &str) -> HashSet<i64> {
    messages
        .iter()
        .filter(|m| m["data"]["table"] == table && m["data"]["type"] == "INSERT")
        .map(|m| m["data"]["record"]["id"].as_i64().expect("id"))
        .collect()
}
