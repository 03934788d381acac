//! control-plane: the admin API (`POST /shorten`, `/links`, API keys) on
//! PostgreSQL, the source of truth, with Redis kept in sync from it.
//!
//! Built so far: configuration and the operations routes (`/healthz`,
//! `/readyz` checking PostgreSQL, Redis and keygen, `/metrics`) on
//! `CONTROL_PLANE_ADDR`. The API, migrations and the outbox relay arrive with
//! their issue.

use std::net::SocketAddr;
use std::time::Duration;

use shortener_common::telemetry::LogFormat;
use shortener_common::{ConfigError, Env, Secret};

#[derive(Debug, Clone)]
pub struct Config {
    /// `CONTROL_PLANE_ADDR`, default `127.0.0.1:8082`.
    pub addr: SocketAddr,
    /// `DATABASE_URL`, required (may hold a password; also `DATABASE_URL_FILE`).
    pub database_url: Secret,
    /// `REDIS_URL`, default `redis://127.0.0.1:6379`.
    pub redis_url: Secret,
    /// `KEYGEN_GRPC_URL`, default `http://127.0.0.1:50051`.
    pub keygen_url: String,
    /// `SHUTDOWN_DRAIN_MS`, default 10000.
    pub drain: Duration,
    /// `LOG_FORMAT`, `text` (default) or `json`.
    pub log_format: LogFormat,
}

impl Config {
    pub fn from_env(mut env: Env) -> Result<Self, ConfigError> {
        let addr = env.parse_or("CONTROL_PLANE_ADDR", ([127, 0, 0, 1], 8082).into());
        let database_url = env.secret_required("DATABASE_URL");
        let redis_url = env
            .secret_opt("REDIS_URL")
            .unwrap_or_else(|| Secret::new("redis://127.0.0.1:6379"));
        let keygen_url = env.parse_or("KEYGEN_GRPC_URL", "http://127.0.0.1:50051".to_owned());
        let drain_ms: u64 = env.parse_or("SHUTDOWN_DRAIN_MS", 10_000);
        let log_format = env.parse_or("LOG_FORMAT", LogFormat::Text);
        env.finish()?;
        Ok(Self {
            addr,
            database_url: database_url.expect("checked by finish"),
            redis_url,
            keygen_url,
            drain: Duration::from_millis(drain_ms),
            log_format,
        })
    }
}
