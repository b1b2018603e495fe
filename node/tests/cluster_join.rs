//! How a node joins, as Kubernetes runs it (see `helm/`): a cluster secret rotated in two
//! rolling steps without a partition (every node holding two secrets in between), a node
//! with another secret refused and never serving on its own, and a node whose seed list
//! resolves only to itself starting a new cluster at once rather than after the 15 s
//! "no seed answered" fallback. Real `tether` processes on a private PostgreSQL.
//! (The same, rendered from the Helm chart and run in network namespaces with DNS:
//! `helm/execute`.)

use std::path::PathBuf;
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::Value;
use tether_node::routing::cluster::ALONE_AFTER;
use tether_node::store::pg_server::PgServer;
use tether_test_support::node::*;

const OLD: &str = "old-cluster-secret-0123456789";
const NEW: &str = "new-cluster-secret-9876543210";
const OTHER: &str = "some-other-clusters-secret-42";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// Secret files written once per test.
struct Secrets(tempfile::TempDir);

impl Secrets {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        for (name, value) in [("old", OLD), ("new", NEW), ("other", OTHER)] {
            std::fs::write(dir.path().join(name), format!("{value}\n")).expect("write secret");
        }
        Secrets(dir)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.path().join(name)
    }
}

/// One node: its id and gRPC port, fixed across restarts like a StatefulSet pod's name.
struct Slot {
    id: &'static str,
    grpc: u16,
    data: tempfile::TempDir,
}

impl Slot {
    fn new(id: &'static str) -> Self {
        Slot {
            id,
            grpc: free_port(),
            data: tempfile::tempdir().expect("data dir"),
        }
    }

    async fn start(
        &self,
        store: &str,
        secrets: &[PathBuf],
        join: Option<u16>,
        keyring: Option<&Node>,
    ) -> Node {
        let mut b = Node::builder()
            .data_dir(self.data.path())
            .arg("--node-id")
            .arg(self.id)
            .arg("--store")
            .arg(store)
            .arg("--grpc-listen")
            .arg(format!("127.0.0.1:{}", self.grpc));
        for s in secrets {
            b = b.arg("--cluster-secret-file").arg(s.display().to_string());
        }
        if let Some(seed) = join {
            b = b.arg("--join").arg(format!("127.0.0.1:{seed}"));
        }
        if let Some(k) = keyring {
            b = b.keyring(k.keyring());
        }
        b.start().await
    }
}

/// `/readyz` of `node`: status code and body.
async fn readyz(node: &Node) -> (StatusCode, Value) {
    let r = send(http_client().get(node.url("/readyz"))).await;
    (r.status, r.json())
}

/// SIGTERM and wait for the exit, as a rolling update does to the old pod.
async fn stop(mut node: Node) {
    node.sigterm().await;
    let status = node.wait_exit(Duration::from_secs(40)).await;
    assert!(status.success(), "drained node exited with {status}");
}

fn pg() -> (PgServer, String) {
    let pg = PgServer::start().unwrap_or_else(|e| {
        panic!("a private PostgreSQL is needed (Debian package postgresql): {e}")
    });
    let url = pg.url("tether").expect("create database");
    (pg, url)
}

fn has_log(node: &Node, needle: &str) -> bool {
    node.stderr_all().contains(needle)
}

