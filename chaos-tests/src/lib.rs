//! Chaos scenarios for a Tether cluster: a harness that runs a real cluster on loopback —
//! a private PostgreSQL, N `tether serve` processes in cluster mode and HAProxy in front —
//! and lets a test add nodes, `kill -9` or SIGTERM them, and read their metrics while
//! clients talk to the load balancer only.
//!
//! - **Nodes** get free loopback ports for HTTP and gRPC, a data directory each, the same
//!   manufacturing key (`k1`) and cluster secret, `--public-url` = the load balancer (so
//!   devices are told to sync through it), and a per-principal rate limit high enough for
//!   load tests. A node started later joins through the first live node's gRPC port.
//! - **HAProxy** (`/usr/sbin/haproxy`, Debian `haproxy`) round-robins over every node slot
//!   the cluster may ever use; slots not started yet are declared `disabled` and enabled
//!   over the admin socket when their node is ready. Health checks ask `GET /readyz`
//!   every 500 ms (down after 2 failures, up after 1 success). Only connection failures
//!   are retried (and redispatched to another node): a PUT that reached a node is never
//!   sent twice.
//! - Every wait is bounded and fails loudly, with the tail of the node's stderr. Dropping
//!   the [`Cluster`] kills every process (also when the test panics: then the stderr
//!   tails are printed); the PostgreSQL server stops when its [`PgServer`] drops.
//! - A missing HAProxy or PostgreSQL fails the test with the package to install; nothing
//!   is skipped.

pub mod checker;
pub mod cli;
pub mod error;
pub mod history;
pub mod report;

use std::collections::{BTreeMap, HashSet};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command as StdCommand, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rand::RngCore;
use reqwest::header::AUTHORIZATION;
use reqwest::StatusCode;
use tether_cluster::{NodeId, Ring};
use tether_node::store::pg_server::PgServer;
use tether_node::store::postgres::PostgresStore;
use tether_node::store::{Store, UserRecord};
use tether_proto::credentials::{
    basic_header, default_credentials, parse_set_credentials, secret_hash, user_secret,
    Credentials, SET_CREDENTIALS_HEADER,
};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};
use tokio::time::Instant;

/// The HAProxy binary the harness runs.
pub const HAPROXY: &str = "/usr/sbin/haproxy";
/// The manufacturing key id of every node (`--mfg-key-file k1=…`).
pub const KEY_ID: &str = "k1";
/// How long a node may take to print its `listening on` line.
pub const STARTUP_DEADLINE: Duration = Duration::from_secs(30);
/// How long a node may take to answer `/readyz` with 200 after listening.
pub const READY_DEADLINE: Duration = Duration::from_secs(30);
/// How long HAProxy may take to see a ready node as up.
pub const LB_DEADLINE: Duration = Duration::from_secs(15);
/// Bound for a plain request (not a held subscribe).
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(10);
/// The HAProxy backend name (for the admin socket).
const BACKEND: &str = "tether";

/// How to start a [`Cluster`].
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// Nodes started at once (the first one starts the cluster, the others join it).
    pub nodes: usize,
    /// Node slots HAProxy knows of; [`Cluster::add_node`] can start `max_nodes - nodes`
    /// more.
    pub max_nodes: usize,
    /// App users created in the store before the nodes start (`u.<name>`).
    pub users: Vec<String>,
}

impl ClusterOptions {
    /// `nodes` nodes, room for `max_nodes`, no users.
    pub fn new(nodes: usize, max_nodes: usize) -> Self {
        ClusterOptions {
            nodes,
            max_nodes: max_nodes.max(nodes),
            users: Vec::new(),
        }
    }
}

/// What became of a node slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeState {
    /// Not started yet (HAProxy has it disabled).
    Spare,
    /// Running.
    Running,
    /// Killed with SIGKILL.
    Killed,
    /// Sent SIGTERM (draining or exited).
    Terminated,
}

/// One node slot: its ports, and its process once started.
#[derive(Debug)]
struct Slot {
    name: String,
    http_port: u16,
    grpc_port: u16,
    data_dir: PathBuf,
    stderr_path: PathBuf,
    child: Option<Child>,
    state: NodeState,
}

