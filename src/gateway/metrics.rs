//! What the gateway counts, rendered by its own `GET /metrics`.
//!
//! The gateway keeps a Prometheus recorder of its own and holds handles to
//! its series instead of going through the `metrics` facade's global
//! recorder: the hot path (a frame sent) touches one atomic with no
//! registry lookup, and several gateways in one process (tests) never mix
//! their numbers. Names carry `_total` on counters, as the daemon's do.

use metrics::{Counter, Gauge, Key, KeyName, Label, Level, Metadata, Recorder, SharedString, Unit};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle, PrometheusRecorder};

/// WebSocket sockets open.
pub const SOCKETS: &str = "walcast_gateway_sockets";
/// Channels joined, all sockets together.
pub const CHANNELS: &str = "walcast_gateway_channels";
/// Joins refused, by `reason` (Supabase's error code).
pub const JOINS_REFUSED: &str = "walcast_gateway_joins_refused_total";
/// Connections refused before the upgrade, by `reason`.
pub const CONNECTIONS_REFUSED: &str = "walcast_gateway_connections_refused_total";
/// Frames written to clients.
pub const FRAMES_SENT: &str = "walcast_gateway_frames_sent_total";
/// Sockets closed because they fell behind (their queue was full).
pub const SLOW_CLOSES: &str = "walcast_gateway_slow_sockets_closed_total";
/// Times the bus connection to Redis was established again after it was lost.
pub const BUS_RECONNECTS: &str = "walcast_gateway_bus_reconnects_total";
/// Subscriptions registered again because the daemon dropped them while
/// the gateway still served them.
pub const SUBSCRIPTIONS_RESTORED: &str = "walcast_gateway_subscriptions_restored_total";
/// Events not delivered because their subscription had been handed them
/// already: a daemon that took over (or restarted) sends again what its
/// predecessor sent after the last position Postgres confirmed.
pub const DUPLICATES_DROPPED: &str = "walcast_gateway_duplicates_dropped_total";
/// Warnings a client could trigger that were not logged (past their
/// rate), by `warning` kind.
pub const WARNINGS_SUPPRESSED: &str = "walcast_gateway_warnings_suppressed_total";
/// Client broadcasts (WebSocket and REST), by `result`: `sent`,
/// `too_large`, `refused`, `rate_limited`.
pub const BROADCASTS: &str = "walcast_gateway_broadcasts_total";
/// Presence calls, by `result`: `track`, `untrack`, `too_large`,
/// `rate_limited`.
pub const PRESENCE_CALLS: &str = "walcast_gateway_presence_calls_total";
/// Label of [`JOINS_REFUSED`] and [`CONNECTIONS_REFUSED`].
pub const REASON: &str = "reason";
/// Label of [`BROADCASTS`] and [`PRESENCE_CALLS`].
pub const RESULT: &str = "result";
/// Label of [`WARNINGS_SUPPRESSED`].
pub const WARNING: &str = "warning";

/// Every gateway metric: name, unit and help text, in documentation order.
pub const ALL: &[(&str, Unit, &str)] = &[
    (SOCKETS, Unit::Count, "websocket sockets open"),
    (CHANNELS, Unit::Count, "channels joined"),
    (
        JOINS_REFUSED,
        Unit::Count,
        "joins refused, by reason (supabase error code)",
    ),
    (
        CONNECTIONS_REFUSED,
        Unit::Count,
        "connections refused before the upgrade, by reason",
    ),
    (FRAMES_SENT, Unit::Count, "frames written to clients"),
    (
        SLOW_CLOSES,
        Unit::Count,
        "sockets closed because they fell behind",
    ),
    (
        BUS_RECONNECTS,
        Unit::Count,
        "bus connections to redis established again after a loss",
    ),
    (
        SUBSCRIPTIONS_RESTORED,
        Unit::Count,
        "subscriptions registered again after the daemon dropped them unasked",
    ),
    (
        DUPLICATES_DROPPED,
        Unit::Count,
        "events not delivered because their subscription had them already (a daemon took over)",
    ),
    (
        WARNINGS_SUPPRESSED,
        Unit::Count,
        "client-triggered warnings not logged past their rate, by kind",
    ),
    (
        BROADCASTS,
        Unit::Count,
        "client broadcasts (websocket and rest), by result",
    ),
    (PRESENCE_CALLS, Unit::Count, "presence calls, by result"),
];

/// Refusal reasons listed at zero from the start, so alerts can be set
/// on them before they first happen.
const LIMIT_REASONS: &[&str] = &["ChannelRateLimitReached", "ClientJoinRateLimitReached"];
const CONNECTION_REASONS: &[&str] = &[
    "ConnectionRateLimitReached",
    "JoinsRateLimitReached",
    "AddressRateLimitReached",
];

static METADATA: Metadata<'static> =
    Metadata::new(module_path!(), Level::INFO, Some(module_path!()));

/// The gateway's recorder and the handles of its series.
#[derive(Debug)]
pub struct GatewayMetrics {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
    /// [`SOCKETS`].
    pub sockets: Gauge,
    /// [`CHANNELS`].
    pub channels: Gauge,
    /// [`FRAMES_SENT`].
    pub frames_sent: Counter,
    /// [`SLOW_CLOSES`].
    pub slow_closes: Counter,
    /// [`BUS_RECONNECTS`].
    pub bus_reconnects: Counter,
    /// [`SUBSCRIPTIONS_RESTORED`].
    pub subscriptions_restored: Counter,
    /// [`DUPLICATES_DROPPED`].
    pub duplicates_dropped: Counter,
}

