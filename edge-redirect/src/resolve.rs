//! Cache misses: one Redis GET per code however many requests miss on it at
//! once (later ones wait for the first), and the control plane's
//! `/internal/resolve/{code}` when Redis has nothing or is down, so a Redis
//! that lost its keys never turns live links into 404s.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use dashmap::DashMap;
use http::{HeaderValue, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::Deserialize;
use shortener_common::blocklist::BlocklistFile;
use shortener_common::redis_conn::LazyRedis;
use tokio::sync::OnceCell;
use tracing::Instrument;

use crate::cache::{Cache, Target};

/// The JSON the control plane keeps under `link:{code}` and returns from
/// `/internal/resolve/{code}`; a deleted link is `{"deleted":true}`.
#[derive(Deserialize)]
struct Stored {
    url: Option<String>,
    status: Option<u16>,
    expires_at_ms: Option<i64>,
    #[serde(default)]
    disabled: bool,
    #[serde(default)]
    deleted: bool,
}

fn to_target(json: &[u8]) -> Result<Target, LookupError> {
    let stored: Stored = serde_json::from_slice(json).map_err(|_| LookupError::BadMapping)?;
    if stored.deleted {
        return Ok(Target::Missing);
    }
    if stored.disabled {
        return Ok(Target::Disabled);
    }
    let url = stored.url.ok_or(LookupError::BadMapping)?;
    let status = match stored.status {
        Some(s @ (301 | 302 | 307 | 308)) => {
            StatusCode::from_u16(s).map_err(|_| LookupError::BadMapping)?
        }
        _ => return Err(LookupError::BadMapping),
    };
    let location =
        HeaderValue::from_maybe_shared(Bytes::from(url)).map_err(|_| LookupError::BadMapping)?;
    Ok(Target::Redirect {
        status,
        location,
        expires_at_ms: stored.expires_at_ms.unwrap_or(0),
    })
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum LookupError {
    #[error("neither Redis nor the control plane could answer")]
    Unavailable,
    #[error("a stored mapping could not be read")]
    BadMapping,
}

pub struct Resolver {
    redis: LazyRedis,
    blocklist: Option<Arc<BlocklistFile>>,
    control_plane: String,
    http: Client<HttpConnector, Empty<Bytes>>,
    inflight: DashMap<Box<str>, Arc<OnceCell<Result<Target, LookupError>>>>,
}

impl Resolver {
    pub fn new(
        redis: LazyRedis,
        control_plane: String,
        blocklist: Option<Arc<BlocklistFile>>,
    ) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(1)));
        Self {
            redis,
            blocklist,
            control_plane: control_plane.trim_end_matches('/').to_owned(),
            http: Client::builder(TokioExecutor::new()).build(connector),
            inflight: DashMap::new(),
        }
    }

    pub fn redis(&self) -> &LazyRedis {
        &self.redis
    }

    /// Resolves `code`, sharing one lookup among concurrent callers, and
    /// caches the answer before the lookup stops being shared. A caller
    /// that missed the cache just before that answer was cached, and comes
    /// here just after the lookup stopped being shared, starts a new one:
    /// which first reads the cache again, so it finds the answer there and
    /// asks Redis nothing.
    pub async fn lookup(&self, code: &str, cache: &Arc<Cache>) -> Result<Target, LookupError> {
        let cell = self.inflight.entry(code.into()).or_default().clone();
        let mut first = false;
        let result = cell
            .get_or_init(|| {
                first = true;
                async {
                    if let Some(target) = cache.get(code) {
                        return Ok(target);
                    }
                    let epoch = cache.epoch(code);
                    let result = self.fetch(code).await;
                    if let Ok(target) = &result {
                        cache.insert_if_current(code, target.clone(), epoch);
                    }
                    result
                }
            })
            .await
            .clone();
        if first {
            self.inflight.remove(code);
        }
        result
    }

    /// The stored answer, unless its destination is on the blocklist.
    async fn fetch(&self, code: &str) -> Result<Target, LookupError> {
        let target = self.fetch_stored(code).await?;
        if let (Target::Redirect { location, .. }, Some(blocklist)) = (&target, &self.blocklist)
            && blocklist
                .current()
                .blocks_url(location.to_str().unwrap_or_default())
        {
            return Ok(Target::Blocked);
        }
        Ok(target)
    }

    async fn fetch_stored(&self, code: &str) -> Result<Target, LookupError> {
        metrics::counter!("edge_redis_lookups_total").increment(1);
        let key = format!("link:{code}");
        match self
            .redis
            .run::<Option<Vec<u8>>>(redis::cmd("GET").arg(&key))
            .await
        {
            Ok(Some(json)) => return to_target(&json),
            Ok(None) => {}
            Err(error) => {
                metrics::counter!("edge_redis_errors_total").increment(1);
                tracing::debug!(%error, "Redis lookup failed; asking the control plane");
            }
        }
        metrics::counter!("edge_control_plane_fallbacks_total").increment(1);
        self.ask_control_plane(code).await
    }

    async fn ask_control_plane(&self, code: &str) -> Result<Target, LookupError> {
        // Only this slow path is traced (and sampled); hits make no spans.
        let span = tracing::info_span!("edge.resolve", otel.name = "resolve via control plane");
        self.ask_control_plane_traced(code).instrument(span).await
    }

    async fn ask_control_plane_traced(&self, code: &str) -> Result<Target, LookupError> {
        let uri: http::Uri = format!("{}/internal/resolve/{code}", self.control_plane)
            .parse()
            .map_err(|_| LookupError::Unavailable)?;
        let mut request = http::Request::new(Empty::new());
        *request.uri_mut() = uri;
        shortener_common::telemetry::inject_context(request.headers_mut());
        let response = tokio::time::timeout(Duration::from_secs(2), self.http.request(request))
            .await
            .map_err(|_| LookupError::Unavailable)?
            .map_err(|_| LookupError::Unavailable)?;
        match response.status() {
            StatusCode::OK => {
                let body =
                    tokio::time::timeout(Duration::from_secs(2), response.into_body().collect())
                        .await
                        .map_err(|_| LookupError::Unavailable)?
                        .map_err(|_| LookupError::Unavailable)?
                        .to_bytes();
                to_target(&body)
            }
            StatusCode::NOT_FOUND => Ok(Target::Missing),
            _ => Err(LookupError::Unavailable),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_documented_mapping_shapes() {
        assert_eq!(
            to_target(
                br#"{"url":"https://e.com/x","status":307,"expires_at_ms":null,"disabled":false}"#
            )
            .unwrap(),
            Target::Redirect {
                status: StatusCode::TEMPORARY_REDIRECT,
                location: HeaderValue::from_static("https://e.com/x"),
                expires_at_ms: 0
            }
        );
        assert_eq!(
            to_target(br#"{"code":"a","url":"https://e.com","status":302,"expires_at_ms":5,"disabled":true}"#).unwrap(),
            Target::Disabled
        );
        assert_eq!(to_target(br#"{"deleted":true}"#).unwrap(), Target::Missing);
        for bad in [
            &b"nope"[..],
            br#"{"url":"https://e.com","status":200}"#,
            br#"{"status":302}"#,
            b"{\"url\":\"a\\nb\",\"status\":302}",
        ] {
            assert!(to_target(bad).is_err());
        }
    }

    /// A request that missed the cache just before another request's lookup
    /// cached the answer, and arrives once that lookup is no longer shared,
    /// takes the answer from the cache: here Redis and the control plane
    /// are both unreachable, so any lookup would fail.
    #[tokio::test]
    async fn a_lookup_starts_by_reading_the_cache_again() {
        let resolver = Resolver::new(
            LazyRedis::new("redis://127.0.0.1:1").unwrap(),
            "http://127.0.0.1:1".to_owned(),
            None,
        );
        let cache = Cache::new(10, Duration::from_secs(60), Duration::from_secs(5));
        let target = Target::Redirect {
            status: StatusCode::FOUND,
            location: HeaderValue::from_static("https://e.com/cached"),
            expires_at_ms: 0,
        };
        cache.insert("abc", target.clone());
        assert_eq!(resolver.lookup("abc", &cache).await.unwrap(), target);
        assert!(resolver.lookup("other", &cache).await.is_err());
    }
}
