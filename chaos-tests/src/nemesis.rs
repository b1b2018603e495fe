//! The nemesis: a seeded fault schedule ([`Schedule`]: kind, target, start, duration,
//! parameter), printed before the run and replayable from its seed, and the code that
//! injects and heals each fault on the real processes of a namespaced [`Cluster`],
//! recording a `Fault` entry at every start and end.
//!
//! - `kill`: `kill -9` the node, restart it (same data directory) after the duration.
//! - `pause`: SIGSTOP, SIGCONT after the duration; at every other pause (the 1st, 3rd,
//!   …) the stragglers ([`crate::workload::Stragglers`]) are sent to the paused node:
//!   writes at once, reads 250 ms before the wake.
//! - `isolate`: nftables in the node's namespace drop everything to and from the other
//!   nodes (gossip and forwarding); PostgreSQL and the load balancer stay reachable.
//! - `store-partition` / `lb-partition`: the same, against PostgreSQL's address / the
//!   bridge gateway (HAProxy and the direct clients).
//! - `loss`: nftables drop a random `param` % of the packets to and from the other nodes.
//! - `store-crash`: `pg_ctl stop -m immediate`, then start (crash recovery).
//! - `clock-bump`: the node's libfaketime offset file says `param` seconds for the
//!   duration, then 0 again (the monotonic clock stays real).
//! - `drain`: SIGTERM (graceful drain), wait for the exit, restart after the duration.
//! - `peer-latency`: every node→node gRPC link of the userspace proxy
//!   ([`crate::proxy`]) adds `param/2 ± 50 %` ms in each direction (a round trip gains
//!   `param ± 50 %` ms) for the duration. Recorded with every node as its target.
//! - `store-latency`: the same on every node→PostgreSQL link, and a third of the way in
//!   one `store-stall` of [`STORE_STALL`] (every byte held), recorded as a fault of its
//!   own (target `store`).
//! - `clog`: FoundationDB's swizzle. A random subset of the links (node→node and
//!   node→PostgreSQL, 2 to half of them, drawn from the seed `param`) is clogged one by
//!   one, `duration / 2k` apart, then unclogged in reverse order at the same pace; a clogged
//!   link holds every byte (nothing dropped) until unclogged. Each link's clog is its own
//!   fault entry, target `<from>,<to>` (e.g. `n0,n2` or `n1,store`).
//!
//! The link kinds need the cluster started with its links through the proxy
//! ([`crate::ClusterOptions::link_proxy`], set by the runner for scenarios using them).
//! - `disk-full`: a ballast file fills PostgreSQL's tmpfs (ENOSPC) for the duration
//!   ([`crate::store_faults`]).
//! - `store-failover`: `pg_ctl stop -m immediate` of the primary, `pg_ctl promote` of the
//!   synchronous standby after the duration ([`crate::store_faults`]).
//! - `ring-partition`: per-link partitions (nftables in both nodes' namespaces) so that
//!   every node sees a majority but not the same one ([`ring_cuts`]).
//!
//! A target is a node, the owner of a hot set at the time the fault starts (resolved from
//! the lease table the ownership poller reads), or the store. Faults of one schedule never
//! overlap. Healing on an early exit is by teardown: the namespaces (with their nftables
//! tables) are deleted and every process killed when the [`Cluster`] drops.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use tokio::process::Command;

use crate::error::ChaosError;
use crate::history::{FaultPhase, SharedRecorder};
use crate::workload::{Straggle, Stragglers};
use crate::{Cluster, NodeState};

/// The kinds of fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FaultKind {
    Kill,
    Pause,
    Isolate,
    StorePartition,
    LbPartition,
    Loss,
    StoreCrash,
    ClockBump,
    Drain,
    PeerLatency,
    StoreLatency,
    Clog,
    DiskFull,
    StoreFailover,
    RingPartition,
}

