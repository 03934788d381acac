//! analytics-sink: reads click events from the Redis stream with a consumer
//! group, enriches and batches them into ClickHouse ([`consumer`]), and
//! serves `GET /analytics/{code}` ([`api`], [`report`]).
//!
//! Owns: the ClickHouse schema (`migrations/clickhouse/`, [`store`]), the
//! click stream's consumer group and dead-letter stream. Must not: write
//! links or keys, or count an event twice.

pub mod api;
pub mod config;
pub mod consumer;
pub mod enrich;
pub mod report;
pub mod store;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
pub use config::Config;
use shortener_common::redis_conn::LazyRedis;
use tokio::net::TcpListener;

/// A client for the configured ClickHouse (row validation off until
/// [`store::Store::detect`]).
fn store_for(config: &Config) -> store::Store {
    store::Store::new(
        &config.clickhouse_url,
        &config.clickhouse_database,
        &config.clickhouse_user,
        config.clickhouse_password.as_ref().map(|p| p.expose()),
    )
}

/// The store for `config`, with row validation set for its server.
pub async fn connect_store(config: &Config) -> anyhow::Result<store::Store> {
    let mut store = store_for(config);
    let version = store
        .detect()
        .await
        .with_context(|| format!("cannot reach ClickHouse at {}", config.clickhouse_url))?;
    tracing::info!(%version, "connected to ClickHouse");
    Ok(store)
}

/// Applies the ClickHouse migrations (`analytics-sink migrate`).
pub async fn migrate(config: &Config) -> anyhow::Result<Vec<u32>> {
    let store = connect_store(config).await?;
    let applied = store
        .migrate()
        .await
        .context("ClickHouse migration failed")?;
    Ok(applied)
}

/// A sink with its listener bound, ready to run.
pub struct Application {
    listener: TcpListener,
    api: Arc<api::Api>,
    config: Config,
    enricher: enrich::Enricher,
}

impl Application {
    /// Binds the listener and opens the country database. ClickHouse may be
    /// down: the store is reached lazily, and the pipeline retries.
    pub async fn build(config: Config) -> anyhow::Result<Self> {
        shortener_common::telemetry::metrics_handle();
        let listener = TcpListener::bind(config.addr)
            .await
            .with_context(|| format!("cannot listen on ANALYTICS_ADDR={}", config.addr))?;
        let mut store = store_for(&config);
        match store.detect().await {
            Ok(version) => tracing::info!(%version, "connected to ClickHouse"),
            Err(error) => {
                tracing::warn!(%error, "ClickHouse is unreachable at start-up; row validation stays off")
            }
        }
        let geo = match &config.geoip_db {
            Some(path) => Some(Arc::new(enrich::Geo::open(path).with_context(|| {
                format!("GEOIP_DB={} is not a MaxMind database", path.display())
            })?)),
            None => None,
        };
        let enricher = enrich::Enricher::new(
            geo,
            config.visitor_secret.expose().as_bytes(),
            config.store_raw_ip,
        );
        let redis = LazyRedis::new(config.redis_url.expose())
            .context("REDIS_URL is not a valid Redis URL")?;
        let api = Arc::new(api::Api::new(
            store,
            redis,
            config.control_plane_url.clone(),
        ));
        Ok(Self {
            listener,
            api,
            config,
            enricher,
        })
    }

    pub fn port(&self) -> u16 {
        self.listener.local_addr().expect("bound").port()
    }

    /// Consumes and serves until `shutdown`, then drains: requests in flight
    /// finish, and the batch in hand is stored if ClickHouse allows within
    /// the drain period (otherwise its entries stay pending for the next
    /// run).
    pub async fn run_until(
        self,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let Self {
            listener,
            api,
            config,
            enricher,
        } = self;
        let config = Arc::new(config);
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        // One click per entry until a read says otherwise.
        let clicks_per_entry = consumer::ClicksPerEntry::new(1000.into());
        let pipeline = consumer::start(
            config.redis_url.expose(),
            api.store.clone(),
            enricher,
            config.clone(),
            clicks_per_entry.clone(),
            stop_rx.clone(),
        )?;
        let lag = tokio::spawn(report_lag(
            api.clone(),
            config.clone(),
            clicks_per_entry,
            stop_rx.clone(),
        ));
        let serving = api.clone();
        let mut http_stop = stop_rx;
        let http = tokio::spawn(shortener_common::http::serve(
            listener,
            move |request| serving.clone().handle(request),
            async move {
                let _ = http_stop.changed().await;
            },
            config.drain,
        ));
        shutdown.await;
        tracing::info!("shutting down: finishing the batch in hand");
        let _ = stop_tx.send(true);
        if tokio::time::timeout(config.drain, pipeline).await.is_err() {
            tracing::warn!("the batch in hand was not stored in time; its events stay pending");
        }
        let _ = http.await;
        lag.abort();
        Ok(())
    }
}

/// Publishes the consumer group's lag and pending count every few seconds,
/// over the API's Redis connection. Redis counts stream entries; a packed
/// entry holds up to 100 clicks, so both are turned into clicks with the
/// clicks per entry of the sink's recent reads (an estimate).
async fn report_lag(
    api: Arc<api::Api>,
    config: Arc<Config>,
    clicks_per_entry: consumer::ClicksPerEntry,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let (redis, stream, group) = (&api.redis, &config.stream, &config.group);
    let lag_gauge = metrics::gauge!("analytics_sink_lag_events");
    let pending_gauge = metrics::gauge!("analytics_sink_pending_events");
    loop {
        let groups: redis::RedisResult<Vec<std::collections::HashMap<String, redis::Value>>> =
            redis
                .run(redis::cmd("XINFO").arg("GROUPS").arg(stream))
                .await;
        if let Ok(groups) = groups {
            for g in groups {
                let name: Option<String> = g
                    .get("name")
                    .and_then(|v| redis::from_redis_value_ref(v).ok());
                if name.as_deref() != Some(group.as_str()) {
                    continue;
                }
                let per_entry =
                    clicks_per_entry.load(std::sync::atomic::Ordering::Relaxed) as f64 / 1000.0;
                let number = |key: &str| -> Option<f64> {
                    g.get(key)
                        .and_then(|v| redis::from_redis_value_ref::<i64>(v).ok())
                        .map(|n| (n as f64 * per_entry).round())
                };
                if let Some(lag) = number("lag") {
                    lag_gauge.set(lag);
                }
                if let Some(pending) = number("pending") {
                    pending_gauge.set(pending);
                }
            }
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(2)) => {}
            _ = stop.changed() => return,
        }
    }
}
