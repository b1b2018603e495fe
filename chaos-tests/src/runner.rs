//! Runs one scenario end to end: probe the machine, start the namespaced cluster (PostgreSQL,
//! N nodes, HAProxy), register the hot sets, print and save the seeded fault schedule, set
//! up the `tether-sim` fleet (with `devices` > 0: [`crate::fleet`]), run the workload and
//! the ownership poller, warm up, run the nemesis, heal, keep the load on for a quiet
//! period, stop the clients and the fleet's load, record `End`, read every bucket from
//! every live node and through the load balancer, wait for the fleet's drain and audit,
//! and tear everything down. Everything lands in `<out>/<scenario>/`: `history.jsonl`,
//! `fleet.json` and `fleet-report.txt` (with a fleet), `schedule.json`, `schedule.txt`,
//! `run.json` and the nodes' logs.
//!
//! Teardown is by ownership: the [`Cluster`] is dropped on every exit path (return, error,
//! panic unwinding, or the caller dropping this future on Ctrl-C), which kills every
//! process, stops PostgreSQL and deletes the namespaces and the bridge.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tokio::sync::watch;

use crate::caps::{self, Capabilities, Needs};
use crate::error::ChaosError;
use crate::fleet::{self, FleetPlan, FleetSummary};
use crate::history::{self, Entry, Recorder, SharedRecorder};
use crate::nemesis::{self, Owners, Schedule};
use crate::scenario::{Scenario, Tier, TierSpec};
use crate::store_faults;
use crate::workload::{self, Endpoints, HotSet, Stragglers, Tally, WorkloadConfig};
use crate::{Cluster, ClusterOptions, NodeState};

/// The client id of the final reads (after `End`).
pub const FINAL_READER: u32 = 1000;
/// The client id of the initial reads (before any write: the template's state, every
/// field `null`, so a checker knows the values no write produced).
pub const INITIAL_READER: u32 = 999;

/// How to run scenarios.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub tier: Tier,
    pub seed: u64,
    /// Overrides the tier's fault phase.
    pub duration: Option<Duration>,
    /// Overrides the tier's node count.
    pub nodes: Option<usize>,
    /// Overrides the tier's hot-bucket client count.
    pub clients: Option<usize>,
    /// Overrides the tier's `tether-sim` device count (0: no fleet).
    pub devices: Option<usize>,
    pub out: PathBuf,
    /// The node binary (default: built from this workspace).
    pub tether_bin: Option<PathBuf>,
    /// Extra node environment (`KEY=VALUE`), e.g. a planted bug's switch.
    pub node_env: Vec<(String, String)>,
    /// Links through the userspace proxy even when the scenario does not need it.
    pub link_proxy: bool,
}

/// What a run recorded, for the checker and the report.
#[derive(Debug, Clone, Serialize)]
pub struct RunInfo {
    pub scenario: String,
    pub hypothesis: String,
    pub seed: u64,
    pub tier: Tier,
    pub spec: TierSpec,
    pub schedule: Schedule,
    pub capabilities: Capabilities,
    /// Fallbacks taken and other facts for the report.
    pub notes: Vec<String>,
    pub tether_bin: Option<PathBuf>,
    pub node_env: Vec<(String, String)>,
    pub tally: Tally,
    /// The fleet's summary (also in `fleet.json`); `None` without a fleet.
    pub fleet: Option<FleetSummary>,
    /// Wall time of the whole run (start-up to teardown), s.
    pub wall_s: f64,
    /// Where the run's files are.
    pub dir: PathBuf,
    /// The run's namespaces' name prefix (all deleted at teardown).
    pub namespace_prefix: String,
    /// Every process the run started (all gone after teardown).
    pub pids: Vec<u32>,
    /// PostgreSQL's directory (deleted at teardown).
    pub store_dir: PathBuf,
}

fn write_file(path: &Path, text: &str) -> Result<(), ChaosError> {
    std::fs::write(path, text).map_err(|e| ChaosError::io(path, e))
}

/// The effective sizes of a run.
pub fn effective_spec(opts: &RunOptions) -> Result<TierSpec, ChaosError> {
    let mut spec = opts.tier.spec();
    if let Some(d) = opts.duration {
        spec.faults = d;
    }
    if let Some(n) = opts.nodes {
        if n < 2 {
            return Err(ChaosError::Usage("--nodes: at least 2".into()));
        }
        spec.nodes = n;
    }
    if let Some(c) = opts.clients {
        if c == 0 || c > workload::MAX_CLIENTS {
            return Err(ChaosError::Usage(format!(
                "--clients: 1 to {}",
                workload::MAX_CLIENTS
            )));
        }
        spec.clients = c;
    }
    if let Some(d) = opts.devices {
        if d > fleet::MAX_DEVICES {
            return Err(ChaosError::Usage(format!(
                "--devices: 0 to {}",
                fleet::MAX_DEVICES
            )));
        }
        spec.devices = d;
    }
    Ok(spec)
}

