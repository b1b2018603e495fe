//! Security: who a request comes from (`auth`), the credential rules behind it
//! (`credentials`), and TLS on the external port (`tls`).

pub mod auth;
pub mod credentials;
pub mod tls;
