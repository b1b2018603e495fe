//! The device API of shared/API.md on actix-web. Handlers are thin: authenticate, decode,
//! ask the bucket set actors, encode. JSON by default; protobuf when the request's
//! `Content-Type` or `Accept` says `application/x-protobuf`.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use actix_web::http::header::{ACCEPT, CONTENT_LENGTH, CONTENT_TYPE};
use actix_web::http::StatusCode;
use actix_web::{web, HttpMessage, HttpRequest, HttpResponse};
use futures::{FutureExt, StreamExt};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tether_proto::api::{
    BucketDoc, BucketList, ChangeDoc, ErrorBody, HistoryResponse, PairRequest, PairResponse,
    PairingCodeResponse, PresenceResponse, RegisterRequest, RegisterResponse, SubscribeRequest,
    UpdateOutcome, UpdateRequest, UpdateResponse, View, WireMessage,
};
use tether_proto::reconcile::Held;
use tether_proto::requests;
use tether_proto::synclog::{pack, valid_op_id, Encoding};
use tether_proto::{Bucket, BucketId, SetKey, Update};
use tracing::Instrument;

use crate::api::conn::Connections;
use crate::api::held::{HeldByPrincipal, HeldSlot};
use crate::api::openapi::{self, ProtobufBody};
use crate::api::stream::{self, Cursor, StreamRequest};
use crate::config::Config;
use crate::error::{NodeError, Result};
use crate::registration::STRUCTURE_FIELDS;
use crate::routing::router::{
    answer_size, BucketUpdate, Get, HeldSubscription, HoldOptions, PutKind, Router, Subscription,
    Write,
};
use crate::security::auth::{
    Auth, Endpoint, FirstContact, Principal, SetCredentials, STRUCTURE_KIND,
};
use crate::sets::actor::DeviceContact;
use crate::sets::registry::Shared;
use crate::store::{DeviceRecord, Pairing, PairingCode};

/// Room for the envelope (`base_version`, `session`, JSON punctuation) around a bucket.
const ENVELOPE_BYTES: usize = 4096;
/// Longest entry of a subscribe body (`{"id":…,"timestamp":…,"version":…}`), for its size
/// limit.
const HELD_ENTRY_BYTES: usize = 160;
/// Longest session id accepted.
const MAX_SESSION_LEN: usize = 128;

const PROTOBUF: &str = "application/x-protobuf";

/// State every handler shares.
#[derive(Debug)]
pub struct AppState {
    /// Actors, store, clock, metrics.
    pub shared: Arc<Shared>,
    /// Sends each set operation to the set's owner (this node or a peer).
    pub router: Arc<Router>,
    /// Effective configuration.
    pub config: Config,
    /// What registration hands out as `sync_url` (allocation: this node).
    pub placement: Arc<dyn tether_cluster::Placement>,
    /// Credentials and principals.
    pub auth: Auth,
    /// False once shutdown began.
    pub serving: AtomicBool,
    /// True once the node knows its cluster (always for a single node).
    pub joined: Arc<AtomicBool>,
    /// Held subscriptions per principal (the fair-share cap).
    pub held: Arc<HeldByPrincipal>,
    /// Open device connections (for `/readyz`).
    pub conns: Arc<Connections>,
    /// Blobs in the store (`None` for a store without a blob keyspace).
    pub blobs: Option<crate::store::blobs::Blobs>,
}

impl AppState {
    /// Handler state for a node.
    pub fn new(
        router: Arc<Router>,
        config: Config,
        placement: Arc<dyn tether_cluster::Placement>,
        auth: Auth,
        joined: Arc<AtomicBool>,
        conns: Arc<Connections>,
    ) -> Self {
        let metrics = router.shared().metrics.clone();
        let blobs = router
            .shared()
            .store
            .blob_kv()
            .map(|kv| crate::store::blobs::Blobs::new(kv, config.store_timeout));
        AppState {
            blobs,
            shared: router.shared().clone(),
            held: HeldByPrincipal::new(config.limits.max_held_per_principal, metrics),
            router,
            config,
            placement,
            auth,
            serving: AtomicBool::new(true),
            joined,
            conns,
        }
    }

    /// The node drains: every held subscription answers (empty) from now on, those the
    /// router holds and the HTTP long-polls, which learn it through their slots.
    pub fn start_draining(&self) {
        self.router.start_draining();
        self.held.drain();
    }

    /// Authenticates a request for an endpoint kind (in an `auth` span).
    pub(crate) async fn principal(
        &self,
        req: &HttpRequest,
        endpoint: Endpoint,
    ) -> Result<Principal> {
        self.checked_principal(req, endpoint, true).await
    }

    /// [`principal`](Self::principal) again for a request already admitted (a stream
    /// between lines): nothing charged to the principal's request rate.
    pub(crate) async fn principal_again(
        &self,
        req: &HttpRequest,
        endpoint: Endpoint,
    ) -> Result<Principal> {
        self.checked_principal(req, endpoint, false).await
    }

    async fn checked_principal(
        &self,
        req: &HttpRequest,
        endpoint: Endpoint,
        charge: bool,
    ) -> Result<Principal> {
        let secure = is_secure(&self.config, req);
        // A span of its own only where it is seen (an exported trace, logs at debug), as
        // for the other spans inside a request (`telemetry::inner_span`); else the
        // request's span holds whatever authentication logs.
        if !crate::telemetry::seen(&tracing::Span::current()) {
            return self.auth.authenticate(req, endpoint, secure, charge).await;
        }
        let span = tracing::info_span!(
            "auth",
            principal = tracing::field::Empty,
            otel.status_code = tracing::field::Empty
        );
        let r = self
            .auth
            .authenticate(req, endpoint, secure, charge)
            .instrument(span.clone())
            .await;
        match &r {
            Ok(p) => span.record(
                "principal",
                if matches!(p, Principal::User { .. }) {
                    "user"
                } else {
                    "device"
                },
            ),
            Err(e) => {
                crate::telemetry::attribute(&span, "error.type", e.code_and_status().0);
                span.record("otel.status_code", "ERROR")
            }
        };
        r
    }

    /// 403 unless `principal` may touch every one of `ids`. Its scope may be a second
    /// old (`security::scope`), so a refusal is decided on the scope read again, once per
    /// request: a device paired a moment ago through another node is in scope at once.
    pub(crate) async fn authorize_all<'a>(
        &self,
        principal: &mut Principal,
        ids: impl IntoIterator<Item = &'a BucketId> + Clone,
    ) -> Result<()> {
        if ids.clone().into_iter().all(|id| principal.may_access(id)) {
            return Ok(());
        }
        *principal = self.auth.rescoped(principal).await?;
        ids.into_iter().try_for_each(|id| principal.authorize(id))
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Format {
    Json,
    Protobuf,
}

impl Format {
    /// How an answer in this format is sized when it is cut to `max_bytes`.
    fn encoding(self) -> Encoding {
        match self {
            Format::Json => Encoding::Json,
            Format::Protobuf => Encoding::Protobuf,
        }
    }
}

pub(crate) fn request_format(req: &HttpRequest) -> Result<Format> {
    match req
        .headers()
        .get(CONTENT_TYPE)
        .map(|v| v.to_str().unwrap_or(""))
    {
        None => Ok(Format::Json),
        Some(ct) => {
            let mime = ct
                .split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase();
            match mime.as_str() {
                "application/json" | "" => Ok(Format::Json),
                PROTOBUF => Ok(Format::Protobuf),
                other => Err(NodeError::UnsupportedMediaType(format!(
                    "content type {other:?} not supported; use application/json or {PROTOBUF}"
                ))),
            }
        }
    }
}

fn response_format(req: &HttpRequest) -> Format {
    let wants_pb = req
        .headers()
        .get(ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.split(',').any(|m| m.trim().starts_with(PROTOBUF)));
    if wants_pb {
        Format::Protobuf
    } else {
        Format::Json
    }
}

pub(crate) fn decode<T: DeserializeOwned + WireMessage>(format: Format, body: &[u8]) -> Result<T> {
    match format {
        Format::Json => serde_json::from_slice(body)
            .map_err(|e| NodeError::BadRequest(format!("invalid JSON body: {e}"))),
        Format::Protobuf => Ok(T::decode_pb(body)?),
    }
}

pub(crate) fn respond<T: Serialize + WireMessage>(
    req: &HttpRequest,
    status: StatusCode,
    msg: &T,
) -> HttpResponse {
    match response_format(req) {
        Format::Json => HttpResponse::build(status).json(msg),
        Format::Protobuf => HttpResponse::build(status)
            .content_type(PROTOBUF)
            .body(msg.encode_pb()),
    }
}

/// Reads a body of at most `limit` bytes within the body read timeout; larger ones are
/// refused without being read whole, slower ones with 408 (finding 5: a client trickling
/// a body holds a connection and a worker's attention for at most that long).
pub(crate) async fn read_body(
    req: &HttpRequest,
    payload: web::Payload,
    limit: usize,
    state: &AppState,
) -> Result<web::Bytes> {
    let within = state.config.limits.body_read_timeout;
    match tokio::time::timeout(within, read_body_unbounded(req, payload, limit)).await {
        Ok(body) => body,
        Err(_) => {
            state.shared.metrics.limited("body_read_timeout");
            Err(NodeError::RequestTimeout(format!(
                "the request body did not arrive within {} ms",
                within.as_millis()
            )))
        }
    }
}

async fn read_body_unbounded(
    req: &HttpRequest,
    mut payload: web::Payload,
    limit: usize,
) -> Result<web::Bytes> {
    let too_large = || NodeError::TooLarge(format!("request body exceeds {limit} bytes"));
    if let Some(len) = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<usize>().ok())
    {
        if len > limit {
            return Err(too_large());
        }
    }
    let mut body = web::BytesMut::new();
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|e| NodeError::BadRequest(format!("reading body: {e}")))?;
        if body.len() + chunk.len() > limit {
            return Err(too_large());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body.freeze())
}

