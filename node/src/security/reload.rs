//! Certificate files reloaded when they change: [`Reloadable`] keeps a value built from
//! some files (a TLS configuration, a certificate and key) and rebuilds it when their
//! contents change, checked every interval by a watcher thread. Kubernetes updates a
//! mounted Secret by swapping a symlink and sends no signal, so the contents are compared
//! (a hash of every file), not timestamps or inotify events on the path.
//!
//! A rebuild that fails (a half-written file, a key that does not match) keeps the
//! previous value and is logged once per distinct content; established connections keep
//! the configuration they were made with, new ones get the new value.

use std::hash::{Hash, Hasher};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock, Weak};
use std::time::Duration;

use crate::error::{NodeError, Result};

type Build<T> = Box<dyn Fn() -> Result<T> + Send + Sync>;

/// A value built from files, rebuilt when their contents change.
pub struct Reloadable<T> {
    name: String,
    paths: Vec<PathBuf>,
    build: Build<T>,
    current: RwLock<Arc<T>>,
    seen: Mutex<u64>,
    reloads: AtomicU64,
}

impl<T> std::fmt::Debug for Reloadable<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reloadable")
            .field("name", &self.name)
            .field("paths", &self.paths)
            .field("reloads", &self.reloads.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

/// A hash of the files' contents (an unreadable file hashes as absent).
fn fingerprint(paths: &[PathBuf]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for p in paths {
        std::fs::read(p).ok().hash(&mut h);
    }
    h.finish()
}

impl<T: Send + Sync + 'static> Reloadable<T> {
    /// Builds the value once from `paths` with `build`; fails (the node does not start) if
    /// that fails. `name` names it in logs.
    pub fn load(
        name: &str,
        paths: Vec<PathBuf>,
        build: impl Fn() -> Result<T> + Send + Sync + 'static,
    ) -> Result<Arc<Self>> {
        let seen = fingerprint(&paths);
        let value = build()?;
        Ok(Arc::new(Reloadable {
            name: name.to_string(),
            paths,
            build: Box::new(build),
            current: RwLock::new(Arc::new(value)),
            seen: Mutex::new(seen),
            reloads: AtomicU64::new(0),
        }))
    }

    /// The value now.
    pub fn current(&self) -> Arc<T> {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// How many times the value was rebuilt since it was loaded.
    pub fn reloads(&self) -> u64 {
        self.reloads.load(Ordering::Relaxed)
    }

    /// Rebuilds the value if the files changed since the last look. `Ok(true)`: rebuilt;
    /// `Ok(false)`: unchanged; `Err`: changed but unusable (the previous value stays).
    pub fn check(&self) -> Result<bool> {
        let now = fingerprint(&self.paths);
        {
            let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
            if *seen == now {
                return Ok(false);
            }
            // Looked at once per distinct content: a broken file is reported once, and
            // retried only when it changes again.
            *seen = now;
        }
        let fresh = (self.build)()?;
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(fresh);
        self.reloads.fetch_add(1, Ordering::Relaxed);
        Ok(true)
    }

    /// Checks the files every `interval` on a thread of its own until the value is dropped.
    pub fn watch(self: &Arc<Self>, interval: Duration) -> Result<()> {
        let weak: Weak<Self> = Arc::downgrade(self);
        let name = self.name.clone();
        std::thread::Builder::new()
            .name(format!("tether-reload-{name}"))
            .spawn(move || loop {
                std::thread::sleep(interval);
                let Some(this) = weak.upgrade() else { return };
                match this.check() {
                    Ok(true) => tracing::info!(what = %this.name, "certificate files changed: reloaded"),
                    Ok(false) => {}
                    Err(e) => tracing::error!(what = %this.name, error = %e, "certificate files changed but do not load; keeping the previous ones"),
                }
            })
            .map(drop)
            .map_err(|e| NodeError::Config(format!("starting the {name} reloader: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_changed_file_rebuilds_a_broken_one_keeps_the_previous_value() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("n.txt");
        std::fs::write(&path, "1").expect("write");
        let p = path.clone();
        let r = Reloadable::load("test", vec![path.clone()], move || {
            let text = std::fs::read_to_string(&p).map_err(|e| NodeError::Config(e.to_string()))?;
            text.trim()
                .parse::<u32>()
                .map_err(|e| NodeError::Config(e.to_string()))
        })
        .expect("loads");
        assert_eq!(*r.current(), 1);
        assert!(!r.check().expect("unchanged"), "nothing changed");
        std::fs::write(&path, "2").expect("write");
        assert!(r.check().expect("reloads"));
        assert_eq!(*r.current(), 2);
        std::fs::write(&path, "not a number").expect("write");
        assert!(r.check().is_err(), "a broken file is reported");
        assert_eq!(*r.current(), 2, "and the previous value stays");
        assert!(
            !r.check().expect("reported once"),
            "the same broken content once"
        );
        // A Kubernetes Secret update: the file is replaced (new inode), not rewritten.
        let tmp = dir.path().join("n.tmp");
        std::fs::write(&tmp, "3").expect("write");
        std::fs::rename(&tmp, &path).expect("rename");
        assert!(r.check().expect("reloads"));
        assert_eq!(*r.current(), 3);
        assert_eq!(r.reloads(), 2);
    }

    #[test]
    fn the_watcher_notices_a_change_within_its_interval() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("n.txt");
        std::fs::write(&path, "1").expect("write");
        let p = path.clone();
        let r = Reloadable::load("test", vec![path.clone()], move || {
            std::fs::read_to_string(&p).map_err(|e| NodeError::Config(e.to_string()))
        })
        .expect("loads");
        r.watch(Duration::from_millis(20)).expect("watch");
        std::fs::write(&path, "2").expect("write");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while r.current().as_str() != "2" {
            assert!(
                std::time::Instant::now() < deadline,
                "not reloaded within 10 s"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}
