//! `parse_set_credentials` on arbitrary header values: never panics; what it accepts is a
//! valid id with a secret of its kind's shape, and formats back to an equal value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tether_proto::credentials::{
    check_secret_shape, format_set_credentials, parse_set_credentials, CredentialId,
};

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(c) = parse_set_credentials(s) {
        let id = CredentialId::parse(&c.id).expect("accepted ids are valid");
        assert_eq!(check_secret_shape(id.kind(), &c.secret), Ok(()));
        assert_eq!(parse_set_credentials(&format_set_credentials(&c)), Ok(c));
    }
});
