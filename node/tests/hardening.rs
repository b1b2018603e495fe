//! Black-box tests of issue 13 (security hardening: no amplification, no unauthenticated
//! lockout, a fair share per principal), one per finding, through the real binary. Each
//! was run against the code before the fix and failed there (the report says how).
//!
//! An attacker is given a source address of its own (127.0.0.2, 127.0.0.3: all of
//! 127.0.0.0/8 is loopback) so per-source limits can tell it from the rightful clients on
//! 127.0.0.1. Limits are set through their `TETHER_*` variables, so the same tests run
//! against a binary that predates them (`TETHER_BIN=…`), which ignores the variables and
//! shows the old behaviour.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use futures::StreamExt;
use reqwest::header::{ACCEPT, CONTENT_TYPE};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use tether_proto::api::{UpdateRequest, WireMessage};
use tether_proto::credentials::{assigned_secret, basic_header, default_secret, user_secret};
use tether_proto::Credentials;
use tether_test_support::node::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

const A: &str = "HARD00A1";
const B: &str = "HARD00B1";

const ATTACKER: [u8; 4] = [127, 0, 0, 2];
const ATTACKER_2: [u8; 4] = [127, 0, 0, 3];

/// An HTTP client whose connections come from `ip`.
fn client_from(ip: [u8; 4]) -> reqwest::Client {
    reqwest::Client::builder()
        .local_address(IpAddr::from(ip))
        .pool_max_idle_per_host(256)
        .build()
        .expect("client")
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// The node's socket address.
fn addr(node: &Node) -> SocketAddr {
    node.base
        .trim_start_matches("http://")
        .parse()
        .expect("node address")
}

/// A raw TCP connection to the node from `ip`.
async fn connect_from(node: &Node, ip: [u8; 4]) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::from((ip, 0)))?;
    socket.connect(addr(node)).await
}

/// Reads one HTTP/1.1 response (head and a `content-length` body) from `s`: status,
/// head, body. `None` if the connection closed before a status line.
async fn read_response(s: &mut TcpStream) -> Option<(u16, String, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = s.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let status: u16 = head.get(9..12)?.parse().ok()?;
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0);
    let mut body = buf[head_end..].to_vec();
    while body.len() < len {
        let n = s.read(&mut chunk).await.ok()?;
        if n == 0 {
            break;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    Some((status, head, body))
}

/// Asserts a raw response is the API's JSON error `code` with `status`.
#[track_caller]
fn assert_json_error(r: &(u16, String, Vec<u8>), status: u16, code: &str) {
    assert_eq!(r.0, status, "head: {}", r.1);
    assert!(
        r.1.to_ascii_lowercase()
            .contains("content-type: application/json"),
        "a JSON error body, head: {}",
        r.1
    );
    let v: Value = serde_json::from_slice(&r.2)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", String::from_utf8_lossy(&r.2)));
    assert_eq!(v["error"], code, "{v}");
    assert!(v["message"].is_string(), "{v}");
}

// ---------------------------------------------------------------------------------------
// Finding 1: repeated ids amplify memory and CPU

/// One device listing its bucket thousands of times in `GET /v1/buckets?ids=` (and 1,024
/// times in a subscribe) must cost the node a copy of it, not thousands: memory stays
/// bounded, the node's CPU per request stays about what the same request naming the
/// bucket once costs, and another device's reads are answered meanwhile. (CPU time, not
/// the other device's latency, is what is compared: latency on a shared machine moves
/// with whatever else runs, CPU spent by the node's process does not.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn repeated_ids_cost_one_copy_and_leave_other_devices_fast() {
    const ATTACKERS: usize = 4;
    const ROUNDS: usize = 25;
    let node = Node::builder()
        .config(&thermostat_template(&[]))
        .start()
        .await;
    let (a, b) = (node.device(A), node.device(B));
    a.register_thermostat().await;
    b.register_thermostat().await;
    let big = format!("shared.{A}");
    a.write(&big, json!({"name": "x".repeat(48 * 1024)}), 1)
        .await;
    let b_id = format!("device.{B}");

    // The node's CPU for the same requests naming the bucket once (the same-run
    // baseline), then 2,500 times per request (a 40 KB query).
    let once = format!("/v1/buckets?view=full&ids={big}");
    let repeated = format!(
        "/v1/buckets?view=full&ids={}",
        vec![big.as_str(); 2500].join(",")
    );
    attack(&a, &once, 1, 2).await; // warm: connections, the set's actor
    let rss_before = node.rss();
    let cpu_once = node_cpu_during(&node, attack(&a, &once, ATTACKERS, ROUNDS)).await;
    let cpu_repeated = node_cpu_during(&node, attack(&a, &repeated, ATTACKERS, ROUNDS)).await;
    // And B's reads while A names its bucket 2,500 times per request: each answered.
    let during = reads_under_load(&a, &b, &b_id, &repeated, ATTACKERS, 5).await;

    // Subscribe: 1,024 copies of the stale bucket are one stale bucket.
    let held: Vec<Value> = (0..1024)
        .map(|_| json!({"id": big, "version": 1}))
        .collect();
    for _ in 0..5 {
        let v = a
            .subscribe(
                &json!({"buckets": held, "timeout_ms": 1000}),
                REQUEST_DEADLINE,
            )
            .await
            .expect_json(StatusCode::OK);
        assert_eq!(buckets_of(&v).len(), 1, "one stale bucket, sent once");
    }

    // More distinct ids than a request may name: refused before any work.
    let many: Vec<String> = (0..1025).map(|i| format!("device.X{i:05}")).collect();
    a.get(&format!("/v1/buckets?ids={}", many.join(",")))
        .await
        .expect_error(StatusCode::BAD_REQUEST, "bad_request");

    let grown = node.rss().saturating_sub(rss_before);
    let ratio = cpu_repeated as f64 / cpu_once.max(1) as f64;
    eprintln!(
        "repeated ids: RSS grew {} KiB; node CPU for {} requests {} ticks naming the bucket \
         once, {} ticks naming it 2,500 times ({ratio:.1}x); B's GET median {:?} under the \
         latter ({} reads, max {:?})",
        grown / 1024,
        ATTACKERS * ROUNDS,
        cpu_once,
        cpu_repeated,
        median(during.clone()),
        during.len(),
        during.iter().max()
    );
    assert!(
        grown < 50 * 1024 * 1024,
        "RSS grew by {} MiB under repeated-id requests",
        grown / (1024 * 1024)
    );
    assert!(
        cpu_once >= 10,
        "the baseline took {cpu_once} ticks: too few to compare against"
    );
    assert!(
        ratio < 4.0,
        "the node spent {ratio:.1}x the CPU on requests naming a bucket 2,500 times as on \
         the same requests naming it once ({cpu_once} → {cpu_repeated} ticks)"
    );
}

