//! Peer authentication with the shared cluster secret.
//!
//! The internal gRPC port is not for devices. Every gossip frame carries an
//! HMAC-SHA256 of its sender address and payload under the cluster secret, in the
//! binary metadata entry [`FRAME_MAC_KEY`]; the receiver recomputes it and compares in
//! constant time ([`hmac::Mac::verify_slice`]), and answers `Unauthenticated` to a frame
//! without a valid one before the membership protocol sees a byte of it. The secret
//! itself never crosses the wire. Other peer services (forwarding) use
//! [`ClusterSecret::peer_token`] / [`ClusterSecret::verify_peer_token`] in
//! [`PEER_TOKEN_KEY`] (a key derived from the secret, not the secret), for which
//! [`PeerAuthInterceptor`] is the tonic interceptor on both sides.
//!
//! Without TLS on the internal port a network observer can read and replay frames
//! (gossip is idempotent; a replayed frame is as stale as a delayed one) but cannot
//! forge one. Confidentiality is TLS's job.

use hmac::{Hmac, Mac};
use sha2::Sha256;
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::{Request, Status};

use crate::ClusterError;

type HmacSha256 = Hmac<Sha256>;

/// Binary gRPC metadata key of a gossip frame's MAC.
pub const FRAME_MAC_KEY: &str = "x-tether-cluster-mac-bin";
/// Binary gRPC metadata key of the peer token for non-gossip peer calls.
pub const PEER_TOKEN_KEY: &str = "x-tether-cluster-token-bin";

const FRAME_DOMAIN: &[u8] = b"tether-cluster-gossip-frame-v1\0";
const TOKEN_DOMAIN: &[u8] = b"tether-cluster-peer-token-v1";

/// The secret every node of one cluster shares; proves a caller is a peer.
#[derive(Clone)]
pub struct ClusterSecret(Vec<u8>);

impl ClusterSecret {
    /// Shortest secret accepted (128 bits).
    pub const MIN_LEN: usize = 16;

    /// Wraps `secret`, refusing one shorter than [`Self::MIN_LEN`] bytes.
    pub fn new(secret: impl Into<Vec<u8>>) -> Result<Self, ClusterError> {
        let secret = secret.into();
        if secret.len() < Self::MIN_LEN {
            return Err(ClusterError::WeakSecret { min: Self::MIN_LEN });
        }
        Ok(Self(secret))
    }

    fn hmac(&self) -> HmacSha256 {
        // HMAC accepts keys of any length; `new_from_slice` cannot fail for it.
        match HmacSha256::new_from_slice(&self.0) {
            Ok(mac) => mac,
            Err(_) => unreachable!("HMAC takes keys of any length"),
        }
    }

    fn frame_mac(&self, from: &str, payload: &[u8]) -> HmacSha256 {
        let mut mac = self.hmac();
        mac.update(FRAME_DOMAIN);
        mac.update(&(from.len() as u64).to_be_bytes());
        mac.update(from.as_bytes());
        mac.update(payload);
        mac
    }

    /// The MAC a sender attaches to the frame `(from, payload)`.
    pub fn sign_frame(&self, from: &str, payload: &[u8]) -> [u8; 32] {
        self.frame_mac(from, payload).finalize().into_bytes().into()
    }

    /// Checks `tag` against the frame in constant time.
    pub fn verify_frame(&self, from: &str, payload: &[u8], tag: &[u8]) -> Result<(), ClusterError> {
        self.frame_mac(from, payload)
            .verify_slice(tag)
            .map_err(|_| ClusterError::Unauthenticated("bad frame MAC"))
    }

    /// The token a peer presents on non-gossip calls: a key derived from the secret.
    pub fn peer_token(&self) -> [u8; 32] {
        let mut mac = self.hmac();
        mac.update(TOKEN_DOMAIN);
        mac.finalize().into_bytes().into()
    }

