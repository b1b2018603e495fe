//! The ownership model, checked: the real rules hold in every state the checker reaches,
//! with failed activations too, every planted bug is caught by the property it breaks,
//! the rules before the fix of the model's finding (chaos REPORT.md defect 16) still show
//! its counterexample, and named interleavings play out as the node's code would.
//!
//! Each check prints its state count, depth and time; `--nocapture` shows them.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use stateright::{Checker, HasDiscoveries, Model, Path};
use tether_model::*;

/// Three nodes, one set, two clients of one request each: small enough that the checker
/// visits every reachable state.
fn one_request_each() -> Ownership {
    Ownership {
        ops_per_client: 1,
        ..Ownership::new()
    }
}

/// Two requests per client with `LEASE_TRUST` and `TAKE_OVER_WAIT` of one tick (a tick is
/// then "as long as the read lease"): the same rules in fewer states per step, so the
/// checker reaches the interleavings of three requests (a read whose confirmation
/// straddles a take-over, then another read) within its depth.
fn one_tick_leases() -> Ownership {
    Ownership {
        lease_trust: 1,
        take_over_wait: 1,
        ..Ownership::new()
    }
}

/// The checker's BFS over `model`, to `depth` (stateright's `target_max_depth`: states
/// that far are generated, those nearer checked) or, with `None`, over every reachable
/// state; stops early once `stop` properties have a discovery.
fn bfs(
    what: &str,
    model: Ownership,
    depth: Option<usize>,
    stop: HasDiscoveries,
) -> impl Checker<Ownership> {
    let started = Instant::now();
    let mut builder = model.checker().finish_when(stop);
    if let Some(depth) = depth {
        builder = builder.target_max_depth(depth);
    }
    let checker = builder.spawn_bfs().join();
    report(what, &checker, started.elapsed());
    checker
}

fn report(what: &str, checker: &impl Checker<Ownership>, took: Duration) {
    println!(
        "{what}: {} unique states ({} generated), max depth {}, {:.1} s",
        checker.unique_state_count(),
        checker.state_count(),
        checker.max_depth(),
        took.as_secs_f64()
    );
}

/// Asserts no `always` property failed and every `sometimes` property was reached.
fn assert_holds(checker: &impl Checker<Ownership>) {
    for name in ALWAYS {
        if let Some(path) = checker.discovery(name) {
            panic!("\"{name}\" fails:\n{}", story(&path));
        }
    }
    checker.assert_properties();
}

/// Checks `model` one depth deeper at a time until the property `expected` fails (so the
/// counterexample printed is a shortest one), asserts it did, and prints how.
fn assert_caught(what: &str, model: Ownership, expected: &'static str) {
    let started = Instant::now();
    for depth in 3..=MAX_COUNTEREXAMPLE_DEPTH {
        let stop = HasDiscoveries::AnyOf(BTreeSet::from([expected]));
        let checker = model
            .clone()
            .checker()
            .finish_when(stop)
            .target_max_depth(depth)
            .spawn_bfs()
            .join();
        let Some(path) = checker.discovery(expected) else {
            continue;
        };
        report(what, &checker, started.elapsed());
        println!("{what}: \"{expected}\" fails after:\n{}", story(&path));
        assert!(!property(expected)(path.last_state()));
        return;
    }
    panic!("{what}: \"{expected}\" holds within {MAX_COUNTEREXAMPLE_DEPTH} steps");
}

/// Deeper than any counterexample of the planted bugs (13 steps at most).
const MAX_COUNTEREXAMPLE_DEPTH: usize = 17;

/// The steps of a counterexample, one per line.
fn story(path: &Path<State, Action>) -> String {
    path.clone()
        .into_actions()
        .iter()
        .enumerate()
        .map(|(i, a)| format!("  {:>2}. {a:?}\n", i + 1))
        .collect()
}

fn property(name: &str) -> fn(&State) -> bool {
    match name {
        n if n == ALWAYS[0] => at_most_one_committing_owner,
        n if n == ALWAYS[1] => no_acknowledged_write_lost,
        n if n == ALWAYS[2] => no_stale_read,
        _ => panic!("no property {name}"),
    }
}

const ONE_OWNER: &str = ALWAYS[0];
const NO_LOST_WRITE: &str = ALWAYS[1];
const NO_STALE_READ: &str = ALWAYS[2];

