//! The thin async driver: runs a [`Membership`] over a [`Transport`] on tokio.
//!
//! The only place in the crate that reads a clock. It feeds received frames and timer
//! deadlines into the state machine, sends what it hands out, re-resolves the seeds
//! (`--join` names whose addresses change), publishes the live view, and on
//! [`ClusterHandle::leave`] leaves gracefully (drain).
//!
//! The view also says what the node learnt about its seeds, for the node to decide when
//! to serve: how many seed addresses other than its own the last resolution found (a
//! Kubernetes headless Service that resolves only to this pod: the first pod of a new
//! cluster), and whether a peer refused its frames (`Unauthenticated`: the cluster
//! secrets differ — such a node must not start a cluster of its own).

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::membership::{Member, Membership, MembershipEvent};
use crate::quorum::Quorum;
use crate::ring::RingPlacement;
use crate::seeds::{resolve_seeds_reporting, SeedSpec};
use crate::{ClusterError, Millis, Transport};

/// Options of the driver loop.
#[derive(Debug, Clone)]
pub struct DriverOptions {
    /// The `--join` entries, resolved now and every `reresolve_interval`.
    pub seeds: Vec<SeedSpec>,
    /// How often seed names are resolved again once the node has peers.
    pub reresolve_interval: Duration,
    /// How often they are resolved while the node knows no live peer (joining, or alone
    /// after its seeds resolved only to itself): pods that start together find each other
    /// within about this long.
    pub reresolve_alone_interval: Duration,
    /// How long leaving waits for its farewell frames to be handed over.
    pub leave_timeout: Duration,
}

impl Default for DriverOptions {
    fn default() -> Self {
        Self {
            seeds: Vec::new(),
            reresolve_interval: Duration::from_secs(30),
            reresolve_alone_interval: Duration::from_secs(1),
            leave_timeout: Duration::from_secs(2),
        }
    }
}

/// The live view a driver publishes after every change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct View {
    /// Live members, this node included, sorted by id.
    pub members: Vec<Member>,
    /// Whether this node knows at least one live peer.
    pub connected: bool,
    /// Seed addresses other than this node's own that the last resolution of `--join`
    /// found; `None` until the seeds resolved at least once (a name that does not
    /// resolve yet counts as not resolved).
    pub other_seeds: Option<usize>,
    /// The last peer that refused this node's frames as unauthenticated (its cluster
    /// secret differs); cleared when the node is connected.
    pub refused_by: Option<SocketAddr>,
    /// Whether `members` are a strict majority of the last known members
    /// ([`crate::quorum`]); the placement's ring carries the same.
    pub quorum: Quorum,
}

/// Handle on a running driver: its view, its events, and graceful leave.
#[derive(Debug)]
pub struct ClusterHandle {
    view: watch::Receiver<View>,
    events: broadcast::Sender<MembershipEvent>,
    gone: mpsc::UnboundedSender<SocketAddr>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl ClusterHandle {
    /// The view now, and a receiver that wakes on every change.
    pub fn view(&self) -> watch::Receiver<View> {
        self.view.clone()
    }

    /// Membership changes from now on. A receiver that lags far behind gets
    /// `Lagged` and should resynchronise from [`view`](Self::view).
    pub fn events(&self) -> broadcast::Receiver<MembershipEvent> {
        self.events.subscribe()
    }

    /// Where other connections to peers report a refused connection (the forward's, say):
    /// the same evidence as a refused gossip frame, acted on at once
    /// ([`Membership::peer_refused`]) instead of at the next probe.
    pub fn refusals(&self) -> PeerRefusals {
        PeerRefusals(self.gone.clone())
    }

    /// Leaves the cluster (peers learn it at once, no detection delay) and stops.
    pub async fn leave(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            if let Err(e) = task.await {
                tracing::warn!(error = %e, "membership driver ended abnormally");
            }
        }
    }
}

/// Reports to a running driver that a peer's address refused a connection
/// ([`ClusterHandle::refusals`]); does nothing once the driver stopped.
#[derive(Debug, Clone)]
pub struct PeerRefusals(mpsc::UnboundedSender<SocketAddr>);

