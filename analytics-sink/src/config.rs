//! The sink's configuration, from environment variables. Every bad value is
//! reported at once; `main` exits 64 on any.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use shortener_common::telemetry::LogFormat;
use shortener_common::{ConfigError, Env, Secret};

const MIN_SECRET_LEN: usize = 16;

#[derive(Debug, Clone)]
pub struct Config {
    /// `ANALYTICS_ADDR`, default `127.0.0.1:8084`: the analytics API and
    /// `/healthz`, `/readyz`, `/metrics`.
    pub addr: SocketAddr,
    /// `REDIS_URL` or `REDIS_URL_FILE`, default `redis://127.0.0.1:6379`.
    pub redis_url: Secret,
    /// `CLICKHOUSE_URL`, default `http://127.0.0.1:8123` (HTTP interface).
    pub clickhouse_url: String,
    /// `CLICKHOUSE_DATABASE`, default `shortener`; created by `migrate`.
    pub clickhouse_database: String,
    /// `CLICKHOUSE_USER`, default `default`.
    pub clickhouse_user: String,
    /// `CLICKHOUSE_PASSWORD` or `CLICKHOUSE_PASSWORD_FILE`, default empty.
    pub clickhouse_password: Option<Secret>,
    /// `CONTROL_PLANE_URL`, default `http://127.0.0.1:8082`: checks the
    /// caller's API key and that the link exists.
    pub control_plane_url: String,
    /// `CLICK_STREAM`, default `clicks`: the stream the edges write.
    pub stream: String,
    /// `CLICK_DEAD_LETTER_STREAM`, default `clicks-dead`: entries that are not
    /// valid click events, or that ClickHouse refuses as data, with the
    /// reason.
    pub dead_letter_stream: String,
    /// `SINK_GROUP`, default `analytics-sink`: the consumer group; every
    /// instance in one group shares the work.
    pub group: String,
    /// `SINK_CONSUMER`, default the host name: this instance's name in the
    /// group. Must be unique among running instances and stable across
    /// restarts (a restarted instance first finishes its own pending
    /// entries).
    pub consumer: String,
    /// `SINK_BATCH_SIZE`, default 50000: rows per ClickHouse insert at most
    /// (bigger inserts cost ClickHouse less per row; the age bounds latency).
    pub batch_size: usize,
    /// `SINK_BATCH_AGE_MS`, default 1000: a partial batch is inserted once
    /// its oldest row waited this long.
    pub batch_age: Duration,
    /// `SINK_CLAIM_IDLE_MS`, default 60000: entries another instance has held
    /// unacknowledged this long are claimed (that instance is taken for
    /// dead).
    pub claim_idle: Duration,
    /// `GEOIP_DB`, optional: a MaxMind-format country database; without it
    /// countries are empty.
    pub geoip_db: Option<PathBuf>,
    /// `STORE_RAW_IP`, default `false`: keep visitor addresses in
    /// `clicks.ip`. Off, only the daily-salted visitor hash is kept.
    pub store_raw_ip: bool,
    /// `ANALYTICS_VISITOR_SECRET` or `..._FILE`, required, 16+ bytes: keys
    /// the visitor hash. All instances must share it.
    pub visitor_secret: Secret,
    /// `SHUTDOWN_DRAIN_MS`, default 10000.
    pub drain: Duration,
    /// `LOG_FORMAT`, `text` (default) or `json`.
    pub log_format: LogFormat,
}

fn host_name() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|h| h.trim().to_owned())
                .filter(|h| !h.is_empty())
        })
        .unwrap_or_else(|| "analytics-sink".to_owned())
}

