//! Tether firmware for the nRF52 (Cortex-M4F, `thumbv7em-none-eabihf`).
//!
//! For now a `no_std` library that proves the protocol core links on the target: the
//! device runs `tether_proto::client::DeviceClient`, the same sans-IO state machine the
//! simulator drives. The embassy application (USB CDC-NCM/W5500 networking, flash
//! storage, probe-rs runner) arrives with the firmware issue.
#![no_std]

pub use tether_proto::client::{ClientConfig, DeviceClient};
