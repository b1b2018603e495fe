//! The cluster data path (issue 16), each figure against a baseline measured in the same
//! run:
//!
//! - **durable PUT/s**: the closed-loop PUT client of `http-ceiling` against a 3-node
//!   cluster on a private PostgreSQL (connections spread over the nodes, devices
//!   registered through each) vs the same client against one node on its embedded store;
//! - **cold registrations/s**: new devices (default credentials) registered through one
//!   node of the cluster vs through the embedded-store node, same concurrency;
//! - **kill -9 failover**: probe devices write through a surviving node every
//!   [`PROBE_EVERY`] while one node is killed with `kill -9` (then started again and the
//!   cluster left to settle before the next kill). Per kill: the longest time any probe
//!   went without a successful write across the kill (the killed node's sets served
//!   again), and the probe requests that failed (non-2xx or no answer) meanwhile.
//!
//! - **false suspicion** (`--watch-secs N`, off by default): a fresh cluster left idle for
//!   N s, then saturated by the PUT load on every node for N s; every node's
//!   `tether_cluster_member_changes_total{change="down"}` and
//!   `tether_lease_takeovers_total` must not move (nobody was killed: any down is a live
//!   node declared dead, any take-over a set moved off a live owner).
//!
//! `--nodes 1` runs the throughput comparisons against a one-node "cluster" on the same
//! PostgreSQL (what the shared store costs, with no forwarding); `--node-threads 1` starts
//! each cluster node with one HTTP worker and one actor thread (three nodes sized to their
//! share of two cores).
//!
//! Loopback, one machine: every node, PostgreSQL and the clients share its cores, so the
//! ratios are what to read. Every loop is bounded in time.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use reqwest::header::AUTHORIZATION;
use serde::Serialize;
use serde_json::json;
use tether_proto::credentials::{basic_header, Credentials};

use super::ceiling::{closed_loop, Load};
use super::{now_utc, procs, ratio, tether, write_json, Machine, Spread};

/// How often each probe device writes during a failover.
pub const PROBE_EVERY: Duration = Duration::from_millis(50);
/// How long the probes run before a kill, and at most after it.
const BEFORE_KILL: Duration = Duration::from_secs(2);
const AFTER_KILL: Duration = Duration::from_secs(12);
/// Nodes of the cluster.
const NODES: usize = 3;

/// Options of `tether-bench cluster`.
#[derive(Debug, Clone, clap::Args)]
pub struct Opts {
    /// The `tether` binary (a release build).
    #[arg(long, default_value = "target/release/tether")]
    pub tether_bin: PathBuf,
    /// Repetitions of the throughput comparisons.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Measured seconds per PUT load (after a 1 s warm-up).
    #[arg(long, default_value_t = 5.0)]
    pub secs: f64,
    /// Concurrent PUT connections (spread over the cluster's nodes).
    #[arg(long, default_value_t = 48)]
    pub conns: usize,
    /// Nodes of the cluster in the throughput comparisons (1: the shared store's cost
    /// without any forwarding; the failovers and the watch always run 3).
    #[arg(long, default_value_t = NODES)]
    pub nodes: usize,
    /// HTTP workers and actor threads of each cluster node in the throughput comparisons
    /// (0: the node's default, one each per CPU; 1: three nodes sized to their share of
    /// two cores). The one-node baseline keeps its default.
    #[arg(long, default_value_t = 0)]
    pub node_threads: usize,
    /// Send each device's PUTs to its set's owner (read from the store's lease table once
    /// every written set is active), as an owner-aware load balancer would: the cluster
    /// without forwarding.
    #[arg(long)]
    pub to_owner: bool,
    /// A PostgreSQL server setting for the cluster's store, `name=value` (repeatable),
    /// e.g. `commit_delay=200`.
    #[arg(long = "pg-set", value_name = "NAME=VALUE", value_parser = pg_setting)]
    pub pg_set: Vec<(String, String)>,
    /// Milliseconds every chunk between the cluster's nodes and PostgreSQL is held, each
    /// way (a proxy on loopback: a store that far away; 0: none). The one-node baseline
    /// keeps its embedded store.
    #[arg(long, default_value_t = 0)]
    pub store_delay_ms: u64,
    /// Devices written by the PUT load.
    #[arg(long, default_value_t = 96)]
    pub devices: usize,
    /// New devices registered per registration measurement.
    #[arg(long, default_value_t = 1000)]
    pub registrations: usize,
    /// Registrations in flight.
    #[arg(long, default_value_t = 32)]
    pub register_concurrency: usize,
    /// kill -9 failovers.
    #[arg(long, default_value_t = 5)]
    pub kills: usize,
    /// Probe devices writing during the failovers.
    #[arg(long, default_value_t = 12)]
    pub probes: usize,
    /// Seconds of the false-suspicion watch, idle and then saturated (0: skipped).
    #[arg(long, default_value_t = 0)]
    pub watch_secs: u64,
    /// Results directory.
    #[arg(long, default_value = "results")]
    pub out: PathBuf,
}

