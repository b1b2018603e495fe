//! The fleet runner: N simulated devices, their companions and apps, the checker sweeping
//! over them, and a progress bar, for a bounded time.
//!
//! Each device is one tokio task driving its own [`DeviceClient`]: it sends what
//! `poll_request` asks for (each request its own task, so a held subscribe and a PUT run
//! side by side as on the firmware), feeds the answers back, makes local changes at
//! `update_rate`, and — when configured — sleeps (link down, changes made offline, back
//! with its versions), loses connections at random (flaky link), and loses PUT answers
//! after the server acted (`drop_answers`): every writer then retries with the same op id,
//! and the audit reads each bucket's history to check that no write was applied twice.
//!
//! Writers that are *other* clients of a device's buckets make the delivery check
//! possible ([`crate::checker`]): a **companion** (a second client of the device, on its
//! assigned credentials and its own session) and **apps** (users from `--user`, paired
//! with devices through pairing codes). Each writer owns one field of the device's
//! `shared.<serial>` bucket and writes increasing sequence numbers into it.
//!
//! Phases: *setup* (devices start over `ramp`, register, subscribe and get paired with
//! their apps; nobody writes) until every device is connected and paired or
//! `setup_timeout` passed, then *load* for `duration` (or until `max_updates`), then
//! *drain* (no new changes, sleeping devices wake, until every acknowledged write was seen
//! or the deadline passed), then *stop*, then — when asked for — the *audit*: every
//! device's buckets are read once more and every acknowledged write must be in them
//! ([`crate::checker`]). Every loop is bounded by these phases.

/// The field a simulated device writes into its `device.<serial>` bucket, and those its
/// companion and its app write into `shared.<serial>`: fields of the thermostat's template
/// (a node refuses fields outside the device type's template). A writer's field is its
/// identity in the checker.
pub const DEVICE_FIELD: &str = "current_temperature";
/// The companion's field (see [`DEVICE_FIELD`]).
pub const COMPANION_FIELD: &str = "target_temperature";
/// The app's field (one app per device; see [`DEVICE_FIELD`]).
pub const APP_FIELD: &str = "mode";

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use futures::StreamExt;
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, RETRY_AFTER};
use serde_json::json;
use tether_proto::api::{BucketList, HistoryResponse, UpdateRequest, UpdateResponse};
use tether_proto::client::{ClientConfig, DeviceClient, Event, Request, Response};
use tether_proto::credentials::{basic_header, default_credentials, Credentials};
use tether_proto::{Fields, Value};
use tokio::sync::{mpsc, watch};
use tokio::task::{AbortHandle, JoinSet};

use crate::checker::{DeviceTrack, FaultWindows, OpAudit, Violation};
use crate::report::{latency_histogram, LatencySummary, Report};
use crate::wire::{self, request_kind, Failure, WireOpts};

/// Everything a run is configured with.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Registration URLs: one node, a load balancer, or every node of a cluster (devices
    /// are spread over them round-robin).
    pub urls: Vec<String>,
    /// How many devices.
    pub devices: usize,
    /// Serials are `<prefix><index, 6 digits>`.
    pub serial_prefix: String,
    /// The first index (several processes can share one fleet).
    pub first_index: usize,
    /// The server's manufacturing key, to compute default credentials.
    pub mfg_key: Vec<u8>,
    /// Assigned credentials of devices registered before the run (index `i`: device `i`,
    /// the `first_index + i`th serial), restored at start as after a reboot: where default
    /// credentials are not accepted (plain HTTP through a load balancer on another
    /// host), the devices never send them. Devices past its end register themselves.
    pub provisioned: Vec<Credentials>,
    /// Its key id (`d.<serial>.<key_id>`).
    pub key_id: String,
    /// Sent on registration; the built-in `thermostat` has `device.*` and `shared.*`.
    pub device_type: String,
    /// Firmware version sent on registration.
    pub sw_version: String,
    /// Local changes per device per second (to its `device.<serial>` bucket).
    pub update_rate: f64,
    /// Companion writes per device per second (to `shared.<serial>`); 0 disables.
    pub companion_rate: f64,
    /// App users; devices are paired with them round-robin. Empty: no apps.
    pub users: Vec<Credentials>,
    /// App writes per paired device per second.
    pub app_rate: f64,
    /// Mean time a device stays awake between sleeps; `None`: never sleeps.
    pub sleep_every: Option<Duration>,
    /// How long a sleep lasts (the device's own schedule; with `push`, it says so:
    /// `next_sync_ms`).
    pub sleep_for: Duration,
    /// A push gateway the node posts wake-ups to (`--push-webhook` at its URL): a sleeping
    /// device woken by one ends its sleep at once.
    pub push: Option<tether_test_support::push::Gateway>,
    /// Connection drops per device per minute (flaky link); 0 disables.
    pub flaky_per_min: f64,
    /// Fraction of PUT answers lost after the server acted (received, then dropped); the
    /// writer retries with the same op id. 0 disables.
    pub drop_answers: f64,
    /// The devices' `max_answer_bytes` (subscribe `max_bytes`); 0: no limit.
    pub max_answer_bytes: u64,
    /// Length of the load phase.
    pub duration: Duration,
    /// Ends the load phase early after this many acknowledged updates.
    pub max_updates: Option<u64>,
    /// Device starts are spread over this (in the setup phase).
    pub ramp: Duration,
    /// Longest setup phase (registering, subscribing, pairing) after the ramp; the load
    /// starts earlier once every device is connected and paired.
    pub setup_timeout: Duration,
    /// After the run, read every device's buckets and check that every acknowledged write
    /// is in them.
    pub audit: bool,
    /// Told when the run enters each phase (a test times its faults from the load's start).
    pub phases: Option<mpsc::UnboundedSender<Phase>>,
    /// An acknowledged write must reach each awake device within this.
    pub notify_deadline: Duration,
    /// When a chaos run's faults were active (the nemesis opens and heals them): the
    /// delivery deadline is suspended during a fault and restarts [`Self::fault_recovery`]
    /// after it healed ([`FaultWindows`]). `None`: no faults, the plain deadline.
    pub faults: Option<FaultWindows>,
    /// How long after a fault healed the deadline clock restarts.
    pub fault_recovery: Duration,
    /// `timeout_ms` of each subscribe.
    pub subscribe_timeout_ms: u64,
    /// Bound on every other request.
    pub request_timeout: Duration,
    /// JSON or protobuf.
    pub protobuf: bool,
    /// Source addresses to connect from (round-robin per device); empty: the default.
    pub local_addresses: Vec<IpAddr>,
    /// A CA certificate (PEM) to trust for `https://` URLs.
    pub ca_cert: Option<PathBuf>,
    /// Host names connected to at these addresses instead of resolving them (`curl
    /// --resolve`): the public name of a load balancer inside a test network. The port of
    /// the URL is used.
    pub resolve: Vec<(String, std::net::SocketAddr)>,
    /// Ends the load phase early once it holds `true` (a test ends the load when its
    /// fault sequence is done); `duration` stays the upper bound.
    pub stop_load: Option<watch::Receiver<bool>>,
    /// Draw a progress bar on stderr.
    pub progress: bool,
    /// Seeds every random choice.
    pub seed: u64,
}

