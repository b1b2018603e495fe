//! Routes every bucket set operation to the set's owner: this node's actor, or the
//! owning peer over gRPC (`forward.rs`). The HTTP handlers and the forwarding service
//! both go through here, so a request is served the same way wherever it lands.
//!
//! Ownership can move while a request is on its way (join, leave, failure): an owner that
//! no longer owns the set answers `NotOwner`, and the request is routed again with the
//! newer view, for at most [`ROUTE_DEADLINE`]. A write is retried only when it certainly
//! was not applied (refused before reaching the actor, or the owner unreachable before
//! anything was sent), so a retry never applies a write twice — or, when it carries an
//! op id, also when its fate is unknown (the owner died mid-request): the owner, old or
//! new, answers a remembered op id from the store's record instead of applying it again,
//! so such a write keeps being routed, for at most [`FATE_UNKNOWN_DEADLINE`], until one
//! owner answers.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::FutureExt;
use smallvec::SmallVec;
use tether_cluster::{Member, RingPlacement};
use tether_proto::api::{Delivery, UpdateOutcome};
use tether_proto::presence::PresenceView;
use tether_proto::reconcile::Held;
use tether_proto::synclog::diff_since;
use tether_proto::{Bucket, BucketId, Fields, SetKey, Update};
use tokio::sync::{oneshot, watch};
use tracing::Instrument;

use crate::error::{NodeError, Result};
use crate::routing::forward::Peers;
pub use crate::sets::actor::{answer_size, Get};
use crate::sets::actor::{
    DeviceContact, EnsureBuckets, GetPresence, HeldVersions, Put, Stale, Subscribe, SubscribeAnswer,
};
use crate::sets::registry::Shared;
use crate::store::HistoryPage;

/// How long a request keeps looking for its set's owner while ownership moves: a request
/// for a set whose owner was just killed waits here (its forward refused, routed again
/// every [`ROUTE_RETRY`]) until the cluster declared the owner down and a new owner took
/// the lease, instead of failing with 503 — within a device's patience.
pub const ROUTE_DEADLINE: Duration = Duration::from_secs(5);
/// How long a write with an op id whose fate is unknown keeps being routed: long enough
/// for the cluster to declare a dead owner down and a new owner to take the set over.
pub const FATE_UNKNOWN_DEADLINE: Duration = Duration::from_secs(12);
/// A diff spans at most this many versions; further behind, the whole value goes.
const MAX_DIFF_SPAN: u64 = 1_000;
/// Pause before routing again, so a view that is converging gets the time to.
const ROUTE_RETRY: Duration = Duration::from_millis(50);
/// How long a change of access waits for an owner to release its held subscriptions.
const RELEASE_WAIT: Duration = Duration::from_secs(2);

/// What a write did, as the client is told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutKind {
    /// Based on the current version; merged.
    Applied,
    /// Based on an older version but merged.
    Merged,
    /// Refused; the stored bucket stands.
    Refused,
}

/// A write's answer: its kind and the bucket as the write left it (for a refusal, the
/// stored copy it was refused against).
#[derive(Debug, Clone)]
pub struct PutAnswer {
    /// Applied, merged or refused.
    pub kind: PutKind,
    /// The bucket.
    pub bucket: Bucket,
    /// The owner answered from the memory of an earlier attempt with this op id.
    pub replayed: bool,
    /// The set's device holds no subscribe: it gets the change at its next sync.
    pub delivery: Option<Delivery>,
}

/// A write as routed: the update and everything that travels with it to the owner.
#[derive(Debug, Clone)]
pub struct Write {
    /// Fields, base version, OCC flag.
    pub update: Update,
    /// The writer's session.
    pub session: Option<String>,
    /// `device:<serial>` or `user:<id>`.
    pub by: String,
    /// The client's idempotency key.
    pub op_id: Option<String>,
}

/// A bucket a subscriber is sent: its state, and a diff from the version it held when it
/// asked for diffs and one could be made.
#[derive(Debug, Clone, PartialEq)]
pub struct BucketUpdate {
    /// The bucket as committed.
    pub bucket: Bucket,
    /// The held version and the fields changed since.
    pub diff: Option<(u64, Fields)>,
}

/// What every owner of a subscription needs besides the held versions.
#[derive(Debug, Clone, Default)]
pub struct HoldOptions {
    /// The subscriber's session (echo suppression).
    pub session: Option<String>,
    /// The subscriber takes diffs.
    pub diffs: bool,
    /// Most bytes of stale buckets in an immediate answer (the first always).
    pub max_bytes: usize,
    /// The subscriber already has its own session's writes (a stream holding again):
    /// a bucket changed since the held version only by them is not stale.
    pub own_writes_known: bool,
    /// The subscribing device (its own set's subscribe marks it online there).
    pub device: Option<SetKey>,
    /// The device's declared next sync, ms from now.
    pub next_sync_ms: Option<u64>,
}

/// Where a set is served.
#[derive(Debug)]
enum Route {
    Local,
    Peer(Member),
}

/// The answer to a subscribe check across every set it spans.
#[derive(Debug)]
pub enum Subscription {
    /// Some held versions were stale: these buckets, at once.
    Now(Vec<BucketUpdate>),
    /// Nothing stale; held on every owner until one answers.
    Held(HeldSubscription),
}

/// A subscription held on one or more owners. Dropping it cancels it everywhere (local
/// actors are told, forwarded calls are cancelled).
pub struct HeldSubscription {
    legs: Vec<HeldLeg>,
}

impl std::fmt::Debug for HeldSubscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HeldSubscription")
            .field("owners", &self.legs.len())
            .finish()
    }
}

/// How long past the subscriber's timeout a node waits for a forwarded owner's own
/// timeout answer. The owner holds a forwarded subscription for the subscriber's
/// `timeout_ms` from when the call reached it, so its "nothing changed" comes a little
/// after the forwarding node's own timer (the call's transit both ways); past this
/// grace the owner is taken as unreachable.
pub const FORWARDED_ANSWER_GRACE: Duration = Duration::from_secs(1);

impl HeldSubscription {
    /// The buckets of the first owner to answer before `timeout` (the others are
    /// cancelled), or nothing ("no change": the client resubscribes with its versions and
    /// loses nothing) when the node starts draining or `timeout` passes — but a
    /// "no change" is given only when every owner confirmed it: each owner answers by its
    /// own timer (within [`FORWARDED_ANSWER_GRACE`]), a local one after confirming its
    /// lease (`Shared::confirm_held`, chaos defect 18). An owner whose call broke, or
    /// whose answer does not come within the grace, may have sent a notification that
    /// was lost on the way: that is an error (the held response is cut, the client
    /// retries), never a "no change" the owner did not give (chaos defect 7).
    pub fn answer(
        self,
        timeout: Duration,
        draining: watch::Receiver<bool>,
    ) -> impl Future<Output = Result<Vec<BucketUpdate>>> {
        self.answer_until(timeout, drained(draining))
    }

