//! keygen's configuration, from the environment.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use shortener_common::telemetry::LogFormat;
use shortener_common::{ConfigError, Env, Secret};

use crate::layout::MAX_WORKER;
use crate::permute::MIN_SECRET_LEN;

#[derive(Debug, Clone)]
pub struct Config {
    /// `KEYGEN_HTTP_ADDR`, default `127.0.0.1:8083`: `GET /generate-key`,
    /// `/healthz`, `/readyz`, `/metrics`.
    pub http_addr: SocketAddr,
    /// `KEYGEN_GRPC_ADDR`, default `127.0.0.1:50051`: the `Keygen` gRPC service.
    pub grpc_addr: SocketAddr,
    /// `KEYGEN_SECRET` or `KEYGEN_SECRET_FILE`, required, at least 16 bytes:
    /// keys the permutation that makes codes unguessable. Changing it changes
    /// every future code (and could repeat a past one), so keep it forever.
    pub secret: Secret,
    /// `KEYGEN_WORKER_ID`, optional, 0 to 15: pins the worker id instead of
    /// leasing one from Redis.
    pub worker_id: Option<u16>,
    /// `KEYGEN_STATE_DIR`, default `./keygen-state`: where a pinned worker id
    /// persists its reservation.
    pub state_dir: PathBuf,
    /// `REDIS_URL`, default `redis://127.0.0.1:6379`: worker id leases.
    pub redis_url: Secret,
    /// `KEYGEN_REDIS_PREFIX`, default `keygen`: prefix of the lease keys.
    pub redis_prefix: String,
    /// `KEYGEN_LEASE_TTL_MS`, default 15000, at least 1000: lifetime of a
    /// worker id lease, renewed every third of it.
    pub lease_ttl: Duration,
    /// `KEYGEN_MAX_CLOCK_WAIT_MS`, default 2000: how long a request may wait
    /// for the clock before it is refused with `clock_behind`.
    pub max_clock_wait: Duration,
    /// `SHUTDOWN_DRAIN_MS`, default 10000: how long SIGTERM waits for
    /// requests in flight.
    pub drain: Duration,
    /// `LOG_FORMAT`, `text` (default) or `json`.
    pub log_format: LogFormat,
}

impl Config {
    pub fn from_env(mut env: Env) -> Result<Self, ConfigError> {
        let http_addr = env.parse_or("KEYGEN_HTTP_ADDR", ([127, 0, 0, 1], 8083).into());
        let grpc_addr = env.parse_or("KEYGEN_GRPC_ADDR", ([127, 0, 0, 1], 50051).into());
        let secret = env.secret_required("KEYGEN_SECRET");
        if let Some(s) = &secret
            && s.expose().len() < MIN_SECRET_LEN
        {
            env.problem(format!(
                "KEYGEN_SECRET must be at least {MIN_SECRET_LEN} bytes long"
            ));
        }
        let worker_id: Option<u16> = env.parse_opt("KEYGEN_WORKER_ID");
        if let Some(w) = worker_id
            && w > MAX_WORKER
        {
            env.problem(format!(
                "KEYGEN_WORKER_ID={w} is not valid: must be 0 to {MAX_WORKER}"
            ));
        }
        let state_dir = env.parse_or("KEYGEN_STATE_DIR", PathBuf::from("keygen-state"));
        let redis_url = env
            .secret_opt("REDIS_URL")
            .unwrap_or_else(|| Secret::new("redis://127.0.0.1:6379"));
        let redis_prefix = env.parse_or("KEYGEN_REDIS_PREFIX", "keygen".to_owned());
        let lease_ttl_ms: u64 = env.parse_or("KEYGEN_LEASE_TTL_MS", 15_000);
        if lease_ttl_ms < 1_000 {
            env.problem(format!(
                "KEYGEN_LEASE_TTL_MS={lease_ttl_ms} is not valid: must be at least 1000"
            ));
        }
        let max_clock_wait_ms: u64 = env.parse_or("KEYGEN_MAX_CLOCK_WAIT_MS", 2_000);
        let drain_ms: u64 = env.parse_or("SHUTDOWN_DRAIN_MS", 10_000);
        let log_format = env.parse_or("LOG_FORMAT", LogFormat::Text);
        env.finish()?;
        Ok(Self {
            http_addr,
            grpc_addr,
            secret: secret.expect("checked by finish"),
            worker_id,
            state_dir,
            redis_url,
            redis_prefix,
            lease_ttl: Duration::from_millis(lease_ttl_ms),
            max_clock_wait: Duration::from_millis(max_clock_wait_ms),
            drain: Duration::from_millis(drain_ms),
            log_format,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_need_only_the_secret() {
        let config =
            Config::from_env(Env::from_pairs([("KEYGEN_SECRET", "0123456789abcdef")])).unwrap();
        assert_eq!(config.http_addr.port(), 8083);
        assert_eq!(config.grpc_addr.port(), 50051);
        assert_eq!(config.worker_id, None);
        assert_eq!(config.lease_ttl, Duration::from_secs(15));
    }

    #[test]
    fn every_problem_is_named_and_the_secret_is_not_printed() {
        let err = Config::from_env(Env::from_pairs([
            ("KEYGEN_SECRET", "short-secret"),
            ("KEYGEN_WORKER_ID", "16"),
            ("KEYGEN_HTTP_ADDR", "localhost"),
            ("KEYGEN_LEASE_TTL_MS", "10"),
        ]))
        .unwrap_err();
        let text = err.to_string();
        for name in [
            "KEYGEN_SECRET",
            "KEYGEN_WORKER_ID",
            "KEYGEN_HTTP_ADDR",
            "KEYGEN_LEASE_TTL_MS",
        ] {
            assert!(text.contains(name), "{name} missing from: {text}");
        }
        assert!(!text.contains("short-secret"), "secret leaked: {text}");
    }

    #[test]
    fn the_secret_is_required() {
        let err = Config::from_env(Env::from_pairs(Vec::<(String, String)>::new())).unwrap_err();
        assert!(
            err.to_string()
                .contains("KEYGEN_SECRET (or KEYGEN_SECRET_FILE) must be set")
        );
    }
}
