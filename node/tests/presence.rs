//! Presence, delivery and push wake-ups through the real binary (API.md "Presence and
//! wake-ups", seed 003): what a paired user learns of a sleeping device, what a write to an
//! offline device answers, and the signed wake-ups a push gateway receives — one for a
//! burst of changes, none for a device that is listening, a retry after the gateway failed.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use tether_proto::presence::wakeup_signature_valid;
use tether_test_support::node::*;
use tether_test_support::push::Gateway;

const SECRET: &str = "push-secret-for-tests";

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

async fn presence(p: &Principal, device: &str) -> Resp {
    p.send(p.req(Method::GET, &format!("/v1/devices/{device}/presence")))
        .await
}

/// A device of `node`, registered and paired with `user`.
async fn paired(node: &Node, serial: &str, user: &Principal) -> Principal {
    let dev = node.device(serial);
    dev.register_thermostat().await;
    let code = dev.pairing_code().await;
    user.pair(&code, None).await.expect(StatusCode::OK);
    dev
}

/// A user's change to the device's shared bucket; the answer.
async fn change(user: &Principal, serial: &str, n: u64) -> Value {
    user.put(
        &format!("shared.{serial}"),
        &json!({"value": {"target_temperature": 18 + n}}),
    )
    .await
    .expect_json(StatusCode::OK)
}

