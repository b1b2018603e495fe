//! The `tether-chaos` command line. `main` only parses and calls [`run`], so every command
//! is a library function a test can call.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::checker::{check, CheckOptions, Verdict};
use crate::error::ChaosError;
use crate::report::{self, RunMeta};
use crate::runner::{self, RunOptions};
use crate::scenario::{self, Scenario, Tier};

/// Exit code when every safety property holds.
pub const EXIT_PASS: u8 = 0;
/// Exit code when a safety property was violated.
pub const EXIT_FAIL: u8 = 1;
/// Exit code when the command could not do its work (unreadable history, report I/O).
pub const EXIT_ERROR: u8 = 2;

/// The SREs' chaos suite for a Tether cluster.
#[derive(Debug, Parser)]
#[command(name = "tether-chaos", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// List the scenarios, their steady-state hypotheses and tiers.
    List,
    /// Run scenarios on fresh namespaced clusters (needs root), check each history and
    /// write its report: exits 0 only if every safety property held in every scenario (1 if
    /// one did not, 2 if a scenario could not run).
    Run(RunArgs),
    /// Re-check a recorded history: prints the verdict, exits 0 only if every safety
    /// property holds (1 if one does not, 2 if the history cannot be read). A `fleet.json`
    /// beside the history (a run with `--devices`) is part of the verdict.
    Check {
        /// The run's `history.jsonl`.
        history: PathBuf,
        /// Write the report (results.json, report.md, timeline.png, repro.sh) here.
        #[arg(long)]
        out: Option<PathBuf>,
        /// How long past its timeout a subscribe may take before it counts as hung (ms).
        #[arg(long, default_value_t = CheckOptions::default().subscribe_grace_ms)]
        subscribe_grace_ms: u64,
    },
    /// Run the cluster simulator: real nodes on simulated TCP and virtual time, one seed
    /// per run, every history checked; exits 0 only if every seed held every safety
    /// property (and seeds run twice gave the same history).
    Simulate(crate::sim::command::SimulateArgs),
}

/// `tether-chaos run`'s arguments.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Scenario names, or `smoke` (the smoke six) or `all` (every runnable scenario).
    #[arg(required = true)]
    pub scenarios: Vec<String>,
    #[arg(long, value_enum, default_value = "smoke")]
    pub tier: Tier,
    /// Seed of the fault schedule and the clients' operations [default: random, printed].
    #[arg(long)]
    pub seed: Option<u64>,
    /// Length of the fault phase, seconds [default: the tier's].
    #[arg(long)]
    pub duration: Option<u64>,
    /// Nodes [default: the tier's].
    #[arg(long)]
    pub nodes: Option<usize>,
    /// Hot-bucket clients [default: the tier's].
    #[arg(long)]
    pub clients: Option<usize>,
    /// `tether-sim` devices run through the load balancer alongside the hot buckets, their
    /// violations part of the verdict; 0 for none [default: the tier's: smoke 20, standard
    /// 50, soak 100; more on a bigger machine].
    #[arg(long)]
    pub devices: Option<usize>,
    /// Where each scenario's directory is written.
    #[arg(long, default_value = "chaos-out")]
    pub out: PathBuf,
    /// The `tether` binary to run (e.g. one built with a planted bug) [default: built from
    /// this workspace].
    #[arg(long)]
    pub tether_bin: Option<PathBuf>,
    /// Extra environment for every node, `KEY=VALUE` (repeatable), e.g. a planted bug's
    /// switch.
    #[arg(long = "node-env")]
    pub node_env: Vec<String>,
    /// Route every node's peer and store connections through the userspace fault proxy
    /// even in scenarios without link faults (zero delay): measures the proxy's own cost.
    #[arg(long)]
    pub link_proxy: bool,
}

fn list() {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "Every scenario: {}.\n", scenario::SAFETY);
    for s in scenario::all() {
        let status = match s.missing {
            Some(why) => format!("not runnable yet: {why}"),
            None if s.smoke => "smoke, standard".to_string(),
            None => "standard".to_string(),
        };
        let _ = writeln!(
            out,
            "{:<24} [{status}]\n    {}\n    liveness goals: {}",
            s.name,
            s.hypothesis,
            goals_text(&s.goals)
        );
    }
}

/// A scenario's liveness goals in a line (`none` when it has none but convergence).
pub fn goals_text(g: &crate::checker::Goals) -> String {
    let mut parts = Vec::new();
    if let Some(a) = g.min_availability {
        parts.push(format!("availability ≥ {:.1} %", a * 100.0));
    }
    if let Some(a) = g.min_availability_unaffected {
        parts.push(format!("unaffected sets ≥ {:.1} %", a * 100.0));
    }
    if let Some(f) = g.max_failover_s {
        parts.push(format!("failover ≤ {f} s"));
    }
    if let Some(c) = g.max_convergence_s {
        parts.push(format!("convergence ≤ {c} s"));
    }
    if parts.is_empty() {
        "none".into()
    } else {
        parts.join(", ")
    }
}

