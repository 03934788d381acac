//! The outbox relay: makes Redis follow PostgreSQL.
//!
//! Every change to a link commits an outbox row in the same transaction. The
//! relay (one thread per instance; instances share the work through
//! `FOR UPDATE SKIP LOCKED`) claims pending rows, reads the links' *current*
//! state, writes it to Redis and publishes an invalidation in one atomic
//! pipeline, and only then marks the rows done and commits. If Redis is down
//! the transaction rolls back, nothing is marked, and the relay retries with
//! backoff: Redis catches up when it is back.
//!
//! Redis layout (read by the edge; documented in docs/ARCHITECTURE.md):
//! - `link:{code}`: JSON `{"url","status","expires_at_ms","disabled"}`, with
//!   the link's expiry as the key's expiry (`PXAT`);
//! - after a delete, a tombstone `{"deleted":true}` kept for 10 minutes, so
//!   a concurrent `/internal/resolve` cannot bring the mapping back;
//! - channel `link-invalidations`: the code, after every change.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use chrono::Utc;
use diesel::Connection;
use serde::Serialize;

use crate::db::{self, Link, PgPool};

pub const INVALIDATION_CHANNEL: &str = "link-invalidations";
pub const TOMBSTONE: &str = r#"{"deleted":true}"#;
const TOMBSTONE_TTL_MS: u64 = 10 * 60 * 1000;
const BATCH: i64 = 500;
/// Longest a change waits to join a batch (part of the invalidation delay).
const GATHER: Duration = Duration::from_millis(10);

pub fn redis_key(code: &str) -> String {
    format!("link:{code}")
}

/// The mapping the edge reads.
#[derive(Debug, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct Mapping {
    pub url: String,
    pub status: u16,
    pub expires_at_ms: Option<i64>,
    pub disabled: bool,
}

impl From<&Link> for Mapping {
    fn from(link: &Link) -> Self {
        Self {
            url: link.url.clone(),
            status: link.redirect_status as u16,
            expires_at_ms: link.expires_at.map(|t| t.timestamp_millis()),
            disabled: link.disabled,
        }
    }
}

/// True when a link has passed its expiry and Redis should not hold it.
pub fn is_expired(link: &Link) -> bool {
    link.expires_at.is_some_and(|t| t <= Utc::now())
}

/// Adds the Redis commands that make `code` match `link` to `pipe`.
pub fn write_mapping(pipe: &mut redis::Pipeline, code: &str, link: Option<&Link>) {
    let key = redis_key(code);
    match link {
        Some(link) if !is_expired(link) => {
            let value = serde_json::to_string(&Mapping::from(link)).expect("mapping serialises");
            let set = pipe.cmd("SET").arg(&key).arg(value);
            if let Some(at) = link.expires_at {
                set.arg("PXAT").arg(at.timestamp_millis());
            }
        }
        Some(_) => {
            pipe.cmd("DEL").arg(&key);
        }
        None => {
            pipe.cmd("SET")
                .arg(&key)
                .arg(TOMBSTONE)
                .arg("PX")
                .arg(TOMBSTONE_TTL_MS);
        }
    }
    pipe.cmd("PUBLISH").arg(INVALIDATION_CHANNEL).arg(code);
}

