//! Click events, from the hot path to the Redis stream.
//!
//! The hot path hands each click to [`ClickQueue::push`], which never waits:
//! it encodes the click's values into one small allocation (about 250 bytes
//! for a browser click) and sends that down an unbounded channel. Holding
//! the request's header bytes instead would keep hyper's read buffer shared,
//! so it would have to allocate a new one for the next request, and each
//! header would be reference-counted twice across threads. The shipper task
//! keeps at most `capacity` clicks and ships them in batches to the stream.
//!
//! Delivery to the stream is exactly once per accepted click, as long as the
//! edge is not killed and the queue does not overflow:
//! - Batches are numbered per edge process and written one at a time by a
//!   Lua script that `XADD`s the batch (up to [`MAX_BATCH`] clicks) as
//!   packed entries of up to [`ENTRY_CLICKS`] (format in
//!   `shortener_common::event`) and records the batch number under the
//!   process's own key, atomically, and does nothing for a number already
//!   recorded. A batch whose outcome is unknown (a timeout, a dropped
//!   connection) is retried with the same number, so it can never land
//!   twice.
//! - While Redis is unreachable the shipper keeps clicks and retries with
//!   backoff. Beyond `capacity` it drops the oldest clicks that are not in
//!   the batch being retried, and counts each drop in
//!   `edge_click_events_dropped_total`.
//! - On shutdown the shipper flushes what it holds (for up to the drain
//!   period) before the process exits.

use std::collections::VecDeque;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use http::HeaderValue;
use shortener_common::ClickEvent;
use shortener_common::event::{
    ENTRY_CLICKS, PACKED_CLICKS, PACKED_COLUMNS, PACKED_FIELDS, write_packed_record,
};
use shortener_common::redis_conn::LazyRedis;
use tokio::sync::{mpsc, watch};

use crate::journal::{Journal, JournalShipping};

/// Most clicks written by one script call (in entries of [`ENTRY_CLICKS`]):
/// bounds how long Redis is busy with one call (about a millisecond) and
/// lets a backlog drain at tens of thousands of clicks per round trip.
pub(crate) const MAX_BATCH: usize = 2_000;
/// How long an edge's batch-number key outlives its last batch.
pub(crate) const SEQUENCE_TTL_SECS: u64 = 7 * 24 * 3_600;
/// After a batch that was not full, the next waits until this long after
/// it started, gathering clicks meanwhile. Under load that makes batches
/// full (Redis's cost per call is then spread over a hundred clicks); an
/// idle edge still ships a lone click at once.
pub(crate) const LINGER: Duration = Duration::from_millis(2);
/// How often the memory shipper takes in new clicks while a call is out,
/// to hold the cap; rarely, so the hot path's sends seldom wake it.
const TAKE_EVERY: Duration = Duration::from_millis(10);
/// Backoff between retries while Redis is unreachable.
pub(crate) const RETRY_MIN: Duration = Duration::from_millis(50);
pub(crate) const RETRY_MAX: Duration = Duration::from_secs(1);

/// A click as the request sees it, borrowing the request's code and headers.
pub struct RawClick<'a> {
    pub event_id: u128,
    pub code: &'a str,
    pub ts_ms: i64,
    pub ip: IpAddr,
    pub user_agent: Option<&'a HeaderValue>,
    pub referer: Option<&'a HeaderValue>,
    pub accept_language: Option<&'a HeaderValue>,
}

