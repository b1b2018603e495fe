//! Firmware updates over blobs (issue 18, API.md "software_update"): which offers a device
//! can take, and the download of the image by byte ranges into its update partition.
//!
//! An offer a device can take names a blob (`url` `/v1/blobs/<sha256>`, `sha256`, `size`)
//! and carries `signature`: Ed25519, by the vendor's firmware key, over the SHA-512 of the
//! image — the convention of embassy-boot's `verify_and_mark_updated`, which checks it on
//! the device against the key built into the firmware (`tether admin sign-firmware` makes
//! it). The device also checks the image's SHA-256 against the offer before it marks the
//! image for the swap.
//!
//! [`Download`] is sans-IO: it says which range to ask for next ([`Download::range`]),
//! checks each answer ([`Download::check`]: a `206` whose `Content-Range` starts where the
//! device is), and moves on only once the caller has stored the bytes
//! ([`Download::stored`]). A dropped link or a failed answer leaves it where it was: the
//! next request asks for the same range after a back-off ([`Download::failed`]), so a
//! download resumes instead of starting over. An answer that cannot be right for this
//! image (404: the blob is gone; 416, or a `Content-Range` of another size: not this
//! image) abandons it.

use alloc::format;
use alloc::string::String;

use crate::api::SoftwareUpdate;
use crate::blob::{BlobHash, ContentRange};
use crate::Millis;

/// Bytes of an Ed25519 signature.
pub const SIGNATURE_LEN: usize = 64;
/// First wait after a failed range request.
pub const RETRY_INITIAL_MS: u64 = 1_000;
/// Longest wait between range requests that fail.
pub const RETRY_MAX_MS: u64 = 60_000;

/// A firmware image a device can download and check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    /// The version it is.
    pub version: String,
    /// Where it is (the offer's `url`, `/v1/blobs/<sha256>`).
    pub url: String,
    /// Its SHA-256.
    pub sha256: BlobHash,
    /// Its size in bytes.
    pub size: u32,
    /// Ed25519 over its SHA-512, by the firmware key.
    pub signature: [u8; SIGNATURE_LEN],
}

/// Why an offer or an answer is not taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DfuError {
    /// The offer names no blob (no `sha256`/`size`): nothing a device can check.
    NotABlob,
    /// The offer has no signature, or it is not 128 hex digits.
    Unsigned,
    /// The image is empty, or larger than the update partition.
    TooLarge {
        /// The image's size.
        size: u64,
        /// The partition's.
        capacity: u32,
    },
}

impl DfuError {
    /// Short reason, for a device's log (no allocation).
    pub fn name(self) -> &'static str {
        match self {
            DfuError::NotABlob => "not a blob",
            DfuError::Unsigned => "unsigned",
            DfuError::TooLarge { .. } => "larger than the partition",
        }
    }
}

impl core::fmt::Display for DfuError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            DfuError::NotABlob => f.write_str("the offer names no blob (sha256, size)"),
            DfuError::Unsigned => f.write_str("the offer carries no valid signature"),
            DfuError::TooLarge { size, capacity } => write!(
                f,
                "an image of {size} bytes does not fit the {capacity}-byte update partition"
            ),
        }
    }
}

impl Image {
    /// The image an offer names, if a device can take it.
    pub fn from_offer(offer: &SoftwareUpdate) -> Result<Image, DfuError> {
        let sha256 = offer
            .sha256
            .as_deref()
            .and_then(|h| BlobHash::parse(h).ok())
            .ok_or(DfuError::NotABlob)?;
        let size = offer.size.ok_or(DfuError::NotABlob)?;
        let signature = offer
            .signature
            .as_deref()
            .and_then(parse_signature)
            .ok_or(DfuError::Unsigned)?;
        let size = u32::try_from(size).map_err(|_| DfuError::TooLarge {
            size,
            capacity: u32::MAX,
        })?;
        Ok(Image {
            version: offer.version.clone(),
            url: offer.url.clone(),
            sha256,
            size,
            signature,
        })
    }
}

/// Parses 128 hexadecimal digits.
pub fn parse_signature(text: &str) -> Option<[u8; SIGNATURE_LEN]> {
    let bytes = text.trim().as_bytes();
    if bytes.len() != 2 * SIGNATURE_LEN {
        return None;
    }
    let mut out = [0u8; SIGNATURE_LEN];
    for (i, byte) in out.iter_mut().enumerate() {
        let pair = core::str::from_utf8(&bytes[2 * i..2 * i + 2]).ok()?;
        *byte = u8::from_str_radix(pair, 16).ok()?;
    }
    Some(out)
}

