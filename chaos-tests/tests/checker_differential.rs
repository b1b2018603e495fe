//! Differential test of the version-chain checker against a brute-force linearizability
//! check, on small random histories (1–3 buckets, 2–4 clients, ≤ 8 concurrent operations,
//! outcomes `Ok`, `Refused`, `Unknown` and never answered).
//!
//! - **Generator**: a correct execution. Every operation gets an interval; the ones that
//!   take effect get a linearization point inside it; the sequential spec
//!   (`tether_proto::reconcile` on one register of fields per bucket, timestamps from the
//!   point) runs in point order and gives each operation its result. Such a history must
//!   pass both checks.
//! - **Mutations** then break it the way faulty servers do (a read shown an older state, a
//!   field dropped or replaced, an acknowledgement naming another version or timestamp, a
//!   refused write reported applied or an applied one reported refused, a read moved
//!   later in time) — the result may or may not still be linearizable, and both checks
//!   must agree.
//! - **Brute force**: per bucket (linearizability is compositional), a depth-first search
//!   over every order consistent with real time and every subset of the writes of unknown
//!   fate (they may take effect any time after they were sent, or never), memoized on
//!   (done set, register). Refused writes and failed reads take no part.
//!
//! What the comparison covers, and where it is restricted:
//!
//! - Both checks see the same information: the spec's register holds version, timestamp
//!   (ms) and fields, so acknowledgements and reads are matched on all three. Version
//!   numbers carry real information here (the server's commit order); a checker of plain
//!   registers could not use them, this one can and so can the brute force.
//! - The brute force is *given* each bucket's initial state (v1, no fields); the checker
//!   learns it from the setup reads every run starts with. Mutating a setup read would let
//!   the checker take a corrupted state as the initial one (found by this test: the
//!   two disagreed on such histories), so the setup reads are never mutated.
//! - An operation that completed at the very microsecond another was sent is concurrent
//!   with it in both checks (found by this test too; the checker now agrees).
//! - `hung_subscribers` is not a linearizability property; subscribes here have 60 s
//!   timeouts, so it never fires. Subscribes that time out with no state are not generated.
//! - Histories from a correct execution must pass both (3000 proptest cases); mutated ones
//!   must get the same verdict from both (3000 proptest cases, plus a fixed 2000 seeds
//!   that must include ≥ 10 % linearizable and ≥ 25 % broken ones; `DIFF_SEEDS=50000` runs
//!   more — 50,000 agreed when this was written).

use std::collections::{BTreeMap, HashSet};

use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;
use tether_chaos_tests::checker::{check, CheckOptions, Verdict};
use tether_chaos_tests::history::{Call, Entry, Fields, Observed, Outcome};
use tether_proto::{reconcile, Bucket, BucketId, Hlc, Update};

const BUCKETS: [&str; 3] = ["hot.b0", "hot.b1", "hot.b2"];
const INITIAL_TS: u64 = 1000;

#[derive(Debug, Clone, PartialEq)]
struct State {
    version: u64,
    ts: u64,
    fields: Fields,
}

#[derive(Debug, Clone)]
enum Res {
    Ack(u64, u64),
    Shown(Vec<Observed>),
    Refused(u16),
    Unknown,
    Open,
}

#[derive(Debug, Clone)]
struct GenOp {
    client: u32,
    /// µs.
    invoke: u64,
    complete: u64,
    call: Call,
    res: Res,
}

/// A generated history and, per bucket, every state the correct execution went through.
#[derive(Debug, Clone)]
struct Gen {
    ops: Vec<GenOp>,
    end: u64,
    states: BTreeMap<String, Vec<State>>,
    /// The setup reads (one per bucket, before any write) are the first `setup` ops.
    setup: usize,
}

fn shown(bucket: &str, s: &State) -> Observed {
    Observed {
        bucket: bucket.into(),
        version: s.version,
        timestamp: s.ts,
        fields: Some(s.fields.clone()),
    }
}

