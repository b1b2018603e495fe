//! `tether-sim`: a simulated fleet of devices (and optionally apps) against a Tether node,
//! a load balancer or a list of nodes, checking what it sees.
//!
//! Exit codes: 0 all checks passed; 1 a check failed (violations are printed); 2 the run
//! could not be made (bad arguments, nothing connected).

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use tether_sim::fleet::{self, SimConfig};
use tether_sim::keys;

/// Simulates N devices running the firmware's sans-IO `DeviceClient` over real HTTP, with
/// companions and apps writing to their buckets; checks that versions never go backwards
/// and that every change reaches its devices.
#[derive(Debug, Parser)]
#[command(name = "tether-sim", version)]
struct Args {
    /// Tether URL (a node or a load balancer); repeat for several nodes (devices are
    /// spread round-robin).
    #[arg(long = "url", required = true, num_args = 1.., value_delimiter = ',')]
    urls: Vec<String>,
    /// Number of simulated devices.
    #[arg(long, short = 'n', default_value_t = 10)]
    devices: usize,
    /// The server's manufacturing key file (as given to `tether serve --mfg-key-file`).
    #[arg(long)]
    mfg_key_file: PathBuf,
    /// The key id of that key (`d.<serial>.<key_id>`).
    #[arg(long, default_value = "k1")]
    key_id: String,
    /// Serial prefix; serials are `<prefix><index:06>` [default: SIM + random hex, so
    /// repeated runs do not hit the per-device registration limit].
    #[arg(long)]
    serial_prefix: Option<String>,
    /// First device index (to split one fleet over several processes).
    #[arg(long, default_value_t = 0)]
    first_index: usize,
    /// Device type sent on registration.
    #[arg(long, default_value = "thermostat")]
    device_type: String,
    /// Local changes per device per second (to `device.<serial>`).
    #[arg(long, default_value_t = 0.5)]
    update_rate: f64,
    /// Writes per device per second by a companion client (the device's assigned
    /// credentials, another session) to `shared.<serial>`; 0 disables.
    #[arg(long, default_value_t = 0.5)]
    companion_rate: f64,
    /// An app user as `u.<user>:<secret>` (repeatable); devices are paired with apps
    /// round-robin. Create users with `tether admin user add` while the node is stopped.
    #[arg(long = "user")]
    users: Vec<String>,
    /// A file of users, one `u.<user> <secret>` per line (what `tether admin user add`
    /// prints).
    #[arg(long)]
    users_file: Option<PathBuf>,
    /// App writes per paired device per second.
    #[arg(long, default_value_t = 0.2)]
    app_rate: f64,
    /// Mean seconds a device stays awake between sleeps; 0: never sleeps.
    #[arg(long, default_value_t = 0.0)]
    sleep_every_s: f64,
    /// Seconds a sleep lasts (link down, changes queued offline, back with versions).
    #[arg(long, default_value_t = 2.0)]
    sleep_for_s: f64,
    /// Push wake-ups: a gateway listens here for the node's wake-ups (give the node
    /// `--push-webhook http://<this address>/wake`); a sleeping device woken by one syncs at
    /// once, and every sleeping device tells the node when it syncs next (`next_sync_ms`:
    /// the end of its sleep).
    #[arg(long, requires = "push_secret_file")]
    push_listen: Option<std::net::SocketAddr>,
    /// The secret the node signs wake-ups with (its `--push-secret-file`).
    #[arg(long, requires = "push_listen")]
    push_secret_file: Option<PathBuf>,
    /// Connection drops per device per minute (flaky link); 0 disables.
    #[arg(long, default_value_t = 0.0)]
    flaky_per_min: f64,
    /// Flaky link that loses answers after the server acted: this fraction of PUT answers
    /// (devices, companions, apps) is received and thrown away; the writer retries with
    /// the same op id. 0 disables.
    #[arg(long, default_value_t = 0.0)]
    drop_answers: f64,
    /// The devices' receive buffer for subscribe answers (`max_bytes`); 0: no limit.
    #[arg(long, default_value_t = 0)]
    max_answer_bytes: u64,
    /// Length of the load phase in seconds.
    #[arg(long, default_value_t = 10.0)]
    duration_s: f64,
    /// Ends the load phase after this many acknowledged updates.
    #[arg(long)]
    max_updates: Option<u64>,
    /// Device starts are spread over this many seconds.
    #[arg(long, default_value_t = 1.0)]
    ramp_s: f64,
    /// Longest setup phase (register, subscribe, pair) after the ramp, in seconds; the
    /// load phase starts as soon as every device is connected and paired.
    #[arg(long, default_value_t = 60.0)]
    setup_timeout_s: f64,
    /// After the run, read every device's buckets and check that every acknowledged write
    /// is in them (a missing one is a violation).
    #[arg(long)]
    audit: bool,
    /// An acknowledged write must reach every awake device within this.
    #[arg(long, default_value_t = 5000)]
    notify_deadline_ms: u64,
    /// `timeout_ms` of every subscribe.
    #[arg(long, default_value_t = 30_000)]
    subscribe_timeout_ms: u64,
    /// Bound on every request but a held subscribe.
    #[arg(long, default_value_t = 10_000)]
    request_timeout_ms: u64,
    /// Speak protobuf instead of JSON.
    #[arg(long)]
    protobuf: bool,
    /// Source address to connect from (repeatable; e.g. 127.0.0.2 to spread ports).
    #[arg(long = "local-address")]
    local_addresses: Vec<IpAddr>,
    /// CA certificate (PEM) to trust for https URLs.
    #[arg(long)]
    ca_cert: Option<PathBuf>,
    /// Print the summary as JSON on stdout.
    #[arg(long)]
    json: bool,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
    /// Seeds every random choice.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

async fn config(a: Args) -> Result<SimConfig> {
    let push = match (&a.push_listen, &a.push_secret_file) {
        (Some(addr), Some(file)) => {
            let secret = std::fs::read_to_string(file)
                .with_context(|| format!("--push-secret-file {}", file.display()))?;
            let gw = tether_test_support::push::Gateway::bind(*addr, secret.trim().as_bytes())
                .await
                .with_context(|| format!("--push-listen {addr}"))?;
            Some(gw)
        }
        _ => None,
    };
    let mfg_key = keys::read_mfg_key(&a.mfg_key_file)?;
    let mut users = a
        .users
        .iter()
        .map(|u| keys::parse_user(u))
        .collect::<Result<Vec<_>>>()
        .context("--user")?;
    if let Some(f) = &a.users_file {
        users.extend(keys::read_users(f)?);
    }
    let prefix = a
        .serial_prefix
        .unwrap_or_else(|| format!("SIM{:06x}", rand::random::<u32>() & 0xff_ffff));
    let secs = |s: f64| Duration::from_secs_f64(s.max(0.0));
    Ok(SimConfig {
        urls: a.urls,
        devices: a.devices,
        serial_prefix: prefix,
        first_index: a.first_index,
        mfg_key,
        provisioned: Vec::new(),
        key_id: a.key_id,
        device_type: a.device_type,
        sw_version: "1.0.0".to_string(),
        update_rate: a.update_rate,
        companion_rate: a.companion_rate,
        users,
        app_rate: a.app_rate,
        sleep_every: (a.sleep_every_s > 0.0).then(|| secs(a.sleep_every_s)),
        sleep_for: secs(a.sleep_for_s),
        push,
        flaky_per_min: a.flaky_per_min,
        drop_answers: a.drop_answers.clamp(0.0, 1.0),
        max_answer_bytes: a.max_answer_bytes,
        duration: secs(a.duration_s),
        max_updates: a.max_updates,
        ramp: secs(a.ramp_s),
        setup_timeout: secs(a.setup_timeout_s),
        audit: a.audit,
        phases: None,
        notify_deadline: Duration::from_millis(a.notify_deadline_ms),
        faults: None,
        fault_recovery: Duration::ZERO,
        subscribe_timeout_ms: a.subscribe_timeout_ms,
        request_timeout: Duration::from_millis(a.request_timeout_ms),
        protobuf: a.protobuf,
        local_addresses: a.local_addresses,
        ca_cert: a.ca_cert,
        resolve: Vec::new(),
        stop_load: None,
        progress: !a.quiet && !a.json,
        seed: a.seed,
    })
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let json = args.json;
    let cfg = match config(args).await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("tether-sim: {e:#}");
            return ExitCode::from(2);
        }
    };
    let report = match fleet::run(cfg).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("tether-sim: {e:#}");
            return ExitCode::from(2);
        }
    };
    if json {
        match serde_json::to_string_pretty(&report) {
            Ok(s) => println!("{s}"),
            Err(e) => eprintln!("tether-sim: {e}"),
        }
    } else {
        print!("{}", report.human());
    }
    if !report.ok() {
        eprintln!(
            "tether-sim: {} violation(s) of the sync guarantees",
            report.violations.len()
        );
        return ExitCode::from(1);
    }
    if report.connected == 0 {
        eprintln!("tether-sim: no device connected");
        return ExitCode::from(2);
    }
    ExitCode::SUCCESS
}
