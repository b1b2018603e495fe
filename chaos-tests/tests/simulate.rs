//! `tether-chaos simulate` (ARCHITECTURE.md "The cluster simulator"): two seeds of a
//! simulated 3-node cluster with crashes, isolations, cut links and store faults, each
//! seed run twice. The real code holds every safety property, and a seed's two runs give
//! the same history. (That the simulator catches each planted bug is `scripts/test`'s
//! check: it needs a build with the planted bugs compiled in.)

use std::process::Command;

#[test]
fn two_seeds_pass_and_replay_identically() {
    let out = tempfile::tempdir().expect("tempdir");
    let run = Command::new(env!("CARGO_BIN_EXE_tether-chaos"))
        .args([
            "simulate",
            "--seeds",
            "2",
            "--first-seed",
            "3",
            "--sim-secs",
            "40",
        ])
        .args(["--check-determinism-every", "1", "--out"])
        .arg(out.path())
        .output()
        .expect("run tether-chaos simulate");
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        run.status.success(),
        "simulate failed ({}):\n{stdout}\n{stderr}",
        run.status
    );
    assert!(
        stdout.contains("determinism: 2 of 2 seeds run twice gave the same history"),
        "{stdout}"
    );
    // The runs met faults and did work: a run that reached neither proves nothing.
    let coverage = stdout
        .lines()
        .find_map(|l| l.strip_prefix("coverage: "))
        .expect("coverage line");
    let c: serde_json::Value = serde_json::from_str(coverage).expect("coverage json");
    let faults = ["crashes", "isolations", "cut_links"]
        .iter()
        .map(|k| c[k].as_u64().unwrap_or(0))
        .sum::<u64>();
    assert!(faults > 0, "no fault injected: {coverage}");
    assert!(c["writes_ok"].as_u64().unwrap_or(0) > 100, "{coverage}");
    assert!(
        c["store_lost_replies"].as_u64().unwrap_or(0) > 0,
        "no unknown-result commit: {coverage}"
    );
}
