//! The safety properties over the version chain (definitions in the module docs of
//! [`super`]).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use tether_proto::{reconcile, Bucket, BucketId, Hlc, Update};

use super::{CheckOptions, Findings, Hist, Kind, Staleness};
use crate::history::{Call, Fields, Outcome};

/// One bucket state shown to a client.
#[derive(Debug)]
struct Obs<'a> {
    op: u64,
    client: u32,
    kind: Kind,
    invoke: u64,
    complete: u64,
    bucket: &'a str,
    version: u64,
    ts: u64,
    fields: Option<&'a Fields>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    Ok,
    Unknown,
    Refused,
}

/// A logical write: the operations that sent it (one, or a retry with the same `op_id`).
#[derive(Debug)]
struct Write<'a> {
    ops: Vec<u64>,
    bucket: &'a str,
    fields: &'a Fields,
    base: u64,
    occ: bool,
    fate: Fate,
    /// First invocation.
    invoke: u64,
    /// Last completion (`u64::MAX` when one never completed).
    complete: u64,
    /// `(version, timestamp)` of the acknowledgement.
    ack: Option<(u64, u64)>,
}

fn value_key(v: &serde_json::Value) -> String {
    v.to_string()
}

fn hlc_pair(prev_ts: u64, ts: u64) -> (Hlc, Hlc) {
    let stored = Hlc::at(prev_ts);
    let now = if ts > prev_ts {
        Hlc::at(ts)
    } else {
        stored.successor()
    };
    (stored, now)
}

/// The state `w` makes of `stored` (version `v - 1`, timestamp `prev_ts`) when the server
/// stamps it `ts`, or `None` when `reconcile` refuses it.
fn apply(
    stored: &Fields,
    v: u64,
    prev_ts: u64,
    ts: u64,
    w: &Write<'_>,
    occ: bool,
) -> Option<Fields> {
    let id = BucketId::parse("chaos.checker").ok()?;
    let (stored_ts, now) = hlc_pair(prev_ts, ts);
    let bucket = Bucket {
        id,
        value: stored.clone(),
        timestamp: stored_ts,
        version: v.saturating_sub(1),
    };
    let update = Update {
        value: w.fields.clone(),
        base_version: w.base,
        occ,
    };
    reconcile(&bucket, &update, now)
        .new_state()
        .map(|b| b.value.clone())
}

fn ops_text(ops: &[u64]) -> String {
    ops.iter()
        .map(|o| format!("op {o}"))
        .collect::<Vec<_>>()
        .join("/")
}

/// `timestamps_ahead`: every state seen (read, subscribe answer, acknowledgement) must be
/// stamped no later than the wall-clock time it was seen plus `max_timestamp_ahead_ms`
/// (a server stamps before it answers). Needs the run's start on the wall clock; each
/// bucket version counts once.
fn timestamps_ahead(hist: &Hist<'_>, obs: &[Obs<'_>], opts: &CheckOptions, f: &mut Findings) {
    let Some(wall) = hist.wall_ms else {
        return;
    };
    // Each bucket version at its first sighting (the strictest), with its op.
    let mut first: BTreeMap<(&str, u64), (u64, u64, u64)> = BTreeMap::new();
    for o in obs.iter().filter(|o| o.complete != u64::MAX) {
        let e = first
            .entry((o.bucket, o.version))
            .or_insert((o.complete, o.ts, o.op));
        if o.complete < e.0 {
            *e = (o.complete, o.ts, o.op);
        }
    }
    for ((bucket, version), (complete, ts, op)) in first {
        let at = wall + complete / 1_000;
        if ts > at + opts.max_timestamp_ahead_ms {
            f.add(
                "timestamps_ahead",
                bucket,
                Some(version),
                vec![op],
                format!(
                    "{bucket} v{version} stamped {ts} ms, {:.1} s after it was seen (at {at} ms)",
                    (ts - at) as f64 / 1000.0
                ),
            );
        }
    }
}

