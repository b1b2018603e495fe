//! The crate's one error type.

use std::path::PathBuf;

/// What can go wrong in `tether-chaos` outside a scenario's own assertions.
#[derive(Debug, thiserror::Error)]
pub enum ChaosError {
    /// `history.jsonl` could not be read or a line did not parse (the message names it).
    #[error("history: {0}")]
    History(String),
    /// Writing the report failed.
    #[error("report in {path}: {source}")]
    Report {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A tool or package a run needs is missing (never a skip).
    #[error("missing {what}: install the Debian package `{package}`")]
    Missing { what: String, package: String },
    /// A capability probe failed without a fallback.
    #[error("capability probe {probe} failed: {detail}")]
    Probe { probe: String, detail: String },
    /// A fault could not be injected or healed.
    #[error("nemesis {kind} on {target}: {detail}")]
    Nemesis {
        kind: String,
        target: String,
        detail: String,
    },
    /// A command line the runner did not understand, or a scenario it cannot run.
    #[error("{0}")]
    Usage(String),
    /// Reading or writing a run's files.
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

impl ChaosError {
    /// An I/O error on `path`.
    pub fn io(path: &std::path::Path, source: std::io::Error) -> Self {
        ChaosError::Io {
            path: path.display().to_string(),
            source,
        }
    }
}
