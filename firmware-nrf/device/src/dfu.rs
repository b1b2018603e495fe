//! The firmware update's flash half: storing downloaded ranges in the update (DFU)
//! partition and checking the image there before it is marked for the swap, through
//! embassy-boot's [`BlockingFirmwareUpdater`] (the NVMC is blocking: an async wrapper
//! around it would only cost flash) (its partition layout and swap; `firmware-nrf/README.md`
//! "Firmware updates"). Which ranges to fetch and when is [`App`](crate::app::App)'s
//! business (`tether_proto::dfu::Download`); the driver calls these with what it fetched.
//!
//! The same functions run on the device (the NVMC) and in the QEMU test (a RAM flash with
//! the NVMC's geometry), so the test checks the code the device runs.

use embassy_boot::{BlockingFirmwareUpdater, FirmwareUpdaterError};
use embedded_storage::nor_flash::NorFlash;
use tether_proto::dfu::{Chunk, Image};

/// Bytes asked for per range: one answer must fit the driver's 2 KiB receive buffer with
/// its status line and headers; a multiple of the flash's write size (4 bytes).
pub const CHUNK: u32 = 1024;

/// Why an image was not marked for the swap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// What the partition holds is not the offered image (its SHA-256 differs).
    HashMismatch,
    /// The signature does not verify with the firmware's key.
    BadSignature,
    /// The flash failed, or the bootloader state does not allow an update now.
    Flash,
}

impl Refused {
    /// Short name for logs.
    pub fn name(self) -> &'static str {
        match self {
            Refused::HashMismatch => "sha256 mismatch",
            Refused::BadSignature => "bad signature",
            Refused::Flash => "flash error",
        }
    }
}

/// Writes a downloaded range at its offset of the update partition (the partition's pages
/// are erased as the download reaches them). The image's last range is padded with the
/// erased value to the flash's write size.
pub fn store<DFU: NorFlash, STATE: NorFlash>(
    updater: &mut BlockingFirmwareUpdater<'_, DFU, STATE>,
    chunk: &Chunk<'_>,
) -> Result<(), FirmwareUpdaterError> {
    let offset = chunk.offset as usize;
    let whole = chunk.bytes.len() - chunk.bytes.len() % DFU::WRITE_SIZE;
    if whole > 0 {
        updater.write_firmware(offset, &chunk.bytes[..whole])?;
    }
    let tail = &chunk.bytes[whole..];
    if !tail.is_empty() {
        let mut padded = [0xFFu8; 16];
        let n = DFU::WRITE_SIZE.min(padded.len());
        padded[..tail.len()].copy_from_slice(tail);
        updater.write_firmware(offset + whole, &padded[..n])?;
    }
    Ok(())
}

/// Checks the image the partition now holds — its SHA-256 against the offer's, then the
/// offer's Ed25519 signature of its SHA-512 against `public_key` (embassy-boot reads the
/// partition back for both) — and marks it for the swap at the next boot.
pub fn check_and_mark<DFU: NorFlash, STATE: NorFlash>(
    updater: &mut BlockingFirmwareUpdater<'_, DFU, STATE>,
    image: &Image,
    public_key: &[u8; 32],
) -> Result<(), Refused> {
    let mut buf = [0u8; 64];
    let mut sha256 = [0u8; 32];
    updater
        .hash::<sha2::Sha256>(image.size, &mut buf, &mut sha256)
        .map_err(|_| Refused::Flash)?;
    if sha256 != image.sha256.0 {
        return Err(Refused::HashMismatch);
    }
    updater
        .verify_and_mark_updated(public_key, &image.signature, image.size)
        .map_err(|e| match e {
            FirmwareUpdaterError::Signature(_) => Refused::BadSignature,
            FirmwareUpdaterError::Flash(_) | FirmwareUpdaterError::BadState => Refused::Flash,
        })
}
