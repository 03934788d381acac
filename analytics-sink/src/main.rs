use clap::{Parser, Subcommand};
use shortener_common::config::EXIT_CONFIG;
use shortener_common::{Env, telemetry};

// mimalloc: far cheaper than glibc malloc for the many short-lived buffers of
// a batch or a request, and less memory per small allocation.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "analytics-sink",
    about = "Stores click events in ClickHouse and serves per-link analytics"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Consume click events and serve the analytics API (the default).
    Serve,
    /// Create the ClickHouse database and apply its migrations, then exit.
    Migrate,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let config = analytics_sink::Config::from_env(Env::from_process()).unwrap_or_else(|err| {
        eprintln!("analytics-sink: {err}");
        std::process::exit(EXIT_CONFIG);
    });
    let _telemetry = telemetry::init("analytics-sink", config.log_format, 1.0);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => runtime.block_on(async {
            let app = analytics_sink::Application::build(config).await?;
            tracing::info!(port = app.port(), "analytics-sink is listening");
            app.run_until(telemetry::shutdown_signal()).await
        }),
        Command::Migrate => runtime.block_on(async {
            let applied = analytics_sink::migrate(&config).await?;
            tracing::info!(?applied, "ClickHouse schema is up to date");
            Ok(())
        }),
    }
}