impl FaultKind {
    /// The name in the history and the schedule.
    pub fn name(self) -> &'static str {
        match self {
            FaultKind::Kill => "kill",
            FaultKind::Pause => "pause",
            FaultKind::Isolate => "isolate",
            FaultKind::StorePartition => "store-partition",
            FaultKind::LbPartition => "lb-partition",
            FaultKind::Loss => "loss",
            FaultKind::StoreCrash => "store-crash",
            FaultKind::ClockBump => "clock-bump",
            FaultKind::Drain => "drain",
            FaultKind::PeerLatency => "peer-latency",
            FaultKind::StoreLatency => "store-latency",
            FaultKind::Clog => "clog",
            FaultKind::DiskFull => "disk-full",
            FaultKind::StoreFailover => "store-failover",
            FaultKind::RingPartition => "ring-partition",
        }
    }

    /// Whether it acts on the userspace proxy's links.
    pub fn uses_link_proxy(self) -> bool {
        matches!(
            self,
            FaultKind::PeerLatency | FaultKind::StoreLatency | FaultKind::Clog
        )
    }
}

/// Whom a fault hits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Target {
    /// Node slot `i`.
    Node(usize),
    /// Whichever node holds hot set `k`'s lease when the fault starts.
    OwnerOf(usize),
    /// The shared store.
    Store,
    /// Links of the userspace proxy (which ones: the fault kind says).
    Links,
    /// Every node at once (per-link faults).
    AllNodes,
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Node(i) => write!(f, "n{i}"),
            Target::OwnerOf(k) => write!(f, "owner(set {k})"),
            Target::Store => write!(f, "store"),
            Target::Links => write!(f, "links"),
            Target::AllNodes => write!(f, "all nodes"),
        }
    }
}

/// Which targets a plan picks from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TargetRule {
    /// The owner of a random hot set.
    HotOwner,
    /// A random node.
    AnyNode,
    /// Every node in turn (rolling).
    EachNode,
    /// The store.
    Store,
    /// The proxy's links.
    Links,
    /// Every node at once (per-link faults).
    AllNodes,
}

/// How a scenario's faults are drawn.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    pub kind: FaultKind,
    pub target: TargetRule,
    /// Gap from the end of one fault to the start of the next, drawn from this range.
    pub gap_ms: (u64, u64),
    /// How long a fault lasts, drawn from this range.
    pub duration_ms: (u64, u64),
    /// The fault's parameter, drawn from this range (clock offset in s, loss in %).
    pub param: (i64, i64),
    /// At most this many faults (0: as many as fit).
    pub max_faults: usize,
}

/// One planned fault.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Planned {
    pub kind: FaultKind,
    pub target: Target,
    /// From the start of the fault phase.
    pub start_ms: u64,
    pub duration_ms: u64,
    #[serde(default)]
    pub param: i64,
}

/// A whole fault phase's faults, in start order.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Schedule {
    pub faults: Vec<Planned>,
}

impl Schedule {
    /// The faults `plan` makes from `seed` within a fault phase of `phase` (every fault
    /// ends at least a second before the phase does), for `nodes` nodes and `sets` hot
    /// sets. Deterministic: the same arguments give the same schedule.
    pub fn generate(
        plan: Option<&Plan>,
        seed: u64,
        phase: Duration,
        nodes: usize,
        sets: usize,
    ) -> Schedule {
        let Some(plan) = plan else {
            return Schedule::default();
        };
        let mut rng = StdRng::seed_from_u64(seed);
        let phase_ms = u64::try_from(phase.as_millis()).unwrap_or(u64::MAX);
        let draw = |rng: &mut StdRng, (lo, hi): (u64, u64)| {
            if hi > lo {
                rng.random_range(lo..=hi)
            } else {
                lo
            }
        };
        let mut faults = Vec::new();
        let mut t = draw(&mut rng, plan.gap_ms);
        loop {
            if plan.max_faults != 0 && faults.len() >= plan.max_faults {
                break;
            }
            let duration_ms = draw(&mut rng, plan.duration_ms);
            if t + duration_ms + 1000 > phase_ms {
                break;
            }
            let target = match plan.target {
                TargetRule::HotOwner => Target::OwnerOf(rng.random_range(0..sets.max(1))),
                TargetRule::AnyNode => Target::Node(rng.random_range(0..nodes.max(1))),
                TargetRule::EachNode => Target::Node(faults.len() % nodes.max(1)),
                TargetRule::Store => Target::Store,
                TargetRule::Links => Target::Links,
                TargetRule::AllNodes => Target::AllNodes,
            };
            let (lo, hi) = plan.param;
            let param = if hi > lo {
                rng.random_range(lo..=hi)
            } else {
                lo
            };
            faults.push(Planned {
                kind: plan.kind,
                target,
                start_ms: t,
                duration_ms,
                param,
            });
            t += duration_ms + draw(&mut rng, plan.gap_ms);
        }
        Schedule { faults }
    }

