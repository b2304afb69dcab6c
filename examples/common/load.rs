//! What the benchmarks' load clients (`fanout_client`, `room_client`)
//! share: the latency histogram, the clock, JSON lines out, commands in,
//! the runtime and the token.

use std::io::{BufRead, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use jsonwebtoken::{EncodingKey, Header, encode};
use serde_json::Value;
use tokio::sync::mpsc;

/// Width of a latency histogram bucket, µs.
pub const BUCKET_US: u64 = 100;
/// Latencies above this many buckets (60 s) share the last one.
pub const BUCKETS: usize = 600_000;

/// Latencies in [`BUCKET_US`] buckets, shared by every socket task.
pub struct Histogram {
    /// Frames per bucket.
    pub buckets: Vec<AtomicU64>,
}

impl Default for Histogram {
    fn default() -> Histogram {
        Histogram::new()
    }
}

impl Histogram {
    /// Empty buckets.
    pub fn new() -> Histogram {
        Histogram {
            buckets: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// Empties every bucket.
    pub fn reset(&self) {
        for b in &self.buckets {
            b.store(0, Ordering::Relaxed);
        }
    }

    /// Counts one latency.
    pub fn record(&self, latency_us: u64) {
        let bucket = ((latency_us / BUCKET_US) as usize).min(BUCKETS - 1);
        self.buckets[bucket].fetch_add(1, Ordering::Relaxed);
    }

    /// The latency (ms) below which `q` of `count` frames are: the upper
    /// edge of the bucket holding that rank.
    pub fn quantile_ms(&self, q: f64, count: u64) -> f64 {
        if count == 0 {
            return 0.0;
        }
        let rank = ((q * count as f64).ceil() as u64).clamp(1, count);
        let mut seen = 0;
        for (i, b) in self.buckets.iter().enumerate() {
            seen += b.load(Ordering::Relaxed);
            if seen >= rank {
                return ((i as u64 + 1) * BUCKET_US) as f64 / 1000.0;
            }
        }
        (BUCKETS as u64 * BUCKET_US) as f64 / 1000.0
    }
}

/// Wall clock, µs since the epoch.
pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// Writes `value` as one line on stdout.
pub fn emit(value: &Value) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{value}");
    let _ = out.flush();
}

/// Stdin's lines, read on a thread of their own.
pub fn commands() -> mpsc::UnboundedReceiver<String> {
    let (tx, rx) = mpsc::unbounded_channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// An HS256 token with `claims`, signed with `secret`.
pub fn sign(secret: &str, claims: &Value) -> Result<String> {
    encode(
        &Header::default(),
        claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .context("signing the token")
}

/// Runs `main` on a runtime of `threads` workers.
pub fn run_on<F: std::future::Future<Output = Result<()>>>(threads: usize, main: F) -> Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .enable_all()
        .build()?
        .block_on(main)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_bucket_upper_edges() {
        let h = Histogram::new();
        for latency_us in [50, 150, 150, 10_000] {
            h.record(latency_us);
        }
        assert_eq!(h.quantile_ms(0.5, 4), 0.2);
        assert_eq!(h.quantile_ms(0.99, 4), 10.1);
    }
}
