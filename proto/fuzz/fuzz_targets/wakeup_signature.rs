//! A push gateway's check of a wake-up (`tether_proto::presence::wakeup_signature_valid`,
//! API.md "Presence and wake-ups") on an arbitrary `X-Tether-Signature` header and body:
//! never panics, accepts exactly the signature made for that body under that secret, and
//! refuses it for any other body.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tether_proto::presence::{wakeup_signature, wakeup_signature_valid};

fuzz_target!(|data: &[u8]| {
    let Some((&split, rest)) = data.split_first() else {
        return;
    };
    let cut = usize::from(split).min(rest.len());
    let (header, body) = rest.split_at(cut);
    let secret = b"fuzz-secret";
    let good = wakeup_signature(secret, body);
    if let Ok(header) = std::str::from_utf8(header) {
        // The hex digits may come in either case; the prefix and the tag must match.
        let expected = header.starts_with("sha256=") && header.eq_ignore_ascii_case(&good);
        assert_eq!(
            wakeup_signature_valid(secret, body, header),
            expected,
            "{header}"
        );
    }
    assert!(wakeup_signature_valid(secret, body, &good));
    let mut other = body.to_vec();
    other.push(0);
    assert!(!wakeup_signature_valid(secret, &other, &good));
});
