//! The queue between the replication side and the publisher, bounded by
//! bytes rather than by a count of batches: a count bounds memory only for
//! small rows (64 batches of 512 messages were 23 MB of `items` rows and
//! four times that of 4 KB rows), a byte budget bounds it whatever the
//! rows are. While the budget is spent, the replication side stops reading
//! WAL; Postgres keeps it.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, TryAcquireError, mpsc};

use super::Batch;

/// What one message costs beyond its payload and channel name: its
/// `Outgoing`, the `Bytes` header and allocation slack, roughly.
const MESSAGE_OVERHEAD: usize = 64;
/// What one batch costs beyond its messages, so that batches without
/// messages (acknowledgements only) are bounded too.
const BATCH_OVERHEAD: usize = 64;

/// The replication side's end.
#[derive(Debug)]
pub struct QueueSender {
    tx: mpsc::UnboundedSender<Batch>,
    budget: Arc<Semaphore>,
    /// The budget, in bytes: a batch larger than this waits for an empty
    /// queue and then goes alone.
    capacity: u32,
}

/// The publisher's end.
#[derive(Debug)]
pub struct QueueReceiver {
    rx: mpsc::UnboundedReceiver<Batch>,
}

/// The publisher is gone (its end was dropped).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Closed;

/// A queue holding at most about `bytes` of messages.
pub fn queue(bytes: usize) -> (QueueSender, QueueReceiver) {
    let capacity = u32::try_from(bytes.clamp(1, Semaphore::MAX_PERMITS))
        .unwrap_or(u32::MAX)
        .max(1);
    let (tx, rx) = mpsc::unbounded_channel();
    (
        QueueSender {
            tx,
            budget: Arc::new(Semaphore::new(capacity as usize)),
            capacity,
        },
        QueueReceiver { rx },
    )
}

/// The bytes `batch` holds while queued (its share of the budget).
pub fn cost(batch: &Batch) -> usize {
    batch
        .messages
        .iter()
        .map(|m| m.payload.len() + m.channel.len() + MESSAGE_OVERHEAD)
        .sum::<usize>()
        + BATCH_OVERHEAD
}

impl QueueSender {
    fn permits(&self, batch: &Batch) -> u32 {
        u32::try_from(cost(batch))
            .unwrap_or(u32::MAX)
            .min(self.capacity)
    }

    /// Queues `batch` if the budget has room now; hands it back otherwise.
    pub fn try_send(&self, mut batch: Batch) -> Result<(), Result<Batch, Closed>> {
        match self
            .budget
            .clone()
            .try_acquire_many_owned(self.permits(&batch))
        {
            Ok(permit) => {
                batch.permit = Some(permit);
                self.tx.send(batch).map_err(|_| Err(Closed))
            }
            Err(TryAcquireError::NoPermits) => Err(Ok(batch)),
            Err(TryAcquireError::Closed) => Err(Err(Closed)),
        }
    }

    /// Waits until the budget has room for `batch`'s bytes and returns the
    /// right to queue them; [`QueueSender::send_with`] then queues it.
    pub async fn room_for(&self, batch: &Batch) -> Result<OwnedSemaphorePermit, Closed> {
        self.budget
            .clone()
            .acquire_many_owned(self.permits(batch))
            .await
            .map_err(|_| Closed)
    }

    /// Queues `batch` with the room [`QueueSender::room_for`] gave.
    pub fn send_with(&self, mut batch: Batch, permit: OwnedSemaphorePermit) -> Result<(), Closed> {
        batch.permit = Some(permit);
        self.tx.send(batch).map_err(|_| Closed)
    }

    /// Waits for room, then queues `batch`.
    pub async fn send(&self, batch: Batch) -> Result<(), Closed> {
        let permit = self.room_for(&batch).await?;
        self.send_with(batch, permit)
    }
}

impl QueueReceiver {
    /// The next batch; `None` once the sender is gone and the queue empty.
    pub async fn recv(&mut self) -> Option<Batch> {
        self.rx.recv().await
    }

    /// A batch already queued, without waiting.
    pub fn try_recv(&mut self) -> Option<Batch> {
        self.rx.try_recv().ok()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use bytes::Bytes;

    use super::*;
    use crate::publish::Outgoing;

    fn batch(payload_bytes: usize) -> Batch {
        Batch {
            messages: vec![Outgoing {
                channel: Arc::from("c"),
                payload: Bytes::from(vec![b'x'; payload_bytes]),
            }],
            ..Batch::default()
        }
    }

    #[tokio::test]
    async fn the_budget_bounds_bytes_and_returns_as_batches_are_dropped() {
        let (tx, mut rx) = queue(1_000);
        // 500 + 1 + 64 + 64 = 629 bytes: one fits, a second does not.
        tx.try_send(batch(500)).unwrap();
        let refused = tx.try_send(batch(500)).unwrap_err().unwrap();
        assert_eq!(cost(&refused), 629);
        let first = rx.recv().await.unwrap();
        assert!(
            tx.try_send(batch(500)).is_err(),
            "still held by the publisher"
        );
        drop(first);
        tx.try_send(refused).unwrap();
        assert_eq!(cost(&rx.try_recv().unwrap()), 629);
        assert!(rx.try_recv().is_none());
    }

    #[tokio::test]
    async fn a_batch_larger_than_the_budget_goes_alone() {
        let (tx, mut rx) = queue(1_000);
        tx.try_send(batch(10)).unwrap();
        let big = batch(5_000);
        assert!(matches!(tx.try_send(big), Err(Ok(_))));
        let waiting = tokio::spawn(async move {
            tx.send(batch(5_000)).await.unwrap();
            tx
        });
        let small = rx.recv().await.unwrap();
        assert_eq!(cost(&small), 139);
        drop(small);
        let big = rx.recv().await.unwrap();
        assert_eq!(cost(&big), 5_129);
        let tx = waiting.await.unwrap();
        drop(big);
        drop(rx);
        assert_eq!(tx.send(batch(1)).await, Err(Closed));
    }
}
