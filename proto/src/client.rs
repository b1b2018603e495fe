//! The sans-IO device client of seed 000 (FIG 15B registration, FIG 19B/20 fetch,
//! FIG 21B subscribe, FIG 22A/22B update): events in, requests out.
//!
//! [`DeviceClient`] owns everything a device knows about its buckets and decides every
//! request it makes, but never touches a socket or a clock. A driver (the device
//! simulator's HTTP loop, the firmware task) runs it like this:
//!
//! ```text
//! loop {
//!     while let Some(out) = client.poll_request(now) {
//!         send out.request to client.base_url() with `Authorization: basic_header(&out.auth)`,
//!         tagged with out.token
//!     }
//!     while let Some(ev) = client.poll_event() { act on ev }
//!     wait until
//!         an answer's headers arrive: if it has X-Tether-Set-Credentials, parse_set_credentials
//!             and accept_credentials at once (a held subscribe's headers come long before its body),
//!         an HTTP answer arrives (→ handle_response(now, token, resp), Retry-After in
//!             Response::Error::retry_after_ms),
//!         client.poll_timeout() passes, the application calls set_field or request_pairing_code,
//!         or the link drops (→ link_down)
//! }
//! ```
//!
//! Three request slots can be in flight at once: the *sync* slot (register, then fetch,
//! then the long-poll subscribe, one at a time), the *put* slot (one PUT) and the *pairing*
//! slot (one pairing-code request). Each slot backs off on its own. Every request carries a
//! fresh token; an answer whose token is not in flight any more (after
//! [`DeviceClient::link_down`], dropped credentials, a factory reset, or a duplicate) is
//! ignored, and the driver may close that request's connection.
//!
//! The driver times its requests out itself (a subscribe needs `subscribe_timeout_ms` plus
//! a margin) and reports a timeout as [`Response::Transport`].
//!
//! Rules kept here, in one place:
//! - a held bucket's version never goes backwards: an answer only replaces a held bucket
//!   when it carries a greater version; a lower one is reported as
//!   [`Event::VersionRegression`] and never applied (DESIGN.md §7 invariant 2, as seen
//!   by this client);
//! - local changes coalesce per bucket (a later value for a field wins, seed 001's merge
//!   table for field-level writes) and are sent one PUT at a time, each with a fresh
//!   `op_id`;
//! - a PUT whose answer never came (timeout, dropped connection, 5xx, 408, 429, a 401 on a
//!   set since replaced) may have been applied: it is resent *verbatim*, same `op_id`,
//!   until it gets an answer, so the server applies it at most once and answers a retry
//!   with the original outcome (`replayed`). Local edits made meanwhile wait in the outbox
//!   and go in the next PUT, after it, so newer edits still win;
//! - subscribes ask for diffs: a stale bucket comes as the fields changed since the held
//!   version, applied to the held copy; a diff that does not fit the held copy is not
//!   applied and the next subscribe asks for that bucket's whole value; with
//!   `max_answer_bytes` the server keeps answers within the device's buffer and names
//!   the buckets left out (`pending`), which the immediate resubscribe brings.
//!
//! Credential rules (seed 000 FIG 28B, 29B, 30B; API.md "Credentials"):
//! - every request carries a set ([`Outgoing::auth`]): the assigned set whenever one is
//!   held, the default set only to register while none is;
//! - a set from `X-Tether-Set-Credentials` is stored the moment the driver sees it
//!   ([`DeviceClient::accept_credentials`]) and every later request uses it; only an
//!   assigned set for this device's serial is accepted;
//! - a 401 is about the set *that request carried*: if that is still the stored assigned
//!   set it is dropped and the device registers again with its default set; if a newer set
//!   arrived meanwhile the 401 is stale and the request is simply resent with the new set;
//!   a 401 to the default set backs off exponentially up to `auth_backoff_max_ms`;
//! - a `Retry-After` (429, 503) is honoured, capped at the larger configured maximum;
//! - a factory reset forgets the assigned set (never the default set) and starts over as
//!   on first contact.

use alloc::collections::{BTreeMap, VecDeque};
use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::ops::Bound;

use serde::{Deserialize, Serialize};

use crate::api::{
    BucketDoc, BucketList, ErrorBody, HeldBucket, RegisterRequest, RegisterResponse,
    SoftwareUpdate, SubscribeRequest, UpdateOutcome, UpdateRequest, UpdateResponse,
};
use crate::credentials::{check_secret_shape, CredentialId, CredentialKind, Credentials};
use crate::synclog::apply_diff;
use crate::{BucketId, Fields, Millis, Value};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;

/// Consecutive registration redirects followed at once; beyond this each further redirect
/// waits out a back-off, so two tiers pointing at each other cannot make a device spin.
const MAX_IMMEDIATE_REDIRECTS: u32 = 4;

/// Everything a device is configured with; fixed for the client's life.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientConfig {
    /// The device's serial, sent on registration.
    pub device_id: String,
    /// Selects the device type's bucket template on registration.
    pub device_type: String,
    /// Running firmware version; drives tier redirection and update offers.
    pub sw_version: String,
    /// The registration server to contact first.
    pub base_url: String,
    /// Session id sent with subscribes and PUTs so the server does not echo this
    /// device's own writes back to it; empty sends none.
    pub session: String,
    /// How long the server should hold a subscribe; 0 leaves it to the server's default.
    pub subscribe_timeout_ms: u64,
    /// First retry delay after a transport failure or server error.
    pub backoff_initial_ms: u64,
    /// The retry delay stops doubling here.
    pub backoff_max_ms: u64,
    /// Seeds the retry jitter so a fleet spreads out yet every run is reproducible.
    pub jitter_seed: u64,
    /// The factory credentials (`d.<serial>.<key_id>`). Sent only to register, and only
    /// while no assigned set is held; never forgotten.
    pub default_credentials: Credentials,
    /// After the server rejects the default credentials (401), retries wait
    /// `backoff_initial_ms` doubled per consecutive rejection up to this. Also, with
    /// `backoff_max_ms`, bounds how long a server's `Retry-After` can make the device wait.
    pub auth_backoff_max_ms: u64,
    /// Makes this run's `op_id`s unique: a fresh random value at every start (the
    /// hardware RNG on a device), so no op id is ever reused after a reboot.
    pub op_id_nonce: u64,
    /// The largest subscribe answer body the device can take (its receive buffer less
    /// the headers); sent as `max_bytes`. 0: no limit.
    pub max_answer_bytes: u64,
    /// A sleeping device: when it syncs next, in ms from each register and subscribe
    /// (`next_sync_ms`: the server answers writers `delivery` and may push a wake-up);
    /// 0 for a device that stays connected.
    pub next_sync_ms: u64,
}

