//! Test support: real Postgres and Redis servers, and the walcast binary as a
//! child process. Every server gets its own temp dir and free port; nothing
//! here touches the machine's own Postgres (5432) or Redis (6379).
#![allow(dead_code)]

pub mod daemon;
pub mod gateway;
pub mod json_exact;
pub mod load;
pub mod postgres;
pub mod real_client;
pub mod redis;
pub mod rng;
pub mod stack;
pub mod ws_gateway;

#[allow(unused_imports)] // not every test module uses every type
pub use self::daemon::Daemon;
pub use self::postgres::{PgOptions, TestPostgres};
pub use self::redis::{TestRedis, TestRedisCluster};

use std::collections::HashSet;
use std::future::Future;
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// Polls `f` every 50 ms until it returns `true`; panics mentioning `what` if
/// it has not done so within `timeout`.
pub async fn eventually<F, Fut>(what: &str, timeout: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if f().await {
            return;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Ports handed out in this process, never handed out twice.
static USED_PORTS: Mutex<Option<HashSet<u16>>> = Mutex::new(None);
static PORT_CURSOR: AtomicU32 = AtomicU32::new(0);

/// Returns a TCP port on 127.0.0.1 that is free right now and has not been
/// handed out before in this process.
///
/// Ports are taken from *below* the kernel's ephemeral range so that an
/// outgoing connection's local port can never occupy a server's port between
/// a stop and a restart on the same port. The starting point depends on the
/// pid so that concurrently running test processes rarely probe the same
/// ports; callers still retry on "address in use" at server start.
pub fn free_port() -> u16 {
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32768);
    let (lo, hi) = if ephemeral_low > 12_000 {
        (10_000u32, ephemeral_low)
    } else {
        (ephemeral_low.max(1024), 65_536)
    };
    let span = hi - lo;
    let base = std::process::id().wrapping_mul(7919) % span;
    let mut used = USED_PORTS.lock().unwrap_or_else(|e| e.into_inner());
    let used = used.get_or_insert_with(HashSet::new);
    for _ in 0..span {
        let step = PORT_CURSOR.fetch_add(1, Ordering::Relaxed);
        let port = (lo + (base + step) % span) as u16;
        if port == 5432 || port == 6379 || used.contains(&port) {
            continue;
        }
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            used.insert(port);
            return port;
        }
    }
    // Fall back to whatever the kernel gives us.
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .expect("bind 127.0.0.1:0")
            .local_addr()
            .expect("local_addr")
            .port();
        if used.insert(port) {
            return port;
        }
    }
}

/// Sends `signal` (a name such as `INT`, `QUIT`, `TERM`, `KILL`) to `pid`
/// using the `kill` command. Errors (e.g. the process is gone) are ignored.
pub fn send_signal(pid: u32, signal: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Waits for `child` to exit, polling every 10 ms; `None` on timeout.
pub fn wait_child(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) => {}
            Err(e) => panic!("waiting for child {}: {e}", child.id()),
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Whether `pid` is a live (non-zombie) process.
pub fn pid_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state field follows the parenthesised command name.
        Ok(stat) => match stat.rfind(')') {
            Some(i) => !matches!(stat[i + 1..].split_whitespace().next(), Some("Z" | "X")),
            None => true,
        },
        Err(_) => false,
    }
}

/// Pids of the live direct children of `parent`.
pub fn child_pids(parent: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|entry| {
        let pid: u32 = entry.ok()?.file_name().to_str()?.parse().ok()?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let rest = &stat[stat.rfind(')')? + 1..];
        let mut fields = rest.split_whitespace();
        let state = fields.next()?;
        let ppid: u32 = fields.next()?.parse().ok()?;
        (ppid == parent && state != "Z" && state != "X").then_some(pid)
    })
    .collect()
}

/// Reads a log file (lossily), or explains why it could not.
pub fn read_log(path: &Path) -> String {
    match std::fs::read(path) {
        Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        Err(e) => format!("<could not read {}: {e}>", path.display()),
    }
}

/// The last `lines` lines of `text`.
pub fn tail(text: &str, lines: usize) -> &str {
    let mut start = text.len();
    for _ in 0..=lines {
        match text[..start].rfind('\n') {
            Some(i) => start = i,
            None => return text,
        }
    }
    &text[start + 1..]
}
