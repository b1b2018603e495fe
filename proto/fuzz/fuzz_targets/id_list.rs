//! `requests::id_list` (the `ids=` list of `GET /v1/buckets`) on arbitrary text: never
//! panics; what it accepts is sorted, distinct, within the limit, and exactly the valid
//! ids the text names; a list naming more distinct ids than the limit is refused.
#![no_main]

use std::collections::BTreeSet;

use libfuzzer_sys::fuzz_target;
use tether_proto::requests::id_list;
use tether_proto::{BucketId, ProtoError};

fuzz_target!(|data: &[u8]| {
    let Some((&max, rest)) = data.split_first() else {
        return;
    };
    let max = usize::from(max % 16);
    let Ok(list) = std::str::from_utf8(rest) else {
        return;
    };
    let named: Result<BTreeSet<BucketId>, ProtoError> = list
        .split(',')
        .filter(|s| !s.is_empty())
        .map(BucketId::parse)
        .collect();
    match id_list(list, max) {
        Ok(ids) => {
            assert!(ids.len() <= max);
            assert!(ids.windows(2).all(|w| w[0] < w[1]), "sorted and distinct");
            let named = named.expect("an accepted list names only valid ids");
            assert_eq!(ids.into_iter().collect::<BTreeSet<_>>(), named);
        }
        Err(ProtoError::TooManyIds { max: m }) => {
            assert_eq!(m, max);
            // Either it names too many, or an invalid id comes after the limit was hit.
            if let Ok(named) = named {
                assert!(named.len() > max);
            }
        }
        Err(_) => assert!(named.is_err(), "refused only for an invalid id"),
    }
});
