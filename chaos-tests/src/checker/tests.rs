//! Mutation tests: one correct concurrent history that no property flags, and one
//! deliberately wrong variant of it per property, each flagged by exactly its counter.

use serde_json::json;

use super::*;
use crate::history::{Entry, FaultPhase, Fields, Observed};

/// Times in the builder are milliseconds; the history holds microseconds.
const MS: u64 = 1000;

#[derive(Debug, Clone)]
enum Res {
    /// Write acknowledged as (version, timestamp).
    Ack(u64, u64),
    /// Read/subscribe shown these states.
    Shown(Vec<Observed>),
    /// A retried write answered `merged` from the server's record (`replayed`), showing
    /// the bucket as it is now.
    ReplayedMerge(Observed),
    Refused(u16),
    Unknown,
    /// Never completed.
    Open,
}

#[derive(Debug, Clone)]
struct TOp {
    op: u64,
    client: u32,
    invoke: u64,
    complete: u64,
    call: Call,
    res: Res,
}

#[derive(Debug, Clone, Default)]
pub(super) struct Builder {
    ops: Vec<TOp>,
    other: Vec<(u64, Entry)>,
    end: u64,
    /// The run's start on the wall clock (0: unknown, as most fixtures leave it).
    wall_ms: u64,
    /// Where the next operations are sent (`None`: the load balancer, `lb`).
    via: Option<&'static str>,
}

fn obj(v: serde_json::Value) -> Fields {
    match v {
        serde_json::Value::Object(m) => m,
        other => panic!("fixture must be an object: {other}"),
    }
}

fn state(bucket: &str, version: u64, ts: u64, fields: serde_json::Value) -> Observed {
    Observed {
        bucket: bucket.into(),
        version,
        timestamp: ts,
        fields: Some(obj(fields)),
    }
}

impl Builder {
    fn push(&mut self, client: u32, invoke: u64, complete: u64, call: Call, res: Res) -> u64 {
        let op = self.ops.len() as u64 + 1;
        self.ops.push(TOp {
            op,
            client,
            invoke,
            complete,
            call,
            res,
        });
        op
    }

    #[allow(clippy::too_many_arguments)]
    fn write(
        &mut self,
        client: u32,
        (invoke, complete): (u64, u64),
        bucket: &str,
        fields: serde_json::Value,
        base: u64,
        occ: bool,
        res: Res,
    ) -> u64 {
        let call = Call::Write {
            bucket: bucket.into(),
            fields: obj(fields),
            base_version: base,
            occ,
            op_id: None,
            via: self.via.unwrap_or("lb").into(),
        };
        self.push(client, invoke, complete, call, res)
    }

    fn read(&mut self, client: u32, (invoke, complete): (u64, u64), shown: Observed) -> u64 {
        let call = Call::Read {
            buckets: vec![shown.bucket.clone()],
            via: "lb".into(),
        };
        self.push(client, invoke, complete, call, Res::Shown(vec![shown]))
    }

    fn subscribe(
        &mut self,
        client: u32,
        (invoke, complete): (u64, u64),
        held: (&str, u64),
        timeout_ms: u64,
        res: Res,
    ) -> u64 {
        let call = Call::Subscribe {
            held: [(held.0.to_string(), held.1)].into_iter().collect(),
            timeout_ms,
            via: self.via.unwrap_or("lb").into(),
        };
        self.push(client, invoke, complete, call, res)
    }

    fn op(&mut self, op: u64) -> &mut TOp {
        &mut self.ops[op as usize - 1]
    }

    fn fault(&mut self, t: u64, kind: &str, target: &str, phase: FaultPhase) {
        self.other.push((
            t,
            Entry::Fault {
                t_us: t * MS,
                kind: kind.into(),
                target: target.into(),
                phase,
                detail: String::new(),
            },
        ));
    }

    fn owner(&mut self, t: u64, set: &str, node: &str) {
        self.other.push((
            t,
            Entry::Owner {
                t_us: t * MS,
                set: set.into(),
                node: node.into(),
            },
        ));
    }

