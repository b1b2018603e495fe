//! `tether admin`: manufacturing keys, default credentials, users, development certificates,
//! the cluster CA and node certificates.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use rand::RngCore;
use tether_proto::credentials::{default_secret, secret_hash, user_secret, CredentialId};
use tether_proto::SetKey;

use crate::config::{read_mfg_key, AdminCommand, MfgKeyCommand, UserCommand};
use crate::error::{NodeError, Result};
use crate::metrics::Metrics;
use crate::store::{Store, UserRecord};

/// Creates `path` readable only by its owner and writes `bytes`; never overwrites.
pub fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut f = options
        .open(path)
        .map_err(|e| NodeError::Config(format!("creating {}: {e}", path.display())))?;
    f.write_all(bytes)
        .map_err(|e| NodeError::Config(format!("writing {}: {e}", path.display())))
}

/// Runs one admin command, printing its result on stdout.
pub fn run(cmd: AdminCommand) -> Result<()> {
    match cmd {
        AdminCommand::MfgKey(MfgKeyCommand::Generate { path }) => {
            let mut key = [0u8; 64];
            rand::rng().fill_bytes(&mut key);
            let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
            write_private(&path, format!("{hex}\n").as_bytes())?;
            eprintln!("wrote a 64-byte manufacturing key to {}", path.display());
        }
        AdminCommand::DefaultCredentials {
            serial,
            key_id,
            mfg_key_file,
        } => {
            let id = format!("d.{serial}.{key_id}");
            CredentialId::parse(&id).map_err(|e| NodeError::Config(format!("{id:?}: {e}")))?;
            let key = read_mfg_key(&mfg_key_file)?;
            println!("{id} {}", default_secret(&key, &id));
        }
        AdminCommand::User(UserCommand::Add {
            user_id,
            data_dir,
            store,
            store_file,
            store_password_file,
        }) => {
            let store = crate::config::StoreUrl::resolve(store, store_file, store_password_file)?
                .unwrap_or_else(|| crate::config::StoreUrl::Redb(data_dir.clone()));
            SetKey::parse(&user_id).map_err(|_| {
                NodeError::Config(format!("user id {user_id:?} must be [A-Za-z0-9_-]{{1,64}}"))
            })?;
            let mut random = [0u8; 16];
            rand::rng().fill_bytes(&mut random);
            let secret = user_secret(random);
            let created_ms = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64);
            let record = UserRecord {
                user_id: user_id.clone(),
                secret_hash: secret_hash(&secret),
                created_ms,
            };
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| NodeError::Internal(e.to_string()))?;
            let created = rt.block_on(async {
                #[cfg(feature = "fdb")]
                let _fdb_network = matches!(store, crate::config::StoreUrl::Fdb(_))
                    .then(crate::store::fdb::Network::boot);
                let store: Arc<dyn Store> = crate::store::open(&store, Metrics::new(), 1)
                    .await
                    .map_err(|e| {
                        NodeError::Config(format!(
                            "opening the store: {e} (with the embedded store, stop the node first: it is single-process)"
                        ))
                    })?;
                let created = store.create_user(record).await?;
                store.close().await?;
                Ok::<_, NodeError>(created)
            })?;
            if !created {
                return Err(NodeError::Config(format!("user {user_id} already exists")));
            }
            println!("u.{user_id} {secret}");
        }
        AdminCommand::ClusterCa { cert, key } => {
            crate::security::cluster_tls::write_ca(&cert, &key)?;
            println!("wrote {} and {}", cert.display(), key.display());
        }
        AdminCommand::ClusterCert {
            ca_cert,
            ca_key,
            cert,
            key,
            sans,
            days,
        } => {
            crate::security::cluster_tls::write_node_cert(
                &ca_cert, &ca_key, &cert, &key, sans, days,
            )?;
            println!("wrote {} and {}", cert.display(), key.display());
        }
        AdminCommand::SelfSigned { cert, key, sans } => {
            crate::security::tls::write_self_signed(&cert, &key, sans)?;
            println!("wrote {} and {}", cert.display(), key.display());
        }
    }
    Ok(())
}
