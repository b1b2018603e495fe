//! The firmware's whole decision loop, sans-IO: `DeviceClient` plus the one-connection
//! [`Lane`] and the [`Thermostat`]. The embassy task only performs the
//! HTTP calls [`App::next_call`] hands it, reads the sensor, drives the LED and writes the
//! flash records [`App::take_buckets_record`]/[`App::take_credentials_record`] return; the
//! QEMU test drives the same `App` with recorded answers.
//!
//! A firmware update offered at registration (a signed blob that fits the active
//! partition, another version than this one) is downloaded by ranges
//! (`tether_proto::dfu::Download`): the driver fetches each [`Kind::Firmware`] call, hands
//! the answer to [`App::firmware_answer`], writes the chunk ([`crate::dfu::store`]) and
//! says so with [`App::firmware_stored`]; once complete it checks and marks the image
//! ([`crate::dfu::check_and_mark`], [`App::firmware_checked`]) and resets into the
//! bootloader. A failed range is asked for again after a back-off, from where it stopped.

use alloc::string::{String, ToString};
use alloc::vec::Vec;

use tether_proto::api::SoftwareUpdate;
use tether_proto::blob::BlobHash;
use tether_proto::client::{ClientConfig, DeviceClient, Event, Response};
use tether_proto::credentials::parse_set_credentials;
use tether_proto::dfu::{Chunk, DfuError, Download, Image, Refusal};
use tether_proto::{Credentials, Millis, Value};

use crate::http::{decode_response, BadBody, HttpCall, Kind};
use crate::lane::{hung_up_subscribe, Lane};
use crate::record::{self, RecordError};
use crate::thermostat::Thermostat;

/// How long a call other than a subscribe may take, TLS handshake included (a P-256 key
/// exchange takes about a second on a 64 MHz Cortex-M4).
pub const REQUEST_TIMEOUT_MS: u64 = 30_000;
/// How much longer than the requested hold a subscribe may take before the device gives
/// up on it (the server answers a hold that ran out with an empty list).
pub const SUBSCRIBE_MARGIN_MS: u64 = 20_000;
/// The largest subscribe answer body the device asks for (`max_bytes`): the driver's
/// 2 KiB buffer for one exchange's response (`HTTP_RX` in `src/main.rs`) less room for
/// its status line and headers. Larger answers are split by the server (`pending`).
pub const MAX_ANSWER_BYTES: u64 = 2048 - 512;

/// Everything the device is configured with (see `firmware-nrf/src/config.rs`).
#[derive(Debug, Clone)]
pub struct Config {
    /// The device serial (`device_id`), e.g. `01AA02AB`.
    pub serial: String,
    /// The manufacturing key id of the default credentials.
    pub key_id: String,
    /// The default credentials' secret (`d.` + 43 chars), as the production line derived
    /// it from the manufacturing key; the device never holds that key.
    pub default_secret: String,
    /// The registration server, e.g. `https://register.tether.example`.
    pub register_url: String,
    /// This firmware's version.
    pub sw_version: String,
    /// How long the server should hold a subscribe.
    pub subscribe_timeout_ms: u64,
    /// First retry delay.
    pub backoff_initial_ms: u64,
    /// Longest retry delay.
    pub backoff_max_ms: u64,
    /// Longest retry delay after the server rejected the default credentials.
    pub auth_backoff_max_ms: u64,
    /// Seeds retry jitter (from the hardware RNG on the device).
    pub jitter_seed: u64,
    /// Makes this boot's op ids unique (from the hardware RNG, fresh at every boot).
    pub op_id_nonce: u64,
    /// The firmware key's public half: only images it signed are installed.
    pub firmware_key: [u8; 32],
    /// The active partition's size (the largest image that can run); 0: no updates.
    pub update_capacity: u32,
}

/// The token of firmware range calls (never one of the client's).
const FIRMWARE_TOKEN: u64 = u64::MAX;

/// What became of a firmware update offer, for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Offer {
    /// The download starts (or goes on: the same image was offered again).
    Downloading {
        /// The version.
        version: String,
        /// Its size.
        size: u32,
    },
    /// Not taken, and why.
    Declined(&'static str),
}

