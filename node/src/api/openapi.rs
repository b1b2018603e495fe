//! The OpenAPI 3.1 description of the device API, served at `GET /v1/openapi.json`, with
//! Swagger UI at `/docs` (vendored: it works offline).
//!
//! Routes are registered with `.route()` in `http::routes`, which utoipa cannot see, so
//! every handler carries a `#[utoipa::path]` annotation and is listed in [`ApiDoc`]'s
//! `paths(...)`: adding an endpoint is one annotated handler plus one line there. The
//! errors every operation can answer (bad input, credentials, rate limit, overload) are
//! added by [`CommonErrors`] from what the operation is (authenticated, takes a body), so
//! annotations name only the answers particular to them. `node/tests/openapi.rs` fails
//! when a route exists that the spec does not describe, or the other way round.

use std::sync::OnceLock;

use actix_web::HttpResponse;
use serde_json::{json, Value};
use tether_proto::api::{
    BlobAnnounce, BlobStatus, BucketDoc, BucketList, ChangeDoc, Delivery, ErrorBody, HeldBucket,
    HistoryResponse, PairRequest, PairResponse, PairingCodeResponse, PresenceResponse,
    RegisterRequest, RegisterResponse, SoftwareUpdate, SubscribeRequest, UpdateOutcome,
    UpdateRequest, UpdateResponse, View,
};
use tether_proto::synclog::ChangeKind;
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::{Modify, OpenApi};

use crate::api::{blobs, http};

/// The spec: every operation of the device API, its messages and its errors.
#[derive(Debug, OpenApi)]
#[openapi(
    info(
        title = "Tether device API",
        description = "Keeps the state of devices (thermostats, sensors) and their apps in sync. \
            Devices register with their default (factory) credentials and receive assigned \
            credentials in the `X-Tether-Set-Credentials` response header, which they use for \
            everything else; apps act as users. Every message is JSON, or protobuf with \
            `Content-Type`/`Accept: application/x-protobuf` (schemas in `proto/tether/v1/device.proto`). \
            Every error is `{\"error\": code, \"message\": text}`. Requests may carry W3C \
            `traceparent`/`tracestate`; every answer carries `X-Request-Id`.",
        license(name = "Apache-2.0"),
    ),
    paths(
        http::register,
        http::list,
        http::get_one,
        http::history,
        http::put,
        http::subscribe,
        http::pairing_code_handler,
        http::pair,
        http::unpair,
        http::presence,
        blobs::announce,
        blobs::upload,
        blobs::download,
        http::healthz,
        http::healthz_head,
        http::readyz,
        http::readyz_head,
        http::metrics,
        openapi_json,
    ),
    components(schemas(
        RegisterRequest, RegisterResponse, SoftwareUpdate, BucketDoc, BucketList, View,
        UpdateRequest, UpdateResponse, UpdateOutcome, HeldBucket, SubscribeRequest, ErrorBody,
        PairingCodeResponse, PairRequest, PairResponse, Health, ProtobufBody, ChangeDoc,
        HistoryResponse, ChangeKind, BlobAnnounce, BlobStatus, Delivery, PresenceResponse,
    )),
    modifiers(&CommonErrors),
    tags(
        (name = "devices", description = "Registration and pairing codes (device credentials)"),
        (name = "buckets", description = "Reading, writing and subscribing to buckets (devices and users)"),
        (name = "blobs", description = "Large values out of band: content-addressed, resumable uploads, ranged downloads (devices and users)"),
        (name = "pairing", description = "Linking devices to a user's account (user credentials)"),
        (name = "operations", description = "Health, readiness, metrics and this document (no credentials)"),
    ),
)]
pub struct ApiDoc;

/// A protobuf message body (`Content-Type`/`Accept: application/x-protobuf`): the twin of
/// the JSON message, defined in `proto/tether/v1/device.proto`.
#[derive(Debug)]
pub struct ProtobufBody;

impl utoipa::PartialSchema for ProtobufBody {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        utoipa::openapi::ObjectBuilder::new()
            .schema_type(utoipa::openapi::schema::Type::String)
            .format(Some(utoipa::openapi::SchemaFormat::KnownFormat(
                utoipa::openapi::KnownFormat::Binary,
            )))
            .description(Some(
                "The protobuf twin of the JSON message (proto/tether/v1/device.proto)",
            ))
            .into()
    }
}

impl utoipa::ToSchema for ProtobufBody {}

/// `GET /healthz` and `GET /readyz` answers.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct Health {
    /// `ok`, `ready`, `joining`, `draining`, `minority`, `store_unreachable` or `saturated`.
    pub status: String,
    /// Live cluster members in this node's view (readiness only).
    pub members: Option<u64>,
    /// Cluster mode: how many of the last known members this node reaches, itself
    /// included (readiness only).
    pub reachable_members: Option<u64>,
    /// Cluster mode: the last known members — seen alive, not drained, process not gone
    /// (readiness only). Without a strict majority of them reachable: `minority`.
    pub last_known_members: Option<u64>,
}

/// `GET /v1/openapi.json`: this document.
#[utoipa::path(
    get,
    path = "/v1/openapi.json",
    tag = "operations",
    operation_id = "openapi",
    security(()),
    responses((status = 200, description = "The OpenAPI 3.1 document of this API", content_type = "application/json", body = Object)),
)]
pub async fn openapi_json() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("application/json")
        .body(spec_json())
}

