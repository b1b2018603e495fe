//! `BucketSetActor`: the single writer of one bucket set.
//!
//! Every write to a set goes through its actor, so reconciliation is serialized per set.
//! The actor keeps the set's committed (durable) buckets in memory and answers reads and
//! subscribe checks from them; a write is reconciled, committed to the store in a batch
//! with the other writes that queued meanwhile, and only then acknowledged and notified.
//! Idle actors stop (passivation) and are reloaded from the store on the next request; an
//! actor whose only activity is held subscriptions stops alike and leaves them as waiter
//! records (`sets::parked`), which its set's next activation takes back.
//!
//! The sync log rides on the same commits: every accepted write appends its [`Change`] to
//! its bucket's log, and a write carrying an op id commits its [`OpRecord`], in the batch's
//! one store transaction, with retention trims. A write whose op id the set already
//! remembers (in memory, or found by the store's conditional commit) is answered from that
//! record and changes nothing (DESIGN.md §7 invariant 7).

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

use actix::prelude::*;
use tether_proto::api::{Delivery, UpdateOutcome};
use tether_proto::presence::{Presence, PresenceView};
use tether_proto::reconcile::{is_stale, should_notify, Held};
use tether_proto::synclog::{
    check_op, diff_since, op_digest, Change, ChangeKind, OpCheck, OpRecord,
};
use tether_proto::{reconcile, Bucket, BucketId, Fields, Outcome, SetKey, Update};
use tokio::sync::{mpsc, oneshot};
use tracing::Instrument;

use crate::error::{NodeError, Result};
use crate::sets::parked::Parked;
use crate::sets::registry::Shared;
use crate::store::{Commit, Epoch, OpRetention, StoreError};

/// What a caller gets back for an accepted or refused write.
#[derive(Debug, Clone)]
pub struct WriteResult {
    /// Applied, merged or refused (for a replay: the original write's).
    pub outcome: UpdateOutcome,
    /// The bucket as this write left it (for a refused write, the stored copy it was
    /// refused against). Later writes in the same batch do not show here. For a replay:
    /// an applied write's original timestamp and version; a merged or refused one's
    /// bucket as it is now (API.md "Idempotent writes"). An applied write's answer
    /// carries no value ([`answered`]): API.md answers it with id, timestamp and version,
    /// and the writer has the fields it sent.
    pub bucket: Bucket,
    /// Answered from the memory of an earlier attempt with the same op id.
    pub replayed: bool,
    /// A change for the set's device while it holds no subscribe: when it syncs next.
    pub delivery: Option<Delivery>,
}

/// The log's name for a writer that is not a device or a user.
pub const BY_SERVER: &str = "server";

/// A device or app update of one bucket.
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<oneshot::Receiver<Result<WriteResult>>>")]
pub struct Put {
    /// The bucket.
    pub id: BucketId,
    /// Fields, base version, OCC flag.
    pub update: Update,
    /// The writer's session, for echo suppression.
    pub session: Option<String>,
    /// Who writes (`device:<serial>`, `user:<id>`), for the log and op-id replays.
    pub by: String,
    /// The client's idempotency key.
    pub op_id: Option<String>,
}

/// Registration: create the listed buckets unless they exist (null-valued template fields).
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<oneshot::Receiver<Result<()>>>")]
pub struct EnsureBuckets {
    /// The buckets and their initial fields.
    pub buckets: Vec<(BucketId, Fields)>,
    /// The registering device's type, whose template the set's buckets follow from now on
    /// (`None`: keep what the set knows, e.g. for a structure).
    pub device_type: Option<String>,
    /// The set's device registered (its presence), declaring its next sync or not.
    pub contact: Option<DeviceContact>,
}

/// A registration of the set's device, as its presence sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceContact {
    /// Its declared next sync, ms from now.
    pub next_sync_ms: Option<u64>,
}

/// Read the committed buckets (all of the set, or the listed ones that exist).
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<Vec<Bucket>>")]
pub struct Get {
    /// The buckets (duplicates count once); `None`: every bucket of the set.
    pub ids: Option<Vec<BucketId>>,
    /// With values (`view=full`); without, nothing but ids, timestamps and versions is
    /// copied (finding 1: project before cloning).
    pub values: bool,
    /// Most bytes of values to answer with; more is refused (413), not truncated.
    pub max_bytes: usize,
}

/// A bucket a subscriber is owed: its state, the version the subscriber held, and — when
/// the subscriber asked for diffs and this actor still remembers every change since —
/// the fields changed since.
#[derive(Debug, Clone, PartialEq)]
pub struct Stale {
    /// The bucket as committed.
    pub bucket: Bucket,
    /// The version the subscriber said it held.
    pub held: Option<u64>,
    /// The coalesced changes after `held`, if known here.
    pub diff: Option<Fields>,
}

/// What a subscribe check found.
#[derive(Debug)]
pub enum SubscribeAnswer {
    /// Some held versions are stale: answer at once with these buckets.
    Now(Vec<Stale>),
    /// Nothing stale: the subscription is registered and will be answered on this channel.
    Held(oneshot::Receiver<Vec<Stale>>),
    /// Nothing stale, for a stream ([`Subscribe::stream`]): the subscription is registered
    /// and answered on this channel at each change, until the receiver goes.
    Stream(mpsc::Receiver<Vec<Stale>>),
}

/// Check held versions and, if none is stale, hold the subscription (FIG 21C/21D).
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<SubscribeAnswer>")]
pub struct Subscribe {
    /// Unique per subscription on this node; used to cancel it.
    pub sub_id: u64,
    /// The held versions of this set's buckets.
    pub held: Vec<Held>,
    /// The subscriber's session.
    pub session: Option<String>,
    /// Most bytes of stale buckets to answer with at once; the rest (never the first) are
    /// left for the client's next subscribe, which answers them at once.
    pub max_bytes: usize,
    /// The subscriber takes diffs.
    pub diffs: bool,
    /// The subscriber already has every write of its own session (a stream holding again
    /// after a line: its client made those writes): a bucket changed since the held
    /// version only by them is not stale, as a held subscription is not woken by them.
    /// Proven from the actor's recent changes only; beyond them the bucket is stale (an
    /// echo may be sent, a change never missed).
    pub own_writes_known: bool,
    /// The subscriber is the set's device (its presence: online while this is held).
    pub device: bool,
    /// The device's declared next sync, ms from now (with `device`).
    pub next_sync_ms: Option<u64>,
    /// A stream's hold: kept after each answer, its versions advanced to what it was sent
    /// ([`Reply::Stream`]), instead of being forgotten and subscribed again.
    pub stream: bool,
    /// The record the actor keeps should it hold the subscription, made by the caller
    /// ([`Subscribe::waiter`]).
    pub waiter: Waiter,
}

impl Subscribe {
    /// The record of the subscription described by `msg`'s other fields, to be kept
    /// should it be held, and its answer's receiving end. Made on the subscriber's thread
    /// before the call rather than by the set's actor: what a held subscription keeps
    /// outlives the actor when the set passivates, and records the actor's thread made
    /// would each pin a page of its memory that the actor's own, freed state once filled
    /// (glibc keeps an arena per thread; with 18,000 devices held after a fast ramp, that
    /// thread's arena held 6.7 MB of records in 22.6 MB of pages, BENCHMARKS.md "Memory
    /// actors freed, given back"). Also the held list the record keeps, for the caller to
    /// share rather than copy.
    pub fn waiter(mut self) -> (Self, HeldVersions) {
        let (reply, answer) = if self.stream {
            // One answer in flight: the next change finds it not yet taken only if the
            // stream is slow, and then ends the hold (`Reply::answer`).
            let (tx, rx) = mpsc::channel(1);
            (Reply::Stream(tx), SubscribeAnswer::Stream(rx))
        } else {
            let (tx, rx) = oneshot::channel();
            (Reply::Once(tx), SubscribeAnswer::Held(rx))
        };
        let held = HeldVersions::new(&self.held);
        let sub = Box::new(HeldSub {
            held: held.clone(),
            session: self.session.clone(),
            diffs: self.diffs,
            device: self.device,
            reply,
            trace: crate::telemetry::span_context(&tracing::Span::current()).map(Box::new),
        });
        self.waiter = Waiter(Arc::new(std::sync::Mutex::new(Some((sub, answer)))));
        (self, held)
    }
}

/// A subscription's record and its answer's receiving end ([`Subscribe::waiter`]); the
/// actor takes them when it holds the subscription. Shared by the message's copies (a
/// message resent after its actor stopped unread).
#[derive(Clone, Default)]
pub struct Waiter(Arc<std::sync::Mutex<Option<Prepared>>>);