/// A request the driver must send to [`DeviceClient::base_url`].
#[derive(Debug, Clone, PartialEq)]
pub enum Request {
    /// `POST /v1/register`.
    Register(RegisterRequest),
    /// `GET /v1/buckets?view=full&ids=a,b`: the full contents of these buckets.
    Fetch {
        /// The buckets to read.
        ids: Vec<String>,
    },
    /// `POST /v1/subscribe`: a long poll that answers when a listed bucket differs.
    Subscribe(SubscribeRequest),
    /// `PUT /v1/buckets/{id}`: the coalesced local changes of one bucket.
    Put {
        /// The bucket written.
        id: String,
        /// The changed fields and the version they were based on.
        body: UpdateRequest,
    },
    /// `POST /v1/pairing-code` with no body: a short-lived code for a user to pair this
    /// device with (answered by [`Response::PairingCode`]).
    PairingCode,
}

impl Request {
    /// The HTTP method, so every driver maps requests the same way.
    pub fn method(&self) -> &'static str {
        match self {
            Request::Register(_) | Request::Subscribe(_) | Request::PairingCode => "POST",
            Request::Fetch { .. } => "GET",
            Request::Put { .. } => "PUT",
        }
    }

    /// The path and query below the base URL, so every driver maps requests the same way.
    /// Ids are validated bucket ids (`[A-Za-z0-9_.-]`), so nothing needs escaping.
    pub fn path(&self) -> String {
        match self {
            Request::Register(_) => "/v1/register".to_string(),
            Request::Fetch { ids } => format!("/v1/buckets?view=full&ids={}", ids.join(",")),
            Request::Subscribe(_) => "/v1/subscribe".to_string(),
            Request::Put { id, .. } => format!("/v1/buckets/{id}"),
            Request::PairingCode => "/v1/pairing-code".to_string(),
        }
    }
}

/// A request to send, with the token its answer must be handed back with.
#[derive(Debug, Clone, PartialEq)]
pub struct Outgoing {
    /// Echoed to [`DeviceClient::handle_response`]; tells a live answer from a stale one.
    pub token: u64,
    /// What to send.
    pub request: Request,
    /// The credentials to send it with, as HTTP Basic auth
    /// ([`crate::credentials::basic_header`]).
    pub auth: Credentials,
}

/// What came back for a request, as the driver decoded it.
#[derive(Debug, Clone, PartialEq)]
pub enum Response {
    /// 200 to a register.
    Registered(RegisterResponse),
    /// 200 to a fetch or a subscribe.
    Buckets(BucketList),
    /// 200 or 409 to a PUT, with its outcome body.
    Updated {
        /// The HTTP status (200 or 409); the body's outcome decides what happens.
        status: u16,
        /// The outcome and the bucket as the client must now hold it.
        body: UpdateResponse,
    },
    /// 200 to a pairing-code request.
    PairingCode {
        /// The code a user redeems with `POST /v1/pair`.
        code: String,
        /// Seconds until it expires.
        expires_in_s: u64,
    },
    /// Any other HTTP status, with the error body if it decoded.
    Error {
        /// The HTTP status.
        status: u16,
        /// The `{"error", "message"}` body, if there was one.
        body: Option<ErrorBody>,
        /// The `Retry-After` header (429, 503) in milliseconds, if there was one.
        retry_after_ms: Option<u64>,
    },
    /// No HTTP answer: the connection failed, was reset, or timed out.
    Transport,
}

/// Something the application should know about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The registration server accepted the device; syncing starts.
    Registered,
    /// The device belongs to another tier; registration continues at `url`.
    Redirected {
        /// The other tier's registration server.
        url: String,
    },
    /// Newer firmware is offered for this device type (`dfu::Image::from_offer` says
    /// whether the device can take it).
    SoftwareUpdate(SoftwareUpdate),
    /// A held bucket took a newer version (from the server or a PUT answer).
    BucketChanged {
        /// The bucket.
        id: String,
        /// Its version now.
        version: u64,
    },
    /// The server answered a PUT with an outcome; `Refused` means the change was dropped.
    ChangeAcked {
        /// The bucket written.
        id: String,
        /// What the server did with the change.
        outcome: UpdateOutcome,
        /// The write's op id.
        op_id: Option<String>,
        /// The version the answer carried.
        version: u64,
        /// The answer was the server's memory of an earlier attempt of this very write
        /// (whose answer was lost): it was applied once, not again.
        replayed: bool,
    },
    /// The server rejected a PUT outright (4xx); the change was dropped.
    ChangeRejected {
        /// The bucket written.
        id: String,
        /// The HTTP status (400 for an id that is not a valid bucket id, never sent).
        status: u16,
    },
    /// The server sent an older version than the one held; it was not applied.
    VersionRegression {
        /// The bucket.
        id: String,
        /// The version the client holds (and keeps).
        held: u64,
        /// The older version the server sent.
        received: u64,
    },
    /// A new assigned set was stored; every request from now on carries it. Firmware
    /// persists [`DeviceClient::assigned_credentials`] when it sees this.
    CredentialsStored {
        /// The set's id (never the secret).
        id: String,
    },
    /// A set offered by the server (or restored) was not this device's assigned set and
    /// was not stored.
    CredentialsIgnored {
        /// The offered id (never the secret).
        id: String,
    },
    /// The server rejected the stored assigned set (401): it was dropped, and the device
    /// registers again with its default credentials. Firmware erases its persisted copy.
    CredentialsDropped {
        /// The dropped set's id.
        id: String,
    },
    /// The server rejected the default credentials (401); registration is retried after
    /// an exponentially growing wait (seed 000: stolen device or stolen credentials).
    DefaultCredentialsRejected,
    /// The registration server accepted the device without issuing credentials;
    /// registration is retried after a back-off (FIG 28B operation 1820).
    CredentialsMissing,
    /// A pairing code to show the user.
    PairingCode {
        /// The code.
        code: String,
        /// Seconds until it expires.
        expires_in_s: u64,
    },
    /// The server refused the pairing-code request (4xx other than 401/408/429); it is not
    /// retried until the application asks again.
    PairingFailed {
        /// The HTTP status.
        status: u16,
    },
}

