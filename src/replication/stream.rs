//! The CopyBoth stream: WAL data and keepalives in, standby status updates out.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use postgres_protocol::message::backend::Message;

use super::connection::{Backend, db_error};
use super::{Connection, Error};
use crate::lsn::Lsn;

const XLOG_DATA_TAG: u8 = b'w';
const PRIMARY_KEEPALIVE_TAG: u8 = b'k';
const STANDBY_STATUS_UPDATE_TAG: u8 = b'r';
/// Seconds from the Unix epoch to the Postgres epoch (2000-01-01).
const POSTGRES_EPOCH_UNIX_SECS: u64 = 946_684_800;

/// One message from the walsender.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamEvent {
    /// WAL data: one pgoutput message.
    XLogData {
        /// Where the data starts in the WAL.
        wal_start: Lsn,
        /// The server's current end of WAL.
        wal_end: Lsn,
        /// The pgoutput message.
        data: Bytes,
    },
    /// A keepalive.
    Keepalive {
        /// Where the walsender is: everything before it has been sent.
        wal_end: Lsn,
        /// The server wants a status update now.
        reply_requested: bool,
    },
    /// The server ended the stream (CopyDone).
    End,
}

/// A connection in CopyBoth mode.
pub struct ReplicationStream {
    conn: Connection,
    status: BytesMut,
}

impl ReplicationStream {
    pub(crate) fn new(conn: Connection) -> Self {
        ReplicationStream {
            conn,
            status: BytesMut::with_capacity(34),
        }
    }

    /// The next event. Cancel-safe.
    pub async fn next(&mut self) -> Result<StreamEvent, Error> {
        loop {
            match self.conn.read("streaming").await? {
                Backend::CopyData(payload) => return parse_copy_data(payload),
                Backend::Other(Message::CopyDone) => return Ok(StreamEvent::End),
                Backend::Other(Message::ErrorResponse(body)) => {
                    return Err(Error::Db(db_error(body.fields())));
                }
                Backend::Other(Message::NoticeResponse(_) | Message::ParameterStatus(_)) => {}
                // A walsender that shuts down may end the copy with
                // CommandComplete/ReadyForQuery: the stream is over, and
                // reconnecting is the answer.
                Backend::Other(Message::CommandComplete(_) | Message::ReadyForQuery(_)) => {
                    return Ok(StreamEvent::End);
                }
                Backend::Other(_) | Backend::CopyBothResponse => {
                    return Err(Error::Protocol("unexpected message while streaming".into()));
                }
            }
        }
    }

    /// Whether the next event can be read without waiting for the network
    /// (more WAL has already arrived).
    pub async fn event_ready(&mut self) -> bool {
        self.conn.message_ready().await
    }

    /// Sends a standby status update acknowledging `acked` as written,
    /// flushed and applied: it becomes the slot's `confirmed_flush_lsn`.
    ///
    /// Reporting the acknowledged position as `write` too (rather than what
    /// was merely received) keeps the walsender pinging us while it is ahead
    /// of our acknowledgement, which is what lets an idle slot advance.
    pub async fn send_status(&mut self, acked: Lsn) -> Result<(), Error> {
        self.status.clear();
        self.status.put_u8(STANDBY_STATUS_UPDATE_TAG);
        self.status.put_u64(acked.0);
        self.status.put_u64(acked.0);
        self.status.put_u64(acked.0);
        self.status.put_i64(postgres_now());
        self.status.put_u8(0);
        let status = std::mem::take(&mut self.status);
        let queued = self.conn.queue_copy_data(&status);
        self.status = status;
        queued?;
        self.conn.flush("sending a status update").await
    }

    /// Ends the stream politely: CopyDone, then Terminate.
    pub async fn close(mut self) {
        self.conn.queue_copy_done();
        let _ = tokio::time::timeout(Duration::from_secs(2), self.conn.flush("closing")).await;
        self.conn.close().await;
    }
}

fn parse_copy_data(mut payload: Bytes) -> Result<StreamEvent, Error> {
    let truncated = || Error::Protocol("truncated replication message".into());
    if payload.is_empty() {
        return Err(truncated());
    }
    match payload.get_u8() {
        XLOG_DATA_TAG => {
            if payload.len() < 24 {
                return Err(truncated());
            }
            let wal_start = Lsn(payload.get_u64());
            let wal_end = Lsn(payload.get_u64());
            let _send_time = payload.get_i64();
            Ok(StreamEvent::XLogData {
                wal_start,
                wal_end,
                data: payload,
            })
        }
        PRIMARY_KEEPALIVE_TAG => {
            if payload.len() < 17 {
                return Err(truncated());
            }
            let wal_end = Lsn(payload.get_u64());
            let _send_time = payload.get_i64();
            let reply_requested = payload.get_u8() == 1;
            Ok(StreamEvent::Keepalive {
                wal_end,
                reply_requested,
            })
        }
        tag => Err(Error::Protocol(format!(
            "unknown replication message tag {tag:#04x}"
        ))),
    }
}

/// Microseconds since 2000-01-01 UTC, Postgres's clock.
pub fn postgres_now() -> i64 {
    let since_unix = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let micros = since_unix.as_micros() as i64;
    micros - (POSTGRES_EPOCH_UNIX_SECS as i64) * 1_000_000
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_xlog_data_and_keepalives() {
        let mut frame = BytesMut::new();
        frame.put_u8(b'w');
        frame.put_u64(0x10);
        frame.put_u64(0x20);
        frame.put_i64(0);
        frame.put_slice(b"B...");
        assert_eq!(
            parse_copy_data(frame.freeze()).unwrap(),
            StreamEvent::XLogData {
                wal_start: Lsn(0x10),
                wal_end: Lsn(0x20),
                data: Bytes::from_static(b"B...")
            }
        );
        let mut frame = BytesMut::new();
        frame.put_u8(b'k');
        frame.put_u64(0x30);
        frame.put_i64(0);
        frame.put_u8(1);
        assert_eq!(
            parse_copy_data(frame.freeze()).unwrap(),
            StreamEvent::Keepalive {
                wal_end: Lsn(0x30),
                reply_requested: true
            }
        );
    }

    #[test]
    fn every_truncated_prefix_is_an_error() {
        let mut frame = BytesMut::new();
        frame.put_u8(b'k');
        frame.put_u64(0x30);
        frame.put_i64(0);
        frame.put_u8(0);
        let frame = frame.freeze();
        for n in 0..frame.len() {
            assert!(parse_copy_data(frame.slice(..n)).is_err(), "prefix {n}");
        }
        let mut frame = BytesMut::new();
        frame.put_u8(b'w');
        frame.put_bytes(0, 24);
        let frame = frame.freeze();
        for n in 0..frame.len() {
            assert!(parse_copy_data(frame.slice(..n)).is_err(), "prefix {n}");
        }
    }
}
