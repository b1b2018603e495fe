//! Forwarding between nodes over gRPC (`proto/forward.proto`): [`Peers`], the client a
//! node uses to reach a set's owner, and [`SetsService`], the server that serves other
//! nodes' requests through this node's [`Router`] (local sets only: a set this node
//! does not own answers `NotOwner`, so a request never bounces between two nodes whose
//! views disagree; the sender routes it again).
//!
//! Requests arrive authenticated and authorized by the node the device reached; peers
//! prove themselves with the cluster secret ([`PeerAuthInterceptor`] on both sides).
//! Failures travel as [`NodeError::to_status`] and come back as the same [`NodeError`].

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;
use tokio::time::Instant;

use futures::{Stream, StreamExt};
use tether_cluster::auth::PeerAuthInterceptor;
use tether_cluster::driver::PeerRefusals;
use tether_cluster::error::ClusterError;
use tether_cluster::{ClusterSecret, Member, RingPlacement};
use tether_proto::api::Delivery;
use tether_proto::presence::PresenceView;
use tether_proto::reconcile::Held;
use tether_proto::{Bucket, BucketId, Fields, Hlc, SetKey, Update};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::error::{NodeError, Result};
use crate::metrics::Metrics;
use crate::routing::links::{self, Links};
use crate::routing::router::{
    BucketUpdate, HeldLeg, HoldOptions, Leg, PutAnswer, PutKind, Router, Write,
};
use crate::sets::actor::{DeviceContact, EnsureBuckets, Get};
use tether_cluster::transport::grpc::{lazy_channel, PeerConnector};

/// Generated from `proto/forward.proto` by `build.rs`.
#[allow(
    missing_docs,
    clippy::all,
    clippy::pedantic,
    missing_debug_implementations
)]
pub mod pb {
    tonic::include_proto!("tether.node.v1");
}

use pb::sets_client::SetsClient;
use pb::sets_server::{Sets, SetsServer};
use pb::subscribe_event::Event;

tokio::task_local! {
    /// The id of the device request being served (set by the HTTP middleware), sent with
    /// every call it forwards so both nodes' logs name the same request.
    pub static REQUEST_ID: uuid::Uuid;
}

/// A forwarded call's message, which carries whom it serves ([`pb::Origin`]).
trait Originated {
    fn origin(&self) -> Option<&pb::Origin>;
    fn set_origin(&mut self, origin: Option<pb::Origin>);
}

macro_rules! originated {
    ($($msg:ty),+) => {$(
        impl Originated for $msg {
            fn origin(&self) -> Option<&pb::Origin> {
                self.origin.as_ref()
            }
            fn set_origin(&mut self, origin: Option<pb::Origin>) {
                self.origin = origin;
            }
        }
    )+};
}

originated!(
    pb::GetRequest,
    pb::PutRequest,
    pb::EnsureRequest,
    pb::SubscribeRequest,
    pb::PresenceRequest,
    pb::ReleaseRequest
);

/// Whom the current call serves: the device request's id and trace context, if any.
fn origin() -> Option<pb::Origin> {
    let request_id = REQUEST_ID.try_with(|id| id.as_u64_pair()).ok();
    let parent = crate::telemetry::propagation::outgoing();
    if request_id.is_none() && parent.is_none() {
        return None;
    }
    let (request_id_hi, request_id_lo) = request_id.unwrap_or_default();
    let mut origin = pb::Origin {
        request_id_hi,
        request_id_lo,
        ..pb::Origin::default()
    };
    if let Some(sc) = parent {
        set_parent(&mut origin, &sc);
    }
    Some(origin)
}

/// Names `sc` as the parent span of the call `origin` is in.
fn set_parent(origin: &mut pb::Origin, sc: &opentelemetry::trace::SpanContext) {
    let trace = u128::from_be_bytes(sc.trace_id().to_bytes());
    origin.trace_id_hi = (trace >> 64) as u64;
    origin.trace_id_lo = trace as u64;
    origin.parent_span_id = u64::from_be_bytes(sc.span_id().to_bytes());
    origin.sampled = sc.is_sampled();
    origin.trace_state = sc.trace_state().header();
}

/// The request id and the remote parent span a forwarded call's origin names (each
/// absent when zero or malformed).
fn parse_origin(
    origin: Option<&pb::Origin>,
) -> (
    Option<uuid::Uuid>,
    Option<opentelemetry::trace::SpanContext>,
) {
    use opentelemetry::trace::{SpanContext, SpanId, TraceFlags, TraceId, TraceState};
    let Some(o) = origin else {
        return (None, None);
    };
    let id = uuid::Uuid::from_u64_pair(o.request_id_hi, o.request_id_lo);
    let trace = (u128::from(o.trace_id_hi) << 64) | u128::from(o.trace_id_lo);
    let parent = SpanContext::new(
        TraceId::from_bytes(trace.to_be_bytes()),
        SpanId::from_bytes(o.parent_span_id.to_be_bytes()),
        TraceFlags::new(u8::from(o.sampled)),
        true,
        o.trace_state.parse().unwrap_or(TraceState::NONE),
    );
    (
        (!id.is_nil()).then_some(id),
        parent.is_valid().then_some(parent),
    )
}

/// `msg` as a peer call carrying whom the current call serves (its request id and trace
/// context).
fn traced<T: Originated>(mut msg: T) -> Request<T> {
    msg.set_origin(origin());
    Request::new(msg)
}

/// `msg`, a call relayed to its owner, as a peer call: whom it serves kept (the device
/// request's id and trace), under this node's served span as the parent when that span is
/// exported.
fn relayed<T: Originated>(mut msg: T) -> Request<T> {
    if let Some(parent) = crate::telemetry::span_context(&tracing::Span::current()) {
        let mut origin = msg.origin().cloned().unwrap_or_default();
        set_parent(&mut origin, &parent);
        msg.set_origin(Some(origin));
    }
    Request::new(msg)
}

/// The span a forwarded call `rpc` is served in: the device request's id, its trace (child
/// of the forwarding node's client span) and the operation; none for the node's own calls
/// that serve no request ([`crate::telemetry::forwarded_span`]).
fn served_span<T: Originated>(rpc: &'static str, request: &Request<T>) -> tracing::Span {
    let (request_id, parent) = parse_origin(request.get_ref().origin());
    crate::telemetry::forwarded_span(rpc, request_id, parent)
}

/// Largest forwarded message: a bucket set's worth of buckets.
const MAX_MESSAGE: usize = 16 * 1024 * 1024;
// ---- conversions -----------------------------------------------------------------------

fn bad(what: &str, e: impl std::fmt::Display) -> NodeError {
    NodeError::Internal(format!("malformed forwarded {what}: {e}"))
}

