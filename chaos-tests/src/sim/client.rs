//! The simulated clients: the hot-bucket workload of the process suite (`crate::workload`)
//! run against the nodes' routers, recording the same history.
//!
//! - Client `c` writes only its own field `w<c>` with an increasing sequence number (every
//!   write unique), plain or OCC, with `base_version` the last version it saw and, most of
//!   the time, an op id (`c<c>-<seq>`) — the router retries a write with an op id whose
//!   fate is unknown, and the owner answers such a retry from its record.
//! - Reads take both buckets of one set; subscribes hold the client's versions of one set.
//! - A request runs on the node's own runtime: when the node crashes, the request dies
//!   with it and the client records what a client of a killed server knows (`Unknown`).
//! - The controller creates the sets, reads their initial state, opens the workload,
//!   ends it, and makes the final reads from every node up after `End`.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::rc::Rc;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use tether_node::error::NodeError;
use tether_node::routing::router::{Get, HoldOptions, PutKind, Subscription, Write};
use tether_proto::reconcile::Held;
use tether_proto::{BucketId, Fields, SetKey, Update};

use super::node::{Cluster, NodeHandle};
use super::SimHistory;
use crate::history::{Call, Entry, Observed, Outcome};
use crate::runner::{FINAL_READER, INITIAL_READER};

/// Bucket kinds of a simulated set.
pub const KINDS: [&str; 2] = ["a", "b"];
/// A subscribe's timeout.
const SUBSCRIBE_TIMEOUT: Duration = Duration::from_millis(2_000);
/// How long a client waits for any request before it records `Unknown` (a write) and
/// moves on: beyond the router's own deadlines, so the node's answer decides.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(20);
/// A client's pause between two requests, ms.
const THINK_MS: std::ops::Range<u64> = 10..60;
/// How long after the workload stops the controller waits for the clients.
const CLIENT_DRAIN: Duration = Duration::from_secs(30);

/// A simulated set: its key and its buckets.
#[derive(Debug, Clone)]
pub struct SimSet {
    pub key: SetKey,
    pub buckets: Vec<BucketId>,
}

/// The sets of a run: `SIM0000`, `SIM0001`, …
pub fn create_sets(n: usize) -> Vec<SimSet> {
    (0..n)
        .filter_map(|i| {
            let key = SetKey::parse(&format!("SIM{i:04}")).ok()?;
            let buckets = KINDS
                .iter()
                .filter_map(|k| BucketId::new(k, &key).ok())
                .collect();
            Some(SimSet { key, buckets })
        })
        .collect()
}

/// Subscribes answered with at least one changed bucket.
pub fn changed_answers(entries: &[Entry]) -> u64 {
    let subscribes: std::collections::HashSet<u64> = entries
        .iter()
        .filter_map(|e| match e {
            Entry::Invoke {
                op,
                call: Call::Subscribe { .. },
                ..
            } => Some(*op),
            _ => None,
        })
        .collect();
    entries
        .iter()
        .filter(|e| {
            matches!(e, Entry::Complete { op, result: Outcome::Ok { states, .. }, .. }
                if subscribes.contains(op) && !states.is_empty())
        })
        .count() as u64
}

/// The phases of a run, shared by the controller, the clients and the nemesis.
#[derive(Debug, Default)]
pub struct Phases {
    /// When the workload (and the faults) started: virtual time since the start.
    pub started: Cell<Option<Duration>>,
    /// The workload is over: clients stop.
    pub stopped: Cell<bool>,
    /// Clients that finished.
    pub clients_done: Cell<u32>,
}

fn observed(b: &tether_proto::Bucket, with_fields: bool) -> Observed {
    Observed {
        bucket: b.id.to_string(),
        version: b.version,
        timestamp: b.timestamp.millis,
        fields: with_fields.then(|| b.value.clone()),
    }
}

/// What a client of a failed request knows: a 4xx is a refusal (nothing ran), anything
/// else (5xx, the node gone, no answer) leaves the fate unknown.
fn failed(e: &NodeError) -> Outcome {
    let (code, status) = e.code_and_status();
    if status.is_client_error() {
        Outcome::Refused {
            http: status.as_u16(),
            code: code.to_string(),
        }
    } else {
        Outcome::Unknown {
            detail: format!("{} {code}: {e}", status.as_u16()),
        }
    }
}

