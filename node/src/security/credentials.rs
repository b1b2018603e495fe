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
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
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
use crate::metrics::Metrics;
use crate::security::limits::{rate_limited, BoundedMap, WindowCounters};
use crate::store::{AssignedRecord, PreviousSet, Store, StoreError};

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
    /// How long a credential record read from the store is trusted before it is read again.
    pub cache_ttl: Duration,
    /// How long a principal's scope (its pairings) read from the store is used before it
    /// is read again (`security::scope`); a refusal is always checked against the store.
    pub scope_ttl: Duration,
    /// How long past their freshness cached credential records and scopes still answer
    /// when the store does not (a node cut from its store keeps forwarding its clients'
    /// requests to owners that reach it).
    pub stale_if_error: Duration,
    /// Failed checks one source may make per window before its unverified attempts get 429.
    pub failures_per_source: u32,
    /// Failed checks of one id per window after which its record is re-read at most once
    /// per [`REFRESH_HOT`] (a correct secret is always accepted).
    pub failures_per_id: u32,
    /// The failure counting window.
    pub failure_window: Duration,
    /// Entries of each bounded table (record cache, failure counters).
    pub table_capacity: usize,
    /// Failed pairing-code redemptions per user per hour.
    pub pair_failures_per_hour: u32,
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
            scope_ttl: Duration::from_secs(1),
            stale_if_error: Duration::from_secs(120),
            failures_per_source: 30,
            failures_per_id: 20,
            failure_window: Duration::from_secs(60),
            table_capacity: 100_000,
            pair_failures_per_hour: 10,
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

/// A credential record as last read from the store, and when: verification compares a
/// presented secret with it, so the store is read once per id per [`CredentialConfig::cache_ttl`]
/// for correct secrets and wrong ones alike (finding 2: failures must neither lock the
/// holder out nor multiply store reads).
#[derive(Debug, Clone)]
enum Record {
    Assigned(AssignedRecord),
    User([u8; 32]),
    /// The store has no credentials under this id.
    Absent,
}

#[derive(Debug, Clone)]
struct Cached {
    record: Record,
    read_at: Instant,
}

/// How often the server lets go of idle principals' records, counters and rate-limiter
/// keys ([`CredentialService::forget_idle`]).
pub const FORGET_IDLE_EVERY: Duration = Duration::from_secs(30);

/// An id whose failures passed its limit is read from the store at most this often; a
/// secret the cached record does not know is refused in between.
pub const REFRESH_HOT: Duration = Duration::from_secs(1);

/// Verifies and issues credentials.
pub struct CredentialService {
    store: Arc<dyn Store>,
    metrics: Metrics,
    config: CredentialConfig,
    records: BoundedMap<String, Cached>,
    id_failures: WindowCounters<String>,
    source_failures: WindowCounters<IpAddr>,
    pair_failures: WindowCounters<String>,
    /// Keyed by [`Self::limit_key`]: a hash, not a copy of the name, per tracked key.
    register_limiter: DefaultKeyedRateLimiter<u64>,
    request_limiter: DefaultKeyedRateLimiter<u64>,
    /// Keys the rate limiters' hashes (random per process, so no client can pick names
    /// that share another's budget).
    limit_keys: std::hash::RandomState,
}

/// What [`CredentialService::forget_idle`] let go.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Forgotten {
    /// Cached credential records past every use.
    pub records: usize,
    /// Failure counters whose window ended.
    pub failures: usize,
    /// Rate-limiter keys back to a full budget.
    pub limited: usize,
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

/// What a cached assigned record says about a presented secret.
enum Verdict {
    /// The current set, within its lifetime.
    Current,
    /// The current set, past its lifetime: rotate (through the store).
    Expired,
    /// The previous set within its grace period: resend the current one.
    Previous(Credentials),
    /// Neither.
    Unknown,
}