fn pick(names: &[String]) -> Result<Vec<Scenario>, ChaosError> {
    let mut out = Vec::new();
    for n in names {
        match n.as_str() {
            "smoke" => out.extend(scenario::smoke()),
            "all" => out.extend(scenario::all().into_iter().filter(|s| s.missing.is_none())),
            name => out.push(scenario::find(name).ok_or_else(|| {
                ChaosError::Usage(format!(
                    "no scenario {name:?} (`tether-chaos list` names them)"
                ))
            })?),
        }
    }
    Ok(out)
}

fn run_options(args: &RunArgs) -> Result<RunOptions, ChaosError> {
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
        duration: args.duration.map(std::time::Duration::from_secs),
        nodes: args.nodes,
        clients: args.clients,
        devices: args.devices,
        out: args.out.clone(),
        tether_bin: args.tether_bin.clone(),
        node_env,
        link_proxy: args.link_proxy,
    })
}

/// The command line that reruns `scenario` of this run with its seed.
fn command_line(scenario: &str, opts: &RunOptions) -> Vec<String> {
    let mut c = vec![
        "tether-chaos".to_string(),
        "run".into(),
        scenario.to_string(),
        "--tier".into(),
        format!("{:?}", opts.tier).to_lowercase(),
        "--seed".into(),
        opts.seed.to_string(),
    ];
    if let Some(d) = opts.duration {
        c.extend(["--duration".into(), d.as_secs().to_string()]);
    }
    if let Some(n) = opts.nodes {
        c.extend(["--nodes".into(), n.to_string()]);
    }
    if let Some(n) = opts.clients {
        c.extend(["--clients".into(), n.to_string()]);
    }
    if let Some(n) = opts.devices {
        c.extend(["--devices".into(), n.to_string()]);
    }
    if let Some(b) = &opts.tether_bin {
        c.extend(["--tether-bin".into(), b.display().to_string()]);
    }
    for (k, v) in &opts.node_env {
        c.extend(["--node-env".into(), format!("{k}={v}")]);
    }
    if opts.link_proxy {
        c.push("--link-proxy".into());
    }
    c
}

/// Runs, checks and reports every scenario; the exit code.
async fn run_scenarios(args: RunArgs) -> Result<u8, ChaosError> {
    let scenarios = pick(&args.scenarios)?;
    let opts = run_options(&args)?;
    if let Some(bin) = &opts.tether_bin {
        // The nodes' certificates are made by the same binary (test-support runs $TETHER_BIN).
        std::env::set_var("TETHER_BIN", bin);
    }
    eprintln!("tether-chaos: seed {0} (replay with --seed {0})", opts.seed);
    let started = std::time::Instant::now();
    let (mut passed, mut failed, mut broken) = (Vec::new(), Vec::new(), Vec::new());
    for s in &scenarios {
        let info = match runner::run_one(s, &opts).await {
            Ok(info) => info,
            Err(e) => {
                eprintln!("-- {}: COULD NOT RUN: {e}", s.name);
                broken.push(s.name);
                continue;
            }
        };
        let history = info.dir.join("history.jsonl");
        let entries = crate::history::read(&history).map_err(ChaosError::History)?;
        let verdict = check(&entries, &s.check_options()).with_fleet(info.fleet.clone());
        let mut meta = RunMeta::from_history(&entries);
        meta.command_line = command_line(s.name, &opts);
        meta.tier = format!("{:?}", opts.tier).to_lowercase();
        meta.nodes = info.spec.nodes;
        meta.devices = info.spec.clients;
        meta.notes = info.notes.clone();
        meta.notes
            .push(format!("steady-state hypothesis: {}", s.hypothesis));
        report::write(&info.dir, &entries, &verdict, &meta).map_err(|source| {
            ChaosError::Report {
                path: info.dir.clone(),
                source,
            }
        })?;
        eprint!("-- {}: {}", s.name, summary(&verdict));
        eprintln!("   report: {}", info.dir.join("report.md").display());
        if verdict.passed {
            passed.push(s.name);
        } else {
            failed.push(s.name);
        }
    }
    eprintln!(
        "tether-chaos: {} passed, {} failed, {} could not run ({:.0} s){}{}",
        passed.len(),
        failed.len(),
        broken.len(),
        started.elapsed().as_secs_f64(),
        if failed.is_empty() {
            String::new()
        } else {
            format!("; FAILED: {}", failed.join(", "))
        },
        if broken.is_empty() {
            String::new()
        } else {
            format!("; COULD NOT RUN: {}", broken.join(", "))
        },
    );
    Ok(if !broken.is_empty() {
        EXIT_ERROR
    } else if !failed.is_empty() {
        EXIT_FAIL
    } else {
        EXIT_PASS
    })
}

