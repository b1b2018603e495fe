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
//! - **Namespaced mode** ([`ClusterOptions::namespaces`], root only; the chaos runner's
//!   topology): a bridge `t12b<slot>` with a private /24 (`10.12.<slot>.0/24`,
//!   `tether_test_support::netns`), PostgreSQL in a namespace of its own listening on its
//!   bridge address, and every node in its own namespace (`t12-<slot>-n<i>`) binding its
//!   own address (HTTP :8080, gRPC :7070, plain HTTP allowed, nodes cluster over mTLS with
//!   certificates from `tether_test_support::pki`). HAProxy and the clients stay in the
//!   test's namespace and reach the nodes through the bridge (the gateway address is the
//!   nodes' `--trusted-proxies`), so the nemesis can cut one node's links with nftables
//!   inside its namespace. Dropping the cluster kills every process, stops PostgreSQL,
//!   then deletes the namespaces and the bridge.
//! - Nodes can run a given binary ([`ClusterOptions::tether_bin`], e.g. one built with a
//!   planted bug), extra environment ([`ClusterOptions::node_env`]), a config file
//!   ([`ClusterOptions::config`]) and libfaketime with a per-node offset file
//!   ([`ClusterOptions::faketime`], monotonic clock left real).

pub mod caps;
pub mod checker;
pub mod cli;
pub mod error;
pub mod fleet;
pub mod history;
pub mod nemesis;
pub mod proxy;
pub mod report;
pub mod runner;
pub mod scenario;
pub mod sim;
pub mod store_faults;
pub mod workload;

use std::collections::{BTreeMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Command as StdCommand, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rand::RngCore;
use reqwest::header::AUTHORIZATION;
use reqwest::StatusCode;
use tether_cluster::{NodeId, Ring};
use tether_node::store::pg_server::{PgOptions, PgServer};
use tether_node::store::postgres::PostgresStore;
use tether_node::store::{Store, UserRecord};
use tether_proto::credentials::{
    basic_header, default_credentials, parse_set_credentials, secret_hash, user_secret,
    Credentials, SET_CREDENTIALS_HEADER,
};
use tether_test_support::netns::{Namespace, Network};
use tether_test_support::pki::{ClusterPki, NodeCert};
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
/// Name prefix of the bridge and namespaces of namespaced clusters (issue 12).
pub const NET_PREFIX: &str = "t12";
/// Second octet of namespaced clusters' subnets (`10.12.<slot>.0/24`).
pub const NET_OCTET: u8 = 12;
/// A namespaced node's HTTP port (every node has an address of its own).
pub const NS_HTTP_PORT: u16 = 8080;
/// A namespaced node's gRPC port.
pub const NS_GRPC_PORT: u16 = 7070;
/// Where Debian's `libfaketime` package puts the preload library.
pub const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";

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
    /// Every node (and PostgreSQL) in a network namespace of its own (root only).
    pub namespaces: bool,
    /// The `tether` binary to run (default: [`tether_binary`], `$TETHER_BIN` or built
    /// from this workspace).
    pub tether_bin: Option<PathBuf>,
    /// Extra environment of every node (e.g. a planted bug's switch).
    pub node_env: Vec<(String, String)>,
    /// A `--config` file's text for every node (e.g. extra device types).
    pub config: Option<String>,
    /// Start every node under libfaketime with an offset file of its own
    /// ([`Cluster::set_clock_offset`]).
    pub faketime: bool,
    /// Route every node's connections to its peers' gRPC ports and to PostgreSQL through
    /// the userspace fault proxy ([`proxy::ClusterLinks`]; namespaced clusters only).
    pub link_proxy: bool,
    /// PostgreSQL's directory on a tmpfs of this many MiB (disk-full faults).
    pub store_tmpfs_mib: Option<u64>,
    /// Extra PostgreSQL settings (`-c name=value`).
    pub store_settings: Vec<(String, String)>,
    /// A synchronous streaming standby in a namespace of its own, and a store URL naming
    /// both hosts (failover faults; namespaced clusters only).
    pub store_standby: bool,
}

