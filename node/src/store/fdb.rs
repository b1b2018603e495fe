//! FoundationDB store (cargo feature `fdb`): the production store of the Helm chart.
//!
//! Key layout (FDB tuple encoding, all under the `("tether",)` subspace):
//!
//! | key                                   | value                                  |
//! |---------------------------------------|----------------------------------------|
//! | `("tether","bucket",set,id)`          | JSON `{value, ts_ms, ts_logical, version}` |
//! | `("tether","lease",set)`              | epoch, u64 big-endian                  |
//! | `("tether","lease_owner",set)`        | node id holding the lease, UTF-8       |
//! | `("tether","device",device_id)`       | JSON `DeviceRecord`                    |
//! | `("tether","rec",ns,k1[,k2])`         | JSON (credentials, users, pairings, structures, codes) |
//!
//! Fencing: `commit` reads the set's lease key in the same transaction as its writes, so a
//! concurrent `acquire_lease` conflicts with it (serializable isolation): one of them
//! retries and the commit then sees the new epoch and is refused. FDB limits are kept: a
//! commit writes one bucket set (a handful of values, each ≤ 64 KiB by the node's bucket
//! limit, far below 100 KB), so transactions stay small and short; there are no watches at
//! all — notifications come from the owning actor, never one FDB watch per device.

use std::sync::Arc;

use async_trait::async_trait;
use foundationdb::tuple::Subspace;
use foundationdb::{Database, FdbBindingError, RangeOption, RetryableTransaction};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tether_proto::{Bucket, SetKey};

use super::{
    decode_bucket, encode_bucket, AssignedRecord, DeviceRecord, Epoch, Lease, Pairing, PairingCode,
    Store, StoreError, UserRecord,
};

fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(e.to_string())
}

/// Carries a domain error out of a transaction closure.
#[derive(Debug)]
struct Abort(StoreError);

impl std::fmt::Display for Abort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for Abort {}

fn abort(e: StoreError) -> FdbBindingError {
    FdbBindingError::CustomError(Box::new(Abort(e)))
}

fn unwrap_abort(e: FdbBindingError) -> StoreError {
    match e {
        FdbBindingError::CustomError(inner) => match inner.downcast::<Abort>() {
            Ok(a) => a.0,
            Err(other) => backend(other),
        },
        other => backend(other),
    }
}

fn to_json<T: Serialize>(v: &T) -> Result<Vec<u8>, FdbBindingError> {
    serde_json::to_vec(v).map_err(|e| abort(StoreError::Corrupt(e.to_string())))
}

fn from_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, FdbBindingError> {
    serde_json::from_slice(bytes).map_err(|e| abort(StoreError::Corrupt(e.to_string())))
}

/// Decodes a lease epoch (u64 big-endian).
fn decode_epoch(bytes: &[u8]) -> Result<u64, FdbBindingError> {
    let raw: [u8; 8] = bytes.try_into().map_err(|_| {
        abort(StoreError::Corrupt(format!(
            "lease epoch of {} bytes",
            bytes.len()
        )))
    })?;
    Ok(u64::from_be_bytes(raw))
}

/// Keeps FDB's network thread alive for the process; boot it once before connecting.
pub struct Network {
    _guard: foundationdb::api::NetworkAutoStop,
}

impl std::fmt::Debug for Network {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("fdb::Network")
    }
}

impl Network {
    /// Starts the FDB client network thread.
    #[allow(unsafe_code)]
    pub fn boot() -> Self {
        // SAFETY: `boot` must run once per process and the guard must outlive every
        // `Database`; the caller keeps the returned `Network` until after the store closed.
        Network {
            _guard: unsafe { foundationdb::boot() },
        }
    }
}

/// The FoundationDB backend.
#[derive(Clone)]
pub struct FdbStore {
    db: Arc<Database>,
    root: Subspace,
}

impl std::fmt::Debug for FdbStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FdbStore").finish_non_exhaustive()
    }
}

