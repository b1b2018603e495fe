//! The sans-IO device client of seed 000 (FIG 15B registration, FIG 19B/20 fetch,
//! FIG 21B subscribe, FIG 22A/22B update): events in, requests out.
//!
//! [`DeviceClient`] owns everything a device knows about its buckets and decides every
//! request it makes, but never touches a socket or a clock. A driver (the device
//! simulator's HTTP loop, the firmware task) runs it like this:
//!
//! ```text
//! loop {
//!     while let Some(out) = client.poll_request(now) { send out.request to client.base_url(), tagged with out.token }
//!     while let Some(ev) = client.poll_event() { act on ev }
//!     wait until an HTTP answer arrives (→ handle_response(now, token, resp)),
//!         client.poll_timeout() passes, the application calls set_field, or the link drops (→ link_down)
//! }
//! ```
//!
//! Two request slots can be in flight at once: the *sync* slot (register, then fetch,
//! then the long-poll subscribe, one at a time) and the *put* slot (one PUT). Each slot
//! backs off on its own. Every request carries a fresh token; an answer whose token is not
//! in flight any more (after [`DeviceClient::link_down`], or a duplicate) is ignored.
//!
//! The driver times its requests out itself (a subscribe needs `subscribe_timeout_ms` plus
//! a margin) and reports a timeout as [`Response::Transport`].
//!
//! Rules kept here, in one place:
//! - a held bucket's version never goes backwards: an answer only replaces a held bucket
//!   when it carries a greater version; a lower one is reported as
//!   [`Event::VersionRegression`] and never applied (DESIGN.md §7 invariant 2, as seen
//!   by this client);
//! - local changes coalesce per bucket (a later value for a field wins) and are sent one
//!   PUT at a time; a PUT lost to the network or a server error goes back into the outbox
//!   beneath any newer local edit of the same field, so newer local edits always win.

use alloc::collections::{BTreeMap, VecDeque};
use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::ops::Bound;

use serde::{Deserialize, Serialize};

use crate::api::{
    BucketDoc, BucketList, ErrorBody, HeldBucket, RegisterRequest, RegisterResponse,
    SubscribeRequest, UpdateOutcome, UpdateRequest, UpdateResponse,
};
use crate::{BucketId, Fields, Millis, Value};

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
}

