//! Availability, failover and convergence figures (definitions in the module docs of
//! [`super`]).

use std::collections::{BTreeMap, HashMap};

use super::{Hist, Kind};
use crate::history::{Entry, FaultPhase, Outcome};

/// A fault from its start to its end (or the run's `End`).
#[derive(Debug, Clone, PartialEq)]
pub struct Window {
    pub kind: String,
    pub target: String,
    /// µs since the run started.
    pub start: u64,
    pub end: u64,
    /// The detail of the fault's start entry.
    pub detail: String,
}

impl Window {
    /// The parts of the target (`node-2`; `node-1<->node-3` → both; `a,b` → both).
    pub fn parts(&self) -> Vec<&str> {
        self.target
            .split("<->")
            .flat_map(|s| s.split(','))
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .collect()
    }
}

/// Pairs every fault start with the next end of the same kind and target.
pub fn windows(entries: &[Entry], end: u64) -> Vec<Window> {
    let mut open: BTreeMap<(String, String), Vec<(u64, String)>> = BTreeMap::new();
    let mut out = Vec::new();
    for e in entries {
        if let Entry::Fault {
            t_us,
            kind,
            target,
            phase,
            detail,
        } = e
        {
            let key = (kind.clone(), target.clone());
            match phase {
                FaultPhase::Start => open.entry(key).or_default().push((*t_us, detail.clone())),
                FaultPhase::End => {
                    if let Some((start, detail)) = open.get_mut(&key).and_then(|v| {
                        if v.is_empty() {
                            None
                        } else {
                            Some(v.remove(0))
                        }
                    }) {
                        out.push(Window {
                            kind: kind.clone(),
                            target: target.clone(),
                            start,
                            end: *t_us,
                            detail,
                        });
                    }
                }
            }
        }
    }
    for ((kind, target), starts) in open {
        for (start, detail) in starts {
            out.push(Window {
                kind: kind.clone(),
                target: target.clone(),
                start,
                end: end.max(start),
                detail,
            });
        }
    }
    out.sort_by_key(|w| w.start);
    out
}

/// The set a bucket belongs to (`kind.set` → `set`).
pub fn set_of(bucket: &str) -> &str {
    bucket.split_once('.').map_or(bucket, |(_, s)| s)
}

/// Set owners over time, from `Owner` entries.
#[derive(Debug)]
pub struct Owners {
    by_set: HashMap<String, Vec<(u64, String)>>,
}

impl Owners {
    pub fn new(entries: &[Entry]) -> Self {
        let mut by_set: HashMap<String, Vec<(u64, String)>> = HashMap::new();
        for e in entries {
            if let Entry::Owner { t_us, set, node } = e {
                by_set
                    .entry(set.clone())
                    .or_default()
                    .push((*t_us, node.clone()));
            }
        }
        for v in by_set.values_mut() {
            v.sort_by_key(|(t, _)| *t);
        }
        Owners { by_set }
    }

    /// True when `name` ever owned a set.
    pub fn is_node(&self, name: &str) -> bool {
        self.by_set.values().flatten().any(|(_, n)| n == name)
    }

    /// The owner of `set` as last recorded at or before `t`.
    pub fn at(&self, set: &str, t: u64) -> Option<&str> {
        self.by_set
            .get(set)?
            .iter()
            .take_while(|(at, _)| *at <= t)
            .last()
            .map(|(_, n)| n.as_str())
    }
}

/// The liveness figures of a run.
#[derive(Debug, Default)]
pub(super) struct Live {
    pub availability: Option<f64>,
    pub availability_unaffected: Option<f64>,
    pub failover_s: Option<f64>,
    pub convergence_s: Option<f64>,
}

fn ratio(ok: u64, all: u64) -> Option<f64> {
    (all > 0).then(|| ok as f64 / all as f64)
}

