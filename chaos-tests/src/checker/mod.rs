//! The history checker: reads a chaos run's `history.jsonl` ([`crate::history`]) and says
//! whether Tether kept its per-bucket promises (safety) and how available it stayed
//! (liveness). Pure: no I/O, no clock; [`check`] is a function of the entries.
//!
//! # Method: the version chain (research chaos.md §4b.1)
//!
//! Every accepted write of a bucket gets `version = previous + 1` from the one fenced
//! committer of its set, so the version order is observable. For each bucket the checker
//! collects every state it was shown — write acknowledgements (version, timestamp, and the
//! fields when the server returned them), reads, subscribe answers, the final reads — into
//! `chain[v]`, and every write into a *logical write* (operations with the same `op_id` on
//! the same bucket are one write: a retry the server replayed). Then, per property:
//!
//! | counter | what it counts (one per …) |
//! |---|---|
//! | `forked_versions` | (bucket, version) shown with two different timestamps or two different field sets, or acknowledged to two different writes (split-brain commit) |
//! | `lost_writes` | acknowledged write whose field values are missing (or replaced by a value no later write produced) in a state at or after its version, or whose bucket's final reads (after `End`) show only older versions |
//! | `underivable_states` | state shown with its fields at `v` that does not follow from the previous state shown with its fields (`u < v`, neither forked nor garbage) by the writes that made `u+1..=v`: the write acknowledged at each version (applied with `reconcile`, OCC left to `occ_lost_updates`), and for each version nobody was shown and no acknowledgement names, exactly one not yet used write of unknown fate sent no later than the first sign of a later version (each write used once, OCC respected; a bounded search, made again over the earlier stretches since the chain last broke when a stretch finds no writes left to derive it). Also a timestamp that went back between consecutive known versions. A stretch whose acknowledged write is already a lost write is not counted again |
//! | `garbage_reads` | observed state (op, bucket) holding a field value that no write with outcome `Ok`/`Unknown` produced (only a `Refused` one, or none), or that only unacknowledged writes sent after the observation completed produced (a value from the future), and that was not in the bucket's initial state |
//! | `occ_lost_updates` | applied OCC write whose version is not `base_version + 1` (it overwrote a state it never saw; the example names the other OCC writes on that base) |
//! | `realtime_violations` | operation B whose version contradicts an operation A on the same bucket that completed before B was invoked: B a write acknowledged at a version ≤ any version A showed; or B a read/subscribe of another client showing a version lower than a read/subscribe A showed |
//! | `version_regressions` | read/subscribe result of a client lower than a version that client already saw (its own reads, subscribes, acknowledgements) |
//! | `stale_reads` | read/subscribe result (op, bucket) lower than the version of a write acknowledged before it was invoked; staleness = versions behind, and ms since the first acknowledgement of a newer version |
//! | `hung_subscribers` | subscribe answered later than `timeout_ms + subscribe_grace`, or not answered by `End` although that deadline passed — unless it was late by no more than the time the node it was sent to (or any node, for one sent through the load balancer) spent paused while it was open, or the clients were cut from that node (`lb-partition`) at some time between the invocation and the deadline, so the answer could not be delivered (both counted in `excused_subscribers`) |
//! | `missed_notifications` | subscribe answered "nothing changed" (an empty answer at its timeout) although a version of a bucket it held newer than the one it held had been acknowledged or shown to someone more than `notify_grace` before the answer: the subscriber was left holding a stale copy (a dropped notification, or a node answering for a set it no longer owns) |
//!
//! A stale read by the writer itself is both stale and a regression; otherwise each
//! anomaly lands in one counter, the most specific. A retried write that the server
//! replayed is judged at its first invocation; a replayed `merged` answer shows the
//! bucket as it is now (its version may be later than the write's), so it is an
//! observation and an acknowledgement without a version, never the write's own version.
//! "Before" in real time is strict: an operation that completed at the very microsecond
//! another was sent is concurrent with it. A write of unknown fate may take effect at any time after it was sent.
//!
//! A malformed history (an op invoked or completed twice, completed before or without
//! its invocation) fails the verdict: `malformed` says what is wrong.
//!
//! The initial state of a bucket is whatever was shown before the first write to it was
//! sent (the runner reads every bucket before the workload starts), plus any version 1.
//!
//! Timestamps are compared at millisecond precision (the API drops the HLC's logical
//! part): `reconcile` is run with the stored state at `(ms, 0)` and the new one at
//! `(ms', 0)`, or `(ms, 1)` when the milliseconds are equal (the committer's HLC always
//! issues a strictly newer timestamp).
//!
//! Limits: a stretch whose search exceeds its budget (many writes of unknown fate and a
//! long run of versions nobody was shown) is skipped, not counted; acknowledged writes
//! are still checked against every later state by `lost_writes`. Differentially tested
//! against a brute-force linearizability check (`tests/checker_differential.rs`).
//!
//! # Liveness
//!
//! - **Success**: `Ok`, or `Refused` with a 4xx other than 408/429 (a semantic refusal such
//!   as an OCC refusal or a 422). Failure: `Unknown`, a 5xx or 408/429 refusal, or no answer.
//! - **Fault windows**: each `Fault` `Start` is paired with the next `End` of the same kind
//!   and target (an unclosed one lasts until `End`).
//! - `availability`: successes / operations invoked inside any fault window; for a run
//!   without faults, over the whole run.
//! - `availability_unaffected`: the same over operations that were neither sent to a node
//!   named in the target of a fault active at the invocation (`via`), nor addressed a
//!   bucket whose set (bucket id `kind.set`) was owned — by the last `Owner` entry before
//!   the invocation — by such a node. A part of the target (split at `<->` and `,`) counts
//!   as a node when some `Owner` entry names it; a fault naming no such node (the store)
//!   touches every set, so the figure is `None` when no unaffected operation exists.
//! - `failover_s`: for every fault naming a node, every set that node owned at the fault's
//!   start, the set's write attempts (on any of its buckets) ordered by completion. An
//!   *outage* is a maximal run of failed attempts with no success completing between
//!   them, at least one of them invoked inside the fault window; it lasts from the later
//!   of the fault start and the last success completed before the run, to the first
//!   success completed after the run (`End` when none did). The maximum over faults, sets
//!   and outages; 0 for a set whose writes never failed in the window; `None` when no
//!   fault names an owner. Sparse writes cannot stretch it back into time before the fault
//!   or across a quiet stretch that saw no failure.
//! - `convergence_s`: after the last fault's end `h`, for each client and bucket, the last
//!   read/subscribe that was not current (showed a version below the highest acknowledged
//!   before it was invoked); the maximum of (its completion − `h`), 0 when every read after
//!   `h` was current; `None` without faults.

