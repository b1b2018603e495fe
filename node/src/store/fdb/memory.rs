//! An in-memory transactional key-value store with FoundationDB's semantics, for running
//! the FDB store's logic where no cluster exists: multi-version reads at the transaction's
//! read version, read-your-writes, conflicts on every key and range read (a commit fails
//! with `not_committed` when anything it read changed since), FDB's key, value and
//! transaction size limits, and failures injected on purpose — `commit_unknown_result`
//! with or without the writes applied, any error on a read or a commit, random faults
//! from a seed, and an unreachable cluster (every call waits forever).
//!
//! It is a test double for the cluster, not a store: nothing is durable.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::ops::Bound;
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::kv::{
    code, KvDatabase, KvError, KvTransaction, RangeChunk, MAX_KEY_BYTES, MAX_TRANSACTION_BYTES,
    MAX_VALUE_BYTES,
};

/// What the next commit does instead of committing normally.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommitFault {
    /// Applies the writes, then reports `commit_unknown_result` (the commit landed; the
    /// client cannot know).
    UnknownApplied,
    /// Reports `commit_unknown_result` without applying anything.
    UnknownNotApplied,
    /// Fails with this error, writing nothing.
    Error(KvError),
}

/// Counters of what the database saw, for tests to check the paths they meant to run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Transactions started.
    pub begun: u64,
    /// Commits that applied writes (read-only commits are not counted).
    pub applied: u64,
    /// Commits refused for a conflict.
    pub conflicts: u64,
    /// Faults injected (queued or random).
    pub injected: u64,
}

#[derive(Debug)]
struct Chaos {
    rng: StdRng,
    /// One commit in `one_in` fails, and one transaction in `2 * one_in` fails a read.
    one_in: u32,
}

/// A key's values, oldest first: (version, value or `None` when cleared).
type History = Vec<(u64, Option<Vec<u8>>)>;

/// Runs before a commit is decided, as if another client committed in between.
type Hook = Box<dyn FnOnce(&MemoryKv) + Send>;

#[derive(Default)]
struct State {
    /// The last committed version.
    version: u64,
    /// Every key's history: (version, value or `None` when cleared), oldest first.
    data: BTreeMap<Vec<u8>, History>,
    /// Every commit's write conflict ranges (`begin..end`), with its version: a read of
    /// anything in one conflicts with that commit, whether the value changed or not.
    written: Vec<(u64, Vec<u8>, Vec<u8>)>,
    commit_faults: VecDeque<CommitFault>,
    before_commit: VecDeque<Hook>,
    read_faults: VecDeque<KvError>,
    chaos: Option<Chaos>,
    unreachable: bool,
    stats: Stats,
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("State")
            .field("version", &self.version)
            .field("keys", &self.data.len())
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl State {
    /// `key`'s value as of `version`.
    fn value_at(&self, key: &[u8], version: u64) -> Option<Vec<u8>> {
        self.data
            .get(key)?
            .iter()
            .rev()
            .find(|(v, _)| *v <= version)
            .and_then(|(_, value)| value.clone())
    }

    /// Whether a commit after `version` wrote anything in `begin..end`.
    fn written_since(&self, begin: &[u8], end: &[u8], version: u64) -> bool {
        self.written
            .iter()
            .rev()
            .take_while(|(v, _, _)| *v > version)
            .any(|(_, b, e)| b.as_slice() < end && begin < e.as_slice())
    }

    fn next_read_fault(&mut self) -> Option<KvError> {
        let e = self.read_faults.pop_front()?;
        self.stats.injected += 1;
        Some(e)
    }

    /// Whether a new transaction fails one of its reads (random faults): drawn once per
    /// transaction, as FDB's `transaction_too_old` and `future_version` come from a
    /// transaction's read version, not from single reads (so a transaction of many reads
    /// is not failed more often than one of a few).
    fn transaction_read_fault(&mut self) -> Option<KvError> {
        let chaos = self.chaos.as_mut()?;
        if chaos
            .rng
            .random_ratio(1, chaos.one_in.saturating_mul(2).max(1))
        {
            let code = if chaos.rng.random_bool(0.5) {
                code::TRANSACTION_TOO_OLD
            } else {
                code::FUTURE_VERSION
            };
            return Some(KvError::fdb(code));
        }
        None
    }

    fn next_commit_fault(&mut self) -> Option<CommitFault> {
        if let Some(f) = self.commit_faults.pop_front() {
            self.stats.injected += 1;
            return Some(f);
        }
        let chaos = self.chaos.as_mut()?;
        if chaos.rng.random_ratio(1, chaos.one_in.max(1)) {
            self.stats.injected += 1;
            return Some(match chaos.rng.random_range(0..3) {
                0 => CommitFault::UnknownApplied,
                1 => CommitFault::UnknownNotApplied,
                _ => CommitFault::Error(KvError::fdb(code::NOT_COMMITTED)),
            });
        }
        None
    }
}

/// The database: a cheap handle; clones share the data.
#[derive(Debug, Clone, Default)]
pub struct MemoryKv {
    state: Arc<Mutex<State>>,
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|p| p.into_inner())
}