    /// The history as the recorder would write it: entries in time order.
    pub(super) fn entries(&self) -> Vec<Entry> {
        let mut timed: Vec<(u64, u8, Entry)> = vec![(
            0,
            0,
            Entry::Start {
                scenario: "unit".into(),
                seed: 1,
                wall_ms: self.wall_ms,
            },
        )];
        for o in &self.ops {
            timed.push((
                o.invoke * MS,
                1,
                Entry::Invoke {
                    op: o.op,
                    client: o.client,
                    t_us: o.invoke * MS,
                    call: o.call.clone(),
                },
            ));
            let bucket = match &o.call {
                Call::Write { bucket, .. } => bucket.clone(),
                _ => String::new(),
            };
            let result = match &o.res {
                Res::Ack(version, ts) => Outcome::Ok {
                    outcome: Some("applied".into()),
                    states: vec![Observed {
                        bucket,
                        version: *version,
                        timestamp: *ts,
                        fields: None,
                    }],
                    replayed: false,
                },
                Res::Shown(states) => Outcome::Ok {
                    outcome: None,
                    states: states.clone(),
                    replayed: false,
                },
                Res::ReplayedMerge(now) => Outcome::Ok {
                    outcome: Some("merged".into()),
                    states: vec![now.clone()],
                    replayed: true,
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
                o.complete * MS,
                1,
                Entry::Complete {
                    op: o.op,
                    t_us: o.complete * MS,
                    result,
                },
            ));
        }
        for (t, e) in &self.other {
            timed.push((t * MS, 1, e.clone()));
        }
        timed.push((
            self.end * MS,
            1,
            Entry::End {
                t_us: self.end * MS,
            },
        ));
        timed.sort_by_key(|(t, order, _)| (*t, *order));
        timed.into_iter().map(|(_, _, e)| e).collect()
    }

    fn check(&self) -> Verdict {
        check(&self.entries(), &CheckOptions::default())
    }
}

const S1: &str = "hot.s1";
const S2: &str = "hot.s2";

/// Named operations of [`base`], for the mutations.
struct Base {
    h: Builder,
    w1_a: u64,
    w2_a: u64,
    read_v2: u64,
    occ_ok: u64,
    occ_refused: u64,
    w3_unknown: u64,
    sub_v5: u64,
    final_s1: u64,
    final_s2: u64,
}

/// A correct concurrent history on two buckets: overlapping writes that merge, a read
/// concurrent with a write, two OCC writes on one base (one refused), a write of unknown
/// fate that applied and one that did not, a subscribe that sees it, an open subscribe
/// whose timeout has not passed, final reads.
fn base() -> Base {
    let mut h = Builder {
        end: 7000,
        ..Builder::default()
    };
    h.read(0, (0, 10), state(S1, 1, 1000, json!({})));
    h.read(0, (0, 10), state(S2, 1, 1000, json!({})));
    let w1_a = h.write(
        1,
        (20, 40),
        S1,
        json!({"w1": 1}),
        1,
        false,
        Res::Ack(2, 1020),
    );
    let w2_a = h.write(
        2,
        (25, 50),
        S1,
        json!({"w2": 1}),
        1,
        false,
        Res::Ack(3, 1030),
    );
    let read_v2 = h.read(3, (30, 45), state(S1, 2, 1020, json!({"w1": 1})));
    let occ_ok = h.write(
        1,
        (60, 80),
        S1,
        json!({"w1": 2}),
        3,
        true,
        Res::Ack(4, 1060),
    );
    let occ_refused = h.write(2, (62, 85), S1, json!({"z": 9}), 3, true, Res::Refused(409));
    let w3_unknown = h.write(3, (90, 100), S1, json!({"w3": 1}), 4, false, Res::Unknown);
    let sub_v5 = h.subscribe(
        2,
        (95, 120),
        (S1, 4),
        1000,
        Res::Shown(vec![state(S1, 5, 1095, json!({"w1": 2, "w2": 1, "w3": 1}))]),
    );
    h.write(4, (100, 110), S1, json!({"w4": 1}), 5, true, Res::Unknown);
    h.write(
        1,
        (130, 140),
        S2,
        json!({"x": 1}),
        1,
        false,
        Res::Ack(2, 1135),
    );
    h.subscribe(4, (150, 0), (S2, 2), 30_000, Res::Open);
    let final_s1 = h.read(
        0,
        (7010, 7020),
        state(S1, 5, 1095, json!({"w1": 2, "w2": 1, "w3": 1})),
    );
    let final_s2 = h.read(0, (7010, 7020), state(S2, 2, 1135, json!({"x": 1})));
    Base {
        h,
        w1_a,
        w2_a,
        read_v2,
        occ_ok,
        occ_refused,
        w3_unknown,
        sub_v5,
        final_s1,
        final_s2,
    }
}

