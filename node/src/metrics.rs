//! Prometheus metrics (`GET /metrics`): Prometheus text by default, OpenMetrics (with
//! exemplars naming the trace of a sampled request) when the scraper asks for it.
//!
//! Names follow the Prometheus conventions (`tether_` prefix, base units in the name,
//! `_total` counters) and every label takes a bounded set of values: routes are the
//! route patterns, methods the known ones, codes the API's error codes, peers the
//! cluster's node ids. Never a device, bucket or user id: a test registers 1,000 devices
//! and checks that no series appears per device.

use std::borrow::Cow;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::exemplar::HistogramWithExemplars;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

type Labels = Vec<(&'static str, String)>;
type ExemplarHistogram = HistogramWithExemplars<Labels>;

/// `tether_http_requests_total`'s labels. Typed (the status a number, the method and the
/// frequent routes static names) so that counting a request builds no string (one for a
/// route `api::http::frequent_route` does not name), not a vector of them.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteStatus {
    route: Cow<'static, str>,
    status: u16,
}

/// `tether_http_request_duration_seconds`' labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodRouteStatus {
    method: &'static str,
    route: Cow<'static, str>,
    status: u16,
}

/// Request latencies: 1 ms … 90 min (held subscriptions last up to the maximum hold).
const REQUEST_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    300.0, 900.0, 1800.0, 5400.0,
];
/// Held subscriptions: 100 ms … 90 min.
const HOLD_BUCKETS: &[f64] = &[
    0.1, 1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 900.0, 1800.0, 3600.0, 5400.0,
];
/// Work inside the node (commits, notifications, forwarding): 100 µs … 10 s.
const FAST_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];
/// Queueing in an actor's mailbox: 10 µs … 1 s.
const QUEUE_BUCKETS: &[f64] = &[
    0.00001, 0.00005, 0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0,
];

fn request_histogram() -> ExemplarHistogram {
    HistogramWithExemplars::new(REQUEST_BUCKETS.iter().copied())
}
fn hold_histogram() -> Histogram {
    Histogram::new(HOLD_BUCKETS.iter().copied())
}
fn fast_histogram() -> Histogram {
    Histogram::new(FAST_BUCKETS.iter().copied())
}
fn queue_histogram() -> Histogram {
    Histogram::new(QUEUE_BUCKETS.iter().copied())
}
fn batch_histogram() -> Histogram {
    Histogram::new(exponential_buckets(1.0, 2.0, 11))
}

type HistFamily = Family<Labels, Histogram, fn() -> Histogram>;
/// Reads one gauge off a tokio runtime.
type RuntimeGauge = fn(&tokio::runtime::RuntimeMetrics) -> usize;

