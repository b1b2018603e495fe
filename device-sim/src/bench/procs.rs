//! Servers as child processes on loopback: started, waited for, measured (RSS), stopped.
//! Children are killed when their handle is dropped.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tempfile::TempDir;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// A server child process.
#[derive(Debug)]
pub struct Server {
    /// What it is (`tether`, `etcd`, …).
    pub name: String,
    /// Its base URL (`http://127.0.0.1:<port>`) or address (`127.0.0.1:<port>`).
    pub url: String,
    /// Its port.
    pub port: u16,
    pub(crate) child: Child,
    /// Its working directory (data, config), removed with the handle.
    pub dir: TempDir,
}

impl Server {
    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id().unwrap_or(0)
    }

    /// Resident set size in KiB, now.
    pub fn rss_kib(&self) -> u64 {
        rss_kib(self.pid()).unwrap_or(0)
    }

    /// Stops the process (SIGKILL: its data is thrown away anyway) and waits for it.
    pub async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}

/// `VmRSS` of a process in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The sum of the numeric `/proc/<pid>/stat` fields `fields` (numbered as in proc(5)), in
/// seconds at the kernel's fixed `USER_HZ` of 100 ticks per second.
fn stat_secs(pid: u32, fields: &[usize]) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces: count from the ')' that ends it, which
    // field 3 follows.
    let after: Vec<&str> = s.get(s.rfind(')')? + 1..)?.split_whitespace().collect();
    let mut ticks = 0u64;
    for &f in fields {
        ticks += after.get(f.checked_sub(3)?)?.parse::<u64>().ok()?;
    }
    Some(ticks as f64 / 100.0)
}

/// CPU time (user + system, every thread) a process has used, in seconds: `/proc/<pid>/stat`
/// fields 14 and 15.
pub fn cpu_secs(pid: u32) -> Option<f64> {
    stat_secs(pid, &[14, 15])
}

/// CPU time (user + system) of process `pid` and of its children, in seconds: the live
/// ones (`/proc/<pid>/task/*/children`) and the ones it has reaped (its `cutime` and
/// `cstime`, fields 16 and 17). Enough for a server that forks a process per connection
/// (PostgreSQL's postmaster and its backends).
pub fn tree_cpu_secs(pid: u32) -> Option<f64> {
    let own = stat_secs(pid, &[14, 15, 16, 17])?;
    let children: f64 = children(pid)?.into_iter().filter_map(cpu_secs).sum();
    Some(own + children)
}

/// The live children of process `pid` (`/proc/<pid>/task/*/children`).
pub fn children(pid: u32) -> Option<Vec<u32>> {
    Some(
        per_task(pid, "children")?
            .iter()
            .flat_map(|list| list.split_whitespace())
            .filter_map(|c| c.parse::<u32>().ok())
            .collect(),
    )
}

/// Context switches (voluntary and involuntary) of every live thread of process `pid` so
/// far: the `ctxt_switches` lines of `/proc/<pid>/task/*/status`. A thread that has
/// exited no longer counts.
pub fn context_switches(pid: u32) -> Option<u64> {
    Some(
        per_task(pid, "status")?
            .iter()
            .flat_map(|status| status.lines())
            .filter(|l| l.contains("ctxt_switches:"))
            .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            .sum(),
    )
}

/// The file `name` of every live thread of process `pid` (`/proc/<pid>/task/*/<name>`;
/// empty for a thread that ended while being read).
fn per_task(pid: u32, name: &str) -> Option<Vec<String>> {
    Some(
        std::fs::read_dir(format!("/proc/{pid}/task"))
            .ok()?
            .flatten()
            .map(|task| std::fs::read_to_string(task.path().join(name)).unwrap_or_default())
            .collect(),
    )
}

/// A port that was free a moment ago.
pub fn free_port() -> Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").context("binding a probe port")?;
    Ok(l.local_addr()?.port())
}

