//! The nRF52 firmware's wire budget (issue 7): the protobuf subscribe request a
//! thermostat sends and the notification that answers it stay within 200 bytes of payload
//! together. The subscribe request is the one `DeviceClient` polls after registering and
//! fetching, exactly as the firmware (`firmware-nrf/device`) encodes it.

use serde_json::json;
use tether_proto::api::{BucketDoc, BucketList, RegisterResponse, WireMessage};
use tether_proto::client::{ClientConfig, DeviceClient, Event, Request, Response};
use tether_proto::credentials::{assigned_secret, default_credentials};
use tether_proto::{Credentials, Fields};

const SERIAL: &str = "01AA02AB";
const DEV: &str = "device.01AA02AB";
const SHARED: &str = "shared.01AA02AB";
/// Realistic server timestamps: milliseconds since the epoch (a 6-byte varint).
const T: u64 = 1_763_884_800_123;
const PAYLOAD_BUDGET: usize = 200;

fn fields(v: serde_json::Value) -> Fields {
    match v {
        serde_json::Value::Object(m) => m,
        other => panic!("fixture must be an object, got {other}"),
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

/// A thermostat as the firmware configures it (`firmware-nrf/device/src/app.rs`).
fn thermostat() -> DeviceClient {
    DeviceClient::new(ClientConfig {
        device_id: SERIAL.into(),
        device_type: "thermostat".into(),
        sw_version: "0.1.0".into(),
        base_url: "https://register.tether.example".into(),
        session: format!("fw.{SERIAL}"),
        subscribe_timeout_ms: 120_000,
        backoff_initial_ms: 1_000,
        backoff_max_ms: 60_000,
        jitter_seed: 1,
        default_credentials: default_credentials(&[7u8; 64], SERIAL, "k1")
            .expect("valid default credentials"),
        auth_backoff_max_ms: 3_600_000,
        op_id_nonce: 0x5eed,
        // firmware-nrf/device/src/app.rs: MAX_ANSWER_BYTES (the 2 KiB receive buffer less
        // room for the response headers).
        max_answer_bytes: 1_536,
        next_sync_ms: 0,
    })
}

#[test]
fn thermostat_subscribe_and_notification_fit_200_bytes_of_protobuf() {
    let mut c = thermostat();

    // Register (the server assigns credentials) and fetch, as in the QEMU replay.
    let reg = c.poll_request(0).expect("register");
    assert!(matches!(reg.request, Request::Register(_)));
    c.accept_credentials(Credentials {
        id: format!("a.{SERIAL}"),
        secret: assigned_secret([9; 16]),
    });
    c.handle_response(
        0,
        reg.token,
        Response::Registered(RegisterResponse {
            tier: "production".into(),
            redirect: None,
            software_update: None,
            sync_url: "https://sync-3.tether.example".into(),
            buckets: vec![DEV.into(), SHARED.into()],
        }),
    );
    let fetch = c.poll_request(0).expect("fetch");
    assert!(matches!(fetch.request, Request::Fetch { .. }));
    c.handle_response(
        0,
        fetch.token,
        Response::Buckets(BucketList {
            buckets: vec![
                doc(
                    DEV,
                    T,
                    1042,
                    json!({"current_temperature": 19.25, "humidity": 41, "hvac_state": "heating", "sw_version": "0.1.0"}),
                ),
                doc(
                    SHARED,
                    T - 3_600_000,
                    317,
                    json!({"target_temperature": 21.0, "mode": "heat", "name": "Hallway"}),
                ),
            ],
            pending: vec![],
        }),
    );
    let sub = c.poll_request(1).expect("subscribe");
    let Request::Subscribe(body) = &sub.request else {
        panic!("expected a subscribe, got {:?}", sub.request)
    };
    assert_eq!(
        body.buckets.len(),
        2,
        "both buckets, with versions and timestamps"
    );
    assert!(body.session.is_some() && body.timeout_ms.is_some());
    assert!(body.diffs && body.max_bytes == Some(1_536));
    let subscribe = body.encode_pb();

    // The server answers with what changed in the shared bucket since the held version:
    // a diff (subscribe with `diffs`), as the node does for a held version it still has
    // in the bucket's history.
    let notification = BucketList {
        buckets: vec![BucketDoc {
            id: SHARED.into(),
            timestamp: Some(T + 60_000),
            version: Some(318),
            value: None,
            base_version: Some(317),
            changes: Some(fields(json!({"target_temperature": 21.5}))),
        }],
        pending: vec![],
    }
    .encode_pb();
    let decoded = BucketList::decode_pb(&notification).expect("the firmware decodes it");
    while c.poll_event().is_some() {}
    c.handle_response(1, sub.token, Response::Buckets(decoded));
    assert_eq!(
        c.poll_event(),
        Some(Event::BucketChanged {
            id: SHARED.into(),
            version: 318
        })
    );
    assert_eq!(
        c.bucket(SHARED).expect("held").value,
        fields(json!({"target_temperature": 21.5, "mode": "heat", "name": "Hallway"})),
        "the diff applied to the held copy"
    );

    let json_sub = serde_json::to_vec(body).expect("json").len();
    let json_note = json!({"buckets": [{"id": SHARED, "timestamp": T + 60_000, "version": 318,
        "base_version": 317, "changes": {"target_temperature": 21.5}}]})
    .to_string()
    .len();
    let total = subscribe.len() + notification.len();
    println!(
        "thermostat payload: subscribe request {} B + notification {} B = {} B of protobuf \
         (budget {} B; the same messages as JSON: {} B + {} B)",
        subscribe.len(),
        notification.len(),
        total,
        PAYLOAD_BUDGET,
        json_sub,
        json_note
    );
    assert!(
        total <= PAYLOAD_BUDGET,
        "subscribe {} B + notification {} B = {} B exceeds {} B",
        subscribe.len(),
        notification.len(),
        total,
        PAYLOAD_BUDGET
    );

    // When the held version fell out of the history the server sends the whole value:
    // that round fits too.
    let whole = BucketList {
        buckets: vec![doc(
            SHARED,
            T + 60_000,
            318,
            json!({"target_temperature": 21.5, "mode": "heat", "name": "Hallway"}),
        )],
        pending: vec![],
    }
    .encode_pb();
    println!(
        "thermostat payload without a diff: {} B + {} B = {} B",
        subscribe.len(),
        whole.len(),
        subscribe.len() + whole.len()
    );
    assert!(subscribe.len() + whole.len() <= PAYLOAD_BUDGET);
}
