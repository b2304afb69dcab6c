//! Private channels: who may read and write a topic, decided by the Row
//! Level Security policies on `realtime.messages` as Supabase Realtime
//! decides it, for many subjects in one call (`sql/rls.sql`:
//! `walcast.channel_access`, `walcast.channel_write`,
//! `walcast.readable_messages`).
//!
//! A subject is a JWT's role and claims and a topic. Joins and first
//! writes come from gateways over the bus ([`crate::control`]); the
//! messages of private topics come from the WAL ([`crate::daemon`]): the
//! subjects joined to a topic are asked once per batch which rows they may
//! see.
//!
//! ```text
//! join private ──▶ access: as the owner insert a probe row, as the subject SELECT it ──▶ read?
//! first send   ──▶ write:  as the subject INSERT (topic, extension); 42501 = no    ──▶ write?
//! WAL row      ──▶ readable: as each subject, which committed rows of its topic show ──▶ deliver
//! ```
//!
//! Every call is one transaction, rolled back (the probes write), under a
//! `statement_timeout`; each subject runs in its own subtransaction, so a
//! raising policy or a missing partition fails only that subject.

use std::time::Duration;

use deadpool_postgres::{Object, Pool};
use tokio_postgres::types::ToSql;

/// How much longer than `statement_timeout` the client waits before giving
/// up on the connection itself.
const CLIENT_GRACE: Duration = Duration::from_secs(2);

/// Who asks, about which topic.
#[derive(Debug, Clone, Copy)]
pub struct Subject<'a> {
    /// The JWT's role (`SET ROLE`; the login role must be a member).
    pub role: &'a str,
    /// The JWT's claims as JSON text (`request.jwt.claims`).
    pub claims: &'a str,
    /// The topic, without `realtime:` (`realtime.topic()`).
    pub topic: &'a str,
}

/// One subject's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome<T> {
    /// What the policies decided.
    Decided(T),
    /// The subject's check raised: its SQLSTATE and message.
    Failed {
        /// SQLSTATE.
        code: String,
        /// The server's message.
        message: String,
    },
}

/// What a subject may read of a topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Read {
    /// Broadcasts (a probe row with extension `broadcast` is visible).
    pub broadcast: bool,
    /// Presence, when it was asked (enabled at join).
    pub presence: Option<bool>,
}

impl Read {
    /// Whether a join is allowed: Supabase's `broadcast.read ||
    /// presence.read`.
    pub fn any(&self) -> bool {
        self.broadcast || self.presence == Some(true)
    }
}

/// Why a call could not be answered at all (every subject is then
/// undecided).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No connection from the pool.
    #[error("channel authorization: no connection: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    /// The call failed (connection lost; functions missing: apply
    /// `sql/rls.sql` version 3 with walcast setup).
    #[error("channel authorization: {}", crate::check::describe(.0))]
    Query(#[from] tokio_postgres::Error),
    /// No answer within the timeout.
    #[error("channel authorization timed out after {0:?}")]
    Timeout(Duration),
}

