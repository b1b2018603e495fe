//! The FoundationDB store: the production store of the Helm chart.
//!
//! Split in two so that everything but the C library runs in plain `cargo test`:
//! - this module — the key layout, fencing, the retry loop with its time and attempt
//!   bounds, and idempotent retries, written against the small transactional key-value
//!   surface of [`kv`] ([`KvStore`]); always compiled, no link to `libfdb_c`;
//! - `native` (cargo feature `fdb`) — the thin adapter from that surface to the
//!   `foundationdb` crate, the network thread and [`FdbStore`](native::FdbStore).
//!
//! [`memory::MemoryKv`] implements the same surface in memory with FDB's conflict rules and
//! injectable failures (`commit_unknown_result`, retryable errors, an unreachable
//! cluster); the store conformance suite runs on it in CI (`store::fdb::tests`).
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
//! | `("tether","txn",ms,uuid,part)`       | JSON result of a committed non-idempotent operation, in parts of at most 90 KB |
//! | `("tether","change",set,id,version)`  | JSON `Change` (the bucket's sync log)  |
//! | `("tether","op",set,op_id)`           | JSON `OpRecord` (a remembered op id)   |
//! | `("tether","op_age",set,at_ms,op_id)` | empty: the set's op ids by age         |
//! | `("tether","op_count",set)`           | how many op ids the set remembers, u64 big-endian |
//!
//! Commits are batched (`batch.rs`, [`BatchConfig`]): every actor of a node queues its
//! commit, and a writer task writes what is queued in ONE transaction — per commit the
//! buckets, their changes, its op records and the retention trims, after checking its
//! set's lease and that none of its op ids is remembered ([`StoreError::OpsKnown`]
//! otherwise, nothing of that commit written); each commit is decided alone, so a fenced
//! set or a replayed op id refuses only its own commits. Past [`BatchConfig::queue`]
//! queued commits a commit fails at once ([`StoreError::Overloaded`]); a batch not
//! answered within [`BatchConfig::deadline`] answers each of its commits
//! [`StoreError::FateUnknown`]; every answer waits for FDB's commit.
//!
//! Fencing: a batch reads the lease key of every set it writes in the same transaction as
//! its writes, so a concurrent `acquire_lease` conflicts with it (serializable isolation):
//! one of them retries, and the batch then sees the new epoch and refuses that set's
//! commits (the others commit).
//!
//! Retries: every operation runs in a loop that retries FDB's retryable errors with
//! exponential backoff, at most [`Limits::max_attempts`] times and for at most
//! [`Limits::timeout`] in all (5 s, the PostgreSQL backend's bound), then fails with
//! [`StoreError::Backend`] — a 503 with `Retry-After`, never a hang. An attempt whose
//! commit reported `commit_unknown_result` may have committed; operations whose second
//! application would answer differently (lease take-over, user creation, pairing-code
//! consumption, pairing, credential swap) write a transaction marker `("txn",ms,uuid,…)`
//! holding their result in the same transaction, and every retry first reads it: when it
//! is there the first attempt committed and its result is returned (FDB developer guide,
//! "Transactions with unknown results"). Markers older than [`MARKER_TTL_MS`] are cleared
//! by later marked transactions. A batch with a commit that remembers op ids (or trims
//! them) is marked too, its marker holding every commit's decision: its second application
//! would find its own op ids and answer `OpsKnown`, and bump the op count twice; with the
//! marker each commit is answered what the attempt that committed decided. Other batches
//! (buckets, changes, change trims), device records, pairing codes and structure claims
//! are idempotent as they are.
//!
//! Limits: a bucket is one value, and FDB values are at most 100,000 bytes, so the node
//! refuses a `max_bucket_bytes` above [`MAX_BUCKET_BYTES`] on this store
//! ([`check_bucket_limit`]). A batch holds many sets' commits, so it is cut where its
//! encoded keys and values would pass [`BatchConfig::max_batch_bytes`] (4 MB by default,
//! well below FDB's 10 MB per transaction, which also counts retention clears and the
//! marker), at most [`BatchConfig::max_batch`] commits each; the parts are written one
//! after the other. A single commit over the bound, or with a key or value FDB refuses, is
//! a part of its own and fails alone. FDB's 5 s per transaction is kept by the batch
//! deadline (`--store-timeout-ms`, 3 s by default) and [`Limits::timeout`]. There are no
//! watches at all — notifications come from the owning actor, never one FDB watch per
//! device.

mod batch;
mod blobs;
pub mod kv;
pub mod memory;
#[cfg(feature = "fdb")]
pub mod native;
#[cfg(feature = "fdb")]
pub use native::{FdbStore, Network};

