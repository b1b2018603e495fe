//! Render-then-execute: the chart's `ci/postgres.yaml` rendered by Helm and run as real
//! `tether` processes exactly as rendered (see the crate docs), under a simulated fleet
//! whose checker and audit must find nothing lost and no version going backwards.
//!
//! - `a_release_lives_through_rollout_scaling_and_a_killed_pod`: cold start of 3 (all at
//!   once), `helm test`, then under load: a rolling update of every pod, scale 3 → 5
//!   (what moves, and how long a moved set goes unserved, measured), scale 5 → 3, a pod
//!   force-deleted; every termination graceful (no SIGKILL at the grace period).
//! - `a_wrong_cluster_secret_is_refused_and_renewed_certificates_are_picked_up`: the TLS
//!   Secret renewed in place (served by every pod without a restart, and `helm test`
//!   passes with the new CA), a container crash (kubelet restarts it in the same pod), then
//!   a pod started with another cluster secret: never ready, never a member, never given a
//!   connection, until the Secret is fixed.
//!
//! Needs root (network namespaces), dnsmasq, PostgreSQL, skopeo and umoci; scripts/test
//! installs them. Longer variants: `HELM_EXECUTE_DEVICES`, `HELM_EXECUTE_SCALE_TO`.
//! Diagnosis: `HELM_EXECUTE_TRACE=1` prints every slow or failed read of the scale-up
//! watchers; `HELM_EXECUTE_KEEP_LOGS=DIR` keeps every container's output and pod events.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::json;
use tether_cluster::{NodeId, Ring};
use tether_helm_execute::cluster::{pem_der, Cluster};
use tether_node::routing::cluster::{ALONE_AFTER, VNODES};
use tether_proto::credentials::{
    basic_header, default_credentials, parse_set_credentials, Credentials,
};
use tether_sim::fleet::{self, Phase, SimConfig};
use tokio::sync::{mpsc, watch};

/// The machine's load average, printed with every measurement (timings here depend on it).
fn load() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A fleet running through the device Service until `stop` is sent.
struct Fleet {
    stop: watch::Sender<bool>,
    run: tokio::task::JoinHandle<anyhow::Result<tether_sim::report::Report>>,
    devices: usize,
    prefix: String,
}

async fn start_fleet(c: &Cluster, devices: usize, prefix: &str) -> Fleet {
    let (url, host, vip) = c.device_entry();
    let mut cfg = SimConfig::new(&url, c.info.mfg_key.clone(), &c.info.key_id);
    cfg.devices = devices;
    cfg.serial_prefix = prefix.to_string();
    cfg.ca_cert = c.info.tls_cert.clone();
    cfg.resolve = vec![(host, vip)];
    cfg.update_rate = 0.5;
    cfg.companion_rate = 0.5;
    cfg.duration = Duration::from_secs(900);
    cfg.ramp = Duration::from_secs(2);
    cfg.setup_timeout = Duration::from_secs(90);
    // A pod killed without warning is declared down after ~5 s, then its sets move.
    cfg.notify_deadline = Duration::from_secs(20);
    cfg.subscribe_timeout_ms = 20_000;
    cfg.request_timeout = Duration::from_secs(15);
    cfg.audit = true;
    let (stop, stop_rx) = watch::channel(false);
    cfg.stop_load = Some(stop_rx);
    let (phase_tx, mut phases) = mpsc::unbounded_channel();
    cfg.phases = Some(phase_tx);
    let run = tokio::spawn(fleet::run(cfg));
    loop {
        match tokio::time::timeout(Duration::from_secs(180), phases.recv()).await {
            Ok(Some(Phase::Load)) => break,
            Ok(Some(_)) => {}
            other => panic!(
                "the fleet never reached its load phase: {other:?}\n{}",
                c.report()
            ),
        }
    }
    Fleet {
        stop,
        run,
        devices,
        prefix: prefix.to_string(),
    }
}

