//! Command line, environment (`TETHER_*`) and config file, merged in that order of
//! precedence over built-in defaults.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use serde::Deserialize;

use crate::error::{NodeError, Result};
use crate::registration::RegistrationConfig;
use crate::security::credentials::CredentialConfig;

/// Tether: keeps devices and apps in sync through the cloud.
#[derive(Debug, Parser)]
#[command(name = "tether", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Sub-commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a node.
    Serve(Box<ServeArgs>),
    /// Operator tools: manufacturing keys, default credentials, users, certificates.
    #[command(subcommand)]
    Admin(AdminCommand),
    /// Check a running node or cluster from outside (the Helm chart's `helm test`): exits
    /// 0 when it is ready, with the expected members, and its device API answers.
    Check(CheckArgs),
}

/// `tether check <url>`.
#[derive(Debug, Args)]
pub struct CheckArgs {
    /// The base URL devices use (`https://devices.example.com`, or a node's URL).
    pub url: String,
    /// Connect to this host instead of the URL's (a Kubernetes Service's name), on the
    /// URL's port, still verifying the certificate for the URL's host name.
    #[arg(long)]
    pub connect_host: Option<String>,
    /// CA certificate (PEM) to verify an `https://` URL with; required for `https://`.
    #[arg(long)]
    pub ca_file: Option<PathBuf>,
    /// Require `/readyz` to report this many cluster members.
    #[arg(long)]
    pub expect_members: Option<usize>,
    /// Keep retrying until this many seconds passed.
    #[arg(long, default_value_t = 60)]
    pub timeout_s: u64,
}

/// `tether admin …`.
#[derive(Debug, Subcommand)]
pub enum AdminCommand {
    /// Manufacturing keys (64 random bytes, one per key id).
    #[command(subcommand, name = "mfg-key")]
    MfgKey(MfgKeyCommand),
    /// Print a device's default (factory) credentials, as a production line would.
    DefaultCredentials {
        /// The device serial.
        serial: String,
        /// Which manufacturing key signs them.
        #[arg(long)]
        key_id: String,
        /// The manufacturing key file.
        #[arg(long)]
        mfg_key_file: PathBuf,
    },
    /// User accounts.
    #[command(subcommand)]
    User(UserCommand),
    /// Blobs kept by the operator (a firmware image for a software update offer).
    #[command(subcommand)]
    Blob(BlobCommand),
    /// The firmware signing key (Ed25519): its public half is built into the firmware
    /// (`TETHER_FIRMWARE_KEY`), which takes only images it signed.
    #[command(subcommand, name = "firmware-key")]
    FirmwareKey(FirmwareKeyCommand),
    /// Sign a firmware image: print the `signature` of its `[[software_updates]]` offer
    /// (Ed25519 over the image's SHA-512, as embassy-boot verifies it on the device).
    SignFirmware {
        /// The image (the application binary for the device's active partition).
        file: PathBuf,
        /// The firmware key file (`tether admin firmware-key generate`).
        #[arg(long)]
        key_file: PathBuf,
    },
    /// Print a bucket's history (its sync log): who changed which fields, when, with
    /// which op id — the audit trail.
    History {
        /// The bucket id, e.g. `device.01AA02AB`.
        bucket: String,
        /// Only changes after this version.
        #[arg(long, default_value_t = 0)]
        since_version: u64,
        /// At most this many changes.
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// One JSON object (API.md's history answer) instead of a table.
        #[arg(long)]
        json: bool,
        /// The node's data directory (the node must be stopped: redb is single-process).
        #[arg(long, env = "TETHER_DATA_DIR", default_value = "./tether-data")]
        data_dir: PathBuf,
        /// The store, as for `tether serve --store` (a cluster's shared PostgreSQL, which
        /// the nodes may keep using) [default: redb:<data-dir>].
        #[arg(long, env = "TETHER_STORE")]
        store: Option<String>,
    },
    /// Create a cluster CA (certificate and key, PEM) for mTLS between nodes.
    ClusterCa {
        /// CA certificate output path (every node's --cluster-tls-ca).
        #[arg(long, default_value = "cluster-ca.pem")]
        cert: PathBuf,
        /// CA private key output path (keep it off the nodes).
        #[arg(long, default_value = "cluster-ca-key.pem")]
        key: PathBuf,
    },
    /// Issue a node's certificate and key (PEM) from the cluster CA, for TLS client and
    /// server use on the internal port.
    ClusterCert {
        /// The cluster CA certificate.
        #[arg(long)]
        ca_cert: PathBuf,
        /// The cluster CA private key.
        #[arg(long)]
        ca_key: PathBuf,
        /// Certificate output path (--cluster-tls-cert).
        #[arg(long)]
        cert: PathBuf,
        /// Private key output path (--cluster-tls-key).
        #[arg(long)]
        key: PathBuf,
        /// Names the certificate carries (DNS names or IP addresses); the first is its
        /// common name.
        #[arg(long = "san", default_values_t = ["tether-node".to_string()])]
        sans: Vec<String>,
        /// Validity in days.
        #[arg(long, default_value_t = 365)]
        days: u32,
    },
    /// Write a self-signed certificate and key (PEM) for development.
    SelfSigned {
        /// Certificate output path.
        #[arg(long, default_value = "tether-cert.pem")]
        cert: PathBuf,
        /// Private key output path.
        #[arg(long, default_value = "tether-key.pem")]
        key: PathBuf,
        /// Subject alternative names (DNS names or IP addresses).
        #[arg(long = "san", default_values_t = ["localhost".to_string(), "127.0.0.1".to_string()])]
        sans: Vec<String>,
    },
}

/// `tether admin mfg-key …`.
#[derive(Debug, Subcommand)]
pub enum MfgKeyCommand {
    /// Create a new manufacturing key file (hex, mode 0600).
    Generate {
        /// Where to write it; refuses to overwrite.
        path: PathBuf,
    },
}

/// `tether admin firmware-key …`.
#[derive(Debug, Subcommand)]
pub enum FirmwareKeyCommand {
    /// Create a firmware key file (a 32-byte Ed25519 seed as hex, mode 0600) and print its
    /// public key (64 hex digits, the firmware's `TETHER_FIRMWARE_KEY`).
    Generate {
        /// Where to write it; refuses to overwrite.
        path: PathBuf,
    },
    /// Print a firmware key file's public key.
    Public {
        /// The key file.
        path: PathBuf,
    },
}

/// `tether admin blob …`.
#[derive(Debug, Subcommand)]
pub enum BlobCommand {
    /// Store a file as a blob, pinned (never collected), and print `<sha256> <size>` for
    /// a `[[software_updates]]` offer (`sha256 = …`, `size = …`).
    Put {
        /// The file.
        file: PathBuf,
        /// Its media type.
        #[arg(long, default_value = "application/octet-stream")]
        content_type: String,
        /// The node's data directory (the node must be stopped: redb is single-process).
        #[arg(long, env = "TETHER_DATA_DIR", default_value = "./tether-data")]
        data_dir: PathBuf,
        /// The store, as for `tether serve --store` (a cluster's shared PostgreSQL, which
        /// the nodes may keep using) [default: redb:<data-dir>].
        #[arg(long, env = "TETHER_STORE")]
        store: Option<String>,
    },
}

/// `tether admin user …`.
#[derive(Debug, Subcommand)]
pub enum UserCommand {
    /// Create a user and print its credentials (`u.<user_id> <secret>`).
    Add {
        /// The user id ([A-Za-z0-9_-]{1,64}).
        user_id: String,
        /// The node's data directory (the node must be stopped: redb is single-process).
        #[arg(long, env = "TETHER_DATA_DIR", default_value = "./tether-data")]
        data_dir: PathBuf,
        /// The store, as for `tether serve --store` (a cluster's shared PostgreSQL, which
        /// the nodes may keep using) [default: redb:<data-dir>].
        #[arg(long, env = "TETHER_STORE", conflicts_with = "store_file")]
        store: Option<String>,
        /// A file holding the store URL, as for `tether serve --store-file`.
        #[arg(long, env = "TETHER_STORE_FILE")]
        store_file: Option<PathBuf>,
        /// A file holding the PostgreSQL password, as for `tether serve`.
        #[arg(long, env = "TETHER_STORE_PASSWORD_FILE")]
        store_password_file: Option<PathBuf>,
    },
}