/// A write through `node` and a read of it through `other` (both serve every set, by
/// forwarding to its owner): the two are one cluster, not two.
async fn one_cluster(node: &Node, other: &Node, serial: &str, n: u64) {
    let device = node.device(serial);
    device.register_thermostat().await;
    let id = format!("device.{serial}");
    let start = Instant::now();
    loop {
        let r = device
            .put(
                &id,
                &serde_json::json!({"value": {"current_temperature": n}, "base_version": 0}),
            )
            .await;
        if r.status == StatusCode::OK {
            break;
        }
        assert!(
            r.status == StatusCode::SERVICE_UNAVAILABLE
                && start.elapsed() < Duration::from_secs(10),
            "write through {}: {} {}",
            node.base,
            r.status,
            r.text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let creds = device.credentials();
    let read = other.with_credentials(creds).bucket(&id).await;
    assert_eq!(
        read["value"]["current_temperature"], n,
        "read through {}: {read}",
        other.base
    );
}

#[tokio::test]
async fn a_cluster_secret_rotates_in_two_rolling_steps_without_a_partition() {
    let (_pg, store) = pg();
    let s = Secrets::new();
    let (a, b) = (Slot::new("a"), Slot::new("b"));
    let old = [s.path("old")];
    // In the chart's order: `clusterSecret.key` (the current secret) first, then
    // `additionalKeys` (the next one). Both orders are in cluster/src/auth.rs's table.
    let both = [s.path("old"), s.path("new")];
    let new = [s.path("new")];

    let na = a.start(&store, &old, None, None).await;
    let nb = b.start(&store, &old, Some(a.grpc), Some(&na)).await;
    nb.wait_ready(2).await;

    // Step 1: every node gets both secrets, one pod at a time; each restarted pod rejoins
    // the one still on the old secret alone.
    stop(nb).await;
    let nb = b.start(&store, &both, Some(a.grpc), Some(&na)).await;
    nb.wait_ready(2).await;
    na.wait_ready(2).await;
    stop(na).await;
    let na = a.start(&store, &both, Some(b.grpc), Some(&nb)).await;
    na.wait_ready(2).await;
    nb.wait_ready(2).await;
    one_cluster(&na, &nb, "ROT0001", 1).await;

    // Step 2: every node only the new one; a node on both talks to one on the new only.
    stop(nb).await;
    let nb = b.start(&store, &new, Some(a.grpc), Some(&na)).await;
    nb.wait_ready(2).await;
    na.wait_ready(2).await;
    stop(na).await;
    let na = a.start(&store, &new, Some(b.grpc), Some(&nb)).await;
    na.wait_ready(2).await;
    nb.wait_ready(2).await;
    one_cluster(&nb, &na, "ROT0002", 2).await;
    assert!(
        !has_log(&na, "refuses this node's gossip") && !has_log(&nb, "refuses this node's gossip"),
        "no refusal at any step; a:\n{}\nb:\n{}",
        na.stderr_tail(),
        nb.stderr_tail()
    );

    // The old secret alone is now refused: the retired secret opens nothing.
    let c = Slot::new("c");
    let nc = c.start(&store, &old, Some(a.grpc), Some(&na)).await;
    let start = Instant::now();
    while !has_log(&nc, "refuses this node's gossip") {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the node on the retired secret was not refused; stderr:\n{}",
            nc.stderr_tail()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(readyz(&nc).await.0, StatusCode::SERVICE_UNAVAILABLE);
    na.wait_ready(2).await;
}

#[tokio::test]
async fn a_node_refused_by_its_peers_never_serves_on_its_own() {
    let (_pg, store) = pg();
    let s = Secrets::new();
    let (a, x) = (Slot::new("a"), Slot::new("intruder"));
    let na = a.start(&store, &[s.path("old")], None, None).await;
    let nx = x
        .start(&store, &[s.path("other")], Some(a.grpc), Some(&na))
        .await;
    // Past the point where a node whose seeds never answer starts alone, it still does
    // not serve: its seed answered, and refused it.
    let start = Instant::now();
    while start.elapsed() < ALONE_AFTER + Duration::from_secs(3) {
        let (status, body) = readyz(&nx).await;
        assert_eq!(
            status,
            StatusCode::SERVICE_UNAVAILABLE,
            "a node with another cluster secret must not serve: {body}; stderr:\n{}",
            nx.stderr_tail()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(
        has_log(&nx, "refused by the cluster"),
        "{}",
        nx.stderr_tail()
    );
    let (status, body) = readyz(&na).await;
    assert_eq!(
        (status, &body["members"]),
        (StatusCode::OK, &Value::from(1)),
        "{body}"
    );
    assert!(
        !has_log(&nx, "serving as a new cluster"),
        "{}",
        nx.stderr_tail()
    );
}

#[tokio::test]
async fn seeds_resolving_only_to_itself_start_a_new_cluster_at_once() {
    let (_pg, store) = pg();
    let s = Secrets::new();
    let a = Slot::new("a");
    // What the first pod of a StatefulSet sees: the headless Service's name resolves to
    // its own address only.
    let na = a.start(&store, &[s.path("old")], Some(a.grpc), None).await;
    na.wait_ready(1).await;
    assert!(
        has_log(
            &na,
            "the seeds resolve only to this node: starting a new cluster"
        ),
        "ready for the right reason, not the {ALONE_AFTER:?} fallback; stderr:\n{}",
        na.stderr_tail()
    );
    // The next pod finds it and joins.
    let b = Slot::new("b");
    let nb = b
        .start(&store, &[s.path("old")], Some(a.grpc), Some(&na))
        .await;
    nb.wait_ready(2).await;
    na.wait_ready(2).await;
}
