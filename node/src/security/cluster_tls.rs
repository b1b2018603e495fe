//! mTLS between the nodes of a cluster (the internal gRPC port): every node presents a
//! certificate signed by the cluster CA and accepts only peers that do, in both
//! directions; the HMAC peer token of the cluster secret stays as a second factor
//! (`tether_cluster::auth`). Certificate, key and CA come from files and are reloaded
//! when they change ([`Reloader`]), so cert-manager style rotation needs no restart.
//!
//! Identity is the CA: peers are dialed by address (gossip knows addresses, not names),
//! so the server name is not checked; any certificate the cluster CA signed for TLS
//! client and server use is a member. The CA must therefore be dedicated to the cluster
//! (SECURITY.md).

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::BoxFuture;
use futures::FutureExt;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use tether_cluster::transport::grpc::{BoxedIo, PeerConnector};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::config::ClusterTlsFiles;
use crate::error::{NodeError, Result};
use crate::security::reload::Reloader;

/// Longest TLS handshake between nodes.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The server and client configurations of one node, built from its files.
#[derive(Debug)]
pub struct ClusterTls {
    /// Accepts peers presenting a certificate the cluster CA signed.
    pub server: Arc<ServerConfig>,
    /// Dials peers with this node's certificate, trusting the cluster CA only.
    pub client: Arc<ClientConfig>,
}

fn certs(path: &std::path::Path) -> Result<Vec<CertificateDer<'static>>> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<std::result::Result<_, _>>())
        .map_err(|e| NodeError::Config(format!("reading certificates {}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(NodeError::Config(format!(
            "{} holds no certificate",
            path.display()
        )));
    }
    Ok(certs)
}

fn key(path: &std::path::Path) -> Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_file(path)
        .map_err(|e| NodeError::Config(format!("reading private key {}: {e}", path.display())))
}

fn tls_err(what: &str) -> impl Fn(rustls::Error) -> NodeError + '_ {
    move |e| NodeError::Config(format!("cluster TLS {what}: {e}"))
}

impl ClusterTls {
    /// Reads the files and builds both configurations.
    pub fn load(files: &ClusterTlsFiles) -> Result<ClusterTls> {
        let chain = certs(&files.cert)?;
        let mut roots = RootCertStore::empty();
        for ca in certs(&files.ca)? {
            roots.add(ca).map_err(|e| {
                NodeError::Config(format!("cluster CA {}: {e}", files.ca.display()))
            })?;
        }
        let roots = Arc::new(roots);
        let client_verifier =
            WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
                .build()
                .map_err(|e| NodeError::Config(format!("cluster CA: {e}")))?;
        let mut server = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(tls_err("setup"))?
            .with_client_cert_verifier(client_verifier)
            .with_single_cert(chain.clone(), key(&files.key)?)
            .map_err(tls_err("certificate and key"))?;
        server.alpn_protocols = vec![b"h2".to_vec()];
        let mut client = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(tls_err("setup"))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(ClusterCa {
                roots,
                provider: provider(),
            }))
            .with_client_auth_cert(chain, key(&files.key)?)
            .map_err(tls_err("certificate and key"))?;
        client.alpn_protocols = vec![b"h2".to_vec()];
        Ok(ClusterTls {
            server: Arc::new(server),
            client: Arc::new(client),
        })
    }

    /// Loads the files and watches them every `files.reload_interval` on the current
    /// tokio runtime, for as long as the configuration is in use.
    pub fn start(files: &ClusterTlsFiles) -> Result<Arc<Reloader<ClusterTls>>> {
        let paths = vec![files.cert.clone(), files.key.clone(), files.ca.clone()];
        let f = files.clone();
        let tls = Reloader::new("cluster mTLS", paths, move || ClusterTls::load(&f))?;
        // The watcher holds the reloader weakly and ends once it is dropped everywhere else.
        drop(tls.watch(files.reload_interval));
        Ok(tls)
    }
}

