//! Black-box tests of issue 4 (API.md "Authentication", "Credentials and pairing",
//! "Credentials"; seed 000 FIG 28C–28F): the authorization matrix, registration rules,
//! rotation with a grace period (and that it never loses a device), pairing, the
//! per-principal rate limit, the admin CLI, and that logs never carry secrets.

use std::fmt::Write as _;
use std::time::Duration;

use base64::Engine as _;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use tether_proto::credentials::{basic_header, default_secret, Credentials};
use tether_test_support::node::*;
use tokio::time::{sleep_until, Instant};

/// Lifetime and grace of assigned credentials in the rotation tests. The rotation tests
/// run several requests inside these windows on two shared, loaded cores: the lifetime
/// leaves room for the checks before it, the grace for the half-dozen requests in it.
const LIFETIME_S: u64 = 4;
const GRACE_S: u64 = 10;
/// Grace in the test that restarts the node inside it.
const RESTART_GRACE_S: u64 = 30;
/// Margin past a server-side expiry before relying on it.
const EXPIRY_MARGIN: Duration = Duration::from_millis(200);

fn held(id: &str, bucket: &Value) -> Value {
    json!({"id": id, "timestamp": bucket["timestamp"], "version": bucket["version"]})
}

/// The API error code of a response, if it has one.
fn error_code(r: &Resp) -> Option<String> {
    serde_json::from_slice::<Value>(&r.body)
        .ok()?
        .get("error")?
        .as_str()
        .map(str::to_string)
}

/// Asserts a 401 with the Basic challenge and the given code, and no new credentials.
#[track_caller]
fn assert_401(r: &Resp, code: &str) {
    r.expect_error(StatusCode::UNAUTHORIZED, code);
    assert_eq!(
        r.headers
            .get("www-authenticate")
            .and_then(|v| v.to_str().ok()),
        Some("Basic realm=\"tether\""),
        "a 401 carries the Basic challenge (API.md)"
    );
    assert!(
        set_credentials_of(r).is_none(),
        "a rejected request must not hand out credentials"
    );
}

/// The `Retry-After` seconds of a 429 `rate_limited`.
#[track_caller]
fn assert_429(r: &Resp) -> u64 {
    r.expect_error(StatusCode::TOO_MANY_REQUESTS, "rate_limited");
    let retry = r
        .headers
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_else(|| panic!("a 429 must carry Retry-After; headers {:?}", r.headers));
    let s: u64 = retry
        .parse()
        .unwrap_or_else(|_| panic!("Retry-After must be delay-seconds, got {retry:?}"));
    assert!(s >= 1, "Retry-After {s}");
    s
}

/// Asserts an assigned set for `serial` of the API.md shape: `a.<serial>`, `a.` + 22 URL64.
#[track_caller]
fn assert_assigned_shape(c: &Credentials, serial: &str) {
    assert_eq!(c.id, format!("a.{serial}"));
    assert_eq!(c.secret.len(), 24, "assigned secret length");
    assert!(c.secret.starts_with("a."), "assigned secret prefix");
    let body = &c.secret[2..];
    assert!(
        body.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'),
        "assigned secret alphabet is URL64"
    );
}

/// The bucket of `user`'s structure `name` (structure names are per user: issue 13).
fn structure_bucket(user: &str, name: &str) -> String {
    let key = tether_proto::requests::structure_key(user, name).expect("valid structure name");
    format!("structure.{key}")
}

// ---------------------------------------------------------------------------------------
// the authorization matrix

const SUBJECT: &str = "MATRIX0A";
const OTHER: &str = "MATRIX0B";
const HOME: &str = "homeA";
const NOSUCH: &str = "NOSUCH99";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Who {
    None,
    Default,
    Assigned,
    PairedUser,
    OtherDevice,
    OtherUser,
}

const WHO: [Who; 6] = [
    Who::None,
    Who::Default,
    Who::Assigned,
    Who::PairedUser,
    Who::OtherDevice,
    Who::OtherUser,
];

const WHO_NAMES: [&str; 6] = [
    "none",
    "default(A)",
    "assigned(A)",
    "paired user",
    "other device",
    "other user",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Register,
    List,
    GetOwn,
    PutOwn,
    SubscribeOwn,
    GetOtherDevice,
    PutStructure,
    PairingCode,
    Pair,
    Unpair,
    GetMissingOwn,
    GetUnknownDevice,
    UnpairUnknown,
}

