//! The bit layout of an ID. This is a published constant: changing it would
//! change which codes can ever be issued, so a new layout gets a new version.
//!
//! ```text
//!  46                      18 17    14 13            0
//! +--------------------------+--------+---------------+
//! | tick: 29 bits (seconds)  | worker | sequence      |
//! |  since 2026-01-01 UTC    | 4 bits | 14 bits       |
//! +--------------------------+--------+---------------+
//! ```
//!
//! - 47 bits in all, so every ID is below 2^47 = 140.7e12 < 62^8 = 218.3e12:
//!   the base62 code of any ID, after the permutation, is at most 8 characters.
//! - Sequence: 16,384 IDs per worker per one-second tick, sustained. A burst may
//!   borrow up to [`MAX_BORROW_TICKS`] future ticks, i.e. 81,920 IDs at once
//!   beyond the current second, after which issuing waits for the clock.
//! - Worker: 16 concurrent keygen instances (16 x 16,384 = 262,144 IDs/s).
//! - Tick: 2^29 s = 17.0 years, until 2043-01-05. Before then a version-2
//!   layout with 9-character codes takes over; codes already issued stay valid
//!   because links are stored by code, not by ID.

/// Unix time in milliseconds of tick 0: 2026-01-01T00:00:00Z.
pub const EPOCH_UNIX_MS: u64 = 1_767_225_600_000;
/// Length of one tick.
pub const TICK_MS: u64 = 1_000;
pub const TICK_BITS: u32 = 29;
pub const WORKER_BITS: u32 = 4;
pub const SEQUENCE_BITS: u32 = 14;
/// Total width of an ID.
pub const ID_BITS: u32 = TICK_BITS + WORKER_BITS + SEQUENCE_BITS;

pub const MAX_TICK: u64 = (1 << TICK_BITS) - 1;
pub const MAX_WORKER: u16 = (1 << WORKER_BITS) - 1;
pub const IDS_PER_TICK: u32 = 1 << SEQUENCE_BITS;
/// How many ticks ahead of the wall clock a burst may run.
pub const MAX_BORROW_TICKS: u64 = 4;

/// Packs the three fields into an ID.
pub fn compose(tick: u64, worker: u16, sequence: u32) -> u64 {
    debug_assert!(tick <= MAX_TICK && worker <= MAX_WORKER && sequence < IDS_PER_TICK);
    (tick << (WORKER_BITS + SEQUENCE_BITS))
        | (u64::from(worker) << SEQUENCE_BITS)
        | u64::from(sequence)
}

/// Splits an ID into `(tick, worker, sequence)`.
pub fn decompose(id: u64) -> (u64, u16, u32) {
    (
        id >> (WORKER_BITS + SEQUENCE_BITS),
        ((id >> SEQUENCE_BITS) & u64::from(MAX_WORKER)) as u16,
        (id & u64::from(IDS_PER_TICK - 1)) as u32,
    )
}

/// The tick that contains Unix time `unix_ms` (0 before the epoch).
pub fn tick_at(unix_ms: u64) -> u64 {
    unix_ms.saturating_sub(EPOCH_UNIX_MS) / TICK_MS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_fits_eight_base62_characters() {
        assert_eq!(ID_BITS, 47);
        assert!((1u64 << ID_BITS) <= 62u64.pow(8));
    }

    #[test]
    fn one_worker_sustains_ten_thousand_ids_per_second() {
        let per_second = u64::from(IDS_PER_TICK) * 1_000 / TICK_MS;
        assert!(per_second >= 10_000, "{per_second}");
    }

    #[test]
    fn the_tick_space_lasts_until_2043() {
        let end_unix_s = (EPOCH_UNIX_MS + (MAX_TICK + 1) * TICK_MS) / 1000;
        // 2043-01-01T00:00:00Z
        assert!(end_unix_s > 2_303_683_200, "{end_unix_s}");
    }

    #[test]
    fn compose_and_decompose_round_trip() {
        for (t, w, s) in [
            (0, 0, 0),
            (MAX_TICK, MAX_WORKER, IDS_PER_TICK - 1),
            (12345, 7, 99),
        ] {
            let id = compose(t, w, s);
            assert!(id < 1 << ID_BITS);
            assert_eq!(decompose(id), (t, w, s));
        }
    }
}
