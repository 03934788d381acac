//! The pipeline from the click stream to ClickHouse.
//!
//! A reader task takes entries from the stream with the consumer group and
//! enriches them; a writer task batches rows (flushed on size or age),
//! inserts them and only then `XACK`s them. The two overlap, so reading the
//! next entries costs no insert time.
//!
//! Counting stays exact:
//! - An entry is acknowledged only after its row is in ClickHouse (or in the
//!   dead-letter stream). A crash in between leaves it pending; the restarted
//!   instance reads its own pending entries first, and other instances claim
//!   entries idle for `SINK_CLAIM_IDLE_MS` (`XAUTOCLAIM`).
//! - Rows that may already be in ClickHouse (pending or claimed entries, and
//!   any batch after a failed insert attempt, since a timed-out insert may
//!   have landed) are first checked by event id, and those found are skipped.
//! - While a batch waits for ClickHouse, the writer keeps its entries fresh
//!   (`XCLAIM` with a minimum idle time that fails once another instance has
//!   claimed them), so a slow instance and a claiming one never both insert
//!   the same rows.
//! - Entries that are not click events, and rows ClickHouse refuses as data
//!   (found by splitting the batch), go to the dead-letter stream with the
//!   reason, and are acknowledged, so they never block the pipeline.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::Value;
use redis::streams::{StreamAutoClaimReply, StreamId, StreamReadReply};
use shortener_common::ClickEvent;
use shortener_common::redis_conn::LazyRedis;
use tokio::sync::{mpsc, watch};

use crate::enrich::Enricher;
use crate::store::{ClickRow, Store, StoreError};

/// Longest a `XREADGROUP` waits for new entries.
const BLOCK: Duration = Duration::from_millis(500);
/// Entries per read at most.
const READ_COUNT: usize = 5_000;
const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(5);
/// Dead-letter stream length (`MAXLEN ~`).
const DEAD_LETTER_MAX_LEN: u64 = 1_000_000;

/// Where the pipeline reads and writes.
#[derive(Clone)]
pub struct Settings {
    pub stream: String,
    pub dead_letter_stream: String,
    pub group: String,
    pub consumer: String,
    pub batch_size: usize,
    pub batch_age: Duration,
    pub claim_idle: Duration,
}

/// Entries read together, and whether their rows may already be stored.
struct Chunk {
    entries: Vec<Entry>,
    maybe_stored: bool,
    /// When these entries were last delivered to (or claimed by) us.
    delivered: Instant,
}

/// A stream entry's fields, as read.
type Fields = Vec<(String, Vec<u8>)>;

struct Entry {
    id: String,
    row: Result<(ClickEvent, ClickRow), DeadLetter>,
}

/// An entry that will not be stored, and why.
#[derive(Clone)]
struct DeadLetter {
    entry_id: String,
    reason: String,
    fields: Fields,
}

struct Metrics {
    read: metrics::Counter,
    inserted: metrics::Counter,
    duplicates: metrics::Counter,
    dead_letters: metrics::Counter,
    retries: metrics::Counter,
    claimed: metrics::Counter,
    trimmed: metrics::Counter,
    batch_size: metrics::Histogram,
    insert_seconds: metrics::Histogram,
}

impl Metrics {
    fn new() -> Self {
        Self {
            read: metrics::counter!("analytics_sink_events_read_total"),
            inserted: metrics::counter!("analytics_sink_events_inserted_total"),
            duplicates: metrics::counter!("analytics_sink_duplicates_skipped_total"),
            dead_letters: metrics::counter!("analytics_sink_dead_letters_total"),
            retries: metrics::counter!("analytics_sink_insert_retries_total"),
            claimed: metrics::counter!("analytics_sink_events_claimed_total"),
            trimmed: metrics::counter!("analytics_sink_events_trimmed_total"),
            batch_size: metrics::histogram!("analytics_sink_batch_size"),
            insert_seconds: metrics::histogram!("analytics_sink_insert_duration_seconds"),
        }
    }
}

