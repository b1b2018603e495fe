//! Embedded store on redb, with group commit and a write-ahead log.
//!
//! All writes go through one writer thread. It takes every request waiting in its queue
//! and applies them in one write transaction. A batch of bucket commits is written to the
//! write-ahead log ([`wal`]) and then committed to redb without a sync; a syncer thread
//! syncs the log meanwhile, once for every batch written since its last sync. A batch's
//! requests are answered once both its sync and its commit are done: by the syncer, or by
//! the writer when the sync finished first and no earlier answers wait; the writer goes on
//! with the next batch. Every other write, and a checkpoint at least every
//! [`CHECKPOINT_EVERY`], commits redb durably. Under load many PUTs share an fsync; idle, a
//! PUT costs exactly one. Requests are answered in the order the writer took them, each
//! once it is durable (those of a failed batch at once, with the error). Reads use redb's
//! MVCC read transactions on the store's reader threads ([`Readers`]); a read that saw a
//! batch not yet synced waits for the sync ([`Horizon`]) off those threads, so nothing a
//! crash could take back is ever returned and a read waiting for a sync holds no thread.

use std::collections::VecDeque;
use std::fs::File;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use redb::{Database, Durability, ReadableDatabase, ReadableTable, Table, TableDefinition};
use serde::Serialize;
use tether_proto::synclog::{Change, OpRecord};
use tether_proto::{Bucket, BucketId, SetKey};
use tokio::sync::{oneshot, watch};

use super::{
    decode_bucket, decode_json, encode_bucket, encode_json, AssignedRecord, Commit, DeviceRecord,
    Epoch, HistoryPage, Lease, NewDevice, OpRetention, Pairing, PairingCode, Store, StoreError,
    UserRecord,
};
use crate::metrics::Metrics;

mod wal;

/// (set key, bucket id) → encoded bucket.
const BUCKETS: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("buckets");
/// set key → current lease epoch.
const LEASES: TableDefinition<&str, u64> = TableDefinition::new("leases");
/// The node holding each set's lease (next to its epoch in `LEASES`).
const LEASE_OWNERS: TableDefinition<&str, &str> = TableDefinition::new("lease_owners");
/// device id → encoded registration record.
const DEVICES: TableDefinition<&str, &[u8]> = TableDefinition::new("devices");
/// The sync log: (set key, bucket id, version) → JSON change.
const CHANGES: TableDefinition<(&str, &str, u64), &[u8]> = TableDefinition::new("changes");
/// Remembered op ids: (set key, op id) → JSON op record.
const OPS: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("ops");
/// The same op ids by age, for retention: (set key, handled at ms, op id).
const OP_AGE: TableDefinition<(&str, u64, &str), ()> = TableDefinition::new("op_age");
/// How many op ids each set remembers (the rows of `OPS` under it).
const OP_COUNT: TableDefinition<&str, u64> = TableDefinition::new("op_count");

/// Credentials, users, pairings, structures, pairing codes: `<namespace>/<key>` → JSON.
const RECORDS: TableDefinition<&str, &[u8]> = TableDefinition::new("records");

/// Blobs (`store::blobs`): their keyspace, key → bytes.
const BLOBS: TableDefinition<&str, &[u8]> = TableDefinition::new("blobs");

/// The store's own bookkeeping: [`WAL_SEQ`] → the last batch given to the write-ahead log.
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// Key in [`META`]: the write-ahead log's batches up to this one are in redb.
const WAL_SEQ: &str = "wal_seq";

/// Longest time batches stay only in the write-ahead log before redb is committed durably.
pub const CHECKPOINT_EVERY: Duration = Duration::from_secs(1);
/// Size of the write-ahead log that brings the checkpoint sooner.
const CHECKPOINT_BYTES: u64 = 16 << 20;

/// Most requests folded into one transaction.
const MAX_BATCH: usize = 1024;

/// Longest a read waits for the sync of a batch it saw (one fsync, unless the disk fails).
const READ_WAIT: Duration = Duration::from_secs(10);

/// How far the writer's logged transactions are durable. The writer counts each one just
/// before it commits it to redb, so a read that sees it also sees the count; the syncer
/// (or a checkpoint) moves the durable count past it. A read waits until everything
/// counted when it finished is durable.
#[derive(Debug)]
struct Horizon {
    /// Logged transactions committed (or about to be) to redb.
    committed: AtomicU64,
    /// How many of them are durable, watched by the reads that wait for them.
    durable: watch::Sender<u64>,
}

impl Default for Horizon {
    fn default() -> Self {
        Horizon {
            committed: AtomicU64::new(0),
            durable: watch::Sender::new(0),
        }
    }
}

impl Horizon {
    /// Counts a logged transaction about to commit; its number.
    fn count(&self) -> u64 {
        self.committed.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// The logged transactions counted so far: what a read that has finished could have
    /// seen.
    fn seen(&self) -> u64 {
        self.committed.load(Ordering::SeqCst)
    }

    /// The first `n` logged transactions are durable.
    fn durable_through(&self, n: u64) {
        self.durable.send_if_modified(|durable| {
            if n > *durable {
                *durable = n;
                true
            } else {
                false
            }
        });
    }

    /// Whether the first `n` logged transactions are durable.
    fn is_durable(&self, n: u64) -> bool {
        *self.durable.borrow() >= n
    }

    /// After a durable redb commit: every logged transaction before it is durable.
    fn all_durable(&self) {
        self.durable_through(self.seen());
    }

    /// Waits until the first `seen` logged transactions are durable, at most `limit`.
    async fn wait(&self, seen: u64, limit: Duration) -> Result<(), StoreError> {
        if self.is_durable(seen) {
            return Ok(());
        }
        let mut durable = self.durable.subscribe();
        let synced = tokio::time::timeout(limit, durable.wait_for(|&n| n >= seen))
            .await
            .is_ok_and(|synced| synced.is_ok());
        // The sender lives as long as `self`: only the limit ends the wait unsynced.
        if synced {
            Ok(())
        } else {
            Err(backend(format!(
                "a write this read saw is not durable after {limit:?}"
            )))
        }
    }
}

/// The store's reader threads, one per core, taking reads from one queue. A read is a redb
/// read transaction over cached pages or the operating system's page cache: more threads
/// would not read faster. On the runtime's blocking pool a burst of activations started a
/// thread for each read in flight (≈ 200 at a 1,200 devices/s ramp), and each thread a
/// malloc arena that the process keeps for its life.
#[derive(Debug, Clone)]
struct Readers {
    jobs: crossbeam_channel::Sender<Box<dyn FnOnce() + Send>>,
}

impl Readers {
    /// How many readers run: one per core (two when the count is unknown).
    fn count() -> usize {
        thread::available_parallelism().map_or(2, std::num::NonZeroUsize::get)
    }

    /// Starts [`Readers::count`] readers; they end when the last handle is dropped.
    fn start() -> Result<Self, StoreError> {
        let (jobs, queue) = crossbeam_channel::unbounded::<Box<dyn FnOnce() + Send>>();
        for n in 0..Self::count() {
            let queue = queue.clone();
            thread::Builder::new()
                .name(format!("tether-redb-read-{n}"))
                .spawn(move || {
                    for job in queue {
                        // A read that panics (a redb bug, a page it cannot decode) is
                        // answered with an error (its reply dropped); the reader goes on.
                        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(job)).is_err() {
                            tracing::error!("a store read panicked");
                        }
                    }
                })
                .map_err(backend)?;
        }
        Ok(Readers { jobs })
    }

    /// Runs `read` on a reader thread; its result.
    async fn run<T: Send + 'static>(
        &self,
        read: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.jobs
            .send(Box::new(move || {
                // Not run for a request that stopped waiting while it queued (a deadline
                // passed, the client left): under overload the queue sheds those.
                if !reply.is_closed() {
                    // It may stop waiting meanwhile.
                    let _ = reply.send(read());
                }
            }))
            .map_err(|_| backend("the store's readers have stopped"))?;
        answer
            .await
            .map_err(|_| backend("a store read ended without an answer"))
    }
}

fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(e.to_string())
}

/// Decides, inside the write transaction, whether a conditional record write goes ahead.
type Guard = Box<dyn FnOnce(Option<&[u8]>) -> bool + Send>;

/// Derives record writes from a record's current value, inside the write transaction.
type Compute =
    Box<dyn FnOnce(Option<&[u8]>) -> Result<Vec<(String, Option<Vec<u8>>)>, StoreError> + Send>;