/// A bucket as this device holds it: the last server-confirmed state, which firmware
/// persists so a reboot resumes from its versions instead of fetching everything.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClientBucket {
    /// The bucket id.
    pub id: String,
    /// The server's timestamp (ms) for this version; 0 when the server did not say.
    pub timestamp: u64,
    /// The version held.
    pub version: u64,
    /// The contents at that version.
    pub value: Fields,
}

/// What the sync slot does next (and, when in flight, what its answer means).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Unregistered (or lost): register at the registration URL.
    Register,
    /// Registered: read every bucket in full.
    Fetch,
    /// In sync: hold a long-poll subscribe.
    Subscribe,
}

/// The sync request in flight: its token, what it was, the set it carried, and (for a
/// subscribe) the versions it told the server the device holds.
#[derive(Debug)]
struct SyncInFlight {
    token: u64,
    phase: Phase,
    auth: Credentials,
    versions: Vec<(String, Option<u64>)>,
}

/// A PUT in flight: which bucket, exactly what was sent (resent verbatim if its answer is
/// lost), and the set it carried.
#[derive(Debug)]
struct PutInFlight {
    token: u64,
    id: String,
    body: UpdateRequest,
    auth: Credentials,
}

/// A PUT sent whose answer never came: it may have been applied.
#[derive(Debug, Clone, PartialEq)]
struct InDoubt {
    id: String,
    body: UpdateRequest,
}

/// The pairing slot: whether the application wants a code, and the request in flight.
#[derive(Debug, Default)]
struct PairingSlot {
    wanted: bool,
    /// Token and carried set of the request in flight.
    in_flight: Option<(u64, Credentials)>,
    backoff: Backoff,
}

/// What a 401 meant, judged against the set the request carried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Unauthorized {
    /// The carried set was the stored assigned set; it is dropped and the device is
    /// unregistered.
    Dropped,
    /// The carried set was the default set and still the one in use; back off.
    DefaultRejected,
    /// The carried set is no longer the one in use (a newer one arrived, or it was already
    /// dropped): nothing is learned about the current set.
    Stale,
}

/// One slot's retry state.
#[derive(Debug, Default)]
struct Backoff {
    /// Consecutive failures.
    attempt: u32,
    /// The slot sends nothing before this time.
    until: Option<Millis>,
}

impl Backoff {
    fn ready(&self, now: Millis) -> bool {
        self.until.is_none_or(|t| now >= t)
    }

    /// Waits at least until `t` (a server's `Retry-After`).
    fn hold_until(&mut self, t: Millis) {
        self.until = Some(self.until.map_or(t, |u| u.max(t)));
    }

    fn succeed(&mut self) {
        self.attempt = 0;
        self.until = None;
    }

    /// Records a failure at `now` and waits: `initial` doubled per earlier consecutive
    /// failure, capped at `max`, minus up to a quarter of itself as jitter. Jitter only
    /// ever shortens the wait, so the cap holds, and below the cap each wait (at least ¾
    /// of twice the last base) is longer than the one before.
    fn fail(&mut self, now: Millis, initial: u64, max: u64, rng: &mut XorShift) {
        let factor = 1u64.checked_shl(self.attempt).unwrap_or(u64::MAX);
        let base = initial.saturating_mul(factor).min(max);
        let jitter = rng.next() % (base / 4 + 1);
        self.attempt = self.attempt.saturating_add(1);
        self.until = Some(now.saturating_add(base - jitter));
    }
}

/// Marsaglia's xorshift64: enough to spread retries, no `rand` on a microcontroller.
#[derive(Debug)]
struct XorShift(u64);

impl XorShift {
    fn new(seed: u64) -> Self {
        // Zero is xorshift's one fixed point; any other constant will do.
        XorShift(if seed == 0 {
            0x9E37_79B9_7F4A_7C15
        } else {
            seed
        })
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
}

/// How one bucket object from the server compared with the held copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Applied {
    /// Newer: it replaced the held copy.
    Accepted,
    /// The version already held.
    Same,
    /// Older, incomplete or contradictory: not applied, and resubscribing at once would
    /// only get the same answer again.
    Anomalous,
    /// A diff from a version not held: not applied; the next subscribe asks for the
    /// bucket's whole value.
    Unusable,
}

/// The device side of the sync protocol as a state machine; see the module docs.
#[derive(Debug)]
pub struct DeviceClient {
    cfg: ClientConfig,
    /// Where registration goes: the configured URL, or where a redirect pointed.
    register_url: String,
    /// Where everything after registration goes.
    sync_url: String,
    phase: Phase,
    /// The bucket ids the registration server named; what is fetched and subscribed.
    ids: Vec<String>,
    held: BTreeMap<String, ClientBucket>,
    /// Local changes not yet sent, coalesced per bucket.
    outbox: BTreeMap<String, Fields>,
    /// The PUT whose answer was lost, resent as it was before anything else.
    in_doubt: Option<InDoubt>,
    /// Op ids issued this run (with `op_id_nonce`, unique across runs).
    ops_issued: u64,
    /// Buckets whose diff could not be applied: the next subscribe asks for their value.
    refetch: Vec<String>,
    /// The bucket of the last PUT sent, so the outbox is served round-robin.
    last_put: Option<String>,
    sync_in_flight: Option<SyncInFlight>,
    put_in_flight: Option<PutInFlight>,
    sync_backoff: Backoff,
    put_backoff: Backoff,
    /// The assigned set, once the server issued one; preferred over the default set.
    assigned: Option<Credentials>,
    /// Consecutive 401s to the default set: gates registration while no assigned set is held.
    auth_backoff: Backoff,
    pairing: PairingSlot,
    redirects: u32,
    next_token: u64,
    rng: XorShift,
    events: VecDeque<Event>,
    /// Late answers dropped so far (see [`Self::late_answers`]).
    late_answers: u64,
}

