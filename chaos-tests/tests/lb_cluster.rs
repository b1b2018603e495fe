//! A Tether cluster behind a real load balancer, driven only through it.
//!
//! PostgreSQL + 3 nodes + HAProxy; the simulator (`tether_sim`) runs a fleet of devices on
//! many bucket sets — registering, holding subscribes, writing — with companions and two
//! app users, through HAProxy, while probes write to a few sets every 100 ms: sets the
//! ring places on the node that will be killed, and sets that move to the node that
//! joins. Mid-run a 4th node joins; later one of the original nodes is killed with
//! `kill -9`. The run must
//! show no violation (versions never go backwards, every change reaches its devices,
//! every acknowledged write is in the final state), forwarding must have happened, and
//! the joined node must own sets, and no device request may fail: requests for moving
//! sets wait inside the cluster, and HAProxy resends a request that was on the killed
//! node's connections when it is safe to send twice (reads, subscribes, writes with an
//! op id; `HAPROXY_RETRY_SAFE`). Timings (the failover gap, forwarding overhead) are
//! printed, never asserted.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use reqwest::header::AUTHORIZATION;
use reqwest::StatusCode;
use serde_json::{json, Value};
use tether_chaos_tests::{within, Cluster, ClusterOptions, REQUEST_DEADLINE};
use tether_proto::credentials::{basic_header, Credentials};
use tether_sim::fleet::{self, Phase, SimConfig};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

/// One cluster at a time: each test starts PostgreSQL, several nodes and HAProxy, and the
/// machine may have only two cores.
static ONE_CLUSTER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Simulated devices (each its own bucket set).
/// The field probes write into their `shared.<serial>` bucket (thermostat template).
const PROBE_FIELD: &str = "target_temperature";
const DEVICES: usize = 48;
/// Probe devices per kind (on the killed node; moving to the joined node).
const PROBES: usize = 4;
const PROBE_EVERY: Duration = Duration::from_millis(100);
/// Length of the simulator's load phase.
const LOAD: Duration = Duration::from_secs(24);
/// When the 4th node is started, from the start of the load.
const JOIN_AT: Duration = Duration::from_secs(4);
/// The earliest kill, from the start of the load (and at least [`SETTLE`] after the join).
const KILL_AT: Duration = Duration::from_secs(12);
const SETTLE: Duration = Duration::from_secs(4);
/// How long after the kill every probe set must have been served again.
const FAILOVER_DEADLINE: Duration = Duration::from_secs(60);
/// The original node that is killed (not n0, which later nodes join through).
const VICTIM: usize = 1;
/// The node that joins mid-run.
const JOINER: usize = 3;

// ---------------------------------------------------------------------------------------
// the probe: sequential writes to a few sets, timing every acknowledgement

#[derive(Debug, Clone, Copy)]
struct Ack {
    at: Instant,
    n: u64,
    version: u64,
}

#[derive(Debug, Default)]
struct ProbeLog {
    serial: String,
    acks: Vec<Ack>,
    /// 503 answers (ownership moving; the JSON error with Retry-After).
    unavailable: u64,
    /// Everything else that was not a 200, by kind.
    errors: BTreeMap<String, u64>,
}

impl ProbeLog {
    /// The gap between the last acknowledgement at or before `t` and the first after it
    /// (`None` if there is none after it).
    fn gap_around(&self, t: Instant) -> Option<Duration> {
        let next = self.acks.iter().position(|a| a.at > t)?;
        let prev = next.checked_sub(1).map_or(t, |p| self.acks[p].at);
        Some(self.acks[next].at - prev)
    }

    /// The longest gap between consecutive acknowledgements within `[from, to]`.
    fn longest_gap(&self, from: Instant, to: Instant) -> Duration {
        self.acks
            .windows(2)
            .filter(|w| w[1].at >= from && w[0].at <= to)
            .map(|w| w[1].at - w[0].at)
            .max()
            .unwrap_or_default()
    }
}