fn bucket_to_pb(b: &Bucket) -> pb::Bucket {
    pb::Bucket {
        id: b.id.to_string(),
        value_json: serde_json::to_vec(&b.value).unwrap_or_default().into(),
        timestamp_ms: b.timestamp.millis,
        timestamp_logical: b.timestamp.logical,
        version: b.version,
        base_version: None,
        changes_json: bytes::Bytes::new(),
    }
}

fn update_to_pb(u: &BucketUpdate) -> pb::Bucket {
    let mut b = bucket_to_pb(&u.bucket);
    if let Some((base, changes)) = &u.diff {
        b.base_version = Some(*base);
        b.changes_json = fields_to(changes);
    }
    b
}

fn update_from_pb(b: pb::Bucket) -> Result<BucketUpdate> {
    let diff = match b.base_version {
        Some(base) => Some((base, fields_from(&b.changes_json)?)),
        None => None,
    };
    Ok(BucketUpdate {
        bucket: bucket_from_pb(b)?,
        diff,
    })
}

fn updates_from_pb(list: Vec<pb::Bucket>) -> Result<Vec<BucketUpdate>> {
    list.into_iter().map(update_from_pb).collect()
}

fn updates_to_pb(list: &[BucketUpdate]) -> pb::BucketsReply {
    pb::BucketsReply {
        buckets: list.iter().map(update_to_pb).collect(),
    }
}

fn bucket_from_pb(b: pb::Bucket) -> Result<Bucket> {
    Ok(Bucket {
        id: BucketId::parse(&b.id).map_err(|e| bad("bucket id", e))?,
        value: fields_from(&b.value_json)?,
        timestamp: Hlc {
            millis: b.timestamp_ms,
            logical: b.timestamp_logical,
        },
        version: b.version,
    })
}

fn buckets_from_pb(list: Vec<pb::Bucket>) -> Result<Vec<Bucket>> {
    list.into_iter().map(bucket_from_pb).collect()
}

fn buckets_to_pb(list: &[Bucket]) -> pb::BucketsReply {
    pb::BucketsReply {
        buckets: list.iter().map(bucket_to_pb).collect(),
    }
}

fn fields_to(f: &Fields) -> bytes::Bytes {
    serde_json::to_vec(f).unwrap_or_default().into()
}

fn fields_from(bytes: &[u8]) -> Result<Fields> {
    serde_json::from_slice(bytes).map_err(|e| bad("fields", e))
}

/// Parses what a peer sent; a peer is trusted to be correct, so garbage is its bug and
/// answered `InvalidArgument`, never a panic.
fn parse_set(s: &str) -> std::result::Result<SetKey, Status> {
    SetKey::parse(s).map_err(|e| NodeError::BadRequest(format!("set {s:?}: {e}")).to_status())
}

fn parse_id(s: &str) -> std::result::Result<BucketId, Status> {
    BucketId::parse(s).map_err(|e| NodeError::BadRequest(format!("bucket {s:?}: {e}")).to_status())
}

fn held_to_pb(h: &Held) -> pb::HeldVersion {
    pb::HeldVersion {
        id: h.id.to_string(),
        timestamp_ms: h.timestamp,
        version: h.version,
    }
}

// ---- client ----------------------------------------------------------------------------

/// The calls that name sets and answer nothing.
#[derive(Debug, Clone, Copy)]
enum SetCall {
    Relinquish,
    ReleaseHeld,
}

impl SetCall {
    fn name(self) -> &'static str {
        match self {
            SetCall::Relinquish => "relinquish",
            SetCall::ReleaseHeld => "release_held",
        }
    }
}

type Client = SetsClient<InterceptedService<Channel, PeerAuthInterceptor>>;

/// This thread's number among those that called a peer (a key of [`Peers`]' channels).
fn thread_number() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    thread_local! {
        static NUMBER: u64 = NEXT.fetch_add(1, Ordering::Relaxed);
    }
    NUMBER.with(|n| *n)
}

/// Where the HTTP/2 channels to peers run their connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerChannels {
    /// One channel per peer, its connection task on the cluster's runtime, multiplexing
    /// every forwarded call to that peer.
    Shared,
    /// One channel per peer for each thread with a runtime of its own that calls it (an
    /// HTTP worker, the main thread), its connection task on that thread: a forwarded call
    /// wakes no other thread. For a node of one HTTP worker whose cluster runs on the main
    /// thread; with two workers, two channels per peer halve what each connection task
    /// writes at once and cost more than the wake-ups saved (BENCHMARKS.md, "Cluster data
    /// path").
    PerThread,
}

/// Connections to the other members, over HTTP/2 channels opened lazily ([`PeerChannels`]).
#[derive(Debug)]
pub struct Peers {
    secret: ClusterSecret,
    metrics: Metrics,
    runtime: tokio::runtime::Handle,
    connector: Option<Arc<dyn PeerConnector>>,
    channels: PeerChannels,
    /// Keyed by peer and, for [`PeerChannels::PerThread`], the calling thread's number.
    /// Ordered, not hashed: when the node stops, the channels close in map order, and in
    /// the simulator that order reaches the network (a `HashMap`'s would differ per process).
    clients: Mutex<BTreeMap<(SocketAddr, u64), Client>>,
    /// The links to peers that are down (calls go through a relay meanwhile).
    links: Arc<Links>,
    /// The view: who can relay (set once the router is built).
    placement: OnceLock<Arc<RingPlacement>>,
    /// Where a refused connection to a peer is reported: the failure detector, which
    /// declares the member down at once (set once the membership driver runs).
    refusals: OnceLock<PeerRefusals>,
}

/// gRPC metadata key naming the member a relayed call is for (its node id).
pub const RELAY_TO_KEY: &str = "x-tether-relay-to";
/// gRPC metadata key on a relay's answer when it could not reach the owner (nothing was
/// sent; the caller tries another way).
pub const RELAY_FAILED_KEY: &str = "x-tether-relay-failed";

/// No path to `owner` got through: routed again (nothing was sent).
fn unreachable(owner: &Member) -> NodeError {
    NodeError::NotOwner(format!(
        "owner {} at {} is unreachable, directly and through every relay",
        owner.id, owner.gossip_addr
    ))
}
/// An idempotent call not answered directly within this is also sent through a relay
/// (first answer wins): a link that silently drops packets is found this fast.
pub const HEDGE_AFTER: Duration = Duration::from_secs(1);

/// Whether a failed call certainly never reached the peer: the connection could not be
/// made (a write that failed that way may be routed again without risk of applying twice).
fn never_sent(status: &Status) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(status);
    while let Some(e) = source {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionRefused
                    | std::io::ErrorKind::TimedOut
                    | std::io::ErrorKind::AddrNotAvailable
            ) {
                return true;
            }
        }
        if e.to_string().contains("tcp connect error") {
            return true;
        }
        source = e.source();
    }
    false
}