/// Runs a parsed command line; the process exit code.
pub fn run(cli: Cli) -> ExitCode {
    match cli.command {
        Command::List => {
            list();
            ExitCode::from(EXIT_PASS)
        }
        Command::Simulate(args) => ExitCode::from(crate::sim::command::simulate(&args)),
        Command::Run(args) => {
            let rt = match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("tether-chaos: tokio runtime: {e}");
                    return ExitCode::from(EXIT_ERROR);
                }
            };
            let result = rt.block_on(async {
                tokio::select! {
                    r = run_scenarios(args) => r,
                    _ = tokio::signal::ctrl_c() => {
                        // Dropping the run future drops its cluster: processes killed,
                        // PostgreSQL stopped, namespaces and bridge deleted.
                        Err(ChaosError::Usage("interrupted (Ctrl-C): cluster torn down".into()))
                    }
                }
            });
            match result {
                Ok(code) => ExitCode::from(code),
                Err(e) => {
                    eprintln!("tether-chaos: {e}");
                    ExitCode::from(EXIT_ERROR)
                }
            }
        }
        Command::Check {
            history,
            out,
            subscribe_grace_ms,
        } => {
            let opts = CheckOptions {
                subscribe_grace_ms,
                ..CheckOptions::default()
            };
            match check_file(&history, out.as_deref(), &opts) {
                Ok(v) => {
                    // A closed stdout (`| head`) must not turn a verdict into a panic.
                    use std::io::Write as _;
                    let mut stdout = std::io::stdout().lock();
                    let _ = stdout.write_all(summary(&v).as_bytes());
                    if let Some(dir) = &out {
                        let _ = writeln!(stdout, "report: {}", dir.join("report.md").display());
                    }
                    ExitCode::from(if v.passed { EXIT_PASS } else { EXIT_FAIL })
                }
                Err(e) => {
                    eprintln!("tether-chaos check: {e}");
                    ExitCode::from(EXIT_ERROR)
                }
            }
        }
    }
}

/// Reads and checks a history (with the fleet's `fleet.json` beside it, if the run had a
/// fleet), and writes its report into `out` if given.
pub fn check_file(
    history: &Path,
    out: Option<&Path>,
    opts: &CheckOptions,
) -> Result<Verdict, ChaosError> {
    let entries = crate::history::read(history).map_err(ChaosError::History)?;
    // Judged against its scenario's liveness goals when the history names a known one.
    let scenario = RunMeta::from_history(&entries).scenario;
    let opts = &match crate::scenario::all().iter().find(|s| s.name == scenario) {
        Some(s) => CheckOptions {
            goals: s.goals,
            ..opts.clone()
        },
        None => opts.clone(),
    };
    // The fleet's result is not in the history: its summary is `fleet.json` beside it.
    let verdict = check(&entries, opts).with_fleet(crate::fleet::read(history)?);
    if let Some(dir) = out {
        let meta = RunMeta::from_history(&entries);
        report::write(dir, &entries, &verdict, &meta).map_err(|source| ChaosError::Report {
            path: dir.to_path_buf(),
            source,
        })?;
    }
    Ok(verdict)
}

/// The verdict as printed: the word, every property, the first examples, liveness.
pub fn summary(v: &Verdict) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let _ = writeln!(s, "verdict: {}", if v.passed { "PASS" } else { "FAIL" });
    for (k, n) in v.properties.iter() {
        let _ = writeln!(s, "  {k:<20} {n}");
    }
    if v.malformed_count > 0 {
        let _ = writeln!(
            s,
            "  malformed history ({}): {}",
            v.malformed_count,
            v.malformed.join("; ")
        );
    }
    for e in v.examples.iter().take(5) {
        let _ = writeln!(s, "  e.g. {}: {}", e.property, e.detail);
    }
    let fmt = |x: Option<f64>, unit: &str, scale: f64| {
        x.map_or("n/a".to_string(), |x| format!("{:.2}{unit}", x * scale))
    };
    if let Some(f) = &v.fleet {
        let _ = writeln!(s, "{}", f.line());
        for e in f.examples.iter().take(5) {
            let _ = writeln!(s, "  e.g. fleet: {e}");
        }
    }
    let _ = writeln!(
        s,
        "liveness: {} (availability {}, unaffected sets {}, failover {}, convergence {})",
        if v.liveness_passed {
            "within thresholds"
        } else {
            "NOT within thresholds"
        },
        fmt(v.availability, " %", 100.0),
        fmt(v.availability_unaffected, " %", 100.0),
        fmt(v.failover_s, " s", 1.0),
        fmt(v.convergence_s, " s", 1.0),
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checker::Goals;

    #[test]
    fn goals_read_as_a_line_and_a_scenario_without_them_says_so() {
        assert_eq!(
            goals_text(&Goals::default()),
            "availability ≥ 95.0 %, unaffected sets ≥ 99.0 %, failover ≤ 15 s, convergence ≤ 20 s"
        );
        let none = Goals {
            min_availability: None,
            min_availability_unaffected: None,
            max_failover_s: None,
            max_convergence_s: None,
        };
        assert_eq!(goals_text(&none), "none");
    }
}
