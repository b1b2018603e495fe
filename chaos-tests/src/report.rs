//! The report of a chaos run, written next to its `history.jsonl`:
//!
//! - `results.json` — the machine-readable verdict: `scenario`, `seed`, `verdict`
//!   (`pass`/`fail`: every safety property zero), `properties` (every counter),
//!   `availability`, `availability_unaffected`, `failover_s`, `convergence_s`, `liveness`
//!   (`pass`/`fail` against the thresholds), `staleness`, `ops`, `faults`, `examples`, and
//!   the run's `tier`, `nodes`, `devices`, `started`, `command_line`, `notes`; and `fleet`
//!   (`null` without one): the `tether-sim` fleet's devices, `updates_acked`,
//!   `deliveries`, `delivery_p50_ms`/`delivery_p99_ms`, `violations` by kind
//!   ([`crate::fleet::FleetSummary`]).
//! - `report.md` — for a person: the verdict first, the properties, examples naming op
//!   numbers, the fault schedule, the liveness figures, the notes (capability fallbacks),
//!   how to reproduce, the timeline.
//! - `timeline.png` — per second: requests, errors and p99 latency; faults shaded;
//!   ownership moves as vertical lines.
//! - `repro.sh` — the command that replays the run's schedule and seed (executable).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io;
use std::path::Path;
use std::sync::OnceLock;

use plotters::coord::types::RangedCoordf64;
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::FontStyle;
use serde::{Deserialize, Serialize};

use crate::checker::{fault_windows, succeeded, Verdict, Window};
use crate::history::{Entry, Outcome};

/// What the report says about the run besides the history.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RunMeta {
    pub scenario: String,
    pub seed: u64,
    /// The command that ran it (`tether-chaos run … --seed N …`); `repro.sh` runs it.
    pub command_line: Vec<String>,
    /// `smoke`, `standard`, `soak` (or `re-check` for `tether-chaos check`).
    pub tier: String,
    pub nodes: usize,
    pub devices: usize,
    /// When it started (ISO 8601, UTC).
    pub started: String,
    /// What the reader must know: capability fallbacks, environment caveats.
    pub notes: Vec<String>,
}

impl RunMeta {
    /// What a recorded history says about its run (for `tether-chaos check`).
    pub fn from_history(entries: &[Entry]) -> Self {
        let mut meta = RunMeta {
            tier: "re-check".into(),
            ..RunMeta::default()
        };
        for e in entries {
            if let Entry::Start {
                scenario,
                seed,
                wall_ms,
            } = e
            {
                meta.scenario = scenario.clone();
                meta.seed = *seed;
                meta.started = iso8601(*wall_ms);
            }
        }
        meta.command_line = vec![
            "tether-chaos".into(),
            "run".into(),
            meta.scenario.clone(),
            "--seed".into(),
            meta.seed.to_string(),
        ];
        meta
    }
}

/// `ms` since the Unix epoch as `YYYY-MM-DDThh:mm:ss.mmmZ`.
pub fn iso8601(ms: u64) -> String {
    let days = (ms / 86_400_000) as i64;
    let rem = ms % 86_400_000;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3_600_000,
        rem / 60_000 % 60,
        rem / 1000 % 60,
        rem % 1000
    )
}

/// Writes `results.json`, `report.md`, `timeline.png` and `repro.sh` into `dir`.
pub fn write(dir: &Path, entries: &[Entry], verdict: &Verdict, meta: &RunMeta) -> io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let faults = fault_windows(entries, end_of(entries));
    let results = results_json(verdict, meta, &faults);
    std::fs::write(
        dir.join("results.json"),
        serde_json::to_string_pretty(&results).map_err(io::Error::other)?,
    )?;
    std::fs::write(dir.join("report.md"), markdown(verdict, meta, &faults))?;
    let repro = dir.join("repro.sh");
    std::fs::write(&repro, repro_script(meta))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&repro, std::fs::Permissions::from_mode(0o755))?;
    }
    timeline(&dir.join("timeline.png"), entries, &faults, meta)
}

