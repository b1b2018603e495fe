//! The device API layer: actix-web handlers of API.md and their wire formats.
//!
//! Handlers authenticate (`crate::security`), then hand every set operation to the
//! `crate::routing::Router`; nothing here touches an actor directly. Blobs (`blobs`) are
//! the one exception to going through a set: they belong to no bucket set, so any node
//! reads and writes them in the shared store through `crate::store::blobs::Blobs`.
//! `conn` is the connection below HTTP (per-source limits, JSON bodies for the errors the
//! HTTP layer sends itself); `held` counts each principal's held subscriptions; `stream`
//! is the streaming subscribe, a loop around the long-poll path.

pub mod blobs;
pub mod conn;
pub mod held;
pub mod http;
pub mod openapi;
pub mod stream;
