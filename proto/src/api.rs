//! The JSON messages of the device API (shared/API.md), and their protobuf twins.
//!
//! JSON is the contract; protobuf carries the same messages for constrained devices.
//! Each message converts to and from its `pb` type so handlers work on one shape.

use alloc::string::{String, ToString};
use alloc::vec::Vec;
#[cfg(feature = "openapi")]
use alloc::{format, vec};

use prost::Message;
use serde::{Deserialize, Serialize};

use crate::synclog::{Change, ChangeKind};
use crate::{pb, Bucket, Fields, ProtoError, Value};

/// `POST /v1/register` body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RegisterRequest {
    /// The device's serial.
    pub device_id: String,
    /// Selects the template of default buckets (e.g. `thermostat`).
    pub device_type: String,
    /// Running firmware version; drives tier redirection and update offers.
    pub sw_version: String,
    /// When the device will sync next, in ms from now (a sleeping device; API.md
    /// "Presence and wake-ups").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_sync_ms: Option<u64>,
}

/// A firmware offer in a registration answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SoftwareUpdate {
    /// The version the device should run.
    pub version: String,
    /// Where to fetch it.
    pub url: String,
    /// The image's SHA-256 when it is a blob (`url` is then `/v1/blobs/<sha256>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// The image's size in bytes when it is a blob.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    /// Ed25519 over the image's SHA-512 by the vendor's firmware key, 128 hex digits
    /// (`tether admin sign-firmware`); devices take only signed images (`dfu`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<String>,
}

/// `POST /v1/register` answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RegisterResponse {
    /// The tier the device belongs to.
    pub tier: String,
    /// Another tier's registration URL when the device belongs there.
    pub redirect: Option<String>,
    /// Newer firmware offered for this device type.
    pub software_update: Option<SoftwareUpdate>,
    /// The allocated synchronization server.
    pub sync_url: String,
    /// The device's relevant bucket ids.
    pub buckets: Vec<String>,
}

/// A bucket object as the API shows it; parts are omitted when a view asked for less.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct BucketDoc {
    /// The bucket id.
    pub id: String,
    /// Milliseconds since the epoch, server-assigned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestamp: Option<u64>,
    /// Changes with every accepted write.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
    /// Field/value pairs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<Object>))]
    pub value: Option<Fields>,
    /// A diff instead of `value`: the version the client held (subscribe with `diffs`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_version: Option<u64>,
    /// With `base_version`: every field changed after it, with its latest value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<Object>))]
    pub changes: Option<Fields>,
}

/// How much of each bucket a listing carries (`view=` query).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum View {
    /// Ids only.
    Ids,
    /// Id, timestamp and version (the default).
    #[default]
    Versions,
    /// Everything, value included.
    Full,
}

impl BucketDoc {
    /// The parts of `b` that `view` asks for.
    pub fn from_bucket(b: &Bucket, view: View) -> Self {
        let (timestamp, version, value) = match view {
            View::Ids => (None, None, None),
            View::Versions => (Some(b.timestamp.millis), Some(b.version), None),
            View::Full => (
                Some(b.timestamp.millis),
                Some(b.version),
                Some(b.value.clone()),
            ),
        };
        BucketDoc {
            id: b.id.to_string(),
            timestamp,
            version,
            value,
            base_version: None,
            changes: None,
        }
    }

    /// `b` as a diff from `base_version`: `changes` instead of `value`.
    pub fn diff(b: &Bucket, base_version: u64, changes: Fields) -> Self {
        BucketDoc {
            id: b.id.to_string(),
            timestamp: Some(b.timestamp.millis),
            version: Some(b.version),
            value: None,
            base_version: Some(base_version),
            changes: Some(changes),
        }
    }
}

/// `GET /v1/buckets` and `POST /v1/subscribe` answers.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct BucketList {
    /// The buckets.
    pub buckets: Vec<BucketDoc>,
    /// Stale buckets left out to keep a subscribe answer within `max_bytes`; the client
    /// subscribes again at once.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pending: Vec<String>,
}

/// `PUT /v1/buckets/{id}` body.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct UpdateRequest {
    /// The changed fields (a JSON object).
    #[cfg_attr(feature = "openapi", schema(value_type = Object))]
    pub value: Fields,
    /// The version the client last saw; 0 or absent if it never saw the bucket.
    #[serde(default)]
    pub base_version: u64,
    /// Refuse rather than merge if `base_version` is stale.
    #[serde(default)]
    pub occ: bool,
    /// Suppresses the echo of this write to the same session's subscription.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
    /// Idempotency key (1–64 chars of `[A-Za-z0-9_-]`), fresh for every distinct write:
    /// a retry with the same one gets the original answer and changes nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub op_id: Option<String>,
}

/// The `outcome` of a PUT.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum UpdateOutcome {
    /// Stored on top of the version the client had (200, timestamp/version only).
    Applied,
    /// Merged into a newer version (200, full merged bucket).
    Merged,
    /// Not stored (409, full stored bucket).
    Refused,
}