    /// Checks the peer token in `metadata` in constant time.
    pub fn verify_peer_token(&self, metadata: &MetadataMap) -> Result<(), ClusterError> {
        let token = metadata
            .get_bin(PEER_TOKEN_KEY)
            .ok_or(ClusterError::Unauthenticated("missing peer token"))?
            .to_bytes()
            .map_err(|_| ClusterError::Unauthenticated("undecodable peer token"))?;
        let mut mac = self.hmac();
        mac.update(TOKEN_DOMAIN);
        mac.verify_slice(&token)
            .map_err(|_| ClusterError::Unauthenticated("bad peer token"))
    }
}

impl std::fmt::Debug for ClusterSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClusterSecret(<redacted>)")
    }
}

/// Attaches the peer token to outgoing calls (client side) or verifies it on incoming
/// ones (server side), so a forwarding service needs no auth code of its own.
#[derive(Debug, Clone)]
pub struct PeerAuthInterceptor {
    secret: ClusterSecret,
    side: Side,
}

#[derive(Debug, Clone, Copy)]
enum Side {
    Client,
    Server,
}

impl PeerAuthInterceptor {
    /// For clients: adds the token to every request.
    pub fn client(secret: ClusterSecret) -> Self {
        Self {
            secret,
            side: Side::Client,
        }
    }

    /// For servers: rejects every request without a valid token (`Unauthenticated`).
    pub fn server(secret: ClusterSecret) -> Self {
        Self {
            secret,
            side: Side::Server,
        }
    }
}

impl tonic::service::Interceptor for PeerAuthInterceptor {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        match self.side {
            Side::Client => {
                let token = MetadataValue::from_bytes(&self.secret.peer_token());
                request.metadata_mut().insert_bin(PEER_TOKEN_KEY, token);
                Ok(request)
            }
            Side::Server => {
                self.secret.verify_peer_token(request.metadata())?;
                Ok(request)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use tonic::service::Interceptor;

    use super::*;

    fn secret(s: &str) -> ClusterSecret {
        ClusterSecret::new(s.as_bytes().to_vec()).expect("long enough")
    }

    #[test]
    fn short_secret_is_refused() {
        assert!(matches!(
            ClusterSecret::new(b"short".to_vec()),
            Err(ClusterError::WeakSecret { .. })
        ));
    }

    #[test]
    fn frame_mac_binds_sender_and_payload() {
        let s = secret("0123456789abcdef-cluster");
        let tag = s.sign_frame("127.0.0.1:7000", b"payload");
        assert!(s.verify_frame("127.0.0.1:7000", b"payload", &tag).is_ok());
        assert!(s.verify_frame("127.0.0.1:7001", b"payload", &tag).is_err());
        assert!(s.verify_frame("127.0.0.1:7000", b"payloaD", &tag).is_err());
        assert!(s
            .verify_frame("127.0.0.1:7000", b"payload", &tag[..31])
            .is_err());
        let other = secret("fedcba9876543210-cluster");
        assert!(other
            .verify_frame("127.0.0.1:7000", b"payload", &tag)
            .is_err());
    }

    #[test]
    fn secret_is_redacted_in_debug() {
        let s = secret("0123456789abcdef-cluster");
        assert!(!format!("{s:?}").contains("0123"));
    }

    #[test]
    fn peer_token_interceptors_accept_peers_and_reject_others() {
        let s = secret("0123456789abcdef-cluster");
        let mut client = PeerAuthInterceptor::client(s.clone());
        let mut server = PeerAuthInterceptor::server(s);
        let signed = client
            .call(Request::new(()))
            .expect("client side never fails");
        assert!(server.call(signed).is_ok());

        let status = server
            .call(Request::new(()))
            .expect_err("no token is refused");
        assert_eq!(status.code(), tonic::Code::Unauthenticated);

        let mut stranger = PeerAuthInterceptor::client(secret("fedcba9876543210-cluster"));
        let forged = stranger.call(Request::new(())).expect("client side");
        let status = server.call(forged).expect_err("wrong secret is refused");
        assert_eq!(status.code(), tonic::Code::Unauthenticated);
    }
}
