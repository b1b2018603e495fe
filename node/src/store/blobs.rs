//! Blobs (API.md "Blobs", seed 002): content-addressed values kept out of band, in the
//! node's store, in chunks, so any node of a cluster serves any blob.
//!
//! Each backend offers one small surface, [`BlobKv`]: a transaction that reads a few keys
//! and writes what a function of them says, a point read and a prefix scan, over its own
//! keyspace. Everything a blob means — chunks, completion, who may read it, what keeps
//! it alive — is written once here, on top of it, so the three backends cannot disagree.
//!
//! Keys (`<h>` is the hash in hex):
//! - `m/<h>`: the [`Manifest`], written first (an upload) and last (completion);
//! - `c/<h>/<index:016x>`: chunk `index`, bytes `index × CHUNK ..`, at most [`CHUNK`]
//!   bytes (FoundationDB's 100 KB value limit; one chunk per transaction, far below its
//!   10 MB transaction limit);
//! - `h/<h>/b:<bucket id>` and `h/<h>/p:<principal>`: its *holders*, each with the time it
//!   was added. A bucket holder says the bucket may reference the blob (written before the
//!   bucket's commit, so a committed reference always has one); a principal holder says
//!   the principal uploaded the bytes; `h/<h>/k:<name>` pins it for an operator. Bucket
//!   holders and pins keep a blob alive ([`Manifest::refs`] counts them); collection
//!   releases only bucket holders whose bucket no longer references the blob.
//!
//! Every operation on a blob reads its manifest key first, in the same transaction, so
//! the backends serialize them per blob (PostgreSQL locks that key).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tether_proto::blob::BlobHash;
use tether_proto::BucketId;

use super::{decode_json, encode_json, StoreError};

/// Bytes per stored chunk (the last one of a blob may be shorter).
pub const CHUNK: usize = 64 * 1024;
/// Most chunks one [`Blobs::append`] commits in one transaction: 512 KiB, well under
/// FoundationDB's 10 MB transaction limit, and what an upload holds in memory at most
/// before it is stored.
pub const CHUNKS_PER_COMMIT: usize = 8;

/// One write of a blob transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvWrite {
    /// Sets `key` to the value.
    Put(String, Vec<u8>),
    /// Removes `key`.
    Delete(String),
    /// Removes every key starting with the prefix.
    DeletePrefix(String),
}

/// The outcome of a transaction's function: its answer and what to write.
pub type Planned<T> = Result<(T, Vec<KvWrite>), StoreError>;

/// A function deciding a transaction's writes from the values of the keys it read.
/// It may run more than once (a backend retrying a conflicted transaction); each run
/// decides from the values it is given.
pub type Plan<T> = Box<dyn Fn(Vec<Option<Vec<u8>>>) -> Planned<T> + Send + Sync>;

/// What a backend provides for blobs: a keyspace of its own with serializable
/// transactions. Keys are ASCII.
#[async_trait]
pub trait BlobKv: Send + Sync + std::fmt::Debug + 'static {
    /// Reads `keys` and applies the writes `plan` derives from their values, atomically:
    /// no other transaction touching `keys[0]` runs in between. When it returns `Ok` the
    /// writes are durable.
    async fn transact(&self, keys: Vec<String>, plan: Plan<Vec<u8>>)
        -> Result<Vec<u8>, StoreError>;
    /// The value of `key`.
    async fn get(&self, key: String) -> Result<Option<Vec<u8>>, StoreError>;
    /// Up to `limit` pairs whose keys start with `prefix` and sort after `after` (from the
    /// first when `None`), in key order.
    async fn scan(
        &self,
        prefix: String,
        after: Option<String>,
        limit: usize,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError>;
}

/// What the store keeps about a blob.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Its size in bytes.
    pub size: u64,
    /// The media type the uploader named.
    pub content_type: String,
    /// The principal that started the upload (the only one that may add bytes to it).
    pub uploader: String,
    /// When the upload started (ms since the epoch).
    pub created_ms: u64,
    /// Bytes stored so far, from the start.
    pub received: u64,
    /// Every byte stored and their SHA-256 checked: readable and referenceable.
    pub complete: bool,
    /// Bucket holders (buckets that may reference it) and pins.
    pub refs: u64,
    /// Since when no bucket holds it (ms since the epoch; set at completion).
    pub unreferenced_since_ms: Option<u64>,
}