enum WriteOp {
    /// Writes (`Some`) or deletes (`None`) records, all or nothing, if `guard` approves the
    /// current value of its key.
    Records {
        guard: Option<(String, Guard)>,
        writes: Vec<(String, Option<Vec<u8>>)>,
        reply: oneshot::Sender<Result<bool, StoreError>>,
    },
    /// Stores a pairing code, removing the device's previous one.
    PutCode {
        code: PairingCode,
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
    /// Deletes a record and returns what it held.
    Take {
        key: String,
        reply: oneshot::Sender<Result<Option<Vec<u8>>, StoreError>>,
    },
    /// Reads `key` and, in the same transaction, applies the writes `compute` derives from
    /// its value; returns the value read.
    Compute {
        key: String,
        compute: Compute,
        reply: oneshot::Sender<Result<Option<Vec<u8>>, StoreError>>,
    },
    Commit {
        set: SetKey,
        epoch: Epoch,
        commit: Commit,
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
    Lease {
        set: SetKey,
        owner: String,
        reply: oneshot::Sender<Result<Lease, StoreError>>,
    },
    Device {
        record: DeviceRecord,
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
    /// First contacts ([`Store::register_new`]).
    Register {
        devices: Vec<NewDevice>,
        reply: oneshot::Sender<Result<Vec<bool>, StoreError>>,
    },
    Close {
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
}

/// The embedded single-node store.
#[derive(Debug, Clone)]
pub struct RedbStore {
    db: Arc<Database>,
    writer: mpsc::Sender<WriteOp>,
    horizon: Arc<Horizon>,
    readers: Readers,
    /// Held by a test to keep the syncer from syncing the log.
    #[cfg(test)]
    syncer_hold: Arc<tokio::sync::Mutex<()>>,
}

/// The page cache of the embedded store unless configured (`--store-cache-mib`): redb's
/// own default is 1 GiB, and its cache keeps every page written until it is full, so a
/// node's memory grew with its fleet (≈ 1.9 KB per registered device at 18,000). The
/// pages a request needs are few (a set's buckets, the B-tree's upper levels); the
/// operating system's page cache keeps the file's other pages.
pub const DEFAULT_CACHE_BYTES: usize = 8 << 20;

impl RedbStore {
    /// Opens (or creates) `<dir>/tether.redb` with the default page cache
    /// ([`DEFAULT_CACHE_BYTES`]) and starts the writer thread.
    pub fn open(dir: &Path, metrics: Metrics) -> Result<Self, StoreError> {
        Self::open_with_cache(dir, metrics, DEFAULT_CACHE_BYTES)
    }

    /// Bytes in the page cache now (counted only with redb's `cache_metrics` feature,
    /// which the tests turn on).
    #[cfg(test)]
    pub(crate) fn cache_used_bytes(&self) -> usize {
        self.db.cache_stats().used_bytes()
    }

    /// [`RedbStore::open`] with a page cache of `cache_bytes`.
    pub fn open_with_cache(
        dir: &Path,
        metrics: Metrics,
        cache_bytes: usize,
    ) -> Result<Self, StoreError> {
        Self::open_with(dir, metrics, cache_bytes, CHECKPOINT_EVERY)
    }

    /// [`RedbStore::open_with_cache`], checkpointing every `checkpoint_every` (tests make it
    /// long, so that what the log alone holds stays there until they look).
    fn open_with(
        dir: &Path,
        metrics: Metrics,
        cache_bytes: usize,
        checkpoint_every: Duration,
    ) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| backend(format!("creating {}: {e}", dir.display())))?;
        let path = dir.join("tether.redb");
        let db = Database::builder()
            .set_cache_size(cache_bytes)
            .create(&path)
            .map_err(|e| backend(format!("opening {}: {e}", path.display())))?;
        let wal_path = dir.join("tether.wal");
        let (mut wal, logged) = wal::Wal::open(&wal_path)
            .map_err(|e| backend(format!("opening {}: {e}", wal_path.display())))?;
        let txn = db.begin_write().map_err(backend)?;
        let (seq, replayed) = replay(&txn, logged)?;
        {
            txn.open_table(BUCKETS).map_err(backend)?;
            txn.open_table(LEASES).map_err(backend)?;
            txn.open_table(LEASE_OWNERS).map_err(backend)?;
            txn.open_table(DEVICES).map_err(backend)?;
            txn.open_table(RECORDS).map_err(backend)?;
            txn.open_table(CHANGES).map_err(backend)?;
            txn.open_table(OPS).map_err(backend)?;
            txn.open_table(OP_AGE).map_err(backend)?;
            txn.open_table(OP_COUNT).map_err(backend)?;
            txn.open_table(BLOBS).map_err(backend)?;
        }
        txn.commit().map_err(backend)?;
        wal.reset();
        if replayed > 0 {
            tracing::info!(
                batches = replayed,
                through = seq,
                "applied the write-ahead log's batches that were not yet in the store"
            );
        }
        let db = Arc::new(db);
        let horizon = Arc::new(Horizon::default());
        let log = wal
            .sync_handle()
            .map_err(|e| backend(format!("opening {}: {e}", wal_path.display())))?;
        let (to_syncer, pending) = mpsc::channel();
        #[cfg(test)]
        let syncer_hold = Arc::new(tokio::sync::Mutex::new(()));
        let with_syncer = Arc::new(AtomicU64::new(0));
        let syncer = Syncer {
            log,
            horizon: horizon.clone(),
            with_syncer: with_syncer.clone(),
            metrics: metrics.clone(),
            #[cfg(test)]
            hold: syncer_hold.clone(),
        };
        let syncer = thread::Builder::new()
            .name("tether-redb-syncer".into())
            .spawn(move || syncer.run(&pending))
            .map_err(backend)?;
        let (tx, rx) = mpsc::channel();
        let writer = Writer {
            db: db.clone(),
            wal,
            record: Vec::new(),
            horizon: horizon.clone(),
            syncer: Some((to_syncer, syncer)),
            with_syncer,
            next_seq: seq + 1,
            stored_seq: seq,
            last_checkpoint: Instant::now(),
            checkpoint_every,
            must_checkpoint: false,
            metrics,
        };
        thread::Builder::new()
            .name("tether-redb-writer".into())
            .spawn(move || writer_loop(writer, &rx))
            .map_err(backend)?;
        Ok(RedbStore {
            db,
            writer: tx,
            horizon,
            readers: Readers::start()?,
            #[cfg(test)]
            syncer_hold,
        })
    }

    /// Runs the read `f` on a reader thread; its answer once what it saw is durable.
    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Database) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let db = self.db.clone();
        let horizon = self.horizon.clone();
        let ran = self
            .readers
            .run(move || f(&db).map(|read| (read, horizon.seen())))
            .await?;
        self.once_durable(ran).await
    }

    /// Runs `f`, a write transaction of its own, on the runtime's blocking pool (it waits
    /// for the writer's transaction, which must not keep a reader from reading); its answer
    /// once what it saw is durable.
    async fn transact<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Database) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let db = self.db.clone();
        let horizon = self.horizon.clone();
        let ran = tokio::task::spawn_blocking(move || f(&db).map(|done| (done, horizon.seen())))
            .await
            .map_err(backend)?;
        self.once_durable(ran).await
    }

    /// What a read or transaction `ran` to, with the logged transactions it could have
    /// seen, once those are durable.
    async fn once_durable<T>(&self, ran: Result<(T, u64), StoreError>) -> Result<T, StoreError> {
        let (answer, seen) = ran?;
        self.horizon.wait(seen, READ_WAIT).await?;
        Ok(answer)
    }

    async fn write<T>(
        &self,
        op: impl FnOnce(oneshot::Sender<Result<T, StoreError>>) -> WriteOp,
    ) -> Result<T, StoreError> {
        let (tx, rx) = oneshot::channel();
        self.writer.send(op(tx)).map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }
}

fn to_json<T: Serialize>(v: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(v).map_err(|e| StoreError::Corrupt(e.to_string()))
}

fn from_json<T: serde::de::DeserializeOwned>(key: &str, bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt(format!("{key}: {e}")))
}

impl RedbStore {
    async fn record<T: serde::de::DeserializeOwned + Send + 'static>(
        &self,
        key: String,
    ) -> Result<Option<T>, StoreError> {
        self.read(move |db| {
            let txn = db.begin_read().map_err(backend)?;
            let table = txn.open_table(RECORDS).map_err(backend)?;
            let value = table.get(key.as_str()).map_err(backend)?;
            value.map(|v| from_json(&key, v.value())).transpose()
        })
        .await
    }

    async fn records_under<T: serde::de::DeserializeOwned + Send + 'static>(
        &self,
        prefix: String,
    ) -> Result<Vec<T>, StoreError> {
        self.read(move |db| {
            let txn = db.begin_read().map_err(backend)?;
            let table = txn.open_table(RECORDS).map_err(backend)?;
            let mut out = Vec::new();
            for entry in table.range(prefix.as_str()..).map_err(backend)? {
                let (k, v) = entry.map_err(backend)?;
                if !k.value().starts_with(prefix.as_str()) {
                    break;
                }
                out.push(from_json(k.value(), v.value())?);
            }
            Ok(out)
        })
        .await
    }

    async fn write_records(
        &self,
        guard: Option<(String, Guard)>,
        writes: Vec<(String, Option<Vec<u8>>)>,
    ) -> Result<bool, StoreError> {
        self.write(|reply| WriteOp::Records {
            guard,
            writes,
            reply,
        })
        .await
    }
}

/// Pending answers of one batch, sent only after the transaction committed.
enum Reply {
    Unit(
        oneshot::Sender<Result<(), StoreError>>,
        Result<(), StoreError>,
    ),
    Lease(
        oneshot::Sender<Result<Lease, StoreError>>,
        Result<Lease, StoreError>,
    ),
    Bool(
        oneshot::Sender<Result<bool, StoreError>>,
        Result<bool, StoreError>,
    ),
    Bytes(
        oneshot::Sender<Result<Option<Vec<u8>>, StoreError>>,
        Result<Option<Vec<u8>>, StoreError>,
    ),
    Flags(
        oneshot::Sender<Result<Vec<bool>, StoreError>>,
        Result<Vec<bool>, StoreError>,
    ),
}

