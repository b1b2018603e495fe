//! The domain-level store: what a node needs from durable storage, and nothing more.
//!
//! Backends: [`redb::RedbStore`] (embedded, single node), [`postgres::PostgresStore`]
//! (shared, for clusters) and the FoundationDB store ([`fdb`]: its logic always, its
//! adapter to `libfdb_c` with the `fdb` feature). Every backend passes the same
//! conformance tests (`store::conformance`).

pub mod batch;
pub mod blobs;
pub mod deadline;
pub mod faults;
pub mod fdb;
pub mod pg_server;
pub mod postgres;
pub mod redb;
pub mod registrations;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tether_proto::synclog::{Change, OpRecord};
use tether_proto::{Bucket, BucketId, SetKey};

/// A lease epoch: every commit names one and fails unless it is still the set's current
/// epoch, so a stale owner can never write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Epoch(pub u64);

/// A lease just taken: its epoch, and the node that held the set's lease before (if
/// another one did), so the new owner can tell it to stop serving the set at once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// The new epoch, greater than any before.
    pub epoch: Epoch,
    /// The previous holder's node id, when it was a different node.
    pub previous_owner: Option<String>,
}

/// One atomic commit of a bucket set: the new bucket states, the change each accepted
/// write appends to its bucket's log, the op ids of the writes (with their outcomes), and
/// what falls out of retention. All of it commits together or none of it does, only under
/// the lease epoch, and only if none of `ops`' op ids is already remembered.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Commit {
    /// New states of the buckets written.
    pub buckets: Vec<Bucket>,
    /// The changes to append, each with its bucket (versions as in `buckets`).
    pub changes: Vec<(BucketId, Change)>,
    /// Op ids to remember. If the store already remembers one of them, nothing is
    /// written and the commit fails with [`StoreError::OpsKnown`].
    pub ops: Vec<OpRecord>,
    /// Retention, enforced in the same transaction.
    pub trim: Trim,
}

impl Commit {
    /// A commit of bucket states alone (nothing logged).
    pub fn of(buckets: Vec<Bucket>) -> Self {
        Commit {
            buckets,
            ..Commit::default()
        }
    }

    /// Whether there is nothing to write.
    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
            && self.changes.is_empty()
            && self.ops.is_empty()
            && self.trim.changes_through.is_empty()
            && self.trim.ops.is_none()
    }
}

/// What a commit drops because it fell out of retention.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Trim {
    /// Per bucket: drop its changes up to and including this version.
    pub changes_through: Vec<(BucketId, u64)>,
    /// The set's op-id retention to enforce.
    pub ops: Option<OpRetention>,
}

/// Op ids are kept while they are among the set's newest `keep_last`, or younger than
/// `keep_since_ms` (API.md: at least the last 1,000 writes and all of the last 24 h).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpRetention {
    /// How many of the newest op ids are always kept.
    pub keep_last: u64,
    /// Op ids handled at or after this time (ms since the epoch) are kept.
    pub keep_since_ms: u64,
}

/// A page of a bucket's history, read consistently with the bucket.
#[derive(Debug, Clone, PartialEq)]
pub struct HistoryPage {
    /// The bucket's current version.
    pub version: u64,
    /// The oldest version whose change is kept (`None`: none is, e.g. a bucket written
    /// before the log existed).
    pub oldest: Option<u64>,
    /// Changes with versions above the one asked for, ascending, at most the limit.
    pub changes: Vec<Change>,
    /// More changes follow the last one.
    pub more: bool,
}

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

/// A device's assigned credentials, as hashes (API.md: stored only as SHA-256 of the
/// secret string). During a rotation's grace period the previous set still works, and the
/// current secret is kept sealed under a key only the previous secret yields (seed 000
/// FIG 29C), so the server can resend it to a device still using the previous set without
/// ever storing it in clear.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AssignedRecord {
    /// SHA-256 of the current secret.
    #[serde(with = "hex32")]
    pub current_hash: [u8; 32],
    /// When the current set was issued (ms since epoch); drives rotation.
    pub issued_ms: u64,
    /// The set the current one replaced, while its grace period lasts.
    pub previous: Option<PreviousSet>,
}

/// The replaced credential set during a rotation's grace period.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreviousSet {
    /// SHA-256 of the previous secret.
    #[serde(with = "hex32")]
    pub hash: [u8; 32],
    /// After this (ms since epoch) the previous set is rejected.
    pub grace_until_ms: u64,
    /// The current secret, sealed with a key derived from the previous secret.
    pub sealed_current: Vec<u8>,
}

