//! The real-service test harness: throw-away PostgreSQL, Redis and ClickHouse
//! processes on free loopback ports, with their data in temporary
//! directories.
//!
//! Lifetimes:
//! - `shared()` instances live as long as the test process. They are started
//!   from one long-lived thread with `PR_SET_PDEATHSIG`, so the kernel stops
//!   them when the test process ends for any reason, panics and aborts
//!   included.
//! - `start()` instances belong to one test and are stopped by pid when the
//!   value is dropped (also while a failing test unwinds). Use them for tests
//!   that stop or restart the server.
//!
//! `TEST_DATABASE_URL`, `TEST_REDIS_URL` and `TEST_CLICKHOUSE_URL` replace the shared instances with
//! existing servers (for example the compose stack). Each test still gets its
//! own database (`TestPostgres::create_database`) or key prefix
//! (`unique_name`), so tests run in parallel either way.
#![allow(unsafe_code)] // prctl in pre_exec; see `spawn_with_parent_death_signal`.

use std::future::Future;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock, mpsc};
use std::time::{Duration, Instant};

/// How long a throw-away server gets to start.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// Every click in the Redis stream `stream`, oldest first, from entries of
/// either form (`crate::event`); panics on one that is not a click.
pub fn stream_clicks(conn: &mut redis::Connection, stream: &str) -> Vec<crate::ClickEvent> {
    let reply: Vec<(String, Vec<Vec<u8>>)> = redis::cmd("XRANGE")
        .arg(stream)
        .arg("-")
        .arg("+")
        .query(conn)
        .expect("XRANGE");
    let mut clicks = Vec::new();
    for (id, flat) in reply {
        let pairs: Vec<(&str, &[u8])> = flat
            .chunks_exact(2)
            .map(|pair| {
                (
                    std::str::from_utf8(&pair[0]).unwrap_or(""),
                    pair[1].as_slice(),
                )
            })
            .collect();
        for click in crate::event::decode_entry(&pairs) {
            match click {
                Ok(click) => clicks.push(click),
                Err((error, raw)) => panic!("entry {id} is not a click: {error}: {raw:?}"),
            }
        }
    }
    clicks
}

/// A port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("binding 127.0.0.1:0 always works")
}

/// A name unique within this test run, for databases, key prefixes, streams.
pub fn unique_name(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}_{}_{n}", std::process::id())
}

/// Polls `probe` until it yields a value, or panics after `timeout` naming
/// `what`. Tests use this instead of sleeping for a fixed time.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The blocking twin of [`eventually`], for harness code outside a runtime.
pub fn wait_for(timeout: Duration, what: &str, mut probe: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !probe() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The sum of every series of the metric `name` in a Prometheus text
/// exposition (`name 3`, `name{status="302"} 2`, ...); 0 when it has none.
/// Other metrics whose names start with `name` (`name_bucket`, ...) are
/// not counted.
pub fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with([' ', '{']))
        })
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