/// `name=value` of `--pg-set`.
fn pg_setting(s: &str) -> std::result::Result<(String, String), String> {
    match s.split_once('=') {
        Some((name, value)) if !name.is_empty() && !value.is_empty() => {
            Ok((name.to_string(), value.to_string()))
        }
        _ => Err(format!("{s:?}: expected name=value")),
    }
}

/// The false-suspicion watch: nobody is killed, so nothing may be declared down.
#[derive(Debug, Clone, Serialize)]
pub struct SuspicionWatch {
    /// Seconds idle, then seconds saturated.
    pub idle_secs: u64,
    pub saturated_secs: u64,
    /// The PUT load of the saturated part (all nodes together).
    pub saturated_put: Load,
    /// Members declared down, summed over the nodes, while idle and while saturated.
    pub downs_idle: u64,
    pub downs_saturated: u64,
    /// Set take-overs (a set moved without a handoff), same parts.
    pub takeovers_idle: u64,
    pub takeovers_saturated: u64,
}

/// One repetition of the throughput comparisons.
#[derive(Debug, Clone, Serialize)]
pub struct Run {
    /// One node on its embedded store.
    pub single_put: Load,
    /// The cluster on PostgreSQL.
    pub cluster_put: Load,
    /// cluster / single.
    pub put_ratio: f64,
    /// Cold registrations per second, one node on its embedded store.
    pub single_registrations_per_s: f64,
    /// Cold registrations per second through one node of the cluster.
    pub cluster_registrations_per_s: f64,
    /// cluster / single.
    pub registration_ratio: f64,
    /// Where one node's PUT load spent its CPU, per answered PUT.
    pub single_cpu: Option<CpuPerPut>,
    /// Where the cluster's PUT load spent its CPU, per answered PUT.
    pub cluster_cpu: Option<CpuPerPut>,
    /// single_cpu.total_us / cluster_cpu.total_us: the throughput ratio the cluster would
    /// reach if CPU alone bounded both (steadier than the rates on a shared machine).
    pub cpu_ratio: Option<f64>,
}

/// CPU time (user + system) a PUT load cost per answered PUT, in µs, by process: the
/// node(s), the store's server (PostgreSQL's postmaster and backends; 0 for the embedded
/// store) and this load generator. Warm-up included.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct CpuPerPut {
    pub nodes_us: f64,
    pub store_us: f64,
    pub client_us: f64,
    pub total_us: f64,
    /// Answered PUTs per store write transaction (`tether_store_commits_total`, every
    /// node's): how much the group commit folds.
    pub puts_per_store_txn: Option<f64>,
    /// Context switches of the nodes' threads per answered PUT (a thread woken, or put
    /// aside, on its way), and of the store server's (PostgreSQL's postmaster and live
    /// backends; none for the embedded store).
    pub node_switches: Option<f64>,
    pub store_switches: Option<f64>,
}

/// Reads the CPU time of the processes a PUT load runs on.
struct CpuMeter<'a> {
    http: &'a reqwest::Client,
    /// Each node's process id and base URL.
    nodes: Vec<(u32, &'a str)>,
    store: Option<u32>,
}

