//! Wiring and supervision of `walcast run`.
//!
//! ```text
//!            ┌──────────── replication task (one, sequential) ───────────┐
//! Postgres ─▶│ stream ─▶ pgoutput::Decoder ─▶ change::Assembler ─▶ encode │─ Batch ─▶ publisher task ─▶ Redis
//!            │   ▲ status updates (every tick, and when asked)            │ (bounded)      │
//!            └───┴──────────────── acknowledged LSN ◀─────────────────────┘◀───────────────┘
//! ```
//!
//! A session is one Redis connection plus one replication connection. Any
//! error ends the session; a transient one (a server gone away, a slot held
//! by another process) is retried with backoff from the acknowledged LSN,
//! a definite one (bad password, missing publication) stops the daemon with
//! a message that says what to fix. Redis is connected first, so while it
//! is away the slot is not read at all and nothing is acknowledged.
//!
//! When the publisher falls behind, the bounded channel fills and the loop
//! stops reading WAL, but it keeps sending status updates so the walsender
//! does not time the connection out.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use backon::BackoffBuilder;
use bytes::Bytes;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::admin::{self, Admin, Readiness};
use crate::bus::server::Server;
use crate::bus::{Names, Reply};
use crate::catalog::{self, Catalog};
use crate::change::{self, Assembler, Change, ChangeKind, Datum, Described, Event, OldRow, Row};
use crate::config::{RlsSettings, Settings};
use crate::control::{ControlTask, Validator};
use crate::encode::{PayloadEncoder, View};
use crate::lsn::Lsn;
use crate::metrics;
use crate::publish::{self, Acknowledged, Batch, Outgoing, Publisher, QueueSender};
use crate::replication::{self, Connection, ReplicationStream, StreamEvent};
use crate::subscription::{self, Candidates, Delivery, Denial, Shared};
use crate::{bus, channels, messages, pgoutput, pool, rls};