/// Asserts that exactly `property` is non-zero, with `count`.
fn assert_only(v: &Verdict, property: &str, count: u64) {
    for (name, n) in v.properties.iter() {
        if name == property {
            assert_eq!(n, count, "{property}: {:#?}", v.examples);
        } else {
            assert_eq!(
                n, 0,
                "{name} flagged too (expected only {property}): {:#?}",
                v.examples
            );
        }
    }
    assert!(!v.passed);
    let ex: Vec<&Example> = v
        .examples
        .iter()
        .filter(|e| e.property == property)
        .collect();
    assert!(!ex.is_empty(), "no example for {property}");
    assert!(ex.iter().all(|e| !e.ops.is_empty() && !e.bucket.is_empty()));
}

#[test]
fn a_correct_concurrent_history_passes() {
    let b = base();
    let v = b.h.check();
    assert!(v.passed, "{:#?}", v.examples);
    assert!(v.examples.is_empty());
    assert_eq!(v.ops.writes_ok, 4);
    assert_eq!(v.ops.writes_refused, 1);
    assert_eq!(v.ops.writes_unknown, 2);
    assert_eq!(v.ops.incomplete, 1);
}

#[test]
fn a_lost_acknowledged_write_is_counted_as_lost() {
    let mut b = base();
    // The final read shows hot.s2 at the acknowledged version, without the write's field.
    b.h.op(b.final_s2).res = Res::Shown(vec![state(S2, 2, 1135, json!({}))]);
    let v = b.h.check();
    assert_only(&v, "lost_writes", 1);
    assert_eq!(v.examples[0].version, Some(2));
    assert!(v.examples[0].ops.contains(&b.final_s2));
}

#[test]
fn final_reads_behind_an_acknowledged_version_count_as_lost() {
    let mut b = base();
    // The bucket came back at v1 after the write was acknowledged as v2: lost, and the
    // final read is stale too.
    b.h.op(b.final_s2).res = Res::Shown(vec![state(S2, 1, 1000, json!({}))]);
    let v = b.h.check();
    assert_eq!(v.properties.lost_writes, 1, "{:#?}", v.examples);
    assert_eq!(v.properties.stale_reads, 1);
}

#[test]
fn a_state_stamped_minutes_after_it_was_seen_is_ahead() {
    let mut b = base();
    // The run started at wall time 1,000 ms: every state is stamped before it was seen.
    b.h.wall_ms = 1000;
    let v = b.h.check();
    assert!(v.passed, "{:#?}", v.examples);
    // A node whose clock ran 10 minutes ahead stamped hot.s2's v2 (acknowledged at
    // 140 ms into the run, read again at the end).
    let ahead = 1135 + 600_000;
    let w =
        b.h.ops
            .iter()
            .position(|o| matches!(&o.call, Call::Write { bucket, .. } if bucket == S2))
            .expect("the write to hot.s2") as u64
            + 1;
    b.h.op(w).res = Res::Ack(2, ahead);
    b.h.op(b.final_s2).res = Res::Shown(vec![state(S2, 2, ahead, json!({"x": 1}))]);
    let v = b.h.check();
    assert_only(&v, "timestamps_ahead", 1);
    assert_eq!(v.examples[0].version, Some(2));
    assert!(v.examples[0].ops.contains(&w), "{:#?}", v.examples);
    // Without the run's wall-clock start nothing can be said.
    b.h.wall_ms = 0;
    assert!(b.h.check().passed);
}

#[test]
fn one_version_shown_with_two_timestamps_is_a_fork() {
    let mut b = base();
    b.h.read(4, (55, 58), state(S1, 3, 1031, json!({"w1": 1, "w2": 1})));
    let v = b.h.check();
    assert_only(&v, "forked_versions", 1);
    assert_eq!(v.examples[0].version, Some(3));
}

#[test]
fn one_version_acknowledged_to_two_writes_is_a_fork() {
    let mut b = base();
    // A second owner committed its own v2 (split brain) for a concurrent write.
    b.h.write(
        4,
        (21, 39),
        S1,
        json!({"w4": 7}),
        1,
        false,
        Res::Ack(2, 1020),
    );
    let v = b.h.check();
    assert_eq!(v.properties.forked_versions, 1, "{:#?}", v.examples);
}

#[test]
fn a_client_seeing_an_older_version_is_a_regression() {
    let b = base();
    let mut h = b.h;
    // Client 2 saw v5 in its subscribe answer, then reads v4.
    h.read(2, (130, 140), state(S1, 4, 1060, json!({"w1": 2, "w2": 1})));
    let v = h.check();
    assert_only(&v, "version_regressions", 1);
    assert!(v.examples[0].ops.contains(&b.sub_v5));
}

