//! The sync log through the real binary (API.md "Additions"): idempotent PUTs with
//! `op_id` (replays, 422, across kill -9), the history endpoint (paging, truncation,
//! authorization), diffs and `max_bytes` in subscribe answers, and `tether admin history`.

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use tether_proto::api::{UpdateRequest, UpdateResponse, WireMessage};
use tether_test_support::node::*;

/// `GET /v1/buckets/{id}/history` with a query, as `p`.
async fn history(p: &Principal, id: &str, query: &str) -> Resp {
    p.get(&format!("/v1/buckets/{id}/history{query}")).await
}

/// Every change of `id` (following `next_since_version`), asserting 200s.
async fn all_changes(p: &Principal, id: &str) -> Vec<Value> {
    let mut out = Vec::new();
    let mut since = 0;
    loop {
        let page = history(p, id, &format!("?since_version={since}&limit=1000"))
            .await
            .expect_json(StatusCode::OK);
        out.extend(page["changes"].as_array().expect("changes").iter().cloned());
        match page["next_since_version"].as_u64() {
            Some(n) => since = n,
            None => return out,
        }
    }
}

/// The fields these tests write, declared in the thermostat's template (a node refuses
/// writes of fields outside it: 422 `unknown_field`).
const FIELDS: &[&str] = &[
    "target", "a", "n", "away", "x", "y", "note", "f0", "f1", "f2", "by_app", "blob",
];

/// A node whose thermostat template declares [`FIELDS`].
fn templated() -> NodeBuilder {
    Node::builder().config(&thermostat_template(FIELDS))
}

fn with_op(op: &str) -> impl Fn(&Value) -> bool + '_ {
    move |c: &Value| c["op_id"] == op
}