/// May each subject read its topic? `presence[i]`: also ask about
/// presence (enabled at that join).
pub async fn access(
    pool: &Pool,
    timeout: Duration,
    subjects: &[Subject<'_>],
    presence: &[bool],
) -> Result<Vec<Outcome<Read>>, Error> {
    if subjects.is_empty() {
        return Ok(Vec::new());
    }
    let (roles, claims, topics) = columns(subjects);
    let params: [&(dyn ToSql + Sync); 4] = [&roles, &claims, &topics, &presence];
    let rows = call(
        pool,
        timeout,
        false,
        "SELECT subject_no, broadcast_read, presence_read, error_code, error_message \
         FROM walcast.channel_access($1, $2, $3, $4) ORDER BY subject_no",
        &params,
    )
    .await?;
    Ok(rows
        .iter()
        .map(|row| {
            failure(row, 3).unwrap_or_else(|| {
                Outcome::Decided(Read {
                    broadcast: row.get::<_, Option<bool>>(1).unwrap_or(false),
                    presence: row.get(2),
                })
            })
        })
        .collect())
}

/// May each subject write `extensions[i]` (`broadcast` or `presence`) to
/// its topic?
pub async fn write(
    pool: &Pool,
    timeout: Duration,
    subjects: &[Subject<'_>],
    extensions: &[&str],
) -> Result<Vec<Outcome<bool>>, Error> {
    if subjects.is_empty() {
        return Ok(Vec::new());
    }
    let (roles, claims, topics) = columns(subjects);
    let params: [&(dyn ToSql + Sync); 4] = [&roles, &claims, &topics, &extensions];
    let rows = call(
        pool,
        timeout,
        false,
        "SELECT subject_no, allowed, error_code, error_message \
         FROM walcast.channel_write($1, $2, $3, $4) ORDER BY subject_no",
        &params,
    )
    .await?;
    Ok(rows
        .iter()
        .map(|row| {
            failure(row, 2)
                .unwrap_or_else(|| Outcome::Decided(row.get::<_, Option<bool>>(1).unwrap_or(false)))
        })
        .collect())
}

/// A committed message, as [`readable`] asks about it.
#[derive(Debug, Clone, Copy)]
pub struct Row<'a> {
    /// Its id (a uuid's text).
    pub id: &'a str,
    /// Its `inserted_at` (timestamp text): the partition to look in.
    pub inserted_at: &'a str,
    /// Its topic.
    pub topic: &'a str,
}

/// Which of the committed messages may each subject read? Its candidates
/// are the messages of its topic; the answer lists their positions in
/// `rows` (0-based). The rows go sorted by topic, so that each subject
/// reads only its own.
pub async fn readable(
    pool: &Pool,
    timeout: Duration,
    rows: &[Row<'_>],
    subjects: &[Subject<'_>],
) -> Result<Vec<Outcome<Vec<u32>>>, Error> {
    if subjects.is_empty() {
        return Ok(Vec::new());
    }
    let mut order: Vec<usize> = (0..rows.len()).collect();
    order.sort_by_key(|&i| rows[i].topic);
    let ids: Vec<&str> = order.iter().map(|&i| rows[i].id).collect();
    let inserted: Vec<&str> = order.iter().map(|&i| rows[i].inserted_at).collect();
    // Each subject's range of the sorted rows, 1-based (empty: 1..0).
    let (mut firsts, mut lasts) = (Vec::with_capacity(subjects.len()), Vec::new());
    for subject in subjects {
        let from = order.partition_point(|&i| rows[i].topic < subject.topic);
        let to = order.partition_point(|&i| rows[i].topic <= subject.topic);
        if from < to {
            firsts.push(from as i32 + 1);
            lasts.push(to as i32);
        } else {
            firsts.push(1);
            lasts.push(0);
        }
    }
    let (roles, claims, topics) = columns(subjects);
    let params: [&(dyn ToSql + Sync); 7] =
        [&ids, &inserted, &roles, &claims, &topics, &firsts, &lasts];
    let answer = call(
        pool,
        timeout,
        true,
        "SELECT subject_no, visible, error_code, error_message \
         FROM walcast.readable_messages($1::text[]::uuid[], $2::text[]::timestamp[], $3, $4, $5, $6, $7) \
         ORDER BY subject_no",
        &params,
    )
    .await?;
    Ok(answer
        .iter()
        .map(|row| {
            failure(row, 2).unwrap_or_else(|| {
                let visible: Vec<i32> = row.get::<_, Option<Vec<i32>>>(1).unwrap_or_default();
                Outcome::Decided(
                    visible
                        .into_iter()
                        .filter_map(|p| usize::try_from(p - 1).ok())
                        .filter_map(|p| order.get(p).and_then(|&i| u32::try_from(i).ok()))
                        .collect(),
                )
            })
        })
        .collect())
}

/// A stored message, as Broadcast Replay sends it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    /// Its id (a uuid's text).
    pub id: String,
    /// Its event.
    pub event: String,
    /// Its JSON payload's text, or its bytes.
    pub body: crate::messages::Body,
}

/// Broadcast Replay: the newest private broadcasts of `subject`'s topic
/// inserted since `since_ms` (Unix milliseconds), at most `limit`, oldest
/// first — as Supabase selects them, and only those the subject's policies
/// show (read as the subject) and small enough to be sent live
/// ([`crate::messages::MAX_BODY_BYTES`]).
pub async fn replay(
    pool: &Pool,
    timeout: Duration,
    subject: &Subject<'_>,
    since_ms: i64,
    limit: u32,
) -> Result<Vec<Stored>, Error> {
    let deadline = timeout + CLIENT_GRACE;
    let mut client = tokio::time::timeout(deadline, pool.get())
        .await
        .map_err(|_| Error::Timeout(timeout))??;
    let sub = serde_json::from_str::<serde_json::Value>(subject.claims)
        .ok()
        .and_then(|c| c.get("sub").and_then(|s| s.as_str()).map(str::to_owned))
        .unwrap_or_default();
    let limit = i64::from(limit);
    // A row too large to be broadcast live is not replayed either: a join
    // asking for replays must not pull more than 25 sendable messages.
    let max_bytes = crate::messages::MAX_BODY_BYTES as i32;
    let asked = async {
        let tx = client.build_transaction().read_only(true).start().await?;
        let millis = format!("{}ms", timeout.as_millis().clamp(1, i32::MAX as u128));
        tx.execute(
            "SELECT pg_catalog.set_config('statement_timeout', $1, true), \
                    pg_catalog.set_config('role', $2, true), \
                    pg_catalog.set_config('request.jwt.claims', $3, true), \
                    pg_catalog.set_config('request.jwt.claim.sub', $4, true), \
                    pg_catalog.set_config('request.jwt.claim.role', $2, true), \
                    pg_catalog.set_config('realtime.topic', $5, true)",
            &[
                &millis,
                &subject.role,
                &subject.claims,
                &sub,
                &subject.topic,
            ],
        )
        .await?;
        let rows = tx
            .query(
                "SELECT id::text, event, payload::text, binary_payload FROM realtime.messages \
                 WHERE topic = $1 AND private IS TRUE AND extension = 'broadcast' \
                   AND inserted_at >= to_timestamp($2::double precision / 1000) \
                   AND inserted_at < now() + interval '1 minute' \
                   AND coalesce(octet_length(payload::text), octet_length(binary_payload), 0) <= $4 \
                 ORDER BY inserted_at DESC LIMIT $3",
                &[&subject.topic, &(since_ms as f64), &limit, &max_bytes],
            )
            .await?;
        tx.rollback().await?;
        Ok::<_, tokio_postgres::Error>(rows)
    };
    let rows = match tokio::time::timeout(deadline, asked).await {
        Ok(rows) => rows?,
        Err(_) => {
            drop(Object::take(client));
            return Err(Error::Timeout(timeout));
        }
    };
    let mut stored: Vec<Stored> = rows
        .iter()
        .filter_map(|row| {
            let event: Option<String> = row.get(1);
            let body = match row.get::<_, Option<Vec<u8>>>(3) {
                Some(bytes) => crate::messages::Body::Binary(bytes),
                None => crate::messages::Body::Json(bytes::Bytes::from(
                    row.get::<_, Option<String>>(2)
                        .unwrap_or_else(|| "null".to_owned()),
                )),
            };
            Some(Stored {
                id: row.get(0),
                event: event?,
                body,
            })
        })
        .collect();
    stored.reverse();
    Ok(stored)
}

/// The subjects as three parallel arrays.
fn columns<'a>(subjects: &[Subject<'a>]) -> (Vec<&'a str>, Vec<&'a str>, Vec<&'a str>) {
    (
        subjects.iter().map(|s| s.role).collect(),
        subjects.iter().map(|s| s.claims).collect(),
        subjects.iter().map(|s| s.topic).collect(),
    )
}

