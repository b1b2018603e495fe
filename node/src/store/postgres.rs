//! PostgreSQL store: the shared store of a multi-node cluster on these machines.
//!
//! Fencing: `acquire_lease` bumps the set's epoch with an upsert; `commit` locks the lease
//! row `FOR SHARE` and checks the epoch in the same transaction as the bucket writes, so a
//! lease taken by another node either waits for an in-flight commit or makes it fail —
//! never both commit. Concurrent commits of different sets run in parallel on the pool;
//! PostgreSQL's own WAL group commit folds their fsyncs.
//!
//! The sync log lives next to the buckets: `tether_changes` (one row per accepted write)
//! and `tether_ops` (remembered op ids, with their age for retention), written in the
//! bucket commit's own transaction. The commit's statements are pipelined on its
//! connection (one round trip for the lease check and every write), then committed —
//! or rolled back when the lease moved or an op id was already remembered.

use async_trait::async_trait;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tether_proto::synclog::{Change, OpRecord};
use tether_proto::{Bucket, BucketId, Fields, Hlc, SetKey};
use tokio_postgres::NoTls;

mod batch;
mod blobs;
mod register;

pub use crate::store::batch::BatchConfig;

use super::{
    AssignedRecord, Commit, DeviceRecord, Epoch, HistoryPage, Lease, NewDevice, OpRetention,
    Pairing, PairingCode, Store, StoreError, UserRecord,
};

/// Schema, applied idempotently at start-up.
const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS tether_buckets (
    set_key TEXT NOT NULL, id TEXT NOT NULL, value JSONB NOT NULL,
    ts_ms BIGINT NOT NULL, ts_logical BIGINT NOT NULL, version BIGINT NOT NULL,
    PRIMARY KEY (set_key, id));
CREATE TABLE IF NOT EXISTS tether_leases (set_key TEXT PRIMARY KEY, epoch BIGINT NOT NULL, owner TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS tether_devices (device_id TEXT PRIMARY KEY, body JSONB NOT NULL);
CREATE TABLE IF NOT EXISTS tether_records (key TEXT PRIMARY KEY, body JSONB NOT NULL);
CREATE TABLE IF NOT EXISTS tether_changes (
    set_key TEXT NOT NULL, id TEXT NOT NULL, version BIGINT NOT NULL, body JSONB NOT NULL,
    PRIMARY KEY (set_key, id, version));
CREATE TABLE IF NOT EXISTS tether_ops (
    set_key TEXT NOT NULL, op_id TEXT NOT NULL, at_ms BIGINT NOT NULL, body JSONB NOT NULL,
    PRIMARY KEY (set_key, op_id));
CREATE INDEX IF NOT EXISTS tether_ops_by_age ON tether_ops (set_key, at_ms);
CREATE TABLE IF NOT EXISTS tether_blobs (key TEXT COLLATE \"C\" PRIMARY KEY, value BYTEA NOT NULL);
";

/// The advisory lock key under which the schema is created (any constant of our own).
const SCHEMA_LOCK: i64 = 0x7465_7468_6572; // "tether"

const LEASE_FOR_SHARE: &str = "SELECT epoch FROM tether_leases WHERE set_key = $1 FOR SHARE";

const UPSERT_BUCKETS: &str = "
INSERT INTO tether_buckets (set_key, id, value, ts_ms, ts_logical, version)
SELECT $1, * FROM unnest($2::text[], $3::jsonb[], $4::bigint[], $5::bigint[], $6::bigint[])
ON CONFLICT (set_key, id) DO UPDATE SET value = EXCLUDED.value, ts_ms = EXCLUDED.ts_ms,
    ts_logical = EXCLUDED.ts_logical, version = EXCLUDED.version";

const INSERT_CHANGES: &str = "
INSERT INTO tether_changes (set_key, id, version, body)
SELECT $1, * FROM unnest($2::text[], $3::bigint[], $4::jsonb[])";

/// Inserts the op ids not remembered yet; returns the ones it inserted.
const INSERT_OPS: &str = "
INSERT INTO tether_ops (set_key, op_id, at_ms, body)
SELECT $1, * FROM unnest($2::text[], $3::bigint[], $4::jsonb[])
ON CONFLICT (set_key, op_id) DO NOTHING RETURNING op_id";

const TRIM_CHANGES: &str = "
DELETE FROM tether_changes c USING unnest($2::text[], $3::bigint[]) AS t(id, through)
WHERE c.set_key = $1 AND c.id = t.id AND c.version <= t.through";

/// Drops the oldest op ids older than $2 while more than $3 remain.
const TRIM_OPS: &str = "
DELETE FROM tether_ops WHERE set_key = $1 AND op_id IN (
    SELECT op_id FROM tether_ops WHERE set_key = $1 AND at_ms < $2 ORDER BY at_ms
    LIMIT GREATEST(0, (SELECT count(*) FROM tether_ops WHERE set_key = $1) - $3))";

/// The bucket's version, its oldest kept change and a page of changes (one more than
/// asked, to tell whether more follow), in one statement: one snapshot.
const HISTORY: &str = "
SELECT b.version,
    (SELECT min(version) FROM tether_changes WHERE set_key = $1 AND id = $2),
    (SELECT coalesce(jsonb_agg(c.body ORDER BY c.version), '[]'::jsonb) FROM
        (SELECT body, version FROM tether_changes WHERE set_key = $1 AND id = $2 AND version > $3
         ORDER BY version LIMIT $4) c)
FROM tether_buckets b WHERE b.set_key = $1 AND b.id = $2";

/// Takes a connection out of the pool for good (dropped: closed once what is queued on it
/// was answered or its socket failed): one whose last transaction timed out may still be
/// waiting for a stalled server and must never carry another request.
fn abandon(client: deadpool_postgres::Object) {
    drop(deadpool_postgres::Object::take(client));
}

fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(e.to_string())
}

/// An error and its causes: tokio-postgres says only "db error" at the top, and the
/// server's reason (authentication failed, no such database) below.
fn with_causes(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cause = c.source();
    }
    out
}

