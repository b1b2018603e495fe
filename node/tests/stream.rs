//! Black-box tests of the streaming subscribe (`"stream": true`, API.md "Streaming
//! subscribe"), through the real binary: one line per change by others, in order, with
//! the held versions advancing; no line for the stream's own session's writes; no change
//! lost between two holds; `{}` keep-alive lines when idle; the stream ended cleanly on
//! timeout, unpairing, revoked credentials and drain; its held subscription freed when the client hangs up; and
//! the same through a node that does not own the set (forwarded to the owner).

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use tether_cluster::{NodeId, Ring};
use tether_node::store::pg_server::PgServer;
use tether_test_support::node::*;

const A: &str = "01AA02AB";
const B: &str = "01AA02AC";

/// Long enough that a stream only ends because of the event under test.
const HOLD_MS: u64 = 60_000;

fn held(id: &str, bucket: &Value) -> Value {
    json!({"id": id, "timestamp": bucket["timestamp"], "version": bucket["version"]})
}

/// The thermostat template with the fields these tests write.
fn template() -> String {
    thermostat_template(&["round", "mine", "theirs"])
}

/// An open streaming subscribe: its body read line by line.
struct Stream {
    resp: reqwest::Response,
    buf: Vec<u8>,
}

/// What the next line of a stream was.
#[derive(Debug)]
enum Line {
    /// A JSON object (`{"buckets": …}` or the `{}` keep-alive).
    Json(Value),
    /// The body ended cleanly (its last chunk).
    End,
}

impl Stream {
    /// Opens a stream through `p` and checks its status and media type.
    async fn open(p: &Principal, mut body: Value) -> Stream {
        body["stream"] = json!(true);
        let resp = within(
            REQUEST_DEADLINE,
            "the stream's headers",
            p.req(Method::POST, "/v1/subscribe").json(&body).send(),
        )
        .await
        .expect("stream request");
        assert_eq!(resp.status(), StatusCode::OK, "stream status");
        assert_eq!(
            resp.headers()
                .get("content-type")
                .and_then(|v| v.to_str().ok()),
            Some("application/x-ndjson"),
            "stream media type"
        );
        Stream {
            resp,
            buf: Vec::new(),
        }
    }

    /// The next line, or the clean end of the body; fails on a cut body or after `limit`.
    async fn next(&mut self, limit: Duration) -> Line {
        within(limit, "the stream's next line", async {
            loop {
                if let Some(at) = self.buf.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = self.buf.drain(..=at).collect();
                    let v: Value = serde_json::from_slice(&line).unwrap_or_else(|e| {
                        panic!("line is not JSON ({e}): {}", String::from_utf8_lossy(&line))
                    });
                    return Line::Json(v);
                }
                match self.resp.chunk().await {
                    Ok(Some(chunk)) => self.buf.extend_from_slice(&chunk),
                    Ok(None) => {
                        assert!(
                            self.buf.is_empty(),
                            "the body ended inside a line: {:?}",
                            String::from_utf8_lossy(&self.buf)
                        );
                        return Line::End;
                    }
                    Err(e) => panic!("the stream was cut instead of ended: {e}"),
                }
            }
        })
        .await
    }

    /// The next line that is not a keep-alive; a clean end fails the test.
    async fn answer(&mut self) -> Value {
        loop {
            match self.next(NOTIFY_DEADLINE).await {
                Line::Json(v) if v == json!({}) => continue,
                Line::Json(v) => {
                    assert!(v["buckets"].is_array(), "a line is an answer: {v}");
                    return v;
                }
                Line::End => panic!("the stream ended while an answer was expected"),
            }
        }
    }

    /// Waits for the clean end of the body (keep-alive lines allowed before it); an
    /// answer line fails the test.
    async fn ends(&mut self, limit: Duration) {
        loop {
            match self.next(limit).await {
                Line::Json(v) if v == json!({}) => continue,
                Line::Json(v) => panic!("an answer where the end was expected: {v}"),
                Line::End => return,
            }
        }
    }
}

