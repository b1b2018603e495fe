//! `parse_basic` on arbitrary header values (raw, and wrapped as `Basic <base64>` so the
//! fuzzer reaches the id/secret checks): never panics; what it accepts re-encodes to a
//! header that parses to the same credentials, and no error text shows the input.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::collections::BTreeSet;
use std::sync::Mutex;

use tether_proto::credentials::{basic_header, parse_basic, CredentialId};

/// Every distinct error text seen so far in this run.
static SEEN: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());

fn check(value: &str) {
    match parse_basic(value) {
        Ok(c) => {
            assert!(CredentialId::parse(&c.id).is_ok());
            assert!(!c.secret.is_empty() && !c.secret.contains(':'));
            assert_eq!(parse_basic(&basic_header(&c)), Ok(c.clone()));
            assert!(!format!("{c:?}").contains(&c.secret));
        }
        Err(e) => {
            // Errors are fixed texts: they never echo (a part of) the header, so however
            // many inputs are tried, only a handful of distinct messages ever appear.
            // (Checking "the message does not contain the input" instead is defeated by
            // an input that is itself the message: crash-84ae899c.)
            let mut seen = SEEN.lock().expect("not poisoned");
            seen.insert(format!("{e} {e:?}"));
            assert!(
                seen.len() <= 32,
                "error texts depend on the input: {seen:?}"
            );
        }
    }
}

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        check(s);
    }
    // Reach past the base64 layer: encode the raw bytes as a well-formed header.
    check(&format!("Basic {}", encode_standard(data)));
});

/// Standard padded base64, written out here so the target does not depend on the
/// encoder it is checking against.
fn encode_standard(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}
