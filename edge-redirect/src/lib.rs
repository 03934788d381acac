//! edge-redirect: the public hot path. `GET|HEAD /{code}` answers the link's
//! redirect from an in-memory cache ([`cache`]) backed by Redis and, when
//! Redis knows nothing, the control plane ([`resolve`]). Invalidations from
//! the control plane arrive over Redis pub/sub ([`invalidate`]).
//!
//! Owns: answering redirects, the hot cache, shipping click events to the
//! Redis stream ([`clicks`]). Must not: depend on Diesel or Rocket, write
//! Redis anything but click events, or wait on anything but a cache miss.

mod batch;
pub mod cache;
pub mod clicks;
pub mod invalidate;
pub mod journal;
pub mod resolve;
pub mod server;
pub mod tally;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use shortener_common::blocklist::BlocklistFile;
use shortener_common::redis_conn::LazyRedis;
use shortener_common::telemetry::LogFormat;
use shortener_common::{ConfigError, Env, Secret};
use tokio::net::TcpListener;

#[derive(Debug, Clone)]
pub struct Config {
    /// `EDGE_HTTP_ADDR`, default `127.0.0.1:8081`: public redirects.
    pub http_addr: SocketAddr,
    /// `EDGE_ADMIN_ADDR`, default `127.0.0.1:9081`: `/healthz`, `/readyz`,
    /// `/metrics`; never routed by the gateway.
    pub admin_addr: SocketAddr,
    /// `REDIS_URL` or `REDIS_URL_FILE`, default `redis://127.0.0.1:6379`.
    pub redis_url: Secret,
    /// `CONTROL_PLANE_URL`, default `http://127.0.0.1:8082`: asked when Redis
    /// has nothing for a code.
    pub control_plane_url: String,
    /// `EDGE_CACHE_CAPACITY`, default 1000000: links kept in memory.
    pub cache_capacity: usize,
    /// `EDGE_CACHE_MAX_AGE_MS`, default 300000: a cached redirect is looked
    /// up again after this long, even without an invalidation.
    pub max_age: Duration,
    /// `EDGE_NEGATIVE_TTL_MS`, default 5000: how long an unknown code is
    /// remembered as unknown.
    pub negative_ttl: Duration,
    /// `EDGE_TRUSTED_PROXIES`, default `127.0.0.1,::1`: peers whose
    /// `X-Forwarded-For` is believed, comma-separated addresses or CIDR
    /// ranges (`10.0.0.0/8`, for a pod network).
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// `EDGE_MAX_CONNECTIONS`, default 10000: open connections per process;
    /// more are closed at once.
    pub max_connections: usize,
    /// `EDGE_HEADER_TIMEOUT_MS`, default 5000: a connection must complete
    /// its next request's headers within this of opening or of its last
    /// answer; it is closed after 1 to 1.25 times this (`server::watchdog`).
    pub header_timeout: Duration,
    /// `EDGE_MAX_HEADER_BYTES`, default 16384.
    pub max_header_bytes: usize,
    /// `EDGE_CLICK_EVENTS`, default `true`: ship one click event per
    /// redirect to the stream; `false` only counts them (for benchmarks and
    /// deployments without analytics).
    pub click_events: bool,
    /// `EDGE_CLICK_QUEUE`, default 5000000: click events held in memory
    /// while Redis is slow or away (over 60 s at the benchmark's 80,000
    /// redirects/s; about 250 bytes each); beyond it the oldest are dropped
    /// and counted in `edge_click_events_dropped_total`.
    pub click_queue: usize,
    /// `EDGE_CLICK_JOURNAL_DIR`, optional: write each click to a journal
    /// file in this directory before answering, so a killed edge loses no
    /// click (the next edge started on the directory ships what is left).
    /// See [`journal`]. Without it clicks wait in memory.
    pub click_journal_dir: Option<PathBuf>,
    /// `EDGE_CLICK_JOURNAL_MAX_BYTES`, default 2147483648 (2 GiB): what the
    /// journal may hold while Redis is away: about 9 million clicks of about
    /// 240 bytes, over 60 s at the benchmark's 80,000 redirects/s; beyond it
    /// the oldest are dropped and counted.
    pub click_journal_max_bytes: u64,
    /// `CLICK_STREAM`, default `clicks`: the Redis stream of click events.
    pub click_stream: String,
    /// `CLICK_STREAM_MAXLEN`, default 10000000: about how many clicks the
    /// stream holds. Entries carry 1 to 100 clicks, so each edge trims the
    /// stream (`MAXLEN ~`) to this many clicks divided by the average it has
    /// been putting in an entry (`batch::StreamLimit`). Clicks the sink has
    /// not read by then are lost, so it bounds the memory Redis gives the
    /// backlog when the sink is down (roughly 200 bytes per click): about
    /// 2 minutes at 80,000 clicks/s, hours at ordinary traffic.
    pub click_stream_max_len: u64,
    /// `BLOCKLIST_FILE`, optional: domains whose links answer 410 (one per
    /// line; see `shortener_common::blocklist`). The control plane reads the
    /// same file to refuse new links to them.
    pub blocklist_file: Option<PathBuf>,
    /// `BLOCKLIST_RELOAD_MS`, default 1000: how often the file is checked
    /// for changes.
    pub blocklist_reload: Duration,
    /// `EDGE_WORKER_THREADS`, default: one per CPU.
    pub worker_threads: Option<usize>,
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
        let control_plane_url =
            env.parse_or("CONTROL_PLANE_URL", "http://127.0.0.1:8082".to_owned());
        let cache_capacity: usize = env.parse_or("EDGE_CACHE_CAPACITY", 1_000_000);
        let max_age_ms: u64 = env.parse_or("EDGE_CACHE_MAX_AGE_MS", 300_000);
        let negative_ms: u64 = env.parse_or("EDGE_NEGATIVE_TTL_MS", 5_000);
        let proxies: String = env.parse_or("EDGE_TRUSTED_PROXIES", "127.0.0.1,::1".to_owned());
        let trusted_proxies = proxies
            .split(',')
            .filter(|p| !p.trim().is_empty())
            .filter_map(|p| {
                let p = p.trim();
                match p
                    .parse::<ipnet::IpNet>()
                    .or_else(|_| p.parse::<IpAddr>().map(ipnet::IpNet::from))
                {
                    Ok(net) => Some(net.trunc()),
                    Err(_) => {
                        env.problem(format!(
                            "EDGE_TRUSTED_PROXIES contains {p:?}, which is neither an IP address nor a CIDR range"
                        ));
                        None
                    }
                }
            })
            .collect();
        let max_connections: usize = env.parse_or("EDGE_MAX_CONNECTIONS", 10_000);
        let header_ms: u64 = env.parse_or("EDGE_HEADER_TIMEOUT_MS", 5_000);
        let max_header_bytes: usize = env.parse_or("EDGE_MAX_HEADER_BYTES", 16_384);
        let click_events: bool = env.parse_or("EDGE_CLICK_EVENTS", true);
        let click_queue: usize = env.parse_or("EDGE_CLICK_QUEUE", 5_000_000);
        let click_journal_dir: Option<PathBuf> = env.parse_opt("EDGE_CLICK_JOURNAL_DIR");
        let click_journal_max_bytes: u64 = env.parse_or("EDGE_CLICK_JOURNAL_MAX_BYTES", 2 << 30);
        let click_stream = env.parse_or("CLICK_STREAM", "clicks".to_owned());
        let click_stream_max_len: u64 = env.parse_or("CLICK_STREAM_MAXLEN", 10_000_000);
        let blocklist_file: Option<PathBuf> = env.parse_opt("BLOCKLIST_FILE");
        let blocklist_reload_ms: u64 = env.parse_or("BLOCKLIST_RELOAD_MS", 1_000);
        let worker_threads: Option<usize> = env.parse_opt("EDGE_WORKER_THREADS");
        let drain_ms: u64 = env.parse_or("SHUTDOWN_DRAIN_MS", 10_000);
        let log_format = env.parse_or("LOG_FORMAT", LogFormat::Text);
        if cache_capacity == 0
            || max_connections == 0
            || click_queue == 0
            || worker_threads == Some(0)
            || click_stream_max_len == 0
        {
            env.problem(
                "EDGE_CACHE_CAPACITY, EDGE_MAX_CONNECTIONS, EDGE_CLICK_QUEUE, CLICK_STREAM_MAXLEN and EDGE_WORKER_THREADS must be at least 1",
            );
        }
        if click_stream.is_empty() {
            env.problem("CLICK_STREAM must not be empty");
        }
        env.finish()?;
        Ok(Self {
            http_addr,
            admin_addr,
            redis_url,
            control_plane_url,
            cache_capacity,
            max_age: Duration::from_millis(max_age_ms),
            negative_ttl: Duration::from_millis(negative_ms),
            trusted_proxies,
            max_connections,
            header_timeout: Duration::from_millis(header_ms),
            max_header_bytes,
            click_events,
            click_queue,
            click_journal_dir,
            click_journal_max_bytes,
            click_stream,
            click_stream_max_len,
            blocklist_file,
            blocklist_reload: Duration::from_millis(blocklist_reload_ms.max(10)),
            worker_threads,
            drain: Duration::from_millis(drain_ms),
            log_format,
        })
    }
}

