//! `tether-chaos simulate`: many seeds of the cluster simulator, each checked; every
//! failure printed with the one command that replays it.

use std::io::Write as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::{SeedRun, SimConfig};
use crate::cli::{EXIT_ERROR, EXIT_FAIL, EXIT_PASS};

/// `tether-chaos simulate`'s arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct SimulateArgs {
    /// Seeds to run: `first-seed`, `first-seed + 1`, …
    #[arg(long, default_value_t = 16)]
    pub seeds: u64,
    /// The first seed of the range.
    #[arg(long, default_value_t = 1)]
    pub first_seed: u64,
    /// Run this one seed only (replay); overrides `--seeds` and `--first-seed`.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Virtual seconds of workload and faults per seed (the last 15 s without faults).
    #[arg(long, default_value_t = 120)]
    pub sim_secs: u64,
    /// Cluster members.
    #[arg(long, default_value_t = 3)]
    pub nodes: usize,
    /// Workload clients.
    #[arg(long, default_value_t = 6)]
    pub clients: u32,
    /// Plant a bug in every node (`ack-before-durable`, `skip-epoch-check`, `stale-reads`,
    /// `drop-notification`); needs a build with `--features planted`.
    #[arg(long)]
    pub planted: Option<String>,
    /// Run without faults (a baseline).
    #[arg(long)]
    pub no_faults: bool,
    /// Run every Nth seed twice and require the same history hash (0: never).
    #[arg(long, default_value_t = 8)]
    pub check_determinism_every: u64,
    /// Report seeds whose two runs differed without failing on them (the exit code then
    /// reflects the safety properties only): for hunting a new leak across many seeds
    /// (ARCHITECTURE.md "The cluster simulator", Determinism); CI does not use it.
    #[arg(long)]
    pub nondeterminism_warns: bool,
    /// Stop at the first failing seed (finding a planted bug).
    #[arg(long)]
    pub stop_on_failure: bool,
    /// Seeds run at once (threads) [default: the machine's cores].
    #[arg(long)]
    pub threads: Option<usize>,
    /// Print the nodes' logs (filtered by `RUST_LOG`, default `info`) on stderr, stamped
    /// with virtual time and the node: for replaying one seed.
    #[arg(long)]
    pub log: bool,
    /// Run one seed (`--seed`) in this process and print its summary as JSON (what
    /// `simulate` starts each seed as).
    #[arg(long, hide = true)]
    pub child: bool,
    /// Keep the history under this file name even if the seed passes (`--child`).
    #[arg(long, hide = true)]
    pub keep_history: Option<String>,
    /// Where each failing seed's `history.jsonl` is written (re-check it with
    /// `tether-chaos check`).
    #[arg(long, default_value = "sim-out")]
    pub out: PathBuf,
}

impl SimulateArgs {
    fn replay(&self, seed: u64) -> String {
        let mut cmd = format!(
            "tether-chaos simulate --seed {seed} --sim-secs {} --nodes {} --clients {}",
            self.sim_secs, self.nodes, self.clients
        );
        if let Some(p) = &self.planted {
            cmd.push_str(&format!(" --planted {p}"));
        }
        if self.no_faults {
            cmd.push_str(" --no-faults");
        }
        cmd.push_str(" --log");
        cmd
    }

    fn config(&self, seed: u64) -> SimConfig {
        SimConfig {
            nodes: self.nodes.max(1),
            clients: self.clients.clamp(1, crate::workload::MAX_CLIENTS as u32),
            faults: !self.no_faults,
            ..SimConfig::new(seed, self.sim_secs)
        }
    }
}

/// Makes the planted bug active for every node of this process (before any node runs).
fn plant(name: &str) -> Result<(), String> {
    #[cfg(feature = "planted")]
    {
        // Read once, by the first node's first use; no node has run yet.
        std::env::set_var(tether_node::planted::ENV, name);
        Ok(())
    }
    #[cfg(not(feature = "planted"))]
    Err(format!(
        "--planted {name}: this tether-chaos was built without planted bugs; build it \
         with `cargo build -p tether-chaos-tests --features planted`"
    ))
}

fn failure_line(run: &SeedRun) -> String {
    if let Some(e) = &run.sim_error {
        return format!("the simulation stopped: {e}");
    }
    let failed: Vec<String> = run
        .verdict
        .properties
        .iter()
        .into_iter()
        .filter(|(_, n)| *n > 0)
        .map(|(name, n)| format!("{name} {n}"))
        .collect();
    let mut line = failed.join(", ");
    if run.verdict.malformed_count > 0 {
        line.push_str(&format!(
            " malformed history {}",
            run.verdict.malformed_count
        ));
    }
    if let Some(ex) = run.verdict.examples.first() {
        line.push_str(&format!(" — e.g. {}: {}", ex.property, ex.detail));
    }
    line
}

/// Stamps log lines with the simulation's virtual time.
struct VirtualTime;

