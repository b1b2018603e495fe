//! The embedded store's write-ahead log: how a batch of commits becomes durable without
//! redb writing its B-tree pages to disk every time.
//!
//! The writer appends a batch of commits here and commits redb *without* a sync
//! (`Durability::None`); a syncer thread then syncs this small file (a few hundred bytes
//! per PUT, one sync for every record written since the last) and answers. redb keeps
//! those pages in its write buffer, so a leaf written by many commits reaches the file
//! once per checkpoint instead of once per commit. A checkpoint is a durable redb commit;
//! after it the log is emptied. At open, the records newer than what redb holds durably
//! (the sequence number redb stores with every logged batch) are applied again, in order.
//!
//! A record is `len: u32 LE | crc32: u32 LE | seq: u64 LE | payload (len bytes)`, the
//! CRC over `seq` and the payload. The log ends at the first record that is short, fails
//! its CRC or does not follow its predecessor's `seq`: a torn append was never
//! acknowledged (the acknowledgement follows the sync). Records written since the last
//! sync may reach the disk in any order; if a crash keeps a later one and loses an earlier
//! one, the log ends at the lost one, and neither was acknowledged.
//!
//! The file never shrinks: it grows in [`GROW`] steps of written zeros, and records are
//! overwritten in place after a checkpoint. So an append's `fdatasync` flushes only the
//! record's blocks, never the file's size or extents (which would cost a journal commit
//! each). What lies past the last record (zeros, a torn append, records from before the
//! last checkpoint) is never taken for a record: each was written before the last one,
//! so its `seq` cannot follow the last one's.

use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::Path;

/// Bytes before a record's payload.
const HEADER: usize = 16;

/// How much the file grows at a time when an append would pass its end.
const GROW: u64 = 1 << 20;

/// One logged batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Record {
    /// Its sequence number: one more than the previous logged batch's.
    pub seq: u64,
    /// The batch, as the writer encoded it.
    pub payload: Vec<u8>,
}

/// The log file, appended to by the writer thread alone.
#[derive(Debug)]
pub(super) struct Wal {
    file: File,
    /// Bytes of whole records at the start of the file.
    len: u64,
    /// The file's size: how far records can go without growing it.
    capacity: u64,
}

/// Empties `record` and leaves room for a header: the record's payload is appended to it
/// next, and [`Wal::write_record`] writes it.
pub(super) fn begin(record: &mut Vec<u8>) {
    record.clear();
    record.resize(HEADER, 0);
}

impl Wal {
    /// Opens (or creates) the log and reads its records; a torn tail is cut off.
    pub fn open(path: &Path) -> io::Result<(Wal, Vec<Record>)> {
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        // The file's name must survive a crash as surely as the records synced into it.
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            File::open(dir)?.sync_all()?;
        }
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        let (records, valid) = decode(&bytes);
        Ok((
            Wal {
                file,
                len: valid as u64,
                capacity: bytes.len() as u64,
            },
            records,
        ))
    }

    /// Whether the log holds no record.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Its size in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Appends a record and syncs it to disk. On failure the log still ends where it did,
    /// but the caller must not count on the record being absent from the file.
    #[cfg(test)]
    pub fn append(&mut self, seq: u64, payload: &[u8]) -> io::Result<()> {
        self.write(seq, payload)?;
        self.file.sync_data()
    }

    /// A handle on the log's file for [`sync_data`](File::sync_data) from another thread:
    /// one sync makes durable every record written before it.
    pub fn sync_handle(&self) -> io::Result<File> {
        self.file.try_clone()
    }

    /// Appends a record without syncing it: it is durable after the next sync of the file
    /// ([`Wal::sync_handle`]), and until then a crash may leave it whole, torn or absent.
    /// On failure the log still ends where it did, but the caller must not count on the
    /// record being absent from the file.
    #[cfg(test)]
    pub fn write(&mut self, seq: u64, payload: &[u8]) -> io::Result<()> {
        let mut record = Vec::with_capacity(HEADER + payload.len());
        begin(&mut record);
        record.extend_from_slice(payload);
        self.write_record(seq, &mut record)
    }

    /// [`Wal::write`] of a record built in place: `record` was [`begin`]-ed, then its
    /// payload appended. Its header is filled in here, so a batch is encoded once, into
    /// the buffer the file is written from.
    pub fn write_record(&mut self, seq: u64, record: &mut [u8]) -> io::Result<()> {
        let (header, payload) = record
            .split_at_mut_checked(HEADER)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "record not begun"))?;
        let len = u32::try_from(payload.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "batch over 4 GiB"))?;
        header[..4].copy_from_slice(&len.to_le_bytes());
        header[4..8].copy_from_slice(&checksum(seq, payload).to_le_bytes());
        header[8..].copy_from_slice(&seq.to_le_bytes());
        let end = self.len + record.len() as u64;
        if end > self.capacity {
            self.grow(end)?;
        }
        self.file.write_all_at(record, self.len)?;
        self.len = end;
        Ok(())
    }

    /// Writes zeros past the file's end until it holds `end` bytes (a [`GROW`] step at
    /// least) and syncs them, size and extents included.
    fn grow(&mut self, end: u64) -> io::Result<()> {
        let to = end.max(self.capacity + GROW);
        let zeros = vec![0u8; usize::try_from(to - self.capacity).unwrap_or(usize::MAX)];
        self.file.write_all_at(&zeros, self.capacity)?;
        self.file.sync_all()?;
        self.capacity = to;
        Ok(())
    }

    /// Empties the log (after a checkpoint): the next record goes to the file's start.
    /// Nothing is written: records the file still holds are ones the checkpoint covers,
    /// and the replay skips them by `seq`.
    pub fn reset(&mut self) {
        self.len = 0;
    }
}

