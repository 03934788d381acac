use clap::{Parser, Subcommand};
use shortener_common::config::EXIT_CONFIG;
use shortener_common::{Env, telemetry};

#[derive(Parser)]
#[command(name = "control-plane", about = "The shortener's admin API")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the admin API (the default).
    Serve,
    /// Apply pending PostgreSQL migrations and exit.
    Migrate,
    /// Manage API keys.
    ApiKey {
        #[command(subcommand)]
        command: ApiKeyCommand,
    },
}

#[derive(Subcommand)]
enum ApiKeyCommand {
    /// Create an API key and print it once; only its hash is stored.
    Create {
        #[arg(long)]
        name: String,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let config = control_plane::Config::from_env(Env::from_process()).unwrap_or_else(|err| {
        eprintln!("control-plane: {err}");
        std::process::exit(EXIT_CONFIG);
    });
    let _telemetry = telemetry::init("control-plane", config.log_format, 1.0);
    match cli.command.unwrap_or(Command::Serve) {
        Command::Migrate => {
            let pool = control_plane::db::pool(
                config.database_url.expose(),
                1,
                std::time::Duration::from_secs(10),
            );
            let applied = control_plane::db::migrate(&mut *pool.get()?)?;
            tracing::info!(?applied, "migrations applied");
            Ok(())
        }
        Command::ApiKey {
            command: ApiKeyCommand::Create { name },
        } => {
            let pool = control_plane::db::pool(
                config.database_url.expose(),
                1,
                std::time::Duration::from_secs(10),
            );
            let key = control_plane::auth::generate_key();
            let id = control_plane::db::insert_api_key(
                &mut *pool.get()?,
                &name,
                &control_plane::auth::hash_key(&key),
            )?;
            eprintln!("created API key {id} ({name}); it is shown only now:");
            println!("{key}");
            Ok(())
        }
        Command::Serve => {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async {
                let rocket = control_plane::build(&config)?;
                rocket.launch().await?;
                anyhow::Ok(())
            })
        }
    }
}
