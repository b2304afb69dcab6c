//! All findings of one `walcast check`, rendered for people or machines,
//! and the exit code they imply.

use std::fmt::Write as _;

use serde_json::json;

use super::{Finding, Level};

/// Exit code when nothing blocks replication (warnings included).
pub const EXIT_OK: u8 = 0;
/// Exit code when at least one finding is an error.
pub const EXIT_ERROR: u8 = 1;

/// Everything one run of `walcast check` found, in the order checked.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// The findings.
    pub findings: Vec<Finding>,
}

impl Report {
    /// How many findings have `level`.
    pub fn count(&self, level: Level) -> usize {
        self.findings.iter().filter(|f| f.level == level).count()
    }

    /// Whether any finding is an error.
    pub fn has_errors(&self) -> bool {
        self.count(Level::Error) > 0
    }

    /// [`EXIT_ERROR`] if any finding is an error, else [`EXIT_OK`].
    pub fn exit_code(&self) -> u8 {
        if self.has_errors() {
            EXIT_ERROR
        } else {
            EXIT_OK
        }
    }

    /// One line per finding (`level  check  [subject]  message; fix: ...`)
    /// and a summary line.
    pub fn to_text(&self) -> String {
        let width = self
            .findings
            .iter()
            .map(|f| f.check.len())
            .max()
            .unwrap_or(0);
        let mut text = String::new();
        for f in &self.findings {
            let _ = write!(
                text,
                "{:<7} {:<width$}  {}",
                f.level.as_str(),
                f.check,
                f.message
            );
            if let Some(fix) = &f.fix {
                let _ = write!(text, "; fix: {fix}");
            }
            text.push('\n');
        }
        let _ = writeln!(
            text,
            "{} error(s), {} warning(s), {} info, {} ok: {}",
            self.count(Level::Error),
            self.count(Level::Warning),
            self.count(Level::Info),
            self.count(Level::Ok),
            if self.has_errors() {
                "something blocks replication"
            } else {
                "nothing blocks replication"
            }
        );
        text
    }

    /// `{"ok": bool, "summary": {level: count}, "findings": [...]}`; `ok`
    /// is false when a finding is an error.
    pub fn to_json(&self) -> serde_json::Value {
        json!({
            "ok": !self.has_errors(),
            "summary": {
                "error": self.count(Level::Error),
                "warning": self.count(Level::Warning),
                "info": self.count(Level::Info),
                "ok": self.count(Level::Ok),
            },
            "findings": self.findings,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report() -> Report {
        Report {
            findings: vec![
                Finding::ok("server.wal_level", "wal_level is logical"),
                Finding::warning("slot.active", "slot is inactive").fix("start walcast"),
                Finding::info("table.rls", "public.t: row level security enabled")
                    .subject("public.t"),
            ],
        }
    }

    #[test]
    fn text_has_one_line_per_finding_and_a_summary() {
        assert_eq!(
            report().to_text(),
            "ok      server.wal_level  wal_level is logical\n\
             warning slot.active       slot is inactive; fix: start walcast\n\
             info    table.rls         public.t: row level security enabled\n\
             0 error(s), 1 warning(s), 1 info, 1 ok: nothing blocks replication\n"
        );
    }

    #[test]
    fn json_lists_findings_with_level_check_message_and_fix() {
        let mut report = report();
        report
            .findings
            .push(Finding::error("server.wal_level", "wal_level is replica").fix("set it"));
        assert_eq!(report.exit_code(), EXIT_ERROR);
        let json = report.to_json();
        assert_eq!(json["ok"], false);
        assert_eq!(json["summary"]["warning"], 1);
        assert_eq!(
            json["findings"][1],
            json!({"level": "warning", "check": "slot.active", "subject": null, "message": "slot is inactive", "fix": "start walcast"})
        );
        assert_eq!(json["findings"][2]["subject"], "public.t");
    }

    #[test]
    fn warnings_do_not_fail_the_check() {
        assert_eq!(report().exit_code(), EXIT_OK);
    }
}
