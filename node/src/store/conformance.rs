//! The store conformance suite: every backend must pass the same tests.
//!
//! Each test takes a fresh, empty store. Backends call these from their own test module
//! (see the bottom of this file for redb).

use std::sync::Arc;

use serde_json::json;
use tether_proto::{Bucket, BucketId, Fields, Hlc, SetKey};

use tether_proto::api::UpdateOutcome;
use tether_proto::synclog::{Change, ChangeKind, OpRecord};

use super::{
    AssignedRecord, Commit, DeviceRecord, Epoch, NewDevice, OpRetention, Pairing, PairingCode,
    PreviousSet, Store, StoreError, Trim, UserRecord,
};

fn set(k: &str) -> SetKey {
    SetKey::parse(k).expect("valid set key")
}

pub(crate) fn bucket(id: &str, version: u64, v: serde_json::Value) -> Bucket {
    let value: Fields = match v {
        serde_json::Value::Object(m) => m,
        _ => Fields::new(),
    };
    Bucket {
        id: BucketId::parse(id).expect("valid id"),
        value,
        timestamp: Hlc {
            millis: 1000 + version,
            logical: 1,
        },
        version,
    }
}

pub(crate) async fn empty_set_loads_nothing(store: Arc<dyn Store>) {
    assert!(store
        .load_set(&set("nobody"))
        .await
        .expect("load")
        .is_empty());
}

pub(crate) async fn lease_epochs_strictly_increase(store: Arc<dyn Store>) {
    let s = set("A1");
    assert_eq!(store.lease_epoch(&s).await.expect("epoch"), None);
    let e1 = store.acquire_lease(&s, "n1").await.expect("lease").epoch;
    assert_eq!(store.lease_epoch(&s).await.expect("epoch"), Some(e1));
    let e2 = store.acquire_lease(&s, "n2").await.expect("lease").epoch;
    assert!(e2 > e1);
    // What an owner confirms its lease with (invariant 23): the newest epoch.
    assert_eq!(store.lease_epoch(&s).await.expect("epoch"), Some(e2));
    let other = store
        .acquire_lease(&set("B2"), "n1")
        .await
        .expect("lease")
        .epoch;
    assert!(other.0 >= 1);
}

pub(crate) async fn lease_names_the_previous_owner(store: Arc<dyn Store>) {
    let s = set("A1");
    let first = store.acquire_lease(&s, "n1").await.expect("lease");
    assert_eq!(first.previous_owner, None, "nobody held it before");
    let again = store.acquire_lease(&s, "n1").await.expect("lease");
    assert_eq!(
        again.previous_owner, None,
        "a node taking its own lease again is told nothing"
    );
    let taken = store.acquire_lease(&s, "n2").await.expect("lease");
    assert_eq!(taken.previous_owner.as_deref(), Some("n1"));
    assert!(taken.epoch > again.epoch && again.epoch > first.epoch);
}

pub(crate) async fn committed_buckets_load_back_exactly(store: Arc<dyn Store>) {
    let s = set("A1");
    let e = store.acquire_lease(&s, "n1").await.expect("lease").epoch;
    let b1 = bucket(
        "device.A1",
        3,
        json!({"t": 21.5, "mode": "heat", "nested": {"a": [1, null]}}),
    );
    let b2 = bucket("shared.A1", 1, json!({}));
    store
        .commit(&s, e, Commit::of(vec![b1.clone(), b2.clone()]))
        .await
        .expect("commit");
    let mut loaded = store.load_set(&s).await.expect("load");
    loaded.sort_by(|a, b| a.id.cmp(&b.id));
    assert_eq!(loaded, vec![b1.clone(), b2]);
    // A later commit replaces the bucket; other sets are untouched.
    let b1v4 = bucket("device.A1", 4, json!({"t": 22}));
    store
        .commit(&s, e, Commit::of(vec![b1v4.clone()]))
        .await
        .expect("commit");
    let loaded = store.load_set(&s).await.expect("load");
    assert!(loaded.contains(&b1v4) && !loaded.contains(&b1));
    assert!(
        store.load_set(&set("A")).await.expect("load").is_empty(),
        "set keys are not prefixes of each other"
    );
}

pub(crate) async fn stale_epoch_commit_is_fenced_and_writes_nothing(store: Arc<dyn Store>) {
    let s = set("A1");
    let old = store.acquire_lease(&s, "n1").await.expect("lease").epoch;
    let new = store.acquire_lease(&s, "n2").await.expect("lease").epoch;
    let err = store
        .commit(
            &s,
            old,
            Commit::of(vec![bucket("device.A1", 9, json!({"x": 1}))]),
        )
        .await
        .expect_err("fenced");
    assert!(matches!(err, StoreError::Fenced { .. }), "{err:?}");
    assert!(store.load_set(&s).await.expect("load").is_empty());
    store
        .commit(
            &s,
            new,
            Commit::of(vec![bucket("device.A1", 1, json!({"x": 2}))]),
        )
        .await
        .expect("current epoch commits");
    // Without any lease a commit is fenced too.
    let err = store
        .commit(
            &set("Z9"),
            new,
            Commit::of(vec![bucket("device.Z9", 1, json!({}))]),
        )
        .await
        .expect_err("no lease");
    assert!(matches!(err, StoreError::Fenced { .. }));
}

pub(crate) async fn concurrent_commits_are_all_durable(store: Arc<dyn Store>) {
    let mut tasks = Vec::new();
    for i in 0..64 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let s = set(&format!("S{i}"));
            let e = store.acquire_lease(&s, "n1").await.expect("lease").epoch;
            store
                .commit(
                    &s,
                    e,
                    Commit::of(vec![bucket(&format!("device.S{i}"), 1, json!({"i": i}))]),
                )
                .await
                .expect("commit");
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }
    for i in 0..64 {
        let loaded = store.load_set(&set(&format!("S{i}"))).await.expect("load");
        assert_eq!(loaded.len(), 1);
        assert_eq!(loaded[0].value.get("i"), Some(&json!(i)));
    }
}

pub(crate) async fn device_records_roundtrip(store: Arc<dyn Store>) {
    assert_eq!(store.get_device("D1").await.expect("get"), None);
    let rec = DeviceRecord {
        device_id: "D1".into(),
        device_type: "thermostat".into(),
        sw_version: "1.2.0".into(),
        first_seen_ms: 5,
        last_seen_ms: 6,
    };
    store.put_device(rec.clone()).await.expect("put");
    assert_eq!(
        store.get_device("D1").await.expect("get"),
        Some(rec.clone())
    );
    let later = DeviceRecord {
        last_seen_ms: 9,
        ..rec
    };
    store.put_device(later.clone()).await.expect("put");
    assert_eq!(store.get_device("D1").await.expect("get"), Some(later));
}

pub(crate) async fn assigned_credentials_swap_only_from_the_expected_state(store: Arc<dyn Store>) {
    assert_eq!(store.get_assigned("D1").await.expect("get"), None);
    let first = AssignedRecord {
        current_hash: [1; 32],
        issued_ms: 10,
        previous: None,
    };
    assert!(
        !store
            .swap_assigned("D1", Some([9; 32]), Some(first.clone()))
            .await
            .expect("swap"),
        "no record yet"
    );
    assert!(store
        .swap_assigned("D1", None, Some(first.clone()))
        .await
        .expect("swap"));
    assert!(
        !store
            .swap_assigned("D1", None, Some(first.clone()))
            .await
            .expect("swap"),
        "already exists"
    );
    let rotated = AssignedRecord {
        current_hash: [2; 32],
        issued_ms: 20,
        previous: Some(PreviousSet {
            hash: [1; 32],
            grace_until_ms: 99,
            sealed_current: vec![1, 2, 3],
        }),
    };
    // Two rotations racing from the same state: exactly one wins.
    let other = AssignedRecord {
        current_hash: [3; 32],
        ..rotated.clone()
    };
    let (a, b) = tokio::join!(
        store.swap_assigned("D1", Some([1; 32]), Some(rotated.clone())),
        store.swap_assigned("D1", Some([1; 32]), Some(other.clone())),
    );
    assert!(
        a.expect("swap") ^ b.expect("swap"),
        "exactly one concurrent rotation wins"
    );
    let now = store
        .get_assigned("D1")
        .await
        .expect("get")
        .expect("present");
    assert!(now == rotated || now == other);
    assert!(store
        .swap_assigned("D1", Some(now.current_hash), None)
        .await
        .expect("revoke"));
    assert_eq!(store.get_assigned("D1").await.expect("get"), None);
}