fn to_json<T: Serialize>(v: &T) -> Result<serde_json::Value, StoreError> {
    serde_json::to_value(v).map_err(|e| StoreError::Corrupt(e.to_string()))
}

fn from_json<T: DeserializeOwned>(key: &str, v: serde_json::Value) -> Result<T, StoreError> {
    serde_json::from_value(v).map_err(|e| StoreError::Corrupt(format!("{key}: {e}")))
}

fn as_i64(v: u64) -> Result<i64, StoreError> {
    i64::try_from(v).map_err(|_| StoreError::Corrupt(format!("{v} does not fit a BIGINT")))
}

fn as_u64(v: i64) -> Result<u64, StoreError> {
    u64::try_from(v).map_err(|_| StoreError::Corrupt(format!("negative value {v} in the store")))
}

/// Locks `key` for the rest of the transaction (even when its row does not exist yet, so
/// read-modify-write of one record is serialized) and reads its current value.
async fn lock_record<T: DeserializeOwned>(
    txn: &tokio_postgres::Transaction<'_>,
    key: &str,
) -> Result<Option<T>, StoreError> {
    txn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", &[&key])
        .await
        .map_err(backend)?;
    txn.query_opt("SELECT body FROM tether_records WHERE key = $1", &[&key])
        .await
        .map_err(backend)?
        .map(|r| from_json(key, r.get(0)))
        .transpose()
}

/// Writes (`Some`) or deletes (`None`) one record inside a transaction.
async fn put_record(
    txn: &tokio_postgres::Transaction<'_>,
    key: &str,
    body: Option<&serde_json::Value>,
) -> Result<(), StoreError> {
    let written = match body {
        Some(body) => {
            txn.execute(
                "INSERT INTO tether_records (key, body) VALUES ($1, $2) ON CONFLICT (key) DO UPDATE SET body = EXCLUDED.body",
                &[&key, body],
            )
            .await
        }
        None => txn.execute("DELETE FROM tether_records WHERE key = $1", &[&key]).await,
    };
    written.map(drop).map_err(backend)
}

/// The PostgreSQL backend.
#[derive(Clone)]
pub struct PostgresStore {
    pool: Pool,
    metrics: crate::metrics::Metrics,
    /// The batching writer commits go through; `None` in the writer tasks' own handle
    /// (they write with [`PostgresStore::commit_one`]).
    batcher: Option<std::sync::Arc<crate::store::batch::Queue>>,
    /// How long a commit's transaction may take; past it the commit's fate is unknown and
    /// its connection is dropped, never reused ([`BatchConfig::deadline`]).
    deadline: std::time::Duration,
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStore")
            .field("pool", &self.pool.status())
            .finish()
    }
}

