//! Tether's device protocol, shared by the server, the simulator and the firmware.
//!
//! Everything here is pure: no sockets, no files, no clock reads. Time is always an
//! argument (`now`), so the rules can be table-tested against seed 000's worked
//! examples and property-tested, and the same code runs on an nRF52.
#![no_std]
#![cfg_attr(not(test), warn(clippy::unwrap_used))]

extern crate alloc;
#[cfg(feature = "std")]
extern crate std;

pub mod api;
pub mod blob;
pub mod client;
pub mod credentials;
pub mod dfu;
pub mod error;
pub mod hlc;
pub mod model;
pub mod pb;
pub mod presence;
pub mod reconcile;
pub mod requests;
pub mod synclog;

pub use credentials::{CredentialError, CredentialId, CredentialKind, Credentials};
pub use error::ProtoError;
pub use hlc::{ClockBound, Hlc, HlcClock, ReferenceReading};
pub use model::{Bucket, BucketId, Fields, SetKey, Value};
pub use reconcile::{reconcile, stale_buckets, Outcome, RefuseReason, Update};

/// Milliseconds since the Unix epoch; the only notion of time the protocol knows.
pub type Millis = u64;