impl Default for GatewayMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl GatewayMetrics {
    /// A recorder with every series registered (at zero).
    pub fn new() -> GatewayMetrics {
        let recorder = PrometheusBuilder::new().build_recorder();
        for (name, unit, help) in ALL {
            let name = KeyName::from_const_str(name);
            let help = SharedString::const_str(help);
            if name.as_str() == SOCKETS || name.as_str() == CHANNELS {
                recorder.describe_gauge(name, Some(*unit), help);
            } else {
                recorder.describe_counter(name, Some(*unit), help);
            }
        }
        let gauge = |name| recorder.register_gauge(&Key::from_static_name(name), &METADATA);
        let counter = |name| recorder.register_counter(&Key::from_static_name(name), &METADATA);
        let metrics = GatewayMetrics {
            handle: recorder.handle(),
            sockets: gauge(SOCKETS),
            channels: gauge(CHANNELS),
            frames_sent: counter(FRAMES_SENT),
            slow_closes: counter(SLOW_CLOSES),
            bus_reconnects: counter(BUS_RECONNECTS),
            subscriptions_restored: counter(SUBSCRIPTIONS_RESTORED),
            duplicates_dropped: counter(DUPLICATES_DROPPED),
            recorder,
        };
        metrics.sockets.set(0.0);
        metrics.channels.set(0.0);
        for c in [
            &metrics.frames_sent,
            &metrics.slow_closes,
            &metrics.bus_reconnects,
            &metrics.subscriptions_restored,
            &metrics.duplicates_dropped,
        ] {
            c.increment(0);
        }
        for reason in LIMIT_REASONS {
            metrics.labelled(JOINS_REFUSED, reason).increment(0);
        }
        for reason in CONNECTION_REASONS {
            metrics.labelled(CONNECTIONS_REFUSED, reason).increment(0);
        }
        for result in ["sent", "too_large", "refused", "rate_limited"] {
            metrics.labelled(BROADCASTS, result).increment(0);
        }
        for result in ["track", "untrack", "too_large", "rate_limited"] {
            metrics.labelled(PRESENCE_CALLS, result).increment(0);
        }
        metrics
    }

    fn labelled(&self, name: &'static str, reason: &'static str) -> Counter {
        let label = match name {
            WARNINGS_SUPPRESSED => WARNING,
            BROADCASTS | PRESENCE_CALLS => RESULT,
            _ => REASON,
        };
        let key = Key::from_parts(name, vec![Label::new(label, reason)]);
        self.recorder.register_counter(&key, &METADATA)
    }

    /// A warning of `kind` was not logged: its rate was spent.
    pub fn warning_suppressed(&self, kind: &'static str) {
        self.labelled(WARNINGS_SUPPRESSED, kind).increment(1);
    }

    /// A client broadcast ended with `result`.
    pub fn broadcast(&self, result: &'static str) {
        self.labelled(BROADCASTS, result).increment(1);
    }

    /// A presence call ended with `result`.
    pub fn presence(&self, result: &'static str) {
        self.labelled(PRESENCE_CALLS, result).increment(1);
    }

    /// A join was refused with Supabase's error `code`.
    pub fn join_refused(&self, code: &'static str) {
        self.labelled(JOINS_REFUSED, code).increment(1);
    }

    /// A connection was refused before the upgrade, for `reason`.
    pub fn connection_refused(&self, reason: &'static str) {
        self.labelled(CONNECTIONS_REFUSED, reason).increment(1);
    }

    /// The Prometheus text exposition of every series.
    pub fn render(&self) -> String {
        self.handle.render()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_series_renders_from_the_start_and_counts() {
        let m = GatewayMetrics::new();
        m.sockets.increment(1.0);
        m.frames_sent.increment(3);
        m.join_refused("TopicNameRequired");
        let text = m.render();
        for line in [
            "# TYPE walcast_gateway_sockets gauge",
            "walcast_gateway_sockets 1",
            "walcast_gateway_channels 0",
            "walcast_gateway_frames_sent_total 3",
            "walcast_gateway_slow_sockets_closed_total 0",
            "walcast_gateway_bus_reconnects_total 0",
            "walcast_gateway_joins_refused_total{reason=\"ChannelRateLimitReached\"} 0",
            "walcast_gateway_joins_refused_total{reason=\"TopicNameRequired\"} 1",
            "walcast_gateway_connections_refused_total{reason=\"ConnectionRateLimitReached\"} 0",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
        }
        // A second gateway in the same process counts on its own.
        assert!(
            GatewayMetrics::new()
                .render()
                .contains("walcast_gateway_frames_sent_total 0")
        );
    }

    #[test]
    fn every_metric_is_in_the_readme() {
        let readme = include_str!("../../README.md");
        for (name, _, _) in ALL {
            assert!(
                readme.contains(&format!("`{name}`")),
                "{name} is not documented in README.md"
            );
        }
    }
}
