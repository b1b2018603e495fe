//! `tether-chaos check` through the built binary: a recorded history that holds every
//! property exits 0 and says PASS; one with a lost acknowledged write exits 1, says FAIL
//! and names the property and the operations; an unreadable history exits 2 naming the
//! line. The report lands in `--out`. A fleet summary (`fleet.json`) beside the history is
//! part of the verdict: a fleet violation fails an otherwise clean history, and
//! `results.json` and `report.md` name it.

use std::path::Path;
use std::process::Command;

use tether_chaos_tests::history::{Call, Entry, Fields, Observed, Outcome, Recorder};

fn fields(k: &str, v: u64) -> Fields {
    let mut f = Fields::new();
    f.insert(k.into(), serde_json::json!(v));
    f
}

/// Two writes and a read on one bucket; `lose` makes the final read miss the second write.
fn history(path: &Path, lose: bool) {
    let mut rec = Recorder::create(path).expect("create history");
    let bucket = "hot.s1".to_string();
    let shown = |version, ts, f: Fields| Outcome::Ok {
        outcome: None,
        states: vec![Observed {
            bucket: bucket.clone(),
            version,
            timestamp: ts,
            fields: Some(f),
        }],
        replayed: false,
    };
    let ack = |version, ts| Outcome::Ok {
        outcome: Some("applied".into()),
        states: vec![Observed {
            bucket: bucket.clone(),
            version,
            timestamp: ts,
            fields: None,
        }],
        replayed: false,
    };
    let read = Call::Read {
        buckets: vec![bucket.clone()],
        via: "lb".into(),
    };
    let write = |v: u64, base| Call::Write {
        bucket: bucket.clone(),
        fields: fields("a", v),
        base_version: base,
        occ: false,
        op_id: None,
        via: "node-1".into(),
    };
    let mut final_fields = fields("a", 2);
    if lose {
        final_fields = fields("a", 1);
    }
    let entries = vec![
        Entry::Start {
            scenario: "baseline".into(),
            seed: 99,
            wall_ms: 1_764_547_200_000,
        },
        Entry::Invoke {
            op: 1,
            client: 0,
            t_us: 0,
            call: read.clone(),
        },
        Entry::Complete {
            op: 1,
            t_us: 500,
            result: shown(1, 1000, Fields::new()),
        },
        Entry::Invoke {
            op: 2,
            client: 1,
            t_us: 1000,
            call: write(1, 1),
        },
        Entry::Complete {
            op: 2,
            t_us: 2000,
            result: ack(2, 1001),
        },
        Entry::Invoke {
            op: 3,
            client: 2,
            t_us: 1500,
            call: write(2, 1),
        },
        Entry::Complete {
            op: 3,
            t_us: 3000,
            result: ack(3, 1002),
        },
        Entry::End { t_us: 4000 },
        Entry::Invoke {
            op: 4,
            client: 0,
            t_us: 5000,
            call: read,
        },
        Entry::Complete {
            op: 4,
            t_us: 6000,
            result: shown(3, 1002, final_fields),
        },
    ];
    for e in &entries {
        rec.record(e).expect("record");
    }
}

fn run(args: &[&std::ffi::OsStr]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tether-chaos"))
        .args(args)
        .output()
        .expect("run tether-chaos");
    (
        out.status.code().expect("exit code"),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_passes_a_good_history_and_fails_a_lost_write_with_exit_codes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let good = dir.path().join("good.jsonl");
    let bad = dir.path().join("bad.jsonl");
    history(&good, false);
    history(&bad, true);

    let out_good = dir.path().join("report-good");
    let (code, stdout, stderr) = run(&[
        "check".as_ref(),
        good.as_os_str(),
        "--out".as_ref(),
        out_good.as_os_str(),
    ]);
    assert_eq!(code, 0, "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(stdout.starts_with("verdict: PASS"), "{stdout}");
    let results: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out_good.join("results.json")).expect("results.json"),
    )
    .expect("json");
    assert_eq!(results["verdict"], "pass");
    assert_eq!(results["scenario"], "baseline");
    assert_eq!(results["seed"], 99);
    for f in ["report.md", "timeline.png", "repro.sh"] {
        assert!(out_good.join(f).is_file(), "{f} written");
    }

    let (code, stdout, stderr) = run(&["check".as_ref(), bad.as_os_str()]);
    assert_eq!(code, 1, "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(stdout.starts_with("verdict: FAIL"), "{stdout}");
    assert!(
        stdout
            .lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>() == ["lost_writes", "1"]),
        "{stdout}"
    );
    assert!(
        stdout.contains("op 3"),
        "the example names the lost write: {stdout}"
    );
}