/// The value of one series, spelled as the exposition writes it (`name` or
/// `name{status="302"}`); `None` when it is not there.
pub fn metric_series(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// The status code a `GET` of `url` (`http://host:port/path`) answers, or
/// `None` when nothing answers. A tiny HTTP/1.0 client, so the harness needs
/// no HTTP library.
pub async fn http_status(url: &str) -> Option<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url.strip_prefix("http://")?;
    let (authority, path) = match rest.split_once('/') {
        Some((authority, path)) => (authority, format!("/{path}")),
        None => (rest, "/".to_owned()),
    };
    let limit = Duration::from_secs(2);
    let mut stream = tokio::time::timeout(limit, tokio::net::TcpStream::connect(authority))
        .await
        .ok()?
        .ok()?;
    let request = format!("GET {path} HTTP/1.0\r\nHost: {authority}\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut head = [0u8; 32];
    let n = tokio::time::timeout(limit, stream.read(&mut head))
        .await
        .ok()?
        .ok()?;
    std::str::from_utf8(&head[..n])
        .ok()?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Polls until a `GET` of `url` answers `status`, or panics after `timeout`.
pub async fn until_http_status(url: &str, status: u16, timeout: Duration) {
    eventually(
        timeout,
        &format!("{url} to answer {status}"),
        || async move { (http_status(url).await == Some(status)).then_some(()) },
    )
    .await;
}

/// A child process that is stopped by pid when dropped.
pub struct ManagedProcess {
    name: String,
    child: Child,
    stop_signal: i32,
}

impl ManagedProcess {
    /// Starts `command` so that it dies with the test process, whatever
    /// happens to the thread that asked for it.
    pub fn spawn(name: &str, command: Command, death_signal: i32) -> Self {
        let child = spawn_with_parent_death_signal(command, death_signal)
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Self {
            name: name.to_owned(),
            child,
            stop_signal: death_signal,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `signal` to the process.
    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) with a pid we own and a valid signal number.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, signal);
        }
    }

    /// Has the process exited?
    pub fn has_exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    /// Stops the process by pid with its stop signal, escalating to SIGKILL
    /// after ten seconds, and reaps it.
    pub fn stop(&mut self) {
        self.stop_with(self.stop_signal);
    }

    /// Stops the process by pid with `signal`, escalating to SIGKILL after
    /// ten seconds, and reaps it.
    pub fn stop_with(&mut self, signal: i32) {
        if self.has_exited() {
            return;
        }
        self.signal(signal);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.has_exited() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        eprintln!("{} ignored signal {signal}; killing it", self.name);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ManagedProcess {
    fn drop(&mut self) {
        self.stop();
    }
}

type SpawnRequest = (Command, i32, mpsc::Sender<std::io::Result<Child>>);

/// Linux sends `PR_SET_PDEATHSIG` when the *thread* that forked the child
/// exits, not the process. Test threads end after every test, so children are
/// forked from one thread that lives as long as the process.
fn spawn_with_parent_death_signal(command: Command, signal: i32) -> std::io::Result<Child> {
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<SpawnRequest>>> = OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnRequest>();
        std::thread::Builder::new()
            .name("test-process-spawner".into())
            .spawn(move || {
                for (mut command, signal, reply) in rx {
                    // SAFETY: prctl is async-signal-safe and touches no memory
                    // of the parent. It runs after std's setuid, which would
                    // otherwise clear the setting.
                    unsafe {
                        command.pre_exec(move || {
                            if libc::prctl(libc::PR_SET_PDEATHSIG, signal as libc::c_ulong) != 0 {
                                return Err(std::io::Error::last_os_error());
                            }
                            Ok(())
                        });
                    }
                    let _ = reply.send(command.spawn());
                }
            })
            .expect("spawning a thread works");
        Mutex::new(tx)
    });
    let (reply_tx, reply_rx) = mpsc::channel();
    spawner
        .lock()
        .expect("spawner lock is never poisoned")
        .send((command, signal, reply_tx))
        .expect("the spawner thread lives as long as the process");
    reply_rx.recv().expect("the spawner thread always replies")
}

fn tcp_answers(port: u16, request: &[u8], expect: &[u8]) -> bool {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    if stream.write_all(request).is_err() {
        return false;
    }
    let mut buf = [0u8; 64];
    matches!(stream.read(&mut buf), Ok(n) if buf[..n].starts_with(expect))
}

/// A throw-away Redis server with AOF on, like production.
pub struct TestRedis {
    port: u16,
    dir: PathBuf,
    _tmp: Option<tempfile::TempDir>,
    process: Option<ManagedProcess>,
    external_url: Option<String>,
}

