//! The load client of the fan-out benchmark (`bench/run --only fanout`,
//! `bench/walcast_bench/fanout.py`): many WebSocket sockets on one
//! channel of `walcast gateway`, each with one `postgres_changes` binding
//! on one table, counting what they receive and how late.
//!
//! It opens `--sockets` sockets (vsn 2.0.0, as supabase-js), joins
//! `realtime:<topic>` on each with an HS256 token it signs itself, and
//! waits until every socket got the `system` "Subscribed to PostgreSQL"
//! message. Then it follows commands on stdin, one per line:
//!
//! - `phase NAME`: start counting afresh (the load comes next);
//! - `expect K`: wait until every open socket received `K`
//!   `postgres_changes` frames since `phase` (or nothing arrives for
//!   `--stall-seconds`), then print the phase's result.
//!
//! End of stdin closes the sockets and ends the client. Everything it has
//! to say goes to stdout as one JSON object per line (`"event"`: `ready`,
//! `progress`, `phase`); errors go to stderr with exit code 1.
//!
//! Latency is the receive time (wall clock) minus the payload's
//! `commit_timestamp`, which Postgres's commit time truncated to the
//! millisecond: a figure can be up to 1 ms above the real latency, never
//! below. The client runs on the same host as Postgres, so both read the
//! same clock.
//!
//! Receiving is kept cheap so the client is not what limits the rate: a
//! frame is recognised and its timestamp found by substring, without
//! parsing the JSON; counts and a latency histogram (100 µs buckets) are
//! shared atomics.

#[path = "common/load.rs"]
mod load;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow, bail};
use clap::Parser;
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::Semaphore;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_util::sync::CancellationToken;

use self::load::{Histogram, commands, emit, now_us, run_on, sign};

/// Sockets per source address: the ephemeral port range holds ~28,000.
const SOCKETS_PER_SOURCE: usize = 20_000;
/// A heartbeat this often keeps the gateway's 60 s idle timeout away.
const HEARTBEAT: Duration = Duration::from_secs(25);
/// The join's ref and join_ref.
const JOIN_REF: &str = "1";

#[derive(Parser, Debug)]
#[command(about = "Fan-out load client for walcast gateway (see bench/walcast_bench/fanout.py)")]
struct Args {
    /// The gateway's address.
    #[arg(long)]
    addr: SocketAddr,
    /// The gateway's JWT secret (HS256).
    #[arg(long, env = "FANOUT_JWT_SECRET", hide_env_values = true)]
    secret: String,
    /// The token's role.
    #[arg(long, default_value = "anon")]
    role: String,
    /// Sockets to open.
    #[arg(long)]
    sockets: usize,
    /// Channel name (the topic is `realtime:<topic>`).
    #[arg(long, default_value = "fanout")]
    topic: String,
    /// Schema of the subscribed table.
    #[arg(long, default_value = "public")]
    schema: String,
    /// The subscribed table.
    #[arg(long)]
    table: String,
    /// Sockets connecting and joining at the same time.
    #[arg(long, default_value_t = 128)]
    connect_concurrency: usize,
    /// Source addresses 127.0.0.1, 127.0.0.2, …; 0: one per 20,000 sockets.
    #[arg(long, default_value_t = 0)]
    sources: usize,
    /// How long every socket may take to be subscribed.
    #[arg(long, default_value_t = 600)]
    subscribe_timeout: u64,
    /// `expect` gives up when nothing arrives for this long.
    #[arg(long, default_value_t = 30)]
    stall_seconds: u64,
    /// Runtime worker threads.
    #[arg(long, default_value_t = 2)]
    threads: usize,
}

/// What the sockets count, reset at each `phase`.
struct Stats {
    messages: AtomicU64,
    bytes: AtomicU64,
    /// Frames without a readable `commit_timestamp`.
    untimed: AtomicU64,
    /// Smallest commit timestamp seen, ms since the epoch.
    first_commit_ms: AtomicU64,
    /// First and last receive times, µs since the epoch.
    first_recv_us: AtomicU64,
    last_recv_us: AtomicU64,
    latency_sum_us: AtomicU64,
    latency_max_us: AtomicU64,
    latencies: Histogram,
    per_socket: Vec<AtomicU32>,
}

