//! The key service: a [`Generator`] for the worker id this instance holds,
//! the I/O it asks for (reservations, lease renewal), clock waits, and the
//! metrics that go with them. HTTP and gRPC both call [`KeyService::generate`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use crate::base62;
use crate::generator::{Generator, Refusal};
use crate::permute::Permutation;
use crate::worker::{RedisLeases, StateFile, StoreError};

/// Largest batch one request may ask for.
pub const MAX_BATCH: u32 = 1000;
/// Reservations cover this many ticks beyond what a batch needs, so a busy
/// worker persists one about every ten seconds rather than every second.
const RESERVE_AHEAD_TICKS: u64 = 8;

/// Wall-clock time, replaceable in tests.
pub trait Clock: Send + Sync + 'static {
    fn now_unix_ms(&self) -> u64;
}

/// The system clock.
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_unix_ms(&self) -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0)
    }
}

/// How this instance gets its worker id.
pub enum WorkerMode {
    Leased(RedisLeases),
    Pinned { worker: u16, state: StateFile },
}

#[derive(Debug, thiserror::Error)]
pub enum KeygenError {
    #[error("this instance holds no worker id; it cannot issue keys")]
    NoWorker,
    #[error("the clock is behind the last issued key; retry shortly")]
    ClockBehind,
    #[error("the key space of this layout is used up")]
    Exhausted,
    #[error("cannot persist the key reservation: {0}")]
    Store(#[from] StoreError),
}

impl KeygenError {
    /// The stable machine-readable code for the JSON error body.
    pub fn code(&self) -> &'static str {
        match self {
            Self::NoWorker => "no_worker_id",
            Self::ClockBehind => "clock_behind",
            Self::Exhausted => "key_space_exhausted",
            Self::Store(_) => "dependency_unavailable",
        }
    }
}

struct Active {
    generator: Generator,
    /// Milliseconds since `KeyService::started` until which the lease is
    /// surely ours; `u64::MAX` for a pinned worker id.
    valid_until_ms: AtomicU64,
}

pub struct KeyService {
    permutation: Permutation,
    clock: Arc<dyn Clock>,
    mode: WorkerMode,
    active: RwLock<Option<Arc<Active>>>,
    /// Serialises reservation writes (the state file is replaced by rename).
    persist: tokio::sync::Mutex<()>,
    started: Instant,
    max_clock_wait: Duration,
}

impl KeyService {
    /// Builds the service and takes a worker id if it can. A leased instance
    /// that finds no free id still starts (not ready) and keeps trying in
    /// [`KeyService::maintain`].
    pub async fn start(
        permutation: Permutation,
        clock: Arc<dyn Clock>,
        mode: WorkerMode,
        max_clock_wait: Duration,
    ) -> Result<Arc<Self>, StoreError> {
        let service = Arc::new(Self {
            permutation,
            clock,
            mode,
            active: RwLock::new(None),
            persist: tokio::sync::Mutex::new(()),
            started: Instant::now(),
            max_clock_wait,
        });
        match &service.mode {
            WorkerMode::Pinned { worker, state } => {
                let start = state.load().await?;
                service.activate(*worker, start, u64::MAX);
            }
            WorkerMode::Leased(_) => {
                if let Err(error) = service.acquire().await {
                    tracing::warn!(%error, "no worker id yet; will keep trying");
                }
            }
        }
        Ok(service)
    }

    fn elapsed_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    fn activate(&self, worker: u16, start_tick: u64, valid_until_ms: u64) {
        tracing::info!(worker, start_tick, "issuing keys as worker id");
        metrics::gauge!("keygen_worker_id").set(f64::from(worker));
        *self.active.write().expect("active lock") = Some(Arc::new(Active {
            generator: Generator::new(worker, start_tick),
            valid_until_ms: AtomicU64::new(valid_until_ms),
        }));
    }

    fn deactivate(&self, reason: &StoreError) {
        let previous = self.active.write().expect("active lock").take();
        if let Some(active) = previous {
            tracing::error!(worker = active.generator.worker(), error = %reason, "stopped issuing keys");
            metrics::counter!("keygen_lease_lost_total").increment(1);
            metrics::gauge!("keygen_worker_id").set(-1.0);
        }
    }

    /// How long a renewal sent now keeps the lease surely ours: the Redis
    /// TTL counts from when Redis ran the command, which is after now, and a
    /// fifth of the TTL is left as margin.
    fn lease_deadline(&self, sent_at_ms: u64, ttl: Duration) -> u64 {
        let ttl_ms = ttl.as_millis() as u64;
        sent_at_ms + ttl_ms - ttl_ms / 5
    }

    async fn acquire(&self) -> Result<(), StoreError> {
        let WorkerMode::Leased(leases) = &self.mode else {
            return Ok(());
        };
        let sent_at = self.elapsed_ms();
        let (worker, start) = leases.acquire().await?;
        self.activate(worker, start, self.lease_deadline(sent_at, leases.ttl()));
        Ok(())
    }