/// Whether a failed call failed below gRPC (no Tether error came back): the connection
/// could not be made or broke. Such a failure says the link is bad, not the owner.
fn link_failure(status: &Status) -> bool {
    never_sent(status)
        || (NodeError::from_status(status).is_none()
            && matches!(
                status.code(),
                tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled
            ))
}

/// `msg` as a request carrying the current request's id and trace context and, when it
/// goes through a relay, the member it is for.
fn request<T: Originated>(msg: T, relay_to: Option<&MetadataValue<Ascii>>) -> Request<T> {
    let mut req = traced(msg);
    if let Some(to) = relay_to {
        req.metadata_mut().insert(RELAY_TO_KEY, to.clone());
    }
    req
}

/// A failed call's meaning for routing.
fn from_status(owner: &Member, status: &Status, safe_to_retry: bool) -> NodeError {
    if let Some(e) = NodeError::from_status(status) {
        return e;
    }
    let why = format!(
        "owner {} at {}: {}",
        owner.id,
        owner.gossip_addr,
        status.message()
    );
    if safe_to_retry {
        NodeError::NotOwner(why)
    } else {
        NodeError::FateUnknown(why)
    }
}

impl Peers {
    /// Peers authenticated with `secret`, reached through `connector` (mTLS) or plain TCP;
    /// their connections live on `runtime` or, as `channels` says, on the calling threads.
    pub fn new(
        secret: ClusterSecret,
        metrics: Metrics,
        runtime: tokio::runtime::Handle,
        connector: Option<Arc<dyn PeerConnector>>,
        channels: PeerChannels,
    ) -> Self {
        Peers {
            secret,
            metrics,
            runtime,
            connector,
            channels,
            clients: Mutex::new(BTreeMap::new()),
            links: Arc::default(),
            placement: OnceLock::new(),
            refusals: OnceLock::new(),
        }
    }

    /// Reports the peers that refuse a connection to `refusals` (the membership driver).
    pub(crate) fn report_refusals_to(&self, refusals: PeerRefusals) {
        let _ = self.refusals.set(refusals);
    }

    /// A call to `peer` failed below gRPC: its link is down, and if the connection was
    /// refused, its process is gone — the failure detector hears it now, not at its next
    /// probe of that peer (BENCHMARKS.md, "Where the spread comes from").
    fn link_failed(&self, peer: &Member, status: &Status) {
        if let Some(refusals) = self.refusals.get() {
            if let ClusterError::PeerRefused { addr } =
                ClusterError::from_status(peer.gossip_addr, status)
            {
                refusals.refused(addr);
            }
        }
        self.mark_down(peer, status.message());
    }

    /// The view relays are chosen from (the router's placement).
    pub(crate) fn attach(&self, placement: Arc<RingPlacement>) {
        let _ = self.placement.set(placement);
    }

    /// Whether the direct link to `peer` is down (its calls go through a relay).
    pub fn link_down(&self, peer: &Member) -> bool {
        self.links.is_down(peer.gossip_addr)
    }

    /// Members that may relay a call to `owner`: live, neither this node nor the owner,
    /// links up first.
    fn relays(&self, owner: &Member) -> Vec<Member> {
        let Some(placement) = self.placement.get() else {
            return Vec::new();
        };
        let local = placement.local().id.clone();
        let mut relays: Vec<Member> = placement
            .members()
            .into_iter()
            .filter(|m| m.id != local && m.id != owner.id)
            .collect();
        relays.sort_by_key(|m| (self.links.is_down(m.gossip_addr), m.id.clone()));
        relays
    }

    /// The direct link to `peer` failed: calls go through relays until a probe (a no-op
    /// call every [`links::PROBE_EVERY`]) gets through again.
    fn mark_down(&self, peer: &Member, why: &str) {
        if !self.links.mark_down(peer.gossip_addr) {
            return;
        }
        tracing::warn!(peer = %peer.id, addr = %peer.gossip_addr, %why, "direct link to a peer is down; relaying its calls through other members");
        self.metrics.forwarded("link", "down");
        let Ok(mut client) = self.client(peer) else {
            return;
        };
        let (links, peer, metrics) = (self.links.clone(), peer.clone(), self.metrics.clone());
        let placement = self.placement.get().cloned();
        self.runtime.spawn(async move {
            loop {
                tokio::time::sleep(links::PROBE_EVERY).await;
                if !links.is_down(peer.gossip_addr) {
                    return;
                }
                // A member that left the view is probed no more (nothing is routed to
                // it; a call that still must reach it tries the direct link first).
                if placement
                    .as_ref()
                    .is_some_and(|p| p.member(peer.id.as_str()).is_none())
                {
                    links.mark_up(peer.gossip_addr);
                    return;
                }
                let probe = client.release_held(pb::ReleaseRequest {
                    sets: Vec::new(),
                    origin: None,
                });
                if let Ok(Ok(_)) = tokio::time::timeout(links::PROBE_DEADLINE, probe).await {
                    if let Some(was) = links.mark_up(peer.gossip_addr) {
                        tracing::info!(peer = %peer.id, down_for = ?was, "direct link to a peer is up again");
                        metrics.forwarded("link", "up");
                    }
                    return;
                }
            }
        });
    }

