//! Every store call has a deadline (`--store-timeout-ms`): a store that is connected but
//! never answers (a clogged link, a stopped server) fails the call with 503 +
//! `Retry-After` instead of holding the request until the link recovers.
//!
//! A call that writes nothing fails with [`StoreError::TimedOut`]; a write with
//! [`StoreError::FateUnknown`], since it may still commit at the store. Whoever keeps
//! the store's state in memory reloads it after such an answer before writing again
//! (the set actor stops, and the next request activates one that takes a new lease and
//! loads; the new lease fences the write if it lands late — ARCHITECTURE.md invariant 25).
//!
//! Once a call passed its deadline, the store is taken for unreachable (a circuit
//! breaker): one call at a time goes to it as a probe, no sooner than [`PROBE_PAUSE`]
//! after the last probe ended, and every other call fails at once with
//! [`StoreError::Unreachable`] (nothing sent, so nothing of unknown fate), until any
//! answer comes back. Without it, every request behind a store cut from the node waits
//! out the whole deadline, and a load balancer that resends 503s multiplies that wait;
//! without the pause, requests sent one after another would each become the next probe
//! (a subscribe cancelled at its 2 s timeout, resent, cancelled again…).

use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use tether_proto::{Bucket, BucketId, SetKey};

use super::{
    AssignedRecord, Commit, DeviceRecord, Epoch, HistoryPage, Lease, NewDevice, Pairing,
    PairingCode, Store, StoreError, UserRecord,
};

/// The deadline of a store call unless configured (`--store-timeout-ms`).
pub const DEFAULT_DEADLINE: Duration = Duration::from_millis(3000);

/// While the store is taken for unreachable, the least time between the end of one probe
/// and the start of the next (the node reads PostgreSQL's clock every second besides).
pub const PROBE_PAUSE: Duration = Duration::from_millis(1000);

/// A store whose every call answers within `deadline`, and at once while the store is
/// unreachable.
#[derive(Debug)]
pub struct DeadlineStore {
    inner: Arc<dyn Store>,
    deadline: Duration,
    breaker: Breaker,
}

/// Whether the last call passed its deadline, and whether a probe is out.
#[derive(Debug, Default)]
struct Breaker {
    state: Mutex<BreakerState>,
}

#[derive(Debug, Default, Clone, Copy)]
struct BreakerState {
    open: bool,
    probing: bool,
    /// No probe starts before this (while open).
    next_probe: Option<tokio::time::Instant>,
}

/// A call let through: a probe clears the probing mark however it ends (also when the
/// caller gives up on it).
struct Admitted<'a> {
    breaker: &'a Breaker,
    probe: bool,
}

impl Drop for Admitted<'_> {
    fn drop(&mut self) {
        if self.probe {
            self.breaker.with(|s| {
                s.probing = false;
                s.next_probe = Some(tokio::time::Instant::now() + PROBE_PAUSE);
            });
        }
    }
}

impl Breaker {
    fn with<T>(&self, f: impl FnOnce(&mut BreakerState) -> T) -> T {
        f(&mut self.state.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Lets a call through (as the probe while open), or `None`: fail at once.
    fn admit(&self) -> Option<Admitted<'_>> {
        let probe = self.with(|s| {
            if !s.open {
                return Some(false);
            }
            let paused = s
                .next_probe
                .is_some_and(|at| tokio::time::Instant::now() < at);
            if s.probing || paused {
                return None;
            }
            s.probing = true;
            Some(true)
        })?;
        Some(Admitted {
            breaker: self,
            probe,
        })
    }

    /// The store answered (success or an error of its own): it is reachable.
    fn answered(&self) {
        if self.with(|s| std::mem::replace(&mut s.open, false)) {
            tracing::info!("the store answers again: store calls go through");
        }
    }

    /// A call passed its deadline.
    fn silent(&self, deadline: Duration) {
        let was_open = self.with(|s| {
            s.next_probe = Some(tokio::time::Instant::now() + PROBE_PAUSE);
            std::mem::replace(&mut s.open, true)
        });
        if !was_open {
            tracing::warn!(
                deadline_ms = deadline.as_millis() as u64,
                pause_ms = PROBE_PAUSE.as_millis() as u64,
                "a store call passed its deadline: failing store calls at once, one probe at \
                 a time (a pause between probes), until the store answers"
            );
        }
    }
}

impl DeadlineStore {
    /// Bounds every call of `inner` by `deadline`.
    pub fn new(inner: Arc<dyn Store>, deadline: Duration) -> Self {
        DeadlineStore {
            inner,
            deadline,
            breaker: Breaker::default(),
        }
    }

