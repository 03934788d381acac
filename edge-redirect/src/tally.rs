//! Counters for the hot path that cost no shared write.
//!
//! A `metrics` counter handle is one atomic shared by every thread: each
//! increment is a locked add on a cache line that the other core wrote a
//! moment ago, so the line moves between cores on nearly every request
//! (`perf` put three such counters at 0.04 us per redirect). A [`Tally`]
//! keeps one row of counts per thread instead, which only that thread
//! writes, with a plain load and store. The rows are summed and handed to
//! the `metrics` counters when someone reads them: [`Tally::publish`],
//! which the admin listener calls before it renders `/metrics`. A scrape
//! therefore sees every count made before it, as with a shared counter.

use std::sync::Mutex;
use std::sync::PoisonError;
use std::sync::atomic::{AtomicU64, Ordering};

use thread_local::ThreadLocal;

/// One thread's counts, on cache lines of their own.
#[repr(align(128))]
struct Row<const N: usize>([AtomicU64; N]);

impl<const N: usize> Default for Row<N> {
    fn default() -> Self {
        Self(std::array::from_fn(|_| AtomicU64::new(0)))
    }
}

/// `N` counters, counted per thread and published to `metrics` on demand.
pub struct Tally<const N: usize> {
    rows: ThreadLocal<Row<N>>,
    counters: [metrics::Counter; N],
    /// What `counters` have been given so far. Held while publishing, so
    /// two scrapes at once never hand over the same counts twice.
    published: Mutex<[u64; N]>,
}

impl<const N: usize> Tally<N> {
    pub fn new(counters: [metrics::Counter; N]) -> Self {
        Self {
            rows: ThreadLocal::new(),
            counters,
            published: Mutex::new([0; N]),
        }
    }

    /// Adds `n` to counter `i`.
    #[inline]
    pub fn add(&self, i: usize, n: u64) {
        let count = &self.rows.get_or_default().0[i];
        // A row is only ever written by the thread it belongs to (a thread
        // that takes over the row of one that ended starts after it), so a
        // load and a store lose nothing, and need no locked instruction.
        count.store(
            count.load(Ordering::Relaxed).wrapping_add(n),
            Ordering::Relaxed,
        );
    }

    /// Counter `i`'s count so far, over every thread.
    pub fn total(&self, i: usize) -> u64 {
        self.rows
            .iter()
            .map(|row| row.0[i].load(Ordering::Relaxed))
            .fold(0, u64::wrapping_add)
    }

    /// Hands the counts made since the last call to the `metrics` counters.
    pub fn publish(&self) {
        let mut published = self
            .published
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for (i, done) in published.iter_mut().enumerate() {
            let total = self.total(i);
            self.counters[i].increment(total.wrapping_sub(*done));
            *done = total;
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use metrics_util::debugging::DebuggingRecorder;

    #[test]
    fn counts_from_many_threads_are_published_once_each() {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        metrics::with_local_recorder(&recorder, || {
            let tally = Tally::new([
                metrics::counter!("tally_a_total"),
                metrics::counter!("tally_b_total"),
            ]);
            std::thread::scope(|scope| {
                for t in 0..4u64 {
                    let tally = &tally;
                    scope.spawn(move || {
                        for _ in 0..10_000 {
                            tally.add(0, 1);
                        }
                        tally.add(1, t);
                    });
                }
            });
            assert_eq!(tally.total(0), 40_000);
            assert_eq!(tally.total(1), 6);
            // Nothing reaches the counters before a publish.
            assert!(counter_values(&snapshotter).is_empty());
            tally.publish();
            tally.add(0, 5);
            tally.publish();
            // Published again with nothing new: no count is handed over twice.
            tally.publish();
        });
        let values = counter_values(&snapshotter);
        assert_eq!(values.get("tally_a_total"), Some(&40_005));
        assert_eq!(values.get("tally_b_total"), Some(&6));
    }

    /// The counters `snapshotter` has seen above zero, by name.
    pub(crate) fn counter_values(
        snapshotter: &metrics_util::debugging::Snapshotter,
    ) -> std::collections::HashMap<String, u64> {
        snapshotter
            .snapshot()
            .into_vec()
            .into_iter()
            .filter_map(|(key, _, _, value)| match value {
                metrics_util::debugging::DebugValue::Counter(n) if n > 0 => {
                    Some((key.key().name().to_string(), n))
                }
                _ => None,
            })
            .collect()
    }
}
