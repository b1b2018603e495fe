//! What the simulator checks, per device:
//!
//! 1. **Versions never go backwards.** [`tether_proto::client::DeviceClient`] never applies
//!    an older version than the one it holds and reports it as
//!    `Event::VersionRegression`. It is a [`Violation::VersionRegression`] when the answer
//!    is older than what the device held *when it sent the request*: the server answered
//!    with something older than the device had already been given (a stale read). An
//!    answer older only than a version the device learnt while the request was out — its
//!    own next PUT, acknowledged on another connection and delivered first — is not: it
//!    was current when the server made it, and connections are not ordered with each
//!    other (counted in the report's errors as reordered answers).
//! 2. **Every change reaches the device.** Every write another client (a companion or an
//!    app) makes to one of the device's buckets sets that writer's own field to a
//!    sequence number that only grows (`{"<writer>": seq}`). Fields are merged per field,
//!    so once the device holds a version whose `<writer>` field is `s`, every write of that
//!    writer up to `s` has reached it (a later write may legitimately hide an earlier one:
//!    notifications coalesce). A write the server acknowledged that the device has not
//!    seen `deadline` after the acknowledgement — counted from when the device last woke
//!    up, since a sleeping device cannot be notified — is a
//!    [`Violation::MissedNotification`]. In a chaos run the deadline is also suspended by
//!    the nemesis's faults ([`FaultWindows`]).
//!
//! 3. **Every acknowledged write is in the final state** (the audit, when asked for).
//!    After the load, the device's buckets are read once more; for each writer (the
//!    device's own `temperature` field included) the stored field must hold the highest
//!    sequence number the server acknowledged, or a higher one (a later write, acknowledged
//!    or still in flight when the run ended, superseded it). Anything lower or absent is a
//!    [`Violation::LostWrite`]: the server said yes and then forgot.
//!
//! 4. **No write is applied twice** (the audit). Every write carries an op id and is
//!    retried with the same one when its answer is lost (a timeout, a dropped connection,
//!    a 5xx, or an answer the flaky link drops after the server acted). After the run,
//!    each audited bucket's history (`GET /v1/buckets/{id}/history`) is read in full: an
//!    op id this device's writers sent that appears in more than one change is a
//!    [`Violation::DoubleApplication`]; an acknowledged (applied or merged) op id missing
//!    from a history that still reaches back to its version is a
//!    [`Violation::AckedWriteMissing`].
//!
//! A write is registered ([`DeviceTrack::intend`]) before it is sent, because its
//! notification can overtake its acknowledgement. Writes whose outcome stays unknown
//! (the writer gave up after transport errors) are [`DeviceTrack::abandon`]ed: there is
//! nothing to demand of them (but they may still not be applied twice).

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use serde::Serialize;
use tether_proto::api::{ChangeDoc, UpdateOutcome};
use tether_proto::{Fields, Value};

