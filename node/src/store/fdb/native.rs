//! The adapter from the store's key-value surface ([`super::kv`]) to the `foundationdb`
//! crate (cargo feature `fdb`; links `libfdb_c`). Everything else of the FoundationDB store
//! — key layout, fencing, retries and their bounds, idempotency — is in [`super`] and runs
//! in plain `cargo test` on the in-memory implementation.

use std::sync::Arc;

use async_trait::async_trait;
use foundationdb::options::{DatabaseOption, MutationType, StreamingMode};
use foundationdb::{Database, FdbError, KeySelector, RangeOption, Transaction};

use super::kv::{KvDatabase, KvError, KvTransaction, RangeChunk};
use super::{KvStore, Limits};
use crate::store::StoreError;

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

fn kv_error(e: FdbError) -> KvError {
    KvError {
        code: e.code(),
        message: e.message().to_string(),
        retryable: e.is_retryable(),
        maybe_committed: e.is_maybe_committed(),
    }
}

/// A FoundationDB database as a [`KvDatabase`].
#[derive(Clone)]
pub struct FdbDatabase(Arc<Database>);

impl std::fmt::Debug for FdbDatabase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FdbDatabase")
    }
}

impl KvDatabase for FdbDatabase {
    type Trx = FdbTrx;

    fn begin(&self) -> Result<FdbTrx, KvError> {
        self.0.create_trx().map(FdbTrx).map_err(kv_error)
    }
}

/// A FoundationDB transaction as a [`KvTransaction`].
pub struct FdbTrx(Transaction);

impl std::fmt::Debug for FdbTrx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FdbTrx")
    }
}

#[async_trait]
impl KvTransaction for FdbTrx {
    async fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, KvError> {
        let value = self.0.get(key, false).await.map_err(kv_error)?;
        Ok(value.map(|v| v.to_vec()))
    }

    async fn get_range(
        &self,
        begin: &[u8],
        end: &[u8],
        limit: usize,
    ) -> Result<RangeChunk, KvError> {
        let range = RangeOption {
            begin: KeySelector::first_greater_or_equal(begin.to_vec()),
            end: KeySelector::first_greater_or_equal(end.to_vec()),
            limit: Some(limit),
            mode: StreamingMode::WantAll,
            ..RangeOption::default()
        };
        let values = self.0.get_range(&range, 1, false).await.map_err(kv_error)?;
        Ok(RangeChunk {
            pairs: values
                .iter()
                .map(|kv| (kv.key().to_vec(), kv.value().to_vec()))
                .collect(),
            more: values.more(),
        })
    }

    fn set(&self, key: &[u8], value: &[u8]) {
        self.0.set(key, value);
    }

    fn clear(&self, key: &[u8]) {
        self.0.clear(key);
    }

    fn clear_range(&self, begin: &[u8], end: &[u8]) {
        self.0.clear_range(begin, end);
    }

    fn atomic_add(&self, key: &[u8], delta: i64) {
        self.0
            .atomic_op(key, &delta.to_le_bytes(), MutationType::Add);
    }

    async fn commit(self) -> Result<(), KvError> {
        match self.0.commit().await {
            Ok(_) => Ok(()),
            Err(e) => Err(kv_error(*e)),
        }
    }
}

/// The FoundationDB backend: the store logic over a real cluster.
pub type FdbStore = KvStore<FdbDatabase>;

impl KvStore<FdbDatabase> {
    /// Opens the database named by a cluster file (`fdb:/etc/foundationdb/fdb.cluster`)
    /// and checks that it answers within the store's timeout, so a wrong cluster file stops
    /// the node at start. [`Network::boot`] must have been called.
    pub async fn open(cluster_file: &str) -> Result<Self, StoreError> {
        Self::open_under(cluster_file, "tether", Limits::default()).await
    }

    /// Like [`open`](Self::open) with another top-level prefix (tests use a fresh one each).
    pub async fn open_under(
        cluster_file: &str,
        prefix: &str,
        limits: Limits,
    ) -> Result<Self, StoreError> {
        let what = format!("FoundationDB cluster file {cluster_file}");
        let db = Database::from_path(cluster_file)
            .map_err(|e| StoreError::Backend(format!("{what}: {}", kv_error(e))))?;
        // The client's own bound on every transaction (each attempt), besides the store's
        // bound on every operation: without it a call on an unreachable cluster never
        // returns (the crate's `Database::run` warns of exactly this).
        let timeout_ms = i32::try_from(limits.timeout.as_millis()).unwrap_or(i32::MAX);
        db.set_option(DatabaseOption::TransactionTimeout(timeout_ms))
            .map_err(|e| StoreError::Backend(format!("{what}: {}", kv_error(e))))?;
        let store = KvStore::with_limits(FdbDatabase(Arc::new(db)), prefix, limits);
        store.probe(&what).await?;
        Ok(store)
    }
}

#[cfg(test)]
mod tests {
    //! The conformance suite against a real cluster, where one exists. Building the tests
    //! with `--features fdb` links `libfdb_c`, so this runs only where FoundationDB is
    //! installed; there a missing `FDB_CLUSTER_FILE` is a failure, not a skip. The same
    //! logic runs in every `cargo test` on the in-memory database (`store::fdb::tests`).
    use super::*;
    use crate::store::conformance as c;
    use crate::store::Store;

    macro_rules! suite {
        ($file:expr, $($name:ident),* $(,)?) => {$(
            let prefix = format!("tether-test-{}-{}", stringify!($name), std::process::id());
            let store = FdbStore::open_under(&$file, &prefix, Limits::default()).await.expect("open FDB");
            eprintln!("fdb conformance: {}", stringify!($name));
            c::$name(Arc::new(store.clone()) as Arc<dyn Store>).await;
            store.clear_all().await.expect("clear the test prefix");
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
