//! Cluster mode: joins the node to its peers and keeps ownership current.
//!
//! [`ClusterNode::start`] runs, on a runtime of its own (`--cluster-threads`; so
//! inter-node traffic never waits behind HTTP workers) or on the node's main thread
//! (`--cluster-threads 0`, the default on up to 2 CPUs): the internal gRPC server
//! (gossip + forwarding, both authenticated with the cluster secret, over mTLS when
//! certificates are configured), the SWIM membership driver (foca, via
//! `tether_cluster::driver`), which keeps the [`RingPlacement`] current, and a watcher
//! that hands off the sets this node no longer owns whenever the view changes.
//! [`ClusterNode::drain`] leaves gracefully (SIGTERM).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::future::BoxFuture;
use tether_cluster::driver::{self, ClusterHandle, DriverOptions};
use tether_cluster::transport::grpc::{GrpcOptions, GrpcTransport};
use tether_cluster::{Member, Membership, NodeId, RingPlacement};
use tokio::sync::oneshot;

use crate::config::ClusterConfig;
use crate::error::{NodeError, Result};
use crate::routing::forward::{PeerChannels, Peers, SetsService};
use crate::routing::router::Router;
use crate::security::cluster_tls::{self, ClusterTls, TlsConnector};
use crate::sets::registry::Shared;

/// Virtual nodes per member on the ring.
pub const VNODES: u32 = 256;
/// A node given seeds that finds none of them alive for this long starts serving alone
/// (a whole cluster restarting: someone has to be first). Fencing keeps a split safe, and
/// the membership's seed re-announce merges it later. A node whose seeds resolve only to
/// itself does not wait; a node a peer refused (another cluster secret) never starts
/// alone.
pub const ALONE_AFTER: Duration = Duration::from_secs(15);

/// Why a node that has not joined yet may start serving, from what its membership driver
/// published ([`tether_cluster::driver::View`]) and whether [`ALONE_AFTER`] passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Readiness {
    /// Not yet: still looking for its peers.
    Joining,
    /// Not until it joins: a peer refused its frames (the cluster secrets differ), so
    /// starting a cluster of its own would split the fleet.
    Refused,
    /// Joined: it knows at least one live peer.
    Joined,
    /// Its seeds resolve only to itself: the first node of a new cluster.
    OnlySelf,
    /// No seed answered within [`ALONE_AFTER`] and none refused it.
    Alone,
}

impl Readiness {
    /// The decision for `view`, `alone_elapsed` telling whether [`ALONE_AFTER`] passed.
    pub fn of(view: &tether_cluster::driver::View, alone_elapsed: bool) -> Readiness {
        if view.connected {
            Readiness::Joined
        } else if view.refused_by.is_some() {
            Readiness::Refused
        } else if view.other_seeds == Some(0) {
            Readiness::OnlySelf
        } else if alone_elapsed {
            Readiness::Alone
        } else {
            Readiness::Joining
        }
    }

    /// Whether the node serves (answers `/readyz` with 200).
    pub fn serves(self) -> bool {
        matches!(
            self,
            Readiness::Joined | Readiness::OnlySelf | Readiness::Alone
        )
    }
}
/// How often the pause detector ticks, and the gap between ticks that means this node
/// was paused (SIGSTOP, a VM or cgroup freeze, starvation).
const PAUSE_TICK: Duration = Duration::from_millis(100);
const PAUSE_GAP: Duration = Duration::from_millis(1000);

