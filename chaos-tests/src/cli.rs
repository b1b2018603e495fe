//! The `tether-chaos` command line. `main` only parses and calls [`run`], so every command
//! is a library function a test can call.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::checker::{check, CheckOptions, Verdict};
use crate::error::ChaosError;
use crate::report::{self, RunMeta};

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
    /// Re-check a recorded history: prints the verdict, exits 0 only if every safety
    /// property holds (1 if one does not, 2 if the history cannot be read).
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
}

/// Runs a parsed command line; the process exit code.
pub fn run(cli: Cli) -> ExitCode {
    match cli.command {
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

/// Reads and checks a history, and writes its report into `out` if given.
pub fn check_file(
    history: &Path,
    out: Option<&Path>,
    opts: &CheckOptions,
) -> Result<Verdict, ChaosError> {
    let entries = crate::history::read(history).map_err(ChaosError::History)?;
    let verdict = check(&entries, opts);
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
