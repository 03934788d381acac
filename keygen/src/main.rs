use clap::{Parser, Subcommand};
use shortener_common::config::EXIT_CONFIG;
use shortener_common::{Env, telemetry};

#[derive(Parser)]
#[command(
    name = "keygen",
    about = "Issues unique short codes over HTTP and gRPC"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the HTTP and gRPC APIs (the default).
    Serve,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let config = match keygen::Config::from_env(Env::from_process()) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("keygen: {err}");
            std::process::exit(EXIT_CONFIG);
        }
    };
    let _telemetry = telemetry::init("keygen", config.log_format, 1.0);
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?
            .block_on(serve(config)),
    }
}

async fn serve(config: keygen::Config) -> anyhow::Result<()> {
    let app = keygen::Application::build(config).await?;
    tracing::info!(
        http_port = app.http_port(),
        grpc_port = app.grpc_port(),
        "keygen is listening"
    );
    app.run_until(shortener_common::telemetry::shutdown_signal())
        .await
}