mod liveness;
mod safety;

pub use liveness::{set_of, windows as fault_windows, Owners, Window};

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::fleet::FleetSummary;
use crate::history::{Call, Entry, Outcome};

/// Thresholds and tolerances the checker is run with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckOptions {
    /// How long past its `timeout_ms` a subscribe may take before it counts as hung.
    pub subscribe_grace_ms: u64,
    /// How long after a newer version was acknowledged a held subscriber may still be
    /// answered "nothing changed" (the notification's way from the commit to the client).
    #[serde(default = "default_notify_grace_ms")]
    pub notify_grace_ms: u64,
    /// How far a bucket's timestamp may be ahead of the wall-clock time (the recorder's)
    /// at which the state was seen (`timestamps_ahead`): the nodes' clock bound
    /// (`--max-clock-offset-ms`, 500 ms) with room for the recorder's own clock.
    #[serde(default = "default_max_timestamp_ahead_ms")]
    pub max_timestamp_ahead_ms: u64,
    /// Liveness goals (`liveness_passed`); they never change `passed`. Each scenario
    /// has its own ([`crate::scenario::Scenario::check_options`]).
    #[serde(default)]
    pub goals: Goals,
    /// Examples kept per property.
    pub max_examples: usize,
}

impl Default for CheckOptions {
    fn default() -> Self {
        CheckOptions {
            subscribe_grace_ms: 5_000,
            notify_grace_ms: default_notify_grace_ms(),
            max_timestamp_ahead_ms: default_max_timestamp_ahead_ms(),
            goals: Goals::default(),
            max_examples: 10,
        }
    }
}

/// Liveness goals; `None`: no goal for that figure (reported, not judged — e.g. the
/// availability during a store-wide fault).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Goals {
    /// Successful requests / requests (in fault windows; the whole run without faults).
    pub min_availability: Option<f64>,
    /// The same for sets the faulted node did not own.
    pub min_availability_unaffected: Option<f64>,
    /// Writes to a faulted owner's sets served again within this.
    pub max_failover_s: Option<f64>,
    /// After the last heal, reads current within this.
    pub max_convergence_s: Option<f64>,
}

