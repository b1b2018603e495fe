//! Presence and wake-ups of sleeping devices (seed 003; API.md "Presence and wake-ups").
//!
//! [`Presence`] is what the owner of a device's bucket set knows of the device: when it was
//! last seen, when it promised to sync next, and whether it is online — holding a
//! subscribe now, or just answered one with a change (it resubscribes at once, and a write
//! in between must not count it asleep). [`WakeState`] decides, per device, whether a change
//! for an offline device sends a wake-up now, later (the per-device gap), or is collapsed
//! into one already outstanding; [`retry_delay`] spaces the retries of one that failed.
//! Pure: time comes in as `now` (ms).

use alloc::string::String;
use core::fmt::Write as _;

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::Millis;

/// The header that signs a wake-up's body.
pub const SIGNATURE_HEADER: &str = "X-Tether-Signature";

/// The `X-Tether-Signature` value of a wake-up body: `sha256=<hex HMAC-SHA256 of the
/// body under the push secret>`.
pub fn wakeup_signature(secret: &[u8], body: &[u8]) -> String {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret)
        .unwrap_or_else(|_| unreachable!("HMAC takes a key of any length"));
    mac.update(body);
    let mut out = String::from("sha256=");
    for b in mac.finalize().into_bytes() {
        let _ = write!(out, "{b:02x}");
    }
    out
}

/// Whether `header` is the signature of `body` under `secret` (compared in constant time).
pub fn wakeup_signature_valid(secret: &[u8], body: &[u8], header: &str) -> bool {
    let Some(hex) = header.strip_prefix("sha256=") else {
        return false;
    };
    if hex.len() != 64 || !hex.bytes().all(|c| c.is_ascii_hexdigit()) {
        return false;
    }
    let mut tag = [0u8; 32];
    for (i, pair) in hex.as_bytes().chunks(2).enumerate() {
        let digit = |c: u8| (c as char).to_digit(16).unwrap_or(0) as u8;
        tag[i] = digit(pair[0]) << 4 | digit(pair[1]);
    }
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret)
        .unwrap_or_else(|_| unreachable!("HMAC takes a key of any length"));
    mac.update(body);
    mac.verify_slice(&tag).is_ok()
}

/// After a held subscribe of the device is answered with a change, the device counts as
/// online this long: it is expected to subscribe again at once.
pub const RESUBSCRIBE_GRACE_MS: Millis = 5_000;

/// What the owner knows of one device. Every parked set keeps one (in the node's table
/// of parked sets, one entry per held device): three times of 8 bytes, not of 16.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Presence {
    last_seen: At,
    next_sync_by: At,
    answered_at: At,
}

/// A time or none, in 8 bytes: `Millis::MAX` is none (a time never reached: set times
/// stop one short of it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct At(Millis);

impl Default for At {
    fn default() -> Self {
        At::NONE
    }
}

impl At {
    const NONE: At = At(Millis::MAX);

    fn some(t: Millis) -> At {
        At(t.min(Millis::MAX - 1))
    }

    fn of(t: Option<Millis>) -> At {
        t.map_or(At::NONE, At::some)
    }

    fn get(self) -> Option<Millis> {
        (self != At::NONE).then_some(self.0)
    }
}

/// Presence as answered (`GET /v1/devices/{id}/presence`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PresenceView {
    /// Holds a subscribe now (or was answered one a moment ago).
    pub online: bool,
    /// When the device last subscribed, wrote or registered.
    pub last_seen: Option<Millis>,
    /// When it said it will sync next (its last declared `next_sync_ms` from then).
    pub next_sync_by: Option<Millis>,
}

impl Presence {
    /// The device subscribed or registered, declaring when it syncs next (`None`: it
    /// promises nothing, and an earlier promise is void). A subscribe after an answer
    /// ends that answer's grace: from now on, whether it holds one says it.
    pub fn declared(&mut self, now: Millis, next_sync_ms: Option<u64>) {
        self.last_seen = At::some(now);
        self.next_sync_by = At::of(next_sync_ms.map(|ms| now.saturating_add(ms)));
        self.answered_at = At::NONE;
    }

    /// The device wrote (its promise stands).
    pub fn seen(&mut self, now: Millis) {
        self.last_seen = At::some(now);
    }

    /// A held subscribe of the device was answered with a change.
    pub fn answered(&mut self, now: Millis) {
        self.answered_at = At::some(now);
    }

    /// The view at `now`, the device holding a subscribe or not.
    pub fn view(&self, holding: bool, now: Millis) -> PresenceView {
        let just_answered = self
            .answered_at
            .get()
            .is_some_and(|t| now.saturating_sub(t) < RESUBSCRIBE_GRACE_MS);
        PresenceView {
            online: holding || just_answered,
            last_seen: self.last_seen.get(),
            next_sync_by: self.next_sync_by.get(),
        }
    }
}

