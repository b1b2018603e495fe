//! Seed 000 FIG 23: how the server reconciles a device's update with its stored bucket,
//! and FIG 21D: which of a subscriber's held versions are stale.
//!
//! `reconcile` is the whole rule set as one pure function. The caller (the bucket set's
//! actor) generates `now` from its hybrid logical clock (operation 1604A), calls this, and
//! commits the new state only when the outcome carries one.

use alloc::vec::Vec;

use crate::{Bucket, BucketId, Fields, Hlc};

/// A desired update from a client (FIG 22A operation 1506): changed fields, the version
/// they were based on and the optimistic-concurrency flag.
#[derive(Debug, Clone, PartialEq)]
pub struct Update {
    /// Fields to write; fields not named keep their stored values.
    pub value: Fields,
    /// The version the client last saw (0 if it never saw the bucket).
    pub base_version: u64,
    /// Refuse rather than merge when the base version is stale (FIG 25D).
    pub occ: bool,
}

/// Why a write was refused. A refusal never changes the stored bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefuseReason {
    /// Base version stale and OCC set (FIG 23B 1604C → 1604F; FIG 25D).
    StaleBaseWithOcc,
    /// The stored bucket is newer than the timestamp assigned to the update
    /// (FIG 23B 1604G → 1604F; FIG 24).
    OlderThanStored,
    /// Equal timestamps and the stored version wins the fixed tie-break (1604H; FIG 26B).
    LostTieBreak,
    /// Equal timestamps, the update would win the tie-break, but OCC forbids merging into
    /// a bucket that is not the one the client expected ([0312]).
    TieBreakWithOcc,
}

/// The result of [`reconcile`].
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Based on the current version: fields merged, new timestamp/version. The client
    /// already holds the rest of the bucket, so only timestamp and version are returned
    /// (FIG 23C 1606E; FIG 25B).
    Applied(Bucket),
    /// Based on an older version but accepted: fields merged into a bucket the client has
    /// not seen, so the whole merged bucket is returned (1606D; FIG 25C, FIG 26C).
    Merged(Bucket),
    /// Not accepted; the stored bucket stands and is returned (1606B; FIG 24, 25D, 26B).
    Refused(RefuseReason),
}

impl Outcome {
    /// The new state to commit and notify, if the write was accepted.
    pub fn new_state(&self) -> Option<&Bucket> {
        match self {
            Outcome::Applied(b) | Outcome::Merged(b) => Some(b),
            Outcome::Refused(_) => None,
        }
    }
}

/// Field-level merge (1604D): the update's fields overwrite, the rest stay.
fn merged(stored: &Bucket, update: &Update, now: Hlc) -> Bucket {
    let mut value = stored.value.clone();
    for (k, v) in &update.value {
        value.insert(k.clone(), v.clone());
    }
    Bucket {
        id: stored.id.clone(),
        value,
        timestamp: now,
        // Versions are per-bucket counters; fencing guarantees one committer per set, and
        // a version is only ever seen after its commit, so a counter is never reused.
        version: stored.version.saturating_add(1),
    }
}

/// Seed 000 FIG 23B. `now` is the timestamp generated for this update at receipt
/// (operation 1604A); the caller's clock normally makes it newer than `stored`.
pub fn reconcile(stored: &Bucket, update: &Update, now: Hlc) -> Outcome {
    use core::cmp::Ordering::*;
    let based_on_current = update.base_version == stored.version;
    match now.cmp(&stored.timestamp) {
        // 1604B: the update is newer → 1604C: is the stored bucket the one expected?
        Greater if based_on_current => Outcome::Applied(merged(stored, update, now)),
        Greater if update.occ => Outcome::Refused(RefuseReason::StaleBaseWithOcc),
        Greater => Outcome::Merged(merged(stored, update, now)),
        // 1604G: older → refuse.
        Less => Outcome::Refused(RefuseReason::OlderThanStored),
        // Same age. Written on top of exactly the stored state there is nothing to break a
        // tie between; otherwise 1604H's fixed rule: the higher version wins, the same on
        // every node, so all owners converge.
        Equal if based_on_current => Outcome::Applied(merged(stored, update, now)),
        Equal if update.base_version > stored.version && update.occ => {
            Outcome::Refused(RefuseReason::TieBreakWithOcc)
        }
        Equal if update.base_version > stored.version => {
            Outcome::Merged(merged(stored, update, now))
        }
        Equal => Outcome::Refused(RefuseReason::LostTieBreak),
    }
}