impl Reply {
    fn fail(self, e: &StoreError) {
        // A dropped receiver means the requester gave up; nothing to tell it.
        match self {
            Reply::Unit(tx, _) => drop(tx.send(Err(e.clone()))),
            Reply::Lease(tx, _) => drop(tx.send(Err(e.clone()))),
            Reply::Bool(tx, _) => drop(tx.send(Err(e.clone()))),
            Reply::Bytes(tx, _) => drop(tx.send(Err(e.clone()))),
            Reply::Flags(tx, _) => drop(tx.send(Err(e.clone()))),
        }
    }
    fn send(self) {
        match self {
            Reply::Unit(tx, r) => drop(tx.send(r)),
            Reply::Lease(tx, r) => drop(tx.send(r)),
            Reply::Bool(tx, r) => drop(tx.send(r)),
            Reply::Bytes(tx, r) => drop(tx.send(r)),
            Reply::Flags(tx, r) => drop(tx.send(r)),
        }
    }
}

type Str = &'static str;
type Raw = &'static [u8];

/// The tables one write transaction's operations use, each opened at its first use and
/// kept open to the end of the batch. Opening a table looks it up in redb's table tree and
/// closing it writes its root back; a batch of commits did both for three to six tables
/// per commit, ≈ 14 % of the writer thread's time under saturated PUTs.
struct Tables<'t> {
    txn: &'t redb::WriteTransaction,
    buckets: Option<Table<'t, (Str, Str), Raw>>,
    leases: Option<Table<'t, Str, u64>>,
    lease_owners: Option<Table<'t, Str, Str>>,
    devices: Option<Table<'t, Str, Raw>>,
    changes: Option<Table<'t, (Str, Str, u64), Raw>>,
    ops: Option<Table<'t, (Str, Str), Raw>>,
    op_age: Option<Table<'t, (Str, u64, Str), ()>>,
    op_count: Option<Table<'t, Str, u64>>,
    records: Option<Table<'t, Str, Raw>>,
}

impl<'t> Tables<'t> {
    fn new(txn: &'t redb::WriteTransaction) -> Self {
        Tables {
            txn,
            buckets: None,
            leases: None,
            lease_owners: None,
            devices: None,
            changes: None,
            ops: None,
            op_age: None,
            op_count: None,
            records: None,
        }
    }
}

/// The table in `slot`, opened in `txn` if it is not yet. Fields are passed one by one so
/// that a caller can hold several tables at once.
fn open<'a, 't, K: redb::Key + 'static, V: redb::Value + 'static>(
    txn: &'t redb::WriteTransaction,
    slot: &'a mut Option<Table<'t, K, V>>,
    definition: TableDefinition<'static, K, V>,
) -> Result<&'a mut Table<'t, K, V>, StoreError> {
    if slot.is_none() {
        *slot = Some(txn.open_table(definition).map_err(backend)?);
    }
    slot.as_mut()
        .ok_or_else(|| backend(format!("table {definition} not open")))
}

fn apply(t: &mut Tables<'_>, op: WriteOp, replies: &mut Vec<Reply>) -> Result<(), StoreError> {
    match op {
        WriteOp::Commit {
            set,
            epoch,
            commit,
            reply,
        } => {
            let current = open(t.txn, &mut t.leases, LEASES)?
                .get(set.as_str())
                .map_err(backend)?
                .map(|g| g.value());
            if current != Some(epoch.0) {
                let e = StoreError::Fenced {
                    set: set.to_string(),
                    epoch: epoch.0,
                };
                replies.push(Reply::Unit(reply, Err(e)));
                return Ok(());
            }
            // Checked before anything is written, so a known op id writes nothing.
            let known = known_ops(t, &set, &commit.ops)?;
            if !known.is_empty() {
                replies.push(Reply::Unit(reply, Err(StoreError::OpsKnown(known))));
                return Ok(());
            }
            write_commit(t, &set, &commit)?;
            replies.push(Reply::Unit(reply, Ok(())));
        }
        WriteOp::Lease { set, owner, reply } => {
            let table = open(t.txn, &mut t.leases, LEASES)?;
            let next = table
                .get(set.as_str())
                .map_err(backend)?
                .map_or(0, |g| g.value())
                + 1;
            table.insert(set.as_str(), next).map_err(backend)?;
            let previous = open(t.txn, &mut t.lease_owners, LEASE_OWNERS)?
                .insert(set.as_str(), owner.as_str())
                .map_err(backend)?
                .map(|g| g.value().to_string())
                .filter(|p| *p != owner);
            replies.push(Reply::Lease(
                reply,
                Ok(Lease {
                    epoch: Epoch(next),
                    previous_owner: previous,
                }),
            ));
        }
        WriteOp::Device { record, reply } => {
            let bytes =
                serde_json::to_vec(&record).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            open(t.txn, &mut t.devices, DEVICES)?
                .insert(record.device_id.as_str(), bytes.as_slice())
                .map_err(backend)?;
            replies.push(Reply::Unit(reply, Ok(())));
        }
        WriteOp::Register { devices, reply } => {
            let written = register_new(t, &devices)?;
            replies.push(Reply::Flags(reply, Ok(written)));
        }
        WriteOp::Records {
            guard,
            writes,
            reply,
        } => {
            let table = open(t.txn, &mut t.records, RECORDS)?;
            if let Some((key, check)) = guard {
                let current = table
                    .get(key.as_str())
                    .map_err(backend)?
                    .map(|g| g.value().to_vec());
                if !check(current.as_deref()) {
                    replies.push(Reply::Bool(reply, Ok(false)));
                    return Ok(());
                }
            }
            for (key, value) in writes {
                match value {
                    Some(v) => table.insert(key.as_str(), v.as_slice()).map_err(backend)?,
                    None => table.remove(key.as_str()).map_err(backend)?,
                };
            }
            replies.push(Reply::Bool(reply, Ok(true)));
        }
        WriteOp::Compute {
            key,
            compute,
            reply,
        } => {
            let table = open(t.txn, &mut t.records, RECORDS)?;
            let current = table
                .get(key.as_str())
                .map_err(backend)?
                .map(|g| g.value().to_vec());
            match compute(current.as_deref()) {
                Ok(writes) => {
                    for (k, v) in writes {
                        match v {
                            Some(v) => table.insert(k.as_str(), v.as_slice()).map_err(backend)?,
                            None => table.remove(k.as_str()).map_err(backend)?,
                        };
                    }
                    replies.push(Reply::Bytes(reply, Ok(current)));
                }
                Err(e) => replies.push(Reply::Bytes(reply, Err(e))),
            }
        }
        WriteOp::PutCode { code, reply } => {
            let table = open(t.txn, &mut t.records, RECORDS)?;
            let index = format!("device_code/{}", code.device_id);
            let previous: Option<String> = table
                .get(index.as_str())
                .map_err(backend)?
                .map(|g| from_json(&index, g.value()))
                .transpose()?;
            if let Some(old) = previous {
                let old_key = format!("code/{old}");
                let theirs = table
                    .get(old_key.as_str())
                    .map_err(backend)?
                    .map(|g| from_json::<PairingCode>(&old_key, g.value()))
                    .transpose()?
                    .is_some_and(|c| c.device_id == code.device_id);
                if theirs {
                    table.remove(old_key.as_str()).map_err(backend)?;
                }
            }
            table
                .insert(index.as_str(), to_json(&code.code)?.as_slice())
                .map_err(backend)?;
            let key = format!("code/{}", code.code);
            table
                .insert(key.as_str(), to_json(&code)?.as_slice())
                .map_err(backend)?;
            replies.push(Reply::Unit(reply, Ok(())));
        }
        WriteOp::Take { key, reply } => {
            let table = open(t.txn, &mut t.records, RECORDS)?;
            let old = table
                .remove(key.as_str())
                .map_err(backend)?
                .map(|g| g.value().to_vec());
            replies.push(Reply::Bytes(reply, Ok(old)));
        }
        // Handled by the writer loop itself.
        WriteOp::Close { reply } => replies.push(Reply::Unit(reply, Ok(()))),
    }
    Ok(())
}

/// First contacts in the caller's transaction: a device with no assigned credentials
/// whose set has no lease gets its lease (epoch 1), credentials, buckets, changes and
/// device record; any other writes nothing.
fn register_new(t: &mut Tables<'_>, devices: &[NewDevice]) -> Result<Vec<bool>, StoreError> {
    let records = open(t.txn, &mut t.records, RECORDS)?;
    let leases = open(t.txn, &mut t.leases, LEASES)?;
    let device_table = open(t.txn, &mut t.devices, DEVICES)?;
    let buckets = open(t.txn, &mut t.buckets, BUCKETS)?;
    let changes = open(t.txn, &mut t.changes, CHANGES)?;
    let mut written = Vec::with_capacity(devices.len());
    for d in devices {
        let set = d.set()?;
        let s = set.as_str();
        let key = format!("assigned/{s}");
        if records.get(key.as_str()).map_err(backend)?.is_some()
            || leases.get(s).map_err(backend)?.is_some()
        {
            written.push(false);
            continue;
        }
        // Held by no node (no owner row): the first activation takes it over from nobody.
        leases.insert(s, 1).map_err(backend)?;
        records
            .insert(key.as_str(), to_json(&d.assigned)?.as_slice())
            .map_err(backend)?;
        let mut record = d.record.clone();
        if let Some(old) = device_table.get(s).map_err(backend)? {
            let old: DeviceRecord = from_json(s, old.value())?;
            record.first_seen_ms = old.first_seen_ms;
        }
        device_table
            .insert(s, to_json(&record)?.as_slice())
            .map_err(backend)?;
        for b in &d.buckets {
            buckets
                .insert((s, b.id.as_str()), encode_bucket(b)?.as_slice())
                .map_err(backend)?;
        }
        for (id, c) in &d.changes {
            changes
                .insert((s, id.as_str(), c.version), encode_json(c)?.as_slice())
                .map_err(backend)?;
        }
        written.push(true);
    }
    Ok(written)
}