/// The CPU time (user + system, in clock ticks, every thread's) the node's process spent
/// while `work` ran.
async fn node_cpu_during(node: &Node, work: impl std::future::Future<Output = ()>) -> u64 {
    let before = cpu_ticks(node);
    work.await;
    cpu_ticks(node) - before
}

/// The node's process's CPU time so far (`/proc/<pid>/stat` utime + stime), in ticks.
fn cpu_ticks(node: &Node) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", node.pid())).expect("stat");
    // After the command's name in parentheses: state is field 3, utime 14, stime 15.
    let (_, rest) = stat.rsplit_once(')').expect("stat format");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let tick = |i: usize| -> u64 { fields[i].parse().expect("a tick count") };
    tick(11) + tick(12)
}

/// `attackers` clients of A, each sending `rounds` GETs of `path` one after the other;
/// each is answered with exactly one bucket.
async fn attack(a: &Principal, path: &str, attackers: usize, rounds: usize) {
    finish(spawn_attackers(a, path, attackers, rounds)).await;
}

/// [`attack`] started: `attackers` tasks, each sending `rounds` GETs of `path`.
fn spawn_attackers(
    a: &Principal,
    path: &str,
    attackers: usize,
    rounds: usize,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..attackers)
        .map(|_| tokio::spawn(attacker(a, path, rounds)))
        .collect()
}

/// Waits (bounded) for every attacker task; fails if one failed.
async fn finish(tasks: Vec<tokio::task::JoinHandle<()>>) {
    for t in tasks {
        within(Duration::from_secs(120), "attacker", t)
            .await
            .expect("attacker");
    }
}

/// One client of A sending `rounds` GETs of `path`.
fn attacker(a: &Principal, path: &str, rounds: usize) -> impl std::future::Future<Output = ()> {
    let a = a.with_client(http_client());
    let path = path.to_string();
    async move {
        for _ in 0..rounds {
            let r = a
                .send_within(Duration::from_secs(60), a.req(Method::GET, &path))
                .await;
            let v = r.expect_json(StatusCode::OK);
            assert_eq!(buckets_of(&v).len(), 1, "ids are a set: one bucket");
        }
    }
}

