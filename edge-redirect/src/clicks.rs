//! Click events, from the hot path to the Redis stream.
//!
//! The hot path hands each click to [`ClickQueue::push`], which never waits
//! on anything but its own thread's slot: it writes the click as a packed
//! record (the stream's format, about 250 bytes for a browser click) onto
//! the bunch of its worker thread's slot. A bunch of [`ENTRY_CLICKS`] goes
//! down an unbounded channel as it fills; the shipper takes partial bunches
//! itself when it has nothing else to ship (and at least every
//! `SWEEP_EVERY`), and a push that starts a bunch wakes an idle shipper, so
//! a lone click is shipped at once. Each bunch becomes one stream entry
//! as it is. A click is copied three times after the request: into its
//! slot's bunch, which keeps its buffer so the thread writes memory already
//! in its core's cache; out of it in one pass when the bunch is handed
//! over; into the Redis command. No allocation, channel send or shared
//! counter is paid per click. Encoding from the request's headers rather
//! than holding them keeps hyper's read buffer unshared. The shipper keeps
//! at most about `capacity` clicks and ships them in batches to the stream.
//!
//! Delivery to the stream is exactly once per accepted click, as long as the
//! edge is not killed and the queue does not overflow:
//! - Batches are numbered per edge process and written one at a time, each
//!   (up to `MAX_BATCH`, 2,000, clicks, as packed entries of up to
//!   [`ENTRY_CLICKS`]; format in `shortener_common::event`) in one
//!   transaction that also records the batch number under the process's
//!   own key. A batch whose outcome is unknown (a timeout, a dropped
//!   connection) is retried with the same number and can never land twice
//!   (`crate::batch` says how).
//! - While Redis is unreachable the shipper keeps clicks and retries with
//!   backoff. Beyond `capacity` it drops the oldest clicks that are not in
//!   the batch being retried (whole bunches, then records cut from the
//!   oldest), and counts each in `edge_click_events_dropped_total`.
//! - On shutdown the shipper takes the partial bunches a last time (later
//!   pushes are dropped and counted) and flushes what it holds (for up to
//!   the drain period) before the process exits.

use std::collections::VecDeque;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use http::HeaderValue;
use shortener_common::ClickEvent;
use shortener_common::event::{ENTRY_CLICKS, RECORD_END, VALUE_SEPARATOR};
use shortener_common::redis_conn::LazyRedis;
use tokio::sync::{Notify, mpsc, watch};

use crate::batch::BatchWriter;
use crate::journal::{Journal, JournalShipping};
use crate::tally::Tally;

