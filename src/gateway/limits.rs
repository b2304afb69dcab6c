//! The gateway's limits, as Supabase Realtime's tenant limits work:
//! concurrent sockets (`max_concurrent_users`), channels per socket
//! (`max_channels_per_client`) and channel joins per second
//! (`max_joins_per_second`). Supabase counts the first and the last per
//! tenant across its cluster; a gateway counts them for the sockets it
//! serves (it shares nothing with other gateways but Redis).
//!
//! Supabase has no bound on what one join may carry; walcast adds them
//! (topic, bindings, binding and token sizes), so that what a socket
//! costs the gateway and Redis is bounded by these settings, never by
//! what a client chooses to send.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The limits' values (`GatewaySettings`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Sockets open at once; more are refused with HTTP 429.
    pub max_concurrent_users: usize,
    /// Channels one socket may have joined at once.
    pub max_channels_per_client: usize,
    /// Joins per second, all sockets together (a burst of this many).
    pub max_joins_per_second: u32,
    /// Bytes of a channel topic (`realtime:` included).
    pub max_topic_bytes: usize,
    /// `postgres_changes` bindings of one join.
    pub max_bindings_per_channel: usize,
    /// Bytes of one `postgres_changes` binding's JSON text (its filter,
    /// `select` and any other field together).
    pub max_binding_bytes: usize,
    /// Bytes of a JWT (connect, join or `access_token`): bounds the claims
    /// stored with every channel, before any signature is checked.
    pub max_jwt_bytes: usize,
    /// Sockets one client address may hold at once; 0: no limit (the
    /// default: behind a proxy every client has the proxy's address).
    pub max_sockets_per_address: usize,
    /// Broadcast messages per second, in and out, all sockets together
    /// (Supabase's rolling one-minute average).
    pub max_events_per_second: u32,
    /// Bytes of a broadcast payload or presence meta, in KB (1000 bytes).
    pub max_payload_size_in_kb: usize,
    /// Presence messages per second, all sockets together (the same
    /// rolling average).
    pub max_presence_events_per_second: u32,
    /// Presence calls (track, untrack) one channel may make per window.
    pub max_client_presence_events_per_window: u32,
    /// That window.
    pub client_presence_window: Duration,
}

impl Limits {
    /// The largest payload in bytes: Supabase's `kb * 1000 + 500`.
    pub fn max_payload_bytes(&self) -> usize {
        self.max_payload_size_in_kb
            .saturating_mul(1000)
            .saturating_add(500)
    }
}

impl Default for Limits {
    /// Supabase's defaults for a new tenant.
    fn default() -> Limits {
        Limits {
            max_concurrent_users: 200,
            max_channels_per_client: 100,
            max_joins_per_second: 100,
            max_topic_bytes: 1024,
            max_bindings_per_channel: 100,
            max_binding_bytes: 4096,
            max_jwt_bytes: 16_384,
            max_sockets_per_address: 0,
            max_events_per_second: 100,
            max_payload_size_in_kb: 3000,
            max_presence_events_per_second: 1000,
            max_client_presence_events_per_window: 5,
            client_presence_window: Duration::from_secs(30),
        }
    }
}

/// Supabase's `RateCounter`: events counted in 5 s buckets, the average
/// rate over the last 12 (one minute) compared with a limit at each tick.
/// Counting is one atomic add; the tick runs on the first check after it
/// is due.
#[derive(Debug)]
pub struct RateCounter {
    limit: u64,
    current: AtomicU64,
    triggered: AtomicBool,
    /// The average at the last tick, events per second.
    average: AtomicU64,
    /// When the next tick is due, in ms since `start`.
    next_tick_ms: AtomicU64,
    start: Instant,
    buckets: Mutex<VecDeque<u64>>,
}

/// A bucket's length.
const RATE_TICK: Duration = Duration::from_secs(5);
/// Buckets averaged.
const RATE_BUCKETS: usize = 12;

impl RateCounter {
    /// Triggered when the average reaches `limit` per second.
    pub fn new(limit: u32) -> RateCounter {
        RateCounter {
            limit: u64::from(limit),
            current: AtomicU64::new(0),
            triggered: AtomicBool::new(false),
            average: AtomicU64::new(0),
            next_tick_ms: AtomicU64::new(RATE_TICK.as_millis() as u64),
            start: Instant::now(),
            buckets: Mutex::new(VecDeque::with_capacity(RATE_BUCKETS)),
        }
    }