impl Manifest {
    /// Whether collection may delete it at `cutoff_ms`: no bucket holds it or pins it, and
    /// it went unheld (complete) or was started (an upload never finished) by then.
    pub fn due(&self, cutoff_ms: u64) -> bool {
        self.refs == 0
            && if self.complete {
                self.unreferenced_since_ms.is_some_and(|t| t <= cutoff_ms)
            } else {
                self.created_ms <= cutoff_ms
            }
    }
}

/// Who holds a blob.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Holder {
    /// A bucket that may reference it.
    Bucket(BucketId),
    /// A principal that uploaded its bytes (`Principal::key`).
    Principal(String),
    /// Kept by an operator (`tether admin blob put`, e.g. a firmware image a software
    /// update offers): keeps the blob alive like a bucket, never released by collection.
    Pinned(String),
}

impl Holder {
    fn key_part(&self) -> String {
        match self {
            Holder::Bucket(id) => format!("b:{id}"),
            Holder::Principal(p) => format!("p:{p}"),
            Holder::Pinned(name) => format!("k:{name}"),
        }
    }

    fn parse(part: &str) -> Option<Holder> {
        if let Some(id) = part.strip_prefix("b:") {
            BucketId::parse(id).ok().map(Holder::Bucket)
        } else if let Some(name) = part.strip_prefix("k:") {
            Some(Holder::Pinned(name.to_string()))
        } else {
            part.strip_prefix("p:")
                .map(|p| Holder::Principal(p.to_string()))
        }
    }
}

/// What [`Blobs::begin`] found or made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Begun {
    /// The blob is complete: nothing to send.
    Present(Manifest),
    /// An upload, new or resumed, of the principal that started it.
    Upload(Manifest),
    /// Another principal's upload of the same bytes is under way.
    Busy(Manifest),
}

/// What [`Blobs::append`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Appended {
    /// Bytes stored so far (unchanged when the chunk was not the next one).
    Received(u64),
    /// There is no upload of this blob (never started, discarded or collected).
    NoUpload,
    /// The blob is complete.
    Complete,
}

fn manifest_key(h: &BlobHash) -> String {
    format!("m/{h}")
}

fn chunk_key(h: &BlobHash, index: u64) -> String {
    format!("c/{h}/{index:016x}")
}

fn holder_key(h: &BlobHash, holder: &Holder) -> String {
    format!("h/{h}/{}", holder.key_part())
}

fn decode_manifest(key: &str, v: Option<&Vec<u8>>) -> Result<Option<Manifest>, StoreError> {
    v.map(|b| decode_json(key, b)).transpose()
}

fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>, StoreError> {
    encode_json(v)
}

/// The blob operations, each one atomic, over a backend's [`BlobKv`], each bounded by the
/// store deadline.
#[derive(Debug, Clone)]
pub struct Blobs {
    kv: Arc<dyn BlobKv>,
    deadline: Duration,
}

impl Blobs {
    /// Blobs over `kv`; every call fails with [`StoreError::TimedOut`] (or
    /// [`StoreError::FateUnknown`] for a write) past `deadline`.
    pub fn new(kv: Arc<dyn BlobKv>, deadline: Duration) -> Self {
        Blobs { kv, deadline }
    }

    async fn bounded<T>(
        &self,
        what: &str,
        writes: bool,
        f: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(self.deadline, f).await {
            Ok(r) => r,
            Err(_) if writes => Err(StoreError::FateUnknown(format!(
                "blob {what}: no answer from the store within {} ms",
                self.deadline.as_millis()
            ))),
            Err(_) => Err(StoreError::TimedOut(format!(
                "blob {what}: no answer from the store within {} ms",
                self.deadline.as_millis()
            ))),
        }
    }

    /// Runs `plan` on the manifest of `h` (and the values of `more` keys) in one
    /// transaction; its answer travels as JSON through the backend.
    async fn on_manifest<T>(
        &self,
        what: &str,
        h: &BlobHash,
        more: Vec<String>,
        plan: impl Fn(Option<Manifest>, Vec<Option<Vec<u8>>>) -> Planned<T> + Send + Sync + 'static,
    ) -> Result<T, StoreError>
    where
        T: Serialize + serde::de::DeserializeOwned,
    {
        let key = manifest_key(h);
        let mut keys = vec![key.clone()];
        keys.extend(more);
        let plan: Plan<Vec<u8>> = Box::new(move |mut values| {
            let rest = values.split_off(1.min(values.len()));
            let manifest = decode_manifest(&key, values.first().and_then(Option::as_ref))?;
            let (answer, writes) = plan(manifest, rest)?;
            Ok((encode(&answer)?, writes))
        });
        let bytes = self
            .bounded(what, true, self.kv.transact(keys, plan))
            .await?;
        decode_json(what, &bytes)
    }