impl Default for Goals {
    /// A single-node fault's goals (issue 12): ≥ 95 % overall, ≥ 99 % for sets the
    /// faulted node did not own, failover within the 15 s failure-detection bound,
    /// convergence ≤ 20 s.
    fn default() -> Self {
        Goals {
            min_availability: Some(0.95),
            min_availability_unaffected: Some(0.99),
            max_failover_s: Some(15.0),
            max_convergence_s: Some(20.0),
        }
    }
}

fn default_notify_grace_ms() -> u64 {
    1_000
}

fn default_max_timestamp_ahead_ms() -> u64 {
    5_000
}

/// Counts per safety property; every one must be zero for a run to pass.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Properties {
    pub lost_writes: u64,
    pub version_regressions: u64,
    pub forked_versions: u64,
    pub garbage_reads: u64,
    pub hung_subscribers: u64,
    #[serde(default)]
    pub missed_notifications: u64,
    pub stale_reads: u64,
    pub underivable_states: u64,
    pub realtime_violations: u64,
    pub occ_lost_updates: u64,
    /// States stamped further ahead of the time they were seen than the nodes' clock
    /// bound allows (a node stamping by a clock stepped ahead; invariant 29).
    #[serde(default)]
    pub timestamps_ahead: u64,
}

impl Properties {
    /// `(name, count)` for every property, in report order.
    pub fn iter(&self) -> [(&'static str, u64); 11] {
        [
            ("lost_writes", self.lost_writes),
            ("forked_versions", self.forked_versions),
            ("underivable_states", self.underivable_states),
            ("garbage_reads", self.garbage_reads),
            ("occ_lost_updates", self.occ_lost_updates),
            ("realtime_violations", self.realtime_violations),
            ("version_regressions", self.version_regressions),
            ("stale_reads", self.stale_reads),
            ("hung_subscribers", self.hung_subscribers),
            ("missed_notifications", self.missed_notifications),
            ("timestamps_ahead", self.timestamps_ahead),
        ]
    }

    /// True when every property is zero.
    pub fn all_zero(&self) -> bool {
        self.iter().iter().all(|(_, n)| *n == 0)
    }

    fn bump(&mut self, property: &str) {
        let c = match property {
            "lost_writes" => &mut self.lost_writes,
            "forked_versions" => &mut self.forked_versions,
            "underivable_states" => &mut self.underivable_states,
            "garbage_reads" => &mut self.garbage_reads,
            "occ_lost_updates" => &mut self.occ_lost_updates,
            "realtime_violations" => &mut self.realtime_violations,
            "version_regressions" => &mut self.version_regressions,
            "stale_reads" => &mut self.stale_reads,
            "hung_subscribers" => &mut self.hung_subscribers,
            "missed_notifications" => &mut self.missed_notifications,
            "timestamps_ahead" => &mut self.timestamps_ahead,
            other => unreachable!("unknown property {other}"),
        };
        *c += 1;
    }
}

/// One concrete instance of a violated property, naming what to grep for in
/// `history.jsonl`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Example {
    pub property: String,
    pub bucket: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
    /// The operations involved (`op` numbers).
    pub ops: Vec<u64>,
    pub detail: String,
}

/// How stale the stale reads were.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Staleness {
    /// The most versions a stale read was behind.
    pub max_versions: u64,
    /// The longest a stale read came after a newer version was acknowledged (ms).
    pub max_ms: f64,
}

/// Operation counts, for the report.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpCounts {
    pub total: u64,
    pub writes_ok: u64,
    pub writes_refused: u64,
    pub writes_unknown: u64,
    pub reads: u64,
    pub subscribes: u64,
    pub incomplete: u64,
}

