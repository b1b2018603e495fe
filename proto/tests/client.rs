//! Scenario tests of the sans-IO device client: each drives a whole exchange by hand,
//! playing the server, through the public API only (seed 000 FIG 15B, 19B–22B).

use proptest::prelude::*;
use serde_json::json;
use tether_proto::api::{
    BucketDoc, BucketList, ErrorBody, RegisterResponse, SoftwareUpdate, UpdateOutcome,
    UpdateResponse,
};
use tether_proto::client::{
    ClientBucket, ClientConfig, DeviceClient, Event, Outgoing, Request, Response,
};
use tether_proto::credentials::{assigned_secret, default_credentials, Credentials};
use tether_proto::Fields;

const REGISTER_URL: &str = "https://register.test";
const OTHER_TIER_URL: &str = "https://register.beta.test";
const SYNC_URL: &str = "https://sync-3.test";
const DEV: &str = "device.01AA02AB";
const SHARED: &str = "shared.01AA02AB";
const INITIAL: u64 = 1_000;
const MAX: u64 = 30_000;
const AUTH_MAX: u64 = 600_000;
const SERIAL: &str = "01AA02AB";
const MFG_KEY: [u8; 64] = [7; 64];
/// This run's op-id nonce.
const NONCE: u64 = 0x0807_0605_0403_0201;

/// The n-th op id a client with [`NONCE`] issues.
fn op(n: u64) -> String {
    format!("AQIDBAUGBwg-{n}")
}

fn default_creds() -> Credentials {
    default_credentials(&MFG_KEY, SERIAL, "k1").expect("valid default credentials")
}

/// The n-th assigned set the server issues this device.
fn assigned_n(n: u8) -> Credentials {
    Credentials {
        id: format!("a.{SERIAL}"),
        secret: assigned_secret([n; 16]),
    }
}

fn assigned() -> Credentials {
    assigned_n(1)
}

fn cfg(seed: u64) -> ClientConfig {
    ClientConfig {
        device_id: "01AA02AB".into(),
        device_type: "thermostat".into(),
        sw_version: "1.2.0".into(),
        base_url: REGISTER_URL.into(),
        session: "s1".into(),
        subscribe_timeout_ms: 60_000,
        backoff_initial_ms: INITIAL,
        backoff_max_ms: MAX,
        jitter_seed: seed,
        default_credentials: default_creds(),
        auth_backoff_max_ms: AUTH_MAX,
        op_id_nonce: NONCE,
        max_answer_bytes: 0,
        next_sync_ms: 0,
    }
}

fn fields(v: serde_json::Value) -> Fields {
    match v {
        serde_json::Value::Object(m) => m,
        other => panic!("test fixture must be an object, got {other}"),
    }
}

fn doc(id: &str, timestamp: u64, version: u64, value: serde_json::Value) -> BucketDoc {
    BucketDoc {
        id: id.into(),
        timestamp: Some(timestamp),
        version: Some(version),
        value: Some(fields(value)),
        base_version: None,
        changes: None,
    }
}

/// A bucket answered as a diff from `base`.
fn diff(id: &str, version: u64, base: u64, changes: serde_json::Value) -> BucketDoc {
    BucketDoc {
        id: id.into(),
        timestamp: Some(version * 100),
        version: Some(version),
        value: None,
        base_version: Some(base),
        changes: Some(fields(changes)),
    }
}

fn list(docs: Vec<BucketDoc>) -> Response {
    Response::Buckets(BucketList {
        buckets: docs,
        pending: vec![],
    })
}

fn registered(redirect: Option<&str>, software_update: Option<SoftwareUpdate>) -> Response {
    Response::Registered(RegisterResponse {
        tier: "production".into(),
        redirect: redirect.map(Into::into),
        software_update,
        sync_url: SYNC_URL.into(),
        buckets: vec![DEV.into(), SHARED.into()],
    })
}

fn updated(status: u16, outcome: UpdateOutcome, version: u64, value: Option<Fields>) -> Response {
    Response::Updated {
        status,
        body: UpdateResponse {
            outcome,
            id: DEV.into(),
            timestamp: 1_000 + version,
            version,
            value,
            replayed: false,
            delivery: None,
        },
    }
}

fn replayed(status: u16, outcome: UpdateOutcome, version: u64, value: Option<Fields>) -> Response {
    match updated(status, outcome, version, value) {
        Response::Updated { status, mut body } => {
            body.replayed = true;
            Response::Updated { status, body }
        }
        other => other,
    }
}

fn error(status: u16, code: &str) -> Response {
    Response::Error {
        status,
        body: Some(ErrorBody {
            error: code.into(),
            message: String::new(),
        }),
        retry_after_ms: None,
    }
}

/// The registration server's 200 on first contact: the driver sees the
/// `X-Tether-Set-Credentials` header first and hands the set over at once.
fn register_ok(c: &mut DeviceClient, now: u64, token: u64, offer: Option<SoftwareUpdate>) {
    c.accept_credentials(assigned());
    c.handle_response(now, token, registered(None, offer));
}

fn poll(c: &mut DeviceClient, now: u64) -> Outgoing {
    c.poll_request(now)
        .expect("the client should have a request to send")
}

fn events(c: &mut DeviceClient) -> Vec<Event> {
    std::iter::from_fn(|| c.poll_event()).collect()
}

fn changed(id: &str, version: u64) -> Event {
    Event::BucketChanged {
        id: id.into(),
        version,
    }
}

/// The acknowledgement of the client's `n`-th op id, answered with `version`.
fn acked(outcome: UpdateOutcome, version: u64, n: u64) -> Event {
    Event::ChangeAcked {
        id: DEV.into(),
        outcome,
        op_id: Some(op(n)),
        version,
        replayed: false,
    }
}

/// The (id, version) pairs a subscribe lists.
fn subscribed(out: &Outgoing) -> Vec<(String, Option<u64>)> {
    match &out.request {
        Request::Subscribe(s) => s
            .buckets
            .iter()
            .map(|h| (h.id.clone(), h.version))
            .collect(),
        other => panic!("expected a subscribe, got {other:?}"),
    }
}

fn put_of(out: &Outgoing) -> (&str, &tether_proto::api::UpdateRequest) {
    match &out.request {
        Request::Put { id, body } => (id, body),
        other => panic!("expected a PUT, got {other:?}"),
    }
}

/// Registers and fetches both buckets (DEV {mode: heat, t: 20} v1, SHARED {} v1);
/// returns the client with its first subscribe in flight and that subscribe's token.
fn synced_client(seed: u64) -> (DeviceClient, u64) {
    let mut c = DeviceClient::new(cfg(seed));
    let reg = poll(&mut c, 0);
    register_ok(&mut c, 0, reg.token, None);
    let fetch = poll(&mut c, 0);
    c.handle_response(
        0,
        fetch.token,
        list(vec![
            doc(DEV, 100, 1, json!({"mode": "heat", "t": 20})),
            doc(SHARED, 100, 1, json!({})),
        ]),
    );
    let sub = poll(&mut c, 0);
    assert!(matches!(sub.request, Request::Subscribe(_)));
    events(&mut c);
    (c, sub.token)
}