impl CpuMeter<'_> {
    /// Seconds so far: nodes, store, client.
    fn read(&self) -> Option<[f64; 3]> {
        let mut nodes = 0.0;
        for &(pid, _) in &self.nodes {
            nodes += procs::cpu_secs(pid)?;
        }
        let store = match self.store {
            Some(pid) => procs::tree_cpu_secs(pid)?,
            None => 0.0,
        };
        Some([nodes, store, procs::cpu_secs(std::process::id())?])
    }

    /// Runs `load` and splits its CPU per answered PUT.
    async fn measure(
        &self,
        load: impl std::future::Future<Output = Load>,
    ) -> (Load, Option<CpuPerPut>) {
        let txns_before = self.store_txns().await;
        let switches_before = self.switches();
        let before = self.read();
        let load = load.await;
        let after = self.read();
        let switches = self.switches();
        let txns = match (txns_before, self.store_txns().await) {
            (Some(b), Some(a)) if a > b => Some(a - b),
            _ => None,
        };
        let per_put = |b: Option<u64>, a: Option<u64>| match (b, a) {
            (Some(b), Some(a)) if a >= b && load.answered > 0 => {
                Some((a - b) as f64 / load.answered as f64)
            }
            _ => None,
        };
        let split = match (before, after) {
            (Some(b), Some(a)) if load.answered > 0 => {
                let us = |i: usize| (a[i] - b[i]) * 1e6 / load.answered as f64;
                Some(CpuPerPut {
                    nodes_us: us(0),
                    store_us: us(1),
                    client_us: us(2),
                    total_us: us(0) + us(1) + us(2),
                    puts_per_store_txn: txns.map(|t| load.answered as f64 / t),
                    node_switches: per_put(switches_before.0, switches.0),
                    store_switches: per_put(switches_before.1, switches.1),
                })
            }
            _ => None,
        };
        (load, split)
    }

    /// Context switches so far: the nodes' threads, the store server's processes
    /// (postmaster and its live backends).
    fn switches(&self) -> (Option<u64>, Option<u64>) {
        let nodes = self
            .nodes
            .iter()
            .map(|&(pid, _)| procs::context_switches(pid))
            .sum::<Option<u64>>();
        let store = self.store.and_then(|pid| {
            let children = procs::children(pid)?;
            std::iter::once(pid)
                .chain(children)
                .map(procs::context_switches)
                .sum::<Option<u64>>()
        });
        (nodes, store)
    }

    /// Every node's store write transactions so far.
    async fn store_txns(&self) -> Option<f64> {
        let mut sum = 0.0;
        for &(_, url) in &self.nodes {
            sum += tether::metric(self.http, url, "tether_store_commits_total").await?;
        }
        Some(sum)
    }
}

impl CpuPerPut {
    fn show(&self) -> String {
        format!(
            "{:.0} µs CPU (nodes {:.0}, store {:.0}, client {:.0}), {:.1} PUTs per store transaction, \
             {:.1} context switches (nodes {:.1}, store {:.1})",
            self.total_us,
            self.nodes_us,
            self.store_us,
            self.client_us,
            self.puts_per_store_txn.unwrap_or(f64::NAN),
            self.node_switches.unwrap_or(f64::NAN) + self.store_switches.unwrap_or(0.0),
            self.node_switches.unwrap_or(f64::NAN),
            self.store_switches.unwrap_or(0.0),
        )
    }
}

/// One kill -9.
#[derive(Debug, Clone, Serialize)]
pub struct Failover {
    /// When the node was killed, ms since the probes started.
    pub killed_at_ms: u64,
    /// The longest time any probe went without a successful write across the kill, ms.
    pub gap_ms: u64,
    /// Probe requests that failed between the kill and the end of the probes.
    pub failed: u64,
    /// Probe requests answered 2xx in the same time.
    pub ok: u64,
    /// Successful writes per 100 ms from [`BEFORE_KILL`] before the kill (timeline).
    pub ok_per_100ms: Vec<u64>,
    /// Failed requests per 100 ms, same buckets.
    pub failed_per_100ms: Vec<u64>,
}

/// The whole result.
#[derive(Debug, Serialize)]
pub struct Results {
    pub benchmark: &'static str,
    pub date: String,
    pub machine: Machine,
    pub nodes: usize,
    /// `--node-threads` (0: the nodes' default).
    pub node_threads: usize,
    /// `--to-owner`: every PUT sent to its set's owner.
    pub to_owner: bool,
    pub conns: usize,
    pub devices: usize,
    pub registrations: usize,
    pub runs: Vec<Run>,
    pub put_ratio: Spread,
    /// Each run's `cpu_ratio`.
    pub cpu_ratio: Spread,
    pub registration_ratio: Spread,
    pub failovers: Vec<Failover>,
    pub failover_gap_ms: Spread,
    pub failover_failed: Spread,
    pub suspicion: Option<SuspicionWatch>,
}