    /// One line per fault, for the console and `schedule.txt`.
    pub fn describe(&self) -> String {
        if self.faults.is_empty() {
            return "  (no faults)\n".into();
        }
        self.faults
            .iter()
            .map(|f| {
                let param = match f.kind {
                    FaultKind::ClockBump => format!(" offset {:+} s", f.param),
                    FaultKind::Loss => format!(" loss {} %", f.param),
                    FaultKind::PeerLatency => {
                        format!(" round trip +{} ± {} ms", f.param, f.param / 2)
                    }
                    FaultKind::StoreLatency => format!(
                        " round trip +{} ± {} ms, {} s stall at +{:.1} s",
                        f.param,
                        f.param / 2,
                        STORE_STALL.as_secs(),
                        f.duration_ms as f64 / 3000.0
                    ),
                    FaultKind::Clog => format!(" links drawn from seed {}", f.param),
                    FaultKind::RingPartition => format!(" ring seed {}", f.param),
                    _ => String::new(),
                };
                format!(
                    "  t+{:>6.1} s  {:<15} {:<14} for {:>5.1} s{param}\n",
                    f.start_ms as f64 / 1000.0,
                    f.kind.name(),
                    f.target.to_string(),
                    f.duration_ms as f64 / 1000.0,
                )
            })
            .collect()
    }
}

/// Who holds each hot set's lease (set key → node name), kept current by the ownership
/// poller.
pub type Owners = Arc<Mutex<BTreeMap<String, String>>>;

fn err(kind: FaultKind, target: &str, detail: impl fmt::Display) -> ChaosError {
    ChaosError::Nemesis {
        kind: kind.name().to_string(),
        target: target.to_string(),
        detail: detail.to_string(),
    }
}

/// Runs `nft -f -` with `rules` inside node `i`'s namespace.
pub(crate) async fn nft(cluster: &Cluster, i: usize, rules: &str) -> Result<(), String> {
    let ns = cluster
        .namespace(i)
        .ok_or_else(|| "the node has no namespace of its own (loopback cluster)".to_string())?;
    nft_in(ns.name(), rules).await
}