#[test]
fn fig15b_to_22b_register_redirect_fetch_subscribe_notify_and_put_applied() {
    let mut c = DeviceClient::new(cfg(1));

    // FIG 15B: register at the configured registration server.
    assert_eq!(c.base_url(), REGISTER_URL);
    let reg = poll(&mut c, 0);
    let Request::Register(r) = &reg.request else {
        panic!("expected register, got {reg:?}")
    };
    assert_eq!(
        (&*r.device_id, &*r.device_type, &*r.sw_version),
        ("01AA02AB", "thermostat", "1.2.0")
    );
    assert_eq!(
        (reg.request.method(), &*reg.request.path()),
        ("POST", "/v1/register")
    );
    assert_eq!(
        c.poll_request(0),
        None,
        "one sync request at a time, no PUT yet"
    );

    // The device belongs to another tier: register again there.
    c.handle_response(0, reg.token, registered(Some(OTHER_TIER_URL), None));
    assert_eq!(
        events(&mut c),
        [Event::Redirected {
            url: OTHER_TIER_URL.into()
        }]
    );
    assert_eq!(c.base_url(), OTHER_TIER_URL);
    let reg = poll(&mut c, 0);
    assert!(matches!(reg.request, Request::Register(_)));

    // Registered, with a firmware offer: the sync server takes over; fetch everything.
    let offer = SoftwareUpdate {
        version: "1.3.0".into(),
        url: "https://fw.test/1.3.0".into(),
        sha256: None,
        size: None,
        signature: None,
    };
    register_ok(&mut c, 0, reg.token, Some(offer.clone()));
    assert_eq!(
        events(&mut c),
        [
            Event::CredentialsStored {
                id: "a.01AA02AB".into()
            },
            Event::Registered,
            Event::SoftwareUpdate(offer)
        ]
    );
    assert_eq!(c.base_url(), SYNC_URL);
    assert!(!c.is_synced());
    let fetch = poll(&mut c, 0);
    assert_eq!(
        fetch.request,
        Request::Fetch {
            ids: vec![DEV.into(), SHARED.into()]
        }
    );
    assert_eq!(
        (fetch.request.method(), &*fetch.request.path()),
        (
            "GET",
            "/v1/buckets?view=full&ids=device.01AA02AB,shared.01AA02AB"
        )
    );

    // FIG 19B/20: the full buckets arrive.
    c.handle_response(
        0,
        fetch.token,
        list(vec![
            doc(DEV, 100, 1, json!({"mode": "heat", "t": 20})),
            doc(SHARED, 100, 1, json!({})),
        ]),
    );
    assert_eq!(events(&mut c), [changed(DEV, 1), changed(SHARED, 1)]);
    assert!(c.is_synced());

    // FIG 21B: subscribe with every held version, the session and the timeout.
    let sub = poll(&mut c, 0);
    let Request::Subscribe(s) = &sub.request else {
        panic!("expected subscribe, got {sub:?}")
    };
    assert_eq!(s.session.as_deref(), Some("s1"));
    assert_eq!(s.timeout_ms, Some(60_000));
    assert_eq!(s.buckets[0].timestamp, Some(100));
    assert_eq!(
        subscribed(&sub),
        [(DEV.into(), Some(1)), (SHARED.into(), Some(1))]
    );

    // A notification: another writer changed the device bucket.
    c.handle_response(
        5,
        sub.token,
        list(vec![doc(DEV, 200, 2, json!({"mode": "cool", "t": 20}))]),
    );
    assert_eq!(events(&mut c), [changed(DEV, 2)]);
    let held = c.bucket(DEV).expect("held");
    assert_eq!((held.version, held.timestamp), (2, 200));
    assert_eq!(held.value, fields(json!({"mode": "cool", "t": 20})));
    let sub = poll(&mut c, 5);
    assert_eq!(
        subscribed(&sub),
        [(DEV.into(), Some(2)), (SHARED.into(), Some(1))]
    );

    // FIG 22A: a local change goes out as a PUT next to the held subscribe.
    c.set_field(DEV, "t", json!(21.5));
    assert!(!c.is_synced());
    let put = poll(&mut c, 6);
    let (id, body) = put_of(&put);
    assert_eq!(id, DEV);
    assert_eq!(body.value, fields(json!({"t": 21.5})));
    assert_eq!((body.base_version, body.occ), (2, false));
    assert_eq!(body.session.as_deref(), Some("s1"));
    assert_eq!(
        body.op_id.as_deref(),
        Some(op(1).as_str()),
        "every PUT carries an op id"
    );
    assert_eq!(
        (put.request.method(), &*put.request.path()),
        ("PUT", "/v1/buckets/device.01AA02AB")
    );
    assert_eq!(c.poll_request(6), None, "one PUT at a time");

    // FIG 22B/25B: applied → merge the sent fields, take the new timestamp/version.
    c.handle_response(7, put.token, updated(200, UpdateOutcome::Applied, 3, None));
    assert_eq!(
        events(&mut c),
        [changed(DEV, 3), acked(UpdateOutcome::Applied, 3, 1)]
    );
    let held = c.bucket(DEV).expect("held");
    assert_eq!((held.version, held.timestamp), (3, 1_003));
    assert_eq!(held.value, fields(json!({"mode": "cool", "t": 21.5})));
    assert!(c.is_synced());
    assert_eq!(c.poll_request(7), None, "the subscribe is still held");
}

#[test]
fn merged_put_replaces_the_whole_bucket_with_the_servers() {
    let (mut c, _sub) = synced_client(1);
    c.set_field(DEV, "t", json!(22));
    let put = poll(&mut c, 1);
    // FIG 25C: based on a stale version, merged with someone else's change of `mode`.
    let merged = fields(json!({"mode": "off", "t": 22}));
    c.handle_response(
        2,
        put.token,
        updated(200, UpdateOutcome::Merged, 4, Some(merged.clone())),
    );
    assert_eq!(
        events(&mut c),
        [changed(DEV, 4), acked(UpdateOutcome::Merged, 4, 1)]
    );
    let held = c.bucket(DEV).expect("held");
    assert_eq!((held.version, &held.value), (4, &merged));
    assert!(c.is_synced());
}

#[test]
fn refused_put_replaces_local_copy_with_server_bucket() {
    let (mut c, _sub) = synced_client(1);
    c.set_field(DEV, "t", json!(25));
    let put = poll(&mut c, 1);
    // FIG 24: the server's copy is newer than the update; it is returned with 409.
    let stored = fields(json!({"mode": "eco", "t": 18}));
    c.handle_response(
        2,
        put.token,
        updated(409, UpdateOutcome::Refused, 5, Some(stored.clone())),
    );
    assert_eq!(
        events(&mut c),
        [changed(DEV, 5), acked(UpdateOutcome::Refused, 5, 1)]
    );
    let held = c.bucket(DEV).expect("held");
    assert_eq!((held.version, &held.value), (5, &stored));
    assert_eq!(c.pending(DEV), None, "the refused change is dropped");
    assert_eq!(c.poll_request(3), None, "and not resent");
    assert!(c.is_synced());
}

#[test]
fn client_errors_drop_the_change_and_report_it_without_backing_off() {
    let (mut c, _sub) = synced_client(1);
    for (status, code) in [(400, "bad_request"), (413, "too_large"), (403, "forbidden")] {
        c.set_field(DEV, "blob", json!("x"));
        let put = poll(&mut c, 1);
        c.handle_response(1, put.token, error(status, code));
        assert_eq!(
            events(&mut c),
            [Event::ChangeRejected {
                id: DEV.into(),
                status
            }]
        );
        assert_eq!(c.pending(DEV), None);
        assert_eq!(c.poll_timeout(), None);
    }
    assert_eq!(c.bucket(DEV).expect("held").version, 1, "nothing applied");
}

#[test]
fn invalid_bucket_id_is_rejected_locally_and_never_sent() {
    let (mut c, _sub) = synced_client(1);
    c.set_field("../admin", "x", json!(1));
    assert_eq!(
        events(&mut c),
        [Event::ChangeRejected {
            id: "../admin".into(),
            status: 400
        }]
    );
    assert_eq!(c.poll_request(1), None);
}

#[test]
fn version_regression_is_reported_and_never_applied() {
    let (mut c, sub) = synced_client(1);
    c.handle_response(1, sub, list(vec![doc(DEV, 300, 7, json!({"t": 7}))]));
    let sub = poll(&mut c, 1).token;
    events(&mut c);

    // The server (after a bad failover, say) answers with an older version.
    c.handle_response(2, sub, list(vec![doc(DEV, 250, 6, json!({"t": 6}))]));
    assert_eq!(
        events(&mut c),
        [Event::VersionRegression {
            id: DEV.into(),
            held: 7,
            received: 6
        }]
    );
    let held = c.bucket(DEV).expect("held");
    assert_eq!((held.version, &held.value), (7, &fields(json!({"t": 7}))));

    // It would answer the same at once, so the client waits before resubscribing, and
    // still claims version 7.
    assert_eq!(c.poll_request(2), None);
    let at = c.poll_timeout().expect("backing off");
    assert!(at > 2);
    let sub = poll(&mut c, at);
    assert_eq!(
        subscribed(&sub),
        [(DEV.into(), Some(7)), (SHARED.into(), Some(1))]
    );
}