/// A temp dir for a test server, marked with this process's id. The
/// process-wide servers (`shared()`) live in statics, which are never
/// dropped, so their dirs outlive the test process; so do those of a killed
/// test process. Each new dir first sweeps away the dirs with this prefix
/// whose marking process is gone.
fn server_dir(prefix: &str) -> tempfile::TempDir {
    const OWNER: &str = "owner.pid";
    if let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) {
        for entry in entries.flatten() {
            if !entry.file_name().to_string_lossy().starts_with(prefix) {
                continue;
            }
            let owner = std::fs::read_to_string(entry.path().join(OWNER));
            if let Some(pid) = owner.ok().and_then(|o| o.trim().parse::<u32>().ok())
                && !Path::new(&format!("/proc/{pid}")).exists()
            {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
    let dir = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .expect("temp dir");
    std::fs::write(dir.path().join(OWNER), std::process::id().to_string())
        .expect("mark the temp dir");
    dir
}

impl TestRedis {
    /// A Redis of this test's own, stopped when the value drops.
    pub fn start() -> Self {
        let tmp = server_dir("test-redis-");
        let mut redis = Self {
            port: free_port(),
            dir: tmp.path().to_owned(),
            _tmp: Some(tmp),
            process: None,
            external_url: None,
        };
        redis.run();
        redis
    }

    /// The process-wide Redis, or `TEST_REDIS_URL`. Share it only with key
    /// prefixes from [`unique_name`].
    pub fn shared() -> &'static TestRedis {
        static SHARED: OnceLock<TestRedis> = OnceLock::new();
        SHARED.get_or_init(|| match std::env::var("TEST_REDIS_URL") {
            Ok(url) if !url.is_empty() => Self {
                port: 0,
                dir: PathBuf::new(),
                _tmp: None,
                process: None,
                external_url: Some(url),
            },
            _ => Self::start(),
        })
    }

    /// A handle to a Redis that something else runs (never stopped by
    /// this handle).
    pub fn external(url: &str) -> Self {
        Self {
            port: 0,
            dir: PathBuf::new(),
            _tmp: None,
            process: None,
            external_url: Some(url.to_owned()),
        }
    }

    pub fn url(&self) -> String {
        match &self.external_url {
            Some(url) => url.clone(),
            None => format!("redis://127.0.0.1:{}", self.port),
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().map(ManagedProcess::pid)
    }

    fn run(&mut self) {
        let mut command = Command::new("redis-server");
        command
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .arg("--dir")
            .arg(&self.dir)
            .args(["--appendonly", "yes", "--appendfsync", "everysec"])
            .args(["--save", ""])
            .arg("--logfile")
            .arg(self.dir.join("redis.log"))
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        self.process = Some(ManagedProcess::spawn(
            "redis-server",
            command,
            libc::SIGKILL,
        ));
        let port = self.port;
        wait_for(START_TIMEOUT, "redis-server to answer PING", || {
            tcp_answers(port, b"PING\r\n", b"+PONG")
        });
    }

    /// Shuts Redis down cleanly (its AOF is flushed), keeping the data.
    pub fn stop(&mut self) {
        assert!(self.external_url.is_none(), "cannot stop an external Redis");
        if let Some(mut process) = self.process.take() {
            process.stop_with(libc::SIGTERM);
        }
    }

    /// Kills Redis with SIGKILL, keeping the data on disk.
    pub fn kill(&mut self) {
        if let Some(mut process) = self.process.take() {
            process.kill();
        }
    }

    /// Starts Redis again on the same port and data directory.
    pub fn restart(&mut self) {
        self.stop();
        self.run();
    }

    /// Starts a stopped Redis again on the same port and data directory.
    pub fn start_again(&mut self) {
        assert!(self.process.is_none(), "redis is still running");
        self.run();
    }

    /// Starts a stopped Redis with an empty data directory, as a Redis that
    /// lost its data would come back.
    pub fn start_empty(&mut self) {
        assert!(self.process.is_none(), "redis is still running");
        for entry in std::fs::read_dir(&self.dir).expect("redis dir") {
            let path = entry.expect("dir entry").path();
            if path.is_dir() {
                std::fs::remove_dir_all(&path).expect("remove redis data");
            } else if path.file_name().is_some_and(|n| n != "redis.log") {
                std::fs::remove_file(&path).expect("remove redis data");
            }
        }
        self.run();
    }
}

/// Where Debian (or `pg_config`) keeps the PostgreSQL server binaries.
fn postgres_bindir() -> PathBuf {
    if let Ok(dir) = std::env::var("PG_BINDIR") {
        return PathBuf::from(dir);
    }
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|entries| {
            entries
                .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
                .filter(|p| p.join("postgres").exists())
                .collect()
        })
        .unwrap_or_default();
    versions.sort_by_key(|p| {
        p.parent()
            .and_then(|v| v.file_name())
            .and_then(|v| v.to_str())
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(0)
    });
    versions
        .pop()
        .expect("PostgreSQL server binaries not found under /usr/lib/postgresql (run `make deps`)")
}

/// The uid and gid of the `postgres` system user, from /etc/passwd.
fn postgres_user() -> Option<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        (fields.first() == Some(&"postgres") && fields.len() > 3)
            .then(|| Some((fields[2].parse().ok()?, fields[3].parse().ok()?)))
            .flatten()
    })
}

/// A throw-away PostgreSQL server. Tests get their own database from it.
pub struct TestPostgres {
    bindir: PathBuf,
    data: PathBuf,
    as_user: Option<(u32, u32)>,
    port: u16,
    _tmp: Option<tempfile::TempDir>,
    process: Option<ManagedProcess>,
    external_url: Option<String>,
}

