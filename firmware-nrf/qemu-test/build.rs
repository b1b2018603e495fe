//! Puts this test's own `memory.x` (QEMU mps2-an386, nRF52832-sized) on the linker
//! search path and links with cortex-m-rt's `link.x`; makes the firmware update's test
//! images: a 10,000-byte image signed with the vendor's test key, as `tether admin
//! sign-firmware` signs (Ed25519 over its SHA-512), and the same image signed with another
//! key (a forgery).

use std::env;
use std::fs;
use std::path::PathBuf;

use ed25519_dalek::{Signer, SigningKey};
use sha2::{Digest, Sha256, Sha512};

/// The vendor's test key (a fixed seed: the test is reproducible).
const VENDOR_SEED: [u8; 32] = [0x7e; 32];
/// Someone else's key.
const OTHER_SEED: [u8; 32] = [0x42; 32];
const IMAGE_LEN: usize = 10_000;

fn main() {
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    fs::write(out.join("memory.x"), include_bytes!("memory.x")).expect("write memory.x");
    println!("cargo:rustc-link-search={}", out.display());
    println!("cargo:rerun-if-changed=memory.x");
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rustc-link-arg-bins=--nmagic");
    println!("cargo:rustc-link-arg-bins=-Tlink.x");

    // Bytes no page of which repeats (a swap that mixed pages up would show).
    let mut x: u32 = 0x1234_5678;
    let image: Vec<u8> = (0..IMAGE_LEN)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect();
    let digest = Sha512::digest(&image);
    let vendor = SigningKey::from_bytes(&VENDOR_SEED);
    let other = SigningKey::from_bytes(&OTHER_SEED);
    fs::write(out.join("image.bin"), &image).expect("write image");
    fs::write(out.join("image.sha256"), Sha256::digest(&image)).expect("write sha256");
    fs::write(out.join("image.sig"), vendor.sign(&digest).to_bytes()).expect("write sig");
    fs::write(out.join("image.forged"), other.sign(&digest).to_bytes()).expect("write forged");
    fs::write(out.join("vendor.pub"), vendor.verifying_key().to_bytes()).expect("write key");
}