/// A row's failure, from its `error_code` column at `at` and the message
/// after it.
fn failure<T>(row: &tokio_postgres::Row, at: usize) -> Option<Outcome<T>> {
    let code: Option<String> = row.get(at);
    code.map(|code| Outcome::Failed {
        code,
        message: row.get::<_, Option<String>>(at + 1).unwrap_or_default(),
    })
}

/// Runs `sql` in a transaction (read only when `read_only`) that is rolled
/// back, under `statement_timeout`; a server that does not answer in time
/// loses its connection.
async fn call(
    pool: &Pool,
    timeout: Duration,
    read_only: bool,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
) -> Result<Vec<tokio_postgres::Row>, Error> {
    let deadline = timeout + CLIENT_GRACE;
    let mut client = tokio::time::timeout(deadline, pool.get())
        .await
        .map_err(|_| Error::Timeout(timeout))??;
    let asked = async {
        let tx = client
            .build_transaction()
            .read_only(read_only)
            .start()
            .await?;
        let millis = format!("{}ms", timeout.as_millis().clamp(1, i32::MAX as u128));
        tx.execute(
            "SELECT pg_catalog.set_config('statement_timeout', $1, true)",
            &[&millis],
        )
        .await?;
        let rows = tx.query(sql, params).await?;
        tx.rollback().await?;
        Ok::<_, tokio_postgres::Error>(rows)
    };
    match tokio::time::timeout(deadline, asked).await {
        Ok(rows) => Ok(rows?),
        Err(_) => {
            drop(Object::take(client));
            Err(Error::Timeout(timeout))
        }
    }
}
