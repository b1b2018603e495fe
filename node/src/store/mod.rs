//! The domain-level store: what a node needs from durable storage, and nothing more.
//!
//! Backends: [`redb::RedbStore`] (embedded, single node). Shared backends (PostgreSQL,
//! FoundationDB) implement the same trait for the cluster and must pass the same
//! conformance tests (`store::conformance`).

pub mod redb;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tether_proto::{Bucket, SetKey};

/// A lease epoch: every commit names one and fails unless it is still the set's current
/// epoch, so a stale owner can never write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Epoch(pub u64);

/// What the registration server remembers about a device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceRecord {
    /// The device's serial; also its bucket set key.
    pub device_id: String,
    /// The template its buckets were created from.
    pub device_type: String,
    /// Firmware version at its last registration.
    pub sw_version: String,
    /// First registration (ms since epoch).
    pub first_seen_ms: u64,
    /// Latest registration (ms since epoch).
    pub last_seen_ms: u64,
}

/// Store failures. Nothing is acknowledged when one occurs.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The commit named an epoch that is no longer the set's lease: another owner took it.
    #[error("lease for set {set} moved on: commit with epoch {epoch} refused")]
    Fenced {
        /// The set.
        set: String,
        /// The stale epoch.
        epoch: u64,
    },
    /// The backend failed (I/O, transaction, connection).
    #[error("{0}")]
    Backend(String),
    /// Stored bytes did not decode.
    #[error("corrupt record: {0}")]
    Corrupt(String),
    /// The store has shut down.
    #[error("store is closed")]
    Closed,
}

/// Durable state of a node.
#[async_trait]
pub trait Store: Send + Sync + std::fmt::Debug + 'static {
    /// Every bucket of a set, as last committed.
    async fn load_set(&self, set: &SetKey) -> Result<Vec<Bucket>, StoreError>;
    /// Takes the set's lease for `owner`, returning a new epoch greater than any before.
    async fn acquire_lease(&self, set: &SetKey, owner: &str) -> Result<Epoch, StoreError>;
    /// Writes buckets atomically, only if `epoch` is still the set's lease epoch. When it
    /// returns `Ok` the writes are durable.
    async fn commit(
        &self,
        set: &SetKey,
        epoch: Epoch,
        writes: Vec<Bucket>,
    ) -> Result<(), StoreError>;
    /// A device's registration record.
    async fn get_device(&self, device_id: &str) -> Result<Option<DeviceRecord>, StoreError>;
    /// Creates or replaces a registration record, durably.
    async fn put_device(&self, record: DeviceRecord) -> Result<(), StoreError>;
    /// Waits until everything acknowledged is on disk and stops accepting writes.
    async fn close(&self) -> Result<(), StoreError>;
}

#[cfg(test)]
pub(crate) mod conformance;