    /// The generator, if this instance surely holds its worker id now.
    fn current(&self) -> Option<Arc<Active>> {
        let active = self.active.read().expect("active lock").clone()?;
        (self.elapsed_ms() < active.valid_until_ms.load(Ordering::Acquire)).then_some(active)
    }

    /// The worker id in use, when ready to issue.
    pub fn worker(&self) -> Option<u16> {
        self.current().map(|a| a.generator.worker())
    }

    pub fn is_ready(&self) -> bool {
        self.current().is_some()
    }

    /// Issues `count` codes (1 to [`MAX_BATCH`]), each at most 8 characters.
    /// Returns the worker id that issued them as well.
    pub async fn generate(&self, count: u32) -> Result<(u16, Vec<String>), KeygenError> {
        assert!((1..=MAX_BATCH).contains(&count), "callers validate count");
        let mut waited = Duration::ZERO;
        loop {
            let active = self.current().ok_or(KeygenError::NoWorker)?;
            match active.generator.issue(count, self.clock.now_unix_ms()) {
                Ok(batch) => {
                    if batch.clock_went_back {
                        metrics::counter!("keygen_clock_backwards_total").increment(1);
                    }
                    metrics::counter!("keygen_keys_issued_total").increment(u64::from(count));
                    let codes = batch.ids.into_iter().map(|id| self.code_for(id)).collect();
                    return Ok((active.generator.worker(), codes));
                }
                Err(Refusal::Reserve { through }) => self.reserve(&active, through).await?,
                Err(Refusal::ClockBehind { wait }) => {
                    if waited + wait > self.max_clock_wait {
                        metrics::counter!("keygen_clock_refusals_total").increment(1);
                        tracing::warn!(?wait, "refusing keys: clock is behind the last issued key");
                        return Err(KeygenError::ClockBehind);
                    }
                    metrics::counter!("keygen_clock_waits_total").increment(1);
                    tokio::time::sleep(wait).await;
                    waited += wait;
                }
                Err(Refusal::Exhausted) => return Err(KeygenError::Exhausted),
            }
        }
    }

    /// The code for an ID: permuted, then base62.
    pub fn code_for(&self, id: u64) -> String {
        base62::encode(self.permutation.forward(id))
    }

    async fn reserve(&self, active: &Active, through: u64) -> Result<(), KeygenError> {
        let _guard = self.persist.lock().await;
        let end = through + 1 + RESERVE_AHEAD_TICKS;
        let worker = active.generator.worker();
        let stored = match &self.mode {
            WorkerMode::Leased(leases) => leases.reserve(worker, end).await,
            WorkerMode::Pinned { state, .. } => state.store(end).await,
        };
        match stored {
            Ok(()) => {
                metrics::counter!("keygen_reservations_total").increment(1);
                active.generator.reserved(end);
                Ok(())
            }
            Err(error @ StoreError::LeaseLost(_)) => {
                self.deactivate(&error);
                Err(KeygenError::NoWorker)
            }
            Err(error) => Err(error.into()),
        }
    }

    /// Keeps the lease: renews it every third of its TTL, takes a new worker
    /// id when it has none, and stops issuing as soon as the lease is lost.
    pub async fn maintain(self: Arc<Self>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        let WorkerMode::Leased(leases) = &self.mode else {
            return;
        };
        let period = leases.ttl() / 3;
        loop {
            tokio::select! {
                () = tokio::time::sleep(period) => {}
                _ = shutdown.changed() => return,
            }
            let held = self.active.read().expect("active lock").clone();
            match held {
                Some(active) => {
                    let sent_at = self.elapsed_ms();
                    match leases.renew(active.generator.worker()).await {
                        Ok(()) => active.valid_until_ms.store(
                            self.lease_deadline(sent_at, leases.ttl()),
                            Ordering::Release,
                        ),
                        Err(error @ StoreError::LeaseLost(_)) => self.deactivate(&error),
                        // Redis unreachable: the local deadline runs out by
                        // itself if this goes on for too long.
                        Err(error) => tracing::warn!(%error, "cannot renew the worker lease"),
                    }
                }
                None => {
                    if let Err(error) = self.acquire().await {
                        tracing::warn!(%error, "still no worker id");
                    }
                }
            }
        }
    }

    /// Stops issuing and gives the leased worker id back.
    pub async fn release(&self) {
        let previous = self.active.write().expect("active lock").take();
        if let (Some(active), WorkerMode::Leased(leases)) = (previous, &self.mode) {
            let worker = active.generator.worker();
            match leases.release(worker).await {
                Ok(()) => tracing::info!(worker, "released the worker id"),
                Err(error) => tracing::warn!(worker, %error, "could not release the worker id"),
            }
        }
    }
}
