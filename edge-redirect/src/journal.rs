//! The click journal (`EDGE_CLICK_JOURNAL_DIR`): click events written to a
//! local file before the redirect is answered, so a killed edge loses none.
//!
//! Without it, clicks wait in memory until shipped and a SIGKILL (or OOM
//! kill, or crash) loses the ones not yet in Redis. With it:
//! - The request appends its click to the process's segment file with one
//!   `write` (O_APPEND, so records from all worker threads land whole and in
//!   some order) *before* its response is built. Once `write` returns the
//!   bytes are in the kernel's page cache, which outlives the process; they
//!   do not outlive the machine (no fsync: that would cost a disk flush per
//!   redirect).
//! - The shipper reads the segment in order and ships batches the way the
//!   memory queue does (`crate::batch`), keyed by the segment and numbered
//!   by the byte offset where the batch ends. Redis therefore records how
//!   far each segment has been shipped, atomically with the batch.
//! - A segment is deleted once shipped to its end, after it was rotated
//!   (every [`ROTATE_BYTES`]) or at shutdown.
//! - A new edge process adopts the segments of dead ones in the same
//!   directory (each live process holds an exclusive lock on its files, so
//!   it never takes a live one), reads from Redis where each was shipped to,
//!   and ships the rest: every click is shipped exactly once.
//! - Each segment also has a mark beside it (`{id}.shipped`: the offset,
//!   u64 LE), written after Redis has confirmed each batch. Redis's record
//!   of a segment is a key that expires (`SEQUENCE_TTL_SECS`, 7 days, after
//!   its last batch) and that a Redis restarted empty has lost; an adopter
//!   then resumes from the mark instead of shipping the whole segment
//!   again. The mark can only trail Redis (by the batch in flight when the
//!   process died), so the adopter takes the further of the two.
//! - While Redis is away the segments grow; beyond `max_bytes` the oldest
//!   segment is dropped and its unshipped clicks are counted in
//!   `edge_click_events_dropped_total`.
//!
//! Record format: a magic byte `0xC1`, the body length (u32 LE), then the
//! body: the seven stream field values' end offsets (u16 LE each) and the
//! values themselves, back to back.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use shortener_common::redis_conn::LazyRedis;
use tokio::sync::watch;

use crate::batch::{Batch, BatchWriter, Written};
use crate::clicks::{Encoded, LINGER, MAX_BATCH, RETRY_MAX, RETRY_MIN, RawClick};

const MAGIC: u8 = 0xC1;
const HEADER: usize = 5;
/// No click comes near this (headers are capped far below); a longer length
/// means the file is damaged.
const MAX_RECORD: usize = 1 << 20;
/// A segment is rotated at this size, so shipped clicks leave the disk soon.
pub const ROTATE_BYTES: u64 = 16 << 20;
/// How much of a segment is read at a time.
const READ_CHUNK: usize = 256 << 10;
/// How often the journal is rotated and held to its cap while a batch
/// waits for Redis.
const HOUSEKEEPING: Duration = Duration::from_millis(100);
/// How often an idle shipper looks for new clicks.
const IDLE_POLL: Duration = Duration::from_millis(5);
const EXTENSION: &str = "clicks";
/// A segment's mark: how far it has been shipped, by Redis's confirmation.
const MARK_EXTENSION: &str = "shipped";