/// The device holds a subscribe of its buckets for `timeout_ms` (declaring `next_sync_ms`),
/// in the background; its answer.
fn subscribe(
    dev: &Principal,
    timeout_ms: u64,
    next_sync_ms: Option<u64>,
) -> tokio::task::JoinHandle<Resp> {
    let dev = dev.clone();
    tokio::spawn(async move {
        let serial = dev.serial().to_string();
        let mut held = Vec::new();
        for id in thermostat_buckets(&serial) {
            let b = dev.bucket(&id).await;
            held.push(json!({"id": id, "version": u64_of(&b, "version")}));
        }
        let mut body = json!({"buckets": held, "timeout_ms": timeout_ms});
        if let Some(ms) = next_sync_ms {
            body["next_sync_ms"] = json!(ms);
        }
        dev.subscribe(
            &body,
            Duration::from_millis(timeout_ms) + Duration::from_secs(10),
        )
        .await
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_and_delivery_follow_the_device() {
    let node = Node::builder()
        .config(&thermostat_template(&[]))
        .user("alice")
        .user("bob")
        .start()
        .await;
    let alice = node.user("alice");
    let bob = node.user("bob");
    let dev = paired(&node, "PRES01", &alice).await;

    // Never subscribed: offline, nothing promised.
    let p = presence(&alice, "PRES01").await.expect_json(StatusCode::OK);
    assert_eq!(p["online"], false, "{p}");
    assert_eq!(p["next_sync_by"], Value::Null, "{p}");
    let answer = change(&alice, "PRES01", 1).await;
    assert_eq!(
        answer["delivery"],
        json!({"online": false, "next_sync_by": null}),
        "a change for a device that is not listening says so: {answer}"
    );

    // Listening, and saying it will sync again within the hour.
    let before = now_ms();
    let held = subscribe(&dev, 30_000, Some(3_600_000));
    node.wait_held(1, Duration::from_secs(10)).await;
    let p = presence(&alice, "PRES01").await.expect_json(StatusCode::OK);
    assert_eq!(p["online"], true, "{p}");
    let seen = u64_of(&p, "last_seen");
    assert!(
        seen >= before.saturating_sub(2_000) && seen <= now_ms() + 2_000,
        "{p}"
    );
    assert_eq!(u64_of(&p, "next_sync_by"), seen + 3_600_000, "{p}");
    // The device asks for its own presence too.
    presence(&dev, "PRES01").await.expect(StatusCode::OK);

    // A change while it listens: delivered now, no `delivery`; the device is answered.
    let answer = change(&alice, "PRES01", 2).await;
    assert!(answer.get("delivery").is_none(), "{answer}");
    let woken = held
        .await
        .expect("subscribe task")
        .expect_json(StatusCode::OK);
    assert!(!buckets_of(&woken).is_empty(), "{woken}");
    // Just answered: it resubscribes at once, so a change right after is not "offline".
    let answer = change(&alice, "PRES01", 3).await;
    assert!(answer.get("delivery").is_none(), "{answer}");

    // Its next subscribe times out unanswered and it goes to sleep: offline, with the
    // time it promised.
    let slept = subscribe(&dev, 300, Some(600_000));
    slept.await.expect("subscribe task").expect(StatusCode::OK);
    let answer = change(&alice, "PRES01", 4).await;
    let by = answer["delivery"]["next_sync_by"]
        .as_u64()
        .expect("next_sync_by");
    assert_eq!(answer["delivery"]["online"], false, "{answer}");
    let p = presence(&alice, "PRES01").await.expect_json(StatusCode::OK);
    assert_eq!(p["online"], false, "{p}");
    assert_eq!(u64_of(&p, "next_sync_by"), by, "{p}");
    assert_eq!(by, u64_of(&p, "last_seen") + 600_000, "{p}");

    // The device's own write changes nothing it does not know: no `delivery`.
    let own = dev
        .put(
            "device.PRES01",
            &json!({"value": {"current_temperature": 21}}),
        )
        .await
        .expect_json(StatusCode::OK);
    assert!(own.get("delivery").is_none(), "{own}");

    // Nobody else learns it: another user, another device, an unknown device.
    presence(&bob, "PRES01")
        .await
        .expect_error(StatusCode::FORBIDDEN, "forbidden");
    let other = node.device("PRES02");
    other.register_thermostat().await;
    presence(&other, "PRES01")
        .await
        .expect_error(StatusCode::FORBIDDEN, "forbidden");
    presence(&alice, "NOSUCH1")
        .await
        .expect_error(StatusCode::FORBIDDEN, "forbidden");
    presence(&alice, "bad id!")
        .await
        .expect_error(StatusCode::BAD_REQUEST, "bad_request");

    // A device that says at registration when it syncs next (first contact, then again).
    let sleeper = node.device("PRES03");
    for ms in [7_200_000u64, 1_800_000] {
        let before = now_ms();
        sleeper
            .send(sleeper.req(Method::POST, "/v1/register").json(&json!({
                "device_id": "PRES03", "device_type": "thermostat", "sw_version": "1.0.0",
                "next_sync_ms": ms,
            })))
            .await
            .expect(StatusCode::OK);
        let p = presence(&sleeper, "PRES03")
            .await
            .expect_json(StatusCode::OK);
        assert_eq!(p["online"], false, "{p}");
        let seen = u64_of(&p, "last_seen");
        assert!(
            seen >= before.saturating_sub(2_000),
            "registration is a contact: {p}"
        );
        assert_eq!(u64_of(&p, "next_sync_by"), seen + ms, "{p}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offline_device_gets_one_signed_wake_up_for_a_burst_and_a_retry_after_a_500() {
    let gw = Gateway::start(SECRET.as_bytes()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let secret = dir.path().join("push.secret");
    std::fs::write(&secret, format!("{SECRET}\n")).expect("secret");
    let node = Node::builder()
        .config(&thermostat_template(&[]))
        .user("alice")
        .arg("--push-webhook")
        .arg(gw.url())
        .arg("--push-secret-file")
        .arg(secret.display().to_string())
        .arg("--push-retry-ms")
        .arg("200")
        .start()
        .await;
    let alice = node.user("alice");
    let asleep = paired(&node, "WAKE01", &alice).await;
    let listening = paired(&node, "WAKE02", &alice).await;
    let flaky = paired(&node, "WAKE03", &alice).await;
    drop((asleep, flaky));

    // WAKE02 listens; five changes to WAKE01 (asleep) and one to WAKE02.
    let held = subscribe(&listening, 30_000, None);
    node.wait_held(1, Duration::from_secs(10)).await;
    for n in 0..5 {
        let answer = change(&alice, "WAKE01", n).await;
        assert_eq!(answer["delivery"]["online"], false, "{answer}");
    }
    let answer = change(&alice, "WAKE02", 0).await;
    assert!(answer.get("delivery").is_none(), "{answer}");
    held.await.expect("subscribe task").expect(StatusCode::OK);

    let got = gw.wait_for("WAKE01", 1, Duration::from_secs(20)).await;
    let wake = &got[0];
    assert_eq!(
        wake.json(),
        json!({"device_id": "WAKE01", "reason": "changed", "collapse_key": "WAKE01"}),
        "payload-free: no bucket data"
    );
    let sig = wake.signature.as_deref().expect("X-Tether-Signature");
    assert!(
        wakeup_signature_valid(SECRET.as_bytes(), &wake.body, sig),
        "signed with the push secret: {sig}"
    );
    assert!(!wakeup_signature_valid(b"another secret", &wake.body, sig));

    // The gateway fails WAKE03's first delivery: it is retried.
    gw.fail_next(500);
    change(&alice, "WAKE03", 0).await;
    let tries = gw.wait_for("WAKE03", 2, Duration::from_secs(20)).await;
    assert_eq!((tries[0].status, tries[1].status), (500, 200));
    assert_eq!(tries[0].body, tries[1].body, "the same wake-up, again");
    node.wait_metric(
        "tether_push_wakeups_total{result=\"retried\"}",
        Duration::from_secs(10),
        "one retry",
        |v| v >= 1.0,
    )
    .await;

    // Long enough for anything else queued to have arrived: still one for WAKE01, none for
    // the device that was listening; the other four changes were collapsed.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(gw.for_device("WAKE01").len(), 1, "collapsed into one");
    assert!(
        gw.for_device("WAKE02").is_empty(),
        "none for a listening device"
    );
    assert_eq!(gw.for_device("WAKE03").len(), 2);
    assert_eq!(gw.counts().1, 0, "every wake-up validly signed");
    assert_eq!(
        node.metric("tether_push_wakeups_total{result=\"collapsed\"}")
            .await,
        Some(4.0)
    );
    assert_eq!(
        node.metric("tether_push_wakeups_total{result=\"sent\"}")
            .await,
        Some(2.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_without_a_secret_is_refused_at_start() {
    let failed = Node::builder()
        .arg("--push-webhook")
        .arg("http://127.0.0.1:9/wake")
        .try_start()
        .await
        .expect_err("a webhook without its signing secret must not start");
    assert!(
        failed.stderr.contains("--push-secret-file"),
        "says what is missing: {}",
        failed.stderr
    );
}