/// Everything a device's first registration writes (seed 000 FIG 28C first contact), as
/// one unit: [`Store::register_new`] writes all of it in one transaction or none of it.
#[derive(Debug, Clone, PartialEq)]
pub struct NewDevice {
    /// Its registration record (`device_id` is also its bucket set key).
    pub record: DeviceRecord,
    /// The assigned credentials issued to it.
    pub assigned: AssignedRecord,
    /// Its device type's buckets as created (version 1).
    pub buckets: Vec<Bucket>,
    /// The `created` change of each bucket, for its log.
    pub changes: Vec<(BucketId, Change)>,
}

impl NewDevice {
    /// The device's bucket set.
    pub fn set(&self) -> Result<SetKey, StoreError> {
        SetKey::parse(&self.record.device_id).map_err(|e| StoreError::Corrupt(e.to_string()))
    }
}

/// A user account (apps act as users).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserRecord {
    /// The user id (`u.<user_id>` credentials).
    pub user_id: String,
    /// SHA-256 of the user's secret.
    #[serde(with = "hex32")]
    pub secret_hash: [u8; 32],
    /// Creation time (ms since epoch).
    pub created_ms: u64,
}

/// A device linked to a user's account, optionally inside one of the user's structures.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pairing {
    /// The device's serial.
    pub device_id: String,
    /// The owning user.
    pub user_id: String,
    /// The structure the device joined, if any.
    pub structure: Option<String>,
    /// When it was paired (ms since epoch).
    pub paired_ms: u64,
}

/// A short-lived code a device shows so a user can claim it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PairingCode {
    /// The code (`7Q4K-92XD`).
    pub code: String,
    /// The device that asked for it.
    pub device_id: String,
    /// Expiry (ms since epoch).
    pub expires_ms: u64,
}

mod hex32 {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        let hex: String = v.iter().map(|b| format!("{b:02x}")).collect();
        s.serialize_str(&hex)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        let text = String::deserialize(d)?;
        let bad = || serde::de::Error::custom("expected 64 hex digits");
        if text.len() != 64 {
            return Err(bad());
        }
        let mut out = [0u8; 32];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2).ok_or_else(bad)?, 16)
                .map_err(|_| bad())?;
        }
        Ok(out)
    }
}

/// The stored form of a bucket, shared by the key-value backends (the id is the key).
#[derive(Serialize, Deserialize)]
struct StoredBucket {
    value: tether_proto::Fields,
    ts_ms: u64,
    ts_logical: u32,
    version: u64,
}

/// Encodes a bucket for a key-value backend.
pub(crate) fn encode_bucket(b: &Bucket) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(&StoredBucket {
        value: b.value.clone(),
        ts_ms: b.timestamp.millis,
        ts_logical: b.timestamp.logical,
        version: b.version,
    })
    .map_err(|e| StoreError::Corrupt(e.to_string()))
}

/// Decodes what [`encode_bucket`] wrote for bucket `id`.
pub(crate) fn decode_bucket(id: &str, bytes: &[u8]) -> Result<Bucket, StoreError> {
    let s: StoredBucket =
        serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt(format!("{id}: {e}")))?;
    Ok(Bucket {
        id: tether_proto::BucketId::parse(id).map_err(|e| StoreError::Corrupt(e.to_string()))?,
        value: s.value,
        timestamp: tether_proto::Hlc {
            millis: s.ts_ms,
            logical: s.ts_logical,
        },
        version: s.version,
    })
}

/// Encodes a change for a key-value backend.
pub(crate) fn encode_json<T: Serialize>(v: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(v).map_err(|e| StoreError::Corrupt(e.to_string()))
}