impl tracing_subscriber::fmt::time::FormatTime for VirtualTime {
    fn format_time(&self, w: &mut tracing_subscriber::fmt::format::Writer<'_>) -> std::fmt::Result {
        let t = turmoil::sim_elapsed().unwrap_or_default();
        write!(w, "{:>9.3}s", t.as_secs_f64())
    }
}

/// Keeps one known, harmless panic out of the output: an actor dropped with its crashed
/// host is polled once more by actix's `Drop`, which re-arms an interval on the host's
/// runtime as it shuts down; Tokio catches that panic and the drop completes.
fn quiet_crash_panics() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let msg = info
            .payload()
            .downcast_ref::<&str>()
            .copied()
            .or_else(|| info.payload().downcast_ref::<String>().map(String::as_str))
            .unwrap_or("");
        if !msg.contains("context was found, but it is being shutdown") {
            default(info);
        }
    }));
}

fn install_log() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_timer(VirtualTime)
        .with_ansi(false)
        .with_writer(std::io::stderr)
        .try_init();
}

/// What a child process reports of its seed (its last line of output, JSON).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Summary {
    pub seed: u64,
    pub passed: bool,
    pub hash: u64,
    pub simulated_ms: u64,
    pub wall_ms: u64,
    pub coverage: super::Coverage,
    /// Why it failed (empty when it passed).
    pub failure: String,
    /// Where its history was written, if it was.
    pub history: Option<PathBuf>,
}

/// The child's part: one seed in this process, its summary printed last.
fn run_child(args: &SimulateArgs) -> u8 {
    let Some(seed) = args.seed else {
        eprintln!("tether-chaos simulate --child needs --seed");
        return EXIT_ERROR;
    };
    let run = match super::run_seed(&args.config(seed)) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("tether-chaos simulate: seed {seed}: {e}");
            return EXIT_ERROR;
        }
    };
    let name = match &args.keep_history {
        Some(n) => Some(n.clone()),
        None => (!run.passed()).then(|| "history.jsonl".to_string()),
    };
    let mut history = None;
    if let Some(name) = name {
        let dir = args.out.join(format!("seed-{seed}"));
        let path = dir.join(name);
        let written = std::fs::create_dir_all(&dir).and_then(|()| {
            let mut f = std::io::BufWriter::new(std::fs::File::create(&path)?);
            for e in &run.entries {
                serde_json::to_writer(&mut f, e)?;
                f.write_all(b"\n")?;
            }
            f.flush()
        });
        match written {
            Ok(()) => history = Some(path),
            Err(e) => {
                eprintln!("tether-chaos simulate: writing {}: {e}", path.display());
                return EXIT_ERROR;
            }
        }
    }
    let summary = Summary {
        seed,
        passed: run.passed(),
        hash: run.hash,
        simulated_ms: u64::try_from(run.simulated.as_millis()).unwrap_or(u64::MAX),
        wall_ms: u64::try_from(run.wall.as_millis()).unwrap_or(u64::MAX),
        coverage: run.coverage,
        failure: if run.passed() {
            String::new()
        } else {
            failure_line(&run)
        },
        history,
    };
    println!("{}", serde_json::to_string(&summary).unwrap_or_default());
    EXIT_PASS
}