fn end_of(entries: &[Entry]) -> u64 {
    entries
        .iter()
        .find_map(|e| match e {
            Entry::End { t_us } => Some(*t_us),
            _ => None,
        })
        .unwrap_or_else(|| entries.iter().map(t_of).max().unwrap_or(0))
}

fn t_of(e: &Entry) -> u64 {
    match e {
        Entry::Start { .. } => 0,
        Entry::Invoke { t_us, .. }
        | Entry::Complete { t_us, .. }
        | Entry::Fault { t_us, .. }
        | Entry::Owner { t_us, .. }
        | Entry::End { t_us } => *t_us,
    }
}

fn pass_fail(ok: bool) -> &'static str {
    if ok {
        "pass"
    } else {
        "fail"
    }
}

/// The content of `results.json`.
pub fn results_json(verdict: &Verdict, meta: &RunMeta, faults: &[Window]) -> serde_json::Value {
    let properties: serde_json::Map<String, serde_json::Value> = verdict
        .properties
        .iter()
        .iter()
        .map(|(k, v)| ((*k).to_string(), serde_json::json!(v)))
        .collect();
    serde_json::json!({
        "scenario": meta.scenario,
        "seed": meta.seed,
        "verdict": pass_fail(verdict.passed),
        "properties": properties,
        "availability": verdict.availability,
        "availability_unaffected": verdict.availability_unaffected,
        "failover_s": verdict.failover_s,
        "convergence_s": verdict.convergence_s,
        "liveness": pass_fail(verdict.liveness_passed),
        "liveness_goals": verdict.goals,
        "staleness": verdict.staleness,
        "ops": verdict.ops,
        "faults": faults.iter().map(|w| serde_json::json!({
            "kind": w.kind,
            "target": w.target,
            "start_s": w.start as f64 / 1e6,
            "end_s": w.end as f64 / 1e6,
            "detail": w.detail,
        })).collect::<Vec<_>>(),
        "examples": verdict.examples,
        "malformed": verdict.malformed,
        "malformed_count": verdict.malformed_count,
        "excused_subscribers": verdict.excused_subscribers,
        "fleet": verdict.fleet,
        "tier": meta.tier,
        "nodes": meta.nodes,
        "devices": meta.devices,
        "started": meta.started,
        "command_line": meta.command_line,
        "notes": meta.notes,
    })
}

/// The fleet's section of `report.md`.
fn fleet_section(md: &mut String, f: &crate::fleet::FleetSummary) {
    let _ = writeln!(
        md,
        "\n## Fleet (tether-sim)\n\n**{}** — {} devices through the load balancer ({} registered, \
         {} connected, {} paired with apps; {} sleep cycles, {} connections dropped, {} PUT answers \
         lost on purpose). A change must reach each awake device {} ms after it was acknowledged; \
         a fault that began before then suspends that deadline until {} ms after it healed.\n",
        if f.passed {
            "no violation"
        } else {
            "VIOLATIONS (fail the verdict)"
        },
        f.devices,
        f.registered,
        f.connected,
        f.paired,
        f.sleeps,
        f.dropped_connections,
        f.answers_dropped,
        f.notify_deadline_ms,
        f.fault_recovery_ms,
    );
    let _ = writeln!(md, "| figure | value |\n|---|---:|");
    let _ = writeln!(
        md,
        "| updates acknowledged (devices + companions/apps) | {} ({} + {}) |",
        f.updates_acked, f.device_updates, f.writer_updates
    );
    let _ = writeln!(
        md,
        "| deliveries (live, to devices awake throughout) | {} ({}) |",
        f.deliveries, f.live_deliveries
    );
    let _ = writeln!(
        md,
        "| delivery latency p50 / p99 / max | {:.1} / {:.1} / {:.1} ms |",
        f.delivery_p50_ms, f.delivery_p99_ms, f.delivery_max_ms
    );
    let _ = writeln!(
        md,
        "| devices audited (final state and histories) | {} of {} ({} acknowledged writes found by op id) |",
        f.audited.map_or("-".into(), |n| n.to_string()),
        f.devices,
        f.ops_checked
    );
    for (k, n) in &f.violations {
        let _ = writeln!(md, "| {k} | {n}{} |", if *n > 0 { " ✗" } else { "" });
    }
    if !f.examples.is_empty() {
        let _ = writeln!(md, "\nFirst violations:\n");
        for e in &f.examples {
            let _ = writeln!(md, "- {e}");
        }
    }
    let errors: u64 = f.errors.values().sum();
    if errors > 0 {
        let top: Vec<String> = f.errors.iter().map(|(k, n)| format!("{k} {n}")).collect();
        let _ = writeln!(
            md,
            "\nErrors the fleet met ({errors}; expected under faults, never a verdict): {}.",
            top.join(", ")
        );
    }
}