impl RawClick<'_> {
    pub fn into_event(self) -> ClickEvent {
        let text = |v: Option<&HeaderValue>| v.and_then(|v| v.to_str().ok().map(str::to_owned));
        ClickEvent {
            event_id: self.event_id,
            code: self.code.to_owned(),
            ts_ms: self.ts_ms,
            ip: self.ip,
            user_agent: text(self.user_agent),
            referer: text(self.referer),
            accept_language: text(self.accept_language),
        }
    }

    /// The click's stream field values in one allocation (about 250 bytes
    /// for a browser click), so a long backlog stays small in memory.
    fn encode(&self) -> Encoded {
        let mut bytes = Vec::with_capacity(256);
        let ends = self.write_values(&mut bytes);
        Encoded {
            bytes: bytes.into_boxed_slice(),
            ends,
        }
    }

    /// Appends the seven stream field values to `out`, exactly as
    /// [`ClickEvent::to_stream_fields`] writes them, without building the
    /// event; returns where each ends, counted from where it started.
    pub(crate) fn write_values(&self, out: &mut Vec<u8>) -> [u16; 7] {
        use std::io::Write;
        let start = out.len();
        let mut ends = [0u16; 7];
        fn text<'h>(v: &Option<&'h HeaderValue>) -> &'h [u8] {
            v.and_then(|v| v.to_str().ok()).map_or(&[], str::as_bytes)
        }
        for (i, end) in ends.iter_mut().enumerate() {
            let before = out.len();
            // Formatted by hand: `write!` costs more than the rest of a
            // click's encoding on the hot path.
            let mut number = itoa::Buffer::new();
            match i {
                0 => {
                    const HEX: &[u8; 16] = b"0123456789abcdef";
                    out.extend(
                        (0..32)
                            .rev()
                            .map(|d| HEX[(self.event_id >> (4 * d)) as usize & 15]),
                    );
                }
                1 => out.extend_from_slice(self.code.as_bytes()),
                2 => out.extend_from_slice(number.format(self.ts_ms).as_bytes()),
                3 => match self.ip {
                    IpAddr::V4(v4) => {
                        for (n, octet) in v4.octets().into_iter().enumerate() {
                            if n > 0 {
                                out.push(b'.');
                            }
                            out.extend_from_slice(number.format(octet).as_bytes());
                        }
                    }
                    IpAddr::V6(v6) => {
                        let _ = write!(out, "{v6}");
                    }
                },
                4 => out.extend_from_slice(text(&self.user_agent)),
                5 => out.extend_from_slice(text(&self.referer)),
                _ => out.extend_from_slice(text(&self.accept_language)),
            }
            // Header values are bounded by EDGE_MAX_HEADER_BYTES (< 64 KiB);
            // cut defensively rather than wrap.
            let room = (u16::MAX as usize).saturating_sub(before - start);
            out.truncate(before + (out.len() - before).min(room));
            *end = (out.len() - start) as u16;
        }
        ends
    }
}

/// One click's stream field values, back to back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Encoded {
    bytes: Box<[u8]>,
    ends: [u16; 7],
}

impl Encoded {
    pub(crate) fn from_parts(bytes: Box<[u8]>, ends: [u16; 7]) -> Self {
        Self { bytes, ends }
    }

    pub(crate) fn values(&self) -> impl Iterator<Item = &[u8]> {
        let mut start = 0usize;
        self.ends.iter().map(move |&end| {
            let value = &self.bytes[start..end as usize];
            start = end as usize;
            value
        })
    }
}

/// Where and how clicks are shipped.
#[derive(Debug, Clone)]
pub struct ShipperConfig {
    /// Redis stream key (`CLICK_STREAM`).
    pub stream: String,
    /// Clicks the stream holds at most (`CLICK_STREAM_MAXLEN`).
    pub max_len: u64,
    /// Clicks held in memory at most (`EDGE_CLICK_QUEUE`).
    pub capacity: usize,
    /// Bytes the journal may hold while Redis is away
    /// (`EDGE_CLICK_JOURNAL_MAX_BYTES`), when there is a journal.
    pub journal_max_bytes: u64,
}

#[derive(Clone)]
pub struct ClickQueue {
    /// Where clicks go when there is a journal.
    journal: Option<Arc<Journal>>,
    /// Where clicks go without a journal; neither when click events are off
    /// (clicks are only counted).
    tx: Option<mpsc::UnboundedSender<Encoded>>,
    /// Clicks pushed and not yet shipped or dropped (channel and shipper).
    depth: Arc<AtomicUsize>,
    accepted: metrics::Counter,
    dropped: metrics::Counter,
}

/// The running shipper: tell it to stop, then await it to let it flush.
pub struct Shipper {
    stop: watch::Sender<Option<Duration>>,
    task: tokio::task::JoinHandle<()>,
}

impl Shipper {
    /// Ships what is still held, for up to `flush` while Redis refuses, then
    /// returns.
    pub async fn flush_and_stop(self, flush: Duration) {
        let _ = self.stop.send(Some(flush));
        let _ = self.task.await;
    }
}

