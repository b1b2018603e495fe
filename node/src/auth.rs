//! Who is calling, and what they may touch.
//!
//! Requests carry HTTP Basic auth whose user name is a credential id (API.md
//! "Credentials"): `d.<serial>.<key_id>` and `a.<serial>` name a device, `u.<id>` a user.
//! This foundation parses the id and enforces authorization from it; verifying the secret
//! (HMAC default credentials, hashed assigned credentials) is the credentials issue's
//! job. Until then the node serves plain HTTP on loopback only (see `config`), so an
//! unverified identity never leaves the machine.

use actix_web::http::header::{HeaderMap, AUTHORIZATION};
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use tether_proto::{BucketId, SetKey};

use crate::error::{NodeError, Result};

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// A device, by serial (= its bucket set key).
    Device(SetKey),
    /// A user account (apps act as users).
    User(String),
}

fn component_ok(c: &str) -> bool {
    !c.is_empty()
        && c.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Parses a credential id into the principal it names.
pub fn principal_from_id(id: &str) -> Result<Principal> {
    let parts: Vec<&str> = id.split('.').collect();
    if !parts.iter().all(|c| component_ok(c)) {
        return Err(NodeError::Unauthorized("malformed credential id".into()));
    }
    match parts.as_slice() {
        ["d", serial, _] | ["a", serial] => SetKey::parse(serial)
            .map(Principal::Device)
            .map_err(|_| NodeError::Unauthorized("malformed device serial in credentials".into())),
        ["u", user] => Ok(Principal::User((*user).to_string())),
        _ => Err(NodeError::Unauthorized("unknown credential kind".into())),
    }
}

/// Extracts the principal from `Authorization: Basic …`.
pub fn principal(headers: &HeaderMap) -> Result<Principal> {
    let missing = || NodeError::Unauthorized("missing or malformed Basic credentials".into());
    let value = headers
        .get(AUTHORIZATION)
        .ok_or_else(missing)?
        .to_str()
        .map_err(|_| missing())?;
    let (scheme, b64) = value.split_once(' ').ok_or_else(missing)?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return Err(missing());
    }
    let decoded = STANDARD.decode(b64.trim()).map_err(|_| missing())?;
    let text = std::str::from_utf8(&decoded).map_err(|_| missing())?;
    let (id, secret) = text.split_once(':').ok_or_else(missing)?;
    if secret.is_empty() {
        return Err(missing());
    }
    principal_from_id(id)
}

impl Principal {
    /// The bucket sets this principal may read and write (DESIGN §1). Users own no sets
    /// until pairing exists.
    pub fn sets(&self) -> Vec<SetKey> {
        match self {
            Principal::Device(set) => vec![set.clone()],
            Principal::User(_) => Vec::new(),
        }
    }

    /// Whether the principal may read and write `id`'s set: 403 otherwise (checked before
    /// existence, so a 404 only ever concerns the caller's own sets).
    pub fn authorize(&self, id: &BucketId) -> Result<()> {
        match self {
            Principal::Device(set) if set.as_str() == id.key() => Ok(()),
            _ => Err(NodeError::Forbidden(format!("no access to bucket {id}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credential_ids_name_devices_and_users() {
        assert_eq!(
            principal_from_id("d.01AA.k1").ok(),
            Some(Principal::Device(SetKey::parse("01AA").expect("valid")))
        );
        assert_eq!(
            principal_from_id("a.01AA").ok(),
            Some(Principal::Device(SetKey::parse("01AA").expect("valid")))
        );
        assert_eq!(
            principal_from_id("u.alice").ok(),
            Some(Principal::User("alice".into()))
        );
        for bad in [
            "", "x.1", "a.", "a.1.2", "d.1", "a.a b", "u.", "a..b", "a.é",
        ] {
            assert!(principal_from_id(bad).is_err(), "{bad:?}");
        }
    }
}
