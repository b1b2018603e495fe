//! Three real `tether` nodes in cluster mode on one private PostgreSQL: gossip over the
//! internal gRPC port, every set owned by one node (the consistent-hash ring), any node
//! serving any request by forwarding to the owner, held subscriptions answered across
//! nodes, peers authenticated — mTLS with certificates of the cluster CA plus the cluster
//! secret — and ownership moving on a graceful drain (SIGTERM) and on `kill -9` without
//! losing an acknowledged write. A node with a certificate of another CA is refused, and
//! joins once its certificate files are replaced by the cluster's (reloaded, no restart).
//! (The same through HAProxy with a fleet simulator: `chaos-tests/tests/lb_cluster.rs`.)

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{json, Value};
use tether_cluster::{NodeId, Ring};
use tether_node::store::pg_server::PgServer;
use tether_test_support::node::*;
use tether_test_support::pki::{ClusterPki, NodeCert};

const SECRET: &str = "cluster-test-secret-0123456789";
const DEVICES: usize = 12;
/// The thermostat's template with the fields this test writes (one per phase, so each
/// acknowledged write can be found again): writes outside a template are refused.
const TEMPLATE: &str = r#"
[device_types.thermostat.buckets]
device = ["current_temperature", "humidity", "hvac_state", "sw_version", "big1", "big2"]
shared = ["target_temperature", "mode", "name", "w0", "w1", "w2", "w3", "fate", "photo"]
"#;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

struct Member {
    node: Node,
    id: String,
    grpc: u16,
    /// The store fault seam's control directory (`--test-store-faults`).
    faults: tempfile::TempDir,
}

async fn start_member(
    id: &str,
    store: &str,
    join: Option<u16>,
    keyring: Option<&Node>,
    cert: &NodeCert,
) -> Member {
    let grpc = free_port();
    let faults = tempfile::tempdir().expect("faults dir");
    let mut b = Node::builder()
        .config(TEMPLATE)
        .arg("--test-store-faults")
        .arg(faults.path().display().to_string())
        .arg("--node-id")
        .arg(id)
        .arg("--store")
        .arg(store)
        .arg("--grpc-listen")
        .arg(format!("127.0.0.1:{grpc}"))
        // Both ways of running gossip, the forward and the set actors side by side in one
        // cluster: node-b on threads of their own, the others on their main thread.
        .arg("--cluster-threads")
        .arg(if id == "node-b" { "2" } else { "0" })
        .arg("--actor-threads")
        .arg(if id == "node-b" { "2" } else { "0" })
        .arg("--http-workers")
        .arg("1")
        .arg("--cert-reload-interval-ms")
        .arg("200")
        .env("TETHER_CLUSTER_SECRET", SECRET);
    for f in cert.flags() {
        b = b.arg(f);
    }
    if let Some(seed) = join {
        b = b.arg("--join").arg(format!("127.0.0.1:{seed}"));
    }
    if let Some(k) = keyring {
        b = b.keyring(k.keyring());
    }
    Member {
        node: b.start().await,
        id: id.to_string(),
        grpc,
        faults,
    }
}

/// A member on the PostgreSQL at `url` authenticated by the cluster secret alone (no
/// mTLS), joining through `join`, sharing `keys`, with `config` and `extra` flags.
async fn start_plain_member(
    id: &str,
    url: &str,
    join: Option<u16>,
    keys: Option<Arc<Keyring>>,
    config: Option<&str>,
    extra: &[&str],
) -> Member {
    let grpc = free_port();
    let faults = tempfile::tempdir().expect("faults dir");
    let mut b = Node::builder()
        .arg("--test-store-faults")
        .arg(faults.path().display().to_string())
        .arg("--node-id")
        .arg(id)
        .arg("--store")
        .arg(url)
        .arg("--grpc-listen")
        .arg(format!("127.0.0.1:{grpc}"))
        .env("TETHER_CLUSTER_SECRET", SECRET);
    if let Some(c) = config {
        b = b.config(c);
    }
    for a in extra {
        b = b.arg(*a);
    }
    if let Some(seed) = join {
        b = b.arg("--join").arg(format!("127.0.0.1:{seed}"));
    }
    if let Some(k) = keys {
        b = b.keyring(k);
    }
    Member {
        node: b.start().await,
        id: id.to_string(),
        grpc,
        faults,
    }
}

/// Plain members named `ids` on the PostgreSQL at `url` (see [`start_plain_member`]), the
/// others joined through the first and sharing its keyring; returned once every one
/// sees them all.
async fn start_plain_cluster(
    ids: &[&str],
    url: &str,
    config: Option<&str>,
    extra: &[&str],
) -> Vec<Member> {
    let first = start_plain_member(ids[0], url, None, None, config, extra).await;
    let keys = first.node.keyring();
    let seed = first.grpc;
    let mut members = vec![first];
    for id in &ids[1..] {
        members
            .push(start_plain_member(id, url, Some(seed), Some(keys.clone()), config, extra).await);
    }
    for m in &members {
        m.node.wait_ready(ids.len() as u64).await;
    }
    members
}

/// Asserts a 503 says when to retry (README: `Retry-After: 1` on cluster 503s).
fn assert_retry_after(r: &Resp) {
    assert_eq!(
        r.headers.get("retry-after").and_then(|v| v.to_str().ok()),
        Some("1"),
        "a 503 without Retry-After: 1: {}",
        r.text()
    );
}

/// The parts of an error answer a client sees: status, API code and message.
fn error_of(r: &Resp) -> (StatusCode, Value) {
    (r.status, r.json())
}

