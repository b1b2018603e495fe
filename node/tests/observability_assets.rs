//! The Grafana dashboard and the Prometheus alert rules shipped in
//! `helm/tether/files/` (issue 14) stay true to the node: every metric an alert or a
//! panel uses exists on a running node (a cluster member, so the cluster metrics are
//! there too), every panel's PromQL parses (`promtool check rules` on them as recording
//! rules), and the rules pass `promtool check rules` and their unit tests
//! (`node/tests/data/alerts.test.yaml`).
//!
//! promtool comes from Debian's `prometheus` package; `scripts/test` unpacks it under
//! `target/promtool` and exports `TETHER_PROMTOOL`. Missing, the test fails and says how to
//! get it.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use reqwest::{Method, StatusCode};
use serde_json::Value;
use tether_node::store::pg_server::PgServer;
use tether_test_support::node::*;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

fn promtool() -> PathBuf {
    let candidates = [
        std::env::var_os("TETHER_PROMTOOL").map(PathBuf::from),
        Some(repo().join("target/promtool/root/usr/bin/promtool")),
        Some(PathBuf::from("/usr/bin/promtool")),
    ];
    candidates
        .into_iter()
        .flatten()
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "promtool not found: run scripts/test (it unpacks Debian's prometheus package \
                 into target/promtool), or set TETHER_PROMTOOL"
            )
        })
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().expect("run promtool");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?} failed:\n{text}");
    text
}

fn rules_path() -> PathBuf {
    repo().join("helm/tether/files/alerts/tether.rules.yaml")
}

fn dashboard() -> Value {
    let path = repo().join("helm/tether/files/dashboards/tether.json");
    serde_json::from_str(&std::fs::read_to_string(&path).expect("read the dashboard"))
        .expect("the dashboard is JSON")
}

/// Every PromQL expression of the dashboard's panels.
fn panel_exprs(d: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for p in d["panels"].as_array().expect("panels") {
        for t in p["targets"].as_array().into_iter().flatten() {
            if let Some(e) = t["expr"].as_str() {
                out.push((
                    p["title"].as_str().unwrap_or("?").to_string(),
                    e.to_string(),
                ));
            }
        }
    }
    out
}

/// Metric names an expression reads (ours and the process collector's).
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let starts = (expr[i..].starts_with("tether_") || expr[i..].starts_with("process_"))
            && (i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_'));
        if starts {
            let end = expr[i..]
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .map_or(expr.len(), |n| i + n);
            names.insert(expr[i..end].to_string());
            i = end;
        } else {
            i += 1;
        }
    }
    names
}

/// The family a sample name belongs to (`x_bucket` → `x`, `x_total` → `x`).
fn family(name: &str) -> &str {
    ["_bucket", "_sum", "_count", "_total"]
        .iter()
        .find_map(|s| name.strip_suffix(s))
        .unwrap_or(name)
}

const SECRET: &str = "assets-test-secret-0123456789";

async fn member(id: &str, store: &str, join: Option<u16>, keyring: Option<&Node>) -> (Node, u16) {
    let grpc = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let mut b = Node::builder()
        .arg("--node-id")
        .arg(id)
        .arg("--store")
        .arg(store)
        .arg("--grpc-listen")
        .arg(format!("127.0.0.1:{grpc}"))
        .arg("--register-per-hour")
        .arg("1")
        .env("TETHER_CLUSTER_SECRET", SECRET);
    if let Some(seed) = join {
        b = b.arg("--join").arg(format!("127.0.0.1:{seed}"));
    }
    if let Some(k) = keyring {
        b = b.keyring(k.keyring());
    }
    (b.start().await, grpc)
}

async fn wait_members(node: &Node, n: f64) {
    node.wait_metric(
        "tether_cluster_members",
        std::time::Duration::from_secs(30),
        "the cluster formed",
        |v| v == n,
    )
    .await;
}

