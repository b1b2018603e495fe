//! A private, throw-away PostgreSQL server for tests and local multi-node runs: its own
//! data directory and port, run as a non-root user, stopped and deleted on drop.
//!
//! Finds the server binaries in `$TETHER_PG_BIN` or the newest `/usr/lib/postgresql/*/bin`.
//! When running as root (CI), the cluster is initialised and started as the `postgres`
//! user through `runuser`, since PostgreSQL refuses to run as root. Missing binaries are
//! an error, never a silent skip.
//!
//! [`PgServer::start_with`] can run it inside a network namespace (`ip netns exec`), on
//! a given address and port, with password authentication for TCP clients (the superuser
//! `tether` gets the password; local socket connections stay trusted).

use std::net::{IpAddr, Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use super::StoreError;

fn fail(what: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(format!("test PostgreSQL: {what}"))
}

fn bin_dir() -> Result<PathBuf, StoreError> {
    if let Ok(dir) = std::env::var("TETHER_PG_BIN") {
        return Ok(PathBuf::from(dir));
    }
    let mut dirs: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .map_err(|e| {
            fail(format!(
                "no /usr/lib/postgresql ({e}); install postgresql or set TETHER_PG_BIN"
            ))
        })?
        .filter_map(|e| e.ok())
        .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path().join("bin"))))
        .filter(|(_, p)| p.join("postgres").exists())
        .collect();
    dirs.sort();
    dirs.pop()
        .map(|(_, p)| p)
        .ok_or_else(|| fail("no PostgreSQL server binaries under /usr/lib/postgresql"))
}

fn is_root() -> bool {
    std::fs::metadata("/proc/self")
        .map(|m| {
            use std::os::unix::fs::MetadataExt;
            m.uid() == 0
        })
        .unwrap_or(false)
}

/// Where and how a [`PgServer`] runs.
#[derive(Debug, Clone)]
pub struct PgOptions {
    /// A network namespace to run in (`ip netns exec`); `None`: this one.
    pub netns: Option<String>,
    /// The address it listens on.
    pub listen: IpAddr,
    /// Its port; `None`: a free one.
    pub port: Option<u16>,
    /// Password of the `tether` superuser, required from TCP clients (scram-sha-256);
    /// `None`: every connection is trusted.
    pub password: Option<String>,
    /// Where its directory is made (e.g. a small tmpfs for disk-full tests); `None`: the
    /// system temporary directory.
    pub base_dir: Option<PathBuf>,
    /// Extra server settings (`-c name=value`), applied at every start.
    pub settings: Vec<(String, String)>,
}

impl Default for PgOptions {
    fn default() -> Self {
        PgOptions {
            netns: None,
            listen: IpAddr::V4(Ipv4Addr::LOCALHOST),
            port: None,
            password: None,
            base_dir: None,
            settings: Vec::new(),
        }
    }
}

/// A running private PostgreSQL server.
#[derive(Debug)]
pub struct PgServer {
    dir: PathBuf,
    bin: PathBuf,
    as_postgres: bool,
    port: u16,
    options: PgOptions,
}

impl PgServer {
    /// Initialises a cluster in a fresh directory and starts it on a free loopback port.
    pub fn start() -> Result<Self, StoreError> {
        Self::start_with(PgOptions::default())
    }

    /// Initialises a cluster in a fresh directory and starts it as `options` say.
    pub fn start_with(options: PgOptions) -> Result<Self, StoreError> {
        let server = Self::prepare(options)?;
        let data = server.data();
        let mut initdb = vec!["-D", &data, "-U", "tether", "-E", "UTF8", "--no-sync"];
        let pwfile = server.dir.join("pwfile").display().to_string();
        match &server.options.password {
            Some(pw) => {
                std::fs::write(&pwfile, format!("{pw}\n")).map_err(fail)?;
                server.chown(&pwfile)?;
                initdb.extend(["--auth-local=trust", "--auth-host=scram-sha-256"]);
                initdb.push("--pwfile");
                initdb.push(&pwfile);
            }
            None => initdb.push("--auth=trust"),
        }
        server.run("initdb", &initdb)?;
        let _ = std::fs::remove_file(&pwfile);
        if !server.options.listen.is_loopback() {
            // initdb admits loopback clients only; this server is for other hosts.
            let method = if server.options.password.is_some() {
                "scram-sha-256"
            } else {
                "trust"
            };
            let hba = server.dir.join("data").join("pg_hba.conf");
            let mut text = std::fs::read_to_string(&hba).map_err(fail)?;
            // Streaming standbys (`standby_of`) connect from other hosts too.
            text.push_str(&format!(
                "host all all 0.0.0.0/0 {method}\nhost replication all 0.0.0.0/0 {method}\n"
            ));
            std::fs::write(&hba, text).map_err(fail)?;
        }
        server.start_again()?;
        Ok(server)
    }

