//! Push wake-ups of sleeping devices (seed 003; API.md "Presence and wake-ups").
//!
//! A change to a bucket of a device that holds no subscribe asks the [`Pusher`] to wake
//! it: a payload-free `{"device_id", "reason": "changed", "collapse_key"}` POSTed to the
//! push gateway (`--push-webhook`), signed with `X-Tether-Signature: sha256=<HMAC>`
//! (`--push-secret-file`). Per device, [`WakeState`] keeps one wake-up outstanding until
//! the device is seen (later changes collapse into it) and spaces wake-ups by the minimum
//! gap; all devices together are held to `--push-rate` per second; a delivery the gateway
//! refuses or does not answer is retried with capped exponential backoff
//! ([`retry_delay`]); at most 10,000 wait at once (more are dropped, counted). Nothing
//! of a bucket leaves in a wake-up. The state is per node (the
//! owner of a device's set decides): after a failover the new owner may wake a device once
//! more. Counted in `tether_push_wakeups_total{result}`.

use std::num::NonZeroU32;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use tether_proto::presence::{
    retry_delay, wakeup_signature, WakeDecision, WakePolicy, WakeState, SIGNATURE_HEADER,
};
use tether_proto::SetKey;

use crate::error::{NodeError, Result};
use crate::metrics::Metrics;
use crate::security::limits::BoundedMap;

/// Devices whose wake-up state one node remembers (least recently used forgotten first).
const DEVICES: usize = 100_000;
/// Most wake-ups one node keeps waiting (for their device's gap, the rate limit or a
/// retry): past it a wake-up is dropped (counted), so a burst of changes to many sleeping
/// devices cannot grow the node's memory without bound.
const MAX_PENDING: usize = 10_000;
/// Longest the gateway may take to answer one wake-up.
const GATEWAY_TIMEOUT: Duration = Duration::from_secs(5);
/// The CA bundle an `https` gateway is checked against when no `--push-ca-file` is given.
const SYSTEM_CAS: &str = "/etc/ssl/certs/ca-certificates.crt";

/// The push gateway and how wake-ups are paced.
#[derive(Clone)]
pub struct PushConfig {
    /// Where wake-ups are POSTed.
    pub webhook: String,
    /// The HMAC key of `X-Tether-Signature`.
    pub secret: Vec<u8>,
    /// Most wake-ups per second, all devices together.
    pub rate: NonZeroU32,
    /// Per-device spacing and retries.
    pub policy: WakePolicy,
    /// The CAs an `https` gateway is checked against (parsed once, from PEM).
    pub cas: Option<Vec<reqwest::Certificate>>,
}

impl std::fmt::Debug for PushConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PushConfig")
            .field("webhook", &self.webhook)
            .field("rate", &self.rate)
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

/// The `--push-*` flags (or their config-file keys) as given.
#[derive(Debug, Clone, Default)]
pub struct PushFlags {
    /// `--push-webhook`.
    pub webhook: Option<String>,
    /// `--push-secret-file`.
    pub secret_file: Option<PathBuf>,
    /// `--push-rate`.
    pub rate: Option<u32>,
    /// `--push-min-gap-ms`.
    pub min_gap_ms: Option<u64>,
    /// `--push-retry-ms`.
    pub retry_ms: Option<u64>,
    /// `--push-ca-file`.
    pub ca_file: Option<PathBuf>,
}

