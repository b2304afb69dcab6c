//! A throw-away Postgres cluster per test: `initdb` into a temp dir, a free
//! port, its own unix socket directory, and the postmaster as a direct child
//! process so that tests can stop, crash and restart it mid-run.

use std::fmt::Write as _;
use std::fs::{self, OpenOptions};
use std::future::Future;
use std::io;
use std::os::unix::fs::{PermissionsExt, chown};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tempfile::TempDir;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect};
use tokio_postgres::{Client, NoTls, Socket};

use super::{child_pids, free_port, pid_alive, read_log, send_signal, tail, wait_child};

/// How long to wait for the server to accept connections.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a fast / immediate shutdown may take.
const STOP_TIMEOUT: Duration = Duration::from_secs(60);
/// Attempts at finding a port nobody else grabs in the meantime.
const PORT_ATTEMPTS: usize = 8;

/// Options for [`TestPostgres::start_with`].
#[derive(Debug, Clone)]
pub struct PgOptions {
    /// `wal_level` (default `logical`).
    pub wal_level: &'static str,
    /// Lines appended to `postgresql.conf`, e.g. `"wal_sender_timeout = '2s'"`.
    pub extra_conf: Vec<String>,
    /// Enable TLS with a throw-away CA (see [`TestPostgres::ca_cert_path`]).
    pub tls: bool,
}

impl Default for PgOptions {
    fn default() -> Self {
        PgOptions {
            wal_level: "logical",
            extra_conf: Vec::new(),
            tls: false,
        }
    }
}

/// A running (or stopped) throw-away Postgres cluster.
///
/// Layout of the temp dir: `data/` (the cluster), `postgres.log` (server
/// stderr, appended across restarts), `tls/` (CA + server cert when enabled),
/// and the unix socket `.s.PGSQL.<port>`.
pub struct TestPostgres {
    child: Option<Child>,
    port: u16,
    bindir: PathBuf,
    data_dir: PathBuf,
    log_path: PathBuf,
    owner: Option<(u32, u32)>,
    tls: bool,
    dir: TempDir,
}

/// Why one start attempt failed.
enum StartError {
    /// The postmaster exited; `bind_failed` if the log says the port was taken.
    Exited {
        status: ExitStatus,
        bind_failed: bool,
    },
    TimedOut,
}

impl TestPostgres {
    /// Starts a cluster with [`PgOptions::default`] (`wal_level = logical`).
    pub fn start() -> TestPostgres {
        TestPostgres::start_with(PgOptions::default())
    }

    /// Initialises and starts a new cluster; panics (with the logs) on failure.
    pub fn start_with(options: PgOptions) -> TestPostgres {
        let bindir = pg_bindir().to_path_buf();
        let owner = postgres_owner();
        let dir = tempfile::Builder::new()
            .prefix("walcast-pg-")
            .tempdir()
            .expect("create temp dir for postgres");
        give_to(owner, dir.path());
        let data_dir = dir.path().join("data");
        let log_path = dir.path().join("postgres.log");

        // initdb
        let mut initdb = Command::new(bindir.join("initdb"));
        initdb
            .arg("-D")
            .arg(&data_dir)
            .args(["-U", "postgres", "-A", "trust", "--no-sync", "-E", "UTF8"])
            .arg("--locale=C");
        let output = prepare(&mut initdb, owner, dir.path())
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("could not run {}/initdb: {e}", bindir.display()));
        assert!(
            output.status.success(),
            "initdb failed ({}):\n{}\n{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );

        // TLS material
        let ssl_conf = if options.tls {
            let tls_dir = dir.path().join("tls");
            fs::create_dir(&tls_dir).expect("create tls dir");
            generate_tls(&tls_dir);
            for file in ["ca.crt", "server.crt", "server.key"] {
                give_to(owner, &tls_dir.join(file));
            }
            give_to(owner, &tls_dir);
            fs::set_permissions(
                tls_dir.join("server.key"),
                fs::Permissions::from_mode(0o600),
            )
            .expect("chmod server.key");
            format!(
                "ssl = on\nssl_cert_file = '{}'\nssl_key_file = '{}'\n",
                tls_dir.join("server.crt").display(),
                tls_dir.join("server.key").display()
            )
        } else {
            String::new()
        };

        // pg_hba.conf (replaces the generated one)
        let hba_path = data_dir.join("pg_hba.conf");
        fs::write(&hba_path, hba_conf(options.tls)).expect("write pg_hba.conf");
        give_to(owner, &hba_path);

        // postgresql.conf: initdb's file + our block; rewritten per port attempt.
        let conf_path = data_dir.join("postgresql.conf");
        let base_conf = fs::read_to_string(&conf_path).expect("read postgresql.conf");
        let mut ours = String::from("\n# --- walcast test harness ---\n");
        let _ = write!(
            ours,
            "listen_addresses = '127.0.0.1'\n\
             unix_socket_directories = '{}'\n\
             wal_level = {}\n\
             max_wal_senders = 20\n\
             max_replication_slots = 20\n\
             max_connections = 60\n\
             shared_buffers = 16MB\n\
             fsync = off\n\
             full_page_writes = off\n\
             log_min_messages = warning\n\
             {ssl_conf}",
            dir.path().display(),
            options.wal_level,
        );

        let mut pg = TestPostgres {
            child: None,
            port: 0,
            bindir,
            data_dir,
            log_path,
            owner,
            tls: options.tls,
            dir,
        };
        pg.start_on_a_free_port(|port| {
            let mut conf = base_conf.clone();
            conf.push_str(&ours);
            let _ = writeln!(conf, "port = {port}");
            for line in &options.extra_conf {
                conf.push_str(line);
                conf.push('\n');
            }
            conf
        });
        pg
    }