#[test]
fn a_value_only_a_refused_write_made_is_a_garbage_read() {
    let mut b = base();
    b.h.op(b.final_s1).res = Res::Shown(vec![state(
        S1,
        6,
        1130,
        json!({"w1": 2, "w2": 1, "w3": 1, "z": 9}),
    )]);
    let v = b.h.check();
    assert_only(&v, "garbage_reads", 1);
    assert!(v.examples[0].ops.contains(&b.occ_refused));
}

#[test]
fn a_value_no_write_made_is_a_garbage_read() {
    let mut b = base();
    b.h.op(b.read_v2).res = Res::Shown(vec![state(S1, 2, 1020, json!({"w1": 1, "q": 5}))]);
    let v = b.h.check();
    // The same version is also shown without `q` nowhere else, so only garbage.
    assert_eq!(v.properties.garbage_reads, 1, "{:#?}", v.examples);
    assert_eq!(v.properties.underivable_states, 0);
}

#[test]
fn two_occ_writes_applied_on_one_base_are_a_lost_update() {
    let mut b = base();
    // The second OCC write on base 3 is applied too (as v5); the unknown write did not run.
    b.h.op(b.occ_refused).res = Res::Ack(5, 1085);
    b.h.op(b.sub_v5).res = Res::Shown(vec![state(S1, 5, 1085, json!({"w1": 2, "w2": 1, "z": 9}))]);
    b.h.op(b.final_s1).res =
        Res::Shown(vec![state(S1, 5, 1085, json!({"w1": 2, "w2": 1, "z": 9}))]);
    let v = b.h.check();
    assert_only(&v, "occ_lost_updates", 1);
    assert!(v.examples[0].ops.contains(&b.occ_ok));
    assert!(v.examples[0].ops.contains(&b.occ_refused));
}

#[test]
fn a_subscribe_answered_past_its_timeout_and_grace_hangs() {
    let mut b = base();
    // Answered 6.1 s after it was sent with a 1 s timeout (grace 5 s).
    b.h.op(b.sub_v5).complete = 95 + 6100;
    let v = b.h.check();
    assert_only(&v, "hung_subscribers", 1);
}

#[test]
fn a_subscribe_late_only_because_its_node_was_frozen_is_excused() {
    let mut b = base();
    b.h.end = 20_000;
    // n1 frozen from 150 ms to 6.5 s; the subscribe (1 s timeout, deadline 6.16 s) was
    // answered 100 ms after it woke.
    b.h.fault(150, "pause", "n1", FaultPhase::Start);
    b.h.fault(6500, "pause", "n1", FaultPhase::End);
    b.h.subscribe(4, (160, 6600), (S2, 2), 1000, Res::Shown(vec![]));
    let v = b.h.check();
    assert!(v.passed, "{:?}", v.examples);
    assert_eq!(v.excused_subscribers, 1);

    // Sent 8.3 s into a 15 s pause of its node, answered 0.3 s after the node woke, past
    // its deadline (2 s + 5 s grace) by 0.07 s: 6.7 s of its 7.07 s were spent frozen.
    let mut b = base();
    b.h.end = 40_000;
    b.h.fault(1000, "pause", "n1", FaultPhase::Start);
    b.h.fault(16_000, "pause", "n1", FaultPhase::End);
    b.h.via = Some("n1");
    b.h.subscribe(4, (9300, 16_370), (S2, 2), 2000, Res::Shown(vec![]));
    // The same on a node that was not paused is hung.
    b.h.via = Some("n2");
    b.h.subscribe(5, (9300, 16_370), (S2, 2), 2000, Res::Shown(vec![]));
    b.h.via = None;
    let v = b.h.check();
    assert_only(&v, "hung_subscribers", 1);
    assert!(
        v.examples.iter().any(|e| e.detail.contains("client 5")),
        "the one on the node that was not paused: {:?}",
        v.examples
    );
}

/// A subscribe sent while the clients were cut from its node (`lb-partition`): its answer
/// could not be delivered (the client gave up after 12 s). Excused when it went to that
/// node or through the load balancer; one sent to another node is not.
#[test]
fn a_subscribe_cut_off_from_its_node_is_excused_but_not_one_to_another_node() {
    let history = |via: &str| {
        let mut b = base();
        b.h.end = 20_000;
        b.h.fault(150, "lb-partition", "n1", FaultPhase::Start);
        b.h.fault(15_000, "lb-partition", "n1", FaultPhase::End);
        let op = b.h.subscribe(4, (160, 12_160), (S2, 2), 1000, Res::Unknown);
        if let Call::Subscribe { via: v, .. } = &mut b.h.op(op).call {
            *v = via.into();
        }
        b.h.check()
    };
    for via in ["lb", "n1"] {
        let v = history(via);
        assert!(v.passed, "via {via}: {:?}", v.examples);
        assert_eq!(v.excused_subscribers, 1, "via {via}");
    }
    let v = history("n2");
    assert_only(&v, "hung_subscribers", 1);
    assert_eq!(v.excused_subscribers, 0);
}

