//! The simulated nemesis: between two steps of the simulation it starts or ends one fault
//! at a time, drawn from the seed — a node crashed (and restarted later, with a new clock
//! offset), a node leaving the cluster gracefully (and joining again later as a new life),
//! a node cut off from every other node, the link between two nodes cut (both ways or one
//! way), slowed (every segment 20–400 ms) or lossy (5–30 % of writes lost once or more and
//! sent again after TCP's retransmission timeout, `net::LinkFaults`). Store
//! faults come from the seeded store itself (`super::shared_store`). Every fault is
//! recorded in the history.
//!
//! A cut holds the link's messages and delivers them when it heals (turmoil's
//! `hold`/`release`): what TCP does across a partition, retransmitting once the path is
//! back. turmoil's `partition` instead drops segments that its TCP never retransmits, so
//! a connection that lost one stays stuck after the heal until HTTP/2's keepalive gives
//! up on it — no real network does that, so the nemesis does not use it. Connections
//! opened during a cut wait (their connect timeout applies), as across a real partition.

use std::rc::Rc;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::client::Phases;
use super::node::Cluster;
use super::{Coverage, SimConfig, SimHistory};
use crate::history::{Entry, FaultPhase};

/// The last part of the workload runs without faults (every node up, links healed): the
/// quiet period in which the checker expects the cluster to converge.
pub const QUIET: Duration = Duration::from_secs(15);

#[derive(Debug, Clone)]
enum Fault {
    Crash(usize),
    Join(usize),
    Leave(usize),
    Isolate(usize),
    Cut(usize, usize),
    CutOneWay { from: usize, to: usize },
    Lossy(usize, usize, f64),
    Slow(usize, usize, Duration),
}

/// The fault schedule of one run.
#[derive(Debug)]
pub struct Nemesis {
    rng: StdRng,
    enabled: bool,
    workload: Duration,
    cluster: Cluster,
    history: SimHistory,
    phases: Rc<Phases>,
    active: Option<(Fault, Duration)>,
    next_at: Option<Duration>,
    coverage: Coverage,
}

impl Nemesis {
    pub fn new(
        seed: u64,
        cfg: &SimConfig,
        cluster: Cluster,
        history: SimHistory,
        phases: Rc<Phases>,
    ) -> Nemesis {
        Nemesis {
            rng: StdRng::seed_from_u64(seed),
            enabled: cfg.faults && cluster.len() > 1,
            workload: Duration::from_secs(cfg.sim_secs),
            cluster,
            history,
            phases,
            active: None,
            next_at: None,
            coverage: Coverage::default(),
        }
    }

    pub fn coverage(&self) -> Coverage {
        self.coverage
    }

    fn record(&self, now: Duration, fault: &Fault, phase: FaultPhase) {
        let name = |i: usize| self.cluster.name(i).to_string();
        let (kind, target) = match fault {
            Fault::Crash(i) => ("kill", name(*i)),
            Fault::Leave(i) => ("leave", name(*i)),
            Fault::Join(i) => ("join", name(*i)),
            Fault::Slow(a, b, _) => ("slow-link", format!("{}<->{}", name(*a), name(*b))),
            Fault::Isolate(i) => ("isolate", name(*i)),
            Fault::Cut(a, b) => ("cut-link", format!("{}<->{}", name(*a), name(*b))),
            Fault::CutOneWay { from, to } => {
                ("cut-oneway", format!("{}->{}", name(*from), name(*to)))
            }
            Fault::Lossy(a, b, _) => ("lossy-link", format!("{}<->{}", name(*a), name(*b))),
        };
        self.history.push(Entry::Fault {
            t_us: u64::try_from(now.as_micros()).unwrap_or(u64::MAX),
            kind: kind.into(),
            target,
            phase,
            detail: String::new(),
        });
    }

    fn others(&self, i: usize) -> Vec<String> {
        self.cluster
            .members()
            .into_iter()
            .filter(|j| *j != i)
            .map(|j| self.cluster.name(j).to_string())
            .collect()
    }

