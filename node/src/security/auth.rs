//! Who is calling, and what they may touch (API.md "Authentication", "Credentials";
//! DESIGN.md §1 principals, §5 security).
//!
//! Every `/v1` request carries HTTP Basic credentials. [`Auth::authenticate`] verifies
//! them for the endpoint being called, applies the registration rules of seed 000
//! FIG 28C for default credentials, rotation for assigned ones, the per-principal rate
//! limit, and returns the [`Principal`] with the bucket scope it may read and write.

use std::collections::BTreeSet;
use std::sync::Arc;

use actix_web::http::header::AUTHORIZATION;
use actix_web::{HttpMessage, HttpRequest};
use tether_proto::credentials::{parse_basic, CredentialId, CredentialKind, Credentials};
use tether_proto::{BucketId, SetKey};

use crate::error::{NodeError, Result};
use crate::routing::router::Router;
use crate::security::credentials::CredentialService;

/// The bucket kind of structures (`structure.<id>`); every other kind belongs to a device.
pub const STRUCTURE_KIND: &str = "structure";

/// Which credential kinds an endpoint takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `POST /v1/register`: default or assigned device credentials.
    Register,
    /// Buckets and subscribe: assigned device credentials or a user.
    Buckets,
    /// `POST /v1/pairing-code`: assigned device credentials.
    PairingCode,
    /// Pairing and unpairing: a user.
    UserOnly,
}

/// An authenticated caller and the buckets it may touch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// A device, by serial (= its bucket set key), and the structure it joined.
    Device {
        /// Its serial.
        serial: SetKey,
        /// The structure it was paired into, if any.
        structure: Option<String>,
    },
    /// A user account (apps act as users), with its devices and structures.
    User {
        /// The user id.
        user_id: String,
        /// Serials of its paired devices.
        devices: BTreeSet<String>,
        /// Structures it owns.
        structures: BTreeSet<String>,
    },
}

/// Credentials to send back in `X-Tether-Set-Credentials`, left in the request's
/// extensions for the response middleware (so they ride on errors and held subscribes too).
#[derive(Debug, Clone)]
pub struct SetCredentials(pub Credentials);

impl Principal {
    /// Whether `id` is inside the principal's scope: 403 otherwise, decided before
    /// existence so that a 404 only ever concerns buckets the caller could read.
    pub fn authorize(&self, id: &BucketId) -> Result<()> {
        if self.may_access(id) {
            Ok(())
        } else {
            Err(NodeError::Forbidden(format!("no access to bucket {id}")))
        }
    }

    /// The scope rule itself (DESIGN §1).
    pub fn may_access(&self, id: &BucketId) -> bool {
        let structure = id.kind() == STRUCTURE_KIND;
        match self {
            Principal::Device {
                serial,
                structure: s,
            } => {
                if structure {
                    s.as_deref() == Some(id.key())
                } else {
                    serial.as_str() == id.key()
                }
            }
            Principal::User {
                devices,
                structures,
                ..
            } => {
                if structure {
                    structures.contains(id.key())
                } else {
                    devices.contains(id.key())
                }
            }
        }
    }

    /// The bucket sets that hold the principal's buckets (filter with `may_access`).
    pub fn sets(&self) -> Vec<SetKey> {
        let keys: Vec<&str> = match self {
            Principal::Device { serial, structure } => std::iter::once(serial.as_str())
                .chain(structure.as_deref())
                .collect(),
            Principal::User {
                devices,
                structures,
                ..
            } => devices
                .iter()
                .chain(structures.iter())
                .map(String::as_str)
                .collect(),
        };
        let unique: BTreeSet<&str> = keys.into_iter().collect();
        unique
            .into_iter()
            .filter_map(|k| SetKey::parse(k).ok())
            .collect()
    }

    /// How the bucket log names this principal as a writer: `device:<serial>` or
    /// `user:<id>` (also who may replay a write's op id).
    pub fn author(&self) -> String {
        match self {
            Principal::Device { serial, .. } => format!("device:{serial}"),
            Principal::User { user_id, .. } => format!("user:{user_id}"),
        }
    }

    /// The device serial, for device principals.
    pub fn device(&self) -> Option<&SetKey> {
        match self {
            Principal::Device { serial, .. } => Some(serial),
            Principal::User { .. } => None,
        }
    }
}

/// The authenticator: credential checks plus the pairing data that scopes a principal.
#[derive(Debug)]
pub struct Auth {
    /// Credential verification, issuing, rotation and rate limits.
    pub credentials: CredentialService,
    router: Arc<Router>,
}

fn default_not_allowed() -> NodeError {
    NodeError::DefaultCredentialsNotAllowed(
        "default credentials may only register; use the assigned credentials registration returned"
            .into(),
    )
}

impl Auth {
    /// An authenticator over the store.
    pub fn new(credentials: CredentialService, router: Arc<Router>) -> Self {
        Auth {
            credentials,
            router,
        }
    }