impl MemoryKv {
    /// An empty database.
    pub fn new() -> Self {
        Self::default()
    }

    /// The next commits (in order) fail as `fault` says.
    pub fn inject_commit(&self, fault: CommitFault) {
        lock(&self.state).commit_faults.push_back(fault);
    }

    /// Runs `hook` when the next commit (with writes) is about to be decided, after its
    /// reads: what `hook` writes (with [`set_now`](Self::set_now)) lands between that
    /// transaction's reads and its commit, as a concurrent client's commit would.
    pub fn before_next_commit(&self, hook: impl FnOnce(&MemoryKv) + Send + 'static) {
        lock(&self.state).before_commit.push_back(Box::new(hook));
    }

    /// The next reads (in order) fail with `error`.
    pub fn inject_read(&self, error: KvError) {
        lock(&self.state).read_faults.push_back(error);
    }

    /// From now on, one commit in `one_in` fails at random (`commit_unknown_result` with or
    /// without its writes, or a conflict) and one transaction in `2 * one_in` fails a read with a
    /// retryable error; `seed` makes the sequence repeatable.
    pub fn chaos(&self, seed: u64, one_in: u32) {
        lock(&self.state).chaos = Some(Chaos {
            rng: StdRng::seed_from_u64(seed),
            one_in,
        });
    }

    /// While set, every read and commit waits forever, as FDB's client does by default when
    /// it cannot reach the cluster.
    pub fn set_unreachable(&self, unreachable: bool) {
        lock(&self.state).unreachable = unreachable;
    }

    /// What happened so far.
    pub fn stats(&self) -> Stats {
        lock(&self.state).stats
    }

    /// Writes `value` under `key` in a transaction of its own, outside any retry loop (for
    /// tests setting up a race).
    pub fn set_now(&self, key: &[u8], value: &[u8]) {
        let mut st = lock(&self.state);
        st.version += 1;
        let v = st.version;
        st.data
            .entry(key.to_vec())
            .or_default()
            .push((v, Some(value.to_vec())));
        st.written.push((v, key.to_vec(), key_after(key)));
    }

    /// The latest committed value of `key`.
    pub fn get_now(&self, key: &[u8]) -> Option<Vec<u8>> {
        let st = lock(&self.state);
        st.value_at(key, st.version)
    }

    /// Every key with a value now, in order.
    pub fn keys_now(&self) -> Vec<Vec<u8>> {
        let st = lock(&self.state);
        st.data
            .keys()
            .filter(|k| st.value_at(k, st.version).is_some())
            .cloned()
            .collect()
    }

    async fn wait_if_unreachable(&self) {
        if lock(&self.state).unreachable {
            std::future::pending::<()>().await;
        }
    }
}

impl KvDatabase for MemoryKv {
    type Trx = MemoryTrx;

    fn begin(&self) -> Result<MemoryTrx, KvError> {
        let mut st = lock(&self.state);
        st.stats.begun += 1;
        let read_fault = st.transaction_read_fault();
        Ok(MemoryTrx {
            kv: self.clone(),
            read_version: st.version,
            local: Mutex::new(Local::default()),
            read_fault: Mutex::new(read_fault),
        })
    }
}

#[derive(Debug, Clone)]
enum Op {
    Set(Vec<u8>, Vec<u8>),
    Clear(Vec<u8>),
    ClearRange(Vec<u8>, Vec<u8>),
    Add(Vec<u8>, i64),
}

impl Op {
    /// `value` after this op, for `key`.
    fn apply(&self, key: &[u8], value: Option<Vec<u8>>) -> Option<Vec<u8>> {
        match self {
            Op::Set(k, v) if k == key => Some(v.clone()),
            Op::Clear(k) if k == key => None,
            Op::ClearRange(b, e) if b.as_slice() <= key && key < e.as_slice() => None,
            Op::Add(k, delta) if k == key => Some(add_le(value.as_deref(), *delta)),
            _ => value,
        }
    }
}

