//! A hostile client with only the public anon key, against a real stack
//! (Postgres, Redis, daemon, gateway): each probe gets its exact reply or
//! close code, costs the gateway, Redis and the log no more than the
//! limits allow, and a bystander on another socket keeps receiving its
//! changes throughout (issue 15).

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use jsonwebtoken::{EncodingKey, Header, encode};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

use crate::gateway::{Client, FRAME_TIMEOUT, Gateway, SECRET, SETUP, now};
use crate::support::stack::Stack;
use crate::support::{Daemon, eventually};

/// How long something the gateway is about to do may take.
const WAIT: Duration = Duration::from_secs(20);

/// The stack, the daemon, the gateway and a bystander subscribed to
/// every change of `todos`.
struct Scene {
    stack: Stack,
    _daemon: Daemon,
    gateway: Gateway,
    bystander: Client,
    /// The id of the next row the bystander must see.
    next_row: i32,
}

impl Scene {
    async fn start(gateway_env: &[(&str, String)]) -> Scene {
        let stack = Stack::start().await;
        stack.client.batch_execute(SETUP).await.expect("setup");
        let daemon = stack.spawn_gateway_daemon().await;
        let gateway = Gateway::spawn_with(&stack.redis.url(), gateway_env).await;
        let mut bystander = gateway.connect(Some("2.0.0")).await;
        bystander
            .send(r#"["1","1","realtime:bystander","phx_join",{"config":{"postgres_changes":[{"event":"INSERT","schema":"public","table":"todos"}]}}]"#)
            .await;
        assert_eq!(bystander.recv().await[4]["status"], "ok");
        assert_eq!(
            bystander.recv().await[4]["message"],
            "Subscribed to PostgreSQL"
        );
        let mut scene = Scene {
            stack,
            _daemon: daemon,
            gateway,
            bystander,
            next_row: 1,
        };
        scene.bystander_receives().await;
        scene
    }

    /// Inserts a row and asserts that the bystander receives exactly it.
    async fn bystander_receives(&mut self) {
        let id = self.next_row;
        self.next_row += 1;
        self.stack
            .client
            .execute("INSERT INTO todos VALUES ($1, 'task', 'u1')", &[&id])
            .await
            .expect("insert");
        let event = self.bystander.recv().await;
        assert_eq!(
            (&event[3], &event[4]["data"]["record"]["id"]),
            (&json!("postgres_changes"), &json!(id)),
            "{event}"
        );
    }

    /// The registry's entries in Redis (the gateway's subscriptions).
    async fn registered(&self) -> usize {
        self.gateway.registry().await.len()
    }
}

/// The error reply of a refused join, as sent (vsn 2.0.0).
fn refused(n: u32, topic: &str, reason: &str) -> String {
    format!(
        r#"["{n}","{n}",{},"phx_reply",{{"status":"error","response":{{"reason":{}}}}}]"#,
        Value::from(topic),
        Value::from(reason)
    )
}

fn join(n: u32, topic: &str, payload: &str) -> String {
    format!(
        r#"["{n}","{n}",{},"phx_join",{payload}]"#,
        Value::from(topic)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joins_over_the_size_limits_are_refused_stored_nowhere_and_logged_in_clips() {
    let mut scene = Scene::start(&[]).await;
    let mut hostile = scene.gateway.connect(Some("2.0.0")).await;
    let log_before = scene.gateway.process.log().len();
    // Five joins of a 1 MB topic with 100 bindings each: the issue's probe.
    let topic = format!("realtime:{}", "t".repeat(1_000_000));
    let bindings = vec![r#"{"event":"*","schema":"public","table":"todos"}"#; 100].join(",");
    let payload = format!(r#"{{"config":{{"postgres_changes":[{bindings}]}}}}"#);
    for n in 1..=5 {
        hostile.send(&join(n, &topic, &payload)).await;
        assert_eq!(
            hostile.recv_text().await,
            refused(
                n,
                &topic,
                "TopicNameTooLong: Topic names are limited to 1024 bytes (this one has 1000009)"
            )
        );
    }
    scene.bystander_receives().await;
    // 101 bindings; one binding of 4097 bytes.
    let many = vec![r#"{"table":"todos"}"#; 101].join(",");
    hostile
        .send(&join(
            6,
            "realtime:many",
            &format!(r#"{{"config":{{"postgres_changes":[{many}]}}}}"#),
        ))
        .await;
    assert_eq!(
        hostile.recv_text().await,
        refused(
            6,
            "realtime:many",
            "InvalidJoinPayload: A channel may have at most 100 postgres_changes bindings (this join has 101)"
        )
    );
    let large = format!(
        r#"{{"table":"todos","filter":"id=in.({})"}}"#,
        "1,".repeat(2029) + "12"
    );
    assert_eq!(large.len(), 4097);
    hostile
        .send(&join(
            7,
            "realtime:large",
            &format!(r#"{{"config":{{"postgres_changes":[{{"table":"todos"}},{large}]}}}}"#),
        ))
        .await;
    assert_eq!(
        hostile.recv_text().await,
        refused(
            7,
            "realtime:large",
            "InvalidJoinPayload: A postgres_changes binding may have at most 4096 bytes (binding 1 has 4097)"
        )
    );
    // A token of 16,385 bytes, at join and at connect.
    let claims = json!({"role": "anon", "exp": now() + 3600, "pad": "p".repeat(12_200)});
    let big = encode(
        &Header::default(),
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .expect("sign");
    assert!(big.len() > 16_384, "{}", big.len());
    hostile
        .send(&join(
            8,
            "realtime:token",
            &format!(r#"{{"access_token":"{big}"}}"#),
        ))
        .await;
    assert_eq!(
        hostile.recv_text().await,
        refused(
            8,
            "realtime:token",
            &format!(
                "InvalidJWTToken: Token is {} bytes; at most 16384 are accepted",
                big.len()
            )
        )
    );
    assert_eq!(
        scene.gateway.refused(&big).await,
        (
            403,
            format!(
                r#"{{"error":"Token is {} bytes; at most 16384 are accepted"}}"#,
                big.len()
            )
        )
    );
    // Topics Supabase routes no channel for.
    for (n, topic) in [(9, ""), (10, "phoenix"), (11, "room1")] {
        hostile.send(&join(n, topic, "{}")).await;
        assert_eq!(
            hostile.recv_text().await,
            refused(n, topic, "unmatched topic")
        );
    }
    // At the limits exactly, a join is accepted.
    let at_limit = format!("realtime:{}", "a".repeat(1024 - 9));
    let largest = format!(
        r#"{{"table":"todos","filter":"id=in.({})"}}"#,
        "1,".repeat(2029) + "1"
    );
    assert_eq!(largest.len(), 4096);
    let hundred = vec![largest.as_str(); 100].join(",");
    hostile
        .send(&join(
            12,
            &at_limit,
            &format!(r#"{{"config":{{"postgres_changes":[{hundred}]}}}}"#),
        ))
        .await;
    assert_eq!(hostile.recv().await[4]["status"], "ok");
    scene.bystander_receives().await;
    // Nothing refused reached Redis: the bystander's one binding and the
    // accepted join's hundred (written to Redis as the bus task gets to them).
    eventually("101 subscriptions registered", WAIT, || async {
        scene.registered().await == 101
    })
    .await;
    scene.bystander_receives().await;
    assert_eq!(scene.registered().await, 101);
    // Each join is stored once, its claims with it: two registry fields.
    assert_eq!(scene.gateway.registry_fields().await.len(), 2);
    let grown = scene.gateway.process.log().len() - log_before;
    assert!(
        grown < 64 * 1024,
        "five 1 MB topics and the rest added {grown} bytes of log"
    );
    scene.bystander_receives().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_over_5_mb_closes_the_socket_with_1009_and_nothing_else() {
    let mut scene = Scene::start(&[]).await;
    let mut hostile = scene.gateway.connect(Some("2.0.0")).await;
    let frame = format!(
        r#"[null,"1","phoenix","heartbeat",{{"x":"{}"}}]"#,
        "x".repeat(5_000_000)
    );
    // The server may close before the whole frame is written.
    let _ = hostile.ws.send(Message::Text(frame.into())).await;
    let end = match tokio::time::timeout(FRAME_TIMEOUT, hostile.ws.next())
        .await
        .expect("the socket ends in time")
    {
        Some(Ok(Message::Close(frame))) => frame.map(|f| u16::from(f.code)),
        other => panic!("expected a close frame, got {other:?}"),
    };
    assert_eq!(end, Some(1009));
    scene.bystander_receives().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_from_the_future_are_refused_at_connect_and_join() {
    let mut scene = Scene::start(&[]).await;
    let sign = |claims: Value| {
        encode(
            &Header::default(),
            &claims,
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .expect("sign")
    };
    let exp = now() + 7200;
    let early = sign(json!({"role": "anon", "exp": exp, "nbf": now() + 3600}));
    let (status, body) = scene.gateway.refused(&early).await;
    assert_eq!(status, 403);
    assert!(
        body.starts_with(r#"{"error":"Token is not valid yet: its nbf is "#),
        "{body}"
    );
    let mut hostile = scene.gateway.connect(Some("2.0.0")).await;
    let future = sign(json!({"role": "anon", "exp": exp, "iat": now() + 3600}));
    hostile
        .send(&join(
            1,
            "realtime:t",
            &format!(r#"{{"access_token":"{future}"}}"#),
        ))
        .await;
    let reply = hostile.recv().await;
    let reason = reply[4]["response"]["reason"].as_str().expect("reason");
    assert!(
        reason.starts_with("InvalidJWTToken: Token is issued in the future: its iat is 3"),
        "{reason}"
    );
    // Within the 60 s the issuer's clock may run ahead, a token is accepted.
    let skewed = sign(json!({"role": "anon", "exp": exp, "iat": now() + 30, "nbf": now() + 30}));
    let mut fine = scene.gateway.connect_with(&skewed, Some("2.0.0")).await;
    fine.sync(true, "1").await;
    scene.bystander_receives().await;
}

/// Every message the daemon sends the test gateway, as received.
struct GatewayChannel {
    messages: std::sync::Arc<std::sync::Mutex<Vec<Value>>>,
    _task: tokio::task::JoinHandle<()>,
}

impl GatewayChannel {
    async fn listen(redis_url: &str) -> GatewayChannel {
        let client = redis::Client::open(redis_url).expect("redis url");
        let mut pubsub = client.get_async_pubsub().await.expect("pubsub");
        pubsub
            .subscribe(walcast::bus::Names::new("default").gateway("gw-test"))
            .await
            .expect("subscribe");
        let messages = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = messages.clone();
        let task = tokio::spawn(async move {
            let mut stream = pubsub.into_on_message();
            while let Some(message) = stream.next().await {
                let text: String = message.get_payload().expect("text");
                let value = serde_json::from_str(&text).expect("json");
                sink.lock().expect("lock").push(value);
            }
        });
        GatewayChannel {
            messages,
            _task: task,
        }
    }

    /// The subscription ids named by the changes received so far.
    fn change_ids(&self) -> Vec<String> {
        let messages = self.messages.lock().expect("lock");
        messages
            .iter()
            .filter(|m| m["type"] == "change")
            .flat_map(|m| m["ids"].as_array().cloned().unwrap_or_default())
            .filter_map(|id| id.as_str().map(str::to_owned))
            .collect()
    }
}

fn user_token(role: &str, sub: &str, exp: i64) -> String {
    encode(
        &Header::default(),
        &json!({"role": role, "sub": sub, "exp": exp}),
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .expect("sign")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_refresh_the_daemon_refuses_ends_the_channel_and_its_subscriptions() {
    let mut scene = Scene::start(&[]).await;
    scene
        .stack
        .client
        .batch_execute(
            "CREATE TABLE secrets (id int PRIMARY KEY, owner text);
             GRANT SELECT ON secrets TO authenticated;
             ALTER PUBLICATION supabase_realtime ADD TABLE secrets;",
        )
        .await
        .expect("setup");
    let listener = GatewayChannel::listen(&scene.stack.redis.url()).await;
    let binding = r#"{"config":{"postgres_changes":[{"event":"INSERT","schema":"public","table":"secrets","filter":"owner=eq.alice"}]}"#;
    // Refreshed to the anon key, which may not read `owner`; to a role
    // the daemon does not allow.
    let refusals = [
        (
            user_token("anon", "anon", now() + 3600),
            "invalid column for filter owner",
        ),
        (
            user_token("service_role", "svc", now() + 3600),
            r#"role \"service_role\" may not subscribe (allowed roles: anon, authenticated)"#,
        ),
    ];
    for (n, (refresh, message)) in refusals.iter().enumerate() {
        let topic = format!("realtime:alice{n}");
        let alice = user_token("authenticated", "alice", now() + 3600);
        let mut client = scene.gateway.connect(Some("2.0.0")).await;
        client
            .send(&join(
                1,
                &topic,
                &format!(r#"{binding},"access_token":"{alice}"}}"#),
            ))
            .await;
        assert_eq!(client.recv().await[4]["status"], "ok");
        assert_eq!(
            client.recv().await[4]["message"],
            "Subscribed to PostgreSQL"
        );
        let id = 100 * (n as i32 + 1);
        scene
            .stack
            .client
            .execute("INSERT INTO secrets VALUES ($1, 'alice')", &[&id])
            .await
            .expect("insert");
        assert_eq!(client.recv().await[4]["data"]["record"]["id"], json!(id));
        client
            .send(&format!(
                r#"["1","2",{},"access_token",{{"access_token":"{refresh}"}}]"#,
                Value::from(topic.as_str())
            ))
            .await;
        let name = topic.trim_start_matches("realtime:");
        assert_eq!(
            client.recv_text().await,
            format!(
                r#"["1",null,"{topic}","system",{{"channel":"{name}","extension":"system","message":"{message}","status":"error"}}]"#
            )
        );
        assert_eq!(
            client.recv_text().await,
            format!(r#"["1","1","{topic}","phx_close",{{}}]"#)
        );
        // The daemon holds neither identity any more: the bystander's
        // binding is all that is registered, and alice's next row is
        // sent to no subscription of this socket.
        eventually("only the bystander registered", WAIT, || async {
            scene.registered().await == 1
        })
        .await;
        scene
            .stack
            .client
            .execute("INSERT INTO secrets VALUES ($1, 'alice')", &[&(id + 1)])
            .await
            .expect("insert");
        scene.bystander_receives().await;
        client.sync(true, "3").await;
    }
    let ids = listener.change_ids();
    let secrets: Vec<&String> = ids.iter().filter(|id| !id.starts_with("1:")).collect();
    // Each socket saw its first row under its join's subscription
    // (socket 2 and 3, join 1, binding 0), and nothing after.
    assert_eq!(secrets, ["2:1:0", "3:1:0"], "{ids:?}");
}

/// Publishes `text` on the tenant's control channel, as anyone who can
/// write to the bus's Redis could.
async fn forge_control(redis_url: &str, text: &str) {
    let client = redis::Client::open(redis_url).expect("redis url");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("redis");
    let _: i64 = redis::AsyncCommands::publish(
        &mut conn,
        walcast::bus::Names::new("default").control(),
        text,
    )
    .await
    .expect("publish");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leave_or_unsubscribe_the_gateway_did_not_send_is_noticed_and_repaired() {
    let mut scene = Scene::start(&[]).await;
    let gap = r#"["1",null,"realtime:bystander","system",{"channel":"bystander","extension":"postgres_changes","message":"Lost the connection to the change stream: changes may be missed until this channel is subscribed to PostgreSQL again","status":"error"}]"#;
    let again = r#"["1",null,"realtime:bystander","system",{"channel":"bystander","extension":"postgres_changes","message":"Subscribed to PostgreSQL","status":"ok"}]"#;
    let forged = [
        r#"{"v":1,"gateway":"gw-test","op":"leave"}"#.to_owned(),
        r#"{"v":1,"gateway":"gw-test","op":"unsubscribe","id":"1:1:0"}"#.to_owned(),
    ];
    for (n, text) in forged.iter().enumerate() {
        forge_control(&scene.stack.redis.url(), text).await;
        // The bystander is told of the gap, then that it is live again.
        assert_eq!(scene.bystander.recv_text().await, gap, "{text}");
        assert_eq!(scene.bystander.recv_text().await, again, "{text}");
        scene.bystander_receives().await;
        let metrics = scene.gateway.get("/metrics").await.2;
        let restored = format!("walcast_gateway_subscriptions_restored_total {}", n + 1);
        assert!(metrics.lines().any(|l| l == restored), "{metrics}");
    }
    // A leave of another gateway id touches nobody here.
    forge_control(
        &scene.stack.redis.url(),
        r#"{"v":1,"gateway":"gw-other","op":"leave"}"#,
    )
    .await;
    scene.bystander_receives().await;
    assert_eq!(scene.registered().await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_role_without_select_on_an_rls_table_gets_supabases_401_not_an_error_per_change() {
    let mut scene = Scene::start(&[]).await;
    scene
        .stack
        .client
        .batch_execute(walcast::rls::INSTALL_SQL)
        .await
        .expect("install sql/rls.sql");
    scene
        .stack
        .client
        .batch_execute(
            "CREATE TABLE notes (id int PRIMARY KEY, owner text, body text);
             ALTER TABLE notes ENABLE ROW LEVEL SECURITY;
             CREATE POLICY own ON notes FOR SELECT USING (owner = current_setting('request.jwt.claims', true)::jsonb->>'sub');
             GRANT SELECT ON notes TO authenticated;
             ALTER PUBLICATION supabase_realtime ADD TABLE notes;",
        )
        .await
        .expect("setup");
    let mut anon = scene.gateway.connect(Some("2.0.0")).await;
    anon.send(&join(
        1,
        "realtime:notes",
        r#"{"config":{"postgres_changes":[{"event":"*","schema":"public","table":"notes"}]}}"#,
    ))
    .await;
    let reply = anon.recv().await;
    let id = reply[4]["response"]["postgres_changes"][0]["id"].clone();
    assert_eq!(anon.recv().await[4]["message"], "Subscribed to PostgreSQL");
    for n in 1..=3 {
        scene
            .stack
            .client
            .execute("INSERT INTO notes VALUES ($1, 'alice', 'secret')", &[&n])
            .await
            .expect("insert");
        let event = anon.recv().await;
        assert_eq!(
            event,
            json!([null, null, "realtime:notes", "postgres_changes", {
                "ids": [id],
                "data": {
                    "columns": [],
                    "commit_timestamp": null,
                    "errors": ["Error 401: Unauthorized"],
                    "record": {},
                    "schema": "public",
                    "table": "notes",
                    "type": "INSERT"
                }
            }])
        );
        scene.bystander_receives().await;
    }
    anon.sync(true, "2").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_connections_and_joins_log_ten_warnings_per_10_s_and_count_the_rest() {
    let mut scene = Scene::start(&[("WALCAST_MAX_CONCURRENT_USERS", "2".to_owned())]).await;
    // The bystander holds one place; a second socket takes the other.
    let mut second = scene.gateway.connect(Some("2.0.0")).await;
    let log_before = scene.gateway.process.log();
    let started = std::time::Instant::now();
    for _ in 0..30 {
        assert_eq!(
            scene.gateway.refused(&crate::gateway::valid("anon")).await,
            (429, r#"{"error":"Too many connected users"}"#.to_owned())
        );
    }
    let log = scene.gateway.process.log();
    let new = &log[log_before.len()..];
    let warned = new
        .lines()
        .filter(|l| l.contains("connection refused: too many connected users"))
        .count();
    // Ten per 10 s window: exactly ten when the thirty fit in one window
    // (they take well under a second), ten more per window otherwise.
    let windows = started.elapsed().as_secs() / 10 + 1;
    if windows == 1 {
        assert_eq!(warned, 10, "{new}");
    } else {
        assert!(
            warned >= 10 && warned as u64 <= 10 * windows,
            "{warned} in {windows} windows\n{new}"
        );
    }
    let metrics = scene.gateway.get("/metrics").await.2;
    let suppressed = format!(
        r#"walcast_gateway_warnings_suppressed_total{{warning="connection_refused"}} {}"#,
        30 - warned
    );
    assert!(
        metrics.lines().any(|l| l == suppressed),
        "{suppressed}\n{metrics}"
    );
    second.sync(true, "1").await;
    scene.bystander_receives().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_holds_at_most_max_sockets_per_address() {
    let mut scene = Scene::start(&[("WALCAST_MAX_SOCKETS_PER_ADDRESS", "3".to_owned())]).await;
    // The bystander is one of this address's three.
    let mut second = scene.gateway.connect(Some("2.0.0")).await;
    let third = scene.gateway.connect(Some("2.0.0")).await;
    assert_eq!(
        scene.gateway.refused(&crate::gateway::valid("anon")).await,
        (
            429,
            r#"{"error":"Too many connections from this address"}"#.to_owned()
        )
    );
    // A closed socket frees its place.
    let mut third = third;
    third.ws.close(None).await.expect("close");
    while let Some(Ok(_)) = third.ws.next().await {}
    crate::support::eventually("the place is free", WAIT, || async {
        scene
            .gateway
            .get("/metrics")
            .await
            .2
            .lines()
            .any(|l| l == "walcast_gateway_sockets 2")
    })
    .await;
    let mut again = scene.gateway.connect(Some("2.0.0")).await;
    again.sync(true, "1").await;
    second.sync(true, "2").await;
    scene.bystander_receives().await;
}
