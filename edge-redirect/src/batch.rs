//! Batches of click entries into the stream, each batch exactly once.
//!
//! A batch (up to `MAX_BATCH` clicks, in packed entries of up to
//! [`ENTRY_CLICKS`]; format in `shortener_common::event`) is one
//! transaction on a connection of the writer's own: `MULTI`, an `XADD` per
//! entry, `HSET <key> batch <number>`, `EXPIRE <key>`, `EXEC`, sent in one
//! write together with a `WATCH <key>` for the next batch. The key belongs
//! to one writer (an edge process's, or a journal segment's), and its
//! numbers only grow.
//!
//! Every transaction goes out on a connection whose `WATCH` of its key
//! Redis has confirmed. So a transaction whose outcome is unknown (a
//! timeout, a dropped connection) has either run, or will be refused
//! (`EXEC` aborts) once anything writes the key. Before retrying, the
//! writer watches the key on its new connection and reads the recorded
//! number: if it has reached the batch's, the batch is done; if not, the
//! batch is sent again. Of the lost transaction and the retry, whichever
//! `EXEC`s second finds the key written since its watch and aborts; an
//! abort makes the writer read the number again at once. A batch therefore
//! lands at most once, and, retried until it does, exactly once.
//!
//! A key has a second writer in one case: a journal segment adopted from a
//! dead process, whose last batch may still land after the adopter read how
//! far the segment was shipped. That batch cuts the records differently, so
//! the read may find a number between the adopter's batch's start and end:
//! the writer then answers [`Written::Moved`] and the journal shipper goes
//! on from there. A transaction that ran with errors (the stream key
//! holding another type fails every `XADD` alike) is sent again whole.
//!
//! A Lua script did this before, checking and writing in one call. Redis
//! hashes every byte of a script's arguments as it makes them Lua strings,
//! which took about a third of its CPU time per click; a transaction
//! costs it none of that.

use std::sync::Arc;

use redis::Value;
use redis::aio::{ConnectionLike, MultiplexedConnection};
use shortener_common::event::{
    ENTRY_CLICKS, PACKED_CLICKS, PACKED_COLUMNS, PACKED_FIELDS, write_packed_record,
};
use shortener_common::redis_conn::LazyRedis;

use crate::clicks::{Encoded, SEQUENCE_TTL_SECS};

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

    /// The `MAXLEN` for a call writing `clicks` clicks in `entries` entries.
    pub(crate) fn entries_for_call(&mut self, clicks: usize, entries: usize) -> u64 {
        let entries = entries.max(1);
        let fill = clicks.max(1) as f64 / entries as f64;
        self.clicks_per_entry = if self.clicks_per_entry == 0.0 {
            fill
        } else {
            self.clicks_per_entry + (fill - self.clicks_per_entry) / 32.0
        };
        ((self.max_len as f64 / self.clicks_per_entry).ceil() as u64).max(1)
    }
}

/// One batch, ready to send (and to send again).
pub(crate) struct Batch {
    key: String,
    /// The number recorded once the batch before it is in.
    from: u64,
    number: u64,
    pipe: redis::Pipeline,
    commands: usize,
}

/// What became of a batch.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Written {
    /// Written by this call.
    Now,
    /// Written by an earlier attempt whose answer was lost.
    Before,
    /// Not written: another writer of the key (a dead process whose journal
    /// segment this one adopted) recorded a number between the batch's
    /// `from` and its number, so part of the batch is in already. The
    /// caller starts again from that number.
    Moved(u64),
}

/// Writes batches to the stream, trimming it to about
/// `CLICK_STREAM_MAXLEN` clicks: what the memory shipper and the journal
/// shipper share.
pub(crate) struct BatchWriter {
    redis: Arc<LazyRedis>,
    conn: Option<MultiplexedConnection>,
    /// The key the connection watches, as Redis has confirmed.
    watching: Option<String>,
    /// The last attempt's outcome is unknown: read the key before the next.
    unsure: bool,
    stream: String,
    limit: StreamLimit,
}

