//! The batching writer of the PostgreSQL store: group commit across bucket sets.
//!
//! Every actor of a node hands its commit to one queue. A few writer tasks each take
//! whatever is queued (up to [`BatchConfig::max_batch`]) and write it in ONE transaction:
//!
//! 1. one round trip (pipelined): `BEGIN`, lock every named set's lease row `FOR SHARE`
//!    and read its epoch, read which of the batch's op ids are already remembered;
//! 2. decide per commit: a set whose epoch moved is fenced, a commit naming a known op id
//!    is answered with the remembered records — both write nothing, the others go on;
//! 3. one round trip (pipelined): multi-row statements for the accepted commits' op ids,
//!    buckets, changes and trims, and `COMMIT`. If PostgreSQL refuses a statement, the
//!    transaction is aborted and that `COMMIT` rolls it back: nothing committed. A write
//!    that failed without PostgreSQL's answer (the connection lost) leaves the batch's fate
//!    unknown: the `COMMIT` behind it may have run.
//!
//! Two round trips per batch, whatever its size (a remote PostgreSQL's latency counts
//! twice, not four times). The transaction is opened by a `BEGIN` sent ahead of its first
//! statements, not by `tokio_postgres::Transaction` (which waits for `BEGIN`'s answer and
//! rolls back when dropped), so the connection is returned to the pool only once its
//! `COMMIT` was answered ([`Pooled`]); any other way out closes it.
//!
//! Fencing is as strong as the one-commit path: the lease rows stay share-locked from the
//! epoch check to `COMMIT`, so a node taking a lease (`FOR UPDATE`) waits for the batch or
//! makes the batch see its new epoch — never both commit. Each commit is answered only
//! after `COMMIT` returned. If a write statement fails, the batch is rolled back (nothing
//! was committed) and its accepted commits are written one by one, so one bad commit
//! cannot fail its neighbours.
//!
//! Deadline: a batch's transaction that has not answered within [`BatchConfig::deadline`]
//! is abandoned with its connection (never reused: a stalled server may still commit it),
//! and each of its commits is answered [`StoreError::FateUnknown`]. A commit whose
//! requester stopped waiting before its batch began is not written at all.
//!
//! Admission, the queue and the writer tasks are the backend-independent part
//! ([`crate::store::batch`]): past [`BatchConfig::queue`] a commit fails at once with
//! [`StoreError::Overloaded`] (503 + `Retry-After`), never an unbounded wait.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use tether_proto::synclog::OpRecord;

use super::{as_i64, backend, from_json, to_json, PostgresStore};
use crate::store::batch::{BatchConfig, Queue, Request};
use crate::store::{OpRetention, StoreError};

/// Starts the batching writer of `store` (which writes through its pool) on the current
/// runtime.
pub(super) fn start(store: PostgresStore, config: BatchConfig) -> Queue {
    Queue::start(
        config,
        "PostgreSQL",
        Arc::new(move |batch| {
            let store = store.clone();
            Box::pin(async move { write_batch(&store, batch).await })
        }),
        &tokio::runtime::Handle::current(),
    )
}

const LEASES_FOR_SHARE: &str = "
SELECT set_key, epoch FROM tether_leases WHERE set_key = ANY($1) ORDER BY set_key FOR SHARE";

const KNOWN_OPS: &str = "
SELECT o.set_key, o.body FROM tether_ops o JOIN unnest($1::text[], $2::text[]) AS t(set_key, op_id)
    ON o.set_key = t.set_key AND o.op_id = t.op_id";

/// Without `ON CONFLICT`: an op id written since the check (or twice in the batch) fails
/// the statement, so the pipelined `COMMIT` rolls the batch back.
const INSERT_OPS: &str = "
INSERT INTO tether_ops (set_key, op_id, at_ms, body)
SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[], $4::jsonb[])";

const UPSERT_BUCKETS: &str = "
INSERT INTO tether_buckets (set_key, id, value, ts_ms, ts_logical, version)
SELECT * FROM unnest($1::text[], $2::text[], $3::jsonb[], $4::bigint[], $5::bigint[], $6::bigint[])
ON CONFLICT (set_key, id) DO UPDATE SET value = EXCLUDED.value, ts_ms = EXCLUDED.ts_ms,
    ts_logical = EXCLUDED.ts_logical, version = EXCLUDED.version";

const INSERT_CHANGES: &str = "
INSERT INTO tether_changes (set_key, id, version, body)
SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[], $4::jsonb[])";

const TRIM_CHANGES: &str = "
DELETE FROM tether_changes c USING unnest($1::text[], $2::text[], $3::bigint[]) AS t(set_key, id, through)
WHERE c.set_key = t.set_key AND c.id = t.id AND c.version <= t.through";

