//! Short codes leased from keygen over gRPC in batches, so that creating a
//! link rarely waits on a round trip. When keygen is down, creates continue
//! from the lease until it runs out, then answer 503 `keygen_unavailable`.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keygen::proto::GenerateKeysRequest;
use keygen::proto::keygen_client::KeygenClient;
use tonic::transport::{Channel, Endpoint};
use tracing::Instrument;

use crate::error::ApiError;

pub struct KeyPool {
    client: KeygenClient<Channel>,
    keys: Mutex<VecDeque<String>>,
    refilling: tokio::sync::Mutex<()>,
    batch: u32,
    low_water: usize,
}

impl KeyPool {
    /// Connects lazily: the control plane starts even while keygen is down.
    pub fn new(url: &str, batch: u32) -> anyhow::Result<Arc<Self>> {
        let channel = Endpoint::from_shared(url.to_owned())?
            .connect_timeout(Duration::from_secs(1))
            .timeout(Duration::from_secs(2))
            .tcp_nodelay(true)
            .connect_lazy();
        Ok(Arc::new(Self {
            client: KeygenClient::new(channel),
            keys: Mutex::new(VecDeque::new()),
            refilling: tokio::sync::Mutex::new(()),
            batch,
            low_water: batch as usize,
        }))
    }

    pub fn available(&self) -> usize {
        self.keys.lock().expect("key pool lock").len()
    }

    /// One fresh code.
    pub async fn take(self: &Arc<Self>) -> Result<String, ApiError> {
        loop {
            let (key, left) = {
                let mut keys = self.keys.lock().expect("key pool lock");
                (keys.pop_front(), keys.len())
            };
            metrics::gauge!("control_plane_leased_keys").set(left as f64);
            match key {
                Some(key) => {
                    if left < self.low_water {
                        let pool = self.clone();
                        // Part of the request's trace: this request is why
                        // keygen is asked.
                        tokio::spawn(
                            async move {
                                let _ = pool.refill().await;
                            }
                            .in_current_span(),
                        );
                    }
                    return Ok(key);
                }
                None => self.refill().await?,
            }
        }
    }

    /// Fetches a batch unless the pool is above its low-water mark; one
    /// fetch at a time.
    pub async fn refill(&self) -> Result<(), ApiError> {
        let _one_at_a_time = self.refilling.lock().await;
        if self.available() >= self.low_water {
            return Ok(());
        }
        let mut client = self.client.clone();
        let span = tracing::info_span!("keygen.GenerateKeys", batch = self.batch);
        let mut request = tonic::Request::new(GenerateKeysRequest { count: self.batch });
        let mut headers = http::HeaderMap::new();
        span.in_scope(|| shortener_common::telemetry::inject_context(&mut headers));
        *request.metadata_mut() = tonic::metadata::MetadataMap::from_headers(headers);
        match client.generate_keys(request).instrument(span).await {
            Ok(response) => {
                let keys = response.into_inner().keys;
                self.keys.lock().expect("key pool lock").extend(keys);
                Ok(())
            }
            Err(status) => {
                metrics::counter!("control_plane_keygen_errors_total").increment(1);
                tracing::warn!(error = %status.message(), code = ?status.code(), "cannot lease keys from keygen");
                if self.available() > 0 {
                    return Ok(());
                }
                Err(ApiError::Unavailable(
                    "keygen_unavailable",
                    "no short codes are available right now; retry shortly or give an alias".into(),
                ))
            }
        }
    }
}
