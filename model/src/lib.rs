//! A model of Tether's set ownership protocol, checked exhaustively with stateright.
//!
//! Nodes take a set's lease in the shared store with a new epoch, load the set, ask the
//! previous holder to `Relinquish` it and serve only once it confirmed or
//! `TAKE_OVER_WAIT` passed; every commit is fenced by the epoch in the store; a read is
//! answered from memory only within `LEASE_TRUST` of a store round trip that proved the
//! lease, else after one more (`lease_epoch`). [`Ownership`] is that protocol as a state
//! machine: one step per message an actor handles, per store transaction, per tick of
//! logical time. Around it:
//!
//! - every message (node to node, node to store and back) may be delivered late, out of
//!   order or never (a lost message is one never delivered: it needs no step);
//! - views are not state: any node may come to believe it owns any set at any step (it
//!   activates it) and any serving actor may be told to stop (the view moved, a drain,
//!   passivation), which covers every sequence of stale and divergent views;
//! - a pause is a node taking no step while time passes, so every pause is among the
//!   interleavings checked; a woken owner still believes it holds its lease;
//! - [`Faults`]: commits whose fate is unknown, activations that fail after their lease
//!   request was sent (and whether such a request may land long after the failure).
//!
//! The `always` properties ([`ALWAYS`]): **at most one committing owner per epoch**
//! (every commit that landed was sent under the set's current epoch by the node holding
//! it), **no acknowledged write lost** (the store's value holds every write a client saw
//! acknowledged), **no stale read** (a read returns every write acknowledged to anyone
//! before it reached the node). `sometimes` properties show the checked states include
//! take-overs, writes acknowledged by a new owner, reads after writes, deposed owners
//! asked to read and fenced commits.
//!
//! [`Rules`] selects the node's real rules, one planted [`Bug`], the rules before the fix
//! of the model's finding, or the change the model proposed; the tests show the checker
//! catches each bug, so every property can fail.
//!
//! Code map: `state.rs` (what the model remembers), `step.rs` (the transitions, each
//! naming the node code it mirrors), `properties.rs` (the checks). No I/O and no
//! dependency on the node: this models the protocol, it does not run it.

mod properties;
mod state;
mod step;

pub use properties::{
    at_most_one_committing_owner, no_acknowledged_write_lost, no_stale_read, ALWAYS,
};
pub use state::*;

use stateright::{Model, Property};

/// The protocol, its bounds and its environment.
#[derive(Clone, Debug)]
pub struct Ownership {
    /// Nodes in the cluster.
    pub nodes: u8,
    /// Bucket sets.
    pub sets: u8,
    /// Clients, each sending one request at a time.
    pub clients: u8,
    /// Requests per client in the whole run.
    pub ops_per_client: u8,
    /// Lease acquisitions per set in the whole run (take-overs are one fewer).
    pub activations_per_set: u8,
    /// `LEASE_TRUST`, in ticks.
    pub lease_trust: u8,
    /// `TAKE_OVER_WAIT`, in ticks.
    pub take_over_wait: u8,
    /// The node's rules.
    pub rules: Rules,
    /// What may go wrong besides the network.
    pub faults: Faults,
}

/// The rules the nodes follow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rules {
    /// `node/src/sets/` as it is, with the fix of chaos REPORT.md defect 16 (commits
    /// bf59f7a, 2c12920): the take-over completes whatever the load's outcome, and a lease
    /// request without an answer marks the set on that node for `TAKE_OVER_WAIT`
    /// (`Shared::lease_fate_unknown`), during which the node answers `Relinquish`
    /// "unconfirmed" and its own next activation, shown no previous owner, waits until the
    /// mark expires before serving.
    Real,
    /// The real rules with one bug planted.
    Planted(Bug),
    /// The rules before the fix of defect 16: a failed activation (its lease's answer
    /// lost, or `load_set` failing after it) stops before the take-over and leaves no
    /// mark. With [`Faults::failed_activations`] they fail "no stale read" (the model's
    /// finding, kept as its record).
    BeforeDefect16,
    /// A change the model proposes (not in the node): a previous holder confirms a
    /// take-over only for the epoch it held *and served* (its own take-over done), and
    /// the store names the previous holder even when it is the node taking the lease;
    /// without that confirmation the new holder waits out `TAKE_OVER_WAIT`. On top of
    /// [`Rules::BeforeDefect16`], it closes the same hole through the store, and holds
    /// even when a lease request lands long after its activation failed
    /// ([`Faults::late_lease_landing`]).
    HandOverByEpoch,
}