pub(crate) async fn users_are_created_once(store: Arc<dyn Store>) {
    let u = UserRecord {
        user_id: "alice".into(),
        secret_hash: [7; 32],
        created_ms: 1,
    };
    assert!(store.create_user(u.clone()).await.expect("create"));
    assert!(!store
        .create_user(UserRecord {
            secret_hash: [8; 32],
            ..u.clone()
        })
        .await
        .expect("create"));
    assert_eq!(store.get_user("alice").await.expect("get"), Some(u));
    assert_eq!(store.get_user("bob").await.expect("get"), None);
}

pub(crate) async fn pairings_follow_their_device(store: Arc<dyn Store>) {
    let p = |d: &str, u: &str| Pairing {
        device_id: d.into(),
        user_id: u.into(),
        structure: Some("home".into()),
        paired_ms: 1,
    };
    store
        .set_pairing("D1", Some(p("D1", "alice")))
        .await
        .expect("pair");
    store
        .set_pairing("D2", Some(p("D2", "alice")))
        .await
        .expect("pair");
    assert_eq!(store.user_pairings("alice").await.expect("list").len(), 2);
    // Re-pairing to another user moves the device between the users' lists.
    store
        .set_pairing("D1", Some(p("D1", "bob")))
        .await
        .expect("pair");
    assert_eq!(
        store.user_pairings("alice").await.expect("list"),
        vec![p("D2", "alice")]
    );
    assert_eq!(
        store.user_pairings("bob").await.expect("list"),
        vec![p("D1", "bob")]
    );
    store.set_pairing("D1", None).await.expect("unpair");
    assert_eq!(store.get_pairing("D1").await.expect("get"), None);
    assert!(store.user_pairings("bob").await.expect("list").is_empty());
    // A user id that is a prefix of another does not see the other's devices.
    store
        .set_pairing("D3", Some(p("D3", "alice2")))
        .await
        .expect("pair");
    assert_eq!(store.user_pairings("alice").await.expect("list").len(), 1);
}

pub(crate) async fn structures_have_one_owner(store: Arc<dyn Store>) {
    assert_eq!(
        store.claim_structure("home", "alice").await.expect("claim"),
        "alice"
    );
    assert_eq!(
        store.claim_structure("home", "bob").await.expect("claim"),
        "alice"
    );
    assert_eq!(
        store
            .structure_owner("home")
            .await
            .expect("owner")
            .as_deref(),
        Some("alice")
    );
    assert_eq!(
        store.user_structures("alice").await.expect("list"),
        vec!["home".to_string()]
    );
    assert!(store.user_structures("bob").await.expect("list").is_empty());
}

pub(crate) async fn pairing_codes_are_taken_once(store: Arc<dyn Store>) {
    let code = PairingCode {
        code: "7Q4K-92XD".into(),
        device_id: "D1".into(),
        expires_ms: 5,
    };
    store.put_pairing_code(code.clone()).await.expect("put");
    assert_eq!(
        store.take_pairing_code("7Q4K-92XD").await.expect("take"),
        Some(code)
    );
    assert_eq!(
        store.take_pairing_code("7Q4K-92XD").await.expect("take"),
        None
    );
}

fn change(version: u64, by: &str, op_id: Option<&str>, f: serde_json::Value) -> Change {
    Change {
        version,
        timestamp: 1000 + version,
        outcome: if version == 1 {
            ChangeKind::Created
        } else {
            ChangeKind::Applied
        },
        by: by.into(),
        session: Some("s1".into()),
        op_id: op_id.map(String::from),
        fields: match f {
            serde_json::Value::Object(m) => m,
            _ => Fields::new(),
        },
    }
}

pub(crate) fn op(op_id: &str, bucket: &str, version: u64, at_ms: u64) -> OpRecord {
    OpRecord {
        op_id: op_id.into(),
        bucket: bucket.into(),
        by: "device:L1".into(),
        digest: format!("digest-of-{op_id}"),
        outcome: UpdateOutcome::Applied,
        version,
        timestamp: Hlc {
            millis: 1000 + version,
            logical: 1,
        },
        at_ms,
    }
}

/// One write as the actor commits it: the bucket, its change and (optionally) its op id.
pub(crate) fn logged(id: &str, version: u64, op_id: Option<&str>, at_ms: u64) -> Commit {
    let b = bucket(id, version, json!({ "v": version }));
    let bid = BucketId::parse(id).expect("valid id");
    Commit {
        buckets: vec![b],
        changes: vec![(
            bid,
            change(version, "device:L1", op_id, json!({ "v": version })),
        )],
        ops: op_id
            .map(|o| op(o, id, version, at_ms))
            .into_iter()
            .collect(),
        trim: Trim::default(),
    }
}

pub(crate) async fn changes_commit_with_their_bucket_and_page_in_order(store: Arc<dyn Store>) {
    let s = set("L1");
    let id = BucketId::parse("device.L1").expect("valid id");
    let other = BucketId::parse("shared.L1").expect("valid id");
    assert_eq!(store.history(&id, 0, 10).await.expect("history"), None);
    let e = store.acquire_lease(&s, "n1").await.expect("lease").epoch;
    // A bucket written before the log existed: no change, oldest unknown.
    store
        .commit(&s, e, Commit::of(vec![bucket("shared.L1", 3, json!({}))]))
        .await
        .expect("commit");
    let page = store
        .history(&other, 0, 10)
        .await
        .expect("history")
        .expect("exists");
    assert_eq!(
        (page.version, page.oldest, page.changes.len(), page.more),
        (3, None, 0, false)
    );
    for v in 1..=7 {
        store
            .commit(
                &s,
                e,
                logged("device.L1", v, Some(&format!("op{v}")), 10 * v),
            )
            .await
            .expect("commit");
    }
    let all = store
        .history(&id, 0, 100)
        .await
        .expect("history")
        .expect("exists");
    assert_eq!(all.version, 7);
    assert_eq!(all.oldest, Some(1));
    assert!(!all.more);
    assert_eq!(
        all.changes,
        (1..=7)
            .map(|v| change(v, "device:L1", Some(&format!("op{v}")), json!({ "v": v })))
            .collect::<Vec<_>>(),
        "every change, as written, ascending"
    );
    // Pages: versions above since_version, at most limit, `more` while some follow.
    let p1 = store
        .history(&id, 2, 3)
        .await
        .expect("history")
        .expect("exists");
    assert_eq!(
        p1.changes.iter().map(|c| c.version).collect::<Vec<_>>(),
        [3, 4, 5]
    );
    assert!(p1.more);
    let p2 = store
        .history(&id, 5, 3)
        .await
        .expect("history")
        .expect("exists");
    assert_eq!(
        p2.changes.iter().map(|c| c.version).collect::<Vec<_>>(),
        [6, 7]
    );
    assert!(!p2.more);
    let none = store
        .history(&id, 7, 3)
        .await
        .expect("history")
        .expect("exists");
    assert!(none.changes.is_empty() && !none.more);
    // Another bucket's log (and a set whose key extends this one) stays apart.
    let e2 = store
        .acquire_lease(&set("L10"), "n1")
        .await
        .expect("lease")
        .epoch;
    store
        .commit(&set("L10"), e2, logged("device.L10", 1, None, 1))
        .await
        .expect("commit");
    assert_eq!(
        store
            .history(&id, 0, 100)
            .await
            .expect("h")
            .expect("e")
            .changes
            .len(),
        7
    );
}

pub(crate) async fn a_known_op_id_commits_nothing_and_returns_its_record(store: Arc<dyn Store>) {
    let s = set("K1");
    let id = BucketId::parse("device.K1").expect("valid id");
    let e = store.acquire_lease(&s, "n1").await.expect("lease").epoch;
    store
        .commit(&s, e, logged("device.K1", 1, Some("op-a"), 5))
        .await
        .expect("commit");
    // The retry of op-a, committed again with a new state (and a fresh op-b beside it):
    // nothing is written, and the first attempt's record comes back.
    let mut again = logged("device.K1", 2, Some("op-a"), 6);
    again.ops.push(op("op-b", "device.K1", 2, 6));
    let err = store.commit(&s, e, again).await.expect_err("op-a is known");
    match err {
        StoreError::OpsKnown(known) => assert_eq!(known, vec![op("op-a", "device.K1", 1, 5)]),
        other => panic!("expected OpsKnown, got {other:?}"),
    }
    let loaded = store.load_set(&s).await.expect("load");
    assert_eq!(
        loaded,
        vec![bucket("device.K1", 1, json!({ "v": 1 }))],
        "bucket untouched"
    );
    let page = store
        .history(&id, 0, 10)
        .await
        .expect("history")
        .expect("exists");
    assert_eq!(page.changes.len(), 1, "no change appended");
    // op-b was not remembered either: it commits on its own.
    store
        .commit(&s, e, logged("device.K1", 2, Some("op-b"), 7))
        .await
        .expect("op-b is new");
    // Op ids are per set: the same op id in another set is another write.
    let e2 = store
        .acquire_lease(&set("K2"), "n1")
        .await
        .expect("lease")
        .epoch;
    store
        .commit(&set("K2"), e2, logged("device.K2", 1, Some("op-a"), 5))
        .await
        .expect("another set");
    // A commit fenced by a newer lease writes no change and no op id either.
    let newer = store.acquire_lease(&s, "n2").await.expect("lease").epoch;
    let err = store
        .commit(&s, e, logged("device.K1", 3, Some("op-c"), 8))
        .await
        .expect_err("fenced");
    assert!(matches!(err, StoreError::Fenced { .. }), "{err:?}");
    store
        .commit(&s, newer, logged("device.K1", 3, Some("op-c"), 8))
        .await
        .expect("op-c was not remembered by the fenced commit");
    // The stale owner writing a change whose version the new owner has taken (and an op id
    // the new owner knows) is told it was fenced, not a store error nor a replay.
    for stale in [
        logged("device.K1", 3, Some("op-d"), 9),
        logged("device.K1", 3, Some("op-c"), 9),
    ] {
        let err = store.commit(&s, e, stale).await.expect_err("fenced");
        assert!(matches!(err, StoreError::Fenced { .. }), "{err:?}");
    }
    let page = store
        .history(&id, 0, 10)
        .await
        .expect("history")
        .expect("exists");
    assert_eq!(
        page.changes.iter().map(|c| c.version).collect::<Vec<_>>(),
        [1, 2, 3]
    );
}