impl PushConfig {
    /// From the flags: `None` without a webhook; a webhook needs a readable, non-empty
    /// secret file and an `http(s)` URL.
    pub fn from_flags(flags: PushFlags) -> Result<Option<Self>> {
        let PushFlags {
            webhook,
            secret_file,
            rate,
            min_gap_ms,
            retry_ms,
            ca_file,
        } = flags;
        let Some(webhook) = webhook else {
            if secret_file.is_some() {
                return Err(NodeError::Config(
                    "--push-secret-file without --push-webhook".into(),
                ));
            }
            return Ok(None);
        };
        let url = reqwest::Url::parse(&webhook)
            .map_err(|e| NodeError::Config(format!("--push-webhook {webhook:?}: {e}")))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(NodeError::Config(format!(
                "--push-webhook {webhook:?}: not an http(s) URL"
            )));
        }
        let path = secret_file.ok_or_else(|| {
            NodeError::Config("--push-webhook needs --push-secret-file (the signing key)".into())
        })?;
        let text = std::fs::read_to_string(&path).map_err(|e| {
            NodeError::Config(format!("--push-secret-file {}: {e}", path.display()))
        })?;
        let secret = text.trim().as_bytes().to_vec();
        if secret.is_empty() {
            return Err(NodeError::Config(format!(
                "--push-secret-file {} is empty",
                path.display()
            )));
        }
        let cas = match (url.scheme(), ca_file) {
            ("https", file) => {
                let path = file.unwrap_or_else(|| PathBuf::from(SYSTEM_CAS));
                let pem = std::fs::read(&path).map_err(|e| {
                    NodeError::Config(format!(
                        "an https --push-webhook needs the CAs to check it against: \
                         --push-ca-file {}: {e}",
                        path.display()
                    ))
                })?;
                Some(reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
                    NodeError::Config(format!("--push-ca-file {}: {e}", path.display()))
                })?)
            }
            (_, Some(_)) => {
                return Err(NodeError::Config(
                    "--push-ca-file is for an https --push-webhook".into(),
                ))
            }
            _ => None,
        };
        let rate = NonZeroU32::new(rate.unwrap_or(100))
            .ok_or_else(|| NodeError::Config("--push-rate must be positive".into()))?;
        let defaults = WakePolicy::default();
        let policy = WakePolicy {
            min_gap_ms: min_gap_ms.unwrap_or(defaults.min_gap_ms),
            retry_base_ms: retry_ms.unwrap_or(defaults.retry_base_ms).max(1),
            ..defaults
        };
        Ok(Some(PushConfig {
            webhook,
            secret,
            rate,
            policy,
            cas,
        }))
    }
}

/// Sends the node's wake-ups.
pub struct Pusher {
    config: PushConfig,
    states: BoundedMap<SetKey, WakeState>,
    limiter: DefaultDirectRateLimiter,
    http: reqwest::Client,
    metrics: Metrics,
    started: Instant,
    runtime: tokio::runtime::Handle,
    /// Wake-ups decided and not yet delivered or given up.
    pending: std::sync::atomic::AtomicUsize,
    /// At most this many pending ([`MAX_PENDING`]).
    max_pending: usize,
}