fn spec_write(s: &State, fields: &Fields, base: u64, occ: bool, ts: u64) -> Option<State> {
    let stored = Bucket {
        id: BucketId::parse("hot.spec").expect("valid id"),
        value: s.fields.clone(),
        timestamp: Hlc::at(s.ts),
        version: s.version,
    };
    let now = if ts > s.ts {
        Hlc::at(ts)
    } else {
        Hlc::at(s.ts).successor()
    };
    let update = Update {
        value: fields.clone(),
        base_version: base,
        occ,
    };
    reconcile(&stored, &update, now).new_state().map(|b| State {
        version: b.version,
        ts,
        fields: b.value.clone(),
    })
}

/// A correct execution with concurrent operations.
fn generate(seed: u64) -> Gen {
    let mut rng = StdRng::seed_from_u64(seed);
    let nb = rng.random_range(1..=3usize);
    let nc = rng.random_range(2..=4u32);
    let n = rng.random_range(1..=8usize);
    let mut cur: BTreeMap<String, State> = BTreeMap::new();
    let mut states: BTreeMap<String, Vec<State>> = BTreeMap::new();
    let mut ops = Vec::new();
    for b in &BUCKETS[..nb] {
        let s0 = State {
            version: 1,
            ts: INITIAL_TS,
            fields: Fields::new(),
        };
        ops.push(GenOp {
            client: 0,
            invoke: 0,
            complete: 1000,
            call: Call::Read {
                buckets: vec![b.to_string()],
                via: "lb".into(),
            },
            res: Res::Shown(vec![shown(b, &s0)]),
        });
        states.insert(b.to_string(), vec![s0.clone()]);
        cur.insert(b.to_string(), s0);
    }
    // Intervals: clients are sequential; times in ms, later in µs.
    let mut free = vec![2u64; nc as usize + 1];
    // (point µs, index) for operations that take effect.
    let mut points: Vec<(u64, usize)> = Vec::new();
    let mut plans: Vec<u8> = Vec::new();
    for i in 0..n {
        let c = rng.random_range(1..=nc);
        let invoke = free[c as usize] + rng.random_range(0..15);
        let complete = invoke + rng.random_range(1..30);
        free[c as usize] = complete + 1;
        let kind = rng.random_range(0..100u8);
        let call = if kind < 55 {
            let b = BUCKETS[rng.random_range(0..nb)];
            let key = if rng.random_bool(0.3) {
                "k".to_string()
            } else {
                format!("c{c}")
            };
            let mut fields = Fields::new();
            fields.insert(key, json!(i + 1));
            Call::Write {
                bucket: b.into(),
                fields,
                base_version: 0, // set at the point
                occ: rng.random_bool(0.4),
                op_id: None,
                via: "lb".into(),
            }
        } else if kind < 85 {
            let mut buckets = vec![BUCKETS[rng.random_range(0..nb)].to_string()];
            if nb > 1 && rng.random_bool(0.3) {
                let other = BUCKETS[rng.random_range(0..nb)].to_string();
                if other != buckets[0] {
                    buckets.push(other);
                }
            }
            Call::Read {
                buckets,
                via: "lb".into(),
            }
        } else {
            let b = BUCKETS[rng.random_range(0..nb)];
            Call::Subscribe {
                held: [(b.to_string(), 1)].into_iter().collect(),
                timeout_ms: 60_000,
                via: "lb".into(),
            }
        };
        let point = invoke * 1000 + rng.random_range(1..(complete - invoke) * 1000);
        // 0: takes effect and answers; 1: takes effect, answer lost (unknown / never);
        // 2: does not run (503 not started, or unknown and never applied).
        let plan = match rng.random_range(0..100u8) {
            0..70 => 0,
            70..85 => 1,
            _ => 2,
        };
        plans.push(plan);
        ops.push(GenOp {
            client: c,
            invoke: invoke * 1000,
            complete: complete * 1000,
            call,
            res: Res::Open,
        });
        if plan != 2 {
            points.push((point, ops.len() - 1));
        } else {
            let res = if rng.random_bool(0.5) {
                Res::Refused(503)
            } else {
                Res::Unknown
            };
            ops.last_mut().expect("pushed").res = res;
        }
    }
    points.sort_unstable();
    let first_op = nb;
    for (point, idx) in points {
        let plan = plans[idx - first_op];
        let lost_answer = plan == 1;
        let op = &mut ops[idx];
        match &mut op.call {
            Call::Write {
                bucket,
                fields,
                base_version,
                occ,
                ..
            } => {
                let s = cur.get(bucket.as_str()).expect("bucket").clone();
                *base_version = match rng.random_range(0..10u8) {
                    0..6 => s.version,
                    6..8 => s.version.saturating_sub(1).max(1),
                    _ => 1,
                };
                let ts = INITIAL_TS + point / 1000;
                match spec_write(&s, fields, *base_version, *occ, ts) {
                    Some(next) => {
                        op.res = if lost_answer {
                            if rng.random_bool(0.5) {
                                Res::Unknown
                            } else {
                                Res::Open
                            }
                        } else {
                            Res::Ack(next.version, next.ts)
                        };
                        states
                            .get_mut(bucket.as_str())
                            .expect("b")
                            .push(next.clone());
                        cur.insert(bucket.clone(), next);
                    }
                    None => op.res = Res::Refused(409),
                }
            }
            Call::Read { buckets, .. } => {
                op.res = if lost_answer {
                    Res::Unknown
                } else {
                    Res::Shown(buckets.iter().map(|b| shown(b, &cur[b.as_str()])).collect())
                };
            }
            Call::Subscribe { held, .. } => {
                let b = held.keys().next().expect("held").clone();
                op.res = if lost_answer {
                    Res::Open
                } else {
                    Res::Shown(vec![shown(&b, &cur[b.as_str()])])
                };
            }
        }
    }
    let end = ops.iter().map(|o| o.complete).max().unwrap_or(0) + 1000;
    // Final reads after End.
    for b in &BUCKETS[..nb] {
        ops.push(GenOp {
            client: 0,
            invoke: end + 1000,
            complete: end + 2000,
            call: Call::Read {
                buckets: vec![b.to_string()],
                via: "lb".into(),
            },
            res: Res::Shown(vec![shown(b, &cur[*b])]),
        });
    }
    Gen {
        ops,
        end,
        states,
        setup: nb,
    }
}

