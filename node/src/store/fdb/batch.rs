//! The batching writer of the FoundationDB store: group commit across bucket sets.
//!
//! Every actor of a node hands its commit to one queue ([`crate::store::batch`]: admission
//! bound, writer tasks, requesters that gave up dropped unwritten). A writer task takes
//! whatever is queued (up to [`BatchConfig::max_batch`]), splits it where its encoded size
//! would pass [`BatchConfig::max_batch_bytes`], and writes each part in ONE transaction,
//! the parts one after the other in queue order:
//!
//! 1. reads, all issued at once: every named set's lease key, every op id's record key,
//!    and the op counter of every set that remembers or trims op ids;
//! 2. decides per commit, in queue order ([`Decision`]): a set whose epoch moved is fenced,
//!    a commit naming an op id the store remembers (or an earlier commit of the batch
//!    carries) is answered with the remembered records — both write nothing, the others
//!    are written;
//! 3. per set, the op counter and the op retention once, after all of the set's commits
//!    (the last accepted retention of the set applies, as in the PostgreSQL batch), then
//!    the commit.
//!
//! Fencing is as strong as a lone commit's: the batch reads every set's lease key in the
//! transaction it writes in, so an `acquire_lease` committed in between conflicts with it;
//! the retry sees the new epoch and refuses that set's commits alone.
//!
//! Limits: FDB refuses transactions over 10 MB and older than 5 s. A part holds at most
//! [`BatchConfig::max_batch_bytes`] of encoded keys and values (4 MB by default, leaving
//! room for retention clears and the marker); a single commit larger than that, or with a
//! key or value FDB refuses, goes in a part of its own, so FDB's refusal fails it alone.
//! A part whose transaction has not answered within [`BatchConfig::deadline`] (3 s by
//! default) is abandoned: each of its commits is answered [`StoreError::FateUnknown`].
//!
//! Unknown results: a part with any commit that remembers or trims op ids (not idempotent:
//! applied twice, its second application finds its own op ids and bumps the counters
//! twice) goes through `run_once`: the attempt that commits also writes its decisions
//! under a fresh marker key, atomically with its writes, and every later attempt reads the
//! marker first. The marker is there exactly when an earlier attempt's writes are; if that
//! commit lands after a later attempt's read version, that attempt conflicts on the marker
//! key it read and the next one finds it. So after `commit_unknown_result` each commit is
//! answered what the attempt that committed decided, and never decided again against its
//! own writes. A part with none (buckets, changes, change trims only) is idempotent: a
//! retry rewrites the same values and decides again; a commit fenced once stays fenced
//! (epochs only grow), and one written by an attempt of unknown outcome is answered `Ok`
//! or, when the lease moved in between, `Fenced` — as a lone commit always was.
//!
//! Nothing is acknowledged before it is durable: every answer is sent after the part's
//! transaction committed (or with the error that ended it).

use std::collections::HashMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tether_proto::synclog::OpRecord;
use tether_proto::SetKey;

use super::kv::{KvDatabase, KvTransaction, MAX_KEY_BYTES, MAX_VALUE_BYTES};
use super::{abort, decode_epoch, from_json, read_limited, Encoded, KvStore, TxError};
use crate::store::batch::{BatchConfig, Queue, Request};
use crate::store::{Epoch, OpRetention, StoreError};

/// Starts the batching writer of `store` (a handle without a queue of its own) on
/// `runtime`.
pub(super) fn start<D: KvDatabase>(
    store: KvStore<D>,
    config: BatchConfig,
    metrics: Option<crate::metrics::Metrics>,
    runtime: &tokio::runtime::Handle,
) -> Queue {
    Queue::start(
        config,
        "FoundationDB",
        Arc::new(move |batch| {
            let (store, metrics) = (store.clone(), metrics.clone());
            Box::pin(async move { write_batch(&store, config, metrics.as_ref(), batch).await })
        }),
        runtime,
    )
}

/// What became of one commit of a batch; stored in the transaction marker, so a retry
/// after an unknown result answers what the attempt that committed decided.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) enum Decision {
    /// Written.
    Written,
    /// Its set's lease epoch moved: nothing written.
    Fenced,
    /// It named op ids already remembered: nothing written; their records.
    Known(Vec<OpRecord>),
    /// A stored record it depends on (its lease, op record or op counter) did not decode:
    /// nothing written.
    Corrupt(String),
}

