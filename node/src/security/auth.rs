//! Who is calling, and what they may touch (API.md "Authentication", "Credentials";
//! DESIGN.md §1 principals, §5 security).
//!
//! Every `/v1` request carries HTTP Basic credentials. [`Auth::authenticate`] verifies
//! them for the endpoint being called, applies the registration rules of seed 000
//! FIG 28C for default credentials, rotation for assigned ones, the per-principal rate
//! limit, and returns the [`Principal`] with the bucket scope it may read and write.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::sync::Arc;

use actix_web::http::header::AUTHORIZATION;
use actix_web::{HttpMessage, HttpRequest};
use tether_proto::credentials::{parse_basic, CredentialId, CredentialKind, Credentials};
use tether_proto::{BucketId, Fields, SetKey};

use crate::error::{NodeError, Result};
use crate::routing::router::Router;
use crate::security::credentials::{CredentialService, Forgotten};
use crate::security::limits::Sources;
use crate::security::scope::{ScopeCache, UserScope};
use crate::sets::actor::BY_SERVER;
use crate::store::registrations::Registrations;
use crate::store::{DeviceRecord, NewDevice};

/// The bucket kind of structures (`structure.<id>`); every other kind belongs to a device.
pub use crate::registration::STRUCTURE_KIND;

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

    /// Who this is, for per-principal limits: `device:<serial>` or `user:<id>`.
    pub fn key(&self) -> String {
        match self {
            Principal::Device { serial, .. } => format!("device:{serial}"),
            Principal::User { user_id, .. } => format!("user:{user_id}"),
        }
    }

    /// How the bucket log names this principal as a writer (also who may replay a write's
    /// op id): the same `device:<serial>` or `user:<id>` as [`Principal::key`].
    pub fn author(&self) -> String {
        self.key()
    }

    /// The device serial, for device principals.
    pub fn device(&self) -> Option<&SetKey> {
        match self {
            Principal::Device { serial, .. } => Some(serial),
            Principal::User { .. } => None,
        }
    }
}

/// What [`Auth::forget_idle`] let go.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IdleForgotten {
    /// Cached records, failure windows and rate-limiter keys.
    pub credentials: Forgotten,
    /// Cached scopes (pairings) past every use.
    pub scopes: usize,
}

/// The authenticator: credential checks plus the pairing data that scopes a principal.
#[derive(Debug)]
pub struct Auth {
    /// Credential verification, issuing, rotation and rate limits.
    pub credentials: CredentialService,
    router: Arc<Router>,
    sources: Sources,
    /// Principals' scopes (pairings), briefly cached.
    scopes: ScopeCache,
    /// Batched first contacts (`None`: every registration takes the general path).
    registrations: Option<Registrations>,
}

/// What a device's registration creates besides its credentials (nothing when it is
/// redirected to another tier): on first contact all of it is written with the
/// credentials in one store transaction, shared with other first contacts (issue 16).
#[derive(Debug)]
pub struct FirstContact {
    /// The device type's buckets with their initial fields.
    pub buckets: Vec<(BucketId, Fields)>,
    /// The device's registration record.
    pub record: DeviceRecord,
}

/// Verified default credentials on `POST /v1/register`: the registration they allow, not
/// yet applied. The handler validates the whole request first and only then calls
/// [`Auth::complete_registration`], so a refused request changes nothing (finding 4).
#[derive(Debug)]
#[must_use = "a verified default-credential registration does nothing until completed"]
pub struct DefaultRegistration {
    serial: SetKey,
}

fn default_not_allowed() -> NodeError {
    NodeError::DefaultCredentialsNotAllowed(
        "default credentials may only register; use the assigned credentials registration returned"
            .into(),
    )
}

impl Auth {
    /// An authenticator over the store; `sources` says who a request comes from; first
    /// contacts go to the store through `registrations` (if `None`, registrations take
    /// the general path: issue, then ensure the set through its actor, then the record).
    pub fn new(
        credentials: CredentialService,
        router: Arc<Router>,
        sources: Sources,
        registrations: Option<Registrations>,
    ) -> Self {
        let scopes = ScopeCache::new(credentials.config(), router.shared().metrics.clone());
        Auth {
            credentials,
            router,
            sources,
            scopes,
            registrations,
        }
    }

    /// Lets go of idle principals' cached records, scopes, counters and rate-limiter
    /// keys ([`CredentialService::forget_idle`], [`ScopeCache::forget_idle`]).
    pub fn forget_idle(&self, now: std::time::Instant) -> IdleForgotten {
        IdleForgotten {
            credentials: self.credentials.forget_idle(now),
            scopes: self.scopes.forget_idle(now),
        }
    }

    /// The client address of `req` (for per-source limits).
    pub fn source_of(&self, req: &HttpRequest) -> Option<IpAddr> {
        let forwarded = req
            .headers()
            .get("x-forwarded-for")
            .and_then(|v| v.to_str().ok());
        self.sources.source(req.peer_addr(), forwarded)
    }

