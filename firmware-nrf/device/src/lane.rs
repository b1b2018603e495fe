//! One HTTP connection for both of the client's request slots.
//!
//! `DeviceClient` may have a sync request (register, fetch, the held subscribe), a PUT and
//! a pairing-code request in flight at once. With TLS on, each connection needs a 16 KB record buffer, and two of
//! them do not fit the nRF52832's RAM budget, so the firmware runs one exchange at a time:
//! - a waiting PUT goes before a waiting sync request (a local change should not wait out a
//!   subscribe hold);
//! - a PUT (or pairing-code request) polled while a subscribe is held makes the driver hang up the subscribe
//!   ([`Lane::preempts`]) and report it with [`hung_up_subscribe`]: an empty answer, which
//!   is exactly what the server sends when a hold times out, so the client resubscribes
//!   at once, without a back-off, with the versions it holds. Nothing can be lost: the
//!   server answers a subscribe at once when a held version differs.

use tether_proto::api::BucketList;
use tether_proto::client::Response;

use crate::http::{HttpCall, Kind};

/// Calls polled from the client, waiting for the connection.
#[derive(Debug, Default)]
pub struct Lane {
    sync: Option<HttpCall>,
    put: Option<HttpCall>,
    pairing: Option<HttpCall>,
    firmware: Option<HttpCall>,
}

impl Lane {
    /// An empty lane.
    pub const fn new() -> Self {
        Lane {
            sync: None,
            put: None,
            pairing: None,
            firmware: None,
        }
    }

    /// Queues a call just polled. The client has at most one request per slot in flight,
    /// so a slot is free whenever it polls one for it.
    pub fn push(&mut self, call: HttpCall) {
        let slot = match call.kind {
            Kind::Put => &mut self.put,
            Kind::Register | Kind::Fetch | Kind::Subscribe => &mut self.sync,
            Kind::PairingCode => &mut self.pairing,
            Kind::Firmware => &mut self.firmware,
        };
        debug_assert!(
            slot.is_none(),
            "the client polled a second request for a busy slot"
        );
        *slot = Some(call);
    }

    /// The call to send next: a PUT, then a pairing-code request (a user is waiting for
    /// both), then a firmware range, then the sync slot. While a firmware image downloads
    /// its ranges go one after another and the device holds no subscribe; it subscribes
    /// with its versions when the download ends, so no change is missed, only delayed.
    pub fn take_next(&mut self) -> Option<HttpCall> {
        self.put
            .take()
            .or_else(|| self.pairing.take())
            .or_else(|| self.firmware.take())
            .or_else(|| self.sync.take())
    }

    /// Whether the exchange in flight, of kind `in_flight`, should be hung up now: only a
    /// held subscribe is, and only for a waiting PUT, pairing-code request or firmware
    /// range.
    pub fn preempts(&self, in_flight: Kind) -> bool {
        in_flight == Kind::Subscribe
            && (self.put.is_some() || self.pairing.is_some() || self.firmware.is_some())
    }

    /// Whether a firmware range is queued.
    pub fn has_firmware(&self) -> bool {
        self.firmware.is_some()
    }

    /// Drops everything queued: after `DeviceClient::link_down` none of it is in flight
    /// any more, and the client polls it again after its back-off.
    pub fn clear(&mut self) {
        self.sync = None;
        self.put = None;
        self.pairing = None;
        self.firmware = None;
    }

    /// Nothing queued.
    pub fn is_empty(&self) -> bool {
        self.sync.is_none()
            && self.put.is_none()
            && self.pairing.is_none()
            && self.firmware.is_none()
    }
}

/// What the driver feeds the client for a subscribe it hung up on purpose (see the module
/// docs): the empty answer of a hold that ended without a change.
pub fn hung_up_subscribe() -> Response {
    Response::Buckets(BucketList::default())
}
