//! The board-independent half of the Tether firmware.
//!
//! The nRF52 application (`firmware-nrf/src`) is a thin embassy driver around
//! `tether_proto::client::DeviceClient`; everything it decides that is not about a
//! peripheral lives here, so the QEMU test (`firmware-nrf/qemu-test`) runs exactly the
//! code the device runs:
//! - [`http`]: how a polled request becomes an HTTP call with a protobuf body, and how an
//!   HTTP answer becomes a `client::Response`;
//! - [`lane`]: the single HTTP connection both request slots share (RAM allows one TLS
//!   session), PUT first, a held subscribe hung up to make room;
//! - [`record`]: the flash records that let a reboot resume with known versions and its
//!   assigned credentials;
//! - [`store`]: those records in sequential-storage on NOR flash;
//! - [`thermostat`]: what the device does with its buckets;
//! - [`dfu`]: a firmware update's ranges stored in the update partition, the image checked
//!   (SHA-256, Ed25519) and marked for the swap, through embassy-boot;
//! - [`app`]: all of the above around `DeviceClient`, as one sans-IO loop.
#![no_std]

extern crate alloc;

pub mod app;
pub mod dfu;
pub mod http;
pub mod lane;
pub mod record;
pub mod store;
pub mod thermostat;
