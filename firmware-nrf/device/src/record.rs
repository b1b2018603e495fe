//! The flash records that let a reboot resume where the device left off:
//! - the buckets it holds (`DeviceClient::snapshot` in, `DeviceClient::restore` out): one
//!   byte of format version, then the protobuf `BucketList` of the API (the codec the
//!   device already carries, so no second serializer costs flash); a thermostat's two
//!   buckets take about 200 bytes;
//! - its assigned credentials (`DeviceClient::assigned_credentials` in,
//!   `DeviceClient::restore_credentials` out): the format byte, then `<id> <secret>`.

use alloc::vec::Vec;

use tether_proto::api::{BucketDoc, BucketList, WireMessage};
use tether_proto::client::ClientBucket;
use tether_proto::credentials::{format_set_credentials, parse_set_credentials};
use tether_proto::Credentials;

/// First byte of every record this firmware writes; a record with another one is ignored.
pub const FORMAT: u8 = 1;

/// Why a stored record was not restored (the device then registers and fetches afresh).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordError {
    /// Empty, or written by another firmware format.
    UnknownFormat,
    /// The protobuf did not decode.
    Corrupt,
    /// A bucket without version or value: never written by this firmware.
    Incomplete,
}

/// Encodes held buckets as a flash record.
pub fn encode_buckets(buckets: &[ClientBucket]) -> Vec<u8> {
    let list = BucketList {
        buckets: buckets
            .iter()
            .map(|b| BucketDoc {
                id: b.id.clone(),
                timestamp: (b.timestamp != 0).then_some(b.timestamp),
                version: Some(b.version),
                value: Some(b.value.clone()),
                base_version: None,
                changes: None,
            })
            .collect(),
        pending: Vec::new(),
    };
    let mut out = Vec::with_capacity(160);
    out.push(FORMAT);
    out.extend_from_slice(&list.encode_pb());
    out
}

/// Decodes a flash record written by [`encode_buckets`].
pub fn decode_buckets(record: &[u8]) -> Result<Vec<ClientBucket>, RecordError> {
    let (&format, rest) = record.split_first().ok_or(RecordError::UnknownFormat)?;
    if format != FORMAT {
        return Err(RecordError::UnknownFormat);
    }
    let list = BucketList::decode_pb(rest).map_err(|_| RecordError::Corrupt)?;
    list.buckets
        .into_iter()
        .map(|d| match (d.version, d.value) {
            (Some(version), Some(value)) => Ok(ClientBucket {
                id: d.id,
                timestamp: d.timestamp.unwrap_or(0),
                version,
                value,
            }),
            _ => Err(RecordError::Incomplete),
        })
        .collect()
}

/// Encodes the assigned credentials record (`None`: the device holds none, e.g. after the
/// server dropped them): the format byte, then `<id> <secret>` as the header carried it.
pub fn encode_credentials(assigned: Option<&Credentials>) -> Vec<u8> {
    let mut out = Vec::with_capacity(48);
    out.push(FORMAT);
    if let Some(c) = assigned {
        out.extend_from_slice(format_set_credentials(c).as_bytes());
    }
    out
}

/// Decodes a credentials record; `Ok(None)` when it says the device holds none.
pub fn decode_credentials(record: &[u8]) -> Result<Option<Credentials>, RecordError> {
    let (&format, rest) = record.split_first().ok_or(RecordError::UnknownFormat)?;
    if format != FORMAT {
        return Err(RecordError::UnknownFormat);
    }
    if rest.is_empty() {
        return Ok(None);
    }
    let text = core::str::from_utf8(rest).map_err(|_| RecordError::Corrupt)?;
    parse_set_credentials(text)
        .map(Some)
        .map_err(|_| RecordError::Corrupt)
}
