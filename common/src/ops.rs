//! The operations listener every service exposes: `/healthz` (the process
//! answers), `/readyz` (its dependencies are reachable) and `/metrics`
//! (Prometheus text). Services whose product routes are not built yet run
//! only this, so `make up` and orchestrators can still supervise them.

use std::net::SocketAddr;
use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use tokio::net::{TcpListener, TcpStream};

use crate::http::{Body, error, json, text};

/// A dependency checked by `/readyz`: a name and the URL it is reached at.
#[derive(Clone)]
pub struct Dependency {
    pub name: &'static str,
    address: Option<(String, u16)>,
}

impl Dependency {
    /// `url` is only parsed for its host and port; credentials in it are
    /// never kept.
    pub fn new(name: &'static str, url: &str) -> Self {
        Self {
            name,
            address: host_and_port(url),
        }
    }

    pub async fn reachable(&self) -> bool {
        let Some((host, port)) = &self.address else {
            return false;
        };
        matches!(
            tokio::time::timeout(
                Duration::from_millis(500),
                TcpStream::connect((host.as_str(), *port))
            )
            .await,
            Ok(Ok(_))
        )
    }
}

/// The host and port of `scheme://[user[:pass]@]host[:port][/...]`, with the
/// scheme's default port.
pub fn host_and_port(url: &str) -> Option<(String, u16)> {
    let (scheme, rest) = url.split_once("://")?;
    let authority = rest.split(['/', '?', '#']).next()?;
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, hp)| hp);
    let default = match scheme {
        "redis" => 6379,
        "postgres" | "postgresql" => 5432,
        "http" => 80,
        "https" => 443,
        _ => return None,
    };
    let (host, port) = match host_port.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => (h, p.parse().ok()?),
        _ => (host_port, default),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    (!host.is_empty()).then(|| (host.to_owned(), port))
}

/// Why a service is not ready: the stable error code and a message.
pub type NotReady = (&'static str, String);

/// Answers the operations routes; `readiness` decides `/readyz`.
pub async fn respond<F, Fut>(request: Request<Incoming>, readiness: F) -> Response<Body>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Result<(), NotReady>>,
{
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return error(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "only GET is served here",
        );
    }
    match request.uri().path() {
        "/healthz" => json(StatusCode::OK, &serde_json::json!({"status": "ok"})),
        "/readyz" => match readiness().await {
            Ok(()) => json(StatusCode::OK, &serde_json::json!({"status": "ready"})),
            Err((code, message)) => error(StatusCode::SERVICE_UNAVAILABLE, code, message),
        },
        "/metrics" => text(
            StatusCode::OK,
            "text/plain; version=0.0.4",
            crate::telemetry::metrics_handle().render(),
        ),
        path => error(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no route for {path}"),
        ),
    }
}

/// Ready when every dependency accepts a TCP connection.
async fn dependencies_reachable(deps: &[Dependency]) -> Result<(), NotReady> {
    let mut down = Vec::new();
    for dep in deps {
        if !dep.reachable().await {
            down.push(dep.name);
        }
    }
    if down.is_empty() {
        Ok(())
    } else {
        Err((
            "dependency_unavailable",
            format!("unreachable: {}", down.join(", ")),
        ))
    }
}

/// Binds `addr` and serves the operations routes until SIGTERM or Ctrl-C.
pub async fn run(addr: SocketAddr, deps: Vec<Dependency>, drain: Duration) -> std::io::Result<()> {
    crate::telemetry::metrics_handle();
    let listener = TcpListener::bind(addr).await?;
    tracing::info!(%addr, "operations listener is up");
    let deps = std::sync::Arc::new(deps);
    crate::http::serve(
        listener,
        move |request| {
            let deps = deps.clone();
            async move { respond(request, || dependencies_reachable(&deps)).await }
        },
        crate::telemetry::shutdown_signal(),
        drain,
    )
    .await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::host_and_port;

    #[test]
    fn finds_host_and_port_without_keeping_credentials() {
        assert_eq!(
            host_and_port("redis://127.0.0.1:6380"),
            Some(("127.0.0.1".into(), 6380))
        );
        assert_eq!(host_and_port("redis://redis"), Some(("redis".into(), 6379)));
        assert_eq!(
            host_and_port("postgres://app:s3cret@db.internal:5433/shortener?sslmode=disable"),
            Some(("db.internal".into(), 5433))
        );
        assert_eq!(
            host_and_port("http://[::1]:50051"),
            Some(("::1".into(), 50051))
        );
        assert_eq!(
            host_and_port("postgres://u@host/db"),
            Some(("host".into(), 5432))
        );
        assert_eq!(host_and_port("nonsense"), None);
        assert_eq!(host_and_port("ftp://x"), None);
    }
}