/// The devices each load writes (its first `conns` devices, one per connection), written
/// once through their node so their sets are active, then grouped by owner: per owner
/// node, its URL, one connection per device and the devices.
async fn to_owners(
    http: &reqwest::Client,
    cluster: &tether::Cluster,
    urls: &[&str],
    loads: Vec<(String, Vec<(String, Credentials)>)>,
    conns: usize,
) -> Result<Vec<(String, usize, Vec<(String, Credentials)>)>> {
    let written: Vec<(String, Vec<(String, Credentials)>)> = loads
        .into_iter()
        .map(|(url, devs)| (url, devs.into_iter().take(conns).collect()))
        .collect();
    for (url, devs) in &written {
        touch(http, url, devs).await?;
    }
    let owners: std::collections::HashMap<String, String> = cluster.owners()?.into_iter().collect();
    let mut by_node: Vec<Vec<(String, Credentials)>> = vec![Vec::new(); urls.len()];
    for (serial, creds) in written.into_iter().flat_map(|(_, devs)| devs) {
        let owner = owners
            .get(&serial)
            .with_context(|| format!("set {serial} has no owner in the lease table"))?;
        let i = cluster
            .ids()
            .iter()
            .position(|id| id == owner)
            .with_context(|| format!("set {serial}: owner {owner} is not a node"))?;
        by_node[i].push((serial, creds));
    }
    Ok(urls
        .iter()
        .zip(by_node)
        .filter(|(_, devs)| !devs.is_empty())
        .map(|(url, devs)| (url.to_string(), devs.len(), devs))
        .collect())
}

