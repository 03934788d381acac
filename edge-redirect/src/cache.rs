//! The hot-mapping cache: a sharded `DashSet` of slots, found by code, each
//! holding a ready-made answer (status and the pre-built bytes of the
//! `Location` header value), so a hit allocates nothing.
//!
//! A hit's cost is memory latency: every line it reads is usually cold.
//! So a slot lives in the table itself (40 bytes), and all its bytes (the
//! code, the expiry if the link has one, and the location) live in one
//! allocation together with their reference count (`Bytes::from_owner` of
//! an inline buffer). A hit reads three places: the table's control bytes,
//! the slot, and that allocation, whose first line holds the count, the
//! code and the expiry. The slot the code most likely sits in (its home
//! position) is prefetched together with the control bytes, which takes
//! one miss off the chain when the code is there (dashmap's `raw-api`: the
//! same hash, shard and probe as `DashSet::get`).
//! The `Location` value handed to hyper is a reference-counted slice of it.
//!
//! Eviction is CLOCK (second chance), swept in batches: every hit sets the
//! entry's `referenced` bit; when the map grows 5 % past its capacity, one
//! sweep drops every entry whose bit is clear and clears the bit of the rest.
//! A link that is read between two sweeps survives them; a scan of codes
//! read once does not, so scans cannot flush hot links. The sweep runs on a
//! blocking thread, never on the request that triggered it.
//!
//! Entries also age: a redirect is trusted for `max_age`, an unknown code
//! (negative entry) for `negative_ttl`, after which the next request looks it
//! up again. That bounds staleness even if an invalidation is lost.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use dashmap::DashSet;
use http::{HeaderValue, StatusCode};

/// What the edge answers for a code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// Redirect with this status to this location, until `expires_at_ms`
    /// (Unix ms, 0 = never).
    Redirect {
        status: StatusCode,
        location: HeaderValue,
        expires_at_ms: i64,
    },
    /// The link exists but is disabled: 410.
    Disabled,
    /// The link's destination is on the domain blocklist: 410.
    Blocked,
    /// No such link (or deleted): 404.
    Missing,
}

/// `Slot::kind` for answers that are not redirects (a redirect's kind is
/// its status, at least 100).
const MISSING: u16 = 0;
const DISABLED: u16 = 1;
const BLOCKED: u16 = 2;

/// Bytes of an expiry in `Slot::bytes`.
const EXPIRY: usize = 8;
/// The flag in `Slot::bytes[0]` saying an expiry follows the code.
const HAS_EXPIRY: u8 = 0x80;

/// One cached answer, stored in the table itself.
struct Slot {
    /// `[flags | code length: u8][code][expires_at_ms: i64, little-endian,
    /// only if HAS_EXPIRY][location]`, in one allocation with its reference
    /// count (see `pack`). Most links never expire, and leaving out their
    /// expiry moves many of them down a size class.
    bytes: Bytes,
    /// The redirect status, or `MISSING`, `DISABLED` or `BLOCKED`.
    kind: u16,
    /// When the entry was fetched, in Unix seconds.
    fetched_at: u32,
    referenced: AtomicBool,
}

impl Slot {
    /// `None` for a code longer than 127 bytes (never a valid one).
    fn new(code: &str, target: &Target, fetched_at: u32) -> Option<Self> {
        let code_len = u8::try_from(code.len())
            .ok()
            .filter(|n| n & HAS_EXPIRY == 0)?;
        let (kind, location, expires_at_ms) = match target {
            Target::Redirect {
                status,
                location,
                expires_at_ms,
            } => (status.as_u16(), location.as_bytes(), *expires_at_ms),
            Target::Missing => (MISSING, &[][..], 0),
            Target::Disabled => (DISABLED, &[][..], 0),
            Target::Blocked => (BLOCKED, &[][..], 0),
        };
        let mut text = Vec::with_capacity(1 + code.len() + EXPIRY + location.len());
        if expires_at_ms == 0 {
            text.push(code_len);
            text.extend_from_slice(code.as_bytes());
        } else {
            text.push(code_len | HAS_EXPIRY);
            text.extend_from_slice(code.as_bytes());
            text.extend_from_slice(&expires_at_ms.to_le_bytes());
        }
        text.extend_from_slice(location);
        Some(Self {
            bytes: pack(&text),
            kind,
            fetched_at,
            referenced: AtomicBool::new(false),
        })
    }