/// An edge with both listeners bound, ready to run.
pub struct Application {
    public: TcpListener,
    admin: TcpListener,
    edge: Arc<server::Edge>,
    shipper: clicks::Shipper,
    redis_url: String,
    config: Config,
}

impl Application {
    pub async fn build(config: Config) -> anyhow::Result<Self> {
        shortener_common::telemetry::metrics_handle();
        let public = TcpListener::bind(config.http_addr)
            .await
            .with_context(|| format!("cannot listen on EDGE_HTTP_ADDR={}", config.http_addr))?;
        let admin = TcpListener::bind(config.admin_addr)
            .await
            .with_context(|| format!("cannot listen on EDGE_ADMIN_ADDR={}", config.admin_addr))?;
        let redis = LazyRedis::new(config.redis_url.expose())
            .context("REDIS_URL is not a valid Redis URL")?;
        // Clicks get a connection of their own, so a big batch never delays
        // a cache miss's lookup.
        let click_redis = if config.click_events {
            Some(
                LazyRedis::with_response_timeout(config.redis_url.expose(), Duration::from_secs(5))
                    .context("REDIS_URL is not a valid Redis URL")?,
            )
        } else {
            None
        };
        let journal = match (&config.click_journal_dir, config.click_events) {
            (Some(dir), true) => Some(journal::Journal::open(dir).with_context(|| {
                format!("cannot open EDGE_CLICK_JOURNAL_DIR={}", dir.display())
            })?),
            _ => None,
        };
        let (click_queue, shipper) = clicks::ClickQueue::start(
            click_redis,
            journal,
            clicks::ShipperConfig {
                stream: config.click_stream.clone(),
                max_len: config.click_stream_max_len,
                capacity: config.click_queue,
                journal_max_bytes: config.click_journal_max_bytes,
            },
        );
        let cache = cache::Cache::new(config.cache_capacity, config.max_age, config.negative_ttl);
        let blocklist = BlocklistFile::open_watched(
            config.blocklist_file.as_deref(),
            config.blocklist_reload,
            {
                let cache = cache.clone();
                move |list| cache.drop_blocklisted(list)
            },
        )?;
        let edge = Arc::new(server::Edge {
            clicks: click_queue,
            cache,
            resolver: resolve::Resolver::new(redis, config.control_plane_url.clone(), blocklist),
            trusted_proxies: config.trusted_proxies.clone(),
            counters: server::Counters::new(),
        });
        Ok(Self {
            public,
            admin,
            edge,
            shipper,
            redis_url: config.redis_url.expose().to_owned(),
            config,
        })
    }