#[test]
fn the_real_rules_hold_in_every_reachable_state() {
    let checker = bfs(
        "real rules, 2 clients x 1 request, every reachable state",
        one_request_each(),
        None,
        HasDiscoveries::All,
    );
    assert_holds(&checker);
    assert!(checker.is_done());
}

#[test]
fn the_real_rules_hold_in_every_state_within_16_steps() {
    let checker = bfs(
        "real rules, 2 clients x 2 requests, one-tick leases, every state within 16 steps",
        one_tick_leases(),
        Some(18),
        HasDiscoveries::All,
    );
    assert_holds(&checker);
}

#[test]
fn planted_skip_epoch_check_is_caught_as_two_committing_owners() {
    let model = Ownership::new().with_rules(Rules::Planted(Bug::SkipEpochCheck));
    assert_caught("skip-epoch-check", model, ONE_OWNER);
}

#[test]
fn planted_ack_before_durable_is_caught_as_a_lost_write() {
    let model = Ownership::new().with_rules(Rules::Planted(Bug::AckBeforeDurable));
    assert_caught("ack-before-durable", model, NO_LOST_WRITE);
}

#[test]
fn planted_read_without_confirm_is_caught_as_a_stale_read() {
    let model = Ownership::new().with_rules(Rules::Planted(Bug::ReadWithoutConfirm));
    assert_caught("read-without-confirm", model, NO_STALE_READ);
}

#[test]
fn planted_wait_from_request_is_caught_as_a_stale_read() {
    let model = Ownership::new().with_rules(Rules::Planted(Bug::WaitFromRequest));
    assert_caught("wait-from-request", model, NO_STALE_READ);
}

#[test]
fn planted_serve_at_once_is_caught_as_a_stale_read() {
    let model = Ownership::new().with_rules(Rules::Planted(Bug::ServeAtOnce));
    assert_caught("serve-at-once", model, NO_STALE_READ);
}

#[test]
fn planted_proof_from_answer_is_caught_as_a_stale_read() {
    let model = Ownership::new().with_rules(Rules::Planted(Bug::ProofFromAnswer));
    assert_caught("proof-from-answer", model, NO_STALE_READ);
}

/// Activations that fail after their lease request was sent; such a request lands before
/// the failure is reported or never (the assumption of the node's fix of defect 16).
const FAILED_ACTIVATIONS: Faults = Faults {
    commit_fate_unknown: true,
    failed_activations: true,
    late_lease_landing: false,
};

/// The same, and a failed activation's lease request may land any time later (the model
/// as it found defect 16).
const WITH_FAILED_ACTIVATIONS: Faults = Faults {
    late_lease_landing: true,
    ..FAILED_ACTIVATIONS
};

#[test]
fn the_real_rules_hold_with_failed_activations_in_every_reachable_state() {
    let checker = bfs(
        "real rules, failed activations, 2 clients x 1 request, every reachable state",
        one_request_each().with_faults(FAILED_ACTIVATIONS),
        None,
        HasDiscoveries::All,
    );
    assert_holds(&checker);
    assert!(checker.is_done());
}

#[test]
fn the_real_rules_hold_with_failed_activations_in_every_state_within_16_steps() {
    let checker = bfs(
        "real rules, failed activations, 2 clients x 2 requests, one-tick leases, \
         every state within 16 steps",
        one_tick_leases().with_faults(FAILED_ACTIVATIONS),
        Some(18),
        HasDiscoveries::All,
    );
    assert_holds(&checker);
}

/// Half (a) of the fix is needed: a load that fails before the take-over leaves the
/// holder before it serving reads.
#[test]
fn planted_load_before_take_over_is_caught_as_a_stale_read() {
    let model = one_request_each()
        .with_rules(Rules::Planted(Bug::LoadBeforeTakeOver))
        .with_faults(FAILED_ACTIVATIONS);
    assert_caught("load-before-take-over", model, NO_STALE_READ);
}

/// Half (b) of the fix is needed: without the mark, a lease whose answer was lost leaves
/// the holder before it serving reads.
#[test]
fn planted_forget_unanswered_lease_is_caught_as_a_stale_read() {
    let model = one_request_each()
        .with_rules(Rules::Planted(Bug::ForgetUnansweredLease))
        .with_faults(FAILED_ACTIVATIONS);
    assert_caught("forget-unanswered-lease", model, NO_STALE_READ);
}