pub(super) fn measure(hist: &Hist<'_>) -> Live {
    let wins = windows(hist.entries, hist.end);
    let owners = Owners::new(hist.entries);
    // The nodes a fault names; a fault naming none (the store) touches every set.
    let nodes_of = |w: &Window| -> Vec<String> {
        w.parts()
            .into_iter()
            .filter(|p| owners.is_node(p))
            .map(str::to_string)
            .collect()
    };
    let mut live = Live::default();

    // Availability.
    let (mut all, mut ok, mut un_all, mut un_ok) = (0u64, 0u64, 0u64, 0u64);
    for o in &hist.ops {
        if o.invoke >= hist.end {
            continue; // final reads are not part of the fault phase
        }
        let active: Vec<&Window> = wins
            .iter()
            .filter(|w| w.start <= o.invoke && o.invoke <= w.end)
            .collect();
        if !wins.is_empty() && active.is_empty() {
            continue;
        }
        all += 1;
        let success = o.succeeded();
        ok += u64::from(success);
        let affected = o.buckets().iter().any(|b| {
            let owner = owners.at(set_of(b), o.invoke);
            active.iter().any(|w| {
                let nodes = nodes_of(w);
                nodes.is_empty() || owner.is_none_or(|n| nodes.iter().any(|x| x == n))
            })
        });
        if !wins.is_empty() && !affected {
            un_all += 1;
            un_ok += u64::from(success);
        }
    }
    live.availability = ratio(ok, all);
    live.availability_unaffected = ratio(un_ok, un_all);

    // Failover: successful write acknowledgements per bucket.
    let mut acks: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
    for o in &hist.ops {
        if let (Kind::Write, Some(Outcome::Ok { .. }), Some(t)) = (o.kind(), o.result, o.complete) {
            for b in o.buckets() {
                acks.entry(b).or_default().push(t);
            }
        }
    }
    for v in acks.values_mut() {
        v.sort_unstable();
    }
    let mut failover: Option<u64> = None;
    for w in &wins {
        let nodes = nodes_of(w);
        for (b, times) in &acks {
            let Some(owner) = owners.at(set_of(b), w.start) else {
                continue;
            };
            if !nodes.iter().any(|n| n == owner) {
                continue;
            }
            // Consecutive acks, from the last one before the fault (or its start); up to
            // End when no write came back after the fault started.
            let before = times.iter().rev().find(|t| **t <= w.start).copied();
            let mut points: Vec<u64> = vec![before.unwrap_or(w.start)];
            points.extend(times.iter().filter(|t| **t > w.start).copied());
            if points.len() == 1 {
                points.push(hist.end.max(w.start));
            }
            let gap = points
                .windows(2)
                .filter(|p| p[0] <= w.end)
                .map(|p| p[1].saturating_sub(p[0]))
                .max()
                .unwrap_or(0);
            failover = Some(failover.map_or(gap, |f| f.max(gap)));
        }
    }
    live.failover_s = failover.map(|us| us as f64 / 1e6);

    // Convergence after the last fault ended.
    if let Some(heal) = wins.iter().map(|w| w.end).max() {
        let mut ack_list: BTreeMap<&str, Vec<(u64, u64)>> = BTreeMap::new();
        for o in &hist.ops {
            if let (Kind::Write, Some(Outcome::Ok { states, .. }), Some(t)) =
                (o.kind(), o.result, o.complete)
            {
                for s in states {
                    ack_list
                        .entry(s.bucket.as_str())
                        .or_default()
                        .push((t, s.version));
                }
            }
        }
        let mut worst = 0u64;
        for o in &hist.ops {
            let (Kind::Read | Kind::Subscribe, Some(Outcome::Ok { states, .. }), Some(done)) =
                (o.kind(), o.result, o.complete)
            else {
                continue;
            };
            if o.invoke < heal {
                continue;
            }
            for s in states {
                let latest = ack_list
                    .get(s.bucket.as_str())
                    .into_iter()
                    .flatten()
                    .filter(|(t, _)| *t < o.invoke)
                    .map(|(_, v)| *v)
                    .max();
                if latest.is_some_and(|l| s.version < l) {
                    worst = worst.max(done - heal);
                }
            }
        }
        live.convergence_s = Some(worst as f64 / 1e6);
    }
    live
}
