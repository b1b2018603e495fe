//! The black-box harness: starts the real `tether` binary on a free
//! port with its own data directory and manufacturing key, and drives it over HTTP/1.1
//! (or HTTPS) with reqwest.
//!
//! Credentials (API.md "Credentials"): every node gets a fresh manufacturing key (written by
//! `tether admin mfg-key generate`) passed as `--mfg-key-file k1=<path>`. A device
//! [`Principal`] starts with its real default credentials `d.<serial>.k1` (the HMAC of its id
//! under that key); like a real device it stores whatever `X-Tether-Set-Credentials` a
//! response carries and from then on uses those assigned credentials exclusively. Users are
//! created with `tether admin user add` before the node starts ([`NodeBuilder::user`]).
//! The [`Keyring`] holding all of that can be handed to a restarted node.
//!
//! Conventions:
//! - every wait is bounded by a generous deadline (startup 20 s, a notification 2 s,
//!   a plain request 10 s); nothing sleeps to "let things settle" — waits poll for the
//!   event they need (a stdout line, a metric value, a process exit);
//! - the child is SIGKILLed when its [`Node`] is dropped; when a test panics, the tail
//!   of the server's stderr is printed so the failure can be diagnosed.

use std::collections::{BTreeSet, HashMap};
use std::ffi::OsString;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use reqwest::header::{ACCEPT, CONTENT_TYPE};
use reqwest::{Client, Method, RequestBuilder, StatusCode};
use serde_json::Value;
use tether_proto::api::{ErrorBody, RegisterResponse, WireMessage};
use tether_proto::credentials::{default_secret, parse_set_credentials, Credentials};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// How long the binary may take to print its `listening on` line.
pub const STARTUP_DEADLINE: Duration = Duration::from_secs(20);
/// How long a held subscription may take to be answered after the change that wakes it
/// (or a subscribe that must be answered at once, next to holds of 60 s): generous, since
/// the tests share two loaded cores; latency is measured by the benchmarks, not here.
pub const NOTIFY_DEADLINE: Duration = Duration::from_secs(15);
/// Upper bound for any request that is not a held subscription.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(10);

/// The protobuf media type.
pub const PROTOBUF: &str = "application/x-protobuf";

/// The manufacturing key id every test node is given (`--mfg-key-file k1=<path>`), used in
/// default credential ids `d.<serial>.k1`.
pub const KEY_ID: &str = "k1";
/// The response header carrying new credentials.
pub const SET_CREDENTIALS: &str = "x-tether-set-credentials";
/// Per-principal request rate given to test nodes unless a test sets its own: the load
/// tests make a hundred and more quick requests as one device (crash.rs: ~100 writes per
/// device in about a second), close to the default (50/s, burst 100) on a fast machine.
/// The limit itself is tested in auth.rs.
pub const TEST_REQUESTS_PER_SECOND: u32 = 100_000;
/// Connections per source address given to test nodes unless a test sets its own: every
/// test client connects from loopback (a thousand held subscriptions in subscribe.rs).
/// The limit itself is tested in hardening.rs.
pub const TEST_CONNECTIONS_PER_SOURCE: u32 = 100_000;

/// Awaits `fut` or panics with `what` after `limit`.
pub async fn within<T>(limit: Duration, what: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(limit, fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {limit:?}: {what}"),
    }
}

/// An HTTP client that can keep thousands of connections to one host open at once
/// (each held subscription occupies its own HTTP/1.1 connection).
pub fn http_client() -> Client {
    Client::builder()
        .pool_max_idle_per_host(4096)
        .build()
        .expect("build http client")
}