impl CredentialService {
    /// A service over `store`.
    pub fn new(store: Arc<dyn Store>, config: CredentialConfig, metrics: Metrics) -> Self {
        let rps = NonZeroU32::new(config.requests_per_second.max(1)).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(config.requests_per_second.max(1).saturating_mul(2))
            .unwrap_or(NonZeroU32::MIN);
        let cap = config.table_capacity;
        CredentialService {
            register_limiter: RateLimiter::keyed(quota_per_hour(config.register_per_hour)),
            request_limiter: RateLimiter::keyed(Quota::per_second(rps).allow_burst(burst)),
            limit_keys: std::hash::RandomState::new(),
            store,
            metrics,
            records: BoundedMap::new(cap),
            id_failures: WindowCounters::new(config.failures_per_id, config.failure_window, cap),
            source_failures: WindowCounters::new(
                config.failures_per_source,
                config.failure_window,
                cap,
            ),
            pair_failures: WindowCounters::new(
                config.pair_failures_per_hour.max(1),
                Duration::from_secs(3600),
                cap,
            ),
            config,
        }
    }

    fn remember(&self, id: &str, record: Record) {
        self.records.put(
            id.to_string(),
            Cached {
                record,
                read_at: Instant::now(),
            },
        );
    }

    fn forget(&self, id: &str) {
        self.records.remove(&id.to_string());
    }

    /// The cached record of `id` if it is recent enough to be trusted.
    fn cached(&self, id: &str) -> Option<Cached> {
        self.records
            .get(&id.to_string())
            .filter(|c| c.read_at.elapsed() < self.config.cache_ttl)
    }

    /// The configuration it was built with.
    pub fn config(&self) -> &CredentialConfig {
        &self.config
    }

    /// The record of `id` read within [`CredentialConfig::stale_if_error`], for when the
    /// store does not answer: it vouches for the secrets it knows (without rotating them);
    /// anything else gets the store's failure (503), never a 401 that would send a device
    /// back to its default credentials.
    fn stale(
        &self,
        c: &Credentials,
        presented: &[u8; 32],
        unanswered: StoreError,
    ) -> Result<Verdict> {
        let Some(cached) = self
            .records
            .get(&c.id)
            .filter(|c| c.read_at.elapsed() < self.config.stale_if_error)
        else {
            return Err(unanswered.into());
        };
        let verdict = match &cached.record {
            Record::Assigned(r) => match self.judge(r, c, presented, now_ms())? {
                // Valid, but rotating it needs the store: accepted as it is.
                Verdict::Expired => Verdict::Current,
                v => v,
            },
            Record::User(hash) if ct_eq(presented, hash) => Verdict::Current,
            _ => Verdict::Unknown,
        };
        if matches!(verdict, Verdict::Unknown) {
            return Err(unanswered.into());
        }
        self.metrics.auth_stale("credentials");
        Ok(verdict)
    }

    /// Whether a secret the cached record does not know may be checked against the store:
    /// always, unless the id is failing a lot and its record was read less than
    /// [`REFRESH_HOT`] ago (then the store is spared; a secret issued meanwhile is known
    /// within a second).
    fn may_reread(&self, id: &str, cached: &Cached) -> bool {
        cached.read_at.elapsed() >= REFRESH_HOT
            || self
                .id_failures
                .exhausted(&id.to_string(), Instant::now())
                .is_none()
    }

    /// A rate limiter's key for `name`. Two names sharing a hash would share a budget
    /// (at 64 bits, keyed per process, not a thing a client can arrange); nothing else
    /// rests on it.
    fn limit_key(&self, name: &str) -> u64 {
        use std::hash::BuildHasher;
        self.limit_keys.hash_one(name)
    }