/// Runs `op` on `node`'s runtime (so it dies with the node), at most [`REQUEST_TIMEOUT`].
async fn on_node<T, F>(node: &NodeHandle, op: F) -> Result<Result<T, NodeError>, String>
where
    T: Send + 'static,
    F: std::future::Future<Output = Result<T, NodeError>> + Send + 'static,
{
    let task = node.rt.spawn(op);
    match tokio::time::timeout(REQUEST_TIMEOUT, task).await {
        Ok(Ok(r)) => Ok(r),
        Ok(Err(e)) => Err(format!("{} went away mid-request: {e}", node.name)),
        Err(_) => Err(format!(
            "no answer from {} within {REQUEST_TIMEOUT:?}",
            node.name
        )),
    }
}

async fn read(node: &NodeHandle, set: &SimSet, history: &SimHistory, client: u32) -> Outcome {
    let op = history.invoke(
        client,
        Call::Read {
            buckets: set.buckets.iter().map(ToString::to_string).collect(),
            via: node.name.clone(),
        },
    );
    let (router, key) = (node.router.clone(), set.key.clone());
    let get = Get {
        ids: Some(set.buckets.clone()),
        values: true,
        max_bytes: 1 << 20,
    };
    let out = match on_node(node, async move { router.get(&key, get).await }).await {
        Ok(Ok(buckets)) => Outcome::Ok {
            outcome: None,
            states: buckets.iter().map(|b| observed(b, true)).collect(),
            replayed: false,
        },
        Ok(Err(e)) => failed(&e),
        Err(detail) => Outcome::Unknown { detail },
    };
    history.complete(op, out.clone());
    out
}

/// One workload client.
#[derive(Debug)]
pub struct Client {
    id: u32,
    rng: StdRng,
    sets: Vec<SimSet>,
    cluster: Cluster,
    history: SimHistory,
    phases: Rc<Phases>,
    seen: BTreeMap<String, u64>,
    seq: u64,
}

impl Client {
    pub fn new(
        id: u32,
        seed: u64,
        sets: Vec<SimSet>,
        cluster: Cluster,
        history: SimHistory,
        phases: Rc<Phases>,
    ) -> Client {
        Client {
            id,
            rng: StdRng::seed_from_u64(seed),
            sets,
            cluster,
            history,
            phases,
            seen: BTreeMap::new(),
            seq: 0,
        }
    }

    fn note(&mut self, out: &Outcome) {
        if let Outcome::Ok { states, .. } = out {
            for s in states {
                let v = self.seen.entry(s.bucket.clone()).or_default();
                *v = (*v).max(s.version);
            }
        }
    }

    fn seen(&self, b: &BucketId) -> u64 {
        self.seen.get(b.as_str()).copied().unwrap_or(0)
    }

