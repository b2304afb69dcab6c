//! The load client of the Broadcast and Presence benchmarks (`bench/run
//! --only broadcast,presence`, `bench/walcast_bench/rooms.py`): many
//! WebSocket sockets (vsn 2.0.0, as realtime-js) on one topic, spread over
//! one or more gateways, counting what they receive and how late.
//!
//! `--mode broadcast`: every socket joins `realtime:<topic>` for
//! broadcasts. Commands on stdin, one per line:
//!
//! - `phase NAME`: count afresh;
//! - `send K RATE`: a sender socket (on the first gateway, joined like the
//!   others but not counted) sends K broadcasts as realtime-js does (binary
//!   kind 3, JSON payload `{"t":<send time µs>}`), RATE per second (0: as
//!   fast as it can write);
//! - `expect K`: wait until every open socket received K broadcasts since
//!   `phase` (or nothing arrives for `--stall-seconds`), then print the
//!   phase: counts, first send and last receive times, latency quantiles
//!   (receive time − send time, 100 µs buckets).
//!
//! `--mode presence`: every socket joins with presence enabled under key
//! `s<index>` and keeps the set of keys its `presence_state` and
//! `presence_diff`s show. Commands: `track` (every socket tracks
//! `{"i":<index>}`), `keys K` (wait until every open socket shows exactly
//! K keys, print how long it took), `alive` (print how many sockets are
//! still open).
//!
//! `--mode private`: socket `i` joins the private channel
//! `realtime:<topic>:<i mod --topics>` with its own token (`authenticated`,
//! `sub` `u<i>`, `room` `<i mod --topics>`), as the private-channel
//! benchmark's policy expects; the messages come from `realtime.send`
//! (their payload's `t` is the insert time, µs). Command `total N`: wait
//! until the sockets received N messages in all since `phase` (or nothing
//! arrives for `--stall-seconds`), then print the phase.
//!
//! Everything goes to stdout as one JSON object per line (`"event"`:
//! `ready`, `progress`, `phase`, `keys`, `alive`); errors go to stderr
//! with exit code 1. End of stdin closes the sockets.

#[path = "common/load.rs"]
mod load;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow, bail};
use clap::{Parser, ValueEnum};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio::sync::{Semaphore, mpsc};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_util::sync::CancellationToken;

use self::load::{Histogram, commands, emit, now_us, run_on, sign};

/// A heartbeat this often keeps the gateway's 60 s idle timeout away.
const HEARTBEAT: Duration = Duration::from_secs(25);

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    Broadcast,
    Presence,
    Private,
}

#[derive(Parser, Debug)]
#[command(
    about = "Broadcast and Presence load client for walcast gateway (see bench/walcast_bench/rooms.py)"
)]
struct Args {
    /// The gateways' addresses; sockets are spread over them in turn.
    #[arg(long, required = true)]
    addr: Vec<SocketAddr>,
    /// The gateways' JWT secret (HS256).
    #[arg(long, env = "ROOM_JWT_SECRET", hide_env_values = true)]
    secret: String,
    /// Sockets to open.
    #[arg(long)]
    sockets: usize,
    /// Channel name (the topic is `realtime:<topic>`).
    #[arg(long, default_value = "room")]
    topic: String,
    /// What the sockets do.
    #[arg(long, value_enum)]
    mode: Mode,
    /// `--mode private`: the sockets spread over this many topics.
    #[arg(long, default_value_t = 1)]
    topics: usize,
    /// Sockets connecting and joining at the same time.
    #[arg(long, default_value_t = 128)]
    connect_concurrency: usize,
    /// `expect` and `keys` give up when nothing changes for this long.
    #[arg(long, default_value_t = 60)]
    stall_seconds: u64,
    /// Runtime worker threads.
    #[arg(long, default_value_t = 2)]
    threads: usize,
}