    /// Pings `peer` on its forwarding channel (an empty `ReleaseHeld`): `Err` with why
    /// when the link failed or no answer came within [`links::PROBE_DEADLINE`].
    async fn ping(&self, peer: &Member) -> std::result::Result<(), String> {
        let mut client = self.client(peer).map_err(|e| e.to_string())?;
        let ping = client.release_held(pb::ReleaseRequest {
            sets: Vec::new(),
            origin: None,
        });
        match tokio::time::timeout(links::PROBE_DEADLINE, ping).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(s)) if link_failure(&s) => Err(s.message().to_string()),
            // The peer answered (with an error of its own): the link works.
            Ok(Err(_)) => Ok(()),
            Err(_) => Err(format!(
                "no answer to a ping within {:?}",
                links::PROBE_DEADLINE
            )),
        }
    }

    /// Watches the direct links to every live member: a ping every
    /// [`links::PROBE_EVERY`] to each whose link is up (a down one has its own probe), so a
    /// cut link is known within about a second and a half, before a write needs it. Ends
    /// when the peers are dropped.
    pub(crate) fn watch_links(self: &Arc<Self>) {
        let peers = Arc::downgrade(self);
        self.runtime.spawn(async move {
            let mut tick = tokio::time::interval(links::PROBE_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(peers) = peers.upgrade() else {
                    return;
                };
                let Some(placement) = peers.placement.get() else {
                    continue;
                };
                let local = placement.local().id.clone();
                let pings = placement
                    .members()
                    .into_iter()
                    .filter(|m| m.id != local && !peers.links.is_down(m.gossip_addr))
                    .map(|m| {
                        let peers = peers.clone();
                        async move {
                            if let Err(why) = peers.ping(&m).await {
                                peers.mark_down(&m, &why);
                            }
                        }
                    });
                futures::future::join_all(pings).await;
            }
        });
    }

    /// One call to `owner`: direct while the link is up, else through a relay — another
    /// member that reaches the owner (a cut link between two members whose gossip still
    /// sees each other through a third). `attempt` makes the call on a client, with the
    /// relay header when relayed.
    ///
    /// - A call that could not be made (nothing sent) is tried through relays at once.
    /// - An `idempotent` call is hedged: not answered within [`HEDGE_AFTER`], it is also
    ///   sent through relays and the first answer wins (a relay winning marks the link
    ///   down). Writes are never hedged (they would apply twice); one whose fate is
    ///   unknown fails as before.
    /// - A relay whose own link to the owner is down says so at once, and the next one is
    ///   tried; when none gets through, the direct link is tried after all (it may have
    ///   been marked down by a false alarm on a loaded machine).
    ///
    /// Errors come back mapped as [`from_status`] maps them.
    async fn call<T, F, Fut>(
        &self,
        owner: &Member,
        op: &'static str,
        idempotent: bool,
        attempt: F,
    ) -> Result<T>
    where
        F: Fn(Client, Option<MetadataValue<Ascii>>) -> Fut,
        Fut: Future<Output = std::result::Result<T, Status>>,
    {
        let relay_to: MetadataValue<Ascii> =
            owner.id.as_str().parse().map_err(|e| {
                NodeError::Internal(format!("node id {} as metadata: {e}", owner.id))
            })?;
        let direct_first = !self.links.is_down(owner.gossip_addr);
        if direct_first {
            let direct = attempt(self.client(owner)?, None);
            if idempotent {
                tokio::pin!(direct);
                match tokio::time::timeout(HEDGE_AFTER, &mut direct).await {
                    Ok(Ok(v)) => return Ok(v),
                    Ok(Err(s)) if link_failure(&s) => self.link_failed(owner, &s),
                    Ok(Err(s)) => return Err(from_status(owner, &s, true)),
                    Err(_) => {
                        let relayed = self.via_relays(owner, op, &relay_to, &attempt, true);
                        tokio::pin!(relayed);
                        tokio::select! {
                            r = &mut direct => match r {
                                Ok(v) => return Ok(v),
                                Err(s) if link_failure(&s) => {
                                    self.link_failed(owner, &s);
                                    return relayed.await.map_err(|e| e.unwrap_or_else(|| unreachable(owner)));
                                }
                                Err(s) => return Err(from_status(owner, &s, true)),
                            },
                            r = &mut relayed => match r {
                                Ok(v) => {
                                    self.mark_down(owner, "a relay answered first");
                                    return Ok(v);
                                }
                                Err(Some(e)) => return Err(e),
                                Err(None) => return direct.await.map_err(|s| from_status(owner, &s, true)),
                            },
                        }
                    }
                }
            } else {
                match direct.await {
                    Ok(v) => return Ok(v),
                    Err(s) if never_sent(&s) => self.link_failed(owner, &s),
                    Err(s) => return Err(from_status(owner, &s, false)),
                }
            }
        }
        match self
            .via_relays(owner, op, &relay_to, &attempt, idempotent)
            .await
        {
            Ok(v) => Ok(v),
            Err(Some(e)) => Err(e),
            Err(None) if !direct_first => attempt(self.client(owner)?, None)
                .await
                .map_err(|s| from_status(owner, &s, idempotent || never_sent(&s))),
            Err(None) => Err(unreachable(owner)),
        }
    }

    /// `attempt` through each relay in turn until one gets through: its answer (`Err(Some)`
    /// for the owner's own error), or `Err(None)` when no relay reached the owner.
    async fn via_relays<T, F, Fut>(
        &self,
        owner: &Member,
        op: &'static str,
        relay_to: &MetadataValue<Ascii>,
        attempt: &F,
        idempotent: bool,
    ) -> std::result::Result<T, Option<NodeError>>
    where
        F: Fn(Client, Option<MetadataValue<Ascii>>) -> Fut,
        Fut: Future<Output = std::result::Result<T, Status>>,
    {
        for via in self.relays(owner) {
            let client = self.client(&via).map_err(Some)?;
            match attempt(client, Some(relay_to.clone())).await {
                Ok(v) => {
                    self.metrics.forwarded(op, "relayed");
                    return Ok(v);
                }
                Err(s) if never_sent(&s) => self.link_failed(&via, &s),
                Err(s) if s.metadata().contains_key(RELAY_FAILED_KEY) => {}
                Err(s) => return Err(Some(from_status(&via, &s, idempotent))),
            }
        }
        Err(None)
    }

    fn client(&self, owner: &Member) -> Result<Client> {
        let addr = owner.gossip_addr;
        // Per thread only on a thread that runs its own runtime (a multi-threaded one may
        // move the connection's task, and nothing is saved).
        let own_runtime = self.channels == PeerChannels::PerThread
            && tokio::runtime::Handle::try_current()
                .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::CurrentThread);
        let key = (addr, if own_runtime { thread_number() } else { 0 });
        let mut clients = self.clients.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(c) = clients.get(&key) {
            return Ok(c.clone());
        }
        let endpoint = Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| NodeError::Internal(format!("peer address {addr}: {e}")))?
            .connect_timeout(Duration::from_millis(500))
            .tcp_nodelay(true)
            // A peer that dies without closing its connections (power loss, partition)
            // fails the calls held on it within seconds.
            .http2_keep_alive_interval(Duration::from_secs(5))
            .keep_alive_timeout(Duration::from_secs(5))
            .keep_alive_while_idle(true);
        // The channel's connection task lives on the calling thread's runtime (its own
        // channel), else on the cluster's, whichever thread made the first call.
        let _on = (!own_runtime).then(|| self.runtime.enter());
        let channel = lazy_channel(endpoint, addr, self.connector.clone());
        let client =
            SetsClient::with_interceptor(channel, PeerAuthInterceptor::client(self.secret.clone()))
                .max_decoding_message_size(MAX_MESSAGE)
                .max_encoding_message_size(MAX_MESSAGE);
        clients.insert(key, client.clone());
        Ok(client)
    }

    fn count<T>(&self, op: &'static str, peer: &Member, started: Instant, r: &Result<T>) {
        let result = match r {
            Ok(_) => "ok",
            Err(NodeError::NotOwner(_)) => "rerouted",
            Err(_) => "error",
        };
        self.metrics.forwarded(op, result);
        self.metrics
            .forward_latency(peer.id.as_str(), op, result, started.elapsed());
    }

    /// The client span of one forwarded call.
    fn span(op: &'static str, peer: &Member) -> tracing::Span {
        crate::telemetry::forward_client_span(op, peer.id.as_str(), peer.gossip_addr)
    }

    /// A call another member relays through this node to `to` (its link to `to` is
    /// down): made directly, never relayed again. Not reaching `to` answers `NotOwner`
    /// (nothing was sent: the caller routes again); any other failure passes back as is.
    async fn relay<T, Fut>(
        &self,
        to: &Member,
        op: &'static str,
        call: impl FnOnce(Client) -> Fut,
    ) -> std::result::Result<T, Status>
    where
        Fut: Future<Output = std::result::Result<T, Status>>,
    {
        self.metrics.forwarded_served("relay");
        let path_failed = |why: &str| {
            let mut status = NodeError::NotOwner(format!(
                "relaying {op}: owner {} at {} unreachable from here either: {why}",
                to.id, to.gossip_addr
            ))
            .to_status();
            status
                .metadata_mut()
                .insert(RELAY_FAILED_KEY, MetadataValue::from_static("1"));
            status
        };
        if self.links.is_down(to.gossip_addr) {
            return Err(path_failed("its link is down"));
        }
        let client = self.client(to).map_err(|e| e.to_status())?;
        match call(client).await {
            Ok(v) => Ok(v),
            Err(s) if never_sent(&s) => {
                self.link_failed(to, &s);
                Err(path_failed(s.message()))
            }
            Err(s) => Err(s),
        }
    }

    /// `Get` on the owner.
    pub async fn get(&self, owner: &Member, set: &SetKey, read: Get) -> Result<Vec<Bucket>> {
        let started = Instant::now();
        let r = async {
            let req = pb::GetRequest {
                // Set on each attempt (`request`).
                origin: None,
                set: set.to_string(),
                all: read.ids.is_none(),
                ids: read
                    .ids
                    .unwrap_or_default()
                    .iter()
                    .map(ToString::to_string)
                    .collect(),
                without_values: !read.values,
                max_bytes: read.max_bytes as u64,
            };
            let reply = self
                .call(owner, "get", true, |mut client, relay| {
                    let req = request(req.clone(), relay.as_ref());
                    async move { client.get(req).await }
                })
                .await?;
            buckets_from_pb(reply.into_inner().buckets)
        }
        .instrument(Self::span("get", owner))
        .await;
        self.count("get", owner, started, &r);
        r
    }

    /// `Put` on the owner; routed again if nothing was sent, or if its fate is unknown
    /// and it carries an op id (`FateUnknown`, see the router).
    pub async fn put(&self, owner: &Member, id: &BucketId, write: Write) -> Result<PutAnswer> {
        let started = Instant::now();
        let r = async {
            let req = pb::PutRequest {
                // Set on each attempt (`request`).
                origin: None,
                id: id.to_string(),
                value_json: fields_to(&write.update.value),
                base_version: write.update.base_version,
                occ: write.update.occ,
                session: write.session,
                op_id: write.op_id,
                by: write.by,
            };
            let reply = self
                .call(owner, "put", false, |mut client, relay| {
                    let req = request(req.clone(), relay.as_ref());
                    async move { client.put(req).await }
                })
                .await?
                .into_inner();
            let kind = match pb::Outcome::try_from(reply.outcome) {
                Ok(pb::Outcome::Applied) => PutKind::Applied,
                Ok(pb::Outcome::Merged) => PutKind::Merged,
                Ok(pb::Outcome::Refused) => PutKind::Refused,
                _ => return Err(bad("outcome", reply.outcome)),
            };
            let bucket = reply
                .bucket
                .ok_or_else(|| bad("put reply", "no bucket"))
                .and_then(bucket_from_pb)?;
            Ok(PutAnswer {
                kind,
                bucket,
                replayed: reply.replayed,
                delivery: reply.delivery.map(|d| Delivery {
                    online: false,
                    next_sync_by: d.next_sync_by_ms,
                }),
            })
        }
        .instrument(Self::span("put", owner))
        .await;
        self.count("put", owner, started, &r);
        r
    }

    /// `Ensure` on the owner (idempotent).
    pub async fn ensure(&self, owner: &Member, set: &SetKey, msg: EnsureBuckets) -> Result<()> {
        let started = Instant::now();
        let r = async {
            let req = pb::EnsureRequest {
                // Set on each attempt (`request`).
                origin: None,
                set: set.to_string(),
                device_type: msg.device_type,
                device_contact: msg.contact.is_some(),
                next_sync_ms: msg.contact.and_then(|c| c.next_sync_ms),
                buckets: msg
                    .buckets
                    .iter()
                    .map(|(id, f)| pb::NewBucket {
                        id: id.to_string(),
                        fields_json: fields_to(f),
                    })
                    .collect(),
            };
            self.call(owner, "ensure", true, |mut client, relay| {
                let req = request(req.clone(), relay.as_ref());
                async move { client.ensure(req).await }
            })
            .await?;
            Ok(())
        }
        .instrument(Self::span("ensure", owner))
        .await;
        self.count("ensure", owner, started, &r);
        r
    }

    /// `Presence` on the owner.
    pub async fn presence(&self, owner: &Member, set: &SetKey) -> Result<PresenceView> {
        let started = Instant::now();
        let r = async {
            let req = pb::PresenceRequest {
                // Set on each attempt (`request`).
                origin: None,
                set: set.to_string(),
            };
            let reply = self
                .call(owner, "presence", true, |mut client, relay| {
                    let req = request(req.clone(), relay.as_ref());
                    async move { client.presence(req).await }
                })
                .await?
                .into_inner();
            Ok(PresenceView {
                online: reply.online,
                last_seen: reply.last_seen_ms,
                next_sync_by: reply.next_sync_by_ms,
            })
        }
        .instrument(Self::span("presence", owner))
        .await;
        self.count("presence", owner, started, &r);
        r
    }

    /// `Relinquish` on a node that held a set's lease before this one.
    pub async fn relinquish(&self, previous: &Member, set: &SetKey) -> Result<()> {
        self.set_call(previous, set, SetCall::Relinquish).await
    }

    /// `ReleaseHeld` on the owner.
    pub async fn release_held(&self, owner: &Member, set: &SetKey) -> Result<()> {
        self.set_call(owner, set, SetCall::ReleaseHeld).await
    }

    async fn set_call(&self, to: &Member, set: &SetKey, call: SetCall) -> Result<()> {
        let started = Instant::now();
        let r = async {
            let msg = pb::ReleaseRequest {
                origin: None,
                sets: vec![set.to_string()],
            };
            self.call(to, call.name(), true, |mut client, relay| {
                let req = request(msg.clone(), relay.as_ref());
                async move {
                    match call {
                        SetCall::Relinquish => client.relinquish(req).await,
                        SetCall::ReleaseHeld => client.release_held(req).await,
                    }
                }
            })
            .await?;
            Ok(())
        }
        .instrument(Self::span(call.name(), to))
        .await;
        self.count(call.name(), to, started, &r);
        r
    }

    /// The subscribe check on the owner: `Now` with its stale buckets, or `Held` with a
    /// future of its answer. Dropping that future cancels the call (and the owner's
    /// subscription). The owner answers by its own timer, `timeout` after the call
    /// reached it; a call that breaks or ends without an answer is an error, never a
    /// "no change" the owner did not give ([`crate::routing::router::HeldSubscription::answer`]).
    pub(crate) async fn subscribe(
        &self,
        owner: &Member,
        held: Vec<Held>,
        timeout: Duration,
        opts: HoldOptions,
    ) -> Result<Leg> {
        let started = Instant::now();
        let r = async {
            let req = pb::SubscribeRequest {
                // Set on each attempt (`request`).
                origin: None,
                held: held.iter().map(held_to_pb).collect(),
                session: opts.session,
                timeout_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
                diffs: opts.diffs,
                max_bytes: opts.max_bytes as u64,
                own_writes_known: opts.own_writes_known,
                device: opts.device.as_ref().map(ToString::to_string),
                next_sync_ms: opts.next_sync_ms,
            };
            // The call is made once its first event (the check's answer) is in.
            let (first, mut stream) = self
                .call(owner, "subscribe", true, |mut client, relay| {
                    let req = request(req.clone(), relay.as_ref());
                    async move {
                        let mut stream = client.subscribe(req).await?.into_inner();
                        let first = stream.message().await?;
                        Ok((first, stream))
                    }
                })
                .await?;
            let first = first
                .and_then(|m| m.event)
                .ok_or_else(|| NodeError::NotOwner(format!("owner {} ended the call", owner.id)))?;
            match first {
                Event::Now(list) => Ok(Leg::Now(updates_from_pb(list.buckets)?)),
                Event::Held(_) => {
                    let owner_id = owner.id.clone();
                    Ok(Leg::Held(HeldLeg::new(async move {
                        match stream.message().await {
                            Ok(Some(pb::SubscribeEvent {
                                event: Some(Event::Changed(list)),
                            })) => updates_from_pb(list.buckets),
                            Ok(_) => Err(NodeError::Unavailable(format!(
                                "owner {owner_id} ended a held subscription without an answer; \
                                 resubscribe"
                            ))),
                            Err(status) => Err(NodeError::Unavailable(format!(
                                "held subscription on owner {owner_id} broke ({}); resubscribe",
                                status.message()
                            ))),
                        }
                    })))
                }
                Event::Changed(_) => Err(bad("subscribe", "answer before the check")),
            }
        }
        .instrument(Self::span("subscribe", owner))
        .await;
        self.count("subscribe", owner, started, &r);
        r
    }
}

