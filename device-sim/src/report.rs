//! The end-of-run summary of `tether-sim`, printed for people or as JSON.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::checker::{OpAudit, Violation};

/// Percentiles of a latency histogram recorded in microseconds, reported in milliseconds.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct LatencySummary {
    /// Samples recorded.
    pub count: u64,
    /// Mean.
    pub mean_ms: f64,
    /// Median.
    pub p50_ms: f64,
    /// 95th percentile.
    pub p95_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// Largest sample.
    pub max_ms: f64,
}

impl LatencySummary {
    /// Summarizes a histogram of microseconds.
    pub fn of(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return LatencySummary::default();
        }
        let ms = |us: u64| us as f64 / 1000.0;
        LatencySummary {
            count: h.len(),
            mean_ms: h.mean() / 1000.0,
            p50_ms: ms(h.value_at_quantile(0.50)),
            p95_ms: ms(h.value_at_quantile(0.95)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            max_ms: ms(h.max()),
        }
    }
}

/// A histogram for microsecond latencies from 1 µs to 1 h, 3 significant digits.
pub fn latency_histogram() -> Histogram<u64> {
    // Constant, valid bounds: `new_with_bounds` only fails on invalid ones.
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds")
}

/// What one `tether-sim` run saw.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    /// Devices simulated.
    pub devices: usize,
    /// Devices that registered (received assigned credentials and their bucket ids).
    pub registered: u64,
    /// Devices that got as far as holding a subscription.
    pub connected: u64,
    /// Devices paired with an app.
    pub paired: u64,
    /// Wall time of the setup phase (registering, subscribing, pairing), seconds.
    pub setup_s: f64,
    /// Wall time of the load phase, seconds.
    pub duration_s: f64,
    /// Changes devices made to their own buckets that the server acknowledged.
    pub device_updates: u64,
    /// Writes companions and apps made to device buckets that the server acknowledged.
    pub writer_updates: u64,
    /// Acknowledged updates of both kinds per second of the load phase.
    pub updates_per_s: f64,
    /// Writes by other clients that the device confirmed it holds.
    pub deliveries: u64,
    /// Update → notify latency: from a writer sending a write to the device holding it,
    /// for devices awake the whole time.
    pub notify_latency: LatencySummary,
    /// Deliveries to devices that slept in between (catch-up, not counted above).
    pub catch_up_deliveries: u64,
    /// From sending a write to the device holding it, for those catch-ups: how long a
    /// sleeping device waited for a change (its next wake, by push or its own schedule).
    pub catch_up_latency: LatencySummary,
    /// Sleep cycles (disconnect, offline changes, reconnect with versions).
    pub sleeps: u64,
    /// Sleeps ended early by a push wake-up (the node's `--push-webhook` reached the
    /// simulator's gateway, `--push-listen`).
    pub push_wakes: u64,
    /// Wake-ups the gateway received for a device that was awake already (it had synced).
    pub push_while_awake: u64,
    /// Requests to the gateway whose signature was not the body's under the push secret.
    pub push_unsigned: u64,
    /// Connections dropped on purpose (flaky links).
    pub dropped_connections: u64,
    /// PUT answers received and then dropped on purpose (the server had acted; the
    /// writer retried with the same op id).
    pub answers_dropped: u64,
    /// Writes sent more than once (same op id) because an answer was lost.
    pub retried_writes: u64,
    /// Answers the server gave from its memory of an earlier attempt (`replayed`).
    pub replayed_answers: u64,
    /// Answers that arrived older than the device's copy but not older than what their
    /// request held (its own PUT's answer, or another answer, came first on another
    /// connection): reordered connections, answered requests the device rightly ignores —
    /// not errors, not violations.
    pub late_answers: u64,
    /// The op-id audit of the histories (with `audit`): how many writes it vouched for.
    pub op_audit: Option<OpAudit>,
    /// Writes applied more than once (op ids in more than one change): must be 0.
    pub double_applications: u64,
    /// Errors by kind (`<request> <status>`, `<request> transport`, …).
    pub errors: BTreeMap<String, u64>,
    /// Devices whose final state the audit read and checked (`None`: no audit asked for;
    /// devices without acknowledged writes count as checked).
    pub audited: Option<u64>,
    /// Everything the checker caught.
    pub violations: Vec<Violation>,
}

impl Report {
    /// Whether the run saw no violation.
    pub fn ok(&self) -> bool {
        self.violations.is_empty()
    }

    /// The summary for people.
    pub fn human(&self) -> String {
        let mut s = String::new();
        let l = &self.notify_latency;
        let _ = writeln!(
            s,
            "devices: {} simulated, {} registered, {} connected, {} paired with apps",
            self.devices, self.registered, self.connected, self.paired
        );
        let _ = writeln!(
            s,
            "setup (register, subscribe, pair): {:.1} s",
            self.setup_s
        );
        let _ = writeln!(
            s,
            "updates: {} by devices + {} by companions/apps in {:.1} s = {:.1} updates/s",
            self.device_updates, self.writer_updates, self.duration_s, self.updates_per_s
        );
        let _ = writeln!(
            s,
            "notify latency ({} live deliveries, {} catch-ups after sleep): p50 {:.1} ms, p95 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            l.count, self.catch_up_deliveries, l.p50_ms, l.p95_ms, l.p99_ms, l.max_ms
        );
        let _ = writeln!(
            s,
            "sleep cycles: {}, connections dropped on purpose: {}, PUT answers dropped after the server acted: {}",
            self.sleeps, self.dropped_connections, self.answers_dropped
        );
        if self.catch_up_deliveries > 0 {
            let c = &self.catch_up_latency;
            let _ = writeln!(
                s,
                "changes waiting for a sleeping device ({}): reached it after p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
                c.count, c.p50_ms, c.p99_ms, c.max_ms
            );
        }
        if self.push_wakes + self.push_while_awake + self.push_unsigned > 0 {
            let _ = writeln!(
                s,
                "push wake-ups: {} sleeps ended by one, {} for a device already awake, {} not validly signed",
                self.push_wakes, self.push_while_awake, self.push_unsigned
            );
        }
        let _ = writeln!(
            s,
            "retries: {} writes resent with their op id, {} answered as replays; answers overtaken on another connection (ignored): {}",
            self.retried_writes, self.replayed_answers, self.late_answers
        );
        if self.errors.is_empty() {
            let _ = writeln!(s, "errors: none");
        } else {
            let _ = writeln!(s, "errors by kind:");
            for (k, n) in &self.errors {
                let _ = writeln!(s, "  {k}: {n}");
            }
        }
        if let Some(n) = self.audited {
            let _ = writeln!(s, "final-state audit: {n} of {} devices read", self.devices);
        }
        if let Some(a) = &self.op_audit {
            let _ = writeln!(
                s,
                "history audit: {} op ids in the histories, {} acknowledged writes checked ({} of them retried): {} double applications",
                a.ops_in_history, a.ops_checked, a.retried_checked, self.double_applications
            );
        }
        if self.violations.is_empty() {
            let audit = if self.audited.is_some() {
                ", every acknowledged write in the final state, no write applied twice"
            } else {
                ""
            };
            let _ = writeln!(
                s,
                "checks: versions monotonic, every change delivered{audit}: OK"
            );
        } else {
            let _ = writeln!(s, "VIOLATIONS: {}", self.violations.len());
            for v in self.violations.iter().take(50) {
                let _ = writeln!(s, "  {v}");
            }
            if self.violations.len() > 50 {
                let _ = writeln!(s, "  … and {} more", self.violations.len() - 50);
            }
        }
        s
    }
}