/// The records of the op ids in `ops` that the set already remembers.
fn known_ops(
    t: &mut Tables<'_>,
    set: &SetKey,
    ops: &[OpRecord],
) -> Result<Vec<OpRecord>, StoreError> {
    if ops.is_empty() {
        return Ok(Vec::new());
    }
    let table = open(t.txn, &mut t.ops, OPS)?;
    let mut known = Vec::new();
    for op in ops {
        if let Some(v) = table
            .get((set.as_str(), op.op_id.as_str()))
            .map_err(backend)?
        {
            known.push(decode_json(&op.op_id, v.value())?);
        }
    }
    Ok(known)
}

/// Buckets, their changes, op ids and retention of one commit, in the caller's transaction.
fn write_commit(t: &mut Tables<'_>, set: &SetKey, commit: &Commit) -> Result<(), StoreError> {
    let s = set.as_str();
    {
        let table = open(t.txn, &mut t.buckets, BUCKETS)?;
        for b in &commit.buckets {
            let bytes = encode_bucket(b)?;
            table
                .insert((s, b.id.as_str()), bytes.as_slice())
                .map_err(backend)?;
        }
    }
    {
        let changes = open(t.txn, &mut t.changes, CHANGES)?;
        for (id, c) in &commit.changes {
            let bytes = encode_json(c)?;
            changes
                .insert((s, id.as_str(), c.version), bytes.as_slice())
                .map_err(backend)?;
        }
        for (id, through) in &commit.trim.changes_through {
            changes
                .retain_in(
                    (s, id.as_str(), 0u64)..=(s, id.as_str(), *through),
                    |_, _| false,
                )
                .map_err(backend)?;
        }
    }
    if commit.ops.is_empty() && commit.trim.ops.is_none() {
        return Ok(());
    }
    let ops = open(t.txn, &mut t.ops, OPS)?;
    let age = open(t.txn, &mut t.op_age, OP_AGE)?;
    let count = open(t.txn, &mut t.op_count, OP_COUNT)?;
    let mut n = count.get(s).map_err(backend)?.map_or(0, |g| g.value());
    for op in &commit.ops {
        let bytes = encode_json(op)?;
        ops.insert((s, op.op_id.as_str()), bytes.as_slice())
            .map_err(backend)?;
        age.insert((s, op.at_ms, op.op_id.as_str()), ())
            .map_err(backend)?;
        n += 1;
    }
    if let Some(OpRetention {
        keep_last,
        keep_since_ms,
    }) = commit.trim.ops
    {
        // The oldest first, while more than `keep_last` remain and they are older than
        // `keep_since_ms`.
        let excess = n.saturating_sub(keep_last);
        let mut dropped: Vec<(u64, String)> = Vec::new();
        for entry in age
            .range((s, 0u64, "")..(s, keep_since_ms, ""))
            .map_err(backend)?
        {
            if dropped.len() as u64 >= excess {
                break;
            }
            let (k, _) = entry.map_err(backend)?;
            let (_, at, op_id) = k.value();
            dropped.push((at, op_id.to_string()));
        }
        for (at, op_id) in &dropped {
            age.remove((s, *at, op_id.as_str())).map_err(backend)?;
            ops.remove((s, op_id.as_str())).map_err(backend)?;
        }
        n -= dropped.len() as u64;
    }
    count.insert(s, n).map_err(backend)?;
    Ok(())
}

/// A logged batch: the commits of one write transaction, in order.
type LoggedBatch = Vec<(SetKey, Epoch, Commit)>;

/// Applies, in `txn`, the write-ahead log's batches that redb does not hold durably yet
/// (after a crash: they were acknowledged once their log record was synced). Each batch
/// meets the state it met the first time (the batches before it, nothing else: any other
/// write commits redb durably), so each commit is answered as it was then. Returns the
/// last batch's sequence number now in redb, and how many were applied.
fn replay(
    txn: &redb::WriteTransaction,
    logged: Vec<wal::Record>,
) -> Result<(u64, usize), StoreError> {
    let mut meta = txn.open_table(META).map_err(backend)?;
    let applied = meta.get(WAL_SEQ).map_err(backend)?.map_or(0, |g| g.value());
    let records = wal::to_replay(logged, applied).map_err(StoreError::Corrupt)?;
    let Some(last) = records.last().map(|r| r.seq) else {
        return Ok((applied, 0));
    };
    let mut replies = Vec::new();
    let mut tables = Tables::new(txn);
    for record in &records {
        let batch: LoggedBatch = serde_json::from_slice(&record.payload).map_err(|e| {
            StoreError::Corrupt(format!("write-ahead log batch {}: {e}", record.seq))
        })?;
        for (set, epoch, commit) in batch {
            let (reply, _) = oneshot::channel();
            apply(
                &mut tables,
                WriteOp::Commit {
                    set,
                    epoch,
                    commit,
                    reply,
                },
                &mut replies,
            )?;
        }
        replies.clear();
    }
    meta.insert(WAL_SEQ, last).map_err(backend)?;
    Ok((last, records.len()))
}

/// Builds in `record` the log record of a batch of commits alone ([`wal::begin`], then its
/// encoding); `false` for any other batch (it is committed to redb durably instead).
fn log_record(batch: &[WriteOp], record: &mut Vec<u8>) -> bool {
    let mut commits = Vec::with_capacity(batch.len());
    for op in batch {
        let WriteOp::Commit {
            set, epoch, commit, ..
        } = op
        else {
            return false;
        };
        commits.push((set, epoch, commit));
    }
    wal::begin(record);
    serde_json::to_writer(&mut *record, &commits).is_ok()
}

/// The largest record buffer the writer keeps between batches; a larger one (after a
/// batch of large values) is freed.
const RECORD_KEPT: usize = 1 << 20;

/// The writer thread's state.
struct Writer {
    db: Arc<Database>,
    wal: wal::Wal,
    /// The buffer each logged batch's record is encoded into, kept between batches.
    record: Vec<u8>,
    horizon: Arc<Horizon>,
    /// Where the syncs to make and the answers of each batch go, in order, and the thread
    /// that makes and sends them.
    syncer: Option<(mpsc::Sender<ToSyncer>, thread::JoinHandle<()>)>,
    /// Batches whose answers the syncer holds (not yet sent).
    with_syncer: Arc<AtomicU64>,
    /// The sequence number of the next logged batch.
    next_seq: u64,
    /// The last one written to [`META`] by a committed transaction.
    stored_seq: u64,
    last_checkpoint: Instant,
    checkpoint_every: Duration,
    /// Set after a failed logged batch: the next commit is a checkpoint, so the record it
    /// may have left in the log is never applied.
    must_checkpoint: bool,
    metrics: Metrics,
}

impl Writer {
    /// Whether redb does not yet hold durably all it has committed: batches only the log
    /// holds, or a failed logged batch whose record may be in the log.
    fn awaits_checkpoint(&self) -> bool {
        !self.wal.is_empty() || self.must_checkpoint
    }

    fn checkpoint_due(&self) -> bool {
        self.must_checkpoint
            || self.wal.len() >= CHECKPOINT_BYTES
            || self.last_checkpoint.elapsed() >= self.checkpoint_every
    }

    /// Applies `batch` in one transaction and commits it: durably (a checkpoint: everything
    /// before it becomes durable in redb too, and the log is emptied), or, for a batch of
    /// commits between checkpoints, by writing it to the log for the syncer to make
    /// durable. Its time is counted as the writer's busy time.
    fn commit(
        &mut self,
        batch: Vec<WriteOp>,
        replies: &mut Vec<Reply>,
        close_replies: &mut Vec<oneshot::Sender<Result<(), StoreError>>>,
    ) -> Result<Made, StoreError> {
        let started = Instant::now();
        let result = self.transact(batch, replies, close_replies);
        self.metrics.store_writer_busy(started.elapsed());
        result
    }

    fn transact(
        &mut self,
        batch: Vec<WriteOp>,
        replies: &mut Vec<Reply>,
        close_replies: &mut Vec<oneshot::Sender<Result<(), StoreError>>>,
    ) -> Result<Made, StoreError> {
        let logging = !self.checkpoint_due() && log_record(&batch, &mut self.record);
        let seq = if logging {
            self.next_seq
        } else {
            self.next_seq - 1
        };
        // A logged batch's record goes first, and the syncer syncs it while redb applies and
        // commits the batch: the record alone decides the batch (a replay applies it to the
        // state it met, fencing included), and its answers wait for both.
        let logged = if logging {
            // From here the batch's number is spent: if it fails, its record may be in
            // the log, and only a checkpoint (which stores a number past it) keeps it
            // from a replay.
            self.next_seq += 1;
            self.must_checkpoint = true;
            let written = self.wal.write_record(seq, &mut self.record);
            if self.record.capacity() > RECORD_KEPT {
                self.record = Vec::new();
            }
            written.map_err(|e| backend(format!("write-ahead log: {e}")))?;
            self.metrics.store_wal_bytes(self.wal.len());
            // Counted before redb commits it, so a read that sees it also sees the
            // count; the sync asked for now moves the durable count past it.
            let n = self.horizon.count();
            self.send(ToSyncer::Sync(n));
            Some(n)
        } else {
            None
        };
        let mut txn = self.db.begin_write().map_err(backend)?;
        if logged.is_some() {
            txn.set_durability(Durability::None).map_err(backend)?;
        }
        {
            let mut tables = Tables::new(&txn);
            for op in batch {
                match op {
                    WriteOp::Close { reply } => close_replies.push(reply),
                    op => apply(&mut tables, op, replies)?,
                }
            }
        }
        // A logged batch stores its number too, though only a durable commit outlives a
        // crash: a blob transaction commits durably beside this thread, taking every batch
        // committed before it into redb's durable state, and their number must go with them.
        if seq != self.stored_seq {
            txn.open_table(META)
                .map_err(backend)?
                .insert(WAL_SEQ, seq)
                .map_err(backend)?;
        }
        txn.commit().map_err(backend)?;
        self.stored_seq = seq;
        self.must_checkpoint = false;
        let Some(n) = logged else {
            // A checkpoint: everything logged before it is durable in redb now.
            self.horizon.all_durable();
            self.last_checkpoint = Instant::now();
            self.wal.reset();
            self.metrics.store_checkpoint();
            return Ok(Made::Durable);
        };
        Ok(Made::Logged(n))
    }