/// Writes `{"probe": n}` (n = 1, 2, …) to `shared.<serial>` through the load balancer every
/// [`PROBE_EVERY`] until `stop` says so (at most 3000 writes).
async fn probe(
    http: reqwest::Client,
    lb: String,
    serial: String,
    creds: Credentials,
    mut stop: watch::Receiver<bool>,
    last_ack: Arc<Mutex<Option<Instant>>>,
) -> ProbeLog {
    let url = format!("{lb}/v1/buckets/shared.{serial}");
    let mut log = ProbeLog {
        serial,
        ..ProbeLog::default()
    };
    let mut tick = tokio::time::interval(PROBE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for n in 1..=3000u64 {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => break,
        }
        let r = http
            .put(&url)
            .header(AUTHORIZATION, basic_header(&creds))
            .timeout(Duration::from_secs(5))
            // A field of the thermostat's template (a node refuses others).
            // With an op id: the load balancer may resend it to another node when the
            // node holding it dies, and the set applies it once.
            .json(&json!({
                "value": {PROBE_FIELD: n},
                "base_version": 0,
                "op_id": format!("{}-{n}", log.serial),
            }))
            .send()
            .await;
        match r {
            Ok(r) if r.status() == StatusCode::OK => {
                let at = Instant::now();
                match r.json::<Value>().await {
                    Ok(v) => match v["version"].as_u64() {
                        Some(version) => {
                            log.acks.push(Ack { at, n, version });
                            *last_ack.lock().unwrap_or_else(|p| p.into_inner()) = Some(at);
                        }
                        None => {
                            *log.errors
                                .entry(format!("200 without version: {v}"))
                                .or_default() += 1
                        }
                    },
                    Err(_) => *log.errors.entry("200 unreadable".into()).or_default() += 1,
                }
            }
            Ok(r) if r.status() == StatusCode::SERVICE_UNAVAILABLE => log.unavailable += 1,
            Ok(r) => {
                *log.errors
                    .entry(r.status().as_u16().to_string())
                    .or_default() += 1
            }
            Err(e) if e.is_timeout() => *log.errors.entry("timeout".into()).or_default() += 1,
            Err(_) => *log.errors.entry("transport".into()).or_default() += 1,
        }
    }
    log
}