impl std::fmt::Debug for Pusher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pusher")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Pusher {
    /// A pusher sending from the current tokio runtime.
    pub fn new(config: PushConfig, metrics: Metrics) -> Result<Arc<Self>> {
        let mut http = reqwest::Client::builder().timeout(GATEWAY_TIMEOUT);
        for ca in config.cas.iter().flatten() {
            http = http.add_root_certificate(ca.clone());
        }
        let http = http
            .build()
            .map_err(|e| NodeError::Config(format!("push client: {e}")))?;
        Ok(Arc::new(Pusher {
            limiter: RateLimiter::direct(Quota::per_second(config.rate)),
            config,
            states: BoundedMap::new(DEVICES),
            http,
            metrics,
            started: Instant::now(),
            runtime: tokio::runtime::Handle::current(),
            pending: std::sync::atomic::AtomicUsize::new(0),
            max_pending: MAX_PENDING,
        }))
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// A change for `device`, which holds no subscribe: wake it (now, after its gap, or
    /// not at all when a wake-up is outstanding). Callable from any thread.
    pub fn wake(self: &Arc<Self>, device: &SetKey) {
        let now = self.now_ms();
        let policy = self.config.policy;
        let decision = self.states.with(device.clone(), WakeState::default, |w| {
            w.on_change(now, &policy)
        });
        let at = match decision {
            WakeDecision::Collapsed => {
                self.metrics.wakeup("collapsed");
                return;
            }
            WakeDecision::Send => now,
            WakeDecision::SendAt(at) => at,
        };
        use std::sync::atomic::Ordering;
        if self.pending.fetch_add(1, Ordering::AcqRel) >= self.max_pending {
            self.pending.fetch_sub(1, Ordering::AcqRel);
            self.metrics.wakeup("dropped");
            self.states
                .with(device.clone(), WakeState::default, WakeState::on_given_up);
            return;
        }
        let me = self.clone();
        let device = device.clone();
        self.runtime.spawn(async move {
            let wait = Duration::from_millis(at.saturating_sub(me.now_ms()));
            if !wait.is_zero() {
                tokio::time::sleep(wait).await;
            }
            me.deliver(device).await;
            me.pending.fetch_sub(1, Ordering::AcqRel);
        });
    }

    /// `device` was seen (it subscribed or wrote): the next change needs a new wake-up.
    pub fn seen(&self, device: &SetKey) {
        self.states.update(device, WakeState::on_seen);
    }

    /// Posts one wake-up, retrying until the gateway takes it or the attempts run out.
    async fn deliver(&self, device: SetKey) {
        let body = serde_json::json!({
            "device_id": device.as_str(),
            "reason": "changed",
            "collapse_key": device.as_str(),
        })
        .to_string();
        let signature = wakeup_signature(&self.config.secret, body.as_bytes());
        let mut attempt = 0;
        loop {
            self.limiter.until_ready().await;
            let sent = self
                .http
                .post(&self.config.webhook)
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .header(SIGNATURE_HEADER, &signature)
                .body(body.clone())
                .send()
                .await;
            let why = match sent {
                Ok(r) if r.status().is_success() => {
                    self.metrics.wakeup("sent");
                    tracing::debug!(%device, "wake-up sent");
                    return;
                }
                Ok(r) => format!("gateway answered {}", r.status()),
                Err(e) => format!("gateway unreachable: {e}"),
            };
            attempt += 1;
            let Some(delay) = retry_delay(attempt, &self.config.policy) else {
                self.metrics.wakeup("failed");
                tracing::warn!(%device, attempts = attempt, %why, "wake-up given up");
                self.states
                    .with(device.clone(), WakeState::default, WakeState::on_given_up);
                return;
            };
            self.metrics.wakeup("retried");
            tracing::info!(%device, attempt, %why, retry_in_ms = delay, "wake-up not delivered; retrying");
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(webhook: &str) -> PushConfig {
        PushConfig {
            webhook: webhook.to_string(),
            secret: b"k".to_vec(),
            rate: NonZeroU32::MIN,
            policy: WakePolicy {
                retry_base_ms: 60_000,
                ..WakePolicy::default()
            },
            cas: None,
        }
    }

    fn count(metrics: &Metrics, result: &str) -> f64 {
        crate::metrics::sample_sum(
            &metrics.render(),
            &format!("tether_push_wakeups_total{{result=\"{result}\"}}"),
        )
        .unwrap_or(0.0)
    }

    #[tokio::test]
    async fn wake_ups_past_the_pending_bound_are_dropped_and_counted() {
        // A gateway that refuses connections: each wake-up waits for its retry.
        let metrics = Metrics::new();
        let p = Pusher::new(config("http://127.0.0.1:9/wake"), metrics.clone()).expect("pusher");
        let p = Arc::new(Pusher {
            max_pending: 2,
            ..Arc::into_inner(p).expect("one reference")
        });
        for d in ["D1", "D2", "D3", "D3"] {
            p.wake(&SetKey::parse(d).expect("key"));
        }
        // D3 is one too many, twice: a dropped wake-up is not outstanding, so the next
        // change for it tries again (and is dropped again while the two wait).
        assert_eq!(count(&metrics, "dropped"), 2.0);
        assert_eq!(count(&metrics, "collapsed"), 0.0);
        assert_eq!(p.pending.load(std::sync::atomic::Ordering::Acquire), 2);
    }

    #[test]
    fn a_webhook_needs_its_secret_and_https_needs_cas() {
        let dir = tempfile::tempdir().expect("dir");
        let secret = dir.path().join("s");
        std::fs::write(&secret, "key\n").expect("write");
        assert!(PushConfig::from_flags(PushFlags::default())
            .expect("off")
            .is_none());
        let no_secret = PushConfig::from_flags(PushFlags {
            webhook: Some("http://gw/wake".into()),
            ..PushFlags::default()
        });
        assert!(matches!(no_secret, Err(NodeError::Config(m)) if m.contains("--push-secret-file")));
        let ftp = PushConfig::from_flags(PushFlags {
            webhook: Some("ftp://gw/wake".into()),
            secret_file: Some(secret.clone()),
            ..PushFlags::default()
        });
        assert!(matches!(ftp, Err(NodeError::Config(m)) if m.contains("not an http(s) URL")));
        let no_cas = PushConfig::from_flags(PushFlags {
            webhook: Some("https://gw/wake".into()),
            secret_file: Some(secret.clone()),
            ca_file: Some(dir.path().join("missing.pem")),
            ..PushFlags::default()
        });
        assert!(matches!(no_cas, Err(NodeError::Config(m)) if m.contains("--push-ca-file")));
        let c = PushConfig::from_flags(PushFlags {
            webhook: Some("http://gw/wake".into()),
            secret_file: Some(secret),
            rate: Some(5),
            min_gap_ms: Some(0),
            ..PushFlags::default()
        })
        .expect("valid")
        .expect("on");
        assert_eq!(
            c.secret, b"key",
            "the file's trailing newline is not part of the key"
        );
        assert_eq!((c.rate.get(), c.policy.min_gap_ms), (5, 0));
    }
}