    /// Verifies the request's credentials for `endpoint` and resolves the principal.
    /// `secure` says whether the connection is TLS or loopback development mode.
    pub async fn authenticate(
        &self,
        req: &HttpRequest,
        endpoint: Endpoint,
        secure: bool,
    ) -> Result<Principal> {
        let header = req
            .headers()
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| NodeError::Unauthorized("missing Basic credentials".into()))?;
        let creds = parse_basic(header)
            .map_err(|_| NodeError::Unauthorized("malformed Basic credentials".into()))?;
        let id = CredentialId::parse(&creds.id)
            .map_err(|_| NodeError::Unauthorized("malformed credential id".into()))?;
        let mut set = None;
        let principal = match (&id, id.kind()) {
            (CredentialId::Default { serial, .. }, CredentialKind::Default) => {
                if endpoint != Endpoint::Register {
                    return Err(default_not_allowed());
                }
                let serial = SetKey::parse(serial)?;
                // FIG 28C, in the seed's order: secure connection, rate, validity, contact.
                if !secure {
                    return Err(NodeError::Forbidden(
                        "default credentials are accepted over TLS only".into(),
                    ));
                }
                self.credentials.check_register_rate(serial.as_str())?;
                self.credentials
                    .throttled(&creds.id, async { self.credentials.verify_default(&creds) })
                    .await?;
                let (assigned, lost) = self.credentials.issue_assigned(serial.as_str()).await?;
                if lost {
                    // The lost-credentials case: the old set is revoked (replaced above) and
                    // the device must be paired again (1850–1852).
                    let old = self
                        .router
                        .shared()
                        .store
                        .set_pairing(serial.as_str(), None)
                        .await?;
                    let structure = old.and_then(|p| p.structure);
                    self.router
                        .release_held(std::iter::once(serial.as_str()).chain(structure.as_deref()));
                    tracing::warn!(device = %serial, "default credentials presented again: assigned set replaced, device unpaired");
                } else {
                    tracing::info!(device = %serial, "first contact: assigned credentials issued");
                }
                set = Some(assigned);
                Principal::Device {
                    serial,
                    structure: None,
                }
            }
            (CredentialId::Assigned { serial }, _) => {
                let serial = SetKey::parse(serial)?;
                set = self
                    .credentials
                    .throttled(
                        &creds.id,
                        self.credentials.verify_assigned(&creds, serial.as_str()),
                    )
                    .await?;
                let structure = self
                    .router
                    .shared()
                    .store
                    .get_pairing(serial.as_str())
                    .await?
                    .and_then(|p| p.structure);
                Principal::Device { serial, structure }
            }
            (CredentialId::User { user_id }, _) => {
                self.credentials
                    .throttled(&creds.id, self.credentials.verify_user(&creds, user_id))
                    .await?;
                let devices = self
                    .router
                    .shared()
                    .store
                    .user_pairings(user_id)
                    .await?
                    .into_iter()
                    .map(|p| p.device_id)
                    .collect();
                let structures = self
                    .router
                    .shared()
                    .store
                    .user_structures(user_id)
                    .await?
                    .into_iter()
                    .collect();
                Principal::User {
                    user_id: user_id.clone(),
                    devices,
                    structures,
                }
            }
            _ => return Err(NodeError::Unauthorized("unknown credential kind".into())),
        };
        if let Some(c) = set {
            req.extensions_mut().insert(SetCredentials(c));
        }
        self.credentials.check_rate(&creds.id)?;
        match (endpoint, &principal) {
            (Endpoint::Register | Endpoint::PairingCode, Principal::User { .. }) => {
                Err(NodeError::Forbidden("this endpoint is for devices".into()))
            }
            (Endpoint::UserOnly, Principal::Device { .. }) => {
                Err(NodeError::Forbidden("this endpoint is for users".into()))
            }
            _ => Ok(principal),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(serial: &str, structure: Option<&str>) -> Principal {
        Principal::Device {
            serial: SetKey::parse(serial).expect("valid"),
            structure: structure.map(String::from),
        }
    }

    fn id(s: &str) -> BucketId {
        BucketId::parse(s).expect("valid id")
    }

    #[test]
    fn devices_reach_their_own_set_and_their_structure_only() {
        let d = device("01AA", Some("home1"));
        assert!(d.may_access(&id("device.01AA")) && d.may_access(&id("shared.01AA")));
        assert!(d.may_access(&id("structure.home1")));
        assert!(!d.may_access(&id("device.01BB")) && !d.may_access(&id("structure.home2")));
        // A structure id equal to a serial does not open that device's buckets, and vice versa.
        assert!(!device("home1", None).may_access(&id("structure.home1")));
        assert!(!d.may_access(&id("device.home1")));
    }

    #[test]
    fn users_reach_their_devices_and_structures() {
        let u = Principal::User {
            user_id: "alice".into(),
            devices: ["01AA".to_string()].into(),
            structures: ["home1".to_string()].into(),
        };
        assert!(u.may_access(&id("shared.01AA")) && u.may_access(&id("structure.home1")));
        assert!(!u.may_access(&id("shared.01BB")) && !u.may_access(&id("structure.01AA")));
        assert_eq!(u.sets().len(), 2);
    }
}