/// TLS, or loopback development mode (plain HTTP is only ever served on loopback). A node
/// with a certificate serves TLS on every connection of its device port, so that is the
/// node's setting, not something to keep per connection.
fn is_secure(config: &Config, req: &HttpRequest) -> bool {
    config.tls.is_some() || req.peer_addr().is_some_and(|a| a.ip().is_loopback())
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn check_session(session: &Option<String>) -> Result<()> {
    match session {
        Some(s) if s.len() > MAX_SESSION_LEN => Err(NodeError::BadRequest(format!(
            "session id longer than {MAX_SESSION_LEN} bytes"
        ))),
        _ => Ok(()),
    }
}

#[utoipa::path(
    post,
    path = "/v1/register",
    tag = "devices",
    operation_id = "register",
    description = "Registers a device (default or assigned credentials). First contact creates \
        the device type's buckets and issues assigned credentials in `X-Tether-Set-Credentials`; \
        default credentials again later revoke the old assigned ones and issue new ones.",
    request_body(content(
        (RegisterRequest = "application/json", example = json!({"device_id": "01AA02AB", "device_type": "thermostat", "sw_version": "1.2.0"})),
        (ProtobufBody = "application/x-protobuf"),
    )),
    responses(
        (status = 200, description = "Registered; its buckets listed", content(
            (RegisterResponse = "application/json", example = json!({"tier": "production", "redirect": null, "software_update": null, "sync_url": "https://sync.example.com", "buckets": ["device.01AA02AB", "shared.01AA02AB"]})),
            (ProtobufBody = "application/x-protobuf"),
        ),
        headers(("X-Tether-Set-Credentials" = String, description = "New assigned credentials: `<id> <secret>`")),
        links(
            ("GetBucket" = (operation_id = "getBucket", parameters(("id" = "$response.body#/buckets/0")), description = "Read the device's first bucket")),
            ("ListBuckets" = (operation_id = "listBuckets", parameters(("view" = "full")), description = "Everything the device may read")),
        )),
    ),
)]
/// `POST /v1/register` (seed 000 FIG 15–18). The whole request is validated before
/// anything happens (finding 4): credentials, body, `device_id`, device type; only then is
/// a default-credential registration charged and applied (new credentials, unpairing in the
/// lost-credentials case) and are the buckets created.
pub async fn register(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse> {
    let (principal, pending) = state
        .auth
        .authenticate_register(&req, is_secure(&state.config, &req))
        .await?;
    let body = read_body(&req, payload, ENVELOPE_BYTES, &state).await?;
    let msg: RegisterRequest = decode(request_format(&req)?, &body)?;
    let set = SetKey::parse(&msg.device_id)?;
    if principal.device() != Some(&set) {
        return Err(NodeError::Forbidden(
            "credentials do not belong to this device_id".into(),
        ));
    }
    let decision = state.config.registration.decide(&set, &msg)?;
    let buckets: Vec<String> = decision
        .buckets
        .iter()
        .map(|(id, _)| id.to_string())
        .collect();
    let now = now_ms();
    let record = |first_seen_ms| DeviceRecord {
        device_id: msg.device_id.clone(),
        device_type: msg.device_type.clone(),
        sw_version: msg.sw_version.clone(),
        first_seen_ms,
        last_seen_ms: now,
    };
    // First contact: credentials, bucket set and device record in one batched store
    // transaction (issue 16); anything else takes the general path below.
    let mut registered = false;
    if let Some(grant) = pending {
        let first = decision.redirect.is_none().then(|| FirstContact {
            buckets: decision.buckets.clone(),
            record: record(now),
        });
        registered = state.auth.complete_registration(&req, grant, first).await?;
    }
    let contact = DeviceContact {
        next_sync_ms: msg.next_sync_ms,
    };
    if decision.redirect.is_none() && !registered {
        state
            .router
            .ensure(
                &set,
                decision.buckets,
                Some(msg.device_type.clone()),
                Some(contact),
            )
            .await?;
        let first_seen_ms = state
            .shared
            .store
            .get_device(&msg.device_id)
            .await?
            .map_or(now, |r| r.first_seen_ms);
        state.shared.store.put_device(record(first_seen_ms)).await?;
    } else if registered && contact.next_sync_ms.is_some() {
        // A first contact went to the store in one transaction, past the set's owner: the
        // owner learns the device's declared next sync now (its registration it reads
        // from the device record).
        state
            .router
            .ensure(&set, Vec::new(), None, Some(contact))
            .await?;
    }
    tracing::info!(set = %set, tier = %decision.tier, redirected = decision.redirect.is_some(), "registered");
    let resp = RegisterResponse {
        tier: decision.tier,
        redirect: decision.redirect,
        software_update: decision.software_update,
        sync_url: state.placement.sync_url(set.as_str()),
        buckets,
    };
    Ok(respond(&req, StatusCode::OK, &resp))
}

/// `GET /v1/buckets` query.
#[derive(Debug, Deserialize)]
pub struct ListQuery {
    #[serde(default)]
    view: View,
    ids: Option<String>,
}

#[utoipa::path(
    get,
    path = "/v1/buckets",
    tag = "buckets",
    operation_id = "listBuckets",
    params(
        ("view" = Option<View>, Query, description = "`ids`, `versions` (default) or `full`"),
        ("ids" = Option<String>, Query, description = "Comma-separated bucket ids to restrict the list to", example = "device.01AA02AB,shared.01AA02AB"),
    ),
    responses(
        (status = 200, description = "The buckets the principal may read", content(
            (BucketList = "application/json", example = json!({"buckets": [{"id": "device.01AA02AB", "timestamp": 1763884800123_u64, "version": 42}]})),
            (ProtobufBody = "application/x-protobuf"),
        ),
        links(
            ("Subscribe" = (operation_id = "subscribe", request_body = json!({"buckets": "$response.body#/buckets", "timeout_ms": 100}), description = "Hold the listed versions")),
        )),
    ),
)]
/// `GET /v1/buckets`: the principal's buckets, in the requested view. `ids=` is a set
/// (duplicates count once) of at most `max_ids_per_request` ids; values are copied only
/// for `view=full`, and at most `max_answer_bytes` of them (413 beyond: finding 1).
pub async fn list(
    req: HttpRequest,
    query: web::Query<ListQuery>,
    state: web::Data<AppState>,
) -> Result<HttpResponse> {
    let mut principal = state.principal(&req, Endpoint::Buckets).await?;
    let limits = &state.config.limits;
    let mut by_set: BTreeMap<SetKey, Option<Vec<BucketId>>> = BTreeMap::new();
    match &query.ids {
        Some(ids) => {
            let ids = requests::id_list(ids, limits.max_ids_per_request)?;
            state.authorize_all(&mut principal, &ids).await?;
            for id in ids {
                by_set
                    .entry(id.set_key())
                    .or_insert_with(|| Some(Vec::new()))
                    .get_or_insert_with(Vec::new)
                    .push(id);
            }
        }
        None => {
            // Everything in scope: the scope read now, so a device paired a moment ago
            // through another node is listed.
            principal = state.auth.rescoped(&principal).await?;
            by_set.extend(principal.sets().into_iter().map(|s| (s, None)));
        }
    }
    let values = query.view == View::Full;
    let mut budget = limits.max_answer_bytes;
    let mut buckets = Vec::new();
    for (set, ids) in by_set {
        let read = Get {
            ids,
            values,
            max_bytes: budget,
        };
        let found: Vec<Bucket> =
            within_store_deadline(&state, state.router.get(&set, read)).await?;
        for b in found.iter().filter(|b| principal.may_access(&b.id)) {
            if values {
                budget = budget.saturating_sub(answer_size(b));
            }
            buckets.push(BucketDoc::from_bucket(b, query.view));
        }
    }
    Ok(respond(
        &req,
        StatusCode::OK,
        &BucketList {
            buckets,
            pending: Vec::new(),
        },
    ))
}

