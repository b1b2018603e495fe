//! A PostgreSQL server that is connected but does not answer (every server process
//! SIGSTOPped: the TCP connections stay up, nothing comes back — what a clogged link looks
//! like to the node) never holds a request past the store deadline: a PUT answers 503 and
//! is not acknowledged, a subscribe answers within its timeout, a GET is bounded; and once
//! the server resumes, the data is coherent — the write landed once or not at all, its
//! retry by op id is answered consistently and the next write continues the version
//! sequence (no fork from a commit that landed after its deadline).

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::json;
use tether_node::store::pg_server::PgServer;
use tether_test_support::node::*;

/// The node's store deadline in this test (`--store-timeout-ms`).
const DEADLINE: Duration = Duration::from_millis(3000);
/// How long PostgreSQL stays stopped: well past the deadline.
const STALL: Duration = Duration::from_secs(20);
/// A request during the stall must answer before this (generous; the stall is 20 s).
const ANSWER_BOUND: Duration = Duration::from_secs(10);

/// Every process of the PostgreSQL server (the postmaster and its children).
fn server_pids(pg: &PgServer) -> Vec<String> {
    let pid_file = pg.dir().join("data").join("postmaster.pid");
    let text = std::fs::read_to_string(&pid_file)
        .unwrap_or_else(|e| panic!("reading {}: {e}", pid_file.display()));
    let postmaster = text
        .lines()
        .next()
        .expect("postmaster pid")
        .trim()
        .to_string();
    let out = std::process::Command::new("pgrep")
        .args(["-P", &postmaster])
        .output()
        .expect("pgrep (package procps) must be installed");
    let mut pids: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(str::to_string)
        .collect();
    assert!(!pids.is_empty(), "PostgreSQL has no backend processes");
    pids.push(postmaster);
    pids
}

fn signal(pids: &[String], sig: &str) {
    let status = std::process::Command::new("kill")
        .arg(sig)
        .args(pids)
        .status()
        .expect("kill");
    assert!(status.success(), "kill {sig} {pids:?}");
}

/// PostgreSQL stopped until dropped (resumed on every exit path, panics included).
struct Stalled(Vec<String>);

impl Stalled {
    fn start(pg: &PgServer) -> Self {
        let pids = server_pids(pg);
        signal(&pids, "-STOP");
        Stalled(pids)
    }
}

impl Drop for Stalled {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill")
            .arg("-CONT")
            .args(&self.0)
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_postgres_answers_503_within_the_deadline_and_never_forks_a_version() {
    let pg = PgServer::start().expect("a private PostgreSQL server (installed by scripts/test)");
    let url = pg.url("tether").expect("database");
    let node = Node::builder()
        .arg("--store")
        .arg(url.clone())
        .arg("--store-timeout-ms")
        .arg(DEADLINE.as_millis().to_string())
        .start()
        .await;
    // A user never seen by this node: its credentials are looked up in the store.
    let out = admin(["user", "add", "stalluser", "--store", url.as_str()]).await;
    let user = node.with_credentials(credentials_line(&out.ok()));
    let dev = node.device("PGST01");
    dev.register_thermostat().await;
    let id = "shared.PGST01";
    let (_, v0) = dev.write(id, json!({"target_temperature": 1}), 1).await;

    let stalled = Stalled::start(&pg);
    let stall_began = Instant::now();
    let put_body =
        json!({"value": {"target_temperature": 7}, "base_version": v0, "op_id": "stall-op-1"});
    let put = async {
        let t = Instant::now();
        let r = send_within(
            STALL,
            dev.req(reqwest::Method::PUT, &format!("/v1/buckets/{id}"))
                .json(&put_body),
        )
        .await;
        (r, t.elapsed())
    };
    let sub = async {
        let t = Instant::now();
        let r = dev
            .subscribe(
                &json!({"buckets": [{"id": id, "version": v0}], "timeout_ms": 2000}),
                STALL,
            )
            .await;
        (r, t.elapsed())
    };
    let user_sub = async {
        let t = Instant::now();
        let r = user
            .subscribe(
                &json!({"buckets": [{"id": id, "version": v0}], "timeout_ms": 2000}),
                STALL,
            )
            .await;
        (r, t.elapsed())
    };
    let get = async {
        // After the PUT's deadline: the set may be reloading then.
        tokio::time::sleep(DEADLINE + Duration::from_millis(500)).await;
        let t = Instant::now();
        let r = send_within(
            STALL,
            dev.req(reqwest::Method::GET, &format!("/v1/buckets/{id}")),
        )
        .await;
        (r, t.elapsed())
    };
    // The load balancer is told: /readyz names the store (bounded, like every call).
    let ready = async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        send_within(STALL, node.anon(reqwest::Method::GET, "/readyz")).await
    };
    let ((put_r, put_t), (sub_r, sub_t), (user_r, user_t), (get_r, get_t), ready_r) =
        tokio::join!(put, sub, user_sub, get, ready);
    assert_eq!(
        (ready_r.status, ready_r.json()["status"].clone()),
        (StatusCode::SERVICE_UNAVAILABLE, json!("store_unreachable")),
        "/readyz during the stall: {}",
        ready_r.text()
    );
    assert!(
        stall_began.elapsed() < STALL,
        "the requests outlived the stall"
    );