/// Writes `fields` through `p`, retrying 503s (ownership moving) for at most `limit`;
/// returns the acknowledged version and how long it took.
async fn write_retrying(
    p: &Principal,
    id: &str,
    fields: Value,
    limit: Duration,
) -> (u64, Duration) {
    let start = Instant::now();
    loop {
        let r = p
            .put(id, &json!({"value": fields, "base_version": 0}))
            .await;
        match r.status {
            StatusCode::OK => return (u64_of(&r.json(), "version"), start.elapsed()),
            StatusCode::SERVICE_UNAVAILABLE if start.elapsed() < limit => {
                assert_retry_after(&r);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            other => panic!(
                "write {fields} to {id}: {other} after {:?}: {}",
                start.elapsed(),
                r.text()
            ),
        }
    }
}

/// How many of process `pid`'s threads are actix arbiters (their names cut to 15 bytes).
fn arbiter_threads(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("the node's threads")
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|name| name.starts_with("actix-rt|system"))
        .count()
}

/// The members' nodes.
fn nodes(members: &[Member]) -> Vec<&Node> {
    members.iter().map(|m| &m.node).collect()
}

/// Live subscriptions held by the given nodes' actors.
async fn held(nodes: &[&Node]) -> f64 {
    let mut sum = 0.0;
    for n in nodes {
        sum += n.metric("tether_held_subscriptions").await.unwrap_or(0.0);
    }
    sum
}

/// Holds a subscribe of `id` at `version` through `p` on a task (60 s hold), and returns
/// once one more subscription is held somewhere in `nodes`.
async fn hold(
    nodes: &[&Node],
    p: Principal,
    id: String,
    version: u64,
) -> tokio::task::JoinHandle<Resp> {
    let before = held(nodes).await;
    let sub = tokio::spawn(async move {
        p.subscribe(
            &json!({"buckets": [{"id": id, "version": version}], "timeout_ms": 60_000}),
            Duration::from_secs(65),
        )
        .await
    });
    let start = Instant::now();
    while held(nodes).await < before + 1.0 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "subscribe never held"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    sub
}

/// Waits (up to 15 s) for a held subscribe to be answered 200 "no change" (a drain's
/// answer: its client resubscribes).
async fn answered_no_change(sub: tokio::task::JoinHandle<Resp>, what: &str) {
    let answered = within(Duration::from_secs(15), what, sub)
        .await
        .expect("subscribe task")
        .expect_json(StatusCode::OK);
    assert!(
        buckets_of(&answered).is_empty(),
        "{what}: 'no change' expected: {answered}"
    );
}

/// A `Sets.Get` from a caller that is not a node: plain text (`None`) or mTLS with `cert`,
/// never the cluster secret. The status it gets.
async fn stranger_get(
    grpc: u16,
    cert: Option<&NodeCert>,
    req: tether_node::routing::forward::pb::GetRequest,
) -> tonic::Status {
    use tether_node::routing::forward::pb::sets_client::SetsClient;
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], grpc).into();
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .expect("endpoint")
        .connect_timeout(Duration::from_secs(5));
    let connector = cert.map(peer_connector);
    let channel = tether_cluster::transport::grpc::lazy_channel(endpoint, addr, connector);
    let mut stranger = SetsClient::new(channel);
    within(REQUEST_DEADLINE, "stranger call", stranger.get(req))
        .await
        .expect_err("a stranger's call must fail")
}

/// Dials the internal port over mTLS with `cert`, as a node does.
fn peer_connector(
    cert: &NodeCert,
) -> std::sync::Arc<dyn tether_cluster::transport::grpc::PeerConnector> {
    let files = tether_node::config::ClusterTlsFiles {
        cert: cert.cert.clone(),
        key: cert.key.clone(),
        ca: cert.ca.clone(),
        reload_interval: Duration::from_secs(3600),
    };
    tether_node::security::cluster_tls::TlsConnector::connector(
        tether_node::security::cluster_tls::ClusterTls::start(&files).expect("peer TLS"),
    )
}

