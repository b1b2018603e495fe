//! tonic over turmoil's simulated TCP: the nodes' gRPC server takes its connections from
//! [`incoming`], and their channels to peers dial through [`TurmoilConnector`] (the
//! cluster's `PeerConnector` seam, where a real node puts its mTLS connector). Used only
//! inside a simulated host: turmoil's sockets find their world in a thread-local.
//!
//! Every connection also passes [`LinkFaults`], the faults turmoil cannot make with TCP's
//! semantics: a link cut in one direction only (what one side writes waits until the cut
//! heals, as TCP retransmits across a one-way partition; the other direction flows), and a
//! lossy link (a write now and then waits a retransmission timeout first). turmoil's own
//! `partition_oneway` and fail rate drop segments that its TCP never sends again.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use futures::Stream;
use hyper_util::rt::TokioIo;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tether_cluster::transport::grpc::{BoxedIo, PeerConnector};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::transport::server::{Connected, TcpConnectInfo};

/// A pending `accept()` of a simulated listener.
type Accepting =
    Pin<Box<dyn Future<Output = io::Result<(turmoil::net::TcpStream, SocketAddr)>> + Send>>;

/// How long a lost segment waits before TCP sends it again (Linux's minimum RTO).
const RETRANSMIT: Duration = Duration::from_millis(200);

#[derive(Debug)]
struct Faults {
    /// (from, to): what `from` writes to `to` waits.
    cut: BTreeSet<(IpAddr, IpAddr)>,
    /// (from, to) → the chance that a write is lost once (and sent again after
    /// [`RETRANSMIT`], doubling while it keeps being lost).
    lossy: BTreeMap<(IpAddr, IpAddr), f64>,
    rng: StdRng,
    waiting: Vec<Waker>,
}

/// The link faults of one simulation, shared by every connection of its nodes.
#[derive(Debug)]
pub struct LinkFaults {
    inner: Mutex<Faults>,
}

impl LinkFaults {
    pub fn new(seed: u64) -> Arc<LinkFaults> {
        Arc::new(LinkFaults {
            inner: Mutex::new(Faults {
                cut: BTreeSet::new(),
                lossy: BTreeMap::new(),
                rng: StdRng::seed_from_u64(seed),
                waiting: Vec::new(),
            }),
        })
    }

    fn faults(&self) -> std::sync::MutexGuard<'_, Faults> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Cuts `from → to` (the other direction flows).
    pub fn cut_oneway(&self, from: IpAddr, to: IpAddr) {
        self.faults().cut.insert((from, to));
    }

    /// Loses writes on `a ↔ b` with probability `p` each time.
    pub fn lossy(&self, a: IpAddr, b: IpAddr, p: f64) {
        let mut f = self.faults();
        f.lossy.insert((a, b), p);
        f.lossy.insert((b, a), p);
    }

    /// Heals every cut and lossy link; what waited is written now.
    pub fn heal(&self) {
        let mut f = self.faults();
        f.cut.clear();
        f.lossy.clear();
        for w in f.waiting.drain(..) {
            w.wake();
        }
    }

    /// `Ready(None)` when a write `from → to` may go now; `Ready(Some(d))` when it is lost
    /// and goes again after `d`; `Pending` while the direction is cut.
    fn admit(&self, from: IpAddr, to: IpAddr, cx: &mut Context<'_>) -> Poll<Option<Duration>> {
        let mut f = self.faults();
        if f.cut.contains(&(from, to)) {
            f.waiting.push(cx.waker().clone());
            return Poll::Pending;
        }
        let Some(p) = f.lossy.get(&(from, to)).copied() else {
            return Poll::Ready(None);
        };
        let mut wait = Duration::ZERO;
        let mut rto = RETRANSMIT;
        while f.rng.random_bool(p.clamp(0.0, 0.9)) {
            wait += rto;
            rto *= 2;
        }
        Poll::Ready((!wait.is_zero()).then_some(wait))
    }
}

