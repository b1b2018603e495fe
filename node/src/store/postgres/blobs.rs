//! The blob keyspace (`store::blobs`) in PostgreSQL: table `tether_blobs`, keys in
//! byte order (`COLLATE "C"`). A transaction takes an advisory lock on its first key (a
//! blob's manifest) first, so operations on one blob run one at a time.

use async_trait::async_trait;

use super::{backend, PostgresStore};
use crate::store::blobs::{BlobKv, KvWrite, Plan};
use crate::store::StoreError;

/// The first key after every key starting with `prefix` (keys are ASCII below DEL), so a
/// prefix is a range the primary key's index serves.
fn prefix_end(prefix: &str) -> String {
    format!("{prefix}\u{7f}")
}

#[async_trait]
impl BlobKv for PostgresStore {
    async fn transact(
        &self,
        keys: Vec<String>,
        plan: Plan<Vec<u8>>,
    ) -> Result<Vec<u8>, StoreError> {
        let mut client = self.client().await?;
        let txn = client.transaction().await.map_err(backend)?;
        if let Some(first) = keys.first() {
            txn.execute(
                "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))",
                &[first],
            )
            .await
            .map_err(backend)?;
        }
        let rows = txn
            .query(
                "SELECT key, value FROM tether_blobs WHERE key = ANY($1)",
                &[&keys],
            )
            .await
            .map_err(backend)?;
        let values = keys
            .iter()
            .map(|k| {
                rows.iter()
                    .find(|r| r.get::<_, &str>(0) == k)
                    .map(|r| r.get::<_, Vec<u8>>(1))
            })
            .collect();
        // A plan that fails writes nothing: the transaction rolls back when dropped.
        let (answer, writes) = plan(values)?;
        for w in writes {
            let done = match &w {
                KvWrite::Put(k, v) => {
                    txn.execute(
                        "INSERT INTO tether_blobs (key, value) VALUES ($1, $2) \
                         ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
                        &[k, v],
                    )
                    .await
                }
                KvWrite::Delete(k) => {
                    txn.execute("DELETE FROM tether_blobs WHERE key = $1", &[k])
                        .await
                }
                KvWrite::DeletePrefix(p) => {
                    txn.execute(
                        "DELETE FROM tether_blobs WHERE key >= $1 AND key < $2",
                        &[p, &prefix_end(p)],
                    )
                    .await
                }
            };
            done.map_err(backend)?;
        }
        txn.commit().await.map_err(backend)?;
        Ok(answer)
    }

    async fn get(&self, key: String) -> Result<Option<Vec<u8>>, StoreError> {
        let row = self
            .client()
            .await?
            .query_opt("SELECT value FROM tether_blobs WHERE key = $1", &[&key])
            .await
            .map_err(backend)?;
        Ok(row.map(|r| r.get(0)))
    }

    async fn scan(
        &self,
        prefix: String,
        after: Option<String>,
        limit: usize,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let from = after.unwrap_or_else(|| prefix.clone());
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = self
            .client()
            .await?
            .query(
                "SELECT key, value FROM tether_blobs WHERE key >= $1 AND key < $2 AND key > $3 \
                 ORDER BY key LIMIT $4",
                &[&prefix, &prefix_end(&prefix), &from, &limit],
            )
            .await
            .map_err(backend)?;
        Ok(rows.into_iter().map(|r| (r.get(0), r.get(1))).collect())
    }
}