pub(super) fn check(hist: &Hist<'_>, opts: &CheckOptions, f: &mut Findings) -> Staleness {
    let mut obs: Vec<Obs<'_>> = Vec::new();
    let mut writes: Vec<Write<'_>> = Vec::new();
    let mut write_of: HashMap<(&str, String), usize> = HashMap::new();
    for o in &hist.ops {
        let complete = o.complete.unwrap_or(u64::MAX);
        if let Some(Outcome::Ok { states, .. }) = o.result {
            for s in states {
                obs.push(Obs {
                    op: o.op,
                    client: o.client,
                    kind: o.kind(),
                    invoke: o.invoke,
                    complete,
                    bucket: &s.bucket,
                    version: s.version,
                    ts: s.timestamp,
                    fields: s.fields.as_ref(),
                });
            }
        }
        if let Call::Write {
            bucket,
            fields,
            base_version,
            occ,
            op_id,
            ..
        } = o.call
        {
            let fate = match o.result {
                Some(Outcome::Ok { .. }) => Fate::Ok,
                Some(Outcome::Refused { .. }) => Fate::Refused,
                _ => Fate::Unknown,
            };
            let ack = match o.result {
                // A replayed `merged` answer shows the bucket as it is now, which may be
                // later than the write's own version (API.md): an observation, and an
                // acknowledgement without a version.
                Some(Outcome::Ok {
                    outcome, replayed, ..
                }) if *replayed && outcome.as_deref() != Some("applied") => None,
                Some(Outcome::Ok { states, .. }) => states
                    .iter()
                    .find(|s| &s.bucket == bucket)
                    .map(|s| (s.version, s.timestamp)),
                _ => None,
            };
            let key = (
                bucket.as_str(),
                op_id.clone().unwrap_or_else(|| format!("#op{}", o.op)),
            );
            match write_of.get(&key) {
                Some(&i) => {
                    let w = &mut writes[i];
                    w.ops.push(o.op);
                    w.invoke = w.invoke.min(o.invoke);
                    w.complete = if w.complete == u64::MAX || complete == u64::MAX {
                        u64::MAX
                    } else {
                        w.complete.max(complete)
                    };
                    w.fate = match (w.fate, fate) {
                        (Fate::Ok, _) | (_, Fate::Ok) => Fate::Ok,
                        (Fate::Unknown, _) | (_, Fate::Unknown) => Fate::Unknown,
                        _ => Fate::Refused,
                    };
                    if w.ack.is_none() {
                        w.ack = ack;
                    }
                }
                None => {
                    write_of.insert(key, writes.len());
                    writes.push(Write {
                        ops: vec![o.op],
                        bucket,
                        fields,
                        base: *base_version,
                        occ: *occ,
                        fate,
                        invoke: o.invoke,
                        complete,
                        ack,
                    });
                }
            }
        }
    }

    // Per bucket: observations by version, acknowledged writes by version.
    let mut chain: BTreeMap<&str, BTreeMap<u64, Vec<usize>>> = BTreeMap::new();
    for (i, o) in obs.iter().enumerate() {
        chain
            .entry(o.bucket)
            .or_default()
            .entry(o.version)
            .or_default()
            .push(i);
    }
    let mut acked: BTreeMap<&str, BTreeMap<u64, Vec<usize>>> = BTreeMap::new();
    for (i, w) in writes.iter().enumerate() {
        if let (Fate::Ok, Some((v, _))) = (w.fate, w.ack) {
            acked
                .entry(w.bucket)
                .or_default()
                .entry(v)
                .or_default()
                .push(i);
        }
    }

    timestamps_ahead(hist, &obs, opts, f);
    let forked = forks(&obs, &writes, &chain, &acked, f);
    let garbage = garbage(&obs, &writes, f);
    occ(&writes, f);
    let lost = lost(hist, &obs, &writes, f);
    derivation(&obs, &writes, &chain, &acked, &forked, &garbage, &lost, f);
    hung(hist, opts, f);
    missed(hist, &obs, opts, f);
    sweep(&obs, &writes, f)
}