thread_local! {
    static RECORD: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Appends one record holding `click`'s stream values to `out`.
pub(crate) fn write_record(click: &RawClick<'_>, out: &mut Vec<u8>) {
    let start = out.len();
    out.push(MAGIC);
    out.extend_from_slice(&[0; 4]);
    let ends_at = out.len();
    out.extend_from_slice(&[0; 14]);
    let values_at = out.len();
    let ends = click.write_values(out);
    for (i, end) in ends.iter().enumerate() {
        out[ends_at + 2 * i..ends_at + 2 * i + 2].copy_from_slice(&end.to_le_bytes());
    }
    let body = (out.len() - values_at + 14) as u32;
    out[start + 1..start + HEADER].copy_from_slice(&body.to_le_bytes());
}

/// Parses the complete records at the start of `bytes`: each click with the
/// offset (within `bytes`) where its record ends. Stops at a partial record,
/// or at damage (then also says so: what follows cannot be framed).
pub(crate) fn parse_records(bytes: &[u8]) -> (Vec<(Encoded, usize)>, bool) {
    let mut records = Vec::new();
    let mut at = 0;
    while bytes.len() - at >= HEADER {
        if bytes[at] != MAGIC {
            return (records, true);
        }
        let len =
            u32::from_le_bytes(bytes[at + 1..at + HEADER].try_into().expect("4 bytes")) as usize;
        if !(14..=MAX_RECORD).contains(&len) {
            return (records, true);
        }
        let end = at + HEADER + len;
        if end > bytes.len() {
            break;
        }
        let body = &bytes[at + HEADER..end];
        let mut ends = [0u16; 7];
        for (i, slot) in ends.iter_mut().enumerate() {
            *slot = u16::from_le_bytes([body[2 * i], body[2 * i + 1]]);
        }
        let values = &body[14..];
        if ends.windows(2).any(|w| w[0] > w[1]) || usize::from(ends[6]) != values.len() {
            return (records, true);
        }
        records.push((Encoded::from_parts(values.into(), ends), end));
        at = end;
    }
    (records, false)
}

/// The segment that requests append to.
struct Writing {
    file: File,
    id: String,
}

/// The journal directory of one edge process: the writing side, used on the
/// hot path, and the segments left for the shipper.
pub struct Journal {
    dir: PathBuf,
    /// `{start ms}-{random}`: sorts segments of older processes first.
    prefix: String,
    /// `None` once closed at shutdown.
    writing: RwLock<Option<Writing>>,
    next_seq: AtomicU64,
    /// A write failed (a full disk, say) and may have left a partial record:
    /// the shipper starts a new segment so later records frame again.
    rotate_requested: AtomicBool,
    /// Segments to ship, oldest first, as found at start-up; the shipper
    /// takes them.
    adopted: std::sync::Mutex<Vec<Segment>>,
}

fn segment_path(dir: &Path, id: &str) -> PathBuf {
    dir.join(format!("{id}.{EXTENSION}"))
}

impl Journal {
    /// Opens (creating) `dir`, adopts the segments of processes that are no
    /// longer running, and starts a segment of this process's own.
    pub fn open(dir: &Path) -> std::io::Result<Arc<Self>> {
        std::fs::create_dir_all(dir)?;
        let mut adopted = Vec::new();
        let mut names: Vec<PathBuf> = std::fs::read_dir(dir)?
            .filter_map(|entry| entry.ok().map(|e| e.path()))
            .filter(|path| path.extension().is_some_and(|e| e == EXTENSION))
            .collect();
        names.sort();
        for path in names {
            let file = match OpenOptions::new().read(true).write(true).open(&path) {
                Ok(file) => file,
                // Shipped and deleted by its live owner meanwhile.
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => continue,
                Err(error) => return Err(error),
            };
            match file.try_lock() {
                Ok(()) => {}
                // A live edge's segment (another process on this directory).
                Err(std::fs::TryLockError::WouldBlock) => continue,
                Err(std::fs::TryLockError::Error(error)) => return Err(error),
            }
            let id = path
                .file_stem()
                .and_then(|s| s.to_str())
                .unwrap_or_default()
                .to_owned();
            tracing::info!(segment = %id, bytes = file.metadata()?.len(), "adopting the click journal of an edge that stopped");
            adopted.push(Segment::new(id, path, file, false));
        }
        let started = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis();
        let prefix = format!("{started:013}-{:08x}", rand::random::<u32>());
        let (writing, reading) = Self::create_segment(dir, &prefix, 0)?;
        adopted.push(reading);
        Ok(Arc::new(Self {
            dir: dir.to_owned(),
            prefix,
            writing: RwLock::new(Some(writing)),
            next_seq: AtomicU64::new(1),
            rotate_requested: AtomicBool::new(false),
            adopted: std::sync::Mutex::new(adopted),
        }))
    }

    /// A new segment, locked (on the shipper's handle, which lives until
    /// the segment is shipped and deleted) before it gets its name, so no
    /// other process can take it for a dead one's.
    fn create_segment(dir: &Path, prefix: &str, seq: u64) -> std::io::Result<(Writing, Segment)> {
        let id = format!("{prefix}-{seq:06}");
        let path = segment_path(dir, &id);
        let new = dir.join(format!("{id}.new"));
        let file = OpenOptions::new()
            .append(true)
            .create_new(true)
            .open(&new)?;
        let reader = File::open(&new)?;
        reader.try_lock().map_err(std::io::Error::other)?;
        std::fs::rename(&new, &path)?;
        Ok((
            Writing {
                file,
                id: id.clone(),
            },
            Segment::new(id, path, reader, true),
        ))
    }

    /// Writes one click; when this returns `Ok` the click survives the
    /// process.
    pub fn append(&self, click: &RawClick<'_>) -> std::io::Result<()> {
        RECORD.with(|record| {
            let mut record = record.borrow_mut();
            record.clear();
            write_record(click, &mut record);
            let writing = self.writing.read().expect("journal lock");
            let Some(writing) = writing.as_ref() else {
                return Err(std::io::Error::other("the click journal is closed"));
            };
            let written = (&writing.file).write_all(&record);
            if written.is_err() {
                self.rotate_requested.store(true, Ordering::Relaxed);
            }
            written
        })
    }

    /// Shutdown: no more appends (requests still running after the drain
    /// period lose their click, counted). Returns whether it was open.
    fn close(&self) -> bool {
        self.writing.write().expect("journal lock").take().is_some()
    }

    /// Starts a new segment for requests; returns it for the shipper. Waits
    /// for appends in progress, so once this returns the old segment is
    /// complete.
    fn rotate(&self) -> std::io::Result<Segment> {
        if self.writing.read().expect("journal lock").is_none() {
            return Err(std::io::Error::other("the click journal is closed"));
        }
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
        let (writing, reading) = Self::create_segment(&self.dir, &self.prefix, seq)?;
        let old = self.writing.write().expect("journal lock").replace(writing);
        if let Some(old) = old {
            tracing::debug!(segment = %old.id, "click journal segment rotated");
        }
        Ok(reading)
    }

    fn take_segments(&self) -> Vec<Segment> {
        std::mem::take(&mut *self.adopted.lock().expect("journal lock"))
    }
}

/// A segment as the shipper reads it.
struct Segment {
    id: String,
    path: PathBuf,
    file: File,
    /// Requests may still append to it.
    writing: bool,
    /// Where reading resumes once it is known where Redis says shipping got
    /// to (`None` until then).
    read_to: Option<u64>,
    /// Bytes read but not yet parsed (the start of a partial record).
    unparsed: Vec<u8>,
    /// Damage was found: nothing after it can be read.
    damaged: bool,
    /// The read buffer, kept between reads.
    chunk: Vec<u8>,
    /// Parsed clicks not yet in a batch, with the offset each record ends at.
    ready: VecDeque<(Encoded, u64)>,
    /// Where the last batch taken ends (the next one's start).
    taken_to: u64,
    /// The mark beside the segment, once this process has written it.
    mark: Option<File>,
    /// Writing the mark has failed (logged once per segment).
    mark_failed: bool,
}

impl Segment {
    fn new(id: String, path: PathBuf, file: File, own: bool) -> Self {
        Self {
            id,
            path,
            file,
            writing: own,
            // This process's own segments start empty: nothing to look up.
            read_to: own.then_some(0),
            unparsed: Vec::new(),
            damaged: false,
            chunk: Vec::new(),
            ready: VecDeque::new(),
            taken_to: 0,
            mark: None,
            mark_failed: false,
        }
    }

    fn mark_path(&self) -> PathBuf {
        self.path.with_extension(MARK_EXTENSION)
    }

    /// Records beside the segment that Redis has confirmed it shipped to
    /// `offset`. Best effort: without the mark, an adopter goes by Redis
    /// alone.
    fn mark_shipped(&mut self, offset: u64) {
        let written = match &self.mark {
            Some(mark) => mark.write_all_at(&offset.to_le_bytes(), 0),
            None => OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .open(self.mark_path())
                .and_then(|mark| {
                    mark.write_all_at(&offset.to_le_bytes(), 0)?;
                    self.mark = Some(mark);
                    Ok(())
                }),
        };
        if let Err(error) = written
            && !std::mem::replace(&mut self.mark_failed, true)
        {
            tracing::warn!(segment = %self.id, %error, "cannot mark how far a click journal segment was shipped; an edge adopting it will go by Redis alone");
        }
    }

    /// The offset the segment's mark holds (0 without a sound one: a mark
    /// past the segment's end belongs to no record of it).
    fn marked(&self) -> u64 {
        std::fs::read(self.mark_path())
            .ok()
            .and_then(|bytes| <[u8; 8]>::try_from(bytes.as_slice()).ok())
            .map(u64::from_le_bytes)
            .filter(|&offset| offset <= self.len())
            .unwrap_or(0)
    }

    /// Reads on from `offset` (a record's end), forgetting what was read.
    fn resume_at(&mut self, offset: u64) {
        self.read_to = Some(offset);
        self.taken_to = offset;
        self.unparsed.clear();
        self.ready.clear();
        self.damaged = false;
    }

    fn len(&self) -> u64 {
        self.file.metadata().map(|m| m.len()).unwrap_or(0)
    }

    /// Up to `MAX_BATCH` clicks after what has been taken so far.
    /// Returns the batch and where it starts and ends.
    fn next_batch(&mut self) -> std::io::Result<(Vec<Encoded>, u64, u64)> {
        let mut read_to = self.read_to.expect("resume point known");
        self.chunk.resize(READ_CHUNK, 0);
        while self.ready.len() < MAX_BATCH && !self.damaged {
            let n = self.file.read_at(&mut self.chunk, read_to)?;
            if n == 0 {
                break;
            }
            let base = read_to - self.unparsed.len() as u64;
            self.unparsed.extend_from_slice(&self.chunk[..n]);
            read_to += n as u64;
            let (records, damaged) = parse_records(&self.unparsed);
            self.damaged = damaged;
            let consumed = records.last().map_or(0, |(_, end)| *end);
            self.ready.extend(
                records
                    .into_iter()
                    .map(|(click, end)| (click, base + end as u64)),
            );
            self.unparsed.drain(..consumed);
        }
        self.read_to = Some(read_to);
        let n = self.ready.len().min(MAX_BATCH);
        let batch: Vec<(Encoded, u64)> = self.ready.drain(..n).collect();
        let start = self.taken_to;
        let end = batch.last().map_or(start, |(_, end)| *end);
        self.taken_to = end;
        Ok((
            batch.into_iter().map(|(click, _)| click).collect(),
            start,
            end,
        ))
    }

    /// Clicks in the segment not yet shipped (for the drop count).
    fn remaining(&mut self) -> u64 {
        if self.read_to.is_none() {
            // An adopted segment dropped before Redis was asked about it:
            // its mark says how much of it was shipped.
            let shipped = self.marked();
            self.resume_at(shipped);
        }
        let mut n = self.ready.len() as u64;
        self.ready.clear();
        while let Ok((batch, _, _)) = self.next_batch() {
            if batch.is_empty() {
                break;
            }
            n += batch.len() as u64;
        }
        n
    }

    /// Deletes the segment, its mark first (a segment left without its
    /// mark is still known to Redis; a mark left alone would be litter).
    fn delete(self) {
        if let Err(error) = std::fs::remove_file(self.mark_path())
            && error.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(segment = %self.id, %error, "cannot delete a click journal segment's mark");
        }
        if let Err(error) = std::fs::remove_file(&self.path) {
            tracing::warn!(path = %self.path.display(), %error, "cannot delete a shipped click journal segment");
        }
    }
}

