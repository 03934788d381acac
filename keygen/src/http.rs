//! keygen's HTTP API: `GET /generate-key[?count=N]`, `/healthz`, `/readyz`,
//! `/metrics`.

use std::sync::Arc;
use std::time::Instant;

use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Serialize;
use shortener_common::http::{Body, error, json, text};

use crate::service::{KeyService, MAX_BATCH};

#[derive(Serialize)]
struct OneKey {
    key: String,
}

#[derive(Serialize)]
struct ManyKeys {
    keys: Vec<String>,
}

/// Everything a request handler needs.
#[derive(Clone)]
pub struct HttpState {
    pub service: Arc<KeyService>,
    pub metrics: PrometheusHandle,
}

/// Reads `count` from a query string. `Ok(None)` when absent; other
/// parameters are ignored, as HTTP APIs conventionally do.
pub fn parse_count(query: Option<&str>) -> Result<Option<u32>, String> {
    let mut found = None;
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        if name != "count" {
            continue;
        }
        if found.is_some() {
            return Err("count is given more than once".into());
        }
        let n = value
            .parse::<u32>()
            .ok()
            .filter(|n| (1..=MAX_BATCH).contains(n))
            .ok_or_else(|| {
                format!("count must be a whole number from 1 to {MAX_BATCH}, got {value:?}")
            })?;
        found = Some(n);
    }
    Ok(found)
}

pub async fn handle(state: HttpState, request: Request<Incoming>) -> Response<Body> {
    let started = Instant::now();
    let (route, response) = route(&state, &request).await;
    let status = response.status().as_u16().to_string();
    metrics::counter!("keygen_http_requests_total", "route" => route, "status" => status)
        .increment(1);
    metrics::histogram!("keygen_http_request_duration_seconds", "route" => route)
        .record(started.elapsed().as_secs_f64());
    response
}

async fn route(state: &HttpState, request: &Request<Incoming>) -> (&'static str, Response<Body>) {
    let path = request.uri().path();
    let route = match path {
        "/generate-key" => "/generate-key",
        "/healthz" => "/healthz",
        "/readyz" => "/readyz",
        "/metrics" => "/metrics",
        _ => {
            return (
                "unmatched",
                error(
                    StatusCode::NOT_FOUND,
                    "not_found",
                    format!("no route for {path}"),
                ),
            );
        }
    };
    if request.method() != Method::GET && request.method() != Method::HEAD {
        let mut response = error(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            format!("{route} accepts GET only"),
        );
        response.headers_mut().insert(
            http::header::ALLOW,
            http::HeaderValue::from_static("GET, HEAD"),
        );
        return (route, response);
    }
    let response = match route {
        "/generate-key" => generate(state, request.uri().query()).await,
        "/healthz" => json(StatusCode::OK, &serde_json::json!({"status": "ok"})),
        "/readyz" => match state.service.worker() {
            Some(worker) => json(
                StatusCode::OK,
                &serde_json::json!({"status": "ready", "worker_id": worker}),
            ),
            None => error(
                StatusCode::SERVICE_UNAVAILABLE,
                "no_worker_id",
                "this instance holds no worker id yet",
            ),
        },
        _ => text(
            StatusCode::OK,
            "text/plain; version=0.0.4",
            state.metrics.render(),
        ),
    };
    (route, response)
}

async fn generate(state: &HttpState, query: Option<&str>) -> Response<Body> {
    let count = match parse_count(query) {
        Ok(count) => count,
        Err(message) => return error(StatusCode::BAD_REQUEST, "invalid_count", message),
    };
    match state.service.generate(count.unwrap_or(1)).await {
        Ok((_, mut keys)) => match count {
            None => json(
                StatusCode::OK,
                &OneKey {
                    key: keys.remove(0),
                },
            ),
            Some(_) => json(StatusCode::OK, &ManyKeys { keys }),
        },
        Err(e) => {
            tracing::warn!(error = %e, "cannot issue keys");
            error(StatusCode::SERVICE_UNAVAILABLE, e.code(), e.to_string())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn count_parsing() {
        assert_eq!(parse_count(None), Ok(None));
        assert_eq!(parse_count(Some("")), Ok(None));
        assert_eq!(parse_count(Some("x=1")), Ok(None));
        assert_eq!(parse_count(Some("count=1")), Ok(Some(1)));
        assert_eq!(parse_count(Some("a=b&count=1000")), Ok(Some(1000)));
        for bad in [
            "count=0",
            "count=1001",
            "count=",
            "count",
            "count=-1",
            "count=1e3",
            "count=5&count=6",
            "count=%31",
        ] {
            assert!(parse_count(Some(bad)).is_err(), "{bad} should be rejected");
        }
    }
}
