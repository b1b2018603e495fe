//! A subscribe body as a node reads it: decoded (JSON, or protobuf when the first byte
//! is odd), then `requests::held_set`. Never panics; the held set is distinct, within the
//! limit, covers every listed id, and keeps a version only where every copy of that id
//! agreed on it.
#![no_main]

use std::collections::BTreeMap;

use libfuzzer_sys::fuzz_target;
use tether_proto::api::{SubscribeRequest, WireMessage};
use tether_proto::requests::held_set;
use tether_proto::{BucketId, ProtoError};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, body)) = data.split_first() else {
        return;
    };
    let req = if mode & 1 == 1 {
        SubscribeRequest::decode_pb(body).ok()
    } else {
        serde_json::from_slice::<SubscribeRequest>(body).ok()
    };
    let Some(req) = req else { return };
    let max = usize::from(mode >> 4);
    match held_set(&req.buckets, max) {
        Ok(set) => {
            assert!(set.len() <= max);
            let mut copies: BTreeMap<&str, Vec<(Option<u64>, Option<u64>)>> = BTreeMap::new();
            for h in &req.buckets {
                copies
                    .entry(h.id.as_str())
                    .or_default()
                    .push((h.timestamp, h.version));
            }
            assert_eq!(set.len(), copies.len(), "one entry per distinct id");
            for h in &set {
                let all = &copies[h.id.as_str()];
                if all.iter().all(|c| *c == all[0]) {
                    assert_eq!((h.timestamp, h.version), all[0]);
                } else {
                    assert_eq!(h.version, None, "disagreeing copies hold nothing");
                }
            }
        }
        Err(ProtoError::TooManyIds { max: m }) => assert_eq!(m, max),
        Err(_) => assert!(req.buckets.iter().any(|h| BucketId::parse(&h.id).is_err())),
    }
});