impl Stats {
    fn new(sockets: usize) -> Stats {
        let stats = Stats {
            messages: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            untimed: AtomicU64::new(0),
            first_commit_ms: AtomicU64::new(0),
            first_recv_us: AtomicU64::new(0),
            last_recv_us: AtomicU64::new(0),
            latency_sum_us: AtomicU64::new(0),
            latency_max_us: AtomicU64::new(0),
            latencies: Histogram::new(),
            per_socket: (0..sockets).map(|_| AtomicU32::new(0)).collect(),
        };
        stats.reset();
        stats
    }

    fn reset(&self) {
        for counter in [
            &self.messages,
            &self.bytes,
            &self.untimed,
            &self.last_recv_us,
            &self.latency_sum_us,
            &self.latency_max_us,
        ] {
            counter.store(0, Ordering::Relaxed);
        }
        self.first_commit_ms.store(u64::MAX, Ordering::Relaxed);
        self.first_recv_us.store(u64::MAX, Ordering::Relaxed);
        self.latencies.reset();
        for c in &self.per_socket {
            c.store(0, Ordering::Relaxed);
        }
    }

    /// One `postgres_changes` frame received by socket `socket` at `now_us`.
    fn record(&self, socket: usize, text: &str, now_us: u64) {
        self.per_socket[socket].fetch_add(1, Ordering::Relaxed);
        self.messages.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(text.len() as u64, Ordering::Relaxed);
        self.first_recv_us.fetch_min(now_us, Ordering::Relaxed);
        self.last_recv_us.fetch_max(now_us, Ordering::Relaxed);
        let Some(commit_ms) = commit_timestamp_ms(text) else {
            self.untimed.fetch_add(1, Ordering::Relaxed);
            return;
        };
        self.first_commit_ms.fetch_min(commit_ms, Ordering::Relaxed);
        let latency = now_us.saturating_sub(commit_ms * 1000);
        self.latency_sum_us.fetch_add(latency, Ordering::Relaxed);
        self.latency_max_us.fetch_max(latency, Ordering::Relaxed);
        self.latencies.record(latency);
    }
}

/// What every socket task shares.
struct Shared {
    stats: Stats,
    /// Sockets whose join was answered ok.
    joined: AtomicUsize,
    /// Sockets that got "Subscribed to PostgreSQL".
    subscribed: AtomicUsize,
    /// Sockets closed by the gateway or lost since they were subscribed.
    closed: AtomicUsize,
    /// Per socket: 0 open, else the close code (1006 when none was sent).
    close_codes: Vec<AtomicU32>,
    /// The first socket that failed to open, join or subscribe.
    failure: std::sync::Mutex<Option<String>>,
    shutdown: CancellationToken,
}

impl Shared {
    fn fail(&self, message: String) {
        let mut failure = self.failure.lock().unwrap_or_else(|e| e.into_inner());
        failure.get_or_insert(message);
    }