/// The thermostat's template (`device` and `shared` fields) with `extra` fields added to
/// both kinds, as TOML for [`NodeBuilder::config`]. A node refuses writes of fields outside
/// a device type's template (422 `unknown_field`), so a test that writes fields of its own
/// declares them, as an operator would.
pub fn thermostat_template(extra: &[&str]) -> String {
    let list = |base: &[&str]| {
        base.iter()
            .chain(extra)
            .map(|f| format!("{f:?}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    format!(
        "[device_types.thermostat.buckets]\ndevice = [{}]\nshared = [{}]\n",
        list(&[
            "current_temperature",
            "humidity",
            "hvac_state",
            "sw_version"
        ]),
        list(&["target_temperature", "mode", "name"])
    )
}

/// Bucket ids a thermostat gets on first contact.
pub fn thermostat_buckets(serial: &str) -> Vec<String> {
    vec![format!("device.{serial}"), format!("shared.{serial}")]
}

/// `json!({...})` → the object inside (panics if not an object).
pub fn obj(v: Value) -> serde_json::Map<String, Value> {
    match v {
        Value::Object(m) => m,
        other => panic!("not a JSON object: {other}"),
    }
}

/// The keys of a JSON object, sorted.
pub fn keys(v: &Value) -> BTreeSet<String> {
    v.as_object()
        .unwrap_or_else(|| panic!("not a JSON object: {v}"))
        .keys()
        .cloned()
        .collect()
}

/// A set of string literals.
pub fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

/// `body["buckets"]` as a vector of bucket objects (panics if absent / not an array).
pub fn buckets_of(body: &Value) -> Vec<Value> {
    body.get("buckets")
        .and_then(Value::as_array)
        .unwrap_or_else(|| panic!("no \"buckets\" array in {body}"))
        .clone()
}

/// The ids of `body["buckets"]`, sorted.
pub fn ids_of(body: &Value) -> Vec<String> {
    let mut ids: Vec<String> = buckets_of(body)
        .iter()
        .map(|b| {
            b["id"]
                .as_str()
                .unwrap_or_else(|| panic!("bucket without string id: {b}"))
                .to_string()
        })
        .collect();
    ids.sort();
    ids
}

/// The bucket with id `id` in `body["buckets"]`.
pub fn bucket_in(body: &Value, id: &str) -> Value {
    buckets_of(body)
        .into_iter()
        .find(|b| b["id"] == id)
        .unwrap_or_else(|| panic!("bucket {id} not in {body}"))
}

/// `v[field]` as u64 (panics otherwise).
pub fn u64_of(v: &Value, field: &str) -> u64 {
    v[field]
        .as_u64()
        .unwrap_or_else(|| panic!("\"{field}\" is not a u64 in {v}"))
}

// ---------------------------------------------------------------------------------------
// responses

/// A fully read HTTP response.
#[derive(Debug)]
pub struct Resp {
    pub status: StatusCode,
    pub content_type: Option<String>,
    pub headers: reqwest::header::HeaderMap,
    pub body: Vec<u8>,
}

impl Resp {
    pub async fn read(r: reqwest::Response) -> Resp {
        Resp::read_checked(r).await.expect("read response body")
    }

    /// Reads the whole response; None if the body could not be read (connection lost).
    pub async fn read_checked(r: reqwest::Response) -> Option<Resp> {
        let status = r.status();
        let headers = r.headers().clone();
        let content_type = headers
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let body = r.bytes().await.ok()?.to_vec();
        Some(Resp {
            status,
            content_type,
            headers,
            body,
        })
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The `x-request-id` the node gave the response (panics when there is none).
    pub fn request_id(&self) -> String {
        self.headers
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .expect("x-request-id")
            .to_string()
    }

    /// The body as JSON (panics with the raw body otherwise).
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "response ({}) is not JSON: {e}; content-type {:?}; body: {:?}",
                self.status,
                self.content_type,
                self.text()
            )
        })
    }

    /// Asserts the status and returns self.
    #[track_caller]
    pub fn expect(self, status: StatusCode) -> Resp {
        assert_eq!(
            self.status,
            status,
            "unexpected status; body: {}",
            self.text()
        );
        self
    }

    /// Asserts status + JSON body; returns the JSON.
    #[track_caller]
    pub fn expect_json(self, status: StatusCode) -> Value {
        self.expect(status).json()
    }

    /// Asserts an API error: the status, and a JSON body `{"error": code, "message": <string>}`.
    #[track_caller]
    pub fn expect_error(&self, status: StatusCode, code: &str) -> ErrorBody {
        assert_eq!(
            self.status,
            status,
            "unexpected status (wanted {status} {code}); body: {}",
            self.text()
        );
        let v = self.json();
        assert!(
            v.get("error").is_some_and(Value::is_string)
                && v.get("message").is_some_and(Value::is_string),
            "error body must be {{\"error\": <string>, \"message\": <string>}}, got {v}"
        );
        let e: ErrorBody = serde_json::from_value(v).expect("ErrorBody");
        assert_eq!(e.error, code, "error code; message: {}", e.message);
        e
    }

    /// Asserts the response is protobuf and decodes it as `T`.
    #[track_caller]
    pub fn pb<T: WireMessage>(&self) -> T {
        let ct = self.content_type.clone().unwrap_or_default();
        assert!(
            ct.starts_with(PROTOBUF),
            "expected Content-Type {PROTOBUF}, got {ct:?} (status {}, body {:?})",
            self.status,
            self.text()
        );
        T::decode_pb(&self.body).unwrap_or_else(|e| panic!("bad protobuf body: {e:?}"))
    }
}

// ---------------------------------------------------------------------------------------
// the admin CLI

