//! Streaming subscribe (API.md "Streaming subscribe"): `POST /v1/subscribe` with
//! `"stream": true` answers 200 `application/x-ndjson`, one long-poll answer
//! (`{"buckets": […]}`) per line, until its `timeout_ms`, an access change, a drain or the
//! client leaving.
//!
//! The stream is a loop around the long-poll path, so every rule is the long-poll's: it
//! holds a subscription through the `Router` (local actors or the owners over gRPC) with
//! the versions of its [`Cursor`]; an answer is written as one line, the cursor advances
//! to the versions in it, the principal is authenticated and authorized again, and the
//! next hold starts at once. A change committed between two holds is answered by the next
//! hold's check (its versions are those of the last line), so none is missed. Holding again
//! the stream says it has its own session's writes (`HoldOptions::own_writes_known`), so
//! an echo the held subscription suppressed is not sent by the next check either.
//!
//! When every set the stream holds is served by this node, the hold is kept by the sets'
//! actors across answers (`Router::open_stream`, ARCHITECTURE.md invariant 37): each
//! change is answered on the same hold, whose versions the actor advances as the cursor
//! does, and the access is checked again after every line. Whenever an actor lets go of
//! it (an answer not yet taken when the next is due, a short answer, access change,
//! hand-off, lost lease) the stream holds again from its cursor as above.
//! A `{}` line goes out after `--stream-keepalive-ms` (30 s) of silence. Lines are JSON
//! whatever the request's `Accept` (a protobuf request body may ask for a stream too).
//!
//! How it ends: cleanly (the body's last chunk) on its timeout, when the principal may no
//! longer read a held bucket or its credentials fail (access change: the owners answer held
//! subscriptions empty when pairings change, and the stream then checks again), on drain,
//! and when a newer subscription of the principal takes its place (`held.rs`); cut (an
//! error, as a long-poll is cut) when an owner cannot confirm or be reached. When the client
//! hangs up, actix drops the body, the loop sees its channel closed and drops the held
//! subscription (its guards unsubscribe it on every owner).

use std::collections::BTreeMap;
use std::time::Duration;

use actix_web::{web, HttpRequest, HttpResponse};
use tether_proto::api::{BucketDoc, BucketList};
use tether_proto::reconcile::Held;
use tether_proto::{BucketId, SetKey};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::api::http::{AppState, OPEN_AT_LEAST};
use crate::error::NodeError;
use crate::metrics::HoldTimer;
use crate::routing::router::{
    drained, BucketUpdate, HoldOptions, StreamHold, StreamOpen, Subscription,
};
use crate::security::auth::Endpoint;

/// The media type of a stream's body.
pub const NDJSON: &str = "application/x-ndjson";
/// The keep-alive line.
const KEEPALIVE: &[u8] = b"{}\n";
/// Pause before holding again after an answer without buckets that was neither a drain
/// nor the timeout (access change, handoff): bounds the loop if owners keep answering so.
const REHOLD_PAUSE: Duration = Duration::from_millis(50);

/// The versions a stream holds, by set: the client's at first, then those of each line.
#[derive(Debug, Clone, PartialEq)]
pub struct Cursor {
    by_set: BTreeMap<SetKey, Vec<Held>>,
}

impl Cursor {
    /// The client's held versions.
    pub fn new(by_set: BTreeMap<SetKey, Vec<Held>>) -> Self {
        Cursor { by_set }
    }

    /// What the next hold holds.
    pub fn held(&self) -> BTreeMap<SetKey, Vec<Held>> {
        self.by_set.clone()
    }

    /// Every held bucket id.
    pub fn ids(&self) -> impl Iterator<Item = &BucketId> + Clone {
        self.by_set.values().flatten().map(|h| &h.id)
    }

    /// The client now has the buckets of a line: hold their versions from now on. Buckets
    /// left out of the line (`pending`) keep their versions, so the next hold answers them.
    pub fn advance(&mut self, sent: &[BucketDoc]) {
        for doc in sent {
            let Ok(id) = BucketId::parse(&doc.id) else {
                continue;
            };
            if let Some(h) = self
                .by_set
                .get_mut(&id.set_key())
                .and_then(|held| held.iter_mut().find(|h| h.id == id))
            {
                h.version = doc.version;
                h.timestamp = doc.timestamp;
            }
        }
    }
}