/// Something the simulator saw that the protocol forbids.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Violation {
    /// The server sent a device an older version of a bucket than one it had sent before.
    VersionRegression {
        /// The device serial.
        device: String,
        /// The bucket.
        bucket: String,
        /// The version the device held.
        held: u64,
        /// The older version it was sent.
        received: u64,
    },
    /// A write acknowledged by the server never reached a device holding that bucket.
    MissedNotification {
        /// The device serial.
        device: String,
        /// The bucket written.
        bucket: String,
        /// The writer's field (its identity).
        writer: String,
        /// The writer's sequence number of the lost write.
        seq: u64,
        /// How long the device had been awake and subscribed since the acknowledgement.
        waited_ms: u64,
    },
    /// A write acknowledged by the server is missing from the final state: the field holds
    /// an older sequence number of the same writer, or nothing.
    LostWrite {
        /// The device serial.
        device: String,
        /// The bucket written.
        bucket: String,
        /// The writer's field (its identity).
        writer: String,
        /// The highest sequence number of the writer the server acknowledged.
        seq: u64,
        /// What the final state holds in that field (`None`: absent or not a number).
        found: Option<u64>,
    },
    /// A write (one op id) appears more than once in its bucket's history: a retry was
    /// applied again.
    DoubleApplication {
        /// The device serial.
        device: String,
        /// The bucket written.
        bucket: String,
        /// The write's op id.
        op_id: String,
        /// The versions of the changes that carry it.
        versions: Vec<u64>,
    },
    /// A write acknowledged as applied or merged is not in its bucket's history, though
    /// the history still reaches back to the version it was acknowledged with.
    AckedWriteMissing {
        /// The device serial.
        device: String,
        /// The bucket written.
        bucket: String,
        /// The write's op id.
        op_id: String,
        /// The version its answer carried.
        version: u64,
    },
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Violation::VersionRegression {
                device,
                bucket,
                held,
                received,
            } => write!(
                f,
                "VERSION REGRESSION: device {device} held {bucket} v{held} and was sent v{received}"
            ),
            Violation::MissedNotification {
                device,
                bucket,
                writer,
                seq,
                waited_ms,
            } => write!(
                f,
                "MISSED NOTIFICATION: device {device} never saw write #{seq} of {writer} to {bucket} \
                 ({waited_ms} ms after it was acknowledged)"
            ),
            Violation::LostWrite {
                device,
                bucket,
                writer,
                seq,
                found,
            } => {
                let found = found.map_or_else(|| "nothing".to_string(), |f| format!("#{f}"));
                write!(
                    f,
                    "LOST WRITE: device {device}'s {bucket} holds {found} of {writer}, \
                     but write #{seq} was acknowledged"
                )
            }
            Violation::DoubleApplication {
                device,
                bucket,
                op_id,
                versions,
            } => write!(
                f,
                "DOUBLE APPLICATION: device {device}'s {bucket} applied op {op_id} {} times \
                 (versions {versions:?})",
                versions.len()
            ),
            Violation::AckedWriteMissing {
                device,
                bucket,
                op_id,
                version,
            } => write!(
                f,
                "ACKNOWLEDGED WRITE MISSING: op {op_id} to device {device}'s {bucket} was \
                 acknowledged at v{version} but is not in the bucket's history"
            ),
        }
    }
}

/// One fault of a chaos run as the fleet saw it: when it began, and when it healed
/// (`None`: still active).
pub type FaultSpan = (Instant, Option<Instant>);

/// When the faults of a chaos run were active, shared between the nemesis (which opens
/// and heals them) and the fleet's sweeper (which reads them).
///
/// A fault (a node killed or frozen for longer than failure detection, a partition, the
/// store down) delays notifications by design: the subscriber's node is gone, or the
/// set's owner cannot commit, until the cluster has moved on. The delivery check must not
/// count that as a lost notification, and must still catch one lost without a fault. So
/// the deadline of a change is suspended like a sleeping device's: a change that has not
/// reached its device `deadline` after its acknowledgement is a violation unless a fault
/// began before that deadline ran out; then its clock restarts `recovery` after the fault
/// healed (recovery: failure detection, the ring settling, the device's resubscribe) and
/// it must arrive within `deadline` of that. Faults that overlap or nest (a stall inside
/// a latency window, links clogged one by one) count as one span from the first start
/// to the last heal.
#[derive(Debug, Clone, Default)]
pub struct FaultWindows {
    inner: std::sync::Arc<std::sync::Mutex<(u32, Vec<FaultSpan>)>>,
}

impl FaultWindows {
    fn lock(&self) -> std::sync::MutexGuard<'_, (u32, Vec<FaultSpan>)> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A fault began at `now`.
    pub fn begin(&self, now: Instant) {
        let mut g = self.lock();
        if g.0 == 0 {
            g.1.push((now, None));
        }
        g.0 += 1;
    }

    /// A fault healed at `now` (the span closes when the last active one heals).
    pub fn heal(&self, now: Instant) {
        let mut g = self.lock();
        if g.0 == 0 {
            return;
        }
        g.0 -= 1;
        if g.0 == 0 {
            if let Some(last) = g.1.last_mut() {
                last.1 = Some(now);
            }
        }
    }