/// The planted bugs that need no failed activation are caught with them too (the
/// counterexamples are the same; this shows the new steps hide none).
#[test]
fn planted_bugs_are_caught_with_failed_activations() {
    for (what, bug, expected) in [
        ("skip-epoch-check", Bug::SkipEpochCheck, ONE_OWNER),
        ("ack-before-durable", Bug::AckBeforeDurable, NO_LOST_WRITE),
        (
            "read-without-confirm",
            Bug::ReadWithoutConfirm,
            NO_STALE_READ,
        ),
        ("wait-from-request", Bug::WaitFromRequest, NO_STALE_READ),
        ("serve-at-once", Bug::ServeAtOnce, NO_STALE_READ),
        ("proof-from-answer", Bug::ProofFromAnswer, NO_STALE_READ),
    ] {
        let model = Ownership::new()
            .with_rules(Rules::Planted(bug))
            .with_faults(FAILED_ACTIVATIONS);
        assert_caught(&format!("{what}, failed activations"), model, expected);
    }
}

/// What the fix assumes: the node's mark lasts `TAKE_OVER_WAIT` from the failure, which
/// outlasts the old holder's trust only if the unanswered lease landed before the failure
/// was reported (in the node, no later than `TAKE_OVER_WAIT - LEASE_TRUST` after it). A
/// lease request that lands later reopens the hole.
#[test]
fn the_real_rules_fail_when_a_failed_activation_lease_lands_late() {
    let model = one_request_each().with_faults(WITH_FAILED_ACTIVATIONS);
    assert_caught("real rules, late lease landing", model, NO_STALE_READ);
}

/// A finding of the model, not a planted bug: with activations that fail after their
/// lease request landed, the rules before the fix let a previous holder answer reads
/// from memory after a newer holder acknowledged a write (ARCHITECTURE.md "The ownership
/// model"; chaos REPORT.md defect 16).
#[test]
fn finding_a_failed_activation_breaks_the_take_over_chain() {
    let model = Ownership::new()
        .with_rules(Rules::BeforeDefect16)
        .with_faults(WITH_FAILED_ACTIVATIONS);
    assert_caught("before defect 16, failed activations", model, NO_STALE_READ);
}

#[test]
fn the_proposed_hand_over_by_epoch_holds_with_failed_activations() {
    let model = one_request_each()
        .with_rules(Rules::HandOverByEpoch)
        .with_faults(WITH_FAILED_ACTIVATIONS);
    let checker = bfs(
        "hand over by epoch, failed activations, 2 clients x 1 request, every reachable state",
        model,
        None,
        HasDiscoveries::All,
    );
    assert_holds(&checker);
    assert!(checker.is_done());
}

// Named interleavings, replayed step by step (each step must be enabled where it is
// taken, or the replay fails).

fn replay(model: &Ownership, steps: &[Action]) -> Option<State> {
    let init = model.init_states().remove(0);
    Path::from_actions(model, init, steps).map(|p| p.last_state().clone())
}

const SET: SetId = 0;

fn activate(node: NodeId) -> Action {
    Action::Activate { node, set: SET }
}

fn acquire(node: NodeId, tag: Tag) -> Action {
    Action::Deliver(Msg::Acquire {
        set: SET,
        node,
        tag,
    })
}

fn acquired(node: NodeId, tag: Tag, epoch: u8, previous: Option<NodeId>) -> Action {
    Action::Deliver(Msg::Acquired {
        set: SET,
        node,
        tag,
        epoch,
        previous,
        value: Vec::new(),
    })
}

fn request(client: ClientId, node: NodeId, op: Op) -> Action {
    Action::Request {
        client,
        node,
        set: SET,
        op,
    }
}

/// Client 0's first write (id 0) committed and acknowledged by `node`'s actor `tag`.
fn write_committed(node: NodeId, tag: Tag, epoch: u8) -> [Action; 3] {
    [
        request(0, node, Op::Write),
        Action::Deliver(Msg::Commit {
            set: SET,
            node,
            tag,
            epoch,
            value: vec![0],
        }),
        Action::Deliver(Msg::Committed {
            set: SET,
            node,
            tag,
            ok: true,
        }),
    ]
}

/// Node 0 serves epoch 1; node 1 takes epoch 2, its `Relinquish` never reaches node 0
/// (paused: it takes no step), waits out `TAKE_OVER_WAIT`, and acknowledges a write.
/// Then node 0 wakes and is asked to read.
fn paused_owner_wakes() -> Vec<Action> {
    let mut steps = vec![
        activate(0),
        acquire(0, 0),
        acquired(0, 0, 1, None),
        activate(1),
        acquire(1, 1),
        acquired(1, 1, 2, Some(0)),
        Action::Tick,
        Action::Tick,
        Action::TakeOverWaitEnds { node: 1, set: SET },
    ];
    steps.extend(write_committed(1, 1, 2));
    steps.push(request(1, 0, Op::Read));
    steps
}