/// Notices that this node was paused — its monotonic clock jumped between two ticks — and
/// has every actor holding subscriptions confirm its lease: other nodes may have taken
/// its sets meanwhile (reads confirm by themselves, invariant 23).
async fn watch_for_pauses(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(PAUSE_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last = tokio::time::Instant::now();
    loop {
        tick.tick().await;
        let gap = last.elapsed();
        last = tokio::time::Instant::now();
        if gap >= PAUSE_GAP {
            let asked = shared.revalidate_held();
            tracing::warn!(
                paused_ms = gap.as_millis() as u64,
                actors = asked,
                "this node was paused: confirming the leases of sets with held subscriptions"
            );
        }
    }
}

/// Concurrent calls one peer may have open on this node (held subscriptions included).
const MAX_STREAMS_PER_PEER: u32 = 1 << 20;

/// Counts the membership's events in `tether_cluster_member_changes_total`.
async fn count_member_changes(
    mut events: tokio::sync::broadcast::Receiver<tether_cluster::MembershipEvent>,
    shared: Arc<Shared>,
) {
    use tether_cluster::MembershipEvent as E;
    use tokio::sync::broadcast::error::RecvError;
    loop {
        match events.recv().await {
            Ok(E::MemberUp(_)) => shared.metrics.member_change("up"),
            Ok(E::MemberDown(_)) => shared.metrics.member_change("down"),
            Ok(E::MemberLeft(_)) => shared.metrics.member_change("left"),
            Err(RecvError::Lagged(n)) => {
                tracing::warn!(
                    missed = n,
                    "member change counter fell behind the membership"
                )
            }
            Err(RecvError::Closed) => return,
        }
    }
}

/// A running cluster member.
#[derive(Debug)]
pub struct ClusterNode {
    router: Arc<Router>,
    placement: Arc<RingPlacement>,
    membership: Option<ClusterHandle>,
    ready: Arc<AtomicBool>,
    stop_grpc: Option<oneshot::Sender<()>>,
    /// Where its tasks run.
    handle: tokio::runtime::Handle,
    /// The runtime it made for itself ([`ClusterNode::start`]), shut down with it.
    runtime: Option<tokio::runtime::Runtime>,
}

/// Serves the internal gRPC services until the future given resolves.
pub type Serve = Box<
    dyn FnOnce(
            tonic::transport::server::Router,
            BoxFuture<'static, ()>,
        ) -> BoxFuture<
            'static,
            std::result::Result<(), Box<dyn std::error::Error + Send + Sync>>,
        > + Send,
>;

/// What a cluster member takes from outside ([`ClusterNode::start_with`]): a real node
/// makes its own ([`ClusterNode::start`]); the cluster simulator gives each simulated node
/// its host's runtime and network and a seed.
pub struct ClusterIo {
    /// The runtime its tasks (gossip, forwarding connections, watchers) run on.
    pub runtime: tokio::runtime::Handle,
    /// Serves the internal gRPC port.
    pub serve: Serve,
    /// How it connects to peers (`None`: plain TCP).
    pub connector: Option<Arc<dyn tether_cluster::transport::grpc::PeerConnector>>,
    /// The membership's randomness (probe order, gossip targets).
    pub seed: u64,
    /// This life of the node: larger than any earlier one's.
    pub incarnation: u64,
    /// Where the forward's channels to peers run their connections.
    pub channels: PeerChannels,
}

impl std::fmt::Debug for ClusterIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterIo")
            .field("seed", &self.seed)
            .field("incarnation", &self.incarnation)
            .finish_non_exhaustive()
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(1, |d| d.as_millis() as u64)
}

impl ClusterNode {
    /// Binds the internal gRPC port, starts gossip and returns the node's router. A node of
    /// one HTTP worker (`http_workers`) whose cluster runs on its main thread gives each
    /// calling thread its own channel to a peer ([`PeerChannels::PerThread`]).
    pub fn start(
        config: &ClusterConfig,
        advertise: std::net::SocketAddr,
        node_id: &str,
        public_url: String,
        shared: Arc<Shared>,
        http_workers: usize,
    ) -> Result<ClusterNode> {
        // `--cluster-threads`: a runtime of its own, or (0) the runtime this is called on,
        // the node's main thread.
        let runtime = match config.threads {
            0 => None,
            n => Some(
                tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(n)
                    .thread_name("tether-cluster")
                    .enable_all()
                    .build()
                    .map_err(|e| NodeError::Config(format!("cluster runtime: {e}")))?,
            ),
        };
        let handle = match &runtime {
            Some(rt) => rt.handle().clone(),
            None => tokio::runtime::Handle::try_current()
                .map_err(|e| NodeError::Config(format!("cluster on the main runtime: {e}")))?,
        };
        let listener = std::net::TcpListener::bind(config.grpc_listen)
            .and_then(|l| l.set_nonblocking(true).map(|()| l))
            .map_err(|e| {
                NodeError::Config(format!("binding --grpc-listen {}: {e}", config.grpc_listen))
            })?;
        let watched = if runtime.is_some() { "cluster" } else { "main" };
        shared.metrics.watch_runtime(watched, handle.clone());
        // mTLS both ways when configured: peers dial with this node's certificate and the
        // internal server accepts only certificates of the cluster CA. Its files are
        // watched on this runtime.
        let tls = {
            let _on = handle.enter();
            config.tls.as_ref().map(ClusterTls::start).transpose()?
        };
        let connector = tls.clone().map(TlsConnector::connector);
        // Registered with the runtime that serves it, so its readiness wakes no other.
        let listener = {
            let _on = handle.enter();
            tokio::net::TcpListener::from_std(listener)
                .map_err(|e| NodeError::Config(format!("--grpc-listen: {e}")))?
        };
        let serve: Serve = Box::new(move |server, stopped| {
            Box::pin(async move {
                match tls {
                    Some(tls) => {
                        server
                            .serve_with_incoming_shutdown(
                                cluster_tls::incoming(listener, tls),
                                stopped,
                            )
                            .await?
                    }
                    None => {
                        let incoming = tonic::transport::server::TcpIncoming::from(listener)
                            .with_nodelay(Some(true));
                        server
                            .serve_with_incoming_shutdown(incoming, stopped)
                            .await?
                    }
                }
                Ok(())
            })
        });
        let io = ClusterIo {
            runtime: handle,
            serve,
            connector,
            seed: rand::random::<u64>(),
            // A restarted node is a newer life of the same id and wins at once.
            incarnation: now_ms(),
            channels: if runtime.is_none() && http_workers == 1 {
                PeerChannels::PerThread
            } else {
                PeerChannels::Shared
            },
        };
        let mut node = Self::start_with(config, advertise, node_id, public_url, shared, io)?;
        node.runtime = runtime;
        Ok(node)
    }

