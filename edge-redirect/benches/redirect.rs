//! The edge against nginx, side by side in one run (`cargo bench -p
//! edge-redirect`, part of `make bench`).
//!
//! 1. 100,000 links are created through the control plane's API.
//! 2. The edge (release binary, click events on), the same with its click
//!    journal on (`EDGE_CLICK_JOURNAL_DIR`) and a third edge with click
//!    events off warm their caches with every code (trusted for an hour,
//!    `WARM_MAX_AGE_MS`, so they stay warm through the run; the misses
//!    during the rounds are printed); nginx gets the same
//!    codes in a `map` answered with
//!    `return 302 $target;` (`worker_processes auto`, no access log; codes
//!    that differ only in case are left out, as nginx map keys ignore case).
//! 3. wrk (1 thread, 64 connections, a random code per request) drives each
//!    in alternating 10-second rounds; medians are printed with each
//!    server's CPU time per redirect (user + system time of its processes
//!    from /proc, divided by requests served), which does not depend on the
//!    load generator.
//!    The targets' comparison comes first, its servers close together in
//!    time: the edge with events on, nginx, the edge with events off. Each
//!    events-on round is also set against the nginx round right after it:
//!    the median of those ratios, and in how many rounds the edge is ahead.
//!    Then, in rounds of their own, the secondary pairs: the journal edge
//!    against the edge without it, and one serving thread each (the edge
//!    with `EDGE_WORKER_THREADS=1`, events on, and nginx with
//!    `worker_processes 1`), since on these two cores wrk and Redis compete
//!    with the servers' own threads.
//!    Redis's CPU time during the events-on rounds is reported too: it is
//!    what shipping click events costs outside the edge.
//!    Last, the issue's reference point: a bare hyper + DashMap server
//!    (this bench's own binary run with `--bare-server`; `Location` its
//!    only header, no counters, ages or click events) in rounds with the
//!    edge, events off and on, and nginx: what the product costs on top of
//!    a bare redirect.
//!    Every round starts on a quiet machine (less than a tenth of a core
//!    busy), after PostgreSQL has been vacuumed and checkpointed, and the
//!    CPU that other processes took during the rounds is printed.
//! 4. Empty cache: an edge whose entries expire after 1 ms, so every request
//!    is a miss answered by one Redis `GET`, against `redis-benchmark -t get
//!    -c 64` on the same Redis.
//! 5. Memory: 1,000,000 mappings are written to Redis in the control
//!    plane's format and requested once each from a fresh edge; its resident
//!    memory is compared with the same process before.

use std::collections::HashSet;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use shortener_common::testing::{
    ManagedProcess, TestPostgres, TestRedis, free_port, metric_sum, until_http_status,
};

const LINKS: usize = 100_000;
/// Rounds of the comparison the targets are about: the edge with click
/// events on, nginx and the edge with events off, alternating.
const ROUNDS: usize = 9;
/// Rounds of the secondary pairs: the click journal against plain events,
/// and one serving thread each.
const SECONDARY_ROUNDS: usize = 3;
const ROUND_SECS: u64 = 10;
/// The edges' `CLICK_STREAM_MAXLEN`; the stream is filled to it before the
/// rounds (see `fill_stream`).
const STREAM_CLICKS: u64 = 1_000_000;
const ADMIN_KEY: &str = "bench-admin-key-0123456789abcdef";
/// How long the bench's edges trust a cached entry: longer than the run,
/// so the warm cache the issue's scenario asks for stays warm. With the
/// default five minutes, every entry warmed at the start expires in the
/// same few seconds, about five minutes into the rounds, and is fetched
/// from Redis again: a burst of 100,000 misses in one round that a server
/// in production spreads over five minutes (measured apart with a 60 s
/// age: 5.8 % of requests missed, 1.09x the CPU per redirect). The bench
/// prints the misses during the rounds.
const WARM_MAX_AGE_MS: &str = "3600000";

// The edge's allocator, for the bare server below.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(at) = args.iter().position(|a| a == "--bare-server") {
        bare_server(args[at + 1].parse().unwrap(), Path::new(&args[at + 2]));
        return;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(run());
}

/// A bare hyper + DashMap redirect server on `port`, with nginx's
/// `links.map` (`/code "url";` lines): the edge's runtime, allocator and
/// `writev(false)`, a 302 with `Location` and the edge's body for a known
/// code, 404 otherwise, and nothing else.
fn bare_server(port: u16, map: &Path) {
    use bytes::Bytes;
    use http::{HeaderValue, StatusCode, header};
    use http_body_util::Full;

    let links = dashmap::DashMap::<String, HeaderValue>::new();
    for line in std::fs::read_to_string(map).unwrap().lines() {
        let (code, url) = line.split_once(' ').unwrap();
        let url = url.trim_end_matches(';').trim_matches('"');
        links.insert(
            code.trim_start_matches('/').to_owned(),
            HeaderValue::from_str(url).unwrap(),
        );
    }
    let links = std::sync::Arc::new(links);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .unwrap();
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            let links = links.clone();
            let service = hyper::service::service_fn(
                move |request: hyper::Request<hyper::body::Incoming>| {
                    let code = request.uri().path().strip_prefix('/').unwrap_or_default();
                    let mut response = hyper::Response::new(Full::new(Bytes::new()));
                    match links.get(code) {
                        Some(location) => {
                            *response.body_mut() = Full::new(Bytes::from_static(b"Redirecting\n"));
                            *response.status_mut() = StatusCode::FOUND;
                            response
                                .headers_mut()
                                .insert(header::LOCATION, location.clone());
                        }
                        None => *response.status_mut() = StatusCode::NOT_FOUND,
                    }
                    std::future::ready(Ok::<_, std::convert::Infallible>(response))
                },
            );
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .writev(false)
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service),
            );
        }
    });
}