impl Request {
    /// The HTTP method, so every driver maps requests the same way.
    pub fn method(&self) -> &'static str {
        match self {
            Request::Register(_) | Request::Subscribe(_) => "POST",
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
    /// Any other HTTP status, with the error body if it decoded.
    Error {
        /// The HTTP status.
        status: u16,
        /// The `{"error", "message"}` body, if there was one.
        body: Option<ErrorBody>,
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
    /// Newer firmware is offered for this device type.
    SoftwareUpdate {
        /// The version offered.
        version: String,
        /// Where to fetch it.
        url: String,
    },
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

/// The PUT in flight: which bucket and exactly which fields, to merge or put back.
#[derive(Debug)]
struct PutInFlight {
    token: u64,
    id: String,
    sent: Fields,
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

    fn succeed(&mut self) {
        self.attempt = 0;
        self.until = None;
    }

    /// Records a failure at `now` and waits: `backoff_initial_ms` doubled per earlier
    /// consecutive failure, capped at `backoff_max_ms`, minus up to a quarter of itself as
    /// jitter. Jitter only ever shortens the wait, so the cap holds, and below the cap
    /// each wait (at least ¾ of twice the last base) is longer than the one before.
    fn fail(&mut self, now: Millis, cfg: &ClientConfig, rng: &mut XorShift) {
        let factor = 1u64.checked_shl(self.attempt).unwrap_or(u64::MAX);
        let base = cfg
            .backoff_initial_ms
            .saturating_mul(factor)
            .min(cfg.backoff_max_ms);
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
    /// The bucket of the last PUT sent, so the outbox is served round-robin.
    last_put: Option<String>,
    sync_in_flight: Option<(u64, Phase)>,
    put_in_flight: Option<PutInFlight>,
    sync_backoff: Backoff,
    put_backoff: Backoff,
    redirects: u32,
    next_token: u64,
    rng: XorShift,
    events: VecDeque<Event>,
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
            last_put: None,
            sync_in_flight: None,
            put_in_flight: None,
            sync_backoff: Backoff::default(),
            put_backoff: Backoff::default(),
            redirects: 0,
            next_token: 1,
            rng: XorShift::new(cfg.jitter_seed),
            events: VecDeque::new(),
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
        self.poll_put(now)
    }

    /// Feeds the answer to the request sent with `token`. Unknown tokens are ignored.
    pub fn handle_response(&mut self, now: Millis, token: u64, resp: Response) {
        match self.sync_in_flight {
            Some((t, phase)) if t == token => {
                self.sync_in_flight = None;
                match phase {
                    Phase::Register => self.on_register(now, resp),
                    Phase::Fetch => self.on_fetch(now, resp),
                    Phase::Subscribe => self.on_subscribe(now, resp),
                }
                return;
            }
            _ => {}
        }
        if let Some(put) = self.put_in_flight.take_if(|p| p.token == token) {
            self.on_put(now, put, resp);
        }
    }

    /// When `poll_request` may next have something (a back-off ending); `None` when only
    /// an answer or a local change can make it send more.
    pub fn poll_timeout(&self) -> Option<Millis> {
        let sync = if self.sync_in_flight.is_none() && self.sync_wants_to_send() {
            self.sync_backoff.until
        } else {
            None
        };
        let put = if self.put_in_flight.is_none() && self.put_may_send() {
            self.put_backoff.until
        } else {
            None
        };
        match (sync, put) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
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
    /// ignored), an in-flight PUT's fields go back into the outbox, and both slots back
    /// off before resubscribing with the held versions and resending.
    pub fn link_down(&mut self, now: Millis) {
        self.sync_in_flight = None;
        if let Some(put) = self.put_in_flight.take() {
            self.requeue(put);
        }
        self.fail_sync(now);
        self.fail_put(now);
    }

    /// The held copy of a bucket, if any version of it is held.
    pub fn bucket(&self, id: &str) -> Option<&ClientBucket> {
        self.held.get(id)
    }

    /// Every held bucket, in id order.
    pub fn buckets(&self) -> impl Iterator<Item = &ClientBucket> + '_ {
        self.held.values()
    }

    /// The unsent local changes of a bucket (a PUT in flight is not included).
    pub fn pending(&self, id: &str) -> Option<&Fields> {
        self.outbox.get(id)
    }

    /// Registered, fetched (or restored), and nothing pending: every local change is
    /// acknowledged and the subscription is not backing off. It cannot say whether the
    /// server holds a change it has not announced yet.
    pub fn is_synced(&self) -> bool {
        self.phase == Phase::Subscribe
            && self.outbox.is_empty()
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

    fn poll_sync(&mut self, now: Millis) -> Option<Outgoing> {
        if self.sync_in_flight.is_some()
            || !self.sync_wants_to_send()
            || !self.sync_backoff.ready(now)
        {
            return None;
        }
        let request = match self.phase {
            Phase::Register => Request::Register(RegisterRequest {
                device_id: self.cfg.device_id.clone(),
                device_type: self.cfg.device_type.clone(),
                sw_version: self.cfg.sw_version.clone(),
            }),
            Phase::Fetch => Request::Fetch {
                ids: self.ids.clone(),
            },
            Phase::Subscribe => Request::Subscribe(SubscribeRequest {
                buckets: self.ids.iter().map(|id| self.held_version(id)).collect(),
                session: self.session(),
                timeout_ms: (self.cfg.subscribe_timeout_ms > 0)
                    .then_some(self.cfg.subscribe_timeout_ms),
            }),
        };
        let token = self.token();
        self.sync_in_flight = Some((token, self.phase));
        Some(Outgoing { token, request })
    }

    fn held_version(&self, id: &str) -> HeldBucket {
        let held = self.held.get(id);
        HeldBucket {
            id: id.to_string(),
            // 0 means the server never said; sending it would make the server see a
            // difference on every subscribe.
            timestamp: held.map(|b| b.timestamp).filter(|&t| t != 0),
            version: held.map(|b| b.version),
        }
    }

    fn on_register(&mut self, now: Millis, resp: Response) {
        let r = match resp {
            Response::Registered(r) => r,
            // Any failure, including 401/403, means: try again later. Obtaining and
            // presenting credentials is the credentials issue's part of the protocol;
            // this state machine only keeps the device from hammering the server.
            _ => return self.fail_sync(now),
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
        self.sync_url = r.sync_url;
        self.ids = r.buckets;
        self.events.push_back(Event::Registered);
        if let Some(u) = r.software_update {
            self.events.push_back(Event::SoftwareUpdate {
                version: u.version,
                url: u.url,
            });
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

    fn on_fetch(&mut self, now: Millis, resp: Response) {
        match resp {
            Response::Buckets(list) => {
                for doc in list.buckets {
                    self.apply_doc(doc);
                }
                self.phase = Phase::Subscribe;
                self.sync_backoff.succeed();
            }
            other => self.sync_failed(now, &other),
        }
    }

    fn on_subscribe(&mut self, now: Millis, resp: Response) {
        match resp {
            Response::Buckets(list) => {
                let mut accepted = false;
                let mut anomalous = false;
                for doc in list.buckets {
                    match self.apply_doc(doc) {
                        Applied::Accepted => accepted = true,
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
            other => self.sync_failed(now, &other),
        }
    }

    /// A failed fetch or subscribe: a 404 means the server lost the device's buckets (or
    /// the device moved), so register again; anything else retries the same request.
    fn sync_failed(&mut self, now: Millis, resp: &Response) {
        if let Response::Error { status: 404, .. } = resp {
            self.phase = Phase::Register;
        }
        // 401/403 also just back off: credentials are the credentials issue's to renew.
        self.fail_sync(now);
    }

    /// Applies one bucket object from a fetch or subscribe answer under the monotonic rule.
    fn apply_doc(&mut self, doc: BucketDoc) -> Applied {
        if !self.ids.contains(&doc.id) {
            return Applied::Anomalous;
        }
        let (Some(version), Some(value)) = (doc.version, doc.value) else {
            return Applied::Anomalous;
        };
        self.offer(doc.id, doc.timestamp.unwrap_or(0), version, value)
    }

    /// Replaces the held copy of `id` if `version` is newer; never goes backwards.
    fn offer(&mut self, id: String, timestamp: u64, version: u64, value: Fields) -> Applied {
        if let Some(h) = self.held.get(&id) {
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
        self.phase == Phase::Subscribe && !self.outbox.is_empty()
    }

    fn poll_put(&mut self, now: Millis) -> Option<Outgoing> {
        if self.put_in_flight.is_some() || !self.put_may_send() || !self.put_backoff.ready(now) {
            return None;
        }
        // Round-robin from the bucket after the last one sent, so a bucket edited faster
        // than a round trip cannot starve the others.
        let next = match &self.last_put {
            Some(last) => self
                .outbox
                .range::<str, _>((Bound::Excluded(last.as_str()), Bound::Unbounded))
                .next()
                .map(|(k, _)| k.clone()),
            None => None,
        };
        let id = next.or_else(|| self.outbox.keys().next().cloned())?;
        let sent = self.outbox.remove(&id)?;
        let body = UpdateRequest {
            value: sent.clone(),
            base_version: self.held.get(&id).map_or(0, |b| b.version),
            occ: false,
            session: self.session(),
        };
        let token = self.token();
        self.last_put = Some(id.clone());
        self.put_in_flight = Some(PutInFlight {
            token,
            id: id.clone(),
            sent,
        });
        Some(Outgoing {
            token,
            request: Request::Put { id, body },
        })
    }

    fn on_put(&mut self, now: Millis, put: PutInFlight, resp: Response) {
        match resp {
            Response::Updated { status: _, body } => {
                self.put_backoff.succeed();
                self.on_update(put, body);
            }
            Response::Error { status, .. } if retryable(status) => {
                self.requeue(put);
                self.fail_put(now);
            }
            Response::Error { status, .. } => {
                // 401/403 land here too: without valid credentials the change cannot be
                // stored; renewing them is the credentials issue's part of the protocol.
                self.put_backoff.succeed();
                self.events
                    .push_back(Event::ChangeRejected { id: put.id, status });
            }
            // A transport failure, or an answer that makes no sense for a PUT.
            Response::Transport | Response::Registered(_) | Response::Buckets(_) => {
                self.requeue(put);
                self.fail_put(now);
            }
        }
    }

    fn on_update(&mut self, put: PutInFlight, body: UpdateResponse) {
        let PutInFlight { id, sent, .. } = put;
        let outcome = body.outcome;
        match (outcome, body.value) {
            // Merged or refused: the server sent the whole bucket as it now stands.
            (UpdateOutcome::Merged | UpdateOutcome::Refused, Some(value)) => {
                self.offer(id.clone(), body.timestamp, body.version, value);
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
                    value.extend(sent);
                    self.offer(id.clone(), body.timestamp, body.version, value);
                }
            }
        }
        self.events.push_back(Event::ChangeAcked { id, outcome });
    }

    /// Puts an unacknowledged PUT's fields back into the outbox, beneath newer local edits.
    fn requeue(&mut self, put: PutInFlight) {
        let pending = self.outbox.entry(put.id).or_default();
        for (k, v) in put.sent {
            pending.entry(k).or_insert(v);
        }
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
        self.sync_backoff.fail(now, &self.cfg, &mut self.rng);
    }

    fn fail_put(&mut self, now: Millis) {
        self.put_backoff.fail(now, &self.cfg, &mut self.rng);
    }
}

/// Statuses that say "not now" rather than "never": the change is kept and retried.
fn retryable(status: u16) -> bool {
    status >= 500 || status == 408 || status == 429
}