    fn failure(&self) -> Option<String> {
        self.failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

type Ws = WebSocketStream<TcpStream>;

/// Days since 1970-01-01 of a proleptic Gregorian date.
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// `commit_timestamp` of a `postgres_changes` frame
/// (`"YYYY-MM-DDTHH:MM:SS.mmmZ"`), ms since the epoch.
fn commit_timestamp_ms(text: &str) -> Option<u64> {
    const KEY: &str = "\"commit_timestamp\":\"";
    let start = text.find(KEY)? + KEY.len();
    let ts = text.as_bytes().get(start..start + 24)?;
    let num = |range: std::ops::Range<usize>| -> Option<i64> {
        let mut n = 0i64;
        for &c in ts.get(range)? {
            if !c.is_ascii_digit() {
                return None;
            }
            n = n * 10 + i64::from(c - b'0');
        }
        Some(n)
    };
    if ts[4] != b'-' || ts[10] != b'T' || ts[19] != b'.' || ts[23] != b'Z' {
        return None;
    }
    let days = days_from_civil(num(0..4)?, num(5..7)?, num(8..10)?);
    let seconds = days * 86_400 + num(11..13)? * 3600 + num(14..16)? * 60 + num(17..19)?;
    u64::try_from(seconds * 1000 + num(20..23)?).ok()
}

fn token(args: &Args) -> Result<String> {
    let exp = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs() + 24 * 3600;
    sign(
        &args.secret,
        &json!({"role": args.role, "exp": exp, "sub": "fanout-bench"}),
    )
}

/// What every socket sends: its source addresses, the token and the join.
struct Plan {
    sources: usize,
    token: String,
    join: String,
}

/// Connects socket `index` from its source address and joins the channel;
/// returns once the join was answered ok.
async fn open(index: usize, args: &Args, plan: &Plan) -> Result<Ws> {
    let sources = plan.sources;
    let socket = TcpSocket::new_v4()?;
    if sources > 1 {
        let host = u8::try_from(1 + index % sources).context("too many source addresses")?;
        socket.bind(SocketAddr::new(
            IpAddr::V4(Ipv4Addr::new(127, 0, 0, host)),
            0,
        ))?;
    }
    let stream = socket
        .connect(args.addr)
        .await
        .with_context(|| format!("connecting to {}", args.addr))?;
    stream.set_nodelay(true)?;
    let url = format!(
        "ws://{}/realtime/v1/websocket?apikey={}&vsn=2.0.0",
        args.addr, plan.token
    );
    // Frames are ~1 KB: a small read buffer keeps many sockets' memory small.
    let config = WebSocketConfig::default().read_buffer_size(16 * 1024);
    let (mut ws, _) = tokio_tungstenite::client_async_with_config(url, stream, Some(config))
        .await
        .context("WebSocket handshake")?;
    ws.send(Message::text(plan.join.clone())).await?;
    let reply_prefix = format!(
        r#"["{JOIN_REF}","{JOIN_REF}","realtime:{}","phx_reply","#,
        args.topic
    );
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(text))) if text.starts_with(&reply_prefix) => {
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

/// One socket from connect to close.
async fn socket_task(
    index: usize,
    args: Arc<Args>,
    shared: Arc<Shared>,
    permits: Arc<Semaphore>,
    plan: Arc<Plan>,
) {
    let opened = async {
        let _permit = permits.acquire().await?;
        open(index, &args, &plan).await
    };
    let mut ws = match opened.await {
        Ok(ws) => ws,
        Err(e) => {
            shared.fail(format!("socket {index}: {e:#}"));
            return;
        }
    };
    shared.joined.fetch_add(1, Ordering::Relaxed);
    let system = format!(r#"["{JOIN_REF}",null,"realtime:{}","system","#, args.topic);
    let mut subscribed = false;
    let mut heartbeat =
        tokio::time::interval_at(tokio::time::Instant::now() + HEARTBEAT, HEARTBEAT);
    let mut heartbeats = 0u64;
    let code = loop {
        tokio::select! {
            biased;
            () = shared.shutdown.cancelled() => break None,
            received = ws.next() => match received {
                Some(Ok(Message::Text(text))) => {
                    if text.contains(r#"","postgres_changes",{"#) {
                        shared.stats.record(index, text.as_str(), now_us());
                    } else if !subscribed && text.starts_with(&system) {
                        if text.contains("Subscribed to PostgreSQL") {
                            subscribed = true;
                            shared.subscribed.fetch_add(1, Ordering::Relaxed);
                        } else {
                            shared.fail(format!("socket {index}: {}", text.as_str()));
                            break None;
                        }
                    }
                }
                Some(Ok(Message::Close(frame))) => {
                    break Some(frame.map_or(1005, |f| u16::from(f.code)));
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => break Some(1006),
            },
            _ = heartbeat.tick() => {
                heartbeats += 1;
                let frame = format!(r#"[null,"hb{heartbeats}","phoenix","heartbeat",{{}}]"#);
                if ws.send(Message::text(frame)).await.is_err() {
                    break Some(1006);
                }
            }
        }
    };
    if let Some(code) = code {
        shared.close_codes[index].store(u32::from(code), Ordering::Relaxed);
        shared.closed.fetch_add(1, Ordering::Relaxed);
        if !subscribed {
            shared.fail(format!(
                "socket {index} closed ({code}) before it was subscribed"
            ));
        }
    } else {
        let _ = tokio::time::timeout(Duration::from_secs(2), ws.close(None)).await;
    }
}

/// Waits until every open socket received `expect` frames since the
/// phase began, or nothing more arrives for `stall`; returns the result.
async fn expect(shared: &Shared, name: &str, expect: u32, stall: Duration) -> serde_json::Value {
    let stats = &shared.stats;
    let sockets = stats.per_socket.len();
    let target = expect as u64 * sockets as u64;
    let started = Instant::now();
    let (mut last, mut last_move, mut last_progress) = (0, Instant::now(), Instant::now());
    let complete = loop {
        let got = stats.messages.load(Ordering::Relaxed);
        // What the sockets still open are owed; closed ones get nothing more.
        let owed: u64 = stats
            .per_socket
            .iter()
            .zip(&shared.close_codes)
            .filter(|(_, code)| code.load(Ordering::Relaxed) == 0)
            .map(|(n, _)| u64::from(expect.saturating_sub(n.load(Ordering::Relaxed))))
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
            emit(
                &json!({"event": "progress", "phase": name, "messages": got, "expected": target,
                         "seconds": started.elapsed().as_secs_f64()}),
            );
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    // Anything beyond the expected (a duplicate) would be in flight now.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let counts: Vec<u32> = stats
        .per_socket
        .iter()
        .map(|c| c.load(Ordering::Relaxed))
        .collect();
    let mut codes: std::collections::BTreeMap<u32, u64> = std::collections::BTreeMap::new();
    for code in &shared.close_codes {
        let code = code.load(Ordering::Relaxed);
        if code != 0 {
            *codes.entry(code).or_default() += 1;
        }
    }
    let messages = stats.messages.load(Ordering::Relaxed);
    let timed = messages - stats.untimed.load(Ordering::Relaxed);
    let first_commit_ms = stats.first_commit_ms.load(Ordering::Relaxed);
    let first_recv_us = stats.first_recv_us.load(Ordering::Relaxed);
    json!({
        "event": "phase",
        "phase": name,
        "complete": complete && counts.iter().all(|&n| n == expect),
        "sockets": sockets,
        "expected_per_socket": expect,
        "expected": target,
        "messages": messages,
        "bytes": stats.bytes.load(Ordering::Relaxed),
        "untimed": messages - timed,
        "min_per_socket": counts.iter().min().copied().unwrap_or(0),
        "max_per_socket": counts.iter().max().copied().unwrap_or(0),
        "sockets_short": counts.iter().filter(|&&n| n < expect).count(),
        "closed": shared.closed.load(Ordering::Relaxed),
        "close_codes": codes,
        "first_commit_ms": (first_commit_ms != u64::MAX).then_some(first_commit_ms),
        "first_recv_us": (first_recv_us != u64::MAX).then_some(first_recv_us),
        "last_recv_us": stats.last_recv_us.load(Ordering::Relaxed),
        "latency_ms": {
            "p50": stats.latencies.quantile_ms(0.50, timed),
            "p90": stats.latencies.quantile_ms(0.90, timed),
            "p99": stats.latencies.quantile_ms(0.99, timed),
            "p999": stats.latencies.quantile_ms(0.999, timed),
            "max": stats.latency_max_us.load(Ordering::Relaxed) as f64 / 1000.0,
            "mean": if timed == 0 { 0.0 } else {
                stats.latency_sum_us.load(Ordering::Relaxed) as f64 / timed as f64 / 1000.0
            },
        },
    })
}

async fn run(args: Args) -> Result<()> {
    if args.sockets == 0 {
        bail!("--sockets must be at least 1");
    }
    let sources = if args.sources == 0 {
        args.sockets.div_ceil(SOCKETS_PER_SOURCE)
    } else {
        args.sources
    };
    let token = token(&args)?;
    let binding = json!({"event": "*", "schema": args.schema, "table": args.table});
    let join = format!(
        r#"["{JOIN_REF}","{JOIN_REF}","realtime:{}","phx_join",{}]"#,
        args.topic,
        json!({"config": {"broadcast": {"self": false, "ack": false},
                          "presence": {"key": "", "enabled": false},
                          "postgres_changes": [binding], "private": false},
               "access_token": token})
    );
    let plan = Arc::new(Plan {
        sources,
        token,
        join,
    });
    let shared = Arc::new(Shared {
        stats: Stats::new(args.sockets),
        joined: AtomicUsize::new(0),
        subscribed: AtomicUsize::new(0),
        closed: AtomicUsize::new(0),
        close_codes: (0..args.sockets).map(|_| AtomicU32::new(0)).collect(),
        failure: std::sync::Mutex::new(None),
        shutdown: CancellationToken::new(),
    });
    let args = Arc::new(args);
    let permits = Arc::new(Semaphore::new(args.connect_concurrency.max(1)));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for index in 0..args.sockets {
        tasks.spawn(socket_task(
            index,
            args.clone(),
            shared.clone(),
            permits.clone(),
            plan.clone(),
        ));
    }
    let deadline = started + Duration::from_secs(args.subscribe_timeout);
    let mut joined_at = None;
    let mut last_note = Instant::now();
    loop {
        if let Some(failure) = shared.failure() {
            bail!("{failure}");
        }
        let joined = shared.joined.load(Ordering::Relaxed);
        let subscribed = shared.subscribed.load(Ordering::Relaxed);
        if joined == args.sockets && joined_at.is_none() {
            joined_at = Some(started.elapsed());
        }
        if subscribed == args.sockets {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "after {}s: {joined} of {} sockets joined, {subscribed} subscribed",
                args.subscribe_timeout,
                args.sockets
            );
        }
        if last_note.elapsed() > Duration::from_secs(5) {
            last_note = Instant::now();
            eprintln!(
                "fanout_client: {joined} of {} joined, {subscribed} subscribed",
                args.sockets
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let subscribed_at = started.elapsed();
    emit(&json!({
        "event": "ready",
        "sockets": args.sockets,
        "sources": sources,
        "joined_seconds": joined_at.unwrap_or(subscribed_at).as_secs_f64(),
        "subscribed_seconds": subscribed_at.as_secs_f64(),
    }));

    let mut commands = commands();
    let stall = Duration::from_secs(args.stall_seconds);
    let mut phase = String::from("unnamed");
    while let Some(line) = commands.recv().await {
        let mut words = line.split_whitespace();
        match (words.next(), words.next()) {
            (Some("phase"), Some(name)) => {
                name.clone_into(&mut phase);
                shared.stats.reset();
                emit(&json!({"event": "phase_started", "phase": phase}));
            }
            (Some("expect"), Some(k)) => {
                let k: u32 = k.parse().map_err(|e| anyhow!("expect {k}: {e}"))?;
                emit(&expect(&shared, &phase, k, stall).await);
            }
            (None, _) => {}
            _ => bail!("unknown command {line:?} (phase NAME, expect K)"),
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
    fn commit_timestamps_are_read_to_the_millisecond() {
        let frame = r#"[null,null,"realtime:fanout","postgres_changes",{"ids":[1],"data":{"columns":[],"commit_timestamp":"2026-11-22T22:23:55.992Z","errors":null}}]"#;
        assert_eq!(commit_timestamp_ms(frame), Some(1_795_386_235_992));
        assert_eq!(
            commit_timestamp_ms(r#""commit_timestamp":"1970-01-01T00:00:00.001Z""#),
            Some(1)
        );
        assert_eq!(commit_timestamp_ms(r#""commit_timestamp":null"#), None);
    }
}