/// A streaming subscribe, checked and ready to run.
#[derive(Debug)]
pub struct StreamRequest {
    /// The request (its credentials are checked again before every hold after the first).
    pub req: HttpRequest,
    /// The principal's key for its share of held subscriptions.
    pub principal: String,
    /// What is held.
    pub cursor: Cursor,
    /// The whole stream's time (the subscribe's `timeout_ms`, within the server maximum).
    pub timeout: Duration,
    /// When the request arrived.
    pub started: Instant,
    /// Session, diffs, the owners' answer budget.
    pub opts: HoldOptions,
    /// The line budget (`max_bytes` of the request, within the node's).
    pub max_bytes: Option<u64>,
}

/// Starts the stream: the status line and headers now, then one line per answer, the
/// first from `opened` (the subscribe check the handler made, so its errors are the
/// long-poll's statuses).
pub fn respond(
    state: web::Data<AppState>,
    stream: StreamRequest,
    opened: Subscription,
) -> HttpResponse {
    let (tx, mut rx) = mpsc::channel::<Result<web::Bytes, NodeError>>(2);
    actix_web::rt::spawn(async move {
        let out = Out { tx: &tx };
        tokio::select! {
            // The client hung up: actix dropped the body, and with it the receiver.
            () = tx.closed() => {}
            () = run(&state, stream, opened, out) => {}
        }
    });
    HttpResponse::Ok()
        .content_type(NDJSON)
        .streaming(futures::stream::poll_fn(move |cx| rx.poll_recv(cx)))
}

/// Where lines go; a failed send means the client left.
#[derive(Clone, Copy)]
struct Out<'a> {
    tx: &'a mpsc::Sender<Result<web::Bytes, NodeError>>,
}

impl Out<'_> {
    async fn line(&self, bytes: Vec<u8>) -> bool {
        self.tx.send(Ok(web::Bytes::from(bytes))).await.is_ok()
    }

    /// Cuts the body (no last chunk): the client must not take the end as the server's.
    async fn cut(&self, e: NodeError) {
        tracing::info!(error = %e, "stream cut");
        let _ = self.tx.send(Err(e)).await;
    }
}

/// How one hold ended.
enum HoldEnd {
    /// An answer (empty: an owner let go — access change, handoff — or drain/timeout).
    Answer(Vec<BucketUpdate>),
    /// The stream is over (client gone, evicted, owner failed: already handled).
    Over,
    /// The stream's time is up.
    TimedOut,
    /// A kept hold ended without an answer: hold again from the cursor.
    Again,
}

/// The stream's next hold.
enum Next {
    /// Held through the router (several sets, a set served elsewhere), answered once.
    Once(Subscription),
    /// Held by the set's actor, answered at each change.
    Kept(StreamOpen),
}

