//! Peer authentication with the shared cluster secret.
//!
//! The internal gRPC port is not for devices. Every gossip frame carries an
//! HMAC-SHA256 of its sender address and payload under the cluster secret, in the
//! binary metadata entry [`FRAME_MAC_KEY`]; the receiver recomputes it and compares in
//! constant time, and answers `Unauthenticated` to a frame without a valid one before
//! the membership protocol sees a byte of it. The secret itself never crosses the wire.
//! Other peer services (forwarding) use [`ClusterSecret::peer_token`] /
//! [`ClusterSecret::verify_peer_token`] in [`PEER_TOKEN_KEY`] (a key derived from the
//! secret, not the secret), for which [`PeerAuthInterceptor`] is the tonic interceptor on
//! both sides.
//!
//! **Rotation.** A node may hold two secrets at once ([`ClusterSecret::with_keys`]). It
//! then signs with *both* (the metadata value is one 32-byte tag per secret) and accepts a
//! frame or token when *any* tag verifies under *any* of its secrets. So nodes holding
//! `[old]`, `[old, new]` and `[new, old]` all talk to each other, as do `[old, new]` and
//! `[new]`: a secret is rotated in two rolling restarts without a partition — first every
//! node gets both secrets, then every node only the new one. Only `[old]` and `[new]`
//! refuse each other, which the two steps never put side by side.
//!
//! Without TLS on the internal port a network observer can read and replay frames
//! (gossip is idempotent; a replayed frame is as stale as a delayed one) but cannot
//! forge one. Confidentiality is TLS's job.

use std::sync::Arc;

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
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
const KEY_ID_DOMAIN: &[u8] = b"tether-cluster-key-id-v1";
/// Length of one tag (HMAC-SHA256).
const TAG_LEN: usize = 32;

/// The secret(s) every node of one cluster shares; proves a caller is a peer.
#[derive(Clone)]
pub struct ClusterSecret {
    keys: Arc<[Vec<u8>]>,
    /// The peer token's tag under each key, derived once: every forwarded call sends or
    /// checks them.
    tokens: Arc<[[u8; TAG_LEN]]>,
}

impl ClusterSecret {
    /// Shortest secret accepted (128 bits).
    pub const MIN_LEN: usize = 16;
    /// Most secrets a node holds at once (the current one and the one being rotated in or
    /// out).
    pub const MAX_KEYS: usize = 2;

    /// Wraps `secret`, refusing one shorter than [`Self::MIN_LEN`] bytes.
    pub fn new(secret: impl Into<Vec<u8>>) -> Result<Self, ClusterError> {
        Self::with_keys(vec![secret.into()])
    }

    /// Several secrets at once, for rotation: frames and tokens are signed with every
    /// one and accepted under any one. 1 to [`Self::MAX_KEYS`] distinct secrets, each at
    /// least [`Self::MIN_LEN`] bytes.
    pub fn with_keys(keys: Vec<Vec<u8>>) -> Result<Self, ClusterError> {
        if keys.is_empty() || keys.len() > Self::MAX_KEYS {
            return Err(ClusterError::InvalidConfig(format!(
                "{} cluster secrets given: a node holds 1 to {} (the current one and the one \
                 being rotated)",
                keys.len(),
                Self::MAX_KEYS
            )));
        }
        if keys.iter().any(|k| k.len() < Self::MIN_LEN) {
            return Err(ClusterError::WeakSecret { min: Self::MIN_LEN });
        }
        for (i, k) in keys.iter().enumerate() {
            if keys[..i].contains(k) {
                return Err(ClusterError::InvalidConfig(
                    "the same cluster secret is given twice".into(),
                ));
            }
        }
        let tokens = keys.iter().map(|k| Self::token_tag(k)).collect();
        Ok(Self {
            keys: keys.into(),
            tokens,
        })
    }

    /// How many secrets this node holds.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Never true: a node holds at least one secret.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Short public identifiers of the secrets (16 hex digits of a hash derived from each),
    /// for logs and metrics: operators check that every node holds the same ones during a
    /// rotation without seeing a secret.
    pub fn key_ids(&self) -> Vec<String> {
        self.keys
            .iter()
            .map(|k| {
                let mut h = Sha256::new();
                h.update(KEY_ID_DOMAIN);
                h.update(k);
                h.finalize()[..8]
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect()
            })
            .collect()
    }

