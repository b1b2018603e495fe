//! Moving membership frames between nodes, behind one trait.
//!
//! Frames are datagrams: delivered at most once, possibly not at all, never answered
//! at this layer (SWIM sends its replies as frames of their own). [`memory`] is a
//! channel network with partition, heal and kill controls for scenario tests;
//! [`grpc`] is the real one (tonic, `Gossip.Exchange`, authenticated frames).

use std::net::SocketAddr;

use bytes::Bytes;

use crate::ClusterError;

pub mod grpc;
pub mod memory;

/// A frame received from a peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// The sender's gossip address.
    pub from: SocketAddr,
    /// The membership message, opaque to the transport.
    pub payload: Bytes,
}

/// Sends frames to peer addresses and receives theirs.
#[async_trait::async_trait]
pub trait Transport: Send + Sync + std::fmt::Debug {
    /// The address peers reach this node at (what it advertises as `gossip_addr`).
    fn local_addr(&self) -> SocketAddr;

    /// Sends `payload` to the peer at `to`. `Ok` means handed over, not processed; a
    /// frame lost on the way is not an error (the protocol retries by design).
    async fn send(&self, to: SocketAddr, payload: Bytes) -> Result<(), ClusterError>;

    /// The next received frame; `None` once the transport is closed.
    async fn recv(&self) -> Option<Frame>;

    /// A received frame if one is waiting, without waiting.
    fn try_recv(&self) -> Option<Frame>;
}
