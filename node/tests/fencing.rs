//! Fenced ownership with two real nodes on one shared PostgreSQL store, both convinced they
//! own the same bucket set (the cluster's "stale ring" case, forced by sending requests for
//! one set to both nodes). Every activation takes the set's lease with a new epoch, so the
//! other node's next commit is refused (503, nothing acknowledged) and its actor stops; the
//! next request there reloads the set from the store. Whatever the interleaving: every
//! acknowledged write survives, no two acknowledged writes share a version, and versions
//! never go backwards.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};
use tether_node::store::pg_server::PgServer;
use tether_test_support::node::*;

const WRITES_PER_NODE: u64 = 60;

/// The thermostat template with the fields `w0`… of the concurrent phase and `w1000`…
/// of the lease hand-over before it (a node refuses fields outside a template).
fn template() -> String {
    let fields: Vec<String> = (0..2 * WRITES_PER_NODE)
        .chain(1000..1003)
        .map(|n| format!("w{n}"))
        .collect();
    thermostat_template(&fields.iter().map(String::as_str).collect::<Vec<_>>())
}

/// Writes field `w<n>` through `p`, retrying refused (fenced) commits; returns the
/// acknowledged version and the number of 503s seen.
async fn write_until_acked(p: &Principal, id: &str, n: u64) -> (u64, u32) {
    let mut fenced = 0;
    for _ in 0..50 {
        let r = p
            .put(
                id,
                &json!({"value": {format!("w{n}"): n}, "base_version": 0}),
            )
            .await;
        match r.status {
            StatusCode::OK => return (u64_of(&r.json(), "version"), fenced),
            StatusCode::SERVICE_UNAVAILABLE => fenced += 1,
            other => panic!("write w{n}: unexpected {other}: {}", r.text()),
        }
    }
    panic!("write w{n} was never acknowledged after 50 attempts");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_owning_one_set_never_both_commit_and_lose_nothing() {
    let pg = PgServer::start().expect("a private PostgreSQL server (installed by scripts/test)");
    let url = pg.url("fencing").expect("database");
    let a = Node::builder()
        .config(&template())
        .arg("--store")
        .arg(url.clone())
        .start()
        .await;
    let b = Node::builder()
        .config(&template())
        .arg("--store")
        .arg(url.clone())
        .keyring(a.keyring())
        .start()
        .await;
    let on_a = a.device("FENCE01");
    on_a.register_thermostat().await;
    let on_b = b.device("FENCE01");
    let id = "shared.FENCE01";

    // Each node certainly takes the lease from the other once: A holds it (registration),
    // B's first write takes it, so A's next commit must be refused as a stale owner.
    let put = |p: &Principal, n: u64| {
        let body = json!({"value": {format!("w{n}"): n}, "base_version": 0});
        let p = p.clone();
        async move { p.put(id, &body).await }
    };
    put(&on_a, 1000).await.expect(StatusCode::OK);
    put(&on_b, 1001).await.expect(StatusCode::OK);
    put(&on_a, 1002)
        .await
        .expect_error(StatusCode::SERVICE_UNAVAILABLE, "unavailable");

    // Both nodes write the same set at the same time.
    let writer = |p: Principal, parity: u64| async move {
        let mut acked = Vec::new();
        let mut fenced = 0;
        for i in 0..WRITES_PER_NODE {
            let n = 2 * i + parity;
            let (v, f) = write_until_acked(&p, id, n).await;
            fenced += f;
            acked.push((n, v));
        }
        (acked, fenced)
    };
    let ((acked_a, fenced_a), (acked_b, fenced_b)) =
        within(Duration::from_secs(120), "both writers finish", async {
            tokio::join!(writer(on_a, 0), writer(on_b, 1))
        })
        .await;

    // No two acknowledged writes share a version (only one owner ever committed each).
    let mut by_version: BTreeMap<u64, u64> = BTreeMap::new();
    for (n, v) in acked_a.iter().chain(&acked_b) {
        if let Some(other) = by_version.insert(*v, *n) {
            panic!("writes w{other} and w{n} were both acknowledged with version {v}");
        }
    }
    // Each writer saw its own versions go strictly up.
    for acked in [&acked_a, &acked_b] {
        assert!(
            acked.windows(2).all(|w| w[0].1 < w[1].1),
            "versions went backwards: {acked:?}"
        );
    }

    // A third node reads the set fresh from the store: every acknowledged write is there.
    let c = Node::builder()
        .config(&template())
        .arg("--store")
        .arg(url)
        .keyring(a.keyring())
        .start()
        .await;
    let bucket: Value = c.device("FENCE01").bucket(id).await;
    let max_acked = *by_version.keys().last().expect("writes were acknowledged");
    assert!(
        u64_of(&bucket, "version") >= max_acked,
        "stored version below an acknowledged one: {bucket}"
    );
    let missing: BTreeSet<u64> = acked_a
        .iter()
        .chain(&acked_b)
        .map(|(n, _)| *n)
        .filter(|n| bucket["value"][format!("w{n}")] != json!(n))
        .collect();
    assert!(
        missing.is_empty(),
        "acknowledged writes lost: {missing:?} in {bucket}"
    );
    // Fencing happened, on both sides: stale-owner commits were refused and both nodes
    // lost the lease at least once (the oracles above only bite if the nodes interleaved).
    let lost_a = a.metric("tether_leases_lost_total").await.unwrap_or(0.0);
    let lost_b = b.metric("tether_leases_lost_total").await.unwrap_or(0.0);
    eprintln!(
        "fencing: {} writes acknowledged, {} commits refused as stale owner (A {fenced_a}, B {fenced_b}); \
         leases lost: A {lost_a}, B {lost_b}",
        by_version.len(),
        fenced_a + fenced_b,
    );
    assert!(
        fenced_a + fenced_b > 0,
        "no commit was refused during the concurrent phase: the nodes never interleaved"
    );
    assert!(
        lost_a >= 1.0 && lost_b >= 1.0,
        "both nodes must have lost the lease (A {lost_a}, B {lost_b})"
    );
}