/// One commit of a batch, as the transaction needs it.
pub(super) struct Item<'a> {
    pub(super) set: &'a SetKey,
    pub(super) epoch: Epoch,
    pub(super) encoded: &'a Encoded,
    /// The op records, in the order of `encoded.ops`.
    pub(super) ops: &'a [OpRecord],
}

impl Decision {
    pub(super) fn answer(self, set: &SetKey, epoch: Epoch) -> Result<(), StoreError> {
        match self {
            Decision::Written => Ok(()),
            Decision::Fenced => Err(StoreError::Fenced {
                set: set.to_string(),
                epoch: epoch.0,
            }),
            Decision::Known(records) => Err(StoreError::OpsKnown(records)),
            Decision::Corrupt(e) => Err(StoreError::Corrupt(e)),
        }
    }
}

impl Encoded {
    /// Bytes this commit adds to a transaction (keys and values written, the keys it reads
    /// and a share of the marker), the measure of [`BatchConfig::max_batch_bytes`].
    pub(super) fn size(&self) -> usize {
        let writes: usize = self.writes.iter().map(|(k, v)| k.len() + v.len()).sum();
        let trims: usize = self.trims.iter().map(|(b, e)| b.len() + e.len()).sum();
        let ops: usize = self
            .ops
            .iter()
            .map(|(k, v, age)| k.len() + 2 * v.len() + age.len())
            .sum();
        self.lease.len() + self.count.len() + writes + trims + ops + 16
    }

    /// Whether FDB takes every key and value of it (else it goes alone, and fails alone).
    fn fits_fdb(&self) -> bool {
        let mut keys = std::iter::once(&self.lease)
            .chain(self.writes.iter().map(|(k, _)| k))
            .chain(self.ops.iter().flat_map(|(k, _, age)| [k, age]))
            .chain(self.trims.iter().flat_map(|(b, e)| [b, e]));
        let mut values = self
            .writes
            .iter()
            .map(|(_, v)| v)
            .chain(self.ops.iter().map(|(_, v, _)| v));
        keys.all(|k| k.len() <= MAX_KEY_BYTES) && values.all(|v| v.len() <= MAX_VALUE_BYTES)
    }

    /// Remembers or trims op ids: applying it twice would answer differently.
    fn marked(&self) -> bool {
        !self.ops.is_empty() || self.retention.is_some()
    }
}

/// Cuts a batch (in queue order) into parts of at most `max_bytes` each; a commit larger
/// than that, or that FDB would refuse, is a part of its own.
pub(super) fn split<T>(items: Vec<(T, Encoded)>, max_bytes: usize) -> Vec<Vec<(T, Encoded)>> {
    let mut parts = Vec::new();
    let (mut part, mut bytes) = (Vec::new(), 0usize);
    for (t, e) in items {
        let (size, alone) = (e.size(), !e.fits_fdb());
        if !part.is_empty() && (alone || bytes.saturating_add(size) > max_bytes) {
            parts.push(std::mem::take(&mut part));
            bytes = 0;
        }
        bytes = bytes.saturating_add(size);
        part.push((t, e));
        if alone {
            parts.push(std::mem::take(&mut part));
            bytes = 0;
        }
    }
    if !part.is_empty() {
        parts.push(part);
    }
    parts
}