/// The least time a subscribe gets to answer, whatever its `timeout_ms`.
pub(crate) const OPEN_AT_LEAST: Duration = Duration::from_secs(1);

/// A read bounded by the store's deadline (`--store-timeout-ms`): an owner whose store
/// does not answer makes it a 503 + `Retry-After`, not a hang.
pub(crate) async fn within_store_deadline<T>(
    state: &AppState,
    read: impl std::future::Future<Output = Result<T>>,
) -> Result<T> {
    let limit = state.config.store_timeout;
    tokio::time::timeout(limit, read).await.map_err(|_| {
        NodeError::Unavailable(format!(
            "the read took longer than the store deadline ({} ms); retry",
            limit.as_millis()
        ))
    })?
}

fn parse_path_id(raw: &str) -> Result<BucketId> {
    Ok(BucketId::parse(raw)?)
}

#[utoipa::path(
    get,
    path = "/v1/buckets/{id}",
    tag = "buckets",
    operation_id = "getBucket",
    params(("id" = String, Path, description = "Bucket id `<kind>.<key>`", example = "device.01AA02AB")),
    responses(
        (status = 200, description = "The bucket", content(
            (BucketDoc = "application/json", example = json!({"id": "device.01AA02AB", "timestamp": 1763884800123_u64, "version": 42, "value": {"target_temperature": 21.5, "mode": "heat"}})),
            (ProtobufBody = "application/x-protobuf"),
        ),
        links(
            ("PutBucket" = (operation_id = "putBucket", parameters(("id" = "$response.body#/id")), request_body = json!({"value": {"mode": "heat"}, "base_version": "$response.body#/version"}), description = "Write on top of this version")),
            ("Subscribe" = (operation_id = "subscribe", request_body = json!({"buckets": [{"id": "$response.body#/id", "version": "$response.body#/version", "timestamp": "$response.body#/timestamp"}], "timeout_ms": 100}), description = "Wait for a change")),
        )),
        (status = 404, description = "No such bucket (one the principal could read if it existed)", body = ErrorBody, example = json!({"error": "not_found", "message": "no bucket device.01AA02AB"})),
    ),
)]
/// `GET /v1/buckets/{id}`.
pub async fn get_one(
    req: HttpRequest,
    path: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse> {
    let mut principal = state.principal(&req, Endpoint::Buckets).await?;
    let id = parse_path_id(&path)?;
    state
        .authorize_all(&mut principal, std::iter::once(&id))
        .await?;
    let read = Get {
        ids: Some(vec![id.clone()]),
        values: true,
        max_bytes: state.config.limits.max_answer_bytes,
    };
    let found: Vec<Bucket> =
        within_store_deadline(&state, state.router.get(&id.set_key(), read)).await?;
    let b = found
        .first()
        .ok_or_else(|| NodeError::NotFound(format!("no bucket {id}")))?;
    Ok(respond(
        &req,
        StatusCode::OK,
        &BucketDoc::from_bucket(b, View::Full),
    ))
}

#[utoipa::path(
    put,
    path = "/v1/buckets/{id}",
    tag = "buckets",
    operation_id = "putBucket",
    description = "Writes changed fields, reconciled against the stored version (seed 000 FIG 23). \
        Answered only once the write is durable.",
    params(("id" = String, Path, description = "Bucket id `<kind>.<key>`", example = "device.01AA02AB")),
    request_body(content(
        (UpdateRequest = "application/json", example = json!({"value": {"target_temperature": 21.5}, "base_version": 42, "occ": false})),
        (ProtobufBody = "application/x-protobuf"),
    )),
    responses(
        (status = 200, description = "`applied` (timestamp and version) or `merged` (the merged bucket)", content(
            (UpdateResponse = "application/json", example = json!({"outcome": "applied", "id": "device.01AA02AB", "timestamp": 1763884800123_u64, "version": 43})),
            (ProtobufBody = "application/x-protobuf"),
        ),
        links(
            ("GetBucket" = (operation_id = "getBucket", parameters(("id" = "$response.body#/id")), description = "Read it back")),
            ("Subscribe" = (operation_id = "subscribe", request_body = json!({"buckets": [{"id": "$response.body#/id", "version": "$response.body#/version", "timestamp": "$response.body#/timestamp"}], "timeout_ms": 100}), description = "Wait for the next change")),
        )),
        (status = 404, description = "No such bucket", body = ErrorBody, example = json!({"error": "not_found", "message": "no bucket device.01AA02AB"})),
        (status = 409, description = "`refused`: OCC was set and the base version is stale; the stored bucket", content(
            (UpdateResponse = "application/json", example = json!({"outcome": "refused", "id": "device.01AA02AB", "timestamp": 1763884800123_u64, "version": 44, "value": {"target_temperature": 20.0}})),
            (ProtobufBody = "application/x-protobuf"),
        )),
        (status = 422, description = "`unknown_field`: the write names a field outside its bucket's template; nothing was changed", body = ErrorBody, example = json!({"error": "unknown_field", "message": "bucket device.01AA02AB has no field fan; its template has current_temperature, humidity, hvac_state, sw_version"})),
    ),
)]
/// `PUT /v1/buckets/{id}` (seed 000 FIG 23). Answered only after the write is durable.
pub async fn put(
    req: HttpRequest,
    path: web::Path<String>,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse> {
    let mut principal = state.principal(&req, Endpoint::Buckets).await?;
    let id = parse_path_id(&path)?;
    state
        .authorize_all(&mut principal, std::iter::once(&id))
        .await?;
    let body = read_body(
        &req,
        payload,
        state.config.max_bucket_bytes + ENVELOPE_BYTES,
        &state,
    )
    .await?;
    let msg: UpdateRequest = decode(request_format(&req)?, &body)?;
    check_session(&msg.session)?;
    crate::api::blobs::check_references(&state, &mut principal, &id, &msg.value).await?;
    if let Some(op) = msg.op_id.as_deref().filter(|op| !valid_op_id(op)) {
        return Err(NodeError::BadRequest(format!(
            "op_id {op:?}: expected 1–64 characters of [A-Za-z0-9_-]"
        )));
    }
    let write = Write {
        update: Update {
            value: msg.value,
            base_version: msg.base_version,
            occ: msg.occ,
        },
        session: msg.session,
        by: principal.author(),
        op_id: msg.op_id,
    };
    let op_id = write.op_id.clone();
    let written = state.router.put(&id, write).await?;
    let b = &written.bucket;
    let (status, outcome, value) = match written.kind {
        PutKind::Applied => (StatusCode::OK, UpdateOutcome::Applied, None),
        PutKind::Merged => (StatusCode::OK, UpdateOutcome::Merged, Some(b.value.clone())),
        PutKind::Refused => (
            StatusCode::CONFLICT,
            UpdateOutcome::Refused,
            Some(b.value.clone()),
        ),
    };
    let resp = UpdateResponse {
        outcome,
        id: id.to_string(),
        timestamp: b.timestamp.millis,
        version: b.version,
        value,
        replayed: written.replayed,
        delivery: written.delivery,
    };
    // The write log is the request's own line ("request done"), not a line of its own.
    req.extensions_mut().insert(WriteDone {
        bucket: id,
        outcome,
        version: b.version,
        op_id,
        replayed: written.replayed,
    });
    Ok(respond(&req, status, &resp))
}

/// What a PUT wrote, for its request's log line (`server`'s "request done"): one line
/// per write, with its bucket, outcome, version and op id.
#[derive(Debug, Clone)]
pub struct WriteDone {
    /// The bucket written.
    pub bucket: BucketId,
    /// Applied, merged or refused.
    pub outcome: UpdateOutcome,
    /// The bucket's version after the write (the stored one when refused).
    pub version: u64,
    /// The client's op id, if it sent one.
    pub op_id: Option<String>,
    /// Whether the op id was already applied and its first answer replayed.
    pub replayed: bool,
}

#[utoipa::path(
    post,
    path = "/v1/subscribe",
    tag = "buckets",
    operation_id = "subscribe",
    description = "Long-poll: answers at once with the buckets whose stored version differs from \
        the one sent, else holds until one changes or `timeout_ms` passes (then `{\"buckets\": []}`). \
        With `\"stream\": true` (apps and services): 200 `application/x-ndjson`, one such answer per \
        line (the first at once when something is stale), the held versions advancing with each \
        line, the stream's own `session` writes never sent, a `{}` line after 30 s of silence; \
        the body ends at `timeout_ms`, when the principal may no longer read a held bucket \
        (unpairing, revoked credentials) and when the node drains, and is cut (no last chunk) \
        when an owner cannot be reached: resubscribe with the versions of the last line.",
    request_body(content(
        (SubscribeRequest = "application/json", example = json!({"buckets": [{"id": "device.01AA02AB", "timestamp": 1763884800123_u64, "version": 42}], "timeout_ms": 1000})),
        (ProtobufBody = "application/x-protobuf"),
    )),
    responses(
        (status = 200, description = "Changed buckets (full), or none when the hold timed out; with `stream`, one such answer or `{}` per line", content(
            (BucketList = "application/json", example = json!({"buckets": [{"id": "device.01AA02AB", "timestamp": 1763884800999_u64, "version": 43, "value": {"mode": "off"}}]})),
            (ProtobufBody = "application/x-protobuf"),
            (String = "application/x-ndjson", example = json!("{\"buckets\":[{\"id\":\"device.01AA02AB\",\"timestamp\":1763884800999,\"version\":43,\"value\":{\"mode\":\"off\"}}]}\n{}\n")),
        )),
        (status = 404, description = "A listed bucket does not exist", body = ErrorBody, example = json!({"error": "not_found", "message": "no bucket device.01AA02AB"})),
    ),
)]
/// `POST /v1/subscribe` (seed 000 FIG 21): answer at once with stale buckets, else hold.
/// The held ids are a set of at most `max_ids_per_request`; an answer carries at most about
/// `max_answer_bytes` of buckets (the rest are answered by the next subscribe); a principal
/// holds at most `max_held_per_principal` subscriptions, a new one answering its oldest.
pub async fn subscribe(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse> {
    // Everything before the hold (credentials, body, decoding, routing) runs in a boxed
    // future of its own, freed when it ends: a held device keeps only what answering
    // needs, not the parsed request, its body and every step's locals (BENCHMARKS.md
    // "Where a held device's bytes go").
    let held = match Box::pin(open_subscribe(&req, payload, &state)).await? {
        Opened::Answered(response) => return Ok(response),
        Opened::Held(held) => held,
    };
    // The hold: the handler answers at once with a response that stands for the held one.
    // actix-web then lets the request go (its head and header map, its extensions, this
    // future and the middleware's), and the server's middleware turns it into a response
    // actix-http writes when the hold ends: the status line too, so that until the answer
    // no byte of it leaves (a 503 is still possible then, and a load balancer may send a
    // held request whose node died to another node).
    let content_type = held.content_type();
    Ok(HeldResponse::placeholder(Box::pin((*held).answer().map(
        move |answer| match answer {
            Ok(bytes) => HttpResponse::Ok().content_type(content_type).body(bytes),
            Err(e) => HttpResponse::from_error(e),
        },
    ))))
}

/// A held subscribe's response, ready when its hold ends. The handler answers with a
/// placeholder carrying it; the server's middleware hands it to actix-http's dispatcher
/// (`actix_http::h1::DeferredResponse`), which writes nothing until it is ready.
pub struct HeldResponse(pub std::pin::Pin<Box<dyn std::future::Future<Output = HttpResponse>>>);

impl std::fmt::Debug for HeldResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HeldResponse").finish_non_exhaustive()
    }
}

