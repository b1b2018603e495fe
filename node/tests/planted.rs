//! The planted bugs bite (ARCHITECTURE.md "Planted bugs"): each, switched on with
//! `TETHER_PLANTED_BUG`, breaks its guarantee where a client can see it, so a chaos
//! scenario that runs into it must fail. Built only with the features:
//! `cargo test -p tether-node --features planted-bugs --test planted` (and
//! `--test paused_owner` for `stale-reads`). Without them this file is empty.
#![cfg(feature = "planted-bugs")]

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};
use tether_node::store::pg_server::PgServer;
use tether_test_support::node::*;

/// The nodes run this test's own build (with the planted features), not a plain one.
fn planted_node(bug: &str) -> NodeBuilder {
    if std::env::var_os("TETHER_BIN").is_none() {
        std::env::set_var("TETHER_BIN", env!("CARGO_BIN_EXE_tether"));
    }
    Node::builder()
        .config(&thermostat_template(&["w0", "w1", "w2", "w3", "w4"]))
        .env("TETHER_PLANTED_BUG", bug)
}

fn put_body(field: &str, n: u64) -> Value {
    json!({"value": {field: n}, "base_version": 0})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ack_before_durable_loses_an_acknowledged_write_on_kill_9() {
    let data = tempfile::tempdir().expect("data dir");
    let mut node = planted_node("ack-before-durable")
        .data_dir(data.path())
        .start()
        .await;
    assert!(
        node.stderr_all().contains("PLANTED BUG ACTIVE"),
        "no start-up warning"
    );
    let dev = node.device("PLANT001");
    dev.register_thermostat().await;
    // The buckets' creation is committed (late, like every batch) before the write.
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    let id = "shared.PLANT001";
    let acked = u64_of(
        &dev.put(id, &put_body("w1", 1))
            .await
            .expect_json(StatusCode::OK),
        "version",
    );
    node.kill9().await;
    let node = planted_node("")
        .data_dir(data.path())
        .keyring(node.keyring())
        .start()
        .await;
    let stored = node.device("PLANT001").bucket(id).await;
    assert!(
        u64_of(&stored, "version") < acked,
        "the planted bug did not bite: v{acked} was acknowledged and survived kill -9: {stored}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skip_epoch_check_lets_two_owners_commit_the_same_version() {
    let pg = PgServer::start().expect("a private PostgreSQL server (installed by scripts/test)");
    let url = pg.url("planted").expect("database");
    let a = planted_node("skip-epoch-check")
        .arg("--store")
        .arg(url.clone())
        .start()
        .await;
    let b = planted_node("skip-epoch-check")
        .arg("--store")
        .arg(url)
        .keyring(a.keyring())
        .start()
        .await;
    let on_a = a.device("PLANT002");
    on_a.register_thermostat().await;
    let on_b = b.device("PLANT002");
    let id = "shared.PLANT002";
    let put = |p: &Principal, n: u64| {
        let (p, body) = (p.clone(), put_body(&format!("w{n}"), n));
        async move { p.put(id, &body).await.expect_json(StatusCode::OK) }
    };
    // A loads the set; B takes the lease and writes; A, still holding its old memory and
    // epoch, writes too: fenced without the bug, acknowledged with it.
    put(&on_a, 0).await;
    let from_b = put(&on_b, 1).await;
    let from_a = put(&on_a, 2).await;
    assert_eq!(
        u64_of(&from_a, "version"),
        u64_of(&from_b, "version"),
        "the planted bug did not bite: no forked version (B {from_b}, A {from_a})"
    );
    assert_ne!(from_a["value"], from_b["value"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_notification_leaves_a_held_subscriber_unanswered() {
    let node = planted_node("drop-notification").start().await;
    let dev = node.device("PLANT003");
    dev.register_thermostat().await;
    let id = "shared.PLANT003";
    // Every 3rd notification is dropped: of three rounds, one subscriber is not woken.
    let mut missed = 0;
    for n in 0..3u64 {
        let held = dev.bucket(id).await;
        let sub = {
            let (p, body) = (
                dev.clone(),
                json!({"buckets": [{"id": id, "timestamp": held["timestamp"], "version": held["version"]}],
                       "session": "watcher", "timeout_ms": 3_000}),
            );
            tokio::spawn(async move { p.subscribe(&body, Duration::from_secs(20)).await })
        };
        node.wait_held(1, REQUEST_DEADLINE).await;
        dev.put(
            id,
            &json!({"value": {format!("w{n}"): n}, "base_version": 0, "session": "writer"}),
        )
        .await
        .expect_json(StatusCode::OK);
        let answer = within(Duration::from_secs(20), "subscribe answered", sub)
            .await
            .expect("subscribe task")
            .expect_json(StatusCode::OK);
        if buckets_of(&answer).is_empty() {
            missed += 1;
        }
    }
    assert!(
        missed > 0,
        "the planted bug did not bite: every change was notified"
    );
}