/// The first key after `key` (`key` + `\0`): `key..key_after(key)` holds `key` alone.
fn key_after(key: &[u8]) -> Vec<u8> {
    let mut after = key.to_vec();
    after.push(0);
    after
}

/// FDB's `Add`: little-endian, the operand's width (8 bytes here), a missing value is 0.
fn add_le(current: Option<&[u8]>, delta: i64) -> Vec<u8> {
    let mut raw = [0u8; 8];
    if let Some(c) = current {
        for (dst, src) in raw.iter_mut().zip(c) {
            *dst = *src;
        }
    }
    i64::from_le_bytes(raw)
        .wrapping_add(delta)
        .to_le_bytes()
        .to_vec()
}

#[derive(Debug)]
enum Read {
    Key(Vec<u8>),
    Range(Vec<u8>, Vec<u8>),
}

#[derive(Debug, Default)]
struct Local {
    ops: Vec<Op>,
    reads: Vec<Read>,
}

/// A transaction of [`MemoryKv`].
#[derive(Debug)]
pub struct MemoryTrx {
    kv: MemoryKv,
    read_version: u64,
    local: Mutex<Local>,
    /// The random fault its next read fails with (drawn at `begin`).
    read_fault: Mutex<Option<KvError>>,
}

impl MemoryTrx {
    fn local(&self) -> MutexGuard<'_, Local> {
        self.local.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn push(&self, op: Op) {
        self.local().ops.push(op);
    }

    async fn before_read(&self) -> Result<(), KvError> {
        self.kv.wait_if_unreachable().await;
        let mut st = lock(&self.kv.state);
        if let Some(e) = st.next_read_fault() {
            return Err(e);
        }
        match self
            .read_fault
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            Some(e) => {
                st.stats.injected += 1;
                Err(e)
            }
            None => Ok(()),
        }
    }
}

#[async_trait]
impl KvTransaction for MemoryTrx {
    async fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, KvError> {
        self.before_read().await?;
        let stored = lock(&self.kv.state).value_at(key, self.read_version);
        let mut local = self.local();
        local.reads.push(Read::Key(key.to_vec()));
        Ok(local.ops.iter().fold(stored, |v, op| op.apply(key, v)))
    }

    async fn get_range(
        &self,
        begin: &[u8],
        end: &[u8],
        limit: usize,
    ) -> Result<RangeChunk, KvError> {
        self.before_read().await?;
        if begin >= end {
            return Ok(RangeChunk::default());
        }
        let range = (
            Bound::Included(begin.to_vec()),
            Bound::Excluded(end.to_vec()),
        );
        let mut local = self.local();
        let mut keys: BTreeSet<Vec<u8>> = lock(&self.kv.state)
            .data
            .range(range.clone())
            .map(|(k, _)| k.clone())
            .collect();
        for op in &local.ops {
            if let Op::Set(k, _) | Op::Add(k, _) = op {
                if begin <= k.as_slice() && k.as_slice() < end {
                    keys.insert(k.clone());
                }
            }
        }
        let mut pairs = Vec::new();
        let mut more = false;
        for k in keys {
            let stored = lock(&self.kv.state).value_at(&k, self.read_version);
            let Some(v) = local.ops.iter().fold(stored, |v, op| op.apply(&k, v)) else {
                continue;
            };
            if pairs.len() == limit {
                more = true;
                break;
            }
            pairs.push((k, v));
        }
        // Like FDB, a limited read conflicts only with what it covered.
        let covered_end = match pairs.last() {
            Some((last, _)) if more => key_after(last),
            _ => end.to_vec(),
        };
        local.reads.push(Read::Range(begin.to_vec(), covered_end));
        Ok(RangeChunk { pairs, more })
    }

    fn set(&self, key: &[u8], value: &[u8]) {
        self.push(Op::Set(key.to_vec(), value.to_vec()));
    }

    fn clear(&self, key: &[u8]) {
        self.push(Op::Clear(key.to_vec()));
    }

    fn clear_range(&self, begin: &[u8], end: &[u8]) {
        self.push(Op::ClearRange(begin.to_vec(), end.to_vec()));
    }

    fn atomic_add(&self, key: &[u8], delta: i64) {
        self.push(Op::Add(key.to_vec(), delta));
    }