    fn code_end(&self) -> usize {
        1 + usize::from(self.bytes[0] & !HAS_EXPIRY)
    }

    fn location_start(&self) -> usize {
        self.code_end()
            + if self.bytes[0] & HAS_EXPIRY == 0 {
                0
            } else {
                EXPIRY
            }
    }

    fn code(&self) -> &str {
        // Always UTF-8: the bytes were copied from a `&str`.
        std::str::from_utf8(&self.bytes[1..self.code_end()]).unwrap_or_default()
    }

    fn location(&self) -> &[u8] {
        &self.bytes[self.location_start()..]
    }

    fn target(&self) -> Option<Target> {
        Some(match self.kind {
            MISSING => Target::Missing,
            DISABLED => Target::Disabled,
            BLOCKED => Target::Blocked,
            status => {
                let start = self.location_start();
                let mut expiry = [0; EXPIRY];
                if start > self.code_end() {
                    expiry.copy_from_slice(&self.bytes[self.code_end()..start]);
                }
                Target::Redirect {
                    status: StatusCode::from_u16(status).ok()?,
                    // A counted slice of the slot's bytes, which were
                    // copied from a valid header value: no copy.
                    location: HeaderValue::from_maybe_shared(self.bytes.slice(start..)).ok()?,
                    expires_at_ms: i64::from_le_bytes(expiry),
                }
            }
        })
    }
}

/// An owner keeping up to `N` bytes inline, so that `Bytes::from_owner`
/// puts the reference count and the bytes in one allocation (the length
/// first, so the count, the expiry and the code share the first line).
#[repr(C)]
struct Inline<const N: usize> {
    len: u16,
    buf: [u8; N],
}

impl<const N: usize> AsRef<[u8]> for Inline<N> {
    fn as_ref(&self) -> &[u8] {
        &self.buf[..usize::from(self.len)]
    }
}

fn inline<const N: usize>(text: &[u8]) -> Bytes {
    let mut buf = [0; N];
    buf[..text.len()].copy_from_slice(text);
    Bytes::from_owner(Inline {
        len: text.len() as u16,
        buf,
    })
}

/// `text` in one allocation with its reference count. The sizes make the
/// allocation (8 bytes of count, 2 of length, the buffer) a multiple of 16
/// bytes; past 502 bytes the count lives apart.
fn pack(text: &[u8]) -> Bytes {
    match text.len() {
        0..=54 => inline::<54>(text),
        55..=70 => inline::<70>(text),
        71..=86 => inline::<86>(text),
        87..=102 => inline::<102>(text),
        103..=118 => inline::<118>(text),
        119..=150 => inline::<150>(text),
        151..=182 => inline::<182>(text),
        183..=246 => inline::<246>(text),
        247..=374 => inline::<374>(text),
        375..=502 => inline::<502>(text),
        _ => Bytes::copy_from_slice(text),
    }
}

impl std::borrow::Borrow<str> for Slot {
    fn borrow(&self) -> &str {
        self.code()
    }
}

// Hash and equality must agree with `str`'s, for lookups by `&str`.
impl std::hash::Hash for Slot {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.code().hash(state);
    }
}

impl PartialEq for Slot {
    fn eq(&self, other: &Self) -> bool {
        self.code() == other.code()
    }
}

impl Eq for Slot {}

/// Starts loading the cache lines of `element` (a slot in the table).
#[inline(always)]
fn prefetch<T>(element: *const T) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
        let start = element.cast::<i8>();
        // SAFETY: SSE is part of every x86_64 target, and a prefetch only
        // hints the cache: it reads nothing and never faults, whatever the
        // address.
        #[allow(unsafe_code)]
        unsafe {
            _mm_prefetch::<_MM_HINT_T0>(start);
            _mm_prefetch::<_MM_HINT_T0>(start.wrapping_add(size_of::<T>() - 1));
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = element;
}

/// The wall clock, Unix milliseconds.
pub fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Unix seconds as kept in a slot (good until 2106).
fn unix_secs(unix_ms: i64) -> u32 {
    u32::try_from(unix_ms.max(0) / 1000).unwrap_or(u32::MAX)
}

