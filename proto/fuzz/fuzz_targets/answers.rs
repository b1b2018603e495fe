//! The answers a device decodes and applies (subscribe and fetch lists, with diffs and
//! `pending`; PUT outcomes, replays included; history pages), as protobuf and as JSON:
//! never panic; what decodes re-encodes to the same message; and a `DeviceClient` fed
//! the decoded answer (as its subscribe's or its PUT's) never panics and never lets a
//! held version go backwards.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde::{de::DeserializeOwned, Serialize};
use tether_proto::api::{
    BucketDoc, BucketList, HistoryResponse, RegisterResponse, UpdateResponse, WireMessage,
};
use tether_proto::client::{ClientConfig, DeviceClient, Request, Response};
use tether_proto::credentials::{assigned_secret, default_credentials, Credentials};
use tether_proto::Fields;

fn roundtrip<T: DeserializeOwned + Serialize + WireMessage + PartialEq + std::fmt::Debug>(
    data: &[u8],
) -> Option<T> {
    let pb = T::decode_pb(data).ok();
    if let Some(m) = &pb {
        let back = T::decode_pb(&m.encode_pb()).expect("its encoding decodes");
        assert_eq!(&back, m, "protobuf round trip");
    }
    let json = serde_json::from_slice::<T>(data).ok();
    if let Some(m) = &json {
        let again = serde_json::to_vec(m).expect("a decoded message encodes");
        let back: T = serde_json::from_slice(&again).expect("its encoding decodes");
        assert_eq!(&back, m, "JSON round trip");
    }
    pb.or(json)
}

/// A thermostat that registered and fetched both its buckets, with a subscribe in flight.
fn synced() -> (DeviceClient, u64, Vec<(String, u64)>) {
    let serial = "01AA02AB";
    let mut c = DeviceClient::new(ClientConfig {
        device_id: serial.into(),
        device_type: "thermostat".into(),
        sw_version: "1".into(),
        base_url: "https://r".into(),
        session: "s".into(),
        subscribe_timeout_ms: 1000,
        backoff_initial_ms: 10,
        backoff_max_ms: 100,
        jitter_seed: 1,
        default_credentials: default_credentials(&[7; 64], serial, "k1").expect("valid"),
        auth_backoff_max_ms: 100,
        op_id_nonce: 1,
        max_answer_bytes: 1536,
        next_sync_ms: 0,
    });
    let reg = c.poll_request(0).expect("register");
    c.accept_credentials(Credentials {
        id: format!("a.{serial}"),
        secret: assigned_secret([1; 16]),
    });
    let ids = vec![format!("device.{serial}"), format!("shared.{serial}")];
    c.handle_response(
        0,
        reg.token,
        Response::Registered(RegisterResponse {
            tier: "p".into(),
            redirect: None,
            software_update: None,
            sync_url: "https://s".into(),
            buckets: ids.clone(),
        }),
    );
    let fetch = c.poll_request(0).expect("fetch");
    let docs = ids
        .iter()
        .map(|id| BucketDoc {
            id: id.clone(),
            timestamp: Some(5),
            version: Some(5),
            value: Some(Fields::new()),
            base_version: None,
            changes: None,
        })
        .collect();
    c.handle_response(
        0,
        fetch.token,
        Response::Buckets(BucketList {
            buckets: docs,
            pending: Vec::new(),
        }),
    );
    let sub = c.poll_request(0).expect("subscribe");
    assert!(matches!(sub.request, Request::Subscribe(_)));
    let held = ids.into_iter().map(|id| (id, 5)).collect();
    (c, sub.token, held)
}

fn versions_never_decrease(c: &DeviceClient, held: &[(String, u64)]) {
    for (id, v) in held {
        assert!(
            c.bucket(id).map_or(0, |b| b.version) >= *v,
            "{id} went back"
        );
    }
}

fuzz_target!(|data: &[u8]| {
    if let Some(list) = roundtrip::<BucketList>(data) {
        let (mut c, sub, held) = synced();
        c.handle_response(1, sub, Response::Buckets(list));
        versions_never_decrease(&c, &held);
        while c.poll_request(2).is_some() {}
    }
    if let Some(body) = roundtrip::<UpdateResponse>(data) {
        let (mut c, _, held) = synced();
        c.set_field("device.01AA02AB", "t", serde_json::json!(1));
        if let Some(put) = c.poll_request(1) {
            c.handle_response(1, put.token, Response::Updated { status: 200, body });
        }
        versions_never_decrease(&c, &held);
    }
    let _ = roundtrip::<HistoryResponse>(data);
});