    async fn commit(self) -> Result<(), KvError> {
        self.kv.wait_if_unreachable().await;
        let local = std::mem::take(&mut *self.local());
        if local.ops.is_empty() {
            // A read-only transaction has nothing to commit (FDB answers at once).
            return Ok(());
        }
        let mut size = 0usize;
        for op in &local.ops {
            let (key, value) = match op {
                Op::Set(k, v) => (k, v.len()),
                Op::Clear(k) | Op::Add(k, _) => (k, 8),
                Op::ClearRange(b, e) => (b, e.len()),
            };
            if key.len() > MAX_KEY_BYTES {
                return Err(KvError::fdb(code::KEY_TOO_LARGE));
            }
            if value > MAX_VALUE_BYTES {
                return Err(KvError::fdb(code::VALUE_TOO_LARGE));
            }
            size += key.len() + value;
        }
        if size > MAX_TRANSACTION_BYTES {
            return Err(KvError::fdb(code::TRANSACTION_TOO_LARGE));
        }
        let hook = lock(&self.kv.state).before_commit.pop_front();
        if let Some(hook) = hook {
            hook(&self.kv);
        }
        let mut st = lock(&self.kv.state);
        let fault = st.next_commit_fault();
        match &fault {
            Some(CommitFault::UnknownNotApplied) => {
                return Err(KvError::fdb(code::COMMIT_UNKNOWN_RESULT))
            }
            Some(CommitFault::Error(e)) => return Err(e.clone()),
            Some(CommitFault::UnknownApplied) | None => {}
        }
        let conflict = local.reads.iter().any(|read| match read {
            Read::Key(k) => st.written_since(k, &key_after(k), self.read_version),
            Read::Range(b, e) => st.written_since(b, e, self.read_version),
        });
        if conflict {
            st.stats.conflicts += 1;
            return Err(KvError::fdb(code::NOT_COMMITTED));
        }
        st.version += 1;
        let version = st.version;
        for op in &local.ops {
            let conflict_range = match op {
                Op::Set(k, _) | Op::Clear(k) | Op::Add(k, _) => (k.clone(), key_after(k)),
                Op::ClearRange(b, e) => (b.clone(), e.clone()),
            };
            st.written
                .push((version, conflict_range.0, conflict_range.1));
            let touched: Vec<Vec<u8>> = match op {
                Op::Set(k, _) | Op::Clear(k) | Op::Add(k, _) => vec![k.clone()],
                Op::ClearRange(b, e) if b >= e => Vec::new(),
                Op::ClearRange(b, e) => st
                    .data
                    .range::<[u8], _>((
                        Bound::Included(b.as_slice()),
                        Bound::Excluded(e.as_slice()),
                    ))
                    .map(|(k, _)| k.clone())
                    .collect(),
            };
            for k in touched {
                let before = st.value_at(&k, version);
                let after = op.apply(&k, before);
                st.data.entry(k).or_default().push((version, after));
            }
        }
        st.stats.applied += 1;
        if fault == Some(CommitFault::UnknownApplied) {
            return Err(KvError::fdb(code::COMMIT_UNKNOWN_RESULT));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    //! The in-memory database keeps FDB's rules, or the store tests on it prove nothing.
    use super::*;

    fn kv_with(pairs: &[(&[u8], &[u8])]) -> MemoryKv {
        let kv = MemoryKv::new();
        for (k, v) in pairs {
            kv.set_now(k, v);
        }
        kv
    }

    #[tokio::test]
    async fn reads_see_the_transactions_own_writes_and_its_read_version_only() {
        let kv = kv_with(&[(b"a", b"1")]);
        let t = kv.begin().expect("begin");
        kv.set_now(b"a", b"2");
        assert_eq!(
            t.get(b"a").await.expect("get"),
            Some(b"1".to_vec()),
            "snapshot"
        );
        t.set(b"b", b"x");
        t.clear(b"a");
        assert_eq!(t.get(b"b").await.expect("get"), Some(b"x".to_vec()));
        assert_eq!(t.get(b"a").await.expect("get"), None);
        let range = t.get_range(b"a", b"z", 10).await.expect("range");
        assert_eq!(range.pairs, vec![(b"b".to_vec(), b"x".to_vec())]);
    }

    #[tokio::test]
    async fn a_commit_conflicts_when_a_key_it_read_changed() {
        let kv = kv_with(&[(b"k", b"1")]);
        let t = kv.begin().expect("begin");
        t.get(b"k").await.expect("get");
        t.set(b"other", b"x");
        kv.set_now(b"k", b"1"); // the same value still counts as a write
        let err = t.commit().await.expect_err("conflict");
        assert_eq!(err.code, code::NOT_COMMITTED);
        assert!(err.retryable && !err.maybe_committed);
        assert_eq!(
            kv.get_now(b"other"),
            None,
            "a refused commit writes nothing"
        );
        assert_eq!(kv.stats().conflicts, 1);
    }

    #[tokio::test]
    async fn blind_writes_and_atomic_adds_do_not_conflict() {
        let kv = kv_with(&[(b"n", &5i64.to_le_bytes())]);
        let t = kv.begin().expect("begin");
        t.set(b"k", b"mine");
        t.atomic_add(b"n", 3);
        kv.set_now(b"k", b"theirs");
        kv.set_now(b"n", &10i64.to_le_bytes());
        t.commit().await.expect("no read, no conflict");
        assert_eq!(kv.get_now(b"k"), Some(b"mine".to_vec()));
        assert_eq!(kv.get_now(b"n"), Some(13i64.to_le_bytes().to_vec()));
    }

    #[tokio::test]
    async fn a_limited_range_read_conflicts_only_with_what_it_covered() {
        let kv = kv_with(&[(b"a", b"1"), (b"b", b"2"), (b"c", b"3")]);
        let t = kv.begin().expect("begin");
        let page = t.get_range(b"a", b"z", 2).await.expect("range");
        assert_eq!(page.pairs.len(), 2);
        assert!(page.more);
        t.set(b"x", b"1");
        kv.set_now(b"c", b"changed");
        t.commit().await.expect("c was not read");
        let t = kv.begin().expect("begin");
        t.get_range(b"a", b"z", 10).await.expect("range");
        t.set(b"x", b"2");
        kv.set_now(b"q", b"new key inside the range read");
        assert_eq!(
            t.commit().await.expect_err("phantom").code,
            code::NOT_COMMITTED
        );
    }

    #[tokio::test]
    async fn clear_range_removes_keys_and_conflicts_with_readers_of_missing_keys() {
        let kv = kv_with(&[(b"a1", b"1"), (b"a2", b"2"), (b"b", b"3")]);
        let reader = kv.begin().expect("begin");
        assert_eq!(reader.get(b"a9").await.expect("get"), None);
        reader.set(b"z", b"1");
        let t = kv.begin().expect("begin");
        t.clear_range(b"a", b"b");
        t.commit().await.expect("commit");
        assert_eq!(kv.keys_now(), vec![b"b".to_vec()]);
        assert_eq!(
            reader.commit().await.expect_err("conflict").code,
            code::NOT_COMMITTED
        );
    }

    #[tokio::test]
    async fn fdb_size_limits_refuse_the_commit() {
        let kv = MemoryKv::new();
        let t = kv.begin().expect("begin");
        t.set(b"big", &vec![b'x'; MAX_VALUE_BYTES + 1]);
        let err = t.commit().await.expect_err("too large");
        assert_eq!(err.code, code::VALUE_TOO_LARGE);
        assert!(!err.retryable);
        let t = kv.begin().expect("begin");
        t.set(b"big", &vec![b'x'; MAX_VALUE_BYTES]);
        t.commit().await.expect("exactly the limit fits");
        let t = kv.begin().expect("begin");
        t.set(&vec![b'k'; MAX_KEY_BYTES + 1], b"v");
        assert_eq!(t.commit().await.expect_err("key").code, code::KEY_TOO_LARGE);
    }

    #[tokio::test]
    async fn injected_unknown_results_apply_or_not_as_asked() {
        let kv = MemoryKv::new();
        kv.inject_commit(CommitFault::UnknownApplied);
        kv.inject_commit(CommitFault::UnknownNotApplied);
        let t = kv.begin().expect("begin");
        t.set(b"a", b"1");
        let err = t.commit().await.expect_err("unknown");
        assert!(err.maybe_committed && err.retryable);
        assert_eq!(kv.get_now(b"a"), Some(b"1".to_vec()));
        let t = kv.begin().expect("begin");
        t.set(b"b", b"1");
        assert!(t.commit().await.expect_err("unknown").maybe_committed);
        assert_eq!(kv.get_now(b"b"), None);
        assert_eq!(kv.stats().injected, 2);
    }
}
