//! The blob keyspace (`store::blobs`) in FoundationDB: under the store's prefix, tuple
//! `("blob",)` followed by the key's bytes, so a key prefix is a byte range. Every blob
//! transaction goes through `run_once`: a retry after an unknown commit result answers
//! what the committed attempt answered.

use std::sync::Arc;

use async_trait::async_trait;

use super::kv::{KvDatabase, KvTransaction};
use super::{abort, read_limited, KvStore};
use crate::store::blobs::{BlobKv, KvWrite, Plan};
use crate::store::StoreError;

impl<D: KvDatabase> KvStore<D> {
    fn blob_key(&self, key: &str) -> Vec<u8> {
        let mut k = self.root.subspace(&("blob",)).into_bytes();
        k.extend_from_slice(key.as_bytes());
        k
    }

    /// The byte range of every blob key starting with `prefix` (keys are ASCII below
    /// 0xff).
    fn blob_range(&self, prefix: &str) -> (Vec<u8>, Vec<u8>) {
        let begin = self.blob_key(prefix);
        let mut end = begin.clone();
        end.push(0xff);
        (begin, end)
    }
}

#[async_trait]
impl<D: KvDatabase> BlobKv for KvStore<D> {
    async fn transact(
        &self,
        keys: Vec<String>,
        plan: Plan<Vec<u8>>,
    ) -> Result<Vec<u8>, StoreError> {
        let raw: Vec<Vec<u8>> = keys.iter().map(|k| self.blob_key(k)).collect();
        let (raw, plan, this) = (&raw, &plan, self);
        self.run_once("blob", |trx, _| async move {
            let mut values = Vec::with_capacity(raw.len());
            for k in raw {
                values.push(trx.get(k).await?);
            }
            let (answer, writes) = plan(values).map_err(abort)?;
            for w in writes {
                match w {
                    KvWrite::Put(k, v) => trx.set(&this.blob_key(&k), &v),
                    KvWrite::Delete(k) => trx.clear(&this.blob_key(&k)),
                    KvWrite::DeletePrefix(p) => {
                        let (begin, end) = this.blob_range(&p);
                        trx.clear_range(&begin, &end);
                    }
                }
            }
            Ok(answer)
        })
        .await
    }

    async fn get(&self, key: String) -> Result<Option<Vec<u8>>, StoreError> {
        let k = &self.blob_key(&key);
        self.run("blob get", |trx, _| async move { Ok(trx.get(k).await?) })
            .await
    }

    async fn scan(
        &self,
        prefix: String,
        after: Option<String>,
        limit: usize,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let (mut begin, end) = self.blob_range(&prefix);
        if let Some(after) = after {
            begin = self.blob_key(&after);
            begin.push(0);
        }
        let skip = self.blob_key("").len();
        let range = &(begin, end);
        let pairs = self
            .run("blob scan", |trx, _| async move {
                read_limited(trx.as_ref(), range.clone(), limit).await
            })
            .await?;
        pairs
            .into_iter()
            .map(|(k, v)| {
                let key = String::from_utf8(k.get(skip..).unwrap_or_default().to_vec())
                    .map_err(|e| StoreError::Corrupt(format!("blob key: {e}")))?;
                Ok((key, v))
            })
            .collect()
    }
}

/// Keeps `Arc` in scope for the store's `blob_kv`.
pub(super) fn shared<D: KvDatabase>(store: &KvStore<D>) -> Arc<dyn BlobKv> {
    Arc::new(store.clone())
}
