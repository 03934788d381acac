use shortener_common::config::EXIT_CONFIG;
use shortener_common::{Env, telemetry};

// mimalloc: far cheaper than glibc malloc for the many short-lived buffers of
// a batch or a request, and less memory per small allocation.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    let config = edge_redirect::Config::from_env(Env::from_process()).unwrap_or_else(|err| {
        eprintln!("edge-redirect: {err}");
        std::process::exit(EXIT_CONFIG);
    });
    // Traces are sampled: 1 % of the misses that reach the control plane by
    // default (`OTEL_TRACES_SAMPLER_ARG`); hits make no spans at all.
    let _telemetry = telemetry::init("edge-redirect", config.log_format, 0.01);
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if let Some(threads) = config.worker_threads {
        runtime.worker_threads(threads);
    }
    runtime.enable_all().build()?.block_on(async {
        let app = edge_redirect::Application::build(config).await?;
        tracing::info!(
            http_port = app.http_port(),
            admin_port = app.admin_port(),
            "edge is listening"
        );
        app.run_until(telemetry::shutdown_signal()).await
    })
}
