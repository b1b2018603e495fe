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
    /// The store failed; nothing was acknowledged.
    #[error("store: {0}")]
    Store(#[from] StoreError),
    /// The node is shutting down or an actor went away mid-request; retry.
    #[error("{0}")]
    Unavailable(String),
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
            NodeError::Store(StoreError::Fenced { .. }) | NodeError::Unavailable(_) => {
                ("unavailable", StatusCode::SERVICE_UNAVAILABLE)
            }
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
        if matches!(self, NodeError::Unavailable(_) | NodeError::Store(_)) {
            resp.insert_header(("Retry-After", "1"));
        }
        resp.json(self.body())
    }
}

/// Short alias used across the crate.
pub type Result<T, E = NodeError> = std::result::Result<T, E>;