/// A user's app streams a paired thermostat's buckets.
async fn paired(node: &Node, serial: &str) -> (Principal, Principal) {
    let d = node.device(serial);
    d.register_thermostat().await;
    let code = d.pairing_code().await;
    let alice = node.user("alice");
    alice.pair(&code, None).await.expect(StatusCode::OK);
    (d, alice)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_carries_each_change_by_others_in_order_and_never_its_own_writes() {
    let node = Node::builder()
        .config(&template())
        .user("alice")
        .start()
        .await;
    let (d, alice) = paired(&node, A).await;
    let (dev, shared) = (format!("device.{A}"), format!("shared.{A}"));
    let (d1, s1) = (alice.bucket(&dev).await, alice.bucket(&shared).await);
    let mut stream = Stream::open(
        &alice.with_client(http_client()),
        json!({"buckets": [held(&dev, &d1), held(&shared, &s1)], "session": "app", "timeout_ms": HOLD_MS}),
    )
    .await;
    node.wait_held(1, REQUEST_DEADLINE).await;

    // Three writes by the device, each answered by one line, in order.
    let mut version = u64_of(&d1, "version");
    for round in 1..=3 {
        let (_, v) = d.write(&dev, json!({"round": round}), version).await;
        let line = stream.answer().await;
        assert_eq!(ids_of(&line), vec![dev.clone()], "round {round}: {line}");
        let b = bucket_in(&line, &dev);
        assert_eq!(u64_of(&b, "version"), v, "round {round}: {b}");
        assert!(v > version, "versions increase");
        assert_eq!(b["value"]["round"], round, "{b}");
        version = v;
    }

    // The app's own write (its session) is no line: the next line is the device's change
    // of the other bucket, and the one after it carries the device's next change of the
    // app's bucket (both writes in its value), not the echo.
    let r = alice
        .put(
            &dev,
            &json!({"value": {"mine": 1}, "base_version": version, "session": "app"}),
        )
        .await
        .expect_json(StatusCode::OK);
    let own = u64_of(&r, "version");
    node.wait_held(1, REQUEST_DEADLINE).await;
    d.write(&shared, json!({"theirs": 1}), u64_of(&s1, "version"))
        .await;
    let line = stream.answer().await;
    assert_eq!(
        ids_of(&line),
        vec![shared.clone()],
        "only the other bucket: the app's own write was echoed: {line}"
    );
    let (_, v) = d.write(&dev, json!({"theirs": 2}), own).await;
    let line = stream.answer().await;
    assert_eq!(ids_of(&line), vec![dev.clone()], "{line}");
    let b = bucket_in(&line, &dev);
    assert_eq!(
        u64_of(&b, "version"),
        v,
        "the latest version, not the echo: {b}"
    );
    assert_eq!(b["value"]["mine"], 1, "{b}");
    assert_eq!(b["value"]["theirs"], 2, "{b}");
}

/// An app streaming two paired devices: the hold is kept on both devices' sets across
/// lines (invariant 37), so while the stream pauses after a line (test seam) both are
/// still held, and each device's next change is a line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_over_two_devices_keeps_its_hold_on_both() {
    let node = Node::builder()
        .config(&template())
        .user("alice")
        .arg("--test-stream-rehold-delay-ms")
        .arg("1500")
        .start()
        .await;
    let (a, alice) = paired(&node, A).await;
    let (b, _) = paired(&node, B).await;
    let (dev_a, dev_b) = (format!("device.{A}"), format!("device.{B}"));
    let (da, db) = (alice.bucket(&dev_a).await, alice.bucket(&dev_b).await);
    let mut stream = Stream::open(
        &alice.with_client(http_client()),
        json!({"buckets": [held(&dev_a, &da), held(&dev_b, &db)], "session": "app", "timeout_ms": HOLD_MS}),
    )
    .await;
    // The first hold is the request's own; after its line the stream holds again, kept.
    node.wait_held(2, REQUEST_DEADLINE).await;
    let (_, va) = a
        .write(&dev_a, json!({"round": 1}), u64_of(&da, "version"))
        .await;
    let line = stream.answer().await;
    assert_eq!(u64_of(&bucket_in(&line, &dev_a), "version"), va, "{line}");
    node.wait_held(2, REQUEST_DEADLINE).await;
    let (_, vb) = b
        .write(&dev_b, json!({"round": 2}), u64_of(&db, "version"))
        .await;
    let line = stream.answer().await;
    assert_eq!(ids_of(&line), vec![dev_b.clone()], "{line}");
    assert_eq!(u64_of(&bucket_in(&line, &dev_b), "version"), vb, "{line}");
    assert_eq!(
        node.metric("tether_held_subscriptions").await,
        Some(2.0),
        "kept on both sets while the stream pauses after its line"
    );
    let (_, va2) = a.write(&dev_a, json!({"round": 3}), va).await;
    let line = stream.answer().await;
    assert_eq!(ids_of(&line), vec![dev_a.clone()], "{line}");
    assert_eq!(u64_of(&bucket_in(&line, &dev_a), "version"), va2, "{line}");
}