#[test]
fn check_exits_2_naming_the_line_of_a_broken_history() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("history.jsonl");
    history(&path, false);
    let mut text = std::fs::read_to_string(&path).expect("read");
    text.push_str("{\"type\":\"invoke\",\"op\":\n");
    std::fs::write(&path, text).expect("write");
    let (code, stdout, stderr) = run(&["check".as_ref(), path.as_os_str()]);
    assert_eq!(code, 2, "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(stderr.contains("history.jsonl:11:"), "{stderr}");
}

/// A fleet summary as the runner writes it beside the history, from a simulator report
/// with `violations`.
fn fleet_json(dir: &Path, violations: Vec<tether_sim::checker::Violation>) {
    use tether_chaos_tests::fleet::{self, FleetSummary};
    let report = tether_sim::report::Report {
        devices: 20,
        registered: 20,
        connected: 20,
        paired: 20,
        device_updates: 300,
        writer_updates: 250,
        deliveries: 240,
        audited: Some(20),
        violations,
        ..tether_sim::report::Report::default()
    };
    let summary = FleetSummary::of(&report, fleet::NOTIFY_DEADLINE, fleet::FAULT_RECOVERY);
    fleet::write(dir, &summary).expect("write fleet.json");
}

#[test]
fn check_fails_a_clean_history_whose_fleet_saw_violations_and_reports_them() {
    use tether_sim::checker::Violation;
    let dir = tempfile::tempdir().expect("tempdir");
    let history_path = dir.path().join("history.jsonl");
    history(&history_path, false);

    // A clean fleet beside a clean history: still a pass, the fleet in the results.
    fleet_json(dir.path(), Vec::new());
    let out = dir.path().join("report-clean");
    let (code, stdout, stderr) = run(&[
        "check".as_ref(),
        history_path.as_os_str(),
        "--out".as_ref(),
        out.as_os_str(),
    ]);
    assert_eq!(code, 0, "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(stdout.contains("fleet: 20 devices"), "{stdout}");
    let results: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("results.json")).expect("results.json"),
    )
    .expect("json");
    assert_eq!(results["verdict"], "pass");
    assert_eq!(results["fleet"]["updates_acked"], 550);
    assert_eq!(results["fleet"]["violations"]["missed_notification"], 0);

    // The same history, the fleet saw a late change and a lost write: FAIL, exit 1.
    fleet_json(
        dir.path(),
        vec![
            Violation::MissedNotification {
                device: "FLEET000003".into(),
                bucket: "shared.FLEET000003".into(),
                writer: "mode".into(),
                seq: 7,
                waited_ms: 5_200,
            },
            Violation::LostWrite {
                device: "FLEET000004".into(),
                bucket: "device.FLEET000004".into(),
                writer: "current_temperature".into(),
                seq: 12,
                found: Some(11),
            },
        ],
    );
    let out = dir.path().join("report-fleet");
    let (code, stdout, stderr) = run(&[
        "check".as_ref(),
        history_path.as_os_str(),
        "--out".as_ref(),
        out.as_os_str(),
    ]);
    assert_eq!(code, 1, "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(stdout.starts_with("verdict: FAIL"), "{stdout}");
    assert!(
        stdout.contains("lost_write 1") && stdout.contains("missed_notification 1"),
        "{stdout}"
    );
    let results: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("results.json")).expect("results.json"),
    )
    .expect("json");
    assert_eq!(results["verdict"], "fail");
    // The history's own properties all hold: the fleet alone failed the run.
    assert!(results["properties"]
        .as_object()
        .expect("properties")
        .values()
        .all(|n| n == 0));
    let fleet = &results["fleet"];
    assert_eq!(fleet["devices"], 20);
    assert_eq!(fleet["violations"]["missed_notification"], 1);
    assert_eq!(fleet["violations"]["lost_write"], 1);
    assert_eq!(fleet["violations"]["version_regression"], 0);
    assert!(fleet["delivery_p99_ms"].is_number(), "{fleet}");
    let md = std::fs::read_to_string(out.join("report.md")).expect("report.md");
    assert!(md.contains("## Fleet (tether-sim)"), "{md}");
    assert!(md.contains("fleet missed_notification = 1"), "{md}");
    assert!(md.contains("LOST WRITE: device FLEET000004"), "{md}");
}