pub(crate) async fn retention_trims_in_the_same_commit(store: Arc<dyn Store>) {
    let s = set("R1");
    let id = BucketId::parse("device.R1").expect("valid id");
    let e = store.acquire_lease(&s, "n1").await.expect("lease").epoch;
    for v in 1..=10 {
        store
            .commit(
                &s,
                e,
                logged("device.R1", v, Some(&format!("op{v}")), 100 * v),
            )
            .await
            .expect("commit");
    }
    // Keep the newest 4 changes; op ids: the newest 3, or anything handled at 500 or later.
    let mut c = logged("device.R1", 11, Some("op11"), 1100);
    c.trim = Trim {
        changes_through: vec![(id.clone(), 11 - 4)],
        ops: Some(OpRetention {
            keep_last: 3,
            keep_since_ms: 500,
        }),
    };
    store.commit(&s, e, c).await.expect("commit with trim");
    let page = store
        .history(&id, 0, 100)
        .await
        .expect("history")
        .expect("exists");
    assert_eq!(page.oldest, Some(8));
    assert_eq!(
        page.changes.iter().map(|c| c.version).collect::<Vec<_>>(),
        [8, 9, 10, 11]
    );
    // op1..op4 (handled before 500, beyond the newest 3) are forgotten: committing them
    // again succeeds; op5 (at 500) is still remembered.
    for forgotten in 1..=4 {
        let mut retry = Commit::default();
        retry
            .ops
            .push(op(&format!("op{forgotten}"), "device.R1", forgotten, 1));
        store.commit(&s, e, retry).await.expect("forgotten op id");
    }
    let mut retry = Commit::default();
    retry.ops.push(op("op5", "device.R1", 5, 1));
    assert!(matches!(
        store.commit(&s, e, retry).await,
        Err(StoreError::OpsKnown(_))
    ));
    // By count alone: with every op id old, the newest keep_last stay.
    let mut c = Commit::default();
    c.trim.ops = Some(OpRetention {
        keep_last: 2,
        keep_since_ms: u64::MAX,
    });
    store.commit(&s, e, c).await.expect("trim");
    for (op_id, known) in [("op9", false), ("op10", true), ("op11", true)] {
        let mut retry = Commit::default();
        retry.ops.push(op(op_id, "device.R1", 1, 1));
        let r = store.commit(&s, e, retry).await;
        assert_eq!(
            matches!(r, Err(StoreError::OpsKnown(_))),
            known,
            "{op_id}: {r:?}"
        );
    }
}

/// Issue 13 finding 7: only a device's newest pairing code is valid.
pub(crate) async fn a_new_pairing_code_invalidates_the_devices_previous_one(store: Arc<dyn Store>) {
    let code = |c: &str, device: &str| PairingCode {
        code: c.into(),
        device_id: device.into(),
        expires_ms: 5,
    };
    store
        .put_pairing_code(code("AAAA-AAAA", "D1"))
        .await
        .expect("put");
    store
        .put_pairing_code(code("BBBB-BBBB", "D2"))
        .await
        .expect("put");
    store
        .put_pairing_code(code("CCCC-CCCC", "D1"))
        .await
        .expect("put");
    assert_eq!(
        store.take_pairing_code("AAAA-AAAA").await.expect("take"),
        None,
        "the first code of D1 died with the second"
    );
    assert_eq!(
        store.take_pairing_code("BBBB-BBBB").await.expect("take"),
        Some(code("BBBB-BBBB", "D2")),
        "another device's code is untouched"
    );
    // A redeemed code leaves nothing behind that could remove someone else's later code
    // of the same text.
    assert_eq!(
        store.take_pairing_code("CCCC-CCCC").await.expect("take"),
        Some(code("CCCC-CCCC", "D1"))
    );
    store
        .put_pairing_code(code("CCCC-CCCC", "D3"))
        .await
        .expect("put");
    store
        .put_pairing_code(code("DDDD-DDDD", "D1"))
        .await
        .expect("put");
    assert_eq!(
        store.take_pairing_code("CCCC-CCCC").await.expect("take"),
        Some(code("CCCC-CCCC", "D3"))
    );
}

/// Commits of several sets in flight at once, one of them under a stale epoch: only that
/// one is fenced (and writes nothing); the others commit. With a batching writer these
/// share a transaction, and fencing one set must not fail its neighbours.
pub(crate) async fn a_fenced_set_fails_alone_among_concurrent_commits(store: Arc<dyn Store>) {
    let stale_set = set("F1");
    let stale = store
        .acquire_lease(&stale_set, "n1")
        .await
        .expect("lease")
        .epoch;
    store
        .acquire_lease(&stale_set, "n2")
        .await
        .expect("taken over");
    let mut others = Vec::new();
    for k in ["F2", "F3", "F4"] {
        let s = set(k);
        let e = store.acquire_lease(&s, "n1").await.expect("lease").epoch;
        others.push((s, e));
    }
    let fenced = store.commit(&stale_set, stale, logged("device.F1", 1, Some("op-f1"), 10));
    let fine = others.iter().map(|(s, e)| {
        store.commit(
            s,
            *e,
            logged(&format!("device.{s}"), 1, Some(&format!("op-{s}")), 10),
        )
    });
    let (fenced, fine) = futures::join!(fenced, futures::future::join_all(fine));
    assert!(
        matches!(fenced, Err(StoreError::Fenced { .. })),
        "{fenced:?}"
    );
    for ((s, _), res) in others.iter().zip(fine) {
        res.unwrap_or_else(|e| panic!("{s} failed with its neighbour fenced: {e:?}"));
        let loaded = store.load_set(s).await.expect("load");
        assert_eq!(loaded.len(), 1, "{s} committed");
    }
    assert!(store.load_set(&stale_set).await.expect("load").is_empty());
    let id = BucketId::parse("device.F1").expect("id");
    assert_eq!(store.history(&id, 0, 10).await.expect("history"), None);
}

