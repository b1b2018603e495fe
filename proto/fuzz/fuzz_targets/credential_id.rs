//! `CredentialId::parse` on arbitrary text: never panics, and whatever it accepts formats
//! back to exactly the input and parses again to the same id.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tether_proto::credentials::CredentialId;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(id) = CredentialId::parse(s) {
        let text = id.to_string();
        assert_eq!(text, s);
        assert_eq!(CredentialId::parse(&text), Ok(id.clone()));
        assert_eq!(id.serial().is_some(), !text.starts_with("u."));
    }
});
