use shortener_common::config::EXIT_CONFIG;
use shortener_common::ops::{self, Dependency};
use shortener_common::{Env, telemetry};

fn main() -> anyhow::Result<()> {
    let config = analytics_sink::Config::from_env(Env::from_process()).unwrap_or_else(|err| {
        eprintln!("analytics-sink: {err}");
        std::process::exit(EXIT_CONFIG);
    });
    telemetry::init_logging(config.log_format);
    let deps = vec![Dependency::new("redis", config.redis_url.expose())];
    tokio::runtime::Runtime::new()?.block_on(ops::run(config.addr, deps, config.drain))?;
    Ok(())
}
