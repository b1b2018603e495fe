//! The JSON request bodies a node decodes (`serde_json::from_slice` of UpdateRequest,
//! SubscribeRequest, RegisterRequest, PairRequest): never panic; what decodes re-encodes
//! to JSON that decodes to the same message, and survives the trip through protobuf
//! (a node stores what a JSON client sent and serves it to protobuf devices).
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde::{de::DeserializeOwned, Serialize};
use tether_proto::api::{
    PairRequest, RegisterRequest, SubscribeRequest, UpdateRequest, WireMessage,
};

fn roundtrip<T: DeserializeOwned + Serialize + WireMessage + PartialEq + std::fmt::Debug>(
    data: &[u8],
) {
    if let Ok(m) = serde_json::from_slice::<T>(data) {
        let again = serde_json::to_vec(&m).expect("a decoded message encodes");
        let back: T = serde_json::from_slice(&again).expect("its encoding decodes");
        assert_eq!(back, m, "JSON round trip");
        let via_pb = T::decode_pb(&m.encode_pb()).expect("its protobuf decodes");
        assert_eq!(via_pb, m, "JSON → protobuf → message");
    }
}

fuzz_target!(|data: &[u8]| {
    roundtrip::<UpdateRequest>(data);
    roundtrip::<SubscribeRequest>(data);
    roundtrip::<RegisterRequest>(data);
    roundtrip::<PairRequest>(data);
});