/// An HTTP answer as the driver received it.
#[derive(Debug, Clone, Copy)]
pub struct Reply<'a> {
    /// The status code.
    pub status: u16,
    /// The `Content-Type` header, if any.
    pub content_type: Option<&'a str>,
    /// The `X-Tether-Set-Credentials` header, if any.
    pub set_credentials: Option<&'a str>,
    /// The `Retry-After` header, if any.
    pub retry_after: Option<&'a str>,
    /// The `Content-Range` header (a firmware range's answer), if any.
    pub content_range: Option<&'a str>,
    /// The body.
    pub body: &'a [u8],
}

/// The device application; see the module docs.
#[derive(Debug)]
pub struct App {
    client: DeviceClient,
    lane: Lane,
    /// The thermostat the buckets drive.
    pub thermostat: Thermostat,
    subscribe_timeout_ms: u64,
    buckets_dirty: bool,
    credentials_dirty: bool,
    /// Counts answers fed to the client; a queued subscribe polled before the latest one
    /// may carry versions that answer has since moved on.
    answers: u64,
    /// `answers` when the queued subscribe was polled.
    subscribe_polled_at: u64,
    /// Events seen while re-polling in [`Self::next_call`], returned by the next poll.
    deferred: Vec<Event>,
    sw_version: String,
    firmware_key: [u8; 32],
    update_capacity: u32,
    /// The firmware download under way.
    download: Option<Download>,
    /// Its range call is queued or in flight.
    download_busy: bool,
    /// An image refused this boot (bad hash or signature): not downloaded again.
    refused: Option<BlobHash>,
    /// What became of the last offer, until the driver logs it.
    offer: Option<Offer>,
}

impl App {
    /// A device that knows nothing yet (see [`Self::restore`]).
    pub fn new(cfg: &Config) -> Self {
        let client = DeviceClient::new(ClientConfig {
            device_id: cfg.serial.clone(),
            device_type: "thermostat".to_string(),
            sw_version: cfg.sw_version.clone(),
            base_url: cfg.register_url.clone(),
            // One session per device: the server does not echo the device's own writes.
            session: alloc::format!("fw.{}", cfg.serial),
            subscribe_timeout_ms: cfg.subscribe_timeout_ms,
            backoff_initial_ms: cfg.backoff_initial_ms,
            backoff_max_ms: cfg.backoff_max_ms,
            jitter_seed: cfg.jitter_seed,
            default_credentials: Credentials {
                id: alloc::format!("d.{}.{}", cfg.serial, cfg.key_id),
                secret: cfg.default_secret.clone(),
            },
            auth_backoff_max_ms: cfg.auth_backoff_max_ms,
            op_id_nonce: cfg.op_id_nonce,
            max_answer_bytes: MAX_ANSWER_BYTES,
            // A mains-powered thermostat stays connected: it promises no next sync.
            next_sync_ms: 0,
        });
        App {
            client,
            lane: Lane::new(),
            thermostat: Thermostat::new(&cfg.serial, &cfg.sw_version),
            subscribe_timeout_ms: cfg.subscribe_timeout_ms,
            buckets_dirty: false,
            credentials_dirty: false,
            answers: 0,
            subscribe_polled_at: 0,
            deferred: Vec::new(),
            sw_version: cfg.sw_version.clone(),
            firmware_key: cfg.firmware_key,
            update_capacity: cfg.update_capacity,
            download: None,
            download_busy: false,
            refused: None,
            offer: None,
        }
    }

    /// Loads the flash records written before a reboot. Returns how many buckets were
    /// restored; a bad buckets record restores none (the device then fetches afresh).
    pub fn restore(
        &mut self,
        buckets: Option<&[u8]>,
        credentials: Option<&[u8]>,
    ) -> Result<usize, RecordError> {
        if let Some(c) = credentials {
            if let Some(c) = record::decode_credentials(c)? {
                self.client.restore_credentials(c);
            }
        }
        let Some(bytes) = buckets else { return Ok(0) };
        let held = record::decode_buckets(bytes)?;
        let n = held.len();
        for b in &held {
            self.thermostat.apply(b);
        }
        self.client.restore(held);
        Ok(n)
    }

