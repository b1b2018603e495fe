//! Traces across nodes (issue 14): two real `tether` nodes in cluster mode on a private
//! PostgreSQL export to an in-process OTLP receiver, over gRPC and over HTTP/protobuf. A
//! device PUT with a W3C `traceparent` lands on the node that does not own its set; the
//! test asserts one trace under the caller's trace id, parented hop by hop: the
//! non-owner's HTTP server span → `route` → `forward put` (client) → the owner's
//! `tether.node.v1.Sets/Put` (server) → `actor.put` → `store.commit` (which also links
//! to it). Gossip is not traced. The HTTP/protobuf run uses a long batch delay and stops
//! the nodes with SIGTERM before looking, so it also shows the exporter flushed on drain.
//!
//! The gRPC run samples with `parentbased_traceidratio` at ratio 0: the caller's sampled
//! `traceparent` is followed, and requests the sampler leaves out (no `traceparent`, or
//! one not sampled) export no span on either node — the non-owner passes the decision on —
//! while their log lines on both nodes still carry their trace id.
//!
//! The log tests: request id and trace id on every request's log lines, no ANSI colour
//! when stderr is not a terminal, and the trace id carried across a hop with export off.

use std::collections::BTreeMap;
use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::json;
use tether_cluster::{NodeId, Ring};
use tether_node::store::pg_server::PgServer;
use tether_test_support::node::*;
use tether_test_support::otlp::{Collector, Protocol, Span};

const SECRET: &str = "otel-test-secret-0123456789abcdef";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

struct Member {
    node: Node,
    grpc: u16,
}

async fn start_member(
    id: &str,
    store: &str,
    join: Option<u16>,
    keyring: Option<&Node>,
    env: &[(&str, String)],
) -> Member {
    let grpc = free_port();
    let mut b = Node::builder()
        .arg("--node-id")
        .arg(id)
        .arg("--store")
        .arg(store)
        .arg("--grpc-listen")
        .arg(format!("127.0.0.1:{grpc}"))
        .env("TETHER_CLUSTER_SECRET", SECRET);
    for (k, v) in env {
        b = b.env(k, v);
    }
    if let Some(seed) = join {
        b = b.arg("--join").arg(format!("127.0.0.1:{seed}"));
    }
    if let Some(k) = keyring {
        b = b.keyring(k.keyring());
    }
    Member {
        node: b.start().await,
        grpc,
    }
}

fn random_hex(bytes: usize) -> String {
    (0..bytes)
        .map(|_| format!("{:02x}", rand::random::<u8>()))
        .collect()
}

fn find<'a>(spans: &'a [Span], name: &str, node: &str) -> Option<&'a Span> {
    spans.iter().find(|s| {
        s.name == name && s.resource.get("service.instance.id").map(String::as_str) == Some(node)
    })
}