/// `tether-bench cluster`.
pub async fn run(o: Opts) -> Result<()> {
    let machine = Machine::probe();
    let (_, date) = now_utc();
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(o.conns.max(o.register_concurrency))
        .build()?;
    let mut runs = Vec::new();
    for r in 0..o.runs {
        let single = tether::start(&o.tether_bin, &[]).await?;
        let devices =
            tether::register_many(&http, single.url(), &single.mfg_key, "CPUT", o.devices, 16)
                .await?;
        let meter = CpuMeter {
            http: &http,
            nodes: vec![(single.server.pid(), single.url())],
            store: None,
        };
        let (single_put, single_cpu) = meter
            .measure(closed_loop(
                &http,
                single.url(),
                &devices,
                o.conns,
                o.secs,
                false,
            ))
            .await;
        let single_reg = registrations(&http, &[single.url()], &single.mfg_key, &o, r).await?;
        single.server.stop().await;

        let sizing: Vec<String> = match o.node_threads {
            0 => Vec::new(),
            n => ["--http-workers", "--actor-threads"]
                .iter()
                .flat_map(|flag| [flag.to_string(), n.to_string()])
                .collect(),
        };
        let cluster = tether::Cluster::start_with(
            &o.tether_bin,
            o.nodes.max(1),
            "bench",
            &sizing,
            &o.pg_set,
            Duration::from_millis(o.store_delay_ms),
        )
        .await?;
        let nodes = cluster.nodes();
        let mfg_key = nodes[0].mfg_key.clone();
        let urls: Vec<&str> = nodes.iter().map(|n| n.url()).collect();
        // Devices registered through each node; each node's share of the connections
        // writes them through that node (most sets are owned by another: forwarded).
        let per = o.devices.div_ceil(urls.len());
        let mut loads = Vec::new();
        for (i, url) in urls.iter().enumerate() {
            let devs =
                tether::register_many(&http, url, &mfg_key, &format!("CPUT{i}X"), per, 16).await?;
            loads.push((url.to_string(), devs));
        }
        let conns_per = o.conns.div_ceil(urls.len());
        // With `--to-owner`: the devices the load writes (one per connection), each sent
        // to its set's owner, as an owner-aware load balancer would (nothing forwarded).
        let loads = if o.to_owner {
            to_owners(&http, &cluster, &urls, loads, conns_per).await?
        } else {
            loads
                .into_iter()
                .map(|(url, devs)| (url, conns_per, devs))
                .collect()
        };
        let meter = CpuMeter {
            http: &http,
            nodes: nodes.iter().map(|n| (n.server.pid(), n.url())).collect(),
            store: cluster.store_pid(),
        };
        let (cluster_put, cluster_cpu) = meter
            .measure(async {
                let parts = futures::future::join_all(loads.iter().map(|(url, conns, devs)| {
                    closed_loop(&http, url, devs, *conns, o.secs, false)
                }))
                .await;
                sum_loads(&parts)
            })
            .await;
        let cluster_reg = registrations(&http, &urls[..1], &mfg_key, &o, r).await?;
        drop(nodes);
        drop(cluster);
        let cpu_ratio = match (single_cpu, cluster_cpu) {
            (Some(s), Some(c)) if c.total_us > 0.0 => Some(s.total_us / c.total_us),
            _ => None,
        };
        let run = Run {
            single_cpu,
            cluster_cpu,
            cpu_ratio,
            put_ratio: ratio(cluster_put.rps, single_put.rps),
            registration_ratio: ratio(cluster_reg, single_reg),
            single_put,
            cluster_put,
            single_registrations_per_s: single_reg,
            cluster_registrations_per_s: cluster_reg,
        };
        println!(
            "run {}: durable PUT/s cluster {:.0} / one node {:.0} = {:.2}; cold registrations/s cluster {:.0} / one node {:.0} = {:.2}",
            r + 1,
            run.cluster_put.rps,
            run.single_put.rps,
            run.put_ratio,
            run.cluster_registrations_per_s,
            run.single_registrations_per_s,
            run.registration_ratio
        );
        if let (Some(s), Some(c), Some(x)) = (run.single_cpu, run.cluster_cpu, run.cpu_ratio) {
            println!(
                "run {}: per durable PUT, one node {}; cluster {}; CPU ratio {:.2}",
                r + 1,
                s.show(),
                c.show(),
                x
            );
        }
        runs.push(run);
    }

    let suspicion = if o.watch_secs > 0 {
        Some(suspicion_watch(&http, &o).await?)
    } else {
        None
    };
    let failovers = failovers(&http, &o).await?;
    let results = Results {
        benchmark: "cluster",
        date,
        machine,
        nodes: o.nodes.max(1),
        node_threads: o.node_threads,
        to_owner: o.to_owner,
        conns: o.conns,
        devices: o.devices,
        registrations: o.registrations,
        put_ratio: Spread::of(&runs.iter().map(|r| r.put_ratio).collect::<Vec<_>>()),
        cpu_ratio: Spread::of(&runs.iter().filter_map(|r| r.cpu_ratio).collect::<Vec<_>>()),
        registration_ratio: Spread::of(
            &runs
                .iter()
                .map(|r| r.registration_ratio)
                .collect::<Vec<_>>(),
        ),
        failover_gap_ms: Spread::of(
            &failovers
                .iter()
                .map(|f| f.gap_ms as f64)
                .collect::<Vec<_>>(),
        ),
        failover_failed: Spread::of(
            &failovers
                .iter()
                .map(|f| f.failed as f64)
                .collect::<Vec<_>>(),
        ),
        runs,
        failovers,
        suspicion,
    };
    println!(
        "durable PUT/s, cluster / one node: {}",
        results.put_ratio.show(2)
    );
    println!(
        "CPU per durable PUT, one node / cluster: {}",
        results.cpu_ratio.show(2)
    );
    println!(
        "cold registrations/s, cluster / one node: {}",
        results.registration_ratio.show(2)
    );
    let mut gaps: Vec<u64> = results.failovers.iter().map(|f| f.gap_ms).collect();
    gaps.sort_unstable();
    println!(
        "kill -9 failover over {} kills: longest probe gap p50 {} ms (each: {:?} ms); failed probe requests each: {:?}",
        gaps.len(),
        gaps.get(gaps.len() / 2).copied().unwrap_or(0),
        results.failovers.iter().map(|f| f.gap_ms).collect::<Vec<_>>(),
        results.failovers.iter().map(|f| f.failed).collect::<Vec<_>>(),
    );
    let path = write_json(&o.out, "cluster", &results)?;
    println!("results: {}", path.display());
    // The timeline of the median failover: probe writes per 100 ms, the kill marked.
    let mut by_gap: Vec<&Failover> = results.failovers.iter().collect();
    by_gap.sort_by_key(|f| f.gap_ms);
    if let Some(f) = by_gap.get(by_gap.len() / 2) {
        let png = o.out.join("cluster-failover.png");
        super::plot::timeline(
            &png,
            &format!(
                "kill -9 of one of {NODES} nodes: {} probes writing every {} ms (longest gap {} ms)",
                o.probes,
                PROBE_EVERY.as_millis(),
                f.gap_ms
            ),
            "probe writes per 100 ms",
            100,
            &[
                ("acknowledged", &f.ok_per_100ms),
                ("failed", &f.failed_per_100ms),
            ],
            ("kill -9", f.killed_at_ms),
        )?;
        println!("timeline: {}", png.display());
    }
    Ok(())
}