impl BatchWriter {
    pub(crate) fn new(redis: Arc<LazyRedis>, stream: String, max_len: u64) -> Self {
        Self {
            redis,
            conn: None,
            watching: None,
            unsure: false,
            stream,
            limit: StreamLimit::new(max_len),
        }
    }

    /// `batch` as packed entries of up to [`ENTRY_CLICKS`], numbered
    /// `number` under `key`, following the batch numbered `from`.
    pub(crate) fn encoded(
        &mut self,
        key: &str,
        from: u64,
        number: u64,
        batch: &[Encoded],
    ) -> Batch {
        let entries: Vec<Vec<u8>> = batch
            .chunks(ENTRY_CLICKS)
            .map(|entry| {
                let mut clicks = Vec::with_capacity(
                    entry
                        .iter()
                        .flat_map(Encoded::values)
                        .map(|v| v.len() + 1)
                        .sum(),
                );
                for click in entry {
                    write_packed_record(&mut clicks, click.values());
                }
                clicks
            })
            .collect();
        self.entries(key, from, number, batch.len(), &entries)
    }

    /// `entries` (packed, `clicks` clicks in all), numbered `number` under
    /// `key`, following the batch numbered `from`.
    pub(crate) fn entries<E: AsRef<[u8]>>(
        &mut self,
        key: &str,
        from: u64,
        number: u64,
        clicks: usize,
        entries: &[E],
    ) -> Batch {
        let max_entries = self.limit.entries_for_call(clicks, entries.len());
        let mut pipe = redis::pipe();
        pipe.cmd("MULTI");
        for entry in entries {
            let entry = entry.as_ref();
            // Sized up front: a command grown an argument at a time would
            // copy a 14 KB entry a dozen times over.
            let mut xadd = redis::Cmd::with_capacity(10, 128 + self.stream.len() + entry.len());
            xadd.arg("XADD")
                .arg(&self.stream)
                .arg("MAXLEN")
                .arg("~")
                .arg(max_entries)
                .arg("*")
                .arg(PACKED_FIELDS)
                .arg(PACKED_COLUMNS)
                .arg(PACKED_CLICKS)
                .arg(entry);
            pipe.add_command(xadd);
        }
        pipe.cmd("HSET")
            .arg(key)
            .arg("batch")
            .arg(number)
            .cmd("EXPIRE")
            .arg(key)
            .arg(SEQUENCE_TTL_SECS)
            .cmd("EXEC")
            .cmd("WATCH")
            .arg(key);
        Batch {
            key: key.to_owned(),
            from,
            number,
            pipe,
            commands: entries.len() + 5,
        }
    }

    /// Writes `batch` unless an earlier attempt did. An error leaves the
    /// batch for the caller to retry.
    pub(crate) async fn write(&mut self, batch: &Batch) -> redis::RedisResult<Written> {
        let mut result = self.attempt(batch).await;
        if self.unsure && result.is_err() && self.conn.is_some() {
            // EXEC refused (the key changed since the watch): read the key
            // and decide again at once.
            result = self.attempt(batch).await;
        }
        self.after(&result);
        result
    }

    /// The number recorded under `key` (0 for none), read under a watch,
    /// so that a transaction of a lost connection cannot land unseen after
    /// it (see the module's doc).
    pub(crate) async fn recorded(&mut self, key: &str) -> redis::RedisResult<u64> {
        let result = async {
            let conn = self.connection().await?;
            let number = watch(conn, key).await?;
            self.watching = Some(key.to_owned());
            Ok(number)
        }
        .await;
        self.after(&result);
        result
    }

    /// Forgets a connection that failed: its last transaction's outcome is
    /// unknown.
    fn after<T>(&mut self, result: &redis::RedisResult<T>) {
        if result.as_ref().is_err_and(|e| {
            e.is_io_error()
                || e.is_timeout()
                || e.is_connection_dropped()
                || e.is_connection_refusal()
                || e.is_unrecoverable_error()
        }) {
            self.conn = None;
            self.watching = None;
            self.unsure = true;
        }
    }

