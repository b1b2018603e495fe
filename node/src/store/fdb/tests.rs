//! The FoundationDB store's logic on the in-memory database: the store conformance suite
//! (plainly, and with random faults and one-pair range pages), and the retry, idempotency,
//! timeout and size-limit paths a real cluster only takes when something goes wrong.

use std::sync::Arc;
use std::time::Duration;

use foundationdb_tuple::Subspace;
use serde_json::json;
use tether_proto::{Bucket, BucketId, Fields, Hlc, SetKey};

use super::kv::{code, KvError, MAX_VALUE_BYTES};
use super::memory::{CommitFault, MemoryKv};
use super::{check_bucket_limit, KvStore, Limits, MAX_BUCKET_BYTES, STORED_BUCKET_ENVELOPE};
use crate::error::NodeError;
use crate::store::conformance as c;
use crate::store::{
    AssignedRecord, Commit, DeviceRecord, Epoch, OpRetention, Pairing, PairingCode, Store,
    StoreError, UserRecord,
};

/// Deadline of a test's store call: far above the store's own bounds, so reaching it means
/// the call hung.
const HUNG: Duration = Duration::from_secs(60);

fn store(kv: &MemoryKv) -> KvStore<MemoryKv> {
    KvStore::new(kv.clone(), "tether")
}

fn key(t: &impl foundationdb_tuple::TuplePack) -> Vec<u8> {
    Subspace::all().subspace(&"tether").pack(t)
}

async fn bounded<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(HUNG, f)
        .await
        .expect("the store call hung past every bound")
}

fn set(k: &str) -> SetKey {
    SetKey::parse(k).expect("set key")
}

mod conformance {
    //! Every case of the one conformance suite, on a fresh in-memory database.
    use super::*;

    macro_rules! cases {
        ($($name:ident),* $(,)?) => {$(
            #[tokio::test]
            async fn $name() {
                c::$name(Arc::new(store(&MemoryKv::new()))).await;
            }
        )*};
    }

    c::every_case!(cases);
}

mod conformance_under_faults {
    //! Every case again while the first commit reports `commit_unknown_result` after
    //! applying its writes and one commit in three fails at random — `commit_unknown_result`
    //! with or without its writes applied, or a conflict — and transactions fail a read now and then,
    //! with range reads one pair per page: each operation must answer exactly as without
    //! faults, or a retried transaction was applied twice.
    use super::*;

    macro_rules! cases {
        ($($name:ident),* $(,)?) => {$(
            #[tokio::test]
            async fn $name() {
                let kv = MemoryKv::new();
                // The first read and the first commit fail for certain, the rest at random.
                kv.inject_read(KvError::fdb(code::TRANSACTION_TOO_OLD));
                kv.inject_commit(CommitFault::UnknownApplied);
                kv.chaos(0x7e7e_0000 + stringify!($name).len() as u64, 3);
                let limits = Limits { range_page: 1, ..Limits::default() };
                c::$name(Arc::new(KvStore::with_limits(kv.clone(), "tether", limits))).await;
                assert!(kv.stats().injected > 0, "no fault was injected: the case proved nothing");
            }
        )*};
    }

    c::every_case!(cases);
}

#[tokio::test]
async fn fdb_lease_take_over_retried_after_unknown_result_names_the_previous_owner() {
    for fault in [CommitFault::UnknownApplied, CommitFault::UnknownNotApplied] {
        let kv = MemoryKv::new();
        let store = store(&kv);
        let s = set("A1");
        let first = bounded(store.acquire_lease(&s, "n1")).await.expect("lease");
        kv.inject_commit(fault.clone());
        let taken = bounded(store.acquire_lease(&s, "n2")).await.expect("lease");
        assert_eq!(
            taken.previous_owner.as_deref(),
            Some("n1"),
            "{fault:?}: the new owner must tell n1 to stop serving (Relinquish)"
        );
        assert_eq!(
            taken.epoch,
            Epoch(first.epoch.0 + 1),
            "{fault:?}: one take-over, one epoch"
        );
        assert_eq!(kv.stats().injected, 1);
        let err = bounded(store.commit(&s, first.epoch, Commit::default())).await;
        assert!(
            matches!(err, Err(StoreError::Fenced { .. })),
            "{fault:?}: {err:?}"
        );
        bounded(store.commit(&s, taken.epoch, Commit::default()))
            .await
            .expect("the new epoch commits");
    }
}

#[tokio::test]
async fn fdb_user_creation_retried_after_unknown_result_reports_created() {
    let kv = MemoryKv::new();
    let store = store(&kv);
    let alice = UserRecord {
        user_id: "alice".into(),
        secret_hash: [7; 32],
        created_ms: 1,
    };
    kv.inject_commit(CommitFault::UnknownApplied);
    assert!(
        bounded(store.create_user(alice.clone()))
            .await
            .expect("create"),
        "the user was created by this call: `admin user add` must print its secret"
    );
    assert_eq!(
        bounded(store.get_user("alice")).await.expect("get"),
        Some(alice.clone())
    );
    kv.inject_commit(CommitFault::UnknownApplied);
    assert!(
        !bounded(store.create_user(UserRecord {
            secret_hash: [8; 32],
            ..alice.clone()
        }))
        .await
        .expect("create"),
        "a second creation is still refused"
    );
    assert_eq!(
        bounded(store.get_user("alice")).await.expect("get"),
        Some(alice)
    );
}

