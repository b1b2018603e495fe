//! Peers side by side: the same workload against Tether, etcd and mosquitto.
//!
//! Workload: `keys` keys, `subs` subscribers per key (each its own subscription: a held
//! long-poll for Tether, one streaming subscribe for "tether-stream" (`"stream": true`, one
//! line per notification on a single response), a watch for etcd, an MQTT subscription on
//! its own connection for mosquitto). Writers write values carrying their send time; every subscriber records
//! update → notify latency from that stamp. Two phases per system:
//! - **fixed rate**: `rate` updates/s in total from 8 writers (each sequential, keys
//!   round-robin), for the latency comparison;
//! - **saturated**: `writers` writers, each sending its next update as soon as the last
//!   one is acknowledged, for the throughput comparison.
//!
//! Acknowledged means: Tether answered the PUT (after the durable commit); etcd answered
//! the put (after the raft commit and its WAL fsync); mosquitto sent PUBACK for a QoS 1
//! retained publish (before any disk write: its persistence is a periodic snapshot).
//! Tether notifications coalesce (a held subscribe answers with the latest version), etcd
//! watches and MQTT QoS 1 subscriptions deliver every update: the number of notifications
//! per update is reported next to the latency.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use hdrhistogram::Histogram;
use reqwest::header::AUTHORIZATION;
use rumqttc::{AsyncClient, Event as MqttEvent, MqttOptions, Packet, QoS};
use serde::Serialize;
use serde_json::{json, Value};
use tether_proto::api::{BucketList, UpdateResponse};
use tether_proto::credentials::basic_header;
use tokio::task::JoinSet;

use super::plot::{self, Panel};
use super::{now_utc, procs, ratio, tether, write_json, Machine, Spread};
use crate::report::{latency_histogram, LatencySummary};

/// Writers of the fixed-rate phase.
const FIXED_WRITERS: usize = 8;

/// Options of `tether-bench peers`.
#[derive(Debug, Clone)]
pub struct Opts {
    /// The `tether` binary.
    pub tether_bin: PathBuf,
    /// Repetitions.
    pub runs: usize,
    /// Keys (Tether buckets, etcd keys, MQTT topics).
    pub keys: usize,
    /// Subscribers per key.
    pub subs: usize,
    /// Total updates per second of the fixed-rate phase.
    pub rate: f64,
    /// Writers of the saturated phase.
    pub writers: usize,
    /// Seconds per phase.
    pub secs: f64,
    /// Which systems (`tether`, `tether-stream`, `etcd`, `mosquitto`).
    pub systems: Vec<String>,
    /// Where results go.
    pub out: PathBuf,
}

/// One phase of one system.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PhaseResult {
    /// Acknowledged updates per second.
    pub updates_per_s: f64,
    /// Update → notify latency over all subscribers.
    pub latency: LatencySummary,
    /// Notifications received per acknowledged update (≤ subs when coalescing).
    pub notifications_per_update: f64,
    /// Failed writes.
    pub write_errors: u64,
}

/// One system in one run.
#[derive(Debug, Clone, Serialize)]
pub struct SystemResult {
    /// `tether`, `etcd` or `mosquitto`.
    pub system: String,
    /// The fixed-rate phase.
    pub fixed: PhaseResult,
    /// The saturated phase.
    pub saturated: PhaseResult,
}

fn base() -> Instant {
    static BASE: OnceLock<Instant> = OnceLock::new();
    *BASE.get_or_init(Instant::now)
}

fn now_us() -> u64 {
    u64::try_from(base().elapsed().as_micros()).unwrap_or(u64::MAX)
}

/// Collects notifications by the phase their write was sent in.
#[derive(Debug)]
struct Recorder {
    /// Start of phase 1 (fixed) and 2 (saturated) in µs since [`base`]; 0 = not started.
    starts: [AtomicU64; 2],
    hists: Mutex<[Histogram<u64>; 2]>,
    notifications: [AtomicU64; 2],
    acks: [AtomicU64; 2],
    errors: [AtomicU64; 2],
    /// 0 setup, 1 fixed, 2 saturated, 3 done.
    phase: AtomicUsize,
}

