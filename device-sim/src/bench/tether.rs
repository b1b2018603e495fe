//! A `tether serve` child for benchmarks, and the few raw API calls the benchmarks make.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use futures::stream::{self, StreamExt};
use reqwest::header::AUTHORIZATION;
use serde_json::json;
use tempfile::TempDir;
use tether_proto::credentials::{basic_header, default_credentials, Credentials};
use tokio::process::Command;

use super::procs::{spawn_listening, Server};
use crate::keys::read_mfg_key;
use crate::wire::set_credentials;

/// A running node with its manufacturing key.
#[derive(Debug)]
pub struct TetherNode {
    /// The process.
    pub server: Server,
    /// The key file given to `--mfg-key-file k1=…`.
    pub key_path: PathBuf,
    /// Its bytes.
    pub mfg_key: Vec<u8>,
}

/// Starts `tether serve` on a free loopback port with a fresh data directory and key,
/// per-principal limits lifted (a benchmark is one principal doing a lot), plus `extra`.
pub async fn start(bin: &Path, extra: &[&str]) -> Result<TetherNode> {
    let dir = TempDir::new()?;
    let key_path = dir.path().join("k1.key");
    generate_key(bin, &key_path).await?;
    start_in(bin, dir, key_path, extra).await
}

/// Like [`start`], with the manufacturing key at `key_path` (shared by a cluster's nodes).
pub async fn start_with_key(bin: &Path, key_path: &Path, extra: &[&str]) -> Result<TetherNode> {
    start_in(bin, TempDir::new()?, key_path.to_path_buf(), extra).await
}

/// Writes a new manufacturing key file with `tether admin mfg-key generate`.
pub async fn generate_key(bin: &Path, key_path: &Path) -> Result<()> {
    let st = Command::new(bin)
        .args(["admin", "mfg-key", "generate"])
        .arg(key_path)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .await
        .with_context(|| format!("running {}", bin.display()))?;
    if !st.success() {
        bail!("tether admin mfg-key generate failed: {st}");
    }
    Ok(())
}

async fn start_in(
    bin: &Path,
    dir: TempDir,
    key_path: PathBuf,
    extra: &[&str],
) -> Result<TetherNode> {
    let mfg_key = read_mfg_key(&key_path)?;
    let mut cmd = Command::new(bin);
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path().join("data"))
        .arg("--mfg-key-file")
        .arg(format!("k1={}", key_path.display()))
        .args(["--requests-per-second", "1000000"])
        // Every simulated device connects from this one machine.
        .args(["--max-connections-per-source", "1000000"])
        .args(["--register-per-hour", "1000000"])
        .args(extra);
    let (child, url) = spawn_listening(cmd, Duration::from_secs(30)).await?;
    let port = url
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    Ok(TetherNode {
        server: Server {
            name: "tether".to_string(),
            url,
            port,
            child,
            dir,
        },
        key_path,
        mfg_key,
    })
}

impl TetherNode {
    /// The base URL.
    pub fn url(&self) -> &str {
        &self.server.url
    }
}

/// Registers `serial` as a thermostat with its default credentials; its assigned set.
pub async fn register(
    http: &reqwest::Client,
    url: &str,
    mfg_key: &[u8],
    serial: &str,
) -> Result<Credentials> {
    let default = default_credentials(mfg_key, serial, "k1")?;
    let mut last = String::new();
    for attempt in 0..5u32 {
        let r = http
            .post(format!("{url}/v1/register"))
            .header(AUTHORIZATION, basic_header(&default))
            .json(&json!({"device_id": serial, "device_type": "thermostat", "sw_version": "1.0.0"}))
            .timeout(Duration::from_secs(30))
            .send()
            .await;
        match r {
            Ok(r) if r.status().is_success() => {
                return set_credentials(r.headers())
                    .context("registration answered without X-Tether-Set-Credentials");
            }
            Ok(r) => last = format!("status {}", r.status()),
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(100 << attempt)).await;
    }
    bail!("registering {serial}: {last}")
}

