//! A short run of `tether-sim` against a real `tether` node: a few devices with
//! companions, an app user paired through pairing codes (in the setup phase, before the
//! timed load starts), sleep cycles and flaky links — connections dropped, and PUT
//! answers lost after the server acted (every writer retries with the same op id) — for
//! a few seconds, then the audit of the final state and of every bucket's history. Every
//! check must pass: no version regression, no missed notification, no lost write, no
//! write applied twice. No timing is asserted beyond a generous 15 s bound on a
//! notification (a missed one is what the checker exists to find).
//!
//! The `tether` binary belongs to another package, so `CARGO_BIN_EXE_tether` does not
//! exist here: it is built (a no-op when up to date) with the cargo running this test and
//! found through cargo's JSON messages. Failing to build it fails the test.

use std::path::Path;
use std::process::{Command as StdCommand, Stdio};
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

fn run_ok(bin: &Path, args: &[&str]) -> String {
    let out = StdCommand::new(bin)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {bin:?} {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{bin:?} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A real node with a manufacturing key and one user (alice), serving on a free port.
struct RealNode {
    child: tokio::process::Child,
    url: String,
    key: String,
    users: std::path::PathBuf,
    /// Kept for the node's lifetime (its key, data and users file).
    _dir: tempfile::TempDir,
}

async fn start_node(extra: &[&str]) -> RealNode {
    let tether = tether_test_support::bin::cargo_binary("tether-node", "tether")
        .expect("building the tether binary");
    let dir = tempfile::tempdir().expect("tempdir");
    let key = dir.path().join("k1.key");
    let data = dir.path().join("data");
    let users = dir.path().join("users.txt");
    let key_s = key.to_str().expect("utf-8 path");
    let data_s = data.to_str().expect("utf-8 path");
    run_ok(&tether, &["admin", "mfg-key", "generate", key_s]);
    // Users are created while the node is stopped (the embedded store is single-process).
    let alice = run_ok(
        &tether,
        &["admin", "user", "add", "alice", "--data-dir", data_s],
    );
    std::fs::write(&users, alice).expect("write users file");

    let mut child = Command::new(&tether)
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir", data_s])
        .arg("--mfg-key-file")
        .arg(format!("k1={key_s}"))
        .args(["--requests-per-second", "100000"])
        .args(["--max-connections-per-source", "100000"])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn tether serve");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let line = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
        .await
        .expect("tether printed its listening line within 20 s")
        .expect("read tether stdout")
        .expect("tether exited before listening");
    let url = line
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_string();
    RealNode {
        child,
        url,
        key: key_s.to_string(),
        users,
        _dir: dir,
    }
}

/// Runs `tether-sim` against `node` (its URL, key and users file) with `args` and
/// `--json`, within `limit`; asserts it passed (exit 0) and returns its summary.
async fn run_sim(node: &RealNode, args: &[&str], limit: Duration) -> Value {
    let out = tokio::time::timeout(
        limit,
        Command::new(env!("CARGO_BIN_EXE_tether-sim"))
            .args(["--url", &node.url, "--mfg-key-file", &node.key])
            .arg("--users-file")
            .arg(&node.users)
            .args(args)
            .arg("--json")
            .stdin(Stdio::null())
            .output(),
    )
    .await
    .unwrap_or_else(|_| panic!("tether-sim finished within {limit:?}"))
    .expect("run tether-sim");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let report: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("--json summary ({e}); stderr: {stderr}"));
    assert_eq!(
        out.status.code(),
        Some(0),
        "tether-sim must pass against the real node: {report:#}\nstderr: {stderr}"
    );
    report
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_fleet_against_a_real_node_passes_every_check() {
    let mut node = start_node(&[]).await;
    let report = run_sim(
        &node,
        &[
            "--devices",
            "8",
            "--duration-s",
            "4",
            "--ramp-s",
            "0.5",
            "--update-rate",
            "2",
            "--companion-rate",
            "2",
            "--app-rate",
            "1",
            "--sleep-every-s",
            "2",
            "--sleep-for-s",
            "0.5",
            "--flaky-per-min",
            "20",
            "--drop-answers",
            "0.3",
            "--max-answer-bytes",
            "1536",
            "--notify-deadline-ms",
            "15000",
            "--audit",
        ],
        Duration::from_secs(90),
    )
    .await;
    assert_eq!(report["connected"], 8, "{report:#}");
    assert_eq!(
        report["paired"], 8,
        "every device paired with alice: {report:#}"
    );
    assert!(report["deliveries"].as_u64().unwrap_or(0) > 0, "{report:#}");
    assert!(
        report["device_updates"].as_u64().unwrap_or(0) > 0,
        "{report:#}"
    );
    assert_eq!(
        report["audited"], 8,
        "every device's final state was read: {report:#}"
    );
    assert_eq!(report["violations"], Value::Array(vec![]), "{report:#}");
    // The flaky link lost answers after the server acted; the retries (same op ids) were
    // answered from the server's memory, and the histories show each write once.
    let n = |k: &str| report[k].as_u64().unwrap_or(0);
    assert!(n("answers_dropped") > 0, "{report:#}");
    assert!(n("retried_writes") > 0, "{report:#}");
    assert!(n("replayed_answers") > 0, "{report:#}");
    assert_eq!(n("double_applications"), 0, "{report:#}");
    let checked = report["op_audit"]["retried_checked"].as_u64().unwrap_or(0);
    assert!(
        checked > 0,
        "retried writes vouched for by the histories: {report:#}"
    );
    node.child.kill().await.expect("stop tether");
}

/// Sleeping devices that a push wakes (API.md "Presence and wake-ups"): each sleeps far
/// longer than the run (60 s, its declared `next_sync_ms`) between short awake spells,
/// while an app changes its buckets. The node posts a signed wake-up to the simulator's
/// gateway for a device that is not listening, the device syncs at once, and every change
/// reaches its device at its next wake (the checker restarts a sleeping device's
/// deadline when it wakes). The run's drain wakes everything at the end anyway, so the
/// push shows in the wake-ups counted, not in the final state alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sleeping_devices_woken_by_push_get_every_change_at_their_next_wake() {
    let push_addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
        l.local_addr().expect("addr")
    };
    let secret_dir = tempfile::tempdir().expect("tempdir");
    let secret = secret_dir.path().join("push.secret");
    std::fs::write(&secret, "sim-push-secret\n").expect("secret");
    let secret_s = secret.to_str().expect("utf-8 path");
    let webhook = format!("http://{push_addr}/wake");
    let mut node = start_node(&[
        "--push-webhook",
        &webhook,
        "--push-secret-file",
        secret_s,
        "--push-min-gap-ms",
        "500",
    ])
    .await;
    let push_listen = push_addr.to_string();
    let mut args = vec![
        "--push-listen",
        &push_listen,
        "--push-secret-file",
        secret_s,
    ];
    args.extend([
        "--devices",
        "12",
        "--duration-s",
        "8",
        "--ramp-s",
        "0.5",
        "--update-rate",
        "0.5",
        "--companion-rate",
        "0",
        "--app-rate",
        "1",
        "--sleep-every-s",
        "0.5",
        "--sleep-for-s",
        "60",
        "--notify-deadline-ms",
        "15000",
        "--audit",
    ]);
    let report = run_sim(&node, &args, Duration::from_secs(120)).await;
    let n = |k: &str| report[k].as_u64().unwrap_or(0);
    assert_eq!(report["violations"], Value::Array(vec![]), "{report:#}");
    assert_eq!(n("audited"), 12, "{report:#}");
    assert!(n("sleeps") > 0, "{report:#}");
    assert!(
        n("push_wakes") > 0,
        "sleeps ended by a push wake-up: {report:#}"
    );
    assert!(
        n("catch_up_deliveries") > 0,
        "changes made while a device slept reached it: {report:#}"
    );
    assert_eq!(n("push_unsigned"), 0, "{report:#}");
    node.child.kill().await.expect("stop tether");
}