/// Per set: drops the oldest op ids older than `since` while more than `keep` remain.
const TRIM_OPS: &str = "
DELETE FROM tether_ops o USING (
    SELECT t.set_key, x.op_id FROM unnest($1::text[], $2::bigint[], $3::bigint[]) AS t(set_key, since, keep)
    CROSS JOIN LATERAL (
        SELECT op_id FROM tether_ops WHERE set_key = t.set_key AND at_ms < t.since ORDER BY at_ms
        LIMIT GREATEST(0, (SELECT count(*) FROM tether_ops WHERE set_key = t.set_key) - t.keep)) x
) d WHERE o.set_key = d.set_key AND o.op_id = d.op_id";

/// The accepted commits of a batch as columns of the multi-row statements.
#[derive(Default)]
struct Columns<'a> {
    o_sets: Vec<&'a str>,
    o_ids: Vec<&'a str>,
    o_at: Vec<i64>,
    o_bodies: Vec<serde_json::Value>,
    b_sets: Vec<&'a str>,
    b_ids: Vec<&'a str>,
    b_values: Vec<serde_json::Value>,
    b_ms: Vec<i64>,
    b_logical: Vec<i64>,
    b_versions: Vec<i64>,
    c_sets: Vec<&'a str>,
    c_ids: Vec<&'a str>,
    c_versions: Vec<i64>,
    c_bodies: Vec<serde_json::Value>,
    t_sets: Vec<&'a str>,
    t_ids: Vec<&'a str>,
    t_through: Vec<i64>,
    r_sets: Vec<&'a str>,
    r_since: Vec<i64>,
    r_keep: Vec<i64>,
}