impl DeviceClient {
    /// A client that has registered nothing and holds nothing (see [`Self::restore`]).
    pub fn new(cfg: ClientConfig) -> Self {
        DeviceClient {
            register_url: cfg.base_url.clone(),
            sync_url: String::new(),
            phase: Phase::Register,
            ids: Vec::new(),
            held: BTreeMap::new(),
            outbox: BTreeMap::new(),
            in_doubt: None,
            ops_issued: 0,
            refetch: Vec::new(),
            last_put: None,
            sync_in_flight: None,
            put_in_flight: None,
            sync_backoff: Backoff::default(),
            put_backoff: Backoff::default(),
            assigned: None,
            auth_backoff: Backoff::default(),
            pairing: PairingSlot::default(),
            redirects: 0,
            next_token: 1,
            rng: XorShift::new(cfg.jitter_seed),
            events: VecDeque::new(),
            late_answers: 0,
            cfg,
        }
    }

    /// Where the request just polled goes: the registration server (after any redirect)
    /// until registered, then the allocated sync server. PUTs are only polled once
    /// registered, so this is right for every request `poll_request` returns.
    pub fn base_url(&self) -> &str {
        match self.phase {
            Phase::Register => &self.register_url,
            Phase::Fetch | Phase::Subscribe => &self.sync_url,
        }
    }

    /// The next request to send now, if any; call until it returns `None`.
    pub fn poll_request(&mut self, now: Millis) -> Option<Outgoing> {
        if let Some(out) = self.poll_sync(now) {
            return Some(out);
        }
        if let Some(out) = self.poll_put(now) {
            return Some(out);
        }
        self.poll_pairing(now)
    }

    /// Feeds the answer to the request sent with `token`. Unknown tokens are ignored.
    pub fn handle_response(&mut self, now: Millis, token: u64, resp: Response) {
        if let Some(sync) = self.sync_in_flight.take_if(|s| s.token == token) {
            match sync.phase {
                Phase::Register => self.on_register(now, sync.auth, resp),
                Phase::Fetch => self.on_fetch(now, sync.auth, resp),
                Phase::Subscribe => self.on_subscribe(now, sync.auth, &sync.versions, resp),
            }
            return;
        }
        if let Some(put) = self.put_in_flight.take_if(|p| p.token == token) {
            self.on_put(now, put, resp);
            return;
        }
        if let Some((_, auth)) = self.pairing.in_flight.take_if(|(t, _)| *t == token) {
            self.on_pairing(now, auth, resp);
        }
    }

    /// When `poll_request` may next have something (a back-off ending); `None` when only
    /// an answer or a local change can make it send more.
    pub fn poll_timeout(&self) -> Option<Millis> {
        let sync = if self.sync_in_flight.is_none() && self.sync_wants_to_send() {
            self.sync_ready_at()
        } else {
            None
        };
        let put = if self.put_in_flight.is_none() && self.put_may_send() {
            self.put_backoff.until
        } else {
            None
        };
        let pairing = if self.pairing.in_flight.is_none() && self.pairing_may_send() {
            self.pairing.backoff.until
        } else {
            None
        };
        [sync, put, pairing].into_iter().flatten().min()
    }

    /// How many answers arrived older than the held copy but newer than what their request
    /// told the server: overtaken on the other slot (the device's own PUT answered first),
    /// dropped without an event. Not a fault; a simulator counts them to show it raced.
    pub fn late_answers(&self) -> u64 {
        self.late_answers
    }

    /// The next thing the application should know about, oldest first.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// Records a local change to send; a later value for the same field replaces an
    /// earlier unsent one. An id that is not a valid bucket id is rejected at once
    /// (`ChangeRejected` with 400), as the server would.
    pub fn set_field(&mut self, bucket: &str, field: &str, value: Value) {
        if BucketId::parse(bucket).is_err() {
            self.events.push_back(Event::ChangeRejected {
                id: bucket.to_string(),
                status: 400,
            });
            return;
        }
        self.outbox
            .entry(bucket.to_string())
            .or_default()
            .insert(field.to_string(), value);
    }

    /// The link went down: every request in flight is lost (their answers will be
    /// ignored), an in-flight PUT is in doubt (resent as it was, same op id), and both
    /// slots back off before resubscribing with the held versions and resending.
    pub fn link_down(&mut self, now: Millis) {
        self.sync_in_flight = None;
        if let Some(put) = self.put_in_flight.take() {
            self.doubt(put);
        }
        self.fail_sync(now);
        self.fail_put(now);
        if self.pairing.in_flight.take().is_some() {
            self.fail_pairing(now);
        }
    }

    // -----------------------------------------------------------------------------------
    // credentials and pairing

    /// Stores a set the server sent in `X-Tether-Set-Credentials`. Call it the moment the
    /// header is seen, on any answer — a held subscribe's headers arrive long before its
    /// body — before (or without) the matching `handle_response`. Every request polled
    /// afterwards carries the new set; requests already in flight keep the set they
    /// carried. Only an assigned set (`a.<serial>`, well-formed secret) for this device's
    /// serial is stored ([`Event::CredentialsStored`]); anything else is reported as
    /// [`Event::CredentialsIgnored`] and changes nothing.
    pub fn accept_credentials(&mut self, c: Credentials) {
        if !self.is_own_assigned(&c) {
            self.events
                .push_back(Event::CredentialsIgnored { id: c.id.clone() });
            return;
        }
        if self.assigned.as_ref() == Some(&c) {
            return;
        }
        self.events
            .push_back(Event::CredentialsStored { id: c.id.clone() });
        self.assigned = Some(c);
    }

    /// The assigned set held, for firmware to persist across reboots (see
    /// [`Self::restore_credentials`]).
    pub fn assigned_credentials(&self) -> Option<&Credentials> {
        self.assigned.as_ref()
    }

