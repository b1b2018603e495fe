//! A fair share of held subscriptions: each principal (a device, a user) may hold at most
//! `max_held_per_principal` subscriptions on this node at once. A new one beyond that
//! answers the principal's oldest with an empty list ("no change": its client subscribes
//! again if it still cares), so a device that reconnects without closing its old
//! connections, or one that opens thousands on purpose, never holds more than its cap of
//! the node's connections and file descriptors (issue 13 finding 5).

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Waker};

use crate::metrics::Metrics;

/// One principal's held subscriptions, oldest first. Inline in the map's entry: most
/// principals hold one.
type Queue = smallvec::SmallVec<[Waiting; 1]>;

/// A held subscription's place: its id, and the task to wake should it lose the place.
/// Nothing of its own to allocate (a channel each was ≈ 80 B per held device).
#[derive(Debug)]
struct Waiting {
    id: u64,
    waker: Option<Waker>,
}

/// Held subscriptions by principal, oldest first.
#[derive(Debug)]
pub struct HeldByPrincipal {
    cap: usize,
    next: AtomicU64,
    slots: Mutex<Slots>,
    /// Keys the principals' names are hashed with ([`Slots::by_principal`]).
    names: RandomState,
    metrics: Metrics,
}

/// The held subscriptions, and whether the node drains.
#[derive(Debug, Default)]
struct Slots {
    /// By a keyed 64-bit hash of the principal's name rather than a copy of it (as the
    /// rate limiters are, `security::limits`): one held device's entry is its hash and its
    /// queue, in the table itself. Two principals whose names collide (a chance of ≈ n² / 2⁶⁵
    /// for n principals held at once: 3 × 10⁻¹⁰ for 100,000) would share one cap.
    by_principal: HashMap<u64, Queue>,
    /// The node drains: every held subscription was answered, new ones are at once.
    draining: bool,
}

/// One held subscription's place in its principal's share; dropping it (the subscription
/// ended) frees the place. It is lost ([`HeldSlot::evicted`]) when a newer subscription of
/// the same principal takes it, or when the node starts draining.
#[derive(Debug)]
pub struct HeldSlot {
    owner: Arc<HeldByPrincipal>,
    /// The map's key for the principal.
    principal: u64,
    id: u64,
}

impl HeldByPrincipal {
    /// At most `cap` held subscriptions per principal.
    pub fn new(cap: usize, metrics: Metrics) -> Arc<Self> {
        Arc::new(HeldByPrincipal {
            cap: cap.max(1),
            next: AtomicU64::new(1),
            slots: Mutex::new(Slots::default()),
            names: RandomState::new(),
            metrics,
        })
    }

    /// Takes a place for a new held subscription of `principal`, evicting its oldest when
    /// the principal is at its cap.
    pub fn register(self: &Arc<Self>, principal: &str) -> HeldSlot {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let principal = self.names.hash_one(principal);
        let slot = HeldSlot {
            owner: self.clone(),
            principal,
            id,
        };
        let mut slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        if slots.draining {
            // Not placed, so lost at once: nothing is held on a draining node.
            return slot;
        }
        let queue = slots.by_principal.entry(principal).or_default();
        while queue.len() >= self.cap {
            // The oldest first (at most `cap` entries: a short shift); its holder, if
            // still there, finds its place gone.
            let oldest = queue.remove(0);
            if let Some(waker) = oldest.waker {
                waker.wake();
            }
            self.metrics.limited("held_per_principal");
        }
        queue.push(Waiting { id, waker: None });
        slot
    }

    /// The node drains: every held subscription is answered now ("no change": its client
    /// subscribes again, on another node), and every later one as soon as it is held.
    pub fn drain(&self) {
        let mut slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        slots.draining = true;
        for (_, queue) in slots.by_principal.drain() {
            for held in queue {
                if let Some(waker) = held.waker {
                    waker.wake();
                }
            }
        }
    }

    /// Held subscriptions of `principal` on this node.
    pub fn held_by(&self, principal: &str) -> usize {
        self.slots
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .by_principal
            .get(&self.names.hash_one(principal))
            .map_or(0, |queue| queue.len())
    }
}

