//! The analytics pipeline against real Redis, ClickHouse, PostgreSQL and the
//! real edge, control plane and keygen. The sink runs as its own process (the
//! binary this crate builds), so tests can kill it as a crash would.
//!
//! What is promised, and checked here with exact counts:
//! - every redirect the edge answered with a 3xx is counted exactly once;
//! - a sink killed (SIGKILL) between inserting a batch and acknowledging it
//!   loses nothing and counts nothing twice when it comes back;
//! - ClickHouse stopped for 30 s under load loses nothing;
//! - Redis restarted under load (AOF on) loses nothing the edge accepted;
//! - an edge killed (SIGKILL) under load, with its click journal, loses no
//!   click of a redirect that reached its client, and ships none twice;
//! - two sinks in one group share the work and count each event once;
//! - entries that are not events, and rows ClickHouse refuses, land in the
//!   dead-letter stream and block nothing.

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use control_plane::testing::InProcessControlPlane;
use reqwest::{Client, StatusCode, redirect};
use serde_json::{Value, json};
use shortener_common::ClickEvent;
use shortener_common::event::{write_packed_record, xadd_packed};
use shortener_common::testing::{
    ManagedProcess, TestClickHouse, TestPostgres, TestRedis, eventually, free_port, geoip_db,
    unique_name, until_http_status,
};

const ADMIN_KEY: &str = "analytics-test-admin-key-0123456789";
const VISITOR_SECRET: &str = "analytics-test-visitor-secret";

const CHROME_WINDOWS: &str = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.0.0 Safari/537.36";
const SAFARI_IPHONE: &str = "Mozilla/5.0 (iPhone; CPU iPhone OS 17_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.1 Mobile/15E148 Safari/604.1";
const FIREFOX_LINUX: &str =
    "Mozilla/5.0 (X11; Linux x86_64; rv:121.0) Gecko/20100101 Firefox/121.0";
const GOOGLEBOT: &str = "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)";

/// Redis, ClickHouse and a sink configuration of one test's own.
struct Pipeline {
    redis: Arc<TestRedis>,
    clickhouse: Arc<TestClickHouse>,
    database: String,
    stream: String,
    control_plane: Option<String>,
}

/// The sink as a separate process.
struct Sink {
    process: ManagedProcess,
    port: u16,
}

impl Sink {
    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    async fn until_ready(&self) {
        until_http_status(&self.url("/readyz"), 200, Duration::from_secs(30)).await;
    }