#[test]
fn a_woken_node_that_still_does_not_answer_hangs_its_subscriber() {
    let mut b = base();
    b.h.end = 20_000;
    b.h.fault(150, "pause", "n1", FaultPhase::Start);
    b.h.fault(6500, "pause", "n1", FaultPhase::End);
    // Answered 6.1 s after the node woke: more than its timeout and grace.
    b.h.subscribe(4, (160, 12_600), (S2, 2), 1000, Res::Shown(vec![]));
    let v = b.h.check();
    assert_only(&v, "hung_subscribers", 1);
    assert_eq!(v.excused_subscribers, 0);
}

#[test]
fn a_pause_excuses_no_more_lateness_than_its_own_length() {
    let mut b = base();
    b.h.end = 20_000;
    // Frozen 2.85 s of the subscribe's time: it may take 1 s + 5 s grace + 2.85 s; it took
    // 8.9 s.
    b.h.fault(150, "pause", "n1", FaultPhase::Start);
    b.h.fault(3000, "pause", "n1", FaultPhase::End);
    b.h.subscribe(4, (160, 9060), (S2, 2), 1000, Res::Shown(vec![]));
    let v = b.h.check();
    assert_only(&v, "hung_subscribers", 1);
}

#[test]
fn a_subscribe_never_answered_by_end_past_its_deadline_hangs() {
    let mut b = base();
    b.h.subscribe(4, (160, 0), (S2, 2), 1000, Res::Open);
    let v = b.h.check();
    assert_only(&v, "hung_subscribers", 1);
}

#[test]
fn a_read_older_than_an_acknowledged_write_is_stale() {
    let mut b = base();
    // Sent after the OCC write was acknowledged as v4 (at 80 ms), shown v3.
    b.h.read(4, (90, 92), state(S1, 3, 1030, json!({"w1": 1, "w2": 1})));
    let v = b.h.check();
    assert_only(&v, "stale_reads", 1);
    assert_eq!(v.staleness.max_versions, 1);
    assert!(
        (v.staleness.max_ms - 10.0).abs() < 1e-9,
        "{:?}",
        v.staleness
    );
}

#[test]
fn a_write_acknowledged_below_an_earlier_acknowledged_write_violates_real_time() {
    let mut b = base();
    // w2 (v3) is acknowledged at 18 ms, before w1 (v2) is sent at 20 ms.
    b.h.op(b.w2_a).invoke = 12;
    b.h.op(b.w2_a).complete = 18;
    b.h.op(b.read_v2).invoke = 15;
    let v = b.h.check();
    assert_only(&v, "realtime_violations", 1);
    let e = &v.examples[0];
    assert!(e.ops.contains(&b.w1_a) && e.ops.contains(&b.w2_a), "{e:?}");
}

#[test]
fn a_state_shown_before_its_write_was_sent_violates_real_time() {
    let mut b = base();
    // v4 is shown to client 3 at 58 ms; the write acknowledged as v4 was sent at 60 ms.
    b.h.read(3, (55, 58), state(S1, 4, 1060, json!({"w1": 2, "w2": 1})));
    let v = b.h.check();
    assert_only(&v, "realtime_violations", 1);
    assert!(v.examples[0].ops.contains(&b.occ_ok));
}

#[test]
fn a_read_older_than_another_clients_earlier_read_violates_real_time() {
    let mut b = base();
    // Client 4 is shown v4 after client 2's subscribe showed v5 (no ack of v5 exists).
    b.h.read(4, (125, 128), state(S1, 4, 1060, json!({"w1": 2, "w2": 1})));
    let v = b.h.check();
    assert_only(&v, "realtime_violations", 1);
}

#[test]
fn a_state_no_single_write_explains_is_underivable() {
    let mut b = base();
    // v5 shown with the unknown write's field and the other unknown write's field: two
    // writes in one version.
    let bad = json!({"w1": 2, "w2": 1, "w3": 1, "w4": 1});
    b.h.op(b.sub_v5).res = Res::Shown(vec![state(S1, 5, 1095, bad.clone())]);
    b.h.op(b.final_s1).res = Res::Shown(vec![state(S1, 5, 1095, bad)]);
    let v = b.h.check();
    assert_only(&v, "underivable_states", 1);
}

