//! Routing and forwarding: which node serves a set, and how a request gets there.
//!
//! `router` sends every set operation to its owner (a local actor or a peer over gRPC),
//! `forward` is the gRPC service and client between nodes (relaying through a third
//! member when `links` says the direct link to an owner is down), and `cluster` runs membership
//! and the internal gRPC server inside the node. `codec` is the forwarding service's
//! protobuf codec (small starting buffers).

pub mod cluster;
pub mod codec;
pub mod forward;
pub mod links;
pub mod router;
