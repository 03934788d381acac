use clap::{Parser, Subcommand};
use shortener_common::config::EXIT_CONFIG;
use shortener_common::ops::{self, Dependency};
use shortener_common::{Env, telemetry};

#[derive(Parser)]
#[command(name = "control-plane", about = "The shortener's admin API")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve (the default).
    Serve,
    /// Apply pending PostgreSQL migrations and exit.
    Migrate,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let config = control_plane::Config::from_env(Env::from_process()).unwrap_or_else(|err| {
        eprintln!("control-plane: {err}");
        std::process::exit(EXIT_CONFIG);
    });
    telemetry::init_logging(config.log_format);
    match cli.command.unwrap_or(Command::Serve) {
        Command::Migrate => {
            // migrations/postgres/ holds no migration yet; the schema arrives
            // with the admin API.
            tracing::info!("no PostgreSQL migrations to apply");
            Ok(())
        }
        Command::Serve => {
            let deps = vec![
                Dependency::new("postgres", config.database_url.expose()),
                Dependency::new("redis", config.redis_url.expose()),
                Dependency::new("keygen", &config.keygen_url),
            ];
            tokio::runtime::Runtime::new()?.block_on(ops::run(config.addr, deps, config.drain))?;
            Ok(())
        }
    }
}
