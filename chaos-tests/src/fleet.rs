//! The `tether-sim` fleet inside a chaos run (issue 12): simulated devices registering,
//! holding subscribes, sleeping, losing connections and answers, with a companion and an
//! app writing to each — all through the load balancer, for the scenario's whole fault
//! phase, next to the hot-bucket clients. Its own checker ([`tether_sim::checker`]: versions
//! never go backwards, every acknowledged change reaches its awake devices, the final
//! audit finds every acknowledged write and none applied twice) is part of the verdict.
//!
//! The fleet's result is not in `history.jsonl` (the fleet checks itself as it runs, with
//! its own clocks): it is summarized in `fleet.json` next to the history, which `tether-chaos
//! check` reads back when present ([`read`]).
//!
//! # When a change is late
//!
//! A fault delays notifications by design (the subscriber's node is killed or frozen until
//! failure detection moves its sets; a partition or a store outage keeps the owner from
//! committing), and the delivery check must not count that, yet must still catch a
//! notification lost without a fault (the planted `drop-notification`). The rule: a change
//! must reach each awake device [`NOTIFY_DEADLINE`] after it was acknowledged; if a fault
//! began before that deadline ran out, the deadline is suspended while the fault lasts and
//! restarts [`FAULT_RECOVERY`] after it healed (the 9.6 s failure-detection bound, the ring
//! settling after a restarted node rejoins, the device's resubscribe). The nemesis marks
//! every fault's start and end ([`crate::history::SharedRecorder::with_fault_windows`]).
//! A lost notification shows as a change delivered only at the device's next subscribe
//! timeout ([`SUBSCRIBE_TIMEOUT_MS`], well past the deadline) or its next wake-up.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tether_proto::credentials::Credentials;
use tether_sim::checker::{FaultWindows, Violation};
use tether_sim::fleet::{Phase, SimConfig};
use tether_sim::report::Report;
use tokio::sync::{mpsc, watch};

use crate::error::ChaosError;

/// The fleet's serials: `FLEET000000`, `FLEET000001`, … ([`serial`]).
pub const SERIAL_PREFIX: &str = "FLEET";
/// The file next to `history.jsonl` that holds the fleet's summary.
pub const FILE: &str = "fleet.json";
/// An acknowledged change must reach each awake device within this (outside faults).
pub const NOTIFY_DEADLINE: Duration = Duration::from_secs(5);
/// After a fault healed, how long until a change's deadline clock restarts.
pub const FAULT_RECOVERY: Duration = Duration::from_secs(15);
/// The devices' subscribe `timeout_ms`: well past the deadline, so a lost notification
/// (delivered only when the subscribe times out and the device resubscribes) is late.
pub const SUBSCRIBE_TIMEOUT_MS: u64 = 20_000;
/// Upper bound of `--devices`.
pub const MAX_DEVICES: usize = 5_000;
/// App users the fleet's devices are paired with (created in the store at start).
pub const APP_USERS: [&str; 2] = ["fleet-app-0", "fleet-app-1"];
/// Violation kinds, in report order (every one is counted, zero or not).
pub const KINDS: [&str; 5] = [
    "version_regression",
    "missed_notification",
    "lost_write",
    "double_application",
    "acked_write_missing",
];
/// Violations quoted in the summary.
const EXAMPLES: usize = 10;

/// Device `i`'s serial (the simulator's `<prefix><index, 6 digits>`).
pub fn serial(i: usize) -> String {
    format!("{SERIAL_PREFIX}{i:06}")
}

/// The fleet's configuration for one run.
#[derive(Debug, Clone)]
pub struct FleetPlan {
    pub devices: usize,
    /// The load balancer's URL (the devices' only entry point).
    pub lb: String,
    pub mfg_key: Vec<u8>,
    pub key_id: String,
    /// Every device's assigned credentials, registered before the run: the devices reach
    /// the cluster through HAProxy over plain HTTP from outside the nodes' hosts, where a
    /// node refuses default credentials (TLS or loopback only), so they are provisioned
    /// the way the hot sets are (from inside a node's namespace) and come up as after a
    /// reboot.
    pub provisioned: Vec<Credentials>,
    pub users: Vec<Credentials>,
    pub seed: u64,
    /// Upper bound of the load phase (the runner ends it with `stop_load`).
    pub max_load: Duration,
}