/// Runs `nft -f -` with `rules` inside network namespace `ns`.
pub(crate) async fn nft_in(ns: &str, rules: &str) -> Result<(), String> {
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns, "nft", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("nft: {e}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        use tokio::io::AsyncWriteExt;
        stdin
            .write_all(rules.as_bytes())
            .await
            .map_err(|e| format!("nft stdin: {e}"))?;
    }
    let out = child
        .wait_with_output()
        .await
        .map_err(|e| format!("nft: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "nft -f - in {ns}: {}\n{rules}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// How long before a paused node wakes the stragglers are sent to it.
const STRAGGLER_LEAD: Duration = Duration::from_millis(250);

/// The nftables table the nemesis adds to a node's namespace.
const TABLE: &str = "t12chaos";

/// Rules dropping traffic between node `i` and `peers` (all of it, or `loss` % at random).
fn drop_rules(peers: &[String], loss: Option<i64>) -> String {
    let set = peers.join(", ");
    let verdict = match loss {
        Some(p) => format!("numgen random mod 100 < {p} drop"),
        None => "drop".into(),
    };
    format!(
        "table inet {TABLE} {{
  chain input {{ type filter hook input priority 0; policy accept; ip saddr {{ {set} }} {verdict}; }}
  chain output {{ type filter hook output priority 0; policy accept; ip daddr {{ {set} }} {verdict}; }}
}}
"
    )
}

/// The addresses a network fault of `kind` cuts node `i` from.
fn cut_from(cluster: &Cluster, kind: FaultKind, i: usize, nodes: usize) -> Vec<String> {
    match kind {
        FaultKind::StorePartition => vec![cluster.store_host().0.to_string()],
        FaultKind::LbPartition => vec![cluster.proxy_ip().to_string()],
        _ => (0..nodes)
            .filter(|&j| j != i)
            .map(|j| cluster.host(j).to_string())
            .collect(),
    }
}

/// Resolves `target` to a node index: an owner from the lease table (falling back to a
/// running node when the owner is unknown or not running).
fn resolve(cluster: &Cluster, target: Target, owners: &Owners, set_keys: &[String]) -> usize {
    let running = cluster.live_nodes();
    let pick = match target {
        Target::Node(i) => Some(i),
        Target::OwnerOf(k) => {
            let owners = owners.lock().unwrap_or_else(|e| e.into_inner());
            set_keys
                .get(k)
                .and_then(|key| owners.get(key))
                .and_then(|name| name.strip_prefix('n'))
                .and_then(|n| n.parse::<usize>().ok())
        }
        Target::Store | Target::Links | Target::AllNodes => None,
    };
    match pick {
        Some(i) if cluster.state(i) == NodeState::Running => i,
        Some(i) if running.is_empty() => i,
        _ => running.first().copied().unwrap_or(0),
    }
}

/// Injects one fault, waits its duration, heals it; records both ends.
pub async fn apply(
    cluster: &mut Cluster,
    fault: &Planned,
    nodes: usize,
    owners: &Owners,
    set_keys: &[String],
    rec: &SharedRecorder,
    stragglers: Option<&Stragglers>,
) -> Result<(), ChaosError> {
    let kind = fault.kind;
    let duration = Duration::from_millis(fault.duration_ms);
    match kind {
        FaultKind::DiskFull => return crate::store_faults::disk_full(cluster, fault, rec).await,
        FaultKind::StoreFailover => {
            return crate::store_faults::failover(cluster, fault, rec).await
        }
        FaultKind::RingPartition => return ring_partition(cluster, fault, nodes, rec).await,
        _ => {}
    }
    if kind == FaultKind::StoreCrash {
        rec.fault(kind.name(), "store", FaultPhase::Start, String::new());
        let started = std::time::Instant::now();
        // Blocking pg_ctl calls; the workload keeps running on the other worker.
        tokio::task::block_in_place(|| cluster.store().restart())
            .map_err(|e| err(kind, "store", e))?;
        rec.fault(
            kind.name(),
            "store",
            FaultPhase::End,
            format!(
                "pg_ctl stop -m immediate + start took {:.1} s",
                started.elapsed().as_secs_f64()
            ),
        );
        tokio::time::sleep(duration).await;
        return Ok(());
    }
    if kind.uses_link_proxy() {
        return apply_links(cluster, fault, rec).await;
    }
    let i = resolve(cluster, fault.target, owners, set_keys);
    let name = cluster.name(i).to_string();
    let detail = match fault.target {
        Target::OwnerOf(k) => format!("owner of set {}", set_keys.get(k).map_or("?", |s| s)),
        _ => String::new(),
    };
    match kind {
        FaultKind::Kill => {
            rec.fault(kind.name(), &name, FaultPhase::Start, detail);
            cluster.kill9(i).await;
            tokio::time::sleep(duration).await;
            cluster.restart(i).await;
            rec.fault(kind.name(), &name, FaultPhase::End, "restarted".into());
        }
        FaultKind::Drain => {
            rec.fault(kind.name(), &name, FaultPhase::Start, detail);
            cluster.sigterm(i).await;
            let code = cluster.wait_exit(i, Duration::from_secs(45)).await;
            tokio::time::sleep(duration).await;
            cluster.restart(i).await;
            rec.fault(
                kind.name(),
                &name,
                FaultPhase::End,
                format!("drained (exit {code:?}), restarted"),
            );
        }
        FaultKind::Pause => {
            rec.fault(kind.name(), &name, FaultPhase::Start, detail);
            cluster.pause(i).await;
            let url = cluster.node_url(i, "");
            // The stragglers' writes go out at once (queued through the whole pause), their
            // reads just before the wake (sent after the writes the other nodes
            // acknowledged meanwhile, they must see them).
            // Every other pause only (the 1st, 3rd, …): the others show what a woken node
            // does when nothing is queued for it (a straggler's read makes it confirm its
            // leases at once).
            let lead = STRAGGLER_LEAD.min(duration / 2);
            let stragglers = stragglers.filter(|s| s.take_turn());
            if let Some(s) = stragglers {
                s.send(Straggle::Write, (&name, &url), duration);
            }
            tokio::time::sleep(duration - lead).await;
            if let Some(s) = stragglers {
                s.send(Straggle::Read, (&name, &url), lead);
            }
            tokio::time::sleep(lead).await;
            cluster.resume(i).await;
            rec.fault(kind.name(), &name, FaultPhase::End, String::new());
        }
        FaultKind::Isolate
        | FaultKind::StorePartition
        | FaultKind::LbPartition
        | FaultKind::Loss => {
            let peers = cut_from(cluster, kind, i, nodes);
            let loss = (kind == FaultKind::Loss).then_some(fault.param);
            let rules = drop_rules(&peers, loss);
            nft(cluster, i, &rules)
                .await
                .map_err(|e| err(kind, &name, e))?;
            let what = match loss {
                Some(p) => format!("{p} % of packets to/from {}", peers.join(" ")),
                None => format!("drop to/from {}", peers.join(" ")),
            };
            let detail = if detail.is_empty() {
                what
            } else {
                format!("{detail}; {what}")
            };
            rec.fault(kind.name(), &name, FaultPhase::Start, detail);
            tokio::time::sleep(duration).await;
            nft(cluster, i, &format!("delete table inet {TABLE}\n"))
                .await
                .map_err(|e| err(kind, &name, e))?;
            rec.fault(kind.name(), &name, FaultPhase::End, "healed".into());
        }
        FaultKind::ClockBump => {
            cluster
                .set_clock_offset(i, fault.param)
                .map_err(|e| err(kind, &name, e))?;
            let what = format!("wall clock {:+} s", fault.param);
            let detail = if detail.is_empty() {
                what
            } else {
                format!("{detail}; {what}")
            };
            rec.fault(kind.name(), &name, FaultPhase::Start, detail);
            tokio::time::sleep(duration).await;
            cluster
                .set_clock_offset(i, 0)
                .map_err(|e| err(kind, &name, e))?;
            rec.fault(kind.name(), &name, FaultPhase::End, "offset 0".into());
        }
        FaultKind::StoreCrash
        | FaultKind::PeerLatency
        | FaultKind::StoreLatency
        | FaultKind::Clog
        | FaultKind::DiskFull
        | FaultKind::StoreFailover
        | FaultKind::RingPartition => unreachable!("handled above"),
    }
    Ok(())
}

/// How long `store-latency`'s one stall holds every byte (slow-store: PostgreSQL
/// answers nothing for longer than the pool's 5 s wait).
pub const STORE_STALL: Duration = Duration::from_secs(6);

/// One-way delay and jitter for a round trip of `rtt_ms ± 50 %`: half each way, each
/// `± 50 %`.
fn one_way(rtt_ms: i64) -> (Duration, Duration) {
    let rtt = u64::try_from(rtt_ms).unwrap_or(0);
    (
        Duration::from_millis(rtt / 2),
        Duration::from_millis(rtt / 4),
    )
}

/// The history target of a link named `from->to`: `from,to`.
fn link_target(name: &str) -> String {
    name.replace("->", ",")
}

/// Injects and heals a fault of the link proxy ([`FaultKind::uses_link_proxy`]).
async fn apply_links(
    cluster: &Cluster,
    fault: &Planned,
    rec: &SharedRecorder,
) -> Result<(), ChaosError> {
    let kind = fault.kind;
    let duration = Duration::from_millis(fault.duration_ms);
    let links = cluster.links().ok_or_else(|| {
        err(
            kind,
            &fault.target.to_string(),
            "the cluster's links do not go through the proxy (ClusterOptions::link_proxy)",
        )
    })?;
    let started = tokio::time::Instant::now();
    match kind {
        FaultKind::PeerLatency => {
            let (d, j) = one_way(fault.param);
            for l in links.peer_links() {
                l.set_latency(d, j);
            }
            let target = links.names().join(",");
            rec.fault(
                kind.name(),
                &target,
                FaultPhase::Start,
                format!(
                    "every node→node gRPC link: {} ± {} ms each way (round trip +{} ± {} ms)",
                    d.as_millis(),
                    j.as_millis(),
                    fault.param,
                    fault.param / 2
                ),
            );
            tokio::time::sleep(duration).await;
            for l in links.peer_links() {
                l.heal();
            }
            rec.fault(kind.name(), &target, FaultPhase::End, "healed".into());
        }
        FaultKind::StoreLatency => {
            let (d, j) = one_way(fault.param);
            for l in links.store_links() {
                l.set_latency(d, j);
            }
            rec.fault(
                kind.name(),
                "store",
                FaultPhase::Start,
                format!(
                    "every node→PostgreSQL link: {} ± {} ms each way (round trip +{} ± {} ms)",
                    d.as_millis(),
                    j.as_millis(),
                    fault.param,
                    fault.param / 2
                ),
            );
            let stall_at = duration / 3;
            let stall = STORE_STALL.min(duration.saturating_sub(stall_at));
            tokio::time::sleep_until(started + stall_at).await;
            for l in links.store_links() {
                l.stall(stall);
            }
            rec.fault(
                "store-stall",
                "store",
                FaultPhase::Start,
                format!(
                    "every byte on every node→PostgreSQL link held for {:.1} s",
                    stall.as_secs_f64()
                ),
            );
            tokio::time::sleep(stall).await;
            rec.fault("store-stall", "store", FaultPhase::End, String::new());
            tokio::time::sleep_until(started + duration).await;
            for l in links.store_links() {
                l.heal();
            }
            rec.fault(kind.name(), "store", FaultPhase::End, "healed".into());
        }
        FaultKind::Clog => {
            let all: Vec<&crate::proxy::Link> = links.all().collect();
            let chosen = swizzle_pick(all.len(), fault.param);
            let k = chosen.len().max(1);
            let step = duration / (2 * u32::try_from(k).unwrap_or(1));
            for (m, &x) in chosen.iter().enumerate() {
                all[x].clog();
                rec.fault(
                    kind.name(),
                    &link_target(all[x].name()),
                    FaultPhase::Start,
                    format!(
                        "{}: every byte held (swizzle: clog {} of {k}, {} links in all)",
                        all[x].name(),
                        m + 1,
                        all.len()
                    ),
                );
                tokio::time::sleep(step).await;
            }
            for &x in chosen.iter().rev() {
                all[x].unclog();
                rec.fault(
                    kind.name(),
                    &link_target(all[x].name()),
                    FaultPhase::End,
                    "unclogged".into(),
                );
                tokio::time::sleep(step).await;
            }
            for l in links.all() {
                l.heal();
            }
        }
        _ => unreachable!("only link kinds come here"),
    }
    Ok(())
}

/// The links a swizzle clogs, in clogging order: 2 to half of `n` (at least 2, at most
/// `n`) distinct indices drawn from `seed`.
fn swizzle_pick(n: usize, seed: i64) -> Vec<usize> {
    let mut rng = StdRng::seed_from_u64(seed.unsigned_abs());
    let most = (n / 2).max(2).min(n);
    let k = if most > 2 {
        rng.random_range(2..=most)
    } else {
        most
    };
    rand::seq::index::sample(&mut rng, n, k).into_vec()
}

/// The links a ring partition of `nodes` nodes cuts (pairs `a < b`), for ring seed
/// `seed`: the nodes in a seeded ring order each keep the links to their nearest
/// neighbours on both sides, just enough to see a strict majority (themselves included),
/// and lose the others. Three nodes are the exception (a ring of three is complete): the
/// link between two of them is cut, and the third sees both. Fewer than three nodes:
/// nothing to cut (no two majorities can differ).
pub fn ring_cuts(nodes: usize, seed: i64) -> Vec<(usize, usize)> {
    use rand::seq::SliceRandom;
    if nodes < 3 {
        return Vec::new();
    }
    let mut order: Vec<usize> = (0..nodes).collect();
    order.shuffle(&mut StdRng::seed_from_u64(seed.unsigned_abs()));
    if nodes == 3 {
        let (a, b) = (order[0], order[1]);
        return vec![(a.min(b), a.max(b))];
    }
    // Keep ring distance ≤ k with 2k + 1 > nodes / 2.
    let k = (nodes / 2).div_ceil(2);
    let mut pos = vec![0; nodes];
    for (p, &node) in order.iter().enumerate() {
        pos[node] = p;
    }
    let mut cuts = Vec::new();
    for a in 0..nodes {
        for b in a + 1..nodes {
            let d = pos[a].abs_diff(pos[b]);
            if d.min(nodes - d) > k {
                cuts.push((a, b));
            }
        }
    }
    cuts
}

/// Cuts the links [`ring_cuts`] names (each in both nodes' namespaces), waits the
/// duration, heals them.
async fn ring_partition(
    cluster: &Cluster,
    fault: &Planned,
    nodes: usize,
    rec: &SharedRecorder,
) -> Result<(), ChaosError> {
    let kind = fault.kind;
    let cuts = ring_cuts(nodes, fault.param);
    let mut peers: BTreeMap<usize, Vec<String>> = BTreeMap::new();
    for &(a, b) in &cuts {
        peers
            .entry(a)
            .or_default()
            .push(cluster.host(b).to_string());
        peers
            .entry(b)
            .or_default()
            .push(cluster.host(a).to_string());
    }
    let target: Vec<String> = peers.keys().map(|&i| cluster.name(i).to_string()).collect();
    let target = target.join(",");
    for (&i, p) in &peers {
        nft(cluster, i, &drop_rules(p, None))
            .await
            .map_err(|e| err(kind, cluster.name(i), e))?;
    }
    let links: Vec<String> = cuts
        .iter()
        .map(|&(a, b)| format!("{}-{}", cluster.name(a), cluster.name(b)))
        .collect();
    rec.fault(
        kind.name(),
        &target,
        FaultPhase::Start,
        format!("cut {}", links.join(" ")),
    );
    tokio::time::sleep(Duration::from_millis(fault.duration_ms)).await;
    for &i in peers.keys() {
        nft(cluster, i, &format!("delete table inet {TABLE}\n"))
            .await
            .map_err(|e| err(kind, cluster.name(i), e))?;
    }
    rec.fault(kind.name(), &target, FaultPhase::End, "healed".into());
    Ok(())
}

/// Runs `schedule` from now (the start of the fault phase).
pub async fn run(
    cluster: &mut Cluster,
    schedule: &Schedule,
    nodes: usize,
    owners: &Owners,
    set_keys: &[String],
    rec: &SharedRecorder,
    stragglers: Option<&Stragglers>,
) -> Result<(), ChaosError> {
    let phase_start = tokio::time::Instant::now();
    for fault in &schedule.faults {
        tokio::time::sleep_until(phase_start + Duration::from_millis(fault.start_ms)).await;
        apply(cluster, fault, nodes, owners, set_keys, rec, stragglers).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan() -> Plan {
        Plan {
            kind: FaultKind::Kill,
            target: TargetRule::HotOwner,
            gap_ms: (2_000, 8_000),
            duration_ms: (3_000, 6_000),
            param: (0, 0),
            max_faults: 0,
        }
    }

    #[test]
    fn a_seed_gives_the_same_schedule_every_time() {
        let a = Schedule::generate(Some(&plan()), 42, Duration::from_secs(45), 3, 4);
        let b = Schedule::generate(Some(&plan()), 42, Duration::from_secs(45), 3, 4);
        assert_eq!(a, b);
        assert!(!a.faults.is_empty());
        // Replayable from its printed form too: the JSON round-trips.
        let json = serde_json::to_string(&a).expect("serialize");
        let back: Schedule = serde_json::from_str(&json).expect("deserialize");
        assert_eq!(back, a);
    }

    #[test]
    fn different_seeds_give_different_schedules() {
        let schedules: std::collections::BTreeSet<String> = (0..8)
            .map(|seed| {
                Schedule::generate(Some(&plan()), seed, Duration::from_secs(45), 3, 4).describe()
            })
            .collect();
        assert!(schedules.len() > 1, "{schedules:?}");
    }

    #[test]
    fn faults_fit_the_phase_and_never_overlap() {
        for seed in 0..50 {
            let s = Schedule::generate(Some(&plan()), seed, Duration::from_secs(45), 3, 4);
            let mut end = 0;
            for f in &s.faults {
                assert!(f.start_ms >= end, "seed {seed}: overlap in {s:?}");
                end = f.start_ms + f.duration_ms;
                assert!(end + 1000 <= 45_000, "seed {seed}: past the phase: {s:?}");
                assert!((3_000..=6_000).contains(&f.duration_ms));
                assert!(matches!(f.target, Target::OwnerOf(k) if k < 4));
            }
        }
    }

    #[test]
    fn rolling_targets_visit_every_node_in_turn() {
        let mut p = plan();
        p.target = TargetRule::EachNode;
        p.gap_ms = (1_000, 1_000);
        p.duration_ms = (1_000, 1_000);
        let s = Schedule::generate(Some(&p), 1, Duration::from_secs(20), 3, 4);
        let targets: Vec<Target> = s.faults.iter().map(|f| f.target).take(4).collect();
        assert_eq!(
            targets,
            vec![
                Target::Node(0),
                Target::Node(1),
                Target::Node(2),
                Target::Node(0)
            ]
        );
    }

    #[test]
    fn no_plan_no_faults() {
        let s = Schedule::generate(None, 7, Duration::from_secs(45), 3, 4);
        assert!(s.faults.is_empty());
    }

    /// Who node `i` still reaches (itself included) after `cuts`.
    fn view(nodes: usize, cuts: &[(usize, usize)], i: usize) -> Vec<usize> {
        (0..nodes)
            .filter(|&j| j == i || !cuts.contains(&(i.min(j), i.max(j))))
            .collect()
    }

    #[test]
    fn ring_cuts_leave_every_node_a_majority_but_not_the_same_one() {
        for nodes in 3..=9 {
            for seed in 0..20 {
                let cuts = ring_cuts(nodes, seed);
                assert!(!cuts.is_empty(), "{nodes} nodes, seed {seed}: nothing cut");
                let views: Vec<Vec<usize>> = (0..nodes).map(|i| view(nodes, &cuts, i)).collect();
                for (i, v) in views.iter().enumerate() {
                    assert!(
                        2 * v.len() > nodes,
                        "{nodes} nodes, seed {seed}: n{i} sees only {v:?} ({cuts:?})"
                    );
                }
                let distinct: std::collections::BTreeSet<&Vec<usize>> = views.iter().collect();
                assert!(
                    distinct.len() >= 3,
                    "{nodes} nodes, seed {seed}: views {views:?}"
                );
                // Two nodes cut from each other: their majorities differ yet overlap.
                let (a, b) = cuts[0];
                assert!(!views[a].contains(&b) && !views[b].contains(&a));
                assert!(views[a].iter().any(|x| views[b].contains(x)));
            }
        }
        assert_eq!(ring_cuts(2, 1), vec![]);
        // Five nodes: each keeps exactly its two ring neighbours.
        let cuts = ring_cuts(5, 3);
        assert_eq!(cuts.len(), 5, "{cuts:?}");
        for i in 0..5 {
            assert_eq!(view(5, &cuts, i).len(), 3);
        }
        // Seeded: the same seed cuts the same links.
        assert_eq!(ring_cuts(5, 3), cuts);
    }

    #[test]
    fn a_swizzle_clogs_distinct_links_and_the_same_ones_for_a_seed() {
        for seed in 0..200 {
            let picked = swizzle_pick(9, seed);
            assert!((2..=4).contains(&picked.len()), "{picked:?}");
            let distinct: std::collections::BTreeSet<_> = picked.iter().collect();
            assert_eq!(distinct.len(), picked.len(), "{picked:?}");
            assert!(picked.iter().all(|&x| x < 9));
            assert_eq!(picked, swizzle_pick(9, seed));
        }
        let subsets: std::collections::BTreeSet<Vec<usize>> =
            (0..50).map(|s| swizzle_pick(9, s)).collect();
        assert!(subsets.len() > 10, "{subsets:?}");
        assert_eq!(swizzle_pick(2, 5).len(), 2);
    }

    #[test]
    fn latency_is_split_half_each_way_with_half_as_jitter() {
        assert_eq!(
            one_way(200),
            (Duration::from_millis(100), Duration::from_millis(50))
        );
        assert_eq!(
            one_way(50),
            (Duration::from_millis(25), Duration::from_millis(12))
        );
        assert_eq!(link_target("n0->store"), "n0,store");
    }

    #[test]
    fn drop_rules_name_every_peer_both_ways() {
        let r = drop_rules(&["10.12.1.4".into(), "10.12.1.5".into()], None);
        assert!(r.contains("ip saddr { 10.12.1.4, 10.12.1.5 } drop"), "{r}");
        assert!(r.contains("ip daddr { 10.12.1.4, 10.12.1.5 } drop"), "{r}");
        let r = drop_rules(&["10.12.1.4".into()], Some(30));
        assert!(r.contains("numgen random mod 100 < 30 drop"), "{r}");
    }
}
