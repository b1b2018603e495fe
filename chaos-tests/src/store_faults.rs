//! Faults of the store itself, beyond a crash: a full disk under PostgreSQL and the
//! failover to a streaming standby.
//!
//! - **Disk full** ([`FaultKind::DiskFull`]): PostgreSQL's whole directory (data, WAL,
//!   its log) lives on a small tmpfs ([`Tmpfs`], mounted for the run, unmounted when the
//!   cluster drops). The fault writes a ballast file next to it until the write fails with
//!   ENOSPC, holds it for the duration, then deletes it. PostgreSQL answers ENOSPC by
//!   failing the statement (relation extension) or, on a WAL write, by PANIC and a crash
//!   restart; if it shut down for good (recovery itself needs space), the heal starts it
//!   again, as an operator or a supervisor would, and says so in the fault's end entry.
//!   Then every node is killed and restarted (as after a failover, below). The server
//!   runs with `wal_init_zero=off` and `wal_recycle=off` (the settings for
//!   copy-on-write file systems), so new WAL is allocated as it is written and the full
//!   disk bites within seconds instead of at the next 16 MB segment switch (the fault
//!   starts a new segment with `pg_switch_wal()` before it fills the disk).
//! - **Failover** ([`FaultKind::StoreFailover`]): a second PostgreSQL in a namespace of
//!   its own, made with `pg_basebackup -R` and streaming from the primary, which waits for
//!   it on every commit (`synchronous_standby_names = '*'`, `synchronous_commit = on`:
//!   the commit is flushed on the standby before it is acknowledged). The nodes' store URL
//!   names both hosts with `target_session_attrs=read-write` (tokio-postgres tries them in
//!   order and keeps the one that accepts writes). The fault cuts the standby from the
//!   primary (nftables in the standby's namespace) for [`REPLICATION_STALL`] (commits go
//!   unreplicated), crashes the primary (`pg_ctl stop -m immediate`), waits the duration
//!   (a failover manager's detection time), promotes the standby (`pg_ctl promote`) and
//!   lifts the cut. The old primary stays down. Then every node is killed and restarted
//!   (a cold start loads every set from the store: a running owner would write its
//!   in-memory state back with its next commit and hide a lost one). With asynchronous replication the commits acknowledged during
//!   the stall would be lost; the checker counts them.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use tether_node::store::pg_server::{PgOptions, PgServer};
use tether_test_support::netns::Namespace;

use crate::error::ChaosError;
use crate::history::{FaultPhase, SharedRecorder};
use crate::nemesis::{FaultKind, Planned};
use crate::Cluster;

/// The database the nodes use.
const DATABASE: &str = "tether";

