//! PostgreSQL store: the shared store of a multi-node cluster on these machines.
//!
//! Fencing: `acquire_lease` bumps the set's epoch with an upsert; `commit` locks the lease
//! row `FOR SHARE` and checks the epoch in the same transaction as the bucket writes, so a
//! lease taken by another node either waits for an in-flight commit or makes it fail —
//! never both commit. Concurrent commits of different sets run in parallel on the pool;
//! PostgreSQL's own WAL group commit folds their fsyncs.

use async_trait::async_trait;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tether_proto::{Bucket, BucketId, Fields, Hlc, SetKey};
use tokio_postgres::NoTls;

use super::{
    AssignedRecord, DeviceRecord, Epoch, Lease, Pairing, PairingCode, Store, StoreError, UserRecord,
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
";

/// The advisory lock key under which the schema is created (any constant of our own).
const SCHEMA_LOCK: i64 = 0x7465_7468_6572; // "tether"

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

impl PostgresStore {
    /// Connects to `url` (`postgres://user@host:port/db`), creating the schema if needed.
    pub async fn connect(url: &str, pool_size: usize) -> Result<Self, StoreError> {
        let config: tokio_postgres::Config = url
            .parse()
            .map_err(|e| backend(format!("store URL: {e}")))?;
        let manager = Manager::from_config(
            config,
            NoTls,
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
        let store = PostgresStore { pool };
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

#[async_trait]
impl Store for PostgresStore {
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
            previous_owner: previous.filter(|p| p != owner),
        })
    }

    async fn commit(
        &self,
        set: &SetKey,
        epoch: Epoch,
        writes: Vec<Bucket>,
    ) -> Result<(), StoreError> {
        let mut client = self.client().await?;
        let txn = client.transaction().await.map_err(backend)?;
        let current: Option<i64> = txn
            .query_opt(
                "SELECT epoch FROM tether_leases WHERE set_key = $1 FOR SHARE",
                &[&set.as_str()],
            )
            .await
            .map_err(backend)?
            .map(|r| r.get(0));
        if current != Some(as_i64(epoch.0)?) {
            return Err(StoreError::Fenced {
                set: set.to_string(),
                epoch: epoch.0,
            });
        }
        let upsert = txn
            .prepare(
                "INSERT INTO tether_buckets (set_key, id, value, ts_ms, ts_logical, version) VALUES ($1, $2, $3, $4, $5, $6)
                 ON CONFLICT (set_key, id) DO UPDATE SET value = EXCLUDED.value, ts_ms = EXCLUDED.ts_ms,
                     ts_logical = EXCLUDED.ts_logical, version = EXCLUDED.version",
            )
            .await
            .map_err(backend)?;
        for b in &writes {
            let value = to_json(&b.value)?;
            txn.execute(
                &upsert,
                &[
                    &set.as_str(),
                    &b.id.as_str(),
                    &value,
                    &as_i64(b.timestamp.millis)?,
                    &i64::from(b.timestamp.logical),
                    &as_i64(b.version)?,
                ],
            )
            .await
            .map_err(backend)?;
        }
        txn.commit().await.map_err(backend)
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

    async fn close(&self) -> Result<(), StoreError> {
        // Every acknowledged write was committed by PostgreSQL before its answer.
        self.pool.close();
        Ok(())
    }
}