fn pct(v: Option<f64>) -> String {
    v.map_or("n/a".into(), |a| format!("{:.3} %", a * 100.0))
}

fn secs(v: Option<f64>) -> String {
    v.map_or("n/a".into(), |s| format!("{s:.2} s"))
}

/// The content of `report.md`.
pub fn markdown(verdict: &Verdict, meta: &RunMeta, faults: &[Window]) -> String {
    let mut md = String::new();
    let word = if verdict.passed { "PASS" } else { "FAIL" };
    let _ = writeln!(md, "# tether-chaos `{}`: {word}\n", meta.scenario);
    let mut failing: Vec<String> = verdict
        .properties
        .iter()
        .iter()
        .filter(|(_, n)| *n > 0)
        .map(|(k, n)| format!("{k} = {n}"))
        .collect();
    if let Some(f) = &verdict.fleet {
        failing.extend(
            f.violations
                .iter()
                .filter(|(_, n)| **n > 0)
                .map(|(k, n)| format!("fleet {k} = {n}")),
        );
    }
    if verdict.passed {
        let _ = writeln!(md, "**Verdict: PASS** — every safety property holds.");
    } else if failing.is_empty() {
        let _ = writeln!(
            md,
            "**Verdict: FAIL** — the history is malformed ({} problems): {}.",
            verdict.malformed_count,
            verdict.malformed.join("; ")
        );
    } else {
        let _ = writeln!(
            md,
            "**Verdict: FAIL** — {}. Examples below name the `op` numbers to look up in `history.jsonl`.",
            failing.join(", ")
        );
    }
    let _ = writeln!(
        md,
        "Liveness: **{}** against the thresholds (does not change the verdict).\n",
        if verdict.liveness_passed {
            "within"
        } else {
            "NOT within"
        }
    );
    let _ = writeln!(
        md,
        "seed `{}` · tier {} · {} nodes · {} devices · started {} · {} operations\n",
        meta.seed,
        if meta.tier.is_empty() {
            "-"
        } else {
            &meta.tier
        },
        meta.nodes,
        meta.devices,
        if meta.started.is_empty() {
            "-"
        } else {
            &meta.started
        },
        verdict.ops.total
    );
    let _ = writeln!(
        md,
        "## Safety properties\n\n| property | count |\n|---|---:|"
    );
    for (k, n) in verdict.properties.iter() {
        let _ = writeln!(md, "| {k} | {n}{} |", if n > 0 { " ✗" } else { "" });
    }
    if verdict.excused_subscribers > 0 {
        let _ = writeln!(
            md,
            "\n{} subscribe(s) were answered late only because the node holding them was \
             paused (SIGSTOP) past their deadline, and answered within their timeout after it \
             woke: not counted as hung.",
            verdict.excused_subscribers
        );
    }
    if verdict.properties.stale_reads > 0 {
        let _ = writeln!(
            md,
            "\nStale reads were at most {} versions and {:.0} ms behind.",
            verdict.staleness.max_versions, verdict.staleness.max_ms
        );
    }
    if !verdict.examples.is_empty() {
        let _ = writeln!(md, "\n## Examples\n");
        let mut by: BTreeMap<&str, Vec<_>> = BTreeMap::new();
        for e in &verdict.examples {
            by.entry(e.property.as_str()).or_default().push(e);
        }
        for (property, list) in by {
            let _ = writeln!(md, "### {property}\n");
            for e in list {
                let ops: Vec<String> = e.ops.iter().map(|o| format!("`op {o}`")).collect();
                let _ = writeln!(
                    md,
                    "- `{}`{} ({}): {}",
                    e.bucket,
                    e.version.map_or(String::new(), |v| format!(" v{v}")),
                    ops.join(", "),
                    e.detail
                );
            }
            md.push('\n');
        }
    }
    if let Some(f) = &verdict.fleet {
        fleet_section(&mut md, f);
    }
    let _ = writeln!(md, "\n## Fault schedule\n");
    if faults.is_empty() {
        let _ = writeln!(md, "No faults (steady state).");
    } else {
        let _ = writeln!(
            md,
            "| start (s) | end (s) | kind | target | detail |\n|---:|---:|---|---|---|"
        );
        for w in faults {
            let _ = writeln!(
                md,
                "| {:.1} | {:.1} | {} | {} | {} |",
                w.start as f64 / 1e6,
                w.end as f64 / 1e6,
                w.kind,
                w.target,
                w.detail
            );
        }
    }
    let g = &verdict.goals;
    let goal = |v: Option<String>| v.unwrap_or_else(|| "none".into());
    let _ = writeln!(
        md,
        "\n## Liveness\n\n| figure | value | goal |\n|---|---:|---:|"
    );
    let _ = writeln!(
        md,
        "| availability (in fault windows; whole run without faults) | {} | {} |",
        pct(verdict.availability),
        goal(g.min_availability.map(|v| format!("≥ {}", pct(Some(v)))))
    );
    let _ = writeln!(
        md,
        "| availability, sets the faulted node did not own | {} | {} |",
        pct(verdict.availability_unaffected),
        goal(
            g.min_availability_unaffected
                .map(|v| format!("≥ {}", pct(Some(v))))
        )
    );
    let _ = writeln!(
        md,
        "| failover (longest write gap on a faulted owner's sets) | {} | {} |",
        secs(verdict.failover_s),
        goal(g.max_failover_s.map(|v| format!("≤ {}", secs(Some(v)))))
    );
    let _ = writeln!(
        md,
        "| convergence (after the last fault, until reads are current) | {} | {} |",
        secs(verdict.convergence_s),
        goal(g.max_convergence_s.map(|v| format!("≤ {}", secs(Some(v)))))
    );
    let o = &verdict.ops;
    let _ = writeln!(
        md,
        "\n## Operations\n\n{} in all: writes {} acknowledged, {} refused, {} of unknown fate; {} reads; {} subscribes; {} never answered.",
        o.total, o.writes_ok, o.writes_refused, o.writes_unknown, o.reads, o.subscribes, o.incomplete
    );
    if !meta.notes.is_empty() {
        let _ = writeln!(md, "\n## Notes\n");
        for n in &meta.notes {
            let _ = writeln!(md, "- {n}");
        }
    }
    let _ = writeln!(
        md,
        "\n## Reproduce\n\n`./repro.sh` runs:\n\n```sh\n{}\n```\n\nRe-check this history: `tether-chaos check history.jsonl`.\n\n![timeline](timeline.png)",
        shell_line(&repro_command(meta))
    );
    md
}

