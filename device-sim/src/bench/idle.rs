//! Idle subscriptions: hold `count` concurrent subscriptions against one server process
//! and report its resident memory per held subscription — Tether and mosquitto side by
//! side, same count, same run.
//!
//! A process here may open at most 20,000 files, so the clients are spread over
//! `procs` client processes, each connecting from its own loopback source address so
//! ephemeral ports never run out. Each invocation takes its addresses from a block of
//! 127/8 of its own (chosen by the clock, [`source`]): the ports an earlier invocation
//! left in TIME_WAIT (60 s) are on other addresses, so back-to-back runs ramp alike. Tether's clients are `tether-sim` processes (real devices: register, fetch,
//! hold a subscribe; no updates); mosquitto's are `tether-bench mqtt-hold` processes (a
//! minimal MQTT 3.1.1 client: CONNECT with keep-alive off, SUBSCRIBE QoS 1 to its own
//! topic, then silence — rumqttc cannot choose a source address).
//!
//! RSS per subscription = (RSS while holding − RSS right after start) / count. For Tether
//! that includes the bucket-set actor each device keeps active, its credential and
//! registration caches, and the HTTP connection; for mosquitto the client session and
//! its connection.
//!
//! With `nodes` > 1, that many Tether nodes hold `count` each, to show one machine holding
//! more subscriptions than one process may: *independent* nodes (separate processes, data
//! directories and keys), or with `cluster` one Tether cluster on a private PostgreSQL —
//! devices register through node i, are allocated to the node owning their bucket set
//! (its `sync_url`) and hold their subscribe there, so each node holds its ring share.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use futures::stream::{self, StreamExt};
use serde::Serialize;
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpSocket, TcpStream};
use tokio::process::{Child, Command};

use super::plot::{self, Panel};
use super::procs;
use super::{now_utc, ratio, tether, write_json, Machine, Spread};

/// Options of `tether-bench idle-subscriptions`.
#[derive(Debug, Clone)]
pub struct Opts {
    /// The `tether` binary.
    pub tether_bin: PathBuf,
    /// The `tether-sim` binary.
    pub sim_bin: PathBuf,
    /// Repetitions.
    pub runs: usize,
    /// Subscriptions held per server process.
    pub count: usize,
    /// Client processes per server.
    pub procs: usize,
    /// Tether nodes: independent ones each holding `count`, or (with `cluster`) one
    /// cluster holding `nodes × count`.
    pub nodes: usize,
    /// Run the nodes as one cluster on a shared PostgreSQL.
    pub cluster: bool,
    /// Devices each client process starts per second.
    pub ramp_per_s: f64,
    /// Seconds the clients may take to get every subscription held.
    pub connect_limit_s: u64,
    /// Skip mosquitto.
    pub skip_mosquitto: bool,
    /// Also measure Tether with the held devices' sets parked (`--passivate-after-ms`
    /// [`PARKED_AFTER_MS`]: their actors stopped, each subscription a waiter record), in the
    /// same run; not with `cluster`.
    pub parked: bool,
    /// Where results go.
    pub out: PathBuf,
}

/// One server's measurement.
#[derive(Debug, Clone, Serialize)]
pub struct Held {
    /// Subscriptions held when measured.
    pub held: usize,
    /// RSS right after start, KiB.
    pub rss_base_kib: u64,
    /// RSS while holding, KiB.
    pub rss_held_kib: u64,
    /// (held − base) / held, KiB.
    pub kib_per_subscription: f64,
    /// Seconds until every subscription was held.
    pub setup_s: f64,
}

/// The parked measurement's `--passivate-after-ms`.
pub const PARKED_AFTER_MS: u64 = 2_000;

/// One run.
#[derive(Debug, Clone, Serialize)]
pub struct Run {
    /// Each Tether node.
    pub tether: Vec<Held>,
    /// Each Tether node with its held sets parked, if measured.
    pub tether_parked: Option<Vec<Held>>,
    /// mosquitto, if measured.
    pub mosquitto: Option<Held>,
}