pub use crate::store::batch::BatchConfig;

use std::future::Future;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use foundationdb_tuple::Subspace;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tether_proto::synclog::Change;
use tether_proto::{Bucket, BucketId, SetKey};

use self::kv::{KvDatabase, KvError, KvTransaction, MAX_VALUE_BYTES};
use super::{
    decode_bucket, encode_bucket, AssignedRecord, Commit, DeviceRecord, Epoch, HistoryPage, Lease,
    NewDevice, OpRetention, Pairing, PairingCode, Store, StoreError, UserRecord,
};

/// Upper bound of what a stored bucket adds to its value's JSON (`{"value":…,"ts_ms":…,
/// "ts_logical":…,"version":…}` with every number at its widest; a test checks it).
pub const STORED_BUCKET_ENVELOPE: usize = 128;
/// The largest `max_bucket_bytes` this store accepts: a bucket must fit one FDB value.
pub const MAX_BUCKET_BYTES: usize = MAX_VALUE_BYTES - STORED_BUCKET_ENVELOPE;
/// How long a transaction marker is kept: far beyond any retry loop ([`Limits::timeout`]),
/// and beyond any sane clock skew between the nodes that clear old markers.
pub const MARKER_TTL_MS: u64 = 10 * 60 * 1000;
/// The most bytes of a transaction marker's result in one value (well below FDB's
/// [`MAX_VALUE_BYTES`]); a longer result is stored in parts `("txn",ms,uuid,0..)`.
const MARKER_PART_BYTES: usize = 90_000;

/// Refuses a bucket size limit FoundationDB could not store: without this, a bucket near
/// the limit fails every commit of its set with `value_too_large` (a 503 forever).
pub fn check_bucket_limit(max_bucket_bytes: usize) -> Result<(), String> {
    if max_bucket_bytes > MAX_BUCKET_BYTES {
        return Err(format!(
            "max_bucket_bytes {max_bucket_bytes} is too large for the FoundationDB store: a bucket is \
             stored as one value and FoundationDB values are at most {MAX_VALUE_BYTES} bytes; use at \
             most {MAX_BUCKET_BYTES}"
        ));
    }
    Ok(())
}

/// How long and how often a store operation may try before it fails (503).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// The whole operation, every attempt and backoff included.
    pub timeout: Duration,
    /// Attempts before a retryable error is final.
    pub max_attempts: u32,
    /// Pairs per range read request (more pages are read until the range is done).
    pub range_page: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            timeout: Duration::from_secs(5),
            max_attempts: 50,
            range_page: 1000,
        }
    }
}

/// Which attempt of an operation's transaction this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attempt {
    /// 1 for the first.
    pub number: u32,
    /// An earlier attempt's commit reported a result it could not verify.
    pub maybe_committed: bool,
}

/// Why one attempt ended without a result.
#[derive(Debug)]
pub enum TxError {
    /// The key-value layer failed; retried when the error is retryable.
    Kv(KvError),
    /// A domain answer (fenced, corrupt record): returned at once, nothing committed.
    Abort(StoreError),
}

impl From<KvError> for TxError {
    fn from(e: KvError) -> Self {
        TxError::Kv(e)
    }
}

fn abort(e: StoreError) -> TxError {
    TxError::Abort(e)
}

fn to_json<T: Serialize>(v: &T) -> Result<Vec<u8>, TxError> {
    serde_json::to_vec(v).map_err(|e| abort(StoreError::Corrupt(e.to_string())))
}

fn from_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, TxError> {
    serde_json::from_slice(bytes).map_err(|e| abort(StoreError::Corrupt(e.to_string())))
}

