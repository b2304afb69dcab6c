//! Real client programs (`tests/clients/`) as child processes: installed
//! once per test process by `tests/clients/install`, run with their stdout
//! (JSON lines) collected and their stderr kept in a file for diagnosis.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::Duration;

use serde_json::{Value, json};
use tempfile::TempDir;

use super::{eventually, read_log, tail, wait_child};

/// `tests/clients` in the source tree.
pub fn clients_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients")
}

/// The venv `tests/clients/install` makes for realtime-py.
pub fn python() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("target/clients/venv/bin/python")
}

/// Runs `tests/clients/install` (npm ci, pip into a venv; a no-op when up
/// to date) once per test process. Panics when it fails: a missing node,
/// python or package fails the test, it never skips it.
pub fn install() {
    static INSTALLED: OnceLock<Result<(), String>> = OnceLock::new();
    let result = INSTALLED.get_or_init(|| {
        let script = clients_dir().join("install");
        let output = Command::new(&script)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("could not run {}: {e}", script.display()))?;
        if output.status.success() {
            Ok(())
        } else {
            Err(format!(
                "{} failed ({}):\n{}{}",
                script.display(),
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            ))
        }
    });
    if let Err(e) = result {
        panic!("the real clients are not installed: {e}");
    }
}

/// A client program: its stdout lines parsed as JSON as they arrive (a line
/// that is not JSON is kept as `{"not_json": line}`, so exact comparisons
/// fail on it), stderr in `stderr.log` in a temp dir. Closing stdin
/// ([`finish`](Self::finish)) is the program's signal to leave and exit.
pub struct ClientProcess {
    name: String,
    child: Mutex<Child>,
    stdin: Option<ChildStdin>,
    lines: Arc<Mutex<Vec<Value>>>,
    reader: Option<JoinHandle<()>>,
    stderr_path: PathBuf,
    status: Option<ExitStatus>,
    _dir: TempDir,
}

impl ClientProcess {
    /// Starts `program args` in `cwd`; `name` labels it in messages.
    pub fn spawn(name: &str, program: &Path, args: &[String], cwd: &Path) -> ClientProcess {
        let dir = tempfile::Builder::new()
            .prefix("walcast-client-")
            .tempdir()
            .expect("temp dir for a client");
        let stderr_path = dir.path().join("stderr.log");
        let stderr = File::create(&stderr_path).expect("create stderr.log");
        let mut child = Command::new(program)
            .args(args)
            .current_dir(cwd)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("{name}: could not run {}: {e}", program.display()));
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().expect("piped stdout");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let value = serde_json::from_str(&line).unwrap_or(json!({ "not_json": line }));
                sink.lock().unwrap_or_else(|e| e.into_inner()).push(value);
            }
        });
        ClientProcess {
            name: name.to_owned(),
            child: Mutex::new(child),
            stdin,
            lines,
            reader: Some(reader),
            stderr_path,
            status: None,
            _dir: dir,
        }
    }

    /// The lines so far.
    pub fn lines(&self) -> Vec<Value> {
        self.lines.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// What the program wrote to stderr so far.
    pub fn stderr(&self) -> String {
        read_log(&self.stderr_path)
    }

    /// Waits until `ready` holds for the lines so far (`ready` may panic
    /// to fail at once); panics after `timeout`, or at once if the program
    /// exits. Either way the lines and the end of stderr are printed when
    /// the process is dropped.
    pub async fn wait_for(&self, what: &str, timeout: Duration, ready: impl Fn(&[Value]) -> bool) {
        eventually(&format!("{}: {what}", self.name), timeout, || {
            let done = ready(&self.lines());
            if !done {
                let exited = self.child().try_wait().expect("try_wait");
                assert!(
                    exited.is_none(),
                    "{}: exited ({}) while waiting for: {what}",
                    self.name,
                    exited.map_or_else(String::new, |s| s.to_string())
                );
            }
            async move { done }
        })
        .await;
    }

    fn child(&self) -> std::sync::MutexGuard<'_, Child> {
        self.child.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Writes `line` and a newline to the program's stdin (a command).
    pub fn send_line(&mut self, line: &str) {
        use std::io::Write;
        let stdin = self.stdin.as_mut().expect("stdin is open");
        writeln!(stdin, "{line}").expect("write to the client's stdin");
        stdin.flush().expect("flush the client's stdin");
    }

    /// Kills the program (a client that vanishes without closing).
    pub fn kill(&mut self) {
        let mut child = self.child();
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Closes stdin and waits up to `timeout` for a successful exit;
    /// returns every line.
    pub fn finish(&mut self, timeout: Duration) -> Vec<Value> {
        drop(self.stdin.take());
        let status = wait_child(&mut self.child(), timeout)
            .unwrap_or_else(|| panic!("{}: did not exit within {timeout:?}", self.name));
        self.status = Some(status);
        if let Some(reader) = self.reader.take() {
            reader.join().expect("stdout reader");
        }
        assert!(status.success(), "{}: exited with {status}", self.name);
        self.lines()
    }
}

impl Drop for ClientProcess {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- {} stdout ---\n{}\n--- {} stderr ({}), last 80 lines ---\n{}",
                self.name,
                self.lines()
                    .iter()
                    .map(Value::to_string)
                    .collect::<Vec<_>>()
                    .join("\n"),
                self.name,
                self.stderr_path.display(),
                tail(&self.stderr(), 80)
            );
        }
        if self.status.is_none() {
            let mut child = self.child();
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
