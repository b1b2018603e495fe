//! SWIM membership as a sans-IO state machine, on `foca` (see `DECISIONS.md`).
//!
//! Events in — [`Membership::join`], [`Membership::handle_data`],
//! [`Membership::handle_timer`], [`Membership::leave`] — each with `now`; outputs out —
//! [`Membership::poll_transmit`], [`Membership::poll_timeout`],
//! [`Membership::poll_event`] — and [`Membership::members`], the live view the ring is
//! built from. No socket, no clock, no task: the caller (the [`crate::driver`], or a
//! scenario test with a simulated clock) moves the bytes and the time.
//!
//! A member's identity is its [`Member`]: node id, gossip (gRPC) address, public URL
//! and incarnation. SWIM knows members by gossip address; a node that restarts on the
//! same address comes back with a higher incarnation, which wins the address over its
//! dead predecessor at once. A node declared down while alive (a partition) renews its
//! own incarnation and rejoins when it hears of it. Metadata is disseminated with the
//! identity itself, so it is on every node as soon as the member is.
//!
//! [`MembershipEvent`]s are per node id, not per identity: a restart or a rename is one
//! `MemberUp` with the new metadata, and `MemberDown` means no live identity of that
//! node id is left.
//!
//! Besides the live view it keeps the *last known* members ([`Membership::last_known`]):
//! every node seen alive, until it leaves for good — a graceful leave (drain), which
//! [`Membership::leave`] gossips as a farewell (a foca custom broadcast, so it spreads
//! like the leaver's own down update), or its address refusing a connection (the process
//! is gone). A member that only stopped answering stays: [`Membership::quorum`] counts
//! against it ([`crate::quorum`]).

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;
use std::net::SocketAddr;
use std::num::{NonZeroU8, NonZeroUsize};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use foca::{
    AccumulatingRuntime, BroadcastHandler, Foca, Invalidates, OwnedNotification, PeriodicParams,
    PostcardCodec, State, Timer,
};
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use crate::quorum::Quorum;
use crate::{ClusterError, Millis};

/// A node's stable name (e.g. the StatefulSet pod name): what the ring hashes.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct NodeId(Cow<'static, str>);

impl NodeId {
    /// A node id from any string.
    pub fn new(id: impl Into<String>) -> Self {
        Self(Cow::Owned(id.into()))
    }

    /// A node id from a literal, usable in `const`s (tests, scenario tables).
    pub const fn from_static(id: &'static str) -> Self {
        Self(Cow::Borrowed(id))
    }

    /// The id as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

/// What the cluster knows of a member: its identity and the metadata peers need.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Member {
    /// The node's stable name; placement hashes it.
    pub id: NodeId,
    /// Where peers reach its gRPC port (gossip and forwarding). An `ip:port` that the
    /// seeds resolve to, never a wildcard.
    pub gossip_addr: SocketAddr,
    /// The base URL devices are sent to for the sets it owns.
    pub public_url: String,
    /// Which life of the node this is. Higher wins: give a restarted node a larger one
    /// (e.g. its start time in ms since the epoch); SWIM bumps it by one when the node
    /// was declared down while alive and rejoins.
    pub incarnation: u64,
}

/// `foca` identity: a [`Member`], addressed by its gossip address.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
struct Ident(Member);

impl fmt::Debug for Ident {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}@{}#{}",
            self.0.id, self.0.gossip_addr, self.0.incarnation
        )
    }
}

impl Ident {
    /// Stands for a seed we know only by address: SWIM accepts an announce addressed
    /// to any identity of the receiver's address.
    fn seed(addr: SocketAddr) -> Self {
        Ident(Member {
            id: NodeId::from_static(""),
            gossip_addr: addr,
            public_url: String::new(),
            incarnation: 0,
        })
    }
}

impl foca::Identity for Ident {
    type Addr = SocketAddr;

    fn renew(&self) -> Option<Self> {
        let mut next = self.0.clone();
        next.incarnation = next.incarnation.checked_add(1)?;
        Some(Ident(next))
    }

    fn addr(&self) -> SocketAddr {
        self.0.gossip_addr
    }

