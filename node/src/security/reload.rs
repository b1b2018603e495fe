//! Configuration built from files, rebuilt when the files change.
//!
//! Kubernetes updates a mounted Secret or ConfigMap in place — kubelet writes the new
//! files into a fresh directory and swaps the `..data` symlink atomically — and sends the
//! process no signal. A [`Reloader`] holds a value built from a set of files (a TLS
//! certificate and key; for mTLS also a CA bundle) and checks the files periodically
//! ([`Reloader::watch`]) or on demand ([`Reloader::check`], e.g. on SIGHUP): when their
//! contents changed it rebuilds the value and swaps it in. A rebuild that fails (a
//! half-written pair, a key that does not match its certificate) keeps the previous value
//! and is retried when the files change again, so a bad update never takes a working
//! listener down.
//!
//! Change detection hashes the files' contents (SHA-256), not their modification times:
//! an atomic-writer swap can keep sizes and times, and files are small.
//!
//! Consumers read [`Reloader::current`] on every use (a rustls certificate resolver does,
//! per handshake), or [`Reloader::subscribe`] to be woken on every swap.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::sync::watch;

use crate::error::Result;

type Build<T> = Box<dyn Fn() -> Result<T> + Send + Sync>;

/// A value built from files, swapped for a rebuilt one when the files change.
pub struct Reloader<T> {
    what: &'static str,
    paths: Vec<PathBuf>,
    build: Build<T>,
    value: watch::Sender<Arc<T>>,
    /// Fingerprint of the files the last check saw (whether or not its rebuild worked).
    seen: Mutex<[u8; 32]>,
}

impl<T> std::fmt::Debug for Reloader<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reloader")
            .field("what", &self.what)
            .field("paths", &self.paths)
            .finish_non_exhaustive()
    }
}

/// What one [`Reloader::check`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Checked {
    /// The files are as last seen.
    Unchanged,
    /// They changed and the value was rebuilt and swapped in.
    Reloaded,
}

/// SHA-256 over every path and its contents (an unreadable file counts as its error, so
/// a file that appears or disappears is a change too).
fn fingerprint(paths: &[PathBuf]) -> [u8; 32] {
    let mut h = Sha256::new();
    for p in paths {
        h.update(p.as_os_str().as_encoded_bytes());
        h.update([0]);
        match std::fs::read(p) {
            Ok(bytes) => {
                h.update((bytes.len() as u64).to_be_bytes());
                h.update(&bytes);
            }
            Err(e) => {
                h.update(u64::MAX.to_be_bytes());
                h.update(e.kind().to_string().as_bytes());
            }
        }
    }
    h.finalize().into()
}

