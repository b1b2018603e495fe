//! `tether-chaos`: the SRE's fault-injection suite.
//!
//! - `tether-chaos list`: the scenarios, their steady-state hypotheses, and which tier runs
//!   them.
//! - `tether-chaos run <scenario>… [--tier smoke|standard|soak] [--seed N] [--duration S]
//!   [--nodes N] [--clients N] [--out DIR] [--tether-bin PATH] [--node-env K=V]`: runs each
//!   scenario on a fresh namespaced cluster (`smoke`, `standard` or `all` name a tier's
//!   scenarios) and writes `<out>/<scenario>/history.jsonl`. Ctrl-C tears the cluster down.
//!
//! Needs root (network namespaces, nftables). Exit code: 0 when every run completed, 1 when
//! one failed, 2 on a usage error.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use tether_chaos_tests::error::ChaosError;
use tether_chaos_tests::runner::{self, RunOptions};
use tether_chaos_tests::scenario::{self, Scenario, Tier};

#[derive(Debug, Parser)]
#[command(
    name = "tether-chaos",
    about = "Fault injection against a real Tether cluster"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// List the scenarios.
    List,
    /// Run scenarios (names, or `smoke`, `standard`/`all` for a tier's set).
    Run(RunArgs),
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// Scenario names, or `smoke` (the smoke six) or `all` (every runnable scenario).
    #[arg(required = true)]
    scenarios: Vec<String>,
    #[arg(long, value_enum, default_value = "smoke")]
    tier: Tier,
    /// Seed of the fault schedule and the clients' operations [default: random, printed].
    #[arg(long)]
    seed: Option<u64>,
    /// Length of the fault phase, seconds [default: the tier's].
    #[arg(long)]
    duration: Option<u64>,
    /// Nodes [default: the tier's].
    #[arg(long)]
    nodes: Option<usize>,
    /// Hot-bucket clients [default: the tier's].
    #[arg(long)]
    clients: Option<usize>,
    /// Where each scenario's directory is written.
    #[arg(long, default_value = "chaos-out")]
    out: PathBuf,
    /// The `tether` binary to run (e.g. one built with a planted bug) [default: built from
    /// this workspace].
    #[arg(long)]
    tether_bin: Option<PathBuf>,
    /// Extra environment for every node, `KEY=VALUE` (repeatable).
    #[arg(long = "node-env")]
    node_env: Vec<String>,
}

fn list() {
    println!("Every scenario: {}.\n", scenario::SAFETY);
    for s in scenario::all() {
        let status = match s.missing {
            Some(why) => format!("not runnable yet: {why}"),
            None if s.smoke => "smoke, standard".to_string(),
            None => "standard".to_string(),
        };
        println!("{:<24} [{status}]\n    {}", s.name, s.hypothesis);
    }
}

fn pick(names: &[String]) -> Result<Vec<Scenario>, ChaosError> {
    let mut out = Vec::new();
    for n in names {
        match n.as_str() {
            "smoke" => out.extend(scenario::smoke()),
            "all" | "standard" => {
                out.extend(scenario::all().into_iter().filter(|s| s.missing.is_none()))
            }
            name => out.push(scenario::find(name).ok_or_else(|| {
                ChaosError::Usage(format!(
                    "no scenario {name:?} (`tether-chaos list` names them)"
                ))
            })?),
        }
    }
    Ok(out)
}

fn options(args: &RunArgs) -> Result<RunOptions, ChaosError> {
    let mut node_env = Vec::new();
    for kv in &args.node_env {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| ChaosError::Usage(format!("--node-env {kv}: expected KEY=VALUE")))?;
        node_env.push((k.to_string(), v.to_string()));
    }
    Ok(RunOptions {
        tier: args.tier,
        seed: args.seed.unwrap_or_else(rand::random),
        duration: args.duration.map(Duration::from_secs),
        nodes: args.nodes,
        clients: args.clients,
        out: args.out.clone(),
        tether_bin: args.tether_bin.clone(),
        node_env,
    })
}

async fn run(args: RunArgs) -> Result<bool, ChaosError> {
    let scenarios = pick(&args.scenarios)?;
    let opts = options(&args)?;
    if let Some(bin) = &opts.tether_bin {
        // Certificates are made by the same binary (test-support runs $TETHER_BIN).
        std::env::set_var("TETHER_BIN", bin);
    }
    eprintln!(
        "tether-chaos: seed {} (replay with --seed {})",
        opts.seed, opts.seed
    );
    let mut failed = Vec::new();
    let started = std::time::Instant::now();
    for s in &scenarios {
        match runner::run_one(s, &opts).await {
            Ok(_) => {}
            Err(e) => {
                eprintln!("-- {}: FAILED TO RUN: {e}", s.name);
                failed.push(s.name);
            }
        }
    }
    eprintln!(
        "tether-chaos: {} run, {} failed to run, {:.0} s{}",
        scenarios.len() - failed.len(),
        failed.len(),
        started.elapsed().as_secs_f64(),
        if failed.is_empty() {
            String::new()
        } else {
            format!(": {}", failed.join(", "))
        }
    );
    Ok(failed.is_empty())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Cmd::List => {
            list();
            ExitCode::SUCCESS
        }
        Cmd::Run(args) => {
            let rt = match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("tether-chaos: tokio runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let result = rt.block_on(async {
                tokio::select! {
                    r = run(args) => r,
                    _ = tokio::signal::ctrl_c() => {
                        // Dropping the run future drops its cluster: processes killed,
                        // PostgreSQL stopped, namespaces and bridge deleted.
                        Err(ChaosError::Usage("interrupted (Ctrl-C): cluster torn down".into()))
                    }
                }
            });
            match result {
                Ok(true) => ExitCode::SUCCESS,
                Ok(false) => ExitCode::FAILURE,
                Err(ChaosError::Usage(m)) => {
                    eprintln!("tether-chaos: {m}");
                    ExitCode::from(2)
                }
                Err(e) => {
                    eprintln!("tether-chaos: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
