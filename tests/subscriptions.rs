//! Subscriptions over the bus: gateways register them, the daemon
//! validates, answers, matches changes by table and event, and sends each
//! gateway the events its subscriptions may see.

use std::time::Duration;

use serde_json::{Value, json};

use crate::support::gateway::BusGateway;
use crate::support::stack::Stack;
use crate::support::{Daemon, eventually};

const SETUP: &str = "
    CREATE ROLE anon NOLOGIN;
    CREATE ROLE authenticated NOLOGIN;
    CREATE TABLE todos (id int PRIMARY KEY, task text, secret text);
    CREATE TABLE notes (id int PRIMARY KEY, body text);
    CREATE TABLE private (id int PRIMARY KEY, owner text);
    ALTER TABLE private ENABLE ROW LEVEL SECURITY;
    CREATE POLICY own ON private FOR SELECT USING (owner = current_setting('request.jwt.claims', true)::jsonb->>'sub');
    CREATE TABLE secure (id int PRIMARY KEY, owner_id uuid);
    ALTER TABLE secure ENABLE ROW LEVEL SECURITY;
    CREATE POLICY own ON secure FOR SELECT USING (owner_id = (current_setting('request.jwt.claims', true)::jsonb->>'sub')::uuid);
    CREATE TABLE unpublished (id int PRIMARY KEY);
    CREATE TABLE markers (id int PRIMARY KEY);
    GRANT SELECT ON markers TO authenticated;
    GRANT SELECT ON todos, notes, private, secure TO anon, authenticated;
    REVOKE SELECT ON todos FROM anon;
    GRANT SELECT (id, task) ON todos TO anon;
    ALTER PUBLICATION supabase_realtime ADD TABLE todos, notes, private, secure, markers;
";

fn subscription(id: &str, role: &str, schema: &str, table: &str, event: &str) -> Value {
    json!({
        "id": id, "topic": format!("realtime:{id}"), "schema": schema, "table": table, "event": event,
        "filter": null, "select": null, "claims": {"sub": "u1", "role": role}, "role": role,
    })
}

/// A streaming daemon (no firehose) and a gateway on its bus.
async fn start() -> (Stack, Daemon, BusGateway) {
    Stack::with_bus_gateway(SETUP).await
}

/// Every change event committed so far, once all have arrived: commits a
/// marker row and waits for its event (a gateway gets its events in commit
/// order), rather than sleeping and hoping nothing more comes. Marker
/// events are left out.
async fn settled(stack: &Stack, gateway: &mut BusGateway) -> Vec<Value> {
    let is_marker = |e: &Value| e["data"]["table"] == "markers";
    let markers = gateway.events().iter().filter(|e| is_marker(e)).count();
    let replies = gateway
        .received()
        .iter()
        .filter(|m| m["id"] == "marker")
        .count();
    gateway
        .subscribe(subscription(
            "marker",
            "authenticated",
            "public",
            "markers",
            "INSERT",
        ))
        .await;
    assert_eq!(gateway.reply("marker", replies).await["type"], "subscribed");
    let marker = i32::try_from(markers).expect("marker id");
    stack
        .client
        .execute("INSERT INTO markers VALUES ($1)", &[&marker])
        .await
        .expect("marker");
    eventually("the marker event", Duration::from_secs(30), || async {
        gateway
            .events()
            .iter()
            .any(|e| is_marker(e) && e["data"]["record"]["id"] == json!(marker))
    })
    .await;
    gateway
        .events()
        .into_iter()
        .filter(|e| !is_marker(e))
        .collect()
}