/// Breaks the history in one of the ways a faulty server would.
fn mutate(g: &mut Gen, rng: &mut StdRng) -> String {
    let n = g.ops.len();
    for _ in 0..20 {
        // The setup reads are left alone: they are how the checker learns a bucket's
        // initial state, which the brute force is given (see `comparable`).
        let i = rng.random_range(g.setup..n);
        let kind = rng.random_range(0..7u8);
        let op = &mut g.ops[i];
        match (kind, &mut op.res, &op.call) {
            // A read shown an older (or newer) state of its bucket.
            (0, Res::Shown(states), _) => {
                let s = &mut states[0];
                let hist = &g.states[&s.bucket];
                let pick = &hist[rng.random_range(0..hist.len())];
                if pick.version == s.version {
                    continue;
                }
                *s = shown(&s.bucket.clone(), pick);
                return format!("op#{i} shown v{}", pick.version);
            }
            // A field dropped or given another value.
            (1, Res::Shown(states), _) => {
                let s = &mut states[0];
                let fields = s.fields.as_mut().expect("fields");
                let Some(k) = fields.keys().next().cloned() else {
                    continue;
                };
                if rng.random_bool(0.5) {
                    fields.remove(&k);
                    return format!("op#{i} lost field {k}");
                }
                let v = json!(rng.random_range(1..=9u64));
                fields.insert(k.clone(), v.clone());
                return format!("op#{i} field {k}={v}");
            }
            // An acknowledgement naming another version or timestamp.
            (2, Res::Ack(v, ts), _) => {
                if rng.random_bool(0.5) {
                    *v = if rng.random_bool(0.5) { *v + 1 } else { *v - 1 };
                    return format!("op#{i} acked as v{v}");
                }
                *ts = ts.saturating_sub(rng.random_range(1..30));
                return format!("op#{i} ack ts {ts}");
            }
            // A refused write reported applied at some version.
            (3, Res::Refused(_), Call::Write { bucket, .. }) => {
                let hist = &g.states[bucket.as_str()];
                let pick = &hist[rng.random_range(0..hist.len())];
                let v = pick.version + rng.random_range(0..2u64);
                op.res = Res::Ack(v, pick.ts + 1);
                return format!("op#{i} refused write acked as v{v}");
            }
            // An applied write reported refused.
            (4, Res::Ack(..), _) => {
                op.res = Res::Refused(409);
                return format!("op#{i} applied write reported refused");
            }
            // A read sent later than it was (after newer acknowledgements).
            (5, Res::Shown(_), _) => {
                let shift = rng.random_range(5..40u64) * 1000;
                op.invoke += shift;
                op.complete += shift;
                return format!("op#{i} moved {shift} µs later");
            }
            // An acknowledged write reported as of unknown fate (still linearizable).
            (6, Res::Ack(..), _) => {
                op.res = Res::Unknown;
                return format!("op#{i} ack lost");
            }
            _ => continue,
        }
    }
    "no mutation".into()
}

