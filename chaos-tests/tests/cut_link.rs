//! One cut link between two members (chaos defect 10, the `majorities-ring` scenario),
//! black-box: PostgreSQL, three real `tether` nodes each in a network namespace of its
//! own, nftables dropping everything between node 0 and node 1 while both still reach
//! node 2 (and gossip, through node 2's indirect probes, keeps all three in every view).
//!
//! Before the fix a request reaching node 0 for a set node 1 owns hung on the dead link
//! until the router's 5 s deadline and failed (in the chaos run throughput fell from ~140
//! to ~10 requests/s for every cut). Now the forwarding node notices the link is down
//! (a call that cannot be made, or a read not answered within the hedge) and relays
//! through node 2. The test asserts, while the link is cut:
//!
//! - every read and write sent to node 0 for node 1's sets (and to node 1 for node 0's)
//!   is answered 200, and the writes are on the owner;
//! - a subscription held through node 0 on a set of node 1 is answered by a write made on
//!   node 1;
//! - both nodes stay ready (each sees a majority);
//!
//! and after the heal, that the direct link is used again (no more relayed calls).

use std::collections::BTreeMap;
use std::time::Duration;

use reqwest::header::AUTHORIZATION;
use reqwest::StatusCode;
use serde_json::{json, Value};
use tether_chaos_tests::{
    answer, get_shared, put_shared, within, Cluster, ClusterOptions, REQUEST_DEADLINE,
};
use tether_proto::credentials::{basic_header, Credentials};
use tokio::time::Instant;

const TABLE: &str = "t12cut";
/// Sets wanted on each of the two cut nodes.
const PER_NODE: usize = 3;
/// How long the prober keeps asking across the cut.
const CUT_FOR: Duration = Duration::from_secs(12);

/// `nft -f -` in node `i`'s namespace.
async fn nft(cluster: &Cluster, i: usize, rules: &str) {
    if let Err(e) = cluster.nft(i, rules).await {
        panic!("{e}");
    }
}

