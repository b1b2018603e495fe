//! `tether-bench`: Tether's benchmarks, each one command, bounded in time, loopback only,
//! each printing ratios against a baseline measured in the same run. Results go to
//! `results/<name>.json` and `results/<name>.png`. See BENCHMARKS.md.

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};
use tether_sim::bench::{blobs, ceiling, cluster, cold, idle, peers, register, synclog, tracing};

/// Tether benchmarks (loopback only).
#[derive(Debug, Parser)]
#[command(name = "tether-bench", version)]
struct Args {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Trivial actix-web handler vs Tether's durable PUT path, same client and concurrency.
    HttpCeiling {
        /// The `tether` binary (a release build).
        #[arg(long, default_value = "target/release/tether")]
        tether_bin: PathBuf,
        /// Repetitions.
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Measured seconds per target per run.
        #[arg(long, default_value_t = 5.0)]
        secs: f64,
        /// Concurrent connections.
        #[arg(long, default_value_t = 32)]
        conns: usize,
        /// HTTP workers of both servers.
        #[arg(long, default_value_t = 2)]
        workers: usize,
        /// Results directory.
        #[arg(long, default_value = "results")]
        out: PathBuf,
    },
    /// The same workload against Tether (long-poll and streaming subscribe), etcd and
    /// mosquitto.
    Peers {
        /// The `tether` binary (a release build).
        #[arg(long, default_value = "target/release/tether")]
        tether_bin: PathBuf,
        /// Repetitions.
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Keys.
        #[arg(long, default_value_t = 100)]
        keys: usize,
        /// Subscribers per key.
        #[arg(long, default_value_t = 2)]
        subs: usize,
        /// Updates per second of the fixed-rate phase.
        #[arg(long, default_value_t = 200.0)]
        rate: f64,
        /// Writers of the saturated phase.
        #[arg(long, default_value_t = 16)]
        writers: usize,
        /// Seconds per phase.
        #[arg(long, default_value_t = 6.0)]
        secs: f64,
        /// Systems to run.
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "tether,tether-stream,etcd,mosquitto"
        )]
        systems: Vec<String>,
        /// Results directory.
        #[arg(long, default_value = "results")]
        out: PathBuf,
    },
    /// A 3-node cluster on PostgreSQL vs one embedded-store node (durable PUT/s, cold
    /// registrations/s), and kill -9 failovers (time to serve the killed node's sets
    /// again, failed requests).
    Cluster(cluster::Opts),
    /// Cold registrations/s through one node on PostgreSQL: batched first contacts vs the
    /// general path (same binary, same run) and vs one embedded-store node; SQL statements
    /// per registration.
    Register(register::Opts),
    /// Server RSS per held subscription, Tether and mosquitto, same count.
    IdleSubscriptions {
        /// The `tether` binary (a release build).
        #[arg(long, default_value = "target/release/tether")]
        tether_bin: PathBuf,
        /// The `tether-sim` binary [default: next to this one].
        #[arg(long)]
        sim_bin: Option<PathBuf>,
        /// Repetitions.
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Subscriptions per server process.
        #[arg(long, default_value_t = 18_000)]
        count: usize,
        /// Client processes per server.
        #[arg(long, default_value_t = 3)]
        procs: usize,
        /// Tether nodes, each holding `count`: independent ones, or one cluster with --cluster.
        #[arg(long, default_value_t = 1)]
        nodes: usize,
        /// Run the nodes as one cluster on a private PostgreSQL (needs the PostgreSQL
        /// server binaries); devices hold their subscribe at their set's owner.
        #[arg(long)]
        cluster: bool,
        /// Devices each client process starts per second (registration on a shared
        /// PostgreSQL is far slower than on the embedded store: lower it with --cluster).
        #[arg(long, default_value_t = 400.0)]
        ramp_per_s: f64,
        /// Seconds allowed to get every subscription held.
        #[arg(long, default_value_t = 240)]
        connect_limit_s: u64,
        /// Only Tether.
        #[arg(long)]
        skip_mosquitto: bool,
        /// Also measure Tether with the held devices' sets parked (their actors stopped,
        /// `--passivate-after-ms 2000`), same run.
        #[arg(long)]
        parked: bool,
        /// Results directory.
        #[arg(long, default_value = "results")]
        out: PathBuf,
    },
    /// A blob uploaded and downloaded whole through one node vs a file copy of the same
    /// bytes (same run), and the node's memory per upload held open.
    Blobs {
        /// The `tether` binary (a release build).
        #[arg(long, default_value = "target/release/tether")]
        tether_bin: PathBuf,
        /// Repetitions.
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Size of the blob, MiB.
        #[arg(long, default_value_t = 16)]
        mib: usize,
        /// Uploads held open at once for the memory figure.
        #[arg(long, default_value_t = 50)]
        concurrent: usize,
        /// Results directory.
        #[arg(long, default_value = "results")]
        out: PathBuf,
    },
    /// First request for a passivated bucket set vs a warm one.
    ColdActivation {
        /// The `tether` binary (a release build).
        #[arg(long, default_value = "target/release/tether")]
        tether_bin: PathBuf,
        /// Repetitions.
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Bucket sets timed per run.
        #[arg(long, default_value_t = 200)]
        devices: usize,
        /// The node's `--passivate-after-ms`.
        #[arg(long, default_value_t = 300)]
        passivate_after_ms: u64,
        /// Results directory.
        #[arg(long, default_value = "results")]
        out: PathBuf,
    },
    /// The sync log: bytes of catching up after N missed changes (whole value vs diff), and
    /// PUT throughput of this release vs the previous one (with and without op ids).
    SyncLog {
        /// This release's `tether` binary (a release build).
        #[arg(long, default_value = "target/release/tether")]
        tether_bin: PathBuf,
        /// The previous release's `tether` binary (scripts/bench/sync-log builds it).
        #[arg(long)]
        baseline_bin: Option<PathBuf>,
        /// Repetitions of the throughput comparison.
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Measured seconds per target per run.
        #[arg(long, default_value_t = 5.0)]
        secs: f64,
        /// Concurrent connections.
        #[arg(long, default_value_t = 32)]
        conns: usize,
        /// HTTP workers of the node.
        #[arg(long, default_value_t = 2)]
        workers: usize,
        /// Missed changes to catch up from.
        #[arg(long, value_delimiter = ',', default_value = "1,2,5,10,20,50,100,150")]
        missed: Vec<usize>,
        /// Results directory.
        #[arg(long, default_value = "results")]
        out: PathBuf,
    },
    /// Durable PUT throughput with trace export off vs on (to an in-process OTLP
    /// receiver, every request sampled), same binary, same run.
    TracingOverhead {
        /// The `tether` binary (a release build).
        #[arg(long, default_value = "target/release/tether")]
        tether_bin: PathBuf,
        /// Repetitions.
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Measured seconds per node per run.
        #[arg(long, default_value_t = 5.0)]
        secs: f64,
        /// Concurrent connections.
        #[arg(long, default_value_t = 32)]
        conns: usize,
        /// HTTP workers of each node.
        #[arg(long, default_value_t = 2)]
        workers: usize,
        /// OTLP transport: grpc or http/protobuf.
        #[arg(long, default_value = "grpc")]
        protocol: String,
        /// Share of requests traced: 1 traces every one.
        #[arg(long, default_value_t = 1.0)]
        sample: f64,
        /// Results directory.
        #[arg(long, default_value = "results")]
        out: PathBuf,
    },
    /// (internal) The trivial actix-web server of http-ceiling.
    TrivialServer {
        /// Worker threads.
        #[arg(long, default_value_t = 2)]
        workers: usize,
    },
    /// (internal) Holds MQTT subscriptions for idle-subscriptions.
    MqttHold {
        /// mosquitto's port on 127.0.0.1.
        #[arg(long)]
        port: u16,
        /// Sessions to open.
        #[arg(long)]
        count: usize,
        /// First session index.
        #[arg(long, default_value_t = 0)]
        first: usize,
        /// Source address.
        #[arg(long, default_value = "127.0.0.1")]
        local_address: IpAddr,
        /// Seconds to hold.
        #[arg(long, default_value_t = 300)]
        secs: u64,
    },
}