async fn run(state: &AppState, mut s: StreamRequest, opened: Subscription, out: Out<'_>) {
    let mut slot = state.held.register(&s.principal);
    let deadline = s.started + s.timeout;
    let draining = state.router.drain_signal();
    let keepalive = state.config.stream_keepalive;
    let encoding = tether_proto::synclog::Encoding::Json;
    let mut last_line = Instant::now();
    let mut next = Some(Next::Once(opened));
    // A hold the set's actor keeps across answers (`Router::open_stream`).
    let mut kept: Option<StreamHold> = None;
    // The last check of the access (the handler's own is not counted: the first line
    // after it checks again).
    let mut checked = Checked::default();
    // Made once for the stream: a keep-alive timer that fires at most once a `keepalive`
    // (a line since it was set moves it on when it fires), the deadline and the drain.
    let keepalive_due = tokio::time::sleep_until(last_line + keepalive);
    let timed_out = tokio::time::sleep_until(deadline);
    let drain = drained(draining.clone());
    tokio::pin!(keepalive_due, timed_out, drain);
    loop {
        let now = Instant::now();
        if now >= deadline
            || *draining.borrow()
            || !state.serving.load(std::sync::atomic::Ordering::Acquire)
        {
            return;
        }
        let mut hold = None;
        let ended = if let Some(held) = kept.as_mut() {
            hold = Some(HoldTimer::start(state.shared.metrics.clone()));
            let ended = {
                // Pinned outside the loop: a keep-alive line never drops an answer half made.
                let answer = held.next();
                tokio::pin!(answer);
                loop {
                    tokio::select! {
                        r = &mut answer => break match r {
                            Some(updates) => HoldEnd::Answer(updates),
                            // The actor let go without a word (an answer not taken in
                            // time, one left short, a lost lease): hold again at once.
                            None => HoldEnd::Again,
                        },
                        () = &mut keepalive_due => {
                            if !keep_alive(&out, &mut last_line, keepalive, keepalive_due.as_mut()).await {
                                break HoldEnd::Over;
                            }
                        }
                        () = &mut timed_out => break HoldEnd::TimedOut,
                        () = &mut drain => break HoldEnd::Over,
                        () = slot.evicted() => break HoldEnd::Over,
                    }
                }
            };
            if let HoldEnd::TimedOut = ended {
                // The end says "nothing changed since the last line": only once the owner
                // confirmed its lease, as a long-poll's timeout.
                if let Err(e) = held.confirm().await {
                    out.cut(e).await;
                }
                return;
            }
            ended
        } else {
            let sub = match next.take() {
                Some(Next::Once(sub)) => sub,
                Some(Next::Kept(StreamOpen::Now(updates))) => Subscription::Now(updates),
                Some(Next::Kept(StreamOpen::Held(held))) => {
                    kept = Some(held);
                    continue;
                }
                None => match hold_again(state, &s, deadline, &mut checked).await {
                    Ok(sub) => {
                        next = Some(sub);
                        continue;
                    }
                    Err(e) if e.code_and_status().1.is_client_error() => {
                        // Access changed since the last hold (pairing, credentials).
                        tracing::info!(error = %e, "stream ended: access changed");
                        return;
                    }
                    Err(e) => return out.cut(e).await,
                },
            };
            let remaining = deadline.saturating_duration_since(Instant::now());
            match sub {
                Subscription::Now(updates) => HoldEnd::Answer(updates),
                Subscription::Held(held) => {
                    hold = Some(HoldTimer::start(state.shared.metrics.clone()));
                    let answer = held.answer(remaining, draining.clone());
                    tokio::pin!(answer);
                    loop {
                        tokio::select! {
                            r = &mut answer => break match r {
                                Ok(updates) => HoldEnd::Answer(updates),
                                Err(e) => {
                                    out.cut(e).await;
                                    HoldEnd::Over
                                }
                            },
                            () = &mut keepalive_due => {
                                if !keep_alive(&out, &mut last_line, keepalive, keepalive_due.as_mut()).await {
                                    break HoldEnd::Over;
                                }
                            }
                            () = slot.evicted() => break HoldEnd::Over,
                        }
                    }
                }
            }
        };
        let updates = match ended {
            HoldEnd::Over | HoldEnd::TimedOut => return,
            HoldEnd::Again => {
                kept = None;
                continue;
            }
            HoldEnd::Answer(updates) => updates,
        };
        if let Some(hold) = hold {
            hold.answered(
                updates.iter().map(|u| u.bucket.timestamp.millis).max(),
                crate::api::http::now_ms(),
            );
        }
        // From here on the stream holds with what it sent, and has its own writes.
        s.opts.own_writes_known = true;
        if updates.is_empty() {
            kept = None;
            tokio::time::sleep(REHOLD_PAUSE).await;
            continue;
        }
        let list: BucketList = crate::api::http::answer_list(updates, s.max_bytes, encoding);
        let mut bytes = match serde_json::to_vec(&list) {
            Ok(b) => b,
            Err(e) => return out.cut(NodeError::Internal(e.to_string())).await,
        };
        bytes.push(b'\n');
        s.cursor.advance(&list.buckets);
        if !list.pending.is_empty() {
            // Not all of the answer went: the actor's hold has versions the client does
            // not; hold again from the cursor.
            kept = None;
        }
        if !out.line(bytes).await {
            return;
        }
        last_line = Instant::now();
        let delay = state.config.test_stream_rehold_delay;
        if !delay.is_zero() {
            // Tests only (`--test-stream-rehold-delay-ms`): no hold while this lasts.
            tokio::time::sleep(delay).await;
        }
        if kept.is_some() && !checked.holds(state) {
            // The next answer comes from the same hold: the access a new hold would check.
            match check_access(state, &s, &mut checked).await {
                Ok(()) => {}
                Err(e) if e.code_and_status().1.is_client_error() => {
                    tracing::info!(error = %e, "stream ended: access changed");
                    return;
                }
                Err(e) => return out.cut(e).await,
            }
        }
    }
}