/// The answer to one request is bounded (`--max-answer-bytes`): a listing of more than
/// fits is refused (413, asking for less), and a subscribe with more stale buckets than fit
/// answers those that fit, the rest on the next subscribe.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_are_bounded_per_request() {
    const MAX_ANSWER: usize = 80_000;
    let node = Node::builder()
        .env("TETHER_MAX_ANSWER_BYTES", &MAX_ANSWER.to_string())
        .start()
        .await;
    let a = node.device(A);
    a.register_thermostat().await;
    let (device, shared) = (format!("device.{A}"), format!("shared.{A}"));
    let old: Vec<(String, u64)> = {
        let mut v = Vec::new();
        for id in [&device, &shared] {
            v.push((id.clone(), u64_of(&a.bucket(id).await, "version")));
        }
        v
    };
    // Two buckets of 48 KB each: either fits an answer, both together do not.
    let big = "x".repeat(48 * 1024);
    a.write(&device, json!({"sw_version": big}), old[0].1).await;
    a.write(&shared, json!({"name": big}), old[1].1).await;

    a.get("/v1/buckets?view=full")
        .await
        .expect_error(StatusCode::PAYLOAD_TOO_LARGE, "too_large");
    let ids = a
        .get("/v1/buckets?view=ids")
        .await
        .expect_json(StatusCode::OK);
    assert_eq!(ids_of(&ids).len(), 2, "{ids}");
    for id in [&device, &shared] {
        a.bucket(id).await;
    }

    // Subscribe holding both at their old versions: one answer per bucket.
    let mut held = old.clone();
    let mut sent = Vec::new();
    for _ in 0..2 {
        let body: Vec<Value> = held
            .iter()
            .map(|(id, v)| json!({"id": id, "version": v}))
            .collect();
        let r = a
            .subscribe(
                &json!({"buckets": body, "timeout_ms": 1000}),
                REQUEST_DEADLINE,
            )
            .await;
        let len = r.body.len();
        let v = r.expect_json(StatusCode::OK);
        let got = buckets_of(&v);
        assert_eq!(got.len(), 1, "one of the two fits an answer");
        assert!(len <= MAX_ANSWER, "an answer of {len} bytes");
        let id = got[0]["id"].as_str().expect("id").to_string();
        let version = u64_of(&got[0], "version");
        for h in held.iter_mut().filter(|h| h.0 == id) {
            h.1 = version;
        }
        sent.push(id);
    }
    sent.sort();
    assert_eq!(sent, vec![device, shared], "each bucket sent once, in turn");
}

/// B's read latencies while `attackers` clients of A each send `rounds` GETs of `path`
/// (each answered with exactly one bucket).
async fn reads_under_load(
    a: &Principal,
    b: &Principal,
    b_id: &str,
    path: &str,
    attackers: usize,
    rounds: usize,
) -> Vec<Duration> {
    let tasks = spawn_attackers(a, path, attackers, rounds);
    let mut latencies = Vec::new();
    while latencies.len() < 10 || tasks.iter().any(|t| !t.is_finished()) {
        let t = Instant::now();
        b.bucket(b_id).await;
        latencies.push(t.elapsed());
        assert!(latencies.len() < 100_000, "bounded loop");
    }
    finish(tasks).await;
    latencies
}

// ---------------------------------------------------------------------------------------
// Finding 2: unauthenticated lockout

/// Wrong secrets sent for a device's and a user's ids, as fast as an attacker likes, never
/// keep the rightful holders out; the attacker's own source is what gets throttled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_secrets_for_their_ids_never_lock_out_the_rightful_device_and_user() {
    let node = Node::builder().user("alice").start().await;
    let d = node.device(A);
    d.register_thermostat().await;
    let alice = node.user("alice");
    let attacker = node.device(A).with_client(client_from(ATTACKER));
    let wrong = [
        Credentials {
            id: format!("a.{A}"),
            secret: assigned_secret([7; 16]),
        },
        Credentials {
            id: "u.alice".into(),
            secret: user_secret([7; 16]),
        },
    ];
    let mut last = None;
    for round in 0..6 {
        for _ in 0..20 {
            for c in &wrong {
                let r = attacker
                    .with_credentials(c.clone())
                    .get("/v1/buckets")
                    .await;
                assert!(
                    matches!(
                        r.status,
                        StatusCode::UNAUTHORIZED | StatusCode::TOO_MANY_REQUESTS
                    ),
                    "a wrong secret: {} {}",
                    r.status,
                    r.text()
                );
                last = Some(r);
            }
        }
        // 40 more failures for each id, and still: the rightful device and user get in.
        d.bucket(&format!("device.{A}")).await;
        alice.get("/v1/buckets").await.expect_json(StatusCode::OK);
        eprintln!("round {round}: the device and the user logged in");
    }
    // The guesser is stopped: its source gets 429 before anything is checked, for any id.
    let last = last.expect("attempts");
    last.expect_error(StatusCode::TOO_MANY_REQUESTS, "rate_limited");
    assert!(last.headers.contains_key("retry-after"));
    let other = attacker
        .with_credentials(Credentials {
            id: "a.SOMEONE1".into(),
            secret: assigned_secret([8; 16]),
        })
        .get("/v1/buckets")
        .await;
    other.expect_error(StatusCode::TOO_MANY_REQUESTS, "rate_limited");
}