    /// Verifies the request's credentials for `endpoint` and resolves the principal.
    /// `secure` says whether the connection is TLS or loopback development mode. Default
    /// credentials are refused here: only [`Auth::authenticate_register`] takes them.
    /// With `charge` the request counts against the principal's request rate; without,
    /// it is a request already admitted checked again (a stream between lines), which
    /// paid once.
    pub async fn authenticate(
        &self,
        req: &HttpRequest,
        endpoint: Endpoint,
        secure: bool,
        charge: bool,
    ) -> Result<Principal> {
        let (principal, pending) = self.verify(req, endpoint, secure, charge).await?;
        if pending.is_some() {
            return Err(default_not_allowed());
        }
        Ok(principal)
    }

    /// `POST /v1/register`: assigned credentials (nothing pending), or verified default
    /// credentials with the [`DefaultRegistration`] they allow once the request is valid.
    pub async fn authenticate_register(
        &self,
        req: &HttpRequest,
        secure: bool,
    ) -> Result<(Principal, Option<DefaultRegistration>)> {
        self.verify(req, Endpoint::Register, secure, true).await
    }

    /// FIG 28C 1840–1852, after the whole request was validated: charges the device's
    /// registration quota (429 once spent), issues assigned credentials (replacing any
    /// earlier set: the lost-credentials case unpairs the device) and attaches them to the
    /// response. With `first`, a device that has no credentials and no bucket set yet is
    /// registered whole — credentials, set and device record in one batched store
    /// transaction — and this returns `true`; otherwise (`false`) only the credentials
    /// are handled here and the caller creates the buckets and the record as before.
    pub async fn complete_registration(
        &self,
        req: &HttpRequest,
        grant: DefaultRegistration,
        first: Option<FirstContact>,
    ) -> Result<bool> {
        let serial = grant.serial;
        let metrics = &self.router.shared().metrics;
        self.credentials
            .charge_registration(serial.as_str())
            .inspect_err(|_| metrics.limited("register_quota"))?;
        if let Some(first) = first {
            if self.first_contact(req, &serial, first).await? {
                return Ok(true);
            }
        }
        let (assigned, lost) = self.credentials.issue_assigned(serial.as_str()).await?;
        req.extensions_mut().insert(SetCredentials(assigned));
        if lost {
            // The lost-credentials case: the old set is revoked (replaced above) and the
            // device must be paired again (1850–1852).
            let old = self
                .router
                .shared()
                .store
                .set_pairing(serial.as_str(), None)
                .await?;
            self.scopes.pairing_changed();
            let structure = old.and_then(|p| p.structure);
            self.router
                .release_held(std::iter::once(serial.as_str()).chain(structure.as_deref()))
                .await;
            tracing::warn!(device = %serial, "default credentials presented again: assigned set replaced, device unpaired");
        } else {
            tracing::info!(device = %serial, "first contact: assigned credentials issued");
        }
        Ok(false)
    }

    /// A first contact in one store transaction (shared with concurrent ones): `false`
    /// when the store refused it (the device has credentials or its set exists; nothing
    /// written) or this node may not take leases now.
    async fn first_contact(
        &self,
        req: &HttpRequest,
        serial: &SetKey,
        first: FirstContact,
    ) -> Result<bool> {
        let shared = self.router.shared();
        let Some(registrations) = &self.registrations else {
            return Ok(false);
        };
        if shared.may_take_leases().is_err() {
            return Ok(false);
        }
        let (assigned, record) = self.credentials.fresh_assigned(serial.as_str());
        let mut buckets = Vec::with_capacity(first.buckets.len());
        let mut changes = Vec::with_capacity(first.buckets.len());
        for (id, fields) in &first.buckets {
            let (bucket, change) =
                crate::registration::created(id, fields, shared.tick(), BY_SERVER);
            buckets.push(bucket);
            changes.push((id.clone(), change));
        }
        let written = registrations
            .register(NewDevice {
                record: first.record,
                assigned: record.clone(),
                buckets,
                changes,
            })
            .await?;
        if written {
            self.credentials.issued(&assigned, record);
            req.extensions_mut().insert(SetCredentials(assigned));
            tracing::info!(device = %serial, "first contact: device, bucket set and assigned credentials created");
        }
        Ok(written)
    }