fn describe(spans: &[Span]) -> String {
    spans
        .iter()
        .map(|s| {
            format!(
                "  {} [{}] {} parent={} span={} links={:?}",
                s.resource
                    .get("service.instance.id")
                    .map_or("?", String::as_str),
                s.trace_id,
                s.name,
                s.parent_span_id,
                s.span_id,
                s.links
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

async fn one_trace_across_two_nodes(protocol: Protocol) {
    let collector = Collector::start(protocol).await;
    // gRPC: export every 100 ms, sample only what the caller sampled. HTTP: only on drain
    // (60 s delay), so the assertions below also prove that SIGTERM flushes the exporter;
    // the default sampler (parentbased_always_on).
    let (delay, ratio_sampling) = match protocol {
        Protocol::Grpc => ("100", true),
        Protocol::HttpProtobuf => ("60000", false),
    };
    let env = vec![
        ("OTEL_EXPORTER_OTLP_ENDPOINT", collector.endpoint()),
        (
            "OTEL_EXPORTER_OTLP_PROTOCOL",
            protocol.env_value().to_string(),
        ),
        ("OTEL_BSP_SCHEDULE_DELAY", delay.to_string()),
        ("OTEL_SERVICE_NAME", "tether-under-test".to_string()),
    ];
    // node-a samples no new trace (ratio 0), node-b every one (ratio 1): the trace node-a
    // leaves out must stay out on node-b because node-a passes its decision on.
    let sampler = |ratio: &str| {
        let mut env = env.clone();
        if ratio_sampling {
            env.push(("OTEL_TRACES_SAMPLER", "parentbased_traceidratio".into()));
            env.push(("OTEL_TRACES_SAMPLER_ARG", ratio.into()));
            // The owner's "serving a forwarded call" lines.
            env.push(("TETHER_LOG", "info,tether_node=debug".into()));
        }
        env
    };
    let pg = PgServer::start().expect("a private PostgreSQL server (installed by scripts/test)");
    let url = pg.url("otel").expect("database");
    let a = start_member("node-a", &url, None, None, &sampler("0")).await;
    let b = start_member("node-b", &url, Some(a.grpc), Some(&a.node), &sampler("1")).await;
    a.node.wait_ready(2).await;
    b.node.wait_ready(2).await;

    // A device whose set node-b owns, written through node-a.
    let ring = Ring::new([NodeId::new("node-a"), NodeId::new("node-b")], 256);
    let serial = (0..1000)
        .map(|i| format!("OTEL{i:04}"))
        .find(|s| ring.owner(s).expect("owner").as_str() == "node-b")
        .expect("some serial owned by node-b");
    let device = a.node.device(&serial);
    device.register_thermostat().await;
    let bucket = format!("device.{serial}");

    // Requests the sampler leaves out, before the sampled one: a caller's trace not
    // sampled, and a request without a `traceparent` (ratio 0 samples no new trace).
    let unsampled_trace = random_hex(16);
    if ratio_sampling {
        for traceparent in [
            Some(format!("00-{unsampled_trace}-{}-00", random_hex(8))),
            None,
        ] {
            let mut req = device
                .req(Method::PUT, &format!("/v1/buckets/{bucket}"))
                .json(&json!({"value": {"hvac_state": "heating"}}));
            if let Some(tp) = traceparent {
                req = req.header("traceparent", tp);
            }
            let r = device.send(req).await;
            assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        }
    }

    let trace_id = random_hex(16);
    let caller_span = random_hex(8);
    let traceparent = format!("00-{trace_id}-{caller_span}-01");
    let r = device
        .send(
            device
                .req(Method::PUT, &format!("/v1/buckets/{bucket}"))
                .header("traceparent", &traceparent)
                .json(&json!({"value": {"current_temperature": 20.5}, "base_version": 0})),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());

    let wanted = [
        ("PUT /v1/buckets/{id}", "node-a"),
        ("route", "node-a"),
        ("forward put", "node-a"),
        ("tether.node.v1.Sets/Put", "node-b"),
        ("actor.put", "node-b"),
        ("store.commit", "node-b"),
    ];
    if protocol == Protocol::HttpProtobuf {
        // Nothing is exported before the batch delay…
        assert!(
            collector.spans().iter().all(|s| s.trace_id != trace_id),
            "spans arrived before the drain: the 60 s batch delay was not in force"
        );
        // …until the nodes drain.
        b.node.sigterm().await;
        a.node.sigterm().await;
    }
    let spans = collector
        .wait_for(Duration::from_secs(30), |spans| {
            let ours: Vec<Span> = spans
                .iter()
                .filter(|s| s.trace_id == trace_id)
                .cloned()
                .collect();
            wanted
                .iter()
                .all(|(n, node)| find(&ours, n, node).is_some())
        })
        .await;
    let ours: Vec<Span> = spans
        .iter()
        .filter(|s| s.trace_id == trace_id)
        .cloned()
        .collect();
    let get = |name: &str, node: &str| {
        find(&ours, name, node).unwrap_or_else(|| {
            panic!(
                "{protocol:?}: no {name:?} span from {node} in trace {trace_id}; received:\n{}\n\nnode-a stderr:\n{}\nnode-b stderr:\n{}",
                describe(&spans),
                a.node.stderr_tail(),
                b.node.stderr_tail()
            )
        })
    };
    let http = get("PUT /v1/buckets/{id}", "node-a");
    let route = get("route", "node-a");
    let forward = get("forward put", "node-a");
    let served = get("tether.node.v1.Sets/Put", "node-b");
    let actor = get("actor.put", "node-b");
    let commit = get("store.commit", "node-b");
    let tree = describe(&ours);
    assert_eq!(
        http.parent_span_id, caller_span,
        "the HTTP span continues the caller's trace:\n{tree}"
    );
    assert_eq!(http.kind, 2, "the HTTP span is a server span");
    assert_eq!(http.attr("http.request.method"), Some("PUT"));
    assert_eq!(http.attr("http.route"), Some("/v1/buckets/{id}"));
    assert_eq!(
        http.attr("url.path"),
        Some(format!("/v1/buckets/{bucket}").as_str())
    );
    assert_eq!(http.attr("http.response.status_code"), Some("200"));
    assert_eq!(
        route.parent_span_id, http.span_id,
        "route under the HTTP span:\n{tree}"
    );
    assert_eq!(
        forward.parent_span_id, route.span_id,
        "forward under route:\n{tree}"
    );
    assert_eq!(forward.kind, 3, "forward is a client span");
    assert_eq!(forward.attr("rpc.system"), Some("grpc"));
    assert_eq!(
        served.parent_span_id, forward.span_id,
        "the owner's server span is the forward's child:\n{tree}"
    );
    assert_eq!(served.kind, 2, "the owner's span is a server span");
    assert_eq!(
        actor.parent_span_id, served.span_id,
        "the actor works under the forwarded call:\n{tree}"
    );
    assert_eq!(
        commit.parent_span_id, actor.span_id,
        "a one-request batch commits under its request:\n{tree}"
    );
    assert!(
        commit
            .links
            .contains(&(trace_id.clone(), actor.span_id.clone())),
        "the commit links to every request of its batch:\n{tree}"
    );
    assert_eq!(commit.attr("backend"), Some("postgres"));
    for s in [http, route, forward, served, actor, commit] {
        assert_eq!(
            s.resource.get("service.name").map(String::as_str),
            Some("tether-under-test"),
            "OTEL_SERVICE_NAME names the service"
        );
    }
    // The actor's mailbox wait and the reconcile are in the trace too.
    let mailbox = get("actor.mailbox", "node-b");
    assert_eq!(mailbox.parent_span_id, served.span_id, "{tree}");
    let reconcile = get("reconcile", "node-b");
    assert_eq!(reconcile.parent_span_id, actor.span_id, "{tree}");
    // Gossip runs all the time between the two nodes, and is never traced.
    assert!(
        !spans
            .iter()
            .any(|s| s.name.contains("Gossip") || s.name.contains("tether.cluster")),
        "gossip spans were exported:\n{}",
        describe(&spans)
    );
    if ratio_sampling {
        // Spans end and are exported in order: the sampled-out requests, served first,
        // would have arrived by now. None of their spans was exported (nor the
        // registration's), on either node, and the owner logged the unsampled one under
        // its trace id.
        let request_path = |s: &Span| {
            s.name.starts_with("PUT ")
                || s.name.starts_with("POST ")
                || s.name.starts_with("tether.node.v1.Sets/")
                || s.name.starts_with("actor")
                || ["route", "forward put", "reconcile", "store.commit"].contains(&s.name.as_str())
        };
        let others: Vec<Span> = spans
            .iter()
            .filter(|s| s.trace_id != trace_id && request_path(s))
            .cloned()
            .collect();
        assert!(
            others.is_empty(),
            "spans of requests node-a's sampler left out were exported:\n{}",
            describe(&others)
        );
        let b_logs = b.node.stderr_all();
        assert!(
            b_logs
                .lines()
                .any(|l| l.contains("forwarded{")
                    && l.contains(&format!("trace_id={unsampled_trace}"))),
            "the owner did not log the unsampled request under its trace id:\n{b_logs}"
        );
    }
    // The answer names its request, and node-a's log lines of it carry both ids.
    let request_id = r.request_id();
    let logs = a.node.stderr_all();
    assert!(
        logs.lines()
            .any(|l| l.contains(&format!("request_id={request_id}"))
                && l.contains(&format!("trace_id={trace_id}"))),
        "no node-a log line names request {request_id} and trace {trace_id}:\n{logs}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_device_request_is_one_trace_across_nodes_over_grpc() {
    one_trace_across_two_nodes(Protocol::Grpc).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_device_request_is_one_trace_across_nodes_over_http_protobuf_flushed_on_drain() {
    one_trace_across_two_nodes(Protocol::HttpProtobuf).await;
}

/// Batched commits: several devices' concurrent writes to one set (a structure shared by
/// paired devices is the natural case; here one device's two buckets from concurrent
/// requests) commit in one transaction whose span links to each request's trace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_commit_links_to_every_request_in_it() {
    let collector = Collector::start(Protocol::Grpc).await;
    let node = Node::builder()
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", &collector.endpoint())
        .env("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
        .env("OTEL_BSP_SCHEDULE_DELAY", "100")
        .start()
        .await;
    let device = node.device("BATCH001");
    device.register_thermostat().await;
    // Concurrent writes queue behind the commit in flight and are committed together.
    let mut traces = BTreeMap::new();
    let mut tasks = Vec::new();
    for i in 0..40 {
        let trace = random_hex(16);
        let tp = format!("00-{trace}-{}-01", random_hex(8));
        traces.insert(trace, ());
        let d = device.clone();
        // Fields of the thermostat's templates (a write naming another field is refused).
        let (id, field) = if i % 2 == 0 {
            ("device.BATCH001", "current_temperature")
        } else {
            ("shared.BATCH001", "target_temperature")
        };
        tasks.push(tokio::spawn(async move {
            d.send(
                d.req(Method::PUT, &format!("/v1/buckets/{id}"))
                    .header("traceparent", tp)
                    .json(&json!({"value": {field: i}, "base_version": 0})),
            )
            .await
            .status
        }));
    }
    for t in tasks {
        assert_eq!(t.await.expect("join"), StatusCode::OK);
    }
    let spans = collector
        .wait_for(Duration::from_secs(30), |s| {
            s.iter()
                .filter(|s| s.name == "actor.put" && traces.contains_key(&s.trace_id))
                .count()
                == 40
        })
        .await;
    let commits: Vec<&Span> = spans
        .iter()
        .filter(|s| s.name == "store.commit" && s.links.iter().any(|(t, _)| traces.contains_key(t)))
        .collect();
    let batched = commits
        .iter()
        .find(|c| {
            c.links
                .iter()
                .filter(|(t, _)| traces.contains_key(t))
                .count()
                > 1
        })
        .unwrap_or_else(|| {
            panic!(
                "no commit batched two of the 40 concurrent writes:\n{}",
                describe(&spans)
            )
        });
    // Each link names a request's actor span in that request's own trace.
    for (t, s) in &batched.links {
        assert!(
            spans
                .iter()
                .any(|x| &x.trace_id == t && &x.span_id == s && x.name == "actor.put"),
            "link {t}/{s} names no actor.put span"
        );
    }
    assert_eq!(
        batched
            .attr("requests")
            .map(|r| r.parse::<usize>().expect("count")),
        Some(batched.links.len()),
        "one link per request in the batch"
    );
}

/// Logs: every line written while serving a request names its request id and trace id
/// (the caller's, from `traceparent`, even with export off), and a log collected in a file
/// has no ANSI colour codes.
#[tokio::test]
async fn log_lines_carry_request_and_trace_ids_and_no_colour_codes() {
    let node = Node::builder().env("TETHER_LOG", "debug").start().await;
    let device = node.device("LOG00001");
    device.register_thermostat().await;
    let trace_id = random_hex(16);
    let r = device
        .send(
            device
                .req(Method::PUT, "/v1/buckets/device.LOG00001")
                .header("traceparent", format!("00-{trace_id}-{}-01", random_hex(8)))
                .json(&json!({"value": {"hvac_state": "heating"}, "base_version": 0})),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let request_id = r.request_id();
    let answer: serde_json::Value = serde_json::from_slice(&r.body).expect("a JSON answer");
    // A held subscribe's line comes when it is answered, after its request was let go at
    // the hold (and with it, export off, the request's span): it names both ids too.
    let held_trace_id = random_hex(16);
    let held = device
        .send(
            device
                .req(Method::POST, "/v1/subscribe")
                .header(
                    "traceparent",
                    format!("00-{held_trace_id}-{}-01", random_hex(8)),
                )
                .json(&json!({
                    "buckets": [{"id": "device.LOG00001", "version": answer["version"]}],
                    "timeout_ms": 300,
                })),
        )
        .await;
    assert_eq!(held.status, StatusCode::OK, "{}", held.text());
    let held_request_id = held.request_id();
    let logs = node.stderr_all();
    let held_done: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains(&held_request_id) && l.contains("request done"))
        .collect();
    assert_eq!(
        held_done.len(),
        1,
        "one line ends the held subscribe:\n{logs}"
    );
    for field in [
        format!("trace_id={held_trace_id}"),
        "route=\"/v1/subscribe\"".to_string(),
        "status=200".to_string(),
    ] {
        assert!(
            held_done[0].contains(&field),
            "no {field} in {}",
            held_done[0]
        );
    }
    assert!(
        !logs.contains('\u{1b}'),
        "ANSI escape codes in a log file:\n{logs}"
    );
    let ours: Vec<&str> = logs.lines().filter(|l| l.contains(&request_id)).collect();
    // One line ends the PUT and says what it wrote (the write and access logs in one).
    let done: Vec<&&str> = ours.iter().filter(|l| l.contains("request done")).collect();
    assert_eq!(done.len(), 1, "one line ends the PUT:\n{logs}");
    let outcome = match answer["outcome"].as_str() {
        Some("applied") => "Applied",
        Some("merged") => "Merged",
        other => panic!("outcome {other:?}"),
    };
    for field in [
        "status=200".to_string(),
        "bucket=device.LOG00001".to_string(),
        format!("outcome={outcome}"),
        format!("version={}", answer["version"]),
        "op_id=\"-\"".to_string(),
        "replayed=false".to_string(),
    ] {
        assert!(done[0].contains(&field), "no {field} in {}", done[0]);
    }
    for l in &ours {
        assert!(
            l.contains(&format!("trace_id={trace_id}")),
            "a line of request {request_id} without its trace id: {l}"
        );
    }
    // Every line inside any request span carries both ids (requests without a
    // traceparent get a fresh trace id).
    for l in logs.lines().filter(|l| l.contains("request{")) {
        assert!(
            l.contains("request_id=") && l.contains("trace_id="),
            "a request's log line without its ids: {l}"
        );
    }
}