    /// The manifest of `h`.
    pub async fn manifest(&self, h: &BlobHash) -> Result<Option<Manifest>, StoreError> {
        let key = manifest_key(h);
        let v = self
            .bounded("manifest", false, self.kv.get(key.clone()))
            .await?;
        decode_manifest(&key, v.as_ref())
    }

    /// Starts an upload of `h` for `uploader` unless one exists: a complete blob is
    /// present; an upload under way is resumed by its uploader and busy for anyone else.
    /// A size or type that differs from an existing upload's is the caller's to refuse.
    pub async fn begin(
        &self,
        h: &BlobHash,
        size: u64,
        content_type: &str,
        uploader: &str,
        now_ms: u64,
    ) -> Result<Begun, StoreError> {
        let fresh = Manifest {
            size,
            content_type: content_type.to_string(),
            uploader: uploader.to_string(),
            created_ms: now_ms,
            received: 0,
            complete: false,
            refs: 0,
            unreferenced_since_ms: None,
        };
        let key = manifest_key(h);
        self.on_manifest("begin", h, vec![], move |m, _| match m {
            Some(m) if m.complete => Ok((Begun::Present(m), vec![])),
            Some(m) if m.uploader == fresh.uploader => Ok((Begun::Upload(m), vec![])),
            Some(m) => Ok((Begun::Busy(m), vec![])),
            None => {
                let bytes = encode(&fresh)?;
                Ok((
                    Begun::Upload(fresh.clone()),
                    vec![KvWrite::Put(key.clone(), bytes)],
                ))
            }
        })
        .await
    }

    /// Stores `bytes` as chunks `index`, `index + 1`, … of `h` in one transaction if
    /// `index` is the next one (`index × CHUNK` = bytes received), `bytes` is whole chunks
    /// (at most [`CHUNKS_PER_COMMIT`]) or ends the blob, and the upload is `uploader`'s.
    pub async fn append(
        &self,
        h: &BlobHash,
        uploader: &str,
        index: u64,
        bytes: Vec<u8>,
    ) -> Result<Appended, StoreError> {
        let (mk, h2) = (manifest_key(h), *h);
        let uploader = uploader.to_string();
        self.on_manifest("append", h, vec![], move |m, _| {
            let Some(mut m) = m else {
                return Ok((Appended::NoUpload, vec![]));
            };
            if m.complete {
                return Ok((Appended::Complete, vec![]));
            }
            let len = bytes.len() as u64;
            let next = m.received == index.saturating_mul(CHUNK as u64);
            let whole = len > 0 && len % CHUNK as u64 == 0;
            let shape = (whole || (len > 0 && m.received + len == m.size))
                && bytes.len() <= CHUNK * CHUNKS_PER_COMMIT;
            if m.uploader != uploader || !next || !shape || m.received + len > m.size {
                return Ok((Appended::Received(m.received), vec![]));
            }
            m.received += len;
            let mut writes: Vec<KvWrite> = bytes
                .chunks(CHUNK)
                .enumerate()
                .map(|(i, c)| KvWrite::Put(chunk_key(&h2, index + i as u64), c.to_vec()))
                .collect();
            writes.push(KvWrite::Put(mk.clone(), encode(&m)?));
            Ok((Appended::Received(m.received), writes))
        })
        .await
    }

    /// Chunk `index` of `h` (of an upload too: the caller checks completeness).
    pub async fn chunk(&self, h: &BlobHash, index: u64) -> Result<Option<Vec<u8>>, StoreError> {
        self.bounded("chunk", false, self.kv.get(chunk_key(h, index)))
            .await
    }

    /// Marks an upload whose bytes are all stored complete (the caller checked their
    /// hash) and records `uploader` as a holder. False when it is not such an upload.
    pub async fn complete(
        &self,
        h: &BlobHash,
        uploader: &str,
        now_ms: u64,
    ) -> Result<bool, StoreError> {
        let mk = manifest_key(h);
        let hk = holder_key(h, &Holder::Principal(uploader.to_string()));
        self.on_manifest("complete", h, vec![], move |m, _| match m {
            Some(mut m) if !m.complete && m.received == m.size => {
                m.complete = true;
                m.unreferenced_since_ms = Some(now_ms);
                let writes = vec![
                    KvWrite::Put(hk.clone(), encode(&now_ms)?),
                    KvWrite::Put(mk.clone(), encode(&m)?),
                ];
                Ok((true, writes))
            }
            _ => Ok((false, vec![])),
        })
        .await
    }

