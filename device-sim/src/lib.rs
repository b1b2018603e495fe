//! Simulated device fleets. The simulator drives [`tether_proto::client::DeviceClient`],
//! the same sans-IO state machine the firmware runs, over real HTTP; see the device-sim
//! issue for the fleet runner and benchmarks that build on it.

pub use tether_proto::client;