    /// Runs the client until it has nothing more to say at `now`: queues the calls it
    /// polls, applies what changed to the thermostat, queues the thermostat's reports as
    /// local changes. Returns the client's events, oldest first, for the log.
    pub fn poll(&mut self, now: Millis) -> Vec<Event> {
        let mut events = core::mem::take(&mut self.deferred);
        loop {
            while let Some(out) = self.client.poll_request(now) {
                let call = HttpCall::new(out, self.client.base_url());
                if call.kind == Kind::Subscribe {
                    self.subscribe_polled_at = self.answers;
                }
                self.lane.push(call);
            }
            let mut progressed = false;
            while let Some(ev) = self.client.poll_event() {
                match &ev {
                    Event::BucketChanged { id, .. } => {
                        if let Some(b) = self.client.bucket(id) {
                            self.thermostat.apply(b);
                        }
                        self.buckets_dirty = true;
                    }
                    Event::CredentialsStored { .. } | Event::CredentialsDropped { .. } => {
                        self.credentials_dirty = true;
                    }
                    Event::SoftwareUpdate(offer) => self.offered(offer),
                    _ => {}
                }
                events.push(ev);
                progressed = true;
            }
            // Reports start once the device holds its own bucket (fetched or restored), so
            // they are compared with what the server has.
            if self
                .client
                .bucket(self.thermostat.device_bucket())
                .is_some()
            {
                let bucket = self.thermostat.device_bucket().to_string();
                for (field, value) in self.thermostat.reports() {
                    self.client.set_field(&bucket, field, value);
                    progressed = true;
                }
            }
            if !progressed {
                self.queue_firmware_range(now);
                return events;
            }
        }
    }

    /// A firmware offer from registration: downloaded when the device can take it.
    fn offered(&mut self, offer: &SoftwareUpdate) {
        self.offer = Some(match self.accept_offer(offer) {
            Ok(()) => match &self.download {
                Some(d) => Offer::Downloading {
                    version: d.image().version.clone(),
                    size: d.image().size,
                },
                None => Offer::Declined("no download"),
            },
            Err(why) => Offer::Declined(why),
        });
    }