    /// Removes an incomplete upload of `h` and its bytes (a hash mismatch). False when
    /// there was none (or the blob is complete).
    pub async fn discard(&self, h: &BlobHash) -> Result<bool, StoreError> {
        let (mk, chunks) = (manifest_key(h), format!("c/{h}/"));
        self.on_manifest("discard", h, vec![], move |m, _| match m {
            Some(m) if !m.complete => Ok((
                true,
                vec![
                    KvWrite::Delete(mk.clone()),
                    KvWrite::DeletePrefix(chunks.clone()),
                ],
            )),
            _ => Ok((false, vec![])),
        })
        .await
    }

    /// Adds (or refreshes) a holder of a complete blob. False when `h` is not complete.
    pub async fn hold(
        &self,
        h: &BlobHash,
        holder: Holder,
        now_ms: u64,
    ) -> Result<bool, StoreError> {
        let (mk, hk) = (manifest_key(h), holder_key(h, &holder));
        let counts = matches!(holder, Holder::Bucket(_) | Holder::Pinned(_));
        self.on_manifest("hold", h, vec![hk.clone()], move |m, rest| {
            let Some(mut m) = m.filter(|m| m.complete) else {
                return Ok((false, vec![]));
            };
            let mut writes = vec![KvWrite::Put(hk.clone(), encode(&now_ms)?)];
            let new = rest.first().is_none_or(Option::is_none);
            if counts && new {
                m.refs += 1;
                m.unreferenced_since_ms = None;
                writes.push(KvWrite::Put(mk.clone(), encode(&m)?));
            }
            Ok((true, writes))
        })
        .await
    }

    /// When `holder` was added as a holder of `h`, if it is one.
    pub async fn held_by(&self, h: &BlobHash, holder: &Holder) -> Result<Option<u64>, StoreError> {
        let key = holder_key(h, holder);
        self.bounded("holder", false, self.kv.get(key.clone()))
            .await?
            .map(|v| decode_json(&key, &v))
            .transpose()
    }

    /// Up to `limit` bucket holders of `h` after `after`, each with the time it was added.
    pub async fn bucket_holders(
        &self,
        h: &BlobHash,
        after: Option<&BucketId>,
        limit: usize,
    ) -> Result<Vec<(BucketId, u64)>, StoreError> {
        let prefix = format!("h/{h}/b:");
        let after = after.map(|id| format!("{prefix}{id}"));
        let pairs = self
            .bounded("holders", false, self.kv.scan(prefix, after, limit))
            .await?;
        let mut out = Vec::with_capacity(pairs.len());
        for (k, v) in pairs {
            let part = k.splitn(3, '/').nth(2).unwrap_or_default();
            if let Some(Holder::Bucket(id)) = Holder::parse(part) {
                out.push((id, decode_json(&k, &v)?));
            }
        }
        Ok(out)
    }

    /// Removes `holder` of `h` if it was last added at `added_ms` (not refreshed since).
    /// The last bucket holder gone starts the blob's grace period.
    pub async fn release(
        &self,
        h: &BlobHash,
        holder: Holder,
        added_ms: u64,
        now_ms: u64,
    ) -> Result<bool, StoreError> {
        let (mk, hk) = (manifest_key(h), holder_key(h, &holder));
        let counts = matches!(holder, Holder::Bucket(_) | Holder::Pinned(_));
        self.on_manifest("release", h, vec![hk.clone()], move |m, rest| {
            let current: Option<u64> = rest
                .first()
                .and_then(Option::as_ref)
                .map(|v| decode_json(&hk, v))
                .transpose()?;
            if current != Some(added_ms) {
                return Ok((false, vec![]));
            }
            let mut writes = vec![KvWrite::Delete(hk.clone())];
            if let (Some(mut m), true) = (m, counts) {
                m.refs = m.refs.saturating_sub(1);
                if m.refs == 0 {
                    m.unreferenced_since_ms = Some(now_ms);
                }
                writes.push(KvWrite::Put(mk.clone(), encode(&m)?));
            }
            Ok((true, writes))
        })
        .await
    }

