//! Prometheus metrics (`GET /metrics`).

use std::sync::Arc;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

type Labels = Vec<(&'static str, String)>;

#[derive(Debug)]
struct Inner {
    registry: Registry,
    http_requests: Family<Labels, Counter>,
    put_outcomes: Family<Labels, Counter>,
    held_subscriptions: Gauge,
    active_sets: Gauge,
    activations: Counter,
    passivations: Counter,
    notifications: Counter,
    store_commits: Counter,
    store_batch: Histogram,
    leases_acquired: Counter,
    leases_lost: Counter,
    owned_sets: Gauge,
    forwarded: Family<Labels, Counter>,
    forwarded_served: Family<Labels, Counter>,
    handoffs: Counter,
    cluster_members: Gauge,
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
        let http_requests = Family::<Labels, Counter>::default();
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
            "Store write transactions (one fsync each)",
            store_commits.clone(),
        );
        let store_batch = Histogram::new(exponential_buckets(1.0, 2.0, 11));
        registry.register(
            "store_commit_batch_size",
            "Requests folded into one store transaction",
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
            auth_tracked_ids,
            connections_open,
            limited,
            owned_sets,
            forwarded,
            forwarded_served,
            handoffs,
            cluster_members,
            leases_acquired,
            leases_lost,
            registry,
            http_requests,
            put_outcomes,
            held_subscriptions,
            active_sets,
            activations,
            passivations,
            notifications,
            store_commits,
            store_batch,
        }))
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.0.registry);
        out
    }

    pub(crate) fn http_request(&self, route: &str, status: u16) {
        self.0
            .http_requests
            .get_or_create(&vec![
                ("route", route.to_string()),
                ("status", status.to_string()),
            ])
            .inc();
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
    pub(crate) fn lease_lost(&self) {
        self.0.leases_lost.inc();
    }
    pub(crate) fn store_commit(&self, batch: usize) {
        self.0.store_commits.inc();
        self.0.store_batch.observe(batch as f64);
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