impl FleetPlan {
    /// The simulator's configuration: moderate rates (a device, its companion and its app
    /// each write every few seconds), sleep cycles, flaky links and lost PUT answers, the
    /// audit on, and the deadline rule of the module docs.
    pub fn sim_config(
        &self,
        faults: FaultWindows,
        phases: mpsc::UnboundedSender<Phase>,
        stop_load: watch::Receiver<bool>,
    ) -> SimConfig {
        let mut cfg = SimConfig::new(&self.lb, self.mfg_key.clone(), &self.key_id);
        cfg.devices = self.devices;
        cfg.serial_prefix = SERIAL_PREFIX.into();
        cfg.provisioned = self.provisioned.clone();
        cfg.users = self.users.clone();
        cfg.update_rate = 0.2;
        cfg.companion_rate = 0.2;
        cfg.app_rate = 0.1;
        cfg.sleep_every = Some(Duration::from_secs(30));
        cfg.sleep_for = Duration::from_secs(3);
        cfg.flaky_per_min = 0.5;
        cfg.drop_answers = 0.02;
        cfg.duration = self.max_load;
        // 20 device starts per second.
        cfg.ramp = Duration::from_millis(50 * self.devices as u64);
        cfg.setup_timeout = Duration::from_secs(60);
        cfg.audit = true;
        cfg.phases = Some(phases);
        cfg.notify_deadline = NOTIFY_DEADLINE;
        cfg.faults = Some(faults);
        cfg.fault_recovery = FAULT_RECOVERY;
        cfg.subscribe_timeout_ms = SUBSCRIBE_TIMEOUT_MS;
        cfg.request_timeout = Duration::from_secs(10);
        cfg.stop_load = Some(stop_load);
        cfg.progress = false;
        cfg.seed = self.seed;
        cfg
    }
}

/// What the fleet saw, as `results.json`, `report.md` and `fleet.json` carry it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FleetSummary {
    pub devices: usize,
    pub registered: u64,
    pub connected: u64,
    pub paired: u64,
    /// Changes the server acknowledged: the devices' own and their companions' and apps'.
    pub updates_acked: u64,
    pub device_updates: u64,
    pub writer_updates: u64,
    /// Companion and app writes the devices confirmed they hold.
    pub deliveries: u64,
    /// Of those, to devices awake the whole time (the latency figures' samples).
    pub live_deliveries: u64,
    /// Update → device latency of the live deliveries, ms.
    pub delivery_p50_ms: f64,
    pub delivery_p99_ms: f64,
    pub delivery_max_ms: f64,
    pub sleeps: u64,
    pub dropped_connections: u64,
    pub answers_dropped: u64,
    pub retried_writes: u64,
    /// Devices whose final state the audit read (`None`: the fleet ran without audit).
    pub audited: Option<u64>,
    /// Acknowledged writes the op-id audit found in their buckets' histories.
    pub ops_checked: u64,
    /// The delivery deadline and the recovery after a fault (module docs), ms.
    pub notify_deadline_ms: u64,
    pub fault_recovery_ms: u64,
    /// Every kind of [`KINDS`], with its count.
    pub violations: BTreeMap<String, u64>,
    /// The first violations, as the simulator words them.
    pub examples: Vec<String>,
    /// Errors the devices and writers met (5xx while ownership moved, timeouts), by kind:
    /// expected under faults, never a verdict.
    pub errors: BTreeMap<String, u64>,
    /// No violation of any kind.
    pub passed: bool,
}

/// The [`KINDS`] name of a violation.
pub fn kind_of(v: &Violation) -> &'static str {
    match v {
        Violation::VersionRegression { .. } => KINDS[0],
        Violation::MissedNotification { .. } => KINDS[1],
        Violation::LostWrite { .. } => KINDS[2],
        Violation::DoubleApplication { .. } => KINDS[3],
        Violation::AckedWriteMissing { .. } => KINDS[4],
    }
}

