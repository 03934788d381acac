//! The hot-mapping cache: a sharded `DashSet` of boxed entries, found by
//! code, each holding a ready-made answer (status and a pre-built `Location`
//! header value), so a hit clones a reference-counted header and allocates
//! nothing. The table holds one pointer per link, not the entry: tables
//! double, so at most sizes they are about half empty, and an empty 8-byte
//! slot costs far less than an empty 80-byte one (see docs/BENCHMARKS.md).
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
use std::time::{Duration, Instant};

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

struct Entry {
    /// Inline for codes up to 24 bytes (every generated one), so comparing
    /// it reads the entry's own memory.
    code: compact_str::CompactString,
    target: Target,
    /// Seconds since the cache was created, when the entry was fetched.
    fetched_at: u32,
    referenced: AtomicBool,
}

/// A set element: the boxed entry, found by its code. The table holds only
/// this pointer (8 bytes a slot, in tables half empty after they double),
/// and the entry lives in one allocation of its own.
struct Slot(Box<Entry>);

impl std::borrow::Borrow<str> for Slot {
    fn borrow(&self) -> &str {
        self.0.code.as_str()
    }
}

// Hash and equality must agree with `str`'s, for lookups by `&str`.
impl std::hash::Hash for Slot {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.code.as_str().hash(state);
    }
}

impl PartialEq for Slot {
    fn eq(&self, other: &Self) -> bool {
        self.0.code == other.0.code
    }
}

impl Eq for Slot {}

pub struct Cache {
    map: DashSet<Slot>,
    capacity: usize,
    max_age: Duration,
    negative_ttl: Duration,
    born: Instant,
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
            map: DashSet::with_capacity(capacity.min(1 << 20)),
            capacity,
            max_age,
            negative_ttl,
            born: Instant::now(),
            sweeping: Arc::new(AtomicBool::new(false)),
            evictions: Arc::new(AtomicU64::new(0)),
            stripes: (0..STRIPES).map(|_| AtomicU64::new(0)).collect(),
            cleared: AtomicU64::new(0),
            hasher: std::hash::RandomState::new(),
        })
    }

    fn now_secs(&self) -> u32 {
        self.born.elapsed().as_secs() as u32
    }

    /// The cached answer, if there is a fresh one.
    pub fn get(&self, code: &str) -> Option<Target> {
        let slot = self.map.get(code)?;
        let entry = &slot.0;
        let ttl = match entry.target {
            Target::Missing => self.negative_ttl,
            _ => self.max_age,
        };
        if u64::from(self.now_secs().saturating_sub(entry.fetched_at)) >= ttl.as_secs().max(1) {
            return None;
        }
        if !entry.referenced.load(Ordering::Relaxed) {
            entry.referenced.store(true, Ordering::Relaxed);
        }
        Some(entry.target.clone())
    }

    pub fn insert(self: &Arc<Self>, code: &str, target: Target) {
        let slot = Slot(Box::new(Entry {
            code: compact_str::CompactString::new(code),
            target,
            fetched_at: self.now_secs(),
            referenced: AtomicBool::new(false),
        }));
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
            let keep = slot.0.referenced.swap(false, Ordering::Relaxed);
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
        self.map.retain(|slot| match &slot.0.target {
            Target::Redirect { location, .. } => {
                location.to_str().map_or(true, |url| !list.blocks_url(url))
            }
            Target::Blocked => false,
            Target::Disabled | Target::Missing => true,
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

    fn redirect(url: &'static str) -> Target {
        Target::Redirect {
            status: StatusCode::FOUND,
            location: HeaderValue::from_static(url),
            expires_at_ms: 0,
        }
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