/// `tether serve` flags; each has a `TETHER_*` environment override and a config-file key.
#[derive(Debug, Args, Default)]
pub struct ServeArgs {
    /// Device API address [default: 127.0.0.1:8080]. Plain HTTP only on loopback.
    #[arg(long, env = "TETHER_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Where the embedded store keeps its file [default: ./tether-data].
    #[arg(long, env = "TETHER_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Durable store: `redb:PATH` (embedded, one node) or `postgres://user@host:port/db`
    /// (shared by a cluster) [default: redb:<data-dir>]. Never put a password here (the
    /// command line is visible to every process): use --store-file or
    /// --store-password-file.
    #[arg(long, env = "TETHER_STORE")]
    pub store: Option<String>,
    /// A file holding the store URL instead of --store (a mounted Kubernetes Secret);
    /// read at start.
    #[arg(long, env = "TETHER_STORE_FILE")]
    pub store_file: Option<PathBuf>,
    /// A file holding the PostgreSQL password, added to the store URL (which must not
    /// carry one); read at start.
    #[arg(long, env = "TETHER_STORE_PASSWORD_FILE")]
    pub store_password_file: Option<PathBuf>,
    /// TOML config file (device types, tiers, software updates, and any flag's key).
    #[arg(long, env = "TETHER_CONFIG")]
    pub config: Option<PathBuf>,
    /// URL devices are told to sync with [default: http://<listen address>].
    #[arg(long, env = "TETHER_PUBLIC_URL")]
    pub public_url: Option<String>,
    /// This node's name (lease owner) [default: tether-1].
    #[arg(long, env = "TETHER_NODE_ID")]
    pub node_id: Option<String>,
    /// Largest bucket, and largest request body beyond a small envelope [default: 65536].
    #[arg(long, env = "TETHER_MAX_BUCKET_BYTES")]
    pub max_bucket_bytes: Option<usize>,
    /// Largest blob (API.md "Blobs") [default: 16777216 = 16 MiB].
    #[arg(long, env = "TETHER_MAX_BLOB_BYTES")]
    pub max_blob_bytes: Option<u64>,
    /// How long a blob no bucket references (or an upload never finished) is kept before
    /// it is deleted [default: 86400 = 24 h].
    #[arg(long, env = "TETHER_BLOB_GRACE_SECS")]
    pub blob_grace_secs: Option<u64>,
    /// Push gateway: a change to a bucket of an offline device posts a signed,
    /// payload-free wake-up here (API.md "Presence and wake-ups") [default: none].
    #[arg(long, env = "TETHER_PUSH_WEBHOOK")]
    pub push_webhook: Option<String>,
    /// File holding the secret wake-ups are signed with (HMAC-SHA256, `X-Tether-Signature`);
    /// required with --push-webhook.
    #[arg(long, env = "TETHER_PUSH_SECRET_FILE")]
    pub push_secret_file: Option<PathBuf>,
    /// Most wake-ups per second this node sends, all devices together [default: 100].
    #[arg(long, env = "TETHER_PUSH_RATE")]
    pub push_rate: Option<u32>,
    /// Least time between two wake-ups to one device, ms [default: 10000].
    #[arg(long, env = "TETHER_PUSH_MIN_GAP_MS")]
    pub push_min_gap_ms: Option<u64>,
    /// First retry delay of a wake-up the gateway refused, ms; doubles per attempt up to
    /// 30 s, 8 attempts [default: 500].
    #[arg(long, env = "TETHER_PUSH_RETRY_MS")]
    pub push_retry_ms: Option<u64>,
    /// PEM bundle of the CAs an `https` push gateway's certificate is checked against
    /// [default: /etc/ssl/certs/ca-certificates.crt].
    #[arg(long, env = "TETHER_PUSH_CA_FILE")]
    pub push_ca_file: Option<PathBuf>,
    /// Subscribe hold time when the client names none [default: 900000 = 15 min].
    #[arg(long, env = "TETHER_SUBSCRIBE_DEFAULT_TIMEOUT_MS")]
    pub subscribe_default_timeout_ms: Option<u64>,
    /// Longest subscribe hold time [default: 5400000 = 90 min].
    #[arg(long, env = "TETHER_SUBSCRIBE_MAX_TIMEOUT_MS")]
    pub subscribe_max_timeout_ms: Option<u64>,
    /// Bucket set actors with nothing to do stop after this; held subscriptions of a set
    /// stay, as compact waiter records, until its next write [default: 60000].
    #[arg(long, env = "TETHER_PASSIVATE_AFTER_MS")]
    pub passivate_after_ms: Option<u64>,
    /// HTTP worker threads [default: half the CPUs, rounded up]. With the actor threads (or
    /// the main thread hosting the actors) that makes one busy thread per CPU: more only
    /// adds context switches.
    #[arg(long, env = "TETHER_HTTP_WORKERS")]
    pub http_workers: Option<usize>,
    /// Threads hosting bucket set actors [default: 0 in a cluster with --cluster-threads 0,
    /// else half the CPUs, rounded up]. 0 runs them on the node's main thread, beside the
    /// store's client and the cluster's internal port: a forwarded write and its commit
    /// then cross no thread on its owner (BENCHMARKS.md "Cluster data path").
    #[arg(long, env = "TETHER_ACTOR_THREADS")]
    pub actor_threads: Option<usize>,
    /// TLS certificate chain (PEM); with --tls-key serves HTTPS and allows non-loopback
    /// addresses. Reloaded when the files change (checked every --tls-reload-interval-s)
    /// and on SIGHUP.
    #[arg(long, env = "TETHER_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// TLS private key (PEM).
    #[arg(long, env = "TETHER_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// How often the TLS files are checked for changes, in seconds; 0 turns watching off
    /// (SIGHUP only) [default: 10].
    #[arg(long, env = "TETHER_TLS_RELOAD_INTERVAL_S")]
    pub tls_reload_interval_s: Option<u64>,
    /// Serve plain HTTP on a non-loopback address. Only behind something that terminates
    /// TLS for the devices (an Ingress, a TLS load balancer) on a private network:
    /// devices send credentials.
    #[arg(long, env = "TETHER_ALLOW_PLAIN_HTTP")]
    pub allow_plain_http: bool,
    /// Longest graceful shutdown after SIGTERM, in seconds: leave the cluster, hand sets
    /// over, commit queued writes, answer held subscriptions; the node exits when done or
    /// when this passed (Kubernetes: keep terminationGracePeriodSeconds above the preStop
    /// hook plus this) [default: 30].
    #[arg(long, env = "TETHER_DRAIN_TIMEOUT_S")]
    pub drain_timeout_s: Option<u64>,
    /// A manufacturing key as `<key_id>=<path>`; repeat for several key ids.
    #[arg(
        long = "mfg-key-file",
        env = "TETHER_MFG_KEY_FILES",
        value_delimiter = ','
    )]
    pub mfg_key_files: Vec<String>,
    /// Assigned credentials are rotated after this many seconds [default: 30 days].
    #[arg(long, env = "TETHER_CREDENTIAL_LIFETIME_S")]
    pub credential_lifetime_s: Option<u64>,
    /// The replaced set keeps working this long [default: 24 h].
    #[arg(long, env = "TETHER_CREDENTIAL_GRACE_S")]
    pub credential_grace_s: Option<u64>,
    /// Default-credential registrations per device per hour [default: 10].
    #[arg(long, env = "TETHER_REGISTER_PER_HOUR")]
    pub register_per_hour: Option<u32>,
    /// Requests per second per principal, burst twice that [default: 50].
    #[arg(long, env = "TETHER_REQUESTS_PER_SECOND")]
    pub requests_per_second: Option<u32>,
    /// How long a device's pairing code can be redeemed [default: 600].
    #[arg(long, env = "TETHER_PAIRING_CODE_TTL_S")]
    pub pairing_code_ttl_s: Option<u64>,
    /// Changes kept in each bucket's history (at least) [default: 100].
    #[arg(long, env = "TETHER_HISTORY_PER_BUCKET")]
    pub history_per_bucket: Option<u64>,
    /// Op ids of at least this many writes per bucket set are remembered [default: 1000] …
    #[arg(long, env = "TETHER_OP_IDS_PER_SET")]
    pub op_ids_per_set: Option<u64>,
    /// … and of every write younger than this many seconds [default: 86400].
    #[arg(long, env = "TETHER_OP_ID_RETENTION_S")]
    pub op_id_retention_s: Option<u64>,
    /// Fault injection for tests: a PUT whose op id starts with this is committed and then
    /// never answered. Never set it in production.
    #[arg(long, hide = true)]
    pub fault_stall_op_prefix: Option<String>,
    /// A streaming subscribe writes a `{}` line after this much silence [default: 30000]
    /// (API.md says 30 s; tests shorten it).
    #[arg(long, env = "TETHER_STREAM_KEEPALIVE_MS", hide = true)]
    pub stream_keepalive_ms: Option<u64>,
    /// Tests only: a streaming subscribe waits this long after each line before it holds
    /// again, so a test can commit a change between two holds. Never set it in production.
    #[arg(long, hide = true)]
    pub test_stream_rehold_delay_ms: Option<u64>,
    /// Tests only: how long a principal's scope read from the store is used [default:
    /// 1000]; 0 checks every access against the store (and every stream line again).
    #[arg(long, hide = true)]
    pub test_scope_ttl_ms: Option<u64>,
    /// Log as JSON lines instead of text.
    #[arg(long, env = "TETHER_LOG_JSON")]
    pub log_json: bool,
    /// Cluster mode: the internal gRPC address (gossip and forwarding between nodes). Needs
    /// a shared store and the cluster secret (`TETHER_CLUSTER_SECRET` or
    /// --cluster-secret-file). Not for devices.
    #[arg(long, env = "TETHER_GRPC_LISTEN")]
    pub grpc_listen: Option<SocketAddr>,
    /// The gRPC `host:port` peers dial [default: --grpc-listen; required when that is a
    /// wildcard such as 0.0.0.0]. A DNS name (a Kubernetes pod's own name under its
    /// headless Service) is resolved at start, and waited for until it resolves to an
    /// address of this host.
    #[arg(long, env = "TETHER_GRPC_ADVERTISE")]
    pub grpc_advertise: Option<String>,
    /// Seeds to join: `host:port,…` or a DNS name resolving to several addresses (a
    /// Kubernetes headless Service). Without it the node starts a new cluster; so does a
    /// node whose seeds resolve only to itself (the first pod of a new cluster).
    #[arg(long, env = "TETHER_JOIN")]
    pub join: Option<String>,
    /// Threads of the cluster's own runtime (gossip, and the forward's gRPC client and
    /// server) [default: 0 on up to 2 CPUs, else 2]. 0 runs them on the node's main
    /// thread, beside the store's client: on a small machine, fewer threads taking turns
    /// on its CPUs (BENCHMARKS.md "Cluster data path").
    #[arg(long, env = "TETHER_CLUSTER_THREADS")]
    pub cluster_threads: Option<usize>,
    /// Failure detection: how often this node probes one peer, in ms [default: 500].
    /// Shorter finds a killed peer's refusal sooner; costs a small frame per period.
    #[arg(long, help_heading = "Failure detection")]
    pub failure_probe_ms: Option<u64>,
    /// How long a probe waits for its answer before asking other peers to probe, in ms
    /// [default: 300]; must be shorter than the probe period.
    #[arg(long, help_heading = "Failure detection")]
    pub failure_probe_rtt_ms: Option<u64>,
    /// How long a peer that stopped answering (but did not refuse connections) stays
    /// suspected before it is declared down, in ms [default: 3000]. Shorter fails over a
    /// frozen or partitioned node sooner but risks declaring a merely slow one dead.
    #[arg(long, help_heading = "Failure detection")]
    pub failure_suspect_ms: Option<u64>,
    /// Declare a peer down as soon as its address refuses a connection (its process is
    /// gone) [default: true].
    #[arg(long, help_heading = "Failure detection")]
    pub failure_down_on_refusal: Option<bool>,
    /// File holding the cluster secret (at least 16 bytes; every node the same). Give it
    /// twice to rotate the secret: the node then signs with both and accepts either (see
    /// the README). The `TETHER_CLUSTER_SECRET` environment variable may carry one
    /// instead.
    #[arg(
        long = "cluster-secret-file",
        env = "TETHER_CLUSTER_SECRET_FILE",
        value_delimiter = ','
    )]
    pub cluster_secret_files: Vec<PathBuf>,
    /// Export traces over OTLP to this collector (`http://collector:4317` for grpc,
    /// `http://collector:4318` for http/protobuf). Unset (and no traces endpoint): no export.
    #[arg(
        long,
        env = "OTEL_EXPORTER_OTLP_ENDPOINT",
        help_heading = "Traces (OpenTelemetry)"
    )]
    pub otlp_endpoint: Option<String>,
    /// The traces URL itself (used as is, e.g. `http://collector:4318/v1/traces`).
    #[arg(
        long,
        env = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        help_heading = "Traces (OpenTelemetry)"
    )]
    pub otlp_traces_endpoint: Option<String>,
    /// `grpc` or `http/protobuf` [default: http/protobuf].
    #[arg(
        long,
        env = "OTEL_EXPORTER_OTLP_PROTOCOL",
        help_heading = "Traces (OpenTelemetry)"
    )]
    pub otlp_protocol: Option<String>,
    /// The service name spans carry [default: tether].
    #[arg(
        long,
        env = "OTEL_SERVICE_NAME",
        help_heading = "Traces (OpenTelemetry)"
    )]
    pub otel_service_name: Option<String>,
    /// always_on, always_off, traceidratio, parentbased_always_on (default),
    /// parentbased_always_off or parentbased_traceidratio.
    #[arg(
        long,
        env = "OTEL_TRACES_SAMPLER",
        help_heading = "Traces (OpenTelemetry)"
    )]
    pub otel_traces_sampler: Option<String>,
    /// The ratio of the traceidratio samplers (0 to 1).
    #[arg(
        long,
        env = "OTEL_TRACES_SAMPLER_ARG",
        help_heading = "Traces (OpenTelemetry)"
    )]
    pub otel_traces_sampler_arg: Option<String>,
    /// `key=value,…` resource attributes (`service.instance.id` defaults to the node id).
    #[arg(
        long,
        env = "OTEL_RESOURCE_ATTRIBUTES",
        help_heading = "Traces (OpenTelemetry)"
    )]
    pub otel_resource_attributes: Option<String>,
    /// `true` turns export off whatever else is set.
    #[arg(
        long,
        env = "OTEL_SDK_DISABLED",
        help_heading = "Traces (OpenTelemetry)"
    )]
    pub otel_sdk_disabled: Option<String>,
    /// Deadline of every store call, in milliseconds [default: 3000]: a store that does
    /// not answer within it fails the request with 503 + `Retry-After` (a write's fate is
    /// then unknown; retry it with its op id).
    #[arg(long, env = "TETHER_STORE_TIMEOUT_MS")]
    pub store_timeout_ms: Option<u64>,
    /// Page cache of the embedded store (redb), in MiB [default: 8]. Pages read or written
    /// stay in it until it is full, so it bounds how much of the node's memory the store's
    /// data takes; the operating system caches the rest of the file. Ignored by the shared
    /// stores.
    #[arg(long, env = "TETHER_STORE_CACHE_MIB")]
    pub store_cache_mib: Option<u64>,
    /// How far this node's wall clock may be from the shared store's (PostgreSQL's) before
    /// the node stamps writes by the store's clock instead of its own, in milliseconds
    /// [default: 500]. Keeps a node whose clock was stepped hours off from writing
    /// timestamps that far off (the hybrid clocks of later owners would carry them on).
    #[arg(long, env = "TETHER_MAX_CLOCK_OFFSET_MS")]
    pub max_clock_offset_ms: Option<u64>,
    /// Tests only: commits obey control files in this directory (`store/faults.rs`).
    #[arg(long, env = "TETHER_TEST_STORE_FAULTS", hide = true)]
    pub test_store_faults: Option<PathBuf>,
    /// Benchmarks only: every registration takes the general path (no batched first
    /// contact, `store/registrations.rs`), to measure both in the same run.
    #[arg(long, env = "TETHER_BENCH_UNBATCHED_REGISTRATION", hide = true)]
    pub bench_unbatched_registration: bool,
    /// Limits and mTLS between nodes (SECURITY.md).
    #[command(flatten)]
    pub hardening: HardeningArgs,
}

