//! One Tether node: the bucket set actors, the device API and the stores.
//!
//! Modules by layer (ARCHITECTURE.md has the code map and the invariants each keeps):
//! `api` (HTTP handlers) → `security` (authentication, credentials, TLS) → `routing`
//! (owner lookup, forwarding, cluster membership) → `sets` (bucket set actors) → `store`.

pub mod admin;
pub mod api;
pub mod check;
pub mod config;
pub mod error;
pub mod heap_profile;
pub mod metrics;
#[cfg(any(
    feature = "planted-ack-before-durable",
    feature = "planted-skip-epoch-check",
    feature = "planted-stale-reads",
    feature = "planted-drop-notification"
))]
pub mod planted;
pub mod push;
pub mod registration;
pub mod routing;
pub mod security;
pub mod server;
pub mod sets;
pub mod store;
pub mod telemetry;