async fn read_all(
    trx: &RetryableTransaction,
    space: &Subspace,
) -> Result<Vec<(Vec<u8>, Vec<u8>)>, FdbBindingError> {
    let mut out = Vec::new();
    let mut opt = Some(RangeOption::from(space));
    let mut iteration = 1;
    while let Some(range) = opt {
        let values = trx.get_range(&range, iteration, false).await?;
        for kv in values.iter() {
            out.push((kv.key().to_vec(), kv.value().to_vec()));
        }
        opt = range.next_range(&values);
        iteration += 1;
    }
    Ok(out)
}

impl FdbStore {
    /// Opens the database named by a cluster file (`fdb:/etc/foundationdb/fdb.cluster`).
    /// [`Network::boot`] must have been called.
    pub fn open(cluster_file: &str) -> Result<Self, StoreError> {
        Self::open_under(cluster_file, "tether")
    }

    /// Like [`open`](Self::open) with another top-level prefix (tests use a fresh one each).
    pub fn open_under(cluster_file: &str, prefix: &str) -> Result<Self, StoreError> {
        let db = Database::from_path(cluster_file).map_err(backend)?;
        Ok(FdbStore {
            db: Arc::new(db),
            root: Subspace::all().subspace(&prefix),
        })
    }

    fn rec(&self, ns: &str, k1: &str) -> Vec<u8> {
        self.root.pack(&("rec", ns, k1))
    }

    fn rec2(&self, ns: &str, k1: &str, k2: &str) -> Vec<u8> {
        self.root.pack(&("rec", ns, k1, k2))
    }

    async fn get_json<T: DeserializeOwned>(&self, key: Vec<u8>) -> Result<Option<T>, StoreError> {
        self.db
            .run(|trx, _| {
                let key = key.clone();
                async move {
                    match trx.get(&key, false).await? {
                        Some(v) => Ok(Some(from_json(&v)?)),
                        None => Ok(None),
                    }
                }
            })
            .await
            .map_err(unwrap_abort)
    }

    async fn list_json<T: DeserializeOwned>(&self, space: Subspace) -> Result<Vec<T>, StoreError> {
        self.db
            .run(|trx, _| {
                let space = space.clone();
                async move {
                    read_all(&trx, &space)
                        .await?
                        .into_iter()
                        .map(|(_, v)| from_json(&v))
                        .collect()
                }
            })
            .await
            .map_err(unwrap_abort)
    }
}

#[async_trait]
impl Store for FdbStore {
    async fn load_set(&self, set: &SetKey) -> Result<Vec<Bucket>, StoreError> {
        let space = self.root.subspace(&("bucket", set.as_str()));
        let rows = self
            .db
            .run(|trx, _| {
                let space = space.clone();
                async move { read_all(&trx, &space).await }
            })
            .await
            .map_err(unwrap_abort)?;
        rows.into_iter()
            .map(|(k, v)| {
                let (id,): (String,) = space
                    .unpack(&k)
                    .map_err(|e| StoreError::Corrupt(e.to_string()))?;
                decode_bucket(&id, &v)
            })
            .collect()
    }

    async fn acquire_lease(&self, set: &SetKey, owner: &str) -> Result<Lease, StoreError> {
        let key = self.root.pack(&("lease", set.as_str()));
        let owner_key = self.root.pack(&("lease_owner", set.as_str()));
        let (epoch, previous) = self
            .db
            .run(|trx, _| {
                let (key, owner_key) = (key.clone(), owner_key.clone());
                async move {
                    let current = match trx.get(&key, false).await? {
                        Some(v) => decode_epoch(&v)?,
                        None => 0,
                    };
                    let previous = trx
                        .get(&owner_key, false)
                        .await?
                        .map(|v| String::from_utf8_lossy(&v).into_owned());
                    let next = current + 1;
                    trx.set(&key, &next.to_be_bytes());
                    trx.set(&owner_key, owner.as_bytes());
                    Ok((next, previous))
                }
            })
            .await
            .map_err(unwrap_abort)?;
        Ok(Lease {
            epoch: Epoch(epoch),
            previous_owner: previous.filter(|p| p != owner),
        })
    }