    /// Lets go of what no request needs any more, so that memory follows the principals
    /// active now, not every one ever seen: cached records older than any use
    /// (`cache_ttl`, `stale_if_error`), failure windows that ended, and rate-limiter keys
    /// whose budget is full again (a limited key is kept: forgetting never resets a
    /// limit). Called every [`FORGET_IDLE_EVERY`] by the server.
    pub fn forget_idle(&self, now: Instant) -> Forgotten {
        let kept_for = self.config.cache_ttl.max(self.config.stale_if_error);
        let records = self
            .records
            .forget_idle(|c| now.saturating_duration_since(c.read_at) >= kept_for);
        let failures = self.id_failures.forget_idle(now)
            + self.source_failures.forget_idle(now)
            + self.pair_failures.forget_idle(now);
        let mut limited = 0;
        for limiter in [&self.request_limiter, &self.register_limiter] {
            let before = limiter.len();
            limiter.retain_recent();
            let left = limiter.len();
            // Requests may add keys meanwhile: never an underflow.
            limited += before.saturating_sub(left);
            // Tables given back only when most of their keys went: a steady population
            // would otherwise have its tables freed and regrown on every pass.
            if left < before / 2 {
                limiter.shrink_to_fit();
            }
        }
        Forgotten {
            records,
            failures,
            limited,
        }
    }

    /// Keys the rate limiters track now (requests, registrations).
    pub fn limited_keys(&self) -> (usize, usize) {
        (self.request_limiter.len(), self.register_limiter.len())
    }

    /// Per-principal request limit: 429 with a retry hint once exceeded.
    pub fn check_rate(&self, principal_key: &str) -> Result<()> {
        self.charge(&self.request_limiter, principal_key)
    }

    /// FIG 28C 1840: charges one default-credential registration of a device, answering 429
    /// once its hourly quota is spent. Called only for verified default credentials and a
    /// valid request, right before the registration takes effect (finding 3: wrong guesses
    /// by others never use up a device's registrations).
    pub fn charge_registration(&self, serial: &str) -> Result<()> {
        self.charge(&self.register_limiter, serial)
    }

    /// One cell of `name`'s budget in `limiter`, or 429 with the wait until the next.
    fn charge(&self, limiter: &DefaultKeyedRateLimiter<u64>, name: &str) -> Result<()> {
        limiter
            .check_key(&self.limit_key(name))
            .map_err(|not_until| {
                let wait = not_until.wait_time_from(governor::clock::Clock::now(
                    &governor::clock::DefaultClock::default(),
                ));
                rate_limited(wait)
            })
    }

    /// Before verifying: a source that failed too often gets 429, unless `c` can be
    /// verified without the store from what this node already knows (a recently read
    /// record it matches) — so a device sharing an address with a guesser keeps working.
    pub fn gate_source(&self, source: Option<IpAddr>, c: Option<&Credentials>) -> Result<()> {
        let Some(source) = source else { return Ok(()) };
        let Some(wait) = self.source_failures.exhausted(&source, Instant::now()) else {
            return Ok(());
        };
        let known = c.is_some_and(|c| self.known_good(c));
        if known {
            Ok(())
        } else {
            Err(rate_limited(wait))
        }
    }

    /// Whether `c` matches a recently read record (no store access).
    fn known_good(&self, c: &Credentials) -> bool {
        self.cached(&c.id).is_some_and(|cached| {
            let presented = secret_hash(&c.secret);
            match &cached.record {
                Record::Assigned(r) => !matches!(
                    self.judge(r, c, &presented, now_ms()),
                    Ok(Verdict::Unknown) | Err(_)
                ),
                Record::User(hash) => ct_eq(hash, &presented),
                Record::Absent => false,
            }
        })
    }

    /// Counts a failed verification against its source and its id. Returns whether the
    /// source has now used up its failures (for the log).
    pub fn failed(&self, source: Option<IpAddr>, id: Option<&str>) -> bool {
        let now = Instant::now();
        if let Some(id) = id {
            self.id_failures.record(id.to_string(), now);
        }
        source
            .is_some_and(|s| self.source_failures.record(s, now) >= self.config.failures_per_source)
    }

    /// Keys in the id failure table now (bounded by the table capacity).
    pub fn failure_table_len(&self) -> usize {
        self.id_failures.len()
    }

    /// Before redeeming a pairing code: 429 once `user_id` failed too many redemptions this
    /// hour (40-bit codes: finding 7).
    pub fn check_pair_failures(&self, user_id: &str) -> Result<()> {
        match self
            .pair_failures
            .exhausted(&user_id.to_string(), Instant::now())
        {
            Some(wait) => Err(rate_limited(wait)),
            None => Ok(()),
        }
    }