impl ClusterOptions {
    /// `nodes` nodes, room for `max_nodes`, no users.
    pub fn new(nodes: usize, max_nodes: usize) -> Self {
        ClusterOptions {
            nodes,
            max_nodes: max_nodes.max(nodes),
            users: Vec::new(),
            namespaces: false,
            tether_bin: None,
            node_env: Vec::new(),
            config: None,
            faketime: false,
            link_proxy: false,
            store_tmpfs_mib: None,
            store_settings: Vec::new(),
            store_standby: false,
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
    /// Stopped with SIGSTOP (alive, frozen).
    Paused,
}

/// One node slot: its ports, and its process once started.
#[derive(Debug)]
struct Slot {
    name: String,
    /// The address it binds (loopback, or its namespace's).
    host: IpAddr,
    /// Its namespace (namespaced clusters).
    ns: Option<Namespace>,
    /// Its mTLS certificate (namespaced clusters).
    cert: Option<NodeCert>,
    /// Its libfaketime offset file.
    clock_file: Option<PathBuf>,
    http_port: u16,
    grpc_port: u16,
    data_dir: PathBuf,
    stderr_path: PathBuf,
    child: Option<Child>,
    state: NodeState,
}

impl Slot {
    /// The HTTP address it binds: its own address, or every address of its namespace (so
    /// that provisioning from inside the namespace comes from loopback).
    fn bind(&self) -> IpAddr {
        match self.ns {
            Some(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            None => self.host,
        }
    }
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
    /// The address HAProxy connects to nodes from (their `--trusted-proxies`).
    proxy_ip: IpAddr,
    /// Every process id this cluster ever started (nodes, restarts, HAProxy).
    started: Vec<u32>,
    node_env: Vec<(String, String)>,
    config_path: Option<PathBuf>,
    /// The proxied links ([`ClusterOptions::link_proxy`]).
    links: Option<proxy::ClusterLinks>,
    // Dropped after the processes are killed (Drop below), in this order: PostgreSQL
    // stops (inside its namespace), then its namespace, the files, the bridge.
    standby: Option<PgServer>,
    pg: PgServer,
    /// The primary a failover left behind (down).
    old_primary: Option<PgServer>,
    store_tmpfs: Option<store_faults::Tmpfs>,
    standby_ns: Option<Namespace>,
    pg_ns: Option<Namespace>,
    _pki: Option<ClusterPki>,
    dir: tempfile::TempDir,
    network: Option<Network>,
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

/// One request's status and JSON body, with a timeout or a broken connection kept as an
/// answer too (408 / 502), for tests that send many requests through a fault and judge
/// the answers afterwards.
pub async fn answer(req: reqwest::RequestBuilder) -> (StatusCode, serde_json::Value) {
    match req.timeout(Duration::from_secs(8)).send().await {
        Ok(r) => {
            let status = r.status();
            (status, r.json().await.unwrap_or(serde_json::Value::Null))
        }
        Err(e) if e.is_timeout() => (
            StatusCode::REQUEST_TIMEOUT,
            serde_json::json!(e.to_string()),
        ),
        Err(e) => (StatusCode::BAD_GATEWAY, serde_json::json!(e.to_string())),
    }
}

/// `GET {base}/v1/buckets/shared.{serial}` as `creds` ([`answer`]).
pub async fn get_shared(
    http: &reqwest::Client,
    base: &str,
    serial: &str,
    creds: &Credentials,
) -> (StatusCode, serde_json::Value) {
    answer(
        http.get(format!("{base}/v1/buckets/shared.{serial}"))
            .header(AUTHORIZATION, basic_header(creds)),
    )
    .await
}

/// `PUT {base}/v1/buckets/shared.{serial}` of `target_temperature = value` on base
/// version 0 (merged onto whatever is there) as `creds` ([`answer`]).
pub async fn put_shared(
    http: &reqwest::Client,
    base: &str,
    serial: &str,
    creds: &Credentials,
    value: i64,
) -> (StatusCode, serde_json::Value) {
    answer(
        http.put(format!("{base}/v1/buckets/shared.{serial}"))
            .header(AUTHORIZATION, basic_header(creds))
            .json(&serde_json::json!({"value": {"target_temperature": value}, "base_version": 0})),
    )
    .await
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

/// The `tether` binary the tests run: `$TETHER_BIN` when set (e.g. an older build, to
/// watch a test fail on it), else built (a no-op when it is up to date) with the cargo
/// running the tests; once per process. A failed build fails the test.
pub fn tether_binary() -> PathBuf {
    tether_test_support::bin::tether().to_path_buf()
}

fn require_haproxy() {
    assert!(
        Path::new(HAPROXY).exists(),
        "HAProxy is not installed ({HAPROXY} missing): install the Debian package `haproxy` \
         (scripts/test installs it). The cluster tests need a real load balancer and are never \
         skipped."
    );
}

/// Without the library, `LD_PRELOAD` names a missing file: the loader warns on the node's
/// stderr and runs it on the real clock, and a clock scenario fails far from the cause.
fn require_libfaketime() {
    assert!(
        Path::new(LIBFAKETIME).exists(),
        "libfaketime is not installed ({LIBFAKETIME} missing): install the Debian package \
         `libfaketime` (scripts/test installs it). The clock scenarios are never skipped."
    );
}

fn start_postgres(options: PgOptions) -> PgServer {
    PgServer::start_with(options).unwrap_or_else(|e| {
        panic!(
            "could not start a private PostgreSQL server: {e}. Install the Debian package \
             `postgresql` (scripts/test installs it) or set TETHER_PG_BIN. The cluster tests \
             need a shared store and are never skipped."
        )
    })
}

/// The HAProxy configuration for `slots` (name, `host:port`, enabled; started or not)
/// behind `lb_port`.
fn haproxy_config(lb_port: u16, socket: &Path, slots: &[(String, String, bool)]) -> String {
    let mut servers = String::new();
    for (name, addr, enabled) in slots {
        let disabled = if *enabled { "" } else { " disabled" };
        servers.push_str(&format!("    server {name} {addr} check{disabled}\n"));
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
    # Retry on another node when no connection could be made (the request never reached a
    # node) and, for requests that are safe to send twice, when the node closed the
    # connection without an answer (it was killed while holding or serving it) or answered
    # 503 (not served there: moving, minority, store unreachable). The backend says which
    # requests are safe. Never on timeouts.
    retries 3
    retry-on conn-failure empty-response 503
    option redispatch 1

frontend api
    bind 127.0.0.1:{lb_port}
    # When the balancer first took the request (a resent subscribe holds only for what is
    # left of its timeout; README: Running a cluster).
    http-request set-header X-Request-Start t=%Ts%ms
    default_backend {BACKEND}

backend {BACKEND}
    balance roundrobin
{HAPROXY_RETRY_SAFE}    option httpchk
    http-check send meth GET uri /readyz
    http-check expect status 200
    default-server inter 500ms fall 2 rise 1
{servers}",
        socket = socket.display(),
    )
}

/// The HAProxy backend lines that keep L7 retries (a request resent to another node after
/// its node closed the connection without answering) to the requests that are safe to
/// send twice: reads (`GET`, `HEAD`), `POST /v1/subscribe` (a subscribe changes nothing),
/// and a `PUT` whose JSON body carries an `op_id` (the set answers a repeated op id from
/// its record and applies nothing again, API.md). A `PUT` without one, a registration (a
/// repeated first contact is a lost-credentials registration: it revokes and unpairs),
/// pairing and unpairing are never resent. README "Running a cluster" shows the same.
pub const HAPROXY_RETRY_SAFE: &str =
    "    # L7 retries only for requests that are safe to send twice (README: Running a cluster).
    option http-buffer-request
    acl read method GET HEAD
    acl subscribe path /v1/subscribe
    acl put method PUT
    acl op_id req.body,json_query('$.op_id') -m found
    http-request disable-l7-retry if !read !subscribe !put
    http-request disable-l7-retry if put !op_id
";

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
        if opts.faketime {
            require_libfaketime();
        }
        assert!(opts.nodes >= 1, "a cluster has at least one node");
        let tether = match opts.tether_bin.clone() {
            Some(path) => {
                assert!(
                    path.exists(),
                    "--tether-bin {} does not exist",
                    path.display()
                );
                path
            }
            None => tokio::task::spawn_blocking(tether_binary)
                .await
                .expect("build tether"),
        };
        let mut network = if opts.namespaces {
            Some(
                Network::create(NET_PREFIX, NET_OCTET)
                    .unwrap_or_else(|e| panic!("creating the test network: {e:#}")),
            )
        } else {
            None
        };
        let pg_ns = network.as_mut().map(|net| {
            net.add_namespace("pg")
                .unwrap_or_else(|e| panic!("creating PostgreSQL's namespace: {e:#}"))
        });
        let store_tmpfs = opts.store_tmpfs_mib.map(|mib| {
            store_faults::Tmpfs::mount(mib).unwrap_or_else(|e| {
                panic!("a {mib} MiB tmpfs for PostgreSQL (util-linux mount): {e}")
            })
        });
        let mut pg_options = match &pg_ns {
            Some(ns) => PgOptions {
                netns: Some(ns.name().to_string()),
                listen: IpAddr::V4(ns.ip()),
                port: Some(5432),
                ..PgOptions::default()
            },
            None => PgOptions::default(),
        };
        pg_options.base_dir = store_tmpfs.as_ref().map(|fs| fs.path().to_path_buf());
        pg_options.settings = opts.store_settings.clone();
        let pg = tokio::task::spawn_blocking(move || start_postgres(pg_options))
            .await
            .expect("start PostgreSQL");
        let mut store_url = pg.url("tether").expect("create the tether database");
        let (standby, standby_ns) = if opts.store_standby {
            let net = network
                .as_mut()
                .expect("a standby store needs a namespaced cluster");
            let ns = net
                .add_namespace("pg2")
                .unwrap_or_else(|e| panic!("creating the standby's namespace: {e:#}"));
            let standby = tokio::task::block_in_place(|| store_faults::start_standby(&pg, &ns))
                .unwrap_or_else(|e| panic!("a synchronous standby PostgreSQL: {e}"));
            store_url = store_faults::multi_host_url(&pg, &standby);
            (Some(standby), Some(ns))
        } else {
            (None, None)
        };
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

        let mut pki = match network {
            Some(_) => Some(ClusterPki::generate().await),
            None => None,
        };
        let lb_port = free_port();
        let mut slots = Vec::new();
        for i in 0..opts.max_nodes {
            let name = format!("n{i}");
            let (host, ns, http_port, grpc_port) = match network.as_mut() {
                Some(net) => {
                    let ns = net
                        .add_namespace(&name)
                        .unwrap_or_else(|e| panic!("creating {name}'s namespace: {e:#}"));
                    (IpAddr::V4(ns.ip()), Some(ns), NS_HTTP_PORT, NS_GRPC_PORT)
                }
                None => (
                    IpAddr::V4(Ipv4Addr::LOCALHOST),
                    None,
                    free_port(),
                    free_port(),
                ),
            };
            let cert = match pki.as_mut() {
                Some(p) => Some(p.issue(&name).await),
                None => None,
            };
            let clock_file = opts.faketime.then(|| {
                let f = dir.path().join(format!("{name}.faketime"));
                std::fs::write(&f, "+0\n").expect("write the faketime offset file");
                f
            });
            slots.push(Slot {
                data_dir: dir.path().join(&name),
                stderr_path: dir.path().join(format!("{name}.stderr.log")),
                name,
                host,
                ns,
                cert,
                clock_file,
                http_port,
                grpc_port,
                child: None,
                state: NodeState::Spare,
            });
        }
        let config_path = opts.config.as_ref().map(|text| {
            let p = dir.path().join("tether.toml");
            std::fs::write(&p, text).expect("write the node config file");
            p
        });
        let proxy_ip = match &network {
            Some(net) => IpAddr::V4(net.gateway()),
            None => IpAddr::V4(Ipv4Addr::LOCALHOST),
        };
        let links = match (opts.link_proxy, &network) {
            (false, _) => None,
            (true, None) => panic!("the link proxy needs a namespaced cluster"),
            (true, Some(_)) => Some(install_links(proxy_ip, &slots, &pg_ns, pg.port()).await),
        };
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
            proxy_ip,
            started: Vec::new(),
            node_env: opts.node_env.clone(),
            config_path,
            links,
            standby,
            pg,
            old_primary: None,
            store_tmpfs,
            standby_ns,
            pg_ns,
            _pki: pki,
            dir,
            network,
        };

        cluster.spawn_node(0, None).await;
        cluster.wait_ready(0).await;
        let seed = cluster.grpc_addr(0);
        for i in 1..opts.nodes {
            cluster.spawn_node(i, Some(seed.clone())).await;
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
    async fn spawn_node(&mut self, i: usize, join: Option<String>) {
        let lb = self.lb_url();
        let key = format!("{KEY_ID}={}", self.mfg_key_path.display());
        let proxy = self.proxy_ip.to_string();
        let s = &mut self.slots[i];
        std::fs::create_dir_all(&s.data_dir).expect("node data dir");
        let stderr = std::fs::File::create(&s.stderr_path).expect("node stderr log");
        // In a namespace, `ip netns exec` execs the node itself: the child's pid is the
        // node's, so signals reach it.
        let mut cmd = match &s.ns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns.name()]).arg(&self.tether);
                c
            }
            None => Command::new(&self.tether),
        };
        cmd.arg("serve")
            .args(["--node-id", &s.name])
            .args(["--listen", &format!("{}:{}", s.bind(), s.http_port)])
            .args(["--grpc-listen", &format!("{}:{}", s.host, s.grpc_port)]);
        if let Some(seed) = join {
            cmd.args(["--join", &seed]);
        }
        if let Some(cert) = &s.cert {
            cmd.args(cert.flags()).arg("--allow-plain-http");
        }
        if let Some(config) = &self.config_path {
            cmd.arg("--config").arg(config);
        }
        if let Some(clock) = &s.clock_file {
            // Wall clock offset from the file (re-read at most once a second); the
            // monotonic clock stays real, as with real NTP skew.
            cmd.env("LD_PRELOAD", LIBFAKETIME)
                .env("FAKETIME_TIMESTAMP_FILE", clock)
                .env("FAKETIME_CACHE_DURATION", "1")
                .env("FAKETIME_DONT_FAKE_MONOTONIC", "1");
        }
        cmd.args(["--store", &self.store_url])
            .args(["--public-url", &lb])
            .arg("--data-dir")
            .arg(&s.data_dir)
            .args(["--mfg-key-file", &key])
            .args(["--requests-per-second", "100000"])
            // HAProxy, on this machine, is the load balancer: per-source limits apply to
            // the clients it forwards for, not to it.
            .args(["--trusted-proxies", &proxy])
            .env("TETHER_CLUSTER_SECRET", &self.secret)
            .envs(self.node_env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(stderr))
            .kill_on_drop(true);
        let mut child = cmd.spawn().expect("spawn tether serve");
        self.started.extend(child.id());
        let s = &mut self.slots[i];
        let stdout = child.stdout.take().expect("node stdout");
        let mut lines = BufReader::new(stdout).lines();
        let first = tokio::time::timeout(STARTUP_DEADLINE, lines.next_line()).await;
        let expected = format!("listening on http://{}:{}", s.bind(), s.http_port);
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
        let slots: Vec<(String, String, bool)> = self
            .slots
            .iter()
            .enumerate()
            .map(|(i, s)| {
                (
                    s.name.clone(),
                    format!("{}:{}", s.host, s.http_port),
                    i < enabled,
                )
            })
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
        self.started.extend(child.id());
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
            .map(|&j| self.grpc_addr(j))
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
        self.signal(i, "TERM").await;
        self.slots[i].state = NodeState::Terminated;
    }

