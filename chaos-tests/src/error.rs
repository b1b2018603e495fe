//! The one error type of the chaos runner.

/// What can stop a chaos run before it has a verdict.
#[derive(Debug, thiserror::Error)]
pub enum ChaosError {
    /// A tool or package the run needs is missing (never a skip).
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
    /// A command line the runner did not understand.
    #[error("{0}")]
    Usage(String),
    /// Reading or writing the run's files.
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
