//! Blobs through the real binary (API.md "Blobs", seed 002): an upload in ranges that
//! resumes after a dropped connection, ranged and whole downloads with `ETag`, a hash
//! mismatch refused with nothing kept, deduplication, who may read a blob (its uploader,
//! whoever may read a bucket referencing it, whoever shows the bytes — nobody else), what
//! a bucket may reference, and collection of unreferenced blobs after their grace.

use std::time::{Duration, Instant};

use reqwest::header::{CONTENT_RANGE, ETAG, IF_NONE_MATCH, RANGE};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use tether_test_support::node::*;
use tokio::io::AsyncWriteExt;

const CHUNK: usize = 64 * 1024;

fn hex(bytes: &[u8]) -> String {
    sha256_hex(bytes)
}

/// Bytes that differ from chunk to chunk (a misplaced chunk changes the hash).
fn content(len: usize, seed: u32) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2_654_435_761).max(1);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

fn templated() -> NodeBuilder {
    Node::builder()
        .config(&thermostat_template(&["photo", "logs"]))
        .user("alice")
}

async fn announce(p: &Principal, bytes: &[u8]) -> Resp {
    p.announce_blob(bytes, "image/jpeg").await
}

async fn send_range(p: &Principal, bytes: &[u8], first: usize, last: usize) -> Resp {
    p.blob_range(bytes, first, last).await
}

async fn send_whole(p: &Principal, h: &str, bytes: &[u8]) -> Resp {
    p.send(
        p.req(Method::PUT, &format!("/v1/blobs/{h}"))
            .body(bytes.to_vec()),
    )
    .await
}

async fn download(p: &Principal, h: &str) -> Resp {
    p.blob(h).await
}

/// Uploads `bytes` whole as `p` (announce, then one PUT): 201 present.
async fn upload(p: &Principal, bytes: &[u8]) -> String {
    let h = hex(bytes);
    let began = announce(p, bytes).await.expect_json(StatusCode::CREATED);
    assert_eq!(began["received"], 0, "{began}");
    let done = send_whole(p, &h, bytes)
        .await
        .expect_json(StatusCode::CREATED);
    assert_eq!(done["present"], true, "{done}");
    h
}

fn reference(h: &str, size: usize) -> Value {
    json!({"$blob": h, "size": size})
}

async fn registered(node: &Node, serial: &str) -> Principal {
    let p = node.device(serial);
    p.register_thermostat().await;
    p
}

/// Sends a PUT of `bytes[first..]` that declares the whole rest but breaks the connection
/// after `sent` bytes of it.
async fn broken_range(node: &Node, p: &Principal, bytes: &[u8], first: usize, sent: usize) {
    let c = p.credentials();
    let auth = base64_basic(&c.id, &c.secret);
    let url = reqwest::Url::parse(&node.url("/")).expect("url");
    let addr = format!(
        "{}:{}",
        url.host_str().expect("host"),
        url.port().expect("port")
    );
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let head = format!(
        "PUT /v1/blobs/{h} HTTP/1.1\r\nHost: x\r\nAuthorization: Basic {auth}\r\n\
         Content-Range: bytes {first}-{last}/{n}\r\nContent-Length: {len}\r\n\r\n",
        h = hex(bytes),
        last = bytes.len() - 1,
        n = bytes.len(),
        len = bytes.len() - first,
    );
    s.write_all(head.as_bytes()).await.expect("head");
    s.write_all(&bytes[first..first + sent])
        .await
        .expect("body");
    s.flush().await.expect("flush");
    // Give the node a moment to take what arrived, then drop the link mid-body.
    tokio::time::sleep(Duration::from_millis(500)).await;
    drop(s);
}

