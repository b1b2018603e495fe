//! The bucket model of seed 000: a bucket id, field/value pairs, a timestamp and a version.

use alloc::string::{String, ToString};
use core::fmt;

use serde::{Deserialize, Serialize};

use crate::{Hlc, ProtoError};

/// A JSON value of one field.
pub type Value = serde_json::Value;
/// A bucket's contents: field name → value (a JSON object).
pub type Fields = serde_json::Map<String, Value>;

const MAX_KIND: usize = 32;
const MAX_KEY: usize = 64;

fn valid_key(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= MAX_KEY
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

fn valid_kind(kind: &str) -> bool {
    let mut bytes = kind.bytes();
    matches!(bytes.next(), Some(b'a'..=b'z'))
        && kind.len() <= MAX_KIND
        && bytes.all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// The key shared by the buckets of one bucket set (`device.X`, `shared.X` → `X`):
/// the unit of sharding, ownership and atomic commit. For a device it is its id.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct SetKey(String);

impl SetKey {
    /// Validates a set key (`[A-Za-z0-9_-]{1,64}`); device ids follow the same rule.
    pub fn parse(key: &str) -> Result<Self, ProtoError> {
        if valid_key(key) {
            Ok(SetKey(key.to_string()))
        } else {
            Err(ProtoError::InvalidDeviceId(key.to_string()))
        }
    }

    /// The key as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for SetKey {
    type Error = ProtoError;
    fn try_from(s: String) -> Result<Self, ProtoError> {
        if valid_key(&s) {
            Ok(SetKey(s))
        } else {
            Err(ProtoError::InvalidDeviceId(s))
        }
    }
}

impl From<SetKey> for String {
    fn from(k: SetKey) -> String {
        k.0
    }
}

impl fmt::Display for SetKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A validated bucket id `<kind>.<key>`, e.g. `device.01AA02AB`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct BucketId {
    text: String,
    dot: usize,
}

impl BucketId {
    /// Parses and validates an id.
    pub fn parse(s: &str) -> Result<Self, ProtoError> {
        Self::try_from(s.to_string())
    }

    /// Builds the id of bucket `kind` in set `set`.
    pub fn new(kind: &str, set: &SetKey) -> Result<Self, ProtoError> {
        let mut text = String::with_capacity(kind.len() + 1 + set.0.len());
        text.push_str(kind);
        text.push('.');
        text.push_str(&set.0);
        Self::try_from(text)
    }

    /// The bucket kind (`device`, `shared`, `structure`, …).
    pub fn kind(&self) -> &str {
        &self.text[..self.dot]
    }

    /// The key of the set this bucket belongs to.
    pub fn set_key(&self) -> SetKey {
        SetKey(self.text[self.dot + 1..].to_string())
    }

    /// The key as a borrowed string.
    pub fn key(&self) -> &str {
        &self.text[self.dot + 1..]
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl TryFrom<String> for BucketId {
    type Error = ProtoError;
    fn try_from(text: String) -> Result<Self, ProtoError> {
        match text.split_once('.') {
            Some((kind, key)) if valid_kind(kind) && valid_key(key) => Ok(BucketId {
                dot: kind.len(),
                text,
            }),
            _ => Err(ProtoError::InvalidBucketId(text)),
        }
    }
}

impl From<BucketId> for String {
    fn from(id: BucketId) -> String {
        id.text
    }
}

impl fmt::Display for BucketId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// A bucket as the server stores it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Bucket {
    /// Its id; the set is derived from it.
    pub id: BucketId,
    /// Field/value pairs.
    pub value: Fields,
    /// Server-assigned at receipt of the write that produced this state.
    pub timestamp: Hlc,
    /// Unique for the bucket, increasing with every accepted change, starting at 1.
    pub version: u64,
}

impl Bucket {
    /// A newly created bucket (registration): the given fields, version 1.
    pub fn created(id: BucketId, value: Fields, now: Hlc) -> Self {
        Bucket {
            id,
            value,
            timestamp: now,
            version: 1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_ids_split_into_kind_and_set() {
        let id = BucketId::parse("device.01AA02AB").expect("valid");
        assert_eq!(id.kind(), "device");
        assert_eq!(id.set_key().as_str(), "01AA02AB");
    }

    #[test]
    fn bad_bucket_ids_are_rejected() {
        for bad in [
            "",
            "device",
            ".x",
            "device.",
            "Device.x",
            "dev ice.x",
            "device.a.b",
            "device.a/b",
            "1device.x",
            "device.\u{e9}",
        ] {
            assert!(BucketId::parse(bad).is_err(), "{bad:?} should be invalid");
        }
        let long = alloc::format!("device.{}", "a".repeat(65));
        assert!(BucketId::parse(&long).is_err());
    }

    #[test]
    fn bucket_ids_deserialize_only_when_valid() {
        assert!(serde_json::from_str::<BucketId>("\"shared.x-1\"").is_ok());
        assert!(serde_json::from_str::<BucketId>("\"shared\"").is_err());
    }
}
