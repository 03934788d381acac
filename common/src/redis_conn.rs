//! A Redis connection made on first use and remade after a connection
//! error, so a service starts and keeps serving while Redis is away.

use std::time::Duration;

pub struct LazyRedis {
    client: redis::Client,
    conn: tokio::sync::Mutex<Option<redis::aio::MultiplexedConnection>>,
    response_timeout: Duration,
}

impl LazyRedis {
    /// Connects within 500 ms; answers must come within 1 s.
    pub fn new(url: &str) -> redis::RedisResult<Self> {
        Self::with_response_timeout(url, Duration::from_secs(1))
    }

    /// For callers whose commands may block on the server (`XREADGROUP
    /// BLOCK`, big scripts): answers must come within `response_timeout`.
    pub fn with_response_timeout(
        url: &str,
        response_timeout: Duration,
    ) -> redis::RedisResult<Self> {
        Ok(Self {
            client: redis::Client::open(url)?,
            conn: tokio::sync::Mutex::new(None),
            response_timeout,
        })
    }

    pub fn client(&self) -> &redis::Client {
        &self.client
    }

    /// The shared connection, connecting first if needed.
    async fn connection(&self) -> redis::RedisResult<redis::aio::MultiplexedConnection> {
        let mut slot = self.conn.lock().await;
        if let Some(conn) = slot.as_ref() {
            return Ok(conn.clone());
        }
        let conn = self.connect_own().await?;
        Ok(slot.insert(conn).clone())
    }

    /// A new connection, not shared, with the same timeouts: for a caller
    /// whose commands depend on the connection's state (`WATCH`), which must
    /// know when it is a new one.
    pub async fn connect_own(&self) -> redis::RedisResult<redis::aio::MultiplexedConnection> {
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(Duration::from_millis(500)))
            .set_response_timeout(Some(self.response_timeout));
        self.client
            .get_multiplexed_async_connection_with_config(&config)
            .await
    }

    /// Forgets the connection after an error that means it is broken, so
    /// the next call connects again.
    async fn check<T>(&self, result: redis::RedisResult<T>) -> redis::RedisResult<T> {
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

    /// Runs one command.
    pub async fn run<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> redis::RedisResult<T> {
        let mut conn = self.connection().await?;
        let result = cmd.query_async(&mut conn).await;
        self.check(result).await
    }

    /// Runs a pipeline.
    pub async fn pipe<T: redis::FromRedisValue>(
        &self,
        pipe: &redis::Pipeline,
    ) -> redis::RedisResult<T> {
        let mut conn = self.connection().await?;
        let result = pipe.query_async(&mut conn).await;
        self.check(result).await
    }
}