/// A bucket version a subscriber says it holds (FIG 21B operation 1418).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    /// The bucket.
    pub id: BucketId,
    /// Its timestamp's millisecond part as the client holds it, if sent.
    pub timestamp: Option<u64>,
    /// Its version as the client holds it; `None` when the client has none.
    pub version: Option<u64>,
}

/// True when the client's copy differs from the stored bucket (FIG 21D 1448/1452): it sent
/// no version, a different version, or a different timestamp.
pub fn is_stale(held: &Held, stored: &Bucket) -> bool {
    match held.version {
        None => true,
        Some(v) if v != stored.version => true,
        Some(_) => held.timestamp.is_some_and(|t| t != stored.timestamp.millis),
    }
}

/// The stored buckets a subscriber must be sent at once, in the order it listed them.
/// Ids with no stored bucket are skipped; the caller rejects those before holding.
pub fn stale_buckets<'a>(
    held: &[Held],
    mut stored: impl FnMut(&BucketId) -> Option<&'a Bucket>,
) -> Vec<&'a Bucket> {
    held.iter()
        .filter_map(|h| stored(&h.id).filter(|b| is_stale(h, b)))
        .collect()
}

/// Session echo suppression ([0260]): a change made under a session is not sent back to
/// a subscription of that same session.
pub fn should_notify(subscriber_session: Option<&str>, writer_session: Option<&str>) -> bool {
    match (subscriber_session, writer_session) {
        (Some(s), Some(w)) => s != w,
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    //! The worked examples of seed 000 (FIG 24–26), step by step. Names in the seed:
    //! bucket B1 with contents A and B; the client changes A to A'; t* are timestamps and
    //! v* versions. Concrete numbers keep the orderings the figures state.
    use super::*;
    use alloc::vec;
    use proptest::prelude::*;
    use serde_json::json;

    fn fields(v: serde_json::Value) -> Fields {
        match v {
            serde_json::Value::Object(m) => m,
            _ => unreachable!("test fixture must be an object"),
        }
    }

    fn b1(a: &str, b: &str, version: u64, ts: Hlc) -> Bucket {
        Bucket {
            id: BucketId::parse("device.B1").expect("valid id"),
            value: fields(json!({"A": a, "B": b})),
            timestamp: ts,
            version,
        }
    }

    /// The client's requested change of FIG 24A/25A/26A: A → A', based on version v1.
    fn change_a(v1: u64, occ: bool) -> Update {
        Update {
            value: fields(json!({"A": "A'"})),
            base_version: v1,
            occ,
        }
    }

    #[test]
    fn fig24_server_bucket_newer_than_update_refuses_and_returns_stored() {
        // FIG 24A: client holds B1 {A, B} v1 t1 and sends A' based on v1.
        let (t1, t3, t2) = (Hlc::at(100), Hlc::at(200), Hlc::at(300));
        let v1 = 1;
        // FIG 24B: the server holds B1 {A, B'} v2 t2 where t2 is newer than t3.
        let stored = b1("A", "B'", 2, t2);
        assert!(t2 > t3 && t3 > t1);
        let outcome = reconcile(&stored, &change_a(v1, false), t3);
        // It rejects the change, disposes of t3/v3 and sends back (B1, A and B', v2, t2).
        assert_eq!(outcome, Outcome::Refused(RefuseReason::OlderThanStored));
        assert_eq!(outcome.new_state(), None);
    }

    #[test]
    fn fig25b_expected_version_applies_and_returns_only_timestamp_and_version() {
        // FIG 25A: client B1 {A, B} v1 t1 sends A' based on v1; the server assigns t2.
        let (t1, t2) = (Hlc::at(100), Hlc::at(200));
        // FIG 25B: the server's B1 is identical to the client's (v1).
        let stored = b1("A", "B", 1, t1);
        let outcome = reconcile(&stored, &change_a(1, false), t2);
        // Merges A' into B1, assigns t2 and a new version v2; replies id, v2, t2 only.
        let Outcome::Applied(new) = outcome else {
            panic!("expected applied, got {outcome:?}")
        };
        assert_eq!(new.value, fields(json!({"A": "A'", "B": "B"})));
        assert_eq!(new.timestamp, t2);
        assert_eq!(new.version, 2);
    }

    #[test]
    fn fig25c_unexpected_version_without_occ_merges_and_returns_full_bucket() {
        // FIG 25A: client B1 {A, B} v1 t1 sends A' based on v1; the server assigns t3.
        let (t2, t3) = (Hlc::at(200), Hlc::at(300));
        // FIG 25C: the server holds B1 {A, B'} v2 t2; v2 ≠ v1 and t3 newer than t2.
        let stored = b1("A", "B'", 2, t2);
        let outcome = reconcile(&stored, &change_a(1, false), t3);
        // Accepts by merging A' into B1 → {A', B'}, t3, v3; sends the merged contents.
        let Outcome::Merged(new) = outcome else {
            panic!("expected merged, got {outcome:?}")
        };
        assert_eq!(new.value, fields(json!({"A": "A'", "B": "B'"})));
        assert_eq!((new.timestamp, new.version), (t3, 3));
    }

    #[test]
    fn fig25d_unexpected_version_with_occ_refuses_and_returns_stored() {
        // As FIG 25C, but the optimistic concurrency flag is set.
        let (t2, t3) = (Hlc::at(200), Hlc::at(300));
        let stored = b1("A", "B'", 2, t2);
        let outcome = reconcile(&stored, &change_a(1, true), t3);
        // Refuses; keeps B1 {A, B'} v2 t2 and sends that copy to the client.
        assert_eq!(outcome, Outcome::Refused(RefuseReason::StaleBaseWithOcc));
    }

    #[test]
    fn fig26b_equal_timestamps_higher_server_version_wins_and_refuses() {
        // FIG 26A: client B1 {A, B} v1 sends A'; the server assigns t2 (and v3).
        let t2 = Hlc::at(200);
        // FIG 26B: the server's B1 {A, B'} has timestamp t2 too, and v2 > v1.
        let (v1, v2) = (4, 7);
        let stored = b1("A", "B'", v2, t2);
        let outcome = reconcile(&stored, &change_a(v1, false), t2);
        // The server wins: the change is refused and (B1, A and B', v2, t2) is sent back.
        assert_eq!(outcome, Outcome::Refused(RefuseReason::LostTieBreak));
    }

    #[test]
    fn fig26c_equal_timestamps_higher_client_version_wins_and_merges() {
        // FIG 26A again; FIG 26C: the server's B1 {A, B'} has t2 and v2 < v1.
        let t2 = Hlc::at(200);
        let (v1, v2) = (9, 7);
        let stored = b1("A", "B'", v2, t2);
        let outcome = reconcile(&stored, &change_a(v1, false), t2);
        // The client wins: A' merged into B1 → {A', B'}, new version v3, timestamp t2;
        // the merged bucket is sent back.
        let Outcome::Merged(new) = outcome else {
            panic!("expected merged, got {outcome:?}")
        };
        assert_eq!(new.value, fields(json!({"A": "A'", "B": "B'"})));
        assert_eq!(new.timestamp, t2);
        assert!(new.version > v2);
    }

    #[test]
    fn para0312_equal_timestamps_client_would_win_but_occ_refuses() {
        let t2 = Hlc::at(200);
        let stored = b1("A", "B'", 7, t2);
        let outcome = reconcile(&stored, &change_a(9, true), t2);
        assert_eq!(outcome, Outcome::Refused(RefuseReason::TieBreakWithOcc));
    }

    #[test]
    fn equal_timestamps_based_on_current_version_applies() {
        let t = Hlc::at(200);
        let stored = b1("A", "B", 3, t);
        assert!(matches!(
            reconcile(&stored, &change_a(3, true), t),
            Outcome::Applied(_)
        ));
    }

    #[test]
    fn occ_with_current_base_applies() {
        let stored = b1("A", "B", 3, Hlc::at(1));
        assert!(matches!(
            reconcile(&stored, &change_a(3, true), Hlc::at(2)),
            Outcome::Applied(_)
        ));
    }

    #[test]
    fn fig21d_subscribe_is_stale_on_missing_or_different_version() {
        let stored = b1(
            "A",
            "B",
            5,
            Hlc {
                millis: 1000,
                logical: 3,
            },
        );
        let id = stored.id.clone();
        let held = |timestamp, version| Held {
            id: id.clone(),
            timestamp,
            version,
        };
        assert!(
            is_stale(&held(None, None), &stored),
            "no version sent → send contents"
        );
        assert!(is_stale(&held(None, Some(4)), &stored));
        assert!(is_stale(&held(Some(999), Some(5)), &stored));
        assert!(!is_stale(&held(Some(1000), Some(5)), &stored));
        assert!(!is_stale(&held(None, Some(5)), &stored));
        let list = vec![held(None, Some(5)), held(None, Some(1))];
        let stale = stale_buckets(&list, |_| Some(&stored));
        assert_eq!(stale.len(), 1);
    }

    #[test]
    fn session_echo_is_suppressed_only_for_the_same_session() {
        assert!(!should_notify(Some("s1"), Some("s1")));
        assert!(should_notify(Some("s1"), Some("s2")));
        assert!(should_notify(None, Some("s1")));
        assert!(should_notify(Some("s1"), None));
    }

    fn arb_fields() -> impl Strategy<Value = Fields> {
        proptest::collection::btree_map("[a-d]", -5i64..5, 0..4)
            .prop_map(|m| m.into_iter().map(|(k, v)| (k, json!(v))).collect())
    }

    fn arb_bucket() -> impl Strategy<Value = Bucket> {
        (arb_fields(), 0u64..20, 1u64..20, 0u32..3).prop_map(|(value, ms, version, l)| Bucket {
            id: BucketId::parse("device.p").expect("valid id"),
            value,
            timestamp: Hlc {
                millis: ms,
                logical: l,
            },
            version,
        })
    }

    fn arb_update() -> impl Strategy<Value = Update> {
        (arb_fields(), 0u64..20, any::<bool>()).prop_map(|(value, base_version, occ)| Update {
            value,
            base_version,
            occ,
        })
    }

    proptest! {
        #[test]
        fn older_never_wins_occ_never_merges_and_a_newer_write_on_the_current_version_always_applies(
            s in arb_bucket(), u in arb_update(), ms in 0u64..20, l in 0u32..3) {
            // FIG 23B as three laws, each stated without the decision code above.
            let now = Hlc { millis: ms, logical: l };
            let outcome = reconcile(&s, &u, now);
            if now < s.timestamp {
                prop_assert_eq!(outcome, Outcome::Refused(RefuseReason::OlderThanStored));
            } else if u.base_version == s.version {
                prop_assert!(matches!(outcome, Outcome::Applied(_)), "{:?}", outcome);
            } else if u.occ {
                prop_assert!(matches!(outcome, Outcome::Refused(_)), "OCC merged: {:?}", outcome);
            } else if now > s.timestamp {
                prop_assert!(matches!(outcome, Outcome::Merged(_)), "{:?}", outcome);
            }
        }

        #[test]
        fn equal_timestamps_are_broken_the_same_way_on_every_node(
            a in 1u64..20, b in 1u64..20, ms in 0u64..20, l in 0u32..3,
            fa in arb_fields(), fb in arb_fields()) {
            // Two owners with equal timestamps, each holding what the other based its
            // write on: exactly one of the two writes wins (1604H), so they converge.
            prop_assume!(a != b);
            let ts = Hlc { millis: ms, logical: l };
            let bucket = |version, value| Bucket {
                id: BucketId::parse("device.p").expect("valid id"), value, timestamp: ts, version,
            };
            let update = |base_version, value| Update { value, base_version, occ: false };
            let on_a = reconcile(&bucket(a, fa.clone()), &update(b, fb.clone()), ts);
            let on_b = reconcile(&bucket(b, fb), &update(a, fa), ts);
            prop_assert!(
                on_a.new_state().is_some() != on_b.new_state().is_some(),
                "both or neither won: {:?} / {:?}", on_a, on_b
            );
        }

        #[test]
        fn accepted_writes_strictly_increase_version_and_never_go_back_in_time(
            s in arb_bucket(), u in arb_update(), ms in 0u64..20, l in 0u32..3) {
            let now = Hlc { millis: ms, logical: l };
            if let Some(new) = reconcile(&s, &u, now).new_state() {
                prop_assert!(new.version > s.version);
                prop_assert!(new.timestamp >= s.timestamp);
                // Sent fields win; every other stored field stays.
                for (k, v) in &u.value { prop_assert_eq!(new.value.get(k), Some(v)); }
                for (k, v) in &s.value {
                    if !u.value.contains_key(k) { prop_assert_eq!(new.value.get(k), Some(v)); }
                }
            }
        }

        #[test]
        fn a_sequence_of_writes_from_a_monotonic_clock_is_never_refused_without_occ(
            updates in proptest::collection::vec(arb_update(), 1..30)) {
            // One owner with an HLC: every write gets a timestamp newer than the stored one,
            // so only OCC can refuse; versions climb by one per accepted write.
            let mut clock = crate::HlcClock::new();
            let mut stored = Bucket::created(BucketId::parse("device.p").expect("valid"), Fields::new(), clock.tick(0));
            for u in updates {
                let before = stored.version;
                match reconcile(&stored, &u, clock.tick(0)) {
                    Outcome::Applied(b) | Outcome::Merged(b) => { prop_assert_eq!(b.version, before + 1); stored = b; }
                    Outcome::Refused(r) => {
                        prop_assert!(u.occ && u.base_version != before);
                        prop_assert_eq!(r, RefuseReason::StaleBaseWithOcc);
                    }
                }
            }
        }

        #[test]
        fn a_refused_write_is_applied_when_resent_on_the_stored_version(
            s in arb_bucket(), u in arb_update(), ms in 0u64..20) {
            // Nothing a refusal answers is final: the client takes the stored bucket it is
            // sent back, bases its write on it and, with a newer clock, gets it applied.
            if let Outcome::Refused(_) = reconcile(&s, &u, Hlc::at(ms)) {
                let resent = Update { base_version: s.version, ..u.clone() };
                match reconcile(&s, &resent, s.timestamp.successor()) {
                    Outcome::Applied(b) => {
                        for (k, v) in &u.value { prop_assert_eq!(b.value.get(k), Some(v)); }
                        prop_assert_eq!(b.version, s.version + 1);
                    }
                    other => prop_assert!(false, "resent write not applied: {:?}", other),
                }
            }
        }

        #[test]
        fn writes_to_different_fields_commute(s in arb_bucket(), u1 in arb_update(), u2 in arb_update()) {
            // Field-level merge (1604D): two writes that touch different fields leave the
            // same value whichever the owner applies first; on a common field the later
            // one wins. (`Fields` is a sorted map, so field order within a write cannot
            // matter; the order of writes can.)
            let apply = |s: &Bucket, u: &Update| {
                let u = Update { base_version: s.version, ..u.clone() };
                reconcile(s, &u, s.timestamp.successor()).new_state().cloned().expect("applied")
            };
            let one_two = apply(&apply(&s, &u1), &u2);
            let two_one = apply(&apply(&s, &u2), &u1);
            for (k, v) in &one_two.value {
                if u1.value.contains_key(k) && u2.value.contains_key(k) {
                    prop_assert_eq!(Some(v), u2.value.get(k));
                    prop_assert_eq!(two_one.value.get(k), u1.value.get(k));
                } else {
                    prop_assert_eq!(two_one.value.get(k), Some(v));
                }
            }
            prop_assert_eq!(one_two.value.len(), two_one.value.len());
        }
    }
}