/// What [`Waiter`] carries.
type Prepared = (Box<HeldSub>, SubscribeAnswer);

impl std::fmt::Debug for Waiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Waiter").finish_non_exhaustive()
    }
}

impl Waiter {
    fn take(&self) -> Option<Prepared> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
    }
}

/// What the set's owner knows of its device's presence (seed 003).
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<PresenceView>")]
pub struct GetPresence;

/// The subscriber went away (timeout or closed connection): forget it.
#[derive(Debug, Clone, Message)]
#[rtype(result = "()")]
pub struct Unsubscribe(pub u64);

/// Who may read the set changed (pairing, unpairing, revoked credentials): answer every
/// held subscription with an empty list so its client resubscribes and is authorized
/// again; a subscription never outlives the access it was granted under.
#[derive(Debug, Clone, Message)]
#[rtype(result = "()")]
pub struct ReleaseHeld;

/// This node may have been away (paused, cut off, its view changed): an actor holding
/// subscriptions confirms its lease now, so subscribers of a set another node took are
/// answered (empty: they resubscribe at the new owner) instead of waiting out their
/// timeout for changes that will never reach this node.
#[derive(Debug, Clone, Message)]
#[rtype(result = "()")]
pub struct Revalidate;

/// A held subscription's timeout passed: may it be answered "nothing changed"? Only
/// under a lease proven less than [`Shared::lease_trust`] ago, as a read (invariant 23):
/// an owner that was cut off or paused while another node took the set and wrote to it
/// must not tell its subscribers that nothing changed (chaos defect 18). `Ok` when the
/// lease is trusted or one store round trip confirms it; `NotOwner` when the set moved
/// (the actor drops it, as any lease confirmation that finds it taken).
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<()>")]
pub struct ConfirmHeld;

/// Graceful stop: finish queued writes, answer held subscriptions (empty), stop.
#[derive(Debug, Clone, Message)]
#[rtype(result = "()")]
pub struct Shutdown;

enum Job {
    Put {
        id: BucketId,
        update: Update,
        session: Option<String>,
        by: String,
        op_id: Option<String>,
        reply: oneshot::Sender<Result<WriteResult>>,
        trace: JobTrace,
    },
    Ensure {
        buckets: Vec<(BucketId, Fields)>,
        reply: oneshot::Sender<Result<()>>,
        trace: JobTrace,
    },
}

/// A job's answer, decided while reconciling its batch.
enum Answer {
    /// Ready (sent once the batch commits).
    Done(Result<WriteResult>),
    /// A retry of the put at this index of the same batch: its result, replayed.
    SameAs(usize),
    /// A creation: nothing to answer but success.
    Created,
}

/// A queued job's spans: its `actor.{op}` span (open until it is answered) and the
/// `actor.queue` span of its wait behind the commit in flight.
struct JobTrace {
    span: tracing::Span,
    queued: Option<tracing::Span>,
}

impl JobTrace {
    /// Called in the job's handler, whose span is current.
    fn here() -> Self {
        let span = tracing::Span::current();
        JobTrace {
            queued: crate::telemetry::seen(&span).then(|| tracing::info_span!("actor.queue")),
            span,
        }
    }
}

impl Job {
    fn trace(&mut self) -> &mut JobTrace {
        match self {
            Job::Put { trace, .. } | Job::Ensure { trace, .. } => trace,
        }
    }
}

/// A held subscription: what it holds and where its answer goes.
#[derive(Debug)]
pub(crate) struct HeldSub {
    /// The held buckets and the version the subscriber holds of each.
    held: HeldVersions,
    session: Option<String>,
    diffs: bool,
    /// Held by the set's device itself.
    device: bool,
    pub(crate) reply: Reply,
    /// The subscribing request's span, for the notify span's links (boxed: only
    /// exported requests have one, and every held subscription keeps the field).
    trace: Option<Box<opentelemetry::trace::SpanContext>>,
}

/// Where a held subscription's answer goes.
#[derive(Debug)]
pub(crate) enum Reply {
    /// A long-poll (or a forwarded call): one answer, then the subscription is forgotten.
    Once(oneshot::Sender<Vec<Stale>>),
    /// A stream's hold: answered at each change and kept, with the versions it was sent,
    /// while its receiver has taken the previous answer. One answer not taken yet when the
    /// next is due (a slow client), an answer left short by the budget, an empty answer
    /// (handoff, access change, drain) or a dropped sender (lease lost) ends it: the
    /// stream then subscribes again with the versions it wrote, as after a long-poll
    /// answer, so nothing is missed (invariant 37).
    Stream(mpsc::Sender<Vec<Stale>>),
}

impl Reply {
    /// Sends the answer (`complete`: every change owed to it, none left out by the
    /// budget); the reply back when the subscription stays held (a stream took it).
    pub(crate) fn answer(self, owed: Vec<Stale>, complete: bool) -> Option<Reply> {
        match self {
            // The subscriber may have gone; then there is nobody to tell.
            Reply::Once(tx) => {
                drop(tx.send(owed));
                None
            }
            Reply::Stream(tx) => {
                let keep = complete && !owed.is_empty();
                (tx.try_send(owed).is_ok() && keep).then_some(Reply::Stream(tx))
            }
        }
    }

    /// Sends the last answer: the subscription is forgotten.
    pub(crate) fn finish(self, owed: Vec<Stale>) {
        drop(self.answer(owed, false));
    }

    /// The subscriber is gone.
    pub(crate) fn is_closed(&self) -> bool {
        match self {
            Reply::Once(tx) => tx.is_closed(),
            Reply::Stream(tx) => tx.is_closed(),
        }
    }
}

/// A held subscription's buckets and the version the subscriber holds of each, sorted by
/// id; of an id named twice, the last named counts. Shared (one allocation) by the set's
/// record of the subscription and the router's, which subscribes them again should the
/// set move while held (`routing::router::LocalLeg`): each kept its own copy before,
/// ≈ 0.2 KB per held device (BENCHMARKS.md "The held ids kept once").
#[derive(Debug, Clone)]
pub struct HeldVersions(Arc<[Held]>);

impl HeldVersions {
    /// The subscriber's `held` buckets.
    pub fn new(held: &[Held]) -> Self {
        let mut v: Vec<Held> = held.iter().rev().cloned().collect();
        // Stable: of equal ids the last named comes first, and dedup keeps the first.
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v.dedup_by(|later, first| later.id == first.id);
        HeldVersions(v.into())
    }

    /// The held buckets, each once.
    pub fn held(&self) -> &[Held] {
        &self.0
    }

    /// The set of the held buckets (those of one set: a subscription holds one such list
    /// per set it spans); `None` for an empty list.
    pub fn set_key(&self) -> Option<SetKey> {
        self.0.first().map(|h| h.id.set_key())
    }

    fn get(&self, id: &BucketId) -> Option<Option<u64>> {
        self.0
            .binary_search_by(|held| held.id.cmp(id))
            .ok()
            .map(|i| self.0[i].version)
    }

    fn contains_key(&self, id: &BucketId) -> bool {
        self.get(id).is_some()
    }

    /// The subscriber was sent `version` of `id` (a stream's hold going on); copied first
    /// while the list is shared (a stream's is, with its guard, until its first answer:
    /// the guard needs only the ids).
    fn advance(&mut self, id: &BucketId, version: u64) {
        if let Ok(i) = self.0.binary_search_by(|held| held.id.cmp(id)) {
            let held = &mut Arc::make_mut(&mut self.0)[i];
            held.version = Some(version);
            // The timestamp the subscriber held belongs to the version it no longer holds.
            held.timestamp = None;
        }
    }

    fn iter(&self) -> impl Iterator<Item = (&BucketId, &Option<u64>)> {
        self.0.iter().map(|h| (&h.id, &h.version))
    }
}

/// Op records kept in memory per set (the store remembers the rest).
const KNOWN_OPS: usize = 32;
/// Changes kept in memory per bucket, to answer subscribers with diffs without a read.
const RECENT_CHANGES: usize = 8;
/// Changes are trimmed each time a bucket's version crosses a multiple of this (so the log
/// keeps between the configured count and that many more).
const TRIM_CHANGES_EVERY: u64 = 16;
/// Op ids are trimmed every this many new ones.
const TRIM_OPS_EVERY: u64 = 64;

/// Op records this actor committed or learned, newest last, at most [`KNOWN_OPS`].
#[derive(Debug, Default)]
struct KnownOps {
    by_id: BTreeMap<String, OpRecord>,
    order: VecDeque<String>,
}

impl KnownOps {
    fn get(&self, op_id: &str) -> Option<&OpRecord> {
        self.by_id.get(op_id)
    }