    fn hmac(key: &[u8]) -> HmacSha256 {
        // HMAC accepts keys of any length; `new_from_slice` cannot fail for it.
        match HmacSha256::new_from_slice(key) {
            Ok(mac) => mac,
            Err(_) => unreachable!("HMAC takes keys of any length"),
        }
    }

    fn frame_tag(key: &[u8], from: &str, payload: &[u8]) -> [u8; TAG_LEN] {
        let mut mac = Self::hmac(key);
        mac.update(FRAME_DOMAIN);
        mac.update(&(from.len() as u64).to_be_bytes());
        mac.update(from.as_bytes());
        mac.update(payload);
        mac.finalize().into_bytes().into()
    }

    fn token_tag(key: &[u8]) -> [u8; TAG_LEN] {
        let mut mac = Self::hmac(key);
        mac.update(TOKEN_DOMAIN);
        mac.finalize().into_bytes().into()
    }

    /// Whether one of the 32-byte tags in `tags` equals one of `expected`, compared in
    /// constant time (every pair is compared).
    fn any_matches(expected: &[[u8; TAG_LEN]], tags: &[u8]) -> bool {
        if tags.is_empty() || tags.len() % TAG_LEN != 0 || tags.len() / TAG_LEN > Self::MAX_KEYS {
            return false;
        }
        let mut ok = subtle::Choice::from(0);
        for tag in tags.chunks_exact(TAG_LEN) {
            for e in expected {
                ok |= e.ct_eq(tag);
            }
        }
        ok.into()
    }

    /// The MAC a sender attaches to the frame `(from, payload)`: one tag per secret.
    pub fn sign_frame(&self, from: &str, payload: &[u8]) -> Vec<u8> {
        self.keys
            .iter()
            .flat_map(|k| Self::frame_tag(k, from, payload))
            .collect()
    }

    /// Checks `tags` against the frame: accepted when a tag verifies under one of this
    /// node's secrets.
    pub fn verify_frame(
        &self,
        from: &str,
        payload: &[u8],
        tags: &[u8],
    ) -> Result<(), ClusterError> {
        let expected: Vec<_> = self
            .keys
            .iter()
            .map(|k| Self::frame_tag(k, from, payload))
            .collect();
        if Self::any_matches(&expected, tags) {
            Ok(())
        } else {
            Err(ClusterError::Unauthenticated("bad frame MAC"))
        }
    }

    /// The token a peer presents on non-gossip calls: a key derived from each secret.
    pub fn peer_token(&self) -> Vec<u8> {
        self.tokens.concat()
    }

    /// Checks the peer token in `metadata` in constant time.
    pub fn verify_peer_token(&self, metadata: &MetadataMap) -> Result<(), ClusterError> {
        let token = metadata
            .get_bin(PEER_TOKEN_KEY)
            .ok_or(ClusterError::Unauthenticated("missing peer token"))?
            .to_bytes()
            .map_err(|_| ClusterError::Unauthenticated("undecodable peer token"))?;
        if Self::any_matches(&self.tokens, &token) {
            Ok(())
        } else {
            Err(ClusterError::Unauthenticated("bad peer token"))
        }
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
    side: Side,
}

#[derive(Clone)]
enum Side {
    /// The token every call carries, encoded once.
    Client(MetadataValue<tonic::metadata::Binary>),
    Server(ClusterSecret),
}

impl std::fmt::Debug for Side {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The token proves a peer: never in a log.
        f.write_str(match self {
            Side::Client(_) => "Client(<redacted token>)",
            Side::Server(_) => "Server(ClusterSecret(<redacted>))",
        })
    }
}

impl PeerAuthInterceptor {
    /// For clients: adds the token to every request.
    pub fn client(secret: ClusterSecret) -> Self {
        Self {
            side: Side::Client(MetadataValue::from_bytes(&secret.peer_token())),
        }
    }

    /// For servers: rejects every request without a valid token (`Unauthenticated`).
    pub fn server(secret: ClusterSecret) -> Self {
        Self {
            side: Side::Server(secret),
        }
    }
}