    /// Joins with what `io` gives (the simulator's runtime, network and seed): the same
    /// cluster member as [`start`](Self::start), whose tasks run on `io.runtime`.
    pub fn start_with(
        config: &ClusterConfig,
        advertise: std::net::SocketAddr,
        node_id: &str,
        public_url: String,
        shared: Arc<Shared>,
        io: ClusterIo,
    ) -> Result<ClusterNode> {
        let ClusterIo {
            runtime,
            serve,
            connector,
            seed,
            incarnation,
            channels,
        } = io;
        let local = Member {
            id: NodeId::new(node_id),
            gossip_addr: advertise,
            public_url,
            incarnation,
        };
        let placement = Arc::new(RingPlacement::new(local.clone(), VNODES));
        let peers = Peers::new(
            config.secret.clone(),
            shared.metrics.clone(),
            runtime.clone(),
            connector.clone(),
            channels,
        );
        let router = Router::clustered(shared.clone(), placement.clone(), local.clone(), peers);
        let (transport, gossip) = GrpcTransport::new(
            advertise,
            config.secret.clone(),
            GrpcOptions {
                connector,
                ..GrpcOptions::default()
            },
        );
        let sets = SetsService::server(router.clone(), config.secret.clone());

        let _on = runtime.enter();
        let (stop_grpc, stopped) = oneshot::channel::<()>();
        let grpc_addr = config.grpc_listen;
        runtime.spawn(async move {
            let server = tonic::transport::Server::builder()
                .max_concurrent_streams(Some(MAX_STREAMS_PER_PEER))
                .http2_keepalive_interval(Some(Duration::from_secs(5)))
                .http2_keepalive_timeout(Some(Duration::from_secs(5)))
                .add_service(gossip)
                .add_service(sets);
            let stopped = Box::pin(async {
                let _ = stopped.await;
            });
            if let Err(e) = serve(server, stopped).await {
                tracing::error!(error = %e, %grpc_addr, "internal gRPC server stopped");
            }
        });

        let membership = Membership::new(local.clone(), config.failure.clone(), seed)
            .map_err(|e| NodeError::Config(format!("membership: {e}")))?;
        let has_seeds = !config.seeds.is_empty();
        let handle = driver::spawn(
            membership,
            Arc::new(transport),
            DriverOptions {
                seeds: config.seeds.clone(),
                ..DriverOptions::default()
            },
            Some(placement.clone()),
        );
        if let Ok(peers) = router.peers() {
            peers.report_refusals_to(handle.refusals());
        }
        runtime.spawn(watch_for_pauses(shared.clone()));
        runtime.spawn(count_member_changes(handle.events(), shared.clone()));
        let ready = Arc::new(AtomicBool::new(!has_seeds));
        let mut view = handle.view();
        let (watch_shared, watch_ready) = (shared, ready.clone());
        runtime.spawn(async move {
            let alone = tokio::time::sleep(ALONE_AFTER);
            tokio::pin!(alone);
            let mut alone_elapsed = false;
            let mut last = Readiness::Joining;
            let mut known: Vec<tether_cluster::NodeId> = Vec::new();
            loop {
                let (members, readiness, appeared) = {
                    let v = view.borrow_and_update();
                    let ids: Vec<_> = v.members.iter().map(|m| m.id.clone()).collect();
                    let appeared = ids.iter().any(|id| !known.contains(id));
                    known = ids;
                    (v.members.len(), Readiness::of(&v, alone_elapsed), appeared)
                };
                watch_shared.metrics.cluster_members(members);
                if readiness != last && !watch_ready.load(Ordering::Acquire) {
                    match readiness {
                        Readiness::Joined => tracing::info!(members, "joined the cluster; ready"),
                        Readiness::OnlySelf => tracing::info!("the seeds resolve only to this node: starting a new cluster; ready"),
                        Readiness::Alone => tracing::warn!(after_s = ALONE_AFTER.as_secs(), "no seed answered; serving as a new cluster (peers that appear later merge in)"),
                        Readiness::Refused => tracing::error!("refused by the cluster (another cluster secret): not serving until this node can join"),
                        Readiness::Joining => {}
                    }
                    last = readiness;
                }
                if readiness.serves() {
                    watch_ready.store(true, Ordering::Release);
                }
                let moved = watch_shared.hand_off_lost_sets();
                if moved > 0 {
                    tracing::info!(moved, members, "view changed: handing off sets this node no longer owns");
                }
                // A peer (re)appeared: this node may have been cut off, and sets it kept
                // taken meanwhile; their held subscribers must not wait for changes that
                // never come here.
                if appeared {
                    watch_shared.revalidate_held();
                }
                tokio::select! {
                    changed = view.changed() => if changed.is_err() { return },
                    () = &mut alone, if !alone_elapsed => alone_elapsed = true,
                }
            }
        });
        tracing::info!(node = %local.id, grpc = %config.grpc_listen, %advertise, seeds = config.seeds.len(), cluster_secrets = ?config.secret.key_ids(), mtls = config.tls.is_some(), "cluster mode");
        drop(_on);
        Ok(ClusterNode {
            router,
            placement,
            membership: Some(handle),
            ready,
            stop_grpc: Some(stop_grpc),
            handle: runtime,
            runtime: None,
        })
    }