    /// The value of a counter or gauge from `/metrics` (0 when absent).
    async fn metric(&self, name: &str) -> f64 {
        let text = reqwest::get(self.url("/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        shortener_common::testing::metric_sum(&text, name)
    }
}

impl Pipeline {
    fn new(redis: Arc<TestRedis>, clickhouse: Arc<TestClickHouse>) -> Self {
        Self {
            redis,
            clickhouse,
            database: unique_name("analytics"),
            stream: unique_name("clicks"),
            control_plane: None,
        }
    }

    fn sink_env(&self, consumer: &str, port: u16) -> Vec<(String, String)> {
        let mut env = vec![
            ("ANALYTICS_ADDR", format!("127.0.0.1:{port}")),
            ("REDIS_URL", self.redis.url()),
            ("CLICKHOUSE_URL", self.clickhouse.url()),
            ("CLICKHOUSE_DATABASE", self.database.clone()),
            ("CLICK_STREAM", self.stream.clone()),
            ("CLICK_DEAD_LETTER_STREAM", format!("{}-dead", self.stream)),
            ("SINK_CONSUMER", consumer.to_owned()),
            ("SINK_CLAIM_IDLE_MS", "5000".to_owned()),
            ("SINK_BATCH_AGE_MS", "200".to_owned()),
            ("ANALYTICS_VISITOR_SECRET", VISITOR_SECRET.to_owned()),
            ("GEOIP_DB", geoip_db().to_string_lossy().into_owned()),
            ("SHUTDOWN_DRAIN_MS", "3000".to_owned()),
            ("RUST_LOG", "warn".to_owned()),
        ];
        if let Some(cp) = &self.control_plane {
            env.push(("CONTROL_PLANE_URL", cp.clone()));
        }
        env.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
    }

    fn migrate(&self) {
        let status = Command::new(env!("CARGO_BIN_EXE_analytics-sink"))
            .arg("migrate")
            .envs(self.sink_env("migrate", free_port()))
            .status()
            .unwrap();
        assert!(status.success(), "analytics-sink migrate failed: {status}");
    }

    fn spawn_sink(&self, consumer: &str, extra: &[(&str, &str)]) -> Sink {
        let port = free_port();
        let mut command = Command::new(env!("CARGO_BIN_EXE_analytics-sink"));
        command
            .envs(self.sink_env(consumer, port))
            .envs(extra.iter().copied())
            .stdout(Stdio::null());
        Sink {
            process: ManagedProcess::spawn("analytics-sink", command, libc::SIGTERM),
            port,
        }
    }

    async fn start_sink(&self, consumer: &str, extra: &[(&str, &str)]) -> Sink {
        let sink = self.spawn_sink(consumer, extra);
        sink.until_ready().await;
        sink
    }

    fn redis_conn(&self) -> redis::Connection {
        redis::Client::open(self.redis.url())
            .unwrap()
            .get_connection()
            .unwrap()
    }

    /// Writes `n` click events for `code` straight into the stream and
    /// returns their ids: in groups of 100 that alternate between the two
    /// entry forms, one packed entry (as the edge writes) and one entry per
    /// click (as earlier edges did).
    fn produce(&self, code: &str, n: usize) -> Vec<u128> {
        let mut conn = self.redis_conn();
        let mut ids = Vec::with_capacity(n);
        for chunk_start in (0..n).step_by(1000) {
            let mut pipe = redis::pipe();
            for group in (chunk_start..n.min(chunk_start + 1000)).step_by(100) {
                let packed = (group / 100).is_multiple_of(2);
                let mut clicks = Vec::new();
                for i in group..n.min(group + 100) {
                    let event = ClickEvent {
                        event_id: rand::random(),
                        code: code.to_owned(),
                        ts_ms: now_ms(),
                        ip: std::net::Ipv4Addr::from(0x0a00_0000 + i as u32).into(),
                        user_agent: Some(CHROME_WINDOWS.to_owned()),
                        referer: None,
                        accept_language: Some("en-GB".to_owned()),
                    };
                    ids.push(event.event_id);
                    if packed {
                        event.write_packed(&mut clicks);
                    } else {
                        let cmd = pipe.cmd("XADD").arg(&self.stream).arg("*");
                        for (name, value) in event.to_stream_fields() {
                            cmd.arg(name).arg(value);
                        }
                        cmd.ignore();
                    }
                }
                if packed {
                    pipe.add_command(xadd_packed(&self.stream, clicks)).ignore();
                }
            }
            pipe.query::<()>(&mut conn).unwrap();
        }
        ids
    }

    fn count(&self, sql_where: &str) -> u64 {
        self.clickhouse
            .query(&format!(
                "SELECT count(event_id) FROM {}.clicks WHERE {sql_where}",
                self.database
            ))
            .trim()
            .parse()
            .unwrap()
    }

    /// Rows in `clicks` and distinct event ids among them.
    fn counts(&self) -> (u64, u64) {
        let text = self.clickhouse.query(&format!(
            "SELECT count(), uniqExact(event_id) FROM {}.clicks",
            self.database
        ));
        let mut parts = text.split_whitespace().map(|n| n.parse::<u64>().unwrap());
        (parts.next().unwrap(), parts.next().unwrap())
    }

    async fn until_rows(&self, expected: u64, within: Duration) {
        eventually(within, &format!("{expected} rows in ClickHouse"), || {
            let (rows, _) = self.counts();
            assert!(
                rows <= expected,
                "{rows} rows, more than the {expected} events sent"
            );
            async move { (rows == expected).then_some(()) }
        })
        .await;
    }

    fn pending(&self) -> u64 {
        let reply: redis::Value = redis::cmd("XPENDING")
            .arg(&self.stream)
            .arg("analytics-sink")
            .query(&mut self.redis_conn())
            .unwrap();
        match reply {
            redis::Value::Array(items) => match items.first() {
                Some(redis::Value::Int(n)) => *n as u64,
                _ => 0,
            },
            _ => 0,
        }
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// The whole path: control plane, edge and sink.
struct Stack {
    pipeline: Pipeline,
    edge_port: u16,
    edge: Client,
    api: Client,
    control_plane: InProcessControlPlane,
}

impl Stack {
    async fn start(redis: Arc<TestRedis>) -> Self {
        let control_plane = InProcessControlPlane::start(
            TestPostgres::shared().create_database(),
            redis.url(),
            ADMIN_KEY,
            &[],
        )
        .await;

        let mut pipeline = Pipeline::new(redis.clone(), Arc::new(TestClickHouse::start()));
        pipeline.control_plane = Some(control_plane.url().to_owned());
        let edge_config = edge_redirect::Config::from_env(shortener_common::Env::from_pairs([
            ("EDGE_HTTP_ADDR", "127.0.0.1:0".to_owned()),
            ("EDGE_ADMIN_ADDR", "127.0.0.1:0".to_owned()),
            ("REDIS_URL", redis.url()),
            ("CONTROL_PLANE_URL", control_plane.url().to_owned()),
            ("CLICK_STREAM", pipeline.stream.clone()),
        ]))
        .unwrap();
        let edge = edge_redirect::Application::build(edge_config)
            .await
            .unwrap();
        let edge_port = edge.http_port();
        tokio::spawn(edge.run_until(std::future::pending()));
        Self {
            pipeline,
            control_plane,
            edge_port,
            edge: Client::builder()
                .redirect(redirect::Policy::none())
                .build()
                .unwrap(),
            api: Client::new(),
        }
    }

    async fn create(&self) -> String {
        let response = self
            .api
            .post(format!("{}/shorten", self.control_plane.url()))
            .bearer_auth(ADMIN_KEY)
            .json(&json!({"url": "https://example.com/analytics"}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 201);
        response.json::<Value>().await.unwrap()["code"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    /// One redirect as a visitor at `ip` (the test talks to the edge from
    /// 127.0.0.1, a trusted proxy, so `X-Forwarded-For` is believed).
    async fn visit(&self, code: &str, ip: &str, ua: &str, referer: Option<&str>) -> StatusCode {
        let mut request = self
            .edge
            .get(format!("http://127.0.0.1:{}/{code}", self.edge_port))
            .header("x-forwarded-for", ip)
            .header("user-agent", ua)
            .header("accept-language", "en-GB,en;q=0.9");
        if let Some(referer) = referer {
            request = request.header("referer", referer);
        }
        match request.send().await {
            Ok(response) => response.status(),
            Err(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    async fn analytics(&self, sink: &Sink, path: &str, key: Option<&str>) -> (StatusCode, Value) {
        let mut request = self.api.get(sink.url(path));
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        let response = request.send().await.unwrap();
        let status = response.status();
        (status, response.json().await.unwrap_or(Value::Null))
    }
}

fn breakdown(report: &Value, field: &str) -> HashMap<String, u64> {
    report[field]
        .as_array()
        .unwrap_or_else(|| panic!("{field} missing from {report}"))
        .iter()
        .map(|v| {
            (
                v["value"].as_str().unwrap().to_owned(),
                v["clicks"].as_u64().unwrap(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirects_are_counted_exactly_with_their_breakdowns() {
    let stack = Stack::start(Arc::new(TestRedis::start())).await;
    stack.pipeline.migrate();
    let sink = stack.pipeline.start_sink("sink-a", &[]).await;
    let code = stack.create().await;
    let quiet = stack.create().await;

    // 24 human visits and 3 from a crawler, from three countries.
    let visits: Vec<(&str, &str, Option<&str>)> = [
        (
            (
                "81.2.69.142",
                CHROME_WINDOWS,
                Some("https://news.example.com/story"),
            ),
            10,
        ),
        (
            ("89.160.20.112", SAFARI_IPHONE, Some("https://t.co/abc")),
            8,
        ),
        (("8.8.8.8", FIREFOX_LINUX, None), 6),
        (("66.249.66.1", GOOGLEBOT, None), 3),
    ]
    .into_iter()
    .flat_map(|(visit, n)| std::iter::repeat_n(visit, n))
    .collect();
    for (ip, ua, referer) in &visits {
        assert_eq!(
            stack.visit(&code, ip, ua, *referer).await,
            StatusCode::FOUND
        );
    }

    let path = format!("/analytics/{code}");
    let started = std::time::Instant::now();
    eventually(Duration::from_secs(5), "all clicks in the report", || {
        let request = stack.analytics(&sink, &path, Some(ADMIN_KEY));
        async move {
            let (status, report) = request.await;
            assert_eq!(status, StatusCode::OK, "{report}");
            (report["clicks"] == 24 && report["bots"] == 3).then_some(())
        }
    })
    .await;
    eprintln!(
        "24 clicks reported {:?} after the last redirect",
        started.elapsed()
    );
    // The report's totals, days and breakdowns are separate queries, run
    // side by side: the one that saw the last insert land may not have been
    // the totals'. Now that every click is stored, a new report sees them
    // all in every part.
    let (status, report) = stack.analytics(&sink, &path, Some(ADMIN_KEY)).await;
    assert_eq!(status, StatusCode::OK, "{report}");

    assert_eq!(report["code"], code.as_str());
    // Each (address, User-Agent) pair is one visitor.
    assert_eq!(report["unique_visitors"], 3);
    assert!(report["last_accessed"].as_str().unwrap().ends_with('Z'));
    let today = chrono::Utc::now().format("%Y-%m-%d").to_string();
    assert_eq!(report["by_day"], json!([{"date": today, "clicks": 24}]));
    assert_eq!(
        breakdown(&report, "countries"),
        HashMap::from([("GB".into(), 10), ("SE".into(), 8), ("US".into(), 6)])
    );
    assert_eq!(
        breakdown(&report, "referrers"),
        HashMap::from([
            ("news.example.com".into(), 10),
            ("t.co".into(), 8),
            (String::new(), 6)
        ])
    );
    assert_eq!(
        breakdown(&report, "browsers"),
        HashMap::from([
            ("Chrome".into(), 10),
            ("Safari".into(), 8),
            ("Firefox".into(), 6)
        ])
    );
    assert_eq!(
        breakdown(&report, "devices"),
        HashMap::from([("desktop".into(), 16), ("mobile".into(), 8)])
    );
    assert_eq!(
        breakdown(&report, "operating_systems")
            .values()
            .sum::<u64>(),
        24
    );
    // The list is ordered by clicks.
    assert_eq!(report["countries"][0], json!({"value": "GB", "clicks": 10}));

    // A range that cuts the day is read from the raw table: same numbers.
    let hour_ago = (chrono::Utc::now() - chrono::Duration::hours(1)).to_rfc3339();
    let (status, ranged) = stack
        .analytics(
            &sink,
            &format!("{path}?from={}", hour_ago.replace('+', "%2B")),
            Some(ADMIN_KEY),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    for field in [
        "clicks",
        "bots",
        "unique_visitors",
        "by_day",
        "countries",
        "referrers",
        "browsers",
        "devices",
        "last_accessed",
    ] {
        assert_eq!(
            ranged[field], report[field],
            "{field} differs on the raw path"
        );
    }
    // A whole-day range that excludes today.
    let (status, tomorrow) = stack
        .analytics(
            &sink,
            &format!(
                "{path}?from={}",
                (chrono::Utc::now() + chrono::Duration::days(1)).format("%Y-%m-%d")
            ),
            Some(ADMIN_KEY),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        (tomorrow["clicks"].as_u64(), tomorrow["bots"].as_u64()),
        (Some(0), Some(0))
    );

    // A link without clicks: 200 with zeros.
    let (status, empty) = stack
        .analytics(&sink, &format!("/analytics/{quiet}"), Some(ADMIN_KEY))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(empty["clicks"], 0);
    assert_eq!(empty["unique_visitors"], 0);
    assert_eq!(empty["last_accessed"], Value::Null);
    assert_eq!(empty["by_day"], json!([]));
    assert_eq!(empty["countries"], json!([]));

    // Errors: unknown code, no key, wrong key, bad range.
    let (status, body) = stack
        .analytics(&sink, "/analytics/nosuchlink", Some(ADMIN_KEY))
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("link_not_found"))
    );
    let (status, body) = stack.analytics(&sink, &path, None).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("unauthorized"))
    );
    let (status, _) = stack.analytics(&sink, &path, Some("sk_wrong")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, body) = stack
        .analytics(&sink, &format!("{path}?from=yesterday"), Some(ADMIN_KEY))
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_range"))
    );

    // The raw table is what SQL users see: every event once, no address
    // kept (STORE_RAW_IP is off), the visitor hash instead.
    let (rows, distinct) = stack.pipeline.counts();
    assert_eq!((rows, distinct), (27, 27));
    assert_eq!(stack.pipeline.count("ip != ''"), 0);
    assert_eq!(stack.pipeline.count("is_bot = 1 AND device = 'bot'"), 3);
    assert_eq!(stack.pipeline.count("language = 'en-gb'"), 27);
    assert_eq!(stack.pipeline.pending(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrations_are_recorded_and_run_once() {
    let pipeline = Pipeline::new(
        Arc::new(TestRedis::start()),
        Arc::new(TestClickHouse::start()),
    );
    pipeline.migrate();
    pipeline.migrate();
    let recorded = pipeline.clickhouse.query(&format!(
        "SELECT version, name FROM {}.schema_migrations FORMAT TSV",
        pipeline.database
    ));
    assert_eq!(recorded.trim(), "1\tclicks");
    let tables = pipeline.clickhouse.query(&format!(
        "SELECT name FROM system.tables WHERE database = '{}' ORDER BY name FORMAT TSV",
        pipeline.database
    ));
    assert_eq!(
        tables.split_whitespace().collect::<Vec<_>>(),
        [
            "clicks",
            "clicks_by_dimension",
            "clicks_by_dimension_mv",
            "clicks_daily",
            "clicks_daily_mv",
            "schema_migrations"
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sink_killed_between_insert_and_ack_counts_every_event_once() {
    let pipeline = Pipeline::new(
        Arc::new(TestRedis::start()),
        Arc::new(TestClickHouse::start()),
    );
    pipeline.migrate();
    let ids = pipeline.produce("killme", 100_000);
    // Redis refuses XACK (an ACL change, which applies at once to open
    // connections): the first batch lands in ClickHouse and its
    // acknowledgement cannot be made, deterministically. Then kill the sink.
    let deny_ack = |rule: &str| {
        let _: () = redis::cmd("ACL")
            .arg("SETUSER")
            .arg("default")
            .arg(rule)
            .query(&mut pipeline.redis_conn())
            .unwrap();
    };
    deny_ack("-xack");
    let mut sink = pipeline
        .start_sink("sink-k", &[("SINK_BATCH_SIZE", "2000")])
        .await;
    eventually(Duration::from_secs(20), "the first rows to land", || {
        let rows = pipeline.count("1");
        async move { (rows > 0).then_some(()) }
    })
    .await;
    sink.process.kill();
    deny_ack("+xack");

    let (stored, _) = pipeline.counts();
    let unacked = pipeline.pending();
    assert!(stored < 100_000, "the sink finished before it was killed");
    assert!(unacked > 0, "no entry was left pending by the kill");

    let sink = pipeline
        .start_sink("sink-k", &[("SINK_BATCH_SIZE", "2000")])
        .await;
    pipeline.until_rows(100_000, Duration::from_secs(60)).await;
    let (rows, distinct) = pipeline.counts();
    assert_eq!((rows, distinct), (ids.len() as u64, ids.len() as u64));
    eventually(Duration::from_secs(10), "every entry acknowledged", || {
        let pending = pipeline.pending();
        async move { (pending == 0).then_some(()) }
    })
    .await;
    // The restarted sink found rows of its pending entries already stored.
    assert!(sink.metric("analytics_sink_duplicates_skipped_total").await > 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_sinks_share_the_work_and_count_once() {
    let pipeline = Pipeline::new(
        Arc::new(TestRedis::start()),
        Arc::new(TestClickHouse::start()),
    );
    pipeline.migrate();
    let a = pipeline
        .start_sink("sink-1", &[("SINK_BATCH_SIZE", "1000")])
        .await;
    let b = pipeline
        .start_sink("sink-2", &[("SINK_BATCH_SIZE", "1000")])
        .await;
    let mut sent = 0;
    for _ in 0..10 {
        sent += pipeline.produce("shared", 3_000).len() as u64;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    pipeline.until_rows(sent, Duration::from_secs(60)).await;
    let (rows, distinct) = pipeline.counts();
    assert_eq!((rows, distinct), (sent, sent));
    let (by_a, by_b) = (
        a.metric("analytics_sink_events_inserted_total").await,
        b.metric("analytics_sink_events_inserted_total").await,
    );
    assert!(
        by_a > 0.0 && by_b > 0.0,
        "work was not shared: {by_a} and {by_b}"
    );
    assert_eq!(by_a + by_b, sent as f64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clickhouse_stopped_for_30_seconds_under_load_loses_nothing() {
    let mut clickhouse = TestClickHouse::start();
    let database = unique_name("analytics");
    let redis = Arc::new(TestRedis::start());
    // Own ClickHouse, to stop it; the pipeline helper borrows its URL.
    let ch_url = clickhouse.url();
    let pipeline = Pipeline {
        redis: redis.clone(),
        clickhouse: Arc::new(external_clickhouse(&ch_url)),
        database: database.clone(),
        stream: unique_name("clicks"),
        control_plane: None,
    };
    pipeline.migrate();
    let sink = pipeline.start_sink("sink-ch", &[]).await;

    // Load: 1,000 events every 100 ms for the whole test.
    let sending = Arc::new(AtomicBool::new(true));
    let sent = Arc::new(AtomicU64::new(0));
    let producer = {
        let (sending, sent) = (sending.clone(), sent.clone());
        let (redis_url, stream) = (redis.url(), pipeline.stream.clone());
        std::thread::spawn(move || {
            let p = Pipeline {
                redis: Arc::new(external_redis(&redis_url)),
                clickhouse: Arc::new(external_clickhouse("http://127.0.0.1:1")),
                database: String::new(),
                stream,
                control_plane: None,
            };
            while sending.load(Ordering::Relaxed) {
                sent.fetch_add(p.produce("steady", 1_000).len() as u64, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    clickhouse.stop();
    until_http_status(&sink.url("/readyz"), 503, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_secs(30)).await;
    clickhouse.start_again();
    tokio::time::sleep(Duration::from_secs(2)).await;
    sending.store(false, Ordering::Relaxed);
    producer.join().unwrap();
    let sent = sent.load(Ordering::Relaxed);

    pipeline.until_rows(sent, Duration::from_secs(60)).await;
    let (rows, distinct) = pipeline.counts();
    assert_eq!((rows, distinct), (sent, sent));
    assert!(sink.metric("analytics_sink_insert_retries_total").await > 0.0);
    sink.until_ready().await;
}

/// A handle to a server that another handle owns (never stopped by drop).
fn external_clickhouse(url: &str) -> TestClickHouse {
    TestClickHouse::external(url)
}

fn external_redis(url: &str) -> TestRedis {
    TestRedis::external(url)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restarted_under_load_loses_no_click_the_edge_accepted() {
    let redis = TestRedis::start();
    let redis_url = redis.url();
    let redis = Arc::new(std::sync::Mutex::new(redis));
    let stack = Arc::new(Stack::start(Arc::new(external_redis(&redis_url))).await);
    stack.pipeline.migrate();
    let sink = stack.pipeline.start_sink("sink-r", &[]).await;
    let code = stack.create().await;
    assert_eq!(
        stack.visit(&code, "192.0.2.1", CHROME_WINDOWS, None).await,
        StatusCode::FOUND
    );

    // 8 clients redirect as fast as they can while Redis restarts.
    let running = Arc::new(AtomicBool::new(true));
    let redirected = Arc::new(AtomicU64::new(1));
    let mut clients = Vec::new();
    for c in 0..8 {
        let (stack, code, running, redirected) = (
            stack.clone(),
            code.clone(),
            running.clone(),
            redirected.clone(),
        );
        clients.push(tokio::spawn(async move {
            let ip = format!("192.0.2.{}", c + 10);
            while running.load(Ordering::Relaxed) {
                if stack
                    .visit(&code, &ip, FIREFOX_LINUX, None)
                    .await
                    .is_redirection()
                {
                    redirected.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    tokio::task::spawn_blocking({
        let redis = redis.clone();
        move || {
            let mut redis = redis.lock().unwrap();
            redis.stop();
            std::thread::sleep(Duration::from_secs(2));
            redis.start_again();
        }
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    running.store(false, Ordering::Relaxed);
    for client in clients {
        client.await.unwrap();
    }
    let redirected = redirected.load(Ordering::Relaxed);
    assert!(redirected > 100, "only {redirected} redirects");

    let path = format!("/analytics/{code}");
    eventually(Duration::from_secs(30), "every redirect counted", || {
        let request = stack.analytics(&sink, &path, Some(ADMIN_KEY));
        async move {
            let (_, report) = request.await;
            let clicks = report["clicks"].as_u64().unwrap_or(0);
            assert!(
                clicks <= redirected,
                "{clicks} clicks for {redirected} redirects"
            );
            (clicks == redirected).then_some(())
        }
    })
    .await;
    let (rows, distinct) = stack.pipeline.counts();
    assert_eq!((rows, distinct), (redirected, redirected));
}

/// The edge binary `cargo test --workspace` builds next to this test's.
fn edge_binary() -> std::path::PathBuf {
    let exe = std::env::current_exe().unwrap();
    let binary = exe
        .parent()
        .and_then(|deps| deps.parent())
        .unwrap()
        .join("edge-redirect");
    assert!(
        binary.exists(),
        "{} is missing: run `cargo test --workspace` (or `cargo build -p edge-redirect`) first",
        binary.display()
    );
    binary
}

/// Every click event in the stream for `code`: its Referer, per click.
fn stream_referers(pipeline: &Pipeline, code: &str) -> Vec<String> {
    shortener_common::testing::stream_clicks(&mut pipeline.redis_conn(), &pipeline.stream)
        .into_iter()
        .filter(|click| click.code == code)
        .map(|click| click.referer.unwrap_or_default())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_killed_under_load_loses_no_click_that_got_a_redirect() {
    let stack = Arc::new(Stack::start(Arc::new(TestRedis::start())).await);
    stack.pipeline.migrate();
    let sink = stack.pipeline.start_sink("sink-e", &[]).await;
    let code = stack.create().await;
    let journal = tempfile::tempdir().unwrap();
    let (port, admin_port) = (free_port(), free_port());
    let spawn_edge = || {
        let mut command = Command::new(edge_binary());
        command
            .env("EDGE_HTTP_ADDR", format!("127.0.0.1:{port}"))
            .env("EDGE_ADMIN_ADDR", format!("127.0.0.1:{admin_port}"))
            .env("REDIS_URL", stack.pipeline.redis.url())
            .env("CONTROL_PLANE_URL", stack.control_plane.url())
            .env("CLICK_STREAM", &stack.pipeline.stream)
            .env("EDGE_CLICK_JOURNAL_DIR", journal.path())
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null());
        ManagedProcess::spawn("edge-redirect", command, libc::SIGTERM)
    };
    let healthz = format!("http://127.0.0.1:{admin_port}/healthz");
    let mut edge = spawn_edge();
    until_http_status(&healthz, 200, Duration::from_secs(30)).await;

    // 8 clients redirect as fast as they can, each request with a Referer
    // of its own; a client notes the Referers of the redirects it received.
    let target = "https://example.com/analytics";
    let running = Arc::new(AtomicBool::new(true));
    let received = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let mut clients = Vec::new();
    for c in 0..8 {
        let (code, running, received) = (code.clone(), running.clone(), received.clone());
        let client = Client::builder()
            .redirect(redirect::Policy::none())
            .build()
            .unwrap();
        clients.push(tokio::spawn(async move {
            let mut n = 0u64;
            while running.load(Ordering::Relaxed) {
                n += 1;
                let referer = format!("https://drill.test/{c}/{n}");
                let response = client
                    .get(format!("http://127.0.0.1:{port}/{code}"))
                    .header("referer", &referer)
                    .send()
                    .await;
                match response {
                    Ok(r) if r.status() == StatusCode::FOUND => {
                        assert_eq!(r.headers()["location"], target);
                        received.lock().unwrap().push(referer);
                    }
                    Ok(r) => panic!("unexpected {}", r.status()),
                    // The edge is dead or restarting.
                    Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let before_kill = received.lock().unwrap().len();
    edge.kill();
    let at_kill = received.lock().unwrap().len();
    assert!(
        before_kill > 100,
        "only {before_kill} redirects before the kill"
    );

    // A restarted edge serves correctly at once.
    let mut edge = spawn_edge();
    until_http_status(&healthz, 200, Duration::from_secs(30)).await;
    let first = Client::builder()
        .redirect(redirect::Policy::none())
        .build()
        .unwrap()
        .get(format!("http://127.0.0.1:{port}/{code}"))
        .header("referer", "https://drill.test/first-after-restart")
        .send()
        .await
        .unwrap();
    assert_eq!(first.status(), StatusCode::FOUND);
    assert_eq!(first.headers()["location"], target);
    received
        .lock()
        .unwrap()
        .push("https://drill.test/first-after-restart".to_owned());
    tokio::time::sleep(Duration::from_millis(1500)).await;
    running.store(false, Ordering::Relaxed);
    for client in clients {
        client.await.unwrap();
    }
    let received: Vec<String> = received.lock().unwrap().clone();
    assert!(
        received.len() > at_kill + 100,
        "only {} redirects after the restart",
        received.len() - at_kill
    );

    // Every received redirect is in the stream exactly once. The only other
    // clicks are of requests the killed edge took but never answered (at
    // most one per client).
    let received_set: std::collections::HashSet<&String> = received.iter().collect();
    assert_eq!(received_set.len(), received.len());
    eventually(
        Duration::from_secs(30),
        "every received redirect shipped",
        || {
            let shipped: std::collections::HashSet<String> =
                stream_referers(&stack.pipeline, &code)
                    .into_iter()
                    .collect();
            let missing = received_set
                .iter()
                .filter(|r| !shipped.contains(**r))
                .count();
            async move { (missing == 0).then_some(()) }
        },
    )
    .await;
    edge.stop();
    let shipped = stream_referers(&stack.pipeline, &code);
    let mut seen = std::collections::HashSet::new();
    for referer in &shipped {
        assert!(seen.insert(referer), "{referer} shipped twice");
    }
    let unanswered = shipped.len() - received.len();
    assert!(
        unanswered <= 8,
        "{unanswered} clicks nobody was answered for"
    );
    // Nothing is left in the journal.
    let left: Vec<_> = std::fs::read_dir(journal.path()).unwrap().collect();
    assert!(left.is_empty(), "{left:?} left in the journal");

    // And analytics counts each exactly once.
    let path = format!("/analytics/{code}");
    let expected = shipped.len() as u64;
    eventually(Duration::from_secs(30), "every click counted", || {
        let request = stack.analytics(&sink, &path, Some(ADMIN_KEY));
        async move {
            let (_, report) = request.await;
            let clicks = report["clicks"].as_u64().unwrap_or(0);
            assert!(clicks <= expected, "{clicks} clicks for {expected} events");
            (clicks == expected).then_some(())
        }
    })
    .await;
    let (rows, distinct) = stack.pipeline.counts();
    assert_eq!((rows, distinct), (expected, expected));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_entries_and_refused_rows_go_to_the_dead_letter_stream() {
    let pipeline = Pipeline::new(
        Arc::new(TestRedis::start()),
        Arc::new(external_clickhouse(&TestClickHouse::shared().url())),
    );
    pipeline.migrate();
    // An operator added a check (18.16 has no CONSTRAINT): ClickHouse now
    // refuses, as data, rows whose language tag is longer than 5 bytes.
    pipeline.clickhouse.query(&format!(
        "ALTER TABLE {}.clicks ADD COLUMN lang_check UInt8 DEFAULT throwIf(length(language) > 5)",
        pipeline.database
    ));
    let good = pipeline.produce("fine", 500).len() as u64;
    let mut conn = pipeline.redis_conn();
    // Not events at all.
    let _: String = redis::cmd("XADD")
        .arg(&pipeline.stream)
        .arg("*")
        .arg("hello")
        .arg("world")
        .query(&mut conn)
        .unwrap();
    let mut broken = ClickEvent {
        event_id: rand::random(),
        code: "fine".into(),
        ts_ms: now_ms(),
        ip: "192.0.2.1".parse().unwrap(),
        user_agent: None,
        referer: None,
        accept_language: Some("zh-Hant-TW".into()),
    }
    .to_stream_fields();
    let refused_id = broken[0].1.clone();
    let _: String = redis::cmd("XADD")
        .arg(&pipeline.stream)
        .arg("*")
        .arg(broken.clone().map(|(n, v)| [n.to_owned(), v]).concat())
        .query(&mut conn)
        .unwrap();
    broken[3].1 = "not-an-ip".into();
    let _: String = redis::cmd("XADD")
        .arg(&pipeline.stream)
        .arg("*")
        .arg(broken.clone().map(|(n, v)| [n.to_owned(), v]).concat())
        .query(&mut conn)
        .unwrap();
    // A packed entry with two bad records among three good clicks: the good
    // ones are stored, each bad record is dead-lettered on its own.
    let mut clicks = Vec::new();
    for i in 0..3 {
        ClickEvent {
            event_id: rand::random(),
            code: "fine".into(),
            ts_ms: now_ms(),
            ip: std::net::Ipv4Addr::new(192, 0, 2, 10 + i).into(),
            user_agent: None,
            referer: None,
            accept_language: None,
        }
        .write_packed(&mut clicks);
        match i {
            0 => clicks.extend_from_slice(b"half\x1fa record\n"),
            1 => write_packed_record(&mut clicks, broken.iter().map(|(_, v)| v.as_bytes())),
            _ => {}
        }
    }
    let _: String = xadd_packed(&pipeline.stream, clicks)
        .query(&mut conn)
        .unwrap();
    let more = pipeline.produce("fine", 500).len() as u64 + 3;

    let sink = pipeline.start_sink("sink-d", &[]).await;
    pipeline
        .until_rows(good + more, Duration::from_secs(30))
        .await;
    let dead = format!("{}-dead", pipeline.stream);
    let entries: Vec<HashMap<String, String>> =
        eventually(Duration::from_secs(10), "five dead letters", || {
            let entries: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
                .arg(&dead)
                .arg("-")
                .arg("+")
                .query(&mut conn)
                .unwrap();
            let parsed: Vec<HashMap<String, String>> = entries
                .ids
                .into_iter()
                .map(|e| {
                    e.map
                        .into_iter()
                        .map(|(k, v)| (k, redis::from_redis_value::<String>(v).unwrap()))
                        .collect()
                })
                .collect();
            async move { (parsed.len() == 5).then_some(parsed) }
        })
        .await;
    assert!(
        entries
            .iter()
            .any(|e| e["error"].contains("field `id` is missing"))
    );
    assert_eq!(
        entries
            .iter()
            .filter(|e| e["error"].contains("field `ip` is not valid"))
            .count(),
        2,
        "a bad single entry and a bad packed record"
    );
    assert!(entries.iter().any(|e| {
        e["error"].contains("a packed record has 2 values for 7 columns")
            && e.get("record").map(String::as_str) == Some("half\x1fa record")
    }));
    let refused = entries
        .iter()
        .find(|e| {
            e.get("id") == Some(&refused_id) && e.get("ip").is_some_and(|ip| ip == "192.0.2.1")
        })
        .expect("the row ClickHouse refused is dead-lettered with its fields");
    assert!(
        refused["error"].contains("Code: 395"),
        "{}",
        refused["error"]
    );
    assert_eq!(pipeline.count("1"), good + more);
    eventually(Duration::from_secs(10), "nothing left pending", || {
        let pending = pipeline.pending();
        async move { (pending == 0).then_some(()) }
    })
    .await;
    assert_eq!(sink.metric("analytics_sink_dead_letters_total").await, 5.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_consumer_group_and_repeated_entries_count_once() {
    let pipeline = Pipeline::new(
        Arc::new(TestRedis::start()),
        Arc::new(external_clickhouse(&TestClickHouse::shared().url())),
    );
    pipeline.migrate();
    let _sink = pipeline.start_sink("sink-g", &[]).await;
    let first = pipeline.produce("regroup", 5_000).len() as u64;
    pipeline.until_rows(first, Duration::from_secs(30)).await;

    // The group disappears (an operator's XGROUP DESTROY, a failover to a
    // replica without it): the sink makes it again from the start of the
    // stream, and must not count the first 5,000 twice.
    let mut conn = pipeline.redis_conn();
    let _: i64 = redis::cmd("XGROUP")
        .arg("DESTROY")
        .arg(&pipeline.stream)
        .arg("analytics-sink")
        .query(&mut conn)
        .unwrap();
    // An entry written twice (same event id) is one click.
    let twice = ClickEvent {
        event_id: rand::random(),
        code: "regroup".into(),
        ts_ms: now_ms(),
        ip: "192.0.2.8".parse().unwrap(),
        user_agent: None,
        referer: None,
        accept_language: None,
    };
    for _ in 0..2 {
        let _: String = redis::cmd("XADD")
            .arg(&pipeline.stream)
            .arg("*")
            .arg(
                twice
                    .to_stream_fields()
                    .map(|(n, v)| [n.to_owned(), v])
                    .concat(),
            )
            .query(&mut conn)
            .unwrap();
    }
    let second = pipeline.produce("regroup", 5_000).len() as u64;
    let expected = first + 1 + second;
    pipeline.until_rows(expected, Duration::from_secs(30)).await;
    // Still exact a moment later, after every re-read entry was checked.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(pipeline.counts(), (expected, expected));
}

/// The consumer group's lag in stream entries, from `XINFO GROUPS`.
fn group_lag(conn: &mut redis::Connection, stream: &str) -> i64 {
    let groups: Vec<HashMap<String, redis::Value>> = redis::cmd("XINFO")
        .arg("GROUPS")
        .arg(stream)
        .query(conn)
        .unwrap();
    groups
        .iter()
        .find_map(|g| redis::from_redis_value_ref::<i64>(g.get("lag")?).ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lag_gauge_counts_the_clicks_of_packed_entries() {
    let pipeline = Pipeline::new(
        Arc::new(TestRedis::start()),
        Arc::new(external_clickhouse(&TestClickHouse::shared().url())),
    );
    let mut conn = pipeline.redis_conn();
    for entry in 0..300u32 {
        let mut clicks = Vec::new();
        for i in 0..100u32 {
            ClickEvent {
                event_id: rand::random(),
                code: "lagging".into(),
                ts_ms: now_ms(),
                ip: std::net::Ipv4Addr::from(0x0a00_0000 + entry * 100 + i).into(),
                user_agent: None,
                referer: None,
                accept_language: None,
            }
            .write_packed(&mut clicks);
        }
        let _: String = xadd_packed(&pipeline.stream, clicks)
            .query(&mut conn)
            .unwrap();
    }
    // ClickHouse unreachable: the sink reads a few batches and waits, so
    // the rest stays in the stream. Redis counts it in entries; the gauge
    // is in clicks (a hundred per entry here).
    let sink = pipeline.spawn_sink(
        "sink-l",
        &[
            ("CLICKHOUSE_URL", "http://127.0.0.1:1"),
            ("SINK_BATCH_SIZE", "1000"),
        ],
    );
    until_http_status(&sink.url("/healthz"), 200, Duration::from_secs(30)).await;
    let sink = &sink;
    eventually(Duration::from_secs(20), "the lag in clicks", || {
        let entries = group_lag(&mut conn, &pipeline.stream);
        async move {
            let gauge = sink.metric("analytics_sink_lag_events").await;
            // Some entries were read, the rest wait, each counted as 100.
            (entries > 0 && entries < 300 && gauge == entries as f64 * 100.0).then_some(())
        }
    })
    .await;
}