/// Decodes a lease epoch (u64 big-endian).
fn decode_epoch(bytes: &[u8]) -> Result<u64, TxError> {
    let raw: [u8; 8] = bytes.try_into().map_err(|_| {
        abort(StoreError::Corrupt(format!(
            "lease epoch of {} bytes",
            bytes.len()
        )))
    })?;
    Ok(u64::from_be_bytes(raw))
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Every pair of a range, page by page (one transaction, serializable).
async fn read_all<T: KvTransaction>(
    trx: &T,
    (begin, end): (Vec<u8>, Vec<u8>),
    page: usize,
) -> Result<Vec<(Vec<u8>, Vec<u8>)>, TxError> {
    let mut out = Vec::new();
    let mut from = begin;
    loop {
        let chunk = trx.get_range(&from, &end, page.max(1)).await?;
        let more = chunk.more;
        out.extend(chunk.pairs);
        match out.last() {
            Some((last, _)) if more => {
                from = last.clone();
                from.push(0);
            }
            _ => return Ok(out),
        }
    }
}

/// At most `limit` pairs of a range, in order.
async fn read_limited<T: KvTransaction>(
    trx: &T,
    (begin, end): (Vec<u8>, Vec<u8>),
    limit: usize,
) -> Result<Vec<(Vec<u8>, Vec<u8>)>, TxError> {
    let mut out = Vec::new();
    let mut from = begin;
    while out.len() < limit {
        let chunk = trx.get_range(&from, &end, limit - out.len()).await?;
        let more = chunk.more;
        out.extend(chunk.pairs);
        match out.last() {
            Some((last, _)) if more => {
                from = last.clone();
                from.push(0);
            }
            _ => break,
        }
    }
    out.truncate(limit);
    Ok(out)
}

/// One commit's keys and values, encoded before the transaction runs (it may run again).
struct Encoded {
    lease: Vec<u8>,
    writes: Vec<(Vec<u8>, Vec<u8>)>,
    /// (op key, record, age key) per op id.
    ops: Vec<(Vec<u8>, Vec<u8>, Vec<u8>)>,
    trims: Vec<(Vec<u8>, Vec<u8>)>,
    count: Vec<u8>,
    retention: Option<OpRetention>,
}

/// One first contact's keys and values, encoded before the transaction runs.
struct EncodedNewDevice {
    set: String,
    lease: Vec<u8>,
    assigned: (Vec<u8>, Vec<u8>),
    device_key: Vec<u8>,
    record: DeviceRecord,
    writes: Vec<(Vec<u8>, Vec<u8>)>,
}

/// The FoundationDB store's logic over any [`KvDatabase`]: [`native::FdbStore`] in
/// production, [`memory::MemoryKv`] in tests.
pub struct KvStore<D: KvDatabase> {
    db: Arc<D>,
    root: Subspace,
    limits: Limits,
    /// The batching writer `commit` goes through (`batch.rs`); `None` in the writer
    /// tasks' own handle, which commits a batch of one itself.
    batching: Option<Arc<Batching>>,
    /// Draws the retry backoff's jitter when set (`with_jitter_seed`), else the thread's
    /// generator does.
    jitter: Option<Arc<std::sync::Mutex<rand::rngs::StdRng>>>,
}

/// A store's batching writer, started by its first commit.
#[derive(Debug)]
struct Batching {
    config: BatchConfig,
    metrics: Option<crate::metrics::Metrics>,
    /// Where its writer tasks run: the runtime the store was configured on (the node's
    /// main runtime: an actor's may stop while the store lives on), else the first
    /// commit's.
    runtime: Option<tokio::runtime::Handle>,
    queue: OnceLock<crate::store::batch::Queue>,
}

impl<D: KvDatabase> Clone for KvStore<D> {
    fn clone(&self) -> Self {
        KvStore {
            db: self.db.clone(),
            root: self.root.clone(),
            limits: self.limits,
            batching: self.batching.clone(),
            jitter: self.jitter.clone(),
        }
    }
}

impl<D: KvDatabase> std::fmt::Debug for KvStore<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvStore")
            .field("root", &self.root)
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

impl<D: KvDatabase> KvStore<D> {
    /// The store under the top-level tuple prefix `prefix` (`"tether"`; tests use a fresh
    /// one each), with the default [`Limits`].
    pub fn new(db: D, prefix: &str) -> Self {
        Self::with_limits(db, prefix, Limits::default())
    }

    /// Like [`new`](Self::new) with other limits (tests shorten the timeout), and the
    /// default [`BatchConfig`].
    pub fn with_limits(db: D, prefix: &str, limits: Limits) -> Self {
        KvStore {
            db: Arc::new(db),
            root: Subspace::all().subspace(&prefix),
            limits,
            batching: None,
            jitter: None,
        }
        .with_batching(BatchConfig::default(), None)
    }

    /// This store with commits batched under `config` (its handles share one batching
    /// writer, started by the first commit on the runtime this is called on, if any);
    /// each batch transaction is counted in `metrics` (`tether_store_commits_total`,
    /// `tether_store_batch`).
    pub fn with_batching(
        self,
        config: BatchConfig,
        metrics: Option<crate::metrics::Metrics>,
    ) -> Self {
        KvStore {
            batching: Some(Arc::new(Batching {
                config,
                metrics,
                runtime: tokio::runtime::Handle::try_current().ok(),
                queue: OnceLock::new(),
            })),
            ..self
        }
    }

    /// This store with its retry backoff's jitter drawn from `seed` (the cluster
    /// simulator: a run is a function of its seed).
    pub fn with_jitter_seed(self, seed: u64) -> Self {
        use rand::SeedableRng;
        KvStore {
            jitter: Some(Arc::new(std::sync::Mutex::new(
                rand::rngs::StdRng::seed_from_u64(seed),
            ))),
            ..self
        }
    }

    /// A fresh transaction marker's id: random, drawn from the jitter's generator when the
    /// store has one (the simulator's runs are functions of their seeds).
    fn marker_id(&self) -> String {
        match &self.jitter {
            Some(rng) => {
                use rand::Rng;
                let bits: u128 = rng
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .random();
                uuid::Uuid::from_u128(bits).to_string()
            }
            None => uuid::Uuid::new_v4().to_string(),
        }
    }

    /// This store with every commit in its own transaction, run by the committing task
    /// (the cluster simulator: a writer task would outlive the simulated host it was
    /// started on, and a batch would mix hosts).
    pub fn without_batching(self) -> Self {
        KvStore {
            batching: None,
            ..self
        }
    }

    /// The batching writer's queue, started on first use; its writer tasks hold a handle
    /// without one, so they never queue behind themselves and end once every handle with
    /// the queue is gone.
    fn queue<'a>(
        &self,
        batching: &'a Batching,
    ) -> Result<&'a crate::store::batch::Queue, StoreError> {
        if let Some(queue) = batching.queue.get() {
            return Ok(queue);
        }
        let runtime = match &batching.runtime {
            Some(r) => r.clone(),
            None => tokio::runtime::Handle::try_current().map_err(|_| {
                StoreError::Backend(
                    "FoundationDB: a commit outside a Tokio runtime cannot start the batch writer"
                        .into(),
                )
            })?,
        };
        Ok(batching.queue.get_or_init(|| {
            let writer = KvStore {
                batching: None,
                ..self.clone()
            };
            batch::start(writer, batching.config, batching.metrics.clone(), &runtime)
        }))
    }

    /// The database underneath.
    pub fn database(&self) -> &D {
        &self.db
    }

    /// Checks that the database answers a read within the timeout, so a wrong cluster file
    /// or an unreachable cluster stops the node at start instead of hanging its first
    /// request.
    pub async fn probe(&self, what: &str) -> Result<(), StoreError> {
        let key = self.root.pack(&("probe",));
        self.run(what, |trx, _| {
            let key = key.clone();
            async move {
                trx.get(&key).await?;
                Ok(())
            }
        })
        .await
        .map_err(|e| StoreError::Backend(format!("{what} is not reachable: {e}")))
    }

    /// Clears everything under this store's prefix (tests on a shared cluster).
    pub async fn clear_all(&self) -> Result<(), StoreError> {
        let (begin, end) = self.root.range();
        self.run("clear", |trx, _| {
            let (begin, end) = (begin.clone(), end.clone());
            async move {
                trx.clear_range(&begin, &end);
                Ok(())
            }
        })
        .await
    }

    /// Runs `body` in a transaction and commits it, retrying retryable errors with
    /// backoff, within [`Limits`]. `body` may run more than once: it must be idempotent,
    /// or go through [`run_once`](Self::run_once).
    async fn run<T, F, Fut>(&self, what: &str, body: F) -> Result<T, StoreError>
    where
        T: Send,
        F: Fn(Arc<D::Trx>, Attempt) -> Fut + Send + Sync,
        Fut: Future<Output = Result<T, TxError>> + Send,
    {
        let timeout = self.limits.timeout;
        match tokio::time::timeout(timeout, self.retry(what, &body)).await {
            Ok(result) => result,
            Err(_) => Err(StoreError::Backend(format!(
                "FoundationDB: {what} did not complete within {timeout:?} (cluster unreachable or \
                 overloaded); nothing was acknowledged"
            ))),
        }
    }

    async fn retry<T, F, Fut>(&self, what: &str, body: &F) -> Result<T, StoreError>
    where
        T: Send,
        F: Fn(Arc<D::Trx>, Attempt) -> Fut + Send + Sync,
        Fut: Future<Output = Result<T, TxError>> + Send,
    {
        let mut attempt = Attempt {
            number: 1,
            maybe_committed: false,
        };
        let mut backoff = Duration::from_millis(10);
        loop {
            let error = match self.attempt(body, attempt).await {
                Ok(value) => return Ok(value),
                Err(TxError::Abort(e)) => return Err(e),
                Err(TxError::Kv(e)) => e,
            };
            if !error.retryable {
                return Err(StoreError::Backend(format!(
                    "FoundationDB: {what}: {error}"
                )));
            }
            if attempt.number >= self.limits.max_attempts {
                return Err(StoreError::Backend(format!(
                    "FoundationDB: {what} gave up after {} attempts: {error}",
                    attempt.number
                )));
            }
            tracing::debug!(
                what,
                attempt = attempt.number,
                code = error.code,
                "retrying transaction"
            );
            attempt.number += 1;
            attempt.maybe_committed |= error.maybe_committed;
            let jitter = {
                use rand::Rng;
                match &self.jitter {
                    Some(rng) => rng
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .random_range(0.5..1.0),
                    None => rand::rng().random_range(0.5..1.0),
                }
            };
            tokio::time::sleep(backoff.mul_f64(jitter)).await;
            backoff = (backoff * 2).min(Duration::from_secs(1));
        }
    }

    async fn attempt<T, F, Fut>(&self, body: &F, attempt: Attempt) -> Result<T, TxError>
    where
        F: Fn(Arc<D::Trx>, Attempt) -> Fut,
        Fut: Future<Output = Result<T, TxError>>,
    {
        let trx = Arc::new(self.db.begin()?);
        let value = body(trx.clone(), attempt).await?;
        let trx = Arc::try_unwrap(trx).map_err(|_| {
            abort(StoreError::Backend(
                "FoundationDB: a transaction was kept past its closure".into(),
            ))
        })?;
        trx.commit().await?;
        Ok(value)
    }

    /// [`run`](Self::run) for an operation whose second application would answer
    /// differently: the first attempt that commits also writes its result under a fresh
    /// marker key (in parts of [`MARKER_PART_BYTES`]), and every later attempt returns the
    /// marker's result when it finds one.
    /// Later attempts always look, not only after `commit_unknown_result`: a commit whose
    /// result was unknown may land after the next attempt's read version, which then fails
    /// with a conflict, and only the attempt after that sees the marker.
    async fn run_once<T, F, Fut>(&self, what: &str, body: F) -> Result<T, StoreError>
    where
        T: Serialize + DeserializeOwned + Send,
        F: Fn(Arc<D::Trx>, Attempt) -> Fut + Send + Sync,
        Fut: Future<Output = Result<T, TxError>> + Send,
    {
        let now = now_ms();
        let marker = self.root.subspace(&("txn", now, self.marker_id()));
        let expired = (
            self.root.subspace(&("txn",)).range().0,
            self.root.pack(&("txn", now.saturating_sub(MARKER_TTL_MS))),
        );
        let (marker, expired, body, page) = (&marker, &expired, &body, self.limits.range_page);
        self.run(what, |trx, attempt| async move {
            if attempt.number > 1 {
                let parts = read_all(&*trx, marker.range(), page).await?;
                if !parts.is_empty() {
                    tracing::debug!(what, "an earlier attempt committed; returning its result");
                    let done: Vec<u8> = parts.into_iter().flat_map(|(_, v)| v).collect();
                    return from_json(&done);
                }
            }
            let result = body(trx.clone(), attempt).await?;
            // In parts: a result may pass FDB's value limit (a batch commit's decisions
            // carry the op records of its replays).
            for (i, part) in to_json(&result)?.chunks(MARKER_PART_BYTES).enumerate() {
                trx.set(&marker.pack(&(i as u64)), part);
            }
            trx.clear_range(&expired.0, &expired.1);
            Ok(result)
        })
        .await
    }

    fn rec(&self, ns: &str, k1: &str) -> Vec<u8> {
        self.root.pack(&("rec", ns, k1))
    }

    fn encode_commit(&self, set: &SetKey, commit: &Commit) -> Result<Encoded, StoreError> {
        let s = set.as_str();
        let mut writes = Vec::new();
        for b in &commit.buckets {
            writes.push((
                self.root.pack(&("bucket", s, b.id.as_str())),
                encode_bucket(b)?,
            ));
        }
        for (id, c) in &commit.changes {
            writes.push((
                self.root.pack(&("change", s, id.as_str(), c.version)),
                super::encode_json(c)?,
            ));
        }
        let mut ops = Vec::new();
        for op in &commit.ops {
            ops.push((
                self.root.pack(&("op", s, op.op_id.as_str())),
                super::encode_json(op)?,
                self.root.pack(&("op_age", s, op.at_ms, op.op_id.as_str())),
            ));
        }
        let trims = commit
            .trim
            .changes_through
            .iter()
            .map(|(id, through)| {
                (
                    self.root.pack(&("change", s, id.as_str(), 0u64)),
                    self.root
                        .pack(&("change", s, id.as_str(), through.saturating_add(1))),
                )
            })
            .collect();
        Ok(Encoded {
            lease: self.root.pack(&("lease", s)),
            writes,
            ops,
            trims,
            count: self.root.pack(&("op_count", s)),
            retention: commit.trim.ops,
        })
    }

    fn rec2(&self, ns: &str, k1: &str, k2: &str) -> Vec<u8> {
        self.root.pack(&("rec", ns, k1, k2))
    }

    async fn get_json<T: DeserializeOwned + Send>(
        &self,
        what: &str,
        key: Vec<u8>,
    ) -> Result<Option<T>, StoreError> {
        let key = &key;
        self.run(what, |trx, _| async move {
            match trx.get(key).await? {
                Some(v) => Ok(Some(from_json(&v)?)),
                None => Ok(None),
            }
        })
        .await
    }

    async fn put_json<T: Serialize + Sync>(
        &self,
        what: &str,
        key: Vec<u8>,
        value: &T,
    ) -> Result<(), StoreError> {
        let key = &key;
        self.run(what, |trx, _| async move {
            trx.set(key, &to_json(value)?);
            Ok(())
        })
        .await
    }

    async fn list_json<T: DeserializeOwned + Send>(
        &self,
        what: &str,
        space: Subspace,
    ) -> Result<Vec<T>, StoreError> {
        let (space, page) = (&space, self.limits.range_page);
        self.run(what, |trx, _| async move {
            read_all(&*trx, space.range(), page)
                .await?
                .into_iter()
                .map(|(_, v)| from_json(&v))
                .collect()
        })
        .await
    }
}

