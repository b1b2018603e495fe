//! Heap profiling for issue 17 (`scripts/bench/profile`): with the `dhat-heap` cargo
//! feature the binary's global allocator is dhat-rs (`main.rs`), [`start`] begins
//! recording at start-up and [`snapshot`] writes the profile when SIGTERM arrives —
//! before the drain answers held subscriptions — so the file's "t-end" figures are the
//! heap of a node while it holds its devices. Without the feature both are no-ops.

/// Where the profile goes: `$TETHER_DHAT_FILE`, default `dhat-heap.json`.
#[cfg(feature = "dhat-heap")]
static PROFILER: std::sync::Mutex<Option<dhat::Profiler>> = std::sync::Mutex::new(None);

/// Starts recording every allocation (the binary must use `dhat::Alloc`).
pub fn start() {
    #[cfg(feature = "dhat-heap")]
    {
        let file = std::env::var_os("TETHER_DHAT_FILE")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| "dhat-heap.json".into());
        // Deep enough to name the connection, actor or cache an allocation belongs to.
        let profiler = dhat::Profiler::builder()
            .file_name(file)
            .trim_backtraces(Some(64))
            .build();
        if let Ok(mut p) = PROFILER.lock() {
            *p = Some(profiler);
        }
    }
}

/// Writes the profile of the heap as it is now and stops recording (once).
pub fn snapshot() {
    #[cfg(feature = "dhat-heap")]
    {
        let profiler = PROFILER.lock().ok().and_then(|mut p| p.take());
        if let Some(profiler) = profiler {
            let stats = dhat::HeapStats::get();
            tracing::warn!(
                curr_bytes = stats.curr_bytes,
                curr_blocks = stats.curr_blocks,
                max_bytes = stats.max_bytes,
                "dhat-heap: writing the heap profile"
            );
            drop(profiler);
        }
    }
}