    /// Freezes node `i` with SIGSTOP (its sockets stay open, it answers nothing).
    pub async fn pause(&mut self, i: usize) {
        self.signal(i, "STOP").await;
        self.slots[i].state = NodeState::Paused;
    }

    /// Thaws node `i` after [`Cluster::pause`] (SIGCONT).
    pub async fn resume(&mut self, i: usize) {
        self.signal(i, "CONT").await;
        self.slots[i].state = NodeState::Running;
    }

    /// `kill -<sig> <pid>` of node `i`.
    async fn signal(&mut self, i: usize, sig: &str) {
        let s = &self.slots[i];
        let pid = s
            .child
            .as_ref()
            .and_then(Child::id)
            .unwrap_or_else(|| panic!("node {} is not running", s.name));
        let st = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(pid.to_string())
            .status()
            .await
            .expect("run kill");
        assert!(st.success(), "kill -{sig} {pid} failed: {st:?}");
    }

    /// Starts node `i` again after a kill or exit, on its data directory, joining
    /// through a live node (or starting alone when none is left), and waits until it is
    /// ready. HAProxy's health check routes to it again by itself.
    pub async fn restart(&mut self, i: usize) {
        if let Some(c) = self.slots[i].child.as_mut() {
            // Reap it (a killed or drained node has exited, or exits now).
            let _ = c.start_kill();
            let _ = within(Duration::from_secs(10), "reap the old process", c.wait()).await;
        }
        let seed = self
            .live_nodes()
            .into_iter()
            .find(|&j| j != i)
            .map(|j| self.grpc_addr(j));
        self.spawn_node(i, seed).await;
        self.wait_ready(i).await;
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

    /// `http://<address>:<port><path>` of node `i` itself.
    pub fn node_url(&self, i: usize, path: &str) -> String {
        let s = &self.slots[i];
        format!("http://{}:{}{path}", s.host, s.http_port)
    }

    /// `host:port` of node `i`'s gRPC (cluster) port.
    pub fn grpc_addr(&self, i: usize) -> String {
        let s = &self.slots[i];
        format!("{}:{}", s.host, s.grpc_port)
    }

    /// The address node `i` binds.
    pub fn host(&self, i: usize) -> IpAddr {
        self.slots[i].host
    }

    /// Node `i`'s network namespace (namespaced clusters).
    pub fn namespace(&self, i: usize) -> Option<&Namespace> {
        self.slots[i].ns.as_ref()
    }

    /// PostgreSQL's address, and its namespace (namespaced clusters).
    pub fn store_host(&self) -> (IpAddr, Option<&Namespace>) {
        match &self.pg_ns {
            Some(ns) => (IpAddr::V4(ns.ip()), Some(ns)),
            None => (IpAddr::V4(Ipv4Addr::LOCALHOST), None),
        }
    }

    /// The address HAProxy and the clients reach the nodes from.
    pub fn proxy_ip(&self) -> IpAddr {
        self.proxy_ip
    }

    /// The proxied links, when started with [`ClusterOptions::link_proxy`].
    pub fn links(&self) -> Option<&proxy::ClusterLinks> {
        self.links.as_ref()
    }

    /// The shared store's URL.
    pub fn store_url(&self) -> &str {
        &self.store_url
    }

    /// The shared PostgreSQL server (the primary; after a failover, the promoted one).
    pub fn store(&self) -> &PgServer {
        &self.pg
    }

    /// The streaming standby ([`ClusterOptions::store_standby`]) until it is promoted.
    pub fn standby(&self) -> Option<&PgServer> {
        self.standby.as_ref()
    }

    /// The standby's network namespace name ([`ClusterOptions::store_standby`]).
    pub fn standby_namespace(&self) -> Option<&str> {
        self.standby_ns.as_ref().map(Namespace::name)
    }

    /// Records that the standby was promoted: it is the store from now on; the old
    /// primary is kept (down) until the cluster drops.
    pub fn promoted(&mut self) {
        if let Some(new) = self.standby.take() {
            self.old_primary = Some(std::mem::replace(&mut self.pg, new));
        }
    }

    /// The tmpfs PostgreSQL's directory is on ([`ClusterOptions::store_tmpfs_mib`]).
    pub fn store_tmpfs(&self) -> Option<&store_faults::Tmpfs> {
        self.store_tmpfs.as_ref()
    }

    /// The bridge's names (namespaced clusters): the namespaces' common prefix.
    pub fn namespace_prefix(&self) -> Option<String> {
        self.network
            .as_ref()
            .map(|n| format!("{NET_PREFIX}-{}-", n.slot()))
    }

    /// Node `i`'s process id while it runs.
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.slots[i].child.as_ref().and_then(Child::id)
    }