/// The `i`th client source address of this invocation: 127.a.b.c with c in 2..=251, from
/// a run of [`PER_RUN`] blocks of 250 chosen once per process by the clock. An invocation
/// started a second or more after another (and within the hour) uses other addresses for
/// its first 4,000 sources.
fn source(i: usize) -> IpAddr {
    static FIRST: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    let first = *FIRST.get_or_init(|| {
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        usize::try_from(secs % (BLOCKS / PER_RUN) as u64).unwrap_or(0) * PER_RUN
    });
    source_in(first, i)
}

/// Blocks of 250 addresses in 127/8: 127.a.b.* with a in 1..=254 and b in 0..=255.
const BLOCKS: usize = 254 * 256;
/// Blocks one invocation starts with.
const PER_RUN: usize = 16;

fn source_in(block: usize, i: usize) -> IpAddr {
    let n = (block + i / 250) % BLOCKS;
    let octet = |x: usize| u8::try_from(x).unwrap_or(0);
    IpAddr::V4(Ipv4Addr::new(
        127,
        octet(1 + n / 256),
        octet(n % 256),
        octet(2 + i % 250),
    ))
}

/// Waits (bounded) until `probe` returns `Some(n)` with `n >= target`.
async fn wait_until<F, Fut>(limit: Duration, target: usize, mut probe: F) -> Result<usize>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<usize>>,
{
    let until = Instant::now() + limit;
    let mut last = 0;
    loop {
        if let Some(n) = probe().await {
            last = n;
            if n >= target {
                return Ok(n);
            }
        }
        if Instant::now() >= until {
            bail!("only {last} of {target} subscriptions held after {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn kill_all(children: &mut [Child]) {
    for c in children.iter_mut() {
        let _ = c.start_kill();
    }
}

async fn tether_nodes(o: &Opts, src_offset: usize, parked: bool) -> Result<Vec<Held>> {
    let after = PARKED_AFTER_MS.to_string();
    let extra: &[&str] = if parked {
        &["--passivate-after-ms", &after]
    } else {
        &[]
    };
    let mut nodes = Vec::new();
    for _ in 0..o.nodes {
        nodes.push(tether::start(&o.tether_bin, extra).await?);
    }
    let out = hold_on(
        o,
        &nodes.iter().collect::<Vec<_>>(),
        src_offset,
        false,
        parked,
    )
    .await;
    for n in nodes {
        n.server.stop().await;
    }
    out
}

/// One Tether *cluster* of `nodes` members on a private PostgreSQL holding
/// `nodes × count` subscriptions: devices register through node i, are allocated to
/// their set's owner (`sync_url`), and hold their subscribe there.
async fn tether_cluster(o: &Opts, src_offset: usize) -> Result<Vec<Held>> {
    let cluster = tether::Cluster::start(&o.tether_bin, o.nodes, "idle").await?;
    hold_on(o, &cluster.nodes(), src_offset, true, false).await
}

/// Holds subscriptions on `nodes` from `o.procs` `tether-sim` processes per node and
/// measures every node's RSS. Independent nodes must each hold `o.count`; a cluster's
/// nodes hold `nodes × count` between them (each device subscribes at its set's owner).
/// With `parked`, the measurement waits until the nodes keep at most 1 % of their held
/// sets in memory (the others parked).
async fn hold_on(
    o: &Opts,
    nodes: &[&tether::TetherNode],
    src_offset: usize,
    cluster: bool,
    parked: bool,
) -> Result<Vec<Held>> {
    let http = reqwest::Client::new();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let bases: Vec<u64> = nodes.iter().map(|n| n.server.rss_kib()).collect();
    let started = Instant::now();
    let per = o.count.div_ceil(o.procs);
    let mut sims: Vec<Child> = Vec::new();
    let mut src = src_offset;
    for (i, node) in nodes.iter().enumerate() {
        for p in 0..o.procs {
            let n = per.min(o.count - (p * per).min(o.count));
            if n == 0 {
                continue;
            }
            let mut cmd = Command::new(&o.sim_bin);
            cmd.args(["--url", node.url(), "--mfg-key-file"])
                .arg(&node.key_path)
                .args(["--key-id", "k1", "--serial-prefix", &format!("IDLE{i}X")])
                .args(["--devices", &n.to_string()])
                .args(["--first-index", &(p * per).to_string()])
                .args(["--local-address", &source(src).to_string()])
                .args(["--update-rate", "0", "--companion-rate", "0"])
                .args(["--subscribe-timeout-ms", "1800000"])
                .args(["--request-timeout-ms", "60000"])
                .args(["--setup-timeout-s", &o.connect_limit_s.to_string()])
                .args(["--duration-s", &(o.connect_limit_s + 120).to_string()])
                .args(["--ramp-s", &(n as f64 / o.ramp_per_s).to_string()])
                .args(["--quiet", "--json"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .kill_on_drop(true);
            sims.push(cmd.spawn().context("spawning tether-sim")?);
            src += 1;
        }
    }
    let limit = Duration::from_secs(o.connect_limit_s);
    let held_on = |url: String| {
        let http = http.clone();
        async move {
            tether::metric(&http, &url, "tether_held_subscriptions")
                .await
                .map(|v| v as usize)
        }
    };
    let waited = if cluster {
        let urls: Vec<String> = nodes.iter().map(|n| n.url().to_string()).collect();
        wait_until(limit, o.count * nodes.len(), || {
            let urls = urls.clone();
            let held_on = &held_on;
            async move {
                let mut sum = 0;
                for u in urls {
                    sum += held_on(u).await?;
                }
                Some(sum)
            }
        })
        .await
        .map(|_| ())
    } else {
        let mut r = Ok(());
        for node in nodes {
            let url = node.url().to_string();
            if let Err(e) = wait_until(limit, o.count, || held_on(url.clone())).await {
                r = Err(e);
                break;
            }
        }
        r
    };
    if let Err(e) = waited {
        kill_all(&mut sims);
        return Err(e.context("tether"));
    }
    let setup_s = started.elapsed().as_secs_f64();
    if parked {
        for node in nodes {
            let url = node.url().to_string();
            let until = Instant::now() + Duration::from_secs(o.connect_limit_s);
            loop {
                let active = tether::metric(&http, &url, "tether_active_bucket_sets").await;
                if active.is_some_and(|a| a <= o.count as f64 / 100.0) {
                    break;
                }
                if Instant::now() >= until {
                    kill_all(&mut sims);
                    bail!(
                        "{url}: {active:?} bucket sets still active, not parked, after {:?}",
                        o.connect_limit_s
                    );
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
    // Let allocations settle, then measure every node.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut out = Vec::new();
    for (node, base) in nodes.iter().zip(&bases) {
        let held = held_on(node.url().to_string()).await.unwrap_or(0);
        let rss = node.server.rss_kib();
        out.push(Held {
            held,
            rss_base_kib: *base,
            rss_held_kib: rss,
            kib_per_subscription: ratio(rss.saturating_sub(*base) as f64, held as f64),
            setup_s,
        });
    }
    kill_all(&mut sims);
    for mut s in sims {
        let _ = s.wait().await;
    }
    Ok(out)
}

async fn mosquitto_held(o: &Opts, src_offset: usize) -> Result<Held> {
    let server = procs::start_mosquitto().await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let base = server.rss_kib();
    let exe = std::env::current_exe()?;
    let started = Instant::now();
    let per = o.count.div_ceil(o.procs);
    let mut holders = Vec::new();
    let mut lines = Vec::new();
    for p in 0..o.procs {
        let n = per.min(o.count - (p * per).min(o.count));
        if n == 0 {
            continue;
        }
        let mut child = Command::new(&exe)
            .args(["mqtt-hold", "--port", &server.port.to_string()])
            .args(["--count", &n.to_string(), "--first", &(p * per).to_string()])
            .args(["--local-address", &source(src_offset + p).to_string()])
            .args(["--secs", &(o.connect_limit_s + 120).to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("spawning mqtt-hold")?;
        let out = child.stdout.take().context("mqtt-hold stdout")?;
        lines.push(BufReader::new(out).lines());
        holders.push(child);
    }
    let mut held = 0;
    let until = Instant::now() + Duration::from_secs(o.connect_limit_s);
    for l in &mut lines {
        let left = until.saturating_duration_since(Instant::now());
        let line = tokio::time::timeout(left, l.next_line()).await;
        match line {
            Ok(Ok(Some(s))) => {
                held += s
                    .strip_prefix("held ")
                    .and_then(|n| n.trim().parse::<usize>().ok())
                    .unwrap_or(0);
            }
            _ => {
                kill_all(&mut holders);
                bail!("an mqtt-hold process did not report its subscriptions in time");
            }
        }
    }
    let setup_s = started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss = server.rss_kib();
    kill_all(&mut holders);
    for mut h in holders {
        let _ = h.wait().await;
    }
    server.stop().await;
    Ok(Held {
        held,
        rss_base_kib: base,
        rss_held_kib: rss,
        kib_per_subscription: ratio(rss.saturating_sub(base) as f64, held as f64),
        setup_s,
    })
}

/// `tether-bench idle-subscriptions`.
pub async fn run(o: Opts) -> Result<()> {
    let machine = Machine::probe();
    let (_, date) = now_utc();
    if o.parked && o.cluster {
        bail!("--parked measures independent nodes only (not with --cluster)");
    }
    let mut runs = Vec::new();
    for r in 0..o.runs {
        // Fresh source addresses per run and server: no TIME_WAIT left from the last one.
        let offset = r * (o.procs * (2 * o.nodes + 1));
        let t = if o.cluster {
            tether_cluster(&o, offset).await?
        } else {
            tether_nodes(&o, offset, false).await?
        };
        let tp = if o.parked {
            Some(tether_nodes(&o, offset + o.procs * o.nodes, true).await?)
        } else {
            None
        };
        let m = if o.skip_mosquitto {
            None
        } else {
            Some(mosquitto_held(&o, offset + 2 * o.procs * o.nodes).await?)
        };
        for (i, h) in tp.iter().flatten().enumerate() {
            eprintln!(
                "run {} tether node {} parked: {} held, RSS {} → {} KiB = {:.2} KiB/subscription (setup {:.0} s)",
                r + 1,
                i + 1,
                h.held,
                h.rss_base_kib,
                h.rss_held_kib,
                h.kib_per_subscription,
                h.setup_s
            );
        }
        for (i, h) in t.iter().enumerate() {
            eprintln!(
                "run {} tether node {}: {} held, RSS {} → {} KiB = {:.2} KiB/subscription (setup {:.0} s)",
                r + 1,
                i + 1,
                h.held,
                h.rss_base_kib,
                h.rss_held_kib,
                h.kib_per_subscription,
                h.setup_s
            );
        }
        if let Some(h) = &m {
            eprintln!(
                "run {} mosquitto: {} held, RSS {} → {} KiB = {:.2} KiB/subscription (setup {:.0} s)",
                r + 1,
                h.held,
                h.rss_base_kib,
                h.rss_held_kib,
                h.kib_per_subscription,
                h.setup_s
            );
        }
        runs.push(Run {
            tether: t,
            tether_parked: tp,
            mosquitto: m,
        });
    }
    let tether_kib = Spread::of(
        &runs
            .iter()
            .flat_map(|r| r.tether.iter().map(|h| h.kib_per_subscription))
            .collect::<Vec<_>>(),
    );
    let mosq_kib = Spread::of(
        &runs
            .iter()
            .filter_map(|r| r.mosquitto.as_ref().map(|h| h.kib_per_subscription))
            .collect::<Vec<_>>(),
    );
    let ratio_s = Spread::of(
        &runs
            .iter()
            .filter_map(|r| {
                let m = r.mosquitto.as_ref()?;
                let t = r.tether.first()?;
                Some(ratio(t.kib_per_subscription, m.kib_per_subscription))
            })
            .collect::<Vec<_>>(),
    );
    let parked_kib = Spread::of(
        &runs
            .iter()
            .flat_map(|r| {
                r.tether_parked
                    .iter()
                    .flatten()
                    .map(|h| h.kib_per_subscription)
            })
            .collect::<Vec<_>>(),
    );
    let parked_ratio = |of: &dyn Fn(&Run) -> Option<f64>| {
        Spread::of(
            &runs
                .iter()
                .filter_map(|r| {
                    let p = r.tether_parked.as_ref()?.first()?;
                    Some(ratio(p.kib_per_subscription, of(r)?))
                })
                .collect::<Vec<_>>(),
        )
    };
    let parked_over_actors =
        parked_ratio(&|r: &Run| r.tether.first().map(|h| h.kib_per_subscription));
    let parked_over_mosquitto =
        parked_ratio(&|r: &Run| r.mosquitto.as_ref().map(|h| h.kib_per_subscription));
    let total_held = Spread::of(
        &runs
            .iter()
            .map(|r| r.tether.iter().map(|h| h.held as f64).sum())
            .collect::<Vec<_>>(),
    );
    let mosquitto_part = if o.skip_mosquitto {
        "mosquitto skipped".to_string()
    } else {
        format!(
            "mosquitto {} KiB/subscription, ratio tether/mosquitto {}",
            mosq_kib.show(2),
            ratio_s.show(2)
        )
    };
    if o.parked {
        println!(
            "idle-subscriptions, parked (--passivate-after-ms {PARKED_AFTER_MS}): tether {} KiB/subscription, ratio parked/actors kept {}, parked/mosquitto {}",
            parked_kib.show(2),
            parked_over_actors.show(2),
            parked_over_mosquitto.show(2)
        );
    }
    println!(
        "idle-subscriptions ({} runs, {} per process, {} tether node(s)): tether {} KiB/subscription, {mosquitto_part}; held by tether nodes on this machine: {}",
        o.runs,
        o.count,
        o.nodes,
        tether_kib.show(2),
        total_held.show(0)
    );
    let result = json!({
        "benchmark": "idle-subscriptions", "date": date, "machine": machine,
        "params": {"runs": o.runs, "count_per_server": o.count, "client_processes": o.procs,
                   "tether_nodes": o.nodes, "cluster": o.cluster, "parked": o.parked,
                   "parked_after_ms": PARKED_AFTER_MS},
        "runs": runs,
        "summary": {"tether_kib_per_subscription": tether_kib,
                    "mosquitto_kib_per_subscription": mosq_kib,
                    "ratio_tether_over_mosquitto": ratio_s,
                    "tether_parked_kib_per_subscription": parked_kib,
                    "ratio_parked_over_actors_kept": parked_over_actors,
                    "ratio_parked_over_mosquitto": parked_over_mosquitto,
                    "tether_total_held": total_held},
    });
    let path = write_json(&o.out, "idle-subscriptions", &result)?;
    // With `--parked`, the parked figure (the issue's) beside the one with actors kept.
    let tether_bars = |kept: Spread| {
        if o.parked {
            vec![
                ("tether, actors kept".to_string(), kept),
                ("tether, parked".to_string(), parked_kib.clone()),
            ]
        } else {
            vec![("tether".to_string(), kept)]
        }
    };
    let mut panels = Vec::new();
    if o.skip_mosquitto {
        panels.push(Panel::new(
            "RSS per subscription",
            "KiB",
            tether_bars(tether_kib),
        ));
        panels.push(Panel::new(
            "held on this machine",
            "subscriptions",
            vec![(format!("{} tether nodes", o.nodes), total_held)],
        ));
    } else {
        let mut rss = tether_bars(tether_kib);
        rss.push(("mosquitto".to_string(), mosq_kib));
        panels.push(Panel::new("RSS per subscription", "KiB", rss));
        let mut ratios = vec![(
            if o.parked { "actors kept" } else { "ratio" }.to_string(),
            ratio_s,
        )];
        if o.parked {
            ratios.push(("parked".to_string(), parked_over_mosquitto));
        }
        panels.push(Panel::new("tether / mosquitto", "ratio", ratios));
    }
    plot::bars(
        &o.out.join("idle-subscriptions.png"),
        &format!(
            "Idle subscriptions: server RSS per held subscription ({} per process, {} tether node(s))",
            o.count, o.nodes
        ),
        &panels,
    )?;
    println!("results: {}", path.display());
    Ok(())
}

// ---------------------------------------------------------------------------------------
// the minimal MQTT holder

fn mqtt_string(buf: &mut Vec<u8>, s: &str) {
    let len = u16::try_from(s.len()).unwrap_or(u16::MAX);
    buf.extend_from_slice(&len.to_be_bytes());
    buf.extend_from_slice(s.as_bytes());
}

fn mqtt_packet(first: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![first];
    let mut len = body.len();
    loop {
        let mut b = u8::try_from(len % 128).unwrap_or(0);
        len /= 128;
        if len > 0 {
            b |= 0x80;
        }
        out.push(b);
        if len == 0 {
            break;
        }
    }
    out.extend_from_slice(body);
    out
}

/// Connects one MQTT 3.1.1 session from `local` and subscribes it (QoS 1) to `topic`.
async fn mqtt_hold_one(
    server: SocketAddr,
    local: IpAddr,
    id: &str,
    topic: &str,
) -> Result<TcpStream> {
    let sock = TcpSocket::new_v4()?;
    sock.bind(SocketAddr::new(local, 0))?;
    let mut s = sock.connect(server).await?;
    s.set_nodelay(true)?;
    let mut connect = Vec::new();
    mqtt_string(&mut connect, "MQTT");
    connect.extend_from_slice(&[4, 0x02, 0, 0]); // level 4, clean session, keep-alive off
    mqtt_string(&mut connect, id);
    s.write_all(&mqtt_packet(0x10, &connect)).await?;
    let mut connack = [0u8; 4];
    s.read_exact(&mut connack).await?;
    if connack[0] != 0x20 || connack[3] != 0 {
        bail!("CONNACK refused: {connack:?}");
    }
    let mut sub = vec![0, 1];
    mqtt_string(&mut sub, topic);
    sub.push(1);
    s.write_all(&mqtt_packet(0x82, &sub)).await?;
    let mut suback = [0u8; 5];
    s.read_exact(&mut suback).await?;
    if suback[0] != 0x90 || suback[4] == 0x80 {
        bail!("SUBACK refused: {suback:?}");
    }
    Ok(s)
}

/// `tether-bench mqtt-hold`: opens `count` subscribed sessions from `local`, prints
/// `held <n>`, and holds them for `secs` (its parent kills it sooner).
pub async fn mqtt_hold(
    port: u16,
    count: usize,
    first: usize,
    local: IpAddr,
    secs: u64,
) -> Result<()> {
    let server = SocketAddr::from(([127, 0, 0, 1], port));
    let results: Vec<Result<TcpStream>> = stream::iter(first..first + count)
        .map(|i| async move {
            let id = format!("idle-{i}");
            let topic = format!("idle/{i}");
            let mut last = None;
            for attempt in 0..5u32 {
                match mqtt_hold_one(server, local, &id, &topic).await {
                    Ok(s) => return Ok(s),
                    Err(e) => last = Some(e),
                }
                tokio::time::sleep(Duration::from_millis(100 << attempt)).await;
            }
            Err(last.unwrap_or_else(|| anyhow::anyhow!("no attempt")))
        })
        .buffer_unordered(128)
        .collect()
        .await;
    let mut held = Vec::new();
    let mut failed = 0;
    for r in results {
        match r {
            Ok(s) => held.push(s),
            Err(_) => failed += 1,
        }
    }
    println!("held {}", held.len());
    if failed > 0 {
        eprintln!("mqtt-hold: {failed} sessions failed");
    }
    tokio::time::sleep(Duration::from_secs(secs)).await;
    drop(held);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn invocations_a_second_apart_use_other_source_addresses() {
        let run = |second: usize| -> HashSet<IpAddr> {
            (0..PER_RUN * 250)
                .map(|i| source_in(second * PER_RUN, i))
                .collect()
        };
        let first = run(7);
        assert_eq!(first.len(), PER_RUN * 250, "distinct within a run");
        assert!(first.is_disjoint(&run(8)));
        assert!(first.iter().all(|a| match a {
            IpAddr::V4(v4) => v4.is_loopback() && !matches!(v4.octets()[3], 0 | 1 | 255),
            IpAddr::V6(_) => false,
        }));
        // The last run before the clock wraps stays in 127/8 and wraps to the first.
        let last = run(BLOCKS / PER_RUN - 1);
        assert_eq!(last.len(), PER_RUN * 250);
        assert!(last.is_disjoint(&run(0)));
    }
}
