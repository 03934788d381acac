//! The edge against a real Redis and a real control plane (with PostgreSQL
//! and keygen), all started by the test.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use control_plane::testing::InProcessControlPlane;
use reqwest::{Client, StatusCode, redirect};
use serde_json::{Value, json};
use shortener_common::testing::{TestPostgres, TestRedis, eventually, metric_series};

const ADMIN_KEY: &str = "edge-test-admin-key-0123456789";

struct Stack {
    redis: TestRedis,
    edge_port: u16,
    admin_port: u16,
    edge: Client,
    api: Client,
    /// The edge's cache, for a sentinel entry (`until_invalidations_heard`).
    cache: std::sync::Arc<edge_redirect::cache::Cache>,
    control_plane: InProcessControlPlane,
    /// Sends the edge the signal to drain and stop (as SIGTERM would).
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    edge_task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl Stack {
    async fn start() -> Self {
        Self::start_with(&[]).await
    }

    /// A stack whose edge gets `extra` environment on top of the defaults.
    async fn start_with(extra: &[(&str, &str)]) -> Self {
        Self::start_on(TestPostgres::shared().create_database(), extra).await
    }

    /// A stack whose control plane uses the database at `database_url`.
    async fn start_on(database_url: String, extra: &[(&str, &str)]) -> Self {
        let redis = TestRedis::start();
        let control_plane = InProcessControlPlane::start(
            database_url,
            redis.url(),
            ADMIN_KEY,
            &[("DATABASE_TIMEOUT_MS", "500")],
        )
        .await;

        let mut edge_env = vec![
            ("EDGE_HTTP_ADDR", "127.0.0.1:0".to_owned()),
            ("EDGE_ADMIN_ADDR", "127.0.0.1:0".to_owned()),
            ("REDIS_URL", redis.url()),
            ("CONTROL_PLANE_URL", control_plane.url().to_owned()),
            ("EDGE_HEADER_TIMEOUT_MS", "500".to_owned()),
            ("EDGE_NEGATIVE_TTL_MS", "60000".to_owned()),
        ];
        edge_env.extend(extra.iter().map(|(k, v)| (*k, (*v).to_owned())));
        let edge_config =
            edge_redirect::Config::from_env(shortener_common::Env::from_pairs(edge_env)).unwrap();
        let edge = edge_redirect::Application::build(edge_config)
            .await
            .unwrap();
        let (edge_port, admin_port) = (edge.http_port(), edge.admin_port());
        let cache = edge.cache();
        let (shutdown, stop) = tokio::sync::oneshot::channel::<()>();
        let edge_task = tokio::spawn(edge.run_until(async move {
            let _ = stop.await;
        }));

        let stack = Self {
            redis,
            control_plane,
            edge_port,
            admin_port,
            edge: Client::builder()
                .redirect(redirect::Policy::none())
                .build()
                .unwrap(),
            api: Client::new(),
            cache,
            shutdown: Some(shutdown),
            edge_task: Some(edge_task),
        };
        // The edge subscribes to invalidations shortly after start.
        let mut conn = stack.redis_conn();
        eventually(Duration::from_secs(10), "the edge to subscribe", || {
            let subscribers: Vec<(String, i64)> = redis::cmd("PUBSUB")
                .arg("NUMSUB")
                .arg(edge_redirect::invalidate::CHANNEL)
                .query(&mut conn)
                .unwrap();
            async move { (subscribers[0].1 >= 1).then_some(()) }
        })
        .await;
        stack
    }

    /// A plain TCP connection to the edge, for bytes an HTTP client would
    /// not send; reads give up after `read_timeout`.
    fn raw_connection(&self, read_timeout: Duration) -> TcpStream {
        let stream = TcpStream::connect(("127.0.0.1", self.edge_port)).unwrap();
        stream.set_read_timeout(Some(read_timeout)).unwrap();
        stream
    }

    fn redis_conn(&self) -> redis::Connection {
        redis::Client::open(self.redis.url())
            .unwrap()
            .get_connection()
            .unwrap()
    }

    /// How many GETs Redis has served, from its own statistics.
    fn redis_gets(&self) -> u64 {
        let info: String = redis::cmd("INFO")
            .arg("commandstats")
            .query(&mut self.redis_conn())
            .unwrap();
        info.lines()
            .find_map(|l| l.strip_prefix("cmdstat_get:calls="))
            .and_then(|rest| rest.split(',').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    }

    /// `POST /shorten` with the admin key, whatever the answer.
    async fn shorten(&self, body: &Value) -> reqwest::Response {
        self.api
            .post(format!("{}/shorten", self.control_plane.url()))
            .bearer_auth(ADMIN_KEY)
            .json(body)
            .send()
            .await
            .unwrap()
    }

    async fn create(&self, body: Value) -> String {
        let response = self.shorten(&body).await;
        assert_eq!(response.status(), 201);
        response.json::<Value>().await.unwrap()["code"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    async fn patch(&self, code: &str, body: Value) {
        let response = self
            .api
            .patch(format!("{}/links/{code}", self.control_plane.url()))
            .bearer_auth(ADMIN_KEY)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
    }

    async fn delete(&self, code: &str) {
        let response = self
            .api
            .delete(format!("{}/links/{code}", self.control_plane.url()))
            .bearer_auth(ADMIN_KEY)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 204);
    }

    async fn get(&self, path: &str) -> (StatusCode, Option<String>, String) {
        let response = self
            .edge
            .get(format!("http://127.0.0.1:{}{path}", self.edge_port))
            .send()
            .await
            .unwrap();
        let status = response.status();
        let location = response
            .headers()
            .get("location")
            .map(|v| v.to_str().unwrap().to_owned());
        (status, location, response.text().await.unwrap())
    }

    async fn until_mapping_in_redis(&self, code: &str) {
        let mut conn = self.redis_conn();
        eventually(Duration::from_secs(5), "the mapping in Redis", || {
            let exists: bool = redis::cmd("EXISTS")
                .arg(format!("link:{code}"))
                .query(&mut conn)
                .unwrap();
            async move { exists.then_some(()) }
        })
        .await;
    }

    /// Waits until the edge has handled every invalidation published so
    /// far. Messages on a channel reach the subscriber in order, so once a
    /// sentinel published now has dropped its cache entry, every earlier
    /// message has been handled too.
    async fn until_invalidations_heard(&self) {
        let sentinel = "invalidation-sentinel";
        self.cache
            .insert(sentinel, edge_redirect::cache::Target::Missing);
        let _: i64 = redis::cmd("PUBLISH")
            .arg(edge_redirect::invalidate::CHANNEL)
            .arg(sentinel)
            .query(&mut self.redis_conn())
            .unwrap();
        let cache = &self.cache;
        eventually(Duration::from_secs(5), "the sentinel invalidation", || {
            let heard = cache.get(sentinel).is_none();
            async move { heard.then_some(()) }
        })
        .await;
    }

    /// Waits until the edge answers `path` with `status`.
    async fn until_status(&self, path: &str, status: StatusCode, within: Duration) {
        eventually(within, &format!("{path} to answer {status}"), || {
            let request = self.get(path);
            async move { (request.await.0 == status).then_some(()) }
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirects_hits_misses_unknown_codes_and_head() {
    let stack = Stack::start().await;
    let code = stack
        .create(json!({"url": "https://example.com/landing?x=1"}))
        .await;
    let path = format!("/{code}");
    // The create's own invalidation must have been handled before the edge
    // caches the link, or it would (correctly) drop the fresh entry: seeing
    // the mapping in Redis is not enough, the edge hears of it a little later.
    stack.until_mapping_in_redis(&code).await;
    stack.until_invalidations_heard().await;
    let gets = stack.redis_gets();
    let (status, location, body) = stack.get(&path).await;
    assert_eq!(status, 302);
    assert_eq!(location.as_deref(), Some("https://example.com/landing?x=1"));
    assert!(!body.is_empty());
    assert_eq!(stack.redis_gets(), gets + 1, "a miss is one Redis GET");
    // Once cached, hits never touch Redis.
    let gets = stack.redis_gets();
    for _ in 0..10 {
        assert_eq!(stack.get(&path).await.0, 302);
    }
    assert_eq!(stack.redis_gets(), gets, "hits never touch Redis");

    // Query strings are ignored for the lookup.
    assert_eq!(stack.get(&format!("{path}?utm_source=x")).await.0, 302);

    let head = stack
        .edge
        .head(format!("http://127.0.0.1:{}{path}", stack.edge_port))
        .send()
        .await
        .unwrap();
    assert_eq!(head.status(), 302);
    assert_eq!(
        head.headers()["location"],
        "https://example.com/landing?x=1"
    );
    assert_eq!(head.text().await.unwrap(), "");

    let status301 = stack
        .create(json!({"url": "https://example.com/p", "redirect_status": 308}))
        .await;
    assert_eq!(stack.get(&format!("/{status301}")).await.0, 308);

    let (status, _, body) = stack.get("/NoSuchCode").await;
    assert_eq!(status, 404);
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["error"]["code"], "not_found");
    // Unknown codes are remembered: a scan cannot turn into a Redis flood.
    let gets = stack.redis_gets();
    for _ in 0..20 {
        assert_eq!(stack.get("/NoSuchCode").await.0, 404);
    }
    assert_eq!(stack.redis_gets(), gets);

    let post = stack
        .edge
        .post(format!("http://127.0.0.1:{}{path}", stack.edge_port))
        .send()
        .await
        .unwrap();
    assert_eq!(post.status(), 405);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_misses_for_one_code_make_one_redis_request() {
    let stack = Stack::start().await;
    let code = stack
        .create(json!({"url": "https://example.com/popular"}))
        .await;
    // Let the relay write Redis first, so every lookup is a Redis hit, and
    // the edge handle the create's invalidation, which would otherwise
    // drop the entry the first lookup makes and send later requests to
    // Redis again.
    stack.until_mapping_in_redis(&code).await;
    stack.until_invalidations_heard().await;
    let gets = stack.redis_gets();
    let requests: Vec<_> = (0..64)
        .map(|_| {
            tokio::spawn(
                stack
                    .edge
                    .get(format!("http://127.0.0.1:{}/{code}", stack.edge_port))
                    .send(),
            )
        })
        .collect();
    for request in requests {
        assert_eq!(request.await.unwrap().unwrap().status(), 302);
    }
    assert_eq!(stack.redis_gets(), gets + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_paths_are_refused_without_a_lookup() {
    let stack = Stack::start().await;
    let gets = stack.redis_gets();
    for path in [
        "/a/b",
        "/abc/",
        "/%41bc",
        "/a.b",
        "/a%00b",
        "/..%2f",
        "//abc",
        &format!("/{}", "x".repeat(65)),
    ] {
        let (status, _, _) = stack.get(path).await;
        assert_eq!(status, 404, "{path}");
    }
    // Raw bytes reqwest would refuse to send: NUL and non-UTF-8 in the path.
    for raw in [
        &b"GET /ab\0c HTTP/1.1\r\nHost: x\r\n\r\n"[..],
        b"GET /\xff\xfe HTTP/1.1\r\nHost: x\r\n\r\n",
    ] {
        let mut stream = stack.raw_connection(Duration::from_secs(2));
        stream.write_all(raw).unwrap();
        let mut answer = [0u8; 12];
        let n = stream.read(&mut answer).unwrap_or(0);
        let line = String::from_utf8_lossy(&answer[..n]).to_string();
        assert!(
            line.starts_with("HTTP/1.1 400") || line.starts_with("HTTP/1.1 404"),
            "{line:?}"
        );
    }
    assert_eq!(
        stack.redis_gets(),
        gets,
        "malformed paths must not reach Redis"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_reach_the_edge_within_a_second() {
    let stack = Stack::start().await;
    let code = stack.create(json!({"url": "https://example.com/v1"})).await;
    let path = format!("/{code}");
    assert_eq!(
        stack.get(&path).await.1.as_deref(),
        Some("https://example.com/v1")
    );

    let started = Instant::now();
    stack
        .patch(&code, json!({"url": "https://example.com/v2"}))
        .await;
    eventually(Duration::from_secs(1), "the new target", || {
        let request = stack.get(&path);
        async move { (request.await.1.as_deref() == Some("https://example.com/v2")).then_some(()) }
    })
    .await;
    assert!(started.elapsed() < Duration::from_secs(1));

    stack.patch(&code, json!({"disabled": true})).await;
    stack
        .until_status(&path, StatusCode::GONE, Duration::from_secs(1))
        .await;
    stack.patch(&code, json!({"disabled": false})).await;
    stack
        .until_status(&path, StatusCode::FOUND, Duration::from_secs(1))
        .await;

    stack.delete(&code).await;
    stack
        .until_status(&path, StatusCode::NOT_FOUND, Duration::from_secs(1))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_domain_added_to_the_blocklist_answers_410_within_a_second() {
    let dir = tempfile::tempdir().unwrap();
    let list = dir.path().join("blocklist.txt");
    std::fs::write(&list, "# nothing blocked yet\n").unwrap();
    let stack = Stack::start_with(&[
        ("BLOCKLIST_FILE", list.to_str().unwrap()),
        ("BLOCKLIST_RELOAD_MS", "100"),
    ])
    .await;
    // Made before the domain was listed (the control plane here has no list).
    let bad = format!(
        "/{}",
        stack
            .create(json!({"url": "https://www.phish.example/login"}))
            .await
    );
    let good = format!(
        "/{}",
        stack.create(json!({"url": "https://fine.example/"})).await
    );
    // Both redirect, and both are now in the edge's cache.
    assert_eq!(stack.get(&bad).await.0, StatusCode::FOUND);
    assert_eq!(stack.get(&good).await.0, StatusCode::FOUND);

    std::fs::write(&list, "phish.example\n").unwrap();
    let listed = Instant::now();
    stack
        .until_status(&bad, StatusCode::GONE, Duration::from_secs(5))
        .await;
    assert!(
        listed.elapsed() < Duration::from_secs(1),
        "{:?}",
        listed.elapsed()
    );
    let (status, location, body) = stack.get(&bad).await;
    assert_eq!(status, StatusCode::GONE);
    assert_eq!(location, None);
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["error"]["code"], "blocked");
    assert_eq!(
        stack.get(&good).await.1.as_deref(),
        Some("https://fine.example/")
    );
    // A link the edge has never seen is checked as it is looked up.
    let fresh = format!(
        "/{}",
        stack
            .create(json!({"url": "https://phish.example/other"}))
            .await
    );
    assert_eq!(stack.get(&fresh).await.0, StatusCode::GONE);

    // Off the list again: the links redirect again.
    std::fs::write(&list, "\n").unwrap();
    stack
        .until_status(&bad, StatusCode::FOUND, Duration::from_secs(5))
        .await;
    assert_eq!(stack.get(&fresh).await.0, StatusCode::FOUND);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_postgres_down_existing_links_redirect_and_every_click_ships() {
    let mut pg = TestPostgres::start();
    let stack = Stack::start_on(pg.create_database(), &[]).await;
    let cached = stack
        .create(json!({"url": "https://example.com/cached"}))
        .await;
    let in_redis = stack
        .create(json!({"url": "https://example.com/redis"}))
        .await;
    stack.until_mapping_in_redis(&in_redis).await;
    assert_eq!(stack.get(&format!("/{cached}")).await.0, StatusCode::FOUND);
    let mut conn = stack.redis_conn();
    until_stream_len(&mut conn, 1).await;

    pg.stop();
    // Creates fail fast; redirects of existing links go on, from the edge's
    // cache and from Redis, and each is one click event.
    let started = Instant::now();
    let response = stack
        .shorten(&json!({"url": "https://example.com/during"}))
        .await;
    assert_eq!(response.status(), 503);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    let mut redirects = 0;
    for _ in 0..50 {
        for (code, target) in [
            (&cached, "https://example.com/cached"),
            (&in_redis, "https://example.com/redis"),
        ] {
            let (status, location, _) = stack.get(&format!("/{code}")).await;
            assert_eq!(
                (status, location.as_deref()),
                (StatusCode::FOUND, Some(target))
            );
            redirects += 1;
        }
    }
    until_stream_len(&mut conn, 1 + redirects).await;

    // Back without restarting anything.
    pg.start_again();
    let after = json!({"url": "https://example.com/after"});
    eventually(Duration::from_secs(15), "creates to work again", || {
        let request = stack.shorten(&after);
        async move { (request.await.status() == 201).then_some(()) }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_link_answers_410() {
    let stack = Stack::start().await;
    let soon = (std::time::SystemTime::now() + Duration::from_secs(2))
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let expires = chrono_like_rfc3339(soon);
    let code = stack
        .create(json!({"url": "https://example.com/brief", "expires_at": expires}))
        .await;
    let path = format!("/{code}");
    assert_eq!(stack.get(&path).await.0, 302);
    stack
        .until_status(&path, StatusCode::GONE, Duration::from_secs(5))
        .await;
    let (_, _, body) = stack.get(&path).await;
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["error"]["code"], "gone");
}

fn chrono_like_rfc3339(unix: u64) -> String {
    chrono::DateTime::from_timestamp(unix as i64, 0)
        .unwrap()
        .to_rfc3339()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restarted_empty_never_turns_live_links_into_404s() {
    let mut stack = Stack::start().await;
    let seen = stack
        .create(json!({"url": "https://example.com/seen"}))
        .await;
    let unseen = stack
        .create(json!({"url": "https://example.com/unseen"}))
        .await;
    assert_eq!(stack.get(&format!("/{seen}")).await.0, 302);

    stack.redis.stop();
    stack.redis.start_empty();
    let mut conn = stack.redis_conn();
    let keys: Vec<String> = redis::cmd("KEYS").arg("link:*").query(&mut conn).unwrap();
    assert!(keys.is_empty());
    for code in [&seen, &unseen] {
        let (status, location, _) = stack.get(&format!("/{code}")).await;
        assert_eq!(status, 302, "{code}");
        assert!(location.unwrap().starts_with("https://example.com/"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_down_cached_links_redirect_and_readiness_says_degraded() {
    let mut stack = Stack::start().await;
    let cached = stack
        .create(json!({"url": "https://example.com/cached"}))
        .await;
    let uncached = stack
        .create(json!({"url": "https://example.com/uncached"}))
        .await;
    // Both creates' invalidations handled, so none drops the entry cached
    // next: the 20 redirects below must be cache hits.
    stack.until_mapping_in_redis(&cached).await;
    stack.until_mapping_in_redis(&uncached).await;
    stack.until_invalidations_heard().await;
    assert_eq!(stack.get(&format!("/{cached}")).await.0, 302);
    let ready = format!("http://127.0.0.1:{}/readyz", stack.admin_port);
    assert_eq!(reqwest::get(&ready).await.unwrap().status(), 200);

    stack.redis.stop();
    for _ in 0..20 {
        assert_eq!(stack.get(&format!("/{cached}")).await.0, 302);
    }
    // A miss falls back to the control plane (PostgreSQL is the truth).
    assert_eq!(stack.get(&format!("/{uncached}")).await.0, 302);
    let response = reqwest::get(&ready).await.unwrap();
    assert_eq!(response.status(), 503);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "degraded");
    let metrics = reqwest::get(format!("http://127.0.0.1:{}/metrics", stack.admin_port))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("edge_control_plane_fallbacks_total"),
        "{metrics}"
    );
    // Responses are counted by status (RED metrics for the hot path), and
    // hits too. They are counted per thread and summed at each read of
    // `/metrics`; the recorder is shared by every edge this test process
    // runs, hence "at least".
    let counted = |series: &str| metric_series(&metrics, series).unwrap_or(0.0);
    assert!(
        counted(r#"edge_http_responses_total{status="302"}"#) >= 21.0,
        "{metrics}"
    );
    assert!(counted("edge_cache_hits_total") >= 20.0, "{metrics}");
    assert!(counted("edge_click_events_total") >= 21.0, "{metrics}");
    assert!(
        metrics.contains("edge_http_request_duration_seconds"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_sends_headers_too_slowly_is_cut_off() {
    let stack = Stack::start().await;
    let code = stack
        .create(json!({"url": "https://example.com/after"}))
        .await;
    let mut slow = stack.raw_connection(Duration::from_secs(5));
    slow.write_all(b"GET /abc HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        .unwrap();
    let started = Instant::now();
    let mut buf = [0u8; 256];
    // The server closes the connection (possibly with a 408) after the
    // 500 ms header timeout; it must not wait for us.
    let _ = slow.read(&mut buf);
    let n = slow.read(&mut buf).unwrap_or(0);
    assert_eq!(n, 0, "connection still open");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(stack.get(&format!("/{code}")).await.0, 302);
}

/// The header-read timeout is a watchdog per connection: a keep-alive
/// connection that keeps asking is never cut, however long it lives; one
/// that goes quiet is closed after the timeout (500 ms here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_keep_alive_connection_stays_and_an_idle_one_is_closed() {
    let stack = Stack::start().await;
    let code = stack
        .create(json!({"url": "https://example.com/kept"}))
        .await;
    let mut conn = stack.raw_connection(Duration::from_secs(5));
    let request = format!("GET /{code} HTTP/1.1\r\nHost: x\r\n\r\n");
    let mut buf = [0u8; 1024];
    let started = Instant::now();
    let mut answered = 0;
    let mut last_answer = Instant::now();
    // 2.5 s of requests every 200 ms: five timeouts' worth.
    while started.elapsed() < Duration::from_millis(2500) {
        conn.write_all(request.as_bytes()).unwrap();
        let n = conn.read(&mut buf).unwrap();
        let head = String::from_utf8_lossy(&buf[..n]);
        assert!(head.starts_with("HTTP/1.1 302"), "{head}");
        assert!(
            head.contains("location: https://example.com/kept"),
            "{head}"
        );
        answered += 1;
        last_answer = Instant::now();
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(answered >= 10, "{answered}");
    let n = conn.read(&mut buf).unwrap_or(0);
    assert_eq!(n, 0, "idle connection still open");
    let waited = last_answer.elapsed();
    assert!(
        waited >= Duration::from_millis(450) && waited < Duration::from_secs(2),
        "closed after {waited:?}"
    );
}

/// The click events in the stream, oldest first.
fn stream_events(conn: &mut redis::Connection) -> Vec<shortener_common::ClickEvent> {
    shortener_common::testing::stream_clicks(conn, "clicks")
}

/// Waits until the stream holds `len` clicks (and never more).
async fn until_stream_len(conn: &mut redis::Connection, len: usize) {
    eventually(
        Duration::from_secs(10),
        &format!("{len} click events"),
        || {
            let n = stream_events(conn).len();
            assert!(n <= len, "{n} click events, expected {len}");
            async move { (n == len).then_some(()) }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_redirect_is_one_click_event_even_across_a_redis_outage() {
    let mut stack = Stack::start().await;
    let code = stack
        .create(json!({"url": "https://example.com/counted"}))
        .await;
    let url = format!("http://127.0.0.1:{}/{code}", stack.edge_port);
    let visit = || {
        stack
            .edge
            .get(&url)
            .header("x-forwarded-for", "203.0.113.9")
            .header("user-agent", "Mozilla/5.0 test")
            .header("referer", "https://news.example.com/a")
            .header("accept-language", "en-GB")
            .send()
    };
    for _ in 0..5 {
        assert_eq!(visit().await.unwrap().status(), 302);
    }
    // A HEAD is a redirect but not a click.
    assert_eq!(stack.edge.head(&url).send().await.unwrap().status(), 302);
    let mut conn = stack.redis_conn();
    until_stream_len(&mut conn, 5).await;
    let events = stream_events(&mut conn);
    let event = &events[0];
    assert_eq!(event.code, code);
    assert_eq!(
        event.ip.to_string(),
        "203.0.113.9",
        "X-Forwarded-For from a trusted proxy"
    );
    assert_eq!(event.user_agent.as_deref(), Some("Mozilla/5.0 test"));
    assert_eq!(event.referer.as_deref(), Some("https://news.example.com/a"));
    assert_eq!(event.accept_language.as_deref(), Some("en-GB"));
    // The five clicks are distinct events.
    let ids: std::collections::HashSet<u128> = events.iter().map(|e| e.event_id).collect();
    assert_eq!(ids.len(), 5);

    // Redis goes away: redirects go on, clicks wait in the edge and arrive
    // once it is back, each exactly once.
    stack.redis.stop();
    for _ in 0..20 {
        assert_eq!(visit().await.unwrap().status(), 302);
    }
    stack.redis.start_again();
    let mut conn = stack.redis_conn();
    until_stream_len(&mut conn, 25).await;
    let ids: std::collections::HashSet<u128> = stream_events(&mut conn)
        .into_iter()
        .map(|e| e.event_id)
        .collect();
    assert_eq!(ids.len(), 25);
}

// One worker thread: clicks gather per thread, so "oldest" is exact within
// a thread's clicks (across threads, bunch by bunch).
#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn a_full_click_queue_drops_the_oldest_clicks() {
    let mut stack = Stack::start_with(&[("EDGE_CLICK_QUEUE", "10")]).await;
    let code = stack
        .create(json!({"url": "https://example.com/queue"}))
        .await;
    assert_eq!(stack.get(&format!("/{code}")).await.0, 302);
    let mut conn = stack.redis_conn();
    until_stream_len(&mut conn, 1).await;

    stack.redis.stop();
    let url = format!("http://127.0.0.1:{}/{code}", stack.edge_port);
    for i in 0..30 {
        let response = stack
            .edge
            .get(&url)
            .header("referer", format!("https://r{i}.example/"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 302);
    }
    stack.redis.start_again();
    let mut conn = stack.redis_conn();
    // The first click was already in the batch being retried when the
    // queue overflowed; of the rest, the ten newest are kept.
    until_stream_len(&mut conn, 12).await;
    let refs: Vec<String> = stream_events(&mut conn)
        .into_iter()
        .skip(1)
        .map(|e| e.referer.unwrap_or_default())
        .collect();
    let expected: Vec<String> = std::iter::once(0)
        .chain(20..30)
        .map(|i| format!("https://r{i}.example/"))
        .collect();
    assert_eq!(refs, expected);
}

/// Asked to stop, the edge stops accepting, answers the request it is in
/// the middle of, closes idle connections at once, and exits as soon as
/// they are done rather than at the end of the drain period.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_answers_the_request_in_flight_and_closes_idle_connections() {
    let mut stack = Stack::start_with(&[
        ("SHUTDOWN_DRAIN_MS", "20000"),
        ("EDGE_HEADER_TIMEOUT_MS", "20000"),
    ])
    .await;
    let code = stack
        .create(json!({"url": "https://example.com/in-flight"}))
        .await;
    let mut idle = stack.raw_connection(Duration::from_secs(5));
    // Redis holds every command for 1.5 s, so the first request for the
    // code (a miss) is still waiting on its lookup when the signal comes;
    // after the 1 s Redis timeout the control plane answers it.
    let mut conn = stack.redis_conn();
    let _: () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(1500)
        .arg("ALL")
        .query(&mut conn)
        .unwrap();
    let in_flight = {
        let client = stack.edge.clone();
        let url = format!("http://127.0.0.1:{}/{code}", stack.edge_port);
        tokio::spawn(async move { client.get(url).send().await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!in_flight.is_finished(), "the lookup did not wait on Redis");
    let signalled = Instant::now();
    let _ = stack.shutdown.take().unwrap().send(());

    let closed = tokio::task::spawn_blocking(move || {
        let mut byte = [0u8; 1];
        (idle.read(&mut byte), Instant::now())
    });
    let response = in_flight
        .await
        .unwrap()
        .expect("the request in flight is answered");
    assert_eq!(response.status(), 302);
    assert_eq!(
        response.headers()["location"],
        "https://example.com/in-flight"
    );
    let (read, at) = closed.await.unwrap();
    assert_eq!(read.unwrap(), 0, "the idle connection is closed");
    assert!(
        at - signalled < Duration::from_millis(1000),
        "the idle connection was closed {:?} after the signal",
        at - signalled
    );
    assert!(
        TcpStream::connect(("127.0.0.1", stack.edge_port)).is_err(),
        "the edge still accepts connections"
    );
    tokio::time::timeout(Duration::from_secs(10), stack.edge_task.take().unwrap())
        .await
        .expect("the edge exits once its connections are done, not after the drain period")
        .unwrap()
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ships_the_clicks_still_held() {
    let mut stack = Stack::start_with(&[("SHUTDOWN_DRAIN_MS", "10000")]).await;
    let code = stack
        .create(json!({"url": "https://example.com/flush"}))
        .await;
    assert_eq!(stack.get(&format!("/{code}")).await.0, 302);
    stack.redis.stop();
    for _ in 0..15 {
        assert_eq!(stack.get(&format!("/{code}")).await.0, 302);
    }
    // Asked to stop while Redis is away, the edge keeps trying to ship
    // until the drain period ends; Redis is back well before that.
    let _ = stack.shutdown.take().unwrap().send(());
    tokio::time::sleep(Duration::from_millis(500)).await;
    let edge_task = stack.edge_task.take().unwrap();
    assert!(
        !edge_task.is_finished(),
        "the edge exited with clicks unshipped"
    );
    stack.redis.start_again();
    tokio::time::timeout(Duration::from_secs(10), edge_task)
        .await
        .expect("the edge stops once its clicks are shipped")
        .unwrap()
        .unwrap();
    let mut conn = stack.redis_conn();
    assert_eq!(stream_events(&mut conn).len(), 16);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clicks_a_stopping_edge_could_not_ship_stay_in_its_journal_for_the_next() {
    let journal = tempfile::tempdir().unwrap();
    let dir = journal.path().to_str().unwrap().to_owned();
    let mut stack = Stack::start_with(&[
        ("SHUTDOWN_DRAIN_MS", "300"),
        ("EDGE_CLICK_JOURNAL_DIR", &dir),
    ])
    .await;
    let code = stack
        .create(json!({"url": "https://example.com/journal"}))
        .await;
    assert_eq!(stack.get(&format!("/{code}")).await.0, 302);
    let mut conn = stack.redis_conn();
    until_stream_len(&mut conn, 1).await;

    // Redis goes away; the edge keeps redirecting and journals the clicks.
    stack.redis.stop();
    for _ in 0..15 {
        assert_eq!(stack.get(&format!("/{code}")).await.0, 302);
    }
    // Stopped while Redis is still away, it gives up after the drain period
    // and leaves the clicks in the journal.
    let _ = stack.shutdown.take().unwrap().send(());
    tokio::time::timeout(Duration::from_secs(10), stack.edge_task.take().unwrap())
        .await
        .expect("the edge stops after its drain period")
        .unwrap()
        .unwrap();
    let segments = || -> Vec<std::path::PathBuf> {
        std::fs::read_dir(journal.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "clicks"))
            .collect()
    };
    let left = segments();
    assert_eq!(left.len(), 1, "the journal keeps what was not shipped");

    // The next edge on the directory ships them, each exactly once.
    stack.redis.start_again();
    let config = edge_redirect::Config::from_env(shortener_common::Env::from_pairs([
        ("EDGE_HTTP_ADDR", "127.0.0.1:0".to_owned()),
        ("EDGE_ADMIN_ADDR", "127.0.0.1:0".to_owned()),
        ("REDIS_URL", stack.redis.url()),
        ("CONTROL_PLANE_URL", stack.control_plane.url().to_owned()),
        ("EDGE_CLICK_JOURNAL_DIR", dir.clone()),
    ]))
    .unwrap();
    let next = edge_redirect::Application::build(config).await.unwrap();
    tokio::spawn(next.run_until(std::future::pending()));
    let mut conn = stack.redis_conn();
    until_stream_len(&mut conn, 16).await;
    let ids: std::collections::HashSet<u128> = stream_events(&mut conn)
        .into_iter()
        .map(|e| e.event_id)
        .collect();
    assert_eq!(ids.len(), 16);
    // The adopted segment is deleted once shipped; the new edge has its own.
    eventually(Duration::from_secs(5), "the old segment deleted", || {
        let gone = !left[0].exists();
        async move { gone.then_some(()) }
    })
    .await;
}

/// Sends raw bytes on a fresh connection and returns what came back before
/// the server answered and closed, or a short while passed.
fn raw_exchange(port: u16, request: &[u8]) -> Vec<u8> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_millis(1500)))
        .unwrap();
    // The server may close while we still write: that is an answer too.
    let _ = stream.write_all(request);
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n) = stream.read(&mut buf) {
        if n == 0 {
            break;
        }
        answer.extend_from_slice(&buf[..n]);
    }
    answer
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_requests_are_refused_and_the_edge_keeps_serving() {
    let stack = Stack::start().await;
    let code = stack
        .create(json!({"url": "https://example.com/still-here"}))
        .await;
    let port = stack.edge_port;
    let huge_header = format!(
        "GET /{code} HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(64 * 1024)
    );
    let long_path = format!("GET /{} HTTP/1.1\r\nHost: x\r\n\r\n", "a".repeat(100_000));
    let smuggle = format!(
        "POST /{code} HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
    );
    let double_length = format!(
        "GET /{code} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nContent-Length: 7\r\n\r\n"
    );
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("huge header", huge_header.into_bytes()),
        ("very long path", long_path.into_bytes()),
        (
            "invalid UTF-8 path",
            b"GET /\xff\xfe\xfd HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        ),
        (
            "NUL in path",
            b"GET /ab\x00c HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        ),
        (
            "garbage",
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 not http\r\n\r\n".to_vec(),
        ),
        ("CL and TE together", smuggle.into_bytes()),
        ("two Content-Lengths", double_length.into_bytes()),
        (
            "header without colon",
            b"GET / HTTP/1.1\r\nHost x\r\n\r\n".to_vec(),
        ),
    ];
    for (name, request) in cases {
        let answer = raw_exchange(port, &request);
        let text = String::from_utf8_lossy(&answer);
        // Refused (4xx) or the connection closed: never a redirect, and
        // never a second, smuggled response.
        assert!(
            answer.is_empty() || text.starts_with("HTTP/1.1 4"),
            "{name}: {text:.200}"
        );
        assert!(
            text.matches("HTTP/1.1").count() <= 1,
            "{name}: more than one response: {text:.400}"
        );
        // And the next good request is answered correctly.
        let (status, location, _) = stack.get(&format!("/{code}")).await;
        assert_eq!(status, 302, "after {name}");
        assert_eq!(location.as_deref(), Some("https://example.com/still-here"));
    }
}