/// What a `tether admin …` run printed.
#[derive(Debug)]
pub struct AdminOutput {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl AdminOutput {
    /// Asserts success and returns stdout.
    #[track_caller]
    pub fn ok(self) -> String {
        assert!(
            self.status.success(),
            "tether admin failed ({:?}); stdout: {:?}; stderr: {:?}",
            self.status,
            self.stdout,
            self.stderr
        );
        self.stdout
    }
}

/// Runs `tether admin <args>` to completion.
pub async fn admin<I, S>(args: I) -> AdminOutput
where
    I: IntoIterator<Item = S>,
    S: Into<OsString>,
{
    let args: Vec<OsString> = args.into_iter().map(Into::into).collect();
    let out = within(
        REQUEST_DEADLINE,
        "tether admin",
        Command::new(crate::bin::tether())
            .arg("admin")
            .args(&args)
            .stdin(Stdio::null())
            .output(),
    )
    .await
    .expect("run tether admin");
    AdminOutput {
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Parses an admin line `<id> <secret>` (what `default-credentials` and `user add` print).
#[track_caller]
pub fn credentials_line(stdout: &str) -> Credentials {
    let line = stdout.trim();
    let (id, secret) = line
        .split_once(' ')
        .unwrap_or_else(|| panic!("expected `<id> <secret>`, got {stdout:?}"));
    assert!(
        !secret.contains(char::is_whitespace),
        "expected one `<id> <secret>` line, got {stdout:?}"
    );
    Credentials {
        id: id.to_string(),
        secret: secret.to_string(),
    }
}

/// Decodes the hex manufacturing key file `tether admin mfg-key generate` writes.
#[track_caller]
pub fn read_hex_key(path: &Path) -> Vec<u8> {
    let text = std::fs::read_to_string(path).expect("read manufacturing key");
    let hex = text.trim();
    assert_eq!(
        hex.len(),
        128,
        "a manufacturing key is 128 hex digits: {path:?}"
    );
    (0..64)
        .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).expect("hex digit"))
        .collect()
}

// ---------------------------------------------------------------------------------------
// credentials the tests hold

/// A device's credentials as the device itself would store them.
#[derive(Debug, Clone)]
pub struct DeviceKeys {
    /// Factory credentials `d.<serial>.k1`, computed from the manufacturing key.
    pub default: Credentials,
    /// Assigned credentials `a.<serial>`, once a response handed them out.
    pub assigned: Option<Credentials>,
}

/// The manufacturing key of a node (and of its restarts) and every credential the tests
/// were given: shared by all principals of one node, and passed on to a restarted node.
#[derive(Debug)]
pub struct Keyring {
    _dir: tempfile::TempDir,
    /// The key file given to `--mfg-key-file k1=…`.
    pub mfg_key_path: PathBuf,
    /// Its 64 bytes.
    pub mfg_key: Vec<u8>,
    devices: Mutex<HashMap<String, Arc<Mutex<DeviceKeys>>>>,
    users: Mutex<HashMap<String, Credentials>>,
}

impl Keyring {
    /// A fresh manufacturing key written by `tether admin mfg-key generate`.
    pub async fn generate() -> Arc<Keyring> {
        let dir = tempfile::tempdir().expect("key tempdir");
        let path = dir.path().join("k1.key");
        admin([
            OsString::from("mfg-key"),
            "generate".into(),
            path.clone().into(),
        ])
        .await
        .ok();
        let mfg_key = read_hex_key(&path);
        Arc::new(Keyring {
            _dir: dir,
            mfg_key_path: path,
            mfg_key,
            devices: Mutex::new(HashMap::new()),
            users: Mutex::new(HashMap::new()),
        })
    }

    /// The real default credentials of `serial` under this key.
    pub fn default_credentials(&self, serial: &str) -> Credentials {
        let id = format!("d.{serial}.{KEY_ID}");
        let secret = default_secret(&self.mfg_key, &id);
        Credentials { id, secret }
    }

    /// The (shared, mutable) credential store of device `serial`.
    pub fn device(&self, serial: &str) -> Arc<Mutex<DeviceKeys>> {
        self.devices
            .lock()
            .expect("lock")
            .entry(serial.to_string())
            .or_insert_with(|| {
                Arc::new(Mutex::new(DeviceKeys {
                    default: self.default_credentials(serial),
                    assigned: None,
                }))
            })
            .clone()
    }

    /// A user's credentials, if the harness created that user.
    pub fn user(&self, user_id: &str) -> Option<Credentials> {
        self.users.lock().expect("lock").get(user_id).cloned()
    }

    fn add_user(&self, user_id: &str, c: Credentials) {
        self.users
            .lock()
            .expect("lock")
            .insert(user_id.to_string(), c);
    }

    /// Every secret the tests were given or computed (for log checks).
    pub fn all_secrets(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .users
            .lock()
            .expect("lock")
            .values()
            .map(|c| c.secret.clone())
            .collect();
        for keys in self.devices.lock().expect("lock").values() {
            let k = keys.lock().expect("lock");
            out.push(k.default.secret.clone());
            out.extend(k.assigned.iter().map(|c| c.secret.clone()));
        }
        out
    }
}

// ---------------------------------------------------------------------------------------
// the node process

/// How to start a node.
#[derive(Debug, Default)]
pub struct NodeBuilder {
    data_dir: Option<PathBuf>,
    config: Option<String>,
    args: Vec<String>,
    keyring: Option<Arc<Keyring>>,
    users: Vec<String>,
    env: Vec<(String, String)>,
    listen: Option<String>,
    tls: Option<(PathBuf, PathBuf)>,
    client: Option<Client>,
}

/// Why a node did not come up.
#[derive(Debug)]
pub struct StartFailure {
    /// Exit status, if the process exited.
    pub status: Option<ExitStatus>,
    /// Its stderr.
    pub stderr: String,
    /// What went wrong, for messages.
    pub what: String,
}

impl NodeBuilder {
    /// Use this data directory (kept by the caller, e.g. to restart on it).
    pub fn data_dir(mut self, p: &Path) -> Self {
        self.data_dir = Some(p.to_path_buf());
        self
    }

