//! The WAL the slot keeps on the server, read through the pool now and
//! then, and a warning when it passes `retained_wal_warn_bytes`.
//!
//! While walcast keeps up, the slot retains little. When Redis is away (the
//! slot is not read), the publisher falls behind, or the daemon is a
//! standby whose primary is stuck, it grows with every write, and a full
//! `pg_wal` stops the database. The warning fires once per crossing, not at
//! every reading; falling back under the threshold is logged too.

use std::time::Duration;

use deadpool_postgres::Pool;
use tracing::{debug, info, warn};

use super::{Error, RETAINED_WAL_BYTES};

/// How often the slot is read.
const INTERVAL: Duration = Duration::from_secs(10);

/// A change of side of the threshold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Crossing {
    /// The retained WAL went above the threshold.
    Above,
    /// It came back to the threshold or under it.
    Below,
}

/// Which side of a byte threshold the last reading was on.
#[derive(Debug, Clone)]
pub struct Threshold {
    limit: u64,
    above: bool,
}

impl Threshold {
    /// A threshold at `limit` bytes, starting below it.
    pub fn new(limit: u64) -> Self {
        Threshold {
            limit,
            above: false,
        }
    }

    /// Records a reading; says so when it is on the other side of the
    /// threshold than the previous one.
    pub fn observe(&mut self, bytes: u64) -> Option<Crossing> {
        let above = bytes > self.limit;
        if above == self.above {
            return None;
        }
        self.above = above;
        Some(if above {
            Crossing::Above
        } else {
            Crossing::Below
        })
    }
}

/// Reads the retained WAL of `slot` every few seconds into
/// [`RETAINED_WAL_BYTES`], warning when it crosses `warn_above` bytes.
/// Runs until aborted; a failed reading is logged at debug level and
/// leaves the gauge as it was (the session reports the database's state).
pub async fn watch_retained_wal(pool: Pool, slot: String, warn_above: u64) {
    let mut threshold = Threshold::new(warn_above);
    let mut tick = tokio::time::interval(INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let bytes = match retained(&pool, &slot).await {
            Ok(Some(bytes)) => bytes,
            Ok(None) => {
                debug!(%slot, "the slot does not exist or has no restart position");
                continue;
            }
            Err(e) => {
                debug!(%slot, error = %e, "could not read the slot's retained wal");
                continue;
            }
        };
        metrics::gauge!(RETAINED_WAL_BYTES).set(bytes as f64);
        match threshold.observe(bytes) {
            Some(Crossing::Above) => warn!(
                %slot,
                retained_bytes = bytes,
                threshold_bytes = warn_above,
                "replication slot retains more wal than retained_wal_warn_bytes; postgres keeps it until walcast catches up"
            ),
            Some(Crossing::Below) => info!(
                %slot,
                retained_bytes = bytes,
                threshold_bytes = warn_above,
                "replication slot's retained wal is back under retained_wal_warn_bytes"
            ),
            None => {}
        }
    }
}

/// The slot's retained WAL in bytes; `None` if it does not exist or has no
/// restart position.
async fn retained(pool: &Pool, slot: &str) -> Result<Option<u64>, Error> {
    let client = pool.get().await?;
    let row = client
        .query_opt(include_str!("../../sql/slot_retained_wal.sql"), &[&slot])
        .await?;
    let Some(row) = row else { return Ok(None) };
    let bytes: Option<i64> = row.try_get(0)?;
    Ok(bytes.map(|b| u64::try_from(b).unwrap_or(0)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warns_once_per_crossing() {
        let mut t = Threshold::new(100);
        assert_eq!(t.observe(50), None);
        assert_eq!(t.observe(100), None);
        assert_eq!(t.observe(101), Some(Crossing::Above));
        assert_eq!(t.observe(5000), None);
        assert_eq!(t.observe(100), Some(Crossing::Below));
        assert_eq!(t.observe(0), None);
        assert_eq!(t.observe(200), Some(Crossing::Above));
    }
}