/// Registers `n` devices `<prefix><i:06>` with `concurrency` requests in flight.
pub async fn register_many(
    http: &reqwest::Client,
    url: &str,
    mfg_key: &[u8],
    prefix: &str,
    n: usize,
    concurrency: usize,
) -> Result<Vec<(String, Credentials)>> {
    stream::iter(0..n)
        .map(|i| {
            let serial = format!("{prefix}{i:06}");
            async move {
                let c = register(http, url, mfg_key, &serial).await?;
                Ok::<_, anyhow::Error>((serial, c))
            }
        })
        .buffered(concurrency)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect()
}

/// Sum of all series of metric `name` in Prometheus text.
pub use tether_node::metrics::sample_sum as metric_value;

/// `GET /metrics` and the value of `name`.
pub async fn metric(http: &reqwest::Client, url: &str, name: &str) -> Option<f64> {
    let text = http
        .get(format!("{url}/metrics"))
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    metric_value(&text, name)
}

/// Waits until every node in `nodes` answers `/readyz` with `members` members (60 s at
/// most).
pub async fn wait_members(
    http: &reqwest::Client,
    nodes: &[&TetherNode],
    members: usize,
) -> Result<()> {
    let until = std::time::Instant::now() + Duration::from_secs(60);
    for node in nodes {
        loop {
            let body: Option<serde_json::Value> =
                match http.get(format!("{}/readyz", node.url())).send().await {
                    Ok(r) if r.status().is_success() => r.json().await.ok(),
                    _ => None,
                };
            if body.is_some_and(|b| b["members"] == json!(members)) {
                break;
            }
            if std::time::Instant::now() >= until {
                bail!(
                    "{} did not see {members} cluster members within 60 s",
                    node.url()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    Ok(())
}

/// Nodes in cluster mode on a private PostgreSQL, sharing one manufacturing key and one
/// cluster secret; a node can be killed (`kill -9`) and started again under its id.
#[derive(Debug)]
pub struct Cluster {
    bin: PathBuf,
    store: String,
    /// The store's database (named after the cluster's prefix).
    database: String,
    key: PathBuf,
    secret: String,
    ids: Vec<String>,
    grpc: Vec<String>,
    /// More arguments for every node (`--http-workers 1`, …).
    node_args: Vec<String>,
    nodes: Vec<Option<TetherNode>>,
    // Dropped last: the nodes stop before their store and files go.
    _shared: TempDir,
    /// The delaying proxy in front of the store, if any.
    _delay: Option<super::delay::DelayProxy>,
    pg: tether_node::store::pg_server::PgServer,
}

impl Cluster {
    /// Starts PostgreSQL and `n` nodes `<prefix>-<i>`, each joining the first, and waits
    /// until every node sees all of them.
    pub async fn start(bin: &Path, n: usize, prefix: &str) -> Result<Self> {
        Self::start_with(bin, n, prefix, &[], &[], Duration::ZERO).await
    }

    /// [`Self::start`], every node started with `node_args` too, PostgreSQL with
    /// `pg_settings` (`-c name=value`), and the nodes' store connections through a proxy
    /// that holds every chunk `store_delay` each way when it is not zero (a store that far
    /// away).
    pub async fn start_with(
        bin: &Path,
        n: usize,
        prefix: &str,
        node_args: &[String],
        pg_settings: &[(String, String)],
        store_delay: Duration,
    ) -> Result<Self> {
        let pg = tether_node::store::pg_server::PgServer::start_with(
            tether_node::store::pg_server::PgOptions {
                settings: pg_settings.to_vec(),
                ..Default::default()
            },
        )
        .context("starting a private PostgreSQL (apt-get install postgresql)")?;
        let mut store = pg.url(prefix).context("creating the benchmark database")?;
        let delay = if store_delay.is_zero() {
            None
        } else {
            let pg_addr = std::net::SocketAddr::from(([127, 0, 0, 1], pg.port()));
            let proxy = super::delay::start(pg_addr, store_delay).await?;
            store = store.replacen(
                &format!(":{}/", pg.port()),
                &format!(":{}/", proxy.addr.port()),
                1,
            );
            Some(proxy)
        };
        let shared = TempDir::new()?;
        let key = shared.path().join("k1.key");
        generate_key(bin, &key).await?;
        let secret = shared.path().join("cluster.secret");
        std::fs::write(&secret, format!("{:032x}", rand::random::<u128>()))?;
        let mut grpc = Vec::new();
        for _ in 0..n {
            grpc.push(
                std::net::TcpListener::bind("127.0.0.1:0")?
                    .local_addr()?
                    .to_string(),
            );
        }
        let mut cluster = Cluster {
            bin: bin.to_path_buf(),
            store,
            database: prefix.to_string(),
            key,
            secret: secret.display().to_string(),
            ids: (0..n).map(|i| format!("{prefix}-{i}")).collect(),
            grpc,
            node_args: node_args.to_vec(),
            nodes: (0..n).map(|_| None).collect(),
            _shared: shared,
            _delay: delay,
            pg,
        };
        for i in 0..n {
            cluster.start_node(i).await?;
        }
        cluster.wait_members(n).await?;
        Ok(cluster)
    }

    /// Starts node `i` (again), joining another node.
    pub async fn start_node(&mut self, i: usize) -> Result<()> {
        let join = self.grpc[if i == 0 { 1 % self.grpc.len() } else { 0 }].clone();
        let mut extra = vec![
            "--node-id",
            &self.ids[i],
            "--store",
            &self.store,
            "--grpc-listen",
            &self.grpc[i],
            "--cluster-secret-file",
            &self.secret,
        ];
        // The first node of a new cluster joins nobody.
        if i != 0 || self.nodes.iter().any(Option::is_some) {
            extra.extend(["--join", join.as_str()]);
        }
        extra.extend(self.node_args.iter().map(String::as_str));
        let node = start_with_key(&self.bin, &self.key, &extra).await?;
        self.nodes[i] = Some(node);
        Ok(())
    }

    /// `kill -9` of node `i`.
    pub async fn kill(&mut self, i: usize) {
        if let Some(node) = self.nodes[i].take() {
            node.server.stop().await;
        }
    }

    /// Waits until every running node sees `members` members.
    pub async fn wait_members(&self, members: usize) -> Result<()> {
        let running: Vec<&TetherNode> = self.nodes.iter().flatten().collect();
        wait_members(&reqwest::Client::new(), &running, members).await
    }

    /// The running nodes.
    pub fn nodes(&self) -> Vec<&TetherNode> {
        self.nodes.iter().flatten().collect()
    }

    /// Node `i`, when running.
    pub fn node(&self, i: usize) -> Option<&TetherNode> {
        self.nodes[i].as_ref()
    }

    /// Each set's owner as the store's lease table has it: (set key, node id), sets
    /// taken by a node only (a registered set nobody has activated yet has no owner).
    pub fn owners(&self) -> Result<Vec<(String, String)>> {
        let rows = self
            .pg
            .psql_in(
                &self.database,
                "SELECT set_key || ' ' || owner FROM tether_leases WHERE owner <> ''",
            )
            .context("reading the lease table")?;
        Ok(rows
            .lines()
            .filter_map(|l| l.split_once(' '))
            .map(|(set, owner)| (set.to_string(), owner.to_string()))
            .collect())
    }

    /// The node ids, by index.
    pub fn ids(&self) -> &[String] {
        &self.ids
    }

    /// The store's (PostgreSQL's postmaster's) process id.
    pub fn store_pid(&self) -> Option<u32> {
        self.pg.postmaster_pid()
    }
}