/// Expected (status, error code) per column.
type Exp = (u16, Option<&'static str>);
const OK: Exp = (200, None);
const E401: Exp = (401, Some("unauthorized"));
const DCNA: Exp = (401, Some("default_credentials_not_allowed"));
const E403: Exp = (403, Some("forbidden"));
const E404: Exp = (404, Some("not_found"));

/// Subject device A is registered and paired by the paired user into structure `homeA`;
/// the other device B is registered and unpaired; the other user owns nothing.
/// Columns: none, default(A), assigned(A), paired user, other device (B), other user.
const MATRIX: &[(Op, &str, [Exp; 6])] = &[
    (
        Op::Register,
        "POST /v1/register {device_id: A}",
        [E401, OK, OK, E403, E403, E403],
    ),
    (Op::List, "GET /v1/buckets", [E401, DCNA, OK, OK, OK, OK]),
    (
        Op::GetOwn,
        "GET /v1/buckets/device.A",
        [E401, DCNA, OK, OK, E403, E403],
    ),
    (
        Op::PutOwn,
        "PUT /v1/buckets/device.A",
        [E401, DCNA, OK, OK, E403, E403],
    ),
    (
        Op::SubscribeOwn,
        "POST /v1/subscribe [device.A]",
        [E401, DCNA, OK, OK, E403, E403],
    ),
    (
        Op::GetOtherDevice,
        "GET /v1/buckets/device.B",
        [E401, DCNA, E403, E403, OK, E403],
    ),
    (
        Op::PutStructure,
        "PUT /v1/buckets/structure.homeA",
        [E401, DCNA, OK, OK, E403, E403],
    ),
    (
        Op::PairingCode,
        "POST /v1/pairing-code",
        [E401, DCNA, OK, E403, OK, E403],
    ),
    // Any user holding the device's code may pair it; "homeA" is then that user's own
    // structure (names are per user), so the other user is not refused.
    (
        Op::Pair,
        "POST /v1/pair {A's code, homeA}",
        [E401, DCNA, E403, OK, E403, OK],
    ),
    (
        Op::Unpair,
        "DELETE /v1/devices/A/pairing",
        [E401, DCNA, E403, OK, E403, E403],
    ),
    (
        Op::GetMissingOwn,
        "GET /v1/buckets/other.A (missing)",
        [E401, DCNA, E404, E404, E403, E403],
    ),
    (
        Op::GetUnknownDevice,
        "GET /v1/buckets/device.NOSUCH99",
        [E401, DCNA, E403, E403, E403, E403],
    ),
    (
        Op::UnpairUnknown,
        "DELETE /v1/devices/NOSUCH99/pairing",
        [E401, DCNA, E403, E403, E403, E403],
    ),
];

struct Fixture {
    node: Node,
    a: Principal,
    b: Principal,
    alice: Principal,
    bob: Principal,
}

impl Fixture {
    fn principal(&self, who: Who) -> Option<Principal> {
        match who {
            Who::None => None,
            Who::Default => Some(self.node.factory(SUBJECT)),
            Who::Assigned => Some(self.node.assigned(SUBJECT)),
            Who::PairedUser => Some(self.alice.clone()),
            Who::OtherDevice => Some(self.b.clone()),
            Who::OtherUser => Some(self.bob.clone()),
        }
    }

    /// Every cell starts from the same state: A paired by alice into `homeA` (a cell may
    /// have unpaired it, or — default credentials at register — replaced its credentials).
    async fn restore(&self) {
        let code = self.a.pairing_code().await;
        let r = self.alice.pair(&code, Some(HOME)).await;
        let v = r.expect_json(StatusCode::OK);
        assert_eq!(v["device_id"], SUBJECT, "{v}");
    }

    async fn run(&self, op: Op, who: Who) -> Resp {
        let p = self.principal(who);
        let rb = |method: Method, path: &str| match &p {
            Some(p) => p.req(method, path),
            None => self.node.anon(method, path),
        };
        let rb = match op {
            Op::Register => rb(Method::POST, "/v1/register").json(&json!({
                "device_id": SUBJECT, "device_type": "thermostat", "sw_version": "1.0.0"
            })),
            Op::List => rb(Method::GET, "/v1/buckets"),
            Op::GetOwn => rb(Method::GET, &format!("/v1/buckets/device.{SUBJECT}")),
            Op::PutOwn => rb(Method::PUT, &format!("/v1/buckets/device.{SUBJECT}"))
                .json(&json!({"value": {"hvac_state": "idle"}})),
            Op::SubscribeOwn => rb(Method::POST, "/v1/subscribe").json(&json!({
                "buckets": [{"id": format!("device.{SUBJECT}")}], "timeout_ms": 1000
            })),
            Op::GetOtherDevice => rb(Method::GET, &format!("/v1/buckets/device.{OTHER}")),
            Op::PutStructure => rb(
                Method::PUT,
                &format!("/v1/buckets/{}", structure_bucket("alice", HOME)),
            )
            .json(&json!({"value": {"name": "Home A"}})),
            Op::PairingCode => rb(Method::POST, "/v1/pairing-code"),
            Op::Pair => {
                let code = self.a.pairing_code().await;
                rb(Method::POST, "/v1/pair").json(&json!({"code": code, "structure": HOME}))
            }
            Op::Unpair => rb(Method::DELETE, &format!("/v1/devices/{SUBJECT}/pairing")),
            Op::GetMissingOwn => rb(Method::GET, &format!("/v1/buckets/other.{SUBJECT}")),
            Op::GetUnknownDevice => rb(Method::GET, &format!("/v1/buckets/device.{NOSUCH}")),
            Op::UnpairUnknown => rb(Method::DELETE, &format!("/v1/devices/{NOSUCH}/pairing")),
        };
        match &p {
            Some(p) => p.send(rb).await,
            None => self.node.send(rb).await,
        }
    }
}

fn show(e: Exp) -> String {
    match e.1 {
        Some(code) => format!("{} {code}", e.0),
        None => e.0.to_string(),
    }
}

/// One table over every endpoint × principal kind against the real server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorization_matrix_every_endpoint_by_every_principal() {
    let node = Node::builder().user("alice").user("bob").start().await;
    let f = Fixture {
        a: node.device(SUBJECT),
        b: node.device(OTHER),
        alice: node.user("alice"),
        bob: node.user("bob"),
        node,
    };
    f.a.register_thermostat().await;
    f.b.register_thermostat().await;

    let mut failures = 0;
    let mut table = String::new();
    let width = 36;
    let _ = write!(table, "{:width$}", "endpoint \\ principal");
    for name in WHO_NAMES {
        let _ = write!(table, " | {name:38}");
    }
    table.push('\n');
    for (op, label, expected) in MATRIX {
        let _ = write!(table, "{label:width$}");
        for (col, who) in WHO.iter().enumerate() {
            f.restore().await;
            let r = f.run(*op, *who).await;
            let want = expected[col];
            let got_code = error_code(&r);
            let mut ok =
                r.status.as_u16() == want.0 && (want.1.is_none() || got_code.as_deref() == want.1);
            if ok && r.status == StatusCode::UNAUTHORIZED {
                // API.md: a 401 carries the Basic challenge.
                ok = r
                    .headers
                    .get("www-authenticate")
                    .and_then(|v| v.to_str().ok())
                    == Some("Basic realm=\"tether\"");
            }
            let cell = if ok {
                show(want)
            } else {
                failures += 1;
                let got = match (&got_code, r.status.is_success()) {
                    (Some(c), false) => format!("{} {c}", r.status.as_u16()),
                    _ => r.status.as_u16().to_string(),
                };
                let challenge = if r.status == StatusCode::UNAUTHORIZED
                    && r.headers.get("www-authenticate").is_none()
                {
                    " no-challenge"
                } else {
                    ""
                };
                format!("✗ want {} got {got}{challenge}", show(want))
            };
            let _ = write!(table, " | {cell:38}");
        }
        table.push('\n');
    }
    assert!(
        failures == 0,
        "{failures} cells of the authorization matrix differ (subject A={SUBJECT} paired by \
         alice into {HOME}, other device B={OTHER}, other user bob):\n{table}"
    );
    eprintln!("authorization matrix:\n{table}");

    // What each principal lists: exactly its own scope, nothing across principals.
    f.restore().await;
    let own_a = vec![
        format!("device.{SUBJECT}"),
        format!("shared.{SUBJECT}"),
        structure_bucket("alice", HOME),
    ];
    let mut own_a_sorted = own_a.clone();
    own_a_sorted.sort();
    for (who, p, want) in [
        ("assigned(A)", &f.a, own_a_sorted.clone()),
        ("alice", &f.alice, own_a_sorted.clone()),
        ("B", &f.b, thermostat_buckets(OTHER)),
        // Bob paired A into his own "homeA" in his cell; A went back to alice, his (now
        // empty) structure stays his.
        ("bob", &f.bob, vec![structure_bucket("bob", HOME)]),
    ] {
        let l = p
            .get("/v1/buckets?view=ids")
            .await
            .expect_json(StatusCode::OK);
        assert_eq!(ids_of(&l), want, "{who} lists exactly its scope: {l}");
    }
    // An ids= filter naming a bucket outside the scope is refused, not silently dropped.
    f.a.get(&format!("/v1/buckets?ids=device.{SUBJECT},device.{OTHER}"))
        .await
        .expect_error(StatusCode::FORBIDDEN, "forbidden");
    f.bob
        .get(&format!("/v1/buckets?ids=device.{SUBJECT}"))
        .await
        .expect_error(StatusCode::FORBIDDEN, "forbidden");
    // A subscribe listing another principal's bucket next to an own one is refused.
    f.b.subscribe(
        &json!({"buckets": [{"id": format!("device.{OTHER}")}, {"id": format!("device.{SUBJECT}")}], "timeout_ms": 1000}),
        NOTIFY_DEADLINE,
    )
    .await
    .expect_error(StatusCode::FORBIDDEN, "forbidden");
}

