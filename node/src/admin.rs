//! `tether admin`: manufacturing keys, default credentials, users, development certificates,
//! bucket history, the cluster CA and node certificates.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use rand::RngCore;
use tether_proto::api::{ChangeDoc, HistoryResponse};
use tether_proto::credentials::{default_secret, secret_hash, user_secret, CredentialId};
use tether_proto::{BucketId, SetKey};

use crate::config::{
    read_mfg_key, AdminCommand, BlobCommand, FirmwareKeyCommand, MfgKeyCommand, UserCommand,
};
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
            let created = with_store(&store, |store| {
                Box::pin(async move { Ok(store.create_user(record).await?) })
            })?;
            if !created {
                return Err(NodeError::Config(format!("user {user_id} already exists")));
            }
            println!("u.{user_id} {secret}");
        }
        AdminCommand::History {
            bucket,
            since_version,
            limit,
            json,
            data_dir,
            store,
        } => {
            let store = match store {
                Some(url) => crate::config::StoreUrl::parse(&url)?,
                None => crate::config::StoreUrl::Redb(data_dir.clone()),
            };
            let id = BucketId::parse(&bucket)
                .map_err(|e| NodeError::Config(format!("bucket id {bucket:?}: {e}")))?;
            let history = with_store(&store, |store| {
                Box::pin(
                    async move { read_history(store.as_ref(), &id, since_version, limit).await },
                )
            })?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&history)
                        .map_err(|e| NodeError::Internal(e.to_string()))?
                );
            } else {
                print!("{}", history_table(&history));
            }
        }
        AdminCommand::Blob(BlobCommand::Put {
            file,
            content_type,
            data_dir,
            store,
        }) => {
            let store = match store {
                Some(url) => crate::config::StoreUrl::parse(&url)?,
                None => crate::config::StoreUrl::Redb(data_dir.clone()),
            };
            let bytes = std::fs::read(&file)
                .map_err(|e| NodeError::Config(format!("reading {}: {e}", file.display())))?;
            let size = bytes.len();
            let h = with_store(&store, |store| {
                Box::pin(async move { put_blob(store.as_ref(), bytes, &content_type).await })
            })?;
            println!("{h} {size}");
            eprintln!(
                "stored and pinned blob {h} ({size} bytes); offer it with\n  \
                 [[software_updates]]\n  device_type = \"…\"\n  version = \"…\"\n  \
                 sha256 = \"{h}\"\n  size = {size}"
            );
        }
        AdminCommand::FirmwareKey(FirmwareKeyCommand::Generate { path }) => {
            let mut seed = [0u8; 32];
            rand::rng().fill_bytes(&mut seed);
            write_private(&path, format!("{}\n", hex(&seed)).as_bytes())?;
            eprintln!(
                "wrote a firmware key to {}; build the firmware with TETHER_FIRMWARE_KEY=<the public key below>",
                path.display()
            );
            println!("{}", hex(&firmware_public_key(&seed)));
        }
        AdminCommand::FirmwareKey(FirmwareKeyCommand::Public { path }) => {
            println!("{}", hex(&firmware_public_key(&read_firmware_key(&path)?)));
        }
        AdminCommand::SignFirmware { file, key_file } => {
            let seed = read_firmware_key(&key_file)?;
            let image = std::fs::read(&file)
                .map_err(|e| NodeError::Config(format!("reading {}: {e}", file.display())))?;
            let signature = sign_firmware(&seed, &image);
            println!("{}", hex(&signature));
            eprintln!(
                "signed {} ({} bytes); add to its [[software_updates]] offer:\n  signature = \"{}\"",
                file.display(),
                image.len(),
                hex(&signature)
            );
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

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Reads a firmware key file: a 32-byte Ed25519 seed as 64 hex digits.
pub fn read_firmware_key(path: &Path) -> Result<[u8; 32]> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| NodeError::Config(format!("reading {}: {e}", path.display())))?;
    let text = text.trim();
    let bad = || {
        NodeError::Config(format!(
            "{}: a firmware key is 64 hex digits (`tether admin firmware-key generate`)",
            path.display()
        ))
    };
    if text.len() != 64 {
        return Err(bad());
    }
    let mut seed = [0u8; 32];
    for (i, byte) in seed.iter_mut().enumerate() {
        *byte = text
            .get(2 * i..2 * i + 2)
            .and_then(|p| u8::from_str_radix(p, 16).ok())
            .ok_or_else(bad)?;
    }
    Ok(seed)
}