// ---- server ----------------------------------------------------------------------------

/// Serves other nodes' forwarded requests for the sets this node owns.
#[derive(Debug, Clone)]
pub struct SetsService {
    router: Arc<Router>,
}

impl SetsService {
    /// The gRPC service, peer-authenticated, to mount on the node's internal server.
    pub fn server(
        router: Arc<Router>,
        secret: ClusterSecret,
    ) -> InterceptedService<SetsServer<SetsService>, PeerAuthInterceptor> {
        let server = SetsServer::new(SetsService { router })
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE);
        InterceptedService::new(server, PeerAuthInterceptor::server(secret))
    }

    fn served(&self, op: &'static str) {
        // In the `forwarded` span: the device request's id and trace id on the owner.
        tracing::debug!(op, "serving a forwarded call");
        self.router.shared().metrics.forwarded_served(op);
    }

    /// The member a relayed call is for (`None`: the call is for this node).
    fn relay_target<T>(&self, request: &Request<T>) -> std::result::Result<Option<Member>, Status> {
        let Some(to) = request.metadata().get(RELAY_TO_KEY) else {
            return Ok(None);
        };
        let to = to.to_str().map_err(|_| {
            NodeError::BadRequest("relay target is not a node id".into()).to_status()
        })?;
        self.router.relay_member(to).map_err(|e| e.to_status())
    }

    fn peers(&self) -> std::result::Result<&Peers, Status> {
        self.router.peers().map_err(|e| e.to_status())
    }

    /// A peer's answer budget, never above this node's own.
    fn max_bytes(&self, asked: u64) -> usize {
        let own = self.router.shared().config.max_answer_bytes;
        match usize::try_from(asked) {
            Ok(0) | Err(_) => own,
            Ok(n) => n.min(own),
        }
    }
}

