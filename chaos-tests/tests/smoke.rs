//! The smoke tier through the `tether-chaos` binary, as `scripts/test` and an SRE run it:
//! every smoke scenario runs on a fresh namespaced cluster (PostgreSQL, 3 nodes over mTLS,
//! HAProxy), records a complete history (start, invocations with completions, the
//! scheduled faults, ownership, end, final reads from every node), and leaves nothing
//! behind: no namespace, no process, no PostgreSQL directory — also when the run is
//! interrupted with Ctrl-C, and when the harness panics mid-run. Each scenario's history is
//! checked and reported (`results.json`, `report.md`, `repro.sh`); the exit code is 0
//! exactly when every verdict is `pass`, and the test finally requires every smoke
//! scenario to pass (the issue's zero-tolerance goal: a failing scenario is a defect the
//! suite found, named with its properties). The tier's `tether-sim` fleet (20 devices) runs
//! in every scenario: each must show it connected, audited, writing and notified.
//!
//! Needs root, HAProxy, PostgreSQL, nftables, curl and libfaketime; a missing one fails the
//! run naming the package (never a skip).

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use tether_chaos_tests::history::{self, Entry, FaultPhase};

/// One cluster at a time: each test starts PostgreSQL, nodes and HAProxy on two cores.
static ONE_CLUSTER: std::sync::Mutex<()> = std::sync::Mutex::new(());

const SMOKE: [&str; 6] = [
    "baseline",
    "kill-owner",
    "pause-owner",
    "isolate-node",
    "clock-bump",
    "store-crash-restart",
];

fn tether() -> PathBuf {
    tether_test_support::bin::tether().to_path_buf()
}

fn chaos() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tether-chaos"))
}

fn namespaces() -> Vec<String> {
    let out = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect()
}

/// Alive and not a zombie.
fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next().map(|st| st != "Z"))
        })
        .unwrap_or(false)
}