impl Recorder {
    fn new() -> Arc<Self> {
        Arc::new(Recorder {
            starts: [AtomicU64::new(u64::MAX), AtomicU64::new(u64::MAX)],
            hists: Mutex::new([latency_histogram(), latency_histogram()]),
            notifications: [AtomicU64::new(0), AtomicU64::new(0)],
            acks: [AtomicU64::new(0), AtomicU64::new(0)],
            errors: [AtomicU64::new(0), AtomicU64::new(0)],
            phase: AtomicUsize::new(0),
        })
    }

    /// A subscriber received a value written at `sent_us`.
    fn notified(&self, sent_us: u64) {
        let now = now_us();
        let p = if sent_us >= self.starts[1].load(Ordering::Relaxed) {
            1
        } else if sent_us >= self.starts[0].load(Ordering::Relaxed) {
            0
        } else {
            return;
        };
        self.notifications[p].fetch_add(1, Ordering::Relaxed);
        let mut h = self.hists.lock().unwrap_or_else(|e| e.into_inner());
        h[p].saturating_record(now.saturating_sub(sent_us).max(1));
    }

    fn phase(&self) -> usize {
        self.phase.load(Ordering::Relaxed)
    }

    fn result(&self, p: usize, secs: f64) -> PhaseResult {
        let acks = self.acks[p].load(Ordering::Relaxed);
        let h = self.hists.lock().unwrap_or_else(|e| e.into_inner());
        PhaseResult {
            updates_per_s: acks as f64 / secs,
            latency: LatencySummary::of(&h[p]),
            notifications_per_update: ratio(
                self.notifications[p].load(Ordering::Relaxed) as f64,
                acks as f64,
            ),
            write_errors: self.errors[p].load(Ordering::Relaxed),
        }
    }
}

/// A system under test: how to write one key.
trait Writer: Send + 'static {
    /// Writes `payload` (JSON text carrying the send time) to key `k`; Ok when acknowledged.
    fn write(
        &mut self,
        k: usize,
        payload: String,
    ) -> impl std::future::Future<Output = Result<()>> + Send;
}

/// Runs the two phases with writers from `make`; the subscribers must already be running.
async fn phases<W: Writer>(
    rec: &Arc<Recorder>,
    o: &Opts,
    mut make: impl FnMut(usize) -> futures::future::BoxFuture<'static, Result<W>>,
) -> Result<()> {
    for (p, writers) in [(0usize, FIXED_WRITERS), (1, o.writers)] {
        let mut ws = Vec::new();
        for w in 0..writers {
            ws.push(make(w).await?);
        }
        rec.starts[p].store(now_us(), Ordering::Relaxed);
        rec.phase.store(p + 1, Ordering::Relaxed);
        let end = Instant::now() + Duration::from_secs_f64(o.secs);
        let mut tasks = JoinSet::new();
        for (w, mut writer) in ws.into_iter().enumerate() {
            let rec = rec.clone();
            let keys = o.keys;
            let interval = (p == 0).then(|| Duration::from_secs_f64(writers as f64 / o.rate));
            tasks.spawn(async move {
                let mut next = Instant::now();
                let mut i = w;
                while Instant::now() < end {
                    if let Some(iv) = interval {
                        tokio::time::sleep_until(next.into()).await;
                        next += iv;
                        if Instant::now() >= end {
                            break;
                        }
                    }
                    let k = i % keys;
                    i += writers;
                    let payload = json!({"t": now_us(), "w": w}).to_string();
                    match tokio::time::timeout(Duration::from_secs(10), writer.write(k, payload))
                        .await
                    {
                        Ok(Ok(())) => rec.acks[p].fetch_add(1, Ordering::Relaxed),
                        _ => rec.errors[p].fetch_add(1, Ordering::Relaxed),
                    };
                }
            });
        }
        while tasks.join_next().await.is_some() {}
    }
    // Let the last notifications arrive.
    tokio::time::sleep(Duration::from_secs(1)).await;
    rec.phase.store(3, Ordering::Relaxed);
    Ok(())
}