impl ClickQueue {
    /// A queue and its shipper task. With `redis` absent, clicks are only
    /// counted (click events switched off). With a `journal`, clicks are
    /// written to it and shipped from it.
    pub fn start(
        redis: Option<LazyRedis>,
        journal: Option<Arc<Journal>>,
        config: ShipperConfig,
    ) -> (Self, Shipper) {
        let depth = Arc::new(AtomicUsize::new(0));
        let (stop_tx, stop_rx) = watch::channel(None);
        let dropped = metrics::counter!("edge_click_events_dropped_total");
        let (journal, tx, task) = match (redis, journal) {
            // Click events off: clicks are only counted.
            (None, _) => (None, None, tokio::spawn(async {})),
            (Some(redis), Some(journal)) => {
                let task = tokio::spawn(
                    JournalShipping {
                        journal: journal.clone(),
                        redis: Arc::new(redis),
                        stream: config.stream.clone(),
                        max_len: config.max_len,
                        max_bytes: config.journal_max_bytes,
                        // Several segments fit under the cap, so rotating
                        // never drops clicks while Redis keeps up.
                        rotate_bytes: crate::journal::ROTATE_BYTES
                            .min(config.journal_max_bytes / 4)
                            .max(4_096),
                        stop: stop_rx,
                        dropped: dropped.clone(),
                    }
                    .run(),
                );
                (Some(journal), None, task)
            }
            (Some(redis), None) => {
                let (tx, rx) = mpsc::unbounded_channel::<Encoded>();
                let task = tokio::spawn(
                    Shipping {
                        rx,
                        redis: Arc::new(redis),
                        config,
                        depth: depth.clone(),
                        dropped: dropped.clone(),
                        pending: VecDeque::new(),
                        stop: stop_rx,
                    }
                    .run(),
                );
                (None, Some(tx), task)
            }
        };
        (
            Self {
                journal,
                tx,
                depth,
                accepted: metrics::counter!("edge_click_events_total"),
                dropped,
            },
            Shipper {
                stop: stop_tx,
                task,
            },
        )
    }

    pub fn push(&self, click: RawClick<'_>) {
        self.accepted.increment(1);
        if let Some(journal) = &self.journal {
            if let Err(error) = journal.append(&click) {
                self.dropped.increment(1);
                journal_write_failed(&error);
            }
            return;
        }
        let Some(tx) = &self.tx else {
            return;
        };
        self.depth.fetch_add(1, Ordering::Relaxed);
        if tx.send(click.encode()).is_err() {
            // The shipper has stopped (shutdown): nothing will ship it.
            self.depth.fetch_sub(1, Ordering::Relaxed);
            self.dropped.increment(1);
        }
    }
}

/// Logs a failed journal write: the first, then one in 10,000 (a full disk
/// fails every write).
fn journal_write_failed(error: &std::io::Error) {
    static FAILURES: AtomicUsize = AtomicUsize::new(0);
    if FAILURES
        .fetch_add(1, Ordering::Relaxed)
        .is_multiple_of(10_000)
    {
        tracing::error!(%error, "cannot write a click to the journal; it is lost");
    }
}

struct Shipping {
    rx: mpsc::UnboundedReceiver<Encoded>,
    redis: Arc<LazyRedis>,
    config: ShipperConfig,
    depth: Arc<AtomicUsize>,
    dropped: metrics::Counter,
    /// Encoded clicks, oldest first, not yet in a batch.
    pending: VecDeque<Encoded>,
    stop: watch::Receiver<Option<Duration>>,
}

/// The batch script. KEYS: stream, the batch-number key (a hash with field
/// `batch`). ARGV: max length in entries, batch number, key TTL, the packed
/// entries' `fields`, then each entry's `clicks`. Adds the entries (format
/// in `shortener_common::event`) and returns how many, or 0 for a batch
/// already written.
fn script() -> redis::Script {
    redis::Script::new(&format!(
        r"
if tonumber(redis.call('HGET', KEYS[2], 'batch') or '0') >= tonumber(ARGV[2]) then
  return 0
end
for i = 5, #ARGV do
  redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', '{PACKED_FIELDS}', ARGV[4], '{PACKED_CLICKS}', ARGV[i])
end
redis.call('HSET', KEYS[2], 'batch', ARGV[2])
redis.call('EXPIRE', KEYS[2], ARGV[3])
return #ARGV - 4
"
    ))
}