/// The sum of `tether_forwarded_requests_total` series of node `i` with `result`.
async fn forwarded(cluster: &Cluster, i: usize, result: &str) -> f64 {
    let needle = format!("result=\"{result}\"");
    cluster
        .metrics(i)
        .await
        .lines()
        .filter(|l| l.starts_with("tether_forwarded_requests_total{") && l.contains(&needle))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_link_between_two_members_is_routed_around() {
    let mut opts = ClusterOptions::new(3, 3);
    opts.namespaces = true;
    let cluster = Cluster::start(opts).await;
    let http = cluster.http().clone();

    // Devices whose sets node 0 and node 1 own, each written once (so each has a lease).
    let mut owned: BTreeMap<usize, Vec<(String, Credentials)>> = BTreeMap::new();
    for n in 0.. {
        if owned.get(&0).map_or(0, Vec::len) >= PER_NODE
            && owned.get(&1).map_or(0, Vec::len) >= PER_NODE
        {
            break;
        }
        let serial = format!("CUT{n:06}");
        let owner = cluster.ring_owner(&serial, &[0, 1, 2]);
        if owner == 2 || owned.get(&owner).map_or(0, Vec::len) >= PER_NODE {
            continue;
        }
        let creds = cluster.register(&serial).await;
        let (status, body) =
            put_shared(&http, &cluster.node_url(owner, ""), &serial, &creds, 1).await;
        assert_eq!(status, StatusCode::OK, "first write of {serial}: {body}");
        owned.entry(owner).or_default().push((serial, creds));
    }
    // Each node has already talked to the other (so the cut leaves a live connection to
    // hang on, the hard case): a forwarded read both ways.
    for (from, to) in [(0, 1), (1, 0)] {
        let (serial, creds) = &owned[&to][0];
        let (status, body) = get_shared(&http, &cluster.node_url(from, ""), serial, creds).await;
        assert_eq!(
            status,
            StatusCode::OK,
            "forwarded read before the cut: {body}"
        );
    }

    // Cut node 0 from node 1 (both ways), nothing else.
    let other = cluster.host(1);
    nft(
        &cluster,
        0,
        &format!(
            "table inet {TABLE} {{
  chain input {{ type filter hook input priority 0; policy accept; ip saddr {other} drop; }}
  chain output {{ type filter hook output priority 0; policy accept; ip daddr {other} drop; }}
}}
"
        ),
    )
    .await;
    let cut = Instant::now();

    // A subscription held through node 0 on a set of node 1, answered by a write on node 1.
    let (sub_serial, sub_creds) = owned[&1][0].clone();
    let (status, bucket) =
        get_shared(&http, &cluster.node_url(1, ""), &sub_serial, &sub_creds).await;
    assert_eq!(status, StatusCode::OK, "{bucket}");
    let held = {
        let http = http.clone();
        let url = cluster.node_url(0, "/v1/subscribe");
        let body = json!({"buckets": [{"id": format!("shared.{sub_serial}"),
            "timestamp": bucket["timestamp"], "version": bucket["version"]}],
            "timeout_ms": 30_000});
        let creds = sub_creds.clone();
        tokio::spawn(async move {
            answer(
                http.post(url)
                    .header(AUTHORIZATION, basic_header(&creds))
                    .json(&body)
                    .timeout(Duration::from_secs(40)),
            )
            .await
        })
    };

    // Reads, then writes, across the cut for CUT_FOR: node 0 for node 1's sets and the
    // other way round. Every answer is kept.
    let mut answers: Vec<(Duration, &'static str, String, StatusCode, Value)> = Vec::new();
    let mut round = 1;
    while cut.elapsed() < CUT_FOR {
        round += 1;
        for (from, to) in [(0, 1), (1, 0)] {
            let base = cluster.node_url(from, "");
            for (serial, creds) in &owned[&to] {
                let sent = cut.elapsed();
                let (status, body) = get_shared(&http, &base, serial, creds).await;
                answers.push((sent, "GET", serial.clone(), status, body));
            }
            for (serial, creds) in &owned[&to] {
                let sent = cut.elapsed();
                let (status, body) = put_shared(&http, &base, serial, creds, round).await;
                answers.push((sent, "PUT", serial.clone(), status, body));
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let failed: Vec<_> = answers
        .iter()
        .filter(|(_, _, _, status, _)| *status != StatusCode::OK)
        .collect();
    assert!(
        failed.is_empty(),
        "{} of {} requests across the cut link failed: {failed:?}\nnode 0 stderr:\n{}",
        failed.len(),
        answers.len(),
        cluster.stderr_tail(0)
    );
    let slowest = answers
        .windows(2)
        .map(|w| w[1].0.saturating_sub(w[0].0))
        .max()
        .unwrap_or_default();

    // Every write is on its owner: the last round's value.
    for (owner, devices) in &owned {
        for (serial, creds) in devices {
            let (status, body) =
                get_shared(&http, &cluster.node_url(*owner, ""), serial, creds).await;
            assert_eq!(status, StatusCode::OK, "{body}");
            assert_eq!(
                body["value"]["target_temperature"],
                json!(round),
                "shared.{serial} on its owner after the writes across the cut: {body}"
            );
        }
    }
    // The held subscription was answered with the write (made on the owner, node 1, by
    // the round above).
    let (status, answer) = within(Duration::from_secs(40), "the held subscription", held)
        .await
        .expect("subscriber task");
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(
        answer["buckets"][0]["id"],
        json!(format!("shared.{sub_serial}")),
        "the subscription held through node 0 saw the write on node 1: {answer}"
    );
    // Both cut nodes stay ready: each still sees a majority.
    for i in [0, 1] {
        let r = within(
            REQUEST_DEADLINE,
            "GET /readyz",
            http.get(cluster.node_url(i, "/readyz")).send(),
        )
        .await
        .expect("GET /readyz");
        assert_eq!(
            r.status(),
            StatusCode::OK,
            "{} /readyz while the link is cut",
            cluster.name(i)
        );
    }
    let relayed = forwarded(&cluster, 0, "relayed").await + forwarded(&cluster, 1, "relayed").await;
    assert!(relayed > 0.0, "nothing was relayed, yet the link was cut");

    // Heal: the direct link is found up again and used (relayed calls stop).
    nft(&cluster, 0, &format!("delete table inet {TABLE}\n")).await;
    let healed = Instant::now();
    let up_after = loop {
        if forwarded(&cluster, 0, "up").await >= 1.0 && forwarded(&cluster, 1, "up").await >= 1.0 {
            break healed.elapsed();
        }
        assert!(
            healed.elapsed() < Duration::from_secs(20),
            "the direct link not used again {:?} after the heal",
            healed.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let before = forwarded(&cluster, 0, "relayed").await;
    for (serial, creds) in &owned[&1] {
        let (status, body) = get_shared(&http, &cluster.node_url(0, ""), serial, creds).await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    assert_eq!(
        forwarded(&cluster, 0, "relayed").await,
        before,
        "reads after the heal still went through a relay"
    );
    eprintln!(
        "cut link: {} requests across the cut in {:?}, all answered (longest gap between \
         two sends {slowest:?}); {relayed} relayed calls; direct link up {up_after:?} after \
         the heal",
        answers.len(),
        CUT_FOR
    );
}