/// What the sockets count, reset at each `phase`.
struct Stats {
    messages: AtomicU64,
    first_send_us: AtomicU64,
    last_recv_us: AtomicU64,
    latency_max_us: AtomicU64,
    latencies: Histogram,
    per_socket: Vec<AtomicU32>,
    /// Presence keys each socket shows.
    keys: Vec<AtomicU32>,
    /// Per socket: 0 open, else the close code (1006 when none was sent).
    closed: Vec<AtomicU32>,
}

impl Stats {
    fn new(sockets: usize) -> Stats {
        let stats = Stats {
            messages: AtomicU64::new(0),
            first_send_us: AtomicU64::new(u64::MAX),
            last_recv_us: AtomicU64::new(0),
            latency_max_us: AtomicU64::new(0),
            latencies: Histogram::new(),
            per_socket: (0..sockets).map(|_| AtomicU32::new(0)).collect(),
            keys: (0..sockets).map(|_| AtomicU32::new(0)).collect(),
            closed: (0..sockets).map(|_| AtomicU32::new(0)).collect(),
        };
        stats.reset();
        stats
    }

    fn reset(&self) {
        for counter in [&self.messages, &self.last_recv_us, &self.latency_max_us] {
            counter.store(0, Ordering::Relaxed);
        }
        self.first_send_us.store(u64::MAX, Ordering::Relaxed);
        self.latencies.reset();
        for c in &self.per_socket {
            c.store(0, Ordering::Relaxed);
        }
    }

    fn record(&self, socket: usize, sent_us: u64, now_us: u64) {
        self.per_socket[socket].fetch_add(1, Ordering::Relaxed);
        self.messages.fetch_add(1, Ordering::Relaxed);
        self.first_send_us.fetch_min(sent_us, Ordering::Relaxed);
        self.last_recv_us.fetch_max(now_us, Ordering::Relaxed);
        let latency = now_us.saturating_sub(sent_us);
        self.latency_max_us.fetch_max(latency, Ordering::Relaxed);
        self.latencies.record(latency);
    }

    fn open(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.closed.len()).filter(|&i| self.closed[i].load(Ordering::Relaxed) == 0)
    }
}

struct Shared {
    stats: Stats,
    joined: AtomicUsize,
    failure: std::sync::Mutex<Option<String>>,
    /// Every socket's command channel (presence: `track`).
    tracks: Vec<mpsc::UnboundedSender<()>>,
    shutdown: CancellationToken,
}

impl Shared {
    fn fail(&self, message: String) {
        let mut failure = self.failure.lock().unwrap_or_else(|e| e.into_inner());
        failure.get_or_insert(message);
    }
}

type Ws = WebSocketStream<TcpStream>;

fn token(secret: &str) -> Result<String> {
    let exp = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs() + 24 * 3600;
    sign(
        secret,
        &json!({"role": "anon", "exp": exp, "sub": "room-bench"}),
    )
}

/// Connects to `addr` and joins `topic` with `config`; returns once the
/// join was answered ok.
async fn open(addr: SocketAddr, token: &str, topic: &str, config: &Value) -> Result<Ws> {
    let stream = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    stream.set_nodelay(true)?;
    let url = format!("ws://{addr}/realtime/v1/websocket?apikey={token}&vsn=2.0.0");
    let config_ws = WebSocketConfig::default().read_buffer_size(16 * 1024);
    let (mut ws, _) = tokio_tungstenite::client_async_with_config(url, stream, Some(config_ws))
        .await
        .context("WebSocket handshake")?;
    let join = json!(["1", "1", format!("realtime:{topic}"), "phx_join", {"config": config}]);
    ws.send(Message::text(join.to_string())).await?;
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(text))) if text.contains(r#""phx_reply""#) => {
                if text.contains(r#"{"status":"ok""#) {
                    return Ok(ws);
                }
                bail!("join refused: {}", text.as_str());
            }
            Some(Ok(Message::Close(frame))) => bail!("closed while joining: {frame:?}"),
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(e).context("reading the join reply"),
            None => bail!("connection closed while joining"),
        }
    }
}