/// Longest wait for a pooled connection (or a new one) before a request fails.
const POOL_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// How long PostgreSQL lets one of Tether's sessions sit idle inside a transaction before
/// ending it (and releasing its locks). Tether's transactions never wait on the client,
/// so only a session whose client is gone ever reaches it.
const SERVER_IDLE_IN_TRANSACTION: std::time::Duration = std::time::Duration::from_secs(10);

/// Longest time sent data may stay unacknowledged before the kernel drops the connection.
const TCP_USER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Opens the pool's connections on one runtime: the one the store was made on, where its
/// batch writers run (in a node, the main thread, with the set actors). Without it a
/// connection lives where the task that first needed it ran (an HTTP worker checking a
/// pairing, say), and every statement a batch writer sends on it crosses threads twice:
/// in a cluster on 2 CPUs one node's HTTP worker spent 8.8 % of its time driving such
/// connections (`results/profile/forward-origin-profile-2026-12-07.txt`). When that
/// runtime is gone (shutting down, a test's), the connection is made where it is asked
/// for.
struct OnRuntime(tokio::runtime::Handle);

impl OnRuntime {
    async fn connect_here(
        config: tokio_postgres::Config,
    ) -> Result<(tokio_postgres::Client, tokio::task::JoinHandle<()>), tokio_postgres::Error> {
        let (client, connection) = config.connect(NoTls).await?;
        let task = tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::warn!(error = %e, "PostgreSQL connection ended");
            }
        });
        Ok((client, task))
    }
}

impl deadpool_postgres::Connect for OnRuntime {
    fn connect(
        &self,
        config: &tokio_postgres::Config,
    ) -> futures::future::BoxFuture<
        '_,
        Result<(tokio_postgres::Client, tokio::task::JoinHandle<()>), tokio_postgres::Error>,
    > {
        let config = config.clone();
        let there = self.0.spawn(Self::connect_here(config.clone()));
        Box::pin(async move {
            match there.await {
                Ok(made) => made,
                Err(_) => Self::connect_here(config).await,
            }
        })
    }
}

impl PostgresStore {
    /// Connects to `url` (`postgres://user@host:port/db`), creating the schema if needed,
    /// with the default batching limits.
    pub async fn connect(url: &str, pool_size: usize) -> Result<Self, StoreError> {
        Self::connect_with(
            url,
            pool_size,
            crate::metrics::Metrics::new(),
            BatchConfig::default(),
        )
        .await
    }