    /// A call within the deadline; past it, `late` names the failure.
    async fn call<T>(
        &self,
        what: &str,
        call: impl Future<Output = Result<T, StoreError>>,
        late: fn(String) -> StoreError,
    ) -> Result<T, StoreError> {
        let Some(_admitted) = self.breaker.admit() else {
            return Err(StoreError::Unreachable(format!(
                "{what}: not sent, the store has not answered since a call passed its \
                 {} ms deadline",
                self.deadline.as_millis()
            )));
        };
        match tokio::time::timeout(self.deadline, call).await {
            Ok(answer) => {
                self.breaker.answered();
                answer
            }
            Err(_) => {
                self.breaker.silent(self.deadline);
                Err(late(format!(
                    "{what}: no answer from the store within {} ms",
                    self.deadline.as_millis()
                )))
            }
        }
    }

    /// A call that writes nothing.
    async fn read<T>(
        &self,
        what: &str,
        call: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        self.call(what, call, StoreError::TimedOut).await
    }

    /// A call that may write: past the deadline its fate is unknown.
    async fn write<T>(
        &self,
        what: &str,
        call: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        self.call(what, call, |m| {
            StoreError::FateUnknown(format!("{m}; it may or may not have been written"))
        })
        .await
    }
}

#[async_trait]
impl Store for DeadlineStore {
    /// Blob calls carry their own deadline (`blobs::Blobs`).
    fn blob_kv(&self) -> Option<Arc<dyn super::blobs::BlobKv>> {
        self.inner.blob_kv()
    }

    async fn load_set(&self, set: &SetKey) -> Result<Vec<Bucket>, StoreError> {
        self.read("loading a set", self.inner.load_set(set)).await
    }

    async fn acquire_lease(&self, set: &SetKey, owner: &str) -> Result<Lease, StoreError> {
        self.write("taking a lease", self.inner.acquire_lease(set, owner))
            .await
    }

    async fn lease_epoch(&self, set: &SetKey) -> Result<Option<Epoch>, StoreError> {
        self.read("confirming a lease", self.inner.lease_epoch(set))
            .await
    }

    async fn clock_ms(&self) -> Result<Option<u64>, StoreError> {
        self.read("reading the store's clock", self.inner.clock_ms())
            .await
    }

    async fn commit(&self, set: &SetKey, epoch: Epoch, commit: Commit) -> Result<(), StoreError> {
        self.write("commit", self.inner.commit(set, epoch, commit))
            .await
    }

    async fn history(
        &self,
        id: &BucketId,
        since_version: u64,
        limit: usize,
    ) -> Result<Option<HistoryPage>, StoreError> {
        self.read("history", self.inner.history(id, since_version, limit))
            .await
    }

    async fn get_device(&self, device_id: &str) -> Result<Option<DeviceRecord>, StoreError> {
        self.read("device record", self.inner.get_device(device_id))
            .await
    }

    async fn put_device(&self, record: DeviceRecord) -> Result<(), StoreError> {
        self.write("device record", self.inner.put_device(record))
            .await
    }

    async fn get_assigned(&self, serial: &str) -> Result<Option<AssignedRecord>, StoreError> {
        self.read("credentials", self.inner.get_assigned(serial))
            .await
    }

    async fn swap_assigned(
        &self,
        serial: &str,
        expected: Option<[u8; 32]>,
        new: Option<AssignedRecord>,
    ) -> Result<bool, StoreError> {
        self.write(
            "credentials",
            self.inner.swap_assigned(serial, expected, new),
        )
        .await
    }

    async fn register_new(&self, devices: Vec<NewDevice>) -> Result<Vec<bool>, StoreError> {
        self.write("registration", self.inner.register_new(devices))
            .await
    }

    async fn get_user(&self, user_id: &str) -> Result<Option<UserRecord>, StoreError> {
        self.read("user", self.inner.get_user(user_id)).await
    }

    async fn create_user(&self, user: UserRecord) -> Result<bool, StoreError> {
        self.write("user", self.inner.create_user(user)).await
    }

    async fn get_pairing(&self, device_id: &str) -> Result<Option<Pairing>, StoreError> {
        self.read("pairing", self.inner.get_pairing(device_id))
            .await
    }

    async fn set_pairing(
        &self,
        device_id: &str,
        pairing: Option<Pairing>,
    ) -> Result<Option<Pairing>, StoreError> {
        self.write("pairing", self.inner.set_pairing(device_id, pairing))
            .await
    }

