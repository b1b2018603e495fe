//! Placement of bucket sets on live members: consistent hashing with virtual nodes.
//!
//! A [`Ring`] is a pure function of its member list and its virtual-node count: every
//! node that sees the same membership computes the same owner for every key, whatever
//! the order it learnt the members in (members are sorted and deduplicated before they
//! are hashed, and `hashring`'s hasher is SipHash with fixed keys). A join or a leave
//! moves about 1/N of the keys — only those whose nearest virtual node changed.

use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use hashring::HashRing;

use crate::membership::{Member, NodeId};
use crate::quorum::Quorum;
use crate::Placement;

/// One point of a member on the ring. Its position is the hash of (node id, replica).
#[derive(Clone, PartialEq, Eq)]
struct VNode {
    node: NodeId,
    replica: u32,
}

impl Hash for VNode {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.node.as_str().hash(state);
        self.replica.hash(state);
    }
}

/// Maps bucket set keys to the member that owns them.
#[derive(Clone)]
pub struct Ring {
    ring: HashRing<VNode>,
    members: Vec<NodeId>,
    vnodes: u32,
}

impl Ring {
    /// Virtual nodes per member by default: with 256, each member's share of the keys
    /// is within a few percent of 1/N, so a join or leave moves close to 1/N of them.
    pub const DEFAULT_VNODES: u32 = 256;

    /// The ring over `members` (any order, duplicates ignored) with `vnodes` points each
    /// (at least one).
    pub fn new(members: impl IntoIterator<Item = NodeId>, vnodes: u32) -> Self {
        let mut members: Vec<NodeId> = members.into_iter().collect();
        members.sort();
        members.dedup();
        let vnodes = vnodes.max(1);
        let mut ring = HashRing::new();
        ring.batch_add(
            members
                .iter()
                .flat_map(|node| {
                    (0..vnodes).map(move |replica| VNode {
                        node: node.clone(),
                        replica,
                    })
                })
                .collect(),
        );
        Self {
            ring,
            members,
            vnodes,
        }
    }

    /// The member that owns `set_key`, or `None` on an empty ring.
    pub fn owner(&self, set_key: &str) -> Option<NodeId> {
        self.ring.get(&set_key).map(|v| v.node.clone())
    }

    /// The members on the ring, sorted.
    pub fn members(&self) -> &[NodeId] {
        &self.members
    }

    /// Virtual nodes per member.
    pub fn vnodes(&self) -> u32 {
        self.vnodes
    }

    /// Whether the ring has no member (then nothing has an owner).
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }
}

impl std::fmt::Debug for Ring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ring")
            .field("members", &self.members)
            .field("vnodes", &self.vnodes)
            .finish()
    }
}

/// The ring and each member's public URL, as of one membership view.
#[derive(Debug)]
struct RingView {
    ring: Ring,
    members: BTreeMap<NodeId, Member>,
    /// Whether this view reaches a majority of the last known members: without one, this
    /// node places sets on itself only for lack of anyone else, and must not serve them.
    quorum: Quorum,
}

/// [`Placement`] for a cluster: the owner's public URL, from the latest membership view.
///
/// The membership driver calls [`RingPlacement::update`] on every change; readers get
/// the view as of their call (a cheap `Arc` clone under a read lock).
#[derive(Debug)]
pub struct RingPlacement {
    local: Member,
    vnodes: u32,
    view: RwLock<Arc<RingView>>,
    retired: AtomicBool,
    /// Members that left the view (drained, declared down), newest last, at most
    /// [`DEPARTED`]: a node taking over one's sets can still ask it to stop serving them.
    departed: Mutex<Vec<Member>>,
}

/// How many departed members [`RingPlacement::last_known`] remembers.
const DEPARTED: usize = 64;

impl RingPlacement {
    /// Placement that, until the first [`update`](Self::update), owns everything itself.
    pub fn new(local: Member, vnodes: u32) -> Self {
        let view = Self::build(std::slice::from_ref(&local), vnodes, Quorum::ALONE);
        Self {
            local,
            vnodes,
            view: RwLock::new(Arc::new(view)),
            retired: AtomicBool::new(false),
            departed: Mutex::new(Vec::new()),
        }
    }

    fn build(members: &[Member], vnodes: u32, quorum: Quorum) -> RingView {
        RingView {
            ring: Ring::new(members.iter().map(|m| m.id.clone()), vnodes),
            members: members.iter().map(|m| (m.id.clone(), m.clone())).collect(),
            quorum,
        }
    }