    /// [`HeldSubscription::answer`], with the drain as `drained` completing: a caller
    /// that learns of the drain otherwise passes `std::future::pending()` and keeps no
    /// watch of its own (`api::http`'s held slots).
    pub fn answer_until(
        mut self,
        timeout: Duration,
        drained: impl Future<Output = ()> + Send,
    ) -> impl Future<Output = Result<Vec<BucketUpdate>>> + Send {
        use futures::future::Either;
        if let [HeldLeg::Local(_)] = self.legs.as_slice() {
            if let Some(HeldLeg::Local(leg)) = self.legs.pop() {
                return Either::Left(leg.answer(timeout, drained));
            }
        }
        Either::Right(self.answer_legs(timeout, drained))
    }

    /// [`HeldSubscription::answer`] for several legs, or one that is not local.
    async fn answer_legs(
        self,
        timeout: Duration,
        drained: impl Future<Output = ()>,
    ) -> Result<Vec<BucketUpdate>> {
        if self.legs.is_empty() {
            return Ok(Vec::new());
        }
        let mut unconfirmed = self.legs.len();
        let mut legs = Legs::new(self.legs);
        tokio::pin!(drained);
        tokio::select! {
            Some(answer) = legs.next() => return answer,
            () = tokio::time::sleep(timeout) => {}
            () = &mut drained => return Ok(Vec::new()),
        }
        let grace = tokio::time::sleep(FORWARDED_ANSWER_GRACE);
        tokio::pin!(grace);
        while unconfirmed > 0 {
            tokio::select! {
                next = legs.next() => match next {
                    Some(Ok(buckets)) if !buckets.is_empty() => return Ok(buckets),
                    Some(Ok(_)) => unconfirmed -= 1,
                    Some(Err(e)) => return Err(e),
                    None => break,
                },
                () = &mut grace => return Err(unconfirmed_in_time(unconfirmed)),
                () = &mut drained => return Ok(Vec::new()),
            }
        }
        Ok(Vec::new())
    }
}

/// The error of a held subscription some of whose owners did not answer in time.
fn unconfirmed_in_time(owners: usize) -> NodeError {
    NodeError::Unavailable(format!(
        "{owners} owner(s) of the subscribed bucket sets did not answer in time; resubscribe"
    ))
}