    fn accept_offer(&mut self, offer: &SoftwareUpdate) -> Result<(), &'static str> {
        if self.update_capacity == 0 {
            return Err("this build takes no updates");
        }
        if offer.version == self.sw_version {
            return Err("this version runs already");
        }
        let image = Image::from_offer(offer).map_err(DfuError::name)?;
        if self.refused == Some(image.sha256) {
            return Err("this image was refused");
        }
        if self
            .download
            .as_ref()
            .is_some_and(|d| d.image().sha256 == image.sha256)
        {
            return Ok(()); // offered again at a re-registration: go on where it is
        }
        self.download = Some(
            Download::new(image, self.update_capacity, crate::dfu::CHUNK)
                .map_err(DfuError::name)?,
        );
        self.download_busy = false;
        Ok(())
    }

    /// Queues the download's next range when none is queued or in flight and its
    /// back-off is over; only with assigned credentials (blobs are read as the device).
    fn queue_firmware_range(&mut self, now: Millis) {
        if self.download_busy || self.lane.has_firmware() {
            return;
        }
        let Some(d) = &self.download else { return };
        let Some(range) = d.range_header(now) else {
            return;
        };
        let Some(auth) = self.client.assigned_credentials().cloned() else {
            return;
        };
        let path = d.image().url.as_str();
        let url = if path.starts_with("http://") || path.starts_with("https://") {
            path.to_string()
        } else {
            alloc::format!("{}{}", self.client.base_url().trim_end_matches('/'), path)
        };
        self.lane.push(HttpCall {
            token: FIRMWARE_TOKEN,
            kind: Kind::Firmware,
            method: crate::http::Method::Get,
            url,
            body: None,
            auth,
            range: Some(range),
        });
        self.download_busy = true;
    }

    /// The answer to a firmware range: the bytes to store (then [`Self::firmware_stored`]),
    /// or nothing (the range is asked for again after a back-off, or the download is
    /// dropped when the image cannot be had).
    pub fn firmware_answer<'a>(&mut self, now: Millis, reply: Reply<'a>) -> Option<Chunk<'a>> {
        self.download_busy = false;
        if let Some(h) = reply.set_credentials {
            self.offered_credentials(h);
        }
        let d = self.download.as_mut()?;
        match d.check(reply.status, reply.content_range, reply.body) {
            Ok(chunk) => {
                self.download_busy = true; // until it is stored
                Some(chunk)
            }
            Err(Refusal::Retry) => {
                d.failed(now);
                None
            }
            Err(Refusal::Abandon) => {
                self.download = None;
                None
            }
        }
    }

    /// The chunk [`Self::firmware_answer`] returned was written (`ok`) or not. Returns the
    /// image to check when that was its last byte.
    pub fn firmware_stored(&mut self, now: Millis, chunk: &Chunk<'_>, ok: bool) -> Option<Image> {
        self.download_busy = false;
        let d = self.download.as_mut()?;
        if ok {
            d.stored(chunk);
        } else {
            d.failed(now);
        }
        d.is_complete().then(|| d.image().clone())
    }

    /// The complete image was checked: marked for the swap (the driver resets into the
    /// bootloader) or refused (not downloaded again this boot).
    pub fn firmware_checked(&mut self, result: Result<(), crate::dfu::Refused>) {
        if let Some(d) = self.download.take() {
            if result.is_err() {
                self.refused = Some(d.image().sha256);
            }
        }
    }

    /// The firmware key images must be signed with.
    pub fn firmware_key(&self) -> &[u8; 32] {
        &self.firmware_key
    }

    /// The download under way: bytes stored and the image's size.
    pub fn firmware_progress(&self) -> Option<(u32, u32)> {
        self.download
            .as_ref()
            .map(|d| (d.received(), d.image().size))
    }

    /// What became of the last firmware offer, once.
    pub fn take_offer_news(&mut self) -> Option<Offer> {
        self.offer.take()
    }

    /// The next call to perform on the connection at `now`.
    ///
    /// A subscribe that waited in the lane while another exchange was answered (typically
    /// a PUT that moved a version) is not sent as polled: it is handed back to the client
    /// as an empty answer and polled afresh, so it carries the versions held now instead
    /// of making the server answer at once with what the device already has.
    pub fn next_call(&mut self, now: Millis) -> Option<HttpCall> {
        let call = self.lane.take_next()?;
        if call.kind != Kind::Subscribe || self.subscribe_polled_at == self.answers {
            return Some(call);
        }
        self.client
            .handle_response(now, call.token, hung_up_subscribe());
        self.answers += 1;
        // Re-polling cannot queue a PUT ahead of it: the lane just handed out its PUT (if
        // it had one) before this subscribe, so the new subscribe comes straight back
        // unless events made the thermostat report something, in which case that goes first.
        let events = self.poll(now);
        self.deferred = events;
        self.lane.take_next()
    }

    /// Whether the call in flight should be hung up now (a held subscribe, for a PUT).
    pub fn preempts(&self, in_flight: Kind) -> bool {
        self.lane.preempts(in_flight)
    }

    /// How long the driver waits for the answer to a `kind` call.
    pub fn call_timeout_ms(&self, kind: Kind) -> u64 {
        match kind {
            Kind::Subscribe => self.subscribe_timeout_ms + SUBSCRIBE_MARGIN_MS,
            Kind::Register | Kind::Fetch | Kind::Put | Kind::PairingCode | Kind::Firmware => {
                REQUEST_TIMEOUT_MS
            }
        }
    }

    /// Takes an `X-Tether-Set-Credentials` header the moment it is seen (a held
    /// subscribe's headers arrive long before its body). A malformed value is ignored.
    pub fn offered_credentials(&mut self, header_value: &str) {
        if let Ok(c) = parse_set_credentials(header_value) {
            self.client.accept_credentials(c);
        }
    }

    /// Feeds the answer to `call` (its credentials header included). A body that does
    /// not decode is reported to the client as a transport failure and returned for the log.
    pub fn answer(
        &mut self,
        now: Millis,
        call: &HttpCall,
        reply: Reply<'_>,
    ) -> Result<(), BadBody> {
        if call.kind == Kind::Firmware {
            // Not the client's: the driver gives it to `firmware_answer`.
            return Err(BadBody {
                kind: call.kind,
                status: reply.status,
                reason: "a firmware range goes to firmware_answer",
            });
        }
        self.answers += 1;
        if let Some(h) = reply.set_credentials {
            self.offered_credentials(h);
        }
        let decoded = decode_response(
            call.kind,
            reply.status,
            reply.content_type,
            reply.retry_after,
            reply.body,
        );
        let (resp, result) = match decoded {
            Ok(r) => (r, Ok(())),
            Err(bad) => (Response::Transport, Err(bad)),
        };
        self.client.handle_response(now, call.token, resp);
        result
    }

    /// The call failed without an HTTP answer (connect, TLS, reset, timeout).
    pub fn transport_failed(&mut self, now: Millis, call: &HttpCall) {
        if call.kind == Kind::Firmware {
            self.download_busy = false;
            if let Some(d) = self.download.as_mut() {
                d.failed(now);
            }
            return;
        }
        self.answers += 1;
        self.client
            .handle_response(now, call.token, Response::Transport);
    }

    /// The driver hung up a held subscribe because [`Self::preempts`] said so.
    pub fn hung_up(&mut self, now: Millis, call: &HttpCall) {
        debug_assert_eq!(call.kind, Kind::Subscribe);
        self.answers += 1;
        self.client
            .handle_response(now, call.token, hung_up_subscribe());
    }

    /// The network went away: nothing in flight or queued will be answered.
    pub fn link_down(&mut self, now: Millis) {
        self.client.link_down(now);
        self.lane.clear();
        if core::mem::take(&mut self.download_busy) {
            if let Some(d) = self.download.as_mut() {
                d.failed(now);
            }
        }
    }

    /// A temperature reading (°C) from the sensor.
    pub fn measured(&mut self, celsius: f64) {
        self.thermostat.measure(celsius);
    }

    /// A user setting changed on the device itself (e.g. its buttons): sent to
    /// `shared.<serial>`; the thermostat follows once the server confirms it.
    pub fn set_shared(&mut self, field: &str, value: Value) {
        let bucket = self.thermostat.shared_bucket().to_string();
        self.client.set_field(&bucket, field, value);
    }

    /// The user asked to pair the device (e.g. a button): a code to show comes as
    /// `Event::PairingCode`.
    pub fn request_pairing_code(&mut self) {
        self.client.request_pairing_code();
    }

    /// Factory reset: the assigned credentials, the buckets and unsent changes are
    /// forgotten (and erased from flash); the device starts over as on first contact.
    pub fn factory_reset(&mut self) {
        self.client.factory_reset();
        self.lane.clear();
        self.thermostat.forget();
        self.buckets_dirty = true;
        self.credentials_dirty = true;
    }

    /// When the client wants to be polled again even if nothing else happens.
    pub fn wake_at(&self) -> Option<Millis> {
        let download = self
            .download
            .as_ref()
            .filter(|_| !self.download_busy)
            .and_then(Download::wake_at);
        match (self.client.poll_timeout(), download) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The client, for inspection.
    pub fn client(&self) -> &DeviceClient {
        &self.client
    }

    /// The buckets record to write, when the held buckets changed since the last one.
    pub fn take_buckets_record(&mut self) -> Option<Vec<u8>> {
        if !core::mem::take(&mut self.buckets_dirty) {
            return None;
        }
        Some(record::encode_buckets(&self.client.snapshot()))
    }

    /// The credentials record to write, when the server assigned new ones.
    pub fn take_credentials_record(&mut self) -> Option<Vec<u8>> {
        if !core::mem::take(&mut self.credentials_dirty) {
            return None;
        }
        Some(record::encode_credentials(
            self.client.assigned_credentials(),
        ))
    }
}