// ---------------------------------------------------------------------------------------
// registration (FIG 28C: default credentials → TLS → verify → rate → contact; the rate
// is charged only after verification, issue 13 finding 3)

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fig28c_registration_rules_in_seed_order() {
    let node = Node::builder().user("alice").start().await;
    let keyring = node.keyring();

    // Verify: a wrong secret (well-formed, derived from another key) → 401.
    const W: &str = "WRONG001";
    let real = keyring.default_credentials(W);
    let wrong = Credentials {
        id: real.id.clone(),
        secret: default_secret(&[7u8; 64], &real.id),
    };
    assert_ne!(wrong.secret, real.secret);
    let w = node.device(W);
    let attempt = |c: Credentials| {
        let p = w.with_credentials(c);
        async move { p.register("thermostat", "1.0.0").await }
    };
    assert_401(&attempt(wrong.clone()).await, "unauthorized");
    // The real secret of an id naming a key the server does not have → 401.
    let unknown_key_id = format!("d.{W}.k9");
    let unknown_key = Credentials {
        secret: default_secret(&keyring.mfg_key, &unknown_key_id),
        id: unknown_key_id,
    };
    assert_401(&attempt(unknown_key).await, "unauthorized");
    // A secret of the wrong shape, and credentials of another device → 401.
    let other = keyring.default_credentials("WRONG002");
    assert_401(
        &attempt(Credentials {
            id: real.id.clone(),
            secret: other.secret.clone(),
        })
        .await,
        "unauthorized",
    );
    assert_401(
        &attempt(Credentials {
            id: real.id.clone(),
            secret: "d.short".into(),
        })
        .await,
        "unauthorized",
    );

    // Rate: wrong secrets are never charged to the device (issue 13 finding 3: ten wrong
    // guesses by anyone used to lock a factory-reset device out for an hour) ...
    for _ in 0..12 {
        assert_401(&attempt(wrong.clone()).await, "unauthorized");
    }
    // ... verified registrations are: at most 10 per device per hour (the default), then
    // 429 with Retry-After, and nothing is issued.
    for i in 0..10 {
        let r = attempt(real.clone()).await;
        assert_eq!(
            r.status,
            StatusCode::OK,
            "verified registration {i}: {}",
            r.text()
        );
        assert!(
            set_credentials_of(&r).is_some(),
            "registration {i} issues credentials"
        );
    }
    let r = attempt(real.clone()).await;
    let retry = assert_429(&r);
    assert!(retry <= 3600, "Retry-After {retry} within the hour");
    assert!(
        set_credentials_of(&r).is_none(),
        "a rate-limited registration issues nothing"
    );

    // The limit is per device: another device registers normally.
    const D: &str = "FIRST001";
    let d = node.device(D);
    // First contact: assigned credentials in the header, on a normal register answer.
    let r = d.register("thermostat", "1.0.0").await;
    let body = r.json();
    assert_eq!(r.status, StatusCode::OK, "{body}");
    let s1 = set_credentials_of(&r).expect("first contact hands out assigned credentials");
    assert_assigned_shape(&s1, D);
    assert_eq!(d.assigned_credentials(), Some(s1.clone()));
    let mut ids: Vec<String> = serde_json::from_value(body["buckets"].clone()).expect("ids");
    ids.sort();
    assert_eq!(ids, thermostat_buckets(D), "{body}");

    // Assigned credentials: everything else, and registration again — without new
    // credentials and without counting against the default-credential limit.
    d.write(&format!("device.{D}"), json!({"hvac_state": "heating"}), 1)
        .await;
    for _ in 0..12 {
        let r = d.register("thermostat", "1.0.0").await;
        let v = r.json();
        assert_eq!(r.status, StatusCode::OK, "{v}");
        assert!(
            set_credentials_of(&r).is_none(),
            "registering with valid assigned credentials issues nothing new"
        );
    }

    // Pair D, so that the lost-credentials case has something to undo.
    let alice = node.user("alice");
    let code = d.pairing_code().await;
    alice
        .pair(&code, Some("homeD"))
        .await
        .expect(StatusCode::OK);
    alice.bucket(&format!("device.{D}")).await;
    d.bucket(&structure_bucket("alice", "homeD")).await;

    // Lost credentials: default credentials again → a new set; the old one is revoked and
    // the device is unpaired (FIG 28C 1850–1852).
    let r = node.factory(D).register("thermostat", "1.0.0").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let s2 = set_credentials_of(&r).expect("lost-credentials case hands out a new set");
    assert_assigned_shape(&s2, D);
    assert_ne!(s2.secret, s1.secret, "a new secret");
    let old = node.with_credentials(s1.clone());
    assert_401(
        &old.get(&format!("/v1/buckets/device.{D}")).await,
        "unauthorized",
    );
    assert_401(&old.register("thermostat", "1.0.0").await, "unauthorized");
    let new = node.with_credentials(s2.clone());
    let b = new.bucket(&format!("device.{D}")).await;
    assert_eq!(
        b["value"]["hvac_state"], "heating",
        "the device's data stays: {b}"
    );
    // Unpaired: the user lost the device, the device lost the structure.
    alice
        .get(&format!("/v1/buckets/device.{D}"))
        .await
        .expect_error(StatusCode::FORBIDDEN, "forbidden");
    let l = alice
        .get("/v1/buckets?view=ids")
        .await
        .expect_json(StatusCode::OK);
    assert_eq!(ids_of(&l), vec![structure_bucket("alice", "homeD")], "{l}");
    new.get(&format!(
        "/v1/buckets/{}",
        structure_bucket("alice", "homeD")
    ))
    .await
    .expect_error(StatusCode::FORBIDDEN, "forbidden");
    alice
        .unpair(D)
        .await
        .expect_error(StatusCode::FORBIDDEN, "forbidden");
}

// ---------------------------------------------------------------------------------------
// rotation (FIG 28F / 29C)