/// The answers still awaited of a held subscription's legs, in the order they come. Most
/// subscriptions have one owner; that one is awaited as it is, without the task and queue
/// allocations of a `FuturesUnordered` (≈ 220 B of every held device's heap).
enum Legs {
    /// One leg; `None` once it answered.
    One(Option<BoxFuture<'static, Result<Vec<BucketUpdate>>>>),
    Many(futures::stream::FuturesUnordered<BoxFuture<'static, Result<Vec<BucketUpdate>>>>),
}

impl Legs {
    fn new(mut legs: Vec<HeldLeg>) -> Self {
        if legs.len() == 1 {
            Legs::One(legs.pop().map(HeldLeg::into_future))
        } else {
            Legs::Many(legs.into_iter().map(HeldLeg::into_future).collect())
        }
    }

    /// The next leg's answer; `None` when every leg answered. Cancel-safe: a leg's future
    /// stays here when the caller stops waiting.
    async fn next(&mut self) -> Option<Result<Vec<BucketUpdate>>> {
        use futures::stream::StreamExt;
        match self {
            Legs::One(leg) => {
                let answer = leg.as_mut()?.await;
                *leg = None;
                Some(answer)
            }
            Legs::Many(legs) => legs.next().await,
        }
    }
}

/// One owner's held part of a subscription, answered by that owner's own timer: its
/// buckets, or empty ("nothing changed", confirmed by the owner when its hold passed),
/// or an error when the call broke or the set moved first. A local leg inline, not boxed:
/// it is what a held device's subscription keeps here, and a box would be one more block
/// per held device.
#[allow(clippy::large_enum_variant)]
pub(crate) enum HeldLeg {
    /// Held by this node's actors: a record of the hold, not a future (a held device's
    /// subscription on its own node is the commonest thing a node keeps; BENCHMARKS.md
    /// "Where a held device's bytes go").
    Local(LocalLeg),
    /// Held on a peer: the forwarded call's answer.
    Future(BoxFuture<'static, Result<Vec<BucketUpdate>>>),
}

impl HeldLeg {
    /// A leg answered by `answer` (a forwarded call's).
    pub(crate) fn new(
        answer: impl Future<Output = Result<Vec<BucketUpdate>>> + Send + 'static,
    ) -> Self {
        HeldLeg::Future(answer.boxed())
    }

    /// The leg's answer as a future of its own: a local one's by the leg's own timer.
    fn into_future(self) -> BoxFuture<'static, Result<Vec<BucketUpdate>>> {
        match self {
            HeldLeg::Local(leg) => leg.answer_by_its_hold(std::future::pending()).boxed(),
            HeldLeg::Future(answer) => answer,
        }
    }

    /// A leg held by this node's actors, answered here (a forwarded subscription's
    /// owner): its answer, or nothing when the node drains.
    pub(crate) async fn answer_within(
        self,
        draining: watch::Receiver<bool>,
    ) -> Result<Vec<BucketUpdate>> {
        let drained = drained(draining);
        match self {
            HeldLeg::Local(leg) => leg.answer_by_its_hold(drained).await,
            HeldLeg::Future(answer) => tokio::select! {
                buckets = answer => buckets,
                () = drained => Ok(Vec::new()),
            },
        }
    }
}

/// A subscription held by this node's actors: their answer channels, the guard that
/// cancels the holds, and what answering and holding again need. Until an answer, the
/// timeout or a break, this is all a locally held subscription keeps in the router.
pub(crate) struct LocalLeg {
    /// One channel per held set, in the order of `guard.sets` (inline: nearly always one).
    waiting: SmallVec<[oneshot::Receiver<Vec<Stale>>; 1]>,
    /// Also what each held set holds, subscribed again from there should a set move.
    guard: SubscriptionGuard,
    diffs: bool,
    /// When the hold ends for the sets' actors.
    hold_until: tokio::time::Instant,
    /// Where to look for the sets again should one move while held (a subscription this
    /// node routed itself); `None`: the move is the leg's error (a forwarded subscription's
    /// owner: the forwarding node looks again).
    again: Option<Again>,
}

/// What subscribing again needs besides the held lists ([`Router::again_when_moved`]).
/// The subscription's [`HoldOptions`] without their `device`, kept in every held record:
/// a device's own set is one of the leg's, named by `device` (its key not kept twice).
struct Again {
    router: Arc<Router>,
    session: Option<String>,
    next_sync_ms: Option<u64>,
    max_bytes: usize,
    /// Which of the leg's held lists is of the subscribing device's own set.
    device: Option<u16>,
    diffs: bool,
    own_writes_known: bool,
}

impl Again {
    /// The options to subscribe `held` (the leg's lists) again with.
    fn opts(self, held: &[HeldVersions]) -> (Arc<Router>, HoldOptions) {
        let device = self
            .device
            .and_then(|i| held.get(usize::from(i))?.set_key());
        let opts = HoldOptions {
            session: self.session,
            diffs: self.diffs,
            max_bytes: self.max_bytes,
            own_writes_known: self.own_writes_known,
            device,
            next_sync_ms: self.next_sync_ms,
        };
        (self.router, opts)
    }
}

impl LocalLeg {
    /// The first set's answer: its stale buckets (that set forgot the subscription as it
    /// answered: every reply is sent by whoever removed it, so only the others are told
    /// when the guard goes), or `Err` when a set dropped the subscription unanswered (its
    /// lease was found taken while held: its new owner may have written since, so no
    /// "nothing changed" from here).
    fn poll_answer(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::result::Result<Vec<Stale>, NodeError>> {
        use std::task::Poll;
        let Some((answered, answer)) = self.waiting.iter_mut().enumerate().find_map(|(i, rx)| {
            match std::pin::Pin::new(rx).poll(cx) {
                Poll::Ready(answer) => Some((i, answer)),
                Poll::Pending => None,
            }
        }) else {
            return Poll::Pending;
        };
        Poll::Ready(match answer {
            Ok(stale) => {
                // The guard tells only the others; the leg is consumed after this answer,
                // so `waiting` is left as it is.
                if answered < self.guard.sets.len() {
                    self.guard.sets.remove(answered);
                }
                Ok(stale)
            }
            Err(_) => Err(NodeError::NotOwner(
                "a subscribed bucket set moved to another node while held".into(),
            )),
        })
    }

    /// Whether "nothing changed" may be answered now the hold passed: every held set's
    /// lease is still this node's (chaos defect 18).
    fn confirm(&self) -> BoxFuture<'static, Result<()>> {
        let shared = self.guard.shared.clone();
        let sets = self.guard.keys();
        async move {
            let confirmed = sets.iter().map(|s| shared.confirm_held(s));
            futures::future::try_join_all(confirmed).await?;
            Ok(())
        }
        .boxed()
    }

    /// The answer to send for `stale`, the holds on the other sets let go first.
    async fn finish(self, stale: Vec<Stale>) -> Vec<BucketUpdate> {
        let LocalLeg { guard, diffs, .. } = self;
        let shared = guard.shared.clone();
        drop(guard);
        complete_diffs(&shared, stale, diffs).await
    }

    /// The leg's answer when it broke: held again wherever its sets are served now for
    /// what is left of the hold, or the break itself.
    async fn broke(self, broke: NodeError) -> Result<Vec<BucketUpdate>> {
        let LocalLeg {
            guard,
            hold_until,
            again,
            ..
        } = self;
        let held = guard.sets.clone();
        drop(guard);
        match again {
            Some(again) => {
                let (router, opts) = again.opts(&held);
                let held = held.iter().flat_map(|h| h.held().iter().cloned()).collect();
                router.subscribe_again(broke, held, hold_until, opts).await
            }
            None => Err(broke),
        }
    }

    /// The answer by the leg's own timer (`hold_until`), or nothing once `drained`
    /// completes: for a leg awaited beside others, and a forwarded subscription's owner.
    fn answer_by_its_hold(
        self,
        drained: impl Future<Output = ()>,
    ) -> impl Future<Output = Result<Vec<BucketUpdate>>> {
        let left = self
            .hold_until
            .saturating_duration_since(tokio::time::Instant::now());
        self.answer(left, drained)
    }

    /// The answer of a subscription held only here: as [`HeldSubscription::answer`] for
    /// one owner, with one timer for the subscriber's `timeout` and the grace after it.
    fn answer<D: Future<Output = ()>>(self, timeout: Duration, drained: D) -> LocalAnswer<D> {
        LocalAnswer {
            timer: tokio::time::sleep(timeout),
            drained,
            phase: Phase::Holding {
                leg: self,
                confirming: None,
            },
        }
    }
}

pin_project_lite::pin_project! {
    /// [`LocalLeg::answer`]: a future written out rather than an `async` block with a
    /// `select!`, whose every branch's state would be kept beside the record for the
    /// whole hold (a held device's commonest record; BENCHMARKS.md "Where a held device's
    /// bytes go").
    struct LocalAnswer<D> {
        #[pin]
        timer: tokio::time::Sleep,
        #[pin]
        drained: D,
        phase: Phase,
    }
}

/// Where a [`LocalAnswer`] is. The leg inline, as in [`HeldLeg`].
#[allow(clippy::large_enum_variant)]
enum Phase {
    /// Waiting for an answer, the timer or the drain; once the hold passed, `confirming`
    /// that every set's lease is still this node's (chaos defect 18) before "nothing
    /// changed" may be answered within the grace, unless an answer comes first.
    Holding {
        leg: LocalLeg,
        confirming: Option<BoxFuture<'static, Result<()>>>,
    },
    /// Answered or broken: the answer being made (diffs completed, or held again).
    Finishing(BoxFuture<'static, Result<Vec<BucketUpdate>>>),
    /// Completed.
    Done,
}

impl<D: Future<Output = ()>> Future for LocalAnswer<D> {
    type Output = Result<Vec<BucketUpdate>>;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        use std::task::Poll;
        let mut this = self.project();
        loop {
            let (mut leg, mut confirming) = match std::mem::replace(this.phase, Phase::Done) {
                Phase::Holding { leg, confirming } => (leg, confirming),
                Phase::Finishing(mut answer) => {
                    let polled = answer.as_mut().poll(cx);
                    if polled.is_pending() {
                        *this.phase = Phase::Finishing(answer);
                    }
                    return polled;
                }
                // Polled again after it completed.
                Phase::Done => return Poll::Pending,
            };
            // An answer first, then the confirmation, the timer and the drain.
            let ended = match leg.poll_answer(cx) {
                Poll::Ready(answered) => Some(answered),
                Poll::Pending => match confirming.as_mut().map(|c| c.as_mut().poll(cx)) {
                    Some(Poll::Ready(Ok(()))) => return Poll::Ready(Ok(Vec::new())),
                    Some(Poll::Ready(Err(e))) => Some(Err(e)),
                    Some(Poll::Pending) | None => None,
                },
            };
            if let Some(answered) = ended {
                *this.phase = Phase::Finishing(match answered {
                    Ok(stale) => leg.finish(stale).map(Ok).boxed(),
                    Err(broke) => leg.broke(broke).boxed(),
                });
                continue;
            }
            if this.timer.as_mut().poll(cx).is_ready() {
                if confirming.is_some() {
                    return Poll::Ready(Err(unconfirmed_in_time(1)));
                }
                this.timer
                    .as_mut()
                    .reset(tokio::time::Instant::now() + FORWARDED_ANSWER_GRACE);
                confirming = Some(leg.confirm());
                *this.phase = Phase::Holding { leg, confirming };
                continue;
            }
            *this.phase = Phase::Holding { leg, confirming };
            if this.drained.as_mut().poll(cx).is_ready() {
                *this.phase = Phase::Done;
                return Poll::Ready(Ok(Vec::new()));
            }
            return Poll::Pending;
        }
    }
}

/// Completes when the node starts draining (never when the router is gone).
pub(crate) async fn drained(mut draining: watch::Receiver<bool>) {
    if draining.wait_for(|d| *d).await.is_err() {
        // The router is gone: nothing will ever signal a drain.
        std::future::pending::<()>().await;
    }
}

/// One owner's part of a subscribe check (the held leg inline, as in [`HeldLeg`]).
#[allow(clippy::large_enum_variant)]
pub(crate) enum Leg {
    Now(Vec<BucketUpdate>),
    Held(HeldLeg),
}

/// Routes set operations to their owners.
#[derive(Debug)]
pub struct Router {
    shared: Arc<Shared>,
    cluster: Option<ClusterRoutes>,
    next_sub: AtomicU64,
    draining: watch::Sender<bool>,
}

#[derive(Debug)]
struct ClusterRoutes {
    placement: Arc<RingPlacement>,
    local: Member,
    peers: Arc<Peers>,
}

/// Reaches the previous holder of a set's lease through the peers.
#[derive(Debug)]
struct PeerTakeOver {
    placement: Arc<RingPlacement>,
    peers: Arc<Peers>,
}

impl crate::sets::registry::TakeOver for PeerTakeOver {
    fn stop_serving(&self, set: SetKey, previous: String) -> BoxFuture<'static, bool> {
        let (placement, peers) = (self.placement.clone(), self.peers.clone());
        async move {
            // A node that left the view may still be running (drained, paused, cut off):
            // ask it too; if it cannot confirm, the new owner waits out its lease trust
            // (invariant 23).
            let Some(member) = placement.last_known(&previous) else {
                return false;
            };
            match peers.relinquish(&member, &set).await {
                Ok(()) => true,
                Err(e) => {
                    tracing::debug!(%set, %previous, error = %e, "previous owner unreachable; waiting out its lease trust (its commits are fenced)");
                    false
                }
            }
        }
        .boxed()
    }
}

impl Router {
    /// A router for one node alone: every set is local.
    pub fn single(shared: Arc<Shared>) -> Arc<Self> {
        Arc::new(Router {
            shared,
            cluster: None,
            next_sub: AtomicU64::new(1),
            draining: watch::Sender::new(false),
        })
    }