impl Fleet {
    async fn finish(self, c: &Cluster) -> tether_sim::report::Report {
        let _ = self.stop.send(true);
        let report = tokio::time::timeout(Duration::from_secs(240), self.run)
            .await
            .expect("the fleet ends")
            .expect("fleet task")
            .expect("fleet run");
        println!("fleet:\n{}", report.human());
        assert!(
            report.ok(),
            "the checker found violations:\n{}\n{}",
            report.human(),
            c.report()
        );
        assert_eq!(
            report.registered as usize,
            self.devices,
            "{}",
            report.human()
        );
        assert_eq!(
            report.audited,
            Some(self.devices as u64),
            "the audit read every device's final state: {}",
            report.human()
        );
        report
    }

    fn set_keys(&self) -> Vec<String> {
        (0..self.devices)
            .map(|i| format!("{}{i:06}", self.prefix))
            .collect()
    }
}

/// Owner of each set on the nodes' own ring over `members`.
fn owners(sets: &[String], members: &[String]) -> BTreeMap<String, String> {
    let ring = Ring::new(members.iter().map(|m| NodeId::new(m.clone())), VNODES);
    sets.iter()
        .map(|s| {
            (
                s.clone(),
                ring.owner(s).expect("members").as_str().to_string(),
            )
        })
        .collect()
}

/// Devices of our own that read their bucket through the Service every 200 ms, recording
/// when each read succeeded: the longest gap per set is how long it went unserved.
struct Watchers {
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    successes: Arc<Mutex<BTreeMap<String, Vec<Instant>>>>,
}