/// `PUT /v1/buckets/{id}` answer: the outcome and the bucket as the client must now hold it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct UpdateResponse {
    /// What happened.
    pub outcome: UpdateOutcome,
    /// The bucket id.
    pub id: String,
    /// The bucket's timestamp after the write (ms).
    pub timestamp: u64,
    /// The bucket's version after the write.
    pub version: u64,
    /// Present for `merged` and `refused`: the full bucket.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<Object>))]
    pub value: Option<Fields>,
    /// The answer of an earlier write with the same `op_id`: nothing changed now. The
    /// outcome is the original write's. A replayed `applied` carries the original write's
    /// timestamp and version; a replayed `merged` or `refused` carries the bucket as it is
    /// now (timestamp, version and value together, so the pair is always a real state): its
    /// version may be later than the write's own.
    #[serde(default, skip_serializing_if = "is_false")]
    pub replayed: bool,
    /// A change to the bucket of a device that holds no subscribe (API.md "Presence and
    /// wake-ups"): it gets the change when it next syncs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivery: Option<Delivery>,
}

/// How a change reaches a device that is not listening now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Delivery {
    /// Always `false`: the device holds no subscribe (else there is no `delivery`).
    pub online: bool,
    /// When the device said it will sync next (ms), or null.
    pub next_sync_by: Option<u64>,
}

/// `GET /v1/devices/{device_id}/presence` answer: what the owner of the device's set knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PresenceResponse {
    /// The device holds a subscribe now.
    pub online: bool,
    /// When it last subscribed, wrote or registered (ms), or null.
    pub last_seen: Option<u64>,
    /// When it said it will sync next (ms), or null.
    pub next_sync_by: Option<u64>,
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// One held bucket version in a subscribe request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct HeldBucket {
    /// The bucket id.
    pub id: String,
    /// Its timestamp as the client holds it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestamp: Option<u64>,
    /// Its version as the client holds it; absent if it holds none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
}

/// `POST /v1/subscribe` body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SubscribeRequest {
    /// The buckets and versions the client holds.
    pub buckets: Vec<HeldBucket>,
    /// The client's session, for echo suppression.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
    /// How long to hold the request; server default and maximum apply.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// Answer a stale bucket whose held version is still in its history with the fields
    /// changed since (`base_version` + `changes`) instead of its whole value.
    #[serde(default, skip_serializing_if = "is_false")]
    pub diffs: bool,
    /// Keep the answer body within this many bytes; stale buckets that do not fit are
    /// named in `pending`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_bytes: Option<u64>,
    /// Streaming subscribe (apps and services): one answer per line
    /// (`application/x-ndjson`) for as long as `timeout_ms`, the held versions advancing
    /// with each line, instead of one answer per request.
    #[serde(default, skip_serializing_if = "is_false")]
    pub stream: bool,
    /// When the device will sync next, in ms from now (a sleeping device; API.md "Presence
    /// and wake-ups"): answered in presence and in writers' `delivery`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_sync_ms: Option<u64>,
}

/// One change in `GET /v1/buckets/{id}/history`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ChangeDoc {
    /// The version this write produced.
    pub version: u64,
    /// Its timestamp (ms).
    pub timestamp: u64,
    /// `created`, `applied`, `merged` or `server`.
    pub outcome: ChangeKind,
    /// `device:<serial>`, `user:<id>` or `server`.
    pub by: String,
    /// The writer's session, or null.
    pub session: Option<String>,
    /// The write's op id, or null.
    pub op_id: Option<String>,
    /// The fields this write set.
    #[cfg_attr(feature = "openapi", schema(value_type = Object))]
    pub fields: Fields,
}

impl From<Change> for ChangeDoc {
    fn from(c: Change) -> Self {
        ChangeDoc {
            version: c.version,
            timestamp: c.timestamp,
            outcome: c.outcome,
            by: c.by,
            session: c.session,
            op_id: c.op_id,
            fields: c.fields,
        }
    }
}

/// `GET /v1/buckets/{id}/history` answer: changes after `since_version`, ascending.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct HistoryResponse {
    /// The bucket.
    pub id: String,
    /// The oldest version whose change is still kept.
    pub oldest_version: u64,
    /// Changes after `since_version` were already dropped (retention).
    pub truncated: bool,
    /// More changes follow: ask again with this `since_version`; null at the end.
    pub next_since_version: Option<u64>,
    /// The changes, ascending by version.
    pub changes: Vec<ChangeDoc>,
}

/// Every error body: `{"error": "<code>", "message": "<text>"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ErrorBody {
    /// A stable machine-readable code (`bad_request`, `not_found`, …).
    pub error: String,
    /// A human-readable explanation.
    pub message: String,
}

/// `POST /v1/pairing-code` answer: a short-lived code a user redeems to pair this device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PairingCodeResponse {
    /// The code, e.g. `7Q4K-92XD`.
    pub code: String,
    /// Seconds until the code expires.
    pub expires_in_s: u64,
}