    /// Every process id this cluster started (nodes, their restarts, HAProxy), and
    /// PostgreSQL's postmaster while it runs.
    pub fn pids(&self) -> Vec<u32> {
        let postmasters = [
            Some(&self.pg),
            self.standby.as_ref(),
            self.old_primary.as_ref(),
        ]
        .into_iter()
        .flatten()
        .filter_map(|pg| {
            std::fs::read_to_string(pg.dir().join("data/postmaster.pid"))
                .ok()
                .and_then(|s| s.lines().next().and_then(|l| l.trim().parse().ok()))
        });
        self.started.iter().copied().chain(postmasters).collect()
    }

    /// Sets node `i`'s wall clock offset (libfaketime, [`ClusterOptions::faketime`]) to
    /// `offset_s` seconds; it takes effect within a second.
    pub fn set_clock_offset(&self, i: usize, offset_s: i64) -> std::io::Result<()> {
        let s = &self.slots[i];
        let file = s.clock_file.as_ref().ok_or_else(|| {
            std::io::Error::other(format!("{} was not started under libfaketime", s.name))
        })?;
        let tmp = file.with_extension("tmp");
        std::fs::write(&tmp, format!("{offset_s:+}\n"))?;
        std::fs::rename(&tmp, file)
    }

    /// The tail of node `i`'s stderr.
    pub fn stderr_tail(&self, i: usize) -> String {
        tail(&self.slots[i].stderr_path)
    }

