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
//! - Rows that may already be in ClickHouse (pending or claimed entries,
//!   entries read again after the consumer group was lost, and any batch
//!   after a failed insert attempt) are first checked by event id, and those
//!   found are skipped. Before that check, the failed attempt is made sure to
//!   be over (`KILL QUERY ... SYNC` on its query id), since ClickHouse may
//!   still be committing an insert whose client gave up.
//! - A batch whose entries were delivered a while ago is re-claimed
//!   (`XCLAIM` with a minimum idle time that fails once another instance has
//!   claimed them) right before each insert, and each insert and check is
//!   bounded to a quarter of `SINK_CLAIM_IDLE_MS`, so a slow instance and a
//!   claiming one never both insert the same rows.
//! - Entries that are not click events, and rows ClickHouse refuses as data
//!   (found by splitting the batch), go to the dead-letter stream with the
//!   reason, and are acknowledged, so they never block the pipeline.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::Value;
use redis::streams::{StreamAutoClaimReply, StreamId};
use shortener_common::ClickEvent;
use shortener_common::event::{ENTRY_CLICKS, decode_entry};
use shortener_common::redis_conn::LazyRedis;
use tokio::sync::{mpsc, watch};

use crate::Config;
use crate::enrich::Enricher;
use crate::store::{ClickRow, Store, StoreError};

/// Longest a `XREADGROUP` waits for new entries.
const BLOCK: Duration = Duration::from_millis(500);
/// Entries per read at most.
const READ_COUNT: usize = 10_000;
/// About how many clicks a read should bring (at most the batch size):
/// packed entries hold up to [`ENTRY_CLICKS`], so the entries asked for
/// follow their recent average size, starting as if they were full and
/// growing at most twofold per read.
const READ_CLICKS: usize = 10_000;
const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(5);
/// Dead-letter stream length (`MAXLEN ~`).
const DEAD_LETTER_MAX_LEN: u64 = 1_000_000;

/// Entries read together, and whether their rows may already be stored.
/// Entries whose content was trimmed from the stream before anyone stored
/// it come as ids alone (`gone`): there is nothing left to store.
struct Chunk {
    gone: Vec<String>,
    entries: Vec<Entry>,
    maybe_stored: bool,
    /// When these entries were last delivered to (or claimed by) us.
    delivered: Instant,
}

/// Clicks per stream entry in recent reads, in thousandths: the lag and
/// pending counts Redis gives in entries are turned into clicks with it.
pub type ClicksPerEntry = Arc<std::sync::atomic::AtomicU64>;

/// A stream entry's fields, as read.
type Fields = Vec<(String, Vec<u8>)>;

/// A stream entry and its clicks (one, or a packed batch).
struct Entry {
    id: String,
    rows: Vec<Result<(ClickEvent, ClickRow), DeadLetter>>,
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
    settings: Arc<Config>,
    clicks_per_entry: ClicksPerEntry,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    // Separate connections: the reader's blocking reads must not delay the
    // writer's acknowledgements.
    let timeout = BLOCK + Duration::from_secs(5);
    let reader_redis = LazyRedis::with_response_timeout(redis_url, timeout)?;
    let writer_redis = LazyRedis::with_response_timeout(redis_url, timeout)?;
    let (tx, rx) = mpsc::channel::<Chunk>(4);
    let reader = Reader {
        redis: reader_redis,
        store: store.clone(),
        enricher,
        settings: settings.clone(),
        metrics: Metrics::new(),
        read_count: (READ_CLICKS.min(settings.batch_size) / ENTRY_CLICKS).max(1),
        clicks_per_entry,
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
        writer.run(rx, stop).await;
        let _ = reader.await;
    }))
}

