//! Private channels and Broadcast from Database with real Supabase
//! clients, unmodified (issue 17): `@supabase/realtime-js` with vsn 2.0.0
//! and 1.0.0, and realtime-py, joining `config.private: true` channels
//! authorized by RLS policies on `realtime.messages`
//! (`tests/private.rs` `POLICIES`). The programs are the ones of
//! `tests/clients_rooms.rs`.
//!
//! The scenario: a join allowed and one refused by policy (Supabase's
//! text), `realtime.send` to the private and the public topic, a
//! `broadcast_changes` trigger's INSERT, UPDATE and DELETE, a client that
//! may read but not write (its broadcasts reach nobody) beside ones that
//! may, a REST `httpSend` to the private topic, Broadcast Replay
//! (`config.broadcast.replay`), and a token refresh that loses the read
//! and closes the channel.

use std::time::Duration;

use serde_json::{Value, json};

use crate::clients_rooms::{broadcasts, js_as, py_as, saw};
use crate::private::{start, user};
use crate::support::real_client;

const ROOM: &str = "room:1";

fn config(key: &str) -> String {
    json!({"broadcast": {"self": false, "ack": true}, "presence": {"key": key}, "private": true})
        .to_string()
}

/// What realtime-js hands the broadcast callback for a message of the
/// database: `meta.id` beside the payload.
fn from_database(event: &str, id: &str, payload: Value) -> Value {
    json!({"broadcast": {"type": "broadcast", "event": event, "meta": {"id": id}, "payload": payload}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn realtime_js_and_realtime_py_use_private_channels_and_database_broadcasts() {
    real_client::install();
    let (stack, _daemon, gateway) = start().await;
    stack
        .client
        .batch_execute(&format!(
            "CREATE POLICY read_games ON realtime.messages FOR SELECT TO authenticated
               USING (realtime.topic() LIKE 'games:%'
                 AND current_setting('request.jwt.claims', true)::jsonb ->> 'sub' = 'alice');
             {}",
            crate::db_broadcast::GAMES_TRIGGER
        ))
        .await
        .expect("games");
    // Writers (w: true) on vsn 2.0.0 and realtime-py; a reader only on 1.0.0.
    let writer = user("alice", json!({"w": true}));
    let reader = user("alice", json!({}));
    let mut v2 = js_as(&gateway, "2.0.0", &writer, ROOM, &config("js2"));
    let mut v1 = js_as(&gateway, "1.0.0", &reader, ROOM, &config("js1"));
    let mut rpy = py_as(&gateway, &writer, ROOM, &config("py"));
    let games = js_as(&gateway, "2.0.0", &reader, "games:7", &config("games"));
    let subscribed = json!({"status": "SUBSCRIBED", "error": null});
    for client in [&v2, &v1, &rpy, &games] {
        saw(client, &subscribed, 1).await;
    }
    // Refused by policy: realtime-js reports Supabase's reason.
    let bob = js_as(
        &gateway,
        "2.0.0",
        &user("bob", json!({})),
        ROOM,
        &config("bob"),
    );
    saw(
        &bob,
        &json!({"status": "CHANNEL_ERROR", "error": "Unauthorized: You do not have permissions to read from this Channel topic: room:1"}),
        1,
    )
    .await;

    // realtime.send to the private topic reaches every private channel
    // (with meta.id); to the public topic, none of them.
    stack
        .client
        .batch_execute(
            r#"SELECT realtime.send('{"n": 1, "text": "Grüße 🦀"}', 'db', 'room:1', true);
               SELECT realtime.send('{"n": 0}', 'public-db', 'room:1', false);"#,
        )
        .await
        .expect("send");
    let id: String = stack
        .client
        .query_one(
            "SELECT id::text FROM realtime.messages WHERE event = 'db'",
            &[],
        )
        .await
        .expect("id")
        .get(0);
    let payload = json!({"n": 1, "text": "Grüße 🦀", "id": id});
    saw(&v2, &from_database("db", &id, payload.clone()), 1).await;
    saw(&v1, &from_database("db", &id, payload.clone()), 1).await;
    rpy.wait_for("the database broadcast", WAIT, |lines| {
        lines
            .iter()
            .any(|l| l["broadcast"]["event"] == "db" && l["broadcast"]["payload"] == payload)
    })
    .await;

    // The trigger's payloads on the private `games:7`.
    stack
        .client
        .batch_execute(
            "INSERT INTO games VALUES (7, 'chess');
             UPDATE games SET name = 'go' WHERE id = 7;
             DELETE FROM games WHERE id = 7;",
        )
        .await
        .expect("writes");
    games
        .wait_for("three row changes", WAIT, |lines| {
            lines
                .iter()
                .filter(|l| l["broadcast"]["type"] == "broadcast")
                .count()
                >= 3
        })
        .await;
    let changes: Vec<Value> = games
        .lines()
        .into_iter()
        .filter(|l| l["broadcast"]["type"] == "broadcast")
        .map(|l| {
            let b = &l["broadcast"];
            assert_eq!(b["meta"]["id"], b["payload"]["id"], "{b}");
            json!([
                b["event"],
                b["payload"]["operation"],
                b["payload"]["record"],
                b["payload"]["old_record"],
                b["payload"]["table"],
                b["payload"]["schema"]
            ])
        })
        .collect();
    assert_eq!(
        changes,
        vec![
            json!(["INSERT", "INSERT", {"id": 7, "name": "chess"}, null, "games", "public"]),
            json!(["UPDATE", "UPDATE", {"id": 7, "name": "go"}, {"id": 7, "name": "chess"}, "games", "public"]),
            json!(["DELETE", "DELETE", null, {"id": 7, "name": "go"}, "games", "public"]),
        ]
    );

    // The reader may not write: its broadcast reaches nobody (realtime-js
    // waits for an ack that never comes, as on Supabase). The writers'
    // broadcasts reach the others.
    v1.send_line(&json!({"op": "send", "event": "denied", "payload": {"from": "v1"}}).to_string());
    rpy.send_line(
        &json!({"op": "send", "event": "allowed", "payload": {"from": "py"}}).to_string(),
    );
    saw(
        &v2,
        &json!({"broadcast": {"type": "broadcast", "event": "allowed", "payload": {"from": "py"}}}),
        1,
    )
    .await;
    saw(
        &v1,
        &json!({"broadcast": {"type": "broadcast", "event": "allowed", "payload": {"from": "py"}}}),
        1,
    )
    .await;
    // httpSend on a private channel: POST /api/broadcast/…?private=true.
    v2.send_line(
        &json!({"op": "http", "event": "rest", "payload": {"via": "httpSend"}}).to_string(),
    );
    saw(
        &v2,
        &json!({"done": "http", "result": {"success": true}}),
        1,
    )
    .await;
    saw(&v1, &json!({"broadcast": {"type": "broadcast", "event": "rest", "payload": {"via": "httpSend"}}}), 1).await;
    rpy.wait_for("the REST broadcast", WAIT, |lines| {
        lines.iter().any(|l| l["broadcast"]["event"] == "rest")
    })
    .await;
    saw(&v1, &json!({"done": "send", "result": "timed out"}), 1).await;
    for client in [&v2, &rpy] {
        assert_eq!(broadcasts(client, "denied"), Vec::<Value>::new());
        assert_eq!(broadcasts(client, "public-db"), Vec::<Value>::new());
    }

    // Replay: a channel joining later asks for what was stored.
    let replay = json!({"broadcast": {"self": false, "ack": true, "replay": {"since": 0, "limit": 5}}, "private": true}).to_string();
    for vsn in ["2.0.0", "1.0.0"] {
        let late = js_as(&gateway, vsn, &reader, ROOM, &replay);
        saw(&late, &subscribed, 1).await;
        saw(
            &late,
            &json!({"broadcast": {"type": "broadcast", "event": "db", "meta": {"id": id, "replayed": true}, "payload": payload}}),
            1,
        )
        .await;
        assert_eq!(broadcasts(&late, "db").len(), 1, "{vsn}: replayed once");
    }

    // A refreshed token that cannot read closes the channel.
    v1.send_line(&json!({"op": "auth", "token": user("bob", json!({}))}).to_string());
    saw(
        &v1,
        &json!({"system": {"channel": "room:1", "extension": "system", "message": "You no longer have permission to read from this Channel topic: room:1", "status": "error"}}),
        1,
    )
    .await;
    drop(bob);
}

/// How long anything due may take (realtime-js waits 10 s for an ack).
const WAIT: Duration = Duration::from_secs(30);
