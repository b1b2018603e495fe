//! One [`Outgoing`] request of a [`tether_proto::client::DeviceClient`] over real HTTP
//! (reqwest), JSON or protobuf, and its answer decoded into a [`Response`].
//!
//! `X-Tether-Set-Credentials` is handed to the caller the moment the headers arrive
//! (before a held subscribe's body), as the client's contract asks.

use std::time::Duration;

use reqwest::header::{HeaderMap, ACCEPT, AUTHORIZATION, CONTENT_TYPE, RETRY_AFTER};
use reqwest::{Client, Method};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tether_proto::api::{
    BucketList, ErrorBody, PairingCodeResponse, RegisterResponse, UpdateResponse, WireMessage,
};
use tether_proto::client::{Outgoing, Request, Response};
use tether_proto::credentials::{
    basic_header, parse_set_credentials, Credentials, SET_CREDENTIALS_HEADER,
};

/// The protobuf media type.
pub const PROTOBUF: &str = "application/x-protobuf";

/// How requests are encoded and timed out.
#[derive(Debug, Clone, Copy)]
pub struct WireOpts {
    /// Send and ask for protobuf instead of JSON.
    pub protobuf: bool,
    /// Bound for every request but a held subscribe.
    pub request_timeout: Duration,
    /// Added to a subscribe's `timeout_ms` (or to the request timeout when it names none).
    pub subscribe_margin: Duration,
}

/// What became of one request, beyond the decoded [`Response`]: for error accounting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// The request could not be sent or its answer not read.
    Transport,
    /// The driver's own time limit passed.
    Timeout,
    /// A success status with a body that did not decode.
    Decode,
    /// An HTTP error status.
    Status(u16),
}

/// A short name of the request kind, for error accounting (`register`, `fetch`, …).
pub fn request_kind(r: &Request) -> &'static str {
    match r {
        Request::Register(_) => "register",
        Request::Fetch { .. } => "fetch",
        Request::Subscribe(_) => "subscribe",
        Request::Put { .. } => "put",
        Request::PairingCode => "pairing-code",
    }
}

fn encode<T: Serialize + WireMessage>(protobuf: bool, msg: &T) -> (Vec<u8>, &'static str) {
    if protobuf {
        (msg.encode_pb(), PROTOBUF)
    } else {
        // Serializing these plain structs cannot fail; an empty body would be refused.
        (
            serde_json::to_vec(msg).unwrap_or_default(),
            "application/json",
        )
    }
}

fn decode<T: DeserializeOwned + WireMessage>(headers: &HeaderMap, body: &[u8]) -> Option<T> {
    let pb = headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with(PROTOBUF));
    if pb {
        T::decode_pb(body).ok()
    } else {
        serde_json::from_slice(body).ok()
    }
}

/// The `Retry-After` header (seconds) in milliseconds.
fn retry_after_ms(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse::<u64>()
        .ok()
        .map(|s| s.saturating_mul(1000))
}

/// The credentials in `X-Tether-Set-Credentials`, if present and well-formed.
pub fn set_credentials(headers: &HeaderMap) -> Option<Credentials> {
    let v = headers.get(SET_CREDENTIALS_HEADER)?.to_str().ok()?;
    parse_set_credentials(v).ok()
}

/// Sends `out` to `base_url` and decodes the answer. `on_credentials` is called as soon
/// as the headers carry `X-Tether-Set-Credentials` (before the body is read).
pub async fn send(
    http: &Client,
    base_url: &str,
    out: &Outgoing,
    opts: WireOpts,
    on_credentials: impl FnOnce(Credentials),
) -> (Response, Option<Failure>) {
    let limit = match &out.request {
        Request::Subscribe(s) => s
            .timeout_ms
            .map_or(opts.request_timeout, Duration::from_millis)
            .saturating_add(opts.subscribe_margin),
        _ => opts.request_timeout,
    };
    match tokio::time::timeout(limit, exchange(http, base_url, out, opts, on_credentials)).await {
        Ok(r) => r,
        Err(_) => (Response::Transport, Some(Failure::Timeout)),
    }
}

async fn exchange(
    http: &Client,
    base_url: &str,
    out: &Outgoing,
    opts: WireOpts,
    on_credentials: impl FnOnce(Credentials),
) -> (Response, Option<Failure>) {
    let url = format!("{}{}", base_url.trim_end_matches('/'), out.request.path());
    let method = Method::from_bytes(out.request.method().as_bytes()).unwrap_or(Method::GET);
    let mut rb = http
        .request(method, url)
        .header(AUTHORIZATION, basic_header(&out.auth));
    if opts.protobuf {
        rb = rb.header(ACCEPT, PROTOBUF);
    }
    let body = match &out.request {
        Request::Register(r) => Some(encode(opts.protobuf, r)),
        Request::Subscribe(s) => Some(encode(opts.protobuf, s)),
        Request::Put { body, .. } => Some(encode(opts.protobuf, body)),
        Request::Fetch { .. } | Request::PairingCode => None,
    };
    if let Some((bytes, ct)) = body {
        rb = rb.header(CONTENT_TYPE, ct).body(bytes);
    }
    let resp = match rb.send().await {
        Ok(r) => r,
        Err(_) => return (Response::Transport, Some(Failure::Transport)),
    };
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    if let Some(c) = set_credentials(&headers) {
        on_credentials(c);
    }
    let Ok(body) = resp.bytes().await else {
        return (Response::Transport, Some(Failure::Transport));
    };
    decode_response(&out.request, status, &headers, &body)
}

/// Decodes an HTTP answer to `request` the way every driver must.
pub fn decode_response(
    request: &Request,
    status: u16,
    headers: &HeaderMap,
    body: &[u8],
) -> (Response, Option<Failure>) {
    let ok = match (request, status) {
        (Request::Register(_), 200) => {
            decode::<RegisterResponse>(headers, body).map(Response::Registered)
        }
        (Request::Fetch { .. } | Request::Subscribe(_), 200) => {
            decode::<BucketList>(headers, body).map(Response::Buckets)
        }
        (Request::Put { .. }, 200 | 409) => {
            decode::<UpdateResponse>(headers, body).map(|body| Response::Updated { status, body })
        }
        (Request::PairingCode, 200) => {
            decode::<PairingCodeResponse>(headers, body).map(|p| Response::PairingCode {
                code: p.code,
                expires_in_s: p.expires_in_s,
            })
        }
        (_, 200..=299) => None,
        _ => {
            let err = Response::Error {
                status,
                body: decode::<ErrorBody>(headers, body),
                retry_after_ms: retry_after_ms(headers),
            };
            return (err, Some(Failure::Status(status)));
        }
    };
    match ok {
        Some(r) => (r, None),
        None if (200..300).contains(&status) => (Response::Transport, Some(Failure::Decode)),
        // A 409 to a PUT whose body did not decode.
        None => (
            Response::Error {
                status,
                body: None,
                retry_after_ms: retry_after_ms(headers),
            },
            Some(Failure::Status(status)),
        ),
    }
}