    /// Counts `n` events.
    pub fn add(&self, n: u64) {
        self.current.fetch_add(n, Ordering::Relaxed);
    }

    /// Whether the average over the last minute, as of the last tick
    /// before `now`, reached the limit.
    pub fn triggered(&self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.start).as_millis() as u64;
        if elapsed >= self.next_tick_ms.load(Ordering::Acquire) {
            self.tick(elapsed);
        }
        self.triggered.load(Ordering::Acquire)
    }

    /// The average rate at the last tick before `now`, per second.
    pub fn average(&self, now: Instant) -> u64 {
        self.triggered(now);
        self.average.load(Ordering::Acquire)
    }

    /// The limit, per second.
    pub fn limit(&self) -> u64 {
        self.limit
    }

    fn tick(&self, elapsed_ms: u64) {
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        let tick = RATE_TICK.as_millis() as u64;
        let mut next = self.next_tick_ms.load(Ordering::Acquire);
        if elapsed_ms < next {
            return; // another thread ticked meanwhile
        }
        // The events so far belong to the first due bucket; the others
        // (the counter was not checked for a while) were empty.
        buckets.push_back(self.current.swap(0, Ordering::AcqRel));
        next += tick;
        let mut empty = 0;
        while elapsed_ms >= next && empty < RATE_BUCKETS {
            buckets.push_back(0);
            next += tick;
            empty += 1;
        }
        if elapsed_ms >= next {
            next = elapsed_ms - elapsed_ms % tick + tick;
        }
        while buckets.len() > RATE_BUCKETS {
            buckets.pop_front();
        }
        let sum: u64 = buckets.iter().sum();
        let window_secs = RATE_TICK.as_secs() * RATE_BUCKETS as u64;
        self.average.store(sum / window_secs, Ordering::Release);
        self.triggered.store(
            sum >= self.limit.saturating_mul(window_secs),
            Ordering::Release,
        );
        self.next_tick_ms.store(next, Ordering::Release);
    }
}

/// Sockets per client address against `max_sockets_per_address`.
#[derive(Debug)]
pub struct PerAddress {
    open: Mutex<HashMap<IpAddr, usize>>,
    max: usize,
}

/// A socket's place among its address's; dropping it frees the place.
#[derive(Debug)]
pub struct AddressSlot {
    addresses: Arc<PerAddress>,
    address: IpAddr,
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut open = self.addresses.lock();
        if let Some(n) = open.get_mut(&self.address) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.address);
            }
        }
    }
}

impl PerAddress {
    /// At most `max` sockets per address; 0: no limit.
    pub fn new(max: usize) -> PerAddress {
        PerAddress {
            open: Mutex::new(HashMap::new()),
            max,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, usize>> {
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A place for one more socket from `address`, or `None` when it holds
    /// `max` already. (Without a limit, nothing is counted.)
    pub fn admit(self: &Arc<Self>, address: IpAddr) -> Option<Option<AddressSlot>> {
        if self.max == 0 {
            return Some(None);
        }
        let mut open = self.lock();
        let n = open.entry(address).or_insert(0);
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(Some(AddressSlot {
            addresses: self.clone(),
            address,
        }))
    }

    /// Addresses holding a socket now (0 without a limit).
    pub fn addresses(&self) -> usize {
        self.lock().len()
    }
}

/// Open sockets against `max_concurrent_users`, mirrored in a gauge.
#[derive(Debug)]
pub struct Sockets {
    open: AtomicUsize,
    max: usize,
    gauge: metrics::Gauge,
}

/// One admitted socket; dropping it frees its place.
#[derive(Debug)]
pub struct Slot {
    sockets: Arc<Sockets>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.sockets.open.fetch_sub(1, Ordering::AcqRel);
        self.sockets.gauge.decrement(1.0);
    }
}

impl Sockets {
    /// At most `max` at once; `gauge` follows the count, so it reads
    /// exactly the places taken.
    pub fn new(max: usize, gauge: metrics::Gauge) -> Sockets {
        Sockets {
            open: AtomicUsize::new(0),
            max,
            gauge,
        }
    }

    /// A place for one more socket, or `None` when `max` are open. The
    /// place is taken before the upgrade completes, so simultaneous
    /// connections cannot overshoot.
    pub fn admit(self: &Arc<Self>) -> Option<Slot> {
        self.open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |open| {
                (open < self.max).then_some(open + 1)
            })
            .ok()
            .map(|_| {
                self.gauge.increment(1.0);
                Slot {
                    sockets: self.clone(),
                }
            })
    }

    /// Sockets admitted and not yet closed.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }
}

/// Joins per second, as a token bucket: `rate` tokens at most, refilled
/// at `rate` per second; a join takes one. A steady `rate` joins per
/// second always pass, a burst of `rate` passes at once, and the limit
/// is reached exactly when the bucket is empty, unlike a per-second
/// window whose edges let twice the rate through.
#[derive(Debug)]
pub struct JoinRate {
    rate: f64,
    bucket: Mutex<Bucket>,
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl JoinRate {
    /// `rate` joins per second (at least 1).
    pub fn new(rate: u32) -> JoinRate {
        let rate = f64::from(rate.max(1));
        JoinRate {
            rate,
            bucket: Mutex::new(Bucket {
                tokens: rate,
                at: Instant::now(),
            }),
        }
    }

    fn refilled(&self, now: Instant) -> std::sync::MutexGuard<'_, Bucket> {
        let mut bucket = self.bucket.lock().unwrap_or_else(|e| e.into_inner());
        let elapsed = now.saturating_duration_since(bucket.at).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * self.rate).min(self.rate);
        bucket.at = now;
        bucket
    }