/// Ships the journal's segments, oldest first.
pub(crate) struct JournalShipping {
    pub journal: Arc<Journal>,
    pub redis: Arc<LazyRedis>,
    pub stream: String,
    /// Clicks the stream holds at most (`CLICK_STREAM_MAXLEN`).
    pub max_len: u64,
    pub max_bytes: u64,
    /// [`ROTATE_BYTES`], smaller in tests.
    pub rotate_bytes: u64,
    pub stop: watch::Receiver<Option<Duration>>,
    pub dropped: metrics::Counter,
}

enum Shipped {
    Done,
    /// Not written: the segment had been shipped to this offset meanwhile
    /// (`Written::Moved`).
    Moved(u64),
    /// The segment was dropped (over the size cap) while the batch waited.
    Abandoned,
    /// Shutting down with Redis still away: the journal keeps the rest.
    GaveUp,
}

impl JournalShipping {
    pub(crate) async fn run(mut self) {
        let shipped = metrics::counter!("edge_click_events_shipped_total");
        let backlog = metrics::gauge!("edge_click_journal_bytes");
        let mut writer = BatchWriter::new(self.redis.clone(), self.stream.clone(), self.max_len);
        let mut segments: VecDeque<Segment> = self.journal.take_segments().into();
        let mut flush_deadline: Option<tokio::time::Instant> = None;
        // When the last call started, if its batch was not full.
        let mut linger_from: Option<tokio::time::Instant> = None;
        loop {
            if let Some(from) = linger_from.take() {
                let now = tokio::time::Instant::now();
                if flush_deadline.is_none() && now < from + LINGER {
                    self.wait(from + LINGER - now, &mut flush_deadline).await;
                }
            }
            let bytes = self.rotate_and_cap(&mut segments);
            backlog.set(bytes as f64);
            let Some(front) = segments.front_mut() else {
                return;
            };
            if front.read_to.is_none() {
                let key = self.sequence_key(&front.id);
                let Some(recorded) = self
                    .shipped_offset(&mut writer, &key, &mut flush_deadline)
                    .await
                else {
                    return;
                };
                let marked = front.marked();
                if marked > recorded {
                    tracing::warn!(segment = %front.id, recorded, marked, "Redis has lost how far an adopted click journal segment was shipped (its key expired, or Redis restarted empty); resuming from the segment's mark");
                }
                front.resume_at(recorded.max(marked));
            }
            let (batch, start, end) = match front.next_batch() {
                Ok(batch) => batch,
                Err(error) => {
                    tracing::warn!(segment = %front.id, %error, "cannot read the click journal; retrying");
                    self.pause(&mut flush_deadline).await;
                    continue;
                }
            };
            if batch.is_empty() {
                if front.damaged {
                    // What could be framed before the damage is shipped.
                    tracing::error!(segment = %front.id, "a click journal segment is damaged; the rest of it is skipped");
                    if front.writing {
                        self.rotate(&mut segments);
                        if segments.front().is_some_and(|s| s.writing) {
                            // No new segment (the disk is full?): keep it.
                            self.pause(&mut flush_deadline).await;
                            continue;
                        }
                    }
                    self.finish_front(&mut segments).await;
                    continue;
                }
                if !front.writing {
                    // Complete (rotated, or a dead process's) and shipped.
                    self.finish_front(&mut segments).await;
                    continue;
                }
                if flush_deadline.is_some() {
                    if self.journal.close() {
                        // Read what was appended up to the close.
                        continue;
                    }
                    // Every click appended has been shipped.
                    self.finish_front(&mut segments).await;
                    return;
                }
                self.wait(IDLE_POLL, &mut flush_deadline).await;
                continue;
            }
            let key = self.sequence_key(&front.id);
            let prepared = writer.encoded(&key, start, end, &batch);
            linger_from = (batch.len() < MAX_BATCH).then(tokio::time::Instant::now);
            match self
                .ship(&mut writer, &prepared, &mut segments, &mut flush_deadline)
                .await
            {
                Shipped::Done => {
                    shipped.increment(batch.len() as u64);
                    // `ship` returns `Done` only for the front segment's batch.
                    if let Some(front) = segments.front_mut() {
                        front.mark_shipped(end);
                    }
                }
                Shipped::Moved(offset) => {
                    // A dead process's last batch landed after this one
                    // read where its segment was shipped to: go on from
                    // where that batch ended.
                    if let Some(front) = segments.front_mut() {
                        tracing::info!(segment = %front.id, offset, "an adopted click journal segment was shipped further meanwhile; resuming there");
                        front.resume_at(offset);
                    }
                }
                Shipped::Abandoned => self.dropped.increment(batch.len() as u64),
                Shipped::GaveUp => {
                    let bytes: u64 = segments.iter().map(Segment::len).sum();
                    tracing::error!(
                        bytes,
                        "stopping with click events Redis did not take; they stay in the journal for the next start"
                    );
                    return;
                }
            }
        }
    }

