//! Which peers this node reaches directly right now.
//!
//! Gossip's indirect probes keep a member alive in the view when only the link between
//! two nodes is cut (overlapping majorities, a one-link partition): the view then names
//! an owner this node cannot reach. A link is marked *down* when a ping (every
//! [`PROBE_EVERY`] to every live member) or a call to the peer could not be made, broke
//! below gRPC or got no answer in time, or a hedged call was answered through a relay
//! first; while it is down, calls to that peer go through a relay (another member that
//! reaches it, see [`crate::routing::forward`]), and a probe tries the direct link again
//! every [`PROBE_EVERY`] until a call succeeds.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

/// How often a down link is tried again.
pub const PROBE_EVERY: Duration = Duration::from_millis(500);
/// How long one probe of a down link may take.
pub const PROBE_DEADLINE: Duration = Duration::from_millis(1_500);

/// The peers whose direct link is down.
#[derive(Debug, Default)]
pub struct Links {
    down: Mutex<BTreeMap<SocketAddr, tokio::time::Instant>>,
}

impl Links {
    /// Whether calls to `peer` should go through a relay.
    pub fn is_down(&self, peer: SocketAddr) -> bool {
        self.down
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains_key(&peer)
    }

    /// Marks the link to `peer` down; `true` when it was up (the caller starts a probe).
    pub fn mark_down(&self, peer: SocketAddr) -> bool {
        let mut down = self.down.lock().unwrap_or_else(PoisonError::into_inner);
        if down.contains_key(&peer) {
            return false;
        }
        down.insert(peer, tokio::time::Instant::now());
        true
    }

    /// Marks the link to `peer` up; how long it was down, if it was.
    pub fn mark_up(&self, peer: SocketAddr) -> Option<Duration> {
        self.down
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&peer)
            .map(|since| since.elapsed())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_link_is_down_from_its_first_failure_until_it_is_marked_up() {
        let links = Links::default();
        let (a, b): (SocketAddr, SocketAddr) = (
            "10.0.0.1:7000".parse().expect("an address"),
            "10.0.0.2:7000".parse().expect("an address"),
        );
        assert!(!links.is_down(a));
        assert!(links.mark_down(a), "the first failure starts a probe");
        assert!(!links.mark_down(a), "later failures do not start another");
        assert!(links.is_down(a) && !links.is_down(b));
        assert!(links.mark_up(a).is_some());
        assert!(!links.is_down(a));
        assert!(links.mark_up(a).is_none());
    }
}
