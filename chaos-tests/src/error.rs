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
}