struct Reader {
    redis: LazyRedis,
    store: Store,
    enricher: Enricher,
    settings: Arc<Config>,
    metrics: Metrics,
    /// Entries asked for per read (and claim), from [`READ_CLICKS`].
    read_count: usize,
    clicks_per_entry: ClicksPerEntry,
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
        // After the group had to be made again, entries up to this id may
        // have been stored before: they are checked, not trusted.
        let mut recheck_until: Option<(u64, u64)> = None;
        while !*stop.borrow() {
            if !group_ready {
                match self.ensure_group().await {
                    Ok(created) => {
                        group_ready = true;
                        if created {
                            recheck_until = self.recheck_bound().await;
                        }
                    }
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
                self.read(">", Some(BLOCK)).await.map(|ids| {
                    let recheck = match (recheck_until, ids.last().and_then(|e| parse_id(&e.id))) {
                        (Some(until), Some(last)) if last <= until => true,
                        (Some(_), Some(_)) => {
                            recheck_until = None;
                            true
                        }
                        _ => false,
                    };
                    (ids, recheck)
                })
            };
            let (ids, maybe_stored) = match result {
                Ok(found) => {
                    backoff = RETRY_MIN;
                    found
                }
                Err(error) => {
                    if error.code() == Some("NOGROUP") {
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
            let delivered = Instant::now();
            let mut gone = Vec::new();
            let mut entries = Vec::with_capacity(ids.len());
            let mut clicks = 0;
            for raw in ids {
                if raw.fields.is_empty() {
                    gone.push(raw.id);
                } else {
                    let entry = self.entry(raw);
                    clicks += entry.rows.len();
                    entries.push(entry);
                }
            }
            self.metrics.read.increment(clicks as u64);
            if !entries.is_empty() {
                let per_entry = clicks.div_ceil(entries.len()).max(1);
                let wanted = READ_CLICKS.min(self.settings.batch_size) / per_entry;
                self.read_count = wanted.clamp(1, READ_COUNT).min(self.read_count * 2);
                self.clicks_per_entry.store(
                    (clicks * 1000 / entries.len()) as u64,
                    std::sync::atomic::Ordering::Relaxed,
                );
            }
            if !gone.is_empty() {
                tracing::error!(
                    entries = gone.len(),
                    "pending click events were trimmed from the stream before being stored"
                );
                self.metrics.trimmed.increment(gone.len() as u64);
            }
            let chunk = Chunk {
                gone,
                entries,
                maybe_stored,
                delivered,
            };
            tokio::select! {
                sent = tx.send(chunk) => if sent.is_err() { break },
                _ = stop.changed() => break,
            }
        }
    }

    /// Creates the group if it is missing; true when it had to be created.
    async fn ensure_group(&self) -> redis::RedisResult<bool> {
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
            Ok(()) => Ok(true),
            Err(error) if error.code() == Some("BUSYGROUP") => Ok(false),
            Err(error) => Err(error),
        }
    }

    /// After the group was made: up to which entry rows may already be in
    /// ClickHouse. None when nothing in the stream can have been stored
    /// (the first start, or a stream newer than every stored click), which
    /// spares a fresh deployment checking its whole backlog.
    async fn recheck_bound(&self) -> Option<(u64, u64)> {
        let last = self.last_id(true).await.ok().flatten()?;
        let Ok(Some(first)) = self.last_id(false).await else {
            return Some(last);
        };
        // Stream ids are Redis's clock, click times the edges': allow for
        // some skew between them.
        const SKEW_MS: u64 = 5 * 60 * 1000;
        match self.store.newest_ms().await {
            Ok(newest) if newest + SKEW_MS < first.0 => None,
            _ => Some(last),
        }
    }

    /// The id of the stream's newest (or, with `newest` false, oldest) entry.
    async fn last_id(&self, newest: bool) -> redis::RedisResult<Option<(u64, u64)>> {
        let mut cmd = if newest {
            let mut c = redis::cmd("XREVRANGE");
            c.arg(&self.settings.stream).arg("+").arg("-");
            c
        } else {
            let mut c = redis::cmd("XRANGE");
            c.arg(&self.settings.stream).arg("-").arg("+");
            c
        };
        cmd.arg("COUNT").arg(1);
        let reply: redis::streams::StreamRangeReply = self.redis.run(&cmd).await?;
        Ok(reply.ids.first().and_then(|e| parse_id(&e.id)))
    }

    async fn read(&self, from: &str, block: Option<Duration>) -> redis::RedisResult<Vec<RawEntry>> {
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(&self.settings.group)
            .arg(&self.settings.consumer)
            .arg("COUNT")
            .arg(self.read_count);
        if let Some(block) = block {
            cmd.arg("BLOCK").arg(block.as_millis() as u64);
        }
        cmd.arg("STREAMS").arg(&self.settings.stream).arg(from);
        // Parsed by hand: a map per entry (what `StreamReadReply` builds)
        // costs more than the rest of reading at 100,000 entries a second.
        // Reply: [[stream, [[id, [field, value, ...] | nil], ...]]] or nil.
        let reply: Value = self.redis.run(&cmd).await?;
        let mut out = Vec::new();
        let Value::Array(streams) = reply else {
            return Ok(out);
        };
        for stream in streams {
            let Value::Array(mut pair) = stream else {
                continue;
            };
            let Some(Value::Array(entries)) = pair.pop() else {
                continue;
            };
            out.reserve(entries.len());
            for entry in entries {
                let Value::Array(mut parts) = entry else {
                    continue;
                };
                let fields = match parts.pop() {
                    Some(Value::Array(fields)) => fields,
                    _ => Vec::new(),
                };
                let id = match parts.pop() {
                    Some(Value::BulkString(id)) => String::from_utf8_lossy(&id).into_owned(),
                    Some(Value::SimpleString(id)) => id,
                    _ => continue,
                };
                out.push(RawEntry { id, fields });
            }
        }
        Ok(out)
    }

    /// Claims entries other instances (or a previous run of ours) left
    /// unacknowledged for longer than the claim idle time.
    async fn claim(&self, cursor: &str) -> redis::RedisResult<(String, Vec<RawEntry>)> {
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
                    .arg(self.read_count),
            )
            .await?;
        if !reply.deleted_ids.is_empty() {
            // Trimmed from the stream (MAXLEN) before anyone stored them;
            // Redis has already dropped them from the pending list.
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
        let claimed = reply.claimed.into_iter().map(RawEntry::from).collect();
        Ok((reply.next_stream_id, claimed))
    }

    fn entry(&mut self, raw: RawEntry) -> Entry {
        let fields: Vec<(&str, &[u8])> = raw
            .fields
            .chunks_exact(2)
            .map(|pair| {
                (
                    std::str::from_utf8(bytes(&pair[0])).unwrap_or(""),
                    bytes(&pair[1]),
                )
            })
            .collect();
        let rows = decode_entry(&fields)
            .into_iter()
            .map(|click| match click {
                Ok(event) => {
                    let row = self.enricher.row(&event);
                    Ok((event, row))
                }
                Err((error, pairs)) => Err(DeadLetter {
                    entry_id: raw.id.clone(),
                    reason: error.to_string(),
                    fields: pairs
                        .into_iter()
                        .map(|(name, value)| (name.to_owned(), value.to_vec()))
                        .collect(),
                }),
            })
            .collect();
        Entry { id: raw.id, rows }
    }
}

/// A stream entry as read: its id and its fields as a flat
/// `[name, value, name, value, ...]` list (empty for an entry whose content
/// was trimmed).
struct RawEntry {
    id: String,
    fields: Vec<Value>,
}

impl From<StreamId> for RawEntry {
    fn from(entry: StreamId) -> Self {
        let fields = entry
            .map
            .into_iter()
            .flat_map(|(name, value)| [Value::BulkString(name.into_bytes()), value])
            .collect();
        Self {
            id: entry.id,
            fields,
        }
    }
}

/// The bytes of a string reply (empty for anything else).
fn bytes(value: &Value) -> &[u8] {
    match value {
        Value::BulkString(b) => b,
        Value::SimpleString(s) => s.as_bytes(),
        _ => &[],
    }
}

/// A stream id `ms-seq` as a comparable pair.
fn parse_id(id: &str) -> Option<(u64, u64)> {
    let (ms, seq) = id.split_once('-')?;
    Some((ms.parse().ok()?, seq.parse().ok()?))
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
    settings: Arc<Config>,
    metrics: Metrics,
}

/// A row on its way to ClickHouse, with its stream entry.
struct Pending {
    entry_id: String,
    event: ClickEvent,
    row: ClickRow,
}

/// A batch on its way to ClickHouse.
struct Batch {
    /// Every entry to acknowledge once the batch is stored.
    ids: Vec<String>,
    /// Clicks the batch was made of (rows, duplicates and bad ones).
    clicks: usize,
    rows: Vec<Pending>,
    bad: Vec<DeadLetter>,
    seen: HashSet<uuid::Uuid>,
    /// Rows may already be in ClickHouse: check before inserting.
    maybe_stored: bool,
    /// Entries whose group membership was lost: store, but do not ack.
    unowned: bool,
    delivered: Instant,
}

impl Batch {
    fn new(chunk: &Chunk) -> Self {
        Self {
            ids: Vec::new(),
            clicks: 0,
            rows: Vec::new(),
            bad: Vec::new(),
            seen: HashSet::new(),
            maybe_stored: chunk.maybe_stored,
            unowned: false,
            delivered: chunk.delivered,
        }
    }

    /// Adds a chunk's entries; an event id already in the batch (an entry
    /// written twice) is acknowledged without a second row.
    fn add(&mut self, chunk: Chunk, duplicates: &metrics::Counter) {
        self.delivered = self.delivered.min(chunk.delivered);
        self.ids.extend(chunk.gone);
        for entry in chunk.entries {
            self.clicks += entry.rows.len();
            for row in entry.rows {
                match row {
                    Ok((event, row)) => {
                        if self.seen.insert(row.event_id) {
                            self.rows.push(Pending {
                                entry_id: entry.id.clone(),
                                event,
                                row,
                            });
                        } else {
                            duplicates.increment(1);
                        }
                    }
                    Err(dead) => self.bad.push(dead),
                }
            }
            self.ids.push(entry.id);
        }
    }

    fn keep_only(&mut self, owned: &HashSet<String>) {
        self.ids.retain(|id| owned.contains(id));
        self.rows.retain(|p| owned.contains(&p.entry_id));
        self.bad.retain(|d| owned.contains(&d.entry_id));
    }
}

/// Why an attempt to store a batch did not finish.
#[derive(Debug, thiserror::Error)]
enum AttemptError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("Redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("ClickHouse took longer than {0:?}")]
    Slow(Duration),
}

impl Writer {
    async fn run(self, mut rx: mpsc::Receiver<Chunk>, stop: watch::Receiver<bool>) {
        // A previous run of this consumer may have left an insert running in
        // ClickHouse when it died; its entries come back as pending, and
        // checking for their rows is only sound once that insert is over.
        let mut earlier_inserts: Option<String> = Some(format!("{}:%", self.settings.consumer));
        let mut carry: Option<Chunk> = None;
        loop {
            // Asked to stop: finish nothing new; what was not stored stays
            // pending and is read again by the next run.
            if *stop.borrow() {
                return;
            }
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
            batch.add(first, &self.metrics.duplicates);
            while batch.clicks < self.settings.batch_size {
                tokio::select! {
                    chunk = rx.recv() => match chunk {
                        // Rows that may be stored are checked as one batch;
                        // keep them apart from fresh ones.
                        Some(chunk) if chunk.maybe_stored != batch.maybe_stored => {
                            carry = Some(chunk);
                            break;
                        }
                        Some(chunk) => batch.add(chunk, &self.metrics.duplicates),
                        None => break,
                    },
                    () = tokio::time::sleep_until(deadline) => break,
                }
            }
            self.store_batch(batch, &mut earlier_inserts).await;
        }
    }

    /// The longest one ClickHouse call may take: well inside the claim idle
    /// time, so entries cannot be claimed while we still insert them.
    fn call_limit(&self) -> Duration {
        self.settings.claim_idle / 4
    }

    /// Stores one batch, retrying while ClickHouse or Redis are away; returns
    /// once every entry is acknowledged or belongs to another instance.
    async fn store_batch(&self, mut batch: Batch, earlier_inserts: &mut Option<String>) {
        self.metrics.batch_size.record(batch.rows.len() as f64);
        let mut backoff = RETRY_MIN;
        let mut last_query: Option<String> = if batch.maybe_stored {
            earlier_inserts.take()
        } else {
            None
        };
        let mut last_touch = batch.delivered;
        loop {
            match self
                .attempt(&mut batch, &mut last_touch, &mut last_query)
                .await
            {
                Ok(()) => break,
                Err(error) => {
                    self.metrics.retries.increment(1);
                    tracing::warn!(%error, rows = batch.rows.len(), "cannot store click events; retrying");
                    // Whatever that attempt sent may have landed.
                    batch.maybe_stored = true;
                    self.wait(&mut backoff).await;
                }
            }
        }
        if batch.unowned {
            return;
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

    /// One try at storing the batch: re-claim if needed, make sure an
    /// earlier attempt is over, skip rows already stored, dead-letter bad
    /// entries, insert the rest. On success `batch.rows` is empty.
    async fn attempt(
        &self,
        batch: &mut Batch,
        last_touch: &mut Instant,
        last_query: &mut Option<String>,
    ) -> Result<(), AttemptError> {
        self.fence(batch, last_touch).await?;
        if batch.ids.is_empty() {
            return Ok(());
        }
        if !batch.bad.is_empty() {
            self.dead_letter(&batch.bad).await?;
            batch.bad.clear();
        }
        if batch.rows.is_empty() {
            return Ok(());
        }
        // An earlier attempt (`last_query`) makes the batch maybe stored.
        if batch.maybe_stored {
            self.skip_stored(batch, last_query).await?;
        }
        let started = Instant::now();
        let refused = self.insert_splitting(batch, last_touch, last_query).await?;
        self.metrics
            .insert_seconds
            .record(started.elapsed().as_secs_f64());
        self.metrics
            .inserted
            .increment((batch.rows.len() - refused.len()) as u64);
        if !refused.is_empty() {
            self.dead_letter(&refused).await?;
        }
        batch.rows.clear();
        Ok(())
    }

    async fn bounded<T>(
        &self,
        call: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> Result<Result<T, StoreError>, AttemptError> {
        tokio::time::timeout(self.call_limit(), call)
            .await
            .map_err(|_| AttemptError::Slow(self.call_limit()))
    }

    /// The event ids among `rows` that ClickHouse already holds, asked only
    /// once the earlier insert attempt (`last_query`), if any, is over.
    async fn stored_ids(
        &self,
        rows: &[ClickRow],
        last_query: &mut Option<String>,
    ) -> Result<HashSet<uuid::Uuid>, AttemptError> {
        if let Some(query_id) = last_query.take() {
            self.bounded(self.store.wait_for_query(&query_id)).await??;
        }
        Ok(self
            .bounded(self.store.existing(rows))
            .await??
            .into_iter()
            .collect())
    }

    /// Drops the rows of `batch` that ClickHouse already holds.
    async fn skip_stored(
        &self,
        batch: &mut Batch,
        last_query: &mut Option<String>,
    ) -> Result<(), AttemptError> {
        let rows: Vec<ClickRow> = batch.rows.iter().map(|p| p.row.clone()).collect();
        let existing = self.stored_ids(&rows, last_query).await?;
        if !existing.is_empty() {
            self.metrics.duplicates.increment(existing.len() as u64);
            tracing::info!(
                rows = existing.len(),
                "skipping click events already stored"
            );
            batch.rows.retain(|p| !existing.contains(&p.row.event_id));
        }
        Ok(())
    }

    /// Re-claims the batch's entries if they were delivered long enough ago
    /// that another instance could be about to claim them; keeps only what
    /// is still ours (or was trimmed from the stream: nobody else has it).
    async fn fence(&self, batch: &mut Batch, last_touch: &mut Instant) -> Result<(), AttemptError> {
        if batch.unowned || last_touch.elapsed() <= self.settings.claim_idle / 4 {
            return Ok(());
        }
        let since = last_touch.elapsed();
        match self.touch(&batch.ids, since).await {
            Ok(mut owned) => {
                *last_touch = Instant::now();
                if owned.len() < batch.ids.len() {
                    let missing: Vec<String> = batch
                        .ids
                        .iter()
                        .filter(|id| !owned.contains(*id))
                        .cloned()
                        .collect();
                    let others = self.pending_elsewhere(&missing).await?;
                    let lost = others.len();
                    // Not pending anywhere: trimmed from the stream (or
                    // stored and acknowledged by another instance, which the
                    // existence check finds). Store it; nothing to ack.
                    owned.extend(missing.into_iter().filter(|id| !others.contains(id)));
                    if lost > 0 {
                        tracing::warn!(
                            lost,
                            "click events were claimed by another instance; leaving them to it"
                        );
                    }
                    batch.keep_only(&owned);
                    batch.maybe_stored = true;
                }
                Ok(())
            }
            Err(error) if error.code() == Some("NOGROUP") => {
                // The group is gone (Redis lost it): nobody owns these
                // entries any more. Store the rows, checking for them first;
                // the entries come back as re-checked ones once the group is
                // made again.
                tracing::warn!(
                    "the consumer group is gone; storing the batch without acknowledging it"
                );
                batch.unowned = true;
                batch.maybe_stored = true;
                Ok(())
            }
            Err(error) => Err(error.into()),
        }
    }

    /// Which of `ids` are pending for another consumer.
    async fn pending_elsewhere(&self, ids: &[String]) -> redis::RedisResult<HashSet<String>> {
        let mut pipe = redis::pipe();
        for id in ids {
            pipe.cmd("XPENDING")
                .arg(&self.settings.stream)
                .arg(&self.settings.group)
                .arg(id)
                .arg(id)
                .arg(1);
        }
        let replies: Vec<Vec<(String, String, u64, u64)>> = self.redis.pipe(&pipe).await?;
        Ok(replies
            .into_iter()
            .flatten()
            .filter(|(_, consumer, _, _)| *consumer != self.settings.consumer)
            .map(|(id, _, _, _)| id)
            .collect())
    }

    /// Inserts the batch's rows; rows ClickHouse refuses as data are found by
    /// halving and returned as dead letters. A refused insert may still have
    /// written part of its rows (a materialized view failing after the table
    /// took them), so halves are checked before they are sent again. When
    /// every row is refused the problem is not the data (a schema mismatch,
    /// say): that is an error, retried, and nothing is dead-lettered.
    async fn insert_splitting(
        &self,
        batch: &Batch,
        last_touch: &mut Instant,
        last_query: &mut Option<String>,
    ) -> Result<Vec<DeadLetter>, AttemptError> {
        let all: Vec<ClickRow> = batch.rows.iter().map(|p| p.row.clone()).collect();
        let total = all.len();
        let mut refused: Vec<(ClickRow, String)> = Vec::new();
        let mut todo = vec![(all, false)];
        while let Some((mut rows, check)) = todo.pop() {
            if check {
                if last_touch.elapsed() > self.settings.claim_idle / 4 {
                    // Splitting takes a while: make sure nobody claimed the
                    // entries meanwhile (the caller retries from the top).
                    return Err(AttemptError::Slow(self.call_limit()));
                }
                let existing = self.stored_ids(&rows, last_query).await?;
                rows.retain(|r| !existing.contains(&r.event_id));
            }
            if rows.is_empty() {
                continue;
            }
            let query_id = format!("{}:{}", self.settings.consumer, uuid::Uuid::new_v4());
            *last_query = Some(query_id.clone());
            match self.bounded(self.store.insert(&rows, &query_id)).await? {
                Ok(()) => {}
                Err(StoreError::Data(reason)) if rows.len() == 1 => {
                    refused.extend(rows.into_iter().map(|r| (r, reason.clone())));
                }
                Err(StoreError::Data(_)) => {
                    let mut first = rows;
                    let second = first.split_off(first.len() / 2);
                    todo.push((second, true));
                    todo.push((first, true));
                }
                Err(unavailable) => return Err(unavailable.into()),
            }
        }
        *last_query = None;
        if total > 1 && refused.len() == total {
            return Err(StoreError::Unavailable(format!(
                "ClickHouse refused every row of the batch, which points at the schema, not the data: {}",
                refused[0].1
            ))
            .into());
        }
        // A single refused row may have been written by an insert that
        // failed in a materialized view: if it is there, it is stored.
        let mut dead = Vec::new();
        for (row, reason) in refused {
            let stored = self
                .stored_ids(std::slice::from_ref(&row), last_query)
                .await?;
            if !stored.is_empty() {
                continue;
            }
            if let Some(p) = batch.rows.iter().find(|p| p.row.event_id == row.event_id) {
                dead.push(DeadLetter {
                    entry_id: p.entry_id.clone(),
                    reason,
                    fields: p
                        .event
                        .to_stream_fields()
                        .into_iter()
                        .map(|(n, v)| (n.to_owned(), v.into_bytes()))
                        .collect(),
                });
            }
        }
        Ok(dead)
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