/// The public key of a firmware key (what the firmware is built with).
pub fn firmware_public_key(seed: &[u8; 32]) -> [u8; 32] {
    ed25519_dalek::SigningKey::from_bytes(seed)
        .verifying_key()
        .to_bytes()
}

/// An image's signature: Ed25519 over its SHA-512 (embassy-boot's
/// `verify_and_mark_updated` hashes the update partition with SHA-512 and checks this).
pub fn sign_firmware(seed: &[u8; 32], image: &[u8]) -> [u8; 64] {
    use ed25519_dalek::Signer;
    use sha2::Digest;
    let digest = sha2::Sha512::digest(image);
    ed25519_dalek::SigningKey::from_bytes(seed)
        .sign(&digest)
        .to_bytes()
}

/// Opens the store `url` names on a runtime of its own, runs `f` with it, closes it.
fn with_store<T>(
    url: &crate::config::StoreUrl,
    f: impl FnOnce(Arc<dyn Store>) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<T>>>>,
) -> Result<T> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| NodeError::Internal(e.to_string()))?;
    rt.block_on(async {
        #[cfg(feature = "fdb")]
        let _fdb_network =
            matches!(url, crate::config::StoreUrl::Fdb(_)).then(crate::store::fdb::Network::boot);
        let store: Arc<dyn Store> = crate::store::open(
            url,
            Metrics::new(),
            1,
            crate::store::deadline::DEFAULT_DEADLINE,
            crate::store::redb::DEFAULT_CACHE_BYTES,
        )
            .await
            .map_err(|e| {
                NodeError::Config(format!(
                    "opening the store: {e} (with the embedded store, stop the node first: it is single-process)"
                ))
            })?;
        let out = f(store.clone()).await;
        store.close().await?;
        out
    })
}

/// Up to `limit` changes of `id` after `since`, read page by page, as API.md's answer.
async fn read_history(
    store: &dyn Store,
    id: &BucketId,
    since: u64,
    limit: usize,
) -> Result<HistoryResponse> {
    const PAGE: usize = 1_000;
    let mut changes: Vec<ChangeDoc> = Vec::new();
    let mut after = since;
    let (version, oldest, more) = loop {
        let want = (limit - changes.len()).min(PAGE);
        let page = store
            .history(id, after, want.max(1))
            .await?
            .ok_or_else(|| NodeError::Config(format!("no bucket {id}")))?;
        let got = page.changes.len();
        if let Some(last) = page.changes.last() {
            after = last.version;
        }
        changes.extend(page.changes.into_iter().map(ChangeDoc::from));
        if !page.more || changes.len() >= limit || got == 0 {
            break (page.version, page.oldest, page.more);
        }
    };
    let oldest = oldest.unwrap_or(version.saturating_add(1));
    Ok(HistoryResponse {
        id: id.to_string(),
        oldest_version: oldest,
        truncated: since < version && oldest > since.saturating_add(1),
        next_since_version: more.then_some(after),
        changes,
    })
}

/// The history as a table for an operator: one change per line, oldest first.
fn history_table(h: &HistoryResponse) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{}: {} change(s) shown; oldest kept version {}{}",
        h.id,
        h.changes.len(),
        h.oldest_version,
        if h.truncated {
            " (older changes were dropped by retention)"
        } else {
            ""
        }
    );
    let _ = writeln!(
        out,
        "{:>8}  {:<24}  {:<8}  {:<24}  {:<16}  {:<24}  FIELDS",
        "VERSION", "TIME (UTC)", "OUTCOME", "BY", "SESSION", "OP_ID"
    );
    for c in &h.changes {
        let outcome = serde_json::to_value(c.outcome)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "{:>8}  {:<24}  {:<8}  {:<24}  {:<16}  {:<24}  {}",
            c.version,
            utc(c.timestamp),
            outcome,
            c.by,
            c.session.as_deref().unwrap_or("-"),
            c.op_id.as_deref().unwrap_or("-"),
            serde_json::Value::Object(c.fields.clone())
        );
    }
    if let Some(next) = h.next_since_version {
        let _ = writeln!(out, "more changes follow: --since-version {next}");
    }
    out
}

/// `ms` since the Unix epoch as `YYYY-MM-DDTHH:MM:SS.mmmZ` (proleptic Gregorian, UTC).
fn utc(ms: u64) -> String {
    let days = (ms / 86_400_000) as i64;
    let rem = ms % 86_400_000;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3_600_000,
        rem / 60_000 % 60,
        rem / 1_000 % 60,
        rem % 1_000
    )
}

