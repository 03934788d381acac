//! The sink's HTTP listener: `GET /analytics/{code}` and the operations
//! routes (`/healthz`, `/readyz`, `/metrics`).
//!
//! Authorization is the control plane's: the caller's `Authorization` header
//! is passed to `GET /links/{code}` there, which answers 401 for a bad key and
//! 404 for an unknown link, so both services agree on keys and on what
//! exists, and the sink keeps no key store of its own.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::Empty;
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use shortener_common::http::{Body, error, json};
use shortener_common::redis_conn::LazyRedis;

use crate::report::{Range, report};
use crate::store::Store;

pub struct Api {
    pub store: Store,
    pub redis: LazyRedis,
    pub control_plane: String,
    http: Client<HttpConnector, Empty<Bytes>>,
}

/// What the control plane said about a caller and a code.
enum Access {
    Granted,
    Denied(Response<Body>),
}

impl Api {
    pub fn new(store: Store, redis: LazyRedis, control_plane: String) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(Duration::from_secs(1)));
        connector.set_nodelay(true);
        Self {
            store,
            redis,
            control_plane: control_plane.trim_end_matches('/').to_owned(),
            http: Client::builder(TokioExecutor::new()).build(connector),
        }
    }

    pub async fn handle(self: Arc<Self>, request: Request<Incoming>) -> Response<Body> {
        let started = Instant::now();
        let path = request.uri().path().to_owned();
        let Some(code) = path.strip_prefix("/analytics/") else {
            let api = self.clone();
            return shortener_common::ops::respond(
                request,
                || async move { api.readiness().await },
            )
            .await;
        };
        let response = self.analytics(code, &request).await;
        metrics::histogram!("analytics_sink_http_request_duration_seconds", "route" => "/analytics/{code}", "status" => response.status().as_str().to_owned())
            .record(started.elapsed().as_secs_f64());
        response
    }

    async fn readiness(&self) -> Result<(), shortener_common::ops::NotReady> {
        let redis_up = self.redis.run::<String>(&redis::cmd("PING")).await.is_ok();
        let clickhouse_up = self.store.ping().await;
        match (redis_up, clickhouse_up) {
            (true, true) => Ok(()),
            (r, c) => {
                let down: Vec<&str> = [(!r).then_some("redis"), (!c).then_some("clickhouse")]
                    .into_iter()
                    .flatten()
                    .collect();
                Err((
                    "dependency_unavailable",
                    format!("unreachable: {}", down.join(", ")),
                ))
            }
        }
    }

    async fn analytics(&self, code: &str, request: &Request<Incoming>) -> Response<Body> {
        if request.method() != Method::GET && request.method() != Method::HEAD {
            let mut response = error(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "analytics are read with GET",
            );
            response
                .headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
            return response;
        }
        let Some(authorization) = request.headers().get(header::AUTHORIZATION) else {
            return unauthorized();
        };
        let valid_code = (1..=64).contains(&code.len())
            && code
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        let range = parse_range(request.uri().query().unwrap_or(""));
        // The key is checked before anything else is said, so a caller
        // without a valid key learns nothing about codes or parameters.
        let link = (valid_code && range.is_ok()).then_some(code);
        match self.authorize(link, authorization).await {
            Access::Granted => {}
            Access::Denied(response) => return response,
        }
        if !valid_code {
            return error(
                StatusCode::NOT_FOUND,
                "link_not_found",
                "no link has this code",
            );
        }
        let range = match range {
            Ok(range) => range,
            Err(message) => return error(StatusCode::BAD_REQUEST, "invalid_range", message),
        };
        match tokio::time::timeout(REPORT_TIMEOUT, report(&self.store, code, range)).await {
            Ok(Ok(report)) => json(StatusCode::OK, &report),
            Ok(Err(e)) => {
                tracing::warn!(code, error = %e, "cannot read analytics");
                error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "analytics_unavailable",
                    "the analytics store is unavailable; try again shortly",
                )
            }
            Err(_) => {
                tracing::warn!(code, "analytics query timed out");
                error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "analytics_unavailable",
                    "the analytics store did not answer in time; try again shortly",
                )
            }
        }
    }

    /// Asks the control plane whether the key is valid and, given a code,
    /// whether that link exists (`GET /links/{code}`; without a code only the
    /// key is checked, with `GET /links?limit=1`).
    async fn authorize(&self, code: Option<&str>, authorization: &HeaderValue) -> Access {
        let path = match code {
            Some(code) => format!("/links/{code}"),
            None => "/links?limit=1".to_owned(),
        };
        let Ok(uri) = format!("{}{path}", self.control_plane).parse::<http::Uri>() else {
            return Access::Denied(error(
                StatusCode::NOT_FOUND,
                "link_not_found",
                "no link has this code",
            ));
        };
        let mut ask = Request::new(Empty::new());
        *ask.uri_mut() = uri;
        ask.headers_mut()
            .insert(header::AUTHORIZATION, authorization.clone());
        let status =
            match tokio::time::timeout(Duration::from_secs(3), self.http.request(ask)).await {
                Ok(Ok(response)) => {
                    let status = response.status();
                    // Read the (small) body so the connection can be reused.
                    let _ = tokio::time::timeout(
                        Duration::from_secs(1),
                        http_body_util::BodyExt::collect(response.into_body()),
                    )
                    .await;
                    status
                }
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "cannot reach the control plane to check a key");
                    StatusCode::SERVICE_UNAVAILABLE
                }
                Err(_) => StatusCode::SERVICE_UNAVAILABLE,
            };
        match status {
            StatusCode::OK => Access::Granted,
            StatusCode::UNAUTHORIZED => Access::Denied(unauthorized()),
            StatusCode::FORBIDDEN => Access::Denied(error(
                StatusCode::FORBIDDEN,
                "forbidden",
                "this API key may not read this link's analytics",
            )),
            StatusCode::NOT_FOUND => Access::Denied(error(
                StatusCode::NOT_FOUND,
                "link_not_found",
                "no link has this code",
            )),
            StatusCode::TOO_MANY_REQUESTS => Access::Denied(error(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                "too many requests for this API key",
            )),
            other => {
                tracing::warn!(status = %other, "the control plane could not check a key");
                Access::Denied(error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "control_plane_unavailable",
                    "cannot check the API key right now; try again shortly",
                ))
            }
        }
    }
}

