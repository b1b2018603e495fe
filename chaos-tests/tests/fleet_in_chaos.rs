//! The `tether-sim` fleet inside a chaos run, through the `tether-chaos` binary as an SRE
//! runs it: `run kill-owner --tier smoke --devices 20 --seed 12` on a fresh namespaced
//! cluster. The fleet's devices register, subscribe, sleep, lose connections and answers,
//! and get changes from their companions and apps through HAProxy while a hot set's owner
//! is killed with `kill -9` and restarted; the run must pass with the fleet counted:
//! every device connected and audited, changes acknowledged and delivered, no violation
//! (no version regression, no change late past the fault-suspended deadline, no
//! acknowledged write missing), the summary in `fleet.json`, `results.json` and
//! `report.md`, and `tether-chaos check` re-reading it.
//!
//! Needs root, HAProxy, PostgreSQL, nftables and curl; a missing one fails the run naming
//! the package (never a skip). About 65 s for the run (2 shared cores).

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use serde_json::Value;

const DEVICES: u64 = 20;

fn tether() -> PathBuf {
    tether_test_support::bin::tether().to_path_buf()
}

#[test]
fn kill_owner_with_a_fleet_of_20_passes_with_the_fleet_counted() {
    let out = tempfile::tempdir().expect("tempdir");
    let started = Instant::now();
    let status = Command::new(env!("CARGO_BIN_EXE_tether-chaos"))
        .args(["run", "kill-owner", "--tier", "smoke", "--seed", "12"])
        .args(["--devices", &DEVICES.to_string()])
        .arg("--out")
        .arg(out.path())
        .arg("--tether-bin")
        .arg(tether())
        .status()
        .expect("run tether-chaos");
    eprintln!(
        "kill-owner with {DEVICES} devices: {:.0} s wall",
        started.elapsed().as_secs_f64()
    );
    let dir = out.path().join("kill-owner");
    // Absent when the scenario could not run (exit 2, e.g. the fleet never came up).
    let results: Value = std::fs::read_to_string(dir.join("results.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or(Value::Null);
    let fleet = &results["fleet"];
    eprintln!("results.json fleet: {fleet:#}");
    if status.code() != Some(0) {
        let keep = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("chaos-fleet-failed");
        let _ = std::fs::create_dir_all(&keep);
        let _ = Command::new("cp").arg("-r").arg(&dir).arg(&keep).status();
        panic!(
            "tether-chaos run kill-owner --devices {DEVICES}: {status} (1: a verdict failed, 2: \
             could not run); verdict {}, properties {}, fleet {fleet}; run kept in {}",
            results["verdict"],
            results["properties"],
            keep.display()
        );
    }
    assert_eq!(results["verdict"], "pass");

    // The fleet ran and was checked.
    assert_eq!(fleet["devices"], DEVICES, "{fleet}");
    assert_eq!(fleet["registered"], DEVICES, "every device registered");
    assert_eq!(fleet["connected"], DEVICES, "every device subscribed");
    assert_eq!(
        fleet["audited"], DEVICES,
        "the final state of every device was read"
    );
    let n = |k: &str| fleet[k].as_u64().unwrap_or(0);
    assert!(
        n("device_updates") > 0 && n("writer_updates") > 0,
        "{fleet}"
    );
    assert!(n("deliveries") > 0 && n("live_deliveries") > 0, "{fleet}");
    assert!(
        n("ops_checked") > 0,
        "the op-id audit vouched for writes: {fleet}"
    );
    assert!(
        fleet["delivery_p50_ms"].as_f64().unwrap_or(0.0) > 0.0,
        "{fleet}"
    );
    let violations = fleet["violations"].as_object().expect("violations by kind");
    assert_eq!(violations.len(), 5, "{fleet}");
    assert!(violations.values().all(|v| v == 0), "{fleet}");
    // The scenario's fault happened while the fleet ran.
    assert!(
        !results["faults"].as_array().expect("faults").is_empty(),
        "{results}"
    );

    // Beside the history, in the report, and read back by `check`.
    assert!(dir.join("fleet.json").is_file());
    let md = std::fs::read_to_string(dir.join("report.md")).expect("report.md");
    assert!(md.contains("## Fleet (tether-sim)"), "{md}");
    let check = Command::new(env!("CARGO_BIN_EXE_tether-chaos"))
        .arg("check")
        .arg(dir.join("history.jsonl"))
        .output()
        .expect("tether-chaos check");
    let stdout = String::from_utf8_lossy(&check.stdout);
    assert_eq!(check.status.code(), Some(0), "{stdout}");
    assert!(
        stdout.contains(&format!("fleet: {DEVICES} devices")),
        "{stdout}"
    );
}
