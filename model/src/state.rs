//! What the model remembers: the store, each node's actors, the messages in flight and
//! the clients with what they observed.
//!
//! Everything is small and ordered (`Vec`s kept sorted where order carries no meaning)
//! so that two states that differ only in bookkeeping hash alike.

/// A node (`Shared::node_id`).
pub type NodeId = u8;
/// A bucket set.
pub type SetId = u8;
/// A client (a device or app sending requests through any node).
pub type ClientId = u8;
/// A write, unique over the whole run: client `c`'s `k`-th operation is write
/// `c * ops_per_client + k`.
pub type WriteId = u8;
/// A set of writes, one bit per [`WriteId`].
pub type Writes = u16;
/// One activation of a set's actor: the n-th lease acquisition started for the set. It
/// tells a late answer meant for an actor that is gone from the actor now serving.
pub type Tag = u8;
/// Logical time since something happened, in ticks, saturated at the longest duration
/// the protocol compares with (so states that differ only in how long ago something
/// happened beyond that are one state).
pub type Age = u8;

/// The bit of `w` in a [`Writes`].
pub fn bit(w: WriteId) -> Writes {
    1 << w
}

/// The writes in a committed value.
pub fn writes_in(value: &[WriteId]) -> Writes {
    value.iter().fold(0, |acc, w| acc | bit(*w))
}

/// The whole system at one instant.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct State {
    /// Per set: the store's lease row and committed value, and what an observer recorded.
    pub sets: Vec<SetRow>,
    /// Per node and set (index `node * sets + set`): the set's actor on that node, if any.
    pub actors: Vec<Option<Actor>>,
    /// Per node and set: the last epoch an actor of the set served on that node (0:
    /// none). Kept only under [`crate::Rules::HandOverByEpoch`], the change the model
    /// proposes; the node has no such memory.
    pub served: Vec<u8>,
    /// Per node and set: how long ago a lease request of the node for the set failed
    /// without an answer (`Shared::uncertain_leases`), while that is less than
    /// `TAKE_OVER_WAIT` (`uncertain_until`); `None` otherwise. Kept only under
    /// [`crate::Rules::Real`] and its planted bugs.
    pub uncertain: Vec<Option<Age>>,
    /// Messages in flight, node to node and node to store, sorted (a multiset): any may
    /// be delivered next, late, or never.
    pub net: Vec<Msg>,
    /// Per client.
    pub clients: Vec<Client>,
}

/// One set in the shared store (`tether_leases` and the buckets), plus the history an
/// outside observer keeps (which node held each epoch, every commit that landed, every
/// write acknowledged). The protocol never reads the history; the properties do.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct SetRow {
    /// The lease epoch (0: never leased).
    pub epoch: u8,
    /// The node holding the lease (`tether_leases.owner`).
    pub holder: Option<NodeId>,
    /// The committed value: the writes in the order they were applied (its version is
    /// its length).
    pub value: Vec<WriteId>,
    /// History: `holders[e - 1]` took epoch `e`.
    pub holders: Vec<NodeId>,
    /// History: every commit the store applied.
    pub commits: Vec<Landed>,
    /// History: every write a client saw acknowledged.
    pub acked: Writes,
    /// Activations started for this set (the next [`Tag`]).
    pub activations: u8,
}

/// A commit the store applied.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub struct Landed {
    /// The committing node.
    pub node: NodeId,
    /// The epoch the commit was sent under.
    pub epoch: u8,
    /// The set's lease epoch when it landed.
    pub lease: u8,
    /// The write it carried.
    pub write: WriteId,
}

/// A `BucketSetActor` (`node/src/sets/actor.rs`).
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct Actor {
    /// Which activation of the set this actor is.
    pub tag: Tag,
    pub phase: Phase,
    /// The lease epoch it took (`epoch`; 0 until the store answered).
    pub epoch: u8,
    /// Its copy of the set (`committed`): loaded after the lease, then its own commits.
    pub memory: Vec<WriteId>,
    /// How long ago the newest store round trip that proved its lease was *sent*
    /// (`confirmed`): taking it, a commit under it, or a confirmation.
    pub confirmed: Age,
    /// The commit in flight (`committing`: one batch at a time).
    pub commit: Option<PendingCommit>,
    /// Reads waiting for a confirmation round trip (`under_lease` → `confirm_lease`).
    pub reads: Vec<PendingRead>,
}

/// Where an actor is in its life.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Phase {
    /// `started`: `acquire_lease` (and `load_set`) sent `taken` ago, no answer yet. No
    /// message is handled (`ctx.wait`).
    Acquiring { taken: Age },
    /// `Shared::take_over`: the lease was taken from `previous`, the store's answer
    /// arrived `acquired` ago; waiting for `previous` to confirm `Relinquish` or for
    /// `TAKE_OVER_WAIT`. Still no message handled. `previous` is the node itself when the
    /// store named no other: under [`crate::Rules::Real`] it waits until the node's mark
    /// of an unanswered lease request expires (`uncertain_until`), under
    /// [`crate::Rules::HandOverByEpoch`] for `TAKE_OVER_WAIT`.
    TakingOver {
        taken: Age,
        acquired: Age,
        previous: NodeId,
    },
    /// Loaded and serving.
    Serving,
    /// `Shutdown` handled (`shutting_down`): refuses every request, finishes its commit
    /// in flight, then stops.
    Stopping,
}

/// A commit sent to the store.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub struct PendingCommit {
    pub write: WriteId,
    /// The client waiting for its acknowledgement (`None` once answered).
    pub client: Option<ClientId>,
    /// How long ago it was sent (`started`).
    pub started: Age,
}