#[async_trait]
impl<D: KvDatabase> Store for KvStore<D> {
    fn blob_kv(&self) -> Option<Arc<dyn super::blobs::BlobKv>> {
        Some(blobs::shared(self))
    }

    async fn load_set(&self, set: &SetKey) -> Result<Vec<Bucket>, StoreError> {
        let space = self.root.subspace(&("bucket", set.as_str()));
        let (range, page) = (&space.range(), self.limits.range_page);
        let rows = self
            .run("load_set", |trx, _| async move {
                read_all(&*trx, range.clone(), page).await
            })
            .await?;
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
        let key = &self.root.pack(&("lease", set.as_str()));
        let owner_key = &self.root.pack(&("lease_owner", set.as_str()));
        let (epoch, previous): (u64, Option<String>) = self
            .run_once("acquire_lease", |trx, _| async move {
                let current = match trx.get(key).await? {
                    Some(v) => decode_epoch(&v)?,
                    None => 0,
                };
                let previous = trx
                    .get(owner_key)
                    .await?
                    .map(|v| String::from_utf8_lossy(&v).into_owned());
                let next = current + 1;
                trx.set(key, &next.to_be_bytes());
                trx.set(owner_key, owner.as_bytes());
                Ok((next, previous))
            })
            .await?;
        Ok(Lease {
            epoch: Epoch(epoch),
            previous_owner: previous.filter(|p| p != owner),
        })
    }

