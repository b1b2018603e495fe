//! The simulator's virtual clocks (`src/sim/clock.rs`), in a process of their own: they are
//! process-wide, and would stop the clocks of tests running beside them.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tether_chaos_tests::sim::clock::VirtualClocks;
use tether_chaos_tests::sim::EPOCH_MS;

/// While a run's clocks live, `Instant` and `SystemTime` read virtual time and move only
/// when it is set; afterwards they read the machine's again.
#[test]
fn std_clocks_read_virtual_time_during_a_run() {
    let epoch = Duration::from_millis(EPOCH_MS);
    let clocks = VirtualClocks::start(epoch);
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(
        t0.elapsed(),
        Duration::ZERO,
        "the monotonic clock moved by itself"
    );
    clocks.set(Duration::from_millis(1500));
    assert_eq!(t0.elapsed(), Duration::from_millis(1500));
    let wall = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after the epoch");
    assert_eq!(wall, epoch + Duration::from_millis(1500));
    drop(clocks);
    let real = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after the epoch");
    assert!(
        real > epoch + Duration::from_secs(86_400 * 300),
        "still virtual after the run: {real:?}"
    );
}