/// `POST /v1/blobs` body: announce a blob by its SHA-256 (API.md "Blobs").
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct BlobAnnounce {
    /// SHA-256 of the bytes, 64 hex digits.
    pub sha256: String,
    /// Size in bytes.
    pub size: u64,
    /// Media type (default `application/octet-stream`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_type: Option<String>,
}

/// Answers of `POST /v1/blobs` and `PUT /v1/blobs/{sha256}`: a complete blob
/// (`sha256`, `size`, `present: true`), where to send the bytes (`upload_url`,
/// `received`), or the bytes received so far (`received`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct BlobStatus {
    /// The blob's hash (a complete blob).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// Its size in bytes (a complete blob).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    /// Stored and readable: nothing (more) to send.
    #[serde(default, skip_serializing_if = "core::ops::Not::not")]
    pub present: bool,
    /// `PUT` the bytes here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upload_url: Option<String>,
    /// Bytes received so far: send from here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub received: Option<u64>,
}

impl BlobStatus {
    /// A complete blob.
    pub fn present(sha256: String, size: u64) -> Self {
        BlobStatus {
            sha256: Some(sha256),
            size: Some(size),
            present: true,
            ..BlobStatus::default()
        }
    }

    /// Where to send the bytes, from `received` on.
    pub fn upload(upload_url: String, received: u64) -> Self {
        BlobStatus {
            upload_url: Some(upload_url),
            received: Some(received),
            ..BlobStatus::default()
        }
    }

    /// Bytes received so far of an incomplete upload.
    pub fn received(received: u64) -> Self {
        BlobStatus {
            received: Some(received),
            ..BlobStatus::default()
        }
    }
}

/// `POST /v1/pair` body (user credentials): redeem a device's pairing code.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PairRequest {
    /// The code the device showed.
    pub code: String,
    /// The structure to put the device in; absent lets the server choose.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub structure: Option<String>,
}

/// `POST /v1/pair` answer: the device now linked to the user's account.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PairResponse {
    /// The paired device's id (its serial).
    pub device_id: String,
    /// The structure it joined; `null` when paired to the account without one.
    pub structure: Option<String>,
}

// ---------------------------------------------------------------------------------------
// protobuf conversions

fn value_to_pb(v: &Value) -> pb::Value {
    use pb::value::Kind;
    let kind = match v {
        Value::Null => Kind::NullValue(true),
        Value::Bool(b) => Kind::BoolValue(*b),
        Value::Number(n) => match (n.as_i64(), n.is_u64()) {
            (Some(i), _) => Kind::IntValue(i),
            // Above i64::MAX: a double would round it, so it travels as its exact text
            // (found by fuzzing: crash-db5063a1).
            (None, true) => Kind::JsonValue(n.to_string()),
            (None, false) => Kind::NumberValue(n.as_f64().unwrap_or(0.0)),
        },
        Value::String(s) => Kind::StringValue(s.clone()),
        other => Kind::JsonValue(other.to_string()),
    };
    pb::Value { kind: Some(kind) }
}

fn value_from_pb(v: pb::Value) -> Result<Value, ProtoError> {
    use pb::value::Kind;
    Ok(match v.kind {
        None | Some(Kind::NullValue(_)) => Value::Null,
        Some(Kind::BoolValue(b)) => Value::Bool(b),
        Some(Kind::IntValue(i)) => Value::from(i),
        // Non-finite doubles have no JSON form: refused, as JSON refuses them (a NaN stored
        // as null would silently change what the client wrote).
        Some(Kind::NumberValue(f)) => {
            Value::Number(serde_json::Number::from_f64(f).ok_or(ProtoError::NonFiniteNumber)?)
        }
        Some(Kind::StringValue(s)) => Value::String(s),
        Some(Kind::JsonValue(s)) => {
            serde_json::from_str(&s).map_err(|e| ProtoError::NestedJson(e.to_string()))?
        }
    })
}

/// Fields → protobuf field list.
pub fn fields_to_pb(f: &Fields) -> Vec<pb::Field> {
    f.iter()
        .map(|(k, v)| pb::Field {
            name: k.clone(),
            value: Some(value_to_pb(v)),
        })
        .collect()
}

/// Protobuf field list → fields (later duplicates win, as in a JSON object).
pub fn fields_from_pb(f: Vec<pb::Field>) -> Result<Fields, ProtoError> {
    let mut out = Fields::new();
    for field in f {
        let v = match field.value {
            Some(v) => value_from_pb(v)?,
            None => Value::Null,
        };
        out.insert(field.name, v);
    }
    Ok(out)
}

/// A message that travels both as JSON and as protobuf.
pub trait WireMessage: Sized {
    /// Its protobuf twin.
    type Pb: Message + Default;
    /// To protobuf.
    fn to_pb(&self) -> Self::Pb;
    /// From protobuf, validating what protobuf cannot express.
    fn from_pb(pb: Self::Pb) -> Result<Self, ProtoError>;

