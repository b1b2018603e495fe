//! A paused owner never answers from stale memory (ARCHITECTURE.md invariant 23; issue 12,
//! chaos scenario `pause-owner`). Three real `tether` nodes in cluster mode on one private
//! PostgreSQL: node-a owns a set and has it in memory; node-a is stopped (SIGSTOP) for
//! longer than the failure-detection bound, the two others (a majority, invariant 24: of
//! two nodes, node-b alone could not tell a frozen node-a from a partition and would
//! rightly serve nothing) take the set over and node-b acknowledges a newer write; node-a
//! is resumed (SIGCONT) and read from at once and for a few seconds.
//! Its view is still the old one (it owns the set), so without the lease confirmation it
//! answers from the memory it had before the pause. Every read must return the
//! acknowledged version or a newer one (a 503 while ownership settles is allowed; at least
//! one read must succeed, or the test proves nothing).

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::json;
use tether_cluster::{NodeId, Ring};
use tether_node::store::pg_server::PgServer;
use tether_test_support::node::*;

const SECRET: &str = "paused-owner-test-secret-0123456789";
/// One three-node cluster at a time: the machine may have two cores, and the starved-node
/// test must not be starved further by another test's cluster.
static ONE_CLUSTER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
/// How long node-a stays stopped at most while node-b notices (the failure-detection
/// bound of a two-node LAN cluster is a few seconds).
const DETECT_LIMIT: Duration = Duration::from_secs(30);
/// How long node-a is read from after it resumes.
const READ_FOR: Duration = Duration::from_secs(5);
const READ_EVERY: Duration = Duration::from_millis(20);

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

async fn member(
    id: &str,
    store: &str,
    join: Option<u16>,
    keyring: Option<&Node>,
    planted: Option<&str>,
) -> (Node, u16) {
    let grpc = free_port();
    let mut b = Node::builder()
        .config(&thermostat_template(&["w0", "w1"]))
        .arg("--node-id")
        .arg(id)
        .arg("--store")
        .arg(store)
        .arg("--grpc-listen")
        .arg(format!("127.0.0.1:{grpc}"))
        .env("TETHER_CLUSTER_SECRET", SECRET);
    if let Some(seed) = join {
        b = b.arg("--join").arg(format!("127.0.0.1:{seed}"));
    }
    if let Some(k) = keyring {
        b = b.keyring(k.keyring());
    }
    if let Some(bug) = planted {
        b = b.env("TETHER_PLANTED_BUG", bug);
    }
    (b.start().await, grpc)
}

/// node-a, node-b and node-c clustered on one database of `pg`, each seeing all three.
/// Callers hold [`ONE_CLUSTER`].
async fn three_members(pg: &PgServer, db: &str, planted: Option<&str>) -> (Node, Node, Node) {
    let url = pg.url(db).expect("database");
    let (a, a_grpc) = member("node-a", &url, None, None, planted).await;
    let (b, _) = member("node-b", &url, Some(a_grpc), Some(&a), planted).await;
    let (c, _) = member("node-c", &url, Some(a_grpc), Some(&a), planted).await;
    a.wait_ready(3).await;
    b.wait_ready(3).await;
    c.wait_ready(3).await;
    (a, b, c)
}

/// A device serial (`<prefix>NNN`) whose bucket set the three-node ring places on node-a.
fn owned_by_a(prefix: &str) -> String {
    let ring = Ring::new(
        [
            NodeId::new("node-a"),
            NodeId::new("node-b"),
            NodeId::new("node-c"),
        ],
        256,
    );
    (0..1000)
        .map(|i| format!("{prefix}{i:03}"))
        .find(|s| ring.owner(s).map(|o| o.to_string()).as_deref() == Some("node-a"))
        .expect("node-a owns some set")
}

fn signal(pid: u32, sig: &str) {
    let st = std::process::Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .expect("run kill (procps)");
    assert!(st.success(), "kill -{sig} {pid}: {st:?}");
}

/// Stops a process; resumes it when dropped (every exit path, panics included).
struct Stopped(u32);

