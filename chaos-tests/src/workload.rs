//! The hot-bucket workload: a few bucket sets (devices of the `chaos` type, two buckets
//! each) written, read and subscribed concurrently by many clients — half through the load
//! balancer, half directly to a node (moving to the next node after a failure, as a client
//! with a list of endpoints would) — with every invocation and completion recorded.
//!
//! - Client `c` writes only its own field `w<c>` with its own increasing sequence number,
//!   so every write is unique and every value read names the write that made it. Each
//!   write carries a fresh `op_id` (`c<c>-<seq>`).
//! - Writes are plain or OCC (a seeded mix); both send `base_version` = the last version of
//!   that bucket the client saw (from any answer).
//! - Reads are `GET /v1/buckets?ids=…&view=full` of one set's buckets; subscribes hold
//!   the client's versions of one set's buckets for a short `timeout_ms`.
//! - Outcomes follow `history.rs`: 2xx `Ok`; a 4xx (409 OCC refusal, 429, …) or a connection
//!   that could not be made (`http` 0: nothing was sent) `Refused`; a 5xx, timeout or reset
//!   `Unknown`.
//! - The ownership poller reads the store's lease table (the truth of who owns a set) every
//!   250 ms and records every change as an `Owner` entry.
//! - The last hot set (of two or more) is *quiet*: all clients read and subscribe it as
//!   any other, but it takes at most one write per [`WorkloadConfig::quiet_write_gap`]
//!   (a client whose turn it is not reads or subscribes instead). A held subscriber of a busy set is
//!   woken by the next write anyway; one of the quiet set depends on the notification of
//!   each write, so a lost notification shows as a subscriber answered "nothing changed"
//!   at its timeout (the checker's `missed_notifications`).
//! - Every loop is bounded by the stop signal and a maximum op count.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use reqwest::header::AUTHORIZATION;
use reqwest::StatusCode;
use serde_json::{json, Value};
use tether_proto::credentials::{basic_header, Credentials};
use tokio::sync::watch;

use crate::history::{Call, Entry, Fields, Observed, Outcome, SharedRecorder};
use crate::nemesis::Owners;

/// The device type of the hot sets (in the nodes' config, [`device_type_config`]).
pub const DEVICE_TYPE: &str = "chaos";
/// Bucket kinds of a hot set.
pub const KINDS: [&str; 2] = ["a", "b"];
/// Writer fields each bucket allows (`w0` … `w15`): at most this many clients.
pub const MAX_CLIENTS: usize = 16;
/// Upper bound of one client's operations in one run.
const MAX_OPS_PER_CLIENT: u64 = 200_000;

/// The client id of the stragglers ([`Stragglers`]), who write field `w998`.
pub const STRAGGLER: u32 = 998;

/// The nodes' config file text: the `chaos` device type with its two buckets, each with
/// one field per possible writer (the clients' and the stragglers').
pub fn device_type_config() -> String {
    let fields: Vec<String> = (0..MAX_CLIENTS as u32)
        .chain([STRAGGLER])
        .map(|c| format!("\"w{c}\""))
        .collect();
    let fields = fields.join(", ");
    let mut s = format!("[device_types.{DEVICE_TYPE}.buckets]\n");
    for k in KINDS {
        s.push_str(&format!("{k} = [{fields}]\n"));
    }
    s
}

/// How the clients behave.
#[derive(Debug, Clone)]
pub struct WorkloadConfig {
    /// Concurrent clients (≤ [`MAX_CLIENTS`]).
    pub clients: usize,
    /// Percent of operations that are writes; the rest split between reads and subscribes.
    pub write_percent: u32,
    /// Percent of the non-writes that are subscribes.
    pub subscribe_percent: u32,
    /// Percent of writes that are OCC.
    pub occ_percent: u32,
    /// Pause between one client's operations.
    pub think: Duration,
    /// A subscribe's `timeout_ms`.
    pub subscribe_timeout_ms: u64,
    /// Bound of a read or write.
    pub request_timeout: Duration,
    /// Least time between two writes to the quiet set (the last one).
    pub quiet_write_gap: Duration,
    /// When the quiet set may be written next (shared by every client of a run).
    pub quiet_next: Arc<Mutex<Option<tokio::time::Instant>>>,
}

