//! `tether-chaos check` through the built binary: a recorded history that holds every
//! property exits 0 and says PASS; one with a lost acknowledged write exits 1, says FAIL
//! and names the property and the operations; an unreadable history exits 2 naming the
//! line. The report lands in `--out`.

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