fn base64_basic(id: &str, secret: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(format!("{id}:{secret}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_in_ranges_resumes_after_a_dropped_link_and_downloads_whole_and_by_range() {
    let node = templated().start().await;
    let dev = registered(&node, "BLOB01").await;
    let bytes = content(3 * CHUNK + 12_345, 1);
    let h = hex(&bytes);

    let began = announce(&dev, &bytes)
        .await
        .expect_json(StatusCode::CREATED);
    assert_eq!(began["upload_url"], format!("/v1/blobs/{h}"));
    assert_eq!(began["received"], 0);
    // Range 1: 70,000 bytes. Whole chunks are kept; the 4,464 after the first are not.
    let r1 = send_range(&dev, &bytes, 0, 69_999)
        .await
        .expect_json(StatusCode::ACCEPTED);
    assert_eq!(r1["received"], CHUNK, "{r1}");
    // A range that skips ahead of what was received is refused.
    send_range(&dev, &bytes, 2 * CHUNK, 2 * CHUNK + 9)
        .await
        .expect_error(StatusCode::RANGE_NOT_SATISFIABLE, "range_not_satisfiable");
    // Range 2, from what was received, broken off after 1.5 chunks: resumable from the
    // chunks it completed.
    broken_range(&node, &dev, &bytes, CHUNK, CHUNK + CHUNK / 2).await;
    let resumed = announce(&dev, &bytes)
        .await
        .expect_json(StatusCode::CREATED);
    let received = resumed["received"].as_u64().expect("received") as usize;
    assert_eq!(
        received,
        2 * CHUNK,
        "the whole chunk that arrived before the break is kept, the half one is not: {resumed}"
    );
    // Not readable before it is complete.
    download(&dev, &h)
        .await
        .expect_error(StatusCode::NOT_FOUND, "not_found");
    // Range 3: the rest (overlapping what was stored: the overlap is skipped).
    let from = received - 100;
    let done = send_range(&dev, &bytes, from, bytes.len() - 1)
        .await
        .expect_json(StatusCode::CREATED);
    assert_eq!(done["sha256"], h);
    assert_eq!(done["present"], true);
    assert_eq!(done["size"], bytes.len());

    let whole = download(&dev, &h).await.expect(StatusCode::OK);
    assert_eq!(whole.body, bytes, "the bytes uploaded");
    let etag = whole.headers[ETAG].to_str().expect("etag").to_string();
    assert_eq!(etag, format!("\"{h}\""));
    assert_eq!(whole.headers["accept-ranges"], "bytes");
    assert_eq!(whole.content_type.as_deref(), Some("image/jpeg"));
    // A range across a chunk boundary, an open range, a suffix.
    for (header, first, last) in [
        ("bytes=1000-70000".to_string(), 1000, 70_000),
        (
            format!("bytes={}-", bytes.len() - 10),
            bytes.len() - 10,
            bytes.len() - 1,
        ),
        ("bytes=-5".to_string(), bytes.len() - 5, bytes.len() - 1),
    ] {
        let r = dev
            .send(
                dev.req(Method::GET, &format!("/v1/blobs/{h}"))
                    .header(RANGE, &header),
            )
            .await
            .expect(StatusCode::PARTIAL_CONTENT);
        assert_eq!(r.body, bytes[first..=last], "{header}");
        assert_eq!(
            r.headers[CONTENT_RANGE],
            format!("bytes {first}-{last}/{}", bytes.len()).as_str()
        );
    }
    dev.send(
        dev.req(Method::GET, &format!("/v1/blobs/{h}"))
            .header(RANGE, format!("bytes={}-", bytes.len())),
    )
    .await
    .expect_error(StatusCode::RANGE_NOT_SATISFIABLE, "range_not_satisfiable");
    let cached = dev
        .send(
            dev.req(Method::GET, &format!("/v1/blobs/{h}"))
                .header(IF_NONE_MATCH, &etag),
        )
        .await;
    assert_eq!(cached.status, StatusCode::NOT_MODIFIED);
    assert!(cached.body.is_empty());
    // Announced again: present, nothing to send.
    let again = announce(&dev, &bytes).await.expect_json(StatusCode::OK);
    assert_eq!(
        (again["present"].as_bool(), again["size"].as_u64()),
        (Some(true), Some(bytes.len() as u64))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hash_mismatch_keeps_nothing_and_bad_announcements_are_refused() {
    let node = templated()
        .arg("--max-blob-bytes")
        .arg("1000000")
        .start()
        .await;
    let dev = registered(&node, "BLOB02").await;
    let bytes = content(CHUNK + 10, 2);
    let h = hex(&bytes);
    announce(&dev, &bytes).await.expect(StatusCode::CREATED);
    let mut wrong = bytes.clone();
    wrong[CHUNK + 3] ^= 0xff;
    send_whole(&dev, &h, &wrong)
        .await
        .expect_error(StatusCode::UNPROCESSABLE_ENTITY, "hash_mismatch");
    let fresh = announce(&dev, &bytes)
        .await
        .expect_json(StatusCode::CREATED);
    assert_eq!(
        fresh["received"], 0,
        "the mismatched upload was discarded whole: {fresh}"
    );
    download(&dev, &h)
        .await
        .expect_error(StatusCode::NOT_FOUND, "not_found");
    // And the right bytes afterwards are taken.
    send_whole(&dev, &h, &bytes)
        .await
        .expect(StatusCode::CREATED);

    let post = |body: Value| dev.send(dev.req(Method::POST, "/v1/blobs").json(&body));
    post(json!({"sha256": "abc", "size": 1}))
        .await
        .expect_error(StatusCode::BAD_REQUEST, "bad_request");
    post(json!({"sha256": h, "size": 0}))
        .await
        .expect_error(StatusCode::BAD_REQUEST, "bad_request");
    post(json!({"sha256": hex(b"big"), "size": 1_000_001}))
        .await
        .expect_error(StatusCode::PAYLOAD_TOO_LARGE, "too_large");
    post(json!({"sha256": h, "size": 7}))
        .await
        .expect_error(StatusCode::BAD_REQUEST, "bad_request");
    send_whole(&dev, &hex(b"never announced"), b"never announced")
        .await
        .expect_error(StatusCode::NOT_FOUND, "not_found");
    // Another principal's upload under way is not theirs to add to.
    let other = registered(&node, "BLOB03").await;
    let pending = content(10, 3);
    announce(&dev, &pending).await.expect(StatusCode::CREATED);
    announce(&other, &pending)
        .await
        .expect_error(StatusCode::CONFLICT, "upload_in_progress");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_is_readable_by_its_uploader_and_through_referencing_buckets_only() {
    let node = templated().start().await;
    let dev = registered(&node, "BLOB11").await;
    let stranger = registered(&node, "BLOB12").await;
    let alice = node.user("alice");
    let code = dev.pairing_code().await;
    alice.pair(&code, None).await.expect(StatusCode::OK);

    let photo = content(5000, 11);
    let h = upload(&dev, &photo).await;
    download(&alice, &h)
        .await
        .expect_error(StatusCode::NOT_FOUND, "not_found");
    download(&stranger, &h)
        .await
        .expect_error(StatusCode::NOT_FOUND, "not_found");

    // A bucket may reference only complete blobs of the stated size the writer may read.
    let put = |p: &Principal, id: &str, v: Value| {
        let body = json!({"value": {"photo": v}, "base_version": 0});
        let (p, id) = (p.clone(), id.to_string());
        async move { p.put(&id, &body).await }
    };
    put(&dev, "shared.BLOB11", reference(&hex(b"nothing"), 7))
        .await
        .expect_error(StatusCode::UNPROCESSABLE_ENTITY, "unknown_blob");
    put(&dev, "shared.BLOB11", reference(&h, photo.len() + 1))
        .await
        .expect_error(StatusCode::UNPROCESSABLE_ENTITY, "unknown_blob");
    put(&dev, "shared.BLOB11", json!({"$blob": h}))
        .await
        .expect_error(StatusCode::BAD_REQUEST, "bad_request");
    put(&stranger, "shared.BLOB12", reference(&h, photo.len()))
        .await
        .expect_error(StatusCode::UNPROCESSABLE_ENTITY, "unknown_blob");
    put(&dev, "shared.BLOB11", reference(&h, photo.len()))
        .await
        .expect(StatusCode::OK);

    // The paired user reads it through the bucket; the stranger still cannot.
    let got = download(&alice, &h).await.expect(StatusCode::OK);
    assert_eq!(got.body, photo);
    download(&stranger, &h)
        .await
        .expect_error(StatusCode::NOT_FOUND, "not_found");
    // Knowing the hash is not enough: announcing it asks the stranger for the bytes.
    let asked = announce(&stranger, &photo)
        .await
        .expect_json(StatusCode::CREATED);
    assert_eq!(asked["received"], 0, "{asked}");
    let mut wrong = photo.clone();
    wrong[0] ^= 1;
    send_whole(&stranger, &h, &wrong)
        .await
        .expect_error(StatusCode::UNPROCESSABLE_ENTITY, "hash_mismatch");
    download(&stranger, &h)
        .await
        .expect_error(StatusCode::NOT_FOUND, "not_found");
    download(&alice, &h).await.expect(StatusCode::OK);
    // Showing the bytes makes it the stranger's to read (and reference).
    send_whole(&stranger, &h, &photo)
        .await
        .expect(StatusCode::CREATED);
    assert_eq!(
        download(&stranger, &h).await.expect(StatusCode::OK).body,
        photo
    );
    announce(&stranger, &photo).await.expect(StatusCode::OK);

    // The reference gone, the user's way to it is gone too.
    put(&dev, "shared.BLOB11", Value::Null)
        .await
        .expect(StatusCode::OK);
    download(&alice, &h)
        .await
        .expect_error(StatusCode::NOT_FOUND, "not_found");
    download(&dev, &h).await.expect(StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreferenced_blobs_and_abandoned_uploads_are_deleted_after_their_grace() {
    let node = templated().arg("--blob-grace-secs").arg("2").start().await;
    let dev = registered(&node, "BLOB21").await;
    let kept = upload(&dev, &content(300, 21)).await;
    let dropped = upload(&dev, &content(300, 22)).await;
    let unused = upload(&dev, &content(300, 23)).await;
    let abandoned = content(CHUNK + 1, 24);
    announce(&dev, &abandoned).await.expect(StatusCode::CREATED);
    send_range(&dev, &abandoned, 0, CHUNK - 1)
        .await
        .expect(StatusCode::ACCEPTED);
    let put = |v: Value| {
        let body = json!({"value": v, "base_version": 0});
        let dev = dev.clone();
        async move { dev.put("shared.BLOB21", &body).await.expect(StatusCode::OK) }
    };
    put(json!({"photo": reference(&kept, 300), "logs": [reference(&dropped, 300)]})).await;
    put(json!({"logs": []})).await;

    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let dropped_gone = download(&dev, &dropped).await.status == StatusCode::NOT_FOUND;
        let unused_gone = download(&dev, &unused).await.status == StatusCode::NOT_FOUND;
        let abandoned_gone = announce(&dev, &abandoned).await.json()["received"] == 0;
        if dropped_gone && unused_gone && abandoned_gone {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not collected within 30 s: dropped {dropped_gone}, unused {unused_gone}, abandoned {abandoned_gone}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Still referenced: kept, past the same grace.
    let still = download(&dev, &kept).await.expect(StatusCode::OK);
    assert_eq!(still.body, content(300, 21));
    let metrics = node.metrics().await;
    let deleted: f64 = metrics
        .lines()
        .find(|l| l.starts_with("tether_blob_events_total{event=\"deleted\"}"))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .expect("tether_blob_events_total{event=\"deleted\"}");
    assert!(deleted >= 3.0, "two blobs and an upload: {deleted}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operators_blob_is_offered_as_a_software_update_to_its_device_type_only() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let image = content(2 * CHUNK + 77, 31);
    let file = dir.path().join("fw-1.3.0.bin");
    std::fs::write(&file, &image).expect("write image");
    let put = |args: Vec<String>| admin(args);
    let args = |f: &std::path::Path| {
        vec![
            "blob".to_string(),
            "put".into(),
            f.display().to_string(),
            "--data-dir".into(),
            data.display().to_string(),
        ]
    };
    let out = put(args(&file)).await.ok();
    let h = hex(&image);
    assert_eq!(out.trim(), format!("{h} {}", image.len()));
    // Again: already there, pinned once more, same answer.
    assert_eq!(put(args(&file)).await.ok().trim(), out.trim());
    // Signed with the vendor's firmware key, whose public half the firmware is built with.
    let key = dir.path().join("firmware.key");
    let public = admin(["firmware-key", "generate", &key.display().to_string()])
        .await
        .ok();
    let public = public.trim().to_string();
    let signature = admin([
        "sign-firmware".to_string(),
        file.display().to_string(),
        "--key-file".into(),
        key.display().to_string(),
    ])
    .await
    .ok();
    let signature = signature.trim().to_string();
    let config = format!(
        "{}\n[[software_updates]]\ndevice_type = \"thermostat\"\nversion = \"1.3.0\"\nsha256 = \"{h}\"\nsize = {}\nsignature = \"{signature}\"\n",
        thermostat_template(&["photo", "logs"]),
        image.len()
    );
    let node = Node::builder()
        .config(&config)
        .user("alice")
        .data_dir(&data)
        .arg("--blob-grace-secs")
        .arg("1")
        .start()
        .await;
    let dev = node.device("BLOB31");
    let offered = dev
        .register("thermostat", "1.2.0")
        .await
        .expect_json(StatusCode::OK);
    let update = &offered["software_update"];
    assert_eq!(update["version"], "1.3.0");
    assert_eq!(update["url"], format!("/v1/blobs/{h}"));
    assert_eq!(update["sha256"], h);
    assert_eq!(update["size"], image.len());
    assert_eq!(update["signature"], signature.as_str());
    // The device downloads it by ranges with the firmware's own `Download`, as it would
    // into its second bank, and checks it as the firmware does.
    let offer: tether_proto::api::SoftwareUpdate =
        serde_json::from_value(update.clone()).expect("an offer");
    let img = tether_proto::dfu::Image::from_offer(&offer).expect("a signed blob offer");
    let mut dfu = tether_proto::dfu::Download::new(img, 1 << 20, 50_000).expect("fits");
    let mut got = Vec::new();
    while let Some(range) = dfu.range_header(0) {
        let r = dev
            .send(dev.req(Method::GET, &offer.url).header(RANGE, range))
            .await
            .expect(StatusCode::PARTIAL_CONTENT);
        let content_range = r.headers.get(CONTENT_RANGE).and_then(|v| v.to_str().ok());
        let chunk = dfu
            .check(206, content_range, &r.body)
            .expect("the range asked for");
        assert_eq!(chunk.offset as usize, got.len());
        got.extend_from_slice(chunk.bytes);
        dfu.stored(&chunk);
    }
    assert_eq!(got, image);
    assert_eq!(tether_proto::blob::BlobHash::of(&got), dfu.image().sha256);
    let public: [u8; 32] = (0..32)
        .map(|i| u8::from_str_radix(&public[2 * i..2 * i + 2], 16).expect("hex"))
        .collect::<Vec<u8>>()
        .try_into()
        .expect("32 bytes");
    let digest = <sha2::Sha512 as sha2::Digest>::digest(&got);
    salty::PublicKey::try_from(&public)
        .expect("a public key")
        .verify(&digest, &salty::Signature::from(&dfu.image().signature))
        .expect("the firmware key's signature verifies");
    // Not offered to users; and pinned, it outlives any grace.
    download(&node.user("alice"), &h)
        .await
        .expect_error(StatusCode::NOT_FOUND, "not_found");
    tokio::time::sleep(Duration::from_secs(3)).await;
    download(&dev, &h).await.expect(StatusCode::OK);
}
