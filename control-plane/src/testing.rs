//! The control plane running inside a test process (feature
//! `test-support`), with a keygen of its own, on a free loopback port. Other
//! crates' tests and benchmarks use it to create links through the real API.

use std::time::Duration;

use keygen::testing::InProcessKeygen;
use shortener_common::testing::{free_port, until_http_status};

pub struct InProcessControlPlane {
    url: String,
    _keygen: InProcessKeygen,
}

impl InProcessControlPlane {
    /// Starts it on `database_url` (migrations run) and `redis_url`, with
    /// `admin_key` as `ADMIN_API_KEY` and `extra` environment on top, and
    /// waits until `/healthz` answers 200. It serves until the test's
    /// runtime ends.
    pub async fn start(
        database_url: String,
        redis_url: String,
        admin_key: &str,
        extra: &[(&str, &str)],
    ) -> Self {
        let keygen = InProcessKeygen::start().await;
        let port = free_port();
        let mut env = vec![
            ("CONTROL_PLANE_ADDR", format!("127.0.0.1:{port}")),
            ("DATABASE_URL", database_url),
            ("REDIS_URL", redis_url),
            ("KEYGEN_GRPC_URL", keygen.grpc_url()),
            ("ADMIN_API_KEY", admin_key.to_owned()),
            ("RUN_MIGRATIONS", "true".to_owned()),
        ];
        env.extend(extra.iter().map(|(k, v)| (*k, (*v).to_owned())));
        let config = crate::Config::from_env(shortener_common::Env::from_pairs(env))
            .expect("valid control-plane test config");
        let rocket = crate::build(&config).expect("the control plane builds");
        tokio::spawn(async move {
            let _ = rocket.launch().await;
        });
        let url = format!("http://127.0.0.1:{port}");
        until_http_status(&format!("{url}/healthz"), 200, Duration::from_secs(30)).await;
        Self {
            url,
            _keygen: keygen,
        }
    }

    /// `http://127.0.0.1:{port}`.
    pub fn url(&self) -> &str {
        &self.url
    }
}
