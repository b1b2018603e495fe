//! A node's clock stepped hours off (issue 12: "the HLC refuses to run more than a
//! bounded offset ahead of the store's", ARCHITECTURE.md invariant 29), black-box:
//! PostgreSQL and three real `tether` nodes, each under libfaketime with a wall-clock
//! offset file of its own (the monotonic clock left real, as a stepped NTP clock would).
//!
//! One node's clock jumps an hour ahead, later an hour behind. Writes to the sets it owns —
//! sent to it directly, and forwarded to it by another node — must still carry
//! timestamps near the true time (the store's clock): a node further than
//! `--max-clock-offset-ms` from the store stamps by the store's clock. Without the bound
//! its writes are stamped an hour ahead, and every later owner's hybrid clock would carry
//! that hour on. The node reports the offset it sees (`tether_clock_offset_seconds`), and
//! a bucket's timestamps never go backwards.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use reqwest::header::AUTHORIZATION;
use reqwest::StatusCode;
use serde_json::{json, Value};
use tether_chaos_tests::{within, Cluster, ClusterOptions, REQUEST_DEADLINE};
use tether_proto::credentials::{basic_header, Credentials};

/// The node whose clock is stepped.
const STEPPED: usize = 1;
/// An hour, the step.
const HOUR_S: i64 = 3600;
/// How far from the true time a timestamp may be: far above the bound (500 ms) and a
/// loaded machine's delays, far below the step.
const SLACK_MS: i64 = 60_000;

fn real_now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// PUT one field through `base`; the answer's timestamp (retrying 503s for 20 s).
async fn put(http: &reqwest::Client, base: &str, serial: &str, creds: &Credentials, n: u64) -> i64 {
    let url = format!("{base}/v1/buckets/shared.{serial}");
    let mut last = String::new();
    for _ in 0..40 {
        let r = within(
            REQUEST_DEADLINE,
            "PUT a bucket",
            http.put(&url)
                .header(AUTHORIZATION, basic_header(creds))
                .json(
                    &json!({"value": {"target_temperature": n}, "base_version": 0,
                              "op_id": format!("clock-{serial}-{n}")}),
                )
                .send(),
        )
        .await
        .unwrap_or_else(|e| panic!("PUT {url}: {e}"));
        let status = r.status();
        let body: Value = r.json().await.unwrap_or(Value::Null);
        if status == StatusCode::OK {
            return body["timestamp"]
                .as_i64()
                .unwrap_or_else(|| panic!("PUT {url}: no timestamp in {body}"));
        }
        assert_eq!(
            status,
            StatusCode::SERVICE_UNAVAILABLE,
            "PUT {url}: {status} {body}"
        );
        last = body.to_string();
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    panic!("PUT {url}: still 503 after 20 s: {last}");
}

/// Waits (20 s at most) until node `i` reports a clock offset satisfying `ok`: the value,
/// or what went wrong.
async fn wait_offset(
    cluster: &Cluster,
    i: usize,
    what: &str,
    ok: impl Fn(f64) -> bool,
) -> Result<f64, String> {
    let mut seen = None;
    for _ in 0..40 {
        seen = cluster.metric(i, "tether_clock_offset_seconds").await;
        if let Some(v) = seen.filter(|v| ok(*v)) {
            return Ok(v);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Err(format!(
        "{}: tether_clock_offset_seconds {seen:?} after 20 s, expected {what}",
        cluster.name(i)
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_clock_was_stepped_an_hour_stamps_writes_by_the_stores_clock() {
    let mut opts = ClusterOptions::new(3, 3);
    opts.faketime = true;
    let cluster = Cluster::start(opts).await;
    let http = cluster.http().clone();
    let all = [0, 1, 2];
    // Two devices whose sets the stepped node owns.
    let serials: Vec<String> = (0..1000)
        .map(|n| format!("CLOCK{n:03}"))
        .filter(|s| cluster.ring_owner(s, &all) == STEPPED)
        .take(2)
        .collect();
    let mut devices = Vec::new();
    for s in &serials {
        devices.push((s.clone(), cluster.register(s).await));
    }
    let direct = cluster.node_url(STEPPED, "");
    let forwarded = cluster.node_url(0, "");
    let mut n = 0u64;
    let mut unreported = Vec::new();
    let mut last_ts = vec![0i64; devices.len()];
    // Every write's timestamp is near the true time and after the bucket's previous one.
    let mut check = |phase: &str, via: &str, d: usize, ts: i64| {
        let off = ts - real_now_ms();
        assert!(
            off.abs() < SLACK_MS,
            "{phase}: a write to {} through {via} was stamped {:.1} s off the true time \
             ({} stamps by its own clock)",
            devices[d].0,
            off as f64 / 1000.0,
            cluster.name(STEPPED)
        );
        assert!(
            ts >= last_ts[d],
            "{phase}: {}'s timestamp went backwards: {} after {}",
            devices[d].0,
            ts,
            last_ts[d]
        );
        last_ts[d] = ts;
    };

    for (phase, offset_s) in [
        ("in step", 0),
        ("an hour ahead", HOUR_S),
        ("an hour behind", -HOUR_S),
    ] {
        cluster
            .set_clock_offset(STEPPED, offset_s)
            .expect("set the stepped node's clock offset");
        // The node sees the step (libfaketime reads the file within a second, the node
        // reads the store's clock every second). A node that never reports it fails the
        // test at the end, after its writes were checked.
        let want = offset_s as f64;
        match wait_offset(&cluster, STEPPED, &format!("≈ {want} s"), |v| {
            (v - want).abs() < 30.0
        })
        .await
        {
            Ok(seen) => eprintln!(
                "{phase}: {} reports a clock offset of {seen:.1} s",
                cluster.name(STEPPED)
            ),
            Err(e) => {
                eprintln!("{phase}: {e}");
                unreported.push(e);
            }
        }
        for (d, (serial, creds)) in devices.iter().enumerate() {
            for via in [&direct, &forwarded] {
                n += 1;
                let ts = put(&http, via, serial, creds, n).await;
                check(phase, via, d, ts);
            }
        }
    }
    // The others never saw a step of their own.
    for i in [0, 2] {
        if let Err(e) = wait_offset(&cluster, i, "≈ 0 s", |v| v.abs() < 30.0).await {
            unreported.push(e);
        }
    }
    assert!(
        unreported.is_empty(),
        "clock offsets not reported: {unreported:#?}"
    );
}