impl Stopped {
    fn new(pid: u32) -> Self {
        signal(pid, "STOP");
        Stopped(pid)
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        signal(self.0, "CONT");
    }
}

/// What node-a answered after it resumed.
struct Reads {
    acked: u64,
    ok: u32,
    /// (ms after SIGCONT, version) of every read below `acked`.
    stale: Vec<(u128, u64)>,
    /// Whether a subscription held at node-a on another set node-b took over was
    /// answered within [`SUB_ANSWERED_WITHIN`] of SIGCONT (else it waits out its timeout
    /// for changes that never reach node-a).
    sub_answered: bool,
}

/// How soon after SIGCONT a subscription held at node-a must be answered.
const SUB_ANSWERED_WITHIN: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumed_owner_never_answers_from_memory_older_than_an_acknowledged_write() {
    let Reads {
        acked,
        ok,
        stale,
        sub_answered,
    } = pause_owner_then_read(None).await;
    assert!(
        sub_answered,
        "a subscription held at node-a was not answered within {SUB_ANSWERED_WITHIN:?} after it resumed, though node-b took its set over"
    );
    assert!(
        stale.is_empty(),
        "node-a answered {} reads (first at +{} ms after SIGCONT) from memory older than the write node-b acknowledged (v{acked})",
        stale.len(),
        stale[0].0
    );
    assert!(ok > 0, "node-a answered no read after it resumed");
}

/// The planted bug `stale-reads` (ARCHITECTURE.md "Planted bugs") makes the same run
/// answer from stale memory: the check above can fail.
#[cfg(feature = "planted-stale-reads")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn planted_stale_reads_are_caught() {
    let Reads { stale, .. } = pause_owner_then_read(Some("stale-reads")).await;
    assert!(!stale.is_empty(), "the planted bug did not bite");
}

