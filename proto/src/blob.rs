//! Large values out of band (seed 002, API.md "Blobs"): content addresses, the
//! `{"$blob": "<sha256>", "size": n}` references bucket fields carry, and the byte ranges
//! of uploads (`Content-Range`) and downloads (`Range`). Pure: every function here decodes
//! or checks what a client sent and is fuzzed (`proto/fuzz` `blob_headers`).

use alloc::vec::Vec;
use core::fmt;

use crate::model::{Fields, Value};

/// The key a bucket field's reference object names its blob with.
pub const BLOB_KEY: &str = "$blob";

/// A blob's content address: the SHA-256 of its bytes.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BlobHash(pub [u8; 32]);

impl BlobHash {
    /// Parses 64 hexadecimal digits (either case).
    pub fn parse(text: &str) -> Result<Self, BlobError> {
        let bytes = text.as_bytes();
        if bytes.len() != 64 {
            return Err(BlobError::BadHash);
        }
        let mut out = [0u8; 32];
        for (i, byte) in out.iter_mut().enumerate() {
            let hi = hex_digit(bytes[2 * i])?;
            let lo = hex_digit(bytes[2 * i + 1])?;
            *byte = (hi << 4) | lo;
        }
        Ok(BlobHash(out))
    }

    /// The hash of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        use sha2::Digest;
        BlobHash(sha2::Sha256::digest(bytes).into())
    }
}

fn hex_digit(c: u8) -> Result<u8, BlobError> {
    match c {
        b'0'..=b'9' => Ok(c - b'0'),
        b'a'..=b'f' => Ok(c - b'a' + 10),
        b'A'..=b'F' => Ok(c - b'A' + 10),
        _ => Err(BlobError::BadHash),
    }
}

/// Lower-case hex, as the API writes it.
impl fmt::Display for BlobHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl fmt::Debug for BlobHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BlobHash({self})")
    }
}

/// What is wrong with a blob reference or a range header.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BlobError {
    /// Not 64 hexadecimal digits.
    #[error("a blob hash is 64 hexadecimal digits (SHA-256)")]
    BadHash,
    /// An object with `$blob` that is not exactly `{"$blob": "<sha256>", "size": n}`.
    #[error("a blob reference is {{\"$blob\": \"<sha256>\", \"size\": <bytes>}}: {0}")]
    BadReference(&'static str),
    /// A `Content-Range` or `Range` header the server does not take.
    #[error("{0}")]
    BadRange(&'static str),
}

/// A reference from a bucket field to a blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct BlobRef {
    /// The blob.
    pub hash: BlobHash,
    /// Its size in bytes, as the writer states it.
    pub size: u64,
}

/// Every blob a bucket value references, anywhere in it (nested objects and arrays), in
/// order, without repeats. An object holding `$blob` must be exactly a reference.
pub fn refs_in(fields: &Fields) -> Result<Vec<BlobRef>, BlobError> {
    let mut out = Vec::new();
    for v in fields.values() {
        collect(v, &mut out, 0)?;
    }
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

/// Deeper than any bucket the node accepts (serde_json's own limit is 128).
const MAX_DEPTH: usize = 128;

fn collect(v: &Value, out: &mut Vec<BlobRef>, depth: usize) -> Result<(), BlobError> {
    if depth > MAX_DEPTH {
        return Err(BlobError::BadReference("nested too deeply"));
    }
    match v {
        Value::Object(m) => match m.get(BLOB_KEY) {
            Some(hash) => {
                let hash = hash
                    .as_str()
                    .ok_or(BlobError::BadReference("$blob is not a string"))?;
                let hash = BlobHash::parse(hash)
                    .map_err(|_| BlobError::BadReference("$blob is not 64 hex digits"))?;
                let size = m
                    .get("size")
                    .and_then(Value::as_u64)
                    .ok_or(BlobError::BadReference("size is not a byte count"))?;
                if m.len() != 2 {
                    return Err(BlobError::BadReference("only $blob and size are allowed"));
                }
                out.push(BlobRef { hash, size });
                Ok(())
            }
            None => m.values().try_for_each(|v| collect(v, out, depth + 1)),
        },
        Value::Array(a) => a.iter().try_for_each(|v| collect(v, out, depth + 1)),
        _ => Ok(()),
    }
}

/// Whether `fields` reference `hash` anywhere (a malformed reference references nothing).
pub fn references(fields: &Fields, hash: &BlobHash) -> bool {
    refs_in(fields).is_ok_and(|refs| refs.iter().any(|r| r.hash == *hash))
}

/// An upload's `Content-Range: bytes <first>-<last>/<total>`: bytes `first..=last` of a
/// blob of `total` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ContentRange {
    /// Offset of the first byte sent.
    pub first: u64,
    /// Offset of the last byte sent (inclusive).
    pub last: u64,
    /// The blob's whole size.
    pub total: u64,
}

impl ContentRange {
    /// Parses the header; the range must lie inside the total.
    pub fn parse(header: &str) -> Result<Self, BlobError> {
        let rest = header
            .trim()
            .strip_prefix("bytes ")
            .ok_or(BlobError::BadRange(
                "Content-Range must be bytes <first>-<last>/<total>",
            ))?;
        let (range, total) = rest.split_once('/').ok_or(BlobError::BadRange(
            "Content-Range must be bytes <first>-<last>/<total>",
        ))?;
        let (first, last) = range.split_once('-').ok_or(BlobError::BadRange(
            "Content-Range must be bytes <first>-<last>/<total>",
        ))?;
        let first = number(first)?;
        let last = number(last)?;
        let total = number(total)?;
        if first > last || last >= total {
            return Err(BlobError::BadRange(
                "Content-Range: first ≤ last < total is required",
            ));
        }
        Ok(ContentRange { first, last, total })
    }