/// A running cluster behind HAProxy. Dropping it kills every process.
#[derive(Debug)]
pub struct Cluster {
    slots: Vec<Slot>,
    haproxy: Option<Child>,
    haproxy_stderr: PathBuf,
    haproxy_socket: PathBuf,
    lb_port: u16,
    tether: PathBuf,
    store_url: String,
    secret: String,
    mfg_key_path: PathBuf,
    mfg_key: Vec<u8>,
    users: Vec<Credentials>,
    http: reqwest::Client,
    // Dropped after the processes are killed (Drop below), in this order.
    _pg: PgServer,
    dir: tempfile::TempDir,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for s in &mut self.slots {
            if let Some(c) = s.child.as_mut() {
                let _ = c.start_kill();
            }
        }
        if let Some(h) = self.haproxy.as_mut() {
            let _ = h.start_kill();
        }
        if std::thread::panicking() {
            for s in &self.slots {
                if s.state != NodeState::Spare {
                    eprintln!(
                        "---- {} ({:?}, http {}) stderr tail ----\n{}\n---- end ----",
                        s.name,
                        s.state,
                        s.http_port,
                        tail(&s.stderr_path)
                    );
                }
            }
            eprintln!(
                "---- haproxy stderr tail ----\n{}\n---- end ----",
                tail(&self.haproxy_stderr)
            );
        }
    }
}

/// Awaits `fut` or panics with `what` after `limit`.
pub async fn within<T>(
    limit: Duration,
    what: &str,
    fut: impl std::future::Future<Output = T>,
) -> T {
    match tokio::time::timeout(limit, fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {limit:?}: {what}"),
    }
}

/// The last few KB of a log file.
pub fn tail(path: &Path) -> String {
    let s = std::fs::read_to_string(path).unwrap_or_default();
    let start = s.len().saturating_sub(6000);
    let start = (start..=s.len())
        .find(|i| s.is_char_boundary(*i))
        .unwrap_or(s.len());
    s[start..].to_string()
}

/// Sum of the samples of metric `name` (any labels) in Prometheus text; `None` if absent.
pub use tether_node::metrics::sample_sum as metric_value;

/// A loopback port nothing listens on right now, never handed out twice by this process.
pub fn free_port() -> u16 {
    static HANDED: OnceLock<Mutex<HashSet<u16>>> = OnceLock::new();
    let handed = HANDED.get_or_init(|| Mutex::new(HashSet::new()));
    for _ in 0..100 {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("bind a loopback port")
            .port();
        if handed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(port)
        {
            return port;
        }
    }
    panic!("no free loopback port after 100 tries");
}

/// Builds the `tether` binary (a no-op when it is up to date) with the cargo running the
/// tests and returns its path; once per process. A failed build fails the test.
pub fn tether_binary() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        tether_test_support::bin::cargo_binary("tether-node", "tether")
            .unwrap_or_else(|e| panic!("building the tether binary: {e:#}"))
    })
    .clone()
}

fn require_haproxy() {
    assert!(
        Path::new(HAPROXY).exists(),
        "HAProxy is not installed ({HAPROXY} missing): install the Debian package `haproxy` \
         (scripts/test installs it). The cluster tests need a real load balancer and are never \
         skipped."
    );
}

fn start_postgres() -> PgServer {
    PgServer::start().unwrap_or_else(|e| {
        panic!(
            "could not start a private PostgreSQL server: {e}. Install the Debian package \
             `postgresql` (scripts/test installs it) or set TETHER_PG_BIN. The cluster tests \
             need a shared store and are never skipped."
        )
    })
}

