//! Security: who a request comes from (`auth`), the credential rules behind it
//! (`credentials`), what it may touch (`scope`, the cached pairings), the bounded tables behind every per-client limit (`limits`), TLS on
//! the external port (`tls`), mTLS between nodes (`cluster_tls`), and configuration
//! rebuilt when its files change (`reload`, used by `tls` and `cluster_tls`).

pub mod auth;
pub mod cluster_tls;
pub mod credentials;
pub mod limits;
pub mod reload;
pub mod scope;
pub mod tls;