/// Decodes what [`encode_json`] wrote under `key`.
pub(crate) fn decode_json<T: serde::de::DeserializeOwned>(
    key: &str,
    bytes: &[u8],
) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt(format!("{key}: {e}")))
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
    /// The commit named op ids the set already remembers (a retried write whose first
    /// attempt committed): nothing was written. The remembered records, to answer from.
    #[error("{} op id(s) already committed", .0.len())]
    OpsKnown(Vec<OpRecord>),
    /// The store's write queue is full: the commit was refused at once, nothing written;
    /// retry after a moment (503 + `Retry-After`).
    #[error("overloaded: {0}")]
    Overloaded(String),
    /// A call that writes nothing passed its deadline (`--store-timeout-ms`) before the
    /// store answered (503 + `Retry-After`).
    #[error("timed out: {0}")]
    TimedOut(String),
    /// A write passed its deadline before the store answered: it may still commit at the
    /// store, or never. Nothing is acknowledged, and a set's actor that had this answer
    /// reloads before it commits again (ARCHITECTURE.md invariant 25).
    #[error("fate unknown: {0}")]
    FateUnknown(String),
    /// Refused without being sent: the store has not answered since a call passed its
    /// deadline, and another call is probing it (503 + `Retry-After`; nothing written).
    #[error("unreachable: {0}")]
    Unreachable(String),
}

impl StoreError {
    /// Whether the store may hold a write this error failed (its fate is unknown), so
    /// whoever keeps the store's state in memory must reload it before writing again.
    pub fn may_have_written(&self) -> bool {
        matches!(self, StoreError::FateUnknown(_) | StoreError::Backend(_))
    }

    /// Whether the store failed to answer (no answer in time, unreachable, a lost
    /// connection, overloaded) rather than answering something: a read may then fall back
    /// on what was read before.
    pub fn is_unanswered(&self) -> bool {
        matches!(
            self,
            StoreError::TimedOut(_)
                | StoreError::Unreachable(_)
                | StoreError::FateUnknown(_)
                | StoreError::Backend(_)
                | StoreError::Overloaded(_)
        )
    }
}

/// Opens the store `url` names (`pool`: connections, for the shared backends;
/// `redb_cache`: the embedded store's page cache in bytes). The FoundationDB network must
/// be booted first (`fdb::Network::boot`).
pub async fn open(
    url: &crate::config::StoreUrl,
    metrics: crate::metrics::Metrics,
    pool: usize,
    deadline: std::time::Duration,
    redb_cache: usize,
) -> Result<std::sync::Arc<dyn Store>, crate::error::NodeError> {
    use crate::config::StoreUrl;
    let store: std::sync::Arc<dyn Store> = match url {
        StoreUrl::Redb(dir) => {
            std::sync::Arc::new(redb::RedbStore::open_with_cache(dir, metrics, redb_cache)?)
        }
        StoreUrl::Postgres(url) => std::sync::Arc::new(
            postgres::PostgresStore::connect_with(
                url,
                pool,
                metrics,
                batch::BatchConfig {
                    deadline,
                    ..batch::BatchConfig::default()
                },
            )
            .await?,
        ),
        #[cfg(feature = "fdb")]
        StoreUrl::Fdb(cluster_file) => {
            std::sync::Arc::new(fdb::FdbStore::open(cluster_file).await?.with_batching(
                batch::BatchConfig {
                    deadline,
                    ..batch::BatchConfig::default()
                },
                Some(metrics),
            ))
        }
        #[cfg(not(feature = "fdb"))]
        StoreUrl::Fdb(_) => {
            return Err(crate::error::NodeError::Config(
                "built without the fdb feature".into(),
            ))
        }
    };
    Ok(std::sync::Arc::new(deadline::DeadlineStore::new(
        store, deadline,
    )))
}