fn sibling(name: &str) -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join(name)))
        .unwrap_or_else(|| PathBuf::from(name))
}

fn run(args: Args) -> Result<()> {
    if let Cmd::TrivialServer { workers } = args.command {
        return ceiling::trivial_server(workers);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        match args.command {
            Cmd::HttpCeiling {
                tether_bin,
                runs,
                secs,
                conns,
                workers,
                out,
            } => {
                ceiling::run(ceiling::Opts {
                    tether_bin,
                    runs,
                    secs,
                    conns,
                    workers,
                    out,
                })
                .await
            }
            Cmd::Cluster(opts) => cluster::run(opts).await,
            Cmd::Register(opts) => register::run(opts).await,
            Cmd::TracingOverhead {
                tether_bin,
                runs,
                secs,
                conns,
                workers,
                protocol,
                sample,
                out,
            } => {
                tracing::run(tracing::Opts {
                    tether_bin,
                    runs,
                    secs,
                    conns,
                    workers,
                    protocol,
                    sample,
                    out,
                })
                .await
            }
            Cmd::Peers {
                tether_bin,
                runs,
                keys,
                subs,
                rate,
                writers,
                secs,
                systems,
                out,
            } => {
                peers::run(peers::Opts {
                    tether_bin,
                    runs,
                    keys,
                    subs,
                    rate,
                    writers,
                    secs,
                    systems,
                    out,
                })
                .await
            }
            Cmd::IdleSubscriptions {
                tether_bin,
                sim_bin,
                runs,
                count,
                procs,
                nodes,
                cluster,
                ramp_per_s,
                connect_limit_s,
                skip_mosquitto,
                parked,
                out,
            } => {
                idle::run(idle::Opts {
                    parked,
                    cluster,
                    ramp_per_s,
                    tether_bin,
                    sim_bin: sim_bin.unwrap_or_else(|| sibling("tether-sim")),
                    runs,
                    count,
                    procs,
                    nodes,
                    connect_limit_s,
                    skip_mosquitto,
                    out,
                })
                .await
            }
            Cmd::Blobs {
                tether_bin,
                runs,
                mib,
                concurrent,
                out,
            } => {
                blobs::run(blobs::Opts {
                    tether_bin,
                    runs,
                    mib,
                    concurrent,
                    out,
                })
                .await
            }
            Cmd::ColdActivation {
                tether_bin,
                runs,
                devices,
                passivate_after_ms,
                out,
            } => {
                cold::run(cold::Opts {
                    tether_bin,
                    runs,
                    devices,
                    passivate_after_ms,
                    out,
                })
                .await
            }
            Cmd::SyncLog {
                tether_bin,
                baseline_bin,
                runs,
                secs,
                conns,
                workers,
                missed,
                out,
            } => {
                synclog::run(synclog::Opts {
                    tether_bin,
                    baseline_bin,
                    runs,
                    secs,
                    conns,
                    workers,
                    missed,
                    out,
                })
                .await
            }
            Cmd::MqttHold {
                port,
                count,
                first,
                local_address,
                secs,
            } => idle::mqtt_hold(port, count, first, local_address, secs).await,
            Cmd::TrivialServer { .. } => Ok(()),
        }
    })
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tether-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}