    /// Encodes as protobuf bytes.
    fn encode_pb(&self) -> Vec<u8> {
        self.to_pb().encode_to_vec()
    }

    /// Decodes protobuf bytes.
    fn decode_pb(bytes: &[u8]) -> Result<Self, ProtoError> {
        let pb = Self::Pb::decode(bytes).map_err(|e| ProtoError::Protobuf(e.to_string()))?;
        Self::from_pb(pb)
    }
}

impl WireMessage for RegisterRequest {
    type Pb = pb::RegisterRequest;
    fn to_pb(&self) -> pb::RegisterRequest {
        pb::RegisterRequest {
            device_id: self.device_id.clone(),
            device_type: self.device_type.clone(),
            sw_version: self.sw_version.clone(),
            next_sync_ms: self.next_sync_ms,
        }
    }
    fn from_pb(p: pb::RegisterRequest) -> Result<Self, ProtoError> {
        Ok(RegisterRequest {
            device_id: p.device_id,
            device_type: p.device_type,
            sw_version: p.sw_version,
            next_sync_ms: p.next_sync_ms,
        })
    }
}

impl WireMessage for RegisterResponse {
    type Pb = pb::RegisterResponse;
    fn to_pb(&self) -> pb::RegisterResponse {
        pb::RegisterResponse {
            tier: self.tier.clone(),
            redirect: self.redirect.clone(),
            software_update: self.software_update.as_ref().map(|u| pb::SoftwareUpdate {
                version: u.version.clone(),
                url: u.url.clone(),
                sha256: u.sha256.clone(),
                size: u.size,
                signature: u.signature.clone(),
            }),
            sync_url: self.sync_url.clone(),
            buckets: self.buckets.clone(),
        }
    }
    fn from_pb(p: pb::RegisterResponse) -> Result<Self, ProtoError> {
        Ok(RegisterResponse {
            tier: p.tier,
            redirect: p.redirect,
            software_update: p.software_update.map(|u| SoftwareUpdate {
                version: u.version,
                url: u.url,
                sha256: u.sha256,
                size: u.size,
                signature: u.signature,
            }),
            sync_url: p.sync_url,
            buckets: p.buckets,
        })
    }
}

impl WireMessage for BucketDoc {
    type Pb = pb::Bucket;
    fn to_pb(&self) -> pb::Bucket {
        pb::Bucket {
            id: self.id.clone(),
            timestamp: self.timestamp,
            version: self.version,
            has_value: self.value.is_some(),
            value: self.value.as_ref().map(fields_to_pb).unwrap_or_default(),
            base_version: self.base_version,
            changes: self.changes.as_ref().map(fields_to_pb).unwrap_or_default(),
        }
    }
    fn from_pb(p: pb::Bucket) -> Result<Self, ProtoError> {
        Ok(BucketDoc {
            id: p.id,
            timestamp: p.timestamp,
            version: p.version,
            value: if p.has_value {
                Some(fields_from_pb(p.value)?)
            } else {
                None
            },
            // A diff always has its changes (an empty list: nothing but the version moved).
            changes: match p.base_version {
                Some(_) => Some(fields_from_pb(p.changes)?),
                None => None,
            },
            base_version: p.base_version,
        })
    }
}

impl WireMessage for BucketList {
    type Pb = pb::BucketList;
    fn to_pb(&self) -> pb::BucketList {
        pb::BucketList {
            buckets: self.buckets.iter().map(BucketDoc::to_pb).collect(),
            pending: self.pending.clone(),
        }
    }
    fn from_pb(p: pb::BucketList) -> Result<Self, ProtoError> {
        Ok(BucketList {
            buckets: p
                .buckets
                .into_iter()
                .map(BucketDoc::from_pb)
                .collect::<Result<_, _>>()?,
            pending: p.pending,
        })
    }
}

impl WireMessage for UpdateRequest {
    type Pb = pb::UpdateRequest;
    fn to_pb(&self) -> pb::UpdateRequest {
        pb::UpdateRequest {
            value: fields_to_pb(&self.value),
            base_version: self.base_version,
            occ: self.occ,
            session: self.session.clone(),
            op_id: self.op_id.clone(),
        }
    }
    fn from_pb(p: pb::UpdateRequest) -> Result<Self, ProtoError> {
        Ok(UpdateRequest {
            value: fields_from_pb(p.value)?,
            base_version: p.base_version,
            occ: p.occ,
            session: p.session,
            op_id: p.op_id,
        })
    }
}

