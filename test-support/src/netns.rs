//! Network namespaces for tests whose processes need hosts of their own (own IP address,
//! same ports on every host, their own resolver): one Linux bridge in the host namespace
//! holding the first address of a private /24, and namespaces each joined to it by a veth
//! pair, with an address of their own and a default route through the bridge. The host
//! (the test process) reaches every namespace directly.
//!
//! - Names carry the caller's prefix (its issue number, e.g. `t11`) and a per-run slot, so
//!   concurrent runs and other suites never collide: bridge `<prefix>b<slot>`, namespaces
//!   `<prefix>-<slot>-<name>`, subnet `10.<octet>.<slot>.0/24`. A slot whose run died
//!   (its pid file names a dead process) is cleaned up and reused.
//! - `ip netns exec` bind-mounts `/etc/netns/<ns>/resolv.conf` over `/etc/resolv.conf`
//!   for the command it runs: [`Namespace::set_resolv_conf`] gives a namespace its
//!   resolver (see [`crate::dns`]).
//! - Dropping a [`Namespace`] deletes it (and its veth); dropping the [`Network`] deletes
//!   the bridge and the pid file.
//!
//! Needs root and iproute2; anything missing is an error saying so, never a skip.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context, Result};

/// Runs `ip <args>`, failing with its stderr.
fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running `ip` (iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// `ip` whose failure does not matter (cleanup of what may not exist).
fn ip_quiet(args: &[&str]) {
    let _ = Command::new("ip").args(args).output();
}

/// Whether this process runs as root.
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|e| e == "0"))
        })
        .unwrap_or(false)
}

/// Every namespace name that starts with `prefix`.
fn namespaces_with_prefix(prefix: &str) -> Vec<String> {
    let out = Command::new("ip").args(["netns", "list"]).output();
    let Ok(out) = out else { return Vec::new() };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(prefix))
        .map(str::to_string)
        .collect()
}

fn pid_alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// A bridge and the private /24 behind it.
#[derive(Debug)]
pub struct Network {
    prefix: String,
    slot: u8,
    octet: u8,
    bridge: String,
    pid_file: PathBuf,
    next_host: u8,
}

impl Network {
    /// Creates the bridge for a free slot of `prefix`'s `10.<octet>.0.0/16`.
    pub fn create(prefix: &str, octet: u8) -> Result<Network> {
        if !is_root() {
            bail!(
                "network namespaces need root: run the test as root (CI does); it is never skipped"
            );
        }
        let run_dir = PathBuf::from(format!("/run/{prefix}-netns"));
        std::fs::create_dir_all(&run_dir)
            .with_context(|| format!("creating {}", run_dir.display()))?;
        for slot in 1..=250u8 {
            let bridge = format!("{prefix}b{slot}");
            let pid_file = run_dir.join(format!("{slot}.pid"));
            let owner = std::fs::read_to_string(&pid_file)
                .ok()
                .and_then(|s| s.trim().parse::<u32>().ok());
            if let Some(pid) = owner {
                if pid_alive(pid) {
                    continue;
                }
                // A run that died without cleaning up: take its slot back.
                for ns in namespaces_with_prefix(&format!("{prefix}-{slot}-")) {
                    ip_quiet(&["netns", "del", &ns]);
                    let _ = std::fs::remove_dir_all(format!("/etc/netns/{ns}"));
                }
                ip_quiet(&["link", "del", &bridge]);
                let _ = std::fs::remove_file(&pid_file);
            }
            // Creating the bridge is the lock: it fails if another run holds the slot.
            if ip(&["link", "add", &bridge, "type", "bridge"]).is_err() {
                continue;
            }
            std::fs::write(&pid_file, std::process::id().to_string())
                .with_context(|| format!("writing {}", pid_file.display()))?;
            let net = Network {
                prefix: prefix.to_string(),
                slot,
                octet,
                bridge: bridge.clone(),
                pid_file,
                next_host: 2,
            };
            ip(&[
                "addr",
                "add",
                &format!("{}/24", net.host_ip(1)),
                "dev",
                &bridge,
            ])?;
            ip(&["link", "set", &bridge, "up"])?;
            return Ok(net);
        }
        bail!("no free network slot for prefix {prefix} (250 in use?)")
    }

    /// `10.<octet>.<slot>.<host>`.
    pub fn host_ip(&self, host: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, self.octet, self.slot, host)
    }

    /// The host's own address on the bridge (the namespaces' default gateway).
    pub fn gateway(&self) -> Ipv4Addr {
        self.host_ip(1)
    }

    /// The slot this run holds.
    pub fn slot(&self) -> u8 {
        self.slot
    }

    /// A new namespace `<prefix>-<slot>-<name>` with the next free address.
    pub fn add_namespace(&mut self, name: &str) -> Result<Namespace> {
        if self.next_host == 255 {
            bail!("this network's /24 is full");
        }
        let host = self.next_host;
        self.next_host += 1;
        let full = format!("{}-{}-{name}", self.prefix, self.slot);
        let veth = format!("{}v{}x{host}", self.prefix, self.slot);
        let peer = format!("{veth}p");
        let ip_addr = self.host_ip(host);
        // A namespace of an earlier run may still be torn down by the kernel (that is
        // asynchronous) with its veth: take the name back.
        ip_quiet(&["link", "del", &veth]);
        ip(&["netns", "add", &full])?;
        let ns = Namespace {
            name: full.clone(),
            ip: ip_addr,
        };
        ip(&["link", "add", &veth, "type", "veth", "peer", "name", &peer])?;
        ip(&["link", "set", &peer, "netns", &full])?;
        ip(&["link", "set", &veth, "master", &self.bridge, "up"])?;
        ip(&["-n", &full, "link", "set", &peer, "name", "eth0"])?;
        ip(&[
            "-n",
            &full,
            "addr",
            "add",
            &format!("{ip_addr}/24"),
            "dev",
            "eth0",
        ])?;
        ip(&["-n", &full, "link", "set", "eth0", "up"])?;
        ip(&["-n", &full, "link", "set", "lo", "up"])?;
        ip(&[
            "-n",
            &full,
            "route",
            "add",
            "default",
            "via",
            &self.gateway().to_string(),
        ])?;
        Ok(ns)
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        // Namespaces still alive (leaked handles) go with the slot.
        for ns in namespaces_with_prefix(&format!("{}-{}-", self.prefix, self.slot)) {
            ip_quiet(&["netns", "del", &ns]);
            let _ = std::fs::remove_dir_all(format!("/etc/netns/{ns}"));
        }
        ip_quiet(&["link", "del", &self.bridge]);
        let _ = std::fs::remove_file(&self.pid_file);
    }
}

/// One network namespace on a [`Network`]; deleted on drop.
#[derive(Debug)]
pub struct Namespace {
    name: String,
    ip: Ipv4Addr,
}

impl Namespace {
    /// Its full name (for `ip netns exec`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its address.
    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    /// `ip netns exec <ns> <program>`: a command to run inside the namespace.
    pub fn command(&self, program: &str) -> tokio::process::Command {
        let mut c = tokio::process::Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    /// The same, blocking.
    pub fn std_command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    /// The namespace's `/etc/resolv.conf`, as processes started with
    /// [`Namespace::command`] see it.
    pub fn set_resolv_conf(&self, text: &str) -> Result<()> {
        let dir = PathBuf::from(format!("/etc/netns/{}", self.name));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        std::fs::write(dir.join("resolv.conf"), text).context("writing resolv.conf")
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        ip_quiet(&["netns", "del", &self.name]);
        let _ = std::fs::remove_dir_all(format!("/etc/netns/{}", self.name));
    }
}