/// A read waiting for its confirmation round trip.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, PartialOrd, Ord)]
pub struct PendingRead {
    pub client: ClientId,
    /// The writes acknowledged to anyone when the read reached the node.
    pub floor: Writes,
    /// How long ago the confirmation was sent (`sent`).
    pub sent: Age,
}

/// A message in flight. Node-to-store requests are applied by the store when delivered;
/// the store's answer is another message.
#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord)]
pub enum Msg {
    /// `Store::acquire_lease` followed by `Store::load_set`.
    Acquire { set: SetId, node: NodeId, tag: Tag },
    /// Its answer: the new epoch, the previous holder if another node, the set.
    Acquired {
        set: SetId,
        node: NodeId,
        tag: Tag,
        epoch: u8,
        previous: Option<NodeId>,
        value: Vec<WriteId>,
    },
    /// `Store::commit(set, epoch, …)`: the actor's memory with one more write.
    Commit {
        set: SetId,
        node: NodeId,
        tag: Tag,
        epoch: u8,
        value: Vec<WriteId>,
    },
    /// Its answer: committed, or `StoreError::Fenced`.
    Committed {
        set: SetId,
        node: NodeId,
        tag: Tag,
        ok: bool,
    },
    /// `Store::lease_epoch(set)`, for `client`'s read.
    Confirm {
        set: SetId,
        node: NodeId,
        tag: Tag,
        client: ClientId,
    },
    /// Its answer: the set's lease epoch now.
    Confirmed {
        set: SetId,
        node: NodeId,
        tag: Tag,
        client: ClientId,
        epoch: u8,
    },
    /// The gRPC `Relinquish` from the new holder `from` (its activation `tag`) to the
    /// previous one, `to`, which held `epoch`.
    Relinquish {
        set: SetId,
        from: NodeId,
        to: NodeId,
        tag: Tag,
        epoch: u8,
    },
    /// Its answer: `from` no longer serves the set; `confirmed`: it vouches that nothing
    /// serves the set on its account, so the new holder serves at once (`relinquish`
    /// returning `true`). Under [`crate::Rules::Real`] not while the set's lease fate is
    /// unknown on `from`; under [`crate::Rules::HandOverByEpoch`] only if `from` served
    /// `epoch`; always under [`crate::Rules::BeforeDefect16`].
    Relinquished {
        set: SetId,
        from: NodeId,
        to: NodeId,
        tag: Tag,
        confirmed: bool,
    },
}

impl Msg {
    /// The actor an answer is for (`None` for a request: the store, or a node, takes it
    /// whatever it runs).
    pub fn addressee(&self) -> Option<(NodeId, SetId, Tag)> {
        match *self {
            Msg::Acquired { set, node, tag, .. }
            | Msg::Committed { set, node, tag, .. }
            | Msg::Confirmed { set, node, tag, .. } => Some((node, set, tag)),
            Msg::Relinquished { set, to, tag, .. } => Some((to, set, tag)),
            Msg::Acquire { .. }
            | Msg::Commit { .. }
            | Msg::Confirm { .. }
            | Msg::Relinquish { .. } => None,
        }
    }

    /// Whether `node` sends or receives it, or is named in it.
    pub fn mentions(&self, n: NodeId) -> bool {
        match *self {
            Msg::Acquire { node, .. }
            | Msg::Commit { node, .. }
            | Msg::Committed { node, .. }
            | Msg::Confirm { node, .. }
            | Msg::Confirmed { node, .. } => node == n,
            Msg::Acquired { node, previous, .. } => node == n || previous == Some(n),
            Msg::Relinquish { from, to, .. } | Msg::Relinquished { from, to, .. } => {
                from == n || to == n
            }
        }
    }
}

/// A client: it sends one request at a time, at most `ops_per_client` in all.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct Client {
    /// Requests sent so far.
    pub sent: u8,
    /// Waiting for an answer.
    pub busy: bool,
    /// What its reads returned.
    pub reads: Vec<Observation>,
}

/// A read's answer, as the stale-read check needs it.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub struct Observation {
    pub set: SetId,
    /// The writes acknowledged to anyone before the read reached the node.
    pub floor: Writes,
    /// The writes in the value it returned.
    pub seen: Writes,
}

/// A client's request.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Op {
    Read,
    Write,
}

/// One step of the system.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub enum Action {
    /// Logical time advances one tick.
    Tick,
    /// `node` comes to believe it owns `set` (its view says so, stale or not) and a
    /// request starts the set's actor there.
    Activate { node: NodeId, set: SetId },
    /// A message in flight is delivered (to the store, or to a node). One never
    /// delivered is lost: no step of its own, since a message in flight disables
    /// nothing.
    Deliver(Msg),
    /// `TAKE_OVER_WAIT` ran out before the previous holder confirmed.
    TakeOverWaitEnds { node: NodeId, set: SetId },
    /// The actor is told to stop (`Shutdown`): the view moved the set away
    /// (`hand_off_lost_sets`), the node drains, or the actor passivates.
    Stop { node: NodeId, set: SetId },
    /// A client's request reaches `node` (directly or forwarded by another).
    Request {
        client: ClientId,
        node: NodeId,
        set: SetId,
        op: Op,
    },
    /// Fault: a commit's store call passes its deadline (`StoreError::FateUnknown`): the
    /// write is answered 503 and the actor stops; the commit may still land.
    CommitFateUnknown { node: NodeId, set: SetId },
    /// Fault: an activation fails while its lease request may have landed or landed
    /// (its answer lost, or, before the fix of defect 16, the `load_set` after it
    /// failing): the actor stops.
    ActivationFails { node: NodeId, set: SetId },
    /// Fault, only with [`crate::Bug::LoadBeforeTakeOver`]: the lease was answered and
    /// the load after it fails before the take-over starts; the actor stops.
    LoadFails { node: NodeId, set: SetId },
}
