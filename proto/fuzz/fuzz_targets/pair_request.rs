//! A pair body as a node reads it (JSON, or protobuf when the first byte is odd), then
//! its code in canonical form (`requests::pairing_code`) and its structure's per-user key
//! (`requests::structure_key`). Never panics; a canonical code is a fixed point of 8
//! alphabet characters around one dash; structure keys are valid set keys, one per
//! (user, name).
#![no_main]

use libfuzzer_sys::fuzz_target;
use tether_proto::api::{PairRequest, WireMessage};
use tether_proto::requests::{pairing_code, structure_key, CODE_ALPHABET};
use tether_proto::SetKey;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, body)) = data.split_first() else {
        return;
    };
    let req = if mode & 1 == 1 {
        PairRequest::decode_pb(body).ok()
    } else {
        serde_json::from_slice::<PairRequest>(body).ok()
    };
    let Some(req) = req else { return };
    if let Ok(code) = pairing_code(&req.code) {
        assert_eq!(code.len(), 9);
        assert_eq!(&code[4..5], "-");
        assert!(code
            .bytes()
            .enumerate()
            .all(|(i, b)| i == 4 || CODE_ALPHABET.contains(&b)));
        assert_eq!(pairing_code(&code).as_deref(), Ok(code.as_str()));
        assert_eq!(
            pairing_code(&code.to_lowercase()).as_deref(),
            Ok(code.as_str())
        );
    }
    if let Some(name) = &req.structure {
        match structure_key("alice", name) {
            Ok(key) => {
                assert!(SetKey::parse(name).is_ok(), "only valid names are scoped");
                assert!(SetKey::parse(key.as_str()).is_ok());
                assert_ne!(Ok(key.clone()), structure_key("bob", name));
                assert_eq!(Ok(key), structure_key("alice", name));
            }
            Err(_) => assert!(SetKey::parse(name).is_err()),
        }
    }
});