    fn insert(&mut self, rec: OpRecord) {
        if self.by_id.insert(rec.op_id.clone(), rec.clone()).is_none() {
            self.order.push_back(rec.op_id);
        }
        while self.order.len() > KNOWN_OPS {
            if let Some(old) = self.order.pop_front() {
                self.by_id.remove(&old);
            }
        }
    }
}

/// The actor owning one bucket set on this node.
pub struct BucketSetActor {
    set: SetKey,
    shared: Arc<Shared>,
    epoch: Option<Epoch>,
    committed: BTreeMap<BucketId, Bucket>,
    /// The last changes committed per bucket by this actor, oldest first.
    recent: BTreeMap<BucketId, VecDeque<Change>>,
    known_ops: KnownOps,
    /// New op ids committed since the last op-id trim.
    ops_since_trim: u64,
    queue: Vec<Job>,
    committing: bool,
    /// Held subscribers, each boxed: a `BTreeMap` node has 11 slots, so for the one
    /// subscriber most sets have, inline records cost 11 of them (1.5 KB).
    subs: BTreeMap<u64, Box<HeldSub>>,
    last_active: Instant,
    shutting_down: bool,
    passivated: bool,
    /// Another node took the set's lease while this actor held it (found by a lease
    /// confirmation or a fenced commit): held subscriptions are not answered "nothing
    /// changed" — the new owner may have newer versions — but dropped, so their
    /// subscribers subscribe again where the set is served now (chaos defect 18).
    lease_lost: bool,
    leased: bool,
    /// When the newest store round trip that proved this actor's lease (taking it, a
    /// commit, a confirmation) was sent: reads are answered from memory only within
    /// [`Shared::lease_trust`] of it (invariant 23).
    confirmed: Option<Instant>,
    /// Planted bug `ack-before-durable`: the background commit of the previous batch.
    #[cfg(feature = "planted-ack-before-durable")]
    planted_tail: Option<tokio::task::JoinHandle<()>>,
    /// The request that started the actor, parent of its `lease.acquire` span; dropped
    /// once loaded so the request's span can end.
    activation: tracing::Span,
    /// The device type whose template the set's buckets follow (from its registration).
    device_type: Option<String>,
    /// Encoded sizes of committed buckets, computed when first needed.
    sizes: BTreeMap<BucketId, usize>,
    /// What this owner knows of the set's device (memory only: a new owner starts from
    /// the device's last registration, read with the set).
    presence: Presence,
}

impl std::fmt::Debug for BucketSetActor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BucketSetActor")
            .field("set", &self.set)
            .field("epoch", &self.epoch)
            .finish_non_exhaustive()
    }
}

/// Buckets changed by a batch, with the session of every write that changed each (one
/// session's echo must not hide another session's change in the same batch).
type Changes = BTreeMap<BucketId, Vec<Option<String>>>;

/// The buckets a batch changes, as it changes them. A hash map, not a `BTreeMap`: a
/// batch changes a bucket or two, and a B-tree's first node for buckets is ≈ 1.2 KB, past
/// glibc's per-thread cache (1,032 bytes), so every batch paid the allocator's slow path
/// for it; a hash table for up to seven buckets stays under it.
type Working = HashMap<BucketId, Bucket>;

fn op_id_reused(op_id: &str) -> NodeError {
    NodeError::OpIdReused(format!(
        "op_id {op_id:?} was already used for another write; use a fresh op_id for every distinct write"
    ))
}

/// What a write's answer carries of `bucket`: all of it for a merged or refused write
/// (the client catches up from it), an applied one's id, timestamp and version only — not
/// a copy of the value per write for an answer that never shows it (nor its bytes through
/// a forward).
fn answered(bucket: &Bucket, outcome: UpdateOutcome) -> Bucket {
    match outcome {
        UpdateOutcome::Applied => Bucket {
            id: bucket.id.clone(),
            value: Fields::new(),
            timestamp: bucket.timestamp,
            version: bucket.version,
        },
        UpdateOutcome::Merged | UpdateOutcome::Refused => bucket.clone(),
    }
}

/// The answer to a write the set remembers: an applied write's original timestamp and
/// version; for a merged or refused one, the bucket as it is now.
fn replay(rec: &OpRecord, now: &Bucket) -> WriteResult {
    let bucket = match rec.outcome {
        UpdateOutcome::Applied => Bucket {
            timestamp: rec.timestamp,
            version: rec.version,
            ..answered(now, UpdateOutcome::Applied)
        },
        UpdateOutcome::Merged | UpdateOutcome::Refused => now.clone(),
    };
    WriteResult {
        outcome: rec.outcome,
        bucket,
        replayed: true,
        delivery: None,
    }
}

/// Size of a bucket's value as JSON, the unit of the bucket size limit.
fn encoded_len(value: &Fields) -> usize {
    /// Counts what is written to it: the length without building the text.
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 = self.0.saturating_add(buf.len());
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    serde_json::to_writer(&mut count, value).map_or(usize::MAX, |()| count.0)
}

/// What a bucket adds to an answer beside its value (id, timestamp, version, JSON).
const BUCKET_OVERHEAD: usize = 160;

/// About what bucket `b` adds to an answer, in bytes (its value as JSON and an envelope):
/// the unit of the answer budgets of reads and subscriptions.
pub fn answer_size(b: &Bucket) -> usize {
    encoded_len(&b.value).saturating_add(BUCKET_OVERHEAD)
}

impl BucketSetActor {
    /// An actor for `set`; it loads its state when started.
    pub fn new(set: SetKey, shared: Arc<Shared>) -> Self {
        BucketSetActor {
            set,
            shared,
            epoch: None,
            committed: BTreeMap::new(),
            recent: BTreeMap::new(),
            known_ops: KnownOps::default(),
            ops_since_trim: 0,
            queue: Vec::new(),
            committing: false,
            subs: BTreeMap::new(),
            last_active: Instant::now(),
            shutting_down: false,
            passivated: false,
            lease_lost: false,
            leased: false,
            confirmed: None,
            #[cfg(feature = "planted-ack-before-durable")]
            planted_tail: None,
            activation: tracing::Span::none(),
            device_type: None,
            presence: Presence::default(),
            sizes: BTreeMap::new(),
        }
    }

    /// The same actor, its activation traced under `request`.
    pub fn activated_by(mut self, request: tracing::Span) -> Self {
        self.activation = request;
        self
    }

    /// The same actor, holding the waiters its set's previous actor parked: they are held
    /// from now on (answered empty if this activation fails) and checked against the set
    /// once it is loaded.
    pub(crate) fn with_parked(mut self, parked: Option<Parked>) -> Self {
        if let Some(p) = parked {
            self.presence = p.presence;
            self.subs.extend(p.subs);
        }
        self
    }

    /// What every actor of the node shares.
    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// The answer size of committed bucket `id` (value and envelope), cached until it changes.
    fn size_of(&mut self, id: &BucketId) -> usize {
        if let Some(n) = self.sizes.get(id) {
            return *n;
        }
        let n = self.committed.get(id).map_or(0, answer_size);
        self.sizes.insert(id.clone(), n);
        n
    }

    /// Refuses a write naming fields outside its bucket's template (finding 7): the
    /// template of the set's device type, the structure template for a structure, or — for
    /// a set whose type is unknown — the fields the bucket was created with.
    fn check_fields(&self, id: &BucketId, fields: &Fields) -> Result<()> {
        let templates = &self.shared.config.templates;
        let kind = id.kind();
        let known = |f: &str| match templates.allows(kind, self.device_type.as_deref(), f) {
            Some(allowed) => allowed,
            None => self
                .committed
                .get(id)
                .is_none_or(|b| b.value.contains_key(f)),
        };
        let unknown: Vec<&str> = fields
            .keys()
            .map(String::as_str)
            .filter(|f| !known(f))
            .collect();
        if unknown.is_empty() {
            return Ok(());
        }
        let listed: Vec<String> = match templates.fields(kind, self.device_type.as_deref()) {
            Some(fields) => fields,
            None => self
                .committed
                .get(id)
                .map(|b| b.value.keys().cloned().collect())
                .unwrap_or_default(),
        };
        Err(NodeError::UnknownField(format!(
            "bucket {id} has no field {}; its template has {}",
            unknown.join(", "),
            listed.join(", ")
        )))
    }

    fn touch(&mut self) {
        self.last_active = Instant::now();
    }

    fn ready(&self) -> Result<()> {
        if self.shutting_down {
            // Handoff, drain or a lease found taken: the caller routes the request again
            // (to the new owner, or fails it with 503 when the whole node is closing).
            return Err(NodeError::NotOwner(format!(
                "bucket set {} is moving",
                self.set
            )));
        }
        if self.epoch.is_none() {
            return Err(NodeError::Unavailable(format!(
                "bucket set {} is not loaded",
                self.set
            )));
        }
        Ok(())
    }