    /// Connects with explicit batching limits; batches are counted in `metrics`.
    pub async fn connect_with(
        url: &str,
        pool_size: usize,
        metrics: crate::metrics::Metrics,
        batching: BatchConfig,
    ) -> Result<Self, StoreError> {
        let mut config: tokio_postgres::Config = url
            .parse()
            .map_err(|e| backend(format!("store URL: {e}")))?;
        // A peer that vanished (host down, link cut) is noticed by TCP: data unacknowledged
        // for TCP_USER_TIMEOUT (Linux) or keepalive probes unanswered close the connection,
        // so the pool never hands out a dead one for long. A peer that is connected but
        // does not answer (a clogged link, a stopped server) is bounded by the deadlines.
        config
            .connect_timeout(POOL_WAIT)
            .keepalives(true)
            .keepalives_idle(std::time::Duration::from_secs(10))
            .keepalives_interval(std::time::Duration::from_secs(2))
            .keepalives_retries(3)
            .tcp_user_timeout(TCP_USER_TIMEOUT);
        // The server's side of the same: a session whose client vanished mid-transaction
        // (a partition dropping every packet, so no FIN or RST ever arrived) would keep
        // its row locks — a lease row locked `FOR UPDATE`/`FOR SHARE` — until the server's
        // default keepalive (2 h) noticed, and every later lease for that set would wait
        // on it (chaos defect 11, store-partition-node). The server probes too, and ends a
        // transaction left idle, releasing its locks.
        let server_side = format!(
            "-c tcp_keepalives_idle=10 -c tcp_keepalives_interval=2 -c tcp_keepalives_count=3 \
             -c idle_in_transaction_session_timeout={}",
            SERVER_IDLE_IN_TRANSACTION.as_millis()
        );
        let options = match config.get_options() {
            Some(given) if !given.is_empty() => format!("{given} {server_side}"),
            _ => server_side,
        };
        config.options(&options);
        let manager = Manager::from_connect(
            config,
            OnRuntime(tokio::runtime::Handle::current()),
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        // Under overload a request waits at most POOL_WAIT for a connection, then fails
        // (503, Retry-After) instead of queueing without bound behind the others.
        let pool = Pool::builder(manager)
            .max_size(pool_size.max(1))
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .wait_timeout(Some(POOL_WAIT))
            .create_timeout(Some(POOL_WAIT))
            .build()
            .map_err(backend)?;
        let mut store = PostgresStore {
            pool,
            metrics,
            batcher: None,
            deadline: batching.deadline,
        };
        store
            .client()
            .await?
            .batch_execute(&format!(
                // Nodes of a new cluster start together; CREATE TABLE IF NOT EXISTS races
                // (duplicate key in pg_type) unless they take turns.
                "BEGIN; SELECT pg_advisory_xact_lock({SCHEMA_LOCK}); {SCHEMA} COMMIT;"
            ))
            .await
            .map_err(|e| backend(format!("creating the schema: {}", with_causes(&e))))?;
        // Writers never need more connections than the pool has.
        let batching = BatchConfig {
            writers: batching.writers.clamp(1, pool_size.max(1)),
            ..batching
        };
        let batcher = batch::start(store.clone(), batching);
        store.batcher = Some(std::sync::Arc::new(batcher));
        Ok(store)
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        self.pool
            .get()
            .await
            .map_err(|e| backend(format!("PostgreSQL connection: {}", with_causes(&e))))
    }

    async fn record<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, StoreError> {
        let row = self
            .client()
            .await?
            .query_opt("SELECT body FROM tether_records WHERE key = $1", &[&key])
            .await
            .map_err(backend)?;
        row.map(|r| from_json(key, r.get(0))).transpose()
    }

    async fn records_under<T: DeserializeOwned>(&self, prefix: &str) -> Result<Vec<T>, StoreError> {
        let rows = self
            .client()
            .await?
            .query(
                "SELECT key, body FROM tether_records WHERE starts_with(key, $1) ORDER BY key",
                &[&prefix],
            )
            .await
            .map_err(backend)?;
        rows.into_iter()
            .map(|r| from_json(r.get::<_, &str>(0), r.get(1)))
            .collect()
    }
}

impl PostgresStore {
    /// One commit in its own transaction (the batch writer's fallback when a batch's
    /// writes fail, so a bad commit fails alone).
    async fn commit_one(
        &self,
        set: &SetKey,
        epoch: Epoch,
        commit: Commit,
    ) -> Result<(), StoreError> {
        let mut client = self.client().await?;
        match tokio::time::timeout(
            self.deadline,
            Self::commit_on(&mut client, set, epoch, commit),
        )
        .await
        {
            Ok(done) => done,
            Err(_) => {
                // The transaction may still commit (COMMIT may be on its way): its
                // connection is never reused, and the caller is told the fate is unknown.
                abandon(client);
                Err(StoreError::FateUnknown(format!(
                    "commit of set {set}: no answer from PostgreSQL within {} ms",
                    self.deadline.as_millis()
                )))
            }
        }
    }

