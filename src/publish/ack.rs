//! The acknowledged LSN, shared between the publisher (which advances it)
//! and the replication loop (which reports it to Postgres).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::lsn::Lsn;

/// The highest LSN up to which Redis has accepted everything. It only moves
/// forward, whatever order callers advance it in.
#[derive(Debug, Clone, Default)]
pub struct Acknowledged(Arc<AtomicU64>);

impl Acknowledged {
    /// Starts at `lsn`.
    pub fn new(lsn: Lsn) -> Self {
        Acknowledged(Arc::new(AtomicU64::new(lsn.0)))
    }

    /// The current position.
    pub fn get(&self) -> Lsn {
        Lsn(self.0.load(Ordering::Acquire))
    }

    /// Moves forward to `lsn`; a lower value is ignored.
    pub fn advance(&self, lsn: Lsn) {
        self.0.fetch_max(lsn.0, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_moves_backwards() {
        let acked = Acknowledged::new(Lsn(10));
        acked.advance(Lsn(5));
        assert_eq!(acked.get(), Lsn(10));
        acked.advance(Lsn(20));
        assert_eq!(acked.get(), Lsn(20));
    }
}
