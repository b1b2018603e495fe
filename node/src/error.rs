//! The node's one error type, and the one place that maps it to HTTP.

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};
use tether_proto::api::ErrorBody;
use tether_proto::ProtoError;

use crate::store::StoreError;

/// Everything a request or the node itself can fail with.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The request is malformed (syntax, types, ids).
    #[error("{0}")]
    BadRequest(String),
    /// A protocol value failed validation.
    #[error(transparent)]
    Proto(#[from] ProtoError),
    /// No usable credentials.
    #[error("{0}")]
    Unauthorized(String),
    /// Default credentials on an endpoint other than registration.
    #[error("{0}")]
    DefaultCredentialsNotAllowed(String),
    /// Too many requests from one principal (or registrations from one device).
    #[error("rate limit exceeded; retry in {retry_after_s} s")]
    RateLimited {
        /// Seconds until a retry can succeed.
        retry_after_s: u64,
    },
    /// Authenticated but not allowed.
    #[error("{0}")]
    Forbidden(String),
    /// No such bucket (or other resource).
    #[error("{0}")]
    NotFound(String),
    /// A bucket or body above the configured size limit.
    #[error("{0}")]
    TooLarge(String),
    /// A body in a content type the API does not speak.
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// An `op_id` the set remembers for another write (another body, bucket or principal).
    #[error("{0}")]
    OpIdReused(String),
    /// A write names fields outside its bucket's template (the device type's).
    #[error("{0}")]
    UnknownField(String),
    /// An upload's bytes do not hash to the blob's address; nothing was kept.
    #[error("{0}")]
    HashMismatch(String),
    /// A bucket field references a blob that is not stored complete (or that the writer
    /// may not read).
    #[error("{0}")]
    UnknownBlob(String),
    /// Another principal's upload of the same blob is under way.
    #[error("{0}")]
    UploadInProgress(String),
    /// A download range that starts past the blob's end, or an upload range that does not
    /// continue what was received.
    #[error("{0}")]
    RangeNotSatisfiable(String),
    /// The request (headers or body) did not arrive in time.
    #[error("{0}")]
    RequestTimeout(String),
    /// The request's headers are larger than the node takes.
    #[error("{0}")]
    HeadersTooLarge(String),
    /// The store failed; nothing was acknowledged.
    #[error("store: {0}")]
    Store(#[from] StoreError),
    /// The node is shutting down or an actor went away mid-request; retry.
    #[error("{0}")]
    Unavailable(String),
    /// This node does not own the bucket set (in its current view of the ring); the
    /// caller routes the request again. Reaches a client only as a 503.
    #[error("{0}")]
    NotOwner(String),
    /// A forwarded write whose fate is unknown: sent to its owner, no answer (the owner
    /// died or the call broke). Routed again only when it carries an op id (the owner
    /// answers a retry from memory); otherwise it reaches the client as a 503.
    #[error("{0}")]
    FateUnknown(String),
    /// Configuration or start-up problem (never an HTTP answer).
    #[error("{0}")]
    Config(String),
    /// A bug: a broken internal invariant.
    #[error("internal error: {0}")]
    Internal(String),
}

impl NodeError {
    /// The API.md error code and HTTP status of each variant: the whole error surface.
    pub fn code_and_status(&self) -> (&'static str, StatusCode) {
        match self {
            NodeError::BadRequest(_) | NodeError::Proto(_) => {
                ("bad_request", StatusCode::BAD_REQUEST)
            }
            NodeError::Unauthorized(_) => ("unauthorized", StatusCode::UNAUTHORIZED),
            NodeError::DefaultCredentialsNotAllowed(_) => {
                ("default_credentials_not_allowed", StatusCode::UNAUTHORIZED)
            }
            NodeError::RateLimited { .. } => ("rate_limited", StatusCode::TOO_MANY_REQUESTS),
            NodeError::Forbidden(_) => ("forbidden", StatusCode::FORBIDDEN),
            NodeError::NotFound(_) => ("not_found", StatusCode::NOT_FOUND),
            NodeError::TooLarge(_) => ("too_large", StatusCode::PAYLOAD_TOO_LARGE),
            NodeError::UnsupportedMediaType(_) => {
                ("unsupported_media_type", StatusCode::UNSUPPORTED_MEDIA_TYPE)
            }
            NodeError::OpIdReused(_) => ("op_id_reused", StatusCode::UNPROCESSABLE_ENTITY),
            NodeError::UnknownField(_) => ("unknown_field", StatusCode::UNPROCESSABLE_ENTITY),
            NodeError::HashMismatch(_) => ("hash_mismatch", StatusCode::UNPROCESSABLE_ENTITY),
            NodeError::UnknownBlob(_) => ("unknown_blob", StatusCode::UNPROCESSABLE_ENTITY),
            NodeError::UploadInProgress(_) => ("upload_in_progress", StatusCode::CONFLICT),
            NodeError::RangeNotSatisfiable(_) => {
                ("range_not_satisfiable", StatusCode::RANGE_NOT_SATISFIABLE)
            }
            NodeError::RequestTimeout(_) => ("request_timeout", StatusCode::REQUEST_TIMEOUT),
            NodeError::HeadersTooLarge(_) => (
                "headers_too_large",
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ),
            NodeError::Store(StoreError::Overloaded(_)) => {
                ("overloaded", StatusCode::SERVICE_UNAVAILABLE)
            }
            NodeError::Store(StoreError::Fenced { .. })
            | NodeError::Unavailable(_)
            | NodeError::NotOwner(_)
            | NodeError::FateUnknown(_) => ("unavailable", StatusCode::SERVICE_UNAVAILABLE),
            NodeError::Store(_) => ("store_error", StatusCode::SERVICE_UNAVAILABLE),
            NodeError::Config(_) | NodeError::Internal(_) => {
                ("internal", StatusCode::INTERNAL_SERVER_ERROR)
            }
        }
    }

    /// The JSON error body.
    pub fn body(&self) -> ErrorBody {
        let (code, _) = self.code_and_status();
        ErrorBody {
            error: code.to_string(),
            message: self.to_string(),
        }
    }
}

impl ResponseError for NodeError {
    fn status_code(&self) -> StatusCode {
        self.code_and_status().1
    }

    fn error_response(&self) -> HttpResponse {
        let mut resp = HttpResponse::build(self.status_code());
        if matches!(
            self,
            NodeError::Unauthorized(_) | NodeError::DefaultCredentialsNotAllowed(_)
        ) {
            resp.insert_header(("WWW-Authenticate", "Basic realm=\"tether\""));
        }
        if let NodeError::RateLimited { retry_after_s } = self {
            resp.insert_header(("Retry-After", retry_after_s.to_string()));
        }
        if matches!(self, NodeError::UploadInProgress(_)) {
            resp.insert_header(("Retry-After", "5"));
        }
        if matches!(
            self,
            NodeError::Unavailable(_)
                | NodeError::Store(_)
                | NodeError::NotOwner(_)
                | NodeError::FateUnknown(_)
        ) {
            resp.insert_header(("Retry-After", "1"));
        }
        resp.json(self.body())
    }
}

/// gRPC metadata key carrying the API error code of a forwarded request's failure.
pub const GRPC_ERROR_KEY: &str = "x-tether-error";
/// gRPC metadata key carrying a forwarded rate limit's `Retry-After` seconds.
const GRPC_RETRY_AFTER_KEY: &str = "x-tether-retry-after";
/// The code a node answers a forwarded request with when it does not own the set.
const NOT_OWNER: &str = "not_owner";

impl NodeError {
    /// The gRPC status a node answers a forwarded request with: a gRPC code for peers
    /// and tooling, the API code in [`GRPC_ERROR_KEY`] so the forwarding node answers the
    /// device exactly as this node would have.
    pub fn to_status(&self) -> tonic::Status {
        use tonic::Code;
        let code = match self {
            NodeError::BadRequest(_) | NodeError::Proto(_) => Code::InvalidArgument,
            NodeError::Unauthorized(_) | NodeError::DefaultCredentialsNotAllowed(_) => {
                Code::Unauthenticated
            }
            NodeError::RateLimited { .. } | NodeError::TooLarge(_) => Code::ResourceExhausted,
            NodeError::Forbidden(_) => Code::PermissionDenied,
            NodeError::NotFound(_) => Code::NotFound,
            NodeError::UnsupportedMediaType(_)
            | NodeError::UnknownField(_)
            | NodeError::HashMismatch(_)
            | NodeError::UnknownBlob(_)
            | NodeError::HeadersTooLarge(_) => Code::InvalidArgument,
            NodeError::UploadInProgress(_) => Code::Aborted,
            NodeError::RangeNotSatisfiable(_) => Code::OutOfRange,
            NodeError::OpIdReused(_) => Code::AlreadyExists,
            NodeError::RequestTimeout(_) => Code::DeadlineExceeded,
            NodeError::NotOwner(_) => Code::FailedPrecondition,
            NodeError::Store(_) | NodeError::Unavailable(_) | NodeError::FateUnknown(_) => {
                Code::Unavailable
            }
            NodeError::Config(_) | NodeError::Internal(_) => Code::Internal,
        };
        let api_code = match self {
            NodeError::NotOwner(_) => NOT_OWNER,
            other => other.code_and_status().0,
        };
        let mut status = tonic::Status::new(code, self.to_string());
        if let Ok(v) = api_code.parse() {
            status.metadata_mut().insert(GRPC_ERROR_KEY, v);
        }
        if let NodeError::RateLimited { retry_after_s } = self {
            if let Ok(v) = retry_after_s.to_string().parse() {
                status.metadata_mut().insert(GRPC_RETRY_AFTER_KEY, v);
            }
        }
        status
    }

    /// The error a forwarded request failed with on its owner, from the owner's status.
    /// `None`: the status did not come from a node's handler (transport failure, peer
    /// authentication); the caller decides what that means.
    pub fn from_status(status: &tonic::Status) -> Option<NodeError> {
        let code = status.metadata().get(GRPC_ERROR_KEY)?.to_str().ok()?;
        let msg = status.message().to_string();
        Some(match code {
            "bad_request" => NodeError::BadRequest(msg),
            "unauthorized" => NodeError::Unauthorized(msg),
            "default_credentials_not_allowed" => NodeError::DefaultCredentialsNotAllowed(msg),
            "rate_limited" => NodeError::RateLimited {
                retry_after_s: status
                    .metadata()
                    .get(GRPC_RETRY_AFTER_KEY)
                    .and_then(|v| v.to_str().ok()?.parse().ok())
                    .unwrap_or(1),
            },
            "forbidden" => NodeError::Forbidden(msg),
            "not_found" => NodeError::NotFound(msg),
            "too_large" => NodeError::TooLarge(msg),
            "unsupported_media_type" => NodeError::UnsupportedMediaType(msg),
            "op_id_reused" => NodeError::OpIdReused(msg),
            "unknown_field" => NodeError::UnknownField(msg),
            "hash_mismatch" => NodeError::HashMismatch(msg),
            "unknown_blob" => NodeError::UnknownBlob(msg),
            "upload_in_progress" => NodeError::UploadInProgress(msg),
            "range_not_satisfiable" => NodeError::RangeNotSatisfiable(msg),
            "request_timeout" => NodeError::RequestTimeout(msg),
            "headers_too_large" => NodeError::HeadersTooLarge(msg),
            NOT_OWNER => NodeError::NotOwner(msg),
            "unavailable" => NodeError::Unavailable(msg),
            "overloaded" => NodeError::Store(StoreError::Overloaded(
                msg.strip_prefix("store: overloaded: ")
                    .unwrap_or(&msg)
                    .to_string(),
            )),
            // The owner's store failed: the same code (and 503) as a local store failure.
            "store_error" => NodeError::Store(StoreError::Backend(
                msg.strip_prefix("store: ").unwrap_or(&msg).to_string(),
            )),
            _ => NodeError::Internal(
                msg.strip_prefix("internal error: ")
                    .unwrap_or(&msg)
                    .to_string(),
            ),
        })
    }
}

/// Short alias used across the crate.
pub type Result<T, E = NodeError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    /// Invariant 9: a request forwarded to its owner fails exactly as it would have on
    /// the owner itself — same status, API code, message and headers — for every error
    /// a handler can return (`NotOwner` never reaches a client: the sender routes again).
    #[test]
    fn forwarded_errors_map_exactly_like_local_ones() {
        let every = [
            NodeError::BadRequest("bad body".into()),
            NodeError::Proto(ProtoError::InvalidBucketId("x".into())),
            NodeError::Unauthorized("who?".into()),
            NodeError::DefaultCredentialsNotAllowed("register only".into()),
            NodeError::RateLimited { retry_after_s: 7 },
            NodeError::Forbidden("not yours".into()),
            NodeError::NotFound("no bucket device.X".into()),
            NodeError::TooLarge("bucket too large".into()),
            NodeError::UnsupportedMediaType("text/plain".into()),
            NodeError::Store(StoreError::Backend("disk on fire".into())),
            NodeError::Store(StoreError::Overloaded("8192 commits queued".into())),
            NodeError::Store(StoreError::Fenced {
                set: "X".into(),
                epoch: 3,
            }),
            NodeError::Unavailable("shutting down".into()),
            NodeError::Internal("bug".into()),
        ];
        for local in every {
            let forwarded = NodeError::from_status(&local.to_status())
                .unwrap_or_else(|| panic!("{local:?} lost its API code on the way"));
            let (l, f) = (local.error_response(), forwarded.error_response());
            assert_eq!(l.status(), f.status(), "{local:?} → {forwarded:?}");
            assert_eq!(
                local.body().error,
                forwarded.body().error,
                "{local:?} → {forwarded:?}"
            );
            for h in ["retry-after", "www-authenticate"] {
                assert_eq!(
                    l.headers().get(h),
                    f.headers().get(h),
                    "{h}: {local:?} → {forwarded:?}"
                );
            }
            assert_eq!(
                local.to_string(),
                forwarded.to_string(),
                "message of {local:?}"
            );
        }
        let not_owner = NodeError::from_status(&NodeError::NotOwner("moved".into()).to_status());
        assert!(
            matches!(not_owner, Some(NodeError::NotOwner(_))),
            "{not_owner:?}"
        );
    }
}