impl TestPostgres {
    /// The process-wide server, or `TEST_DATABASE_URL`.
    pub fn shared() -> &'static TestPostgres {
        static SHARED: OnceLock<TestPostgres> = OnceLock::new();
        SHARED.get_or_init(|| match std::env::var("TEST_DATABASE_URL") {
            Ok(url) if !url.is_empty() => Self {
                bindir: postgres_bindir(),
                data: PathBuf::new(),
                as_user: None,
                port: 0,
                _tmp: None,
                process: None,
                external_url: Some(url),
            },
            _ => Self::start(),
        })
    }

    /// A server of this test's own, stopped when the value drops.
    pub fn start() -> Self {
        let bindir = postgres_bindir();
        let tmp = server_dir("test-postgres-");
        let data = tmp.path().join("data");
        std::fs::create_dir(&data).expect("create data dir");
        // PostgreSQL refuses to run as root; CI runs as root.
        let as_user = if unsafe_is_root() {
            let (uid, gid) = postgres_user().expect("the postgres system user exists");
            std::os::unix::fs::chown(tmp.path(), Some(uid), Some(gid)).expect("chown");
            std::os::unix::fs::chown(&data, Some(uid), Some(gid)).expect("chown");
            Some((uid, gid))
        } else {
            None
        };
        let mut initdb = Command::new(bindir.join("initdb"));
        initdb
            .arg("-D")
            .arg(&data)
            .args(["-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8"])
            .stdout(Stdio::null());
        if let Some((uid, gid)) = as_user {
            initdb.uid(uid).gid(gid);
        }
        let status = initdb.status().expect("run initdb");
        assert!(status.success(), "initdb failed: {status}");

        let mut pg = Self {
            bindir,
            data,
            as_user,
            port: free_port(),
            _tmp: Some(tmp),
            process: None,
            external_url: None,
        };
        pg.run();
        pg
    }

    fn run(&mut self) {
        let data = self.data.clone();
        let as_user = self.as_user;
        let mut command = Command::new(self.bindir.join("postgres"));
        command
            .arg("-D")
            .arg(&data)
            .args(["-p", &self.port.to_string()])
            .arg("-k")
            .arg(&data)
            .args(["-c", "listen_addresses=127.0.0.1"])
            // Durability is irrelevant for throw-away data; speed is not.
            .args(["-c", "fsync=off", "-c", "synchronous_commit=off"])
            .args(["-c", "full_page_writes=off", "-c", "max_connections=300"])
            .stdout(Stdio::null())
            .stderr(
                std::fs::File::create(data.parent().expect("tmp").join("postgres.log"))
                    .map(Stdio::from)
                    .unwrap_or_else(|_| Stdio::null()),
            );
        if let Some((uid, gid)) = as_user {
            command.uid(uid).gid(gid);
        }
        // SIGQUIT is PostgreSQL's immediate shutdown: the postmaster takes its
        // backends with it.
        self.process = Some(ManagedProcess::spawn("postgres", command, libc::SIGQUIT));
        let isready = self.bindir.join("pg_isready");
        let port = self.port.to_string();
        wait_for(START_TIMEOUT, "postgres to accept connections", || {
            Command::new(&isready)
                .args(["-q", "-h", "127.0.0.1", "-p", &port, "-U", "postgres"])
                .status()
                .is_ok_and(|s| s.success())
        });
    }

    /// The URL of the server's `postgres` database (for admin statements).
    pub fn admin_url(&self) -> String {
        match &self.external_url {
            Some(url) => url.clone(),
            None => format!("postgres://postgres@127.0.0.1:{}/postgres", self.port),
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Runs SQL through `psql` against the admin database.
    pub fn psql(&self, sql: &str) -> String {
        self.psql_on(&self.admin_url(), sql)
    }

    /// Runs SQL through `psql` against `url`, returning unaligned output.
    pub fn psql_on(&self, url: &str, sql: &str) -> String {
        let output = Command::new(self.bindir.join("psql"))
            .args([
                "-X",
                "-q",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-d",
                url,
                "-c",
                sql,
            ])
            .output()
            .expect("run psql");
        assert!(
            output.status.success(),
            "psql failed on {sql:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).trim().to_owned()
    }

    /// A new, empty database for one test; returns its URL.
    pub fn create_database(&self) -> String {
        let name = unique_name("test");
        self.psql(&format!("CREATE DATABASE {name}"));
        let admin = self.admin_url();
        let (base, _) = admin
            .rsplit_once('/')
            .expect("a database URL ends with /dbname");
        format!("{base}/{name}")
    }

    /// Stops a server of this test's own with a fast shutdown, keeping data.
    pub fn stop(&mut self) {
        if let Some(mut process) = self.process.take() {
            // SIGINT is a fast shutdown: it checkpoints, so committed data
            // survives even with synchronous_commit off.
            process.stop_with(libc::SIGINT);
        }
    }

    /// Starts a stopped server again on the same port and data.
    pub fn start_again(&mut self) {
        assert!(
            self.external_url.is_none(),
            "cannot restart an external server"
        );
        assert!(self.process.is_none(), "postgres is still running");
        self.run();
    }
}

fn unsafe_is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

impl Drop for TestPostgres {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A throw-away ClickHouse server (Debian's 18.16 here; any release works)
/// with its data in a temp dir, HTTP and native ports on free loopback
/// ports.
pub struct TestClickHouse {
    http_port: u16,
    dir: PathBuf,
    _tmp: Option<tempfile::TempDir>,
    process: Option<ManagedProcess>,
    external_url: Option<String>,
}

impl TestClickHouse {
    /// A server of this test's own, stopped when the value drops.
    pub fn start() -> Self {
        let tmp = server_dir("test-clickhouse-");
        let dir = tmp.path().to_owned();
        let http_port = free_port();
        let config = format!(
            r#"<yandex>
  <logger><level>warning</level><log>{d}/server.log</log><errorlog>{d}/server.err.log</errorlog><console>0</console></logger>
  <http_port>{http_port}</http_port>
  <tcp_port>{tcp_port}</tcp_port>
  <listen_host>127.0.0.1</listen_host>
  <path>{d}/data/</path>
  <tmp_path>{d}/tmp/</tmp_path>
  <user_files_path>{d}/user_files/</user_files_path>
  <format_schema_path>{d}/format_schemas/</format_schema_path>
  <users_config>users.xml</users_config>
  <default_profile>default</default_profile>
  <default_database>default</default_database>
  <mark_cache_size>268435456</mark_cache_size>
  <max_concurrent_queries>200</max_concurrent_queries>
</yandex>
"#,
            d = dir.display(),
            tcp_port = free_port(),
        );
        let users = r#"<yandex>
  <profiles><default><max_memory_usage>4000000000</max_memory_usage></default></profiles>
  <users><default><password></password><networks><ip>127.0.0.1</ip><ip>::1</ip></networks><profile>default</profile><quota>default</quota></default></users>
  <quotas><default></default></quotas>
</yandex>
"#;
        std::fs::write(dir.join("config.xml"), config).expect("write clickhouse config");
        std::fs::write(dir.join("users.xml"), users).expect("write clickhouse users");
        let mut ch = Self {
            http_port,
            dir,
            _tmp: Some(tmp),
            process: None,
            external_url: None,
        };
        ch.run();
        ch
    }

    /// The process-wide server, or `TEST_CLICKHOUSE_URL`. Share it only with
    /// databases named by [`unique_name`].
    pub fn shared() -> &'static TestClickHouse {
        static SHARED: OnceLock<TestClickHouse> = OnceLock::new();
        SHARED.get_or_init(|| match std::env::var("TEST_CLICKHOUSE_URL") {
            Ok(url) if !url.is_empty() => Self::external(&url),
            _ => Self::start(),
        })
    }

    /// A handle to a ClickHouse that something else runs (never stopped by
    /// this handle).
    pub fn external(url: &str) -> Self {
        Self {
            http_port: 0,
            dir: PathBuf::new(),
            _tmp: None,
            process: None,
            external_url: Some(url.trim_end_matches('/').to_owned()),
        }
    }

    /// The HTTP interface's URL.
    pub fn url(&self) -> String {
        match &self.external_url {
            Some(url) => url.clone(),
            None => format!("http://127.0.0.1:{}", self.http_port),
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().map(ManagedProcess::pid)
    }

    fn run(&mut self) {
        let mut command = Command::new(clickhouse_server_binary());
        command
            .arg(format!(
                "--config-file={}",
                self.dir.join("config.xml").display()
            ))
            .current_dir(&self.dir)
            .stdout(Stdio::null())
            .stderr(
                std::fs::File::create(self.dir.join("stderr.log"))
                    .map(Stdio::from)
                    .unwrap_or_else(|_| Stdio::null()),
            );
        self.process = Some(ManagedProcess::spawn(
            "clickhouse-server",
            command,
            libc::SIGKILL,
        ));
        let port = self.http_port;
        wait_for(START_TIMEOUT, "clickhouse-server to answer /ping", || {
            tcp_answers(port, b"GET /ping HTTP/1.0\r\n\r\n", b"HTTP/1.0 200")
                || tcp_answers(port, b"GET /ping HTTP/1.0\r\n\r\n", b"HTTP/1.1 200")
        });
    }

    /// Runs one SQL statement over HTTP and returns the body (TSV for
    /// selects); panics with ClickHouse's message on an error.
    pub fn query(&self, sql: &str) -> String {
        match self.try_query(sql) {
            Ok(body) => body,
            Err(message) => panic!("ClickHouse refused {sql:?}: {message}"),
        }
    }

    /// Runs one SQL statement; `Err` carries ClickHouse's message.
    pub fn try_query(&self, sql: &str) -> Result<String, String> {
        let url = self.url();
        let authority = url
            .strip_prefix("http://")
            .and_then(|r| r.split('/').next())
            .expect("an http:// URL");
        let mut stream = TcpStream::connect(authority).map_err(|e| e.to_string())?;
        let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
        let request = format!(
            "POST / HTTP/1.0\r\nHost: {authority}\r\nContent-Length: {}\r\n\r\n{sql}",
            sql.len()
        );
        stream
            .write_all(request.as_bytes())
            .map_err(|e| e.to_string())?;
        let mut response = Vec::new();
        stream
            .read_to_end(&mut response)
            .map_err(|e| e.to_string())?;
        let text = String::from_utf8_lossy(&response);
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        if head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200") {
            Ok(body.to_owned())
        } else {
            Err(body.trim().to_owned())
        }
    }

    /// Stops the server (SIGTERM, escalating to SIGKILL), keeping its data.
    pub fn stop(&mut self) {
        assert!(
            self.external_url.is_none(),
            "cannot stop an external ClickHouse"
        );
        if let Some(mut process) = self.process.take() {
            process.stop_with(libc::SIGTERM);
        }
    }

    /// Starts a stopped server again on the same ports and data.
    pub fn start_again(&mut self) {
        assert!(self.process.is_none(), "clickhouse is still running");
        self.run();
    }
}

fn clickhouse_server_binary() -> PathBuf {
    for candidate in ["/usr/bin/clickhouse-server", "/usr/sbin/clickhouse-server"] {
        if std::path::Path::new(candidate).exists() {
            return PathBuf::from(candidate);
        }
    }
    PathBuf::from("clickhouse-server")
}

/// The country database the analytics tests use (ip-location-db's
/// geo-whois-asn-country, fetched from npm once per checkout by
/// `scripts/fetch-geoip.sh` into `target/test-data/geoip/`).
pub fn geoip_db() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("common/ sits in the workspace")
            .to_owned();
        let dir = root.join("target/test-data/geoip");
        let status = Command::new(root.join("scripts/fetch-geoip.sh"))
            .arg(&dir)
            .status()
            .expect("run scripts/fetch-geoip.sh");
        assert!(status.success(), "scripts/fetch-geoip.sh failed: {status}");
        dir.join("geo-whois-asn-country.mmdb")
    })
    .clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_are_read_by_name_and_by_series() {
        let text = "# TYPE edge_http_responses_total counter\n\
                    edge_http_responses_total{status=\"302\"} 21\n\
                    edge_http_responses_total{status=\"404\"} 2\n\
                    edge_http_responses_total_extra 100\n\
                    edge_cache_hits_total 20\n\
                    edge_duration_seconds_bucket{le=\"0.1\"} 7\n\
                    edge_duration_seconds_sum 0.5\n";
        assert_eq!(metric_sum(text, "edge_http_responses_total"), 23.0);
        assert_eq!(metric_sum(text, "edge_cache_hits_total"), 20.0);
        assert_eq!(metric_sum(text, "edge_duration_seconds"), 0.0);
        assert_eq!(metric_sum(text, "edge_cache_misses_total"), 0.0);
        assert_eq!(
            metric_series(text, r#"edge_http_responses_total{status="302"}"#),
            Some(21.0)
        );
        assert_eq!(metric_series(text, "edge_cache_hits_total"), Some(20.0));
        assert_eq!(metric_series(text, "edge_http_responses_total"), None);
        assert_eq!(metric_series(text, "edge_cache_hits"), None);
    }
}