impl<'a> Columns<'a> {
    fn of(accepted: &[&'a Request]) -> Result<Self, StoreError> {
        let mut c = Columns::default();
        // A bucket written by two commits of the batch: its last state only (one row
        // may not be upserted twice by one statement).
        let mut last_bucket: HashMap<(&str, &str), usize> = HashMap::new();
        let mut retention: HashMap<&str, OpRetention> = HashMap::new();
        for r in accepted {
            let s = r.set.as_str();
            for op in &r.commit.ops {
                c.o_sets.push(s);
                c.o_ids.push(op.op_id.as_str());
                c.o_at.push(as_i64(op.at_ms)?);
                c.o_bodies.push(to_json(op)?);
            }
            for b in &r.commit.buckets {
                let row = (
                    to_json(&b.value)?,
                    as_i64(b.timestamp.millis)?,
                    i64::from(b.timestamp.logical),
                    as_i64(b.version)?,
                );
                match last_bucket.get(&(s, b.id.as_str())) {
                    Some(&i) => {
                        (c.b_values[i], c.b_ms[i], c.b_logical[i], c.b_versions[i]) = row;
                    }
                    None => {
                        last_bucket.insert((s, b.id.as_str()), c.b_ids.len());
                        c.b_sets.push(s);
                        c.b_ids.push(b.id.as_str());
                        c.b_values.push(row.0);
                        c.b_ms.push(row.1);
                        c.b_logical.push(row.2);
                        c.b_versions.push(row.3);
                    }
                }
            }
            for (id, ch) in &r.commit.changes {
                c.c_sets.push(s);
                c.c_ids.push(id.as_str());
                c.c_versions.push(as_i64(ch.version)?);
                c.c_bodies.push(to_json(ch)?);
            }
            for (id, through) in &r.commit.trim.changes_through {
                c.t_sets.push(s);
                c.t_ids.push(id.as_str());
                c.t_through.push(as_i64(*through)?);
            }
            if let Some(keep) = r.commit.trim.ops {
                retention.insert(s, keep);
            }
        }
        for (s, keep) in retention {
            let clamp = |v: u64| as_i64(v.min(i64::MAX as u64));
            c.r_sets.push(s);
            c.r_since.push(clamp(keep.keep_since_ms)?);
            c.r_keep.push(clamp(keep.keep_last)?);
        }
        Ok(c)
    }
}

/// What became of one commit of the batch before anything was written.
enum Verdict {
    /// Its set's epoch moved, or its op ids are known: answered with this, nothing written.
    Refused(StoreError),
    /// Goes into the batch's writes.
    Accepted,
}

/// Writes one batch and answers every request in it.
async fn write_batch(store: &PostgresStore, batch: Vec<Request>) {
    // Requesters that stopped waiting were dropped by the queue (`store::batch`).
    if batch.is_empty() {
        return;
    }
    store.metrics.store_commit(batch.len());
    let tried = match store.client().await {
        Err(e) => Err(Fallback::All(e)),
        Ok(client) => {
            let mut conn = Pooled {
                client: Some(client),
                idle: false,
            };
            match tokio::time::timeout(store.deadline, try_batch(&mut conn, &batch)).await {
                Ok(tried) => tried,
                Err(_) => {
                    // The transaction may still commit at the server: the connection goes
                    // (`conn` is dropped before its COMMIT was answered), and no commit of
                    // the batch is acknowledged or failed for sure.
                    Err(Fallback::All(StoreError::FateUnknown(format!(
                        "batch of {} commits: no answer from PostgreSQL within {} ms",
                        batch.len(),
                        store.deadline.as_millis()
                    ))))
                }
            }
        }
    };
    match tried {
        Ok(answers) => {
            for (r, answer) in batch.into_iter().zip(answers) {
                // A dropped receiver: the requester gave up; nothing to tell it.
                r.answer(answer);
            }
        }
        Err(Fallback::Each(verdicts)) => {
            // The writes failed before COMMIT (nothing committed): the accepted commits go
            // one by one, so a bad one fails alone.
            for (r, verdict) in batch.into_iter().zip(verdicts) {
                let answer = match verdict {
                    Verdict::Refused(e) => Err(e),
                    Verdict::Accepted => store.commit_one(&r.set, r.epoch, r.commit.clone()).await,
                };
                r.answer(answer);
            }
        }
        Err(Fallback::All(e)) => {
            for r in batch {
                r.answer(Err(e.clone()));
            }
        }
    }
}

/// A pooled connection carrying a batch's transaction. Dropped before its `COMMIT` was
/// answered (`idle` unset: a failed statement before it, a deadline, the task dropped) it
/// is closed, never returned to the pool, which would hand its open transaction — or a
/// stalled server's late answers — to the connection's next user.
struct Pooled {
    client: Option<deadpool_postgres::Object>,
    idle: bool,
}

impl Pooled {
    fn client(&self) -> &deadpool_postgres::Object {
        match &self.client {
            Some(c) => c,
            None => unreachable!("taken only when dropped"),
        }
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        if let (Some(client), false) = (self.client.take(), self.idle) {
            super::abandon(client);
        }
    }
}

/// How a batch that could not commit as one is answered.
enum Fallback {
    /// Every request fails with this (the transaction's fate is unknown or it never ran).
    All(StoreError),
    /// Nothing was committed; refused requests keep their verdict, accepted ones are
    /// written one by one.
    Each(Vec<Verdict>),
}

async fn try_batch(
    conn: &mut Pooled,
    batch: &[Request],
) -> Result<Vec<Result<(), StoreError>>, Fallback> {
    let all = |e: tokio_postgres::Error| Fallback::All(backend(e));
    let client = conn.client();
    let leases = client.prepare_cached(LEASES_FOR_SHARE).await.map_err(all)?;
    let known_ops = client.prepare_cached(KNOWN_OPS).await.map_err(all)?;
    let insert_ops = client.prepare_cached(INSERT_OPS).await.map_err(all)?;
    let upsert = client.prepare_cached(UPSERT_BUCKETS).await.map_err(all)?;
    let changes = client.prepare_cached(INSERT_CHANGES).await.map_err(all)?;
    let trim_changes = client.prepare_cached(TRIM_CHANGES).await.map_err(all)?;
    let trim_ops = client.prepare_cached(TRIM_OPS).await.map_err(all)?;

    let sets: Vec<&str> = batch
        .iter()
        .map(|r| r.set.as_str())
        .collect::<HashSet<_>>()
        .into_iter()
        .collect();
    let (mut q_sets, mut q_ops) = (Vec::new(), Vec::new());
    for r in batch {
        for op in &r.commit.ops {
            q_sets.push(r.set.as_str());
            q_ops.push(op.op_id.as_str());
        }
    }

    let txn: &tokio_postgres::Client = client;
    // Round trip 1: the transaction begun, the lease rows locked and read, the known op
    // ids read (pipelined: each is sent when first polled, in this order).
    let read_known = async {
        if q_ops.is_empty() {
            return Ok(Vec::new());
        }
        txn.query(&known_ops, &[&q_sets, &q_ops]).await
    };
    let lease_params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&sets];
    let (begun, epochs, known) = futures::join!(
        txn.batch_execute("BEGIN"),
        txn.query(&leases, &lease_params),
        read_known
    );
    begun.map_err(all)?;
    let epochs: HashMap<String, i64> = epochs
        .map_err(all)?
        .into_iter()
        .map(|row| (row.get::<_, String>(0), row.get::<_, i64>(1)))
        .collect();
    let mut remembered: HashMap<(String, String), OpRecord> = HashMap::new();
    for row in known.map_err(all)? {
        let set: String = row.get(0);
        let op: OpRecord = from_json(&set, row.get(1)).map_err(Fallback::All)?;
        remembered.insert((set, op.op_id.clone()), op);
    }