/// Commits of several sets in flight at once (a batching writer puts them in one
/// transaction), one naming an op id its set remembers and two of another set naming the
/// same new op id: the replay is answered with the remembered record and writes nothing,
/// exactly one of the two carriers of the new op id commits and the other is answered with
/// its record, and the commits beside them commit, their op ids remembered once.
pub(crate) async fn a_known_op_id_fails_alone_among_concurrent_commits(store: Arc<dyn Store>) {
    let (k1, k2, k3) = (set("N1"), set("N2"), set("N3"));
    let mut epochs = Vec::new();
    for s in [&k1, &k2, &k3] {
        epochs.push(store.acquire_lease(s, "n1").await.expect("lease").epoch);
    }
    let (e1, e2, e3) = (epochs[0], epochs[1], epochs[2]);
    store
        .commit(&k1, e1, logged("device.N1", 1, Some("op-k"), 1))
        .await
        .expect("first attempt");
    let (replay, beside, first, second) = futures::join!(
        store.commit(&k1, e1, logged("device.N1", 2, Some("op-k"), 2)),
        store.commit(&k2, e2, logged("device.N2", 1, Some("op-2"), 2)),
        store.commit(&k3, e3, logged("device.N3", 1, Some("op-dup"), 2)),
        store.commit(&k3, e3, logged("device.N3", 1, Some("op-dup"), 3)),
    );
    match replay {
        Err(StoreError::OpsKnown(known)) => {
            assert_eq!(known, vec![op("op-k", "device.N1", 1, 1)]);
        }
        other => panic!("expected OpsKnown for the replay, got {other:?}"),
    }
    beside.expect("N2 commits beside a replay");
    let winner = match (first, second) {
        (Ok(()), Err(StoreError::OpsKnown(known))) => {
            assert_eq!(known, vec![op("op-dup", "device.N3", 1, 2)]);
            2
        }
        (Err(StoreError::OpsKnown(known)), Ok(())) => {
            assert_eq!(known, vec![op("op-dup", "device.N3", 1, 3)]);
            3
        }
        other => panic!("op-dup: expected one commit and one OpsKnown, got {other:?}"),
    };
    let n1 = store.load_set(&k1).await.expect("load");
    assert_eq!(
        n1,
        vec![bucket("device.N1", 1, json!({ "v": 1 }))],
        "replay wrote nothing"
    );
    assert_eq!(store.load_set(&k2).await.expect("load").len(), 1);
    for (id, n) in [("device.N1", 1), ("device.N2", 1), ("device.N3", 1)] {
        let page = store
            .history(&BucketId::parse(id).expect("id"), 0, 10)
            .await
            .expect("history")
            .expect("exists");
        assert_eq!(page.changes.len(), n, "{id}: one change");
    }
    // Remembered once, as the winner's.
    let err = store
        .commit(&k3, e3, logged("device.N3", 2, Some("op-dup"), 9))
        .await
        .expect_err("op-dup is known");
    assert!(
        matches!(&err, StoreError::OpsKnown(k) if k == &vec![op("op-dup", "device.N3", 1, winner)]),
        "{err:?}"
    );
}

/// A thermostat's first contact as the node builds it (`hash` tells credentials apart).
pub(crate) fn new_device(serial: &str, hash: u8, at_ms: u64) -> NewDevice {
    let mut buckets = Vec::new();
    let mut changes = Vec::new();
    for (kind, field) in [("device", "humidity"), ("shared", "mode")] {
        let id = BucketId::parse(&format!("{kind}.{serial}")).expect("valid id");
        let fields: Fields = [(field.to_string(), serde_json::Value::Null)]
            .into_iter()
            .collect();
        let now = Hlc {
            millis: at_ms,
            logical: 0,
        };
        let (b, c) = crate::registration::created(&id, &fields, now, "server");
        buckets.push(b);
        changes.push((id, c));
    }
    NewDevice {
        record: DeviceRecord {
            device_id: serial.into(),
            device_type: "thermostat".into(),
            sw_version: "1.0.0".into(),
            first_seen_ms: at_ms,
            last_seen_ms: at_ms,
        },
        assigned: AssignedRecord {
            current_hash: [hash; 32],
            issued_ms: at_ms,
            previous: None,
        },
        buckets,
        changes,
    }
}

/// Issue 16: one batch of first contacts. New devices are written whole — credentials,
/// a lease no actor holds (epoch 1: the first actor takes 2 and loads the buckets),
/// buckets with their `created` changes, device record; a device with credentials, a set
/// already leased, or a device named twice is refused and nothing of it is written. A
/// first contact again later is refused too: it never overwrites the credentials or the
/// set the first one wrote.
pub(crate) async fn first_contacts_write_new_devices_whole_and_refuse_the_rest(
    store: Arc<dyn Store>,
) {
    let has_creds = AssignedRecord {
        current_hash: [9; 32],
        issued_ms: 5,
        previous: None,
    };
    assert!(store
        .swap_assigned("R2", None, Some(has_creds.clone()))
        .await
        .expect("swap"));
    let leased = set("R3");
    let e = store
        .acquire_lease(&leased, "n2")
        .await
        .expect("lease")
        .epoch;
    let kept = bucket("device.R3", 4, json!({"humidity": 40}));
    store
        .commit(&leased, e, Commit::of(vec![kept.clone()]))
        .await
        .expect("commit");

    let batch = vec![
        new_device("R1", 1, 100),
        new_device("R2", 2, 100),
        new_device("R3", 3, 100),
        new_device("R4", 4, 100),
        new_device("R1", 5, 101),
    ];
    let written = store.register_new(batch.clone()).await.expect("register");
    assert_eq!(written, vec![true, false, false, true, false]);

    for d in [&batch[0], &batch[3]] {
        let s = d.set().expect("set");
        let mut loaded = store.load_set(&s).await.expect("load");
        loaded.sort_by(|a, b| a.id.cmp(&b.id));
        assert_eq!(loaded, d.buckets, "{s}: buckets as created");
        for (id, change) in &d.changes {
            let page = store.history(id, 0, 10).await.expect("history");
            assert_eq!(page.expect("exists").changes, vec![change.clone()], "{id}");
        }
        assert_eq!(
            store.get_assigned(s.as_str()).await.expect("creds"),
            Some(d.assigned.clone())
        );
        assert_eq!(
            store.get_device(s.as_str()).await.expect("device"),
            Some(d.record.clone())
        );
        assert_eq!(store.lease_epoch(&s).await.expect("epoch"), Some(Epoch(1)));
    }
    // The first actor to load a registered set takes the next epoch after it, from no
    // previous owner: no node served the set, so there is no handover (and no take-over
    // counted in `tether_lease_takeovers_total`).
    let lease = store.acquire_lease(&set("R1"), "n2").await.expect("lease");
    assert_eq!(lease.epoch, Epoch(2));
    assert_eq!(lease.previous_owner, None);
    // The next one takes it over from that first owner.
    let lease = store.acquire_lease(&set("R1"), "n3").await.expect("lease");
    assert_eq!(lease.epoch, Epoch(3));
    assert_eq!(lease.previous_owner.as_deref(), Some("n2"));

    // Refused: nothing of them written, what was there untouched.
    assert_eq!(
        store.get_assigned("R2").await.expect("creds"),
        Some(has_creds)
    );
    assert!(store.load_set(&set("R2")).await.expect("load").is_empty());
    assert_eq!(store.lease_epoch(&set("R2")).await.expect("epoch"), None);
    assert_eq!(store.get_device("R2").await.expect("device"), None);
    assert_eq!(store.load_set(&leased).await.expect("load"), vec![kept]);
    assert_eq!(store.get_assigned("R3").await.expect("creds"), None);
    assert_eq!(store.get_device("R3").await.expect("device"), None);
    assert_eq!(store.lease_epoch(&leased).await.expect("epoch"), Some(e));

    // Again later (a lost answer, another node): refused, the first one's state stays.
    let again = store
        .register_new(vec![new_device("R4", 7, 200)])
        .await
        .expect("register");
    assert_eq!(again, vec![false]);
    assert_eq!(
        store.get_assigned("R4").await.expect("creds"),
        Some(batch[3].assigned.clone())
    );
    assert_eq!(
        store.get_device("R4").await.expect("device"),
        Some(batch[3].record.clone())
    );
    assert!(store
        .register_new(Vec::new())
        .await
        .expect("empty")
        .is_empty());
}

/// The blob store over `store`'s blob keyspace.
fn blobs_of(store: &Arc<dyn Store>) -> super::blobs::Blobs {
    let kv = store.blob_kv().expect("every backend has a blob keyspace");
    super::blobs::Blobs::new(kv, std::time::Duration::from_secs(10))
}