    pub fn http_port(&self) -> u16 {
        self.public.local_addr().expect("bound").port()
    }

    pub fn admin_port(&self) -> u16 {
        self.admin.local_addr().expect("bound").port()
    }

    pub fn cache(&self) -> Arc<cache::Cache> {
        self.edge.cache.clone()
    }

    /// Serves until `shutdown`, then drains.
    pub async fn run_until(
        self,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let subscriber = tokio::spawn(invalidate::run(
            self.redis_url.clone(),
            self.edge.cache.clone(),
            stop_rx.clone(),
        ));
        let edge = self.edge.clone();
        let mut admin_stop = stop_rx.clone();
        let admin = tokio::spawn(shortener_common::http::serve(
            self.admin,
            move |request| {
                let edge = edge.clone();
                async move { admin(&edge, request).await }
            },
            async move {
                let _ = admin_stop.changed().await;
            },
            Duration::from_secs(1),
        ));
        let limits = server::Limits {
            max_connections: self.config.max_connections,
            header_read_timeout: self.config.header_timeout,
            max_header_bytes: self.config.max_header_bytes,
        };
        let mut public_stop = stop_rx;
        let public = tokio::spawn(server::serve(
            self.public,
            self.edge.clone(),
            limits,
            async move {
                let _ = public_stop.changed().await;
            },
            self.config.drain,
        ));
        shutdown.await;
        tracing::info!("shutting down: draining requests");
        let _ = stop_tx.send(true);
        let _ = public.await;
        // Every request has been answered: ship the clicks still held.
        self.shipper.flush_and_stop(self.config.drain).await;
        let _ = admin.await;
        subscriber.abort();
        Ok(())
    }
}

async fn admin(
    edge: &server::Edge,
    request: http::Request<hyper::body::Incoming>,
) -> http::Response<shortener_common::http::Body> {
    metrics::gauge!("edge_cache_entries").set(edge.cache.len() as f64);
    if request.uri().path() == "/metrics" {
        // The hot path counts per thread; the counters get the sums now.
        edge.counters.publish();
        edge.clicks.publish();
    }
    shortener_common::ops::respond(request, || async {
        match edge
            .resolver
            .redis()
            .run::<String>(&redis::cmd("PING"))
            .await
        {
            Ok(_) => Ok(()),
            Err(_) => Err((
                "degraded",
                "Redis is unreachable: cached links still redirect, misses go to the control plane"
                    .to_owned(),
            )),
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trusted_proxies_are_addresses_or_ranges_and_bad_ones_are_named() {
        let config = Config::from_env(Env::from_pairs([(
            "EDGE_TRUSTED_PROXIES",
            "10.0.0.0/8, 192.0.2.7,fd00::/8".to_owned(),
        )]))
        .unwrap();
        let nets: Vec<ipnet::IpNet> = ["10.0.0.0/8", "192.0.2.7/32", "fd00::/8"]
            .iter()
            .map(|n| n.parse().unwrap())
            .collect();
        assert_eq!(config.trusted_proxies, nets);
        let error = Config::from_env(Env::from_pairs([(
            "EDGE_TRUSTED_PROXIES",
            "10.0.0.0/33,gateway".to_owned(),
        )]))
        .expect_err("bad ranges are refused")
        .to_string();
        assert!(
            error.contains("\"10.0.0.0/33\"") && error.contains("\"gateway\""),
            "{error}"
        );
    }
}