    /// Credential checks, in the order that keeps a guesser from costing the rightful
    /// holder anything (finding 2): a source that failed too often is refused before any
    /// check (unless its credentials are already known good); otherwise the secret is
    /// verified, and only a failure is counted, against the source and the id. A correct
    /// secret is never refused for failures others caused. With `charge`, the request
    /// counts against the principal's request rate.
    async fn verify(
        &self,
        req: &HttpRequest,
        endpoint: Endpoint,
        secure: bool,
        charge: bool,
    ) -> Result<(Principal, Option<DefaultRegistration>)> {
        let source = self.source_of(req);
        let header = req
            .headers()
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| NodeError::Unauthorized("missing Basic credentials".into()))?;
        let metrics = &self.router.shared().metrics;
        let malformed = |what: &str| {
            self.credentials
                .gate_source(source, None)
                .inspect_err(|_| metrics.limited("auth_source"))?;
            self.credentials.failed(source, None);
            Err(NodeError::Unauthorized(format!("malformed {what}")))
        };
        let Ok(creds) = parse_basic(header) else {
            return malformed("Basic credentials");
        };
        let Ok(id) = CredentialId::parse(&creds.id) else {
            return malformed("credential id");
        };
        if matches!(id.kind(), CredentialKind::Default) {
            if endpoint != Endpoint::Register {
                return Err(default_not_allowed());
            }
            // FIG 28C: a secure connection first (nothing is counted for a refusal here).
            if !secure {
                return Err(NodeError::Forbidden(
                    "default credentials are accepted over TLS only".into(),
                ));
            }
        }
        self.credentials
            .gate_source(source, Some(&creds))
            .inspect_err(|_| metrics.limited("auth_source"))?;
        let checked = self.check(&id, &creds).await;
        let (principal, set, pending) = match checked {
            Err(e @ NodeError::Unauthorized(_)) => {
                self.credentials.failed(source, Some(&creds.id));
                return Err(e);
            }
            other => other?,
        };
        if let Some(c) = set {
            req.extensions_mut().insert(SetCredentials(c));
        }
        if charge {
            self.credentials
                .check_rate(&creds.id)
                .inspect_err(|_| metrics.limited("request_rate"))?;
        }
        match (endpoint, &principal) {
            (Endpoint::Register | Endpoint::PairingCode, Principal::User { .. }) => {
                Err(NodeError::Forbidden("this endpoint is for devices".into()))
            }
            (Endpoint::UserOnly, Principal::Device { .. }) => {
                Err(NodeError::Forbidden("this endpoint is for users".into()))
            }
            _ => Ok((principal, pending)),
        }
    }

    /// Verifies `creds` and resolves what they may touch.
    async fn check(
        &self,
        id: &CredentialId,
        creds: &Credentials,
    ) -> Result<(Principal, Option<Credentials>, Option<DefaultRegistration>)> {
        match (id, id.kind()) {
            (CredentialId::Default { serial, .. }, CredentialKind::Default) => {
                let serial = SetKey::parse(serial)?;
                self.credentials.verify_default(creds)?;
                Ok((
                    Principal::Device {
                        serial: serial.clone(),
                        structure: None,
                    },
                    None,
                    Some(DefaultRegistration { serial }),
                ))
            }
            (CredentialId::Assigned { serial }, _) => {
                let serial = SetKey::parse(serial)?;
                let set = self
                    .credentials
                    .verify_assigned(creds, serial.as_str())
                    .await?;
                let structure = self.device_structure(serial.as_str(), false).await?;
                Ok((Principal::Device { serial, structure }, set, None))
            }
            (CredentialId::User { user_id }, _) => {
                self.credentials.verify_user(creds, user_id).await?;
                let UserScope {
                    devices,
                    structures,
                } = self.user_scope(user_id, false).await?;
                Ok((
                    Principal::User {
                        user_id: user_id.clone(),
                        devices,
                        structures,
                    },
                    None,
                    None,
                ))
            }
            _ => Err(NodeError::Unauthorized("unknown credential kind".into())),
        }
    }

    /// The structure device `serial` is paired into (cached: `security::scope`).
    async fn device_structure(&self, serial: &str, bypass: bool) -> Result<Option<String>> {
        let store = &self.router.shared().store;
        let read = || async { Ok(store.get_pairing(serial).await?.and_then(|p| p.structure)) };
        Ok(self.scopes.device(serial, bypass, read).await?)
    }

    /// User `user_id`'s paired devices and structures (cached: `security::scope`).
    async fn user_scope(&self, user_id: &str, bypass: bool) -> Result<UserScope> {
        let store = &self.router.shared().store;
        let read = || async {
            let devices = store.user_pairings(user_id).await?;
            let structures = store.user_structures(user_id).await?;
            Ok(UserScope {
                devices: devices.into_iter().map(|p| p.device_id).collect(),
                structures: structures.into_iter().collect(),
            })
        };
        Ok(self.scopes.user(user_id, bypass, read).await?)
    }

    /// `principal` with its scope read from the store now: a request its cached scope
    /// would refuse is decided on this (a device paired a moment ago through another node
    /// is in scope at once).
    pub async fn rescoped(&self, principal: &Principal) -> Result<Principal> {
        Ok(match principal {
            Principal::Device { serial, .. } => Principal::Device {
                serial: serial.clone(),
                structure: self.device_structure(serial.as_str(), true).await?,
            },
            Principal::User { user_id, .. } => {
                let UserScope {
                    devices,
                    structures,
                } = self.user_scope(user_id, true).await?;
                Principal::User {
                    user_id: user_id.clone(),
                    devices,
                    structures,
                }
            }
        })
    }

    /// A pairing changed through this node: cached scopes are read again.
    pub fn pairing_changed(&self) {
        self.scopes.pairing_changed();
    }

    /// [`ScopeCache::generation`]: moves whenever a pairing changes through this node.
    pub fn access_generation(&self) -> u64 {
        self.scopes.generation()
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
