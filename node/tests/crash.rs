//! Crash safety: every acknowledged write survives `kill -9` and a graceful shutdown
//! (SIGTERM) under load, and versions/timestamps never go backwards across the restart.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};
use tether_test_support::node::*;
use tokio::sync::Notify;

const DEVICES: usize = 4;
const SEQUENTIAL: u64 = 200;
const CONCURRENT_PER_BUCKET: u64 = 25;
/// Acknowledgements to collect in the last phase before pulling the plug mid-load.
const ACKS_BEFORE_KILL: usize = 40;
/// How the node is stopped under load, round by round, before it is restarted.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Stop {
    Kill9,
    /// The drain: queued writes committed and answered, later ones refused, exit 0.
    Sigterm,
}

/// Two kills (the second finds the embedded store's log reused since the restart), then a
/// drain under load (queued writes committed before the store closes).
const STOPS: [Stop; 3] = [Stop::Kill9, Stop::Kill9, Stop::Sigterm];

/// What the client was told about one bucket.
#[derive(Debug, Clone, Default)]
struct Known {
    /// Last acknowledged write: (seq, version, timestamp).
    acked: Option<(u64, u64, u64)>,
    /// A write whose answer never came (the node died under it): its seq.
    in_flight: Option<u64>,
}

fn fields(id: &str, seq: u64) -> Value {
    json!({"seq": seq, "note": format!("{id}#{seq}")})
}