/// The HAProxy configuration for `slots` (started or not) behind `lb_port`.
fn haproxy_config(lb_port: u16, socket: &Path, slots: &[(String, u16, bool)]) -> String {
    let mut servers = String::new();
    for (name, port, enabled) in slots {
        let disabled = if *enabled { "" } else { " disabled" };
        servers.push_str(&format!(
            "    server {name} 127.0.0.1:{port} check{disabled}\n"
        ));
    }
    format!(
        "# Written by tether-chaos-tests.
global
    maxconn 4096
    stats socket {socket} mode 600 level admin

defaults
    mode http
    timeout connect 500ms
    # Held subscribes stay open for their whole timeout_ms.
    timeout client 120s
    timeout server 120s
    timeout http-request 10s
    timeout queue 5s
    # Retry (on another node) only when no connection could be made: the request never
    # reached a node, so even a PUT is safe to send again. Never on empty responses or
    # timeouts: a PUT is not idempotent.
    retries 3
    retry-on conn-failure
    option redispatch 1

frontend api
    bind 127.0.0.1:{lb_port}
    default_backend {BACKEND}

backend {BACKEND}
    balance roundrobin
    option httpchk
    http-check send meth GET uri /readyz
    http-check expect status 200
    default-server inter 500ms fall 2 rise 1
{servers}",
        socket = socket.display(),
    )
}

/// Sends one command to HAProxy's admin socket and returns the answer.
async fn haproxy_command(socket: &Path, cmd: &str) -> String {
    within(REQUEST_DEADLINE, "HAProxy admin socket", async {
        let mut s = tokio::net::UnixStream::connect(socket)
            .await
            .unwrap_or_else(|e| panic!("connect to HAProxy's socket {}: {e}", socket.display()));
        s.write_all(format!("{cmd}\n").as_bytes())
            .await
            .expect("write to HAProxy's socket");
        let mut out = String::new();
        s.read_to_string(&mut out)
            .await
            .expect("read HAProxy's answer");
        out
    })
    .await
}