/// The keep-alive timer fired: a keep-alive line if none went for `keepalive`, and the
/// timer set for `keepalive` after the last line. False if the client is gone.
async fn keep_alive(
    out: &Out<'_>,
    last_line: &mut Instant,
    keepalive: Duration,
    due: std::pin::Pin<&mut tokio::time::Sleep>,
) -> bool {
    if last_line.elapsed() >= keepalive {
        if !out.line(KEEPALIVE.to_vec()).await {
            return false;
        }
        *last_line = Instant::now();
    }
    due.reset(*last_line + keepalive);
    true
}

/// When the stream's access last passed its check, and the node's pairing generation then.
#[derive(Debug, Default, Clone, Copy)]
struct Checked {
    passed: Option<(Instant, u64)>,
}

impl Checked {
    /// Whether the last check still stands after a kept line: made within the scope
    /// cache's freshness (`scope_ttl`: what that check read may be as old anyway) and no
    /// pairing changed through this node since. A hold that ends is always checked again
    /// (`hold_again`): access changes made elsewhere end the holds they touch.
    fn holds(&self, state: &AppState) -> bool {
        self.passed.is_some_and(|(at, generation)| {
            at.elapsed() < state.auth.credentials.config().scope_ttl
                && generation == state.auth.access_generation()
        })
    }
}

/// The stream's request authenticated again and every held bucket checked against the
/// principal's scope as it is now (the check a long-poll client's next subscribe gets),
/// without charging the principal's request rate again: the stream's lines are one
/// request's answers, and a busy stream must neither end itself with a 429 nor leave its
/// principal none of its budget.
async fn check_access(
    state: &AppState,
    s: &StreamRequest,
    checked: &mut Checked,
) -> crate::error::Result<()> {
    let generation = state.auth.access_generation();
    let at = Instant::now();
    let mut principal = tokio::time::timeout(
        OPEN_AT_LEAST,
        state.principal_again(&s.req, Endpoint::Buckets),
    )
    .await
    .map_err(|_| NodeError::Unavailable("the credentials could not be checked in time".into()))??;
    state.authorize_all(&mut principal, s.cursor.ids()).await?;
    checked.passed = Some((at, generation));
    Ok(())
}

/// The next hold: the access checked again, then the subscribe check with the cursor's
/// versions — kept by the sets' actors when this node serves every set the stream holds.
async fn hold_again(
    state: &AppState,
    s: &StreamRequest,
    deadline: Instant,
    checked: &mut Checked,
) -> crate::error::Result<Next> {
    check_access(state, s, checked).await?;
    let remaining = deadline.saturating_duration_since(Instant::now());
    let held = s.cursor.held();
    let opened = tokio::time::timeout(remaining.max(OPEN_AT_LEAST), async {
        if let Some(open) = state.router.open_stream(&held, &s.opts).await? {
            return Ok(Next::Kept(open));
        }
        state
            .router
            .subscribe(held.clone(), remaining, s.opts.clone())
            .await
            .map(Next::Once)
    })
    .await;
    opened.map_err(|_| {
        NodeError::Unavailable("no owner of a streamed bucket set could be reached in time".into())
    })?
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(id: &str, version: Option<u64>) -> Held {
        Held {
            id: BucketId::parse(id).expect("valid id"),
            timestamp: version.map(|v| v * 10),
            version,
        }
    }

    fn cursor(items: &[Held]) -> Cursor {
        let mut by_set: BTreeMap<SetKey, Vec<Held>> = BTreeMap::new();
        for h in items {
            by_set.entry(h.id.set_key()).or_default().push(h.clone());
        }
        Cursor::new(by_set)
    }

    fn doc(id: &str, version: u64) -> BucketDoc {
        BucketDoc {
            id: id.into(),
            timestamp: Some(version * 10),
            version: Some(version),
            value: None,
            base_version: None,
            changes: None,
        }
    }

    #[test]
    fn a_line_advances_only_the_buckets_it_carried() {
        let mut c = cursor(&[
            held("device.A", Some(1)),
            held("shared.A", Some(4)),
            held("device.B", None),
        ]);
        c.advance(&[doc("shared.A", 6), doc("device.B", 2)]);
        assert_eq!(
            c,
            cursor(&[
                held("device.A", Some(1)),
                held("shared.A", Some(6)),
                held("device.B", Some(2)),
            ])
        );
        // A bucket the stream does not hold (never sent by an owner) changes nothing.
        c.advance(&[doc("device.C", 9)]);
        assert_eq!(c.ids().count(), 3);
    }
}
