//! One thing `walcast check` found: how bad, about what, and what to do.

use serde::Serialize;

/// How much a finding matters. Ordered: `Ok < Info < Warning < Error`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    /// As it should be.
    Ok,
    /// Worth knowing; nothing to fix.
    Info,
    /// Works now, but should be fixed (e.g. a superuser role, a slot
    /// retaining WAL with nobody reading it).
    Warning,
    /// Blocks replication, or makes Postgres reject writes.
    Error,
}

impl Level {
    /// The lowercase name used in text and JSON output.
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Ok => "ok",
            Level::Info => "info",
            Level::Warning => "warning",
            Level::Error => "error",
        }
    }
}

/// One finding. `check` is a stable id (see [`super::id`]); `subject` names
/// the table or role it is about when a check runs once per object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// How much it matters.
    pub level: Level,
    /// Stable id of the check, e.g. `server.wal_level`.
    pub check: &'static str,
    /// The table (`schema.table`) or role the finding is about, if any.
    pub subject: Option<String>,
    /// What was found, in one sentence.
    pub message: String,
    /// What to do about it, when there is something to do.
    pub fix: Option<String>,
}

impl Finding {
    /// A finding without subject or fix.
    pub fn new(level: Level, check: &'static str, message: impl Into<String>) -> Finding {
        Finding {
            level,
            check,
            subject: None,
            message: message.into(),
            fix: None,
        }
    }

    /// An `ok` finding.
    pub fn ok(check: &'static str, message: impl Into<String>) -> Finding {
        Finding::new(Level::Ok, check, message)
    }

    /// An `info` finding.
    pub fn info(check: &'static str, message: impl Into<String>) -> Finding {
        Finding::new(Level::Info, check, message)
    }

    /// A `warning` finding.
    pub fn warning(check: &'static str, message: impl Into<String>) -> Finding {
        Finding::new(Level::Warning, check, message)
    }

    /// An `error` finding.
    pub fn error(check: &'static str, message: impl Into<String>) -> Finding {
        Finding::new(Level::Error, check, message)
    }

    /// Adds what to do about it.
    pub fn fix(mut self, fix: impl Into<String>) -> Finding {
        self.fix = Some(fix.into());
        self
    }

    /// Names the table or role it is about.
    pub fn subject(mut self, subject: impl Into<String>) -> Finding {
        self.subject = Some(subject.into());
        self
    }
}

/// A tokio-postgres error as operators need it: for a server error its
/// severity, message, detail and hint (tokio-postgres's own `Display` says
/// only "db error"); otherwise the error and its causes.
pub fn describe(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        let mut text = format!("{}: {}", db.severity(), db.message());
        if let Some(detail) = db.detail() {
            text.push_str(&format!(" (detail: {detail})"));
        }
        if let Some(hint) = db.hint() {
            text.push_str(&format!(" (hint: {hint})"));
        }
        return text;
    }
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(&format!(": {cause_text}"));
        }
        source = cause.source();
    }
    text
}

/// A byte count for people: `123 bytes`, `4.0 MiB`.
pub fn bytes(n: i64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n.abs() < 1024 {
        return format!("{n} bytes");
    }
    let mut value = n as f64 / 1024.0;
    let mut unit = 0;
    while value.abs() >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{n} bytes ({value:.1} {})", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_counts_show_exact_and_readable() {
        assert_eq!(bytes(0), "0 bytes");
        assert_eq!(bytes(1023), "1023 bytes");
        assert_eq!(bytes(1024), "1024 bytes (1.0 KiB)");
        assert_eq!(bytes(16 * 1024 * 1024), "16777216 bytes (16.0 MiB)");
    }

    #[test]
    fn levels_order_by_severity() {
        assert!(Level::Ok < Level::Info && Level::Info < Level::Warning);
        assert!(Level::Warning < Level::Error);
        assert_eq!(
            serde_json::to_value(Level::Warning).unwrap(),
            serde_json::json!("warning")
        );
    }
}
