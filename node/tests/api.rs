//! Black-box tests of the request/response endpoints: register, GET, PUT, protobuf,
//! operations endpoints. Each test starts its own `tether` process.

use reqwest::header::{ACCEPT, CONTENT_TYPE};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use tether_proto::api::{
    BucketList, HeldBucket, RegisterRequest, RegisterResponse, SubscribeRequest, UpdateOutcome,
    UpdateRequest, UpdateResponse, WireMessage,
};
use tether_test_support::node::*;

const A: &str = "01AA02AB";
const B: &str = "01AA02AC";

/// The fields these tests write besides the thermostat's own (declared in the template:
/// a node refuses fields outside it).
fn api_template() -> String {
    let writers: Vec<String> = (0..40).map(|i| format!("w{i}")).collect();
    let mut fields: Vec<&str> = writers.iter().map(String::as_str).collect();
    fields.extend([
        "target_temperature",
        "mode",
        "fan",
        "counter",
        "note",
        "setpoints",
        "schedule",
        "hold",
        "away",
    ]);
    thermostat_template(&fields)
}

/// A node whose thermostat template has the fields these tests write.
async fn api_node() -> Node {
    Node::builder().config(&api_template()).start().await
}

// ---------------------------------------------------------------------------------------
// 1. register

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_first_contact_creates_buckets_and_is_idempotent() {
    let node = api_node().await;
    let dev = node.device(A);

    let r = dev
        .register("thermostat", "1.2.0")
        .await
        .expect_json(StatusCode::OK);
    assert_eq!(
        keys(&r),
        set(&["tier", "redirect", "software_update", "sync_url", "buckets"]),
        "register answer fields: {r}"
    );
    assert_eq!(r["tier"], "production", "{r}");
    assert!(r["redirect"].is_null(), "{r}");
    assert!(r["software_update"].is_null(), "{r}");
    assert_eq!(r["sync_url"], node.base.as_str(), "{r}");
    let mut ids: Vec<String> = serde_json::from_value(r["buckets"].clone()).expect("bucket ids");
    ids.sort();
    assert_eq!(ids, thermostat_buckets(A));

    // The buckets exist, at version 1, with null-valued fields.
    let list = dev
        .get("/v1/buckets?view=full")
        .await
        .expect_json(StatusCode::OK);
    assert_eq!(ids_of(&list), thermostat_buckets(A), "{list}");
    for b in buckets_of(&list) {
        assert_eq!(u64_of(&b, "version"), 1, "fresh bucket: {b}");
        assert!(u64_of(&b, "timestamp") > 0, "fresh bucket: {b}");
        let value = b["value"]
            .as_object()
            .unwrap_or_else(|| panic!("value must be an object: {b}"));
        assert!(
            !value.is_empty(),
            "a thermostat's default buckets have (null) fields: {b}"
        );
        assert!(
            value.values().all(Value::is_null),
            "default fields are null: {b}"
        );
    }

    // Second contact: same answer, nothing recreated.
    let r2 = dev
        .register("thermostat", "1.2.0")
        .await
        .expect_json(StatusCode::OK);
    assert_eq!(r2, r, "second registration answers the same");
    let list2 = dev
        .get("/v1/buckets?view=full")
        .await
        .expect_json(StatusCode::OK);
    assert_eq!(
        sorted_buckets(&list2),
        sorted_buckets(&list),
        "re-registration must not touch the buckets"
    );

    // After a write, registering again keeps the written state and version.
    let (_, v) = dev
        .write(
            &format!("device.{A}"),
            json!({"target_temperature": 20.5}),
            1,
        )
        .await;
    assert_eq!(v, 2);
    dev.register("thermostat", "1.2.0")
        .await
        .expect(StatusCode::OK);
    let b = dev.bucket(&format!("device.{A}")).await;
    assert_eq!(u64_of(&b, "version"), 2, "{b}");
    assert_eq!(b["value"]["target_temperature"], 20.5, "{b}");
}