    eprintln!(
        "during a {STALL:?} stall: PUT {} after {put_t:?}, subscribe {} after {sub_t:?}, \
         user subscribe {} after {user_t:?}, GET {} after {get_t:?}",
        put_r.status, sub_r.status, user_r.status, get_r.status
    );
    // The PUT: 503 (not acknowledged), well before the stall ends.
    assert_eq!(
        put_r.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "PUT during the stall: {}",
        put_r.text()
    );
    assert!(
        put_r.headers.get("retry-after").is_some(),
        "503 without Retry-After"
    );
    assert!(put_t < ANSWER_BOUND, "PUT answered after {put_t:?}");
    // Subscribes: within their timeout (2 s) + 1 s, plus scheduling slack.
    for (who, r, t) in [("device", &sub_r, sub_t), ("user", &user_r, user_t)] {
        assert!(
            t < Duration::from_millis(2000 + 1000 + 500),
            "{who} subscribe answered after {t:?} ({})",
            r.status
        );
        assert!(
            r.status == StatusCode::OK || r.status == StatusCode::SERVICE_UNAVAILABLE,
            "{who} subscribe: {} {}",
            r.status,
            r.text()
        );
    }
    // The GET: bounded by the store deadline.
    assert!(get_t < ANSWER_BOUND, "GET answered after {get_t:?}");
    assert!(
        get_r.status == StatusCode::OK || get_r.status == StatusCode::SERVICE_UNAVAILABLE,
        "GET during the stall: {} {}",
        get_r.status,
        get_r.text()
    );

    // The stall ends (the PUT's transaction may commit now, long after its deadline).
    tokio::time::sleep(STALL.saturating_sub(stall_began.elapsed())).await;
    drop(stalled);

    // The bucket is the old value at v0 or the new one at v0 + 1, nothing else.
    let deadline = Instant::now() + Duration::from_secs(30);
    let after = loop {
        let r = send(dev.req(reqwest::Method::GET, &format!("/v1/buckets/{id}"))).await;
        if r.status == StatusCode::OK {
            break r.json();
        }
        assert!(
            Instant::now() < deadline,
            "no read after the stall: {}",
            r.text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let version = u64_of(&after, "version");
    eprintln!("after the stall: {after}");
    // Ready again once the store answers.
    node.wait_ready(1).await;
    let temp = after["value"]["target_temperature"].clone();
    assert!(
        (version == v0 && temp == json!(1)) || (version == v0 + 1 && temp == json!(7)),
        "after the stall the bucket is neither the old nor the new write: {after}"
    );

    // The retry by op id: applied once (v0 + 1), replayed if the first attempt landed.
    let retry = loop {
        let r = dev.put(id, &put_body).await;
        if r.status == StatusCode::OK {
            break r.json();
        }
        assert!(
            Instant::now() < deadline,
            "retry never answered: {}",
            r.text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(retry["outcome"], json!("applied"), "retry: {retry}");
    assert_eq!(u64_of(&retry, "version"), v0 + 1, "retry: {retry}");
    assert_eq!(
        retry["replayed"] == json!(true),
        version == v0 + 1,
        "a retry is replayed exactly when its first attempt landed: {retry} (bucket was {after})"
    );
    // The next write continues the store's sequence: no fork.
    let (_, next) = dev
        .write(id, json!({"target_temperature": 9}), v0 + 1)
        .await;
    assert_eq!(next, v0 + 2);
    let history = send(dev.req(
        reqwest::Method::GET,
        &format!("/v1/buckets/{id}/history?since_version=0&limit=100"),
    ))
    .await
    .expect_json(StatusCode::OK);
    let versions: Vec<u64> = history["changes"]
        .as_array()
        .expect("changes")
        .iter()
        .map(|c| u64_of(c, "version"))
        .collect();
    let expected: Vec<u64> = (versions[0]..=v0 + 2).collect();
    assert_eq!(versions, expected, "history: {history}");
    let b = dev.bucket(id).await;
    assert_eq!(u64_of(&b, "version"), v0 + 2);
    assert_eq!(b["value"]["target_temperature"], json!(9));
}
