//! control-plane: the admin API (`POST /shorten`, `/links`, API keys) on
//! PostgreSQL, the source of truth, with Redis kept in sync from it by the
//! outbox relay ([`relay`]).
//!
//! Owns: links and API keys, their validation, the Redis mapping the edge
//! reads, and `/internal/resolve` for the edge. Must not: answer redirects
//! (the edge does), or write Redis except through the relay and resolve.

pub mod auth;
pub mod config;
pub mod db;
pub mod domain;
pub mod error;
pub mod keys;
pub mod relay;
pub mod routes;
pub mod schema;
#[cfg(feature = "test-support")]
pub mod testing;

use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use rocket::fairing::{AdHoc, Fairing, Info, Kind};
use rocket::{Build, Rocket};
use shortener_common::blocklist::BlocklistFile;
use shortener_common::ops::Dependency;

pub use config::Config;
use error::ApiError;

/// Runs blocking database work off the async workers.
pub async fn blocking<T, F>(work: F) -> Result<T, ApiError>
where
    F: FnOnce() -> Result<T, ApiError> + Send + 'static,
    T: Send + 'static,
{
    rocket::tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| ApiError::Internal(format!("blocking task failed: {e}")))?
}

/// What every handler can reach.
pub struct AppState {
    pub pool: db::PgPool,
    pub keys: Arc<keys::KeyPool>,
    pub public_base_url: String,
    pub public_host: String,
    pub relay_kick: Arc<relay::Kick>,
    pub redis: shortener_common::redis_conn::LazyRedis,
    pub keygen_dependency: Dependency,
    /// `BLOCKLIST_FILE`, when set.
    pub blocklist: Option<Arc<BlocklistFile>>,
}

impl AppState {
    /// Refuses a target whose domain is on the blocklist.
    pub fn check_blocklist(&self, url: &str) -> Result<(), ApiError> {
        match &self.blocklist {
            Some(list) if list.current().blocks_url(url) => Err(ApiError::Unprocessable(
                "blocked_domain",
                "links to this domain are not allowed on this shortener".into(),
            )),
            _ => Ok(()),
        }
    }
}

/// Request rate, errors and latency per route (RED).
struct RequestMetrics;

#[rocket::async_trait]
impl Fairing for RequestMetrics {
    fn info(&self) -> Info {
        Info {
            name: "request metrics",
            kind: Kind::Request | Kind::Response,
        }
    }

    async fn on_request(&self, request: &mut rocket::Request<'_>, _: &mut rocket::Data<'_>) {
        request.local_cache(Instant::now);
    }

    async fn on_response<'r>(
        &self,
        request: &'r rocket::Request<'_>,
        response: &mut rocket::Response<'r>,
    ) {
        let started = request.local_cache(Instant::now);
        let route = request
            .route()
            .map_or_else(|| "unmatched".to_owned(), |r| r.uri.path().to_string());
        let method = request.method().as_str();
        metrics::counter!(
            "control_plane_http_requests_total",
            "method" => method, "route" => route.clone(), "status" => response.status().code.to_string()
        )
        .increment(1);
        metrics::histogram!("control_plane_http_request_duration_seconds", "method" => method, "route" => route)
            .record(started.elapsed().as_secs_f64());
    }
}

/// Builds the Rocket application: state, routes, catchers, the relay.
pub fn build(config: &Config) -> anyhow::Result<Rocket<Build>> {
    shortener_common::telemetry::metrics_handle();
    let pool = db::pool(
        config.database_url.expose(),
        config.pool_size,
        config.db_timeout,
    );
    if config.run_migrations {
        let mut conn = pool
            .get()
            .context("RUN_MIGRATIONS=true but PostgreSQL is unreachable")?;
        let applied = db::migrate(&mut conn)?;
        tracing::info!(?applied, "migrations applied");
    }
    // The watcher keeps `current()` fresh; nothing else needs telling.
    let blocklist = BlocklistFile::open_watched(
        config.blocklist_file.as_deref(),
        config.blocklist_reload,
        |_| {},
    )?;
    let relay = relay::Relay::start(pool.clone(), config.redis_url.expose().to_owned());
    let state = Arc::new(AppState {
        pool: pool.clone(),
        keys: keys::KeyPool::new(&config.keygen_url, config.keygen_batch)?,
        public_base_url: config.public_base_url.clone(),
        public_host: config.public_host.clone(),
        relay_kick: relay.kick.clone(),
        redis: shortener_common::redis_conn::LazyRedis::new(config.redis_url.expose())
            .context("REDIS_URL is not a valid Redis URL")?,
        keygen_dependency: Dependency::new("keygen", &config.keygen_url),
        blocklist,
    });
    let api_keys = auth::ApiKeys::new(
        pool,
        config.admin_api_key.as_ref().map(|k| k.expose()),
        config.key_rate_limit,
    );

    let figment = rocket::Config::figment()
        .merge(("address", config.addr.ip()))
        .merge(("port", config.addr.port()))
        .merge(("log_level", rocket::config::LogLevel::Off))
        .merge(("cli_colors", false))
        .merge(("ident", false))
        .merge(("shutdown.grace", config.drain.as_secs().max(1)))
        .merge(("shutdown.mercy", 2));
    let prefill = state.keys.clone();
    let relay = std::sync::Mutex::new(Some(relay));
    Ok(rocket::custom(figment)
        .manage(state)
        .manage(api_keys)
        .attach(RequestMetrics)
        .attach(AdHoc::on_liftoff("lease keys", move |_| {
            Box::pin(async move {
                tracing::info!("control plane is listening");
                rocket::tokio::spawn(async move {
                    let _ = prefill.refill().await;
                });
            })
        }))
        .attach(AdHoc::on_shutdown("stop the outbox relay", move |_| {
            let relay = relay.lock().expect("relay lock").take();
            Box::pin(async move {
                if let Some(mut relay) = relay {
                    let _ = rocket::tokio::task::spawn_blocking(move || relay.stop()).await;
                }
            })
        }))
        .mount(
            "/",
            rocket::routes![
                routes::shorten,
                routes::get_link,
                routes::patch_link,
                routes::delete_link,
                routes::list_links,
                routes::resolve,
                routes::healthz,
                routes::readyz,
                routes::metrics_text,
                routes::openapi,
            ],
        )
        .register("/", rocket::catchers![routes::default_catcher]))
}