type EventStream =
    Pin<Box<dyn Stream<Item = std::result::Result<pb::SubscribeEvent, Status>> + Send>>;

fn event(e: Event) -> std::result::Result<pb::SubscribeEvent, Status> {
    Ok(pb::SubscribeEvent { event: Some(e) })
}

impl SetsService {
    async fn serve_get(
        &self,
        request: Request<pb::GetRequest>,
    ) -> std::result::Result<Response<pb::BucketsReply>, Status> {
        if let Some(to) = self.relay_target(&request)? {
            let req = request.into_inner();
            return self
                .peers()?
                .relay(&to, "get", |mut c| async move { c.get(relayed(req)).await })
                .await;
        }
        self.served("get");
        let req = request.into_inner();
        let set = parse_set(&req.set)?;
        let ids = if req.all {
            None
        } else {
            Some(
                req.ids
                    .iter()
                    .map(|s| parse_id(s))
                    .collect::<std::result::Result<Vec<_>, _>>()?,
            )
        };
        let read = Get {
            ids,
            values: !req.without_values,
            max_bytes: self.max_bytes(req.max_bytes),
        };
        let found = self
            .router
            .local_get(&set, read)
            .await
            .map_err(|e| e.to_status())?;
        Ok(Response::new(buckets_to_pb(&found)))
    }

    async fn serve_put(
        &self,
        request: Request<pb::PutRequest>,
    ) -> std::result::Result<Response<pb::PutReply>, Status> {
        if let Some(to) = self.relay_target(&request)? {
            let req = request.into_inner();
            return self
                .peers()?
                .relay(&to, "put", |mut c| async move { c.put(relayed(req)).await })
                .await;
        }
        self.served("put");
        let req = request.into_inner();
        let id = parse_id(&req.id)?;
        let write = Write {
            update: Update {
                value: fields_from(&req.value_json).map_err(|e| e.to_status())?,
                base_version: req.base_version,
                occ: req.occ,
            },
            session: req.session,
            by: if req.by.is_empty() {
                crate::sets::actor::BY_SERVER.to_string()
            } else {
                req.by
            },
            op_id: req.op_id,
        };
        let answer = self
            .router
            .local_put(&id, write)
            .await
            .map_err(|e| e.to_status())?;
        let outcome = match answer.kind {
            PutKind::Applied => pb::Outcome::Applied,
            PutKind::Merged => pb::Outcome::Merged,
            PutKind::Refused => pb::Outcome::Refused,
        };
        Ok(Response::new(pb::PutReply {
            outcome: outcome.into(),
            bucket: Some(bucket_to_pb(&answer.bucket)),
            replayed: answer.replayed,
            delivery: answer.delivery.map(|d| pb::Delivery {
                next_sync_by_ms: d.next_sync_by,
            }),
        }))
    }

