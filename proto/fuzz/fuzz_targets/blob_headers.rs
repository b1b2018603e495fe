//! The blob API's decoders on arbitrary input (API.md "Blobs"): `Content-Range` of an
//! upload, `Range` of a download and the `{"$blob", "size"}` references of a bucket value.
//! Never panics; an accepted upload range lies inside its total; a download range is
//! inside the blob; references are sorted, distinct and each found by `references`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tether_proto::blob::{byte_range, references, refs_in, ContentRange};
use tether_proto::Fields;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    match selector % 3 {
        0 => {
            if let Ok(r) = ContentRange::parse(text) {
                assert!(r.first <= r.last && r.last < r.total);
                assert_eq!(r.len(), r.last - r.first + 1);
            }
        }
        1 => {
            let size = u64::from(selector) * 1000 + 1;
            if let Ok(Some((first, last))) = byte_range(text, size) {
                assert!(
                    first <= last && last < size,
                    "{text}: {first}-{last}/{size}"
                );
            }
        }
        _ => {
            let Ok(fields) = serde_json::from_str::<Fields>(text) else {
                return;
            };
            if let Ok(refs) = refs_in(&fields) {
                assert!(refs.windows(2).all(|w| w[0] < w[1]), "sorted and distinct");
                for r in &refs {
                    assert!(references(&fields, &r.hash));
                }
            }
        }
    }
});
