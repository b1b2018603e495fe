//! Build-time configuration: set the environment variables when building
//! (`TETHER_URL=https://… TETHER_SERIAL=… cargo run --release --features tls`); the
//! defaults below are for a development node on the USB gateway host.
//!
//! The default credentials' secret is per device and would come from the production
//! line's provisioning; until then it is given here (`tether admin default-credentials
//! <serial> --key-id <key_id> --mfg-key-file <path>` prints it).

/// Picks an environment variable given at build time, or a default.
macro_rules! build_env {
    ($name:literal, $default:expr) => {
        match option_env!($name) {
            Some(v) => v,
            None => $default,
        }
    };
}

/// The registration server (`http://` or, with the `tls` feature, `https://`).
/// 10.42.0.1 is the host end of the USB Ethernet link when the host shares its connection
/// (NetworkManager's "shared to other computers" gives the device 10.42.0.x by DHCP).
pub const REGISTER_URL: &str = build_env!("TETHER_URL", "http://10.42.0.1:8080");
/// The device serial (`device_id`), the `<serial>` of its bucket ids.
pub const SERIAL: &str = build_env!("TETHER_SERIAL", "01AA02AB");
/// The manufacturing key id of the default credentials `d.<serial>.<key_id>`.
pub const KEY_ID: &str = build_env!("TETHER_KEY_ID", "k1");
/// The default credentials' secret (`d.` + 43 URL64 chars).
pub const DEFAULT_SECRET: &str = build_env!(
    "TETHER_DEFAULT_SECRET",
    "d.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
);
/// This firmware's version, as registration and `device.<serial>.sw_version` report it.
pub const SW_VERSION: &str = env!("CARGO_PKG_VERSION");
/// How long the server holds a subscribe; NAT gateways keep idle TCP flows for minutes.
pub const SUBSCRIBE_TIMEOUT_MS: u64 = 120_000;
/// First retry delay after a failed exchange.
pub const BACKOFF_INITIAL_MS: u64 = 1_000;
/// Longest retry delay.
pub const BACKOFF_MAX_MS: u64 = 60_000;
/// Longest retry delay after the server rejected the default credentials.
pub const AUTH_BACKOFF_MAX_MS: u64 = 3_600_000;
/// How often the TEMP peripheral is read.
pub const MEASURE_INTERVAL_S: u64 = 10;

/// The firmware key's public half (`TETHER_FIRMWARE_KEY=<64 hex digits>` at build time,
/// what `tether admin firmware-key generate` prints): only images it signed are installed.
/// None: this build takes no updates.
pub const FIRMWARE_KEY: Option<[u8; 32]> = {
    const BYTES: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/firmware_key.bin"));
    if BYTES.len() == 32 {
        let mut key = [0u8; 32];
        let mut i = 0;
        while i < 32 {
            key[i] = BYTES[i];
            i += 1;
        }
        Some(key)
    } else {
        None
    }
};

/// The CA certificate (DER) that signs the server's certificate, from
/// `TETHER_CA_DER=<path>` at build time; empty when none was given.
#[cfg_attr(not(feature = "tls"), allow(dead_code))]
pub const CA_DER: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/ca.der"));

/// `TETHER_TLS_INSECURE=1` at build time: accept any server certificate (a development
/// node with a self-signed certificate and no CA at hand). Never for production.
#[cfg_attr(not(feature = "tls"), allow(dead_code))]
pub fn tls_insecure() -> bool {
    matches!(option_env!("TETHER_TLS_INSECURE"), Some("1"))
}
