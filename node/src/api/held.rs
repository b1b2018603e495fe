//! A fair share of held subscriptions: each principal (a device, a user) may hold at most
//! `max_held_per_principal` subscriptions on this node at once. A new one beyond that
//! answers the principal's oldest with an empty list ("no change": its client subscribes
//! again if it still cares), so a device that reconnects without closing its old
//! connections, or one that opens thousands on purpose, never holds more than its cap of
//! the node's connections and file descriptors (issue 13 finding 5).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::oneshot;

use crate::metrics::Metrics;

/// One principal's held subscriptions, oldest first: an id and the way to answer it.
type Queue = VecDeque<(u64, oneshot::Sender<()>)>;

/// Held subscriptions by principal, oldest first.
#[derive(Debug)]
pub struct HeldByPrincipal {
    cap: usize,
    next: AtomicU64,
    slots: Mutex<Slots>,
    metrics: Metrics,
}

/// The held subscriptions, and whether the node drains.
#[derive(Debug, Default)]
struct Slots {
    by_principal: HashMap<Arc<str>, Queue>,
    /// The node drains: every held subscription was answered, new ones are at once.
    draining: bool,
}

/// One held subscription's place in its principal's share; dropping it (the subscription
/// ended) frees the place.
#[derive(Debug)]
pub struct HeldSlot {
    owner: Arc<HeldByPrincipal>,
    /// The map's own key: one allocation of the name, however many slots share it.
    principal: Arc<str>,
    id: u64,
    /// Resolves when a newer subscription of the same principal took this one's place,
    /// or when the node starts draining.
    pub evicted: oneshot::Receiver<()>,
}

impl HeldByPrincipal {
    /// At most `cap` held subscriptions per principal.
    pub fn new(cap: usize, metrics: Metrics) -> Arc<Self> {
        Arc::new(HeldByPrincipal {
            cap: cap.max(1),
            next: AtomicU64::new(1),
            slots: Mutex::new(Slots::default()),
            metrics,
        })
    }

    /// Takes a place for a new held subscription of `principal`, evicting its oldest when
    /// the principal is at its cap.
    pub fn register(self: &Arc<Self>, principal: String) -> HeldSlot {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        let mut slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        let principal = match slots.by_principal.get_key_value(principal.as_str()) {
            Some((key, _)) => key.clone(),
            None => Arc::from(principal),
        };
        if slots.draining {
            // Answered at once: nothing is held on a draining node.
            let _ = tx.send(());
            return HeldSlot {
                owner: self.clone(),
                principal,
                id,
                evicted: rx,
            };
        }
        // Most principals hold one subscription: room for one, not a `VecDeque`'s four.
        let queue = slots
            .by_principal
            .entry(principal.clone())
            .or_insert_with(|| VecDeque::with_capacity(1));
        while queue.len() >= self.cap {
            if let Some((_, oldest)) = queue.pop_front() {
                // Its holder may be gone already; then there is nobody to tell.
                let _ = oldest.send(());
                self.metrics.limited("held_per_principal");
            }
        }
        queue.push_back((id, tx));
        HeldSlot {
            owner: self.clone(),
            principal,
            id,
            evicted: rx,
        }
    }

    /// The node drains: every held subscription is answered now ("no change": its client
    /// subscribes again, on another node), and every later one as soon as it is held.
    pub fn drain(&self) {
        let mut slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        slots.draining = true;
        for (_, queue) in slots.by_principal.drain() {
            for (_, held) in queue {
                // Its holder may be gone already; then there is nobody to tell.
                let _ = held.send(());
            }
        }
    }

    /// Held subscriptions of `principal` on this node.
    pub fn held_by(&self, principal: &str) -> usize {
        self.slots
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .by_principal
            .get(principal)
            .map_or(0, VecDeque::len)
    }
}

impl Drop for HeldSlot {
    fn drop(&mut self) {
        let mut slots = self
            .owner
            .slots
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(queue) = slots.by_principal.get_mut(&self.principal) {
            // At most `cap` entries: a short scan.
            queue.retain(|(id, _)| *id != self.id);
            if queue.is_empty() {
                slots.by_principal.remove(&self.principal);
            }
        }
    }
}