async fn pause_owner_then_read(planted: Option<&str>) -> Reads {
    // The binary cargo built for this run (with the planted features when they are on),
    // before anything builds one.
    if std::env::var_os("TETHER_BIN").is_none() {
        std::env::set_var("TETHER_BIN", env!("CARGO_BIN_EXE_tether"));
    }
    let _one = ONE_CLUSTER.lock().await;
    let pg = PgServer::start().expect("a private PostgreSQL server (installed by scripts/test)");
    let (a, b, _c) = three_members(&pg, "paused", planted).await;

    // A set node-a owns, loaded in its memory at version `before`.
    let serial = owned_by_a("PAUSE");
    let id = format!("shared.{serial}");
    let on_a = a.device(&serial);
    on_a.register_thermostat().await;
    let before = u64_of(
        &on_a
            .put(&id, &json!({"value": {"w0": 0}, "base_version": 0}))
            .await
            .expect_json(StatusCode::OK),
        "version",
    );
    let read = on_a.bucket(&id).await;
    assert_eq!(u64_of(&read, "version"), before, "node-a serves {read}");
    // Another set of node-a's, with a subscription held there (and nothing else).
    let watched = owned_by_a("WATCH");
    let watched_id = format!("shared.{watched}");
    let watcher = a.device(&watched);
    watcher.register_thermostat().await;
    let held = watcher.bucket(&watched_id).await;
    let sub = {
        let (p, body) = (
            watcher.clone(),
            json!({"buckets": [{"id": watched_id, "timestamp": held["timestamp"], "version": held["version"]}],
                   "session": "watcher", "timeout_ms": 120_000}),
        );
        tokio::spawn(async move { p.subscribe(&body, Duration::from_secs(180)).await })
    };
    a.wait_held(1, REQUEST_DEADLINE).await;

    // node-a stops; node-b notices, takes the set over and acknowledges a newer write.
    let paused = Stopped::new(a.pid());
    let stopped_at = Instant::now();
    b.wait_ready(2).await;
    assert!(stopped_at.elapsed() < DETECT_LIMIT);
    let on_b = b.device(&serial);
    let acked = loop {
        let r = on_b
            .put(&id, &json!({"value": {"w1": 1}, "base_version": 0}))
            .await;
        match r.status {
            StatusCode::OK => break u64_of(&r.json(), "version"),
            StatusCode::SERVICE_UNAVAILABLE if stopped_at.elapsed() < DETECT_LIMIT => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            other => panic!("write through node-b: {other}: {}", r.text()),
        }
    };
    assert!(
        acked > before,
        "node-b acknowledged v{acked} after v{before}"
    );
    let on_b_watched = b.device(&watched);
    loop {
        let r = on_b_watched
            .put(
                &watched_id,
                &json!({"value": {"w1": 1}, "base_version": 0, "session": "writer"}),
            )
            .await;
        match r.status {
            StatusCode::OK => break,
            StatusCode::SERVICE_UNAVAILABLE if stopped_at.elapsed() < DETECT_LIMIT => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            other => panic!("write through node-b: {other}: {}", r.text()),
        }
    }
    let pause = stopped_at.elapsed();

    // node-a resumes and is read from at once: never below the acknowledged version.
    drop(paused);
    let resumed = Instant::now();
    let (mut ok, mut unavailable, mut stale) = (0u32, 0u32, Vec::new());
    while resumed.elapsed() < READ_FOR {
        let r = on_a.get(&format!("/v1/buckets/{id}")).await;
        match r.status {
            StatusCode::OK => {
                ok += 1;
                let v = u64_of(&r.json(), "version");
                if v < acked {
                    stale.push((resumed.elapsed().as_millis(), v));
                }
            }
            StatusCode::SERVICE_UNAVAILABLE => unavailable += 1,
            other => panic!("read through node-a: {other}: {}", r.text()),
        }
        tokio::time::sleep(READ_EVERY).await;
    }
    eprintln!(
        "paused owner: node-a stopped {} ms; after SIGCONT {ok} reads answered, {unavailable} 503, {} stale (below v{acked}): {:?}",
        pause.as_millis(),
        stale.len(),
        stale.iter().take(5).collect::<Vec<_>>(),
    );
    let sub_answered =
        tokio::time::timeout(SUB_ANSWERED_WITHIN.saturating_sub(resumed.elapsed()), sub)
            .await
            .is_ok();
    eprintln!("paused owner: the subscription held at node-a answered within {SUB_ANSWERED_WITHIN:?} of SIGCONT: {sub_answered}");
    Reads {
        acked,
        ok,
        stale,
        sub_answered,
    }
}

/// A node forwarding a held subscribe answers "nothing changed" only when the owner said
/// so (chaos defect 7: with the forwarder→owner link clogged, a forwarder answered "no
/// change" at its own timer although the owner had acknowledged a write to the held
/// bucket 1.6 s earlier). node-b holds a subscribe for a set node-a owns; first the
/// owner's own timeout answer comes through node-b (200, nothing changed); then node-a is
/// stopped while a second subscribe is held through node-b: node-b cannot know whether
/// node-a sent a notification, so the held response is cut (the client resubscribes),
/// never a 200 "no change".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forwarder_never_answers_no_change_the_owner_did_not_give() {
    if std::env::var_os("TETHER_BIN").is_none() {
        std::env::set_var("TETHER_BIN", env!("CARGO_BIN_EXE_tether"));
    }
    let _one = ONE_CLUSTER.lock().await;
    let pg = PgServer::start().expect("a private PostgreSQL server (installed by scripts/test)");
    let (a, b, _c) = three_members(&pg, "forwarded", None).await;
    let serial = owned_by_a("FWD");
    let id = format!("shared.{serial}");
    a.device(&serial).register_thermostat().await;
    let on_b = b.device(&serial);
    let bucket = on_b.bucket(&id).await;
    let body = json!({"buckets": [{"id": id, "timestamp": bucket["timestamp"], "version": bucket["version"]}],
                      "timeout_ms": 1_500});

    // The owner's own "nothing changed", through node-b.
    let r = on_b.subscribe(&body, Duration::from_secs(30)).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(
        r.json()["buckets"].as_array().map(Vec::len),
        Some(0),
        "nothing changed, so nothing is answered: {}",
        r.text()
    );

    // Held through node-b, then node-a stops: no "no change" without the owner.
    let held = {
        let (p, body) = (on_b.clone(), body.clone());
        tokio::spawn(async move {
            let r = tokio::time::timeout(
                Duration::from_secs(30),
                p.req(reqwest::Method::POST, "/v1/subscribe")
                    .json(&body)
                    .send(),
            )
            .await
            .expect("the subscribe's headers within 30 s")
            .expect("send the subscribe");
            tether_test_support::node::Resp::read_checked(r).await
        })
    };
    a.wait_held(1, REQUEST_DEADLINE).await;
    let paused = Stopped::new(a.pid());
    let answer = tokio::time::timeout(Duration::from_secs(30), held)
        .await
        .expect("node-b answers within 30 s")
        .expect("the subscribe task");
    drop(paused);
    if let Some(r) = answer {
        assert_ne!(
            r.status,
            StatusCode::OK,
            "node-b answered {} ({}) for a subscription its stopped owner never answered",
            r.status,
            r.text()
        );
    }
}