    fn win_addr_conflict(&self, adversary: &Self) -> bool {
        (self.0.incarnation, &self.0.id) > (adversary.0.incarnation, &adversary.0.id)
    }
}

/// A change in the live view, per node id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MembershipEvent {
    /// The node joined, or came back with new metadata (a restart, a renewed
    /// incarnation). Carries its current metadata.
    MemberUp(Member),
    /// The node left or was declared down. Carries its last known metadata.
    MemberDown(Member),
    /// The node left the cluster for good: it drained (its farewell arrived) or its
    /// address refused a connection (its process is gone). It no longer counts among the
    /// last known members ([`Membership::quorum`]); it comes back with its next
    /// `MemberUp` (a restart). Follows or precedes its `MemberDown`.
    MemberLeft(Member),
}

/// SWIM timing and dissemination knobs. [`MembershipConfig::lan`] is the default.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MembershipConfig {
    /// How often each node probes one member.
    pub probe_period: Duration,
    /// How long a direct probe waits for its ack before asking others to probe.
    pub probe_rtt: Duration,
    /// How many members are asked to probe indirectly.
    pub num_indirect_probes: usize,
    /// How long a suspect has to refute before it is declared down.
    pub suspect_to_down_after: Duration,
    /// How often pending updates are gossiped (piggybacking aside).
    pub gossip_interval: Duration,
    /// How many members each gossip round goes to.
    pub gossip_fanout: usize,
    /// How many times each update is sent before it is dropped.
    pub max_transmissions: u8,
    /// How often a node announces itself to a random live member and to down members
    /// (heals partial views and partitions).
    pub announce_interval: Duration,
    /// How often a connected node re-announces itself to its seeds (heals a split into
    /// two clusters that both forgot the other).
    pub seed_announce_interval: Duration,
    /// How often a node that knows no live peer announces itself to its seeds and the
    /// members it knows as down.
    pub rejoin_interval: Duration,
    /// How long a down member is remembered (refusing its stale identity, announcing to
    /// it).
    pub remove_down_after: Duration,
    /// Largest frame sent or accepted, in bytes.
    pub max_frame_size: usize,
    /// Declare a member down as soon as its address refuses a connection (its process is
    /// gone; a slow or paused process still accepts), without waiting for the probe and
    /// suspicion timeouts. Timeouts alone still need `suspect_to_down_after`.
    pub down_on_refusal: bool,
}

impl Default for MembershipConfig {
    fn default() -> Self {
        Self::lan()
    }
}

impl MembershipConfig {
    /// Settings for a cluster on one network: failures detected in a few seconds.
    pub fn lan() -> Self {
        Self {
            // Probing often is cheap and finds a killed peer's refusal sooner; declaring a
            // silent (maybe only slow) peer down still takes the whole suspicion timeout.
            probe_period: Duration::from_millis(500),
            probe_rtt: Duration::from_millis(300),
            num_indirect_probes: 3,
            suspect_to_down_after: Duration::from_millis(3000),
            gossip_interval: Duration::from_millis(200),
            gossip_fanout: 3,
            max_transmissions: 8,
            announce_interval: Duration::from_secs(5),
            seed_announce_interval: Duration::from_secs(30),
            rejoin_interval: Duration::from_secs(2),
            remove_down_after: Duration::from_secs(15 * 60),
            max_frame_size: 16 * 1024,
            down_on_refusal: true,
        }
    }

    /// The longest a crashed member of a `cluster_size`-node cluster stays in any live
    /// node's view: one full probe round to be picked, one period to miss its ack, the
    /// suspicion timeout, and a few gossip rounds to reach everyone.
    pub fn failure_detection_bound(&self, cluster_size: usize) -> Duration {
        let rounds = u32::try_from(cluster_size.max(1) + 1).unwrap_or(u32::MAX);
        self.probe_period.saturating_mul(rounds)
            + self.suspect_to_down_after
            + self.gossip_interval.saturating_mul(3)
    }