/// A simulated TCP stream whose writes pass the [`LinkFaults`].
pub struct FaultyStream {
    inner: turmoil::net::TcpStream,
    local: IpAddr,
    remote: SocketAddr,
    faults: Arc<LinkFaults>,
    /// A lost write's retransmission timer.
    resend: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl FaultyStream {
    fn new(inner: turmoil::net::TcpStream, remote: SocketAddr, faults: Arc<LinkFaults>) -> Self {
        let local = inner
            .local_addr()
            .map_or(IpAddr::from([0, 0, 0, 0]), |a| a.ip());
        FaultyStream {
            inner,
            local,
            remote,
            faults,
            resend: None,
        }
    }

    /// Waits for the link to take a write.
    fn poll_link(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            if let Some(timer) = self.resend.as_mut() {
                std::task::ready!(timer.as_mut().poll(cx));
                self.resend = None;
                return Poll::Ready(());
            }
            match std::task::ready!(self.faults.admit(self.local, self.remote.ip(), cx)) {
                None => return Poll::Ready(()),
                Some(wait) => self.resend = Some(Box::pin(tokio::time::sleep(wait))),
            }
        }
    }
}

impl fmt::Debug for FaultyStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FaultyStream")
            .field("local", &self.local)
            .field("remote", &self.remote)
            .finish_non_exhaustive()
    }
}

impl AsyncRead for FaultyStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for FaultyStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        std::task::ready!(self.poll_link(cx));
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The connections `listener` accepts, for `serve_with_incoming`.
pub fn incoming(listener: turmoil::net::TcpListener, faults: Arc<LinkFaults>) -> SimIncoming {
    SimIncoming::new(listener, faults)
}

/// [`PeerConnector`] that dials through turmoil's simulated network.
#[derive(Debug, Clone)]
pub struct TurmoilConnector {
    pub faults: Arc<LinkFaults>,
}

impl PeerConnector for TurmoilConnector {
    fn connect(
        &self,
        addr: SocketAddr,
    ) -> Pin<Box<dyn Future<Output = io::Result<BoxedIo>> + Send>> {
        let faults = self.faults.clone();
        Box::pin(async move {
            let stream = turmoil::net::TcpStream::connect(addr).await?;
            Ok(Box::new(TokioIo::new(FaultyStream::new(stream, addr, faults))) as BoxedIo)
        })
    }
}

/// An accepted connection is a [`FaultyStream`] too; `ConnectInfo` is tonic's own
/// `TcpConnectInfo`, so server code that calls `request.remote_addr()` (which only looks
/// for `TcpConnectInfo` / TLS info) works unchanged in the simulation.
impl Connected for FaultyStream {
    type ConnectInfo = TcpConnectInfo;
    fn connect_info(&self) -> TcpConnectInfo {
        TcpConnectInfo {
            local_addr: self.inner.local_addr().ok(),
            remote_addr: Some(self.remote),
        }
    }
}

/// Accepted connections of a `turmoil::net::TcpListener` as a stream.
///
/// turmoil's listener has no `poll_accept`, so the pending `accept()` future is kept
/// boxed (it borrows the listener, which is kept in an `Arc`).
pub struct SimIncoming {
    accept: Accepting,
    listener: Arc<turmoil::net::TcpListener>,
    faults: Arc<LinkFaults>,
}

impl SimIncoming {
    fn new(listener: turmoil::net::TcpListener, faults: Arc<LinkFaults>) -> Self {
        let listener = Arc::new(listener);
        Self {
            accept: Self::accept_fut(listener.clone()),
            listener,
            faults,
        }
    }

    fn accept_fut(listener: Arc<turmoil::net::TcpListener>) -> Accepting {
        Box::pin(async move { listener.accept().await })
    }
}

impl fmt::Debug for SimIncoming {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimIncoming").finish_non_exhaustive()
    }
}

impl Stream for SimIncoming {
    type Item = io::Result<FaultyStream>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let res = std::task::ready!(self.accept.as_mut().poll(cx));
        let next = Self::accept_fut(self.listener.clone());
        self.accept = next;
        let faults = self.faults.clone();
        Poll::Ready(Some(
            res.map(|(s, remote)| FaultyStream::new(s, remote, faults)),
        ))
    }
}