impl WireMessage for UpdateResponse {
    type Pb = pb::UpdateResponse;
    fn to_pb(&self) -> pb::UpdateResponse {
        let outcome = match self.outcome {
            UpdateOutcome::Applied => pb::UpdateOutcome::Applied,
            UpdateOutcome::Merged => pb::UpdateOutcome::Merged,
            UpdateOutcome::Refused => pb::UpdateOutcome::Refused,
        };
        pb::UpdateResponse {
            outcome: outcome as i32,
            bucket: Some(
                BucketDoc {
                    id: self.id.clone(),
                    timestamp: Some(self.timestamp),
                    version: Some(self.version),
                    value: self.value.clone(),
                    base_version: None,
                    changes: None,
                }
                .to_pb(),
            ),
            replayed: self.replayed,
            delivery: self.delivery.map(|d| pb::Delivery {
                next_sync_by: d.next_sync_by,
            }),
        }
    }
    fn from_pb(p: pb::UpdateResponse) -> Result<Self, ProtoError> {
        let outcome = match pb::UpdateOutcome::try_from(p.outcome) {
            Ok(pb::UpdateOutcome::Applied) => UpdateOutcome::Applied,
            Ok(pb::UpdateOutcome::Merged) => UpdateOutcome::Merged,
            Ok(pb::UpdateOutcome::Refused) => UpdateOutcome::Refused,
            _ => return Err(ProtoError::MissingField("outcome")),
        };
        let b = BucketDoc::from_pb(p.bucket.ok_or(ProtoError::MissingField("bucket"))?)?;
        Ok(UpdateResponse {
            outcome,
            id: b.id,
            timestamp: b.timestamp.ok_or(ProtoError::MissingField("timestamp"))?,
            version: b.version.ok_or(ProtoError::MissingField("version"))?,
            value: b.value,
            replayed: p.replayed,
            delivery: p.delivery.map(|d| Delivery {
                online: false,
                next_sync_by: d.next_sync_by,
            }),
        })
    }
}

impl WireMessage for SubscribeRequest {
    type Pb = pb::SubscribeRequest;
    fn to_pb(&self) -> pb::SubscribeRequest {
        pb::SubscribeRequest {
            buckets: self
                .buckets
                .iter()
                .map(|h| pb::HeldBucket {
                    id: h.id.clone(),
                    timestamp: h.timestamp,
                    version: h.version,
                })
                .collect(),
            session: self.session.clone(),
            timeout_ms: self.timeout_ms,
            diffs: self.diffs,
            max_bytes: self.max_bytes,
            stream: self.stream,
            next_sync_ms: self.next_sync_ms,
        }
    }
    fn from_pb(p: pb::SubscribeRequest) -> Result<Self, ProtoError> {
        Ok(SubscribeRequest {
            buckets: p
                .buckets
                .into_iter()
                .map(|h| HeldBucket {
                    id: h.id,
                    timestamp: h.timestamp,
                    version: h.version,
                })
                .collect(),
            session: p.session,
            timeout_ms: p.timeout_ms,
            diffs: p.diffs,
            max_bytes: p.max_bytes,
            stream: p.stream,
            next_sync_ms: p.next_sync_ms,
        })
    }
}

