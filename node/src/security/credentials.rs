//! Server side of seed 000's credential scheme (FIG 28C–28F, 29C, 30A): verifying default,
//! assigned and user credentials, issuing and rotating assigned credentials, and the
//! rate limits around them.
//!
//! Secrets are never stored: default secrets are recomputed from the manufacturing key,
//! assigned and user secrets are kept as SHA-256 hashes. During a rotation's grace period
//! the new secret is also kept sealed (ChaCha20-Poly1305) under a key derived from the
//! previous secret, so a device still presenting the previous set can be sent the new one
//! (FIG 28F 1870J) without the server holding it in clear.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use chacha20poly1305::aead::{Aead, KeyInit};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use rand::RngCore;
use sha2::{Digest, Sha256};
use tether_proto::credentials::{
    assigned_secret, ct_eq, secret_hash, verify_default, CredentialId, Credentials,
};

use crate::error::{NodeError, Result};
use crate::store::{AssignedRecord, PreviousSet, Store};

/// Credential settings.
#[derive(Debug, Clone)]
pub struct CredentialConfig {
    /// Manufacturing keys by key id.
    pub mfg_keys: HashMap<String, Vec<u8>>,
    /// Assigned credentials older than this are replaced on their next use.
    pub lifetime: Duration,
    /// How long the replaced set keeps working.
    pub grace: Duration,
    /// Registrations with default credentials allowed per device per hour.
    pub register_per_hour: u32,
    /// Requests per second allowed per principal (burst: twice that).
    pub requests_per_second: u32,
    /// How long a successful verification is trusted before the store is asked again.
    pub cache_ttl: Duration,
}

impl Default for CredentialConfig {
    fn default() -> Self {
        CredentialConfig {
            mfg_keys: HashMap::new(),
            lifetime: Duration::from_secs(30 * 24 * 3600),
            grace: Duration::from_secs(24 * 3600),
            register_per_hour: 10,
            requests_per_second: 50,
            cache_ttl: Duration::from_secs(30),
        }
    }
}

/// Who presented valid credentials, and what to send back.
#[derive(Debug, Clone)]
pub struct Verified {
    /// The credential id that was verified.
    pub id: CredentialId,
    /// Credentials to send in `X-Tether-Set-Credentials` (issued or rotated).
    pub set_credentials: Option<Credentials>,
}

struct CacheEntry {
    hash: [u8; 32],
    at: Instant,
    /// When the set is due for rotation (ms since epoch); past it the store is consulted.
    rotate_at_ms: Option<u64>,
}

/// Failed verifications allowed per credential id per window before it gets 429.
const MAX_FAILURES: u32 = 20;
/// The failure counting window.
const FAILURE_WINDOW: Duration = Duration::from_secs(60);

/// Counts failed verifications per credential id, so guessing a secret is throttled
/// (verification only succeeds, and the per-principal limit only applies, with the secret).
#[derive(Default)]
struct Failures(Mutex<HashMap<String, (u32, Instant)>>);

impl Failures {
    fn check(&self, id: &str) -> Result<()> {
        let map = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        match map.get(id) {
            Some((n, start)) if *n >= MAX_FAILURES && start.elapsed() < FAILURE_WINDOW => {
                let left = FAILURE_WINDOW.saturating_sub(start.elapsed());
                Err(NodeError::RateLimited {
                    retry_after_s: left.as_secs().max(1),
                })
            }
            _ => Ok(()),
        }
    }

    fn record(&self, id: &str) {
        let mut map = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if map.len() > 100_000 {
            map.retain(|_, (_, start)| start.elapsed() < FAILURE_WINDOW);
        }
        let entry = map.entry(id.to_string()).or_insert((0, Instant::now()));
        if entry.1.elapsed() >= FAILURE_WINDOW {
            *entry = (0, Instant::now());
        }
        entry.0 += 1;
    }
}

/// Verifies and issues credentials.
pub struct CredentialService {
    failures: Failures,
    store: Arc<dyn Store>,
    config: CredentialConfig,
    cache: Mutex<HashMap<String, CacheEntry>>,
    register_limiter: DefaultKeyedRateLimiter<String>,
    request_limiter: DefaultKeyedRateLimiter<String>,
}

