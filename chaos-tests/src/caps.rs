//! The capability probe a chaos run starts with: every tool and kernel feature the run
//! needs is checked (by using it, in a throw-away namespace where that matters) before any
//! cluster starts.
//!
//! - A missing package fails the run naming the Debian package ([`ChaosError::Missing`]).
//! - A missing kernel feature with a fallback switches to it and says so in
//!   [`Capabilities::notes`] (they go into the run's metadata and report): no cgroup
//!   freezer → pauses use SIGSTOP only (they do anyway: a node is one process); no
//!   `tc netem` (this kernel) → latency, stalls and clogs come from the userspace proxy.
//! - A missing feature without a fallback (not root, no network namespaces, no nftables
//!   in the kernel) fails the run with the failing command and its stderr.
//!
//! Nothing is skipped silently.

use std::path::Path;
use std::process::Command;

use serde::Serialize;

use crate::error::ChaosError;
use crate::{HAPROXY, LIBFAKETIME, NET_PREFIX};

/// What the probe found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Capabilities {
    /// Kernel release (`uname -r`).
    pub kernel: String,
    /// The cgroup-v1 freezer is mounted.
    pub freezer: bool,
    /// `tc netem` is in the kernel.
    pub netem: bool,
    /// Fallbacks taken and facts a reader of the report needs.
    pub notes: Vec<String>,
}

/// What a run needs beyond the always-needed tools.
#[derive(Debug, Clone, Copy, Default)]
pub struct Needs {
    /// Nodes under libfaketime (clock scenarios).
    pub faketime: bool,
    /// Nodes' links through the userspace proxy (nftables DNAT in their namespaces).
    pub link_proxy: bool,
    /// PostgreSQL on a tmpfs (disk-full scenarios): `mount -t tmpfs` must work.
    pub tmpfs: bool,
    /// A streaming standby (failover scenarios): `pg_basebackup` and `psql`.
    pub standby: bool,
}

fn run(program: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| format!("{program}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn missing(what: &str, package: &str) -> ChaosError {
    ChaosError::Missing {
        what: what.to_string(),
        package: package.to_string(),
    }
}

fn probe_failed(probe: &str, detail: String) -> ChaosError {
    ChaosError::Probe {
        probe: probe.to_string(),
        detail,
    }
}

/// Whether `/usr/lib/postgresql/*/bin/postgres` (or `$TETHER_PG_BIN/postgres`) exists.
fn postgres_installed() -> bool {
    pg_tool_installed("postgres")
}

/// Whether PostgreSQL's `tool` is next to its server binaries.
fn pg_tool_installed(tool: &str) -> bool {
    if let Ok(dir) = std::env::var("TETHER_PG_BIN") {
        return Path::new(&dir).join(tool).exists();
    }
    std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| {
            d.filter_map(Result::ok)
                .any(|e| e.path().join("bin").join(tool).exists())
        })
        .unwrap_or(false)
}

/// A `nat output` DNAT rule like the link proxy's, in namespace `ns`.
fn probe_nat(ns: &str) -> Result<(), String> {
    let rules = crate::proxy::nat_rules(
        "t12probenat",
        std::net::SocketAddr::from(([10, 12, 255, 1], 0)),
        &[(std::net::SocketAddr::from(([10, 12, 255, 2], 7070)), 40000)],
    );
    let file = std::env::temp_dir().join(format!("t12probenat-{}.nft", std::process::id()));
    std::fs::write(&file, rules).map_err(|e| format!("{}: {e}", file.display()))?;
    let path = file.to_string_lossy().into_owned();
    let r = run("ip", &["netns", "exec", ns, "nft", "-f", &path]).map(|_| ());
    let _ = std::fs::remove_file(&file);
    r
}

/// A 1 MiB tmpfs mounted and unmounted again (disk-full scenarios).
fn probe_tmpfs() -> Result<(), ChaosError> {
    if run("mount", &["--version"]).is_err() {
        return Err(missing("mount (util-linux)", "mount"));
    }
    let dir = tempfile::tempdir().map_err(|e| ChaosError::io(Path::new("/tmp"), e))?;
    let path = dir.path().display().to_string();
    run(
        "mount",
        &["-t", "tmpfs", "-o", "size=1m", "t12-probe", &path],
    )
    .map_err(|e| probe_failed("tmpfs mount", e))?;
    run("umount", &[&path]).map_err(|e| probe_failed("tmpfs umount", e))?;
    Ok(())
}

