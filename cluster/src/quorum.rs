//! The quorum rule: may a node serve sets (take leases, answer `/readyz` 200)?
//!
//! A node serves only while it reaches a strict majority of the *last known* members of
//! its cluster: every node it has seen alive (itself included), minus those that left
//! — drained (a graceful leave, gossiped as a farewell) or whose process is gone (its
//! address refused a connection). A member that merely stopped answering (crashed host,
//! partition, pause) still counts: from this side a dead node and a cut-off one look
//! the same, and only one side of a split may be a majority.
//!
//! So a single node is always its own majority, a two-node cluster whose other member
//! drained stays up, and a node cut off from two of three peers stops serving, while the
//! two serve on. Pure: sets in, a decision out ([`has_quorum`]).

use std::collections::BTreeSet;

use crate::NodeId;

/// Whether `reachable` holds a strict majority of `last_known`. Only members of
/// `last_known` count (a reachable node that is leaving does not). An empty
/// `last_known` has no majority; a node always lists itself in both.
pub fn has_quorum(last_known: &BTreeSet<NodeId>, reachable: &BTreeSet<NodeId>) -> bool {
    Quorum::of(last_known, reachable).holds()
}

/// The counts behind a quorum decision, for `/readyz`, logs and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quorum {
    /// Last known members, this node included.
    pub last_known: usize,
    /// How many of them this node reaches (itself included).
    pub reachable: usize,
}

impl Quorum {
    /// A node alone that knows no other member: its own majority.
    pub const ALONE: Quorum = Quorum {
        last_known: 1,
        reachable: 1,
    };

    /// The counts for `last_known` and `reachable` (only reachable members that are last
    /// known count).
    pub fn of(last_known: &BTreeSet<NodeId>, reachable: &BTreeSet<NodeId>) -> Quorum {
        Quorum {
            last_known: last_known.len(),
            reachable: last_known.intersection(reachable).count(),
        }
    }

    /// A strict majority: more than half of the last known members are reachable.
    pub fn holds(&self) -> bool {
        self.reachable.saturating_mul(2) > self.last_known
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn set(ids: &[&str]) -> BTreeSet<NodeId> {
        ids.iter().map(|s| NodeId::new(*s)).collect()
    }

    #[test]
    fn quorum_table() {
        let cases: &[(&[&str], &[&str], bool, &str)] = &[
            (&["a"], &["a"], true, "a single node is its own majority"),
            (&["a", "b"], &["a", "b"], true, "two of two"),
            (
                &["a", "b"],
                &["a"],
                false,
                "one of two: the other crashed or is cut off",
            ),
            (
                &["a"],
                &["a"],
                true,
                "two nodes, the other drained: it is forgotten",
            ),
            (
                &["a", "b", "c"],
                &["a", "b"],
                true,
                "the majority side of an isolation",
            ),
            (&["a", "b", "c"], &["c"], false, "the isolated node"),
            (
                &["a", "b", "c", "d"],
                &["a", "b"],
                false,
                "a 2/2 split: neither side",
            ),
            (
                &["a", "b", "c", "d"],
                &["a", "b", "c"],
                true,
                "three of four",
            ),
            (
                &["a", "b", "c", "d", "e"],
                &["a", "b", "c"],
                true,
                "three of five",
            ),
            (
                &["a", "b", "c", "d", "e"],
                &["d", "e"],
                false,
                "two of five",
            ),
            (
                &["a", "b", "c"],
                &["c", "x", "y"],
                false,
                "unknown nodes do not count",
            ),
            (&[], &["a"], false, "nothing known: no majority"),
        ];
        for (known, reachable, expected, why) in cases {
            assert_eq!(
                has_quorum(&set(known), &set(reachable)),
                *expected,
                "{why}: {known:?} reaching {reachable:?}"
            );
        }
        assert!(Quorum::ALONE.holds());
    }

    fn members() -> impl Strategy<Value = (BTreeSet<NodeId>, BTreeSet<NodeId>, BTreeSet<NodeId>)> {
        // A cluster of 1..=9 nodes split into two sides that cannot reach each other.
        (1usize..=9).prop_flat_map(|n| {
            proptest::collection::vec(any::<bool>(), n).prop_map(move |sides| {
                let all: BTreeSet<NodeId> = (0..n).map(|i| NodeId::new(format!("n{i}"))).collect();
                let (mut left, mut right) = (BTreeSet::new(), BTreeSet::new());
                for (i, on_left) in sides.into_iter().enumerate() {
                    let id = NodeId::new(format!("n{i}"));
                    if on_left {
                        left.insert(id);
                    } else {
                        right.insert(id);
                    }
                }
                (all, left, right)
            })
        })
    }

    proptest! {
        /// However a cluster splits, at most one side has a quorum (so at most one side
        /// takes leases), and a side reaching everyone always has one.
        #[test]
        fn at_most_one_side_of_a_split_has_a_quorum((all, left, right) in members()) {
            let l = has_quorum(&all, &left);
            let r = has_quorum(&all, &right);
            prop_assert!(!(l && r), "both sides of {left:?} | {right:?} have a quorum");
            prop_assert!(has_quorum(&all, &all));
            // Adding a reachable member never loses the quorum; losing one never wins it.
            if let Some(extra) = right.iter().next() {
                let mut more = left.clone();
                more.insert(extra.clone());
                prop_assert!(!l || has_quorum(&all, &more));
            }
            // The decision is exactly the majority count.
            prop_assert_eq!(l, left.len() * 2 > all.len());
        }
    }
}
