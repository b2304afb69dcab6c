//! Concurrent writers that insert into `load (id bigint primary key, writer
//! int, pad text)` and survive Postgres restarts: each batch is retried
//! until it commits (`ON CONFLICT DO NOTHING` makes a retry of a batch whose
//! commit reply was lost harmless). The table's content is the ground truth.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::task::JoinHandle;

use super::postgres::connect;

/// The table the writers fill.
pub const LOAD_TABLE: &str =
    "CREATE TABLE load (id bigint PRIMARY KEY, writer int NOT NULL, pad text NOT NULL)";

/// A running load.
pub struct Load {
    writers: Vec<JoinHandle<()>>,
    committed: Arc<AtomicUsize>,
    total: usize,
}

/// How the writers write.
#[derive(Debug, Clone)]
pub struct LoadShape {
    /// Concurrent writers, each with its own connection.
    pub writers: usize,
    /// Rows over all writers.
    pub rows: usize,
    /// Rows per transaction cycle through 1..=max_batch.
    pub max_batch: usize,
    /// Pause after each transaction (to stretch a load over time).
    pub pause: Duration,
}

impl Load {
    /// Starts the writers against `url`.
    pub fn start(url: String, shape: LoadShape) -> Load {
        let committed = Arc::new(AtomicUsize::new(0));
        let per_writer = shape.rows / shape.writers;
        let writers = (0..shape.writers)
            .map(|w| {
                let url = url.clone();
                let committed = committed.clone();
                let shape = shape.clone();
                tokio::spawn(async move {
                    let base = (w as i64 + 1) * 10_000_000;
                    let mut done = 0usize;
                    let mut batch = 1 + w % shape.max_batch;
                    let mut client = None;
                    while done < per_writer {
                        let n = batch.min(per_writer - done);
                        let from = base + done as i64;
                        let to = from + n as i64 - 1;
                        if client.is_none() {
                            match connect(&url).await {
                                Ok(c) => client = Some(c),
                                Err(_) => {
                                    tokio::time::sleep(Duration::from_millis(100)).await;
                                    continue;
                                }
                            }
                        }
                        let Some(c) = &client else { continue };
                        let sql = "INSERT INTO load (id, writer, pad) SELECT g, $1, repeat('x', (g % 50)::int) FROM generate_series($2::bigint, $3::bigint) g ON CONFLICT DO NOTHING";
                        match c.execute(sql, &[&(w as i32), &from, &to]).await {
                            Ok(_) => {
                                done += n;
                                committed.fetch_add(n, Ordering::Relaxed);
                                batch = batch % shape.max_batch + 1;
                                if !shape.pause.is_zero() {
                                    tokio::time::sleep(shape.pause).await;
                                }
                            }
                            Err(_) => {
                                client = None;
                                tokio::time::sleep(Duration::from_millis(100)).await;
                            }
                        }
                    }
                })
            })
            .collect();
        Load {
            writers,
            committed,
            total: per_writer * shape.writers,
        }
    }

    /// Rows committed so far.
    pub fn committed(&self) -> usize {
        self.committed.load(Ordering::Relaxed)
    }

    /// Rows the load will commit in all.
    pub fn total(&self) -> usize {
        self.total
    }

    /// Fraction committed, 0.0 to 1.0.
    pub fn progress(&self) -> f64 {
        self.committed() as f64 / self.total as f64
    }

    /// Waits for every writer to finish.
    pub async fn finish(self) {
        for w in self.writers {
            w.await.expect("writer task");
        }
    }
}
