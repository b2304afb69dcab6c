//! What the gateway logs about its clients costs log bytes in proportion
//! to what they are allowed, never to what they send: client text is
//! clipped ([`clip`]) and each warning a client can trigger passes a
//! [`Throttle`], which lets a few through per interval; the rest are
//! counted in a metric instead (`Context::may_warn`).

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Bytes of client text a log line or an error message keeps.
pub const CLIP_BYTES: usize = 64;

/// `text` when at most [`CLIP_BYTES`] long; else its first bytes (on a
/// character boundary) and how long it was: `abc… (1048576 bytes)`.
pub fn clip(text: &str) -> Cow<'_, str> {
    if text.len() <= CLIP_BYTES {
        return Cow::Borrowed(text);
    }
    let mut end = CLIP_BYTES;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    Cow::Owned(format!("{}… ({} bytes)", &text[..end], text.len()))
}

/// Warnings let through per [`WINDOW`] for each kind.
pub const PER_WINDOW: u32 = 10;
/// The interval a kind's allowance covers.
pub const WINDOW: Duration = Duration::from_secs(10);

/// Rate-limits warnings by kind (a static name: the call site's concern,
/// such as `join_refused`): [`PER_WINDOW`] per [`WINDOW`] pass; the caller
/// counts the rest in a metric.
#[derive(Debug, Default)]
pub struct Throttle {
    windows: Mutex<HashMap<&'static str, Window>>,
}

#[derive(Debug)]
struct Window {
    started: Instant,
    passed: u32,
}

impl Throttle {
    /// Whether a warning of `kind` may be logged now.
    pub fn allow(&self, kind: &'static str) -> bool {
        self.allow_at(kind, Instant::now())
    }

    fn allow_at(&self, kind: &'static str, now: Instant) -> bool {
        let mut windows = self.windows.lock().unwrap_or_else(|e| e.into_inner());
        let window = windows.entry(kind).or_insert(Window {
            started: now,
            passed: 0,
        });
        if now.saturating_duration_since(window.started) >= WINDOW {
            *window = Window {
                started: now,
                passed: 0,
            };
        }
        let allowed = window.passed < PER_WINDOW;
        if allowed {
            window.passed += 1;
        }
        allowed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_text_is_clipped_on_a_character_boundary_with_its_length() {
        assert_eq!(clip("short"), "short");
        let exact = "x".repeat(CLIP_BYTES);
        assert_eq!(clip(&exact), exact.as_str());
        let long = format!("{}é{}", "a".repeat(CLIP_BYTES - 1), "b".repeat(1000));
        assert_eq!(
            clip(&long),
            format!("{}… ({} bytes)", "a".repeat(CLIP_BYTES - 1), long.len())
        );
    }

    #[test]
    fn each_kind_passes_its_allowance_per_window() {
        let throttle = Throttle::default();
        let t0 = Instant::now();
        let passed = (0..25)
            .filter(|_| throttle.allow_at("join_refused", t0))
            .count();
        assert_eq!(passed, PER_WINDOW as usize);
        assert!(throttle.allow_at("slow_socket", t0), "kinds are apart");
        assert!(!throttle.allow_at("join_refused", t0 + WINDOW / 2));
        assert!(
            throttle.allow_at("join_refused", t0 + WINDOW),
            "a new window"
        );
    }
}
