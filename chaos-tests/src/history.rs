//! The history of a chaos run: every invocation and completion a workload client made,
//! every fault the nemesis injected, and every ownership move it saw, one JSON object per
//! line (`history.jsonl`), in the manner of Jepsen's histories.
//!
//! The recorder (workloads, nemesis) writes it; the checker (`checker`) and the report
//! (`report`) only read it, so `tether-chaos check <history.jsonl>` re-checks a recorded
//! run with nothing else at hand.
//!
//! - Times are microseconds since the run started, on one monotonic clock of the recording
//!   process (`t_us`), so invoke/complete order is real-time order.
//! - Every operation has a unique `op` number; its `Invoke` comes before its `Complete`.
//!   An operation that never completed (the run ended first) is treated as `Unknown`.
//! - A write's outcome is one of: `Ok` (acknowledged, 2xx with `outcome: applied|merged`),
//!   `Refused` (the server answered that it did not apply it: a 4xx such as an OCC refusal
//!   or 422), `Unknown` (5xx after the request may have run, timeout, reset: it may or may not
//!   have been applied — Jepsen's `info`).
//! - Read and subscribe results carry every bucket state they returned (`Observed`).

use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::path::Path;

use serde::{Deserialize, Serialize};

/// A bucket's fields, as the API carries them.
pub type Fields = serde_json::Map<String, serde_json::Value>;

/// One line of `history.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Entry {
    /// The run's parameters; the first line.
    Start {
        scenario: String,
        seed: u64,
        /// Wall-clock time of `t_us = 0`, ms since the Unix epoch (to relate server
        /// timestamps to the run).
        wall_ms: u64,
    },
    /// A client started an operation.
    Invoke {
        op: u64,
        client: u32,
        t_us: u64,
        call: Call,
    },
    /// The operation `op` ended.
    Complete { op: u64, t_us: u64, result: Outcome },
    /// The nemesis started or ended a fault.
    Fault {
        t_us: u64,
        /// e.g. `kill`, `pause`, `isolate`, `store-crash`, `clock-bump`.
        kind: String,
        /// e.g. `node-2`, `store`, `node-1<->node-3`.
        target: String,
        phase: FaultPhase,
        #[serde(default, skip_serializing_if = "String::is_empty")]
        detail: String,
    },
    /// The recorder saw a set's owner change (from the nodes' metrics or answers).
    Owner {
        t_us: u64,
        set: String,
        node: String,
    },
    /// The run ended; the final reads follow no more faults.
    End { t_us: u64 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultPhase {
    Start,
    End,
}

/// What an operation asked for. `via` names where it was sent: `lb` or a node name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "f", rename_all = "snake_case")]
pub enum Call {
    /// `PUT /v1/buckets/{bucket}`.
    Write {
        bucket: String,
        fields: Fields,
        base_version: u64,
        #[serde(default)]
        occ: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        op_id: Option<String>,
        via: String,
    },
    /// `GET /v1/buckets?ids=…&view=full` (one or more buckets).
    Read { buckets: Vec<String>, via: String },
    /// `POST /v1/subscribe` with the versions the client held.
    Subscribe {
        held: BTreeMap<String, u64>,
        timeout_ms: u64,
        via: String,
    },
}

/// How an operation ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Outcome {
    /// 2xx. For a write: the state it produced (`outcome` is the server's word:
    /// `applied` or `merged`). For a read or subscribe: every state it returned (empty for
    /// a subscribe that timed out with nothing newer).
    Ok {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        outcome: Option<String>,
        #[serde(default)]
        states: Vec<Observed>,
        #[serde(default)]
        replayed: bool,
    },
    /// The server said it did not apply the write (or could not serve the read) and
    /// nothing ran: 4xx, or a 503 the API marks as not started.
    Refused { http: u16, code: String },
    /// Fate unknown: a 5xx after the request may have run, a timeout, a reset.
    Unknown { detail: String },
}

/// One bucket state as the server returned it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Observed {
    pub bucket: String,
    pub version: u64,
    pub timestamp: u64,
    /// `None` when the answer did not carry the value (e.g. a write's acknowledgement).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fields: Option<Fields>,
}

/// Appends entries to a `history.jsonl`, one line each, flushed per line so a crash of
/// the recorder loses at most the line being written.
#[derive(Debug)]
pub struct Recorder {
    out: std::io::BufWriter<std::fs::File>,
}

impl Recorder {
    pub fn create(path: &Path) -> std::io::Result<Self> {
        Ok(Self {
            out: std::io::BufWriter::new(std::fs::File::create(path)?),
        })
    }

    pub fn record(&mut self, entry: &Entry) -> std::io::Result<()> {
        serde_json::to_writer(&mut self.out, entry)?;
        self.out.write_all(b"\n")?;
        self.out.flush()
    }
}

