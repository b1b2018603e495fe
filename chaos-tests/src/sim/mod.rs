//! The cluster simulator (`tether-chaos simulate`, issue 20): N real Tether nodes as
//! [`turmoil`] hosts in one thread, on virtual time, driven by one seed.
//!
//! What runs for real: every node's `Shared` registry and bucket-set actors (on the host's
//! `LocalSet`, `tether_node::sets::env::LocalActors`), its `Router`, its cluster member —
//! SWIM membership over the gossip gRPC service, forwarding over the `Sets` gRPC service,
//! Relinquish, take-over waits, fencing — through tonic and HTTP/2 over turmoil's
//! simulated TCP ([`net`]). The store is the FoundationDB backend's logic on its in-memory
//! key-value store (the store conformance suite's `MemoryKv`), shared by all nodes,
//! wrapped in the seeded `FaultyStore` (latency, failures before the effect, lost replies,
//! lease failures, slow loads).
//!
//! What does not: the HTTP API (clients call each node's `Router` directly, as its HTTP
//! handlers do; the process-level chaos suite covers HTTP, HAProxy and real PostgreSQL),
//! authentication, registration, the redb and PostgreSQL stores.
//!
//! A seed decides everything: turmoil's network (message latency, loss), the clients'
//! operations, the fault schedule ([`nemesis`]), the store's faults, every node's
//! membership randomness and clock offset. The history the clients record is checked by
//! the chaos suite's checker (`crate::checker`), and hashed: the same seed gives the same
//! history, bit for bit ([`SeedRun::hash`]), which `--check-determinism` verifies.

pub mod client;
pub mod clock;
pub mod command;
pub mod nemesis;
pub mod net;
pub mod node;

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant, UNIX_EPOCH};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tether_node::store::faults::{FaultPlan, FaultyStore, Injected};
use tether_node::store::fdb::memory::MemoryKv;
use tether_node::store::fdb::KvStore;
use tether_node::store::Store;

use crate::checker::{check, CheckOptions, Verdict};
use crate::error::ChaosError;
use crate::history::Entry;

/// The simulated wall clock's origin (2026-01-01T00:00:00Z): fixed, so timestamps, and
/// with them the history's hash, depend on the seed only.
pub const EPOCH_MS: u64 = 1_767_225_600_000;
/// One step of virtual time.
pub const TICK: Duration = Duration::from_millis(1);
/// The range of a message's latency on a healthy link.
pub const MIN_LATENCY: Duration = Duration::from_micros(200);
pub const MAX_LATENCY: Duration = Duration::from_millis(3);
/// The gRPC port every node listens on.
pub const GRPC_PORT: u16 = 7000;

/// What one simulated run does.
#[derive(Debug, Clone)]
pub struct SimConfig {
    pub seed: u64,
    /// Virtual seconds of workload and faults (the final reads follow).
    pub sim_secs: u64,
    /// Cluster members at the start.
    pub nodes: usize,
    /// Nodes new to the cluster that join during the faults (one each, at a random time).
    pub spares: usize,
    /// Workload clients.
    pub clients: u32,
    /// Bucket sets (two buckets each).
    pub sets: usize,
    /// Inject faults (network, crashes, store, clocks); off: a fault-free baseline.
    pub faults: bool,
}

impl SimConfig {
    pub fn new(seed: u64, sim_secs: u64) -> SimConfig {
        SimConfig {
            seed,
            sim_secs,
            nodes: 3,
            spares: 1,
            clients: 6,
            sets: 6,
            faults: true,
        }
    }
}

/// Counters that show which situations a run reached (Antithesis' "sometimes"): a run
/// set that never reaches one tests nothing about it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Coverage {
    pub crashes: u32,
    pub restarts: u32,
    pub joins: u32,
    pub leaves: u32,
    pub rejoins: u32,
    pub isolations: u32,
    pub cut_links: u32,
    pub oneway_cuts: u32,
    pub lossy_links: u32,
    pub slow_links: u32,
    pub store_failures_before: u32,
    pub store_lost_replies: u32,
    pub lease_failures: u32,
    pub store_hangs: u32,
    pub writes_ok: u64,
    pub writes_unknown: u64,
    pub reads: u64,
    pub subscribes_answered_with_change: u64,
}