    /// [`PostgresStore::commit_one`] on `client`.
    async fn commit_on(
        client: &mut deadpool_postgres::Object,
        set: &SetKey,
        epoch: Epoch,
        commit: Commit,
    ) -> Result<(), StoreError> {
        let s = set.as_str();
        // Columns of the multi-row statements.
        let mut b_ids = Vec::new();
        let mut b_values = Vec::new();
        let mut b_ms = Vec::new();
        let mut b_logical = Vec::new();
        let mut b_versions = Vec::new();
        for b in &commit.buckets {
            b_ids.push(b.id.as_str());
            b_values.push(to_json(&b.value)?);
            b_ms.push(as_i64(b.timestamp.millis)?);
            b_logical.push(i64::from(b.timestamp.logical));
            b_versions.push(as_i64(b.version)?);
        }
        let mut c_ids = Vec::new();
        let mut c_versions = Vec::new();
        let mut c_bodies = Vec::new();
        for (id, c) in &commit.changes {
            c_ids.push(id.as_str());
            c_versions.push(as_i64(c.version)?);
            c_bodies.push(to_json(c)?);
        }
        let mut o_ids = Vec::new();
        let mut o_at = Vec::new();
        let mut o_bodies = Vec::new();
        for op in &commit.ops {
            o_ids.push(op.op_id.as_str());
            o_at.push(as_i64(op.at_ms)?);
            o_bodies.push(to_json(op)?);
        }
        let mut t_ids = Vec::new();
        let mut t_through = Vec::new();
        for (id, through) in &commit.trim.changes_through {
            t_ids.push(id.as_str());
            t_through.push(as_i64(*through)?);
        }
        let trim_ops = commit
            .trim
            .ops
            .map(
                |OpRetention {
                     keep_last,
                     keep_since_ms,
                 }| {
                    let clamp = |v: u64| as_i64(v.min(i64::MAX as u64));
                    Ok::<_, StoreError>((clamp(keep_since_ms)?, clamp(keep_last)?))
                },
            )
            .transpose()?;

        let upsert = client
            .prepare_cached(UPSERT_BUCKETS)
            .await
            .map_err(backend)?;
        let changes = client
            .prepare_cached(INSERT_CHANGES)
            .await
            .map_err(backend)?;
        let ops = client.prepare_cached(INSERT_OPS).await.map_err(backend)?;
        let trim_changes = client.prepare_cached(TRIM_CHANGES).await.map_err(backend)?;
        let trim_ops_stmt = client.prepare_cached(TRIM_OPS).await.map_err(backend)?;
        let lease_stmt = client
            .prepare_cached(LEASE_FOR_SHARE)
            .await
            .map_err(backend)?;
        let txn = client.transaction().await.map_err(backend)?;
        let set_param: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&s];
        let lease = txn.query_opt(&lease_stmt, &set_param);
        // Everything is sent at once (pipelined, in this order) and runs in the order sent:
        // the lease row is locked before any write; a write is undone by the rollback
        // below if the lease moved or an op id was known. Every statement is prepared
        // above: an unprepared one would wait for its Parse and be sent after the writes.
        let run_ops = async {
            if o_ids.is_empty() {
                return Ok(0);
            }
            txn.query(&ops, &[&s, &o_ids, &o_at, &o_bodies])
                .await
                .map(|rows| rows.len())
        };
        let run_buckets = async {
            if b_ids.is_empty() {
                return Ok(0);
            }
            txn.execute(
                &upsert,
                &[&s, &b_ids, &b_values, &b_ms, &b_logical, &b_versions],
            )
            .await
        };
        let run_changes = async {
            if c_ids.is_empty() {
                return Ok(0);
            }
            txn.execute(&changes, &[&s, &c_ids, &c_versions, &c_bodies])
                .await
        };
        let run_trim_changes = async {
            if t_ids.is_empty() {
                return Ok(0);
            }
            txn.execute(&trim_changes, &[&s, &t_ids, &t_through]).await
        };
        let run_trim_ops = async {
            match &trim_ops {
                None => Ok(0),
                Some((since, keep)) => txn.execute(&trim_ops_stmt, &[&s, since, keep]).await,
            }
        };
        let (current, inserted, buckets, changes, trimmed_changes, trimmed_ops) = futures::join!(
            lease,
            run_ops,
            run_buckets,
            run_changes,
            run_trim_changes,
            run_trim_ops
        );
        // The lease first: a stale owner's writes may fail (its change's version is taken
        // by the new owner's), and then the answer is that it was fenced, not a store
        // error. The lease was read before any write ran, so its answer stands.
        let current: Option<i64> = current.map_err(backend)?.map(|r| r.get(0));
        if current != Some(as_i64(epoch.0)?) {
            // Dropping the transaction rolls it back.
            return Err(StoreError::Fenced {
                set: set.to_string(),
                epoch: epoch.0,
            });
        }
        let inserted = inserted.map_err(backend)?;
        for done in [buckets, changes, trimmed_changes, trimmed_ops] {
            done.map_err(backend)?;
        }
        if inserted < o_ids.len() {
            txn.rollback().await.map_err(backend)?;
            let rows = client
                .query(
                    "SELECT body FROM tether_ops WHERE set_key = $1 AND op_id = ANY($2)",
                    &[&s, &o_ids],
                )
                .await
                .map_err(backend)?;
            let known = rows
                .into_iter()
                .map(|r| from_json::<OpRecord>(s, r.get(0)))
                .collect::<Result<Vec<_>, _>>()?;
            if known.is_empty() {
                return Err(backend("op ids conflicted but none is stored"));
            }
            return Err(StoreError::OpsKnown(known));
        }
        txn.commit().await.map_err(backend)
    }
}

