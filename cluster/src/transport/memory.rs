//! An in-memory network for tests: unbounded channels between bound addresses, with
//! a partition (one side cut off from the rest), heal, and kill (the address stops
//! receiving and sending until it is bound again, as a restarted process would).
//!
//! Delivery is immediate, so a test that drains [`Transport::try_recv`] on every node
//! after every step runs the whole cluster deterministically on a simulated clock.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use bytes::Bytes;
use tokio::sync::mpsc;

use super::{Frame, Transport};
use crate::ClusterError;

#[derive(Debug, Default)]
struct Net {
    /// Bound addresses: the generation of the binding and its queue.
    endpoints: HashMap<SocketAddr, (u64, mpsc::UnboundedSender<Frame>)>,
    generation: u64,
    /// When set, addresses inside it reach only each other, the rest only the rest.
    partition: Option<HashSet<SocketAddr>>,
    dropped: u64,
    delivered: u64,
}

impl Net {
    fn reachable(&self, a: SocketAddr, b: SocketAddr) -> bool {
        match &self.partition {
            Some(side) => side.contains(&a) == side.contains(&b),
            None => true,
        }
    }
}

/// The shared medium; clone it to hand to each node's [`MemoryTransport`].
#[derive(Debug, Clone, Default)]
pub struct MemoryNetwork {
    net: Arc<Mutex<Net>>,
}

impl MemoryNetwork {
    /// An empty network.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Net> {
        self.net.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Binds `addr`. Binding a killed address revives it with an empty queue (a
    /// restart); binding a live one replaces it (its old transport is closed).
    pub fn bind(&self, addr: SocketAddr) -> MemoryTransport {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut net = self.lock();
        net.generation += 1;
        let generation = net.generation;
        net.endpoints.insert(addr, (generation, tx));
        drop(net);
        MemoryTransport {
            addr,
            generation,
            network: self.clone(),
            rx: Mutex::new(rx),
        }
    }

    /// Kills `addr`: queued and future frames to it are lost, its own sends fail, its
    /// transport's `recv` ends.
    pub fn kill(&self, addr: SocketAddr) {
        self.lock().endpoints.remove(&addr);
    }

    /// Cuts `side` off from every other address (replacing any previous partition).
    pub fn partition(&self, side: &[SocketAddr]) {
        self.lock().partition = Some(side.iter().copied().collect());
    }

    /// Removes the partition.
    pub fn heal(&self) {
        self.lock().partition = None;
    }

    /// Frames delivered and frames lost to partitions so far.
    pub fn stats(&self) -> (u64, u64) {
        let net = self.lock();
        (net.delivered, net.dropped)
    }
}

/// One node's endpoint on a [`MemoryNetwork`].
#[derive(Debug)]
pub struct MemoryTransport {
    addr: SocketAddr,
    generation: u64,
    network: MemoryNetwork,
    rx: Mutex<mpsc::UnboundedReceiver<Frame>>,
}

impl MemoryTransport {
    fn send_now(&self, to: SocketAddr, payload: Bytes) -> Result<(), ClusterError> {
        let mut net = self.network.lock();
        let alive = net
            .endpoints
            .get(&self.addr)
            .is_some_and(|(generation, _)| *generation == self.generation);
        if !alive {
            return Err(ClusterError::Closed);
        }
        if !net.reachable(self.addr, to) {
            net.dropped += 1;
            return Ok(());
        }
        let Some((_, tx)) = net.endpoints.get(&to) else {
            return Err(ClusterError::PeerUnreachable {
                addr: to,
                reason: "nothing bound at this address".into(),
            });
        };
        let frame = Frame {
            from: self.addr,
            payload,
        };
        if tx.send(frame).is_err() {
            return Err(ClusterError::PeerUnreachable {
                addr: to,
                reason: "receiver gone".into(),
            });
        }
        net.delivered += 1;
        Ok(())
    }
}

#[async_trait::async_trait]
impl Transport for MemoryTransport {
    fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    async fn send(&self, to: SocketAddr, payload: Bytes) -> Result<(), ClusterError> {
        self.send_now(to, payload)
    }

    async fn recv(&self) -> Option<Frame> {
        // Unbounded channel: `recv` only waits for a sender, so poll it without holding
        // the std mutex across an await.
        std::future::poll_fn(|cx| {
            self.rx
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .poll_recv(cx)
        })
        .await
    }

    fn try_recv(&self) -> Option<Frame> {
        self.rx
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .try_recv()
            .ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    #[tokio::test]
    async fn frames_flow_until_partition_and_again_after_heal() {
        let net = MemoryNetwork::new();
        let a = net.bind(addr(1));
        let b = net.bind(addr(2));
        a.send(addr(2), Bytes::from_static(b"hi"))
            .await
            .expect("sent");
        assert_eq!(
            b.recv().await,
            Some(Frame {
                from: addr(1),
                payload: Bytes::from_static(b"hi")
            })
        );

        net.partition(&[addr(1)]);
        a.send(addr(2), Bytes::from_static(b"lost"))
            .await
            .expect("loss is not an error");
        assert_eq!(b.try_recv(), None);

        net.heal();
        b.send(addr(1), Bytes::from_static(b"back"))
            .await
            .expect("sent");
        assert_eq!(
            a.try_recv().map(|f| f.payload),
            Some(Bytes::from_static(b"back"))
        );
        assert_eq!(net.stats(), (2, 1));
    }

    #[tokio::test]
    async fn killed_address_neither_sends_nor_receives_until_rebound() {
        let net = MemoryNetwork::new();
        let a = net.bind(addr(1));
        let b = net.bind(addr(2));
        net.kill(addr(2));
        assert!(matches!(
            a.send(addr(2), Bytes::new()).await,
            Err(ClusterError::PeerUnreachable { .. })
        ));
        assert!(matches!(
            b.send(addr(1), Bytes::new()).await,
            Err(ClusterError::Closed)
        ));
        assert_eq!(b.recv().await, None, "a killed transport's recv ends");

        let b2 = net.bind(addr(2));
        a.send(addr(2), Bytes::from_static(b"again"))
            .await
            .expect("sent");
        assert_eq!(b2.try_recv().map(|f| f.from), Some(addr(1)));
    }
}