/// `from` and `to` from a query string (other parameters are ignored).
fn parse_range(query: &str) -> Result<Range, String> {
    let mut from = None;
    let mut to = None;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let slot = match name {
            "from" => &mut from,
            "to" => &mut to,
            _ => continue,
        };
        if slot.is_some() {
            return Err(format!("{name} is given more than once"));
        }
        *slot = Some(percent_decode(value));
    }
    Range::parse(from.as_deref(), to.as_deref())
}

/// 401 with the shared body and `WWW-Authenticate: Bearer`.
fn unauthorized() -> Response<Body> {
    let mut response = error(
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        "a valid API key is required: Authorization: Bearer <key>",
    );
    response
        .headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    response
}

/// Longest an analytics query may take before the answer is 503.
const REPORT_TIMEOUT: Duration = Duration::from_secs(10);

/// Decodes `%XX` in a query value. A `+` stays a `+`: timestamps such as
/// `2026-11-30T13:00:00+01:00` are often sent unencoded, and no valid value
/// contains a space.
fn percent_decode(value: &str) -> String {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                match std::str::from_utf8(&bytes[i + 1..i + 3])
                    .ok()
                    .and_then(|hex| u8::from_str_radix(hex, 16).ok())
                {
                    Some(b) => {
                        out.push(b);
                        i += 3;
                        continue;
                    }
                    None => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::percent_decode;

    #[test]
    fn query_values_are_decoded() {
        assert_eq!(
            percent_decode("2026-11-30T13%3A00%3A00%2B01%3A00"),
            "2026-11-30T13:00:00+01:00"
        );
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz"), "%zz");
        assert_eq!(percent_decode("13:00+01:00"), "13:00+01:00");
    }
}