/// The command `repro.sh` runs: the run's command line, with its seed.
fn repro_command(meta: &RunMeta) -> Vec<String> {
    let mut cmd = if meta.command_line.is_empty() {
        vec!["tether-chaos".into(), "run".into(), meta.scenario.clone()]
    } else {
        meta.command_line.clone()
    };
    if !cmd
        .iter()
        .any(|a| a == "--seed" || a.starts_with("--seed="))
    {
        cmd.push("--seed".into());
        cmd.push(meta.seed.to_string());
    }
    cmd
}

fn shell_quote(arg: &str) -> String {
    let safe = !arg.is_empty()
        && arg
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,+@%".contains(&b));
    if safe {
        arg.to_string()
    } else {
        format!("'{}'", arg.replace('\'', r"'\''"))
    }
}

fn shell_line(args: &[String]) -> String {
    args.iter()
        .map(|a| shell_quote(a))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The content of `repro.sh`.
pub fn repro_script(meta: &RunMeta) -> String {
    format!(
        "#!/bin/sh\n# Replays chaos scenario {} with seed {} (the fault schedule and every client's\n# operations; not the exact interleaving). Recorded run started {}.\nset -e\nexec {} \"$@\"\n",
        meta.scenario,
        meta.seed,
        if meta.started.is_empty() {
            "-"
        } else {
            &meta.started
        },
        shell_line(&repro_command(meta))
    )
}

const FONT_CANDIDATES: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/truetype/freefont/FreeSans.ttf",
];