impl HeldSlot {
    /// Ready once the place is lost: a newer subscription of the principal took it, or
    /// the node drains. Until then the task polling it is woken when that happens.
    pub fn poll_evicted(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let mut slots = self
            .owner
            .slots
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let placed = slots
            .by_principal
            .get_mut(&self.principal)
            .and_then(|queue| queue.iter_mut().find(|w| w.id == self.id));
        match placed {
            None => Poll::Ready(()),
            Some(place) => {
                match &mut place.waker {
                    Some(waker) if waker.will_wake(cx.waker()) => {}
                    waker => *waker = Some(cx.waker().clone()),
                }
                Poll::Pending
            }
        }
    }

    /// Completes once the place is lost ([`HeldSlot::poll_evicted`]).
    pub fn evicted(&mut self) -> impl std::future::Future<Output = ()> + '_ {
        std::future::poll_fn(|cx| self.poll_evicted(cx))
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
            queue.retain(|w| w.id != self.id);
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
    use std::sync::atomic::AtomicUsize;

    #[test]
    fn the_oldest_goes_when_a_principal_exceeds_its_cap_and_others_are_unaffected() {
        let held = HeldByPrincipal::new(2, Metrics::new());
        let mut a1 = held.register("a");
        let a2 = held.register("a");
        let b1 = held.register("b");
        assert_eq!(held.held_by("a"), 2);
        let mut a3 = held.register("a");
        assert!(evicted_now(&mut a1), "the oldest of a is answered");
        assert_eq!(held.held_by("a"), 2);
        assert_eq!(held.held_by("b"), 1, "b keeps its place");
        drop(a2);
        assert_eq!(held.held_by("a"), 1);
        assert!(!evicted_now(&mut a3), "a3 holds on");
        drop((a1, a3, b1));
        assert_eq!(held.held_by("a") + held.held_by("b"), 0);
    }

    #[test]
    fn draining_answers_every_held_subscription_and_each_later_one_at_once() {
        let held = HeldByPrincipal::new(2, Metrics::new());
        let mut a = held.register("a");
        let mut b = held.register("b");
        assert!(!evicted_now(&mut a), "held until the drain");
        held.drain();
        assert!(evicted_now(&mut a));
        assert!(evicted_now(&mut b));
        let mut later = held.register("a");
        assert!(evicted_now(&mut later), "answered as it is held");
        assert_eq!(held.held_by("a"), 0);
        drop((a, b, later));
        assert_eq!(held.held_by("a") + held.held_by("b"), 0);
    }

    /// A holder waiting on its place is woken when it loses it, by a newer subscription
    /// of its principal or by the drain; not before.
    #[test]
    fn a_waiting_holder_is_woken_when_its_place_is_lost() {
        struct Count(std::sync::atomic::AtomicUsize);
        impl std::task::Wake for Count {
            fn wake(self: Arc<Self>) {
                self.0.fetch_add(1, Ordering::SeqCst);
            }
        }
        let woken = |c: &Arc<Count>| c.0.load(Ordering::SeqCst);
        let held = HeldByPrincipal::new(1, Metrics::new());
        let (first, second) = (
            Arc::new(Count(AtomicUsize::new(0))),
            Arc::new(Count(AtomicUsize::new(0))),
        );
        let mut a1 = held.register("a");
        let waker = Waker::from(first.clone());
        assert!(a1
            .poll_evicted(&mut Context::from_waker(&waker))
            .is_pending());
        let mut b = held.register("b");
        assert_eq!(woken(&first), 0, "another principal takes nothing of a's");
        let mut a2 = held.register("a");
        assert_eq!(
            woken(&first),
            1,
            "the newer subscription of a woke the older"
        );
        assert!(evicted_now(&mut a1));
        let waker = Waker::from(second.clone());
        assert!(a2
            .poll_evicted(&mut Context::from_waker(&waker))
            .is_pending());
        assert!(!evicted_now(&mut b));
        held.drain();
        assert_eq!(woken(&second), 1, "the drain woke the holder");
        assert!(evicted_now(&mut a2) && evicted_now(&mut b));
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

    /// Whether the slot's place is lost, polled once.
    fn evicted_now(slot: &mut HeldSlot) -> bool {
        let mut cx = Context::from_waker(Waker::noop());
        slot.poll_evicted(&mut cx).is_ready()
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