impl Cluster {
    /// Starts PostgreSQL, `opts.nodes` nodes (waiting until each is ready) and HAProxy
    /// (waiting until it sees every node up).
    pub async fn start(opts: ClusterOptions) -> Cluster {
        require_haproxy();
        assert!(opts.nodes >= 1, "a cluster has at least one node");
        let tether = tokio::task::spawn_blocking(tether_binary)
            .await
            .expect("build tether");
        let pg = tokio::task::spawn_blocking(start_postgres)
            .await
            .expect("start PostgreSQL");
        let store_url = pg.url("tether").expect("create the tether database");
        let dir = tempfile::tempdir().expect("cluster tempdir");

        // One manufacturing key for every node, written by the real admin command.
        let mfg_key_path = dir.path().join("k1.key");
        let out = StdCommand::new(&tether)
            .args(["admin", "mfg-key", "generate"])
            .arg(&mfg_key_path)
            .output()
            .expect("run tether admin mfg-key generate");
        assert!(
            out.status.success(),
            "tether admin mfg-key generate: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mfg_key = read_hex_key(&mfg_key_path);

        let users = create_users(&store_url, &opts.users).await;

        let mut random = [0u8; 24];
        rand::rng().fill_bytes(&mut random);
        let secret: String = random.iter().map(|b| format!("{b:02x}")).collect();

        let lb_port = free_port();
        let slots = (0..opts.max_nodes)
            .map(|i| {
                let name = format!("n{i}");
                Slot {
                    data_dir: dir.path().join(&name),
                    stderr_path: dir.path().join(format!("{name}.stderr.log")),
                    name,
                    http_port: free_port(),
                    grpc_port: free_port(),
                    child: None,
                    state: NodeState::Spare,
                }
            })
            .collect();
        let haproxy_socket = dir.path().join("haproxy.sock");
        let haproxy_stderr = dir.path().join("haproxy.stderr.log");
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(64)
            .build()
            .expect("build HTTP client");
        let mut cluster = Cluster {
            slots,
            haproxy: None,
            haproxy_stderr,
            haproxy_socket,
            lb_port,
            tether,
            store_url,
            secret,
            mfg_key_path,
            mfg_key,
            users,
            http,
            _pg: pg,
            dir,
        };

        cluster.spawn_node(0, None).await;
        cluster.wait_ready(0).await;
        let seed = cluster.slots[0].grpc_port;
        for i in 1..opts.nodes {
            cluster.spawn_node(i, Some(seed)).await;
        }
        for i in 1..opts.nodes {
            cluster.wait_ready(i).await;
        }
        cluster.start_haproxy(opts.nodes).await;
        for i in 0..opts.nodes {
            cluster.wait_lb_up(i).await;
        }
        cluster
    }

    /// Starts the node of slot `i`, joining through gRPC port `join` (none: it starts
    /// the cluster), and waits for its `listening on` line.
    async fn spawn_node(&mut self, i: usize, join: Option<u16>) {
        let lb = self.lb_url();
        let key = format!("{KEY_ID}={}", self.mfg_key_path.display());
        let s = &mut self.slots[i];
        std::fs::create_dir_all(&s.data_dir).expect("node data dir");
        let stderr = std::fs::File::create(&s.stderr_path).expect("node stderr log");
        let mut cmd = Command::new(&self.tether);
        cmd.arg("serve")
            .args(["--node-id", &s.name])
            .args(["--listen", &format!("127.0.0.1:{}", s.http_port)])
            .args(["--grpc-listen", &format!("127.0.0.1:{}", s.grpc_port)]);
        if let Some(seed) = join {
            cmd.args(["--join", &format!("127.0.0.1:{seed}")]);
        }
        cmd.args(["--store", &self.store_url])
            .args(["--public-url", &lb])
            .arg("--data-dir")
            .arg(&s.data_dir)
            .args(["--mfg-key-file", &key])
            .args(["--requests-per-second", "100000"])
            // HAProxy, on this machine, is the load balancer: per-source limits apply to
            // the clients it forwards for, not to it.
            .args(["--trusted-proxies", "127.0.0.1"])
            .env("TETHER_CLUSTER_SECRET", &self.secret)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(stderr))
            .kill_on_drop(true);
        let mut child = cmd.spawn().expect("spawn tether serve");
        let stdout = child.stdout.take().expect("node stdout");
        let mut lines = BufReader::new(stdout).lines();
        let first = tokio::time::timeout(STARTUP_DEADLINE, lines.next_line()).await;
        let expected = format!("listening on http://127.0.0.1:{}", s.http_port);
        let line = match first {
            Ok(Ok(Some(l))) => l,
            Ok(Ok(None)) => {
                let status = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
                panic!(
                    "node {} exited before listening ({status:?}); stderr:\n{}",
                    s.name,
                    tail(&s.stderr_path)
                );
            }
            Ok(Err(e)) => panic!("node {}: reading stdout: {e}", s.name),
            Err(_) => panic!(
                "node {} printed nothing within {STARTUP_DEADLINE:?}; stderr:\n{}",
                s.name,
                tail(&s.stderr_path)
            ),
        };
        assert_eq!(
            line,
            expected,
            "node {}: first stdout line; stderr:\n{}",
            s.name,
            tail(&s.stderr_path)
        );
        // Keep stdout drained (nothing more is expected on it).
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        s.child = Some(child);
        s.state = NodeState::Running;
    }