/// One write, asserting it was applied on top of `base`; returns (version, timestamp).
async fn acked_write(p: &Principal, id: &str, seq: u64, base: u64) -> (u64, u64) {
    let (ts, v) = p.write(id, fields(id, seq), base).await;
    assert_eq!(v, base + 1, "{id}: versions step by one");
    (v, ts)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_kill_9_and_a_drain() {
    let data = tempfile::tempdir().expect("data dir");
    let mut node = Node::builder()
        .config(&thermostat_template(&["seq", "note", "after_restart"]))
        .data_dir(data.path())
        .start()
        .await;

    let serials: Vec<String> = (0..DEVICES).map(|i| format!("CRASH{i:03}")).collect();
    let mut buckets: Vec<(String, String)> = Vec::new(); // (serial, bucket id)
    for s in &serials {
        node.device(s).register_thermostat().await;
        for id in thermostat_buckets(s) {
            buckets.push((s.clone(), id));
        }
    }
    let mut known: HashMap<String, Known> = HashMap::new();
    let mut version: HashMap<String, u64> = buckets.iter().map(|(_, id)| (id.clone(), 1)).collect();
    let mut last_ts: HashMap<String, u64> = HashMap::new();
    let mut seq = 0u64;

    // Phase 1: sequential writes, round-robin over all buckets.
    for i in 0..SEQUENTIAL {
        let (serial, id) = &buckets[(i as usize) % buckets.len()];
        let p = node.device(serial);
        seq += 1;
        let base = version[id];
        let (v, ts) = acked_write(&p, id, seq, base).await;
        if let Some(prev) = last_ts.get(id) {
            assert!(ts >= *prev, "{id}: timestamp went backwards");
        }
        version.insert(id.clone(), v);
        last_ts.insert(id.clone(), ts);
        known.entry(id.clone()).or_default().acked = Some((seq, v, ts));
    }

    // Phase 2: one writer per bucket, all buckets at once.
    let tasks: Vec<_> = buckets
        .iter()
        .enumerate()
        .map(|(k, (serial, id))| {
            let p = node.device(serial);
            let id = id.clone();
            let mut base = version[&id];
            let first_seq = 10_000 * (k as u64 + 1);
            tokio::spawn(async move {
                let mut last = None;
                for j in 0..CONCURRENT_PER_BUCKET {
                    let s = first_seq + j;
                    let (v, ts) = acked_write(&p, &id, s, base).await;
                    base = v;
                    last = Some((s, v, ts));
                }
                (id, last.expect("wrote"))
            })
        })
        .collect();
    for t in tasks {
        let (id, (s, v, ts)) = within(Duration::from_secs(30), "phase 2 writers", t)
            .await
            .expect("writer task");
        assert!(ts >= last_ts[&id], "{id}: timestamp went backwards");
        version.insert(id.clone(), v);
        last_ts.insert(id.clone(), ts);
        known.entry(id).or_default().acked = Some((s, v, ts));
    }

    for (round, how) in STOPS.into_iter().enumerate() {
        // Phase 3: writers keep going; the node is stopped under load (`STOPS`), restarted
        // on the same data and checked.
        let acks = Arc::new(AtomicUsize::new(0));
        let enough = Arc::new(Notify::new());
        let stop = Arc::new(AtomicBool::new(false));
        let tasks: Vec<_> = buckets
            .iter()
            .enumerate()
            .map(|(k, (serial, id))| {
                let p = node.device_with(serial, http_client());
                let id = id.clone();
                let mut base = version[&id];
                let (acks, enough, stop) = (acks.clone(), enough.clone(), stop.clone());
                let first_seq = 1_000_000 * (k as u64 + 1) + 100_000 * round as u64;
                tokio::spawn(async move {
                    let mut k = Known::default();
                    for j in 0.. {
                        if stop.load(Ordering::SeqCst) {
                            break;
                        }
                        let s = first_seq + j;
                        let body = json!({"value": fields(&id, s), "base_version": base});
                        let res = tokio::time::timeout(
                            REQUEST_DEADLINE,
                            p.req(reqwest::Method::PUT, &format!("/v1/buckets/{id}"))
                                .json(&body)
                                .send(),
                        )
                        .await;
                        let r = match res {
                            Ok(Ok(r)) => r,
                            _ => {
                                k.in_flight = Some(s);
                                break;
                            }
                        };
                        let Ok(r) =
                            tokio::time::timeout(REQUEST_DEADLINE, Resp::read_checked(r)).await
                        else {
                            k.in_flight = Some(s);
                            break;
                        };
                        let Some(r) = r else {
                            k.in_flight = Some(s);
                            break;
                        };
                        // A draining node refuses what it will not commit any more.
                        if how == Stop::Sigterm && r.status == StatusCode::SERVICE_UNAVAILABLE {
                            k.in_flight = Some(s);
                            break;
                        }
                        assert_eq!(r.status, StatusCode::OK, "{id}: {}", r.text());
                        let v = r.json();
                        assert_eq!(v["outcome"], "applied", "{id}: {v}");
                        let ver = u64_of(&v, "version");
                        assert_eq!(ver, base + 1, "{id}: versions step by one");
                        base = ver;
                        k.acked = Some((s, ver, u64_of(&v, "timestamp")));
                        if acks.fetch_add(1, Ordering::SeqCst) + 1 == ACKS_BEFORE_KILL {
                            enough.notify_one();
                        }
                    }
                    (id, k)
                })
            })
            .collect();
        within(
            Duration::from_secs(30),
            "phase 3 acknowledgements",
            enough.notified(),
        )
        .await;
        match how {
            Stop::Kill9 => node.kill9().await,
            Stop::Sigterm => {
                node.sigterm().await;
                let status = node.wait_exit(Duration::from_secs(20)).await;
                assert!(
                    status.success(),
                    "exit after SIGTERM under load: {status:?}"
                );
            }
        }
        stop.store(true, Ordering::SeqCst);
        let mut interrupted = 0;
        for t in tasks {
            let (id, k) = within(Duration::from_secs(30), "phase 3 writers stop", t)
                .await
                .expect("writer task");
            interrupted += usize::from(k.in_flight.is_some());
            let entry = known.entry(id.clone()).or_default();
            if let Some((s, v, ts)) = k.acked {
                assert!(ts >= last_ts[&id], "{id}: timestamp went backwards");
                entry.acked = Some((s, v, ts));
            }
            entry.in_flight = k.in_flight;
        }
        assert!(
            interrupted > 0 || how == Stop::Sigterm,
            "the kill should have interrupted at least one write in flight"
        );
        let keyring = node.keyring();
        drop(node);

        // Restart on the same data directory (same manufacturing key, devices keep their
        // assigned credentials): every acknowledged write is there.
        node = Node::builder()
            .config(&thermostat_template(&["seq", "note", "after_restart"]))
            .data_dir(data.path())
            .keyring(keyring)
            .start()
            .await;
        let mut problems = Vec::new();
        for (serial, id) in &buckets {
            let p = node.device(serial);
            let b = p.bucket(id).await;
            let k = &known[id];
            let (s, v, ts) = k.acked.expect("every bucket has acknowledged writes");
            let got_v = u64_of(&b, "version");
            let got_ts = u64_of(&b, "timestamp");
            let got_seq = b["value"]["seq"].as_u64();
            if got_v < v {
                problems.push(format!(
                    "{id}: version {got_v} < last acknowledged {v} ({b})"
                ));
            }
            if got_ts < ts {
                problems.push(format!(
                    "{id}: timestamp {got_ts} < last acknowledged {ts} ({b})"
                ));
            }
            // The stored fields are those of the last acknowledged write, or — only if the
            // version moved past it — those of the single write in flight at the kill.
            let allowed: Vec<u64> = if got_v > v {
                [Some(s), k.in_flight].into_iter().flatten().collect()
            } else {
                vec![s]
            };
            match got_seq {
                Some(g) if allowed.contains(&g) => {
                    assert_eq!(b["value"], merged_expectation(&b, id, g), "{id}");
                }
                _ => problems.push(format!(
                    "{id}: seq {got_seq:?}, expected one of {allowed:?} (acked version {v}): {b}"
                )),
            }
        }
        assert!(
            problems.is_empty(),
            "acknowledged writes lost after stop {} ({how:?}):\n{}",
            round + 1,
            problems.join("\n")
        );

        // Versions keep increasing after the restart.
        for (serial, id) in &buckets {
            let p = node.device(serial);
            let b = p.bucket(id).await;
            let (v0, ts0) = (u64_of(&b, "version"), u64_of(&b, "timestamp"));
            let (ts1, v1) = p.write(id, json!({"after_restart": true}), v0).await;
            assert_eq!(v1, v0 + 1, "{id}: version after restart");
            assert!(ts1 >= ts0, "{id}: timestamp after restart went backwards");
            let b = p.bucket(id).await;
            assert_eq!(u64_of(&b, "version"), v1);
            assert_eq!(b["value"]["after_restart"], true);
            let seq = b["value"]["seq"].as_u64().expect("seq");
            version.insert(id.clone(), v1);
            last_ts.insert(id.clone(), ts1);
            known.insert(
                id.clone(),
                Known {
                    acked: Some((seq, v1, ts1)),
                    in_flight: None,
                },
            );
        }
    }
}

/// The stored value must carry exactly `fields(id, seq)` for the two written fields.
fn merged_expectation(stored: &Value, id: &str, seq: u64) -> Value {
    let mut v = stored["value"].as_object().expect("object value").clone();
    for (k, f) in obj(fields(id, seq)) {
        v.insert(k, f);
    }
    Value::Object(v)
}