#[derive(Debug)]
struct Inner {
    registry: Registry,
    http_requests: Family<RouteStatus, Counter>,
    put_outcomes: Family<Labels, Counter>,
    held_subscriptions: Gauge,
    active_sets: Gauge,
    parked_sets: Gauge,
    activations: Counter,
    passivations: Counter,
    notifications: Counter,
    store_commits: Counter,
    store_batch: Histogram,
    store_checkpoints: Counter,
    store_wal_syncs: Counter,
    store_wal_bytes: Gauge,
    store_writer_busy: Counter<f64, std::sync::atomic::AtomicU64>,
    leases_acquired: Counter,
    leases_lost: Counter,
    owned_sets: Gauge,
    forwarded: Family<Labels, Counter>,
    forwarded_served: Family<Labels, Counter>,
    handoffs: Counter,
    cluster_members: Gauge,
    member_changes: Family<Labels, Counter>,
    clock_offset: Gauge<f64, std::sync::atomic::AtomicU64>,
    request_duration: Family<MethodRouteStatus, ExemplarHistogram, fn() -> ExemplarHistogram>,
    auth_failures: Family<Labels, Counter>,
    rate_limited: Family<Labels, Counter>,
    subscribe_hold: HistFamily,
    notify_latency: Histogram,
    mailbox_wait: HistFamily,
    commit_duration: HistFamily,
    commit_requests: HistFamily,
    forward_duration: HistFamily,
    lease_acquire: Histogram,
    lease_takeovers: Counter,
    auth_stale: Family<Labels, Counter>,
    blobs: Family<Labels, Counter>,
    wakeups: Family<Labels, Counter>,
    store_backend: OnceLock<&'static str>,
    runtimes: Mutex<Vec<(&'static str, tokio::runtime::Handle)>>,
    connections_open: Gauge,
    limited: Family<Labels, Counter>,
    auth_tracked_ids: Gauge,
}

/// Shared handle to the node's metrics; cheap to clone.
#[derive(Debug, Clone)]
pub struct Metrics(Arc<Inner>);

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric the node reports.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("tether");
        let http_requests = Family::<RouteStatus, Counter>::default();
        registry.register(
            "http_requests",
            "HTTP requests by route and status",
            http_requests.clone(),
        );
        let put_outcomes = Family::<Labels, Counter>::default();
        registry.register(
            "put_outcomes",
            "PUT outcomes (applied, merged, refused)",
            put_outcomes.clone(),
        );
        let held_subscriptions = Gauge::default();
        registry.register(
            "held_subscriptions",
            "Subscriptions currently held open",
            held_subscriptions.clone(),
        );
        let active_sets = Gauge::default();
        registry.register(
            "active_bucket_sets",
            "Bucket set actors currently in memory",
            active_sets.clone(),
        );
        let parked_sets = Gauge::default();
        registry.register(
            "parked_bucket_sets",
            "Bucket sets whose actor stopped while subscriptions wait on them (kept as compact waiter records)",
            parked_sets.clone(),
        );
        let activations = Counter::default();
        registry.register(
            "bucket_set_activations",
            "Bucket set actors started (loaded from the store)",
            activations.clone(),
        );
        let passivations = Counter::default();
        registry.register(
            "bucket_set_passivations",
            "Idle bucket set actors stopped",
            passivations.clone(),
        );
        let notifications = Counter::default();
        registry.register(
            "notifications",
            "Held subscriptions answered because a bucket changed",
            notifications.clone(),
        );
        let store_commits = Counter::default();
        registry.register(
            "store_commits",
            "Store write transactions (batches of commits; redb: between checkpoints they share the fsyncs of its write-ahead log)",
            store_commits.clone(),
        );
        let store_checkpoints = Counter::default();
        registry.register(
            "store_checkpoints",
            "redb: durable commits of its B-tree, after which its write-ahead log starts over",
            store_checkpoints.clone(),
        );
        let store_wal_syncs = Counter::default();
        registry.register(
            "store_wal_syncs",
            "redb: fsyncs of its write-ahead log, each making durable every batch written to it since the last",
            store_wal_syncs.clone(),
        );
        let store_wal_bytes = Gauge::default();
        registry.register(
            "store_wal_bytes",
            "redb: bytes of batches in its write-ahead log that only the log holds durably (0 after a checkpoint)",
            store_wal_bytes.clone(),
        );
        let store_writer_busy = Counter::<f64, std::sync::atomic::AtomicU64>::default();
        registry.register(
            "store_writer_busy_seconds",
            "redb: time its one writer thread spent in write transactions (applying, writing the log, committing; a checkpoint's fsync too, not the log's); its rate is the writer's utilization, and near 1 the writer bounds the node's write rate",
            store_writer_busy.clone(),
        );
        let store_batch = Histogram::new(exponential_buckets(1.0, 2.0, 11));
        registry.register(
            "store_commit_batch_size",
            "Commits folded into one store write transaction (group commit)",
            store_batch.clone(),
        );
        let leases_acquired = Counter::default();
        registry.register(
            "leases_acquired",
            "Bucket set leases taken, one per activation (leases do not expire, so there is no renewal: a lease stands until another node takes it, which fences the holder)",
            leases_acquired.clone(),
        );
        let leases_lost = Counter::default();
        registry.register(
            "leases_lost",
            "Commits refused because another owner took the set's lease",
            leases_lost.clone(),
        );
        let owned_sets = Gauge::default();
        registry.register(
            "owned_sets",
            "Bucket sets whose lease this node holds (loaded actors)",
            owned_sets.clone(),
        );
        let forwarded = Family::<Labels, Counter>::default();
        registry.register(
            "forwarded_requests",
            "Requests sent to the owning node over gRPC, by operation and result",
            forwarded.clone(),
        );
        let forwarded_served = Family::<Labels, Counter>::default();
        registry.register(
            "forwarded_served",
            "Requests other nodes forwarded here, by operation",
            forwarded_served.clone(),
        );
        let handoffs = Counter::default();
        registry.register(
            "handoffs",
            "Bucket set actors stopped because the set moved to another node",
            handoffs.clone(),
        );
        let cluster_members = Gauge::default();
        registry.register(
            "cluster_members",
            "Live members in this node's view, itself included",
            cluster_members.clone(),
        );
        let clock_offset = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        registry.register(
            "clock_offset_seconds",
            "This node's wall clock minus the shared store's, as last read (0 on a store without a clock); beyond --max-clock-offset-ms the node stamps writes by the store's clock",
            clock_offset.clone(),
        );
        let member_changes = Family::<Labels, Counter>::default();
        registry.register(
            "cluster_member_changes",
            "Changes of other members in this node's view, by change (up: joined, restarted or refuted a suspicion; down: no longer live, whether it drained, its port refused a connection or a suspicion of it ran out; left: gone for good, drained or refused). In a run without kills, partitions or freezes, down minus left counts false suspicions",
            member_changes.clone(),
        );
        let request_duration = Family::<
            MethodRouteStatus,
            ExemplarHistogram,
            fn() -> ExemplarHistogram,
        >::new_with_constructor(request_histogram);
        registry.register(
            "http_request_duration_seconds",
            "Device API request latency, by method, route pattern and status (exemplars: trace ids)",
            request_duration.clone(),
        );
        let auth_failures = Family::<Labels, Counter>::default();
        registry.register(
            "auth_failures",
            "Requests refused by authentication or authorization, by API error code",
            auth_failures.clone(),
        );
        let rate_limited = Family::<Labels, Counter>::default();
        registry.register(
            "rate_limited",
            "Requests refused by a rate limit (429), by route",
            rate_limited.clone(),
        );
        let subscribe_hold = HistFamily::new_with_constructor(hold_histogram);
        registry.register(
            "subscribe_hold_seconds",
            "How long held subscriptions were held, by how they ended (changed, empty: timeout, drain or access change, cancelled: client left)",
            subscribe_hold.clone(),
        );
        let notify_latency = fast_histogram();
        registry.register(
            "notify_latency_seconds",
            "From a change's commit (its server timestamp) to the held subscription's answer being written",
            notify_latency.clone(),
        );
        let mailbox_wait = HistFamily::new_with_constructor(queue_histogram);
        registry.register(
            "actor_mailbox_wait_seconds",
            "Time a message waited in a bucket set actor's mailbox before being handled, by message",
            mailbox_wait.clone(),
        );
        let commit_duration = HistFamily::new_with_constructor(fast_histogram);
        registry.register(
            "store_commit_duration_seconds",
            "Time for one actor batch to become durable in the store, by backend",
            commit_duration.clone(),
        );
        let commit_requests = HistFamily::new_with_constructor(batch_histogram);
        registry.register(
            "store_commit_requests",
            "Device requests acknowledged by one actor batch commit, by backend",
            commit_requests.clone(),
        );
        let forward_duration = HistFamily::new_with_constructor(fast_histogram);
        registry.register(
            "forward_duration_seconds",
            "Latency of calls forwarded to the owning node, by peer, operation and result (a held subscribe: until the owner's first answer)",
            forward_duration.clone(),
        );
        let lease_acquire = fast_histogram();
        registry.register(
            "lease_acquire_duration_seconds",
            "Time to take a bucket set's lease and load it (an activation)",
            lease_acquire.clone(),
        );
        let lease_takeovers = Counter::default();
        registry.register(
            "lease_takeovers",
            "Leases taken over from another node (failover or rebalancing)",
            lease_takeovers.clone(),
        );
        let auth_stale = Family::<Labels, Counter>::default();
        registry.register(
            "auth_stale_answers",
            "Requests authenticated (what=credentials) or scoped (what=scope) from a cached \
             record past its freshness because the store did not answer",
            auth_stale.clone(),
        );
        for what in ["credentials", "scope"] {
            let _ = auth_stale.get_or_create(&vec![("what", what.to_string())]);
        }
        let blobs = Family::<Labels, Counter>::default();
        registry.register(
            "blob_events",
            "Blob uploads completed, refused for a hash mismatch, downloads served, and \
             blobs deleted (unreferenced past their grace, or uploads never finished)",
            blobs.clone(),
        );
        for event in ["completed", "hash_mismatch", "downloaded", "deleted"] {
            let _ = blobs.get_or_create(&vec![("event", event.to_string())]);
        }
        let wakeups = Family::<Labels, Counter>::default();
        registry.register(
            "push_wakeups",
            "Push wake-ups of offline devices (--push-webhook): sent (the gateway took it), \
             collapsed (a change riding on one outstanding for its device), retried (an \
             attempt the gateway refused or did not answer), failed (given up after every \
             attempt), dropped (too many waiting on this node)",
            wakeups.clone(),
        );
        for result in ["sent", "collapsed", "retried", "failed", "dropped"] {
            let _ = wakeups.get_or_create(&vec![("result", result.to_string())]);
        }
        // Series of bounded, known label values start at zero, so a first increase is a
        // rate (and a dashboard shows 0, not "no data").
        for outcome in ["applied", "merged", "refused"] {
            let _ = put_outcomes.get_or_create(&vec![("outcome", outcome.to_string())]);
        }
        for reason in [
            "unauthorized",
            "default_credentials_not_allowed",
            "forbidden",
        ] {
            let _ = auth_failures.get_or_create(&vec![("reason", reason.to_string())]);
        }
        for outcome in ["changed", "empty", "cancelled"] {
            let _ = subscribe_hold.get_or_create(&vec![("outcome", outcome.to_string())]);
        }
        let connections_open = Gauge::default();
        registry.register(
            "connections_open",
            "Open connections on the device port",
            connections_open.clone(),
        );
        let limited = Family::<Labels, Counter>::default();
        registry.register(
            "limited",
            "Requests and connections refused or cut short by a per-client limit (SECURITY.md), by limit",
            limited.clone(),
        );
        let auth_tracked_ids = Gauge::default();
        registry.register(
            "auth_tracked_ids",
            "Credential ids with recent failed checks in the bounded failure table",
            auth_tracked_ids.clone(),
        );
        Metrics(Arc::new(Inner {
            request_duration,
            auth_failures,
            rate_limited,
            subscribe_hold,
            notify_latency,
            mailbox_wait,
            commit_duration,
            commit_requests,
            forward_duration,
            lease_acquire,
            lease_takeovers,
            auth_stale,
            blobs,
            wakeups,
            store_backend: OnceLock::new(),
            runtimes: Mutex::new(Vec::new()),
            auth_tracked_ids,
            connections_open,
            limited,
            owned_sets,
            forwarded,
            forwarded_served,
            handoffs,
            cluster_members,
            member_changes,
            clock_offset,
            leases_acquired,
            leases_lost,
            registry,
            http_requests,
            put_outcomes,
            held_subscriptions,
            active_sets,
            parked_sets,
            activations,
            passivations,
            notifications,
            store_commits,
            store_batch,
            store_checkpoints,
            store_wal_syncs,
            store_wal_bytes,
            store_writer_busy,
        }))
    }

    /// OpenMetrics exposition, exemplars included, plus the process and runtime gauges.
    pub fn render_openmetrics(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.0.registry);
        let body_end = out.rfind("# EOF").unwrap_or(out.len());
        out.truncate(body_end);
        self.render_runtime(&mut out);
        crate::metrics::process::render(&mut out);
        out.push_str("# EOF\n");
        out
    }

    /// Prometheus text exposition (version 0.0.4): the OpenMetrics text without exemplars,
    /// which that format does not have.
    pub fn render(&self) -> String {
        strip_exemplars(&self.render_openmetrics())
    }

    /// Names the store backend in the commit metrics (`redb`, `postgres`, `fdb`).
    pub fn set_store_backend(&self, backend: &'static str) {
        let _ = self.0.store_backend.set(backend);
        let labels = vec![("backend", backend.to_string())];
        let _ = self.0.commit_duration.get_or_create(&labels);
        let _ = self.0.commit_requests.get_or_create(&labels);
    }

    /// The store backend's name (`unknown` before [`Metrics::set_store_backend`]).
    pub fn store_backend(&self) -> &'static str {
        self.0.store_backend.get().copied().unwrap_or("unknown")
    }

    /// Reports a tokio runtime's workers and tasks as `tether_runtime_*{runtime=name}`.
    pub fn watch_runtime(&self, name: &'static str, handle: tokio::runtime::Handle) {
        self.0
            .runtimes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push((name, handle));
    }

    fn render_runtime(&self, out: &mut String) {
        use std::fmt::Write;
        let runtimes = self
            .0
            .runtimes
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if runtimes.is_empty() {
            return;
        }
        let gauges: [(&str, &str, RuntimeGauge); 3] = [
            (
                "tether_runtime_workers",
                "Worker threads of a tokio runtime",
                |m| m.num_workers(),
            ),
            (
                "tether_runtime_alive_tasks",
                "Tasks alive on a tokio runtime",
                |m| m.num_alive_tasks(),
            ),
            (
                "tether_runtime_global_queue_depth",
                "Tasks waiting in a tokio runtime's global queue",
                |m| m.global_queue_depth(),
            ),
        ];
        for (name, help, read) in gauges {
            let _ = writeln!(out, "# HELP {name} {help}.\n# TYPE {name} gauge");
            for (runtime, handle) in runtimes.iter() {
                let _ = writeln!(
                    out,
                    "{name}{{runtime=\"{runtime}\"}} {}",
                    read(&handle.metrics())
                );
            }
        }
    }

    /// One answered device API request. `trace_id` (of a sampled trace) becomes the
    /// exemplar of its latency bucket.
    pub(crate) fn http_request(
        &self,
        route: Cow<'static, str>,
        method: &'static str,
        status: u16,
        elapsed: Duration,
        trace_id: Option<opentelemetry::trace::TraceId>,
    ) {
        let mut labels = MethodRouteStatus {
            method,
            route,
            status,
        };
        self.0.request_duration.get_or_create(&labels).observe(
            elapsed.as_secs_f64(),
            trace_id.map(|t| vec![("trace_id", t.to_string())]),
            None,
        );
        self.0
            .http_requests
            .get_or_create(&RouteStatus {
                route: std::mem::take(&mut labels.route),
                status,
            })
            .inc();
    }

    /// A request refused with API error `code` on `route`: counted as an authentication
    /// failure or a rate limit when it is one.
    pub(crate) fn request_refused(&self, route: &str, code: &'static str) {
        match code {
            "unauthorized" | "default_credentials_not_allowed" | "forbidden" => {
                self.0
                    .auth_failures
                    .get_or_create(&vec![("reason", code.to_string())])
                    .inc();
            }
            "rate_limited" => {
                self.0
                    .rate_limited
                    .get_or_create(&vec![("route", route.to_string())])
                    .inc();
            }
            _ => {}
        }
    }

    /// A held subscription ended: `outcome` is `changed`, `empty` or `cancelled`.
    pub(crate) fn subscription_ended(&self, outcome: &'static str, held: Duration) {
        self.0
            .subscribe_hold
            .get_or_create(&vec![("outcome", outcome.to_string())])
            .observe(held.as_secs_f64());
    }

    /// A notification was written `latency` after its change was committed.
    pub(crate) fn notify_latency(&self, latency: Duration) {
        self.0.notify_latency.observe(latency.as_secs_f64());
    }

    /// A message of kind `op` waited `waited` in an actor's mailbox.
    pub(crate) fn mailbox_wait(&self, op: &'static str, waited: Duration) {
        self.0
            .mailbox_wait
            .get_or_create(&vec![("op", op.to_string())])
            .observe(waited.as_secs_f64());
    }

    /// An actor batch of `requests` requests became durable in `took`.
    pub(crate) fn batch_committed(&self, requests: usize, took: Duration) {
        let labels = vec![("backend", self.store_backend().to_string())];
        self.0
            .commit_duration
            .get_or_create(&labels)
            .observe(took.as_secs_f64());
        self.0
            .commit_requests
            .get_or_create(&labels)
            .observe(requests as f64);
    }

    /// A call forwarded to `peer` finished.
    pub(crate) fn forward_latency(
        &self,
        peer: &str,
        op: &'static str,
        result: &'static str,
        took: Duration,
    ) {
        self.0
            .forward_duration
            .get_or_create(&vec![
                ("peer", peer.to_string()),
                ("op", op.to_string()),
                ("result", result.to_string()),
            ])
            .observe(took.as_secs_f64());
    }

    /// A lease was taken (and the set loaded) in `took`; `from_peer` when another node held
    /// it before.
    pub(crate) fn lease_taken(&self, took: Duration, from_peer: bool) {
        self.0.lease_acquire.observe(took.as_secs_f64());
        if from_peer {
            self.0.lease_takeovers.inc();
        }
    }
    pub(crate) fn put_outcome(&self, outcome: &str) {
        self.0
            .put_outcomes
            .get_or_create(&vec![("outcome", outcome.to_string())])
            .inc();
    }
    pub(crate) fn subscriptions_held(&self, delta: i64) {
        self.0.held_subscriptions.inc_by(delta);
    }
    /// Subscriptions held on this node now (`tether_held_subscriptions`).
    pub fn held_subscriptions(&self) -> i64 {
        self.0.held_subscriptions.get()
    }
    pub(crate) fn parked_sets(&self, delta: i64) {
        self.0.parked_sets.inc_by(delta);
    }
    /// Bucket sets parked now (`tether_parked_bucket_sets`).
    pub fn parked(&self) -> i64 {
        self.0.parked_sets.get()
    }
    pub(crate) fn set_activated(&self) {
        self.0.activations.inc();
        self.0.active_sets.inc();
    }
    pub(crate) fn set_stopped(&self, passivated: bool) {
        if passivated {
            self.0.passivations.inc();
        }
        self.0.active_sets.dec();
    }
    pub(crate) fn notified(&self, n: u64) {
        self.0.notifications.inc_by(n);
    }
    pub(crate) fn lease_acquired(&self) {
        self.0.leases_acquired.inc();
        self.0.owned_sets.inc();
    }
    pub(crate) fn lease_released(&self) {
        self.0.owned_sets.dec();
    }
    pub(crate) fn forwarded(&self, op: &'static str, result: &'static str) {
        self.0
            .forwarded
            .get_or_create(&vec![
                ("op", op.to_string()),
                ("result", result.to_string()),
            ])
            .inc();
    }
    pub(crate) fn forwarded_served(&self, op: &'static str) {
        self.0
            .forwarded_served
            .get_or_create(&vec![("op", op.to_string())])
            .inc();
    }
    pub(crate) fn handoff(&self) {
        self.0.handoffs.inc();
    }
    pub(crate) fn cluster_members(&self, n: usize) {
        self.0.cluster_members.set(n as i64);
    }
    /// A request let through on a cached record because the store did not answer:
    /// `credentials` or `scope`.
    pub(crate) fn auth_stale(&self, what: &'static str) {
        self.0
            .auth_stale
            .get_or_create(&vec![("what", what.to_string())])
            .inc();
    }
    /// A blob event (`completed`, `hash_mismatch`, `downloaded`, `deleted`).
    pub(crate) fn blob(&self, event: &'static str) {
        self.0
            .blobs
            .get_or_create(&vec![("event", event.to_string())])
            .inc();
    }
    /// One push wake-up event (`sent`, `collapsed`, `retried`, `failed`, `dropped`).
    pub(crate) fn wakeup(&self, result: &'static str) {
        self.0
            .wakeups
            .get_or_create(&vec![("result", result.to_string())])
            .inc();
    }

    /// A blob event counted `n` times.
    pub(crate) fn blobs(&self, event: &'static str, n: u64) {
        self.0
            .blobs
            .get_or_create(&vec![("event", event.to_string())])
            .inc_by(n);
    }
    /// This node's clock minus the store's, ms.
    pub(crate) fn clock_offset(&self, ms: i64) {
        self.0.clock_offset.set(ms as f64 / 1000.0);
    }
    /// One change of another member in this node's view: `up`, `down` or `left`.
    pub(crate) fn member_change(&self, change: &'static str) {
        self.0
            .member_changes
            .get_or_create(&vec![("change", change.to_string())])
            .inc();
    }
    pub(crate) fn lease_lost(&self) {
        self.0.leases_lost.inc();
    }
    pub(crate) fn store_commit(&self, batch: usize) {
        self.0.store_commits.inc();
        self.0.store_batch.observe(batch as f64);
    }
    /// The redb writer spent `took` on one write transaction.
    pub(crate) fn store_writer_busy(&self, took: Duration) {
        self.0.store_writer_busy.inc_by(took.as_secs_f64());
    }
    pub(crate) fn store_checkpoint(&self) {
        self.0.store_checkpoints.inc();
        self.0.store_wal_bytes.set(0);
    }
    pub(crate) fn store_wal_sync(&self) {
        self.0.store_wal_syncs.inc();
    }
    pub(crate) fn store_wal_bytes(&self, bytes: u64) {
        self.0
            .store_wal_bytes
            .set(i64::try_from(bytes).unwrap_or(i64::MAX));
    }
    pub(crate) fn connections_open(&self, delta: i64) {
        self.0.connections_open.inc_by(delta);
    }
    pub(crate) fn auth_tracked_ids(&self, n: usize) {
        self.0.auth_tracked_ids.set(n as i64);
    }
    pub(crate) fn limited(&self, limit: &'static str) {
        self.0
            .limited
            .get_or_create(&vec![("limit", limit.to_string())])
            .inc();
    }
}