    /// Every fault healed at `now` (the run brought back whatever was left down).
    pub fn heal_all(&self, now: Instant) {
        let mut g = self.lock();
        if g.0 > 0 {
            g.0 = 0;
            if let Some(last) = g.1.last_mut() {
                last.1 = Some(now);
            }
        }
    }

    /// The spans so far, oldest first.
    pub fn spans(&self) -> Vec<FaultSpan> {
        self.lock().1.clone()
    }
}

/// When the deadline clock of a change that started waiting at `from` runs from: `from`,
/// or `recovery` after the heal of the last fault in `faults` (oldest first) that began
/// before the deadline ran out; `None` while such a fault is active.
pub fn deadline_start(
    from: Instant,
    deadline: Duration,
    faults: &[FaultSpan],
    recovery: Duration,
) -> Option<Instant> {
    let mut from = from;
    for &(start, healed) in faults {
        if start > from + deadline {
            break;
        }
        let restart = healed? + recovery;
        from = from.max(restart);
    }
    Some(from)
}

/// One outstanding write of one writer.
#[derive(Debug, Clone, Copy)]
struct Pending {
    sent: Instant,
    acked: Option<Instant>,
}

/// The writes of one writer to one bucket.
#[derive(Debug, Default)]
struct WriterTrack {
    /// The highest sequence number the device has held.
    seen: u64,
    pending: BTreeMap<u64, Pending>,
}

/// A delivery the device confirmed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivery {
    /// From sending the write to the device holding it.
    pub latency: Duration,
    /// The device was awake the whole time, so the latency is a notification latency
    /// (not a catch-up after sleep).
    pub live: bool,
}

/// What the checker knows of one op id sent to one of the device's buckets.
#[derive(Debug, Clone, Default)]
struct OpTrack {
    bucket: String,
    /// How many times it was sent (more than once: retried).
    attempts: u32,
    /// The version and outcome it was acknowledged with.
    acked: Option<(u64, UpdateOutcome)>,
    /// One of its answers was a replay.
    replayed: bool,
}

/// Counts of the op-id audit, for the run summary.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct OpAudit {
    /// Op ids found in the histories read.
    pub ops_in_history: u64,
    /// Sent op ids the histories could vouch for (history reached back far enough).
    pub ops_checked: u64,
    /// Of those, how many were sent more than once.
    pub retried_checked: u64,
}

/// Everything the checker knows about one device's buckets.
#[derive(Debug)]
pub struct DeviceTrack {
    device: String,
    asleep: bool,
    awake_since: Instant,
    writes: HashMap<(String, String), WriterTrack>,
    /// The highest acknowledged sequence number per (bucket, writer), for the audit.
    acked_max: BTreeMap<(String, String), u64>,
    /// Every op id sent to the device's buckets.
    ops: BTreeMap<String, OpTrack>,
}

impl DeviceTrack {
    /// A device that is awake from `now`.
    pub fn new(device: &str, now: Instant) -> Self {
        DeviceTrack {
            device: device.to_string(),
            asleep: false,
            awake_since: now,
            writes: HashMap::new(),
            acked_max: BTreeMap::new(),
            ops: BTreeMap::new(),
        }
    }

    /// `op_id` is being sent to `bucket` (again, when retried).
    pub fn sent_op(&mut self, bucket: &str, op_id: &str) {
        let t = self.ops.entry(op_id.to_string()).or_default();
        t.bucket = bucket.to_string();
        t.attempts = t.attempts.saturating_add(1);
    }

    /// `op_id` was answered with `outcome` at `version` (`replayed`: from the server's
    /// memory of an earlier attempt).
    pub fn acked_op(&mut self, op_id: &str, outcome: UpdateOutcome, version: u64, replayed: bool) {
        if let Some(t) = self.ops.get_mut(op_id) {
            t.acked.get_or_insert((version, outcome));
            t.replayed |= replayed;
        }
    }