/// Lower-case hex of a signature, as offers carry it.
pub fn signature_hex(signature: &[u8; SIGNATURE_LEN]) -> String {
    signature.iter().map(|b| format!("{b:02x}")).collect()
}

/// The bytes of one range answer, to store at `offset` of the update partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chunk<'a> {
    /// Where they go in the image.
    pub offset: u32,
    /// The bytes.
    pub bytes: &'a [u8],
}

/// What to do with a range answer that is not a chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Ask again after the back-off (a server error, a throttle, a short or misplaced
    /// answer): the download resumes where it is.
    Retry,
    /// The image cannot be had (gone, or not the size offered): drop the download.
    Abandon,
}

/// The download of an [`Image`] by ranges; see the module docs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Download {
    image: Image,
    chunk: u32,
    received: u32,
    failures: u32,
    retry_at: Millis,
}

impl Download {
    /// Starts the download of `image` into a partition of `capacity` bytes, asking for at
    /// most `chunk` bytes at a time (what the device can hold in one answer).
    pub fn new(image: Image, capacity: u32, chunk: u32) -> Result<Download, DfuError> {
        if image.size == 0 || image.size > capacity {
            return Err(DfuError::TooLarge {
                size: u64::from(image.size),
                capacity,
            });
        }
        Ok(Download {
            image,
            chunk: chunk.max(1),
            received: 0,
            failures: 0,
            retry_at: 0,
        })
    }

    /// The image.
    pub fn image(&self) -> &Image {
        &self.image
    }

    /// Bytes stored so far (the offset of the next range).
    pub fn received(&self) -> u32 {
        self.received
    }

    /// Every byte is stored: the image is ready to be checked.
    pub fn is_complete(&self) -> bool {
        self.received == self.image.size
    }

    /// The next range to ask for at `now`, as `(first, last)` inclusive; `None` when the
    /// download is complete or waits out a back-off (see [`Self::wake_at`]).
    pub fn range(&self, now: Millis) -> Option<(u32, u32)> {
        if self.is_complete() || now < self.retry_at {
            return None;
        }
        let last = self
            .received
            .saturating_add(self.chunk - 1)
            .min(self.image.size - 1);
        Some((self.received, last))
    }

    /// The `Range` header value of [`Self::range`].
    pub fn range_header(&self, now: Millis) -> Option<String> {
        self.range(now)
            .map(|(first, last)| format!("bytes={first}-{last}"))
    }

    /// When a back-off ends (the download wants to be polled then).
    pub fn wake_at(&self) -> Option<Millis> {
        (!self.is_complete() && self.failures > 0).then_some(self.retry_at)
    }

