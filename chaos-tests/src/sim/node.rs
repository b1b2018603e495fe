//! A simulated Tether node: one turmoil host running the node's real registry, actors,
//! router and cluster member (gossip and forwarding over simulated TCP), with a clock of
//! its own. Each start of the host is a new life (a crash loses its memory; the shared
//! store keeps what was committed).

use std::cell::RefCell;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::Rng;
use tether_cluster::seeds::SeedSpec;
use tether_cluster::{ClusterSecret, MembershipConfig};
use tether_node::config::{Advertise, ClusterConfig};
use tether_node::metrics::Metrics;
use tether_node::routing::cluster::{ClusterIo, ClusterNode};
use tether_node::routing::forward::PeerChannels;
use tether_node::routing::router::Router;
use tether_node::sets::env::{ActorThreads, LocalActors, NodeEnv, WallClock};
use tether_node::sets::registry::{ActorConfig, Shared};
use tether_node::store::faults::FaultyStore;

use super::{net, EPOCH_MS, GRPC_PORT};

/// A node's wall clock: the simulation's plus the node's offset.
#[derive(Debug)]
struct SimClock {
    offset_ms: i64,
}

impl WallClock for SimClock {
    fn now_ms(&self) -> u64 {
        let now = turmoil::since_epoch().map_or(EPOCH_MS, |d| {
            u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
        });
        now.saturating_add_signed(self.offset_ms)
    }
}

/// A running node, as clients reach it.
#[derive(Clone, Debug)]
pub struct NodeHandle {
    pub name: String,
    pub router: Arc<Router>,
    /// The node's host runtime: a client's request runs there, so it dies with the node.
    pub rt: tokio::runtime::Handle,
    ready: Arc<AtomicBool>,
}

impl NodeHandle {
    pub fn ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }
}

#[derive(Debug)]
struct Inner {
    names: Vec<String>,
    store: Arc<FaultyStore>,
    /// Per node: seed of its membership randomness.
    seeds: Vec<u64>,
    offsets: RefCell<Vec<i64>>,
    lives: RefCell<Vec<u64>>,
    live: RefCell<Vec<Option<NodeHandle>>>,
    /// Tells a node's life to leave the cluster.
    leave: Vec<tokio::sync::Notify>,
    /// Which nodes are members (started at once, or joined since); a spare's host waits
    /// for its join before its first life.
    joined: RefCell<Vec<bool>>,
    join: Vec<tokio::sync::Notify>,
    /// One-way cuts and lossy links on every node's connections.
    links: Arc<net::LinkFaults>,
}

/// The simulated cluster: its nodes' names, lives and handles.
#[derive(Clone, Debug)]
pub struct Cluster {
    inner: Rc<Inner>,
}

/// How a simulated node's actors behave: short passivation, so sets park and wake often.
fn actor_config() -> ActorConfig {
    ActorConfig {
        passivate_after: Duration::from_secs(3),
        max_bucket_bytes: 65_536,
        history_per_bucket: 100,
        op_ids_per_set: 10_000,
        op_id_retention: Duration::from_secs(86_400),
        fault_stall_op_prefix: None,
        templates: Arc::new(tether_node::registration::RegistrationConfig::default()),
        max_ids: 1024,
        max_answer_bytes: 4 << 20,
    }
}

impl Cluster {
    /// `n` nodes that start at once and `spares` that join when told to ([`Cluster::join`]).
    pub fn new(n: usize, spares: usize, store: Arc<FaultyStore>, rng: &mut StdRng) -> Cluster {
        let links = net::LinkFaults::new(rng.random());
        let initial = n;
        let n = n + spares;
        Cluster {
            inner: Rc::new(Inner {
                names: (0..n).map(|i| format!("n{i}")).collect(),
                store,
                seeds: (0..n).map(|_| rng.random()).collect(),
                offsets: RefCell::new(vec![0; n]),
                lives: RefCell::new(vec![0; n]),
                live: RefCell::new(vec![None; n]),
                leave: (0..n).map(|_| tokio::sync::Notify::new()).collect(),
                joined: RefCell::new((0..n).map(|i| i < initial).collect()),
                join: (0..n).map(|_| tokio::sync::Notify::new()).collect(),
                links,
            }),
        }
    }

    pub fn len(&self) -> usize {
        self.inner.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.inner.names.is_empty()
    }

    pub fn name(&self, i: usize) -> &str {
        &self.inner.names[i]
    }

    /// Registers node `i` as a host of `sim` (started at once, and again on every bounce).
    pub fn add_host(&self, sim: &mut turmoil::Sim<'_>, i: usize) {
        let cluster = self.clone();
        sim.host(self.inner.names[i].as_str(), move || {
            let cluster = cluster.clone();
            async move { cluster.life(i).await }
        });
    }