/// Stores `bytes` as a blob pinned for the operator (chunk by chunk, each in its own
/// transaction, the manifest completed last) and returns its hash.
async fn put_blob(
    store: &dyn Store,
    bytes: Vec<u8>,
    content_type: &str,
) -> Result<tether_proto::blob::BlobHash> {
    use crate::store::blobs::{Appended, Begun, Blobs, Holder, CHUNK};
    const OPERATOR: &str = "operator";
    let kv = store
        .blob_kv()
        .ok_or_else(|| NodeError::Config("this store keeps no blobs".into()))?;
    let blobs = Blobs::new(kv, crate::store::deadline::DEFAULT_DEADLINE);
    let h = tether_proto::blob::BlobHash::of(&bytes);
    if bytes.is_empty() {
        return Err(NodeError::Config("a blob has at least one byte".into()));
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let received = match blobs
        .begin(&h, bytes.len() as u64, content_type, OPERATOR, now)
        .await?
    {
        Begun::Present(_) => None,
        Begun::Upload(m) => Some(m.received),
        Begun::Busy(_) => {
            return Err(NodeError::Config(format!(
                "blob {h} is being uploaded by a device or user; try again later"
            )))
        }
    };
    if let Some(from) = received {
        for (i, chunk) in bytes
            .chunks(CHUNK)
            .enumerate()
            .skip((from as usize) / CHUNK)
        {
            match blobs.append(&h, OPERATOR, i as u64, chunk.to_vec()).await? {
                Appended::Received(_) | Appended::Complete => {}
                Appended::NoUpload => {
                    return Err(NodeError::Config(format!(
                        "the upload of {h} vanished; retry"
                    )))
                }
            }
        }
        blobs.complete(&h, OPERATOR, now).await?;
    }
    if !blobs.hold(&h, Holder::Pinned(OPERATOR.into()), now).await? {
        return Err(NodeError::Config(format!(
            "blob {h} is not complete; retry"
        )));
    }
    Ok(h)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the device does (embassy-boot with its `ed25519-salty` verifier): SHA-512 of
    /// the update partition's bytes, checked against the signature with the built-in key.
    fn device_accepts(public: &[u8; 32], signature: &[u8; 64], image: &[u8]) -> bool {
        use sha2::Digest;
        let digest = sha2::Sha512::digest(image);
        let Ok(key) = salty::PublicKey::try_from(public) else {
            return false;
        };
        key.verify(&digest, &salty::Signature::from(signature))
            .is_ok()
    }

    #[test]
    fn a_signed_image_verifies_on_the_device_and_nothing_else_does() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("fw.key");
        run(AdminCommand::FirmwareKey(FirmwareKeyCommand::Generate {
            path: path.clone(),
        }))
        .expect("generate");
        let seed = read_firmware_key(&path).expect("read back");
        let public = firmware_public_key(&seed);
        let image: Vec<u8> = (0..10_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let signature = sign_firmware(&seed, &image);
        assert!(device_accepts(&public, &signature, &image));

        let mut corrupted = image.clone();
        corrupted[5_000] ^= 1;
        assert!(
            !device_accepts(&public, &signature, &corrupted),
            "a corrupted image"
        );
        let other = firmware_public_key(&[9; 32]);
        assert!(
            !device_accepts(&other, &signature, &image),
            "another vendor's key"
        );
        assert_eq!(
            tether_proto::dfu::parse_signature(&hex(&signature)),
            Some(signature),
            "the offer's hex form"
        );
        // The key file is never overwritten.
        assert!(run(AdminCommand::FirmwareKey(FirmwareKeyCommand::Generate {
            path
        }))
        .is_err());
    }

    #[test]
    fn a_malformed_firmware_key_file_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("fw.key");
        std::fs::write(&path, "zz".repeat(32)).expect("write");
        assert!(read_firmware_key(&path).is_err());
        std::fs::write(&path, "ab".repeat(31)).expect("write");
        assert!(read_firmware_key(&path).is_err());
    }

    #[test]
    fn timestamps_print_as_utc() {
        assert_eq!(utc(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(utc(1_763_884_800_123), "2025-11-23T08:00:00.123Z");
        assert_eq!(utc(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(utc(4_107_542_399_999), "2100-02-28T23:59:59.999Z");
    }
}