async fn registered(node: &Node, serial: &str) -> Principal {
    let p = node.device(serial);
    p.register_thermostat().await;
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_put_repeated_with_its_op_id_is_replayed_and_logged_once() {
    let node = templated().start().await;
    let p = registered(&node, "OPS001").await;
    let id = "shared.OPS001";
    let body =
        json!({"value": {"target": 21.5}, "base_version": 1, "session": "s1", "op_id": "op-1"});
    let first = p.put(id, &body).await.expect_json(StatusCode::OK);
    assert_eq!(first["outcome"], "applied");
    assert!(
        first.get("replayed").is_none(),
        "a first answer is not a replay: {first}"
    );
    let again = p.put(id, &body).await.expect_json(StatusCode::OK);
    assert_eq!(again["outcome"], "applied");
    assert_eq!(again["replayed"], true, "{again}");
    assert_eq!(
        (&again["version"], &again["timestamp"]),
        (&first["version"], &first["timestamp"]),
        "the original write's version and timestamp"
    );
    // The same retry as protobuf: the same write (the body is the same), the same answer.
    let pb = UpdateRequest {
        value: obj(json!({"target": 21.5})),
        base_version: 1,
        occ: false,
        session: Some("s1".into()),
        op_id: Some("op-1".into()),
    };
    let resp: UpdateResponse = p
        .put_pb(id, pb.encode_pb())
        .await
        .expect(StatusCode::OK)
        .pb();
    assert!(resp.replayed);
    assert_eq!(resp.version, u64_of(&first, "version"));
    // The bucket moved once, and its history holds the write once.
    assert_eq!(u64_of(&p.bucket(id).await, "version"), 2);
    let changes = all_changes(&p, id).await;
    assert_eq!(changes.iter().filter(|c| with_op("op-1")(c)).count(), 1);
    let logged = changes.iter().find(|c| with_op("op-1")(c)).expect("logged");
    assert_eq!(logged["version"], 2);
    assert_eq!(logged["outcome"], "applied");
    assert_eq!(logged["by"], "device:OPS001");
    assert_eq!(logged["session"], "s1");
    assert_eq!(logged["fields"], json!({"target": 21.5}));
    assert_eq!(changes[0]["outcome"], "created", "{changes:?}");
    assert_eq!(changes[0]["by"], "server");

    // A merged write replayed after the bucket moved on: the original outcome, with the
    // bucket as it is now.
    let merged_body = json!({"value": {"mode": "cool"}, "base_version": 1, "op_id": "op-m"});
    let merged = p.put(id, &merged_body).await.expect_json(StatusCode::OK);
    assert_eq!(merged["outcome"], "merged");
    let (_, v4) = p
        .write(id, json!({"away": true}), u64_of(&merged, "version"))
        .await;
    let replay = p.put(id, &merged_body).await.expect_json(StatusCode::OK);
    assert_eq!(replay["outcome"], "merged");
    assert_eq!(replay["replayed"], true);
    assert_eq!(
        u64_of(&replay, "version"),
        v4,
        "the bucket as it is now: {replay}"
    );
    let now = p.bucket(id).await;
    assert_eq!(replay["value"], now["value"]);
    for (k, x) in [
        ("target", json!(21.5)),
        ("mode", json!("cool")),
        ("away", json!(true)),
    ] {
        assert_eq!(replay["value"][k], x, "{replay}");
    }
    // A refused write is remembered too, and replayed with the same status.
    let occ = json!({"value": {"mode": "off"}, "base_version": 1, "occ": true, "op_id": "op-r"});
    let refused = p.put(id, &occ).await.expect_json(StatusCode::CONFLICT);
    assert_eq!(refused["outcome"], "refused");
    let replay = p.put(id, &occ).await.expect_json(StatusCode::CONFLICT);
    assert_eq!(
        (&replay["outcome"], &replay["replayed"]),
        (&json!("refused"), &json!(true))
    );
    assert_eq!(
        u64_of(&p.bucket(id).await, "version"),
        v4,
        "nothing changed"
    );
    // Writes without an op id are unaffected: each one applies.
    let plain = json!({"value": {"n": 1}, "base_version": v4});
    p.put(id, &plain).await.expect_json(StatusCode::OK);
    let second = p.put(id, &plain).await.expect_json(StatusCode::OK);
    assert_eq!(second["outcome"], "merged");
    assert_eq!(u64_of(&second, "version"), v4 + 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_op_id_with_another_body_or_principal_is_refused_422() {
    let node = templated().user("alice").start().await;
    let p = registered(&node, "OPS002").await;
    let id = "shared.OPS002";
    p.put(
        id,
        &json!({"value": {"a": 1}, "base_version": 1, "op_id": "dup"}),
    )
    .await
    .expect_json(StatusCode::OK);
    for other in [
        json!({"value": {"a": 2}, "base_version": 1, "op_id": "dup"}),
        json!({"value": {"a": 1}, "base_version": 2, "op_id": "dup"}),
        json!({"value": {"a": 1}, "base_version": 1, "op_id": "dup", "session": "x"}),
        json!({"value": {"a": 1}, "base_version": 1, "op_id": "dup", "occ": true}),
    ] {
        let r = p.put(id, &other).await;
        let e = r.expect_error(StatusCode::UNPROCESSABLE_ENTITY, "op_id_reused");
        assert!(e.message.contains("dup"), "{e:?}");
    }
    // Op ids belong to the set: the same op id on the set's other bucket is another write.
    p.put(
        "device.OPS002",
        &json!({"value": {"a": 1}, "base_version": 1, "op_id": "dup"}),
    )
    .await
    .expect_error(StatusCode::UNPROCESSABLE_ENTITY, "op_id_reused");
    // Another principal replaying the device's op id does not get its answer.
    let alice = node.user("alice");
    let code = p.pairing_code().await;
    alice.pair(&code, None).await.expect(StatusCode::OK);
    alice
        .put(
            id,
            &json!({"value": {"a": 1}, "base_version": 1, "op_id": "dup"}),
        )
        .await
        .expect_error(StatusCode::UNPROCESSABLE_ENTITY, "op_id_reused");
    // Malformed op ids are a 400.
    for bad in ["", "a.b", "a b", &"x".repeat(65)] {
        p.put(id, &json!({"value": {}, "op_id": bad}))
            .await
            .expect_error(StatusCode::BAD_REQUEST, "bad_request");
    }
    assert_eq!(
        u64_of(&p.bucket(id).await, "version"),
        2,
        "only the first applied"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_between_commit_and_answer_then_retry_is_replayed_not_applied_twice() {
    let data = tempfile::tempdir().expect("data dir");
    let mut node = templated()
        .data_dir(data.path())
        .arg("--fault-stall-op-prefix")
        .arg("stall-")
        .start()
        .await;
    let p = registered(&node, "OPS003").await;
    let id = "shared.OPS003";
    // Right after the answer: acknowledged, then the plug is pulled.
    let acked = json!({"value": {"x": 1}, "base_version": 1, "op_id": "acked-1"});
    let first = p.put(id, &acked).await.expect_json(StatusCode::OK);
    // Between commit and answer: the node commits and holds the answer (fault injection).
    let stalled = json!({"value": {"y": 2}, "base_version": 2, "op_id": "stall-1"});
    let hanging = {
        let p = p.clone();
        let body = stalled.clone();
        tokio::spawn(async move {
            p.req(Method::PUT, "/v1/buckets/shared.OPS003")
                .json(&body)
                .timeout(Duration::from_secs(60))
                .send()
                .await
        })
    };
    // Wait until the write is committed (its change is in the log) — its answer never comes.
    let deadline = tokio::time::Instant::now() + REQUEST_DEADLINE;
    loop {
        if all_changes(&p, id).await.iter().any(with_op("stall-1")) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "stall-1 never committed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!hanging.is_finished(), "the answer must still be pending");
    node.kill9().await;
    assert!(
        within(REQUEST_DEADLINE, "the hung PUT fails", hanging)
            .await
            .expect("task")
            .is_err(),
        "the client saw no answer"
    );
    let keyring = node.keyring();
    drop(node);
    let node = templated()
        .data_dir(data.path())
        .keyring(keyring)
        .start()
        .await;
    let p = node.device("OPS003");
    // Both retries are answered from the log, nothing is applied again.
    let again = p.put(id, &acked).await.expect_json(StatusCode::OK);
    assert_eq!(again["replayed"], true, "{again}");
    assert_eq!(again["version"], first["version"]);
    let retry = p.put(id, &stalled).await.expect_json(StatusCode::OK);
    assert_eq!(retry["replayed"], true, "{retry}");
    assert_eq!(
        (&retry["outcome"], u64_of(&retry, "version")),
        (&json!("applied"), 3)
    );
    let b = p.bucket(id).await;
    assert_eq!(u64_of(&b, "version"), 3, "applied once each: {b}");
    let changes = all_changes(&p, id).await;
    for op in ["acked-1", "stall-1"] {
        assert_eq!(
            changes.iter().filter(|c| with_op(op)(c)).count(),
            1,
            "{op} in the history once: {changes:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_pages_truncates_and_is_authorized_like_the_bucket() {
    let node = templated()
        .user("alice")
        .arg("--history-per-bucket")
        .arg("5")
        .start()
        .await;
    let p = registered(&node, "HIS001").await;
    let other = registered(&node, "HIS002").await;
    let id = "shared.HIS001";
    let mut version = 1;
    for i in 0..40 {
        let (_, v) = p
            .write(id, json!({format!("f{}", i % 3): i}), version)
            .await;
        version = v;
    }
    assert_eq!(version, 41);
    // Retention: at least the last 5 changes are kept, the oldest long gone.
    let all = history(&p, id, "?limit=1000")
        .await
        .expect_json(StatusCode::OK);
    let oldest = u64_of(&all, "oldest_version");
    assert!(
        (25..=37).contains(&oldest),
        "kept at least 5, trimmed: {all}"
    );
    assert_eq!(
        all["truncated"], true,
        "changes after 0 were dropped: {all}"
    );
    let changes = all["changes"].as_array().expect("changes");
    assert_eq!(u64_of(&changes[0], "version"), oldest);
    assert_eq!(
        changes
            .iter()
            .map(|c| u64_of(c, "version"))
            .collect::<Vec<_>>(),
        (oldest..=41).collect::<Vec<_>>(),
        "ascending, contiguous"
    );
    assert_eq!(changes.last().expect("last")["fields"], json!({"f0": 39}));
    assert_eq!(all["next_since_version"], Value::Null);
    // Not truncated when asking from a version still kept.
    let recent = history(&p, id, &format!("?since_version={oldest}"))
        .await
        .expect_json(StatusCode::OK);
    assert_eq!(recent["truncated"], false);
    assert_eq!(recent["id"], id);
    // Paging: versions above since_version, at most limit, next_since_version to go on.
    let mut since = 38;
    let mut seen = Vec::new();
    loop {
        let page = history(&p, id, &format!("?since_version={since}&limit=2"))
            .await
            .expect_json(StatusCode::OK);
        let vs: Vec<u64> = page["changes"]
            .as_array()
            .expect("changes")
            .iter()
            .map(|c| u64_of(c, "version"))
            .collect();
        assert!(vs.len() <= 2 && vs.iter().all(|v| *v > since), "{page}");
        seen.extend(vs);
        match page["next_since_version"].as_u64() {
            Some(n) => since = n,
            None => break,
        }
    }
    assert_eq!(seen, [39, 40, 41]);
    let empty = history(&p, id, "?since_version=41")
        .await
        .expect_json(StatusCode::OK);
    assert_eq!(
        (&empty["changes"], &empty["truncated"]),
        (&json!([]), &json!(false))
    );
    // Bad queries are 400s.
    for q in ["?limit=0", "?since_version=x", "?limit=-1"] {
        history(&p, id, q)
            .await
            .expect_error(StatusCode::BAD_REQUEST, "bad_request");
    }
    // Same authorization as reading the bucket: another device 403, a bucket of one's own
    // set that does not exist 404, an unpaired user 403, no credentials 401.
    history(&other, id, "")
        .await
        .expect_error(StatusCode::FORBIDDEN, "forbidden");
    history(&p, "thing.HIS001", "")
        .await
        .expect_error(StatusCode::NOT_FOUND, "not_found");
    let alice = node.user("alice");
    history(&alice, id, "")
        .await
        .expect_error(StatusCode::FORBIDDEN, "forbidden");
    let anon = node
        .send(node.anon(Method::GET, &format!("/v1/buckets/{id}/history")))
        .await;
    anon.expect_error(StatusCode::UNAUTHORIZED, "unauthorized");
    // Once paired, the user reads it (the audit trail) and its writes show as user:alice.
    let code = p.pairing_code().await;
    alice.pair(&code, None).await.expect(StatusCode::OK);
    alice
        .put(
            id,
            &json!({"value": {"by_app": true}, "base_version": 41, "op_id": "app-1"}),
        )
        .await
        .expect_json(StatusCode::OK);
    let last = history(&alice, id, "?since_version=41")
        .await
        .expect_json(StatusCode::OK);
    assert_eq!(last["changes"][0]["by"], "user:alice", "{last}");
    assert_eq!(last["changes"][0]["op_id"], "app-1");
}

/// Subscribes holding `held` (id, version) pairs with `extra` body fields; the answer.
async fn subscribe(p: &Principal, held: &[(&str, u64)], extra: Value) -> Value {
    let mut body = json!({
        "buckets": held.iter().map(|(id, v)| json!({"id": id, "version": v})).collect::<Vec<_>>(),
        "session": "device-session",
        "timeout_ms": 20_000,
    });
    for (k, v) in extra.as_object().expect("object") {
        body[k] = v.clone();
    }
    p.subscribe(&body, Duration::from_secs(30))
        .await
        .expect_json(StatusCode::OK)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribe_with_diffs_answers_a_device_five_versions_behind_with_the_fields_changed() {
    let node = templated()
        .arg("--history-per-bucket")
        .arg("20")
        .start()
        .await;
    let p = registered(&node, "DIF001").await;
    let id = "shared.DIF001";
    let held = p.bucket(id).await;
    assert_eq!(u64_of(&held, "version"), 1);
    // Another client changes a few fields five times (the second changes `mode` again).
    let writes = [
        json!({"mode": "heat"}),
        json!({"target": 20}),
        json!({"mode": "cool"}),
        json!({"name": "Hall"}),
        json!({"target": 22.5}),
    ];
    let mut v = 1;
    for w in writes {
        let (_, nv) = p.write(id, w, v).await;
        v = nv;
    }
    assert_eq!(v, 6);
    let full = p.bucket(id).await;
    let answer = subscribe(&p, &[(id, 1)], json!({"diffs": true})).await;
    let b = bucket_in(&answer, id);
    assert_eq!(
        (u64_of(&b, "version"), u64_of(&b, "base_version")),
        (6, 1),
        "{b}"
    );
    assert_eq!(
        b["changes"],
        json!({"mode": "cool", "target": 22.5, "name": "Hall"}),
        "exactly the fields changed since v1, latest values"
    );
    assert!(b.get("value").is_none(), "a diff instead of the value: {b}");
    // Applied to the held copy, it is the stored value.
    let mut copy = held["value"].as_object().expect("object").clone();
    for (k, x) in b["changes"].as_object().expect("object") {
        copy.insert(k.clone(), x.clone());
    }
    assert_eq!(Value::Object(copy), full["value"]);
    // Without `diffs`: the whole value, as before.
    let plain = subscribe(&p, &[(id, 1)], json!({})).await;
    let pb = bucket_in(&plain, id);
    assert_eq!(pb["value"], full["value"]);
    assert!(pb.get("changes").is_none() && pb.get("base_version").is_none());
    // No held version: the whole value even with diffs.
    let none = p
        .subscribe(
            &json!({"buckets": [{"id": id}], "diffs": true, "timeout_ms": 1000}),
            Duration::from_secs(10),
        )
        .await
        .expect_json(StatusCode::OK);
    assert_eq!(bucket_in(&none, id)["value"], full["value"]);

    // A held subscription is notified with a diff from the version it held.
    let waiting = {
        let p = p.clone();
        tokio::spawn(async move { subscribe(&p, &[(id, 6)], json!({"diffs": true})).await })
    };
    node.wait_held(1, REQUEST_DEADLINE).await;
    p.put(
        id,
        &json!({"value": {"away": true}, "base_version": 6, "session": "app"}),
    )
    .await
    .expect_json(StatusCode::OK);
    let note = within(NOTIFY_DEADLINE * 5, "notification", waiting)
        .await
        .expect("task");
    let n = bucket_in(&note, id);
    assert_eq!(
        (
            u64_of(&n, "base_version"),
            u64_of(&n, "version"),
            &n["changes"]
        ),
        (6, 7, &json!({"away": true})),
        "{note}"
    );

    // Further behind than the actor remembers (8 changes), the diff comes from the
    // store's log; a version older than the log gets the whole value.
    for i in 0..25 {
        let (_, nv) = p.write(id, json!({"n": i}), v.max(7)).await;
        v = nv;
    }
    for back in [3, 18] {
        let behind = subscribe(&p, &[(id, v - back)], json!({"diffs": true})).await;
        let d = bucket_in(&behind, id);
        assert_eq!(u64_of(&d, "base_version"), v - back, "{d}");
        assert_eq!(d["changes"], json!({"n": 24}), "{d}");
    }
    let too_old = subscribe(&p, &[(id, 2)], json!({"diffs": true})).await;
    let t = bucket_in(&too_old, id);
    assert!(t.get("changes").is_none(), "v2 fell out of the log: {t}");
    assert_eq!(u64_of(&t, "version"), v);
    assert_eq!(t["value"]["n"], 24);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_bytes_splits_an_answer_into_pending() {
    let node = templated().start().await;
    let p = registered(&node, "MAX001").await;
    let (dev, shared) = ("device.MAX001", "shared.MAX001");
    let big = "x".repeat(400);
    p.write(dev, json!({"blob": big}), 1).await;
    p.write(shared, json!({"note": "small"}), 1).await;
    // Room for about one bucket: one is sent, the other named in `pending`.
    let answer = subscribe(&p, &[(dev, 1), (shared, 1)], json!({"max_bytes": 600})).await;
    let text = serde_json::to_string(&answer).expect("json");
    assert!(text.len() <= 600, "{} bytes: {text}", text.len());
    let sent = ids_of(&answer);
    assert_eq!(sent.len(), 1, "{answer}");
    let left = if sent[0] == dev { shared } else { dev };
    assert_eq!(answer["pending"], json!([left]), "{answer}");
    // The client subscribes again at once with what it now holds: the pending one comes.
    let held: Vec<(&str, u64)> = [dev, shared]
        .into_iter()
        .map(|b| (b, if b == left { 1 } else { 2 }))
        .collect();
    let next = subscribe(&p, &held, json!({"max_bytes": 600})).await;
    assert_eq!(ids_of(&next), [left], "{next}");
    assert!(next.get("pending").is_none(), "{next}");
    // One bucket alone larger than max_bytes is still sent, alone.
    let alone = subscribe(&p, &[(dev, 1), (shared, 1)], json!({"max_bytes": 50})).await;
    assert_eq!(buckets_of(&alone).len(), 1, "{alone}");
    assert_eq!(alone["pending"].as_array().map(Vec::len), Some(1));
    // Without max_bytes everything stale comes at once.
    let all = subscribe(&p, &[(dev, 1), (shared, 1)], json!({})).await;
    assert_eq!(ids_of(&all), [dev, shared]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_history_prints_the_audit_trail() {
    let data = tempfile::tempdir().expect("data dir");
    let mut node = templated().data_dir(data.path()).start().await;
    let p = registered(&node, "ADM001").await;
    p.put(
        "shared.ADM001",
        &json!({"value": {"target": 19}, "base_version": 1, "session": "panel", "op_id": "op-admin"}),
    )
    .await
    .expect_json(StatusCode::OK);
    node.sigterm().await;
    assert!(node.wait_exit(REQUEST_DEADLINE).await.success());
    let dir = data.path().to_str().expect("utf-8");
    let table = admin(["history", "shared.ADM001", "--data-dir", dir])
        .await
        .ok();
    let lines: Vec<&str> = table.lines().collect();
    assert!(
        lines[0].starts_with("shared.ADM001: 2 change(s)"),
        "{table}"
    );
    let write = lines
        .iter()
        .find(|l| l.contains("op-admin"))
        .unwrap_or_else(|| panic!("no op-admin line in {table}"));
    for part in ["applied", "device:ADM001", "panel", r#"{"target":19}"#] {
        assert!(write.contains(part), "{part} missing from {write:?}");
    }
    assert!(
        lines
            .iter()
            .any(|l| l.contains("created") && l.contains("server")),
        "{table}"
    );
    let json_out = admin(["history", "shared.ADM001", "--json", "--data-dir", dir])
        .await
        .ok();
    let h: Value = serde_json::from_str(&json_out).expect("--json is API.md's history answer");
    assert_eq!(h["changes"][1]["op_id"], "op-admin");
    assert_eq!(h["oldest_version"], 1);
    let missing = admin(["history", "shared.NOPE01", "--data-dir", dir]).await;
    assert!(!missing.status.success());
    assert!(missing.stderr.contains("no bucket"), "{missing:?}");
}