    async fn lease_epoch(&self, set: &SetKey) -> Result<Option<Epoch>, StoreError> {
        let key = &self.root.pack(&("lease", set.as_str()));
        let epoch = self
            .run("lease_epoch", |trx, _| async move {
                match trx.get(key).await? {
                    Some(v) => Ok(Some(decode_epoch(&v)?)),
                    None => Ok(None),
                }
            })
            .await?;
        Ok(epoch.map(Epoch))
    }

    async fn commit(&self, set: &SetKey, epoch: Epoch, commit: Commit) -> Result<(), StoreError> {
        if let Some(batching) = &self.batching {
            return self.queue(batching)?.commit(set, epoch, commit).await;
        }
        // The writer tasks' handle: a batch of one, written at once.
        let encoded = self.encode_commit(set, &commit)?;
        let item = batch::Item {
            set,
            epoch,
            encoded: &encoded,
            ops: &commit.ops,
        };
        let decided = self.commit_batch(std::slice::from_ref(&item)).await?;
        match decided.into_iter().next() {
            Some(decision) => decision.answer(set, epoch),
            None => Err(StoreError::Backend(
                "FoundationDB: a batch of one commit answered nothing".into(),
            )),
        }
    }

    async fn history(
        &self,
        id: &BucketId,
        since_version: u64,
        limit: usize,
    ) -> Result<Option<HistoryPage>, StoreError> {
        let set = id.set_key();
        let bucket_key = &self.root.pack(&("bucket", set.as_str(), id.as_str()));
        let space = &self.root.subspace(&("change", set.as_str(), id.as_str()));
        self.run("history", |trx, _| async move {
            let Some(stored) = trx.get(bucket_key).await? else {
                return Ok(None);
            };
            let version = decode_bucket(id.as_str(), &stored).map_err(abort)?.version;
            let first = read_limited(&*trx, space.range(), 1).await?;
            let oldest = match first.first() {
                Some((k, _)) => Some(
                    space
                        .unpack::<u64>(k)
                        .map_err(|e| abort(StoreError::Corrupt(e.to_string())))?,
                ),
                None => None,
            };
            let range = (
                space.pack(&since_version.saturating_add(1)),
                space.range().1,
            );
            let rows = read_limited(&*trx, range, limit.saturating_add(1)).await?;
            let more = rows.len() > limit;
            let changes = rows
                .iter()
                .take(limit)
                .map(|(_, v)| from_json::<Change>(v))
                .collect::<Result<Vec<_>, _>>()?;
            Ok(Some(HistoryPage {
                version,
                oldest,
                changes,
                more,
            }))
        })
        .await
    }