fn sorted_buckets(list: &Value) -> Vec<Value> {
    let mut v = buckets_of(list);
    v.sort_by(|a, b| a["id"].as_str().cmp(&b["id"].as_str()));
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_rejects_bad_requests() {
    let node = Node::start().await;
    let dev = node.device(A);

    // Valid default credentials, bad body: rejected, and nothing happens — the whole request
    // is validated before credentials are issued (issue 13 finding 4).
    dev.register("toaster-9000", "1.0.0")
        .await
        .expect_error(StatusCode::BAD_REQUEST, "bad_request");
    dev.register_as(B, "thermostat", "1.0.0")
        .await
        .expect_error(StatusCode::FORBIDDEN, "forbidden");
    dev.send(
        dev.req(Method::POST, "/v1/register")
            .header(CONTENT_TYPE, "application/json")
            .body("{oops"),
    )
    .await
    .expect_error(StatusCode::BAD_REQUEST, "bad_request");
    node.send(node.anon(Method::POST, "/v1/register").json(&json!({
        "device_id": A, "device_type": "thermostat", "sw_version": "1.0.0"
    })))
    .await
    .expect_error(StatusCode::UNAUTHORIZED, "unauthorized");
    assert!(
        dev.assigned_credentials().is_none(),
        "a rejected registration issues no credentials"
    );

    // None of the rejected calls created anything: the first valid registration is a first
    // contact (its buckets at version 1).
    dev.register_thermostat().await;
    let b = dev.bucket(&format!("device.{A}")).await;
    assert_eq!(u64_of(&b, "version"), 1, "{b}");
    // Default credentials open nothing but registration.
    node.device(B)
        .get(&format!("/v1/buckets/device.{B}"))
        .await
        .expect_error(StatusCode::UNAUTHORIZED, "default_credentials_not_allowed");
}

const TIER_CONFIG: &str = r#"
[[tier_rules]]
device_id_prefix = "BETA"
tier = "beta"
redirect = "https://beta.example/v1/register"

[[tier_rules]]
sw_version = "<1.0.0"
tier = "legacy"
redirect = "https://legacy.example/v1/register"

[[software_updates]]
device_type = "thermostat"
version = "2.0.0"
url = "https://fw.example/thermostat-2.0.0.bin"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_tiers_redirects_and_software_updates_from_config() {
    let node = Node::builder().config(TIER_CONFIG).start().await;

    // Redirected by prefix: no buckets created.
    let beta = node.device("BETA0001");
    let r = beta
        .register("thermostat", "1.2.0")
        .await
        .expect_json(StatusCode::OK);
    assert_eq!(r["tier"], "beta", "{r}");
    assert_eq!(r["redirect"], "https://beta.example/v1/register", "{r}");
    assert_eq!(r["buckets"], json!([]), "{r}");
    beta.get("/v1/buckets/device.BETA0001")
        .await
        .expect_error(StatusCode::NOT_FOUND, "not_found");
    let list = beta.get("/v1/buckets").await.expect_json(StatusCode::OK);
    assert_eq!(
        list,
        json!({"buckets": []}),
        "redirected device has no buckets"
    );

    // First matching rule wins: prefix rule before the sw_version rule.
    let r = node
        .device("BETA0002")
        .register("thermostat", "0.5.0")
        .await
        .expect_json(StatusCode::OK);
    assert_eq!(r["tier"], "beta", "{r}");
    assert_eq!(r["redirect"], "https://beta.example/v1/register", "{r}");

    // Redirected by sw_version requirement.
    let r = node
        .device("OLD00001")
        .register("thermostat", "0.9.0")
        .await
        .expect_json(StatusCode::OK);
    assert_eq!(r["tier"], "legacy", "{r}");
    assert_eq!(r["redirect"], "https://legacy.example/v1/register", "{r}");
    assert_eq!(r["buckets"], json!([]), "{r}");

    // Not matched by any rule: production, buckets created, update offered (1.2.0 < 2.0.0).
    let prod = node.device("PROD0001");
    let r = prod
        .register("thermostat", "1.2.0")
        .await
        .expect_json(StatusCode::OK);
    assert_eq!(r["tier"], "production", "{r}");
    assert!(r["redirect"].is_null(), "{r}");
    assert_eq!(
        r["software_update"],
        json!({"version": "2.0.0", "url": "https://fw.example/thermostat-2.0.0.bin"}),
        "{r}"
    );
    assert_eq!(r["sync_url"], node.base.as_str(), "{r}");
    let mut ids: Vec<String> = serde_json::from_value(r["buckets"].clone()).expect("ids");
    ids.sort();
    assert_eq!(ids, thermostat_buckets("PROD0001"));
    prod.bucket("device.PROD0001").await;

    // Up to date or newer: no offer.
    for (serial, sw) in [("PROD0002", "2.0.0"), ("PROD0003", "2.1.0")] {
        let r = node
            .device(serial)
            .register("thermostat", sw)
            .await
            .expect_json(StatusCode::OK);
        assert_eq!(r["tier"], "production", "{r}");
        assert!(
            r.get("software_update").is_some_and(Value::is_null),
            "sw {sw} >= 2.0.0 gets no offer: {r}"
        );
    }
}

// ---------------------------------------------------------------------------------------
// 2. GET

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_views_filters_and_access_rules() {
    let node = Node::builder().user("alice").start().await;
    let a = node.device(A);
    let b = node.device(B);
    a.register_thermostat().await;
    b.register_thermostat().await;
    let dev_a = format!("device.{A}");
    let shared_a = format!("shared.{A}");

    // view=ids: only ids, only the device's own buckets.
    let ids = a
        .get("/v1/buckets?view=ids")
        .await
        .expect_json(StatusCode::OK);
    assert_eq!(keys(&ids), set(&["buckets"]), "{ids}");
    assert_eq!(ids_of(&ids), thermostat_buckets(A), "{ids}");
    for bk in buckets_of(&ids) {
        assert_eq!(keys(&bk), set(&["id"]), "view=ids: {bk}");
    }

    // view=versions and the default view.
    let versions = a
        .get("/v1/buckets?view=versions")
        .await
        .expect_json(StatusCode::OK);
    assert_eq!(ids_of(&versions), thermostat_buckets(A), "{versions}");
    for bk in buckets_of(&versions) {
        assert_eq!(keys(&bk), set(&["id", "timestamp", "version"]), "{bk}");
    }
    let default = a.get("/v1/buckets").await.expect_json(StatusCode::OK);
    assert_eq!(
        sorted_buckets(&default),
        sorted_buckets(&versions),
        "default view is versions"
    );

    // view=full.
    let full = a
        .get("/v1/buckets?view=full")
        .await
        .expect_json(StatusCode::OK);
    assert_eq!(ids_of(&full), thermostat_buckets(A), "{full}");
    for bk in buckets_of(&full) {
        assert_eq!(
            keys(&bk),
            set(&["id", "timestamp", "version", "value"]),
            "{bk}"
        );
        assert!(bk["value"].is_object(), "{bk}");
    }

    // ids= filter.
    let one = a
        .get(&format!("/v1/buckets?view=full&ids={dev_a}"))
        .await
        .expect_json(StatusCode::OK);
    assert_eq!(ids_of(&one), vec![dev_a.clone()], "{one}");
    let two = a
        .get(&format!("/v1/buckets?view=ids&ids={dev_a},{shared_a}"))
        .await
        .expect_json(StatusCode::OK);
    assert_eq!(ids_of(&two), thermostat_buckets(A), "{two}");

    // Single GET equals the full view's entry.
    let single = a.bucket(&dev_a).await;
    assert_eq!(single, bucket_in(&full, &dev_a));

    // The same device through its assigned-credential name.
    let via_a = node
        .assigned(A)
        .get("/v1/buckets?view=full")
        .await
        .expect_json(StatusCode::OK);
    assert_eq!(sorted_buckets(&via_a), sorted_buckets(&full));

    // Errors.
    a.get(&format!("/v1/buckets/other.{A}"))
        .await
        .expect_error(StatusCode::NOT_FOUND, "not_found");
    for bad in ["nodot", "UPPER.case", "device.bad!key"] {
        a.get(&format!("/v1/buckets/{bad}"))
            .await
            .expect_error(StatusCode::BAD_REQUEST, "bad_request");
    }
    a.get(&format!("/v1/buckets/device.{B}"))
        .await
        .expect_error(StatusCode::FORBIDDEN, "forbidden");
    a.get(&format!("/v1/buckets/shared.{B}"))
        .await
        .expect_error(StatusCode::FORBIDDEN, "forbidden");
    // Never-registered device: it holds only default credentials, which reach nothing but
    // registration.
    node.device("NEVER001")
        .get("/v1/buckets/device.NEVER001")
        .await
        .expect_error(StatusCode::UNAUTHORIZED, "default_credentials_not_allowed");

    // A user without devices sees nothing and may not read a device's bucket.
    let user = node.user("alice");
    let ul = user
        .get("/v1/buckets?view=full")
        .await
        .expect_json(StatusCode::OK);
    assert_eq!(ul, json!({"buckets": []}), "user without devices");
    user.get(&format!("/v1/buckets/{dev_a}"))
        .await
        .expect_error(StatusCode::FORBIDDEN, "forbidden");

    // Authentication.
    let r = node.send(node.anon(Method::GET, "/v1/buckets")).await;
    r.expect_error(StatusCode::UNAUTHORIZED, "unauthorized");
    assert_eq!(
        r.headers
            .get("www-authenticate")
            .and_then(|v| v.to_str().ok()),
        Some("Basic realm=\"tether\""),
        "a 401 carries the Basic challenge (API.md)"
    );
    node.send(node.anon(Method::GET, &format!("/v1/buckets/{dev_a}")))
        .await
        .expect_error(StatusCode::UNAUTHORIZED, "unauthorized");
    node.send(
        node.anon(Method::GET, "/v1/buckets")
            .basic_auth("nonsense", Some("a.AAAAAAAAAAAAAAAAAAAAAA")),
    )
    .await
    .expect_error(StatusCode::UNAUTHORIZED, "unauthorized");
    node.send(
        node.anon(Method::GET, "/v1/buckets")
            .header("Authorization", "Bearer abc.def"),
    )
    .await
    .expect_error(StatusCode::UNAUTHORIZED, "unauthorized");
    node.send(
        node.anon(Method::GET, "/v1/buckets")
            .header("Authorization", "Basic !!!not-base64!!!"),
    )
    .await
    .expect_error(StatusCode::UNAUTHORIZED, "unauthorized");
}

// ---------------------------------------------------------------------------------------
// 3. PUT

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_applied_merged_refused() {
    let node = api_node().await;
    let a = node.device(A);
    a.register_thermostat().await;
    let id = format!("device.{A}");
    let v1 = a.bucket(&id).await;
    assert_eq!(u64_of(&v1, "version"), 1);
    let ts1 = u64_of(&v1, "timestamp");

    // applied: only outcome/id/timestamp/version.
    let r = a
        .put(
            &id,
            &json!({"value": {"target_temperature": 21.5}, "base_version": 1, "occ": false, "session": "s1"}),
        )
        .await
        .expect_json(StatusCode::OK);
    assert_eq!(
        keys(&r),
        set(&["outcome", "id", "timestamp", "version"]),
        "applied answer carries no value: {r}"
    );
    assert_eq!(r["outcome"], "applied");
    assert_eq!(r["id"], id.as_str());
    assert_eq!(u64_of(&r, "version"), 2);
    let ts2 = u64_of(&r, "timestamp");
    assert!(ts2 >= ts1, "timestamps never go backwards: {ts1} -> {ts2}");
    let got = a.bucket(&id).await;
    assert_eq!(u64_of(&got, "version"), 2);
    assert_eq!(u64_of(&got, "timestamp"), ts2);
    assert_eq!(got["value"]["target_temperature"], 21.5);
    let mut expected = v1["value"].as_object().expect("object").clone();
    expected.insert("target_temperature".into(), json!(21.5));
    assert_eq!(
        got["value"],
        Value::Object(expected.clone()),
        "other fields kept"
    );

    // merged: stale base, no OCC → full merged bucket.
    let r = a
        .put(
            &id,
            &json!({"value": {"mode": "cool"}, "base_version": 1, "occ": false, "session": "s2"}),
        )
        .await
        .expect_json(StatusCode::OK);
    assert_eq!(r["outcome"], "merged", "{r}");
    assert_eq!(r["id"], id.as_str());
    assert_eq!(u64_of(&r, "version"), 3, "{r}");
    let ts3 = u64_of(&r, "timestamp");
    assert!(ts3 >= ts2);
    expected.insert("mode".into(), json!("cool"));
    assert_eq!(
        r["value"],
        Value::Object(expected.clone()),
        "merged value: {r}"
    );
    let got = a.bucket(&id).await;
    assert_eq!(u64_of(&got, "version"), 3);
    assert_eq!(got["value"], Value::Object(expected.clone()));

    // merged with base_version/occ/session omitted (base 0 = never saw it).
    let r = a
        .put(&id, &json!({"value": {"fan": true}}))
        .await
        .expect_json(StatusCode::OK);
    assert_eq!(r["outcome"], "merged", "{r}");
    assert_eq!(u64_of(&r, "version"), 4, "{r}");
    expected.insert("fan".into(), json!(true));
    assert_eq!(r["value"], Value::Object(expected.clone()), "{r}");

    // refused: stale base with OCC → 409 with the stored bucket; nothing changes.
    let before = a.bucket(&id).await;
    let r = a
        .put(
            &id,
            &json!({"value": {"target_temperature": 10}, "base_version": 2, "occ": true}),
        )
        .await
        .expect_json(StatusCode::CONFLICT);
    assert_eq!(r["outcome"], "refused", "{r}");
    assert_eq!(r["id"], id.as_str());
    assert_eq!(r["version"], before["version"], "{r}");
    assert_eq!(r["timestamp"], before["timestamp"], "{r}");
    assert_eq!(
        r["value"], before["value"],
        "refusal carries the stored bucket: {r}"
    );
    assert_eq!(
        a.bucket(&id).await,
        before,
        "refused write left the store unchanged"
    );

    // OCC with the current base is applied.
    let r = a
        .put(
            &id,
            &json!({"value": {"target_temperature": 19}, "base_version": 4, "occ": true}),
        )
        .await
        .expect_json(StatusCode::OK);
    assert_eq!(r["outcome"], "applied", "{r}");
    assert_eq!(u64_of(&r, "version"), 5);

    // The other bucket of the set is writable too and independent.
    let sid = format!("shared.{A}");
    let (_, sv) = a.write(&sid, json!({"away": false}), 1).await;
    assert_eq!(sv, 2);
    assert_eq!(u64_of(&a.bucket(&id).await, "version"), 5);

    // Versions go up by exactly one per accepted write; timestamps never go back.
    let (mut ts, mut ver) = (u64_of(&r, "timestamp"), 5);
    for i in 0..20 {
        let (t, v) = a.write(&id, json!({"counter": i}), ver).await;
        assert_eq!(v, ver + 1, "version step");
        assert!(t >= ts, "timestamp went backwards: {ts} -> {t}");
        (ts, ver) = (t, v);
    }
    let got = a.bucket(&id).await;
    assert_eq!(u64_of(&got, "version"), ver);
    assert_eq!(got["value"]["counter"], 19);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_get_distinct_consecutive_versions() {
    const WRITERS: u64 = 40;
    let node = api_node().await;
    let a = node.device(A);
    a.register_thermostat().await;
    let id = format!("device.{A}");

    // Many clients write different fields, all based on version 1, at once.
    let tasks: Vec<_> = (0..WRITERS)
        .map(|i| {
            let p = node.device_with(A, http_client());
            let id = id.clone();
            tokio::spawn(async move {
                let r = p
                    .put(
                        &id,
                        &json!({"value": {format!("w{i}"): i}, "base_version": 1}),
                    )
                    .await
                    .expect_json(StatusCode::OK);
                assert!(r["outcome"] == "applied" || r["outcome"] == "merged", "{r}");
                (u64_of(&r, "version"), u64_of(&r, "timestamp"))
            })
        })
        .collect();
    let mut results = Vec::new();
    for t in tasks {
        results.push(
            within(REQUEST_DEADLINE, "concurrent PUT", t)
                .await
                .expect("task"),
        );
    }
    // Every accepted write got its own version, 2..=WRITERS+1, and ordering by version
    // never puts a timestamp backwards.
    results.sort();
    let versions: Vec<u64> = results.iter().map(|r| r.0).collect();
    assert_eq!(
        versions,
        (2..=WRITERS + 1).collect::<Vec<_>>(),
        "each accepted write must be answered with the version it created (unique per \
         write); answering several writes with one later version hides from an `applied` \
         writer the fields other writes added"
    );
    for w in results.windows(2) {
        assert!(
            w[1].1 >= w[0].1,
            "timestamp went backwards with version: {w:?}"
        );
    }
    // No write was lost in the merge.
    let b = a.bucket(&id).await;
    assert_eq!(u64_of(&b, "version"), WRITERS + 1);
    for i in 0..WRITERS {
        assert_eq!(b["value"][format!("w{i}")], i, "field w{i} lost: {b}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_errors_have_json_bodies() {
    let node = Node::start().await;
    let a = node.device(A);
    a.register_thermostat().await;
    node.device(B).register_thermostat().await;
    let id = format!("device.{A}");
    let before = a.bucket(&id).await;

    let json_ct = "application/json";
    a.put_raw(&id, json_ct, b"{\"value\": {\"a\": 1".to_vec())
        .await
        .expect_error(StatusCode::BAD_REQUEST, "bad_request");
    a.put_raw(&id, json_ct, b"not json at all".to_vec())
        .await
        .expect_error(StatusCode::BAD_REQUEST, "bad_request");
    a.put(&id, &json!({"value": 3, "base_version": 1}))
        .await
        .expect_error(StatusCode::BAD_REQUEST, "bad_request");
    a.put(&id, &json!({"value": [1, 2], "base_version": 1}))
        .await
        .expect_error(StatusCode::BAD_REQUEST, "bad_request");
    a.put(&id, &json!({"value": "x", "base_version": 1}))
        .await
        .expect_error(StatusCode::BAD_REQUEST, "bad_request");
    a.put(&id, &json!({"value": {"a": 1}, "base_version": "two"}))
        .await
        .expect_error(StatusCode::BAD_REQUEST, "bad_request");
    a.put(&id, &json!({"value": {"a": 1}, "base_version": -1}))
        .await
        .expect_error(StatusCode::BAD_REQUEST, "bad_request");
    a.put(
        &id,
        &json!({"value": {"a": 1}, "base_version": 1, "occ": "yes"}),
    )
    .await
    .expect_error(StatusCode::BAD_REQUEST, "bad_request");
    a.put(&id, &json!({"base_version": 1}))
        .await
        .expect_error(StatusCode::BAD_REQUEST, "bad_request");

    // Above the default 64 KiB limit.
    let big = "x".repeat(100 * 1024);
    a.put(&id, &json!({"value": {"blob": big}, "base_version": 1}))
        .await
        .expect_error(StatusCode::PAYLOAD_TOO_LARGE, "too_large");

    // Unknown bucket in the device's own set; another device's bucket; bad id; no auth.
    a.put(&format!("other.{A}"), &json!({"value": {"a": 1}}))
        .await
        .expect_error(StatusCode::NOT_FOUND, "not_found");
    a.put(&format!("device.{B}"), &json!({"value": {"a": 1}}))
        .await
        .expect_error(StatusCode::FORBIDDEN, "forbidden");
    a.put("nodot", &json!({"value": {"a": 1}}))
        .await
        .expect_error(StatusCode::BAD_REQUEST, "bad_request");
    node.send(
        node.anon(Method::PUT, &format!("/v1/buckets/{id}"))
            .json(&json!({"value": {"a": 1}})),
    )
    .await
    .expect_error(StatusCode::UNAUTHORIZED, "unauthorized");

    // None of that changed anything.
    assert_eq!(
        a.bucket(&id).await,
        before,
        "rejected writes must not change the bucket"
    );
    let b_bucket = node.device(B).bucket(&format!("device.{B}")).await;
    assert_eq!(u64_of(&b_bucket, "version"), 1, "{b_bucket}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_size_limit_is_configurable() {
    let node = Node::builder()
        .config(&api_template())
        .arg("--max-bucket-bytes")
        .arg("1024")
        .start()
        .await;
    let a = node.device(A);
    a.register_thermostat().await;
    let id = format!("device.{A}");

    // Well under the limit: fine.
    let (_, v) = a.write(&id, json!({"note": "x".repeat(100)}), 1).await;
    assert_eq!(v, 2);
    // Well over it: 413, bucket unchanged.
    let before = a.bucket(&id).await;
    a.put(
        &id,
        &json!({"value": {"note": "y".repeat(4096)}, "base_version": 2}),
    )
    .await
    .expect_error(StatusCode::PAYLOAD_TOO_LARGE, "too_large");
    assert_eq!(a.bucket(&id).await, before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_size_limit_from_config_file() {
    let node = Node::builder()
        .config(&format!("max_bucket_bytes = 1024\n{}", api_template()))
        .start()
        .await;
    let a = node.device(A);
    a.register_thermostat().await;
    let id = format!("device.{A}");
    let (_, v) = a.write(&id, json!({"note": "x".repeat(100)}), 1).await;
    assert_eq!(v, 2);
    a.put(
        &id,
        &json!({"value": {"note": "y".repeat(4096)}, "base_version": 2}),
    )
    .await
    .expect_error(StatusCode::PAYLOAD_TOO_LARGE, "too_large");
    assert_eq!(u64_of(&a.bucket(&id).await, "version"), 2);
}

// ---------------------------------------------------------------------------------------
// 6. protobuf

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protobuf_round_trip() {
    let node = api_node().await;
    let a = node.device(A);
    let id = format!("device.{A}");

    // register as protobuf
    let req = RegisterRequest {
        device_id: A.into(),
        device_type: "thermostat".into(),
        sw_version: "1.0.0".into(),
        next_sync_ms: None,
    };
    let r = a
        .send(
            a.req(Method::POST, "/v1/register")
                .header(CONTENT_TYPE, PROTOBUF)
                .header(ACCEPT, PROTOBUF)
                .body(req.encode_pb()),
        )
        .await
        .expect(StatusCode::OK);
    let reg: RegisterResponse = r.pb();
    assert_eq!(reg.tier, "production");
    assert_eq!(reg.redirect, None);
    assert_eq!(reg.software_update, None);
    assert_eq!(reg.sync_url, node.base);
    let mut ids = reg.buckets.clone();
    ids.sort();
    assert_eq!(ids, thermostat_buckets(A));

    // GET list as protobuf
    let r = send(
        a.req(Method::GET, "/v1/buckets?view=full")
            .header(ACCEPT, PROTOBUF),
    )
    .await
    .expect(StatusCode::OK);
    let list: BucketList = r.pb();
    let mut ids: Vec<String> = list.buckets.iter().map(|b| b.id.clone()).collect();
    ids.sort();
    assert_eq!(ids, thermostat_buckets(A));
    for b in &list.buckets {
        assert_eq!(b.version, Some(1), "{b:?}");
        assert!(b.value.is_some(), "full view has values: {b:?}");
    }

    // PUT as protobuf → applied
    let fields = json!({
        "target_temperature": 21.5, "setpoints": 3, "mode": "heat", "fan": true,
        "schedule": {"mon": [6, 22]}, "hold": null
    });
    let up = UpdateRequest {
        value: obj(fields.clone()),
        base_version: 1,
        occ: false,
        session: Some("pb-session".into()),
        op_id: None,
    };
    let r = a.put_pb(&id, up.encode_pb()).await.expect(StatusCode::OK);
    let resp: UpdateResponse = r.pb();
    assert_eq!(resp.outcome, UpdateOutcome::Applied);
    assert_eq!(resp.id, id);
    assert_eq!(resp.version, 2);
    assert_eq!(resp.value, None, "applied carries no value");

    // The JSON view sees exactly the protobuf-written values.
    let got = a.bucket(&id).await;
    assert_eq!(u64_of(&got, "version"), 2);
    for (k, v) in obj(fields.clone()) {
        assert_eq!(got["value"][&k], v, "field {k} after protobuf PUT: {got}");
    }

    // Stale base → merged, full value in protobuf.
    let up = UpdateRequest {
        value: obj(json!({"mode": "cool"})),
        base_version: 1,
        occ: false,
        session: None,
        op_id: None,
    };
    let resp: UpdateResponse = a
        .put_pb(&id, up.encode_pb())
        .await
        .expect(StatusCode::OK)
        .pb();
    assert_eq!(resp.outcome, UpdateOutcome::Merged);
    assert_eq!(resp.version, 3);
    let merged = resp.value.expect("merged carries the bucket value");
    assert_eq!(merged.get("mode"), Some(&json!("cool")));
    assert_eq!(merged.get("target_temperature"), Some(&json!(21.5)));
    assert_eq!(merged.get("schedule"), Some(&json!({"mon": [6, 22]})));

    // Stale base with OCC → 409 refused, protobuf body.
    let up = UpdateRequest {
        value: obj(json!({"mode": "off"})),
        base_version: 1,
        occ: true,
        session: None,
        op_id: None,
    };
    let r = a
        .put_pb(&id, up.encode_pb())
        .await
        .expect(StatusCode::CONFLICT);
    let resp: UpdateResponse = r.pb();
    assert_eq!(resp.outcome, UpdateOutcome::Refused);
    assert_eq!(resp.version, 3);
    assert_eq!(
        resp.value
            .expect("refused carries the stored value")
            .get("mode"),
        Some(&json!("cool"))
    );

    // Protobuf request, JSON answer (no Accept).
    let up = UpdateRequest {
        value: obj(json!({"fan": false})),
        base_version: 3,
        occ: false,
        session: None,
        op_id: None,
    };
    let r = a
        .put_raw(&id, PROTOBUF, up.encode_pb())
        .await
        .expect_json(StatusCode::OK);
    assert_eq!(r["outcome"], "applied", "{r}");
    assert_eq!(u64_of(&r, "version"), 4);

    // Subscribe as protobuf: stale → answered at once with the full bucket.
    let sub = SubscribeRequest {
        buckets: vec![HeldBucket {
            id: id.clone(),
            timestamp: None,
            version: Some(1),
        }],
        session: None,
        timeout_ms: Some(60_000),
        diffs: false,
        max_bytes: None,
        stream: false,
        next_sync_ms: None,
    };
    let r = send_within(
        NOTIFY_DEADLINE,
        a.req(Method::POST, "/v1/subscribe")
            .header(CONTENT_TYPE, PROTOBUF)
            .header(ACCEPT, PROTOBUF)
            .body(sub.encode_pb()),
    )
    .await
    .expect(StatusCode::OK);
    let list: BucketList = r.pb();
    assert_eq!(list.buckets.len(), 1, "{list:?}");
    assert_eq!(list.buckets[0].id, id);
    assert_eq!(list.buckets[0].version, Some(4));
    let value = list.buckets[0].value.clone().expect("full bucket");
    assert_eq!(value.get("fan"), Some(&json!(false)));
    assert_eq!(value.get("schedule"), Some(&json!({"mon": [6, 22]})));

    // Subscribe as protobuf: held, then woken by a JSON PUT from another session.
    let sub = SubscribeRequest {
        buckets: vec![HeldBucket {
            id: id.clone(),
            timestamp: list.buckets[0].timestamp,
            version: Some(4),
        }],
        session: Some("pb-sub".into()),
        timeout_ms: Some(60_000),
        diffs: false,
        max_bytes: None,
        stream: false,
        next_sync_ms: None,
    };
    let a2 = a.clone();
    let held = tokio::spawn(async move {
        send_within(
            REQUEST_DEADLINE * 3,
            a2.req(Method::POST, "/v1/subscribe")
                .header(CONTENT_TYPE, PROTOBUF)
                .header(ACCEPT, PROTOBUF)
                .body(sub.encode_pb()),
        )
        .await
    });
    node.wait_held(1, REQUEST_DEADLINE).await;
    let (_, v5) = a.write(&id, json!({"target_temperature": 18}), 4).await;
    assert_eq!(v5, 5);
    let r = within(
        NOTIFY_DEADLINE,
        "protobuf subscription woken by a PUT",
        held,
    )
    .await
    .expect("subscribe task")
    .expect(StatusCode::OK);
    let list: BucketList = r.pb();
    assert_eq!(list.buckets.len(), 1, "{list:?}");
    assert_eq!(list.buckets[0].version, Some(5));
    assert_eq!(
        list.buckets[0]
            .value
            .as_ref()
            .expect("full bucket")
            .get("target_temperature"),
        Some(&json!(18))
    );
}

// ---------------------------------------------------------------------------------------
// operations

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_ready_and_metrics() {
    let node = Node::start().await;
    node.send(node.anon(Method::GET, "/healthz"))
        .await
        .expect(StatusCode::OK);
    node.send(node.anon(Method::GET, "/readyz"))
        .await
        .expect(StatusCode::OK);

    let a = node.device(A);
    a.register_thermostat().await;
    a.get("/v1/buckets").await.expect(StatusCode::OK);

    let m = node.metrics().await;
    for name in [
        "tether_http_requests_total",
        "tether_active_bucket_sets",
        "tether_held_subscriptions",
    ] {
        assert!(
            metric_value(&m, name).is_some(),
            "/metrics lacks a sample of {name}:\n{m}"
        );
    }
    let reqs = metric_value(&m, "tether_http_requests_total").expect("requests");
    assert!(reqs >= 2.0, "served requests are counted: {reqs}\n{m}");
    assert_eq!(metric_value(&m, "tether_held_subscriptions"), Some(0.0));

    assert!(
        node.stdout_extra().is_empty(),
        "stdout must carry only the listening line, also got {:?}",
        node.stdout_extra()
    );
}