/// The store set-up a scenario's faults need: PostgreSQL on a small tmpfs (disk full), or
/// with a synchronous standby (failover).
fn store_options(scenario: &Scenario, copts: &mut ClusterOptions) {
    if scenario.needs_store_tmpfs() {
        copts.store_tmpfs_mib = Some(store_faults::STORE_TMPFS_MIB);
        copts.store_settings = store_faults::disk_full_settings();
    }
    copts.store_standby = scenario.needs_standby();
}

/// Runs `scenario`; the run's record (the verdict is the checker's, on `history.jsonl`).
pub async fn run_one(scenario: &Scenario, opts: &RunOptions) -> Result<RunInfo, ChaosError> {
    if let Some(why) = scenario.missing {
        return Err(ChaosError::Usage(format!(
            "scenario {} cannot run yet: {why}",
            scenario.name
        )));
    }
    let started = std::time::Instant::now();
    let spec = effective_spec(opts)?;
    let capabilities = caps::probe(Needs {
        faketime: scenario.needs_faketime(),
        link_proxy: opts.link_proxy || scenario.needs_link_proxy(),
        tmpfs: scenario.needs_store_tmpfs(),
        standby: scenario.needs_standby(),
    })?;
    let dir = opts.out.join(scenario.name);
    std::fs::create_dir_all(&dir).map_err(|e| ChaosError::io(&dir, e))?;

    let schedule = Schedule::generate(
        scenario.plan.as_ref(),
        opts.seed,
        spec.faults,
        spec.nodes,
        spec.sets,
    );
    let described = schedule.describe();
    eprintln!(
        "== {} (seed {}, tier {:?}: {} nodes, {} clients, {} sets, {} devices; warm-up {:?}, faults {:?}, quiet {:?})\n   {}\n-- schedule:\n{described}",
        scenario.name,
        opts.seed,
        opts.tier,
        spec.nodes,
        spec.clients,
        spec.sets,
        spec.devices,
        spec.warmup,
        spec.faults,
        spec.quiet,
        scenario.hypothesis,
    );
    write_file(&dir.join("schedule.txt"), &described)?;
    write_file(
        &dir.join("schedule.json"),
        &serde_json::to_string_pretty(&schedule).unwrap_or_default(),
    )?;

    let mut copts = ClusterOptions::new(spec.nodes, spec.nodes);
    copts.namespaces = true;
    copts.tether_bin = opts.tether_bin.clone();
    copts.node_env = opts.node_env.clone();
    copts.config = Some(workload::device_type_config());
    copts.faketime = scenario.needs_faketime();
    copts.link_proxy = opts.link_proxy || scenario.needs_link_proxy();
    if spec.devices > 0 {
        copts.users = fleet::APP_USERS.iter().map(|u| (*u).to_string()).collect();
    }
    store_options(scenario, &mut copts);
    let mut cluster = Cluster::start(copts).await;
    let namespace_prefix = cluster.namespace_prefix().unwrap_or_default();
    let store_dir = cluster.store().dir().to_path_buf();
    eprintln!(
        "-- cluster up: namespaces {namespace_prefix}*, load balancer {}, pids {:?}",
        cluster.lb_url(),
        cluster.pids()
    );
    let mut notes = capabilities.notes.clone();
    notes.push(format!(
        "topology: PostgreSQL and {} nodes in network namespaces {}* on a bridge; nodes \
         cluster over mTLS; HAProxy and the clients in the test's namespace",
        spec.nodes,
        cluster.namespace_prefix().unwrap_or_default()
    ));
    if cluster.links().is_some() {
        notes.push(
            "links: every node's connections to its peers' gRPC ports and to PostgreSQL go \
             through the userspace fault proxy on the bridge gateway (nftables DNAT in each \
             node's namespace); latency, stalls and clogs are the proxy's"
                .into(),
        );
    }

    let mut sets = Vec::new();
    for k in 0..spec.sets {
        let serial = format!("HOT{k}");
        let creds = cluster.register_as(&serial, workload::DEVICE_TYPE).await;
        let buckets = workload::KINDS
            .iter()
            .map(|kind| format!("{kind}.{serial}"))
            .collect();
        sets.push(HotSet {
            serial,
            creds,
            buckets,
        });
    }
    let set_keys: Vec<String> = sets.iter().map(|s| s.serial.clone()).collect();
    let endpoints = Endpoints {
        lb: cluster.lb_url(),
        nodes: (0..spec.nodes)
            .map(|i| (cluster.name(i).to_string(), cluster.node_url(i, "")))
            .collect(),
    };

    let history_path = dir.join("history.jsonl");
    let recorder = Recorder::create(&history_path).map_err(|e| ChaosError::io(&history_path, e))?;
    let wall_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    let fault_windows = tether_sim::checker::FaultWindows::default();
    let rec = SharedRecorder::new(recorder).with_fault_windows(fault_windows.clone());
    rec.record(&Entry::Start {
        scenario: scenario.name.to_string(),
        seed: opts.seed,
        wall_ms,
    });

    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(64)
        .build()
        .map_err(|e| ChaosError::Usage(format!("HTTP client: {e}")))?;
    let wcfg = WorkloadConfig {
        clients: spec.clients,
        ..WorkloadConfig::default()
    };
    for set in &sets {
        workload::read_set(
            &http,
            &rec,
            INITIAL_READER,
            ("lb", &endpoints.lb),
            set,
            wcfg.request_timeout,
        )
        .await;
    }

    // The fleet first: its devices register, subscribe and pair before any fault (its
    // setup phase), then load until the quiet period ends (`stop_load`).
    let (fleet_stop_tx, fleet_stop_rx) = watch::channel(false);
    let fleet_run = if spec.devices > 0 {
        let mut provisioned = Vec::with_capacity(spec.devices);
        for i in 0..spec.devices {
            provisioned.push(cluster.register(&fleet::serial(i)).await);
        }
        let plan = FleetPlan {
            devices: spec.devices,
            lb: cluster.lb_url(),
            mfg_key: cluster.mfg_key().to_vec(),
            key_id: crate::KEY_ID.to_string(),
            provisioned,
            users: cluster.users().to_vec(),
            seed: opts.seed,
            max_load: spec.warmup + spec.faults + spec.quiet + Duration::from_secs(120),
        };
        let (phase_tx, mut phases) = tokio::sync::mpsc::unbounded_channel();
        let cfg = plan.sim_config(fault_windows.clone(), phase_tx, fleet_stop_rx);
        let setup_bound = cfg.ramp + cfg.setup_timeout + Duration::from_secs(30);
        let handle = tokio::spawn(tether_sim::fleet::run(cfg));
        let loaded = tokio::time::timeout(setup_bound, async {
            while let Some(p) = phases.recv().await {
                if p >= tether_sim::fleet::Phase::Load {
                    return true;
                }
            }
            false
        })
        .await;
        if loaded != Ok(true) {
            handle.abort();
            return Err(ChaosError::Usage(format!(
                "the fleet of {} devices did not finish its setup within {setup_bound:?}",
                spec.devices
            )));
        }
        eprintln!("-- fleet: {} devices, load phase started", spec.devices);
        Some(handle)
    } else {
        None
    };

    let (stop_tx, stop_rx) = watch::channel(false);
    let owners: Owners = Owners::default();
    let poller = tokio::spawn(workload::owner_poller(
        cluster.store_url().to_string(),
        set_keys.clone(),
        owners.clone(),
        rec.clone(),
        stop_rx.clone(),
    ));
    let (client_stop_tx, client_stop_rx) = watch::channel(false);
    let clients: Vec<_> = (0..spec.clients)
        .map(|c| {
            tokio::spawn(workload::client(
                u32::try_from(c).unwrap_or(u32::MAX),
                wcfg.clone(),
                opts.seed,
                sets.clone(),
                endpoints.clone(),
                rec.clone(),
                http.clone(),
                client_stop_rx.clone(),
            ))
        })
        .collect();

    let stragglers = Stragglers::new(
        http.clone(),
        rec.clone(),
        sets.clone(),
        wcfg.request_timeout,
    );
    tokio::time::sleep(spec.warmup).await;
    let phase_start = tokio::time::Instant::now();
    let nemesis_result = nemesis::run(
        &mut cluster,
        &schedule,
        spec.nodes,
        &owners,
        &set_keys,
        &rec,
        Some(&stragglers),
    )
    .await;
    tokio::time::sleep_until(phase_start + spec.faults).await;
    nemesis_result?;
    // Anything the schedule left down comes back before the quiet period.
    for i in 0..spec.nodes {
        match cluster.state(i) {
            NodeState::Paused => cluster.resume(i).await,
            NodeState::Killed | NodeState::Terminated => cluster.restart(i).await,
            NodeState::Running | NodeState::Spare => {}
        }
    }
    fault_windows.heal_all(std::time::Instant::now());
    tokio::time::sleep(spec.quiet).await;
    let _ = client_stop_tx.send(true);
    let _ = fleet_stop_tx.send(true);
    let bound = Duration::from_millis(wcfg.subscribe_timeout_ms) + wcfg.request_timeout * 3;
    for c in clients {
        let _ = tokio::time::timeout(bound, c).await;
    }
    stragglers.join(bound).await;
    rec.record(&Entry::End { t_us: rec.now_us() });

    // Final reads: every set from every live node, and through the load balancer.
    let mut vias: Vec<(String, String)> = cluster
        .live_nodes()
        .into_iter()
        .map(|i| (cluster.name(i).to_string(), cluster.node_url(i, "")))
        .collect();
    vias.push(("lb".into(), cluster.lb_url()));
    for (name, base) in &vias {
        for set in &sets {
            workload::read_set(
                &http,
                &rec,
                FINAL_READER,
                (name, base),
                set,
                wcfg.request_timeout,
            )
            .await;
        }
    }
    // The fleet drains (every change delivered or overdue) and audits its devices' final
    // state while the cluster still runs.
    let fleet = match fleet_run {
        Some(handle) => {
            let bound = Duration::from_secs(600);
            let report = match tokio::time::timeout(bound, handle).await {
                Ok(Ok(Ok(report))) => report,
                Ok(Ok(Err(e))) => return Err(ChaosError::Usage(format!("the fleet: {e:#}"))),
                Ok(Err(e)) => return Err(ChaosError::Usage(format!("the fleet's task: {e}"))),
                Err(_) => {
                    return Err(ChaosError::Usage(format!(
                        "the fleet did not end its drain and audit within {bound:?}"
                    )))
                }
            };
            let summary = FleetSummary::of(&report, fleet::NOTIFY_DEADLINE, fleet::FAULT_RECOVERY);
            write_file(&dir.join("fleet-report.txt"), &report.human())?;
            fleet::write(&dir, &summary)?;
            eprintln!("-- {}", summary.line());
            // A fleet that never ran checked nothing: the run cannot vouch for it.
            let n = spec.devices as u64;
            if report.connected < n || report.paired < n {
                return Err(ChaosError::Usage(format!(
                    "the fleet did not come up before the faults: {} of {n} devices connected, \
                     {} paired (see {})",
                    report.connected,
                    report.paired,
                    dir.join("fleet-report.txt").display()
                )));
            }
            Some(summary)
        }
        None => None,
    };
    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(5), poller).await;
    if let Some(e) = rec.failure() {
        return Err(ChaosError::io(&history_path, std::io::Error::other(e)));
    }
    drop(rec);
    // Keep the nodes' logs next to the history.
    for i in 0..spec.nodes {
        let log = dir.join(format!("{}.stderr.log", cluster.name(i)));
        write_file(&log, &cluster.stderr(i))?;
    }
    if let Some(links) = cluster.links() {
        notes.push(format!("link proxy carried: {}", links.describe()));
    }
    let pids = cluster.pids();
    drop(cluster);

    let entries = history::read(&history_path)
        .map_err(|e| ChaosError::io(&history_path, std::io::Error::other(e)))?;
    let tally = Tally::of(&entries);
    let info = RunInfo {
        scenario: scenario.name.to_string(),
        hypothesis: scenario.hypothesis.to_string(),
        seed: opts.seed,
        tier: opts.tier,
        spec,
        schedule,
        capabilities,
        notes,
        tether_bin: opts.tether_bin.clone(),
        node_env: opts.node_env.clone(),
        tally,
        fleet,
        wall_s: started.elapsed().as_secs_f64(),
        dir: dir.clone(),
        namespace_prefix,
        pids,
        store_dir,
    };
    write_file(
        &dir.join("run.json"),
        &serde_json::to_string_pretty(&info).unwrap_or_default(),
    )?;
    eprintln!(
        "-- {}: {} ok, {} refused, {} unknown; {:.0} s; {}",
        info.scenario,
        info.tally.ok,
        info.tally.refused,
        info.tally.unknown,
        info.wall_s,
        history_path.display()
    );
    Ok(info)
}