pub(crate) async fn blob_uploads_take_chunks_in_order_and_complete_once(store: Arc<dyn Store>) {
    use super::blobs::{Appended, Begun, CHUNK, CHUNKS_PER_COMMIT};
    use tether_proto::blob::BlobHash;
    let blobs = blobs_of(&store);
    let bytes: Vec<u8> = (0..CHUNK + 100).map(|i| (i % 251) as u8).collect();
    let h = BlobHash::of(&bytes);
    let size = bytes.len() as u64;
    let began = blobs
        .begin(&h, size, "application/octet-stream", "device:A1", 10)
        .await
        .expect("begin");
    assert!(
        matches!(began, Begun::Upload(ref m) if m.received == 0 && !m.complete),
        "{began:?}"
    );
    // Another principal's upload of the same bytes is busy; the uploader resumes its own.
    assert!(matches!(
        blobs
            .begin(&h, size, "x", "device:B2", 11)
            .await
            .expect("begin"),
        Begun::Busy(_)
    ));
    // Out of order, short of a whole chunk, or someone else's: nothing stored.
    let tail = bytes[CHUNK..].to_vec();
    assert_eq!(
        blobs
            .append(&h, "device:A1", 1, tail.clone())
            .await
            .expect("append"),
        Appended::Received(0)
    );
    assert_eq!(
        blobs
            .append(&h, "device:A1", 0, bytes[..100].to_vec())
            .await
            .expect("append"),
        Appended::Received(0)
    );
    assert_eq!(
        blobs
            .append(&h, "device:B2", 0, bytes[..CHUNK].to_vec())
            .await
            .expect("append"),
        Appended::Received(0)
    );
    assert!(
        !blobs.complete(&h, "device:A1", 12).await.expect("complete"),
        "not all bytes are stored"
    );
    assert_eq!(
        blobs
            .append(&h, "device:A1", 0, bytes[..CHUNK].to_vec())
            .await
            .expect("append"),
        Appended::Received(CHUNK as u64)
    );
    // The same chunk again (a resent range) changes nothing.
    assert_eq!(
        blobs
            .append(&h, "device:A1", 0, bytes[..CHUNK].to_vec())
            .await
            .expect("append"),
        Appended::Received(CHUNK as u64)
    );
    assert_eq!(
        blobs
            .append(&h, "device:A1", 1, tail.clone())
            .await
            .expect("append"),
        Appended::Received(size)
    );
    assert_eq!(
        blobs.chunk(&h, 0).await.expect("chunk").as_deref(),
        Some(&bytes[..CHUNK])
    );
    assert_eq!(blobs.chunk(&h, 1).await.expect("chunk"), Some(tail));
    assert_eq!(blobs.chunk(&h, 2).await.expect("chunk"), None);
    assert!(blobs.complete(&h, "device:A1", 13).await.expect("complete"));
    assert!(
        !blobs.complete(&h, "device:A1", 14).await.expect("complete"),
        "completes once"
    );
    // Several whole chunks in one transaction (at most CHUNKS_PER_COMMIT), then the rest
    // with the tail; each chunk stored under its own index.
    let big: Vec<u8> = (0..3 * CHUNK + 7).map(|i| (i % 241) as u8).collect();
    let hb = BlobHash::of(&big);
    blobs
        .begin(&hb, big.len() as u64, "x", "device:A1", 20)
        .await
        .expect("begin");
    let too_many = vec![0u8; (CHUNKS_PER_COMMIT + 1) * CHUNK];
    assert_eq!(
        blobs
            .append(&hb, "device:A1", 0, too_many)
            .await
            .expect("append"),
        Appended::Received(0),
        "more than one transaction's worth is refused"
    );
    assert_eq!(
        blobs
            .append(&hb, "device:A1", 0, big[..2 * CHUNK].to_vec())
            .await
            .expect("append"),
        Appended::Received(2 * CHUNK as u64)
    );
    assert_eq!(
        blobs
            .append(&hb, "device:A1", 2, big[2 * CHUNK..].to_vec())
            .await
            .expect("append"),
        Appended::Received(big.len() as u64)
    );
    for i in 0..4usize {
        let want = &big[i * CHUNK..((i + 1) * CHUNK).min(big.len())];
        assert_eq!(
            blobs.chunk(&hb, i as u64).await.expect("chunk").as_deref(),
            Some(want),
            "chunk {i}"
        );
    }
    let m = blobs.manifest(&h).await.expect("manifest").expect("stored");
    assert!(m.complete && m.received == size && m.refs == 0);
    assert_eq!(m.unreferenced_since_ms, Some(13));
    assert!(matches!(
        blobs
            .begin(&h, size, "x", "device:B2", 15)
            .await
            .expect("begin"),
        Begun::Present(_)
    ));
    assert_eq!(
        blobs
            .append(&h, "device:A1", 1, vec![1])
            .await
            .expect("append"),
        Appended::Complete
    );
    let uploader = super::blobs::Holder::Principal("device:A1".into());
    assert_eq!(
        blobs.held_by(&h, &uploader).await.expect("holder"),
        Some(13)
    );
    let other = BlobHash::of(b"never started");
    assert_eq!(
        blobs
            .append(&other, "device:A1", 0, vec![1])
            .await
            .expect("append"),
        Appended::NoUpload
    );
}

pub(crate) async fn blob_holders_keep_a_blob_until_released_and_past_its_grace(
    store: Arc<dyn Store>,
) {
    use super::blobs::Holder;
    use tether_proto::blob::BlobHash;
    let blobs = blobs_of(&store);
    let bytes = b"calibration table".to_vec();
    let h = BlobHash::of(&bytes);
    let b1 = Holder::Bucket(BucketId::parse("device.A1").expect("id"));
    let b2 = Holder::Bucket(BucketId::parse("shared.A1").expect("id"));
    blobs
        .begin(&h, bytes.len() as u64, "text/plain", "user:u1", 100)
        .await
        .expect("begin");
    assert!(
        !blobs.hold(&h, b1.clone(), 101).await.expect("hold"),
        "an incomplete blob cannot be held"
    );
    blobs.append(&h, "user:u1", 0, bytes).await.expect("append");
    assert!(blobs.complete(&h, "user:u1", 102).await.expect("complete"));
    assert!(blobs.hold(&h, b1.clone(), 103).await.expect("hold"));
    assert!(blobs
        .hold(&h, b1.clone(), 104)
        .await
        .expect("hold again refreshes"));
    assert!(blobs.hold(&h, b2.clone(), 105).await.expect("hold"));
    let m = blobs.manifest(&h).await.expect("manifest").expect("stored");
    assert_eq!((m.refs, m.unreferenced_since_ms), (2, None));
    let holders = blobs.bucket_holders(&h, None, 10).await.expect("holders");
    let ids: Vec<String> = holders.iter().map(|(id, _)| id.to_string()).collect();
    assert_eq!(ids, ["device.A1", "shared.A1"]);
    assert_eq!(holders[0].1, 104, "the refreshed time");
    let page = blobs
        .bucket_holders(&h, Some(&holders[0].0), 10)
        .await
        .expect("holders");
    assert_eq!(page.len(), 1, "paged after the first");
    assert!(
        !blobs.collect(&h, u64::MAX).await.expect("collect"),
        "held blobs stay"
    );
    assert!(
        !blobs
            .release(&h, b1.clone(), 103, 200)
            .await
            .expect("release"),
        "refreshed since"
    );
    assert!(blobs
        .release(&h, b1.clone(), 104, 200)
        .await
        .expect("release"));
    assert!(blobs
        .release(&h, b2.clone(), 105, 210)
        .await
        .expect("release"));
    let m = blobs.manifest(&h).await.expect("manifest").expect("stored");
    assert_eq!((m.refs, m.unreferenced_since_ms), (0, Some(210)));
    assert!(
        !blobs.collect(&h, 209).await.expect("collect"),
        "within its grace"
    );
    assert!(blobs.collect(&h, 210).await.expect("collect"));
    assert_eq!(blobs.manifest(&h).await.expect("manifest"), None);
    assert_eq!(blobs.chunk(&h, 0).await.expect("chunk"), None);
    let uploader = Holder::Principal("user:u1".into());
    assert_eq!(blobs.held_by(&h, &uploader).await.expect("holder"), None);
}

pub(crate) async fn blob_uploads_are_discarded_or_collected_and_listed_in_pages(
    store: Arc<dyn Store>,
) {
    use tether_proto::blob::BlobHash;
    let blobs = blobs_of(&store);
    let mut hashes: Vec<BlobHash> = (0..5u8).map(|i| BlobHash::of(&[i])).collect();
    for (i, h) in hashes.iter().enumerate() {
        blobs
            .begin(h, 1, "x", "device:A1", 1000 + i as u64)
            .await
            .expect("begin");
    }
    hashes.sort();
    let first = blobs.list(None, 3).await.expect("list");
    let rest = blobs
        .list(first.last().map(|(h, _)| h), 3)
        .await
        .expect("list");
    let listed: Vec<BlobHash> = first.iter().chain(&rest).map(|(h, _)| *h).collect();
    assert_eq!(listed, hashes, "every blob once, in hash order");
    assert!(blobs.discard(&hashes[0]).await.expect("discard"));
    assert!(!blobs.discard(&hashes[0]).await.expect("discard"), "gone");
    // Uploads never finished are collected by their start time.
    let started = |h: &BlobHash| {
        first
            .iter()
            .chain(&rest)
            .find(|(x, _)| x == h)
            .map(|(_, m)| m.created_ms)
            .expect("listed")
    };
    let due: Vec<BlobHash> = hashes[1..]
        .iter()
        .copied()
        .filter(|h| started(h) <= 1002)
        .collect();
    for h in &hashes[1..] {
        let gone = blobs.collect(h, 1002).await.expect("collect");
        assert_eq!(gone, due.contains(h), "started at {}", started(h));
    }
    let left = blobs.list(None, 10).await.expect("list");
    assert_eq!(left.len(), 4 - due.len());
    assert!(left.iter().all(|(_, m)| m.created_ms > 1002));
}

