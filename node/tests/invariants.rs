//! ARCHITECTURE.md's invariants and README claims that need a store made slow or failing
//! on purpose (the hidden `--test-store-faults DIR` seam, `node/src/store/faults.rs`), or a
//! node configured in a way no other test uses: each through the real binary.

use std::path::Path;
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{json, Value};
use tether_test_support::node::*;

const A: &str = "INV00001";

fn held(id: &str, bucket: &Value) -> Value {
    json!({"id": id, "timestamp": bucket["timestamp"], "version": bucket["version"]})
}

/// Waits (bounded) until `path` exists: the store seam's sign that a commit is held.
async fn wait_file(path: &Path) {
    let start = Instant::now();
    while !path.exists() {
        assert!(
            start.elapsed() < REQUEST_DEADLINE,
            "{} never appeared",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn faulty_node(faults: &Path) -> NodeBuilder {
    Node::builder()
        .arg("--test-store-faults")
        .arg(faults.display().to_string())
        .user("alice")
}

/// Invariant 4: while a write's commit is in flight, reads and subscribe checks see only
/// the committed state, and nobody is notified; once it is durable the writer is answered
/// and the holders are notified with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_see_only_committed_state_while_a_commit_is_in_flight() {
    let faults = tempfile::tempdir().expect("faults dir");
    let node = faulty_node(faults.path()).start().await;
    let d = node.device(A);
    d.register_thermostat().await;
    let id = format!("shared.{A}");
    let before = d.bucket(&id).await;
    let v = u64_of(&before, "version");
    let watcher = node.device(A).with_client(http_client());
    let body = json!({"buckets": [held(&id, &before)], "session": "watcher", "timeout_ms": 60_000});
    let sub = tokio::spawn(async move { watcher.subscribe(&body, Duration::from_secs(65)).await });
    node.wait_held(1, REQUEST_DEADLINE).await;

    std::fs::write(faults.path().join("hold-commit"), b"").expect("hold commits");
    let writer = node.device(A).with_client(http_client());
    let put = {
        let id = id.clone();
        tokio::spawn(async move {
            writer
                .put(&id, &json!({"value": {"name": "in flight"}, "base_version": v, "session": "writer"}))
                .await
        })
    };
    wait_file(&faults.path().join("commit-held")).await;

    let read = d.bucket(&id).await;
    assert_eq!(
        read, before,
        "a read during the commit sees the committed bucket only"
    );
    let listed = d
        .get(&format!("/v1/buckets?ids={id}"))
        .await
        .expect_json(StatusCode::OK);
    assert_eq!(
        bucket_in(&listed, &id)["version"],
        before["version"],
        "{listed}"
    );
    // A subscribe holding the committed versions is not stale: it is held, not answered
    // with the uncommitted write.
    let second = node.device(A).with_client(http_client());
    let body = json!({"buckets": [held(&id, &before)], "session": "second", "timeout_ms": 60_000});
    let sub2 = tokio::spawn(async move { second.subscribe(&body, Duration::from_secs(65)).await });
    node.wait_held(2, REQUEST_DEADLINE).await;
    assert!(
        !put.is_finished(),
        "the write was answered before it was durable"
    );

    std::fs::remove_file(faults.path().join("hold-commit")).expect("release");
    let acked = within(REQUEST_DEADLINE, "the write, once durable", put)
        .await
        .expect("writer task")
        .expect_json(StatusCode::OK);
    assert_eq!(u64_of(&acked, "version"), v + 1, "{acked}");
    for (what, s) in [("first", sub), ("second", sub2)] {
        let r = within(NOTIFY_DEADLINE, "holder notified after the commit", s)
            .await
            .expect("subscribe task")
            .expect_json(StatusCode::OK);
        let got = bucket_in(&r, &id);
        assert_eq!(u64_of(&got, "version"), v + 1, "{what}: {r}");
        assert_eq!(got["value"]["name"], "in flight", "{what}: {r}");
    }
}

/// Invariant 3 and the README's `Retry-After`: a commit the store fails is answered 503
/// with `Retry-After: 1` and the JSON error, changes nothing in memory or in the store,
/// and the same write succeeds once the store is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_commit_answers_503_with_retry_after_and_changes_nothing() {
    let faults = tempfile::tempdir().expect("faults dir");
    let node = faulty_node(faults.path()).start().await;
    let d = node.device(A);
    d.register_thermostat().await;
    let id = format!("shared.{A}");
    let before = d.bucket(&id).await;
    let v = u64_of(&before, "version");

    std::fs::write(faults.path().join("fail-commit"), b"").expect("fail commits");
    let body = json!({"value": {"name": "lost?"}, "base_version": v});
    let r = d.put(&id, &body).await;
    r.expect_error(StatusCode::SERVICE_UNAVAILABLE, "store_error");
    assert_eq!(
        r.headers.get("retry-after").and_then(|v| v.to_str().ok()),
        Some("1"),
        "503 carries Retry-After: 1"
    );
    assert_eq!(
        d.bucket(&id).await,
        before,
        "memory unchanged by the failed batch"
    );

    std::fs::remove_file(faults.path().join("fail-commit")).expect("store back");
    let ok = d.put(&id, &body).await.expect_json(StatusCode::OK);
    assert_eq!(
        ok["outcome"], "applied",
        "the retry is based on the same version: {ok}"
    );
    assert_eq!(u64_of(&ok, "version"), v + 1, "{ok}");
}

/// Passivation and reload: an idle set's actor stops and is loaded again on the next
/// request with every bucket; a set whose only activity is a held subscriber stops too,
/// its subscriber kept as a waiter record (parked, invariant 35), and the next write
/// loads the set again and answers it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passivation_and_reload_keep_every_bucket_and_subscriber() {
    const B: &str = "INV00002";
    let node = Node::builder()
        .arg("--passivate-after-ms")
        .arg("300")
        .start()
        .await;
    let (a, b) = (node.device(A), node.device(B));
    a.register_thermostat().await;
    b.register_thermostat().await;
    let a_shared = format!("shared.{A}");
    let (_, va) = a.write(&a_shared, json!({"name": "kept"}), 1).await;
    let a_buckets = a.get("/v1/buckets").await.expect_json(StatusCode::OK);
    let b_id = format!("shared.{B}");
    let b_before = b.bucket(&b_id).await;
    let watcher = node.device(B).with_client(http_client());
    let body =
        json!({"buckets": [held(&b_id, &b_before)], "session": "watcher", "timeout_ms": 60_000});
    let sub = tokio::spawn(async move { watcher.subscribe(&body, Duration::from_secs(65)).await });
    node.wait_held(1, REQUEST_DEADLINE).await;

    // Both sets passivate: A's idle one, and B's, whose subscriber is parked.
    node.wait_metric(
        "tether_parked_bucket_sets",
        Duration::from_secs(30),
        "B's set parked with its subscriber",
        |n| n == 1.0,
    )
    .await;
    node.wait_metric(
        "tether_active_bucket_sets",
        Duration::from_secs(30),
        "no set in memory",
        |n| n == 0.0,
    )
    .await;
    node.wait_held(1, REQUEST_DEADLINE).await;
    assert!(!sub.is_finished(), "passivation answered a held subscriber");

    // Reloaded with every bucket as committed.
    let reloaded = a.get("/v1/buckets").await.expect_json(StatusCode::OK);
    assert_eq!(
        reloaded, a_buckets,
        "a reloaded set lost or changed buckets"
    );
    assert_eq!(bucket_in(&reloaded, &a_shared)["version"], json!(va));
    // The held subscriber is still there: a write wakes it.
    let (_, vb) = b
        .write(
            &b_id,
            json!({"name": "woken"}),
            u64_of(&b_before, "version"),
        )
        .await;
    let r = within(
        NOTIFY_DEADLINE,
        "the subscriber held across passivations",
        sub,
    )
    .await
    .expect("subscribe task")
    .expect_json(StatusCode::OK);
    assert_eq!(u64_of(&bucket_in(&r, &b_id), "version"), vb, "{r}");
    node.wait_held(0, REQUEST_DEADLINE).await;
    node.wait_metric(
        "tether_parked_bucket_sets",
        Duration::from_secs(5),
        "the activation took the waiters",
        |n| n == 0.0,
    )
    .await;
}

/// README: "The node refuses cluster mode on the embedded redb store."
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_mode_is_refused_on_the_embedded_store() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let failure = Node::builder()
        .arg("--grpc-listen")
        .arg(format!("127.0.0.1:{port}"))
        .env("TETHER_CLUSTER_SECRET", "cluster-test-secret-0123456789")
        .try_start()
        .await
        .expect_err("cluster mode on redb must not start");
    let status = failure
        .status
        .unwrap_or_else(|| panic!("expected an exit, got: {}", failure.what));
    assert!(!status.success(), "{status:?}");
    assert!(
        failure.stderr.contains("every node shares") && failure.stderr.contains("redb"),
        "the refusal says why: {}",
        failure.stderr
    );
}