/// Socket `index`'s own token in private mode: its `sub` and `room`.
fn private_token(secret: &str, index: usize, topics: usize) -> Result<String> {
    let exp = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs() + 24 * 3600;
    sign(
        secret,
        &json!({"role": "authenticated", "exp": exp, "sub": format!("u{index}"),
                "room": (index % topics.max(1)).to_string()}),
    )
}

fn config(mode: Mode, index: usize) -> Value {
    match mode {
        Mode::Private => json!({"broadcast": {"self": false, "ack": false},
                                "presence": {"key": "", "enabled": false},
                                "postgres_changes": [], "private": true}),
        Mode::Broadcast => json!({"broadcast": {"self": false, "ack": false},
                                  "presence": {"key": "", "enabled": false},
                                  "postgres_changes": [], "private": false}),
        Mode::Presence => json!({"broadcast": {"self": false, "ack": false},
                                 "presence": {"key": format!("s{index}"), "enabled": true},
                                 "postgres_changes": [], "private": false}),
    }
}

/// The `t` of a kind 4 broadcast's `{"t":…}` payload.
fn sent_at(frame: &[u8]) -> Option<u64> {
    const KEY: &[u8] = b"{\"t\":";
    let at = frame.windows(KEY.len()).rposition(|w| w == KEY)? + KEY.len();
    // jsonb's text (realtime.send) puts a space after the colon.
    let at = at + usize::from(frame.get(at) == Some(&b' '));
    let digits = frame[at..].iter().take_while(|b| b.is_ascii_digit());
    let mut n = 0u64;
    for d in digits {
        n = n * 10 + u64::from(d - b'0');
    }
    Some(n)
}

/// Applies a presence frame to `keys`.
fn apply_presence(text: &str, keys: &mut HashSet<String>) {
    let Ok(Value::Array(frame)) = serde_json::from_str::<Value>(text) else {
        return;
    };
    match (frame.get(3).and_then(Value::as_str), frame.get(4)) {
        (Some("presence_state"), Some(Value::Object(state))) => {
            keys.clear();
            keys.extend(state.keys().cloned());
        }
        (Some("presence_diff"), Some(diff)) => {
            if let Some(joins) = diff["joins"].as_object() {
                keys.extend(joins.keys().cloned());
            }
            if let Some(leaves) = diff["leaves"].as_object() {
                for key in leaves.keys() {
                    keys.remove(key);
                }
            }
        }
        _ => {}
    }
}