impl Coverage {
    /// Adds `other`'s counts to these.
    pub fn add(&mut self, other: &Coverage) {
        self.crashes += other.crashes;
        self.restarts += other.restarts;
        self.joins += other.joins;
        self.leaves += other.leaves;
        self.rejoins += other.rejoins;
        self.isolations += other.isolations;
        self.cut_links += other.cut_links;
        self.oneway_cuts += other.oneway_cuts;
        self.lossy_links += other.lossy_links;
        self.slow_links += other.slow_links;
        self.store_failures_before += other.store_failures_before;
        self.store_lost_replies += other.store_lost_replies;
        self.lease_failures += other.lease_failures;
        self.store_hangs += other.store_hangs;
        self.writes_ok += other.writes_ok;
        self.writes_unknown += other.writes_unknown;
        self.reads += other.reads;
        self.subscribes_answered_with_change += other.subscribes_answered_with_change;
    }
}

/// The outcome of one seed.
#[derive(Debug)]
pub struct SeedRun {
    pub seed: u64,
    pub verdict: Verdict,
    /// FNV-1a of the history's JSON lines: equal for equal runs.
    pub hash: u64,
    pub entries: Vec<Entry>,
    pub simulated: Duration,
    pub wall: Duration,
    pub coverage: Coverage,
    /// What turmoil itself reported, if the simulation stopped with an error.
    pub sim_error: Option<String>,
}

impl SeedRun {
    /// Every safety property held and the simulation itself ran to its end.
    pub fn passed(&self) -> bool {
        self.verdict.passed && self.sim_error.is_none()
    }
}

/// The checker's options for simulated runs: the process suite's defaults (a subscribe
/// answered more than 5 s past its timeout is hung, and so on).
pub fn check_options() -> CheckOptions {
    CheckOptions::default()
}