/// How wake-ups are spaced (per device) and retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WakePolicy {
    /// Least time between two wake-ups sent to one device.
    pub min_gap_ms: Millis,
    /// A wake-up is outstanding (later changes collapse into it) until the device is seen,
    /// or at most this long.
    pub outstanding_ms: Millis,
    /// First retry delay of a failed delivery to the gateway; doubles per attempt.
    pub retry_base_ms: Millis,
    /// Longest retry delay.
    pub retry_cap_ms: Millis,
    /// Deliveries tried per wake-up before it is given up (counted failed).
    pub max_attempts: u32,
}

impl Default for WakePolicy {
    fn default() -> Self {
        WakePolicy {
            min_gap_ms: 10_000,
            outstanding_ms: 600_000,
            retry_base_ms: 500,
            retry_cap_ms: 30_000,
            max_attempts: 8,
        }
    }
}

/// What to do with a change for an offline device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WakeDecision {
    /// Send a wake-up now.
    Send,
    /// Send one at this time (the device's gap since the last one); later changes
    /// collapse into it.
    SendAt(Millis),
    /// One is outstanding: this change rides on it.
    Collapsed,
}

/// One device's wake-up state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WakeState {
    /// When the outstanding wake-up was decided (sent or scheduled), if one is.
    outstanding_since: Option<Millis>,
    /// When the last wake-up was (or is to be) sent.
    last_sent: Option<Millis>,
}

impl WakeState {
    /// A change for the offline device at `now`.
    pub fn on_change(&mut self, now: Millis, policy: &WakePolicy) -> WakeDecision {
        if let Some(since) = self.outstanding_since {
            if now.saturating_sub(since) < policy.outstanding_ms {
                return WakeDecision::Collapsed;
            }
        }
        self.outstanding_since = Some(now);
        let earliest = self
            .last_sent
            .map_or(now, |t| t.saturating_add(policy.min_gap_ms));
        let at = earliest.max(now);
        self.last_sent = Some(at);
        if at > now {
            WakeDecision::SendAt(at)
        } else {
            WakeDecision::Send
        }
    }

    /// The device was seen (it synced): the next change needs a new wake-up.
    pub fn on_seen(&mut self) {
        self.outstanding_since = None;
    }

    /// The wake-up was given up: the next change may try again.
    pub fn on_given_up(&mut self) {
        self.outstanding_since = None;
    }

    /// Nothing outstanding and nothing to space from at `now`: the state may be forgotten.
    pub fn is_idle(&self, now: Millis, policy: &WakePolicy) -> bool {
        self.outstanding_since.is_none()
            && self
                .last_sent
                .is_none_or(|t| now.saturating_sub(t) >= policy.min_gap_ms)
    }
}