#[async_trait]
impl Store for PostgresStore {
    fn blob_kv(&self) -> Option<std::sync::Arc<dyn super::blobs::BlobKv>> {
        Some(std::sync::Arc::new(self.clone()))
    }

    async fn load_set(&self, set: &SetKey) -> Result<Vec<Bucket>, StoreError> {
        let rows = self
            .client()
            .await?
            .query(
                "SELECT id, value, ts_ms, ts_logical, version FROM tether_buckets WHERE set_key = $1 ORDER BY id",
                &[&set.as_str()],
            )
            .await
            .map_err(backend)?;
        rows.into_iter()
            .map(|r| {
                let id: &str = r.get(0);
                Ok(Bucket {
                    id: BucketId::parse(id).map_err(|e| StoreError::Corrupt(e.to_string()))?,
                    value: from_json::<Fields>(id, r.get(1))?,
                    timestamp: Hlc {
                        millis: as_u64(r.get(2))?,
                        logical: u32::try_from(r.get::<_, i64>(3))
                            .map_err(|e| StoreError::Corrupt(e.to_string()))?,
                    },
                    version: as_u64(r.get(4))?,
                })
            })
            .collect()
    }

    async fn acquire_lease(&self, set: &SetKey, owner: &str) -> Result<Lease, StoreError> {
        let mut client = self.client().await?;
        let txn = client.transaction().await.map_err(backend)?;
        // The row lock taken by the upsert serializes concurrent takers; the previous
        // owner is read under it.
        let previous: Option<String> = txn
            .query_opt(
                "SELECT owner FROM tether_leases WHERE set_key = $1 FOR UPDATE",
                &[&set.as_str()],
            )
            .await
            .map_err(backend)?
            .map(|r| r.get(0));
        let row = txn
            .query_one(
                "INSERT INTO tether_leases (set_key, epoch, owner) VALUES ($1, 1, $2)
                 ON CONFLICT (set_key) DO UPDATE SET epoch = tether_leases.epoch + 1, owner = EXCLUDED.owner
                 RETURNING epoch",
                &[&set.as_str(), &owner],
            )
            .await
            .map_err(backend)?;
        let epoch = Epoch(as_u64(row.get(0))?);
        txn.commit().await.map_err(backend)?;
        Ok(Lease {
            epoch,
            // '' is no node: a registration's lease row (`register_new`).
            previous_owner: previous.filter(|p| p != owner && !p.is_empty()),
        })
    }

    async fn commit(&self, set: &SetKey, epoch: Epoch, commit: Commit) -> Result<(), StoreError> {
        match &self.batcher {
            Some(batcher) => batcher.commit(set, epoch, commit).await,
            None => self.commit_one(set, epoch, commit).await,
        }
    }

    async fn history(
        &self,
        id: &BucketId,
        since_version: u64,
        limit: usize,
    ) -> Result<Option<HistoryPage>, StoreError> {
        let set = id.set_key();
        let client = self.client().await?;
        let stmt = client.prepare_cached(HISTORY).await.map_err(backend)?;
        let page = i64::try_from(limit.saturating_add(1)).unwrap_or(i64::MAX);
        let row = client
            .query_opt(
                &stmt,
                &[
                    &set.as_str(),
                    &id.as_str(),
                    &as_i64(since_version.min(i64::MAX as u64))?,
                    &page,
                ],
            )
            .await
            .map_err(backend)?;
        let Some(row) = row else { return Ok(None) };
        let version = as_u64(row.get(0))?;
        let oldest = row.get::<_, Option<i64>>(1).map(as_u64).transpose()?;
        let mut changes: Vec<Change> = from_json(id.as_str(), row.get(2))?;
        let more = changes.len() > limit;
        changes.truncate(limit);
        Ok(Some(HistoryPage {
            version,
            oldest,
            changes,
            more,
        }))
    }