/// The flags of every limit that keeps one client to its share of a node, and of mTLS on
/// the internal port (SECURITY.md says what each defends). Each has a `TETHER_*`
/// variable and a config-file key of its name.
#[derive(Debug, Args, Default)]
pub struct HardeningArgs {
    /// Most distinct bucket ids one request may name (`GET /v1/buckets?ids=`, subscribe)
    /// [default: 1024].
    #[arg(long, env = "TETHER_MAX_IDS_PER_REQUEST")]
    pub max_ids_per_request: Option<usize>,
    /// Largest answer body of one request; a listing above it is refused (413), a
    /// subscribe answer sends what fits and the rest on the next subscribe [default: 4194304].
    #[arg(long, env = "TETHER_MAX_ANSWER_BYTES")]
    pub max_answer_bytes: Option<usize>,
    /// Held subscriptions one principal may have on this node; a new one answers the
    /// principal's oldest (empty) [default: 16].
    #[arg(long, env = "TETHER_MAX_HELD_PER_PRINCIPAL")]
    pub max_held_per_principal: Option<usize>,
    /// Longest time a request body may take to arrive (408) [default: 10000].
    #[arg(long, env = "TETHER_BODY_READ_TIMEOUT_MS")]
    pub body_read_timeout_ms: Option<u64>,
    /// Longest time a request's headers may take to arrive (408) [default: 10000].
    #[arg(long, env = "TETHER_HEADER_READ_TIMEOUT_MS")]
    pub header_read_timeout_ms: Option<u64>,
    /// An idle keep-alive connection is closed after this [default: 30000].
    #[arg(long, env = "TETHER_KEEP_ALIVE_MS")]
    pub keep_alive_ms: Option<u64>,
    /// Longest TLS handshake on the device port [default: 10000].
    #[arg(long, env = "TETHER_TLS_HANDSHAKE_TIMEOUT_MS")]
    pub tls_handshake_timeout_ms: Option<u64>,
    /// Open connections on the device port, all sources together (further ones are closed
    /// at once; never more than the process's file limit allows) [default: 50000].
    #[arg(long, env = "TETHER_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// Open connections from one source address (trusted proxies excepted) [default: 256].
    #[arg(long, env = "TETHER_MAX_CONNECTIONS_PER_SOURCE")]
    pub max_connections_per_source: Option<usize>,
    /// `/readyz` answers 503 once this percentage of the connection capacity is in use, so
    /// a load balancer moves new clients elsewhere before the node runs out [default: 90].
    #[arg(long, env = "TETHER_READYZ_SATURATION_PERCENT")]
    pub readyz_saturation_percent: Option<u8>,
    /// Load balancers whose `X-Forwarded-For` names the client: addresses or CIDRs,
    /// comma-separated. Their connections are not limited per source.
    #[arg(long, env = "TETHER_TRUSTED_PROXIES", value_delimiter = ',')]
    pub trusted_proxies: Vec<String>,
    /// Failed credential checks one source may make per failure window before its
    /// unverified attempts get 429 [default: 30].
    #[arg(long, env = "TETHER_AUTH_FAILURES_PER_SOURCE")]
    pub auth_failures_per_source: Option<u32>,
    /// Failed checks of one credential id per window after which the store is asked about
    /// it at most once a second (a correct secret is always accepted) [default: 20].
    #[arg(long, env = "TETHER_AUTH_FAILURES_PER_ID")]
    pub auth_failures_per_id: Option<u32>,
    /// The failure counting window in seconds [default: 60].
    #[arg(long, env = "TETHER_AUTH_FAILURE_WINDOW_S")]
    pub auth_failure_window_s: Option<u64>,
    /// Entries of each bounded table (failure counters, verified credentials) [default: 100000].
    #[arg(long, env = "TETHER_AUTH_TABLE_CAPACITY")]
    pub auth_table_capacity: Option<usize>,
    /// Failed pairing-code redemptions per user account per hour [default: 10].
    #[arg(long, env = "TETHER_PAIR_FAILURES_PER_HOUR")]
    pub pair_failures_per_hour: Option<u32>,
    /// Rejections (401, 403, 429) logged per minute; the rest are counted in the next line
    /// [default: 60].
    #[arg(long, env = "TETHER_REJECTIONS_LOGGED_PER_MINUTE")]
    pub rejections_logged_per_minute: Option<u32>,
    /// mTLS on the internal port: this node's certificate chain (PEM). With
    /// --cluster-tls-key and --cluster-tls-ca; reloaded when the files change.
    #[arg(long, env = "TETHER_CLUSTER_TLS_CERT")]
    pub cluster_tls_cert: Option<PathBuf>,
    /// This node's private key (PEM) for the internal port.
    #[arg(long, env = "TETHER_CLUSTER_TLS_KEY")]
    pub cluster_tls_key: Option<PathBuf>,
    /// The cluster CA (PEM): peers must present a certificate it signed.
    #[arg(long, env = "TETHER_CLUSTER_TLS_CA")]
    pub cluster_tls_ca: Option<PathBuf>,
    /// Serve the internal port without TLS on a non-loopback address (only where the network
    /// itself encrypts, e.g. a service mesh). The cluster secret still authenticates peers.
    #[arg(long, env = "TETHER_CLUSTER_PLAINTEXT")]
    pub cluster_plaintext: bool,
    /// How often certificate files are checked for changes, in ms [default: 10000].
    #[arg(long, env = "TETHER_CERT_RELOAD_INTERVAL_MS")]
    pub cert_reload_interval_ms: Option<u64>,
}

/// The config file: every flag by its snake_case name, plus registration sections.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    listen: Option<SocketAddr>,
    data_dir: Option<PathBuf>,
    store: Option<String>,
    store_file: Option<PathBuf>,
    store_password_file: Option<PathBuf>,
    public_url: Option<String>,
    node_id: Option<String>,
    max_bucket_bytes: Option<usize>,
    max_blob_bytes: Option<u64>,
    blob_grace_secs: Option<u64>,
    push_webhook: Option<String>,
    push_secret_file: Option<PathBuf>,
    push_rate: Option<u32>,
    push_min_gap_ms: Option<u64>,
    push_retry_ms: Option<u64>,
    push_ca_file: Option<PathBuf>,
    subscribe_default_timeout_ms: Option<u64>,
    subscribe_max_timeout_ms: Option<u64>,
    passivate_after_ms: Option<u64>,
    http_workers: Option<usize>,
    actor_threads: Option<usize>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    tls_reload_interval_s: Option<u64>,
    #[serde(default)]
    allow_plain_http: bool,
    drain_timeout_s: Option<u64>,
    #[serde(default)]
    mfg_key_files: Vec<String>,
    credential_lifetime_s: Option<u64>,
    credential_grace_s: Option<u64>,
    register_per_hour: Option<u32>,
    requests_per_second: Option<u32>,
    pairing_code_ttl_s: Option<u64>,
    history_per_bucket: Option<u64>,
    op_ids_per_set: Option<u64>,
    op_id_retention_s: Option<u64>,
    store_timeout_ms: Option<u64>,
    store_cache_mib: Option<u64>,
    max_clock_offset_ms: Option<u64>,
    grpc_listen: Option<SocketAddr>,
    grpc_advertise: Option<String>,
    join: Option<String>,
    cluster_threads: Option<usize>,
    failure_probe_ms: Option<u64>,
    failure_probe_rtt_ms: Option<u64>,
    failure_suspect_ms: Option<u64>,
    failure_down_on_refusal: Option<bool>,
    #[serde(default, deserialize_with = "one_or_many")]
    cluster_secret_file: Vec<PathBuf>,
    max_ids_per_request: Option<usize>,
    max_answer_bytes: Option<usize>,
    max_held_per_principal: Option<usize>,
    body_read_timeout_ms: Option<u64>,
    header_read_timeout_ms: Option<u64>,
    keep_alive_ms: Option<u64>,
    tls_handshake_timeout_ms: Option<u64>,
    max_connections: Option<usize>,
    max_connections_per_source: Option<usize>,
    readyz_saturation_percent: Option<u8>,
    #[serde(default)]
    trusted_proxies: Vec<String>,
    auth_failures_per_source: Option<u32>,
    auth_failures_per_id: Option<u32>,
    auth_failure_window_s: Option<u64>,
    auth_table_capacity: Option<usize>,
    pair_failures_per_hour: Option<u32>,
    rejections_logged_per_minute: Option<u32>,
    cluster_tls_cert: Option<PathBuf>,
    cluster_tls_key: Option<PathBuf>,
    cluster_tls_ca: Option<PathBuf>,
    #[serde(default)]
    cluster_plaintext: bool,
    cert_reload_interval_ms: Option<u64>,
    tier: Option<String>,
    #[serde(default)]
    device_types: std::collections::BTreeMap<String, crate::registration::DeviceType>,
    #[serde(default)]
    tier_rules: Vec<crate::registration::TierRule>,
    #[serde(default)]
    software_updates: Vec<crate::registration::SoftwareOffer>,
}