async fn register(http: &reqwest::Client, url: &str, c: &Cluster, serial: &str) -> Credentials {
    let default =
        default_credentials(&c.info.mfg_key, serial, &c.info.key_id).expect("credentials");
    let body = json!({"device_id": serial, "device_type": "thermostat", "sw_version": "1.0.0"});
    for _ in 0..50 {
        let r = http
            .post(format!("{url}/v1/register"))
            .header("authorization", basic_header(&default))
            .json(&body)
            .send()
            .await;
        if let Ok(r) = r {
            if r.status() == StatusCode::OK {
                let h = r
                    .headers()
                    .get("x-tether-set-credentials")
                    .expect("credentials header");
                return parse_set_credentials(h.to_str().expect("ascii")).expect("credentials");
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!(
        "registering {serial} through the Service failed\n{}",
        c.report()
    );
}

async fn start_watchers(c: &Cluster, n: usize) -> Watchers {
    let (url, _, _) = c.device_entry();
    let http = c
        .device_client(c.info.tls_cert.as_ref().expect("TLS"))
        .expect("client");
    let (stop, stop_rx) = watch::channel(false);
    let successes = Arc::new(Mutex::new(BTreeMap::new()));
    let mut tasks = Vec::new();
    for i in 0..n {
        let serial = format!("WATCH{i:04}");
        let creds = register(&http, &url, c, &serial).await;
        let (http, url, successes, stop_rx) = (
            http.clone(),
            url.clone(),
            successes.clone(),
            stop_rx.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let path = format!("{url}/v1/buckets/device.{serial}");
            while !*stop_rx.borrow() {
                let sent = Instant::now();
                let r = http
                    .get(&path)
                    .header("authorization", basic_header(&creds))
                    .timeout(Duration::from_secs(5))
                    .send()
                    .await;
                let ok = r.as_ref().is_ok_and(|r| r.status() == StatusCode::OK);
                if std::env::var_os("HELM_EXECUTE_TRACE").is_some()
                    && (!ok || sent.elapsed() > Duration::from_millis(500))
                {
                    eprintln!(
                        "watch {serial}: {:?} after {:?}",
                        r.as_ref().map(|r| r.status()).map_err(|e| e.to_string()),
                        sent.elapsed()
                    );
                }
                if ok {
                    successes
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .entry(serial.clone())
                        .or_insert_with(Vec::new)
                        .push(Instant::now());
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }));
    }
    Watchers {
        stop,
        tasks,
        successes,
    }
}

impl Watchers {
    /// Longest gap between successful reads per set, within [from, to].
    async fn finish(self, from: Instant, to: Instant) -> BTreeMap<String, Duration> {
        let _ = self.stop.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
        let all = self
            .successes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        all.into_iter()
            .map(|(set, times)| {
                let mut inside: Vec<Instant> = times
                    .into_iter()
                    .filter(|t| *t >= from && *t <= to)
                    .collect();
                inside.insert(0, from);
                inside.push(to);
                let gap = inside
                    .windows(2)
                    .map(|w| w[1] - w[0])
                    .max()
                    .unwrap_or_default();
                (set, gap)
            })
            .collect()
    }
}

fn pids(c: &Cluster) -> BTreeMap<usize, Option<u32>> {
    c.pods().iter().map(|(o, p)| (*o, p.pid())).collect()
}

fn assert_graceful(c: &Cluster) {
    for (pod, t) in &c.terminations {
        assert!(
            t.graceful && t.code == Some(0),
            "{pod} did not drain within its grace period (SIGKILL or failure): {t:?}\n{}",
            c.report()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_release_lives_through_rollout_scaling_and_a_killed_pod() {
    let started = Instant::now();
    let mut c = Cluster::start("postgres", &json!({}))
        .await
        .expect("cold start");
    println!(
        "rendered by Helm SDK {}; set up (render, image, PostgreSQL, DNS) and cold start in \
         {:.1} s; the cold start alone ({} pods created at once until all ready): {:.1} s",
        c.rendered.helm_sdk,
        started.elapsed().as_secs_f64(),
        c.pods().len(),
        c.cold_start.as_secs_f64()
    );
    assert_eq!(c.pods().len(), 3);
    c.wait_members(3, Duration::from_secs(60))
        .await
        .expect("one cluster of 3");

    let (code, out) = c.helm_test().await.expect("helm test pod");
    assert_eq!(code, Some(0), "helm test failed:\n{out}");
    assert!(out.contains("all checks passed"), "{out}");

    let devices = env_usize("HELM_EXECUTE_DEVICES", 24);
    let fleet = start_fleet(&c, devices, "HX").await;

    // Rolling update of every pod (a new image tag: only the image and version labels
    // change), highest ordinal first, each new pod ready before the next goes.
    let t = Instant::now();
    let upgraded = c
        .render("postgres", &json!({"image": {"tag": "0.1.1"}}))
        .expect("render");
    let updated = c.upgrade(upgraded).await.expect("rolling update");
    assert_eq!(updated, vec![2, 1, 0]);
    c.wait_members(3, Duration::from_secs(60))
        .await
        .expect("3 members after the rollout");
    println!(
        "rolling update of 3 pods under load: {:.1} s",
        t.elapsed().as_secs_f64()
    );
    assert_graceful(&c);

    // Scale 3 → 5: the pod template is unchanged, so no running pod restarts; about 2/5 of
    // the sets move to the new pods.
    let scale_to = env_usize("HELM_EXECUTE_SCALE_TO", 5);
    let watchers = start_watchers(&c, 16).await;
    let before = pids(&c);
    let revision = c.template.revision.clone();
    let t = Instant::now();
    let bigger = c
        .render(
            "postgres",
            &json!({"image": {"tag": "0.1.1"}, "replicaCount": scale_to}),
        )
        .expect("render");
    let updated = c.upgrade(bigger).await.expect("scale up");
    assert!(updated.is_empty(), "scaling restarted pods {updated:?}");
    assert_eq!(
        c.template.revision, revision,
        "replicaCount changed the pod template"
    );
    for (o, pid) in &before {
        assert_eq!(
            c.pods()[o].pid(),
            *pid,
            "pod {o} was restarted by the scale-up"
        );
    }
    c.wait_members(scale_to, Duration::from_secs(60))
        .await
        .expect("members after scale-up");
    let scaled_up = t.elapsed();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let gaps = watchers.finish(t, Instant::now()).await;
    let names = |n: usize| (0..n).map(|i| c.pod_name(i)).collect::<Vec<_>>();
    let sim_sets = fleet.set_keys();
    let (o3, o5) = (
        owners(&sim_sets, &names(3)),
        owners(&sim_sets, &names(scale_to)),
    );
    let moved = sim_sets.iter().filter(|s| o3[*s] != o5[*s]).count();
    let watch_sets: Vec<String> = gaps.keys().cloned().collect();
    let (w3, w5) = (
        owners(&watch_sets, &names(3)),
        owners(&watch_sets, &names(scale_to)),
    );
    let mut moved_gaps: Vec<Duration> = watch_sets
        .iter()
        .filter(|s| w3[*s] != w5[*s])
        .map(|s| gaps[s])
        .collect();
    let mut kept_gaps: Vec<Duration> = watch_sets
        .iter()
        .filter(|s| w3[*s] == w5[*s])
        .map(|s| gaps[s])
        .collect();
    moved_gaps.sort();
    kept_gaps.sort();
    println!("load average: {}", load());
    println!(
        "scale 3 → {scale_to}: new pods ready and every pod seeing {scale_to} members in {:.1} s; \
         {moved} of {} fleet sets moved ({:.0}%, the ring's expectation {:.0}%); \
         longest unserved gap of a moved set {:?} (all moved: {:?}), of a set that stayed {:?}",
        scaled_up.as_secs_f64(),
        sim_sets.len(),
        100.0 * moved as f64 / sim_sets.len() as f64,
        100.0 * (scale_to - 3) as f64 / scale_to as f64,
        moved_gaps.last(),
        moved_gaps,
        kept_gaps.last(),
    );
    assert!(
        moved > 0 && moved < sim_sets.len(),
        "some sets move, not all"
    );

    // Scale back to 3: the two highest ordinals drain (at once, Parallel) and their sets
    // move back.
    let t = Instant::now();
    let smaller = c
        .render(
            "postgres",
            &json!({"image": {"tag": "0.1.1"}, "replicaCount": 3}),
        )
        .expect("render");
    let updated = c.upgrade(smaller).await.expect("scale down");
    assert!(updated.is_empty());
    c.wait_members(3, Duration::from_secs(60))
        .await
        .expect("3 members after scale-down");
    println!("scale {scale_to} → 3: {:.1} s", t.elapsed().as_secs_f64());
    assert_graceful(&c);

    // A pod force-deleted (SIGKILL, no drain): the controller recreates it with a new IP,
    // the others declare the old one down, and it rejoins under its own name.
    let t = Instant::now();
    let old_ip = c.pods()[&1].ip();
    c.force_delete_pod(1).await.expect("force delete");
    assert_ne!(c.pods()[&1].ip(), old_ip, "a new pod, a new IP");
    c.wait_members(3, Duration::from_secs(60))
        .await
        .expect("3 members after the kill");
    println!(
        "pod force-deleted and back as a member: {:.1} s",
        t.elapsed().as_secs_f64()
    );

    let report = fleet.finish(&c).await;
    assert!(report.device_updates + report.writer_updates > 0);
    assert_graceful(&c);
    let connections = c.endpoints.connections();
    println!("device Service connections per pod: {connections:?}");
    println!(
        "whole scenario: {:.1} s (load average {})",
        started.elapsed().as_secs_f64(),
        load()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_wrong_cluster_secret_is_refused_and_renewed_certificates_are_picked_up() {
    let mut c = Cluster::start("postgres", &json!({}))
        .await
        .expect("cold start");
    c.wait_members(3, Duration::from_secs(60))
        .await
        .expect("one cluster of 3");

    // The TLS Secret is renewed in place (cert-manager does this): kubelet swaps the files,
    // nobody signals anyone, and every pod serves the new certificate without a restart.
    let before = pids(&c);
    let old = pem_der(c.info.tls_cert.as_ref().expect("TLS")).expect("old cert");
    let new_pem = c.rotate_certificate("renewed").await.expect("rotate");
    let new = pem_der(&new_pem).expect("new cert");
    assert_ne!(old, new);
    let t = Instant::now();
    for o in 0..3 {
        loop {
            let served = c.served_certificate(o).await.expect("TLS handshake");
            if served == new {
                break;
            }
            assert_eq!(served, old, "pod {o} serves something else");
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "pod {o} still serves the old certificate\n{}",
                c.report()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    println!(
        "renewed certificate served by every pod {:.1} s after the Secret changed",
        t.elapsed().as_secs_f64()
    );
    assert_eq!(pids(&c), before, "no pod restarted");
    assert!(c.pods().values().all(|p| p.restarts() == 0));
    let (url, _, _) = c.device_entry();
    let r = c
        .device_client(&new_pem)
        .expect("client")
        .get(format!("{url}/healthz"))
        .send()
        .await
        .expect("a device trusting only the new certificate gets through the Service");
    assert_eq!(r.status(), StatusCode::OK);
    let (code, out) = c.helm_test().await.expect("helm test pod");
    assert_eq!(
        code,
        Some(0),
        "helm test with the renewed CA failed:\n{out}"
    );

    // The container of pod 1 crashes (SIGKILL): kubelet restarts it in the same pod (same
    // IP and name), the startup and readiness probes pass again, it rejoins.
    let ip = c.pods()[&1].ip();
    c.pods()[&1].crash();
    let t = Instant::now();
    while c.pods()[&1].restarts() == 0 || !c.pods()[&1].ready() {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the crashed container did not come back\n{}",
            c.report()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(c.pods()[&1].ip(), ip);
    c.wait_members(3, Duration::from_secs(60))
        .await
        .expect("3 members after the restart");
    println!(
        "a crashed container restarted by kubelet and ready again in {:.1} s",
        t.elapsed().as_secs_f64()
    );

    // Someone edits the cluster Secret, and a pod restarts with the wrong value.
    let (secret, key) = c
        .template
        .mounts
        .iter()
        .find(|m| m.path == "/etc/tether/cluster")
        .and_then(|m| match c.template.volumes.get(&m.volume) {
            Some(tether_helm_execute::pod::Source::Secret { name, items, .. }) => {
                Some((name.clone(), items[0].0.clone()))
            }
            _ => None,
        })
        .expect("the cluster secret volume");
    let good = c.objects.secrets.lock().expect("lock")[&secret][&key].clone();
    c.objects
        .set_secret(&secret, &key, "not-the-cluster-secret-0123456789");
    let t = c.recreate_pod(2).await.expect("recreate");
    assert!(t.graceful);
    let conns_before = c
        .endpoints
        .connections()
        .get(&c.pod_name(2))
        .copied()
        .unwrap_or(0);
    let watch_until = Instant::now() + ALONE_AFTER + Duration::from_secs(5);
    let mut device_ok = 0;
    let http = c.device_client(&new_pem).expect("client");
    while Instant::now() < watch_until {
        assert!(
            !c.pods()[&2].ready(),
            "the pod with another cluster secret became ready\n{}",
            c.report()
        );
        // The others keep serving devices through the Service.
        if let Ok(r) = http.get(format!("{url}/readyz")).send().await {
            assert_eq!(r.status(), StatusCode::OK);
            device_ok += 1;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(device_ok > 0);
    for o in [0, 1] {
        let (status, body) = c.pod_get(o, "/readyz").await.expect("readyz");
        assert_eq!(
            (status, body["members"].as_u64()),
            (200, Some(2)),
            "pod {o} admitted the intruder? {body}"
        );
    }
    let (status, body) = c
        .pod_get(2, "/readyz")
        .await
        .expect("readyz of the refused pod");
    assert_eq!(status, 503, "{body}");
    assert!(
        c.pods()[&2]
            .logs(1_000_000)
            .contains("refused by the cluster"),
        "{}",
        c.pods()[&2].logs(4000)
    );
    assert_eq!(
        c.endpoints
            .connections()
            .get(&c.pod_name(2))
            .copied()
            .unwrap_or(0),
        conns_before,
        "the Service gave the unready pod connections"
    );
    println!("a pod with another cluster secret: refused, never ready, no traffic for {ALONE_AFTER:?} + 5 s");

    // The Secret fixed, the pod restarted: it joins.
    c.objects.set_secret(&secret, &key, good);
    c.recreate_pod(2).await.expect("recreate");
    c.wait_ready(&[2]).await.expect("ready again");
    c.wait_members(3, Duration::from_secs(60))
        .await
        .expect("3 members again");
    assert_graceful(&c);
}