/// The stream's `MAXLEN` in entries for `CLICK_STREAM_MAXLEN` in clicks.
/// Entries hold 1 to [`ENTRY_CLICKS`] clicks (few when traffic is low), so
/// the clicks a process has been putting in each entry (a moving average)
/// decide how many entries make that many clicks.
pub(crate) struct StreamLimit {
    max_len: u64,
    clicks_per_entry: f64,
}

impl StreamLimit {
    pub(crate) fn new(max_len: u64) -> Self {
        Self {
            max_len,
            clicks_per_entry: 0.0,
        }
    }

    /// The `MAXLEN` for a call writing `clicks` clicks.
    pub(crate) fn entries_for(&mut self, clicks: usize) -> u64 {
        let entries = clicks.div_ceil(ENTRY_CLICKS).max(1);
        let fill = clicks.max(1) as f64 / entries as f64;
        self.clicks_per_entry = if self.clicks_per_entry == 0.0 {
            fill
        } else {
            self.clicks_per_entry + (fill - self.clicks_per_entry) / 32.0
        };
        ((self.max_len as f64 / self.clicks_per_entry).ceil() as u64).max(1)
    }
}

/// Writes batches to the stream with the batch [`script`], trimming it to
/// about `CLICK_STREAM_MAXLEN` clicks: what the memory shipper and the
/// journal shipper share.
pub(crate) struct BatchWriter {
    script: redis::Script,
    stream: String,
    limit: StreamLimit,
}

impl BatchWriter {
    pub(crate) fn new(stream: String, max_len: u64) -> Self {
        Self {
            script: script(),
            stream,
            limit: StreamLimit::new(max_len),
        }
    }

    /// One call of the script: `batch` written as packed entries of up to
    /// [`ENTRY_CLICKS`], numbered `number` under `sequence_key`.
    pub(crate) fn invocation(
        &mut self,
        sequence_key: &str,
        number: u64,
        batch: &[Encoded],
    ) -> redis::ScriptInvocation<'_> {
        let max_entries = self.limit.entries_for(batch.len());
        let mut invocation = self.script.prepare_invoke();
        invocation
            .key(&self.stream)
            .key(sequence_key)
            .arg(max_entries)
            .arg(number)
            .arg(SEQUENCE_TTL_SECS)
            .arg(PACKED_COLUMNS);
        for entry in batch.chunks(ENTRY_CLICKS) {
            let mut clicks = Vec::with_capacity(entry.iter().map(|c| c.bytes.len() + 7).sum());
            for click in entry {
                write_packed_record(&mut clicks, click.values());
            }
            invocation.arg(clicks);
        }
        invocation
    }
}

