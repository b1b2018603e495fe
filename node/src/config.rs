//! Command line, environment (`TETHER_*`) and config file, merged in that order of
//! precedence over built-in defaults.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use serde::Deserialize;

use crate::error::{NodeError, Result};
use crate::registration::RegistrationConfig;

/// Tether: keeps devices and apps in sync through the cloud.
#[derive(Debug, Parser)]
#[command(name = "tether", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Sub-commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a node.
    Serve(ServeArgs),
}

/// `tether serve` flags; each has a `TETHER_*` environment override and a config-file key.
#[derive(Debug, Args, Default)]
pub struct ServeArgs {
    /// Device API address [default: 127.0.0.1:8080]. Plain HTTP only on loopback.
    #[arg(long, env = "TETHER_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Where the embedded store keeps its file [default: ./tether-data].
    #[arg(long, env = "TETHER_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// TOML config file (device types, tiers, software updates, and any flag's key).
    #[arg(long, env = "TETHER_CONFIG")]
    pub config: Option<PathBuf>,
    /// URL devices are told to sync with [default: http://<listen address>].
    #[arg(long, env = "TETHER_PUBLIC_URL")]
    pub public_url: Option<String>,
    /// This node's name (lease owner) [default: tether-1].
    #[arg(long, env = "TETHER_NODE_ID")]
    pub node_id: Option<String>,
    /// Largest bucket, and largest request body beyond a small envelope [default: 65536].
    #[arg(long, env = "TETHER_MAX_BUCKET_BYTES")]
    pub max_bucket_bytes: Option<usize>,
    /// Subscribe hold time when the client names none [default: 900000 = 15 min].
    #[arg(long, env = "TETHER_SUBSCRIBE_DEFAULT_TIMEOUT_MS")]
    pub subscribe_default_timeout_ms: Option<u64>,
    /// Longest subscribe hold time [default: 5400000 = 90 min].
    #[arg(long, env = "TETHER_SUBSCRIBE_MAX_TIMEOUT_MS")]
    pub subscribe_max_timeout_ms: Option<u64>,
    /// Idle bucket set actors stop after this [default: 60000].
    #[arg(long, env = "TETHER_PASSIVATE_AFTER_MS")]
    pub passivate_after_ms: Option<u64>,
    /// HTTP worker threads [default: number of CPUs].
    #[arg(long, env = "TETHER_HTTP_WORKERS")]
    pub http_workers: Option<usize>,
    /// Threads hosting bucket set actors [default: number of CPUs].
    #[arg(long, env = "TETHER_ACTOR_THREADS")]
    pub actor_threads: Option<usize>,
    /// Log as JSON lines instead of text.
    #[arg(long, env = "TETHER_LOG_JSON")]
    pub log_json: bool,
}

/// The config file: every flag by its snake_case name, plus registration sections.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    listen: Option<SocketAddr>,
    data_dir: Option<PathBuf>,
    public_url: Option<String>,
    node_id: Option<String>,
    max_bucket_bytes: Option<usize>,
    subscribe_default_timeout_ms: Option<u64>,
    subscribe_max_timeout_ms: Option<u64>,
    passivate_after_ms: Option<u64>,
    http_workers: Option<usize>,
    actor_threads: Option<usize>,
    tier: Option<String>,
    #[serde(default)]
    device_types: std::collections::BTreeMap<String, crate::registration::DeviceType>,
    #[serde(default)]
    tier_rules: Vec<crate::registration::TierRule>,
    #[serde(default)]
    software_updates: Vec<crate::registration::SoftwareOffer>,
}

/// The node's effective settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// Device API address.
    pub listen: SocketAddr,
    /// Embedded store directory.
    pub data_dir: PathBuf,
    /// Sync URL given to devices; `None` → derived from the bound address.
    pub public_url: Option<String>,
    /// Lease owner name.
    pub node_id: String,
    /// Bucket size limit in bytes (JSON encoding of its value).
    pub max_bucket_bytes: usize,
    /// Default subscribe hold.
    pub subscribe_default_timeout: Duration,
    /// Maximum subscribe hold.
    pub subscribe_max_timeout: Duration,
    /// Actor idle time before passivation.
    pub passivate_after: Duration,
    /// HTTP workers.
    pub http_workers: usize,
    /// Actor threads.
    pub actor_threads: usize,
    /// JSON logs.
    pub log_json: bool,
    /// Registration rules.
    pub registration: RegistrationConfig,
}