    /// Hands the syncer a sync to make or a batch's answers. Without a syncer (it only
    /// stops when the writer does) answers are dropped, and their requesters see the store
    /// closed.
    fn send(&self, message: ToSyncer) {
        if let Some((to_syncer, _)) = &self.syncer {
            drop(to_syncer.send(message));
        }
    }

    /// Answers a committed batch: at once if it is durable (its sync done while redb
    /// committed it) and the syncer holds no earlier answers, else through the syncer,
    /// which answers in order after the sync.
    fn answer(&self, batch: Pending) {
        let durable = batch.logged.is_none_or(|n| self.horizon.is_durable(n));
        if durable && self.with_syncer.load(Ordering::SeqCst) == 0 {
            batch.replies.into_iter().for_each(Reply::send);
            return;
        }
        self.with_syncer.fetch_add(1, Ordering::SeqCst);
        self.send(ToSyncer::Answer(batch));
    }

    /// Lets the syncer send what it holds, and waits for it to stop.
    fn stop_syncer(&mut self) {
        if let Some((to_syncer, thread)) = self.syncer.take() {
            drop(to_syncer);
            if thread.join().is_err() {
                tracing::error!("the store's syncer thread panicked");
            }
        }
    }

    /// A durable commit of nothing: what the log holds becomes durable in redb.
    fn checkpoint(&mut self) {
        if let Err(e) = self.commit(Vec::new(), &mut Vec::new(), &mut Vec::new()) {
            tracing::error!(error = %e, "store checkpoint failed; trying again in a while");
            // Not at once: the writer would spin on a store that keeps failing.
            self.last_checkpoint = Instant::now();
        }
    }
}

/// How a committed batch is durable.
enum Made {
    /// Now: a durable redb commit.
    Durable,
    /// At the log's next sync: the `n`th logged transaction.
    Logged(u64),
}

/// What the writer hands the syncer, in order.
enum ToSyncer {
    /// Sync the log through the `n`th logged transaction (its record is written; redb is
    /// committing it meanwhile).
    Sync(u64),
    /// A batch's answers, once redb has committed it (or failed to).
    Answer(Pending),
}

/// A committed batch's answers, for the syncer.
struct Pending {
    /// Its number if it is durable only once the log is synced.
    logged: Option<u64>,
    replies: Vec<Reply>,
}

/// The thread that syncs the write-ahead log and answers the writer's batches in order.
struct Syncer {
    log: File,
    horizon: Arc<Horizon>,
    /// Batches whose answers it holds, counted up by the writer.
    with_syncer: Arc<AtomicU64>,
    metrics: Metrics,
    /// Held by a test to keep the log from being synced.
    #[cfg(test)]
    hold: Arc<tokio::sync::Mutex<()>>,
}

impl Syncer {
    fn run(self, from_writer: &mpsc::Receiver<ToSyncer>) {
        // The log is synced through this logged transaction.
        let mut synced = 0;
        let mut waiting = VecDeque::new();
        while let Ok(first) = from_writer.recv() {
            let mut wanted = synced;
            for message in std::iter::once(first).chain(from_writer.try_iter()) {
                match message {
                    ToSyncer::Sync(n) => wanted = wanted.max(n),
                    ToSyncer::Answer(batch) => {
                        wanted = wanted.max(batch.logged.unwrap_or(0));
                        waiting.push_back(batch);
                    }
                }
            }
            // What the last sync covers is answered before the next one starts.
            self.answer(&mut waiting, synced);
            if wanted > synced {
                #[cfg(test)]
                let _held = self.hold.blocking_lock();
                if let Err(e) = self.log.sync_data() {
                    // The batches are committed in redb, later ones on top of them, and
                    // after a failed fsync the kernel may have dropped their pages: no
                    // answer is safe to give, and a restart replays what the log holds.
                    tracing::error!(error = %e, "syncing the write-ahead log failed; stopping the node");
                    eprintln!("tether: syncing the store's write-ahead log failed: {e}");
                    std::process::abort();
                }
                self.metrics.store_wal_sync();
                self.horizon.durable_through(wanted);
                synced = wanted;
            }
            self.answer(&mut waiting, synced);
        }
    }

    /// Sends, in order, the answers of the batches at the front that are durable.
    fn answer(&self, waiting: &mut VecDeque<Pending>, synced: u64) {
        while waiting
            .front()
            .is_some_and(|b| b.logged.is_none_or(|n| n <= synced))
        {
            if let Some(batch) = waiting.pop_front() {
                batch.replies.into_iter().for_each(Reply::send);
                self.with_syncer.fetch_sub(1, Ordering::SeqCst);
            }
        }
    }
}

fn writer_loop(mut writer: Writer, rx: &mpsc::Receiver<WriteOp>) {
    let mut close_replies = Vec::new();
    while close_replies.is_empty() {
        // Idle with batches only in the log: checkpoint when they are due.
        let first = if !writer.awaits_checkpoint() {
            rx.recv().map_err(|_| RecvTimeoutError::Disconnected)
        } else {
            let since = writer.last_checkpoint.elapsed();
            rx.recv_timeout(writer.checkpoint_every.saturating_sub(since))
        };
        let first = match first {
            Ok(op) => op,
            Err(RecvTimeoutError::Timeout) => {
                writer.checkpoint();
                continue;
            }
            Err(RecvTimeoutError::Disconnected) => {
                if writer.awaits_checkpoint() {
                    writer.checkpoint();
                }
                break;
            }
        };
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(op) => batch.push(op),
                Err(_) => break,
            }
        }
        let size = batch.len();
        let mut replies = Vec::with_capacity(size);
        let result = writer.commit(batch, &mut replies, &mut close_replies);
        writer.metrics.store_commit(size);
        match result {
            Ok(made) => writer.answer(Pending {
                logged: match made {
                    Made::Durable => None,
                    Made::Logged(n) => Some(n),
                },
                replies,
            }),
            Err(e) => {
                tracing::error!(error = %e, batch = size, "store commit failed; nothing in the batch was acknowledged");
                replies.into_iter().for_each(|r| r.fail(&e));
                // Requests of the batch not yet applied when the error hit are dropped with
                // their senders: their requesters see the store as closed, nothing acked.
            }
        }
    }
    // Every answer sent, and this thread's handle on the file released, before confirming
    // the close, so a caller that drops its store after `close()` can reopen the same
    // directory at once.
    writer.stop_syncer();
    drop(writer);
    for reply in close_replies {
        drop(reply.send(Ok(())));
    }
}

/// Blob transactions run on the blocking pool in write transactions of their own; redb
/// serializes them with the writer thread's.
#[async_trait]
impl super::blobs::BlobKv for RedbStore {
    async fn transact(
        &self,
        keys: Vec<String>,
        plan: super::blobs::Plan<Vec<u8>>,
    ) -> Result<Vec<u8>, StoreError> {
        use super::blobs::KvWrite;
        self.transact(move |db| {
            let txn = db.begin_write().map_err(backend)?;
            let answer = {
                let mut table = txn.open_table(BLOBS).map_err(backend)?;
                let mut values = Vec::with_capacity(keys.len());
                for k in &keys {
                    values.push(
                        table
                            .get(k.as_str())
                            .map_err(backend)?
                            .map(|g| g.value().to_vec()),
                    );
                }
                let (answer, writes) = plan(values)?;
                for w in writes {
                    match w {
                        KvWrite::Put(k, v) => {
                            table.insert(k.as_str(), v.as_slice()).map_err(backend)?;
                        }
                        KvWrite::Delete(k) => {
                            table.remove(k.as_str()).map_err(backend)?;
                        }
                        KvWrite::DeletePrefix(prefix) => {
                            // Keys are ASCII below DEL: this range is exactly the prefix's.
                            let end = format!("{prefix}\u{7f}");
                            table
                                .retain_in(prefix.as_str()..end.as_str(), |_, _| false)
                                .map_err(backend)?;
                        }
                    }
                }
                answer
            };
            txn.commit().map_err(backend)?;
            Ok(answer)
        })
        .await
    }

    async fn get(&self, key: String) -> Result<Option<Vec<u8>>, StoreError> {
        self.read(move |db| {
            let txn = db.begin_read().map_err(backend)?;
            let table = txn.open_table(BLOBS).map_err(backend)?;
            let value = table.get(key.as_str()).map_err(backend)?;
            Ok(value.map(|g| g.value().to_vec()))
        })
        .await
    }

