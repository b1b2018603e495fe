//! Shared harness for the black-box tests: starts the real `tether` binary on a free
//! port with its own data directory, and drives it over plain HTTP/1.1 with reqwest.
//!
//! Conventions:
//! - every wait is bounded by a generous deadline (startup 20 s, a notification 2 s,
//!   a plain request 10 s); nothing sleeps to "let things settle" — waits poll for the
//!   event they need (a stdout line, a metric value, a process exit);
//! - the child is SIGKILLed when its [`Node`] is dropped; when a test panics, the tail
//!   of the server's stderr is printed so the failure can be diagnosed.
#![allow(dead_code)]

use std::collections::BTreeSet;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use reqwest::header::{ACCEPT, CONTENT_TYPE};
use reqwest::{Client, Method, RequestBuilder, StatusCode};
use serde_json::Value;
use tether_proto::api::{ErrorBody, RegisterResponse, WireMessage};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// How long the binary may take to print its `listening on` line.
pub const STARTUP_DEADLINE: Duration = Duration::from_secs(20);
/// How long a held subscription may take to be answered after the change that wakes it.
pub const NOTIFY_DEADLINE: Duration = Duration::from_secs(2);
/// Upper bound for any request that is not a held subscription.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(10);

/// The protobuf media type.
pub const PROTOBUF: &str = "application/x-protobuf";

/// Default credential key id used in `d.<serial>.<key_id>` user names.
pub const KEY_ID: &str = "k1";
/// Any non-empty password (not verified by the foundation server).
pub const PASSWORD: &str = "not-verified-yet";

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
// the node process

/// How to start a node.
#[derive(Debug, Default)]
pub struct NodeBuilder {
    data_dir: Option<PathBuf>,
    config: Option<String>,
    args: Vec<String>,
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

    pub async fn start(self) -> Node {
        let logs = tempfile::tempdir().expect("log tempdir");
        let (data_dir, owned_data) = match self.data_dir {
            Some(p) => (p, None),
            None => {
                let t = tempfile::tempdir().expect("data tempdir");
                (t.path().to_path_buf(), Some(t))
            }
        };
        let log_path = logs.path().join("stderr.log");
        let stderr = std::fs::File::create(&log_path).expect("create stderr log");

        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tether"));
        cmd.arg("serve")
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--data-dir")
            .arg(&data_dir);
        if let Some(cfg) = &self.config {
            let cfg_path = logs.path().join("tether.toml");
            std::fs::write(&cfg_path, cfg).expect("write config");
            cmd.arg("--config").arg(&cfg_path);
        }
        cmd.args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(stderr))
            .kill_on_drop(true);
        let mut child = cmd.spawn().expect("spawn tether binary");
        let stdout = child.stdout.take().expect("child stdout");
        let mut lines = BufReader::new(stdout).lines();

        let first = tokio::time::timeout(STARTUP_DEADLINE, lines.next_line()).await;
        let line = match first {
            Ok(Ok(Some(line))) => line,
            Ok(Ok(None)) => {
                let status = child.wait().await.ok();
                panic!(
                    "tether exited before printing its listening line (status {status:?}); stderr:\n{}",
                    tail(&log_path)
                )
            }
            Ok(Err(e)) => panic!("reading tether stdout: {e}; stderr:\n{}", tail(&log_path)),
            Err(_) => panic!(
                "tether printed nothing on stdout within {STARTUP_DEADLINE:?}; stderr:\n{}",
                tail(&log_path)
            ),
        };
        let base = line
            .strip_prefix("listening on ")
            .filter(|u| {
                u.strip_prefix("http://127.0.0.1:")
                    .is_some_and(|p| p.parse::<u16>().is_ok_and(|p| p != 0))
            })
            .unwrap_or_else(|| {
                panic!(
                    "first stdout line must be `listening on http://127.0.0.1:<port>`, got {line:?}; stderr:\n{}",
                    tail(&log_path)
                )
            })
            .to_string();

        // Keep draining stdout (the contract says nothing more is printed; record it if it is).
        let extra = Arc::new(Mutex::new(Vec::new()));
        let extra2 = extra.clone();
        tokio::spawn(async move {
            while let Ok(Some(l)) = lines.next_line().await {
                extra2.lock().expect("lock").push(l);
            }
        });

        Node {
            child,
            base,
            data_dir,
            log_path,
            stdout_extra: extra,
            client: http_client(),
            _owned_data: owned_data,
            _logs: logs,
        }
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
    /// `http://127.0.0.1:<port>` from the listening line.
    pub base: String,
    pub data_dir: PathBuf,
    log_path: PathBuf,
    stdout_extra: Arc<Mutex<Vec<String>>>,
    /// A shared client for this node.
    pub client: Client,
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