    /// A router for a cluster member: sets go where `placement` says; `peers` reaches the
    /// other members.
    pub fn clustered(
        shared: Arc<Shared>,
        placement: Arc<RingPlacement>,
        local: Member,
        peers: Peers,
    ) -> Arc<Self> {
        shared.set_placement(placement.clone());
        peers.attach(placement.clone());
        let peers = Arc::new(peers);
        peers.watch_links();
        shared.set_takeover(Arc::new(PeerTakeOver {
            placement: placement.clone(),
            peers: peers.clone(),
        }));
        Arc::new(Router {
            shared,
            cluster: Some(ClusterRoutes {
                placement,
                local,
                peers,
            }),
            next_sub: AtomicU64::new(1),
            draining: watch::Sender::new(false),
        })
    }

    /// Actors, store, metrics.
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Held subscriptions answer (empty) from now on: the node is draining.
    pub fn start_draining(&self) {
        self.draining.send_replace(true);
    }

    fn route(&self, set: &SetKey) -> Route {
        match &self.cluster {
            None => Route::Local,
            Some(c) => {
                let owner = c.placement.owner(set.as_str());
                if owner.id == c.local.id {
                    Route::Local
                } else {
                    Route::Peer(owner)
                }
            }
        }
    }

    /// The member a call relayed through this node is for: `None` when it is this node
    /// (serve it here), else the member as last known (`NotOwner` when unknown: the
    /// caller routes again).
    pub(crate) fn relay_member(&self, id: &str) -> Result<Option<Member>> {
        let Some(c) = &self.cluster else {
            return Ok(None);
        };
        if c.local.id.as_str() == id {
            return Ok(None);
        }
        c.placement
            .last_known(id)
            .map(Some)
            .ok_or_else(|| NodeError::NotOwner(format!("no member {id} known to relay to")))
    }

    pub(crate) fn peers(&self) -> Result<&Peers> {
        self.cluster
            .as_ref()
            .map(|c| c.peers.as_ref())
            .ok_or_else(|| NodeError::Internal("forwarding without a cluster".into()))
    }

    /// Runs `attempt` against the set's current owner until it answers something other
    /// than `NotOwner`, or [`ROUTE_DEADLINE`] passes.
    async fn routed<T, F, Fut>(&self, set: &SetKey, attempt: F) -> Result<T>
    where
        F: FnMut(Route) -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        self.routed_until(set, ROUTE_DEADLINE, false, attempt).await
    }