    /// Polls `/readyz` of node `i` until 200; panics (with its stderr) if it exits or
    /// does not become ready within [`READY_DEADLINE`].
    pub async fn wait_ready(&mut self, i: usize) {
        let deadline = Instant::now() + READY_DEADLINE;
        let url = self.node_url(i, "/readyz");
        loop {
            let s = &mut self.slots[i];
            if let Some(status) = s.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!(
                    "node {} exited ({status}) before it was ready; stderr:\n{}",
                    s.name,
                    tail(&s.stderr_path)
                );
            }
            let last = match self
                .http
                .get(&url)
                .timeout(Duration::from_secs(2))
                .send()
                .await
            {
                Ok(r) if r.status() == StatusCode::OK => return,
                Ok(r) => {
                    let status = r.status();
                    format!("{status} {}", r.text().await.unwrap_or_default())
                }
                Err(e) => format!("request failed: {e}"),
            };
            if Instant::now() >= deadline {
                let s = &self.slots[i];
                panic!(
                    "node {} not ready within {READY_DEADLINE:?} (last /readyz: {last}); stderr:\n{}",
                    s.name,
                    tail(&s.stderr_path)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn start_haproxy(&mut self, enabled: usize) {
        let slots: Vec<(String, u16, bool)> = self
            .slots
            .iter()
            .enumerate()
            .map(|(i, s)| (s.name.clone(), s.http_port, i < enabled))
            .collect();
        let cfg_path = self.dir.path().join("haproxy.cfg");
        std::fs::write(
            &cfg_path,
            haproxy_config(self.lb_port, &self.haproxy_socket, &slots),
        )
        .expect("write haproxy.cfg");
        let check = StdCommand::new(HAPROXY)
            .arg("-c")
            .arg("-f")
            .arg(&cfg_path)
            .output()
            .unwrap_or_else(|e| panic!("run {HAPROXY} -c: {e}"));
        assert!(
            check.status.success(),
            "haproxy rejects its configuration: {}{}",
            String::from_utf8_lossy(&check.stdout),
            String::from_utf8_lossy(&check.stderr)
        );
        let stderr = std::fs::File::create(&self.haproxy_stderr).expect("haproxy stderr log");
        let child = Command::new(HAPROXY)
            .arg("-db")
            .arg("-f")
            .arg(&cfg_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(stderr))
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {HAPROXY}: {e}"));
        self.haproxy = Some(child);
        let deadline = Instant::now() + LB_DEADLINE;
        loop {
            if tokio::net::TcpStream::connect(("127.0.0.1", self.lb_port))
                .await
                .is_ok()
                && self.haproxy_socket.exists()
            {
                return;
            }
            if let Some(status) = self
                .haproxy
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "haproxy exited ({status}); stderr:\n{}",
                    tail(&self.haproxy_stderr)
                );
            }
            assert!(
                Instant::now() < deadline,
                "haproxy did not listen on {} within {LB_DEADLINE:?}; stderr:\n{}",
                self.lb_port,
                tail(&self.haproxy_stderr)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// HAProxy's view of each node slot: `name → status` (`UP`, `DOWN`, `MAINT`, …).
    pub async fn lb_status(&self) -> BTreeMap<String, String> {
        let csv = haproxy_command(&self.haproxy_socket, "show stat").await;
        let mut lines = csv.lines();
        let header: Vec<&str> = lines
            .next()
            .unwrap_or_default()
            .trim_start_matches("# ")
            .split(',')
            .collect();
        let col = |name: &str| {
            header
                .iter()
                .position(|h| *h == name)
                .unwrap_or_else(|| panic!("no {name} column in HAProxy's stats: {csv}"))
        };
        let (px, sv, st) = (col("pxname"), col("svname"), col("status"));
        lines
            .map(|l| l.split(',').collect::<Vec<_>>())
            .filter(|f| f.get(px) == Some(&BACKEND))
            .filter(|f| f.get(sv).is_some_and(|s| s.starts_with('n')))
            .map(|f| {
                (
                    f[sv].to_string(),
                    f.get(st).copied().unwrap_or("").to_string(),
                )
            })
            .collect()
    }

    /// Waits until HAProxy routes to node `i`.
    pub async fn wait_lb_up(&self, i: usize) {
        let name = &self.slots[i].name;
        let deadline = Instant::now() + LB_DEADLINE;
        loop {
            let st = self.lb_status().await;
            if st.get(name).is_some_and(|s| s.starts_with("UP")) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "HAProxy does not see node {name} up within {LB_DEADLINE:?}: {st:?}; haproxy stderr:\n{}",
                tail(&self.haproxy_stderr)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Starts one more node (joining through the first live node), waits until it is
    /// ready and HAProxy routes to it; its index.
    pub async fn add_node(&mut self) -> usize {
        let i = self
            .slots
            .iter()
            .position(|s| s.state == NodeState::Spare)
            .expect("no spare node slot left: raise ClusterOptions::max_nodes");
        let seed = self
            .live_nodes()
            .first()
            .map(|&j| self.slots[j].grpc_port)
            .expect("a live node to join through");
        self.spawn_node(i, Some(seed)).await;
        self.wait_ready(i).await;
        let answer = haproxy_command(
            &self.haproxy_socket,
            &format!("enable server {BACKEND}/{}", self.slots[i].name),
        )
        .await;
        assert!(
            answer.trim().is_empty(),
            "HAProxy refused to enable {}: {answer}",
            self.slots[i].name
        );
        self.wait_lb_up(i).await;
        i
    }

    /// `kill -9` node `i` (and reaps it).
    pub async fn kill9(&mut self, i: usize) {
        let s = &mut self.slots[i];
        let child = s
            .child
            .as_mut()
            .unwrap_or_else(|| panic!("node {} is not running", s.name));
        child.kill().await.expect("kill -9 tether");
        s.state = NodeState::Killed;
    }

    /// Sends SIGTERM to node `i` (it drains: `/readyz` 503, then exits).
    pub async fn sigterm(&mut self, i: usize) {
        let s = &mut self.slots[i];
        let pid = s
            .child
            .as_ref()
            .and_then(Child::id)
            .unwrap_or_else(|| panic!("node {} is not running", s.name));
        let st = Command::new("kill")
            .arg("-TERM")
            .arg(pid.to_string())
            .status()
            .await
            .expect("run kill -TERM");
        assert!(st.success(), "kill -TERM {pid} failed: {st:?}");
        s.state = NodeState::Terminated;
    }

    /// Waits for node `i` to exit (after [`Cluster::sigterm`]); its exit code.
    pub async fn wait_exit(&mut self, i: usize, limit: Duration) -> Option<i32> {
        let s = &mut self.slots[i];
        let child = s.child.as_mut().expect("node was started");
        within(limit, &format!("node {} exits", s.name), child.wait())
            .await
            .expect("wait for tether")
            .code()
    }

    /// Indices of the nodes that are running (not spare, killed or terminated).
    pub fn live_nodes(&self) -> Vec<usize> {
        (0..self.slots.len())
            .filter(|&i| self.slots[i].state == NodeState::Running)
            .collect()
    }

    /// The state of node slot `i`.
    pub fn state(&self, i: usize) -> NodeState {
        self.slots[i].state
    }

    /// The node's name (`n<i>`, also its `--node-id`).
    pub fn name(&self, i: usize) -> &str {
        &self.slots[i].name
    }

    /// `http://127.0.0.1:<port>` of the load balancer.
    pub fn lb_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.lb_port)
    }

    /// `http://127.0.0.1:<port><path>` of node `i` itself.
    pub fn node_url(&self, i: usize, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.slots[i].http_port)
    }

    /// The tail of node `i`'s stderr.
    pub fn stderr_tail(&self, i: usize) -> String {
        tail(&self.slots[i].stderr_path)
    }

    /// Node `i`'s whole stderr so far.
    pub fn stderr(&self, i: usize) -> String {
        std::fs::read_to_string(&self.slots[i].stderr_path).unwrap_or_default()
    }

    /// The node among `nodes` that owns bucket set `set_key` once their views agree on
    /// exactly those members: the nodes' own ring (`tether_cluster::Ring` over the node
    /// ids with the node's virtual-node count).
    pub fn ring_owner(&self, set_key: &str, nodes: &[usize]) -> usize {
        let ring = Ring::new(
            nodes
                .iter()
                .map(|&i| NodeId::new(self.slots[i].name.clone())),
            tether_node::routing::cluster::VNODES,
        );
        let owner = ring.owner(set_key).expect("a ring with members");
        nodes
            .iter()
            .copied()
            .find(|&i| self.slots[i].name == owner.as_str())
            .expect("the owner is one of the nodes")
    }

    /// The manufacturing key every node verifies default credentials with.
    pub fn mfg_key(&self) -> &[u8] {
        &self.mfg_key
    }

    /// The app users created at start, in [`ClusterOptions::users`] order.
    pub fn users(&self) -> &[Credentials] {
        &self.users
    }

    /// The shared HTTP client.
    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    /// `GET /metrics` of node `i` (panics unless 200).
    pub async fn metrics(&self, i: usize) -> String {
        let r = within(
            REQUEST_DEADLINE,
            "GET /metrics",
            self.http.get(self.node_url(i, "/metrics")).send(),
        )
        .await
        .unwrap_or_else(|e| panic!("GET /metrics of {}: {e}", self.slots[i].name));
        let status = r.status();
        let text = r.text().await.expect("read /metrics");
        assert_eq!(
            status,
            StatusCode::OK,
            "/metrics of {}: {text}",
            self.slots[i].name
        );
        text
    }

    /// Metric `name` of node `i` (all series summed); `None` if the node does not have it.
    pub async fn metric(&self, i: usize, name: &str) -> Option<f64> {
        metric_value(&self.metrics(i).await, name)
    }

    /// Metric `name` summed over the live nodes (absent counts as 0).
    pub async fn metric_sum(&self, name: &str) -> f64 {
        let mut sum = 0.0;
        for i in self.live_nodes() {
            sum += self.metric(i, name).await.unwrap_or(0.0);
        }
        sum
    }

    /// Registers device `serial` (a `thermostat`) with its default credentials through the
    /// load balancer, retrying 503s; the assigned credentials it was given.
    pub async fn register(&self, serial: &str) -> Credentials {
        let default = default_credentials(&self.mfg_key, serial, KEY_ID)
            .unwrap_or_else(|e| panic!("default credentials of {serial}: {e}"));
        let body = serde_json::json!({
            "device_id": serial, "device_type": "thermostat", "sw_version": "1.0.0",
        });
        let mut last = String::new();
        for _ in 0..30 {
            let r = within(
                REQUEST_DEADLINE,
                "register",
                self.http
                    .post(format!("{}/v1/register", self.lb_url()))
                    .header(AUTHORIZATION, basic_header(&default))
                    .json(&body)
                    .send(),
            )
            .await;
            match r {
                Ok(r) if r.status() == StatusCode::OK => {
                    let header = r
                        .headers()
                        .get(SET_CREDENTIALS_HEADER)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_else(|| {
                            panic!("register {serial}: no {SET_CREDENTIALS_HEADER}")
                        });
                    return parse_set_credentials(header)
                        .unwrap_or_else(|e| panic!("register {serial}: bad credentials: {e}"));
                }
                Ok(r) if r.status() == StatusCode::SERVICE_UNAVAILABLE => {
                    last = format!("503 {}", r.text().await.unwrap_or_default());
                }
                Ok(r) => {
                    let status = r.status();
                    panic!(
                        "register {serial}: {status} {}",
                        r.text().await.unwrap_or_default()
                    );
                }
                Err(e) => last = format!("request failed: {e}"),
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        panic!("register {serial}: never succeeded; last: {last}");
    }
}

/// Decodes the hex key file `tether admin mfg-key generate` writes.
fn read_hex_key(path: &Path) -> Vec<u8> {
    let text = std::fs::read_to_string(path).expect("read manufacturing key");
    let hex = text.trim();
    assert_eq!(hex.len(), 128, "a manufacturing key is 128 hex digits");
    (0..64)
        .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).expect("hex digit"))
        .collect()
}

/// Creates `names` as users in the shared store (what `tether admin user add` does for the
/// embedded store, which a cluster does not use).
async fn create_users(store_url: &str, names: &[String]) -> Vec<Credentials> {
    if names.is_empty() {
        return Vec::new();
    }
    let store = PostgresStore::connect(store_url, 1)
        .await
        .unwrap_or_else(|e| panic!("connect to the test PostgreSQL: {e}"));
    let created_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    let mut out = Vec::new();
    for name in names {
        let mut random = [0u8; 16];
        rand::rng().fill_bytes(&mut random);
        let secret = user_secret(random);
        let created = store
            .create_user(UserRecord {
                user_id: name.clone(),
                secret_hash: secret_hash(&secret),
                created_ms,
            })
            .await
            .unwrap_or_else(|e| panic!("create user {name}: {e}"));
        assert!(created, "user {name} already exists");
        out.push(Credentials {
            id: format!("u.{name}"),
            secret,
        });
    }
    store.close().await.expect("close the user store");
    out
}