/// FNV-1a over `bytes`, continuing from `hash`.
fn fnv1a(mut hash: u64, bytes: &[u8]) -> u64 {
    for b in bytes {
        hash ^= u64::from(*b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

/// The history's hash: every entry's JSON line, in order.
pub fn history_hash(entries: &[Entry]) -> u64 {
    entries.iter().fold(0xcbf2_9ce4_8422_2325, |h, e| {
        let line = serde_json::to_vec(e).unwrap_or_default();
        fnv1a(fnv1a(h, &line), b"\n")
    })
}

/// The shared history of one run: entries in the order the single simulation thread
/// made them, times in virtual microseconds.
#[derive(Debug, Clone, Default)]
pub struct SimHistory {
    entries: Rc<RefCell<Vec<Entry>>>,
    next_op: Rc<RefCell<u64>>,
}

impl SimHistory {
    /// Virtual microseconds since the simulation started.
    pub fn now_us() -> u64 {
        turmoil::sim_elapsed().map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
    }

    pub fn push(&self, e: Entry) {
        self.entries.borrow_mut().push(e);
    }

    pub fn invoke(&self, client: u32, call: crate::history::Call) -> u64 {
        let op = {
            let mut n = self.next_op.borrow_mut();
            *n += 1;
            *n
        };
        self.push(Entry::Invoke {
            op,
            client,
            t_us: Self::now_us(),
            call,
        });
        op
    }

    pub fn complete(&self, op: u64, result: crate::history::Outcome) {
        self.push(Entry::Complete {
            op,
            t_us: Self::now_us(),
            result,
        });
    }

    pub fn take(&self) -> Vec<Entry> {
        std::mem::take(&mut self.entries.borrow_mut())
    }
}

/// The store every simulated node shares, with the seed's faults.
fn shared_store(seed: u64, faults: bool) -> Arc<FaultyStore> {
    let kv: Arc<dyn Store> = Arc::new(
        KvStore::new(MemoryKv::new(), "tether")
            .without_batching()
            .with_jitter_seed(seed),
    );
    let plan = if faults {
        FaultPlan {
            seed: seed ^ 0x5354_4f52_4500,
            fail_before: 0.01,
            lost_reply: 0.01,
            lease_failure: 0.02,
            max_latency: Duration::from_millis(8),
            slow_load: Duration::from_millis(40),
            hang: 0.0005,
            hang_for: Duration::from_secs(5),
        }
    } else {
        FaultPlan {
            seed,
            fail_before: 0.0,
            lost_reply: 0.0,
            lease_failure: 0.0,
            max_latency: Duration::from_millis(2),
            slow_load: Duration::ZERO,
            hang: 0.0,
            hang_for: Duration::ZERO,
        }
    };
    Arc::new(FaultyStore::seeded(kv, plan))
}

/// The store as each node sees it: behind the node's store deadline (`--store-timeout-ms`,
/// 3 s, its circuit breaker included), as `store::open` puts every real node's.
pub(crate) fn node_store(shared: Arc<FaultyStore>) -> Arc<dyn Store> {
    Arc::new(tether_node::store::deadline::DeadlineStore::new(
        shared,
        Duration::from_secs(3),
    ))
}

/// Runs one seed to its end and checks its history.
pub fn run_seed(cfg: &SimConfig) -> Result<SeedRun, ChaosError> {
    let started = Instant::now();
    // Every clock of the process on virtual time until the simulation is gone (the wall
    // time is measured on the machine's clock, before and after).
    let clocks = clock::VirtualClocks::start(Duration::from_millis(EPOCH_MS));
    let mut rng = StdRng::seed_from_u64(cfg.seed);
    let total = Duration::from_secs(cfg.sim_secs);
    let mut sim = turmoil::Builder::new()
        .rng_seed(rng.random())
        .epoch(UNIX_EPOCH + Duration::from_millis(EPOCH_MS))
        .tick_duration(TICK)
        .min_message_latency(MIN_LATENCY)
        .max_message_latency(MAX_LATENCY)
        // Room for the final reads after the workload and faults.
        .simulation_duration(total + Duration::from_secs(120))
        .build();
    let store = shared_store(rng.random(), cfg.faults);
    let history = SimHistory::default();
    history.push(Entry::Start {
        scenario: "simulate".into(),
        seed: cfg.seed,
        wall_ms: EPOCH_MS,
    });

    let spares = if cfg.faults { cfg.spares } else { 0 };
    let cluster = node::Cluster::new(cfg.nodes, spares, store.clone(), &mut rng);
    for i in 0..cluster.len() {
        cluster.add_host(&mut sim, i);
    }
    let sets = client::create_sets(cfg.sets);
    let phases = Rc::new(client::Phases::default());
    // Every client and the controller on one host: fewer hosts to step each tick.
    let clients: Vec<client::Client> = (0..cfg.clients)
        .map(|c| {
            client::Client::new(
                c,
                rng.random(),
                sets.clone(),
                cluster.clone(),
                history.clone(),
                phases.clone(),
            )
        })
        .collect();
    let controller = client::controller(
        sets,
        cfg.clients,
        cluster.clone(),
        history.clone(),
        phases.clone(),
        total,
    );
    sim.client("clients", async move {
        let running: Vec<_> = clients
            .into_iter()
            .map(|c| tokio::task::spawn_local(c.run()))
            .collect();
        controller.await?;
        for r in running {
            r.await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    });
    let mut nemesis =
        nemesis::Nemesis::new(rng.random(), cfg, cluster.clone(), history.clone(), phases);
    let mut sim_error = None;
    loop {
        clocks.set(sim.elapsed());
        nemesis.before_step(&mut sim);
        match sim.step() {
            Ok(true) => break,
            Ok(false) => {}
            Err(e) => {
                sim_error = Some(e.to_string());
                break;
            }
        }
    }
    let simulated = sim.elapsed();
    let mut coverage = nemesis.coverage();
    for i in store.injected() {
        match i {
            Injected::FailBefore => coverage.store_failures_before += 1,
            Injected::LostReply => coverage.store_lost_replies += 1,
            Injected::LeaseFailure => coverage.lease_failures += 1,
            Injected::Hang => coverage.store_hangs += 1,
            Injected::Delay(_) => {}
        }
    }
    drop(sim);
    drop(clocks);
    let entries = history.take();
    let verdict = check(&entries, &check_options());
    coverage.writes_ok = verdict.ops.writes_ok;
    coverage.writes_unknown = verdict.ops.writes_unknown;
    coverage.reads = verdict.ops.reads;
    coverage.subscribes_answered_with_change = client::changed_answers(&entries);
    Ok(SeedRun {
        seed: cfg.seed,
        hash: history_hash(&entries),
        verdict,
        entries,
        simulated,
        wall: started.elapsed(),
        coverage,
        sim_error,
    })
}
