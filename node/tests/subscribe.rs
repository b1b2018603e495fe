//! Black-box tests of long-poll subscriptions: immediate answers, held answers, timeouts,
//! echo suppression, 1,000 concurrent holds, 2,000 held devices whose sets passivate,
//! cancellation by closing the connection, and graceful shutdown on SIGTERM.

use std::time::Duration;

use futures::stream::{self, StreamExt};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use tether_test_support::node::*;

const A: &str = "01AA02AB";
const B: &str = "01AA02AC";

/// Long enough that a subscription only ends because of the event under test.
const HOLD_MS: u64 = 60_000;

/// Subscribes in the background (the held request may last up to `limit`).
fn spawn_subscribe(p: &Principal, body: Value, limit: Duration) -> tokio::task::JoinHandle<Resp> {
    let p = p.clone();
    tokio::spawn(async move { p.subscribe(&body, limit).await })
}

/// Subscribes in the background as a device does: a 503 (the node busy, e.g. 2,000
/// credentials checked at once on a loaded machine) is retried after its `Retry-After`.
fn spawn_subscribe_retrying(p: &Principal, body: Value) -> tokio::task::JoinHandle<Resp> {
    let p = p.clone();
    tokio::spawn(async move {
        let mut tries = 0;
        loop {
            let r = p.subscribe(&body, Duration::from_secs(610)).await;
            tries += 1;
            if r.status != StatusCode::SERVICE_UNAVAILABLE || tries == 30 {
                return r;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    })
}

fn held(id: &str, bucket: &Value) -> Value {
    json!({"id": id, "timestamp": bucket["timestamp"], "version": bucket["version"]})
}

/// A node whose thermostat template has the fields these tests write (a node refuses
/// fields outside a template).
fn sub_node() -> NodeBuilder {
    Node::builder().config(&thermostat_template(&[
        "round",
        "theirs",
        "mine",
        "mode",
        "away",
        "target_temperature",
    ]))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribe_answers_at_once_when_the_client_is_stale() {
    let node = sub_node().start().await;
    let a = node.device(A);
    a.register_thermostat().await;
    let dev = format!("device.{A}");
    let shared = format!("shared.{A}");
    let d1 = a.bucket(&dev).await;
    let s1 = a.bucket(&shared).await;
    a.write(&shared, json!({"away": true}), 1).await;
    let s2 = a.bucket(&shared).await;

    // device current, shared stale → only shared, full, answered at once.
    let r = a
        .subscribe(
            &json!({"buckets": [held(&dev, &d1), held(&shared, &s1)], "session": "x", "timeout_ms": HOLD_MS}),
            NOTIFY_DEADLINE,
        )
        .await
        .expect_json(StatusCode::OK);
    assert_eq!(
        ids_of(&r),
        vec![shared.clone()],
        "only the stale bucket: {r}"
    );
    assert_eq!(bucket_in(&r, &shared), s2, "full stored bucket");

    // No version sent → answered at once with that bucket.
    let r = a
        .subscribe(
            &json!({"buckets": [{"id": dev}], "timeout_ms": HOLD_MS}),
            NOTIFY_DEADLINE,
        )
        .await
        .expect_json(StatusCode::OK);
    assert_eq!(ids_of(&r), vec![dev.clone()], "{r}");
    assert_eq!(bucket_in(&r, &dev), d1);

    // A version that differs in the other direction also counts as different.
    let r = a
        .subscribe(
            &json!({"buckets": [{"id": dev, "timestamp": d1["timestamp"], "version": 99}], "timeout_ms": HOLD_MS}),
            NOTIFY_DEADLINE,
        )
        .await
        .expect_json(StatusCode::OK);
    assert_eq!(ids_of(&r), vec![dev.clone()], "{r}");
    assert_eq!(bucket_in(&r, &dev), d1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribe_is_held_until_another_client_writes() {
    let node = sub_node().start().await;
    let a = node.device(A);
    a.register_thermostat().await;
    let dev = format!("device.{A}");
    let shared = format!("shared.{A}");
    let d1 = a.bucket(&dev).await;
    let s1 = a.bucket(&shared).await;

    let sub = spawn_subscribe(
        &a,
        json!({"buckets": [held(&dev, &d1), held(&shared, &s1)], "session": "app", "timeout_ms": HOLD_MS}),
        Duration::from_secs(30),
    );
    node.wait_metric(
        "tether_held_subscriptions",
        REQUEST_DEADLINE,
        "the subscription to be held",
        |v| v >= 1.0,
    )
    .await;
    assert!(
        !sub.is_finished(),
        "nothing changed, yet the subscription was answered"
    );

    // Another client (own connection pool, other session) changes device.A.
    let other = node.device_with(A, http_client());
    let r = other
        .put(
            &dev,
            &json!({"value": {"target_temperature": 22.5}, "base_version": 1, "session": "thermostat-ui"}),
        )
        .await
        .expect_json(StatusCode::OK);
    assert_eq!(r["outcome"], "applied", "{r}");

    let r = within(
        NOTIFY_DEADLINE,
        "held subscription answered after a PUT",
        sub,
    )
    .await
    .expect("subscribe task")
    .expect_json(StatusCode::OK);
    assert_eq!(
        ids_of(&r),
        vec![dev.clone()],
        "only the changed bucket: {r}"
    );
    let b = bucket_in(&r, &dev);
    assert_eq!(u64_of(&b, "version"), 2, "{b}");
    assert_eq!(b["value"]["target_temperature"], 22.5, "{b}");
    assert_eq!(b, a.bucket(&dev).await, "full bucket as stored");
    node.wait_held(0, REQUEST_DEADLINE).await;
}

/// A user's subscription spanning two devices is held by both devices' bucket sets; when
/// one answers, the other lets go of it too (nothing stays held for a request that is
/// over), and a later change there answers nobody.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_from_one_set_lets_go_of_the_others() {
    let node = sub_node().user("alice").start().await;
    let alice = node.user("alice");
    let (a, b) = (node.device(A), node.device(B));
    for d in [&a, &b] {
        d.register_thermostat().await;
        let code = d.pairing_code().await;
        alice.pair(&code, None).await.expect(StatusCode::OK);
    }
    let (dev_a, dev_b) = (format!("device.{A}"), format!("device.{B}"));
    let (da, db) = (alice.bucket(&dev_a).await, alice.bucket(&dev_b).await);

    let sub = spawn_subscribe(
        &alice,
        json!({"buckets": [held(&dev_a, &da), held(&dev_b, &db)], "timeout_ms": HOLD_MS}),
        Duration::from_secs(30),
    );
    // One held subscription in each device's set.
    node.wait_held(2, REQUEST_DEADLINE).await;

    let r = a
        .put(
            &dev_a,
            &json!({"value": {"mode": "heat"}, "base_version": 1}),
        )
        .await
        .expect_json(StatusCode::OK);
    assert_eq!(r["outcome"], "applied", "{r}");
    let r = within(NOTIFY_DEADLINE, "the two-set subscription answered", sub)
        .await
        .expect("subscribe task")
        .expect_json(StatusCode::OK);
    assert_eq!(ids_of(&r), vec![dev_a.clone()], "{r}");
    // Device B's set no longer holds it, without anything else touching that set.
    node.wait_held(0, REQUEST_DEADLINE).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribe_times_out_with_an_empty_list() {
    let node = sub_node().start().await;
    let a = node.device(A);
    a.register_thermostat().await;
    let dev = format!("device.{A}");
    let d1 = a.bucket(&dev).await;

    let r = a
        .subscribe(
            &json!({"buckets": [held(&dev, &d1)], "timeout_ms": 300}),
            Duration::from_secs(5),
        )
        .await
        .expect_json(StatusCode::OK);
    assert_eq!(r, json!({"buckets": []}));
    node.wait_held(0, REQUEST_DEADLINE).await;
}

/// A subscribe the load balancer sends again after another node answered 503 holds only
/// for what is left of its timeout since the balancer first received it
/// (`X-Request-Start`, invariant 31): one received 59.5 s ago with `timeout_ms` 60 s is
/// answered "nothing changed" well before its full minute, and a change still reaches
/// a subscribe whose balancer wait left time to hold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscribe_resent_by_the_load_balancer_holds_only_for_what_is_left() {
    let node = sub_node().start().await;
    let a = node.device(A);
    a.register_thermostat().await;
    let dev = format!("device.{A}");
    let d1 = a.bucket(&dev).await;
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64;
    let body = json!({"buckets": [held(&dev, &d1)], "timeout_ms": HOLD_MS});
    let resent = |waited_ms: u64| {
        a.req(Method::POST, "/v1/subscribe")
            .header("X-Request-Start", format!("t={}", now_ms - waited_ms))
            .json(&body)
    };
    // Without the header this would hold a minute (the request deadline is 10 s).
    let r = a
        .send_within(Duration::from_secs(10), resent(HOLD_MS - 500))
        .await
        .expect_json(StatusCode::OK);
    assert_eq!(r, json!({"buckets": []}));
    node.wait_held(0, REQUEST_DEADLINE).await;
    // Time left: held, and answered by a write.
    let held_sub = {
        let (a, rb) = (a.clone(), resent(1000));
        tokio::spawn(async move { a.send_within(Duration::from_secs(30), rb).await })
    };
    node.wait_held(1, REQUEST_DEADLINE).await;
    let b = node.device(A);
    b.write(&dev, json!({"round": 1}), u64_of(&d1, "version"))
        .await;
    let answered = held_sub.await.expect("task").expect_json(StatusCode::OK);
    assert_eq!(buckets_of(&answered).len(), 1, "{answered}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_session_writes_do_not_wake_the_subscription() {
    let node = sub_node().start().await;
    let a = node.device(A);
    a.register_thermostat().await;
    let dev = format!("device.{A}");
    let d1 = a.bucket(&dev).await;

    let sub = spawn_subscribe(
        &a,
        json!({"buckets": [held(&dev, &d1)], "session": "s1", "timeout_ms": HOLD_MS}),
        Duration::from_secs(30),
    );
    node.wait_held(1, REQUEST_DEADLINE).await;

    // Same session: not echoed, the subscription stays held.
    let r = a
        .put(
            &dev,
            &json!({"value": {"mode": "heat"}, "base_version": 1, "session": "s1"}),
        )
        .await
        .expect_json(StatusCode::OK);
    assert_eq!(r["outcome"], "applied", "{r}");
    assert_eq!(u64_of(&r, "version"), 2);
    node.wait_held(1, REQUEST_DEADLINE).await;
    assert!(
        !sub.is_finished(),
        "the session's own write was echoed back to it"
    );

    // Different session: wakes it, with the latest state (both writes).
    let r = a
        .put(
            &dev,
            &json!({"value": {"target_temperature": 19.5}, "base_version": 2, "session": "s2"}),
        )
        .await
        .expect_json(StatusCode::OK);
    assert_eq!(u64_of(&r, "version"), 3);

    let r = within(
        NOTIFY_DEADLINE,
        "subscription woken by another session",
        sub,
    )
    .await
    .expect("subscribe task")
    .expect_json(StatusCode::OK);
    let b = bucket_in(&r, &dev);
    assert_eq!(
        u64_of(&b, "version"),
        3,
        "answer must carry the latest version, not the echoed one: {b}"
    );
    assert_eq!(b["value"]["mode"], "heat", "{b}");
    assert_eq!(b["value"]["target_temperature"], 19.5, "{b}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_writes_wake_nobody_and_any_listed_bucket_wakes() {
    let node = sub_node().start().await;
    let a = node.device(A);
    a.register_thermostat().await;
    let dev = format!("device.{A}");
    let shared = format!("shared.{A}");
    a.write(&dev, json!({"mode": "heat"}), 1).await;
    let d2 = a.bucket(&dev).await;
    let s1 = a.bucket(&shared).await;

    let sub = spawn_subscribe(
        &a,
        json!({"buckets": [held(&dev, &d2), held(&shared, &s1)], "session": "app", "timeout_ms": HOLD_MS}),
        Duration::from_secs(30),
    );
    node.wait_metric(
        "tether_held_subscriptions",
        REQUEST_DEADLINE,
        "the subscription to be held",
        |v| v >= 1.0,
    )
    .await;

    // A refused (OCC, stale) write changes nothing and notifies nobody.
    a.put(
        &dev,
        &json!({"value": {"mode": "off"}, "base_version": 1, "occ": true, "session": "other"}),
    )
    .await
    .expect(StatusCode::CONFLICT);
    // Then a change to the *other* listed bucket wakes it, with only that bucket.
    let r = a
        .put(
            &shared,
            &json!({"value": {"away": true}, "base_version": 1, "session": "other"}),
        )
        .await
        .expect_json(StatusCode::OK);
    assert_eq!(r["outcome"], "applied", "{r}");

    let r = within(
        NOTIFY_DEADLINE,
        "subscription woken by the shared bucket",
        sub,
    )
    .await
    .expect("subscribe task")
    .expect_json(StatusCode::OK);
    assert_eq!(
        ids_of(&r),
        vec![shared.clone()],
        "the refused write to {dev} must not appear; only {shared} changed: {r}"
    );
    let b = bucket_in(&r, &shared);
    assert_eq!(u64_of(&b, "version"), 2, "{b}");
    assert_eq!(b["value"]["away"], true, "{b}");
    assert_eq!(
        a.bucket(&dev).await,
        d2,
        "refused write left {dev} unchanged"
    );
}

/// Another session's change must wake a subscriber even when the subscriber's own
/// session wrote the same bucket at about the same time (e.g. in one commit batch).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_sessions_change_wakes_even_next_to_an_own_write() {
    const ROUNDS: u64 = 20;
    let node = sub_node().start().await;
    let a = node.device(A);
    a.register_thermostat().await;
    let dev = format!("device.{A}");
    let shared = format!("shared.{A}");

    for round in 0..ROUNDS {
        let current = a.bucket(&dev).await;
        let sub = spawn_subscribe(
            &a,
            json!({"buckets": [held(&dev, &current)], "session": "mine", "timeout_ms": HOLD_MS}),
            Duration::from_secs(30),
        );
        node.wait_held(1, REQUEST_DEADLINE).await;

        // Keep the set busy with an unrelated write, then race another session's write
        // and our own session's write to the held bucket.
        let writes = [
            (shared.clone(), "busy", json!({"round": round})),
            (dev.clone(), "theirs", json!({"theirs": round})),
            (dev.clone(), "mine", json!({"mine": round})),
        ];
        let tasks: Vec<_> = writes
            .into_iter()
            .map(|(id, session, value)| {
                let p = node.device_with(A, http_client());
                tokio::spawn(async move {
                    p.put(&id, &json!({"value": value, "session": session}))
                        .await
                        .expect(StatusCode::OK)
                })
            })
            .collect();
        for t in tasks {
            t.await.expect("writer");
        }

        let r = within(
            NOTIFY_DEADLINE,
            &format!("round {round}: subscriber woken by the other session's write"),
            sub,
        )
        .await
        .expect("subscribe task")
        .expect_json(StatusCode::OK);
        let b = bucket_in(&r, &dev);
        assert_eq!(b["value"]["theirs"], round, "round {round}: {b}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribe_rejects_before_holding() {
    let node = sub_node().user("alice").start().await;
    let a = node.device(A);
    a.register_thermostat().await;
    node.device(B).register_thermostat().await;
    let dev = format!("device.{A}");
    let d1 = a.bucket(&dev).await;

    // Unknown bucket in the device's own set.
    a.subscribe(
        &json!({"buckets": [held(&dev, &d1), {"id": format!("other.{A}"), "version": 1}], "timeout_ms": HOLD_MS}),
        NOTIFY_DEADLINE,
    )
    .await
    .expect_error(StatusCode::NOT_FOUND, "not_found");
    // Another device's bucket.
    a.subscribe(
        &json!({"buckets": [held(&dev, &d1), {"id": format!("device.{B}"), "version": 1}], "timeout_ms": HOLD_MS}),
        NOTIFY_DEADLINE,
    )
    .await
    .expect_error(StatusCode::FORBIDDEN, "forbidden");
    // A user without devices may not subscribe to a device's bucket.
    node.user("alice")
        .subscribe(
            &json!({"buckets": [held(&dev, &d1)], "timeout_ms": HOLD_MS}),
            NOTIFY_DEADLINE,
        )
        .await
        .expect_error(StatusCode::FORBIDDEN, "forbidden");
    // Malformed body.
    send_within(
        NOTIFY_DEADLINE,
        a.req(Method::POST, "/v1/subscribe")
            .header("Content-Type", "application/json")
            .body("{\"buckets\": ["),
    )
    .await
    .expect_error(StatusCode::BAD_REQUEST, "bad_request");
    // No auth.
    send_within(
        NOTIFY_DEADLINE,
        node.anon(Method::POST, "/v1/subscribe")
            .json(&json!({"buckets": [held(&dev, &d1)], "timeout_ms": HOLD_MS})),
    )
    .await
    .expect_error(StatusCode::UNAUTHORIZED, "unauthorized");

    assert_eq!(
        node.metric("tether_held_subscriptions").await,
        Some(0.0),
        "rejected subscriptions are not held"
    );
}

// ---------------------------------------------------------------------------------------
// 5. 1,000 concurrent held subscriptions

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_held_subscriptions_are_all_answered() {
    const DEVICES: usize = 250;
    const PER_DEVICE: usize = 4;
    const TOTAL: usize = DEVICES * PER_DEVICE;

    let node = sub_node().start().await;
    let serials: Vec<String> = (0..DEVICES).map(|i| format!("LOAD{i:04}")).collect();

    // Register every device (bounded concurrency) and note each device bucket's state.
    let states: Vec<(String, Value)> = stream::iter(serials.clone())
        .map(|s| {
            let dev = node.device(&s);
            async move {
                dev.register_thermostat().await;
                let id = format!("device.{s}");
                let b = dev.bucket(&id).await;
                (s, b)
            }
        })
        .buffer_unordered(32)
        .collect()
        .await;

    let client = http_client();
    let mut subs = Vec::with_capacity(TOTAL);
    for (serial, b) in &states {
        let dev = node.device_with(serial, client.clone());
        let id = format!("device.{serial}");
        for k in 0..PER_DEVICE {
            let body = json!({"buckets": [held(&id, b)], "session": format!("sub-{k}"), "timeout_ms": HOLD_MS});
            subs.push((
                serial.clone(),
                spawn_subscribe(&dev, body, Duration::from_secs(55)),
            ));
        }
    }
    node.wait_held(TOTAL as u64, Duration::from_secs(30)).await;
    assert!(
        subs.iter().all(|(_, h)| !h.is_finished()),
        "a subscription was answered although nothing changed"
    );

    // Change every device bucket (from another session).
    let writer_client = http_client();
    let results: Vec<(String, u64)> = stream::iter(states.clone())
        .map(|(serial, _)| {
            let dev = node.device_with(&serial, writer_client.clone());
            async move {
                let id = format!("device.{serial}");
                let (_, v) = dev.write(&id, json!({"target_temperature": 23}), 1).await;
                (serial, v)
            }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    for (s, v) in &results {
        assert_eq!(*v, 2, "write to device.{s}");
    }

    // All 1,000 answered, each with the new version, within one generous deadline.
    let answered = within(
        Duration::from_secs(30),
        "all 1,000 subscriptions answered",
        futures::future::join_all(
            subs.into_iter()
                .map(|(serial, h)| async move { (serial, h.await) }),
        ),
    )
    .await;
    let mut failures = Vec::new();
    for (serial, res) in answered {
        let r = res.expect("subscribe task");
        if r.status != StatusCode::OK {
            failures.push(format!("{serial}: status {} {}", r.status, r.text()));
            continue;
        }
        let body = r.json();
        let id = format!("device.{serial}");
        let ok = buckets_of(&body).iter().any(|b| {
            b["id"] == id.as_str() && b["version"] == 2 && b["value"]["target_temperature"] == 23
        });
        if !ok {
            failures.push(format!("{serial}: {body}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {TOTAL} subscriptions not answered with version 2, e.g. {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    node.wait_held(0, REQUEST_DEADLINE).await;
}

// ---------------------------------------------------------------------------------------
// 5b. 2,000 held devices whose sets passivate (parked waiters, invariant 35)

/// 2,000 devices each hold a subscribe on their own set; the sets, with nothing to do but
/// wait, passivate and keep the subscriptions as waiter records (no set stays in memory);
/// a write to each bucket answers every one with its new version. Held again and parked
/// again, the clients then leave: nothing stays held or parked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_parked_devices_are_all_answered_and_none_kept_after_close() {
    const DEVICES: usize = 2_000;
    let started = sub_node()
        .arg("--passivate-after-ms")
        .arg("300")
        .start()
        .await;
    let node = &started;
    let serials: Vec<String> = (0..DEVICES).map(|i| format!("PARK{i:04}")).collect();
    let states: Vec<(String, Value)> = stream::iter(serials)
        .map(|s| {
            let dev = node.device(&s);
            async move {
                dev.register_thermostat().await;
                let b = dev.bucket(&format!("device.{s}")).await;
                (s, b)
            }
        })
        .buffer_unordered(32)
        .collect()
        .await;

    let hold_all = |states: Vec<(String, Value)>| {
        let client = http_client();
        states
            .into_iter()
            .map(|(serial, b)| {
                let dev = node.device_with(&serial, client.clone());
                let id = format!("device.{serial}");
                // Held far longer than the test may take on a loaded machine: a
                // subscription ends only by the write or the client leaving.
                let body = json!({"buckets": [held(&id, &b)], "session": "watcher", "timeout_ms": 600_000});
                (serial, spawn_subscribe_retrying(&dev, body))
            })
            .collect::<Vec<_>>()
    };
    let all_parked = |what: &'static str| async move {
        node.wait_held(DEVICES as u64, Duration::from_secs(120))
            .await;
        node.wait_metric(
            "tether_parked_bucket_sets",
            Duration::from_secs(60),
            what,
            |n| n == DEVICES as f64,
        )
        .await;
        node.wait_metric(
            "tether_active_bucket_sets",
            Duration::from_secs(30),
            "no set in memory",
            |n| n == 0.0,
        )
        .await;
    };
    let subs = hold_all(states.clone());
    all_parked("every device's set parked with its subscription").await;
    assert!(
        subs.iter().all(|(_, h)| !h.is_finished()),
        "a parked subscription was answered although nothing changed"
    );

    let writer = http_client();
    let written: Vec<(String, Value)> = stream::iter(states)
        .map(|(serial, _)| {
            let dev = node.device_with(&serial, writer.clone());
            async move {
                let id = format!("device.{serial}");
                let (_, v) = dev.write(&id, json!({"target_temperature": 21}), 1).await;
                assert_eq!(v, 2, "write to {id}");
                let b = dev.bucket(&id).await;
                (serial, b)
            }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    let answered = within(
        Duration::from_secs(60),
        "all 2,000 parked subscriptions answered",
        futures::future::join_all(
            subs.into_iter()
                .map(|(serial, h)| async move { (serial, h.await) }),
        ),
    )
    .await;
    let mut failures = Vec::new();
    for (serial, res) in answered {
        let r = res.expect("subscribe task");
        let id = format!("device.{serial}");
        let ok = r.status == StatusCode::OK
            && buckets_of(&r.json()).iter().any(|b| {
                b["id"] == id.as_str()
                    && b["version"] == 2
                    && b["value"]["target_temperature"] == 21
            });
        if !ok {
            failures.push(format!("{serial}: {} {}", r.status, r.text()));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {DEVICES} parked subscriptions not answered with version 2, e.g. {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );

    // Held and parked again; then every client leaves.
    let subs = hold_all(written);
    all_parked("parked again").await;
    for (_, h) in &subs {
        h.abort();
    }
    node.wait_held(0, Duration::from_secs(30)).await;
    node.wait_metric(
        "tether_parked_bucket_sets",
        Duration::from_secs(30),
        "nothing parked after every client left",
        |n| n == 0.0,
    )
    .await;
    assert_eq!(
        node.metric("tether_active_bucket_sets").await,
        Some(0.0),
        "leaving activated sets"
    );
}

// ---------------------------------------------------------------------------------------
// 9. closing the connection ends the subscription

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_the_connection_cancels_the_subscription() {
    const DEVICES: usize = 50;
    const PER_DEVICE: usize = 4;
    const TOTAL: usize = DEVICES * PER_DEVICE;

    let node = sub_node().start().await;
    let serials: Vec<String> = (0..DEVICES).map(|i| format!("GONE{i:04}")).collect();
    let states: Vec<(String, Value)> = stream::iter(serials)
        .map(|s| {
            let dev = node.device(&s);
            async move {
                dev.register_thermostat().await;
                let b = dev.bucket(&format!("device.{s}")).await;
                (s, b)
            }
        })
        .buffer_unordered(16)
        .collect()
        .await;

    // A dedicated client: dropping it (with the aborted requests) closes every connection.
    let client = http_client();
    let mut subs = Vec::new();
    for (serial, b) in &states {
        let dev = node.device_with(serial, client.clone());
        let id = format!("device.{serial}");
        for _ in 0..PER_DEVICE {
            subs.push(spawn_subscribe(
                &dev,
                json!({"buckets": [held(&id, b)], "timeout_ms": HOLD_MS}),
                Duration::from_secs(55),
            ));
        }
    }
    node.wait_held(TOTAL as u64, Duration::from_secs(20)).await;

    for h in &subs {
        h.abort();
    }
    for h in subs {
        let e = h.await.expect_err("aborted");
        assert!(e.is_cancelled(), "{e}");
    }
    drop(client);

    node.wait_held(0, Duration::from_secs(10)).await;

    // The server still works for those devices afterwards.
    let (serial, b) = &states[0];
    let dev = node.device(serial);
    let id = format!("device.{serial}");
    let (_, v) = dev.write(&id, json!({"mode": "off"}), 1).await;
    assert_eq!(v, 2);
    let r = dev
        .subscribe(
            &json!({"buckets": [held(&id, b)], "timeout_ms": HOLD_MS}),
            NOTIFY_DEADLINE,
        )
        .await
        .expect_json(StatusCode::OK);
    assert_eq!(u64_of(&bucket_in(&r, &id), "version"), 2);
}

// ---------------------------------------------------------------------------------------
// 8. graceful shutdown

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_answers_held_subscriptions_and_exits_zero() {
    let mut node = sub_node().start().await;
    let a = node.device(A);
    a.register_thermostat().await;
    let dev = format!("device.{A}");
    let d1 = a.bucket(&dev).await;

    let sub = spawn_subscribe(
        &a,
        json!({"buckets": [held(&dev, &d1)], "session": "s", "timeout_ms": HOLD_MS}),
        Duration::from_secs(30),
    );
    node.wait_held(1, REQUEST_DEADLINE).await;

    node.sigterm().await;

    let r = within(
        Duration::from_secs(10),
        "held subscription answered on SIGTERM",
        sub,
    )
    .await
    .expect("subscribe task");
    assert_eq!(
        r.status,
        StatusCode::OK,
        "held subscription must be answered with 200 on shutdown; body: {}",
        r.text()
    );
    let body = r.json();
    assert!(
        body.get("buckets").is_some_and(Value::is_array),
        "answer is a bucket list: {body}"
    );

    let status = node.wait_exit(Duration::from_secs(20)).await;
    assert_eq!(
        status.code(),
        Some(0),
        "exit status after SIGTERM: {status:?}"
    );
}
