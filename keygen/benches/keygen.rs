//! keygen throughput, printed as ratios against references measured in the
//! same run (`cargo bench -p keygen`, part of `make bench`).
//!
//! - encode: the permutation + base62 alone, the ceiling for any issuing path.
//! - in-process: `KeyService::generate(1000)` with a clock sped up 1000x, so
//!   the layout's 16,384-per-second cap does not hide the service's own cost.
//! - gRPC and HTTP: batches of 1000 over loopback from 4 concurrent clients,
//!   same fast clock.
//! - sustained: the real clock for a few seconds after the burst allowance is
//!   spent, against the 10,000 keys/s per worker the layout promises.

use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Empty};
use keygen::service::{Clock, SystemClock};
use keygen::{Application, Config};
use shortener_common::Env;

/// Wall clock running 1000x fast: one tick per real millisecond.
struct FastClock {
    start_unix_ms: u64,
    started: Instant,
}

impl Clock for FastClock {
    fn now_unix_ms(&self) -> u64 {
        self.start_unix_ms + self.started.elapsed().as_micros() as u64
    }
}

fn config(state_dir: &std::path::Path) -> Config {
    Config::from_env(Env::from_pairs([
        ("KEYGEN_SECRET", "benchmark-secret-0123456789"),
        ("KEYGEN_WORKER_ID", "1"),
        ("KEYGEN_STATE_DIR", state_dir.to_str().unwrap()),
        ("KEYGEN_HTTP_ADDR", "127.0.0.1:0"),
        ("KEYGEN_GRPC_ADDR", "127.0.0.1:0"),
    ]))
    .expect("valid bench config")
}

fn rate(keys: u64, elapsed: Duration) -> f64 {
    keys as f64 / elapsed.as_secs_f64()
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(run());
}

async fn run() {
    let dir = tempfile::tempdir().unwrap();

    // Reference: the pure encoding work.
    let perm = keygen::permute::Permutation::new(b"benchmark-secret-0123456789");
    let n = 2_000_000u64;
    let start = Instant::now();
    let mut total_len = 0usize;
    for id in 0..n {
        total_len += keygen::base62::encode(perm.forward(id << 5)).len();
    }
    let encode_rate = rate(n, start.elapsed());
    assert!(total_len > 0);

    // In-process service with the fast clock.
    let clock = Arc::new(FastClock {
        start_unix_ms: SystemClock.now_unix_ms(),
        started: Instant::now(),
    });
    let app = Application::build_with_clock(config(&dir.path().join("fast")), clock)
        .await
        .unwrap();
    let service = app.service();
    let (http_port, grpc_port) = (app.http_port(), app.grpc_port());
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(app.run_until(async {
        let _ = stop_rx.await;
    }));

    let batches = 2_000u64;
    let start = Instant::now();
    for _ in 0..batches {
        service.generate(1000).await.unwrap();
    }
    let in_process_rate = rate(batches * 1000, start.elapsed());

    // gRPC, 4 clients.
    let clients = 4u64;
    let per_client = 200u64;
    let start = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            tokio::spawn(async move {
                let mut client = keygen::proto::keygen_client::KeygenClient::connect(format!(
                    "http://127.0.0.1:{grpc_port}"
                ))
                .await
                .unwrap();
                for _ in 0..per_client {
                    let keys = client
                        .generate_keys(keygen::proto::GenerateKeysRequest { count: 1000 })
                        .await
                        .unwrap()
                        .into_inner()
                        .keys;
                    assert_eq!(keys.len(), 1000);
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    let grpc_rate = rate(clients * per_client * 1000, start.elapsed());

    // HTTP, 4 clients.
    let start = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            tokio::spawn(async move {
                let client = hyper_util::client::legacy::Client::builder(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .build_http::<Empty<bytes::Bytes>>();
                let uri: http::Uri =
                    format!("http://127.0.0.1:{http_port}/generate-key?count=1000")
                        .parse()
                        .unwrap();
                for _ in 0..per_client {
                    let response = client.get(uri.clone()).await.unwrap();
                    assert_eq!(response.status(), 200);
                    let body = response.into_body().collect().await.unwrap().to_bytes();
                    assert!(body.len() > 1000);
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    let http_rate = rate(clients * per_client * 1000, start.elapsed());
    let _ = stop_tx.send(());
    server.await.unwrap().unwrap();

    // Sustained on the real clock: spend the burst allowance, then measure.
    let real = Application::build(config(&dir.path().join("real")))
        .await
        .unwrap();
    let service = real.service();
    let start = Instant::now();
    let mut burst = 0u64;
    while start.elapsed() < Duration::from_millis(200) || burst == 0 {
        match tokio::time::timeout(Duration::from_millis(50), service.generate(1000)).await {
            Ok(Ok(_)) => burst += 1000,
            _ => break,
        }
    }
    let burst_elapsed = start.elapsed();
    let window = Duration::from_secs(4);
    let start = Instant::now();
    let mut sustained = 0u64;
    while start.elapsed() < window {
        service.generate(1000).await.unwrap();
        sustained += 1000;
    }
    let sustained_rate = rate(sustained, start.elapsed());

    println!("keygen benchmark (one worker id, batches of 1000)");
    println!("  encode only (permute + base62): {encode_rate:>12.0} keys/s  [reference]");
    println!(
        "  in-process service:             {in_process_rate:>12.0} keys/s  {:.2}x encode",
        in_process_rate / encode_rate
    );
    println!(
        "  gRPC, 4 clients:                {grpc_rate:>12.0} keys/s  {:.2}x in-process",
        grpc_rate / in_process_rate
    );
    println!(
        "  HTTP count=1000, 4 clients:     {http_rate:>12.0} keys/s  {:.2}x in-process",
        http_rate / in_process_rate
    );
    println!(
        "  burst before waiting:           {burst:>12} keys in {:?}",
        burst_elapsed
    );
    println!(
        "  sustained on the real clock:    {sustained_rate:>12.0} keys/s  {:.2}x the 10,000 keys/s target",
        sustained_rate / 10_000.0
    );
}