fn sum_loads(parts: &[Load]) -> Load {
    let mut total = parts[0].clone();
    for p in &parts[1..] {
        total.rps += p.rps;
        total.errors += p.errors;
        total.answered += p.answered;
    }
    // Latency: the slowest part's (a conservative summary of the cluster's).
    if let Some(worst) = parts
        .iter()
        .max_by(|a, b| a.latency.p99_ms.total_cmp(&b.latency.p99_ms))
    {
        total.latency = worst.latency.clone();
    }
    total
}

/// Registers `o.registrations` new devices round-robin through `urls`; per second.
async fn registrations(
    http: &reqwest::Client,
    urls: &[&str],
    mfg_key: &[u8],
    o: &Opts,
    run: usize,
) -> Result<f64> {
    let started = Instant::now();
    let per = o.registrations.div_ceil(urls.len());
    for (i, url) in urls.iter().enumerate() {
        tether::register_many(
            http,
            url,
            mfg_key,
            &format!("CREG{run}N{i}X"),
            per,
            o.register_concurrency,
        )
        .await
        .context("cold registrations")?;
    }
    Ok((per * urls.len()) as f64 / started.elapsed().as_secs_f64())
}

/// Members declared down and set take-overs, summed over `nodes`.
async fn downs_and_takeovers(http: &reqwest::Client, nodes: &[&tether::TetherNode]) -> (u64, u64) {
    let (mut downs, mut takeovers) = (0.0, 0.0);
    for n in nodes {
        downs += tether::metric(
            http,
            n.url(),
            "tether_cluster_member_changes_total{change=\"down\"}",
        )
        .await
        .unwrap_or(0.0);
        takeovers += tether::metric(http, n.url(), "tether_lease_takeovers_total")
            .await
            .unwrap_or(0.0);
    }
    (downs as u64, takeovers as u64)
}

/// One PUT to each device's `shared` bucket through `url` (16 at a time).
async fn touch(http: &reqwest::Client, url: &str, devs: &[(String, Credentials)]) -> Result<()> {
    use futures::stream::{self, StreamExt, TryStreamExt};
    stream::iter(devs)
        .map(|(serial, creds)| async move {
            let r = http
                .put(format!("{url}/v1/buckets/shared.{serial}"))
                .header(AUTHORIZATION, basic_header(creds))
                .timeout(Duration::from_secs(10))
                .json(&json!({"value": {"target_temperature": 0}, "base_version": 0}))
                .send()
                .await
                .with_context(|| format!("first write of {serial}"))?;
            anyhow::ensure!(
                r.status().is_success(),
                "first write of {serial}: {}",
                r.status()
            );
            Ok(())
        })
        .buffer_unordered(16)
        .try_collect::<Vec<()>>()
        .await
        .map(drop)
}