fn rotating_node() -> NodeBuilder {
    Node::builder()
        .arg("--credential-lifetime-s")
        .arg(LIFETIME_S.to_string())
        .arg("--credential-grace-s")
        .arg(GRACE_S.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fig28f_rotation_resends_the_new_set_during_grace_then_refuses_the_old() {
    const R: &str = "ROTATE01";
    let node = rotating_node().start().await;
    let d = node.device(R);
    d.register_thermostat().await;
    let issued = Instant::now();
    let s1 = d.assigned_credentials().expect("assigned");
    let id = format!("device.{R}");
    let path = format!("/v1/buckets/{id}");

    // Fresh: used (and cached) without any new credentials.
    let old = node.with_credentials(s1.clone());
    for _ in 0..3 {
        let r = old.get(&path).await.expect(StatusCode::OK);
        assert!(
            set_credentials_of(&r).is_none(),
            "no rotation before the lifetime"
        );
    }

    // Past the lifetime: the next use is answered and carries a new set.
    sleep_until(issued + Duration::from_secs(LIFETIME_S) + EXPIRY_MARGIN).await;
    let r = old.get(&path).await.expect(StatusCode::OK);
    let rotated = Instant::now();
    let s2 = set_credentials_of(&r).expect("first use after the lifetime rotates");
    assert_assigned_shape(&s2, R);
    assert_ne!(s2.secret, s1.secret);

    // Grace: the old set keeps working everywhere, each use resending the same new set.
    let r = old.get(&path).await.expect(StatusCode::OK);
    assert_eq!(
        set_credentials_of(&r).as_ref(),
        Some(&s2),
        "GET during grace"
    );
    let r = old
        .put(&id, &json!({"value": {"hvac_state": "cooling"}}))
        .await
        .expect(StatusCode::OK);
    assert_eq!(
        set_credentials_of(&r).as_ref(),
        Some(&s2),
        "PUT during grace"
    );
    let r = old
        .register("thermostat", "1.0.0")
        .await
        .expect(StatusCode::OK);
    assert_eq!(
        set_credentials_of(&r).as_ref(),
        Some(&s2),
        "register during grace"
    );
    let r = old.get("/v1/buckets").await.expect(StatusCode::OK);
    assert_eq!(
        set_credentials_of(&r).as_ref(),
        Some(&s2),
        "list during grace"
    );
    // Any authenticated response, errors included.
    let r = old.get(&format!("/v1/buckets/other.{R}")).await;
    r.expect_error(StatusCode::NOT_FOUND, "not_found");
    assert_eq!(
        set_credentials_of(&r).as_ref(),
        Some(&s2),
        "404 during grace"
    );
    let r = old.get("/v1/buckets/device.SOMEONE1").await;
    r.expect_error(StatusCode::FORBIDDEN, "forbidden");
    assert_eq!(
        set_credentials_of(&r).as_ref(),
        Some(&s2),
        "403 during grace"
    );
    // The new set works and is not rotated again.
    let new = node.with_credentials(s2.clone());
    let r = new.get(&path).await.expect(StatusCode::OK);
    assert!(set_credentials_of(&r).is_none(), "the new set is current");
    assert_eq!(r.json()["value"]["hvac_state"], "cooling");

    // After the grace period: the old set is refused; the new one keeps working (and, now
    // older than the lifetime itself, is rotated in turn — again without a gap).
    sleep_until(rotated + Duration::from_secs(GRACE_S) + EXPIRY_MARGIN).await;
    assert_401(&old.get(&path).await, "unauthorized");
    assert_401(&old.register("thermostat", "1.0.0").await, "unauthorized");
    let r = new.get(&path).await.expect(StatusCode::OK);
    let s3 = set_credentials_of(&r)
        .expect("the second set, now older than the lifetime, is rotated on its next use");
    assert_assigned_shape(&s3, R);
    assert!(s3.secret != s2.secret && s3.secret != s1.secret);
    let r = node
        .with_credentials(s3)
        .get(&path)
        .await
        .expect(StatusCode::OK);
    assert!(set_credentials_of(&r).is_none());
    new.get(&path).await.expect(StatusCode::OK);
}

/// Rotation never loses a device (a): a subscribe held with the old set stays held across
/// the rotation, is answered when another client writes, and the device carries on with
/// the new set; a subscribe opened with the old set during grace gets the new set in its
/// headers before the body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_while_a_subscribe_is_held_loses_nothing() {
    const H: &str = "ROTSUB01";
    let node = rotating_node().user("alice").start().await;
    let d = node.device(H);
    d.register_thermostat().await;
    let issued = Instant::now();
    let s1 = d.assigned_credentials().expect("assigned");
    let alice = node.user("alice");
    let code = d.pairing_code().await;
    alice
        .pair(&code, Some("rothome"))
        .await
        .expect(StatusCode::OK);
    let id = format!("shared.{H}");
    let b1 = d.bucket(&id).await;
    let v1 = u64_of(&b1, "version");

    // Held with the old set, on its own connection, before the set expires.
    let old = node.with_credentials(s1.clone()).with_client(http_client());
    let body = json!({"buckets": [held(&id, &b1)], "session": "device", "timeout_ms": 60_000});
    let sub = {
        let old = old.clone();
        tokio::spawn(async move { old.subscribe(&body, Duration::from_secs(30)).await })
    };
    node.wait_held(1, REQUEST_DEADLINE).await;

    // Rotation happens while it is held: the device's next request with the old set.
    sleep_until(issued + Duration::from_secs(LIFETIME_S) + EXPIRY_MARGIN).await;
    let r = d
        .get(&format!("/v1/buckets/device.{H}"))
        .await
        .expect(StatusCode::OK);
    let s2 = set_credentials_of(&r).expect("rotated");
    assert_ne!(s2.secret, s1.secret);
    assert_eq!(
        d.assigned_credentials(),
        Some(s2.clone()),
        "the device stored the new set"
    );
    node.wait_held(1, REQUEST_DEADLINE).await;
    assert!(
        !sub.is_finished(),
        "rotation must not end the held subscribe"
    );

    // Another client writes: the subscribe opened with the old set is answered.
    let (_, v2) = alice
        .write(&id, json!({"target_temperature": 19.5}), v1)
        .await;
    let r = within(
        NOTIFY_DEADLINE,
        "held subscribe answered after rotation",
        sub,
    )
    .await
    .expect("subscribe task")
    .expect_json(StatusCode::OK);
    let got = bucket_in(&r, &id);
    assert_eq!(u64_of(&got, "version"), v2, "{r}");
    assert_eq!(got["value"]["target_temperature"], 19.5, "{r}");

    // The device continues with the new set: subscribes, is woken, no further rotation.
    let b2 = d.bucket(&id).await;
    let sub = {
        let d = d.with_client(http_client());
        let body = json!({"buckets": [held(&id, &b2)], "session": "device", "timeout_ms": 60_000});
        tokio::spawn(async move { d.subscribe(&body, Duration::from_secs(30)).await })
    };
    node.wait_held(1, REQUEST_DEADLINE).await;
    let (_, v3) = alice.write(&id, json!({"mode": "heat"}), v2).await;
    let r = within(NOTIFY_DEADLINE, "subscribe with the new set answered", sub)
        .await
        .expect("subscribe task");
    assert!(set_credentials_of(&r).is_none(), "the new set is current");
    let r = r.expect_json(StatusCode::OK);
    assert_eq!(u64_of(&bucket_in(&r, &id), "version"), v3, "{r}");

    // A subscribe opened with the old set during grace: its response headers — sent while
    // it is still held — already carry the new set (API.md: "even on a held subscribe,
    // before the body").
    let b3 = d.bucket(&id).await;
    let resp = within(
        NOTIFY_DEADLINE,
        "headers of a held subscribe",
        old.req(Method::POST, "/v1/subscribe")
            .json(&json!({"buckets": [held(&id, &b3)], "session": "device", "timeout_ms": 60_000}))
            .send(),
    )
    .await
    .expect("send subscribe");
    assert_eq!(resp.status(), StatusCode::OK);
    let header = resp
        .headers()
        .get(SET_CREDENTIALS)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    assert_eq!(
        header,
        Some(format!("{} {}", s2.id, s2.secret)),
        "the held subscribe's headers carry the new set"
    );
    node.wait_held(1, REQUEST_DEADLINE).await;
    let (_, v4) = alice.write(&id, json!({"mode": "cool"}), v3).await;
    let body = within(NOTIFY_DEADLINE, "held body", resp.bytes())
        .await
        .expect("read held body");
    let v: Value = serde_json::from_slice(&body).expect("JSON body");
    assert_eq!(u64_of(&bucket_in(&v, &id), "version"), v4, "{v}");
}

/// Rotation never loses a device (b): PUTs in flight with the old set as it expires are
/// all acknowledged, carry the same new set, and are durable (they and the rotation
/// survive kill -9).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_with_puts_in_flight_acknowledges_and_keeps_them() {
    const P: &str = "ROTPUT01";
    const WRITERS: u64 = 8;
    let data = tempfile::tempdir().expect("data dir");
    // A longer grace here: the old set is also checked after a kill -9 and a restart.
    let template = thermostat_template(
        &(0..WRITERS)
            .map(|i| format!("w{i}"))
            .collect::<Vec<_>>()
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    let mut node = Node::builder()
        .config(&template)
        .data_dir(data.path())
        .arg("--credential-lifetime-s")
        .arg(LIFETIME_S.to_string())
        .arg("--credential-grace-s")
        .arg(RESTART_GRACE_S.to_string())
        .start()
        .await;
    let d = node.device(P);
    d.register_thermostat().await;
    let issued = Instant::now();
    let s1 = d.assigned_credentials().expect("assigned");
    let id = format!("device.{P}");

    sleep_until(issued + Duration::from_secs(LIFETIME_S) + EXPIRY_MARGIN).await;
    let tasks: Vec<_> = (0..WRITERS)
        .map(|i| {
            let p = node.with_credentials(s1.clone()).with_client(http_client());
            let id = id.clone();
            tokio::spawn(async move {
                p.put(
                    &id,
                    &json!({"value": {format!("w{i}"): i}, "session": format!("s{i}")}),
                )
                .await
            })
        })
        .collect();
    let mut new_sets = Vec::new();
    for t in tasks {
        let r = within(REQUEST_DEADLINE, "PUT during rotation", t)
            .await
            .expect("writer");
        let c = set_credentials_of(&r);
        let v = r.expect_json(StatusCode::OK);
        assert!(
            v["outcome"] == "applied" || v["outcome"] == "merged",
            "PUT with the old set during rotation: {v}"
        );
        new_sets.push(c.expect("every answer to the expired set carries the new set"));
    }
    let s2 = new_sets[0].clone();
    assert_assigned_shape(&s2, P);
    assert_ne!(s2.secret, s1.secret);
    assert!(
        new_sets.iter().all(|c| c == &s2),
        "concurrent uses of the expired set must all be handed the same new set"
    );

    // Durable: kill -9 and restart; the writes and the rotation are there.
    let keyring = node.keyring();
    node.kill9().await;
    drop(node);
    let node = Node::builder()
        .config(&template)
        .data_dir(data.path())
        .keyring(keyring)
        .arg("--credential-lifetime-s")
        .arg(LIFETIME_S.to_string())
        .arg("--credential-grace-s")
        .arg(RESTART_GRACE_S.to_string())
        .start()
        .await;
    let new = node.with_credentials(s2.clone());
    let b = new.bucket(&id).await;
    for i in 0..WRITERS {
        assert_eq!(
            b["value"][format!("w{i}")],
            i,
            "acknowledged write w{i} lost: {b}"
        );
    }
    assert_eq!(u64_of(&b, "version"), 1 + WRITERS, "{b}");
    // The old set is still in its grace period and still resends the same new set.
    let r = node
        .with_credentials(s1)
        .get(&format!("/v1/buckets/{id}"))
        .await
        .expect(StatusCode::OK);
    assert_eq!(set_credentials_of(&r), Some(s2));
}

// ---------------------------------------------------------------------------------------
// pairing

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pairing_flow_code_pair_share_unpair() {
    const P: &str = "PAIR0001";
    const Q: &str = "PAIR0002";
    let node = Node::builder().user("alice").user("bob").start().await;
    let (alice, bob) = (node.user("alice"), node.user("bob"));
    let p = node.device(P);
    let q = node.device(Q);
    p.register_thermostat().await;
    q.register_thermostat().await;

    // The device asks for a code.
    let r = p
        .send(p.req(Method::POST, "/v1/pairing-code"))
        .await
        .expect_json(StatusCode::OK);
    assert_eq!(keys(&r), set(&["code", "expires_in_s"]), "{r}");
    assert_eq!(r["expires_in_s"], 600, "{r}");
    let code = r["code"].as_str().expect("code").to_string();
    let shape = code.len() == 9
        && code.char_indices().all(|(i, c)| {
            if i == 4 {
                c == '-'
            } else {
                c.is_ascii_uppercase() || c.is_ascii_digit()
            }
        });
    assert!(shape, "pairing code looks like 7Q4K-92XD: {code:?}");

    // Unknown codes are 404, for anyone.
    alice
        .pair("ZZZZ-ZZZZ", Some("home1"))
        .await
        .expect_error(StatusCode::NOT_FOUND, "not_found");
    alice
        .pair("not a code", None)
        .await
        .expect_error(StatusCode::BAD_REQUEST, "bad_request");

    // Alice pairs P into her structure home1.
    let r = alice
        .pair(&code, Some("home1"))
        .await
        .expect_json(StatusCode::OK);
    assert_eq!(r["device_id"], P, "{r}");
    // The structure's id: alice's "home1", scoped to her account.
    let home1 = r["structure"].as_str().expect("structure id").to_string();
    assert!(home1.starts_with("home1-"), "{r}");
    assert_eq!(
        format!("structure.{home1}"),
        structure_bucket("alice", "home1")
    );
    // The code is single-use.
    alice
        .pair(&code, Some("home1"))
        .await
        .expect_error(StatusCode::NOT_FOUND, "not_found");
    bob.pair(&code, None)
        .await
        .expect_error(StatusCode::NOT_FOUND, "not_found");

    // Alice now sees P's buckets and the new structure bucket (null fields, version 1).
    let home = structure_bucket("alice", "home1");
    let l = alice
        .get("/v1/buckets?view=full")
        .await
        .expect_json(StatusCode::OK);
    let mut want = thermostat_buckets(P);
    want.push(home.clone());
    want.sort();
    assert_eq!(ids_of(&l), want, "{l}");
    let s = bucket_in(&l, &home);
    assert_eq!(u64_of(&s, "version"), 1, "{s}");
    assert_eq!(s["value"], json!({"name": "home1", "away": null}), "{s}");
    // The device lists its structure too.
    let l = p
        .get("/v1/buckets?view=ids")
        .await
        .expect_json(StatusCode::OK);
    assert_eq!(ids_of(&l), want, "{l}");

    // The device's held subscribe sees the user's write ...
    let shared = format!("shared.{P}");
    let dev = format!("device.{P}");
    let b_shared = p.bucket(&shared).await;
    let b_home = p.bucket(&home).await;
    let sub = {
        let p = p.with_client(http_client());
        let body = json!({"buckets": [held(&shared, &b_shared), held(&home, &b_home)], "session": "device", "timeout_ms": 60_000});
        tokio::spawn(async move { p.subscribe(&body, Duration::from_secs(30)).await })
    };
    // (The gauge counts one hold per bucket set a subscribe spans: two here.)
    node.wait_held(2, REQUEST_DEADLINE).await;
    let (_, v) = alice
        .write(
            &shared,
            json!({"target_temperature": 21}),
            u64_of(&b_shared, "version"),
        )
        .await;
    let r = within(NOTIFY_DEADLINE, "device woken by the user's write", sub)
        .await
        .expect("subscribe task")
        .expect_json(StatusCode::OK);
    assert_eq!(ids_of(&r), vec![shared.clone()], "{r}");
    let got = bucket_in(&r, &shared);
    assert_eq!(u64_of(&got, "version"), v);
    assert_eq!(got["value"]["target_temperature"], 21);
    // ... and the user's held subscribe sees the device's writes, to its own and the
    // structure's buckets.
    let b_dev = alice.bucket(&dev).await;
    let sub = {
        let a = alice.with_client(http_client());
        let body = json!({"buckets": [held(&dev, &b_dev)], "session": "app", "timeout_ms": 60_000});
        tokio::spawn(async move { a.subscribe(&body, Duration::from_secs(30)).await })
    };
    node.wait_held(1, REQUEST_DEADLINE).await;
    p.write(
        &dev,
        json!({"current_temperature": 20.5}),
        u64_of(&b_dev, "version"),
    )
    .await;
    let r = within(NOTIFY_DEADLINE, "user woken by the device's write", sub)
        .await
        .expect("subscribe task")
        .expect_json(StatusCode::OK);
    assert_eq!(bucket_in(&r, &dev)["value"]["current_temperature"], 20.5);
    p.write(&home, json!({"away": true}), 1).await;
    assert_eq!(alice.bucket(&home).await["value"]["away"], true);

    // Bob's "home1" is his own: naming it neither reaches nor reveals alice's.
    let code_q = q.pairing_code().await;
    let r = bob
        .pair(&code_q, Some("home1"))
        .await
        .expect_json(StatusCode::OK);
    assert_ne!(r["structure"], json!(home1), "{r}");
    bob.get(&format!("/v1/buckets/{home}"))
        .await
        .expect_error(StatusCode::FORBIDDEN, "forbidden");
    // Alice pairs Q into her home1 (by its id this time), taking it from bob.
    let code_q = q.pairing_code().await;
    let r = alice
        .pair(&code_q, Some(&home1))
        .await
        .expect_json(StatusCode::OK);
    assert_eq!(r["device_id"], Q, "{r}");
    assert_eq!(r["structure"], json!(home1), "{r}");
    // Two devices of one structure share it, not each other's buckets.
    assert_eq!(q.bucket(&home).await["value"]["away"], true);
    q.get(&format!("/v1/buckets/{dev}"))
        .await
        .expect_error(StatusCode::FORBIDDEN, "forbidden");
    // Bob, with no devices, lists only his empty structure and reaches nothing else.
    let l = bob
        .get("/v1/buckets?view=ids")
        .await
        .expect_json(StatusCode::OK);
    assert_eq!(ids_of(&l), vec![structure_bucket("bob", "home1")], "{l}");
    bob.get(&format!("/v1/buckets/{home}"))
        .await
        .expect_error(StatusCode::FORBIDDEN, "forbidden");

    // Unpair: only the owner, and no existence leak for devices that do not exist.
    bob.unpair(P)
        .await
        .expect_error(StatusCode::FORBIDDEN, "forbidden");
    bob.unpair("NOSUCH01")
        .await
        .expect_error(StatusCode::FORBIDDEN, "forbidden");
    alice
        .unpair("NOSUCH01")
        .await
        .expect_error(StatusCode::FORBIDDEN, "forbidden");
    alice.unpair(P).await.expect(StatusCode::OK);
    // Access is gone both ways; the structure stays with alice and Q.
    alice
        .get(&format!("/v1/buckets/{dev}"))
        .await
        .expect_error(StatusCode::FORBIDDEN, "forbidden");
    alice
        .put(&shared, &json!({"value": {"mode": "off"}}))
        .await
        .expect_error(StatusCode::FORBIDDEN, "forbidden");
    p.get(&format!("/v1/buckets/{home}"))
        .await
        .expect_error(StatusCode::FORBIDDEN, "forbidden");
    p.subscribe(
        &json!({"buckets": [{"id": home}], "timeout_ms": 1000}),
        NOTIFY_DEADLINE,
    )
    .await
    .expect_error(StatusCode::FORBIDDEN, "forbidden");
    let l = alice
        .get("/v1/buckets?view=ids")
        .await
        .expect_json(StatusCode::OK);
    let mut want = thermostat_buckets(Q);
    want.push(home.clone());
    want.sort();
    assert_eq!(ids_of(&l), want, "{l}");
    // Unpairing twice: no longer alice's device.
    alice
        .unpair(P)
        .await
        .expect_error(StatusCode::FORBIDDEN, "forbidden");
    // The device still works on its own and can be paired again.
    p.bucket(&dev).await;
    let code = p.pairing_code().await;
    bob.pair(&code, Some("bobhome"))
        .await
        .expect(StatusCode::OK);
    bob.bucket(&dev).await;

    // Re-pairing moves a device: Q, alice's, redeemed by bob into his structure.
    let code = q.pairing_code().await;
    bob.pair(&code, Some("bobhome"))
        .await
        .expect(StatusCode::OK);
    let dev_q = format!("device.{Q}");
    alice
        .get(&format!("/v1/buckets/{dev_q}"))
        .await
        .expect_error(StatusCode::FORBIDDEN, "forbidden");
    alice
        .unpair(Q)
        .await
        .expect_error(StatusCode::FORBIDDEN, "forbidden");
    q.get(&format!("/v1/buckets/{home}"))
        .await
        .expect_error(StatusCode::FORBIDDEN, "forbidden");
    q.bucket(&structure_bucket("bob", "bobhome")).await;
    bob.bucket(&dev_q).await;
    let l = alice
        .get("/v1/buckets?view=ids")
        .await
        .expect_json(StatusCode::OK);
    assert_eq!(ids_of(&l), vec![home.clone()], "{l}");
}

/// A pair request that fails (unknown code) must not claim the structure it names.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_pair_claims_no_structure() {
    let node = Node::builder().user("alice").user("bob").start().await;
    let (alice, bob) = (node.user("alice"), node.user("bob"));
    let d = node.device("SQUAT001");
    d.register_thermostat().await;

    bob.pair("ZZZZ-ZZZZ", Some("alicehome"))
        .await
        .expect_error(StatusCode::NOT_FOUND, "not_found");
    assert_eq!(
        bob.get("/v1/buckets?view=ids")
            .await
            .expect_json(StatusCode::OK),
        json!({"buckets": []}),
        "a refused pair gives bob nothing"
    );
    let code = d.pairing_code().await;
    let r = alice.pair(&code, Some("alicehome")).await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "bob's failed pair (unknown code) must not have claimed structure `alicehome`: {}",
        r.text()
    );
}