impl WorkloadConfig {
    /// Whether a client may write the quiet set now; if so, the next write must wait
    /// [`Self::quiet_write_gap`].
    fn quiet_turn(&self) -> bool {
        let now = tokio::time::Instant::now();
        let mut next = self.quiet_next.lock().unwrap_or_else(|e| e.into_inner());
        if next.is_some_and(|t| now < t) {
            return false;
        }
        *next = Some(now + self.quiet_write_gap);
        true
    }
}

impl Default for WorkloadConfig {
    fn default() -> Self {
        WorkloadConfig {
            clients: 8,
            write_percent: 60,
            subscribe_percent: 40,
            occ_percent: 30,
            think: Duration::from_millis(25),
            subscribe_timeout_ms: 2_000,
            request_timeout: Duration::from_secs(5),
            quiet_write_gap: Duration::from_millis(1_500),
            quiet_next: Arc::default(),
        }
    }
}

/// One hot set: a device's serial (its set key), credentials and bucket ids.
#[derive(Debug, Clone)]
pub struct HotSet {
    pub serial: String,
    pub creds: Credentials,
    pub buckets: Vec<String>,
}

/// Where clients send requests: the load balancer, and each node by name.
#[derive(Debug, Clone)]
pub struct Endpoints {
    pub lb: String,
    pub nodes: Vec<(String, String)>,
}

/// What the workload thinks about answers, for one client: the newest version it saw per
/// bucket.
#[derive(Debug, Default)]
struct Seen {
    versions: BTreeMap<String, u64>,
}

impl Seen {
    fn note(&mut self, states: &[Observed]) {
        for s in states {
            let v = self.versions.entry(s.bucket.clone()).or_default();
            *v = (*v).max(s.version);
        }
    }
    fn get(&self, bucket: &str) -> u64 {
        self.versions.get(bucket).copied().unwrap_or(0)
    }
}

