//! The pure, synchronous heart of keygen: hands out IDs for one worker id,
//! given the wall-clock time, and says when it needs something first
//! (persisting a reservation, waiting for the clock). No I/O happens here, so
//! every rule is unit-tested with explicit times.
//!
//! Rules that make duplicates impossible for one worker id:
//! - IDs only move forward: the next position (tick, sequence) never goes back,
//!   even when the wall clock does.
//! - A tick is used only after it is covered by a persisted reservation
//!   (`reserved_end`, exclusive). A successor (restart, or another instance
//!   that later leases this worker id) starts at the persisted end.
//! - Running ahead of the wall clock (a burst that exhausts a tick's
//!   sequence, or a clock that stepped back) is limited to
//!   [`MAX_BORROW_TICKS`]; beyond that the caller must wait.

use std::sync::Mutex;
use std::time::Duration;

use crate::layout::{self, IDS_PER_TICK, MAX_BORROW_TICKS, MAX_TICK, TICK_MS};

/// Why a batch was not issued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// Persist a reservation covering ticks up to and including `through`,
    /// report it with [`Generator::reserved`], then ask again.
    Reserve { through: u64 },
    /// The batch would run more than the borrow limit ahead of the clock.
    ClockBehind { wait: Duration },
    /// The 29-bit tick space is used up.
    Exhausted,
}

#[derive(Debug)]
struct State {
    next_tick: u64,
    next_seq: u32,
    /// First tick not covered by a persisted reservation.
    reserved_end: u64,
    /// The tick this generator started at; borrowing is measured from the
    /// later of this and the wall clock, so a restart that resumes ahead of
    /// the clock can still issue at once.
    floor_tick: u64,
    /// Highest wall-clock tick seen, to notice the clock stepping back.
    clock_high: u64,
}

/// Hands out IDs for one worker id.
#[derive(Debug)]
pub struct Generator {
    worker: u16,
    state: Mutex<State>,
}

/// A batch of IDs and whether the clock was seen going backwards.
#[derive(Debug)]
pub struct Batch {
    pub ids: Vec<u64>,
    pub clock_went_back: bool,
}

impl Generator {
    /// A generator for `worker` that resumes at `start_tick`: the reservation
    /// end that was persisted by whoever used this worker id before (0 if
    /// nobody did).
    pub fn new(worker: u16, start_tick: u64) -> Self {
        assert!(worker <= layout::MAX_WORKER);
        Self {
            worker,
            state: Mutex::new(State {
                next_tick: start_tick,
                next_seq: 0,
                reserved_end: start_tick,
                floor_tick: start_tick,
                clock_high: 0,
            }),
        }
    }

    pub fn worker(&self) -> u16 {
        self.worker
    }

    /// Records that ticks below `end` are now covered by a persisted
    /// reservation.
    pub fn reserved(&self, end: u64) {
        let mut state = self.state.lock().expect("generator lock");
        state.reserved_end = state.reserved_end.max(end);
    }

