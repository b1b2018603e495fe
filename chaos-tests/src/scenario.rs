//! The named scenarios (research `chaos.md` §4a), each a steady-state hypothesis and a
//! nemesis [`Plan`], and the tiers that size a run.
//!
//! A scenario whose fault needs machinery the suite does not have yet (a standby store,
//! a disk-full ballast) is listed with what it needs and
//! refused by `run` with that reason: never run as something else, never skipped silently.

use std::time::Duration;

use serde::Serialize;

use crate::checker::Goals;
use crate::nemesis::{FaultKind, Plan, TargetRule};

/// How big and long a run is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Tier {
    /// CI: 3 nodes, 20 devices, 45 s of faults per scenario; the six smoke scenarios ≤ 10 min.
    Smoke,
    /// Before a release: 5 nodes, 50 devices, 5 min of faults per scenario.
    Standard,
    /// Nightly: 5 nodes, 100 devices, 60 min of faults.
    Soak,
}

/// The sizes and phases of a tier.
#[derive(Debug, Clone, Serialize)]
pub struct TierSpec {
    pub nodes: usize,
    /// Hot-bucket clients (half through the load balancer, half direct).
    pub clients: usize,
    /// Hot bucket sets (two buckets each).
    pub sets: usize,
    /// `tether-sim` devices through the load balancer for the whole run (0: no fleet).
    pub devices: usize,
    /// Load before the first fault (the steady state).
    pub warmup: Duration,
    /// The fault phase.
    pub faults: Duration,
    /// Load after the last fault healed, before the final reads.
    pub quiet: Duration,
}

impl Tier {
    /// The tier's sizes.
    pub fn spec(self) -> TierSpec {
        match self {
            Tier::Smoke => TierSpec {
                nodes: 3,
                clients: 8,
                sets: 4,
                devices: 20,
                warmup: Duration::from_secs(3),
                faults: Duration::from_secs(45),
                quiet: Duration::from_secs(10),
            },
            Tier::Standard => TierSpec {
                nodes: 5,
                clients: 16,
                sets: 8,
                devices: 50,
                warmup: Duration::from_secs(10),
                faults: Duration::from_secs(300),
                quiet: Duration::from_secs(15),
            },
            Tier::Soak => TierSpec {
                nodes: 5,
                clients: 16,
                sets: 8,
                devices: 100,
                warmup: Duration::from_secs(10),
                faults: Duration::from_secs(3600),
                quiet: Duration::from_secs(20),
            },
        }
    }
}

/// One named scenario.
#[derive(Debug, Clone, Serialize)]
pub struct Scenario {
    pub name: &'static str,
    /// What must hold while the faults run (the steady-state hypothesis).
    pub hypothesis: &'static str,
    /// The faults; `None` for the baseline.
    pub plan: Option<Plan>,
    /// Why `run` cannot run it yet; `None` when it can.
    pub missing: Option<&'static str>,
    /// In the smoke tier.
    pub smoke: bool,
    /// Its liveness goals (from its hypothesis and the suite's single-node-fault goals).
    pub goals: Goals,
}

/// A single-node fault (the issue's goals): ≥ 95 % overall, ≥ 99 % for sets the faulted
/// node did not own, failover within the 15 s failure-detection bound, convergence ≤ 20 s.
const SINGLE_NODE: Goals = Goals {
    min_availability: Some(0.95),
    min_availability_unaffected: Some(0.99),
    max_failover_s: Some(15.0),
    max_convergence_s: Some(20.0),
};

/// Only convergence is a goal (a store-wide fault or a pure safety scenario: availability
/// is reported, not judged).
const CONVERGENCE_ONLY: Goals = Goals {
    min_availability: None,
    min_availability_unaffected: None,
    max_failover_s: None,
    max_convergence_s: Some(20.0),
};

/// `availability` overall, convergence ≤ 20 s.
const fn overall(availability: f64) -> Goals {
    Goals {
        min_availability: Some(availability),
        ..CONVERGENCE_ONLY
    }
}

impl Scenario {
    /// The checker's options for this scenario: its goals as liveness thresholds.
    pub fn check_options(&self) -> crate::checker::CheckOptions {
        crate::checker::CheckOptions {
            goals: self.goals,
            ..crate::checker::CheckOptions::default()
        }
    }