/// The checker's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Verdict {
    pub properties: Properties,
    /// Up to `max_examples` per property, in history order.
    pub examples: Vec<Example>,
    pub staleness: Staleness,
    /// Fraction of successful operations in fault windows (whole run without faults).
    pub availability: Option<f64>,
    /// The same for operations on sets the faulted node did not own.
    pub availability_unaffected: Option<f64>,
    pub failover_s: Option<f64>,
    pub convergence_s: Option<f64>,
    pub ops: OpCounts,
    /// Problems of the history itself (an op invoked or completed twice, completed before
    /// or without its invocation): the first few, and how many. A malformed history
    /// cannot be trusted, so it fails the verdict.
    pub malformed: Vec<String>,
    pub malformed_count: u64,
    /// Subscribes answered late only because the node holding them was paused (SIGSTOP)
    /// past their deadline, and answered within their timeout after it woke: not counted
    /// as hung (a frozen process can answer nobody).
    #[serde(default)]
    pub excused_subscribers: u64,
    /// The `tether-sim` fleet's summary when the run had one (`fleet.json`, not part of
    /// the history); see [`Verdict::with_fleet`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fleet: Option<FleetSummary>,
    /// Every safety property is zero, the history is well formed, and the fleet (if any)
    /// saw no violation.
    pub passed: bool,
    /// Every liveness figure that could be measured is within its goal.
    pub liveness_passed: bool,
    /// The goals it was judged against.
    #[serde(default)]
    pub goals: Goals,
}

impl Verdict {
    /// Adds the fleet's result: a fleet violation of any kind (version regression, change
    /// not delivered by its deadline, acknowledged write missing from the final state or
    /// its history, write applied twice) fails the verdict as a safety property does.
    pub fn with_fleet(mut self, fleet: Option<FleetSummary>) -> Self {
        if let Some(f) = &fleet {
            self.passed &= f.passed && f.violation_count() == 0;
        }
        self.fleet = fleet;
        self
    }
}

/// Success in the availability sense: `Ok`, or a semantic refusal (a 4xx other than
/// 408/429). `None` (never answered) is a failure.
pub fn succeeded(result: Option<&Outcome>) -> bool {
    match result {
        Some(Outcome::Ok { .. }) => true,
        Some(Outcome::Refused { http, .. }) => {
            (400..500).contains(http) && *http != 408 && *http != 429
        }
        _ => false,
    }
}

/// What kind of operation an op was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Write,
    Read,
    Subscribe,
}

/// One operation, invocation and completion joined.
#[derive(Debug, Clone)]
struct Op<'a> {
    op: u64,
    client: u32,
    invoke: u64,
    /// `None`: never completed (treated as `Unknown`).
    complete: Option<u64>,
    call: &'a Call,
    result: Option<&'a Outcome>,
}

impl Op<'_> {
    fn kind(&self) -> Kind {
        match self.call {
            Call::Write { .. } => Kind::Write,
            Call::Read { .. } => Kind::Read,
            Call::Subscribe { .. } => Kind::Subscribe,
        }
    }

    /// Success in the availability sense.
    fn succeeded(&self) -> bool {
        succeeded(self.result)
    }

    /// Where the operation was sent: `lb` or a node's name.
    fn via(&self) -> &str {
        match self.call {
            Call::Write { via, .. } | Call::Read { via, .. } | Call::Subscribe { via, .. } => via,
        }
    }

    /// The buckets the operation addressed.
    fn buckets(&self) -> Vec<&str> {
        match self.call {
            Call::Write { bucket, .. } => vec![bucket.as_str()],
            Call::Read { buckets, .. } => buckets.iter().map(String::as_str).collect(),
            Call::Subscribe { held, .. } => held.keys().map(String::as_str).collect(),
        }
    }
}

/// The history, indexed.
struct Hist<'a> {
    ops: Vec<Op<'a>>,
    end: u64,
    entries: &'a [Entry],
    /// What is wrong with the history itself (first few).
    malformed: Vec<String>,
    malformed_count: u64,
    /// Wall-clock time of `t_us = 0`, ms since the Unix epoch (`None`: unknown, 0).
    wall_ms: Option<u64>,
}

