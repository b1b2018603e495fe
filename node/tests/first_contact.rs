//! Issue 16: first contacts of new devices on a node over PostgreSQL go through the
//! batched registration (`Store::register_new`: credentials, bucket set and device record
//! in one transaction shared with concurrent registrations). Through the real binary on a
//! real, private PostgreSQL server.

use std::time::Duration;

use futures::StreamExt;
use reqwest::StatusCode;
use serde_json::{json, Value};
use tether_node::store::pg_server::PgServer;
use tether_test_support::node::*;

/// Devices registered at once.
const BURST: usize = 500;

async fn node_on_postgres(pg: &PgServer, db: &str) -> Node {
    let url = pg.url(db).expect("database");
    Node::builder()
        .arg("--store")
        .arg(url)
        // The whole burst connects at once from one address.
        .arg("--max-connections-per-source")
        .arg("2048")
        .start()
        .await
}

/// Every bucket of the thermostat template, as a new device finds it: version 1, each
/// template field present and null, one `created` change by the server in its log.
async fn assert_fresh_buckets(dev: &Principal) {
    let serial = dev.serial().to_string();
    let listed = dev
        .get("/v1/buckets?view=full")
        .await
        .expect_json(StatusCode::OK);
    let mut ids = ids_of(&listed);
    ids.sort();
    assert_eq!(ids, thermostat_buckets(&serial), "{serial}: {listed}");
    for b in buckets_of(&listed) {
        assert_eq!(u64_of(&b, "version"), 1, "{serial}: {b}");
        let value = b["value"].as_object().expect("value object");
        assert!(
            !value.is_empty() && value.values().all(Value::is_null),
            "{serial}: template fields, null: {b}"
        );
        let id = b["id"].as_str().expect("id");
        let history = dev
            .get(&format!("/v1/buckets/{id}/history"))
            .await
            .expect_json(StatusCode::OK);
        let changes = history["changes"].as_array().expect("changes");
        assert_eq!(changes.len(), 1, "{id}: {history}");
        assert_eq!(changes[0]["outcome"], json!("created"), "{id}: {history}");
        assert_eq!(changes[0]["version"], json!(1), "{id}: {history}");
    }
}

/// 500 new devices register at once through one node on PostgreSQL; every one gets its
/// assigned credentials, authenticates with them and reads its default buckets (created
/// with their log).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_cold_registrations_on_postgres_all_authenticate_and_read_their_buckets() {
    let pg = PgServer::start().expect("a private PostgreSQL server (installed by scripts/test)");
    let node = node_on_postgres(&pg, "burst").await;
    let serials: Vec<String> = (0..BURST).map(|i| format!("BURST{i:04}")).collect();
    let registered: Vec<_> = serials
        .iter()
        .map(|s| {
            let dev = node.device(s);
            tokio::spawn(async move {
                let r = dev.register("thermostat", "1.0.0").await;
                (dev, r)
            })
        })
        .collect();
    let mut devices = Vec::with_capacity(BURST);
    for task in registered {
        let (dev, r) = task.await.expect("registration task");
        let body = r.json();
        assert_eq!(r.status, StatusCode::OK, "{}: {body}", dev.serial());
        let mut buckets: Vec<String> = serde_json::from_value(body["buckets"].clone())
            .unwrap_or_else(|e| panic!("{}: {body}: {e}", dev.serial()));
        buckets.sort();
        assert_eq!(buckets, thermostat_buckets(dev.serial()), "{body}");
        assert!(
            set_credentials_of(&r).is_some(),
            "{}: first contact hands out assigned credentials",
            dev.serial()
        );
        devices.push(dev);
    }
    // Each device from now on presents only its assigned credentials.
    let checks = futures::stream::iter(devices.iter().map(|d| {
        let serial = d.serial().to_string();
        let assigned = node.assigned(&serial);
        async move { assert_fresh_buckets(&assigned).await }
    }))
    .buffer_unordered(32)
    .collect::<Vec<()>>();
    within(
        Duration::from_secs(300),
        "every device reads its buckets",
        checks,
    )
    .await;
}

/// A device registering again keeps today's behaviour: with its default credentials (the
/// lost-credentials case) it gets a new assigned set, the old one stops working, and its
/// buckets are kept as they are (not created again); with its assigned credentials it is
/// told its buckets and gets no new credentials.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registering_again_on_postgres_keeps_the_set_and_replaces_only_lost_credentials() {
    const D: &str = "AGAIN001";
    let pg = PgServer::start().expect("a private PostgreSQL server (installed by scripts/test)");
    let node = node_on_postgres(&pg, "again").await;
    let dev = node.device(D);
    dev.register_thermostat().await;
    let first = dev.assigned_credentials().expect("assigned");
    let id = format!("shared.{D}");
    let (_, v) = dev.write(&id, json!({"mode": "heat"}), 1).await;
    assert_eq!(v, 2);

    // Assigned credentials: the same set stays, nothing is issued, the set is kept.
    let r = node.assigned(D).register("thermostat", "1.0.0").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert!(
        set_credentials_of(&r).is_none(),
        "nothing new for a device that holds its set"
    );
    let b = dev.bucket(&id).await;
    assert_eq!(
        (u64_of(&b, "version"), &b["value"]["mode"]),
        (2, &json!("heat"))
    );

    // Default credentials again: the lost-credentials case.
    let r = node.factory(D).register("thermostat", "1.0.0").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let second = set_credentials_of(&r).expect("a new assigned set");
    assert_ne!(second.secret, first.secret);
    let old = node.with_credentials(first);
    old.get(&format!("/v1/buckets/{id}"))
        .await
        .expect_error(StatusCode::UNAUTHORIZED, "unauthorized");
    let now = node.with_credentials(second);
    let b = now
        .get(&format!("/v1/buckets/{id}"))
        .await
        .expect_json(StatusCode::OK);
    assert_eq!(
        (u64_of(&b, "version"), &b["value"]["mode"]),
        (2, &json!("heat")),
        "the set is kept, not created again: {b}"
    );
    let history = now
        .get(&format!("/v1/buckets/{id}/history"))
        .await
        .expect_json(StatusCode::OK);
    let outcomes: Vec<&Value> = history["changes"]
        .as_array()
        .expect("changes")
        .iter()
        .map(|c| &c["outcome"])
        .collect();
    assert_eq!(
        outcomes,
        [&json!("created"), &json!("applied")],
        "{history}"
    );
}
