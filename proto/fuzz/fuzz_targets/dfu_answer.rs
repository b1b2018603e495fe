//! A firmware download (`tether_proto::dfu`) fed arbitrary offers and range answers from
//! the network: never panics; a chunk it accepts is exactly the next bytes of the image
//! (at the offset it has, within the range it asked for, inside the image); and however
//! the answers come, it never moves past the image or backwards.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tether_proto::api::SoftwareUpdate;
use tether_proto::dfu::{Download, Image};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut parts = text.split('\n');
    let offer = SoftwareUpdate {
        version: "1.3.0".into(),
        url: "/v1/blobs/x".into(),
        sha256: parts.next().map(str::to_string),
        size: parts.next().and_then(|s| s.parse().ok()),
        signature: parts.next().map(str::to_string),
    };
    let Ok(image) = Image::from_offer(&offer) else {
        return;
    };
    let size = image.size;
    let Ok(mut d) = Download::new(image, 1 << 20, 1024) else {
        return;
    };
    let mut now = 0;
    for answer in parts {
        let (status, rest) = answer.split_once(' ').unwrap_or((answer, ""));
        let status: u16 = status.parse().unwrap_or(206);
        let (range, body) = rest.split_once('|').unwrap_or((rest, ""));
        let before = d.received();
        let asked = d.range(u64::MAX);
        match d.check(status, Some(range), body.as_bytes()) {
            Ok(chunk) => {
                let (first, last) = asked.expect("a chunk only while something is asked");
                assert_eq!(chunk.offset, before);
                assert_eq!(chunk.offset, first);
                assert!(chunk.bytes.len() as u64 <= u64::from(last - first) + 1);
                d.stored(&chunk);
            }
            Err(_) => d.failed(now),
        }
        assert!(d.received() >= before && d.received() <= size);
        now += 1;
    }
});