/// The spec as served (computed once).
pub fn spec() -> &'static Value {
    static SPEC: OnceLock<Value> = OnceLock::new();
    SPEC.get_or_init(|| {
        let mut doc = serde_json::to_value(ApiDoc::openapi()).unwrap_or(Value::Null);
        add_common_errors(&mut doc);
        doc
    })
}

fn spec_json() -> String {
    static TEXT: OnceLock<String> = OnceLock::new();
    TEXT.get_or_init(|| serde_json::to_string_pretty(spec()).unwrap_or_default())
        .clone()
}

/// Swagger UI at `/docs/`, reading `/v1/openapi.json`.
pub fn swagger_ui() -> utoipa_swagger_ui::SwaggerUi {
    utoipa_swagger_ui::SwaggerUi::new("/docs/{_:.*}")
        .config(utoipa_swagger_ui::Config::new(["/v1/openapi.json"]).try_it_out_enabled(true))
}

/// `GET /docs` → `/docs/`.
pub async fn docs_redirect() -> HttpResponse {
    HttpResponse::PermanentRedirect()
        .insert_header(("Location", "/docs/"))
        .finish()
}

/// The Basic security scheme, required by every operation not marked `security(())`.
struct CommonErrors;

fn error_response(description: &str, code: &str, message: &str, headers: Value) -> Value {
    let mut r = json!({
        "description": description,
        "content": {
            "application/json": {
                "schema": {"$ref": "#/components/schemas/ErrorBody"},
                "example": {"error": code, "message": message},
            }
        }
    });
    if headers != Value::Null {
        r["headers"] = headers;
    }
    r
}

impl Modify for CommonErrors {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "basic",
            SecurityScheme::Http(
                Http::builder()
                    .scheme(HttpAuthScheme::Basic)
                    .description(Some(
                        "Device default credentials (registration only), device assigned \
                         credentials, or user credentials, as HTTP Basic.",
                    ))
                    .build(),
            ),
        );
        openapi.security = Some(vec![utoipa::openapi::security::SecurityRequirement::new(
            "basic",
            Vec::<String>::new(),
        )]);
    }
}

/// The error answers every operation shares, by what the operation is: authenticated
/// ones answer 401, 403, 429 and 503; with a body or parameters, 400; with a body, 413
/// and 415. (On the JSON form: utoipa's attribute macros cannot say "every operation".)
fn add_common_errors(doc: &mut Value) {
    let retry_after = json!({"Retry-After": {"description": "Seconds to wait before retrying", "schema": {"type": "integer"}}});
    let responses = json!({
        "BadRequest": error_response("Malformed request: body, query, path or ids", "bad_request", "invalid JSON body: expected value at line 1 column 1", Value::Null),
        "Unauthorized": error_response(
            "Missing or wrong credentials, or default credentials outside registration (`default_credentials_not_allowed`)",
            "unauthorized", "wrong credentials",
            json!({"WWW-Authenticate": {"description": "`Basic realm=\"tether\"`", "schema": {"type": "string"}}})),
        "Forbidden": error_response("Authenticated, but not allowed to do this", "forbidden", "bucket device.01AA02AB is outside this principal's scope", Value::Null),
        "PayloadTooLarge": error_response("Body or resulting bucket above the size limit", "too_large", "request body exceeds 69632 bytes", Value::Null),
        "UnsupportedMediaType": error_response("A body that is neither JSON nor protobuf", "unsupported_media_type", "content type \"text/plain\" not supported; use application/json or application/x-protobuf", Value::Null),
        "TooManyRequests": error_response("Rate limit exceeded", "rate_limited", "rate limit exceeded; retry in 3 s", retry_after.clone()),
        "Unavailable": error_response("The node is draining, the set is moving between nodes, or the store failed; nothing was changed: retry", "unavailable", "node is shutting down", retry_after),
    });
    doc["components"]["responses"] = responses;
    let Some(paths) = doc.get_mut("paths").and_then(Value::as_object_mut) else {
        return;
    };
    for (_, item) in paths.iter_mut() {
        let Some(item) = item.as_object_mut() else {
            continue;
        };
        for (_, op) in item.iter_mut() {
            let Some(op) = op.as_object_mut() else {
                continue;
            };
            // `security: [{}]` (utoipa's `security(())`) marks the public operations.
            let public = op
                .get("security")
                .and_then(Value::as_array)
                .is_some_and(|s| {
                    s.iter()
                        .all(|r| r.as_object().is_some_and(|o| o.is_empty()))
                });
            let has_body = op.contains_key("requestBody");
            let has_params = op
                .get("parameters")
                .and_then(Value::as_array)
                .is_some_and(|p| !p.is_empty());
            let responses = op
                .entry("responses")
                .or_insert_with(|| json!({}))
                .as_object_mut();
            let Some(responses) = responses else { continue };
            let mut add = |status: &str, name: &str| {
                responses
                    .entry(status.to_string())
                    .or_insert_with(|| json!({"$ref": format!("#/components/responses/{name}")}));
            };
            if public {
                continue;
            }
            add("401", "Unauthorized");
            add("403", "Forbidden");
            add("429", "TooManyRequests");
            add("503", "Unavailable");
            if has_body || has_params {
                add("400", "BadRequest");
            }
            if has_body {
                add("413", "PayloadTooLarge");
                add("415", "UnsupportedMediaType");
            }
        }
    }
}
