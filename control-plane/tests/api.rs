//! The control plane as a real process against real PostgreSQL, Redis and an
//! in-process keygen; each test has its own database and its own Redis.

use std::collections::{BTreeMap, HashSet};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use keygen::testing::InProcessKeygen;
use reqwest::{Client, Method, StatusCode};
use serde_json::{Value, json};
use shortener_common::testing::{
    ManagedProcess, TestPostgres, TestRedis, eventually, free_port, until_http_status,
};

const ADMIN_KEY: &str = "test-admin-key-0123456789abcdef";
const PUBLIC: &str = "http://sho.rt.test";

struct TestApp {
    _process: ManagedProcess,
    port: u16,
    database_url: String,
    redis: TestRedis,
    keygen: InProcessKeygen,
    client: Client,
    env: Vec<(String, String)>,
}

impl TestApp {
    async fn spawn() -> Self {
        Self::spawn_with(&TestPostgres::shared().create_database(), &[]).await
    }

    async fn spawn_with(database_url: &str, extra: &[(&str, &str)]) -> Self {
        let redis = TestRedis::start();
        let keygen = InProcessKeygen::start().await;
        let port = free_port();
        let mut env: Vec<(String, String)> = vec![
            ("CONTROL_PLANE_ADDR".into(), format!("127.0.0.1:{port}")),
            ("DATABASE_URL".into(), database_url.to_owned()),
            ("REDIS_URL".into(), redis.url()),
            ("KEYGEN_GRPC_URL".into(), keygen.grpc_url()),
            ("PUBLIC_BASE_URL".into(), PUBLIC.into()),
            ("ADMIN_API_KEY".into(), ADMIN_KEY.into()),
            ("RUN_MIGRATIONS".into(), "true".into()),
            ("DATABASE_TIMEOUT_MS".into(), "500".into()),
            ("RUST_LOG".into(), "warn".into()),
        ];
        env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let process = Self::start_process(&env);
        let app = Self {
            _process: process,
            port,
            database_url: database_url.to_owned(),
            redis,
            keygen,
            client: Client::new(),
            env,
        };
        app.wait_healthy().await;
        app
    }

    fn start_process(env: &[(String, String)]) -> ManagedProcess {
        let mut command = Command::new(env!("CARGO_BIN_EXE_control-plane"));
        command
            .env_clear()
            .envs(env.iter().cloned())
            .stdout(Stdio::null());
        ManagedProcess::spawn("control-plane", command, 15)
    }

    async fn wait_healthy(&self) {
        until_http_status(&self.url("/healthz"), 200, Duration::from_secs(30)).await;
    }