    async fn get_device(&self, device_id: &str) -> Result<Option<DeviceRecord>, StoreError> {
        self.get_json("get_device", self.root.pack(&("device", device_id)))
            .await
    }

    async fn put_device(&self, record: DeviceRecord) -> Result<(), StoreError> {
        let key = self.root.pack(&("device", record.device_id.as_str()));
        self.put_json("put_device", key, &record).await
    }

    async fn get_assigned(&self, serial: &str) -> Result<Option<AssignedRecord>, StoreError> {
        self.get_json("get_assigned", self.rec("assigned", serial))
            .await
    }

    async fn swap_assigned(
        &self,
        serial: &str,
        expected: Option<[u8; 32]>,
        new: Option<AssignedRecord>,
    ) -> Result<bool, StoreError> {
        let (key, new) = (&self.rec("assigned", serial), &new);
        self.run_once("swap_assigned", |trx, _| async move {
            let current: Option<AssignedRecord> =
                trx.get(key).await?.map(|v| from_json(&v)).transpose()?;
            if current.map(|r| r.current_hash) != expected {
                return Ok(false);
            }
            match new {
                Some(r) => trx.set(key, &to_json(r)?),
                None => trx.clear(key),
            }
            Ok(true)
        })
        .await
    }

    async fn register_new(&self, devices: Vec<NewDevice>) -> Result<Vec<bool>, StoreError> {
        let mut encoded = Vec::with_capacity(devices.len());
        for d in &devices {
            let set = d.set()?;
            let s = set.as_str();
            let mut writes = Vec::new();
            for b in &d.buckets {
                writes.push((
                    self.root.pack(&("bucket", s, b.id.as_str())),
                    encode_bucket(b)?,
                ));
            }
            for (id, c) in &d.changes {
                writes.push((
                    self.root.pack(&("change", s, id.as_str(), c.version)),
                    super::encode_json(c)?,
                ));
            }
            encoded.push(EncodedNewDevice {
                set: s.to_string(),
                lease: self.root.pack(&("lease", s)),
                assigned: (self.rec("assigned", s), super::encode_json(&d.assigned)?),
                device_key: self.root.pack(&("device", s)),
                record: d.record.clone(),
                writes,
            });
        }
        let encoded = &encoded;
        // Marked: a retry after an unknown result would find its own leases and refuse
        // every device it wrote.
        self.run_once("register_new", |trx, _| async move {
            let mut seen = std::collections::HashSet::new();
            let mut written = Vec::with_capacity(encoded.len());
            for e in encoded {
                if !seen.insert(e.set.as_str())
                    || trx.get(&e.assigned.0).await?.is_some()
                    || trx.get(&e.lease).await?.is_some()
                {
                    written.push(false);
                    continue;
                }
                trx.set(&e.lease, &1u64.to_be_bytes());
                // No `lease_owner`: held by no node, so the first activation takes it
                // over from nobody.
                trx.set(&e.assigned.0, &e.assigned.1);
                let mut record = e.record.clone();
                if let Some(old) = trx.get(&e.device_key).await? {
                    record.first_seen_ms = from_json::<DeviceRecord>(&old)?.first_seen_ms;
                }
                trx.set(&e.device_key, &to_json(&record)?);
                for (k, v) in &e.writes {
                    trx.set(k, v);
                }
                written.push(true);
            }
            Ok(written)
        })
        .await
    }