/// Starts the reader and writer; they run until `stop` turns true, then the
/// writer finishes the batch in hand (entries not acknowledged stay pending
/// and are picked up again). The returned handle completes when both ended.
pub fn start(
    redis_url: &str,
    store: Store,
    enricher: Enricher,
    settings: Settings,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    // Separate connections: the reader's blocking reads must not delay the
    // writer's acknowledgements.
    let timeout = BLOCK + Duration::from_secs(5);
    let reader_redis = LazyRedis::with_response_timeout(redis_url, timeout)?;
    let writer_redis = LazyRedis::with_response_timeout(redis_url, timeout)?;
    let settings = Arc::new(settings);
    let (tx, rx) = mpsc::channel::<Chunk>(4);
    let reader = Reader {
        redis: reader_redis,
        enricher,
        settings: settings.clone(),
        metrics: Metrics::new(),
    };
    let writer = Writer {
        redis: writer_redis,
        store,
        settings,
        metrics: Metrics::new(),
    };
    let reader_stop = stop.clone();
    Ok(tokio::spawn(async move {
        let reader = tokio::spawn(reader.run(tx, reader_stop));
        writer.run(rx).await;
        let _ = reader.await;
    }))
}

struct Reader {
    redis: LazyRedis,
    enricher: Enricher,
    settings: Arc<Settings>,
    metrics: Metrics,
}

impl Reader {
    async fn run(mut self, tx: mpsc::Sender<Chunk>, mut stop: watch::Receiver<bool>) {
        let mut backoff = RETRY_MIN;
        // Our own pending entries first (a previous run of this consumer
        // crashed before acknowledging them), then new ones.
        let mut own_cursor: Option<String> = Some("0".to_owned());
        let mut claim_cursor = "0-0".to_owned();
        let mut next_claim = Instant::now();
        let mut group_ready = false;
        while !*stop.borrow() {
            if !group_ready {
                match self.ensure_group().await {
                    Ok(()) => group_ready = true,
                    Err(error) => {
                        tracing::warn!(%error, "cannot create the consumer group; retrying");
                        if sleep_or_stop(&mut stop, backoff).await {
                            break;
                        }
                        backoff = (backoff * 2).min(RETRY_MAX);
                        continue;
                    }
                }
            }
            let result = if let Some(cursor) = own_cursor.clone() {
                self.read(&cursor, None).await.map(|ids| {
                    own_cursor = ids.last().map(|e| e.id.clone());
                    (ids, true)
                })
            } else if Instant::now() >= next_claim {
                self.claim(&claim_cursor).await.map(|(next, ids)| {
                    if next == "0-0" {
                        // A full pass: look again in a while.
                        next_claim = Instant::now() + self.settings.claim_idle / 2;
                    }
                    claim_cursor = next;
                    (ids, true)
                })
            } else {
                self.read(">", Some(BLOCK)).await.map(|ids| (ids, false))
            };
            let (ids, maybe_stored) = match result {
                Ok(found) => {
                    backoff = RETRY_MIN;
                    found
                }
                Err(error) => {
                    if error.to_string().contains("NOGROUP") {
                        // Redis lost the group (restarted without its data):
                        // make it again and start over from our pending.
                        group_ready = false;
                        own_cursor = Some("0".to_owned());
                    }
                    tracing::warn!(%error, "cannot read the click stream; retrying");
                    if sleep_or_stop(&mut stop, backoff).await {
                        break;
                    }
                    backoff = (backoff * 2).min(RETRY_MAX);
                    continue;
                }
            };
            if ids.is_empty() {
                continue;
            }
            self.metrics.read.increment(ids.len() as u64);
            let delivered = Instant::now();
            let entries = ids.into_iter().map(|id| self.entry(id)).collect();
            let chunk = Chunk {
                entries,
                maybe_stored,
                delivered,
            };
            if tx.send(chunk).await.is_err() {
                break;
            }
        }
    }

    async fn ensure_group(&self) -> redis::RedisResult<()> {
        let result: redis::RedisResult<()> = self
            .redis
            .run(
                redis::cmd("XGROUP")
                    .arg("CREATE")
                    .arg(&self.settings.stream)
                    .arg(&self.settings.group)
                    .arg("0")
                    .arg("MKSTREAM"),
            )
            .await;
        match result {
            Err(error) if error.code() == Some("BUSYGROUP") => Ok(()),
            other => other,
        }
    }