impl<T: Send + Sync + 'static> Reloader<T> {
    /// Builds the value once from `paths` with `build` (which reads them itself); fails
    /// — the node does not start — if that first build fails. `what` names the value in
    /// logs ("TLS certificate").
    pub fn new(
        what: &'static str,
        paths: Vec<PathBuf>,
        build: impl Fn() -> Result<T> + Send + Sync + 'static,
    ) -> Result<Arc<Self>> {
        let seen = fingerprint(&paths);
        let first = build()?;
        let (value, _) = watch::channel(Arc::new(first));
        Ok(Arc::new(Reloader {
            what,
            paths,
            build: Box::new(build),
            value,
            seen: Mutex::new(seen),
        }))
    }

    /// The value in use now.
    pub fn current(&self) -> Arc<T> {
        self.value.borrow().clone()
    }

    /// A receiver woken on every swap.
    pub fn subscribe(&self) -> watch::Receiver<Arc<T>> {
        self.value.subscribe()
    }

    /// The files this value is built from.
    pub fn paths(&self) -> &[PathBuf] {
        &self.paths
    }

    /// Rebuilds when the files' contents differ from what the last check saw. On a
    /// failed rebuild the previous value stays and the error is returned once; the same
    /// files are not retried until they change again.
    pub fn check(&self) -> Result<Checked> {
        let now = fingerprint(&self.paths);
        {
            let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
            if *seen == now {
                return Ok(Checked::Unchanged);
            }
            *seen = now;
        }
        let fresh = (self.build)()?;
        self.value.send_replace(Arc::new(fresh));
        Ok(Checked::Reloaded)
    }

    /// Rebuilds now, changed or not (SIGHUP); on error the previous value stays.
    pub fn reload(&self) -> Result<()> {
        let now = fingerprint(&self.paths);
        let fresh = (self.build)()?;
        *self.seen.lock().unwrap_or_else(PoisonError::into_inner) = now;
        self.value.send_replace(Arc::new(fresh));
        Ok(())
    }

    /// Checks the files every `interval` on the current tokio runtime, logging each
    /// reload and each failed one, until the returned task is aborted or the reloader is
    /// dropped everywhere else.
    pub fn watch(self: &Arc<Self>, interval: Duration) -> tokio::task::JoinHandle<()> {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(this) = weak.upgrade() else { return };
                // Reading a few small files: fine on the runtime's thread.
                match this.check() {
                    Ok(Checked::Unchanged) => {}
                    Ok(Checked::Reloaded) => {
                        tracing::info!(what = this.what, files = ?this.paths, "files changed: reloaded");
                    }
                    Err(e) => tracing::error!(
                        what = this.what,
                        files = ?this.paths,
                        error = %e,
                        "files changed but cannot be used; keeping the previous ones"
                    ),
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;
    use std::path::Path;

    use super::*;
    use crate::error::NodeError;

    /// Builds "<a>+<b>" from two files, refusing content "bad".
    fn pair(a: PathBuf, b: PathBuf) -> impl Fn() -> Result<String> + Send + Sync {
        move || {
            let read = |p: &Path| {
                std::fs::read_to_string(p).map_err(|e| NodeError::Config(format!("{e}")))
            };
            let (x, y) = (read(&a)?, read(&b)?);
            if x == "bad" || y == "bad" {
                return Err(NodeError::Config("bad content".into()));
            }
            Ok(format!("{x}+{y}"))
        }
    }

    /// Kubelet's atomic writer: files in a timestamped directory, `..data` pointing at it,
    /// and each visible name a symlink through `..data`.
    fn atomic_write(dir: &Path, generation: u32, files: &[(&str, &str)]) {
        let data = dir.join(format!("..{generation}"));
        std::fs::create_dir(&data).expect("generation dir");
        for (name, content) in files {
            std::fs::write(data.join(name), content).expect("write");
            let visible = dir.join(name);
            if !visible.exists() {
                symlink(Path::new("..data").join(name), &visible).expect("visible symlink");
            }
        }
        let tmp = dir.join("..data_tmp");
        symlink(format!("..{generation}"), &tmp).expect("tmp symlink");
        std::fs::rename(&tmp, dir.join("..data")).expect("swap ..data");
    }

    #[test]
    fn rebuilds_only_when_contents_change_and_keeps_the_old_value_on_a_bad_update() {
        let dir = tempfile::tempdir().expect("tempdir");
        atomic_write(dir.path(), 1, &[("tls.crt", "c1"), ("tls.key", "k1")]);
        let r = Reloader::new(
            "test pair",
            vec![dir.path().join("tls.crt"), dir.path().join("tls.key")],
            pair(dir.path().join("tls.crt"), dir.path().join("tls.key")),
        )
        .expect("first build");
        let mut rx = r.subscribe();
        assert_eq!(*r.current(), "c1+k1");
        assert_eq!(r.check().expect("check"), Checked::Unchanged);

        // Kubernetes swaps the whole directory: both files change at once.
        atomic_write(dir.path(), 2, &[("tls.crt", "c2"), ("tls.key", "k2")]);
        assert_eq!(r.check().expect("check"), Checked::Reloaded);
        assert_eq!(*r.current(), "c2+k2");
        assert!(
            rx.has_changed().expect("sender alive"),
            "subscribers are woken"
        );
        assert_eq!(**rx.borrow_and_update(), "c2+k2");
        assert_eq!(r.check().expect("check"), Checked::Unchanged);

        // A broken update is refused once and the working value stays in use.
        atomic_write(dir.path(), 3, &[("tls.crt", "bad"), ("tls.key", "k3")]);
        assert!(r.check().is_err());
        assert_eq!(*r.current(), "c2+k2");
        assert_eq!(r.check().expect("check"), Checked::Unchanged, "not retried");

        // Fixed files are picked up.
        atomic_write(dir.path(), 4, &[("tls.crt", "c4"), ("tls.key", "k4")]);
        assert_eq!(r.check().expect("check"), Checked::Reloaded);
        assert_eq!(*r.current(), "c4+k4");
    }

    #[test]
    fn a_first_build_failure_is_an_error_and_reload_forces_a_rebuild() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        std::fs::write(&a, "bad").expect("write");
        std::fs::write(&b, "y").expect("write");
        assert!(
            Reloader::new("t", vec![a.clone(), b.clone()], pair(a.clone(), b.clone())).is_err()
        );
        std::fs::write(&a, "x").expect("write");
        let r = Reloader::new("t", vec![a.clone(), b.clone()], pair(a.clone(), b.clone()))
            .expect("builds");
        r.reload().expect("forced rebuild of the same files");
        assert_eq!(*r.current(), "x+y");
        // A missing file is a change, and a failed one.
        std::fs::remove_file(&b).expect("rm");
        assert!(r.check().is_err());
        assert_eq!(*r.current(), "x+y");
    }

    #[tokio::test]
    async fn watch_picks_up_a_change_without_being_asked() {
        let dir = tempfile::tempdir().expect("tempdir");
        atomic_write(dir.path(), 1, &[("a", "1"), ("b", "1")]);
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        let r = Reloader::new("t", vec![a.clone(), b.clone()], pair(a, b)).expect("builds");
        let mut rx = r.subscribe();
        let task = r.watch(Duration::from_millis(20));
        atomic_write(dir.path(), 2, &[("a", "2"), ("b", "2")]);
        tokio::time::timeout(Duration::from_secs(10), rx.changed())
            .await
            .expect("the watcher noticed within 10 s")
            .expect("sender alive");
        assert_eq!(**rx.borrow(), "2+2");
        task.abort();
    }
}