/// Times one held subscription: answered with changes, answered empty, or cancelled
/// (dropped unanswered: the client hung up).
#[derive(Debug)]
pub(crate) struct HoldTimer {
    metrics: Metrics,
    started: std::time::Instant,
    done: bool,
}

impl HoldTimer {
    pub(crate) fn start(metrics: Metrics) -> Self {
        HoldTimer {
            metrics,
            started: std::time::Instant::now(),
            done: false,
        }
    }

    /// The answer is being written at `now_ms`; `newest_change_ms` is the server timestamp
    /// of the newest bucket in it (none: an empty answer). A change's timestamp is taken as
    /// its batch is reconciled, just before the commit, so the notify latency covers the
    /// commit itself; across nodes it includes their clock offset (clamped at zero).
    pub(crate) fn answered(mut self, newest_change_ms: Option<u64>, now_ms: u64) {
        self.done = true;
        let held = self.started.elapsed();
        match newest_change_ms {
            Some(ts) => {
                self.metrics.subscription_ended("changed", held);
                self.metrics
                    .notify_latency(Duration::from_millis(now_ms.saturating_sub(ts)));
            }
            None => self.metrics.subscription_ended("empty", held),
        }
    }
}

impl Drop for HoldTimer {
    fn drop(&mut self) {
        if !self.done {
            self.metrics
                .subscription_ended("cancelled", self.started.elapsed());
        }
    }
}