#[test]
fn a_timestamp_going_back_is_underivable() {
    let mut b = base();
    b.h.op(b.sub_v5).res = Res::Shown(vec![state(S1, 5, 1001, json!({"w1": 2, "w2": 1, "w3": 1}))]);
    b.h.op(b.final_s1).res =
        Res::Shown(vec![state(S1, 5, 1001, json!({"w1": 2, "w2": 1, "w3": 1}))]);
    let v = b.h.check();
    assert_only(&v, "underivable_states", 1);
}

#[test]
fn a_retried_write_the_server_replayed_is_one_write() {
    let mut b = base();
    // Client 3 retries its unknown write with the same op_id after v5 was seen; the
    // server replays the original (v5) answer: not a real-time violation, not a fork.
    let mut call = b.h.op(b.w3_unknown).call.clone();
    if let Call::Write { op_id, .. } = &mut call {
        *op_id = Some("c3-1".into());
    }
    b.h.op(b.w3_unknown).call = call.clone();
    let retry = b.h.push(3, 200, 210, call, Res::Ack(5, 1095));
    let v = b.h.check();
    assert!(v.passed, "{:#?}", v.examples);
    assert_eq!(v.ops.writes_ok, 5, "retry {retry} counted");
}

/// A write of unknown fate (its first attempt merged at v3 on an owner that died) retried
/// with its op id after another write made v4: the server replays `merged` with the bucket
/// as it is now (v4). That answer is an observation of v4, not a claim that this write made
/// v4 (REPORT.md defect 5: the checker read it as one, and counted a fork, a lost write
/// and an underivable state).
#[test]
fn a_replayed_merge_shows_the_bucket_as_it_is_now() {
    let mut h = Builder {
        end: 1000,
        ..Builder::default()
    };
    h.read(0, (0, 10), state(S1, 1, 1000, json!({})));
    h.write(
        2,
        (20, 30),
        S1,
        json!({"w2": 1}),
        1,
        false,
        Res::Ack(2, 1020),
    );
    let first = h.write(1, (40, 60), S1, json!({"w1": 1}), 1, false, Res::Unknown);
    let mut call = h.op(first).call.clone();
    if let Call::Write { op_id, .. } = &mut call {
        *op_id = Some("c1-1".into());
    }
    h.op(first).call = call.clone();
    h.write(
        2,
        (70, 80),
        S1,
        json!({"w2": 2}),
        2,
        false,
        Res::Ack(4, 1070),
    );
    let now = state(S1, 4, 1070, json!({"w1": 1, "w2": 2}));
    h.push(1, 90, 100, call, Res::ReplayedMerge(now.clone()));
    h.read(0, (1010, 1020), now);
    let v = h.check();
    assert!(v.passed, "{:#?}", v.examples);
    assert_eq!(v.ops.writes_ok, 3);
}

/// A held subscriber answered "nothing changed" at its timeout although a newer version
/// was acknowledged early in its hold (the planted `drop-notification`): one missed
/// notification. One acknowledged within the grace before the answer is not counted.
#[test]
fn a_subscriber_left_holding_a_stale_copy_missed_a_notification() {
    let history = |ack_at: u64| {
        let mut h = Builder {
            end: 5000,
            ..Builder::default()
        };
        h.read(0, (0, 10), state(S1, 1, 1000, json!({})));
        h.subscribe(2, (20, 2020), (S1, 1), 2000, Res::Shown(Vec::new()));
        h.write(
            1,
            (ack_at - 10, ack_at),
            S1,
            json!({"w1": 1}),
            1,
            false,
            Res::Ack(2, 1100),
        );
        h.read(0, (5010, 5020), state(S1, 2, 1100, json!({"w1": 1})));
        h.check()
    };
    assert_only(&history(100), "missed_notifications", 1);
    let v = history(1500);
    assert!(v.passed, "{:#?}", v.examples);
}