impl HeldResponse {
    /// The placeholder: an empty 500 should it ever reach a client (the middleware
    /// replaces it).
    fn placeholder(
        answer: std::pin::Pin<Box<dyn std::future::Future<Output = HttpResponse>>>,
    ) -> HttpResponse {
        let mut placeholder = HttpResponse::InternalServerError().finish();
        placeholder.extensions_mut().insert(HeldResponse(answer));
        placeholder
    }
}

/// A subscribe once checked: answered (at once, a stream, or headers first), or held.
enum Opened {
    Answered(HttpResponse),
    Held(Box<HeldAnswer>),
}

/// What a held subscribe keeps until it is answered.
struct HeldAnswer {
    held: HeldSubscription,
    /// Answered "no change" when a newer subscribe of the principal takes its place, and
    /// when the node drains (`HeldByPrincipal::drain`).
    slot: HeldSlot,
    hold: crate::metrics::HoldTimer,
    /// The subscriber's deadline: its timeout from when the request arrived.
    deadline: tokio::time::Instant,
    max_bytes: Option<u64>,
    format: Format,
}

impl HeldAnswer {
    fn content_type(&self) -> &'static str {
        match self.format {
            Format::Json => "application/json",
            Format::Protobuf => PROTOBUF,
        }
    }

    /// The answer's body: the changed buckets (cut to `max_bytes`), or none when the hold
    /// passed, the node drains or a newer subscribe of the principal took this one's
    /// place. An owner that could not confirm "nothing changed" (its forwarded call broke
    /// or its answer is late) fails the answer: never "no change" from a node that does
    /// not know.
    fn answer(self) -> HeldReply<impl Future<Output = Result<Vec<BucketUpdate>>>> {
        let HeldAnswer {
            held,
            slot,
            hold,
            deadline,
            max_bytes,
            format,
        } = self;
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        HeldReply {
            // The drain comes through the slot: no watch of the drain per held device.
            answer: held.answer_until(left, std::future::pending()),
            open: Some((slot, hold)),
            max_bytes,
            format,
        }
    }
}

pin_project_lite::pin_project! {
    /// [`HeldAnswer::answer`]: the held subscription's answer and what making the body
    /// needs, in the one allocation the handler makes for the hold (a future written out,
    /// so that nothing is kept twice; BENCHMARKS.md "Where a held device's bytes go").
    struct HeldReply<F> {
        #[pin]
        answer: F,
        // The principal's slot and the hold's timer; `None` once answered.
        open: Option<(HeldSlot, crate::metrics::HoldTimer)>,
        max_bytes: Option<u64>,
        format: Format,
    }
}