    /// Op ids sent more than once, and answers that were replays.
    pub fn retry_counts(&self) -> (u64, u64) {
        let retried = self.ops.values().filter(|t| t.attempts > 1).count() as u64;
        let replayed = self.ops.values().filter(|t| t.replayed).count() as u64;
        (retried, replayed)
    }

    /// Checks `bucket`'s history (every change after version 0 the server still keeps,
    /// oldest kept version `oldest`) against the op ids sent to it: none may be applied
    /// twice, and every acknowledged one the history reaches back to must be there once.
    pub fn audit_history(
        &self,
        bucket: &str,
        oldest: u64,
        changes: &[ChangeDoc],
    ) -> (Vec<Violation>, OpAudit) {
        let mut seen: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
        for c in changes {
            if let Some(op) = &c.op_id {
                seen.entry(op.as_str()).or_default().push(c.version);
            }
        }
        let mut out = Vec::new();
        let mut audit = OpAudit {
            ops_in_history: seen.len() as u64,
            ..OpAudit::default()
        };
        for (op_id, t) in self.ops.iter().filter(|(_, t)| t.bucket == bucket) {
            let versions = seen.get(op_id.as_str()).cloned().unwrap_or_default();
            if versions.len() > 1 {
                out.push(Violation::DoubleApplication {
                    device: self.device.clone(),
                    bucket: bucket.to_string(),
                    op_id: op_id.clone(),
                    versions,
                });
                continue;
            }
            match t.acked {
                // Only an applied write names its own version; a merged answer may name
                // a later one (a replay carries the bucket as it is now).
                Some((v, UpdateOutcome::Applied)) if v >= oldest => {
                    audit.ops_checked += 1;
                    audit.retried_checked += u64::from(t.attempts > 1);
                    if versions != [v] {
                        out.push(Violation::AckedWriteMissing {
                            device: self.device.clone(),
                            bucket: bucket.to_string(),
                            op_id: op_id.clone(),
                            version: v,
                        });
                    }
                }
                Some((v, UpdateOutcome::Merged)) if v >= oldest => {
                    audit.ops_checked += 1;
                    audit.retried_checked += u64::from(t.attempts > 1);
                    if versions.is_empty() {
                        out.push(Violation::AckedWriteMissing {
                            device: self.device.clone(),
                            bucket: bucket.to_string(),
                            op_id: op_id.clone(),
                            version: v,
                        });
                    }
                }
                _ => {}
            }
        }
        (out, audit)
    }

    /// The device serial.
    pub fn device(&self) -> &str {
        &self.device
    }

    /// `writer` is about to send `seq` to `bucket` (again, when retrying: latency counts
    /// from the latest attempt, so a writer's own back-off is not notify latency).
    pub fn intend(&mut self, bucket: &str, writer: &str, seq: u64, now: Instant) {
        let t = self
            .writes
            .entry((bucket.to_string(), writer.to_string()))
            .or_default();
        if seq > t.seen {
            t.pending
                .entry(seq)
                .and_modify(|p| p.sent = now)
                .or_insert(Pending {
                    sent: now,
                    acked: None,
                });
        }
    }

    /// The server acknowledged `seq` (applied or merged): from now on it must arrive, and
    /// it (or a later write of the same writer) must be in the final state.
    pub fn acked(&mut self, bucket: &str, writer: &str, seq: u64, now: Instant) {
        self.acked_final(bucket, writer, seq);
        if let Some(p) = self
            .writes
            .get_mut(&(bucket.to_string(), writer.to_string()))
            .and_then(|t| t.pending.get_mut(&seq))
        {
            p.acked.get_or_insert(now);
        }
    }

    /// The server acknowledged `seq`, which must be in the final state but is not a change
    /// the device is owed a notification of (the device's own write).
    pub fn acked_final(&mut self, bucket: &str, writer: &str, seq: u64) {
        let max = self
            .acked_max
            .entry((bucket.to_string(), writer.to_string()))
            .or_default();
        *max = (*max).max(seq);
    }