/// Runs seed `seed` in a child process (`keep`: the name to keep its history under).
fn spawn_child(args: &SimulateArgs, seed: u64, keep: Option<&str>) -> Result<Summary, String> {
    let exe = std::env::current_exe().map_err(|e| format!("finding this program: {e}"))?;
    let mut cmd = std::process::Command::new(exe);
    cmd.args(["simulate", "--child", "--seed", &seed.to_string()])
        .args(["--sim-secs", &args.sim_secs.to_string()])
        .args(["--nodes", &args.nodes.to_string()])
        .args(["--clients", &args.clients.to_string()])
        .arg("--out")
        .arg(&args.out)
        .stderr(std::process::Stdio::inherit());
    if let Some(p) = &args.planted {
        cmd.args(["--planted", p]);
    }
    if args.no_faults {
        cmd.arg("--no-faults");
    }
    if args.log {
        cmd.arg("--log");
    }
    if let Some(k) = keep {
        cmd.args(["--keep-history", k]);
    }
    let out = cmd
        .output()
        .map_err(|e| format!("seed {seed}: starting its process: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let last = text.lines().last().unwrap_or("");
    serde_json::from_str(last).map_err(|_| {
        format!(
            "seed {seed}: its process ended with {} and no summary (last line: {last:?})",
            out.status
        )
    })
}

/// Runs the seeds, each in a process of its own (a seed's run depends on nothing but the
/// seed, not on what ran before it in a process); the exit code.
pub fn simulate(args: &SimulateArgs) -> u8 {
    quiet_crash_panics();
    if args.log {
        install_log();
    }
    if let Some(p) = &args.planted {
        if let Err(e) = plant(p) {
            eprintln!("tether-chaos simulate: {e}");
            return EXIT_ERROR;
        }
    }
    if args.child {
        return run_child(args);
    }
    let seeds: Vec<u64> = match args.seed {
        Some(s) => vec![s],
        None => (args.first_seed..args.first_seed.saturating_add(args.seeds)).collect(),
    };
    let threads = args
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let twice: Vec<u64> = if args.check_determinism_every == 0 {
        Vec::new()
    } else {
        seeds
            .iter()
            .copied()
            .filter(|s| s % args.check_determinism_every == 0)
            .collect()
    };
    // (seed, the history to keep: both runs of a seed run twice, compared afterwards)
    let mut jobs: Vec<(u64, Option<&str>)> = seeds
        .iter()
        .map(|s| (*s, twice.contains(s).then_some("run-1.jsonl")))
        .collect();
    jobs.extend(twice.iter().map(|s| (*s, Some("run-2.jsonl"))));
    println!(
        "simulating {} seeds ({} run twice) × {} s, {} nodes, {} clients{}{}, {threads} at once",
        seeds.len(),
        twice.len(),
        args.sim_secs,
        args.nodes,
        args.clients,
        args.planted
            .as_deref()
            .map(|p| format!(", planted {p}"))
            .unwrap_or_default(),
        if args.no_faults { ", no faults" } else { "" },
    );
    let started = Instant::now();
    let stop = std::sync::atomic::AtomicBool::new(false);
    let queue = std::sync::Mutex::new(jobs.into_iter().rev().collect::<Vec<_>>());
    let results = std::sync::Mutex::new(Vec::<Result<Summary, String>>::new());
    std::thread::scope(|sc| {
        for _ in 0..threads.max(1) {
            sc.spawn(|| loop {
                if stop.load(std::sync::atomic::Ordering::Acquire) {
                    return;
                }
                let next = queue.lock().unwrap_or_else(|e| e.into_inner()).pop();
                let Some((seed, keep)) = next else { return };
                let r = spawn_child(args, seed, keep);
                if let Ok(sum) = &r {
                    if !sum.passed {
                        println!("  seed {seed}: FAIL {}", sum.failure);
                        if args.stop_on_failure {
                            stop.store(true, std::sync::atomic::Ordering::Release);
                        }
                    }
                }
                results.lock().unwrap_or_else(|e| e.into_inner()).push(r);
            });
        }
    });
    let wall = started.elapsed();
    let results = results.into_inner().unwrap_or_else(|e| e.into_inner());
    let mut failed: Vec<&Summary> = Vec::new();
    let mut errors = Vec::new();
    let mut simulated = Duration::ZERO;
    let mut runs: std::collections::BTreeMap<u64, Vec<&Summary>> = Default::default();
    let mut coverage = super::Coverage::default();
    for r in &results {
        match r {
            Ok(sum) => {
                simulated += Duration::from_millis(sum.simulated_ms);
                runs.entry(sum.seed).or_default().push(sum);
                coverage.add(&sum.coverage);
                if !sum.passed && !failed.iter().any(|f| f.seed == sum.seed) {
                    failed.push(sum);
                }
            }
            Err(e) => errors.push(e.clone()),
        }
    }
    failed.sort_by_key(|f| f.seed);
    let mut nondeterministic = Vec::new();
    for (seed, rs) in &runs {
        if rs.windows(2).any(|w| w[0].hash != w[1].hash) {
            nondeterministic.push(*seed);
        } else if rs.len() > 1 {
            // Equal: their histories are not needed.
            for r in rs {
                if let Some(h) = r.history.as_ref().filter(|_| r.passed) {
                    let _ = std::fs::remove_file(h);
                }
            }
        }
    }
    let hours = simulated.as_secs_f64() / 3600.0;
    println!(
        "ran {} seed runs: {:.2} simulated cluster-hours in {:.1} s wall ({:.0} s wall per simulated cluster-hour)",
        results.iter().filter(|r| r.is_ok()).count(),
        hours,
        wall.as_secs_f64(),
        if hours > 0.0 { wall.as_secs_f64() / hours } else { 0.0 },
    );
    println!(
        "coverage: {}",
        serde_json::to_string(&coverage).unwrap_or_default()
    );
    for f in &failed {
        println!(
            "FAILED seed {}: {}\n  replay: {}\n  history: {}",
            f.seed,
            f.failure,
            args.replay(f.seed),
            f.history
                .as_ref()
                .map_or_else(|| "(not written)".into(), |h| h.display().to_string())
        );
    }
    for s in &nondeterministic {
        println!(
            "{} seed {s}: two runs gave different histories ({})\n  replay: {}",
            if args.nondeterminism_warns {
                "WARNING: NONDETERMINISTIC"
            } else {
                "NONDETERMINISTIC"
            },
            args.out.join(format!("seed-{s}")).display(),
            args.replay(*s)
        );
    }
    for e in &errors {
        println!("ERROR {e}");
    }
    if !twice.is_empty() {
        println!(
            "determinism: {} of {} seeds run twice gave the same history",
            twice.len() - nondeterministic.len(),
            twice.len()
        );
    }
    if !errors.is_empty() {
        EXIT_ERROR
    } else if !failed.is_empty() || (!nondeterministic.is_empty() && !args.nondeterminism_warns) {
        EXIT_FAIL
    } else {
        EXIT_PASS
    }
}