    /// Counts a failed redemption (no such code, or expired) against `user_id`.
    pub fn pair_failed(&self, user_id: &str) {
        self.pair_failures
            .record(user_id.to_string(), Instant::now());
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
                .swap_assigned(serial, expected, Some(record.clone()))
                .await?
            {
                self.remember(&creds.id, Record::Assigned(record));
                return Ok((creds, existing.is_some()));
            }
        }
    }

    /// FIG 28C 1844 for a device believed new: a fresh assigned set and its record, not yet
    /// stored. The caller stores it with the device's first contact
    /// ([`crate::store::Store::register_new`]) and, once written, calls
    /// [`CredentialService::issued`].
    pub fn fresh_assigned(&self, serial: &str) -> (Credentials, AssignedRecord) {
        let creds = new_assigned(serial);
        let record = AssignedRecord {
            current_hash: secret_hash(&creds.secret),
            issued_ms: now_ms(),
            previous: None,
        };
        (creds, record)
    }

    /// `record` was stored for `creds`: verifications of them are served from the cache
    /// (no store read) for [`CredentialConfig::cache_ttl`].
    pub fn issued(&self, creds: &Credentials, record: AssignedRecord) {
        self.remember(&creds.id, Record::Assigned(record));
    }

    /// FIG 28D/28F, 29C: what `record` says about the presented secret.
    fn judge(
        &self,
        record: &AssignedRecord,
        c: &Credentials,
        presented: &[u8; 32],
        now: u64,
    ) -> Result<Verdict> {
        // 1870G: the recently assigned (current) set.
        if ct_eq(presented, &record.current_hash) {
            let age = Duration::from_millis(now.saturating_sub(record.issued_ms));
            return Ok(if age < self.config.lifetime {
                Verdict::Current
            } else {
                Verdict::Expired
            });
        }
        // 1870H: the previously assigned set, within its grace period → 1870J resend.
        if let Some(prev) = &record.previous {
            if now < prev.grace_until_ms && ct_eq(presented, &prev.hash) {
                let secret = unseal(&c.secret, &prev.sealed_current)
                    .ok_or_else(|| NodeError::Internal("sealed credentials do not open".into()))?;
                return Ok(Verdict::Previous(Credentials {
                    id: c.id.clone(),
                    secret,
                }));
            }
        }
        Ok(Verdict::Unknown)
    }

    /// FIG 28D/28F and FIG 29C: verifies an assigned set. Valid current credentials older
    /// than the lifetime are rotated; the previous set works during the grace period and
    /// every use of it resends the current set.
    pub async fn verify_assigned(
        &self,
        c: &Credentials,
        serial: &str,
    ) -> Result<Option<Credentials>> {
        let presented = secret_hash(&c.secret);
        if let Some(cached) = self.cached(&c.id) {
            match &cached.record {
                Record::Assigned(r) => match self.judge(r, c, &presented, now_ms())? {
                    Verdict::Current => return Ok(None),
                    Verdict::Previous(current) => return Ok(Some(current)),
                    // Rotation writes: through the store below.
                    Verdict::Expired => {}
                    Verdict::Unknown if !self.may_reread(&c.id, &cached) => return Err(rejected()),
                    Verdict::Unknown => {}
                },
                Record::Absent if !self.may_reread(&c.id, &cached) => return Err(rejected()),
                _ => {}
            }
        }
        loop {
            let read = match self.store.get_assigned(serial).await {
                Err(e) if e.is_unanswered() => {
                    return match self.stale(c, &presented, e)? {
                        Verdict::Previous(current) => Ok(Some(current)),
                        _ => Ok(None),
                    }
                }
                other => other?,
            };
            let Some(record) = read else {
                self.remember(&c.id, Record::Absent);
                return Err(rejected());
            };
            self.remember(&c.id, Record::Assigned(record.clone()));
            let now = now_ms();
            match self.judge(&record, c, &presented, now)? {
                Verdict::Current => return Ok(None),
                Verdict::Previous(current) => return Ok(Some(current)),
                Verdict::Unknown => return Err(rejected()),
                Verdict::Expired => {}
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
                .swap_assigned(serial, Some(record.current_hash), Some(rotated.clone()))
                .await?
            {
                self.remember(&c.id, Record::Assigned(rotated));
                tracing::info!(device = serial, "assigned credentials rotated");
                return Ok(Some(fresh));
            }
            // Someone rotated concurrently: re-read; this set is now the previous one.
            self.forget(&c.id);
        }
    }

    /// Verifies a user's credentials.
    pub async fn verify_user(&self, c: &Credentials, user_id: &str) -> Result<()> {
        let presented = secret_hash(&c.secret);
        if let Some(cached) = self.cached(&c.id) {
            match &cached.record {
                Record::User(hash) if ct_eq(&presented, hash) => return Ok(()),
                Record::User(_) | Record::Absent if !self.may_reread(&c.id, &cached) => {
                    return Err(rejected())
                }
                _ => {}
            }
        }
        let read = match self.store.get_user(user_id).await {
            Err(e) if e.is_unanswered() => return self.stale(c, &presented, e).map(|_| ()),
            other => other?,
        };
        let Some(user) = read else {
            self.remember(&c.id, Record::Absent);
            return Err(rejected());
        };
        self.remember(&c.id, Record::User(user.secret_hash));
        if ct_eq(&presented, &user.secret_hash) {
            Ok(())
        } else {
            Err(rejected())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(config: CredentialConfig) -> (CredentialService, tempfile::TempDir) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = crate::store::redb::RedbStore::open(dir.path(), Metrics::new()).expect("open");
        (
            CredentialService::new(Arc::new(store), config, Metrics::new()),
            dir,
        )
    }

    #[test]
    fn idle_principals_are_forgotten_and_a_limited_one_stays_limited() {
        let (svc, _dir) = service(CredentialConfig {
            register_per_hour: 2,
            requests_per_second: 1000,
            ..CredentialConfig::default()
        });
        for i in 0..50 {
            svc.check_rate(&format!("a.IDLE{i}"))
                .expect("within its rate");
            svc.charge_registration(&format!("IDLE{i}"))
                .expect("within its quota");
        }
        svc.charge_registration("HOT").expect("first");
        svc.charge_registration("HOT").expect("second");
        assert!(matches!(
            svc.charge_registration("HOT"),
            Err(NodeError::RateLimited { .. })
        ));
        assert_eq!(svc.limited_keys(), (50, 51));
        // One request at 1000/s is a full budget again 1 ms later.
        std::thread::sleep(Duration::from_millis(20));
        let forgotten = svc.forget_idle(Instant::now());
        assert_eq!(forgotten.limited, 50, "the request budgets are full again");
        assert_eq!(
            svc.limited_keys(),
            (0, 51),
            "registration quotas refill over the hour: kept"
        );
        assert!(
            matches!(
                svc.charge_registration("HOT"),
                Err(NodeError::RateLimited { .. })
            ),
            "forgetting never resets a limit"
        );
        svc.check_rate("a.IDLE0")
            .expect("a forgotten key starts afresh");
    }

    #[test]
    fn a_cached_record_is_forgotten_once_past_every_use() {
        let (svc, _dir) = service(CredentialConfig::default());
        let t0 = Instant::now();
        svc.remember("a.SERIAL1", Record::Absent);
        svc.id_failures.record("a.SERIAL1".to_string(), t0);
        let config = svc.config().clone();
        let kept_for = config.cache_ttl.max(config.stale_if_error);
        let early = svc.forget_idle(t0 + config.cache_ttl);
        assert_eq!(
            (early.records, early.failures),
            (0, 0),
            "still usable when the store does not answer"
        );
        assert!(svc.records.get(&"a.SERIAL1".to_string()).is_some());
        let late = svc.forget_idle(t0 + kept_for + config.failure_window);
        assert_eq!((late.records, late.failures), (1, 1));
        assert!(svc.records.get(&"a.SERIAL1".to_string()).is_none());
        assert!(svc.id_failures.is_empty());
    }

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