#[tokio::test]
async fn fdb_pairing_code_consumed_by_a_retried_take_is_returned_once() {
    let kv = MemoryKv::new();
    let store = store(&kv);
    let code = PairingCode {
        code: "7Q4K-92XD".into(),
        device_id: "D1".into(),
        expires_ms: 5,
    };
    bounded(store.put_pairing_code(code.clone()))
        .await
        .expect("put");
    kv.inject_commit(CommitFault::UnknownApplied);
    assert_eq!(
        bounded(store.take_pairing_code("7Q4K-92XD"))
            .await
            .expect("take"),
        Some(code),
        "the code this call consumed is this call's (not a 404)"
    );
    assert_eq!(
        bounded(store.take_pairing_code("7Q4K-92XD"))
            .await
            .expect("take"),
        None,
        "and nobody else's"
    );
}

#[tokio::test]
async fn fdb_set_pairing_retried_returns_the_pairing_it_replaced() {
    let kv = MemoryKv::new();
    let store = store(&kv);
    let p = |u: &str, s: &str| Pairing {
        device_id: "D1".into(),
        user_id: u.into(),
        structure: Some(s.into()),
        paired_ms: 1,
    };
    bounded(store.set_pairing("D1", Some(p("alice", "home"))))
        .await
        .expect("pair");
    kv.inject_commit(CommitFault::UnknownApplied);
    let replaced = bounded(store.set_pairing("D1", Some(p("bob", "office"))))
        .await
        .expect("re-pair");
    assert_eq!(
        replaced,
        Some(p("alice", "home")),
        "held subscribes are released on the structure the device left"
    );
    assert!(bounded(store.user_pairings("alice"))
        .await
        .expect("list")
        .is_empty());
    kv.inject_commit(CommitFault::UnknownApplied);
    assert_eq!(
        bounded(store.set_pairing("D1", None))
            .await
            .expect("unpair"),
        Some(p("bob", "office"))
    );
}

#[tokio::test]
async fn fdb_credential_swap_retried_after_unknown_result_reports_its_win() {
    let kv = MemoryKv::new();
    let store = store(&kv);
    let rec = |h: u8| AssignedRecord {
        current_hash: [h; 32],
        issued_ms: 1,
        previous: None,
    };
    kv.inject_commit(CommitFault::UnknownApplied);
    assert!(bounded(store.swap_assigned("D1", None, Some(rec(1))))
        .await
        .expect("swap"));
    kv.inject_commit(CommitFault::UnknownApplied);
    assert!(
        bounded(store.swap_assigned("D1", Some([1; 32]), Some(rec(2))))
            .await
            .expect("rotate")
    );
    assert!(
        !bounded(store.swap_assigned("D1", Some([1; 32]), Some(rec(3))))
            .await
            .expect("stale rotation")
    );
    assert_eq!(
        bounded(store.get_assigned("D1")).await.expect("get"),
        Some(rec(2))
    );
}

/// A commit carrying an op id whose result is unknown (its writes applied or not) reports
/// success once: the bucket, its change and the op record exist once, the set's op count
/// is not bumped twice, and the device's retry of that op id is then answered from the
/// record. Without the transaction marker the store's own retry would find the op id it
/// just wrote and answer `OpsKnown`, and the actor would reconcile a write that is in fact
/// committed a second time.
#[tokio::test]
async fn fdb_an_op_id_commit_retried_after_unknown_result_is_applied_once() {
    for fault in [CommitFault::UnknownApplied, CommitFault::UnknownNotApplied] {
        let kv = MemoryKv::new();
        let store = store(&kv);
        let s = set("U1");
        let id = BucketId::parse("device.U1").expect("id");
        let epoch = bounded(store.acquire_lease(&s, "n1"))
            .await
            .expect("lease")
            .epoch;
        let count = |kv: &MemoryKv| kv.get_now(&key(&("op_count", "U1")));

        kv.inject_commit(fault.clone());
        bounded(store.commit(&s, epoch, c::logged("device.U1", 1, Some("op-a"), 5)))
            .await
            .unwrap_or_else(|e| panic!("{fault:?}: committed once, so it must succeed: {e:?}"));
        assert_eq!(kv.stats().injected, 1, "{fault:?}");
        let page = bounded(store.history(&id, 0, 10))
            .await
            .expect("history")
            .expect("exists");
        assert_eq!(
            page.changes.iter().map(|c| c.version).collect::<Vec<_>>(),
            [1],
            "{fault:?}: one change"
        );
        assert_eq!(
            bounded(store.load_set(&s)).await.expect("load"),
            c::logged("device.U1", 1, None, 0).buckets,
            "{fault:?}"
        );
        assert_eq!(
            count(&kv),
            Some(1u64.to_be_bytes().to_vec()),
            "{fault:?}: one op id remembered, counted once"
        );

        // The device retries op-a: nothing is written, the first attempt's record answers.
        let err =
            bounded(store.commit(&s, epoch, c::logged("device.U1", 2, Some("op-a"), 6))).await;
        match err {
            Err(StoreError::OpsKnown(known)) => {
                assert_eq!(known, vec![c::op("op-a", "device.U1", 1, 5)], "{fault:?}");
            }
            other => panic!("{fault:?}: expected OpsKnown, got {other:?}"),
        }

        // Retention under the same fault: op-a forgotten once, the count back to zero.
        kv.inject_commit(fault.clone());
        let mut trim = Commit::default();
        trim.trim.ops = Some(OpRetention {
            keep_last: 0,
            keep_since_ms: u64::MAX,
        });
        bounded(store.commit(&s, epoch, trim))
            .await
            .unwrap_or_else(|e| panic!("{fault:?}: trim: {e:?}"));
        assert_eq!(kv.stats().injected, 2, "{fault:?}");
        assert_eq!(count(&kv), Some(0u64.to_be_bytes().to_vec()), "{fault:?}");
        bounded(store.commit(&s, epoch, c::logged("device.U1", 2, Some("op-a"), 7)))
            .await
            .unwrap_or_else(|e| panic!("{fault:?}: op-a was forgotten: {e:?}"));
    }
}

