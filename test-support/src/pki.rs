//! Certificates for mTLS between test nodes, made by the `tether` binary itself
//! (`tether admin cluster-ca`, `tether admin cluster-cert`), as an operator would.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use crate::node::admin;

/// A cluster CA in a temporary directory, and the node certificates it issues.
#[derive(Debug)]
pub struct ClusterPki {
    dir: tempfile::TempDir,
    /// The CA certificate (every node's `--cluster-tls-ca`).
    pub ca_cert: PathBuf,
    ca_key: PathBuf,
    issued: usize,
}

/// One node's certificate and key, and the CA it trusts.
#[derive(Debug, Clone)]
pub struct NodeCert {
    /// `--cluster-tls-cert`.
    pub cert: PathBuf,
    /// `--cluster-tls-key`.
    pub key: PathBuf,
    /// `--cluster-tls-ca`.
    pub ca: PathBuf,
}

impl NodeCert {
    /// The `tether serve` flags that use this certificate.
    pub fn flags(&self) -> Vec<String> {
        let s = |p: &Path| p.display().to_string();
        vec![
            "--cluster-tls-cert".into(),
            s(&self.cert),
            "--cluster-tls-key".into(),
            s(&self.key),
            "--cluster-tls-ca".into(),
            s(&self.ca),
        ]
    }

    /// Overwrites this certificate's files with `other`'s (a rotation, as a Kubernetes
    /// Secret update would do: each file replaced whole).
    pub fn replace_with(&self, other: &NodeCert) {
        for (from, to) in [
            (&other.cert, &self.cert),
            (&other.key, &self.key),
            (&other.ca, &self.ca),
        ] {
            let tmp = to.with_extension("tmp");
            std::fs::copy(from, &tmp).expect("copy certificate file");
            std::fs::rename(&tmp, to).expect("replace certificate file");
        }
    }
}

impl ClusterPki {
    /// A new CA.
    pub async fn generate() -> ClusterPki {
        let dir = tempfile::tempdir().expect("pki tempdir");
        let ca_cert = dir.path().join("ca.pem");
        let ca_key = dir.path().join("ca-key.pem");
        admin([
            OsString::from("cluster-ca"),
            "--cert".into(),
            ca_cert.clone().into(),
            "--key".into(),
            ca_key.clone().into(),
        ])
        .await
        .ok();
        ClusterPki {
            dir,
            ca_cert,
            ca_key,
            issued: 0,
        }
    }

    /// A node certificate (for `name`) signed by this CA, in files of its own (a copy of
    /// the CA certificate included, so the node's three files can be rotated together).
    pub async fn issue(&mut self, name: &str) -> NodeCert {
        self.issued += 1;
        let sub = self.dir.path().join(format!("{}-{name}", self.issued));
        std::fs::create_dir_all(&sub).expect("cert dir");
        let cert = sub.join("node.pem");
        let key = sub.join("node-key.pem");
        let ca = sub.join("ca.pem");
        std::fs::copy(&self.ca_cert, &ca).expect("copy CA");
        admin([
            OsString::from("cluster-cert"),
            "--ca-cert".into(),
            self.ca_cert.clone().into(),
            "--ca-key".into(),
            self.ca_key.clone().into(),
            "--cert".into(),
            cert.clone().into(),
            "--key".into(),
            key.clone().into(),
            "--san".into(),
            name.into(),
        ])
        .await
        .ok();
        NodeCert { cert, key, ca }
    }
}