    async fn commit(
        &self,
        set: &SetKey,
        epoch: Epoch,
        writes: Vec<Bucket>,
    ) -> Result<(), StoreError> {
        let lease = self.root.pack(&("lease", set.as_str()));
        let encoded: Vec<(Vec<u8>, Vec<u8>)> = writes
            .iter()
            .map(|b| {
                let body = encode_bucket(b)?;
                Ok((
                    self.root.pack(&("bucket", set.as_str(), b.id.as_str())),
                    body,
                ))
            })
            .collect::<Result<_, StoreError>>()?;
        let set_name = set.to_string();
        self.db
            .run(|trx, _| {
                let (lease, encoded, set_name) = (lease.clone(), encoded.clone(), set_name.clone());
                async move {
                    let current = trx
                        .get(&lease, false)
                        .await?
                        .map(|v| decode_epoch(&v))
                        .transpose()?;
                    if current != Some(epoch.0) {
                        return Err(abort(StoreError::Fenced {
                            set: set_name,
                            epoch: epoch.0,
                        }));
                    }
                    for (k, v) in &encoded {
                        trx.set(k, v);
                    }
                    Ok(())
                }
            })
            .await
            .map_err(unwrap_abort)
    }

    async fn get_device(&self, device_id: &str) -> Result<Option<DeviceRecord>, StoreError> {
        self.get_json(self.root.pack(&("device", device_id))).await
    }

    async fn put_device(&self, record: DeviceRecord) -> Result<(), StoreError> {
        let key = self.root.pack(&("device", record.device_id.as_str()));
        self.db
            .run(|trx, _| {
                let (key, record) = (key.clone(), record.clone());
                async move {
                    trx.set(&key, &to_json(&record)?);
                    Ok(())
                }
            })
            .await
            .map_err(unwrap_abort)
    }

    async fn get_assigned(&self, serial: &str) -> Result<Option<AssignedRecord>, StoreError> {
        self.get_json(self.rec("assigned", serial)).await
    }

    async fn swap_assigned(
        &self,
        serial: &str,
        expected: Option<[u8; 32]>,
        new: Option<AssignedRecord>,
    ) -> Result<bool, StoreError> {
        let key = self.rec("assigned", serial);
        self.db
            .run(|trx, _| {
                let (key, new) = (key.clone(), new.clone());
                async move {
                    let current: Option<AssignedRecord> = trx
                        .get(&key, false)
                        .await?
                        .map(|v| from_json(&v))
                        .transpose()?;
                    if current.map(|r| r.current_hash) != expected {
                        return Ok(false);
                    }
                    match &new {
                        Some(r) => trx.set(&key, &to_json(r)?),
                        None => trx.clear(&key),
                    }
                    Ok(true)
                }
            })
            .await
            .map_err(unwrap_abort)
    }

    async fn get_user(&self, user_id: &str) -> Result<Option<UserRecord>, StoreError> {
        self.get_json(self.rec("user", user_id)).await
    }

    async fn create_user(&self, user: UserRecord) -> Result<bool, StoreError> {
        let key = self.rec("user", &user.user_id);
        self.db
            .run(|trx, _| {
                let (key, user) = (key.clone(), user.clone());
                async move {
                    if trx.get(&key, false).await?.is_some() {
                        return Ok(false);
                    }
                    trx.set(&key, &to_json(&user)?);
                    Ok(true)
                }
            })
            .await
            .map_err(unwrap_abort)
    }

    async fn get_pairing(&self, device_id: &str) -> Result<Option<Pairing>, StoreError> {
        self.get_json(self.rec("pairing", device_id)).await
    }

    async fn set_pairing(
        &self,
        device_id: &str,
        pairing: Option<Pairing>,
    ) -> Result<Option<Pairing>, StoreError> {
        let key = self.rec("pairing", device_id);
        let root = self.root.clone();
        let device = device_id.to_string();
        self.db
            .run(|trx, _| {
                let (key, root, device, pairing) =
                    (key.clone(), root.clone(), device.clone(), pairing.clone());
                async move {
                    let old: Option<Pairing> = trx
                        .get(&key, false)
                        .await?
                        .map(|v| from_json(&v))
                        .transpose()?;
                    if let Some(o) = &old {
                        trx.clear(&root.pack(&(
                            "rec",
                            "user_device",
                            o.user_id.as_str(),
                            device.as_str(),
                        )));
                    }
                    match &pairing {
                        Some(p) => {
                            let body = to_json(p)?;
                            trx.set(&key, &body);
                            trx.set(
                                &root.pack(&(
                                    "rec",
                                    "user_device",
                                    p.user_id.as_str(),
                                    device.as_str(),
                                )),
                                &body,
                            );
                        }
                        None => trx.clear(&key),
                    }
                    Ok(old)
                }
            })
            .await
            .map_err(unwrap_abort)
    }