    /// A fresh directory (owned by `postgres` when running as root) and a port.
    fn prepare(options: PgOptions) -> Result<Self, StoreError> {
        let bin = bin_dir()?;
        let as_postgres = is_root();
        let base = options.base_dir.clone().unwrap_or_else(std::env::temp_dir);
        let dir = base.join(format!(
            "tether-pg-{}-{}",
            std::process::id(),
            rand_suffix()
        ));
        std::fs::create_dir_all(&dir).map_err(fail)?;
        if as_postgres {
            let status = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&dir)
                .status()
                .map_err(fail)?;
            if !status.success() {
                return Err(fail("chown of the data directory failed"));
            }
        }
        let port = match options.port {
            Some(p) => p,
            None => TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .map_err(fail)?
                .port(),
        };
        Ok(PgServer {
            dir,
            bin,
            as_postgres,
            port,
            options,
        })
    }

    /// A streaming standby of `primary` (`pg_basebackup -R`: it follows the primary's WAL
    /// and is read-only until [`PgServer::promote`]), started as `options` say. The
    /// primary decides whether commits wait for it (`synchronous_standby_names`).
    pub fn standby_of(primary: &PgServer, options: PgOptions) -> Result<Self, StoreError> {
        let server = Self::prepare(options)?;
        let data = server.data();
        let port = primary.port.to_string();
        let host = primary.options.listen.to_string();
        server.run(
            "pg_basebackup",
            &[
                "-h", &host, "-p", &port, "-U", "tether", "-D", &data, "-R", "-X", "stream", "-c",
                "fast",
            ],
        )?;
        server.start_again()?;
        Ok(server)
    }

    /// The `pg_ctl start` options: the same at every start.
    fn start_opts(&self) -> String {
        let mut opts = format!(
            "-p {} -k {} -c listen_addresses={} -c fsync=on -c max_connections=200",
            self.port,
            self.dir.display(),
            self.options.listen
        );
        for (name, value) in &self.options.settings {
            opts.push_str(&format!(" -c {name}={value}"));
        }
        opts
    }

    /// Starts the server on its data directory (after [`PgServer::stop_immediate`], or
    /// after it shut itself down) and waits until it accepts connections.
    pub fn start_again(&self) -> Result<(), StoreError> {
        let opts = self.start_opts();
        self.run(
            "pg_ctl",
            &[
                "-D",
                &self.data(),
                "-o",
                &opts,
                "-l",
                &self.log(),
                "-w",
                "-t",
                "60",
                "start",
            ],
        )?;
        self.wait_ready()
    }

    /// Stops the server as a crash would (`pg_ctl stop -m immediate`: no checkpoint,
    /// recovery at the next start).
    pub fn stop_immediate(&self) -> Result<(), StoreError> {
        self.run(
            "pg_ctl",
            &["-D", &self.data(), "-m", "immediate", "-w", "stop"],
        )
    }

    /// Whether the postmaster runs (`pg_ctl status`).
    pub fn is_running(&self) -> bool {
        self.run("pg_ctl", &["-D", &self.data(), "status"]).is_ok()
    }

    /// Promotes a standby to a primary (`pg_ctl promote`, waiting until it accepts
    /// writes).
    pub fn promote(&self) -> Result<(), StoreError> {
        self.run("pg_ctl", &["-D", &self.data(), "-w", "-t", "60", "promote"])
    }

    /// Runs `sql` as the superuser through the local socket; its output (`psql -XAt`).
    pub fn psql(&self, sql: &str) -> Result<String, StoreError> {
        self.psql_in("postgres", sql)
    }

    /// [`Self::psql`] in database `database`.
    pub fn psql_in(&self, database: &str, sql: &str) -> Result<String, StoreError> {
        let out = Command::new(self.bin.join("psql"))
            .args(["-h", &self.dir.display().to_string()])
            .args(["-p", &self.port.to_string()])
            .args([
                "-U",
                "tether",
                "-d",
                database,
                "-XAt",
                "-v",
                "ON_ERROR_STOP=1",
            ])
            .args(["-c", sql])
            .output()
            .map_err(|e| fail(format!("psql: {e}")))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
        } else {
            Err(fail(format!(
                "psql -c {sql:?}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )))
        }
    }

    /// The address it listens on.
    pub fn listen(&self) -> IpAddr {
        self.options.listen
    }

    /// The server's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.log()).unwrap_or_default()
    }

    fn data(&self) -> String {
        self.dir.join("data").display().to_string()
    }

    fn log(&self) -> String {
        self.dir.join("server.log").display().to_string()
    }

    fn chown(&self, path: &str) -> Result<(), StoreError> {
        if self.as_postgres {
            let st = Command::new("chown")
                .args(["postgres:postgres", path])
                .status()
                .map_err(fail)?;
            if !st.success() {
                return Err(fail(format!("chown {path} failed")));
            }
        }
        Ok(())
    }

    fn run(&self, tool: &str, args: &[&str]) -> Result<(), StoreError> {
        let exe = self.bin.join(tool);
        let mut argv: Vec<std::ffi::OsString> = Vec::new();
        if let Some(ns) = &self.options.netns {
            argv.extend(["ip", "netns", "exec", ns].map(Into::into));
        }
        if self.as_postgres {
            argv.extend(["runuser", "-u", "postgres", "--"].map(Into::into));
        }
        argv.push(exe.clone().into());
        argv.extend(args.iter().map(Into::into));
        let output = Command::new(&argv[0])
            .args(&argv[1..])
            .output()
            .map_err(|e| fail(format!("running {}: {e}", exe.display())))?;
        if output.status.success() {
            Ok(())
        } else {
            Err(fail(format!(
                "{tool} failed: {}{}",
                String::from_utf8_lossy(&output.stderr),
                std::fs::read_to_string(self.log()).unwrap_or_default()
            )))
        }
    }

    fn wait_ready(&self) -> Result<(), StoreError> {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(30) {
            if std::net::TcpStream::connect((self.options.listen, self.port)).is_ok() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(fail("server did not accept connections within 30 s"))
    }

    /// The connection URL of a database on this server, created if needed (without the
    /// password, when there is one).
    pub fn url(&self, database: &str) -> Result<String, StoreError> {
        let port = self.port.to_string();
        // Through the local socket: trusted, and reachable from any network namespace.
        let socket_dir = self.dir.display().to_string();
        let exists_check = Command::new(self.bin.join("createdb"))
            .args(["-h", &socket_dir, "-p", &port, "-U", "tether", database])
            .output()
            .map_err(fail)?;
        if !exists_check.status.success()
            && !String::from_utf8_lossy(&exists_check.stderr).contains("already exists")
        {
            return Err(fail(format!(
                "createdb: {}",
                String::from_utf8_lossy(&exists_check.stderr)
            )));
        }
        Ok(format!(
            "postgres://tether@{}:{port}/{database}",
            self.options.listen
        ))
    }

    /// Stops the server immediately (as a crash would) and starts it again on the same
    /// port and data: for testing that committed data survives.
    pub fn restart(&self) -> Result<(), StoreError> {
        self.stop_immediate()?;
        self.start_again()
    }

    /// The data directory root (for logs on failure).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The postmaster's process id (the first line of `postmaster.pid`), while it runs;
    /// every backend is its child.
    pub fn postmaster_pid(&self) -> Option<u32> {
        let pidfile = std::fs::read_to_string(self.dir.join("data").join("postmaster.pid")).ok()?;
        pidfile.lines().next()?.trim().parse().ok()
    }
}

fn rand_suffix() -> u64 {
    use rand::RngCore;
    rand::rng().next_u64()
}

impl Drop for PgServer {
    fn drop(&mut self) {
        let _ = self.run(
            "pg_ctl",
            &["-D", &self.data(), "-m", "immediate", "-w", "stop"],
        );
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