/// Shrinks a subscribe's header map to the headers it has. actix-web keeps a request until
/// its handler answers: a held long-poll's only until the hold (`api::http::HeldResponse`),
/// but a stream's, and a held subscribe's that delivers new credentials, for as long as
/// they last; and actix-http sizes every request head's map for 16 headers (32 slots:
/// 6.7 KB at upstream's ≈ 200 B a slot, BENCHMARKS.md "Parked subscriptions"; ≈ 2.6 KB at
/// the vendored copy's ≈ 80 B, `vendor/actix-http/TETHER.md`), where a subscribe carries
/// about six. The values are copied into one allocation of their own size: as parsed they
/// share the buffer the whole request head was read into (≈ 0.4 KB).
/// Every header is kept, repeated ones in their order.
pub fn compact_headers(head: &mut actix_web::dev::RequestHead) {
    use actix_web::http::header::{HeaderMap, HeaderValue};
    let len = head.headers.iter().map(|(_, v)| v.len()).sum();
    let mut values = bytes::BytesMut::with_capacity(len);
    for (_, value) in head.headers.iter() {
        values.extend_from_slice(value.as_bytes());
    }
    let values = values.freeze();
    let mut at = 0;
    let mut compact = HeaderMap::with_capacity(head.headers.len_keys());
    for (name, value) in head.headers.iter() {
        let copied = values.slice(at..at + value.len());
        at += value.len();
        // The same bytes, so valid as before; kept as they were should that ever fail.
        let copy = match HeaderValue::from_maybe_shared(copied) {
            Ok(mut copy) => {
                copy.set_sensitive(value.is_sensitive());
                copy
            }
            Err(_) => value.clone(),
        };
        compact.append(name.clone(), copy);
    }
    head.headers = compact;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_oldest_goes_when_a_principal_exceeds_its_cap_and_others_are_unaffected() {
        let held = HeldByPrincipal::new(2, Metrics::new());
        let mut a1 = held.register("a".into());
        let a2 = held.register("a".into());
        let b1 = held.register("b".into());
        assert_eq!(held.held_by("a"), 2);
        let mut a3 = held.register("a".into());
        assert_eq!(a1.evicted.try_recv(), Ok(()), "the oldest of a is answered");
        assert_eq!(held.held_by("a"), 2);
        assert_eq!(held.held_by("b"), 1, "b keeps its place");
        drop(a2);
        assert_eq!(held.held_by("a"), 1);
        assert!(a3.evicted.try_recv().is_err(), "a3 holds on");
        drop((a1, a3, b1));
        assert_eq!(held.held_by("a") + held.held_by("b"), 0);
    }

    #[test]
    fn draining_answers_every_held_subscription_and_each_later_one_at_once() {
        let held = HeldByPrincipal::new(2, Metrics::new());
        let mut a = held.register("a".into());
        let mut b = held.register("b".into());
        assert!(a.evicted.try_recv().is_err(), "held until the drain");
        held.drain();
        assert_eq!(a.evicted.try_recv(), Ok(()));
        assert_eq!(b.evicted.try_recv(), Ok(()));
        let mut later = held.register("a".into());
        assert_eq!(later.evicted.try_recv(), Ok(()), "answered as it is held");
        assert_eq!(held.held_by("a"), 0);
        drop((a, b, later));
        assert_eq!(held.held_by("a") + held.held_by("b"), 0);
    }

    /// Every header survives, a repeated one with all its values in order.
    #[test]
    fn compacted_headers_keep_every_value() {
        let mut req = actix_web::test::TestRequest::post()
            .uri("/v1/subscribe")
            .insert_header(("authorization", "Basic ZGV2OnNlY3JldA=="))
            .insert_header(("content-type", "application/json"))
            .append_header(("x-tether-test", "one"))
            .append_header(("x-tether-test", "two"))
            .to_srv_request();
        let before: Vec<(String, Vec<u8>)> = pairs(req.headers());
        compact_headers(req.head_mut());
        assert_eq!(pairs(req.headers()), before);
        let repeated: Vec<&str> = req
            .headers()
            .get_all("x-tether-test")
            .map(|v| v.to_str().expect("ascii"))
            .collect();
        assert_eq!(repeated, ["one", "two"]);
    }

    fn pairs(h: &actix_web::http::header::HeaderMap) -> Vec<(String, Vec<u8>)> {
        let mut v: Vec<_> = h
            .iter()
            .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
            .collect();
        v.sort();
        v
    }
}