    /// Reconciles every queued job against the committed state and commits the batch.
    fn start_commit(&mut self, ctx: &mut Context<Self>) {
        if self.committing || self.queue.is_empty() {
            return;
        }
        let Some(epoch) = self.epoch else { return };
        let mut jobs = std::mem::take(&mut self.queue);
        // One commit for the whole batch: its span is a child of the first job's span (the
        // first whose trace is exported, if any is) and links to every exported job's (span
        // links, not one parent: each request has its trace).
        let parent = jobs
            .iter_mut()
            .position(|j| crate::telemetry::exported(&j.trace().span))
            .unwrap_or(0);
        let first = jobs
            .get_mut(parent)
            .map_or_else(tracing::Span::none, |j| j.trace().span.clone());
        let commit_span = crate::telemetry::inner_span(&first, || {
            tracing::info_span!(
                parent: first.id(),
                "store.commit",
                set = %self.set,
                requests = jobs.len(),
                backend = self.shared.metrics.store_backend(),
                otel.status_code = tracing::field::Empty,
            )
        });
        for job in &mut jobs {
            let trace = job.trace();
            trace.queued = None;
            if let Some(cx) = crate::telemetry::span_context(&trace.span) {
                crate::telemetry::link(&commit_span, &cx);
            }
        }
        // The buckets this batch changes, as it changes them (the rest are read from
        // `committed`, which stays as the store has it until the commit is durable).
        let mut working = Working::new();
        let mut changed = Changes::new();
        let mut commit = Commit::default();
        // Op ids of this batch: the job that carries each first, who sent it and its digest.
        let mut batch_ops: BTreeMap<String, (usize, String, String)> = BTreeMap::new();
        let mut results: Vec<(Job, Answer)> = Vec::with_capacity(jobs.len());
        for (index, mut job) in jobs.into_iter().enumerate() {
            let job_span = &job.trace().span;
            let reconciling = crate::telemetry::inner_span(
                job_span,
                || tracing::info_span!(parent: job_span, "reconcile"),
            )
            .entered();
            let answer = match &job {
                Job::Put {
                    id,
                    update,
                    session,
                    by,
                    op_id,
                    ..
                } => self.reconcile_put(
                    index,
                    (id, update, session, by, op_id),
                    &mut working,
                    &mut changed,
                    &mut commit,
                    &mut batch_ops,
                ),
                Job::Ensure { buckets, .. } => {
                    for (id, fields) in buckets {
                        if !working.contains_key(id) && !self.committed.contains_key(id) {
                            let b = Bucket::created(id.clone(), fields.clone(), self.shared.tick());
                            commit.changes.push((
                                id.clone(),
                                Change {
                                    version: b.version,
                                    timestamp: b.timestamp.millis,
                                    outcome: ChangeKind::Created,
                                    by: BY_SERVER.to_string(),
                                    session: None,
                                    op_id: None,
                                    fields: fields.clone(),
                                },
                            ));
                            working.insert(id.clone(), b);
                            changed.entry(id.clone()).or_default().push(None);
                        }
                    }
                    Answer::Created
                }
            };
            drop(reconciling);
            results.push((job, answer));
        }
        commit.buckets = changed
            .keys()
            .filter_map(|id| working.get(id).cloned())
            .collect();
        self.plan_trims(&mut commit);
        self.committing = true;
        let store = self.shared.store.clone();
        let set = self.set.clone();
        // The store takes the buckets' new states (this actor keeps them in `working`) and
        // a copy of the rest, which this actor keeps for its change log and known op ids.
        let to_commit = Commit {
            buckets: std::mem::take(&mut commit.buckets),
            changes: commit.changes.clone(),
            ops: commit.ops.clone(),
            trim: commit.trim.clone(),
        };
        // Planted bug (chaos self-test): the batch is committed later, in the background,
        // and answered now.
        #[cfg(feature = "planted-ack-before-durable")]
        let to_commit = if crate::planted::active(crate::planted::Bug::AckBeforeDurable) {
            let prev = self.planted_tail.take();
            self.planted_tail =
                crate::planted::commit_later(store.clone(), set.clone(), epoch, to_commit, prev);
            Commit::default()
        } else {
            to_commit
        };
        let reaches_store = !to_commit.is_empty();
        let requests = results.len();
        let started = Instant::now();
        let fut = async move {
            if to_commit.is_empty() {
                return Ok(());
            }
            // Planted bug (chaos self-test): a fenced commit is written anyway.
            #[cfg(feature = "planted-skip-epoch-check")]
            if crate::planted::active(crate::planted::Bug::SkipEpochCheck) {
                return crate::planted::commit_fenced_anyway(store, set, epoch, to_commit).await;
            }
            store.commit(&set, epoch, to_commit).await
        }
        .instrument(commit_span.clone());
        ctx.spawn(fut.into_actor(self).map(move |res, act, ctx| {
            act.committing = false;
            match &res {
                Ok(()) => {
                    if reaches_store {
                        // Committed under its epoch: the lease was this actor's then.
                        act.confirmed = act.confirmed.max(Some(started));
                    }
                    act.shared
                        .metrics
                        .batch_committed(requests, started.elapsed());
                }
                // Only on the commit's own span: without one, `commit_span` is a request's.
                Err(_) if crate::telemetry::exported(&commit_span) => {
                    commit_span.record("otel.status_code", "ERROR");
                }
                Err(_) => {}
            }
            let _in = commit_span.enter();
            act.finish_commit(res, working, changed, commit, results, ctx);
            act.start_commit(ctx);
            if act.shutting_down && act.idle() {
                ctx.stop();
            }
        }));
    }

    /// Reconciles one put of a batch against the batch so far (`working` over
    /// `committed`); what to answer it with.
    #[allow(clippy::type_complexity)]
    fn reconcile_put(
        &mut self,
        index: usize,
        (id, update, session, by, op_id): (
            &BucketId,
            &Update,
            &Option<String>,
            &String,
            &Option<String>,
        ),
        working: &mut Working,
        changed: &mut Changes,
        commit: &mut Commit,
        batch_ops: &mut BTreeMap<String, (usize, String, String)>,
    ) -> Answer {
        let Some(stored) = working.get(id).or_else(|| self.committed.get(id)) else {
            return Answer::Done(Err(NodeError::NotFound(format!("no bucket {id}"))));
        };
        let digest = op_id
            .as_ref()
            .map(|_| op_digest(id.as_str(), update, session.as_deref()));
        if let (Some(op), Some(digest)) = (op_id, &digest) {
            match check_op(self.known_ops.get(op), by, digest) {
                OpCheck::Replay(rec) => {
                    self.shared.metrics.put_outcome("replayed");
                    return Answer::Done(Ok(replay(rec, stored)));
                }
                OpCheck::Reused => return Answer::Done(Err(op_id_reused(op))),
                OpCheck::New => {}
            }
            if let Some((first, first_by, first_digest)) = batch_ops.get(op) {
                return if first_by == by && first_digest == digest {
                    Answer::SameAs(*first)
                } else {
                    Answer::Done(Err(op_id_reused(op)))
                };
            }
        }
        let now = self.shared.tick();
        let outcome = reconcile(stored, update, now);
        let max = self.shared.config.max_bucket_bytes;
        let accepted = match outcome {
            Outcome::Applied(new) => Some((new, UpdateOutcome::Applied, ChangeKind::Applied)),
            Outcome::Merged(new) => Some((new, UpdateOutcome::Merged, ChangeKind::Merged)),
            Outcome::Refused(_) => None,
        };
        let (result, kind) = match accepted {
            Some((new, api, kind)) => {
                if encoded_len(&new.value) > max {
                    return Answer::Done(Err(NodeError::TooLarge(format!(
                        "bucket {id} would be larger than {max} bytes"
                    ))));
                }
                commit.changes.push((
                    id.clone(),
                    Change {
                        version: new.version,
                        timestamp: new.timestamp.millis,
                        outcome: kind,
                        by: by.clone(),
                        session: session.clone(),
                        op_id: op_id.clone(),
                        fields: update.value.clone(),
                    },
                ));
                changed.entry(id.clone()).or_default().push(session.clone());
                let result = WriteResult {
                    outcome: api,
                    bucket: answered(&new, api),
                    replayed: false,
                    delivery: None,
                };
                working.insert(id.clone(), new);
                (result, api)
            }
            None => (
                WriteResult {
                    outcome: UpdateOutcome::Refused,
                    bucket: stored.clone(),
                    replayed: false,
                    delivery: None,
                },
                UpdateOutcome::Refused,
            ),
        };
        if let (Some(op), Some(digest)) = (op_id, digest) {
            commit.ops.push(OpRecord {
                op_id: op.clone(),
                bucket: id.to_string(),
                by: by.clone(),
                digest: digest.clone(),
                outcome: kind,
                version: result.bucket.version,
                timestamp: result.bucket.timestamp,
                at_ms: now.millis,
            });
            batch_ops.insert(op.clone(), (index, by.clone(), digest));
        }
        Answer::Done(Ok(result))
    }

