//! End-to-end ingest: click events from the Redis stream into ClickHouse
//! (`cargo bench -p analytics-sink`, part of `make bench`).
//!
//! 1. 1,000,000 click events (realistic fields, 2,000 links, a few dozen
//!    User-Agents) are written to the stream as the edge writes them, in
//!    packed entries of 100.
//! 2. Reference, measured in the same run: the same rows, already enriched,
//!    inserted straight into the same schema (materialized views included) in
//!    another database with the `clickhouse` crate in batches of 50,000 (the
//!    sink's default batch): the ceiling the sink could reach on this machine.
//! 3. The sink (release binary, default settings) is started on the backlog;
//!    the clock runs until every event is a row in ClickHouse and
//!    acknowledged.
//!
//! Printed: events per second for each, the sink's ratio to the reference
//! and to the 100,000 events/s target.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use analytics_sink::enrich::Enricher;
use analytics_sink::store::Store;
use shortener_common::ClickEvent;
use shortener_common::event::xadd_packed;
use shortener_common::testing::{
    ManagedProcess, TestClickHouse, TestRedis, free_port, until_http_status,
};

// The same allocator as the services, so the reference is not handicapped.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const EVENTS: usize = 1_000_000;
const SECRET: &str = "bench-visitor-secret-0123456789";

const AGENTS: &[&str] = &[
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.0.0 Safari/537.36",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.1 Mobile/15E148 Safari/604.1",
    "Mozilla/5.0 (X11; Linux x86_64; rv:121.0) Gecko/20100101 Firefox/121.0",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.1 Safari/605.1.15",
    "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.0.0 Mobile Safari/537.36",
    "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)",
    "curl/8.5.0",
];
const REFERERS: &[&str] = &[
    "",
    "https://news.example.com/story/1",
    "https://t.co/abcdef",
    "https://www.google.com/",
    "https://mail.example.org/inbox",
];

fn event(i: usize) -> ClickEvent {
    ClickEvent {
        event_id: rand::random(),
        code: format!("bench{:04}", i % 2_000),
        ts_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64,
        ip: std::net::Ipv4Addr::from(0x5000_0000u32 + (i as u32 % 50_000) * 7919).into(),
        user_agent: Some(AGENTS[i % AGENTS.len()].to_owned()),
        referer: Some(REFERERS[i % REFERERS.len()].to_owned()).filter(|r| !r.is_empty()),
        accept_language: Some("en-GB,en;q=0.9".to_owned()),
    }
}

fn count(ch: &TestClickHouse, db: &str, table: &str) -> u64 {
    ch.query(&format!("SELECT count() FROM {db}.{table}"))
        .trim()
        .parse()
        .unwrap()
}

/// Entries read by the group but not yet acknowledged.
fn pending(conn: &mut redis::Connection) -> u64 {
    let (count, ..): (u64, redis::Value, redis::Value, redis::Value) = redis::cmd("XPENDING")
        .arg("clicks")
        .arg("analytics-sink")
        .query(conn)
        .unwrap();
    count
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(run());
}

async fn run() {
    let redis = TestRedis::start();
    let clickhouse = TestClickHouse::start();
    let database = "bench";
    let reference_db = "bench_reference";
    for db in [database, reference_db] {
        let migrate = Command::new(env!("CARGO_BIN_EXE_analytics-sink"))
            .arg("migrate")
            .env("CLICKHOUSE_URL", clickhouse.url())
            .env("CLICKHOUSE_DATABASE", db)
            .env("ANALYTICS_VISITOR_SECRET", SECRET)
            .env("RUST_LOG", "error")
            .status()
            .unwrap();
        assert!(migrate.success());
    }

    // 1. The backlog, as the edge writes it: packed entries of 100 clicks
    //    (the edge's largest batch), pipelined 20 entries per round trip.
    let mut conn = redis::Client::open(redis.url())
        .unwrap()
        .get_connection()
        .unwrap();
    let started = Instant::now();
    for start in (0..EVENTS).step_by(2_000) {
        let mut pipe = redis::pipe();
        for entry in (start..(start + 2_000).min(EVENTS)).step_by(100) {
            let mut clicks = Vec::new();
            for i in entry..(entry + 100).min(EVENTS) {
                event(i).write_packed(&mut clicks);
            }
            pipe.add_command(xadd_packed("clicks", clicks)).ignore();
        }
        pipe.query::<()>(&mut conn).unwrap();
    }
    let produce_secs = started.elapsed().as_secs_f64();

    // 2. Reference: enriched rows straight into ClickHouse.
    let mut store = Store::new(&clickhouse.url(), reference_db, "default", None);
    store.detect().await.unwrap();
    let mut enricher = Enricher::new(None, SECRET.as_bytes(), false);
    let rows: Vec<_> = (0..EVENTS).map(|i| enricher.row(&event(i))).collect();
    let started = Instant::now();
    for batch in rows.chunks(50_000) {
        let mut insert = store
            .client()
            .insert::<analytics_sink::store::ClickRow>("clicks")
            .await
            .unwrap();
        for row in batch {
            insert.write(row).await.unwrap();
        }
        insert.end().await.unwrap();
    }
    let reference_secs = started.elapsed().as_secs_f64();
    assert_eq!(count(&clickhouse, reference_db, "clicks"), EVENTS as u64);
    drop(rows);

    // 3. The sink on the backlog.
    let port = free_port();
    let mut command = Command::new(env!("CARGO_BIN_EXE_analytics-sink"));
    command
        .env("ANALYTICS_ADDR", format!("127.0.0.1:{port}"))
        .env("REDIS_URL", redis.url())
        .env("CLICKHOUSE_URL", clickhouse.url())
        .env("CLICKHOUSE_DATABASE", database)
        .env("ANALYTICS_VISITOR_SECRET", SECRET)
        .env("SINK_CONSUMER", "bench")
        .env("RUST_LOG", "error")
        .stdout(Stdio::null());
    let started = Instant::now();
    let sink = ManagedProcess::spawn("analytics-sink", command, 15);
    until_http_status(
        &format!("http://127.0.0.1:{port}/healthz"),
        200,
        Duration::from_secs(30),
    )
    .await;
    // Done when every event is a row and nothing is left pending (acked).
    loop {
        let n = count(&clickhouse, database, "clicks");
        assert!(n <= EVENTS as u64, "{n} rows for {EVENTS} events");
        if n == EVENTS as u64 && pending(&mut conn) == 0 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "only {n} of {EVENTS} rows after 300 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let sink_secs = started.elapsed().as_secs_f64();
    drop(sink);

    let produce_rate = EVENTS as f64 / produce_secs;
    let reference_rate = EVENTS as f64 / reference_secs;
    let sink_rate = EVENTS as f64 / sink_secs;
    println!("analytics-sink ingest: {EVENTS} click events, stream -> ClickHouse");
    println!("  edge-style XADD into the stream:         {produce_rate:>10.0} events/s");
    println!(
        "  direct insert, same schema, 50k batches: {reference_rate:>10.0} rows/s  [reference]"
    );
    println!(
        "  sink, read + enrich + insert + XACK:     {sink_rate:>10.0} events/s  ({:.2}x the reference, {:.2}x the 100,000/s target)",
        sink_rate / reference_rate,
        sink_rate / 100_000.0
    );
}
