//! analytics-sink: reads click events from the Redis stream, enriches and
//! batches them into ClickHouse, and serves `GET /analytics/{code}`.
//!
//! Built so far: configuration and the operations routes (`/healthz`,
//! `/readyz` checking Redis, `/metrics`) on `ANALYTICS_ADDR`. The consumer,
//! the ClickHouse schema and the API arrive with their issue.

use std::net::SocketAddr;
use std::time::Duration;

use shortener_common::telemetry::LogFormat;
use shortener_common::{ConfigError, Env, Secret};

#[derive(Debug, Clone)]
pub struct Config {
    /// `ANALYTICS_ADDR`, default `127.0.0.1:8084`.
    pub addr: SocketAddr,
    /// `REDIS_URL`, default `redis://127.0.0.1:6379`.
    pub redis_url: Secret,
    /// `SHUTDOWN_DRAIN_MS`, default 10000.
    pub drain: Duration,
    /// `LOG_FORMAT`, `text` (default) or `json`.
    pub log_format: LogFormat,
}

impl Config {
    pub fn from_env(mut env: Env) -> Result<Self, ConfigError> {
        let addr = env.parse_or("ANALYTICS_ADDR", ([127, 0, 0, 1], 8084).into());
        let redis_url = env
            .secret_opt("REDIS_URL")
            .unwrap_or_else(|| Secret::new("redis://127.0.0.1:6379"));
        let drain_ms: u64 = env.parse_or("SHUTDOWN_DRAIN_MS", 10_000);
        let log_format = env.parse_or("LOG_FORMAT", LogFormat::Text);
        env.finish()?;
        Ok(Self {
            addr,
            redis_url,
            drain: Duration::from_millis(drain_ms),
            log_format,
        })
    }
}
