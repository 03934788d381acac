//! keygen running inside a test process (feature `test-support`): a pinned
//! worker id with its state in a temp dir, on a free loopback port, that a
//! test can stop and start again on the same port. Other crates' tests and
//! benchmarks use it to get real codes over real gRPC.

use shortener_common::testing::{free_port, unique_name};

pub struct InProcessKeygen {
    port: u16,
    state: tempfile::TempDir,
    secret: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl InProcessKeygen {
    /// Starts keygen on a free port with a secret of its own.
    pub async fn start() -> Self {
        let mut keygen = Self {
            port: free_port(),
            state: tempfile::tempdir().expect("temp dir"),
            secret: unique_name("in-process-keygen-secret"),
            stop: None,
            task: None,
        };
        keygen.run().await;
        keygen
    }

    /// Starts it again after [`InProcessKeygen::stop`], same port and state.
    pub async fn run(&mut self) {
        let config = crate::Config::from_env(shortener_common::Env::from_pairs([
            ("KEYGEN_SECRET", self.secret.clone()),
            ("KEYGEN_WORKER_ID", "0".to_owned()),
            (
                "KEYGEN_STATE_DIR",
                self.state.path().to_string_lossy().into_owned(),
            ),
            ("KEYGEN_HTTP_ADDR", "127.0.0.1:0".to_owned()),
            ("KEYGEN_GRPC_ADDR", format!("127.0.0.1:{}", self.port)),
            ("SHUTDOWN_DRAIN_MS", "100".to_owned()),
        ]))
        .expect("valid keygen test config");
        let app = crate::Application::build(config)
            .await
            .expect("keygen starts");
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        self.stop = Some(tx);
        self.task = Some(tokio::spawn(async move {
            app.run_until(async {
                let _ = rx.await;
            })
            .await
            .expect("keygen runs");
        }));
    }

    /// Stops it and waits until its port is released.
    pub async fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.expect("keygen task");
        }
    }

    /// The gRPC URL for `KEYGEN_GRPC_URL`.
    pub fn grpc_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}