    /// Write this TOML to a file and pass `--config <file>`.
    pub fn config(mut self, toml: &str) -> Self {
        self.config = Some(toml.to_string());
        self
    }

    /// An extra command-line argument after `serve ...`.
    pub fn arg(mut self, a: impl Into<String>) -> Self {
        self.args.push(a.into());
        self
    }

    /// Reuse a keyring (manufacturing key and known credentials), e.g. across a restart.
    pub fn keyring(mut self, k: Arc<Keyring>) -> Self {
        self.keyring = Some(k);
        self
    }

    /// Create user `user_id` with `tether admin user add` before the node starts (skipped
    /// when the keyring already knows it, i.e. on a restart).
    pub fn user(mut self, user_id: &str) -> Self {
        self.users.push(user_id.to_string());
        self
    }

    /// An environment variable for the node process (e.g. `TETHER_LOG`).
    pub fn env(mut self, k: &str, v: &str) -> Self {
        self.env.push((k.to_string(), v.to_string()));
        self
    }

    /// `--listen` address (default `127.0.0.1:0`).
    pub fn listen(mut self, addr: &str) -> Self {
        self.listen = Some(addr.to_string());
        self
    }

    /// Serve HTTPS with this certificate and key.
    pub fn tls(mut self, cert: &Path, key: &Path) -> Self {
        self.tls = Some((cert.to_path_buf(), key.to_path_buf()));
        self
    }

    /// The client principals of this node use (e.g. one trusting a test certificate).
    pub fn client(mut self, c: Client) -> Self {
        self.client = Some(c);
        self
    }

    pub async fn start(self) -> Node {
        match self.try_start().await {
            Ok(n) => n,
            Err(f) => panic!("{}; stderr:\n{}", f.what, f.stderr),
        }
    }

    /// Starts the node; `Err` if it exited or printed something else than its listening line.
    pub async fn try_start(self) -> Result<Node, StartFailure> {
        let keyring = match self.keyring {
            Some(k) => k,
            None => Keyring::generate().await,
        };
        let logs = tempfile::tempdir().expect("log tempdir");
        let (data_dir, owned_data) = match self.data_dir {
            Some(p) => (p, None),
            None => {
                let t = tempfile::tempdir().expect("data tempdir");
                (t.path().to_path_buf(), Some(t))
            }
        };
        // Users first: `admin user add` opens the embedded store, which the node then owns.
        for u in &self.users {
            if keyring.user(u).is_some() {
                continue;
            }
            let out = admin([
                OsString::from("user"),
                "add".into(),
                u.into(),
                "--data-dir".into(),
                data_dir.clone().into(),
            ])
            .await
            .ok();
            let c = credentials_line(&out);
            assert_eq!(c.id, format!("u.{u}"), "admin user add output: {out:?}");
            keyring.add_user(u, c);
        }

        let log_path = logs.path().join("stderr.log");
        let stderr = std::fs::File::create(&log_path).expect("create stderr log");
        let tls = self.tls.is_some();

        let mut cmd = Command::new(crate::bin::tether());
        cmd.arg("serve")
            .arg("--listen")
            .arg(self.listen.as_deref().unwrap_or("127.0.0.1:0"))
            .arg("--data-dir")
            .arg(&data_dir)
            .arg("--mfg-key-file")
            .arg(format!("{KEY_ID}={}", keyring.mfg_key_path.display()));
        if !self
            .args
            .iter()
            .any(|a| a.starts_with("--requests-per-second"))
        {
            cmd.arg("--requests-per-second")
                .arg(TEST_REQUESTS_PER_SECOND.to_string());
        }
        // Through the environment, so a test's own flag or variable beats it (and an older
        // binary without the setting ignores it).
        cmd.env(
            "TETHER_MAX_CONNECTIONS_PER_SOURCE",
            TEST_CONNECTIONS_PER_SOURCE.to_string(),
        );
        if let Some((cert, key)) = &self.tls {
            cmd.arg("--tls-cert").arg(cert).arg("--tls-key").arg(key);
        }
        if let Some(cfg) = &self.config {
            let cfg_path = logs.path().join("tether.toml");
            std::fs::write(&cfg_path, cfg).expect("write config");
            cmd.arg("--config").arg(&cfg_path);
        }
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        cmd.args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(stderr))
            .kill_on_drop(true);
        let mut child = cmd.spawn().expect("spawn tether binary");
        let stdout = child.stdout.take().expect("child stdout");
        let mut lines = BufReader::new(stdout).lines();