impl Shipping {
    async fn run(mut self) {
        let shipped = metrics::counter!("edge_click_events_shipped_total");
        let errors = metrics::counter!("edge_click_ship_errors_total");
        let depth_gauge = metrics::gauge!("edge_click_queue_depth");
        let mut writer = BatchWriter::new(self.config.stream.clone(), self.config.max_len);
        // One key per edge process; the hash tag keeps it in the stream's
        // slot on a Redis Cluster, as a script's keys must be.
        let sequence_key = format!(
            "{{{}}}:edge:{:016x}",
            self.config.stream,
            rand::random::<u64>()
        );
        let mut sequence: u64 = 0;
        let mut raw = Vec::with_capacity(MAX_BATCH);
        let mut flush_deadline: Option<tokio::time::Instant> = None;
        let mut open = true;
        // When the last call started, if its batch was not full.
        let mut linger_from: Option<tokio::time::Instant> = None;
        loop {
            // Wait for clicks, unless some are already held.
            if self.pending.is_empty() && open {
                tokio::select! {
                    n = self.rx.recv_many(&mut raw, MAX_BATCH) => {
                        if n == 0 { open = false; }
                    }
                    _ = self.stop.changed(), if flush_deadline.is_none() => {
                        self.begin_flush(&mut flush_deadline);
                    }
                }
            }
            self.take_arrived(&mut raw);
            if let Some(from) = linger_from.take()
                && self.pending.len() < MAX_BATCH
                && flush_deadline.is_none()
            {
                self.while_waiting(
                    tokio::time::sleep_until(from + LINGER),
                    &mut raw,
                    &mut flush_deadline,
                )
                .await;
                self.take_ready(&mut raw).await;
            }
            depth_gauge.set(self.depth.load(Ordering::Relaxed) as f64);
            if self.pending.is_empty() {
                if !open || (flush_deadline.is_some() && self.rx.is_empty()) {
                    return;
                }
                continue;
            }
            let n = self.pending.len().min(MAX_BATCH);
            let batch: Vec<Encoded> = self.pending.drain(..n).collect();
            linger_from = (n < MAX_BATCH).then(tokio::time::Instant::now);
            sequence += 1;
            let invocation = writer.invocation(&sequence_key, sequence, &batch);
            let mut backoff = RETRY_MIN;
            loop {
                let call = self.redis.clone();
                let result = self
                    .while_waiting(
                        call.invoke::<i64>(&invocation),
                        &mut raw,
                        &mut flush_deadline,
                    )
                    .await;
                depth_gauge.set(self.depth.load(Ordering::Relaxed) as f64);
                match result {
                    Ok(_) => {
                        shipped.increment(batch.len() as u64);
                        self.depth.fetch_sub(batch.len(), Ordering::Relaxed);
                        depth_gauge.set(self.depth.load(Ordering::Relaxed) as f64);
                        break;
                    }
                    Err(error) => {
                        errors.increment(1);
                        tracing::warn!(%error, clicks = batch.len(), "cannot ship click events; retrying");
                        if flush_deadline.is_some_and(|d| tokio::time::Instant::now() >= d) {
                            let lost = batch.len() + self.pending.len() + self.rx.len();
                            tracing::error!(
                                lost,
                                "shutting down with click events that could not be shipped"
                            );
                            self.dropped.increment(lost as u64);
                            return;
                        }
                        self.while_waiting(
                            tokio::time::sleep(backoff),
                            &mut raw,
                            &mut flush_deadline,
                        )
                        .await;
                        backoff = (backoff * 2).min(RETRY_MAX);
                    }
                }
            }
        }
    }

    /// Waits for `until` (a linger, a call to Redis, a backoff), meanwhile taking in
    /// new clicks every [`TAKE_EVERY`] (so the cap holds and the channel
    /// stays short, without the hot path waking this task on every send)
    /// and noting a request to stop.
    async fn while_waiting<T>(
        &mut self,
        until: impl std::future::Future<Output = T>,
        raw: &mut Vec<Encoded>,
        flush_deadline: &mut Option<tokio::time::Instant>,
    ) -> T {
        tokio::pin!(until);
        let mut take = tokio::time::interval(TAKE_EVERY);
        loop {
            tokio::select! {
                out = &mut until => return out,
                _ = take.tick() => self.take_ready(raw).await,
                _ = self.stop.changed(), if flush_deadline.is_none() => {
                    self.begin_flush(flush_deadline);
                }
            }
        }
    }

    /// Shutdown: stop taking clicks and ship what is held for up to the
    /// flush period.
    fn begin_flush(&mut self, deadline: &mut Option<tokio::time::Instant>) {
        let flush = (*self.stop.borrow()).unwrap_or_default();
        *deadline = Some(tokio::time::Instant::now() + flush);
        self.rx.close();
    }

    /// Takes in the clicks already in the channel, without waiting.
    async fn take_ready(&mut self, raw: &mut Vec<Encoded>) {
        if !self.rx.is_empty() {
            self.rx.recv_many(raw, self.config.capacity.max(1)).await;
            self.take_arrived(raw);
        }
    }