    async fn scan(
        &self,
        prefix: String,
        after: Option<String>,
        limit: usize,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.read(move |db| {
            let txn = db.begin_read().map_err(backend)?;
            let table = txn.open_table(BLOBS).map_err(backend)?;
            let from = after.as_deref().unwrap_or(prefix.as_str());
            let mut out = Vec::new();
            for entry in table.range(from..).map_err(backend)? {
                let (k, v) = entry.map_err(backend)?;
                let key = k.value();
                if Some(key) == after.as_deref() {
                    continue;
                }
                if !key.starts_with(prefix.as_str()) || out.len() >= limit {
                    break;
                }
                out.push((key.to_string(), v.value().to_vec()));
            }
            Ok(out)
        })
        .await
    }
}

#[async_trait]
impl Store for RedbStore {
    fn blob_kv(&self) -> Option<Arc<dyn super::blobs::BlobKv>> {
        Some(Arc::new(self.clone()))
    }

    async fn load_set(&self, set: &SetKey) -> Result<Vec<Bucket>, StoreError> {
        let set = set.clone();
        self.read(move |db| {
            let txn = db.begin_read().map_err(backend)?;
            let table = txn.open_table(BUCKETS).map_err(backend)?;
            // Ids are ASCII below DEL, so this range is exactly the set's buckets.
            let range = table
                .range((set.as_str(), "")..(set.as_str(), "\u{7f}"))
                .map_err(backend)?;
            let mut out = Vec::new();
            for entry in range {
                let (k, v) = entry.map_err(backend)?;
                out.push(decode_bucket(k.value().1, v.value())?);
            }
            Ok(out)
        })
        .await
    }

    async fn acquire_lease(&self, set: &SetKey, owner: &str) -> Result<Lease, StoreError> {
        let set = set.clone();
        let owner = owner.to_string();
        self.write(|reply| WriteOp::Lease { set, owner, reply })
            .await
    }

    async fn lease_epoch(&self, set: &SetKey) -> Result<Option<Epoch>, StoreError> {
        let set = set.clone();
        self.read(move |db| {
            let txn = db.begin_read().map_err(backend)?;
            let table = txn.open_table(LEASES).map_err(backend)?;
            Ok(table
                .get(set.as_str())
                .map_err(backend)?
                .map(|g| Epoch(g.value())))
        })
        .await
    }

    async fn commit(&self, set: &SetKey, epoch: Epoch, commit: Commit) -> Result<(), StoreError> {
        let set = set.clone();
        self.write(|reply| WriteOp::Commit {
            set,
            epoch,
            commit,
            reply,
        })
        .await
    }

