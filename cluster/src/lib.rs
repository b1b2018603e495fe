//! Cluster membership, placement and the peer transport.
//!
//! The protocol logic is sans-IO: [`Membership`] (SWIM failure detection and
//! dissemination, on `foca`) and [`Ring`] (consistent hashing, on `hashring`) take
//! events and `now` in and hand frames, timeouts and membership changes out. The
//! network sits behind [`Transport`]: [`transport::memory`] for scenario tests with a
//! simulated clock, [`transport::grpc`] (tonic, frames authenticated with the shared
//! [`ClusterSecret`]) for real nodes. [`driver`] is the thin async loop that joins
//! the two on a tokio runtime.
//!
//! The registration server asks [`Placement`] for a device's allocated sync server
//! (seed 000 FIG 17C): [`SingleNode`] answers for one node, [`RingPlacement`] for a
//! cluster, so nothing above it changes.
//!
//! Code map: `ring.rs` (placement), `membership.rs` (SWIM state machine, last known
//! members), `quorum.rs` (the majority rule nodes serve under), `seeds.rs`
//! (`--join`), `auth.rs` (cluster secret), `transport/` (trait, in-memory, gRPC),
//! `driver.rs` (tokio loop), `error.rs` (the crate's error and its gRPC mapping).

pub mod auth;
pub mod driver;
pub mod error;
pub mod membership;
pub mod quorum;
pub mod ring;
pub mod seeds;
pub mod transport;

/// Generated from `proto/cluster.proto` by `build.rs` (protox + tonic-prost-build).
#[allow(
    missing_docs,
    clippy::all,
    clippy::pedantic,
    missing_debug_implementations
)]
pub mod pb {
    tonic::include_proto!("tether.cluster.v1");
}

pub use auth::ClusterSecret;
pub use error::ClusterError;
pub use membership::{Member, Membership, MembershipConfig, MembershipEvent, NodeId};
pub use quorum::{has_quorum, Quorum};
pub use ring::{Ring, RingPlacement};
pub use transport::{Frame, Transport};

/// Milliseconds on the caller's monotonic clock. The protocol code never reads a clock:
/// every input carries `now`, and every deadline it hands back is on the same scale.
pub type Millis = u64;

/// Names the node that should own a bucket set and serve its device.
pub trait Placement: Send + Sync + std::fmt::Debug {
    /// The public base URL of the sync server allocated to `set_key`.
    fn sync_url(&self, set_key: &str) -> String;
}

/// One node owns everything.
#[derive(Debug, Clone)]
pub struct SingleNode {
    /// This node's public base URL, e.g. `http://127.0.0.1:8080`.
    pub url: String,
}

impl Placement for SingleNode {
    fn sync_url(&self, _set_key: &str) -> String {
        self.url.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_node_allocates_every_set_to_itself() {
        let p = SingleNode {
            url: "http://127.0.0.1:8080".into(),
        };
        assert_eq!(p.sync_url("01AA02AB"), "http://127.0.0.1:8080");
        assert_eq!(p.sync_url("other"), "http://127.0.0.1:8080");
    }
}