/// Verifies a peer's certificate chain against the cluster CA, not its name (peers are
/// dialed by address); handshake signatures as usual.
#[derive(Debug)]
struct ClusterCa {
    roots: Arc<RootCertStore>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for ClusterCa {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Dials peers over mTLS with the node's current configuration (so a reload applies to
/// every new connection).
#[derive(Debug)]
pub struct TlsConnector {
    tls: Arc<Reloader<ClusterTls>>,
}

impl TlsConnector {
    /// A connector over the reloadable configuration.
    pub fn connector(tls: Arc<Reloader<ClusterTls>>) -> Arc<dyn PeerConnector> {
        Arc::new(TlsConnector { tls })
    }
}

impl PeerConnector for TlsConnector {
    fn connect(&self, addr: SocketAddr) -> BoxFuture<'static, io::Result<BoxedIo>> {
        let config = self.tls.current().client.clone();
        async move {
            let tcp = TcpStream::connect(addr).await?;
            tcp.set_nodelay(true)?;
            let name = ServerName::IpAddress(addr.ip().into());
            let connecting = tokio_rustls::TlsConnector::from(config).connect(name, tcp);
            let tls = tokio::time::timeout(HANDSHAKE_TIMEOUT, connecting)
                .await
                .map_err(|_| {
                    io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out")
                })??;
            Ok(Box::new(hyper_util::rt::TokioIo::new(tls)) as BoxedIo)
        }
        .boxed()
    }
}

/// A peer's accepted mTLS connection, as the internal gRPC server sees it.
#[derive(Debug)]
pub struct PeerStream(tokio_rustls::server::TlsStream<TcpStream>);

impl tonic::transport::server::Connected for PeerStream {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;
    fn connect_info(&self) -> Self::ConnectInfo {
        self.0.get_ref().0.connect_info()
    }
}

impl AsyncRead for PeerStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for PeerStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// Accepts connections on `listener` and completes their mTLS handshakes (each on its own
/// task, bounded by a timeout), yielding the peers that presented a certificate of the
/// cluster CA; the others are logged and dropped.
pub fn incoming(
    listener: tokio::net::TcpListener,
    tls: Arc<Reloader<ClusterTls>>,
) -> impl futures::Stream<Item = io::Result<PeerStream>> {
    let (tx, rx) = tokio::sync::mpsc::channel::<PeerStream>(64);
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a peer connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = tokio_rustls::TlsAcceptor::from(tls.current().server.clone());
            let accepted = tx.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let _ = accepted.send(PeerStream(stream)).await;
                    }
                    Ok(Err(e)) => {
                        tracing::warn!(%peer, error = %e, "refused a peer on the internal port: TLS handshake failed");
                    }
                    Err(_) => {
                        tracing::warn!(%peer, "refused a peer on the internal port: TLS handshake timed out")
                    }
                }
            });
            if tx.is_closed() {
                return;
            }
        }
    });
    futures::stream::unfold(
        rx,
        |mut rx| async move { rx.recv().await.map(|s| (Ok(s), rx)) },
    )
}

fn gen_err(e: rcgen::Error) -> NodeError {
    NodeError::Config(format!("generating a certificate: {e}"))
}

fn write_public(path: &std::path::Path, text: &str) -> Result<()> {
    std::fs::write(path, text)
        .map_err(|e| NodeError::Config(format!("writing {}: {e}", path.display())))
}

/// `tether admin cluster-ca`: a new CA for one cluster (ten years), certificate and key.
pub fn write_ca(cert: &std::path::Path, key: &std::path::Path) -> Result<()> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(gen_err)?;
    params
        .distinguished_name
        .push(DnType::CommonName, "Tether cluster CA");
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(3650);
    let signing = KeyPair::generate().map_err(gen_err)?;
    let ca = params.self_signed(&signing).map_err(gen_err)?;
    crate::admin::write_private(key, signing.serialize_pem().as_bytes())?;
    write_public(cert, &ca.pem())
}

/// `tether admin cluster-cert`: a node certificate signed by the cluster CA, valid for TLS
/// server and client use, for `days`.
pub fn write_node_cert(
    ca_cert: &std::path::Path,
    ca_key: &std::path::Path,
    cert: &std::path::Path,
    key: &std::path::Path,
    sans: Vec<String>,
    days: u32,
) -> Result<()> {
    use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, Issuer, KeyPair};
    let read = |p: &std::path::Path| {
        std::fs::read_to_string(p)
            .map_err(|e| NodeError::Config(format!("reading {}: {e}", p.display())))
    };
    let ca_signing = KeyPair::from_pem(&read(ca_key)?).map_err(gen_err)?;
    let issuer = Issuer::from_ca_cert_pem(&read(ca_cert)?, ca_signing).map_err(gen_err)?;
    let common_name = sans
        .first()
        .cloned()
        .unwrap_or_else(|| "tether-node".into());
    let mut params = CertificateParams::new(sans).map_err(gen_err)?;
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(i64::from(days));
    let signing = KeyPair::generate().map_err(gen_err)?;
    let issued = params.signed_by(&signing, &issuer).map_err(gen_err)?;
    crate::admin::write_private(key, signing.serialize_pem().as_bytes())?;
    write_public(cert, &issued.pem())
}