fn checksum(seq: u64, payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&seq.to_le_bytes());
    h.update(payload);
    h.finalize()
}

/// The whole records at the start of `bytes`, each following its predecessor's `seq`, and
/// how many bytes they take.
fn decode(bytes: &[u8]) -> (Vec<Record>, usize) {
    let mut records: Vec<Record> = Vec::new();
    let mut at = 0;
    while let Some(header) = bytes.get(at..at + HEADER) {
        let word =
            |i: usize| u32::from_le_bytes([header[i], header[i + 1], header[i + 2], header[i + 3]]);
        let len = word(0) as usize;
        let crc = word(4);
        let mut seq_bytes = [0u8; 8];
        seq_bytes.copy_from_slice(&header[8..16]);
        let seq = u64::from_le_bytes(seq_bytes);
        let Some(payload) = bytes.get(at + HEADER..at + HEADER + len) else {
            break;
        };
        if checksum(seq, payload) != crc {
            break;
        }
        if records.last().is_some_and(|prev| seq != prev.seq + 1) {
            break;
        }
        records.push(Record {
            seq,
            payload: payload.to_vec(),
        });
        at += HEADER + len;
    }
    (records, at)
}

/// The records a store whose durable state covers batches up to `applied` must apply
/// again: those after it. Every batch logged after a checkpoint is in the log, so one that
/// continues the durable state without a gap is a damaged store, never a normal crash.
pub(super) fn to_replay(records: Vec<Record>, applied: u64) -> Result<Vec<Record>, String> {
    let replay: Vec<Record> = records.into_iter().filter(|r| r.seq > applied).collect();
    match replay.first() {
        Some(first) if first.seq != applied + 1 => Err(format!(
            "the write-ahead log continues at batch {} but the store holds batches up to {applied}",
            first.seq
        )),
        _ => Ok(replay),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log_with(records: &[(u64, &[u8])]) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("tether.wal");
        let (mut wal, none) = Wal::open(&path).expect("open");
        assert!(none.is_empty());
        for (seq, payload) in records {
            wal.append(*seq, payload).expect("append");
        }
        (dir, path)
    }

    fn seqs(records: &[Record]) -> Vec<u64> {
        records.iter().map(|r| r.seq).collect()
    }

    #[test]
    fn records_come_back_in_order() {
        let (_dir, path) = log_with(&[(7, b"a"), (8, b""), (9, b"ccc")]);
        let (wal, records) = Wal::open(&path).expect("reopen");
        assert_eq!(seqs(&records), vec![7, 8, 9]);
        assert_eq!(records[2].payload, b"ccc");
        assert_eq!(wal.len(), (3 * HEADER + 4) as u64);
    }

    #[test]
    fn one_buffer_builds_record_after_record() {
        let (_dir, path) = log_with(&[]);
        let (mut wal, _) = Wal::open(&path).expect("open");
        let mut record = Vec::new();
        for (seq, payload) in [(1, &b"a long first payload"[..]), (2, b"short"), (3, b"")] {
            begin(&mut record);
            record.extend_from_slice(payload);
            wal.write_record(seq, &mut record).expect("write");
        }
        drop(wal);
        let (_, records) = Wal::open(&path).expect("reopen");
        let got: Vec<_> = records.iter().map(|r| (r.seq, &r.payload[..])).collect();
        assert_eq!(
            got,
            [(1, &b"a long first payload"[..]), (2, b"short"), (3, b"")]
        );
    }

    #[test]
    fn a_record_without_room_for_its_header_is_refused() {
        let (_dir, path) = log_with(&[]);
        let (mut wal, _) = Wal::open(&path).expect("open");
        let err = wal.write_record(1, &mut [0u8; 3]).expect_err("no header");
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        assert!(wal.is_empty());
    }

    #[test]
    fn a_torn_tail_is_cut_off_and_the_next_append_follows_the_last_whole_record() {
        let (_dir, path) = log_with(&[(1, b"first"), (2, b"second")]);
        let end = (2 * HEADER + 5 + 6) as u64;
        // Every cut inside the second record loses exactly that record.
        for cut in (HEADER as u64 + 5 + 1)..end {
            let f = OpenOptions::new().write(true).open(&path).expect("open");
            f.set_len(cut).expect("cut");
            drop(f);
            let (_, records) = Wal::open(&path).expect("reopen");
            assert_eq!(seqs(&records), vec![1], "cut at {cut}");
            let (mut wal, _) = Wal::open(&path).expect("reopen");
            assert_eq!(wal.len(), (HEADER + 5) as u64, "cut at {cut}");
            wal.append(2, b"second").expect("append");
        }
        let (_, records) = Wal::open(&path).expect("reopen");
        assert_eq!(seqs(&records), vec![1, 2]);
    }

    #[test]
    fn a_flipped_bit_ends_the_log_at_that_record() {
        let (_dir, path) = log_with(&[(1, b"one"), (2, b"two"), (3, b"three")]);
        let mut bytes = std::fs::read(&path).expect("read");
        let second_payload = 2 * HEADER + 3;
        bytes[second_payload] ^= 0x01;
        std::fs::write(&path, &bytes).expect("write");
        let (_, records) = Wal::open(&path).expect("reopen");
        assert_eq!(seqs(&records), vec![1]);
    }

    #[test]
    fn a_record_out_of_sequence_ends_the_log() {
        let (_dir, path) = log_with(&[(1, b"one"), (3, b"three")]);
        let (_, records) = Wal::open(&path).expect("reopen");
        assert_eq!(seqs(&records), vec![1]);
    }

    #[test]
    fn reset_empties_it() {
        let (_dir, path) = log_with(&[]);
        let (mut wal, _) = Wal::open(&path).expect("open");
        wal.append(4, b"x").expect("append");
        wal.reset();
        assert!(wal.is_empty());
        wal.append(5, b"y").expect("append");
        let (_, records) = Wal::open(&path).expect("reopen");
        assert_eq!(seqs(&records), vec![5]);
    }

    #[test]
    fn records_from_before_a_reset_are_not_taken_for_new_ones() {
        let long = [7u8; 100];
        let (_dir, path) = log_with(&[(1, &long), (2, &long), (3, &long)]);
        let (mut wal, _) = Wal::open(&path).expect("reopen");
        wal.reset();
        wal.append(4, b"short").expect("append");
        wal.append(5, b"").expect("append");
        let (_, records) = Wal::open(&path).expect("reopen");
        assert_eq!(seqs(&records), vec![4, 5]);
        // A crash right after the next checkpoint: what the log holds, the checkpoint
        // covers, so the replay takes none of it.
        let (mut wal, _) = Wal::open(&path).expect("reopen");
        wal.reset();
        let (_, records) = Wal::open(&path).expect("reopen");
        assert_eq!(to_replay(records, 5), Ok(vec![]));
    }

    #[test]
    fn the_file_grows_in_steps_and_is_reused_after_a_reset() {
        let (_dir, path) = log_with(&[]);
        let size = || std::fs::metadata(&path).expect("meta").len();
        assert_eq!(size(), 0);
        let (mut wal, _) = Wal::open(&path).expect("open");
        wal.append(1, b"x").expect("append");
        assert_eq!(size(), GROW);
        let big = vec![1u8; GROW as usize];
        wal.append(2, &big).expect("append");
        let grown = size();
        assert!(grown >= 2 * HEADER as u64 + 1 + GROW, "{grown}");
        wal.reset();
        wal.append(3, b"y").expect("append");
        assert_eq!(
            size(),
            grown,
            "appends after a reset overwrite, the file keeps its size"
        );
        let (_, records) = Wal::open(&path).expect("reopen");
        assert_eq!(seqs(&records), vec![3]);
    }

    #[test]
    fn replay_takes_what_follows_the_durable_state() {
        let rec = |seq| Record {
            seq,
            payload: Vec::new(),
        };
        let all = || vec![rec(4), rec(5), rec(6)];
        let replay = |applied| to_replay(all(), applied).map(|r| seqs(&r));
        assert_eq!(replay(3), Ok(vec![4, 5, 6]));
        assert_eq!(replay(5), Ok(vec![6]));
        assert_eq!(replay(6), Ok(vec![]));
        assert_eq!(replay(9), Ok(vec![]));
        // Batches 2 and 3 were acknowledged once and are gone: the store refuses to open.
        assert!(replay(1).is_err());
    }
}