/// Invokes `$m!(args…, every case…)`: the one list of conformance cases every backend runs.
macro_rules! every_case {
    ($m:ident $(, $arg:expr)*) => {
        $m!(
            $($arg,)*
            empty_set_loads_nothing,
            lease_epochs_strictly_increase,
            lease_names_the_previous_owner,
            committed_buckets_load_back_exactly,
            stale_epoch_commit_is_fenced_and_writes_nothing,
            concurrent_commits_are_all_durable,
            device_records_roundtrip,
            assigned_credentials_swap_only_from_the_expected_state,
            users_are_created_once,
            pairings_follow_their_device,
            structures_have_one_owner,
            pairing_codes_are_taken_once,
            changes_commit_with_their_bucket_and_page_in_order,
            a_known_op_id_commits_nothing_and_returns_its_record,
            retention_trims_in_the_same_commit,
            a_new_pairing_code_invalidates_the_devices_previous_one,
            a_fenced_set_fails_alone_among_concurrent_commits,
            a_known_op_id_fails_alone_among_concurrent_commits,
            first_contacts_write_new_devices_whole_and_refuse_the_rest,
            blob_uploads_take_chunks_in_order_and_complete_once,
            blob_holders_keep_a_blob_until_released_and_past_its_grace,
            blob_uploads_are_discarded_or_collected_and_listed_in_pages,
        );
    };
}
pub(crate) use every_case;

mod redb {
    use super::*;
    use crate::metrics::Metrics;
    use crate::store::redb::RedbStore;

    fn open(dir: &tempfile::TempDir) -> Arc<dyn Store> {
        Arc::new(RedbStore::open(dir.path(), Metrics::new()).expect("open redb"))
    }

    macro_rules! conformance {
        ($($name:ident),* $(,)?) => {$(
            #[tokio::test]
            async fn $name() {
                let dir = tempfile::tempdir().expect("tempdir");
                super::$name(open(&dir)).await;
            }
        )*};
    }

    every_case!(conformance);

    #[tokio::test]
    async fn committed_state_survives_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = set("P1");
        let b = bucket("device.P1", 7, json!({"kept": true}));
        let logged_write = logged("device.P1", 8, Some("op-8"), 80);
        {
            let store = open(&dir);
            let e = store.acquire_lease(&s, "n1").await.expect("lease").epoch;
            store
                .commit(&s, e, Commit::of(vec![b.clone()]))
                .await
                .expect("commit");
            store
                .commit(&s, e, logged_write.clone())
                .await
                .expect("commit");
            store.close().await.expect("close");
        }
        let store = open(&dir);
        assert_eq!(
            store.load_set(&s).await.expect("load"),
            logged_write.buckets
        );
        // The change and the op id came back with their bucket.
        let id = BucketId::parse("device.P1").expect("valid id");
        let page = store
            .history(&id, 0, 10)
            .await
            .expect("history")
            .expect("exists");
        assert_eq!(page.changes, vec![logged_write.changes[0].1.clone()]);
        let e = store.acquire_lease(&s, "n1").await.expect("lease").epoch;
        assert!(matches!(
            store
                .commit(&s, e, logged("device.P1", 9, Some("op-8"), 90))
                .await,
            Err(StoreError::OpsKnown(_))
        ));
        // Epochs continue after a restart, so a pre-restart epoch stays fenced.
        let e = store.acquire_lease(&s, "n1").await.expect("lease").epoch;
        assert!(e.0 >= 2);
    }

    /// Writes 2,000 sets of 2 KB each (≈ 4 MB, more than the caches below) and reads them
    /// all back; returns the page cache's fill at the end.
    async fn fill(store: &RedbStore) -> usize {
        let payload = "x".repeat(2_000);
        let store_dyn: &dyn Store = store;
        for i in 0..2_000u32 {
            let s = set(&format!("C{i:05}"));
            let e = store_dyn
                .acquire_lease(&s, "n1")
                .await
                .expect("lease")
                .epoch;
            let b = bucket(&format!("device.C{i:05}"), 1, json!({"p": payload, "i": i}));
            store_dyn
                .commit(&s, e, Commit::of(vec![b]))
                .await
                .expect("commit");
        }
        for i in 0..2_000u32 {
            let loaded = store_dyn
                .load_set(&set(&format!("C{i:05}")))
                .await
                .expect("load");
            assert_eq!(loaded.len(), 1, "set C{i:05}: every write is read back");
            assert_eq!(loaded[0].value["i"], json!(i));
        }
        store.cache_used_bytes()
    }

    #[tokio::test]
    async fn the_page_cache_stays_within_its_bound() {
        const BOUND: usize = 1 << 20;
        let dir = tempfile::tempdir().expect("tempdir");
        let bounded = RedbStore::open_with_cache(dir.path(), Metrics::new(), BOUND).expect("open");
        let used = fill(&bounded).await;
        assert!(
            used <= BOUND,
            "{used} bytes cached with a {BOUND}-byte cache"
        );
        // The same data with a larger cache fills more than the bound: the bound is what
        // kept the first store's cache small.
        let dir = tempfile::tempdir().expect("tempdir");
        let large = RedbStore::open_with_cache(dir.path(), Metrics::new(), 64 << 20).expect("open");
        let used = fill(&large).await;
        assert!(used > BOUND, "only {used} bytes cached with a 64 MiB cache");
    }

    #[tokio::test]
    async fn concurrent_commits_share_transactions() {
        let dir = tempfile::tempdir().expect("tempdir");
        let metrics = Metrics::new();
        let store: Arc<dyn Store> =
            Arc::new(RedbStore::open(dir.path(), metrics.clone()).expect("open"));
        let s = set("G1");
        let e = store.acquire_lease(&s, "n1").await.expect("lease").epoch;
        let commits: Vec<_> = (0..200u64)
            .map(|i| {
                let store = store.clone();
                let s = s.clone();
                tokio::spawn(async move {
                    store
                        .commit(
                            &s,
                            e,
                            Commit::of(vec![bucket("device.G1", i + 1, json!({"i": i}))]),
                        )
                        .await
                })
            })
            .collect();
        for c in commits {
            c.await.expect("task").expect("commit");
        }
        let text = metrics.render();
        let txns: f64 = text
            .lines()
            .find_map(|l| l.strip_prefix("tether_store_commits_total "))
            .and_then(|v| v.parse().ok())
            .expect("commit counter present");
        // 1 lease + 200 commits; group commit folds concurrent requests into fewer fsyncs.
        assert!(
            txns < 201.0,
            "expected batching, got {txns} transactions for 201 requests"
        );
    }
}

mod postgres {
    use super::*;
    use crate::store::pg_server::PgServer;
    use crate::store::postgres::{BatchConfig, PostgresStore};

    macro_rules! suite {
        ($server:expr, $($name:ident),* $(,)?) => {$(
            let url = $server.url(stringify!($name)).expect("database");
            let store: Arc<dyn Store> = Arc::new(PostgresStore::connect(&url, 8).await.expect("connect"));
            eprintln!("postgres conformance: {}", stringify!($name));
            super::$name(store).await;
        )*};
    }