async fn families(node: &Node) -> BTreeSet<String> {
    let r = node
        .send(
            node.anon(Method::GET, "/metrics")
                .header("accept", "application/openmetrics-text"),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    r.text()
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

/// Two cluster members driven through what operators watch: devices registered and
/// written through the node that does not own their set (forwarding), a held subscribe
/// answered by another client's change (notification), a wrong secret (authentication
/// failure), a second factory registration within the hour (rate limit).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_dashboard_and_alerts_use_exists_on_a_running_node() {
    let pg = PgServer::start().expect("a private PostgreSQL server (installed by scripts/test)");
    let url = pg.url("assets").expect("database");
    let (a, grpc) = member("node-a", &url, None, None).await;
    let (b, _) = member("node-b", &url, Some(grpc), Some(&a)).await;
    wait_members(&a, 2.0).await;
    wait_members(&b, 2.0).await;
    // Devices on both owners, through node-a.
    let devices: Vec<Principal> = (0..6).map(|i| a.device(&format!("ASSET{i:03}"))).collect();
    for d in &devices {
        d.register_thermostat().await;
        let id = format!("device.{}", d.serial());
        assert_eq!(
            d.put(
                &id,
                &serde_json::json!({"value": {"hvac_state": "heating"}, "base_version": 0})
            )
            .await
            .status,
            StatusCode::OK
        );
    }
    let id = format!("shared.{}", devices[0].serial());
    let version = u64_of(&devices[0].bucket(&id).await, "version");
    let watcher = devices[0].clone();
    let watched = id.clone();
    let held = tokio::spawn(async move {
        watcher
            .subscribe(
                &serde_json::json!({"buckets": [{"id": watched, "version": version}], "timeout_ms": 20_000, "session": "w"}),
                std::time::Duration::from_secs(30),
            )
            .await
    });
    let started = std::time::Instant::now();
    while a.metric("tether_held_subscriptions").await.unwrap_or(0.0)
        + b.metric("tether_held_subscriptions").await.unwrap_or(0.0)
        < 1.0
    {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(10),
            "never held"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(
        devices[0]
            .put(
                &id,
                &serde_json::json!({"value": {"mode": "off"}, "base_version": version})
            )
            .await
            .status,
        StatusCode::OK
    );
    assert_eq!(held.await.expect("join").status, StatusCode::OK);
    let wrong = a.with_credentials(tether_proto::credentials::Credentials {
        id: "a.ASSET000".into(),
        secret: "a.wrongwrongwrongwrongw".into(),
    });
    assert_eq!(
        wrong.get("/v1/buckets").await.status,
        StatusCode::UNAUTHORIZED
    );
    let again = a.factory("ASSET001").register("thermostat", "1.0.0").await;
    assert_eq!(
        again.status,
        StatusCode::TOO_MANY_REQUESTS,
        "{}",
        again.text()
    );

    let mut exposed = families(&a).await;
    exposed.extend(families(&b).await);

    let rules = std::fs::read_to_string(rules_path()).expect("read the alert rules");
    let mut used: Vec<(String, String)> = metric_names(&rules)
        .into_iter()
        .map(|m| ("alert rules".to_string(), m))
        .collect();
    for (title, e) in panel_exprs(&dashboard()) {
        used.extend(
            metric_names(&e)
                .into_iter()
                .map(|m| (format!("panel {title:?}"), m)),
        );
    }
    assert!(used.len() > 30, "too few metric uses found: {used:?}");
    let missing: Vec<_> = used
        .iter()
        .filter(|(_, m)| !exposed.contains(family(m)))
        .collect();
    assert!(
        missing.is_empty(),
        "metrics used by the dashboard or the alerts that the node does not expose: {missing:#?}\nexposed: {exposed:#?}"
    );
}

#[test]
fn alert_rules_pass_promtool_and_their_unit_tests() {
    let promtool = promtool();
    run(Command::new(&promtool)
        .arg("check")
        .arg("rules")
        .arg(rules_path()));
    run(Command::new(&promtool)
        .current_dir(repo().join("node/tests/data"))
        .args(["test", "rules", "alerts.test.yaml"]));
}

#[test]
fn every_dashboard_query_is_valid_promql() {
    let exprs = panel_exprs(&dashboard());
    assert!(exprs.len() > 25, "the dashboard has its panels");
    // As recording rules, with Grafana's variables replaced by what they expand to.
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, (_, e)) in exprs.iter().enumerate() {
        let e = e
            .replace("$__rate_interval", "5m")
            .replace("$job", ".*")
            .replace("$instance", ".*");
        rules.push_str(&format!(
            "      - record: dashboard_query_{i}\n        expr: {}\n",
            serde_json::to_string(&e).expect("quote")
        ));
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("dashboard.rules.yaml");
    std::fs::write(&path, rules).expect("write");
    let out = run(Command::new(promtool())
        .arg("check")
        .arg("rules")
        .arg(&path));
    assert!(
        out.contains(&format!("{} rules found", exprs.len())),
        "{out}"
    );
}

#[test]
fn the_dashboard_is_a_grafana_dashboard_with_a_datasource_variable() {
    let d = dashboard();
    assert_eq!(d["uid"], "tether-overview");
    assert!(d["schemaVersion"].as_u64().is_some_and(|v| v >= 36));
    let vars: Vec<&str> = d["templating"]["list"]
        .as_array()
        .expect("templating")
        .iter()
        .filter_map(|v| v["name"].as_str())
        .collect();
    assert_eq!(vars, ["datasource", "job", "instance"]);
    let mut ids = BTreeSet::new();
    for p in d["panels"].as_array().expect("panels") {
        assert!(
            ids.insert(p["id"].as_u64().expect("panel id")),
            "duplicate panel id"
        );
        if p["type"] != "row" {
            assert_eq!(p["datasource"]["uid"], "${datasource}", "{}", p["title"]);
            assert!(
                p["description"].as_str().is_some_and(|s| !s.is_empty()),
                "{} has no description",
                p["title"]
            );
        }
    }
}