impl From<mpsc::UnboundedSender<SocketAddr>> for PeerRefusals {
    /// Refusals sent to a channel of one's own (a driver makes its own: [`ClusterHandle::refusals`]).
    fn from(to: mpsc::UnboundedSender<SocketAddr>) -> Self {
        PeerRefusals(to)
    }
}

impl PeerRefusals {
    /// The process at `addr` refused a connection: it is gone.
    pub fn refused(&self, addr: SocketAddr) {
        let _ = self.0.send(addr);
    }
}

impl Drop for ClusterHandle {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// Starts driving `membership` over `transport` on the current tokio runtime. With a
/// `placement`, its ring follows the live view.
pub fn spawn(
    membership: Membership,
    transport: Arc<dyn Transport>,
    options: DriverOptions,
    placement: Option<Arc<RingPlacement>>,
) -> ClusterHandle {
    let initial = View {
        members: membership.members(),
        connected: membership.is_connected(),
        other_seeds: None,
        refused_by: None,
        quorum: membership.quorum(),
    };
    let (view_tx, view_rx) = watch::channel(initial);
    let (events_tx, _) = broadcast::channel(256);
    let (stop_tx, stop_rx) = oneshot::channel();
    let (refusals_tx, refusals_rx) = mpsc::unbounded_channel();
    let (gone_tx, gone_rx) = mpsc::unbounded_channel();
    let driver = Driver {
        membership,
        transport,
        options,
        placement,
        view: view_tx,
        events: events_tx.clone(),
        start: Instant::now(),
        known_seeds: BTreeSet::new(),
        other_seeds: None,
        refused_by: None,
        refusals_tx,
        refusals_rx,
        gone_tx: gone_tx.clone(),
        gone_rx,
    };
    let task = tokio::spawn(driver.run(stop_rx));
    ClusterHandle {
        view: view_rx,
        events: events_tx,
        gone: gone_tx,
        stop: Some(stop_tx),
        task: Some(task),
    }
}

struct Driver {
    membership: Membership,
    transport: Arc<dyn Transport>,
    options: DriverOptions,
    placement: Option<Arc<RingPlacement>>,
    view: watch::Sender<View>,
    events: broadcast::Sender<MembershipEvent>,
    start: Instant,
    known_seeds: BTreeSet<SocketAddr>,
    other_seeds: Option<usize>,
    refused_by: Option<SocketAddr>,
    /// Send tasks report peers that answered `Unauthenticated` here.
    refusals_tx: mpsc::UnboundedSender<SocketAddr>,
    refusals_rx: mpsc::UnboundedReceiver<SocketAddr>,
    /// Send tasks report peers whose host refused the connection (process gone) here.
    gone_tx: mpsc::UnboundedSender<SocketAddr>,
    gone_rx: mpsc::UnboundedReceiver<SocketAddr>,
}

impl Driver {
    fn now(&self) -> Millis {
        u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    async fn run(mut self, mut stop: oneshot::Receiver<()>) {
        // Resolved at once, then again after the interval that fits the node's state.
        let mut next_resolve = Instant::now();
        loop {
            self.flush();
            self.publish();
            let deadline = self
                .membership
                .poll_timeout()
                .map(|at| self.start + Duration::from_millis(at));
            tokio::select! {
                frame = self.transport.recv() => match frame {
                    Some(frame) => {
                        let now = self.now();
                        if let Err(e) = self.membership.handle_data(frame.from, &frame.payload, now) {
                            tracing::debug!(from = %frame.from, error = %e, "gossip frame refused");
                        }
                    }
                    None => {
                        tracing::warn!("gossip transport closed; membership driver stops");
                        return;
                    }
                },
                _ = sleep_until(deadline) => {
                    let now = self.now();
                    self.membership.handle_timer(now);
                }
                () = tokio::time::sleep_until(next_resolve), if !self.options.seeds.is_empty() => {
                    self.join_new_seeds().await;
                    let every = if self.membership.is_connected() {
                        self.options.reresolve_interval
                    } else {
                        self.options.reresolve_alone_interval
                    };
                    next_resolve = Instant::now() + every;
                }
                Some(peer) = self.refusals_rx.recv() => {
                    if self.refused_by.is_none() {
                        tracing::error!(%peer, "a peer refuses this node's gossip as unauthenticated: the cluster secrets differ (check --cluster-secret-file on both)");
                    }
                    self.refused_by = Some(peer);
                }
                Some(peer) = self.gone_rx.recv() => {
                    let now = self.now();
                    self.membership.peer_refused(peer, now);
                }
                _ = &mut stop => {
                    self.leave().await;
                    return;
                }
            }
        }
    }

    async fn join_new_seeds(&mut self) {
        let (seeds, all_resolved) = resolve_seeds_reporting(&self.options.seeds).await;
        let own = self.membership.local().gossip_addr;
        let others = seeds.iter().filter(|s| **s != own).count();
        if all_resolved || others > 0 {
            if others == 0 && self.other_seeds != Some(0) {
                tracing::info!(%own, "the seeds resolve only to this node");
            }
            self.other_seeds = Some(others);
        }
        for seed in seeds {
            if self.known_seeds.insert(seed) {
                let now = self.now();
                if let Err(e) = self.membership.join(seed, now) {
                    tracing::debug!(%seed, error = %e, "join");
                }
            }
        }
    }

    /// Hands every pending frame to the transport, each send on its own task so a
    /// slow peer delays nobody (SWIM's timeouts cover lost frames).
    fn flush(&mut self) {
        while let Some((to, payload)) = self.membership.poll_transmit() {
            let transport = Arc::clone(&self.transport);
            let refusals = self.refusals_tx.clone();
            let gone = self.gone_tx.clone();
            tokio::spawn(async move {
                match transport.send(to, payload).await {
                    Ok(()) => {}
                    Err(ClusterError::PeerRefused { addr }) => {
                        tracing::debug!(%to, "gossip: connection refused");
                        let _ = gone.send(addr);
                    }
                    Err(ClusterError::Unauthenticated(why)) => {
                        tracing::debug!(%to, why, "gossip refused");
                        let _ = refusals.send(to);
                    }
                    Err(e) => tracing::debug!(%to, error = %e, "gossip send"),
                }
            });
        }
    }

    fn publish(&mut self) {
        let mut changed = false;
        while let Some(event) = self.membership.poll_event() {
            match &event {
                MembershipEvent::MemberUp(m) => {
                    tracing::info!(node = %m.id, addr = %m.gossip_addr, incarnation = m.incarnation, "member up");
                }
                MembershipEvent::MemberDown(m) => {
                    tracing::info!(node = %m.id, addr = %m.gossip_addr, "member down");
                }
                MembershipEvent::MemberLeft(m) => {
                    tracing::info!(node = %m.id, addr = %m.gossip_addr, "member left the cluster (drained, or its process is gone): no longer counted for the quorum");
                }
            }
            // No receiver is fine: the view carries the same information.
            let _ = self.events.send(event);
            changed = true;
        }
        let connected = self.membership.is_connected();
        if connected {
            self.refused_by = None;
        }
        let quorum = self.membership.quorum();
        let seen = {
            let v = self.view.borrow();
            (v.connected, v.other_seeds, v.refused_by, v.quorum)
        };
        if changed || seen != (connected, self.other_seeds, self.refused_by, quorum) {
            let members = self.membership.members();
            if changed || seen.0 != connected || seen.3 != quorum {
                if let Some(placement) = &self.placement {
                    placement.set_view(&members, quorum);
                }
                if seen.3.holds() != quorum.holds() {
                    if quorum.holds() {
                        tracing::info!(
                            reachable = quorum.reachable,
                            last_known = quorum.last_known,
                            "reaching a majority of the cluster again"
                        );
                    } else {
                        tracing::warn!(
                            reachable = quorum.reachable,
                            last_known = quorum.last_known,
                            "cut off from the majority of the cluster: no quorum"
                        );
                    }
                }
            }
            self.view.send_replace(View {
                members,
                connected,
                other_seeds: self.other_seeds,
                refused_by: self.refused_by,
                quorum,
            });
        }
    }

    async fn leave(&mut self) {
        let now = self.now();
        if let Err(e) = self.membership.leave(now) {
            tracing::debug!(error = %e, "leave");
        }
        let mut sends = Vec::new();
        while let Some((to, payload)) = self.membership.poll_transmit() {
            let transport = Arc::clone(&self.transport);
            sends.push(async move { transport.send(to, payload).await });
        }
        let all = futures_join_all(sends);
        if tokio::time::timeout(self.options.leave_timeout, all)
            .await
            .is_err()
        {
            tracing::warn!("leave: farewell frames not all handed over in time");
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Awaits every future (a tiny `join_all`, to keep `futures` out of the dependencies).
async fn futures_join_all<F>(futures: Vec<F>)
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futures.into_iter().map(tokio::spawn).collect();
    for handle in handles {
        let _ = handle.await;
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::*;
    use crate::membership::{MembershipConfig, NodeId};
    use crate::transport::grpc::{GrpcOptions, GrpcTransport};
    use crate::ClusterSecret;

    fn fast() -> MembershipConfig {
        MembershipConfig {
            probe_period: Duration::from_millis(200),
            probe_rtt: Duration::from_millis(100),
            suspect_to_down_after: Duration::from_millis(600),
            gossip_interval: Duration::from_millis(50),
            rejoin_interval: Duration::from_millis(200),
            ..MembershipConfig::lan()
        }
    }

    async fn node(id: &str, seeds: &[SocketAddr]) -> (ClusterHandle, Member) {
        node_with(id, seeds, fast()).await
    }

    async fn node_with(
        id: &str,
        seeds: &[SocketAddr],
        config: MembershipConfig,
    ) -> (ClusterHandle, Member) {
        let secret = ClusterSecret::new(b"driver-test-secret-0123".to_vec()).expect("secret");
        let transport = GrpcTransport::bind(
            SocketAddr::from(([127, 0, 0, 1], 0)),
            secret,
            GrpcOptions::default(),
        )
        .await
        .expect("bind");
        let local = Member {
            id: NodeId::new(id),
            gossip_addr: transport.local_addr(),
            public_url: format!("http://{id}.example"),
            incarnation: 1,
        };
        let membership = Membership::new(local.clone(), config, 7).expect("config");
        let options = DriverOptions {
            seeds: seeds
                .iter()
                .map(|s| crate::seeds::SeedSpec {
                    host: s.ip().to_string(),
                    port: s.port(),
                })
                .collect(),
            ..DriverOptions::default()
        };
        (spawn(membership, Arc::new(transport), options, None), local)
    }

    async fn wait_for(view: &mut watch::Receiver<View>, what: &str, pred: impl Fn(&View) -> bool) {
        let waited = tokio::time::timeout(Duration::from_secs(20), view.wait_for(|v| pred(v)))
            .await
            .map(|r| r.is_ok());
        assert!(
            matches!(waited, Ok(true)),
            "timed out waiting for {what}: {:?}",
            *view.borrow()
        );
    }

    #[tokio::test]
    async fn two_nodes_join_over_grpc_and_a_leave_is_seen_at_once() {
        let (a, a_member) = node("a", &[]).await;
        let (b, b_member) = node("b", &[a_member.gossip_addr]).await;

        let mut view_a = a.view();
        wait_for(&mut view_a, "a to see b", |v| v.members.contains(&b_member)).await;
        let mut view_b = b.view();
        wait_for(&mut view_b, "b to see a", |v| v.members.contains(&a_member)).await;
        assert!(view_a.borrow().connected && view_b.borrow().connected);

        b.leave().await;
        wait_for(&mut view_a, "a to see b leave", |v| {
            v.members == vec![a_member.clone()]
        })
        .await;
        a.leave().await;
    }

    /// A peer killed without leaving (its port now refuses connections) is declared down
    /// on the first refusal: long before the suspicion timeout — set here to 10 minutes,
    /// so only the refusal can explain it.
    #[tokio::test]
    async fn a_killed_peer_is_down_at_its_first_refusal_not_after_suspicion() {
        let patient = MembershipConfig {
            suspect_to_down_after: Duration::from_secs(600),
            ..fast()
        };
        let (a, a_member) = node_with("a", &[], patient.clone()).await;
        let (b, b_member) = node_with("b", &[a_member.gossip_addr], patient).await;
        let mut view_a = a.view();
        wait_for(&mut view_a, "a to see b", |v| v.members.contains(&b_member)).await;
        // Killed: its task and transport dropped, no farewell.
        drop(b);
        wait_for(&mut view_a, "a to declare the killed b down", |v| {
            v.members == vec![a_member.clone()]
        })
        .await;
        a.leave().await;
    }
}