fn owner(ids: &[&str], set: &str) -> String {
    Ring::new(ids.iter().map(|i| NodeId::new(*i)), 256)
        .owner(set)
        .expect("a non-empty ring")
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_node_serves_any_set_and_ownership_moves_on_drain_and_kill() {
    let pg = PgServer::start().expect("a private PostgreSQL server (installed by scripts/test)");
    let url = pg.url("cluster").expect("database");
    let mut pki = ClusterPki::generate().await;
    let a = start_member("node-a", &url, None, None, &pki.issue("node-a").await).await;
    // README: /readyz answers 503 until the node has joined; a node whose seeds never
    // answer starts a new cluster after 15 s (checked at the end of this test).
    let lonely = start_member(
        "node-x",
        &url,
        Some(free_port()),
        Some(&a.node),
        &pki.issue("node-x").await,
    )
    .await;
    let r = http_client()
        .get(lonely.node.url("/readyz"))
        .send()
        .await
        .expect("readyz");
    assert_eq!(
        r.status(),
        StatusCode::SERVICE_UNAVAILABLE,
        "ready before joining"
    );
    let lonely_started = Instant::now();
    let b_cert = pki.issue("node-b").await;
    let b = start_member("node-b", &url, Some(a.grpc), Some(&a.node), &b_cert).await;
    let c_cert = pki.issue("node-c").await;
    let c = start_member("node-c", &url, Some(a.grpc), Some(&a.node), &c_cert).await;
    for m in [&a, &b, &c] {
        m.node.wait_ready(3).await;
    }
    let mut members = vec![a, b, c];
    for m in &members {
        assert_eq!(
            m.node.metric("tether_cluster_members").await,
            Some(3.0),
            "{}: tether_cluster_members",
            m.id
        );
        // The runtime gossip and the forward run on (`--cluster-threads`, set above):
        // node-b's own two threads, the others' main thread.
        let (runtime, workers) = if m.id == "node-b" {
            ("cluster", 2.0)
        } else {
            ("main", 1.0)
        };
        assert_eq!(
            m.node
                .metric(&format!("tether_runtime_workers{{runtime=\"{runtime}\"}}"))
                .await,
            Some(workers),
            "{}: the runtime gossip and the forward run on",
            m.id
        );
        // The threads actix names (`actix-rt|system:0|arbiter:N`): the HTTP worker, and
        // node-b's two actor threads (`--actor-threads`, set above); the others' actors
        // run on their main thread.
        assert_eq!(
            arbiter_threads(m.node.pid()),
            if m.id == "node-b" { 3 } else { 1 },
            "{}: arbiter threads (HTTP worker + actor threads)",
            m.id
        );
    }
    let ids: Vec<String> = members.iter().map(|m| m.id.clone()).collect();
    let id_refs: Vec<&str> = ids.iter().map(String::as_str).collect();

    // Register through every node in turn, write through the next, read through the one
    // after: each request lands on an owner or is forwarded to it.
    let serials: Vec<String> = (0..DEVICES).map(|i| format!("CLU{i:03}")).collect();
    let mut acked: BTreeMap<String, Vec<(String, u64)>> = BTreeMap::new();
    for (i, serial) in serials.iter().enumerate() {
        members[i % 3]
            .node
            .device(serial)
            .register_thermostat()
            .await;
        let writer = members[(i + 1) % 3].node.device(serial);
        let id = format!("shared.{serial}");
        let (version, _) = write_retrying(&writer, &id, json!({"w0": 0}), Duration::ZERO).await;
        acked
            .entry(serial.clone())
            .or_default()
            .push(("w0".into(), version));
        let read = members[(i + 2) % 3].node.device(serial).bucket(&id).await;
        assert_eq!(
            u64_of(&read, "version"),
            version,
            "read after write on another node: {read}"
        );
        assert_eq!(read["value"]["w0"], json!(0), "{read}");
    }

    // Every set is loaded on exactly one node: the one the ring names. And taken from no
    // other node: a registration's lease is held by nobody, so a set registered through
    // one node and first loaded by its owner is no take-over (it used to count one, and
    // cost the owner a handover call to the registering node).
    let mut owned = 0.0;
    let mut forwarded = 0.0;
    let mut takeovers = 0.0;
    for m in &members {
        takeovers += m
            .node
            .metric("tether_lease_takeovers_total")
            .await
            .unwrap_or(0.0);
        owned += m.node.metric("tether_owned_sets").await.unwrap_or(0.0);
        forwarded += m
            .node
            .metric("tether_forwarded_served_total")
            .await
            .unwrap_or(0.0);
    }
    assert_eq!(
        owned, DEVICES as f64,
        "each set must be owned by exactly one node"
    );
    assert_eq!(
        takeovers, 0.0,
        "no set was served by a node before its owner loaded it"
    );
    assert!(
        forwarded > 0.0,
        "requests landing on non-owners must have been forwarded"
    );
    // Blobs live in the shared store: announced and sent in part through one node, the
    // rest through a second, referenced from a bucket through the third and read back
    // through each (whole and by range); another device may read it through none.
    let photo: Vec<u8> = (0..150_000u32).map(|i| (i * 7 % 253) as u8).collect();
    let sha = sha256_hex(&photo);
    let via = |m: usize, serial: &str| members[m].node.device(serial);
    let began = via(0, &serials[DEVICES - 1])
        .announce_blob(&photo, "image/png")
        .await
        .expect_json(StatusCode::CREATED);
    assert_eq!(began["received"], 0, "{began}");
    let part = via(0, &serials[DEVICES - 1])
        .blob_range(&photo, 0, 99_999)
        .await
        .expect_json(StatusCode::ACCEPTED);
    let from = part["received"].as_u64().expect("received") as usize;
    via(1, &serials[DEVICES - 1])
        .blob_range(&photo, from, photo.len() - 1)
        .await
        .expect(StatusCode::CREATED);
    let id = format!("shared.{}", serials[DEVICES - 1]);
    let (photo_version, _) = write_retrying(
        &via(2, &serials[DEVICES - 1]),
        &id,
        json!({"photo": {"$blob": sha, "size": photo.len()}}),
        Duration::ZERO,
    )
    .await;
    acked
        .entry(serials[DEVICES - 1].clone())
        .or_default()
        .push(("photo".into(), photo_version));
    for m in &members {
        let (owner_dev, other_dev) = (
            m.node.device(&serials[DEVICES - 1]),
            m.node.device(&serials[DEVICES - 2]),
        );
        let got = owner_dev.blob(&sha).await.expect(StatusCode::OK);
        assert_eq!(got.body, photo, "through {}", m.id);
        other_dev
            .blob(&sha)
            .await
            .expect_error(StatusCode::NOT_FOUND, "not_found");
    }
    let ranged = via(2, &serials[DEVICES - 1])
        .send(
            via(2, &serials[DEVICES - 1])
                .req(reqwest::Method::GET, &format!("/v1/blobs/{sha}"))
                .header("range", "bytes=65530-65545"),
        )
        .await
        .expect(StatusCode::PARTIAL_CONTENT);
    assert_eq!(ranged.body, photo[65_530..=65_545]);

    // Presence is the owner's knowledge, asked through any node: a device listening
    // through one node is online through all three, and a paired user's write through
    // another is answered with `delivery` once the device stopped listening.
    let carol = admin(["user", "add", "carol", "--store", url.as_str()])
        .await
        .ok();
    let carol = credentials_line(&carol);
    let sleeper = &serials[DEVICES - 3];
    let code = members[0].node.device(sleeper).pairing_code().await;
    members[1]
        .node
        .with_credentials(carol.clone())
        .pair(&code, None)
        .await
        .expect(StatusCode::OK);
    let shared_id = format!("shared.{sleeper}");
    let version = u64_of(
        &members[2].node.device(sleeper).bucket(&shared_id).await,
        "version",
    );
    let presence_via = |m: usize| {
        let user = members[m].node.with_credentials(carol.clone());
        let path = format!("/v1/devices/{sleeper}/presence");
        async move {
            user.send(user.req(reqwest::Method::GET, &path))
                .await
                .expect_json(StatusCode::OK)
        }
    };
    let listener = members[2].node.device(sleeper);
    let body = json!({"buckets": [{"id": shared_id, "version": version}], "timeout_ms": 60_000});
    let listening =
        tokio::spawn(async move { listener.subscribe(&body, Duration::from_secs(65)).await });
    within(
        Duration::from_secs(10),
        "the device's subscribe held",
        async {
            while presence_via(0).await["online"] != true {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        },
    )
    .await;
    for (m, member) in members.iter().enumerate() {
        let p = presence_via(m).await;
        assert_eq!(p["online"], true, "through {}: {p}", member.id);
    }
    let user_put = |m: usize, n: u64| {
        let user = members[m].node.with_credentials(carol.clone());
        let id = shared_id.clone();
        async move {
            user.put(&id, &json!({"value": {"name": format!("n{n}")}}))
                .await
                .expect_json(StatusCode::OK)
        }
    };
    let answer = user_put(0, 1).await;
    assert!(answer.get("delivery").is_none(), "listening: {answer}");
    listening
        .await
        .expect("subscribe task")
        .expect(StatusCode::OK);
    let version = u64_of(
        &members[1].node.device(sleeper).bucket(&shared_id).await,
        "version",
    );
    members[1]
        .node
        .device(sleeper)
        .subscribe(
            &json!({"buckets": [{"id": shared_id, "version": version}], "timeout_ms": 300, "next_sync_ms": 60_000}),
            Duration::from_secs(10),
        )
        .await
        .expect(StatusCode::OK);
    let answer = user_put(2, 2).await;
    assert_eq!(answer["delivery"]["online"], false, "asleep: {answer}");
    let by = u64_of(&answer["delivery"], "next_sync_by");
    for (m, member) in members.iter().enumerate() {
        let p = presence_via(m).await;
        assert_eq!(p["online"], false, "through {}: {p}", member.id);
        assert_eq!(u64_of(&p, "next_sync_by"), by, "through {}: {p}", member.id);
    }

    for serial in &serials {
        let expect = owner(&id_refs, serial);
        let owner_node = members
            .iter()
            .find(|m| m.id == expect)
            .expect("owner is a member");
        let before = owner_node
            .node
            .metric("tether_forwarded_served_total")
            .await
            .unwrap_or(0.0);
        let other = members
            .iter()
            .find(|m| m.id != expect)
            .expect("a non-owner");
        other
            .node
            .device(serial)
            .bucket(&format!("shared.{serial}"))
            .await;
        let after = owner_node
            .node
            .metric("tether_forwarded_served_total")
            .await
            .unwrap_or(0.0);
        assert!(
            after > before,
            "{serial}: a read via {} must be served by {expect}",
            other.id
        );
    }

    // A subscribe held through one node is answered by a write through another.
    let serial = &serials[0];
    let id = format!("shared.{serial}");
    let version = acked[serial][0].1;
    let held_via = members[1].node.device(serial);
    let writer = members[2].node.device(serial);
    let sub = hold(&nodes(&members), held_via, id, version).await;
    let (v1, _) = write_retrying(
        &writer,
        &format!("shared.{serial}"),
        json!({"w1": 1}),
        Duration::ZERO,
    )
    .await;
    acked
        .get_mut(serial)
        .expect("device")
        .push(("w1".into(), v1));
    let answered = within(Duration::from_secs(10), "held subscribe answered", sub)
        .await
        .expect("subscribe task")
        .expect_json(StatusCode::OK);
    let got = buckets_of(&answered);
    assert_eq!(got.len(), 1, "{answered}");
    assert_eq!(u64_of(&got[0], "version"), v1, "{answered}");

    // Invariant 9, black-box: a request that fails on the owner fails the same through a
    // node that forwards it (404 for a bucket the set lacks, 413 for a write that would
    // make the bucket too large).
    {
        let serial = &serials[1];
        let owner_id = owner(&id_refs, serial);
        let on_owner = members.iter().find(|m| m.id == owner_id).expect("owner");
        let elsewhere = members
            .iter()
            .find(|m| m.id != owner_id)
            .expect("non-owner");
        let (o, e) = (on_owner.node.device(serial), elsewhere.node.device(serial));
        let missing = format!("/v1/buckets/other.{serial}");
        let local = o.get(&missing).await;
        local.expect_error(StatusCode::NOT_FOUND, "not_found");
        assert_eq!(
            error_of(&e.get(&missing).await),
            error_of(&local),
            "GET 404 forwarded"
        );
        let put_missing = json!({"value": {"x": 1}});
        let local = o.put(&format!("other.{serial}"), &put_missing).await;
        local.expect_error(StatusCode::NOT_FOUND, "not_found");
        let forwarded = e.put(&format!("other.{serial}"), &put_missing).await;
        assert_eq!(error_of(&forwarded), error_of(&local), "PUT 404 forwarded");
        let half = "x".repeat(40_000);
        let shared_id = format!("device.{serial}");
        o.put(&shared_id, &json!({"value": {"big1": half}}))
            .await
            .expect(StatusCode::OK);
        // Messages far larger than the forwarding codec's starting buffers (1 KiB) cross
        // both ways: a 40 KB read forwarded, and a 40 KB write forwarded and read back.
        let read = e.bucket(&shared_id).await;
        assert_eq!(read["value"]["big1"], json!(half), "40 KB GET forwarded");
        let other = "y".repeat(40_000);
        e.put(&shared_id, &json!({"value": {"big1": other}}))
            .await
            .expect(StatusCode::OK);
        let read = o.bucket(&shared_id).await;
        assert_eq!(read["value"]["big1"], json!(other), "40 KB PUT forwarded");
        let too_big = json!({"value": {"big2": half}});
        let local = o.put(&shared_id, &too_big).await;
        local.expect_error(StatusCode::PAYLOAD_TOO_LARGE, "too_large");
        assert_eq!(
            error_of(&e.put(&shared_id, &too_big).await),
            error_of(&local),
            "413 forwarded"
        );
    }

    // Invariant 14: a subscribe held on the owner through another node is cancelled on
    // the owner when the subscriber goes away (the forwarded stream drops).
    {
        let serial = &serials[2];
        let owner_id = owner(&id_refs, serial);
        let via = members
            .iter()
            .find(|m| m.id != owner_id)
            .expect("non-owner");
        let id = format!("shared.{serial}");
        let version = acked[serial][0].1;
        let before = held(&nodes(&members)).await;
        let sub = hold(
            &nodes(&members),
            via.node.device(serial).with_client(http_client()),
            id,
            version,
        )
        .await;
        sub.abort();
        let start = Instant::now();
        while held(&nodes(&members)).await > before {
            assert!(
                start.elapsed() < Duration::from_secs(15),
                "the owner still holds a subscription whose subscriber left"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    // Invariant 13: a forwarded request reaching a node that does not own its set is
    // answered `not_owner` there, never forwarded again (no loop between disagreeing views).
    {
        use tether_node::routing::forward::pb;
        let serial = &serials[3];
        let owner_id = owner(&id_refs, serial);
        let stranger = members
            .iter()
            .find(|m| m.id != owner_id)
            .expect("non-owner");
        // A peer: the cluster CA's certificate (mTLS) and the cluster secret.
        let addr: std::net::SocketAddr = ([127, 0, 0, 1], stranger.grpc).into();
        let channel = tether_cluster::transport::grpc::lazy_channel(
            tonic::transport::Endpoint::from_shared(format!("http://{addr}")).expect("endpoint"),
            addr,
            Some(peer_connector(&pki.issue("peer").await)),
        );
        let secret =
            tether_cluster::ClusterSecret::new(SECRET.as_bytes().to_vec()).expect("secret");
        let mut peer = pb::sets_client::SetsClient::with_interceptor(
            channel,
            tether_cluster::auth::PeerAuthInterceptor::client(secret),
        );
        let forwarded_before = stranger
            .node
            .metric("tether_forwarded_requests_total")
            .await
            .unwrap_or(0.0);
        let status = peer
            .get(pb::GetRequest {
                set: serial.clone(),
                ids: Vec::new(),
                all: true,
                without_values: false,
                max_bytes: 0,
                origin: None,
            })
            .await
            .expect_err("a non-owner must not serve the set");
        assert_eq!(
            status
                .metadata()
                .get("x-tether-error")
                .and_then(|v| v.to_str().ok()),
            Some("not_owner"),
            "{status:?}"
        );
        assert_eq!(
            stranger
                .node
                .metric("tether_forwarded_requests_total")
                .await
                .unwrap_or(0.0),
            forwarded_before,
            "the non-owner forwarded a forwarded request again"
        );
    }

    // Users live in the shared store (`admin user add --store`): one pairs a device
    // through one node and reads it through another; unpairing through a third answers
    // the subscribe the device holds, wherever its set is owned.
    let out = admin([
        "user".to_string(),
        "add".into(),
        "alice".into(),
        "--store".into(),
        url.clone(),
    ])
    .await
    .ok();
    let alice = credentials_line(&out);
    let paired = serials[3].clone();
    let code = members[0].node.device(&paired).pairing_code().await;
    members[1]
        .node
        .with_credentials(alice.clone())
        .pair(&code, Some("home"))
        .await
        .expect(StatusCode::OK);
    let seen = members[2]
        .node
        .with_credentials(alice.clone())
        .get("/v1/buckets?view=ids")
        .await
        .expect_json(StatusCode::OK);
    let seen_ids = ids_of(&seen);
    assert!(
        seen_ids.contains(&format!("shared.{paired}"))
            && seen_ids.iter().any(|i| i.starts_with("structure.home-")),
        "the user sees the paired device and its structure: {seen}"
    );
    let device = members[2].node.device(&paired);
    let paired_id = format!("shared.{paired}");
    let paired_version = acked[&paired][0].1;
    let sub = hold(&nodes(&members), device, paired_id, paired_version).await;
    members[0]
        .node
        .with_credentials(alice)
        .unpair(&paired)
        .await
        .expect(StatusCode::OK);
    let released = within(
        Duration::from_secs(10),
        "held subscribe released on unpair",
        sub,
    )
    .await
    .expect("subscribe task")
    .expect_json(StatusCode::OK);
    assert!(buckets_of(&released).is_empty(), "{released}");

    // The internal port takes only mTLS with a certificate of the cluster CA, and then
    // still the cluster secret: a caller in plain text, one with another CA's certificate,
    // and one with a good certificate but no secret are all refused.
    let mut other_pki = ClusterPki::generate().await;
    let get = tether_node::routing::forward::pb::GetRequest {
        set: serials[0].clone(),
        ids: Vec::new(),
        all: true,
        without_values: false,
        max_bytes: 0,
        origin: None,
    };
    let grpc = members[0].grpc;
    let plain = stranger_get(grpc, None, get.clone()).await;
    assert_ne!(
        plain.code(),
        tonic::Code::Ok,
        "plain text is refused: {plain:?}"
    );
    // The intruder trusts the cluster CA (CA certificates are public), so only node-a's
    // check of the client certificate can refuse it: it must never reach the secret check,
    // and node-a logs the refusal (an invalid peer certificate).
    let refusals = |node: &Node| {
        node.stderr_all()
            .lines()
            .filter(|l| {
                l.contains("refused a peer on the internal port")
                    && l.contains("invalid peer certificate")
            })
            .count()
    };
    let refused_before = refusals(&members[0].node);
    let intruder = other_pki.issue("intruder").await;
    std::fs::copy(&pki.ca_cert, &intruder.ca).expect("trust the cluster CA");
    let foreign = stranger_get(grpc, Some(&intruder), get.clone()).await;
    assert!(
        !matches!(
            foreign.code(),
            tonic::Code::Ok | tonic::Code::Unauthenticated
        ),
        "another CA's certificate fails the handshake, before the secret is checked: \
         {foreign:?}"
    );
    let deadline = Instant::now() + REQUEST_DEADLINE;
    while refusals(&members[0].node) == refused_before {
        assert!(
            Instant::now() < deadline,
            "node-a did not refuse the intruder's certificate; stderr:\n{}",
            members[0].node.stderr_tail()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let no_secret = stranger_get(grpc, Some(&pki.issue("stranger").await), get).await;
    assert_eq!(
        no_secret.code(),
        tonic::Code::Unauthenticated,
        "a cluster certificate without the cluster secret: {no_secret:?}"
    );

    // A node whose certificate comes from another CA is refused: it never joins (it
    // trusts the cluster CA and has the cluster secret, so the refusal is the cluster's
    // check of its certificate). Once its certificate files are replaced by ones of the
    // cluster CA, it is reloaded and joins.
    let intruder_cert = other_pki.issue("node-d").await;
    std::fs::copy(&pki.ca_cert, &intruder_cert.ca).expect("trust the cluster CA");
    let d = start_member(
        "node-d",
        &url,
        Some(members[0].grpc),
        Some(&members[0].node),
        &intruder_cert,
    )
    .await;
    let refused_at = Instant::now();
    loop {
        if refusals(&members[0].node) >= refused_before + 2 {
            break;
        }
        assert!(
            refused_at.elapsed() < Duration::from_secs(20),
            "node-a never refused node-d's handshake; stderr:\n{}",
            members[0].node.stderr_tail()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for m in &members {
        let r: Value = m
            .node
            .anon(reqwest::Method::GET, "/readyz")
            .send()
            .await
            .expect("readyz")
            .json()
            .await
            .expect("json");
        assert_eq!(r["members"], json!(3), "{} let node-d in: {r}", m.id);
    }
    intruder_cert.replace_with(&pki.issue("node-d").await);
    for m in members.iter().map(|m| &m.node).chain([&d.node]) {
        m.wait_ready(4).await;
    }
    // node-d leaves again (SIGTERM) so the rest of the test sees three members.
    d.node.sigterm().await;
    let mut d = d;
    assert!(d.node.wait_exit(Duration::from_secs(30)).await.success());
    for m in &members {
        m.node.wait_ready(3).await;
    }

    // Drain: SIGTERM node-c while a subscribe on one of its sets is held through node-a.
    // The subscriber is answered (it resubscribes), node-c exits cleanly, and its sets
    // are served by the others with every acknowledged write.
    let c_set = serials
        .iter()
        .find(|s| owner(&id_refs, s) == "node-c")
        .expect("node-c owns some of the sets")
        .clone();
    let held_via = members[0].node.device(&c_set);
    let c_id = format!("shared.{c_set}");
    let c_version = acked[&c_set].last().expect("acked").1;
    let sub = hold(&nodes(&members), held_via, c_id, c_version).await;
    // And one held *through* node-c on a set another node owns: node-c answers it as it
    // starts draining (its client resubscribes through another node), not when the
    // owner's hold ends a minute later.
    let other_set = serials
        .iter()
        .find(|s| owner(&id_refs, s) != "node-c")
        .expect("the others own some of the sets")
        .clone();
    let through_c = members[2].node.device(&other_set);
    let other_version = acked[&other_set].last().expect("acked").1;
    let sub_through_c = hold(
        &nodes(&members),
        through_c,
        format!("shared.{other_set}"),
        other_version,
    )
    .await;
    let mut c = members.pop().expect("node-c");
    let mut changes_before = BTreeMap::new();
    for m in &members {
        changes_before.insert(m.id.clone(), member_changes(&m.node).await);
    }
    c.node.sigterm().await;
    // While it drains, node-c tells load balancers it is not ready, and hands its sets off.
    {
        let client = http_client();
        let start = Instant::now();
        let mut seen = None;
        while seen.is_none() && start.elapsed() < Duration::from_secs(10) {
            if let Ok(r) = client.get(c.node.url("/readyz")).send().await {
                if r.status() == StatusCode::SERVICE_UNAVAILABLE {
                    seen = Some(r.json::<Value>().await.unwrap_or(Value::Null));
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(
            seen.as_ref().map(|v| v["status"].clone()),
            Some(json!("draining")),
            "/readyz while draining"
        );
        let handoffs = c.node.metric("tether_handoffs_total").await.unwrap_or(0.0);
        assert!(
            handoffs >= 1.0,
            "node-c handed off its sets: tether_handoffs_total {handoffs}"
        );
    }
    answered_no_change(sub, "held subscribe answered on drain").await;
    answered_no_change(
        sub_through_c,
        "subscribe held through the draining node answered on drain",
    )
    .await;
    let status = c.node.wait_exit(Duration::from_secs(30)).await;
    assert!(status.success(), "drained node exits cleanly: {status:?}");
    for m in &members {
        m.node.wait_ready(2).await;
        assert_eq!(
            m.node.metric("tether_cluster_members").await,
            Some(2.0),
            "{}",
            m.id
        );
        // Each saw node-c go down and leave (its farewell), once.
        let before = changes_before[&m.id];
        let now = member_changes(&m.node).await;
        assert_eq!(
            (now.0 - before.0, now.1 - before.1),
            (1.0, 1.0),
            "{}: tether_cluster_member_changes_total down and left across node-c's drain",
            m.id
        );
    }
    let mut drain_gap = Duration::ZERO;
    for serial in &serials {
        let p = members[0].node.device(serial);
        let (v, took) = write_retrying(
            &p,
            &format!("shared.{serial}"),
            json!({"w2": 2}),
            Duration::from_secs(20),
        )
        .await;
        drain_gap = drain_gap.max(took);
        acked
            .get_mut(serial)
            .expect("device")
            .push(("w2".into(), v));
    }

    // kill -9 node-b: its sets are served again by node-a once failure detection removes
    // it from the ring.
    let mut b = members.pop().expect("node-b");
    let b_set = serials
        .iter()
        .find(|s| owner(&["node-a", "node-b"], s) == "node-b")
        .expect("node-b owns some of the sets")
        .clone();
    // Invariant 11: a write through node-a is committed on node-b, whose answer never
    // comes back (node-b is killed after the commit, before answering): its fate is
    // unknown to node-a, which answers 503 and never applies it a second time elsewhere.
    let unknown_id = format!("shared.{b_set}");
    let base = u64_of(
        &members[0].node.device(&b_set).bucket(&unknown_id).await,
        "version",
    );
    // A device holds a subscribe of the same bucket through node-a: forwarded to node-b and
    // held there. node-b commits the write below and dies before notifying anyone; node-a
    // holds the subscription again on the set's new owner, which answers at once with the
    // committed version (before, the held response was cut when node-b died).
    let held_through_a = hold(
        &[&b.node],
        members[0].node.device(&b_set).with_client(http_client()),
        unknown_id.clone(),
        base,
    )
    .await;
    std::fs::write(b.faults.path().join("hold-after-commit"), b"").expect("hold");
    let unknown = {
        let p = members[0].node.device(&b_set).with_client(http_client());
        let id = unknown_id.clone();
        tokio::spawn(async move {
            p.put(
                &id,
                &json!({"value": {"fate": "unknown"}, "base_version": base}),
            )
            .await
        })
    };
    let done = b.faults.path().join("commit-done-held");
    let start = Instant::now();
    while !done.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "node-b never committed the write"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    b.node.kill9().await;
    let killed = Instant::now();
    let r = within(
        Duration::from_secs(30),
        "the write of unknown fate answered",
        unknown,
    )
    .await
    .expect("writer task");
    r.expect_error(StatusCode::SERVICE_UNAVAILABLE, "unavailable");
    assert_retry_after(&r);
    let answered = within(
        Duration::from_secs(30),
        "the subscribe held on the killed owner answered",
        held_through_a,
    )
    .await
    .expect("subscriber task")
    .expect_json(StatusCode::OK);
    assert!(
        buckets_of(&answered)
            .iter()
            .any(|b| b["id"] == json!(unknown_id) && u64_of(b, "version") == base + 1),
        "the subscriber held through node-a on node-b's set is answered with the version \
         node-b committed before it died: {answered}"
    );
    let a = &members[0];
    let p = a.node.device(&b_set);
    let (v, _) = write_retrying(
        &p,
        &format!("shared.{b_set}"),
        json!({"w3": 3}),
        Duration::from_secs(60),
    )
    .await;
    let failover = killed.elapsed();
    assert_eq!(
        v,
        base + 2,
        "the write of unknown fate was applied once (v{}) before w3, never twice",
        base + 1
    );
    acked
        .get_mut(&b_set)
        .expect("device")
        .push(("fate".into(), base + 1));
    acked
        .get_mut(&b_set)
        .expect("device")
        .push(("w3".into(), v));
    a.node.wait_ready(1).await;

    // Every acknowledged write is there, versions as acknowledged or later.
    for serial in &serials {
        let bucket = a
            .node
            .device(serial)
            .bucket(&format!("shared.{serial}"))
            .await;
        for (field, version) in &acked[serial] {
            assert!(
                bucket["value"].get(field).is_some(),
                "{serial}: acknowledged write {field} (v{version}) lost: {bucket}"
            );
            assert!(
                u64_of(&bucket, "version") >= *version,
                "{serial}: version went back: {bucket}"
            );
        }
    }
    lonely.node.wait_ready(1).await;
    assert!(
        lonely_started.elapsed() >= Duration::from_secs(10),
        "node-x must wait for its seeds before starting a new cluster"
    );
    eprintln!(
        "cluster: drain → slowest write to a moved set {} ms; kill -9 → node-b's set {b_set} served again after {} ms",
        drain_gap.as_millis(),
        failover.as_millis()
    );
    drop(b);
}

/// Every change of bucket `id` read through `p` (history pages).
async fn changes_of(p: &Principal, id: &str) -> Vec<Value> {
    let mut out = Vec::new();
    let mut since = 0;
    loop {
        let page = p
            .get(&format!(
                "/v1/buckets/{id}/history?since_version={since}&limit=1000"
            ))
            .await
            .expect_json(StatusCode::OK);
        out.extend(page["changes"].as_array().expect("changes").iter().cloned());
        match page["next_since_version"].as_u64() {
            Some(n) => since = n,
            None => return out,
        }
    }
}

/// `tether_cluster_member_changes_total` of `down` and `left` on `node`.
async fn member_changes(node: &Node) -> (f64, f64) {
    let m = node.metrics().await;
    let of = |change: &str| {
        metric_value(
            &m,
            &format!("tether_cluster_member_changes_total{{change=\"{change}\"}}"),
        )
        .unwrap_or(0.0)
    };
    (of("down"), of("left"))
}

/// A write through a non-owner whose owner is killed with `kill -9` after committing it
/// and before answering (fault injection holds the answer): the forwarding node's router
/// retries it with its op id on the new owner, which answers from the store's record —
/// the client gets `replayed`, the write is applied exactly once. Then the same across a
/// graceful handoff (the owner drains with SIGTERM; the retry reaches the new owner).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_whose_owner_dies_mid_request_is_retried_by_op_id_and_applied_once() {
    let pg = PgServer::start().expect("a private PostgreSQL server (installed by scripts/test)");
    let url = pg.url("opretry").expect("database");
    let ids = ["op-a", "op-b", "op-c"];
    let members =
        start_plain_cluster(&ids, &url, None, &["--fault-stall-op-prefix", "stall-"]).await;
    // A device whose set the third member owns; requests go through the first.
    let serial = (0..)
        .map(|i| format!("OPR{i:03}"))
        .find(|s| owner(&ids, s) == "op-c")
        .expect("some serial lands on op-c");
    let via = members[0].node.device(&serial);
    via.register_thermostat().await;
    let id = format!("shared.{serial}");
    let body = json!({"value": {"target_temperature": 23}, "base_version": 1, "op_id": "stall-7"});
    let put = {
        let via = via.clone();
        let (id, body) = (id.clone(), body.clone());
        tokio::spawn(async move {
            let r = via
                .req(reqwest::Method::PUT, &format!("/v1/buckets/{id}"))
                .json(&body)
                .timeout(Duration::from_secs(60))
                .send()
                .await
                .expect("the forwarding node answers");
            Resp::read(r).await
        })
    };
    // Committed on the owner (its change is in the shared store), answer held there.
    let reader = members[1].node.device(&serial);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !changes_of(&reader, &id)
        .await
        .iter()
        .any(|c| c["op_id"] == "stall-7")
    {
        assert!(Instant::now() < deadline, "stall-7 never committed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        !put.is_finished(),
        "the owner must still be holding the answer"
    );
    let mut members = members;
    let mut owner_member = members.pop().expect("op-c");
    owner_member.node.kill9().await;
    let killed = Instant::now();
    let answer = within(
        Duration::from_secs(40),
        "the retried write is answered",
        put,
    )
    .await
    .expect("task")
    .expect_json(StatusCode::OK);
    eprintln!(
        "op-id retry: owner killed mid-request, answered by the new owner after {} ms: {answer}",
        killed.elapsed().as_millis()
    );
    assert_eq!(answer["replayed"], true, "{answer}");
    assert_eq!(
        (&answer["outcome"], u64_of(&answer, "version")),
        (&json!("applied"), 2)
    );
    // Applied exactly once: one change with the op id, the bucket one version on.
    let changes = changes_of(&reader, &id).await;
    assert_eq!(
        changes.iter().filter(|c| c["op_id"] == "stall-7").count(),
        1,
        "{changes:?}"
    );
    let bucket = reader.bucket(&id).await;
    assert_eq!(u64_of(&bucket, "version"), 2, "{bucket}");
    assert_eq!(bucket["value"]["target_temperature"], 23);
    // The client retrying too (its own timeout) is answered the same way.
    let again = via.put(&id, &body).await.expect_json(StatusCode::OK);
    assert_eq!(
        (&again["replayed"], u64_of(&again, "version")),
        (&json!(true), 2)
    );
    drop(owner_member);

    // Across a handoff: a write acknowledged through op-a by its owner op-b, then op-b
    // drains (SIGTERM) and its sets move to op-a; the retry is replayed by the new owner.
    members[0].node.wait_ready(2).await;
    let serial = (0..)
        .map(|i| format!("OPH{i:03}"))
        .find(|s| owner(&["op-a", "op-b"], s) == "op-b")
        .expect("some serial lands on op-b");
    let via = members[0].node.device(&serial);
    via.register_thermostat().await;
    let id = format!("shared.{serial}");
    let body = json!({"value": {"mode": "away"}, "base_version": 1, "op_id": "hand-1"});
    let first = via.put(&id, &body).await.expect_json(StatusCode::OK);
    assert_eq!(first["outcome"], "applied");
    let mut b = members.pop().expect("op-b");
    b.node.sigterm().await;
    assert!(b.node.wait_exit(Duration::from_secs(30)).await.success());
    members[0].node.wait_ready(1).await;
    let retry = via.put(&id, &body).await.expect_json(StatusCode::OK);
    assert_eq!(retry["replayed"], true, "{retry}");
    assert_eq!(retry["version"], first["version"]);
    let changes = changes_of(&via, &id).await;
    assert_eq!(
        changes.iter().filter(|c| c["op_id"] == "hand-1").count(),
        1,
        "{changes:?}"
    );
}

/// Invariant 35 across nodes: a subscription forwarded to the owner of its set is kept
/// there as a waiter record when the owner's actor passivates (parked), is answered by
/// the next write through the other node, and is cancelled on the owner when its client
/// leaves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forwarded_subscription_survives_its_sets_passivation_on_the_owner() {
    let pg = PgServer::start().expect("a private PostgreSQL server (installed by scripts/test)");
    let url = pg.url("parked").expect("database");
    let [a, b]: [Member; 2] = start_plain_cluster(
        &["park-a", "park-b"],
        &url,
        Some(TEMPLATE),
        &["--passivate-after-ms", "300"],
    )
    .await
    .try_into()
    .unwrap_or_else(|_| unreachable!("two members started"));
    let serial = (0..)
        .map(|i| format!("PRK{i:03}"))
        .find(|s| owner(&["park-a", "park-b"], s) == "park-b")
        .expect("some serial lands on park-b");
    let via = a.node.device(&serial);
    via.register_thermostat().await;
    let id = format!("shared.{serial}");
    let version = u64_of(&via.bucket(&id).await, "version");
    let both = [&a.node, &b.node];

    let sub = hold(&both, a.node.device(&serial), id.clone(), version).await;
    let parked = |what: &'static str| {
        b.node.wait_metric(
            "tether_parked_bucket_sets",
            Duration::from_secs(30),
            what,
            |n| n == 1.0,
        )
    };
    parked("the owner parked the forwarded subscription").await;
    b.node
        .wait_metric(
            "tether_active_bucket_sets",
            Duration::from_secs(30),
            "no set in memory on the owner",
            |n| n == 0.0,
        )
        .await;
    assert!(!sub.is_finished(), "passivation answered the subscriber");
    let (written, _) =
        write_retrying(&via, &id, json!({"mode": "eco"}), Duration::from_secs(10)).await;
    let answer = within(
        Duration::from_secs(10),
        "the parked subscriber answered",
        sub,
    )
    .await
    .expect("task")
    .expect_json(StatusCode::OK);
    assert_eq!(
        u64_of(&bucket_in(&answer, &id), "version"),
        written,
        "{answer}"
    );

    // Parked again, then its client leaves: nothing stays held or parked on the owner.
    let sub = hold(&both, a.node.device(&serial), id.clone(), written).await;
    parked("parked again").await;
    sub.abort();
    b.node.wait_held(0, Duration::from_secs(10)).await;
    b.node
        .wait_metric(
            "tether_parked_bucket_sets",
            Duration::from_secs(10),
            "the cancelled subscriber left parked",
            |n| n == 0.0,
        )
        .await;
}
