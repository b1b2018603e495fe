//! Bounded bookkeeping for the limits that keep one client from taking a node's share of
//! others (SECURITY.md "What each limit defends"): failure counters keyed by source or by
//! credential id, the client's source address behind trusted proxies, and a log that
//! summarizes rather than repeats.
//!
//! Every table here has a fixed capacity (its memory grows with use up to it) and O(1)
//! operations: [`WindowCounters`] is a set of LRU shards, each behind its own lock, so
//! neither a flood of distinct keys nor a full table ever makes a lookup scan (issue 13
//! finding 6: a failure table that was scanned under a lock every login took, once ~100k
//! ids had failed). Time is passed in.

use std::hash::{BuildHasher, Hash};
use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use lru::LruCache;

use crate::error::{NodeError, Result};

/// Lock shards of a bounded table: enough that two workers rarely contend.
const SHARDS: usize = 32;

/// A fixed-capacity map in LRU shards: `get`, `put` and `remove` are O(1); when a shard is
/// full its least recently used entry goes.
pub struct BoundedMap<K, V> {
    shards: Vec<Mutex<LruCache<K, V>>>,
    hasher: std::collections::hash_map::RandomState,
}

impl<K: Hash + Eq, V> std::fmt::Debug for BoundedMap<K, V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BoundedMap")
            .field("capacity", &self.capacity())
            .finish_non_exhaustive()
    }
}

impl<K: Hash + Eq, V> BoundedMap<K, V> {
    /// A map holding at most about `capacity` entries (rounded up to whole shards). Its
    /// shards' tables grow with what they hold, up to the capacity: allocated for the
    /// capacity at once (`LruCache::new`), the six 100,000-entry tables of a node's
    /// credentials and scopes were 13 MB, and the two a device's every request writes
    /// (its record, its scope) became resident in full within a few thousand devices, a
    /// hashed entry touching a page of its own (BENCHMARKS.md "Tables that grow").
    pub fn new(capacity: usize) -> Self {
        let per_shard =
            NonZeroUsize::new(capacity.div_ceil(SHARDS).max(1)).unwrap_or(NonZeroUsize::MIN);
        let shard = || {
            let mut lru = LruCache::unbounded();
            lru.resize(per_shard);
            Mutex::new(lru)
        };
        BoundedMap {
            shards: (0..SHARDS).map(|_| shard()).collect(),
            hasher: std::collections::hash_map::RandomState::new(),
        }
    }

    fn shard(&self, key: &K) -> std::sync::MutexGuard<'_, LruCache<K, V>> {
        let i = (self.hasher.hash_one(key) as usize) % SHARDS;
        self.shards[i]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Applies `f` to the entry of `key` (inserted with `init` if absent) and returns its
    /// result: one lock, one hash lookup.
    pub fn with<R>(&self, key: K, init: impl FnOnce() -> V, f: impl FnOnce(&mut V) -> R) -> R {
        let mut shard = self.shard(&key);
        let entry = shard.get_or_insert_mut(key, init);
        f(entry)
    }

    /// Applies `f` to the entry of `key` if there is one (one lock, one lookup).
    pub fn update<R>(&self, key: &K, f: impl FnOnce(&mut V) -> R) -> Option<R> {
        self.shard(key).get_mut(key).map(f)
    }

    /// A copy of the entry of `key`, if present (marks it recently used).
    pub fn get(&self, key: &K) -> Option<V>
    where
        V: Clone,
    {
        self.shard(key).get(key).cloned()
    }

    /// Inserts or replaces the entry of `key`.
    pub fn put(&self, key: K, value: V) {
        self.shard(&key).put(key, value);
    }

    /// Removes the entry of `key`.
    pub fn remove(&self, key: &K) {
        self.shard(key).pop(key);
    }

