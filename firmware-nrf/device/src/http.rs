//! How `DeviceClient` requests travel over HTTP (API.md) with protobuf bodies.
//!
//! [`HttpCall::new`] turns a polled [`Outgoing`] into method, URL and body;
//! [`decode_response`] turns the status, `Content-Type` and body of the answer into the
//! [`Response`] the client expects. Both are pure, so the QEMU test checks them byte for
//! byte; the embassy driver only moves the bytes (reqwless over embassy-net).

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

use tether_proto::api::{
    BucketList, ErrorBody, PairingCodeResponse, RegisterResponse, UpdateResponse, WireMessage,
};
use tether_proto::client::{Outgoing, Request, Response};
use tether_proto::Credentials;

/// The media type of every request body and of the answers the device asks for.
pub const PROTOBUF: &str = "application/x-protobuf";

/// Which exchange a call is, which decides how its answer decodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `POST /v1/register`.
    Register,
    /// `GET /v1/buckets?view=full&ids=…`.
    Fetch,
    /// `POST /v1/subscribe`, held by the server until something changes.
    Subscribe,
    /// `PUT /v1/buckets/{id}`.
    Put,
    /// `POST /v1/pairing-code`.
    PairingCode,
    /// `GET /v1/blobs/{sha256}` with a `Range`: part of a firmware image (not the
    /// client's: [`App`](crate::app::App) answers it through its download).
    Firmware,
}

impl Kind {
    /// Short name for logs.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Register => "register",
            Kind::Fetch => "fetch",
            Kind::Subscribe => "subscribe",
            Kind::Put => "put",
            Kind::PairingCode => "pairing-code",
            Kind::Firmware => "firmware",
        }
    }
}

/// The HTTP methods the device API uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// Fetch.
    Get,
    /// Register and subscribe.
    Post,
    /// Update.
    Put,
}

impl Method {
    /// As it appears on the request line.
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Post => "POST",
            Method::Put => "PUT",
        }
    }
}

/// One HTTP exchange to perform for the client, answer to be fed back with `token`.
#[derive(Debug, Clone, PartialEq)]
pub struct HttpCall {
    /// The client's token for this request.
    pub token: u64,
    /// What the exchange is.
    pub kind: Kind,
    /// The request method.
    pub method: Method,
    /// Absolute URL: the client's base URL at poll time plus the request's path.
    pub url: String,
    /// The protobuf body (`Content-Type: application/x-protobuf`); `None` when the
    /// request has none (fetch, pairing code).
    pub body: Option<Vec<u8>>,
    /// The credentials the client chose for it, sent as HTTP Basic auth.
    pub auth: Credentials,
    /// The `Range` header (a firmware download's part), if any.
    pub range: Option<String>,
}

impl HttpCall {
    /// Maps a request just polled from the client; `base_url` must be
    /// `client.base_url()` read right after that poll (it changes on registration).
    pub fn new(out: Outgoing, base_url: &str) -> Self {
        let Outgoing {
            token,
            request,
            auth,
        } = out;
        let mut url = String::from(base_url.trim_end_matches('/'));
        url.push_str(&request.path());
        let (kind, method, body) = match &request {
            Request::Register(r) => (Kind::Register, Method::Post, Some(r.encode_pb())),
            Request::Fetch { .. } => (Kind::Fetch, Method::Get, None),
            Request::Subscribe(s) => (Kind::Subscribe, Method::Post, Some(s.encode_pb())),
            Request::Put { body, .. } => (Kind::Put, Method::Put, Some(body.encode_pb())),
            Request::PairingCode => (Kind::PairingCode, Method::Post, None),
        };
        debug_assert_eq!(method.as_str(), request.method());
        HttpCall {
            token,
            kind,
            method,
            url,
            body,
            auth,
            range: None,
        }
    }
}

/// An answer whose body did not decode as what its status promised. The driver reports
/// it to the client as [`Response::Transport`]: the exchange failed, retry after a back-off.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadBody {
    /// The exchange.
    pub kind: Kind,
    /// The HTTP status it came with.
    pub status: u16,
    /// Why it was not accepted.
    pub reason: &'static str,
}

impl fmt::Display for BadBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} answer {} not accepted: {}",
            self.kind.name(),
            self.status,
            self.reason
        )
    }
}