    /// Takes a join from the bucket; `false` when the rate is reached
    /// (a refused join takes nothing).
    pub fn try_join(&self, now: Instant) -> bool {
        let mut bucket = self.refilled(now);
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Whether the rate is reached now (a join would be refused).
    pub fn exhausted(&self, now: Instant) -> bool {
        self.refilled(now).tokens < 1.0
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn sockets_are_admitted_up_to_the_limit_and_places_come_back() {
        let sockets = Arc::new(Sockets::new(2, metrics::Gauge::noop()));
        let a = sockets.admit().unwrap();
        let b = sockets.admit().unwrap();
        assert!(sockets.admit().is_none());
        assert_eq!(sockets.open(), 2);
        drop(a);
        let c = sockets.admit();
        assert!(c.is_some());
        drop((b, c));
        assert_eq!(sockets.open(), 0);
    }

    #[test]
    fn each_address_holds_at_most_its_share_and_frees_it() {
        let per = Arc::new(PerAddress::new(2));
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "::1".parse().unwrap());
        let first = per.admit(a).unwrap();
        let second = per.admit(a).unwrap();
        assert!(per.admit(a).is_none());
        assert!(per.admit(b).unwrap().is_some(), "another address");
        drop(first);
        let third = per.admit(a).unwrap();
        drop((second, third));
        assert_eq!(per.addresses(), 0, "no entry is left behind");
        let unlimited = Arc::new(PerAddress::new(0));
        assert!((0..1000).all(|_| matches!(unlimited.admit(a), Some(None))));
    }

    #[test]
    fn the_rate_counter_triggers_on_the_minute_average_at_a_tick() {
        let rate = RateCounter::new(10);
        let t0 = rate.start;
        // 600 events in the first bucket: 10 per second over the minute.
        rate.add(599);
        assert!(!rate.triggered(t0 + Duration::from_secs(1)), "no tick yet");
        assert!(!rate.triggered(t0 + Duration::from_secs(5)), "599 < 600");
        rate.add(1);
        assert!(rate.triggered(t0 + Duration::from_secs(10)));
        // A minute and more later, the buckets hold nothing again.
        assert!(!rate.triggered(t0 + Duration::from_secs(300)));
        assert_eq!(rate.buckets.lock().unwrap().len(), RATE_BUCKETS);
    }

    #[test]
    fn a_burst_of_rate_joins_passes_then_one_per_interval() {
        let joins = JoinRate::new(4);
        let t0 = Instant::now();
        assert!((0..4).all(|_| joins.try_join(t0)));
        assert!(!joins.try_join(t0));
        assert!(joins.exhausted(t0));
        // A refused join took nothing: a quarter of a second later, one passes.
        assert!(joins.try_join(t0 + Duration::from_millis(250)));
        assert!(!joins.try_join(t0 + Duration::from_millis(260)));
        // The bucket never holds more than `rate`.
        let later = t0 + Duration::from_secs(60);
        assert!((0..4).all(|_| joins.try_join(later)));
        assert!(!joins.try_join(later));
    }
}
