//! Protobuf types generated at build time from `proto/tether/v1/device.proto` (protox +
//! prost; no system `protoc`). They use only `alloc`, so the firmware shares them.
#![allow(missing_docs, clippy::all, missing_debug_implementations)]

include!(concat!(env!("OUT_DIR"), "/tether.v1.rs"));