    fn current(&self) -> Arc<RingView> {
        self.view
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Replaces the view with the live `members` (this node included or not: it is
    /// always on its own ring while it serves), keeping the quorum as it was.
    pub fn update(&self, members: &[Member]) {
        let quorum = self.current().quorum;
        self.set_view(members, quorum);
    }

    /// Replaces the view with the live `members` and whether they are a `quorum` of the
    /// last known members, in one step: a reader never sees the ring of a minority
    /// (every set on this node) without its lack of quorum.
    pub fn set_view(&self, members: &[Member], quorum: Quorum) {
        let mut all: Vec<Member> = members
            .iter()
            .filter(|m| m.id != self.local.id)
            .cloned()
            .collect();
        // A retired (draining) node places nothing on itself while anyone else is left.
        if !self.retired.load(Ordering::Acquire) || all.is_empty() {
            all.push(self.local.clone());
        }
        let view = Arc::new(Self::build(&all, self.vnodes, quorum));
        let old = std::mem::replace(
            &mut *self.view.write().unwrap_or_else(PoisonError::into_inner),
            view.clone(),
        );
        let mut departed = self.departed.lock().unwrap_or_else(PoisonError::into_inner);
        departed.retain(|m| !view.members.contains_key(&m.id));
        for m in old.members.values() {
            if !view.members.contains_key(&m.id) {
                departed.retain(|d| d.id != m.id);
                departed.push(m.clone());
            }
        }
        let excess = departed.len().saturating_sub(DEPARTED);
        departed.drain(..excess);
    }

    /// The member named `id` in the current view, or as it was when it last left the
    /// view (a drained or unreachable node may still be running).
    pub fn last_known(&self, id: &str) -> Option<Member> {
        self.member(id).or_else(|| {
            self.departed
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .iter()
                .rev()
                .find(|m| m.id.as_str() == id)
                .cloned()
        })
    }

    /// Drain: from now on every key goes to the other members (this node keeps only
    /// what nobody else can take, i.e. everything when it is alone).
    pub fn retire(&self) {
        self.retired.store(true, Ordering::Release);
        let members: Vec<Member> = self.current().members.values().cloned().collect();
        self.update(&members);
    }

    /// The ring of the current view.
    pub fn ring(&self) -> Ring {
        self.current().ring.clone()
    }

    /// The member owning `set_key` in the current view.
    pub fn owner(&self, set_key: &str) -> Member {
        let view = self.current();
        view.ring
            .owner(set_key)
            .and_then(|id| view.members.get(&id).cloned())
            .unwrap_or_else(|| self.local.clone())
    }

    /// The live members of the current view (this node included while it serves).
    pub fn members(&self) -> Vec<Member> {
        self.current().members.values().cloned().collect()
    }

    /// This node.
    pub fn local(&self) -> &Member {
        &self.local
    }

    /// The live member named `id` in the current view.
    pub fn member(&self, id: &str) -> Option<Member> {
        self.current().members.get(&NodeId::new(id)).cloned()
    }

    /// Whether this node owns `set_key` in the current view.
    pub fn is_local(&self, set_key: &str) -> bool {
        self.owner(set_key).id == self.local.id
    }

    /// The quorum of the current view ([`crate::quorum`]).
    pub fn quorum(&self) -> Quorum {
        self.current().quorum
    }

    /// Whether this node may serve `set_key` now (take its lease): `Ok(true)` when it
    /// owns it in the current view, `Ok(false)` when another member does, `Err` with the
    /// counts when the view has no quorum — as of one view, read once.
    pub fn serves(&self, set_key: &str) -> Result<bool, Quorum> {
        let view = self.current();
        if !view.quorum.holds() {
            return Err(view.quorum);
        }
        Ok(view
            .ring
            .owner(set_key)
            .is_none_or(|id| id == self.local.id))
    }
}

impl Placement for RingPlacement {
    fn sync_url(&self, set_key: &str) -> String {
        self.owner(set_key).public_url
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use proptest::prelude::*;

    use super::*;

    const KEYS: usize = 10_000;

    fn ids(n: usize) -> Vec<NodeId> {
        (1..=n)
            .map(|i| NodeId::new(format!("tether-{i}")))
            .collect()
    }

    fn keys() -> Vec<String> {
        (0..KEYS).map(|i| format!("{:08X}", i * 7919)).collect()
    }

    fn moved(before: &Ring, after: &Ring, keys: &[String]) -> usize {
        keys.iter()
            .filter(|k| before.owner(k) != after.owner(k))
            .count()
    }

    #[test]
    fn join_moves_at_most_one_nth_of_keys_plus_20_percent() {
        let keys = keys();
        for n in [3usize, 4, 5] {
            let before = Ring::new(ids(n), Ring::DEFAULT_VNODES);
            let after = Ring::new(ids(n + 1), Ring::DEFAULT_VNODES);
            let moved = moved(&before, &after, &keys);
            let bound = KEYS as f64 / (n + 1) as f64 * 1.2;
            eprintln!(
                "join {n}->{}: moved {moved} of {KEYS} (bound {bound:.0})",
                n + 1
            );
            assert!(
                moved as f64 <= bound,
                "join {n}→{}: moved {moved} > {bound}",
                n + 1
            );
            // Every moved key went to the new member: nothing moves between old members.
            let newcomer = NodeId::new(format!("tether-{}", n + 1));
            for k in &keys {
                if before.owner(k) != after.owner(k) {
                    assert_eq!(after.owner(k).as_ref(), Some(&newcomer));
                }
            }
        }
    }

    #[test]
    fn leave_moves_at_most_one_nth_of_keys_plus_20_percent() {
        let keys = keys();
        for n in [3usize, 4, 5] {
            let before = Ring::new(ids(n), Ring::DEFAULT_VNODES);
            for leaver in ids(n) {
                let after = Ring::new(
                    ids(n).into_iter().filter(|id| *id != leaver),
                    Ring::DEFAULT_VNODES,
                );
                let moved = moved(&before, &after, &keys);
                let bound = KEYS as f64 / n as f64 * 1.2;
                eprintln!("{leaver} leaving {n}: moved {moved} of {KEYS} (bound {bound:.0})");
                assert!(
                    moved as f64 <= bound,
                    "{leaver} leaving {n}: moved {moved} > {bound}"
                );
                // Only the leaver's keys moved.
                for k in &keys {
                    if before.owner(k) != after.owner(k) {
                        assert_eq!(before.owner(k).as_ref(), Some(&leaver));
                    }
                }
            }
        }
    }

    #[test]
    fn empty_ring_owns_nothing_and_single_member_owns_everything() {
        assert_eq!(Ring::new([], 16).owner("x"), None);
        let one = Ring::new([NodeId::new("a")], 16);
        assert!(keys()
            .iter()
            .all(|k| one.owner(k) == Some(NodeId::new("a"))));
    }

    proptest! {
        #[test]
        fn owners_are_identical_on_every_node_given_the_same_membership(
            order in Just(ids(5)).prop_shuffle(),
            dup in 0usize..5,
            key in "[0-9A-F]{8}",
        ) {
            // A node that learnt the members in another order, or twice, agrees.
            let reference = Ring::new(ids(5), Ring::DEFAULT_VNODES);
            let mut seen = order.clone();
            seen.push(order[dup].clone());
            let other = Ring::new(seen, Ring::DEFAULT_VNODES);
            prop_assert_eq!(reference.owner(&key), other.owner(&key));
        }
    }

    #[test]
    fn owners_are_stable_across_processes() {
        // Fixed expectations: a change of hasher or vnode scheme would silently move
        // every set between nodes running different builds.
        let ring = Ring::new(ids(3), Ring::DEFAULT_VNODES);
        let owners: Vec<String> = ["01AA02AB", "7f3a", "device-x"]
            .iter()
            .map(|k| ring.owner(k).map(|o| o.to_string()).unwrap_or_default())
            .collect();
        assert_eq!(owners, GOLDEN_OWNERS);
    }

    const GOLDEN_OWNERS: [&str; 3] = ["tether-2", "tether-1", "tether-3"];

    fn member(id: &str, port: u16) -> Member {
        Member {
            id: NodeId::new(id),
            gossip_addr: SocketAddr::from(([127, 0, 0, 1], port)),
            public_url: format!("http://127.0.0.1:{}", port + 1000),
            incarnation: 1,
        }
    }

    #[test]
    fn ring_placement_answers_the_owners_public_url() {
        let a = member("a", 7001);
        let b = member("b", 7002);
        let placement = RingPlacement::new(a.clone(), 64);
        assert_eq!(placement.sync_url("anything"), a.public_url);
        placement.update(std::slice::from_ref(&b));
        let ring = Ring::new([a.id.clone(), b.id.clone()], 64);
        for k in keys().iter().take(200) {
            let want = if ring.owner(k) == Some(a.id.clone()) {
                &a.public_url
            } else {
                &b.public_url
            };
            assert_eq!(&placement.sync_url(k), want);
            assert_eq!(placement.is_local(k), want == &a.public_url);
        }
        placement.update(&[]);
        assert_eq!(placement.sync_url("anything"), a.public_url);
    }

    /// A member that left the view is still found by `last_known` (a new owner asks it to
    /// stop serving), and is current again once it comes back.
    #[test]
    fn departed_members_stay_known() {
        let (a, b) = (member("a", 7001), member("b", 7002));
        let placement = RingPlacement::new(a.clone(), 64);
        placement.update(std::slice::from_ref(&b));
        placement.update(&[]);
        assert_eq!(placement.member("b"), None);
        assert_eq!(placement.last_known("b"), Some(b.clone()));
        assert_eq!(placement.last_known("nobody"), None);
        let b2 = Member {
            incarnation: 2,
            ..b.clone()
        };
        placement.update(std::slice::from_ref(&b2));
        assert_eq!(placement.last_known("b"), Some(b2));
        for i in 0..100u16 {
            placement.update(&[member(&format!("x{i}"), 8000 + i)]);
        }
        assert_eq!(
            placement.last_known("b"),
            None,
            "departed members are bounded"
        );
    }
}