    async fn get_user(&self, user_id: &str) -> Result<Option<UserRecord>, StoreError> {
        self.get_json("get_user", self.rec("user", user_id)).await
    }

    async fn create_user(&self, user: UserRecord) -> Result<bool, StoreError> {
        let (key, user) = (&self.rec("user", &user.user_id), &user);
        self.run_once("create_user", |trx, _| async move {
            if trx.get(key).await?.is_some() {
                return Ok(false);
            }
            trx.set(key, &to_json(user)?);
            Ok(true)
        })
        .await
    }

    async fn get_pairing(&self, device_id: &str) -> Result<Option<Pairing>, StoreError> {
        self.get_json("get_pairing", self.rec("pairing", device_id))
            .await
    }

    async fn set_pairing(
        &self,
        device_id: &str,
        pairing: Option<Pairing>,
    ) -> Result<Option<Pairing>, StoreError> {
        let key = &self.rec("pairing", device_id);
        let (root, pairing) = (&self.root, &pairing);
        self.run_once("set_pairing", |trx, _| async move {
            let old: Option<Pairing> = trx.get(key).await?.map(|v| from_json(&v)).transpose()?;
            if let Some(o) = &old {
                trx.clear(&root.pack(&("rec", "user_device", o.user_id.as_str(), device_id)));
            }
            match pairing {
                Some(p) => {
                    let body = to_json(p)?;
                    trx.set(key, &body);
                    trx.set(
                        &root.pack(&("rec", "user_device", p.user_id.as_str(), device_id)),
                        &body,
                    );
                }
                None => trx.clear(key),
            }
            Ok(old)
        })
        .await
    }