    /// Loads an assigned set persisted across a reboot (before the first `poll_request`),
    /// so the device returns with it instead of its default set. A set that is not this
    /// device's assigned set is ignored ([`Event::CredentialsIgnored`]).
    pub fn restore_credentials(&mut self, c: Credentials) {
        if self.is_own_assigned(&c) {
            self.assigned = Some(c);
        } else {
            self.events
                .push_back(Event::CredentialsIgnored { id: c.id.clone() });
        }
    }

    /// The user reset the device to factory defaults (seed 000: "clears its assigned
    /// credentials and reverts to the initial contact behavior"). The assigned set, the
    /// registration, every held bucket and every unsent change are forgotten; requests in
    /// flight are abandoned (their answers ignored). The default credentials stay, and so
    /// do the back-off states, so resetting cannot be used to retry faster.
    pub fn factory_reset(&mut self) {
        self.assigned = None;
        self.phase = Phase::Register;
        self.register_url = self.cfg.base_url.clone();
        self.sync_url.clear();
        self.ids.clear();
        self.held.clear();
        self.outbox.clear();
        self.in_doubt = None;
        self.refetch.clear();
        self.last_put = None;
        self.sync_in_flight = None;
        self.put_in_flight = None;
        self.put_backoff.succeed();
        self.pairing = PairingSlot::default();
        self.redirects = 0;
    }

    /// Asks for a pairing code ([`Request::PairingCode`]) to show the user; the answer
    /// comes as [`Event::PairingCode`]. It is sent once the device is registered with an
    /// assigned set, and retried like any request on transport and server errors. Asking
    /// again while one is pending asks once.
    pub fn request_pairing_code(&mut self) {
        self.pairing.wanted = true;
    }

    fn is_own_assigned(&self, c: &Credentials) -> bool {
        matches!(c.parsed_id(), Ok(CredentialId::Assigned { serial }) if serial == self.cfg.device_id)
            && check_secret_shape(CredentialKind::Assigned, &c.secret).is_ok()
    }

    /// The set a request sends now: the assigned set when one is held; the default set
    /// only to register.
    fn credentials_for(&self, phase: Phase) -> Option<Credentials> {
        match (&self.assigned, phase) {
            (Some(a), _) => Some(a.clone()),
            (None, Phase::Register) => Some(self.cfg.default_credentials.clone()),
            (None, Phase::Fetch | Phase::Subscribe) => None,
        }
    }

    /// A 401 answered a request that carried `carried`. A 401 says something about
    /// credentials only if the request carried some; every request this client sends
    /// does (`Outgoing::auth`), so the verdict is always about `carried` — never about
    /// whatever set is held by the time the answer arrives.
    fn unauthorized(&mut self, now: Millis, carried: &Credentials) -> Unauthorized {
        if self.assigned.as_ref() == Some(carried) {
            // FIG 30B: discard the rejected set, register again with the default set. The
            // sync back-off (reset only by a fetch/subscribe that worked) keeps a server
            // that issues sets it then rejects from making the device spin.
            self.assigned = None;
            self.events.push_back(Event::CredentialsDropped {
                id: carried.id.clone(),
            });
            self.phase = Phase::Register;
            self.sync_in_flight = None;
            self.fail_sync(now);
            Unauthorized::Dropped
        } else if self.assigned.is_none() && *carried == self.cfg.default_credentials {
            let (initial, max) = (self.cfg.backoff_initial_ms, self.cfg.auth_backoff_max_ms);
            self.auth_backoff.fail(now, initial, max, &mut self.rng);
            self.events.push_back(Event::DefaultCredentialsRejected);
            Unauthorized::DefaultRejected
        } else {
            Unauthorized::Stale
        }
    }

    /// The longest wait a server's `Retry-After` may impose.
    fn retry_after_cap(&self) -> u64 {
        self.cfg.backoff_max_ms.max(self.cfg.auth_backoff_max_ms)
    }

    /// `now` + the answer's `Retry-After` (capped), if it had one.
    fn retry_after(&self, now: Millis, resp: &Response) -> Option<Millis> {
        match resp {
            Response::Error {
                retry_after_ms: Some(ms),
                ..
            } => Some(now.saturating_add((*ms).min(self.retry_after_cap()))),
            _ => None,
        }
    }

    /// The held copy of a bucket, if any version of it is held.
    pub fn bucket(&self, id: &str) -> Option<&ClientBucket> {
        self.held.get(id)
    }