#[test]
fn a_woken_owner_confirms_its_lease_before_reading_and_drops_the_taken_set() {
    let model = Ownership::new();
    let mut steps = paused_owner_wakes();
    steps.extend([
        Action::Deliver(Msg::Confirm {
            set: SET,
            node: 0,
            tag: 0,
            client: 1,
        }),
        Action::Deliver(Msg::Confirmed {
            set: SET,
            node: 0,
            tag: 0,
            client: 1,
            epoch: 2,
        }),
    ]);
    let end = replay(&model, &steps).expect("every step enabled");
    assert!(
        model.actor(&end, 0, SET).is_none(),
        "node 0 dropped the set"
    );
    assert!(end.clients[1].reads.is_empty(), "the read is routed again");
    assert!(!end.clients[1].busy);
    assert!(no_stale_read(&end));
}

#[test]
fn a_woken_owner_reading_without_confirming_answers_stale() {
    let model = Ownership::new().with_rules(Rules::Planted(Bug::ReadWithoutConfirm));
    let end = replay(&model, &paused_owner_wakes()).expect("every step enabled");
    let read = end.clients[1].reads[0];
    assert_eq!((read.floor, read.seen), (bit(0), 0));
    assert!(!no_stale_read(&end));
}

/// Node 0 serves epoch 1. Node 1 takes epoch 2 from it, then its activation fails
/// before its take-over (so node 0 is never asked to relinquish). Node 2 takes epoch 3
/// from node 1, which answers `Relinquish` at once: it runs no actor of the set.
fn chain_broken_by_a_failed_activation() -> Vec<Action> {
    vec![
        activate(0),
        acquire(0, 0),
        acquired(0, 0, 1, None),
        activate(1),
        acquire(1, 1),
        Action::ActivationFails { node: 1, set: SET },
        activate(2),
        acquire(2, 2),
        acquired(2, 2, 3, Some(1)),
    ]
}

/// Node 0 serves epoch 1. Node 1 takes epoch 2 from it and its activation fails after
/// the lease landed (`load_set` fails), before its take-over, so node 0 is never asked to
/// relinquish. The next request activates node 1 again: it takes epoch 3 from itself, so
/// `previous_owner` is `None` and it serves at once.
fn failed_activation_then_again() -> Vec<Action> {
    vec![
        activate(0),
        acquire(0, 0),
        acquired(0, 0, 1, None),
        activate(1),
        acquire(1, 1),
        Action::ActivationFails { node: 1, set: SET },
        activate(1),
        acquire(1, 2),
    ]
}

#[test]
fn a_node_that_failed_its_activation_takes_the_set_again_without_a_take_over() {
    let model = Ownership::new()
        .with_rules(Rules::BeforeDefect16)
        .with_faults(WITH_FAILED_ACTIVATIONS);
    let mut steps = failed_activation_then_again();
    steps.push(acquired(1, 2, 3, None));
    steps.extend(write_committed(1, 2, 3));
    // No tick passed: node 0's lease, proven when it asked for it, is still trusted.
    steps.push(request(1, 0, Op::Read));
    let end = replay(&model, &steps).expect("every step enabled");
    assert!(!no_stale_read(&end), "node 0 answered from memory");
}

#[test]
fn under_hand_over_by_epoch_a_node_that_never_served_its_own_epoch_waits() {
    let model = Ownership::new()
        .with_rules(Rules::HandOverByEpoch)
        .with_faults(WITH_FAILED_ACTIVATIONS);
    let mut steps = failed_activation_then_again();
    steps.push(acquired(1, 2, 3, Some(1)));
    let end = replay(&model, &steps).expect("every step enabled");
    let a = model.actor(&end, 1, SET).expect("node 1's actor");
    assert!(matches!(a.phase, Phase::TakingOver { .. }), "{:?}", a.phase);
    assert!(!end.net.iter().any(|m| matches!(m, Msg::Relinquish { .. })));
}