/// A write by a device that keeps to its request rate: refused with 429 while its budget
/// is spent, tried again after a fifth of the `Retry-After` the node gave, until
/// `NOTIFY_DEADLINE`.
async fn write_paced(d: &Principal, id: &str, fields: Value, base_version: u64) -> u64 {
    let deadline = tokio::time::Instant::now() + NOTIFY_DEADLINE;
    loop {
        let r = d
            .put(id, &json!({"value": fields, "base_version": base_version}))
            .await;
        if r.status == StatusCode::TOO_MANY_REQUESTS {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the writer's rate never let it write"
            );
            let wait_s = r
                .headers
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(1);
            tokio::time::sleep(Duration::from_millis(wait_s.max(1) * 200)).await;
            continue;
        }
        let v = r.expect_json(StatusCode::OK);
        return u64_of(&v, "version");
    }
}

/// Each principal may make 2 requests a second (a burst of 4). An app streams two devices
/// that each write at that rate, so its stream's lines come twice as fast as its own
/// budget refills: the lines are one request's answers, so the stream is neither ended by
/// a 429 of its own access re-checks nor leaves the app without budget for its requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_stream_is_not_charged_to_its_principals_request_rate() {
    busy_stream_within_the_rate(&[]).await;
}

/// The same with every line's access checked again (no scope cache, so no re-check is
/// spared by the last one's freshness): none of those checks is charged either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_streams_every_access_recheck_is_uncharged() {
    busy_stream_within_the_rate(&["--test-scope-ttl-ms", "0"]).await;
}