/// Whether a `Content-Type` value names protobuf (parameters and case ignored).
pub fn is_protobuf(content_type: Option<&str>) -> bool {
    content_type
        .and_then(|ct| ct.split(';').next())
        .is_some_and(|m| m.trim().eq_ignore_ascii_case(PROTOBUF))
}

/// A `Retry-After` value in milliseconds; only the delay-seconds form (what the server
/// sends) is understood.
pub fn retry_after_ms(value: Option<&str>) -> Option<u64> {
    value?
        .trim()
        .parse::<u64>()
        .ok()
        .map(|s| s.saturating_mul(1000))
}

/// Decodes the answer to a `kind` exchange as the client expects it.
///
/// Success bodies must be protobuf (the device asked for it with `Accept`); error bodies
/// are JSON as API.md specifies (protobuf is accepted too), and an error body that does
/// not decode is simply absent. `retry_after` is the `Retry-After` header.
pub fn decode_response(
    kind: Kind,
    status: u16,
    content_type: Option<&str>,
    retry_after: Option<&str>,
    body: &[u8],
) -> Result<Response, BadBody> {
    let pb = is_protobuf(content_type);
    let bad = |reason| BadBody {
        kind,
        status,
        reason,
    };
    match (kind, status) {
        (Kind::Register | Kind::Fetch | Kind::Subscribe | Kind::PairingCode, 200)
        | (Kind::Put, 200 | 409) => {
            if !pb {
                return Err(bad("success body is not application/x-protobuf"));
            }
            match kind {
                Kind::Register => RegisterResponse::decode_pb(body)
                    .map(Response::Registered)
                    .map_err(|_| bad("RegisterResponse does not decode")),
                Kind::Fetch | Kind::Subscribe => BucketList::decode_pb(body)
                    .map(Response::Buckets)
                    .map_err(|_| bad("BucketList does not decode")),
                Kind::Put => UpdateResponse::decode_pb(body)
                    .map(|body| Response::Updated { status, body })
                    .map_err(|_| bad("UpdateResponse does not decode")),
                Kind::PairingCode => PairingCodeResponse::decode_pb(body)
                    .map(|p| Response::PairingCode {
                        code: p.code,
                        expires_in_s: p.expires_in_s,
                    })
                    .map_err(|_| bad("PairingCodeResponse does not decode")),
                Kind::Firmware => Err(bad("a firmware range is not the client's to decode")),
            }
        }
        (Kind::Firmware, _) => Err(bad("a firmware range is not the client's to decode")),
        _ => {
            let error = if pb {
                ErrorBody::decode_pb(body).ok()
            } else {
                serde_json::from_slice::<ErrorBody>(body).ok()
            };
            Ok(Response::Error {
                status,
                body: error,
                retry_after_ms: retry_after_ms(retry_after),
            })
        }
    }
}

/// The parts of an absolute `http://` or `https://` URL the driver connects with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Target<'a> {
    /// `https://`: the connection is TLS.
    pub tls: bool,
    /// Host name or IP literal (no port), for DNS, SNI and certificate checks.
    pub host: &'a str,
    /// `host[:port]` as the `Host` header carries it.
    pub authority: &'a str,
    /// The port, defaulted by scheme.
    pub port: u16,
    /// Path and query, at least `/`.
    pub path: &'a str,
}

/// Splits a URL from the configuration or a registration answer (`sync_url`, a redirect);
/// `None` for anything but `http`/`https` with a host (IPv6 literals are not supported).
pub fn split_url(url: &str) -> Option<Target<'_>> {
    let (tls, rest) = if let Some(r) = url.strip_prefix("https://") {
        (true, r)
    } else if let Some(r) = url.strip_prefix("http://") {
        (false, r)
    } else {
        return None;
    };
    let (authority, path) = match rest.find(['/', '?']) {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) => (h, p.parse::<u16>().ok()?),
        None => (authority, if tls { 443 } else { 80 }),
    };
    if host.is_empty() || host.contains(['@', '[', ']']) || !path.starts_with(['/', '?']) {
        return None;
    }
    Some(Target {
        tls,
        host,
        authority,
        port,
        path,
    })
}