fn entries(g: &Gen) -> Vec<Entry> {
    let mut timed: Vec<(u64, u8, Entry)> = vec![(
        0,
        0,
        Entry::Start {
            scenario: "differential".into(),
            seed: 0,
            wall_ms: 0,
        },
    )];
    for (i, o) in g.ops.iter().enumerate() {
        let op = i as u64 + 1;
        timed.push((
            o.invoke,
            1,
            Entry::Invoke {
                op,
                client: o.client,
                t_us: o.invoke,
                call: o.call.clone(),
            },
        ));
        let result = match &o.res {
            Res::Ack(version, ts) => {
                let Call::Write { bucket, .. } = &o.call else {
                    unreachable!("acks are for writes")
                };
                Outcome::Ok {
                    outcome: Some("applied".into()),
                    states: vec![Observed {
                        bucket: bucket.clone(),
                        version: *version,
                        timestamp: *ts,
                        fields: None,
                    }],
                    replayed: false,
                }
            }
            Res::Shown(states) => Outcome::Ok {
                outcome: None,
                states: states.clone(),
                replayed: false,
            },
            Res::Refused(http) => Outcome::Refused {
                http: *http,
                code: "refused".into(),
            },
            Res::Unknown => Outcome::Unknown {
                detail: "timeout".into(),
            },
            Res::Open => continue,
        };
        timed.push((
            o.complete,
            2,
            Entry::Complete {
                op,
                t_us: o.complete,
                result,
            },
        ));
    }
    timed.push((g.end, 1, Entry::End { t_us: g.end }));
    timed.sort_by_key(|(t, order, _)| (*t, *order));
    timed.into_iter().map(|(_, _, e)| e).collect()
}

// ---- brute force ----

#[derive(Debug, Clone)]
enum BKind {
    Write {
        fields: Fields,
        base: u64,
        occ: bool,
        ack: Option<(u64, u64)>,
    },
    Read(State),
}

#[derive(Debug, Clone)]
struct BOp {
    invoke: u64,
    /// `u64::MAX` when it may take effect at any later time.
    complete: u64,
    optional: bool,
    kind: BKind,
}

/// The register: version, fields, the timestamp if known, and the newest timestamp known.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Reg {
    version: u64,
    fields: String,
    ts: Option<u64>,
    floor: u64,
}