    /// Adds the retention trims due with this commit: a bucket's log each time its version
    /// crosses a multiple of [`TRIM_CHANGES_EVERY`], the set's op ids every
    /// [`TRIM_OPS_EVERY`] new ones.
    fn plan_trims(&self, commit: &mut Commit) {
        let keep = self.shared.config.history_per_bucket.max(1);
        for b in &commit.buckets {
            let old = self.committed.get(&b.id).map_or(0, |c| c.version);
            if b.version / TRIM_CHANGES_EVERY > old / TRIM_CHANGES_EVERY && b.version > keep {
                commit
                    .trim
                    .changes_through
                    .push((b.id.clone(), b.version - keep));
            }
        }
        if self.ops_since_trim + commit.ops.len() as u64 >= TRIM_OPS_EVERY {
            let now = commit
                .ops
                .iter()
                .map(|o| o.at_ms)
                .max()
                .unwrap_or_else(|| self.shared.tick().millis);
            let age =
                u64::try_from(self.shared.config.op_id_retention.as_millis()).unwrap_or(u64::MAX);
            commit.trim.ops = Some(OpRetention {
                keep_last: self.shared.config.op_ids_per_set,
                keep_since_ms: now.saturating_sub(age),
            });
        }
    }

    fn finish_commit(
        &mut self,
        res: std::result::Result<(), StoreError>,
        working: Working,
        changed: Changes,
        commit: Commit,
        results: Vec<(Job, Answer)>,
        ctx: &mut Context<Self>,
    ) {
        if let Err(StoreError::OpsKnown(known)) = res {
            // Retries whose first attempt committed (before a crash or on a previous
            // owner): learn their records and reconcile the batch again, now answering
            // them from the records. Nothing was written.
            tracing::debug!(set = %self.set, known = known.len(), "retried op ids already committed");
            for rec in known {
                self.known_ops.insert(rec);
            }
            let jobs: Vec<Job> = results.into_iter().map(|(job, _)| job).collect();
            self.queue.splice(0..0, jobs);
            return;
        }
        if let Err(e) = res {
            let fenced = matches!(e, StoreError::Fenced { .. });
            tracing::warn!(set = %self.set, error = %e, "commit failed; batch not acknowledged");
            for (job, _) in results {
                match job {
                    Job::Put { reply, .. } => drop(reply.send(Err(NodeError::Store(e.clone())))),
                    Job::Ensure { reply, .. } => drop(reply.send(Err(NodeError::Store(e.clone())))),
                }
            }
            if fenced {
                self.shared.metrics.lease_lost();
                // Another owner holds the lease: this actor must never commit again.
                self.epoch = None;
                self.lease_lost = true;
                ctx.stop();
            } else if e.may_have_written() {
                // The batch may still land at the store (its deadline passed, or the
                // store failed mid-commit): memory may be behind the store, and the next
                // commit must not be built on it. The actor stops without committing
                // again; the next request activates one that takes a new lease (fencing
                // this epoch's late commit, or ordering after it) and loads (invariant 25).
                tracing::warn!(set = %self.set, "commit fate unknown; set reloads before its next commit");
                self.epoch = None;
                ctx.stop();
            }
            return;
        }
        self.committed.extend(working);
        self.ops_since_trim = if commit.trim.ops.is_some() {
            0
        } else {
            self.ops_since_trim + commit.ops.len() as u64
        };
        for rec in commit.ops {
            self.known_ops.insert(rec);
        }
        for (id, change) in commit.changes {
            let log = self.recent.entry(id).or_default();
            log.push_back(change);
            while log.len() > RECENT_CHANGES {
                log.pop_front();
            }
        }
        // Answers first decided (a retry within the batch takes its first attempt's).
        let mut answers: Vec<Option<Result<WriteResult>>> = Vec::with_capacity(results.len());
        let mut pending = Vec::with_capacity(results.len());
        for (job, answer) in results {
            match answer {
                Answer::Done(r) => {
                    answers.push(Some(r));
                    pending.push((job, None));
                }
                Answer::SameAs(first) => {
                    answers.push(None);
                    pending.push((job, Some(first)));
                }
                Answer::Created => {
                    answers.push(None);
                    pending.push((job, None));
                }
            }
        }
        // Retries within the batch take their first attempt's answer (before any is sent).
        let retries: Vec<Option<Result<WriteResult>>> = pending
            .iter()
            .map(|(_, same_as)| {
                same_as.map(|first| match answers.get(first).and_then(Option::as_ref) {
                    Some(Ok(w)) => {
                        self.shared.metrics.put_outcome("replayed");
                        Ok(self.replayed_in_batch(w))
                    }
                    Some(Err(e)) => Err(NodeError::Unavailable(format!(
                        "the first attempt of this op id failed ({e}); retry"
                    ))),
                    None => Err(NodeError::Internal("put without outcome".into())),
                })
            })
            .collect();
        let replies: Vec<Option<Result<WriteResult>>> = retries
            .into_iter()
            .zip(answers)
            .map(|(retry, answer)| retry.or(answer))
            .collect();
        for id in changed.keys() {
            self.sizes.remove(id);
        }
        let mut wake = false;
        for ((job, _), answer) in pending.into_iter().zip(replies) {
            match job {
                Job::Put { reply, by, .. } => {
                    let mut answer = answer
                        .unwrap_or_else(|| Err(NodeError::Internal("put without outcome".into())));
                    if let Ok(w) = &mut answer {
                        w.delivery = self.delivery(&by, w);
                        wake |= w.delivery.is_some();
                    }
                    if let Ok(w) = &answer {
                        if !w.replayed {
                            self.shared.metrics.put_outcome(match w.outcome {
                                UpdateOutcome::Applied => "applied",
                                UpdateOutcome::Merged => "merged",
                                UpdateOutcome::Refused => "refused",
                            });
                        }
                    }
                    drop(reply.send(answer));
                }
                Job::Ensure { reply, .. } => drop(reply.send(Ok(()))),
            }
        }
        if wake {
            if let Some(p) = self.shared.pusher() {
                p.wake(&self.set);
            }
        }
        self.notify(&changed);
    }

    /// Presence bookkeeping for one answered write by `by`; the `delivery` to answer it
    /// with: a change by anyone else for the set's device while it holds no subscribe.
    fn delivery(&mut self, by: &str, w: &WriteResult) -> Option<Delivery> {
        self.device_type.as_ref()?;
        let now = self.shared.now_ms();
        if by.strip_prefix("device:") == Some(self.set.as_str()) {
            self.presence.seen(now);
            if let Some(p) = self.shared.pusher() {
                p.seen(&self.set);
            }
            return None;
        }
        if w.replayed || w.outcome == UpdateOutcome::Refused {
            return None;
        }
        let view = self.presence.view(self.device_listening(), now);
        (!view.online).then_some(Delivery {
            online: false,
            next_sync_by: view.next_sync_by,
        })
    }

    /// Whether the set's device holds a subscribe here.
    fn device_listening(&self) -> bool {
        self.subs.values().any(|s| s.device)
    }

    /// The answer to a retry that arrived in the same batch as its first attempt.
    fn replayed_in_batch(&self, first: &WriteResult) -> WriteResult {
        let bucket = match first.outcome {
            UpdateOutcome::Applied => first.bucket.clone(),
            UpdateOutcome::Merged | UpdateOutcome::Refused => self
                .committed
                .get(&first.bucket.id)
                .cloned()
                .unwrap_or_else(|| first.bucket.clone()),
        };
        WriteResult {
            outcome: first.outcome,
            bucket,
            replayed: true,
            delivery: None,
        }
    }

    /// The diff taking a subscriber from `held` to the committed bucket, from this actor's
    /// memory of recent changes; `None` when it does not reach back that far.
    fn diff_from_memory(&self, bucket: &Bucket, held: Option<u64>) -> Option<Fields> {
        let held = held?;
        let log = self.recent.get(&bucket.id)?;
        let (front, back) = log.as_slices();
        if back.is_empty() {
            diff_since(held, bucket.version, front)
        } else {
            let all: Vec<Change> = log.iter().cloned().collect();
            diff_since(held, bucket.version, &all)
        }
    }