    async fn read(&self, from: &str, block: Option<Duration>) -> redis::RedisResult<Vec<StreamId>> {
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(&self.settings.group)
            .arg(&self.settings.consumer)
            .arg("COUNT")
            .arg(READ_COUNT);
        if let Some(block) = block {
            cmd.arg("BLOCK").arg(block.as_millis() as u64);
        }
        cmd.arg("STREAMS").arg(&self.settings.stream).arg(from);
        let reply: Option<StreamReadReply> = self.redis.run(&cmd).await?;
        Ok(reply
            .map(|r| r.keys.into_iter().flat_map(|k| k.ids).collect())
            .unwrap_or_default())
    }

    /// Claims entries other instances (or a previous run of ours) left
    /// unacknowledged for longer than the claim idle time.
    async fn claim(&self, cursor: &str) -> redis::RedisResult<(String, Vec<StreamId>)> {
        let reply: StreamAutoClaimReply = self
            .redis
            .run(
                redis::cmd("XAUTOCLAIM")
                    .arg(&self.settings.stream)
                    .arg(&self.settings.group)
                    .arg(&self.settings.consumer)
                    .arg(self.settings.claim_idle.as_millis() as u64)
                    .arg(cursor)
                    .arg("COUNT")
                    .arg(READ_COUNT),
            )
            .await?;
        if !reply.deleted_ids.is_empty() {
            // Trimmed from the stream (MAXLEN) before anyone stored them.
            tracing::error!(
                entries = reply.deleted_ids.len(),
                "pending click events were trimmed from the stream before being stored"
            );
            self.metrics
                .trimmed
                .increment(reply.deleted_ids.len() as u64);
        }
        if !reply.claimed.is_empty() {
            tracing::info!(entries = reply.claimed.len(), "claimed idle click events");
            self.metrics.claimed.increment(reply.claimed.len() as u64);
        }
        Ok((reply.next_stream_id, reply.claimed))
    }

    fn entry(&mut self, id: StreamId) -> Entry {
        let fields: Fields = id
            .map
            .into_iter()
            .map(|(name, value)| {
                let bytes = match value {
                    Value::BulkString(b) => b,
                    Value::SimpleString(s) => s.into_bytes(),
                    other => format!("{other:?}").into_bytes(),
                };
                (name, bytes)
            })
            .collect();
        let decoded =
            ClickEvent::from_stream_fields(fields.iter().map(|(n, v)| (n.as_str(), v.as_slice())));
        let row = match decoded {
            Ok(event) => Ok((event.clone(), self.enricher.row(event))),
            Err(error) => Err(DeadLetter {
                entry_id: id.id.clone(),
                reason: error.to_string(),
                fields,
            }),
        };
        Entry { id: id.id, row }
    }
}

/// Sleeps for `wait`; true when asked to stop meanwhile.
async fn sleep_or_stop(stop: &mut watch::Receiver<bool>, wait: Duration) -> bool {
    tokio::select! {
        () = tokio::time::sleep(wait) => *stop.borrow(),
        _ = stop.changed() => true,
    }
}

struct Writer {
    redis: LazyRedis,
    store: Store,
    settings: Arc<Settings>,
    metrics: Metrics,
}

/// A batch on its way to ClickHouse.
struct Batch {
    ids: Vec<String>,
    rows: Vec<(String, ClickEvent, ClickRow)>,
    bad: Vec<DeadLetter>,
    maybe_stored: bool,
    delivered: Instant,
}

impl Batch {
    fn new(chunk: &Chunk) -> Self {
        Self {
            ids: Vec::new(),
            rows: Vec::new(),
            bad: Vec::new(),
            maybe_stored: chunk.maybe_stored,
            delivered: chunk.delivered,
        }
    }

    fn add(&mut self, chunk: Chunk) {
        self.delivered = self.delivered.min(chunk.delivered);
        for entry in chunk.entries {
            self.ids.push(entry.id.clone());
            match entry.row {
                Ok((event, row)) => self.rows.push((entry.id, event, row)),
                Err(dead) => self.bad.push(dead),
            }
        }
    }
}

impl Writer {
    async fn run(self, mut rx: mpsc::Receiver<Chunk>) {
        let mut carry: Option<Chunk> = None;
        loop {
            let first = match carry.take() {
                Some(chunk) => chunk,
                None => match rx.recv().await {
                    Some(chunk) => chunk,
                    None => return,
                },
            };
            let deadline =
                tokio::time::Instant::from_std(first.delivered + self.settings.batch_age);
            let mut batch = Batch::new(&first);
            batch.add(first);
            while batch.ids.len() < self.settings.batch_size {
                tokio::select! {
                    chunk = rx.recv() => match chunk {
                        // Rows that may be stored are checked as one batch;
                        // keep them apart from fresh ones.
                        Some(chunk) if chunk.maybe_stored != batch.maybe_stored => {
                            carry = Some(chunk);
                            break;
                        }
                        Some(chunk) => batch.add(chunk),
                        None => break,
                    },
                    () = tokio::time::sleep_until(deadline) => break,
                }
            }
            self.store_batch(batch).await;
        }
    }