    async fn connection(&mut self) -> redis::RedisResult<&mut MultiplexedConnection> {
        if self.conn.is_none() {
            self.watching = None;
            self.conn = Some(self.redis.connect_own().await?);
        }
        Ok(self.conn.as_mut().expect("connected above"))
    }

    async fn attempt(&mut self, batch: &Batch) -> redis::RedisResult<Written> {
        if self.unsure || self.watching.as_deref() != Some(&batch.key) {
            let recorded = self.recorded(&batch.key).await?;
            self.unsure = false;
            if recorded >= batch.number {
                return Ok(Written::Before);
            }
            if recorded > batch.from {
                return Ok(Written::Moved(recorded));
            }
        }
        let conn = self.connection().await?;
        let replies = conn
            .req_packed_commands(&batch.pipe, 0, batch.commands)
            .await?;
        let [.., exec, watched] = &replies[..] else {
            return Err(unexpected("too few replies to a batch"));
        };
        self.watching = matches!(watched, Value::Okay).then(|| batch.key.clone());
        match exec {
            Value::Array(results) => match results.iter().find_map(|r| match r {
                Value::ServerError(error) => Some(error.clone()),
                _ => None,
            }) {
                // It ran with errors (say the stream key holds another
                // type, which fails every XADD alike): the number may be
                // recorded while entries are missing, so the batch is sent
                // again whole, without reading the number first.
                Some(error) => Err(error.into()),
                None => Ok(Written::Now),
            },
            Value::Nil => {
                // Someone wrote the key since the watch (a lost
                // transaction of ours, or its expiry): read it again first.
                self.unsure = true;
                Err(unexpected("the batch's key changed since it was watched"))
            }
            Value::ServerError(error) => Err(error.clone().into()),
            _ => Err(unexpected("an unexpected reply to EXEC")),
        }
    }
}

/// Watches `key` alone on `conn` and reads its recorded batch number.
async fn watch(conn: &mut MultiplexedConnection, key: &str) -> redis::RedisResult<u64> {
    let mut pipe = redis::pipe();
    pipe.cmd("UNWATCH")
        .cmd("WATCH")
        .arg(key)
        .cmd("HGET")
        .arg(key)
        .arg("batch");
    let replies = conn.req_packed_commands(&pipe, 0, 3).await?;
    let [unwatched, watched, number] = &replies[..] else {
        return Err(unexpected("too few replies to a watch"));
    };
    for reply in [unwatched, watched] {
        if let Value::ServerError(error) = reply {
            return Err(error.clone().into());
        }
    }
    Ok(redis::from_redis_value::<Option<u64>>(number.clone())?.unwrap_or(0))
}

fn unexpected(what: &'static str) -> redis::RedisError {
    (redis::ErrorKind::UnexpectedReturnType, what).into()
}

#[cfg(test)]
pub(crate) mod tests {
    use std::time::Duration;

    use shortener_common::testing::{TestRedis, stream_clicks};

    use super::*;
    use crate::clicks::test_click;

    const KEY: &str = "{clicks}:edge:t";

    impl BatchWriter {
        /// As after a timeout: the connection is gone and the outcome of
        /// its last transaction unknown.
        fn lose_connection(&mut self) {
            self.conn = None;
            self.watching = None;
            self.unsure = true;
        }
    }

    fn clicks(ids: std::ops::Range<u128>) -> Vec<Encoded> {
        ids.map(|i| test_click(i).encode()).collect()
    }

    fn writer(redis: &TestRedis, response_timeout: Duration) -> BatchWriter {
        let lazy = LazyRedis::with_response_timeout(&redis.url(), response_timeout).unwrap();
        BatchWriter::new(Arc::new(lazy), "clicks".into(), 1_000_000)
    }

    /// The ids of the clicks in the stream `clicks`, oldest first.
    pub(crate) fn ids(conn: &mut redis::Connection) -> Vec<u128> {
        stream_clicks(conn, "clicks")
            .iter()
            .map(|c| c.event_id)
            .collect()
    }