#[test]
fn version_regression_in_a_put_answer_is_not_applied() {
    let (mut c, sub) = synced_client(1);
    c.set_field(DEV, "t", json!(30));
    let put = poll(&mut c, 1);
    // The subscribe brings v9 from another writer before the PUT answer (v2) arrives.
    c.handle_response(2, sub, list(vec![doc(DEV, 900, 9, json!({"t": 9}))]));
    c.handle_response(3, put.token, updated(200, UpdateOutcome::Applied, 2, None));
    assert_eq!(
        events(&mut c),
        [changed(DEV, 9), acked(UpdateOutcome::Applied, 2, 1)]
    );
    assert_eq!(c.bucket(DEV).expect("held").version, 9);
}

#[test]
fn empty_subscribe_answer_resubscribes_at_once() {
    let (mut c, sub) = synced_client(1);
    c.handle_response(60_000, sub, list(vec![]));
    assert_eq!(events(&mut c), []);
    let next = poll(&mut c, 60_000);
    assert_eq!(
        subscribed(&next),
        [(DEV.into(), Some(1)), (SHARED.into(), Some(1))]
    );
    assert!(c.is_synced());
}

#[test]
fn own_write_echoed_by_subscribe_does_not_back_off() {
    let (mut c, sub) = synced_client(1);
    c.set_field(DEV, "t", json!(23));
    let put = poll(&mut c, 1);
    c.handle_response(2, put.token, updated(200, UpdateOutcome::Applied, 2, None));
    // Without echo suppression the server sends our own write back: the version we hold.
    c.handle_response(3, sub, list(vec![doc(DEV, 1_002, 2, json!({}))]));
    assert!(c.poll_request(3).is_some(), "resubscribes at once");
    assert!(c.is_synced());
}

#[test]
fn transport_errors_back_off_exponentially_and_retry_the_same_write_with_its_op_id() {
    let (mut c, _sub) = synced_client(42);
    c.set_field(DEV, "t", json!(21));
    c.set_field(DEV, "mode", json!("heat"));
    c.set_field(DEV, "t", json!(22)); // coalesced: the later value wins
    let mut now = 10;
    let put = poll(&mut c, now);
    let first = put_of(&put).1.clone();
    assert_eq!(first.value, fields(json!({"t": 22, "mode": "heat"})));
    assert_eq!(first.op_id, Some(op(1)));

    // A newer local edit while the PUT is in flight.
    c.set_field(DEV, "t", json!(23));
    c.handle_response(now, put.token, Response::Transport);
    // The lost PUT may have been applied: it is kept as it was, the edit waits after it.
    assert_eq!(c.in_doubt(), Some((DEV, &first)));
    assert_eq!(c.pending(DEV), Some(&fields(json!({"t": 23}))));
    assert!(!c.is_synced());

    // Keep failing (transport, then 5xx): the wait doubles from INITIAL and caps at MAX,
    // jitter shortening it by at most a quarter; every retry is the same write.
    let mut delays = Vec::new();
    let mut fail_next_with = error(503, "unavailable");
    for attempt in 0..10u32 {
        let at = c.poll_timeout().expect("backing off");
        let delay = at - now;
        let base = (INITIAL << attempt).min(MAX);
        assert!(
            delay <= base && delay >= base - base / 4,
            "attempt {attempt}: {delay} outside [¾·{base}, {base}]"
        );
        assert_eq!(
            c.poll_request(at - 1),
            None,
            "nothing before the back-off ends"
        );
        delays.push(delay);
        now = at;
        let put = poll(&mut c, now);
        let (_, body) = put_of(&put);
        assert_eq!(
            body, &first,
            "attempt {attempt}: resent verbatim, same op id"
        );
        c.handle_response(now, put.token, fail_next_with.clone());
        fail_next_with = Response::Transport;
    }
    assert!(
        delays.windows(2).take(4).all(|w| w[1] > w[0]),
        "grows: {delays:?}"
    );
    assert!(delays.iter().all(|&d| d <= MAX), "caps: {delays:?}");
    assert!(delays[6..].iter().all(|&d| d >= MAX - MAX / 4));

    // The server had applied the first attempt: it answers the retry with the original
    // outcome (replayed). A success resets the back-off.
    now = c.poll_timeout().expect("backing off");
    let put = poll(&mut c, now);
    c.handle_response(
        now,
        put.token,
        replayed(200, UpdateOutcome::Applied, 2, None),
    );
    assert_eq!(
        events(&mut c),
        [
            changed(DEV, 2),
            Event::ChangeAcked {
                id: DEV.into(),
                outcome: UpdateOutcome::Applied,
                op_id: Some(op(1)),
                version: 2,
                replayed: true,
            }
        ]
    );
    assert_eq!(c.in_doubt(), None);
    assert_eq!(
        c.bucket(DEV).expect("held").value,
        fields(json!({"mode": "heat", "t": 22}))
    );
    // Then the newer edit goes, as a new write on top of what the server confirmed.
    let next = poll(&mut c, now);
    let (_, body) = put_of(&next);
    assert_eq!(body.value, fields(json!({"t": 23})));
    assert_eq!((body.base_version, body.op_id.clone()), (2, Some(op(2))));
    c.handle_response(now, next.token, Response::Transport);
    let delay = c.poll_timeout().expect("backing off") - now;
    assert!(
        (INITIAL - INITIAL / 4..=INITIAL).contains(&delay),
        "{delay}"
    );
}

#[test]
fn every_write_gets_a_fresh_op_id_unique_to_this_run() {
    let (mut c, _sub) = synced_client(1);
    let mut seen = std::collections::BTreeSet::new();
    for i in 0..5 {
        c.set_field(DEV, "t", json!(i));
        let put = poll(&mut c, i);
        let op_id = put_of(&put).1.op_id.clone().expect("op id");
        assert!(
            op_id.len() <= 64
                && op_id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'),
            "{op_id}"
        );
        assert!(seen.insert(op_id), "fresh for every distinct write");
        c.handle_response(
            i,
            put.token,
            updated(200, UpdateOutcome::Applied, 2 + i, None),
        );
    }
    // Another run of the same device (another nonce, as after a reboot) never repeats one.
    let mut other = DeviceClient::new(ClientConfig {
        op_id_nonce: NONCE + 1,
        ..cfg(1)
    });
    let reg = poll(&mut other, 0);
    register_ok(&mut other, 0, reg.token, None);
    let fetch = poll(&mut other, 0);
    other.handle_response(
        0,
        fetch.token,
        list(vec![
            doc(DEV, 1, 1, json!({})),
            doc(SHARED, 1, 1, json!({})),
        ]),
    );
    poll(&mut other, 0);
    other.set_field(DEV, "t", json!(0));
    let put = poll(&mut other, 0);
    assert!(!seen.contains(put_of(&put).1.op_id.as_deref().expect("op id")));
}

#[test]
fn backoff_jitter_is_deterministic_per_seed() {
    fn delays(seed: u64) -> Vec<u64> {
        let mut c = DeviceClient::new(cfg(seed));
        let mut now = 0;
        let mut out = Vec::new();
        for _ in 0..8 {
            let reg = poll(&mut c, now);
            c.handle_response(now, reg.token, Response::Transport);
            let at = c.poll_timeout().expect("backing off");
            out.push(at - now);
            now = at;
        }
        out
    }
    assert_eq!(delays(7), delays(7));
    assert_ne!(delays(7), delays(8));
}

#[test]
fn register_failures_back_off_and_retry_registration() {
    let mut c = DeviceClient::new(cfg(1));
    for (i, resp) in [
        Response::Transport,
        error(401, "unauthorized"),
        error(429, "rate_limited"),
        error(500, "internal"),
    ]
    .into_iter()
    .enumerate()
    {
        let now = c.poll_timeout().unwrap_or(0);
        let reg = poll(&mut c, now);
        assert!(matches!(reg.request, Request::Register(_)), "attempt {i}");
        c.handle_response(now, reg.token, resp);
        assert_eq!(c.base_url(), REGISTER_URL);
        assert!(c.poll_timeout().expect("backing off") > now);
    }
    assert_eq!(events(&mut c), [Event::DefaultCredentialsRejected]);
}

