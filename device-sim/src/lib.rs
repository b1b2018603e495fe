//! Simulated Tether device fleets and the benchmarks built on them.
//!
//! - [`fleet`] runs N simulated devices, each driving [`tether_proto::client::DeviceClient`]
//!   (the same sans-IO state machine the firmware runs) over real HTTP ([`wire`]), plus
//!   the clients that write to their buckets: companions (a second client of the device,
//!   on its assigned credentials) and apps (users, paired through pairing codes).
//! - [`checker`] is what makes the fleet a test: versions never go backwards on a device,
//!   and every write another client made to a device's bucket reaches that device before a
//!   deadline.
//! - [`report`] is the summary (human or JSON) and [`keys`] reads the credentials files.
//! - [`bench`] holds the benchmark harness behind `tether-bench`.

pub mod bench;
pub mod checker;
pub mod fleet;
pub mod keys;
pub mod report;
pub mod wire;

pub use tether_proto::client;
