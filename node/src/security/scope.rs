//! What an authenticated principal may touch — a device's structure, a user's paired
//! devices and structures — read from the store's pairing records and cached briefly.
//!
//! - **Fresh** for [`CredentialConfig::scope_ttl`] (1 s): a busy device or app costs the
//!   store one pairing read per second per node, not one per request.
//! - **A grant may be stale, a refusal never is**: a request the cached scope would refuse
//!   is checked against a fresh read first ([`ScopeCache`] `bypass`), so a device paired
//!   a moment ago through another node is reachable at once. An unpairing made through
//!   another node reaches this node's cache within `scope_ttl`; one made through this
//!   node clears it at once ([`ScopeCache::pairing_changed`]).
//! - **Stale if the store does not answer**: a scope read within
//!   [`CredentialConfig::stale_if_error`] (2 min) keeps serving while the store is
//!   unreachable from this node, so its clients' requests for sets owned by nodes that
//!   do reach the store are still forwarded there (chaos scenario `store-partition-node`).
//!   Counted in `tether_auth_stale_answers_total{what="scope"}`.

use std::collections::BTreeSet;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::metrics::Metrics;
use crate::security::credentials::CredentialConfig;
use crate::security::limits::BoundedMap;
use crate::store::StoreError;

/// A user's scope: the serials of its paired devices and the structures it owns.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UserScope {
    /// Serials of its paired devices.
    pub devices: BTreeSet<String>,
    /// Structures it owns.
    pub structures: BTreeSet<String>,
}

#[derive(Debug, Clone)]
struct Entry<T> {
    value: T,
    read_at: Instant,
    /// [`ScopeCache::generation`] when the read began.
    generation: u64,
}

/// The cached scopes of devices (their structure) and users.
#[derive(Debug)]
pub struct ScopeCache {
    devices: BoundedMap<String, Entry<Option<String>>>,
    users: BoundedMap<String, Entry<UserScope>>,
    /// Bumped by every pairing change made through this node: entries read before it are
    /// not used again.
    generation: AtomicU64,
    fresh: Duration,
    stale_if_error: Duration,
    metrics: Metrics,
}

impl ScopeCache {
    /// An empty cache sized and timed by `config`.
    pub fn new(config: &CredentialConfig, metrics: Metrics) -> Self {
        ScopeCache {
            devices: BoundedMap::new(config.table_capacity),
            users: BoundedMap::new(config.table_capacity),
            generation: AtomicU64::new(0),
            fresh: config.scope_ttl,
            stale_if_error: config.stale_if_error,
            metrics,
        }
    }

    /// Lets go of the scopes no lookup would use any more (older than `fresh` and
    /// `stale_if_error`, or read before a pairing change); returns how many.
    pub fn forget_idle(&self, now: Instant) -> usize {
        let kept_for = self.fresh.max(self.stale_if_error);
        let generation = self.generation();
        let idle = |read_at: Instant, read_in: u64| {
            read_in != generation || now.saturating_duration_since(read_at) >= kept_for
        };
        self.devices.forget_idle(|e| idle(e.read_at, e.generation))
            + self.users.forget_idle(|e| idle(e.read_at, e.generation))
    }

    /// Scopes cached now (devices, users).
    pub fn len(&self) -> (usize, usize) {
        (self.devices.len(), self.users.len())
    }