#[test]
fn link_down_ignores_stale_answers_and_resubscribes_with_held_versions() {
    let (mut c, sub) = synced_client(3);
    c.handle_response(
        1,
        sub,
        list(vec![doc(SHARED, 400, 4, json!({"away": true}))]),
    );
    let sub = poll(&mut c, 1);
    c.set_field(DEV, "t", json!(19));
    let put = poll(&mut c, 2);
    events(&mut c);

    c.link_down(3);
    // Answers to the lost requests arrive late (or from a half-dead connection): ignored.
    c.handle_response(
        4,
        sub.token,
        list(vec![doc(DEV, 999, 99, json!({"stale": 1}))]),
    );
    c.handle_response(4, put.token, updated(200, UpdateOutcome::Applied, 50, None));
    c.handle_response(4, 12_345, Response::Transport);
    assert_eq!(events(&mut c), []);
    assert_eq!(c.bucket(DEV).expect("held").version, 1);
    let lost = put_of(&put).1.clone();
    assert_eq!(
        c.in_doubt(),
        Some((DEV, &lost)),
        "the lost PUT may have been applied"
    );
    assert_eq!(c.pending(DEV), None);

    // Back off, then resubscribe with the versions held and resend the change.
    // Both slots back off, each with its own jitter.
    assert_eq!(c.poll_request(4), None);
    let (mut resub, mut reput) = (None, None);
    while resub.is_none() || reput.is_none() {
        let at = c.poll_timeout().expect("backing off");
        assert!((3 + INITIAL - INITIAL / 4..=3 + INITIAL).contains(&at));
        while let Some(out) = c.poll_request(at) {
            match out.request {
                Request::Subscribe(_) => resub = Some(out),
                Request::Put { .. } => reput = Some(out),
                _ => panic!("unexpected {out:?}"),
            }
        }
    }
    let (resub, reput) = (resub.expect("resubscribed"), reput.expect("resent"));
    assert_eq!(
        subscribed(&resub),
        [(DEV.into(), Some(1)), (SHARED.into(), Some(4))]
    );
    assert_eq!(put_of(&reput).1, &lost, "resent verbatim: same op id");
    assert_ne!(
        (resub.token, reput.token),
        (sub.token, put.token),
        "tokens are never reused"
    );
}

#[test]
fn restored_device_skips_fetch_and_subscribes_with_its_versions() {
    let (persisted, creds) = {
        let (mut c, sub) = synced_client(1);
        c.handle_response(1, sub, list(vec![doc(DEV, 700, 7, json!({"t": 17}))]));
        let creds = c.assigned_credentials().expect("assigned").clone();
        (c.snapshot(), creds)
    };
    let mut c = DeviceClient::new(cfg(1));
    c.restore(persisted);
    c.restore_credentials(creds);
    let reg = poll(&mut c, 0);
    // The device returns with its persisted assigned set, not its default set.
    assert_eq!(reg.auth, assigned());
    // The server may repeat the set it holds; the same set again is no news.
    register_ok(&mut c, 0, reg.token, None);
    assert_eq!(events(&mut c), [Event::Registered]);
    assert!(c.is_synced());
    let sub = poll(&mut c, 0);
    assert_eq!(
        subscribed(&sub),
        [(DEV.into(), Some(7)), (SHARED.into(), Some(1))]
    );
    let Request::Subscribe(s) = &sub.request else {
        unreachable!()
    };
    assert_eq!(s.buckets[0].timestamp, Some(700));
    assert_eq!(c.bucket(DEV).expect("held").value, fields(json!({"t": 17})));
}

#[test]
fn restored_device_missing_a_bucket_fetches_them_all() {
    let mut c = DeviceClient::new(cfg(1));
    c.restore([ClientBucket {
        id: DEV.into(),
        timestamp: 700,
        version: 7,
        value: Fields::new(),
    }]);
    let reg = poll(&mut c, 0);
    register_ok(&mut c, 0, reg.token, None);
    let fetch = poll(&mut c, 0);
    assert!(matches!(fetch.request, Request::Fetch { .. }));
    // The fetch's older copy of the restored bucket does not replace it.
    c.handle_response(
        0,
        fetch.token,
        list(vec![
            doc(DEV, 600, 6, json!({})),
            doc(SHARED, 100, 1, json!({})),
        ]),
    );
    assert_eq!(c.bucket(DEV).expect("held").version, 7);
    assert_eq!(c.bucket(SHARED).expect("held").version, 1);
}

#[test]
fn not_found_on_subscribe_registers_again_after_backing_off() {
    let (mut c, sub) = synced_client(1);
    c.handle_response(10, sub, error(404, "not_found"));
    assert_eq!(c.base_url(), REGISTER_URL);
    assert_eq!(c.poll_request(10), None);
    let at = c.poll_timeout().expect("backing off");
    let reg = poll(&mut c, at);
    assert!(matches!(reg.request, Request::Register(_)));
    register_ok(&mut c, at, reg.token, None);
    // Versions are still held, so it subscribes straight away.
    assert!(matches!(poll(&mut c, at).request, Request::Subscribe(_)));
}

#[test]
fn not_found_on_fetch_registers_again() {
    let mut c = DeviceClient::new(cfg(1));
    let reg = poll(&mut c, 0);
    register_ok(&mut c, 0, reg.token, None);
    let fetch = poll(&mut c, 0);
    c.handle_response(0, fetch.token, error(404, "not_found"));
    let at = c.poll_timeout().expect("backing off");
    assert!(matches!(poll(&mut c, at).request, Request::Register(_)));
}

#[test]
fn puts_wait_for_registration_and_fetch() {
    let mut c = DeviceClient::new(cfg(1));
    c.set_field(DEV, "t", json!(20));
    let reg = poll(&mut c, 0);
    assert_eq!(c.poll_request(0), None);
    register_ok(&mut c, 0, reg.token, None);
    let fetch = poll(&mut c, 0);
    assert_eq!(c.poll_request(0), None);
    c.handle_response(0, fetch.token, list(vec![doc(DEV, 100, 3, json!({}))]));
    assert!(matches!(poll(&mut c, 0).request, Request::Subscribe(_)));
    let put = poll(&mut c, 0);
    assert_eq!(put_of(&put).1.base_version, 3);
}

#[test]
fn put_to_a_bucket_never_seen_is_based_on_version_zero() {
    let mut c = DeviceClient::new(cfg(1));
    let reg = poll(&mut c, 0);
    register_ok(&mut c, 0, reg.token, None);
    let fetch = poll(&mut c, 0);
    c.handle_response(0, fetch.token, list(vec![doc(DEV, 100, 3, json!({}))]));
    let _sub = poll(&mut c, 0);
    c.set_field(SHARED, "x", json!(1));
    assert_eq!(put_of(&poll(&mut c, 0)).1.base_version, 0);
}

#[test]
fn puts_serve_buckets_round_robin() {
    let (mut c, _sub) = synced_client(1);
    let mut order = Vec::new();
    c.set_field(DEV, "t", json!(1));
    c.set_field(SHARED, "x", json!(1));
    for v in 2..6 {
        let put = poll(&mut c, 0);
        let id = put_of(&put).0.to_string();
        // The application keeps editing both buckets faster than a round trip.
        c.set_field(DEV, "t", json!(v));
        c.set_field(SHARED, "x", json!(v));
        c.handle_response(0, put.token, updated(200, UpdateOutcome::Applied, v, None));
        order.push(id);
    }
    assert_eq!(order, [DEV, SHARED, DEV, SHARED]);
}