impl tonic::service::Interceptor for PeerAuthInterceptor {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        match &self.side {
            Side::Client(token) => {
                request
                    .metadata_mut()
                    .insert_bin(PEER_TOKEN_KEY, token.clone());
                Ok(request)
            }
            Side::Server(secret) => {
                secret.verify_peer_token(request.metadata())?;
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

    fn keys(ks: &[&str]) -> ClusterSecret {
        ClusterSecret::with_keys(ks.iter().map(|k| k.as_bytes().to_vec()).collect())
            .expect("valid keys")
    }

    /// Which pairs of nodes, holding which secrets, accept each other's frames and tokens:
    /// the table behind the two-step rotation (module docs).
    #[test]
    fn rotation_table_old_both_new() {
        const OLD: &str = "old-secret-0123456789";
        const NEW: &str = "new-secret-9876543210";
        let cases: &[(&[&str], &[&str], bool)] = &[
            (&[OLD], &[OLD], true),
            (&[OLD], &[OLD, NEW], true),
            (&[OLD, NEW], &[OLD], true),
            (&[NEW, OLD], &[OLD], true),
            (&[OLD, NEW], &[NEW, OLD], true),
            (&[OLD, NEW], &[NEW], true),
            (&[NEW], &[OLD, NEW], true),
            (&[NEW], &[NEW], true),
            (&[OLD], &[NEW], false),
            (&[NEW], &[OLD], false),
        ];
        for (sender, receiver, accepted) in cases {
            let (s, r) = (keys(sender), keys(receiver));
            let tag = s.sign_frame("10.0.0.1:7000", b"frame");
            assert_eq!(
                r.verify_frame("10.0.0.1:7000", b"frame", &tag).is_ok(),
                *accepted,
                "frame {sender:?} -> {receiver:?}"
            );
            let mut md = MetadataMap::new();
            md.insert_bin(PEER_TOKEN_KEY, MetadataValue::from_bytes(&s.peer_token()));
            assert_eq!(
                r.verify_peer_token(&md).is_ok(),
                *accepted,
                "token {sender:?} -> {receiver:?}"
            );
        }
    }

    #[test]
    fn key_sets_are_checked_and_identified_without_revealing_them() {
        assert!(ClusterSecret::with_keys(vec![]).is_err());
        assert!(ClusterSecret::with_keys(vec![b"a-secret-0123456789".to_vec(); 2]).is_err());
        assert!(ClusterSecret::with_keys(vec![
            b"one-secret-0123456789".to_vec(),
            b"two-secret-0123456789".to_vec(),
            b"three-secret-0123456789".to_vec(),
        ])
        .is_err());
        assert!(matches!(
            ClusterSecret::with_keys(vec![b"long-enough-0123456".to_vec(), b"short".to_vec()]),
            Err(ClusterError::WeakSecret { .. })
        ));
        let both = keys(&["old-secret-0123456789", "new-secret-9876543210"]);
        let ids = both.key_ids();
        assert_eq!(ids.len(), 2);
        assert_eq!(ids[0], keys(&["old-secret-0123456789"]).key_ids()[0]);
        assert_ne!(ids[0], ids[1]);
        assert!(ids
            .iter()
            .all(|id| id.len() == 16 && !id.contains("secret")));
    }

    #[test]
    fn malformed_tag_lists_are_refused() {
        let s = keys(&["old-secret-0123456789", "new-secret-9876543210"]);
        let tags = s.sign_frame("a", b"p");
        assert_eq!(tags.len(), 64);
        assert!(s.verify_frame("a", b"p", &tags).is_ok());
        assert!(s.verify_frame("a", b"p", &tags[..32]).is_ok());
        assert!(s.verify_frame("a", b"p", &tags[32..]).is_ok());
        assert!(s.verify_frame("a", b"p", &tags[..40]).is_err());
        assert!(s.verify_frame("a", b"p", &[]).is_err());
        let mut three = tags.clone();
        three.extend_from_slice(&tags[..32]);
        assert!(
            s.verify_frame("a", b"p", &three).is_err(),
            "more tags than secrets"
        );
    }

    #[test]
    fn secret_is_redacted_in_debug() {
        let s = secret("0123456789abcdef-cluster");
        assert!(!format!("{s:?}").contains("0123"));
        // Nor the token derived from it, in either interceptor.
        let token = s.peer_token();
        let forms = [
            token[..8]
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>(),
            format!("{:?}", &token[..4])
                .trim_matches(['[', ']'])
                .to_string(),
            format!("{:?}", MetadataValue::from_bytes(&token)),
        ];
        for text in [
            format!("{:?}", PeerAuthInterceptor::client(s.clone())),
            format!("{:?}", PeerAuthInterceptor::server(s.clone())),
        ] {
            assert!(!text.contains("0123"), "{text}");
            for form in &forms {
                assert!(!text.contains(form.as_str()), "{text} shows {form}");
            }
        }
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