#[derive(Debug, thiserror::Error)]
enum RelayError {
    #[error("postgres: {0}")]
    Db(#[from] diesel::result::Error),
    #[error("postgres pool: {0}")]
    Pool(#[from] diesel::r2d2::PoolError),
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
}

/// Wakes the relay right after a commit instead of at its next poll.
#[derive(Default)]
pub struct Kick {
    pending: Mutex<bool>,
    signal: Condvar,
}

impl Kick {
    pub fn kick(&self) {
        *self.pending.lock().expect("kick lock") = true;
        self.signal.notify_one();
    }

    fn wait(&self, timeout: Duration) {
        let guard = self.pending.lock().expect("kick lock");
        let (mut pending, _) = self
            .signal
            .wait_timeout_while(guard, timeout, |pending| !*pending)
            .expect("kick lock");
        *pending = false;
    }
}

pub struct Relay {
    pub kick: Arc<Kick>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Relay {
    pub fn start(pool: PgPool, redis_url: String) -> Self {
        let kick = Arc::new(Kick::default());
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (kick, stop) = (kick.clone(), stop.clone());
            std::thread::Builder::new()
                .name("outbox-relay".into())
                .spawn(move || run(pool, redis_url, kick, stop))
                .expect("spawn relay thread")
        };
        Self {
            kick,
            stop,
            thread: Some(thread),
        }
    }

    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.kick.kick();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop();
    }
}

fn connect(url: &str) -> redis::RedisResult<redis::Connection> {
    let conn = redis::Client::open(url)?.get_connection_with_timeout(Duration::from_secs(1))?;
    conn.set_read_timeout(Some(Duration::from_secs(2)))?;
    conn.set_write_timeout(Some(Duration::from_secs(2)))?;
    Ok(conn)
}

fn run(pool: PgPool, redis_url: String, kick: Arc<Kick>, stop: Arc<AtomicBool>) {
    let mut redis: Option<redis::Connection> = None;
    let mut backoff = Duration::from_millis(50);
    let mut last_housekeeping = Instant::now() - Duration::from_secs(60);
    while !stop.load(Ordering::SeqCst) {
        if last_housekeeping.elapsed() > Duration::from_secs(5) {
            housekeeping(&pool);
            last_housekeeping = Instant::now();
        }
        let conn = match redis.as_mut() {
            Some(conn) => conn,
            None => match connect(&redis_url) {
                Ok(conn) => redis.insert(conn),
                Err(error) => {
                    tracing::warn!(%error, "outbox relay cannot reach Redis; retrying");
                    kick.wait(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                    continue;
                }
            },
        };
        match relay_once(&pool, conn) {
            Ok(0) => kick.wait(Duration::from_millis(200)),
            Ok(n) => {
                backoff = Duration::from_millis(50);
                metrics::counter!("control_plane_outbox_relayed_total").increment(n as u64);
                if (n as i64) < BATCH {
                    // Under a stream of writes every commit kicks the relay;
                    // a short pause lets changes gather into one batch
                    // instead of costing a full cycle each.
                    std::thread::sleep(GATHER);
                }
            }
            Err(error) => {
                metrics::counter!("control_plane_outbox_errors_total").increment(1);
                tracing::warn!(%error, "outbox relay failed; will retry");
                if matches!(error, RelayError::Redis(_)) {
                    redis = None;
                }
                kick.wait(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
}

/// One batch; returns how many outbox rows it completed.
fn relay_once(pool: &PgPool, redis: &mut redis::Connection) -> Result<usize, RelayError> {
    let mut conn = pool.get()?;
    conn.transaction(|conn| {
        let rows = db::claim_outbox(conn, BATCH)?;
        if rows.is_empty() {
            return Ok(0);
        }
        let mut codes: Vec<String> = rows.iter().map(|(_, code)| code.clone()).collect();
        codes.sort();
        codes.dedup();
        let links = db::links_by_code(conn, &codes)?;
        let mut pipe = redis::pipe();
        pipe.atomic();
        for code in &codes {
            write_mapping(&mut pipe, code, links.iter().find(|l| &l.code == code));
        }
        pipe.query::<()>(redis)?;
        let ids: Vec<i64> = rows.iter().map(|(id, _)| *id).collect();
        db::mark_processed(conn, &ids)?;
        Ok(rows.len())
    })
}

/// Publishes the backlog gauge and drops rows finished over an hour ago.
fn housekeeping(pool: &PgPool) {
    let Ok(mut conn) = pool.get() else { return };
    if let Ok(backlog) = db::pending_outbox(&mut conn) {
        metrics::gauge!("control_plane_outbox_backlog").set(backlog as f64);
    }
    let _ = db::purge_outbox(&mut conn, Duration::from_secs(3600));
}