    async fn user_pairings(&self, user_id: &str) -> Result<Vec<Pairing>, StoreError> {
        self.read("pairings", self.inner.user_pairings(user_id))
            .await
    }

    async fn structure_owner(&self, structure: &str) -> Result<Option<String>, StoreError> {
        self.read("structure", self.inner.structure_owner(structure))
            .await
    }

    async fn claim_structure(&self, structure: &str, user_id: &str) -> Result<String, StoreError> {
        self.write("structure", self.inner.claim_structure(structure, user_id))
            .await
    }

    async fn user_structures(&self, user_id: &str) -> Result<Vec<String>, StoreError> {
        self.read("structures", self.inner.user_structures(user_id))
            .await
    }

    async fn put_pairing_code(&self, code: PairingCode) -> Result<(), StoreError> {
        self.write("pairing code", self.inner.put_pairing_code(code))
            .await
    }

    async fn take_pairing_code(&self, code: &str) -> Result<Option<PairingCode>, StoreError> {
        self.write("pairing code", self.inner.take_pairing_code(code))
            .await
    }

    async fn close(&self) -> Result<(), StoreError> {
        // Bounded by the store itself (the batch writer drains for at most 10 s).
        self.inner.close().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A store whose calls never answer; once `answers` is set, `load_set` and
    /// `lease_epoch` called from then on do.
    #[derive(Debug, Default)]
    struct Silent {
        answers: std::sync::atomic::AtomicBool,
    }

    impl Silent {
        async fn answer<T>(&self, value: T) -> Result<T, StoreError> {
            if self.answers.load(std::sync::atomic::Ordering::SeqCst) {
                Ok(value)
            } else {
                std::future::pending().await
            }
        }
    }

    #[async_trait]
    impl Store for Silent {
        fn blob_kv(&self) -> Option<Arc<dyn crate::store::blobs::BlobKv>> {
            None
        }
        async fn load_set(&self, _: &SetKey) -> Result<Vec<Bucket>, StoreError> {
            self.answer(Vec::new()).await
        }
        async fn acquire_lease(&self, _: &SetKey, _: &str) -> Result<Lease, StoreError> {
            std::future::pending().await
        }
        async fn lease_epoch(&self, _: &SetKey) -> Result<Option<Epoch>, StoreError> {
            self.answer(Some(Epoch(1))).await
        }
        async fn commit(&self, _: &SetKey, _: Epoch, _: Commit) -> Result<(), StoreError> {
            std::future::pending().await
        }
        async fn history(
            &self,
            _: &BucketId,
            _: u64,
            _: usize,
        ) -> Result<Option<HistoryPage>, StoreError> {
            std::future::pending().await
        }
        async fn get_device(&self, _: &str) -> Result<Option<DeviceRecord>, StoreError> {
            std::future::pending().await
        }
        async fn put_device(&self, _: DeviceRecord) -> Result<(), StoreError> {
            std::future::pending().await
        }
        async fn get_assigned(&self, _: &str) -> Result<Option<AssignedRecord>, StoreError> {
            std::future::pending().await
        }
        async fn swap_assigned(
            &self,
            _: &str,
            _: Option<[u8; 32]>,
            _: Option<AssignedRecord>,
        ) -> Result<bool, StoreError> {
            std::future::pending().await
        }
        async fn register_new(&self, _: Vec<NewDevice>) -> Result<Vec<bool>, StoreError> {
            std::future::pending().await
        }
        async fn get_user(&self, _: &str) -> Result<Option<UserRecord>, StoreError> {
            std::future::pending().await
        }
        async fn create_user(&self, _: UserRecord) -> Result<bool, StoreError> {
            std::future::pending().await
        }
        async fn get_pairing(&self, _: &str) -> Result<Option<Pairing>, StoreError> {
            std::future::pending().await
        }
        async fn set_pairing(
            &self,
            _: &str,
            _: Option<Pairing>,
        ) -> Result<Option<Pairing>, StoreError> {
            std::future::pending().await
        }
        async fn user_pairings(&self, _: &str) -> Result<Vec<Pairing>, StoreError> {
            std::future::pending().await
        }
        async fn structure_owner(&self, _: &str) -> Result<Option<String>, StoreError> {
            std::future::pending().await
        }
        async fn claim_structure(&self, _: &str, _: &str) -> Result<String, StoreError> {
            std::future::pending().await
        }
        async fn user_structures(&self, _: &str) -> Result<Vec<String>, StoreError> {
            std::future::pending().await
        }
        async fn put_pairing_code(&self, _: PairingCode) -> Result<(), StoreError> {
            std::future::pending().await
        }
        async fn take_pairing_code(&self, _: &str) -> Result<Option<PairingCode>, StoreError> {
            std::future::pending().await
        }
        async fn close(&self) -> Result<(), StoreError> {
            Ok(())
        }
    }

    #[tokio::test]
    async fn a_silent_store_times_reads_out_and_leaves_writes_of_unknown_fate() {
        // A store each: after one call passed its deadline, the next would be refused
        // unsent (the breaker, tested below) instead of sent and timed out.
        let store = || DeadlineStore::new(Arc::new(Silent::default()), Duration::from_millis(50));
        let set = SetKey::parse("01AA02AB").expect("set key");
        assert!(matches!(
            store().load_set(&set).await,
            Err(StoreError::TimedOut(_))
        ));
        assert!(matches!(
            store().get_assigned("01AA02AB").await,
            Err(StoreError::TimedOut(_))
        ));
        let committed = store().commit(&set, Epoch(1), Commit::default()).await;
        assert!(
            matches!(&committed, Err(e @ StoreError::FateUnknown(_)) if e.may_have_written()),
            "{committed:?}"
        );
    }

    /// The circuit breaker: after a call passed its deadline, a call made while another
    /// one probes the store fails at once without being sent (not of unknown fate);
    /// the first answer lets every call through again.
    #[tokio::test(start_paused = true)]
    async fn after_a_deadline_passes_calls_fail_at_once_while_one_probes_until_the_store_answers() {
        let silent = Arc::new(Silent::default());
        let store = Arc::new(DeadlineStore::new(silent.clone(), Duration::from_secs(3)));
        let set = SetKey::parse("01AA02AB").expect("set key");
        assert!(matches!(
            store.load_set(&set).await,
            Err(StoreError::TimedOut(_))
        ));
        // Right after, no probe yet: refused unsent.
        let paused = store.lease_epoch(&set).await;
        assert!(
            matches!(paused, Err(StoreError::Unreachable(_))),
            "{paused:?}"
        );
        tokio::time::sleep(PROBE_PAUSE).await;

        // The next call probes (and waits out its deadline); the ones behind it fail at
        // once — a `Silent` call sent to the store would wait, never answer Unreachable.
        let probe = tokio::spawn({
            let (store, set) = (store.clone(), set.clone());
            async move { store.lease_epoch(&set).await }
        });
        tokio::task::yield_now().await;
        let read = store.load_set(&set).await;
        assert!(matches!(read, Err(StoreError::Unreachable(_))), "{read:?}");
        let commit = store.commit(&set, Epoch(1), Commit::default()).await;
        assert!(
            matches!(&commit, Err(e @ StoreError::Unreachable(_)) if !e.may_have_written()),
            "a commit refused unsent is not of unknown fate: {commit:?}"
        );
        let probed = probe.await.expect("probe task");
        assert!(matches!(probed, Err(StoreError::TimedOut(_))), "{probed:?}");

        // The store answers again: calls within the pause after that probe are still
        // refused (a request resent at once is not the next probe), the next probe gets
        // through, and calls behind it are sent as before.
        silent
            .answers
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let resent = store.lease_epoch(&set).await;
        assert!(
            matches!(resent, Err(StoreError::Unreachable(_))),
            "{resent:?}"
        );
        tokio::time::sleep(PROBE_PAUSE).await;
        assert_eq!(store.lease_epoch(&set).await.ok(), Some(Some(Epoch(1))));
        let (a, b) = tokio::join!(store.load_set(&set), store.lease_epoch(&set));
        assert!(a.is_ok() && b.is_ok(), "{a:?} {b:?}");
    }

    /// A probe whose caller gave up (its request was cancelled) leaves the next call after
    /// the pause to probe: the breaker never stays shut for want of a probe.
    #[tokio::test(start_paused = true)]
    async fn a_cancelled_probe_lets_the_next_call_probe() {
        let silent = Arc::new(Silent::default());
        let store = DeadlineStore::new(silent.clone(), Duration::from_secs(3));
        let set = SetKey::parse("01AA02AB").expect("set key");
        assert!(store.load_set(&set).await.is_err());
        tokio::time::sleep(PROBE_PAUSE).await;
        let cancelled =
            tokio::time::timeout(Duration::from_millis(10), store.lease_epoch(&set)).await;
        assert!(cancelled.is_err(), "the probe was still waiting");
        tokio::time::sleep(PROBE_PAUSE).await;
        silent
            .answers
            .store(true, std::sync::atomic::Ordering::SeqCst);
        assert_eq!(store.lease_epoch(&set).await.ok(), Some(Some(Epoch(1))));
    }
}