    /// [`Self::routed`] with a deadline, and with `retry_unknown` also routing again
    /// after a `FateUnknown` (a write with an op id).
    async fn routed_until<T, F, Fut>(
        &self,
        set: &SetKey,
        limit: Duration,
        retry_unknown: bool,
        mut attempt: F,
    ) -> Result<T>
    where
        F: FnMut(Route) -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let route = self.route(set);
            // A forward's `route` span is always made (its log lines name the owner); a
            // local one only when it is seen (`telemetry::inner_span`).
            let span = if matches!(route, Route::Peer(_))
                || crate::telemetry::seen(&tracing::Span::current())
            {
                tracing::info_span!(
                    "route",
                    %set,
                    owner = match &route {
                        Route::Local => "local",
                        Route::Peer(m) => m.id.as_str(),
                    }
                )
            } else {
                tracing::Span::none()
            };
            match attempt(route).instrument(span).await {
                Err(NodeError::FateUnknown(why)) if retry_unknown => {
                    if tokio::time::Instant::now() + ROUTE_RETRY > deadline {
                        return Err(NodeError::FateUnknown(format!(
                            "{why}; the write carries an op id: retry it with the same op id"
                        )));
                    }
                    tracing::info!(%set, %why, "write with an op id lost its owner mid-request; routing it again");
                    tokio::time::sleep(ROUTE_RETRY).await;
                }
                Err(NodeError::NotOwner(why)) => {
                    if tokio::time::Instant::now() + ROUTE_RETRY > deadline {
                        return Err(NodeError::Unavailable(format!(
                            "bucket set {set} has no reachable owner right now ({why}); retry"
                        )));
                    }
                    tracing::debug!(%set, %why, "routing again");
                    tokio::time::sleep(ROUTE_RETRY).await;
                }
                other => return other,
            }
        }
    }

    /// The committed buckets of `set` (all, or the listed ones that exist), with their
    /// values (at most `max_bytes` of them, else 413) or without.
    pub async fn get(&self, set: &SetKey, read: Get) -> Result<Vec<Bucket>> {
        self.routed(set, |route| {
            let read = read.clone();
            async move {
                match route {
                    Route::Local => self.local_get(set, read).await,
                    Route::Peer(owner) => Box::pin(self.peers()?.get(&owner, set, read)).await,
                }
            }
        })
        .await
    }

    /// One write, answered once it is durable on the owner. A write with an op id that
    /// lost its owner mid-request is routed again (to the new owner once the view moved):
    /// whichever owner committed it answers the retry from its record.
    pub async fn put(&self, id: &BucketId, write: Write) -> Result<PutAnswer> {
        let set = id.set_key();
        let (limit, retry_unknown) = if write.op_id.is_some() {
            (FATE_UNKNOWN_DEADLINE, true)
        } else {
            (ROUTE_DEADLINE, false)
        };
        self.routed_until(&set, limit, retry_unknown, |route| {
            let write = write.clone();
            async move {
                match route {
                    Route::Local => self.local_put(id, write).await,
                    // Boxed, here and in the other routes: a forward's future (its gRPC
                    // call) is ten times a local one's, and every local request's future
                    // would otherwise be as large and be moved and zeroed at that size.
                    Route::Peer(owner) => Box::pin(self.peers()?.put(&owner, id, write)).await,
                }
            }
        })
        .await
    }

    /// What the owner of `set` (a device's) knows of the device's presence.
    pub async fn presence(&self, set: &SetKey) -> Result<PresenceView> {
        self.routed(set, |route| async move {
            match route {
                Route::Local => self.local_presence(set).await,
                Route::Peer(owner) => Box::pin(self.peers()?.presence(&owner, set)).await,
            }
        })
        .await
    }

    pub(crate) async fn local_presence(&self, set: &SetKey) -> Result<PresenceView> {
        self.shared.call(set, GetPresence).await?
    }

    /// A page of bucket `id`'s history, straight from the store every owner commits to
    /// (only committed changes are there); `None` when the bucket does not exist.
    pub async fn history(
        &self,
        id: &BucketId,
        since_version: u64,
        limit: usize,
    ) -> Result<Option<HistoryPage>> {
        Ok(self.shared.store.history(id, since_version, limit).await?)
    }

    /// Creates the listed buckets of `set` unless they exist; `device_type` names the
    /// template its buckets follow (registration).
    pub async fn ensure(
        &self,
        set: &SetKey,
        buckets: Vec<(BucketId, Fields)>,
        device_type: Option<String>,
        contact: Option<DeviceContact>,
    ) -> Result<()> {
        let msg = EnsureBuckets {
            buckets,
            device_type,
            contact,
        };
        self.routed(set, |route| {
            let msg = msg.clone();
            async move {
                match route {
                    Route::Local => self.local_ensure(set, msg).await,
                    Route::Peer(owner) => Box::pin(self.peers()?.ensure(&owner, set, msg)).await,
                }
            }
        })
        .await
    }

    /// Access to these sets changed: their held subscriptions are answered, wherever
    /// they are held, so their clients authenticate again. Returns once every owner has
    /// released them (or was not reached within [`RELEASE_WAIT`]; logged): a subscription
    /// made after the change was answered is never cut by it.
    pub async fn release_held<'a>(self: &Arc<Self>, sets: impl IntoIterator<Item = &'a str>) {
        let mut remote = Vec::new();
        for key in sets {
            let Ok(set) = SetKey::parse(key) else {
                continue;
            };
            match self.route(&set) {
                Route::Local => self.local_release(&set),
                Route::Peer(owner) => remote.push((owner, set)),
            }
        }
        let on_owners = remote.into_iter().map(|(owner, set)| async move {
            let released = match self.peers() {
                Ok(peers) => tokio::time::timeout(RELEASE_WAIT, peers.release_held(&owner, &set))
                    .await
                    .unwrap_or_else(|_| Err(NodeError::Unavailable("no answer in time".into()))),
                Err(e) => Err(e),
            };
            if let Err(e) = released {
                tracing::warn!(%set, owner = %owner.id, error = %e, "releasing held subscriptions on the owner failed");
            }
        });
        futures::future::join_all(on_owners).await;
    }

    /// Checks held versions on every owner of the sets listed and holds where nothing is
    /// stale (seed 000 FIG 21C/21D, fanned out): answers at once if any owner has newer
    /// buckets, else a [`HeldSubscription`] that any owner's answer completes.
    /// An immediate answer carries at most about `max_bytes` of buckets per owner (the
    /// first stale bucket always); the rest stay stale for the next subscribe.
    pub async fn subscribe(
        self: &Arc<Self>,
        by_set: BTreeMap<SetKey, Vec<Held>>,
        timeout: Duration,
        opts: HoldOptions,
    ) -> Result<Subscription> {
        // A hard deadline: an owner that neither answers nor refuses (a silent host, a
        // partition TCP keeps retrying across) must not hold the subscriber past it —
        // found by the cluster simulator (chaos REPORT.md defect 17).
        let now = tokio::time::Instant::now();
        let deadline = now + ROUTE_DEADLINE;
        // One hold for all the routing attempts: every owner ends its part when the
        // subscriber's timeout ends, however long the routing took (a retry given the whole
        // timeout again answered after the subscriber's grace: a 503, not "nothing changed").
        let hold_until = now + timeout;
        loop {
            let opened = tokio::time::timeout_at(
                deadline,
                self.open_subscription(&by_set, hold_until, &opts),
            )
            .await
            .unwrap_or_else(|_| {
                Err(NodeError::Unavailable(format!(
                    "no owner of the subscribed bucket sets answered within \
                             {ROUTE_DEADLINE:?}; retry"
                )))
            });
            match opened {
                Err(NodeError::NotOwner(why))
                    if tokio::time::Instant::now() + ROUTE_RETRY <= deadline =>
                {
                    tracing::debug!(%why, "subscribe routed again");
                    tokio::time::sleep(ROUTE_RETRY).await;
                }
                Err(NodeError::NotOwner(why)) => {
                    return Err(NodeError::Unavailable(format!(
                        "a subscribed bucket set has no reachable owner right now ({why}); retry"
                    )))
                }
                other => return other,
            }
        }
    }

    async fn open_subscription(
        self: &Arc<Self>,
        by_set: &BTreeMap<SetKey, Vec<Held>>,
        hold_until: tokio::time::Instant,
        opts: &HoldOptions,
    ) -> Result<Subscription> {
        let timeout = hold_until.saturating_duration_since(tokio::time::Instant::now());
        let mut local = BTreeMap::new();
        let mut remote: BTreeMap<_, (Member, Vec<Held>)> = BTreeMap::new();
        for (set, held) in by_set {
            match self.route(set) {
                Route::Local => {
                    local.insert(set.clone(), held.clone());
                }
                Route::Peer(owner) => remote
                    .entry(owner.id.clone())
                    .or_insert_with(|| (owner, Vec::new()))
                    .1
                    .extend(held.iter().cloned()),
            }
        }
        let mut opening: Vec<BoxFuture<'_, Result<Leg>>> = Vec::new();
        if !local.is_empty() {
            let router = self.clone();
            let opts = opts.clone();
            opening.push(
                async move {
                    Ok(match self.open_local(local, opts.clone(), timeout).await? {
                        // A set that moved while held (its lease found taken): looked for
                        // again where it is served now.
                        Leg::Held(HeldLeg::Local(leg)) => {
                            Leg::Held(HeldLeg::Local(router.again_when_moved(leg, opts)))
                        }
                        other => other,
                    })
                }
                .boxed(),
            );
        }
        for (_, (owner, held)) in remote {
            let peers = self.peers()?;
            let opts = opts.clone();
            let router = self.clone();
            opening.push(
                async move {
                    let leg = peers
                        .subscribe(&owner, held.clone(), timeout, opts.clone())
                        .await?;
                    Ok(match leg {
                        Leg::Held(leg) => {
                            Leg::Held(router.held_again_if_broken(leg, held, hold_until, opts))
                        }
                        now => now,
                    })
                }
                .boxed(),
            );
        }
        // Every owner checks at once; any error drops (cancels) the legs already held.
        let legs = futures::future::try_join_all(opening).await?;
        let mut now = Vec::new();
        let mut held = Vec::new();
        for leg in legs {
            match leg {
                Leg::Now(buckets) => now.extend(buckets),
                Leg::Held(wait) => held.push(wait),
            }
        }
        Ok(if now.is_empty() {
            Subscription::Held(HeldSubscription { legs: held })
        } else {
            Subscription::Now(now)
        })
    }

    /// A held forwarded leg that, when its call breaks (the owner was killed, or drained
    /// without answering), subscribes its `held` buckets again wherever their sets are
    /// served now, for what is left of the hold: the new owner answers at once if anything
    /// is newer than the versions held — a change the old owner committed and whose
    /// notification was lost included — and holds otherwise. So a subscriber whose owner
    /// died waits and is answered instead of being cut. Past `hold_until` the break is the
    /// leg's error, as before (a "no change" only an owner gives, chaos defect 7). (A
    /// forwarded leg is always a future; a local one is returned as it is.)
    fn held_again_if_broken(
        self: Arc<Self>,
        leg: HeldLeg,
        held: Vec<Held>,
        hold_until: tokio::time::Instant,
        opts: HoldOptions,
    ) -> HeldLeg {
        match leg {
            HeldLeg::Future(answer) => HeldLeg::new(async move {
                match answer.await {
                    Ok(buckets) => Ok(buckets),
                    Err(broke) => self.subscribe_again(broke, held, hold_until, opts).await,
                }
            }),
            local @ HeldLeg::Local(_) => local,
        }
    }

    /// The same for a held local leg, whose sets may move while held (a lease found
    /// taken): it is subscribed again, as a broken forwarded call is, with the lists its
    /// sets keep (no list of its own is kept for it).
    fn again_when_moved(self: Arc<Self>, mut leg: LocalLeg, opts: HoldOptions) -> LocalLeg {
        let device = opts.device.and_then(|device| {
            let i = leg.guard.sets.iter().position(|list| {
                list.held()
                    .first()
                    .is_some_and(|h| h.id.key() == device.as_str())
            })?;
            u16::try_from(i).ok()
        });
        leg.again = Some(Again {
            router: self,
            session: opts.session,
            next_sync_ms: opts.next_sync_ms,
            max_bytes: opts.max_bytes,
            device,
            diffs: opts.diffs,
            own_writes_known: opts.own_writes_known,
        });
        leg
    }

    /// After a held leg broke with `broke`: its `held` buckets subscribed again where their
    /// sets are served now, for what is left until `hold_until` (see
    /// [`Router::held_again_if_broken`]); past it, the break.
    /// (A named, boxed future: it is awaited inside the answers it may end up giving.)
    fn subscribe_again(
        self: Arc<Self>,
        broke: NodeError,
        held: Vec<Held>,
        hold_until: tokio::time::Instant,
        opts: HoldOptions,
    ) -> BoxFuture<'static, Result<Vec<BucketUpdate>>> {
        async move {
            let left = hold_until.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return Err(broke);
            }
            tracing::debug!(
                error = %broke,
                left_ms = left.as_millis() as u64,
                "held subscription's owner call broke: subscribing again where its sets are \
                 served now"
            );
            let mut by_set: BTreeMap<SetKey, Vec<Held>> = BTreeMap::new();
            for h in held {
                by_set.entry(h.id.set_key()).or_default().push(h);
            }
            let draining = self.drain_signal();
            match self.subscribe(by_set, left, opts).boxed().await? {
                Subscription::Now(buckets) => Ok(buckets),
                Subscription::Held(again) => {
                    again
                        .answer(
                            hold_until.saturating_duration_since(tokio::time::Instant::now()),
                            draining,
                        )
                        .boxed()
                        .await
                }
            }
        }
        .boxed()
    }

    pub(crate) async fn local_get(&self, set: &SetKey, read: Get) -> Result<Vec<Bucket>> {
        self.shared.call(set, read).await?
    }

    pub(crate) async fn local_put(&self, id: &BucketId, write: Write) -> Result<PutAnswer> {
        let stall = write.op_id.as_deref().is_some_and(|op| {
            self.shared
                .config
                .fault_stall_op_prefix
                .as_deref()
                .is_some_and(|p| op.starts_with(p))
        });
        let rx = self
            .shared
            .call(
                &id.set_key(),
                Put {
                    id: id.clone(),
                    update: write.update,
                    session: write.session,
                    by: write.by,
                    op_id: write.op_id,
                },
            )
            .await??;
        // Past this point the write may be committed: never `NotOwner` (no retry).
        let written = rx
            .await
            .map_err(|_| NodeError::Unavailable("bucket set stopped before the commit".into()))??;
        if stall && !written.replayed {
            // Fault injection (tests only): committed, and the answer never leaves.
            tracing::warn!(bucket = %id, "fault injection: holding the answer of a committed write");
            std::future::pending::<()>().await;
        }
        let kind = match written.outcome {
            UpdateOutcome::Applied => PutKind::Applied,
            UpdateOutcome::Merged => PutKind::Merged,
            UpdateOutcome::Refused => PutKind::Refused,
        };
        Ok(PutAnswer {
            kind,
            bucket: written.bucket,
            replayed: written.replayed,
            delivery: written.delivery,
        })
    }

    pub(crate) async fn local_ensure(&self, set: &SetKey, msg: EnsureBuckets) -> Result<()> {
        let created = self.shared.call(set, msg).await??;
        created
            .await
            .map_err(|_| NodeError::Unavailable("bucket set stopped".into()))?
    }

    pub(crate) fn local_release(&self, set: &SetKey) {
        self.shared.release_held(set);
    }

    /// The subscribe check on each of `by_set` (all served here) under one subscription
    /// id: the stale buckets of the sets that answered at once (each later set's answer
    /// budget less what came before), and the holds of the others, one answer channel
    /// each (`stream`: kept across answers, [`Subscribe::stream`]).
    async fn hold_local(
        &self,
        by_set: impl IntoIterator<Item = (SetKey, Vec<Held>)>,
        opts: &HoldOptions,
        stream: bool,
    ) -> Result<LocalHolds> {
        let sub_id = self.next_sub.fetch_add(1, Ordering::Relaxed);
        let by_set = by_set.into_iter();
        // Both kept for the whole hold: sized to the sets, not to a growing `Vec`'s four.
        let sets = by_set.size_hint().0;
        let mut guard = SubscriptionGuard {
            shared: self.shared.clone(),
            sub_id,
            sets: SmallVec::with_capacity(sets),
        };
        let mut budget = opts.max_bytes;
        let mut now = Vec::new();
        let mut held = Vec::with_capacity(sets);
        for (set, versions) in by_set {
            if versions.is_empty() {
                // Nothing of the set held: nothing to wait for there.
                continue;
            }
            let (msg, list) = Subscribe {
                sub_id,
                held: versions,
                session: opts.session.clone(),
                diffs: opts.diffs,
                max_bytes: budget,
                own_writes_known: opts.own_writes_known,
                device: opts.device.as_ref() == Some(&set),
                next_sync_ms: opts.next_sync_ms,
                stream,
                waiter: Default::default(),
            }
            .waiter();
            // Guarded before the call: if this future is dropped after the actor held the
            // subscription but before its answer came back (the client or the forwarding
            // peer left just then), the guard still cancels it there.
            guard.sets.push(list);
            let answer = self.shared.call(&set, msg).await??;
            match answer {
                SubscribeAnswer::Now(stale) => {
                    // Nothing held there.
                    guard.sets.pop();
                    for s in &stale {
                        budget = budget.saturating_sub(answer_size(&s.bucket));
                    }
                    now.extend(stale);
                }
                answer => held.push(answer),
            }
        }
        Ok(LocalHolds { guard, now, held })
    }

    /// The subscribe check on this node's own sets (every listed set must be local),
    /// held for `hold`. With `diffs`, a stale bucket whose diff the actor could not make
    /// from memory gets one from the store's log when that still reaches back to the held
    /// version. When `hold` passes the leg answers "nothing changed" only if every set's
    /// lease is still this node's (`Shared::confirm_held`; chaos defect 18): an error
    /// otherwise, as when a set moves while held (its lease found taken).
    pub(crate) async fn open_local(
        &self,
        by_set: BTreeMap<SetKey, Vec<Held>>,
        opts: HoldOptions,
        hold: Duration,
    ) -> Result<Leg> {
        let diffs = opts.diffs;
        let Split {
            guard,
            now,
            held: waiting,
        }: Split<SmallVec<_>> = self
            .hold_local(by_set, &opts, false)
            .await?
            .split(|answer| match answer {
                SubscribeAnswer::Held(rx) => Some(rx),
                _ => None,
            })?;
        if !now.is_empty() || waiting.is_empty() {
            return Ok(Leg::Now(complete_diffs(&self.shared, now, diffs).await));
        }
        Ok(Leg::Held(HeldLeg::Local(LocalLeg {
            waiting,
            guard,
            diffs,
            hold_until: tokio::time::Instant::now() + hold,
            again: None,
        })))
    }

    /// A stream's next hold (`api/stream.rs`) when every set it holds is served by this
    /// node: held by the sets' actors across changes ([`StreamHold`]), not subscribed
    /// again after each. `None` when a set is served elsewhere or is moving: the stream
    /// holds through [`Router::subscribe`].
    pub async fn open_stream(
        &self,
        by_set: &BTreeMap<SetKey, Vec<Held>>,
        opts: &HoldOptions,
    ) -> Result<Option<StreamOpen>> {
        if by_set.is_empty() || !by_set.keys().all(|s| matches!(self.route(s), Route::Local)) {
            return Ok(None);
        }
        let owned = by_set.iter().map(|(set, held)| (set.clone(), held.clone()));
        let Split {
            guard,
            now,
            held: held_by,
        }: Split<Vec<_>> = match self.hold_local(owned, opts, true).await {
            Err(NodeError::NotOwner(_)) => return Ok(None),
            r => r?.split(|answer| match answer {
                SubscribeAnswer::Stream(rx) => Some(rx),
                _ => None,
            })?,
        };
        if !now.is_empty() || held_by.is_empty() {
            // Stale somewhere: answered now, and the holds made meanwhile let go (guard).
            drop(guard);
            return Ok(Some(StreamOpen::Now(
                complete_diffs(&self.shared, now, opts.diffs).await,
            )));
        }
        Ok(Some(StreamOpen::Held(StreamHold {
            held_by,
            guard,
            diffs: opts.diffs,
        })))
    }

    /// This node's live members view size (1 outside a cluster).
    pub fn members(&self) -> usize {
        self.cluster
            .as_ref()
            .map_or(1, |c| c.placement.ring().members().len())
    }

    /// Whether this node reaches a majority of its cluster's last known members (`None`
    /// outside a cluster: a node alone always serves).
    pub fn quorum(&self) -> Option<tether_cluster::Quorum> {
        self.cluster.as_ref().map(|c| c.placement.quorum())
    }

    /// A receiver that turns true when the node starts draining.
    pub fn drain_signal(&self) -> watch::Receiver<bool> {
        self.draining.subscribe()
    }
}