/// The false-suspicion watch (`--watch-secs`): a fresh cluster idle, then saturated.
async fn suspicion_watch(http: &reqwest::Client, o: &Opts) -> Result<SuspicionWatch> {
    let cluster = tether::Cluster::start(&o.tether_bin, NODES, "watch").await?;
    let nodes = cluster.nodes();
    let mfg_key = nodes[0].mfg_key.clone();
    let per = o.devices.div_ceil(nodes.len());
    let mut loads = Vec::new();
    for (i, n) in nodes.iter().enumerate() {
        let devs =
            tether::register_many(http, n.url(), &mfg_key, &format!("CWAT{i}X"), per, 16).await?;
        loads.push((n.url().to_string(), devs));
    }
    // One write to every device first: a set registered through a node other than its
    // owner is taken over from that node at its first activation, which is no false
    // suspicion; after this every set is active on its owner.
    for (url, devs) in &loads {
        touch(http, url, devs).await?;
    }
    let start = downs_and_takeovers(http, &nodes).await;
    println!(
        "false-suspicion watch: {} nodes idle for {} s",
        nodes.len(),
        o.watch_secs
    );
    tokio::time::sleep(Duration::from_secs(o.watch_secs)).await;
    let idle = downs_and_takeovers(http, &nodes).await;
    println!(
        "false-suspicion watch: saturated (PUT, {} connections over the nodes) for {} s",
        o.conns, o.watch_secs
    );
    let conns_per = o.conns.div_ceil(loads.len());
    // closed_loop warms up for 1 s before its measured seconds.
    let secs = o.watch_secs.saturating_sub(1).max(1) as f64;
    let parts = futures::future::join_all(
        loads
            .iter()
            .map(|(url, devs)| closed_loop(http, url, devs, conns_per, secs, false)),
    )
    .await;
    let saturated = downs_and_takeovers(http, &nodes).await;
    let watch = SuspicionWatch {
        idle_secs: o.watch_secs,
        saturated_secs: o.watch_secs,
        saturated_put: sum_loads(&parts),
        downs_idle: idle.0.saturating_sub(start.0),
        downs_saturated: saturated.0.saturating_sub(idle.0),
        takeovers_idle: idle.1.saturating_sub(start.1),
        takeovers_saturated: saturated.1.saturating_sub(idle.1),
    };
    println!(
        "false-suspicion watch: members declared down {} idle, {} saturated ({:.0} PUT/s, {} failed); set take-overs {} idle, {} saturated",
        watch.downs_idle,
        watch.downs_saturated,
        watch.saturated_put.rps,
        watch.saturated_put.errors,
        watch.takeovers_idle,
        watch.takeovers_saturated
    );
    Ok(watch)
}

/// What the probes saw: (probe, ms since the probes started, ok).
type Outcomes = Arc<Mutex<Vec<(usize, u64, bool)>>>;

