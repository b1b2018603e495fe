//! Security: who a request comes from (`auth`), the credential rules behind it
//! (`credentials`), the bounded tables behind every per-client limit (`limits`), TLS on
//! the external port (`tls`), mTLS between nodes (`cluster_tls`), and certificate files
//! reloaded when they change (`reload`).

pub mod auth;
pub mod cluster_tls;
pub mod credentials;
pub mod limits;
pub mod reload;
pub mod tls;