impl Config {
    /// Merges flags/env over the config file over defaults, and validates the result.
    pub fn load(args: ServeArgs) -> Result<Config> {
        let file: FileConfig = match &args.config {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    NodeError::Config(format!("reading config {}: {e}", path.display()))
                })?;
                toml::from_str(&text)
                    .map_err(|e| NodeError::Config(format!("config {}: {e}", path.display())))?
            }
            None => FileConfig::default(),
        };
        let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
        let default_listen = SocketAddr::from(([127, 0, 0, 1], 8080));
        let registration = RegistrationConfig {
            tier: file.tier.unwrap_or_else(|| "production".into()),
            device_types: file.device_types,
            tier_rules: file.tier_rules,
            software_updates: file.software_updates,
        }
        .with_builtins();
        registration.validate()?;
        let config = Config {
            listen: args.listen.or(file.listen).unwrap_or(default_listen),
            data_dir: args
                .data_dir
                .or(file.data_dir)
                .unwrap_or_else(|| PathBuf::from("./tether-data")),
            public_url: args.public_url.or(file.public_url),
            node_id: args
                .node_id
                .or(file.node_id)
                .unwrap_or_else(|| "tether-1".into()),
            max_bucket_bytes: args
                .max_bucket_bytes
                .or(file.max_bucket_bytes)
                .unwrap_or(64 * 1024),
            subscribe_default_timeout: Duration::from_millis(
                args.subscribe_default_timeout_ms
                    .or(file.subscribe_default_timeout_ms)
                    .unwrap_or(15 * 60 * 1000),
            ),
            subscribe_max_timeout: Duration::from_millis(
                args.subscribe_max_timeout_ms
                    .or(file.subscribe_max_timeout_ms)
                    .unwrap_or(90 * 60 * 1000),
            ),
            passivate_after: Duration::from_millis(
                args.passivate_after_ms
                    .or(file.passivate_after_ms)
                    .unwrap_or(60_000),
            ),
            http_workers: args
                .http_workers
                .or(file.http_workers)
                .unwrap_or(cpus)
                .max(1),
            actor_threads: args
                .actor_threads
                .or(file.actor_threads)
                .unwrap_or(cpus)
                .max(1),
            log_json: args.log_json,
            registration,
        };
        config.check_transport()?;
        Ok(config)
    }

    /// Plain HTTP is only for loopback: device credentials must never cross a network in
    /// clear text.
    fn check_transport(&self) -> Result<()> {
        if !self.listen.ip().is_loopback() {
            return Err(NodeError::Config(format!(
                "refusing to serve plain HTTP on non-loopback address {}: devices send credentials, so \
                 only loopback may be unencrypted. Listen on 127.0.0.1 (behind a TLS-terminating load \
                 balancer) until TLS (--tls-cert/--tls-key) lands with the credentials issue",
                self.listen
            )));
        }
        if self.max_bucket_bytes == 0 {
            return Err(NodeError::Config(
                "max_bucket_bytes must be positive".into(),
            ));
        }
        if self.subscribe_default_timeout > self.subscribe_max_timeout {
            return Err(NodeError::Config(
                "subscribe default timeout exceeds the maximum".into(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_loopback_plain_http_is_refused_with_a_clear_message() {
        let args = ServeArgs {
            listen: Some("0.0.0.0:8080".parse().expect("addr")),
            ..Default::default()
        };
        let err = Config::load(args).expect_err("must refuse");
        assert!(err.to_string().contains("non-loopback"), "{err}");
    }

    #[test]
    fn flags_override_file_which_overrides_defaults() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("t.toml");
        std::fs::write(&path, "max_bucket_bytes = 100\nnode_id = \"from-file\"\n").expect("write");
        let args = ServeArgs {
            config: Some(path),
            node_id: Some("from-flag".into()),
            ..Default::default()
        };
        let c = Config::load(args).expect("loads");
        assert_eq!(c.node_id, "from-flag");
        assert_eq!(c.max_bucket_bytes, 100);
        assert_eq!(c.listen, SocketAddr::from(([127, 0, 0, 1], 8080)));
        assert!(c.registration.device_types.contains_key("thermostat"));
    }

    #[test]
    fn unknown_config_keys_are_errors_not_silently_ignored() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("t.toml");
        std::fs::write(&path, "max_bucket_byte = 100\n").expect("write");
        let args = ServeArgs {
            config: Some(path),
            ..Default::default()
        };
        assert!(Config::load(args).is_err());
    }
}