impl<F: Future<Output = Result<Vec<BucketUpdate>>>> Future for HeldReply<F> {
    type Output = Result<web::Bytes>;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        use std::task::Poll;
        let this = self.project();
        let Some((mut slot, hold)) = this.open.take() else {
            // Polled again after it completed.
            return Poll::Pending;
        };
        let updates = match this.answer.poll(cx) {
            Poll::Ready(Ok(updates)) => updates,
            Poll::Ready(Err(e)) => {
                tracing::info!(error = %e, "held subscribe cut");
                // The timer, dropped unanswered, counts it cancelled.
                return Poll::Ready(Err(e));
            }
            Poll::Pending => match slot.poll_evicted(cx) {
                Poll::Ready(_) => Vec::new(),
                Poll::Pending => {
                    *this.open = Some((slot, hold));
                    return Poll::Pending;
                }
            },
        };
        drop(slot);
        hold.answered(
            updates.iter().map(|u| u.bucket.timestamp.millis).max(),
            now_ms(),
        );
        let list = answer_list(updates, *this.max_bytes, this.format.encoding());
        Poll::Ready(match this.format {
            Format::Json => serde_json::to_vec(&list)
                .map(web::Bytes::from)
                .map_err(|e| NodeError::Internal(e.to_string())),
            Format::Protobuf => Ok(web::Bytes::from(list.encode_pb())),
        })
    }
}

/// The subscribe up to its hold: checks, routing, and the answer when one is due now.
async fn open_subscribe(
    req: &HttpRequest,
    payload: web::Payload,
    state: &web::Data<AppState>,
) -> Result<Opened> {
    // The whole subscribe answers within `timeout.max(OPEN_AT_LEAST)` (invariant 6):
    // checking the credentials (a store lookup on a cache miss) gets at most
    // OPEN_AT_LEAST of it, so a store that does not answer cannot hold the subscriber.
    let started = tokio::time::Instant::now();
    let mut principal =
        tokio::time::timeout(OPEN_AT_LEAST, state.principal(req, Endpoint::Buckets))
            .await
            .map_err(|_| {
                NodeError::Unavailable("the credentials could not be checked in time; retry".into())
            })??;
    let limits = &state.config.limits;
    let body_limit = limits
        .max_ids_per_request
        .saturating_mul(HELD_ENTRY_BYTES)
        .saturating_add(ENVELOPE_BYTES);
    let body = read_body(req, payload, body_limit, state).await?;
    let msg: SubscribeRequest = decode(request_format(req)?, &body)?;
    check_session(&msg.session)?;
    let held_set = requests::held_set(&msg.buckets, limits.max_ids_per_request)?;
    if held_set.is_empty() {
        return Err(NodeError::BadRequest("subscribe lists no buckets".into()));
    }
    state
        .authorize_all(&mut principal, held_set.iter().map(|h| &h.id))
        .await?;
    let mut by_set: BTreeMap<SetKey, Vec<Held>> = BTreeMap::new();
    for h in held_set {
        by_set.entry(h.id.set_key()).or_default().push(h);
    }
    let timeout = msg
        .timeout_ms
        .map_or(
            state.config.subscribe_default_timeout,
            Duration::from_millis,
        )
        .min(state.config.subscribe_max_timeout);
    // A subscribe the load balancer sends again (HAProxy `retry-on 503`: the node it tried
    // could not reach an owner) holds only for what is left of its timeout since the
    // balancer first received it (`X-Request-Start`, README "Running a cluster"), so its
    // tries cannot add up to several timeouts (ARCHITECTURE.md invariant 31).
    let waited = requests::balancer_wait_ms(
        req.headers()
            .get("x-request-start")
            .and_then(|v| v.to_str().ok()),
        now_ms(),
        timeout.as_millis() as u64,
    );
    let timeout = timeout.saturating_sub(Duration::from_millis(waited));
    let format = response_format(req);
    let encoding = format.encoding();
    // The node's budget is the ceiling (each owner answers within it); a device's
    // `max_bytes` asks for less. What does not fit is listed in `pending`.
    let ceiling = limits.max_answer_bytes;
    let max_bytes = Some(
        msg.max_bytes
            .map_or(ceiling as u64, |m| m.min(ceiling as u64)),
    );
    let opts = HoldOptions {
        session: msg.session,
        diffs: msg.diffs,
        max_bytes: ceiling,
        own_writes_known: false,
        device: principal.device().cloned(),
        next_sync_ms: msg.next_sync_ms,
    };
    let answer = move |updates: Vec<BucketUpdate>| answer_list(updates, max_bytes, encoding);
    // A stream's cursor starts from the versions held; a long-poll needs them no more.
    let cursor = msg.stream.then(|| Cursor::new(by_set.clone()));
    // The whole subscribe, checking credentials and finding the owners included, answers
    // within `timeout` (invariant 6): an owner that cannot be reached (isolated, paused)
    // or a store that does not answer makes it a 503 at the subscriber's deadline, not a
    // hang past it. The subscribe gets at least OPEN_AT_LEAST, so one that only asks for
    // what is newer now (`timeout_ms` 0) still gets its answer.
    let opened = tokio::time::timeout(
        timeout.max(OPEN_AT_LEAST).saturating_sub(started.elapsed()),
        state.router.subscribe(by_set, timeout, opts.clone()),
    )
    .await
    .map_err(|_| {
        NodeError::Unavailable(
            "no owner of a subscribed bucket set could be reached within the subscribe's \
             timeout_ms; retry"
                .into(),
        )
    })??;
    if let Some(cursor) = cursor {
        // Streaming (apps and services): this check's answer is the first line.
        let stream = StreamRequest {
            req: req.clone(),
            principal: principal.key(),
            cursor,
            timeout,
            started,
            opts,
            max_bytes,
        };
        return Ok(Opened::Answered(stream::respond(
            state.clone(),
            stream,
            opened,
        )));
    }
    let held = match opened {
        Subscription::Now(updates) => {
            return Ok(Opened::Answered(respond(
                req,
                StatusCode::OK,
                &answer(updates),
            )));
        }
        Subscription::Held(held) => held,
    };
    let held = Box::new(HeldAnswer {
        held,
        // One more held subscription of this principal; past its cap, its oldest is
        // answered.
        slot: state.held.register(&principal.key()),
        hold: crate::metrics::HoldTimer::start(state.shared.metrics.clone()),
        deadline: started + timeout,
        max_bytes,
        format,
    });
    if req.extensions().contains::<SetCredentials>() {
        // New credentials to deliver: the status line and headers go out now (API.md: the
        // device stores them "even on a held subscribe, before the body"); the body
        // follows when the hold ends, and a failed answer cuts the response (the client
        // resubscribes).
        return Ok(Opened::Answered(
            HttpResponse::Ok()
                .content_type(held.content_type())
                .streaming(futures::stream::once((*held).answer())),
        ));
    }
    // Otherwise nothing goes out before the answer, so a held request whose node dies
    // got no byte of a response and a load balancer may send it to another node (README
    // "Running a cluster"); a failed answer is a 503. A client that hangs up drops the
    // handler's future, and with it the held subscription on every owner.
    Ok(Opened::Held(held))
}

/// What a subscriber is sent: for each bucket a diff when one was made, else the value,
/// packed within `max_bytes` (what does not fit is listed as pending).
pub(crate) fn answer_list(
    updates: Vec<BucketUpdate>,
    max_bytes: Option<u64>,
    encoding: Encoding,
) -> BucketList {
    let docs = updates
        .into_iter()
        .map(|u| match u.diff {
            Some((base, changes)) => BucketDoc::diff(&u.bucket, base, changes),
            None => BucketDoc::from_bucket(&u.bucket, View::Full),
        })
        .collect();
    pack(docs, max_bytes, encoding)
}

/// Most changes one history page may hold.
const MAX_HISTORY_LIMIT: usize = 1_000;
/// A history page's size when the request names none.
const DEFAULT_HISTORY_LIMIT: usize = 100;

/// `GET /v1/buckets/{id}/history` query.
#[derive(Debug, Deserialize)]
pub struct HistoryQuery {
    #[serde(default)]
    since_version: u64,
    limit: Option<usize>,
}