/// How long node-a shares its CPU with busy loops.
const STARVE_FOR: Duration = Duration::from_secs(10);
/// Busy loops pinned to node-a's CPU beside it (at the same priority: node-a gets about
/// 1 / (1 + this) of one core while they run).
const BUSY_LOOPS: usize = 2;

/// A loaded node is not a dead one (issue 16: fast failure detection without false
/// suspicion). node-a's threads are pinned to one CPU and share it with busy loops for
/// 10 s; meanwhile no node's view may lose a member — neither node-b's and node-c's view
/// of node-a nor node-a's of them — so no set moves and nothing fails over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cpu_starved_node_is_not_declared_dead() {
    if std::env::var_os("TETHER_BIN").is_none() {
        std::env::set_var("TETHER_BIN", env!("CARGO_BIN_EXE_tether"));
    }
    let _one = ONE_CLUSTER.lock().await;
    let pg = PgServer::start().expect("a private PostgreSQL server (installed by scripts/test)");
    let (a, b, c) = three_members(&pg, "starved", None).await;
    let pinned = std::process::Command::new("taskset")
        .args(["-a", "-p", "0x1", &a.pid().to_string()])
        .output()
        .expect("run taskset (util-linux)");
    assert!(pinned.status.success(), "taskset: {pinned:?}");
    let busy = Busy::start(BUSY_LOOPS);
    let started = Instant::now();
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .expect("HTTP client");
    let mut lost = Vec::new();
    let mut polls = 0u32;
    while started.elapsed() < STARVE_FOR {
        for (name, node) in [("node-a", &a), ("node-b", &b), ("node-c", &c)] {
            // node-a may be slow to answer its own /readyz: only a view it states counts.
            let Ok(r) = client.get(node.url("/readyz")).send().await else {
                continue;
            };
            let body: serde_json::Value = r.json().await.unwrap_or_default();
            polls += 1;
            if body["members"].as_u64().is_some_and(|m| m != 3) {
                lost.push((name, started.elapsed().as_millis(), body));
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(busy);
    eprintln!(
        "starved node: {polls} views read in {} s, {} without all three members",
        STARVE_FOR.as_secs(),
        lost.len()
    );
    assert!(
        polls > 0,
        "no node answered /readyz while node-a was loaded"
    );
    assert!(
        lost.is_empty(),
        "a view lost a member while node-a was merely loaded (first: {:?}); node-a's stderr:\n{}",
        lost.first(),
        a.stderr_tail()
    );
    // Still one cluster afterwards.
    for node in [&a, &b, &c] {
        node.wait_ready(3).await;
    }
}

/// Busy loops pinned to CPU 0; killed when dropped (every exit path).
struct Busy(Vec<std::process::Child>);

impl Busy {
    fn start(n: usize) -> Self {
        Busy(
            (0..n)
                .map(|_| {
                    std::process::Command::new("taskset")
                        .args(["0x1", "sh", "-c", "while :; do :; done"])
                        .spawn()
                        .expect("start a busy loop (taskset, sh)")
                })
                .collect(),
        )
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