    /// Writes `postgresql.conf` as `conf` makes it for a free port and
    /// starts the cluster, on another port when that one was taken.
    fn start_on_a_free_port(&mut self, conf: impl Fn(u16) -> String) {
        let conf_path = self.data_dir.join("postgresql.conf");
        for attempt in 1..=PORT_ATTEMPTS {
            self.port = free_port();
            fs::write(&conf_path, conf(self.port)).expect("write postgresql.conf");
            match self.try_start() {
                Ok(()) => return,
                Err(StartError::Exited {
                    bind_failed: true, ..
                }) if attempt < PORT_ATTEMPTS => continue,
                Err(e) => self.start_failed(&e),
            }
        }
        unreachable!("the last attempt either returns or panics")
    }

    /// A physical standby of this cluster, streaming from the physical
    /// slot `slot` (created here), with `dbname=db` in `primary_conninfo`
    /// (replication slot synchronization needs it) and `extra_conf`
    /// appended. Made by a cold copy: this cluster stops (fast) while its
    /// data directory is copied, then starts again on its port. (The
    /// embedded-postgres packages have no `pg_basebackup`, and one of
    /// another major version refuses the server.) Replication slots are
    /// not copied.
    pub async fn start_standby(
        &mut self,
        slot: &str,
        db: &str,
        extra_conf: &[&str],
    ) -> TestPostgres {
        self.client("postgres")
            .await
            .batch_execute(&format!(
                "SELECT pg_create_physical_replication_slot('{}', true)",
                slot.replace('\'', "''")
            ))
            .await
            .expect("create the standby's physical slot");
        let dir = tempfile::Builder::new()
            .prefix("walcast-pg-standby-")
            .tempdir()
            .expect("create temp dir for the standby");
        give_to(self.owner, dir.path());
        let data_dir = dir.path().join("data");
        self.stop_fast();
        let copied = Command::new("cp")
            .arg("-a")
            .arg(&self.data_dir)
            .arg(&data_dir)
            .status()
            .expect("run cp");
        assert!(
            copied.success(),
            "copying the data directory failed: {copied}"
        );
        self.start_again();
        for stale in ["postmaster.pid", "postmaster.opts"] {
            let _ = fs::remove_file(data_dir.join(stale));
        }
        let slots = data_dir.join("pg_replslot");
        for entry in fs::read_dir(&slots).expect("read pg_replslot").flatten() {
            fs::remove_dir_all(entry.path()).expect("remove a copied slot");
        }
        let signal = data_dir.join("standby.signal");
        fs::write(&signal, "").expect("write standby.signal");
        give_to(self.owner, &signal);
        let base_conf =
            fs::read_to_string(data_dir.join("postgresql.conf")).expect("read postgresql.conf");
        let mut standby = TestPostgres {
            child: None,
            port: 0,
            bindir: self.bindir.clone(),
            log_path: dir.path().join("postgres.log"),
            data_dir,
            owner: self.owner,
            tls: false,
            dir,
        };
        let socket_dir = standby.dir.path().display().to_string();
        let primary = format!(
            "host={} port={} user=postgres dbname={db}",
            self.dir.path().display(),
            self.port
        );
        standby.start_on_a_free_port(|port| {
            let mut conf = base_conf.clone();
            let _ = write!(
                conf,
                "\n# --- walcast test harness: standby ---\n\
                 port = {port}\n\
                 unix_socket_directories = '{socket_dir}'\n\
                 ssl = off\n\
                 primary_conninfo = '{primary}'\n\
                 primary_slot_name = '{slot}'\n"
            );
            for line in extra_conf {
                conf.push_str(line);
                conf.push('\n');
            }
            conf
        });
        standby
    }

