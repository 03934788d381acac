//! Where a keygen instance gets its worker id, and where it persists how far
//! into the future its IDs may have gone.
//!
//! - Leased (default): the worker id is leased in Redis with
//!   `SET {prefix}:worker:{id}:lease <instance> NX PX <ttl>` and renewed by a
//!   compare-and-extend script. The reservation end lives next to it in
//!   `{prefix}:worker:{id}:next_tick`, written only by the lease holder (the
//!   script checks), so a successor always starts after every tick its
//!   predecessor could have used. Leases are released on graceful shutdown.
//! - Pinned (`KEYGEN_WORKER_ID`): no Redis; the reservation end is kept in a
//!   file in `KEYGEN_STATE_DIR`, replaced atomically (write, fsync, rename).
//!   Two instances pinned to one id are an operator error this cannot catch.

use std::path::PathBuf;
use std::time::Duration;

use redis::aio::ConnectionManager;

use crate::layout::MAX_WORKER;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("state file {path}: {source}")]
    File {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the lease on worker id {0} is lost (expired, or taken by another instance)")]
    LeaseLost(u16),
    #[error("every worker id (0..={MAX_WORKER}) is leased by another instance")]
    NoFreeWorker,
}

/// Leases worker ids in Redis.
#[derive(Clone)]
pub struct RedisLeases {
    conn: ConnectionManager,
    prefix: String,
    instance: String,
    ttl: Duration,
}

const RENEW: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0";

const RESERVE: &str = r"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return -1
end
local current = tonumber(redis.call('GET', KEYS[2]) or '0')
local wanted = tonumber(ARGV[2])
if wanted > current then
  redis.call('SET', KEYS[2], ARGV[2])
  return wanted
end
return current";

const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0";

impl RedisLeases {
    pub fn new(conn: ConnectionManager, prefix: String, ttl: Duration) -> Self {
        Self {
            conn,
            prefix,
            instance: uuid::Uuid::new_v4().to_string(),
            ttl,
        }
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    fn lease_key(&self, worker: u16) -> String {
        format!("{}:worker:{worker}:lease", self.prefix)
    }

    fn tick_key(&self, worker: u16) -> String {
        format!("{}:worker:{worker}:next_tick", self.prefix)
    }

    /// Takes the first free worker id, starting from a random one so that
    /// instances starting together do not all race for id 0. Returns the id
    /// and the persisted reservation end to resume from.
    pub async fn acquire(&self) -> Result<(u16, u64), StoreError> {
        let mut conn = self.conn.clone();
        let offset = (uuid::Uuid::new_v4().as_u128() % (u128::from(MAX_WORKER) + 1)) as u16;
        for i in 0..=MAX_WORKER {
            let worker = (offset + i) % (MAX_WORKER + 1);
            let taken: Option<String> = redis::cmd("SET")
                .arg(self.lease_key(worker))
                .arg(&self.instance)
                .arg("NX")
                .arg("PX")
                .arg(self.ttl.as_millis() as u64)
                .query_async(&mut conn)
                .await?;
            if taken.is_some() {
                let next: Option<u64> = redis::cmd("GET")
                    .arg(self.tick_key(worker))
                    .query_async(&mut conn)
                    .await?;
                return Ok((worker, next.unwrap_or(0)));
            }
        }
        Err(StoreError::NoFreeWorker)
    }

    /// Extends the lease; `LeaseLost` if another instance holds it now.
    pub async fn renew(&self, worker: u16) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let renewed: i64 = redis::Script::new(RENEW)
            .key(self.lease_key(worker))
            .arg(&self.instance)
            .arg(self.ttl.as_millis() as u64)
            .invoke_async(&mut conn)
            .await?;
        if renewed == 1 {
            Ok(())
        } else {
            Err(StoreError::LeaseLost(worker))
        }
    }

    /// Persists that this worker id's IDs may use ticks below `end`.
    pub async fn reserve(&self, worker: u16, end: u64) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let stored: i64 = redis::Script::new(RESERVE)
            .key(self.lease_key(worker))
            .key(self.tick_key(worker))
            .arg(&self.instance)
            .arg(end)
            .invoke_async(&mut conn)
            .await?;
        if stored < 0 {
            Err(StoreError::LeaseLost(worker))
        } else {
            Ok(())
        }
    }

    /// Gives the worker id back so a successor need not wait for expiry.
    pub async fn release(&self, worker: u16) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let _: i64 = redis::Script::new(RELEASE)
            .key(self.lease_key(worker))
            .arg(&self.instance)
            .invoke_async(&mut conn)
            .await?;
        Ok(())
    }
}

/// The reservation file of a pinned worker id.
#[derive(Debug, Clone)]
pub struct StateFile {
    path: PathBuf,
}

impl StateFile {
    pub fn new(dir: PathBuf, worker: u16) -> Self {
        Self {
            path: dir.join(format!("worker-{worker}.next_tick")),
        }
    }

    fn error(&self, source: std::io::Error) -> StoreError {
        StoreError::File {
            path: self.path.clone(),
            source,
        }
    }

    /// The persisted reservation end, 0 when there is none yet.
    pub async fn load(&self) -> Result<u64, StoreError> {
        let path = self.path.clone();
        let read = tokio::task::spawn_blocking(move || std::fs::read_to_string(path))
            .await
            .expect("blocking read does not panic");
        match read {
            Ok(text) => text
                .trim()
                .parse()
                .map_err(|e| self.error(std::io::Error::new(std::io::ErrorKind::InvalidData, e))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
            Err(e) => Err(self.error(e)),
        }
    }

    /// Replaces the file atomically and durably.
    pub async fn store(&self, end: u64) -> Result<(), StoreError> {
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            use std::io::Write;
            let dir = path.parent().expect("state file has a directory");
            std::fs::create_dir_all(dir)?;
            let tmp = path.with_extension("tmp");
            let mut file = std::fs::File::create(&tmp)?;
            writeln!(file, "{end}")?;
            file.sync_all()?;
            std::fs::rename(&tmp, &path)?;
            std::fs::File::open(dir)?.sync_all()
        })
        .await
        .expect("blocking write does not panic")
        .map_err(|e| self.error(e))
    }
}