// ---------------------------------------------------------------------------------------
// Finding 3: registration limit charged before the default secret is checked

/// Ten (and more) wrong default secrets for a device's id are not ten registrations: the
/// device itself still registers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_registers_after_ten_wrong_default_guesses() {
    let node = Node::start().await;
    let id = format!("d.{A}.{KEY_ID}");
    let guess = Credentials {
        secret: default_secret(&[7u8; 64], &id),
        id,
    };
    let attacker = node.device(A).with_client(client_from(ATTACKER));
    let mut refused = Vec::new();
    for _ in 0..15 {
        let r = attacker
            .with_credentials(guess.clone())
            .register("thermostat", "1.0.0")
            .await;
        refused.push((r.status, r.text()));
    }
    // The device itself, after the guesses: registered (the old code answered it 429).
    node.device(A).register_thermostat().await;
    // Each guess was a plain 401, none charged to the device's registration quota.
    for (status, body) in &refused {
        assert_eq!(*status, StatusCode::UNAUTHORIZED, "a wrong guess: {body}");
    }
}

// ---------------------------------------------------------------------------------------
// Finding 4: a rejected register changes state

/// Valid default credentials with a wrong `device_id`, an unknown type, bad JSON or bad
/// protobuf: each refused, and the device keeps its credentials, its pairing and its
/// structure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_register_leaves_credentials_and_pairing_untouched() {
    let node = Node::builder().user("alice").start().await;
    let d = node.device(A);
    d.register_thermostat().await;
    let assigned = d.assigned_credentials().expect("assigned");
    let alice = node.user("alice");
    let code = d.pairing_code().await;
    let paired = alice
        .pair(&code, Some("home"))
        .await
        .expect_json(StatusCode::OK);
    let home = format!(
        "structure.{}",
        paired["structure"].as_str().expect("structure")
    );

    let factory = node.with_credentials(d.default_credentials());
    let attempts = [
        factory.register_as(B, "thermostat", "1.0.0").await,
        factory.register("toaster-9000", "1.0.0").await,
        factory
            .send(
                factory
                    .req(Method::POST, "/v1/register")
                    .header(CONTENT_TYPE, "application/json")
                    .body("{oops"),
            )
            .await,
        factory
            .send(
                factory
                    .req(Method::POST, "/v1/register")
                    .header(CONTENT_TYPE, PROTOBUF)
                    .body(vec![0xff, 0xff, 0xff]),
            )
            .await,
    ];
    for r in &attempts {
        assert!(r.status.is_client_error(), "{} {}", r.status, r.text());
        assert!(
            set_credentials_of(r).is_none(),
            "a refused registration hands out nothing: {}",
            r.text()
        );
    }
    let device = node.with_credentials(assigned);
    device.bucket(&format!("device.{A}")).await;
    device.bucket(&home).await;
    alice.bucket(&format!("device.{A}")).await;
    alice.bucket(&home).await;
}

// ---------------------------------------------------------------------------------------
// Finding 5: no fair share of connections