    async fn history(
        &self,
        id: &BucketId,
        since_version: u64,
        limit: usize,
    ) -> Result<Option<HistoryPage>, StoreError> {
        let id = id.clone();
        self.read(move |db| {
            let txn = db.begin_read().map_err(backend)?;
            let set = id.set_key();
            let (s, b) = (set.as_str(), id.as_str());
            let buckets = txn.open_table(BUCKETS).map_err(backend)?;
            let Some(stored) = buckets.get((s, b)).map_err(backend)? else {
                return Ok(None);
            };
            let version = decode_bucket(b, stored.value())?.version;
            let table = txn.open_table(CHANGES).map_err(backend)?;
            let oldest = table
                .range((s, b, 0u64)..=(s, b, u64::MAX))
                .map_err(backend)?
                .next()
                .transpose()
                .map_err(backend)?
                .map(|(k, _)| k.value().2);
            let mut changes = Vec::new();
            let mut more = false;
            for entry in table
                .range((s, b, since_version.saturating_add(1))..=(s, b, u64::MAX))
                .map_err(backend)?
            {
                if changes.len() >= limit {
                    more = true;
                    break;
                }
                let (_, v) = entry.map_err(backend)?;
                changes.push(decode_json::<Change>(b, v.value())?);
            }
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
        let id = device_id.to_string();
        self.read(move |db| {
            let txn = db.begin_read().map_err(backend)?;
            let table = txn.open_table(DEVICES).map_err(backend)?;
            match table.get(id.as_str()).map_err(backend)? {
                Some(v) => serde_json::from_slice(v.value())
                    .map(Some)
                    .map_err(|e| StoreError::Corrupt(e.to_string())),
                None => Ok(None),
            }
        })
        .await
    }

    async fn put_device(&self, record: DeviceRecord) -> Result<(), StoreError> {
        self.write(|reply| WriteOp::Device { record, reply }).await
    }

    async fn register_new(&self, devices: Vec<NewDevice>) -> Result<Vec<bool>, StoreError> {
        self.write(|reply| WriteOp::Register { devices, reply })
            .await
    }

    async fn get_assigned(&self, serial: &str) -> Result<Option<AssignedRecord>, StoreError> {
        self.record(format!("assigned/{serial}")).await
    }

    async fn swap_assigned(
        &self,
        serial: &str,
        expected: Option<[u8; 32]>,
        new: Option<AssignedRecord>,
    ) -> Result<bool, StoreError> {
        let key = format!("assigned/{serial}");
        let check_key = key.clone();
        let guard: Guard = Box::new(move |current| {
            let current_hash = current
                .and_then(|bytes| from_json::<AssignedRecord>(&check_key, bytes).ok())
                .map(|r| r.current_hash);
            current_hash == expected
        });
        let value = new.as_ref().map(to_json).transpose()?;
        self.write_records(Some((key.clone(), guard)), vec![(key, value)])
            .await
    }

    async fn get_user(&self, user_id: &str) -> Result<Option<UserRecord>, StoreError> {
        self.record(format!("user/{user_id}")).await
    }

    async fn create_user(&self, user: UserRecord) -> Result<bool, StoreError> {
        let key = format!("user/{}", user.user_id);
        let guard: Guard = Box::new(|current| current.is_none());
        self.write_records(
            Some((key.clone(), guard)),
            vec![(key, Some(to_json(&user)?))],
        )
        .await
    }

    async fn get_pairing(&self, device_id: &str) -> Result<Option<Pairing>, StoreError> {
        self.record(format!("pairing/{device_id}")).await
    }

    async fn set_pairing(
        &self,
        device_id: &str,
        pairing: Option<Pairing>,
    ) -> Result<Option<Pairing>, StoreError> {
        let key = format!("pairing/{device_id}");
        let device = device_id.to_string();
        let read_key = key.clone();
        // Read the old pairing and rewrite the user index in one transaction, so two
        // concurrent pairings cannot both leave an index entry behind.
        let compute: Compute = Box::new(move |current| {
            let mut writes = Vec::new();
            if let Some(old) = current
                .map(|b| from_json::<Pairing>(&read_key, b))
                .transpose()?
            {
                writes.push((format!("user_device/{}/{device}", old.user_id), None));
            }
            if let Some(p) = &pairing {
                writes.push((
                    format!("user_device/{}/{device}", p.user_id),
                    Some(to_json(p)?),
                ));
            }
            writes.push((read_key, pairing.as_ref().map(to_json).transpose()?));
            Ok(writes)
        });
        let old = self
            .write(|reply| WriteOp::Compute {
                key: key.clone(),
                compute,
                reply,
            })
            .await?;
        old.map(|b| from_json(&key, &b)).transpose()
    }

    async fn user_pairings(&self, user_id: &str) -> Result<Vec<Pairing>, StoreError> {
        self.records_under(format!("user_device/{user_id}/")).await
    }

    async fn structure_owner(&self, structure: &str) -> Result<Option<String>, StoreError> {
        self.record(format!("structure/{structure}")).await
    }

    async fn claim_structure(&self, structure: &str, user_id: &str) -> Result<String, StoreError> {
        let key = format!("structure/{structure}");
        let guard: Guard = Box::new(|current| current.is_none());
        let writes = vec![
            (key.clone(), Some(to_json(&user_id)?)),
            (
                format!("user_structure/{user_id}/{structure}"),
                Some(to_json(&structure)?),
            ),
        ];
        self.write_records(Some((key, guard)), writes).await?;
        self.structure_owner(structure).await?.ok_or_else(|| {
            StoreError::Corrupt(format!("structure {structure} has no owner after claim"))
        })
    }

    async fn user_structures(&self, user_id: &str) -> Result<Vec<String>, StoreError> {
        self.records_under(format!("user_structure/{user_id}/"))
            .await
    }

    async fn put_pairing_code(&self, code: PairingCode) -> Result<(), StoreError> {
        self.write(|reply| WriteOp::PutCode { code, reply }).await
    }

    async fn take_pairing_code(&self, code: &str) -> Result<Option<PairingCode>, StoreError> {
        let key = format!("code/{code}");
        let taken = self
            .write(|reply| WriteOp::Take {
                key: key.clone(),
                reply,
            })
            .await?;
        taken.map(|bytes| from_json(&key, &bytes)).transpose()
    }

    async fn close(&self) -> Result<(), StoreError> {
        self.write(|reply| WriteOp::Close { reply }).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::conformance::{bucket, logged};
    use serde_json::json;

    fn set(k: &str) -> SetKey {
        SetKey::parse(k).expect("valid set key")
    }

    /// Sets `META.wal_seq` as a checkpoint would have, with the store closed.
    fn store_seq(dir: &Path, seq: u64) {
        let db = Database::create(dir.join("tether.redb")).expect("open redb");
        let txn = db.begin_write().expect("txn");
        txn.open_table(META)
            .expect("meta")
            .insert(WAL_SEQ, seq)
            .expect("insert");
        txn.commit().expect("commit");
    }

    /// Logs batches as the writer does after a checkpoint, with the store closed.
    fn log(dir: &Path, batches: &[(u64, LoggedBatch)]) {
        let (mut wal, _) = wal::Wal::open(&dir.join("tether.wal")).expect("open log");
        wal.reset();
        for (seq, batch) in batches {
            let payload = serde_json::to_vec(batch).expect("encode");
            wal.append(*seq, &payload).expect("append");
        }
    }

    /// A store with set `s` leased (epoch returned), then closed.
    async fn leased(dir: &Path, s: &SetKey) -> Epoch {
        let store = RedbStore::open(dir, Metrics::new()).expect("open");
        let e = store.acquire_lease(s, "n1").await.expect("lease").epoch;
        store.close().await.expect("close");
        e
    }

    #[tokio::test]
    async fn batches_in_the_log_but_not_in_redb_are_applied_at_open() {
        // What a kill -9 leaves: batches acknowledged once their record was synced, their
        // redb commits lost with the process.
        let dir = tempfile::tempdir().expect("tempdir");
        let s = set("W1");
        let e = leased(dir.path(), &s).await;
        let first = logged("device.W1", 2, Some("op-2"), 20);
        let second = logged("device.W1", 3, Some("op-3"), 30);
        log(
            dir.path(),
            &[
                (1, vec![(s.clone(), e, first)]),
                (2, vec![(s.clone(), e, second.clone())]),
            ],
        );
        let store = RedbStore::open(dir.path(), Metrics::new()).expect("open");
        assert_eq!(store.load_set(&s).await.expect("load"), second.buckets);
        let id = BucketId::parse("device.W1").expect("id");
        let page = store.history(&id, 0, 10).await.expect("history");
        assert_eq!(
            page.expect("bucket").changes.len(),
            2,
            "both changes logged"
        );
        // Their op ids are remembered: a retry is answered, not applied again.
        assert!(matches!(
            store
                .commit(&s, e, logged("device.W1", 4, Some("op-3"), 40))
                .await,
            Err(StoreError::OpsKnown(_))
        ));
        store.close().await.expect("close");
        drop(store);
        // Opened again: nothing is applied twice.
        let store = RedbStore::open(dir.path(), Metrics::new()).expect("reopen");
        assert_eq!(store.load_set(&s).await.expect("load"), second.buckets);
        store.close().await.expect("close");
        drop(store);
        // redb itself holds them now: the log is no longer needed.
        std::fs::remove_file(dir.path().join("tether.wal")).expect("remove log");
        let store = RedbStore::open(dir.path(), Metrics::new()).expect("reopen");
        assert_eq!(store.load_set(&s).await.expect("load"), second.buckets);
    }

    #[tokio::test]
    async fn batches_redb_already_holds_are_not_applied_again() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = set("W2");
        let t = set("W3");
        let e = leased(dir.path(), &s).await;
        let f = leased(dir.path(), &t).await;
        let newer = Commit::of(vec![bucket("device.W2", 5, json!({"v": "newer"}))]);
        {
            let store = RedbStore::open(dir.path(), Metrics::new()).expect("open");
            store.commit(&s, e, newer.clone()).await.expect("commit");
            store.close().await.expect("close");
        }
        // The log still holds batch 4, which the checkpoint covered (its number is stored),
        // and batch 5, which came after it.
        store_seq(dir.path(), 4);
        let older = Commit::of(vec![bucket("device.W2", 4, json!({"v": "older"}))]);
        let other = Commit::of(vec![bucket("device.W3", 2, json!({"v": "after"}))]);
        log(
            dir.path(),
            &[
                (4, vec![(s.clone(), e, older)]),
                (5, vec![(t.clone(), f, other.clone())]),
            ],
        );
        let store = RedbStore::open(dir.path(), Metrics::new()).expect("open");
        assert_eq!(store.load_set(&s).await.expect("load"), newer.buckets);
        assert_eq!(store.load_set(&t).await.expect("load"), other.buckets);
    }

    /// What a kill -9 of the store's process leaves: its files as the kernel holds them.
    /// Taken while the writer is idle (every write acknowledged, no checkpoint due).
    fn crash_copy(from: &Path) -> tempfile::TempDir {
        let to = tempfile::tempdir().expect("tempdir");
        for file in ["tether.redb", "tether.wal"] {
            std::fs::copy(from.join(file), to.path().join(file)).expect("copy");
        }
        to
    }

    #[tokio::test]
    async fn batches_logged_after_a_restart_survive_a_crash() {
        // The log's numbering goes on from the number the last checkpoint stored: a batch
        // numbered from 1 again would be taken for one redb already holds, and skipped.
        let dir = tempfile::tempdir().expect("tempdir");
        let s = set("W6");
        let e = leased(dir.path(), &s).await;
        let never = Duration::from_secs(3600);
        let open = || RedbStore::open_with(dir.path(), Metrics::new(), 1 << 20, never);
        let store = open().expect("open");
        for v in 2..=4u64 {
            let c = Commit::of(vec![bucket("device.W6", v, json!({"v": v}))]);
            store.commit(&s, e, c).await.expect("commit");
        }
        store.close().await.expect("close");
        drop(store);
        let store = open().expect("reopen");
        let last = Commit::of(vec![bucket("device.W6", 5, json!({"v": 5}))]);
        store.commit(&s, e, last.clone()).await.expect("commit");
        let crashed = crash_copy(dir.path());
        let store = RedbStore::open(crashed.path(), Metrics::new()).expect("open after crash");
        assert_eq!(
            store.load_set(&s).await.expect("load"),
            last.buckets,
            "the write acknowledged after the restart is lost"
        );
    }

    #[tokio::test]
    async fn a_log_with_batches_missing_refuses_to_open() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = set("W4");
        let e = leased(dir.path(), &s).await;
        store_seq(dir.path(), 1);
        let c = Commit::of(vec![bucket("device.W4", 2, json!({}))]);
        log(dir.path(), &[(3, vec![(s, e, c)])]);
        let err = RedbStore::open(dir.path(), Metrics::new()).expect_err("batch 2 is gone");
        assert!(
            matches!(&err, StoreError::Corrupt(m) if m.contains("batch 3")),
            "{err}"
        );
    }

    #[tokio::test]
    async fn an_idle_writer_checkpoints_and_empties_the_log() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = set("W5");
        let metrics = Metrics::new();
        let sample = |name| crate::metrics::sample_sum(&metrics.render(), name);
        let store = RedbStore::open(dir.path(), metrics.clone()).expect("open");
        let e = store.acquire_lease(&s, "n1").await.expect("lease").epoch;
        for v in 2..=20u64 {
            let c = Commit::of(vec![bucket("device.W5", v, json!({"v": v}))]);
            store.commit(&s, e, c).await.expect("commit");
        }
        // Bounded wait (not a timing assertion): the writer checkpoints within
        // CHECKPOINT_EVERY of going idle.
        let checkpoints = sample("tether_store_checkpoints_total").unwrap_or(0.0);
        assert!(
            sample("tether_store_commits_total") > Some(checkpoints),
            "commits went to the log"
        );
        assert!(
            sample("tether_store_writer_busy_seconds_total").is_some_and(|s| s > 0.0),
            "the writer's time in transactions is counted"
        );
        let deadline = Instant::now() + CHECKPOINT_EVERY * 20;
        while sample("tether_store_wal_bytes") != Some(0.0)
            || sample("tether_store_checkpoints_total") <= Some(checkpoints)
        {
            assert!(Instant::now() < deadline, "the log was never emptied");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let db = store.db.clone();
        let stored = tokio::task::spawn_blocking(move || {
            let txn = db.begin_read().expect("read");
            let meta = txn.open_table(META).expect("meta");
            meta.get(WAL_SEQ).expect("get").map(|g| g.value())
        })
        .await
        .expect("task");
        assert!(stored.is_some_and(|seq| seq >= 1), "{stored:?}");
    }

    #[tokio::test]
    async fn a_read_that_saw_a_logged_batch_waits_for_its_sync() {
        let h = Horizon::default();
        assert!(
            h.wait(h.seen(), Duration::ZERO).await.is_ok(),
            "nothing to wait for"
        );
        let first = h.count();
        let second = h.count();
        assert!(
            h.wait(h.seen(), Duration::ZERO).await.is_err(),
            "two batches committed, none synced"
        );
        h.durable_through(first);
        assert!(
            h.wait(first, Duration::ZERO).await.is_ok(),
            "the first is synced"
        );
        assert!(
            h.wait(h.seen(), Duration::ZERO).await.is_err(),
            "the second is not synced"
        );
        h.durable_through(second);
        assert!(h.wait(h.seen(), Duration::ZERO).await.is_ok());
        h.count();
        h.all_durable();
        assert!(
            h.wait(h.seen(), Duration::ZERO).await.is_ok(),
            "a checkpoint covers it"
        );
        // A sync from another thread wakes a waiting read (the limit is only a backstop).
        let h = Arc::new(h);
        let third = h.count();
        let waiter = {
            let h = h.clone();
            tokio::spawn(async move { h.wait(third, Duration::from_secs(60)).await })
        };
        thread::spawn({
            let h = h.clone();
            move || h.durable_through(third)
        })
        .join()
        .expect("syncer");
        assert!(waiter.await.expect("waiter").is_ok());
    }

    /// A read whose request stopped waiting while it queued behind busy readers is not
    /// run when a reader comes free.
    #[tokio::test]
    async fn a_read_no_longer_awaited_is_not_run() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = RedbStore::open(dir.path(), Metrics::new()).expect("open");
        let readers = Readers::count();
        // One job per reader, run by all of them at once (each waits for the others).
        let on_every_reader = |job: Arc<dyn Fn() + Send + Sync>| -> Vec<_> {
            (0..readers)
                .map(|_| {
                    let (on, job) = (store.readers.clone(), job.clone());
                    tokio::spawn(async move { on.run(move || job()).await })
                })
                .collect()
        };
        let (release, released) = std::sync::mpsc::channel::<()>();
        let released = Arc::new(std::sync::Mutex::new(released));
        let started = Arc::new(AtomicU64::new(0));
        let busy = on_every_reader(Arc::new({
            let started = started.clone();
            move || {
                started.fetch_add(1, Ordering::SeqCst);
                let _ = released.lock().map(|r| r.recv());
            }
        }));
        let deadline = Instant::now() + Duration::from_secs(10);
        while started.load(Ordering::SeqCst) < readers as u64 {
            assert!(Instant::now() < deadline, "the readers never started");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let ran = Arc::new(AtomicU64::new(0));
        let queued = {
            let ran = ran.clone();
            store
                .readers
                .run(move || ran.fetch_add(1, Ordering::SeqCst))
        };
        // Queued behind the busy readers, then given up (as at a request's deadline).
        assert!(
            tokio::time::timeout(Duration::from_millis(50), queued)
                .await
                .is_err(),
            "every reader is busy"
        );
        for _ in 0..readers {
            release.send(()).expect("a busy reader");
        }
        for b in busy {
            b.await.expect("task").expect("ran");
        }
        // Jobs that meet on every reader: once they have, every job queued before them
        // (the one given up) has been taken and finished.
        let meet = Arc::new(std::sync::Barrier::new(readers + 1));
        let met = {
            let meet = meet.clone();
            on_every_reader(Arc::new(move || {
                meet.wait();
            }))
        };
        tokio::task::spawn_blocking(move || {
            meet.wait();
        })
        .await
        .expect("met");
        for m in met {
            m.await.expect("task").expect("ran");
        }
        assert_eq!(
            ran.load(Ordering::SeqCst),
            0,
            "a read no one awaited was run"
        );
    }

    /// A read that panics is answered with an error, and every reader goes on reading.
    #[tokio::test]
    async fn a_read_that_panics_fails_alone() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = RedbStore::open(dir.path(), Metrics::new()).expect("open");
        let readers = Readers::count();
        for _ in 0..readers {
            let failed = store
                .read(|_| -> Result<(), StoreError> { panic!("a read that panics") })
                .await;
            assert!(failed.is_err(), "a read that panicked was answered");
        }
        let s = set("P1");
        let e = store.acquire_lease(&s, "n1").await.expect("lease").epoch;
        let c = Commit::of(vec![bucket("device.P1", 2, json!({"v": 2}))]);
        store.commit(&s, e, c).await.expect("commit");
        for _ in 0..2 * readers {
            assert_eq!(store.load_set(&s).await.expect("read").len(), 1);
        }
    }