impl SimConfig {
    /// A small default fleet against `url` (tests tweak what they need).
    pub fn new(url: &str, mfg_key: Vec<u8>, key_id: &str) -> Self {
        SimConfig {
            urls: vec![url.to_string()],
            devices: 10,
            serial_prefix: "SIM".to_string(),
            first_index: 0,
            mfg_key,
            provisioned: Vec::new(),
            key_id: key_id.to_string(),
            device_type: "thermostat".to_string(),
            sw_version: "1.0.0".to_string(),
            update_rate: 0.5,
            companion_rate: 0.5,
            users: Vec::new(),
            app_rate: 0.2,
            sleep_every: None,
            sleep_for: Duration::from_secs(2),
            push: None,
            flaky_per_min: 0.0,
            drop_answers: 0.0,
            max_answer_bytes: 0,
            duration: Duration::from_secs(10),
            max_updates: None,
            ramp: Duration::from_secs(1),
            setup_timeout: Duration::from_secs(60),
            audit: false,
            phases: None,
            notify_deadline: Duration::from_secs(5),
            faults: None,
            fault_recovery: Duration::ZERO,
            subscribe_timeout_ms: 30_000,
            request_timeout: Duration::from_secs(10),
            protobuf: false,
            local_addresses: Vec::new(),
            ca_cert: None,
            resolve: Vec::new(),
            stop_load: None,
            progress: false,
            seed: 1,
        }
    }
}

/// The run's phase; every task watches it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    /// Devices register, subscribe and pair; nobody writes.
    Setup,
    /// Devices, companions and apps write; the timed part of the run.
    Load,
    /// No new changes; waiting for acknowledged writes to reach their devices.
    Drain,
    /// Every task ends (then the audit, if asked for).
    Stop,
}

/// Counters shared by every task.
#[derive(Debug)]
struct Stats {
    registered: AtomicU64,
    connected: AtomicU64,
    paired: AtomicU64,
    device_updates: AtomicU64,
    writer_updates: AtomicU64,
    deliveries: AtomicU64,
    catch_up: AtomicU64,
    sleeps: AtomicU64,
    push_wakes: AtomicU64,
    push_while_awake: AtomicU64,
    catch_up_latency: Mutex<Histogram<u64>>,
    drops: AtomicU64,
    answers_dropped: AtomicU64,
    late_answers: AtomicU64,
    op_audit: Mutex<OpAudit>,
    latency: Mutex<Histogram<u64>>,
    errors: Mutex<BTreeMap<String, u64>>,
}

/// What the device task shares with its writers and the sweeper.
#[derive(Debug)]
struct DeviceShared {
    serial: String,
    track: Mutex<DeviceTrack>,
    /// The device's assigned credentials (the companion writes with them).
    creds: Mutex<Option<Credentials>>,
    /// Where the device syncs (from its registration).
    sync_url: Mutex<String>,
    connected: AtomicBool,
    /// Counts the push wake-ups the gateway accepted for this device.
    pushed: watch::Sender<u64>,
}

#[derive(Debug)]
struct Ctx {
    cfg: SimConfig,
    start: Instant,
    unix_at_start: u64,
    https: Vec<reqwest::Client>,
    wire: WireOpts,
    phase: watch::Receiver<Phase>,
    stats: Stats,
    devices: Vec<Arc<DeviceShared>>,
    violations: Mutex<Vec<Violation>>,
    pb: ProgressBar,
    apps: Vec<mpsc::UnboundedSender<(usize, String)>>,
    /// Makes the writers' op ids unique to this run.
    run_nonce: u64,
}

/// Locks a mutex, ignoring poisoning (a panicked task must not hide the report).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn exp_sample(rng: &mut StdRng, mean: Duration) -> Duration {
    let u: f64 = rng.random();
    mean.mul_f64(-(1.0 - u).ln().min(20.0))
}

