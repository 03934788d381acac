//! A Redis connection made on first use and remade after a connection
//! error, so a service starts and keeps serving while Redis is away.

use std::time::Duration;

pub struct LazyRedis {
    client: redis::Client,
    conn: tokio::sync::Mutex<Option<redis::aio::MultiplexedConnection>>,
}

impl LazyRedis {
    pub fn new(url: &str) -> redis::RedisResult<Self> {
        Ok(Self {
            client: redis::Client::open(url)?,
            conn: tokio::sync::Mutex::new(None),
        })
    }

    pub fn client(&self) -> &redis::Client {
        &self.client
    }

    /// Runs one command, connecting first if needed (500 ms to connect,
    /// 1 s for the answer).
    pub async fn run<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> redis::RedisResult<T> {
        let mut conn = {
            let mut slot = self.conn.lock().await;
            match slot.as_ref() {
                Some(conn) => conn.clone(),
                None => {
                    let config = redis::AsyncConnectionConfig::new()
                        .set_connection_timeout(Some(Duration::from_millis(500)))
                        .set_response_timeout(Some(Duration::from_secs(1)));
                    let conn = self
                        .client
                        .get_multiplexed_async_connection_with_config(&config)
                        .await?;
                    slot.insert(conn).clone()
                }
            }
        };
        let result = cmd.query_async(&mut conn).await;
        if result.as_ref().is_err_and(|e| {
            e.is_io_error()
                || e.is_timeout()
                || e.is_connection_dropped()
                || e.is_connection_refusal()
        }) {
            *self.conn.lock().await = None;
        }
        result
    }
}
