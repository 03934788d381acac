//! Listens on `link-invalidations` and drops each code it hears from the
//! cache. After any (re)connect the edge may have missed messages, so it
//! drops the whole cache: every link is looked up again on its next hit.

use std::sync::Arc;
use std::time::Duration;

use tokio_stream::StreamExt;

use crate::cache::Cache;

pub const CHANNEL: &str = "link-invalidations";

pub async fn run(
    redis_url: String,
    cache: Arc<Cache>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let session = async {
            let client = redis::Client::open(redis_url.as_str())?;
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(CHANNEL).await?;
            redis::RedisResult::Ok(pubsub)
        };
        match tokio::time::timeout(Duration::from_secs(2), session).await {
            Ok(Ok(mut pubsub)) => {
                backoff = Duration::from_millis(100);
                // Whatever was cached before this subscription may have
                // missed a message (at start-up, the cache may have filled
                // while Redis was unreachable).
                if !cache.is_empty() {
                    cache.clear();
                    metrics::counter!("edge_cache_flushes_total").increment(1);
                    tracing::info!("subscribed to invalidations; dropped the cache");
                }
                let mut messages = pubsub.on_message();
                loop {
                    tokio::select! {
                        message = messages.next() => match message {
                            Some(message) => {
                                if let Ok(code) = message.get_payload::<String>() {
                                    cache.remove(&code);
                                    metrics::counter!("edge_invalidations_total").increment(1);
                                }
                            }
                            None => break,
                        },
                        _ = stop.changed() => return,
                    }
                }
                tracing::warn!("lost the invalidation subscription; reconnecting");
            }
            Ok(Err(error)) => tracing::debug!(%error, "cannot subscribe to invalidations"),
            Err(_) => tracing::debug!("subscribing to invalidations timed out"),
        }
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            _ = stop.changed() => return,
        }
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}