/// Registers a system TrueType font as `sans-serif` (plotters draws no text without one).
fn ensure_font() -> io::Result<()> {
    static FONT: OnceLock<Result<(), String>> = OnceLock::new();
    FONT.get_or_init(|| {
        let bytes = FONT_CANDIDATES
            .iter()
            .find_map(|p| std::fs::read(p).ok())
            .ok_or_else(|| {
                "no TrueType font for timeline.png (apt-get install fonts-dejavu-core)".to_string()
            })?;
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
            .map_err(|_| "the font file is not a valid TrueType font".to_string())
    })
    .clone()
    .map_err(io::Error::other)
}

/// Per-second figures of the run.
#[derive(Debug, Default, Clone)]
struct Second {
    requests: u64,
    errors: u64,
    latencies_ms: Vec<f64>,
}

fn per_second(entries: &[Entry], end: u64) -> Vec<Second> {
    let mut invoked: BTreeMap<u64, u64> = BTreeMap::new();
    let mut done: BTreeMap<u64, (u64, &Outcome)> = BTreeMap::new();
    for e in entries {
        match e {
            Entry::Invoke { op, t_us, .. } => {
                invoked.insert(*op, *t_us);
            }
            Entry::Complete { op, t_us, result } => {
                done.insert(*op, (*t_us, result));
            }
            _ => {}
        }
    }
    let mut secs = vec![Second::default(); (end / 1_000_000) as usize + 1];
    for (op, start) in &invoked {
        let (at, result) = match done.get(op) {
            Some((t, r)) => (*t, Some(*r)),
            None => (end, None),
        };
        let i = ((at / 1_000_000) as usize).min(secs.len() - 1);
        let s = &mut secs[i];
        s.requests += 1;
        if !succeeded(result) {
            s.errors += 1;
        }
        if result.is_some() {
            s.latencies_ms
                .push(at.saturating_sub(*start) as f64 / 1000.0);
        }
    }
    secs
}

fn p99(v: &mut [f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let i = ((v.len() as f64 * 0.99).ceil() as usize).clamp(1, v.len()) - 1;
    Some(v[i])
}

fn plot_err<E: std::fmt::Display>(e: E) -> io::Error {
    io::Error::other(format!("timeline.png: {e}"))
}

/// The colours of the timeline's faults and ownership moves.
const FAULT_FILL: RGBAColor = RGBAColor(240, 120, 120, 0.22);
const MOVE_COLOR: RGBColor = RGBColor(120, 80, 200);

/// One of the timeline's panels over seconds `0..x_max` and `0..y_top`: its mesh, the
/// faults shaded and the ownership moves as vertical lines.
fn panel<'a, 'b>(
    area: &'a DrawingArea<BitMapBackend<'b>, Shift>,
    x_max: f64,
    y_top: f64,
    y_desc: &str,
    faults: &[Window],
    moves: &[(f64, String)],
) -> io::Result<ChartContext<'a, BitMapBackend<'b>, Cartesian2d<RangedCoordf64, RangedCoordf64>>> {
    let mut chart = ChartBuilder::on(area)
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..x_max, 0f64..y_top)
        .map_err(plot_err)?;
    chart
        .configure_mesh()
        .y_desc(y_desc)
        .x_desc("s since start")
        .label_style(("sans-serif", 13))
        .draw()
        .map_err(plot_err)?;
    chart
        .draw_series(faults.iter().map(|w| {
            Rectangle::new(
                [(w.start as f64 / 1e6, 0.0), (w.end as f64 / 1e6, y_top)],
                FAULT_FILL.filled(),
            )
        }))
        .map_err(plot_err)?;
    chart
        .draw_series(moves.iter().map(|(t, _)| {
            PathElement::new(vec![(*t, 0.0), (*t, y_top)], MOVE_COLOR.stroke_width(1))
        }))
        .map_err(plot_err)?;
    Ok(chart)
}