fn sent_of(v: &[u8]) -> Option<u64> {
    serde_json::from_slice::<Value>(v).ok()?.get("t")?.as_u64()
}

// ---------------------------------------------------------------------------------------
// Tether

struct TetherWriter {
    http: reqwest::Client,
    url: String,
    devices: Arc<Vec<(String, tether_proto::Credentials)>>,
    versions: Vec<u64>,
}

impl Writer for TetherWriter {
    async fn write(&mut self, k: usize, payload: String) -> Result<()> {
        let (serial, creds) = &self.devices[k];
        // The payload `{"t": …, "w": …}` in thermostat fields: a node refuses fields
        // outside the device type's template.
        let p: Value = serde_json::from_str(&payload)?;
        let value = json!({"target_temperature": p["t"], "mode": p["w"]});
        let r = self
            .http
            .put(format!("{}/v1/buckets/shared.{serial}", self.url))
            .header(AUTHORIZATION, basic_header(creds))
            .json(&json!({"value": value, "base_version": self.versions[k], "session": "writer"}))
            .send()
            .await?
            .error_for_status()?
            .json::<UpdateResponse>()
            .await?;
        self.versions[k] = r.version;
        Ok(())
    }
}

/// A subscriber's answer: each bucket newer than the one it held is a notification.
fn record_answer(rec: &Recorder, list: BucketList, version: &mut Option<u64>) {
    for doc in list.buckets {
        if version.is_some() {
            if let Some(t) = doc
                .value
                .as_ref()
                .and_then(|v| v.get("target_temperature"))
                .and_then(Value::as_u64)
            {
                rec.notified(t);
            }
        }
        *version = doc.version.or(*version);
    }
}

/// One long-poll subscriber of bucket `id`: a subscribe per answer, with its version.
async fn long_poll(
    http: reqwest::Client,
    url: String,
    creds: tether_proto::Credentials,
    id: String,
    session: String,
    rec: Arc<Recorder>,
) {
    let mut version: Option<u64> = None;
    while rec.phase() < 3 {
        let body = json!({"buckets": [{"id": id, "version": version}],
                          "session": session, "timeout_ms": 30_000});
        let r = http
            .post(format!("{url}/v1/subscribe"))
            .header(AUTHORIZATION, basic_header(&creds))
            .json(&body)
            .send()
            .await;
        let Ok(r) = r else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let Ok(list) = r.json::<BucketList>().await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        record_answer(&rec, list, &mut version);
    }
}

/// One streaming subscriber of bucket `id`: one request, a line per answer (opened again
/// with its version if the stream ends).
async fn streaming(
    http: reqwest::Client,
    url: String,
    creds: tether_proto::Credentials,
    id: String,
    session: String,
    rec: Arc<Recorder>,
) {
    let mut version: Option<u64> = None;
    while rec.phase() < 3 {
        let body = json!({"buckets": [{"id": id, "version": version}],
                          "session": session, "timeout_ms": 600_000, "stream": true});
        let r = http
            .post(format!("{url}/v1/subscribe"))
            .header(AUTHORIZATION, basic_header(&creds))
            .json(&body)
            .send()
            .await;
        let Ok(mut r) = r else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let mut buf = Vec::new();
        while let Ok(Some(chunk)) = r.chunk().await {
            buf.extend_from_slice(&chunk);
            while let Some(at) = buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = buf.drain(..=at).collect();
                // `{}` (keep-alive) is no answer.
                if let Ok(list) = serde_json::from_slice::<BucketList>(&line) {
                    record_answer(&rec, list, &mut version);
                }
            }
        }
    }
}

