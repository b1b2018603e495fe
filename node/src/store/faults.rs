//! Test-only fault injection around any store (hidden flag `--test-store-faults DIR`):
//! black-box tests make commits slow or failing on purpose, by files in `DIR`, to check
//! what a client sees while a commit is in flight or after it failed. Never used in
//! production; without the flag the node runs on its store directly.
//!
//! Files the test writes (checked at every commit):
//! - `hold-commit`: a commit waits, before reaching the store, until the file is removed;
//!   while one waits, the store creates `commit-held`.
//! - `hold-after-commit`: a commit reaches the store, then waits until the file is removed
//!   before answering (its fate is unknown to the caller meanwhile); the store creates
//!   `commit-done-held` while one waits.
//! - `fail-commit`: a commit fails (a backend error, nothing written).
//! - `fail-lease`: taking a lease fails as a store cut from the node does (unreachable,
//!   nothing written); each refusal adds a line to `lease-refused`.
//! - `fail-load`: loading a set fails (unreachable) — after its lease was taken, when an
//!   activation loads.
//! - `lose-lease-answer`: a lease is taken, then its answer is lost (`FateUnknown`).
//! - `lose-lease-answer`: a lease is taken, then its answer is lost (`FateUnknown`).
//!
//! Or seeded ([`FaultyStore::seeded`], for simulation and property tests, issue 20): every
//! store call draws from one generator seeded by a [`FaultPlan`] — a latency, a commit or
//! first-contact registration failing before it reaches the store, a commit that reaches
//! the store but whose answer is lost ([`StoreError::FateUnknown`]), a lease that cannot
//! be taken, a slow load — so the same seed and the same order of calls inject the same
//! faults ([`FaultyStore::injected`] lists them).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use async_trait::async_trait;
use tether_proto::{Bucket, BucketId, SetKey};

use super::{
    AssignedRecord, Commit, DeviceRecord, Epoch, HistoryPage, Lease, NewDevice, Pairing,
    PairingCode, Store, StoreError, UserRecord,
};

/// How often a held commit looks at its control file.
const POLL: Duration = Duration::from_millis(10);

/// Seeded faults: how often each kind strikes (probabilities per call) and how slow calls
/// are.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FaultPlan {
    /// Seeds the generator every decision is drawn from.
    pub seed: u64,
    /// A commit or a first-contact registration fails before it reaches the store.
    pub fail_before: f64,
    /// A commit reaches the store, then its answer is lost.
    pub lost_reply: f64,
    /// Taking a lease fails (the store unreachable).
    pub lease_failure: f64,
    /// Every call waits up to this long first (uniformly drawn).
    pub max_latency: Duration,
    /// Loading a set waits up to this long more.
    pub slow_load: Duration,
    /// A call stalls (the store hangs) …
    pub hang: f64,
    /// … for this long before it goes on (past the node's store deadline, the node has
    /// given up on it by then; what it does still happens).
    pub hang_for: Duration,
}

/// A fault a seeded plan injected, in call order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Injected {
    /// A call waited this many microseconds.
    Delay(u64),
    /// A commit or registration failed before reaching the store.
    FailBefore,
    /// A commit was written and its answer lost.
    LostReply,
    /// A lease was refused.
    LeaseFailure,
    /// A call stalled for the plan's `hang_for`.
    Hang,
}

/// A change a commit wrote to the store: its bucket, version and op id.
pub type Written = (BucketId, u64, Option<String>);

#[derive(Debug)]
struct Seeded {
    plan: FaultPlan,
    rng: Mutex<StdRng>,
    log: Mutex<Vec<Injected>>,
    /// Every change the store took, in commit order (answered or not).
    written: Mutex<Vec<Written>>,
}

impl Seeded {
    fn chance(&self, p: f64) -> bool {
        p > 0.0
            && self
                .rng
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .random_bool(p.min(1.0))
    }

    fn record(&self, what: Injected) {
        self.log
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(what);
    }

    /// Waits a drawn latency (up to `max`), recorded when not zero.
    async fn delay(&self, max: Duration) {
        let max_us = u64::try_from(max.as_micros()).unwrap_or(u64::MAX);
        if max_us == 0 {
            return;
        }
        let us = self
            .rng
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .random_range(0..=max_us);
        if us > 0 {
            self.record(Injected::Delay(us));
            tokio::time::sleep(Duration::from_micros(us)).await;
        }
    }
}