    /// Up to `limit` blobs (complete or not) after `after`, in hash order.
    pub async fn list(
        &self,
        after: Option<&BlobHash>,
        limit: usize,
    ) -> Result<Vec<(BlobHash, Manifest)>, StoreError> {
        let after = after.map(manifest_key);
        let pairs = self
            .bounded("list", false, self.kv.scan("m/".into(), after, limit))
            .await?;
        let mut out = Vec::with_capacity(pairs.len());
        for (k, v) in pairs {
            let h = BlobHash::parse(k.trim_start_matches("m/"))
                .map_err(|_| StoreError::Corrupt(format!("blob key {k}")))?;
            out.push((h, decode_json(&k, &v)?));
        }
        Ok(out)
    }

    /// Deletes `h` with its bytes and holders if no bucket holds it and it went unheld
    /// (complete) or was started (an upload never finished) at or before `cutoff_ms`.
    pub async fn collect(&self, h: &BlobHash, cutoff_ms: u64) -> Result<bool, StoreError> {
        let (mk, chunks, holders) = (manifest_key(h), format!("c/{h}/"), format!("h/{h}/"));
        self.on_manifest("collect", h, vec![], move |m, _| {
            let due = m.is_some_and(|m| m.due(cutoff_ms));
            if !due {
                return Ok((false, vec![]));
            }
            Ok((
                true,
                vec![
                    KvWrite::Delete(mk.clone()),
                    KvWrite::DeletePrefix(chunks.clone()),
                    KvWrite::DeletePrefix(holders.clone()),
                ],
            ))
        })
        .await
    }
}

/// What one [`sweep`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Swept {
    /// Blobs looked at.
    pub blobs: u64,
    /// Bucket holders released (their bucket no longer references the blob).
    pub released: u64,
    /// Blobs deleted (unreferenced past their grace, or uploads never finished).
    pub deleted: u64,
}

/// One pass of blob collection: releases bucket holders older than `settle_ms` whose
/// bucket, as committed, no longer references the blob (one found still referenced is
/// refreshed, so each holder's bucket is read at most once per `settle_ms`) (a holder is written before its
/// bucket's commit, so one younger than the longest commit may still be on its way), then
/// deletes every blob no bucket holds whose grace (`grace_ms`, from when the last holder
/// went or the upload started) is over. Safe beside other nodes' passes: every step is
/// conditional on what it read.
pub async fn sweep(
    blobs: &Blobs,
    store: &dyn super::Store,
    now_ms: u64,
    grace_ms: u64,
    settle_ms: u64,
) -> Result<Swept, StoreError> {
    const PAGE: usize = 256;
    let mut swept = Swept::default();
    let mut after: Option<BlobHash> = None;
    loop {
        let page = blobs.list(after.as_ref(), PAGE).await?;
        let Some((last, _)) = page.last() else {
            return Ok(swept);
        };
        after = Some(*last);
        for (h, m) in page {
            swept.blobs += 1;
            if m.complete && m.refs > 0 {
                swept.released += release_unreferenced(blobs, store, &h, now_ms, settle_ms).await?;
            }
            // Only a blob that looked due when listed is tried (the store decides again); one
            // whose last holder this pass released starts its grace now.
            let cutoff = now_ms.saturating_sub(grace_ms);
            let looked_due = m.due(cutoff);
            if looked_due && blobs.collect(&h, cutoff).await? {
                swept.deleted += 1;
            }
        }
    }
}

async fn release_unreferenced(
    blobs: &Blobs,
    store: &dyn super::Store,
    h: &BlobHash,
    now_ms: u64,
    settle_ms: u64,
) -> Result<u64, StoreError> {
    const PAGE: usize = 256;
    let mut released = 0;
    let mut after: Option<BucketId> = None;
    loop {
        let page = blobs.bucket_holders(h, after.as_ref(), PAGE).await?;
        let Some((last, _)) = page.last() else {
            return Ok(released);
        };
        after = Some(last.clone());
        for (id, added_ms) in page {
            if added_ms.saturating_add(settle_ms) > now_ms {
                continue;
            }
            let set = store.load_set(&id.set_key()).await?;
            let referenced = set
                .iter()
                .find(|b| b.id == id)
                .is_some_and(|b| tether_proto::blob::references(&b.value, h));
            if referenced {
                // Still referenced: read again one settle period from now, not every pass.
                blobs.hold(h, Holder::Bucket(id), now_ms).await?;
            } else if blobs
                .release(h, Holder::Bucket(id), added_ms, now_ms)
                .await?
            {
                released += 1;
            }
        }
    }
}