    /// How many bytes the range holds.
    pub fn len(&self) -> u64 {
        self.last - self.first + 1
    }

    /// Never: a range holds at least one byte.
    pub fn is_empty(&self) -> bool {
        false
    }
}

fn number(text: &str) -> Result<u64, BlobError> {
    let t = text.trim();
    if t.is_empty() || t.len() > 20 || !t.bytes().all(|b| b.is_ascii_digit()) {
        return Err(BlobError::BadRange("a byte offset is a decimal number"));
    }
    t.parse()
        .map_err(|_| BlobError::BadRange("a byte offset is a decimal number"))
}

/// A download's `Range: bytes=<first>-[<last>]` or `bytes=-<suffix>` against a blob of
/// `size` bytes: the inclusive byte range to send, clipped to the blob. One range only
/// (a multi-range request is answered whole, as RFC 9110 allows). `Ok(None)`: the header
/// is not a byte range this server takes, so the whole blob is sent;
/// `Err`: unsatisfiable (416).
pub fn byte_range(header: &str, size: u64) -> Result<Option<(u64, u64)>, BlobError> {
    let Some(spec) = header.trim().strip_prefix("bytes=") else {
        return Ok(None);
    };
    if spec.contains(',') {
        return Ok(None);
    }
    let Some((first, last)) = spec.split_once('-') else {
        return Ok(None);
    };
    let unsatisfiable = BlobError::BadRange("the range starts past the end of the blob");
    let (first, last) = match (first.trim().is_empty(), last.trim().is_empty()) {
        (true, true) => return Ok(None),
        (true, false) => {
            let Ok(suffix) = number(last) else {
                return Ok(None);
            };
            if suffix == 0 || size == 0 {
                return Err(unsatisfiable);
            }
            (size.saturating_sub(suffix), size - 1)
        }
        (false, open) => {
            let (Ok(first), last) = (
                number(first),
                if open { Ok(u64::MAX) } else { number(last) },
            ) else {
                return Ok(None);
            };
            let Ok(last) = last else { return Ok(None) };
            if last < first {
                return Ok(None);
            }
            if first >= size {
                return Err(unsatisfiable);
            }
            (first, last.min(size - 1))
        }
    };
    Ok(Some((first, last)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;
    use serde_json::json;

    const H: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

    fn fields(v: serde_json::Value) -> Fields {
        match v {
            Value::Object(m) => m,
            _ => panic!("object"),
        }
    }

    #[test]
    fn a_hash_is_64_hex_digits_and_prints_lower_case() {
        let h = BlobHash::parse(&H.to_uppercase()).expect("upper case parses");
        assert_eq!(h.to_string(), H);
        assert_eq!(BlobHash::of(b"test"), h, "SHA-256 of \"test\"");
        for bad in ["", &H[1..], &[H, "0"].concat(), &H.replace('9', "g")] {
            assert_eq!(BlobHash::parse(bad), Err(BlobError::BadHash), "{bad}");
        }
    }

    #[test]
    fn references_are_found_anywhere_and_must_be_exact() {
        let v = fields(json!({
            "photo": {"$blob": H, "size": 4},
            "logs": [{"day": 1, "file": {"$blob": H, "size": 4}}],
            "plain": "text",
        }));
        let refs = refs_in(&v).expect("valid");
        assert_eq!(refs.len(), 1, "the same blob twice is one reference");
        assert_eq!(refs[0].size, 4);
        assert!(references(&v, &BlobHash::parse(H).expect("hash")));
        let cases = [
            (json!({"a": {"$blob": 7, "size": 4}}), "not a string"),
            (json!({"a": {"$blob": "abc", "size": 4}}), "64 hex"),
            (json!({"a": {"$blob": H}}), "size"),
            (json!({"a": {"$blob": H, "size": -1}}), "size"),
            (json!({"a": {"$blob": H, "size": 4, "name": "x"}}), "only"),
        ];
        for (v, why) in cases {
            let err = refs_in(&fields(v.clone())).expect_err("malformed");
            assert!(err.to_string().contains(why), "{v}: {err}");
        }
        assert_eq!(refs_in(&fields(json!({"a": {"blob": H}}))), Ok(Vec::new()));
    }

    #[test]
    fn content_ranges_parse_within_their_total() {
        let r = ContentRange::parse("bytes 0-99/1000").expect("valid");
        assert_eq!((r.first, r.last, r.total, r.len()), (0, 99, 1000, 100));
        for bad in [
            "bytes 5-4/10",
            "bytes 0-10/10",
            "bytes */10",
            "0-1/2",
            "bytes 0-1/",
            "bytes -1-2/5",
            "bytes 0-99999999999999999999999/1",
        ] {
            assert!(ContentRange::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn download_ranges_follow_rfc_9110() {
        let table = [
            ("bytes=0-9", Ok(Some((0, 9)))),
            ("bytes=10-", Ok(Some((10, 99)))),
            ("bytes=90-200", Ok(Some((90, 99)))),
            ("bytes=-10", Ok(Some((90, 99)))),
            ("bytes=-500", Ok(Some((0, 99)))),
            ("bytes=100-", Err(())),
            ("bytes=-0", Err(())),
            ("bytes=0-1,5-6", Ok(None)),
            ("bytes=9-2", Ok(None)),
            ("items=0-1", Ok(None)),
            ("bytes=x-1", Ok(None)),
        ];
        for (header, want) in table {
            let got = byte_range(header, 100).map_err(|_| ());
            assert_eq!(got, want, "{header}");
        }
    }
}