impl<'a> Hist<'a> {
    fn new(entries: &'a [Entry]) -> Self {
        let mut by_op: BTreeMap<u64, Op<'a>> = BTreeMap::new();
        let mut end = None;
        let mut last = 0;
        let mut malformed = Vec::new();
        let mut malformed_count = 0u64;
        let mut start_wall = None;
        let mut bad = |what: String| {
            malformed_count += 1;
            if malformed.len() < 10 {
                malformed.push(what);
            }
        };
        for e in entries {
            match e {
                Entry::Invoke {
                    op,
                    client,
                    t_us,
                    call,
                } => {
                    last = last.max(*t_us);
                    if by_op.contains_key(op) {
                        bad(format!(
                            "op {op} invoked twice (the later invocation is used)"
                        ));
                    }
                    by_op.insert(
                        *op,
                        Op {
                            op: *op,
                            client: *client,
                            invoke: *t_us,
                            complete: None,
                            call,
                            result: None,
                        },
                    );
                }
                Entry::Complete { op, t_us, result } => {
                    last = last.max(*t_us);
                    match by_op.get_mut(op) {
                        Some(o) if o.complete.is_some() => bad(format!(
                            "op {op} completed twice (the first completion is used)"
                        )),
                        Some(o) if *t_us < o.invoke => {
                            bad(format!("op {op} completed before it was invoked (ignored)"))
                        }
                        Some(o) => {
                            o.complete = Some(*t_us);
                            o.result = Some(result);
                        }
                        None => bad(format!("op {op} completed but never invoked (ignored)")),
                    }
                }
                Entry::Fault { t_us, .. } | Entry::Owner { t_us, .. } => last = last.max(*t_us),
                Entry::End { t_us } => {
                    last = last.max(*t_us);
                    end = Some(*t_us);
                }
                Entry::Start { wall_ms, .. } => start_wall = Some(*wall_ms).filter(|w| *w > 0),
            }
        }
        Hist {
            ops: by_op.into_values().collect(),
            end: end.unwrap_or(last),
            entries,
            malformed,
            malformed_count,
            wall_ms: start_wall,
        }
    }
}

/// Collects counts and examples.
struct Findings {
    properties: Properties,
    /// Subscribes late only because the node holding them was frozen (see `hung`).
    excused_subscribers: u64,
    examples: Vec<Example>,
    per_property: BTreeMap<String, usize>,
    max_examples: usize,
}

impl Findings {
    fn new(max_examples: usize) -> Self {
        Findings {
            properties: Properties::default(),
            excused_subscribers: 0,
            examples: Vec::new(),
            per_property: BTreeMap::new(),
            max_examples,
        }
    }

    fn add(
        &mut self,
        property: &str,
        bucket: &str,
        version: Option<u64>,
        ops: Vec<u64>,
        detail: String,
    ) {
        self.properties.bump(property);
        let n = self.per_property.entry(property.to_string()).or_default();
        if *n < self.max_examples {
            *n += 1;
            self.examples.push(Example {
                property: property.to_string(),
                bucket: bucket.to_string(),
                version,
                ops,
                detail,
            });
        }
    }
}

/// Checks a history: every safety property counted with examples, and the liveness
/// figures (see the module docs for the exact definitions).
pub fn check(entries: &[Entry], opts: &CheckOptions) -> Verdict {
    let hist = Hist::new(entries);
    let mut findings = Findings::new(opts.max_examples);
    let staleness = safety::check(&hist, opts, &mut findings);
    let live = liveness::measure(&hist);
    let mut ops = OpCounts::default();
    for o in &hist.ops {
        ops.total += 1;
        if o.complete.is_none() {
            ops.incomplete += 1;
        }
        match (o.kind(), o.result) {
            (Kind::Write, Some(Outcome::Ok { .. })) => ops.writes_ok += 1,
            (Kind::Write, Some(Outcome::Refused { .. })) => ops.writes_refused += 1,
            (Kind::Write, _) => ops.writes_unknown += 1,
            (Kind::Read, _) => ops.reads += 1,
            (Kind::Subscribe, _) => ops.subscribes += 1,
        }
    }
    // A figure passes when it could not be measured or has no goal.
    let at_least = |v: Option<f64>, goal: Option<f64>| v.zip(goal).is_none_or(|(v, g)| v >= g);
    let at_most = |v: Option<f64>, goal: Option<f64>| v.zip(goal).is_none_or(|(v, g)| v <= g);
    let g = &opts.goals;
    let liveness_passed = at_least(live.availability, g.min_availability)
        && at_least(live.availability_unaffected, g.min_availability_unaffected)
        && at_most(live.failover_s, g.max_failover_s)
        && at_most(live.convergence_s, g.max_convergence_s);
    Verdict {
        passed: findings.properties.all_zero() && hist.malformed_count == 0,
        malformed: hist.malformed.clone(),
        malformed_count: hist.malformed_count,
        excused_subscribers: findings.excused_subscribers,
        properties: findings.properties,
        examples: findings.examples,
        staleness,
        availability: live.availability,
        availability_unaffected: live.availability_unaffected,
        failover_s: live.failover_s,
        convergence_s: live.convergence_s,
        ops,
        fleet: None,
        liveness_passed,
        goals: opts.goals,
    }
}

#[cfg(test)]
mod tests;