    /// Starts the stopped/killed cluster again: same data dir, same port.
    pub fn start_again(&mut self) {
        assert!(!self.is_running(), "start_again: postgres is still running");
        if let Err(e) = self.try_start() {
            self.start_failed(&e);
        }
    }

    /// Fast shutdown (SIGINT): aborts sessions, checkpoints, exits.
    pub fn stop_fast(&mut self) {
        self.signal_and_wait("INT", "fast shutdown");
    }

    /// Immediate shutdown (SIGQUIT): exits without a checkpoint; the next
    /// start runs crash recovery.
    pub fn stop_immediate(&mut self) {
        self.signal_and_wait("QUIT", "immediate shutdown");
    }

    /// SIGKILLs the postmaster. Its children notice the postmaster's death
    /// and exit by themselves; this waits for them (SIGKILLing stragglers
    /// after 10 s) and removes the stale lock files so that
    /// [`start_again`](Self::start_again) works (with crash recovery).
    pub fn kill(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let children = child_pids(child.id());
        let _ = child.kill();
        let _ = child.wait();
        let deadline = Instant::now() + Duration::from_secs(10);
        while children.iter().any(|&pid| pid_alive(pid)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        for &pid in children.iter().filter(|&&pid| pid_alive(pid)) {
            send_signal(pid, "KILL");
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while children.iter().any(|&pid| pid_alive(pid)) {
            assert!(
                Instant::now() < deadline,
                "postgres children {children:?} survived SIGKILL"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = fs::remove_file(self.data_dir.join("postmaster.pid"));
        let socket = format!(".s.PGSQL.{}", self.port);
        let _ = fs::remove_file(self.dir.path().join(format!("{socket}.lock")));
        let _ = fs::remove_file(self.dir.path().join(socket));
    }

    /// Whether the postmaster process is alive.
    pub fn is_running(&mut self) -> bool {
        match &mut self.child {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// The postmaster's pid, if it is running.
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

    /// `postgres://USER@127.0.0.1:PORT/DB`, with `?sslmode=disable` unless
    /// `user` is `tls_user`.
    pub fn url(&self, user: &str, db: &str) -> String {
        format!(
            "postgres://{}@127.0.0.1:{}/{}{}",
            encode(user),
            self.port,
            encode(db),
            sslmode_suffix(user)
        )
    }

    /// Like [`url`](Self::url) with a (percent-encoded) password.
    pub fn url_with_password(&self, user: &str, password: &str, db: &str) -> String {
        format!(
            "postgres://{}:{}@127.0.0.1:{}/{}{}",
            encode(user),
            encode(password),
            self.port,
            encode(db),
            sslmode_suffix(user)
        )
    }

    /// The cluster's data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The temp dir holding everything; also the unix socket directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Directory of the binaries in use (`initdb`, `postgres`, `pg_isready`…).
    pub fn bindir(&self) -> &Path {
        &self.bindir
    }

    /// PEM file of the throw-away CA that signed the server certificate.
    /// Panics unless started with `tls: true`.
    pub fn ca_cert_path(&self) -> PathBuf {
        assert!(self.tls, "ca_cert_path: cluster was started without tls");
        self.dir.path().join("tls").join("ca.crt")
    }

    /// Path of the server log.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Contents of the server log (all starts of this cluster).
    pub fn log(&self) -> String {
        read_log(&self.log_path)
    }

    /// A `tokio_postgres::Config` for `user`/`db` over the unix socket.
    pub fn socket_config(&self, user: &str, db: &str) -> tokio_postgres::Config {
        let mut config = tokio_postgres::Config::new();
        config
            .host_path(self.dir.path())
            .port(self.port)
            .user(user)
            .dbname(db);
        config
    }

    /// A client connected as `postgres` to `db` over TCP without TLS.
    pub async fn client(&self, db: &str) -> Client {
        let url = self.url("postgres", db);
        connect(&url)
            .await
            .unwrap_or_else(|e| panic!("connect to {url}: {e}\n--- log ---\n{}", self.log()))
    }

    /// `CREATE DATABASE name`.
    pub async fn create_database(&self, name: &str) {
        self.client("postgres")
            .await
            .batch_execute(&format!("CREATE DATABASE {}", quote_ident(name)))
            .await
            .unwrap_or_else(|e| panic!("CREATE DATABASE {name}: {e}"));
    }

    /// Creates database `name` with an empty `supabase_realtime` publication
    /// and returns a client (as `postgres`) connected to it.
    pub async fn setup_test_db(&self, name: &str) -> Client {
        self.create_database(name).await;
        let client = self.client(name).await;
        client
            .batch_execute("CREATE PUBLICATION supabase_realtime")
            .await
            .unwrap_or_else(|e| panic!("CREATE PUBLICATION in {name}: {e}"));
        client
    }

    fn try_start(&mut self) -> Result<(), StartError> {
        let log_start = fs::metadata(&self.log_path).map_or(0, |m| m.len());
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .expect("open postgres.log");
        let log_err = log.try_clone().expect("clone log handle");
        let mut cmd = Command::new(self.bindir.join("postgres"));
        cmd.arg("-D").arg(&self.data_dir);
        let child = prepare(&mut cmd, self.owner, self.dir.path())
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .unwrap_or_else(|e| panic!("could not run {}/postgres: {e}", self.bindir.display()));
        let child = self.child.insert(child);

        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                let log = read_log(&self.log_path);
                let new = log.get(log_start as usize..).unwrap_or(&log);
                let bind_failed = new.contains("could not bind")
                    || new.contains("could not create any TCP/IP sockets")
                    || new.contains("Address already in use")
                    || new.contains("Is another postmaster");
                return Err(StartError::Exited {
                    status,
                    bind_failed,
                });
            }
            // Ask over the unix socket: it lives in our own temp dir, so a
            // foreign server that happens to hold our TCP port cannot answer.
            let ready = Command::new(pg_isready())
                .arg("-q")
                .arg("-h")
                .arg(self.dir.path())
                .args([
                    "-p",
                    &self.port.to_string(),
                    "-U",
                    "postgres",
                    "-d",
                    "postgres",
                ])
                .args(["-t", "2"])
                .env_clear()
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if ready {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(StartError::TimedOut);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn start_failed(&mut self, error: &StartError) -> ! {
        let what = match error {
            StartError::Exited { status, .. } => format!("exited during startup ({status})"),
            StartError::TimedOut => {
                if let Some(mut child) = self.child.take() {
                    let _ = child.kill();
                    let _ = child.wait();
                }
                format!("not ready after {READY_TIMEOUT:?}")
            }
        };
        panic!(
            "postgres on port {} {what}\n--- {} ---\n{}",
            self.port,
            self.log_path.display(),
            self.log()
        );
    }

    fn signal_and_wait(&mut self, signal: &str, what: &str) {
        let Some(child) = self.child.as_mut() else {
            return;
        };
        send_signal(child.id(), signal);
        if wait_child(child, STOP_TIMEOUT).is_none() {
            panic!(
                "postgres {what} did not finish within {STOP_TIMEOUT:?}\n--- log ---\n{}",
                self.log()
            );
        }
        self.child = None;
    }
}

impl Drop for TestPostgres {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- postgres log ({}), last 60 lines ---\n{}",
                self.log_path.display(),
                tail(&self.log(), 60)
            );
        }
        if let Some(mut child) = self.child.take() {
            send_signal(child.id(), "QUIT");
            if wait_child(&mut child, Duration::from_secs(10)).is_none() {
                let children = child_pids(child.id());
                let _ = child.kill();
                let _ = child.wait();
                for pid in children {
                    send_signal(pid, "KILL");
                }
            }
        }
        // `dir` (a TempDir) is removed when the fields drop.
    }
}

/// Connects with `NoTls` and spawns the connection task.
pub async fn connect(url: &str) -> Result<Client, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(url, NoTls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// Connects over TLS (rustls, trusting only `ca_cert`) and spawns the
/// connection task. Use a URL with `sslmode=require`.
pub async fn connect_tls(url: &str, ca_cert: &Path) -> Result<Client, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(url, RustlsConnect::new(ca_cert)).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// Quotes an SQL identifier.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

fn sslmode_suffix(user: &str) -> &'static str {
    if user == "tls_user" {
        ""
    } else {
        "?sslmode=disable"
    }
}

/// Percent-encodes everything but RFC 3986 unreserved characters.
fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

fn hba_conf(tls: bool) -> String {
    let mut hba = String::from(
        "# walcast test harness\n\
         local all all trust\n\
         local replication all trust\n",
    );
    for db in ["all", "replication"] {
        let _ = writeln!(hba, "host {db} md5_user 127.0.0.1/32 md5");
        let _ = writeln!(hba, "host {db} scram_user 127.0.0.1/32 scram-sha-256");
        // Without ssl=on, hostssl lines only produce a warning at every
        // start; tls_user is rejected either way.
        if tls {
            let _ = writeln!(hba, "hostssl {db} tls_user 127.0.0.1/32 scram-sha-256");
        }
        let _ = writeln!(hba, "hostnossl {db} tls_user 127.0.0.1/32 reject");
    }
    hba.push_str(
        "host all all 127.0.0.1/32 trust\n\
         host replication all 127.0.0.1/32 trust\n",
    );
    hba
}

/// Applies the common settings for running a Postgres binary: clean `PG*`
/// environment, C locale, working directory, and (as root) the postgres
/// user's uid/gid so the spawned process itself is the server.
fn prepare<'a>(cmd: &'a mut Command, owner: Option<(u32, u32)>, cwd: &Path) -> &'a mut Command {
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("PG") {
            cmd.env_remove(key);
        }
    }
    cmd.env("LC_ALL", "C").env("LANG", "C").current_dir(cwd);
    if let Some((uid, gid)) = owner {
        cmd.uid(uid).gid(gid);
    }
    cmd
}

fn give_to(owner: Option<(u32, u32)>, path: &Path) {
    if let Some((uid, gid)) = owner {
        chown(path, Some(uid), Some(gid))
            .unwrap_or_else(|e| panic!("chown {} to postgres: {e}", path.display()));
    }
}

/// `WALCAST_PG_BINDIR`, else the highest `/usr/lib/postgresql/*/bin` with
/// `initdb`, else the directory of `initdb` on `PATH`.
pub fn pg_bindir() -> &'static Path {
    static BINDIR: OnceLock<PathBuf> = OnceLock::new();
    BINDIR.get_or_init(|| {
        if let Some(dir) = std::env::var_os("WALCAST_PG_BINDIR") {
            return PathBuf::from(dir);
        }
        let mut best: Option<(Vec<u32>, PathBuf)> = None;
        if let Ok(entries) = fs::read_dir("/usr/lib/postgresql") {
            for entry in entries.flatten() {
                let bin = entry.path().join("bin");
                let Some(version) = entry.file_name().to_str().and_then(|v| {
                    v.split('.')
                        .map(|p| p.parse().ok())
                        .collect::<Option<Vec<u32>>>()
                }) else {
                    continue;
                };
                if bin.join("initdb").is_file() && best.as_ref().is_none_or(|(v, _)| version > *v) {
                    best = Some((version, bin));
                }
            }
        }
        if let Some((_, bin)) = best {
            return bin;
        }
        std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
            .find(|dir| dir.join("initdb").is_file())
            .expect(
                "no Postgres server binaries: set WALCAST_PG_BINDIR, install \
                 postgresql under /usr/lib/postgresql, or put initdb on PATH",
            )
    })
}