async fn failovers(http: &reqwest::Client, o: &Opts) -> Result<Vec<Failover>> {
    let mut cluster = tether::Cluster::start(&o.tether_bin, NODES, "failover").await?;
    let entry = cluster.node(0).context("node 0")?;
    let (url, mfg_key) = (entry.url().to_string(), entry.mfg_key.clone());
    let probes = tether::register_many(http, &url, &mfg_key, "CPROBE", o.probes, 8).await?;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()?;
    let mut out = Vec::new();
    for k in 0..o.kills {
        // The killed node: never node 0 (the probes' entry), a different one each time.
        let victim = 1 + k % (NODES - 1);
        let outcomes: Outcomes = Arc::default();
        let started = Instant::now();
        let stop = started + BEFORE_KILL + AFTER_KILL;
        let tasks: Vec<_> = probes
            .iter()
            .enumerate()
            .map(|(p, dev)| {
                tokio::spawn(probe(
                    http.clone(),
                    url.clone(),
                    dev.clone(),
                    (p, format!("k{k}p{p}")),
                    started,
                    stop,
                    outcomes.clone(),
                ))
            })
            .collect();
        tokio::time::sleep(BEFORE_KILL).await;
        let killed_at = started.elapsed();
        cluster.kill(victim).await;
        for t in tasks {
            let _ = t.await;
        }
        let seen = outcomes.lock().map(|v| v.clone()).unwrap_or_default();
        let f = summarize(&seen, killed_at);
        println!(
            "kill {}: node {victim}: longest probe gap {} ms, {} failed / {} ok after the kill",
            k + 1,
            f.gap_ms,
            f.failed,
            f.ok
        );
        out.push(f);
        cluster.start_node(victim).await?;
        cluster.wait_members(NODES).await?;
        // Sets move back to the restarted node: let that settle before the next kill.
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    Ok(out)
}

/// One probe device: a PUT of its `shared` bucket every [`PROBE_EVERY`] through `url`
/// (each with an op id, so a retried write is never applied twice), until `stop`.
async fn probe(
    http: reqwest::Client,
    url: String,
    (serial, creds): (String, Credentials),
    (index, tag): (usize, String),
    started: Instant,
    stop: Instant,
    outcomes: Outcomes,
) {
    let mut seq = 0u64;
    while Instant::now() < stop {
        seq += 1;
        let body = json!({"value": {"target_temperature": seq}, "base_version": 0, "op_id": format!("{tag}-{seq}")});
        let ok = matches!(
            http.put(format!("{url}/v1/buckets/shared.{serial}"))
                .header(AUTHORIZATION, basic_header(&creds))
                .json(&body)
                .send()
                .await,
            Ok(r) if r.status().is_success()
        );
        let at = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        if let Ok(mut v) = outcomes.lock() {
            v.push((index, at, ok));
        }
        tokio::time::sleep(PROBE_EVERY).await;
    }
}

/// The failover figures of one kill from the probes' outcomes (`(probe, completion ms
/// since the probes started, ok)`; the kill at `killed_at`).
fn summarize(seen: &[(usize, u64, bool)], killed_at: Duration) -> Failover {
    let kill = u64::try_from(killed_at.as_millis()).unwrap_or(u64::MAX);
    let buckets = ((BEFORE_KILL + AFTER_KILL).as_millis() / 100) as usize + 1;
    let mut ok_per = vec![0u64; buckets];
    let mut failed_per = vec![0u64; buckets];
    for &(_, t, ok) in seen {
        let b = usize::try_from(t / 100).unwrap_or(usize::MAX);
        if b < buckets {
            if ok {
                ok_per[b] += 1;
            } else {
                failed_per[b] += 1;
            }
        }
    }
    let after = seen.iter().filter(|(_, t, _)| *t >= kill);
    Failover {
        killed_at_ms: kill,
        gap_ms: longest_gap(seen, kill),
        failed: after.clone().filter(|(_, _, ok)| !ok).count() as u64,
        ok: after.filter(|(_, _, ok)| *ok).count() as u64,
        ok_per_100ms: ok_per,
        failed_per_100ms: failed_per,
    }
}

/// The longest time any probe went between two successful writes (completion to
/// completion), over the stretches that end after the kill — a probe whose set the kill
/// moved waits (in the router, or retrying) until the new owner serves it. A probe with
/// no success after the kill counts until its last outcome.
fn longest_gap(seen: &[(usize, u64, bool)], kill: u64) -> u64 {
    let mut by_probe: std::collections::BTreeMap<usize, Vec<(u64, bool)>> = Default::default();
    for &(p, t, ok) in seen {
        by_probe.entry(p).or_default().push((t, ok));
    }
    let mut worst = 0;
    for outcomes in by_probe.values_mut() {
        outcomes.sort_unstable();
        let mut last_ok: Option<u64> = None;
        for &(t, ok) in outcomes.iter() {
            if ok {
                if let Some(prev) = last_ok {
                    if t >= kill {
                        worst = worst.max(t - prev);
                    }
                }
                last_ok = Some(t);
            }
        }
        if let (Some(prev), Some(&(end, _))) = (last_ok, outcomes.last()) {
            if end >= kill {
                worst = worst.max(end - prev);
            }
        }
    }
    worst
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gap_is_the_longest_wait_between_successes_across_the_kill() {
        // Probe 0 is untouched; probe 1 waits from 1,000 (its last success) to 3,500.
        let seen = [
            (0, 900, true),
            (0, 1_000, true),
            (0, 1_100, true),
            (1, 1_000, true),
            (1, 2_000, false),
            (1, 3_500, true),
            (1, 3_600, true),
        ];
        assert_eq!(longest_gap(&seen, 1_050), 2_500);
        let f = summarize(&seen, Duration::from_millis(1_050));
        assert_eq!((f.failed, f.ok), (1, 3));
        // A probe never served again counts until its last outcome.
        assert_eq!(
            longest_gap(&[(0, 500, true), (0, 4_000, false)], 1_000),
            3_500
        );
        // Nothing after the kill: no gap.
        assert_eq!(longest_gap(&[(0, 500, true)], 1_000), 0);
    }
}