/// A planted bug: each breaks one rule the properties depend on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bug {
    /// The store applies a commit whatever its epoch (the node's `skip-epoch-check`).
    SkipEpochCheck,
    /// Memory is always trusted: a read is answered without confirming the lease (the
    /// node's `stale-reads`, as a woken owner would).
    ReadWithoutConfirm,
    /// A write is acknowledged when its commit is sent, before the store applied it (the
    /// node's `ack-before-durable`).
    AckBeforeDurable,
    /// `TAKE_OVER_WAIT` counted from when the lease request was sent, not from the
    /// store's answer (the rule before 2026-12, ARCHITECTURE.md invariant 23 step 3).
    WaitFromRequest,
    /// A new holder serves at once, without `Relinquish` or `TAKE_OVER_WAIT`.
    ServeAtOnce,
    /// A store round trip proves the lease as of when its answer arrived, not when it
    /// was sent (`Instant::now()` after the `await` instead of `taken`, `started`,
    /// `sent` before it): taking the lease, a commit, a confirmation.
    ProofFromAnswer,
    /// A load that fails ends the activation before its take-over, as before bf59f7a: the
    /// lease landed and was answered, and the holder before it is never told to stop.
    /// Takes away half (a) of the fix of defect 16.
    LoadBeforeTakeOver,
    /// A lease request without an answer leaves no mark, as before 2c12920: the node
    /// confirms a take-over of the set at once, and its next activation, which the store
    /// shows no previous owner, serves at once. Takes away half (b) of the fix.
    ForgetUnansweredLease,
}

/// Faults besides the network's (which always loses, delays and reorders).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Faults {
    /// A commit's store call may pass its deadline with its fate unknown (it may land
    /// later): the actor answers 503 and stops (invariant 25).
    pub commit_fate_unknown: bool,
    /// An activation may fail after its lease request was sent, landed or not. Under
    /// [`Rules::Real`] that is the lease's answer lost (`StoreError::is_unanswered`): the
    /// node marks the set and the actor stops. A `load_set` failing after the answer
    /// comes only once the take-over is done, so it is the actor stopping as soon as it
    /// would serve: the `Stop` step, enabled on every serving actor, covers it. Under
    /// [`Rules::BeforeDefect16`] and [`Rules::HandOverByEpoch`] either failure stops the
    /// actor before its take-over.
    pub failed_activations: bool,
    /// A lease request whose activation failed may still land at the store any time
    /// later. Without it, such a request lands before the failure is reported or never
    /// (its message is taken out of flight when the activation fails): the assumption
    /// under which the node's mark, `TAKE_OVER_WAIT` from the failure, outlasts the trust
    /// of the holder before (whose last proof was sent before the lease landed). With
    /// clock drift the node allows the lease to land up to `TAKE_OVER_WAIT - LEASE_TRUST`
    /// (100 ms) after the failure; the model has no drift, so it allows no delay.
    pub late_lease_landing: bool,
}

impl Ownership {
    /// Three nodes, one set, two clients of two requests each, three lease
    /// acquisitions, `LEASE_TRUST` and `TAKE_OVER_WAIT` of two ticks (the real 500 ms and
    /// 600 ms without the margin for clock drift, which the model does not have: the
    /// tightest setting), the real rules, commits of unknown fate. Failed activations
    /// are off (the tests turn them on: with them the rules before the fix of the
    /// model's finding fail "no stale read", ARCHITECTURE.md "The ownership model").
    pub fn new() -> Self {
        Ownership {
            nodes: 3,
            sets: 1,
            clients: 2,
            ops_per_client: 2,
            activations_per_set: 3,
            lease_trust: 2,
            take_over_wait: 2,
            rules: Rules::Real,
            faults: Faults {
                commit_fate_unknown: true,
                failed_activations: false,
                late_lease_landing: false,
            },
        }
    }

    /// The same with `rules`.
    pub fn with_rules(self, rules: Rules) -> Self {
        Ownership { rules, ..self }
    }

    /// The same with `faults`.
    pub fn with_faults(self, faults: Faults) -> Self {
        Ownership { faults, ..self }
    }

    /// Whether `bug` is planted.
    pub fn planted(&self, bug: Bug) -> bool {
        self.rules == Rules::Planted(bug)
    }

    /// Whether the nodes follow the real rules (the fix of defect 16 included), with a
    /// bug planted or not.
    pub fn fixed(&self) -> bool {
        matches!(self.rules, Rules::Real | Rules::Planted(_))
    }

    /// The longest duration any rule compares an age with; older is the same.
    pub fn horizon(&self) -> Age {
        self.lease_trust.max(self.take_over_wait)
    }
}

impl Default for Ownership {
    fn default() -> Self {
        Self::new()
    }
}

impl Model for Ownership {
    type State = State;
    type Action = Action;

    fn init_states(&self) -> Vec<State> {
        vec![self.initial()]
    }

    fn actions(&self, state: &State, actions: &mut Vec<Action>) {
        self.enabled(state, actions);
    }

    fn next_state(&self, state: &State, action: Action) -> Option<State> {
        self.apply(state, action)
    }

    fn properties(&self) -> Vec<Property<Self>> {
        properties::all()
    }
}