/// Two fields of a `/proc/.../stat` file, summed, counted from the state
/// field after the command (utime 11 and stime 12; cutime 13 and cstime
/// 14); 0 for a process that is gone.
fn stat_ticks(path: &str, first: usize, second: usize) -> u64 {
    let stat = std::fs::read_to_string(path).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, r)| r.split_whitespace().collect())
        .unwrap_or_default();
    let field = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    field(first) + field(second)
}

/// user + system CPU time of a process and its children still running, in
/// clock ticks.
fn cpu_ticks(pids: &[u32]) -> u64 {
    pids.iter()
        .map(|pid| stat_ticks(&format!("/proc/{pid}/stat"), 11, 12))
        .sum()
}

fn ticks_per_second() -> u64 {
    static TICKS: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        let out = Command::new("getconf").arg("CLK_TCK").output().unwrap();
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .unwrap_or(100)
    })
}

/// Busy time of the whole machine (every CPU, every state but idle and
/// I/O wait), in clock ticks.
fn machine_busy_ticks() -> u64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap();
    let ticks: Vec<u64> = stat
        .lines()
        .next()
        .unwrap()
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().unwrap())
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is in user)
    ticks[0] + ticks[1] + ticks[2] + ticks[5] + ticks[6] + ticks[7]
}

/// CPU time of this process's finished children (wrk), in clock ticks.
fn finished_children_ticks() -> u64 {
    stat_ticks("/proc/self/stat", 13, 14)
}

/// Writes back dirty pages, then waits (at most 30 s) until less than a
/// tenth of a core is busy over half a second, so that a round does not
/// start while something else (PostgreSQL after the creates, the kernel
/// writing back the previous round's files) still has work to do. Returns
/// how long it waited.
fn until_quiet() -> Duration {
    let started = Instant::now();
    // Dirty pages (Redis's append-only file, the journal) are written back
    // now rather than by the kernel's flusher in the middle of a round.
    let _ = Command::new("sync").status();
    loop {
        let before = machine_busy_ticks();
        std::thread::sleep(Duration::from_millis(500));
        let cores = (machine_busy_ticks() - before) as f64 / ticks_per_second() as f64 / 0.5;
        if cores < 0.1 || started.elapsed() > Duration::from_secs(30) {
            return started.elapsed();
        }
    }
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

/// nginx's worker pids, children of the master.
fn nginx_pids(master: u32) -> Vec<u32> {
    let mut pids = vec![master];
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        if let Some((_, rest)) = stat.rsplit_once(')') {
            let ppid = rest
                .split_whitespace()
                .nth(1)
                .and_then(|p| p.parse::<u32>().ok());
            if ppid == Some(master) {
                pids.push(pid);
            }
        }
    }
    pids
}

struct Round {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    cpu_us_per_request: f64,
    /// CPU of the `side` processes (Redis) per request.
    side_cpu_us_per_request: f64,
    /// Cores kept busy during the round by anything but the server, the
    /// `side` processes and wrk.
    background_cores: f64,
    /// How long the round waited for a quiet machine before it started.
    waited: Duration,
}

fn parse_ms(value: &str) -> f64 {
    let value = value.trim();
    if let Some(v) = value.strip_suffix("us") {
        v.parse::<f64>().unwrap() / 1000.0
    } else if let Some(v) = value.strip_suffix("ms") {
        v.parse().unwrap()
    } else if let Some(v) = value.strip_suffix('s') {
        v.parse::<f64>().unwrap() * 1000.0
    } else {
        panic!("unknown latency {value}")
    }
}