    /// Every held bucket, in id order.
    pub fn buckets(&self) -> impl Iterator<Item = &ClientBucket> + '_ {
        self.held.values()
    }

    /// The unsent local changes of a bucket (a PUT in flight or in doubt is not included).
    pub fn pending(&self, id: &str) -> Option<&Fields> {
        self.outbox.get(id)
    }

    /// The PUT whose answer was lost, resent verbatim (same op id) before anything else:
    /// its bucket and body.
    pub fn in_doubt(&self) -> Option<(&str, &UpdateRequest)> {
        self.in_doubt.as_ref().map(|d| (d.id.as_str(), &d.body))
    }

    /// Registered, fetched (or restored), and nothing pending: every local change is
    /// acknowledged and the subscription is not backing off. It cannot say whether the
    /// server holds a change it has not announced yet.
    pub fn is_synced(&self) -> bool {
        self.phase == Phase::Subscribe
            && self.outbox.is_empty()
            && self.in_doubt.is_none()
            && self.put_in_flight.is_none()
            && self.sync_backoff.attempt == 0
    }

    /// Loads buckets persisted across a reboot, so registration can skip the full fetch
    /// and subscribe with their versions. A restored bucket never replaces a newer held one.
    pub fn restore(&mut self, buckets: impl IntoIterator<Item = ClientBucket>) {
        for b in buckets {
            let newer = self.held.get(&b.id).is_none_or(|h| b.version > h.version);
            if newer {
                self.held.insert(b.id.clone(), b);
            }
        }
    }

    /// A copy of every held bucket, for firmware to persist (see [`Self::restore`]).
    pub fn snapshot(&self) -> Vec<ClientBucket> {
        self.held.values().cloned().collect()
    }

    // -----------------------------------------------------------------------------------
    // the sync slot: register → fetch → subscribe

    fn sync_wants_to_send(&self) -> bool {
        // With no buckets there is nothing to watch; the slot idles until re-registration.
        self.phase == Phase::Register || !self.ids.is_empty()
    }

    /// When the sync slot may send next: its own back-off, and while registering with the
    /// default set, the default set's back-off too.
    fn sync_ready_at(&self) -> Option<Millis> {
        let auth = if self.phase == Phase::Register && self.assigned.is_none() {
            self.auth_backoff.until
        } else {
            None
        };
        self.sync_backoff.until.max(auth)
    }

    fn poll_sync(&mut self, now: Millis) -> Option<Outgoing> {
        if self.assigned.is_none() {
            // Only registration may go out without an assigned set (never reached: every
            // path that drops the set also unregisters).
            self.phase = Phase::Register;
        }
        if self.sync_in_flight.is_some()
            || !self.sync_wants_to_send()
            || self.sync_ready_at().is_some_and(|t| now < t)
        {
            return None;
        }
        let auth = self.credentials_for(self.phase)?;
        let request = match self.phase {
            Phase::Register => Request::Register(RegisterRequest {
                next_sync_ms: (self.cfg.next_sync_ms > 0).then_some(self.cfg.next_sync_ms),
                device_id: self.cfg.device_id.clone(),
                device_type: self.cfg.device_type.clone(),
                sw_version: self.cfg.sw_version.clone(),
            }),
            Phase::Fetch => Request::Fetch {
                ids: self.ids.clone(),
            },
            Phase::Subscribe => Request::Subscribe(SubscribeRequest {
                next_sync_ms: (self.cfg.next_sync_ms > 0).then_some(self.cfg.next_sync_ms),
                buckets: self.ids.iter().map(|id| self.held_version(id)).collect(),
                session: self.session(),
                timeout_ms: (self.cfg.subscribe_timeout_ms > 0)
                    .then_some(self.cfg.subscribe_timeout_ms),
                diffs: true,
                max_bytes: (self.cfg.max_answer_bytes > 0).then_some(self.cfg.max_answer_bytes),
                stream: false,
            }),
        };
        let token = self.token();
        let versions = match &request {
            Request::Subscribe(sub) => sub
                .buckets
                .iter()
                .map(|h| (h.id.clone(), h.version))
                .collect(),
            _ => Vec::new(),
        };
        self.sync_in_flight = Some(SyncInFlight {
            token,
            phase: self.phase,
            auth: auth.clone(),
            versions,
        });
        Some(Outgoing {
            token,
            request,
            auth,
        })
    }

    fn held_version(&self, id: &str) -> HeldBucket {
        // A bucket whose diff did not fit the held copy is asked for whole: no version.
        let held = self
            .held
            .get(id)
            .filter(|_| !self.refetch.iter().any(|r| r == id));
        HeldBucket {
            id: id.to_string(),
            // 0 means the server never said; sending it would make the server see a
            // difference on every subscribe.
            timestamp: held.map(|b| b.timestamp).filter(|&t| t != 0),
            version: held.map(|b| b.version),
        }
    }

    fn on_register(&mut self, now: Millis, carried: Credentials, resp: Response) {
        let r = match resp {
            Response::Registered(r) => r,
            // Any failure means: try again later (401: see `unauthorized`).
            other => return self.sync_failed(now, &carried, &other),
        };
        if let Some(url) = r.redirect.filter(|u| !u.is_empty()) {
            self.register_url = url.clone();
            self.events.push_back(Event::Redirected { url });
            self.redirects = self.redirects.saturating_add(1);
            if self.redirects > MAX_IMMEDIATE_REDIRECTS {
                self.fail_sync(now);
            }
            return;
        }
        self.redirects = 0;
        if self.assigned.is_none() {
            // FIG 28B operation 1820: no assigned credentials came back; back off, retry.
            self.events.push_back(Event::CredentialsMissing);
            return self.fail_sync(now);
        }
        // The default set (if that is what was sent) worked.
        self.auth_backoff.succeed();
        self.sync_url = r.sync_url;
        self.ids = r.buckets;
        self.events.push_back(Event::Registered);
        if let Some(u) = r.software_update {
            self.events.push_back(Event::SoftwareUpdate(u));
        }
        // A device restored from flash with a version of every bucket subscribes at once:
        // the server answers immediately with whatever differs.
        let holds_all = self.ids.iter().all(|id| self.held.contains_key(id));
        self.phase = if holds_all {
            Phase::Subscribe
        } else {
            Phase::Fetch
        };
        // Registration alone does not reset the back-off: only a sync exchange does, so a
        // server that registers the device and then 404s its buckets cannot make it spin.
    }

    fn on_fetch(&mut self, now: Millis, carried: Credentials, resp: Response) {
        match resp {
            Response::Buckets(list) => {
                for doc in list.buckets {
                    self.apply_doc(doc, None);
                }
                self.phase = Phase::Subscribe;
                self.sync_backoff.succeed();
            }
            other => self.sync_failed(now, &carried, &other),
        }
    }

    fn on_subscribe(
        &mut self,
        now: Millis,
        carried: Credentials,
        versions: &[(String, Option<u64>)],
        resp: Response,
    ) {
        match resp {
            Response::Buckets(list) => {
                let mut accepted = false;
                let mut anomalous = false;
                for doc in list.buckets {
                    let told = versions
                        .iter()
                        .find(|(id, _)| *id == doc.id)
                        .and_then(|(_, v)| *v);
                    match self.apply_doc(doc, told) {
                        // A diff that did not fit asks for the whole value at once.
                        Applied::Accepted | Applied::Unusable => accepted = true,
                        Applied::Same => {}
                        Applied::Anomalous => anomalous = true,
                    }
                }
                // An empty answer (timeout) or one that moved us forward: resubscribe at
                // once. One that only carried what we will not apply would come straight
                // back, so wait first.
                if anomalous && !accepted {
                    self.fail_sync(now);
                } else {
                    self.sync_backoff.succeed();
                }
            }
            other => self.sync_failed(now, &carried, &other),
        }
    }

    /// A failed register, fetch or subscribe that carried `carried`. A 401 is judged by
    /// [`Self::unauthorized`]: a stale one resends at once with the set now held, a dropped
    /// set registers again after the sync back-off, a rejected default set waits out the
    /// default set's own back-off. A 404 means the server lost the device's buckets (or
    /// the device moved), so register again; anything else retries the same request.
    fn sync_failed(&mut self, now: Millis, carried: &Credentials, resp: &Response) {
        match resp {
            Response::Error { status: 401, .. } => {
                // Every outcome has already arranged its own wait (or none).
                let _ = self.unauthorized(now, carried);
            }
            Response::Error { status: 404, .. } => {
                self.phase = Phase::Register;
                self.fail_sync(now);
            }
            _ => self.fail_sync(now),
        }
        if let Some(t) = self.retry_after(now, resp) {
            self.sync_backoff.hold_until(t);
        }
    }

    /// Applies one bucket object from a fetch or subscribe answer under the monotonic rule:
    /// a whole value, or a diff from the version held. `told`: the version the request
    /// said the device held (see [`Self::offer`]).
    fn apply_doc(&mut self, doc: BucketDoc, told: Option<u64>) -> Applied {
        if !self.ids.contains(&doc.id) {
            return Applied::Anomalous;
        }
        let Some(version) = doc.version else {
            return Applied::Anomalous;
        };
        let value = match (doc.value, doc.base_version, doc.changes) {
            (Some(value), _, _) => value,
            (None, Some(base), Some(changes)) => {
                match self.held.get(&doc.id) {
                    Some(h) if h.version == base && version > base => {
                        let mut value = h.value.clone();
                        apply_diff(&mut value, &changes);
                        value
                    }
                    // Already there (or further): nothing to apply.
                    Some(h) if version <= h.version => {
                        return self.offer(
                            told,
                            doc.id,
                            doc.timestamp.unwrap_or(0),
                            version,
                            Fields::new(),
                        );
                    }
                    // A diff from a version this device does not hold: ask for the whole
                    // value next time.
                    _ => {
                        if !self.refetch.contains(&doc.id) {
                            self.refetch.push(doc.id);
                        }
                        return Applied::Unusable;
                    }
                }
            }
            _ => return Applied::Anomalous,
        };
        self.refetch.retain(|r| *r != doc.id);
        self.offer(told, doc.id, doc.timestamp.unwrap_or(0), version, value)
    }

    /// Replaces the held copy of `id` if `version` is newer; never goes backwards. An older
    /// version is a regression — unless the request it answers told the server an even
    /// older one (`told`): then it is a late answer, overtaken by a newer one on the other
    /// slot (a subscribe answered before the device's own PUT committed, delivered after
    /// that PUT's answer), and is dropped without an event.
    fn offer(
        &mut self,
        told: Option<u64>,
        id: String,
        timestamp: u64,
        version: u64,
        value: Fields,
    ) -> Applied {
        if let Some(h) = self.held.get(&id) {
            if version < h.version && told.is_some_and(|t| t < version) {
                self.late_answers += 1;
                return Applied::Same;
            }
            if version < h.version {
                self.events.push_back(Event::VersionRegression {
                    id,
                    held: h.version,
                    received: version,
                });
                return Applied::Anomalous;
            }
            if version == h.version {
                // One version is one state; a different timestamp for it is a server fault
                // that resubscribing at once would only repeat.
                let contradicts = timestamp != 0 && h.timestamp != 0 && timestamp != h.timestamp;
                return if contradicts {
                    Applied::Anomalous
                } else {
                    Applied::Same
                };
            }
        }
        self.events.push_back(Event::BucketChanged {
            id: id.clone(),
            version,
        });
        self.held.insert(
            id.clone(),
            ClientBucket {
                id,
                timestamp,
                version,
                value,
            },
        );
        Applied::Accepted
    }

    // -----------------------------------------------------------------------------------
    // the put slot

    fn put_may_send(&self) -> bool {
        // Before registration there is no sync server, and before the fetch no base version.
        self.phase == Phase::Subscribe
            && self.assigned.is_some()
            && (self.in_doubt.is_some() || !self.outbox.is_empty())
    }

    /// A fresh op id: this run's nonce and a counter, `[A-Za-z0-9_-]`, at most 32 chars.
    fn next_op_id(&mut self) -> String {
        self.ops_issued = self.ops_issued.wrapping_add(1);
        let mut op = URL_SAFE_NO_PAD.encode(self.cfg.op_id_nonce.to_le_bytes());
        op.push('-');
        op.push_str(&self.ops_issued.to_string());
        op
    }

    fn poll_put(&mut self, now: Millis) -> Option<Outgoing> {
        if self.put_in_flight.is_some() || !self.put_may_send() || !self.put_backoff.ready(now) {
            return None;
        }
        let auth = self.credentials_for(self.phase)?;
        // A write whose answer was lost goes again first, exactly as it was.
        let (id, body) = match self.in_doubt.take() {
            Some(InDoubt { id, body }) => (id, body),
            None => {
                // Round-robin from the bucket after the last one sent, so a bucket edited
                // faster than a round trip cannot starve the others.
                let next = match &self.last_put {
                    Some(last) => self
                        .outbox
                        .range::<str, _>((Bound::Excluded(last.as_str()), Bound::Unbounded))
                        .next()
                        .map(|(k, _)| k.clone()),
                    None => None,
                };
                let id = next.or_else(|| self.outbox.keys().next().cloned())?;
                let value = self.outbox.remove(&id)?;
                let body = UpdateRequest {
                    value,
                    base_version: self.held.get(&id).map_or(0, |b| b.version),
                    occ: false,
                    session: self.session(),
                    op_id: Some(self.next_op_id()),
                };
                self.last_put = Some(id.clone());
                (id, body)
            }
        };
        let token = self.token();
        self.put_in_flight = Some(PutInFlight {
            token,
            id: id.clone(),
            body: body.clone(),
            auth: auth.clone(),
        });
        Some(Outgoing {
            token,
            request: Request::Put { id, body },
            auth,
        })
    }

    fn on_put(&mut self, now: Millis, put: PutInFlight, resp: Response) {
        match resp {
            Response::Updated { status: _, body } => {
                self.put_backoff.succeed();
                self.on_update(put, body);
            }
            Response::Error { status: 401, .. } => {
                // Not the change's fault, and the server may never have seen it: resent
                // as it was (same op id) with the set now held, or after re-registering.
                let carried = put.auth.clone();
                self.doubt(put);
                if self.unauthorized(now, &carried) == Unauthorized::DefaultRejected {
                    self.fail_put(now);
                }
            }
            Response::Error { status, .. } if retryable(status) => {
                // A 5xx may come after the write was applied (the owner died answering):
                // the same op id makes the retry safe.
                let retry_after = self.retry_after(now, &resp);
                self.doubt(put);
                self.fail_put(now);
                if let Some(t) = retry_after {
                    self.put_backoff.hold_until(t);
                }
            }
            Response::Error { status, .. } => {
                // 403 lands here too: this principal may not write the bucket. 422: the
                // op id was taken by another write (never, for this client's fresh ids).
                self.put_backoff.succeed();
                self.events
                    .push_back(Event::ChangeRejected { id: put.id, status });
            }
            // A transport failure (timeout, dropped connection: the write may or may not
            // have been applied), or an answer that makes no sense for a PUT.
            Response::Transport
            | Response::Registered(_)
            | Response::Buckets(_)
            | Response::PairingCode { .. } => {
                self.doubt(put);
                self.fail_put(now);
            }
        }
    }

    fn on_update(&mut self, put: PutInFlight, body: UpdateResponse) {
        let PutInFlight { id, body: sent, .. } = put;
        let outcome = body.outcome;
        let version = body.version;
        let told = Some(sent.base_version);
        match (outcome, body.value) {
            // Merged or refused: the server sent the whole bucket as it now stands.
            (UpdateOutcome::Merged | UpdateOutcome::Refused, Some(value)) => {
                self.offer(told, id.clone(), body.timestamp, body.version, value);
            }
            // Refused without a body: the change is dropped and nothing is learned.
            (UpdateOutcome::Refused, None) => {}
            // Applied (or a merge that omitted the bucket): the stored state is what the
            // client held plus the fields it sent.
            (UpdateOutcome::Applied | UpdateOutcome::Merged, _) => {
                let newer = self.held.get(&id).is_none_or(|h| body.version > h.version);
                if newer {
                    let mut value = self
                        .held
                        .get(&id)
                        .map(|h| h.value.clone())
                        .unwrap_or_default();
                    value.extend(sent.value);
                    self.offer(told, id.clone(), body.timestamp, body.version, value);
                }
            }
        }
        self.events.push_back(Event::ChangeAcked {
            id,
            outcome,
            op_id: sent.op_id,
            version,
            replayed: body.replayed,
        });
    }

    // -----------------------------------------------------------------------------------
    // the pairing slot

    fn pairing_may_send(&self) -> bool {
        // A pairing code is for a registered device, asked with its assigned set.
        self.pairing.wanted && self.phase != Phase::Register && self.assigned.is_some()
    }

    fn poll_pairing(&mut self, now: Millis) -> Option<Outgoing> {
        if self.pairing.in_flight.is_some()
            || !self.pairing_may_send()
            || !self.pairing.backoff.ready(now)
        {
            return None;
        }
        let auth = self.credentials_for(self.phase)?;
        let token = self.token();
        self.pairing.in_flight = Some((token, auth.clone()));
        Some(Outgoing {
            token,
            request: Request::PairingCode,
            auth,
        })
    }

    fn on_pairing(&mut self, now: Millis, carried: Credentials, resp: Response) {
        match resp {
            Response::PairingCode { code, expires_in_s } => {
                self.pairing.wanted = false;
                self.pairing.backoff.succeed();
                self.events
                    .push_back(Event::PairingCode { code, expires_in_s });
            }
            Response::Error { status: 401, .. } => {
                // Still wanted: resent with the set now held, or after re-registering.
                if self.unauthorized(now, &carried) == Unauthorized::DefaultRejected {
                    self.fail_pairing(now);
                }
            }
            Response::Error { status, .. } if retryable(status) => {
                self.fail_pairing(now);
                if let Some(t) = self.retry_after(now, &resp) {
                    self.pairing.backoff.hold_until(t);
                }
            }
            Response::Error { status, .. } => {
                self.pairing.wanted = false;
                self.pairing.backoff.succeed();
                self.events.push_back(Event::PairingFailed { status });
            }
            Response::Transport
            | Response::Registered(_)
            | Response::Buckets(_)
            | Response::Updated { .. } => self.fail_pairing(now),
        }
    }

    /// A PUT got no answer: it may have been applied, so it is resent exactly as it was
    /// (same op id, same base version) before any other change.
    fn doubt(&mut self, put: PutInFlight) {
        self.in_doubt = Some(InDoubt {
            id: put.id,
            body: put.body,
        });
    }

    // -----------------------------------------------------------------------------------
    // shared

    fn session(&self) -> Option<String> {
        (!self.cfg.session.is_empty()).then(|| self.cfg.session.clone())
    }

    fn token(&mut self) -> u64 {
        let t = self.next_token;
        self.next_token = self.next_token.wrapping_add(1);
        t
    }

    fn fail_sync(&mut self, now: Millis) {
        let (initial, max) = (self.cfg.backoff_initial_ms, self.cfg.backoff_max_ms);
        self.sync_backoff.fail(now, initial, max, &mut self.rng);
    }

    fn fail_put(&mut self, now: Millis) {
        let (initial, max) = (self.cfg.backoff_initial_ms, self.cfg.backoff_max_ms);
        self.put_backoff.fail(now, initial, max, &mut self.rng);
    }

    fn fail_pairing(&mut self, now: Millis) {
        let (initial, max) = (self.cfg.backoff_initial_ms, self.cfg.backoff_max_ms);
        self.pairing.backoff.fail(now, initial, max, &mut self.rng);
    }
}

/// Statuses that say "not now" rather than "never": the change is kept and retried.
fn retryable(status: u16) -> bool {
    status >= 500 || status == 408 || status == 429
}