/// Namespaces with `prefix` are gone and every pid has exited (processes killed at
/// teardown are reaped asynchronously: waits up to 10 s for that, then fails).
fn assert_torn_down(prefix: &str, pids: &[u32], store_dir: Option<&Path>) {
    assert!(
        prefix.starts_with("t12-"),
        "a run's namespace prefix: {prefix:?}"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left_ns: Vec<String> = namespaces()
            .into_iter()
            .filter(|n| n.starts_with(prefix))
            .collect();
        let left_pids: Vec<u32> = pids.iter().copied().filter(|&p| running(p)).collect();
        let left_dir = store_dir.is_some_and(Path::exists);
        if left_ns.is_empty() && left_pids.is_empty() && !left_dir {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "left behind: namespaces {left_ns:?}, processes {left_pids:?}, store dir {left_dir}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn the_smoke_tier_records_complete_histories_and_leaves_nothing_behind() {
    let _one = ONE_CLUSTER.lock().unwrap_or_else(|e| e.into_inner());
    let out = tempfile::tempdir().expect("tempdir");
    let started = Instant::now();
    let status = chaos()
        .args(["run", "smoke", "--tier", "smoke", "--seed", "12"])
        .arg("--out")
        .arg(out.path())
        .arg("--tether-bin")
        .arg(tether())
        .status()
        .expect("run tether-chaos");
    eprintln!("smoke tier: {:.0} s wall", started.elapsed().as_secs_f64());
    assert!(
        matches!(status.code(), Some(0 | 1)),
        "tether-chaos run smoke could not run every scenario: {status}"
    );

    let mut verdicts = Vec::new();
    for scenario in SMOKE {
        let dir = out.path().join(scenario);
        let info: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("run.json")).expect("run.json"))
                .expect("run.json is JSON");
        let entries = history::read(&dir.join("history.jsonl")).expect("history.jsonl");
        assert!(
            matches!(&entries[0], Entry::Start { scenario: s, seed: 12, .. } if s == scenario),
            "{scenario}: first entry {:?}",
            entries[0]
        );
        let end = entries
            .iter()
            .position(|e| matches!(e, Entry::End { .. }))
            .unwrap_or_else(|| panic!("{scenario}: no End entry"));

        // Every invocation completed (the clients were stopped before End).
        let mut open = BTreeSet::new();
        let mut writes = 0;
        for e in &entries {
            match e {
                Entry::Invoke { op, call, .. } => {
                    open.insert(*op);
                    if matches!(call, history::Call::Write { .. }) {
                        writes += 1;
                    }
                }
                Entry::Complete { op, .. } => {
                    assert!(
                        open.remove(op),
                        "{scenario}: op {op} completed twice or never invoked"
                    );
                }
                _ => {}
            }
        }
        assert!(open.is_empty(), "{scenario}: ops never completed: {open:?}");
        assert!(
            writes > 100,
            "{scenario}: only {writes} writes in the whole run"
        );

        // The scheduled faults happened, each started and ended, all before End.
        let planned = info["schedule"]["faults"].as_array().map_or(0, Vec::len);
        let faults: Vec<(&str, FaultPhase)> = entries
            .iter()
            .filter_map(|e| match e {
                Entry::Fault { kind, phase, .. } => Some((kind.as_str(), *phase)),
                _ => None,
            })
            .collect();
        let starts = faults.iter().filter(|f| f.1 == FaultPhase::Start).count();
        let ends = faults.iter().filter(|f| f.1 == FaultPhase::End).count();
        assert_eq!(starts, planned, "{scenario}: faults started vs scheduled");
        assert_eq!(ends, planned, "{scenario}: faults ended vs scheduled");
        if scenario == "baseline" {
            assert_eq!(planned, 0);
        } else {
            assert!(planned > 0, "{scenario}: a fault scenario without faults");
        }
        assert!(
            entries[end..]
                .iter()
                .all(|e| !matches!(e, Entry::Fault { .. })),
            "{scenario}: a fault after End"
        );

        // Ownership was recorded for every hot set.
        let owned: BTreeSet<&str> = entries
            .iter()
            .filter_map(|e| match e {
                Entry::Owner { set, .. } => Some(set.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(owned.len(), 4, "{scenario}: owners seen for {owned:?}");

        // Final reads after End from every node and the load balancer.
        let finals: BTreeSet<&str> = entries[end..]
            .iter()
            .filter_map(|e| match e {
                Entry::Invoke {
                    call: history::Call::Read { via, .. },
                    ..
                } => Some(via.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(
            finals,
            BTreeSet::from(["lb", "n0", "n1", "n2"]),
            "{scenario}: final reads"
        );

        let pids: Vec<u32> = info["pids"]
            .as_array()
            .expect("pids")
            .iter()
            .filter_map(|p| p.as_u64().and_then(|p| u32::try_from(p).ok()))
            .collect();
        assert!(pids.len() >= 4, "{scenario}: pids {pids:?}");
        assert_torn_down(
            info["namespace_prefix"].as_str().expect("prefix"),
            &pids,
            Some(Path::new(info["store_dir"].as_str().expect("store dir"))),
        );

        // Checked and reported.
        let results: Value = serde_json::from_str(
            &std::fs::read_to_string(dir.join("results.json")).expect("results.json"),
        )
        .expect("results.json is JSON");
        assert_eq!(results["scenario"], scenario);
        assert_eq!(results["seed"], 12);
        assert!(dir.join("report.md").exists() && dir.join("repro.sh").exists());
        // The tier's fleet (20 devices) ran through the whole scenario and was checked.
        let fleet = &results["fleet"];
        let n = |k: &str| fleet[k].as_u64().unwrap_or(0);
        assert!(
            n("devices") == 20 && n("connected") == 20 && n("audited") == 20,
            "{scenario}: fleet {fleet}"
        );
        assert!(
            n("updates_acked") > 0 && n("deliveries") > 0,
            "{scenario}: fleet {fleet}"
        );
        let verdict = results["verdict"].as_str().expect("verdict").to_string();
        eprintln!(
            "{scenario}: {verdict}; properties {}; availability {}; failover {}",
            results["properties"], results["availability"], results["failover_s"]
        );
        verdicts.push((scenario, verdict, results["properties"].clone()));
    }
    let all_pass = verdicts.iter().all(|(_, v, _)| v == "pass");
    assert_eq!(
        status.code() == Some(0),
        all_pass,
        "exit code {status} vs verdicts {verdicts:?}"
    );
    // A failed scenario's run (history, node logs, report) is kept for the person who
    // investigates it: the temporary directory goes with the test.
    let failing: Vec<_> = verdicts.iter().filter(|(_, v, _)| v != "pass").collect();
    for (scenario, _, _) in &failing {
        let keep = Path::new(env!("CARGO_TARGET_TMPDIR")).join("chaos-smoke-failed");
        std::fs::create_dir_all(&keep).expect("create the kept-runs directory");
        let copied = Command::new("cp")
            .arg("-r")
            .arg(out.path().join(scenario))
            .arg(&keep)
            .status()
            .expect("cp");
        eprintln!("{scenario}: run kept in {} ({copied})", keep.display());
    }
    let failed: Vec<_> = failing
        .iter()
        .map(|(scenario, _, properties)| format!("{scenario}: {properties}"))
        .collect();
    assert!(
        failed.is_empty(),
        "smoke scenarios whose safety properties failed: {failed:?}"
    );
}

#[test]
fn ctrl_c_tears_the_cluster_down() {
    let _one = ONE_CLUSTER.lock().unwrap_or_else(|e| e.into_inner());
    let out = tempfile::tempdir().expect("tempdir");
    let mut child = chaos()
        .args(["run", "baseline", "--duration", "120", "--seed", "1"])
        .arg("--out")
        .arg(out.path())
        .arg("--tether-bin")
        .arg(tether())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn tether-chaos");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(rest) = line.strip_prefix("-- cluster up: namespaces ") {
                let _ = tx.send(rest.to_string());
            }
        }
    });
    let up = rx
        .recv_timeout(Duration::from_secs(120))
        .expect("the cluster came up");
    // `t12-<slot>-*, load balancer http://…, pids [a, b, …]`
    let prefix = up.split('*').next().expect("prefix").to_string();
    let pids: Vec<u32> = up
        .rsplit_once('[')
        .map(|(_, p)| p.trim_end_matches(']'))
        .unwrap_or("")
        .split(", ")
        .filter_map(|p| p.parse().ok())
        .collect();
    assert!(pids.len() >= 4, "pids in {up:?}");
    assert!(
        namespaces().iter().any(|n| n.starts_with(&prefix)),
        "the run's namespaces exist while it runs"
    );
    std::thread::sleep(Duration::from_secs(2));
    let st = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .expect("kill -INT");
    assert!(st.success());
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "tether-chaos did not exit after Ctrl-C"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(status.code(), Some(2), "exit code after Ctrl-C");
    assert_torn_down(&prefix, &pids, None);
}

/// What a cluster could leave behind: its namespaces' prefix, its processes, PostgreSQL's
/// directory.
type Leftovers = (String, Vec<u32>, PathBuf);

#[test]
fn a_panic_mid_run_tears_the_cluster_down() {
    let _one = ONE_CLUSTER.lock().unwrap_or_else(|e| e.into_inner());
    let seen: std::sync::Arc<std::sync::Mutex<Option<Leftovers>>> = Default::default();
    let seen2 = seen.clone();
    let result = std::panic::catch_unwind(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let mut opts = tether_chaos_tests::ClusterOptions::new(2, 2);
            opts.namespaces = true;
            opts.tether_bin = Some(tether());
            let mut cluster = tether_chaos_tests::Cluster::start(opts).await;
            cluster.pause(1).await;
            *seen2.lock().unwrap_or_else(|e| e.into_inner()) = Some((
                cluster.namespace_prefix().expect("namespaced"),
                cluster.pids(),
                cluster.store().dir().to_path_buf(),
            ));
            panic!("a deliberate panic mid-run");
        })
    });
    assert!(result.is_err(), "the closure panicked");
    let (prefix, pids, store_dir) = seen
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone()
        .expect("the cluster started before the panic");
    assert!(pids.len() >= 3, "pids {pids:?}");
    assert_torn_down(&prefix, &pids, Some(&store_dir));
}
