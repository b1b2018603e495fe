//! `tether serve --store postgres://…`: the node runs on a real, private PostgreSQL server
//! (started by the test), and acknowledged writes survive both a `kill -9` of the node
//! and an immediate stop of the database.

use std::time::Duration;

use serde_json::json;
use tether_node::store::pg_server::PgServer;
use tether_test_support::node::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_on_postgres_keeps_acknowledged_writes_across_node_and_database_crashes() {
    let pg = PgServer::start().expect("a private PostgreSQL server (installed by scripts/test)");
    let url = pg.url("tether").expect("database");
    let mut node = Node::builder()
        .arg("--store")
        .arg(url.clone())
        .start()
        .await;
    let dev = node.device("PG0001");
    dev.register_thermostat().await;
    let mut acked = Vec::new();
    for i in 0..20u64 {
        let (_, v) = dev
            .write("shared.PG0001", json!({"target_temperature": i}), i + 1)
            .await;
        acked.push(v);
    }
    assert_eq!(acked.last().copied(), Some(21));
    let keyring = node.keyring();
    node.kill9().await;

    // The database crashes too; committed transactions are in its WAL.
    pg.restart().expect("restart PostgreSQL");

    let node = Node::builder()
        .arg("--store")
        .arg(url)
        .keyring(keyring)
        .start()
        .await;
    let dev = node.device("PG0001");
    let b = within(
        Duration::from_secs(10),
        "read after restart",
        dev.bucket("shared.PG0001"),
    )
    .await;
    assert_eq!(
        u64_of(&b, "version"),
        21,
        "last acknowledged version is stored: {b}"
    );
    assert_eq!(b["value"]["target_temperature"], json!(19));
    // The node keeps going: the next write gets the next version.
    let (_, v) = dev
        .write("shared.PG0001", json!({"target_temperature": 42}), 21)
        .await;
    assert_eq!(v, 22);
}
