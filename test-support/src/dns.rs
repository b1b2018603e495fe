//! A DNS server for tests: dnsmasq (Debian `dnsmasq-base`) in a network namespace of
//! its own, answering A records from a hosts file the test rewrites at will
//! ([`Dns::set`]; dnsmasq re-reads it on SIGHUP), NXDOMAIN for any other name under the
//! given domains, with TTL 0 so no resolver caches an answer. Stands in for a cluster's
//! DNS (a Kubernetes headless Service resolving to its pods, each pod's own name).
//!
//! Killed when dropped. A missing dnsmasq is an error naming the package.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::netns::Namespace;

/// The dnsmasq binary.
pub const DNSMASQ: &str = "/usr/sbin/dnsmasq";

/// A running dnsmasq and its records.
#[derive(Debug)]
pub struct Dns {
    child: tokio::process::Child,
    hosts: PathBuf,
    log: PathBuf,
    address: Ipv4Addr,
    records: BTreeMap<String, Vec<Ipv4Addr>>,
    _dir: tempfile::TempDir,
}

impl Dns {
    /// Starts dnsmasq inside `ns`, listening on its address, authoritative (NXDOMAIN) for
    /// `local_domains` (e.g. `cluster.local`).
    pub async fn start(ns: &Namespace, local_domains: &[&str]) -> Result<Dns> {
        if !Path::new(DNSMASQ).exists() {
            bail!(
                "{DNSMASQ} is missing: install the Debian package dnsmasq-base (scripts/test does)"
            );
        }
        let dir = tempfile::tempdir().context("dns tempdir")?;
        let hosts = dir.path().join("hosts");
        let log = dir.path().join("dnsmasq.log");
        std::fs::write(&hosts, "").context("writing the hosts file")?;
        let mut cmd = ns.command(DNSMASQ);
        cmd.arg("--keep-in-foreground")
            .arg("--conf-file=/dev/null")
            .arg("--no-resolv")
            .arg("--no-hosts")
            .arg(format!("--addn-hosts={}", hosts.display()))
            .arg(format!("--listen-address={}", ns.ip()))
            .arg("--bind-interfaces")
            .arg("--port=53")
            .arg("--user=root")
            .arg("--pid-file=")
            .arg("--cache-size=0")
            .arg("--no-negcache")
            .arg("--local-ttl=0")
            .arg(format!("--log-facility={}", log.display()));
        for d in local_domains {
            cmd.arg(format!("--local=/{d}/"));
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("spawning dnsmasq")?;
        let mut dns = Dns {
            child,
            hosts,
            log,
            address: ns.ip(),
            records: BTreeMap::new(),
            _dir: dir,
        };
        // Ready once it answers on port 53 (TCP; dnsmasq serves both).
        let until = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = dns.child.try_wait().context("dnsmasq status")? {
                let mut err = String::new();
                if let Some(mut e) = dns.child.stderr.take() {
                    use tokio::io::AsyncReadExt;
                    let _ = e.read_to_string(&mut err).await;
                }
                bail!("dnsmasq exited ({status}): {err}");
            }
            if tokio::net::TcpStream::connect((dns.address, 53))
                .await
                .is_ok()
            {
                return Ok(dns);
            }
            if tokio::time::Instant::now() > until {
                bail!("dnsmasq did not listen on {}:53 within 10 s", dns.address);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The server's address (the `nameserver` of a resolv.conf).
    pub fn address(&self) -> Ipv4Addr {
        self.address
    }

    /// The current records: name → addresses.
    pub fn records(&self) -> &BTreeMap<String, Vec<Ipv4Addr>> {
        &self.records
    }

    /// Replaces every record and has dnsmasq re-read them (SIGHUP); a name mapped to no
    /// address disappears (NXDOMAIN).
    pub fn set(&mut self, records: BTreeMap<String, Vec<Ipv4Addr>>) -> Result<()> {
        let mut text = String::new();
        for (name, addrs) in &records {
            for a in addrs {
                text.push_str(&format!("{a} {name}\n"));
            }
        }
        let tmp = self.hosts.with_extension("tmp");
        std::fs::write(&tmp, text).context("writing the hosts file")?;
        std::fs::rename(&tmp, &self.hosts).context("replacing the hosts file")?;
        self.records = records;
        let pid = self.child.id().context("dnsmasq has exited")?;
        let st = std::process::Command::new("kill")
            .args(["-HUP", &pid.to_string()])
            .status()
            .context("kill -HUP dnsmasq")?;
        if !st.success() {
            bail!("kill -HUP dnsmasq failed");
        }
        Ok(())
    }

    /// What dnsmasq logged (for failure reports).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// A kubelet-style resolv.conf pointing at this server: `search` domains first (as a
    /// pod in `namespace` gets them), `ndots:5`.
    pub fn resolv_conf(&self, search: &[String]) -> String {
        format!(
            "nameserver {}\nsearch {}\noptions ndots:5 timeout:1 attempts:2\n",
            self.address,
            search.join(" ")
        )
    }
}