#[test]
fn liveness_figures_follow_their_definitions() {
    let mut h = Builder {
        end: 10_000,
        ..Builder::default()
    };
    h.owner(0, "s1", "node-1");
    h.owner(0, "s2", "node-2");
    h.read(0, (0, 10), state(S1, 1, 1000, json!({})));
    h.read(0, (0, 10), state(S2, 1, 1000, json!({})));
    // node-1 (owner of s1) is killed from 1000 to 5000 ms; s1 moves to node-2 at 4000.
    h.fault(1000, "kill", "node-1", FaultPhase::Start);
    h.fault(5000, "kill", "node-1", FaultPhase::End);
    h.owner(4000, "s1", "node-2");
    h.write(
        1,
        (900, 950),
        S1,
        json!({"a": 1}),
        1,
        false,
        Res::Ack(2, 1950),
    );
    // In the window: s1 fails twice (unknown, 503) then succeeds at 4100 ms.
    h.write(1, (1100, 2100), S1, json!({"a": 2}), 2, false, Res::Unknown);
    h.write(
        1,
        (2200, 2300),
        S1,
        json!({"a": 3}),
        2,
        false,
        Res::Refused(503),
    );
    h.write(
        1,
        (4050, 4100),
        S1,
        json!({"a": 4}),
        2,
        false,
        Res::Ack(3, 5100),
    );
    // s2 (node-2): two successes and a semantic refusal (409) in the window.
    h.write(
        2,
        (1200, 1250),
        S2,
        json!({"b": 1}),
        1,
        false,
        Res::Ack(2, 2250),
    );
    h.write(
        2,
        (1300, 1350),
        S2,
        json!({"b": 2}),
        1,
        true,
        Res::Refused(409),
    );
    h.write(
        2,
        (1400, 1450),
        S2,
        json!({"b": 3}),
        2,
        false,
        Res::Ack(3, 2450),
    );
    // After the heal: client 3 is shown s2 v2 (stale, at 6100 ms), then v3.
    h.read(3, (6000, 6100), state(S2, 2, 2250, json!({"b": 1})));
    h.read(3, (6200, 6300), state(S2, 3, 2450, json!({"b": 3})));
    let v = h.check();
    // 6 operations invoked in [1000, 5000]: 4 succeed (3 ok + 1 semantic refusal).
    assert_eq!(v.availability, Some(4.0 / 6.0));
    // Not on node-1's sets at invocation: the three s2 writes (all succeed); the s1 write
    // at 4050 ms is on node-2 by then.
    assert_eq!(v.availability_unaffected, Some(4.0 / 4.0));
    // s1's writes fail from the fault start (1000 ms; its last ack, 950 ms, came before)
    // until the ack at 4100 ms: 3.1 s.
    assert_eq!(v.failover_s, Some(3.1));
    // The last non-current read after the heal (5000 ms) completed at 6100 ms.
    assert_eq!(v.convergence_s, Some(1.1));
    assert!(!v.liveness_passed, "availability 67 % is below 95 %");
    assert_eq!(v.properties.stale_reads, 1);

    // Judged by a scenario's own goals: no availability goal (a store-wide fault) passes
    // the same figures; a failover goal below 3.15 s does not.
    let judged = |goals: Goals| {
        check(
            &h.entries(),
            &CheckOptions {
                goals,
                ..CheckOptions::default()
            },
        )
    };
    let no_availability = Goals {
        min_availability: None,
        min_availability_unaffected: None,
        ..Goals::default()
    };
    assert!(judged(no_availability).liveness_passed);
    assert_eq!(judged(no_availability).goals, no_availability);
    assert!(
        !judged(Goals {
            max_failover_s: Some(3.0),
            ..no_availability
        })
        .liveness_passed,
        "failover 3.1 s is above 3 s"
    );
}

#[test]
fn a_malformed_history_fails_and_says_why() {
    let b = base();
    let mut entries = b.h.entries();
    // A second invocation reusing op 3's number, and a completion of an op never invoked.
    let dup = entries
        .iter()
        .find(|e| matches!(e, Entry::Invoke { op: 3, .. }))
        .cloned()
        .expect("op 3");
    entries.push(dup);
    entries.push(Entry::Complete {
        op: 999,
        t_us: 1,
        result: Outcome::Unknown { detail: "x".into() },
    });
    let v = check(&entries, &CheckOptions::default());
    assert!(!v.passed);
    assert_eq!(v.malformed_count, 2, "{:?}", v.malformed);
    assert!(v.malformed.iter().any(|m| m.contains("op 3 invoked twice")));
    assert!(v
        .malformed
        .iter()
        .any(|m| m.contains("op 999 completed but never invoked")));
}