#[tokio::test]
async fn fdb_a_lease_taken_while_a_commit_is_in_flight_fences_it() {
    let kv = MemoryKv::new();
    let store = store(&kv);
    let s = set("A1");
    let epoch = bounded(store.acquire_lease(&s, "n1"))
        .await
        .expect("lease")
        .epoch;
    // Another node takes the lease between the commit's epoch read and its commit.
    let lease_key = key(&("lease", "A1"));
    kv.before_next_commit(move |kv| kv.set_now(&lease_key, &(epoch.0 + 1).to_be_bytes()));
    let b = Bucket {
        id: BucketId::parse("device.A1").expect("id"),
        value: Fields::new(),
        timestamp: Hlc {
            millis: 1,
            logical: 0,
        },
        version: 1,
    };
    let err = bounded(store.commit(&s, epoch, Commit::of(vec![b]))).await;
    assert!(matches!(err, Err(StoreError::Fenced { .. })), "{err:?}");
    assert_eq!(
        kv.stats().conflicts,
        1,
        "the commit conflicted, then saw the new epoch"
    );
    assert!(bounded(store.load_set(&s)).await.expect("load").is_empty());
}

#[tokio::test]
async fn fdb_unreachable_cluster_fails_within_the_bound_with_503() {
    assert_eq!(
        Limits::default().timeout,
        Duration::from_secs(5),
        "the PostgreSQL backend's bound"
    );
    let kv = MemoryKv::new();
    let limits = Limits {
        timeout: Duration::from_millis(300),
        ..Limits::default()
    };
    let store = KvStore::with_limits(kv.clone(), "tether", limits);
    kv.set_unreachable(true);
    let err = bounded(store.put_device(DeviceRecord {
        device_id: "D1".into(),
        device_type: "thermostat".into(),
        sw_version: "1.0.0".into(),
        first_seen_ms: 1,
        last_seen_ms: 1,
    }))
    .await
    .expect_err("no cluster, no write");
    let err = NodeError::from(err);
    assert_eq!(err.code_and_status().1.as_u16(), 503, "{err}");
    let resp = actix_web::ResponseError::error_response(&err);
    assert_eq!(
        resp.headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok()),
        Some("1")
    );
    // An unreachable cluster at start is refused, not discovered by the first request.
    let probe = bounded(store.probe("FoundationDB cluster file /etc/fdb.cluster")).await;
    let msg = probe.expect_err("unreachable").to_string();
    assert!(
        msg.contains("/etc/fdb.cluster") && msg.contains("not reachable"),
        "{msg}"
    );
    kv.set_unreachable(false);
    bounded(store.probe("the cluster"))
        .await
        .expect("reachable again");
}

#[tokio::test]
async fn fdb_retryable_errors_stop_at_the_attempt_limit() {
    let kv = MemoryKv::new();
    let limits = Limits {
        max_attempts: 4,
        ..Limits::default()
    };
    let store = KvStore::with_limits(kv.clone(), "tether", limits);
    for _ in 0..10 {
        kv.inject_commit(CommitFault::Error(KvError::fdb(code::NOT_COMMITTED)));
    }
    let err = bounded(store.claim_structure("home", "alice"))
        .await
        .expect_err("always conflicting");
    assert!(
        err.to_string().contains("gave up after 4 attempts"),
        "{err}"
    );
    assert_eq!(kv.stats().injected, 4);
    // A non-retryable error is not retried at all.
    let kv = MemoryKv::new();
    let once = KvStore::new(kv.clone(), "tether");
    kv.inject_commit(CommitFault::Error(KvError::fdb(
        code::TRANSACTION_TIMED_OUT,
    )));
    bounded(once.claim_structure("home", "alice"))
        .await
        .expect_err("timed out");
    assert_eq!(kv.stats().begun, 1);
}

#[tokio::test]
async fn fdb_retried_reads_and_commits_after_transient_errors_succeed() {
    let kv = MemoryKv::new();
    let store = store(&kv);
    kv.inject_read(KvError::fdb(code::TRANSACTION_TOO_OLD));
    kv.inject_commit(CommitFault::Error(KvError::fdb(code::PROCESS_BEHIND)));
    assert_eq!(
        bounded(store.claim_structure("home", "alice"))
            .await
            .expect("claim"),
        "alice"
    );
    assert_eq!(kv.stats().injected, 2);
    assert_eq!(kv.stats().begun, 3);
}

