//! `/metrics` (issue 14): latency histograms present and moving under a short load, the
//! counters of refusals by reason, OpenMetrics with trace-id exemplars when asked (and
//! plain Prometheus text without them otherwise), and label cardinality bounded: 1,000
//! devices add no series of their own.

use std::collections::BTreeSet;
use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::json;
use tether_node::metrics::sample_sum;
use tether_test_support::node::*;
use tether_test_support::otlp::{Collector, Protocol};

/// The value of the one series `name{labels}` (labels in the exposition's order).
fn series(text: &str, name_and_labels: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name_and_labels)?.strip_prefix(' '))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latency_histograms_move_under_load_and_exemplars_carry_trace_ids() {
    let collector = Collector::start(Protocol::Grpc).await;
    let node = Node::builder()
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", &collector.endpoint())
        .env("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
        .arg("--register-per-hour")
        .arg("1")
        .start()
        .await;
    let before = node.metrics().await;
    let put_count = r#"tether_http_request_duration_seconds_count{method="PUT",route="/v1/buckets/{id}",status="200"}"#;
    assert_eq!(series(&before, put_count), 0.0);

    let devices: Vec<Principal> = (0..4)
        .map(|i| node.device(&format!("LOAD{i:04}")))
        .collect();
    for d in &devices {
        d.register_thermostat().await;
    }
    // A held subscription answered by another principal's change: a notification.
    let watcher = devices[0].clone();
    let version = u64_of(&watcher.bucket("device.LOAD0000").await, "version");
    let sub = tokio::spawn(async move {
        watcher
            .subscribe(
                &json!({"buckets": [{"id": "device.LOAD0000", "version": version}], "timeout_ms": 30_000, "session": "watcher"}),
                Duration::from_secs(40),
            )
            .await
    });
    node.wait_held(1, Duration::from_secs(10)).await;
    // A short load: 200 PUTs and 200 GETs over 4 devices.
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    for i in 0..200u64 {
        let d = &devices[(i % 4) as usize];
        let id = format!("device.{}", d.serial());
        let r = d
            .send(
                d.req(Method::PUT, &format!("/v1/buckets/{id}"))
                    .header("traceparent", format!("00-{trace_id}-00f067aa0ba902b7-01"))
                    .json(&json!({"value": {"current_temperature": i}, "base_version": 0})),
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        assert_eq!(
            d.get(&format!("/v1/buckets/{id}")).await.status,
            StatusCode::OK
        );
    }
    let answered = sub.await.expect("join");
    assert_eq!(answered.status, StatusCode::OK);
    // Refusals by reason: a wrong secret, and a second default-credential registration
    // within the hour (`--register-per-hour 1`).
    let wrong = node.with_credentials(tether_proto::credentials::Credentials {
        id: "a.LOAD0001".into(),
        secret: "a.wrongwrongwrongwrongw".into(),
    });
    assert_eq!(
        wrong.get("/v1/buckets").await.status,
        StatusCode::UNAUTHORIZED
    );
    let again = node
        .factory("LOAD0002")
        .register("thermostat", "1.0.0")
        .await;
    assert_eq!(
        again.status,
        StatusCode::TOO_MANY_REQUESTS,
        "{}",
        again.text()
    );

    let after = node.metrics().await;
    assert!(
        series(&after, put_count) >= 200.0,
        "PUT latencies not recorded:\n{after}"
    );
    let get_count = r#"tether_http_request_duration_seconds_count{method="GET",route="/v1/buckets/{id}",status="200"}"#;
    assert!(series(&after, get_count) >= 200.0);
    let sum = series(
        &after,
        r#"tether_http_request_duration_seconds_sum{method="PUT",route="/v1/buckets/{id}",status="200"}"#,
    );
    assert!(sum > 0.0, "latencies sum to zero");
    // Some bucket below +Inf holds some of them: the buckets are real.
    let inf = series(
        &after,
        r#"tether_http_request_duration_seconds_bucket{le="+Inf",method="PUT",route="/v1/buckets/{id}",status="200"}"#,
    );
    assert!(inf >= 200.0, "histogram buckets missing:\n{after}");
    for (name, at_least) in [
        ("tether_store_commit_duration_seconds_count", 200.0),
        ("tether_store_commit_requests_sum", 200.0),
        ("tether_actor_mailbox_wait_seconds_count", 400.0),
        ("tether_subscribe_hold_seconds_count", 1.0),
        ("tether_notify_latency_seconds_count", 1.0),
        ("tether_lease_acquire_duration_seconds_count", 4.0),
        ("tether_auth_failures_total", 1.0),
        ("tether_rate_limited_total", 1.0),
        ("process_resident_memory_bytes", 1.0),
        ("process_cpu_seconds_total", 0.0),
    ] {
        let v = sample_sum(&after, name).unwrap_or_else(|| panic!("{name} missing:\n{after}"));
        assert!(v >= at_least, "{name} = {v}, expected ≥ {at_least}");
    }
    assert_eq!(
        series(
            &after,
            r#"tether_store_commit_duration_seconds_count{backend="redb"}"#
        ),
        sample_sum(&after, "tether_store_commit_duration_seconds_count").unwrap_or(0.0),
        "commit latency is labelled by backend"
    );
    assert_eq!(
        series(
            &after,
            r#"tether_subscribe_hold_seconds_count{outcome="changed"}"#
        ),
        1.0
    );
    assert_eq!(
        series(
            &after,
            r#"tether_auth_failures_total{reason="unauthorized"}"#
        ),
        1.0
    );
    assert_eq!(
        series(&after, r#"tether_rate_limited_total{route="/v1/register"}"#),
        1.0
    );
    // Plain Prometheus text has no exemplars; OpenMetrics, asked for, has ours.
    assert!(!after.contains(" # {"), "exemplars in text/plain:\n{after}");
    let r = node
        .send(node.anon(Method::GET, "/metrics").header(
            "accept",
            "application/openmetrics-text; version=1.0.0,text/plain;q=0.5",
        ))
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(
        r.content_type
            .as_deref()
            .is_some_and(|c| c.starts_with("application/openmetrics-text")),
        "{:?}",
        r.content_type
    );
    let om = r.text();
    assert!(
        om.trim_end().ends_with("# EOF"),
        "OpenMetrics must end with # EOF"
    );
    assert!(
        om.lines().any(
            |l| l.starts_with("tether_http_request_duration_seconds_bucket")
                && l.contains(&format!("# {{trace_id=\"{trace_id}\"}}"))
        ),
        "no exemplar naming trace {trace_id}:\n{om}"
    );
}

/// Every `name{labels}` series in an exposition, and the label values seen.
fn series_and_values(text: &str) -> (BTreeSet<String>, BTreeSet<String>) {
    let mut names = BTreeSet::new();
    let mut values = BTreeSet::new();
    for l in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let key = l.rsplit_once(' ').map_or(l, |(k, _)| k).to_string();
        if let (Some(a), Some(b)) = (key.find('{'), key.rfind('}')) {
            for pair in key[a + 1..b].split("\",") {
                if let Some((_, v)) = pair.split_once("=\"") {
                    values.insert(v.trim_end_matches('"').to_string());
                }
            }
        }
        names.insert(key);
    }
    (names, values)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_devices_add_no_series_of_their_own() {
    let node = Node::start().await;
    let run = |range: std::ops::Range<usize>| {
        let node = &node;
        async move {
            let mut tasks = Vec::new();
            for chunk in range.collect::<Vec<_>>().chunks(50) {
                for &i in chunk {
                    let d = node.device(&format!("CARD{i:05}"));
                    tasks.push(tokio::spawn(async move {
                        d.register_thermostat().await;
                        let id = format!("device.{}", d.serial());
                        let r = d
                            .put(&id, &json!({"value": {"humidity": i}, "base_version": 0}))
                            .await;
                        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
                        assert_eq!(
                            d.get(&format!("/v1/buckets/{id}")).await.status,
                            StatusCode::OK
                        );
                    }));
                }
                for t in tasks.drain(..) {
                    t.await.expect("device task");
                }
            }
        }
    };
    run(0..10).await;
    // The first scrape creates the series of /metrics itself; the baseline is the second.
    node.metrics().await;
    let (few, _) = series_and_values(&node.metrics().await);
    run(10..1000).await;
    let text = node.metrics().await;
    let (many, values) = series_and_values(&text);
    let added: Vec<&String> = many.difference(&few).collect();
    assert!(
        added.is_empty(),
        "990 more devices added series (labels must not grow with devices): {added:#?}"
    );
    let leaked: Vec<&String> = values.iter().filter(|v| v.contains("CARD")).collect();
    assert!(leaked.is_empty(), "device ids as label values: {leaked:?}");
    assert!(
        sample_sum(&text, "tether_put_outcomes_total").unwrap_or(0.0) >= 1000.0,
        "the 1,000 devices' writes were counted"
    );
}