/// Starts a streaming standby of `primary` in `ns` and makes the primary wait for it on
/// every commit; returns once `pg_stat_replication` says `sync`.
pub fn start_standby(primary: &PgServer, ns: &Namespace) -> Result<PgServer, String> {
    let options = PgOptions {
        netns: Some(ns.name().to_string()),
        listen: std::net::IpAddr::V4(ns.ip()),
        port: Some(primary.port()),
        ..PgOptions::default()
    };
    let standby = PgServer::standby_of(primary, options).map_err(|e| e.to_string())?;
    // Only the primary waits: the standby, once promoted, has no standby of its own and
    // must not wait for one (ALTER SYSTEM writes the primary's postgresql.auto.conf,
    // copied to the standby before this).
    primary
        .psql("ALTER SYSTEM SET synchronous_standby_names = '*'")
        .and_then(|_| primary.psql("ALTER SYSTEM SET synchronous_commit = 'on'"))
        .and_then(|_| primary.psql("SELECT pg_reload_conf()"))
        .map_err(|e| e.to_string())?;
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last = String::new();
    while Instant::now() < deadline {
        last = primary
            .psql("SELECT string_agg(state || ' ' || sync_state, ',') FROM pg_stat_replication")
            .map_err(|e| e.to_string())?;
        if last == "streaming sync" {
            return Ok(standby);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Err(format!(
        "the standby is not a synchronous streaming replica after 30 s (pg_stat_replication:          {last:?}); its log:\n{}",
        standby.log_text()
    ))
}

/// The store URL naming the primary, then the standby: tokio-postgres connects to the
/// first that accepts writes.
pub fn multi_host_url(primary: &PgServer, standby: &PgServer) -> String {
    format!(
        "postgres://tether@{}:{},{}:{}/{DATABASE}?target_session_attrs=read-write",
        primary.listen(),
        primary.port(),
        standby.listen(),
        standby.port()
    )
}

/// The tmpfs PostgreSQL's directory lives on in disk-full runs, in MiB.
pub const STORE_TMPFS_MIB: u64 = 256;

/// PostgreSQL settings of disk-full runs (see the module docs).
pub fn disk_full_settings() -> Vec<(String, String)> {
    [
        ("wal_init_zero", "off"),
        ("wal_recycle", "off"),
        ("max_wal_size", "96MB"),
        ("min_wal_size", "32MB"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

/// A tmpfs of a fixed size mounted on a fresh directory; unmounted (lazily if still
/// busy) and the directory removed on drop.
#[derive(Debug)]
pub struct Tmpfs {
    path: PathBuf,
    mounted: bool,
}

fn command(program: &str, args: &[&str]) -> Result<(), String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| format!("{program}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl Tmpfs {
    /// Mounts a `size_mib` MiB tmpfs (mode 755) on a new directory under the system
    /// temporary directory.
    pub fn mount(size_mib: u64) -> Result<Tmpfs, String> {
        let path = std::env::temp_dir().join(format!(
            "t12-pgfs-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let mut fs = Tmpfs {
            path,
            mounted: false,
        };
        let p = fs.path.display().to_string();
        command(
            "mount",
            &[
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size_mib}m,mode=755"),
                "t12-pgfs",
                &p,
            ],
        )?;
        fs.mounted = true;
        Ok(fs)
    }

    /// Where it is mounted.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Free bytes on it.
    pub fn free_bytes(&self) -> Option<u64> {
        let out = Command::new("df")
            .args(["--output=avail", "-B1"])
            .arg(&self.path)
            .output()
            .ok()?;
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .nth(1)?
            .trim()
            .parse()
            .ok()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        if self.mounted {
            let p = self.path.display().to_string();
            if command("umount", &[&p]).is_err() {
                let _ = command("umount", &["-l", &p]);
            }
        }
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Writes `path` until the file system says ENOSPC; the bytes written. Any other error
/// is returned.
pub fn fill(path: &Path) -> std::io::Result<u64> {
    let mut file = std::fs::File::create(path)?;
    let mut written = 0u64;
    // 1 MiB chunks, then 4 KiB ones for the tail; bounded by the chunk counts.
    for (chunk, max) in [(1usize << 20, 1usize << 16), (4096, 1 << 12)] {
        let buf = vec![0xa5u8; chunk];
        for _ in 0..max {
            match file.write(&buf) {
                Ok(0) => break,
                Ok(n) => written += n as u64,
                Err(e) if e.raw_os_error() == Some(28) => break, // ENOSPC
                Err(e) => return Err(e),
            }
        }
    }
    // Some bytes may sit in the page cache only; tmpfs has no other place for them, and
    // sync makes a disk-backed file system account for them too.
    let _ = file.sync_all();
    Ok(written)
}

fn err(kind: FaultKind, detail: impl std::fmt::Display) -> ChaosError {
    ChaosError::Nemesis {
        kind: kind.name().to_string(),
        target: "store".to_string(),
        detail: detail.to_string(),
    }
}

/// How many PostgreSQL log lines say PANIC.
fn panics(log: &str) -> usize {
    log.lines().filter(|l| l.contains("PANIC:")).count()
}

/// Kills every running node and starts them again. A running owner keeps its sets in
/// memory and would write a lost commit back with its next one, hiding the loss; after a
/// cold start every node loads its sets from the store, so later reads show what the
/// store really kept.
async fn cold_restart(cluster: &mut Cluster) {
    let running = cluster.live_nodes();
    for &i in &running {
        cluster.kill9(i).await;
    }
    for &i in &running {
        cluster.restart(i).await;
    }
}

/// Fills the store's disk for the fault's duration, then frees it (and starts PostgreSQL
/// again if it shut down).
pub async fn disk_full(
    cluster: &mut Cluster,
    fault: &Planned,
    rec: &SharedRecorder,
) -> Result<(), ChaosError> {
    let kind = fault.kind;
    let fs = cluster.store_tmpfs().ok_or_else(|| {
        err(
            kind,
            "the store is not on a tmpfs (ClusterOptions::store_tmpfs_mib)",
        )
    })?;
    let ballast = fs.path().join("ballast");
    let panics_before = panics(&cluster.store().log_text());
    // Start a new WAL segment: with wal_init_zero=off it is allocated as it is written, so
    // the full disk reaches WAL writes (PANIC) and not only relation extension (ERROR).
    let switched = tokio::task::block_in_place(|| cluster.store().psql("SELECT pg_switch_wal()"))
        .map_or_else(
            |e| format!("pg_switch_wal failed: {e}"),
            |lsn| format!("WAL switched at {lsn}"),
        );
    let started = Instant::now();
    let written = tokio::task::block_in_place(|| fill(&ballast))
        .map_err(|e| err(kind, format!("ballast {}: {e}", ballast.display())))?;
    rec.fault(
        kind.name(),
        "store",
        FaultPhase::Start,
        format!(
            "{switched}; ballast {} MiB written in {:.1} s, {} bytes left on PostgreSQL's file \
             system",
            written >> 20,
            started.elapsed().as_secs_f64(),
            fs.free_bytes().map_or("?".into(), |b| b.to_string())
        ),
    );
    tokio::time::sleep(Duration::from_millis(fault.duration_ms)).await;
    std::fs::remove_file(&ballast)
        .map_err(|e| err(kind, format!("remove {}: {e}", ballast.display())))?;
    let store = cluster.store();
    let mut detail = format!(
        "ballast removed; {} PANIC line(s) in PostgreSQL's log",
        panics(&store.log_text()).saturating_sub(panics_before)
    );
    if !tokio::task::block_in_place(|| store.is_running()) {
        let t = Instant::now();
        tokio::task::block_in_place(|| store.start_again()).map_err(|e| err(kind, e))?;
        detail.push_str(&format!(
            "; PostgreSQL had shut down, started again in {:.1} s",
            t.elapsed().as_secs_f64()
        ));
    }
    let t = Instant::now();
    cold_restart(cluster).await;
    detail.push_str(&format!(
        "; every node killed and restarted in {:.1} s",
        t.elapsed().as_secs_f64()
    ));
    rec.fault(kind.name(), "store", FaultPhase::End, detail);
    Ok(())
}

/// How long replication stalls before the primary crashes.
pub const REPLICATION_STALL: Duration = Duration::from_secs(3);

/// The nftables table of the replication cut.
const CUT_TABLE: &str = "t12repl";

/// Rules dropping everything to and from `peer`.
fn cut_rules(peer: &str) -> String {
    format!(
        "table inet {CUT_TABLE} {{
  chain input {{ type filter hook input priority 0; policy accept; ip saddr {peer} drop; }}
  chain output {{ type filter hook output priority 0; policy accept; ip daddr {peer} drop; }}
}}
"
    )
}

/// Stalls replication, crashes the primary, waits the fault's duration, promotes the
/// standby.
pub async fn failover(
    cluster: &mut Cluster,
    fault: &Planned,
    rec: &SharedRecorder,
) -> Result<(), ChaosError> {
    let kind = fault.kind;
    let Some(standby) = cluster.standby() else {
        return Err(err(
            kind,
            "no standby to promote (ClusterOptions::store_standby; one failover per run)",
        ));
    };
    let lag = tokio::task::block_in_place(|| {
        cluster.store().psql(
            "SELECT coalesce(string_agg(sync_state || ' ' || \
             pg_wal_lsn_diff(sent_lsn, flush_lsn)::text || ' bytes unflushed', ', '), 'none') \
             FROM pg_stat_replication",
        )
    })
    .unwrap_or_else(|e| format!("? ({e})"));
    let (primary, standby_ip) = (cluster.store().listen(), standby.listen());
    // The primary's host drops off the network first, as seen from the standby
    // (nftables in the standby's namespace), so that the crash finds commits the standby
    // never received: synchronous replication holds their acknowledgements back;
    // asynchronous replication would have acknowledged them. The cut stays until the
    // standby is promoted, so nothing the primary's kernel still retransmits arrives.
    let ns = cluster
        .standby_namespace()
        .ok_or_else(|| err(kind, "the standby has no namespace"))?
        .to_string();
    crate::nemesis::nft_in(&ns, &cut_rules(&primary.to_string()))
        .await
        .map_err(|e| err(kind, e))?;
    rec.fault(
        kind.name(),
        "store",
        FaultPhase::Start,
        format!(
            "standby {standby_ip} was: {lag}; it lost the primary {primary} for {} ms, then \
             the primary stopped -m immediate",
            REPLICATION_STALL.as_millis()
        ),
    );
    tokio::time::sleep(REPLICATION_STALL).await;
    tokio::task::block_in_place(|| cluster.store().stop_immediate()).map_err(|e| err(kind, e))?;
    tokio::time::sleep(Duration::from_millis(fault.duration_ms)).await;
    let t = Instant::now();
    let standby = cluster
        .standby()
        .ok_or_else(|| err(kind, "standby vanished"))?;
    tokio::task::block_in_place(|| standby.promote()).map_err(|e| err(kind, e))?;
    let took = t.elapsed().as_secs_f64();
    crate::nemesis::nft_in(&ns, &format!("delete table inet {CUT_TABLE}\n"))
        .await
        .map_err(|e| err(kind, e))?;
    cluster.promoted();
    let t = Instant::now();
    cold_restart(cluster).await;
    rec.fault(
        kind.name(),
        "store",
        FaultPhase::End,
        format!(
            "standby {standby_ip} promoted in {took:.1} s; the old primary stays down; every \
             node killed and restarted on the promoted store in {:.1} s",
            t.elapsed().as_secs_f64()
        ),
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn panic_lines_are_counted() {
        let log = "LOG:  x\n2026 PANIC:  could not write to file \"pg_wal/xlogtemp\": No space left on device\nLOG: y\n";
        assert_eq!(panics(log), 1);
        assert_eq!(panics("LOG: fine\n"), 0);
    }

    #[test]
    fn fill_stops_at_the_end_of_a_small_file_system() {
        if !tether_test_support::netns::is_root() {
            panic!("this test mounts a tmpfs: run it as root");
        }
        let fs = Tmpfs::mount(2).expect("mount a 2 MiB tmpfs");
        let written = fill(&fs.path().join("ballast")).expect("fill");
        assert!(
            (1 << 20..=2 << 20).contains(&written),
            "wrote {written} bytes on a 2 MiB tmpfs"
        );
        assert_eq!(fs.free_bytes(), Some(0));
        let path = fs.path().to_path_buf();
        drop(fs);
        assert!(!path.exists(), "{} left behind", path.display());
    }
}
