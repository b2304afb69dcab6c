//! Broadcast and Presence with real Supabase clients, unmodified (issue
//! 16): `@supabase/realtime-js` with vsn 2.0.0 (every broadcast a binary
//! frame) and 1.0.0, and realtime-py (1.0.0), on one topic across two
//! gateway processes sharing one Redis. The programs are
//! `tests/clients/js/room.mjs` and `tests/clients/py/room.py`: they print
//! what the app is handed and run the commands written to them.
//!
//! The scenario: broadcasts with and without `self` and `ack`, each
//! client's to the two others (non-ASCII, nested JSON), 50 in a row that
//! arrive in order everywhere, REST broadcasts (`POST /api/broadcast` and
//! the clients' own `httpSend`); then presence: three tracks seen in every
//! client's `presenceState()`, an update, an untrack, a client that
//! vanishes and a gateway killed with SIGKILL, each seen as a leave by the
//! others. Gateway leases are 6 s here so the last step takes seconds;
//! with the default 30 s it is at most 35 s (`tests/rooms.rs` measures the
//! bound).

use std::time::Duration;

use serde_json::{Value, json};

use crate::gateway::{Gateway, valid};
use crate::support::real_client::{self, ClientProcess, clients_dir, python};
use crate::support::{TestRedis, TestRedisCluster};

/// How long anything due may take.
const WAIT: Duration = Duration::from_secs(30);
const ROOM: &str = "game:1";

fn config(echo: bool, ack: bool, key: &str) -> String {
    json!({"broadcast": {"self": echo, "ack": ack}, "presence": {"key": key}}).to_string()
}

fn js(gateway: &Gateway, vsn: &str, config: &str) -> ClientProcess {
    js_as(gateway, vsn, &valid("anon"), ROOM, config)
}

/// realtime-js with vsn `vsn`, its token `token`, on `room`.
pub(crate) fn js_as(
    gateway: &Gateway,
    vsn: &str,
    token: &str,
    room: &str,
    config: &str,
) -> ClientProcess {
    let dir = clients_dir().join("js");
    ClientProcess::spawn(
        &format!("realtime-js vsn {vsn}"),
        std::path::Path::new("node"),
        &[
            dir.join("room.mjs").display().to_string(),
            format!("ws://127.0.0.1:{}/realtime/v1", gateway.port),
            vsn.to_owned(),
            token.to_owned(),
            room.to_owned(),
            config.to_owned(),
        ],
        &dir,
    )
}

fn py(gateway: &Gateway, config: &str) -> ClientProcess {
    py_as(gateway, &valid("anon"), ROOM, config)
}

/// realtime-py with token `token`, on `room`.
pub(crate) fn py_as(gateway: &Gateway, token: &str, room: &str, config: &str) -> ClientProcess {
    let dir = clients_dir().join("py");
    ClientProcess::spawn(
        "realtime-py",
        &python(),
        &[
            dir.join("room.py").display().to_string(),
            format!("ws://127.0.0.1:{}/realtime/v1", gateway.port),
            token.to_owned(),
            room.to_owned(),
            config.to_owned(),
        ],
        &dir,
    )
}

/// Waits until `client` has printed `line` exactly (`count` times).
pub(crate) async fn saw(client: &ClientProcess, line: &Value, count: usize) {
    client
        .wait_for(&format!("{count} × {line}"), WAIT, |lines| {
            lines.iter().filter(|l| *l == line).count() >= count
        })
        .await;
}

/// The broadcast callback's argument: realtime-js hands over
/// `{type, event, payload}`, realtime-py's model has no `type`.
fn broadcast(py: bool, event: &str, payload: Value) -> Value {
    if py {
        json!({"broadcast": {"event": event, "payload": payload}})
    } else {
        json!({"broadcast": {"type": "broadcast", "event": event, "payload": payload}})
    }
}

/// Waits until `client` (realtime-py when `py`) was handed broadcast
/// `event` with `payload`.
async fn got(client: &ClientProcess, py: bool, event: &str, payload: &Value) {
    saw(client, &broadcast(py, event, payload.clone()), 1).await;
}

/// The payloads of the broadcasts of `event` a client was handed, in order.
pub(crate) fn broadcasts(client: &ClientProcess, event: &str) -> Vec<Value> {
    client
        .lines()
        .into_iter()
        .filter(|l| l["broadcast"]["event"] == event)
        .map(|l| l["broadcast"]["payload"].clone())
        .collect()
}

/// The last presence state a client printed at a sync.
fn last_state(client: &ClientProcess) -> Value {
    client
        .lines()
        .iter()
        .rev()
        .find(|l| l["presence"] == "sync")
        .map(|l| l["state"].clone())
        .unwrap_or(Value::Null)
}

async fn state_is(client: &ClientProcess, state: &Value) {
    client
        .wait_for(&format!("presence state {state}"), WAIT, |_| {
            last_state(client) == *state
        })
        .await;
}

