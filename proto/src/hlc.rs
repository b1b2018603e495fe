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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

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