    /// Deletes the front segment, shipped to its end, and then its Redis key
    /// (in that order: a key gone while its file remains would make the next
    /// edge ship the file again from the start).
    async fn finish_front(&mut self, segments: &mut VecDeque<Segment>) {
        let Some(done) = segments.pop_front() else {
            return;
        };
        let key = self.sequence_key(&done.id);
        done.delete();
        // Best effort: an undeleted key expires after SEQUENCE_TTL_SECS.
        let _ = self.redis.run::<i64>(redis::cmd("DEL").arg(key)).await;
    }

    /// Waits a little before trying again (or until shutdown begins).
    async fn pause(&mut self, flush_deadline: &mut Option<tokio::time::Instant>) {
        let _ = self.wait(IDLE_POLL * 20, flush_deadline).await;
    }

    fn sequence_key(&self, segment: &str) -> String {
        format!("{{{}}}:edge:{segment}", self.stream)
    }

    /// Where Redis says a segment was shipped to (read under the writer's
    /// watch of its key, so a dead process's last batch, if it lands after
    /// the read, is refused).
    async fn shipped_offset(
        &mut self,
        writer: &mut BatchWriter,
        key: &str,
        flush_deadline: &mut Option<tokio::time::Instant>,
    ) -> Option<u64> {
        let mut backoff = RETRY_MIN;
        loop {
            match writer.recorded(key).await {
                Ok(offset) => return Some(offset),
                Err(error) => {
                    tracing::warn!(%error, "cannot read how far an adopted click journal was shipped; retrying");
                    if !self.wait(backoff, flush_deadline).await {
                        return None;
                    }
                    backoff = (backoff * 2).min(RETRY_MAX);
                }
            }
        }
    }