fn step(reg: &Reg, fields_now: &Fields, op: &BOp) -> Option<(Reg, Fields)> {
    match &op.kind {
        BKind::Write {
            fields,
            base,
            occ,
            ack,
        } => {
            let stored_ms = reg.ts.unwrap_or(reg.floor);
            let ts = match ack {
                Some((_, ts)) if *ts < stored_ms => return None,
                Some((_, ts)) => *ts,
                None => stored_ms,
            };
            let s = State {
                version: reg.version,
                ts: stored_ms,
                fields: fields_now.clone(),
            };
            let next = spec_write(&s, fields, *base, *occ, ts)?;
            if let Some((v, _)) = ack {
                if *v != next.version {
                    return None;
                }
            }
            let reg2 = Reg {
                version: next.version,
                fields: serde_json::Value::Object(next.fields.clone()).to_string(),
                ts: ack.map(|a| a.1),
                floor: ack.map_or(reg.floor, |a| a.1.max(reg.floor)),
            };
            Some((reg2, next.fields))
        }
        BKind::Read(s) => {
            if s.version != reg.version || &s.fields != fields_now {
                return None;
            }
            match reg.ts {
                Some(t) if t != s.ts => None,
                Some(_) => Some((reg.clone(), fields_now.clone())),
                None if s.ts < reg.floor => None,
                None => Some((
                    Reg {
                        ts: Some(s.ts),
                        floor: s.ts,
                        ..reg.clone()
                    },
                    fields_now.clone(),
                )),
            }
        }
    }
}

fn search(
    ops: &[BOp],
    done: u32,
    reg: &Reg,
    fields: &Fields,
    seen: &mut HashSet<(u32, Reg)>,
) -> bool {
    let required_left = ops
        .iter()
        .enumerate()
        .any(|(i, o)| !o.optional && done & (1 << i) == 0);
    if !required_left {
        return true;
    }
    if !seen.insert((done, reg.clone())) {
        return false;
    }
    for (i, o) in ops.iter().enumerate() {
        if done & (1 << i) != 0 {
            continue;
        }
        // Real time: nothing still pending may have completed before `o` was sent.
        let blocked = ops
            .iter()
            .enumerate()
            .any(|(j, p)| j != i && done & (1 << j) == 0 && !p.optional && p.complete < o.invoke);
        if blocked {
            continue;
        }
        if let Some((reg2, fields2)) = step(reg, fields, o) {
            if search(ops, done | (1 << i), &reg2, &fields2, seen) {
                return true;
            }
        }
    }
    false
}

/// True when every bucket's operations are linearizable.
fn linearizable(g: &Gen) -> bool {
    let mut per: BTreeMap<&str, Vec<BOp>> = BTreeMap::new();
    for o in &g.ops {
        match (&o.call, &o.res) {
            (
                Call::Write {
                    bucket,
                    fields,
                    base_version,
                    occ,
                    ..
                },
                res,
            ) => {
                let (optional, ack) = match res {
                    Res::Ack(v, ts) => (false, Some((*v, *ts))),
                    Res::Refused(_) => continue,
                    _ => (true, None),
                };
                per.entry(bucket).or_default().push(BOp {
                    invoke: o.invoke,
                    complete: if optional { u64::MAX } else { o.complete },
                    optional,
                    kind: BKind::Write {
                        fields: fields.clone(),
                        base: *base_version,
                        occ: *occ,
                        ack,
                    },
                });
            }
            (_, Res::Shown(states)) => {
                for s in states {
                    per.entry(&s.bucket).or_default().push(BOp {
                        invoke: o.invoke,
                        complete: o.complete,
                        optional: false,
                        kind: BKind::Read(State {
                            version: s.version,
                            ts: s.timestamp,
                            fields: s.fields.clone().unwrap_or_default(),
                        }),
                    });
                }
            }
            _ => {}
        }
    }
    per.into_iter().all(|(_, ops)| {
        let reg = Reg {
            version: 1,
            fields: "{}".into(),
            ts: Some(INITIAL_TS),
            floor: INITIAL_TS,
        };
        search(&ops, 0, &reg, &Fields::new(), &mut HashSet::new())
    })
}

fn describe(g: &Gen, v: &Verdict) -> String {
    let mut s = String::new();
    for e in entries(g) {
        s.push_str(&serde_json::to_string(&e).expect("json"));
        s.push('\n');
    }
    s.push_str(&format!("{:#?}\n{:#?}", v.properties, v.examples));
    s
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 3000,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn correct_histories_pass_both_checks(seed in any::<u64>()) {
        let g = generate(seed);
        let v = check(&entries(&g), &CheckOptions::default());
        prop_assert!(linearizable(&g), "generator produced a non-linearizable history:\n{}", describe(&g, &v));
        prop_assert!(v.passed, "checker flagged a correct history:\n{}", describe(&g, &v));
    }

    #[test]
    fn mutated_histories_get_the_same_verdict_from_both_checks(seed in any::<u64>()) {
        let (passed, lin, text) = mutated_verdicts(seed);
        prop_assert_eq!(passed, lin, "{}", text);
    }
}