/// Default of `--max-clock-offset-ms`.
pub const DEFAULT_MAX_CLOCK_OFFSET_MS: u64 = 500;

/// The node's effective settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// Device API address.
    pub listen: SocketAddr,
    /// Embedded store directory (also holds the development manufacturing key).
    pub data_dir: PathBuf,
    /// Which store to use.
    pub store: StoreUrl,
    /// Sync URL given to devices; `None` → derived from the bound address.
    pub public_url: Option<String>,
    /// Lease owner name.
    pub node_id: String,
    /// Bucket size limit in bytes (JSON encoding of its value).
    pub max_bucket_bytes: usize,
    /// Blob size limit in bytes.
    pub max_blob_bytes: u64,
    /// How long an unreferenced blob or an unfinished upload is kept.
    pub blob_grace: Duration,
    /// Push wake-ups, when a gateway is configured.
    pub push: Option<crate::push::PushConfig>,
    /// Default subscribe hold.
    pub subscribe_default_timeout: Duration,
    /// Maximum subscribe hold.
    pub subscribe_max_timeout: Duration,
    /// Actor idle time before passivation.
    pub passivate_after: Duration,
    /// HTTP workers.
    pub http_workers: usize,
    /// Actor threads (0: the actors run on the node's main thread).
    pub actor_threads: usize,
    /// JSON logs.
    pub log_json: bool,
    /// TLS certificate and key paths.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// How often the TLS files are checked for changes (`None`: SIGHUP only).
    pub tls_reload_interval: Option<Duration>,
    /// Plain HTTP allowed on a non-loopback address (TLS terminated in front).
    pub allow_plain_http: bool,
    /// Longest graceful shutdown.
    pub drain_timeout: Duration,
    /// Credential rules and manufacturing keys.
    pub credentials: CredentialConfig,
    /// Pairing code lifetime in seconds.
    pub pairing_code_ttl_s: u64,
    /// Changes kept per bucket (at least).
    pub history_per_bucket: u64,
    /// Op ids remembered per set: at least this many …
    pub op_ids_per_set: u64,
    /// … and every one younger than this.
    pub op_id_retention: Duration,
    /// Fault injection (tests): answers of op ids with this prefix are never sent.
    pub fault_stall_op_prefix: Option<String>,
    /// Silence after which a streaming subscribe writes a `{}` keep-alive line.
    pub stream_keepalive: Duration,
    /// Tests only: pause of a streaming subscribe between a line and its next hold.
    pub test_stream_rehold_delay: Duration,
    /// Registration rules.
    pub registration: RegistrationConfig,
    /// Cluster mode (gossip, placement, forwarding); `None`: one node owns every set.
    pub cluster: Option<ClusterConfig>,
    /// Trace export (OTLP); off unless an endpoint is set.
    pub telemetry: crate::telemetry::TelemetryConfig,
    /// Deadline of every store call (`store::deadline`).
    pub store_timeout: Duration,
    /// The embedded store's page cache, in bytes (`--store-cache-mib`).
    pub store_cache: usize,
    /// How far the node's clock may be from the store's (`--max-clock-offset-ms`).
    pub max_clock_offset: Duration,
    /// Tests only: the fault-injection directory of `store::faults` (hidden flag).
    pub test_store_faults: Option<PathBuf>,
    /// Benchmarks only: no batched first contacts (hidden flag).
    pub bench_unbatched_registration: bool,
    /// What one client may use of this node.
    pub limits: Limits,
}

/// What one client may use of a node: the fair-share and anti-amplification limits of
/// issue 13 (SECURITY.md "What each limit defends").
#[derive(Debug, Clone)]
pub struct Limits {
    /// Most distinct bucket ids per request.
    pub max_ids_per_request: usize,
    /// Largest answer body per request.
    pub max_answer_bytes: usize,
    /// Held subscriptions per principal on this node.
    pub max_held_per_principal: usize,
    /// Longest wait for a request body.
    pub body_read_timeout: Duration,
    /// Longest wait for a request's headers.
    pub header_read_timeout: Duration,
    /// Idle keep-alive before a connection is closed.
    pub keep_alive: Duration,
    /// Longest TLS handshake.
    pub tls_handshake_timeout: Duration,
    /// Open device-port connections, all sources.
    pub max_connections: usize,
    /// Open device-port connections per source address.
    pub max_connections_per_source: usize,
    /// `/readyz` fails above this share (percent) of the connection capacity.
    pub readyz_saturation_percent: u8,
    /// Proxies whose `X-Forwarded-For` is believed.
    pub trusted_proxies: Vec<crate::security::limits::Cidr>,
    /// Rejections logged per minute.
    pub rejections_logged_per_minute: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_ids_per_request: 1024,
            max_answer_bytes: 4 * 1024 * 1024,
            max_held_per_principal: 16,
            body_read_timeout: Duration::from_secs(10),
            header_read_timeout: Duration::from_secs(10),
            keep_alive: Duration::from_secs(30),
            tls_handshake_timeout: Duration::from_secs(10),
            max_connections: 50_000,
            max_connections_per_source: 256,
            readyz_saturation_percent: 90,
            trusted_proxies: Vec::new(),
            rejections_logged_per_minute: 60,
        }
    }
}

/// mTLS on the internal port: this node's certificate and key, and the cluster CA.
#[derive(Debug, Clone)]
pub struct ClusterTlsFiles {
    /// Certificate chain (PEM).
    pub cert: PathBuf,
    /// Private key (PEM).
    pub key: PathBuf,
    /// The CA that signs every node's certificate (PEM).
    pub ca: PathBuf,
    /// How often the files are checked for changes.
    pub reload_interval: Duration,
}

/// How a node takes part in a cluster.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// Where the internal gRPC server listens.
    pub grpc_listen: SocketAddr,
    /// The gRPC address peers dial, or the name that resolves to it.
    pub advertise: Advertise,
    /// Seeds to join (empty: start a new cluster).
    pub seeds: Vec<tether_cluster::seeds::SeedSpec>,
    /// Authenticates peers on the internal port.
    pub secret: tether_cluster::ClusterSecret,
    /// mTLS between nodes; `None` only on loopback or with --cluster-plaintext.
    pub tls: Option<ClusterTlsFiles>,
    /// Failure-detection timing (`--failure-*`).
    pub failure: tether_cluster::MembershipConfig,
    /// Threads of the cluster's own runtime; 0: the node's main thread
    /// (`--cluster-threads`).
    pub threads: usize,
}

/// What `--grpc-advertise` names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Advertise {
    /// An address, used as given.
    Addr(SocketAddr),
    /// A DNS name, resolved at start ([`Advertise::resolve`]).
    Name(tether_cluster::seeds::SeedSpec),
}

impl Advertise {
    /// How long [`Advertise::resolve`] waits for a name to resolve to this host.
    pub const RESOLVE_DEADLINE: Duration = Duration::from_secs(60);

    fn parse(value: &str) -> Result<Self> {
        if let Ok(addr) = value.parse::<SocketAddr>() {
            if addr.ip().is_unspecified() || addr.port() == 0 {
                return Err(NodeError::Config(format!(
                    "--grpc-advertise {addr}: peers need a concrete address and port"
                )));
            }
            return Ok(Advertise::Addr(addr));
        }
        match tether_cluster::seeds::parse_seeds(value) {
            Ok(mut specs) if specs.len() == 1 => Ok(Advertise::Name(specs.remove(0))),
            Ok(_) => Err(NodeError::Config(format!(
                "--grpc-advertise {value:?}: expected one host:port"
            ))),
            Err(e) => Err(NodeError::Config(format!(
                "--grpc-advertise {value:?}: {e}"
            ))),
        }
    }