/// The Prometheus text form of an OpenMetrics exposition: exemplars (` # {…} v`) dropped.
fn strip_exemplars(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        let line = match (line.starts_with('#'), line.find(" # {")) {
            (false, Some(i)) => &line[..i],
            _ => line,
        };
        out.push_str(line);
        out.push('\n');
    }
    out
}

mod process;

/// Sum of the samples of metric `name` (any labels) in Prometheus text; `None` when the
/// text has none. For tools and tests that read another node's `/metrics`.
pub fn sample_sum(text: &str, name: &str) -> Option<f64> {
    let mut found = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        let rest = if let Some(r) = rest.strip_prefix('{') {
            match r.find('}') {
                Some(i) => &r[i + 1..],
                None => continue,
            }
        } else if rest.starts_with(' ') {
            rest
        } else {
            continue; // a longer metric name sharing the prefix
        };
        if let Some(v) = rest
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<f64>().ok())
        {
            *found.get_or_insert(0.0) += v;
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::sample_sum;

    #[test]
    fn sample_sum_adds_every_label_set_and_ignores_longer_names() {
        let text = "# HELP x\nx_total{op=\"get\"} 2\nx_total{op=\"put\"} 3\nx_total_more 9\ny 1\n";
        assert_eq!(sample_sum(text, "x_total"), Some(5.0));
        assert_eq!(sample_sum(text, "y"), Some(1.0));
        assert_eq!(sample_sum(text, "z"), None);
    }
}