/// The delay before delivery attempt `attempt` (1 = the first retry) of a wake-up whose
/// previous attempt failed; `None` once `max_attempts` were made.
pub fn retry_delay(attempt: u32, policy: &WakePolicy) -> Option<Millis> {
    if attempt == 0 || attempt >= policy.max_attempts {
        return None;
    }
    let factor = 1u64.checked_shl(attempt - 1).unwrap_or(u64::MAX);
    Some(
        policy
            .retry_base_ms
            .saturating_mul(factor)
            .min(policy.retry_cap_ms),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec::Vec;
    use proptest::prelude::*;

    #[test]
    fn signatures_verify_and_any_change_breaks_them() {
        let body = br#"{"device_id":"D1","reason":"changed","collapse_key":"D1"}"#;
        let sig = wakeup_signature(b"secret", body);
        assert!(sig.starts_with("sha256=") && sig.len() == 7 + 64);
        assert!(wakeup_signature_valid(b"secret", body, &sig));
        assert!(!wakeup_signature_valid(b"other", body, &sig));
        assert!(!wakeup_signature_valid(b"secret", b"{}", &sig));
        assert!(!wakeup_signature_valid(b"secret", body, &sig[7..]));
        assert!(!wakeup_signature_valid(b"secret", body, "sha256=zz"));
        // RFC 4231 test case 2.
        assert_eq!(
            wakeup_signature(b"Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn presence_follows_the_devices_contacts() {
        let mut p = Presence::default();
        assert_eq!(
            p.view(false, 1_000),
            PresenceView {
                online: false,
                last_seen: None,
                next_sync_by: None
            }
        );
        p.declared(1_000, Some(60_000));
        assert_eq!(p.view(true, 1_500).next_sync_by, Some(61_000));
        assert!(p.view(true, 1_500).online);
        assert!(!p.view(false, 1_500).online, "no subscribe held: offline");
        p.seen(2_000);
        assert_eq!(p.view(false, 2_000).last_seen, Some(2_000));
        assert_eq!(
            p.view(false, 2_000).next_sync_by,
            Some(61_000),
            "a write keeps the promise"
        );
        p.declared(3_000, None);
        assert_eq!(
            p.view(false, 3_000).next_sync_by,
            None,
            "no promise voids the old one"
        );
    }

    /// The compact times keep every time, the first millisecond and a promise as far off
    /// as it can be included: only "none" reads as none.
    #[test]
    fn times_at_the_edges_are_kept() {
        let mut p = Presence::default();
        p.declared(0, Some(Millis::MAX));
        let v = p.view(false, 0);
        assert_eq!(v.last_seen, Some(0));
        assert_eq!(
            v.next_sync_by,
            Some(Millis::MAX - 1),
            "a far promise is still one"
        );
        p.seen(Millis::MAX);
        assert!(p.view(false, 0).last_seen.is_some());
        p.answered(0);
        assert!(
            p.view(false, 1).online,
            "answered at 0: within the grace at 1"
        );
    }

    #[test]
    fn a_device_just_answered_is_online_for_the_grace() {
        let mut p = Presence::default();
        p.answered(10_000);
        assert!(p.view(false, 10_000).online);
        assert!(p.view(false, 10_000 + RESUBSCRIBE_GRACE_MS - 1).online);
        assert!(!p.view(false, 10_000 + RESUBSCRIBE_GRACE_MS).online);
        // It resubscribed (and that subscribe ended): no grace left.
        p.answered(20_000);
        p.declared(20_100, None);
        assert!(!p.view(false, 20_200).online);
    }

    #[test]
    fn changes_collapse_into_one_outstanding_wake_up_until_the_device_is_seen() {
        let policy = WakePolicy::default();
        let mut w = WakeState::default();
        let decisions: Vec<_> = (0..5).map(|i| w.on_change(1_000 + i, &policy)).collect();
        assert_eq!(decisions[0], WakeDecision::Send);
        assert!(decisions[1..].iter().all(|d| *d == WakeDecision::Collapsed));
        // Seen, then a change within the gap: scheduled at the gap's end, not dropped.
        w.on_seen();
        assert_eq!(
            w.on_change(3_000, &policy),
            WakeDecision::SendAt(1_000 + policy.min_gap_ms)
        );
        assert_eq!(w.on_change(3_001, &policy), WakeDecision::Collapsed);
        // Seen again, past the gap: at once.
        w.on_seen();
        assert_eq!(w.on_change(30_000, &policy), WakeDecision::Send);
        // A device that never comes: a new wake-up once the outstanding one expired.
        let later = 30_000 + policy.outstanding_ms;
        assert_eq!(w.on_change(later, &policy), WakeDecision::Send);
    }

    #[test]
    fn retries_double_up_to_the_cap_and_stop() {
        let policy = WakePolicy::default();
        let delays: Vec<_> = (1..policy.max_attempts)
            .map(|a| retry_delay(a, &policy))
            .collect();
        assert_eq!(
            delays,
            [500, 1_000, 2_000, 4_000, 8_000, 16_000, 30_000].map(Some)
        );
        assert_eq!(retry_delay(policy.max_attempts, &policy), None);
        assert_eq!(retry_delay(0, &policy), None);
    }

    proptest! {
        /// However changes and sightings interleave, two wake-ups to one device are never
        /// closer than the gap, and nothing is sent while one is outstanding and fresh.
        #[test]
        fn wake_ups_respect_the_gap_and_collapse(
            events in proptest::collection::vec((0u64..20_000, any::<bool>()), 1..200)
        ) {
            let policy = WakePolicy { min_gap_ms: 5_000, outstanding_ms: 50_000, ..WakePolicy::default() };
            let mut w = WakeState::default();
            let mut now = 0;
            let mut sends: Vec<Millis> = Vec::new();
            let mut outstanding_since: Option<Millis> = None;
            for (step, seen) in events {
                now += step;
                if seen {
                    w.on_seen();
                    outstanding_since = None;
                    continue;
                }
                match w.on_change(now, &policy) {
                    WakeDecision::Send => { sends.push(now); outstanding_since = Some(now); }
                    WakeDecision::SendAt(t) => {
                        prop_assert!(t > now);
                        sends.push(t);
                        outstanding_since = Some(now);
                    }
                    WakeDecision::Collapsed => {
                        let since = outstanding_since.expect("collapsed into nothing");
                        prop_assert!(now - since < policy.outstanding_ms);
                    }
                }
            }
            for pair in sends.windows(2) {
                prop_assert!(pair[1] >= pair[0] + policy.min_gap_ms, "{sends:?}");
            }
        }
    }
}