    /// The router requests go through.
    pub fn router(&self) -> Arc<Router> {
        self.router.clone()
    }

    /// Where registration sends each device (the owner's public URL).
    pub fn placement(&self) -> Arc<dyn tether_cluster::Placement> {
        self.placement.clone()
    }

    /// A flag that turns true once the node has joined (or started a new cluster).
    pub fn ready_flag(&self) -> Arc<AtomicBool> {
        self.ready.clone()
    }

    /// Graceful leave: peers learn it at once and take over this node's sets; from then
    /// on this node places nothing on itself and hands off every set it holds (queued
    /// writes committed, held subscriptions answered so their clients resubscribe).
    pub async fn leave(&mut self) {
        if let Some(handle) = self.membership.take() {
            let left = self.handle.spawn(handle.leave());
            if tokio::time::timeout(Duration::from_secs(5), left)
                .await
                .is_err()
            {
                tracing::warn!("leaving the cluster took too long; peers will detect it");
            }
        }
        self.placement.retire();
        let moved = self.router.shared().hand_off_lost_sets();
        tracing::info!(moved, "left the cluster; handing off every set");
    }

    /// Stops the internal gRPC server and the cluster runtime.
    pub fn stop(&mut self) {
        if let Some(stop) = self.stop_grpc.take() {
            let _ = stop.send(());
        }
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

impl Drop for ClusterNode {
    fn drop(&mut self) {
        if let Some(stop) = self.stop_grpc.take() {
            let _ = stop.send(());
        }
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

#[cfg(test)]
mod tests {
    use tether_cluster::driver::View;

    use super::*;

    fn view(connected: bool, other_seeds: Option<usize>, refused: bool) -> View {
        View {
            members: Vec::new(),
            connected,
            other_seeds,
            refused_by: refused.then(|| ([10, 0, 0, 9], 7000).into()),
            quorum: tether_cluster::Quorum::ALONE,
        }
    }

    /// When a node that has not joined yet starts serving.
    #[test]
    fn readiness_table() {
        use Readiness::*;
        let cases = [
            // connected, other seeds, refused, ALONE_AFTER passed → decision
            (false, None, false, false, Joining),
            (false, Some(2), false, false, Joining),
            (false, Some(0), false, false, OnlySelf),
            (false, Some(2), false, true, Alone),
            (false, None, false, true, Alone),
            (false, Some(2), true, false, Refused),
            (false, Some(0), true, false, Refused),
            (false, Some(2), true, true, Refused),
            (true, Some(2), false, false, Joined),
            (true, Some(0), false, true, Joined),
        ];
        for (connected, others, refused, elapsed, expected) in cases {
            let got = Readiness::of(&view(connected, others, refused), elapsed);
            assert_eq!(got, expected, "{connected} {others:?} {refused} {elapsed}");
        }
        assert!(!Joining.serves() && !Refused.serves());
        assert!(Joined.serves() && OnlySelf.serves() && Alone.serves());
    }
}