#[utoipa::path(
    get,
    path = "/v1/buckets/{id}/history",
    tag = "buckets",
    operation_id = "getBucketHistory",
    params(
        ("id" = String, Path, description = "Bucket id `<kind>.<key>`", example = "device.01AA02AB"),
        ("since_version" = Option<u64>, Query, description = "Changes after this version (default 0: from the oldest kept)"),
        ("limit" = Option<usize>, Query, description = "Most changes in this page (1–1000, default 100)"),
    ),
    responses(
        (status = 200, description = "The bucket's changes after `since_version`, ascending: who changed which field, when", content(
            (HistoryResponse = "application/json", example = json!({"id": "device.01AA02AB", "oldest_version": 1, "truncated": false, "next_since_version": null, "changes": [{"version": 2, "timestamp": 1763884800123_u64, "outcome": "applied", "by": "device:01AA02AB", "session": "s1", "op_id": "a1b2c3d4-7", "fields": {"mode": "heat"}}]})),
            (ProtobufBody = "application/x-protobuf"),
        )),
        (status = 404, description = "No such bucket (one the principal could read if it existed)", body = ErrorBody, example = json!({"error": "not_found", "message": "no bucket device.01AA02AB"})),
    ),
)]
/// `GET /v1/buckets/{id}/history` (API.md "History"): the bucket's changes after
/// `since_version`, ascending, a page at a time; who changed which field, when.
pub async fn history(
    req: HttpRequest,
    path: web::Path<String>,
    query: web::Query<HistoryQuery>,
    state: web::Data<AppState>,
) -> Result<HttpResponse> {
    let mut principal = state.principal(&req, Endpoint::Buckets).await?;
    let id = parse_path_id(&path)?;
    state
        .authorize_all(&mut principal, std::iter::once(&id))
        .await?;
    let limit = match query.limit {
        Some(0) => return Err(NodeError::BadRequest("limit must be at least 1".into())),
        Some(n) => n.min(MAX_HISTORY_LIMIT),
        None => DEFAULT_HISTORY_LIMIT,
    };
    let since = query.since_version;
    let page = state
        .router
        .history(&id, since, limit)
        .await?
        .ok_or_else(|| NodeError::NotFound(format!("no bucket {id}")))?;
    // Nothing kept at all (a bucket older than the log): the log starts after its version.
    let oldest = page.oldest.unwrap_or(page.version.saturating_add(1));
    let resp = HistoryResponse {
        id: id.to_string(),
        oldest_version: oldest,
        // Changes after `since` were dropped when the oldest kept one is further along
        // than the next version and there was anything after `since` at all.
        truncated: since < page.version && oldest > since.saturating_add(1),
        next_since_version: if page.more {
            page.changes.last().map(|c| c.version)
        } else {
            None
        },
        changes: page.changes.into_iter().map(ChangeDoc::from).collect(),
    };
    Ok(respond(&req, StatusCode::OK, &resp))
}

fn pairing_code() -> String {
    use rand::Rng;
    let alphabet = requests::CODE_ALPHABET;
    let mut rng = rand::rng();
    let mut code = String::with_capacity(requests::CODE_LEN + 1);
    for i in 0..requests::CODE_LEN {
        if i == requests::CODE_LEN / 2 {
            code.push('-');
        }
        code.push(alphabet[rng.random_range(0..alphabet.len())] as char);
    }
    code
}

#[utoipa::path(
    post,
    path = "/v1/pairing-code",
    tag = "devices",
    operation_id = "pairingCode",
    description = "A device (assigned credentials) asks for a short-lived code its user redeems with `POST /v1/pair`.",
    responses(
        (status = 200, description = "The code", content(
            (PairingCodeResponse = "application/json", example = json!({"code": "7Q4K-92XD", "expires_in_s": 600})),
            (ProtobufBody = "application/x-protobuf"),
        ),
        links(("Pair" = (operation_id = "pair", request_body = json!({"code": "$response.body#/code"}), description = "A user redeems the code")))),
    ),
)]
/// `POST /v1/pairing-code`: a device asks for a short-lived code its user can redeem. Only
/// the newest code of a device is valid: issuing one invalidates the one before (finding 7).
pub async fn pairing_code_handler(
    req: HttpRequest,
    state: web::Data<AppState>,
) -> Result<HttpResponse> {
    let principal = state.principal(&req, Endpoint::PairingCode).await?;
    let serial = principal
        .device()
        .ok_or_else(|| NodeError::Forbidden("devices only".into()))?;
    let code = pairing_code();
    state
        .shared
        .store
        .put_pairing_code(PairingCode {
            code: code.clone(),
            device_id: serial.to_string(),
            expires_ms: now_ms() + state.config.pairing_code_ttl_s * 1000,
        })
        .await?;
    tracing::info!(device = %serial, "pairing code issued");
    Ok(respond(
        &req,
        StatusCode::OK,
        &PairingCodeResponse {
            code,
            expires_in_s: state.config.pairing_code_ttl_s,
        },
    ))
}

/// The buckets a new structure starts with: the template's fields, its name filled in.
fn structure_template(key: &SetKey, name: &str) -> Result<Vec<(BucketId, tether_proto::Fields)>> {
    let mut fields: tether_proto::Fields = STRUCTURE_FIELDS
        .iter()
        .map(|f| (f.to_string(), tether_proto::Value::Null))
        .collect();
    fields.insert("name".into(), tether_proto::Value::from(name));
    Ok(vec![(BucketId::new(STRUCTURE_KIND, key)?, fields)])
}