    fn to_foca(&self) -> Result<foca::Config, ClusterError> {
        let nz = |n: usize, what: &str| {
            NonZeroUsize::new(n).ok_or_else(|| ClusterError::InvalidConfig(format!("{what} is 0")))
        };
        if self.probe_rtt >= self.probe_period {
            return Err(ClusterError::InvalidConfig(
                "probe_rtt must be shorter than probe_period".into(),
            ));
        }
        Ok(foca::Config {
            probe_period: self.probe_period,
            probe_rtt: self.probe_rtt,
            num_indirect_probes: nz(self.num_indirect_probes, "num_indirect_probes")?,
            max_transmissions: NonZeroU8::new(self.max_transmissions)
                .ok_or_else(|| ClusterError::InvalidConfig("max_transmissions is 0".into()))?,
            suspect_to_down_after: self.suspect_to_down_after,
            remove_down_after: self.remove_down_after,
            max_packet_size: nz(self.max_frame_size, "max_frame_size")?,
            notify_down_members: true,
            periodic_announce: Some(PeriodicParams {
                frequency: self.announce_interval,
                num_members: nz(1, "")?,
            }),
            periodic_announce_to_down_members: Some(PeriodicParams {
                frequency: self.announce_interval,
                num_members: nz(2, "")?,
            }),
            periodic_gossip: Some(PeriodicParams {
                frequency: self.gossip_interval,
                num_members: nz(self.gossip_fanout, "gossip_fanout")?,
            }),
        })
    }
}

type Swim = Foca<Ident, PostcardCodec, StdRng, Farewells>;

/// At most this many departures are remembered (node ids of a cluster's life; a flood
/// of forged ones would need the cluster secret anyway).
const MAX_DEPARTED: usize = 4096;

/// A farewell: node `id` in its life `incarnation` (or an earlier one) left gracefully.
/// Encoded as the incarnation (8 bytes, big-endian) followed by the id in UTF-8.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Farewell {
    id: NodeId,
    incarnation: u64,
}

impl Farewell {
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(8 + self.id.as_str().len());
        out.extend_from_slice(&self.incarnation.to_be_bytes());
        out.extend_from_slice(self.id.as_str().as_bytes());
        out
    }

    fn decode(data: &[u8]) -> Result<Farewell, ClusterError> {
        let bad = |why: &str| ClusterError::MalformedFrame(format!("farewell: {why}"));
        let (inc, id) = data.split_at_checked(8).ok_or_else(|| bad("too short"))?;
        let incarnation = u64::from_be_bytes(inc.try_into().map_err(|_| bad("too short"))?);
        let id = std::str::from_utf8(id).map_err(|_| bad("id is not UTF-8"))?;
        if id.is_empty() {
            return Err(bad("empty id"));
        }
        Ok(Farewell {
            id: NodeId::new(id),
            incarnation,
        })
    }
}

impl Invalidates for Farewell {
    fn invalidates(&self, other: &Self) -> bool {
        self.id == other.id && self.incarnation >= other.incarnation
    }
}

/// Departures (farewells received, refusals seen): node id → the latest incarnation
/// that departed. Shared between the foca broadcast handler and [`Membership`].
type Departed = Arc<Mutex<BTreeMap<NodeId, u64>>>;

fn record_departure(departed: &Departed, id: &NodeId, incarnation: u64) -> bool {
    let mut map = departed.lock().unwrap_or_else(PoisonError::into_inner);
    if map.get(id).is_some_and(|&known| known >= incarnation) {
        return false;
    }
    if map.len() >= MAX_DEPARTED && !map.contains_key(id) {
        return false;
    }
    map.insert(id.clone(), incarnation);
    true
}

/// foca's handler of our one custom broadcast, the farewell: new ones are recorded and
/// disseminated further, known ones dropped.
struct Farewells(Departed);

impl BroadcastHandler<Ident> for Farewells {
    type Key = Farewell;
    type Error = ClusterError;

    fn receive_item(
        &mut self,
        data: &[u8],
        _sender: Option<&Ident>,
    ) -> Result<Option<Farewell>, ClusterError> {
        let farewell = Farewell::decode(data)?;
        Ok(record_departure(&self.0, &farewell.id, farewell.incarnation).then_some(farewell))
    }
}

/// A pending foca timer.
struct Pending {
    at: Millis,
    seq: u64,
    timer: Timer<Ident>,
}

