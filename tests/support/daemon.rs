//! The walcast binary under test, as a real child process.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use tempfile::TempDir;

use super::{read_log, send_signal, tail, wait_child};

/// How long [`Daemon::terminate`] waits for a graceful exit.
const TERMINATE_TIMEOUT: Duration = Duration::from_secs(30);

/// A running `walcast` process. Its stdout and stderr are appended to
/// `walcast.log` in a temp dir, which is also its working directory (tests
/// can put config files there, see [`dir`](Self::dir)).
pub struct Daemon {
    child: Child,
    status: Option<ExitStatus>,
    log_path: PathBuf,
    dir: TempDir,
}

impl Daemon {
    /// Runs `walcast ARGS` with `env` on top of the inherited environment
    /// minus every `WALCAST_*` variable; `RUST_LOG=walcast=debug` unless
    /// `env` sets `RUST_LOG`.
    pub fn spawn(args: &[&str], env: &[(&str, String)]) -> Daemon {
        let dir = tempfile::Builder::new()
            .prefix("walcast-daemon-")
            .tempdir()
            .expect("create temp dir for walcast");
        Daemon::spawn_in(dir, args, env)
    }

    /// Like [`spawn`](Self::spawn) but in a temp dir the test already
    /// prepared (e.g. with a config file in it).
    pub fn spawn_in(dir: TempDir, args: &[&str], env: &[(&str, String)]) -> Daemon {
        let log_path = dir.path().join("walcast.log");
        let open_log = || {
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log_path)
                .expect("open walcast.log")
        };
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_walcast"));
        cmd.args(args)
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(open_log())
            .stderr(open_log());
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("WALCAST_") {
                cmd.env_remove(key);
            }
        }
        if !env.iter().any(|(k, _)| *k == "RUST_LOG") {
            cmd.env("RUST_LOG", "walcast=debug");
        }
        for (key, value) in env {
            cmd.env(key, value);
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("could not run {}: {e}", env!("CARGO_BIN_EXE_walcast")));
        Daemon {
            child,
            status: None,
            log_path,
            dir,
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Working directory (a temp dir, removed on drop).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Everything the process wrote to stdout and stderr so far.
    pub fn log(&self) -> String {
        read_log(&self.log_path)
    }

    /// Sends a signal by name (`HUP`, `INT`, `TERM`, …) without waiting.
    pub fn signal(&self, signal: &str) {
        if self.status.is_none() {
            send_signal(self.child.id(), signal);
        }
    }

    /// SIGKILL, waits for exit.
    pub fn kill(&mut self) {
        if self.status.is_none() {
            let _ = self.child.kill();
            self.status = self.child.wait().ok();
        }
    }

    /// SIGTERM, then waits up to 30 s for the exit status; panics with the
    /// log if the process does not exit.
    pub fn terminate(&mut self) -> ExitStatus {
        if let Some(status) = self.try_wait() {
            return status;
        }
        send_signal(self.child.id(), "TERM");
        match self.wait_timeout(TERMINATE_TIMEOUT) {
            Some(status) => status,
            None => panic!(
                "walcast did not exit within {TERMINATE_TIMEOUT:?} of SIGTERM\n--- log ---\n{}",
                self.log()
            ),
        }
    }

    /// The exit status if the process has exited.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().expect("try_wait walcast");
        }
        self.status
    }

    /// Waits up to `timeout` for the process to exit.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = wait_child(&mut self.child, timeout);
        }
        self.status
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- walcast log ({}), last 200 lines ---\n{}",
                self.log_path.display(),
                tail(&self.log(), 200)
            );
        }
        self.kill();
    }
}