impl WireMessage for HistoryResponse {
    type Pb = pb::History;
    fn to_pb(&self) -> pb::History {
        pb::History {
            id: self.id.clone(),
            oldest_version: self.oldest_version,
            truncated: self.truncated,
            next_since_version: self.next_since_version,
            changes: self
                .changes
                .iter()
                .map(|c| pb::Change {
                    version: c.version,
                    timestamp: c.timestamp,
                    outcome: match c.outcome {
                        ChangeKind::Created => pb::ChangeOutcome::Created,
                        ChangeKind::Applied => pb::ChangeOutcome::Applied,
                        ChangeKind::Merged => pb::ChangeOutcome::Merged,
                        ChangeKind::Server => pb::ChangeOutcome::Server,
                    } as i32,
                    by: c.by.clone(),
                    session: c.session.clone(),
                    op_id: c.op_id.clone(),
                    fields: fields_to_pb(&c.fields),
                })
                .collect(),
        }
    }
    fn from_pb(p: pb::History) -> Result<Self, ProtoError> {
        let changes = p
            .changes
            .into_iter()
            .map(|c| {
                let outcome = match pb::ChangeOutcome::try_from(c.outcome) {
                    Ok(pb::ChangeOutcome::Created) => ChangeKind::Created,
                    Ok(pb::ChangeOutcome::Applied) => ChangeKind::Applied,
                    Ok(pb::ChangeOutcome::Merged) => ChangeKind::Merged,
                    Ok(pb::ChangeOutcome::Server) => ChangeKind::Server,
                    _ => return Err(ProtoError::MissingField("outcome")),
                };
                Ok(ChangeDoc {
                    version: c.version,
                    timestamp: c.timestamp,
                    outcome,
                    by: c.by,
                    session: c.session,
                    op_id: c.op_id,
                    fields: fields_from_pb(c.fields)?,
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(HistoryResponse {
            id: p.id,
            oldest_version: p.oldest_version,
            truncated: p.truncated,
            next_since_version: p.next_since_version,
            changes,
        })
    }
}

impl WireMessage for ErrorBody {
    type Pb = pb::Error;
    fn to_pb(&self) -> pb::Error {
        pb::Error {
            error: self.error.clone(),
            message: self.message.clone(),
        }
    }
    fn from_pb(p: pb::Error) -> Result<Self, ProtoError> {
        Ok(ErrorBody {
            error: p.error,
            message: p.message,
        })
    }
}

impl WireMessage for PairingCodeResponse {
    type Pb = pb::PairingCodeResponse;
    fn to_pb(&self) -> pb::PairingCodeResponse {
        pb::PairingCodeResponse {
            code: self.code.clone(),
            expires_in_s: self.expires_in_s,
        }
    }
    fn from_pb(p: pb::PairingCodeResponse) -> Result<Self, ProtoError> {
        Ok(PairingCodeResponse {
            code: p.code,
            expires_in_s: p.expires_in_s,
        })
    }
}

impl WireMessage for BlobAnnounce {
    type Pb = pb::BlobAnnounce;
    fn to_pb(&self) -> pb::BlobAnnounce {
        pb::BlobAnnounce {
            sha256: self.sha256.clone(),
            size: self.size,
            content_type: self.content_type.clone(),
        }
    }
    fn from_pb(p: pb::BlobAnnounce) -> Result<Self, ProtoError> {
        Ok(BlobAnnounce {
            sha256: p.sha256,
            size: p.size,
            content_type: p.content_type,
        })
    }
}

impl WireMessage for BlobStatus {
    type Pb = pb::BlobStatus;
    fn to_pb(&self) -> pb::BlobStatus {
        pb::BlobStatus {
            sha256: self.sha256.clone(),
            size: self.size,
            present: self.present,
            upload_url: self.upload_url.clone(),
            received: self.received,
        }
    }
    fn from_pb(p: pb::BlobStatus) -> Result<Self, ProtoError> {
        Ok(BlobStatus {
            sha256: p.sha256,
            size: p.size,
            present: p.present,
            upload_url: p.upload_url,
            received: p.received,
        })
    }
}

impl WireMessage for PresenceResponse {
    type Pb = pb::PresenceResponse;
    fn to_pb(&self) -> pb::PresenceResponse {
        pb::PresenceResponse {
            online: self.online,
            last_seen: self.last_seen,
            next_sync_by: self.next_sync_by,
        }
    }
    fn from_pb(p: pb::PresenceResponse) -> Result<Self, ProtoError> {
        Ok(PresenceResponse {
            online: p.online,
            last_seen: p.last_seen,
            next_sync_by: p.next_sync_by,
        })
    }
}

impl WireMessage for PairRequest {
    type Pb = pb::PairRequest;
    fn to_pb(&self) -> pb::PairRequest {
        pb::PairRequest {
            code: self.code.clone(),
            structure: self.structure.clone(),
        }
    }
    fn from_pb(p: pb::PairRequest) -> Result<Self, ProtoError> {
        Ok(PairRequest {
            code: p.code,
            structure: p.structure,
        })
    }
}

impl WireMessage for PairResponse {
    type Pb = pb::PairResponse;
    fn to_pb(&self) -> pb::PairResponse {
        pb::PairResponse {
            device_id: self.device_id.clone(),
            structure: self.structure.clone(),
        }
    }
    fn from_pb(p: pb::PairResponse) -> Result<Self, ProtoError> {
        Ok(PairResponse {
            device_id: p.device_id,
            structure: p.structure,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;
    use serde_json::json;

    fn roundtrip<T: WireMessage + PartialEq + core::fmt::Debug>(m: T) {
        let bytes = m.encode_pb();
        assert_eq!(T::decode_pb(&bytes).expect("decodes"), m);
    }

    #[test]
    fn messages_roundtrip_through_protobuf() {
        let Value::Object(value) = json!({"t": 21.5, "n": 3, "s": "heat", "z": null, "b": true,
                                         "nested": {"a": [1, 2]}})
        else {
            unreachable!()
        };
        roundtrip(BucketList {
            buckets: vec![
                BucketDoc {
                    id: "device.x".into(),
                    timestamp: Some(5),
                    version: Some(2),
                    value: Some(value.clone()),
                    base_version: None,
                    changes: None,
                },
                BucketDoc {
                    id: "shared.x".into(),
                    timestamp: None,
                    version: None,
                    value: Some(Fields::new()),
                    base_version: None,
                    changes: None,
                },
                BucketDoc {
                    id: "shared.y".into(),
                    timestamp: None,
                    version: None,
                    value: None,
                    base_version: None,
                    changes: None,
                },
                BucketDoc {
                    id: "shared.z".into(),
                    timestamp: Some(9),
                    version: Some(12),
                    value: None,
                    base_version: Some(7),
                    changes: Some(value.clone()),
                },
                BucketDoc {
                    id: "shared.w".into(),
                    timestamp: Some(9),
                    version: Some(12),
                    value: None,
                    base_version: Some(11),
                    changes: Some(Fields::new()),
                },
            ],
            pending: vec!["device.q".into()],
        });
        roundtrip(UpdateRequest {
            value: value.clone(),
            base_version: 9,
            occ: true,
            session: Some("s".into()),
            op_id: Some("op-1".into()),
        });
        roundtrip(UpdateResponse {
            outcome: UpdateOutcome::Merged,
            id: "device.x".into(),
            timestamp: 1,
            version: 2,
            value: Some(value.clone()),
            replayed: true,
            delivery: Some(Delivery {
                online: false,
                next_sync_by: Some(1_763_888_400_123),
            }),
        });
        roundtrip(RegisterRequest {
            device_id: "01AA02AB".into(),
            device_type: "thermostat".into(),
            sw_version: "1.2.0".into(),
            next_sync_ms: Some(3_600_000),
        });
        roundtrip(PresenceResponse {
            online: false,
            last_seen: Some(1_763_884_800_123),
            next_sync_by: None,
        });
        roundtrip(SubscribeRequest {
            buckets: vec![HeldBucket {
                id: "device.x".into(),
                timestamp: Some(1),
                version: None,
            }],
            session: None,
            timeout_ms: Some(1000),
            diffs: true,
            max_bytes: Some(1536),
            stream: true,
            next_sync_ms: Some(600_000),
        });
        roundtrip(HistoryResponse {
            id: "device.x".into(),
            oldest_version: 3,
            truncated: true,
            next_since_version: Some(5),
            changes: vec![
                ChangeDoc {
                    version: 4,
                    timestamp: 10,
                    outcome: ChangeKind::Applied,
                    by: "device:x".into(),
                    session: Some("s".into()),
                    op_id: Some("op".into()),
                    fields: value,
                },
                ChangeDoc {
                    version: 5,
                    timestamp: 11,
                    outcome: ChangeKind::Created,
                    by: "server".into(),
                    session: None,
                    op_id: None,
                    fields: Fields::new(),
                },
            ],
        });
        roundtrip(RegisterResponse {
            tier: "production".into(),
            redirect: None,
            software_update: Some(SoftwareUpdate {
                version: "1.3.0".into(),
                url: "https://u".into(),
                sha256: Some(
                    "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08".into(),
                ),
                size: Some(4),
                signature: Some("ab".repeat(64)),
            }),
            sync_url: "http://127.0.0.1:8080".into(),
            buckets: vec!["device.x".into()],
        });
        roundtrip(BlobStatus::present("ab".into(), 3));
        roundtrip(BlobStatus::upload("/v1/blobs/ab".into(), 65536));
        roundtrip(BlobAnnounce {
            sha256: "ab".into(),
            size: 3,
            content_type: Some("text/plain".into()),
        });
        roundtrip(PairingCodeResponse {
            code: "7Q4K-92XD".into(),
            expires_in_s: 600,
        });
        roundtrip(PairRequest {
            code: "7Q4K-92XD".into(),
            structure: Some("home".into()),
        });
        roundtrip(PairRequest {
            code: "7Q4K-92XD".into(),
            structure: None,
        });
        roundtrip(PairResponse {
            device_id: "01AA02AB".into(),
            structure: Some("home".into()),
        });
    }

    #[test]
    fn pairing_messages_match_api_md_json() {
        let code: PairingCodeResponse =
            serde_json::from_str(r#"{"code": "7Q4K-92XD", "expires_in_s": 600}"#)
                .expect("API.md example");
        assert_eq!((&*code.code, code.expires_in_s), ("7Q4K-92XD", 600));
        let pair: PairRequest =
            serde_json::from_str(r#"{"code": "7Q4K-92XD"}"#).expect("structure optional");
        assert_eq!(pair.structure, None);
        assert_eq!(
            serde_json::to_string(&pair).expect("serializes"),
            r#"{"code":"7Q4K-92XD"}"#
        );
        let resp: PairResponse =
            serde_json::from_str(r#"{"device_id": "01AA02AB", "structure": "home"}"#)
                .expect("API.md example");
        assert_eq!(resp.structure.as_deref(), Some("home"));
    }

    #[test]
    fn additions_are_optional_and_match_api_md_json() {
        // Old clients' bodies still decode, and answers without additions serialize as before.
        let old: SubscribeRequest =
            serde_json::from_str(r#"{"buckets": [{"id": "device.x", "version": 3}]}"#)
                .expect("old subscribe");
        assert!(!old.diffs && old.max_bytes.is_none() && !old.stream);
        let put: UpdateRequest =
            serde_json::from_str(r#"{"value": {}, "op_id": "a-1"}"#).expect("put with op id");
        assert_eq!(put.op_id.as_deref(), Some("a-1"));
        let resp = UpdateResponse {
            outcome: UpdateOutcome::Applied,
            id: "device.x".into(),
            timestamp: 1,
            version: 2,
            value: None,
            replayed: false,
            delivery: None,
        };
        assert_eq!(
            serde_json::to_string(&resp).expect("json"),
            r#"{"outcome":"applied","id":"device.x","timestamp":1,"version":2}"#
        );
        let list = BucketList::default();
        assert_eq!(
            serde_json::to_string(&list).expect("json"),
            r#"{"buckets":[]}"#
        );
        let h: HistoryResponse = serde_json::from_str(
            r#"{"id": "device.x", "oldest_version": 1, "truncated": false,
                "next_since_version": null, "changes": [{"version": 43, "timestamp": 5,
                "outcome": "merged", "by": "user:alice", "session": null, "op_id": null,
                "fields": {"a": 1}}]}"#,
        )
        .expect("API.md history example");
        assert_eq!(h.changes[0].outcome, ChangeKind::Merged);
        let back = serde_json::to_value(&h).expect("json");
        assert_eq!(
            back["changes"][0]["session"],
            Value::Null,
            "null, not omitted"
        );
        assert_eq!(back["next_since_version"], Value::Null);
    }

    /// Protobuf bytes of the previous schema (no additions) still decode, and the new
    /// fields are invisible to a decoder that predates them (they are optional).
    #[test]
    fn old_protobuf_decoders_ignore_the_additions() {
        let new = BucketList {
            buckets: vec![BucketDoc {
                id: "shared.x".into(),
                timestamp: Some(1),
                version: Some(3),
                value: None,
                base_version: Some(2),
                changes: Some(Fields::new()),
            }],
            pending: vec!["device.x".into()],
        };
        // A decoder knowing only fields 1–5 of Bucket and 1 of BucketList.
        #[derive(Clone, PartialEq, prost::Message)]
        struct OldBucket {
            #[prost(string, tag = "1")]
            id: String,
            #[prost(uint64, optional, tag = "3")]
            version: Option<u64>,
        }
        #[derive(Clone, PartialEq, prost::Message)]
        struct OldList {
            #[prost(message, repeated, tag = "1")]
            buckets: Vec<OldBucket>,
        }
        let old = OldList::decode(new.encode_pb().as_slice()).expect("old decoder");
        assert_eq!(old.buckets.len(), 1);
        assert_eq!(old.buckets[0].version, Some(3));
    }

    #[test]
    fn json_update_request_rejects_non_object_values() {
        assert!(serde_json::from_str::<UpdateRequest>(r#"{"value": 3}"#).is_err());
        let ok: UpdateRequest =
            serde_json::from_str(r#"{"value": {"a": 1}}"#).expect("object value");
        assert_eq!((ok.base_version, ok.occ), (0, false));
    }

    /// proto/fuzz json_requests crash-a0fef009: without serde_json's `float_roundtrip`
    /// a float read from JSON, written and read again came back one ulp off.
    #[test]
    fn fuzz_crash_a0fef009_floats_survive_a_json_round_trip() {
        for input in [
            r#"{"value": {"sn": 5555555555555555555555555555555555555555555555555585}}"#,
            r#"{"value": {"a": 1.0715660391465826e-75, "b": -1.81996730402717e-179}}"#,
        ] {
            let m: UpdateRequest = serde_json::from_str(input).expect("valid JSON");
            let text = serde_json::to_string(&m).expect("serializes");
            let back: UpdateRequest = serde_json::from_str(&text).expect("reads back");
            assert_eq!(back, m, "{input} → {text}");
        }
    }

    /// proto/fuzz json_requests crash-db5063a1: an integer above i64::MAX was sent over
    /// protobuf as a double and came back rounded.
    #[test]
    fn fuzz_crash_db5063a1_integers_above_i64_survive_protobuf() {
        let m: UpdateRequest = serde_json::from_str(
            r#"{"value": {"big": 12341567890123456785, "max": 18446744073709551615,
                          "edge": 9223372036854775808, "i": 9223372036854775807, "n": -9}}"#,
        )
        .expect("valid JSON");
        let back = UpdateRequest::decode_pb(&m.encode_pb()).expect("decodes");
        assert_eq!(back, m);
        assert_eq!(back.value["max"].as_u64(), Some(u64::MAX));
    }

    #[test]
    fn garbage_protobuf_is_an_error_not_a_panic() {
        assert!(UpdateRequest::decode_pb(&[0xff, 0xff, 0xff]).is_err());
        let bad_json = pb::UpdateRequest {
            value: vec![pb::Field {
                name: "a".into(),
                value: Some(pb::Value {
                    kind: Some(pb::value::Kind::JsonValue("{".into())),
                }),
            }],
            ..Default::default()
        };
        assert!(UpdateRequest::from_pb(bad_json).is_err());
    }

    /// Issue 13: NaN and ±Infinity were stored as null over protobuf while JSON refuses
    /// them; both encodings now refuse them.
    #[test]
    fn non_finite_numbers_are_refused_like_json_refuses_them() {
        for f in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            let m = pb::UpdateRequest {
                value: vec![pb::Field {
                    name: "t".into(),
                    value: Some(pb::Value {
                        kind: Some(pb::value::Kind::NumberValue(f)),
                    }),
                }],
                ..Default::default()
            };
            assert_eq!(
                UpdateRequest::from_pb(m),
                Err(ProtoError::NonFiniteNumber),
                "{f}"
            );
        }
        assert!(serde_json::from_str::<UpdateRequest>(r#"{"value": {"t": NaN}}"#).is_err());
    }
}