    async fn serve_ensure(
        &self,
        request: Request<pb::EnsureRequest>,
    ) -> std::result::Result<Response<pb::EnsureReply>, Status> {
        if let Some(to) = self.relay_target(&request)? {
            let req = request.into_inner();
            return self
                .peers()?
                .relay(&to, "ensure", |mut c| async move {
                    c.ensure(relayed(req)).await
                })
                .await;
        }
        self.served("ensure");
        let req = request.into_inner();
        let set = parse_set(&req.set)?;
        let buckets = req
            .buckets
            .iter()
            .map(|b| {
                Ok((
                    parse_id(&b.id)?,
                    fields_from(&b.fields_json).map_err(|e| e.to_status())?,
                ))
            })
            .collect::<std::result::Result<Vec<_>, Status>>()?;
        let msg = EnsureBuckets {
            buckets,
            device_type: req.device_type,
            contact: req.device_contact.then_some(DeviceContact {
                next_sync_ms: req.next_sync_ms,
            }),
        };
        self.router
            .local_ensure(&set, msg)
            .await
            .map_err(|e| e.to_status())?;
        Ok(Response::new(pb::EnsureReply {}))
    }

    async fn serve_subscribe(
        &self,
        request: Request<pb::SubscribeRequest>,
    ) -> std::result::Result<Response<EventStream>, Status> {
        if let Some(to) = self.relay_target(&request)? {
            let req = request.into_inner();
            // The owner's events pass through as they come (the held answer included).
            let stream = self
                .peers()?
                .relay(&to, "subscribe", |mut c| async move {
                    c.subscribe(relayed(req)).await
                })
                .await?
                .into_inner();
            return Ok(Response::new(stream.boxed()));
        }
        self.served("subscribe");
        let req = request.into_inner();
        let mut by_set: BTreeMap<SetKey, Vec<Held>> = BTreeMap::new();
        for h in &req.held {
            let id = parse_id(&h.id)?;
            by_set.entry(id.set_key()).or_default().push(Held {
                id,
                timestamp: h.timestamp_ms,
                version: h.version,
            });
        }
        if by_set.is_empty() {
            return Err(NodeError::BadRequest("subscribe lists no buckets".into()).to_status());
        }
        if let Some(set) = by_set.keys().find(|s| !self.router.shared().owns(s)) {
            return Err(
                NodeError::NotOwner(format!("bucket set {set} is owned by another node"))
                    .to_status(),
            );
        }
        let hold = Duration::from_millis(req.timeout_ms);
        let leg = self
            .router
            .open_local(
                by_set,
                HoldOptions {
                    session: req.session,
                    diffs: req.diffs,
                    max_bytes: self.max_bytes(req.max_bytes),
                    own_writes_known: req.own_writes_known,
                    device: req.device.as_deref().map(parse_set).transpose()?,
                    next_sync_ms: req.next_sync_ms,
                },
                hold,
            )
            .await
            .map_err(|e| e.to_status())?;
        let stream: EventStream = match leg {
            Leg::Now(buckets) => {
                futures::stream::once(async move { event(Event::Now(updates_to_pb(&buckets))) })
                    .boxed()
            }
            Leg::Held(wait) => {
                let drain = self.router.drain_signal();
                // Its "nothing changed" only under a confirmed lease: a set that moved
                // (or a lease that cannot be read) ends the call with an error, and the
                // forwarding node looks again where the set is served now.
                let answer = async move {
                    let buckets = wait.answer_within(drain).await.map_err(|e| e.to_status())?;
                    event(Event::Changed(updates_to_pb(&buckets)))
                };
                futures::stream::once(async { event(Event::Held(pb::Held {})) })
                    .chain(futures::stream::once(answer))
                    .boxed()
            }
        };
        Ok(Response::new(stream))
    }

    async fn serve_relinquish(
        &self,
        request: Request<pb::ReleaseRequest>,
    ) -> std::result::Result<Response<pb::EnsureReply>, Status> {
        if let Some(to) = self.relay_target(&request)? {
            let req = request.into_inner();
            return self
                .peers()?
                .relay(&to, "relinquish", |mut c| async move {
                    c.relinquish(relayed(req)).await
                })
                .await;
        }
        self.served("relinquish");
        let mut confirmed = true;
        for s in &request.into_inner().sets {
            confirmed &= self.router.shared().relinquish(&parse_set(s)?).await;
        }
        if !confirmed {
            // The new owner waits out the lease trust of the holder this node may have
            // displaced without telling it (REPORT.md defect 16).
            return Err(NodeError::Unavailable(
                "a lease request of this node for the set has an unknown fate: the holder \
                 before it may still be serving"
                    .into(),
            )
            .to_status());
        }
        Ok(Response::new(pb::EnsureReply {}))
    }

    async fn serve_presence(
        &self,
        request: Request<pb::PresenceRequest>,
    ) -> std::result::Result<Response<pb::PresenceReply>, Status> {
        if let Some(to) = self.relay_target(&request)? {
            let req = request.into_inner();
            return self
                .peers()?
                .relay(&to, "presence", |mut c| async move {
                    c.presence(relayed(req)).await
                })
                .await;
        }
        self.served("presence");
        let set = parse_set(&request.into_inner().set)?;
        let view = self
            .router
            .local_presence(&set)
            .await
            .map_err(|e| e.to_status())?;
        Ok(Response::new(pb::PresenceReply {
            online: view.online,
            last_seen_ms: view.last_seen,
            next_sync_by_ms: view.next_sync_by,
        }))
    }

    async fn serve_release_held(
        &self,
        request: Request<pb::ReleaseRequest>,
    ) -> std::result::Result<Response<pb::EnsureReply>, Status> {
        if let Some(to) = self.relay_target(&request)? {
            let req = request.into_inner();
            return self
                .peers()?
                .relay(&to, "release_held", |mut c| async move {
                    c.release_held(relayed(req)).await
                })
                .await;
        }
        let sets = request.into_inner().sets;
        if sets.is_empty() {
            // A peer's link ping.
            return Ok(Response::new(pb::EnsureReply {}));
        }
        self.served("release_held");
        for s in &sets {
            self.router.local_release(&parse_set(s)?);
        }
        Ok(Response::new(pb::EnsureReply {}))
    }
}