impl Ctx {
    fn now_ms(&self) -> u64 {
        self.unix_at_start + u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn instant_of(&self, ms: u64) -> Instant {
        self.start + Duration::from_millis(ms.saturating_sub(self.unix_at_start))
    }

    fn phase(&self) -> Phase {
        *self.phase.borrow()
    }

    fn error(&self, kind: impl Into<String>) {
        *lock(&self.stats.errors).entry(kind.into()).or_default() += 1;
    }

    fn failure(&self, what: &str, f: &Failure) {
        match f {
            Failure::Transport => self.error(format!("{what} transport")),
            Failure::Timeout => self.error(format!("{what} timeout")),
            Failure::Decode => self.error(format!("{what} undecodable answer")),
            Failure::Status(s) => self.error(format!("{what} {s}")),
        }
    }

    fn say(&self, msg: &str) {
        if self.pb.is_hidden() {
            eprintln!("{msg}");
        } else {
            self.pb.println(msg);
        }
    }

    fn violation(&self, v: Violation) {
        self.say(&v.to_string());
        lock(&self.violations).push(v);
    }

    fn url_of(&self, i: usize) -> &str {
        &self.cfg.urls[i % self.cfg.urls.len()]
    }

    /// Where device `i` syncs: its registration's `sync_url`, else its entry URL.
    fn sync_base(&self, i: usize) -> String {
        let s = lock(&self.devices[i].sync_url);
        if s.is_empty() {
            self.url_of(i).to_string()
        } else {
            s.clone()
        }
    }

    fn http_of(&self, i: usize) -> reqwest::Client {
        self.https[i % self.https.len()].clone()
    }

    fn updates(&self) -> u64 {
        self.stats.device_updates.load(Ordering::Relaxed)
            + self.stats.writer_updates.load(Ordering::Relaxed)
    }

    fn record_deliveries(&self, ds: &[crate::checker::Delivery]) {
        if ds.is_empty() {
            return;
        }
        let mut h = lock(&self.stats.latency);
        for d in ds {
            self.stats.deliveries.fetch_add(1, Ordering::Relaxed);
            if d.live {
                let us = u64::try_from(d.latency.as_micros()).unwrap_or(u64::MAX);
                h.saturating_record(us.max(1));
            } else {
                self.stats.catch_up.fetch_add(1, Ordering::Relaxed);
                let us = u64::try_from(d.latency.as_micros()).unwrap_or(u64::MAX);
                lock(&self.stats.catch_up_latency).saturating_record(us.max(1));
            }
        }
    }
}

/// Builds one HTTP client per source address (or one with the default).
fn http_clients(cfg: &SimConfig) -> Result<Vec<reqwest::Client>> {
    let ca = match &cfg.ca_cert {
        Some(p) => {
            let pem = std::fs::read(p).with_context(|| format!("reading {}", p.display()))?;
            Some(reqwest::Certificate::from_pem(&pem).context("parsing the CA certificate")?)
        }
        None => None,
    };
    let addrs: Vec<Option<IpAddr>> = if cfg.local_addresses.is_empty() {
        vec![None]
    } else {
        cfg.local_addresses.iter().copied().map(Some).collect()
    };
    addrs
        .into_iter()
        .map(|a| {
            let mut b = reqwest::Client::builder()
                .tcp_nodelay(true)
                .connect_timeout(Duration::from_secs(5))
                .pool_idle_timeout(Duration::from_secs(30))
                .local_address(a);
            if let Some(ca) = &ca {
                b = b.add_root_certificate(ca.clone());
            }
            for (host, addr) in &cfg.resolve {
                b = b.resolve(host, *addr);
            }
            b.build().context("building the HTTP client")
        })
        .collect()
}

/// Runs the fleet to the end and reports what it saw.
pub async fn run(cfg: SimConfig) -> Result<Report> {
    if cfg.urls.is_empty() {
        bail!("no URL to simulate against");
    }
    if cfg.devices == 0 {
        bail!("no devices to simulate");
    }
    let now = Instant::now();
    let unix_at_start = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0);
    let (phase_tx, phase_rx) = watch::channel(Phase::Setup);
    let devices = (0..cfg.devices)
        .map(|i| {
            let serial = format!("{}{:06}", cfg.serial_prefix, cfg.first_index + i);
            Arc::new(DeviceShared {
                track: Mutex::new(DeviceTrack::new(&serial, now)),
                serial,
                creds: Mutex::new(None),
                sync_url: Mutex::new(String::new()),
                connected: AtomicBool::new(false),
                pushed: watch::channel(0).0,
            })
        })
        .collect();
    let pb = if cfg.progress {
        let pb = ProgressBar::with_draw_target(
            Some(cfg.duration.as_secs().max(1)),
            ProgressDrawTarget::stderr(),
        );
        if let Ok(style) =
            ProgressStyle::with_template("{elapsed_precise} [{bar:25.cyan/blue}] {msg}")
        {
            pb.set_style(style.progress_chars("=> "));
        }
        pb
    } else {
        ProgressBar::hidden()
    };
    let mut app_rxs = Vec::new();
    let mut apps = Vec::new();
    for _ in &cfg.users {
        let (tx, rx) = mpsc::unbounded_channel();
        apps.push(tx);
        app_rxs.push(rx);
    }
    let ctx = Arc::new(Ctx {
        https: http_clients(&cfg)?,
        wire: WireOpts {
            protobuf: cfg.protobuf,
            request_timeout: cfg.request_timeout,
            subscribe_margin: Duration::from_secs(10),
        },
        start: now,
        unix_at_start,
        phase: phase_rx,
        stats: Stats {
            registered: AtomicU64::new(0),
            connected: AtomicU64::new(0),
            paired: AtomicU64::new(0),
            device_updates: AtomicU64::new(0),
            writer_updates: AtomicU64::new(0),
            deliveries: AtomicU64::new(0),
            catch_up: AtomicU64::new(0),
            sleeps: AtomicU64::new(0),
            push_wakes: AtomicU64::new(0),
            push_while_awake: AtomicU64::new(0),
            catch_up_latency: Mutex::new(latency_histogram()),
            drops: AtomicU64::new(0),
            answers_dropped: AtomicU64::new(0),
            late_answers: AtomicU64::new(0),
            op_audit: Mutex::new(OpAudit::default()),
            latency: Mutex::new(latency_histogram()),
            errors: Mutex::new(BTreeMap::new()),
        },
        devices,
        violations: Mutex::new(Vec::new()),
        pb,
        apps,
        run_nonce: rand::random(),
        cfg,
    });

    let mut tasks = JoinSet::new();
    if let Some(gw) = &ctx.cfg.push {
        // Each wake-up the gateway accepted, to its device.
        let mut wakes = gw.wakes();
        let by_serial: HashMap<String, Arc<DeviceShared>> = ctx
            .devices
            .iter()
            .map(|d| (d.serial.clone(), d.clone()))
            .collect();
        let mut phase = ctx.phase.clone();
        tasks.spawn(async move {
            loop {
                tokio::select! {
                    w = wakes.recv() => {
                        let Some(serial) = w else { return };
                        if let Some(d) = by_serial.get(&serial) {
                            d.pushed.send_modify(|n| *n += 1);
                        }
                    }
                    _ = phase.wait_for(|p| *p == Phase::Stop) => return,
                }
            }
        });
    }
    for i in 0..ctx.cfg.devices {
        tasks.spawn(run_device(ctx.clone(), i));
        if ctx.cfg.companion_rate > 0.0 {
            let field = COMPANION_FIELD.to_string();
            tasks.spawn(run_writer(
                ctx.clone(),
                i,
                field,
                format!("companion-{i}"),
                None,
                ctx.cfg.companion_rate,
            ));
        }
    }
    for (u, rx) in app_rxs.into_iter().enumerate() {
        tasks.spawn(run_app(ctx.clone(), u, rx));
    }

    let enter = |phase: Phase| {
        let _ = phase_tx.send(phase);
        if let Some(tx) = &ctx.cfg.phases {
            let _ = tx.send(phase);
        }
    };
    if let Some(tx) = &ctx.cfg.phases {
        let _ = tx.send(Phase::Setup);
    }

