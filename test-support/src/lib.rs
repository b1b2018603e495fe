//! The one test-support crate of the workspace: what the node's black-box tests, the
//! cluster and chaos harnesses and the simulator's tests share.
//!
//! - [`bin`]: the workspace's binaries, built with cargo and found by path (a test in another
//!   package has no `CARGO_BIN_EXE_<name>`);
//! - [`node`]: one real `tether` node as a child process on a free port, with its own data
//!   directory and manufacturing key, and the principals (devices, users) that talk to it;
//! - [`netns`]: hosts of their own for processes (network namespaces on a bridge, own
//!   address and resolver), and [`dns`]: a DNS server (dnsmasq) for them;
//! - [`otlp`]: an in-process OTLP trace receiver (gRPC and HTTP/protobuf) the trace tests
//!   and the tracing-overhead benchmark export to;
//! - [`pki`]: a cluster CA and node certificates for mTLS between test nodes;
//! - [`push`]: a push gateway receiving a node's signed wake-ups (the presence tests and
//!   the simulator's sleeping devices).

pub mod bin;
pub mod dns;
pub mod netns;
pub mod node;
pub mod otlp;
pub mod pki;
pub mod push;