/// The checker's and the brute force's verdicts on the history of `seed`, mutated once,
/// and what to print when they differ.
fn mutated_verdicts(seed: u64) -> (bool, bool, String) {
    let mut g = generate(seed);
    let mut rng = StdRng::seed_from_u64(seed ^ 0x9e37_79b9_7f4a_7c15);
    let what = mutate(&mut g, &mut rng);
    let v = check(&entries(&g), &CheckOptions::default());
    let lin = linearizable(&g);
    let text = format!(
        "{} — checker {} but brute force {}:\n{}",
        what,
        if v.passed { "passed" } else { "failed" },
        if lin {
            "linearizable"
        } else {
            "not linearizable"
        },
        describe(&g, &v)
    );
    (v.passed, lin, text)
}

/// Seeds on which the proptest above once found the checks disagreeing.
/// 3005650989671034581: three writes of unknown fate made v2, v3 and v4 of one bucket;
/// the checker gave v2..v3 a write that only v4 could have come from, then found v4
/// underivable (the stretches are now searched again together when one fails).
const PAST_DISAGREEMENTS: &[u64] = &[3_005_650_989_671_034_581];

#[test]
fn past_disagreements_stay_agreements() {
    for &seed in PAST_DISAGREEMENTS {
        let (passed, lin, text) = mutated_verdicts(seed);
        assert_eq!(passed, lin, "seed {seed}: {text}");
    }
}

/// The mutated histories cover both verdicts (so agreement means something), and the
/// two checks agree on every one of a fixed set of seeds.
#[test]
fn mutations_yield_both_verdicts_and_the_checks_agree_on_each() {
    let seeds: u64 = std::env::var("DIFF_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2000);
    let (mut lin, mut not_lin) = (0u64, 0u64);
    let mut by_counter: BTreeMap<&'static str, u64> = BTreeMap::new();
    for seed in 0..seeds {
        let mut g = generate(seed);
        let mut rng = StdRng::seed_from_u64(seed.wrapping_mul(31) + 7);
        let what = mutate(&mut g, &mut rng);
        let v = check(&entries(&g), &CheckOptions::default());
        let l = linearizable(&g);
        assert_eq!(
            v.passed,
            l,
            "seed {seed}: {what}: checker passed={}, linearizable={l}\n{}",
            v.passed,
            describe(&g, &v)
        );
        if l {
            lin += 1;
        } else {
            not_lin += 1;
            for (name, n) in v.properties.iter() {
                if n > 0 {
                    *by_counter.entry(name).or_default() += 1;
                }
            }
        }
    }
    println!(
        "{seeds} mutated histories: {lin} linearizable, {not_lin} not; flagged by {by_counter:?}"
    );
    assert!(
        lin * 10 >= seeds,
        "too few linearizable mutants: {lin}/{seeds}"
    );
    assert!(
        not_lin * 4 >= seeds,
        "too few broken mutants: {not_lin}/{seeds}"
    );
}

/// A mutated history the checker once passed and the brute force did not (CI,
/// 2026-12-03): a read shown a field value whose only write, of unknown fate, was sent
/// after the read completed. Kept as a fixed case (the property test draws new seeds).
#[test]
fn a_value_from_a_write_sent_later_fails_both_checks() {
    let seed = 6_822_775_023_487_910_986;
    let mut g = generate(seed);
    let mut rng = StdRng::seed_from_u64(seed ^ 0x9e37_79b9_7f4a_7c15);
    let what = mutate(&mut g, &mut rng);
    let v = check(&entries(&g), &CheckOptions::default());
    assert!(!linearizable(&g), "{what}: the brute force changed");
    assert!(!v.passed, "{what}: checker passed:\n{}", describe(&g, &v));
}