async fn run_tether(o: &Opts, stream: bool) -> Result<SystemResult> {
    let node = tether::start(&o.tether_bin, &[]).await?;
    let url = node.url().to_string();
    let http = reqwest::Client::builder()
        .tcp_nodelay(true)
        .pool_max_idle_per_host(4096)
        .build()?;
    let devices =
        Arc::new(tether::register_many(&http, &url, &node.mfg_key, "PEER", o.keys, 16).await?);
    let rec = Recorder::new();
    let mut subs = JoinSet::new();
    for k in 0..o.keys {
        for s in 0..o.subs {
            let (http, url, rec) = (http.clone(), url.clone(), rec.clone());
            let (serial, creds) = devices[k].clone();
            let (id, session) = (format!("shared.{serial}"), format!("sub-{s}"));
            if stream {
                subs.spawn(streaming(http, url, creds, id, session, rec));
            } else {
                subs.spawn(long_poll(http, url, creds, id, session, rec));
            }
        }
    }
    // Every subscriber holds (its first subscribe returned the current version).
    let target = (o.keys * o.subs) as f64;
    let until = Instant::now() + Duration::from_secs(20);
    while tether::metric(&http, &url, "tether_held_subscriptions").await != Some(target)
        && Instant::now() < until
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (h2, u2, d2) = (http.clone(), url.clone(), devices.clone());
    phases(&rec, o, move |_| {
        let w = TetherWriter {
            http: h2.clone(),
            url: u2.clone(),
            devices: d2.clone(),
            versions: vec![0; d2.len()],
        };
        Box::pin(async move { Ok(w) })
    })
    .await?;
    subs.abort_all();
    node.server.stop().await;
    Ok(SystemResult {
        system: if stream { "tether-stream" } else { "tether" }.into(),
        fixed: rec.result(0, o.secs),
        saturated: rec.result(1, o.secs),
    })
}

// ---------------------------------------------------------------------------------------
// mosquitto

struct MqttWriter {
    client: AsyncClient,
    events: rumqttc::EventLoop,
}

impl Writer for MqttWriter {
    async fn write(&mut self, k: usize, payload: String) -> Result<()> {
        self.client
            .publish(format!("bench/k{k}"), QoS::AtLeastOnce, true, payload)
            .await?;
        loop {
            if let MqttEvent::Incoming(Packet::PubAck(_)) = self.events.poll().await? {
                return Ok(());
            }
        }
    }
}

fn mqtt_options(id: String, port: u16) -> MqttOptions {
    let mut m = MqttOptions::new(id, "127.0.0.1", port);
    m.set_keep_alive(Duration::from_secs(30));
    m.set_clean_session(true);
    m
}

async fn mqtt_writer(port: u16, w: usize) -> Result<MqttWriter> {
    let (client, mut events) = AsyncClient::new(mqtt_options(format!("writer-{w}"), port), 16);
    loop {
        if let MqttEvent::Incoming(Packet::ConnAck(_)) = events.poll().await? {
            return Ok(MqttWriter { client, events });
        }
    }
}

