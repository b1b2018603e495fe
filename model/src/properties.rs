//! What must always hold, and what must be reachable for the check to mean something.

use stateright::Property;

use crate::state::*;
use crate::Ownership;

/// The names of the `always` properties.
pub const ALWAYS: [&str; 3] = [AT_MOST_ONE_OWNER, NO_LOST_WRITE, NO_STALE_READ];

const AT_MOST_ONE_OWNER: &str = "at most one committing owner per epoch";
const NO_LOST_WRITE: &str = "no acknowledged write lost";
const NO_STALE_READ: &str = "no stale read";

/// Every property the checker evaluates in every state.
pub(crate) fn all() -> Vec<Property<Ownership>> {
    vec![
        Property::always(AT_MOST_ONE_OWNER, |_, s| at_most_one_committing_owner(s)),
        Property::always(NO_LOST_WRITE, |_, s| no_acknowledged_write_lost(s)),
        Property::always(NO_STALE_READ, |_, s| no_stale_read(s)),
        Property::sometimes("a new holder serves a set another node held", |m, s| {
            new_holder_serves(m, s)
        }),
        Property::sometimes("a write is acknowledged after a take-over", |_, s| {
            acked_after_take_over(s)
        }),
        Property::sometimes("a read returns a write acknowledged before it", |_, s| {
            read_after_ack(s)
        }),
        Property::sometimes("a deposed owner is asked to read", |m, s| {
            deposed_owner_reading(m, s)
        }),
        Property::sometimes("a stale commit is fenced", |_, s| fenced(s)),
    ]
}

/// Every commit that landed was sent under the set's lease epoch as it was then, by the
/// node that took that epoch. So no commit under a superseded epoch succeeds, and two
/// nodes never both commit under one epoch (ARCHITECTURE.md invariants 2, 10).
pub fn at_most_one_committing_owner(s: &State) -> bool {
    s.sets.iter().all(|row| {
        row.commits.iter().all(|c| {
            let holder = usize::from(c.epoch)
                .checked_sub(1)
                .and_then(|e| row.holders.get(e));
            c.epoch == c.lease && holder == Some(&c.node)
        })
    })
}

/// The store's value holds every write a client saw acknowledged (invariants 3, 11).
pub fn no_acknowledged_write_lost(s: &State) -> bool {
    s.sets
        .iter()
        .all(|row| row.acked & !writes_in(&row.value) == 0)
}

/// Every read returned every write acknowledged to anyone before the read reached the
/// node that answered it (DESIGN.md §7 invariant 6, ARCHITECTURE.md invariant 23).
pub fn no_stale_read(s: &State) -> bool {
    s.clients
        .iter()
        .all(|c| c.reads.iter().all(|r| r.floor & !r.seen == 0))
}

/// A serving actor holds an epoch whose previous epoch another node held.
fn new_holder_serves(m: &Ownership, s: &State) -> bool {
    (0..m.nodes).any(|node| {
        (0..m.sets).any(|set| {
            m.actor(s, node, set).is_some_and(|a| {
                let row = &s.sets[usize::from(set)];
                a.phase == Phase::Serving
                    && usize::from(a.epoch)
                        .checked_sub(2)
                        .and_then(|e| row.holders.get(e))
                        .is_some_and(|before| *before != node)
            })
        })
    })
}

/// An acknowledged write landed under an epoch whose previous epoch another node held.
fn acked_after_take_over(s: &State) -> bool {
    s.sets.iter().any(|row| {
        row.commits.iter().any(|c| {
            row.acked & bit(c.write) != 0
                && usize::from(c.epoch)
                    .checked_sub(2)
                    .and_then(|e| row.holders.get(e))
                    .is_some_and(|before| *before != c.node)
        })
    })
}

/// A read waits on the confirmation of an actor whose lease another node took: the
/// paused (or cut-off) owner that wakes believing it holds the set.
fn deposed_owner_reading(m: &Ownership, s: &State) -> bool {
    (0..m.nodes).any(|node| {
        (0..m.sets).any(|set| {
            m.actor(s, node, set).is_some_and(|a| {
                a.phase == Phase::Serving
                    && a.epoch < s.sets[usize::from(set)].epoch
                    && !a.reads.is_empty()
            })
        })
    })
}

/// A read was answered after some write had been acknowledged.
fn read_after_ack(s: &State) -> bool {
    s.clients
        .iter()
        .any(|c| c.reads.iter().any(|r| r.floor != 0))
}

/// The store refused a commit for its stale epoch.
fn fenced(s: &State) -> bool {
    s.net
        .iter()
        .any(|m| matches!(m, Msg::Committed { ok: false, .. }))
}