async fn busy_stream_within_the_rate(args: &[&str]) {
    let mut builder = Node::builder()
        .config(&template())
        .user("alice")
        .arg("--requests-per-second")
        .arg("2");
    for a in args {
        builder = builder.arg(*a);
    }
    let node = builder.start().await;
    let (a, alice) = paired(&node, A).await;
    let (b, _) = paired(&node, B).await;
    let (dev_a, dev_b) = (format!("device.{A}"), format!("device.{B}"));
    let (da, db) = (a.bucket(&dev_a).await, b.bucket(&dev_b).await);
    let mut stream = Stream::open(
        &alice.with_client(http_client()),
        json!({"buckets": [held(&dev_a, &da), held(&dev_b, &db)], "session": "app", "timeout_ms": HOLD_MS}),
    )
    .await;
    node.wait_held(2, REQUEST_DEADLINE).await;
    let (mut va, mut vb) = (u64_of(&da, "version"), u64_of(&db, "version"));
    for round in 1..=8 {
        let (writer, id, version) = if round % 2 == 1 {
            (&a, &dev_a, &mut va)
        } else {
            (&b, &dev_b, &mut vb)
        };
        *version = write_paced(writer, id, json!({"round": round}), *version).await;
        let line = stream.answer().await;
        assert_eq!(ids_of(&line), vec![id.clone()], "round {round}: {line}");
        assert_eq!(
            u64_of(&bucket_in(&line, id), "version"),
            *version,
            "round {round}: {line}"
        );
    }
    // Its own requests still go through: the lines took nothing from its budget.
    let r = alice.get(&format!("/v1/buckets/{dev_a}")).await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "the app's own request after its stream's lines: {}",
        r.text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_committed_between_two_holds_is_the_next_line() {
    // The stream pauses 3 s after each line before holding again (test seam); a write
    // made while nothing is held must still reach it, from the versions of the last line.
    let node = Node::builder()
        .config(&template())
        .arg("--test-stream-rehold-delay-ms")
        .arg("3000")
        .start()
        .await;
    let d = node.device(A);
    d.register_thermostat().await;
    let dev = format!("device.{A}");
    let d1 = d.bucket(&dev).await;
    let mut stream = Stream::open(
        &d.with_client(http_client()),
        json!({"buckets": [held(&dev, &d1)], "session": "app", "timeout_ms": HOLD_MS}),
    )
    .await;
    node.wait_held(1, REQUEST_DEADLINE).await;
    let (_, v2) = d.write(&dev, json!({"round": 1}), 1).await;
    let line = stream.answer().await;
    assert_eq!(u64_of(&bucket_in(&line, &dev), "version"), v2, "{line}");
    // Between the holds: nothing is held now.
    node.wait_held(0, REQUEST_DEADLINE).await;
    let (_, v3) = d.write(&dev, json!({"round": 2}), v2).await;
    let line = stream.answer().await;
    let b = bucket_in(&line, &dev);
    assert_eq!(u64_of(&b, "version"), v3, "{line}");
    assert_eq!(b["value"]["round"], 2, "{b}");

    // The next hold, on one set this node serves, is kept by the set's actor across
    // answers (invariant 37): still held while the stream pauses after the line.
    node.wait_held(1, REQUEST_DEADLINE).await;
    let (_, v4) = d.write(&dev, json!({"round": 3}), v3).await;
    let line = stream.answer().await;
    assert_eq!(u64_of(&bucket_in(&line, &dev), "version"), v4, "{line}");
    assert_eq!(
        node.metric("tether_held_subscriptions").await,
        Some(1.0),
        "the stream's hold is kept after its answer"
    );
    // Two changes during the pause: the first waits in the kept hold, the second finds it
    // untaken and ends the hold; the stream holds again from the first one's versions,
    // so the second is its next line. Nothing is missed, nothing sent twice.
    let (_, v5) = d.write(&dev, json!({"round": 4}), v4).await;
    let (_, v6) = d.write(&dev, json!({"round": 5}), v5).await;
    let line = stream.answer().await;
    assert_eq!(u64_of(&bucket_in(&line, &dev), "version"), v5, "{line}");
    let line = stream.answer().await;
    let b = bucket_in(&line, &dev);
    assert_eq!(u64_of(&b, "version"), v6, "{line}");
    assert_eq!(b["value"]["round"], 5, "{b}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_stream_sends_keepalives_and_ends_at_its_timeout() {
    let node = Node::builder()
        .config(&template())
        .arg("--stream-keepalive-ms")
        .arg("200")
        .start()
        .await;
    let d = node.device(A);
    d.register_thermostat().await;
    let dev = format!("device.{A}");
    let d1 = d.bucket(&dev).await;
    let mut stream = Stream::open(
        &d.with_client(http_client()),
        json!({"buckets": [held(&dev, &d1)], "timeout_ms": HOLD_MS}),
    )
    .await;
    for _ in 0..2 {
        match stream.next(REQUEST_DEADLINE).await {
            Line::Json(v) => assert_eq!(v, json!({}), "an idle stream's line"),
            Line::End => panic!("an idle stream ended before its timeout"),
        }
    }
    // Still a stream: a change after keep-alives is a line.
    let (_, v) = d.write(&dev, json!({"round": 1}), 1).await;
    let line = stream.answer().await;
    assert_eq!(u64_of(&bucket_in(&line, &dev), "version"), v, "{line}");

    // A stream of 1 s ends by itself, cleanly.
    let d2 = d.bucket(&dev).await;
    let mut short = Stream::open(
        &d.with_client(http_client()),
        json!({"buckets": [held(&dev, &d2)], "timeout_ms": 1000}),
    )
    .await;
    short.ends(REQUEST_DEADLINE).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_closed_by_its_client_frees_its_held_subscription() {
    let node = Node::builder().config(&template()).start().await;
    let d = node.device(A);
    d.register_thermostat().await;
    let dev = format!("device.{A}");
    let d1 = d.bucket(&dev).await;
    let client = http_client();
    let stream = Stream::open(
        &d.with_client(client.clone()),
        json!({"buckets": [held(&dev, &d1)], "timeout_ms": HOLD_MS}),
    )
    .await;
    node.wait_held(1, REQUEST_DEADLINE).await;
    drop(stream);
    drop(client);
    node.wait_held(0, REQUEST_DEADLINE).await;
    // The hold ended as cancelled (the client left), not answered.
    node.wait_metric(
        r#"tether_subscribe_hold_seconds_count{outcome="cancelled"}"#,
        REQUEST_DEADLINE,
        "the stream's hold counted as cancelled",
        |v| v >= 1.0,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_ends_when_its_device_is_unpaired() {
    let node = Node::builder()
        .config(&template())
        .user("alice")
        .start()
        .await;
    let (d, alice) = paired(&node, A).await;
    let dev = format!("device.{A}");
    let d1 = alice.bucket(&dev).await;
    let mut stream = Stream::open(
        &alice.with_client(http_client()),
        json!({"buckets": [held(&dev, &d1)], "session": "app", "timeout_ms": HOLD_MS}),
    )
    .await;
    node.wait_held(1, REQUEST_DEADLINE).await;
    alice.unpair(A).await.expect(StatusCode::OK);
    stream.ends(REQUEST_DEADLINE).await;
    node.wait_held(0, REQUEST_DEADLINE).await;
    // The device's later writes reach nobody through the ended stream (nothing held).
    d.write(&dev, json!({"round": 9}), 1).await;
    assert_eq!(node.metric("tether_held_subscriptions").await, Some(0.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_ends_when_its_credentials_are_revoked() {
    let node = Node::builder().config(&template()).start().await;
    let d = node.device(A);
    d.register_thermostat().await;
    let dev = format!("device.{A}");
    let d1 = d.bucket(&dev).await;
    // The stream presents the assigned credentials the device holds now.
    let old = node
        .with_credentials(d.credentials())
        .with_client(http_client());
    let mut stream = Stream::open(
        &old,
        json!({"buckets": [held(&dev, &d1)], "timeout_ms": HOLD_MS}),
    )
    .await;
    node.wait_held(1, REQUEST_DEADLINE).await;
    // Lost credentials: the device registers again with its factory credentials, which
    // revokes the assigned set the stream was opened with.
    node.factory(A)
        .register("thermostat", "1.0.0")
        .await
        .expect(StatusCode::OK);
    stream.ends(REQUEST_DEADLINE).await;
    node.wait_held(0, REQUEST_DEADLINE).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_ends_a_stream_cleanly() {
    let mut node = Node::builder().config(&template()).start().await;
    let d = node.device(A);
    d.register_thermostat().await;
    let dev = format!("device.{A}");
    let d1 = d.bucket(&dev).await;
    let mut stream = Stream::open(
        &d.with_client(http_client()),
        json!({"buckets": [held(&dev, &d1)], "timeout_ms": HOLD_MS}),
    )
    .await;
    node.wait_held(1, REQUEST_DEADLINE).await;
    node.sigterm().await;
    stream.ends(Duration::from_secs(15)).await;
    let status = node.wait_exit(Duration::from_secs(20)).await;
    assert_eq!(
        status.code(),
        Some(0),
        "exit status after SIGTERM: {status:?}"
    );
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_through_a_node_that_does_not_own_the_set_is_forwarded_to_its_owner() {
    let pg = PgServer::start().unwrap_or_else(|e| {
        panic!("a private PostgreSQL is needed (Debian package postgresql): {e}")
    });
    let store = pg.url("tether").expect("create database");
    let secret = tempfile::NamedTempFile::new().expect("secret file");
    std::fs::write(secret.path(), "stream-test-cluster-secret-0123\n").expect("write secret");
    let start = |id: &str, grpc: u16, join: Option<u16>, keyring: Option<&Node>| {
        let mut b = Node::builder()
            .config(&template())
            .arg("--node-id")
            .arg(id)
            .arg("--store")
            .arg(&store)
            .arg("--grpc-listen")
            .arg(format!("127.0.0.1:{grpc}"))
            .arg("--cluster-secret-file")
            .arg(secret.path().display().to_string());
        if let Some(seed) = join {
            b = b.arg("--join").arg(format!("127.0.0.1:{seed}"));
        }
        if let Some(k) = keyring {
            b = b.keyring(k.keyring());
        }
        b.start()
    };
    let (ga, gb) = (free_port(), free_port());
    let a = start("node-a", ga, None, None).await;
    let b = start("node-b", gb, Some(ga), Some(&a)).await;
    a.wait_ready(2).await;
    b.wait_ready(2).await;
    // A thermostat whose set node-b owns; the stream goes through node-a.
    let ring = Ring::new([NodeId::new("node-a"), NodeId::new("node-b")], 256);
    let serial = (0..1000)
        .map(|i| format!("FWD{i:04}"))
        .find(|s| ring.owner(s).is_some_and(|o| o.to_string() == "node-b"))
        .expect("a set owned by node-b");
    let d = b.device(&serial);
    d.register_thermostat().await;
    let (dev, shared) = (format!("device.{serial}"), format!("shared.{serial}"));
    let (d1, s1) = (d.bucket(&dev).await, d.bucket(&shared).await);
    let through_a = a
        .with_credentials(d.credentials())
        .with_client(http_client());
    let mut stream = Stream::open(
        &through_a,
        json!({"buckets": [held(&dev, &d1), held(&shared, &s1)], "session": "app", "timeout_ms": HOLD_MS}),
    )
    .await;
    b.wait_held(1, REQUEST_DEADLINE).await;
    assert_eq!(
        a.metric("tether_held_subscriptions").await,
        Some(0.0),
        "held on the owner, not on the forwarding node"
    );

    let mut version = u64_of(&d1, "version");
    for round in 1..=3 {
        let (_, v) = d.write(&dev, json!({"round": round}), version).await;
        let line = stream.answer().await;
        let b = bucket_in(&line, &dev);
        assert_eq!(u64_of(&b, "version"), v, "round {round}: {line}");
        version = v;
    }
    // The stream's own session's write is not echoed by the owner's check either.
    let r = d
        .put(
            &dev,
            &json!({"value": {"mine": 1}, "base_version": version, "session": "app"}),
        )
        .await
        .expect_json(StatusCode::OK);
    let own = u64_of(&r, "version");
    d.write(&shared, json!({"theirs": 1}), u64_of(&s1, "version"))
        .await;
    let line = stream.answer().await;
    assert_eq!(ids_of(&line), vec![shared.clone()], "echoed: {line}");
    let (_, v) = d.write(&dev, json!({"theirs": 2}), own).await;
    let line = stream.answer().await;
    assert_eq!(u64_of(&bucket_in(&line, &dev), "version"), v, "{line}");

    // The client leaves: the owner's held subscription is cancelled too.
    drop(stream);
    b.wait_held(0, REQUEST_DEADLINE).await;
}