#[tonic::async_trait]
impl Sets for SetsService {
    type SubscribeStream = EventStream;

    async fn get(
        &self,
        request: Request<pb::GetRequest>,
    ) -> std::result::Result<Response<pb::BucketsReply>, Status> {
        let span = served_span("tether.node.v1.Sets/Get", &request);
        self.serve_get(request).instrument(span).await
    }

    async fn put(
        &self,
        request: Request<pb::PutRequest>,
    ) -> std::result::Result<Response<pb::PutReply>, Status> {
        let span = served_span("tether.node.v1.Sets/Put", &request);
        self.serve_put(request).instrument(span).await
    }

    async fn ensure(
        &self,
        request: Request<pb::EnsureRequest>,
    ) -> std::result::Result<Response<pb::EnsureReply>, Status> {
        let span = served_span("tether.node.v1.Sets/Ensure", &request);
        self.serve_ensure(request).instrument(span).await
    }

    async fn subscribe(
        &self,
        request: Request<pb::SubscribeRequest>,
    ) -> std::result::Result<Response<EventStream>, Status> {
        let span = served_span("tether.node.v1.Sets/Subscribe", &request);
        self.serve_subscribe(request).instrument(span).await
    }

    async fn relinquish(
        &self,
        request: Request<pb::ReleaseRequest>,
    ) -> std::result::Result<Response<pb::EnsureReply>, Status> {
        let span = served_span("tether.node.v1.Sets/Relinquish", &request);
        self.serve_relinquish(request).instrument(span).await
    }

    async fn presence(
        &self,
        request: Request<pb::PresenceRequest>,
    ) -> std::result::Result<Response<pb::PresenceReply>, Status> {
        let span = served_span("tether.node.v1.Sets/Presence", &request);
        self.serve_presence(request).instrument(span).await
    }

    async fn release_held(
        &self,
        request: Request<pb::ReleaseRequest>,
    ) -> std::result::Result<Response<pb::EnsureReply>, Status> {
        let span = served_span("tether.node.v1.Sets/ReleaseHeld", &request);
        self.serve_release_held(request).instrument(span).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// How many channels `channels` opens to one peer called twice from each of two HTTP
    /// worker-like threads (a current-thread runtime each) and once from the cluster's
    /// multi-threaded runtime.
    fn channels_opened(channels: PeerChannels) -> usize {
        let cluster = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("cluster runtime");
        let secret = ClusterSecret::new(b"per-thread channels test secret, 32+ bytes".to_vec())
            .expect("secret");
        let peers = Peers::new(
            secret,
            Metrics::new(),
            cluster.handle().clone(),
            None,
            channels,
        );
        let owner = Member {
            id: tether_cluster::NodeId::new("peer"),
            gossip_addr: SocketAddr::from(([127, 0, 0, 1], 9)),
            public_url: "http://peer".into(),
            incarnation: 1,
        };
        std::thread::scope(|s| {
            for _ in 0..2 {
                s.spawn(|| {
                    let worker = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .expect("worker runtime");
                    worker.block_on(async {
                        peers.client(&owner).expect("first call");
                        peers.client(&owner).expect("second call");
                    });
                });
            }
        });
        cluster.block_on(async {
            tokio::spawn(async move {
                peers.client(&owner).expect("from the cluster runtime");
                peers.clients.lock().map(|c| c.len()).unwrap_or_default()
            })
            .await
            .expect("joined")
        })
    }

    #[tokio::test]
    async fn a_forwarded_call_names_its_request_and_trace_and_a_ping_neither() {
        use crate::telemetry::propagation::{LogTrace, LOG_TRACE};
        use prost::Message;
        assert!(origin().is_none(), "a call outside a request names none");
        let id = uuid::Uuid::new_v4();
        for sampled in ["00", "01"] {
            let trace = LogTrace::from_header(Some(&format!(
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-{sampled}"
            )));
            let made = LOG_TRACE
                .scope(trace, REQUEST_ID.scope(id, async { origin() }))
                .await;
            // Through the wire format, as the owner reads it.
            let sent = pb::PutRequest {
                origin: made,
                ..pb::PutRequest::default()
            };
            let got = pb::PutRequest::decode(sent.encode_to_vec().as_slice()).expect("decodes");
            let (request_id, parent) = parse_origin(got.origin.as_ref());
            assert_eq!(request_id, Some(id));
            let parent = parent.expect("the trace travels");
            assert_eq!(parent.trace_id(), trace.trace_id);
            assert_eq!(parent.is_sampled(), sampled == "01");
            assert!(parent.is_remote());
        }
        // A trace without a request id (and the reverse) still names what it has.
        let trace = LogTrace::from_header(None);
        let (request_id, parent) =
            parse_origin(LOG_TRACE.scope(trace, async { origin() }).await.as_ref());
        assert_eq!(
            (request_id, parent.map(|p| p.trace_id())),
            (None, Some(trace.trace_id))
        );
        let (request_id, parent) =
            parse_origin(REQUEST_ID.scope(id, async { origin() }).await.as_ref());
        assert_eq!((request_id, parent), (Some(id), None));
        // Zeros name nothing: the owner opens no span for such a call.
        assert_eq!(parse_origin(Some(&pb::Origin::default())), (None, None));
    }

    #[tokio::test]
    async fn a_refused_forward_tells_the_failure_detector_at_once() {
        let secret =
            ClusterSecret::new(b"refused forward test secret, 32+ bytes".to_vec()).expect("secret");
        let peers = Peers::new(
            secret,
            Metrics::new(),
            tokio::runtime::Handle::current(),
            None,
            PeerChannels::Shared,
        );
        let (to, mut refusals) = tokio::sync::mpsc::unbounded_channel();
        peers.report_refusals_to(to.into());
        // A port that was just free: nothing listens there, so the connection is refused.
        let gone = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("ephemeral port");
        let owner = Member {
            id: tether_cluster::NodeId::new("gone"),
            gossip_addr: gone,
            public_url: "http://gone".into(),
            incarnation: 1,
        };
        let set = SetKey::parse("S1").expect("set key");
        assert!(
            peers.presence(&owner, &set).await.is_err(),
            "nobody answers"
        );
        assert_eq!(
            refusals.try_recv().ok(),
            Some(gone),
            "the refusal is reported"
        );
        assert!(
            peers.link_down(&owner),
            "and the direct link is marked down"
        );
        assert!(refusals.try_recv().is_err(), "once");
    }

    #[test]
    fn a_channel_per_calling_thread_only_where_asked() {
        assert_eq!(channels_opened(PeerChannels::Shared), 1);
        // One per worker thread; the multi-threaded runtime's call uses the shared one.
        assert_eq!(channels_opened(PeerChannels::PerThread), 3);
    }
}