    /// Answers every held subscription that holds a changed bucket written by another
    /// session (FIG 23A 1608–1612).
    fn notify(&mut self, changed: &Changes) {
        if changed.is_empty() || self.subs.is_empty() {
            return;
        }
        let max_bytes = self.shared.config.max_answer_bytes;
        let sizes: BTreeMap<BucketId, usize> = changed
            .keys()
            .map(|id| (id.clone(), self.size_of(id)))
            .collect();
        let mut woken = Vec::new();
        for (sub_id, sub) in &self.subs {
            // Within the answer budget; a change left out stays stale for the client's
            // held version, so its next subscribe gets it at once.
            let mut budget = max_bytes;
            let mut due = 0usize;
            let owed: Vec<Stale> = changed
                .iter()
                .filter(|(id, writers)| {
                    sub.held.contains_key(id)
                        && writers
                            .iter()
                            .any(|w| should_notify(sub.session.as_deref(), w.as_deref()))
                })
                .inspect(|_| due += 1)
                .filter(|(id, _)| {
                    let size = sizes.get(*id).copied().unwrap_or(0);
                    let fits = budget == max_bytes || size <= budget;
                    budget = budget.saturating_sub(size);
                    fits
                })
                .filter_map(|(id, _)| {
                    let bucket = self.committed.get(id)?.clone();
                    let held = sub.held.get(id).flatten();
                    let diff = if sub.diffs {
                        self.diff_from_memory(&bucket, held)
                    } else {
                        None
                    };
                    Some(Stale { bucket, held, diff })
                })
                .collect();
            // Planted bug (chaos self-test): this subscriber is not told (it stays held).
            #[cfg(feature = "planted-drop-notification")]
            if !owed.is_empty() && crate::planted::drop_this_notification() {
                continue;
            }
            if !owed.is_empty() {
                let complete = owed.len() == due;
                woken.push((*sub_id, owed, complete));
            }
        }
        let _fan_out = crate::telemetry::seen(&tracing::Span::current())
            .then(|| tracing::info_span!("notify", subscribers = woken.len()).entered());
        self.wake(woken);
    }

    /// Answers each listed held subscription with what it is owed (`complete`: all it was
    /// owed), and forgets it — but a stream's hold that took a complete answer stays,
    /// holding the versions it was sent.
    fn wake(&mut self, woken: Vec<(u64, Vec<Stale>, bool)>) {
        let n = woken.len();
        let mut kept = 0usize;
        for (sub_id, owed, complete) in woken {
            let Some(mut sub) = self.subs.remove(&sub_id) else {
                continue;
            };
            if sub.device {
                self.presence.answered(self.shared.now_ms());
            }
            if let Some(cx) = &sub.trace {
                crate::telemetry::link(&tracing::Span::current(), cx);
            }
            let sent: Vec<(BucketId, u64)> = match sub.reply {
                Reply::Stream(_) => owed
                    .iter()
                    .map(|s| (s.bucket.id.clone(), s.bucket.version))
                    .collect(),
                Reply::Once(_) => Vec::new(),
            };
            if let Some(reply) = sub.reply.answer(owed, complete) {
                for (id, version) in &sent {
                    sub.held.advance(id, *version);
                }
                sub.reply = reply;
                self.subs.insert(sub_id, sub);
                kept += 1;
            }
        }
        if n > 0 {
            self.shared.metrics.notified(n as u64);
            self.shared.metrics.subscriptions_held(-((n - kept) as i64));
        }
    }

    fn idle(&self) -> bool {
        self.subs.is_empty() && self.queue.is_empty() && !self.committing
    }

    /// Nothing to do but wait with held subscriptions, under a lease this actor holds.
    fn only_held(&self) -> bool {
        self.queue.is_empty() && !self.committing && self.leased && self.epoch.is_some()
    }

    /// Called once the set is loaded: the waiters taken from the parked set whose held
    /// version is no longer the stored one (the set was written elsewhere meanwhile — a
    /// write on this node activates the set first, so it finds them held) are answered
    /// now, each within the answer budget; the others stay held.
    fn answer_stale_parked(&mut self) {
        if self.subs.is_empty() {
            return;
        }
        let max_bytes = self.shared.config.max_answer_bytes;
        let mut woken = Vec::new();
        for (sub_id, sub) in &self.subs {
            let mut budget = max_bytes;
            let mut owed = Vec::new();
            let mut due = 0usize;
            for (id, held) in sub.held.iter() {
                let Some(stored) = self.committed.get(id) else {
                    continue;
                };
                let h = Held {
                    id: id.clone(),
                    timestamp: None,
                    version: *held,
                };
                if !is_stale(&h, stored) {
                    continue;
                }
                due += 1;
                let size = answer_size(stored);
                if !owed.is_empty() && size > budget {
                    continue;
                }
                budget = budget.saturating_sub(size);
                owed.push(Stale {
                    bucket: stored.clone(),
                    held: *held,
                    diff: None,
                });
            }
            if !owed.is_empty() {
                let complete = owed.len() == due;
                woken.push((*sub_id, owed, complete));
            }
        }
        self.wake(woken);
    }
}

impl Actor for BucketSetActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        // A node that lost its quorum since this actor was asked for takes no lease:
        // requests already queued find the actor stopped and are refused (503).
        self.shared.metrics.set_activated();
        if let Err(e) = self.shared.may_take_leases() {
            tracing::info!(set = %self.set, error = %e, "not taking the lease");
            ctx.stop();
            return;
        }
        let store = self.shared.store.clone();
        let set = self.set.clone();
        let owner = self.shared.node_id.clone();
        let shared = self.shared.clone();
        let lease_span = tracing::info_span!(
            parent: &self.activation,
            "lease.acquire",
            set = %self.set,
            epoch = tracing::field::Empty,
            previous_owner = tracing::field::Empty,
        );
        self.activation = tracing::Span::none();
        let started = Instant::now();
        // ctx.wait: no message is handled until the set is loaded, its lease taken and
        // the previous holder (if another node) told to stop serving it.
        ctx.wait(
            async move {
                let taken = Instant::now();
                let lease = match store.acquire_lease(&set, &owner).await {
                    Ok(lease) => lease,
                    Err(e) => {
                        if e.is_unanswered() {
                            // It may have landed: the holder before it was not told.
                            shared.lease_fate_unknown(&set);
                        }
                        return Err(e);
                    }
                };
                let acquired = Instant::now();
                let span = tracing::Span::current();
                span.record("epoch", lease.epoch.0);
                // An earlier lease request of this node got no answer and may have landed
                // (the store then names no previous owner: it was this node): whoever held
                // the set before was never told to stop, so its trust is waited out.
                let uncertain = lease
                    .previous_owner
                    .is_none()
                    .then(|| shared.uncertain_until(&set))
                    .flatten()
                    .filter(|_| shared.lease_trust().is_some());
                let from_peer = lease.previous_owner.is_some() || uncertain.is_some();
                // The previous holder is told to stop (or waited out) whatever the load's
                // outcome: once this node holds the lease, a failed load must not leave it
                // serving reads from memory while the next activation — here, where the
                // store names no previous owner, or on a third node that this one then
                // answers at once — serves writes (the ownership model's finding, chaos
                // REPORT.md defect 16). It runs beside the load.
                let take_over = async {
                    if let Some(previous) = lease.previous_owner {
                        span.record("previous_owner", previous.as_str());
                        shared.take_over(&set, previous, acquired).await;
                    } else if let Some(until) = uncertain {
                        span.record("previous_owner", "unknown");
                        tokio::time::sleep_until(until).await;
                    }
                };
                let load = futures::future::try_join(
                    store.load_set(&set),
                    store.get_device(set.as_str()),
                );
                let (loaded, ()) = futures::join!(load, take_over);
                let (buckets, device) = loaded?;
                shared.metrics.lease_taken(started.elapsed(), from_peer);
                Ok::<_, StoreError>((
                    lease.epoch,
                    taken,
                    buckets,
                    device.map(|d| (d.device_type, d.last_seen_ms)),
                ))
            }
            .instrument(lease_span)
            .into_actor(self)
            .map(|res, act, ctx| match res {
                Ok((epoch, taken, buckets, device)) => {
                    act.confirmed = Some(taken);
                    if let Some((device_type, registered_ms)) = device {
                        act.device_type = Some(device_type);
                        // Its last registration is the last contact the store knows of.
                        act.presence.seen(registered_ms);
                    }
                    for b in buckets {
                        act.shared.observe(b.timestamp);
                        act.committed.insert(b.id.clone(), b);
                    }
                    act.epoch = Some(epoch);
                    act.leased = true;
                    act.shared.metrics.lease_acquired();
                    act.shared.loaded(&act.set);
                    act.answer_stale_parked();
                    tracing::debug!(set = %act.set, epoch = epoch.0, buckets = act.committed.len(), "bucket set loaded");
                }
                Err(e) => {
                    tracing::error!(set = %act.set, error = %e, "loading bucket set failed");
                    act.shared.load_failed(&act.set, &e);
                    ctx.stop();
                }
            }),
        );
        let idle_after = self.shared.config.passivate_after;
        let period = (idle_after / 4).max(Duration::from_millis(50));
        ctx.run_interval(period, move |act, ctx| {
            if act.last_active.elapsed() < idle_after || act.shutting_down {
                return;
            }
            if act.idle() {
                act.passivated = true;
                ctx.stop();
            } else if act.only_held() {
                // Only held subscriptions: they wait as records, the actor stops.
                act.forget_abandoned();
                let subs: crate::sets::parked::Waiters =
                    std::mem::take(&mut act.subs).into_iter().collect();
                if let (false, Some(epoch)) = (subs.is_empty(), act.epoch) {
                    // The parked map keeps the key made where the actor was started; the
                    // actor's copy for the rest of its life is made here and goes with
                    // it (`Subscribe::waiter` says why).
                    let key = act.set.clone();
                    act.shared.park(
                        std::mem::replace(&mut act.set, key),
                        Parked {
                            subs,
                            presence: act.presence,
                            epoch,
                        },
                    );
                }
                act.passivated = true;
                ctx.stop();
            }
        });
    }

    fn stopping(&mut self, _ctx: &mut Context<Self>) -> Running {
        // Never drop acknowledged-to-be work: stop only when nothing is pending, unless
        // the lease is gone (then nothing may be committed anyway).
        if self.epoch.is_some() && (self.committing || !self.queue.is_empty()) {
            return Running::Continue;
        }
        Running::Stop
    }

    fn stopped(&mut self, ctx: &mut Context<Self>) {
        // Counted gone before a waiter can see its end (as `ParkedSets::retire`).
        self.shared
            .metrics
            .subscriptions_held(-(self.subs.len() as i64));
        for (_, sub) in std::mem::take(&mut self.subs) {
            // "Nothing changed" while this node still held the lease (handoff, shutdown);
            // a lost lease drops the reply: the subscriber looks again at the new owner.
            if !self.lease_lost {
                sub.reply.finish(Vec::new());
            }
        }
        for job in self.queue.drain(..) {
            let e = || NodeError::Unavailable(format!("bucket set {} stopped", self.set));
            match job {
                Job::Put { reply, .. } => drop(reply.send(Err(e()))),
                Job::Ensure { reply, .. } => drop(reply.send(Err(e()))),
            }
        }
        self.shared.metrics.set_stopped(self.passivated);
        if self.leased {
            self.shared.metrics.lease_released();
        }
        self.shared.forget(&self.set, &ctx.address());
    }
}