    /// The address peers dial. A name is resolved until it resolves to an address of this
    /// host (a pod's DNS record may still point at the previous pod of the same name for
    /// a moment), for at most `deadline`.
    pub async fn resolve(&self, deadline: Duration) -> Result<SocketAddr> {
        let spec = match self {
            Advertise::Addr(addr) => return Ok(*addr),
            Advertise::Name(spec) => spec,
        };
        let until = tokio::time::Instant::now() + deadline;
        let mut last;
        loop {
            last = match tether_cluster::seeds::resolve_advertise(spec).await {
                Ok(addr) if is_local_address(addr.ip()) => {
                    tracing::info!(advertise = %spec, %addr, "advertised gRPC name resolved");
                    return Ok(addr);
                }
                Ok(addr) => format!("resolves to {addr}, which is not an address of this host"),
                Err(e) => e.to_string(),
            };
            if tokio::time::Instant::now() >= until {
                return Err(NodeError::Config(format!(
                    "--grpc-advertise {spec}: {last} (waited {}s)",
                    deadline.as_secs()
                )));
            }
            tracing::info!(advertise = %spec, why = %last, "waiting for the advertised name to resolve to this host");
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

impl std::fmt::Display for Advertise {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Advertise::Addr(a) => write!(f, "{a}"),
            Advertise::Name(n) => write!(f, "{n}"),
        }
    }
}

/// Whether `ip` belongs to this host (a socket can be bound to it).
fn is_local_address(ip: std::net::IpAddr) -> bool {
    std::net::UdpSocket::bind((ip, 0)).is_ok()
}

/// Threads hosting the bucket-set actors when neither the flag nor the file names them: none
/// of their own when the cluster's internal port runs on the node's main thread
/// (`--cluster-threads 0`, the default on up to 2 CPUs): the actors run there too, beside it
/// and the store's client, so a forwarded write and its commit cross no thread on its owner
/// (BENCHMARKS.md, "The set actors on the main thread": cluster −14 % CPU per PUT). Else
/// half the CPUs, rounded up (a single node's streams were 6 % slower with its actors on
/// the main thread).
fn default_actor_threads(cpus: usize, cluster_on_main: bool) -> usize {
    if cluster_on_main {
        0
    } else {
        cpus.div_ceil(2)
    }
}

/// Threads of the cluster's own runtime when neither the flag nor the file names them: none
/// on up to 2 CPUs (gossip, the internal port and the forward run on the node's main thread;
/// BENCHMARKS.md, "Gossip and the forward on the node's main thread"), else 2.
fn default_cluster_threads(cpus: usize) -> usize {
    if cpus <= 2 {
        0
    } else {
        2
    }
}

impl ClusterConfig {
    fn load(
        grpc_listen: Option<SocketAddr>,
        advertise: Option<String>,
        join: Option<String>,
        secret_files: Vec<PathBuf>,
        threads: usize,
    ) -> Result<Option<Self>> {
        let Some(grpc_listen) = grpc_listen else {
            if join.is_some() || advertise.is_some() {
                return Err(NodeError::Config(
                    "--join and --grpc-advertise need --grpc-listen (cluster mode)".into(),
                ));
            }
            return Ok(None);
        };
        let advertise = match advertise.as_deref().map(str::trim) {
            Some(a) if !a.is_empty() => Advertise::parse(a)?,
            _ if grpc_listen.ip().is_unspecified() => {
                return Err(NodeError::Config(format!(
                    "--grpc-listen {grpc_listen} is a wildcard: pass --grpc-advertise with the \
                     address peers dial"
                )))
            }
            _ => Advertise::parse(&grpc_listen.to_string())?,
        };
        let seeds = match join.as_deref().map(str::trim) {
            None | Some("") => Vec::new(),
            Some(list) => tether_cluster::seeds::parse_seeds(list)
                .map_err(|e| NodeError::Config(format!("--join {list:?}: {e}")))?,
        };
        let keys = match (
            secret_files.is_empty(),
            std::env::var("TETHER_CLUSTER_SECRET").ok(),
        ) {
            (false, _) => secret_files
                .iter()
                .map(|path| {
                    std::fs::read(path)
                        .map(|b| b.trim_ascii().to_vec())
                        .map_err(|e| {
                            NodeError::Config(format!(
                                "reading cluster secret {}: {e}",
                                path.display()
                            ))
                        })
                })
                .collect::<Result<Vec<_>>>()?,
            (true, Some(value)) => vec![value.trim().as_bytes().to_vec()],
            (true, None) => {
                return Err(NodeError::Config(
                    "cluster mode needs the cluster secret: set TETHER_CLUSTER_SECRET or pass \
                     --cluster-secret-file (the same secret on every node)"
                        .into(),
                ))
            }
        };
        let secret = tether_cluster::ClusterSecret::with_keys(keys)
            .map_err(|e| NodeError::Config(format!("cluster secret: {e}")))?;
        Ok(Some(ClusterConfig {
            grpc_listen,
            advertise,
            seeds,
            secret,
            tls: None,
            failure: tether_cluster::MembershipConfig::lan(),
            threads,
        }))
    }
}

impl Config {
    /// Merges flags/env over the config file over defaults, and validates the result.
    pub fn load(mut args: ServeArgs) -> Result<Config> {
        let mut file: FileConfig = match &args.config {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    NodeError::Config(format!("reading config {}: {e}", path.display()))
                })?;
                toml::from_str(&text)
                    .map_err(|e| NodeError::Config(format!("config {}: {e}", path.display())))?
            }
            None => FileConfig::default(),
        };
        let hard = Hardening::merge(std::mem::take(&mut args.hardening), &mut file)?;
        let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
        let default_listen = SocketAddr::from(([127, 0, 0, 1], 8080));
        let registration = RegistrationConfig {
            tier: file.tier.unwrap_or_else(|| "production".into()),
            device_types: file.device_types,
            tier_rules: file.tier_rules,
            software_updates: file.software_updates,
        }
        .with_builtins();
        registration.validate()?;
        let data_dir = args
            .data_dir
            .or(file.data_dir)
            .unwrap_or_else(|| PathBuf::from("./tether-data"));
        let store = StoreUrl::resolve(
            args.store.or(file.store),
            args.store_file.or(file.store_file),
            args.store_password_file.or(file.store_password_file),
        )?
        .unwrap_or_else(|| StoreUrl::Redb(data_dir.clone()));
        let mut secret_files = args.cluster_secret_files;
        if secret_files.is_empty() {
            secret_files = file.cluster_secret_file;
        }
        let mut cluster = ClusterConfig::load(
            args.grpc_listen.or(file.grpc_listen),
            args.grpc_advertise.or(file.grpc_advertise),
            args.join.or(file.join),
            secret_files,
            args.cluster_threads
                .or(file.cluster_threads)
                .unwrap_or_else(|| default_cluster_threads(cpus)),
        )?;
        let cluster_on_main = cluster.as_ref().is_some_and(|c| c.threads == 0);
        if let Some(c) = cluster.as_mut() {
            let ms = std::time::Duration::from_millis;
            let f = &mut c.failure;
            if let Some(v) = args.failure_probe_ms.or(file.failure_probe_ms) {
                f.probe_period = ms(v);
            }
            if let Some(v) = args.failure_probe_rtt_ms.or(file.failure_probe_rtt_ms) {
                f.probe_rtt = ms(v);
            }
            if let Some(v) = args.failure_suspect_ms.or(file.failure_suspect_ms) {
                f.suspect_to_down_after = ms(v);
            }
            if let Some(v) = args
                .failure_down_on_refusal
                .or(file.failure_down_on_refusal)
            {
                f.down_on_refusal = v;
            }
            if f.probe_rtt >= f.probe_period || f.suspect_to_down_after.is_zero() {
                return Err(NodeError::Config(format!(
                    "failure detection: --failure-probe-rtt-ms ({} ms) must be shorter than \
                     --failure-probe-ms ({} ms), and --failure-suspect-ms above 0",
                    f.probe_rtt.as_millis(),
                    f.probe_period.as_millis()
                )));
            }
        }
        let telemetry = crate::telemetry::TelemetryConfig {
            endpoint: args.otlp_endpoint.filter(|s| !s.trim().is_empty()),
            traces_endpoint: args.otlp_traces_endpoint.filter(|s| !s.trim().is_empty()),
            protocol: args.otlp_protocol,
            service_name: args.otel_service_name.filter(|s| !s.trim().is_empty()),
            sampler: args.otel_traces_sampler,
            sampler_arg: args.otel_traces_sampler_arg,
            resource_attributes: args.otel_resource_attributes,
            disabled: args
                .otel_sdk_disabled
                .is_some_and(|v| v.trim().eq_ignore_ascii_case("true")),
        };
        if telemetry.exports() {
            telemetry.traces_url()?;
            telemetry.sampler()?;
        }
        if let Some(c) = &mut cluster {
            c.tls = hard.cluster_tls.clone();
            if c.tls.is_none() && !c.grpc_listen.ip().is_loopback() && !hard.cluster_plaintext {
                return Err(NodeError::Config(format!(
                    "refusing to serve the internal port {} without TLS: pass --cluster-tls-cert, \
                     --cluster-tls-key and --cluster-tls-ca (mTLS between nodes; `tether admin \
                     cluster-ca` and `cluster-cert` make them), or --cluster-plaintext where the \
                     network itself encrypts",
                    c.grpc_listen
                )));
            }
        }
        let config = Config {
            telemetry,
            limits: hard.limits,
            cluster,
            listen: args.listen.or(file.listen).unwrap_or(default_listen),
            data_dir,
            store,
            public_url: args.public_url.or(file.public_url),
            node_id: args
                .node_id
                .or(file.node_id)
                .unwrap_or_else(|| "tether-1".into()),
            max_bucket_bytes: args
                .max_bucket_bytes
                .or(file.max_bucket_bytes)
                .unwrap_or(64 * 1024),
            max_blob_bytes: args
                .max_blob_bytes
                .or(file.max_blob_bytes)
                .unwrap_or(16 * 1024 * 1024),
            blob_grace: Duration::from_secs(
                args.blob_grace_secs
                    .or(file.blob_grace_secs)
                    .unwrap_or(24 * 3600),
            ),
            push: crate::push::PushConfig::from_flags(crate::push::PushFlags {
                webhook: args.push_webhook.or(file.push_webhook),
                secret_file: args.push_secret_file.or(file.push_secret_file),
                rate: args.push_rate.or(file.push_rate),
                min_gap_ms: args.push_min_gap_ms.or(file.push_min_gap_ms),
                retry_ms: args.push_retry_ms.or(file.push_retry_ms),
                ca_file: args.push_ca_file.or(file.push_ca_file),
            })?,
            subscribe_default_timeout: Duration::from_millis(
                args.subscribe_default_timeout_ms
                    .or(file.subscribe_default_timeout_ms)
                    .unwrap_or(15 * 60 * 1000),
            ),
            subscribe_max_timeout: Duration::from_millis(
                args.subscribe_max_timeout_ms
                    .or(file.subscribe_max_timeout_ms)
                    .unwrap_or(90 * 60 * 1000),
            ),
            passivate_after: Duration::from_millis(
                args.passivate_after_ms
                    .or(file.passivate_after_ms)
                    .unwrap_or(60_000),
            ),
            // Half the CPUs each (BENCHMARKS.md, "Threads: half the CPUs each"): a thread
            // per CPU for each pool gave two busy threads per CPU, and on 2 CPUs the
            // saturated notify path spent 15 % more CPU per update switching between them.
            http_workers: args
                .http_workers
                .or(file.http_workers)
                .unwrap_or(cpus.div_ceil(2))
                .max(1),
            actor_threads: args
                .actor_threads
                .or(file.actor_threads)
                .unwrap_or_else(|| default_actor_threads(cpus, cluster_on_main)),
            log_json: args.log_json,
            pairing_code_ttl_s: args
                .pairing_code_ttl_s
                .or(file.pairing_code_ttl_s)
                .unwrap_or(600),
            history_per_bucket: args
                .history_per_bucket
                .or(file.history_per_bucket)
                .unwrap_or(100),
            op_ids_per_set: args.op_ids_per_set.or(file.op_ids_per_set).unwrap_or(1_000),
            op_id_retention: Duration::from_secs(
                args.op_id_retention_s
                    .or(file.op_id_retention_s)
                    .unwrap_or(24 * 3600),
            ),
            fault_stall_op_prefix: args.fault_stall_op_prefix.filter(|p| !p.is_empty()),
            stream_keepalive: Duration::from_millis(
                args.stream_keepalive_ms.unwrap_or(30_000).max(1),
            ),
            test_stream_rehold_delay: Duration::from_millis(
                args.test_stream_rehold_delay_ms.unwrap_or(0),
            ),
            tls_reload_interval: match args
                .tls_reload_interval_s
                .or(file.tls_reload_interval_s)
                .unwrap_or(10)
            {
                0 => None,
                s => Some(Duration::from_secs(s)),
            },
            allow_plain_http: args.allow_plain_http || file.allow_plain_http,
            drain_timeout: Duration::from_secs(
                args.drain_timeout_s
                    .or(file.drain_timeout_s)
                    .unwrap_or(30)
                    .max(1),
            ),
            tls: match (
                args.tls_cert.or(file.tls_cert),
                args.tls_key.or(file.tls_key),
            ) {
                (Some(c), Some(k)) => Some((c, k)),
                (None, None) => None,
                _ => {
                    return Err(NodeError::Config(
                        "TLS needs both a certificate and a key".into(),
                    ))
                }
            },
            credentials: {
                let defaults = CredentialConfig::default();
                let mut specs = args.mfg_key_files;
                specs.extend(file.mfg_key_files);
                CredentialConfig {
                    mfg_keys: load_mfg_keys(&specs)?,
                    lifetime: args
                        .credential_lifetime_s
                        .or(file.credential_lifetime_s)
                        .map_or(defaults.lifetime, Duration::from_secs),
                    grace: args
                        .credential_grace_s
                        .or(file.credential_grace_s)
                        .map_or(defaults.grace, Duration::from_secs),
                    register_per_hour: args
                        .register_per_hour
                        .or(file.register_per_hour)
                        .unwrap_or(defaults.register_per_hour),
                    requests_per_second: args
                        .requests_per_second
                        .or(file.requests_per_second)
                        .unwrap_or(defaults.requests_per_second),
                    cache_ttl: defaults.cache_ttl,
                    scope_ttl: args
                        .test_scope_ttl_ms
                        .map_or(defaults.scope_ttl, Duration::from_millis),
                    ..hard.auth
                }
            },
            registration,
            store_timeout: args
                .store_timeout_ms
                .or(file.store_timeout_ms)
                .filter(|ms| *ms > 0)
                .map_or(
                    crate::store::deadline::DEFAULT_DEADLINE,
                    Duration::from_millis,
                ),
            store_cache: args
                .store_cache_mib
                .or(file.store_cache_mib)
                .map_or(crate::store::redb::DEFAULT_CACHE_BYTES, |mib| {
                    usize::try_from(mib.saturating_mul(1 << 20)).unwrap_or(usize::MAX)
                }),
            max_clock_offset: Duration::from_millis(
                args.max_clock_offset_ms
                    .or(file.max_clock_offset_ms)
                    .unwrap_or(DEFAULT_MAX_CLOCK_OFFSET_MS),
            ),
            test_store_faults: args.test_store_faults,
            bench_unbatched_registration: args.bench_unbatched_registration,
        };
        config.check_transport()?;
        Ok(config)
    }

    /// Plain HTTP is only for loopback: device credentials must never cross a network in
    /// clear text.
    fn check_transport(&self) -> Result<()> {
        if !self.listen.ip().is_loopback() && self.tls.is_none() && !self.allow_plain_http {
            return Err(NodeError::Config(format!(
                "refusing to serve plain HTTP on non-loopback address {}: devices send credentials, so \
                 only loopback may be unencrypted. Pass --tls-cert and --tls-key (see `tether admin \
                 self-signed` for development), or listen on 127.0.0.1 (or, behind a proxy that \
                 terminates TLS on a private network, pass --allow-plain-http)",
                self.listen
            )));
        }
        if self.cluster.is_some() && matches!(self.store, StoreUrl::Redb(_)) {
            return Err(NodeError::Config(
                "cluster mode needs a store every node shares: pass --store postgres://… (or \
                 fdb:CLUSTER_FILE); the embedded redb store belongs to one node"
                    .into(),
            ));
        }
        if self.history_per_bucket == 0 {
            return Err(NodeError::Config(
                "history_per_bucket must be at least 1 (diffs and retries need the log)".into(),
            ));
        }
        if self.max_blob_bytes == 0 {
            return Err(NodeError::Config("max_blob_bytes must be positive".into()));
        }
        if self.max_bucket_bytes == 0 {
            return Err(NodeError::Config(
                "max_bucket_bytes must be positive".into(),
            ));
        }
        if matches!(self.store, StoreUrl::Fdb(_)) {
            crate::store::fdb::check_bucket_limit(self.max_bucket_bytes)
                .map_err(NodeError::Config)?;
        }
        if self.subscribe_default_timeout > self.subscribe_max_timeout {
            return Err(NodeError::Config(
                "subscribe default timeout exceeds the maximum".into(),
            ));
        }
        if self.limits.max_answer_bytes < self.max_bucket_bytes.saturating_add(4096) {
            return Err(NodeError::Config(format!(
                "max_answer_bytes ({}) must hold at least one full bucket (max_bucket_bytes {} \
                 + 4096)",
                self.limits.max_answer_bytes, self.max_bucket_bytes
            )));
        }
        Ok(())
    }
}

