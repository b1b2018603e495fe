//! The protobuf request bodies a node decodes (`WireMessage::decode_pb` of UpdateRequest,
//! SubscribeRequest, RegisterRequest, PairRequest): never panic, and what decodes
//! re-encodes to bytes that decode to the same message.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tether_proto::api::{
    PairRequest, RegisterRequest, SubscribeRequest, UpdateRequest, WireMessage,
};

fn roundtrip<T: WireMessage + PartialEq + std::fmt::Debug>(data: &[u8]) {
    if let Ok(m) = T::decode_pb(data) {
        let back = T::decode_pb(&m.encode_pb()).expect("its encoding decodes");
        assert_eq!(back, m);
    }
}

fuzz_target!(|data: &[u8]| {
    roundtrip::<UpdateRequest>(data);
    roundtrip::<SubscribeRequest>(data);
    roundtrip::<RegisterRequest>(data);
    roundtrip::<PairRequest>(data);
});