/// Writes one batch and answers every request in it.
async fn write_batch<D: KvDatabase>(
    store: &KvStore<D>,
    config: BatchConfig,
    metrics: Option<&crate::metrics::Metrics>,
    batch: Vec<Request>,
) {
    let mut encoded = Vec::with_capacity(batch.len());
    for r in batch {
        match store.encode_commit(&r.set, &r.commit) {
            Ok(e) => encoded.push((r, e)),
            // Fails alone, before anything is sent.
            Err(e) => r.answer(Err(e)),
        }
    }
    for part in split(encoded, config.max_batch_bytes) {
        // A requester that gave up while the parts before this one were written: its
        // commit is not written (the queue dropped those that gave up before).
        let part: Vec<(Request, Encoded)> =
            part.into_iter().filter(|(r, _)| !r.abandoned()).collect();
        if part.is_empty() {
            continue;
        }
        if let Some(m) = metrics {
            m.store_commit(part.len());
        }
        let items: Vec<Item<'_>> = part
            .iter()
            .map(|(r, e)| Item {
                set: &r.set,
                epoch: r.epoch,
                encoded: e,
                ops: &r.commit.ops,
            })
            .collect();
        let decided = tokio::time::timeout(config.deadline, store.commit_batch(&items)).await;
        drop(items);
        match decided {
            Ok(Ok(decisions)) => {
                for ((r, _), d) in part.into_iter().zip(decisions) {
                    let answer = d.answer(&r.set, r.epoch);
                    r.answer(answer);
                }
            }
            Ok(Err(e)) => {
                for (r, _) in part {
                    r.answer(Err(e.clone()));
                }
            }
            Err(_) => {
                // The transaction may still commit: no commit of it is acknowledged or
                // failed for sure.
                let n = part.len();
                for (r, _) in part {
                    r.answer(Err(StoreError::FateUnknown(format!(
                        "batch of {n} commits: no answer from FoundationDB within {} ms",
                        config.deadline.as_millis()
                    ))));
                }
            }
        }
    }
}

/// A set's state in a batch's transaction.
#[derive(Default)]
struct SetState {
    /// Its lease epoch as read (`None`: never leased), or why it did not decode.
    epoch: Option<Result<Option<u64>, String>>,
    /// Its op counter as read, or why it did not decode.
    count: Option<Result<u64, String>>,
    /// Op ids its accepted commits add.
    added: u64,
    /// The retention of its last accepted commit that has one.
    retention: Option<OpRetention>,
    /// Whether an accepted commit touches its op ids (the counter is written).
    touched: bool,
}

fn decoded<T>(r: Result<T, TxError>) -> Result<Result<T, String>, TxError> {
    match r {
        Ok(v) => Ok(Ok(v)),
        Err(TxError::Abort(StoreError::Corrupt(why))) => Ok(Err(why)),
        Err(TxError::Abort(e)) => Ok(Err(e.to_string())),
        Err(e @ TxError::Kv(_)) => Err(e),
    }
}