/// The merged hardening settings, before they are spread over `Config`.
struct Hardening {
    limits: Limits,
    auth: CredentialConfig,
    cluster_tls: Option<ClusterTlsFiles>,
    cluster_plaintext: bool,
}

impl Hardening {
    fn merge(h: HardeningArgs, f: &mut FileConfig) -> Result<Self> {
        let d = Limits::default();
        let ms = |flag: Option<u64>, file: Option<u64>, default: Duration| {
            flag.or(file).map_or(default, Duration::from_millis)
        };
        let mut proxies = h.trusted_proxies;
        proxies.append(&mut f.trusted_proxies);
        let limits = Limits {
            max_ids_per_request: h
                .max_ids_per_request
                .or(f.max_ids_per_request)
                .unwrap_or(d.max_ids_per_request),
            max_answer_bytes: h
                .max_answer_bytes
                .or(f.max_answer_bytes)
                .unwrap_or(d.max_answer_bytes),
            max_held_per_principal: h
                .max_held_per_principal
                .or(f.max_held_per_principal)
                .unwrap_or(d.max_held_per_principal),
            body_read_timeout: ms(
                h.body_read_timeout_ms,
                f.body_read_timeout_ms,
                d.body_read_timeout,
            ),
            header_read_timeout: ms(
                h.header_read_timeout_ms,
                f.header_read_timeout_ms,
                d.header_read_timeout,
            ),
            keep_alive: ms(h.keep_alive_ms, f.keep_alive_ms, d.keep_alive),
            tls_handshake_timeout: ms(
                h.tls_handshake_timeout_ms,
                f.tls_handshake_timeout_ms,
                d.tls_handshake_timeout,
            ),
            max_connections: h
                .max_connections
                .or(f.max_connections)
                .unwrap_or(d.max_connections),
            max_connections_per_source: h
                .max_connections_per_source
                .or(f.max_connections_per_source)
                .unwrap_or(d.max_connections_per_source),
            readyz_saturation_percent: h
                .readyz_saturation_percent
                .or(f.readyz_saturation_percent)
                .unwrap_or(d.readyz_saturation_percent),
            trusted_proxies: proxies
                .iter()
                .filter(|p| !p.trim().is_empty())
                .map(|p| crate::security::limits::Cidr::parse(p))
                .collect::<Result<_>>()?,
            rejections_logged_per_minute: h
                .rejections_logged_per_minute
                .or(f.rejections_logged_per_minute)
                .unwrap_or(d.rejections_logged_per_minute),
        };
        for (name, zero) in [
            ("max_ids_per_request", limits.max_ids_per_request == 0),
            ("max_answer_bytes", limits.max_answer_bytes == 0),
            ("max_held_per_principal", limits.max_held_per_principal == 0),
            ("max_connections", limits.max_connections == 0),
            (
                "max_connections_per_source",
                limits.max_connections_per_source == 0,
            ),
        ] {
            if zero {
                return Err(NodeError::Config(format!("{name} must be positive")));
            }
        }
        if !(1..=100).contains(&limits.readyz_saturation_percent) {
            return Err(NodeError::Config(
                "readyz_saturation_percent must be within 1..=100".into(),
            ));
        }
        let a = CredentialConfig::default();
        let auth = CredentialConfig {
            failures_per_source: h
                .auth_failures_per_source
                .or(f.auth_failures_per_source)
                .unwrap_or(a.failures_per_source),
            failures_per_id: h
                .auth_failures_per_id
                .or(f.auth_failures_per_id)
                .unwrap_or(a.failures_per_id),
            failure_window: h
                .auth_failure_window_s
                .or(f.auth_failure_window_s)
                .map_or(a.failure_window, Duration::from_secs),
            table_capacity: h
                .auth_table_capacity
                .or(f.auth_table_capacity)
                .unwrap_or(a.table_capacity)
                .max(1),
            pair_failures_per_hour: h
                .pair_failures_per_hour
                .or(f.pair_failures_per_hour)
                .unwrap_or(a.pair_failures_per_hour),
            ..a
        };
        let reload_interval = ms(
            h.cert_reload_interval_ms,
            f.cert_reload_interval_ms,
            Duration::from_secs(10),
        );
        let cluster_tls =
            match (
                h.cluster_tls_cert.or(f.cluster_tls_cert.take()),
                h.cluster_tls_key.or(f.cluster_tls_key.take()),
                h.cluster_tls_ca.or(f.cluster_tls_ca.take()),
            ) {
                (Some(cert), Some(key), Some(ca)) => Some(ClusterTlsFiles {
                    cert,
                    key,
                    ca,
                    reload_interval,
                }),
                (None, None, None) => None,
                _ => return Err(NodeError::Config(
                    "mTLS between nodes needs all of --cluster-tls-cert, --cluster-tls-key and \
                     --cluster-tls-ca"
                        .into(),
                )),
            };
        Ok(Hardening {
            limits,
            auth,
            cluster_tls,
            cluster_plaintext: h.cluster_plaintext || f.cluster_plaintext,
        })
    }
}

/// Where durable state lives. Its `Debug` hides a PostgreSQL password.
#[derive(Clone, PartialEq, Eq)]
pub enum StoreUrl {
    /// The embedded store in this directory.
    Redb(PathBuf),
    /// A PostgreSQL database.
    Postgres(String),
    /// A FoundationDB cluster file (feature `fdb`).
    Fdb(String),
}

impl std::fmt::Debug for StoreUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreUrl::Redb(p) => f.debug_tuple("Redb").field(p).finish(),
            StoreUrl::Postgres(url) => f.debug_tuple("Postgres").field(&redact_url(url)).finish(),
            StoreUrl::Fdb(c) => f.debug_tuple("Fdb").field(c).finish(),
        }
    }
}

/// `scheme://user:password@rest` → `scheme://user:***@rest`; anything else unchanged.
pub fn redact_url(url: &str) -> String {
    match split_userinfo(url) {
        Some((head, user, Some(_), rest)) => format!("{head}{user}:***@{rest}"),
        _ => url.to_string(),
    }
}

/// Splits `scheme://userinfo@rest` into (`scheme://`, user, password, rest).
fn split_userinfo(url: &str) -> Option<(&str, &str, Option<&str>, &str)> {
    let scheme_end = url.find("://")? + 3;
    let (head, after) = url.split_at(scheme_end);
    // The authority ends at the first '/', '?' or '#'; its userinfo at its last '@'.
    let authority_end = after.find(['/', '?', '#']).unwrap_or(after.len());
    let at = after[..authority_end].rfind('@')?;
    let userinfo = &after[..at];
    let rest = &after[at + 1..];
    Some(match userinfo.split_once(':') {
        Some((user, password)) => (head, user, Some(password), rest),
        None => (head, userinfo, None, rest),
    })
}

/// Percent-encodes everything but RFC 3986 unreserved characters.
fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                char::from(b).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