    fn connect(redis: &TestRedis) -> redis::Connection {
        redis::Client::open(redis.url())
            .unwrap()
            .get_connection()
            .unwrap()
    }

    /// The transaction of `batch` as a lost connection would still send it
    /// (without the writer's check).
    fn late(batch: &Batch) -> redis::Pipeline {
        let mut late = redis::pipe();
        late.atomic();
        for xadd in batch.pipe.cmd_iter().skip(1).take(batch.commands - 5) {
            late.add_command(xadd.clone()).ignore();
        }
        late.cmd("HSET")
            .arg(&batch.key)
            .arg("batch")
            .arg(batch.number)
            .ignore();
        late
    }

    fn recorded(conn: &mut redis::Connection) -> Option<u64> {
        redis::cmd("HGET")
            .arg(KEY)
            .arg("batch")
            .query(conn)
            .unwrap()
    }

    #[tokio::test]
    async fn a_batch_is_entries_of_a_hundred_and_a_lost_answer_does_not_write_it_again() {
        let redis = TestRedis::start();
        let mut conn = connect(&redis);
        let mut writer = writer(&redis, Duration::from_secs(5));
        let first = writer.encoded(KEY, 6, 7, &clicks(0..250));
        assert_eq!(writer.write(&first).await.unwrap(), Written::Now);
        let len: usize = redis::cmd("XLEN").arg("clicks").query(&mut conn).unwrap();
        assert_eq!(len, 3, "entries of 100, 100 and 50");
        assert_eq!(ids(&mut conn), (0..250).collect::<Vec<_>>());
        assert_eq!(recorded(&mut conn), Some(7));
        let ttl: i64 = redis::cmd("TTL").arg(KEY).query(&mut conn).unwrap();
        assert!(ttl > 0, "the key expires: {ttl}");
        // The answer was lost after the batch landed: the retry sees it.
        writer.lose_connection();
        assert_eq!(writer.write(&first).await.unwrap(), Written::Before);
        assert_eq!(ids(&mut conn).len(), 250);
        // The next number is written, on the new connection.
        let next = writer.encoded(KEY, 7, 8, &clicks(250..251));
        assert_eq!(writer.write(&next).await.unwrap(), Written::Now);
        assert_eq!(ids(&mut conn), (0..251).collect::<Vec<_>>());
        // A lost answer of a batch that never landed: written on retry.
        let third = writer.encoded(KEY, 8, 9, &clicks(251..260));
        writer.lose_connection();
        assert_eq!(writer.write(&third).await.unwrap(), Written::Now);
        assert_eq!(ids(&mut conn), (0..260).collect::<Vec<_>>());
    }

    /// The lost transaction still lands after the writer gave up on it,
    /// either before the retry's `EXEC` or after it: it is in the stream
    /// once either way.
    #[tokio::test]
    async fn a_lost_transaction_landing_late_is_not_written_twice() {
        let redis = TestRedis::start();
        let mut conn = connect(&redis);
        let mut writer = writer(&redis, Duration::from_secs(5));
        let first = writer.encoded(KEY, 0, 1, &clicks(0..10));
        writer.write(&first).await.unwrap();
        let second = writer.encoded(KEY, 1, 2, &clicks(10..20));

        // Late, after the retry: the lost connection had watched the key
        // (as every batch's connection has), so its EXEC is refused.
        let mut old = connect(&redis);
        let _: () = redis::cmd("WATCH").arg(KEY).query(&mut old).unwrap();
        writer.lose_connection();
        assert_eq!(writer.write(&second).await.unwrap(), Written::Now);
        let landed: Option<()> = late(&second).query(&mut old).unwrap();
        assert_eq!(landed, None, "the late transaction must be refused");
        assert_eq!(ids(&mut conn), (0..20).collect::<Vec<_>>());

        // Late, but before the retry's EXEC, after its watch: the retry's
        // EXEC is refused, and the writer then finds the batch written.
        let third = writer.encoded(KEY, 2, 3, &clicks(20..30));
        let _: () = late(&third).query(&mut conn).unwrap();
        // Its EXEC is refused; it reads the key again at once.
        assert_eq!(writer.write(&third).await.unwrap(), Written::Before);
        assert_eq!(ids(&mut conn), (0..30).collect::<Vec<_>>());
        assert_eq!(recorded(&mut conn), Some(3));
    }

