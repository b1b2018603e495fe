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
