//! The daemon's side of the bus: pipelined PUBLISH, and acknowledgement.
//!
//! Batches arrive in WAL order over a queue bounded by bytes ([`queue`]).
//! The publisher sends what has queued up, up to about a megabyte, as one
//! Redis pipeline and, only once Redis has answered for all of it, advances
//! the acknowledged LSN to the highest commit those batches completed. The
//! replication side reports that LSN to Postgres; nothing is acknowledged
//! that Redis has not accepted.

mod ack;
mod queue;

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use tokio::sync::OwnedSemaphorePermit;

pub use ack::Acknowledged;
pub use queue::{Closed, QueueReceiver, QueueSender, cost, queue};

use crate::bus::server::{Connection, Server};
use crate::lsn::Lsn;
use crate::metrics;

/// Bytes of queued batches that go into one pipeline at most (a pipeline
/// holds at least one batch, however large): the pipeline's command buffer
/// is a second copy of them.
const PIPELINE_BYTES: usize = 1 << 20;

/// One message for one channel.
#[derive(Debug, Clone)]
pub struct Outgoing {
    /// The Redis channel.
    pub channel: Arc<str>,
    /// The serialized message.
    pub payload: Bytes,
}

/// Messages in WAL order, and the LSN that may be acknowledged once they
/// (and everything before them) are published.
#[derive(Debug, Default)]
pub struct Batch {
    /// Messages to publish, in order.
    pub messages: Vec<Outgoing>,
    /// A commit's end LSN, or a keepalive's WAL end when no transaction was
    /// open.
    pub ack: Option<Lsn>,
    /// How many changes have messages in this batch (for metrics).
    pub changes: u64,
    /// Commit time of the last of those changes, microseconds since
    /// 2000-01-01 UTC (for the replication lag in seconds).
    pub commit_time: Option<i64>,
    /// Its share of the queue's byte budget, given back when it is dropped
    /// (published).
    permit: Option<OwnedSemaphorePermit>,
}

impl Batch {
    /// Notes that a change committed at `commit_time` has messages here.
    pub fn count_change(&mut self, commit_time: i64) {
        self.changes += 1;
        self.commit_time = Some(commit_time);
    }
}

/// Why publishing stopped.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Redis refused, dropped the connection, or did not answer in time.
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
}

impl Error {
    /// Whether reconnecting later may succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Redis(e) => !matches!(
                e.kind(),
                redis::ErrorKind::AuthenticationFailed | redis::ErrorKind::InvalidClientConfig
            ),
        }
    }
}

/// A connection to Redis for publishing.
pub struct Publisher {
    server: Server,
    conn: Connection,
}

impl Publisher {
    /// Connects to Redis and checks it answers.
    pub async fn connect(server: &Server) -> Result<Publisher, Error> {
        let mut conn = server.connect().await?;
        redis::cmd("PING").query_async::<()>(&mut conn).await?;
        Ok(Publisher {
            server: server.clone(),
            conn,
        })
    }

    /// Publishes batches until the sender side closes, advancing `acked`
    /// after each pipeline Redis has answered. Returns on the first error,
    /// leaving `acked` at the last commit Redis accepted.
    pub async fn run(
        mut self,
        mut batches: QueueReceiver,
        acked: &Acknowledged,
    ) -> Result<(), Error> {
        let mut queued = Vec::new();
        loop {
            // Dropping the published batches gives their bytes back.
            queued.clear();
            let Some(first) = batches.recv().await else {
                return Ok(());
            };
            let mut pipeline_bytes = cost(&first);
            queued.push(first);
            while pipeline_bytes < PIPELINE_BYTES {
                let Some(next) = batches.try_recv() else {
                    break;
                };
                pipeline_bytes += cost(&next);
                queued.push(next);
            }
            let mut pipe = redis::pipe();
            let mut count = 0usize;
            let mut bytes = 0usize;
            for message in queued.iter().flat_map(|b| &b.messages) {
                self.server
                    .publish(&mut pipe, &message.channel, message.payload.as_ref());
                count += 1;
                bytes += message.payload.len();
            }
            if count > 0 {
                let started = Instant::now();
                // Each PUBLISH answers with its receiver count; 0 is success too.
                pipe.query_async::<Vec<i64>>(&mut self.conn).await?;
                metrics::histogram!(metrics::PUBLISH_SECONDS).record(started.elapsed());
                metrics::counter!(metrics::MESSAGES_PUBLISHED).increment(count as u64);
                metrics::counter!(metrics::PUBLISHED_BYTES).increment(bytes as u64);
                let changes = queued.iter().map(|b| b.changes).sum();
                metrics::counter!(metrics::CHANGES_PUBLISHED).increment(changes);
                if let Some(time) = queued.iter().filter_map(|b| b.commit_time).max() {
                    metrics::gauge!(metrics::LAG_SECONDS).set(metrics::seconds_since_commit(time));
                }
            }
            if let Some(lsn) = queued.iter().filter_map(|b| b.ack).max() {
                acked.advance(lsn);
            }
        }
    }
}