impl FleetSummary {
    /// Summarizes a simulator report.
    pub fn of(r: &Report, notify_deadline: Duration, fault_recovery: Duration) -> Self {
        let mut violations: BTreeMap<String, u64> =
            KINDS.iter().map(|k| ((*k).to_string(), 0)).collect();
        for v in &r.violations {
            *violations.entry(kind_of(v).to_string()).or_default() += 1;
        }
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        FleetSummary {
            devices: r.devices,
            registered: r.registered,
            connected: r.connected,
            paired: r.paired,
            updates_acked: r.device_updates + r.writer_updates,
            device_updates: r.device_updates,
            writer_updates: r.writer_updates,
            deliveries: r.deliveries,
            live_deliveries: r.notify_latency.count,
            delivery_p50_ms: r.notify_latency.p50_ms,
            delivery_p99_ms: r.notify_latency.p99_ms,
            delivery_max_ms: r.notify_latency.max_ms,
            sleeps: r.sleeps,
            dropped_connections: r.dropped_connections,
            answers_dropped: r.answers_dropped,
            retried_writes: r.retried_writes,
            audited: r.audited,
            ops_checked: r.op_audit.map_or(0, |a| a.ops_checked),
            notify_deadline_ms: ms(notify_deadline),
            fault_recovery_ms: ms(fault_recovery),
            violations,
            examples: r
                .violations
                .iter()
                .take(EXAMPLES)
                .map(ToString::to_string)
                .collect(),
            errors: r.errors.clone(),
            passed: r.violations.is_empty(),
        }
    }

    /// Violations of every kind.
    pub fn violation_count(&self) -> u64 {
        self.violations.values().sum()
    }

    /// One line for the console.
    pub fn line(&self) -> String {
        let failing: Vec<String> = self
            .violations
            .iter()
            .filter(|(_, n)| **n > 0)
            .map(|(k, n)| format!("{k} {n}"))
            .collect();
        format!(
            "fleet: {} devices ({} connected, {} audited), {} updates acknowledged, {} deliveries \
             (live p50 {:.1} ms, p99 {:.1} ms); violations: {}",
            self.devices,
            self.connected,
            self.audited.map_or("-".into(), |n| n.to_string()),
            self.updates_acked,
            self.deliveries,
            self.delivery_p50_ms,
            self.delivery_p99_ms,
            if failing.is_empty() {
                "none".to_string()
            } else {
                failing.join(", ")
            }
        )
    }
}

/// Writes `summary` as `dir/fleet.json`.
pub fn write(dir: &Path, summary: &FleetSummary) -> Result<(), ChaosError> {
    let path = dir.join(FILE);
    let text = serde_json::to_string_pretty(summary)
        .map_err(|e| ChaosError::io(&path, std::io::Error::other(e)))?;
    std::fs::write(&path, text).map_err(|e| ChaosError::io(&path, e))
}

/// The `fleet.json` next to `history` (`None`: the run had no fleet).
pub fn read(history: &Path) -> Result<Option<FleetSummary>, ChaosError> {
    let path: PathBuf = history
        .parent()
        .map_or_else(|| PathBuf::from(FILE), |d| d.join(FILE));
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(ChaosError::io(&path, e)),
    };
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| ChaosError::History(format!("{}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_violation_kind_is_counted_and_fails_the_summary() {
        let mut r = Report {
            devices: 3,
            device_updates: 5,
            writer_updates: 7,
            ..Report::default()
        };
        let clean = FleetSummary::of(&r, NOTIFY_DEADLINE, FAULT_RECOVERY);
        assert!(clean.passed);
        assert_eq!(clean.updates_acked, 12);
        assert_eq!(clean.violations.len(), KINDS.len());
        assert_eq!(clean.violation_count(), 0);
        r.violations = vec![
            Violation::MissedNotification {
                device: "FLEET000001".into(),
                bucket: "shared.FLEET000001".into(),
                writer: "mode".into(),
                seq: 4,
                waited_ms: 5_100,
            },
            Violation::LostWrite {
                device: "FLEET000002".into(),
                bucket: "shared.FLEET000002".into(),
                writer: "mode".into(),
                seq: 9,
                found: Some(8),
            },
        ];
        let s = FleetSummary::of(&r, NOTIFY_DEADLINE, FAULT_RECOVERY);
        assert!(!s.passed);
        assert_eq!(s.violations["missed_notification"], 1);
        assert_eq!(s.violations["lost_write"], 1);
        assert_eq!(s.violation_count(), 2);
        assert!(s.examples[0].contains("MISSED NOTIFICATION"), "{s:?}");
        assert!(s.line().contains("missed_notification 1"), "{}", s.line());
    }
}
