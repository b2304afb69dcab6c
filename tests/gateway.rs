//! `walcast gateway` against real clients' frames: Postgres, Redis, the
//! daemon and the gateway all started by the test, WebSocket frames
//! compared exactly (see `../shared/reference/phoenix-protocol.md`).

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use jsonwebtoken::{EncodingKey, Header, encode};
use redis::AsyncCommands;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use walcast::gateway::bus::INTERRUPTED_MESSAGE;

use crate::support::stack::Stack;
use crate::support::{Daemon, TestRedis, eventually, free_port};

pub(crate) const SECRET: &str = "walcast-gateway-test-secret-0123456789";
const GATEWAY_ID: &str = "gw-test";
/// How long a frame that is due may take.
pub(crate) const FRAME_TIMEOUT: Duration = Duration::from_secs(20);

pub(crate) const SETUP: &str = "
    CREATE ROLE anon NOLOGIN;
    CREATE ROLE authenticated NOLOGIN;
    CREATE TABLE todos (id int PRIMARY KEY, task text, owner text);
    GRANT SELECT ON todos TO anon, authenticated;
    ALTER PUBLICATION supabase_realtime ADD TABLE todos;
";

pub(crate) fn now() -> i64 {
    walcast::gateway::auth::unix_now()
}

/// A token signed with the gateway's secret.
pub(crate) fn token(role: &str, exp: i64) -> String {
    let claims = json!({"role": role, "exp": exp, "sub": "u1", "aud": "authenticated"});
    encode(
        &Header::default(),
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .expect("sign")
}

/// A token with exactly `claims`, signed with the gateway's secret.
pub(crate) fn token_with(claims: &Value) -> String {
    encode(
        &Header::default(),
        claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .expect("sign")
}

pub(crate) fn valid(role: &str) -> String {
    token(role, now() + 3600)
}

/// A gateway process on a free port, and its Redis url.
pub(crate) struct Gateway {
    pub(crate) process: Daemon,
    pub(crate) port: u16,
    redis_url: String,
}

impl Gateway {
    pub(crate) async fn spawn(redis_url: &str) -> Gateway {
        Gateway::spawn_with(redis_url, &[]).await
    }

    /// A gateway with `extra` settings on top of the usual ones (a later
    /// entry for the same variable wins).
    pub(crate) async fn spawn_with(redis_url: &str, extra: &[(&str, String)]) -> Gateway {
        let port = free_port();
        let mut env = vec![
            ("WALCAST_REDIS_URL", redis_url.to_owned()),
            ("WALCAST_JWT_SECRET", SECRET.to_owned()),
            ("WALCAST_GATEWAY_ADDR", format!("127.0.0.1:{port}")),
            ("WALCAST_GATEWAY_ID", GATEWAY_ID.to_owned()),
            ("WALCAST_LOG", "walcast=debug".to_owned()),
        ];
        env.extend(extra.iter().cloned());
        let process = Daemon::spawn(&["gateway"], &env);
        let gateway = Gateway {
            process,
            port,
            redis_url: redis_url.to_owned(),
        };
        eventually(
            &format!(
                "gateway on the bus and listening\n{}",
                gateway.process.log()
            ),
            Duration::from_secs(30),
            || async {
                gateway
                    .process
                    .log()
                    .contains("gateway registered on the bus")
                    && TcpStream::connect(("127.0.0.1", port)).await.is_ok()
            },
        )
        .await;
        gateway
    }

    pub(crate) fn url(&self, path: &str, query: &str) -> String {
        format!("ws://127.0.0.1:{}{path}?{query}", self.port)
    }

    pub(crate) async fn connect(&self, vsn: Option<&str>) -> Client {
        self.connect_with(&valid("anon"), vsn).await
    }

    /// Connects with `apikey` as the socket's token.
    pub(crate) async fn connect_with(&self, apikey: &str, vsn: Option<&str>) -> Client {
        let mut query = format!("apikey={apikey}");
        if let Some(vsn) = vsn {
            query.push_str(&format!("&vsn={vsn}"));
        }
        let (ws, _) = tokio_tungstenite::connect_async(self.url("/realtime/v1/websocket", &query))
            .await
            .unwrap_or_else(|e| panic!("connect: {e}\n{}", self.process.log()));
        Client { ws }
    }

    /// `GET path` on the gateway's port: status, content type and body.
    pub(crate) async fn get(&self, path: &str) -> (u16, String, String) {
        let request = async {
            let mut stream = TcpStream::connect(("127.0.0.1", self.port))
                .await
                .expect("connect");
            let head = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
            stream.write_all(head.as_bytes()).await.expect("write");
            let mut response = Vec::new();
            stream.read_to_end(&mut response).await.expect("read");
            String::from_utf8(response).expect("utf-8 response")
        };
        let text = tokio::time::timeout(FRAME_TIMEOUT, request)
            .await
            .expect("an answer in time");
        let (head, body) = text.split_once("\r\n\r\n").expect("a head and a body");
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .expect("a status");
        let content_type = head
            .lines()
            .find_map(|l| l.strip_prefix("content-type: "))
            .unwrap_or_default()
            .to_owned();
        (status, content_type, body.to_owned())
    }

    /// Connects with `apikey` expecting an HTTP refusal: its status and
    /// body, exactly.
    pub(crate) async fn refused(&self, apikey: &str) -> (u16, String) {
        let url = self.url(
            "/realtime/v1/websocket",
            &format!("apikey={apikey}&vsn=2.0.0"),
        );
        match tokio_tungstenite::connect_async(url).await {
            Err(tungstenite::Error::Http(response)) => {
                let body = response.body().clone().unwrap_or_default();
                (
                    response.status().as_u16(),
                    String::from_utf8(body).expect("utf-8 body"),
                )
            }
            other => panic!(
                "expected an HTTP refusal, got {:?}\n{}",
                other.map(|_| ()),
                self.process.log()
            ),
        }
    }

    /// The subscriptions in the gateway's registry hash, each with its
    /// channel's role and claims (a channel join is stored once, as
    /// `channel:<id>`).
    pub(crate) async fn registry(&self) -> Vec<(String, Value)> {
        self.registry_fields()
            .await
            .into_iter()
            .flat_map(|(field, channel)| {
                assert!(field.starts_with("channel:"), "{field}");
                let (role, claims) = (channel["role"].clone(), channel["claims"].clone());
                channel["subscriptions"]
                    .as_array()
                    .expect("subscriptions")
                    .iter()
                    .map(|b| {
                        let mut s = b.clone();
                        s["role"] = role.clone();
                        s["claims"] = claims.clone();
                        (b["id"].as_str().expect("id").to_owned(), s)
                    })
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// The gateway's registry hash as stored: field → JSON.
    pub(crate) async fn registry_fields(&self) -> Vec<(String, Value)> {
        let client = redis::Client::open(self.redis_url.as_str()).expect("redis url");
        let mut conn = client
            .get_multiplexed_async_connection()
            .await
            .expect("redis");
        let stored: Vec<(String, String)> = conn
            .hgetall(format!(
                "walcast:default:gateway:{GATEWAY_ID}:subscriptions"
            ))
            .await
            .expect("hgetall");
        stored
            .into_iter()
            .map(|(id, json)| (id, serde_json::from_str(&json).expect("json")))
            .collect()
    }
}

pub(crate) struct Client {
    pub(crate) ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

impl Client {
    pub(crate) async fn send(&mut self, text: &str) {
        self.ws
            .send(Message::Text(text.to_owned().into()))
            .await
            .expect("send");
    }

    /// The next text frame, as sent.
    pub(crate) async fn recv_text(&mut self) -> String {
        loop {
            let next = tokio::time::timeout(FRAME_TIMEOUT, self.ws.next())
                .await
                .expect("a frame in time");
            match next {
                Some(Ok(Message::Text(text))) => return text.as_str().to_owned(),
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                other => panic!("expected a text frame, got {other:?}"),
            }
        }
    }

    pub(crate) async fn recv(&mut self) -> Value {
        let text = self.recv_text().await;
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("invalid json {text}: {e}"))
    }

    /// Sends a heartbeat and expects its reply next: everything sent
    /// before it has been handled and answered.
    pub(crate) async fn sync(&mut self, vsn2: bool, reference: &str) {
        if vsn2 {
            self.send(&format!(
                r#"[null,"{reference}","phoenix","heartbeat",{{}}]"#
            ))
            .await;
            assert_eq!(
                self.recv_text().await,
                format!(
                    r#"[null,"{reference}","phoenix","phx_reply",{{"status":"ok","response":{{}}}}]"#
                )
            );
        } else {
            self.send(&format!(
                r#"{{"topic":"phoenix","event":"heartbeat","payload":{{}},"ref":"{reference}"}}"#
            ))
            .await;
            assert_eq!(
                self.recv_text().await,
                format!(
                    r#"{{"event":"phx_reply","payload":{{"status":"ok","response":{{}}}},"ref":"{reference}","topic":"phoenix"}}"#
                )
            );
        }
    }
}

/// Postgres with `todos` in the publication, Redis, and the gateway; the
/// daemon is started by the test (some tests start it late on purpose).
pub(crate) async fn start() -> (Stack, Gateway) {
    let stack = Stack::start().await;
    stack.client.batch_execute(SETUP).await.expect("setup");
    stack
        .client
        .batch_execute(walcast::rls::INSTALL_SQL)
        .await
        .expect("install sql/rls.sql");
    let gateway = Gateway::spawn(&stack.redis.url()).await;
    (stack, gateway)
}

async fn spawn_daemon(stack: &Stack) -> Daemon {
    stack.spawn_gateway_daemon().await
}

const BINDINGS: &str = r#"[{"event":"INSERT","schema":"public","table":"todos","filter":"owner=eq.u\u0031"},{"event":"DELETE","schema":"public","table":"todos"}]"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn system_ok_comes_only_after_the_daemon_confirmed_then_changes_flow_v2() {
    let (stack, gateway) = start().await;
    let mut client = gateway.connect(Some("2.0.0")).await;
    client
        .send(&format!(
            r#"["6","6","realtime:room1","phx_join",{{"config":{{"broadcast":{{"self":false,"ack":false}},"presence":{{"key":"","enabled":false}},"postgres_changes":{BINDINGS},"private":false}},"access_token":"{}"}}]"#,
            valid("authenticated")
        ))
        .await;
    // The reply comes at once, bindings echoed byte for byte with integer ids.
    let reply_text = client.recv_text().await;
    assert!(
        reply_text.starts_with(r#"["6","6","realtime:room1","phx_reply",{"status":"ok","response":{"postgres_changes":[{"event":"INSERT","schema":"public","table":"todos","filter":"owner=eq.u\u0031","id":"#),
        "{reply_text}"
    );
    let reply: Value = serde_json::from_str(&reply_text).expect("json");
    let entries = reply[4]["response"]["postgres_changes"]
        .as_array()
        .expect("entries")
        .clone();
    let requested: Vec<Value> = serde_json::from_str(BINDINGS).expect("bindings");
    assert_eq!(entries.len(), 2);
    let mut ids = Vec::new();
    for (entry, binding) in entries.iter().zip(&requested) {
        let id = entry["id"].as_u64().expect("integer id");
        assert!(id > 0 && id < 1 << 27, "{id}");
        let mut without_id = entry.clone();
        without_id.as_object_mut().expect("object").remove("id");
        assert_eq!(&without_id, binding, "no extra keys, no filter: null");
        ids.push(id);
    }
    // The registry holds both; without a daemon, nothing confirms them.
    eventually(
        "both subscriptions in the registry",
        Duration::from_secs(10),
        || async { gateway.registry().await.len() == 2 },
    )
    .await;
    let registry = gateway.registry().await;
    assert!(registry.iter().all(|(_, s)| s["role"] == "authenticated"
        && s["claims"]["sub"] == "u1"
        && s.get("topic").is_none()));
    client.sync(true, "h1").await;
    // The daemon starts, reads the registry back and confirms: now `system`.
    let daemon = spawn_daemon(&stack).await;
    assert_eq!(
        client.recv_text().await,
        r#"["6",null,"realtime:room1","system",{"channel":"room1","extension":"postgres_changes","message":"Subscribed to PostgreSQL","status":"ok"}]"#,
        "{}",
        daemon.log()
    );
    stack
        .client
        .batch_execute(
            "INSERT INTO todos VALUES (1, 'other', 'u2'); INSERT INTO todos VALUES (2, 'mine', 'u1'); DELETE FROM todos WHERE id = 1;",
        )
        .await
        .expect("writes");
    let insert = client.recv().await;
    assert_eq!(
        &insert.as_array().expect("array")[..4],
        &[
            Value::Null,
            Value::Null,
            json!("realtime:room1"),
            json!("postgres_changes")
        ]
    );
    assert_eq!(insert[4]["ids"], json!([ids[0]]));
    let data = insert[4]["data"].as_object().expect("data");
    let mut keys: Vec<&str> = data.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        [
            "columns",
            "commit_timestamp",
            "errors",
            "record",
            "schema",
            "table",
            "type"
        ]
    );
    assert_eq!(
        data["record"],
        json!({"id": 2, "task": "mine", "owner": "u1"})
    );
    assert_eq!(
        (&data["type"], &data["errors"]),
        (&json!("INSERT"), &Value::Null)
    );
    assert_eq!(
        data["columns"],
        json!([{"name": "id", "type": "int4"}, {"name": "task", "type": "text"}, {"name": "owner", "type": "text"}])
    );
    let delete = client.recv().await;
    assert_eq!(delete[4]["ids"], json!([ids[1]]));
    assert_eq!(delete[4]["data"]["old_record"], json!({"id": 1}));
    assert_eq!(delete[4]["data"]["type"], "DELETE");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_bus_is_told_to_live_channels_and_they_are_subscribed_again_when_it_is_back() {
    let (mut stack, gateway) = start().await;
    let daemon = spawn_daemon(&stack).await;
    let mut client = gateway.connect(Some("2.0.0")).await;
    let mut waiting = gateway.connect(Some("2.0.0")).await;
    client
        .send(&format!(
            r#"["1","1","realtime:room1","phx_join",{{"config":{{"postgres_changes":[{{"event":"*","schema":"public","table":"todos"}}]}},"access_token":"{}"}}]"#,
            valid("authenticated")
        ))
        .await;
    assert_eq!(client.recv().await[4]["status"], "ok");
    let subscribed = r#"["1",null,"realtime:room1","system",{"channel":"room1","extension":"postgres_changes","message":"Subscribed to PostgreSQL","status":"ok"}]"#;
    assert_eq!(client.recv_text().await, subscribed, "{}", daemon.log());
    // A channel whose subscription is refused is not live: it is told nothing.
    waiting
        .send(r#"["2","2","realtime:room2","phx_join",{"config":{"postgres_changes":[{"event":"*","schema":"public","table":"nosuchtable"}]}}]"#)
        .await;
    assert_eq!(waiting.recv().await[4]["status"], "ok");
    assert_eq!(waiting.recv().await[4]["status"], "error");
    // Redis goes away: what the daemon publishes meanwhile cannot reach
    // the gateway, and the live channel is told so at once.
    stack.redis.stop();
    assert_eq!(
        client.recv_text().await,
        format!(
            r#"["1",null,"realtime:room1","system",{{"channel":"room1","extension":"postgres_changes","message":"{INTERRUPTED_MESSAGE}","status":"error"}}]"#
        )
    );
    // Redis is back (empty): the gateway registers the subscription again,
    // the daemon confirms it, and changes flow again.
    stack.redis.start_again();
    assert_eq!(client.recv_text().await, subscribed, "{}", daemon.log());
    // The rejection is forgotten with the loss (it may have been the
    // database being away) and comes again from the daemon's new answer.
    assert_eq!(waiting.recv().await[4]["status"], "error");
    stack
        .client
        .batch_execute("INSERT INTO todos VALUES (2, 'after', 'u1')")
        .await
        .expect("insert");
    let change = client.recv().await;
    assert_eq!(change[3], "postgres_changes");
    assert_eq!(
        change[4]["data"]["record"],
        json!({"id": 2, "task": "after", "owner": "u1"})
    );
    client.sync(true, "h").await;
    waiting.sync(true, "h").await;

    // Redis closes the gateway's subscriber (as it does past its pubsub
    // output-buffer limit) but keeps its data: the same report, and what
    // the registry holds that the gateway no longer has is withdrawn.
    let redis_client = redis::Client::open(stack.redis.url()).expect("redis url");
    let mut conn = redis_client
        .get_multiplexed_async_connection()
        .await
        .expect("redis");
    let hash = format!("walcast:default:gateway:{GATEWAY_ID}:subscriptions");
    let _: i64 = conn
        .hset(&hash, "stale:1:0", r#"{"id":"stale:1:0"}"#)
        .await
        .expect("hset");
    let _: i64 = redis::cmd("CLIENT")
        .arg(&["KILL", "TYPE", "pubsub"])
        .query_async(&mut conn)
        .await
        .expect("client kill");
    assert_eq!(
        client.recv_text().await,
        format!(
            r#"["1",null,"realtime:room1","system",{{"channel":"room1","extension":"postgres_changes","message":"{INTERRUPTED_MESSAGE}","status":"error"}}]"#
        )
    );
    assert_eq!(client.recv_text().await, subscribed, "{}", daemon.log());
    eventually(
        "the stale entry withdrawn",
        Duration::from_secs(10),
        || async {
            let mut ids: Vec<String> = gateway
                .registry()
                .await
                .into_iter()
                .map(|(id, _)| id)
                .collect();
            ids.sort();
            ids.len() == 2 && ids.iter().all(|id| !id.starts_with("stale"))
        },
    )
    .await;
    stack
        .client
        .batch_execute("INSERT INTO todos VALUES (3, 'again', 'u1')")
        .await
        .expect("insert");
    assert_eq!(client.recv().await[4]["data"]["record"]["id"], 3);
    assert_eq!(waiting.recv().await[4]["status"], "error");
    client.sync(true, "h2").await;
    waiting.sync(true, "h2").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_v1_socket_is_not_told_of_a_lost_bus_only_subscribed_again() {
    let (mut stack, gateway) = start().await;
    let daemon = spawn_daemon(&stack).await;
    let mut client = gateway.connect(None).await;
    client
        .send(r#"{"topic":"realtime:probe","event":"phx_join","payload":{"config":{"postgres_changes":[{"event":"*","schema":"public","table":"todos"}]}},"ref":"1"}"#)
        .await;
    assert_eq!(client.recv().await["payload"]["status"], "ok");
    let subscribed = r#"{"event":"system","payload":{"channel":"probe","extension":"postgres_changes","message":"Subscribed to PostgreSQL","status":"ok"},"ref":null,"topic":"realtime:probe"}"#;
    assert_eq!(client.recv_text().await, subscribed, "{}", daemon.log());
    stack.redis.stop();
    stack.redis.start_again();
    // No error first: the next frame is the renewed confirmation.
    assert_eq!(client.recv_text().await, subscribed, "{}", daemon.log());
    stack
        .client
        .batch_execute("INSERT INTO todos VALUES (5, 'v1', 'u1')")
        .await
        .expect("insert");
    let change = client.recv().await;
    assert_eq!(change["event"], "postgres_changes");
    assert_eq!(
        change["payload"]["data"]["record"],
        json!({"id": 5, "task": "v1", "owner": "u1"})
    );
    client.sync(false, "h").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v1_heartbeat_join_leave_and_close_as_the_rust_sdk_sends_them() {
    let (stack, gateway) = start().await;
    let _daemon = spawn_daemon(&stack).await;
    let mut client = gateway.connect(None).await;
    client.sync(false, "7").await;
    client
        .send(r#"{"topic":"phoenix","event":"heartbeat","payload":{},"ref":null}"#)
        .await;
    assert_eq!(
        client.recv_text().await,
        r#"{"event":"phx_reply","payload":{"status":"ok","response":{}},"ref":null,"topic":"phoenix"}"#
    );
    client
        .send(r#"{"topic":"realtime:probe","event":"phx_join","payload":{"access_token":null,"config":{"broadcast":{"ack":false,"self":false},"postgres_changes":[{"event":"*","schema":"public","table":"todos"}],"presence":{"key":""}}},"ref":"1"}"#)
        .await;
    let reply = client.recv().await;
    let id = reply["payload"]["response"]["postgres_changes"][0]["id"]
        .as_u64()
        .expect("id");
    assert_eq!(
        reply,
        json!({"event": "phx_reply", "ref": "1", "topic": "realtime:probe",
               "payload": {"status": "ok", "response": {"postgres_changes": [{"event": "*", "schema": "public", "table": "todos", "id": id}]}}})
    );
    assert_eq!(
        client.recv_text().await,
        r#"{"event":"system","payload":{"channel":"probe","extension":"postgres_changes","message":"Subscribed to PostgreSQL","status":"ok"},"ref":null,"topic":"realtime:probe"}"#
    );
    // The apikey's claims (anon) apply when access_token is null.
    assert_eq!(gateway.registry().await[0].1["role"], "anon");
    client
        .send(r#"{"topic":"realtime:probe","event":"phx_leave","payload":null,"ref":"4"}"#)
        .await;
    assert_eq!(
        client.recv_text().await,
        r#"{"event":"phx_reply","payload":{"status":"ok","response":{}},"ref":"4","topic":"realtime:probe"}"#
    );
    assert_eq!(
        client.recv_text().await,
        r#"{"event":"phx_close","payload":{},"ref":null,"topic":"realtime:probe"}"#
    );
    eventually(
        "the subscription left the registry",
        Duration::from_secs(10),
        || async { gateway.registry().await.is_empty() },
    )
    .await;
    // A leave of a topic no longer joined is still answered.
    client
        .send(r#"{"topic":"realtime:probe","event":"phx_leave","payload":{},"ref":"5"}"#)
        .await;
    assert_eq!(
        client.recv_text().await,
        r#"{"event":"phx_reply","payload":{"status":"error","response":{"reason":"unmatched topic"}},"ref":"5","topic":"realtime:probe"}"#
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_binding_gets_supabases_system_error_and_the_channel_stays() {
    let (stack, gateway) = start().await;
    let _daemon = spawn_daemon(&stack).await;
    let mut client = gateway.connect(Some("2.0.0")).await;
    client
        .send(r#"["3","3","realtime:bad","phx_join",{"config":{"postgres_changes":[{"event":"*","schema":"public","table":"doesnotexist"}]}}]"#)
        .await;
    let reply = client.recv().await;
    assert_eq!(reply[4]["status"], "ok");
    assert_eq!(
        client.recv_text().await,
        r#"["3",null,"realtime:bad","system",{"channel":"bad","extension":"postgres_changes","message":"Unable to subscribe to changes with given parameters. Please check Realtime is enabled for the given connect parameters: [event: *, schema: public, table: doesnotexist, filters: [], select: nil]","status":"error"}]"#
    );
    client.sync(true, "9").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_frames_are_answered_where_they_have_a_ref_and_the_socket_survives() {
    let redis = TestRedis::start();
    let gateway = Gateway::spawn(&redis.url()).await;
    let mut client = gateway.connect(Some("2.0.0")).await;
    client.send("not json").await;
    client.send(r#"{"topic":"phoenix"}"#).await;
    client
        .ws
        .send(Message::Binary(
            vec![3u8, 0, 0, 1, 1, 0, 1, b't', b'e'].into(),
        ))
        .await
        .expect("binary");
    client
        .ws
        .send(Message::Binary(vec![9u8].into()))
        .await
        .expect("binary");
    client.send(r#"["1","5","realtime:x"]"#).await;
    assert_eq!(
        client.recv_text().await,
        r#"["1","5","realtime:x","phx_reply",{"status":"error","response":{"reason":"malformed frame: expected 5 elements [join_ref, ref, topic, event, payload], got 3"}}]"#
    );
    client.send(r#"[null,"6","realtime:x",42,{}]"#).await;
    assert_eq!(
        client.recv_text().await,
        r#"[null,"6","realtime:x","phx_reply",{"status":"error","response":{"reason":"malformed frame: event must be a string"}}]"#
    );
    client.send(r#"["2","7","realtime:x","phx_join",[]]"#).await;
    assert_eq!(
        client.recv_text().await,
        r#"["2","7","realtime:x","phx_reply",{"status":"error","response":{"reason":"InvalidJoinPayload: the join payload must be an object"}}]"#
    );
    client.send(r#"["2","8","realtime:","phx_join",{}]"#).await;
    assert_eq!(
        client.recv_text().await,
        r#"["2","8","realtime:","phx_reply",{"status":"error","response":{"reason":"TopicNameRequired: You must provide a topic name"}}]"#
    );
    // A join without bindings; unknown events on it are ignored.
    client.send(r#"["3","9","realtime:x","phx_join",{}]"#).await;
    assert_eq!(
        client.recv_text().await,
        r#"["3","9","realtime:x","phx_reply",{"status":"ok","response":{"postgres_changes":[]}}]"#
    );
    client
        .send(
            r#"["3","10","realtime:x","broadcast",{"type":"broadcast","event":"e","payload":{}}]"#,
        )
        .await;
    client.sync(true, "11").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_without_a_valid_token_are_refused_over_http() {
    let redis = TestRedis::start();
    let gateway = Gateway::spawn(&redis.url()).await;
    let refused = |query: String| {
        let url = gateway.url("/socket/websocket", &query);
        async move {
            match tokio_tungstenite::connect_async(url).await {
                Err(tungstenite::Error::Http(response)) => {
                    let body = response.body().clone().unwrap_or_default();
                    let body: Value = serde_json::from_slice(&body).expect("json body");
                    (
                        response.status().as_u16(),
                        body["error"].as_str().unwrap_or("").to_owned(),
                    )
                }
                other => panic!("expected an HTTP refusal, got {:?}", other.map(|_| ())),
            }
        }
    };
    assert_eq!(
        refused("vsn=2.0.0".into()).await,
        (401, "API key is missing".to_owned())
    );
    let (status, message) = refused(format!("apikey={}", token("anon", now() - 100))).await;
    assert_eq!(status, 401);
    assert!(message.starts_with("Token has expired "), "{message}");
    let forged = encode(
        &Header::default(),
        &json!({"role": "anon", "exp": now() + 60}),
        &EncodingKey::from_secret(b"another secret"),
    )
    .expect("sign");
    assert_eq!(
        refused(format!("apikey={forged}")).await,
        (403, "Failed to validate JWT signature".to_owned())
    );
    assert_eq!(
        refused("apikey=garbage".into()).await,
        (403, "The token provided is not a valid JWT".to_owned())
    );
    let no_role = encode(
        &Header::default(),
        &json!({"exp": now() + 60}),
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .expect("sign");
    assert_eq!(
        refused(format!("apikey={no_role}")).await,
        (
            403,
            "Fields `role` and `exp` are required in JWT".to_owned()
        )
    );
    // The x-api-key header wins over the query parameter.
    let mut request = gateway
        .url("/socket/websocket", "apikey=garbage")
        .into_client_request()
        .expect("request");
    request
        .headers_mut()
        .insert("x-api-key", valid("anon").parse().expect("header"));
    let (ws, _) = tokio_tungstenite::connect_async(request)
        .await
        .expect("the header's token is used");
    drop(ws);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_tokens_fail_the_join_or_close_the_channel() {
    let redis = TestRedis::start();
    let gateway = Gateway::spawn(&redis.url()).await;
    let mut client = gateway.connect(Some("2.0.0")).await;
    client
        .send(&format!(
            r#"["1","1","realtime:room1","phx_join",{{"config":{{}},"access_token":"{}"}}]"#,
            token("anon", now() - 300)
        ))
        .await;
    let reply = client.recv().await;
    let reason = reply[4]["response"]["reason"].as_str().expect("reason");
    assert!(
        reason.starts_with("InvalidJWTExpiration: Token has expired "),
        "{reply}"
    );
    client
        .send(r#"["2","2","realtime:room1","phx_join",{"config":{"postgres_changes":[{"event":"*","schema":"public","table":"todos"}]}}]"#)
        .await;
    assert_eq!(client.recv().await[4]["status"], "ok");
    // A refresh with the same or a non-string token is ignored, unanswered.
    client
        .send(r#"["2","3","realtime:room1","access_token",{"access_token":null}]"#)
        .await;
    client.sync(true, "4").await;
    // A new, valid token registers the binding again under a new id with
    // the new claims; the old one stays until the daemon (absent here)
    // confirms the new.
    eventually(
        "the subscription registered",
        Duration::from_secs(10),
        || async { gateway.registry().await.len() == 1 },
    )
    .await;
    let before = gateway.registry().await;
    client
        .send(&format!(
            r#"["2","5","realtime:room1","access_token",{{"access_token":"{}"}}]"#,
            valid("authenticated")
        ))
        .await;
    client.sync(true, "6").await;
    eventually(
        "the subscription registered again as authenticated",
        Duration::from_secs(10),
        || async {
            let mut after = gateway.registry().await;
            after.sort_by(|a, b| a.0.cmp(&b.0));
            after.len() == 2
                && after[0] == before[0]
                && after[1].0 == format!("{}.1", before[0].0)
                && after[1].1["role"] == "authenticated"
        },
    )
    .await;
    // An expired one: system error, then phx_close; the registry empties
    // of both.
    client
        .send(&format!(
            r#"["2","7","realtime:room1","access_token",{{"access_token":"{}"}}]"#,
            token("anon", now() - 10)
        ))
        .await;
    let system = client.recv().await;
    assert_eq!(
        &system.as_array().expect("array")[..4],
        &[
            json!("2"),
            Value::Null,
            json!("realtime:room1"),
            json!("system")
        ]
    );
    let message = system[4]["message"].as_str().expect("message");
    assert!(message.starts_with("Token has expired "), "{system}");
    assert_eq!(
        (
            &system[4]["channel"],
            &system[4]["extension"],
            &system[4]["status"]
        ),
        (&json!("room1"), &json!("system"), &json!("error"))
    );
    assert_eq!(
        client.recv_text().await,
        r#"["2","2","realtime:room1","phx_close",{}]"#
    );
    eventually("the registry is empty", Duration::from_secs(10), || async {
        gateway.registry().await.is_empty()
    })
    .await;
}

/// Joins `topic` with one binding on `todos` and waits for its reply.
async fn join_todos(client: &mut Client, topic: &str) {
    client
        .send(&format!(
            r#"["1","1","{topic}","phx_join",{{"config":{{"postgres_changes":[{{"event":"*","schema":"public","table":"todos"}}]}}}}]"#
        ))
        .await;
    assert_eq!(client.recv().await[4]["status"], "ok");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_that_stops_reading_is_closed_and_the_others_keep_receiving() {
    let redis = TestRedis::start();
    let gateway = Gateway::spawn(&redis.url()).await;
    let mut slow = gateway.connect(Some("2.0.0")).await;
    let mut fast = gateway.connect(Some("2.0.0")).await;
    join_todos(&mut slow, "realtime:slow").await;
    join_todos(&mut fast, "realtime:fast").await;
    eventually(
        "both subscriptions registered",
        Duration::from_secs(10),
        || async { gateway.registry().await.len() == 2 },
    )
    .await;
    let ids: Vec<String> = gateway
        .registry()
        .await
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    // Changes as the daemon would send them, to both sockets; the fast
    // one reads every batch before the next is published, the slow one
    // never reads.
    let client = redis::Client::open(redis.url()).expect("redis url");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("redis");
    let filler = "x".repeat(8 * 1024);
    let (batches, per_batch) = (50, 100);
    let mut kicked_at = None;
    for batch in 0..batches {
        for i in 0..per_batch {
            let event = json!({"v": 1, "type": "change", "ids": ids, "lsn": "0/1", "seq": batch * per_batch + i,
                "data": {"columns": [], "commit_timestamp": null, "errors": null, "schema": "public", "table": "todos", "record": {"filler": filler}, "type": "INSERT"}});
            let _: i64 = conn
                .publish(
                    format!("walcast:default:gateway:{GATEWAY_ID}"),
                    event.to_string(),
                )
                .await
                .expect("publish");
        }
        for _ in 0..per_batch {
            let frame = fast.recv().await;
            assert_eq!(frame[3], "postgres_changes");
        }
        if kicked_at.is_none() && gateway.process.log().contains("socket falls behind") {
            kicked_at = Some(batch);
        }
    }
    assert!(
        kicked_at.is_some(),
        "the slow socket was never closed\n{}",
        gateway.process.log()
    );
    // The slow socket: what was buffered, then the end of the stream.
    let mut delivered = 0;
    loop {
        match tokio::time::timeout(FRAME_TIMEOUT, slow.ws.next())
            .await
            .expect("the slow socket ends")
        {
            Some(Ok(Message::Text(_))) => delivered += 1,
            Some(Ok(Message::Close(frame))) => {
                if let Some(frame) = frame {
                    assert_eq!(u16::from(frame.code), 1013);
                }
                break;
            }
            Some(Ok(_)) => {}
            Some(Err(_)) | None => break,
        }
    }
    assert!(delivered < batches * per_batch, "{delivered}");
    // Its subscription is gone; the fast socket is still served.
    eventually(
        "the slow socket's subscription removed",
        Duration::from_secs(10),
        || async { gateway.registry().await.len() == 1 },
    )
    .await;
    fast.sync(true, "after").await;
    let metrics = gateway.get("/metrics").await.2;
    assert!(
        metrics
            .lines()
            .any(|l| l == "walcast_gateway_slow_sockets_closed_total 1"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_sockets_and_leaves_the_bus() {
    let redis = TestRedis::start();
    let mut gateway = Gateway::spawn(&redis.url()).await;
    let mut client = gateway.connect(Some("2.0.0")).await;
    join_todos(&mut client, "realtime:room1").await;
    eventually(
        "subscription registered",
        Duration::from_secs(10),
        || async { gateway.registry().await.len() == 1 },
    )
    .await;
    let status = gateway.process.terminate();
    assert!(status.success(), "{status:?}\n{}", gateway.process.log());
    match tokio::time::timeout(FRAME_TIMEOUT, client.ws.next())
        .await
        .expect("a close frame")
    {
        Some(Ok(Message::Close(Some(frame)))) => assert_eq!(u16::from(frame.code), 1001),
        other => panic!("expected a close frame, got {other:?}"),
    }
    let redis_client = redis::Client::open(redis.url()).expect("redis url");
    let mut conn = redis_client
        .get_multiplexed_async_connection()
        .await
        .expect("redis");
    let lease: bool = conn
        .exists(format!("walcast:default:gateway:{GATEWAY_ID}:lease"))
        .await
        .expect("exists");
    let member: bool = conn
        .sismember("walcast:default:gateways", GATEWAY_ID)
        .await
        .expect("sismember");
    assert_eq!((lease, member), (false, false));
    assert!(gateway.registry().await.is_empty());
}
