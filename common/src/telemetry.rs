//! Logging, traces and metrics set-up shared by the services.
//!
//! Logs go to stderr through `tracing`; `LOG_FORMAT=json` switches to one JSON
//! object per line for log shippers, anything else (default `text`) is the
//! human format. `RUST_LOG` filters as usual (default `info`).

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::EnvFilter;

/// `LOG_FORMAT` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "text" => Ok(Self::Text),
            "json" => Ok(Self::Json),
            other => Err(format!("expected `text` or `json`, got {other:?}")),
        }
    }
}

/// Installs the global subscriber. Safe to call more than once (later calls
/// are ignored), which in-process tests rely on.
pub fn init_logging(format: LogFormat) {
    let _ = install(format, None);
}

/// `OTEL_EXPORTER_OTLP_ENDPOINT`: where spans go (OTLP over gRPC, e.g.
/// `http://otel-collector:4317`). Unset or empty: tracing is off and costs
/// nothing beyond the log subscriber.
pub const ENV_OTLP_ENDPOINT: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";
/// `OTEL_TRACES_SAMPLER_ARG`: the share of traces started here that are
/// kept (0 to 1); each service passes its own default. A trace started
/// upstream keeps the upstream decision (parent-based sampling).
pub const ENV_SAMPLE_RATIO: &str = "OTEL_TRACES_SAMPLER_ARG";

/// Logging plus, when [`ENV_OTLP_ENDPOINT`] is set, OpenTelemetry traces.
/// Dropping it flushes the spans not yet exported.
pub struct Telemetry {
    provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
    // The exporter's gRPC connection lives on this runtime, so tracing works
    // the same whatever runtime (or none) the service uses.
    runtime: Option<tokio::runtime::Runtime>,
}

impl Telemetry {
    /// Whether spans are exported.
    pub fn tracing(&self) -> bool {
        self.provider.is_some()
    }

    /// Exports the spans ended so far now, not at the next batch.
    pub fn flush(&self) {
        if let Some(provider) = &self.provider {
            let _ = provider.force_flush();
        }
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take() {
            let _ = provider.shutdown();
        }
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// Logging for `service`, and OTLP traces when the environment asks for
/// them, sampled at `default_ratio` unless [`ENV_SAMPLE_RATIO`] says
/// otherwise. Errors (a malformed endpoint) are reported and tracing stays
/// off; the service runs either way.
pub fn init(service: &'static str, format: LogFormat, default_ratio: f64) -> Telemetry {
    let endpoint = std::env::var(ENV_OTLP_ENDPOINT)
        .ok()
        .filter(|e| !e.trim().is_empty());
    let ratio = std::env::var(ENV_SAMPLE_RATIO)
        .ok()
        .and_then(|r| r.parse::<f64>().ok())
        .filter(|r| (0.0..=1.0).contains(r))
        .unwrap_or(default_ratio);
    init_with(service, format, ratio, endpoint)
}

/// [`init`] with the endpoint and ratio given rather than read from the
/// environment (tests that play a service in-process use it).
pub fn init_with(
    service: &'static str,
    format: LogFormat,
    ratio: f64,
    endpoint: Option<String>,
) -> Telemetry {
    let Some(endpoint) = endpoint else {
        let _ = install(format, None);
        return Telemetry {
            provider: None,
            runtime: None,
        };
    };
    match tracer_provider(service, &endpoint, ratio) {
        Ok((provider, runtime)) => {
            use opentelemetry::trace::TracerProvider as _;
            opentelemetry::global::set_text_map_propagator(
                opentelemetry_sdk::propagation::TraceContextPropagator::new(),
            );
            use tracing_subscriber::Layer;
            // Our own spans only: the libraries' internal spans (HTTP/2
            // frames, connection pools) would drown a trace.
            let ours = EnvFilter::new(
                "info,h2=off,hyper=off,hyper_util=off,tonic=off,tower=off,rocket=off,reqwest=off",
            );
            let layer = tracing_opentelemetry::layer()
                .with_tracer(provider.tracer(service))
                .with_filter(ours)
                .boxed();
            let _ = install(format, Some(layer));
            tracing::info!(%endpoint, ratio, "exporting traces over OTLP");
            Telemetry {
                provider: Some(provider),
                runtime: Some(runtime),
            }
        }
        Err(error) => {
            let _ = install(format, None);
            tracing::error!(%error, %endpoint, "cannot set up OTLP tracing; running without it");
            Telemetry {
                provider: None,
                runtime: None,
            }
        }
    }
}

type BoxedLayer = Box<dyn tracing_subscriber::Layer<tracing_subscriber::Registry> + Send + Sync>;

fn install(
    format: LogFormat,
    traces: Option<BoxedLayer>,
) -> Result<(), tracing_subscriber::util::TryInitError> {
    use tracing_subscriber::Layer;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // RUST_LOG filters the logs; spans have their own filter (see `init`).
    let logs: BoxedLayer = match format {
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_writer(std::io::stderr)
            .with_filter(filter)
            .boxed(),
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_filter(filter)
            .boxed(),
    };
    let mut layers = vec![logs];
    layers.extend(traces);
    tracing_subscriber::registry().with(layers).try_init()
}

fn tracer_provider(
    service: &'static str,
    endpoint: &str,
    ratio: f64,
) -> anyhow_like::Result<(
    opentelemetry_sdk::trace::SdkTracerProvider,
    tokio::runtime::Runtime,
)> {
    use opentelemetry_otlp::WithExportConfig;
    use opentelemetry_sdk::trace::Sampler;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("otlp-export")
        .enable_all()
        .build()?;
    // The exporter's channel attaches to the runtime it is made in; entering
    // (not blocking on) it works from inside another runtime too.
    let exporter = {
        let _inside = runtime.enter();
        opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint)
            .with_timeout(std::time::Duration::from_secs(5))
            .build()?
    };
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
            ratio,
        ))))
        .with_resource(
            opentelemetry_sdk::Resource::builder()
                .with_service_name(service)
                .build(),
        )
        .build();
    Ok((provider, runtime))
}

