//! control-plane's configuration, from the environment.

use std::net::SocketAddr;
use std::time::Duration;

use shortener_common::telemetry::LogFormat;
use shortener_common::{ConfigError, Env, Secret};

#[derive(Debug, Clone)]
pub struct Config {
    /// `CONTROL_PLANE_ADDR`, default `127.0.0.1:8082`.
    pub addr: SocketAddr,
    /// `DATABASE_URL` or `DATABASE_URL_FILE`, required.
    pub database_url: Secret,
    /// `DATABASE_POOL_SIZE`, default 8: on small machines a few busy
    /// connections beat many waiting ones (see docs/BENCHMARKS.md).
    pub pool_size: u32,
    /// `DATABASE_TIMEOUT_MS`, default 1000: how long a request waits for a
    /// database connection before answering 503.
    pub db_timeout: Duration,
    /// `RUN_MIGRATIONS`, default `false`: migrate at start-up.
    pub run_migrations: bool,
    /// `REDIS_URL` or `REDIS_URL_FILE`, default `redis://127.0.0.1:6379`.
    pub redis_url: Secret,
    /// `KEYGEN_GRPC_URL`, default `http://127.0.0.1:50051`.
    pub keygen_url: String,
    /// `KEYGEN_BATCH`, default 1000 (1 to 1000): codes leased per gRPC call.
    pub keygen_batch: u32,
    /// `PUBLIC_BASE_URL`, default `http://127.0.0.1:8080`: short URLs are
    /// this plus `/` and the code; targets on its host are refused.
    pub public_base_url: String,
    /// The host of `PUBLIC_BASE_URL`.
    pub public_host: String,
    /// `ADMIN_API_KEY` or `ADMIN_API_KEY_FILE`, optional: the bootstrap key.
    pub admin_api_key: Option<Secret>,
    /// `BLOCKLIST_FILE`, optional: links to these domains (one per line,
    /// subdomains included; see `shortener_common::blocklist`) are refused
    /// with 422 `blocked_domain`. The edge reads the same file and answers
    /// 410 for links made before a domain was listed.
    pub blocklist_file: Option<std::path::PathBuf>,
    /// `BLOCKLIST_RELOAD_MS`, default 1000: how often the file is checked
    /// for changes.
    pub blocklist_reload: Duration,
    /// `API_KEY_RATE_LIMIT`, default 100: admin requests per second allowed
    /// to each API key (with bursts of twice that); more answer 429
    /// `rate_limited` with `Retry-After`. 0 turns the limit off. Per
    /// process: with N replicas a key gets up to N times this.
    pub key_rate_limit: u32,
    /// `SHUTDOWN_DRAIN_MS`, default 10000.
    pub drain: Duration,
    /// `LOG_FORMAT`, `text` (default) or `json`.
    pub log_format: LogFormat,
}

impl Config {
    pub fn from_env(mut env: Env) -> Result<Self, ConfigError> {
        let addr = env.parse_or("CONTROL_PLANE_ADDR", ([127, 0, 0, 1], 8082).into());
        let database_url = env.secret_required("DATABASE_URL");
        let pool_size: u32 = env.parse_or("DATABASE_POOL_SIZE", 8);
        let db_timeout_ms: u64 = env.parse_or("DATABASE_TIMEOUT_MS", 1000);
        let run_migrations = env.parse_or("RUN_MIGRATIONS", false);
        let redis_url = env
            .secret_opt("REDIS_URL")
            .unwrap_or_else(|| Secret::new("redis://127.0.0.1:6379"));
        let keygen_url = env.parse_or("KEYGEN_GRPC_URL", "http://127.0.0.1:50051".to_owned());
        let keygen_batch: u32 = env.parse_or("KEYGEN_BATCH", 1000);
        if !(1..=1000).contains(&keygen_batch) {
            env.problem(format!(
                "KEYGEN_BATCH={keygen_batch} is not valid: must be 1 to 1000"
            ));
        }
        if pool_size == 0 {
            env.problem("DATABASE_POOL_SIZE must be at least 1");
        }
        let public_base_url = env
            .parse_or("PUBLIC_BASE_URL", "http://127.0.0.1:8080".to_owned())
            .trim_end_matches('/')
            .to_owned();
        let public_host = match url::Url::parse(&public_base_url) {
            Ok(url) if matches!(url.scheme(), "http" | "https") && url.host_str().is_some() => {
                url.host_str().unwrap_or_default().to_owned()
            }
            _ => {
                env.problem(format!(
                    "PUBLIC_BASE_URL={public_base_url:?} is not valid: must be an http(s) URL with a host"
                ));
                String::new()
            }
        };
        let admin_api_key = env.secret_opt("ADMIN_API_KEY");
        if admin_api_key
            .as_ref()
            .is_some_and(|k| k.expose().len() < 16)
        {
            env.problem("ADMIN_API_KEY must be at least 16 characters");
        }
        let blocklist_file = env.parse_opt("BLOCKLIST_FILE");
        let blocklist_reload_ms: u64 = env.parse_or("BLOCKLIST_RELOAD_MS", 1_000);
        let key_rate_limit: u32 = env.parse_or("API_KEY_RATE_LIMIT", 100);
        let drain_ms: u64 = env.parse_or("SHUTDOWN_DRAIN_MS", 10_000);
        let log_format = env.parse_or("LOG_FORMAT", LogFormat::Text);
        env.finish()?;
        Ok(Self {
            addr,
            database_url: database_url.expect("checked by finish"),
            pool_size,
            db_timeout: Duration::from_millis(db_timeout_ms),
            run_migrations,
            redis_url,
            keygen_url,
            keygen_batch,
            public_base_url,
            public_host,
            admin_api_key,
            blocklist_file,
            blocklist_reload: Duration::from_millis(blocklist_reload_ms.max(10)),
            key_rate_limit,
            drain: Duration::from_millis(drain_ms),
            log_format,
        })
    }
}