    /// Moves the clicks in `raw` into `pending`, dropping the oldest held
    /// clicks beyond the capacity.
    fn take_arrived(&mut self, raw: &mut Vec<Encoded>) {
        self.pending.extend(raw.drain(..));
        let excess = self.pending.len().saturating_sub(self.config.capacity);
        if excess > 0 {
            self.pending.drain(..excess);
            self.depth.fetch_sub(excess, Ordering::Relaxed);
            self.dropped.increment(excess as u64);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_raw_click_becomes_the_shared_event() {
        let (agent, language) = (
            HeaderValue::from_static("Mozilla/5.0"),
            HeaderValue::from_bytes(b"\xff").unwrap(),
        );
        let event = RawClick {
            event_id: 42,
            code: "abc",
            ts_ms: 7,
            ip: "192.0.2.1".parse().unwrap(),
            user_agent: Some(&agent),
            referer: None,
            accept_language: Some(&language),
        }
        .into_event();
        assert_eq!(event.code, "abc");
        assert_eq!(event.user_agent.as_deref(), Some("Mozilla/5.0"));
        assert_eq!(event.referer, None);
        // Headers that are not text are left out rather than mangled.
        assert_eq!(event.accept_language, None);
    }

    #[tokio::test]
    async fn a_call_writes_entries_of_a_hundred_once_per_batch_number() {
        let redis = shortener_common::testing::TestRedis::start();
        let lazy = LazyRedis::new(&redis.url()).unwrap();
        let agent = HeaderValue::from_static("curl/8");
        let codes: Vec<String> = (0..250).map(|i| format!("c{i}")).collect();
        let batch: Vec<Encoded> = codes
            .iter()
            .enumerate()
            .map(|(i, code)| {
                RawClick {
                    event_id: i as u128,
                    code,
                    ts_ms: 1_767_225_600_000,
                    ip: "192.0.2.1".parse().unwrap(),
                    user_agent: Some(&agent),
                    referer: None,
                    accept_language: None,
                }
                .encode()
            })
            .collect();
        let mut writer = BatchWriter::new("clicks".into(), 100_000);
        let call = writer.invocation("{clicks}:edge:t", 7, &batch);
        assert_eq!(lazy.invoke::<i64>(&call).await.unwrap(), 3);
        // The same batch number again (a retry whose first try landed)
        // adds nothing; the next number does.
        assert_eq!(lazy.invoke::<i64>(&call).await.unwrap(), 0);
        let mut conn = redis::Client::open(redis.url())
            .unwrap()
            .get_connection()
            .unwrap();
        let len: usize = redis::cmd("XLEN").arg("clicks").query(&mut conn).unwrap();
        assert_eq!(len, 3, "entries of 100, 100 and 50");
        let clicks = shortener_common::testing::stream_clicks(&mut conn, "clicks");
        let ids: Vec<u128> = clicks.iter().map(|c| c.event_id).collect();
        assert_eq!(ids, (0..250).collect::<Vec<u128>>());
        assert_eq!(clicks[249].code, "c249");
        let next = writer.invocation("{clicks}:edge:t", 8, &batch[..1]);
        assert_eq!(lazy.invoke::<i64>(&next).await.unwrap(), 1);
    }

    #[test]
    fn the_stream_limit_in_entries_follows_how_full_entries_are() {
        let mut limit = StreamLimit::new(1_000_000);
        // Full entries: a hundred clicks each.
        assert_eq!(limit.entries_for(2_000), 10_000);
        // Traffic falls to one click per call: the limit grows with it, a
        // little per call.
        let mut previous = 10_000;
        for _ in 0..500 {
            let now = limit.entries_for(1);
            assert!(now >= previous);
            previous = now;
        }
        assert!(previous > 900_000, "{previous}");
        // A call of 150 clicks is two entries of 75.
        let mut limit = StreamLimit::new(1_500);
        assert_eq!(limit.entries_for(150), 20);
    }

    proptest::proptest! {
        /// The hand-written encoding matches the shared event's stream
        /// fields, whatever the id, time and address.
        #[test]
        fn the_compact_encoding_holds_the_stream_fields(
            event_id in proptest::prelude::any::<u128>(),
            ts_ms in 0..i64::MAX,
            v4 in proptest::prelude::any::<[u8; 4]>(),
            v6 in proptest::prelude::any::<[u16; 8]>(),
            use_v6 in proptest::prelude::any::<bool>(),
        ) {
            let (agent, referer) = (
                HeaderValue::from_static("curl/8"),
                HeaderValue::from_static("https://news.example/"),
            );
            let click = || RawClick {
                event_id,
                code: "xyz",
                ts_ms,
                ip: if use_v6 { IpAddr::from(v6) } else { IpAddr::from(v4) },
                user_agent: Some(&agent),
                referer: Some(&referer),
                accept_language: None,
            };
            let expected = click().into_event().to_stream_fields();
            let encoded = click().encode();
            let values: Vec<&[u8]> = encoded.values().collect();
            proptest::prop_assert_eq!(values.len(), 7);
            for ((_, want), got) in expected.iter().zip(values) {
                proptest::prop_assert_eq!(want.as_bytes(), got);
            }
        }
    }
}
