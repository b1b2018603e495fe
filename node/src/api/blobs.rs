//! Blobs (API.md "Blobs", seed 002): large values out of band. An upload is announced
//! (`POST /v1/blobs`), sent in ranges that may resume after a dropped connection
//! (`PUT /v1/blobs/{sha256}` with `Content-Range`), checked against its SHA-256 before it
//! becomes readable, and read in ranges (`GET`, `Range`, `ETag`). Bucket fields reference
//! complete blobs as `{"$blob": "<sha256>", "size": n}` ([`check_references`], called by
//! the bucket PUT before it writes).
//!
//! Who may read a blob: a principal that uploaded its bytes, one that may read a
//! bucket referencing it, or a device whose type a software update offers it to
//! (`[[software_updates]] sha256`, uploaded with `tether admin blob put`). Announcing a blob someone else uploaded answers `present` only
//! to such a principal; anyone else is asked for the bytes (an upload that proves it has
//! them, hashed as it streams, nothing stored twice). So knowing a hash gives nothing.
//!
//! Bytes are stored in whole chunks of [`CHUNK`] bytes as they arrive, up to
//! [`CHUNKS_PER_COMMIT`] in one store transaction: a range broken off keeps its whole
//! chunks, and `received` says where to resume. At most that many chunks of an upload
//! (512 KiB) are in memory.

use actix_web::http::header::{self, HeaderValue};
use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use futures::StreamExt;
use sha2::Digest;
use tether_proto::blob::{byte_range, references, refs_in, BlobHash, BlobRef, ContentRange};
use tether_proto::{BucketId, Fields};

use tether_proto::api::{BlobAnnounce, BlobStatus};

use super::http::{
    decode, now_ms, read_body, request_format, respond, within_store_deadline, AppState,
};
use crate::api::openapi::ProtobufBody;
use crate::error::{NodeError, Result};
use crate::routing::router::Get;
use crate::security::auth::{Endpoint, Principal};
use crate::store::blobs::{Appended, Begun, Blobs, Holder, Manifest, CHUNK, CHUNKS_PER_COMMIT};

/// Bucket holders looked at when deciding whether a principal may read a blob.
const MAX_HOLDERS_CHECKED: usize = 4096;
/// Longest media type accepted.
const MAX_CONTENT_TYPE: usize = 127;

fn service(state: &AppState) -> Result<&Blobs> {
    state
        .blobs
        .as_ref()
        .ok_or_else(|| NodeError::NotFound("this node's store keeps no blobs".into()))
}

fn parse_hash(raw: &str) -> Result<BlobHash> {
    BlobHash::parse(raw).map_err(|e| NodeError::BadRequest(format!("{raw:?}: {e}")))
}

fn present(req: &HttpRequest, status: StatusCode, h: &BlobHash, size: u64) -> HttpResponse {
    respond(req, status, &BlobStatus::present(h.to_string(), size))
}

/// Whether `principal` may read blob `h`: it uploaded the bytes, or it may read a bucket
/// that references the blob now (read through the bucket's owner).
pub(crate) async fn may_read(
    state: &AppState,
    principal: &mut Principal,
    h: &BlobHash,
) -> Result<bool> {
    let blobs = service(state)?;
    let me = Holder::Principal(principal.author());
    if blobs.held_by(h, &me).await?.is_some() {
        return Ok(true);
    }
    if offered_to(state, principal, h).await? {
        return Ok(true);
    }
    let mut rescoped = false;
    let mut after: Option<BucketId> = None;
    let mut checked = 0;
    while checked < MAX_HOLDERS_CHECKED {
        let page = blobs.bucket_holders(h, after.as_ref(), 256).await?;
        let Some((last, _)) = page.last() else { break };
        after = Some(last.clone());
        checked += page.len();
        for (id, _) in page {
            if !principal.may_access(&id) && !rescoped {
                // Its scope may be a second old (security::scope): read it again, once.
                *principal = state.auth.rescoped(principal).await?;
                rescoped = true;
            }
            if !principal.may_access(&id) {
                continue;
            }
            let read = Get {
                ids: Some(vec![id.clone()]),
                values: true,
                max_bytes: state.config.limits.max_answer_bytes,
            };
            let found = within_store_deadline(state, state.router.get(&id.set_key(), read)).await?;
            if found.iter().any(|b| references(&b.value, h)) {
                return Ok(true);
            }
        }
    }
    Ok(false)
}