    // Setup: every device registered, subscribed and (with apps) paired before the clock
    // of the load phase starts, so a slow start cannot eat into the load.
    let tick = Duration::from_millis(250);
    let setup_end = now + ctx.cfg.ramp + ctx.cfg.setup_timeout;
    loop {
        let done = {
            let s = &ctx.stats;
            let n = ctx.cfg.devices as u64;
            s.registered.load(Ordering::Relaxed) >= n
                && s.connected.load(Ordering::Relaxed) >= n
                && (ctx.apps.is_empty() || s.paired.load(Ordering::Relaxed) >= n)
        };
        if done || Instant::now() >= setup_end {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        progress(&ctx, "setting up");
    }
    let setup_time = now.elapsed();

    // The load phase, with the checker sweeping and the progress bar ticking.
    enter(Phase::Load);
    let load_start = Instant::now();
    let load_end = load_start + ctx.cfg.duration;
    while Instant::now() < load_end {
        tokio::time::sleep(tick.min(load_end.saturating_duration_since(Instant::now()))).await;
        sweep(&ctx);
        progress(&ctx, "");
        if ctx.cfg.max_updates.is_some_and(|m| ctx.updates() >= m) {
            break;
        }
        if ctx.cfg.stop_load.as_ref().is_some_and(|s| *s.borrow()) {
            break;
        }
    }
    let load_time = load_start.elapsed();
    let updates_in_load = ctx.updates();

    // Drain: no new changes; wait for every acknowledged write to be seen (or be overdue).
    enter(Phase::Drain);
    // With faults, a change acknowledged during the last one is due only `fault_recovery`
    // after it healed.
    let recovery = if ctx.cfg.faults.is_some() {
        ctx.cfg.fault_recovery
    } else {
        Duration::ZERO
    };
    // Until every acknowledged write is seen or overdue: a write still in flight when the
    // load ended may be acknowledged up to `request_timeout` later, and is due a deadline
    // after that (a loaded machine answers late; such a write is neither delivered nor
    // missed before then).
    let drained = Instant::now();
    let due = ctx.cfg.notify_deadline + recovery + Duration::from_secs(2);
    let drain_cap = drained + due + ctx.cfg.request_timeout;
    loop {
        tokio::time::sleep(tick).await;
        sweep(&ctx);
        let (outstanding, latest) = ctx.devices.iter().fold((0, None), |(n, latest), d| {
            let t = lock(&d.track);
            (n + t.outstanding(), latest.max(t.latest_outstanding_ack()))
        });
        progress(&ctx, &format!("draining: {outstanding} writes unconfirmed"));
        let drain_end = latest.map_or(drained, |acked: Instant| acked.max(drained)) + due;
        if outstanding == 0 || Instant::now() >= drain_end.min(drain_cap) {
            break;
        }
    }
    enter(Phase::Stop);
    let stop_by = Instant::now() + Duration::from_secs(5);
    while !tasks.is_empty() {
        match tokio::time::timeout(
            stop_by.saturating_duration_since(Instant::now()),
            tasks.join_next(),
        )
        .await
        {
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => break,
        }
    }
    tasks.abort_all();
    sweep(&ctx);
    let unconfirmed: usize = ctx
        .devices
        .iter()
        .map(|d| lock(&d.track).outstanding())
        .sum();
    if unconfirmed > 0 {
        // Acknowledged too close to the end to be overdue: neither delivered nor a violation.
        ctx.error(format!(
            "writes acknowledged within the deadline of the end, unconfirmed: {unconfirmed}"
        ));
    }
    // Every writer has stopped: nothing acknowledged from here on.
    let audited = if ctx.cfg.audit {
        progress(&ctx, "auditing the final state");
        Some(audit(&ctx).await)
    } else {
        None
    };
    ctx.pb.finish_and_clear();

    let s = &ctx.stats;
    let (retried_writes, replayed_answers) = ctx
        .devices
        .iter()
        .map(|d| lock(&d.track).retry_counts())
        .fold((0, 0), |(a, b), (c, d)| (a + c, b + d));
    let violations = lock(&ctx.violations).clone();
    let double_applications = violations
        .iter()
        .filter(|v| matches!(v, Violation::DoubleApplication { .. }))
        .count() as u64;
    let device_updates = s.device_updates.load(Ordering::Relaxed);
    let writer_updates = s.writer_updates.load(Ordering::Relaxed);
    let report = Report {
        devices: ctx.cfg.devices,
        registered: s.registered.load(Ordering::Relaxed),
        connected: s.connected.load(Ordering::Relaxed),
        paired: s.paired.load(Ordering::Relaxed),
        setup_s: setup_time.as_secs_f64(),
        duration_s: load_time.as_secs_f64(),
        device_updates,
        writer_updates,
        updates_per_s: updates_in_load as f64 / load_time.as_secs_f64().max(1e-9),
        deliveries: s.deliveries.load(Ordering::Relaxed),
        notify_latency: LatencySummary::of(&lock(&s.latency)),
        catch_up_deliveries: s.catch_up.load(Ordering::Relaxed),
        catch_up_latency: LatencySummary::of(&lock(&s.catch_up_latency)),
        sleeps: s.sleeps.load(Ordering::Relaxed),
        push_wakes: s.push_wakes.load(Ordering::Relaxed),
        push_while_awake: s.push_while_awake.load(Ordering::Relaxed),
        push_unsigned: ctx.cfg.push.as_ref().map_or(0, |g| g.counts().1),
        dropped_connections: s.drops.load(Ordering::Relaxed),
        answers_dropped: s.answers_dropped.load(Ordering::Relaxed),
        late_answers: s.late_answers.load(Ordering::Relaxed),
        retried_writes,
        replayed_answers,
        op_audit: audited.map(|_| *lock(&s.op_audit)),
        double_applications,
        errors: lock(&s.errors).clone(),
        audited,
        violations,
    };
    Ok(report)
}

/// How many devices' final states are read at once.
const AUDIT_CONCURRENCY: usize = 8;
/// Attempts to read one device's final state (503 while ownership moves, 429, …).
const AUDIT_ATTEMPTS: u32 = 10;

/// Reads every device's buckets and reports each acknowledged write missing from them;
/// the number of devices whose state was read.
async fn audit(ctx: &Arc<Ctx>) -> u64 {
    let reads = futures::stream::iter(0..ctx.devices.len())
        .map(|i| audit_device(ctx.clone(), i))
        .buffer_unordered(AUDIT_CONCURRENCY)
        .collect::<Vec<bool>>();
    // Bounded: each read is bounded by its attempts and the request timeout.
    let limit = (ctx.cfg.request_timeout + Duration::from_secs(2))
        * AUDIT_ATTEMPTS
        * u32::try_from(ctx.devices.len().div_ceil(AUDIT_CONCURRENCY)).unwrap_or(u32::MAX);
    match tokio::time::timeout(limit, reads).await {
        Ok(done) => done.into_iter().filter(|ok| *ok).count() as u64,
        Err(_) => {
            ctx.error("audit timed out");
            0
        }
    }
}

/// Audits device `i`: whether its final state could be read.
async fn audit_device(ctx: Arc<Ctx>, i: usize) -> bool {
    let dev = &ctx.devices[i];
    let buckets = lock(&dev.track).audited_buckets();
    if buckets.is_empty() {
        return true; // nothing acknowledged, nothing to demand
    }
    let Some(creds) = lock(&dev.creds).clone() else {
        ctx.error("audit: device holds no credentials");
        return false;
    };
    let base = ctx.sync_base(i);
    let url = format!(
        "{}/v1/buckets?view=full&ids={}",
        base.trim_end_matches('/'),
        buckets.join(",")
    );
    let http = ctx.http_of(i);
    for attempt in 0..AUDIT_ATTEMPTS {
        let r = http
            .get(&url)
            .header(AUTHORIZATION, basic_header(&creds))
            .timeout(ctx.cfg.request_timeout)
            .send()
            .await;
        let wait = match r {
            Ok(r) if r.status().is_success() => match r.json::<BucketList>().await {
                Ok(list) => {
                    let found = {
                        let track = lock(&dev.track);
                        let mut found = Vec::new();
                        for b in &buckets {
                            let value = list
                                .buckets
                                .iter()
                                .find(|d| &d.id == b)
                                .and_then(|d| d.value.as_ref());
                            found.extend(track.audit(b, value));
                        }
                        found
                    };
                    for v in found {
                        ctx.violation(v);
                    }
                    for b in &buckets {
                        if !audit_history(&ctx, i, &http, &base, &creds, b).await {
                            return false;
                        }
                    }
                    return true;
                }
                Err(_) => {
                    ctx.error("audit undecodable answer");
                    Duration::from_millis(200)
                }
            },
            Ok(r) => {
                let status = r.status().as_u16();
                ctx.error(format!("audit {status}"));
                if !(status == 429 || status >= 500) {
                    return false;
                }
                let retry_after = r
                    .headers()
                    .get(RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.trim().parse::<u64>().ok());
                Duration::from_secs(retry_after.unwrap_or(0).min(2))
                    .max(Duration::from_millis(200 << attempt.min(3)))
            }
            Err(_) => {
                ctx.error("audit transport");
                Duration::from_millis(200 << attempt.min(3))
            }
        };
        tokio::time::sleep(wait).await;
    }
    false
}

/// Reads the whole history of `bucket` (device `i`'s credentials) and checks every op id
/// sent to it: none applied twice, every acknowledged one there. Whether it could be read.
async fn audit_history(
    ctx: &Ctx,
    i: usize,
    http: &reqwest::Client,
    base: &str,
    creds: &Credentials,
    bucket: &str,
) -> bool {
    let mut changes = Vec::new();
    let mut since = 0u64;
    let mut oldest = None;
    let mut attempts = 0u32;
    loop {
        let url = format!(
            "{}/v1/buckets/{bucket}/history?since_version={since}&limit=1000",
            base.trim_end_matches('/')
        );
        let r = http
            .get(&url)
            .header(AUTHORIZATION, basic_header(creds))
            .timeout(ctx.cfg.request_timeout)
            .send()
            .await;
        let page = match r {
            Ok(r) if r.status().is_success() => r.json::<HistoryResponse>().await.ok(),
            Ok(r) => {
                ctx.error(format!("audit history {}", r.status().as_u16()));
                None
            }
            Err(_) => {
                ctx.error("audit history transport");
                None
            }
        };
        let Some(page) = page else {
            attempts += 1;
            if attempts >= AUDIT_ATTEMPTS {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(200 << attempts.min(3))).await;
            continue;
        };
        oldest.get_or_insert(page.oldest_version);
        changes.extend(page.changes);
        match page.next_since_version {
            Some(next) if next > since => since = next,
            _ => break,
        }
    }
    let (found, audit) =
        lock(&ctx.devices[i].track).audit_history(bucket, oldest.unwrap_or(1), &changes);
    {
        let mut total = lock(&ctx.stats.op_audit);
        total.ops_in_history += audit.ops_in_history;
        total.ops_checked += audit.ops_checked;
        total.retried_checked += audit.retried_checked;
    }
    for v in found {
        ctx.violation(v);
    }
    true
}

/// Reports every acknowledged write that is overdue.
fn sweep(ctx: &Ctx) {
    let now = Instant::now();
    let faults = ctx
        .cfg
        .faults
        .as_ref()
        .map(FaultWindows::spans)
        .unwrap_or_default();
    for d in &ctx.devices {
        let overdue = lock(&d.track).overdue_between_faults(
            now,
            ctx.cfg.notify_deadline,
            &faults,
            ctx.cfg.fault_recovery,
        );
        for v in overdue {
            ctx.violation(v);
        }
    }
}

fn progress(ctx: &Ctx, extra: &str) {
    if ctx.pb.is_hidden() {
        return;
    }
    let s = &ctx.stats;
    let elapsed = ctx.start.elapsed();
    ctx.pb.set_position(elapsed.as_secs());
    let p50 = {
        let h = lock(&s.latency);
        if h.is_empty() {
            0.0
        } else {
            h.value_at_quantile(0.5) as f64 / 1000.0
        }
    };
    ctx.pb.set_message(format!(
        "connected {}/{} · updates {} ({:.0}/s) · notify p50 {:.1} ms · violations {} · errors {} {extra}",
        s.connected.load(Ordering::Relaxed),
        ctx.cfg.devices,
        ctx.updates(),
        ctx.updates() as f64 / elapsed.as_secs_f64().max(1e-3),
        p50,
        lock(&ctx.violations).len(),
        lock(&s.errors).values().sum::<u64>(),
    ));
}

/// One simulated device, until the stop phase.
async fn run_device(ctx: Arc<Ctx>, i: usize) {
    let cfg = &ctx.cfg;
    let dev = ctx.devices[i].clone();
    let mut phase_rx = ctx.phase.clone();
    let n = u32::try_from(cfg.devices).unwrap_or(u32::MAX).max(1);
    let delay = cfg.ramp / n * u32::try_from(i).unwrap_or(u32::MAX);
    tokio::select! {
        _ = tokio::time::sleep(delay) => {}
        _ = phase_rx.wait_for(|p| *p > Phase::Load) => return,
    }
    let default = match default_credentials(&cfg.mfg_key, &dev.serial, &cfg.key_id) {
        Ok(c) => c,
        Err(e) => {
            ctx.error(format!("invalid default credentials: {e}"));
            return;
        }
    };
    let seed = cfg.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (i as u64);
    // A sleeping device woken by push says when it syncs next: the end of its sleep.
    let next_sync_ms = match (&cfg.push, cfg.sleep_every) {
        (Some(_), Some(_)) => u64::try_from(cfg.sleep_for.as_millis()).unwrap_or(u64::MAX),
        _ => 0,
    };
    let mut pushed = dev.pushed.subscribe();
    let mut client = DeviceClient::new(ClientConfig {
        next_sync_ms,
        device_id: dev.serial.clone(),
        device_type: cfg.device_type.clone(),
        sw_version: cfg.sw_version.clone(),
        base_url: ctx.url_of(i).to_string(),
        session: format!("dev-{}", dev.serial),
        subscribe_timeout_ms: cfg.subscribe_timeout_ms,
        backoff_initial_ms: 200,
        backoff_max_ms: 2_000,
        jitter_seed: seed,
        default_credentials: default,
        auth_backoff_max_ms: 10_000,
        // Unique per run (and per reboot of a real device), never derived from the seed:
        // two runs against the same node must not share op ids.
        op_id_nonce: rand::random(),
        max_answer_bytes: cfg.max_answer_bytes,
    });
    if let Some(c) = cfg.provisioned.get(i) {
        // Provisioned earlier (a factory step, or registered over TLS): the device comes
        // back with its assigned set, as after a reboot.
        client.restore_credentials(c.clone());
        *lock(&dev.creds) = client.assigned_credentials().cloned();
    }
    let http = ctx.http_of(i);
    let mut rng = StdRng::seed_from_u64(seed);
    let device_bucket = format!("device.{}", dev.serial);
    // Changes, sleeps and dropped connections are scheduled when the load phase starts.
    let mut loading = false;
    let mut next_update = None;
    let mut next_toggle = None;
    let drop_mean =
        (cfg.flaky_per_min > 0.0).then(|| Duration::from_secs_f64(60.0 / cfg.flaky_per_min));
    let mut next_drop = None;
    let mut asleep = false;
    let mut own_seq = 0u64;
    // The `temperature` the PUT in flight carries (the client has at most one; its answer
    // is the only one reported as `ChangeAcked`).
    let mut own_in_flight: Option<u64> = None;
    let mut registered_once = false;
    let mut regressions_seen: HashSet<(String, u64, u64)> = HashSet::new();
    let mut late_seen = 0u64;
    // The versions the device held when each request in flight was sent, and those of the
    // request answered last: an answer older than what the device held *before it asked*
    // is a regression; one older than a version learnt meanwhile (its own PUT answered
    // first on another connection) is only a reordering (see `checker`).
    let mut held_at_send: HashMap<u64, HashMap<String, u64>> = HashMap::new();
    let mut answered_held: HashMap<String, u64> = HashMap::new();
    let mut requests: JoinSet<(u64, Response)> = JoinSet::new();
    let mut in_flight: HashMap<u64, AbortHandle> = HashMap::new();
    // What each request in flight was, and what the last answer fed to the client answered
    // (to say which exchange a regression came with).
    let mut kinds: HashMap<u64, &'static str> = HashMap::new();
    let mut last_answered = "";
    let (cred_tx, mut cred_rx) = mpsc::unbounded_channel::<Credentials>();

    loop {
        let phase = ctx.phase();
        if phase == Phase::Stop {
            break;
        }
        if phase == Phase::Load && !loading {
            loading = true;
            let start = Instant::now();
            next_update = (cfg.update_rate > 0.0).then(|| {
                start + exp_sample(&mut rng, Duration::from_secs_f64(1.0 / cfg.update_rate))
            });
            next_toggle = cfg.sleep_every.map(|m| start + exp_sample(&mut rng, m));
            next_drop = drop_mean.map(|m| start + exp_sample(&mut rng, m));
        }
        if phase == Phase::Drain {
            if asleep {
                asleep = false;
                lock(&dev.track).wake(Instant::now());
            }
            next_update = None;
            next_toggle = None;
            next_drop = None;
        }
        if !asleep {
            let now_ms = ctx.now_ms();
            while let Some(out) = client.poll_request(now_ms) {
                if matches!(out.request, Request::Subscribe(_))
                    && !dev.connected.swap(true, Ordering::Relaxed)
                {
                    ctx.stats.connected.fetch_add(1, Ordering::Relaxed);
                }
                let mut lose_answer = false;
                if let Request::Put { id, body } = &out.request {
                    if *id == device_bucket {
                        own_in_flight = body.value.get(DEVICE_FIELD).and_then(Value::as_u64);
                    }
                    if let Some(op) = &body.op_id {
                        lock(&dev.track).sent_op(id, op);
                    }
                    lose_answer = cfg.drop_answers > 0.0 && rng.random::<f64>() < cfg.drop_answers;
                }
                let base = client.base_url().to_string();
                let (http, tx, opts, ctx2) = (http.clone(), cred_tx.clone(), ctx.wire, ctx.clone());
                let token = out.token;
                kinds.insert(token, request_kind(&out.request));
                held_at_send.insert(
                    token,
                    client
                        .buckets()
                        .map(|b| (b.id.clone(), b.version))
                        .collect(),
                );
                let handle = requests.spawn(async move {
                    let (resp, failure) = wire::send(&http, &base, &out, opts, |c| {
                        let _ = tx.send(c);
                    })
                    .await;
                    if let Some(f) = failure {
                        ctx2.failure(request_kind(&out.request), &f);
                    }
                    // The flaky link of `drop_answers`: the server acted, the answer is lost.
                    if lose_answer && matches!(resp, Response::Updated { .. }) {
                        ctx2.stats.answers_dropped.fetch_add(1, Ordering::Relaxed);
                        return (token, Response::Transport);
                    }
                    (token, resp)
                });
                in_flight.insert(token, handle);
            }
        }
        let late = client.late_answers();
        ctx.stats
            .late_answers
            .fetch_add(late - late_seen, Ordering::Relaxed);
        late_seen = late;
        while let Some(ev) = client.poll_event() {
            match ev {
                Event::Registered => {
                    *lock(&dev.sync_url) = client.base_url().to_string();
                    if !registered_once {
                        registered_once = true;
                        ctx.stats.registered.fetch_add(1, Ordering::Relaxed);
                        if !ctx.apps.is_empty() {
                            client.request_pairing_code();
                        }
                    }
                }
                Event::BucketChanged { id, .. } => {
                    if let Some(b) = client.bucket(&id) {
                        let ds = lock(&dev.track).observe(&id, &b.value, Instant::now());
                        ctx.record_deliveries(&ds);
                    }
                }
                Event::VersionRegression { id, held, received } => {
                    let held_before = answered_held.get(&id).copied().unwrap_or(0);
                    if received >= held_before {
                        // Sent before that version was held: reordered connections.
                        ctx.stats.late_answers.fetch_add(1, Ordering::Relaxed);
                    } else if regressions_seen.insert((id.clone(), held, received)) {
                        ctx.say(&format!(
                            "  device {} was sent {id} v{received} (holding v{held}) in the answer to a {last_answered}",
                            dev.serial
                        ));
                        ctx.violation(Violation::VersionRegression {
                            device: dev.serial.clone(),
                            bucket: id,
                            held,
                            received,
                        });
                    }
                }
                Event::ChangeAcked {
                    id,
                    outcome,
                    op_id,
                    version,
                    replayed,
                } => {
                    if let Some(op) = &op_id {
                        lock(&dev.track).acked_op(op, outcome, version, replayed);
                    }
                    ctx.stats.device_updates.fetch_add(1, Ordering::Relaxed);
                    if outcome == tether_proto::api::UpdateOutcome::Refused {
                        ctx.error("put refused");
                    } else if let (true, Some(seq)) = (id == device_bucket, own_in_flight) {
                        lock(&dev.track).acked_final(&id, DEVICE_FIELD, seq);
                    }
                }
                Event::ChangeRejected { status, .. } => ctx.error(format!("put rejected {status}")),
                Event::CredentialsStored { .. } => {
                    *lock(&dev.creds) = client.assigned_credentials().cloned();
                }
                Event::CredentialsDropped { .. } => {
                    *lock(&dev.creds) = None;
                    ctx.error("assigned credentials dropped (401)");
                }
                Event::CredentialsIgnored { .. } => ctx.error("credentials offered for another id"),
                Event::DefaultCredentialsRejected => ctx.error("default credentials rejected"),
                Event::CredentialsMissing => ctx.error("registered without credentials"),
                Event::PairingCode { code, .. } => {
                    let app = &ctx.apps[i % ctx.apps.len()];
                    let _ = app.send((i, code));
                }
                Event::PairingFailed { status } => ctx.error(format!("pairing-code {status}")),
                Event::Redirected { .. } | Event::SoftwareUpdate(_) => {}
            }
        }

        let timeout_at = if asleep {
            None
        } else {
            client.poll_timeout().map(|ms| ctx.instant_of(ms))
        };
        let wake_at = [timeout_at, next_update, next_toggle, next_drop]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
        tokio::select! {
            biased;
            changed = phase_rx.changed() => {
                if changed.is_err() {
                    break;
                }
            }
            Some(c) = cred_rx.recv() => client.accept_credentials(c),
            Some(done) = requests.join_next(), if !requests.is_empty() => {
                if let Ok((token, resp)) = done {
                    in_flight.remove(&token);
                    last_answered = kinds.remove(&token).unwrap_or("dropped request");
                    answered_held = held_at_send.remove(&token).unwrap_or_default();
                    client.handle_response(ctx.now_ms(), token, resp);
                }
            }
            changed = pushed.changed() => {
                if changed.is_err() {
                    continue;
                }
                if asleep {
                    // Woken by push: sync now, then keep the usual awake time.
                    let now = Instant::now();
                    asleep = false;
                    lock(&dev.track).wake(now);
                    ctx.stats.push_wakes.fetch_add(1, Ordering::Relaxed);
                    next_toggle = cfg.sleep_every.map(|m| now + exp_sample(&mut rng, m));
                } else {
                    ctx.stats.push_while_awake.fetch_add(1, Ordering::Relaxed);
                }
            }
            _ = tokio::time::sleep_until(wake_at.into()) => {
                let now = Instant::now();
                if next_update.is_some_and(|t| t <= now) {
                    own_seq += 1;
                    client.set_field(&device_bucket, DEVICE_FIELD, Value::from(own_seq));
                    next_update = Some(now + exp_sample(&mut rng, Duration::from_secs_f64(1.0 / cfg.update_rate)));
                }
                if next_toggle.is_some_and(|t| t <= now) {
                    if asleep {
                        asleep = false;
                        lock(&dev.track).wake(now);
                        next_toggle = cfg.sleep_every.map(|m| now + exp_sample(&mut rng, m));
                    } else {
                        asleep = true;
                        pushed.mark_unchanged();
                        requests.abort_all();
                        in_flight.clear();
                        kinds.clear();
                        held_at_send.clear();
                        client.link_down(ctx.now_ms());
                        lock(&dev.track).sleep();
                        ctx.stats.sleeps.fetch_add(1, Ordering::Relaxed);
                        next_toggle = Some(now + cfg.sleep_for);
                    }
                }
                if next_drop.is_some_and(|t| t <= now) {
                    if !asleep && !in_flight.is_empty() {
                        let now_ms = ctx.now_ms();
                        for (token, h) in in_flight.drain() {
                            h.abort();
                            kinds.remove(&token);
                            held_at_send.remove(&token);
                            ctx.stats.drops.fetch_add(1, Ordering::Relaxed);
                            client.handle_response(now_ms, token, Response::Transport);
                        }
                    }
                    next_drop = drop_mean.map(|m| now + exp_sample(&mut rng, m));
                }
            }
        }
    }
    requests.abort_all();
}

/// A client other than the device writing `{field: seq}` into its `shared.<serial>`
/// bucket: the companion (`user` None: the device's own assigned credentials) or an app.
async fn run_writer(
    ctx: Arc<Ctx>,
    i: usize,
    field: String,
    session: String,
    user: Option<Credentials>,
    rate: f64,
) {
    if rate <= 0.0 {
        return;
    }
    let dev = ctx.devices[i].clone();
    let bucket = format!("shared.{}", dev.serial);
    let http = ctx.http_of(i);
    let mut rng = StdRng::seed_from_u64(ctx.cfg.seed ^ 0x5eed ^ ((i as u64) << 16));
    let mut phase_rx = ctx.phase.clone();
    let mean = Duration::from_secs_f64(1.0 / rate);
    let what = if user.is_some() {
        "app put"
    } else {
        "companion put"
    };
    let mut seq = 0u64;
    let mut base_version = 0u64;
    if phase_rx.wait_for(|p| *p >= Phase::Load).await.is_err() {
        return;
    }
    let nonce = ctx.run_nonce;
    loop {
        // Wait for the next write (and for the device to be connected), or the load's end.
        let pause = exp_sample(&mut rng, mean);
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = phase_rx.wait_for(|p| *p > Phase::Load) => return,
        }
        if !dev.connected.load(Ordering::Relaxed) {
            continue;
        }
        seq += 1;
        let mut attempt = 0u32;
        loop {
            if ctx.phase() == Phase::Stop || attempt >= 6 {
                lock(&dev.track).abandon(&bucket, &field, seq);
                break;
            }
            attempt += 1;
            lock(&dev.track).intend(&bucket, &field, seq, Instant::now());
            let creds = match &user {
                Some(u) => Some(u.clone()),
                None => lock(&dev.creds).clone(),
            };
            let base = ctx.sync_base(i);
            let Some(creds) = creds else {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            };
            let mut value = Fields::new();
            value.insert(field.clone(), Value::from(seq));
            // One op id per write, the same on every attempt (the body too: the base
            // version only moves once a write is acknowledged).
            let op_id = format!("{session}-{nonce:x}-{seq}");
            let body = UpdateRequest {
                value,
                base_version,
                occ: false,
                session: Some(session.clone()),
                op_id: Some(op_id.clone()),
            };
            lock(&dev.track).sent_op(&bucket, &op_id);
            let lose_answer =
                ctx.cfg.drop_answers > 0.0 && rng.random::<f64>() < ctx.cfg.drop_answers;
            let req = http
                .put(format!(
                    "{}/v1/buckets/{bucket}",
                    base.trim_end_matches('/')
                ))
                .header(AUTHORIZATION, basic_header(&creds))
                .header(CONTENT_TYPE, "application/json")
                .timeout(ctx.cfg.request_timeout)
                .json(&body);
            let sent = req.send().await;
            let wait = match sent {
                Ok(r) if r.status().as_u16() == 200 => match r.json::<UpdateResponse>().await {
                    Ok(_) if lose_answer => {
                        // The server acted; the flaky link lost its answer: retry, same op id.
                        ctx.stats.answers_dropped.fetch_add(1, Ordering::Relaxed);
                        ctx.error(format!("{what} answer dropped on purpose"));
                        attempt = attempt.saturating_sub(1);
                        Duration::from_millis(50)
                    }
                    Ok(u) => {
                        base_version = u.version;
                        {
                            let mut track = lock(&dev.track);
                            track.acked_op(&op_id, u.outcome, u.version, u.replayed);
                            track.acked(&bucket, &field, seq, Instant::now());
                        }
                        ctx.stats.writer_updates.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                    Err(_) => {
                        ctx.error(format!("{what} undecodable answer"));
                        Duration::from_millis(200)
                    }
                },
                Ok(r) => {
                    let status = r.status().as_u16();
                    ctx.error(format!("{what} {status}"));
                    let retry_after = r
                        .headers()
                        .get(RETRY_AFTER)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.trim().parse::<u64>().ok());
                    match status {
                        401 | 408 | 429 | 500..=599 => {
                            Duration::from_secs(retry_after.unwrap_or(0).min(5))
                                .max(Duration::from_millis(200 << attempt.min(4)))
                        }
                        _ => {
                            // Refused for good (403, 404, 400): nothing to demand.
                            lock(&dev.track).abandon(&bucket, &field, seq);
                            break;
                        }
                    }
                }
                Err(e) => {
                    ctx.error(if e.is_timeout() {
                        format!("{what} timeout")
                    } else {
                        format!("{what} transport")
                    });
                    Duration::from_millis(200 << attempt.min(4))
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = phase_rx.wait_for(|p| *p == Phase::Stop) => {}
            }
        }
    }
}

/// An app (one user): redeems the pairing codes of its devices (up to 16 at a time), then
/// writes to each.
async fn run_app(ctx: Arc<Ctx>, u: usize, mut codes: mpsc::UnboundedReceiver<(usize, String)>) {
    let user = ctx.cfg.users[u].clone();
    let mut phase_rx = ctx.phase.clone();
    let pairing = Arc::new(tokio::sync::Semaphore::new(16));
    let mut devices = JoinSet::new();
    loop {
        let next = tokio::select! {
            c = codes.recv() => c,
            _ = phase_rx.wait_for(|p| *p > Phase::Load) => None,
        };
        let Some((i, code)) = next else { break };
        devices.spawn(app_device(
            ctx.clone(),
            user.clone(),
            i,
            code,
            pairing.clone(),
        ));
    }
    while devices.join_next().await.is_some() {}
}

/// One device of an app: pair it, then write to it.
async fn app_device(
    ctx: Arc<Ctx>,
    user: Credentials,
    i: usize,
    code: String,
    pairing: Arc<tokio::sync::Semaphore>,
) {
    let user_id = user.id.trim_start_matches("u.").to_string();
    let mut phase_rx = ctx.phase.clone();
    let http = ctx.http_of(i);
    let base = ctx.url_of(i).to_string();
    let body = json!({"code": code, "structure": format!("sim-{user_id}")});
    let mut paired = false;
    {
        let Ok(_permit) = pairing.acquire().await else {
            return;
        };
        // Retried until the load phase ends: an app with many devices meets the server's
        // per-principal rate limit (429 with Retry-After) while pairing them all.
        for attempt in 0..u32::MAX {
            if ctx.phase() > Phase::Load {
                break;
            }
            let r = http
                .post(format!("{}/v1/pair", base.trim_end_matches('/')))
                .header(AUTHORIZATION, basic_header(&user))
                .timeout(ctx.cfg.request_timeout)
                .json(&body)
                .send()
                .await;
            let backoff = Duration::from_millis(200 << attempt.min(4));
            let wait = match r {
                Ok(r) if r.status().is_success() => {
                    paired = true;
                    break;
                }
                Ok(r) => {
                    let status = r.status().as_u16();
                    ctx.error(format!("pair {status}"));
                    if !(status == 429 || status >= 500) {
                        break;
                    }
                    let retry_after = r
                        .headers()
                        .get(RETRY_AFTER)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.trim().parse::<u64>().ok());
                    retry_after.map_or(backoff, |s| Duration::from_secs(s.min(5)))
                }
                Err(_) => {
                    ctx.error("pair transport");
                    backoff
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = phase_rx.wait_for(|p| *p > Phase::Load) => break,
            }
        }
    }
    if paired {
        ctx.stats.paired.fetch_add(1, Ordering::Relaxed);
        run_writer(
            ctx.clone(),
            i,
            APP_FIELD.to_string(),
            format!("app-{user_id}"),
            Some(user),
            ctx.cfg.app_rate,
        )
        .await;
    }
}