/// One wrk run against `url`, with the CPU time of `pids` and of `side`
/// (Redis) per request. For an edge shipping clicks (`admin`: its admin
/// port), the CPU times are read once it has shipped every click the round
/// made: so shipping that lags behind the load is counted in its round, and
/// never runs on into the next server's.
fn wrk_round(url: &str, script: &Path, pids: &[u32], side: &[u32], admin: Option<u16>) -> Round {
    let waited = until_quiet();
    let started = Instant::now();
    let machine_before = machine_busy_ticks();
    let wrk_before = finished_children_ticks();
    let before = cpu_ticks(pids);
    let side_before = cpu_ticks(side);
    let output = Command::new("wrk")
        .args([
            "-t1",
            "-c64",
            &format!("-d{ROUND_SECS}s"),
            "--latency",
            "-s",
        ])
        .arg(script)
        .arg(url)
        .output()
        .expect("wrk is installed (make deps)");
    if let Some(admin) = admin {
        settle(admin);
    }
    let after = cpu_ticks(pids);
    let side_after = cpu_ticks(side);
    let machine = machine_busy_ticks() - machine_before;
    let wrk = finished_children_ticks() - wrk_before;
    let background = machine.saturating_sub(after - before + side_after - side_before + wrk);
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "wrk failed: {text}");
    let line = |prefix: &str| {
        text.lines()
            .find_map(|l| l.trim_start().strip_prefix(prefix).map(str::trim))
            .unwrap_or_else(|| panic!("no {prefix} in {text}"))
    };
    let requests: f64 = text
        .lines()
        .find(|l| l.contains("requests in"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no request count in {text}"));
    let non_3xx = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Non-2xx or 3xx responses:"))
        .map(|n| n.trim().parse::<u64>().unwrap())
        .unwrap_or(0);
    assert_eq!(non_3xx, 0, "every request must redirect: {text}");
    let cpu_secs = (after - before) as f64 / ticks_per_second() as f64;
    let side_secs = (side_after - side_before) as f64 / ticks_per_second() as f64;
    Round {
        rps: line("Requests/sec:").parse().unwrap(),
        p50_ms: parse_ms(line("50%")),
        p99_ms: parse_ms(line("99%")),
        cpu_us_per_request: cpu_secs * 1e6 / requests,
        side_cpu_us_per_request: side_secs * 1e6 / requests,
        background_cores: background as f64
            / ticks_per_second() as f64
            / started.elapsed().as_secs_f64(),
        waited,
    }
}

/// Fills the click stream to its cap, as on a system that has been running:
/// the edges then trim as much as they add. A stream still growing would
/// have Redis take fresh memory through the whole run, and the first touch
/// of fresh memory in this VM costs every process on it (measured here:
/// Redis 0.28-0.42 us per click growing, 0.23 at its cap), which is not the
/// edge's cost. The entries are packed clicks of browser size.
fn fill_stream(redis: &TestRedis) {
    use shortener_common::event::{
        ENTRY_CLICKS, PACKED_CLICKS, PACKED_COLUMNS, PACKED_FIELDS, write_packed_record,
    };
    let mut conn = redis::Client::open(redis.url())
        .unwrap()
        .get_connection()
        .unwrap();
    let mut clicks = Vec::new();
    for i in 0..ENTRY_CLICKS {
        let id = format!("{i:032x}");
        write_packed_record(
            &mut clicks,
            [
                id.as_bytes(),
                b"fill",
                b"1767225600000",
                b"192.0.2.1",
                b"Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 Chrome/120.0",
                b"https://news.example.com/a",
                b"en-GB",
            ],
        );
    }
    let entries = STREAM_CLICKS as usize / ENTRY_CLICKS;
    for _ in 0..entries / 100 {
        let mut pipe = redis::pipe();
        for _ in 0..100 {
            pipe.cmd("XADD")
                .arg("clicks")
                .arg("*")
                .arg(PACKED_FIELDS)
                .arg(PACKED_COLUMNS)
                .arg(PACKED_CLICKS)
                .arg(&clicks)
                .ignore();
        }
        let _: () = pipe.query(&mut conn).unwrap();
    }
    // Redis keeps an append-only file, as the click stream needs. Rewrite it
    // now, with the stream at its cap, and turn automatic rewrites off: a
    // rewrite is a forked child on the same two cores (its CPU is not
    // counted as Redis's), and the events-on rounds grow the file enough to
    // start one every few rounds, in whichever server's round it falls.
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("auto-aof-rewrite-percentage")
        .arg(0)
        .query(&mut conn)
        .unwrap();
    wait_for_aof_rewrite(&mut conn);
    let _: redis::Value = redis::cmd("BGREWRITEAOF").query(&mut conn).unwrap();
    wait_for_aof_rewrite(&mut conn);
}

/// Waits (up to two minutes) until no append-only file rewrite is running
/// or scheduled.
fn wait_for_aof_rewrite(conn: &mut redis::Connection) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let info: String = redis::cmd("INFO").arg("persistence").query(conn).unwrap();
        if info.contains("aof_rewrite_in_progress:0") && info.contains("aof_rewrite_scheduled:0") {
            return;
        }
        assert!(Instant::now() < deadline, "the AOF rewrite did not finish");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits (up to a minute) until the edge behind `admin` has shipped or
/// dropped every click it accepted.
fn settle(admin: u16) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let text = admin_metrics(admin);
        let sum = |name: &str| metric_sum(&text, name);
        let accepted = sum("edge_click_events_total");
        let done = sum("edge_click_events_shipped_total") + sum("edge_click_events_dropped_total");
        if done >= accepted {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the edge on admin port {admin} still has {} clicks to ship",
            accepted - done
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The edge's `/metrics` text, read with a bare HTTP/1.0 request.
fn admin_metrics(admin: u16) -> String {
    use std::io::Read;
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", admin)).expect("admin port");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: bench\r\n\r\n")
        .unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).unwrap();
    text
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(|a, b| a.partial_cmp(b).unwrap());
    values[values.len() / 2]
}