pub struct Cache {
    map: DashSet<Slot>,
    capacity: usize,
    max_age: Duration,
    negative_ttl: Duration,
    sweeping: Arc<AtomicBool>,
    evictions: Arc<AtomicU64>,
    /// Invalidation counters, striped by code hash (plus a whole-cache
    /// counter for `clear`). A lookup that started before an invalidation of
    /// its code may carry the old value, so it is not cached.
    stripes: Vec<AtomicU64>,
    cleared: AtomicU64,
    hasher: std::hash::RandomState,
}

const STRIPES: usize = 4096;

impl Cache {
    pub fn new(capacity: usize, max_age: Duration, negative_ttl: Duration) -> Arc<Self> {
        Arc::new(Self {
            // Grown with its entries, not sized for `capacity` up front: a
            // table sized for a million links that holds a hundred thousand
            // spreads them over 80 MB, and every hit then misses deeper in
            // the cache hierarchy (0.17 us more per hit, measured with
            // `perf`). Growing costs one rehash per doubling, per shard.
            map: DashSet::new(),
            capacity,
            max_age,
            negative_ttl,
            sweeping: Arc::new(AtomicBool::new(false)),
            evictions: Arc::new(AtomicU64::new(0)),
            stripes: (0..STRIPES).map(|_| AtomicU64::new(0)).collect(),
            cleared: AtomicU64::new(0),
            hasher: std::hash::RandomState::new(),
        })
    }

    /// The cached answer, if there is a fresh one.
    pub fn get(&self, code: &str) -> Option<Target> {
        self.get_at(code, unix_ms())
    }

    /// The cached answer, if there is a fresh one at `now_ms` (Unix ms,
    /// the clock the caller has just read for its click). Ages are counted
    /// on the wall clock, in seconds: an entry fetched "later" than now
    /// (the clock was set back) counts as stale, so setting the clock back
    /// can only shorten how long an entry is trusted.
    pub fn get_at(&self, code: &str, now_ms: i64) -> Option<Target> {
        // `DashSet::get`, with the slot the code most likely sits in (its
        // home position, `hash & (buckets - 1)`; hashbrown keeps slot `i`
        // at `data_end - (i + 1)`) loaded at the same time as the table's
        // control bytes rather than after them.
        let hash = self.map.hash_usize(&code);
        let shard = self.map.shards()[self.map.determine_shard(hash)].read();
        prefetch(
            shard
                .data_end()
                .as_ptr()
                .wrapping_sub((hash & (shard.buckets() - 1)) + 1),
        );
        let (slot, _) = shard.get(hash as u64, |(slot, _)| slot.code() == code)?;
        let ttl = match slot.kind {
            MISSING => self.negative_ttl,
            _ => self.max_age,
        };
        let fresh = unix_secs(now_ms)
            .checked_sub(slot.fetched_at)
            .is_some_and(|age| u64::from(age) < ttl.as_secs().max(1));
        if !fresh {
            return None;
        }
        if !slot.referenced.load(Ordering::Relaxed) {
            slot.referenced.store(true, Ordering::Relaxed);
        }
        slot.target()
    }

    pub fn insert(self: &Arc<Self>, code: &str, target: Target) {
        let Some(slot) = Slot::new(code, &target, unix_secs(unix_ms())) else {
            return;
        };
        // A set keeps the element it has: replace it.
        self.map.remove(code);
        self.map.insert(slot);
        if self.map.len() > self.capacity + self.capacity / 20
            && !self.sweeping.swap(true, Ordering::AcqRel)
        {
            let cache = self.clone();
            let sweep = move || {
                cache.sweep();
                cache.sweeping.store(false, Ordering::Release);
            };
            match tokio::runtime::Handle::try_current() {
                Ok(handle) => drop(handle.spawn_blocking(sweep)),
                Err(_) => sweep(),
            }
        }
    }

    /// One CLOCK pass over every entry.
    pub fn sweep(&self) {
        let mut evicted = 0u64;
        self.map.retain(|slot| {
            let keep = slot.referenced.swap(false, Ordering::Relaxed);
            evicted += u64::from(!keep);
            keep
        });
        self.evictions.fetch_add(evicted, Ordering::Relaxed);
        metrics::counter!("edge_cache_evictions_total").increment(evicted);
        metrics::gauge!("edge_cache_entries").set(self.map.len() as f64);
    }