#[test]
fn a_take_over_confirmed_by_a_holder_that_never_served_leaves_the_one_before_serving() {
    let model = Ownership::new()
        .with_rules(Rules::BeforeDefect16)
        .with_faults(WITH_FAILED_ACTIVATIONS);
    let mut steps = chain_broken_by_a_failed_activation();
    steps.extend([
        Action::Deliver(Msg::Relinquish {
            set: SET,
            from: 2,
            to: 1,
            tag: 2,
            epoch: 2,
        }),
        Action::Deliver(Msg::Relinquished {
            set: SET,
            from: 1,
            to: 2,
            tag: 2,
            confirmed: true,
        }),
    ]);
    steps.extend(write_committed(2, 2, 3));
    // No tick passed: node 0's lease, proven when it asked for it, is still trusted.
    steps.push(request(1, 0, Op::Read));
    let end = replay(&model, &steps).expect("every step enabled");
    assert!(!no_stale_read(&end), "node 0 answered from memory");
}

#[test]
fn under_hand_over_by_epoch_a_holder_that_never_served_does_not_vouch() {
    let model = Ownership::new()
        .with_rules(Rules::HandOverByEpoch)
        .with_faults(WITH_FAILED_ACTIVATIONS);
    let mut steps = chain_broken_by_a_failed_activation();
    steps.extend([
        Action::Deliver(Msg::Relinquish {
            set: SET,
            from: 2,
            to: 1,
            tag: 2,
            epoch: 2,
        }),
        Action::Deliver(Msg::Relinquished {
            set: SET,
            from: 1,
            to: 2,
            tag: 2,
            confirmed: false,
        }),
    ]);
    let end = replay(&model, &steps).expect("every step enabled");
    let a = model.actor(&end, 2, SET).expect("node 2's actor");
    assert!(
        matches!(a.phase, Phase::TakingOver { .. }),
        "node 2 waits out TAKE_OVER_WAIT: {:?}",
        a.phase
    );
}

/// The real rules on the first interleaving: node 1's lease request had no answer, so its
/// next activation, which the store shows no previous owner, waits until the mark
/// expires (`TAKE_OVER_WAIT` after the failure) and asks nobody.
#[test]
fn under_the_real_rules_a_node_whose_lease_had_no_answer_waits_its_mark_out() {
    let model = Ownership::new().with_faults(FAILED_ACTIVATIONS);
    let mut steps = failed_activation_then_again();
    steps.push(acquired(1, 2, 3, None));
    let end = replay(&model, &steps).expect("every step enabled");
    let a = model.actor(&end, 1, SET).expect("node 1's actor");
    assert!(matches!(a.phase, Phase::TakingOver { .. }), "{:?}", a.phase);
    assert!(!end.net.iter().any(|m| matches!(m, Msg::Relinquish { .. })));
    assert!(
        replay(&model, &[steps.clone(), vec![Action::Tick]].concat())
            .and_then(|s| model.actor(&s, 1, SET).map(|a| a.phase))
            .is_some_and(|p| matches!(p, Phase::TakingOver { .. }))
    );
    steps.extend([
        Action::Tick,
        Action::Tick,
        Action::TakeOverWaitEnds { node: 1, set: SET },
    ]);
    let end = replay(&model, &steps).expect("the wait ends with the mark");
    assert_eq!(
        model.actor(&end, 1, SET).map(|a| a.phase),
        Some(Phase::Serving)
    );
}

/// The real rules on the second interleaving: node 1, whose lease request had no answer,
/// stops nothing it knows of but does not confirm, so node 2 waits out `TAKE_OVER_WAIT`.
#[test]
fn under_the_real_rules_a_node_whose_lease_had_no_answer_does_not_confirm() {
    let model = Ownership::new().with_faults(FAILED_ACTIVATIONS);
    let mut steps = chain_broken_by_a_failed_activation();
    steps.push(Action::Deliver(Msg::Relinquish {
        set: SET,
        from: 2,
        to: 1,
        tag: 2,
        epoch: 2,
    }));
    let end = replay(&model, &steps).expect("every step enabled");
    let answer = Msg::Relinquished {
        set: SET,
        from: 1,
        to: 2,
        tag: 2,
        confirmed: false,
    };
    assert!(end.net.contains(&answer), "{:?}", end.net);
    steps.push(Action::Deliver(answer));
    let end = replay(&model, &steps).expect("every step enabled");
    let a = model.actor(&end, 2, SET).expect("node 2's actor");
    assert!(
        matches!(a.phase, Phase::TakingOver { .. }),
        "node 2 waits out TAKE_OVER_WAIT: {:?}",
        a.phase
    );
}