    /// Stores one batch, retrying while ClickHouse or Redis are away; returns
    /// once every entry is acknowledged or belongs to another instance.
    async fn store_batch(&self, mut batch: Batch) {
        self.metrics.batch_size.record(batch.rows.len() as f64);
        let mut backoff = RETRY_MIN;
        let mut attempts = 0u32;
        let mut last_touch = batch.delivered;
        loop {
            // Still ours? Only worth asking once a claim could have happened.
            if last_touch.elapsed() > self.settings.claim_idle / 4 {
                match self.touch(&batch.ids, last_touch.elapsed()).await {
                    Ok(owned) => {
                        last_touch = Instant::now();
                        if owned.len() < batch.ids.len() {
                            tracing::warn!(
                                lost = batch.ids.len() - owned.len(),
                                "click events were claimed by another instance; leaving them to it"
                            );
                            batch.ids.retain(|id| owned.contains(id));
                            batch.rows.retain(|(id, _, _)| owned.contains(id));
                            batch.bad.retain(|d| owned.contains(&d.entry_id));
                        }
                    }
                    Err(error) => {
                        tracing::warn!(%error, "cannot reach Redis to keep click events claimed");
                        self.wait(&mut backoff).await;
                        continue;
                    }
                }
            }
            if batch.ids.is_empty() {
                return;
            }
            match self.insert(&mut batch, attempts > 0).await {
                Ok(()) => break,
                Err(error) => {
                    attempts += 1;
                    self.metrics.retries.increment(1);
                    tracing::warn!(%error, rows = batch.rows.len(), attempts, "cannot store click events; retrying");
                    self.wait(&mut backoff).await;
                }
            }
        }
        // Stored: acknowledge, for as long as Redis takes to come back.
        let mut backoff = RETRY_MIN;
        while let Err(error) = self.ack(&batch.ids).await {
            tracing::warn!(%error, "cannot acknowledge stored click events; retrying");
            self.wait(&mut backoff).await;
        }
    }

    async fn wait(&self, backoff: &mut Duration) {
        tokio::time::sleep(*backoff).await;
        *backoff = (*backoff * 2).min(RETRY_MAX);
    }

    /// Dead-letters bad entries, skips rows already stored, inserts the rest.
    /// On success `batch.rows` is empty and every entry can be acknowledged.
    async fn insert(&self, batch: &mut Batch, retrying: bool) -> Result<(), anyhow::Error> {
        if !batch.bad.is_empty() {
            let bad = batch.bad.clone();
            self.dead_letter(&bad).await?;
            batch.bad.clear();
        }
        if batch.rows.is_empty() {
            return Ok(());
        }
        if batch.maybe_stored || retrying {
            let rows: Vec<ClickRow> = batch.rows.iter().map(|(_, _, r)| r.clone()).collect();
            let existing: HashSet<uuid::Uuid> =
                self.store.existing(&rows).await?.into_iter().collect();
            if !existing.is_empty() {
                self.metrics.duplicates.increment(existing.len() as u64);
                tracing::info!(
                    rows = existing.len(),
                    "skipping click events already stored"
                );
                batch
                    .rows
                    .retain(|(_, _, r)| !existing.contains(&r.event_id));
            }
        }
        let rows: Vec<ClickRow> = batch.rows.iter().map(|(_, _, r)| r.clone()).collect();
        let started = Instant::now();
        let refused = self.insert_splitting(rows).await?;
        self.metrics
            .insert_seconds
            .record(started.elapsed().as_secs_f64());
        let stored = batch.rows.len() - refused.len();
        self.metrics.inserted.increment(stored as u64);
        if !refused.is_empty() {
            let by_id: std::collections::HashMap<uuid::Uuid, String> = refused
                .into_iter()
                .map(|(row, reason)| (row.event_id, reason))
                .collect();
            let bad: Vec<DeadLetter> = batch
                .rows
                .iter()
                .filter_map(|(id, event, row)| {
                    by_id.get(&row.event_id).map(|reason| {
                        let fields = event
                            .to_stream_fields()
                            .into_iter()
                            .map(|(n, v)| (n.to_owned(), v.into_bytes()))
                            .collect();
                        DeadLetter {
                            entry_id: id.clone(),
                            reason: reason.clone(),
                            fields,
                        }
                    })
                })
                .collect();
            self.dead_letter(&bad).await?;
        }
        batch.rows.clear();
        Ok(())
    }