/// A store whose calls obey the control files in a directory, or a seeded plan.
#[derive(Debug)]
pub struct FaultyStore {
    inner: Arc<dyn Store>,
    dir: Option<PathBuf>,
    seeded: Option<Seeded>,
}

impl FaultyStore {
    /// Wraps `inner`, controlled by the files in `dir`.
    pub fn new(inner: Arc<dyn Store>, dir: &Path) -> Self {
        FaultyStore {
            inner,
            dir: Some(dir.to_path_buf()),
            seeded: None,
        }
    }

    /// Wraps `inner` with faults drawn from `plan`'s seed.
    pub fn seeded(inner: Arc<dyn Store>, plan: FaultPlan) -> Self {
        FaultyStore {
            inner,
            dir: None,
            seeded: Some(Seeded {
                plan,
                rng: Mutex::new(StdRng::seed_from_u64(plan.seed)),
                log: Mutex::new(Vec::new()),
                written: Mutex::new(Vec::new()),
            }),
        }
    }

    /// The faults the seeded plan injected so far, in call order.
    pub fn injected(&self) -> Vec<Injected> {
        self.seeded.as_ref().map_or_else(Vec::new, |s| {
            s.log.lock().unwrap_or_else(PoisonError::into_inner).clone()
        })
    }

    /// Every change the store took under the seeded plan, in commit order — those whose
    /// answer was lost included, so a checker sees a version written twice (a fork) even
    /// when a later commit overwrote the first.
    pub fn written(&self) -> Vec<Written> {
        self.seeded.as_ref().map_or_else(Vec::new, |s| {
            s.written
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone()
        })
    }

    /// Whether control file `name` exists.
    fn control(&self, name: &str) -> bool {
        self.dir.as_ref().is_some_and(|d| d.join(name).exists())
    }

    /// The seeded plan's latency for any call.
    async fn latency(&self) {
        if let Some(s) = &self.seeded {
            s.delay(s.plan.max_latency).await;
            if s.chance(s.plan.hang) {
                s.record(Injected::Hang);
                tokio::time::sleep(s.plan.hang_for).await;
            }
        }
    }

    /// Whether the seeded plan fails this write before it reaches the store.
    fn fails_before(&self) -> bool {
        self.seeded.as_ref().is_some_and(|s| {
            let hit = s.chance(s.plan.fail_before);
            if hit {
                s.record(Injected::FailBefore);
            }
            hit
        })
    }

    async fn hold_while(&self, control: &str, marker: &str) {
        let Some(dir) = &self.dir else { return };
        let (control, marker) = (dir.join(control), dir.join(marker));
        if !control.exists() {
            return;
        }
        let _ = std::fs::write(&marker, b"");
        while control.exists() {
            tokio::time::sleep(POLL).await;
        }
        let _ = std::fs::remove_file(&marker);
    }
}