impl StoreUrl {
    /// The store from `--store` or `--store-file`, with `--store-password-file`'s
    /// password added to a PostgreSQL URL; `None` when neither is given.
    pub fn resolve(
        url: Option<String>,
        url_file: Option<PathBuf>,
        password_file: Option<PathBuf>,
    ) -> Result<Option<Self>> {
        let url = match (url, url_file) {
            (Some(_), Some(_)) => {
                return Err(NodeError::Config(
                    "give the store either with --store or with --store-file, not both".into(),
                ))
            }
            (Some(url), None) => Some(url),
            (None, Some(path)) => Some(
                std::fs::read_to_string(&path)
                    .map_err(|e| {
                        NodeError::Config(format!("reading the store URL {}: {e}", path.display()))
                    })?
                    .trim()
                    .to_string(),
            ),
            (None, None) => None,
        };
        let Some(url) = url else {
            if password_file.is_some() {
                return Err(NodeError::Config(
                    "--store-password-file needs a PostgreSQL store (--store or --store-file)"
                        .into(),
                ));
            }
            return Ok(None);
        };
        let mut store = StoreUrl::parse(&url)?;
        if let Some(path) = password_file {
            let password = std::fs::read_to_string(&path).map_err(|e| {
                NodeError::Config(format!(
                    "reading the store password {}: {e}",
                    path.display()
                ))
            })?;
            let password = password.trim_end_matches(['\r', '\n']);
            store = store.with_password(password)?;
        }
        Ok(Some(store))
    }

    /// A PostgreSQL URL with `password` in it (percent-encoded).
    fn with_password(self, password: &str) -> Result<Self> {
        let StoreUrl::Postgres(url) = self else {
            return Err(NodeError::Config(
                "--store-password-file is only for a PostgreSQL store".into(),
            ));
        };
        if password.is_empty() {
            return Err(NodeError::Config("the store password file is empty".into()));
        }
        let with = match split_userinfo(&url) {
            Some((_, _, Some(_), _)) => {
                return Err(NodeError::Config(
                    "the store URL already carries a password: drop it, or drop \
                     --store-password-file"
                        .into(),
                ))
            }
            Some((head, user, None, rest)) => {
                format!("{head}{user}:{}@{rest}", percent_encode(password))
            }
            None => {
                return Err(NodeError::Config(
                    "--store-password-file needs a user in the store URL \
                     (postgres://user@host:port/db)"
                        .into(),
                ))
            }
        };
        Ok(StoreUrl::Postgres(with))
    }

    /// The backend's name in metrics and spans.
    pub fn backend(&self) -> &'static str {
        match self {
            StoreUrl::Redb(_) => "redb",
            StoreUrl::Postgres(_) => "postgres",
            StoreUrl::Fdb(_) => "fdb",
        }
    }

    /// Parses `redb:PATH` or `postgres://…` / `postgresql://…`.
    pub fn parse(url: &str) -> Result<Self> {
        if let Some(path) = url.strip_prefix("redb:") {
            return Ok(StoreUrl::Redb(PathBuf::from(path)));
        }
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            return Ok(StoreUrl::Postgres(url.to_string()));
        }
        if let Some(cluster_file) = url.strip_prefix("fdb:") {
            if cfg!(feature = "fdb") {
                return Ok(StoreUrl::Fdb(cluster_file.to_string()));
            }
            return Err(NodeError::Config(
                "the FoundationDB store is not built into this binary (build with --features fdb)"
                    .into(),
            ));
        }
        Err(NodeError::Config(format!(
            "--store {:?}: expected redb:PATH or postgres://user@host:port/db",
            redact_url(url)
        )))
    }
}

/// Reads a manufacturing key file: 64 bytes as 128 hex digits (what `tether admin mfg-key
/// generate` writes).
pub fn read_mfg_key(path: &std::path::Path) -> Result<Vec<u8>> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        NodeError::Config(format!("reading manufacturing key {}: {e}", path.display()))
    })?;
    let hex = text.trim();
    let bad = || {
        NodeError::Config(format!(
            "{}: expected 128 hex digits (64 bytes)",
            path.display()
        ))
    };
    if hex.len() != 128 || !hex.is_ascii() {
        return Err(bad());
    }
    (0..64)
        .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|_| bad()))
        .collect()
}

fn load_mfg_keys(specs: &[String]) -> Result<std::collections::HashMap<String, Vec<u8>>> {
    let mut keys = std::collections::HashMap::new();
    for spec in specs {
        let (key_id, path) = spec.split_once('=').ok_or_else(|| {
            NodeError::Config(format!("--mfg-key-file {spec:?}: expected <key_id>=<path>"))
        })?;
        if key_id.is_empty()
            || !key_id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return Err(NodeError::Config(format!(
                "manufacturing key id {key_id:?} must be [A-Za-z0-9_-]+"
            )));
        }
        keys.insert(
            key_id.to_string(),
            read_mfg_key(std::path::Path::new(path))?,
        );
    }
    Ok(keys)
}