    fn start(&mut self, sim: &mut turmoil::Sim<'_>, now: Duration) {
        let members = self.cluster.members();
        let n = members.len();
        let k = self.rng.random_range(0..n);
        let (i, j) = (
            members[k],
            members[(k + 1 + self.rng.random_range(0..n - 1)) % n],
        );
        let spare = self.cluster.spares().first().copied();
        let fault = match self.rng.random_range(0..100u32) {
            // A spare joins, once (it stays a member, exposed to the faults after it).
            0..10 if spare.is_some() => Fault::Join(spare.unwrap_or(i)),
            0..30 => Fault::Crash(i),
            30..45 => Fault::Leave(i),
            45..60 => Fault::Isolate(i),
            60..72 => Fault::Cut(i, j),
            72..82 => Fault::CutOneWay { from: i, to: j },
            82..91 => Fault::Lossy(i, j, self.rng.random_range(0.05..0.3)),
            _ => Fault::Slow(i, j, Duration::from_millis(self.rng.random_range(20..400))),
        };
        let name = self.cluster.name(i).to_string();
        match &fault {
            Fault::Crash(i) => {
                self.cluster.forget(*i);
                sim.crash(name.as_str());
                self.coverage.crashes += 1;
            }
            Fault::Isolate(i) => {
                for other in self.others(*i) {
                    sim.hold(name.as_str(), other.as_str());
                }
                self.coverage.isolations += 1;
            }
            Fault::Cut(a, b) => {
                sim.hold(self.cluster.name(*a), self.cluster.name(*b));
                self.coverage.cut_links += 1;
            }
            Fault::Leave(i) => {
                self.cluster.leave(*i);
                self.coverage.leaves += 1;
            }
            Fault::Join(i) => {
                self.cluster.join(*i);
                self.coverage.joins += 1;
            }
            Fault::CutOneWay { from, to } => {
                let (from, to) = (
                    sim.lookup(self.cluster.name(*from)),
                    sim.lookup(self.cluster.name(*to)),
                );
                self.cluster.links().cut_oneway(from, to);
                self.coverage.oneway_cuts += 1;
            }
            Fault::Lossy(a, b, p) => {
                let (a, b) = (
                    sim.lookup(self.cluster.name(*a)),
                    sim.lookup(self.cluster.name(*b)),
                );
                self.cluster.links().lossy(a, b, *p);
                self.coverage.lossy_links += 1;
            }
            Fault::Slow(a, b, latency) => {
                // Every segment of the link takes `latency` (the nodes have talked since
                // the start, so the link exists).
                sim.set_link_latency(self.cluster.name(*a), self.cluster.name(*b), *latency);
                self.coverage.slow_links += 1;
            }
        }
        let lasts = Duration::from_millis(self.rng.random_range(500..12_000));
        self.record(now, &fault, FaultPhase::Start);
        self.active = Some((fault, now + lasts));
    }

    fn end(&mut self, sim: &mut turmoil::Sim<'_>, now: Duration, fault: Fault) {
        match &fault {
            Fault::Crash(i) => {
                // A new life, with a clock within the nodes' bound of the others'.
                self.cluster
                    .set_offset(*i, self.rng.random_range(-250..=250));
                sim.bounce(self.cluster.name(*i));
                self.coverage.restarts += 1;
            }
            Fault::Isolate(i) => {
                let name = self.cluster.name(*i).to_string();
                for other in self.others(*i) {
                    sim.release(name.as_str(), other.as_str());
                }
            }
            Fault::Cut(a, b) => sim.release(self.cluster.name(*a), self.cluster.name(*b)),
            Fault::Leave(i) => {
                // Joins again as a new life.
                self.cluster
                    .set_offset(*i, self.rng.random_range(-250..=250));
                sim.bounce(self.cluster.name(*i));
                self.coverage.rejoins += 1;
            }
            // A join is not undone.
            Fault::Join(_) => {}
            Fault::CutOneWay { .. } | Fault::Lossy(..) => self.cluster.links().heal(),
            Fault::Slow(a, b, _) => {
                let (a, b) = (self.cluster.name(*a), self.cluster.name(*b));
                sim.set_link_latency(a, b, super::MIN_LATENCY);
                sim.set_link_max_message_latency(a, b, super::MAX_LATENCY);
            }
        }
        self.record(now, &fault, FaultPhase::End);
    }

    /// Starts or ends faults due at the simulation's current time.
    pub fn before_step(&mut self, sim: &mut turmoil::Sim<'_>) {
        if !self.enabled {
            return;
        }
        let Some(started) = self.phases.started.get() else {
            return;
        };
        let now = sim.elapsed();
        let faults_end = started + self.workload.saturating_sub(QUIET);
        if let Some((fault, until)) = self.active.clone() {
            if now >= until || now >= faults_end {
                self.active = None;
                self.end(sim, now, fault);
                let gap = Duration::from_millis(self.rng.random_range(200..3_000));
                self.next_at = Some(now + gap);
            }
            return;
        }
        if now >= faults_end {
            return;
        }
        match self.next_at {
            None => {
                self.next_at = Some(now + Duration::from_millis(self.rng.random_range(0..2_000)))
            }
            Some(at) if now >= at => self.start(sim, now),
            Some(_) => {}
        }
    }
}
