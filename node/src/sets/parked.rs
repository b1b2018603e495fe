//! Held subscriptions of bucket sets whose actor stopped: compact waiter records.
//!
//! A set whose only activity is held subscriptions passivates like an idle one: after
//! `passivate_after` without a write or a read its actor hands its held subscriptions
//! here and stops, so a device waiting for a change costs its connection and its waiter
//! record (the held ids and versions, session and the answer's channel), not a running
//! actor with the set's buckets in memory (issue 17).
//!
//! The next activation of the set — whatever asks for it: a write, a read, a new
//! subscribe — takes the set's waiters back before it handles anything
//! ([`ParkedSets::take`], called where the registry starts the actor), and once the set is
//! loaded answers at once every waiter whose held version is no longer the stored one
//! (written elsewhere meanwhile). A write reaches the set only through its actor, so
//! every change after parking is seen by the activation that takes the waiters: no
//! notification is missed (invariant 35).
//!
//! Without an actor, what would have been the actor's business is done here: a waiter is
//! cancelled ([`ParkedSets::unsubscribe`]: timeout, closed connection); the set's access
//! changed, it was handed off or the node drains: its
//! waiters are answered empty ([`ParkedSets::release`]) and their clients subscribe again,
//! reaching the set's owner. When the node may have been away (paused, cut off), each
//! parked set's lease is read as an active actor confirms its own: the waiters of a set
//! whose epoch moved are dropped (their subscribers look again at the new owner, which
//! may have written meanwhile), the others stay parked ([`ParkedSets::epochs`],
//! [`ParkedSets::release_if_epoch`]). A waiter whose client left without its cancellation reaching
//! anyone (it was queued in the mailbox of the actor that parked) is dropped by the next
//! sweep, at most [`SWEEP_EVERY`] after the next parking.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;
use tokio::time::Instant;

use tether_proto::presence::Presence;
use tether_proto::SetKey;

use crate::metrics::Metrics;
use crate::sets::actor::HeldSub;
use crate::store::Epoch;

/// A parked set's waiters: nearly always one (its device's), kept inline.
pub(crate) type Waiters = smallvec::SmallVec<[(u64, Box<HeldSub>); 1]>;

/// The waiters of one parked set, and what its owner knew of its device.
#[derive(Debug)]
pub(crate) struct Parked {
    pub subs: Waiters,
    pub presence: Presence,
    /// The lease epoch the parking actor held.
    pub epoch: Epoch,
}

/// Waiters abandoned without a cancellation are looked for at most this often.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// The node's parked sets. A hash table rather than a B-tree: parking runs on the
/// stopping actor's thread, and a B-tree's nodes, allocated there one at a time as it
/// grows, would each pin a page of memory that actors' freed state once filled (glibc's
/// arena per thread; `actor::Subscribe::waiter` says more); a table grows as one block.
/// Where order matters, the keys are sorted.
#[derive(Debug)]
pub(crate) struct ParkedSets {
    sets: Mutex<HashMap<SetKey, Parked>>,
    swept: Mutex<Instant>,
    metrics: Metrics,
}

impl ParkedSets {
    pub fn new(metrics: Metrics) -> Self {
        ParkedSets {
            sets: Mutex::new(HashMap::new()),
            swept: Mutex::new(Instant::now()),
            metrics,
        }
    }

    fn sets(&self) -> std::sync::MutexGuard<'_, HashMap<SetKey, Parked>> {
        self.sets.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Keeps `parked` until the set's next activation. Called by the set's stopping actor,
    /// before the registry forgets it (so the next actor finds the waiters).
    pub fn park(&self, set: SetKey, mut parked: Parked) {
        let sweep = {
            let mut swept = self.swept.lock().unwrap_or_else(PoisonError::into_inner);
            let due = swept.elapsed() >= SWEEP_EVERY;
            if due {
                *swept = Instant::now();
            }
            due
        };
        let mut sets = self.sets();
        if sweep {
            self.sweep(&mut sets);
        }
        match sets.get_mut(&set) {
            // Cannot happen (the actor that parks took the set's waiters when it started);
            // kept whole if it does.
            Some(earlier) => earlier.subs.append(&mut parked.subs),
            None => {
                sets.insert(set, parked);
                self.metrics.parked_sets(1);
            }
        }
    }