    /// Runs until the workload stops.
    pub async fn run(mut self) -> turmoil::Result {
        while self.phases.started.get().is_none() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        while !self.phases.stopped.get() {
            let nodes = self.cluster.ready_nodes();
            if nodes.is_empty() {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            let node = nodes[self.rng.random_range(0..nodes.len())].clone();
            let set = self.sets[self.rng.random_range(0..self.sets.len())].clone();
            let roll = self.rng.random_range(0..100u32);
            let out = if roll < 50 {
                self.write(&node, &set).await
            } else if roll < 75 {
                self.subscribe(&node, &set).await
            } else {
                read(&node, &set, &self.history, self.id).await
            };
            self.note(&out);
            let think = self.rng.random_range(THINK_MS);
            tokio::time::sleep(Duration::from_millis(think)).await;
        }
        self.phases
            .clients_done
            .set(self.phases.clients_done.get() + 1);
        Ok(())
    }

    async fn write(&mut self, node: &NodeHandle, set: &SimSet) -> Outcome {
        self.seq += 1;
        let bucket = set.buckets[self.rng.random_range(0..set.buckets.len())].clone();
        let occ = self.rng.random_range(0..100u32) < 30;
        let with_op_id = self.rng.random_range(0..100u32) < 80;
        let base_version = self.seen(&bucket);
        let mut fields = Fields::new();
        fields.insert(format!("w{}", self.id), json!(self.seq));
        let op_id = with_op_id.then(|| format!("c{}-{}", self.id, self.seq));
        let op = self.history.invoke(
            self.id,
            Call::Write {
                bucket: bucket.to_string(),
                fields: fields.clone(),
                base_version,
                occ,
                op_id: op_id.clone(),
                via: node.name.clone(),
            },
        );
        let write = Write {
            update: Update {
                value: fields,
                base_version,
                occ,
            },
            session: None,
            by: format!("user:sim-{}", self.id),
            op_id,
        };
        let router = node.router.clone();
        let id = bucket.clone();
        let out = match on_node(node, async move { router.put(&id, write).await }).await {
            Ok(Ok(answer)) => match answer.kind {
                PutKind::Refused => Outcome::Refused {
                    http: 409,
                    code: "refused".into(),
                },
                kind => Outcome::Ok {
                    outcome: Some(
                        if kind == PutKind::Applied {
                            "applied"
                        } else {
                            "merged"
                        }
                        .into(),
                    ),
                    states: vec![observed(&answer.bucket, false)],
                    replayed: answer.replayed,
                },
            },
            Ok(Err(e)) => failed(&e),
            Err(detail) => Outcome::Unknown { detail },
        };
        self.history.complete(op, out.clone());
        out
    }

    async fn subscribe(&mut self, node: &NodeHandle, set: &SimSet) -> Outcome {
        let held: BTreeMap<String, u64> = set
            .buckets
            .iter()
            .map(|b| (b.to_string(), self.seen(b)))
            .collect();
        let op = self.history.invoke(
            self.id,
            Call::Subscribe {
                held: held.clone(),
                timeout_ms: SUBSCRIBE_TIMEOUT.as_millis() as u64,
                via: node.name.clone(),
            },
        );
        let by_set = BTreeMap::from([(
            set.key.clone(),
            set.buckets
                .iter()
                .map(|b| Held {
                    id: b.clone(),
                    timestamp: None,
                    version: Some(self.seen(b)).filter(|v| *v > 0),
                })
                .collect::<Vec<_>>(),
        )]);
        let router = node.router.clone();
        let answer = async move {
            let started = tokio::time::Instant::now();
            let opts = HoldOptions {
                max_bytes: 1 << 20,
                ..HoldOptions::default()
            };
            // As the HTTP handler does: the hold gets what is left of the timeout.
            match router.subscribe(by_set, SUBSCRIBE_TIMEOUT, opts).await? {
                Subscription::Now(updates) => Ok(updates),
                Subscription::Held(held) => {
                    let left = SUBSCRIBE_TIMEOUT.saturating_sub(started.elapsed());
                    held.answer(left, router.drain_signal()).await
                }
            }
        };
        let out = match on_node(node, answer).await {
            Ok(Ok(updates)) => Outcome::Ok {
                outcome: None,
                states: updates.iter().map(|u| observed(&u.bucket, true)).collect(),
                replayed: false,
            },
            Ok(Err(e)) => failed(&e),
            Err(detail) => Outcome::Unknown { detail },
        };
        self.history.complete(op, out.clone());
        out
    }
}

/// The controller: creates the sets, reads their first state, runs the workload for
/// `workload`, stops it, and makes the final reads after `End`.
pub async fn controller(
    sets: Vec<SimSet>,
    clients: u32,
    cluster: Cluster,
    history: SimHistory,
    phases: Rc<Phases>,
    workload: Duration,
) -> turmoil::Result {
    // Every node up and joined (or the first seconds gone), then the sets.
    for _ in 0..600 {
        if cluster.ready_nodes().len() == cluster.members().len() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut initial: Value = json!({});
    for (i, c) in (0..clients).enumerate() {
        initial[format!("w{c}")] = Value::Null;
        let _ = i;
    }
    let fields = initial.as_object().cloned().unwrap_or_default();
    for set in &sets {
        let mut created = false;
        for _ in 0..200 {
            let Some(node) = cluster.ready_nodes().into_iter().next() else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            let (router, key) = (node.router.clone(), set.key.clone());
            let buckets: Vec<(BucketId, Fields)> = set
                .buckets
                .iter()
                .map(|b| (b.clone(), fields.clone()))
                .collect();
            match on_node(&node, async move {
                router.ensure(&key, buckets, None, None).await
            })
            .await
            {
                Ok(Ok(())) => {
                    created = true;
                    break;
                }
                _ => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
        if !created {
            return Err(format!("could not create set {}", set.key).into());
        }
    }
    for set in &sets {
        if let Some(node) = cluster.ready_nodes().into_iter().next() {
            read(&node, set, &history, INITIAL_READER).await;
        }
    }
    let started = turmoil::sim_elapsed().unwrap_or_default();
    phases.started.set(Some(started));
    tokio::time::sleep(workload).await;
    phases.stopped.set(true);
    let drained = tokio::time::Instant::now() + CLIENT_DRAIN;
    while phases.clients_done.get() < clients && tokio::time::Instant::now() < drained {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    history.push(Entry::End {
        t_us: SimHistory::now_us(),
    });
    for node in cluster.ready_nodes() {
        for set in &sets {
            read(&node, set, &history, FINAL_READER).await;
        }
    }
    Ok(())
}