    /// Inserts `rows`; rows ClickHouse refuses as data are found by halving
    /// and returned with the reason. Fails only when ClickHouse is away.
    /// A refused insert may still have written part of its rows (a
    /// materialized view failing after the table took them), so rows are
    /// checked for before they are sent again.
    async fn insert_splitting(
        &self,
        rows: Vec<ClickRow>,
    ) -> Result<Vec<(ClickRow, String)>, StoreError> {
        let mut refused = Vec::new();
        let mut todo = vec![(rows, false)];
        while let Some((mut rows, check)) = todo.pop() {
            if check {
                let existing: HashSet<uuid::Uuid> =
                    self.store.existing(&rows).await?.into_iter().collect();
                rows.retain(|r| !existing.contains(&r.event_id));
            }
            if rows.is_empty() {
                continue;
            }
            match self.store.insert(&rows).await {
                Ok(()) => {}
                Err(StoreError::Data(reason)) if rows.len() == 1 => {
                    if self.store.existing(&rows).await?.is_empty() {
                        refused.extend(rows.into_iter().map(|r| (r, reason.clone())));
                    }
                }
                Err(StoreError::Data(_)) => {
                    let mut first = rows;
                    let second = first.split_off(first.len() / 2);
                    todo.push((second, true));
                    todo.push((first, true));
                }
                Err(unavailable) => return Err(unavailable),
            }
        }
        Ok(refused)
    }

    async fn dead_letter(&self, bad: &[DeadLetter]) -> redis::RedisResult<()> {
        let mut pipe = redis::pipe();
        for DeadLetter {
            entry_id,
            reason,
            fields,
        } in bad
        {
            let cmd = pipe
                .cmd("XADD")
                .arg(&self.settings.dead_letter_stream)
                .arg("MAXLEN")
                .arg("~")
                .arg(DEAD_LETTER_MAX_LEN)
                .arg("*")
                .arg("entry_id")
                .arg(entry_id)
                .arg("error")
                .arg(reason)
                .arg("consumer")
                .arg(&self.settings.consumer);
            for (name, value) in fields {
                cmd.arg(name).arg(value.as_slice());
            }
            cmd.ignore();
        }
        self.redis.pipe::<()>(&pipe).await?;
        tracing::warn!(entries = bad.len(), stream = %self.settings.dead_letter_stream, "click events dead-lettered");
        self.metrics.dead_letters.increment(bad.len() as u64);
        Ok(())
    }

    /// Re-claims our entries, which resets their idle time, unless another
    /// instance claimed them since `since` ago. Returns the ids still ours.
    async fn touch(&self, ids: &[String], since: Duration) -> redis::RedisResult<HashSet<String>> {
        // An entry another instance claimed has been idle at most
        // `since - claim_idle`; ours has been idle about `since`.
        let min_idle = since.saturating_sub(self.settings.claim_idle / 2);
        let mut owned = HashSet::with_capacity(ids.len());
        for chunk in ids.chunks(READ_COUNT) {
            let mut cmd = redis::cmd("XCLAIM");
            cmd.arg(&self.settings.stream)
                .arg(&self.settings.group)
                .arg(&self.settings.consumer)
                .arg(min_idle.as_millis() as u64)
                .arg(chunk)
                .arg("JUSTID");
            let claimed: Vec<String> = self.redis.run(&cmd).await?;
            owned.extend(claimed);
        }
        Ok(owned)
    }

    async fn ack(&self, ids: &[String]) -> redis::RedisResult<()> {
        for chunk in ids.chunks(READ_COUNT) {
            let mut cmd = redis::cmd("XACK");
            cmd.arg(&self.settings.stream)
                .arg(&self.settings.group)
                .arg(chunk);
            self.redis.run::<u64>(&cmd).await?;
        }
        Ok(())
    }
}