fn start_edge(
    redis: &TestRedis,
    control_plane: &str,
    port: u16,
    admin: u16,
    extra: &[(&str, &str)],
) -> ManagedProcess {
    let mut command = Command::new(env!("CARGO_BIN_EXE_edge-redirect"));
    command
        .env_clear()
        .env("EDGE_HTTP_ADDR", format!("127.0.0.1:{port}"))
        .env("EDGE_ADMIN_ADDR", format!("127.0.0.1:{admin}"))
        .env("REDIS_URL", redis.url())
        .env("CONTROL_PLANE_URL", control_plane)
        .env("EDGE_CACHE_CAPACITY", "1100000")
        .env("CLICK_STREAM_MAXLEN", STREAM_CLICKS.to_string())
        .env("EDGE_CACHE_MAX_AGE_MS", WARM_MAX_AGE_MS)
        .env("RUST_LOG", "error")
        .envs(extra.iter().copied())
        .stdout(Stdio::null());
    ManagedProcess::spawn("edge-redirect", command, 15)
}

/// nginx serving `dir/links.map` as 302s with `worker_processes`
/// `workers`, no access log; its process and port, once it answers.
async fn start_nginx(dir: &Path, workers: &str) -> (ManagedProcess, u16) {
    let port = free_port();
    let user = if running_as_root() {
        "user nobody nogroup;"
    } else {
        ""
    };
    let d = dir.display();
    let conf = dir.join(format!("nginx-{workers}.conf"));
    std::fs::write(
        &conf,
        format!(
            "{user}\nworker_processes {workers};\ndaemon off;\npid {d}/nginx-{workers}.pid;\nerror_log {d}/error.log error;\n\
             events {{ worker_connections 4096; }}\n\
             http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n\
               map_hash_max_size 262144;\n  map_hash_bucket_size 128;\n\
               map $uri $target {{\n    default \"\";\n    include {d}/links.map;\n  }}\n\
               server {{\n    listen 127.0.0.1:{port} reuseport backlog=4096;\n\
                 location / {{\n      if ($target = \"\") {{ return 404; }}\n      return 302 $target;\n    }}\n  }}\n}}\n"
        ),
    )
    .unwrap();
    let mut command = Command::new("nginx");
    command
        .arg("-c")
        .arg(&conf)
        .arg("-e")
        .arg(dir.join("error.log"))
        .stdout(Stdio::null());
    let nginx = ManagedProcess::spawn("nginx", command, 3);
    until_http_status(
        &format!("http://127.0.0.1:{port}/x"),
        404,
        Duration::from_secs(30),
    )
    .await;
    (nginx, port)
}

/// Requests every code once from the edge on `port`, checking each
/// redirect's `Location`.
async fn warm(plain: &reqwest::Client, port: u16, links: &[(String, String)]) {
    let warmers: Vec<_> = links
        .chunks(links.len().div_ceil(64))
        .map(<[_]>::to_vec)
        .map(|chunk| {
            let plain = plain.clone();
            tokio::spawn(async move {
                for (code, url) in chunk {
                    let response = plain
                        .get(format!("http://127.0.0.1:{port}/{code}"))
                        .send()
                        .await
                        .unwrap();
                    assert_eq!(response.status(), 302);
                    assert_eq!(response.headers()["location"].to_str().unwrap(), url);
                }
            })
        })
        .collect();
    for warmer in warmers {
        warmer.await.unwrap();
    }
}