/// Waits until `addr` accepts TCP connections.
pub async fn wait_port(addr: SocketAddr, limit: Duration) -> Result<()> {
    let until = Instant::now() + limit;
    loop {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        if Instant::now() >= until {
            bail!("nothing listens on {addr} after {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `name` on PATH or in the usual system directories.
pub fn find_program(name: &str) -> Result<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    let found = path
        .split(':')
        .chain(["/usr/sbin", "/usr/bin", "/sbin", "/usr/local/bin"])
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file());
    found.with_context(|| format!("`{name}` is not installed"))
}

/// Spawns `cmd` and waits for its stdout line `listening on <url>`.
pub async fn spawn_listening(mut cmd: Command, limit: Duration) -> Result<(Child, String)> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true);
    let mut child = cmd.spawn().context("spawning server")?;
    let stdout = child.stdout.take().context("server stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let line = tokio::time::timeout(limit, lines.next_line())
        .await
        .context("server printed nothing in time")??
        .context("server exited before listening")?;
    let url = line
        .strip_prefix("listening on ")
        .with_context(|| format!("unexpected first line {line:?}"))?
        .to_string();
    // Keep draining stdout so the child never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok((child, url))
}

fn port_of(url: &str) -> u16 {
    url.rsplit(':')
        .next()
        .and_then(|p| p.trim_end_matches('/').parse().ok())
        .unwrap_or(0)
}

/// The trivial actix-web server of this binary (`tether-bench trivial-server`).
pub async fn start_trivial(workers: usize) -> Result<Server> {
    let exe = std::env::current_exe().context("locating tether-bench")?;
    let mut cmd = Command::new(exe);
    cmd.args(["trivial-server", "--workers", &workers.to_string()]);
    let (child, url) = spawn_listening(cmd, Duration::from_secs(10)).await?;
    Ok(Server {
        name: "trivial".to_string(),
        port: port_of(&url),
        url,
        child,
        dir: TempDir::new()?,
    })
}

/// etcd (Debian `etcd-server`), one member, data on disk with its default fsync policy.
pub async fn start_etcd() -> Result<Server> {
    let bin = find_program("etcd")?;
    let dir = TempDir::new()?;
    let (client, peer) = (free_port()?, free_port()?);
    let c = format!("http://127.0.0.1:{client}");
    let p = format!("http://127.0.0.1:{peer}");
    let mut cmd = Command::new(bin);
    cmd.arg("--name")
        .arg("bench")
        .arg("--data-dir")
        .arg(dir.path().join("etcd"))
        .args(["--listen-client-urls", &c, "--advertise-client-urls", &c])
        .args([
            "--listen-peer-urls",
            &p,
            "--initial-advertise-peer-urls",
            &p,
        ])
        .arg("--initial-cluster")
        .arg(format!("bench={p}"))
        .args(["--log-level", "error"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true);
    let child = cmd.spawn().context("spawning etcd")?;
    wait_port(
        SocketAddr::from(([127, 0, 0, 1], client)),
        Duration::from_secs(20),
    )
    .await?;
    Ok(Server {
        name: "etcd".to_string(),
        url: c,
        port: client,
        child,
        dir,
    })
}

/// mosquitto (Debian), persistence on: the in-memory database is written to disk after
/// every change (`autosave_on_changes true`, `autosave_interval 1`), the most durable
/// setting mosquitto 2.0 has (it still acknowledges before writing).
pub async fn start_mosquitto() -> Result<Server> {
    let bin = find_program("mosquitto")?;
    let dir = TempDir::new()?;
    let port = free_port()?;
    let conf = dir.path().join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!(
            "listener {port} 127.0.0.1\n\
             allow_anonymous true\n\
             user root\n\
             persistence true\n\
             persistence_location {}/\n\
             autosave_on_changes true\n\
             autosave_interval 1\n\
             max_queued_messages 100000\n\
             max_inflight_messages 100\n\
             set_tcp_nodelay true\n\
             log_type error\n",
            dir.path().display()
        ),
    )?;
    let mut cmd = Command::new(bin);
    cmd.arg("-c")
        .arg(&conf)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true);
    let child = cmd.spawn().context("spawning mosquitto")?;
    wait_port(
        SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_secs(10),
    )
    .await?;
    Ok(Server {
        name: "mosquitto".to_string(),
        url: format!("127.0.0.1:{port}"),
        port,
        child,
        dir,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A child's CPU counts in its parent's tree once reaped, and not in the parent's own.
    #[test]
    fn a_reaped_childs_cpu_counts_in_the_tree_only() {
        let me = std::process::id();
        let (own, tree) = (cpu_secs(me).expect("own"), tree_cpu_secs(me).expect("tree"));
        assert!(tree >= own, "tree {tree} < own {own}");
        let status = std::process::Command::new("sh")
            .args(["-c", "i=0; while [ $i -lt 300000 ]; do i=$((i+1)); done"])
            .status()
            .expect("sh");
        assert!(status.success());
        let child = (tree_cpu_secs(me).expect("tree") - tree) - (cpu_secs(me).expect("own") - own);
        assert!(
            child >= 0.01,
            "a busy child's CPU is missing from the tree: {child} s"
        );
    }

    /// Every sleep of a thread is a switch away from it, counted while the thread lives.
    #[test]
    fn a_sleeping_threads_switches_are_counted() {
        let me = std::process::id();
        let (go, wait) = std::sync::mpsc::channel::<()>();
        let (slept, done) = std::sync::mpsc::channel::<()>();
        let sleeper = std::thread::spawn(move || {
            wait.recv().expect("go");
            for _ in 0..50 {
                std::thread::sleep(Duration::from_millis(1));
            }
            slept.send(()).expect("slept");
            // Stays alive (blocked) until the count is read.
            let _ = wait.recv();
        });
        let before = context_switches(me).expect("before");
        go.send(()).expect("start");
        done.recv().expect("done");
        let after = context_switches(me).expect("after");
        drop(go);
        sleeper.join().expect("sleeper");
        assert!(
            after >= before + 50,
            "50 sleeps, {} switches counted",
            after.saturating_sub(before)
        );
    }
}