/// The states of a `BucketList` answer (`GET /v1/buckets`, subscribe).
fn list_states(v: &Value) -> Vec<Observed> {
    v["buckets"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|b| {
                    Some(Observed {
                        bucket: b["id"].as_str()?.to_string(),
                        version: b["version"].as_u64()?,
                        timestamp: b["timestamp"].as_u64().unwrap_or(0),
                        fields: b["value"].as_object().cloned(),
                    })
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Classifies an error answer (not 2xx).
async fn refused_or_unknown(r: reqwest::Response) -> Outcome {
    let status = r.status();
    let body: Value = r.json().await.unwrap_or(Value::Null);
    if status.is_client_error() {
        let code = body["error"]
            .as_str()
            .or_else(|| body["outcome"].as_str())
            .unwrap_or("")
            .to_string();
        Outcome::Refused {
            http: status.as_u16(),
            code,
        }
    } else {
        Outcome::Unknown {
            detail: format!(
                "{} {}",
                status.as_u16(),
                body["error"].as_str().unwrap_or("")
            ),
        }
    }
}

/// Classifies a request that got no answer.
fn transport(e: &reqwest::Error) -> Outcome {
    if e.is_connect() {
        // No connection: the request never reached a node.
        Outcome::Refused {
            http: 0,
            code: "connect".into(),
        }
    } else if e.is_timeout() {
        Outcome::Unknown {
            detail: "timeout".into(),
        }
    } else {
        Outcome::Unknown {
            detail: format!("transport: {e}"),
        }
    }
}

/// One PUT's parameters.
struct Put<'a> {
    bucket: &'a str,
    fields: &'a Fields,
    base_version: u64,
    occ: bool,
    op_id: &'a str,
}

/// One write through `via`, recorded as client `client`'s.
async fn recorded_write(
    http: &reqwest::Client,
    rec: &SharedRecorder,
    client: u32,
    via: (&str, &str),
    set: &HotSet,
    put: Put<'_>,
    timeout: Duration,
) -> Outcome {
    let op = rec.invoke(
        client,
        Call::Write {
            bucket: put.bucket.to_string(),
            fields: put.fields.clone(),
            base_version: put.base_version,
            occ: put.occ,
            op_id: Some(put.op_id.to_string()),
            via: via.0.to_string(),
        },
    );
    let out = write(http, via.1, set, put, timeout).await;
    rec.complete(op, out.clone());
    out
}

/// One write; its outcome.
async fn write(
    http: &reqwest::Client,
    base: &str,
    set: &HotSet,
    put: Put<'_>,
    timeout: Duration,
) -> Outcome {
    let bucket = put.bucket;
    let r = http
        .put(format!("{base}/v1/buckets/{bucket}"))
        .header(AUTHORIZATION, basic_header(&set.creds))
        .timeout(timeout)
        .json(&json!({
            "value": put.fields, "base_version": put.base_version, "occ": put.occ,
            "op_id": put.op_id,
        }))
        .send()
        .await;
    match r {
        Ok(r) if r.status().is_success() => match r.json::<Value>().await {
            Ok(v) => Outcome::Ok {
                outcome: v["outcome"].as_str().map(str::to_string),
                states: vec![Observed {
                    bucket: bucket.to_string(),
                    version: v["version"].as_u64().unwrap_or(0),
                    timestamp: v["timestamp"].as_u64().unwrap_or(0),
                    fields: v["value"].as_object().cloned(),
                }],
                replayed: v["replayed"].as_bool().unwrap_or(false),
            },
            Err(e) => Outcome::Unknown {
                detail: format!("unreadable 2xx: {e}"),
            },
        },
        Ok(r) => refused_or_unknown(r).await,
        Err(e) => transport(&e),
    }
}

/// A read or a subscribe (both answer a `BucketList`).
async fn list(req: reqwest::RequestBuilder) -> Outcome {
    match req.send().await {
        Ok(r) if r.status() == StatusCode::NO_CONTENT => Outcome::Ok {
            outcome: None,
            states: Vec::new(),
            replayed: false,
        },
        Ok(r) if r.status().is_success() => match r.json::<Value>().await {
            Ok(v) => Outcome::Ok {
                outcome: None,
                states: list_states(&v),
                replayed: false,
            },
            Err(e) => Outcome::Unknown {
                detail: format!("unreadable 2xx: {e}"),
            },
        },
        Ok(r) => refused_or_unknown(r).await,
        Err(e) => transport(&e),
    }
}

/// `GET /v1/buckets?ids=…&view=full` of `set`'s buckets through `via`, recorded.
pub async fn read_set(
    http: &reqwest::Client,
    rec: &SharedRecorder,
    client: u32,
    via: (&str, &str),
    set: &HotSet,
    timeout: Duration,
) -> Outcome {
    let op = rec.invoke(
        client,
        Call::Read {
            buckets: set.buckets.clone(),
            via: via.0.to_string(),
        },
    );
    let out = list(
        http.get(format!(
            "{}/v1/buckets?ids={}&view=full",
            via.1,
            set.buckets.join(",")
        ))
        .header(AUTHORIZATION, basic_header(&set.creds))
        .timeout(timeout),
    )
    .await;
    rec.complete(op, out.clone());
    out
}

/// One client's loop until `stop`.
#[allow(clippy::too_many_arguments)]
pub async fn client(
    id: u32,
    cfg: WorkloadConfig,
    seed: u64,
    sets: Vec<HotSet>,
    endpoints: Endpoints,
    rec: SharedRecorder,
    http: reqwest::Client,
    mut stop: watch::Receiver<bool>,
) {
    let mut rng = StdRng::seed_from_u64(seed ^ (u64::from(id) << 32));
    let mut seen = Seen::default();
    let field = format!("w{id}");
    let direct = id % 2 == 1 && !endpoints.nodes.is_empty();
    let mut node = (id as usize / 2) % endpoints.nodes.len().max(1);
    let mut seq = 0u64;
    for _ in 0..MAX_OPS_PER_CLIENT {
        if *stop.borrow() {
            break;
        }
        let (via_name, base) = if direct {
            let (n, u) = &endpoints.nodes[node];
            (n.clone(), u.clone())
        } else {
            ("lb".to_string(), endpoints.lb.clone())
        };
        let k = rng.random_range(0..sets.len());
        let set = &sets[k];
        let roll = rng.random_range(0..100u32);
        let quiet = sets.len() >= 2 && k == sets.len() - 1;
        let out = if roll < cfg.write_percent && (!quiet || cfg.quiet_turn()) {
            seq += 1;
            let bucket = &set.buckets[rng.random_range(0..set.buckets.len())];
            let occ = rng.random_range(0..100u32) < cfg.occ_percent;
            let base_version = seen.get(bucket);
            let mut fields = Fields::new();
            fields.insert(field.clone(), json!(seq));
            let op_id = format!("c{id}-{seq}");
            let put = Put {
                bucket,
                fields: &fields,
                base_version,
                occ,
                op_id: &op_id,
            };
            let via = (via_name.as_str(), base.as_str());
            recorded_write(&http, &rec, id, via, set, put, cfg.request_timeout).await
        } else if rng.random_range(0..100u32) < cfg.subscribe_percent {
            let held: BTreeMap<String, u64> = set
                .buckets
                .iter()
                .map(|b| (b.clone(), seen.get(b)))
                .collect();
            let op = rec.invoke(
                id,
                Call::Subscribe {
                    held: held.clone(),
                    timeout_ms: cfg.subscribe_timeout_ms,
                    via: via_name.clone(),
                },
            );
            let body = json!({
                "buckets": held.iter().map(|(b, v)| {
                    if *v == 0 { json!({"id": b}) } else { json!({"id": b, "version": v}) }
                }).collect::<Vec<_>>(),
                "timeout_ms": cfg.subscribe_timeout_ms,
            });
            let out = list(
                http.post(format!("{base}/v1/subscribe"))
                    .header(AUTHORIZATION, basic_header(&set.creds))
                    // Well past timeout_ms + the checker's 5 s grace: a late answer is
                    // recorded with its real time, not cut off at the boundary.
                    .timeout(
                        Duration::from_millis(cfg.subscribe_timeout_ms) + 2 * cfg.request_timeout,
                    )
                    .json(&body),
            )
            .await;
            rec.complete(op, out.clone());
            out
        } else {
            read_set(
                &http,
                &rec,
                id,
                (&via_name, &base),
                set,
                cfg.request_timeout,
            )
            .await
        };
        match &out {
            Outcome::Ok { states, .. } => seen.note(states),
            Outcome::Refused { http: 409, .. } | Outcome::Refused { http: 429, .. } => {}
            _ if direct => node = (node + 1) % endpoints.nodes.len(),
            _ => {}
        }
        tokio::select! {
            _ = tokio::time::sleep(cfg.think) => {}
            _ = stop.wait_for(|s| *s) => break,
        }
    }
}

/// Requests sent straight to a paused node: they wait in its sockets and are among the
/// first things it serves when it wakes, with whatever it held in memory before the pause.
/// A workload client does not wait that long (it gives up after
/// [`WorkloadConfig::request_timeout`] and moves to the next node), so without them whether
/// the woken node serves anything before it learns it was deposed is luck. For every hot
/// set, as client [`STRAGGLER`]: one write (field `w998`, a plain merge) sent as the pause
/// begins, and one read sent shortly before the wake — after every write the other nodes
/// acknowledged meanwhile, so it must see them. A woken deposed owner must route them to
/// the new owner (invariants 10 and 23): one that commits from its stale memory forks
/// versions and loses acknowledged writes, one that reads from it serves a stale read.
#[derive(Debug, Clone)]
pub struct Stragglers {
    http: reqwest::Client,
    rec: SharedRecorder,
    sets: Vec<HotSet>,
    request_timeout: Duration,
    seq: Arc<std::sync::atomic::AtomicU64>,
    pauses: Arc<std::sync::atomic::AtomicU64>,
    pending: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

/// What a straggler does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Straggle {
    Write,
    Read,
}

impl Stragglers {
    pub fn new(
        http: reqwest::Client,
        rec: SharedRecorder,
        sets: Vec<HotSet>,
        request_timeout: Duration,
    ) -> Self {
        Stragglers {
            http,
            rec,
            sets,
            request_timeout,
            seq: Arc::default(),
            pauses: Arc::default(),
            pending: Arc::default(),
        }
    }

    /// Whether this pause (counted from 1) gets stragglers: the odd ones.
    pub fn take_turn(&self) -> bool {
        self.pauses
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            % 2
            == 0
    }

    /// Sends one straggler of kind `what` per hot set to node `via` (name, base URL),
    /// which wakes in `wake`.
    pub fn send(&self, what: Straggle, via: (&str, &str), wake: Duration) {
        let timeout = wake + 2 * self.request_timeout;
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        for set in &self.sets {
            let Some(bucket) = set.buckets.first().cloned() else {
                continue;
            };
            let seq = 1 + self.seq.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let (name, base) = (via.0.to_string(), via.1.to_string());
            let (http, rec, set) = (self.http.clone(), self.rec.clone(), set.clone());
            pending.push(tokio::spawn(async move {
                let via = (name.as_str(), base.as_str());
                if what == Straggle::Read {
                    read_set(&http, &rec, STRAGGLER, via, &set, timeout).await;
                    return;
                }
                let mut fields = Fields::new();
                fields.insert(format!("w{STRAGGLER}"), json!(seq));
                let op_id = format!("c{STRAGGLER}-{seq}");
                let put = Put {
                    bucket: &bucket,
                    fields: &fields,
                    base_version: 0,
                    occ: false,
                    op_id: &op_id,
                };
                recorded_write(&http, &rec, STRAGGLER, via, &set, put, timeout).await;
            }));
        }
    }

    /// Waits (at most `bound`) for every straggler sent so far to be answered or to time
    /// out; one still out after that is aborted (its op stays invoked, never completed).
    pub async fn join(&self, bound: Duration) {
        let pending = std::mem::take(&mut *self.pending.lock().unwrap_or_else(|e| e.into_inner()));
        let deadline = tokio::time::Instant::now() + bound;
        for h in pending {
            let abort = h.abort_handle();
            if tokio::time::timeout_at(deadline, h).await.is_err() {
                abort.abort();
            }
        }
    }
}

/// Polls the store's lease table for `sets` every 250 ms until `stop`, recording each
/// owner change and keeping `owners` current. An unreachable store (a store fault) is
/// retried on the next tick.
pub async fn owner_poller(
    store_url: String,
    sets: Vec<String>,
    owners: Owners,
    rec: SharedRecorder,
    mut stop: watch::Receiver<bool>,
) {
    let mut client: Option<tokio_postgres::Client> = None;
    // Bounded: 250 ms ticks for at most a day.
    for _ in 0..(4 * 86_400) {
        if *stop.borrow() {
            break;
        }
        if client
            .as_ref()
            .is_none_or(tokio_postgres::Client::is_closed)
        {
            let connect = tokio::time::timeout(
                Duration::from_secs(2),
                tokio_postgres::connect(&store_url, tokio_postgres::NoTls),
            )
            .await;
            client = match connect {
                Ok(Ok((c, conn))) => {
                    tokio::spawn(async move {
                        let _ = conn.await;
                    });
                    Some(c)
                }
                _ => None,
            };
        }
        if let Some(c) = &client {
            let rows = tokio::time::timeout(
                Duration::from_secs(2),
                c.query(
                    "SELECT set_key, owner FROM tether_leases WHERE set_key = ANY($1)",
                    &[&sets],
                ),
            )
            .await;
            match rows {
                Ok(Ok(rows)) => {
                    let mut o = owners.lock().unwrap_or_else(|e| e.into_inner());
                    for row in rows {
                        let set: String = row.get(0);
                        let node: String = row.get(1);
                        if o.get(&set) != Some(&node) {
                            rec.record(&Entry::Owner {
                                t_us: rec.now_us(),
                                set: set.clone(),
                                node: node.clone(),
                            });
                            o.insert(set, node);
                        }
                    }
                }
                _ => client = None,
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
            _ = stop.wait_for(|s| *s) => break,
        }
    }
}

/// Counts of a run's recorded outcomes, for the console.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct Tally {
    pub ok: u64,
    pub refused: u64,
    pub unknown: u64,
}

impl Tally {
    /// Counts the completions in `entries`.
    pub fn of(entries: &[Entry]) -> Tally {
        let mut t = Tally::default();
        for e in entries {
            if let Entry::Complete { result, .. } = e {
                match result {
                    Outcome::Ok { .. } => t.ok += 1,
                    Outcome::Refused { .. } => t.refused += 1,
                    Outcome::Unknown { .. } => t.unknown += 1,
                }
            }
        }
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_answers_become_observed_states() {
        let v = json!({"buckets": [
            {"id": "a.HOT0", "version": 3, "timestamp": 17, "value": {"w1": 2}},
            {"id": "b.HOT0", "version": 1, "timestamp": 9},
        ]});
        let s = list_states(&v);
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].bucket, "a.HOT0");
        assert_eq!(s[0].version, 3);
        assert_eq!(
            s[0].fields.as_ref().map(|f| f["w1"].clone()),
            Some(json!(2))
        );
        assert_eq!(s[1].fields, None);
    }
}