    fn stripe(&self, code: &str) -> &AtomicU64 {
        use std::hash::BuildHasher;
        &self.stripes[(self.hasher.hash_one(code) as usize) % STRIPES]
    }

    /// A token for "no invalidation of `code` since now".
    pub fn epoch(&self, code: &str) -> (u64, u64) {
        (
            self.stripe(code).load(Ordering::Acquire),
            self.cleared.load(Ordering::Acquire),
        )
    }

    /// Caches the result of a lookup that started at `epoch`, unless `code`
    /// was invalidated (or the cache cleared) since.
    pub fn insert_if_current(self: &Arc<Self>, code: &str, target: Target, epoch: (u64, u64)) {
        if self.epoch(code) == epoch {
            self.insert(code, target);
        }
    }

    pub fn remove(&self, code: &str) {
        self.stripe(code).fetch_add(1, Ordering::AcqRel);
        self.map.remove(code);
    }

    pub fn clear(&self) {
        self.cleared.fetch_add(1, Ordering::AcqRel);
        self.map.clear();
    }

    /// After the blocklist changed: drops every redirect to a domain now
    /// blocked and every entry blocked before (the list may have let it
    /// go), so the next request resolves them against the new list. Lookups
    /// already running checked the old list, so they are not cached.
    pub fn drop_blocklisted(&self, list: &shortener_common::blocklist::Blocklist) {
        self.cleared.fetch_add(1, Ordering::AcqRel);
        self.map.retain(|slot| match slot.kind {
            BLOCKED => false,
            MISSING | DISABLED => true,
            _ => std::str::from_utf8(slot.location()).map_or(true, |url| !list.blocks_url(url)),
        });
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    pub fn evictions(&self) -> u64 {
        self.evictions.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn redirect(url: &'static str) -> Target {
        Target::Redirect {
            status: StatusCode::FOUND,
            location: HeaderValue::from_static(url),
            expires_at_ms: 0,
        }
    }

    /// Every size of packed slot gives back exactly what was stored, for
    /// codes from 1 to 64 bytes and locations across every inline size and
    /// past them; a code over 127 bytes is simply not cached.
    #[test]
    fn slots_of_every_size_give_back_what_was_stored() {
        let cache = Cache::new(100_000, Duration::from_secs(3600), Duration::from_secs(60));
        let mut stored = Vec::new();
        for (i, url_len) in (20..=1100).step_by(7).enumerate() {
            let code = "c".repeat(1 + i % 64) + &i.to_string();
            let url = format!("https://example.com/{}", "p".repeat(url_len - 20));
            let target = Target::Redirect {
                status: [StatusCode::FOUND, StatusCode::MOVED_PERMANENTLY][i % 2],
                location: HeaderValue::from_str(&url).unwrap(),
                expires_at_ms: [0, 1_700_000_000_123, -5][i % 3],
            };
            cache.insert(&code, target.clone());
            stored.push((code, target));
        }
        for (i, kind) in [Target::Missing, Target::Disabled, Target::Blocked]
            .into_iter()
            .enumerate()
        {
            cache.insert(&format!("k{i}"), kind.clone());
            stored.push((format!("k{i}"), kind));
        }
        for (code, target) in &stored {
            assert_eq!(cache.get(code).as_ref(), Some(target), "{code}");
        }
        assert_eq!(cache.len(), stored.len());
        // A hit hands out a view of the slot, which outlives the slot.
        let Some(Target::Redirect { location, .. }) = cache.get(&stored[0].0) else {
            panic!("not a redirect");
        };
        cache.clear();
        assert_eq!(location.as_bytes(), b"https://example.com/");
        cache.insert(&"x".repeat(128), Target::Missing);
        assert!(cache.is_empty());
        cache.insert(&"x".repeat(127), Target::Missing);
        assert_eq!(cache.get(&"x".repeat(127)), Some(Target::Missing));
    }

    #[test]
    fn a_hot_link_survives_a_scan_of_cold_ones() {
        let cache = Cache::new(1_000, Duration::from_secs(3600), Duration::from_secs(60));
        cache.insert("hot", redirect("https://example.com/hot"));
        for i in 0..50_000 {
            cache.insert(&format!("cold{i}"), redirect("https://example.com/cold"));
            if i % 100 == 0 {
                // The hot link is read now and then, as hot links are.
                assert!(
                    cache.get("hot").is_some(),
                    "hot link evicted after {i} cold inserts"
                );
            }
            assert!(
                cache.len() <= 1_000 + 1_000 / 20 + 1,
                "cache grew to {}",
                cache.len()
            );
        }
        assert!(cache.get("hot").is_some());
        assert!(cache.evictions() >= 48_000, "{}", cache.evictions());
        // Most of the cold scan is gone; the cache holds no more than its bound.
        assert!(!cache.is_empty());
    }

    #[test]
    fn negative_entries_and_redirects_age_out() {
        let cache = Cache::new(10, Duration::from_secs(1), Duration::from_secs(1));
        cache.insert("gone", Target::Missing);
        cache.insert("live", redirect("https://example.com"));
        assert_eq!(cache.get("gone"), Some(Target::Missing));
        assert!(cache.get("live").is_some());
        // Poll with a deadline rather than sleeping a fixed time.
        let deadline = Instant::now() + Duration::from_secs(5);
        while cache.get("gone").is_some() || cache.get("live").is_some() {
            assert!(Instant::now() < deadline, "entries never aged out");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Ages count on the wall clock in seconds: an entry is fresh until
    /// `max_age` after it was fetched, and a clock set back makes it stale,
    /// never fresher.
    #[test]
    fn ages_count_on_the_wall_clock_and_a_clock_set_back_makes_entries_stale() {
        let cache = Cache::new(10, Duration::from_secs(60), Duration::from_secs(60));
        cache.insert("a", redirect("https://example.com/a"));
        // Read after the insert, so `now` is never a second before it.
        let now = unix_ms();
        assert!(cache.get_at("a", now).is_some());
        assert!(cache.get_at("a", now + 58_000).is_some());
        assert_eq!(cache.get_at("a", now + 61_000), None);
        assert_eq!(cache.get_at("a", now - 2_000), None);
    }

    #[test]
    fn a_lookup_overtaken_by_an_invalidation_is_not_cached() {
        let cache = Cache::new(10, Duration::from_secs(60), Duration::from_secs(60));
        let started = cache.epoch("a");
        let other = cache.epoch("b");
        cache.remove("a"); // an invalidation arrives while the lookup runs
        cache.insert_if_current("a", redirect("https://example.com/old"), started);
        assert_eq!(cache.get("a"), None);
        // Invalidating another code does not spoil this lookup.
        cache.insert_if_current("b", redirect("https://example.com/b"), other);
        assert!(cache.get("b").is_some());
        cache.insert_if_current("a", redirect("https://example.com/new"), cache.epoch("a"));
        assert!(cache.get("a").is_some());
        let before_clear = cache.epoch("c");
        cache.clear();
        cache.insert_if_current("c", redirect("https://example.com/c"), before_clear);
        assert_eq!(cache.get("c"), None);
    }

    #[test]
    fn a_blocklist_change_drops_what_it_blocks_and_what_it_no_longer_does() {
        let cache = Cache::new(10, Duration::from_secs(60), Duration::from_secs(60));
        cache.insert("bad", redirect("https://www.evil.example/login"));
        cache.insert("good", redirect("https://good.example/"));
        cache.insert("was", Target::Blocked);
        cache.insert("off", Target::Disabled);
        let running = cache.epoch("late");
        let list = shortener_common::blocklist::Blocklist::parse("evil.example\n");
        cache.drop_blocklisted(&list);
        assert_eq!(cache.get("bad"), None);
        assert_eq!(cache.get("was"), None);
        assert!(cache.get("good").is_some());
        assert_eq!(cache.get("off"), Some(Target::Disabled));
        // A lookup that began under the old list is not cached.
        cache.insert_if_current("late", redirect("https://evil.example/"), running);
        assert_eq!(cache.get("late"), None);
    }

    #[test]
    fn remove_and_clear() {
        let cache = Cache::new(10, Duration::from_secs(60), Duration::from_secs(60));
        cache.insert("a", Target::Disabled);
        cache.insert("b", Target::Disabled);
        cache.remove("a");
        assert_eq!(cache.get("a"), None);
        assert_eq!(cache.get("b"), Some(Target::Disabled));
        cache.clear();
        assert!(cache.is_empty());
    }
}
