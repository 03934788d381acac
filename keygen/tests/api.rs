//! keygen against a real Redis, driving the real binary where process
//! boundaries matter (restarts, crashes, signals, exit codes) and the
//! in-process application where a test needs to steer the clock.

use std::collections::HashSet;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use keygen::layout::MAX_WORKER;
use keygen::proto::GenerateKeysRequest;
use keygen::proto::keygen_client::KeygenClient;
use keygen::service::{Clock, SystemClock};
use serde_json::Value;
use shortener_common::testing::{
    ManagedProcess, TestRedis, eventually, free_port, metric_sum, unique_name, until_http_status,
};

const SECRET: &str = "integration-test-secret-0123456789";

/// A keygen binary running as its own process.
struct KeygenProcess {
    process: ManagedProcess,
    http: u16,
    grpc: u16,
}

impl KeygenProcess {
    fn start(extra_env: &[(&str, String)]) -> Self {
        let (http, grpc) = (free_port(), free_port());
        let mut command = Command::new(env!("CARGO_BIN_EXE_keygen"));
        command
            .env_clear()
            .env("KEYGEN_SECRET", SECRET)
            .env("KEYGEN_HTTP_ADDR", format!("127.0.0.1:{http}"))
            .env("KEYGEN_GRPC_ADDR", format!("127.0.0.1:{grpc}"))
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        for (name, value) in extra_env {
            command.env(name, value);
        }
        let process = ManagedProcess::spawn("keygen", command, libc_sigterm());
        Self {
            process,
            http,
            grpc,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.http)
    }

    async fn wait_ready(&self) {
        until_http_status(&self.url("/readyz"), 200, Duration::from_secs(20)).await;
    }

    async fn grpc(&self) -> KeygenClient<tonic::transport::Channel> {
        KeygenClient::connect(format!("http://127.0.0.1:{}", self.grpc))
            .await
            .expect("gRPC connects")
    }