/// Whether `h` is a software update image offered to the device type of `principal` (a
/// device): the devices an offer names may download it.
async fn offered_to(state: &AppState, principal: &Principal, h: &BlobHash) -> Result<bool> {
    let offers = &state.config.registration.software_updates;
    let Some(serial) = principal.device() else {
        return Ok(false);
    };
    if !offers.iter().any(|o| o.blob().as_ref() == Some(h)) {
        return Ok(false);
    }
    let Some(device) = state.shared.store.get_device(serial.as_str()).await? else {
        return Ok(false);
    };
    Ok(offers
        .iter()
        .any(|o| o.blob().as_ref() == Some(h) && o.device_type == device.device_type))
}

/// Before a bucket PUT writes `value` to `id`: every blob it references must be complete,
/// of the stated size and readable by the writer (else 422 `unknown_blob`, nothing
/// written); the bucket is then recorded as a holder of each, so the blob outlives it.
pub(crate) async fn check_references(
    state: &AppState,
    principal: &mut Principal,
    id: &BucketId,
    value: &Fields,
) -> Result<()> {
    let refs = refs_in(value).map_err(|e| NodeError::BadRequest(e.to_string()))?;
    if refs.is_empty() {
        return Ok(());
    }
    // Boxed: most writes reference no blob, and their futures need not be sized (≈ 3 KB)
    // by the checks.
    Box::pin(hold_references(state, principal, id, refs)).await
}

/// [`check_references`] of a value that references `refs`.
async fn hold_references(
    state: &AppState,
    principal: &mut Principal,
    id: &BucketId,
    refs: Vec<BlobRef>,
) -> Result<()> {
    let blobs = service(state)
        .map_err(|_| NodeError::UnknownBlob("this node's store keeps no blobs".into()))?;
    for r in &refs {
        let unknown =
            || NodeError::UnknownBlob(format!("no complete blob {} to reference", r.hash));
        let m = blobs
            .manifest(&r.hash)
            .await?
            .filter(|m| m.complete)
            .ok_or_else(unknown)?;
        if m.size != r.size {
            return Err(NodeError::UnknownBlob(format!(
                "blob {} is {} bytes, not {}",
                r.hash, m.size, r.size
            )));
        }
        if !may_read(state, principal, &r.hash).await? {
            return Err(unknown());
        }
        if !blobs
            .hold(&r.hash, Holder::Bucket(id.clone()), now_ms())
            .await?
        {
            return Err(unknown());
        }
    }
    Ok(())
}

