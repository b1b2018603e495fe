//! One Tether node: the bucket set actors, the device API and the stores.
//!
//! See ARCHITECTURE.md for the code map and the invariants each module keeps.

pub mod actor;
pub mod admin;
pub mod auth;
pub mod cluster;
pub mod config;
pub mod credentials;
pub mod error;
pub mod forward;
pub mod http;
pub mod metrics;
pub mod registration;
pub mod registry;
pub mod router;
pub mod server;
pub mod store;
pub mod tls;