/// Most clicks written by one batch (in entries of [`ENTRY_CLICKS`]):
/// bounds how long Redis is busy with one call (about a millisecond) and
/// lets a backlog drain at tens of thousands of clicks per round trip.
pub(crate) const MAX_BATCH: usize = 2_000;
/// How long an edge's batch-number key outlives its last batch.
pub(crate) const SEQUENCE_TTL_SECS: u64 = 7 * 24 * 3_600;
/// After a batch that was not full, the next waits until this long after
/// it started, gathering clicks meanwhile. Under load that makes batches
/// big (at 100,000 clicks/s, a thousand per call instead of about 300 with
/// 2 ms: Redis is woken, and takes the edge's core, a fifth as often); an
/// idle edge still ships a lone click at once.
pub(crate) const LINGER: Duration = Duration::from_millis(10);
/// How often the memory shipper takes in new clicks while a call is out,
/// to hold the cap; rarely, so the hot path's sends seldom wake it.
const TAKE_EVERY: Duration = Duration::from_millis(10);
/// Bunches taken from the channel at once.
const RECEIVE: usize = 1_024;
/// Longest a partial bunch waits in its slot while full ones keep the
/// shipper busy.
const SWEEP_EVERY: Duration = Duration::from_millis(50);
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

    /// The click's stream field values in one allocation, as the journal
    /// shipper holds them (tests build batches with it).
    #[cfg(test)]
    pub(crate) fn encode(&self) -> Encoded {
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
        self.write(out, None)
    }

    /// Appends the click as one packed record (the stream's format, see
    /// `shortener_common::event`): the values separated by
    /// [`VALUE_SEPARATOR`], then [`RECORD_END`]. Neither byte can occur in
    /// a header value, a code, a number or an address.
    pub(crate) fn write_record(&self, out: &mut Vec<u8>) {
        self.write(out, Some(VALUE_SEPARATOR));
        out.push(RECORD_END);
    }

    // Inlined, so that a record's write drops the value ends it does not
    // use (returned through the stack, they stalled every call).
    #[inline(always)]
    fn write(&self, out: &mut Vec<u8>, separator: Option<u8>) -> [u16; 7] {
        use std::io::Write;
        /// The header's bytes if it is text (visible ASCII or tab, what
        /// `HeaderValue::to_str` accepts), else nothing. Written as a fold
        /// rather than `to_str`'s early return, so it runs a word at a time.
        fn text(v: Option<&HeaderValue>) -> &[u8] {
            let bytes = v.map_or(&[][..], HeaderValue::as_bytes);
            let visible = bytes.iter().fold(true, |ok, &b| {
                ok & ((b.wrapping_sub(b' ') < 0x5f) | (b == b'\t'))
            });
            if visible { bytes } else { &[] }
        }
        let headers = [
            text(self.user_agent),
            text(self.referer),
            text(self.accept_language),
        ];
        // Formatted by hand, into room reserved once: `write!` and
        // byte-at-a-time pushes cost more than the rest of a click's
        // encoding on the hot path.
        out.reserve(100 + self.code.len() + headers.iter().map(|h| h.len()).sum::<usize>());
        let start = out.len();
        let mut ends = [0u16; 7];
        for (i, end) in ends.iter_mut().enumerate() {
            if let (Some(separator), 1..) = (separator, i) {
                out.push(separator);
            }
            let before = out.len();
            match i {
                0 => {
                    const HEX: &[u8; 16] = b"0123456789abcdef";
                    let mut hex = [0u8; 32];
                    for (pair, byte) in hex.chunks_exact_mut(2).zip(self.event_id.to_be_bytes()) {
                        pair[0] = HEX[usize::from(byte >> 4)];
                        pair[1] = HEX[usize::from(byte & 15)];
                    }
                    out.extend_from_slice(&hex);
                }
                1 => out.extend_from_slice(self.code.as_bytes()),
                2 => out.extend_from_slice(itoa::Buffer::new().format(self.ts_ms).as_bytes()),
                3 => match self.ip {
                    IpAddr::V4(v4) => {
                        let mut number = itoa::Buffer::new();
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
                header => out.extend_from_slice(headers[header - 4]),
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

/// A test click numbered `i`, with a code and headers of its own (leaked:
/// a test's few).
#[cfg(test)]
pub(crate) fn test_click(i: u128) -> RawClick<'static> {
    static AGENT: HeaderValue = HeaderValue::from_static("curl/8");
    static REFERER: HeaderValue = HeaderValue::from_static("https://news.example/");
    let language: &'static HeaderValue =
        Box::leak(Box::new(HeaderValue::from_bytes(b"en\xff").unwrap()));
    RawClick {
        event_id: i,
        code: Box::leak(format!("code{i}").into_boxed_str()),
        ts_ms: 1_767_225_600_000 + i as i64,
        ip: "2001:db8::7".parse().unwrap(),
        user_agent: Some(&AGENT),
        referer: i.is_multiple_of(2).then_some(&REFERER),
        accept_language: Some(language),
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
    gather: Option<Arc<Gather>>,
    /// `edge_click_events_total`, counted per thread (`crate::tally`).
    accepted: Arc<Tally<1>>,
    dropped: metrics::Counter,
}

/// Clicks in the stream's packed record format, written straight from
/// requests: one stream entry's worth at most ([`ENTRY_CLICKS`]), shipped
/// as one entry.
#[derive(Default)]
pub(crate) struct Bunch {
    records: Vec<u8>,
    clicks: usize,
    /// The slot it was gathered in, which gets its buffer back.
    slot: usize,
}

/// Each bunch's records: one stream entry each.
fn records(batch: &[Bunch]) -> Vec<&[u8]> {
    batch.iter().map(|b| &b.records[..]).collect()
}

/// Where the memory shipper's clicks gather before it takes them: one
/// bunch per slot and a slot per worker thread, so the hot path of one
/// thread never touches memory another thread writes. A full bunch goes
/// down the channel; the shipper takes partial ones itself
/// (`Shipping::take_all`).
struct Gather {
    slots: Box<[GatherSlot]>,
    tx: mpsc::UnboundedSender<Bunch>,
    /// Set by the shipper before it sleeps: a push that starts a bunch then
    /// wakes it, so a lone click is shipped at once.
    idle: AtomicBool,
    wake: Notify,
    /// Set at shutdown, before the last sweep; read under each slot's lock.
    closed: AtomicBool,
    /// Clicks handed to the shipper (full bunches sent, partial ones swept)
    /// and not yet shipped or dropped.
    depth: AtomicUsize,
}

/// What a slot holds: its bunch, and emptied record buffers of its shipped
/// bunches for the next ones (a bunch handed over then costs no allocation
/// and no fresh pages).
#[derive(Default)]
struct Held {
    bunch: Bunch,
    spare: Vec<Vec<u8>>,
}

impl Held {
    /// The bunch's clicks, copied out into a spare buffer, and the bunch
    /// emptied. The bunch keeps its own buffer: the pushes of one thread
    /// write the same memory over and over, which stays in that core's
    /// cache, where a buffer back from the shipper (which read it on
    /// another core) would cost a cache miss per line written, paid one
    /// click at a time. The copy pays them once per bunch, in one pass.
    fn hand_over(&mut self, slot: usize) -> Bunch {
        let bunch = &mut self.bunch;
        let mut records = self.spare.pop().unwrap_or_default();
        records.extend_from_slice(&bunch.records);
        bunch.records.clear();
        // A bunch of outsized clicks does not keep its outsized buffer.
        bunch.records.shrink_to(SPARE_BYTES);
        Bunch {
            records,
            clicks: std::mem::take(&mut bunch.clicks),
            slot,
        }
    }
}

/// Spare record buffers a slot keeps at most (a batch's worth), and the
/// largest kept (a bunch of a hundred browser clicks is about 14 KB).
const SPARE_BUFFERS: usize = MAX_BATCH / ENTRY_CLICKS;
const SPARE_BYTES: usize = 64 << 10;

/// Padded so that two threads' slots never share a cache line.
#[repr(align(128))]
struct GatherSlot(Mutex<Held>);

impl Gather {
    fn new(tx: mpsc::UnboundedSender<Bunch>) -> Self {
        let threads = std::thread::available_parallelism().map_or(4, usize::from);
        Self {
            slots: (0..(2 * threads).max(4))
                .map(|_| GatherSlot(Mutex::default()))
                .collect(),
            tx,
            idle: AtomicBool::new(false),
            wake: Notify::new(),
            closed: AtomicBool::new(false),
            depth: AtomicUsize::new(0),
        }
    }

    /// Gives the record buffers of shipped bunches back to their slots.
    fn recycle(&self, bunches: Vec<Bunch>) {
        for mut bunch in bunches {
            if bunch.records.capacity() > SPARE_BYTES {
                continue;
            }
            let Some(slot) = self.slots.get(bunch.slot) else {
                continue;
            };
            let mut held = slot.0.lock().unwrap_or_else(PoisonError::into_inner);
            if held.spare.len() < SPARE_BUFFERS {
                bunch.records.clear();
                held.spare.push(bunch.records);
            }
        }
    }

    /// This thread's slot and its index.
    fn slot(&self) -> (usize, &Mutex<Held>) {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        thread_local! {
            static NUMBER: usize = NEXT.fetch_add(1, Ordering::Relaxed);
        }
        let index = NUMBER.with(|n| *n) % self.slots.len();
        (index, &self.slots[index].0)
    }

    /// Hands a full bunch to the shipper; the clicks back if it has stopped.
    fn send(&self, bunch: Bunch) -> Result<(), usize> {
        let clicks = bunch.clicks;
        self.depth.fetch_add(clicks, Ordering::Relaxed);
        self.tx.send(bunch).map_err(|_| {
            self.depth.fetch_sub(clicks, Ordering::Relaxed);
            clicks
        })
    }
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
        let (stop_tx, stop_rx) = watch::channel(None);
        let dropped = metrics::counter!("edge_click_events_dropped_total");
        let (journal, gather, task) = match (redis, journal) {
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
                let (tx, rx) = mpsc::unbounded_channel::<Bunch>();
                let gather = Arc::new(Gather::new(tx));
                let task = tokio::spawn(
                    Shipping {
                        rx,
                        gather: gather.clone(),
                        redis: Arc::new(redis),
                        config,
                        dropped: dropped.clone(),
                        pending: VecDeque::new(),
                        pending_clicks: 0,
                        stop: stop_rx,
                    }
                    .run(),
                );
                (None, Some(gather), task)
            }
        };
        (
            Self {
                journal,
                gather,
                accepted: Arc::new(Tally::new([metrics::counter!("edge_click_events_total")])),
                dropped,
            },
            Shipper {
                stop: stop_tx,
                task,
            },
        )
    }

    /// Hands `edge_click_events_total` its count so far.
    pub fn publish(&self) {
        self.accepted.publish();
    }

    pub fn push(&self, click: RawClick<'_>) {
        self.accepted.add(0, 1);
        if let Some(journal) = &self.journal {
            if let Err(error) = journal.append(&click) {
                self.dropped.increment(1);
                journal_write_failed(&error);
            }
            return;
        }
        let Some(gather) = &self.gather else {
            return;
        };
        let (index, slot) = gather.slot();
        let mut guard = slot.lock().unwrap_or_else(PoisonError::into_inner);
        // Read under the lock the shutdown's last sweep takes after setting
        // it: a click either is swept or sees it.
        if gather.closed.load(Ordering::Relaxed) {
            drop(guard);
            self.dropped.increment(1);
            return;
        }
        let held = &mut *guard;
        let bunch = &mut held.bunch;
        let first = bunch.clicks == 0;
        click.write_record(&mut bunch.records);
        bunch.clicks += 1;
        if bunch.clicks >= ENTRY_CLICKS {
            let full = held.hand_over(index);
            // Sent under the lock, so the shipper, which empties the channel
            // under this lock before taking the slot's partial bunch, gets
            // this bunch first.
            if let Err(lost) = gather.send(full) {
                // The shipper has stopped (shutdown): nothing will ship them.
                self.dropped.increment(lost as u64);
            }
        } else if first && gather.idle.load(Ordering::SeqCst) {
            drop(guard);
            gather.wake.notify_one();
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
    rx: mpsc::UnboundedReceiver<Bunch>,
    gather: Arc<Gather>,
    redis: Arc<LazyRedis>,
    config: ShipperConfig,
    dropped: metrics::Counter,
    /// Bunches of clicks, oldest first, not yet in a batch.
    pending: VecDeque<Bunch>,
    pending_clicks: usize,
    stop: watch::Receiver<Option<Duration>>,
}

impl Shipping {
    async fn run(mut self) {
        let shipped = metrics::counter!("edge_click_events_shipped_total");
        let errors = metrics::counter!("edge_click_ship_errors_total");
        let depth_gauge = metrics::gauge!("edge_click_queue_depth");
        let mut writer = BatchWriter::new(
            self.redis.clone(),
            self.config.stream.clone(),
            self.config.max_len,
        );
        // One key per edge process; the hash tag keeps it in the stream's
        // slot on a Redis Cluster, as a transaction's keys must be.
        let sequence_key = format!(
            "{{{}}}:edge:{:016x}",
            self.config.stream,
            rand::random::<u64>()
        );
        let mut sequence: u64 = 0;
        let mut raw = Vec::new();
        let mut flush_deadline: Option<tokio::time::Instant> = None;
        let mut open = true;
        // When the last call started, if it left nothing behind.
        let mut linger_from: Option<tokio::time::Instant> = None;
        let mut last_sweep = tokio::time::Instant::now();
        loop {
            // Nothing held and no linger due: take the partial bunches, or
            // sleep until a push starts one or a full one arrives.
            if self.pending.is_empty() && open && linger_from.is_none() {
                self.gather.idle.store(true, Ordering::SeqCst);
                self.take_all(&mut raw);
                last_sweep = tokio::time::Instant::now();
                if raw.is_empty() {
                    tokio::select! {
                        n = self.rx.recv_many(&mut raw, RECEIVE) => {
                            if n == 0 { open = false; }
                        }
                        () = self.gather.wake.notified() => {}
                        _ = self.stop.changed(), if flush_deadline.is_none() => {
                            self.begin_flush(&mut flush_deadline, &mut raw);
                        }
                    }
                }
                self.gather.idle.store(false, Ordering::SeqCst);
            }
            self.take_arrived(&mut raw);
            if let Some(from) = linger_from.take()
                && self.pending_clicks < MAX_BATCH
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
            // Partial bunches are taken when there is nothing else to ship,
            // so that under load entries are full; and never left long.
            if self.pending.is_empty() || last_sweep.elapsed() >= SWEEP_EVERY {
                self.take_all(&mut raw);
                self.take_arrived(&mut raw);
                last_sweep = tokio::time::Instant::now();
            }
            depth_gauge.set(self.gather.depth.load(Ordering::Relaxed) as f64);
            if self.pending.is_empty() {
                if !open || (flush_deadline.is_some() && self.rx.is_empty()) {
                    return;
                }
                continue;
            }
            let mut batch = Vec::new();
            let mut clicks = 0;
            while let Some(next) = self.pending.front()
                && clicks + next.clicks <= MAX_BATCH
            {
                clicks += next.clicks;
                batch.extend(self.pending.pop_front());
            }
            self.pending_clicks -= clicks;
            linger_from = self.pending.is_empty().then(tokio::time::Instant::now);
            sequence += 1;
            let prepared = writer.entries(
                &sequence_key,
                sequence - 1,
                sequence,
                clicks,
                &records(&batch),
            );
            // The prepared batch holds copies of the records.
            self.gather.recycle(batch);
            let mut backoff = RETRY_MIN;
            loop {
                let result = self
                    .while_waiting(writer.write(&prepared), &mut raw, &mut flush_deadline)
                    .await;
                match result {
                    Ok(_) => {
                        shipped.increment(clicks as u64);
                        self.gather.depth.fetch_sub(clicks, Ordering::Relaxed);
                        depth_gauge.set(self.gather.depth.load(Ordering::Relaxed) as f64);
                        break;
                    }
                    Err(error) => {
                        errors.increment(1);
                        tracing::warn!(%error, clicks, "cannot ship click events; retrying");
                        if flush_deadline.is_some_and(|d| tokio::time::Instant::now() >= d) {
                            let mut lost = clicks
                                + self.pending_clicks
                                + raw.iter().map(|b| b.clicks).sum::<usize>();
                            while let Ok(bunch) = self.rx.try_recv() {
                                lost += bunch.clicks;
                            }
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
    /// new bunches every [`TAKE_EVERY`] (so the cap holds and the channel
    /// stays short, without the hot path waking this task on every send)
    /// and noting a request to stop.
    async fn while_waiting<T>(
        &mut self,
        until: impl std::future::Future<Output = T>,
        raw: &mut Vec<Bunch>,
        flush_deadline: &mut Option<tokio::time::Instant>,
    ) -> T {
        tokio::pin!(until);
        let mut take = tokio::time::interval(TAKE_EVERY);
        loop {
            tokio::select! {
                out = &mut until => return out,
                _ = take.tick() => self.take_ready(raw).await,
                _ = self.stop.changed(), if flush_deadline.is_none() => {
                    self.begin_flush(flush_deadline, raw);
                }
            }
        }
    }

    /// Shutdown: stop taking clicks (pushes from now on are dropped and
    /// counted), take the partial bunches a last time, and ship what is
    /// held for up to the flush period.
    fn begin_flush(&mut self, deadline: &mut Option<tokio::time::Instant>, raw: &mut Vec<Bunch>) {
        let flush = (*self.stop.borrow()).unwrap_or_default();
        *deadline = Some(tokio::time::Instant::now() + flush);
        self.gather.closed.store(true, Ordering::Relaxed);
        self.take_all(raw);
        self.rx.close();
    }

    /// Takes every bunch the pushes have made, keeping each thread's
    /// clicks in order: for each slot, under its lock, first the full
    /// bunches in the channel (sent under that lock, so any from this slot
    /// are older than its partial bunch), then the partial bunch.
    fn take_all(&mut self, raw: &mut Vec<Bunch>) {
        for (index, slot) in self.gather.slots.iter().enumerate() {
            let mut guard = slot.0.lock().unwrap_or_else(PoisonError::into_inner);
            while let Ok(full) = self.rx.try_recv() {
                raw.push(full);
            }
            if guard.bunch.clicks > 0 {
                self.gather
                    .depth
                    .fetch_add(guard.bunch.clicks, Ordering::Relaxed);
                raw.push(guard.hand_over(index));
            }
        }
    }

    /// Takes in the bunches already in the channel, without waiting.
    async fn take_ready(&mut self, raw: &mut Vec<Bunch>) {
        if !self.rx.is_empty() {
            self.rx.recv_many(raw, RECEIVE).await;
        }
        self.take_arrived(raw);
    }

    /// Moves the bunches in `raw` into `pending`, dropping the oldest held
    /// clicks (whole bunches, then records cut from the front of one)
    /// while more than the capacity are held.
    fn take_arrived(&mut self, raw: &mut Vec<Bunch>) {
        for bunch in raw.drain(..) {
            self.pending_clicks += bunch.clicks;
            self.pending.push_back(bunch);
        }
        while self.pending_clicks > self.config.capacity
            && let Some(oldest) = self.pending.front_mut()
        {
            let cut = (self.pending_clicks - self.config.capacity).min(oldest.clicks);
            if cut == oldest.clicks {
                self.pending.pop_front();
            } else {
                let end = oldest
                    .records
                    .iter()
                    .enumerate()
                    .filter(|(_, b)| **b == RECORD_END)
                    .nth(cut - 1)
                    .map_or(oldest.records.len(), |(i, _)| i + 1);
                oldest.records.drain(..end);
                oldest.clicks -= cut;
            }
            self.pending_clicks -= cut;
            self.gather.depth.fetch_sub(cut, Ordering::Relaxed);
            self.dropped.increment(cut as u64);
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

    /// Eight threads push at once, in bursts and pauses: every click lands in
    /// the stream exactly once, in entries of at most a hundred, each
    /// thread's clicks in the order pushed; a lone last click is not left
    /// waiting in its slot.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn clicks_from_many_threads_land_once_each_in_bunches() {
        let redis = shortener_common::testing::TestRedis::start();
        let (queue, shipper) = ClickQueue::start(
            Some(LazyRedis::new(&redis.url()).unwrap()),
            None,
            ShipperConfig {
                stream: "clicks".into(),
                max_len: 1_000_000,
                capacity: 1_000_000,
                journal_max_bytes: 0,
            },
        );
        let agent = HeaderValue::from_static("Mozilla/5.0 (X11; Linux x86_64)");
        let threads: Vec<_> = (0..8u128)
            .map(|t| {
                let (queue, agent) = (queue.clone(), agent.clone());
                std::thread::spawn(move || {
                    for i in 0..1_000u128 {
                        queue.push(RawClick {
                            event_id: t << 32 | i,
                            code: "abc",
                            ts_ms: 1_767_225_600_000,
                            ip: "192.0.2.1".parse().unwrap(),
                            user_agent: Some(&agent),
                            referer: None,
                            accept_language: None,
                        });
                        if i % 250 == 0 {
                            std::thread::sleep(Duration::from_millis(5));
                        }
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        queue.push(RawClick {
            event_id: 1 << 100,
            code: "last",
            ts_ms: 1_767_225_600_000,
            ip: "192.0.2.1".parse().unwrap(),
            user_agent: None,
            referer: None,
            accept_language: None,
        });
        let mut conn = redis::Client::open(redis.url())
            .unwrap()
            .get_connection()
            .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let clicks = loop {
            let clicks = shortener_common::testing::stream_clicks(&mut conn, "clicks");
            if clicks.len() >= 8_001 || std::time::Instant::now() > deadline {
                break clicks;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert_eq!(clicks.len(), 8_001);
        let mut ids: Vec<u128> = clicks.iter().map(|c| c.event_id).collect();
        for t in 0..8u128 {
            let own: Vec<u128> = ids.iter().copied().filter(|id| id >> 32 == t).collect();
            assert_eq!(own, (0..1_000).map(|i| t << 32 | i).collect::<Vec<_>>());
        }
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), 8_001);
        let entries: Vec<redis::Value> = redis::cmd("XRANGE")
            .arg("clicks")
            .arg("-")
            .arg("+")
            .query(&mut conn)
            .unwrap();
        assert!(entries.len() >= 81, "{} entries", entries.len());
        shipper.flush_and_stop(Duration::from_secs(1)).await;
    }

    proptest::proptest! {
        /// The hand-written encoding matches the shared event's stream
        /// fields, whatever the id, time, address and header bytes (a
        /// header that is not text is left out).
        #[test]
        fn the_compact_encoding_holds_the_stream_fields(
            event_id in proptest::prelude::any::<u128>(),
            ts_ms in 0..i64::MAX,
            v4 in proptest::prelude::any::<[u8; 4]>(),
            v6 in proptest::prelude::any::<[u16; 8]>(),
            use_v6 in proptest::prelude::any::<bool>(),
            agent in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..80),
            language in proptest::collection::vec(
                proptest::sample::select(vec![b'\t', b' ', b'a', b'~', 0x7f, 0x80, 0xe9, 0xff]),
                0..8,
            ),
        ) {
            // Bytes a header value cannot hold (controls) are dropped.
            let header = |bytes: &[u8]| {
                let kept: Vec<u8> = bytes.iter().copied().filter(|b| HeaderValue::from_bytes(&[*b]).is_ok()).collect();
                HeaderValue::from_bytes(&kept).unwrap()
            };
            let (agent, referer, language) = (
                header(&agent),
                HeaderValue::from_static("https://news.example/"),
                header(&language),
            );
            let click = || RawClick {
                event_id,
                code: "xyz",
                ts_ms,
                ip: if use_v6 { IpAddr::from(v6) } else { IpAddr::from(v4) },
                user_agent: Some(&agent),
                referer: Some(&referer),
                accept_language: Some(&language),
            };
            let expected = click().into_event().to_stream_fields();
            let encoded = click().encode();
            let values: Vec<&[u8]> = encoded.values().collect();
            proptest::prop_assert_eq!(values.len(), 7);
            for ((_, want), got) in expected.iter().zip(values.iter()) {
                proptest::prop_assert_eq!(want.as_bytes(), *got);
            }
            // The record the hot path writes is the packed record of the
            // same values.
            let mut record = Vec::new();
            click().write_record(&mut record);
            let mut packed = Vec::new();
            shortener_common::event::write_packed_record(&mut packed, values);
            proptest::prop_assert_eq!(record, packed);
        }
    }
}
