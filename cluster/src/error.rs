//! The crate's one error type, and the one place that maps it to gRPC status codes
//! (both ways: what a peer's handler answers, and what a caller makes of a peer's answer).

use std::net::SocketAddr;

use tonic::{Code, Status};

/// Everything that can go wrong in membership, placement and the peer transport.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// A peer frame or call without a valid proof of the shared cluster secret.
    #[error("peer not authenticated: {0}")]
    Unauthenticated(&'static str),
    /// The cluster secret is too short to authenticate anything.
    #[error("cluster secret must be at least {min} bytes")]
    WeakSecret {
        /// The minimum length in bytes.
        min: usize,
    },
    /// A peer could not be reached (not listening, killed, connection refused, timeout).
    #[error("peer {addr} unreachable: {reason}")]
    PeerUnreachable {
        /// The peer's gossip address.
        addr: SocketAddr,
        /// What the transport saw.
        reason: String,
    },
    /// The peer's host refused the connection: nothing listens on its port any more (a
    /// process killed on a live host). Immediate evidence that the member is gone, unlike
    /// a timeout, which a slow or paused process also causes.
    #[error("peer {addr} refused the connection")]
    PeerRefused {
        /// The peer's gossip address.
        addr: SocketAddr,
    },
    /// A peer answered with an error status of its own.
    #[error("peer {addr} answered {code:?}: {message}")]
    Remote {
        /// The peer's gossip address.
        addr: SocketAddr,
        /// The gRPC code it answered.
        code: Code,
        /// Its message.
        message: String,
    },
    /// A frame larger than the configured limit.
    #[error("frame of {len} bytes exceeds the {max}-byte limit")]
    FrameTooLarge {
        /// The frame's length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A malformed frame: undecodable payload, bad sender address.
    #[error("malformed frame: {0}")]
    MalformedFrame(String),
    /// The local receive queue is full; the frame was dropped (gossip tolerates loss).
    #[error("receive queue full, frame dropped")]
    Overloaded,
    /// The membership protocol refused an input (decode error, data from ourselves, …).
    #[error("membership protocol: {0}")]
    Gossip(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// An invalid `--join` entry or membership configuration.
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
    /// The transport is closed (shut down, or its address was killed in a test network).
    #[error("transport closed")]
    Closed,
    /// Binding or serving the gRPC listener failed.
    #[error("gRPC server: {0}")]
    Server(String),
}

impl ClusterError {
    /// The gRPC code a handler answers for this error.
    pub fn code(&self) -> Code {
        match self {
            ClusterError::Unauthenticated(_) => Code::Unauthenticated,
            ClusterError::WeakSecret { .. } | ClusterError::Server(_) => Code::Internal,
            ClusterError::PeerUnreachable { .. }
            | ClusterError::PeerRefused { .. }
            | ClusterError::Closed => Code::Unavailable,
            ClusterError::Remote { code, .. } => *code,
            ClusterError::FrameTooLarge { .. } => Code::ResourceExhausted,
            ClusterError::Overloaded => Code::ResourceExhausted,
            ClusterError::MalformedFrame(_)
            | ClusterError::Gossip(_)
            | ClusterError::InvalidConfig(_) => Code::InvalidArgument,
        }
    }

    /// What a caller makes of `status`, answered by the peer at `addr`.
    pub fn from_status(addr: SocketAddr, status: &Status) -> Self {
        if refused(status) {
            return ClusterError::PeerRefused { addr };
        }
        match status.code() {
            // tonic reports connect failures and timeouts as these codes, without a
            // response from the peer's handler.
            Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled => {
                ClusterError::PeerUnreachable {
                    addr,
                    reason: status.message().to_owned(),
                }
            }
            Code::Unauthenticated => ClusterError::Unauthenticated("rejected by peer"),
            code => ClusterError::Remote {
                addr,
                code,
                message: status.message().to_owned(),
            },
        }
    }
}

/// Whether a call failed because the peer's host refused the TCP connection (found in
/// the status's chain of causes).
fn refused(status: &Status) -> bool {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(status);
    for _ in 0..16 {
        let Some(e) = cause else { return false };
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::ConnectionRefused {
                return true;
            }
        }
        cause = e.source();
    }
    false
}

impl From<ClusterError> for Status {
    fn from(err: ClusterError) -> Self {
        Status::new(err.code(), err.to_string())
    }
}

impl From<foca::Error> for ClusterError {
    fn from(err: foca::Error) -> Self {
        ClusterError::Gossip(Box::new(err))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unauthenticated_maps_to_grpc_unauthenticated_both_ways() {
        let addr: SocketAddr = ([127, 0, 0, 1], 1).into();
        let status = Status::from(ClusterError::Unauthenticated("bad mac"));
        assert_eq!(status.code(), Code::Unauthenticated);
        assert!(matches!(
            ClusterError::from_status(addr, &status),
            ClusterError::Unauthenticated(_)
        ));
    }

    #[test]
    fn transport_failures_are_unavailable() {
        let addr: SocketAddr = ([127, 0, 0, 1], 1).into();
        let err = ClusterError::from_status(addr, &Status::unavailable("connection refused"));
        assert!(matches!(err, ClusterError::PeerUnreachable { .. }));
        assert_eq!(err.code(), Code::Unavailable);
        assert_eq!(ClusterError::Closed.code(), Code::Unavailable);
    }

    #[test]
    fn remote_codes_pass_through() {
        let addr: SocketAddr = ([127, 0, 0, 1], 1).into();
        let err = ClusterError::from_status(addr, &Status::resource_exhausted("full"));
        assert_eq!(err.code(), Code::ResourceExhausted);
        assert_eq!(
            ClusterError::MalformedFrame("x".into()).code(),
            Code::InvalidArgument
        );
    }
}