    async fn user_pairings(&self, user_id: &str) -> Result<Vec<Pairing>, StoreError> {
        self.list_json(
            "user_pairings",
            self.root.subspace(&("rec", "user_device", user_id)),
        )
        .await
    }

    async fn structure_owner(&self, structure: &str) -> Result<Option<String>, StoreError> {
        self.get_json("structure_owner", self.rec("structure", structure))
            .await
    }

    async fn claim_structure(&self, structure: &str, user_id: &str) -> Result<String, StoreError> {
        let key = &self.rec("structure", structure);
        let index = &self.rec2("user_structure", user_id, structure);
        // Idempotent: a retry after its own commit finds itself the owner.
        self.run("claim_structure", |trx, _| async move {
            if let Some(owner) = trx.get(key).await? {
                return from_json::<String>(&owner);
            }
            trx.set(key, &to_json(&user_id)?);
            trx.set(index, &to_json(&structure)?);
            Ok(user_id.to_string())
        })
        .await
    }

    async fn user_structures(&self, user_id: &str) -> Result<Vec<String>, StoreError> {
        self.list_json(
            "user_structures",
            self.root.subspace(&("rec", "user_structure", user_id)),
        )
        .await
    }

    async fn put_pairing_code(&self, code: PairingCode) -> Result<(), StoreError> {
        let key = &self.rec("code", &code.code);
        let index = &self.rec("device_code", &code.device_id);
        let (root, code) = (&self.root, &code);
        // Idempotent: a retried attempt finds its own code in the index and rewrites it.
        self.run("put_pairing_code", |trx, _| async move {
            // The device's previous code, removed only if it is still that device's.
            if let Some(old) = trx.get(index).await? {
                let old: String = from_json(&old)?;
                if old != code.code {
                    let old_key = root.pack(&("rec", "code", old.as_str()));
                    if let Some(v) = trx.get(&old_key).await? {
                        let c: PairingCode = from_json(&v)?;
                        if c.device_id == code.device_id {
                            trx.clear(&old_key);
                        }
                    }
                }
            }
            trx.set(index, &to_json(&code.code)?);
            trx.set(key, &to_json(code)?);
            Ok(())
        })
        .await
    }

    async fn take_pairing_code(&self, code: &str) -> Result<Option<PairingCode>, StoreError> {
        let key = &self.rec("code", code);
        self.run_once("take_pairing_code", |trx, _| async move {
            let found = trx.get(key).await?.map(|v| from_json(&v)).transpose()?;
            trx.clear(key);
            Ok(found)
        })
        .await
    }

    async fn close(&self) -> Result<(), StoreError> {
        // Every acknowledged write was committed by FDB before its answer; queued commits
        // are written (or failed) before the close returns.
        if let Some(queue) = self.batching.as_ref().and_then(|b| b.queue.get()) {
            queue.close().await;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