    /// The clock offset node `i` starts its next life with.
    pub fn set_offset(&self, i: usize, offset_ms: i64) {
        self.inner.offsets.borrow_mut()[i] = offset_ms;
    }

    /// The link faults of the nodes' connections.
    pub fn links(&self) -> &net::LinkFaults {
        &self.inner.links
    }

    /// The nodes that are members now (started at once, or joined).
    pub fn members(&self) -> Vec<usize> {
        (0..self.len())
            .filter(|i| self.inner.joined.borrow()[*i])
            .collect()
    }

    /// The spares that have not joined yet.
    pub fn spares(&self) -> Vec<usize> {
        (0..self.len())
            .filter(|i| !self.inner.joined.borrow()[*i])
            .collect()
    }

    /// Starts spare `i`: a node new to the cluster joins it.
    pub fn join(&self, i: usize) {
        self.inner.joined.borrow_mut()[i] = true;
        self.inner.join[i].notify_one();
    }

    /// Has node `i` leave the cluster gracefully (drain); its host stays up, idle.
    pub fn leave(&self, i: usize) {
        self.inner.leave[i].notify_one();
    }

    /// Forgets node `i`'s handle (it is about to crash).
    pub fn forget(&self, i: usize) {
        self.inner.live.borrow_mut()[i] = None;
    }

    /// The nodes that are up and serve (joined, or alone by design).
    pub fn ready_nodes(&self) -> Vec<NodeHandle> {
        self.inner
            .live
            .borrow()
            .iter()
            .flatten()
            .filter(|n| n.ready())
            .cloned()
            .collect()
    }

    async fn life(&self, i: usize) -> turmoil::Result {
        if !self.inner.joined.borrow()[i] {
            self.inner.join[i].notified().await;
        }
        let name = self.inner.names[i].clone();
        let life = {
            let mut lives = self.inner.lives.borrow_mut();
            lives[i] += 1;
            lives[i]
        };
        let offset_ms = self.inner.offsets.borrow()[i];
        let ip = turmoil::lookup(name.as_str());
        let advertise = SocketAddr::new(ip, GRPC_PORT);
        let env = NodeEnv {
            clock: Arc::new(SimClock { offset_ms }),
            actors: ActorThreads::Local(LocalActors::start()),
        };
        let store = super::node_store(self.inner.store.clone());
        let shared = Shared::with_env(name.clone(), store, Metrics::new(), actor_config(), env);
        let listener =
            turmoil::net::TcpListener::bind((IpAddr::V4(Ipv4Addr::UNSPECIFIED), GRPC_PORT)).await?;
        let seeds = self
            .inner
            .names
            .iter()
            .filter(|n| **n != name)
            .map(|n| SeedSpec {
                host: turmoil::lookup(n.as_str()).to_string(),
                port: GRPC_PORT,
            })
            .collect();
        let config = ClusterConfig {
            grpc_listen: advertise,
            advertise: Advertise::Addr(advertise),
            seeds,
            secret: ClusterSecret::new(b"tether simulated cluster secret, 32+ bytes".to_vec())?,
            tls: None,
            failure: MembershipConfig::lan(),
            // Unused: `start_with` runs the member on the simulator's runtime.
            threads: 0,
        };
        let incarnation = turmoil::since_epoch().map_or(EPOCH_MS, |d| {
            u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
        });
        let links = self.inner.links.clone();
        let io = ClusterIo {
            runtime: tokio::runtime::Handle::current(),
            serve: Box::new(move |server, stopped| {
                Box::pin(async move {
                    server
                        .serve_with_incoming_shutdown(net::incoming(listener, links), stopped)
                        .await?;
                    Ok(())
                })
            }),
            connector: Some(Arc::new(net::TurmoilConnector {
                faults: self.inner.links.clone(),
            })),
            seed: self.inner.seeds[i] ^ life.wrapping_mul(0x9e37_79b9_7f4a_7c15),
            incarnation,
            // One runtime per simulated host: nothing to gain per thread.
            channels: PeerChannels::Shared,
        };
        let node = ClusterNode::start_with(
            &config,
            advertise,
            &name,
            format!("http://{name}.sim"),
            shared,
            io,
        )?;
        self.inner.live.borrow_mut()[i] = Some(NodeHandle {
            name,
            router: node.router(),
            rt: tokio::runtime::Handle::current(),
            ready: node.ready_flag(),
        });
        // Runs until the simulation crashes the host (which drops it, node and all), or
        // until the nemesis has it leave the cluster gracefully (SIGTERM's path): then the
        // host stays up without a node until it is bounced (a new life joins again).
        let mut node = node;
        self.inner.leave[i].notified().await;
        self.forget(i);
        node.leave().await;
        std::future::pending::<()>().await;
        Ok(())
    }
}