    /// Checks the answer to the range asked for: its bytes when they are the next part of
    /// this image. Nothing moves until [`Self::stored`]; a [`Refusal::Retry`] should be
    /// followed by [`Self::failed`].
    pub fn check<'a>(
        &self,
        status: u16,
        content_range: Option<&str>,
        body: &'a [u8],
    ) -> Result<Chunk<'a>, Refusal> {
        let size = u64::from(self.image.size);
        match status {
            206 => {
                let range = content_range
                    .and_then(|h| ContentRange::parse(h).ok())
                    .ok_or(Refusal::Retry)?;
                if range.total != size {
                    return Err(Refusal::Abandon);
                }
                let asked = self.range(Millis::MAX).ok_or(Refusal::Retry)?;
                let fits = range.first == u64::from(asked.0)
                    && range.last <= u64::from(asked.1)
                    && range.len() == body.len() as u64;
                if !fits {
                    return Err(Refusal::Retry);
                }
                Ok(Chunk {
                    offset: self.received,
                    bytes: body,
                })
            }
            // The whole image, when the server did not take the range: usable only from
            // the start, and only if it all fits in what was asked.
            200 if self.received == 0
                && body.len() as u64 == size
                && size <= u64::from(self.chunk) =>
            {
                Ok(Chunk {
                    offset: 0,
                    bytes: body,
                })
            }
            404 | 410 | 416 => Err(Refusal::Abandon),
            _ => Err(Refusal::Retry),
        }
    }

    /// The chunk [`Self::check`] returned is in the partition: the next range follows it.
    pub fn stored(&mut self, chunk: &Chunk<'_>) {
        if chunk.offset == self.received {
            let len = u32::try_from(chunk.bytes.len()).unwrap_or(u32::MAX);
            self.received = self.received.saturating_add(len).min(self.image.size);
            self.failures = 0;
            self.retry_at = 0;
        }
    }

    /// The range request failed (no answer, a [`Refusal::Retry`], or the bytes could not
    /// be stored): the same range is asked for again after a back-off that doubles with
    /// each failure in a row.
    pub fn failed(&mut self, now: Millis) {
        let shift = self.failures.min(16);
        let wait = RETRY_INITIAL_MS
            .saturating_mul(1 << shift)
            .min(RETRY_MAX_MS);
        self.failures = self.failures.saturating_add(1);
        self.retry_at = now.saturating_add(wait);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;
    use alloc::vec::Vec;
    use proptest::prelude::*;

    fn image(size: u32) -> Image {
        Image {
            version: "1.3.0".into(),
            url: "/v1/blobs/x".into(),
            sha256: BlobHash([7; 32]),
            size,
            signature: [1; SIGNATURE_LEN],
        }
    }

    fn offer(sha256: Option<&str>, size: Option<u64>, signature: Option<&str>) -> SoftwareUpdate {
        SoftwareUpdate {
            version: "1.3.0".into(),
            url: "/v1/blobs/ab".into(),
            sha256: sha256.map(Into::into),
            size,
            signature: signature.map(Into::into),
        }
    }

    #[test]
    fn only_a_signed_blob_offer_is_an_image() {
        let hash = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
        let sig = "ab".repeat(64);
        let cases: [(SoftwareUpdate, Result<(), DfuError>); 6] = [
            (offer(Some(hash), Some(4), Some(&sig)), Ok(())),
            (offer(None, Some(4), Some(&sig)), Err(DfuError::NotABlob)),
            (offer(Some(hash), None, Some(&sig)), Err(DfuError::NotABlob)),
            (
                offer(Some("zz"), Some(4), Some(&sig)),
                Err(DfuError::NotABlob),
            ),
            (offer(Some(hash), Some(4), None), Err(DfuError::Unsigned)),
            (
                offer(Some(hash), Some(4), Some(&sig[2..])),
                Err(DfuError::Unsigned),
            ),
        ];
        for (o, want) in cases {
            assert_eq!(Image::from_offer(&o).map(|_| ()), want, "{o:?}");
        }
        let i = Image::from_offer(&offer(Some(hash), Some(4), Some(&sig))).expect("image");
        assert_eq!(i.signature, [0xab; 64]);
        assert_eq!(signature_hex(&i.signature), sig);
        assert_eq!(i.sha256.to_string(), hash);
    }

    #[test]
    fn an_image_larger_than_the_partition_is_not_downloaded() {
        assert_eq!(
            Download::new(image(4097), 4096, 1024).map(|_| ()),
            Err(DfuError::TooLarge {
                size: 4097,
                capacity: 4096
            })
        );
        assert!(Download::new(image(0), 4096, 1024).is_err());
        assert!(Download::new(image(4096), 4096, 1024).is_ok());
    }

    /// The worked example: a 2,500-byte image in 1 KiB ranges, a dropped link in the
    /// middle, a misplaced answer, a server error; each retried range is the same one.
    #[test]
    fn ranges_follow_what_was_stored_and_resume_after_failures() {
        let mut d = Download::new(image(2_500), 8_192, 1_024).expect("fits");
        let body = [5u8; 1_024];
        assert_eq!(d.range_header(0).as_deref(), Some("bytes=0-1023"));
        let c = d
            .check(206, Some("bytes 0-1023/2500"), &body)
            .expect("chunk");
        assert_eq!(c.offset, 0);
        // Not stored yet (the flash write failed): the same range again, after a back-off.
        d.failed(10);
        assert_eq!(d.range(10), None);
        assert_eq!(d.wake_at(), Some(10 + RETRY_INITIAL_MS));
        assert_eq!(d.range_header(1_010).as_deref(), Some("bytes=0-1023"));
        d.stored(&c);
        assert_eq!(d.range_header(1_010).as_deref(), Some("bytes=1024-2047"));
        // A dropped link, then a 503: the back-off doubles, the range stays.
        d.failed(2_000);
        assert_eq!(
            d.check(503, None, b""),
            Err(Refusal::Retry),
            "a server error is retried"
        );
        d.failed(3_000);
        assert_eq!(d.range(3_000 + 2 * RETRY_INITIAL_MS - 1), None);
        assert_eq!(d.range(3_000 + 2 * RETRY_INITIAL_MS), Some((1_024, 2_047)));
        // Answers that are not the range asked for.
        assert_eq!(
            d.check(206, Some("bytes 0-1023/2500"), &body),
            Err(Refusal::Retry)
        );
        assert_eq!(
            d.check(206, Some("bytes 1024-2047/2500"), &body[..10]),
            Err(Refusal::Retry),
            "a short body"
        );
        assert_eq!(d.check(206, None, &body), Err(Refusal::Retry));
        assert_eq!(
            d.check(206, Some("bytes 1024-2047/9999"), &body),
            Err(Refusal::Abandon),
            "another image's size"
        );
        assert_eq!(d.check(404, None, b""), Err(Refusal::Abandon));
        assert_eq!(d.check(416, None, b""), Err(Refusal::Abandon));
        assert_eq!(
            d.check(200, None, &[0u8; 2_500]),
            Err(Refusal::Retry),
            "the whole image, larger than a chunk"
        );
        let c = d
            .check(206, Some("bytes 1024-2047/2500"), &body)
            .expect("chunk");
        d.stored(&c);
        assert_eq!(d.wake_at(), None, "a stored chunk ends the back-off");
        assert_eq!(d.range(3_000), Some((2_048, 2_499)), "the tail is shorter");
        let tail = [6u8; 452];
        let c = d
            .check(206, Some("bytes 2048-2499/2500"), &tail)
            .expect("tail");
        d.stored(&c);
        assert!(d.is_complete());
        assert_eq!(d.range(u64::MAX), None);
        assert_eq!(d.received(), 2_500);
    }

    #[test]
    fn a_small_image_answered_whole_is_taken_from_the_start() {
        let mut d = Download::new(image(100), 4_096, 1_024).expect("fits");
        let whole = [3u8; 100];
        let c = d.check(200, None, &whole).expect("whole");
        assert_eq!(c.offset, 0);
        d.stored(&c);
        assert!(d.is_complete());
    }

    #[test]
    fn the_back_off_is_capped() {
        let mut d = Download::new(image(10), 4_096, 4).expect("fits");
        for _ in 0..40 {
            d.failed(0);
        }
        assert_eq!(d.wake_at(), Some(RETRY_MAX_MS));
    }

    /// A server that serves the image in any split, dropping any answers on the way,
    /// ends with the device holding exactly the image: nothing skipped, nothing twice.
    fn serve(image_bytes: &[u8], chunk: u32, drops: &[bool]) -> Vec<u8> {
        let size = image_bytes.len() as u32;
        let mut d = Download::new(image(size), size + 7, chunk).expect("fits");
        let mut partition = alloc::vec![0xFFu8; (size + 7) as usize];
        let mut now = 0;
        let mut turn = 0usize;
        while !d.is_complete() {
            let (first, last) = match d.range(now) {
                Some(r) => r,
                None => {
                    now = d.wake_at().expect("waiting");
                    continue;
                }
            };
            let dropped = drops
                .get(turn % drops.len().max(1))
                .copied()
                .unwrap_or(false);
            turn += 1;
            assert!(turn < 100_000, "no progress");
            if dropped {
                d.failed(now);
                continue;
            }
            let body = &image_bytes[first as usize..=last as usize];
            let header = format!("bytes {first}-{last}/{size}");
            let chunk = d.check(206, Some(&header), body).expect("the range asked");
            partition[chunk.offset as usize..chunk.offset as usize + chunk.bytes.len()]
                .copy_from_slice(chunk.bytes);
            d.stored(&chunk);
        }
        partition.truncate(size as usize);
        partition
    }

    proptest! {
        #[test]
        fn any_split_and_any_drops_end_with_the_exact_image(
            bytes in proptest::collection::vec(any::<u8>(), 1..3_000),
            chunk in 1u32..700,
            drops in proptest::collection::vec(any::<bool>(), 1..8),
        ) {
            // At least one answer in each cycle of the drop pattern arrives.
            let mut drops = drops;
            drops.push(false);
            prop_assert_eq!(serve(&bytes, chunk, &drops), bytes);
        }
    }
}
