//! The bootloader: at every reset, embassy-boot looks at the state partition. If the
//! application marked a checked image (`tether_device::dfu::check_and_mark`), it swaps the
//! DFU and active partitions page by page (power-fail safe: progress is kept in the state
//! partition); if the previous swap's image never confirmed itself (`mark_booted`, which
//! the application calls once it has registered), it swaps back. Then it jumps to the
//! active partition. Flashed once, at 0x0 (`memory/nrf52840.x`); the application then
//! goes at 0x7000.
#![no_std]
#![no_main]

use core::cell::RefCell;

use cortex_m_rt::{entry, exception};
use embassy_boot_nrf::{BootLoader, BootLoaderConfig};
use embassy_nrf::nvmc::Nvmc;
use embassy_sync::blocking_mutex::Mutex;

#[entry]
fn main() -> ! {
    let p = embassy_nrf::init(Default::default());
    // No watchdog: the application does not feed one.
    let flash = Mutex::new(RefCell::new(Nvmc::new(p.NVMC)));
    let config = BootLoaderConfig::from_linkerfile_blocking(&flash, &flash, &flash);
    let active_offset = config.active.offset();
    let loader: BootLoader = BootLoader::prepare(config);
    // SAFETY: the active partition holds an application linked for this offset
    // (`memory/nrf52840.x` FLASH), swapped in whole or not at all.
    unsafe { loader.load(active_offset) }
}

/// A fault in the bootloader: reset and try again (a swap resumes from its progress).
#[unsafe(no_mangle)]
#[cfg_attr(target_os = "none", unsafe(link_section = ".HardFault.user"))]
unsafe extern "C" fn HardFault() {
    cortex_m::peripheral::SCB::sys_reset();
}

#[exception]
unsafe fn DefaultHandler(_: i16) -> ! {
    cortex_m::peripheral::SCB::sys_reset();
}

#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    cortex_m::peripheral::SCB::sys_reset();
}