#[tokio::test]
async fn fdb_range_reads_span_several_pages() {
    let kv = MemoryKv::new();
    let limits = Limits {
        range_page: 2,
        ..Limits::default()
    };
    let store = KvStore::with_limits(kv.clone(), "tether", limits);
    for i in 0..7 {
        let d = format!("D{i}");
        bounded(store.set_pairing(
            &d,
            Some(Pairing {
                device_id: d.clone(),
                user_id: "alice".into(),
                structure: None,
                paired_ms: i,
            }),
        ))
        .await
        .expect("pair");
    }
    let mut got: Vec<u64> = bounded(store.user_pairings("alice"))
        .await
        .expect("list")
        .iter()
        .map(|p| p.paired_ms)
        .collect();
    got.sort_unstable();
    assert_eq!(got, (0..7).collect::<Vec<_>>());
}

#[tokio::test]
async fn fdb_transaction_markers_expire() {
    let kv = MemoryKv::new();
    let store = store(&kv);
    let markers = |kv: &MemoryKv| {
        let (b, e) = Subspace::all().subspace(&("tether", "txn")).range();
        kv.keys_now()
            .into_iter()
            .filter(|k| k.as_slice() > b.as_slice() && k.as_slice() < e.as_slice())
            .count()
    };
    // An old marker (as left by a node long ago) is cleared by the next marked operation.
    kv.set_now(&key(&("txn", 5u64, "old")), b"true");
    assert_eq!(markers(&kv), 1);
    bounded(store.create_user(UserRecord {
        user_id: "alice".into(),
        secret_hash: [1; 32],
        created_ms: 1,
    }))
    .await
    .expect("create");
    assert_eq!(
        markers(&kv),
        1,
        "the old one went, this one's stays a while"
    );
}

#[test]
fn fdb_largest_bucket_fits_one_fdb_value() {
    let widest = Bucket {
        id: BucketId::parse("device.A1").expect("id"),
        value: Fields::new(),
        timestamp: Hlc {
            millis: u64::MAX,
            logical: u32::MAX,
        },
        version: u64::MAX,
    };
    let empty_value = serde_json::to_vec(&widest.value).expect("json").len();
    let envelope = crate::store::encode_bucket(&widest).expect("encode").len() - empty_value;
    assert!(
        envelope <= STORED_BUCKET_ENVELOPE,
        "a stored bucket adds {envelope} bytes"
    );
    assert!(check_bucket_limit(MAX_BUCKET_BYTES).is_ok());
    assert!(check_bucket_limit(65_536).is_ok(), "the default fits");
    let refused = check_bucket_limit(MAX_VALUE_BYTES).expect_err("cannot fit");
    assert!(refused.contains("100000"), "{refused}");
}

#[tokio::test]
async fn fdb_bucket_at_the_accepted_limit_commits_and_one_beyond_fdb_is_refused() {
    let kv = MemoryKv::new();
    let store = store(&kv);
    let s = set("A1");
    let epoch = bounded(store.acquire_lease(&s, "n1"))
        .await
        .expect("lease")
        .epoch;
    // A value whose JSON is exactly `len` bytes: {"p":"xxx…"}.
    let bucket = |len: usize| {
        let mut value = Fields::new();
        value.insert("p".into(), json!("x".repeat(len - 8)));
        assert_eq!(serde_json::to_vec(&value).expect("json").len(), len);
        Bucket {
            id: BucketId::parse("device.A1").expect("id"),
            value,
            timestamp: Hlc {
                millis: u64::MAX,
                logical: u32::MAX,
            },
            version: u64::MAX,
        }
    };
    bounded(store.commit(&s, epoch, Commit::of(vec![bucket(MAX_BUCKET_BYTES)])))
        .await
        .expect("the largest bucket the node accepts is stored");
    let begun = kv.stats().begun;
    let err = bounded(store.commit(&s, epoch, Commit::of(vec![bucket(MAX_VALUE_BYTES)])))
        .await
        .expect_err("above FDB's value limit");
    assert!(err.to_string().contains("2103"), "{err}");
    assert_eq!(
        kv.stats().begun,
        begun + 1,
        "value_too_large is not retried"
    );
}

mod batching {
    //! The batching writer (`fdb/batch.rs`): commits of many sets in one transaction, each
    //! decided alone. On the test's single-threaded runtime the writer task runs only when
    //! the test awaits, so commits polled together (`join!`) are queued before the writer
    //! takes any: they form one batch, deterministically.
    use super::*;
    use crate::store::fdb::BatchConfig;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn batching(kv: &MemoryKv, config: BatchConfig) -> KvStore<MemoryKv> {
        KvStore::new(kv.clone(), "tether").with_batching(config, None)
    }

    async fn lease(store: &KvStore<MemoryKv>, k: &str) -> Epoch {
        bounded(store.acquire_lease(&set(k), "n1"))
            .await
            .expect("lease")
            .epoch
    }