/// Probes everything a run with `needs` uses.
pub fn probe(needs: Needs) -> Result<Capabilities, ChaosError> {
    let mut caps = Capabilities {
        kernel: run("uname", &["-r"]).unwrap_or_default().trim().to_string(),
        ..Capabilities::default()
    };
    if !tether_test_support::netns::is_root() {
        return Err(probe_failed(
            "root",
            "the chaos suite creates network namespaces and nftables rules: run it as root".into(),
        ));
    }
    if run("ip", &["-V"]).is_err() {
        return Err(missing("ip", "iproute2"));
    }
    if !Path::new(HAPROXY).exists() {
        return Err(missing(HAPROXY, "haproxy"));
    }
    if !postgres_installed() {
        return Err(missing(
            "PostgreSQL server binaries (/usr/lib/postgresql/*/bin)",
            "postgresql",
        ));
    }
    if run("curl", &["--version"]).is_err() {
        return Err(missing(
            "curl (devices are provisioned from inside a node's host)",
            "curl",
        ));
    }
    if run("nft", &["--version"]).is_err() {
        return Err(missing("nft", "nftables"));
    }
    if needs.faketime && !Path::new(LIBFAKETIME).exists() {
        return Err(missing(LIBFAKETIME, "libfaketime"));
    }
    if needs.standby {
        for tool in ["pg_basebackup", "psql"] {
            if !pg_tool_installed(tool) {
                return Err(missing(
                    &format!("{tool} next to PostgreSQL's server binaries"),
                    "postgresql-client",
                ));
            }
        }
    }
    if needs.tmpfs {
        probe_tmpfs()?;
    }

    // Namespaces and nftables, for real, in a throw-away namespace.
    let ns = format!("{NET_PREFIX}-probe-{}", std::process::id());
    run("ip", &["netns", "add", &ns]).map_err(|e| probe_failed("network namespace", e))?;
    let nft = run(
        "ip",
        &[
            "netns", "exec", &ns, "nft", "add", "table", "inet", "t12probe",
        ],
    );
    let nat = if needs.link_proxy {
        probe_nat(&ns)
    } else {
        Ok(())
    };
    let _ = run("ip", &["netns", "del", &ns]);
    nft.map_err(|e| probe_failed("nftables in a namespace", e))?;
    nat.map_err(|e| probe_failed("nftables DNAT in a namespace (the link proxy)", e))?;

    // libfaketime: a child must see the offset from the file, with a real monotonic clock.
    if needs.faketime {
        let dir = tempfile::tempdir().map_err(|e| ChaosError::io(Path::new("/tmp"), e))?;
        let file = dir.path().join("offset");
        std::fs::write(&file, "+86400\n").map_err(|e| ChaosError::io(&file, e))?;
        let out = Command::new("date")
            .arg("+%s")
            .env("LD_PRELOAD", LIBFAKETIME)
            .env("FAKETIME_TIMESTAMP_FILE", &file)
            .env("FAKETIME_DONT_FAKE_MONOTONIC", "1")
            .output()
            .map_err(|e| probe_failed("libfaketime", e.to_string()))?;
        let faked: u64 = String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .unwrap_or(0);
        let real = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        if faked < real + 86_000 {
            return Err(probe_failed(
                "libfaketime",
                format!(
                    "`date` under {LIBFAKETIME} with a +86400 s offset file printed {faked}, \
                     the real time is {real}"
                ),
            ));
        }
    }

    caps.freezer = Path::new("/sys/fs/cgroup/freezer").is_dir();
    if !caps.freezer {
        caps.notes.push(
            "cgroup freezer not mounted: pauses use SIGSTOP/SIGCONT of the node process only"
                .into(),
        );
    }
    let config = run("sh", &["-c", "zcat /proc/config.gz 2>/dev/null"]).unwrap_or_default();
    caps.netem = config.lines().any(|l| l == "CONFIG_NET_SCH_NETEM=y");
    if !caps.netem {
        caps.notes.push(
            "tc netem absent (CONFIG_NET_SCH_NETEM not set): latency, stalls and clogs come from the \
             userspace proxy (`proxy.rs`); loss uses nftables `numgen random`"
                .into(),
        );
    }
    Ok(caps)
}