/// A TOML value that is one path or a list of paths.
fn one_or_many<'de, D>(d: D) -> std::result::Result<Vec<PathBuf>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(PathBuf),
        Many(Vec<PathBuf>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(p) => vec![p],
        OneOrMany::Many(v) => v,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_loopback_plain_http_is_refused_with_a_clear_message() {
        let args = ServeArgs {
            listen: Some("0.0.0.0:8080".parse().expect("addr")),
            ..Default::default()
        };
        let err = Config::load(args).expect_err("must refuse");
        assert!(err.to_string().contains("non-loopback"), "{err}");
    }

    #[test]
    fn flags_override_file_which_overrides_defaults() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("t.toml");
        std::fs::write(&path, "max_bucket_bytes = 100\nnode_id = \"from-file\"\n").expect("write");
        let args = ServeArgs {
            config: Some(path),
            node_id: Some("from-flag".into()),
            ..Default::default()
        };
        let c = Config::load(args).expect("loads");
        assert_eq!(c.node_id, "from-flag");
        assert_eq!(c.max_bucket_bytes, 100);
        assert_eq!(c.listen, SocketAddr::from(([127, 0, 0, 1], 8080)));
        assert!(c.registration.device_types.contains_key("thermostat"));
    }

    #[test]
    fn the_store_cache_is_8_mib_unless_the_file_or_a_flag_says() {
        let c = Config::load(ServeArgs::default()).expect("loads");
        assert_eq!(c.store_cache, 8 << 20);
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("t.toml");
        std::fs::write(&path, "store_cache_mib = 64\n").expect("write");
        let from_file = ServeArgs {
            config: Some(path.clone()),
            ..Default::default()
        };
        assert_eq!(
            Config::load(from_file).expect("loads").store_cache,
            64 << 20
        );
        let flag = ServeArgs {
            config: Some(path),
            store_cache_mib: Some(2),
            ..Default::default()
        };
        assert_eq!(Config::load(flag).expect("loads").store_cache, 2 << 20);
    }

    #[test]
    fn fdb_store_refuses_a_bucket_limit_above_one_fdb_value() {
        let mut c = Config::load(ServeArgs::default()).expect("loads");
        // `fdb:` parses only in binaries built with the feature; the check is the same.
        c.store = StoreUrl::Fdb("/etc/foundationdb/fdb.cluster".into());
        c.max_bucket_bytes = 100_000;
        let err = c
            .check_transport()
            .expect_err("a bucket must fit one FDB value");
        assert!(err.to_string().contains("FoundationDB"), "{err}");
        c.max_bucket_bytes = crate::store::fdb::MAX_BUCKET_BYTES;
        c.check_transport().expect("the largest bucket that fits");
        c.store = StoreUrl::Redb("/tmp/x".into());
        c.max_bucket_bytes = 1_000_000;
        c.check_transport()
            .expect("other stores have no such limit");
    }

    #[test]
    fn flags_beat_the_environment_which_beats_the_file() {
        use clap::{FromArgMatches, Parser};
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            serve: ServeArgs,
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("t.toml");
        std::fs::write(
            &path,
            "node_id = \"from-file\"\npairing_code_ttl_s = 11\nsubscribe_default_timeout_ms = 1000\n",
        )
        .expect("write");
        // Variables only this test reads (tests share the process environment).
        std::env::set_var("TETHER_PAIRING_CODE_TTL_S", "22");
        std::env::set_var("TETHER_NODE_ID", "from-env");
        let parse = |args: &[&str]| {
            let m = <Cli as clap::CommandFactory>::command()
                .try_get_matches_from(args)
                .expect("arguments parse");
            Config::load(Cli::from_arg_matches(&m).expect("matches").serve).expect("loads")
        };
        let file = path.display().to_string();
        let c = parse(&["tether", "--config", &file, "--node-id", "from-flag"]);
        std::env::remove_var("TETHER_PAIRING_CODE_TTL_S");
        std::env::remove_var("TETHER_NODE_ID");
        assert_eq!(c.node_id, "from-flag", "flag over environment and file");
        assert_eq!(c.pairing_code_ttl_s, 22, "environment over file");
        assert_eq!(
            c.subscribe_default_timeout,
            Duration::from_millis(1000),
            "file over default"
        );
    }

    #[test]
    fn limits_come_from_flags_over_the_file_over_safe_defaults() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("t.toml");
        std::fs::write(
            &path,
            "max_held_per_principal = 3\nbody_read_timeout_ms = 700\n\
             trusted_proxies = [\"10.13.0.0/16\"]\nauth_failures_per_source = 7\n",
        )
        .expect("write");
        let args = ServeArgs {
            config: Some(path),
            hardening: HardeningArgs {
                max_held_per_principal: Some(5),
                pair_failures_per_hour: Some(2),
                ..Default::default()
            },
            ..Default::default()
        };
        let c = Config::load(args).expect("loads");
        assert_eq!(c.limits.max_held_per_principal, 5, "flag beats file");
        assert_eq!(c.limits.body_read_timeout, Duration::from_millis(700));
        assert_eq!(c.limits.trusted_proxies.len(), 1);
        assert_eq!(c.credentials.failures_per_source, 7);
        assert_eq!(c.credentials.pair_failures_per_hour, 2);
        // Everything else at its default.
        let d = Limits::default();
        assert_eq!(c.limits.max_ids_per_request, d.max_ids_per_request);
        assert_eq!(c.limits.max_connections_per_source, 256);
        assert_eq!(c.credentials.failures_per_id, 20);
    }

    #[test]
    fn limits_that_would_disable_themselves_are_refused() {
        for bad in [
            "max_held_per_principal = 0\n",
            "max_connections_per_source = 0\n",
            "readyz_saturation_percent = 0\n",
            "trusted_proxies = [\"10.0.0.0/33\"]\n",
            "max_answer_bytes = 1000\n",
        ] {
            let dir = tempfile::tempdir().expect("tempdir");
            let path = dir.path().join("t.toml");
            std::fs::write(&path, bad).expect("write");
            let args = ServeArgs {
                config: Some(path),
                ..Default::default()
            };
            assert!(Config::load(args).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_internal_port_needs_mtls_off_loopback() {
        let dir = tempfile::tempdir().expect("tempdir");
        let secret = dir.path().join("secret");
        std::fs::write(&secret, "0123456789abcdef0123").expect("write");
        let args = |listen: &str, plaintext: bool| ServeArgs {
            store: Some("postgres://t@127.0.0.1:1/t".into()),
            grpc_listen: Some(listen.parse().expect("addr")),
            grpc_advertise: Some("10.13.0.5:7000".into()),
            cluster_secret_files: vec![secret.clone()],
            hardening: HardeningArgs {
                cluster_plaintext: plaintext,
                ..Default::default()
            },
            ..Default::default()
        };
        let err = Config::load(args("0.0.0.0:7000", false)).expect_err("refused");
        assert!(err.to_string().contains("--cluster-tls-cert"), "{err}");
        assert!(Config::load(args("0.0.0.0:7000", true)).is_ok());
        assert!(Config::load(args("127.0.0.1:7000", false)).is_ok());
        let partial = ServeArgs {
            hardening: HardeningArgs {
                cluster_tls_cert: Some("c.pem".into()),
                ..Default::default()
            },
            ..Default::default()
        };
        assert!(Config::load(partial).is_err(), "cert without key and CA");
    }

    /// The failure-detection timing comes from the flags (over the file, over safe
    /// defaults); a probe timeout not shorter than the probe period is refused.
    #[test]
    fn failure_detection_timing_is_configurable_and_checked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let secret = dir.path().join("secret");
        std::fs::write(&secret, "0123456789abcdef0123").expect("write");
        let toml = dir.path().join("t.toml");
        std::fs::write(&toml, "failure_suspect_ms = 9000\nfailure_probe_ms = 800\n")
            .expect("write");
        let args = |probe: Option<u64>, rtt: Option<u64>| ServeArgs {
            config: Some(toml.clone()),
            store: Some("postgres://t@127.0.0.1:1/t".into()),
            grpc_listen: Some("127.0.0.1:7000".parse().expect("addr")),
            cluster_secret_files: vec![secret.clone()],
            failure_probe_ms: probe,
            failure_probe_rtt_ms: rtt,
            failure_down_on_refusal: Some(false),
            ..Default::default()
        };
        let config = Config::load(args(Some(400), Some(100))).expect("valid timing");
        let f = config.cluster.expect("cluster mode").failure;
        assert_eq!(f.probe_period, Duration::from_millis(400), "flag over file");
        assert_eq!(f.probe_rtt, Duration::from_millis(100));
        assert_eq!(
            f.suspect_to_down_after,
            Duration::from_millis(9000),
            "from the file"
        );
        assert!(!f.down_on_refusal);
        let defaults = Config::load(args(None, None)).expect("valid");
        let f = defaults.cluster.expect("cluster mode").failure;
        assert_eq!(f.probe_period, Duration::from_millis(800));
        assert_eq!(
            f.probe_rtt,
            tether_cluster::MembershipConfig::lan().probe_rtt
        );
        let err = Config::load(args(Some(200), Some(200))).expect_err("rtt not below period");
        assert!(err.to_string().contains("--failure-probe-rtt-ms"), "{err}");
    }

    /// A cluster member's arguments (on an unreachable PostgreSQL: loading the
    /// configuration never connects) with the secret in `secret` and `--cluster-threads`.
    fn cluster_args(secret: &std::path::Path, cluster_threads: Option<usize>) -> ServeArgs {
        ServeArgs {
            store: Some("postgres://t@127.0.0.1:1/t".into()),
            grpc_listen: Some("127.0.0.1:7000".parse().expect("addr")),
            cluster_secret_files: vec![secret.to_path_buf()],
            cluster_threads,
            ..Default::default()
        }
    }

    /// A directory holding a cluster secret and a configuration file of `toml`: the
    /// directory (removed when dropped) and the two paths.
    fn secret_and_file(toml: &str) -> (tempfile::TempDir, PathBuf, PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let secret = dir.path().join("secret");
        std::fs::write(&secret, "0123456789abcdef0123").expect("write");
        let file = dir.path().join("t.toml");
        std::fs::write(&file, toml).expect("write");
        (dir, secret, file)
    }

    /// The cluster's runtime: threads from the flag over the file, else none (the main
    /// thread) on up to 2 CPUs and 2 above.
    #[test]
    fn cluster_threads_come_from_flag_file_or_the_cpus() {
        let (_dir, secret, toml) = secret_and_file("cluster_threads = 3\n");
        let args = |file: bool, threads: Option<usize>| ServeArgs {
            config: file.then(|| toml.clone()),
            ..cluster_args(&secret, threads)
        };
        let threads = |file, flag| {
            Config::load(args(file, flag))
                .expect("valid")
                .cluster
                .expect("cluster mode")
                .threads
        };
        assert_eq!(threads(true, Some(0)), 0, "flag over file");
        assert_eq!(threads(true, None), 3, "from the file");
        let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
        assert_eq!(threads(false, None), default_cluster_threads(cpus));
        assert_eq!(
            (default_cluster_threads(1), default_cluster_threads(2)),
            (0, 0),
            "none of its own on up to 2 CPUs"
        );
        assert_eq!(default_cluster_threads(4), 2);
    }

    /// The set actors' threads: from the flag over the file, else none of their own (the
    /// main thread) in a cluster whose internal port runs there, and half the CPUs
    /// otherwise.
    #[test]
    fn actor_threads_come_from_flag_file_or_where_the_cluster_runs() {
        let (_dir, secret, toml) = secret_and_file("actor_threads = 3\n");
        let threads = |file: bool, flag: Option<usize>, cluster: Option<usize>| {
            Config::load(ServeArgs {
                config: file.then(|| toml.clone()),
                actor_threads: flag,
                ..cluster
                    .map(|threads| cluster_args(&secret, Some(threads)))
                    .unwrap_or_default()
            })
            .expect("valid")
            .actor_threads
        };
        assert_eq!(threads(true, Some(0), None), 0, "flag over file");
        assert_eq!(threads(true, None, Some(0)), 3, "from the file");
        let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
        assert_eq!(
            threads(false, None, None),
            cpus.div_ceil(2),
            "a single node"
        );
        assert_eq!(
            threads(false, None, Some(0)),
            0,
            "beside the cluster's port"
        );
        assert_eq!(
            threads(false, None, Some(2)),
            cpus.div_ceil(2),
            "a cluster runtime"
        );
    }

    #[test]
    fn unknown_config_keys_are_errors_not_silently_ignored() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("t.toml");
        std::fs::write(&path, "max_bucket_byte = 100\n").expect("write");
        let args = ServeArgs {
            config: Some(path),
            ..Default::default()
        };
        assert!(Config::load(args).is_err());
    }

    #[test]
    fn store_url_and_password_come_from_files_and_never_show_in_debug() {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = dir.path().join("url");
        let pw = dir.path().join("password");
        std::fs::write(&url, "postgres://tether@db.example:5432/tether\n").expect("write");
        std::fs::write(&pw, "p@ss:w/rd %1\n").expect("write");
        let store = StoreUrl::resolve(None, Some(url.clone()), Some(pw.clone()))
            .expect("resolves")
            .expect("a store");
        assert_eq!(
            store,
            StoreUrl::Postgres(
                "postgres://tether:p%40ss%3Aw%2Frd%20%251@db.example:5432/tether".into()
            )
        );
        let shown = format!("{store:?}");
        assert!(
            !shown.contains("p%40ss") && shown.contains("tether:***@db.example"),
            "{shown}"
        );
        // tokio-postgres decodes the password back.
        let StoreUrl::Postgres(u) = &store else {
            unreachable!()
        };
        let parsed: tokio_postgres::Config = u.parse().expect("valid URL");
        assert_eq!(parsed.get_password(), Some(&b"p@ss:w/rd %1"[..]));

        // The URL alone, from the flag or the file.
        let from_flag = StoreUrl::resolve(Some("postgres://u@h/d".into()), None, None)
            .expect("ok")
            .expect("store");
        assert_eq!(from_flag, StoreUrl::Postgres("postgres://u@h/d".into()));
        assert_eq!(StoreUrl::resolve(None, None, None).expect("ok"), None);

        for (flag, file, password, why) in [
            (
                Some("postgres://u@h/d"),
                Some(url.clone()),
                None,
                "not both",
            ),
            (
                Some("postgres://u:old@h/d"),
                None,
                Some(pw.clone()),
                "already carries a password",
            ),
            (
                Some("postgres://h/d"),
                None,
                Some(pw.clone()),
                "needs a user",
            ),
            (None, None, Some(pw.clone()), "needs a PostgreSQL store"),
            (
                Some("redb:/tmp/x"),
                None,
                Some(pw.clone()),
                "only for a PostgreSQL store",
            ),
            (
                None,
                Some(dir.path().join("missing")),
                None,
                "reading the store URL",
            ),
        ] {
            let err =
                StoreUrl::resolve(flag.map(String::from), file, password).expect_err("must refuse");
            assert!(err.to_string().contains(why), "{why}: {err}");
        }
        let bad = StoreUrl::parse("mysql://u:secret@h/d").expect_err("unknown scheme");
        assert!(!bad.to_string().contains("secret"), "{bad}");
    }

    #[test]
    fn advertise_takes_an_address_or_one_name() {
        assert_eq!(
            Advertise::parse("10.0.0.5:7000").expect("addr"),
            Advertise::Addr("10.0.0.5:7000".parse().expect("addr"))
        );
        assert!(matches!(
            Advertise::parse("tether-0.tether-headless.ns.svc.cluster.local:7000"),
            Ok(Advertise::Name(s)) if s.port == 7000
        ));
        for bad in ["0.0.0.0:7000", "10.0.0.5:0", "a:1,b:2", "name-without-port"] {
            assert!(Advertise::parse(bad).is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn an_advertised_name_must_resolve_to_this_host() {
        let local = Advertise::parse("localhost:7000").expect("name");
        let addr = local
            .resolve(Duration::from_secs(5))
            .await
            .expect("resolves");
        assert!(addr.ip().is_loopback(), "{addr}");
        // An address of no interface here: refused after the deadline, with the reason.
        let elsewhere = Advertise::Name(tether_cluster::seeds::SeedSpec {
            host: "192.0.2.1".into(),
            port: 7000,
        });
        let err = elsewhere
            .resolve(Duration::from_millis(100))
            .await
            .expect_err("not local");
        assert!(
            err.to_string().contains("not an address of this host"),
            "{err}"
        );
    }

    #[test]
    fn two_cluster_secret_files_are_held_at_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        std::fs::write(&a, "first-secret-0123456789\n").expect("write");
        std::fs::write(&b, "second-secret-0123456789").expect("write");
        let c = ClusterConfig::load(
            Some("127.0.0.1:7000".parse().expect("addr")),
            None,
            None,
            vec![a.clone(), b.clone()],
            0,
        )
        .expect("loads")
        .expect("cluster mode");
        assert_eq!(c.secret.len(), 2);
        let three = ClusterConfig::load(
            Some("127.0.0.1:7000".parse().expect("addr")),
            None,
            None,
            vec![a.clone(), b, a],
            0,
        );
        assert!(three.is_err());
    }

    #[test]
    fn plain_http_off_loopback_needs_the_explicit_flag() {
        let args = ServeArgs {
            listen: Some("0.0.0.0:8080".parse().expect("addr")),
            allow_plain_http: true,
            ..Default::default()
        };
        assert!(Config::load(args).is_ok());
    }
}