impl std::fmt::Debug for CredentialService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CredentialService")
            .field(
                "mfg_key_ids",
                &self.config.mfg_keys.keys().collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn rejected() -> NodeError {
    NodeError::Unauthorized("credentials rejected".into())
}

/// The key that seals the current secret during grace: only the previous secret yields it.
fn sealing_key(previous_secret: &str) -> Key {
    let mut h = Sha256::new();
    h.update(b"tether-rotation-v1\0");
    h.update(previous_secret.as_bytes());
    h.finalize()
}

fn seal(previous_secret: &str, current_secret: &str) -> Result<Vec<u8>> {
    let mut nonce = [0u8; 12];
    rand::rng().fill_bytes(&mut nonce);
    let cipher = ChaCha20Poly1305::new(&sealing_key(previous_secret));
    let mut out = nonce.to_vec();
    out.extend(
        cipher
            .encrypt(Nonce::from_slice(&nonce), current_secret.as_bytes())
            .map_err(|_| NodeError::Internal("sealing rotated credentials failed".into()))?,
    );
    Ok(out)
}

fn unseal(previous_secret: &str, sealed: &[u8]) -> Option<String> {
    let (nonce, ciphertext) = sealed.split_at_checked(12)?;
    let cipher = ChaCha20Poly1305::new(&sealing_key(previous_secret));
    let plain = cipher.decrypt(Nonce::from_slice(nonce), ciphertext).ok()?;
    String::from_utf8(plain).ok()
}

fn new_assigned(serial: &str) -> Credentials {
    let mut random = [0u8; 16];
    rand::rng().fill_bytes(&mut random);
    Credentials {
        id: format!("a.{serial}"),
        secret: assigned_secret(random),
    }
}

fn quota_per_hour(n: u32) -> Quota {
    Quota::per_hour(NonZeroU32::new(n.max(1)).unwrap_or(NonZeroU32::MIN))
}

impl CredentialService {
    /// A service over `store`.
    pub fn new(store: Arc<dyn Store>, config: CredentialConfig) -> Self {
        let rps = NonZeroU32::new(config.requests_per_second.max(1)).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(config.requests_per_second.max(1).saturating_mul(2))
            .unwrap_or(NonZeroU32::MIN);
        CredentialService {
            register_limiter: RateLimiter::keyed(quota_per_hour(config.register_per_hour)),
            request_limiter: RateLimiter::keyed(Quota::per_second(rps).allow_burst(burst)),
            store,
            config,
            cache: Mutex::new(HashMap::new()),
            failures: Failures::default(),
        }
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, HashMap<String, CacheEntry>> {
        self.cache.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn cached(&self, c: &Credentials) -> bool {
        let hash = secret_hash(&c.secret);
        let mut cache = self.cache();
        match cache.get(&c.id) {
            Some(e)
                if e.at.elapsed() < self.config.cache_ttl
                    && e.rotate_at_ms.is_none_or(|t| now_ms() < t)
                    && ct_eq(&e.hash, &hash) =>
            {
                true
            }
            Some(_) => {
                cache.remove(&c.id);
                false
            }
            None => false,
        }
    }

    fn remember(&self, c: &Credentials, rotate_at_ms: Option<u64>) {
        let mut cache = self.cache();
        if cache.len() > 100_000 {
            cache.retain(|_, e| e.at.elapsed() < self.config.cache_ttl);
        }
        cache.insert(
            c.id.clone(),
            CacheEntry {
                hash: secret_hash(&c.secret),
                at: Instant::now(),
                rotate_at_ms,
            },
        );
    }

    fn forget(&self, id: &str) {
        self.cache().remove(id);
    }

    /// Per-principal request limit: 429 with a retry hint once exceeded.
    pub fn check_rate(&self, principal_key: &str) -> Result<()> {
        self.request_limiter
            .check_key(&principal_key.to_string())
            .map_err(|not_until| {
                let wait = not_until.wait_time_from(governor::clock::Clock::now(
                    &governor::clock::DefaultClock::default(),
                ));
                NodeError::RateLimited {
                    retry_after_s: wait.as_secs().max(1),
                }
            })
    }

    /// FIG 28C 1840: default-credential registrations per device per hour.
    pub fn check_register_rate(&self, serial: &str) -> Result<()> {
        self.register_limiter
            .check_key(&serial.to_string())
            .map_err(|not_until| {
                let wait = not_until.wait_time_from(governor::clock::Clock::now(
                    &governor::clock::DefaultClock::default(),
                ));
                NodeError::RateLimited {
                    retry_after_s: wait.as_secs().max(1),
                }
            })
    }

    /// Runs one verification under the failure throttle of its credential id.
    pub async fn throttled<T>(
        &self,
        id: &str,
        verify: impl std::future::Future<Output = Result<T>>,
    ) -> Result<T> {
        self.failures.check(id)?;
        let result = verify.await;
        if matches!(result, Err(NodeError::Unauthorized(_))) {
            self.failures.record(id);
        }
        result
    }

    /// FIG 28C 1842: a default secret is valid when it is the HMAC of its id under the
    /// manufacturing key the id names.
    pub fn verify_default(&self, c: &Credentials) -> Result<()> {
        let CredentialId::Default { key_id, .. } =
            CredentialId::parse(&c.id).map_err(|_| rejected())?
        else {
            return Err(rejected());
        };
        let key = self.config.mfg_keys.get(&key_id).ok_or_else(rejected)?;
        if verify_default(key, &c.id, &c.secret) {
            Ok(())
        } else {
            Err(rejected())
        }
    }

    /// FIG 28C 1844–1852: issues a fresh assigned set, replacing (revoking) any earlier
    /// one. Returns whether the device had credentials before (the lost-credentials case,
    /// after which the caller unpairs it).
    pub async fn issue_assigned(&self, serial: &str) -> Result<(Credentials, bool)> {
        loop {
            let existing = self.store.get_assigned(serial).await?;
            let creds = new_assigned(serial);
            let record = AssignedRecord {
                current_hash: secret_hash(&creds.secret),
                issued_ms: now_ms(),
                previous: None,
            };
            let expected = existing.as_ref().map(|r| r.current_hash);
            if self
                .store
                .swap_assigned(serial, expected, Some(record))
                .await?
            {
                self.forget(&creds.id);
                return Ok((creds, existing.is_some()));
            }
        }
    }

    /// FIG 28D/28F and FIG 29C: verifies an assigned set. Valid current credentials older
    /// than the lifetime are rotated; the previous set works during the grace period and
    /// every use of it resends the current set.
    pub async fn verify_assigned(
        &self,
        c: &Credentials,
        serial: &str,
    ) -> Result<Option<Credentials>> {
        if self.cached(c) {
            return Ok(None);
        }
        let presented = secret_hash(&c.secret);
        loop {
            let Some(record) = self.store.get_assigned(serial).await? else {
                return Err(rejected());
            };
            let now = now_ms();
            // 1870G: the recently assigned (current) set.
            if ct_eq(&presented, &record.current_hash) {
                let age = Duration::from_millis(now.saturating_sub(record.issued_ms));
                if age < self.config.lifetime {
                    let lifetime_ms = self.config.lifetime.as_millis() as u64;
                    self.remember(c, Some(record.issued_ms.saturating_add(lifetime_ms)));
                    return Ok(None);
                }
                // FIG 29C 1934–1950: expired → rotate, keeping this set for the grace period.
                let fresh = new_assigned(serial);
                let rotated = AssignedRecord {
                    current_hash: secret_hash(&fresh.secret),
                    issued_ms: now,
                    previous: Some(PreviousSet {
                        hash: record.current_hash,
                        grace_until_ms: now.saturating_add(self.config.grace.as_millis() as u64),
                        sealed_current: seal(&c.secret, &fresh.secret)?,
                    }),
                };
                if self
                    .store
                    .swap_assigned(serial, Some(record.current_hash), Some(rotated))
                    .await?
                {
                    self.forget(&c.id);
                    tracing::info!(device = serial, "assigned credentials rotated");
                    return Ok(Some(fresh));
                }
                // Someone rotated concurrently: re-read; this set is now the previous one.
                continue;
            }
            // 1870H: the previously assigned set, within its grace period → 1870J resend.
            if let Some(prev) = &record.previous {
                if now < prev.grace_until_ms && ct_eq(&presented, &prev.hash) {
                    let secret = unseal(&c.secret, &prev.sealed_current).ok_or_else(|| {
                        NodeError::Internal("sealed credentials do not open".into())
                    })?;
                    return Ok(Some(Credentials {
                        id: c.id.clone(),
                        secret,
                    }));
                }
            }
            // 1870I: neither.
            self.forget(&c.id);
            return Err(rejected());
        }
    }

    /// Verifies a user's credentials.
    pub async fn verify_user(&self, c: &Credentials, user_id: &str) -> Result<()> {
        if self.cached(c) {
            return Ok(());
        }
        let user = self.store.get_user(user_id).await?.ok_or_else(rejected)?;
        if ct_eq(&secret_hash(&c.secret), &user.secret_hash) {
            self.remember(c, None);
            Ok(())
        } else {
            self.forget(&c.id);
            Err(rejected())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_secret_opens_only_with_the_previous_secret() {
        let sealed = seal("a.previous-secret-xxxxxx", "a.current-secret-yyyyyyy").expect("seal");
        assert_eq!(
            unseal("a.previous-secret-xxxxxx", &sealed).as_deref(),
            Some("a.current-secret-yyyyyyy")
        );
        assert_eq!(unseal("a.someone-else-zzzzzzzzz", &sealed), None);
        assert_eq!(unseal("a.previous-secret-xxxxxx", &sealed[..5]), None);
    }
}
