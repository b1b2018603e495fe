//! The simulator process's clocks run on virtual time.
//!
//! turmoil virtualizes tokio's clock, but code below the node reads the machine's clocks
//! directly: h2 forgets the streams it reset one second of `std::time::Instant` after the
//! reset, so on a loaded machine (a run stretched in wall time) it answered a late frame
//! of a reset stream with a `RST_STREAM` that an unloaded run never sent, and the runs
//! diverged from there (seed 409 gave three different histories). `SystemTime` reaches
//! the gossip incarnations and the store's idempotency markers the same way.
//!
//! So while a seed runs, the process's `clock_gettime` — which `std::time::Instant`,
//! `SystemTime` and everything built on them call — answers the simulation's time:
//! monotonic clocks from [`MONOTONIC_BASE`], wall clocks from the simulation's epoch, both
//! advanced by [`set`] before each simulation step. The definition here preempts the C
//! library's (an executable's own symbol wins); outside a run, and for every other
//! clock, it calls the C library's. The same technique as madsim's. One seed per process
//! (`simulate --child`): the clocks are process-wide.
#![allow(unsafe_code)]

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

/// Where the virtual monotonic clock starts: far from zero, so code subtracting durations
/// from an `Instant` never underflows.
pub const MONOTONIC_BASE: Duration = Duration::from_secs(1_000_000);

static ACTIVE: AtomicBool = AtomicBool::new(false);
/// Virtual nanoseconds since the run started.
static ELAPSED_NS: AtomicU64 = AtomicU64::new(0);
/// The wall clock at the run's start, in nanoseconds since the Unix epoch.
static EPOCH_NS: AtomicU64 = AtomicU64::new(0);
/// The C library's `clock_gettime` (0: not looked up yet).
static REAL: AtomicUsize = AtomicUsize::new(0);

/// Virtual clocks for as long as it lives; the machine's again when dropped.
#[derive(Debug)]
pub struct VirtualClocks(());

impl VirtualClocks {
    /// Switches the process's clocks to virtual time: `epoch` (since the Unix epoch) is
    /// the wall clock's start.
    pub fn start(epoch: Duration) -> Self {
        real_clock_gettime();
        EPOCH_NS.store(nanos(epoch), Ordering::Release);
        ELAPSED_NS.store(0, Ordering::Release);
        ACTIVE.store(true, Ordering::Release);
        VirtualClocks(())
    }

    /// Virtual time `elapsed` since the start (never goes back).
    pub fn set(&self, elapsed: Duration) {
        ELAPSED_NS.fetch_max(nanos(elapsed), Ordering::AcqRel);
    }
}

impl Drop for VirtualClocks {
    fn drop(&mut self) {
        ACTIVE.store(false, Ordering::Release);
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

type ClockGettime = unsafe extern "C" fn(libc::clockid_t, *mut libc::timespec) -> libc::c_int;

/// The C library's `clock_gettime`, looked up once (the next definition after this one).
fn real_clock_gettime() -> Option<ClockGettime> {
    let mut f = REAL.load(Ordering::Acquire);
    if f == 0 {
        // SAFETY: a NUL-terminated name; RTLD_NEXT is valid from a loaded object.
        f = unsafe { libc::dlsym(libc::RTLD_NEXT, c"clock_gettime".as_ptr()) } as usize;
        REAL.store(f, Ordering::Release);
    }
    // SAFETY: a non-null result of dlsym for `clock_gettime` is that function.
    (f != 0).then(|| unsafe { std::mem::transmute::<usize, ClockGettime>(f) })
}

/// The process's `clock_gettime`: virtual time during a run, else the C library's.
///
/// # Safety
/// `tp` must be valid for a write of one `timespec` (the C contract).
#[no_mangle]
pub unsafe extern "C" fn clock_gettime(
    clock: libc::clockid_t,
    tp: *mut libc::timespec,
) -> libc::c_int {
    if ACTIVE.load(Ordering::Acquire) {
        let elapsed = ELAPSED_NS.load(Ordering::Acquire);
        let at = match clock {
            libc::CLOCK_MONOTONIC
            | libc::CLOCK_MONOTONIC_RAW
            | libc::CLOCK_MONOTONIC_COARSE
            | libc::CLOCK_BOOTTIME => Some(nanos(MONOTONIC_BASE).saturating_add(elapsed)),
            libc::CLOCK_REALTIME | libc::CLOCK_REALTIME_COARSE => {
                Some(EPOCH_NS.load(Ordering::Acquire).saturating_add(elapsed))
            }
            _ => None,
        };
        if let Some(ns) = at {
            if tp.is_null() {
                return 0;
            }
            // SAFETY: the caller passes a valid timespec pointer (checked non-null).
            unsafe {
                (*tp).tv_sec = (ns / 1_000_000_000) as libc::time_t;
                (*tp).tv_nsec = (ns % 1_000_000_000) as libc::c_long;
            }
            return 0;
        }
    }
    match real_clock_gettime() {
        // SAFETY: the C library's function, called with the caller's arguments.
        Some(real) => unsafe { real(clock, tp) },
        // SAFETY: the raw system call, same arguments.
        None => unsafe { libc::syscall(libc::SYS_clock_gettime, clock, tp) as libc::c_int },
    }
}