#[utoipa::path(
    post,
    path = "/v1/pair",
    tag = "pairing",
    operation_id = "pair",
    description = "A user redeems a device's pairing code; the device joins the user's account and, if named, one of the user's structures.",
    request_body(content(
        (PairRequest = "application/json", example = json!({"code": "7Q4K-92XD", "structure": "home"})),
        (ProtobufBody = "application/x-protobuf"),
    )),
    responses(
        (status = 200, description = "Paired", content(
            (PairResponse = "application/json", example = json!({"device_id": "01AA02AB", "structure": "home"})),
            (ProtobufBody = "application/x-protobuf"),
        ),
        links(("Unpair" = (operation_id = "unpair", parameters(("device_id" = "$response.body#/device_id")), description = "Undo it")))),
        (status = 404, description = "No such pairing code, or it expired", body = ErrorBody, example = json!({"error": "not_found", "message": "no such pairing code, or it expired"})),
    ),
)]
/// `POST /v1/pair`: a user redeems a device's code; the device joins the user's account
/// and, if named, one of the user's structures (created on first use). Structure names are
/// the user's own: `"home"` is this user's home, whatever other accounts call theirs, and
/// the answer's `structure` is its id (`structure.<id>` is its bucket); naming an id the
/// user already owns works too. Failed redemptions are limited per account.
pub async fn pair(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse> {
    let principal = state.principal(&req, Endpoint::UserOnly).await?;
    let Principal::User {
        user_id,
        structures,
        ..
    } = &principal
    else {
        return Err(NodeError::Forbidden("users only".into()));
    };
    let body = read_body(&req, payload, ENVELOPE_BYTES, &state).await?;
    let msg: PairRequest = decode(request_format(&req)?, &body)?;
    let code = requests::pairing_code(&msg.code)?;
    let structure = match msg.structure.as_deref() {
        None => None,
        Some(s) if structures.contains(s) => Some((SetKey::parse(s)?, None)),
        Some(name) => Some((requests::structure_key(user_id, name)?, Some(name))),
    };
    let credentials = &state.auth.credentials;
    credentials.check_pair_failures(user_id).inspect_err(|_| {
        state.shared.metrics.limited("pair_failures");
    })?;
    let store = &state.shared.store;
    // Refuse another account's structure before the code is spent (only a structure
    // claimed before names were scoped per user can be one), and spend the code before
    // claiming anything: a refused pair changes nothing.
    if let Some((key, _)) = &structure {
        if store
            .structure_owner(key.as_str())
            .await?
            .is_some_and(|owner| &owner != user_id)
        {
            return Err(NodeError::Forbidden(format!(
                "structure {key} belongs to another account"
            )));
        }
    }
    let Some(code) = store
        .take_pairing_code(&code)
        .await?
        .filter(|c| c.expires_ms > now_ms())
    else {
        credentials.pair_failed(user_id);
        return Err(NodeError::NotFound(
            "no such pairing code, or it expired".into(),
        ));
    };
    if let Some((key, name)) = &structure {
        let owner = store.claim_structure(key.as_str(), user_id).await?;
        if &owner != user_id {
            return Err(NodeError::Forbidden(format!(
                "structure {key} belongs to another account"
            )));
        }
        if let Some(name) = name {
            state
                .router
                .ensure(key, structure_template(key, name)?, None, None)
                .await?;
        }
    }
    let old = store
        .set_pairing(
            &code.device_id,
            Some(Pairing {
                device_id: code.device_id.clone(),
                user_id: user_id.clone(),
                structure: structure.as_ref().map(|(k, _)| k.to_string()),
                paired_ms: now_ms(),
            }),
        )
        .await?;
    state.auth.pairing_changed();
    let old_structure = old.and_then(|p| p.structure);
    state
        .router
        .release_held(std::iter::once(code.device_id.as_str()).chain(old_structure.as_deref()))
        .await;
    tracing::info!(device = %code.device_id, user = %user_id, "device paired");
    let resp = PairResponse {
        device_id: code.device_id,
        structure: structure.map(|(k, _)| k.to_string()),
    };
    Ok(respond(&req, StatusCode::OK, &resp))
}

#[utoipa::path(
    delete,
    path = "/v1/devices/{device_id}/pairing",
    tag = "pairing",
    operation_id = "unpair",
    params(("device_id" = String, Path, description = "The device's serial", example = "01AA02AB")),
    responses(
        (status = 200, description = "Unpaired", content(
            (PairResponse = "application/json", example = json!({"device_id": "01AA02AB", "structure": null})),
            (ProtobufBody = "application/x-protobuf"),
        )),
    ),
)]
/// `DELETE /v1/devices/{device_id}/pairing`: the owning user unpairs a device.
pub async fn unpair(
    req: HttpRequest,
    path: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse> {
    let principal = state.principal(&req, Endpoint::UserOnly).await?;
    let Principal::User { user_id, .. } = &principal else {
        return Err(NodeError::Forbidden("users only".into()));
    };
    let device = SetKey::parse(&path)?;
    let store = &state.shared.store;
    match store.get_pairing(device.as_str()).await? {
        Some(p) if &p.user_id == user_id => {
            store.set_pairing(device.as_str(), None).await?;
            state.auth.pairing_changed();
            state
                .router
                .release_held(std::iter::once(device.as_str()).chain(p.structure.as_deref()))
                .await;
            tracing::info!(device = %device, user = %user_id, "device unpaired");
            Ok(respond(
                &req,
                StatusCode::OK,
                &PairResponse {
                    device_id: device.to_string(),
                    structure: None,
                },
            ))
        }
        // Not this user's device: the same answer whether it exists or not.
        _ => Err(NodeError::Forbidden(format!(
            "device {device} is not paired to this account"
        ))),
    }
}

#[utoipa::path(
    get,
    path = "/v1/devices/{device_id}/presence",
    tag = "buckets",
    operation_id = "getPresence",
    description = "What the owner of the device's bucket set knows of it: `online` while the \
        device holds a subscribe (or was answered one a moment ago), when it was last seen \
        (subscribed, wrote or registered), and when it said it will sync next (its last \
        `next_sync_ms`). For the device itself and users it is paired with. Kept in the \
        owner's memory: after a failover, nothing is known until the device is seen again.",
    params(("device_id" = String, Path, description = "The device's serial", example = "01AA02AB")),
    responses(
        (status = 200, description = "The device's presence", content(
            (PresenceResponse = "application/json", example = json!({"online": false, "last_seen": 1763884800123_u64, "next_sync_by": 1763888400123_u64})),
            (ProtobufBody = "application/x-protobuf"),
        )),
        (status = 403, description = "Not this device, nor a user it is paired with", body = ErrorBody, example = json!({"error": "forbidden", "message": "no access to device 01AA02AB"})),
    ),
)]
/// `GET /v1/devices/{device_id}/presence` (API.md "Presence and wake-ups").
pub async fn presence(
    req: HttpRequest,
    path: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse> {
    let mut principal = state.principal(&req, Endpoint::Buckets).await?;
    let device = SetKey::parse(&path)?;
    // Access to a device is access to its set's (non-structure) buckets.
    let probe = BucketId::new(PRESENCE_KIND, &device)?;
    state
        .authorize_all(&mut principal, std::iter::once(&probe))
        .await
        .map_err(|e| match e {
            NodeError::Forbidden(_) => {
                NodeError::Forbidden(format!("no access to device {device}"))
            }
            other => other,
        })?;
    let view = state.router.presence(&device).await?;
    Ok(respond(
        &req,
        StatusCode::OK,
        &PresenceResponse {
            online: view.online,
            last_seen: view.last_seen,
            next_sync_by: view.next_sync_by,
        },
    ))
}

/// The bucket kind presence authorizes with: any kind but `structure` names the device's
/// own set.
const PRESENCE_KIND: &str = "device";

#[utoipa::path(
    get,
    path = "/healthz",
    tag = "operations",
    operation_id = "healthz",
    security(()),
    responses((status = 200, description = "The process is alive", body = crate::api::openapi::Health, example = json!({"status": "ok"}))),
)]
/// `GET /healthz` (and `HEAD`): the process is alive.
pub async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({"status": "ok"}))
}

/// The lease row `/readyz` reads to check that the store answers (never leased).
const READYZ_PROBE_SET: &str = "_readyz_probe";
/// How long `/readyz` waits for the store.
const READYZ_STORE_WAIT: Duration = Duration::from_secs(1);

#[utoipa::path(
    get,
    path = "/readyz",
    tag = "operations",
    operation_id = "readyz",
    security(()),
    responses(
        (status = 200, description = "Serving", body = crate::api::openapi::Health, example = json!({"status": "ready", "members": 3})),
        (status = 503, description = "Joining its cluster, draining, cut off from the majority of its cluster's last known members (`minority`: it serves no set), its store not answering within 1 s (`store_unreachable`), or near its connection capacity (`saturated`)", body = crate::api::openapi::Health, example = json!({"status": "minority", "members": 1, "reachable_members": 1, "last_known_members": 3})),
    ),
)]
/// `GET /readyz` (and `HEAD`): the node serves requests: store open, cluster joined (its
/// ring known), reaching a strict majority of its cluster's last known members (else
/// `minority`, invariant 24), its store answering a read within 1 s (else
/// `store_unreachable`), not draining, and not about to run out of connections — it turns 503
/// `saturated` once `readyz_saturation_percent` of its connection capacity is open, so a
/// load balancer sends new clients elsewhere while this node can still answer its own.
pub async fn readyz(state: web::Data<AppState>) -> HttpResponse {
    // One read of the store (a lease row nobody holds), bounded: a node that cannot reach
    // its store can neither commit nor confirm a lease, nor check an unknown credential,
    // so the load balancer should send its clients elsewhere (chaos store-partition-node).
    let store_reachable = match SetKey::parse(READYZ_PROBE_SET) {
        Ok(probe) => {
            tokio::time::timeout(READYZ_STORE_WAIT, state.shared.store.lease_epoch(&probe))
                .await
                .is_ok_and(|r| r.is_ok())
        }
        Err(_) => true,
    };
    let members = state.router.members();
    let (open, capacity) = (state.conns.open(), state.conns.capacity());
    let saturated = open.saturating_mul(100)
        >= capacity.saturating_mul(usize::from(state.config.limits.readyz_saturation_percent));
    let quorum = state.router.quorum();
    let body = |status: &str| {
        let mut b = serde_json::json!({"status": status, "members": members, "connections": open,
                                       "connection_capacity": capacity});
        if let Some(q) = quorum {
            b["reachable_members"] = q.reachable.into();
            b["last_known_members"] = q.last_known.into();
        }
        b
    };
    if !state.serving.load(Ordering::Acquire) {
        HttpResponse::ServiceUnavailable().json(body("draining"))
    } else if !state.joined.load(Ordering::Acquire) {
        HttpResponse::ServiceUnavailable().json(body("joining"))
    } else if quorum.is_some_and(|q| !q.holds()) {
        // Cut off from the majority: it takes no lease, so it serves nothing.
        HttpResponse::ServiceUnavailable().json(body("minority"))
    } else if !store_reachable {
        HttpResponse::ServiceUnavailable().json(body("store_unreachable"))
    } else if saturated {
        HttpResponse::ServiceUnavailable().json(body("saturated"))
    } else {
        HttpResponse::Ok().json(body("ready"))
    }
}