        let fail = |status: Option<ExitStatus>, what: String| StartFailure {
            status,
            stderr: tail(&log_path),
            what,
        };
        let first = tokio::time::timeout(STARTUP_DEADLINE, lines.next_line()).await;
        let line = match first {
            Ok(Ok(Some(line))) => line,
            Ok(Ok(None)) => {
                let status = within(STARTUP_DEADLINE, "tether exit", child.wait())
                    .await
                    .ok();
                return Err(fail(
                    status,
                    format!("tether exited before printing its listening line (status {status:?})"),
                ));
            }
            Ok(Err(e)) => return Err(fail(None, format!("reading tether stdout: {e}"))),
            Err(_) => {
                return Err(fail(
                    None,
                    format!("tether printed nothing on stdout within {STARTUP_DEADLINE:?}"),
                ))
            }
        };
        let scheme = if tls { "https" } else { "http" };
        let host = match self.listen.as_deref() {
            Some(l) => l.rsplit_once(':').map_or(l, |(h, _)| h).to_string(),
            None => "127.0.0.1".to_string(),
        };
        let printed = line
            .strip_prefix("listening on ")
            .filter(|u| {
                u.strip_prefix(&format!("{scheme}://{host}:"))
                    .is_some_and(|p| p.parse::<u16>().is_ok_and(|p| p != 0))
            })
            .map(str::to_string);
        let Some(printed) = printed else {
            return Err(fail(
                None,
                format!("first stdout line must be `listening on {scheme}://{host}:<port>`, got {line:?}"),
            ));
        };
        // A wildcard listener is reached through loopback.
        let base = printed.replace("://0.0.0.0:", "://127.0.0.1:");

        // Keep draining stdout (the contract says nothing more is printed; record it if it is).
        let extra = Arc::new(Mutex::new(Vec::new()));
        let extra2 = extra.clone();
        tokio::spawn(async move {
            while let Ok(Some(l)) = lines.next_line().await {
                extra2.lock().expect("lock").push(l);
            }
        });

        Ok(Node {
            child,
            base,
            printed,
            data_dir,
            log_path,
            stdout_extra: extra,
            client: self.client.unwrap_or_else(http_client),
            keyring,
            _owned_data: owned_data,
            _logs: logs,
        })
    }
}

fn tail(path: &Path) -> String {
    let s = std::fs::read_to_string(path).unwrap_or_default();
    let start = s.len().saturating_sub(6000);
    let start = (start..=s.len())
        .find(|i| s.is_char_boundary(*i))
        .unwrap_or(s.len());
    s[start..].to_string()
}

/// A running `tether serve` child process.
#[derive(Debug)]
pub struct Node {
    child: Child,
    /// `http(s)://127.0.0.1:<port>`: where requests go.
    pub base: String,
    /// The URL of the listening line as printed.
    pub printed: String,
    pub data_dir: PathBuf,
    log_path: PathBuf,
    stdout_extra: Arc<Mutex<Vec<String>>>,
    /// A shared client for this node.
    pub client: Client,
    keyring: Arc<Keyring>,
    _owned_data: Option<tempfile::TempDir>,
    _logs: tempfile::TempDir,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        if std::thread::panicking() {
            eprintln!(
                "---- tether stderr ({}) tail ----\n{}\n---- end ----",
                self.base,
                tail(&self.log_path)
            );
        }
    }
}