impl Handler<Put> for BucketSetActor {
    type Result = Result<oneshot::Receiver<Result<WriteResult>>>;
    fn handle(&mut self, msg: Put, ctx: &mut Context<Self>) -> Self::Result {
        self.ready()?;
        self.touch();
        self.check_fields(&msg.id, &msg.update.value)?;
        let (tx, rx) = oneshot::channel();
        self.queue.push(Job::Put {
            id: msg.id,
            update: msg.update,
            session: msg.session,
            by: msg.by,
            op_id: msg.op_id,
            reply: tx,
            trace: JobTrace::here(),
        });
        self.start_commit(ctx);
        Ok(rx)
    }
}

impl Handler<EnsureBuckets> for BucketSetActor {
    type Result = Result<oneshot::Receiver<Result<()>>>;
    fn handle(&mut self, msg: EnsureBuckets, ctx: &mut Context<Self>) -> Self::Result {
        self.ready()?;
        self.touch();
        if msg.device_type.is_some() {
            self.device_type = msg.device_type;
        }
        if let Some(contact) = msg.contact {
            self.presence
                .declared(self.shared.now_ms(), contact.next_sync_ms);
            if let Some(p) = self.shared.pusher() {
                p.seen(&self.set);
            }
        }
        let (tx, rx) = oneshot::channel();
        if msg
            .buckets
            .iter()
            .all(|(id, _)| self.committed.contains_key(id))
        {
            drop(tx.send(Ok(())));
        } else {
            self.queue.push(Job::Ensure {
                buckets: msg.buckets,
                reply: tx,
                trace: JobTrace::here(),
            });
            self.start_commit(ctx);
        }
        Ok(rx)
    }
}

impl Handler<Get> for BucketSetActor {
    type Result = ResponseActFuture<Self, Result<Vec<Bucket>>>;
    fn handle(&mut self, msg: Get, ctx: &mut Context<Self>) -> Self::Result {
        self.under_lease(ctx, move |act, _| act.read(msg))
    }
}

impl BucketSetActor {
    /// Whether reads may be answered from memory now: a store round trip proved the lease
    /// less than [`Shared::lease_trust`] ago (always, for a node alone). Invariant 23.
    fn lease_trusted(&self) -> bool {
        // Planted bug (chaos self-test): memory is always trusted.
        #[cfg(feature = "planted-stale-reads")]
        if crate::planted::active(crate::planted::Bug::StaleReads) {
            return true;
        }
        match self.shared.lease_trust() {
            None => true,
            Some(trust) => self.confirmed.is_some_and(|at| at.elapsed() < trust),
        }
    }

    /// Runs `answer` (a read from memory) under a trusted lease: at once when it is
    /// trusted, else after one store round trip confirms the lease is still this actor's.
    /// A lease another node took meanwhile (this node was paused or cut off) stops the
    /// actor — its held subscriptions answered, its memory dropped — and the request is
    /// routed again (`NotOwner`): it never answers from memory that may be stale.
    fn under_lease<T: 'static>(
        &mut self,
        ctx: &mut Context<Self>,
        answer: impl FnOnce(&mut Self, &mut Context<Self>) -> Result<T> + 'static,
    ) -> ResponseActFuture<Self, Result<T>> {
        if let Err(e) = self.ready() {
            return Box::pin(fut::ready(Err(e)));
        }
        if self.lease_trusted() {
            let r = answer(self, ctx);
            return Box::pin(fut::ready(r));
        }
        Box::pin(self.confirm_lease().map(move |confirmed, act, ctx| {
            confirmed?;
            if !act.lease_trusted() {
                return Err(NodeError::Unavailable(format!(
                    "confirming the lease of bucket set {} took too long; retry",
                    act.set
                )));
            }
            answer(act, ctx)
        }))
    }

    /// One store round trip: is the lease still this actor's? If another node took it
    /// (this node was paused or cut off), the actor drops the set: held subscriptions
    /// answered (their clients resubscribe at the new owner), memory dropped, stopped.
    fn confirm_lease(&mut self) -> impl ActorFuture<Self, Output = Result<()>> + 'static {
        let span = tracing::info_span!("lease.confirm", set = %self.set);
        let (store, set) = (self.shared.store.clone(), self.set.clone());
        let sent = Instant::now();
        let confirm = async move { store.lease_epoch(&set).await }.instrument(span.clone());
        confirm.into_actor(self).map(move |current, act, ctx| {
            let _in = span.enter();
            act.ready()?;
            let current = current.map_err(NodeError::Store)?;
            if current.is_none() || current != act.epoch {
                tracing::warn!(set = %act.set, held = ?act.epoch, current = ?current, "lease taken by another node while this one was away (paused or cut off): dropping the set");
                act.shared.metrics.lease_lost();
                act.epoch = None;
                act.shutting_down = true;
                act.lease_lost = true;
                ctx.stop();
                return Err(NodeError::NotOwner(format!(
                    "bucket set {} moved to another node",
                    act.set
                )));
            }
            act.confirmed = act.confirmed.max(Some(sent));
            Ok(())
        })
    }

    /// A read from memory (the lease trusted).
    fn read(&mut self, msg: Get) -> Result<Vec<Bucket>> {
        self.ready()?;
        self.touch();
        // A set of ids, the ones that exist: a list naming one bucket a thousand times
        // costs one copy (finding 1).
        let ids: Vec<BucketId> = match msg.ids {
            None => self.committed.keys().cloned().collect(),
            Some(ids) => {
                let distinct: BTreeSet<BucketId> = ids.into_iter().collect();
                let max = self.shared.config.max_ids;
                if distinct.len() > max {
                    return Err(NodeError::BadRequest(format!(
                        "more than {max} distinct bucket ids in one request"
                    )));
                }
                distinct
                    .into_iter()
                    .filter(|id| self.committed.contains_key(id))
                    .collect()
            }
        };
        if msg.values {
            let total = ids
                .iter()
                .fold(0usize, |sum, id| sum.saturating_add(self.size_of(id)));
            if total > msg.max_bytes {
                return Err(NodeError::TooLarge(format!(
                    "the answer would be larger than {} bytes; ask for fewer buckets or view=versions",
                    msg.max_bytes
                )));
            }
        }
        Ok(ids
            .iter()
            .filter_map(|id| self.committed.get(id))
            .map(|b| {
                if msg.values {
                    b.clone()
                } else {
                    Bucket {
                        id: b.id.clone(),
                        value: Fields::new(),
                        timestamp: b.timestamp,
                        version: b.version,
                    }
                }
            })
            .collect())
    }
}

