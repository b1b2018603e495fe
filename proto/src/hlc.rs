//! Hybrid logical clock: timestamps that follow wall time but never go backwards.
//!
//! A bucket's timestamp is an [`Hlc`]. The API shows its millisecond part; the logical
//! part orders writes that land in the same millisecond, so one owner always assigns a
//! strictly newer timestamp than anything it has stored or observed, even when its wall
//! clock steps back or another owner's clock ran ahead (it observes loaded timestamps).

use serde::{Deserialize, Serialize};

use crate::Millis;

/// A hybrid logical timestamp, ordered by `(millis, logical)`.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
pub struct Hlc {
    /// Wall-clock milliseconds since the Unix epoch (what the API calls `timestamp`).
    pub millis: Millis,
    /// Orders events within the same millisecond.
    pub logical: u32,
}

impl Hlc {
    /// A timestamp at a wall-clock millisecond with no logical part.
    pub const fn at(millis: Millis) -> Self {
        Hlc { millis, logical: 0 }
    }

    /// The smallest timestamp strictly after `self`.
    pub const fn successor(self) -> Self {
        match self.logical.checked_add(1) {
            Some(logical) => Hlc {
                millis: self.millis,
                logical,
            },
            None => Hlc {
                millis: self.millis + 1,
                logical: 0,
            },
        }
    }
}

/// The clock state machine. It never reads a clock: callers pass the wall time in.
#[derive(Debug, Clone, Default)]
pub struct HlcClock {
    last: Hlc,
}

impl HlcClock {
    /// A clock that has seen nothing yet.
    pub const fn new() -> Self {
        HlcClock {
            last: Hlc {
                millis: 0,
                logical: 0,
            },
        }
    }

    /// A new timestamp for a local event at wall time `wall`: strictly after every
    /// timestamp this clock issued or observed.
    pub fn tick(&mut self, wall: Millis) -> Hlc {
        let next = if wall > self.last.millis {
            Hlc::at(wall)
        } else {
            self.last.successor()
        };
        self.last = next;
        next
    }

    /// Takes a timestamp seen elsewhere (a loaded bucket, a peer) into account, so the
    /// next [`tick`](Self::tick) is after it.
    pub fn observe(&mut self, seen: Hlc) {
        if seen > self.last {
            self.last = seen;
        }
    }

    /// The latest timestamp issued or observed.
    pub fn last(&self) -> Hlc {
        self.last
    }
}

/// One reading of a reference clock (the shared store's) taken by a round trip: the node's
/// monotonic clock when it asked and when the answer came, and the reference's time in the
/// answer. At a later monotonic instant `mono` the reference reads about
/// `reference + (mono − midpoint)`, off by at most half the round trip.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReferenceReading {
    /// Monotonic milliseconds when the node asked.
    pub asked: Millis,
    /// Monotonic milliseconds when the answer came.
    pub answered: Millis,
    /// The reference clock's wall time in the answer (ms since the Unix epoch).
    pub reference: Millis,
}

/// Keeps a node's timestamps within a bounded offset of a reference clock that every
/// node of a cluster reads (the shared store's): a node whose wall clock was stepped far
/// ahead (or behind) would otherwise stamp its writes hours off, and every later owner's
/// [`HlcClock`] would carry the future timestamps on. Given the node's wall time, it
/// answers the wall time the HLC should tick with: the node's own while it is within
/// `max_offset` (plus the reading's uncertainty) of the reference, else the reference's
/// estimate. Without a reading (a single node on its own store) the node's clock is the
/// reference. Pure: both clocks are passed in.
#[derive(Debug, Clone)]
pub struct ClockBound {
    max_offset: Millis,
    reading: Option<ReferenceReading>,
}

impl ClockBound {
    /// A bound of `max_offset` ms, with no reading yet.
    pub const fn new(max_offset: Millis) -> Self {
        ClockBound {
            max_offset,
            reading: None,
        }
    }

    /// Takes a reading. One that ended before the kept one did (a late answer) or whose
    /// answer came before its question is ignored.
    pub fn read(&mut self, r: ReferenceReading) {
        if r.answered < r.asked {
            return;
        }
        if self.reading.is_none_or(|kept| r.answered >= kept.answered) {
            self.reading = Some(r);
        }
    }

    /// The reference's time at monotonic `mono` and the most that estimate may be off.
    pub fn estimate(&self, mono: Millis) -> Option<(Millis, Millis)> {
        let r = self.reading?;
        let rtt = r.answered - r.asked;
        let mid = r.asked + rtt / 2;
        Some((
            r.reference.saturating_add(mono.saturating_sub(mid)),
            rtt.div_ceil(2),
        ))
    }

    /// The node's wall clock minus the reference's estimate at `mono`, ms (positive: the
    /// node is ahead); `None` without a reading.
    pub fn offset(&self, wall: Millis, mono: Millis) -> Option<i64> {
        let (est, _) = self.estimate(mono)?;
        Some(i64::try_from(i128::from(wall) - i128::from(est)).unwrap_or(i64::MAX))
    }