    /// Drops entries from the least recently used end of every shard while `idle` says
    /// they are of no more use; returns how many went. An entry used more recently than
    /// one it cannot drop stays until a later call (recency and age mostly agree: every
    /// table here stamps an entry when it writes it).
    pub fn forget_idle(&self, idle: impl Fn(&V) -> bool) -> usize {
        let mut forgotten = 0;
        for shard in &self.shards {
            let mut shard = shard.lock().unwrap_or_else(PoisonError::into_inner);
            while shard.peek_lru().is_some_and(|(_, v)| idle(v)) {
                shard.pop_lru();
                forgotten += 1;
            }
        }
        forgotten
    }

    /// Entries held now.
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(PoisonError::into_inner).len())
            .sum()
    }

    /// Whether it holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Most entries it ever holds.
    pub fn capacity(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(PoisonError::into_inner).cap().get())
            .sum()
    }
}

/// Events counted per key in fixed windows: "at most `limit` failures per `window`".
#[derive(Debug, Clone, Copy)]
struct Window {
    start: Instant,
    count: u32,
}

/// Counts events (failed verifications) per key in fixed windows, in a [`BoundedMap`].
/// A key evicted under a flood of distinct keys starts again from zero; that only ever
/// errs towards letting a request be verified, never towards refusing one.
pub struct WindowCounters<K> {
    map: BoundedMap<K, Window>,
    limit: u32,
    window: Duration,
}

impl<K: Hash + Eq> std::fmt::Debug for WindowCounters<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WindowCounters")
            .field("limit", &self.limit)
            .field("window", &self.window)
            .field("map", &self.map)
            .finish()
    }
}

impl<K: Hash + Eq> WindowCounters<K> {
    /// `limit` events per `window` per key, for at most `capacity` keys.
    pub fn new(limit: u32, window: Duration, capacity: usize) -> Self {
        WindowCounters {
            map: BoundedMap::new(capacity),
            limit,
            window,
        }
    }

    /// Counts one event for `key`; returns the count in the current window.
    pub fn record(&self, key: K, now: Instant) -> u32 {
        let window = self.window;
        self.map.with(
            key,
            || Window {
                start: now,
                count: 0,
            },
            |w| {
                if now.saturating_duration_since(w.start) >= window {
                    *w = Window {
                        start: now,
                        count: 0,
                    };
                }
                w.count = w.count.saturating_add(1);
                w.count
            },
        )
    }

    /// When `key` reached its limit in the current window: how long until it resets.
    pub fn exhausted(&self, key: &K, now: Instant) -> Option<Duration>
    where
        K: Clone,
    {
        let w = self.map.get(key)?;
        let elapsed = now.saturating_duration_since(w.start);
        (w.count >= self.limit && elapsed < self.window).then(|| self.window - elapsed)
    }

    /// Forgets the keys whose window ended by `now` (a key counted again starts from
    /// zero either way); returns how many.
    pub fn forget_idle(&self, now: Instant) -> usize {
        let window = self.window;
        self.map
            .forget_idle(|w| now.saturating_duration_since(w.start) >= window)
    }

    /// Keys counted now.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether no key is counted.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Most keys it ever counts.
    pub fn capacity(&self) -> usize {
        self.map.capacity()
    }
}

/// A 429 with the time until a retry can succeed.
pub fn rate_limited(wait: Duration) -> NodeError {
    NodeError::RateLimited {
        retry_after_s: wait.as_secs().max(1),
    }
}

/// A network range: an address and a prefix length (`10.0.0.0/8`, `::1/128`, or a bare
/// address for one host).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    net: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Parses `addr` or `addr/prefix`.
    pub fn parse(s: &str) -> Result<Self> {
        let bad = || {
            NodeError::Config(format!(
                "{s:?}: expected an IP address or CIDR (10.0.0.0/8)"
            ))
        };
        let (addr, prefix) = match s.trim().split_once('/') {
            Some((a, p)) => (a, Some(p.parse::<u8>().map_err(|_| bad())?)),
            None => (s.trim(), None),
        };
        let net: IpAddr = addr.parse().map_err(|_| bad())?;
        let max = if net.is_ipv4() { 32 } else { 128 };
        let prefix = prefix.unwrap_or(max);
        if prefix > max {
            return Err(bad());
        }
        Ok(Cidr { net, prefix })
    }

    /// Whether `ip` is inside the range (IPv4-mapped IPv6 addresses count as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        match (self.net, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Who a request comes from, for per-source limits: the peer address, or — when the peer