    /// Whether nodes must start under libfaketime.
    pub fn needs_faketime(&self) -> bool {
        self.plan.is_some_and(|p| p.kind == FaultKind::ClockBump)
    }

    /// Whether nodes' peer and store connections must go through the userspace proxy
    /// (latency, stalls and clogs: this kernel has no `tc netem`).
    pub fn needs_link_proxy(&self) -> bool {
        self.plan.is_some_and(|p| p.kind.uses_link_proxy())
    }

    /// Whether PostgreSQL's directory must be on a small tmpfs (disk-full faults).
    pub fn needs_store_tmpfs(&self) -> bool {
        self.plan.is_some_and(|p| p.kind == FaultKind::DiskFull)
    }

    /// Whether the store needs a synchronous standby (failover faults).
    pub fn needs_standby(&self) -> bool {
        self.plan
            .is_some_and(|p| p.kind == FaultKind::StoreFailover)
    }
}

/// The safety properties every scenario holds to (zero tolerance, every tier).
pub const SAFETY: &str = "no acknowledged write lost, no version regression, no forked version, \
    no garbage read, no hung subscriber, no stale read";

const fn plan(
    kind: FaultKind,
    target: TargetRule,
    gap_ms: (u64, u64),
    duration_ms: (u64, u64),
    param: (i64, i64),
    max_faults: usize,
) -> Option<Plan> {
    Some(Plan {
        kind,
        target,
        gap_ms,
        duration_ms,
        param,
        max_faults,
    })
}