fn pg_isready() -> PathBuf {
    let path = pg_bindir().join("pg_isready");
    if path.is_file() {
        path
    } else {
        PathBuf::from("pg_isready")
    }
}

/// `Some((uid, gid))` of the `postgres` user when running as root (Postgres
/// refuses to run as root); `None` otherwise.
fn postgres_owner() -> Option<(u32, u32)> {
    static OWNER: OnceLock<Option<(u32, u32)>> = OnceLock::new();
    *OWNER.get_or_init(|| {
        let status = fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
        let euid: u32 = status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
            .expect("parse effective uid from /proc/self/status");
        if euid != 0 {
            return None;
        }
        let from_passwd = fs::read_to_string("/etc/passwd").ok().and_then(|passwd| {
            passwd.lines().find_map(|line| {
                let fields: Vec<&str> = line.split(':').collect();
                if fields.first() == Some(&"postgres") && fields.len() >= 4 {
                    Some((fields[2].parse().ok()?, fields[3].parse().ok()?))
                } else {
                    None
                }
            })
        });
        let owner = from_passwd.or_else(|| {
            let id = |flag: &str| -> Option<u32> {
                let out = Command::new("id").args([flag, "postgres"]).output().ok()?;
                String::from_utf8(out.stdout).ok()?.trim().parse().ok()
            };
            Some((id("-u")?, id("-g")?))
        });
        Some(owner.expect("running as root, but there is no `postgres` user to run the server as"))
    })
}

