//! `POST /shorten` throughput at 32 concurrent clients (`cargo bench -p
//! control-plane`, part of `make bench`), against a reference measured in
//! the same run on the same PostgreSQL: pgbench running the same two inserts
//! per transaction (the link and its outbox row) with 32 clients. The ratio
//! says how much the API, auth, validation, keygen leasing and the relay cost
//! on top of the database's own limit.
//!
//! The load generator runs on the same 2 cores as everything else.

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use shortener_common::testing::{
    ManagedProcess, TestPostgres, TestRedis, free_port, until_http_status,
};

const CLIENTS: usize = 32;
const WINDOW: Duration = Duration::from_secs(10);
const ADMIN_KEY: &str = "bench-admin-key-0123456789abcdef";

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(run());
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p) as usize]
}

async fn run() {
    let pg = TestPostgres::start();
    let database = pg.create_database();
    let redis = TestRedis::start();

    // keygen in-process, pinned, so the bench needs no lease.
    let keygen = keygen::testing::InProcessKeygen::start().await;
    let state = tempfile::tempdir().unwrap();

    let port = free_port();
    let mut command = Command::new(env!("CARGO_BIN_EXE_control-plane"));
    command
        .env_clear()
        .env("CONTROL_PLANE_ADDR", format!("127.0.0.1:{port}"))
        .env("DATABASE_URL", &database)
        .env("DATABASE_POOL_SIZE", "8")
        .env("REDIS_URL", redis.url())
        .env("KEYGEN_GRPC_URL", keygen.grpc_url())
        .env("ADMIN_API_KEY", ADMIN_KEY)
        // The benchmark measures creates, not the per-key limit.
        .env("API_KEY_RATE_LIMIT", "0")
        .env("RUN_MIGRATIONS", "true")
        .env("RUST_LOG", "error")
        .stdout(Stdio::null());
    let _control_plane = ManagedProcess::spawn("control-plane", command, 15);
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(CLIENTS)
        .build()
        .unwrap();
    until_http_status(&format!("{base}/readyz"), 200, Duration::from_secs(30)).await;

    // Warm up connections, the key lease and PostgreSQL's caches.
    for i in 0..200 {
        let response = client
            .post(format!("{base}/shorten"))
            .bearer_auth(ADMIN_KEY)
            .json(&serde_json::json!({"url": format!("https://example.com/warm/{i}")}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 201);
    }

    let errors = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let tasks: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let (client, base, errors) = (client.clone(), base.clone(), errors.clone());
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                let mut i = 0u64;
                while started.elapsed() < WINDOW {
                    let sent = Instant::now();
                    let response = client
                        .post(format!("{base}/shorten"))
                        .bearer_auth(ADMIN_KEY)
                        .json(&serde_json::json!({"url": format!("https://example.com/{c}/{i}")}))
                        .send()
                        .await;
                    match response {
                        Ok(r) if r.status() == 201 => latencies.push(sent.elapsed()),
                        _ => {
                            errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    i += 1;
                }
                latencies
            })
        })
        .collect();
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.extend(task.await.unwrap());
    }
    let elapsed = started.elapsed();
    latencies.sort();
    let api_rate = latencies.len() as f64 / elapsed.as_secs_f64();

    // Reference: the same inserts straight into PostgreSQL with pgbench.
    let script = state.path().join("insert.sql");
    std::fs::write(
        &script,
        "BEGIN;\n\
         INSERT INTO links (code, url, redirect_status, is_alias) \
           VALUES ('pgb' || :client_id || '_' || nextval('links_id_seq'), 'https://example.com/pgbench', 302, false);\n\
         INSERT INTO link_outbox (code) VALUES ('pgb' || :client_id);\n\
         END;\n",
    )
    .unwrap();
    let pgbench = std::fs::read_dir("/usr/lib/postgresql")
        .unwrap()
        .filter_map(|e| Some(e.ok()?.path().join("bin/pgbench")))
        .find(|p| p.exists())
        .expect("pgbench from the postgresql package");
    let output = Command::new(pgbench)
        .args([
            "-n",
            "-c",
            &CLIENTS.to_string(),
            "-j",
            "2",
            "-T",
            &WINDOW.as_secs().to_string(),
            "-f",
        ])
        .arg(&script)
        .arg(&database)
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "pgbench failed: {report} {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let pg_rate: f64 = report
        .lines()
        .find_map(|l| l.strip_prefix("tps = "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .expect("pgbench prints tps");

    println!("control-plane POST /shorten, {CLIENTS} concurrent clients, {WINDOW:?}");
    println!(
        "  POST /shorten:   {api_rate:>8.0} creates/s  p50 {:?}  p99 {:?}  errors {}",
        percentile(&latencies, 0.50),
        percentile(&latencies, 0.99),
        errors.load(Ordering::Relaxed)
    );
    println!("  pgbench, same two inserts per transaction: {pg_rate:>8.0} tx/s  [reference]");
    println!("  ratio API / database: {:.2}x", api_rate / pg_rate);
    println!("  target 3,000 creates/s: {:.2}x", api_rate / 3000.0);
}