/// Every scenario, in the order of research §4a (plus `packet-loss`).
pub fn all() -> Vec<Scenario> {
    use FaultKind as K;
    use TargetRule as T;
    vec![
        Scenario {
            name: "baseline",
            hypothesis: "No faults: every property holds and ≥ 99.9 % of requests succeed. \
                If this fails the environment is invalid, not Tether.",
            plan: None,
            missing: None,
            smoke: true,
            goals: overall(0.999),
        },
        Scenario {
            name: "kill-owner",
            hypothesis: "kill -9 of a hot set's owner, restart after 5 s: safety holds; \
                writes to the killed owner's sets are served again within the failure-detection \
                bound (≤ 15 s); ≥ 99 % availability for other sets.",
            plan: plan(
                K::Kill,
                T::HotOwner,
                (6_000, 10_000),
                (5_000, 5_000),
                (0, 0),
                0,
            ),
            missing: None,
            smoke: true,
            goals: SINGLE_NODE,
        },
        Scenario {
            name: "kill-restart-same",
            hypothesis: "kill -9 then an immediate restart of the same node (new incarnation, \
                rejoin): safety holds; the node serves again within its start-up time.",
            plan: plan(K::Kill, T::AnyNode, (6_000, 10_000), (0, 500), (0, 0), 0),
            missing: None,
            smoke: false,
            goals: SINGLE_NODE,
        },
        Scenario {
            name: "pause-owner",
            hypothesis: "SIGSTOP of a hot set's owner for 15 s (past the 9.6 s failure-detection \
                bound), then SIGCONT: safety holds, including no stale read from the woken \
                deposed owner; failover ≤ 15 s.",
            plan: plan(
                K::Pause,
                T::HotOwner,
                (4_000, 8_000),
                (15_000, 15_000),
                (0, 0),
                0,
            ),
            missing: None,
            smoke: true,
            goals: SINGLE_NODE,
        },
        Scenario {
            name: "isolate-node",
            hypothesis: "One node cut from every peer (gossip and forwarding) for 15 s while the \
                store and the load balancer still reach it: safety holds, no stale read; \
                views agree ≤ 10 s after heal.",
            plan: plan(
                K::Isolate,
                T::HotOwner,
                (4_000, 8_000),
                (15_000, 15_000),
                (0, 0),
                0,
            ),
            missing: None,
            smoke: true,
            goals: SINGLE_NODE,
        },
        Scenario {
            name: "majorities-ring",
            hypothesis: "Overlapping majorities for 15 s (per-link nftables cuts: with 3 nodes \
                n_a-n_b is cut and the third sees both; with 5 each node sees its two ring \
                neighbours): safety holds while views disagree; views agree ≤ 10 s after heal.",
            plan: plan(
                K::RingPartition,
                T::AllNodes,
                (4_000, 8_000),
                (15_000, 15_000),
                (0, 1_000_000),
                0,
            ),
            missing: None,
            smoke: false,
            goals: overall(0.95),
        },
        Scenario {
            name: "store-partition-node",
            hypothesis: "One node cut from PostgreSQL only for 15 s: its writes fail (5xx, never \
                acknowledged); safety holds; other nodes' sets ≥ 99 % available.",
            plan: plan(
                K::StorePartition,
                T::HotOwner,
                (4_000, 8_000),
                (15_000, 15_000),
                (0, 0),
                0,
            ),
            missing: None,
            smoke: false,
            goals: Goals { min_availability_unaffected: Some(0.99), ..CONVERGENCE_ONLY },
        },
        Scenario {
            name: "lb-partition-node",
            hypothesis: "HAProxy (and the direct clients) cut from one node for 15 s: HAProxy \
                routes around it; ≥ 99.9 % of requests through the load balancer succeed.",
            plan: plan(
                K::LbPartition,
                T::AnyNode,
                (4_000, 8_000),
                (15_000, 15_000),
                (0, 0),
                0,
            ),
            missing: None,
            smoke: false,
            goals: SINGLE_NODE,
        },
        Scenario {
            name: "slow-peer-links",
            hypothesis: "200 ± 100 ms on gRPC links (above probe_rtt 300 ms at the tail): \
                safety holds; ≥ 99 % availability. Every node→node link of the userspace \
                proxy adds 100 ± 50 ms each way for 15-20 s at a time.",
            plan: plan(
                K::PeerLatency,
                T::Links,
                (3_000, 6_000),
                (15_000, 20_000),
                (200, 200),
                0,
            ),
            missing: None,
            smoke: false,
            goals: overall(0.99),
        },
        Scenario {
            name: "slow-store",
            hypothesis: "50 ± 25 ms and one 6 s stall on node→PostgreSQL links: safety holds; \
                no request hangs > 10 s. Windows of 20 s of latency through the userspace \
                proxy, the stall (every byte held) a third of the way in.",
            plan: plan(
                K::StoreLatency,
                T::Store,
                (3_000, 6_000),
                (20_000, 20_000),
                (50, 50),
                0,
            ),
            missing: None,
            smoke: false,
            goals: CONVERGENCE_ONLY,
        },
        Scenario {
            name: "swizzle-clog",
            hypothesis: "FoundationDB's swizzle: clog a random subset of links, unclog in \
                reverse order: safety holds. 2 to half of the node→node and node→PostgreSQL \
                links of the userspace proxy, clogged one by one over 12-16 s (bytes held, \
                never dropped).",
            plan: plan(
                K::Clog,
                T::Links,
                (3_000, 6_000),
                (12_000, 16_000),
                (0, 1_000_000),
                0,
            ),
            missing: None,
            smoke: false,
            goals: CONVERGENCE_ONLY,
        },
        Scenario {
            name: "clock-bump",
            hypothesis: "A hot set owner's wall clock jumps by -2 to +10 min for 10-15 s \
                (libfaketime, monotonic clock real): safety holds; bucket timestamps never run \
                far ahead.",
            plan: plan(
                K::ClockBump,
                T::HotOwner,
                (3_000, 6_000),
                (10_000, 15_000),
                (-120, 600),
                0,
            ),
            missing: None,
            smoke: true,
            goals: SINGLE_NODE,
        },
        Scenario {
            name: "store-crash-restart",
            hypothesis: "pg_ctl stop -m immediate + start, three times: no acknowledged write \
                lost; writes succeed again ≤ 10 s after PostgreSQL is ready.",
            plan: plan(
                K::StoreCrash,
                T::Store,
                (6_000, 10_000),
                (4_000, 4_000),
                (0, 0),
                3,
            ),
            missing: None,
            smoke: true,
            goals: CONVERGENCE_ONLY,
        },
        Scenario {
            name: "store-disk-full",
            hypothesis: "ENOSPC on PostgreSQL's data directory (a 256 MiB tmpfs filled by a \
                ballast file) for 30 s: writes fail (5xx), none acknowledged and lost; writes \
                succeed again once the ballast is gone (PostgreSQL restarted if it shut down; \
                then every node cold-restarted, so sets reload from the store).",
            plan: plan(
                K::DiskFull,
                T::Store,
                (6_000, 8_000),
                (30_000, 30_000),
                (0, 0),
                1,
            ),
            missing: None,
            smoke: false,
            goals: CONVERGENCE_ONLY,
        },
        Scenario {
            name: "store-failover",
            hypothesis: "Cut replication for 3 s, crash the primary (pg_ctl stop -m \
                immediate) and promote its synchronous streaming standby 5 s later, then cold-restart every \
                node (sets reload from the promoted store): no acknowledged write is lost; nodes \
                reach the new primary through their multi-host store URL \
                (target_session_attrs=read-write) and writes succeed again.",
            plan: plan(
                K::StoreFailover,
                T::Store,
                (8_000, 12_000),
                (5_000, 5_000),
                (0, 0),
                1,
            ),
            missing: None,
            smoke: false,
            goals: CONVERGENCE_ONLY,
        },
        Scenario {
            name: "rolling-drain-and-churn",
            hypothesis: "SIGTERM each node in turn (graceful drain, then restart): safety holds; \
                ≥ 99 % availability (drains hand sets over).",
            plan: plan(
                K::Drain,
                T::EachNode,
                (3_000, 5_000),
                (2_000, 2_000),
                (0, 0),
                0,
            ),
            missing: None,
            smoke: false,
            goals: overall(0.99),
        },
        Scenario {
            name: "packet-loss",
            hypothesis: "30 % random loss between one node and its peers for 15 s (nftables \
                numgen): safety holds; ≥ 95 % availability.",
            plan: plan(
                K::Loss,
                T::AnyNode,
                (4_000, 8_000),
                (15_000, 15_000),
                (30, 30),
                0,
            ),
            missing: None,
            smoke: false,
            goals: overall(0.95),
        },
    ]
}