    async fn get_device(&self, device_id: &str) -> Result<Option<DeviceRecord>, StoreError> {
        let row = self
            .client()
            .await?
            .query_opt(
                "SELECT body FROM tether_devices WHERE device_id = $1",
                &[&device_id],
            )
            .await
            .map_err(backend)?;
        row.map(|r| from_json(device_id, r.get(0))).transpose()
    }

    async fn put_device(&self, record: DeviceRecord) -> Result<(), StoreError> {
        let body = to_json(&record)?;
        self.client()
            .await?
            .execute(
                "INSERT INTO tether_devices (device_id, body) VALUES ($1, $2)
                 ON CONFLICT (device_id) DO UPDATE SET body = EXCLUDED.body",
                &[&record.device_id, &body],
            )
            .await
            .map_err(backend)
            .map(drop)
    }

    async fn get_assigned(&self, serial: &str) -> Result<Option<AssignedRecord>, StoreError> {
        self.record(&format!("assigned/{serial}")).await
    }

    async fn swap_assigned(
        &self,
        serial: &str,
        expected: Option<[u8; 32]>,
        new: Option<AssignedRecord>,
    ) -> Result<bool, StoreError> {
        let key = format!("assigned/{serial}");
        let mut client = self.client().await?;
        let txn = client.transaction().await.map_err(backend)?;
        let current: Option<AssignedRecord> = lock_record(&txn, &key).await?;
        if current.map(|r| r.current_hash) != expected {
            return Ok(false);
        }
        put_record(&txn, &key, new.as_ref().map(to_json).transpose()?.as_ref()).await?;
        txn.commit().await.map_err(backend)?;
        Ok(true)
    }

    async fn register_new(&self, devices: Vec<NewDevice>) -> Result<Vec<bool>, StoreError> {
        self.register_batch(devices).await
    }

    async fn get_user(&self, user_id: &str) -> Result<Option<UserRecord>, StoreError> {
        self.record(&format!("user/{user_id}")).await
    }

    async fn create_user(&self, user: UserRecord) -> Result<bool, StoreError> {
        let body = to_json(&user)?;
        let n = self
            .client()
            .await?
            .execute(
                "INSERT INTO tether_records (key, body) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING",
                &[&format!("user/{}", user.user_id), &body],
            )
            .await
            .map_err(backend)?;
        Ok(n == 1)
    }

    async fn get_pairing(&self, device_id: &str) -> Result<Option<Pairing>, StoreError> {
        self.record(&format!("pairing/{device_id}")).await
    }

    async fn set_pairing(
        &self,
        device_id: &str,
        pairing: Option<Pairing>,
    ) -> Result<Option<Pairing>, StoreError> {
        let key = format!("pairing/{device_id}");
        let mut client = self.client().await?;
        let txn = client.transaction().await.map_err(backend)?;
        let old: Option<Pairing> = lock_record(&txn, &key).await?;
        if let Some(o) = &old {
            put_record(
                &txn,
                &format!("user_device/{}/{device_id}", o.user_id),
                None,
            )
            .await?;
        }
        let body = pairing.as_ref().map(to_json).transpose()?;
        if let (Some(p), Some(body)) = (&pairing, &body) {
            put_record(
                &txn,
                &format!("user_device/{}/{device_id}", p.user_id),
                Some(body),
            )
            .await?;
        }
        put_record(&txn, &key, body.as_ref()).await?;
        txn.commit().await.map_err(backend)?;
        Ok(old)
    }

    async fn user_pairings(&self, user_id: &str) -> Result<Vec<Pairing>, StoreError> {
        self.records_under(&format!("user_device/{user_id}/")).await
    }

    async fn structure_owner(&self, structure: &str) -> Result<Option<String>, StoreError> {
        self.record(&format!("structure/{structure}")).await
    }

