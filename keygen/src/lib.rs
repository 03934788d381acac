//! keygen: unique short codes for the shortener.
//!
//! An ID is a 47-bit Snowflake-style number (see [`layout`]) made by a
//! [`generator::Generator`] for the worker id this instance holds (leased in
//! Redis or pinned, see [`worker`]). A keyed Feistel permutation
//! ([`permute`]) scrambles it and [`base62`] turns it into a code of at most
//! eight characters. HTTP ([`http`]) and gRPC ([`grpc`]) serve batches.
//!
//! keygen owns uniqueness of generated codes and nothing else: it does not
//! know whether a code is in use as a link or an alias (the control plane
//! does).

pub mod base62;
pub mod config;
pub mod generator;
pub mod grpc;
pub mod http;
pub mod layout;
pub mod permute;
pub mod service;
#[cfg(feature = "test-support")]
pub mod testing;
pub mod worker;

pub mod proto {
    tonic::include_proto!("shortener.keygen.v1");
}

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;

pub use config::Config;
use service::{Clock, KeyService, SystemClock, WorkerMode};

/// A keygen instance with its listeners bound, ready to run.
pub struct Application {
    http: TcpListener,
    grpc: TcpListener,
    service: Arc<KeyService>,
    metrics: metrics_exporter_prometheus::PrometheusHandle,
    drain: Duration,
}

impl Application {
    pub async fn build(config: Config) -> anyhow::Result<Self> {
        Self::build_with_clock(config, Arc::new(SystemClock)).await
    }

    /// As [`Application::build`], with a clock of the caller's choosing.
    pub async fn build_with_clock(config: Config, clock: Arc<dyn Clock>) -> anyhow::Result<Self> {
        // Install the recorder before anything records, or early counts vanish.
        let metrics = shortener_common::telemetry::metrics_handle();
        let http = TcpListener::bind(config.http_addr)
            .await
            .with_context(|| format!("cannot listen on KEYGEN_HTTP_ADDR={}", config.http_addr))?;
        let grpc = TcpListener::bind(config.grpc_addr)
            .await
            .with_context(|| format!("cannot listen on KEYGEN_GRPC_ADDR={}", config.grpc_addr))?;
        let mode = match config.worker_id {
            Some(worker) => WorkerMode::Pinned {
                worker,
                state: worker::StateFile::new(config.state_dir.clone(), worker),
            },
            None => {
                let client = redis::Client::open(config.redis_url.expose())
                    .context("REDIS_URL is not a valid Redis URL")?;
                let manager_config = redis::aio::ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(Duration::from_secs(2)))
                    .set_response_timeout(Some(Duration::from_secs(2)))
                    .set_number_of_retries(2);
                let conn = redis::aio::ConnectionManager::new_with_config(client, manager_config)
                    .await
                    .context("cannot connect to Redis (REDIS_URL) to lease a worker id")?;
                WorkerMode::Leased(worker::RedisLeases::new(
                    conn,
                    config.redis_prefix.clone(),
                    config.lease_ttl,
                ))
            }
        };
        let service = KeyService::start(
            permute::Permutation::new(config.secret.expose().as_bytes()),
            clock,
            mode,
            config.max_clock_wait,
        )
        .await
        .context("cannot read the worker id reservation")?;
        Ok(Self {
            http,
            grpc,
            service,
            metrics,
            drain: config.drain,
        })
    }

    pub fn http_port(&self) -> u16 {
        self.http.local_addr().expect("bound listener").port()
    }

    pub fn grpc_port(&self) -> u16 {
        self.grpc.local_addr().expect("bound listener").port()
    }

    pub fn service(&self) -> Arc<KeyService> {
        self.service.clone()
    }

    /// Serves until `shutdown` completes, then drains requests in flight and
    /// releases the worker id.
    pub async fn run_until(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let maintain = tokio::spawn(self.service.clone().maintain(stop_rx.clone()));

        let http_state = http::HttpState {
            service: self.service.clone(),
            metrics: self.metrics,
        };
        let mut http_stop = stop_rx.clone();
        let http_server = tokio::spawn(shortener_common::http::serve(
            self.http,
            move |request| http::handle(http_state.clone(), request),
            async move {
                let _ = http_stop.changed().await;
            },
            self.drain,
        ));

        let mut grpc_stop = stop_rx;
        let grpc_server = tonic::transport::Server::builder()
            .add_service(proto::keygen_server::KeygenServer::new(grpc::GrpcKeygen {
                service: self.service.clone(),
            }))
            .serve_with_incoming_shutdown(
                // Without TCP_NODELAY small gRPC responses wait on delayed
                // ACKs: ~40 ms per call instead of well under one.
                tokio_stream::StreamExt::map(
                    tokio_stream::wrappers::TcpListenerStream::new(self.grpc),
                    |stream| {
                        stream.inspect(|s| {
                            let _ = s.set_nodelay(true);
                        })
                    },
                ),
                async move {
                    let _ = grpc_stop.changed().await;
                },
            );
        let grpc_server = tokio::spawn(grpc_server);

        shutdown.await;
        tracing::info!("shutting down: draining requests");
        let _ = stop_tx.send(true);
        let _ = http_server.await;
        match grpc_server.await {
            Ok(Err(error)) => tracing::warn!(%error, "gRPC server ended with an error"),
            Err(error) => tracing::warn!(%error, "gRPC server task failed"),
            Ok(Ok(())) => {}
        }
        let _ = maintain.await;
        self.service.release().await;
        Ok(())
    }
}
