//! The real transport: each frame is one `Gossip.Exchange` call (tonic), carrying the
//! sender's address and an HMAC of both under the cluster secret (see [`crate::auth`]).
//!
//! [`GrpcTransport::new`] hands back the [`GossipServer`] to mount on the node's own
//! gRPC server (next to forwarding); [`GrpcTransport::bind`] serves it alone.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};
use tonic::metadata::MetadataValue;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status};

use super::{Frame, Transport};
use crate::auth::FRAME_MAC_KEY;
use crate::pb::gossip_client::GossipClient;
use crate::pb::gossip_server::{Gossip, GossipServer};
use crate::pb::{GossipAck, GossipFrame};
use crate::{ClusterError, ClusterSecret};

/// Frames received but not yet taken by the membership driver; beyond this, frames
/// are refused (`ResourceExhausted`) and SWIM retries.
const QUEUE: usize = 1024;
/// Largest frame accepted; above the membership's own limit, so the protocol decides.
const MAX_FRAME: usize = 64 * 1024;

/// Options of the gRPC transport.
#[derive(Debug, Clone)]
pub struct GrpcOptions {
    /// How long one frame may take to connect and be accepted by the peer.
    pub send_timeout: Duration,
    /// Largest frame accepted, in bytes.
    pub max_frame_size: usize,
    /// How connections to peers are made: `None` is plain TCP; the node passes its mTLS
    /// connector (`tether_node::security::cluster_tls`).
    pub connector: Option<Arc<dyn PeerConnector>>,
}

impl Default for GrpcOptions {
    fn default() -> Self {
        Self {
            send_timeout: Duration::from_millis(500),
            max_frame_size: MAX_FRAME,
            connector: None,
        }
    }
}

/// A byte stream to a peer, as tonic channels take it (plain TCP or a TLS session).
pub trait PeerIo: hyper::rt::Read + hyper::rt::Write + Send + Unpin {}
impl<T: hyper::rt::Read + hyper::rt::Write + Send + Unpin> PeerIo for T {}

/// A boxed [`PeerIo`].
pub type BoxedIo = Box<dyn PeerIo>;

/// Opens connections to peers (mTLS between nodes); the cluster crate knows nothing of
/// certificates.
pub trait PeerConnector: Send + Sync + std::fmt::Debug + 'static {
    /// A connection to the peer at `addr`, ready for HTTP/2.
    fn connect(
        &self,
        addr: SocketAddr,
    ) -> Pin<Box<dyn Future<Output = std::io::Result<BoxedIo>> + Send>>;
}

/// A channel to `addr` that connects on first use, through `connector` if given.
pub fn lazy_channel(
    endpoint: Endpoint,
    addr: SocketAddr,
    connector: Option<Arc<dyn PeerConnector>>,
) -> Channel {
    match connector {
        None => endpoint.connect_lazy(),
        Some(c) => endpoint.connect_with_connector_lazy(tower::service_fn(
            move |_: tonic::codegen::http::Uri| c.connect(addr),
        )),
    }
}

/// The server half: checks each frame's MAC and queues it for [`GrpcTransport::recv`].
#[derive(Debug, Clone)]
pub struct GossipService {
    secret: ClusterSecret,
    tx: mpsc::Sender<Frame>,
    max_frame_size: usize,
}

impl GossipService {
    fn accept(&self, request: Request<GossipFrame>) -> Result<(), ClusterError> {
        let tag = request
            .metadata()
            .get_bin(FRAME_MAC_KEY)
            .ok_or(ClusterError::Unauthenticated("missing frame MAC"))?
            .to_bytes()
            .map_err(|_| ClusterError::Unauthenticated("undecodable frame MAC"))?;
        let frame = request.into_inner();
        if frame.payload.len() > self.max_frame_size {
            return Err(ClusterError::FrameTooLarge {
                len: frame.payload.len(),
                max: self.max_frame_size,
            });
        }
        self.secret
            .verify_frame(&frame.from, &frame.payload, &tag)?;
        let from: SocketAddr = frame
            .from
            .parse()
            .map_err(|_| ClusterError::MalformedFrame(format!("sender {:?}", frame.from)))?;
        self.tx
            .try_send(Frame {
                from,
                payload: frame.payload,
            })
            .map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => ClusterError::Overloaded,
                mpsc::error::TrySendError::Closed(_) => ClusterError::Closed,
            })
    }
}

