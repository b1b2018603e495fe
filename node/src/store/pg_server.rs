//! A private, throw-away PostgreSQL server for tests and local multi-node runs: its own
//! data directory and port, run as a non-root user, stopped and deleted on drop.
//!
//! Finds the server binaries in `$TETHER_PG_BIN` or the newest `/usr/lib/postgresql/*/bin`.
//! When running as root (CI), the cluster is initialised and started as the `postgres`
//! user through `runuser`, since PostgreSQL refuses to run as root. Missing binaries are
//! an error, never a silent skip.

use std::net::TcpListener;
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

/// A running private PostgreSQL server.
#[derive(Debug)]
pub struct PgServer {
    dir: PathBuf,
    bin: PathBuf,
    as_postgres: bool,
    port: u16,
}

impl PgServer {
    /// Initialises a cluster in a fresh directory and starts it on a free loopback port.
    pub fn start() -> Result<Self, StoreError> {
        let bin = bin_dir()?;
        let as_postgres = is_root();
        let dir = std::env::temp_dir().join(format!(
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
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(fail)?
            .port();
        let server = PgServer {
            dir,
            bin,
            as_postgres,
            port,
        };
        server.run(
            "initdb",
            &[
                "-D",
                &server.data(),
                "-U",
                "tether",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
            ],
        )?;
        let opts = format!(
            "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=on -c max_connections=200",
            server.dir.display()
        );
        server.run(
            "pg_ctl",
            &[
                "-D",
                &server.data(),
                "-o",
                &opts,
                "-l",
                &server.log(),
                "-w",
                "-t",
                "60",
                "start",
            ],
        )?;
        server.wait_ready()?;
        Ok(server)
    }

    fn data(&self) -> String {
        self.dir.join("data").display().to_string()
    }

    fn log(&self) -> String {
        self.dir.join("server.log").display().to_string()
    }

    fn run(&self, tool: &str, args: &[&str]) -> Result<(), StoreError> {
        let exe = self.bin.join(tool);
        let output = if self.as_postgres {
            Command::new("runuser")
                .args(["-u", "postgres", "--"])
                .arg(&exe)
                .args(args)
                .output()
        } else {
            Command::new(&exe).args(args).output()
        }
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
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(fail("server did not accept connections within 30 s"))
    }

    /// The connection URL of a database on this server, created if needed.
    pub fn url(&self, database: &str) -> Result<String, StoreError> {
        let port = self.port.to_string();
        let exists_check = Command::new(self.bin.join("createdb"))
            .args(["-h", "127.0.0.1", "-p", &port, "-U", "tether", database])
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
        Ok(format!("postgres://tether@127.0.0.1:{port}/{database}"))
    }

    /// Stops the server immediately (as a crash would) and starts it again on the same
    /// port and data: for testing that committed data survives.
    pub fn restart(&self) -> Result<(), StoreError> {
        self.run(
            "pg_ctl",
            &["-D", &self.data(), "-m", "immediate", "-w", "stop"],
        )?;
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1",
            self.port,
            self.dir.display()
        );
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

    /// The data directory root (for logs on failure).
    pub fn dir(&self) -> &Path {
        &self.dir
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