    /// Writes the batch until it is in the stream. Returns early when the
    /// front segment is dropped to keep under the size cap, or when
    /// shutting down and the flush period is over.
    async fn ship(
        &mut self,
        writer: &mut BatchWriter,
        batch: &Batch,
        segments: &mut VecDeque<Segment>,
        flush_deadline: &mut Option<tokio::time::Instant>,
    ) -> Shipped {
        let errors = metrics::counter!("edge_click_ship_errors_total");
        let mut backoff = RETRY_MIN;
        loop {
            match writer.write(batch).await {
                Ok(Written::Now | Written::Before) => return Shipped::Done,
                Ok(Written::Moved(offset)) => return Shipped::Moved(offset),
                Err(error) => {
                    errors.increment(1);
                    tracing::warn!(%error, "cannot ship click events; retrying");
                }
            }
            // Sleep the backoff, keeping the journal rotated and under its
            // cap meanwhile (requests keep appending).
            let until = tokio::time::Instant::now() + backoff;
            loop {
                let before = segments.front().map(|s| s.id.clone());
                self.rotate_and_cap(segments);
                if segments.front().map(|s| s.id.clone()) != before {
                    return Shipped::Abandoned;
                }
                let now = tokio::time::Instant::now();
                if now >= until {
                    break;
                }
                if !self
                    .wait((until - now).min(HOUSEKEEPING), flush_deadline)
                    .await
                {
                    return Shipped::GaveUp;
                }
            }
            backoff = (backoff * 2).min(RETRY_MAX);
        }
    }