// ---------------------------------------------------------------------------------------
// abuse

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_per_principal_are_rate_limited() {
    // 1/s (burst 2): 40 requests outpace it unless each takes over a second, so the test
    // holds on a loaded machine.
    let node = Node::builder()
        .arg("--requests-per-second")
        .arg("1")
        .user("alice")
        .start()
        .await;
    let l = node.device("LOUD0001");
    let m = node.device("CALM0001");
    l.register_thermostat().await;
    m.register_thermostat().await;
    let alice = node.user("alice");
    let path = "/v1/buckets/device.LOUD0001";

    // 1/s with a burst of 2: quick requests beyond that are refused.
    let mut statuses = Vec::new();
    let mut limited = None;
    for _ in 0..40 {
        let r = l.get(path).await;
        statuses.push(r.status.as_u16());
        if r.status == StatusCode::TOO_MANY_REQUESTS {
            limited = Some(r);
            break;
        }
        r.expect(StatusCode::OK);
    }
    let r = limited
        .unwrap_or_else(|| panic!("40 quick requests at 1/s were never limited: {statuses:?}"));
    assert!(
        statuses.len() >= 3,
        "the burst (2 × 1) is served before limiting: {statuses:?}"
    );
    let retry = assert_429(&r);
    assert!(retry <= 2, "Retry-After {retry} s for a 1/s limit");

    // Per principal: others are unaffected meanwhile.
    m.get("/v1/buckets/device.CALM0001")
        .await
        .expect(StatusCode::OK);
    alice.get("/v1/buckets").await.expect(StatusCode::OK);

    // After the advertised wait the principal is served again.
    tokio::time::sleep(Duration::from_secs(retry)).await;
    l.get(path).await.expect(StatusCode::OK);
}

