//! Security: who a request comes from (`auth`), the credential rules behind it
//! (`credentials`), TLS on the external port (`tls`), and configuration rebuilt when its
//! files change (`reload`, used by `tls`).

pub mod auth;
pub mod credentials;
pub mod reload;
pub mod tls;