/// is a trusted proxy (a load balancer) — the last address that proxy appended to
/// `X-Forwarded-For`. A client cannot choose its source by sending the header itself:
/// only a trusted peer's last hop is believed.
#[derive(Debug, Clone, Default)]
pub struct Sources {
    trusted: Vec<Cidr>,
}

impl Sources {
    /// Sources behind these proxies.
    pub fn new(trusted: Vec<Cidr>) -> Self {
        Sources { trusted }
    }

    /// Whether connections from `ip` come through a trusted proxy.
    pub fn is_trusted_proxy(&self, ip: IpAddr) -> bool {
        self.trusted.iter().any(|c| c.contains(ip))
    }

    /// The client address of a request from `peer` carrying `forwarded_for`.
    pub fn source(&self, peer: Option<SocketAddr>, forwarded_for: Option<&str>) -> Option<IpAddr> {
        let peer = canonical(peer?.ip());
        if !self.is_trusted_proxy(peer) {
            return Some(peer);
        }
        forwarded_for
            .and_then(|h| h.rsplit(',').next())
            .and_then(|last| last.trim().parse::<IpAddr>().ok())
            .map(canonical)
            .or(Some(peer))
    }
}

/// A log line budget: at most `per_minute` lines of one kind; the rest are counted and
/// reported in one summary line when the budget allows again. Rejections (401, 429) are
/// logged through it, so a flood of them cannot flood the logs (issue 13 finding 7).
#[derive(Debug)]
pub struct LogBudget {
    per_minute: u32,
    state: Mutex<(Instant, u32)>,
    suppressed: AtomicU64,
}

impl LogBudget {
    /// `per_minute` lines per minute.
    pub fn new(per_minute: u32) -> Self {
        LogBudget {
            per_minute,
            state: Mutex::new((Instant::now(), 0)),
            suppressed: AtomicU64::new(0),
        }
    }