/// Creates `ca.crt`, `server.crt` (CN=localhost, SAN DNS:localhost and
/// IP:127.0.0.1, signed by the CA) and `server.key` in `dir` with the
/// `openssl` CLI. EC P-256 keys: fast to generate and accepted by rustls.
pub fn generate_tls(dir: &Path) {
    fs::write(
        dir.join("ca.cnf"),
        "[req]\ndistinguished_name = dn\nx509_extensions = v3_ca\nprompt = no\n\
         [dn]\nCN = walcast test CA\n\
         [v3_ca]\nbasicConstraints = critical, CA:TRUE\n\
         keyUsage = critical, keyCertSign, cRLSign\nsubjectKeyIdentifier = hash\n",
    )
    .expect("write ca.cnf");
    fs::write(
        dir.join("server.cnf"),
        "[req]\ndistinguished_name = dn\nprompt = no\n[dn]\nCN = localhost\n",
    )
    .expect("write server.cnf");
    fs::write(
        dir.join("server.ext"),
        "basicConstraints = critical, CA:FALSE\n\
         keyUsage = critical, digitalSignature, keyEncipherment\n\
         extendedKeyUsage = serverAuth\n\
         subjectAltName = DNS:localhost, IP:127.0.0.1\n\
         subjectKeyIdentifier = hash\n\
         authorityKeyIdentifier = keyid\n",
    )
    .expect("write server.ext");
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let openssl = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .stdin(Stdio::null())
            .output()
            .expect("run openssl (is the openssl CLI installed?)");
        assert!(
            out.status.success(),
            "openssl {args:?} failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    };
    openssl(
        &[
            &["req", "-x509", "-config", "ca.cnf", "-days", "3650"][..],
            &ec,
            &["-keyout", "ca.key", "-out", "ca.crt"],
        ]
        .concat(),
    );
    openssl(
        &[
            &["req", "-new", "-config", "server.cnf"][..],
            &ec,
            &["-keyout", "server.key", "-out", "server.csr"],
        ]
        .concat(),
    );
    openssl(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "3650",
        "-extfile",
        "server.ext",
        "-out",
        "server.crt",
    ]);
}