impl Config {
    pub fn from_env(mut env: Env) -> Result<Self, ConfigError> {
        let addr = env.parse_or("ANALYTICS_ADDR", ([127, 0, 0, 1], 8084).into());
        let redis_url = env
            .secret_opt("REDIS_URL")
            .unwrap_or_else(|| Secret::new("redis://127.0.0.1:6379"));
        let clickhouse_url = env.parse_or("CLICKHOUSE_URL", "http://127.0.0.1:8123".to_owned());
        let clickhouse_database = env.parse_or("CLICKHOUSE_DATABASE", "shortener".to_owned());
        let clickhouse_user = env.parse_or("CLICKHOUSE_USER", "default".to_owned());
        let clickhouse_password = env.secret_opt("CLICKHOUSE_PASSWORD");
        let control_plane_url =
            env.parse_or("CONTROL_PLANE_URL", "http://127.0.0.1:8082".to_owned());
        let stream = env.parse_or("CLICK_STREAM", "clicks".to_owned());
        let dead_letter_stream = env.parse_or("CLICK_DEAD_LETTER_STREAM", "clicks-dead".to_owned());
        let group = env.parse_or("SINK_GROUP", "analytics-sink".to_owned());
        let consumer = env.parse_or("SINK_CONSUMER", host_name());
        let batch_size: usize = env.parse_or("SINK_BATCH_SIZE", 50_000);
        let batch_age_ms: u64 = env.parse_or("SINK_BATCH_AGE_MS", 1_000);
        let claim_idle_ms: u64 = env.parse_or("SINK_CLAIM_IDLE_MS", 60_000);
        let geoip_db: Option<PathBuf> = env.parse_opt("GEOIP_DB");
        let store_raw_ip: bool = env.parse_or("STORE_RAW_IP", false);
        let visitor_secret = env.secret_required("ANALYTICS_VISITOR_SECRET");
        if let Some(s) = &visitor_secret
            && s.expose().len() < MIN_SECRET_LEN
        {
            env.problem(format!(
                "ANALYTICS_VISITOR_SECRET must be at least {MIN_SECRET_LEN} bytes long"
            ));
        }
        let drain_ms: u64 = env.parse_or("SHUTDOWN_DRAIN_MS", 10_000);
        let log_format = env.parse_or("LOG_FORMAT", LogFormat::Text);

        if !(1..=1_000_000).contains(&batch_size) {
            env.problem("SINK_BATCH_SIZE must be from 1 to 1000000");
        }
        if !(1..=60_000).contains(&batch_age_ms) {
            env.problem("SINK_BATCH_AGE_MS must be from 1 to 60000");
        }
        if claim_idle_ms < 1_000 {
            env.problem("SINK_CLAIM_IDLE_MS must be at least 1000");
        }
        // A batch must be stored well within the claim idle time, or another
        // sink would claim entries this one is still working on.
        if batch_age_ms.saturating_mul(4) > claim_idle_ms {
            env.problem("SINK_BATCH_AGE_MS must be at most a quarter of SINK_CLAIM_IDLE_MS");
        }
        for (name, value) in [
            ("CLICK_STREAM", &stream),
            ("CLICK_DEAD_LETTER_STREAM", &dead_letter_stream),
            ("SINK_GROUP", &group),
            ("SINK_CONSUMER", &consumer),
        ] {
            if value.is_empty() {
                env.problem(format!("{name} must not be empty"));
            }
        }
        if clickhouse_database.is_empty()
            || !clickhouse_database
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_')
        {
            env.problem("CLICKHOUSE_DATABASE must be letters, digits and underscores");
        }
        if let Some(path) = &geoip_db
            && !path.is_file()
        {
            env.problem(format!(
                "GEOIP_DB={} is not a readable file",
                path.display()
            ));
        }
        env.finish()?;
        Ok(Self {
            addr,
            redis_url,
            clickhouse_url,
            clickhouse_database,
            clickhouse_user,
            clickhouse_password,
            control_plane_url,
            stream,
            dead_letter_stream,
            group,
            consumer,
            batch_size,
            batch_age: Duration::from_millis(batch_age_ms),
            claim_idle: Duration::from_millis(claim_idle_ms),
            geoip_db,
            store_raw_ip,
            visitor_secret: visitor_secret.expect("checked above"),
            drain: Duration::from_millis(drain_ms),
            log_format,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_bad_value_is_reported_at_once() {
        let err = Config::from_env(Env::from_pairs([
            ("SINK_BATCH_SIZE", "0"),
            ("SINK_BATCH_AGE_MS", "soon"),
            ("ANALYTICS_VISITOR_SECRET", "short"),
            ("CLICKHOUSE_DATABASE", "a;b"),
            ("GEOIP_DB", "/nonexistent/db.mmdb"),
        ]))
        .unwrap_err()
        .to_string();
        for name in [
            "SINK_BATCH_SIZE",
            "SINK_BATCH_AGE_MS",
            "ANALYTICS_VISITOR_SECRET",
            "CLICKHOUSE_DATABASE",
            "GEOIP_DB",
        ] {
            assert!(err.contains(name), "{name} not reported in: {err}");
        }
    }

    #[test]
    fn defaults_need_only_the_secret() {
        let config = Config::from_env(Env::from_pairs([(
            "ANALYTICS_VISITOR_SECRET",
            "0123456789abcdef",
        )]))
        .unwrap();
        assert_eq!(config.addr.port(), 8084);
        assert_eq!(config.batch_age, Duration::from_secs(1));
        assert_eq!(config.stream, "clicks");
        assert!(!config.store_raw_ip);
        assert!(format!("{config:?}").contains("[redacted]"));
    }
}