    /// `n` creates at once; each must succeed.
    async fn create_concurrently(&self, n: usize, tag: &str) {
        let creates: Vec<_> = (0..n)
            .map(|i| {
                tokio::spawn(
                    self.client
                        .post(self.url("/shorten"))
                        .bearer_auth(ADMIN_KEY)
                        .json(&json!({"url": format!("https://example.com/{tag}/{i}")}))
                        .send(),
                )
            })
            .collect();
        for create in creates {
            assert_eq!(create.await.unwrap().unwrap().status(), 201);
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
        key: Option<&str>,
    ) -> (StatusCode, Value) {
        let mut request = self.client.request(method, self.url(path));
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap();
        let status = response.status();
        let text = response.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    async fn shorten(&self, body: Value) -> (StatusCode, Value) {
        self.call(Method::POST, "/shorten", Some(body), Some(ADMIN_KEY))
            .await
    }

    async fn all_links(&self) -> Vec<Value> {
        let mut links = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let path = match &cursor {
                Some(c) => format!("/links?limit=100&cursor={c}"),
                None => "/links?limit=100".to_owned(),
            };
            let (status, page) = self.call(Method::GET, &path, None, Some(ADMIN_KEY)).await;
            assert_eq!(status, 200, "{page}");
            links.extend(page["links"].as_array().unwrap().iter().cloned());
            match page["next_cursor"].as_str() {
                Some(c) => cursor = Some(c.to_owned()),
                None => return links,
            }
        }
    }

    fn redis(&self) -> redis::Connection {
        redis::Client::open(self.redis.url())
            .unwrap()
            .get_connection()
            .unwrap()
    }

    /// Every `link:*` key in Redis with its value.
    fn redis_links(&self) -> BTreeMap<String, Value> {
        let mut conn = self.redis();
        let keys: Vec<String> = redis::cmd("KEYS").arg("link:*").query(&mut conn).unwrap();
        keys.into_iter()
            .map(|k| {
                let v: String = redis::cmd("GET").arg(&k).query(&mut conn).unwrap();
                (
                    k.trim_start_matches("link:").to_owned(),
                    serde_json::from_str(&v).unwrap(),
                )
            })
            .collect()
    }

    /// A new API key from the CLI (`control-plane api-key create`).
    fn create_api_key(&self, name: &str) -> String {
        let output = Command::new(env!("CARGO_BIN_EXE_control-plane"))
            .args(["api-key", "create", "--name", name])
            .env_clear()
            .envs(self.env.iter().cloned())
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap().trim().to_owned()
    }

    /// The served OpenAPI document.
    async fn openapi(&self) -> Value {
        reqwest::get(self.url("/openapi.json"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    fn sql(&self, sql: &str) -> String {
        TestPostgres::shared().psql_on(&self.database_url, sql)
    }
}

fn assert_error(status: StatusCode, body: &Value, expected: StatusCode) {
    assert_eq!(status, expected, "{body}");
    assert!(body["error"]["code"].is_string(), "no error code in {body}");
    assert!(
        body["error"]["message"].is_string(),
        "no error message in {body}"
    );
}

#[tokio::test]
async fn shorten_returns_the_link_and_stores_it() {
    let app = TestApp::spawn().await;
    let response = app
        .client
        .post(app.url("/shorten"))
        .bearer_auth(ADMIN_KEY)
        .json(&json!({"url": "https://example.com/some/page?q=1"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    let location = response.headers()["location"].to_str().unwrap().to_owned();
    let body: Value = response.json().await.unwrap();
    let code = body["code"].as_str().unwrap();
    assert!((1..=8).contains(&code.len()), "{code}");
    assert_eq!(body["short_url"], format!("{PUBLIC}/{code}"));
    assert_eq!(location, format!("{PUBLIC}/{code}"));
    assert_eq!(body["url"], "https://example.com/some/page?q=1");
    assert_eq!(body["redirect_status"], 302);
    assert_eq!(body["expires_at"], Value::Null);
    assert!(body["created_at"].as_str().unwrap().ends_with('Z'));

    let (status, read) = app
        .call(
            Method::GET,
            &format!("/links/{code}"),
            None,
            Some(ADMIN_KEY),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(read["url"], body["url"]);

    let (status, aliased) = app
        .shorten(
            json!({"url": "http://bücher.example/straße", "alias": "My_Link-1",
                        "expires_at": "2999-01-01T00:00:00+01:00", "redirect_status": 301}),
        )
        .await;
    assert_eq!(status, 201, "{aliased}");
    assert_eq!(aliased["code"], "My_Link-1");
    assert_eq!(aliased["url"], "http://xn--bcher-kva.example/stra%C3%9Fe");
    assert_eq!(aliased["expires_at"], "2998-12-31T23:00:00.000Z");
    assert_eq!(aliased["redirect_status"], 301);
    // Aliases are case-sensitive, as codes are.
    let (status, other_case) = app
        .shorten(json!({"url": "https://example.org", "alias": "my_link-1"}))
        .await;
    assert_eq!(status, 201, "{other_case}");
    let (status, taken) = app
        .shorten(json!({"url": "https://example.org", "alias": "My_Link-1"}))
        .await;
    assert_error(status, &taken, StatusCode::CONFLICT);
    assert_eq!(app.sql("SELECT count(*) FROM links"), "3");
}

#[tokio::test]
async fn bad_input_is_refused_with_a_clear_error_and_stores_nothing() {
    let app = TestApp::spawn().await;
    let long_url = format!("https://example.com/{}", "x".repeat(8200));
    let cases: Vec<(Value, &str)> = vec![
        (json!({}), "missing url"),
        (
            json!({"url": "https://example.com", "colour": "red"}),
            "unknown field",
        ),
        (json!({"url": 42}), "url not a string"),
        (json!({"url": "not a url"}), "unparsable url"),
        (json!({"url": "javascript:alert(1)"}), "javascript scheme"),
        (json!({"url": "data:text/html,<b>hi</b>"}), "data scheme"),
        (json!({"url": "file:///etc/passwd"}), "file scheme"),
        (json!({"url": "ftp://example.com/x"}), "ftp scheme"),
        (
            json!({"url": "https://user:secret@example.com/"}),
            "credentials",
        ),
        (json!({"url": long_url}), "too long"),
        (json!({"url": "https://sho.rt.test/abc"}), "own host"),
        (
            json!({"url": "https://example.com", "alias": "ab"}),
            "alias too short",
        ),
        (
            json!({"url": "https://example.com", "alias": "has space"}),
            "alias characters",
        ),
        (
            json!({"url": "https://example.com", "alias": "metrics"}),
            "reserved alias",
        ),
        (
            json!({"url": "https://example.com", "alias": "Admin"}),
            "reserved alias, other case",
        ),
        (
            json!({"url": "https://example.com", "expires_at": "2001-01-01T00:00:00Z"}),
            "past expiry",
        ),
        (
            json!({"url": "https://example.com", "expires_at": "soon"}),
            "bad expiry",
        ),
        (
            json!({"url": "https://example.com", "redirect_status": 200}),
            "bad status",
        ),
    ];
    for (body, why) in cases {
        let (status, answer) = app.shorten(body).await;
        assert_eq!(status, 400, "{why}: {answer}");
        assert!(answer["error"]["code"].is_string(), "{why}: {answer}");
    }
    let malformed = app
        .client
        .post(app.url("/shorten"))
        .bearer_auth(ADMIN_KEY)
        .header("content-type", "application/json")
        .body("{\"url\": ")
        .send()
        .await
        .unwrap();
    assert_eq!(malformed.status(), 400);
    let body: Value = malformed.json().await.unwrap();
    assert_eq!(body["error"]["code"], "invalid_json");

    let huge = json!({"url": "https://example.com", "alias": "x".repeat(70 * 1024)});
    let (status, body) = app.shorten(huge).await;
    assert_error(status, &body, StatusCode::PAYLOAD_TOO_LARGE);

    assert_eq!(app.sql("SELECT count(*) FROM links"), "0");
    assert_eq!(app.sql("SELECT count(*) FROM link_outbox"), "0");
}

/// Every operation of the OpenAPI document that does not opt out of the
/// global `bearer` requirement, with its path parameters filled in.
fn secured_operations(doc: &Value, code: &str) -> Vec<(Method, String, bool)> {
    let mut operations = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, operation) in item.as_object().unwrap() {
            // Path items also hold `parameters`, `summary` and the like.
            let method = match method.as_str() {
                "get" => Method::GET,
                "post" => Method::POST,
                "put" => Method::PUT,
                "patch" => Method::PATCH,
                "delete" => Method::DELETE,
                _ => continue,
            };
            if operation.get("security") == Some(&json!([])) {
                continue;
            }
            let has_body = operation.get("requestBody").is_some();
            operations.push((method, path.replace("{code}", code), has_body));
        }
    }
    operations
}

#[tokio::test]
async fn every_admin_route_needs_a_valid_key() {
    let app = TestApp::spawn().await;
    let (_, link) = app.shorten(json!({"url": "https://example.com"})).await;
    let code = link["code"].as_str().unwrap().to_owned();
    // The routes come from the served OpenAPI document (which another test
    // holds equal to the real routes), so a new admin route is covered the
    // day it is added.
    let doc = app.openapi().await;
    let routes = secured_operations(&doc, &code);
    let names: HashSet<String> = routes.iter().map(|(m, p, _)| format!("{m} {p}")).collect();
    for expected in ["POST /shorten", "GET /links", "DELETE /links/"] {
        assert!(
            names.iter().any(|n| n.starts_with(expected)),
            "{expected} missing from {names:?}"
        );
    }
    for (method, path, has_body) in &routes {
        for key in [None, Some("wrong-key-wrong-key-wrong"), Some("")] {
            let mut request = app.client.request(method.clone(), app.url(path));
            if let Some(key) = key {
                request = request.header("Authorization", format!("Bearer {key}"));
            }
            if *has_body {
                // A body that would succeed with a key.
                request = request.json(&json!({"url": "https://example.com/changed"}));
            }
            let response = request.send().await.unwrap();
            assert_eq!(response.status(), 401, "{method} {path} with {key:?}");
            assert_eq!(response.headers()["www-authenticate"], "Bearer");
            let body: Value = response.json().await.unwrap();
            assert_eq!(body["error"]["code"], "unauthorized");
        }
    }
    // Nothing changed.
    assert_eq!(
        app.sql("SELECT count(*) FROM links WHERE NOT disabled AND url = 'https://example.com/'"),
        "1"
    );

    // A key made with the CLI works, and only its hash is stored.
    let key = app.create_api_key("ci");
    assert!(key.starts_with("sk_"));
    let (status, _) = app.call(Method::GET, "/links", None, Some(&key)).await;
    assert_eq!(status, 200);
    let stored = app.sql("SELECT string_agg(encode(key_hash, 'escape'), ',') FROM api_keys");
    assert!(!stored.contains(&key) && !stored.contains(ADMIN_KEY));
    assert_eq!(
        app.sql("SELECT count(*) FROM api_keys WHERE name = 'ci'"),
        "1"
    );
}

#[tokio::test]
async fn a_key_over_its_rate_gets_429_and_other_keys_are_unaffected() {
    // 5 requests a second, bursts of 10.
    let app = TestApp::spawn_with(
        &TestPostgres::shared().create_database(),
        &[("API_KEY_RATE_LIMIT", "5")],
    )
    .await;
    let other = app.create_api_key("other");

    let mut created = 0;
    let mut limited = None;
    for i in 0..40 {
        let response = app
            .client
            .post(app.url("/shorten"))
            .bearer_auth(ADMIN_KEY)
            .json(&json!({"url": format!("https://example.com/{i}")}))
            .send()
            .await
            .unwrap();
        match response.status().as_u16() {
            201 => created += 1,
            429 => {
                let retry_after: u64 = response.headers()["retry-after"]
                    .to_str()
                    .unwrap()
                    .parse()
                    .unwrap();
                let body: Value = response.json().await.unwrap();
                assert_error(
                    StatusCode::TOO_MANY_REQUESTS,
                    &body,
                    StatusCode::TOO_MANY_REQUESTS,
                );
                assert_eq!(body["error"]["code"], "rate_limited");
                limited = Some(retry_after);
            }
            other => panic!("unexpected {other}"),
        }
    }
    let retry_after = limited.expect("40 requests at once were never limited");
    assert!((1..=2).contains(&retry_after), "Retry-After {retry_after}");
    // The burst got through, the rest did not, and a refused create stored
    // nothing.
    assert!((10..=13).contains(&created), "{created} created");
    assert_eq!(app.sql("SELECT count(*) FROM links"), created.to_string());
    // Another key has its own allowance.
    let (status, _) = app.call(Method::GET, "/links", None, Some(&other)).await;
    assert_eq!(status, 200);
    // Unauthenticated requests are refused as such, not counted as the key's.
    let (status, _) = app.call(Method::GET, "/links", None, None).await;
    assert_eq!(status, 401);
    // After the advertised wait the key works again.
    tokio::time::sleep(Duration::from_secs(retry_after)).await;
    let (status, _) = app.call(Method::GET, "/links", None, Some(ADMIN_KEY)).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn links_to_blocklisted_domains_are_refused_and_the_list_reloads() {
    let dir = tempfile::tempdir().unwrap();
    let list = dir.path().join("blocklist.txt");
    std::fs::write(&list, "# known phishing\nphish.example\n").unwrap();
    let app = TestApp::spawn_with(
        &TestPostgres::shared().create_database(),
        &[
            ("BLOCKLIST_FILE", list.to_str().unwrap()),
            ("BLOCKLIST_RELOAD_MS", "100"),
        ],
    )
    .await;
    for url in [
        "https://phish.example/login",
        "http://WWW.Phish.Example./x",
        "https://a.b.phish.example:8443/",
    ] {
        let (status, body) = app.shorten(json!({ "url": url })).await;
        assert_error(status, &body, StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(body["error"]["code"], "blocked_domain", "{url}");
    }
    assert_eq!(app.sql("SELECT count(*) FROM links"), "0");

    // Only the listed domain and its subdomains.
    let (status, link) = app
        .shorten(json!({"url": "https://notphish.example/"}))
        .await;
    assert_eq!(status, 201, "{link}");
    let code = link["code"].as_str().unwrap().to_owned();
    // Changing a link's target to a listed domain is refused too, and
    // changes nothing.
    let (status, body) = app
        .call(
            Method::PATCH,
            &format!("/links/{code}"),
            Some(json!({"url": "https://phish.example/", "disabled": true})),
            Some(ADMIN_KEY),
        )
        .await;
    assert_error(status, &body, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(
        app.sql("SELECT url || ' ' || disabled FROM links"),
        "https://notphish.example/ false"
    );

    // The file is edited: the new domain is refused within the reload time.
    std::fs::write(&list, "phish.example\nscam.example\n").unwrap();
    eventually(Duration::from_secs(5), "scam.example to be refused", || {
        let create = app.shorten(json!({"url": "https://scam.example/"}));
        async move { (create.await.0 == StatusCode::UNPROCESSABLE_ENTITY).then_some(()) }
    })
    .await;
    // (Polls before the reload made links; from now on none is made.)
    let before = app.sql("SELECT count(*) FROM links");
    let (status, body) = app
        .shorten(json!({"url": "https://www.scam.example/"}))
        .await;
    assert_eq!(body["error"]["code"], "blocked_domain", "{status} {body}");
    assert_eq!(app.sql("SELECT count(*) FROM links"), before);
}

#[tokio::test]
async fn links_can_be_changed_disabled_and_deleted() {
    let app = TestApp::spawn().await;
    let (_, link) = app
        .shorten(json!({"url": "https://example.com/a", "expires_at": "2999-01-01T00:00:00Z"}))
        .await;
    let path = format!("/links/{}", link["code"].as_str().unwrap());

    let (status, changed) = app
        .call(
            Method::PATCH,
            &path,
            Some(json!({"url": "https://example.com/b", "redirect_status": 308, "disabled": true})),
            Some(ADMIN_KEY),
        )
        .await;
    assert_eq!(status, 200, "{changed}");
    assert_eq!(changed["url"], "https://example.com/b");
    assert_eq!(changed["redirect_status"], 308);
    assert_eq!(changed["disabled"], true);
    assert_eq!(changed["expires_at"], "2999-01-01T00:00:00.000Z");

    let (status, cleared) = app
        .call(
            Method::PATCH,
            &path,
            Some(json!({"expires_at": null})),
            Some(ADMIN_KEY),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(cleared["expires_at"], Value::Null);

    for bad in [
        json!({"url": "javascript:x"}),
        json!({"redirect_status": 303}),
        json!({"expires_at": "2000-01-01T00:00:00Z"}),
        json!({"nope": 1}),
    ] {
        let (status, body) = app
            .call(Method::PATCH, &path, Some(bad.clone()), Some(ADMIN_KEY))
            .await;
        assert_error(status, &body, StatusCode::BAD_REQUEST);
    }
    let (_, unchanged) = app.call(Method::GET, &path, None, Some(ADMIN_KEY)).await;
    assert_eq!(unchanged["url"], "https://example.com/b");

    let (status, _) = app.call(Method::DELETE, &path, None, Some(ADMIN_KEY)).await;
    assert_eq!(status, 204);
    for method in [Method::GET, Method::DELETE] {
        let (status, body) = app.call(method, &path, None, Some(ADMIN_KEY)).await;
        assert_error(status, &body, StatusCode::NOT_FOUND);
    }
    let (status, body) = app
        .call(
            Method::PATCH,
            &path,
            Some(json!({"disabled": false})),
            Some(ADMIN_KEY),
        )
        .await;
    assert_error(status, &body, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn listing_pages_newest_first_without_gaps_or_repeats() {
    let app = TestApp::spawn().await;
    let mut created = Vec::new();
    for i in 0..25 {
        let (_, link) = app
            .shorten(json!({"url": format!("https://example.com/{i}")}))
            .await;
        created.push(link["code"].as_str().unwrap().to_owned());
    }
    let mut seen = Vec::new();
    let mut cursor = None::<String>;
    let mut sizes = Vec::new();
    loop {
        let path = match &cursor {
            Some(c) => format!("/links?limit=10&cursor={c}"),
            None => "/links?limit=10".into(),
        };
        let (status, page) = app.call(Method::GET, &path, None, Some(ADMIN_KEY)).await;
        assert_eq!(status, 200);
        let links = page["links"].as_array().unwrap();
        sizes.push(links.len());
        seen.extend(links.iter().map(|l| l["code"].as_str().unwrap().to_owned()));
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    assert_eq!(sizes, vec![10, 10, 5]);
    created.reverse();
    assert_eq!(seen, created);
    for bad in [
        "/links?limit=0",
        "/links?limit=101",
        "/links?limit=x",
        "/links?cursor=garbage",
    ] {
        let (status, body) = app.call(Method::GET, bad, None, Some(ADMIN_KEY)).await;
        assert_error(status, &body, StatusCode::BAD_REQUEST);
    }
}

#[tokio::test]
async fn idempotency_key_replays_the_first_result() {
    let app = TestApp::spawn().await;
    let send = |body: Value, key: &'static str| {
        app.client
            .post(app.url("/shorten"))
            .bearer_auth(ADMIN_KEY)
            .header("Idempotency-Key", key)
            .json(&body)
            .send()
    };
    let first = send(json!({"url": "https://example.com/once"}), "order-17")
        .await
        .unwrap();
    assert_eq!(first.status(), 201);
    let first: Value = first.json().await.unwrap();
    let again = send(json!({"url": "https://example.com/once"}), "order-17")
        .await
        .unwrap();
    assert_eq!(again.status(), 201);
    assert!(again.headers().contains_key("location"));
    let again: Value = again.json().await.unwrap();
    assert_eq!(first, again);
    let different = send(json!({"url": "https://example.com/other"}), "order-17")
        .await
        .unwrap();
    assert_eq!(different.status(), 422);
    let body: Value = different.json().await.unwrap();
    assert_eq!(body["error"]["code"], "idempotency_key_reused");
    assert_eq!(app.sql("SELECT count(*) FROM links"), "1");

    // Concurrent first uses of one key still create one link.
    let racers: Vec<_> = (0..8)
        .map(|_| tokio::spawn(send(json!({"url": "https://example.com/race"}), "race-1")))
        .collect();
    let mut codes = HashSet::new();
    for racer in racers {
        let response = racer.await.unwrap().unwrap();
        assert_eq!(response.status(), 201);
        codes.insert(
            response.json::<Value>().await.unwrap()["code"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    assert_eq!(codes.len(), 1);
    assert_eq!(app.sql("SELECT count(*) FROM links"), "2");
}

/// What Redis should hold for each link in PostgreSQL.
fn expected_redis(app_links: &[Value]) -> BTreeMap<String, Value> {
    app_links
        .iter()
        .map(|l| {
            let expires = l["expires_at"].as_str().map(|s| {
                chrono_millis(s)
            });
            (
                l["code"].as_str().unwrap().to_owned(),
                json!({"url": l["url"], "status": l["redirect_status"], "expires_at_ms": expires, "disabled": l["disabled"]}),
            )
        })
        .collect()
}

fn chrono_millis(rfc3339: &str) -> i64 {
    chrono::DateTime::parse_from_rfc3339(rfc3339)
        .unwrap()
        .timestamp_millis()
}

#[tokio::test]
async fn redis_follows_postgres_and_edges_hear_of_every_change() {
    let app = TestApp::spawn().await;
    let mut pubsub_conn = app.redis();
    let mut pubsub = pubsub_conn.as_pubsub();
    pubsub.subscribe("link-invalidations").unwrap();
    pubsub
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();

    let (_, link) = app
        .shorten(json!({"url": "https://example.com/x", "expires_at": "2999-01-01T00:00:00Z"}))
        .await;
    let code = link["code"].as_str().unwrap().to_owned();
    let message: String = pubsub.get_message().unwrap().get_payload().unwrap();
    assert_eq!(message, code);
    let stored = app.redis_links();
    assert_eq!(
        stored.get(&code),
        expected_redis(std::slice::from_ref(&link)).get(&code)
    );
    let ttl: i64 = redis::cmd("PEXPIRETIME")
        .arg(format!("link:{code}"))
        .query(&mut app.redis())
        .unwrap();
    assert_eq!(ttl, chrono_millis("2999-01-01T00:00:00Z"));

    let started = Instant::now();
    app.call(
        Method::PATCH,
        &format!("/links/{code}"),
        Some(json!({"url": "https://example.com/y"})),
        Some(ADMIN_KEY),
    )
    .await;
    let message: String = pubsub.get_message().unwrap().get_payload().unwrap();
    assert_eq!(message, code);
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(app.redis_links()[&code]["url"], "https://example.com/y");

    app.call(
        Method::DELETE,
        &format!("/links/{code}"),
        None,
        Some(ADMIN_KEY),
    )
    .await;
    let message: String = pubsub.get_message().unwrap().get_payload().unwrap();
    assert_eq!(message, code);
    assert_eq!(app.redis_links()[&code], json!({"deleted": true}));
    assert_eq!(
        app.sql("SELECT count(*) FROM link_outbox WHERE processed_at IS NULL"),
        "0"
    );
}

#[tokio::test]
async fn with_redis_down_nothing_is_lost_and_redis_catches_up_exactly() {
    let mut app = TestApp::spawn().await;
    let mut keep = Vec::new();
    for i in 0..5 {
        let (_, link) = app
            .shorten(json!({"url": format!("https://example.com/before/{i}")}))
            .await;
        keep.push(link["code"].as_str().unwrap().to_owned());
    }
    eventually(Duration::from_secs(5), "the relay to sync", || {
        let n = app.redis_links().len();
        async move { (n == 5).then_some(()) }
    })
    .await;

    app.redis.stop();
    let mut created = Vec::new();
    for i in 0..10 {
        let (status, link) = app
            .shorten(json!({"url": format!("https://example.com/during/{i}")}))
            .await;
        assert_eq!(status, 201, "{link}");
        created.push(link["code"].as_str().unwrap().to_owned());
    }
    for code in &created[..3] {
        let (status, _) = app
            .call(
                Method::DELETE,
                &format!("/links/{code}"),
                None,
                Some(ADMIN_KEY),
            )
            .await;
        assert_eq!(status, 204);
    }
    let (status, _) = app
        .call(
            Method::DELETE,
            &format!("/links/{}", keep[0]),
            None,
            Some(ADMIN_KEY),
        )
        .await;
    assert_eq!(status, 204);
    let (status, _) = app
        .call(
            Method::PATCH,
            &format!("/links/{}", keep[1]),
            Some(json!({"disabled": true})),
            Some(ADMIN_KEY),
        )
        .await;
    assert_eq!(status, 200);
    assert_ne!(
        app.sql("SELECT count(*) FROM link_outbox WHERE processed_at IS NULL"),
        "0"
    );

    app.redis.start_again();
    let links = app.all_links().await;
    let mut expected = expected_redis(&links);
    for code in created[..3].iter().chain([&keep[0]]) {
        expected.insert(code.clone(), json!({"deleted": true}));
    }
    eventually(
        Duration::from_secs(15),
        "Redis to match PostgreSQL exactly",
        || {
            let matches = app.redis_links() == expected;
            async move { matches.then_some(()) }
        },
    )
    .await;
    assert_eq!(
        app.sql("SELECT count(*) FROM link_outbox WHERE processed_at IS NULL"),
        "0"
    );
}

#[tokio::test]
async fn resolve_reads_postgres_and_repopulates_an_empty_redis() {
    let mut app = TestApp::spawn().await;
    let (_, link) = app
        .shorten(json!({"url": "https://example.com/r", "redirect_status": 307}))
        .await;
    let code = link["code"].as_str().unwrap().to_owned();
    eventually(Duration::from_secs(5), "the relay to sync", || {
        let n = app.redis_links().len();
        async move { (n == 1).then_some(()) }
    })
    .await;

    app.redis.stop();
    app.redis.start_empty();
    assert!(app.redis_links().is_empty());
    let (status, resolved) = app
        .call(
            Method::GET,
            &format!("/internal/resolve/{code}"),
            None,
            None,
        )
        .await;
    assert_eq!(status, 200, "{resolved}");
    assert_eq!(
        resolved,
        json!({"code": code, "url": "https://example.com/r", "status": 307, "expires_at_ms": null, "disabled": false})
    );
    assert_eq!(
        app.redis_links()[&code],
        json!({"url": "https://example.com/r", "status": 307, "expires_at_ms": null, "disabled": false})
    );

    let (status, body) = app
        .call(Method::GET, "/internal/resolve/nosuchcode", None, None)
        .await;
    assert_error(status, &body, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn keygen_down_creates_continue_from_the_lease_then_503_then_recover() {
    let mut app = TestApp::spawn_with(
        &TestPostgres::shared().create_database(),
        &[("KEYGEN_BATCH", "20")],
    )
    .await;
    let (status, _) = app
        .shorten(json!({"url": "https://example.com/warm"}))
        .await;
    assert_eq!(status, 201);
    app.keygen.stop().await;

    let mut served = 0;
    let refusal = loop {
        let (status, body) = app
            .shorten(json!({"url": "https://example.com/lease"}))
            .await;
        if status != 201 {
            break (status, body);
        }
        served += 1;
        assert!(served <= 40, "the lease should run out");
    };
    assert!(served >= 1, "creates should continue from the lease");
    assert_error(refusal.0, &refusal.1, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(refusal.1["error"]["code"], "keygen_unavailable");
    // Aliases need no keygen.
    let (status, _) = app
        .shorten(json!({"url": "https://example.com/a", "alias": "still-works"}))
        .await;
    assert_eq!(status, 201);

    app.keygen.run().await;
    eventually(Duration::from_secs(10), "creates to work again", || {
        let request = app.shorten(json!({"url": "https://example.com/back"}));
        async move { (request.await.0 == 201).then_some(()) }
    })
    .await;
}

#[tokio::test]
async fn postgres_down_fails_fast_with_503_and_recovers_without_a_restart() {
    let mut pg = TestPostgres::start();
    let db = pg.create_database();
    let app = TestApp::spawn_with(&db, &[]).await;
    let (status, link) = app.shorten(json!({"url": "https://example.com/pg"})).await;
    assert_eq!(status, 201);
    let code = link["code"].as_str().unwrap().to_owned();

    // Fill the pool with connections that the restart will kill.
    app.create_concurrently(16, "warm").await;
    pg.stop();
    let started = Instant::now();
    let (status, body) = app
        .shorten(json!({"url": "https://example.com/down"}))
        .await;
    assert_error(status, &body, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body["error"]["code"], "database_unavailable");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    let (status, body) = app
        .call(
            Method::GET,
            &format!("/links/{code}"),
            None,
            Some(ADMIN_KEY),
        )
        .await;
    assert_error(status, &body, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        reqwest::get(app.url("/healthz")).await.unwrap().status(),
        200
    );
    assert_eq!(
        reqwest::get(app.url("/readyz")).await.unwrap().status(),
        503
    );

    pg.start_again();
    eventually(Duration::from_secs(15), "creates to work again", || {
        let request = app.shorten(json!({"url": "https://example.com/up"}));
        async move { (request.await.0 == 201).then_some(()) }
    })
    .await;
    assert_eq!(
        reqwest::get(app.url("/readyz")).await.unwrap().status(),
        200
    );
    // No dead pooled connection is handed out again: every request succeeds.
    app.create_concurrently(40, "after").await;
}

#[tokio::test]
async fn operations_routes_and_the_openapi_document_match_the_real_routes() {
    let app = TestApp::spawn().await;
    assert_eq!(
        reqwest::get(app.url("/readyz")).await.unwrap().status(),
        200
    );
    app.shorten(json!({"url": "https://example.com"})).await;
    let metrics = reqwest::get(app.url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("control_plane_http_requests_total"),
        "{metrics}"
    );
    assert!(
        metrics.contains("control_plane_links_created_total"),
        "{metrics}"
    );

    let doc = app.openapi().await;
    assert_eq!(doc["openapi"], "3.0.3");
    let mut documented = HashSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in ["get", "post", "patch", "delete", "put"] {
            if item.get(method).is_some() {
                documented.insert(format!("{} {path}", method.to_uppercase()));
            }
        }
    }
    let config = control_plane::Config::from_env(shortener_common::Env::from_pairs(
        app.env
            .clone()
            .into_iter()
            .filter(|(k, _)| k != "RUN_MIGRATIONS"),
    ))
    .unwrap();
    let rocket = control_plane::build(&config).unwrap();
    let served: HashSet<String> = rocket
        .routes()
        .map(|r| {
            format!(
                "{} {}",
                r.method,
                r.uri.path().replace('<', "{").replace('>', "}")
            )
        })
        .collect();
    assert_eq!(documented, served);
}

/// A span as an OTLP receiver saw it.
#[derive(Debug, Clone)]
struct SeenSpan {
    service: String,
    name: String,
    trace_id: Vec<u8>,
    span_id: Vec<u8>,
    parent_span_id: Vec<u8>,
}

/// A real OTLP/gRPC trace receiver (the collector's protocol, from
/// `opentelemetry-proto`) that keeps every span it is sent.
#[derive(Clone, Default)]
struct OtlpReceiver(std::sync::Arc<std::sync::Mutex<Vec<SeenSpan>>>);

#[tonic::async_trait]
impl opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::TraceService
    for OtlpReceiver
{
    async fn export(
        &self,
        request: tonic::Request<
            opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest,
        >,
    ) -> Result<
        tonic::Response<
            opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse,
        >,
        tonic::Status,
    > {
        use opentelemetry_proto::tonic::common::v1::any_value::Value as Any;
        let mut seen = self.0.lock().unwrap();
        for resource_spans in request.into_inner().resource_spans {
            let service = resource_spans
                .resource
                .iter()
                .flat_map(|r| r.attributes.iter())
                .find(|a| a.key == "service.name")
                .and_then(|a| a.value.as_ref()?.value.as_ref())
                .map(|v| match v {
                    Any::StringValue(s) => s.clone(),
                    other => format!("{other:?}"),
                })
                .unwrap_or_default();
            for scope in resource_spans.scope_spans {
                for span in scope.spans {
                    seen.push(SeenSpan {
                        service: service.clone(),
                        name: span.name,
                        trace_id: span.trace_id,
                        span_id: span.span_id,
                        parent_span_id: span.parent_span_id,
                    });
                }
            }
        }
        Ok(tonic::Response::new(
            opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse {
                partial_success: None,
            },
        ))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_is_one_trace_across_the_control_plane_and_keygen() {
    let receiver = OtlpReceiver::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(
                opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::TraceServiceServer::new(
                    receiver.clone(),
                ),
            )
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    // keygen runs inside this test process (`InProcessKeygen`): this process
    // exports its spans as the keygen service, over the same OTLP.
    let telemetry = shortener_common::telemetry::init_with(
        "keygen",
        shortener_common::telemetry::LogFormat::Text,
        1.0,
        Some(endpoint.clone()),
    );
    assert!(telemetry.tracing(), "tracing is on when an endpoint is set");
    // The control plane is its own process, with the endpoint in its env.
    let app = TestApp::spawn_with(
        &TestPostgres::shared().create_database(),
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ],
    )
    .await;

    // The create takes a code from the lease the control plane filled at
    // start, which drops it below its low-water mark: the refill from
    // keygen is part of this request's trace.
    let response = app
        .client
        .post(app.url("/shorten"))
        .bearer_auth(ADMIN_KEY)
        .json(&json!({"url": "https://example.com/traced"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);

    let (create, generate) = eventually(
        Duration::from_secs(15),
        "spans of one trace from both services",
        || {
            telemetry.flush();
            let spans = receiver.0.lock().unwrap().clone();
            async move {
                let create = spans
                    .iter()
                    .find(|s| s.service == "control-plane" && s.name == "POST /shorten")?
                    .clone();
                let generate = spans
                    .iter()
                    .find(|s| {
                        s.service == "keygen"
                            && s.name == "Keygen/GenerateKeys"
                            && s.trace_id == create.trace_id
                    })?
                    .clone();
                Some((create, generate))
            }
        },
    )
    .await;
    assert_eq!(create.trace_id.len(), 16);
    assert!(create.trace_id.iter().any(|b| *b != 0));
    // keygen's span hangs under the control plane's client span, which
    // hangs under the request's span: the context crossed gRPC.
    let spans = receiver.0.lock().unwrap().clone();
    let client = spans
        .iter()
        .find(|s| s.span_id == generate.parent_span_id)
        .expect("keygen's parent span was exported");
    assert_eq!(client.service, "control-plane");
    assert_eq!(client.name, "keygen.GenerateKeys");
    assert_eq!(client.parent_span_id, create.span_id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn odd_paths_and_parameters_get_the_documented_answers() {
    let app = TestApp::spawn().await;
    let get = |path: &str, key: Option<&str>| {
        let mut request = app.client.get(app.url(path));
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        request.send()
    };
    // A path that cannot be a code names no link: 404 with a key, 401
    // without one (never a 400 that would answer before the key check).
    for path in ["/links/%C2%84", "/links/a.b", "/links/a%2Fb"] {
        let response = get(path, Some(ADMIN_KEY)).await.unwrap();
        assert_eq!(response.status(), StatusCode::NOT_FOUND, "{path}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["code"], "not_found", "{path}");
        assert_eq!(
            get(path, None).await.unwrap().status(),
            StatusCode::UNAUTHORIZED,
            "{path}"
        );
    }
    let response = app
        .client
        .get(app.url("/internal/resolve/%C2%84"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    // A repeated query field is refused rather than ignored.
    for query in ["limit=5&limit=7", "cursor=zz&cursor=zz"] {
        let response = get(&format!("/links?{query}"), Some(ADMIN_KEY))
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{query}");
    }
    // An explicit null is the same as leaving an optional field out.
    let response = app
        .client
        .post(app.url("/shorten"))
        .bearer_auth(ADMIN_KEY)
        .json(&json!({"url": "https://example.com/nulls", "alias": null, "expires_at": null, "redirect_status": null}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    let created: Value = response.json().await.unwrap();
    assert_eq!(created["redirect_status"], 302);
    assert_eq!(created["expires_at"], Value::Null);
}