    /// A pairing changed through this node: forget every cached scope.
    pub fn pairing_changed(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    /// How many pairing changes this node has seen: a principal checked at one value
    /// may have lost access once it moved.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// The structure device `serial` was paired into; `bypass` reads the store even if
    /// a fresh entry is cached.
    pub async fn device<F>(
        &self,
        serial: &str,
        bypass: bool,
        read: impl FnOnce() -> F,
    ) -> Result<Option<String>, StoreError>
    where
        F: Future<Output = Result<Option<String>, StoreError>>,
    {
        self.lookup(&self.devices, serial, bypass, read).await
    }

    /// User `user_id`'s devices and structures; `bypass` as for [`Self::device`].
    pub async fn user<F>(
        &self,
        user_id: &str,
        bypass: bool,
        read: impl FnOnce() -> F,
    ) -> Result<UserScope, StoreError>
    where
        F: Future<Output = Result<UserScope, StoreError>>,
    {
        self.lookup(&self.users, user_id, bypass, read).await
    }

    async fn lookup<T: Clone, F>(
        &self,
        map: &BoundedMap<String, Entry<T>>,
        key: &str,
        bypass: bool,
        read: impl FnOnce() -> F,
    ) -> Result<T, StoreError>
    where
        F: Future<Output = Result<T, StoreError>>,
    {
        let generation = self.generation.load(Ordering::Acquire);
        let cached = map
            .get(&key.to_string())
            .filter(|e| e.generation == generation);
        if let Some(e) = &cached {
            if !bypass && e.read_at.elapsed() < self.fresh {
                return Ok(e.value.clone());
            }
        }
        match read().await {
            Ok(value) => {
                map.put(
                    key.to_string(),
                    Entry {
                        value: value.clone(),
                        read_at: Instant::now(),
                        generation,
                    },
                );
                Ok(value)
            }
            Err(e) if e.is_unanswered() => match cached {
                Some(c) if c.read_at.elapsed() < self.stale_if_error => {
                    self.metrics.auth_stale("scope");
                    Ok(c.value)
                }
                _ => Err(e),
            },
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache(fresh: Duration) -> ScopeCache {
        let config = CredentialConfig {
            scope_ttl: fresh,
            ..CredentialConfig::default()
        };
        ScopeCache::new(&config, Metrics::new())
    }

    fn unreachable() -> StoreError {
        StoreError::Unreachable("cut off".into())
    }

    #[tokio::test]
    async fn a_fresh_entry_spares_the_store_and_a_bypass_reads_it() {
        let c = cache(Duration::from_secs(60));
        let first = c.device("01AA", false, || async { Ok(Some("home".into())) });
        assert_eq!(first.await.ok(), Some(Some("home".to_string())));
        // Fresh: the store is not asked (an error here would surface).
        let cached = c.device("01AA", false, || async { Err(StoreError::Closed) });
        assert_eq!(cached.await.ok(), Some(Some("home".to_string())));
        // A bypass asks, and what it reads replaces the entry.
        let fresh = c.device("01AA", true, || async { Ok(None) });
        assert_eq!(fresh.await.ok(), Some(None));
        let after = c.device("01AA", false, || async { Err(StoreError::Closed) });
        assert_eq!(after.await.ok(), Some(None));
    }

    #[tokio::test]
    async fn an_unanswered_store_is_covered_by_a_stale_entry_and_nothing_else() {
        let c = cache(Duration::ZERO);
        // Nothing cached: the store's failure is the answer.
        let none = c.device("01AA", false, || async { Err(unreachable()) });
        assert!(matches!(none.await, Err(StoreError::Unreachable(_))));
        let read = c.device("01AA", false, || async { Ok(Some("home".into())) });
        assert_eq!(read.await.ok(), Some(Some("home".to_string())));
        // Past its freshness, an entry answers only when the store does not.
        let stale = c.device("01AA", false, || async { Err(unreachable()) });
        assert_eq!(stale.await.ok(), Some(Some("home".to_string())));
        // A store that answers with an error of its own (bad data) is not covered up.
        let corrupt = c.device("01AA", false, || async {
            Err(StoreError::Corrupt("bad row".into()))
        });
        assert!(matches!(corrupt.await, Err(StoreError::Corrupt(_))));
    }

    #[tokio::test]
    async fn a_pairing_change_through_this_node_forgets_every_scope() {
        let c = cache(Duration::from_secs(60));
        let scope = UserScope {
            devices: ["01AA".to_string()].into(),
            structures: BTreeSet::new(),
        };
        let read = c.user("u1", false, || async { Ok(scope.clone()) });
        assert_eq!(read.await.ok(), Some(scope.clone()));
        c.pairing_changed();
        // Forgotten: neither fresh nor kept for a store outage.
        let after = c.user("u1", false, || async { Err(unreachable()) });
        assert!(matches!(after.await, Err(StoreError::Unreachable(_))));
    }

    #[tokio::test]
    async fn scopes_no_lookup_would_use_are_forgotten() {
        let c = cache(Duration::from_secs(1));
        let t0 = Instant::now();
        for serial in ["01AA", "01AB"] {
            let read = c.device(serial, false, || async { Ok(Some("home".into())) });
            assert!(read.await.is_ok());
        }
        let user = c.user("u1", false, || async { Ok(UserScope::default()) });
        assert!(user.await.is_ok());
        assert_eq!(c.forget_idle(t0), 0);
        // Past freshness, but within `stale_if_error`: kept for a store outage.
        assert_eq!(c.forget_idle(t0 + Duration::from_secs(2)), 0);
        let stale = c.device("01AA", false, || async { Err(unreachable()) });
        assert_eq!(stale.await.ok(), Some(Some("home".to_string())));
        assert_eq!(
            c.forget_idle(t0 + c.stale_if_error + Duration::from_secs(1)),
            3
        );
        assert_eq!(c.len(), (0, 0));
        // Read before a pairing change: of no use at any age.
        let read = c.device("01AC", false, || async { Ok(None) });
        assert!(read.await.is_ok());
        c.pairing_changed();
        assert_eq!(c.forget_idle(Instant::now()), 1);
    }
}