// ---------------------------------------------------------------------------------------
// admin CLI

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_mfg_key_and_default_credentials() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key = dir.path().join("line7.key");
    admin([
        "mfg-key".into(),
        "generate".into(),
        key.clone().into_os_string(),
    ])
    .await
    .ok();
    let bytes = read_hex_key(&key);
    assert_eq!(bytes.len(), 64);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&key).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "manufacturing key file mode {mode:o}");
    }
    // Never overwrites.
    let before = std::fs::read(&key).expect("read");
    let out = admin([
        "mfg-key".into(),
        "generate".into(),
        key.clone().into_os_string(),
    ])
    .await;
    assert!(!out.status.success(), "overwrote an existing key: {out:?}");
    assert_eq!(
        std::fs::read(&key).expect("read"),
        before,
        "key file changed"
    );

    // default-credentials prints what the HMAC rule gives.
    let out = admin([
        "default-credentials".into(),
        "01AA02AB".into(),
        "--key-id".into(),
        "line7".into(),
        "--mfg-key-file".into(),
        key.clone().into_os_string(),
    ])
    .await
    .ok();
    let c = credentials_line(&out);
    assert_eq!(c.id, "d.01AA02AB.line7");
    assert_eq!(c.secret, default_secret(&bytes, "d.01AA02AB.line7"));
    assert_eq!(c.secret.len(), 45);

    // A node given that key accepts exactly those credentials.
    let node = Node::builder()
        .arg("--mfg-key-file")
        .arg(format!("line7={}", key.display()))
        .start()
        .await;
    let r = node
        .with_credentials(c)
        .register("thermostat", "1.0.0")
        .await
        .expect(StatusCode::OK);
    assert_assigned_shape(&set_credentials_of(&r).expect("first contact"), "01AA02AB");
}