async fn run_mosquitto(o: &Opts) -> Result<SystemResult> {
    let server = procs::start_mosquitto().await?;
    let port = server.port;
    let rec = Recorder::new();
    let subscribed = Arc::new(AtomicUsize::new(0));
    let mut subs = JoinSet::new();
    for k in 0..o.keys {
        for s in 0..o.subs {
            let (rec, subscribed) = (rec.clone(), subscribed.clone());
            subs.spawn(async move {
                let (client, mut events) =
                    AsyncClient::new(mqtt_options(format!("sub-{k}-{s}"), port), 16);
                if client
                    .subscribe(format!("bench/k{k}"), QoS::AtLeastOnce)
                    .await
                    .is_err()
                {
                    return;
                }
                while rec.phase() < 3 {
                    match events.poll().await {
                        Ok(MqttEvent::Incoming(Packet::SubAck(_))) => {
                            subscribed.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(MqttEvent::Incoming(Packet::Publish(p))) => {
                            if let Some(t) = sent_of(&p.payload) {
                                rec.notified(t);
                            }
                        }
                        Ok(_) => {}
                        Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                    }
                }
            });
        }
    }
    let until = Instant::now() + Duration::from_secs(20);
    while subscribed.load(Ordering::Relaxed) < o.keys * o.subs && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    phases(&rec, o, |w| Box::pin(mqtt_writer(port, w))).await?;
    subs.abort_all();
    server.stop().await;
    Ok(SystemResult {
        system: "mosquitto".into(),
        fixed: rec.result(0, o.secs),
        saturated: rec.result(1, o.secs),
    })
}

// ---------------------------------------------------------------------------------------
// etcd

#[cfg(feature = "etcd")]
struct EtcdWriter(etcd_client::Client);

#[cfg(feature = "etcd")]
impl Writer for EtcdWriter {
    async fn write(&mut self, k: usize, payload: String) -> Result<()> {
        self.0.put(format!("bench/k{k}"), payload, None).await?;
        Ok(())
    }
}

#[cfg(feature = "etcd")]
async fn run_etcd(o: &Opts) -> Result<SystemResult> {
    let server = procs::start_etcd().await?;
    let url = server.url.clone();
    let connect = |url: String| async move {
        etcd_client::Client::connect([url], None)
            .await
            .context("connecting to etcd")
    };
    // etcd may take a moment after its port opens.
    let mut probe = None;
    for _ in 0..50 {
        if let Ok(mut c) = connect(url.clone()).await {
            if c.put("bench/probe", "1", None).await.is_ok() {
                probe = Some(c);
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    probe.context("etcd never accepted a put")?;
    let rec = Recorder::new();
    let mut subs = JoinSet::new();
    // One client (one HTTP/2 connection) per 50 watches, as watch-heavy etcd clients do.
    let mut clients = Vec::new();
    for _ in 0..(o.keys * o.subs).div_ceil(50) {
        clients.push(connect(url.clone()).await?);
    }
    let mut n = 0;
    for k in 0..o.keys {
        for _ in 0..o.subs {
            let mut client = clients[n / 50].clone();
            n += 1;
            let mut stream = client.watch(format!("bench/k{k}"), None).await?;
            let rec = rec.clone();
            subs.spawn(async move {
                while rec.phase() < 3 {
                    match stream.message().await {
                        Ok(Some(resp)) => {
                            for ev in resp.events() {
                                if let Some(t) = ev.kv().and_then(|kv| sent_of(kv.value())) {
                                    rec.notified(t);
                                }
                            }
                        }
                        _ => break,
                    }
                }
            });
        }
    }
    let u2 = url.clone();
    phases(&rec, o, move |_| {
        let u = u2.clone();
        Box::pin(async move { Ok(EtcdWriter(connect(u).await?)) })
    })
    .await?;
    subs.abort_all();
    server.stop().await;
    Ok(SystemResult {
        system: "etcd".into(),
        fixed: rec.result(0, o.secs),
        saturated: rec.result(1, o.secs),
    })
}

#[cfg(not(feature = "etcd"))]
async fn run_etcd(_o: &Opts) -> Result<SystemResult> {
    anyhow::bail!("built without the `etcd` feature (needs protoc): cargo build -p tether-sim --features etcd")
}

/// `tether-bench peers`.
pub async fn run(o: Opts) -> Result<()> {
    let machine = Machine::probe();
    let (_, date) = now_utc();
    let _ = base();
    let mut runs: Vec<Vec<SystemResult>> = Vec::new();
    for r in 0..o.runs {
        let mut this = Vec::new();
        // Rotate the order so no system always runs first.
        let n = o.systems.len();
        for i in 0..n {
            let sys = &o.systems[(i + r) % n];
            let res = match sys.as_str() {
                "tether" => run_tether(&o, false).await,
                "tether-stream" => run_tether(&o, true).await,
                "etcd" => run_etcd(&o).await,
                "mosquitto" => run_mosquitto(&o).await,
                other => Err(anyhow::anyhow!("unknown system {other}")),
            }
            .with_context(|| format!("{sys}, run {}", r + 1))?;
            eprintln!(
                "run {} {:>9}: fixed {:.0} upd/s, notify p50 {:.2} ms p99 {:.2} ms ({:.2} notif/upd) | saturated {:.0} upd/s, p50 {:.2} ms p99 {:.2} ms, {} errors",
                r + 1,
                res.system,
                res.fixed.updates_per_s,
                res.fixed.latency.p50_ms,
                res.fixed.latency.p99_ms,
                res.fixed.notifications_per_update,
                res.saturated.updates_per_s,
                res.saturated.latency.p50_ms,
                res.saturated.latency.p99_ms,
                res.saturated.write_errors + res.fixed.write_errors,
            );
            this.push(res);
        }
        runs.push(this);
    }
    // Per system: spreads, and ratios against Tether measured in the same run.
    let mut summary = serde_json::Map::new();
    let mut thr = Vec::new();
    let mut p50 = Vec::new();
    let mut p99 = Vec::new();
    for sys in &o.systems {
        let of = |f: &dyn Fn(&SystemResult) -> f64| {
            Spread::of(
                &runs
                    .iter()
                    .filter_map(|run| run.iter().find(|s| &s.system == sys).map(f))
                    .collect::<Vec<_>>(),
            )
        };
        let vs_tether = |f: &dyn Fn(&SystemResult) -> f64| {
            Spread::of(
                &runs
                    .iter()
                    .filter_map(|run| {
                        let t = run.iter().find(|s| s.system == "tether")?;
                        let x = run.iter().find(|s| &s.system == sys)?;
                        Some(ratio(f(x), f(t)))
                    })
                    .collect::<Vec<_>>(),
            )
        };
        let s_thr = of(&|s| s.saturated.updates_per_s);
        let s_p50 = of(&|s| s.fixed.latency.p50_ms);
        let s_p99 = of(&|s| s.fixed.latency.p99_ms);
        println!(
            "peers {sys:>9}: saturated {} upd/s (×{} of tether); fixed-rate notify p50 {} ms (×{}), p99 {} ms (×{})",
            s_thr.show(0),
            vs_tether(&|s| s.saturated.updates_per_s).show(2),
            s_p50.show(2),
            vs_tether(&|s| s.fixed.latency.p50_ms).show(2),
            s_p99.show(2),
            vs_tether(&|s| s.fixed.latency.p99_ms).show(2),
        );
        summary.insert(
            sys.clone(),
            json!({
                "saturated_updates_per_s": s_thr,
                "saturated_notify_p50_ms": of(&|s| s.saturated.latency.p50_ms),
                "saturated_notify_p99_ms": of(&|s| s.saturated.latency.p99_ms),
                "fixed_updates_per_s": of(&|s| s.fixed.updates_per_s),
                "fixed_notify_p50_ms": s_p50,
                "fixed_notify_p99_ms": s_p99,
                "fixed_notifications_per_update": of(&|s| s.fixed.notifications_per_update),
                "throughput_over_tether": vs_tether(&|s| s.saturated.updates_per_s),
                "fixed_p50_over_tether": vs_tether(&|s| s.fixed.latency.p50_ms),
                "fixed_p99_over_tether": vs_tether(&|s| s.fixed.latency.p99_ms),
            }),
        );
        thr.push((sys.clone(), s_thr));
        p50.push((sys.clone(), s_p50));
        p99.push((sys.clone(), s_p99));
    }
    let result = json!({
        "benchmark": "peers", "date": date, "machine": machine,
        "params": {"runs": o.runs, "keys": o.keys, "subscribers_per_key": o.subs,
                   "fixed_rate_updates_per_s": o.rate, "fixed_writers": FIXED_WRITERS,
                   "saturated_writers": o.writers, "secs_per_phase": o.secs},
        "runs": runs,
        "summary": summary,
    });
    let path = write_json(&o.out, "peers", &result)?;
    plot::bars(
        &o.out.join("peers.png"),
        &format!(
            "Peers: {} keys × {} subscribers; fixed {} upd/s and saturated ({} writers)",
            o.keys, o.subs, o.rate, o.writers
        ),
        &[
            Panel::new("saturated throughput", "acknowledged updates/s", thr),
            Panel::new("update→notify p50 (fixed rate)", "ms", p50),
            Panel::new("update→notify p99 (fixed rate)", "ms", p99),
        ],
    )?;
    println!("results: {}", path.display());
    Ok(())
}