#[test]
fn endless_redirects_back_off() {
    let mut c = DeviceClient::new(cfg(1));
    let mut now = 0;
    for i in 0..8 {
        let reg = poll(&mut c, now);
        c.handle_response(now, reg.token, registered(Some(OTHER_TIER_URL), None));
        match c.poll_timeout() {
            None => assert!(i < 4, "redirect {i} followed at once"),
            Some(at) => {
                assert!(i >= 4, "redirect {i} should be followed at once");
                now = at;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// credentials (seed 000 FIG 28B, 29B, 30B; API.md "Credentials")

fn unauthorized() -> Response {
    error(401, "unauthorized")
}

fn retry_after(status: u16, ms: u64) -> Response {
    Response::Error {
        status,
        body: None,
        retry_after_ms: Some(ms),
    }
}

fn stored(id: &str) -> Event {
    Event::CredentialsStored { id: id.into() }
}

#[test]
fn first_contact_uses_default_credentials_then_the_assigned_set_exclusively() {
    let mut c = DeviceClient::new(cfg(1));
    assert_eq!(c.assigned_credentials(), None);
    let reg = poll(&mut c, 0);
    assert!(matches!(reg.request, Request::Register(_)));
    assert_eq!(
        reg.auth,
        default_creds(),
        "first contact: default credentials"
    );
    assert_eq!(reg.auth.id, "d.01AA02AB.k1");

    // The answer's X-Tether-Set-Credentials header, then its body.
    register_ok(&mut c, 0, reg.token, None);
    assert_eq!(c.assigned_credentials(), Some(&assigned()));
    assert_eq!(events(&mut c), [stored("a.01AA02AB"), Event::Registered]);

    let fetch = poll(&mut c, 0);
    assert_eq!(fetch.auth, assigned());
    c.handle_response(0, fetch.token, list(vec![doc(DEV, 1, 1, json!({}))]));
    let sub = poll(&mut c, 0);
    assert_eq!(sub.auth, assigned());
    c.set_field(DEV, "t", json!(1));
    let put = poll(&mut c, 0);
    assert_eq!(put.auth, assigned());

    // Registering again (the server lost the buckets) also uses the assigned set.
    c.handle_response(1, sub.token, error(404, "not_found"));
    let at = c.poll_timeout().expect("backing off");
    let reg = poll(&mut c, at);
    assert!(matches!(reg.request, Request::Register(_)));
    assert_eq!(reg.auth, assigned());
}

#[test]
fn registration_without_credentials_backs_off_and_registers_again() {
    let mut c = DeviceClient::new(cfg(1));
    let reg = poll(&mut c, 0);
    // A server that answered 200 but never sent X-Tether-Set-Credentials (FIG 28B 1820).
    c.handle_response(0, reg.token, registered(None, None));
    assert_eq!(events(&mut c), [Event::CredentialsMissing]);
    assert_eq!(c.base_url(), REGISTER_URL);
    assert_eq!(c.poll_request(0), None);
    let at = c.poll_timeout().expect("backing off");
    let reg = poll(&mut c, at);
    assert!(matches!(reg.request, Request::Register(_)));
    assert_eq!(reg.auth, default_creds());
}

#[test]
fn held_subscribe_delivering_new_credentials_switches_the_next_request_at_once() {
    let (mut c, sub) = synced_client(1);
    // FIG 29A/29B: rotation. The held subscribe's headers carry a new set long before its
    // body; the driver hands it over at once.
    c.accept_credentials(assigned_n(2));
    assert_eq!(events(&mut c), [stored("a.01AA02AB")]);
    assert_eq!(c.assigned_credentials(), Some(&assigned_n(2)));

    // A PUT made while the subscribe is still held already uses it.
    c.set_field(DEV, "t", json!(5));
    let put = poll(&mut c, 1);
    assert_eq!(put.auth, assigned_n(2));
    c.handle_response(1, put.token, updated(200, UpdateOutcome::Applied, 2, None));

    // And so does the next subscribe, once the held one answers.
    c.handle_response(2, sub, list(vec![]));
    let sub = poll(&mut c, 2);
    assert!(matches!(sub.request, Request::Subscribe(_)));
    assert_eq!(sub.auth, assigned_n(2));

    // The server repeating the set during the grace period is no news.
    c.accept_credentials(assigned_n(2));
    assert!(!events(&mut c)
        .iter()
        .any(|e| matches!(e, Event::CredentialsStored { .. })));
}

#[test]
fn stale_401_for_an_old_set_does_not_drop_the_newer_set() {
    let (mut c, sub) = synced_client(1);
    c.set_field(DEV, "t", json!(7));
    let put = poll(&mut c, 1);
    assert_eq!(put.auth, assigned_n(1));
    // A newer set arrives (on the subscribe's headers) while the PUT is in flight …
    c.accept_credentials(assigned_n(2));
    events(&mut c);
    // … and then the PUT, which carried the old set, comes back 401 (grace period over).
    c.handle_response(2, put.token, unauthorized());
    assert_eq!(events(&mut c), [], "nothing dropped");
    assert_eq!(c.assigned_credentials(), Some(&assigned_n(2)));
    assert_eq!(c.base_url(), SYNC_URL, "still registered");
    // The change is kept and resent at once with the new set.
    let put = poll(&mut c, 2);
    assert_eq!(put.auth, assigned_n(2));
    assert_eq!(put_of(&put).1.value, fields(json!({"t": 7})));

    // The held subscribe (old set) also ends in a 401: resubscribe at once, new set.
    c.handle_response(3, sub, unauthorized());
    assert_eq!(c.assigned_credentials(), Some(&assigned_n(2)));
    let sub = poll(&mut c, 3);
    assert!(matches!(sub.request, Request::Subscribe(_)));
    assert_eq!(sub.auth, assigned_n(2));
    assert!(!c.is_synced(), "the PUT is still in flight");
}

#[test]
fn a_401_on_the_stored_assigned_set_drops_it_and_registers_again_with_default() {
    let (mut c, sub) = synced_client(1);
    c.set_field(DEV, "t", json!(9));
    // FIG 30A/30B: the sync server rejects the assigned set.
    c.handle_response(5, sub, unauthorized());
    assert_eq!(
        events(&mut c),
        [Event::CredentialsDropped {
            id: "a.01AA02AB".into()
        }]
    );
    assert_eq!(c.assigned_credentials(), None);
    assert_eq!(c.base_url(), REGISTER_URL);
    // Nothing goes out with a dropped set, or with the default set except a register.
    assert_eq!(c.poll_request(5), None);
    let at = c
        .poll_timeout()
        .expect("backing off before registering again");
    assert!((5 + INITIAL - INITIAL / 4..=5 + INITIAL).contains(&at));
    let reg = poll(&mut c, at);
    assert!(matches!(reg.request, Request::Register(_)));
    assert_eq!(reg.auth, default_creds());
    assert_eq!(c.poll_request(at), None, "no PUT before registration");

    // The lost-credentials case: the server issues a new set.
    c.accept_credentials(assigned_n(3));
    c.handle_response(at, reg.token, registered(None, None));
    assert_eq!(events(&mut c), [stored("a.01AA02AB"), Event::Registered]);
    // Buckets are still held: subscribe at once; the kept change goes out too.
    let sub = poll(&mut c, at);
    assert!(matches!(sub.request, Request::Subscribe(_)));
    assert_eq!(sub.auth, assigned_n(3));
    let put = poll(&mut c, at);
    assert_eq!(put.auth, assigned_n(3));
    assert_eq!(put_of(&put).1.value, fields(json!({"t": 9})));
}

#[test]
fn a_401_on_a_put_drops_the_set_abandons_the_held_subscribe_and_keeps_the_change() {
    let (mut c, sub) = synced_client(1);
    c.set_field(DEV, "t", json!(11));
    let put = poll(&mut c, 1);
    c.handle_response(2, put.token, unauthorized());
    assert_eq!(
        events(&mut c),
        [Event::CredentialsDropped {
            id: "a.01AA02AB".into()
        }]
    );
    assert_eq!(
        c.in_doubt().map(|(id, b)| (id, b.value.clone())),
        Some((DEV, fields(json!({"t": 11})))),
        "kept, to be resent as it was once registered again"
    );
    // The subscribe held with the rejected set is abandoned: its late answer is ignored.
    c.handle_response(3, sub, list(vec![doc(DEV, 900, 9, json!({}))]));
    assert_eq!(events(&mut c), []);
    assert_eq!(c.bucket(DEV).expect("held").version, 1);
    let at = c.poll_timeout().expect("backing off");
    let reg = poll(&mut c, at);
    assert_eq!(reg.auth, default_creds());
}

#[test]
fn a_401_on_default_credentials_backs_off_growing_to_the_cap() {
    let mut c = DeviceClient::new(cfg(5));
    let mut now = 0;
    let mut delays = Vec::new();
    for attempt in 0..14u32 {
        let reg = poll(&mut c, now);
        assert!(matches!(reg.request, Request::Register(_)));
        assert_eq!(reg.auth, default_creds());
        c.handle_response(now, reg.token, unauthorized());
        assert_eq!(events(&mut c), [Event::DefaultCredentialsRejected]);
        let at = c.poll_timeout().expect("backing off");
        let delay = at - now;
        let base = INITIAL.saturating_mul(1 << attempt).min(AUTH_MAX);
        assert!(
            delay <= base && delay >= base - base / 4,
            "attempt {attempt}: {delay} outside [¾·{base}, {base}]"
        );
        assert_eq!(c.poll_request(at - 1), None, "nothing before the wait ends");
        delays.push(delay);
        now = at;
    }
    assert!(
        delays.windows(2).take(8).all(|w| w[1] > w[0]),
        "grows: {delays:?}"
    );
    assert!(delays.iter().all(|&d| d <= AUTH_MAX), "caps: {delays:?}");
    assert!(
        delays[11..].iter().all(|&d| d >= AUTH_MAX - AUTH_MAX / 4),
        "reaches the cap, beyond the transport cap: {delays:?}"
    );

    // Accepted at last: the wait resets, so a later rejection starts from INITIAL again.
    let reg = poll(&mut c, now);
    register_ok(&mut c, now, reg.token, None);
    let fetch = poll(&mut c, now);
    c.handle_response(now, fetch.token, error(404, "not_found"));
    let at = c.poll_timeout().expect("backing off");
    let reg = poll(&mut c, at);
    c.handle_response(at, reg.token, unauthorized()); // the assigned set: dropped
    now = c.poll_timeout().expect("backing off");
    let reg = poll(&mut c, now);
    assert_eq!(reg.auth, default_creds());
    c.handle_response(now, reg.token, unauthorized());
    let delay = c.poll_timeout().expect("backing off") - now;
    assert!(
        (INITIAL - INITIAL / 4..=INITIAL).contains(&delay),
        "{delay}"
    );
}

#[test]
fn retry_after_is_honoured_and_capped() {
    let mut c = DeviceClient::new(cfg(1));
    // The per-device registration rate limit (API.md: 429 with Retry-After).
    let reg = poll(&mut c, 0);
    c.handle_response(0, reg.token, retry_after(429, 120_000));
    assert_eq!(c.poll_timeout(), Some(120_000));
    assert_eq!(c.poll_request(119_999), None);
    let reg = poll(&mut c, 120_000);
    // A server asking for a day waits no longer than the configured maximum.
    c.handle_response(120_000, reg.token, retry_after(429, 86_400_000));
    assert_eq!(c.poll_timeout(), Some(120_000 + AUTH_MAX));
    // A Retry-After shorter than the back-off does not shorten it.
    let now = 120_000 + AUTH_MAX;
    let reg = poll(&mut c, now);
    c.handle_response(now, reg.token, retry_after(503, 1));
    assert!(c.poll_timeout().expect("backing off") > now + 1);

    // PUTs too.
    let (mut c, _sub) = synced_client(1);
    c.set_field(DEV, "t", json!(1));
    let put = poll(&mut c, 10);
    c.handle_response(10, put.token, retry_after(429, 45_000));
    assert_eq!(c.poll_timeout(), Some(45_010));
    let sent = put_of(&put).1.clone();
    assert_eq!(c.in_doubt(), Some((DEV, &sent)));
    let again = poll(&mut c, 45_010);
    assert_eq!(put_of(&again).1, &sent, "the same write, same op id");
}

#[test]
fn factory_reset_keeps_default_credentials_and_starts_over_as_first_contact() {
    let (mut c, sub) = synced_client(1);
    c.set_field(DEV, "t", json!(3));
    let put = poll(&mut c, 1);
    c.set_field(SHARED, "x", json!(1));
    c.factory_reset();
    assert_eq!(c.assigned_credentials(), None);
    assert_eq!(c.bucket(DEV), None);
    assert_eq!(c.pending(SHARED), None);
    assert_eq!(c.base_url(), REGISTER_URL);
    // Answers to requests from before the reset are ignored.
    c.handle_response(2, sub, list(vec![doc(DEV, 5, 5, json!({}))]));
    c.handle_response(2, put.token, updated(200, UpdateOutcome::Applied, 2, None));
    assert_eq!(events(&mut c), []);
    assert_eq!(c.bucket(DEV), None);

    // Initial contact again, with the default credentials that were never forgotten.
    let reg = poll(&mut c, 2);
    assert!(matches!(reg.request, Request::Register(_)));
    assert_eq!(reg.auth, default_creds());
    assert_eq!(c.poll_request(2), None);
    register_ok(&mut c, 2, reg.token, None);
    assert!(matches!(poll(&mut c, 2).request, Request::Fetch { .. }));
}

#[test]
fn only_this_devices_assigned_sets_are_accepted() {
    let (mut c, _sub) = synced_client(1);
    let offers = [
        Credentials {
            id: "a.OTHER".into(),
            secret: assigned_secret([9; 16]),
        },
        Credentials {
            id: "u.alice".into(),
            secret: "u.AAECAwQFBgcICQoLDA0ODw".into(),
        },
        default_creds(),
        Credentials {
            id: "a.01AA02AB".into(),
            secret: "not-a-secret".into(),
        },
        Credentials {
            id: "a.01AA02AB.x".into(),
            secret: assigned_secret([9; 16]),
        },
    ];
    for offer in offers {
        let id = offer.id.clone();
        c.accept_credentials(offer.clone());
        assert_eq!(
            events(&mut c),
            [Event::CredentialsIgnored { id: id.clone() }]
        );
        c.restore_credentials(offer);
        assert_eq!(events(&mut c), [Event::CredentialsIgnored { id }]);
        assert_eq!(c.assigned_credentials(), Some(&assigned()));
    }
}

#[test]
fn pairing_code_is_requested_once_registered_and_reported() {
    let mut c = DeviceClient::new(cfg(1));
    c.request_pairing_code();
    let reg = poll(&mut c, 0);
    assert_eq!(
        c.poll_request(0),
        None,
        "no pairing code before registration"
    );
    register_ok(&mut c, 0, reg.token, None);
    let fetch = poll(&mut c, 0);
    assert!(matches!(fetch.request, Request::Fetch { .. }));
    let pc = poll(&mut c, 0);
    assert_eq!(pc.request, Request::PairingCode);
    assert_eq!(
        (pc.request.method(), &*pc.request.path()),
        ("POST", "/v1/pairing-code")
    );
    assert_eq!(pc.auth, assigned());
    assert_eq!(c.base_url(), SYNC_URL);
    events(&mut c);

    // Lost on the way: retried after a back-off.
    c.handle_response(1, pc.token, Response::Transport);
    assert_eq!(c.poll_request(1), None);
    let at = c.poll_timeout().expect("backing off");
    let pc = poll(&mut c, at);
    assert_eq!(pc.request, Request::PairingCode);
    c.request_pairing_code(); // asking again while one is pending asks once
    assert_eq!(c.poll_request(at), None);
    c.handle_response(
        at,
        pc.token,
        Response::PairingCode {
            code: "7Q4K-92XD".into(),
            expires_in_s: 600,
        },
    );
    assert_eq!(
        events(&mut c),
        [Event::PairingCode {
            code: "7Q4K-92XD".into(),
            expires_in_s: 600
        }]
    );
    assert_eq!(c.poll_request(at), None, "one code per request");

    // Refused outright: reported, not retried.
    c.request_pairing_code();
    let pc = poll(&mut c, at);
    c.handle_response(at, pc.token, error(403, "forbidden"));
    assert_eq!(events(&mut c), [Event::PairingFailed { status: 403 }]);
    assert_eq!(c.poll_request(at), None);
    assert_eq!(c.poll_timeout(), None);
}

#[test]
fn pairing_code_request_survives_a_rotation_and_a_drop() {
    let (mut c, _sub) = synced_client(1);
    c.request_pairing_code();
    let pc = poll(&mut c, 1);
    assert_eq!(pc.auth, assigned_n(1));
    // Rotated meanwhile; the old set's 401 is stale: resent at once with the new set.
    c.accept_credentials(assigned_n(2));
    c.handle_response(1, pc.token, unauthorized());
    let pc = poll(&mut c, 1);
    assert_eq!(
        (pc.request.clone(), pc.auth.clone()),
        (Request::PairingCode, assigned_n(2))
    );
    // Now the current set is rejected: dropped; the code is asked for after re-registering.
    c.handle_response(1, pc.token, unauthorized());
    assert_eq!(c.assigned_credentials(), None);
    let at = c.poll_timeout().expect("backing off");
    let reg = poll(&mut c, at);
    assert_eq!(c.poll_request(at), None);
    c.accept_credentials(assigned_n(3));
    c.handle_response(at, reg.token, registered(None, None));
    let mut requests = Vec::new();
    while let Some(out) = c.poll_request(at) {
        requests.push((out.request, out.auth));
    }
    assert!(
        requests.contains(&(Request::PairingCode, assigned_n(3))),
        "{requests:?}"
    );
}

#[test]
fn debug_output_of_the_client_never_shows_a_secret() {
    let (mut c, _sub) = synced_client(1);
    c.set_field(DEV, "t", json!(1));
    let put = poll(&mut c, 1);
    let shown = format!("{c:?} {put:?} {:?}", cfg(1));
    assert!(!shown.contains(&assigned().secret), "{shown}");
    assert!(!shown.contains(&default_creds().secret), "{shown}");
}

// ---------------------------------------------------------------------------------------
// law: a held version never decreases

#[derive(Debug, Clone)]
enum Step {
    /// Answer the subscribe in flight with these (bucket index, version) pairs.
    Notify(Vec<(usize, u64)>),
    /// Answer the subscribe in flight with a stale token.
    StaleAnswer(usize, u64),
    /// Make a local change, and answer its PUT with this outcome and version.
    Put(u8, u64),
    LinkDown,
    EmptyAnswer,
}

fn arb_step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => proptest::collection::vec((0usize..2, 1u64..20), 0..4).prop_map(Step::Notify),
        1 => (0usize..2, 1u64..20).prop_map(|(b, v)| Step::StaleAnswer(b, v)),
        2 => (0u8..3, 1u64..20).prop_map(|(o, v)| Step::Put(o, v)),
        1 => Just(Step::LinkDown),
        1 => Just(Step::EmptyAnswer),
    ]
}

proptest! {
    #[test]
    fn held_versions_never_decrease(steps in proptest::collection::vec(arb_step(), 1..40)) {
        let ids = [DEV, SHARED];
        let (mut c, first) = synced_client(9);
        let mut sub = Some(first);
        let mut now = 0u64;
        let mut old_tokens = vec![];
        for step in steps {
            let before: Vec<u64> = ids.iter().map(|id| c.bucket(id).map_or(0, |b| b.version)).collect();
            // Let any back-off run out, then send what the client wants to send.
            now = now.max(c.poll_timeout().unwrap_or(now)) + 1;
            let mut put = None;
            while let Some(out) = c.poll_request(now) {
                prop_assert_eq!(Some(&out.auth), c.assigned_credentials());
                match out.request {
                    Request::Subscribe(_) => sub = Some(out.token),
                    Request::Put { .. } => put = Some(out.token),
                    other => prop_assert!(false, "unexpected {:?}", other),
                }
            }
            match step {
                Step::Notify(pairs) => if let Some(t) = sub.take() {
                    let docs = pairs.iter().map(|&(b, v)| doc(ids[b], v * 10, v, json!({"v": v}))).collect();
                    c.handle_response(now, t, list(docs));
                    old_tokens.push(t);
                },
                Step::StaleAnswer(b, v) => if let Some(&t) = old_tokens.last() {
                    c.handle_response(now, t, list(vec![doc(ids[b], v * 10, v, json!({}))]));
                },
                Step::Put(o, v) => {
                    c.set_field(DEV, "f", json!(v));
                    let t = put.or_else(|| c.poll_request(now).map(|o| o.token));
                    if let Some(t) = t {
                        let outcome = [UpdateOutcome::Applied, UpdateOutcome::Merged, UpdateOutcome::Refused][usize::from(o)];
                        let value = (outcome != UpdateOutcome::Applied).then(|| fields(json!({"f": v})));
                        c.handle_response(now, t, updated(200, outcome, v, value));
                        old_tokens.push(t);
                    }
                },
                Step::LinkDown => {
                    c.link_down(now);
                    old_tokens.extend(sub.take());
                },
                Step::EmptyAnswer => if let Some(t) = sub.take() {
                    c.handle_response(now, t, list(vec![]));
                },
            }
            for (i, id) in ids.iter().enumerate() {
                let after = c.bucket(id).map_or(0, |b| b.version);
                prop_assert!(after >= before[i], "{} went from {} to {}", id, before[i], after);
            }
            for ev in std::iter::from_fn(|| c.poll_event()) {
                if let Event::VersionRegression { held, received, .. } = ev {
                    prop_assert!(received < held);
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// diffs, max_bytes, op-id retries against a model server

#[test]
fn subscribes_ask_for_diffs_within_the_buffer_and_apply_them_to_the_held_copy() {
    let mut c = DeviceClient::new(ClientConfig {
        max_answer_bytes: 1_536,
        ..cfg(1)
    });
    let reg = poll(&mut c, 0);
    register_ok(&mut c, 0, reg.token, None);
    let fetch = poll(&mut c, 0);
    c.handle_response(
        0,
        fetch.token,
        list(vec![
            doc(DEV, 100, 1, json!({"mode": "heat", "t": 20})),
            doc(SHARED, 100, 4, json!({"name": "Hall", "target": 21})),
        ]),
    );
    let sub = poll(&mut c, 0);
    let Request::Subscribe(body) = &sub.request else {
        panic!("expected a subscribe")
    };
    assert!(body.diffs, "asks for diffs");
    assert_eq!(body.max_bytes, Some(1_536), "within its buffer");
    events(&mut c);

    // Five versions later, only the target changed (twice) and a field was added.
    c.handle_response(
        1,
        sub.token,
        list(vec![diff(
            SHARED,
            9,
            4,
            json!({"target": 22.5, "away": true}),
        )]),
    );
    assert_eq!(events(&mut c), [changed(SHARED, 9)]);
    let held = c.bucket(SHARED).expect("held");
    assert_eq!(held.version, 9);
    assert_eq!(
        held.value,
        fields(json!({"name": "Hall", "target": 22.5, "away": true}))
    );

    // A diff from a version this device does not hold is not applied; the next subscribe
    // asks for the bucket's whole value (no version), at once.
    let sub = poll(&mut c, 2);
    c.handle_response(2, sub.token, list(vec![diff(DEV, 7, 5, json!({"t": 25}))]));
    assert_eq!(events(&mut c), []);
    assert_eq!(c.bucket(DEV).expect("held").version, 1);
    let sub = poll(&mut c, 2);
    assert_eq!(
        subscribed(&sub),
        [(DEV.into(), None), (SHARED.into(), Some(9))]
    );
    c.handle_response(
        3,
        sub.token,
        list(vec![doc(DEV, 700, 7, json!({"mode": "cool", "t": 25}))]),
    );
    assert_eq!(events(&mut c), [changed(DEV, 7)]);
    let sub = poll(&mut c, 3);
    assert_eq!(
        subscribed(&sub),
        [(DEV.into(), Some(7)), (SHARED.into(), Some(9))],
        "versions again once the whole value is held"
    );

    // An answer cut to the buffer names what it left out: resubscribe at once.
    c.handle_response(
        4,
        sub.token,
        Response::Buckets(BucketList {
            buckets: vec![diff(DEV, 8, 7, json!({"t": 26}))],
            pending: vec![SHARED.into()],
        }),
    );
    assert_eq!(events(&mut c), [changed(DEV, 8)]);
    let next = poll(&mut c, 4);
    assert!(matches!(next.request, Request::Subscribe(_)), "at once");
    assert_eq!(
        c.bucket(DEV).expect("held").value,
        fields(json!({"mode": "cool", "t": 26}))
    );
}

/// A model server for one bucket: versions with their values, a change log with retention,
/// op ids remembered; it answers subscribes with diffs from the log when it reaches the
/// held version.
struct ModelServer {
    values: Vec<Fields>, // values[v - 1] = value at version v
    log: Vec<(u64, Fields, String)>,
    keep: usize,
    ops: std::collections::BTreeMap<String, (UpdateOutcome, u64)>,
}

impl ModelServer {
    fn version(&self) -> u64 {
        self.values.len() as u64
    }

    fn write(&mut self, f: Fields, op_id: Option<String>) {
        let mut v = self.values.last().cloned().unwrap_or_default();
        for (k, x) in &f {
            v.insert(k.clone(), x.clone());
        }
        self.values.push(v);
        self.log
            .push((self.version(), f, op_id.unwrap_or_default()));
        let n = self.log.len();
        if n > self.keep {
            self.log.drain(..n - self.keep);
        }
    }

    fn answer(&self, held: Option<u64>) -> BucketDoc {
        let current = self.version();
        let value = self.values[current as usize - 1].clone();
        let whole = doc(
            DEV,
            current * 100,
            current,
            serde_json::Value::Object(value),
        );
        let Some(h) = held.filter(|&h| h < current) else {
            return whole;
        };
        if self.log.first().is_none_or(|(v, _, _)| *v > h + 1) {
            return whole;
        }
        let mut changes = Fields::new();
        for (v, f, _) in &self.log {
            if *v > h {
                changes.extend(f.clone());
            }
        }
        diff(DEV, current, h, serde_json::Value::Object(changes))
    }
}

#[derive(Debug, Clone)]
enum Act {
    /// Another client writes this field.
    Other(u8, i64),
    /// The device changes a field; the server's answer is lost with `drop`.
    Local(u8, i64, bool),
    /// The device's subscribe is answered.
    Answer,
}

fn arb_act() -> impl Strategy<Value = Act> {
    prop_oneof![
        3 => (0u8..4, -9i64..9).prop_map(|(f, v)| Act::Other(f, v)),
        2 => (0u8..4, -9i64..9, any::<bool>()).prop_map(|(f, v, d)| Act::Local(f, v, d)),
        3 => Just(Act::Answer),
    ]
}

proptest! {
    /// Whatever writes happen and whichever PUT answers are lost, the device's held copy is
    /// always exactly the server's value at the version it holds, every PUT is applied at
    /// most once (a retry carries the same op id and is answered from memory), and every
    /// acknowledged change is in the log once.
    #[test]
    fn held_copy_equals_the_server_value_and_no_retry_is_applied_twice(
        acts in proptest::collection::vec(arb_act(), 1..60),
        keep in 1usize..8)
    {
        let (mut c, first) = synced_client(5);
        let mut server = ModelServer {
            values: vec![fields(json!({"mode": "heat", "t": 20}))],
            log: vec![(1, fields(json!({"mode": "heat", "t": 20})), String::new())],
            keep,
            ops: Default::default(),
        };
        let mut sub = Some(first);
        let mut now = 0u64;
        let mut put: Option<(u64, tether_proto::api::UpdateRequest)> = None;
        let mut bodies = std::collections::BTreeMap::new();
        let mut acks = std::collections::BTreeMap::new();
        for act in acts {
            now = now.max(c.poll_timeout().unwrap_or(now)) + 1;
            while let Some(out) = c.poll_request(now) {
                match out.request {
                    Request::Subscribe(s) => {
                        prop_assert!(s.diffs);
                        sub = Some(out.token);
                        let held = s.buckets.iter().find(|h| h.id == DEV).and_then(|h| h.version);
                        prop_assert_eq!(held, c.bucket(DEV).map(|b| b.version).filter(|_| held.is_some()));
                    }
                    Request::Put { id, body } => {
                        prop_assert_eq!(id.as_str(), DEV);
                        // A retry is the same write: one body per op id, ever (else the
                        // server would answer 422 op_id_reused).
                        let op_id = body.op_id.clone().expect("every PUT has an op id");
                        let first = bodies.entry(op_id).or_insert_with(|| body.clone());
                        prop_assert_eq!(&*first, &body);
                        put = Some((out.token, body));
                    }
                    other => prop_assert!(false, "unexpected {:?}", other),
                }
            }
            match act {
                Act::Other(f, v) => {
                    let mut w = Fields::new();
                    w.insert(format!("f{f}"), json!(v));
                    server.write(w, None);
                }
                Act::Local(f, v, lose) => {
                    c.set_field(DEV, &format!("f{f}"), json!(v));
                    if let Some((token, body)) = put.take() {
                        let op_id = body.op_id.clone().expect("every PUT has an op id");
                        let (outcome, version, replay) = match server.ops.get(&op_id) {
                            Some(&(o, v)) => (o, v, true),
                            None => {
                                let current = server.version();
                                let outcome = if body.base_version == current {
                                    UpdateOutcome::Applied
                                } else {
                                    UpdateOutcome::Merged
                                };
                                server.write(body.value.clone(), Some(op_id.clone()));
                                server.ops.insert(op_id, (outcome, server.version()));
                                (outcome, server.version(), false)
                            }
                        };
                        if lose {
                            c.handle_response(now, token, Response::Transport);
                        } else {
                            // Merged (and a replayed merged: API.md, the bucket as it is
                            // now) carries the whole bucket; applied only its version.
                            let resp = if outcome == UpdateOutcome::Merged {
                                let now_v = server.version();
                                let value = Some(server.values[now_v as usize - 1].clone());
                                if replay { replayed(200, outcome, now_v, value) } else { updated(200, outcome, now_v, value) }
                            } else if replay {
                                replayed(200, outcome, version, None)
                            } else {
                                updated(200, outcome, version, None)
                            };
                            c.handle_response(now, token, resp);
                        }
                    }
                }
                Act::Answer => {
                    if let Some(t) = sub.take() {
                        let held = c.bucket(DEV).map(|b| b.version);
                        let held = held.filter(|_| c.bucket(DEV).is_some());
                        c.handle_response(now, t, list(vec![server.answer(held)]));
                    }
                }
            }
            let b = c.bucket(DEV).expect("held");
            prop_assert_eq!(&b.value, &server.values[b.version as usize - 1], "v{}", b.version);
            while let Some(ev) = c.poll_event() {
                if let Event::ChangeAcked { op_id: Some(op_id), version, .. } = ev {
                    acks.insert(op_id, version);
                }
            }
        }
        // Every acknowledged write was applied once, under the op id the client sent.
        for (op_id, acked) in &acks {
            let (outcome, original) = server.ops.get(op_id).copied().expect("applied");
            if outcome == UpdateOutcome::Applied {
                prop_assert_eq!(original, *acked, "an applied replay names the original version");
            }
        }
    }
}

#[test]
fn a_late_answer_overtaken_by_the_devices_own_write_is_not_a_regression() {
    // The subscribe in flight told the server v1. The device's own PUT is applied as v2
    // (its answer lost, the retry replayed), then its next PUT as v3 — and only then
    // does the subscribe's answer arrive: v2, which the server sent because the device
    // said v1. Late, not a regression: dropped without an event.
    let (mut c, sub) = synced_client(1);
    c.set_field(DEV, "t", json!(21));
    let put = poll(&mut c, 1);
    c.handle_response(1, put.token, Response::Transport);
    let at = c.poll_timeout().expect("backing off");
    let retry = poll(&mut c, at);
    c.handle_response(
        at,
        retry.token,
        replayed(200, UpdateOutcome::Applied, 2, None),
    );
    c.set_field(DEV, "t", json!(22));
    let next = poll(&mut c, at);
    c.handle_response(
        at,
        next.token,
        updated(200, UpdateOutcome::Applied, 3, None),
    );
    events(&mut c);
    c.handle_response(
        at,
        sub,
        list(vec![doc(DEV, 1_002, 2, json!({"mode": "heat", "t": 21}))]),
    );
    assert_eq!(events(&mut c), []);
    assert_eq!(c.bucket(DEV).expect("held").version, 3);
    // A subscribe that told the server v3 and gets v2 back is one.
    let sub = poll(&mut c, at);
    assert_eq!(subscribed(&sub)[0], (DEV.into(), Some(3)));
    c.handle_response(
        at,
        sub.token,
        list(vec![doc(DEV, 1_002, 2, json!({"t": 21}))]),
    );
    assert_eq!(
        events(&mut c),
        [Event::VersionRegression {
            id: DEV.into(),
            held: 3,
            received: 2
        }]
    );
}

#[test]
fn a_sleeping_device_declares_its_next_sync_on_register_and_every_subscribe() {
    let mut c = DeviceClient::new(ClientConfig {
        next_sync_ms: 3_600_000,
        ..cfg(1)
    });
    let reg = poll(&mut c, 0);
    let Request::Register(r) = &reg.request else {
        panic!("expected a register, got {:?}", reg.request)
    };
    assert_eq!(r.next_sync_ms, Some(3_600_000));
    register_ok(&mut c, 0, reg.token, None);
    let fetch = poll(&mut c, 0);
    c.handle_response(
        0,
        fetch.token,
        list(vec![
            doc(DEV, 100, 1, json!({})),
            doc(SHARED, 100, 1, json!({})),
        ]),
    );
    let sub = poll(&mut c, 0);
    let Request::Subscribe(s) = &sub.request else {
        panic!("expected a subscribe, got {:?}", sub.request)
    };
    assert_eq!(s.next_sync_ms, Some(3_600_000));
    // A device that stays connected promises nothing.
    let (mut awake, token) = synced_client(2);
    awake.handle_response(0, token, list(vec![]));
    let again = poll(&mut awake, 0);
    let Request::Subscribe(s) = &again.request else {
        panic!("expected a subscribe, got {:?}", again.request)
    };
    assert_eq!(s.next_sync_ms, None);
}
