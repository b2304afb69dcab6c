//! The gateway's limits, health, metrics and JWT options against a real
//! `walcast gateway` process and Redis: Supabase's refusal frames and
//! HTTP answers compared exactly.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use futures_util::StreamExt;
use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

use crate::gateway::{Client, FRAME_TIMEOUT, Gateway, SECRET, now, valid};
use crate::support::{Daemon, TestRedis, eventually};

/// How long something the gateway is about to do may take.
const WAIT: Duration = Duration::from_secs(20);

/// The value of `series` (name and labels) in a `/metrics` text.
fn value(metrics: &str, series: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// Waits until every series has exactly its value, then returns the scrape.
async fn metrics_reach(gateway: &Gateway, expected: &[(&str, f64)]) -> String {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (status, content_type, body) = gateway.get("/metrics").await;
        assert_eq!(
            (status, content_type.as_str()),
            (200, "text/plain; version=0.0.4; charset=utf-8")
        );
        let got: Vec<_> = expected
            .iter()
            .map(|(series, _)| (*series, value(&body, series)))
            .collect();
        if got
            .iter()
            .zip(expected)
            .all(|((_, v), (_, want))| *v == Some(*want))
        {
            return body;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("metrics never reached {expected:?}; last {got:?}\n{body}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `phx_join` of `topic` (vsn 2.0.0) with `payload`, refs `n`.
fn join(n: u32, topic: &str, payload: &str) -> String {
    format!(r#"["{n}","{n}","{topic}","phx_join",{payload}]"#)
}

const NO_BINDINGS_OK: &str = r#"{"status":"ok","response":{"postgres_changes":[]}}"#;

/// The reply a join without bindings gets.
fn joined(n: u32, topic: &str) -> String {
    format!(r#"["{n}","{n}","{topic}","phx_reply",{NO_BINDINGS_OK}]"#)
}

/// The error reply of a refused join.
fn refused_join(n: u32, topic: &str, reason: &str) -> String {
    format!(
        r#"["{n}","{n}","{topic}","phx_reply",{{"status":"error","response":{{"reason":{}}}}}]"#,
        Value::from(reason)
    )
}

/// The end of a socket the server closes: its close frame's code and
/// reason, then nothing.
async fn closed_by_server(client: &mut Client) -> (u16, String) {
    match tokio::time::timeout(FRAME_TIMEOUT, client.ws.next())
        .await
        .expect("a close frame in time")
    {
        Some(Ok(Message::Close(Some(frame)))) => (u16::from(frame.code), frame.reason.to_string()),
        other => panic!("expected a close frame, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_max_concurrent_users_get_429_until_one_closes() {
    let redis = TestRedis::start();
    let gateway = Gateway::spawn_with(
        &redis.url(),
        &[("WALCAST_MAX_CONCURRENT_USERS", "2".into())],
    )
    .await;
    let mut first = gateway.connect(Some("2.0.0")).await;
    let mut second = gateway.connect(None).await;
    assert_eq!(
        gateway.refused(&valid("anon")).await,
        (429, r#"{"error":"Too many connected users"}"#.to_owned())
    );
    // The token is checked first, as Supabase does.
    assert_eq!(
        gateway.refused("garbage").await,
        (
            403,
            r#"{"error":"The token provided is not a valid JWT"}"#.to_owned()
        )
    );
    // The two admitted sockets work.
    first.sync(true, "1").await;
    second.sync(false, "2").await;
    // Once one closes, its place is free again (the gauge counts places).
    first.ws.close(None).await.expect("close");
    while let Some(Ok(_)) = first.ws.next().await {}
    metrics_reach(&gateway, &[("walcast_gateway_sockets", 1.0)]).await;
    let mut third = gateway.connect(Some("2.0.0")).await;
    third.sync(true, "3").await;
    metrics_reach(
        &gateway,
        &[
            (
                "walcast_gateway_connections_refused_total{reason=\"ConnectionRateLimitReached\"}",
                1.0,
            ),
            (
                "walcast_gateway_connections_refused_total{reason=\"MalformedJWT\"}",
                1.0,
            ),
            ("walcast_gateway_sockets", 2.0),
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joins_over_max_channels_per_client_get_channel_rate_limit_reached() {
    let redis = TestRedis::start();
    let gateway = Gateway::spawn_with(
        &redis.url(),
        &[("WALCAST_MAX_CHANNELS_PER_CLIENT", "2".into())],
    )
    .await;
    let mut client = gateway.connect(Some("2.0.0")).await;
    client.send(&join(1, "realtime:a", "{}")).await;
    assert_eq!(client.recv_text().await, joined(1, "realtime:a"));
    client.send(&join(2, "realtime:b", "{}")).await;
    assert_eq!(client.recv_text().await, joined(2, "realtime:b"));
    client.send(&join(3, "realtime:c", "{}")).await;
    assert_eq!(
        client.recv_text().await,
        refused_join(
            3,
            "realtime:c",
            "ChannelRateLimitReached: Too many channels"
        )
    );
    // Joining a joined topic again replaces that channel: not one more.
    client.send(&join(4, "realtime:a", "{}")).await;
    assert_eq!(
        client.recv_text().await,
        r#"["1","1","realtime:a","phx_close",{}]"#
    );
    assert_eq!(client.recv_text().await, joined(4, "realtime:a"));
    // After a leave there is room again; the socket stayed open throughout.
    client
        .send(r#"["2","5","realtime:b","phx_leave",{}]"#)
        .await;
    assert_eq!(
        client.recv_text().await,
        r#"["2","5","realtime:b","phx_reply",{"status":"ok","response":{}}]"#
    );
    assert_eq!(
        client.recv_text().await,
        r#"["2","2","realtime:b","phx_close",{}]"#
    );
    client.send(&join(6, "realtime:c", "{}")).await;
    assert_eq!(client.recv_text().await, joined(6, "realtime:c"));
    client.sync(true, "7").await;
    metrics_reach(
        &gateway,
        &[
            (
                "walcast_gateway_joins_refused_total{reason=\"ChannelRateLimitReached\"}",
                1.0,
            ),
            ("walcast_gateway_channels", 2.0),
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joins_over_max_joins_per_second_are_refused_and_the_socket_disconnected() {
    let redis = TestRedis::start();
    let gateway = Gateway::spawn_with(
        &redis.url(),
        &[("WALCAST_MAX_JOINS_PER_SECOND", "1".into())],
    )
    .await;
    let mut client = gateway.connect(Some("2.0.0")).await;
    client.send(&join(1, "realtime:a", "{}")).await;
    assert_eq!(client.recv_text().await, joined(1, "realtime:a"));
    // The second join within the second: the reply, then Supabase's
    // disconnect (a normal close without a reason).
    client.send(&join(2, "realtime:b", "{}")).await;
    assert_eq!(
        client.recv_text().await,
        refused_join(
            2,
            "realtime:b",
            "ClientJoinRateLimitReached: Too many joins per second"
        )
    );
    assert_eq!(closed_by_server(&mut client).await, (1000, String::new()));
    // While the rate is spent, new sockets are refused before the upgrade.
    assert_eq!(
        gateway.refused(&valid("anon")).await,
        (429, r#"{"error":"Too many joins per second"}"#.to_owned())
    );
    // A second later the bucket has a join again.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let mut again = gateway.connect(Some("2.0.0")).await;
    again.send(&join(1, "realtime:b", "{}")).await;
    assert_eq!(again.recv_text().await, joined(1, "realtime:b"));
    metrics_reach(
        &gateway,
        &[
            (
                "walcast_gateway_joins_refused_total{reason=\"ClientJoinRateLimitReached\"}",
                1.0,
            ),
            (
                "walcast_gateway_connections_refused_total{reason=\"JoinsRateLimitReached\"}",
                1.0,
            ),
            ("walcast_gateway_sockets", 1.0),
            ("walcast_gateway_channels", 1.0),
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_follows_the_bus_and_metrics_count_sockets_joins_and_frames() {
    let mut redis = TestRedis::start();
    let gateway = Gateway::spawn(&redis.url()).await;
    assert_eq!(
        gateway.get("/health").await,
        (
            200,
            "application/json".to_owned(),
            r#"{"status":"ok","redis":"up"}"#.to_owned()
        )
    );
    let mut client = gateway.connect(Some("2.0.0")).await;
    client
        .send(&join(
            1,
            "realtime:room1",
            r#"{"config":{"postgres_changes":[{"event":"*","schema":"public","table":"todos"}]}}"#,
        ))
        .await;
    assert_eq!(client.recv().await[4]["status"], "ok");
    client.send(&join(2, "realtime:", "{}")).await;
    assert_eq!(
        client.recv_text().await,
        refused_join(
            2,
            "realtime:",
            "TopicNameRequired: You must provide a topic name"
        )
    );
    client.sync(true, "3").await;
    // Three frames went out: the join reply, the refusal, the heartbeat reply.
    let scrape = metrics_reach(
        &gateway,
        &[
            ("walcast_gateway_sockets", 1.0),
            ("walcast_gateway_channels", 1.0),
            ("walcast_gateway_frames_sent_total", 3.0),
            (
                "walcast_gateway_joins_refused_total{reason=\"TopicNameRequired\"}",
                1.0,
            ),
            (
                "walcast_gateway_joins_refused_total{reason=\"ChannelRateLimitReached\"}",
                0.0,
            ),
            (
                "walcast_gateway_joins_refused_total{reason=\"ClientJoinRateLimitReached\"}",
                0.0,
            ),
            ("walcast_gateway_slow_sockets_closed_total", 0.0),
            ("walcast_gateway_bus_reconnects_total", 0.0),
        ],
    )
    .await;
    for help in [
        "# TYPE walcast_gateway_sockets gauge",
        "# TYPE walcast_gateway_frames_sent_total counter",
        "# HELP walcast_gateway_bus_reconnects_total bus connections to redis established again after a loss",
    ] {
        assert!(
            scrape.lines().any(|l| l == help),
            "no {help:?} in\n{scrape}"
        );
    }
    // Redis goes away: 503. It comes back (empty): 200, one reconnect, and
    // the channel's subscription is registered again.
    redis.stop();
    let down = (
        503,
        "application/json".to_owned(),
        r#"{"status":"unavailable","redis":"down"}"#.to_owned(),
    );
    eventually("/health answers 503", WAIT, || async {
        gateway.get("/health").await == down
    })
    .await;
    redis.start_again();
    eventually("/health answers 200 again", WAIT, || async {
        gateway.get("/health").await.0 == 200
    })
    .await;
    metrics_reach(
        &gateway,
        &[
            ("walcast_gateway_bus_reconnects_total", 1.0),
            ("walcast_gateway_sockets", 1.0),
            ("walcast_gateway_channels", 1.0),
        ],
    )
    .await;
    eventually("the subscription registered again", WAIT, || async {
        gateway.registry().await.len() == 1
    })
    .await;
    client.sync(true, "4").await;
}

/// A token signed with the gateway's secret carrying `claims`.
fn hs256(claims: &Value) -> String {
    encode(
        &Header::default(),
        claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .expect("sign")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claim_validators_admit_exact_matches_and_refuse_the_rest_as_supabase_does() {
    let redis = TestRedis::start();
    let gateway = Gateway::spawn_with(
        &redis.url(),
        &[(
            "WALCAST_JWT_CLAIM_VALIDATORS",
            r#"{"iss":"supabase","aud":"authenticated"}"#.into(),
        )],
    )
    .await;
    let exp = now() + 3600;
    let good = hs256(
        &json!({"role": "authenticated", "exp": exp, "iss": "supabase", "aud": "authenticated", "sub": "u1"}),
    );
    let evil =
        hs256(&json!({"role": "authenticated", "exp": exp, "iss": "evil", "aud": "authenticated"}));
    let no_aud = hs256(&json!({"role": "anon", "exp": exp, "iss": "supabase"}));
    let unknown = (
        500,
        r#"{"error":"Error connecting to Realtime"}"#.to_owned(),
    );
    assert_eq!(gateway.refused(&evil).await, unknown);
    assert_eq!(gateway.refused(&no_aud).await, unknown);
    let mut client = gateway.connect_with(&good, Some("2.0.0")).await;
    let with_token = |token: &str| format!(r#"{{"config":{{}},"access_token":"{token}"}}"#);
    client
        .send(&join(1, "realtime:ok", &with_token(&good)))
        .await;
    assert_eq!(client.recv_text().await, joined(1, "realtime:ok"));
    client
        .send(&join(2, "realtime:evil", &with_token(&evil)))
        .await;
    assert_eq!(
        client.recv_text().await,
        refused_join(2, "realtime:evil", "Unknown Error on Channel")
    );
    client
        .send(&join(3, "realtime:aud", &with_token(&no_aud)))
        .await;
    assert_eq!(
        client.recv_text().await,
        refused_join(3, "realtime:aud", "Unknown Error on Channel")
    );
    // A refreshed token that fails: Joken's error as Supabase prints it,
    // then the channel closes.
    client
        .send(&format!(
            r#"["1","4","realtime:ok","access_token",{{"access_token":"{evil}"}}]"#
        ))
        .await;
    assert_eq!(
        client.recv_text().await,
        r#"["1",null,"realtime:ok","system",{"channel":"ok","extension":"system","message":"[message: \"Invalid token\", claim: \"iss\", claim_val: \"evil\"]","status":"error"}]"#
    );
    assert_eq!(
        client.recv_text().await,
        r#"["1","1","realtime:ok","phx_close",{}]"#
    );
    client.sync(true, "5").await;
    // The gateway's log names the claim the client was not told about.
    let log = gateway.process.log();
    assert!(
        log.contains(
            r#"claim `iss` is "evil", not the required "supabase" (jwt_claim_validators)"#
        ) && log.contains(
            r#"claim `aud` is nil, not the required "authenticated" (jwt_claim_validators)"#
        ),
        "{log}"
    );
    metrics_reach(
        &gateway,
        &[
            (
                "walcast_gateway_joins_refused_total{reason=\"UnknownErrorOnChannel\"}",
                2.0,
            ),
            (
                "walcast_gateway_connections_refused_total{reason=\"UnknownErrorOnChannel\"}",
                2.0,
            ),
            ("walcast_gateway_channels", 0.0),
        ],
    )
    .await;
}

/// Runs `openssl` with `args` in `dir`; panics with its stderr on failure.
fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A new RSA key (PKCS#1 DER, as jsonwebtoken signs with it).
fn rsa_key(dir: &Path, name: &str) -> EncodingKey {
    let pem = format!("{name}.pem");
    let der = format!("{name}.der");
    openssl(dir, &["genrsa", "-traditional", "-out", &pem, "2048"]);
    openssl(
        dir,
        &[
            "rsa",
            "-traditional",
            "-in",
            &pem,
            "-outform",
            "DER",
            "-out",
            &der,
        ],
    );
    EncodingKey::from_rsa_der(&std::fs::read(dir.join(der)).expect("read der"))
}

/// A new P-256 key (PKCS#8 DER, as jsonwebtoken signs with it; genpkey's
/// own DER is SEC1).
fn ec_key(dir: &Path, name: &str) -> EncodingKey {
    let pem = format!("{name}.pem");
    let der = format!("{name}.der");
    openssl(
        dir,
        &[
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-out",
            &pem,
        ],
    );
    openssl(
        dir,
        &[
            "pkcs8", "-topk8", "-nocrypt", "-in", &pem, "-outform", "DER", "-out", &der,
        ],
    );
    EncodingKey::from_ec_der(&std::fs::read(dir.join(der)).expect("read der"))
}

/// The public JWK of `key` with `kid`.
fn public_jwk(key: &EncodingKey, alg: Algorithm, kid: &str) -> Jwk {
    let mut jwk = Jwk::from_encoding_key(key, alg).expect("public jwk");
    jwk.common.key_id = Some(kid.to_owned());
    jwk
}

/// A token signed with `key` as `alg`, its header naming `kid`.
fn signed(alg: Algorithm, kid: Option<&str>, key: &EncodingKey) -> String {
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_owned);
    let claims = json!({"role": "authenticated", "exp": now() + 3600, "sub": "u1"});
    encode(&header, &claims, key).expect("sign")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwks_signed_tokens_are_accepted_and_unknown_kids_refused() {
    let dir = tempfile::tempdir().expect("temp dir");
    let rsa = rsa_key(dir.path(), "rsa");
    let ec = ec_key(dir.path(), "ec");
    let stranger = rsa_key(dir.path(), "stranger");
    let jwks = JwkSet {
        keys: vec![
            public_jwk(&rsa, Algorithm::RS256, "rsa-1"),
            public_jwk(&ec, Algorithm::ES256, "ec-1"),
        ],
    };
    let jwks_path = dir.path().join("jwks.json");
    std::fs::write(&jwks_path, serde_json::to_string(&jwks).expect("jwks json"))
        .expect("write jwks");
    let redis = TestRedis::start();
    let gateway = Gateway::spawn_with(
        &redis.url(),
        &[("WALCAST_JWT_JWKS", jwks_path.display().to_string())],
    )
    .await;
    let rs256 = signed(Algorithm::RS256, Some("rsa-1"), &rsa);
    let es256 = signed(Algorithm::ES256, Some("ec-1"), &ec);
    let wrong_kid = signed(Algorithm::RS256, Some("rsa-2"), &rsa);
    let no_kid = signed(Algorithm::RS256, None, &rsa);
    let forged = signed(Algorithm::RS256, Some("rsa-1"), &stranger);
    let unknown_kid = r#"Failed to generate JWT signer for key ID (kid) "rsa-2", check your JWT secret or JWKS configuration"#;
    assert_eq!(
        gateway.refused(&wrong_kid).await,
        (401, json!({ "error": unknown_kid }).to_string())
    );
    assert_eq!(
        gateway.refused(&forged).await,
        (
            403,
            r#"{"error":"Failed to validate JWT signature"}"#.to_owned()
        )
    );
    // An RS256 token as the socket's apikey; ES256 and the HS256 secret
    // for joins.
    let mut client = gateway.connect_with(&rs256, Some("2.0.0")).await;
    let with_token = |token: &str| format!(r#"{{"config":{{}},"access_token":"{token}"}}"#);
    client.send(&join(1, "realtime:rs", "{}")).await;
    assert_eq!(client.recv_text().await, joined(1, "realtime:rs"));
    // The ES256 token's claims go to the bus with the subscription.
    client
        .send(&join(
            2,
            "realtime:es",
            &format!(
                r#"{{"config":{{"postgres_changes":[{{"event":"*","schema":"public","table":"todos"}}]}},"access_token":"{es256}"}}"#
            ),
        ))
        .await;
    assert_eq!(client.recv().await[4]["status"], "ok");
    client
        .send(&join(3, "realtime:hs", &with_token(&valid("anon"))))
        .await;
    assert_eq!(client.recv_text().await, joined(3, "realtime:hs"));
    client
        .send(&join(4, "realtime:kid", &with_token(&wrong_kid)))
        .await;
    assert_eq!(
        client.recv_text().await,
        refused_join(4, "realtime:kid", &format!("JwtSignerError: {unknown_kid}"))
    );
    client
        .send(&join(5, "realtime:nokid", &with_token(&no_kid)))
        .await;
    assert_eq!(
        client.recv_text().await,
        refused_join(
            5,
            "realtime:nokid",
            "JwtSignerError: Failed to generate JWT signer, check your JWT secret or JWKS configuration"
        )
    );
    eventually("the ES256 channel's subscription", WAIT, || async {
        gateway.registry().await.len() == 1
    })
    .await;
    let (_, subscription) = &gateway.registry().await[0];
    assert_eq!(
        (&subscription["role"], &subscription["claims"]["sub"]),
        (&json!("authenticated"), &json!("u1"))
    );
    client.sync(true, "6").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_jwt_settings_stop_the_gateway_at_start_naming_the_key() {
    for (name, value, message) in [
        (
            "WALCAST_JWT_JWKS",
            r#"{"keys":[{"kty":"oct","k":"YQ"}]}"#,
            "walcast: invalid value for `jwt_jwks` (from environment variable WALCAST_JWT_JWKS): key 0 has no \"kid\": tokens are matched to keys by the kid in their header",
        ),
        (
            "WALCAST_JWT_CLAIM_VALIDATORS",
            "[\"iss\"]",
            "walcast: invalid value for `jwt_claim_validators` (from environment variable WALCAST_JWT_CLAIM_VALIDATORS): expected a JSON object of claims and the values they must have, e.g. {\"iss\":\"supabase\",\"aud\":\"authenticated\"}",
        ),
    ] {
        let env = [
            ("WALCAST_JWT_SECRET", SECRET.to_owned()),
            ("WALCAST_GATEWAY_ADDR", "127.0.0.1:1".to_owned()),
            (name, value.to_owned()),
        ];
        let mut gateway = Daemon::spawn(&["gateway"], &env);
        let status = gateway
            .wait_timeout(WAIT)
            .unwrap_or_else(|| panic!("the gateway did not exit\n{}", gateway.log()));
        assert_eq!(status.code(), Some(2), "{}", gateway.log());
        assert_eq!(gateway.log().trim_end(), message);
    }
}