/// The bus a scenario runs on.
enum Bus {
    One(TestRedis),
    Cluster(TestRedisCluster),
}

impl Bus {
    fn url(&self) -> String {
        match self {
            Bus::One(redis) => redis.url(),
            Bus::Cluster(cluster) => cluster.urls(),
        }
    }

    /// Waits until `gateways` gateways subscribe `room`'s channel.
    async fn room_subscribed(&self, room: &str, gateways: usize) {
        match self {
            Bus::One(redis) => crate::rooms::room_subscribed(redis, room, gateways).await,
            Bus::Cluster(cluster) => {
                let channel = format!("walcast:{{default}}:room:public:{room}");
                crate::support::eventually(
                    &format!("{gateways} gateways subscribed to {channel}"),
                    Duration::from_secs(20),
                    || async { crate::cluster::shard_subscribers(cluster, &channel) == gateways },
                )
                .await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn realtime_js_and_realtime_py_broadcast_and_share_presence_across_gateways() {
    broadcast_and_presence(Bus::One(TestRedis::start())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn realtime_js_and_realtime_py_broadcast_and_share_presence_across_gateways_on_a_redis_cluster()
 {
    broadcast_and_presence(Bus::Cluster(TestRedisCluster::start())).await;
}

async fn broadcast_and_presence(bus: Bus) {
    real_client::install();
    let lease = ("WALCAST_GATEWAY_LEASE", "6s".to_owned());
    let cluster = (
        "WALCAST_REDIS_CLUSTER",
        matches!(bus, Bus::Cluster(_)).to_string(),
    );
    let mut a = Gateway::spawn_with(
        &bus.url(),
        &[
            lease.clone(),
            cluster.clone(),
            ("WALCAST_GATEWAY_ID", "gw-a".to_owned()),
        ],
    )
    .await;
    let b = Gateway::spawn_with(
        &bus.url(),
        &[lease, cluster, ("WALCAST_GATEWAY_ID", "gw-b".to_owned())],
    )
    .await;
    let mut v2 = js(&a, "2.0.0", &config(true, true, "js2"));
    let mut v1 = js(&b, "1.0.0", &config(false, false, "js1"));
    let mut rpy = py(&a, &config(false, false, "py"));
    let subscribed = json!({"status": "SUBSCRIBED", "error": null});
    for client in [&v2, &v1, &rpy] {
        saw(client, &subscribed, 1).await;
    }
    bus.room_subscribed(ROOM, 2).await;

    // realtime-js 2.0.0: a binary push, acknowledged, echoed to itself.
    let nested = json!({"text": "Grüße, 世界 🦀", "deep": {"list": [1, {"n": null, "b": true}], "s": "\"quoted\""}});
    v2.send_line(&json!({"op": "send", "event": "hello", "payload": nested}).to_string());
    saw(&v2, &json!({"done": "send", "result": "ok"}), 1).await;
    for (client, is_py) in [(&v2, false), (&v1, false), (&rpy, true)] {
        got(client, is_py, "hello", &nested).await;
    }
    // realtime-js 1.0.0 (JSON objects), no self: the two others only.
    v1.send_line(&json!({"op": "send", "event": "from-v1", "payload": {"ok": "ü"}}).to_string());
    got(&v2, false, "from-v1", &json!({"ok": "ü"})).await;
    got(&rpy, true, "from-v1", &json!({"ok": "ü"})).await;
    // realtime-py.
    rpy.send_line(&json!({"op": "send", "event": "from-py", "payload": {"n": [1, 2]}}).to_string());
    got(&v2, false, "from-py", &json!({"n": [1, 2]})).await;
    got(&v1, false, "from-py", &json!({"n": [1, 2]})).await;
    // 50 in a row from each protocol, in order everywhere.
    v2.send_line(&json!({"op": "send_many", "event": "seq2", "count": 50}).to_string());
    v1.send_line(&json!({"op": "send_many", "event": "seq1", "count": 50}).to_string());
    let last = json!({"i": 49});
    for (client, is_py) in [(&v2, false), (&v1, false), (&rpy, true)] {
        got(client, is_py, "seq2", &last).await;
    }
    got(&v2, false, "seq1", &last).await;
    got(&rpy, true, "seq1", &last).await;
    let in_order: Vec<Value> = (0..50).map(|i| json!({"i": i})).collect();
    for client in [&v2, &v1, &rpy] {
        assert_eq!(broadcasts(client, "seq2"), in_order);
    }
    assert_eq!(broadcasts(&v2, "seq1"), in_order);
    assert_eq!(broadcasts(&rpy, "seq1"), in_order);
    assert_eq!(broadcasts(&v1, "seq1"), Vec::<Value>::new(), "no self");
    assert_eq!(
        v2.lines()
            .iter()
            .filter(|l| l["done"] == "send_many")
            .count(),
        1
    );
    let acks = v2
        .lines()
        .into_iter()
        .find(|l| l["done"] == "send_many")
        .expect("send_many done");
    assert_eq!(acks["result"], json!(vec!["ok"; 50]));

    // REST: the batch endpoint, then each client library's httpSend.
    let body = json!({"messages": [{"topic": ROOM, "event": "rest", "payload": {"via": "POST /api/broadcast"}}]});
    let status = post(b.port, "/realtime/v1/api/broadcast", &body.to_string()).await;
    assert_eq!(status, 202);
    let rest = json!({"via": "POST /api/broadcast"});
    for (client, is_py) in [(&v2, false), (&v1, false), (&rpy, true)] {
        got(client, is_py, "rest", &rest).await;
    }
    v1.send_line(
        &json!({"op": "http", "event": "http-js", "payload": {"via": "httpSend"}}).to_string(),
    );
    rpy.send_line(
        &json!({"op": "http", "event": "http-py", "payload": {"via": "http_send"}}).to_string(),
    );
    saw(&rpy, &json!({"done": "http", "result": "ok"}), 1).await;
    for (client, is_py) in [(&v2, false), (&v1, false), (&rpy, true)] {
        got(client, is_py, "http-js", &json!({"via": "httpSend"})).await;
        got(client, is_py, "http-py", &json!({"via": "http_send"})).await;
    }

    // Presence: three tracks, every state holds all three.
    v2.send_line(&json!({"op": "track", "meta": {"name": "Zoë"}}).to_string());
    v1.send_line(&json!({"op": "track", "meta": {"name": "Ana"}}).to_string());
    rpy.send_line(&json!({"op": "track", "meta": {"name": "Py"}}).to_string());
    let everyone =
        json!({"js1": [{"name": "Ana"}], "js2": [{"name": "Zoë"}], "py": [{"name": "Py"}]});
    for client in [&v2, &v1, &rpy] {
        state_is(client, &everyone).await;
    }
    saw(
        &v1,
        &json!({"presence": "join", "key": "js2", "new": [{"name": "Zoë"}]}),
        1,
    )
    .await;
    saw(
        &rpy,
        &json!({"presence": "join", "key": "js1", "new": [{"name": "Ana"}]}),
        1,
    )
    .await;
    // An update: the others see the old meta leave and the new one join.
    v2.send_line(&json!({"op": "track", "meta": {"name": "Zoë", "status": "away"}}).to_string());
    let updated = json!({"js1": [{"name": "Ana"}], "js2": [{"name": "Zoë", "status": "away"}], "py": [{"name": "Py"}]});
    for client in [&v2, &v1, &rpy] {
        state_is(client, &updated).await;
    }
    saw(
        &v1,
        &json!({"presence": "leave", "key": "js2", "left": [{"name": "Zoë"}]}),
        1,
    )
    .await;
    saw(
        &v1,
        &json!({"presence": "join", "key": "js2", "new": [{"name": "Zoë", "status": "away"}]}),
        1,
    )
    .await;
    // An untrack.
    v1.send_line(&json!({"op": "untrack"}).to_string());
    let without_js1 = json!({"js2": [{"name": "Zoë", "status": "away"}], "py": [{"name": "Py"}]});
    for client in [&v2, &v1, &rpy] {
        state_is(client, &without_js1).await;
    }
    saw(
        &rpy,
        &json!({"presence": "leave", "key": "js1", "left": [{"name": "Ana"}]}),
        1,
    )
    .await;
    // realtime-py vanishes (killed, no leave sent): its presence goes.
    rpy.kill();
    let without_py = json!({"js2": [{"name": "Zoë", "status": "away"}]});
    state_is(&v2, &without_py).await;
    state_is(&v1, &without_py).await;
    // Gateway a (realtime-js 2.0.0's) is killed: js1 on gateway b sees
    // its presence leave within the lease and a check.
    a.process.kill();
    let killed = std::time::Instant::now();
    state_is(&v1, &json!({})).await;
    assert!(
        killed.elapsed() <= Duration::from_secs(6 + 5 + 2),
        "{:?}",
        killed.elapsed()
    );
    saw(
        &v1,
        &json!({"presence": "leave", "key": "js2", "left": [{"name": "Zoë", "status": "away"}]}),
        1,
    )
    .await;
    v2.kill();
    let lines = v1.finish(WAIT);
    assert!(
        !lines
            .iter()
            .any(|l| l.get("not_json").is_some() || l["status"] == "CHANNEL_ERROR"),
        "{lines:?}"
    );
}

/// `POST path` with a service token: the status.
async fn post(port: u16, path: &str, body: &str) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\nAuthorization: Bearer {}\r\nContent-Length: {}\r\n\r\n",
        valid("service_role"),
        body.len()
    );
    stream.write_all(head.as_bytes()).await.expect("write");
    stream.write_all(body.as_bytes()).await.expect("write");
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.expect("read");
    String::from_utf8_lossy(&response)
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status")
}