    /// Issues `count` IDs (1 to [`IDS_PER_TICK`]) at wall-clock `now_unix_ms`,
    /// all or none.
    pub fn issue(&self, count: u32, now_unix_ms: u64) -> Result<Batch, Refusal> {
        assert!((1..=IDS_PER_TICK).contains(&count));
        let now = layout::tick_at(now_unix_ms);
        let mut state = self.state.lock().expect("generator lock");
        let clock_went_back = now < state.clock_high;
        state.clock_high = state.clock_high.max(now);

        let (tick, seq) = if now > state.next_tick {
            (now, 0)
        } else {
            (state.next_tick, state.next_seq)
        };
        let end = u64::from(seq) + u64::from(count); // positions used in `tick` onwards
        let last_tick = tick + (end - 1) / u64::from(IDS_PER_TICK);
        if last_tick > MAX_TICK {
            return Err(Refusal::Exhausted);
        }
        let limit = now.max(state.floor_tick) + MAX_BORROW_TICKS;
        if last_tick > limit {
            // Wait until the clock reaches the tick that makes `last_tick`
            // legal, measured in real milliseconds.
            let legal_from_ms = layout::EPOCH_UNIX_MS + (last_tick - MAX_BORROW_TICKS) * TICK_MS;
            let wait = Duration::from_millis(legal_from_ms.saturating_sub(now_unix_ms).max(1));
            return Err(Refusal::ClockBehind { wait });
        }
        if last_tick >= state.reserved_end {
            return Err(Refusal::Reserve { through: last_tick });
        }

        let ids = (0..count)
            .map(|i| {
                let pos = u64::from(seq) + u64::from(i);
                let t = tick + pos / u64::from(IDS_PER_TICK);
                let s = (pos % u64::from(IDS_PER_TICK)) as u32;
                layout::compose(t, self.worker, s)
            })
            .collect();
        state.next_tick = tick + end / u64::from(IDS_PER_TICK);
        state.next_seq = (end % u64::from(IDS_PER_TICK)) as u32;
        Ok(Batch {
            ids,
            clock_went_back,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::{EPOCH_UNIX_MS, decompose};
    use std::collections::HashSet;

    /// Unix ms at `tick` plus `ms` into it.
    fn at(tick: u64, ms: u64) -> u64 {
        EPOCH_UNIX_MS + tick * TICK_MS + ms
    }

    /// Issues, persisting reservations as asked, like the service does.
    fn issue(g: &Generator, count: u32, now: u64) -> Result<Vec<u64>, Refusal> {
        loop {
            match g.issue(count, now) {
                Ok(batch) => return Ok(batch.ids),
                Err(Refusal::Reserve { through }) => g.reserved(through + 1),
                Err(other) => return Err(other),
            }
        }
    }

    #[test]
    fn asks_for_a_reservation_before_using_a_tick() {
        let g = Generator::new(3, 0);
        assert_eq!(
            g.issue(1, at(100, 0)).unwrap_err(),
            Refusal::Reserve { through: 100 }
        );
        g.reserved(101);
        let ids = g.issue(2, at(100, 5)).unwrap().ids;
        assert_eq!(decompose(ids[0]), (100, 3, 0));
        assert_eq!(decompose(ids[1]), (100, 3, 1));
    }

    #[test]
    fn sequence_wrap_moves_to_the_next_tick_without_duplicates() {
        let g = Generator::new(1, 0);
        let mut seen = HashSet::new();
        // Three ticks' worth at the same instant: borrows two future ticks.
        for _ in 0..3 * IDS_PER_TICK / 1000 {
            for id in issue(&g, 1000, at(50, 0)).unwrap() {
                assert!(seen.insert(id), "duplicate {id}");
            }
        }
        let ticks: HashSet<u64> = seen.iter().map(|&id| decompose(id).0).collect();
        assert_eq!(ticks, HashSet::from([50, 51, 52]));
    }

    #[test]
    fn a_burst_beyond_the_borrow_limit_waits_for_the_clock() {
        let g = Generator::new(0, 0);
        let now = at(10, 250);
        let per_tick = IDS_PER_TICK;
        // Ticks 10..=14 may be used at tick 10 (four borrowed).
        for _ in 0..(MAX_BORROW_TICKS + 1) {
            issue(&g, per_tick, now).unwrap();
        }
        match issue(&g, 1, now) {
            Err(Refusal::ClockBehind { wait }) => assert_eq!(wait, Duration::from_millis(750)),
            other => panic!("expected to wait, got {other:?}"),
        }
        // Once the clock moves to tick 11, tick 15 is legal.
        let ids = issue(&g, 1, at(11, 0)).unwrap();
        assert_eq!(decompose(ids[0]).0, 15);
    }

    #[test]
    fn clock_stepping_back_never_reissues() {
        let g = Generator::new(2, 0);
        let before = issue(&g, 500, at(1_000, 0)).unwrap();
        // The clock jumps back three seconds: still within the borrow limit,
        // so IDs continue from where they were, never from the past.
        let batch = loop {
            match g.issue(500, at(997, 0)) {
                Ok(batch) => break batch,
                Err(Refusal::Reserve { through }) => g.reserved(through + 1),
                Err(other) => panic!("{other:?}"),
            }
        };
        assert!(batch.clock_went_back);
        let after: HashSet<u64> = batch.ids.into_iter().collect();
        assert!(before.iter().all(|id| !after.contains(id)));
        assert!(after.iter().all(|&id| decompose(id).0 == 1_000));
        // A bigger step back than the limit: refuse and say how long to wait.
        match g.issue(1, at(990, 0)) {
            Err(Refusal::ClockBehind { wait }) => {
                assert_eq!(wait, Duration::from_millis((1_000 - 4 - 990) * TICK_MS));
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn a_successor_resumes_after_the_persisted_reservation() {
        let first = Generator::new(5, 0);
        let now = at(200, 0);
        let mut seen: HashSet<u64> = HashSet::new();
        let mut reserved_end = 0;
        for _ in 0..40 {
            loop {
                match first.issue(1000, now) {
                    Ok(b) => {
                        seen.extend(b.ids);
                        break;
                    }
                    Err(Refusal::Reserve { through }) => {
                        reserved_end = through + 2;
                        first.reserved(reserved_end);
                    }
                    Err(other) => panic!("{other:?}"),
                }
            }
        }
        // Restart in the same second: the new generator starts at the
        // persisted end and may still borrow from there.
        let second = Generator::new(5, reserved_end);
        let ids = issue(&second, 1000, now).unwrap();
        assert!(ids.iter().all(|id| !seen.contains(id)));
        assert!(ids.iter().all(|&id| decompose(id).0 >= reserved_end));
    }

    #[test]
    fn the_end_of_the_tick_space_is_refused() {
        let g = Generator::new(0, MAX_TICK);
        g.reserved(MAX_TICK + 1);
        let far_future = at(MAX_TICK, 0);
        issue(&g, IDS_PER_TICK, far_future).unwrap();
        assert_eq!(g.issue(1, far_future).unwrap_err(), Refusal::Exhausted);
    }
}