/// One node's view of the cluster and its SWIM protocol state.
pub struct Membership {
    swim: Swim,
    runtime: AccumulatingRuntime<Ident>,
    config: MembershipConfig,
    timers: Vec<Pending>,
    timer_seq: u64,
    seeds: Vec<SocketAddr>,
    next_seed_announce: Option<Millis>,
    /// Live peers (not this node), by node id.
    view: BTreeMap<NodeId, Member>,
    /// Last known peers: seen alive and not departed (drained, or process gone).
    known: BTreeMap<NodeId, Member>,
    /// Departures: farewells gossiped to us (through foca) and refusals we saw.
    departed: Departed,
    events: VecDeque<MembershipEvent>,
    transmits: VecDeque<(SocketAddr, Bytes)>,
}

impl fmt::Debug for Membership {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Membership")
            .field("local", self.swim.identity())
            .field("peers", &self.view.keys().collect::<Vec<_>>())
            .field("seeds", &self.seeds)
            .field("timers", &self.timers.len())
            .finish()
    }
}

fn millis(d: Duration) -> Millis {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl Membership {
    /// A node alone, not yet joined. `rng_seed` drives SWIM's random choices: give
    /// each node a different one (tests fix it to replay a run).
    pub fn new(
        local: Member,
        config: MembershipConfig,
        rng_seed: u64,
    ) -> Result<Self, ClusterError> {
        let departed = Departed::default();
        let swim = Foca::with_custom_broadcast(
            Ident(local),
            config.to_foca()?,
            StdRng::seed_from_u64(rng_seed),
            PostcardCodec,
            Farewells(departed.clone()),
        );
        Ok(Self {
            swim,
            runtime: AccumulatingRuntime::new(),
            config,
            timers: Vec::new(),
            timer_seq: 0,
            seeds: Vec::new(),
            next_seed_announce: None,
            view: BTreeMap::new(),
            known: BTreeMap::new(),
            departed,
            events: VecDeque::new(),
            transmits: VecDeque::new(),
        })
    }

    /// This node as the cluster sees it (its incarnation may have been renewed).
    pub fn local(&self) -> &Member {
        &self.swim.identity().0
    }

    /// The configuration in force.
    pub fn config(&self) -> &MembershipConfig {
        &self.config
    }

    /// Joins through `seed` (an address from `--join`): announces this node to it now,
    /// and keeps re-announcing to every seed given so far (often while alone, rarely
    /// once connected). A seed equal to this node's own address is ignored.
    pub fn join(&mut self, seed: SocketAddr, now: Millis) -> Result<(), ClusterError> {
        if seed == self.local().gossip_addr {
            return Ok(());
        }
        if !self.seeds.contains(&seed) {
            self.seeds.push(seed);
        }
        let result = self.swim.announce(Ident::seed(seed), &mut self.runtime);
        if self.next_seed_announce.is_none() {
            self.next_seed_announce = Some(now.saturating_add(millis(self.config.rejoin_interval)));
        }
        self.pump(now);
        result.map_err(Into::into)
    }

    /// Feeds a frame received from `from`. Errors are for logging: a bad frame
    /// changes nothing.
    pub fn handle_data(
        &mut self,
        from: SocketAddr,
        data: &[u8],
        now: Millis,
    ) -> Result<(), ClusterError> {
        if data.len() > self.config.max_frame_size {
            return Err(ClusterError::FrameTooLarge {
                len: data.len(),
                max: self.config.max_frame_size,
            });
        }
        let result = self.swim.handle_data(data, &mut self.runtime);
        self.pump(now);
        result.map_err(|e| {
            tracing::trace!(%from, error = %e, "gossip frame refused");
            e.into()
        })
    }

    /// Fires every timer due at `now` (probes, suspicion, gossip, seed announces).
    pub fn handle_timer(&mut self, now: Millis) {
        // Timers fired may schedule timers due at once; bound the loop all the same.
        for _ in 0..1024 {
            let mut due: Vec<Pending> = Vec::new();
            let mut i = 0;
            while i < self.timers.len() {
                if self.timers[i].at <= now {
                    due.push(self.timers.swap_remove(i));
                } else {
                    i += 1;
                }
            }
            if due.is_empty() {
                break;
            }
            // foca wants, among timers due together, indirect probes before the next
            // probe (`Timer`'s `Ord`); then by deadline and submission order.
            due.sort_by(|a, b| (a.at, &a.timer, a.seq).cmp(&(b.at, &b.timer, b.seq)));
            for p in due {
                if let Err(e) = self.swim.handle_timer(p.timer, &mut self.runtime) {
                    tracing::debug!(error = %e, "gossip timer");
                }
            }
            self.pump(now);
        }
        if let Some(at) = self.next_seed_announce {
            if at <= now {
                self.announce_to_seeds(now);
            }
        }
    }

    fn announce_to_seeds(&mut self, now: Millis) {
        let alone = self.swim.num_members() == 0;
        let mut targets: Vec<Ident> = self.seeds.iter().copied().map(Ident::seed).collect();
        if alone {
            // Also the members we know as down: after a partition they are the cluster.
            targets.extend(
                self.swim
                    .iter_membership_state()
                    .filter(|m| m.state() == State::Down)
                    .map(|m| m.id().clone()),
            );
        }
        for target in targets {
            if let Err(e) = self.swim.announce(target, &mut self.runtime) {
                tracing::debug!(error = %e, "announce");
            }
        }
        let every = if alone {
            self.config.rejoin_interval
        } else {
            self.config.seed_announce_interval
        };
        self.next_seed_announce = Some(now.saturating_add(millis(every)));
        self.pump(now);
    }

    /// A connection to `addr` was refused: the process of every member at that address is
    /// gone. Declares them down now and gossips it (a node that is in fact alive, e.g.
    /// restarted on the same address, comes back with a newer incarnation). Does nothing
    /// unless [`MembershipConfig::down_on_refusal`].
    pub fn peer_refused(&mut self, addr: SocketAddr, now: Millis) {
        if !self.config.down_on_refusal {
            return;
        }
        // Whatever its state here (another node may have declared it down already), a
        // member at that address is gone for good: it no longer counts for the quorum —
        // here, and on every peer, told with a farewell on its behalf (a peer that only
        // hears it is down would go on counting it).
        let refused: Vec<Farewell> = self
            .known
            .values()
            .filter(|m| m.gossip_addr == addr)
            .map(|m| Farewell {
                id: m.id.clone(),
                incarnation: m.incarnation,
            })
            .collect();
        for farewell in refused {
            if let Err(e) = self.swim.add_broadcast(&farewell.encode()) {
                tracing::debug!(error = %e, "farewell of a refusing peer");
                record_departure(&self.departed, &farewell.id, farewell.incarnation);
            }
        }
        let gone: Vec<foca::Member<Ident>> = self
            .swim
            .iter_membership_state()
            .filter(|m| m.state() != State::Down && m.id().0.gossip_addr == addr)
            .map(|m| foca::Member::new(m.id().clone(), m.incarnation(), State::Down))
            .collect();
        if gone.is_empty() {
            self.refresh_view();
            return;
        }
        tracing::info!(%addr, "peer refused the connection: declared down");
        if let Err(e) = self
            .swim
            .apply_many(gone.into_iter(), true, &mut self.runtime)
        {
            tracing::debug!(error = %e, "declaring a refusing peer down");
        }
        self.pump(now);
    }

    /// Leaves gracefully (drain): tells peers at once, so they need not detect it.
    /// Flush [`poll_transmit`](Self::poll_transmit) before stopping.
    pub fn leave(&mut self, now: Millis) -> Result<(), ClusterError> {
        // The farewell rides with the leave's own down update (and spreads like it), so
        // peers forget this node rather than count it as unreachable.
        let farewell = Farewell {
            id: self.local().id.clone(),
            incarnation: self.local().incarnation,
        };
        if let Err(e) = self.swim.add_broadcast(&farewell.encode()) {
            tracing::debug!(error = %e, "farewell");
        }
        let result = self.swim.leave_cluster(&mut self.runtime);
        self.next_seed_announce = None;
        self.pump(now);
        self.timers.clear();
        result.map_err(Into::into)
    }

    /// The next frame to send, and where.
    pub fn poll_transmit(&mut self) -> Option<(SocketAddr, Bytes)> {
        self.transmits.pop_front()
    }

    /// When [`handle_timer`](Self::handle_timer) next needs calling.
    pub fn poll_timeout(&self) -> Option<Millis> {
        self.timers
            .iter()
            .map(|p| p.at)
            .chain(self.next_seed_announce)
            .min()
    }

    /// The next change in the live view.
    pub fn poll_event(&mut self) -> Option<MembershipEvent> {
        self.events.pop_front()
    }

    /// The live members, this node included, sorted by id: what the ring is built from.
    pub fn members(&self) -> Vec<Member> {
        let mut all: Vec<Member> = self.view.values().cloned().collect();
        all.push(self.local().clone());
        all.sort_by(|a, b| a.id.cmp(&b.id));
        all
    }

    /// Whether this node knows at least one live peer.
    pub fn is_connected(&self) -> bool {
        !self.view.is_empty()
    }

    /// The last known members, this node included: every node seen alive that has not
    /// left for good (drained, or its address refused a connection).
    pub fn last_known(&self) -> BTreeSet<NodeId> {
        self.known
            .keys()
            .cloned()
            .chain(std::iter::once(self.local().id.clone()))
            .collect()
    }

    /// Whether this node reaches a strict majority of its last known members
    /// ([`crate::quorum`]): the live view (this node included) against
    /// [`last_known`](Self::last_known).
    pub fn quorum(&self) -> Quorum {
        let reachable: BTreeSet<NodeId> = self.members().into_iter().map(|m| m.id).collect();
        Quorum::of(&self.last_known(), &reachable)
    }

    /// Moves foca's outputs into ours and turns identity changes into per-node events.
    fn pump(&mut self, now: Millis) {
        while let Some((to, data)) = self.runtime.to_send() {
            self.transmits.push_back((to.0.gossip_addr, data));
        }
        while let Some((after, timer)) = self.runtime.to_schedule() {
            self.timer_seq += 1;
            self.timers.push(Pending {
                at: now.saturating_add(millis(after)),
                seq: self.timer_seq,
                timer,
            });
        }
        while let Some(n) = self.runtime.to_notify() {
            match n {
                OwnedNotification::Rejoin(id) => {
                    tracing::info!(identity = ?id, "declared down while alive; rejoined");
                }
                OwnedNotification::Defunct => {
                    tracing::warn!("declared down and unable to renew identity");
                }
                other => tracing::trace!(notification = ?other, "gossip"),
            }
        }
        self.refresh_view();
    }

    fn refresh_view(&mut self) {
        let local_id = self.local().id.clone();
        let mut live: BTreeMap<NodeId, Member> = BTreeMap::new();
        for m in self.swim.iter_members() {
            let member = &m.id().0;
            if member.id == local_id {
                // A previous life of this node, still in flight; we speak for ourselves.
                continue;
            }
            let newer = live
                .get(&member.id)
                .is_none_or(|known| member.incarnation > known.incarnation);
            if newer {
                live.insert(member.id.clone(), member.clone());
            }
        }
        for (id, old) in &self.view {
            if !live.contains_key(id) {
                self.events
                    .push_back(MembershipEvent::MemberDown(old.clone()));
            }
        }
        for (id, new) in &live {
            if self.view.get(id) != Some(new) {
                self.events
                    .push_back(MembershipEvent::MemberUp(new.clone()));
            }
        }
        self.view = live;
        self.refresh_known();
    }

    /// Live members join the last known ones (a restart's newer life again); departed
    /// ones leave them, each with a `MemberLeft`.
    fn refresh_known(&mut self) {
        let departed = self
            .departed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let gone = |m: &Member| departed.get(&m.id).is_some_and(|&inc| inc >= m.incarnation);
        for (id, m) in &self.view {
            if !gone(m) {
                self.known.insert(id.clone(), m.clone());
            }
        }
        let left: Vec<Member> = self.known.values().filter(|m| gone(m)).cloned().collect();
        for m in left {
            self.known.remove(&m.id);
            self.events.push_back(MembershipEvent::MemberLeft(m));
        }
    }
}
