//! TLS for the device port (rustls, ring provider). The certificate and key are a
//! [`Reloader`]: swapped for new ones when the files change (a renewed Kubernetes Secret,
//! checked every `--tls-reload-interval-s`) or on SIGHUP.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;

use crate::error::{NodeError, Result};
use crate::security::reload::Reloader;

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads a certificate chain and its private key, refusing a key that does not belong to
/// the chain's first certificate (a pair caught half-replaced).
fn load(cert: &Path, key_path: &Path) -> Result<CertifiedKey> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<std::result::Result<_, _>>())
        .map_err(|e| NodeError::Config(format!("reading certificates {}: {e}", cert.display())))?;
    if certs.is_empty() {
        return Err(NodeError::Config(format!(
            "{} holds no certificate",
            cert.display()
        )));
    }
    let key = PrivateKeyDer::from_pem_file(key_path).map_err(|e| {
        NodeError::Config(format!("reading private key {}: {e}", key_path.display()))
    })?;
    CertifiedKey::from_der(certs, key, &provider()).map_err(|e| {
        NodeError::Config(format!(
            "unusable certificate/key pair {}, {}: {e}",
            cert.display(),
            key_path.display()
        ))
    })
}

/// Serves the latest loaded certificate; a reload swaps it atomically, so established
/// connections keep theirs and new handshakes get the new one.
#[derive(Debug)]
pub struct ReloadableCert {
    files: Arc<Reloader<CertifiedKey>>,
}

impl ReloadableCert {
    /// Loads the pair once; fails (the node does not start) if it is unusable.
    pub fn load(cert: PathBuf, key: PathBuf) -> Result<Arc<Self>> {
        let paths = vec![cert.clone(), key.clone()];
        let files = Reloader::new("TLS certificate", paths, move || load(&cert, &key))?;
        Ok(Arc::new(ReloadableCert { files }))
    }

    /// Re-reads the files; on error the old certificate stays in use.
    pub fn reload(&self) -> Result<()> {
        self.files.reload()
    }

    /// Checks the files every `interval` (on the current tokio runtime) and swaps in a
    /// changed pair.
    pub fn watch(&self, interval: Duration) -> tokio::task::JoinHandle<()> {
        self.files.watch(interval)
    }

    /// The rustls server configuration using this resolver.
    pub fn server_config(self: &Arc<Self>) -> Result<ServerConfig> {
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| NodeError::Config(format!("TLS setup: {e}")))?
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        // Devices have RAM for 4 KiB TLS records (firmware-nrf); never send larger ones.
        config.max_fragment_size = Some(4096);
        Ok(config)
    }
}

impl ResolvesServerCert for ReloadableCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.files.current())
    }
}

/// Writes a self-signed certificate and its key (PEM) for `sans`.
pub fn write_self_signed(cert: &Path, key: &Path, sans: Vec<String>) -> Result<()> {
    let generated = rcgen::generate_simple_self_signed(sans)
        .map_err(|e| NodeError::Config(format!("generating certificate: {e}")))?;
    std::fs::write(cert, generated.cert.pem())
        .map_err(|e| NodeError::Config(format!("writing {}: {e}", cert.display())))?;
    crate::admin::write_private(key, generated.signing_key.serialize_pem().as_bytes())
}