    async fn claim_structure(&self, structure: &str, user_id: &str) -> Result<String, StoreError> {
        let mut client = self.client().await?;
        let txn = client.transaction().await.map_err(backend)?;
        let owner = serde_json::Value::String(user_id.to_string());
        let n = txn
            .execute(
                "INSERT INTO tether_records (key, body) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING",
                &[&format!("structure/{structure}"), &owner],
            )
            .await
            .map_err(backend)?;
        if n == 1 {
            let name = serde_json::Value::String(structure.to_string());
            txn.execute(
                "INSERT INTO tether_records (key, body) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING",
                &[&format!("user_structure/{user_id}/{structure}"), &name],
            )
            .await
            .map_err(backend)?;
        }
        txn.commit().await.map_err(backend)?;
        self.structure_owner(structure).await?.ok_or_else(|| {
            StoreError::Corrupt(format!("structure {structure} has no owner after claim"))
        })
    }

    async fn user_structures(&self, user_id: &str) -> Result<Vec<String>, StoreError> {
        self.records_under(&format!("user_structure/{user_id}/"))
            .await
    }

    async fn put_pairing_code(&self, code: PairingCode) -> Result<(), StoreError> {
        let body = to_json(&code)?;
        let index = format!("device_code/{}", code.device_id);
        let mut client = self.client().await?;
        let txn = client.transaction().await.map_err(backend)?;
        // The device's previous code, removed only if it is still that device's.
        if let Some(old) = lock_record::<String>(&txn, &index).await? {
            txn.execute(
                "DELETE FROM tether_records WHERE key = $1 AND body->>'device_id' = $2",
                &[&format!("code/{old}"), &code.device_id],
            )
            .await
            .map_err(backend)?;
        }
        put_record(&txn, &index, Some(&to_json(&code.code)?)).await?;
        put_record(&txn, &format!("code/{}", code.code), Some(&body)).await?;
        txn.commit().await.map_err(backend)
    }

    async fn take_pairing_code(&self, code: &str) -> Result<Option<PairingCode>, StoreError> {
        let key = format!("code/{code}");
        let row = self
            .client()
            .await?
            .query_opt(
                "DELETE FROM tether_records WHERE key = $1 RETURNING body",
                &[&key],
            )
            .await
            .map_err(backend)?;
        row.map(|r| from_json(&key, r.get(0))).transpose()
    }

    async fn lease_epoch(&self, set: &SetKey) -> Result<Option<Epoch>, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                "SELECT epoch FROM tether_leases WHERE set_key = $1",
                &[&set.as_str()],
            )
            .await
            .map_err(backend)?;
        row.map(|r| as_u64(r.get(0)).map(Epoch)).transpose()
    }

    async fn clock_ms(&self) -> Result<Option<u64>, StoreError> {
        let client = self.client().await?;
        // clock_timestamp(): the time now, not the transaction's start.
        let row = client
            .query_one(
                "SELECT (extract(epoch FROM clock_timestamp()) * 1000)::bigint",
                &[],
            )
            .await
            .map_err(backend)?;
        as_u64(row.get(0)).map(Some)
    }

    async fn close(&self) -> Result<(), StoreError> {
        // Every acknowledged write was committed by PostgreSQL before its answer; queued
        // commits are written (or failed) before the pool closes.
        if let Some(batcher) = &self.batcher {
            batcher.close().await;
        }
        self.pool.close();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::pg_server::PgServer;

    /// Three connections at once from `store`, each checked with a query.
    async fn three(store: &PostgresStore) -> Vec<deadpool_postgres::Object> {
        let held = futures::future::try_join_all((0..3).map(|_| store.client()))
            .await
            .expect("three connections");
        for c in &held {
            c.simple_query("SELECT 1").await.expect("a query");
        }
        held
    }

    /// Connections a task on another runtime (an HTTP worker's) opened outlive that
    /// runtime: they live on the store's, so the pool keeps them instead of finding them
    /// closed and opening new ones.
    #[test]
    fn connections_live_on_the_stores_runtime() {
        let server = PgServer::start().expect("own server");
        let url = server.url("runtime").expect("db");
        let stores = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("the store's runtime");
        let store = stores
            .block_on(PostgresStore::connect(&url, 3))
            .expect("connect");
        std::thread::scope(|s| {
            s.spawn(|| {
                let worker = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("a worker's runtime");
                worker.block_on(three(&store));
                // The worker's runtime ends here, and every task spawned on it.
            });
        });
        stores.block_on(async {
            for c in three(&store).await {
                assert!(
                    deadpool_postgres::Object::metrics(&c).recycle_count > 0,
                    "a connection the worker opened was lost with its runtime"
                );
            }
        });
    }
}