/// What a stream's hold on its local sets found: stale buckets at once, or held.
#[derive(Debug)]
pub enum StreamOpen {
    /// Some held versions were stale: these buckets (nothing is held).
    Now(Vec<BucketUpdate>),
    /// Held by the sets' actors until the stream drops this.
    Held(StreamHold),
}

/// A stream's hold on the local sets it spans, answered at each change by whichever set
/// changed. Dropping it cancels it on every set.
pub struct StreamHold {
    /// One channel per set, in the order of `guard.sets`.
    held_by: Vec<tokio::sync::mpsc::Receiver<Vec<Stale>>>,
    guard: SubscriptionGuard,
    diffs: bool,
}

impl std::fmt::Debug for StreamHold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamHold")
            .field("sets", &self.guard.sets)
            .finish()
    }
}

impl StreamHold {
    /// The next answer of any of its sets; `None` once a set ended its hold without one
    /// (the actor let go: a lost lease, an answer the stream had not taken yet, or one
    /// the budget left short) — the stream then holds again from its cursor. An empty
    /// answer also ends it (handoff, access change, drain: the same, told).
    pub async fn next(&mut self) -> Option<Vec<BucketUpdate>> {
        use std::task::Poll;
        let stale = std::future::poll_fn(|cx| {
            for rx in &mut self.held_by {
                if let Poll::Ready(answer) = rx.poll_recv(cx) {
                    return Poll::Ready(answer);
                }
            }
            Poll::Pending
        })
        .await?;
        Some(complete_diffs(&self.guard.shared, stale, self.diffs).await)
    }