/// Durable state of a node.
#[async_trait]
pub trait Store: Send + Sync + std::fmt::Debug + 'static {
    /// The backend's blob keyspace (`blobs::Blobs` builds on it); `None` for a store
    /// without one (a test double).
    fn blob_kv(&self) -> Option<std::sync::Arc<dyn blobs::BlobKv>>;
    /// Every bucket of a set, as last committed.
    async fn load_set(&self, set: &SetKey) -> Result<Vec<Bucket>, StoreError>;
    /// Takes the set's lease for `owner`, with a new epoch greater than any before, and
    /// names the previous holder when it was another node.
    async fn acquire_lease(&self, set: &SetKey, owner: &str) -> Result<Lease, StoreError>;
    /// The set's current lease epoch as the store has it now (`None`: never leased): an
    /// owner confirms with it that no other node took the lease (ARCHITECTURE.md
    /// invariant 23). One round trip, writes nothing.
    async fn lease_epoch(&self, set: &SetKey) -> Result<Option<Epoch>, StoreError>;
    /// Writes a [`Commit`] atomically, only if `epoch` is still the set's lease epoch and
    /// none of its op ids is remembered yet (else [`StoreError::OpsKnown`], nothing
    /// written). When it returns `Ok` the writes are durable.
    async fn commit(&self, set: &SetKey, epoch: Epoch, commit: Commit) -> Result<(), StoreError>;
    /// The changes of bucket `id` with versions above `since_version`, ascending, at most
    /// `limit`, with the bucket's current version and its oldest kept change; `None` when
    /// the bucket does not exist.
    async fn history(
        &self,
        id: &BucketId,
        since_version: u64,
        limit: usize,
    ) -> Result<Option<HistoryPage>, StoreError>;
    /// A device's registration record.
    async fn get_device(&self, device_id: &str) -> Result<Option<DeviceRecord>, StoreError>;
    /// Creates or replaces a registration record, durably.
    async fn put_device(&self, record: DeviceRecord) -> Result<(), StoreError>;
    /// A device's assigned credentials.
    async fn get_assigned(&self, serial: &str) -> Result<Option<AssignedRecord>, StoreError>;
    /// Replaces a device's assigned credentials (`None` revokes them) only if the stored
    /// record's current hash is still `expected` (`None`: no record). Returns whether it
    /// wrote, so two concurrent rotations cannot both win.
    async fn swap_assigned(
        &self,
        serial: &str,
        expected: Option<[u8; 32]>,
        new: Option<AssignedRecord>,
    ) -> Result<bool, StoreError>;
    /// First contact of a batch of devices. For each device that has no assigned
    /// credentials and whose set was never leased, in one transaction with the others:
    /// the set's lease row is created (epoch 1, held by no node: no actor serves it, so the
    /// first one to load the set takes epoch 2 with no previous owner to hand over from,
    /// and finds the buckets), and its credentials, buckets,
    /// their changes and its device record are written. Any other device — credentials
    /// already assigned, a set already leased, or named again later in the batch — is
    /// refused: nothing of it is written (the caller takes the general path). Returns, per
    /// device, whether it was written; when it returns `Ok` the writes are durable.
    async fn register_new(&self, devices: Vec<NewDevice>) -> Result<Vec<bool>, StoreError>;
    /// A user account.
    async fn get_user(&self, user_id: &str) -> Result<Option<UserRecord>, StoreError>;
    /// Creates a user; `false` if the id is taken.
    async fn create_user(&self, user: UserRecord) -> Result<bool, StoreError>;
    /// A device's pairing.
    async fn get_pairing(&self, device_id: &str) -> Result<Option<Pairing>, StoreError>;
    /// Pairs (`Some`) or unpairs (`None`) a device, keeping the user's device list in step,
    /// atomically; returns the pairing it replaced.
    async fn set_pairing(
        &self,
        device_id: &str,
        pairing: Option<Pairing>,
    ) -> Result<Option<Pairing>, StoreError>;
    /// Every device paired to a user.
    async fn user_pairings(&self, user_id: &str) -> Result<Vec<Pairing>, StoreError>;
    /// The owner of a structure.
    async fn structure_owner(&self, structure: &str) -> Result<Option<String>, StoreError>;
    /// Records `user_id` as a structure's owner unless it has one; returns the owner.
    async fn claim_structure(&self, structure: &str, user_id: &str) -> Result<String, StoreError>;
    /// Structures a user owns.
    async fn user_structures(&self, user_id: &str) -> Result<Vec<String>, StoreError>;
    /// Stores a pairing code and invalidates the device's previous one, atomically: only a
    /// device's newest code can be redeemed.
    async fn put_pairing_code(&self, code: PairingCode) -> Result<(), StoreError>;
    /// Removes and returns a pairing code (a code is redeemable once).
    async fn take_pairing_code(&self, code: &str) -> Result<Option<PairingCode>, StoreError>;
    /// Waits until everything acknowledged is on disk and stops accepting writes.
    async fn close(&self) -> Result<(), StoreError>;
    /// The store's own wall clock (ms since the Unix epoch), the reference that keeps the
    /// nodes sharing it within a bounded offset of each other (`--max-clock-offset-ms`);
    /// `None` for a store without one (the embedded store: the node's clock is the
    /// reference; FoundationDB keeps no wall clock). One round trip, writes nothing.
    async fn clock_ms(&self) -> Result<Option<u64>, StoreError> {
        Ok(None)
    }
}

#[cfg(test)]
pub(crate) mod conformance;