/// Draws `timeline.png`: requests and errors per second above, p99 latency below; faults
/// shaded, ownership moves as vertical lines.
fn timeline(path: &Path, entries: &[Entry], faults: &[Window], meta: &RunMeta) -> io::Result<()> {
    ensure_font()?;
    let end = end_of(entries);
    let mut secs = per_second(entries, end);
    let x_max = (secs.len() as f64).max(1.0);
    let moves: Vec<(f64, String)> = entries
        .iter()
        .filter_map(|e| match e {
            Entry::Owner { t_us, set, node } => Some((*t_us as f64 / 1e6, format!("{set}→{node}"))),
            _ => None,
        })
        .collect();
    let p99s: Vec<Option<f64>> = secs.iter_mut().map(|s| p99(&mut s.latencies_ms)).collect();
    let top_req = secs.iter().map(|s| s.requests).max().unwrap_or(0).max(1) as f64 * 1.15;
    let top_lat = p99s.iter().flatten().copied().fold(0.0, f64::max).max(1.0) * 1.15;

    let root = BitMapBackend::new(path, (1200, 720)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    let root = root
        .titled(
            &format!(
                "tether-chaos {} (seed {}): requests, errors, p99 per second",
                meta.scenario, meta.seed
            ),
            ("sans-serif", 20),
        )
        .map_err(plot_err)?;
    let (upper, lower) = root.split_vertically(360);
    let (fault_fill, move_color) = (FAULT_FILL, MOVE_COLOR);

    let mut chart = panel(&upper, x_max, top_req, "operations / s", faults, &moves)?;
    chart
        .draw_series(LineSeries::new(
            secs.iter()
                .enumerate()
                .map(|(i, s)| (i as f64 + 0.5, s.requests as f64)),
            BLUE.stroke_width(2),
        ))
        .map_err(plot_err)?
        .label("requests/s")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], BLUE.stroke_width(2)));
    chart
        .draw_series(LineSeries::new(
            secs.iter()
                .enumerate()
                .map(|(i, s)| (i as f64 + 0.5, s.errors as f64)),
            RED.stroke_width(2),
        ))
        .map_err(plot_err)?
        .label("errors/s (5xx, unknown, unanswered)")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], RED.stroke_width(2)));
    chart
        .draw_series(std::iter::once(PathElement::new(
            vec![(0.0, 0.0), (0.0, 0.0)],
            move_color.stroke_width(1),
        )))
        .map_err(plot_err)?
        .label("ownership move")
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], move_color));
    chart
        .draw_series(std::iter::once(Rectangle::new(
            [(0.0, 0.0), (0.0, 0.0)],
            fault_fill.filled(),
        )))
        .map_err(plot_err)?
        .label("fault")
        .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 16, y + 5)], fault_fill.filled()));
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .label_font(("sans-serif", 13))
        .draw()
        .map_err(plot_err)?;

    let mut chart = panel(&lower, x_max, top_lat, "p99 latency (ms)", faults, &moves)?;
    chart
        .draw_series(
            p99s.iter().enumerate().filter_map(|(i, p)| {
                p.map(|p| Circle::new((i as f64 + 0.5, p), 3, BLACK.filled()))
            }),
        )
        .map_err(plot_err)?;
    root.present().map_err(plot_err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checker::{check, CheckOptions};
    use crate::history::{Call, FaultPhase, Fields, Observed};

    /// A small run: two clients writing and reading one bucket for 4 s, node-1 (its
    /// owner) killed from 1 s to 2.5 s, the set moving to node-2 at 2 s; one lost write.
    fn history() -> Vec<Entry> {
        let mut e = vec![Entry::Start {
            scenario: "kill-owner".into(),
            seed: 42,
            wall_ms: 1_764_547_200_000, // 2025-12-01T00:00:00Z
        }];
        e.push(Entry::Owner {
            t_us: 0,
            set: "s1".into(),
            node: "node-1".into(),
        });
        let mut op = 0;
        let mut version = 1;
        for i in 0..40u64 {
            let t = i * 100_000;
            op += 1;
            let mut fields = Fields::new();
            fields.insert("w".into(), serde_json::json!(i));
            e.push(Entry::Invoke {
                op,
                client: (i % 2) as u32,
                t_us: t,
                call: Call::Write {
                    bucket: "hot.s1".into(),
                    fields,
                    base_version: version,
                    occ: false,
                    op_id: None,
                    via: "lb".into(),
                },
            });
            let in_fault = (1_000_000..2_000_000).contains(&t);
            let result = if in_fault {
                Outcome::Unknown {
                    detail: "timeout".into(),
                }
            } else {
                version += 1;
                Outcome::Ok {
                    outcome: Some("applied".into()),
                    states: vec![Observed {
                        bucket: "hot.s1".into(),
                        version,
                        timestamp: 1000 + t / 1000,
                        fields: None,
                    }],
                    replayed: false,
                }
            };
            e.push(Entry::Complete {
                op,
                t_us: t + 20_000 + i * 500,
                result,
            });
        }
        e.push(Entry::Fault {
            t_us: 1_000_000,
            kind: "kill".into(),
            target: "node-1".into(),
            phase: FaultPhase::Start,
            detail: "SIGKILL".into(),
        });
        e.push(Entry::Owner {
            t_us: 2_000_000,
            set: "s1".into(),
            node: "node-2".into(),
        });
        e.push(Entry::Fault {
            t_us: 2_500_000,
            kind: "kill".into(),
            target: "node-1".into(),
            phase: FaultPhase::End,
            detail: String::new(),
        });
        e.push(Entry::End { t_us: 4_000_000 });
        // The final read misses the last write's field value (lost write).
        op += 1;
        e.push(Entry::Invoke {
            op,
            client: 0,
            t_us: 4_100_000,
            call: Call::Read {
                buckets: vec!["hot.s1".into()],
                via: "lb".into(),
            },
        });
        let mut fields = Fields::new();
        fields.insert("w".into(), serde_json::json!(38));
        e.push(Entry::Complete {
            op,
            t_us: 4_120_000,
            result: Outcome::Ok {
                outcome: None,
                states: vec![Observed {
                    bucket: "hot.s1".into(),
                    version,
                    timestamp: 1000 + 3_900,
                    fields: Some(fields),
                }],
                replayed: false,
            },
        });
        e.sort_by_key(t_of);
        e
    }

    /// Checks a PNG's signature, that every chunk's CRC is right, and returns its size.
    fn png_size(bytes: &[u8]) -> (u32, u32) {
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "PNG signature");
        let crc = |data: &[u8]| {
            let mut c = 0xffff_ffffu32;
            for &b in data {
                c ^= u32::from(b);
                for _ in 0..8 {
                    c = if c & 1 != 0 {
                        0xedb8_8320 ^ (c >> 1)
                    } else {
                        c >> 1
                    };
                }
            }
            !c
        };
        let (mut i, mut size, mut last) = (8, (0, 0), [0u8; 4]);
        while i < bytes.len() {
            let len = u32::from_be_bytes(bytes[i..i + 4].try_into().expect("len")) as usize;
            let kind = &bytes[i + 4..i + 8];
            let data = &bytes[i + 8..i + 8 + len];
            let want =
                u32::from_be_bytes(bytes[i + 8 + len..i + 12 + len].try_into().expect("crc"));
            assert_eq!(
                crc(&bytes[i + 4..i + 8 + len]),
                want,
                "CRC of chunk {kind:?}"
            );
            if kind == b"IHDR" {
                size = (
                    u32::from_be_bytes(data[..4].try_into().expect("w")),
                    u32::from_be_bytes(data[4..8].try_into().expect("h")),
                );
            }
            last.copy_from_slice(kind);
            i += 12 + len;
        }
        assert_eq!(&last, b"IEND", "PNG ends with IEND");
        size
    }

    #[test]
    fn a_run_is_reported_as_json_markdown_png_and_a_repro_script() {
        let entries = history();
        let verdict = check(&entries, &CheckOptions::default());
        assert!(!verdict.passed, "the synthetic run has a lost write");
        let mut meta = RunMeta::from_history(&entries);
        meta.tier = "smoke".into();
        meta.nodes = 3;
        meta.devices = 200;
        meta.command_line = vec![
            "tether-chaos".into(),
            "run".into(),
            "kill-owner".into(),
            "--seed".into(),
            "42".into(),
            "--out".into(),
            "/tmp/a dir".into(),
        ];
        meta.notes = vec!["SIGSTOP used instead of the cgroup freezer".into()];
        let dir = tempfile::tempdir().expect("tempdir");
        write(dir.path(), &entries, &verdict, &meta).expect("report");

        let json: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir.path().join("results.json")).expect("results.json"),
        )
        .expect("results.json parses");
        assert_eq!(json["scenario"], "kill-owner");
        assert_eq!(json["seed"], 42);
        assert_eq!(json["verdict"], "fail");
        assert_eq!(json["properties"]["lost_writes"], 1);
        for k in [
            "lost_writes",
            "version_regressions",
            "forked_versions",
            "garbage_reads",
            "hung_subscribers",
            "stale_reads",
        ] {
            assert!(json["properties"][k].is_u64(), "{k} missing");
        }
        // 16 writes sent in the fault window (1.0–2.5 s): 1.0–1.9 s unknown, 2.0–2.5 s ok.
        let avail = json["availability"].as_f64().expect("availability");
        assert!((avail - 6.0 / 16.0).abs() < 1e-9, "availability {avail}");
        assert!(json["failover_s"].as_f64().is_some());
        assert!(json["convergence_s"].is_number());
        assert_eq!(json["faults"][0]["kind"], "kill");
        assert_eq!(json["started"], "2025-12-01T00:00:00.000Z");

        let md = std::fs::read_to_string(dir.path().join("report.md")).expect("report.md");
        let first = md.lines().next().expect("title");
        assert!(first.contains("FAIL"), "{first}");
        assert!(md.contains("**Verdict: FAIL** — lost_writes = 1"), "{md}");
        assert!(
            md.contains("| 1.0 | 2.5 | kill | node-1 | SIGKILL |"),
            "{md}"
        );
        assert!(md.contains("SIGSTOP used instead"), "{md}");

        let repro = std::fs::read_to_string(dir.path().join("repro.sh")).expect("repro.sh");
        assert!(
            repro.contains("exec tether-chaos run kill-owner --seed 42 --out '/tmp/a dir' \"$@\""),
            "{repro}"
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join("repro.sh"))
                .expect("stat")
                .permissions()
                .mode();
            assert_eq!(mode & 0o111, 0o111, "repro.sh is executable");
        }
        let out = std::process::Command::new("sh")
            .arg("-n")
            .arg(dir.path().join("repro.sh"))
            .output()
            .expect("sh -n");
        assert!(out.status.success(), "repro.sh is valid sh");

        let png = std::fs::read(dir.path().join("timeline.png")).expect("timeline.png");
        assert_eq!(png_size(&png), (1200, 720));
    }

    #[test]
    fn repro_adds_the_seed_when_the_command_line_lacks_it() {
        let meta = RunMeta {
            scenario: "baseline".into(),
            seed: 7,
            ..RunMeta::default()
        };
        assert!(repro_script(&meta).contains("exec tether-chaos run baseline --seed 7 \"$@\""));
    }

    #[test]
    fn iso8601_matches_known_dates() {
        assert_eq!(iso8601(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(iso8601(951_782_400_123), "2000-02-29T00:00:00.123Z");
        assert_eq!(iso8601(1_764_590_400_000), "2025-12-01T12:00:00.000Z");
    }
}
