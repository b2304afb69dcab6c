//! A throw-away `redis-server` per test, as a direct child process.

use std::fs::{self, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::{free_port, read_log, send_signal, tail, wait_child};

const READY_TIMEOUT: Duration = Duration::from_secs(15);
const STOP_TIMEOUT: Duration = Duration::from_secs(15);
const PORT_ATTEMPTS: usize = 8;

/// A running (or stopped) throw-away Redis on 127.0.0.1 with no persistence.
///
/// Besides the TCP port it listens on a unix socket in its temp dir, which
/// the harness uses for readiness checks (only our server can answer there).
pub struct TestRedis {
    child: Option<Child>,
    port: u16,
    /// A TLS port too, with the certificates in [`tls_dir`](Self::tls_dir).
    tls_port: Option<u16>,
    /// A Redis Cluster node: its cluster bus port.
    cluster_port: Option<u16>,
    log_path: PathBuf,
    dir: TempDir,
}

enum StartError {
    Exited {
        status: ExitStatus,
        bind_failed: bool,
    },
    TimedOut,
}

impl TestRedis {
    /// Starts `redis-server` on a free port; panics with its log on failure.
    pub fn start() -> TestRedis {
        Self::start_inner(false, false)
    }

    /// A node of a Redis Cluster not yet formed (`cluster-enabled yes`,
    /// its cluster bus on a port of its own): see [`TestRedisCluster`].
    pub fn start_cluster_node() -> TestRedis {
        Self::start_inner(false, true)
    }

    /// As [`start`](Self::start), and listening for TLS on a second port
    /// ([`tls_url`](Self::tls_url)) with a certificate for 127.0.0.1 signed
    /// by a test CA ([`ca_file`](Self::ca_file)).
    pub fn start_tls() -> TestRedis {
        Self::start_inner(true, false)
    }

    fn start_inner(tls: bool, cluster: bool) -> TestRedis {
        let dir = tempfile::Builder::new()
            .prefix("walcast-redis-")
            .tempdir()
            .expect("create temp dir for redis");
        let mut redis = TestRedis {
            child: None,
            port: 0,
            tls_port: None,
            cluster_port: None,
            log_path: dir.path().join("redis.log"),
            dir,
        };
        if tls {
            fs::create_dir(redis.tls_dir()).expect("tls dir");
            super::postgres::generate_tls(&redis.tls_dir());
        }
        for attempt in 1..=PORT_ATTEMPTS {
            redis.port = free_port();
            redis.tls_port = tls.then(free_port);
            redis.cluster_port = cluster.then(free_port);
            match redis.try_start() {
                Ok(()) => return redis,
                Err(StartError::Exited {
                    bind_failed: true, ..
                }) if attempt < PORT_ATTEMPTS => continue,
                Err(e) => redis.start_failed(&e),
            }
        }
        unreachable!("the last attempt either returns or panics")
    }

    /// Starts the stopped/killed server again on the same port (empty: no
    /// persistence).
    pub fn start_again(&mut self) {
        assert!(!self.is_running(), "start_again: redis is still running");
        if let Err(e) = self.try_start() {
            self.start_failed(&e);
        }
    }

    /// Starts the stopped server again listening only on its unix socket, so
    /// a test can reconnect its own subscribers before the daemon (which uses
    /// TCP) can reach Redis; [`open_tcp`](Self::open_tcp) then opens the port.
    pub fn start_again_unix_only(&mut self) {
        assert!(
            !self.is_running(),
            "start_again_unix_only: redis is still running"
        );
        let port = self.port;
        self.port = 0;
        let started = self.try_start();
        self.port = port;
        if let Err(e) = started {
            self.start_failed(&e);
        }
    }

    /// Opens the TCP port again after [`start_again_unix_only`](Self::start_again_unix_only).
    pub fn open_tcp(&self) {
        let mut stream = UnixStream::connect(self.socket_path()).expect("redis unix socket");
        let port = self.port.to_string();
        let command = format!(
            "*4\r\n$6\r\nCONFIG\r\n$3\r\nSET\r\n$4\r\nport\r\n${}\r\n{port}\r\n",
            port.len()
        );
        stream
            .write_all(command.as_bytes())
            .expect("CONFIG SET port");
        let mut buf = [0u8; 64];
        let n = stream.read(&mut buf).expect("CONFIG SET reply");
        assert!(
            buf[..n].starts_with(b"+OK"),
            "CONFIG SET port: {}",
            String::from_utf8_lossy(&buf[..n])
        );
    }

    /// Graceful shutdown (SIGTERM), waits for exit.
    pub fn stop(&mut self) {
        let Some(child) = self.child.as_mut() else {
            return;
        };
        send_signal(child.id(), "TERM");
        if wait_child(child, STOP_TIMEOUT).is_none() {
            panic!(
                "redis did not stop within {STOP_TIMEOUT:?}\n--- log ---\n{}",
                self.log()
            );
        }
        self.child = None;
    }

    /// SIGKILL, waits for exit.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Whether the server process is alive.
    pub fn is_running(&mut self) -> bool {
        match &mut self.child {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// The server's pid, if it is running.
    pub fn pid(&mut self) -> Option<u32> {
        if self.is_running() {
            self.child.as_ref().map(Child::id)
        } else {
            None
        }
    }

    /// TCP port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// `rediss://127.0.0.1:TLS_PORT`, for a server started with
    /// [`start_tls`](Self::start_tls).
    pub fn tls_url(&self) -> String {
        let port = self.tls_port.expect("started with start_tls");
        format!("rediss://127.0.0.1:{port}")
    }

    /// The test CA that signed the TLS certificate.
    pub fn ca_file(&self) -> PathBuf {
        self.tls_dir().join("ca.crt")
    }

    /// Where [`start_tls`](Self::start_tls) keeps the CA and the server's
    /// certificate and key.
    fn tls_dir(&self) -> PathBuf {
        self.dir.path().join("tls")
    }

    /// The unix socket the server also listens on.
    pub fn socket_path(&self) -> PathBuf {
        self.dir.path().join("redis.sock")
    }

    /// The server's temp dir.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Contents of the server log (all starts).
    pub fn log(&self) -> String {
        read_log(&self.log_path)
    }

    /// A `redis::Client` for [`url`](Self::url).
    pub fn client(&self) -> redis::Client {
        redis::Client::open(self.url()).expect("redis client")
    }

    /// A new multiplexed async connection.
    pub async fn connection(&self) -> redis::aio::MultiplexedConnection {
        self.client()
            .get_multiplexed_async_connection()
            .await
            .unwrap_or_else(|e| panic!("connect to {}: {e}", self.url()))
    }

    /// Synchronous `PING` over the unix socket; true on `+PONG`.
    pub fn ping(&self) -> bool {
        let Ok(mut stream) = UnixStream::connect(self.socket_path()) else {
            return false;
        };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
        let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
        if stream.write_all(b"PING\r\n").is_err() {
            return false;
        }
        let mut buf = [0u8; 64];
        let mut got = 0;
        while got < 7 {
            match stream.read(&mut buf[got..]) {
                Ok(0) | Err(_) => break,
                Ok(n) => got += n,
            }
        }
        buf[..got].starts_with(b"+PONG\r\n")
    }

    fn try_start(&mut self) -> Result<(), StartError> {
        let log_start = fs::metadata(&self.log_path).map_or(0, |m| m.len());
        let open_log = || {
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.log_path)
                .expect("open redis.log")
        };
        let _ = fs::remove_file(self.socket_path());
        let mut command = Command::new("redis-server");
        if let Some(cluster_port) = self.cluster_port {
            command
                .args(["--cluster-enabled", "yes", "--cluster-node-timeout", "2000"])
                // Replicas in sync at once, not after the 5 s default: a
                // replica that never synced cannot take over.
                .args(["--repl-diskless-sync-delay", "0"])
                .args(["--cluster-port", &cluster_port.to_string()])
                .arg("--cluster-config-file")
                .arg(self.dir.path().join("nodes.conf"));
        }
        if let Some(tls_port) = self.tls_port {
            let tls = self.tls_dir();
            command
                .args([
                    "--tls-port",
                    &tls_port.to_string(),
                    "--tls-auth-clients",
                    "no",
                ])
                .arg("--tls-cert-file")
                .arg(tls.join("server.crt"))
                .arg("--tls-key-file")
                .arg(tls.join("server.key"))
                .arg("--tls-ca-cert-file")
                .arg(self.ca_file());
        }
        let child = command
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .arg("--logfile")
            .arg(&self.log_path)
            .arg("--unixsocket")
            .arg(self.socket_path())
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(open_log())
            .stderr(open_log())
            .spawn()
            .unwrap_or_else(|e| panic!("could not run redis-server (is it on PATH?): {e}"));
        self.child = Some(child);

        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let exited = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            if let Some(status) = exited {
                self.child = None;
                let log = self.log();
                let new = log.get(log_start as usize..).unwrap_or(&log);
                return Err(StartError::Exited {
                    status,
                    bind_failed: new.contains("Address already in use")
                        || new.contains("Could not create server TCP listening socket"),
                });
            }
            if self.ping() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(StartError::TimedOut);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn start_failed(&mut self, error: &StartError) -> ! {
        let what = match error {
            StartError::Exited { status, .. } => format!("exited during startup ({status})"),
            StartError::TimedOut => {
                self.kill();
                format!("did not answer PING within {READY_TIMEOUT:?}")
            }
        };
        panic!(
            "redis-server on port {} {what}\n--- {} ---\n{}",
            self.port,
            self.log_path.display(),
            self.log()
        );
    }
}

impl Drop for TestRedis {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- redis log ({}), last 30 lines ---\n{}",
                self.log_path.display(),
                tail(&self.log(), 30)
            );
        }
        self.kill();
    }
}