    /// The whole suite against one private server (each case in its own database), so the
    /// server is stopped and removed when the test ends, pass or fail.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres_backend_passes_the_conformance_suite() {
        let server =
            PgServer::start().expect("start a private PostgreSQL (see store/pg_server.rs)");
        every_case!(suite, server);
    }

    /// The nodes of a new cluster start at once and each creates the schema: none may
    /// fail (CREATE TABLE IF NOT EXISTS alone races in PostgreSQL's catalog).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn nodes_connecting_at_once_to_a_fresh_database_all_succeed() {
        let server = PgServer::start().expect("own server");
        for round in 0..4 {
            let url = server.url(&format!("fresh{round}")).expect("db");
            let connects: Vec<_> = (0..6)
                .map(|_| {
                    let url = url.clone();
                    tokio::spawn(async move { PostgresStore::connect(&url, 1).await })
                })
                .collect();
            for c in connects {
                let store = c.await.expect("task");
                assert!(store.is_ok(), "round {round}: {:?}", store.err());
            }
        }
    }

    #[tokio::test]
    async fn committed_state_survives_a_server_crash() {
        let server = PgServer::start().expect("own server");
        let url = server.url("crash").expect("db");
        let s = set("P1");
        let written = logged("device.P1", 7, Some("op-7"), 70);
        {
            let store = PostgresStore::connect(&url, 2).await.expect("connect");
            let e = store.acquire_lease(&s, "n1").await.expect("lease").epoch;
            store.commit(&s, e, written.clone()).await.expect("commit");
        }
        server.restart().expect("immediate stop and start");
        let store = PostgresStore::connect(&url, 2).await.expect("reconnect");
        assert_eq!(store.load_set(&s).await.expect("load"), written.buckets);
        let id = BucketId::parse("device.P1").expect("valid id");
        let page = store
            .history(&id, 0, 10)
            .await
            .expect("history")
            .expect("exists");
        assert_eq!(page.changes, vec![written.changes[0].1.clone()]);
        let e = store.acquire_lease(&s, "n1").await.expect("lease").epoch;
        assert!(matches!(
            store
                .commit(&s, e, logged("device.P1", 8, Some("op-7"), 80))
                .await,
            Err(StoreError::OpsKnown(_))
        ));
    }

    /// A second session on the test's database, to hold locks the writer must wait for.
    async fn session(url: &str) -> tokio_postgres::Client {
        let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
            .await
            .expect("second session");
        tokio::spawn(conn);
        client
    }

    /// Waits (generous deadline) until a session of the database waits for `event_type`
    /// (`Lock`: a row or advisory lock held by the test).
    async fn until_waiting(probe: &tokio_postgres::Client, what: &str) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let n: i64 = probe
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'",
                    &[],
                )
                .await
                .expect("pg_stat_activity")
                .get(0);
            if n > 0 {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the store never waited for {what}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }

    async fn batching_store(url: &str, queue: usize) -> (Arc<dyn Store>, crate::metrics::Metrics) {
        let metrics = crate::metrics::Metrics::new();
        let store = PostgresStore::connect_with(
            url,
            4,
            metrics.clone(),
            BatchConfig {
                queue,
                writers: 1,
                max_batch: 64,
                ..BatchConfig::default()
            },
        )
        .await
        .expect("connect");
        (Arc::new(store), metrics)
    }

    fn transactions(metrics: &crate::metrics::Metrics) -> f64 {
        metrics
            .render()
            .lines()
            .find_map(|l| l.strip_prefix("tether_store_commits_total "))
            .and_then(|v| v.parse().ok())
            .expect("commit counter present")
    }

    /// The batching writer held on its first batch (a commit of set D0, waiting for D0's
    /// lease row, which a second session has locked): commits made meanwhile queue, and
    /// [`HeldWriter::in_one_batch`] lets them go as the writer's next batch.
    struct HeldWriter {
        holder: tokio_postgres::Client,
        first: tokio::task::JoinHandle<Result<(), StoreError>>,
        /// A third session, for the test's own queries.
        probe: tokio_postgres::Client,
    }

    async fn hold_writer(store: &Arc<dyn Store>, url: &str) -> HeldWriter {
        let blocker = set("D0");
        let eb = store
            .acquire_lease(&blocker, "n1")
            .await
            .expect("lease")
            .epoch;
        let holder = session(url).await;
        holder
            .batch_execute("BEGIN; SELECT 1 FROM tether_leases WHERE set_key = 'D0' FOR UPDATE")
            .await
            .expect("hold D0");
        let first = tokio::spawn({
            let store = store.clone();
            async move {
                store
                    .commit(&blocker, eb, logged("device.D0", 1, None, 1))
                    .await
            }
        });
        let probe = session(url).await;
        until_waiting(&probe, "the lease row of D0").await;
        HeldWriter {
            holder,
            first,
            probe,
        }
    }

    impl HeldWriter {
        /// Runs `queued` — commits, every one of them in the queue once it is first
        /// polled — and releases the writer, whose next batch they make. Their answers,
        /// and the probe session.
        async fn in_one_batch<T>(
            self,
            queued: impl std::future::Future<Output = T>,
        ) -> (T, tokio_postgres::Client) {
            let HeldWriter {
                holder,
                first,
                probe,
            } = self;
            let release = async {
                // `queued` was polled first (join! polls in order).
                tokio::task::yield_now().await;
                holder.batch_execute("COMMIT").await.expect("release D0");
            };
            let (answers, ()) = futures::join!(queued, release);
            first.await.expect("task").expect("D0 commits");
            (answers, probe)
        }
    }

    /// Commits of three sets queued behind a busy writer go to PostgreSQL in ONE
    /// transaction; the one whose lease moved is refused and writes nothing, the two others
    /// commit (with their op ids and changes).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_batch_refuses_its_fenced_set_and_commits_the_others() {
        let server = PgServer::start().expect("own server");
        let url = server.url("batch_fence").expect("db");
        let (store, metrics) = batching_store(&url, 64).await;
        let fenced_set = set("A1");
        let stale = store
            .acquire_lease(&fenced_set, "n1")
            .await
            .expect("lease")
            .epoch;
        store.acquire_lease(&fenced_set, "n2").await.expect("moved");
        let (b, c) = (set("B1"), set("C1"));
        let eb1 = store.acquire_lease(&b, "n1").await.expect("lease").epoch;
        let ec1 = store.acquire_lease(&c, "n1").await.expect("lease").epoch;

        let held = hold_writer(&store, &url).await;
        let before = transactions(&metrics);
        let ((a, b_res, c_res), _) = held
            .in_one_batch(futures::future::join3(
                store.commit(&fenced_set, stale, logged("device.A1", 1, Some("op-a"), 1)),
                store.commit(&b, eb1, logged("device.B1", 1, Some("op-b"), 1)),
                store.commit(&c, ec1, logged("device.C1", 1, Some("op-c"), 1)),
            ))
            .await;
        assert!(matches!(a, Err(StoreError::Fenced { .. })), "{a:?}");
        b_res.expect("B1 commits beside a fenced set");
        c_res.expect("C1 commits beside a fenced set");
        // D0's batch and the batch of the three: two transactions.
        assert_eq!(
            transactions(&metrics) - before,
            1.0,
            "A1, B1 and C1 shared a batch"
        );
        assert!(store.load_set(&fenced_set).await.expect("load").is_empty());
        b1_and_c1_committed(&store, &b, &c).await;
    }

    /// Sets B1 and C1 each hold device.B1's and device.C1's first version with its change,
    /// and B1's op id `op-b` is remembered: a retry is answered from it.
    async fn b1_and_c1_committed(store: &Arc<dyn Store>, b: &SetKey, c: &SetKey) {
        for (s, id) in [(b, "device.B1"), (c, "device.C1")] {
            assert_eq!(store.load_set(s).await.expect("load").len(), 1, "{id}");
            let page = store
                .history(&BucketId::parse(id).expect("id"), 0, 10)
                .await
                .expect("history")
                .expect("bucket exists");
            assert_eq!(page.changes.len(), 1, "{id}'s change committed with it");
        }
        let e = store.acquire_lease(b, "n1").await.expect("lease").epoch;
        assert!(matches!(
            store
                .commit(b, e, logged("device.B1", 2, Some("op-b"), 2))
                .await,
            Err(StoreError::OpsKnown(_))
        ));
    }

    /// A commit PostgreSQL refuses (a string with NUL, which `jsonb` cannot hold) in a
    /// batch with two good ones: it fails alone, the other two are acknowledged and
    /// stored, and the batch leaves no transaction open on a pooled connection (the next
    /// commits run in transactions of their own and are visible to everyone).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_commit_postgresql_refuses_fails_alone_beside_its_batch() {
        let server = PgServer::start().expect("own server");
        let url = server.url("batch_refused").expect("db");
        let (store, metrics) = batching_store(&url, 64).await;
        let (bad, b, c) = (set("X1"), set("B1"), set("C1"));
        let ex = store.acquire_lease(&bad, "n1").await.expect("lease").epoch;
        let eb1 = store.acquire_lease(&b, "n1").await.expect("lease").epoch;
        let ec1 = store.acquire_lease(&c, "n1").await.expect("lease").epoch;
        let mut refused = logged("device.X1", 1, Some("op-x"), 1);
        refused.buckets[0].value = bucket("device.X1", 1, json!({ "v": "nul \u{0} inside" })).value;

        let held = hold_writer(&store, &url).await;
        let before = transactions(&metrics);
        let ((b_res, x, c_res), probe) = held
            .in_one_batch(futures::future::join3(
                store.commit(&b, eb1, logged("device.B1", 1, Some("op-b"), 1)),
                store.commit(&bad, ex, refused),
                store.commit(&c, ec1, logged("device.C1", 1, Some("op-c"), 1)),
            ))
            .await;
        assert_eq!(
            transactions(&metrics) - before,
            1.0,
            "B1, X1 and C1 were one batch"
        );
        assert!(matches!(x, Err(StoreError::Backend(_))), "{x:?}");
        b_res.expect("B1 commits beside a refused commit");
        c_res.expect("C1 commits beside a refused commit");
        assert!(store.load_set(&bad).await.expect("load").is_empty());
        b1_and_c1_committed(&store, &b, &c).await;
        // Later commits, through whatever pooled connections the writer takes, are
        // committed on their own: another session sees each at once.
        for v in 2..6 {
            store
                .commit(&c, ec1, logged("device.C1", v, None, v))
                .await
                .expect("a later commit");
            let seen: i64 = probe
                .query_one(
                    "SELECT version FROM tether_buckets WHERE set_key = 'C1'",
                    &[],
                )
                .await
                .expect("read")
                .get(0);
            assert_eq!(seen, i64::try_from(v).expect("small"), "commit {v} visible");
        }
        let open: i64 = probe
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()
                   AND state LIKE 'idle in transaction%'",
                &[],
            )
            .await
            .expect("pg_stat_activity")
            .get(0);
        assert_eq!(open, 0, "a pooled connection was left in a transaction");
    }

    /// A commit is answered only after PostgreSQL's COMMIT returned: while COMMIT itself
    /// waits (a deferred trigger blocks on a lock the test holds), the writes are done but
    /// the caller has no answer yet.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_batch_is_acknowledged_only_after_commit_returned() {
        let server = PgServer::start().expect("own server");
        let url = server.url("batch_durable").expect("db");
        let (store, _) = batching_store(&url, 64).await;
        let holder = session(&url).await;
        holder
            .batch_execute(
                "CREATE FUNCTION tether_test_hold() RETURNS trigger LANGUAGE plpgsql AS
                   $$ BEGIN PERFORM pg_advisory_xact_lock(7701); RETURN NULL; END $$;
                 CREATE CONSTRAINT TRIGGER tether_test_hold AFTER INSERT OR UPDATE ON tether_buckets
                   DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION tether_test_hold();
                 BEGIN; SELECT pg_advisory_xact_lock(7701);",
            )
            .await
            .expect("a COMMIT that waits for the test");
        let s = set("W1");
        let e = store.acquire_lease(&s, "n1").await.expect("lease").epoch;
        let mut commit =
            std::pin::pin!(store.commit(&s, e, logged("device.W1", 1, Some("op-w"), 1)));
        assert!(futures::poll!(commit.as_mut()).is_pending());
        let probe = session(&url).await;
        // The deferred trigger runs inside COMMIT: once the writer waits on the lock, its
        // statements all ran and only COMMIT is outstanding.
        until_waiting(&probe, "the lock its COMMIT needs").await;
        for _ in 0..3 {
            tokio::task::yield_now().await;
            assert!(
                futures::poll!(commit.as_mut()).is_pending(),
                "answered before PostgreSQL's COMMIT returned"
            );
        }
        holder.batch_execute("COMMIT").await.expect("release");
        commit.await.expect("commits once COMMIT returns");
        let seen: i64 = probe
            .query_one(
                "SELECT count(*) FROM tether_buckets WHERE set_key = 'W1'",
                &[],
            )
            .await
            .expect("read")
            .get(0);
        assert_eq!(seen, 1, "acknowledged and visible to everyone");
    }

    /// A batch of first contacts is answered only after PostgreSQL's COMMIT returned: while
    /// COMMIT itself waits (a deferred trigger blocks on a lock the test holds), the
    /// statements all ran but the caller has no answer yet.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_first_contact_batch_is_acknowledged_only_after_commit_returned() {
        let server = PgServer::start().expect("own server");
        let url = server.url("register_durable").expect("db");
        let store: Arc<dyn Store> =
            Arc::new(PostgresStore::connect(&url, 4).await.expect("connect"));
        let holder = session(&url).await;
        holder
            .batch_execute(
                "CREATE FUNCTION tether_test_hold() RETURNS trigger LANGUAGE plpgsql AS
                   $$ BEGIN PERFORM pg_advisory_xact_lock(7702); RETURN NULL; END $$;
                 CREATE CONSTRAINT TRIGGER tether_test_hold AFTER INSERT ON tether_leases
                   DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION tether_test_hold();
                 BEGIN; SELECT pg_advisory_xact_lock(7702);",
            )
            .await
            .expect("a COMMIT that waits for the test");
        let registering = store.clone();
        let registered =
            tokio::spawn(
                async move { registering.register_new(vec![new_device("W2", 1, 1)]).await },
            );
        let probe = session(&url).await;
        until_waiting(&probe, "the lock its COMMIT needs").await;
        for _ in 0..3 {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            assert!(
                !registered.is_finished(),
                "answered before PostgreSQL's COMMIT returned"
            );
        }
        holder.batch_execute("COMMIT").await.expect("release");
        let written = registered.await.expect("task").expect("registers");
        assert_eq!(written, vec![true]);
        let seen: i64 = probe
            .query_one(
                "SELECT count(*) FROM tether_buckets WHERE set_key = 'W2'",
                &[],
            )
            .await
            .expect("read")
            .get(0);
        assert_eq!(seen, 2, "acknowledged and visible to everyone");
    }

    /// Two nodes register the same new devices at once (overlapping batches, other
    /// orders): each device is written by exactly one of them, whose credentials stay —
    /// the other's first contact is refused, never overwrites them, and no batch
    /// deadlocks.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn racing_first_contacts_of_one_device_write_it_once() {
        let server = PgServer::start().expect("own server");
        let url = server.url("register_race").expect("db");
        let a: Arc<dyn Store> = Arc::new(PostgresStore::connect(&url, 4).await.expect("a"));
        let b: Arc<dyn Store> = Arc::new(PostgresStore::connect(&url, 4).await.expect("b"));
        let serials: Vec<String> = (0..40).map(|i| format!("RACE{i:02}")).collect();
        let batch_a: Vec<NewDevice> = serials.iter().map(|s| new_device(s, 1, 10)).collect();
        let batch_b: Vec<NewDevice> = serials.iter().rev().map(|s| new_device(s, 2, 20)).collect();
        let (wa, wb) = futures::join!(a.register_new(batch_a), b.register_new(batch_b));
        let (wa, wb) = (wa.expect("a registers"), wb.expect("b registers"));
        for (i, serial) in serials.iter().enumerate() {
            let (by_a, by_b) = (wa[i], wb[serials.len() - 1 - i]);
            assert!(by_a ^ by_b, "{serial}: written by a {by_a}, by b {by_b}");
            let hash = if by_a { [1; 32] } else { [2; 32] };
            let creds = a.get_assigned(serial).await.expect("read").expect("stored");
            assert_eq!(
                creds.current_hash, hash,
                "{serial}: the writer's credentials"
            );
            assert_eq!(a.load_set(&set(serial)).await.expect("load").len(), 2);
        }
    }

    /// Past its bound the writer's queue refuses at once (Overloaded: 503 + Retry-After)
    /// instead of queueing without limit; queued commits still commit, and once the queue
    /// drains new ones are accepted again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_full_queue_refuses_at_once_and_recovers() {
        let server = PgServer::start().expect("own server");
        let url = server.url("batch_full").expect("db");
        let (store, _) = batching_store(&url, 4).await;
        let s = set("Q1");
        let e = store.acquire_lease(&s, "n1").await.expect("lease").epoch;
        let other = set("Q2");
        let eo = store
            .acquire_lease(&other, "n1")
            .await
            .expect("lease")
            .epoch;
        let holder = session(&url).await;
        holder
            .batch_execute("BEGIN; SELECT 1 FROM tether_leases WHERE set_key = 'Q1' FOR UPDATE")
            .await
            .expect("hold Q1");
        let mut held = Vec::new();
        for v in 1..=4u64 {
            let mut c = Box::pin(store.commit(
                &s,
                e,
                Commit::of(vec![bucket("device.Q1", v, json!({"v": v}))]),
            ));
            assert!(
                futures::poll!(c.as_mut()).is_pending(),
                "commit {v} is queued"
            );
            held.push(c);
        }
        // Refused on its first poll: it never waits.
        let refused = match futures::poll!(std::pin::pin!(store.commit(
            &other,
            eo,
            Commit::of(vec![bucket("device.Q2", 1, json!({}))])
        ))) {
            std::task::Poll::Ready(r) => r,
            std::task::Poll::Pending => {
                panic!("a commit past the bound waits instead of being refused")
            }
        };
        assert!(
            matches!(refused, Err(StoreError::Overloaded(_))),
            "{refused:?}"
        );
        let answer = crate::error::NodeError::Store(refused.expect_err("refused"));
        let resp = actix_web::ResponseError::error_response(&answer);
        assert_eq!(
            resp.status(),
            actix_web::http::StatusCode::SERVICE_UNAVAILABLE
        );
        assert!(resp.headers().contains_key("retry-after"));
        holder.batch_execute("COMMIT").await.expect("release");
        for c in held {
            c.await.expect("queued commits commit");
        }
        store
            .commit(
                &other,
                eo,
                Commit::of(vec![bucket("device.Q2", 1, json!({}))]),
            )
            .await
            .expect("accepted again once the queue drained");
        assert_eq!(store.load_set(&other).await.expect("load").len(), 1);
        assert_eq!(store.load_set(&s).await.expect("load")[0].version, 4);
    }
}
