//! tonic over turmoil's simulated TCP: the nodes' gRPC server takes its connections from
//! [`incoming`], and their channels to peers dial through [`TurmoilConnector`] (the
//! cluster's `PeerConnector` seam, where a real node puts its mTLS connector). Used only
//! inside a simulated host: turmoil's sockets find their world in a thread-local.

use std::fmt;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::Stream;
use hyper_util::rt::TokioIo;
use tether_cluster::transport::grpc::{BoxedIo, PeerConnector};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::transport::server::{Connected, TcpConnectInfo};

/// A pending `accept()` of a simulated listener.
type Accepting =
    Pin<Box<dyn Future<Output = io::Result<(turmoil::net::TcpStream, SocketAddr)>> + Send>>;

/// The connections `listener` accepts, for `serve_with_incoming`.
pub fn incoming(listener: turmoil::net::TcpListener) -> SimIncoming {
    SimIncoming::new(listener)
}

/// [`PeerConnector`] that dials through turmoil's simulated network.
#[derive(Debug, Default, Clone, Copy)]
pub struct TurmoilConnector;

impl PeerConnector for TurmoilConnector {
    fn connect(
        &self,
        addr: SocketAddr,
    ) -> Pin<Box<dyn Future<Output = io::Result<BoxedIo>> + Send>> {
        Box::pin(async move {
            let stream = turmoil::net::TcpStream::connect(addr).await?;
            Ok(Box::new(TokioIo::new(stream)) as BoxedIo)
        })
    }
}

// ---------------------------------------------------------------------------
// Server side
// ---------------------------------------------------------------------------

/// An accepted simulated TCP connection, for `serve_with_incoming`.
pub struct SimConn {
    inner: turmoil::net::TcpStream,
    remote: SocketAddr,
}

impl SimConn {
    pub fn new(inner: turmoil::net::TcpStream, remote: SocketAddr) -> Self {
        Self { inner, remote }
    }
    pub fn remote_addr(&self) -> SocketAddr {
        self.remote
    }
    pub fn into_inner(self) -> turmoil::net::TcpStream {
        self.inner
    }
}

impl fmt::Debug for SimConn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimConn")
            .field("remote", &self.remote)
            .finish()
    }
}

/// `ConnectInfo` is tonic's own `TcpConnectInfo`, so server code that calls
/// `request.remote_addr()` (which only looks for `TcpConnectInfo` / TLS info) works
/// unchanged in the simulation.
impl Connected for SimConn {
    type ConnectInfo = TcpConnectInfo;
    fn connect_info(&self) -> TcpConnectInfo {
        TcpConnectInfo {
            local_addr: self.inner.local_addr().ok(),
            remote_addr: Some(self.remote),
        }
    }
}

impl AsyncRead for SimConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for SimConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Accepted connections of a `turmoil::net::TcpListener` as a stream, for
/// `Server::builder()...serve_with_incoming(SimIncoming::new(listener))`.
///
/// turmoil's listener has no `poll_accept`, so the pending `accept()` future is kept
/// boxed (it borrows the listener, which is kept in an `Arc`).
pub struct SimIncoming {
    accept: Accepting,
    listener: Arc<turmoil::net::TcpListener>,
}

impl SimIncoming {
    pub fn new(listener: turmoil::net::TcpListener) -> Self {
        let listener = Arc::new(listener);
        Self {
            accept: Self::accept_fut(listener.clone()),
            listener,
        }
    }

    /// Binds `addr` (e.g. `(IpAddr::UNSPECIFIED, port)`) in the simulation.
    pub async fn bind(addr: SocketAddr) -> io::Result<Self> {
        Ok(Self::new(turmoil::net::TcpListener::bind(addr).await?))
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
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
    type Item = io::Result<SimConn>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let res = std::task::ready!(self.accept.as_mut().poll(cx));
        let next = Self::accept_fut(self.listener.clone());
        self.accept = next;
        Poll::Ready(Some(res.map(|(s, remote)| SimConn::new(s, remote))))
    }
}