#[test]
fn a_store_fault_touches_every_set_and_a_write_gap_runs_to_end() {
    let mut h = Builder {
        end: 8000,
        ..Builder::default()
    };
    h.owner(0, "s1", "node-1");
    h.read(0, (0, 10), state(S1, 1, 1000, json!({})));
    h.write(
        1,
        (100, 200),
        S1,
        json!({"a": 1}),
        1,
        false,
        Res::Ack(2, 1100),
    );
    // The store is down from 1 s on: one success (a semantic 422), one 503.
    h.fault(1000, "store-crash", "store", FaultPhase::Start);
    h.write(
        1,
        (1100, 1200),
        S1,
        json!({"a": 2}),
        2,
        false,
        Res::Refused(422),
    );
    h.write(
        1,
        (1300, 1400),
        S1,
        json!({"a": 3}),
        2,
        false,
        Res::Refused(503),
    );
    h.fault(3000, "store-crash", "store", FaultPhase::End);
    // node-1 (s1's owner) is paused from 5 s and no write succeeds again before End (8 s).
    h.fault(5000, "pause", "node-1", FaultPhase::Start);
    h.write(1, (5100, 6100), S1, json!({"a": 4}), 2, false, Res::Unknown);
    let v = h.check();
    assert!(v.passed, "{:#?}", v.examples);
    // In windows: the 422 (success), the 503 and the unknown write (failures).
    assert_eq!(v.availability, Some(1.0 / 3.0));
    // The store fault names no node that owns a set, the pause names s1's owner: no
    // operation in a window was on a set outside the fault.
    assert_eq!(v.availability_unaffected, None);
    // The store fault names no owner. The pause does: s1's write fails from its start
    // (5 s) and none succeeds before End (8 s).
    assert_eq!(v.failover_s, Some(3.0));
}

#[test]
fn failover_is_measured_from_the_fault_and_direct_clients_of_a_faulted_node_are_affected() {
    let mut h = Builder {
        end: 30_000,
        ..Builder::default()
    };
    h.owner(0, "s1", "node-1");
    h.owner(0, "s2", "node-2");
    h.read(0, (0, 10), state(S1, 1, 1000, json!({})));
    h.read(0, (0, 10), state(S2, 1, 1000, json!({})));
    // Sparse writes on s1: one ack at 500 ms, none until long after node-1's kill at
    // 10 s; the first write after the kill fails, the next one (at 14 s) succeeds.
    h.write(
        1,
        (400, 500),
        S1,
        json!({"a": 1}),
        1,
        false,
        Res::Ack(2, 1500),
    );
    h.fault(10_000, "kill", "node-1", FaultPhase::Start);
    h.write(
        1,
        (11_000, 12_000),
        S1,
        json!({"a": 2}),
        2,
        false,
        Res::Unknown,
    );
    h.write(
        1,
        (13_900, 14_000),
        S1,
        json!({"a": 3}),
        2,
        false,
        Res::Ack(3, 15_000),
    );
    // s2 is written rarely and never fails: no outage, however long its quiet stretch.
    h.write(
        2,
        (600, 700),
        S2,
        json!({"b": 1}),
        1,
        false,
        Res::Ack(2, 1700),
    );
    h.write(
        2,
        (19_000, 19_100),
        S2,
        json!({"b": 2}),
        2,
        false,
        Res::Ack(3, 20_100),
    );
    // A client sent straight to the killed node fails on s2, which node-2 owns.
    h.via = Some("node-1");
    h.write(
        3,
        (16_000, 16_500),
        S2,
        json!({"c": 1}),
        2,
        false,
        Res::Unknown,
    );
    h.via = None;
    h.fault(20_000, "kill", "node-1", FaultPhase::End);
    let v = h.check();
    assert!(v.passed, "{:#?}", v.examples);
    // From the kill (10 s), not from the last ack before it (0.5 s), to the ack at 14 s.
    assert_eq!(v.failover_s, Some(4.0));
    // In the window: s1's two writes and the direct write are affected; s2's write through
    // the load balancer is the only unaffected operation, and it succeeded.
    assert_eq!(v.availability_unaffected, Some(1.0));
    assert_eq!(v.availability, Some(2.0 / 4.0));
}

/// A value shown before the only write that made it was sent (of unknown fate, so no
/// version names it): a value from the future (found by `tests/checker_differential.rs`:
/// the checker passed a read shown `k=5` 5 ms before the write of `k=5` was sent).
#[test]
fn a_value_shown_before_its_only_write_was_sent_is_a_garbage_read() {
    let mut b = base();
    b.h.read(
        5,
        (80, 85),
        state(S1, 5, 1095, json!({"w1": 2, "w2": 1, "w3": 1})),
    );
    let v = b.h.check();
    assert_only(&v, "garbage_reads", 1);
    assert!(
        v.examples[0].ops.contains(&b.w3_unknown),
        "{:?}",
        v.examples[0]
    );
}