    /// Whether the sets' owner still holds their leases: the stream's silence until now
    /// was "nothing changed" (a long-poll's timeout confirms it the same way).
    pub async fn confirm(&self) -> Result<()> {
        let sets = self.guard.keys();
        let confirmed = sets.iter().map(|s| self.guard.shared.confirm_held(s));
        futures::future::try_join_all(confirmed).await?;
        Ok(())
    }
}

/// Turns an actor's stale buckets into what subscribers are sent: with `diffs`, each
/// with the actor's diff, else one made from the store's log when it still reaches back
/// to the held version, else none (the whole value goes).
async fn complete_diffs(shared: &Shared, stale: Vec<Stale>, diffs: bool) -> Vec<BucketUpdate> {
    let mut out = Vec::with_capacity(stale.len());
    for s in stale {
        let diff = match (diffs, s.held, s.diff) {
            (false, _, _) | (_, None, _) => None,
            (true, Some(held), Some(d)) => Some((held, d)),
            (true, Some(held), None) => diff_from_log(shared, &s.bucket, held)
                .await
                .map(|d| (held, d)),
        };
        out.push(BucketUpdate {
            bucket: s.bucket,
            diff,
        });
    }
    out
}

/// The diff from `held` to `bucket`, from the bucket's log in the store.
async fn diff_from_log(shared: &Shared, bucket: &Bucket, held: u64) -> Option<Fields> {
    let span = bucket
        .version
        .checked_sub(held)
        .filter(|n| (1..=MAX_DIFF_SPAN).contains(n))?;
    let limit = usize::try_from(span).ok()?;
    match shared.store.history(&bucket.id, held, limit).await {
        Ok(Some(page)) => diff_since(held, bucket.version, &page.changes),
        Ok(None) => None,
        Err(e) => {
            tracing::warn!(bucket = %bucket.id, error = %e, "reading the log for a diff failed; sending the whole value");
            None
        }
    }
}