    /// Node `i`'s whole stderr so far.
    pub fn stderr(&self, i: usize) -> String {
        std::fs::read_to_string(&self.slots[i].stderr_path).unwrap_or_default()
    }

    /// Runs `nft -f -` with `rules` inside node `i`'s network namespace (a namespaced
    /// cluster; packages iproute2 and nftables).
    pub async fn nft(&self, i: usize, rules: &str) -> Result<(), String> {
        nemesis::nft(self, i, rules).await
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
        self.register_as(serial, "thermostat").await
    }

    /// [`Cluster::register`] with a device type of the nodes' config.
    pub async fn register_as(&self, serial: &str, device_type: &str) -> Credentials {
        let default = default_credentials(&self.mfg_key, serial, KEY_ID)
            .unwrap_or_else(|e| panic!("default credentials of {serial}: {e}"));
        let body = serde_json::json!({
            "device_id": serial, "device_type": device_type, "sw_version": "1.0.0",
        });
        let mut last = String::new();
        for _ in 0..30 {
            match self.post_register(&default, &body).await {
                Ok((200, Some(header), _)) => {
                    return parse_set_credentials(&header)
                        .unwrap_or_else(|e| panic!("register {serial}: bad credentials: {e}"));
                }
                Ok((200, None, _)) => panic!("register {serial}: no {SET_CREDENTIALS_HEADER}"),
                Ok((503, _, text)) => last = format!("503 {text}"),
                Ok((status, _, text)) => panic!("register {serial}: {status} {text}"),
                Err(e) => last = format!("request failed: {e}"),
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        panic!("register {serial}: never succeeded; last: {last}");
    }

    /// `POST /v1/register`: status, the new-credentials header, the body. Default
    /// credentials are accepted over TLS or from loopback only: a loopback cluster registers
    /// through the load balancer; a namespaced one from inside a node's namespace, to its
    /// loopback address (`curl`, as a provisioning step on the node's host would).
    async fn post_register(
        &self,
        default: &Credentials,
        body: &serde_json::Value,
    ) -> Result<(u16, Option<String>, String), String> {
        let ns = self.live_nodes().into_iter().find_map(|i| {
            self.slots[i]
                .ns
                .as_ref()
                .map(|ns| (ns, self.slots[i].http_port))
        });
        let Some((ns, port)) = ns else {
            let r = within(
                REQUEST_DEADLINE,
                "register",
                self.http
                    .post(format!("{}/v1/register", self.lb_url()))
                    .header(AUTHORIZATION, basic_header(default))
                    .json(body)
                    .send(),
            )
            .await
            .map_err(|e| e.to_string())?;
            let status = r.status().as_u16();
            let header = r
                .headers()
                .get(SET_CREDENTIALS_HEADER)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            return Ok((status, header, r.text().await.unwrap_or_default()));
        };
        let out = within(
            REQUEST_DEADLINE,
            "register (curl)",
            Command::new("ip")
                .args(["netns", "exec", ns.name(), "curl", "-sS", "-i", "-m", "8"])
                .args(["-X", "POST", "-H", "content-type: application/json"])
                .args(["-H", &format!("authorization: {}", basic_header(default))])
                .args(["--data", &body.to_string()])
                .arg(format!("http://127.0.0.1:{port}/v1/register"))
                .output(),
        )
        .await
        .map_err(|e| format!("curl (Debian package curl): {e}"))?;
        if !out.status.success() {
            return Err(format!("curl: {}", String::from_utf8_lossy(&out.stderr)));
        }
        let text = String::from_utf8_lossy(&out.stdout).replace("\r\n", "\n");
        let (head, body) = text.split_once("\n\n").unwrap_or((&text, ""));
        let status = head
            .lines()
            .next()
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let header = head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case(SET_CREDENTIALS_HEADER)
                .then(|| v.trim().to_string())
        });
        Ok((status, header, body.to_string()))
    }
}

/// Starts the link proxy for every node slot of a namespaced cluster and PostgreSQL in
/// `pg_ns` listening on `pg_port`.
async fn install_links(
    gateway: IpAddr,
    slots: &[Slot],
    pg_ns: &Option<Namespace>,
    pg_port: u16,
) -> proxy::ClusterLinks {
    let pg_ns = pg_ns.as_ref().expect("PostgreSQL's namespace");
    let hosts: Vec<proxy::Host<'_>> = slots
        .iter()
        .map(|s| proxy::Host {
            name: &s.name,
            namespace: s.ns.as_ref().expect("a namespaced node").name(),
            grpc: std::net::SocketAddr::new(s.host, s.grpc_port),
        })
        .collect();
    let store = std::net::SocketAddr::new(IpAddr::V4(pg_ns.ip()), pg_port);
    proxy::ClusterLinks::install(gateway, &hosts, store)
        .await
        .unwrap_or_else(|e| panic!("starting the link proxy: {e}"))
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