#[utoipa::path(
    post,
    path = "/v1/blobs",
    tag = "blobs",
    operation_id = "announceBlob",
    description = "Announces a blob by its SHA-256. 200 `present` when the store holds it and the \
        principal may read it; else 201 with where to send the bytes and how many were received.",
    request_body(content(
        (BlobAnnounce = "application/json", example = json!({"sha256": "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08", "size": 4, "content_type": "text/plain"})),
        (ProtobufBody = "application/x-protobuf"),
    )),
    responses(
        (status = 200, description = "Stored and readable: nothing to send", content(
            (BlobStatus = "application/json", example = json!({"sha256": "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08", "size": 4, "present": true})),
            (ProtobufBody = "application/x-protobuf"),
        )),
        (status = 201, description = "Send the bytes from `received` on", content(
            (BlobStatus = "application/json", example = json!({"upload_url": "/v1/blobs/9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08", "received": 0})),
            (ProtobufBody = "application/x-protobuf"),
        )),
        (status = 409, description = "`upload_in_progress`: another principal is uploading it", body = tether_proto::api::ErrorBody),
        (status = 413, description = "`too_large`: above `--max-blob-bytes`", body = tether_proto::api::ErrorBody),
    ),
)]
/// `POST /v1/blobs`.
pub async fn announce(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse> {
    let mut principal = state.principal(&req, Endpoint::Buckets).await?;
    let blobs = service(&state)?;
    let body = read_body(&req, payload, 1024, &state).await?;
    let msg: BlobAnnounce = decode(request_format(&req)?, &body)?;
    let h = parse_hash(&msg.sha256)?;
    if msg.size == 0 {
        return Err(NodeError::BadRequest("a blob has at least one byte".into()));
    }
    let max = state.config.max_blob_bytes;
    if msg.size > max {
        return Err(NodeError::TooLarge(format!(
            "blob of {} bytes is above the limit of {max} bytes",
            msg.size
        )));
    }
    let content_type = msg
        .content_type
        .unwrap_or_else(|| "application/octet-stream".into());
    if content_type.is_empty()
        || content_type.len() > MAX_CONTENT_TYPE
        || !content_type
            .bytes()
            .all(|b| b.is_ascii_graphic() || b == b' ')
    {
        return Err(NodeError::BadRequest(format!(
            "content_type: up to {MAX_CONTENT_TYPE} printable ASCII characters"
        )));
    }
    let upload_url = format!("/v1/blobs/{h}");
    let same_size = |m: &Manifest| {
        if m.size == msg.size {
            Ok(())
        } else {
            Err(NodeError::BadRequest(format!(
                "blob {h} is {} bytes, not {}",
                m.size, msg.size
            )))
        }
    };
    let begun = blobs
        .begin(&h, msg.size, &content_type, &principal.author(), now_ms())
        .await?;
    match begun {
        Begun::Present(m) => {
            same_size(&m)?;
            if may_read(&state, &mut principal, &h).await? {
                return Ok(present(&req, StatusCode::OK, &h, m.size));
            }
            // Stored, but this principal has not shown it has the bytes: ask for them.
            let ask = BlobStatus::upload(upload_url, 0);
            Ok(respond(&req, StatusCode::CREATED, &ask))
        }
        Begun::Upload(m) => {
            same_size(&m)?;
            let ask = BlobStatus::upload(upload_url, m.received);
            Ok(respond(&req, StatusCode::CREATED, &ask))
        }
        Begun::Busy(_) => Err(NodeError::UploadInProgress(format!(
            "blob {h} is being uploaded by another principal; retry later"
        ))),
    }
}

/// The next piece of an upload's body, within the body read timeout (a stalled sender
/// holds the connection no longer than a slow request).
async fn next_piece(state: &AppState, payload: &mut web::Payload) -> Result<Option<web::Bytes>> {
    let within = state.config.limits.body_read_timeout;
    match tokio::time::timeout(within, payload.next()).await {
        Ok(Some(Ok(b))) => Ok(Some(b)),
        Ok(Some(Err(e))) => Err(NodeError::BadRequest(format!("reading body: {e}"))),
        Ok(None) => Ok(None),
        Err(_) => Err(NodeError::RequestTimeout(format!(
            "no byte of the upload arrived within {} ms",
            within.as_millis()
        ))),
    }
}

/// The hash of blob `h`'s stored chunks.
async fn stored_hash(blobs: &Blobs, h: &BlobHash, size: u64) -> Result<BlobHash> {
    let mut hasher = sha2::Sha256::new();
    for index in 0..size.div_ceil(CHUNK as u64) {
        let chunk = blobs
            .chunk(h, index)
            .await?
            .ok_or_else(|| NodeError::Internal(format!("blob {h}: chunk {index} is missing")))?;
        hasher.update(&chunk);
    }
    Ok(BlobHash(hasher.finalize().into()))
}

#[utoipa::path(
    put,
    path = "/v1/blobs/{sha256}",
    tag = "blobs",
    operation_id = "uploadBlob",
    description = "Sends bytes of an announced blob: the whole body, or `Content-Range: bytes a-b/n` \
        continuing from what was received. Bytes are kept in whole 64 KiB chunks as they arrive; \
        once all are stored their SHA-256 is checked.",
    params(("sha256" = String, Path, description = "The blob's SHA-256")),
    request_body(content((Vec<u8> = "application/octet-stream"))),
    responses(
        (status = 201, description = "Complete and verified", content(
            (BlobStatus = "application/json", example = json!({"sha256": "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08", "size": 4, "present": true})),
            (ProtobufBody = "application/x-protobuf"),
        )),
        (status = 202, description = "Stored so far; send the rest from `received`", content(
            (BlobStatus = "application/json", example = json!({"received": 65536})),
            (ProtobufBody = "application/x-protobuf"),
        )),
        (status = 404, description = "No upload of this blob was announced", body = tether_proto::api::ErrorBody),
        (status = 409, description = "`upload_in_progress`: another principal's upload of this blob", body = tether_proto::api::ErrorBody),
        (status = 416, description = "`range_not_satisfiable`: the range does not continue what was received", body = tether_proto::api::ErrorBody),
        (status = 422, description = "`hash_mismatch`: the bytes do not hash to the address; the upload is discarded", body = tether_proto::api::ErrorBody),
    ),
)]
/// `PUT /v1/blobs/{sha256}`.
pub async fn upload(
    req: HttpRequest,
    path: web::Path<String>,
    mut payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse> {
    let principal = state.principal(&req, Endpoint::Buckets).await?;
    let blobs = service(&state)?;
    let h = parse_hash(&path)?;
    let me = principal.author();
    let m = blobs.manifest(&h).await?.ok_or_else(|| {
        NodeError::NotFound(format!(
            "no upload of blob {h}; announce it with POST /v1/blobs"
        ))
    })?;
    let range = match req.headers().get(header::CONTENT_RANGE) {
        Some(v) => {
            let text = v
                .to_str()
                .map_err(|_| NodeError::BadRequest("Content-Range is not ASCII".into()))?;
            ContentRange::parse(text).map_err(|e| NodeError::BadRequest(e.to_string()))?
        }
        None => ContentRange {
            first: 0,
            last: m.size - 1,
            total: m.size,
        },
    };
    if range.total != m.size {
        return Err(NodeError::BadRequest(format!(
            "blob {h} is {} bytes, the range says {}",
            m.size, range.total
        )));
    }
    if m.complete {
        return prove_possession(&req, &state, blobs, &h, &me, &m, range, payload).await;
    }
    if m.uploader != me {
        return Err(NodeError::UploadInProgress(format!(
            "blob {h} is being uploaded by another principal; retry later"
        )));
    }
    if range.first > m.received {
        return Err(NodeError::RangeNotSatisfiable(format!(
            "{} bytes of blob {h} received; send from byte {}",
            m.received, m.received
        )));
    }
    let mut received = m.received;
    let mut pos = range.first;
    // Whole chunks are stored CHUNKS_PER_COMMIT at a time (one transaction each), and
    // whatever whole chunks arrived before the body broke off are stored too: the upload
    // resumes from them.
    let batch = CHUNK * CHUNKS_PER_COMMIT;
    let mut buf: Vec<u8> = Vec::with_capacity(batch.min(m.size as usize));
    let mut seen = 0u64;
    loop {
        let piece = match next_piece(&state, &mut payload).await {
            Ok(Some(piece)) => piece,
            Ok(None) => break,
            Err(e) => {
                let whole = buf.len() - buf.len() % CHUNK;
                if whole > 0 {
                    buf.truncate(whole);
                    append(blobs, &h, &me, received, buf).await?;
                }
                return Err(e);
            }
        };
        seen += piece.len() as u64;
        if seen > range.len() {
            return Err(NodeError::BadRequest(format!(
                "the body is longer than its range ({} bytes)",
                range.len()
            )));
        }
        // Bytes below `received` are stored already (a resent range): skip them.
        let skip = received.saturating_sub(pos).min(piece.len() as u64) as usize;
        pos += piece.len() as u64;
        buf.extend_from_slice(&piece[skip..]);
        while buf.len() >= batch {
            let rest = buf.split_off(batch);
            let chunks = std::mem::replace(&mut buf, rest);
            received = append(blobs, &h, &me, received, chunks).await?;
        }
    }
    if seen != range.len() {
        return Err(NodeError::BadRequest(format!(
            "the body has {seen} bytes, its range {}",
            range.len()
        )));
    }
    // The end of the body: its whole chunks, and the blob's last one if this completes it.
    let keep = if received + buf.len() as u64 == m.size {
        buf.len()
    } else {
        buf.len() - buf.len() % CHUNK
    };
    if keep > 0 {
        buf.truncate(keep);
        received = append(blobs, &h, &me, received, buf).await?;
    }
    if received < m.size {
        return Ok(respond(
            &req,
            StatusCode::ACCEPTED,
            &BlobStatus::received(received),
        ));
    }
    if stored_hash(blobs, &h, m.size).await? != h {
        blobs.discard(&h).await?;
        state.shared.metrics.blob("hash_mismatch");
        return Err(NodeError::HashMismatch(format!(
            "the {} bytes received do not hash to {h}; the upload was discarded",
            m.size
        )));
    }
    blobs.complete(&h, &me, now_ms()).await?;
    state.shared.metrics.blob("completed");
    Ok(present(&req, StatusCode::CREATED, &h, m.size))
}

/// Stores the next chunks of an upload at `received` (whole chunks, or the blob's end);
/// anything else moving the upload meanwhile (it was collected, or completed) ends this
/// request.
async fn append(
    blobs: &Blobs,
    h: &BlobHash,
    me: &str,
    received: u64,
    chunk: Vec<u8>,
) -> Result<u64> {
    let index = received / CHUNK as u64;
    let len = chunk.len() as u64;
    match blobs.append(h, me, index, chunk).await? {
        Appended::Received(n) if n == received + len => Ok(n),
        Appended::Received(n) => Err(NodeError::RangeNotSatisfiable(format!(
            "{n} bytes of blob {h} received; send from byte {n}"
        ))),
        Appended::NoUpload => Err(NodeError::NotFound(format!(
            "the upload of blob {h} is gone; announce it again"
        ))),
        Appended::Complete => Err(NodeError::UploadInProgress(format!(
            "blob {h} was completed meanwhile; announce it again"
        ))),
    }
}

/// An upload of a blob already stored: the principal shows it has the bytes by sending
/// all of them; they are hashed as they stream and not stored again.
#[allow(clippy::too_many_arguments)]
async fn prove_possession(
    req: &HttpRequest,
    state: &AppState,
    blobs: &Blobs,
    h: &BlobHash,
    me: &str,
    m: &Manifest,
    range: ContentRange,
    mut payload: web::Payload,
) -> Result<HttpResponse> {
    let me_holder = Holder::Principal(me.to_string());
    if blobs.held_by(h, &me_holder).await?.is_some() {
        return Ok(present(req, StatusCode::CREATED, h, m.size));
    }
    if range.first != 0 || range.last + 1 != m.size {
        return Err(NodeError::RangeNotSatisfiable(format!(
            "blob {h} is stored: send all of its {} bytes in one request to show you have them",
            m.size
        )));
    }
    let mut hasher = sha2::Sha256::new();
    let mut seen = 0u64;
    while let Some(piece) = next_piece(state, &mut payload).await? {
        seen += piece.len() as u64;
        if seen > m.size {
            return Err(NodeError::BadRequest(
                "the body is longer than the blob".into(),
            ));
        }
        hasher.update(&piece);
    }
    if seen != m.size || BlobHash(hasher.finalize().into()) != *h {
        return Err(NodeError::HashMismatch(format!(
            "the bytes sent do not hash to {h}"
        )));
    }
    blobs.hold(h, me_holder, now_ms()).await?;
    Ok(present(req, StatusCode::CREATED, h, m.size))
}

#[utoipa::path(
    get,
    path = "/v1/blobs/{sha256}",
    tag = "blobs",
    operation_id = "downloadBlob",
    description = "A complete blob, for its uploader and for principals that may read a bucket \
        referencing it (404 for anyone else). `Range: bytes=a-b` gives 206; `ETag` is the hash.",
    params(("sha256" = String, Path, description = "The blob's SHA-256")),
    responses(
        (status = 200, description = "The whole blob", content((Vec<u8> = "application/octet-stream"))),
        (status = 206, description = "The range asked for", content((Vec<u8> = "application/octet-stream"))),
        (status = 304, description = "`If-None-Match` names its ETag"),
        (status = 404, description = "No such blob this principal may read", body = tether_proto::api::ErrorBody),
        (status = 416, description = "`range_not_satisfiable`", body = tether_proto::api::ErrorBody),
    ),
)]
/// `GET /v1/blobs/{sha256}`.
pub async fn download(
    req: HttpRequest,
    path: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse> {
    let mut principal = state.principal(&req, Endpoint::Buckets).await?;
    let blobs = service(&state)?.clone();
    let h = parse_hash(&path)?;
    let not_found = || NodeError::NotFound(format!("no blob {h}"));
    let m = blobs
        .manifest(&h)
        .await?
        .filter(|m| m.complete)
        .ok_or_else(not_found)?;
    if !may_read(&state, &mut principal, &h).await? {
        return Err(not_found());
    }
    let etag = format!("\"{h}\"");
    let matches_etag = req
        .headers()
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag || t.trim() == "*"));
    if matches_etag {
        return Ok(HttpResponse::NotModified()
            .insert_header((header::ETAG, etag))
            .finish());
    }
    let asked = req
        .headers()
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .map(|r| byte_range(r, m.size))
        .transpose()
        .map_err(|e| NodeError::RangeNotSatisfiable(format!("{e} ({} bytes)", m.size)))?
        .flatten();
    let (first, last) = asked.unwrap_or((0, m.size - 1));
    let mut resp = if asked.is_some() {
        let mut r = HttpResponse::PartialContent();
        r.insert_header((
            header::CONTENT_RANGE,
            format!("bytes {first}-{last}/{}", m.size),
        ));
        r
    } else {
        HttpResponse::Ok()
    };
    resp.insert_header((header::ETAG, etag))
        .insert_header((header::ACCEPT_RANGES, "bytes"))
        .insert_header((
            header::CONTENT_TYPE,
            HeaderValue::from_str(&m.content_type)
                .unwrap_or(HeaderValue::from_static("application/octet-stream")),
        ));
    state.shared.metrics.blob("downloaded");
    // One chunk in memory at a time, read as the client takes the body.
    let chunk = CHUNK as u64;
    let body = futures::stream::unfold(first, move |pos| {
        let blobs = blobs.clone();
        async move {
            if pos > last {
                return None;
            }
            let index = pos / chunk;
            let bytes = match blobs.chunk(&h, index).await {
                Ok(Some(b)) => b,
                Ok(None) => {
                    return Some((
                        Err(NodeError::Internal(format!(
                            "blob {h}: chunk {index} is missing"
                        ))),
                        last + 1,
                    ))
                }
                Err(e) => return Some((Err(NodeError::from(e)), last + 1)),
            };
            let start = (pos - index * chunk) as usize;
            let end = ((last + 1).min((index + 1) * chunk) - index * chunk) as usize;
            let piece = bytes.get(start..end).map(web::Bytes::copy_from_slice);
            match piece {
                Some(p) => Some((Ok(p), (index + 1) * chunk)),
                None => Some((
                    Err(NodeError::Internal(format!(
                        "blob {h}: chunk {index} is short"
                    ))),
                    last + 1,
                )),
            }
        }
    });
    Ok(resp.no_chunking(last - first + 1).streaming(body))
}