    async fn user_pairings(&self, user_id: &str) -> Result<Vec<Pairing>, StoreError> {
        self.list_json(self.root.subspace(&("rec", "user_device", user_id)))
            .await
    }

    async fn structure_owner(&self, structure: &str) -> Result<Option<String>, StoreError> {
        self.get_json(self.rec("structure", structure)).await
    }

    async fn claim_structure(&self, structure: &str, user_id: &str) -> Result<String, StoreError> {
        let key = self.rec("structure", structure);
        let index = self.rec2("user_structure", user_id, structure);
        let (s, u) = (structure.to_string(), user_id.to_string());
        self.db
            .run(|trx, _| {
                let (key, index, s, u) = (key.clone(), index.clone(), s.clone(), u.clone());
                async move {
                    if let Some(owner) = trx.get(&key, false).await? {
                        return from_json::<String>(&owner);
                    }
                    trx.set(&key, &to_json(&u)?);
                    trx.set(&index, &to_json(&s)?);
                    Ok(u)
                }
            })
            .await
            .map_err(unwrap_abort)
    }

    async fn user_structures(&self, user_id: &str) -> Result<Vec<String>, StoreError> {
        self.list_json(self.root.subspace(&("rec", "user_structure", user_id)))
            .await
    }

    async fn put_pairing_code(&self, code: PairingCode) -> Result<(), StoreError> {
        let key = self.rec("code", &code.code);
        let index = self.rec("device_code", &code.device_id);
        let root = self.root.clone();
        self.db
            .run(|trx, _| {
                let (key, index, code, root) =
                    (key.clone(), index.clone(), code.clone(), root.clone());
                async move {
                    // The device's previous code, removed only if it is still that device's.
                    if let Some(old) = trx.get(&index, false).await? {
                        let old: String = from_json(&old)?;
                        let old_key = root.pack(&("rec", "code", old.as_str()));
                        if let Some(v) = trx.get(&old_key, false).await? {
                            let c: PairingCode = from_json(&v)?;
                            if c.device_id == code.device_id {
                                trx.clear(&old_key);
                            }
                        }
                    }
                    trx.set(&index, &to_json(&code.code)?);
                    trx.set(&key, &to_json(&code)?);
                    Ok(())
                }
            })
            .await
            .map_err(unwrap_abort)
    }

    async fn take_pairing_code(&self, code: &str) -> Result<Option<PairingCode>, StoreError> {
        let key = self.rec("code", code);
        self.db
            .run(|trx, _| {
                let key = key.clone();
                async move {
                    let found = trx
                        .get(&key, false)
                        .await?
                        .map(|v| from_json(&v))
                        .transpose()?;
                    trx.clear(&key);
                    Ok(found)
                }
            })
            .await
            .map_err(unwrap_abort)
    }

    async fn close(&self) -> Result<(), StoreError> {
        // Every acknowledged write was committed by FDB before its answer.
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    //! The conformance suite against a real cluster. Building with `--features fdb` opts in,
    //! so a missing `FDB_CLUSTER_FILE` is a failure, not a skip; CI only `cargo check`s the
    //! feature because FoundationDB cannot be installed there.
    use super::*;
    use crate::store::conformance as c;

    macro_rules! suite {
        ($file:expr, $($name:ident),* $(,)?) => {$(
            let prefix = format!("tether-test-{}-{}", stringify!($name), std::process::id());
            let store: Arc<dyn Store> = Arc::new(FdbStore::open_under(&$file, &prefix).expect("open FDB"));
            eprintln!("fdb conformance: {}", stringify!($name));
            c::$name(store).await;
        )*};
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn fdb_backend_passes_the_conformance_suite() {
        let cluster_file = std::env::var("FDB_CLUSTER_FILE")
            .expect("the fdb feature's tests need a FoundationDB cluster: set FDB_CLUSTER_FILE");
        let _network = Network::boot();
        c::every_case!(suite, cluster_file);
    }
}