    /// Whether a line may be written now; `Some(n)` when it may, `n` being how many were
    /// suppressed since the last one written (to say so in that line).
    pub fn admit(&self, now: Instant) -> Option<u64> {
        let mut s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if now.saturating_duration_since(s.0) >= Duration::from_secs(60) {
            *s = (now, 0);
        }
        if s.1 < self.per_minute {
            s.1 += 1;
            Some(self.suppressed.swap(0, Ordering::Relaxed))
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn update_changes_only_an_entry_that_is_there() {
        let map: BoundedMap<u32, u32> = BoundedMap::new(64);
        assert_eq!(
            map.update(&1, |v| *v += 1),
            None,
            "absent: nothing inserted"
        );
        assert!(map.is_empty());
        map.put(1, 10);
        assert_eq!(
            map.update(&1, |v| {
                *v += 1;
                *v
            }),
            Some(11)
        );
        assert_eq!(map.get(&1), Some(11));
    }

    #[test]
    fn a_flood_of_distinct_keys_never_grows_the_table_past_its_capacity() {
        let counters = WindowCounters::new(3, Duration::from_secs(60), 1000);
        let now = Instant::now();
        for i in 0..200_000u32 {
            counters.record(i, now);
        }
        let cap = counters.capacity();
        assert!((1000..1000 + SHARDS).contains(&cap), "capacity {cap}");
        assert!(counters.len() <= cap);
        // A key used just now is still counted exactly.
        for _ in 0..3 {
            counters.record(7_000_000, now);
        }
        assert!(counters.exhausted(&7_000_000, now).is_some());
    }

    #[test]
    fn windows_count_to_their_limit_then_reset() {
        let c = WindowCounters::new(2, Duration::from_secs(10), 100);
        let t0 = Instant::now();
        assert_eq!(c.exhausted(&"a", t0), None);
        c.record("a", t0);
        assert_eq!(c.exhausted(&"a", t0), None);
        c.record("a", t0 + Duration::from_secs(1));
        let wait = c
            .exhausted(&"a", t0 + Duration::from_secs(4))
            .expect("exhausted");
        assert_eq!(wait, Duration::from_secs(6));
        assert_eq!(c.exhausted(&"b", t0), None, "per key");
        assert_eq!(c.exhausted(&"a", t0 + Duration::from_secs(10)), None);
        assert_eq!(
            c.record("a", t0 + Duration::from_secs(11)),
            1,
            "a new window"
        );
    }

    #[test]
    fn forgetting_idle_windows_drops_only_ended_ones_and_never_resets_a_limit() {
        let c = WindowCounters::new(2, Duration::from_secs(10), 1000);
        let t0 = Instant::now();
        for key in 0..100u32 {
            c.record(key, t0);
        }
        // Key 500 reaches its limit later; it must stay counted.
        c.record(500, t0 + Duration::from_secs(8));
        c.record(500, t0 + Duration::from_secs(8));
        assert_eq!(c.forget_idle(t0 + Duration::from_secs(5)), 0, "none ended");
        assert_eq!(c.len(), 101);
        assert_eq!(c.forget_idle(t0 + Duration::from_secs(10)), 100);
        assert_eq!(c.len(), 1);
        assert!(
            c.exhausted(&500, t0 + Duration::from_secs(10)).is_some(),
            "a key within its window stays at its limit"
        );
        assert_eq!(c.forget_idle(t0 + Duration::from_secs(18)), 1);
        assert!(c.is_empty());
    }

    #[test]
    fn cidrs_match_their_range_only() {
        let lb = Cidr::parse("10.13.0.0/16").expect("valid");
        assert!(lb.contains("10.13.200.1".parse().expect("ip")));
        assert!(!lb.contains("10.14.0.1".parse().expect("ip")));
        assert!(lb.contains("::ffff:10.13.0.9".parse().expect("mapped")));
        let one = Cidr::parse("::1").expect("valid");
        assert!(one.contains("::1".parse().expect("ip")));
        assert!(!one.contains("::2".parse().expect("ip")));
        assert!(Cidr::parse("0.0.0.0/0")
            .expect("valid")
            .contains("8.8.8.8".parse().expect("ip")));
        for bad in ["10.0.0.0/33", "nope", "10.0.0.0/x", "::/129"] {
            assert!(Cidr::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn forwarded_for_is_believed_only_from_trusted_proxies() {
        let s = Sources::new(vec![Cidr::parse("127.0.0.0/8").expect("valid")]);
        let lb: SocketAddr = "127.0.0.1:5000".parse().expect("addr");
        let direct: SocketAddr = "192.0.2.7:5000".parse().expect("addr");
        let ip = |s: &str| s.parse::<IpAddr>().ok();
        assert_eq!(
            s.source(Some(lb), Some("6.6.6.6, 198.51.100.4")),
            ip("198.51.100.4")
        );
        assert_eq!(s.source(Some(lb), None), ip("127.0.0.1"));
        assert_eq!(s.source(Some(lb), Some("garbage")), ip("127.0.0.1"));
        assert_eq!(
            s.source(Some(direct), Some("198.51.100.4")),
            ip("192.0.2.7")
        );
        assert_eq!(
            Sources::default().source(Some(lb), Some("198.51.100.4")),
            ip("127.0.0.1")
        );
    }

    #[test]
    fn the_log_budget_summarizes_what_it_suppressed() {
        let b = LogBudget::new(2);
        let t0 = Instant::now();
        assert_eq!(b.admit(t0), Some(0));
        assert_eq!(b.admit(t0), Some(0));
        for _ in 0..500 {
            assert_eq!(b.admit(t0), None);
        }
        assert_eq!(b.admit(t0 + Duration::from_secs(61)), Some(500));
    }
}