    /// `store.commit` of set `k` (the future owns the set key).
    fn commit<'a>(
        store: &'a KvStore<MemoryKv>,
        k: &str,
        epoch: Epoch,
        commit: Commit,
    ) -> impl std::future::Future<Output = Result<(), StoreError>> + 'a {
        let s = set(k);
        async move { store.commit(&s, epoch, commit).await }
    }

    fn op_count(kv: &MemoryKv, k: &str) -> Option<u64> {
        kv.get_now(&key(&("op_count", k)))
            .map(|v| u64::from_be_bytes(v.try_into().expect("u64")))
    }

    async fn changes(store: &KvStore<MemoryKv>, id: &str) -> usize {
        bounded(store.history(&BucketId::parse(id).expect("id"), 0, 100))
            .await
            .expect("history")
            .map_or(0, |p| p.changes.len())
    }

    /// One transaction for the commits of three sets: the one whose lease moved is refused
    /// and writes nothing, the two others commit with their changes and op ids.
    #[tokio::test]
    async fn fdb_one_batch_refuses_its_fenced_set_and_commits_the_others() {
        let kv = MemoryKv::new();
        let store = store(&kv);
        let stale = lease(&store, "A1").await;
        bounded(store.acquire_lease(&set("A1"), "n2"))
            .await
            .expect("taken over");
        let (eb, ec) = (lease(&store, "B1").await, lease(&store, "C1").await);
        let before = kv.stats();
        let (a, b, c) = bounded(async {
            futures::join!(
                commit(
                    &store,
                    "A1",
                    stale,
                    c::logged("device.A1", 1, Some("op-a"), 1)
                ),
                commit(&store, "B1", eb, c::logged("device.B1", 1, Some("op-b"), 1)),
                commit(&store, "C1", ec, c::logged("device.C1", 1, Some("op-c"), 1)),
            )
        })
        .await;
        assert_eq!(
            kv.stats().begun - before.begun,
            1,
            "one transaction for three"
        );
        assert!(matches!(a, Err(StoreError::Fenced { .. })), "{a:?}");
        b.expect("B1 commits beside a fenced set");
        c.expect("C1 commits beside a fenced set");
        assert!(bounded(store.load_set(&set("A1")))
            .await
            .expect("load")
            .is_empty());
        assert_eq!(changes(&store, "device.A1").await, 0);
        assert_eq!(op_count(&kv, "A1"), None, "nothing of A1 written");
        for k in ["B1", "C1"] {
            assert_eq!(
                bounded(store.load_set(&set(k))).await.expect("load").len(),
                1
            );
            assert_eq!(changes(&store, &format!("device.{k}")).await, 1);
            assert_eq!(op_count(&kv, k), Some(1), "{k}'s op id counted once");
        }
    }

    /// Commits of many sets in flight at once share transactions.
    #[tokio::test]
    async fn fdb_concurrent_commits_of_many_sets_are_batched() {
        let kv = MemoryKv::new();
        let store = store(&kv);
        let mut epochs = Vec::new();
        for i in 0..40 {
            epochs.push((set(&format!("M{i}")), lease(&store, &format!("M{i}")).await));
        }
        let before = kv.stats();
        let commits = epochs.iter().map(|(s, e)| {
            let (store, s, e) = (store.clone(), s.clone(), *e);
            tokio::spawn(async move {
                let id = format!("device.{s}");
                let op = format!("op-{s}");
                store.commit(&s, e, c::logged(&id, 1, Some(&op), 1)).await
            })
        });
        for done in bounded(futures::future::join_all(commits)).await {
            done.expect("task").expect("commit");
        }
        let txns = kv.stats().begun - before.begun;
        assert!(txns < 40, "{txns} transactions for 40 commits: not batched");
        for (s, _) in &epochs {
            assert_eq!(bounded(store.load_set(s)).await.expect("load").len(), 1);
        }
    }

    /// A commit naming an op id the store remembers, or one an earlier commit of the same
    /// batch carries, is answered with the remembered record and writes nothing; its
    /// neighbours in the batch commit.
    #[tokio::test]
    async fn fdb_a_known_op_id_in_a_batch_refuses_that_commit_only() {
        let kv = MemoryKv::new();
        let store = store(&kv);
        let (ek, eo, ed) = (
            lease(&store, "K1").await,
            lease(&store, "K2").await,
            lease(&store, "K3").await,
        );
        bounded(commit(
            &store,
            "K1",
            ek,
            c::logged("device.K1", 1, Some("op-k"), 1),
        ))
        .await
        .expect("first attempt");
        let before = kv.stats();
        let (known, other, first, again) = bounded(async {
            futures::join!(
                commit(&store, "K1", ek, c::logged("device.K1", 2, Some("op-k"), 2)),
                commit(&store, "K2", eo, c::logged("device.K2", 1, Some("op-2"), 2)),
                commit(
                    &store,
                    "K3",
                    ed,
                    c::logged("device.K3", 1, Some("op-dup"), 2)
                ),
                commit(
                    &store,
                    "K3",
                    ed,
                    c::logged("device.K3", 2, Some("op-dup"), 3)
                ),
            )
        })
        .await;
        assert_eq!(kv.stats().begun - before.begun, 1, "one batch");
        match known {
            Err(StoreError::OpsKnown(r)) => {
                assert_eq!(r, vec![c::op("op-k", "device.K1", 1, 1)]);
            }
            other => panic!("expected OpsKnown, got {other:?}"),
        }
        other.expect("K2 commits beside a known op id");
        first.expect("the first carrier of op-dup commits");
        match again {
            Err(StoreError::OpsKnown(r)) => {
                assert_eq!(r, vec![c::op("op-dup", "device.K3", 1, 2)]);
            }
            other => panic!("expected OpsKnown from the batch, got {other:?}"),
        }
        let k1 = bounded(store.load_set(&set("K1"))).await.expect("load");
        assert_eq!(k1[0].version, 1, "the replay wrote nothing");
        assert_eq!(changes(&store, "device.K1").await, 1);
        let k3 = bounded(store.load_set(&set("K3"))).await.expect("load");
        assert_eq!(k3[0].version, 1, "the second op-dup wrote nothing");
        assert_eq!(op_count(&kv, "K1"), Some(1));
        assert_eq!(op_count(&kv, "K2"), Some(1));
        assert_eq!(op_count(&kv, "K3"), Some(1));
    }

    /// A batch with op ids whose commit result is unknown (applied or not): every commit is
    /// answered what the attempt that committed decided — the accepted ones `Ok` (not
    /// `OpsKnown` from their own op ids), the fenced one `Fenced`, the replay `OpsKnown` —
    /// and no op id is counted twice.
    #[tokio::test]
    async fn fdb_a_batch_retried_after_unknown_result_answers_its_first_decisions() {
        for fault in [CommitFault::UnknownApplied, CommitFault::UnknownNotApplied] {
            let kv = MemoryKv::new();
            let store = store(&kv);
            let stale = lease(&store, "U0").await;
            bounded(store.acquire_lease(&set("U0"), "n2"))
                .await
                .expect("taken over");
            let (e1, e2) = (lease(&store, "U1").await, lease(&store, "U2").await);
            bounded(commit(
                &store,
                "U2",
                e2,
                c::logged("device.U2", 1, Some("op-old"), 1),
            ))
            .await
            .expect("first attempt");
            kv.inject_commit(fault.clone());
            let (fenced, fine, more, replay) = bounded(async {
                futures::join!(
                    commit(
                        &store,
                        "U0",
                        stale,
                        c::logged("device.U0", 1, Some("op-0"), 5)
                    ),
                    commit(&store, "U1", e1, c::logged("device.U1", 1, Some("op-1"), 5)),
                    commit(&store, "U2", e2, c::logged("device.U2", 2, Some("op-2"), 5)),
                    commit(
                        &store,
                        "U2",
                        e2,
                        c::logged("device.U2", 3, Some("op-old"), 6)
                    ),
                )
            })
            .await;
            assert_eq!(kv.stats().injected, 1, "{fault:?}");
            assert!(
                matches!(fenced, Err(StoreError::Fenced { .. })),
                "{fault:?}: {fenced:?}"
            );
            fine.unwrap_or_else(|e| panic!("{fault:?}: U1 committed once: {e:?}"));
            more.unwrap_or_else(|e| panic!("{fault:?}: U2 committed once: {e:?}"));
            assert!(
                matches!(&replay, Err(StoreError::OpsKnown(r)) if r == &vec![c::op("op-old", "device.U2", 1, 1)]),
                "{fault:?}: {replay:?}"
            );
            assert_eq!(op_count(&kv, "U0"), None, "{fault:?}");
            assert_eq!(op_count(&kv, "U1"), Some(1), "{fault:?}: counted once");
            assert_eq!(op_count(&kv, "U2"), Some(2), "{fault:?}: op-old and op-2");
            assert_eq!(changes(&store, "device.U1").await, 1, "{fault:?}");
            assert_eq!(changes(&store, "device.U2").await, 2, "{fault:?}");
        }
    }

    /// A batch's marker larger than one FDB value (the records of 400 replays) is stored in
    /// parts and read back whole: after an unknown result every replay is answered with
    /// its record.
    #[tokio::test]
    async fn fdb_a_batch_marker_past_the_value_limit_is_stored_in_parts() {
        let kv = MemoryKv::new();
        let store = store(&kv);
        let e = lease(&store, "P1").await;
        let long = "x".repeat(200);
        let records: Vec<_> = (0..400u64)
            .map(|i| c::op(&format!("op-{i}-{long}"), "device.P1", 1, i))
            .collect();
        bounded(commit(
            &store,
            "P1",
            e,
            Commit {
                ops: records.clone(),
                ..Commit::default()
            },
        ))
        .await
        .expect("first attempts");
        let markers = |kv: &MemoryKv| {
            let (b, e) = Subspace::all().subspace(&("tether", "txn")).range();
            kv.keys_now()
                .into_iter()
                .filter(|k| k.as_slice() > b.as_slice() && k.as_slice() < e.as_slice())
                .count()
        };
        let before = markers(&kv);
        kv.inject_commit(CommitFault::UnknownApplied);
        // With a new op id: answered `Ok` only from the marker (decided again, it would
        // find itself remembered).
        let fresh = c::op("op-new", "device.P1", 2, 500);
        let (replays, new) = bounded(async {
            futures::join!(
                futures::future::join_all(records.iter().map(|r| {
                    commit(
                        &store,
                        "P1",
                        e,
                        Commit {
                            ops: vec![r.clone()],
                            ..Commit::default()
                        },
                    )
                })),
                commit(
                    &store,
                    "P1",
                    e,
                    Commit {
                        ops: vec![fresh.clone()],
                        ..Commit::default()
                    },
                ),
            )
        })
        .await;
        assert_eq!(kv.stats().injected, 1);
        new.expect("the new op id was written once");
        for (r, answer) in records.iter().zip(replays) {
            match answer {
                Err(StoreError::OpsKnown(known)) => assert_eq!(known, vec![r.clone()]),
                other => panic!("{}: {other:?}", r.op_id),
            }
        }
        assert!(markers(&kv) - before > 1, "one marker in several parts");
        assert_eq!(op_count(&kv, "P1"), Some(401));
    }

    /// Callers are answered only after FDB's commit returned, and told `Ok` only when
    /// their writes are there: while the batch's commit is being decided (the hook holds
    /// it) nobody has an answer, and a batch whose commit failed is not acknowledged.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn fdb_a_batch_is_acknowledged_only_once_committed() {
        let kv = MemoryKv::new();
        // One writer: no other batch is answered while the held one commits.
        let store = Arc::new(batching(
            &kv,
            BatchConfig {
                writers: 1,
                ..BatchConfig::default()
            },
        ));
        let sets: Vec<(SetKey, Epoch)> = {
            let mut v = Vec::new();
            for k in ["W1", "W2", "W3"] {
                v.push((set(k), lease(&store, k).await));
            }
            v
        };
        let answered = Arc::new(AtomicUsize::new(0));
        let seen = Arc::new(AtomicUsize::new(usize::MAX));
        {
            let (answered, seen) = (answered.clone(), seen.clone());
            kv.before_next_commit(move |_| {
                // Time for any answer sent early to arrive.
                std::thread::sleep(Duration::from_millis(200));
                seen.store(answered.load(Ordering::SeqCst), Ordering::SeqCst);
            });
        }
        let tasks: Vec<_> = sets
            .iter()
            .map(|(s, e)| {
                let (store, s, e, answered) = (store.clone(), s.clone(), *e, answered.clone());
                tokio::spawn(async move {
                    let id = format!("device.{s}");
                    let r = store.commit(&s, e, c::logged(&id, 1, Some("op"), 1)).await;
                    answered.fetch_add(1, Ordering::SeqCst);
                    r
                })
            })
            .collect();
        for t in tasks {
            bounded(t).await.expect("task").expect("commit");
        }
        assert_eq!(
            seen.load(Ordering::SeqCst),
            0,
            "a commit was answered before FDB's commit returned"
        );

        // A commit that fails (not retryable, nothing applied): nobody is told Ok, and
        // nothing is there.
        let later: Vec<(SetKey, Epoch)> = {
            let mut v = Vec::new();
            for k in ["X1", "X2", "X3"] {
                v.push((set(k), lease(&store, k).await));
            }
            v
        };
        kv.inject_commit(CommitFault::Error(KvError::fdb(
            code::TRANSACTION_TIMED_OUT,
        )));
        kv.inject_commit(CommitFault::Error(KvError::fdb(
            code::TRANSACTION_TIMED_OUT,
        )));
        kv.inject_commit(CommitFault::Error(KvError::fdb(
            code::TRANSACTION_TIMED_OUT,
        )));
        let results = bounded(futures::future::join_all(later.iter().map(|(s, e)| {
            let id = format!("device.{s}");
            let store = store.clone();
            async move { store.commit(s, *e, c::logged(&id, 1, Some("op"), 1)).await }
        })))
        .await;
        for ((s, _), r) in later.iter().zip(results) {
            let there = !bounded(store.load_set(s)).await.expect("load").is_empty();
            assert!(r.is_err(), "{s}: told Ok although its commit failed");
            assert!(!there, "{s}: written although its commit failed");
        }
    }

    /// A batch whose encoded size passes the bound is split into several transactions,
    /// all committed: 110 buckets of FDB's largest value are 11 MB, more than FDB takes in
    /// one transaction (10 MB).
    #[tokio::test]
    async fn fdb_a_batch_over_the_size_bound_is_split_and_all_of_it_commits() {
        let kv = MemoryKv::new();
        let store = store(&kv);
        let mut sets = Vec::new();
        for i in 0..110 {
            sets.push((set(&format!("S{i}")), lease(&store, &format!("S{i}")).await));
        }
        let big = |s: &SetKey| {
            let mut value = Fields::new();
            value.insert("p".into(), json!("x".repeat(MAX_BUCKET_BYTES - 8)));
            let mut commit = c::logged(&format!("device.{s}"), 1, Some("op"), 1);
            commit.buckets[0].value = value;
            commit
        };
        let before = kv.stats();
        let results = bounded(futures::future::join_all(
            sets.iter().map(|(s, e)| store.commit(s, *e, big(s))),
        ))
        .await;
        let txns = kv.stats().begun - before.begun;
        for ((s, _), r) in sets.iter().zip(results) {
            r.unwrap_or_else(|e| panic!("{s}: {e:?}"));
        }
        assert!(txns > 1, "one transaction of 11 MB");
        assert!(txns < 110, "{txns} transactions: not batched at all");
        assert_eq!(kv.stats().conflicts, 0);
        for (s, _) in &sets {
            assert_eq!(bounded(store.load_set(s)).await.expect("load").len(), 1);
        }
    }

    /// A commit FDB refuses (a value over its limit) is written alone and fails alone; the
    /// commits queued with it commit.
    #[tokio::test]
    async fn fdb_a_commit_fdb_refuses_fails_alone_in_its_batch() {
        let kv = MemoryKv::new();
        let store = store(&kv);
        let (ea, eb) = (lease(&store, "V1").await, lease(&store, "V2").await);
        let mut huge = Fields::new();
        huge.insert("p".into(), json!("x".repeat(MAX_VALUE_BYTES)));
        let mut too_big = c::logged("device.V1", 1, Some("op-v1"), 1);
        too_big.buckets[0].value = huge;
        let (a, b) = bounded(async {
            futures::join!(
                commit(&store, "V1", ea, too_big),
                commit(
                    &store,
                    "V2",
                    eb,
                    c::logged("device.V2", 1, Some("op-v2"), 1)
                ),
            )
        })
        .await;
        let err = a.expect_err("above FDB's value limit");
        assert!(err.to_string().contains("2103"), "{err}");
        b.expect("its neighbour commits");
        assert!(bounded(store.load_set(&set("V1")))
            .await
            .expect("load")
            .is_empty());
    }

    /// Past its bound the queue refuses at once (Overloaded: 503 + Retry-After); queued
    /// commits still commit, and once the queue drained new ones are accepted again.
    #[tokio::test]
    async fn fdb_a_full_queue_refuses_at_once_and_recovers() {
        let kv = MemoryKv::new();
        let store = batching(
            &kv,
            BatchConfig {
                queue: 4,
                writers: 1,
                ..BatchConfig::default()
            },
        );
        let s = set("Q1");
        let e = lease(&store, "Q1").await;
        let other = set("Q2");
        let eo = lease(&store, "Q2").await;
        let mut held = Vec::new();
        for v in 1..=4u64 {
            let mut c = Box::pin(store.commit(
                &s,
                e,
                Commit::of(vec![c::bucket("device.Q1", v, json!({"v": v}))]),
            ));
            assert!(
                futures::poll!(c.as_mut()).is_pending(),
                "commit {v} is queued"
            );
            held.push(c);
        }
        let refused = match futures::poll!(std::pin::pin!(store.commit(
            &other,
            eo,
            Commit::of(vec![c::bucket("device.Q2", 1, json!({}))])
        ))) {
            std::task::Poll::Ready(r) => r,
            std::task::Poll::Pending => panic!("a commit past the bound waits"),
        };
        assert!(
            matches!(refused, Err(StoreError::Overloaded(_))),
            "{refused:?}"
        );
        let answer = NodeError::Store(refused.expect_err("refused"));
        let resp = actix_web::ResponseError::error_response(&answer);
        assert_eq!(
            resp.status(),
            actix_web::http::StatusCode::SERVICE_UNAVAILABLE
        );
        assert!(resp.headers().contains_key("retry-after"));
        for c in held {
            bounded(c).await.expect("queued commits commit");
        }
        bounded(store.commit(
            &other,
            eo,
            Commit::of(vec![c::bucket("device.Q2", 1, json!({}))]),
        ))
        .await
        .expect("accepted again once the queue drained");
        assert_eq!(
            bounded(store.load_set(&s)).await.expect("load")[0].version,
            4
        );
    }

    /// A batch that does not answer within the deadline: its commit's fate is unknown
    /// (not "failed"); a commit whose requester gave up while it was queued is not
    /// written at all.
    #[tokio::test]
    async fn fdb_a_hung_batch_is_fate_unknown_and_an_abandoned_commit_is_not_written() {
        let kv = MemoryKv::new();
        let store = batching(
            &kv,
            BatchConfig {
                writers: 1,
                deadline: Duration::from_millis(200),
                ..BatchConfig::default()
            },
        );
        let (e1, e2) = (lease(&store, "H1").await, lease(&store, "H2").await);
        kv.set_unreachable(true);
        let mut hung = Box::pin(commit(&store, "H1", e1, c::logged("device.H1", 1, None, 1)));
        assert!(futures::poll!(hung.as_mut()).is_pending());
        // The writer takes H1's batch and hangs on its reads.
        tokio::task::yield_now().await;
        let mut gave_up = Box::pin(commit(&store, "H2", e2, c::logged("device.H2", 1, None, 1)));
        assert!(futures::poll!(gave_up.as_mut()).is_pending(), "queued");
        drop(gave_up);
        kv.set_unreachable(false);
        let err = bounded(hung).await.expect_err("no answer from the cluster");
        assert!(matches!(err, StoreError::FateUnknown(_)), "{err:?}");
        // The writer goes on in queue order: once H2 answers again, the abandoned commit
        // was taken (and dropped) before.
        bounded(commit(&store, "H2", e2, Commit::default()))
            .await
            .expect("the writer goes on");
        assert!(
            bounded(store.load_set(&set("H2")))
                .await
                .expect("load")
                .is_empty(),
            "written although its requester gave up before its batch began"
        );
    }
}