impl Node {
    /// Waits until `/readyz` answers 200 with `members` cluster members; fails after 30 s
    /// with the last answer and the node's stderr.
    pub async fn wait_ready(&self, members: u64) {
        let client = http_client();
        let start = std::time::Instant::now();
        loop {
            let last = match client.get(self.url("/readyz")).send().await {
                Ok(r) => {
                    let status = r.status();
                    let body: Value = r.json().await.unwrap_or(Value::Null);
                    if status == StatusCode::OK && body["members"] == members {
                        return;
                    }
                    format!("{status} {body}")
                }
                Err(e) => e.to_string(),
            };
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "{} not ready with {members} members after 30 s (last {last}); stderr:\n{}",
                self.base,
                self.stderr_tail()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn builder() -> NodeBuilder {
        NodeBuilder::default()
    }

    /// A node with defaults and a fresh data directory.
    pub async fn start() -> Node {
        Node::builder().start().await
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    pub fn pid(&self) -> u32 {
        self.child.id().expect("child still running")
    }

    /// The node's resident memory (`VmRSS`), in bytes.
    pub fn rss(&self) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).expect("status");
        let kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .expect("VmRSS");
        kib * 1024
    }

    /// The manufacturing key and credentials of this node's devices and users.
    pub fn keyring(&self) -> Arc<Keyring> {
        self.keyring.clone()
    }

    /// The server's stderr so far (last few KB).
    pub fn stderr_tail(&self) -> String {
        tail(&self.log_path)
    }

    /// The server's whole stderr so far.
    pub fn stderr_all(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Lines printed on stdout after the listening line.
    pub fn stdout_extra(&self) -> Vec<String> {
        self.stdout_extra.lock().expect("lock").clone()
    }

    /// Device `serial` as the device itself: default credentials until a response assigns
    /// some, assigned ones from then on. All handles of one serial share their credentials.
    pub fn device(&self, serial: &str) -> Principal {
        self.device_with(serial, self.client.clone())
    }

    /// Same, on a caller-provided client (e.g. to drop all its connections at once).
    pub fn device_with(&self, serial: &str, client: Client) -> Principal {
        Principal {
            client,
            base: self.base.clone(),
            serial: Some(serial.to_string()),
            auth: Auth::Device {
                keys: self.keyring.device(serial),
                using: Using::Current,
            },
        }
    }

    /// Device `serial` presenting its assigned credentials (panics if it has none yet).
    pub fn assigned(&self, serial: &str) -> Principal {
        let mut p = self.device(serial);
        p.auth = Auth::Device {
            keys: self.keyring.device(serial),
            using: Using::Assigned,
        };
        p
    }

    /// Device `serial` presenting its default (factory) credentials, whatever it holds.
    pub fn factory(&self, serial: &str) -> Principal {
        let mut p = self.device(serial);
        p.auth = Auth::Device {
            keys: self.keyring.device(serial),
            using: Using::Default,
        };
        p
    }

    /// The user `user_id` (`u.<user_id>`), created by [`NodeBuilder::user`].
    #[track_caller]
    pub fn user(&self, user_id: &str) -> Principal {
        let c = self.keyring.user(user_id).unwrap_or_else(|| {
            panic!("user {user_id} was not created; use Node::builder().user({user_id:?})")
        });
        self.with_credentials(c)
    }

    /// A principal presenting exactly `c` (never updated from responses).
    pub fn with_credentials(&self, c: Credentials) -> Principal {
        let serial = tether_proto::credentials::CredentialId::parse(&c.id)
            .ok()
            .and_then(|id| id.serial().map(str::to_string));
        Principal {
            client: self.client.clone(),
            base: self.base.clone(),
            serial,
            auth: Auth::Fixed(c),
        }
    }

    /// A request without any authentication.
    pub fn anon(&self, method: Method, path: &str) -> RequestBuilder {
        self.client.request(method, self.url(path))
    }

    /// Sends a request built on this node's client, bounded by [`REQUEST_DEADLINE`].
    pub async fn send(&self, rb: RequestBuilder) -> Resp {
        send(rb).await
    }

    /// `GET /metrics` text.
    pub async fn metrics(&self) -> String {
        let r = self.send(self.anon(Method::GET, "/metrics")).await;
        assert_eq!(r.status, StatusCode::OK, "/metrics: {}", r.text());
        r.text()
    }

    /// Sum of all series of metric `name` (with or without labels); None if absent.
    pub async fn metric(&self, name: &str) -> Option<f64> {
        metric_value(&self.metrics().await, name)
    }

    /// Polls `/metrics` until `pred(value of name)` holds; panics after `limit`.
    pub async fn wait_metric(
        &self,
        name: &str,
        limit: Duration,
        what: &str,
        pred: impl Fn(f64) -> bool,
    ) -> f64 {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let v = self.metric(name).await;
            if let Some(v) = v {
                if pred(v) {
                    return v;
                }
            }
            if tokio::time::Instant::now() >= deadline {
                panic!("timed out after {limit:?} waiting for {what}: {name} = {v:?}");
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Waits until exactly `n` subscriptions are held.
    pub async fn wait_held(&self, n: u64, limit: Duration) {
        self.wait_metric(
            "tether_held_subscriptions",
            limit,
            &format!("{n} held subscriptions"),
            |v| v == n as f64,
        )
        .await;
    }

    /// SIGKILL and reap.
    pub async fn kill9(&mut self) {
        self.child.kill().await.expect("kill -9 tether");
    }

    /// Sends SIGTERM via `kill -TERM <pid>`.
    pub async fn sigterm(&self) {
        let st = Command::new("kill")
            .arg("-TERM")
            .arg(self.pid().to_string())
            .status()
            .await
            .expect("run kill -TERM");
        assert!(st.success(), "kill -TERM failed: {st:?}");
    }

    /// Waits for the process to exit.
    pub async fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        within(limit, "tether process exit", self.child.wait())
            .await
            .expect("wait for tether")
    }
}

/// Sum of the samples of metric `name` in Prometheus text.
pub use tether_node::metrics::sample_sum as metric_value;

/// Sends `rb`, bounded by [`REQUEST_DEADLINE`].
pub async fn send(rb: RequestBuilder) -> Resp {
    send_within(REQUEST_DEADLINE, rb).await
}

/// Sends `rb`, bounded by `limit`.
pub async fn send_within(limit: Duration, rb: RequestBuilder) -> Resp {
    within(limit, "HTTP request", async {
        let r = rb.send().await.expect("send HTTP request");
        Resp::read(r).await
    })
    .await
}

/// The credentials in a response's `X-Tether-Set-Credentials` header, if any (panics if
/// the header is malformed).
#[track_caller]
pub fn set_credentials_of(r: &Resp) -> Option<Credentials> {
    let v = r.headers.get(SET_CREDENTIALS)?;
    let s = v.to_str().expect("X-Tether-Set-Credentials is ASCII");
    Some(parse_set_credentials(s).unwrap_or_else(|e| {
        panic!(
            "malformed X-Tether-Set-Credentials ({e}) on a {} response",
            r.status
        )
    }))
}

// ---------------------------------------------------------------------------------------
// principals

/// Which of its credentials a device handle presents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Using {
    /// Assigned if it has them, else default: what a device does.
    Current,
    /// Always the default (factory) credentials.
    Default,
    /// Always the assigned ones (panics if there are none).
    Assigned,
}

#[derive(Debug, Clone)]
enum Auth {
    /// A device's credential store; updated from `X-Tether-Set-Credentials`.
    Device {
        keys: Arc<Mutex<DeviceKeys>>,
        using: Using,
    },
    /// Exactly these credentials, never updated.
    Fixed(Credentials),
}

/// A client acting as one principal (device or user) via HTTP Basic auth.
#[derive(Debug, Clone)]
pub struct Principal {
    pub client: Client,
    pub base: String,
    /// The device serial, for device principals.
    pub serial: Option<String>,
    auth: Auth,
}

impl Principal {
    pub fn serial(&self) -> &str {
        self.serial.as_deref().expect("not a device principal")
    }

    /// The credentials the next request presents.
    #[track_caller]
    pub fn credentials(&self) -> Credentials {
        match &self.auth {
            Auth::Fixed(c) => c.clone(),
            Auth::Device { keys, using } => {
                let k = keys.lock().expect("lock");
                match using {
                    Using::Default => k.default.clone(),
                    Using::Current => k.assigned.clone().unwrap_or_else(|| k.default.clone()),
                    Using::Assigned => k.assigned.clone().unwrap_or_else(|| {
                        panic!("device {} holds no assigned credentials", k.default.id)
                    }),
                }
            }
        }
    }

    /// The device's assigned credentials, if it holds any.
    pub fn assigned_credentials(&self) -> Option<Credentials> {
        match &self.auth {
            Auth::Device { keys, .. } => keys.lock().expect("lock").assigned.clone(),
            Auth::Fixed(_) => None,
        }
    }

    /// The device's default credentials.
    pub fn default_credentials(&self) -> Credentials {
        match &self.auth {
            Auth::Device { keys, .. } => keys.lock().expect("lock").default.clone(),
            Auth::Fixed(c) => panic!("{} is not a device handle", c.id),
        }
    }

    /// The user name the next request presents.
    pub fn username(&self) -> String {
        self.credentials().id
    }

    /// The same principal on another client.
    pub fn with_client(&self, client: Client) -> Principal {
        Principal {
            client,
            ..self.clone()
        }
    }

    /// A handle presenting exactly `c` (not updated from responses), same client and base.
    pub fn with_credentials(&self, c: Credentials) -> Principal {
        Principal {
            auth: Auth::Fixed(c),
            ..self.clone()
        }
    }

    /// Stores credentials a response handed out, as a device does at once.
    #[track_caller]
    pub fn absorb(&self, r: &Resp) {
        let Some(c) = set_credentials_of(r) else {
            return;
        };
        if let Auth::Device { keys, .. } = &self.auth {
            let mut k = keys.lock().expect("lock");
            let serial = k
                .default
                .id
                .split('.')
                .nth(1)
                .unwrap_or_default()
                .to_string();
            assert_eq!(
                c.id,
                format!("a.{serial}"),
                "X-Tether-Set-Credentials for device {serial} names another id"
            );
            k.assigned = Some(c);
        }
    }

    /// An authenticated request.
    pub fn req(&self, method: Method, path: &str) -> RequestBuilder {
        let c = self.credentials();
        self.client
            .request(method, format!("{}{}", self.base, path))
            .basic_auth(&c.id, Some(&c.secret))
    }

    /// Sends a request (bounded by [`REQUEST_DEADLINE`]) and keeps any credentials the
    /// response hands out.
    pub async fn send(&self, rb: RequestBuilder) -> Resp {
        self.send_within(REQUEST_DEADLINE, rb).await
    }

    /// Same, bounded by `limit`.
    pub async fn send_within(&self, limit: Duration, rb: RequestBuilder) -> Resp {
        let r = send_within(limit, rb).await;
        self.absorb(&r);
        r
    }

    pub async fn get(&self, path: &str) -> Resp {
        self.send(self.req(Method::GET, path)).await
    }

    /// `GET /v1/buckets/{id}` asserting 200; the bucket JSON.
    pub async fn bucket(&self, id: &str) -> Value {
        self.get(&format!("/v1/buckets/{id}"))
            .await
            .expect_json(StatusCode::OK)
    }

    /// `POST /v1/register` with this device's own id.
    pub async fn register(&self, device_type: &str, sw_version: &str) -> Resp {
        let id = self.serial().to_string();
        self.register_as(&id, device_type, sw_version).await
    }

    /// `POST /v1/register` with an arbitrary `device_id`.
    pub async fn register_as(&self, device_id: &str, device_type: &str, sw_version: &str) -> Resp {
        self.send(
            self.req(Method::POST, "/v1/register")
                .json(&serde_json::json!({
                    "device_id": device_id,
                    "device_type": device_type,
                    "sw_version": sw_version,
                })),
        )
        .await
    }

    /// Registers as a `thermostat` (sw 1.0.0) and asserts a plain production answer and
    /// that the device now holds assigned credentials.
    pub async fn register_thermostat(&self) -> RegisterResponse {
        let v = self
            .register("thermostat", "1.0.0")
            .await
            .expect_json(StatusCode::OK);
        let r: RegisterResponse = serde_json::from_value(v.clone())
            .unwrap_or_else(|e| panic!("register response {v}: {e}"));
        let mut got = r.buckets.clone();
        got.sort();
        assert_eq!(got, thermostat_buckets(self.serial()), "register: {v}");
        assert!(
            self.assigned_credentials().is_some(),
            "after registering, device {} must hold assigned credentials (X-Tether-Set-Credentials)",
            self.serial()
        );
        r
    }

    /// `PUT /v1/buckets/{id}` with a JSON body.
    pub async fn put(&self, id: &str, body: &Value) -> Resp {
        self.send(
            self.req(Method::PUT, &format!("/v1/buckets/{id}"))
                .json(body),
        )
        .await
    }

    /// `PUT` with a raw body and content type.
    pub async fn put_raw(&self, id: &str, content_type: &str, body: Vec<u8>) -> Resp {
        self.send(
            self.req(Method::PUT, &format!("/v1/buckets/{id}"))
                .header(CONTENT_TYPE, content_type)
                .body(body),
        )
        .await
    }

    /// `PUT` as protobuf, asking for a protobuf answer.
    pub async fn put_pb(&self, id: &str, body: Vec<u8>) -> Resp {
        self.send(
            self.req(Method::PUT, &format!("/v1/buckets/{id}"))
                .header(CONTENT_TYPE, PROTOBUF)
                .header(ACCEPT, PROTOBUF)
                .body(body),
        )
        .await
    }

    /// `POST /v1/subscribe` (JSON), bounded by `limit`.
    pub async fn subscribe(&self, body: &Value, limit: Duration) -> Resp {
        self.send_within(limit, self.req(Method::POST, "/v1/subscribe").json(body))
            .await
    }

    /// Applies `fields` on top of `base_version` (no OCC) and asserts `applied`;
    /// returns the new (timestamp, version).
    pub async fn write(&self, id: &str, fields: Value, base_version: u64) -> (u64, u64) {
        let v = self
            .put(
                id,
                &serde_json::json!({"value": fields, "base_version": base_version}),
            )
            .await
            .expect_json(StatusCode::OK);
        assert_eq!(v["outcome"], "applied", "PUT {id}: {v}");
        (u64_of(&v, "timestamp"), u64_of(&v, "version"))
    }

    /// `POST /v1/pairing-code` (a device): the code.
    pub async fn pairing_code(&self) -> String {
        let v = self
            .send(self.req(Method::POST, "/v1/pairing-code"))
            .await
            .expect_json(StatusCode::OK);
        v["code"]
            .as_str()
            .unwrap_or_else(|| panic!("pairing-code answer without code: {v}"))
            .to_string()
    }

    /// `POST /v1/pair` (a user).
    pub async fn pair(&self, code: &str, structure: Option<&str>) -> Resp {
        let mut body = serde_json::json!({"code": code});
        if let Some(s) = structure {
            body["structure"] = Value::from(s);
        }
        self.send(self.req(Method::POST, "/v1/pair").json(&body))
            .await
    }

    /// `DELETE /v1/devices/{device_id}/pairing` (a user).
    pub async fn unpair(&self, device_id: &str) -> Resp {
        self.send(self.req(Method::DELETE, &format!("/v1/devices/{device_id}/pairing")))
            .await
    }

    /// `POST /v1/blobs` announcing `bytes` (API.md "Blobs").
    pub async fn announce_blob(&self, bytes: &[u8], content_type: &str) -> Resp {
        let body = serde_json::json!({
            "sha256": sha256_hex(bytes),
            "size": bytes.len(),
            "content_type": content_type,
        });
        self.send(self.req(Method::POST, "/v1/blobs").json(&body))
            .await
    }

    /// `PUT /v1/blobs/{sha256}` of `bytes[first..=last]` with its `Content-Range`.
    pub async fn blob_range(&self, bytes: &[u8], first: usize, last: usize) -> Resp {
        let range = format!("bytes {first}-{last}/{}", bytes.len());
        self.send(
            self.req(Method::PUT, &format!("/v1/blobs/{}", sha256_hex(bytes)))
                .header(reqwest::header::CONTENT_RANGE, range)
                .body(bytes[first..=last].to_vec()),
        )
        .await
    }

    /// `GET /v1/blobs/{sha256}`.
    pub async fn blob(&self, sha256: &str) -> Resp {
        self.get(&format!("/v1/blobs/{sha256}")).await
    }
}

/// A blob's address: the SHA-256 of `bytes` in hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    tether_proto::blob::BlobHash::of(bytes).to_string()
}