/// The scenario called `name`.
pub fn find(name: &str) -> Option<Scenario> {
    all().into_iter().find(|s| s.name == name)
}

/// The smoke tier's scenarios.
pub fn smoke() -> Vec<Scenario> {
    all().into_iter().filter(|s| s.smoke).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_smoke_six_are_runnable() {
        let names: Vec<&str> = smoke().iter().map(|s| s.name).collect();
        assert_eq!(
            names,
            [
                "baseline",
                "kill-owner",
                "pause-owner",
                "isolate-node",
                "clock-bump",
                "store-crash-restart"
            ]
        );
        assert!(smoke().iter().all(|s| s.missing.is_none()));
    }

    #[test]
    fn store_wide_faults_judge_no_availability_and_single_node_faults_the_issues_goals() {
        for s in all() {
            let store_wide = s.plan.is_some_and(|p| p.target == TargetRule::Store);
            if store_wide {
                assert_eq!(s.goals.min_availability, None, "{}", s.name);
            }
            assert_eq!(s.goals.max_convergence_s, Some(20.0), "{}", s.name);
            assert_eq!(s.check_options().goals, s.goals);
        }
        for name in ["kill-owner", "pause-owner", "isolate-node"] {
            let s = all().into_iter().find(|s| s.name == name).expect(name);
            assert_eq!(s.goals, Goals::default(), "{name}");
        }
    }

    #[test]
    fn the_latency_scenarios_run_through_the_link_proxy() {
        for name in ["slow-peer-links", "slow-store", "swizzle-clog"] {
            let s = find(name).expect(name);
            assert!(s.missing.is_none(), "{name}");
            assert!(s.needs_link_proxy(), "{name}");
        }
        // No other scenario pays for the proxy.
        assert_eq!(all().iter().filter(|s| s.needs_link_proxy()).count(), 3);
    }

    #[test]
    fn names_are_unique_and_every_scenario_has_a_hypothesis() {
        let all = all();
        assert!(all.len() >= 16);
        let names: std::collections::BTreeSet<&str> = all.iter().map(|s| s.name).collect();
        assert_eq!(names.len(), all.len());
        assert!(all.iter().all(|s| !s.hypothesis.is_empty()));
        // Every runnable scenario but the baseline has faults.
        assert!(all
            .iter()
            .filter(|s| s.missing.is_none() && s.name != "baseline")
            .all(|s| s.plan.is_some()));
    }
}
