//! The bootloader's `memory.x`, made from the application's layout
//! (`../memory/nrf52840.x`) so the two cannot disagree: the bootloader runs from the
//! application's BOOTLOADER region and sees the application's FLASH as its ACTIVE
//! partition.

use std::env;
use std::fs;
use std::path::PathBuf;

fn main() {
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let app = include_str!("../memory/nrf52840.x");
    let mut memory = String::new();
    for line in app.lines() {
        let trimmed = line.trim_start();
        let line = if trimmed.starts_with("FLASH ") {
            line.replacen("FLASH ", "ACTIVE", 1)
        } else if trimmed.starts_with("BOOTLOADER ") {
            line.replacen("BOOTLOADER ", "FLASH      ", 1)
        } else {
            line.to_string()
        };
        memory.push_str(&line);
        memory.push('\n');
    }
    memory.push_str(
        "__bootloader_active_start = ORIGIN(ACTIVE);\n\
         __bootloader_active_end = ORIGIN(ACTIVE) + LENGTH(ACTIVE);\n",
    );
    assert!(
        memory.contains("ACTIVE") && memory.contains("  FLASH      "),
        "memory/nrf52840.x must name BOOTLOADER and FLASH regions"
    );
    fs::write(out.join("memory.x"), memory).expect("write memory.x");
    println!("cargo:rustc-link-search={}", out.display());
    println!("cargo:rerun-if-changed=../memory/nrf52840.x");
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rustc-link-arg-bins=--nmagic");
    println!("cargo:rustc-link-arg-bins=-Tlink.x");
}