impl<D: KvDatabase> KvStore<D> {
    /// Writes `items` in one transaction (retried within [`super::Limits`]; marked when
    /// any of them is not idempotent) and returns each one's decision, in order.
    pub(super) async fn commit_batch(
        &self,
        items: &[Item<'_>],
    ) -> Result<Vec<Decision>, StoreError> {
        let body = |trx: Arc<D::Trx>, _| async move { self.batch_in(&*trx, items).await };
        if items.iter().any(|i| i.encoded.marked()) {
            self.run_once("commit", body).await
        } else {
            self.run("commit", body).await
        }
    }

    /// One attempt of a batch: the reads, the decisions, the writes.
    async fn batch_in(&self, trx: &D::Trx, items: &[Item<'_>]) -> Result<Vec<Decision>, TxError> {
        // 1. Every read at once: leases, op records, op counters.
        let mut sets: HashMap<&str, SetState> = HashMap::new();
        let mut lease_keys: Vec<(&str, &[u8])> = Vec::new();
        let mut count_keys: Vec<(&str, &[u8])> = Vec::new();
        for i in items {
            let s = i.set.as_str();
            let state = sets.entry(s).or_insert_with(|| {
                lease_keys.push((s, &i.encoded.lease));
                SetState::default()
            });
            if i.encoded.marked() && state.count.is_none() {
                state.count = Some(Ok(0));
                count_keys.push((s, &i.encoded.count));
            }
        }
        let op_keys: Vec<&[u8]> = items
            .iter()
            .flat_map(|i| i.encoded.ops.iter().map(|(k, _, _)| k.as_slice()))
            .collect();
        let (leases, counts, ops) = futures::try_join!(
            futures::future::try_join_all(lease_keys.iter().map(|(_, k)| trx.get(k))),
            futures::future::try_join_all(count_keys.iter().map(|(_, k)| trx.get(k))),
            futures::future::try_join_all(op_keys.iter().map(|k| trx.get(k))),
        )?;
        for ((s, _), v) in lease_keys.iter().zip(leases) {
            let epoch = decoded(v.map(|v| decode_epoch(&v)).transpose())?;
            if let Some(state) = sets.get_mut(s) {
                state.epoch = Some(epoch);
            }
        }
        for ((s, _), v) in count_keys.iter().zip(counts) {
            let count = decoded(v.map_or(Ok(0), |v| decode_epoch(&v)))?;
            if let Some(state) = sets.get_mut(s) {
                state.count = Some(count);
            }
        }
        // The op ids remembered: in the store, or carried by an accepted commit before.
        let mut remembered: HashMap<&[u8], Result<OpRecord, String>> = HashMap::new();
        for (k, v) in op_keys.iter().zip(ops) {
            if let Some(v) = v {
                remembered.insert(k, decoded(from_json::<OpRecord>(&v))?);
            }
        }

        // 2. The decisions, in queue order; the accepted commits' writes.
        let mut decisions = Vec::with_capacity(items.len());
        for i in items {
            let e = i.encoded;
            let Some(state) = sets.get_mut(i.set.as_str()) else {
                return Err(abort(StoreError::Backend(
                    "FoundationDB batch: a set without its lease read".into(),
                )));
            };
            let decision = match &state.epoch {
                Some(Err(why)) => Decision::Corrupt(why.clone()),
                Some(Ok(current)) if *current == Some(i.epoch.0) => {
                    let mut known = Vec::new();
                    let mut corrupt = None;
                    for (k, _, _) in &e.ops {
                        match remembered.get(k.as_slice()) {
                            Some(Ok(record)) => known.push(record.clone()),
                            Some(Err(why)) => corrupt = Some(why.clone()),
                            None => {}
                        }
                    }
                    match (corrupt, &state.count) {
                        (Some(why), _) => Decision::Corrupt(why),
                        (None, Some(Err(why))) if e.marked() => Decision::Corrupt(why.clone()),
                        _ if !known.is_empty() => Decision::Known(known),
                        _ => Decision::Written,
                    }
                }
                _ => Decision::Fenced,
            };
            if decision == Decision::Written {
                for (k, v) in &e.writes {
                    trx.set(k, v);
                }
                for (begin, end) in &e.trims {
                    trx.clear_range(begin, end);
                }
                for ((k, body, age), record) in e.ops.iter().zip(i.ops) {
                    trx.set(k, body);
                    trx.set(age, &[]);
                    remembered.insert(k.as_slice(), Ok(record.clone()));
                }
                state.added += e.ops.len() as u64;
                state.touched |= e.marked();
                if e.retention.is_some() {
                    state.retention = e.retention;
                }
            }
            decisions.push(decision);
        }

        // 3. Per set: the op retention and the counter, once.
        let mut counted = Vec::new();
        for i in items {
            let s = i.set.as_str();
            let Some(state) = sets.remove(s) else {
                continue; // done for an earlier commit of the set
            };
            if !state.touched {
                continue;
            }
            let Some(Ok(count)) = state.count else {
                continue; // not touched: its commits were refused as corrupt
            };
            counted.push((s, &i.encoded.count, count + state.added, state.retention));
        }
        let trims = counted.iter().map(|(s, _, n, retention)| async move {
            let Some(OpRetention {
                keep_last,
                keep_since_ms,
            }) = *retention
            else {
                return Ok(Vec::new());
            };
            // The oldest first, while more than `keep_last` remain and they are older
            // than `keep_since_ms`.
            let excess = usize::try_from(n.saturating_sub(keep_last)).unwrap_or(usize::MAX);
            let range = (
                self.root.pack(&("op_age", *s, 0u64)),
                self.root.pack(&("op_age", *s, keep_since_ms)),
            );
            read_limited(trx, range, excess).await
        });
        let trimmed = futures::future::try_join_all(trims).await?;
        for ((s, count_key, n, _), old) in counted.iter().zip(trimmed) {
            let age_space = self.root.subspace(&("op_age", *s));
            for (k, _) in &old {
                let (_, op_id): (u64, String) = age_space
                    .unpack(k)
                    .map_err(|e| abort(StoreError::Corrupt(e.to_string())))?;
                trx.clear(k);
                trx.clear(&self.root.pack(&("op", *s, op_id.as_str())));
            }
            trx.set(count_key, &n.saturating_sub(old.len() as u64).to_be_bytes());
        }
        Ok(decisions)
    }
}