fn summary(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .map(|e| {
            let ids: Vec<&str> = e["ids"]
                .as_array()
                .expect("ids")
                .iter()
                .map(|i| i.as_str().expect("id"))
                .collect();
            format!(
                "{} {} {}",
                ids.join("+"),
                e["data"]["table"].as_str().unwrap_or("?"),
                e["data"]["type"].as_str().unwrap_or("?")
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_receive_their_tables_and_events_only() {
    let (stack, daemon, mut gateway) = start().await;
    gateway
        .subscribe(subscription(
            "all-notes",
            "authenticated",
            "public",
            "notes",
            "*",
        ))
        .await;
    gateway
        .subscribe(subscription(
            "note-inserts",
            "authenticated",
            "public",
            "notes",
            "insert",
        ))
        .await;
    gateway
        .subscribe(subscription(
            "everything",
            "authenticated",
            "public",
            "*",
            "DELETE",
        ))
        .await;
    for id in ["all-notes", "note-inserts", "everything"] {
        let reply = gateway.reply(id, 0).await;
        assert_eq!(reply["type"], "subscribed", "{reply}\n{}", daemon.log());
        assert!(
            reply["lsn"]
                .as_str()
                .expect("lsn")
                .parse::<walcast::lsn::Lsn>()
                .is_ok()
        );
    }
    stack
        .client
        .batch_execute(
            "INSERT INTO notes VALUES (1, 'a'); UPDATE notes SET body = 'b'; DELETE FROM notes;
             INSERT INTO unpublished VALUES (1);
             INSERT INTO todos VALUES (1, 't', 's'); DELETE FROM todos;",
        )
        .await
        .expect("writes");
    let events = settled(&stack, &mut gateway).await;
    assert_eq!(
        summary(&events),
        [
            "all-notes+note-inserts notes INSERT",
            "all-notes notes UPDATE",
            "all-notes+everything notes DELETE",
            "everything todos DELETE"
        ]
    );
    // One event per gateway carries the whole Supabase data object.
    let first = &events[0];
    assert_eq!(first["v"], 1);
    assert_eq!(first["seq"], 0);
    assert_eq!(first["data"]["record"], json!({"id": 1, "body": "a"}));
    assert_eq!(
        first["data"]["columns"],
        json!([{"name": "id", "type": "int4"}, {"name": "body", "type": "text"}])
    );
    assert_eq!(events[2]["data"]["old_record"], json!({"id": 1}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn column_privileges_shape_what_each_role_sees() {
    let (stack, daemon, mut gateway) = start().await;
    gateway
        .subscribe(subscription("anon", "anon", "public", "todos", "*"))
        .await;
    gateway
        .subscribe(subscription(
            "auth",
            "authenticated",
            "public",
            "todos",
            "*",
        ))
        .await;
    let mut selective = subscription("auth-select", "authenticated", "public", "todos", "INSERT");
    selective["select"] = json!(["task"]);
    gateway.subscribe(selective).await;
    for id in ["anon", "auth", "auth-select"] {
        assert_eq!(gateway.reply(id, 0).await["type"], "subscribed");
    }
    stack
        .client
        .batch_execute("INSERT INTO todos VALUES (1, 'task', 'hush')")
        .await
        .expect("insert");
    // Subscriptions that see the change alike share one event per gateway.
    let mut events = gateway.wait_events(2).await;
    events.sort_by_key(|e| e["ids"].to_string());
    let records: Vec<(Value, Value)> = events
        .iter()
        .map(|e| (e["ids"].clone(), e["data"]["record"].clone()))
        .collect();
    assert_eq!(
        records,
        vec![
            (
                json!(["anon", "auth-select"]),
                json!({"id": 1, "task": "task"})
            ),
            (
                json!(["auth"]),
                json!({"id": 1, "task": "task", "secret": "hush"})
            ),
        ],
        "{}",
        daemon.log()
    );
    assert_eq!(
        events[0]["data"]["columns"],
        json!([{"name": "id", "type": "int4"}, {"name": "task", "type": "text"}])
    );
    // Without SELECT on the primary key a role gets Supabase's 401 shape.
    stack
        .client
        .batch_execute("REVOKE SELECT (id) ON todos FROM anon")
        .await
        .expect("revoke");
    // Privileges are cached (for a minute at most); a Relation message,
    // sent after an ALTER TABLE, refreshes them at once.
    stack
        .client
        .batch_execute(
            "ALTER TABLE todos ADD COLUMN extra int; INSERT INTO todos VALUES (3, 'x', 'y');",
        )
        .await
        .expect("alter");
    eventually("the event for row 3", Duration::from_secs(30), || async {
        gateway.events().iter().any(|e| {
            e["ids"] == json!(["anon"])
                && e["data"]["errors"] == json!(["Error 401: Unauthorized"])
                && e["data"]["record"] == json!({})
        })
    })
    .await;
}

fn as_user(id: &str, sub: &str, table: &str) -> Value {
    let mut s = subscription(id, "authenticated", "public", table, "*");
    s["claims"]["sub"] = json!(sub);
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rls_decides_each_subscribers_rows_and_deletes_show_only_keys() {
    let (stack, daemon, mut gateway) = start().await;
    gateway.subscribe(as_user("u1", "u1", "private")).await;
    gateway.subscribe(as_user("u2", "u2", "private")).await;
    for id in ["u1", "u2"] {
        assert_eq!(gateway.reply(id, 0).await["type"], "subscribed");
    }
    let write = |sql: &'static str| stack.client.batch_execute(sql);
    write("ALTER TABLE private REPLICA IDENTITY FULL; INSERT INTO private VALUES (1, 'u1')")
        .await
        .expect("insert");
    let events = gateway.wait_events(1).await;
    assert_eq!(
        (
            events[0]["ids"].clone(),
            events[0]["data"]["record"].clone()
        ),
        (json!(["u1"]), json!({"id": 1, "owner": "u1"})),
        "{}",
        daemon.log()
    );
    write("INSERT INTO private VALUES (2, 'u2')")
        .await
        .expect("insert");
    let events = gateway.wait_events(2).await;
    assert_eq!(events[1]["ids"], json!(["u2"]));
    write("UPDATE private SET owner = 'u2' WHERE id = 1")
        .await
        .expect("update");
    let events = gateway.wait_events(3).await;
    assert_eq!(
        (events[2]["ids"].clone(), events[2]["data"]["type"].clone()),
        (json!(["u2"]), json!("UPDATE"))
    );
    // Deletes are not checked against policies (Supabase's rule), so both
    // receive them, and under RLS `old_record` is only the key even with
    // REPLICA IDENTITY FULL.
    write("DELETE FROM private WHERE id = 1")
        .await
        .expect("delete");
    let events = gateway.wait_events(4).await;
    assert_eq!(events[3]["ids"], json!(["u1", "u2"]));
    assert_eq!(events[3]["data"]["old_record"], json!({"id": 1}));
    let all = settled(&stack, &mut gateway).await;
    assert_eq!(all.len(), 4, "nothing else: {all:?}");
}

/// The issue-14 scenario: a user's quick writes of their own row (insert,
/// update, delete, each committed at once) reach them all, though by the
/// time the batch is checked the row is gone; an owner transfer reaches the
/// new owner only; a row still in the table is decided alike. With `many`
/// unfiltered subscribers (ten users, so that the check searches the table
/// and asks which rows it still holds as committed) and with two (every
/// row decided on its image).
async fn events_follow_the_committed_row(many: bool) {
    let (stack, daemon, mut gateway) = start().await;
    let users: Vec<String> = (1..=if many { 10 } else { 2 })
        .map(|u| format!("u{u}"))
        .collect();
    for user in &users {
        gateway.subscribe(as_user(user, user, "private")).await;
    }
    for user in &users {
        assert_eq!(gateway.reply(user, 0).await["type"], "subscribed");
    }
    stack
        .client
        .batch_execute(
            "INSERT INTO private VALUES (10, 'u1');
             UPDATE private SET owner = 'u1' WHERE id = 10;
             DELETE FROM private WHERE id = 10;
             BEGIN;
             INSERT INTO private VALUES (11, 'u1');
             UPDATE private SET owner = 'u2' WHERE id = 11;
             COMMIT;
             INSERT INTO private VALUES (12, 'u2');
             DELETE FROM private WHERE id = 11;",
        )
        .await
        .expect("writes");
    let all = settled(&stack, &mut gateway).await;
    let got: Vec<(Value, Value, Value)> = all
        .iter()
        .map(|e| {
            let row = if e["data"]["type"] == "DELETE" {
                &e["data"]["old_record"]
            } else {
                &e["data"]["record"]
            };
            (e["data"]["type"].clone(), row.clone(), e["ids"].clone())
        })
        .collect();
    let everyone = json!(users);
    assert_eq!(
        got,
        [
            (
                json!("INSERT"),
                json!({"id": 10, "owner": "u1"}),
                json!(["u1"])
            ),
            (
                json!("UPDATE"),
                json!({"id": 10, "owner": "u1"}),
                json!(["u1"])
            ),
            (json!("DELETE"), json!({"id": 10}), everyone.clone()),
            (
                json!("INSERT"),
                json!({"id": 11, "owner": "u1"}),
                json!(["u1"])
            ),
            (
                json!("UPDATE"),
                json!({"id": 11, "owner": "u2"}),
                json!(["u2"])
            ),
            (
                json!("INSERT"),
                json!({"id": 12, "owner": "u2"}),
                json!(["u2"])
            ),
            (json!("DELETE"), json!({"id": 11}), everyone),
        ],
        "{}",
        daemon.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_are_decided_on_the_committed_row_not_the_tables_current_one() {
    events_follow_the_committed_row(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_many_subscribers_rows_the_table_still_holds_are_looked_up_the_rest_on_images() {
    events_follow_the_committed_row(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_raising_policy_denies_only_its_subscriber_and_says_so() {
    let (stack, daemon, mut gateway) = start().await;
    let owner = "8d0c1b6e-2f4a-4c2e-9f0e-0a1b2c3d4e5f";
    gateway.subscribe(as_user("good", owner, "secure")).await;
    gateway
        .subscribe(as_user("bad", "not-a-uuid", "secure"))
        .await;
    for id in ["good", "bad"] {
        assert_eq!(gateway.reply(id, 0).await["type"], "subscribed");
    }
    stack
        .client
        .batch_execute(&format!(
            "INSERT INTO secure VALUES (1, '{owner}'), (2, '{owner}')"
        ))
        .await
        .expect("insert");
    let events = gateway.wait_events(2).await;
    assert_eq!(
        events.iter().map(|e| e["ids"].clone()).collect::<Vec<_>>(),
        [json!(["good"]), json!(["good"])],
        "{}",
        daemon.log()
    );
    eventually(
        "two error events for the raising policy",
        Duration::from_secs(30),
        || async {
            gateway
                .received()
                .iter()
                .filter(|m| m["type"] == "error")
                .count()
                == 2
        },
    )
    .await;
    let errors: Vec<Value> = gateway
        .received()
        .into_iter()
        .filter(|m| m["type"] == "error")
        .collect();
    assert_eq!(errors[0]["ids"], json!(["bad"]));
    assert_eq!(
        (errors[0]["seq"].clone(), errors[1]["seq"].clone()),
        (json!(0), json!(1))
    );
    let message = errors[0]["message"].as_str().expect("message");
    assert!(
        message
            .starts_with("RLS policy evaluation failed: 22P02: invalid input syntax for type uuid"),
        "{message}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_subscriptions_are_rejected_with_a_reason() {
    let (_stack, daemon, mut gateway) = start().await;
    let cases = [
        (
            subscription("nope", "authenticated", "public", "doesnotexist", "*"),
            "Unable to subscribe to changes with given parameters. Please check Realtime is enabled for the given connect parameters: [event: *, schema: public, table: doesnotexist, filters: [], select: nil]",
        ),
        (
            subscription("unpub", "authenticated", "public", "unpublished", "*"),
            "Unable to subscribe to changes with given parameters.",
        ),
        (
            subscription("root", "postgres", "public", "notes", "*"),
            "role \"postgres\" may not subscribe (allowed roles: anon, authenticated)",
        ),
        (
            {
                let mut s = subscription("liar", "authenticated", "public", "notes", "*");
                s["claims"]["role"] = json!("service_role");
                s
            },
            "role \"authenticated\" is not the claims' role \"service_role\"",
        ),
        (
            {
                let mut s = subscription("wild-select", "authenticated", "public", "*", "*");
                s["select"] = json!(["id"]);
                s
            },
            "Column selection is not supported for wildcard subscriptions",
        ),
        (
            {
                let mut s = subscription("bad-col", "anon", "public", "todos", "*");
                s["select"] = json!(["secret"]);
                s
            },
            "invalid column for select secret",
        ),
        (
            subscription(
                "sql",
                "authenticated",
                "public",
                "notes; DROP TABLE notes; --",
                "*",
            ),
            "Unable to subscribe",
        ),
    ];
    // Garbage on the control channel is ignored; the daemon keeps serving.
    gateway.control_raw("not json").await;
    gateway
        .control_raw(r#"{"v":1,"gateway":"g1","op":"explode"}"#)
        .await;
    for (s, _) in &cases {
        gateway.subscribe(s.clone()).await;
    }
    for (s, expected) in &cases {
        let id = s["id"].as_str().expect("id");
        let reply = gateway.reply(id, 0).await;
        assert_eq!(reply["type"], "rejected", "{id}: {reply}");
        let message = reply["message"].as_str().expect("message");
        assert!(
            message.starts_with(expected),
            "{id}: {message:?} does not start with {expected:?}"
        );
    }
    assert!(!daemon.log().contains("panicked"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateways_get_time_to_come_back_when_redis_restarts_empty() {
    let (mut stack, daemon, mut gateway) = start().await;
    gateway
        .subscribe(subscription("s", "authenticated", "public", "notes", "*"))
        .await;
    assert_eq!(gateway.reply("s", 0).await["type"], "subscribed");
    let read_back = || daemon.log().matches("registry read back").count();
    let before = read_back();
    stack.redis.stop();
    stack.redis.start_again();
    eventually(
        "the daemon connected to the new redis",
        Duration::from_secs(30),
        || async { read_back() > before },
    )
    .await;
    let compared = || {
        daemon
            .log()
            .matches("compared the live gateways' registry hashes")
            .count()
    };
    let compared_before = compared();
    // The gateway comes back later than the daemon, past the first lease
    // checks (every 5 s) but within the grace: its lease is set again, and
    // the daemon still has its subscription. As the contract asks, it then
    // writes its subscription again (Redis lost the hash) and announces it.
    tokio::time::sleep(Duration::from_secs(6)).await;
    drop(gateway);
    let mut back = BusGateway::start(&stack.redis.url(), "default", "g1").await;
    stack
        .client
        .batch_execute("INSERT INTO notes VALUES (1, 'kept')")
        .await
        .expect("insert");
    let events = back.wait_events(1).await;
    assert_eq!(events[0]["ids"], json!(["s"]), "{}", daemon.log());
    assert_eq!(events[0]["data"]["record"]["body"], "kept");
    back.subscribe(subscription("s", "authenticated", "public", "notes", "*"))
        .await;
    assert_eq!(back.reply("s", 0).await["type"], "subscribed");
    // Past the grace the daemon compares the hashes with what it holds:
    // the rewritten subscription stays.
    eventually(
        "the daemon compared the registry hashes",
        Duration::from_secs(40),
        || async { compared() > compared_before },
    )
    .await;
    stack
        .client
        .batch_execute("INSERT INTO notes VALUES (2, 'still kept')")
        .await
        .expect("insert");
    let events = back.wait_events(2).await;
    assert_eq!(events[1]["ids"], json!(["s"]), "{}", daemon.log());
    assert_eq!(events[1]["data"]["record"]["body"], "still kept");
    let log = daemon.log();
    assert!(!log.contains("gateway lease expired"), "{log}");
    assert!(!log.contains("withdrew subscriptions"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_its_gateway_no_longer_registers_is_withdrawn() {
    let (stack, daemon, mut gateway) = start().await;
    for id in ["kept", "lost"] {
        gateway
            .subscribe(subscription(id, "authenticated", "public", "notes", "*"))
            .await;
        assert_eq!(gateway.reply(id, 0).await["type"], "subscribed");
    }
    // The unsubscribe of "lost" never reaches the daemon; its hash entry is
    // gone. The daemon compares the hashes 15 s after it connected to Redis
    // (the steps above take well under a second), then never again while
    // that connection lasts.
    gateway.forget("lost").await;
    eventually(
        "the daemon withdraws the unregistered subscription",
        Duration::from_secs(40),
        || async { daemon.log().contains("withdrew subscriptions") },
    )
    .await;
    stack
        .client
        .batch_execute("INSERT INTO notes VALUES (1, 'after')")
        .await
        .expect("insert");
    assert_eq!(
        summary(&settled(&stack, &mut gateway).await),
        ["kept notes INSERT"],
        "{}",
        daemon.log()
    );
    assert!(daemon.log().contains("withdrawn=1"), "{}", daemon.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_daemon_reads_the_registry_back_and_expired_gateways_are_dropped() {
    let (stack, mut daemon, mut gateway) = start().await;
    gateway
        .subscribe(subscription("s", "authenticated", "public", "notes", "*"))
        .await;
    assert_eq!(gateway.reply("s", 0).await["type"], "subscribed");
    daemon.kill();
    let daemon = Daemon::spawn(&["run"], &stack.gateway_env());
    // Without the gateway doing anything, the subscription is live again.
    assert_eq!(
        gateway.reply("s", 1).await["type"],
        "subscribed",
        "{}",
        daemon.log()
    );
    stack
        .client
        .batch_execute("INSERT INTO notes VALUES (1, 'after restart')")
        .await
        .expect("insert");
    let events = gateway.wait_events(1).await;
    assert_eq!(events[0]["data"]["record"]["body"], "after restart");
    // A gateway whose lease expires loses its subscriptions.
    gateway.drop_lease().await;
    eventually(
        "the daemon drops the expired gateway",
        Duration::from_secs(30),
        || async { daemon.log().contains("gateway lease expired") },
    )
    .await;
    // A second gateway's marker shows when the daemon is past a write.
    let mut other = BusGateway::start(&stack.redis.url(), "default", "g2").await;
    stack
        .client
        .batch_execute("INSERT INTO notes VALUES (2, 'nobody listens')")
        .await
        .expect("insert");
    settled(&stack, &mut other).await;
    assert_eq!(gateway.events().len(), 1);
    // Unsubscribe works too (for a live gateway): control messages are
    // handled in order, so the marker's subscription answered means the
    // unsubscribe was applied before it.
    other
        .subscribe(subscription("t", "anon", "public", "notes", "*"))
        .await;
    assert_eq!(other.reply("t", 0).await["type"], "subscribed");
    other.unsubscribe("t").await;
    settled(&stack, &mut other).await;
    stack
        .client
        .batch_execute("INSERT INTO notes VALUES (3, 'x')")
        .await
        .expect("insert");
    assert_eq!(settled(&stack, &mut other).await, Vec::<Value>::new());
}

fn filtered(id: &str, table: &str, event: &str, filter: &str) -> Value {
    let mut s = subscription(id, "authenticated", "public", table, event);
    s["filter"] = json!(filter);
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filters_decide_per_row_in_process_or_on_the_server() {
    let (stack, daemon, mut gateway) = start().await;
    stack
        .client
        .batch_execute("CREATE TABLE items (id int PRIMARY KEY, owner int, label text, price numeric); GRANT SELECT ON items TO authenticated; ALTER PUBLICATION supabase_realtime ADD TABLE items;")
        .await
        .expect("table");
    gateway
        .subscribe(filtered("owner7", "items", "*", "owner=eq.7"))
        .await;
    gateway
        .subscribe(filtered(
            "labels",
            "items",
            "INSERT",
            r#"label=in.(a,"b,c")"#,
        ))
        .await;
    gateway
        .subscribe(filtered(
            "like",
            "items",
            "*",
            "label=like.x%,price=gte.1.50",
        ))
        .await;
    gateway
        .subscribe(filtered("not-null", "items", "DELETE", "label=not.is.null"))
        .await;
    for id in ["owner7", "labels", "like", "not-null"] {
        assert_eq!(
            gateway.reply(id, 0).await["type"],
            "subscribed",
            "{id}\n{}",
            daemon.log()
        );
    }
    stack
        .client
        .batch_execute(
            "INSERT INTO items VALUES (1, 7, 'a', 1), (2, 8, 'b,c', 2), (3, 7, 'xy', 1.5), (4, 9, 'xz', 1.49);
             UPDATE items SET owner = 7 WHERE id = 2;
             UPDATE items SET owner = 8 WHERE id = 1;
             DELETE FROM items WHERE id = 3;",
        )
        .await
        .expect("writes");
    let events = settled(&stack, &mut gateway).await;
    let got: Vec<String> = events
        .iter()
        .map(|e| {
            format!(
                "{} {} {}",
                e["ids"],
                e["data"]["type"].as_str().unwrap_or("?"),
                e["data"]["record"]["id"]
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            r#"["owner7","labels"] INSERT 1"#,
            r#"["labels"] INSERT 2"#,
            r#"["owner7","like"] INSERT 3"#,
            // UPDATE is filtered on the new row: row 2 now belongs to owner 7;
            // row 1 no longer does and sends nothing, as in Supabase. The
            // DELETE carries only the key (REPLICA IDENTITY DEFAULT): filters
            // on other columns, even `not.is.null`, do not hold.
            r#"["owner7"] UPDATE 2"#,
        ]
    );
    // Invalid filters are refused when the subscription is made.
    gateway
        .subscribe(filtered("bad-col", "items", "*", "nope=eq.1"))
        .await;
    gateway
        .subscribe(filtered("bad-cast", "items", "*", "owner=eq.x"))
        .await;
    gateway
        .subscribe(filtered("bad-op", "items", "*", "owner=foo.1"))
        .await;
    assert_eq!(
        gateway.reply("bad-col", 0).await["message"],
        "invalid column for filter nope"
    );
    assert_eq!(
        gateway.reply("bad-cast", 0).await["message"],
        "invalid input syntax for type integer: \"x\""
    );
    assert!(
        gateway.reply("bad-op", 0).await["message"]
            .as_str()
            .expect("message")
            .starts_with("Error parsing `filter` params")
    );
}

/// The value of a metric on the admin endpoint.
async fn metric(port: u16, name: &str) -> f64 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut socket = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("admin port");
    socket
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .expect("request");
    let mut body = String::new();
    socket.read_to_string(&mut body).await.expect("response");
    body.lines()
        .find_map(|line| {
            line.strip_prefix(name)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rls_for_a_batch_of_changes_is_one_call_and_keeps_wal_order() {
    let stack = Stack::start().await;
    stack.client.batch_execute(SETUP).await.expect("setup");
    stack
        .client
        .batch_execute(walcast::rls::INSTALL_SQL)
        .await
        .expect("install sql/rls.sql");
    let admin = crate::support::free_port();
    let mut env = stack.gateway_env();
    env.push(("WALCAST_ADMIN_ADDR", format!("127.0.0.1:{admin}")));
    let daemon = Daemon::spawn(&["run"], &env);
    stack.wait_streaming("walcast", &daemon).await;
    let mut gateway = BusGateway::start(&stack.redis.url(), "default", "g1").await;
    gateway.subscribe(as_user("u1", "u1", "private")).await;
    gateway.subscribe(as_user("u2", "u2", "private")).await;
    for id in ["u1", "u2"] {
        assert_eq!(gateway.reply(id, 0).await["type"], "subscribed");
    }
    eventually("admin endpoint", Duration::from_secs(30), || async {
        tokio::net::TcpStream::connect(("127.0.0.1", admin))
            .await
            .is_ok()
    })
    .await;
    let checks_before = metric(admin, "walcast_rls_checks_total").await;
    // 100 rows in one transaction, owners alternating.
    stack
        .client
        .batch_execute("INSERT INTO private SELECT i, CASE WHEN i % 2 = 0 THEN 'u2' ELSE 'u1' END FROM generate_series(1, 100) i")
        .await
        .expect("insert");
    let events = gateway.wait_events(100).await;
    let order: Vec<(i64, String)> = events
        .iter()
        .map(|e| {
            (
                e["data"]["record"]["id"].as_i64().expect("id"),
                e["ids"][0].as_str().expect("id").to_owned(),
            )
        })
        .collect();
    let expected: Vec<(i64, String)> = (1..=100)
        .map(|i| (i, if i % 2 == 0 { "u2" } else { "u1" }.to_owned()))
        .collect();
    assert_eq!(order, expected, "each row to its owner only, in WAL order");
    let checks = metric(admin, "walcast_rls_checks_total").await - checks_before;
    assert!(
        (1.0..=2.0).contains(&checks),
        "{checks} RLS calls for 100 changes: they are batched\n{}",
        daemon.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn indexed_equality_filters_find_exactly_their_subscribers() {
    let (stack, _daemon, mut gateway) = start().await;
    stack
        .client
        .batch_execute("CREATE TABLE owned (id int PRIMARY KEY, owner numeric); GRANT SELECT ON owned TO authenticated; ALTER PUBLICATION supabase_realtime ADD TABLE owned;")
        .await
        .expect("table");
    const SUBSCRIBERS: usize = 200;
    for i in 0..SUBSCRIBERS {
        // `eq` on a numeric: 7 and 7.0 are the same value; the index must agree.
        gateway
            .subscribe(filtered(
                &format!("o{i}"),
                "owned",
                "*",
                &format!("owner=eq.{i}.0"),
            ))
            .await;
    }
    gateway
        .subscribe(filtered("pair", "owned", "INSERT", "owner=in.(3,5)"))
        .await;
    for i in 0..SUBSCRIBERS {
        assert_eq!(
            gateway.reply(&format!("o{i}"), 0).await["type"],
            "subscribed"
        );
    }
    assert_eq!(gateway.reply("pair", 0).await["type"], "subscribed");
    stack
        .client
        .batch_execute("INSERT INTO owned SELECT i, i % 10 FROM generate_series(1, 30) i; INSERT INTO owned VALUES (100, 1000), (101, NULL);")
        .await
        .expect("insert");
    let events = settled(&stack, &mut gateway).await;
    assert_eq!(events.len(), 30, "rows 100 and 101 match no subscriber");
    for event in &events {
        let id = event["data"]["record"]["id"].as_i64().expect("id");
        let owner = id % 10;
        let mut expected = vec![format!("o{owner}")];
        if owner == 3 || owner == 5 {
            expected.push("pair".to_owned());
        }
        let mut got: Vec<String> = event["ids"]
            .as_array()
            .expect("ids")
            .iter()
            .map(|v| v.as_str().expect("id").to_owned())
            .collect();
        got.sort();
        expected.sort();
        assert_eq!(got, expected, "row {id}");
    }
}