/// One device opening twelve held subscriptions keeps at most its cap (4 here) held: each
/// beyond it answers its oldest (empty, "resubscribe"). Another device still subscribes,
/// holds and is woken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_device_cannot_hold_more_than_its_cap_and_another_still_connects() {
    const CAP: usize = 4;
    const OPENED: usize = 12;
    let node = Node::builder()
        .env("TETHER_MAX_HELD_PER_PRINCIPAL", &CAP.to_string())
        .start()
        .await;
    let (a, b) = (node.device(A), node.device(B));
    a.register_thermostat().await;
    b.register_thermostat().await;
    let hold = |p: &Principal, id: String| {
        let p = p.with_client(http_client());
        tokio::spawn(async move {
            let v = p.bucket(&id).await;
            p.subscribe(
                &json!({"buckets": [{"id": id, "version": v["version"]}], "timeout_ms": 60_000}),
                Duration::from_secs(90),
            )
            .await
        })
    };
    let mut subs = Vec::new();
    for _ in 0..OPENED {
        subs.push(hold(&a, format!("device.{A}")));
    }
    // The oldest ones are answered empty, one per subscription beyond the cap.
    let deadline = Instant::now() + Duration::from_secs(30);
    while subs.iter().filter(|s| s.is_finished()).count() < OPENED - CAP {
        assert!(
            Instant::now() < deadline,
            "device A holds {} subscriptions, its cap is {CAP}",
            subs.iter().filter(|s| !s.is_finished()).count()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    node.wait_held(CAP as u64, REQUEST_DEADLINE).await;
    let mut still = Vec::new();
    for s in subs {
        if s.is_finished() {
            let r = s.await.expect("task").expect_json(StatusCode::OK);
            assert!(buckets_of(&r).is_empty(), "evicted = 'no change': {r}");
        } else {
            still.push(s);
        }
    }
    assert_eq!(still.len(), CAP);

    // Another device holds and is answered as usual.
    let b_sub = hold(&b, format!("shared.{B}"));
    node.wait_held(CAP as u64 + 1, REQUEST_DEADLINE).await;
    let v = b.bucket(&format!("shared.{B}")).await;
    let (_, version) = other_session_write(&b, &format!("shared.{B}"), u64_of(&v, "version")).await;
    let r = within(NOTIFY_DEADLINE, "B woken", b_sub)
        .await
        .expect("task")
        .expect_json(StatusCode::OK);
    assert_eq!(u64_of(&buckets_of(&r)[0], "version"), version, "{r}");
    for s in still {
        s.abort();
    }
}

/// A write by another session of the same device (so its own held subscribe is woken).
async fn other_session_write(p: &Principal, id: &str, base: u64) -> (u64, u64) {
    let v = p
        .put(
            id,
            &json!({"value": {"mode": "heat"}, "base_version": base, "session": "other"}),
        )
        .await
        .expect_json(StatusCode::OK);
    (u64_of(&v, "timestamp"), u64_of(&v, "version"))
}

/// At most `--max-connections-per-source` connections from one address (the next one is
/// closed at once) while other addresses connect; `/readyz` turns 503 `saturated` once
/// the configured share of the connection capacity is open, before the node is full, and
/// ready again when connections close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_are_limited_per_source_and_readyz_fails_before_exhaustion() {
    let node = Node::builder()
        .env("TETHER_MAX_CONNECTIONS_PER_SOURCE", "8")
        .env("TETHER_MAX_CONNECTIONS", "24")
        .env("TETHER_READYZ_SATURATION_PERCENT", "50")
        .start()
        .await;
    let ready = http_client();
    let readyz = || async {
        let r = send(ready.get(node.url("/readyz"))).await;
        (r.status, r.json())
    };
    let mut held = Vec::new();
    // Each of the eight answers a request first, so the node has accepted and counted it
    // before the ninth arrives (a TCP connect completes in the kernel's backlog, before
    // the node accepts: without this, the ninth may be accepted ahead of one of the eight).
    for _ in 0..8 {
        let mut c = connect_from(&node, ATTACKER).await.expect("connect");
        c.write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
            .await
            .expect("write");
        let r = within(REQUEST_DEADLINE, "healthz", read_response(&mut c))
            .await
            .expect("answer");
        assert_eq!(r.0, 200, "{}", r.1);
        held.push(c);
    }
    // The ninth from the same address is closed without an answer.
    let mut ninth = connect_from(&node, ATTACKER).await.expect("TCP accept");
    let _ = ninth
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        .await;
    let answer = within(
        REQUEST_DEADLINE,
        "ninth connection",
        read_response(&mut ninth),
    )
    .await;
    assert!(
        answer.is_none(),
        "a ninth connection from one source must be refused, got {answer:?}"
    );
    // The eight are real connections, and another address is served.
    let first = held.first_mut().expect("eight");
    first
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .expect("write");
    let r = within(REQUEST_DEADLINE, "healthz", read_response(first))
        .await
        .expect("answer");
    assert_eq!(r.0, 200, "{}", r.1);
    let (status, body) = readyz().await;
    assert_eq!(status, StatusCode::OK, "{body}");

    // 4 more from another address: 13 of 24 open, at or above 50%: not ready, though the
    // node still answers (it is not full).
    for _ in 0..4 {
        held.push(connect_from(&node, ATTACKER_2).await.expect("connect"));
    }
    let deadline = Instant::now() + REQUEST_DEADLINE;
    loop {
        let (status, body) = readyz().await;
        if status == StatusCode::SERVICE_UNAVAILABLE {
            assert_eq!(body["status"], "saturated", "{body}");
            break;
        }
        assert!(Instant::now() < deadline, "/readyz stayed ready: {body}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(held);
    let deadline = Instant::now() + REQUEST_DEADLINE;
    loop {
        let (status, body) = readyz().await;
        if status == StatusCode::OK {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "/readyz stayed saturated: {body}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------------------------------
// Findings 5–7: slow and malformed requests

/// A body that does not arrive within `--body-read-timeout-ms`, headers that do not
/// arrive within `--header-read-timeout-ms`, an unparsable request and oversized headers:
/// each answered with the API's JSON error, promptly. `HEAD /healthz` answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_malformed_requests_get_json_errors_within_their_timeouts() {
    let node = Node::builder()
        .env("TETHER_BODY_READ_TIMEOUT_MS", "500")
        // Long enough that a loaded machine parses the malformed requests below before it
        // fires (at 500 ms, CI once answered the unparsable request with 408, not 400),
        // short enough that the trickling headers' 408 comes well within the deadline.
        .env("TETHER_HEADER_READ_TIMEOUT_MS", "3000")
        .start()
        .await;
    let d = node.device(A);
    d.register_thermostat().await;
    let auth = basic_header(&d.assigned_credentials().expect("assigned"));
    let local = [127, 0, 0, 1];

    // A body trickling in: 10 of 100 bytes, then nothing.
    let mut s = connect_from(&node, local).await.expect("connect");
    s.write_all(
        format!(
            "PUT /v1/buckets/device.{A} HTTP/1.1\r\nHost: t\r\nAuthorization: {auth}\r\n\
             Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"value\":"
        )
        .as_bytes(),
    )
    .await
    .expect("write");
    let t = Instant::now();
    let r = within(REQUEST_DEADLINE, "body timeout", read_response(&mut s))
        .await
        .expect("an answer");
    assert_json_error(&r, 408, "request_timeout");
    eprintln!("body read timeout answered after {:?}", t.elapsed());

    // Headers trickling in.
    let mut s = connect_from(&node, local).await.expect("connect");
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\n")
        .await
        .expect("write");
    let r = within(REQUEST_DEADLINE, "header timeout", read_response(&mut s))
        .await
        .expect("an answer");
    assert_json_error(&r, 408, "request_timeout");

    // Not HTTP.
    let mut s = connect_from(&node, local).await.expect("connect");
    s.write_all(b"GARBAGE\x01 / NOPE\r\n\r\n")
        .await
        .expect("write");
    let r = within(REQUEST_DEADLINE, "bad request", read_response(&mut s))
        .await
        .expect("an answer");
    assert_json_error(&r, 400, "bad_request");

    // 140 KiB of headers.
    let mut s = connect_from(&node, local).await.expect("connect");
    let big = format!(
        "GET /healthz HTTP/1.1\r\nHost: t\r\nX-Big: {}\r\n\r\n",
        "x".repeat(140 * 1024)
    );
    let _ = s.write_all(big.as_bytes()).await;
    let r = within(REQUEST_DEADLINE, "headers too large", read_response(&mut s))
        .await
        .expect("an answer");
    assert_json_error(&r, 431, "headers_too_large");

    // HEAD on the probes.
    for path in ["/healthz", "/readyz"] {
        let r = send(node.anon(Method::HEAD, path)).await;
        assert_eq!(r.status, StatusCode::OK, "HEAD {path}");
    }
}

// ---------------------------------------------------------------------------------------
// Finding 6: the failed-attempt table

/// Many distinct failing ids never grow the failure table past its capacity (an LRU in
/// shards: O(1) per lookup, never scanned), and the rightful user still logs in. (The
/// latency under 150,000 distinct failing ids is measured by the ignored benchmark
/// `failed_attempt_table_under_a_flood`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn distinct_failing_ids_stay_within_the_bounded_failure_table() {
    const CAPACITY: usize = 512;
    const IDS: usize = 4000;
    let node = Node::builder()
        .user("alice")
        .env("TETHER_AUTH_TABLE_CAPACITY", &CAPACITY.to_string())
        .env("TETHER_AUTH_FAILURES_PER_SOURCE", "1000000")
        .start()
        .await;
    let alice = node.user("alice");
    let client = http_client();
    let failed: Vec<StatusCode> = futures::stream::iter(0..IDS)
        .map(|i| {
            let rb = client
                .get(node.url("/v1/buckets"))
                .basic_auth(format!("u.flood{i}"), Some(user_secret([9; 16])));
            async move { send(rb).await.status }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    assert!(failed.iter().all(|s| *s == StatusCode::UNAUTHORIZED));
    let tracked = node
        .metric("tether_auth_tracked_ids")
        .await
        .expect("tether_auth_tracked_ids");
    assert!(
        tracked > 0.0 && tracked <= (CAPACITY + 32) as f64,
        "{IDS} distinct failing ids, {tracked} tracked (capacity {CAPACITY})"
    );
    alice.get("/v1/buckets").await.expect_json(StatusCode::OK);
}

/// The benchmark of finding 6: a legitimate login's latency with 150,000 distinct ids
/// failing, against its latency before, same run. Prints the ratio; not a CI test:
/// `cargo test -p tether-node --release --test hardening -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "benchmark: 150,000 requests"]
async fn failed_attempt_table_under_a_flood() {
    const IDS: usize = 150_000;
    let node = Node::builder()
        .user("alice")
        .env("TETHER_AUTH_FAILURES_PER_SOURCE", "100000000")
        .env("TETHER_LOG", "warn")
        .start()
        .await;
    let alice = node.user("alice");
    let logins = |n: usize| {
        let alice = alice.clone();
        async move {
            let mut v = Vec::new();
            for _ in 0..n {
                let t = Instant::now();
                alice.get("/v1/buckets").await.expect(StatusCode::OK);
                v.push(t.elapsed());
            }
            median(v)
        }
    };
    let before = logins(200).await;
    let client = http_client();
    let t = Instant::now();
    let flood = futures::stream::iter(0..IDS)
        .map(|i| {
            let rb = client
                .get(node.url("/v1/buckets"))
                .basic_auth(format!("u.flood{i}"), Some(user_secret([9; 16])));
            async move { send(rb).await.status }
        })
        .buffer_unordered(64)
        .count();
    let (n, during) = tokio::join!(flood, logins(200));
    let after = logins(200).await;
    eprintln!(
        "failed-attempt table: {n} distinct failing ids in {:?}; login median {before:?} before, \
         {during:?} during ({:.1}x), {after:?} after ({:.1}x)",
        t.elapsed(),
        during.as_secs_f64() / before.as_secs_f64(),
        after.as_secs_f64() / before.as_secs_f64()
    );
}

// ---------------------------------------------------------------------------------------
// Finding 7: pairing codes, structures, templates, NaN, logs

/// Only a device's newest pairing code is valid; failed redemptions are limited per
/// account; structure names are per user (no refusal, no leak).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pairing_codes_are_single_newest_and_structures_are_per_user() {
    let node = Node::builder()
        .user("alice")
        .user("bob")
        .env("TETHER_PAIR_FAILURES_PER_HOUR", "5")
        .start()
        .await;
    let (alice, bob) = (node.user("alice"), node.user("bob"));
    let (a, b) = (node.device(A), node.device(B));
    a.register_thermostat().await;
    b.register_thermostat().await;

    // A second code invalidates the first.
    let first = a.pairing_code().await;
    let second = a.pairing_code().await;
    alice
        .pair(&first, Some("home"))
        .await
        .expect_error(StatusCode::NOT_FOUND, "not_found");
    let r = alice
        .pair(&second, Some("home"))
        .await
        .expect_json(StatusCode::OK);
    let alice_home = r["structure"].as_str().expect("structure").to_string();

    // Bob's "home" is his own structure: no 403 telling him alice has one.
    let code = b.pairing_code().await;
    let r = bob
        .pair(&code, Some("home"))
        .await
        .expect_json(StatusCode::OK);
    let bob_home = r["structure"].as_str().expect("structure").to_string();
    assert_ne!(bob_home, alice_home);
    bob.get(&format!("/v1/buckets/structure.{alice_home}"))
        .await
        .expect_error(StatusCode::FORBIDDEN, "forbidden");
    assert_eq!(
        bob.bucket(&format!("structure.{bob_home}")).await["value"]["name"],
        "home"
    );

    // Failed redemptions: 5 per hour per account (configured), then 429 — even for a
    // valid code; the other account is not affected.
    for i in 0..5 {
        bob.pair(&format!("ZZZ{}-ZZZZ", i + 2), None)
            .await
            .expect_error(StatusCode::NOT_FOUND, "not_found");
    }
    let code = a.pairing_code().await;
    bob.pair(&code, None)
        .await
        .expect_error(StatusCode::TOO_MANY_REQUESTS, "rate_limited");
    alice.pair(&code, None).await.expect(StatusCode::OK);
}

/// A write naming a field outside the bucket's template is refused (422) and changes
/// nothing; template fields, and a structure's, are written. NaN and ±Infinity over
/// protobuf are refused, as JSON refuses them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_are_held_to_the_template_and_to_json_numbers() {
    let node = Node::builder().user("alice").start().await;
    let a = node.device(A);
    a.register_thermostat().await;
    let id = format!("device.{A}");
    let before = a.bucket(&id).await;
    let r = a
        .put(
            &id,
            &json!({"value": {"current_temperature": 20, "bogus": 1}, "base_version": 1}),
        )
        .await;
    let e = r.expect_error(StatusCode::UNPROCESSABLE_ENTITY, "unknown_field");
    assert!(e.message.contains("bogus"), "{}", e.message);
    assert_eq!(
        a.bucket(&id).await,
        before,
        "a refused write changes nothing"
    );
    a.write(&id, json!({"current_temperature": 20}), 1).await;
    // The shared bucket has the shared fields only.
    a.put(
        &format!("shared.{A}"),
        &json!({"value": {"current_temperature": 1}}),
    )
    .await
    .expect_error(StatusCode::UNPROCESSABLE_ENTITY, "unknown_field");
    // A structure's bucket: name and away.
    let code = a.pairing_code().await;
    let alice = node.user("alice");
    let r = alice
        .pair(&code, Some("home"))
        .await
        .expect_json(StatusCode::OK);
    let home = format!("structure.{}", r["structure"].as_str().expect("structure"));
    alice.write(&home, json!({"away": true}), 1).await;
    alice
        .put(&home, &json!({"value": {"thermostat_hack": 1}}))
        .await
        .expect_error(StatusCode::UNPROCESSABLE_ENTITY, "unknown_field");

    // NaN and infinities over protobuf.
    let before = a.bucket(&id).await;
    for f in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
        let mut body = UpdateRequest {
            value: serde_json::Map::new(),
            base_version: 2,
            occ: false,
            session: None,
            op_id: None,
        }
        .to_pb();
        body.value.push(tether_proto::pb::Field {
            name: "current_temperature".into(),
            value: Some(tether_proto::pb::Value {
                kind: Some(tether_proto::pb::value::Kind::NumberValue(f)),
            }),
        });
        let r = a
            .send(
                a.req(Method::PUT, &format!("/v1/buckets/{id}"))
                    .header(CONTENT_TYPE, PROTOBUF)
                    .header(ACCEPT, "application/json")
                    .body(prost::Message::encode_to_vec(&body)),
            )
            .await;
        r.expect_error(StatusCode::BAD_REQUEST, "bad_request");
    }
    assert_eq!(a.bucket(&id).await, before, "nothing stored");
}

/// A flood of rejected requests is logged within `--rejections-logged-per-minute` lines,
/// not one line each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejections_are_logged_within_a_budget() {
    const BUDGET: usize = 5;
    const SENT: usize = 300;
    let node = Node::builder()
        .env("TETHER_REJECTIONS_LOGGED_PER_MINUTE", &BUDGET.to_string())
        .env("TETHER_LOG_JSON", "true")
        .start()
        .await;
    let client = client_from(ATTACKER);
    for i in 0..SENT {
        let r = send(
            client
                .get(node.url("/v1/buckets"))
                .basic_auth(format!("a.GUESS{i:04}"), Some(assigned_secret([3; 16]))),
        )
        .await;
        assert!(
            matches!(
                r.status,
                StatusCode::UNAUTHORIZED | StatusCode::TOO_MANY_REQUESTS
            ),
            "{}",
            r.status
        );
    }
    // The node counted every one of them.
    let counted = node
        .metric("tether_http_requests_total")
        .await
        .unwrap_or(0.0);
    assert!(counted >= SENT as f64, "{counted}");
    let logs = node.stderr_all();
    let logged: Vec<Value> = logs
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .collect();
    assert!(
        logged
            .iter()
            .any(|l| l["fields"]["message"] == "tether serving"),
        "the node logs JSON lines: {}",
        node.stderr_tail()
    );
    let lines = logged
        .iter()
        .filter(|l| matches!(l["fields"]["status"].as_u64(), Some(401 | 429)))
        .count();
    assert!(
        lines <= BUDGET,
        "{SENT} rejections logged in {lines} lines (budget {BUDGET} per minute)"
    );
}