impl Handler<Subscribe> for BucketSetActor {
    type Result = ResponseActFuture<Self, Result<SubscribeAnswer>>;
    fn handle(&mut self, msg: Subscribe, ctx: &mut Context<Self>) -> Self::Result {
        let span = tracing::Span::current();
        self.under_lease(ctx, move |act, _| {
            let _in = span.enter();
            act.subscribe(msg)
        })
    }
}

impl BucketSetActor {
    /// A subscribe check against memory (the lease trusted).
    fn subscribe(&mut self, msg: Subscribe) -> Result<SubscribeAnswer> {
        self.ready()?;
        self.touch();
        if msg.device {
            self.presence
                .declared(self.shared.now_ms(), msg.next_sync_ms);
            if let Some(p) = self.shared.pusher() {
                p.seen(&self.set);
            }
        }
        let mut stale_ids = Vec::new();
        let mut seen = BTreeSet::new();
        for h in &msg.held {
            let stored = self
                .committed
                .get(&h.id)
                .ok_or_else(|| NodeError::NotFound(format!("no bucket {}", h.id)))?;
            let own_echo =
                msg.own_writes_known && self.changed_only_by(h, stored, msg.session.as_deref());
            if is_stale(h, stored) && !own_echo && seen.insert(&h.id) {
                stale_ids.push((h.id.clone(), h.version));
            }
        }
        // At once, within the answer budget (the first always): what does not fit is
        // still stale on the client's next subscribe, which answers it at once.
        let mut budget = msg.max_bytes;
        let mut stale = Vec::new();
        for (id, held) in &stale_ids {
            let size = self.size_of(id);
            if !stale.is_empty() && size > budget {
                continue;
            }
            budget = budget.saturating_sub(size);
            if let Some(stored) = self.committed.get(id) {
                let diff = if msg.diffs {
                    self.diff_from_memory(stored, *held)
                } else {
                    None
                };
                stale.push(Stale {
                    bucket: stored.clone(),
                    held: *held,
                    diff,
                });
            }
        }
        if !stale.is_empty() {
            return Ok(SubscribeAnswer::Now(stale));
        }
        self.forget_abandoned();
        let Some((sub, answer)) = msg.waiter.take() else {
            return Err(NodeError::Internal(
                "a subscription came without its record (Subscribe::waiter)".into(),
            ));
        };
        self.subs.insert(msg.sub_id, sub);
        self.shared.metrics.subscriptions_held(1);
        Ok(answer)
    }
}

impl BucketSetActor {
    /// Whether every change after the held version of `h` up to `stored` was made under
    /// `session`, as far as the recent changes in memory show (else false).
    fn changed_only_by(&self, h: &Held, stored: &Bucket, session: Option<&str>) -> bool {
        let (Some(session), Some(held)) = (session, h.version) else {
            return false;
        };
        if held >= stored.version {
            return false;
        }
        let Some(log) = self.recent.get(&h.id) else {
            return false;
        };
        let mut next = held + 1;
        for c in log.iter().filter(|c| c.version > held) {
            if c.version != next || c.session.as_deref() != Some(session) {
                return false;
            }
            next += 1;
        }
        next == stored.version + 1
    }
}

impl Handler<GetPresence> for BucketSetActor {
    type Result = Result<PresenceView>;
    fn handle(&mut self, _: GetPresence, _ctx: &mut Context<Self>) -> Self::Result {
        self.ready()?;
        if self.device_type.is_none() {
            return Err(NodeError::NotFound(format!("no device {}", self.set)));
        }
        Ok(self
            .presence
            .view(self.device_listening(), self.shared.now_ms()))
    }
}

impl Handler<Unsubscribe> for BucketSetActor {
    type Result = ();
    fn handle(&mut self, msg: Unsubscribe, _ctx: &mut Context<Self>) {
        if self.subs.remove(&msg.0).is_some() {
            self.shared.metrics.subscriptions_held(-1);
        }
    }
}

impl BucketSetActor {
    /// Drops the held subscriptions no one waits for any more (their answer's receiver is
    /// gone, the `Unsubscribe` never came): a subscriber that vanished without cancelling
    /// holds no memory, nor counts as listening, past the next subscribe to the set.
    fn forget_abandoned(&mut self) {
        let before = self.subs.len();
        self.subs.retain(|_, sub| !sub.reply.is_closed());
        let gone = before - self.subs.len();
        if gone > 0 {
            self.shared.metrics.subscriptions_held(-(gone as i64));
        }
    }

    fn release_held(&mut self) {
        // Counted gone before a waiter can see its end (as `ParkedSets::retire`).
        self.shared
            .metrics
            .subscriptions_held(-(self.subs.len() as i64));
        for (_, sub) in std::mem::take(&mut self.subs) {
            sub.reply.finish(Vec::new());
        }
    }
}

impl Handler<ReleaseHeld> for BucketSetActor {
    type Result = ();
    fn handle(&mut self, _msg: ReleaseHeld, _ctx: &mut Context<Self>) {
        self.release_held();
    }
}

impl Handler<Revalidate> for BucketSetActor {
    type Result = ();
    fn handle(&mut self, _msg: Revalidate, ctx: &mut Context<Self>) {
        // Planted bug (chaos self-test): memory is trusted here too, so a woken owner
        // does not drop a set that was taken while it slept.
        #[cfg(feature = "planted-stale-reads")]
        if crate::planted::active(crate::planted::Bug::StaleReads) {
            return;
        }
        if self.subs.is_empty() || self.ready().is_err() || self.shared.lease_trust().is_none() {
            return;
        }
        ctx.spawn(self.confirm_lease().map(|_, _, _| ()));
    }
}

impl Handler<ConfirmHeld> for BucketSetActor {
    type Result = ResponseActFuture<Self, Result<()>>;
    fn handle(&mut self, _msg: ConfirmHeld, ctx: &mut Context<Self>) -> Self::Result {
        self.under_lease(ctx, |_, _| Ok(()))
    }
}

impl Handler<Shutdown> for BucketSetActor {
    type Result = ();
    fn handle(&mut self, _msg: Shutdown, ctx: &mut Context<Self>) {
        self.shutting_down = true;
        self.release_held();
        ctx.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(id: &str, version: Option<u64>) -> Held {
        Held {
            id: BucketId::parse(id).expect("valid id"),
            timestamp: None,
            version,
        }
    }

    #[test]
    fn a_value_is_measured_as_long_as_its_json() {
        for text in [
            r#"{}"#,
            r#"{"t":21.5}"#,
            r#"{"name":"caf\u00e9 \"quoted\" \\ tab\t","n":[1,2,{"x":null}],"ok":true}"#,
            r#"{"emoji":"🌡️","big":18446744073709551615,"neg":-1e300}"#,
        ] {
            let value: Fields = serde_json::from_str(text).expect("a JSON object");
            let json = serde_json::to_vec(&value).expect("encodes");
            assert_eq!(encoded_len(&value), json.len(), "{text}");
        }
    }

    #[test]
    fn held_versions_answer_like_a_map_of_the_last_named_version() {
        let ids =
            |v: &HeldVersions| -> Vec<String> { v.iter().map(|(id, _)| id.to_string()).collect() };
        let h = HeldVersions::new(&[
            held("shared.B", Some(4)),
            held("device.A", None),
            held("shared.B", Some(7)),
            held("device.C", Some(1)),
        ]);
        assert_eq!(ids(&h), ["device.A", "device.C", "shared.B"]);
        assert_eq!(
            h.get(&BucketId::parse("shared.B").expect("id")),
            Some(Some(7))
        );
        assert_eq!(h.get(&BucketId::parse("device.A").expect("id")), Some(None));
        assert!(h.contains_key(&BucketId::parse("device.C").expect("id")));
        assert!(!h.contains_key(&BucketId::parse("device.D").expect("id")));
        assert_eq!(h.get(&BucketId::parse("device.D").expect("id")), None);
    }
}