    /// Whether the node's wall clock is within the bound (always, without a reading).
    pub fn within(&self, wall: Millis, mono: Millis) -> bool {
        self.estimate(mono)
            .is_none_or(|(est, unc)| wall.abs_diff(est) <= self.max_offset.saturating_add(unc))
    }

    /// The wall time to tick the HLC with: `wall` while it is within the bound, else the
    /// reference's estimate.
    pub fn wall(&self, wall: Millis, mono: Millis) -> Millis {
        match self.estimate(mono) {
            Some((est, _)) if !self.within(wall, mono) => est,
            _ => wall,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn reading(asked: Millis, answered: Millis, reference: Millis) -> ReferenceReading {
        ReferenceReading {
            asked,
            answered,
            reference,
        }
    }

    #[test]
    fn a_clock_bound_keeps_the_wall_within_the_offset_of_the_reference() {
        // The reference said 1,000,000 at the middle (mono 110) of a 20 ms round trip.
        let mut b = ClockBound::new(500);
        assert_eq!(
            b.wall(5_000_000, 200),
            5_000_000,
            "no reading: the node's clock"
        );
        b.read(reading(100, 120, 1_000_000));
        // At mono 1,110 the reference reads about 1,001,000, give or take 10 ms.
        assert_eq!(b.estimate(1_110), Some((1_001_000, 10)));
        // (wall, expected HLC wall): within 500 + 10 ms the node's own clock is used.
        let cases = [
            (1_001_000, 1_001_000),
            (1_001_510, 1_001_510),
            (1_000_490, 1_000_490),
            // An hour ahead, 511 ms ahead, an hour behind: the reference's estimate.
            (1_001_000 + 3_600_000, 1_001_000),
            (1_001_511, 1_001_000),
            (1_001_000 - 600_000, 1_001_000),
        ];
        for (wall, expected) in cases {
            assert_eq!(b.wall(wall, 1_110), expected, "wall {wall}");
        }
        assert_eq!(b.offset(1_001_000 + 3_600_000, 1_110), Some(3_600_000));
        assert_eq!(b.offset(1_000_000, 1_110), Some(-1_000));
        // A late answer (it ended before the kept reading) is ignored; a newer one kept.
        b.read(reading(50, 90, 7));
        assert_eq!(b.estimate(1_110), Some((1_001_000, 10)));
        b.read(reading(2_000, 2_004, 2_000_000));
        assert_eq!(b.estimate(2_002), Some((2_000_000, 2)));
        // An answer before its question is no reading.
        b.read(reading(3_000, 2_999, 1));
        assert_eq!(b.estimate(2_002), Some((2_000_000, 2)));
    }

    proptest! {
        #[test]
        fn the_bounded_wall_is_the_nodes_own_or_the_reference(
            asked in 0u64..1_000_000, rtt in 0u64..2_000, reference in 0u64..10_000_000_000,
            later in 0u64..1_000_000, wall in 0u64..20_000_000_000, max_offset in 0u64..10_000,
        ) {
            let mut b = ClockBound::new(max_offset);
            b.read(reading(asked, asked + rtt, reference));
            let mono = asked + rtt + later;
            let (est, unc) = b.estimate(mono).expect("a reading");
            let got = b.wall(wall, mono);
            prop_assert!(unc <= rtt.div_ceil(2));
            if wall.abs_diff(est) <= max_offset + unc {
                prop_assert_eq!(got, wall);
            } else {
                prop_assert_eq!(got, est);
            }
            prop_assert!(got.abs_diff(est) <= max_offset + unc);
        }
    }

    #[test]
    fn follows_wall_time_when_it_moves_forward() {
        let mut c = HlcClock::new();
        assert_eq!(c.tick(1000), Hlc::at(1000));
        assert_eq!(c.tick(1005), Hlc::at(1005));
    }

    #[test]
    fn same_millisecond_gets_logical_increments() {
        let mut c = HlcClock::new();
        c.tick(1000);
        assert_eq!(
            c.tick(1000),
            Hlc {
                millis: 1000,
                logical: 1
            }
        );
        assert_eq!(
            c.tick(999),
            Hlc {
                millis: 1000,
                logical: 2
            }
        );
    }

    #[test]
    fn observed_future_timestamp_is_never_undercut() {
        let mut c = HlcClock::new();
        c.observe(Hlc {
            millis: 5000,
            logical: 7,
        });
        assert_eq!(
            c.tick(1000),
            Hlc {
                millis: 5000,
                logical: 8
            }
        );
    }

    proptest! {
        #[test]
        fn ticks_strictly_increase(walls in proptest::collection::vec(0u64..10_000, 1..200),
                                   observed in proptest::collection::vec((0u64..10_000, 0u32..5), 0..20)) {
            let mut c = HlcClock::new();
            let mut prev = None;
            for (i, w) in walls.iter().enumerate() {
                if let Some((m, l)) = observed.get(i) { c.observe(Hlc { millis: *m, logical: *l }); }
                let t = c.tick(*w);
                if let Some(p) = prev { prop_assert!(t > p); }
                if let Some((m, l)) = observed.get(i) { let seen = Hlc { millis: *m, logical: *l }; prop_assert!(t > seen); }
                prev = Some(t);
            }
        }
    }
}