/// A [`Recorder`] shared by the workload clients, the ownership poller and the nemesis
/// of one run: one clock (`t_us` since the run started), one op counter. A failed write
/// of the history is kept and reported by [`SharedRecorder::failure`] (the run then has no
/// verdict), never ignored.
#[derive(Debug, Clone)]
pub struct SharedRecorder {
    inner: std::sync::Arc<std::sync::Mutex<(Recorder, Option<String>)>>,
    t0: std::time::Instant,
    next_op: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// Told of every fault's start and end (the fleet's delivery deadlines).
    faults: Option<tether_sim::checker::FaultWindows>,
}

impl SharedRecorder {
    /// Starts recording; `t_us = 0` is now.
    pub fn new(recorder: Recorder) -> Self {
        SharedRecorder {
            inner: std::sync::Arc::new(std::sync::Mutex::new((recorder, None))),
            t0: std::time::Instant::now(),
            next_op: std::sync::Arc::new(std::sync::atomic::AtomicU64::new(1)),
            faults: None,
        }
    }

    /// Also opens and heals `faults` with every recorded fault start and end (the fleet
    /// suspends its delivery deadlines during faults: `crate::fleet`).
    pub fn with_fault_windows(mut self, faults: tether_sim::checker::FaultWindows) -> Self {
        self.faults = Some(faults);
        self
    }

    /// Microseconds since the run started.
    pub fn now_us(&self) -> u64 {
        u64::try_from(self.t0.elapsed().as_micros()).unwrap_or(u64::MAX)
    }

    /// Appends `entry`.
    pub fn record(&self, entry: &Entry) {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = g.0.record(entry) {
            g.1.get_or_insert_with(|| format!("writing the history: {e}"));
        }
    }

    /// Records the invocation of `call` by `client`; the new op number.
    pub fn invoke(&self, client: u32, call: Call) -> u64 {
        let op = self
            .next_op
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.record(&Entry::Invoke {
            op,
            client,
            t_us: self.now_us(),
            call,
        });
        op
    }

    /// Records how `op` ended.
    pub fn complete(&self, op: u64, result: Outcome) {
        self.record(&Entry::Complete {
            op,
            t_us: self.now_us(),
            result,
        });
    }

    /// Records a fault's start or end.
    pub fn fault(&self, kind: &str, target: &str, phase: FaultPhase, detail: String) {
        if let Some(w) = &self.faults {
            let now = std::time::Instant::now();
            match phase {
                FaultPhase::Start => w.begin(now),
                FaultPhase::End => w.heal(now),
            }
        }
        self.record(&Entry::Fault {
            t_us: self.now_us(),
            kind: kind.to_string(),
            target: target.to_string(),
            phase,
            detail,
        });
    }

    /// The first failure to write the history, if any.
    pub fn failure(&self) -> Option<String> {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .1
            .clone()
    }
}

/// Reads a whole `history.jsonl`; a line that does not parse is an error naming its number.
pub fn read(path: &Path) -> Result<Vec<Entry>, String> {
    let file = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut entries = Vec::new();
    for (n, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.map_err(|e| format!("{}:{}: {e}", path.display(), n + 1))?;
        if line.trim().is_empty() {
            continue;
        }
        let entry = serde_json::from_str(&line)
            .map_err(|e| format!("{}:{}: {e}", path.display(), n + 1))?;
        entries.push(entry);
    }
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip_through_jsonl() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("history.jsonl");
        let mut fields = Fields::new();
        fields.insert("w3".into(), serde_json::json!(17));
        let entries = vec![
            Entry::Start {
                scenario: "baseline".into(),
                seed: 7,
                wall_ms: 1_764_000_000_000,
            },
            Entry::Invoke {
                op: 1,
                client: 3,
                t_us: 10,
                call: Call::Write {
                    bucket: "hot.0".into(),
                    fields: fields.clone(),
                    base_version: 4,
                    occ: true,
                    op_id: Some("c3-1".into()),
                    via: "lb".into(),
                },
            },
            Entry::Complete {
                op: 1,
                t_us: 900,
                result: Outcome::Ok {
                    outcome: Some("applied".into()),
                    states: vec![Observed {
                        bucket: "hot.0".into(),
                        version: 5,
                        timestamp: 1_764_000_000_001,
                        fields: None,
                    }],
                    replayed: false,
                },
            },
            Entry::Fault {
                t_us: 1000,
                kind: "kill".into(),
                target: "node-2".into(),
                phase: FaultPhase::Start,
                detail: String::new(),
            },
            Entry::End { t_us: 2000 },
        ];
        let mut rec = Recorder::create(&path).expect("create");
        for e in &entries {
            rec.record(e).expect("record");
        }
        drop(rec);
        assert_eq!(read(&path).expect("read"), entries);
    }
}