/// A minimal rustls-based TLS connector for tokio-postgres that trusts only
/// one CA certificate (no channel binding).
#[derive(Clone)]
pub struct RustlsConnect {
    config: Arc<rustls::ClientConfig>,
}

impl RustlsConnect {
    /// Trusts the certificates in the PEM file `ca_cert`.
    pub fn new(ca_cert: &Path) -> RustlsConnect {
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(ca_cert)
            .unwrap_or_else(|e| panic!("read {}: {e}", ca_cert.display()))
        {
            roots.add(cert.expect("parse CA PEM")).expect("add CA cert");
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("rustls protocol versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        RustlsConnect {
            config: Arc::new(config),
        }
    }
}

impl MakeTlsConnect<Socket> for RustlsConnect {
    type Stream = RustlsStream;
    type TlsConnect = RustlsConnectOne;
    type Error = io::Error;

    fn make_tls_connect(&mut self, domain: &str) -> io::Result<RustlsConnectOne> {
        let name = ServerName::try_from(domain.to_owned())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        Ok(RustlsConnectOne {
            config: Arc::clone(&self.config),
            name,
        })
    }
}

/// One pending TLS handshake (see [`RustlsConnect`]).
pub struct RustlsConnectOne {
    config: Arc<rustls::ClientConfig>,
    name: ServerName<'static>,
}

impl TlsConnect<Socket> for RustlsConnectOne {
    type Stream = RustlsStream;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<RustlsStream>> + Send>>;

    fn connect(self, stream: Socket) -> Self::Future {
        Box::pin(async move {
            let stream = tokio_rustls::TlsConnector::from(self.config)
                .connect(self.name, stream)
                .await?;
            Ok(RustlsStream(stream))
        })
    }
}

/// A TLS stream produced by [`RustlsConnect`].
pub struct RustlsStream(tokio_rustls::client::TlsStream<Socket>);

impl tokio_postgres::tls::TlsStream for RustlsStream {
    fn channel_binding(&self) -> ChannelBinding {
        ChannelBinding::none()
    }
}

impl AsyncRead for RustlsStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for RustlsStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}
