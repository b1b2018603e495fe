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

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tether_proto::{Bucket, BucketId, SetKey};

use super::{
    AssignedRecord, Commit, DeviceRecord, Epoch, HistoryPage, Lease, NewDevice, Pairing,
    PairingCode, Store, StoreError, UserRecord,
};

/// How often a held commit looks at its control file.
const POLL: Duration = Duration::from_millis(10);

/// A store whose commits obey the control files in a directory.
#[derive(Debug)]
pub struct FaultyStore {
    inner: Arc<dyn Store>,
    dir: PathBuf,
}

impl FaultyStore {
    /// Wraps `inner`, controlled by the files in `dir`.
    pub fn new(inner: Arc<dyn Store>, dir: &Path) -> Self {
        FaultyStore {
            inner,
            dir: dir.to_path_buf(),
        }
    }

    async fn hold_while(&self, control: &str, marker: &str) {
        let (control, marker) = (self.dir.join(control), self.dir.join(marker));
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
        self.inner.load_set(set).await
    }
    async fn acquire_lease(&self, set: &SetKey, owner: &str) -> Result<Lease, StoreError> {
        if self.dir.join("fail-lease").exists() {
            use std::io::Write;
            let counted = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(self.dir.join("lease-refused"))
                .and_then(|mut f| f.write_all(b"refused\n"));
            if let Err(e) = counted {
                tracing::warn!(error = %e, "counting an injected lease failure");
            }
            return Err(StoreError::Unreachable(
                "injected lease failure (--test-store-faults)".into(),
            ));
        }
        self.inner.acquire_lease(set, owner).await
    }
    async fn lease_epoch(&self, set: &SetKey) -> Result<Option<Epoch>, StoreError> {
        self.inner.lease_epoch(set).await
    }
    async fn clock_ms(&self) -> Result<Option<u64>, StoreError> {
        self.inner.clock_ms().await
    }
    async fn commit(&self, set: &SetKey, epoch: Epoch, writes: Commit) -> Result<(), StoreError> {
        self.hold_while("hold-commit", "commit-held").await;
        if self.dir.join("fail-commit").exists() {
            return Err(StoreError::Backend(
                "injected store failure (--test-store-faults)".into(),
            ));
        }
        self.inner.commit(set, epoch, writes).await?;
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
        if self.dir.join("fail-commit").exists() {
            return Err(StoreError::Backend(
                "injected store failure (--test-store-faults)".into(),
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