/// `GET /v1/buckets/shared.<serial>` through the load balancer (retrying 503s): the probe
/// field of the stored value.
async fn stored_probe(cluster: &Cluster, serial: &str, creds: &Credentials) -> Option<u64> {
    let url = format!("{}/v1/buckets/shared.{serial}", cluster.lb_url());
    for _ in 0..50 {
        let r = within(
            REQUEST_DEADLINE,
            "read a probe bucket",
            cluster
                .http()
                .get(&url)
                .header(AUTHORIZATION, basic_header(creds))
                .send(),
        )
        .await;
        match r {
            Ok(r) if r.status() == StatusCode::OK => {
                let v: Value = r.json().await.expect("bucket JSON");
                return v["value"][PROBE_FIELD].as_u64();
            }
            Ok(r) if r.status() == StatusCode::SERVICE_UNAVAILABLE => {}
            Ok(r) => {
                let status = r.status();
                panic!("GET {url}: {status} {}", r.text().await.unwrap_or_default());
            }
            Err(e) => eprintln!("GET {url}: {e}; retrying"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("GET {url}: never answered with 200");
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_haproxy_a_join_and_a_kill9_fail_no_request_and_lose_no_write() {
    let _one = ONE_CLUSTER.lock().await;
    let mut opts = ClusterOptions::new(3, 4);
    opts.users = vec!["alice".into(), "bob".into()];
    let mut cluster = Cluster::start(opts).await;
    let lb = cluster.lb_url();

    // Probes: sets the 4-node ring places on the victim (their gap across the kill is the
    // failover time) and sets that move to the joining node; registered through the load
    // balancer before the fleet starts.
    let four = [0, 1, 2, JOINER];
    let pick = |owner: usize, prefix: &str| {
        (0..1000)
            .map(|n| format!("{prefix}{n:03}"))
            .filter(|serial| cluster.ring_owner(serial, &four) == owner)
            .take(PROBES)
            .collect::<Vec<_>>()
    };
    let on_victim = pick(VICTIM, "PRBKILL");
    let to_joiner = pick(JOINER, "PRBJOIN");
    let mut probe_creds = Vec::new();
    for serial in on_victim.iter().chain(&to_joiner) {
        let creds = cluster.register(serial).await;
        probe_creds.push((serial.clone(), creds));
    }
    let (stop_probes, stop_rx) = watch::channel(false);
    let last_acks: Vec<Arc<Mutex<Option<Instant>>>> =
        probe_creds.iter().map(|_| Arc::default()).collect();
    let probes: Vec<_> = probe_creds
        .iter()
        .zip(&last_acks)
        .map(|((serial, creds), last_ack)| {
            tokio::spawn(probe(
                cluster.http().clone(),
                lb.clone(),
                serial.clone(),
                creds.clone(),
                stop_rx.clone(),
                last_ack.clone(),
            ))
        })
        .collect();

    // The fleet, through the load balancer only.
    let (phase_tx, mut phases) = mpsc::unbounded_channel();
    let mut cfg = SimConfig::new(&lb, cluster.mfg_key().to_vec(), tether_chaos_tests::KEY_ID);
    cfg.devices = DEVICES;
    cfg.serial_prefix = "CHAOS".into();
    cfg.users = cluster.users().to_vec();
    cfg.update_rate = 0.5;
    cfg.companion_rate = 0.5;
    cfg.app_rate = 0.3;
    cfg.duration = LOAD;
    cfg.ramp = Duration::from_secs(2);
    cfg.setup_timeout = Duration::from_secs(60);
    // Generous: a device whose set's owner was killed is served again only after failure
    // detection (~5 s) and its resubscribe back-off.
    cfg.notify_deadline = Duration::from_secs(15);
    cfg.subscribe_timeout_ms = 20_000;
    cfg.request_timeout = Duration::from_secs(10);
    cfg.audit = true;
    cfg.phases = Some(phase_tx);
    cfg.seed = 7;
    let sim = tokio::spawn(fleet::run(cfg));

    // Faults, timed from the start of the load phase.
    let load_start = within(Duration::from_secs(120), "the fleet's setup", async {
        loop {
            match phases.recv().await {
                Some(Phase::Load) => return Instant::now(),
                Some(_) => {}
                None => panic!("the simulator ended before its load phase"),
            }
        }
    })
    .await;
    tokio::time::sleep_until(load_start + JOIN_AT).await;
    let join_started = Instant::now();
    let joined = cluster.add_node().await;
    assert_eq!(joined, JOINER, "the spare slot is the 4th node");
    let join_ready = Instant::now();
    eprintln!(
        "chaos: node {} joined at +{:.1} s (ready and up in HAProxy after {:.0} ms)",
        cluster.name(joined),
        (join_started - load_start).as_secs_f64(),
        ms(join_ready - join_started)
    );
    tokio::time::sleep_until((load_start + KILL_AT).max(join_ready + SETTLE)).await;
    let victim_owned = cluster.metric(VICTIM, "tether_owned_sets").await;
    let killed_at = Instant::now();
    cluster.kill9(VICTIM).await;
    eprintln!(
        "chaos: node {} killed with kill -9 at +{:.1} s",
        cluster.name(VICTIM),
        (killed_at - load_start).as_secs_f64()
    );

    let report = within(Duration::from_secs(240), "the simulator run", sim)
        .await
        .expect("simulator task")
        .expect("simulator run");

    // The probes go on until each has been served after the kill (failure detection, then
    // the new owner), or FAILOVER_DEADLINE after it: the behaviour is checked, not its
    // speed on two loaded cores (the failover time is printed below).
    let served_again = || {
        last_acks.iter().all(|a| {
            a.lock()
                .unwrap_or_else(|p| p.into_inner())
                .is_some_and(|at| at > killed_at)
        })
    };
    while !served_again() && Instant::now() < killed_at + FAILOVER_DEADLINE {
        tokio::time::sleep(PROBE_EVERY).await;
    }
    let _ = stop_probes.send(true);
    let mut logs = Vec::new();
    for p in probes {
        logs.push(
            within(Duration::from_secs(30), "probe ends", p)
                .await
                .expect("probe task"),
        );
    }

    // Final state of the probe sets.
    let mut probe_final = Vec::new();
    for (log, (serial, creds)) in logs.iter().zip(&probe_creds) {
        probe_final.push((
            log.acks.last().map(|a| a.n),
            stored_probe(&cluster, serial, creds).await,
        ));
    }

    // Metrics of the nodes still running.
    let forwarded = cluster.metric_sum("tether_forwarded_requests_total").await;
    let joined_owned = cluster.metric(joined, "tether_owned_sets").await;
    let mut per_node = String::new();
    for i in cluster.live_nodes() {
        let m = cluster.metrics(i).await;
        let v = |name: &str| tether_chaos_tests::metric_value(&m, name).unwrap_or(f64::NAN);
        per_node.push_str(&format!(
            "  {}: owned_sets {}, forwarded {}, forwarded_served {}, leases acquired {}, lost {}\n",
            cluster.name(i),
            v("tether_owned_sets"),
            v("tether_forwarded_requests_total"),
            v("tether_forwarded_served_total"),
            v("tether_leases_acquired_total"),
            v("tether_leases_lost_total"),
        ));
    }

    // ---- what happened (printed, never asserted) ----
    eprintln!("---- simulator report ----\n{}", report.human());
    let sim_503: u64 = report
        .errors
        .iter()
        .filter(|(k, _)| k.ends_with(" 503"))
        .map(|(_, n)| n)
        .sum();
    let probe_503: u64 = logs.iter().map(|l| l.unavailable).sum();
    let probe_acks: usize = logs.iter().map(|l| l.acks.len()).sum();
    let mut probe_errors: BTreeMap<String, u64> = BTreeMap::new();
    for l in &logs {
        for (k, n) in &l.errors {
            *probe_errors.entry(k.clone()).or_default() += n;
        }
    }
    eprintln!(
        "503 answers: {sim_503} to the simulator, {probe_503} to the probes ({probe_acks} probe writes acknowledged; other probe errors {probe_errors:?})"
    );
    let gaps = |serials: &[String], f: &dyn Fn(&ProbeLog) -> Option<Duration>| {
        let per: Vec<(String, Option<Duration>)> = logs
            .iter()
            .filter(|l| serials.contains(&l.serial))
            .map(|l| (l.serial.clone(), f(l)))
            .collect();
        let worst = per.iter().filter_map(|(_, g)| *g).max().unwrap_or_default();
        let text = per
            .iter()
            .map(|(s, g)| match g {
                Some(g) => format!("{s} {:.0} ms", ms(*g)),
                None => format!("{s} never again"),
            })
            .collect::<Vec<_>>()
            .join(", ");
        (worst, text)
    };
    let (failover, per_probe) = gaps(&on_victim, &|l| l.gap_around(killed_at));
    eprintln!(
        "failover: {:.0} ms (longest gap between acknowledged writes to sets {victim} owned, across its kill -9; \
         {victim} owned {victim_owned:?} sets; per probe: {per_probe})",
        ms(failover),
        victim = cluster.name(VICTIM),
    );
    let (others, per_probe) = gaps(&to_joiner, &|l| l.gap_around(killed_at));
    eprintln!(
        "  sets on other nodes across the kill: longest gap {:.0} ms ({per_probe})",
        ms(others)
    );
    let (join_gap, per_probe) = gaps(&to_joiner, &|l| {
        Some(l.longest_gap(join_started, join_ready + SETTLE))
    });
    eprintln!(
        "join: longest gap between acknowledged writes to sets moving to {}: {:.0} ms ({per_probe})",
        cluster.name(joined),
        ms(join_gap)
    );
    eprintln!(
        "metrics: forwarded requests (live nodes) {forwarded}; joined node {} owns {joined_owned:?} sets\n{per_node}",
        cluster.name(joined)
    );

    // ---- what must hold ----
    assert!(
        report.violations.is_empty(),
        "the simulator saw violations: {:#?}",
        report.violations
    );
    assert_eq!(report.registered, DEVICES as u64, "every device registered");
    assert_eq!(report.connected, DEVICES as u64, "every device subscribed");
    assert_eq!(
        report.paired, DEVICES as u64,
        "every device paired with an app"
    );
    assert!(
        report.device_updates > 0 && report.writer_updates > 0 && report.deliveries > 0,
        "the fleet wrote and was notified: {report:?}"
    );
    assert_eq!(
        report.audited,
        Some(DEVICES as u64),
        "the final state of every device was read and checked"
    );
    assert!(
        report.errors.is_empty(),
        "device requests failed through HAProxy across the join and the kill -9: {:?}",
        report.errors
    );
    assert!(
        probe_503 == 0 && probe_errors.is_empty(),
        "probe writes failed through HAProxy across the join and the kill -9: {probe_503} × 503, \
         others {probe_errors:?}"
    );
    for (log, (acked, stored)) in logs.iter().zip(&probe_final) {
        assert!(
            log.acks.windows(2).all(|w| w[0].version < w[1].version),
            "probe {}: acknowledged versions must increase: {:?}",
            log.serial,
            log.acks
                .iter()
                .map(|a| (a.n, a.version))
                .collect::<Vec<_>>()
        );
        if let Some(acked) = acked {
            assert!(
                stored.is_some_and(|s| s >= *acked),
                "probe {}: write #{acked} was acknowledged but the stored value holds {stored:?}",
                log.serial
            );
        }
        assert!(
            log.acks.iter().any(|a| a.at > killed_at),
            "probe {}: its set was never served again after {} was killed",
            log.serial,
            cluster.name(VICTIM)
        );
    }
    assert!(
        forwarded > 0.0,
        "no request was forwarded between nodes (tether_forwarded_requests_total summed over live nodes)"
    );
    assert!(
        joined_owned.is_some_and(|n| n > 0.0),
        "the joined node {} owns no set (tether_owned_sets = {joined_owned:?})",
        cluster.name(joined)
    );
}

// ---------------------------------------------------------------------------------------
// forwarding overhead

/// `PUT {"value": {"target_temperature": n}}` to `base`; its latency, retried (not timed)
/// on 503.
async fn timed_put(
    http: &reqwest::Client,
    base: &str,
    id: &str,
    creds: &Credentials,
    n: u64,
) -> Duration {
    for _ in 0..20 {
        let t = Instant::now();
        let r = within(
            REQUEST_DEADLINE,
            "PUT",
            http.put(format!("{base}/v1/buckets/{id}"))
                .header(AUTHORIZATION, basic_header(creds))
                .json(&json!({"value": {"target_temperature": n}, "base_version": 0}))
                .send(),
        )
        .await
        .expect("send PUT");
        let status = r.status();
        let _ = r.bytes().await;
        let took = t.elapsed();
        match status {
            StatusCode::OK => return took,
            StatusCode::SERVICE_UNAVAILABLE => tokio::time::sleep(Duration::from_millis(100)).await,
            other => panic!("PUT {id} to {base}: {other}"),
        }
    }
    panic!("PUT {id} to {base}: 503 twenty times");
}

fn percentile(sorted: &[Duration], p: usize) -> Duration {
    sorted[(sorted.len() * p / 100).min(sorted.len() - 1)]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_overhead_owner_vs_non_owner() {
    let _one = ONE_CLUSTER.lock().await;
    let cluster = Cluster::start(ClusterOptions::new(3, 3)).await;
    let serial = "FWD000001";
    let id = format!("shared.{serial}");
    let creds = cluster.register(serial).await;
    let http = cluster.http().clone();

    // The owner is the node that forwards nothing when the set is written through it.
    // Retried while the nodes' views of the ring converge.
    let mut owner = None;
    let mut tries = Vec::new();
    for _ in 0..20 {
        let mut deltas = Vec::new();
        for i in 0..3 {
            let before = cluster
                .metric(i, "tether_forwarded_requests_total")
                .await
                .unwrap_or(0.0);
            for n in 0..5 {
                timed_put(&http, &cluster.node_url(i, ""), &id, &creds, n).await;
            }
            let after = cluster
                .metric(i, "tether_forwarded_requests_total")
                .await
                .unwrap_or(0.0);
            deltas.push(after - before);
        }
        let idle: Vec<usize> = (0..3).filter(|&i| deltas[i] == 0.0).collect();
        if let [o] = idle[..] {
            if (0..3).filter(|&i| i != o).all(|i| deltas[i] >= 5.0) {
                owner = Some(o);
                break;
            }
        }
        tries.push(deltas);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let owner = owner.unwrap_or_else(|| {
        panic!("no single node serves {id} without forwarding; forwarded deltas per try: {tries:?}")
    });
    let other = (0..3).find(|&i| i != owner).expect("a non-owner");
    let (to_owner, to_other) = (cluster.node_url(owner, ""), cluster.node_url(other, ""));

    for n in 0..20 {
        timed_put(&http, &to_owner, &id, &creds, n).await;
        timed_put(&http, &to_other, &id, &creds, n).await;
    }
    let mut direct = Vec::new();
    let mut forwarded = Vec::new();
    for n in 0..300 {
        direct.push(timed_put(&http, &to_owner, &id, &creds, n).await);
        forwarded.push(timed_put(&http, &to_other, &id, &creds, n).await);
    }
    direct.sort();
    forwarded.sort();
    let (d50, d99) = (percentile(&direct, 50), percentile(&direct, 99));
    let (f50, f99) = (percentile(&forwarded, 50), percentile(&forwarded, 99));
    eprintln!(
        "forwarding overhead ({} PUTs each, sequential, one set): to the owner {} p50 {:.2} ms p99 {:.2} ms; \
         to a non-owner {} (forwarded over gRPC) p50 {:.2} ms p99 {:.2} ms; ratio p50 {:.2}x, p99 {:.2}x",
        direct.len(),
        cluster.name(owner),
        ms(d50),
        ms(d99),
        cluster.name(other),
        ms(f50),
        ms(f99),
        ms(f50) / ms(d50).max(1e-9),
        ms(f99) / ms(d99).max(1e-9),
    );
}