    /// The set's waiters, for the actor starting now.
    pub fn take(&self, set: &SetKey) -> Option<Parked> {
        let taken = self.sets().remove(set);
        if taken.is_some() {
            self.metrics.parked_sets(-1);
        }
        taken
    }

    /// Cancels waiter `sub_id` of `set`; whether it was parked.
    pub fn unsubscribe(&self, set: &SetKey, sub_id: u64) -> bool {
        let mut sets = self.sets();
        let Some(parked) = sets.get_mut(set) else {
            return false;
        };
        let before = parked.subs.len();
        parked.subs.retain(|(id, _)| *id != sub_id);
        let removed = before - parked.subs.len();
        if parked.subs.is_empty() {
            sets.remove(set);
            self.metrics.parked_sets(-1);
        }
        self.metrics.subscriptions_held(-(removed as i64));
        removed > 0
    }

    /// Answers the waiters of `set` empty (their clients subscribe again); how many.
    pub fn release(&self, set: &SetKey) -> usize {
        let taken = self.take(set);
        taken.map_or(0, |p| self.retire(p, true))
    }

    /// Answers empty the waiters of every parked set `pred` names; how many sets.
    pub fn release_where(&self, pred: impl Fn(&SetKey) -> bool) -> usize {
        let taken: Vec<Parked> = {
            let mut sets = self.sets();
            let mut keys: Vec<SetKey> = sets.keys().filter(|s| pred(s)).cloned().collect();
            keys.sort_unstable();
            keys.iter().filter_map(|k| sets.remove(k)).collect()
        };
        self.metrics.parked_sets(-(taken.len() as i64));
        let n = taken.len();
        for p in taken {
            self.retire(p, true);
        }
        n
    }

    /// Every parked set with the epoch its parking actor held, by set.
    pub fn epochs(&self) -> Vec<(SetKey, Epoch)> {
        let mut epochs: Vec<(SetKey, Epoch)> = self
            .sets()
            .iter()
            .map(|(set, p)| (set.clone(), p.epoch))
            .collect();
        epochs.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        epochs
    }

    /// The epoch `set` is parked under, if it is parked.
    pub fn epoch_of(&self, set: &SetKey) -> Option<Epoch> {
        self.sets().get(set).map(|p| p.epoch)
    }

    /// Drops the waiters of `set` if it is still parked under `epoch` (a lease another
    /// node took since); how many. Not answered "nothing changed": the new owner may
    /// have written since; each waiter's subscriber looks again where the set is served
    /// now (chaos defect 18).
    pub fn release_if_epoch(&self, set: &SetKey, epoch: Epoch) -> usize {
        let taken = {
            let mut sets = self.sets();
            if sets.get(set).is_some_and(|p| p.epoch == epoch) {
                sets.remove(set)
            } else {
                None
            }
        };
        taken.map_or(0, |p| {
            self.metrics.parked_sets(-1);
            self.retire(p, false)
        })
    }

    /// Sets parked now.
    pub fn len(&self) -> usize {
        self.sets().len()
    }

    /// Ends the waiters of a set taken out of the index: answered "nothing changed" when
    /// `answer`, else dropped (each leg ends `NotOwner`); how many.
    fn retire(&self, parked: Parked, answer: bool) -> usize {
        let n = parked.subs.len();
        // Counted gone before a waiter can see its end.
        self.metrics.subscriptions_held(-(n as i64));
        if answer {
            for (_, sub) in parked.subs {
                sub.reply.finish(Vec::new());
            }
        }
        n
    }

    /// Drops the waiters nobody waits for any more (their answer's receiver is gone).
    fn sweep(&self, sets: &mut HashMap<SetKey, Parked>) {
        let mut gone = 0usize;
        let mut emptied = 0i64;
        sets.retain(|_, parked| {
            let before = parked.subs.len();
            parked.subs.retain(|(_, sub)| !sub.reply.is_closed());
            gone += before - parked.subs.len();
            let keep = !parked.subs.is_empty();
            emptied += i64::from(!keep);
            keep
        });
        if gone > 0 {
            self.metrics.subscriptions_held(-(gone as i64));
        }
        if emptied > 0 {
            self.metrics.parked_sets(-emptied);
        }
    }
}