#[utoipa::path(
    get,
    path = "/metrics",
    tag = "operations",
    operation_id = "metrics",
    security(()),
    responses((status = 200, description = "Prometheus text (`text/plain; version=0.0.4`), or OpenMetrics with exemplars when accepted", content(
        (String = "text/plain"),
        (String = "application/openmetrics-text"),
    ))),
)]
/// `GET /metrics`: Prometheus text, or OpenMetrics with exemplars (trace ids) when the
/// scraper accepts `application/openmetrics-text`.
pub async fn metrics(req: HttpRequest, state: web::Data<AppState>) -> HttpResponse {
    let openmetrics = req
        .headers()
        .get(ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("application/openmetrics-text"));
    state
        .shared
        .metrics
        .auth_tracked_ids(state.auth.credentials.failure_table_len());
    if openmetrics {
        HttpResponse::Ok()
            .content_type("application/openmetrics-text; version=1.0.0; charset=utf-8")
            .body(state.shared.metrics.render_openmetrics())
    } else {
        HttpResponse::Ok()
            .content_type("text/plain; version=0.0.4; charset=utf-8")
            .body(state.shared.metrics.render())
    }
}

#[utoipa::path(
    head,
    path = "/healthz",
    tag = "operations",
    operation_id = "healthzHead",
    security(()),
    responses((status = 200, description = "The process is alive (no body)")),
)]
/// `HEAD /healthz`: `GET /healthz` without its body (for probes that send HEAD).
pub async fn healthz_head() -> HttpResponse {
    healthz().await
}

#[utoipa::path(
    head,
    path = "/readyz",
    tag = "operations",
    operation_id = "readyzHead",
    security(()),
    responses(
        (status = 200, description = "Serving (no body)"),
        (status = 503, description = "Joining, draining or saturated (no body)"),
    ),
)]
/// `HEAD /readyz`: `GET /readyz` without its body (for probes that send HEAD).
pub async fn readyz_head(state: web::Data<AppState>) -> HttpResponse {
    readyz(state).await
}

/// The route pattern of `path` (as actix-web's `match_pattern` names it) for the device
/// API's most frequent routes, by comparing segments; `None` for every other path, whose
/// pattern the resource map finds by trying each route's regex in turn. Every request's
/// span and metrics carry its pattern, and a PUT's routing already runs those regexes once.
pub fn frequent_route(path: &str) -> Option<&'static str> {
    let mut parts = path.strip_prefix("/v1/")?.split('/');
    let route = match (parts.next()?, parts.next(), parts.next()) {
        ("buckets", None, _) => "/v1/buckets",
        ("buckets", Some(id), None) if !id.is_empty() => "/v1/buckets/{id}",
        ("buckets", Some(id), Some("history")) if !id.is_empty() => "/v1/buckets/{id}/history",
        ("subscribe", None, _) => "/v1/subscribe",
        ("register", None, _) => "/v1/register",
        _ => return None,
    };
    parts.next().is_none().then_some(route)
}

/// Anything else: a JSON 404.
pub async fn not_found(req: HttpRequest) -> Result<HttpResponse> {
    Err(NodeError::NotFound(format!(
        "no route {} {}",
        req.method(),
        req.path()
    )))
}

/// Routes of the device API.
pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/v1/register", web::post().to(register))
        .route("/v1/buckets", web::get().to(list))
        // One resource for both methods: a PUT matches one pattern, not the GET's first.
        // Other methods get the JSON 404 like any unknown route.
        .service(
            web::resource("/v1/buckets/{id}")
                .route(web::get().to(get_one))
                .route(web::put().to(put))
                .default_service(web::to(not_found)),
        )
        .route("/v1/buckets/{id}/history", web::get().to(history))
        .route("/v1/subscribe", web::post().to(subscribe))
        .route("/v1/pairing-code", web::post().to(pairing_code_handler))
        .route("/v1/pair", web::post().to(pair))
        .route("/v1/devices/{device_id}/presence", web::get().to(presence))
        .route("/v1/blobs", web::post().to(crate::api::blobs::announce))
        .route(
            "/v1/blobs/{sha256}",
            web::put().to(crate::api::blobs::upload),
        )
        .route(
            "/v1/blobs/{sha256}",
            web::get().to(crate::api::blobs::download),
        )
        .route("/v1/devices/{device_id}/pairing", web::delete().to(unpair))
        .route("/healthz", web::get().to(healthz))
        .route("/healthz", web::head().to(healthz_head))
        .route("/readyz", web::get().to(readyz))
        .route("/readyz", web::head().to(readyz_head))
        .route("/metrics", web::get().to(metrics))
        .route("/v1/openapi.json", web::get().to(openapi::openapi_json))
        .route("/docs", web::get().to(openapi::docs_redirect))
        .service(openapi::swagger_ui())
        .app_data(
            web::QueryConfig::default()
                .error_handler(|e, _| NodeError::BadRequest(e.to_string()).into()),
        )
        .app_data(
            web::PathConfig::default()
                .error_handler(|e, _| NodeError::BadRequest(e.to_string()).into()),
        )
        .default_service(web::to(not_found));
}

#[cfg(test)]
mod tests {
    use actix_web::http::{Method, StatusCode};
    use actix_web::{body::MessageBody, test, App, HttpResponse};

    use super::{frequent_route, routes};

    /// Every path of up to five segments from a vocabulary of the API's words, edge cases
    /// (empty segments, an encoded slash) and a stranger.
    fn paths() -> Vec<String> {
        const WORDS: &[&str] = &[
            "",
            "v1",
            "buckets",
            "history",
            "subscribe",
            "register",
            "x",
            "a%2Fb",
        ];
        let mut paths = vec![String::new()];
        let mut level = vec![String::new()];
        for _ in 0..5 {
            level = level
                .iter()
                .flat_map(|p| WORDS.iter().map(move |w| format!("{p}/{w}")))
                .collect();
            paths.extend(level.iter().cloned());
        }
        paths
    }

    /// `frequent_route` names a path's pattern exactly as actix-web's resource map does
    /// for the node's real routes, or leaves the path to it.
    #[actix_web::test]
    async fn frequent_routes_are_named_as_the_resource_map_names_them() {
        let app = test::init_service(App::new().configure(routes).wrap_fn(|req, _| {
            let pattern = req.match_pattern().unwrap_or_else(|| "unmatched".into());
            let res = HttpResponse::Ok().body(pattern);
            futures::future::ready(Ok(req.into_response(res)))
        }))
        .await;
        let (mut named, mut checked) = (0, 0);
        for path in paths() {
            let uri = if path.is_empty() { "/" } else { &path };
            let res = test::call_service(&app, test::TestRequest::with_uri(uri).to_request()).await;
            let body = res.into_body().try_into_bytes().expect("a full body");
            let pattern = std::str::from_utf8(&body).expect("utf-8");
            checked += 1;
            if let Some(route) = frequent_route(uri) {
                named += 1;
                assert_eq!(route, pattern, "{uri}");
            }
        }
        // The five patterns, each {id} spelled seven ways (every word but the empty one).
        assert_eq!((named, checked), (1 + 7 + 7 + 1 + 1, 37_449));
    }

    /// A method a bucket does not serve gets the JSON 404 of any unknown route, not an
    /// empty 405 (the bucket's GET and PUT share one resource).
    #[actix_web::test]
    async fn other_methods_on_a_bucket_are_a_json_404() {
        let app = test::init_service(App::new().configure(routes)).await;
        for method in [Method::DELETE, Method::POST, Method::PATCH] {
            let req = test::TestRequest::default()
                .method(method.clone())
                .uri("/v1/buckets/device.D1")
                .to_request();
            let res = test::call_service(&app, req).await;
            assert_eq!(res.status(), StatusCode::NOT_FOUND, "{method}");
            let body: serde_json::Value = test::read_body_json(res).await;
            assert_eq!(body["error"], "not_found", "{method}: {body}");
        }
    }
}