    /// Sleeps `duration` (less if a shutdown begins); false once a
    /// shutdown's flush period is over.
    async fn wait(
        &mut self,
        duration: Duration,
        flush_deadline: &mut Option<tokio::time::Instant>,
    ) -> bool {
        if flush_deadline.is_some_and(|d| tokio::time::Instant::now() >= d) {
            return false;
        }
        tokio::select! {
            () = tokio::time::sleep(duration) => {}
            _ = self.stop.changed(), if flush_deadline.is_none() => {
                let flush = (*self.stop.borrow()).unwrap_or_default();
                *flush_deadline = Some(tokio::time::Instant::now() + flush);
            }
        }
        true
    }

    fn rotate(&self, segments: &mut VecDeque<Segment>) {
        match self.journal.rotate() {
            Ok(new) => {
                for segment in segments.iter_mut() {
                    segment.writing = false;
                }
                segments.push_back(new);
            }
            Err(error) => {
                tracing::error!(%error, "cannot start a new click journal segment");
            }
        }
    }

    /// Rotates a full writing segment; drops the oldest segments while the
    /// journal is over its cap (keeping the one requests write to). Returns
    /// the bytes the journal then holds.
    fn rotate_and_cap(&self, segments: &mut VecDeque<Segment>) -> u64 {
        let failed_write = self.journal.rotate_requested.swap(false, Ordering::Relaxed);
        let open = self.journal.writing.read().expect("journal lock").is_some();
        if open
            && segments
                .back()
                .is_some_and(|s| s.writing && (failed_write || s.len() >= self.rotate_bytes))
        {
            self.rotate(segments);
        }
        let mut bytes: u64 = segments.iter().map(Segment::len).sum();
        while segments.len() > 1 && bytes > self.max_bytes {
            let Some(mut oldest) = segments.pop_front() else {
                break;
            };
            bytes = bytes.saturating_sub(oldest.len());
            let lost = oldest.remaining();
            tracing::error!(segment = %oldest.id, lost, "the click journal is over EDGE_CLICK_JOURNAL_MAX_BYTES; dropping its oldest clicks");
            self.dropped.increment(lost);
            oldest.delete();
        }
        bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::clicks::test_click as click;

    #[test]
    fn records_hold_the_stream_fields_and_partial_ones_wait() {
        let mut bytes = Vec::new();
        for i in 0..3 {
            write_record(&click(i), &mut bytes);
        }
        let (records, damaged) = parse_records(&bytes);
        assert!(!damaged);
        assert_eq!(records.len(), 3);
        assert_eq!(records[2].1, bytes.len());
        for (i, (encoded, _)) in records.iter().enumerate() {
            let expected = click(i as u128).into_event().to_stream_fields();
            let got: Vec<&[u8]> = encoded.values().collect();
            for ((_, want), got) in expected.iter().zip(got) {
                assert_eq!(want.as_bytes(), got);
            }
        }
        // A record cut short is not returned until it is whole.
        let cut = records[1].1 + 7;
        assert_eq!(parse_records(&bytes[..cut]), (records[..2].to_vec(), false));
        // Garbage is reported, not misread; what precedes it is kept.
        let mut damaged = bytes.clone();
        damaged[records[0].1] = b'x';
        assert_eq!(parse_records(&damaged), (records[..1].to_vec(), true));
    }

    /// Bytes in the journal's segment files, and whether the first is there.
    fn on_disk(dir: &Path) -> (u64, bool) {
        let mut bytes = 0;
        let mut first = false;
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            bytes += std::fs::metadata(&path).unwrap().len();
            first |= path.to_string_lossy().ends_with("-000000.clicks");
        }
        (bytes, first)
    }