/// Tiny error plumbing so this crate needs no `anyhow`.
mod anyhow_like {
    pub type Result<T> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;
}

/// W3C trace context (`traceparent`, `tracestate`) of the current span,
/// written into outgoing request headers. Nothing is written when tracing
/// is off or the span is not sampled.
pub fn inject_context(headers: &mut http::HeaderMap) {
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    let context = tracing::Span::current().context();
    opentelemetry::global::get_text_map_propagator(|propagator| {
        propagator.inject_context(&context, &mut HeaderInjector(headers));
    });
}

/// Makes `span` a child of the trace context in incoming `headers`, if any.
pub fn set_parent_from(span: &tracing::Span, headers: &http::HeaderMap) {
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    if !headers.contains_key("traceparent") {
        return;
    }
    let parent = opentelemetry::global::get_text_map_propagator(|propagator| {
        propagator.extract(&HeaderExtractor(headers))
    });
    let _ = span.set_parent(parent);
}

struct HeaderInjector<'a>(&'a mut http::HeaderMap);

impl opentelemetry::propagation::Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(name), Ok(value)) = (
            http::HeaderName::from_bytes(key.as_bytes()),
            http::HeaderValue::from_str(&value),
        ) {
            self.0.insert(name, value);
        }
    }
}

struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl opentelemetry::propagation::Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

/// Installs the process-wide Prometheus recorder, once, and returns the handle
/// that renders `/metrics`. Tests that build several apps in one process get
/// the same handle each time.
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: std::sync::OnceLock<PrometheusHandle> = std::sync::OnceLock::new();
    HANDLE
        .get_or_init(|| {
            PrometheusBuilder::new()
                .install_recorder()
                .expect("no other metrics recorder is installed")
        })
        .clone()
}

/// Completes on SIGTERM or Ctrl-C, the signals that ask a service to drain
/// and stop.
pub async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                tracing::error!(%error, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = terminate => {}
    }
}
