//! The one error type of the protocol crate.

use alloc::string::String;

use crate::credentials::CredentialError;

/// Why a protocol value was rejected. Every variant is a client mistake (HTTP 400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    /// A bucket id is not `<kind>.<key>` with the allowed characters and lengths.
    #[error("invalid bucket id {0:?}: expected <kind>.<key>, kind [a-z][a-z0-9_]{{0,31}}, key [A-Za-z0-9_-]{{1,64}}")]
    InvalidBucketId(String),
    /// A device id (a bucket set key) has characters or a length outside the rules.
    #[error("invalid device id {0:?}: expected [A-Za-z0-9_-]{{1,64}}")]
    InvalidDeviceId(String),
    /// A protobuf body could not be decoded.
    #[error("malformed protobuf body: {0}")]
    Protobuf(String),
    /// A protobuf value carried JSON text that does not parse.
    #[error("malformed JSON inside a protobuf value: {0}")]
    NestedJson(String),
    /// A required message field was absent.
    #[error("missing field {0}")]
    MissingField(&'static str),
    /// A list of bucket ids names more distinct buckets than the server takes at once.
    #[error("more than {max} distinct bucket ids in one request")]
    TooManyIds {
        /// The limit.
        max: usize,
    },
    /// A protobuf number that JSON cannot hold (NaN, ±Infinity).
    #[error("a number is NaN or infinite; bucket values are JSON numbers")]
    NonFiniteNumber,
    /// A pairing code is not 8 characters of the code alphabet (`7Q4K-92XD`).
    #[error("malformed pairing code: expected 8 characters like 7Q4K-92XD")]
    InvalidPairingCode,
    /// A credential id, secret or credential header was malformed.
    #[error(transparent)]
    Credential(#[from] CredentialError),
}