#[tonic::async_trait]
impl Gossip for GossipService {
    async fn exchange(&self, request: Request<GossipFrame>) -> Result<Response<GossipAck>, Status> {
        self.accept(request)?;
        Ok(Response::new(GossipAck {}))
    }
}

/// Stops the standalone server of [`GrpcTransport::bind`] when dropped.
#[derive(Debug)]
struct ServerGuard {
    stop: Option<oneshot::Sender<()>>,
}

impl Drop for ServerGuard {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Membership frames over gRPC between authenticated peers.
#[derive(Debug)]
pub struct GrpcTransport {
    local: SocketAddr,
    secret: ClusterSecret,
    options: GrpcOptions,
    /// Ordered, not hashed: the channels close in map order when the transport is dropped,
    /// and in the simulator that order reaches the network (a `HashMap`'s differs per process).
    clients: Mutex<BTreeMap<SocketAddr, GossipClient<Channel>>>,
    rx: Mutex<mpsc::Receiver<Frame>>,
    _server: Option<ServerGuard>,
}

impl GrpcTransport {
    /// A transport advertising `local` (the address peers dial; must be where the
    /// returned service is served), and the service to add to the node's gRPC server.
    pub fn new(
        local: SocketAddr,
        secret: ClusterSecret,
        options: GrpcOptions,
    ) -> (Self, GossipServer<GossipService>) {
        let (tx, rx) = mpsc::channel(QUEUE);
        let service = GossipService {
            secret: secret.clone(),
            tx,
            max_frame_size: options.max_frame_size,
        };
        let server = GossipServer::new(service)
            // Room for the payload, the sender and protobuf framing.
            .max_decoding_message_size(options.max_frame_size.saturating_add(1024));
        let transport = Self {
            local,
            secret,
            options,
            clients: Mutex::new(BTreeMap::new()),
            rx: Mutex::new(rx),
            _server: None,
        };
        (transport, server)
    }

    /// Binds `listen` and serves only gossip on it until the transport is dropped.
    /// With port 0 the advertised address is the one bound.
    pub async fn bind(
        listen: SocketAddr,
        secret: ClusterSecret,
        options: GrpcOptions,
    ) -> Result<Self, ClusterError> {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .map_err(|e| ClusterError::Server(format!("bind {listen}: {e}")))?;
        let local = listener
            .local_addr()
            .map_err(|e| ClusterError::Server(e.to_string()))?;
        let (mut transport, service) = Self::new(local, secret, options);
        let (stop, stopped) = oneshot::channel::<()>();
        let incoming =
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
        tokio::spawn(async move {
            let served = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = stopped.await;
                })
                .await;
            if let Err(e) = served {
                tracing::error!(error = %e, %local, "gossip server stopped");
            }
        });
        transport._server = Some(ServerGuard { stop: Some(stop) });
        Ok(transport)
    }

    fn client(&self, to: SocketAddr) -> Result<GossipClient<Channel>, ClusterError> {
        let mut clients = self.clients.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(client) = clients.get(&to) {
            return Ok(client.clone());
        }
        let endpoint = Endpoint::from_shared(format!("http://{to}"))
            .map_err(|e| ClusterError::InvalidConfig(format!("peer address {to}: {e}")))?
            .connect_timeout(self.options.send_timeout)
            .tcp_nodelay(true);
        let client = GossipClient::new(lazy_channel(endpoint, to, self.options.connector.clone()));
        clients.insert(to, client.clone());
        Ok(client)
    }
}

#[async_trait::async_trait]
impl Transport for GrpcTransport {
    fn local_addr(&self) -> SocketAddr {
        self.local
    }

    async fn send(&self, to: SocketAddr, payload: Bytes) -> Result<(), ClusterError> {
        let mut client = self.client(to)?;
        let from = self.local.to_string();
        let tag = self.secret.sign_frame(&from, &payload);
        let mut request = Request::new(GossipFrame { from, payload });
        request
            .metadata_mut()
            .insert_bin(FRAME_MAC_KEY, MetadataValue::from_bytes(&tag));
        request.set_timeout(self.options.send_timeout);
        client
            .exchange(request)
            .await
            .map(|_| ())
            .map_err(|status| ClusterError::from_status(to, &status))
    }