    async fn metric(&self, name: &str) -> f64 {
        let text = reqwest::get(self.url("/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        metric_sum(&text, name)
    }
}

fn libc_sigterm() -> i32 {
    15
}

fn leased_env(redis: &TestRedis, prefix: &str) -> Vec<(&'static str, String)> {
    vec![
        ("REDIS_URL", redis.url()),
        ("KEYGEN_REDIS_PREFIX", prefix.to_owned()),
        ("KEYGEN_LEASE_TTL_MS", "1500".to_owned()),
    ]
}

fn redis_conn(redis: &TestRedis) -> redis::Connection {
    redis::Client::open(redis.url())
        .unwrap()
        .get_connection()
        .unwrap()
}

/// Takes every worker id except `free` on behalf of some other instance.
fn occupy_all_but(redis: &TestRedis, prefix: &str, free: Option<u16>) {
    let mut conn = redis_conn(redis);
    for worker in 0..=MAX_WORKER {
        if Some(worker) != free {
            let _: () = redis::cmd("SET")
                .arg(format!("{prefix}:worker:{worker}:lease"))
                .arg("another-instance")
                .arg("PX")
                .arg(600_000)
                .query(&mut conn)
                .unwrap();
        }
    }
}

fn assert_valid_code(code: &str) {
    assert!(
        (1..=8).contains(&code.len()) && code.bytes().all(|b| b.is_ascii_alphanumeric()),
        "not a base62 code of at most 8 characters: {code:?}"
    );
}

async fn grpc_keys(
    client: &mut KeygenClient<tonic::transport::Channel>,
    count: u32,
) -> (u32, Vec<String>) {
    let response = client
        .generate_keys(GenerateKeysRequest { count })
        .await
        .expect("keys")
        .into_inner();
    (response.worker_id, response.keys)
}

#[tokio::test]
async fn http_api_issues_keys_and_rejects_bad_counts() {
    let redis = TestRedis::shared();
    let keygen = KeygenProcess::start(&leased_env(redis, &unique_name("kg")));
    keygen.wait_ready().await;

    let one: Value = reqwest::get(keygen.url("/generate-key"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let key = one["key"].as_str().expect("{\"key\": ...}");
    assert_valid_code(key);

    let response = reqwest::get(keygen.url("/generate-key?count=1000"))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let many: Value = response.json().await.unwrap();
    let keys: Vec<&str> = many["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k.as_str().unwrap())
        .collect();
    assert_eq!(keys.len(), 1000);
    keys.iter().for_each(|k| assert_valid_code(k));
    let distinct: HashSet<&str> = keys.iter().copied().chain([key]).collect();
    assert_eq!(distinct.len(), 1001);

    for bad in ["0", "1001", "abc", "", "-5", "2.5"] {
        let response = reqwest::get(keygen.url(&format!("/generate-key?count={bad}")))
            .await
            .unwrap();
        assert_eq!(response.status(), 400, "count={bad}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["code"], "invalid_count", "count={bad}");
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("1 to 1000")
        );
    }

    let client = reqwest::Client::new();
    let response = client
        .post(keygen.url("/generate-key"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 405);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "method_not_allowed");
    let response = reqwest::get(keygen.url("/nope")).await.unwrap();
    assert_eq!(response.status(), 404);

    assert_eq!(
        reqwest::get(keygen.url("/healthz")).await.unwrap().status(),
        200
    );
    assert!(keygen.metric("keygen_keys_issued_total").await >= 1001.0);
    let metrics = reqwest::get(keygen.url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("keygen_http_requests_total"), "{metrics}");
}

#[tokio::test]
async fn grpc_issues_batches_and_rejects_bad_counts() {
    let redis = TestRedis::shared();
    let keygen = KeygenProcess::start(&leased_env(redis, &unique_name("kg")));
    keygen.wait_ready().await;
    let mut client = keygen.grpc().await;
    let (worker, keys) = grpc_keys(&mut client, 1000).await;
    assert!(worker <= u32::from(MAX_WORKER));
    assert_eq!(keys.iter().collect::<HashSet<_>>().len(), 1000);
    for bad in [0, 1001] {
        let status = client
            .generate_keys(GenerateKeysRequest { count: bad })
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "count={bad}");
    }
}

#[tokio::test]
async fn two_instances_lease_different_workers_and_never_share_a_key() {
    let redis = TestRedis::shared();
    let prefix = unique_name("kg");
    let a = KeygenProcess::start(&leased_env(redis, &prefix));
    let b = KeygenProcess::start(&leased_env(redis, &prefix));
    a.wait_ready().await;
    b.wait_ready().await;
    let (mut ca, mut cb) = (a.grpc().await, b.grpc().await);
    let fetch_a = async {
        let mut all = Vec::new();
        let mut workers = HashSet::new();
        for _ in 0..40 {
            let (w, keys) = grpc_keys(&mut ca, 1000).await;
            workers.insert(w);
            all.extend(keys);
        }
        (workers, all)
    };
    let fetch_b = async {
        let mut all = Vec::new();
        let mut workers = HashSet::new();
        for _ in 0..40 {
            let (w, keys) = grpc_keys(&mut cb, 1000).await;
            workers.insert(w);
            all.extend(keys);
        }
        (workers, all)
    };
    let ((wa, ka), (wb, kb)) = tokio::join!(fetch_a, fetch_b);
    assert!(wa.is_disjoint(&wb), "workers {wa:?} and {wb:?} overlap");
    let total = ka.len() + kb.len();
    let distinct: HashSet<String> = ka.into_iter().chain(kb).collect();
    assert_eq!(distinct.len(), total, "duplicate keys across instances");
}

/// A crash (SIGKILL) right after a burst that ran ahead of the clock, then a
/// successor on the same worker id: it must start after everything the dead
/// instance could have issued.
#[tokio::test]
async fn a_successor_on_the_same_worker_id_never_repeats_a_crashed_instance() {
    let redis = TestRedis::shared();
    let prefix = unique_name("kg");
    occupy_all_but(redis, &prefix, Some(9));
    let env = leased_env(redis, &prefix);

    let mut first = KeygenProcess::start(&env);
    first.wait_ready().await;
    let mut client = first.grpc().await;
    let mut issued = HashSet::new();
    // 60,000 keys at once: more than three ticks' worth, so this borrows.
    for _ in 0..60 {
        let (worker, keys) = grpc_keys(&mut client, 1000).await;
        assert_eq!(worker, 9);
        issued.extend(keys);
    }
    first.process.kill();

    let second = KeygenProcess::start(&env);
    // The lease must expire first (1.5 s), then the successor takes id 9.
    second.wait_ready().await;
    let mut client = second.grpc().await;
    for _ in 0..60 {
        let (worker, keys) = grpc_keys(&mut client, 1000).await;
        assert_eq!(worker, 9);
        for key in keys {
            assert!(
                issued.insert(key.clone()),
                "key {key} issued twice across a crash"
            );
        }
    }
}

#[tokio::test]
async fn a_pinned_worker_id_resumes_from_its_state_file_after_a_crash() {
    let state = tempfile::tempdir().unwrap();
    let env = vec![
        ("KEYGEN_WORKER_ID", "3".to_owned()),
        (
            "KEYGEN_STATE_DIR",
            state.path().to_str().unwrap().to_owned(),
        ),
        // No Redis at all: a pinned id needs none.
        ("REDIS_URL", "redis://127.0.0.1:1".to_owned()),
    ];
    let mut issued = HashSet::new();
    for round in 0..3 {
        let mut keygen = KeygenProcess::start(&env);
        keygen.wait_ready().await;
        let mut client = keygen.grpc().await;
        for _ in 0..30 {
            let (worker, keys) = grpc_keys(&mut client, 1000).await;
            assert_eq!(worker, 3);
            for key in keys {
                assert!(issued.insert(key.clone()), "round {round}: {key} repeated");
            }
        }
        keygen.process.kill();
    }
}

#[tokio::test]
async fn an_instance_that_loses_its_lease_stops_issuing_until_it_gets_one() {
    let redis = TestRedis::shared();
    let prefix = unique_name("kg");
    let keygen = KeygenProcess::start(&leased_env(redis, &prefix));
    keygen.wait_ready().await;
    let mut client = keygen.grpc().await;
    let (worker, _) = grpc_keys(&mut client, 10).await;

    // Another instance takes over this worker id (and every other one).
    occupy_all_but(redis, &prefix, None);
    let mut conn = redis_conn(redis);
    let lease = format!("{prefix}:worker:{worker}:lease");
    let _: () = redis::cmd("SET")
        .arg(&lease)
        .arg("thief")
        .arg("PX")
        .arg(600_000)
        .query(&mut conn)
        .unwrap();

    eventually(Duration::from_secs(10), "keygen to stop issuing", || {
        let mut client = client.clone();
        async move {
            let status = client
                .generate_keys(GenerateKeysRequest { count: 1 })
                .await
                .err()?;
            (status.code() == tonic::Code::Unavailable).then_some(())
        }
    })
    .await;
    let response = reqwest::get(keygen.url("/generate-key")).await.unwrap();
    assert_eq!(response.status(), 503);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "no_worker_id");
    assert_eq!(
        reqwest::get(keygen.url("/readyz")).await.unwrap().status(),
        503
    );
    assert_eq!(keygen.metric("keygen_lease_lost_total").await, 1.0);

    // One id frees up: the instance takes it and issues again.
    let _: () = redis::cmd("DEL")
        .arg(format!("{prefix}:worker:12:lease"))
        .query(&mut conn)
        .unwrap();
    keygen.wait_ready().await;
    let (new_worker, keys) = grpc_keys(&mut client, 5).await;
    assert_eq!((new_worker, keys.len()), (12, 5));
}

#[tokio::test]
async fn redis_down_stops_issuing_once_the_lease_runs_out_and_recovers() {
    let mut redis = TestRedis::start();
    let prefix = unique_name("kg");
    let keygen = KeygenProcess::start(&leased_env(&redis, &prefix));
    keygen.wait_ready().await;
    let mut client = keygen.grpc().await;
    grpc_keys(&mut client, 10).await;

    redis.stop();
    let down_at = Instant::now();
    eventually(Duration::from_secs(10), "keygen to stop issuing", || {
        let mut client = client.clone();
        async move {
            let status = client
                .generate_keys(GenerateKeysRequest { count: 1 })
                .await
                .err()?;
            (status.code() == tonic::Code::Unavailable).then_some(())
        }
    })
    .await;
    // It must not have stopped later than the 1.5 s lease (plus polling).
    assert!(
        down_at.elapsed() < Duration::from_secs(5),
        "{:?}",
        down_at.elapsed()
    );

    redis.start_again();
    keygen.wait_ready().await;
    assert_eq!(grpc_keys(&mut client, 3).await.1.len(), 3);
}

#[tokio::test]
async fn sigterm_drains_and_releases_the_worker_id() {
    let redis = TestRedis::shared();
    let prefix = unique_name("kg");
    let mut keygen = KeygenProcess::start(&leased_env(redis, &prefix));
    keygen.wait_ready().await;
    let (worker, _) = grpc_keys(&mut keygen.grpc().await, 1).await;
    let lease = format!("{prefix}:worker:{worker}:lease");
    let mut conn = redis_conn(redis);
    let held: Option<String> = redis::cmd("GET").arg(&lease).query(&mut conn).unwrap();
    assert!(held.is_some());

    keygen.process.signal(libc_sigterm());
    eventually(Duration::from_secs(15), "keygen to exit", || {
        let exited = keygen.process.has_exited();
        async move { exited.then_some(()) }
    })
    .await;
    let held: Option<String> = redis::cmd("GET").arg(&lease).query(&mut conn).unwrap();
    assert_eq!(held, None, "the lease should be released on shutdown");
}

#[test]
fn bad_configuration_exits_64_and_names_every_variable() {
    let output = Command::new(env!("CARGO_BIN_EXE_keygen"))
        .env_clear()
        .env("KEYGEN_SECRET", "tooshort")
        .env("KEYGEN_WORKER_ID", "99")
        .env("KEYGEN_GRPC_ADDR", "not-an-address")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&output.stderr);
    for name in ["KEYGEN_SECRET", "KEYGEN_WORKER_ID", "KEYGEN_GRPC_ADDR"] {
        assert!(stderr.contains(name), "{name} not named in: {stderr}");
    }
    assert!(!stderr.contains("tooshort"), "secret printed: {stderr}");
}

/// Wall clock plus an adjustable offset, to step time backwards.
struct SteppedClock {
    offset_ms: AtomicI64,
}

impl Clock for SteppedClock {
    fn now_unix_ms(&self) -> u64 {
        (SystemClock.now_unix_ms() as i64 + self.offset_ms.load(Ordering::SeqCst)) as u64
    }
}

#[tokio::test]
async fn a_clock_stepping_back_is_waited_out_or_refused_never_repeated() {
    let state = tempfile::tempdir().unwrap();
    let config = keygen::Config::from_env(shortener_common::Env::from_pairs([
        ("KEYGEN_SECRET", SECRET),
        ("KEYGEN_WORKER_ID", "4"),
        ("KEYGEN_STATE_DIR", state.path().to_str().unwrap()),
        ("KEYGEN_HTTP_ADDR", "127.0.0.1:0"),
        ("KEYGEN_GRPC_ADDR", "127.0.0.1:0"),
        ("KEYGEN_MAX_CLOCK_WAIT_MS", "3000"),
    ]))
    .unwrap();
    let clock = Arc::new(SteppedClock {
        offset_ms: AtomicI64::new(0),
    });
    let app = keygen::Application::build_with_clock(config, clock.clone())
        .await
        .unwrap();
    let service = app.service();
    let mut issued: HashSet<String> = HashSet::new();
    let mut take = |keys: Vec<String>| {
        for key in keys {
            assert!(issued.insert(key.clone()), "{key} repeated");
        }
    };
    take(service.generate(1000).await.unwrap().1);

    // A small step back (2 s) is absorbed by borrowing: no wait needed.
    clock.offset_ms.store(-2_000, Ordering::SeqCst);
    take(service.generate(1000).await.unwrap().1);

    // 6 s back is beyond the 4-tick borrow limit but within the 3 s wait.
    clock.offset_ms.store(-6_000, Ordering::SeqCst);
    let started = Instant::now();
    take(service.generate(1000).await.unwrap().1);
    assert!(
        started.elapsed() >= Duration::from_millis(500),
        "{:?}",
        started.elapsed()
    );

    // A minute back is refused at once rather than waited for.
    clock.offset_ms.store(-60_000, Ordering::SeqCst);
    let started = Instant::now();
    let err = service.generate(1).await.unwrap_err();
    assert_eq!(err.code(), "clock_behind");
    assert!(started.elapsed() < Duration::from_secs(1));

    let metrics = shortener_common::telemetry::metrics_handle().render();
    for name in [
        "keygen_clock_backwards_total",
        "keygen_clock_waits_total",
        "keygen_clock_refusals_total",
    ] {
        assert!(
            metric_sum(&metrics, name) >= 1.0,
            "{name} not counted: {metrics}"
        );
    }
}

#[test]
fn three_million_consecutive_ids_give_distinct_short_codes() {
    let permutation = keygen::permute::Permutation::new(SECRET.as_bytes());
    let start = keygen::layout::compose(1_000_000, 5, 0);
    let n = 3_000_000u64;
    let mut seen: HashSet<u64> = HashSet::with_capacity(n as usize);
    for id in start..start + n {
        let code = keygen::base62::encode(permutation.forward(id));
        assert!(code.len() <= 8, "{code}");
        // base62 decoding is exact, so distinct numbers are distinct codes.
        assert!(
            seen.insert(keygen::base62::decode(&code).unwrap()),
            "duplicate code {code}"
        );
    }
    // Consecutive IDs do not give neighbouring codes.
    let first = permutation.forward(start);
    let second = permutation.forward(start + 1);
    assert!(first.abs_diff(second) > 1_000_000, "{first} {second}");
}

#[tokio::test]
async fn log_format_json_writes_one_json_object_per_line() {
    let state = tempfile::tempdir().unwrap();
    let log_path = state.path().join("stderr.log");
    let (http, grpc) = (free_port(), free_port());
    let mut command = Command::new(env!("CARGO_BIN_EXE_keygen"));
    command
        .env_clear()
        .env("KEYGEN_SECRET", SECRET)
        .env("KEYGEN_WORKER_ID", "2")
        .env("KEYGEN_STATE_DIR", state.path())
        .env("KEYGEN_HTTP_ADDR", format!("127.0.0.1:{http}"))
        .env("KEYGEN_GRPC_ADDR", format!("127.0.0.1:{grpc}"))
        .env("LOG_FORMAT", "json")
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_path).unwrap());
    let process = ManagedProcess::spawn("keygen", command, libc_sigterm());
    let keygen = KeygenProcess {
        process,
        http,
        grpc,
    };
    keygen.wait_ready().await;
    let text = eventually(Duration::from_secs(10), "a log line", || {
        let text = std::fs::read_to_string(&log_path).unwrap_or_default();
        async move { text.contains("keygen is listening").then_some(text) }
    })
    .await;
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let value: Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(
            value["level"].is_string() && value["message"].is_string(),
            "{line}"
        );
    }
    assert!(!text.contains(SECRET), "the secret must never be logged");
}