    // The verdicts, in queue order: a later commit of the batch naming an op id an
    // earlier accepted one carries is answered with that one's record.
    let mut verdicts = Vec::with_capacity(batch.len());
    for r in batch {
        let s = r.set.as_str();
        let current = epochs.get(s).copied();
        let verdict = if as_i64(r.epoch.0).ok() != current {
            Verdict::Refused(StoreError::Fenced {
                set: s.to_string(),
                epoch: r.epoch.0,
            })
        } else {
            let known: Vec<OpRecord> = r
                .commit
                .ops
                .iter()
                .filter_map(|op| remembered.get(&(s.to_string(), op.op_id.clone())).cloned())
                .collect();
            if known.is_empty() {
                for op in &r.commit.ops {
                    remembered.insert((s.to_string(), op.op_id.clone()), op.clone());
                }
                Verdict::Accepted
            } else {
                Verdict::Refused(StoreError::OpsKnown(known))
            }
        };
        verdicts.push(verdict);
    }
    let accepted: Vec<&Request> = batch
        .iter()
        .zip(&verdicts)
        .filter(|(_, v)| matches!(v, Verdict::Accepted))
        .map(|(r, _)| r)
        .collect();
    let cols = Columns::of(&accepted).map_err(Fallback::All)?;

    // Round trip 2: every write, pipelined in this order (ops before their trim, changes
    // before theirs), and COMMIT.
    let run_ops = async {
        if cols.o_ids.is_empty() {
            return Ok(0);
        }
        txn.execute(
            &insert_ops,
            &[&cols.o_sets, &cols.o_ids, &cols.o_at, &cols.o_bodies],
        )
        .await
    };
    let run_buckets = async {
        if cols.b_ids.is_empty() {
            return Ok(0);
        }
        txn.execute(
            &upsert,
            &[
                &cols.b_sets,
                &cols.b_ids,
                &cols.b_values,
                &cols.b_ms,
                &cols.b_logical,
                &cols.b_versions,
            ],
        )
        .await
    };
    let run_changes = async {
        if cols.c_ids.is_empty() {
            return Ok(0);
        }
        txn.execute(
            &changes,
            &[&cols.c_sets, &cols.c_ids, &cols.c_versions, &cols.c_bodies],
        )
        .await
    };
    let run_trim_changes = async {
        if cols.t_ids.is_empty() {
            return Ok(0);
        }
        txn.execute(&trim_changes, &[&cols.t_sets, &cols.t_ids, &cols.t_through])
            .await
    };
    let run_trim_ops = async {
        if cols.r_sets.is_empty() {
            return Ok(0);
        }
        txn.execute(&trim_ops, &[&cols.r_sets, &cols.r_since, &cols.r_keep])
            .await
    };
    let (inserted, buckets, changed, trimmed_changes, trimmed_ops, committed) = futures::join!(
        run_ops,
        run_buckets,
        run_changes,
        run_trim_changes,
        run_trim_ops,
        txn.batch_execute("COMMIT")
    );
    let writes = [inserted, buckets, changed, trimmed_changes, trimmed_ops];
    // COMMIT answered: the transaction ended, committed or rolled back, and the connection
    // may serve again.
    conn.idle = committed.is_ok();
    if writes.iter().any(Result::is_err) {
        if writes
            .iter()
            .any(|w| w.as_ref().is_err_and(|e| e.as_db_error().is_some()))
        {
            // PostgreSQL refused a write (an op id written since the check among them),
            // which aborted the transaction: the COMMIT behind it rolled back, nothing was
            // committed. Go one by one (each commit checks its own op ids again).
            return Err(Fallback::Each(verdicts));
        }
        // A write failed without PostgreSQL's answer (the connection failed, or it was
        // never sent), so the COMMIT behind it may have committed the batch, or part of it.
        return Err(Fallback::All(StoreError::FateUnknown(format!(
            "batch of {} commits: a write failed with COMMIT sent: {}",
            batch.len(),
            writes
                .iter()
                .find_map(|w| w.as_ref().err())
                .map_or_else(String::new, ToString::to_string)
        ))));
    }
    // Answers only once COMMIT returned: an error here leaves the fate unknown, so every
    // accepted commit fails as a lone commit would (nothing acknowledged).
    committed.map_err(all)?;
    Ok(verdicts
        .into_iter()
        .map(|v| match v {
            Verdict::Refused(e) => Err(e),
            Verdict::Accepted => Ok(()),
        })
        .collect())
}