async fn socket_task(
    index: usize,
    args: Arc<Args>,
    shared: Arc<Shared>,
    permits: Arc<Semaphore>,
    token: Arc<String>,
    mut track: mpsc::UnboundedReceiver<()>,
) {
    let addr = args.addr[index % args.addr.len()];
    let (token, topic) = if args.mode == Mode::Private {
        match private_token(&args.secret, index, args.topics) {
            Ok(token) => (
                Arc::new(token),
                format!("{}:{}", args.topic, index % args.topics.max(1)),
            ),
            Err(e) => {
                shared.fail(format!("socket {index}: {e:#}"));
                return;
            }
        }
    } else {
        (token, args.topic.clone())
    };
    let opened = async {
        let _permit = permits.acquire().await?;
        open(addr, &token, &topic, &config(args.mode, index)).await
    };
    let mut ws = match opened.await {
        Ok(ws) => ws,
        Err(e) => {
            shared.fail(format!("socket {index}: {e:#}"));
            return;
        }
    };
    shared.joined.fetch_add(1, Ordering::Relaxed);
    let topic = format!("realtime:{topic}");
    let mut keys: HashSet<String> = HashSet::new();
    let mut heartbeat =
        tokio::time::interval_at(tokio::time::Instant::now() + HEARTBEAT, HEARTBEAT);
    let mut refs = 1u64;
    let code = loop {
        tokio::select! {
            biased;
            () = shared.shutdown.cancelled() => break None,
            received = ws.next() => match received {
                Some(Ok(Message::Binary(bytes))) => {
                    if bytes.first() == Some(&4)
                        && let Some(sent) = sent_at(&bytes)
                    {
                        shared.stats.record(index, sent, now_us());
                    }
                }
                Some(Ok(Message::Text(text))) => {
                    if text.contains(r#""presence_"#) {
                        apply_presence(text.as_str(), &mut keys);
                        shared.stats.keys[index].store(keys.len() as u32, Ordering::Relaxed);
                    }
                }
                Some(Ok(Message::Close(frame))) => break Some(frame.map_or(1005, |f| u16::from(f.code))),
                Some(Ok(_)) => {}
                Some(Err(_)) | None => break Some(1006),
            },
            Some(()) = track.recv() => {
                refs += 1;
                let frame = json!(["1", refs.to_string(), topic, "presence",
                                   {"type": "presence", "event": "track", "payload": {"i": index}}]);
                if ws.send(Message::text(frame.to_string())).await.is_err() {
                    break Some(1006);
                }
            }
            _ = heartbeat.tick() => {
                refs += 1;
                let frame = format!(r#"[null,"hb{refs}","phoenix","heartbeat",{{}}]"#);
                if ws.send(Message::text(frame)).await.is_err() {
                    break Some(1006);
                }
            }
        }
    };
    match code {
        Some(code) => shared.stats.closed[index].store(u32::from(code), Ordering::Relaxed),
        None => {
            let _ = tokio::time::timeout(Duration::from_secs(2), ws.close(None)).await;
        }
    }
}

/// realtime-js's binary push of a broadcast (kind 3, JSON payload).
fn push(reference: &str, topic: &str, payload: &str) -> Vec<u8> {
    let (join_ref, event) = ("1", "b");
    let mut frame = vec![
        3,
        join_ref.len() as u8,
        reference.len() as u8,
        topic.len() as u8,
        event.len() as u8,
        0,
        1,
    ];
    for part in [join_ref, reference, topic, event, payload] {
        frame.extend_from_slice(part.as_bytes());
    }
    frame
}

/// Sends `count` broadcasts at `rate` per second (0: as fast as it can).
async fn send(sender: &mut Ws, topic: &str, count: u64, rate: f64) -> Result<f64> {
    let topic = format!("realtime:{topic}");
    let started = Instant::now();
    for i in 0..count {
        if rate > 0.0 {
            let due = started + Duration::from_secs_f64(i as f64 / rate);
            tokio::time::sleep_until(due.into()).await;
        }
        let payload = format!(r#"{{"t":{}}}"#, now_us());
        sender
            .send(Message::binary(push(&format!("s{i}"), &topic, &payload)))
            .await?;
    }
    Ok(started.elapsed().as_secs_f64())
}

async fn expect(shared: &Shared, name: &str, expect: u32, stall: Duration) -> Value {
    let stats = &shared.stats;
    let started = Instant::now();
    let (mut last, mut last_move, mut last_progress) = (0, Instant::now(), Instant::now());
    let complete = loop {
        let got = stats.messages.load(Ordering::Relaxed);
        let owed: u64 = stats
            .open()
            .map(|i| u64::from(expect.saturating_sub(stats.per_socket[i].load(Ordering::Relaxed))))
            .sum();
        if owed == 0 {
            break true;
        }
        if got != last {
            (last, last_move) = (got, Instant::now());
        } else if last_move.elapsed() > stall {
            break false;
        }
        if last_progress.elapsed() > Duration::from_secs(1) {
            last_progress = Instant::now();
            emit(&json!({"event": "progress", "phase": name, "messages": got,
                         "seconds": started.elapsed().as_secs_f64()}));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let counts: Vec<u32> = stats
        .open()
        .map(|i| stats.per_socket[i].load(Ordering::Relaxed))
        .collect();
    let messages = stats.messages.load(Ordering::Relaxed);
    let first_send = stats.first_send_us.load(Ordering::Relaxed);
    json!({
        "event": "phase",
        "phase": name,
        "complete": complete && counts.iter().all(|&n| n == expect),
        "sockets": counts.len(),
        "closed": stats.closed.len() - counts.len(),
        "expected": u64::from(expect) * counts.len() as u64,
        "messages": messages,
        "max_per_socket": counts.iter().max().copied().unwrap_or(0),
        "first_send_us": (first_send != u64::MAX).then_some(first_send),
        "last_recv_us": stats.last_recv_us.load(Ordering::Relaxed),
        "latency_ms": {
            "p50": stats.latencies.quantile_ms(0.50, messages),
            "p99": stats.latencies.quantile_ms(0.99, messages),
            "max": stats.latency_max_us.load(Ordering::Relaxed) as f64 / 1000.0,
        },
    })
}

/// Waits until `want` messages arrived in all (private mode: they are
/// spread over the topics by the sender), then prints the phase.
async fn total(shared: &Shared, name: &str, want: u64, stall: Duration) -> Value {
    let stats = &shared.stats;
    let (mut last, mut last_move) = (0, Instant::now());
    let complete = loop {
        let got = stats.messages.load(Ordering::Relaxed);
        if got >= want {
            break true;
        }
        if got != last {
            (last, last_move) = (got, Instant::now());
        } else if last_move.elapsed() > stall {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let messages = stats.messages.load(Ordering::Relaxed);
    let first_send = stats.first_send_us.load(Ordering::Relaxed);
    json!({
        "event": "phase",
        "phase": name,
        "complete": complete && messages == want,
        "sockets": stats.open().count(),
        "closed": stats.closed.len() - stats.open().count(),
        "expected": want,
        "messages": messages,
        "first_send_us": (first_send != u64::MAX).then_some(first_send),
        "last_recv_us": stats.last_recv_us.load(Ordering::Relaxed),
        "latency_ms": {
            "p50": stats.latencies.quantile_ms(0.50, messages),
            "p99": stats.latencies.quantile_ms(0.99, messages),
            "max": stats.latency_max_us.load(Ordering::Relaxed) as f64 / 1000.0,
        },
    })
}

async fn keys(shared: &Shared, want: u32, stall: Duration) -> Value {
    let stats = &shared.stats;
    let started = Instant::now();
    let (mut last, mut last_move) = (u64::MAX, Instant::now());
    let complete = loop {
        let open: Vec<usize> = stats.open().collect();
        let short = open
            .iter()
            .filter(|&&i| stats.keys[i].load(Ordering::Relaxed) != want)
            .count();
        if short == 0 {
            break true;
        }
        let total: u64 = open
            .iter()
            .map(|&i| u64::from(stats.keys[i].load(Ordering::Relaxed)))
            .sum();
        if total != last {
            (last, last_move) = (total, Instant::now());
        } else if last_move.elapsed() > stall {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let open: Vec<usize> = stats.open().collect();
    json!({
        "event": "keys",
        "want": want,
        "complete": complete,
        "seconds": started.elapsed().as_secs_f64(),
        "sockets": open.len(),
        "min": open.iter().map(|&i| stats.keys[i].load(Ordering::Relaxed)).min(),
        "max": open.iter().map(|&i| stats.keys[i].load(Ordering::Relaxed)).max(),
    })
}

async fn run(args: Args) -> Result<()> {
    if args.sockets == 0 {
        bail!("--sockets must be at least 1");
    }
    let token = Arc::new(token(&args.secret)?);
    let (senders, receivers): (Vec<_>, Vec<_>) =
        (0..args.sockets).map(|_| mpsc::unbounded_channel()).unzip();
    let shared = Arc::new(Shared {
        stats: Stats::new(args.sockets),
        joined: AtomicUsize::new(0),
        failure: std::sync::Mutex::new(None),
        tracks: senders,
        shutdown: CancellationToken::new(),
    });
    let args = Arc::new(args);
    let permits = Arc::new(Semaphore::new(args.connect_concurrency.max(1)));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for (index, track) in receivers.into_iter().enumerate() {
        tasks.spawn(socket_task(
            index,
            args.clone(),
            shared.clone(),
            permits.clone(),
            token.clone(),
            track,
        ));
    }
    while shared.joined.load(Ordering::Relaxed) < args.sockets {
        if let Some(failure) = shared
            .failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
        {
            bail!("{failure}");
        }
        if started.elapsed() > Duration::from_secs(600) {
            bail!("sockets did not join within 600 s");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut sender = match args.mode {
        Mode::Broadcast => {
            Some(open(args.addr[0], &token, &args.topic, &config(args.mode, 0)).await?)
        }
        Mode::Presence | Mode::Private => None,
    };
    emit(&json!({"event": "ready", "sockets": args.sockets,
                 "joined_seconds": started.elapsed().as_secs_f64()}));

    let mut commands = commands();
    let stall = Duration::from_secs(args.stall_seconds);
    let mut phase = String::from("unnamed");
    while let Some(line) = commands.recv().await {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["phase", name] => {
                (*name).clone_into(&mut phase);
                shared.stats.reset();
                emit(&json!({"event": "phase_started", "phase": phase}));
            }
            ["send", count, rate] => {
                let count: u64 = count.parse().map_err(|e| anyhow!("send {count}: {e}"))?;
                let rate: f64 = rate.parse().map_err(|e| anyhow!("send rate {rate}: {e}"))?;
                let Some(sender) = sender.as_mut() else {
                    bail!("send: not in broadcast mode");
                };
                let seconds = send(sender, &args.topic, count, rate).await?;
                emit(&json!({"event": "sent", "count": count, "seconds": seconds}));
            }
            ["expect", k] => {
                let k: u32 = k.parse().map_err(|e| anyhow!("expect {k}: {e}"))?;
                emit(&expect(&shared, &phase, k, stall).await);
            }
            ["track"] => {
                for t in &shared.tracks {
                    let _ = t.send(());
                }
                emit(&json!({"event": "tracking"}));
            }
            ["total", n] => {
                let n: u64 = n.parse().map_err(|e| anyhow!("total {n}: {e}"))?;
                emit(&total(&shared, &phase, n, stall).await);
            }
            ["keys", k] => {
                let k: u32 = k.parse().map_err(|e| anyhow!("keys {k}: {e}"))?;
                emit(&keys(&shared, k, stall).await);
            }
            ["alive"] => emit(&json!({"event": "alive", "open": shared.stats.open().count()})),
            [] => {}
            _ => bail!("unknown command {line:?}"),
        }
    }
    shared.shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    Ok(())
}

fn main() -> Result<()> {
    let args = Args::parse();
    run_on(args.threads, run(args))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn send_times_are_read_from_kind_4_frames() {
        let mut frame = vec![4u8, 12, 1, 0, 1];
        frame.extend_from_slice(br#"realtime:roomb{"t":1733600000123456}"#);
        assert_eq!(sent_at(&frame), Some(1_733_600_000_123_456));
        assert_eq!(
            sent_at(br#"{"t": 1733600000123456, "id": "x"}"#),
            Some(1_733_600_000_123_456)
        );
        assert_eq!(sent_at(b"nothing"), None);
    }

    #[test]
    fn presence_frames_keep_the_key_set() {
        let mut keys = HashSet::new();
        apply_presence(
            r#"["1",null,"realtime:r","presence_state",{"a":{"metas":[]},"b":{"metas":[]}}]"#,
            &mut keys,
        );
        apply_presence(
            r#"[null,null,"realtime:r","presence_diff",{"joins":{"c":{"metas":[]}},"leaves":{"a":{"metas":[]}}}]"#,
            &mut keys,
        );
        let mut sorted: Vec<_> = keys.into_iter().collect();
        sorted.sort();
        assert_eq!(sorted, ["b", "c"]);
    }
}