    #[tokio::test]
    async fn with_redis_away_the_journal_keeps_under_its_cap_by_dropping_the_oldest() {
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::open(dir.path()).unwrap();
        let (max_bytes, rotate_bytes) = (20_000, 4_096);
        // Nothing listens on port 1: every shipment fails.
        let (stop, task) = shipper(
            &journal,
            "redis://127.0.0.1:1",
            max_bytes,
            rotate_bytes,
            metrics::counter!("test_dropped"),
        );
        let mut written = Vec::new();
        for i in 0..1_000 {
            journal.append(&click(i)).unwrap();
            write_record(&click(i), &mut written);
            if i % 50 == 0 {
                // Time for the shipper to fail, rotate and keep the cap.
                tokio::time::sleep(Duration::from_millis(120)).await;
            }
        }
        // Far more than the cap was written; the cap is kept while the
        // shipper waits for Redis.
        assert!(written.len() as u64 > 4 * max_bytes);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let (bytes, first) = on_disk(dir.path());
            if !first && bytes <= max_bytes + rotate_bytes + 300 {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{bytes} bytes on disk, first segment there: {first}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = stop.send(Some(Duration::ZERO));
        task.await.unwrap();
        // What is left stays for the next start.
        assert!(on_disk(dir.path()).0 > 0);
    }

    /// A shipper for `journal` to Redis at `url`, and what stops it.
    fn shipper(
        journal: &Arc<Journal>,
        url: &str,
        max_bytes: u64,
        rotate_bytes: u64,
        dropped: metrics::Counter,
    ) -> (watch::Sender<Option<Duration>>, tokio::task::JoinHandle<()>) {
        let (stop, stop_rx) = watch::channel(None);
        let task = tokio::spawn(
            JournalShipping {
                journal: journal.clone(),
                redis: Arc::new(LazyRedis::new(url).unwrap()),
                stream: "clicks".into(),
                max_len: 1_000_000,
                max_bytes,
                rotate_bytes,
                stop: stop_rx,
                dropped,
            }
            .run(),
        );
        (stop, task)
    }

    /// Waits until `segment`'s mark says it is shipped to its end.
    async fn until_marked_to_its_end(segment: &Path) {
        shortener_common::testing::eventually(
            Duration::from_secs(10),
            "the segment marked shipped",
            || {
                let mark = segment.with_extension(MARK_EXTENSION);
                let len = std::fs::metadata(segment).unwrap().len();
                async move {
                    let bytes = std::fs::read(mark).ok()?;
                    (u64::from_le_bytes(bytes.try_into().ok()?) == len).then_some(())
                }
            },
        )
        .await;
    }

    /// Waits until `path` is gone.
    async fn until_deleted(path: &Path, what: &str) {
        shortener_common::testing::eventually(Duration::from_secs(10), what, || {
            let done = !path.exists();
            async move { done.then_some(()) }
        })
        .await;
    }

    /// Waits until no process holds `segment`'s lock. A child forked by a
    /// test running alongside (they start Redis servers) shares a dropped
    /// journal's locks until it execs.
    fn until_unlocked(segment: &Path) {
        shortener_common::testing::wait_for(
            Duration::from_secs(10),
            "the stopped journal's lock released",
            || File::open(segment).unwrap().try_lock().is_ok(),
        );
    }

    /// The path of the segment `journal` appends to.
    fn writing_segment(journal: &Journal) -> PathBuf {
        let writing = journal.writing.read().unwrap();
        segment_path(&journal.dir, &writing.as_ref().unwrap().id)
    }

    /// Leaves in `dir` the segment of a process that died: `shipped`
    /// clicks shipped to Redis at `url` and marked, then `unshipped` more
    /// appended after its shipper stopped where it was (as on SIGKILL).
    async fn dead_segment(
        dir: &Path,
        url: &str,
        shipped: std::ops::Range<u128>,
        unshipped: std::ops::Range<u128>,
    ) -> PathBuf {
        let journal = Journal::open(dir).unwrap();
        let (_stop, task) = shipper(
            &journal,
            url,
            1 << 30,
            ROTATE_BYTES,
            metrics::counter!("test_dropped"),
        );
        for i in shipped {
            journal.append(&click(i)).unwrap();
        }
        let segment = writing_segment(&journal);
        until_marked_to_its_end(&segment).await;
        task.abort();
        let _ = task.await;
        for i in unshipped {
            journal.append(&click(i)).unwrap();
        }
        drop(journal);
        until_unlocked(&segment);
        segment
    }

    /// Redis has lost how far a dead process's segment was shipped (its
    /// key expired, or Redis restarted empty): the adopter resumes from the
    /// segment's mark and ships only what had not been shipped. Going by
    /// Redis alone, it would ship all 350 clicks again.
    #[tokio::test]
    async fn an_adopter_resumes_from_the_mark_when_redis_has_lost_the_segments_record() {
        use crate::batch::tests::ids;
        use shortener_common::testing::TestRedis;
        let redis = TestRedis::start();
        let mut conn = redis::Client::open(redis.url())
            .unwrap()
            .get_connection()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        // A process shipped and marked 300 clicks, then died with 50 more
        // in its segment that it never shipped.
        let segment = dead_segment(dir.path(), &redis.url(), 0..300, 300..350).await;
        assert_eq!(ids(&mut conn), (0..300).collect::<Vec<_>>());
        // Redis loses its record of the segment.
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg("{clicks}:edge:*")
            .query(&mut conn)
            .unwrap();
        assert_eq!(keys.len(), 1, "{keys:?}");
        let _: () = redis::cmd("DEL").arg(&keys).query(&mut conn).unwrap();

        let second = Journal::open(dir.path()).unwrap();
        let (stop, task) = shipper(
            &second,
            &redis.url(),
            1 << 30,
            ROTATE_BYTES,
            metrics::counter!("test_dropped"),
        );
        until_deleted(&segment, "the adopted segment shipped").await;
        let _ = stop.send(Some(Duration::from_secs(1)));
        task.await.unwrap();
        assert_eq!(ids(&mut conn), (0..350).collect::<Vec<_>>());
        // The segment's mark went with it.
        assert!(!segment.with_extension(MARK_EXTENSION).exists());
        drop(second);
    }

    /// An adopted segment dropped to keep the journal under its cap while
    /// Redis is away counts as dropped only the clicks its mark says were
    /// not shipped.
    #[tokio::test]
    async fn a_dropped_adopted_segment_counts_only_its_unshipped_clicks() {
        use crate::tally::tests::counter_values;
        use metrics_util::debugging::DebuggingRecorder;
        use shortener_common::testing::TestRedis;
        let redis = TestRedis::start();
        let dir = tempfile::tempdir().unwrap();
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        let dropped = metrics::with_local_recorder(&recorder, || {
            metrics::counter!("test_adopted_dropped_total")
        });
        // 100 clicks shipped and marked, then 20 more the process never
        // shipped before it died.
        let segment = dead_segment(dir.path(), &redis.url(), 0..100, 100..120).await;

        // The next edge finds Redis away and the segment over its cap.
        let second = Journal::open(dir.path()).unwrap();
        let (stop, task) = shipper(&second, "redis://127.0.0.1:1", 100, ROTATE_BYTES, dropped);
        until_deleted(&segment, "the adopted segment dropped").await;
        let _ = stop.send(Some(Duration::ZERO));
        task.await.unwrap();
        assert_eq!(
            counter_values(&snapshotter).get("test_adopted_dropped_total"),
            Some(&20),
            "only the unshipped clicks count as dropped"
        );
        drop(second);
    }

    #[test]
    fn a_new_journal_adopts_only_the_segments_of_stopped_processes() {
        let dir = tempfile::tempdir().unwrap();
        let first = Journal::open(dir.path()).unwrap();
        first.append(&click(1)).unwrap();
        // Another process on the same directory leaves the live one alone.
        let second = Journal::open(dir.path()).unwrap();
        // (Its shipper holds its segments, and with them their locks.)
        let second_segments = second.take_segments();
        assert_eq!(second_segments.len(), 1, "only its own segment");
        // Once the first is gone (its locks with it), its segment is adopted.
        let first_segment = writing_segment(&first);
        drop(first);
        until_unlocked(&first_segment);
        let third = Journal::open(dir.path()).unwrap();
        let mut segments = third.take_segments();
        assert_eq!(segments.len(), 2, "the stopped one's segment and its own");
        let adopted = &mut segments[0];
        assert!(!adopted.writing);
        assert_eq!(adopted.read_to, None);
        adopted.resume_at(0);
        let (batch, start, end) = adopted.next_batch().unwrap();
        assert_eq!(start, 0);
        assert_eq!(batch.len(), 1);
        assert_eq!(end, adopted.len());
        drop(second_segments);
    }
}