/// A Redis Cluster on loopback: three masters with a replica each, formed
/// with `redis-cli --cluster create`, every slot covered.
pub struct TestRedisCluster {
    /// The nodes; which are masters changes with failovers.
    pub nodes: Vec<TestRedis>,
}

impl TestRedisCluster {
    /// Starts six nodes and forms the cluster; panics with the logs if it
    /// is not `cluster_state:ok` with three replicas on every node within
    /// 30 s.
    pub fn start() -> TestRedisCluster {
        let nodes: Vec<TestRedis> = (0..6).map(|_| TestRedis::start_cluster_node()).collect();
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let output = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("could not run redis-cli (is it on PATH?): {e}"));
        assert!(
            output.status.success(),
            "redis-cli --cluster create failed:\n{}\n{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        let cluster = TestRedisCluster { nodes };
        let deadline = Instant::now() + Duration::from_secs(30);
        // Ok everywhere, every node sees the three replicas as such
        // (`--cluster create` returns before the last replica is known),
        // and each replica is in sync with its master.
        let whole = |n: &TestRedis| {
            let replication = n.cli(&["INFO", "replication"]);
            (replication.contains("role:master") || replication.contains("master_link_status:up"))
                && n.cli(&["CLUSTER", "INFO"]).contains("cluster_state:ok")
                && n.cli(&["CLUSTER", "NODES"])
                    .lines()
                    .filter(|l| {
                        l.split_whitespace()
                            .nth(2)
                            .is_some_and(|flags| flags.split(',').any(|f| f == "slave"))
                    })
                    .count()
                    == 3
        };
        while !cluster.nodes.iter().all(whole) {
            assert!(
                Instant::now() < deadline,
                "the cluster did not come up:\n{}",
                cluster.nodes[0].cli(&["CLUSTER", "NODES"])
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        cluster
    }

    /// Every node's url, comma-separated: walcast's `redis_url`.
    pub fn urls(&self) -> String {
        self.nodes
            .iter()
            .map(TestRedis::url)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The logs of every node.
    pub fn logs(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("--- redis {} ---\n{}", n.port, tail(&n.log(), 20)))
            .collect()
    }
}

impl TestRedis {
    /// Runs `redis-cli` against this server's unix socket; its stdout.
    pub fn cli(&self, args: &[&str]) -> String {
        let output = Command::new("redis-cli")
            .arg("-s")
            .arg(self.socket_path())
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("could not run redis-cli: {e}"));
        String::from_utf8_lossy(&output.stdout).into_owned()
    }
}