/// `redis-benchmark -t get` on the server at `port`: requests per second.
fn redis_benchmark_get(port: u16) -> f64 {
    let output = Command::new("redis-benchmark")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args([
            "-t", "get", "-c", "64", "-n", "1000000", "-r", "100000", "-q",
        ])
        .output()
        .expect("redis-benchmark is installed with redis-server");
    let text = String::from_utf8_lossy(&output.stdout);
    // "GET: 88105.73 requests per second, p50=0.367 msec"; progress lines end in \r.
    text.split(['\r', '\n'])
        .rev()
        .filter_map(|l| l.trim().strip_prefix("GET:"))
        .find_map(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no GET rate in {text}"))
}

async fn run() {
    let dir = tempfile::tempdir().unwrap();
    let pg = TestPostgres::start();
    let redis = TestRedis::start();

    let database_url = pg.create_database();
    let control_plane_process = control_plane::testing::InProcessControlPlane::start(
        database_url.clone(),
        redis.url(),
        ADMIN_KEY,
        // 100,000 creates as fast as they go: no per-key limit here.
        &[("API_KEY_RATE_LIMIT", "0"), ("RUST_LOG", "error")],
    )
    .await;
    let control_plane = control_plane_process.url().to_owned();

    // 1. Links through the API.
    let started = Instant::now();
    let api = reqwest::Client::new();
    let workers: Vec<_> = (0..32)
        .map(|w| {
            let (api, control_plane) = (api.clone(), control_plane.clone());
            tokio::spawn(async move {
                let mut links = Vec::new();
                for i in (w..LINKS).step_by(32) {
                    let url = format!("https://example.com/articles/{i}?ref=bench");
                    let response = api
                        .post(format!("{control_plane}/shorten"))
                        .bearer_auth(ADMIN_KEY)
                        .json(&json!({"url": url}))
                        .send()
                        .await
                        .unwrap();
                    assert_eq!(response.status(), 201);
                    let body: Value = response.json().await.unwrap();
                    links.push((body["code"].as_str().unwrap().to_owned(), url));
                }
                links
            })
        })
        .collect();
    let mut links = Vec::with_capacity(LINKS);
    for worker in workers {
        links.extend(worker.await.unwrap());
    }
    eprintln!(
        "created {} links through the API in {:?}",
        links.len(),
        started.elapsed()
    );
    // PostgreSQL's work after the creates is done before any round: the
    // relay has written every link to Redis, and VACUUM and CHECKPOINT do
    // now what autovacuum and the checkpointer would do in the middle of
    // the rounds (one run saw PostgreSQL keep most of a core busy for a
    // minute after the creates).
    shortener_common::testing::wait_for(
        Duration::from_secs(120),
        "the outbox relay to write every link to Redis",
        || {
            pg.psql_on(
                &database_url,
                "SELECT count(*) FROM link_outbox WHERE processed_at IS NULL",
            ) == "0"
        },
    );
    pg.psql_on(&database_url, "VACUUM ANALYZE");
    pg.psql_on(&database_url, "CHECKPOINT");

    // nginx map keys ignore case: keep one code per case-folded key.
    let mut folded = HashSet::new();
    links.retain(|(code, _)| folded.insert(code.to_ascii_lowercase()));

    // 2. The edge, warmed with every code.
    let (edge_port, edge_admin) = (free_port(), free_port());
    let edge = start_edge(&redis, &control_plane, edge_port, edge_admin, &[]);
    let (journal_port, journal_admin) = (free_port(), free_port());
    let journal_dir = dir.path().join("journal");
    let edge_journal = start_edge(
        &redis,
        &control_plane,
        journal_port,
        journal_admin,
        &[("EDGE_CLICK_JOURNAL_DIR", journal_dir.to_str().unwrap())],
    );
    let (off_port, off_admin) = (free_port(), free_port());
    let edge_off = start_edge(
        &redis,
        &control_plane,
        off_port,
        off_admin,
        &[("EDGE_CLICK_EVENTS", "false")],
    );
    let (one_port, one_admin) = (free_port(), free_port());
    let edge_one = start_edge(
        &redis,
        &control_plane,
        one_port,
        one_admin,
        &[("EDGE_WORKER_THREADS", "1")],
    );
    for admin in [edge_admin, journal_admin, off_admin, one_admin] {
        until_http_status(
            &format!("http://127.0.0.1:{admin}/healthz"),
            200,
            Duration::from_secs(30),
        )
        .await;
    }
    let plain = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    warm(&plain, edge_port, &links).await;
    warm(&plain, journal_port, &links).await;
    warm(&plain, off_port, &links).await;
    warm(&plain, one_port, &links).await;
    fill_stream(&redis);

    // nginx with the same mappings: `worker_processes auto` (the reference)
    // and 1 (against the one-thread edge).
    let nginx_dir = dir.path().join("nginx");
    std::fs::create_dir_all(&nginx_dir).unwrap();
    let mut map = std::fs::File::create(nginx_dir.join("links.map")).unwrap();
    for (code, url) in &links {
        writeln!(map, "/{code} \"{url}\";").unwrap();
    }
    drop(map);
    let (nginx, nginx_port) = start_nginx(&nginx_dir, "auto").await;
    let (nginx_one, nginx_one_port) = start_nginx(&nginx_dir, "1").await;

    // 3. wrk rounds, alternating.
    let codes_file = dir.path().join("codes.txt");
    std::fs::write(
        &codes_file,
        links
            .iter()
            .map(|(c, _)| format!("{c}\n"))
            .collect::<String>(),
    )
    .unwrap();
    let script = dir.path().join("random.lua");
    std::fs::write(
        &script,
        format!(
            "local codes = {{}}\nfor line in io.lines(\"{}\") do codes[#codes + 1] = \"/\" .. line end\n\
             math.randomseed(os.time())\n\
             request = function()\n  return wrk.format(\"GET\", codes[math.random(#codes)])\nend\n",
            codes_file.display()
        ),
    )
    .unwrap();
    let edge_pids = [edge.pid()];
    let redis_pids: Vec<u32> = redis.pid().into_iter().collect();
    let nginx_all = nginx_pids(nginx.pid());
    let nginx_one_all = nginx_pids(nginx_one.pid());
    let events_on_round = || {
        wrk_round(
            &format!("http://127.0.0.1:{edge_port}"),
            &script,
            &edge_pids,
            &redis_pids,
            Some(edge_admin),
        )
    };
    let misses = || {
        [edge_admin, off_admin]
            .map(|admin| metric_sum(&admin_metrics(admin), "edge_cache_misses_total"))
    };
    let misses_before = misses();
    let mut edge_rounds = Vec::new();
    let mut nginx_rounds = Vec::new();
    let mut off_rounds = Vec::new();
    // The comparison the targets are about, close together in time: the
    // edge with click events on, nginx and the edge with events off.
    for _ in 0..ROUNDS {
        edge_rounds.push(events_on_round());
        nginx_rounds.push(wrk_round(
            &format!("http://127.0.0.1:{nginx_port}"),
            &script,
            &nginx_all,
            &[],
            None,
        ));
        off_rounds.push(wrk_round(
            &format!("http://127.0.0.1:{off_port}"),
            &script,
            &[edge_off.pid()],
            &redis_pids,
            None,
        ));
    }
    let misses_after = misses();
    // Then the secondary pairs: the journal against plain events (the
    // journal's files make the kernel write back during the rounds after
    // it, so it stays out of the comparison above), and one serving
    // thread each.
    let mut journal_rounds = Vec::new();
    let mut plain_rounds = Vec::new();
    let mut one_rounds = Vec::new();
    let mut nginx_one_rounds = Vec::new();
    for _ in 0..SECONDARY_ROUNDS {
        journal_rounds.push(wrk_round(
            &format!("http://127.0.0.1:{journal_port}"),
            &script,
            &[edge_journal.pid()],
            &redis_pids,
            Some(journal_admin),
        ));
        plain_rounds.push(events_on_round());
        one_rounds.push(wrk_round(
            &format!("http://127.0.0.1:{one_port}"),
            &script,
            &[edge_one.pid()],
            &redis_pids,
            Some(one_admin),
        ));
        nginx_one_rounds.push(wrk_round(
            &format!("http://127.0.0.1:{nginx_one_port}"),
            &script,
            &nginx_one_all,
            &[],
            None,
        ));
    }
    // The issue's reference point: a bare hyper + DashMap server, in
    // rounds with the edge (events off and on) and nginx auto.
    let bare_port = free_port();
    let mut command = Command::new(std::env::current_exe().unwrap());
    command
        .arg("--bare-server")
        .arg(bare_port.to_string())
        .arg(nginx_dir.join("links.map"))
        .stdout(Stdio::null());
    let bare = ManagedProcess::spawn("bare hyper + DashMap server", command, 15);
    until_http_status(
        &format!("http://127.0.0.1:{bare_port}/x"),
        404,
        Duration::from_secs(60),
    )
    .await;
    let mut bare_rounds = Vec::new();
    let mut bare_set_on = Vec::new();
    let mut bare_set_off = Vec::new();
    let mut bare_set_nginx = Vec::new();
    for _ in 0..SECONDARY_ROUNDS {
        bare_rounds.push(wrk_round(
            &format!("http://127.0.0.1:{bare_port}"),
            &script,
            &[bare.pid()],
            &[],
            None,
        ));
        bare_set_off.push(wrk_round(
            &format!("http://127.0.0.1:{off_port}"),
            &script,
            &[edge_off.pid()],
            &redis_pids,
            None,
        ));
        bare_set_on.push(events_on_round());
        bare_set_nginx.push(wrk_round(
            &format!("http://127.0.0.1:{nginx_port}"),
            &script,
            &nginx_all,
            &[],
            None,
        ));
    }
    drop(bare);
    let summary = |rounds: &[Round]| {
        (
            median(rounds.iter().map(|r| r.rps).collect()),
            median(rounds.iter().map(|r| r.p50_ms).collect()),
            median(rounds.iter().map(|r| r.p99_ms).collect()),
            median(rounds.iter().map(|r| r.cpu_us_per_request).collect()),
        )
    };
    let (e_rps, e_p50, e_p99, e_cpu) = summary(&edge_rounds);
    let e_redis_cpu = median(
        edge_rounds
            .iter()
            .map(|r| r.side_cpu_us_per_request)
            .collect(),
    );
    let (j_rps, j_p50, j_p99, j_cpu) = summary(&journal_rounds);
    let (p_rps, _, _, p_cpu) = summary(&plain_rounds);
    let (o_rps, o_p50, o_p99, o_cpu) = summary(&off_rounds);
    let (n_rps, n_p50, n_p99, n_cpu) = summary(&nginx_rounds);
    let (e1_rps, e1_p50, e1_p99, e1_cpu) = summary(&one_rounds);
    let (n1_rps, n1_p50, n1_p99, n1_cpu) = summary(&nginx_one_rounds);
    let mut conn = redis::Client::open(redis.url())
        .unwrap()
        .get_connection()
        .unwrap();
    let events = shortener_common::testing::stream_clicks(&mut conn, "clicks").len();
    // Redis's count of AOF writes it had to make without waiting for the
    // previous fsync (the disk was slow): a run's events-on rounds can
    // only be read against it.
    let delayed_fsyncs = redis::cmd("INFO")
        .arg("persistence")
        .query::<String>(&mut conn)
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("aof_delayed_fsync:"))
        .unwrap_or("?")
        .trim()
        .to_string();
    drop(nginx);
    drop(nginx_one);
    drop(edge);
    drop(edge_off);
    drop(edge_one);

    // 4. Empty cache: every request a miss answered by Redis.
    let (cold_port, cold_admin) = (free_port(), free_port());
    let cold = start_edge(
        &redis,
        &control_plane,
        cold_port,
        cold_admin,
        &[
            ("EDGE_CACHE_MAX_AGE_MS", "1"),
            ("EDGE_CLICK_EVENTS", "false"),
        ],
    );
    until_http_status(
        &format!("http://127.0.0.1:{cold_admin}/healthz"),
        200,
        Duration::from_secs(30),
    )
    .await;
    let cold_round = wrk_round(
        &format!("http://127.0.0.1:{cold_port}"),
        &script,
        &[cold.pid()],
        &redis_pids,
        None,
    );
    drop(cold);
    let redis_get_rps = redis_benchmark_get(redis.port());

    // 5. Memory with 1,000,000 cached links.
    let million = 1_000_000usize;
    for chunk in (0..million).collect::<Vec<_>>().chunks(10_000) {
        let mut pipe = redis::pipe();
        for i in chunk {
            pipe.cmd("SET")
                .arg(format!("link:m{i:07}"))
                .arg(format!(
                    r#"{{"url":"https://example.com/articles/{i}?ref=bench","status":302,"expires_at_ms":null,"disabled":false}}"#
                ))
                .ignore();
        }
        pipe.query::<()>(&mut conn).unwrap();
    }
    let (mem_port, mem_admin) = (free_port(), free_port());
    let mem_edge = start_edge(&redis, &control_plane, mem_port, mem_admin, &[]);
    until_http_status(
        &format!("http://127.0.0.1:{mem_admin}/healthz"),
        200,
        Duration::from_secs(30),
    )
    .await;
    let rss_empty = rss_kib(mem_edge.pid());
    let fetchers: Vec<_> = (0..64)
        .map(|w| {
            let plain = plain.clone();
            tokio::spawn(async move {
                for i in (w..million).step_by(64) {
                    let response = plain
                        .get(format!("http://127.0.0.1:{mem_port}/m{i:07}"))
                        .send()
                        .await
                        .unwrap();
                    assert_eq!(response.status(), 302);
                }
            })
        })
        .collect();
    for fetcher in fetchers {
        fetcher.await.unwrap();
    }
    let rss_full = rss_kib(mem_edge.pid());
    let per_link = (rss_full.saturating_sub(rss_empty)) as f64 * 1024.0 / million as f64;

    println!(
        "edge-redirect vs nginx: {} links, wrk -t1 -c64, {ROUNDS} alternating rounds of {ROUND_SECS} s (events on, nginx, events off), medians",
        links.len()
    );
    println!(
        "  edge (click events on):  {e_rps:>9.0} req/s  p50 {e_p50:.2} ms  p99 {e_p99:.2} ms  CPU {e_cpu:.1} us/redirect"
    );
    println!(
        "  edge (click events off): {o_rps:>9.0} req/s  p50 {o_p50:.2} ms  p99 {o_p99:.2} ms  CPU {o_cpu:.1} us/redirect"
    );
    println!(
        "  nginx map + return 302:  {n_rps:>9.0} req/s  p50 {n_p50:.2} ms  p99 {n_p99:.2} ms  CPU {n_cpu:.1} us/redirect  [reference]"
    );
    println!(
        "  edge/nginx: throughput {:.2}x, p99 {:.2}x, CPU per redirect {:.2}x",
        e_rps / n_rps,
        e_p99 / n_p99,
        e_cpu / n_cpu
    );
    // Each events-on round against the nginx round right after it: a slow
    // spell of the host that spans both moves them together, so the
    // round-by-round ratios say how often the edge is ahead.
    let paired = |value: fn(&Round) -> f64, edge_better: fn(f64) -> bool| {
        let ratios: Vec<f64> = edge_rounds
            .iter()
            .zip(&nginx_rounds)
            .map(|(e, n)| value(e) / value(n))
            .collect();
        let better = ratios.iter().filter(|r| edge_better(**r)).count();
        (median(ratios), better)
    };
    let (pair_rps, rps_ahead) = paired(|r| r.rps, |x| x > 1.0);
    let (pair_p99, p99_ahead) = paired(|r| r.p99_ms, |x| x < 1.0);
    let (pair_cpu, cpu_ahead) = paired(|r| r.cpu_us_per_request, |x| x < 1.0);
    println!(
        "  edge/nginx round by round (each events-on round against the nginx round after it), medians: throughput {pair_rps:.3}x (edge ahead in {rps_ahead} of {ROUNDS}), p99 {pair_p99:.2}x (lower in {p99_ahead}), CPU per redirect {pair_cpu:.3}x (lower in {cpu_ahead})"
    );
    let cpus = |rounds: &[Round]| {
        rounds
            .iter()
            .map(|r| format!("{:.1}", r.cpu_us_per_request))
            .collect::<Vec<_>>()
            .join(" ")
    };
    println!(
        "  CPU per redirect by round (us): events on {}; nginx {}; events off {}; Redis delayed fsyncs: {delayed_fsyncs}",
        cpus(&edge_rounds),
        cpus(&nginx_rounds),
        cpus(&off_rounds)
    );
    println!(
        "  cache misses during these rounds: events on {}, events off {}",
        misses_after[0] - misses_before[0],
        misses_after[1] - misses_before[1]
    );
    let all_rounds: Vec<&Round> = [
        &edge_rounds,
        &nginx_rounds,
        &off_rounds,
        &journal_rounds,
        &plain_rounds,
        &one_rounds,
        &nginx_one_rounds,
    ]
    .into_iter()
    .flatten()
    .collect();
    let background: Vec<f64> = all_rounds.iter().map(|r| r.background_cores).collect();
    let longest_wait = all_rounds
        .iter()
        .map(|r| r.waited)
        .max()
        .unwrap_or_default();
    println!(
        "  other processes during the rounds: median {:.2}, most {:.2} of a core; each round waited for a quiet machine (longest wait {:.1} s)",
        median(background.clone()),
        background.iter().copied().fold(0.0, f64::max),
        longest_wait.as_secs_f64()
    );
    println!(
        "  one serving thread each (EDGE_WORKER_THREADS=1, worker_processes 1), click events on, {SECONDARY_ROUNDS} rounds:"
    );
    println!(
        "    edge:  {e1_rps:>9.0} req/s  p50 {e1_p50:.2} ms  p99 {e1_p99:.2} ms  CPU {e1_cpu:.1} us/redirect"
    );
    println!(
        "    nginx: {n1_rps:>9.0} req/s  p50 {n1_p50:.2} ms  p99 {n1_p99:.2} ms  CPU {n1_cpu:.1} us/redirect"
    );
    println!(
        "    edge/nginx: throughput {:.2}x, p99 {:.2}x, CPU per redirect {:.2}x; against nginx auto: throughput {:.2}x, p99 {:.2}x, CPU per redirect {:.2}x",
        e1_rps / n1_rps,
        e1_p99 / n1_p99,
        e1_cpu / n1_cpu,
        e1_rps / n_rps,
        e1_p99 / n_p99,
        e1_cpu / n_cpu
    );
    println!(
        "  click events on/off: throughput {:.2}x, CPU per redirect {:.2}x in the edge, plus {e_redis_cpu:.1} us/redirect in Redis; {events} events in the stream (trimmed to CLICK_STREAM_MAXLEN)",
        e_rps / o_rps,
        e_cpu / o_cpu
    );
    println!(
        "  click journal (EDGE_CLICK_JOURNAL_DIR), {SECONDARY_ROUNDS} rounds alternating with the edge without it: {j_rps:.0} req/s  p50 {j_p50:.2} ms  p99 {j_p99:.2} ms  CPU {j_cpu:.1} us/redirect; on/off: throughput {:.2}x, CPU per redirect {:.2}x",
        j_rps / p_rps,
        j_cpu / p_cpu
    );
    // Each round of the set against its nginx round: medians of the ratios.
    let against_nginx = |rounds: &[Round], value: fn(&Round) -> f64| {
        median(
            rounds
                .iter()
                .zip(&bare_set_nginx)
                .map(|(r, n)| value(r) / value(n))
                .collect(),
        )
    };
    let cpu = |r: &Round| r.cpu_us_per_request;
    let rps = |r: &Round| r.rps;
    println!(
        "  bare hyper + DashMap server (Location its only header; no counters, ages or click events), {SECONDARY_ROUNDS} rounds alternating with the edge and nginx auto, round by round against nginx: CPU per redirect bare {:.3}x, edge events off {:.3}x, events on {:.3}x; throughput bare {:.3}x, events off {:.3}x, events on {:.3}x",
        against_nginx(&bare_rounds, cpu),
        against_nginx(&bare_set_off, cpu),
        against_nginx(&bare_set_on, cpu),
        against_nginx(&bare_rounds, rps),
        against_nginx(&bare_set_off, rps),
        against_nginx(&bare_set_on, rps)
    );
    println!(
        "  empty cache (every request a Redis GET): {:.0} req/s, edge CPU {:.1} us + Redis CPU {:.1} us per redirect; redis-benchmark GET -c64: {redis_get_rps:.0} req/s [reference]; ratio {:.2}x",
        cold_round.rps,
        cold_round.cpu_us_per_request,
        cold_round.side_cpu_us_per_request,
        cold_round.rps / redis_get_rps
    );
    println!(
        "  memory: {rss_empty} KiB empty, {rss_full} KiB with {million} cached links: {per_link:.0} bytes per link (target < 200)"
    );
}

fn running_as_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}