    async fn recv(&self) -> Option<Frame> {
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
    use tonic::Code;

    use super::*;

    fn secret(s: &str) -> ClusterSecret {
        ClusterSecret::new(s.as_bytes().to_vec()).expect("long enough")
    }

    async fn bound(s: &str) -> GrpcTransport {
        GrpcTransport::bind(
            SocketAddr::from(([127, 0, 0, 1], 0)),
            secret(s),
            GrpcOptions::default(),
        )
        .await
        .expect("bind loopback")
    }

    async fn recv_within(t: &GrpcTransport, deadline: Duration) -> Option<Frame> {
        tokio::time::timeout(deadline, t.recv())
            .await
            .ok()
            .flatten()
    }

    #[tokio::test]
    async fn two_grpc_transports_exchange_frames_on_loopback() {
        let a = bound("cluster-secret-0123456789").await;
        let b = bound("cluster-secret-0123456789").await;

        a.send(b.local_addr(), Bytes::from_static(b"ping from a"))
            .await
            .expect("a -> b");
        let got = recv_within(&b, Duration::from_secs(10)).await;
        assert_eq!(
            got,
            Some(Frame {
                from: a.local_addr(),
                payload: Bytes::from_static(b"ping from a"),
            })
        );

        b.send(a.local_addr(), Bytes::from_static(b"ack from b"))
            .await
            .expect("b -> a");
        let got = recv_within(&a, Duration::from_secs(10)).await;
        assert_eq!(
            got.map(|f| (f.from, f.payload)),
            Some((b.local_addr(), Bytes::from_static(b"ack from b")))
        );
    }

    #[tokio::test]
    async fn grpc_rejects_a_frame_signed_with_the_wrong_secret() {
        let a = bound("cluster-secret-0123456789").await;
        let intruder = bound("another-secret-9876543210").await;

        let err = intruder
            .send(a.local_addr(), Bytes::from_static(b"let me in"))
            .await
            .expect_err("wrong secret is refused");
        assert!(matches!(err, ClusterError::Unauthenticated(_)), "{err:?}");
        assert_eq!(a.try_recv(), None, "nothing reached the membership");
    }

    #[tokio::test]
    async fn grpc_rejects_an_unsigned_or_tampered_frame() {
        let a = bound("cluster-secret-0123456789").await;
        let channel = Endpoint::from_shared(format!("http://{}", a.local_addr()))
            .expect("uri")
            .connect()
            .await
            .expect("connect");
        let mut raw = GossipClient::new(channel);

        let status = raw
            .exchange(GossipFrame {
                from: "127.0.0.1:1".into(),
                payload: Bytes::from_static(b"unsigned"),
            })
            .await
            .expect_err("no MAC is refused");
        assert_eq!(status.code(), Code::Unauthenticated);

        // A MAC for another sender does not cover this one.
        let s = secret("cluster-secret-0123456789");
        let tag = s.sign_frame("127.0.0.1:1", b"payload");
        let mut request = Request::new(GossipFrame {
            from: "127.0.0.1:2".into(),
            payload: Bytes::from_static(b"payload"),
        });
        request
            .metadata_mut()
            .insert_bin(FRAME_MAC_KEY, MetadataValue::from_bytes(&tag));
        let status = raw
            .exchange(request)
            .await
            .expect_err("tampered is refused");
        assert_eq!(status.code(), Code::Unauthenticated);
        assert_eq!(a.try_recv(), None);
    }

    #[tokio::test]
    async fn sending_to_a_closed_port_is_refused() {
        let a = bound("cluster-secret-0123456789").await;
        // A port that was just free: nothing listens there.
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("ephemeral port");
        let err = a
            .send(addr, Bytes::from_static(b"x"))
            .await
            .expect_err("nobody listens");
        // A refusal, not a timeout: the evidence membership acts on at once.
        assert!(
            matches!(err, ClusterError::PeerRefused { addr: a } if a == addr),
            "{err:?}"
        );
    }
}