    /// A journal segment adopted from a dead process, whose last batch (a
    /// different cut of the same records) lands after the adopter read how
    /// far the segment was shipped: the adopter's batch is refused and it
    /// is told where to go on from, so no record is written twice.
    #[tokio::test]
    async fn a_dead_writers_late_batch_moves_the_adopters_start() {
        let redis = TestRedis::start();
        let mut conn = connect(&redis);
        let mut dead = writer(&redis, Duration::from_secs(5));
        // Offsets stand in for the byte offsets the journal numbers by.
        let first = dead.encoded(KEY, 0, 5, &clicks(0..5));
        dead.write(&first).await.unwrap();
        let lost = dead.encoded(KEY, 5, 8, &clicks(5..8));

        let mut adopter = writer(&redis, Duration::from_secs(5));
        assert_eq!(adopter.recorded(KEY).await.unwrap(), 5);
        let _: () = late(&lost).query(&mut conn).unwrap();
        let batch = adopter.encoded(KEY, 5, 12, &clicks(5..12));
        assert_eq!(adopter.write(&batch).await.unwrap(), Written::Moved(8));
        assert_eq!(ids(&mut conn), (0..8).collect::<Vec<_>>());
        // From there, the rest.
        let rest = adopter.encoded(KEY, 8, 12, &clicks(8..12));
        assert_eq!(adopter.write(&rest).await.unwrap(), Written::Now);
        assert_eq!(ids(&mut conn), (0..12).collect::<Vec<_>>());
        assert_eq!(recorded(&mut conn), Some(12));
    }

    /// Redis holds the batch's transaction past the writer's timeout
    /// (`CLIENT PAUSE`): retried until Redis answers, the batch is in the
    /// stream exactly once.
    #[tokio::test]
    async fn a_batch_that_timed_out_is_in_the_stream_once() {
        let redis = TestRedis::start();
        let mut conn = connect(&redis);
        let mut writer = writer(&redis, Duration::from_millis(200));
        let first = writer.encoded(KEY, 0, 1, &clicks(0..10));
        writer.write(&first).await.unwrap();
        let second = writer.encoded(KEY, 1, 2, &clicks(10..20));
        let _: () = redis::cmd("CLIENT")
            .arg("PAUSE")
            .arg(1_000)
            .arg("WRITE")
            .query(&mut conn)
            .unwrap();
        let error = writer.write(&second).await.unwrap_err();
        assert!(error.is_timeout(), "{error}");
        let mut failures = 1;
        let outcome = loop {
            match writer.write(&second).await {
                Ok(outcome) => break outcome,
                Err(_) if failures < 50 => failures += 1,
                Err(error) => panic!("still failing: {error}"),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert!(matches!(outcome, Written::Now | Written::Before));
        assert_eq!(ids(&mut conn), (0..20).collect::<Vec<_>>());
        assert_eq!(recorded(&mut conn), Some(2));
    }

    #[test]
    fn the_stream_limit_in_entries_follows_how_full_entries_are() {
        let mut limit = StreamLimit::new(1_000_000);
        // Full entries: a hundred clicks each.
        assert_eq!(limit.entries_for_call(2_000, 20), 10_000);
        // Traffic falls to one click per call: the limit grows with it, a
        // little per call.
        let mut previous = 10_000;
        for _ in 0..500 {
            let now = limit.entries_for_call(1, 1);
            assert!(now >= previous);
            previous = now;
        }
        assert!(previous > 900_000, "{previous}");
        // A call of 150 clicks is two entries of 75.
        let mut limit = StreamLimit::new(1_500);
        assert_eq!(limit.entries_for_call(150, 2), 20);
    }
}
