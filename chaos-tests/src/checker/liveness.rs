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
        let sent_to_faulted = active
            .iter()
            .any(|w| nodes_of(w).iter().any(|n| n == o.via()));
        let affected = sent_to_faulted
            || o.buckets().iter().any(|b| {
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

    // Failover: every set's write attempts, (completion, invocation, success).
    let mut attempts: BTreeMap<&str, Vec<(u64, u64, bool)>> = BTreeMap::new();
    for o in &hist.ops {
        if o.kind() != Kind::Write {
            continue;
        }
        let done = o.complete.unwrap_or(hist.end).max(o.invoke);
        for b in o.buckets() {
            attempts
                .entry(set_of(b))
                .or_default()
                .push((done, o.invoke, o.succeeded()));
        }
    }
    for v in attempts.values_mut() {
        v.sort_unstable();
    }
    let mut failover: Option<u64> = None;
    for w in &wins {
        let nodes = nodes_of(w);
        if nodes.is_empty() {
            continue;
        }
        for (set, tries) in &attempts {
            let Some(owner) = owners.at(set, w.start) else {
                continue;
            };
            if !nodes.iter().any(|n| n == owner) {
                continue;
            }
            let longest = outages(tries, w, hist.end).max().unwrap_or(0);
            failover = Some(failover.map_or(longest, |f| f.max(longest)));
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

/// The outages of one set's write attempts `(completion, invocation, success)` (sorted by
/// completion) that a fault window `w` explains, in µs: from the later of the fault start
/// and the last success before a run of failures, to the first success after it (`end`
/// when none came).
fn outages<'a>(
    tries: &'a [(u64, u64, bool)],
    w: &'a Window,
    end: u64,
) -> impl Iterator<Item = u64> + 'a {
    let mut runs = Vec::new();
    let mut last_ok: Option<u64> = None;
    // While failures run: whether one of them was invoked inside the window.
    let mut run: Option<bool> = None;
    for &(done, invoked, ok) in tries {
        if ok {
            if run == Some(true) {
                runs.push((last_ok, Some(done)));
            }
            run = None;
            last_ok = Some(done);
        } else {
            let inside = w.start <= invoked && invoked <= w.end;
            run = Some(run.unwrap_or(false) || inside);
        }
    }
    if run == Some(true) {
        runs.push((last_ok, None));
    }
    runs.into_iter().map(move |(before, after)| {
        let from = before.map_or(w.start, |b| b.max(w.start));
        after.unwrap_or(end).saturating_sub(from)
    })
}