    /// Bounded wait until redb itself holds `set`'s buckets, read past the horizon (the
    /// sync may be held): the writer counts a batch just before it commits it, so a read
    /// made as soon as it is counted may still miss it.
    async fn in_redb(store: &RedbStore, set: &SetKey) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (db, key) = (store.db.clone(), set.as_str().to_owned());
            let held = tokio::task::spawn_blocking(move || {
                let txn = db.begin_read().expect("read");
                let table = txn.open_table(BUCKETS).expect("buckets");
                let range = table.range((key.as_str(), "")..(key.as_str(), "\u{7f}"));
                range.expect("range").count()
            })
            .await
            .expect("task");
            if held > 0 {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the writer never committed the batch to redb"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// A store whose syncer is held, with a commit of one bucket of set `name` written to
    /// redb and not yet durable (its log record waits for the sync).
    struct SyncHeld {
        store: Arc<RedbStore>,
        set: SetKey,
        written: Commit,
        /// Dropped: the sync goes on.
        held: tokio::sync::OwnedMutexGuard<()>,
        /// The commit's acknowledgement.
        commit: tokio::task::JoinHandle<Result<(), StoreError>>,
    }

    async fn sync_held(dir: &Path, name: &str) -> SyncHeld {
        let never = Duration::from_secs(3600);
        let store =
            Arc::new(RedbStore::open_with(dir, Metrics::new(), 1 << 20, never).expect("open"));
        let set = set(name);
        let e = store.acquire_lease(&set, "n1").await.expect("lease").epoch;
        let held = store.syncer_hold.clone().lock_owned().await;
        let written = Commit::of(vec![bucket(&format!("device.{name}"), 2, json!({"v": 2}))]);
        let commit = {
            let (store, s, c) = (store.clone(), set.clone(), written.clone());
            tokio::spawn(async move { store.commit(&s, e, c).await })
        };
        in_redb(&store, &set).await;
        SyncHeld {
            store,
            set,
            written,
            held,
            commit,
        }
    }

    /// A read that waits for a sync waits off the threads that read: reads parked behind a
    /// slow fsync, more of them than there are readers, leave the readers to other reads.
    #[test]
    fn reads_waiting_for_a_sync_leave_the_readers_free() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async {
            let dir = tempfile::tempdir().expect("tempdir");
            let SyncHeld {
                store,
                set: s,
                held,
                commit,
                ..
            } = sync_held(dir.path(), "W1").await;
            let readers = Readers::count();
            let reads: Vec<_> = (0..4 * readers)
                .map(|_| {
                    let (store, s) = (store.clone(), s.clone());
                    tokio::spawn(async move { store.load_set(&s).await })
                })
                .collect();
            // Not a timing assertion: the reads get the time to reach their wait (a store
            // that waits on its readers then keeps each up to `READ_WAIT` per read).
            tokio::time::sleep(Duration::from_millis(300)).await;
            // Bounded: a reader must come free while the reads still wait.
            let other = store.readers.run(|| 7);
            let free = tokio::time::timeout(Duration::from_secs(30), other).await;
            assert_eq!(
                free.ok().and_then(Result::ok),
                Some(7),
                "the readers stayed taken by reads waiting for a sync"
            );
            assert!(
                reads.iter().all(|r| !r.is_finished()),
                "a read returned a write not yet durable"
            );
            drop(held);
            commit.await.expect("task").expect("commit");
            for read in reads {
                let loaded = read.await.expect("task").expect("read");
                assert_eq!(loaded.len(), 1, "the synced write is read");
            }
        });
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn nothing_is_answered_or_read_before_its_log_record_is_synced() {
        let dir = tempfile::tempdir().expect("tempdir");
        let SyncHeld {
            store,
            set: s,
            written,
            held,
            commit,
        } = sync_held(dir.path(), "H1").await;
        let read = {
            let (store, s) = (store.clone(), s.clone());
            tokio::spawn(async move { store.load_set(&s).await })
        };
        // Not a timing assertion: while the sync is held, neither may finish at all; this
        // only gives a broken store the time to show it.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            !commit.is_finished(),
            "the write was acknowledged before its log record was synced"
        );
        assert!(
            !read.is_finished(),
            "a read returned a write not yet durable"
        );
        drop(held);
        commit.await.expect("task").expect("commit");
        assert_eq!(read.await.expect("task").expect("load"), written.buckets);
    }

    #[tokio::test]
    async fn concurrent_commits_share_syncs_and_all_survive_a_crash() {
        let dir = tempfile::tempdir().expect("tempdir");
        let metrics = Metrics::new();
        let never = Duration::from_secs(3600);
        let store = Arc::new(
            RedbStore::open_with(dir.path(), metrics.clone(), 1 << 20, never).expect("open"),
        );
        let sets: Vec<(SetKey, Epoch)> = {
            let mut out = Vec::new();
            for i in 0..16 {
                let s = set(&format!("C{i}"));
                let e = store.acquire_lease(&s, "n1").await.expect("lease").epoch;
                out.push((s, e));
            }
            out
        };
        let mut writes = tokio::task::JoinSet::new();
        for (s, e) in sets.clone() {
            let store = store.clone();
            writes.spawn(async move {
                for v in 1..=20u64 {
                    let id = format!("device.{}", s.as_str());
                    let c = Commit::of(vec![bucket(&id, v, json!({"v": v}))]);
                    store.commit(&s, e, c).await.expect("commit");
                    // What a reader sees once the write is acknowledged.
                    let page = store
                        .history(&BucketId::parse(&id).expect("id"), v - 1, 10)
                        .await
                        .expect("history");
                    assert_eq!(page.map(|p| p.version), Some(v), "{id}");
                }
            });
        }
        while let Some(done) = writes.join_next().await {
            done.expect("writer task");
        }
        let sample = |name| crate::metrics::sample_sum(&metrics.render(), name).unwrap_or(0.0);
        let syncs = sample("tether_store_wal_syncs_total");
        assert!(syncs >= 1.0, "the log was synced");
        assert!(
            syncs <= sample("tether_store_commits_total"),
            "at most one sync per batch"
        );
        // Every acknowledged write is in a copy of the files as a kill -9 leaves them.
        let crashed = crash_copy(dir.path());
        let after = RedbStore::open(crashed.path(), Metrics::new()).expect("open after crash");
        for (s, _) in &sets {
            let buckets = after.load_set(s).await.expect("load");
            assert_eq!(
                buckets.iter().map(|b| b.version).collect::<Vec<_>>(),
                vec![20],
                "{s}"
            );
        }
    }
}