// ---------------------------------------------------------------------------------------
// logs

/// Every form a secret could take in a log line: itself, its random part, and inside an
/// `Authorization` header.
fn leak_forms(c: &Credentials) -> Vec<String> {
    let mut forms = vec![c.secret.clone()];
    if let Some((_, body)) = c.secret.split_once('.') {
        forms.push(body.to_string());
    }
    let header = basic_header(c);
    forms.push(header.trim_start_matches("Basic ").to_string());
    forms
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_never_contain_secrets() {
    const D: &str = "LOGS0001";
    let mut node = rotating_node()
        .user("alice")
        .env("TETHER_LOG", "trace")
        .start()
        .await;
    let keyring = node.keyring();
    let alice = node.user("alice");
    let mut presented: Vec<Credentials> = vec![keyring.user("alice").expect("alice")];

    // Wrong secrets of every kind.
    let wrong_default = Credentials {
        id: format!("d.{D}.{KEY_ID}"),
        secret: default_secret(&[9u8; 64], &format!("d.{D}.{KEY_ID}")),
    };
    let wrong_assigned = Credentials {
        id: format!("a.{D}"),
        secret: "a.WRONGwrongWRONGwrong_-".into(),
    };
    let wrong_user = Credentials {
        id: "u.alice".into(),
        secret: "u.NOPEnopeNOPEnopeNOPE0".into(),
    };
    let unknown_user = Credentials {
        id: "u.mallory".into(),
        secret: "u.MALLORYmalloryMALLORY".into(),
    };
    for c in [&wrong_default, &wrong_assigned, &wrong_user, &unknown_user] {
        let r = node.with_credentials(c.clone()).get("/v1/buckets").await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{}", r.text());
        let r = node
            .with_credentials(c.clone())
            .register_as(D, "thermostat", "1.0.0")
            .await;
        assert!(r.status.is_client_error(), "{}", r.text());
        presented.push(c.clone());
    }

    // Register (default secret), use, pair, rotate, grace, lost credentials.
    let d = node.device(D);
    presented.push(d.default_credentials());
    d.register_thermostat().await;
    let issued = Instant::now();
    let s1 = d.assigned_credentials().expect("assigned");
    presented.push(s1.clone());
    let code = d.pairing_code().await;
    alice
        .pair(&code, Some("loghome"))
        .await
        .expect(StatusCode::OK);
    alice.bucket(&format!("device.{D}")).await;
    // Default credentials where they are not allowed.
    node.factory(D)
        .get("/v1/buckets")
        .await
        .expect_error(StatusCode::UNAUTHORIZED, "default_credentials_not_allowed");
    sleep_until(issued + Duration::from_secs(LIFETIME_S) + EXPIRY_MARGIN).await;
    let r = d.get("/v1/buckets").await.expect(StatusCode::OK);
    let s2 = set_credentials_of(&r).expect("rotated");
    presented.push(s2);
    node.with_credentials(s1.clone())
        .put(
            &format!("device.{D}"),
            &json!({"value": {"hvac_state": "off"}}),
        )
        .await
        .expect(StatusCode::OK);
    let r = node
        .factory(D)
        .register("thermostat", "1.0.0")
        .await
        .expect(StatusCode::OK);
    let s3 = set_credentials_of(&r).expect("lost-credentials re-issue");
    presented.push(s3.clone());
    node.with_credentials(s3)
        .get("/v1/buckets")
        .await
        .expect(StatusCode::OK);
    assert_eq!(
        node.with_credentials(s1).get("/v1/buckets").await.status,
        StatusCode::UNAUTHORIZED
    );

    // Stop the node so that everything it logged is in the file.
    node.sigterm().await;
    let status = node.wait_exit(Duration::from_secs(20)).await;
    assert!(status.success(), "{status:?}");
    let log = node.stderr_all();
    assert!(
        log.contains(D),
        "the captured log should cover the flow (mention {D}); got:\n{log}"
    );

    let mut leaks = Vec::new();
    for c in &presented {
        for form in leak_forms(c) {
            if let Some(line) = log.lines().find(|l| l.contains(&form)) {
                leaks.push(format!("secret of {} appears: {line}", c.id));
            }
        }
    }
    let hex: String = keyring.mfg_key.iter().map(|b| format!("{b:02x}")).collect();
    if log.contains(&hex) {
        leaks.push("the manufacturing key appears".into());
    }
    let b64 = base64::engine::general_purpose::STANDARD.encode(&keyring.mfg_key);
    if log.contains(&b64) {
        leaks.push("the manufacturing key (base64) appears".into());
    }
    if log.contains(&code) {
        leaks.push(format!("pairing code {code} appears"));
    }
    assert!(
        leaks.is_empty(),
        "secrets in the node's logs:\n{}",
        leaks.join("\n")
    );
}

/// Two users redeeming a device's code at the same moment: exactly one of them gets it
/// (a code is redeemable once, and only the device's newest code is valid), and
/// afterwards exactly one of them owns it — the pairing and each user's view of their
/// devices must agree.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_pairings_leave_exactly_one_owner() {
    const ROUNDS: usize = 30;
    let node = Node::builder()
        .user("alice")
        .user("bob")
        // Every round one of the two fails by design; that is not guessing.
        .arg("--pair-failures-per-hour")
        .arg("1000")
        .start()
        .await;
    let (alice, bob) = (node.user("alice"), node.user("bob"));
    let d = node.device("RACE0001");
    d.register_thermostat().await;
    let id = "device.RACE0001";
    let mut problems = Vec::new();
    for round in 0..ROUNDS {
        let code = d.pairing_code().await;
        let (a, b) = (
            alice.with_client(http_client()),
            bob.with_client(http_client()),
        );
        let (ra, rb) = tokio::join!(a.pair(&code, None), b.pair(&code, None));
        let mut statuses = [ra.status, rb.status];
        statuses.sort();
        assert_eq!(
            statuses,
            [StatusCode::OK, StatusCode::NOT_FOUND],
            "round {round}: one redemption wins: {} / {}",
            ra.text(),
            rb.text()
        );
        let sa = alice.get(&format!("/v1/buckets/{id}")).await.status;
        let sb = bob.get(&format!("/v1/buckets/{id}")).await.status;
        let owners: Vec<&str> = [("alice", sa), ("bob", sb)]
            .iter()
            .filter(|(_, s)| *s == StatusCode::OK)
            .map(|(n, _)| *n)
            .collect();
        if owners.len() != 1 {
            problems.push(format!("round {round}: readers of {id}: {owners:?}"));
        }
        // Reset: whoever can unpair does.
        let ua = alice.unpair("RACE0001").await.status;
        let ub = bob.unpair("RACE0001").await.status;
        if ua == StatusCode::OK && ub == StatusCode::OK {
            problems.push(format!("round {round}: both users could unpair"));
        }
        let sa = alice.get(&format!("/v1/buckets/{id}")).await.status;
        let sb = bob.get(&format!("/v1/buckets/{id}")).await.status;
        if sa == StatusCode::OK || sb == StatusCode::OK {
            problems.push(format!(
                "round {round}: after unpairing, still readable (alice {sa}, bob {sb})"
            ));
            break;
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// Authorization is not only checked when a subscribe starts: once a device moves to
/// another account, a subscribe the previous owner still holds must not deliver the new
/// owner's data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_subscribe_does_not_outlive_the_pairing() {
    const S: &str = "SOLD0001";
    let node = Node::builder().user("alice").user("bob").start().await;
    let (alice, bob) = (node.user("alice"), node.user("bob"));
    let d = node.device(S);
    d.register_thermostat().await;
    let code = d.pairing_code().await;
    alice.pair(&code, None).await.expect(StatusCode::OK);
    let id = format!("device.{S}");
    let b = alice.bucket(&id).await;

    // Alice holds a subscribe (ending by itself after 3 s at the latest).
    let sub = {
        let a = alice.with_client(http_client());
        let body = json!({"buckets": [held(&id, &b)], "session": "app", "timeout_ms": 3000});
        tokio::spawn(async move { a.subscribe(&body, Duration::from_secs(10)).await })
    };
    node.wait_held(1, REQUEST_DEADLINE).await;

    // The device is passed on: bob pairs it; from now on its data is bob's.
    let code = d.pairing_code().await;
    bob.pair(&code, None).await.expect(StatusCode::OK);
    alice
        .get(&format!("/v1/buckets/{id}"))
        .await
        .expect_error(StatusCode::FORBIDDEN, "forbidden");
    d.write(
        &id,
        json!({"hvac_state": "bob's secret"}),
        u64_of(&b, "version"),
    )
    .await;

    let r = within(Duration::from_secs(10), "alice's subscribe ends", sub)
        .await
        .expect("subscribe task");
    assert!(
        !r.text().contains("bob's secret"),
        "alice's held subscribe delivered data written after the device left her account: {} {}",
        r.status,
        r.text()
    );
}