    /// The buckets with acknowledged writes or sent op ids: what the audit must read.
    pub fn audited_buckets(&self) -> Vec<String> {
        let mut out: Vec<String> = self.acked_max.keys().map(|(b, _)| b.clone()).collect();
        out.extend(self.ops.values().map(|t| t.bucket.clone()));
        out.sort();
        out.dedup();
        out
    }

    /// Checks the final state of `bucket` (`None`: the server does not have it) against
    /// every acknowledged write to it: each writer's field must hold its highest
    /// acknowledged sequence number or a later one.
    pub fn audit(&self, bucket: &str, value: Option<&Fields>) -> Vec<Violation> {
        self.acked_max
            .iter()
            .filter(|((b, _), _)| b == bucket)
            .filter_map(|((_, writer), &seq)| {
                let found = value.and_then(|v| v.get(writer)).and_then(Value::as_u64);
                (found.is_none_or(|f| f < seq)).then(|| Violation::LostWrite {
                    device: self.device.clone(),
                    bucket: bucket.to_string(),
                    writer: writer.clone(),
                    seq,
                    found,
                })
            })
            .collect()
    }

    /// The outcome of `seq` is unknown (or it was refused): nothing is demanded of it.
    pub fn abandon(&mut self, bucket: &str, writer: &str, seq: u64) {
        if let Some(t) = self
            .writes
            .get_mut(&(bucket.to_string(), writer.to_string()))
        {
            t.pending.remove(&seq);
        }
    }

    /// The device now holds `value` for `bucket`: confirms every tracked write it contains.
    pub fn observe(&mut self, bucket: &str, value: &Fields, now: Instant) -> Vec<Delivery> {
        let mut out = Vec::new();
        for ((b, writer), t) in self.writes.iter_mut() {
            if b != bucket {
                continue;
            }
            let Some(seen) = value.get(writer).and_then(Value::as_u64) else {
                continue;
            };
            if seen <= t.seen {
                continue;
            }
            t.seen = seen;
            let rest = t.pending.split_off(&(seen + 1));
            let delivered = std::mem::replace(&mut t.pending, rest);
            for p in delivered.values() {
                out.push(Delivery {
                    latency: now.saturating_duration_since(p.sent),
                    live: !self.asleep && p.sent >= self.awake_since,
                });
            }
        }
        out
    }

    /// The device went to sleep: no deadline runs until it wakes up.
    pub fn sleep(&mut self) {
        self.asleep = true;
    }

    /// The device woke up at `now`; deadlines restart from here.
    pub fn wake(&mut self, now: Instant) {
        self.asleep = false;
        self.awake_since = now;
    }

    /// Acknowledged writes still not seen `deadline` after acknowledgement (or waking):
    /// reported once each, then forgotten.
    pub fn overdue(&mut self, now: Instant, deadline: Duration) -> Vec<Violation> {
        self.overdue_between_faults(now, deadline, &[], Duration::ZERO)
    }

    /// [`Self::overdue`], with the deadline suspended by `faults` (see [`FaultWindows`]):
    /// a write is overdue only when it was not seen within `deadline` of fault-free time,
    /// its clock restarting `recovery` after each fault that began before its deadline ran
    /// out; never while such a fault is still active.
    pub fn overdue_between_faults(
        &mut self,
        now: Instant,
        deadline: Duration,
        faults: &[FaultSpan],
        recovery: Duration,
    ) -> Vec<Violation> {
        if self.asleep {
            return Vec::new();
        }
        let mut out = Vec::new();
        for ((bucket, writer), t) in self.writes.iter_mut() {
            let awake_since = self.awake_since;
            t.pending.retain(|seq, p| {
                let Some(acked) = p.acked else {
                    return true;
                };
                let Some(from) = deadline_start(acked.max(awake_since), deadline, faults, recovery)
                else {
                    return true;
                };
                let waited = now.saturating_duration_since(from);
                if waited <= deadline {
                    return true;
                }
                out.push(Violation::MissedNotification {
                    device: self.device.clone(),
                    bucket: bucket.clone(),
                    writer: writer.clone(),
                    seq: *seq,
                    waited_ms: u64::try_from(waited.as_millis()).unwrap_or(u64::MAX),
                });
                false
            });
        }
        out
    }