/// What [`Router::hold_local`] found: answered at once, held, or both.
struct LocalHolds {
    /// Cancels the holds on every set still listed when dropped.
    guard: SubscriptionGuard,
    /// Stale buckets of the sets that answered at once (they hold nothing).
    now: Vec<Stale>,
    /// The other sets' holds, in the order of `guard.sets`.
    held: Vec<SubscribeAnswer>,
}

/// [`LocalHolds`] with each hold's channel taken out of its answer.
struct Split<C> {
    guard: SubscriptionGuard,
    now: Vec<Stale>,
    held: C,
}

impl LocalHolds {
    /// The guard, the stale buckets, and each hold's channel as `channel` takes it out of
    /// its answer (`None`: a hold of the other kind, which the actor never makes).
    fn split<T, C: FromIterator<T>>(
        self,
        channel: impl Fn(SubscribeAnswer) -> Option<T>,
    ) -> Result<Split<C>> {
        let held = self
            .held
            .into_iter()
            .map(|answer| {
                channel(answer).ok_or_else(|| {
                    NodeError::Internal("a set held a subscription of the other kind".into())
                })
            })
            .collect::<Result<C>>()?;
        Ok(Split {
            guard: self.guard,
            now: self.now,
            held,
        })
    }
}

/// Cancels a held subscription on every local set it spans when dropped: on answer, on
/// timeout, and when the client (or the forwarding peer) goes away.
struct SubscriptionGuard {
    shared: Arc<Shared>,
    sub_id: u64,
    /// Each held set's list (inline: nearly always one), shared with the set's own record
    /// of the subscription; the set's key is its buckets' (not kept a second time).
    sets: SmallVec<[HeldVersions; 1]>,
}

impl SubscriptionGuard {
    /// The held sets' keys.
    fn keys(&self) -> Vec<SetKey> {
        self.sets.iter().filter_map(HeldVersions::set_key).collect()
    }
}

impl Drop for SubscriptionGuard {
    fn drop(&mut self) {
        for set in self.sets.iter().filter_map(HeldVersions::set_key) {
            self.shared.unsubscribe(&set, self.sub_id);
        }
    }
}

pub fn leg_size() -> usize {
    std::mem::size_of::<HeldLeg>()
}
