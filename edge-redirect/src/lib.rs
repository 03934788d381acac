//! edge-redirect: the public hot path (`GET /{code}` -> 302) over an
//! in-memory cache backed by Redis, emitting one click event per redirect.
//!
//! Built so far: configuration and the operations listener (`/healthz`,
//! `/readyz` checking Redis, `/metrics`) on `EDGE_ADMIN_ADDR`. The redirect
//! listener on `EDGE_HTTP_ADDR` arrives with its issue; until then the
//! gateway answers 502 for codes. The edge must never depend on Diesel or
//! Rocket.

use std::net::SocketAddr;
use std::time::Duration;

use shortener_common::telemetry::LogFormat;
use shortener_common::{ConfigError, Env, Secret};

#[derive(Debug, Clone)]
pub struct Config {
    /// `EDGE_HTTP_ADDR`, default `127.0.0.1:8081`: public redirects.
    pub http_addr: SocketAddr,
    /// `EDGE_ADMIN_ADDR`, default `127.0.0.1:9081`: `/healthz`, `/readyz`,
    /// `/metrics`; never routed by the gateway.
    pub admin_addr: SocketAddr,
    /// `REDIS_URL`, default `redis://127.0.0.1:6379`.
    pub redis_url: Secret,
    /// `SHUTDOWN_DRAIN_MS`, default 10000.
    pub drain: Duration,
    /// `LOG_FORMAT`, `text` (default) or `json`.
    pub log_format: LogFormat,
}

impl Config {
    pub fn from_env(mut env: Env) -> Result<Self, ConfigError> {
        let http_addr = env.parse_or("EDGE_HTTP_ADDR", ([127, 0, 0, 1], 8081).into());
        let admin_addr = env.parse_or("EDGE_ADMIN_ADDR", ([127, 0, 0, 1], 9081).into());
        let redis_url = env
            .secret_opt("REDIS_URL")
            .unwrap_or_else(|| Secret::new("redis://127.0.0.1:6379"));
        let drain_ms: u64 = env.parse_or("SHUTDOWN_DRAIN_MS", 10_000);
        let log_format = env.parse_or("LOG_FORMAT", LogFormat::Text);
        env.finish()?;
        Ok(Self {
            http_addr,
            admin_addr,
            redis_url,
            drain: Duration::from_millis(drain_ms),
            log_format,
        })
    }
}