    /// Acknowledged writes not yet seen (whatever their age).
    pub fn outstanding(&self) -> usize {
        self.writes
            .values()
            .map(|t| t.pending.values().filter(|p| p.acked.is_some()).count())
            .sum()
    }

    /// When the latest acknowledged write still unseen was acknowledged.
    pub fn latest_outstanding_ack(&self) -> Option<Instant> {
        self.writes
            .values()
            .flat_map(|t| t.pending.values().filter_map(|p| p.acked))
            .max()
    }

    /// Every acknowledged write still unseen, as violations (the run is over).
    pub fn finish(&mut self, now: Instant) -> Vec<Violation> {
        self.overdue(now, Duration::ZERO)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(pairs: &[(&str, u64)]) -> Fields {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), Value::from(*v)))
            .collect()
    }

    #[test]
    fn a_later_write_confirms_the_earlier_ones() {
        let t0 = Instant::now();
        let mut d = DeviceTrack::new("D1", t0);
        for seq in 1..=3 {
            d.intend("shared.D1", "w", seq, t0);
            d.acked("shared.D1", "w", seq, t0);
        }
        assert_eq!(d.outstanding(), 3);
        let got = d.observe(
            "shared.D1",
            &fields(&[("w", 2)]),
            t0 + Duration::from_millis(5),
        );
        assert_eq!(got.len(), 2);
        assert!(got.iter().all(|g| g.live));
        assert_eq!(d.outstanding(), 1);
        let late = t0 + Duration::from_secs(10);
        let v = d.overdue(late, Duration::from_secs(1));
        assert_eq!(v.len(), 1);
        assert!(matches!(
            &v[0],
            Violation::MissedNotification { seq: 3, .. }
        ));
        assert_eq!(d.outstanding(), 0);
    }

    #[test]
    fn a_notification_may_overtake_its_ack() {
        let t0 = Instant::now();
        let mut d = DeviceTrack::new("D1", t0);
        d.intend("shared.D1", "w", 1, t0);
        assert_eq!(d.observe("shared.D1", &fields(&[("w", 1)]), t0).len(), 1);
        d.acked("shared.D1", "w", 1, t0);
        assert_eq!(d.outstanding(), 0);
        assert!(d.finish(t0 + Duration::from_secs(60)).is_empty());
    }

    #[test]
    fn sleep_suspends_deadlines_and_marks_catch_up() {
        let t0 = Instant::now();
        let mut d = DeviceTrack::new("D1", t0);
        d.sleep();
        d.intend("shared.D1", "w", 1, t0);
        d.acked("shared.D1", "w", 1, t0);
        let t1 = t0 + Duration::from_secs(30);
        assert!(d.overdue(t1, Duration::from_secs(1)).is_empty());
        d.wake(t1);
        assert!(d
            .overdue(t1 + Duration::from_millis(500), Duration::from_secs(1))
            .is_empty());
        let got = d.observe("shared.D1", &fields(&[("w", 1)]), t1);
        assert_eq!(got.len(), 1);
        assert!(!got[0].live, "a write sent while asleep is a catch-up");
    }

    #[test]
    fn a_fault_suspends_the_deadline_until_recovery_after_it_healed() {
        let t0 = Instant::now();
        let s = |n: u64| t0 + Duration::from_secs(n);
        let deadline = Duration::from_secs(5);
        let recovery = Duration::from_secs(10);
        let faults = FaultWindows::default();
        let mut d = DeviceTrack::new("D1", t0);
        // Acknowledged at 10 s; a fault from 12 s (before its deadline ran out) to 20 s.
        d.intend("shared.D1", "w", 1, s(10));
        d.acked("shared.D1", "w", 1, s(10));
        faults.begin(s(12));
        let spans = faults.spans();
        assert!(d
            .overdue_between_faults(s(19), deadline, &spans, recovery)
            .is_empty());
        faults.heal(s(20));
        let spans = faults.spans();
        // Its clock restarts at 30 s (heal + recovery): due by 35 s.
        assert!(d
            .overdue_between_faults(s(35), deadline, &spans, recovery)
            .is_empty());
        let v = d.overdue_between_faults(s(36), deadline, &spans, recovery);
        assert!(
            matches!(&v[..], [Violation::MissedNotification { seq: 1, .. }]),
            "{v:?}"
        );
        // A change acknowledged well after recovery is held to the plain deadline.
        d.intend("shared.D1", "w", 2, s(40));
        d.acked("shared.D1", "w", 2, s(40));
        let v = d.overdue_between_faults(s(46), deadline, &spans, recovery);
        assert!(
            matches!(&v[..], [Violation::MissedNotification { seq: 2, .. }]),
            "{v:?}"
        );
    }

    #[test]
    fn a_fault_after_the_deadline_ran_out_excuses_nothing_and_nested_faults_are_one_span() {
        let t0 = Instant::now();
        let s = |n: u64| t0 + Duration::from_secs(n);
        let faults = FaultWindows::default();
        faults.begin(s(10));
        faults.begin(s(11));
        faults.heal(s(12));
        assert_eq!(faults.spans(), [(s(10), None)]);
        faults.heal(s(14));
        assert_eq!(faults.spans(), [(s(10), Some(s(14)))]);
        let spans = faults.spans();
        let d = Duration::from_secs(5);
        let r = Duration::from_secs(10);
        // Began before the fault, deadline out at 9 s < 10 s: not excused.
        assert_eq!(deadline_start(s(4), d, &spans, r), Some(s(4)));
        // Deadline out at 11 s: restarts at 24 s.
        assert_eq!(deadline_start(s(6), d, &spans, r), Some(s(24)));
        // During the fault; and after heal + recovery (unaffected).
        assert_eq!(deadline_start(s(13), d, &spans, r), Some(s(24)));
        assert_eq!(deadline_start(s(25), d, &spans, r), Some(s(25)));
        faults.begin(s(30));
        assert_eq!(deadline_start(s(27), d, &faults.spans(), r), None);
        faults.heal_all(s(31));
        assert_eq!(deadline_start(s(27), d, &faults.spans(), r), Some(s(41)));
    }

    #[test]
    fn unacknowledged_and_abandoned_writes_are_not_demanded() {
        let t0 = Instant::now();
        let mut d = DeviceTrack::new("D1", t0);
        d.intend("shared.D1", "w", 1, t0);
        d.intend("shared.D1", "w", 2, t0);
        d.acked("shared.D1", "w", 2, t0);
        d.abandon("shared.D1", "w", 2);
        assert!(d.finish(t0 + Duration::from_secs(60)).is_empty());
    }

    #[test]
    fn the_audit_wants_the_highest_acknowledged_write_or_a_later_one() {
        let t0 = Instant::now();
        let mut d = DeviceTrack::new("D1", t0);
        for seq in 1..=3 {
            d.intend("shared.D1", "w", seq, t0);
            d.acked("shared.D1", "w", seq, t0);
        }
        // Sent, never acknowledged (in flight when the run ended): may supersede.
        d.intend("shared.D1", "w", 4, t0);
        d.acked_final("device.D1", "temperature", 7);
        assert_eq!(d.audited_buckets(), ["device.D1", "shared.D1"]);

        assert!(d.audit("shared.D1", Some(&fields(&[("w", 3)]))).is_empty());
        assert!(d.audit("shared.D1", Some(&fields(&[("w", 4)]))).is_empty());
        assert!(d
            .audit("device.D1", Some(&fields(&[("temperature", 7)])))
            .is_empty());
        assert_eq!(
            d.audit("shared.D1", Some(&fields(&[("w", 2), ("other", 9)]))),
            [Violation::LostWrite {
                device: "D1".into(),
                bucket: "shared.D1".into(),
                writer: "w".into(),
                seq: 3,
                found: Some(2),
            }]
        );
        let gone = d.audit("device.D1", None);
        assert!(
            matches!(
                &gone[..],
                [Violation::LostWrite {
                    seq: 7,
                    found: None,
                    ..
                }]
            ),
            "{gone:?}"
        );
        // Delivery bookkeeping does not affect the audit.
        d.observe("shared.D1", &fields(&[("w", 3)]), t0);
        assert_eq!(d.audit("shared.D1", Some(&Fields::new())).len(), 1);
    }

    fn change(version: u64, op_id: Option<&str>) -> ChangeDoc {
        ChangeDoc {
            version,
            timestamp: version,
            outcome: tether_proto::synclog::ChangeKind::Applied,
            by: "device:D1".into(),
            session: None,
            op_id: op_id.map(String::from),
            fields: Fields::new(),
        }
    }

    #[test]
    fn the_history_audit_finds_double_applications_and_missing_acknowledged_writes() {
        let mut d = DeviceTrack::new("D1", Instant::now());
        for op in ["a", "b", "c", "d"] {
            d.sent_op("shared.D1", op);
        }
        d.sent_op("shared.D1", "a"); // retried after a lost answer
        d.acked_op("a", UpdateOutcome::Applied, 2, true);
        d.acked_op("b", UpdateOutcome::Applied, 3, false);
        d.acked_op("c", UpdateOutcome::Merged, 9, false);
        assert_eq!(d.retry_counts(), (1, 1));
        assert_eq!(d.audited_buckets(), ["shared.D1"]);

        // Correct history: each op id once (d was never acknowledged and never applied).
        let good = [
            change(1, None),
            change(2, Some("a")),
            change(3, Some("b")),
            change(4, Some("c")),
        ];
        let (v, audit) = d.audit_history("shared.D1", 1, &good);
        assert!(v.is_empty(), "{v:?}");
        assert_eq!(
            audit,
            OpAudit {
                ops_in_history: 3,
                ops_checked: 3,
                retried_checked: 1
            }
        );
        // The retry of `a` applied again; `b` lost.
        let bad = [
            change(1, None),
            change(2, Some("a")),
            change(4, Some("a")),
            change(5, Some("c")),
        ];
        let (v, _) = d.audit_history("shared.D1", 1, &bad);
        assert_eq!(
            v,
            [
                Violation::DoubleApplication {
                    device: "D1".into(),
                    bucket: "shared.D1".into(),
                    op_id: "a".into(),
                    versions: vec![2, 4],
                },
                Violation::AckedWriteMissing {
                    device: "D1".into(),
                    bucket: "shared.D1".into(),
                    op_id: "b".into(),
                    version: 3,
                },
            ]
        );
        // A history truncated past an op's version vouches for nothing about it.
        let (v, audit) = d.audit_history("shared.D1", 4, &[change(4, Some("c"))]);
        assert!(v.is_empty(), "{v:?}");
        assert_eq!(audit.ops_checked, 1);
        // An unacknowledged write (d) may be applied once, never twice.
        let (v, _) = d.audit_history(
            "shared.D1",
            1,
            &[change(7, Some("d")), change(8, Some("d"))],
        );
        assert!(
            v.iter()
                .any(|x| matches!(x, Violation::DoubleApplication { op_id, .. } if op_id == "d")),
            "{v:?}"
        );
    }

    #[test]
    fn other_buckets_and_writers_do_not_confirm() {
        let t0 = Instant::now();
        let mut d = DeviceTrack::new("D1", t0);
        d.intend("shared.D1", "w", 1, t0);
        d.acked("shared.D1", "w", 1, t0);
        assert!(d.observe("device.D1", &fields(&[("w", 1)]), t0).is_empty());
        assert!(d
            .observe("shared.D1", &fields(&[("other", 1)]), t0)
            .is_empty());
        assert_eq!(d.finish(t0).len(), 0, "not overdue at zero wait");
        assert_eq!(d.finish(t0 + Duration::from_millis(1)).len(), 1);
    }
}