/// (bucket, version) with two different states, or acknowledged to two writes.
fn forks<'a>(
    obs: &[Obs<'a>],
    writes: &[Write<'a>],
    chain: &BTreeMap<&'a str, BTreeMap<u64, Vec<usize>>>,
    acked: &BTreeMap<&'a str, BTreeMap<u64, Vec<usize>>>,
    f: &mut Findings,
) -> HashSet<(&'a str, u64)> {
    let mut forked = HashSet::new();
    let mut versions: BTreeSet<(&str, u64)> = BTreeSet::new();
    for (b, vs) in chain {
        versions.extend(vs.keys().map(|v| (*b, *v)));
    }
    for (b, vs) in acked {
        versions.extend(vs.keys().map(|v| (*b, *v)));
    }
    for (b, v) in versions {
        let seen: &[usize] = chain
            .get(b)
            .and_then(|c| c.get(&v))
            .map_or(&[], Vec::as_slice);
        let ws: &[usize] = acked
            .get(b)
            .and_then(|c| c.get(&v))
            .map_or(&[], Vec::as_slice);
        let mut detail = Vec::new();
        let tss: BTreeSet<u64> = seen.iter().map(|&i| obs[i].ts).collect();
        if tss.len() > 1 {
            detail.push(format!("timestamps {tss:?}"));
        }
        let mut field_sets: Vec<&Fields> = Vec::new();
        for &i in seen {
            if let Some(fl) = obs[i].fields {
                if !field_sets.contains(&fl) {
                    field_sets.push(fl);
                }
            }
        }
        if field_sets.len() > 1 {
            detail.push(format!(
                "field sets {}",
                field_sets
                    .iter()
                    .map(|fl| serde_json::Value::Object((*fl).clone()).to_string())
                    .collect::<Vec<_>>()
                    .join(" vs ")
            ));
        }
        if ws.len() > 1 {
            detail.push(format!(
                "acknowledged to {} writes",
                ws.iter()
                    .map(|&i| ops_text(&writes[i].ops))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        if !detail.is_empty() {
            forked.insert((b, v));
            let mut ops: Vec<u64> = seen.iter().map(|&i| obs[i].op).collect();
            ops.extend(ws.iter().flat_map(|&i| writes[i].ops.iter().copied()));
            ops.sort_unstable();
            ops.dedup();
            f.add(
                "forked_versions",
                b,
                Some(v),
                ops,
                format!(
                    "version {v} of {b} seen as two states: {}",
                    detail.join("; ")
                ),
            );
        }
    }
    forked
}

/// What wrote one (bucket, field, value).
#[derive(Default)]
struct Producers {
    /// Some applied-or-unknown write produced it.
    any: bool,
    /// One of those was acknowledged with a version (a state shown before it was sent is
    /// then `realtime_violations`' business, by version).
    acked: bool,
    /// The earliest first invocation of such a write, and its ops.
    first: Option<(u64, Vec<u64>)>,
    /// The refused writes' ops.
    refused: Vec<u64>,
}

/// Observed states holding a value no applied-or-unknown write produced, or only writes
/// sent after the observation completed (a value from the future: found by the
/// differential test, a read shown a state whose field came from a write sent later).
fn garbage<'a>(obs: &[Obs<'a>], writes: &[Write<'a>], f: &mut Findings) -> HashSet<(&'a str, u64)> {
    let mut produced: HashMap<(&str, &str, String), Producers> = HashMap::new();
    let mut first_write: HashMap<&str, u64> = HashMap::new();
    for w in writes {
        let e = first_write.entry(w.bucket).or_insert(w.invoke);
        *e = (*e).min(w.invoke);
        for (k, v) in w.fields {
            let p = produced
                .entry((w.bucket, k.as_str(), value_key(v)))
                .or_default();
            if w.fate == Fate::Refused {
                p.refused.extend(&w.ops);
                continue;
            }
            p.any = true;
            p.acked |= w.ack.is_some();
            if p.first.as_ref().is_none_or(|(t, _)| w.invoke < *t) {
                p.first = Some((w.invoke, w.ops.clone()));
            }
        }
    }
    // The initial state: what was shown before the first write was sent, and version 1.
    let mut baseline: HashSet<(&str, &str, String)> = HashSet::new();
    for o in obs {
        let before = first_write.get(o.bucket).is_none_or(|&t| o.complete < t);
        if let (true, Some(fl)) = (before || o.version == 1, o.fields) {
            for (k, v) in fl {
                baseline.insert((o.bucket, k.as_str(), value_key(v)));
            }
        }
    }
    let mut bad = HashSet::new();
    for o in obs {
        let Some(fl) = o.fields else { continue };
        let mut why = Vec::new();
        let mut ops = vec![o.op];
        for (k, v) in fl {
            let key = (o.bucket, k.as_str(), value_key(v));
            if baseline.contains(&key) {
                continue;
            }
            match produced.get(&key) {
                // "Before" is strict: sent at the very microsecond the read completed is
                // concurrent with it.
                Some(Producers {
                    acked: false,
                    first: Some((sent, by)),
                    ..
                }) if *sent > o.complete => {
                    why.push(format!(
                        "{k}={v} written only by {} of unknown fate, sent after it completed",
                        ops_text(by)
                    ));
                    ops.extend(by);
                }
                Some(Producers { any: true, .. }) => {}
                Some(Producers { refused, .. }) => {
                    why.push(format!(
                        "{k}={v} written only by refused {}",
                        ops_text(refused)
                    ));
                    ops.extend(refused);
                }
                None => why.push(format!("{k}={v} written by no operation")),
            }
        }
        if !why.is_empty() {
            bad.insert((o.bucket, o.version));
            f.add(
                "garbage_reads",
                o.bucket,
                Some(o.version),
                ops,
                format!(
                    "op {} was shown {} v{}: {}",
                    o.op,
                    o.bucket,
                    o.version,
                    why.join("; ")
                ),
            );
        }
    }
    bad
}

/// Applied OCC writes that did not land on their base version.
fn occ(writes: &[Write<'_>], f: &mut Findings) {
    for w in writes {
        let (Fate::Ok, Some((v, _)), true) = (w.fate, w.ack, w.occ) else {
            continue;
        };
        if v == w.base + 1 {
            continue;
        }
        let mut ops = w.ops.clone();
        let others: Vec<u64> = writes
            .iter()
            .filter(|o| {
                o.bucket == w.bucket
                    && o.occ
                    && o.base == w.base
                    && o.fate == Fate::Ok
                    && !std::ptr::eq(*o, w)
            })
            .flat_map(|o| o.ops.iter().copied())
            .collect();
        ops.extend(&others);
        f.add(
            "occ_lost_updates",
            w.bucket,
            Some(v),
            ops,
            format!(
                "OCC {} based on v{} was applied as v{v}{}",
                ops_text(&w.ops),
                w.base,
                if others.is_empty() {
                    String::new()
                } else {
                    format!(" (also applied on v{}: {})", w.base, ops_text(&others))
                }
            ),
        );
    }
}

/// How many search steps one stretch of the chain may take before the checker gives up
/// on it (it then restarts at the next shown state; nothing is counted).
const SEARCH_BUDGET: usize = 20_000;

/// How many search steps the searches of a stretch again with the ones before it may take
/// together (they stop there; the stretch is then counted as not derived).
const REDERIVE_BUDGET: usize = 4 * SEARCH_BUDGET;

/// One version on the path between two states shown with their fields.
#[derive(Debug, Clone, Copy)]
enum Slot {
    /// The write acknowledged at this version, and the acknowledged timestamp.
    Fixed(usize, u64),
    /// Nobody was shown this version: a write of unknown fate sent before `bound` made it.
    Free { bound: u64 },
}

/// A stretch of a bucket's chain: from a state shown with its fields to the next one.
struct Stretch<'s> {
    /// The version, fields and timestamp of the state it starts from.
    start: (u64, &'s Fields, u64),
    /// The versions after it, up to and including the target's.
    slots: Vec<Slot>,
    target: &'s Fields,
    target_ts: u64,
    /// The writes of unknown fate its free slots took, in slot order, once derived.
    chosen: Vec<usize>,
}

impl Stretch<'_> {
    fn free_slots(&self) -> usize {
        self.slots
            .iter()
            .filter(|s| matches!(s, Slot::Free { .. }))
            .count()
    }
}

/// A depth-first search for the writes of unknown fate that fill the free slots of
/// consecutive stretches (each write used once), every stretch ending on its target.
struct PathSearch<'s, 'a> {
    writes: &'s [Write<'a>],
    used: &'s [bool],
    candidates: &'s [usize],
    slots: Vec<Slot>,
    /// Per slot: the target state the slot must make, when it ends a stretch.
    ends: Vec<Option<(&'s Fields, u64)>>,
    start_version: u64,
    budget: usize,
    chosen: Vec<usize>,
}

impl<'s, 'a> PathSearch<'s, 'a> {
    /// A search over `stretches`, consecutive (each starts where the one before ends).
    fn new(
        writes: &'s [Write<'a>],
        used: &'s [bool],
        candidates: &'s [usize],
        stretches: &[&Stretch<'s>],
    ) -> Self {
        let mut slots = Vec::new();
        let mut ends = Vec::new();
        for s in stretches {
            for (k, slot) in s.slots.iter().enumerate() {
                slots.push(*slot);
                ends.push((k + 1 == s.slots.len()).then_some((s.target, s.target_ts)));
            }
        }
        PathSearch {
            writes,
            used,
            candidates,
            slots,
            ends,
            start_version: stretches.first().map_or(0, |s| s.start.0),
            budget: SEARCH_BUDGET,
            chosen: Vec::new(),
        }
    }

    /// True when the slots from `i` on turn `fields` (version `start_version + i`,
    /// timestamp `ts`) into each stretch's target in turn.
    fn go(&mut self, i: usize, fields: &Fields, ts: u64) -> bool {
        if self.budget == 0 {
            return false;
        }
        self.budget -= 1;
        let Some(slot) = self.slots.get(i).copied() else {
            return true;
        };
        let v = self.start_version + i as u64 + 1;
        let end = self.ends[i];
        let reaches = |next: &Fields| end.is_none_or(|(target, _)| next == target);
        match slot {
            Slot::Fixed(wi, ack_ts) => {
                let w = &self.writes[wi];
                match apply(fields, v, ts, ack_ts.max(ts), w, false) {
                    // The next stretch starts from its state as shown.
                    Some(next) if reaches(&next) => {
                        self.go(i + 1, &next, end.map_or(ack_ts.max(ts), |e| e.1))
                    }
                    _ => false,
                }
            }
            Slot::Free { bound } => {
                let new_ts = end.map_or(ts, |e| e.1);
                for k in 0..self.candidates.len() {
                    let wi = self.candidates[k];
                    let w = &self.writes[wi];
                    if self.used[wi] || self.chosen.contains(&wi) || w.invoke > bound {
                        continue;
                    }
                    // The write that made a target wrote values the target shows.
                    if let Some((target, _)) = end {
                        if w.fields.iter().any(|(k, x)| target.get(k) != Some(x)) {
                            continue;
                        }
                    }
                    let Some(next) = apply(fields, v, ts, new_ts, w, w.occ) else {
                        continue;
                    };
                    if !reaches(&next) {
                        continue;
                    }
                    self.chosen.push(wi);
                    if self.go(i + 1, &next, new_ts) {
                        return true;
                    }
                    self.chosen.pop();
                }
                false
            }
        }
    }
}

/// Every shown state derivable from the previous shown state by the writes that made the
/// versions in between: the one acknowledged at each version, or else exactly one write of
/// unknown fate per version, each write used once.
#[allow(clippy::too_many_arguments)]
fn derivation<'a>(
    obs: &[Obs<'a>],
    writes: &[Write<'a>],
    chain: &BTreeMap<&'a str, BTreeMap<u64, Vec<usize>>>,
    acked: &BTreeMap<&'a str, BTreeMap<u64, Vec<usize>>>,
    forked: &HashSet<(&'a str, u64)>,
    garbage: &HashSet<(&'a str, u64)>,
    lost: &HashSet<usize>,
    f: &mut Findings,
) {
    let mut used = vec![false; writes.len()];
    let empty = BTreeMap::new();
    let buckets: BTreeSet<&str> = chain.keys().chain(acked.keys()).copied().collect();
    for b in buckets {
        let seen = chain.get(b).unwrap_or(&empty);
        let acks = acked.get(b).unwrap_or(&empty);
        let versions: BTreeSet<u64> = seen.keys().chain(acks.keys()).copied().collect();
        let candidates: Vec<usize> = writes
            .iter()
            .enumerate()
            .filter(|(_, w)| {
                w.bucket == b
                    && (w.fate == Fate::Unknown || (w.fate == Fate::Ok && w.ack.is_none()))
            })
            .map(|(i, _)| i)
            .collect();
        // The last state shown with its fields: (version, fields, timestamp, op).
        let mut prev: Option<(u64, &Fields, u64, u64)> = None;
        // The stretches derived since the chain last broke, with the writes they took:
        // when a stretch cannot be derived with the writes left, they are searched again
        // together with it (the writes an earlier stretch took may be the ones it needs).
        let mut derived: Vec<Stretch<'_>> = Vec::new();
        let mut last_ts: Option<(u64, u64, u64)> = None; // (version, ts, op)
        for &v in &versions {
            if forked.contains(&(b, v)) {
                prev = None;
                last_ts = None;
                derived.clear();
                continue;
            }
            let shown: &[usize] = seen.get(&v).map_or(&[], Vec::as_slice);
            let ack = acks.get(&v).and_then(|ws| ws.first().copied());
            let ts = shown
                .first()
                .map(|&i| obs[i].ts)
                .or_else(|| ack.and_then(|i| writes[i].ack.map(|a| a.1)))
                .unwrap_or(0);
            let some_op = shown
                .first()
                .map(|&i| obs[i].op)
                .or_else(|| ack.map(|i| writes[i].ops[0]))
                .unwrap_or(0);
            let is_garbage = garbage.contains(&(b, v));
            if let Some((pv, pts, pop)) = last_ts {
                if ts < pts && !is_garbage {
                    f.add(
                        "underivable_states",
                        b,
                        Some(v),
                        vec![pop, some_op],
                        format!("{b} v{v} has timestamp {ts} ms, older than v{pv}'s {pts} ms"),
                    );
                    prev = None;
                }
            }
            last_ts = Some((v, ts, some_op));
            let Some(fields) = shown.iter().find_map(|&i| obs[i].fields) else {
                continue; // a version on the way to the next shown state
            };
            if is_garbage {
                prev = None; // counted already; not a base to derive from
                derived.clear();
                continue;
            }
            if let Some((pv, pfields, pts, pop)) = prev.filter(|p| ts >= p.2) {
                let first_shown = shown
                    .iter()
                    .map(|&i| obs[i].complete)
                    .min()
                    .unwrap_or(u64::MAX);
                // Versions pv+1 ..= v: the acknowledged write, or a free slot that must
                // have been made by a write sent before any later version was known.
                let mut slots = Vec::new();
                let mut bound = first_shown;
                for s in (pv + 1..=v).rev() {
                    match acks.get(&s).and_then(|ws| ws.first()) {
                        Some(&wi) => {
                            let w = &writes[wi];
                            slots.push(Slot::Fixed(wi, w.ack.map_or(ts, |a| a.1)));
                            bound = bound.min(w.complete);
                        }
                        None => slots.push(Slot::Free { bound }),
                    }
                }
                slots.reverse();
                let fixed: Vec<usize> = slots
                    .iter()
                    .filter_map(|s| match s {
                        Slot::Fixed(wi, _) => Some(*wi),
                        Slot::Free { .. } => None,
                    })
                    .collect();
                let mut stretch = Stretch {
                    start: (pv, pfields, pts),
                    slots,
                    target: fields,
                    target_ts: ts,
                    chosen: Vec::new(),
                };
                let mut search = PathSearch::new(writes, &used, &candidates, &[&stretch]);
                let found = search.go(0, pfields, pts);
                let gave_up = search.budget == 0;
                let chosen = std::mem::take(&mut search.chosen);
                let chosen = if found {
                    for &wi in &chosen {
                        used[wi] = true;
                    }
                    Some(chosen)
                } else if gave_up {
                    None
                } else {
                    rederive(writes, &mut used, &candidates, &mut derived, &stretch)
                };
                let derivable = chosen.is_some();
                match chosen {
                    Some(chosen) => {
                        stretch.chosen = chosen;
                        derived.push(stretch);
                    }
                    // The chain starts again from this state.
                    None => derived.clear(),
                }
                if !derivable && !gave_up && !fixed.iter().any(|wi| lost.contains(wi)) {
                    let mut ops = vec![pop];
                    ops.extend(fixed.iter().flat_map(|&wi| writes[wi].ops.iter().copied()));
                    ops.extend(shown.iter().map(|&i| obs[i].op));
                    let how = if v == pv + 1 {
                        match fixed.first() {
                            Some(&wi) => format!(
                                "the write acknowledged at v{v} ({})",
                                ops_text(&writes[wi].ops)
                            ),
                            None => "any single write of unknown fate".to_string(),
                        }
                    } else {
                        format!(
                            "the {} acknowledged write(s) and {} write(s) of unknown fate that made v{}..v{v}",
                            fixed.len(),
                            (v - pv) as usize - fixed.len(),
                            pv + 1
                        )
                    };
                    f.add(
                        "underivable_states",
                        b,
                        Some(v),
                        ops,
                        format!(
                            "{b} v{v} {} does not follow from v{pv} {} by {how}",
                            serde_json::Value::Object(fields.clone()),
                            serde_json::Value::Object(pfields.clone()),
                        ),
                    );
                }
            }
            if prev.is_some_and(|p| ts < p.2) {
                derived.clear();
            }
            prev = Some((v, fields, ts, some_op));
        }
    }
}

/// Searches `stretch` again together with the stretches `derived` before it, the writes
/// they took given back: from the last of them back to the first, the first group that
/// derives wins, and its writes are taken instead (in `used` and in each earlier
/// stretch). The writes `stretch` takes, if one does. All the searches together take at
/// most [`REDERIVE_BUDGET`] steps.
fn rederive<'s>(
    writes: &[Write<'_>],
    used: &mut [bool],
    candidates: &[usize],
    derived: &mut [Stretch<'s>],
    stretch: &Stretch<'s>,
) -> Option<Vec<usize>> {
    let mut budget = REDERIVE_BUDGET;
    for from in (0..derived.len()).rev() {
        if budget == 0 {
            break;
        }
        let mut freed = used.to_vec();
        for s in &derived[from..] {
            for &wi in &s.chosen {
                freed[wi] = false;
            }
        }
        let group: Vec<&Stretch<'s>> = derived[from..]
            .iter()
            .chain(std::iter::once(stretch))
            .collect();
        let mut search = PathSearch::new(writes, &freed, candidates, &group);
        let given = search.budget.min(budget);
        search.budget = given;
        let (_, start_fields, start_ts) = derived[from].start;
        let found = search.go(0, start_fields, start_ts);
        budget -= given - search.budget;
        if !found {
            continue;
        }
        let mut chosen = std::mem::take(&mut search.chosen).into_iter();
        for &wi in chosen.as_slice() {
            freed[wi] = true;
        }
        used.copy_from_slice(&freed);
        for s in &mut derived[from..] {
            let n = s.free_slots();
            s.chosen = chosen.by_ref().take(n).collect();
        }
        return Some(chosen.collect());
    }
    None
}

/// Acknowledged writes whose values are missing from a later state or the final reads.
fn lost(
    hist: &Hist<'_>,
    obs: &[Obs<'_>],
    writes: &[Write<'_>],
    f: &mut Findings,
) -> HashSet<usize> {
    let mut lost = HashSet::new();
    let mut by_bucket: HashMap<&str, Vec<&Obs<'_>>> = HashMap::new();
    for o in obs {
        by_bucket.entry(o.bucket).or_default().push(o);
    }
    for list in by_bucket.values_mut() {
        list.sort_by_key(|o| (o.version, o.complete));
    }
    // (bucket, field) → versions of the acknowledged writes of that field, sorted;
    // (bucket, field, value) → the writes (not refused) that wrote that value.
    let mut field_acks: HashMap<(&str, &str), Vec<u64>> = HashMap::new();
    let mut produced: HashMap<(&str, &str, String), Vec<usize>> = HashMap::new();
    for (zi, z) in writes.iter().enumerate() {
        if z.fate == Fate::Refused {
            continue;
        }
        for (k, v) in z.fields {
            produced
                .entry((z.bucket, k.as_str(), value_key(v)))
                .or_default()
                .push(zi);
            if let (Fate::Ok, Some((vz, _))) = (z.fate, z.ack) {
                field_acks
                    .entry((z.bucket, k.as_str()))
                    .or_default()
                    .push(vz);
            }
        }
    }
    for v in field_acks.values_mut() {
        v.sort_unstable();
    }
    for (wi, w) in writes.iter().enumerate() {
        let (Fate::Ok, Some((vw, _))) = (w.fate, w.ack) else {
            continue;
        };
        let list = by_bucket.get(w.bucket).map_or(&[][..], Vec::as_slice);
        let from = list.partition_point(|s| s.version < vw);
        // Each field is checked up to the next acknowledged write of it; from there on,
        // that write's own check takes over.
        let fields: Vec<(&String, &serde_json::Value, u64)> = w
            .fields
            .iter()
            .map(|(k, val)| {
                let next = field_acks
                    .get(&(w.bucket, k.as_str()))
                    .and_then(|vs| vs.get(vs.partition_point(|v| *v <= vw)).copied())
                    .unwrap_or(u64::MAX);
                (k, val, next)
            })
            .collect();
        let limit = fields.iter().map(|f| f.2).max().unwrap_or(0);
        let mut lost_in: Option<(&Obs<'_>, String)> = None;
        'states: for s in &list[from..] {
            if s.version >= limit {
                break;
            }
            let Some(fl) = s.fields else { continue };
            for &(k, val, next) in &fields {
                if s.version >= next {
                    continue;
                }
                let Some(got) = fl.get(k) else {
                    lost_in = Some((s, format!("{k} missing")));
                    break 'states;
                };
                if got == val {
                    continue;
                }
                let overwritten = produced
                    .get(&(w.bucket, k.as_str(), value_key(got)))
                    .into_iter()
                    .flatten()
                    .any(|&zi| {
                        let z = &writes[zi];
                        zi != wi
                            && match (z.fate, z.ack) {
                                (Fate::Ok, Some((vz, _))) => vz > vw && vz <= s.version,
                                // A write of unknown fate may take effect any time after
                                // it was sent; one acknowledged without a version, after
                                // `w` was sent only if it had not completed by then.
                                (Fate::Unknown, _) => true,
                                _ => z.complete > w.invoke,
                            }
                    });
                if !overwritten {
                    lost_in = Some((
                        s,
                        format!("{k}={got} instead of {val}, and no later write of {k} made it"),
                    ));
                    break;
                }
            }
            if lost_in.is_some() {
                break;
            }
        }
        if let Some((s, why)) = lost_in {
            lost.insert(wi);
            let mut ops = w.ops.clone();
            ops.push(s.op);
            f.add(
                "lost_writes",
                w.bucket,
                Some(vw),
                ops,
                format!(
                    "write {} acknowledged as {} v{vw} is not in v{} shown to op {}: {why}",
                    ops_text(&w.ops),
                    w.bucket,
                    s.version,
                    s.op
                ),
            );
            continue;
        }
        let finals: Vec<&&Obs<'_>> = list.iter().filter(|s| s.invoke >= hist.end).collect();
        if let Some(top) = finals.iter().max_by_key(|s| s.version) {
            if top.version < vw {
                lost.insert(wi);
                let mut ops = w.ops.clone();
                ops.push(top.op);
                f.add(
                    "lost_writes",
                    w.bucket,
                    Some(vw),
                    ops,
                    format!(
                        "write {} acknowledged as {} v{vw}, but the final reads show at most v{} (op {})",
                        ops_text(&w.ops),
                        w.bucket,
                        top.version,
                        top.op
                    ),
                );
            }
        }
    }
    lost
}

/// Subscribes answered (or still open at `End`) past their timeout plus the grace.
///
/// A frozen process answers nobody: a subscribe sent to a node (directly, or through the
/// load balancer, which may have handed it to that node) whose deadline fell while that
/// node was paused (SIGSTOP) is excused — but only if it was answered within its own
/// timeout plus the grace after the node woke (a woken node must answer its held
/// subscribers at once). Likewise an answer nobody can deliver: a subscribe sent to a
/// node (directly, or through the load balancer) while the clients and the load balancer
/// were cut from that node (`lb-partition`) at any time before its deadline — its answer,
/// or its request, may be dropped on the way, and the client cannot tell. Excused
/// subscribes are counted in `Verdict::excused_subscribers`.
fn hung(hist: &Hist<'_>, opts: &CheckOptions, f: &mut Findings) {
    let windows = super::fault_windows(hist.entries, hist.end);
    let pauses: Vec<_> = windows.iter().filter(|w| w.kind == "pause").collect();
    let cuts: Vec<_> = windows
        .iter()
        .filter(|w| w.kind == "lb-partition")
        .collect();
    for o in &hist.ops {
        let Call::Subscribe {
            timeout_ms,
            held,
            via,
        } = o.call
        else {
            continue;
        };
        let allowed_us = timeout_ms.saturating_add(opts.subscribe_grace_ms) * 1000;
        let deadline = o.invoke.saturating_add(allowed_us);
        // The time the node it was sent to (any node, through the load balancer) spent
        // frozen while the subscribe was open: a stopped process answers nobody, so the
        // subscribe is late only by what exceeds it.
        let done = o.complete.unwrap_or(hist.end);
        let frozen_us: u64 = pauses
            .iter()
            .filter(|w| via == "lb" || *via == w.target)
            .map(|w| done.min(w.end).saturating_sub(o.invoke.max(w.start)))
            .sum();
        let frozen = (frozen_us > 0
            && done.saturating_sub(o.invoke) <= allowed_us.saturating_add(frozen_us))
        .then_some(());
        let cut = cuts.iter().find(|w| {
            (via == "lb" || *via == w.target) && w.start <= deadline && o.invoke <= w.end
        });
        let (late, detail) = match o.complete {
            Some(t) if t > deadline => (
                true,
                format!(
                    "answered after {:.1} s (timeout {timeout_ms} ms + grace {} ms)",
                    (t - o.invoke) as f64 / 1e6,
                    opts.subscribe_grace_ms
                ),
            ),
            None if hist.end > deadline => (
                true,
                format!(
                    "never answered; {:.1} s open at End (timeout {timeout_ms} ms + grace {} ms)",
                    (hist.end - o.invoke) as f64 / 1e6,
                    opts.subscribe_grace_ms
                ),
            ),
            _ => (false, String::new()),
        };
        if late && (frozen.is_some() || cut.is_some()) {
            f.excused_subscribers += 1;
        } else if late {
            let bucket = held.keys().next().map_or("", String::as_str);
            f.add(
                "hung_subscribers",
                bucket,
                None,
                vec![o.op],
                format!("subscribe op {} (client {}) {detail}", o.op, o.client),
            );
        }
    }
}

/// Subscribes answered "nothing changed" although a newer version of a bucket they held
/// was known (acknowledged, or shown to anyone) more than `notify_grace` earlier.
fn missed(hist: &Hist<'_>, obs: &[Obs<'_>], opts: &CheckOptions, f: &mut Findings) {
    // Per bucket: completions in time order with the highest version known by then.
    let mut known: HashMap<&str, Vec<(u64, u64, u64)>> = HashMap::new(); // (t, max v, op)
    let mut by_bucket: HashMap<&str, Vec<&Obs<'_>>> = HashMap::new();
    for o in obs.iter().filter(|o| o.complete != u64::MAX) {
        by_bucket.entry(o.bucket).or_default().push(o);
    }
    for (b, mut list) in by_bucket {
        list.sort_by_key(|o| o.complete);
        let mut top: Option<(u64, u64)> = None; // (version, op)
        let line = known.entry(b).or_default();
        for o in list {
            if top.is_none_or(|(v, _)| o.version > v) {
                top = Some((o.version, o.op));
            }
            if let Some((v, op)) = top {
                line.push((o.complete, v, op));
            }
        }
    }
    let grace_us = opts.notify_grace_ms.saturating_mul(1000);
    for o in &hist.ops {
        let (Call::Subscribe { held, .. }, Some(t), Some(Outcome::Ok { states, .. })) =
            (o.call, o.complete, o.result)
        else {
            continue;
        };
        if !states.is_empty() {
            continue;
        }
        for (b, &held_v) in held {
            let Some(line) = known.get(b.as_str()) else {
                continue;
            };
            // The highest version known more than the grace before the answer.
            let cut = t.saturating_sub(grace_us);
            let n = line.partition_point(|(at, _, _)| *at < cut);
            let Some(&(_, top, _)) = n.checked_sub(1).and_then(|i| line.get(i)) else {
                continue;
            };
            if top <= held_v {
                continue;
            }
            // The first time anything newer than the held version was known.
            let first = line.partition_point(|(_, v, _)| *v <= held_v);
            let (at, v, by) = line[first];
            f.add(
                "missed_notifications",
                b,
                Some(v),
                vec![by, o.op],
                format!(
                    "subscribe op {} (client {}) holding {b} v{held_v} was answered \"nothing changed\" {:.1} s after op {by} showed v{v}",
                    o.op,
                    o.client,
                    (t.saturating_sub(at)) as f64 / 1e6
                ),
            );
            break;
        }
    }
}

/// Real-time checks in one sweep over invocations and completions.
fn sweep<'a>(obs: &[Obs<'a>], writes: &[Write<'a>], f: &mut Findings) -> Staleness {
    // The first invocation of the logical write an op belongs to.
    let mut first_invoke: HashMap<u64, u64> = HashMap::new();
    for w in writes {
        for o in &w.ops {
            first_invoke.insert(*o, w.invoke);
        }
    }
    // Events: (time, 0 = query at invocation / 1 = update at completion, obs index).
    let mut events: Vec<(u64, u8, usize)> = Vec::with_capacity(obs.len() * 2);
    for (i, o) in obs.iter().enumerate() {
        let at = match o.kind {
            Kind::Write => first_invoke.get(&o.op).copied().unwrap_or(o.invoke),
            _ => o.invoke,
        };
        events.push((at, 0, i));
        if o.complete != u64::MAX {
            events.push((o.complete, 1, i));
        }
    }
    events.sort_unstable();
    // Per bucket: highest acknowledged (version, obs), highest shown (version, obs).
    let mut max_ack: HashMap<&str, (u64, usize)> = HashMap::new();
    let mut max_any: HashMap<&str, (u64, usize)> = HashMap::new();
    let mut max_client: HashMap<(u32, &str), (u64, usize)> = HashMap::new();
    // Per bucket: acknowledgements (version, completion) so far.
    let mut acks: HashMap<&str, Vec<(u64, u64)>> = HashMap::new();
    let mut staleness = Staleness::default();
    for (t, phase, i) in events {
        let o = &obs[i];
        if phase == 1 {
            let bump = |m: &mut HashMap<_, (u64, usize)>, k| {
                let e = m.entry(k).or_insert((o.version, i));
                if o.version > e.0 {
                    *e = (o.version, i);
                }
            };
            if o.kind == Kind::Write {
                bump(&mut max_ack, o.bucket);
                acks.entry(o.bucket).or_default().push((o.version, t));
            }
            bump(&mut max_any, o.bucket);
            let e = max_client
                .entry((o.client, o.bucket))
                .or_insert((o.version, i));
            if o.version > e.0 {
                *e = (o.version, i);
            }
            continue;
        }
        if o.kind == Kind::Write {
            if let Some(&(v, a)) = max_any.get(o.bucket) {
                if o.version <= v && obs[a].op != o.op {
                    f.add(
                        "realtime_violations",
                        o.bucket,
                        Some(o.version),
                        vec![obs[a].op, o.op],
                        format!(
                            "op {} showed {} v{v} before write op {} was sent, yet that write was acknowledged as v{}",
                            obs[a].op, o.bucket, o.op, o.version
                        ),
                    );
                }
            }
            continue;
        }
        let mut flagged = false;
        if let Some(&(v, a)) = max_ack.get(o.bucket) {
            if o.version < v {
                flagged = true;
                let since = acks
                    .get(o.bucket)
                    .into_iter()
                    .flatten()
                    .filter(|(av, _)| *av > o.version)
                    .map(|(_, at)| *at)
                    .min()
                    .unwrap_or(t);
                let ms = t.saturating_sub(since) as f64 / 1000.0;
                staleness.max_versions = staleness.max_versions.max(v - o.version);
                staleness.max_ms = staleness.max_ms.max(ms);
                f.add(
                    "stale_reads",
                    o.bucket,
                    Some(o.version),
                    vec![obs[a].op, o.op],
                    format!(
                        "op {} (client {}) was shown {} v{} although write op {} had been acknowledged as v{v}: {} versions, {ms:.0} ms behind",
                        o.op,
                        o.client,
                        o.bucket,
                        o.version,
                        obs[a].op,
                        v - o.version
                    ),
                );
            }
        }
        if let Some(&(v, a)) = max_client.get(&(o.client, o.bucket)) {
            if o.version < v {
                flagged = true;
                f.add(
                    "version_regressions",
                    o.bucket,
                    Some(o.version),
                    vec![obs[a].op, o.op],
                    format!(
                        "client {} saw {} v{v} (op {}), then v{} (op {})",
                        o.client, o.bucket, obs[a].op, o.version, o.op
                    ),
                );
            }
        }
        if !flagged {
            if let Some(&(v, a)) = max_any.get(o.bucket) {
                if o.version < v {
                    f.add(
                        "realtime_violations",
                        o.bucket,
                        Some(o.version),
                        vec![obs[a].op, o.op],
                        format!(
                            "op {} (client {}) was shown {} v{v} before op {} (client {}) was sent, which was shown v{}",
                            obs[a].op, obs[a].client, o.bucket, o.op, o.client, o.version
                        ),
                    );
                }
            }
        }
    }
    staleness
}
