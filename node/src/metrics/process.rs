//! The standard `process_*` gauges (Linux `/proc/self`), as the Prometheus client
//! libraries of other languages export them, so stock dashboards work.

use std::fmt::Write;

/// Appends the process metrics in OpenMetrics text; nothing where `/proc` is missing.
pub(super) fn render(out: &mut String) {
    let Some(p) = read() else { return };
    let mut metric = |name: &str, kind: &str, help: &str, sample: &str, value: f64| {
        let _ = writeln!(
            out,
            "# HELP {name} {help}.\n# TYPE {name} {kind}\n{sample} {value}"
        );
    };
    metric(
        "process_cpu_seconds",
        "counter",
        "Total user and system CPU time spent in seconds",
        "process_cpu_seconds_total",
        p.cpu_seconds,
    );
    metric(
        "process_resident_memory_bytes",
        "gauge",
        "Resident memory size in bytes",
        "process_resident_memory_bytes",
        p.rss_bytes,
    );
    metric(
        "process_virtual_memory_bytes",
        "gauge",
        "Virtual memory size in bytes",
        "process_virtual_memory_bytes",
        p.vsize_bytes,
    );
    metric(
        "process_start_time_seconds",
        "gauge",
        "Start time of the process since unix epoch in seconds",
        "process_start_time_seconds",
        p.start_time_seconds,
    );
    metric(
        "process_threads",
        "gauge",
        "Number of OS threads in the process",
        "process_threads",
        p.threads,
    );
    if let Some(fds) = p.open_fds {
        metric(
            "process_open_fds",
            "gauge",
            "Number of open file descriptors",
            "process_open_fds",
            fds,
        );
    }
    if let Some(max) = p.max_fds {
        metric(
            "process_max_fds",
            "gauge",
            "Maximum number of open file descriptors",
            "process_max_fds",
            max,
        );
    }
}

struct Process {
    cpu_seconds: f64,
    rss_bytes: f64,
    vsize_bytes: f64,
    start_time_seconds: f64,
    threads: f64,
    open_fds: Option<f64>,
    max_fds: Option<f64>,
}

/// Clock ticks per second of `/proc/*/stat` times; 100 on every Linux this runs on
/// (`USER_HZ`, fixed by the kernel ABI).
const TICKS: f64 = 100.0;
const PAGE: f64 = 4096.0;

fn read() -> Option<Process> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name, which is parenthesised and may hold spaces.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let num = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok());
    // Indices are the stat(5) field numbers minus 3.
    let (utime, stime, threads, start, vsize, rss) =
        (num(11)?, num(12)?, num(17)?, num(19)?, num(20)?, num(21)?);
    let boot = std::fs::read_to_string("/proc/stat")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse::<f64>().ok())?;
    let open_fds = std::fs::read_dir("/proc/self/fd")
        .ok()
        .map(|d| d.count() as f64);
    let max_fds = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|l| {
            l.lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3))
                .and_then(|v| v.parse::<f64>().ok())
        });
    Some(Process {
        cpu_seconds: (utime + stime) / TICKS,
        rss_bytes: rss * PAGE,
        vsize_bytes: vsize,
        start_time_seconds: boot + start / TICKS,
        threads,
        open_fds,
        max_fds,
    })
}
