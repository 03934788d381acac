//! The edge against a real Redis and a real control plane (with PostgreSQL
//! and keygen), all started by the test.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use keygen::testing::InProcessKeygen;
use reqwest::{Client, StatusCode, redirect};
use serde_json::{Value, json};
use shortener_common::testing::{
    TestPostgres, TestRedis, eventually, free_port, until_http_status,
};

const ADMIN_KEY: &str = "edge-test-admin-key-0123456789";

struct Stack {
    redis: TestRedis,
    control_plane: String,
    edge_port: u16,
    admin_port: u16,
    edge: Client,
    api: Client,
    _keygen: InProcessKeygen,
}

impl Stack {
    async fn start() -> Self {
        let redis = TestRedis::start();
        let keygen = InProcessKeygen::start().await;

        let cp_port = free_port();
        let cp_config = control_plane::Config::from_env(shortener_common::Env::from_pairs([
            ("CONTROL_PLANE_ADDR", format!("127.0.0.1:{cp_port}")),
            ("DATABASE_URL", TestPostgres::shared().create_database()),
            ("REDIS_URL", redis.url()),
            ("KEYGEN_GRPC_URL", keygen.grpc_url()),
            ("ADMIN_API_KEY", ADMIN_KEY.into()),
            ("RUN_MIGRATIONS", "true".into()),
        ]))
        .unwrap();
        let rocket = control_plane::build(&cp_config).unwrap();
        tokio::spawn(async move {
            let _ = rocket.launch().await;
        });
        let control_plane = format!("http://127.0.0.1:{cp_port}");

        let edge_config = edge_redirect::Config::from_env(shortener_common::Env::from_pairs([
            ("EDGE_HTTP_ADDR", "127.0.0.1:0".to_owned()),
            ("EDGE_ADMIN_ADDR", "127.0.0.1:0".to_owned()),
            ("REDIS_URL", redis.url()),
            ("CONTROL_PLANE_URL", control_plane.clone()),
            ("EDGE_HEADER_TIMEOUT_MS", "500".to_owned()),
            ("EDGE_NEGATIVE_TTL_MS", "60000".to_owned()),
        ]))
        .unwrap();
        let edge = edge_redirect::Application::build(edge_config)
            .await
            .unwrap();
        let (edge_port, admin_port) = (edge.http_port(), edge.admin_port());
        tokio::spawn(edge.run_until(std::future::pending()));

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
            _keygen: keygen,
        };
        until_http_status(
            &format!("{}/healthz", stack.control_plane),
            200,
            Duration::from_secs(30),
        )
        .await;
        // The edge subscribes to invalidations shortly after start.
        let mut conn = stack.redis_conn();
        eventually(Duration::from_secs(10), "the edge to subscribe", || {
            let subscribers: Vec<(String, i64)> = redis::cmd("PUBSUB")
                .arg("NUMSUB")
                .arg("link-invalidations")
                .query(&mut conn)
                .unwrap();
            async move { (subscribers[0].1 >= 1).then_some(()) }
        })
        .await;
        stack
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

    async fn create(&self, body: Value) -> String {
        let response = self
            .api
            .post(format!("{}/shorten", self.control_plane))
            .bearer_auth(ADMIN_KEY)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 201);
        response.json::<Value>().await.unwrap()["code"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    async fn patch(&self, code: &str, body: Value) {
        let response = self
            .api
            .patch(format!("{}/links/{code}", self.control_plane))
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
            .delete(format!("{}/links/{code}", self.control_plane))
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
    // The create's own invalidation must have gone out before the edge
    // caches the link, or it would (correctly) drop the fresh entry.
    stack.until_mapping_in_redis(&code).await;
    let gets = stack.redis_gets();
    let (status, location, body) = stack.get(&path).await;
    assert_eq!(status, 302);
    assert_eq!(location.as_deref(), Some("https://example.com/landing?x=1"));
    assert!(!body.is_empty());
    assert_eq!(stack.redis_gets(), gets + 1, "a miss is one Redis GET");
    // Once cached (a late invalidation may cost one more lookup), hits never
    // touch Redis.
    let (stack_ref, path_ref) = (&stack, &path);
    eventually(
        Duration::from_secs(5),
        "the link to stay cached",
        || async move {
            let before = stack_ref.redis_gets();
            assert_eq!(stack_ref.get(path_ref).await.0, 302);
            (stack_ref.redis_gets() == before).then_some(())
        },
    )
    .await;
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
    // Let the relay write Redis first, so every lookup is a Redis hit.
    stack.until_mapping_in_redis(&code).await;
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
        let mut stream = TcpStream::connect(("127.0.0.1", stack.edge_port)).unwrap();
        stream.write_all(raw).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
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
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_sends_headers_too_slowly_is_cut_off() {
    let stack = Stack::start().await;
    let code = stack
        .create(json!({"url": "https://example.com/after"}))
        .await;
    let mut slow = TcpStream::connect(("127.0.0.1", stack.edge_port)).unwrap();
    slow.write_all(b"GET /abc HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        .unwrap();
    slow.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
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
