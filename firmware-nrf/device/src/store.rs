//! The device's flash: sequential-storage's key-value map over any async NOR flash (the
//! nRF NVMC on the device, a RAM flash in the QEMU test), holding two records:
//! the buckets ([`crate::record`]) and the assigned credentials ([`crate::credentials`]).
//!
//! sequential-storage only appends and erases page by page in turn (wear levelling), and
//! a write cut by a reset leaves the previous record readable.

use core::ops::Range;

use embedded_storage_async::nor_flash::NorFlash;
use sequential_storage::cache::{Cache, Uncached};
use sequential_storage::map::{MapConfig, MapStorage};

/// Map key of the buckets record.
pub const KEY_BUCKETS: u8 = 1;
/// Map key of the assigned credentials record.
pub const KEY_CREDENTIALS: u8 = 2;
/// Largest record (plus key and flash-word rounding) the store reads or writes; a
/// thermostat's buckets record is about 200 bytes.
pub const MAX_RECORD: usize = 768;

/// What a store operation could not do; the device carries on from RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum StoreError {
    /// The flash driver failed.
    Flash,
    /// The record does not fit [`MAX_RECORD`].
    TooLarge,
    /// The stored data is corrupt beyond sequential-storage's own repair.
    Corrupted,
    /// Any other sequential-storage error.
    Other,
}

impl<E> From<sequential_storage::Error<E>> for StoreError {
    fn from(e: sequential_storage::Error<E>) -> Self {
        match e {
            sequential_storage::Error::Storage { .. } => StoreError::Flash,
            sequential_storage::Error::BufferTooSmall(_)
            | sequential_storage::Error::ItemTooBig => StoreError::TooLarge,
            sequential_storage::Error::Corrupted { .. } => StoreError::Corrupted,
            _ => StoreError::Other,
        }
    }
}

/// The records of one device in `range` of `flash` (whole erase pages, at least two).
pub struct Store<S: NorFlash> {
    map: MapStorage<u8, S, Cache<Uncached, Uncached, Uncached, u8>>,
    buf: [u8; MAX_RECORD],
}

impl<S: NorFlash> Store<S> {
    /// Opens the map; panics if `range` is not whole pages (a build-time constant).
    pub fn new(flash: S, range: Range<u32>) -> Self {
        Store {
            map: MapStorage::new(flash, MapConfig::new(range), Cache::new_uncached()),
            buf: [0; MAX_RECORD],
        }
    }

    /// Reads the record under `key` into `out` (cleared first); false if there is none.
    pub async fn load(
        &mut self,
        key: u8,
        out: &mut alloc::vec::Vec<u8>,
    ) -> Result<bool, StoreError> {
        out.clear();
        match self.map.fetch_item::<&[u8]>(&mut self.buf, &key).await? {
            Some(bytes) => {
                out.extend_from_slice(bytes);
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// Writes `record` under `key`, replacing the previous one.
    pub async fn save(&mut self, key: u8, record: &[u8]) -> Result<(), StoreError> {
        if record.len() + 8 > MAX_RECORD {
            return Err(StoreError::TooLarge);
        }
        self.map
            .store_item(&mut self.buf, &key, &record)
            .await
            .map_err(StoreError::from)
    }
}