/// Bytes of messages the replication task may queue ahead of the publisher
/// (with what the publisher holds in a pipeline): while they wait, no more
/// WAL is read, so memory stays flat whatever the rows.
const QUEUE_BYTES: usize = 8 << 20;
/// Messages per batch before it is handed over even mid-transaction, so a
/// huge transaction streams through in bounded memory.
const MESSAGES_PER_BATCH: usize = 512;
/// How long cached privileges and RLS flags are trusted.
const CATALOG_REFRESH: Duration = Duration::from_secs(60);
/// Connections for catalog lookups and server-side filters, besides those
/// RLS checks run on (`rls_connections`).
const POOL_CONNECTIONS: usize = 2;
/// How long shutdown waits for queued messages to reach Redis.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Why the daemon stopped or a session ended.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The replication connection failed.
    #[error(transparent)]
    Replication(#[from] replication::Error),
    /// A pgoutput message could not be decoded.
    #[error("decoding the replication stream: {0}")]
    Decode(#[from] pgoutput::Error),
    /// The message stream was inconsistent.
    #[error("assembling transactions: {0}")]
    Assemble(#[from] change::Error),
    /// Publishing to Redis failed.
    #[error("publishing: {0}")]
    Publish(#[from] publish::Error),
    /// The catalog could not be read.
    #[error(transparent)]
    Catalog(#[from] catalog::Error),
    /// Who may see a change could not be decided.
    #[error(transparent)]
    Deliver(#[from] subscription::DeliverError),
    /// The connection pool could not be built.
    #[error(transparent)]
    Pool(#[from] pool::Error),
    /// The publisher task ended without saying why (it panicked).
    #[error("the publisher task stopped unexpectedly")]
    PublisherGone,
    /// The admin server (metrics, health) could not be set up.
    #[error(transparent)]
    Admin(#[from] admin::Error),
    /// The session streamed without the messages publication until the WAL
    /// it could not decode with it was acknowledged; a new session adds it.
    #[error("restarting to stream the messages publication from {0}")]
    AddMessages(Lsn),
}

impl Error {
    /// Whether a new session may succeed without an operator's help.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Replication(e) => e.is_transient(),
            Error::Publish(e) => e.is_transient(),
            Error::Catalog(e) => e.is_transient(),
            Error::Deliver(e) => e.is_transient(),
            Error::AddMessages(_) => true,
            Error::Pool(_) | Error::Admin(_) => false,
            // Bytes we cannot decode will be the same bytes next time.
            Error::Decode(_) | Error::Assemble(_) | Error::PublisherGone => false,
        }
    }
}

/// Runs sessions until `cancel` fires (`Ok`) or a definite error (`Err`).
pub async fn run(settings: &Settings, cancel: CancellationToken) -> Result<(), Error> {
    let acked = Acknowledged::new(Lsn::ZERO);
    let pool = pool::build(
        &settings.database_url,
        POOL_CONNECTIONS + settings.rls.connections,
        Some(settings.rls.timeout),
    )?;
    let server =
        Server::open(&settings.redis_url, settings.redis_cluster).map_err(publish::Error::from)?;
    // Served until this function returns (dropping it aborts the server).
    let admin = Admin::start(settings, &server, &pool, &cancel)?;
    // Before subscriptions are validated: they are refused on tables with
    // RLS while the checks' SQL is missing. (Again at each session, for a
    // database that is not reachable yet.)
    ensure_rls_sql(&pool).await;
    // Before the first session: its messages publication and partitions
    // are then there, and no DDL of ours runs while its slot is created.
    if let Err(e) = messages::install::ensure(&pool).await {
        warn!(error = %e, "could not check for realtime.messages");
    }
    let mut said_missing = false;
    messages::partitions::round(&pool, settings.messages_retention, &mut said_missing).await;
    let names = Names::on(&server, &settings.tenant);
    // The registry outlives replication sessions; the control task keeps it.
    let shared = Arc::new(Shared::default());
    let control = ControlTask::new(
        server.clone(),
        names.clone(),
        Validator::new(
            pool.clone(),
            settings.publication.clone(),
            settings.allowed_roles.clone(),
        ),
        shared.clone(),
        pool.clone(),
        settings.rls.timeout,
    );
    let control_cancel = cancel.child_token();
    let control = tokio::spawn(control.run(control_cancel.clone()));
    let janitor = tokio::spawn(messages::partitions::keep(
        pool.clone(),
        settings.messages_retention,
        said_missing,
        control_cancel.clone(),
    ));
    let parts = Parts {
        settings,
        server: &server,
        pool: &pool,
        shared: &shared,
        acked: &acked,
        readiness: admin.readiness(),
    };
    let result = supervise(parts, &cancel).await;
    control_cancel.cancel();
    let _ = control.await;
    let _ = janitor.await;
    result
}

/// What every session of a run shares.
#[derive(Clone, Copy)]
struct Parts<'a> {
    settings: &'a Settings,
    server: &'a Server,
    pool: &'a deadpool_postgres::Pool,
    shared: &'a Arc<Shared>,
    acked: &'a Acknowledged,
    readiness: &'a Readiness,
}

async fn supervise(parts: Parts<'_>, cancel: &CancellationToken) -> Result<(), Error> {
    let Parts {
        settings,
        pool,
        acked,
        readiness,
        ..
    } = parts;
    let backoff = backon::ExponentialBuilder::new()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(settings.reconnect_max_delay)
        .with_jitter()
        .without_max_times();
    let mut delays = backoff.build();
    // A slot in use although its lock was free: the active daemon's
    // walsender still exiting (milliseconds), or a reader that is not
    // walcast. Asked again soon, at most every 2 s.
    let in_use_backoff = backon::ExponentialBuilder::new()
        .with_min_delay(Duration::from_millis(50))
        .with_max_delay(Duration::from_secs(2))
        .with_jitter()
        .without_max_times();
    let mut in_use_delays = in_use_backoff.build();
    // Where streaming the messages publication may start (see
    // `messages_publication_too_young`).
    let mut messages_from = None;
    loop {
        let before = acked.get();
        let result = session(parts, messages_from, cancel).await;
        readiness.set_streaming(false);
        if cancel.is_cancelled() {
            return Ok(());
        }
        let err = match result {
            Ok(()) => return Ok(()),
            Err(Error::AddMessages(at)) => {
                info!(from = %at, "the slot is past the messages publication's creation; streaming it too");
                messages_from = None;
                delays = backoff.build();
                continue;
            }
            Err(err) if messages_publication_too_young(&err, &settings.messages_publication) => {
                let at = current_wal(pool).await?;
                warn!(
                    publication = %settings.messages_publication,
                    until = %at,
                    "the slot's WAL predates the messages publication, which Postgres before 18 cannot decode with it: streaming without it until the slot passes {at} (rows of realtime.messages written before then are not broadcast)"
                );
                messages_from = Some(at);
                continue;
            }
            Err(err) if err.is_transient() => err,
            Err(err) => return Err(err),
        };
        if let Error::Publish(_) = &err {
            readiness.set_redis(false);
            metrics::counter!(metrics::REDIS_ERRORS, metrics::TASK => metrics::TASK_PUBLISHER)
                .increment(1);
            metrics::counter!(metrics::REDIS_RECONNECTS, metrics::TASK => metrics::TASK_PUBLISHER)
                .increment(1);
        }
        if acked.get() > before {
            delays = backoff.build();
            in_use_delays = in_use_backoff.build();
        }
        let delay = match &err {
            Error::Replication(replication::Error::SlotInUse { .. }) => {
                let delay = in_use_delays.next().unwrap_or(Duration::from_secs(2));
                info!(error = %err, retry_in = ?delay, "standing by");
                delay
            }
            _ => {
                let delay = delays.next().unwrap_or(settings.reconnect_max_delay);
                warn!(error = %err, retry_in = ?delay, acked = %acked.get(), "session ended; reconnecting");
                delay
            }
        };
        tokio::select! {
            () = cancel.cancelled() => return Ok(()),
            () = tokio::time::sleep(delay) => {}
        }
    }
}

/// Whether a session ended because pgoutput could not find the messages
/// publication in the catalog as it was at the WAL being decoded: it was
/// created after the slot's position (`walcast setup` run after the daemon
/// started). Postgres 18 skips such a publication instead.
fn messages_publication_too_young(err: &Error, publication: &str) -> bool {
    match err {
        Error::Replication(replication::Error::Db(db)) => {
            db.code == "42704" && db.message.contains(&format!("\"{publication}\""))
        }
        _ => false,
    }
}

/// The server's current WAL position.
async fn current_wal(pool: &deadpool_postgres::Pool) -> Result<Lsn, Error> {
    let client = pool.get().await.map_err(catalog::Error::from)?;
    let row = client
        .query_one("SELECT pg_catalog.pg_current_wal_lsn()::text", &[])
        .await
        .map_err(catalog::Error::from)?;
    let text: String = row.get(0);
    text.parse().map_err(|_| {
        Error::Replication(replication::Error::Protocol(format!(
            "pg_current_wal_lsn() returned {text:?}"
        )))
    })
}

async fn session(
    parts: Parts<'_>,
    messages_from: Option<Lsn>,
    cancel: &CancellationToken,
) -> Result<(), Error> {
    let Parts {
        settings,
        server,
        pool,
        shared,
        acked,
        readiness,
    } = parts;
    let publisher = Publisher::connect(server).await?;
    let mut conn = Connection::connect(&settings.database_url).await?;
    // One daemon streams a slot; another waits here, its hot standby,
    // with its registry kept by the control task all along.
    let mut standing_by = None;
    tokio::select! {
        locked = conn.lock_slot(&settings.slot, || {
            info!(slot = %settings.slot, "another daemon streams this slot; standing by until its connection ends");
            standing_by = Some(Instant::now());
        }) => locked?,
        () = cancel.cancelled() => return Ok(()),
    }
    if let Some(since) = standing_by {
        info!(slot = %settings.slot, stood_by = ?since.elapsed(), "the slot's lock is free: taking over");
        metrics::counter!(metrics::TAKEOVERS).increment(1);
    }
    ensure_rls_sql(pool).await;
    let system = conn.identify_system().await?;
    conn.check_wal_level().await?;
    conn.check_publication(&settings.publication).await?;
    // Broadcast from Database rides the same slot when its publication
    // exists (sql/realtime.sql creates it).
    let messages = conn
        .publication_exists(&settings.messages_publication)
        .await?;
    let slot = conn
        .ensure_slot(&settings.slot, settings.slot_failover)
        .await?;
    if slot.created {
        info!(slot = %settings.slot, at = %slot.confirmed_flush, failover = ?slot.failover, "created replication slot");
    }
    if settings.slot_failover && slot.failover.is_none() {
        warn!(
            slot = %settings.slot,
            server = conn.server_major().unwrap_or(0),
            "slot_failover needs PostgreSQL 17 or later: this slot is not synchronized to standby servers, and a database failover loses it (see the README's \"Database failover\")"
        );
    }
    // Status updates start from what the slot already confirmed, so even the
    // first one never reports a position behind it.
    acked.advance(slot.confirmed_flush);
    let start = acked.get();
    shared.set_position(start);
    let mut publications = vec![settings.publication.as_str()];
    // Until the slot is past `messages_from`, the publication cannot be
    // decoded; this session then ends once it is.
    let add_messages_at = messages_from.filter(|at| messages && acked.get() < *at);
    if messages && add_messages_at.is_none() {
        publications.push(settings.messages_publication.as_str());
    }
    // Changes are matched against subscriptions: not before the gateways'
    // registrations are read back (after a restart they all exist).
    tokio::select! {
        () = shared.recovered() => {}
        () = cancel.cancelled() => return Ok(()),
    }
    let stream = conn
        .start_replication(&settings.slot, start, &publications)
        .await?;
    // From now until the session ends, this daemon answers the gateways
    // (not before: a slot still in use would make it answer, then fall
    // silent, then answer everything again every retry).
    let _holding = Holding::new(shared);
    readiness.set_streaming(true);
    info!(
        slot = %settings.slot,
        publication = %settings.publication,
        messages_publication = publications.get(1).copied(),
        from = %start,
        server_wal = %system.xlog_pos,
        "streaming"
    );
    let (tx, rx) = publish::queue(QUEUE_BYTES);
    let publishing = tokio::spawn({
        let acked = acked.clone();
        async move { publisher.run(rx, &acked).await }
    });
    let names = Names::on(server, &settings.tenant);
    let firehose: Option<Arc<str>> = settings.firehose.then(|| Arc::from(names.firehose()));
    let mut stream_loop = StreamLoop {
        stream,
        // The timeline too: a promoted standby or a restored backup keeps
        // the system identifier, and its LSNs may start below ours.
        system: Arc::from(format!("{}.{}", system.system_id, system.timeline).as_str()),
        tx,
        publishing,
        acked: acked.clone(),
        firehose,
        names,
        shared: shared.clone(),
        pool: pool.clone(),
        data: Vec::with_capacity(4096),
        refreshed: Instant::now(),
        decoder: pgoutput::Decoder::new(),
        catalog: Catalog::new(pool.clone()),
        payload: PayloadEncoder::new(settings.max_record_bytes),
        scratch: Vec::with_capacity(4096),
        assembler: Assembler::new(),
        current: Batch::default(),
        pending: VecDeque::new(),
        held: Vec::new(),
        held_with_candidates: 0,
        held_for_rls: 0,
        held_private: 0,
        held_ack: None,
        release_at: None,
        rls: settings.rls,
        received: start,
        add_messages_at,
    };
    let result = stream_loop.run(settings.status_interval, cancel).await;
    match result {
        Ok(()) => {
            stream_loop.shut_down().await;
            Ok(())
        }
        Err(e) => {
            stream_loop.publishing.abort();
            Err(e)
        }
    }
}

/// Marks this daemon as the one that holds the slot's lock, and so answers
/// the gateways, for as long as it lives.
struct Holding<'a>(&'a Shared);

impl<'a> Holding<'a> {
    fn new(shared: &'a Shared) -> Self {
        shared.set_active(true);
        Holding(shared)
    }
}

impl Drop for Holding<'_> {
    fn drop(&mut self) {
        self.0.set_active(false);
    }
}

/// Installs or upgrades `sql/rls.sql` where this role may; says so when the
/// database has another version or none (subscriptions to tables with RLS
/// are refused meanwhile).
async fn ensure_rls_sql(pool: &deadpool_postgres::Pool) {
    match rls::install::ensure(pool).await {
        Ok(found) => {
            if let Some(problem) = found.problem() {
                warn!("{problem}");
            }
        }
        Err(e) => warn!(error = %e, "could not check sql/rls.sql"),
    }
}

/// The replication task's state for one session.
struct StreamLoop {
    stream: ReplicationStream,
    /// `<system identifier>.<timeline>`: whose LSNs the events' positions
    /// are, in every event for gateways.
    system: Arc<str>,
    tx: QueueSender,
    publishing: JoinHandle<Result<(), publish::Error>>,
    acked: Acknowledged,
    firehose: Option<Arc<str>>,
    names: Names,
    /// The subscriptions, shared with the control task.
    shared: Arc<Shared>,
    /// For filters and visibility checks only the server can decide.
    pool: deadpool_postgres::Pool,
    /// One view of the current change's `data` object.
    data: Vec<u8>,
    /// When cached privileges and RLS flags were last dropped.
    refreshed: Instant,
    decoder: pgoutput::Decoder,
    catalog: Catalog,
    payload: PayloadEncoder,
    /// Where each message is encoded before it is copied out.
    scratch: Vec<u8>,
    assembler: Assembler,
    /// Messages of the transaction being read.
    current: Batch,
    /// Batches the publisher's queue has no room for yet; while any waits,
    /// no WAL is read.
    pending: VecDeque<Batch>,
    /// Changes whose visibility is decided together (one RLS call per
    /// table for the lot), released in order.
    held: Vec<(Change, Candidates)>,
    /// How many of `held` have candidates (visibility to decide).
    held_with_candidates: usize,
    /// How many of those need an RLS check (an INSERT or UPDATE of a table
    /// with row level security, a message to a private topic with
    /// readers): only they wait for `rls_batch_wait`.
    held_for_rls: usize,
    /// How many of `held` are messages to private topics with readers.
    held_private: usize,
    /// The end of the last commit whose changes are all in `held` (or
    /// already queued): acknowledged with them.
    held_ack: Option<Lsn>,
    /// When held changes waiting for RLS checks are released at the latest.
    release_at: Option<tokio::time::Instant>,
    /// How RLS checks are batched (`rls_batch_size`, `rls_batch_wait`) and
    /// run.
    rls: RlsSettings,
    /// The furthest WAL position the server reported.
    received: Lsn,
    /// Once this is acknowledged, the session ends so that the next one
    /// streams the messages publication too.
    add_messages_at: Option<Lsn>,
}

impl StreamLoop {
    async fn run(
        &mut self,
        status_interval: Duration,
        cancel: &CancellationToken,
    ) -> Result<(), Error> {
        let mut tick = tokio::time::interval(status_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let event = tokio::select! {
                biased;
                () = cancel.cancelled() => return Ok(()),
                joined = &mut self.publishing => return Err(publisher_outcome(joined)),
                _ = tick.tick() => Step::Status,
                () = sleep_until_or_never(self.release_at), if self.release_at.is_some() && self.pending.is_empty() => Step::Release,
                room = room_for_front(&self.tx, &self.pending), if !self.pending.is_empty() => {
                    let Ok(room) = room else { return Err(Error::PublisherGone) };
                    if let Some(batch) = self.pending.pop_front()
                        && self.tx.send_with(batch, room).is_err()
                    {
                        return Err(Error::PublisherGone);
                    }
                    continue;
                }
                event = self.stream.next(), if self.pending.is_empty() => Step::Event(event?),
            };
            match event {
                Step::Event(event) => self.handle(event).await?,
                Step::Status => self.send_status().await?,
                Step::Release => {
                    self.release_at = None;
                    self.release().await?;
                    self.hand_over();
                }
            }
        }
    }

    async fn handle(&mut self, event: StreamEvent) -> Result<(), Error> {
        match event {
            StreamEvent::XLogData { wal_end, data, .. } => {
                self.received = self.received.max(wal_end);
                let message = self.decoder.decode(data)?;
                if let pgoutput::Message::Begin(begin) = &message {
                    self.shared.set_position(begin.final_lsn);
                    // GRANTs and ALTER TABLE ... ENABLE ROW LEVEL SECURITY
                    // leave no trace on the stream: re-read them now and then.
                    if self.refreshed.elapsed() >= CATALOG_REFRESH {
                        self.catalog.invalidate_all();
                        self.refreshed = Instant::now();
                    }
                }
                match self.assembler.apply(message)? {
                    Event::None => {}
                    Event::Relation(rel) => {
                        // A table or one of its types may have changed.
                        self.catalog.invalidate_all();
                        let described = describe(&mut self.catalog, &rel).await?;
                        self.assembler.add_relation(rel, described);
                    }
                    Event::Type(oid) => self.catalog.invalidate(oid),
                    Event::Change(change) => self.add(change).await?,
                    Event::Changes(changes) => {
                        for change in changes {
                            self.add(change).await?;
                        }
                    }
                    Event::Commit { end_lsn, .. } => {
                        metrics::counter!(metrics::TRANSACTIONS).increment(1);
                        self.held_ack = Some(end_lsn);
                        // Small transactions in a burst travel together, not
                        // one batch per commit: once enough has gathered, or
                        // nothing more has arrived — and when RLS checks are
                        // due, after waiting up to rls_batch_wait for more, so
                        // that one check covers many changes.
                        let full = self.held.len() >= self.rls.batch_size
                            || self.current.messages.len() >= MESSAGES_PER_BATCH;
                        let checks_due = self.held_for_rls > 0;
                        if full || (!checks_due && !self.stream.event_ready().await) {
                            self.release().await?;
                            self.hand_over();
                            self.release_at = None;
                        } else if checks_due && self.release_at.is_none() {
                            self.release_at =
                                Some(tokio::time::Instant::now() + self.rls.batch_wait);
                        }
                    }
                }
            }
            StreamEvent::Keepalive {
                wal_end,
                reply_requested,
            } => {
                self.received = self.received.max(wal_end);
                // Outside a transaction everything up to wal_end has been
                // sent; queued behind earlier batches, this acknowledges it
                // once they are published, so a quiet slot does not retain WAL.
                // Changes waiting to be checked together keep waiting (their
                // release acknowledges them); otherwise everything up to
                // wal_end is acknowledged once what came before is published.
                if !self.assembler.in_transaction() && self.release_at.is_none() {
                    self.release().await?;
                    self.current.ack = Some(wal_end);
                    self.hand_over();
                }
                if reply_requested {
                    self.send_status().await?;
                }
            }
            StreamEvent::End => {
                return Err(replication::Error::Io {
                    context: "streaming",
                    source: std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "the server ended the replication stream",
                    ),
                }
                .into());
            }
        }
        Ok(())
    }

    async fn add(&mut self, change: Change) -> Result<(), Error> {
        metrics::counter!(metrics::CHANGES_RECEIVED, metrics::KIND => change.kind.name())
            .increment(1);
        let candidates = self.shared.read().candidates(&change);
        let broadcast = matches!(change.kind, ChangeKind::Insert { .. })
            && messages::is_messages_table(&change.relation);
        if self.firehose.is_none() && candidates.is_empty() && !broadcast {
            return Ok(());
        }
        // A message to a private topic with readers waits for the batch's
        // one readability check, as RLS checks of changes do.
        if broadcast
            && let Ok(Some(message)) = messages::decode(&change)
            && message.private
            && !self
                .shared
                .read()
                .private_members(&message.topic)
                .is_empty()
        {
            self.held_for_rls += 1;
            self.held_private += 1;
        }
        if !candidates.is_empty() {
            self.held_with_candidates += 1;
            let checked = matches!(
                change.kind,
                ChangeKind::Insert { .. } | ChangeKind::Update { .. }
            ) && self.catalog.row_security(change.relation.id).await?;
            self.held_for_rls += usize::from(checked);
        }
        self.held.push((change, candidates));
        if self.held.len() >= self.rls.batch_size {
            self.release().await?;
        }
        Ok(())
    }

    /// Decides who sees the held changes (together), queues their messages
    /// in WAL order, and with them the acknowledgement of the last commit
    /// they complete.
    async fn release(&mut self) -> Result<(), Error> {
        let (changes, candidates): (Vec<Change>, Vec<Candidates>) =
            std::mem::take(&mut self.held).into_iter().unzip();
        self.held_for_rls = 0;
        let mut readers = if std::mem::take(&mut self.held_private) > 0 {
            private_readers(&self.pool, &self.shared, self.rls.timeout, &changes).await
        } else {
            Vec::new()
        }
        .into_iter();
        if std::mem::take(&mut self.held_with_candidates) > 0 {
            let mut batch: Vec<(&Change, Candidates)> = changes.iter().zip(candidates).collect();
            // Who sees a change is decided on its text values, before values
            // only the server can render as JSON are rendered.
            let decided =
                subscription::authorize(&mut self.catalog, &self.pool, &self.rls, &mut batch)
                    .await?;
            drop(batch);
            for (change, (deliveries, denials)) in changes.into_iter().zip(decided) {
                let readers = readers.next().unwrap_or_default();
                self.queue(change, &deliveries, &denials, &readers).await?;
            }
        } else {
            for change in changes {
                let readers = readers.next().unwrap_or_default();
                self.queue(change, &[], &[], &readers).await?;
            }
        }
        if let Some(ack) = self.held_ack.take() {
            self.current.ack = Some(ack);
        }
        Ok(())
    }

    /// Queues one change's messages: the firehose event, error events for
    /// denied subscriptions, one event per view and gateway.
    async fn queue(
        &mut self,
        mut change: Change,
        deliveries: &[Delivery],
        denials: &[Denial],
        readers: &Readers,
    ) -> Result<(), Error> {
        for denial in denials {
            self.deny(&change, denial);
        }
        let queued = self.current.messages.len();
        render_on_server(&self.catalog, &mut change).await?;
        if let Some(channel) = self.firehose.clone() {
            // Encoded into a reused buffer, then copied once into an
            // allocation of exactly the message's size.
            let out = &mut self.scratch;
            out.clear();
            let payload = &mut self.payload;
            bus::write_change_event(out, change.commit_lsn, change.seq, change.xid, |out| {
                payload.write_data(out, &change);
            });
            self.current.messages.push(Outgoing {
                channel,
                payload: Bytes::copy_from_slice(out),
            });
        }
        for delivery in deliveries {
            self.deliver(&change, delivery);
        }
        if messages::is_messages_table(&change.relation) {
            self.broadcast_from_database(&change, readers);
        }
        if self.current.messages.len() > queued {
            self.current.count_change(change.commit_time);
        }
        if self.current.messages.len() >= MESSAGES_PER_BATCH {
            self.hand_over();
        }
        Ok(())
    }

    /// Tells each gateway which of its subscriptions were denied the change
    /// because their visibility could not be decided.
    fn deny(&mut self, change: &Change, denial: &Denial) {
        metrics::counter!(metrics::RLS_ERRORS).increment(denial.entries.len() as u64);
        let mut by_gateway: Vec<(&Arc<str>, Vec<String>)> = Vec::new();
        for entry in &denial.entries {
            match by_gateway.iter_mut().find(|(g, _)| *g == &entry.gateway) {
                Some((_, ids)) => ids.push(entry.id.to_string()),
                None => by_gateway.push((&entry.gateway, vec![entry.id.to_string()])),
            }
        }
        for (gateway, ids) in by_gateway {
            let reply = Reply::Error {
                v: bus::VERSION,
                ids,
                sys: self.system.to_string(),
                lsn: change.commit_lsn.to_string(),
                seq: change.seq,
                message: denial.message.clone(),
            };
            let Ok(text) = serde_json::to_vec(&reply) else {
                continue;
            };
            self.current.messages.push(Outgoing {
                channel: Arc::from(self.names.gateway(gateway)),
                payload: Bytes::from(text),
            });
        }
    }

    /// Queues one event per gateway holding subscriptions of `delivery`.
    fn deliver(&mut self, change: &Change, delivery: &Delivery) {
        self.data.clear();
        let view = View {
            visible: delivery.visible.as_deref(),
            old_record_primary_key_only: delivery.old_record_primary_key_only,
        };
        self.payload.write_view(&mut self.data, change, view);
        let mut by_gateway: Vec<(&Arc<str>, Vec<&str>)> = Vec::new();
        for entry in &delivery.entries {
            match by_gateway.iter_mut().find(|(g, _)| *g == &entry.gateway) {
                Some((_, ids)) => ids.push(&entry.id),
                None => by_gateway.push((&entry.gateway, vec![&entry.id])),
            }
        }
        for (gateway, ids) in by_gateway {
            self.scratch.clear();
            bus::write_gateway_event(
                &mut self.scratch,
                ids,
                &self.system,
                change.commit_lsn,
                change.seq,
                &self.data,
            );
            self.current.messages.push(Outgoing {
                channel: Arc::from(self.names.gateway(gateway)),
                payload: Bytes::copy_from_slice(&self.scratch),
            });
        }
    }

    /// Queues the broadcast a row inserted into `realtime.messages` carries.
    ///
    /// A public topic's goes to its room, for every socket joined to it. A
    /// private topic's goes to the gateways of the private channels whose
    /// role and claims may SELECT the row (`readers`), naming them.
    fn broadcast_from_database(&mut self, change: &Change, readers: &Readers) {
        let message = match messages::decode(change) {
            Ok(Some(message)) => message,
            Ok(None) => return,
            Err(skip) => {
                metrics::counter!(metrics::DATABASE_BROADCASTS, metrics::RESULT => "skipped")
                    .increment(1);
                debug!(lsn = %change.commit_lsn, seq = change.seq, "{skip}");
                return;
            }
        };
        let sent = messages::Sent::Streamed {
            system: &self.system,
            lsn: change.commit_lsn,
            seq: change.seq,
        };
        if !message.private {
            metrics::counter!(metrics::DATABASE_BROADCASTS, metrics::RESULT => "public")
                .increment(1);
            self.current.messages.push(Outgoing {
                channel: Arc::from(self.names.room(&bus::room_key(false, &message.topic))),
                payload: Bytes::from(messages::room_message(&message, Vec::new(), sent)),
            });
            return;
        }
        metrics::counter!(metrics::DATABASE_BROADCASTS, metrics::RESULT => "private").increment(1);
        for (gateway, ids) in readers {
            let ids = ids.iter().map(|id| id.to_string()).collect();
            self.current.messages.push(Outgoing {
                channel: Arc::from(self.names.gateway(gateway)),
                payload: Bytes::from(messages::room_message(&message, ids, sent)),
            });
        }
    }

    /// Hands the current batch to the publisher, or parks it in `pending`
    /// (in order) when the publisher's queue has no room for its bytes. A
    /// publisher that is gone is noticed by the loop (its task ended).
    fn hand_over(&mut self) {
        let batch = std::mem::take(&mut self.current);
        if !self.pending.is_empty() {
            self.pending.push_back(batch);
            return;
        }
        if let Err(Ok(batch)) = self.tx.try_send(batch) {
            self.pending.push_back(batch);
        }
    }

    async fn send_status(&mut self) -> Result<(), Error> {
        let acked = self.acked.get();
        if let Some(at) = self.add_messages_at.filter(|at| acked >= *at) {
            self.stream.send_status(acked).await?;
            return Err(Error::AddMessages(at));
        }
        debug!(received = %self.received, %acked, "status update");
        metrics::gauge!(metrics::ACKNOWLEDGED_LSN).set(acked.0 as f64);
        metrics::gauge!(metrics::RECEIVED_LSN).set(self.received.0 as f64);
        metrics::gauge!(metrics::LAG_BYTES).set(self.received.0.saturating_sub(acked.0) as f64);
        self.stream.send_status(acked).await?;
        Ok(())
    }

    /// Graceful end: hand over what was read, let the publisher finish, report
    /// the final acknowledged LSN, and close the stream.
    async fn shut_down(mut self) {
        if let Err(e) = self.release().await {
            warn!(error = %e, "could not decide the last changes' visibility; they will be sent after restart");
        }
        let mut leftovers: Vec<Batch> = self.pending.drain(..).collect();
        if !self.current.messages.is_empty() || self.current.ack.is_some() {
            leftovers.push(std::mem::take(&mut self.current));
        }
        let drained = async {
            for batch in leftovers {
                if self.tx.send(batch).await.is_err() {
                    break;
                }
            }
            drop(self.tx);
            (&mut self.publishing).await
        };
        match tokio::time::timeout(SHUTDOWN_GRACE, drained).await {
            Ok(Ok(Ok(()))) => {}
            Ok(joined) => {
                warn!(error = %publisher_outcome(joined.map(|r| r.and(Ok(())))), "publisher failed during shutdown")
            }
            Err(_) => {
                warn!(
                    "redis did not take the queued messages in time; they will be sent again after restart"
                );
                self.publishing.abort();
            }
        }
        let acked = self.acked.get();
        if let Err(e) = self.stream.send_status(acked).await {
            warn!(error = %e, "could not send the final status update");
        }
        info!(%acked, "replication stopped");
        self.stream.close().await;
    }
}

/// Replaces the values only the server can render (types with a cast to
/// json) with the server's `to_jsonb`. One query per such value: these
/// types are rare, and exactness is the bar.
async fn render_on_server(catalog: &Catalog, change: &mut Change) -> Result<(), Error> {
    let relation = change.relation.clone();
    if !relation.columns.iter().any(|c| c.ty.needs_server()) {
        return Ok(());
    }
    let rows: Vec<&mut Row> = match &mut change.kind {
        ChangeKind::Insert { new } => vec![new],
        ChangeKind::Update { old, new } => {
            let mut rows = vec![new];
            rows.extend(old.as_mut().map(OldRow::row_mut));
            rows
        }
        ChangeKind::Delete { old } => vec![old.row_mut()],
        ChangeKind::Truncate { .. } => vec![],
    };
    for row in rows {
        for (column, datum) in relation.columns.iter().zip(row.iter_mut()) {
            if let (true, Datum::Text(text)) = (column.ty.needs_server(), &*datum) {
                *datum = Datum::Json(catalog.render_json(&column.ty, text).await?);
            }
        }
    }
    Ok(())
}

/// The catalog's view of a relation: its column types and primary key.
async fn describe(catalog: &mut Catalog, rel: &pgoutput::Relation) -> Result<Described, Error> {
    let mut types = Vec::with_capacity(rel.columns.len());
    for column in &rel.columns {
        types.push(catalog.type_info(column.type_id).await?);
    }
    let primary_key = catalog.primary_key(rel.id).await?;
    // A partition of realtime.messages (a publication without
    // publish_via_partition_root names each) counts as the table.
    let root = if rel.namespace == messages::SCHEMA && messages::is_messages_table_name(&rel.name) {
        catalog
            .messages_parent(rel.id)
            .await?
            .map(|oid| (oid, messages::TABLE.to_owned()))
    } else {
        None
    };
    Ok(Described {
        types,
        primary_key,
        root,
    })
}

/// The private channels that may read one message, by gateway: each
/// gateway gets the message once, naming them.
type Readers = Vec<(Arc<str>, Vec<Arc<str>>)>;

/// A (role, claims, topic): who is asked about a private topic's messages.
type Subject = (Arc<str>, Arc<str>, Arc<str>);

/// One (role, claims, topic) asked about a batch's messages, and the
/// private channels it stands for.
struct Asked {
    role: Arc<str>,
    claims: Arc<str>,
    topic: Arc<str>,
    members: Vec<Arc<subscription::PrivateMember>>,
}

/// For each change (in order), the private channels that may read it when
/// it is a message to a private topic: the members of its topic, asked
/// together (one call for every (role, claims, topic) of the batch) which
/// committed rows their policies show. A subject whose check fails, or a
/// call that fails, reads nothing (counted as an RLS error).
async fn private_readers(
    pool: &deadpool_postgres::Pool,
    shared: &Shared,
    timeout: Duration,
    changes: &[Change],
) -> Vec<Readers> {
    let mut out: Vec<Readers> = changes.iter().map(|_| Vec::new()).collect();
    // The private messages: (change index, message).
    let rows: Vec<(usize, messages::Message)> = changes
        .iter()
        .enumerate()
        .filter(|(_, change)| messages::is_messages_table(&change.relation))
        .filter_map(|(at, change)| match messages::decode(change) {
            Ok(Some(message)) if message.private => Some((at, message)),
            _ => None,
        })
        .collect();
    // Who is asked: each (role, claims, topic) of the members of those
    // topics, once.
    let mut asked: Vec<Asked> = Vec::new();
    {
        let registry = shared.read();
        let mut topics: Vec<&str> = rows.iter().map(|(_, m)| m.topic.as_str()).collect();
        topics.sort_unstable();
        topics.dedup();
        let mut index: HashMap<Subject, usize> = HashMap::new();
        for topic in topics {
            for member in registry.private_members(topic) {
                let key = (
                    member.role.clone(),
                    member.claims_text.clone(),
                    member.topic.clone(),
                );
                let at = *index.entry(key).or_insert_with(|| {
                    asked.push(Asked {
                        role: member.role.clone(),
                        claims: member.claims_text.clone(),
                        topic: member.topic.clone(),
                        members: Vec::new(),
                    });
                    asked.len() - 1
                });
                asked[at].members.push(member.clone());
            }
        }
    }
    if asked.is_empty() {
        return out;
    }
    let asked_rows: Vec<channels::Row<'_>> = rows
        .iter()
        .map(|(_, m)| channels::Row {
            id: &m.id,
            inserted_at: &m.inserted_at,
            topic: &m.topic,
        })
        .collect();
    let subjects: Vec<channels::Subject<'_>> = asked
        .iter()
        .map(|a| channels::Subject {
            role: &a.role,
            claims: &a.claims,
            topic: &a.topic,
        })
        .collect();
    let started = Instant::now();
    let outcomes = channels::readable(pool, timeout, &asked_rows, &subjects).await;
    metrics::histogram!(metrics::RLS_CHECK_SECONDS).record(started.elapsed().as_secs_f64());
    metrics::counter!(metrics::RLS_CHECKS).increment(1);
    let outcomes = match outcomes {
        Ok(outcomes) => outcomes,
        Err(e) => {
            warn!(error = %e, messages = rows.len(), "could not decide who may read messages of private topics; they are not delivered");
            metrics::counter!(metrics::RLS_ERRORS).increment(asked.len() as u64);
            return out;
        }
    };
    for (a, outcome) in asked.iter().zip(outcomes) {
        let visible = match outcome {
            channels::Outcome::Decided(visible) => visible,
            channels::Outcome::Failed { code, message } => {
                debug!(%code, %message, topic = %a.topic, "a private topic's readability check raised: not delivered");
                metrics::counter!(metrics::RLS_ERRORS).increment(1);
                continue;
            }
        };
        for row in visible {
            let Some((at, _)) = rows.get(row as usize) else {
                continue;
            };
            for member in &a.members {
                let readers = &mut out[*at];
                match readers.iter_mut().find(|(g, _)| *g == member.gateway) {
                    Some((_, ids)) => ids.push(member.id.clone()),
                    None => readers.push((member.gateway.clone(), vec![member.id.clone()])),
                }
            }
        }
    }
    out
}

/// What the replication loop does next.
enum Step {
    /// Handle what the server sent.
    Event(StreamEvent),
    /// Send a periodic status update.
    Status,
    /// Held changes waited long enough: decide and queue them.
    Release,
}

/// Sleeps until `at`, or forever without one (the select branch is then
/// disabled anyway).
async fn sleep_until_or_never(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Waits for room in the publisher's queue for the first parked batch.
async fn room_for_front(
    tx: &QueueSender,
    pending: &VecDeque<Batch>,
) -> Result<tokio::sync::OwnedSemaphorePermit, publish::Closed> {
    match pending.front() {
        Some(batch) => tx.room_for(batch).await,
        None => std::future::pending().await,
    }
}

fn publisher_outcome(joined: Result<Result<(), publish::Error>, tokio::task::JoinError>) -> Error {
    match joined {
        Ok(Err(e)) => Error::Publish(e),
        Ok(Ok(())) | Err(_) => {
            error!("publisher task ended unexpectedly");
            Error::PublisherGone
        }
    }
}