#[async_trait]
impl Store for FaultyStore {
    fn blob_kv(&self) -> Option<std::sync::Arc<dyn super::blobs::BlobKv>> {
        self.inner.blob_kv()
    }
    async fn load_set(&self, set: &SetKey) -> Result<Vec<Bucket>, StoreError> {
        self.latency().await;
        if let Some(s) = &self.seeded {
            s.delay(s.plan.slow_load).await;
        }
        if self.control("fail-load") {
            return Err(StoreError::Unreachable(
                "injected load failure (--test-store-faults)".into(),
            ));
        }
        self.inner.load_set(set).await
    }
    async fn acquire_lease(&self, set: &SetKey, owner: &str) -> Result<Lease, StoreError> {
        self.latency().await;
        if let Some(dir) = self.dir.as_ref().filter(|_| self.control("fail-lease")) {
            use std::io::Write;
            let counted = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(dir.join("lease-refused"))
                .and_then(|mut f| f.write_all(b"refused\n"));
            if let Err(e) = counted {
                tracing::warn!(error = %e, "counting an injected lease failure");
            }
            return Err(StoreError::Unreachable(
                "injected lease failure (--test-store-faults)".into(),
            ));
        }
        if let Some(s) = &self.seeded {
            if s.chance(s.plan.lease_failure) {
                s.record(Injected::LeaseFailure);
                return Err(StoreError::Unreachable(
                    "injected lease failure (seeded)".into(),
                ));
            }
        }
        let lease = self.inner.acquire_lease(set, owner).await?;
        if self.control("lose-lease-answer") {
            return Err(StoreError::FateUnknown(
                "injected lost answer after the lease was taken (--test-store-faults)".into(),
            ));
        }
        Ok(lease)
    }
    async fn lease_epoch(&self, set: &SetKey) -> Result<Option<Epoch>, StoreError> {
        self.inner.lease_epoch(set).await
    }
    async fn clock_ms(&self) -> Result<Option<u64>, StoreError> {
        self.inner.clock_ms().await
    }
    async fn commit(&self, set: &SetKey, epoch: Epoch, writes: Commit) -> Result<(), StoreError> {
        self.latency().await;
        self.hold_while("hold-commit", "commit-held").await;
        if self.control("fail-commit") {
            return Err(StoreError::Backend(
                "injected store failure (--test-store-faults)".into(),
            ));
        }
        if self.fails_before() {
            return Err(StoreError::Unreachable(
                "injected store failure before the commit (seeded)".into(),
            ));
        }
        let changes: Vec<Written> = writes
            .changes
            .iter()
            .map(|(id, c)| (id.clone(), c.version, c.op_id.clone()))
            .collect();
        self.inner.commit(set, epoch, writes).await?;
        if let Some(s) = &self.seeded {
            s.written
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .extend(changes);
            if s.chance(s.plan.lost_reply) {
                s.record(Injected::LostReply);
                return Err(StoreError::FateUnknown(
                    "injected lost answer after the commit (seeded)".into(),
                ));
            }
        }
        self.hold_while("hold-after-commit", "commit-done-held")
            .await;
        Ok(())
    }
    async fn history(
        &self,
        id: &BucketId,
        since_version: u64,
        limit: usize,
    ) -> Result<Option<HistoryPage>, StoreError> {
        self.inner.history(id, since_version, limit).await
    }
    async fn get_device(&self, device_id: &str) -> Result<Option<DeviceRecord>, StoreError> {
        self.inner.get_device(device_id).await
    }
    async fn put_device(&self, record: DeviceRecord) -> Result<(), StoreError> {
        self.inner.put_device(record).await
    }
    async fn get_assigned(&self, serial: &str) -> Result<Option<AssignedRecord>, StoreError> {
        self.inner.get_assigned(serial).await
    }
    async fn swap_assigned(
        &self,
        serial: &str,
        expected: Option<[u8; 32]>,
        new: Option<AssignedRecord>,
    ) -> Result<bool, StoreError> {
        self.inner.swap_assigned(serial, expected, new).await
    }
    async fn register_new(&self, devices: Vec<NewDevice>) -> Result<Vec<bool>, StoreError> {
        self.latency().await;
        if self.control("fail-commit") {
            return Err(StoreError::Backend(
                "injected store failure (--test-store-faults)".into(),
            ));
        }
        if self.fails_before() {
            return Err(StoreError::Unreachable(
                "injected store failure before the registration (seeded)".into(),
            ));
        }
        self.inner.register_new(devices).await
    }
    async fn get_user(&self, user_id: &str) -> Result<Option<UserRecord>, StoreError> {
        self.inner.get_user(user_id).await
    }
    async fn create_user(&self, user: UserRecord) -> Result<bool, StoreError> {
        self.inner.create_user(user).await
    }
    async fn get_pairing(&self, device_id: &str) -> Result<Option<Pairing>, StoreError> {
        self.inner.get_pairing(device_id).await
    }
    async fn set_pairing(
        &self,
        device_id: &str,
        pairing: Option<Pairing>,
    ) -> Result<Option<Pairing>, StoreError> {
        self.inner.set_pairing(device_id, pairing).await
    }
    async fn user_pairings(&self, user_id: &str) -> Result<Vec<Pairing>, StoreError> {
        self.inner.user_pairings(user_id).await
    }
    async fn structure_owner(&self, structure: &str) -> Result<Option<String>, StoreError> {
        self.inner.structure_owner(structure).await
    }
    async fn claim_structure(&self, structure: &str, user_id: &str) -> Result<String, StoreError> {
        self.inner.claim_structure(structure, user_id).await
    }
    async fn user_structures(&self, user_id: &str) -> Result<Vec<String>, StoreError> {
        self.inner.user_structures(user_id).await
    }
    async fn put_pairing_code(&self, code: PairingCode) -> Result<(), StoreError> {
        self.inner.put_pairing_code(code).await
    }
    async fn take_pairing_code(&self, code: &str) -> Result<Option<PairingCode>, StoreError> {
        self.inner.take_pairing_code(code).await
    }
    async fn close(&self) -> Result<(), StoreError> {
        self.inner.close().await
    }
}