    /// The server's stderr so far (last few KB).
    pub fn stderr_tail(&self) -> String {
        tail(&self.log_path)
    }

    /// Lines printed on stdout after the listening line.
    pub fn stdout_extra(&self) -> Vec<String> {
        self.stdout_extra.lock().expect("lock").clone()
    }

    /// The device `serial` with default-credential style user name `d.<serial>.<key_id>`.
    pub fn device(&self, serial: &str) -> Principal {
        self.device_with(serial, self.client.clone())
    }

    /// Same, on a caller-provided client (e.g. to drop all its connections at once).
    pub fn device_with(&self, serial: &str, client: Client) -> Principal {
        Principal {
            client,
            base: self.base.clone(),
            username: format!("d.{serial}.{KEY_ID}"),
            password: PASSWORD.to_string(),
            serial: Some(serial.to_string()),
        }
    }

    /// The device `serial` with assigned-credential style user name `a.<serial>`.
    pub fn assigned(&self, serial: &str) -> Principal {
        Principal {
            client: self.client.clone(),
            base: self.base.clone(),
            username: format!("a.{serial}"),
            password: PASSWORD.to_string(),
            serial: Some(serial.to_string()),
        }
    }

    /// The user `user_id` (`u.<user_id>`).
    pub fn user(&self, user_id: &str) -> Principal {
        Principal {
            client: self.client.clone(),
            base: self.base.clone(),
            username: format!("u.{user_id}"),
            password: PASSWORD.to_string(),
            serial: None,
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
pub fn metric_value(text: &str, name: &str) -> Option<f64> {
    let mut found = None;
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        let rest = if let Some(r) = rest.strip_prefix('{') {
            match r.find('}') {
                Some(i) => &r[i + 1..],
                None => continue,
            }
        } else if rest.starts_with(' ') {
            rest
        } else {
            continue; // a longer metric name sharing the prefix
        };
        let Some(v) = rest.split_whitespace().next() else {
            continue;
        };
        if let Ok(v) = v.parse::<f64>() {
            *found.get_or_insert(0.0) += v;
        }
    }
    found
}

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

// ---------------------------------------------------------------------------------------
// principals

/// A client acting as one principal (device or user) via HTTP Basic auth.
#[derive(Debug, Clone)]
pub struct Principal {
    pub client: Client,
    pub base: String,
    pub username: String,
    pub password: String,
    /// The device serial, for device principals.
    pub serial: Option<String>,
}

impl Principal {
    pub fn serial(&self) -> &str {
        self.serial.as_deref().expect("not a device principal")
    }

    /// An authenticated request.
    pub fn req(&self, method: Method, path: &str) -> RequestBuilder {
        self.client
            .request(method, format!("{}{}", self.base, path))
            .basic_auth(&self.username, Some(&self.password))
    }

    pub async fn get(&self, path: &str) -> Resp {
        send(self.req(Method::GET, path)).await
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
        send(
            self.req(Method::POST, "/v1/register")
                .json(&serde_json::json!({
                    "device_id": device_id,
                    "device_type": device_type,
                    "sw_version": sw_version,
                })),
        )
        .await
    }

    /// Registers as a `thermostat` (sw 1.0.0) and asserts a plain production answer.
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
        r
    }

    /// `PUT /v1/buckets/{id}` with a JSON body.
    pub async fn put(&self, id: &str, body: &Value) -> Resp {
        send(
            self.req(Method::PUT, &format!("/v1/buckets/{id}"))
                .json(body),
        )
        .await
    }

    /// `PUT` with a raw body and content type.
    pub async fn put_raw(&self, id: &str, content_type: &str, body: Vec<u8>) -> Resp {
        send(
            self.req(Method::PUT, &format!("/v1/buckets/{id}"))
                .header(CONTENT_TYPE, content_type)
                .body(body),
        )
        .await
    }

    /// `PUT` as protobuf, asking for a protobuf answer.
    pub async fn put_pb(&self, id: &str, body: Vec<u8>) -> Resp {
        send(
            self.req(Method::PUT, &format!("/v1/buckets/{id}"))
                .header(CONTENT_TYPE, PROTOBUF)
                .header(ACCEPT, PROTOBUF)
                .body(body),
        )
        .await
    }

    /// `POST /v1/subscribe` (JSON), bounded by `limit`.
    pub async fn subscribe(&self, body: &Value, limit: Duration) -> Resp {
        send_within(limit, self.req(Method::POST, "/v1/subscribe").json(body)).await
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
}
