//! The device API layer: actix-web handlers of API.md and their wire formats.
//!
//! Handlers authenticate (`crate::security`), then hand every set operation to the
//! `crate::routing::Router`; nothing here touches an actor or the store directly.

pub mod http;
pub mod openapi;
