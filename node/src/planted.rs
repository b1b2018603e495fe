//! Planted bugs: deliberate breaches of one guarantee each, so the chaos suite
//! (`chaos-tests`) can prove that its checker finds them. Compiled only with a cargo feature
//! (`planted-ack-before-durable`, `planted-skip-epoch-check`, `planted-stale-reads`,
//! `planted-drop-notification`; `planted-bugs` enables all four), and active only while the
//! environment variable [`ENV`] names the bug (without the `planted-` prefix; several may be
//! listed, comma-separated). A binary built without these features contains none of this
//! module nor of its hooks (each hook is marked `#[cfg(feature = "planted-…")]`).
//!
//! | bug | what it breaks | hook |
//! |---|---|---|
//! | `ack-before-durable` | acknowledged ⇒ durable: a batch is answered at once and committed ~200 ms later in the background, so a kill -9 or a store crash loses acknowledged writes | `BucketSetActor::start_commit` |
//! | `skip-epoch-check` | one committer per set: a commit fenced for a stale epoch is written anyway (under the current epoch read from the store, the lease left with its holder, and the change log's per-version check skipped), so two owners commit the same version | `BucketSetActor::start_commit` |
//! | `stale-reads` | reads only under a confirmed lease (invariant 23): reads are served from memory without confirming the lease, a woken node does not confirm the leases of its sets with held subscriptions (`Revalidate` trusts memory too), and a take-over (`Relinquish`) is ignored | `BucketSetActor::lease_trusted`, `Handler<Revalidate>`, `Shared::relinquish` |
//! | `drop-notification` | every change reaches its held subscribers: every 3rd notification is dropped (the subscriber stays held) | `BucketSetActor::notify` |

use std::sync::OnceLock;

/// The environment variable naming the active planted bug(s).
pub const ENV: &str = "TETHER_PLANTED_BUG";

/// A planted bug.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bug {
    /// `planted-ack-before-durable`.
    AckBeforeDurable,
    /// `planted-skip-epoch-check`.
    SkipEpochCheck,
    /// `planted-stale-reads`.
    StaleReads,
    /// `planted-drop-notification`.
    DropNotification,
}

impl Bug {
    const ALL: [Bug; 4] = [
        Bug::AckBeforeDurable,
        Bug::SkipEpochCheck,
        Bug::StaleReads,
        Bug::DropNotification,
    ];

    /// Its name in [`ENV`].
    pub fn name(self) -> &'static str {
        match self {
            Bug::AckBeforeDurable => "ack-before-durable",
            Bug::SkipEpochCheck => "skip-epoch-check",
            Bug::StaleReads => "stale-reads",
            Bug::DropNotification => "drop-notification",
        }
    }

    /// Whether this binary was built with the bug's feature.
    fn compiled(self) -> bool {
        match self {
            Bug::AckBeforeDurable => cfg!(feature = "planted-ack-before-durable"),
            Bug::SkipEpochCheck => cfg!(feature = "planted-skip-epoch-check"),
            Bug::StaleReads => cfg!(feature = "planted-stale-reads"),
            Bug::DropNotification => cfg!(feature = "planted-drop-notification"),
        }
    }
}

/// The bugs [`ENV`] names, or why it names something this binary cannot plant.
fn parse(value: &str) -> Result<Vec<Bug>, String> {
    let mut bugs = Vec::new();
    for name in value.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        let name = name.strip_prefix("planted-").unwrap_or(name);
        let bug = Bug::ALL
            .into_iter()
            .find(|b| b.name() == name)
            .ok_or_else(|| {
                format!(
                    "{ENV}={value}: no planted bug {name:?} (known: {})",
                    Bug::ALL.map(Bug::name).join(", ")
                )
            })?;
        if !bug.compiled() {
            return Err(format!(
                "{ENV}={value}: this binary was built without the feature planted-{name}"
            ));
        }
        bugs.push(bug);
    }
    Ok(bugs)
}

fn active_bugs() -> &'static Result<Vec<Bug>, String> {
    static ACTIVE: OnceLock<Result<Vec<Bug>, String>> = OnceLock::new();
    ACTIVE.get_or_init(|| match std::env::var(ENV) {
        Ok(v) => parse(&v),
        Err(_) => Ok(Vec::new()),
    })
}

/// Whether `bug` is active in this process.
pub fn active(bug: Bug) -> bool {
    active_bugs().as_ref().is_ok_and(|b| b.contains(&bug))
}

/// At start-up: refuses an [`ENV`] naming a bug this binary cannot plant (a planted check
/// must never pass because its bug was silently absent), and warns loudly about every
/// active one.
pub fn announce() -> Result<(), crate::error::NodeError> {
    let bugs = active_bugs()
        .as_ref()
        .map_err(|e| crate::error::NodeError::Config(e.clone()))?;
    for bug in bugs {
        tracing::error!(
            bug = bug.name(),
            "PLANTED BUG ACTIVE: planted-{} — this node deliberately breaks a guarantee (chaos suite self-test); never run it in production",
            bug.name()
        );
    }
    Ok(())
}

/// `ack-before-durable`: how long after its answer a batch is committed.
#[cfg(feature = "planted-ack-before-durable")]
const ACK_EARLY_BY: std::time::Duration = std::time::Duration::from_millis(200);

/// `ack-before-durable`: commits `commit` [`ACK_EARLY_BY`] from now, in the background,
/// after the previous batch's background commit (`prev`) finished; its failure is only
/// logged (the writes were acknowledged already).
#[cfg(feature = "planted-ack-before-durable")]
pub fn commit_later(
    store: std::sync::Arc<dyn crate::store::Store>,
    set: tether_proto::SetKey,
    epoch: crate::store::Epoch,
    commit: crate::store::Commit,
    prev: Option<tokio::task::JoinHandle<()>>,
) -> Option<tokio::task::JoinHandle<()>> {
    if commit.is_empty() {
        return prev;
    }
    let due = tokio::time::Instant::now() + ACK_EARLY_BY;
    Some(actix_rt::spawn(async move {
        if let Some(prev) = prev {
            let _ = prev.await;
        }
        tokio::time::sleep_until(due).await;
        if let Err(e) = store.commit(&set, epoch, commit).await {
            tracing::error!(%set, error = %e, "planted-ack-before-durable: an acknowledged batch was not committed");
        }
    }))
}

/// `skip-epoch-check`: commits `commit`; if the store refuses it for a stale epoch, writes
/// it anyway under the set's current epoch (read from the store, the lease left with its
/// holder), without the change log rows (whose per-version key would refuse a version the
/// current owner wrote already): the effect of a store whose commit does not check the
/// epoch. The stale owner's memory overwrites the current owner's buckets, and the
/// current owner, its lease untouched, overwrites them back at its next commit.
///
/// It runs as a task of its own: a store without the check would have taken the write
/// with the first attempt, so the actor stopping meanwhile (a lease confirmation finding
/// the set taken, which cancels its pending futures) does not stop it.
#[cfg(feature = "planted-skip-epoch-check")]
pub async fn commit_fenced_anyway(
    store: std::sync::Arc<dyn crate::store::Store>,
    set: tether_proto::SetKey,
    epoch: crate::store::Epoch,
    commit: crate::store::Commit,
) -> Result<(), crate::store::StoreError> {
    let write = actix_rt::spawn(async move {
        match store.commit(&set, epoch, commit.clone()).await {
            Err(crate::store::StoreError::Fenced { .. }) => {
                tracing::error!(%set, epoch = epoch.0, "planted-skip-epoch-check: committing under a stale epoch anyway");
                let current = store.lease_epoch(&set).await?.unwrap_or(epoch);
                let mut commit = commit;
                commit.changes.clear();
                store.commit(&set, current, commit).await
            }
            other => other,
        }
    });
    write
        .await
        .map_err(|e| crate::store::StoreError::Backend(format!("planted commit task: {e}")))?
}

/// `drop-notification`: whether to drop this notification (every 3rd one).
#[cfg(feature = "planted-drop-notification")]
pub fn drop_this_notification() -> bool {
    use std::sync::atomic::{AtomicU64, Ordering};
    static SEEN: AtomicU64 = AtomicU64::new(0);
    active(Bug::DropNotification) && SEEN.fetch_add(1, Ordering::Relaxed) % 3 == 2
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_with_or_without_prefix_and_unknown_ones_are_refused() {
        assert_eq!(parse(""), Ok(vec![]));
        assert!(parse("no-such-bug").is_err());
        for bug in Bug::ALL.into_iter().filter(|b| b.compiled()) {
            assert_eq!(parse(bug.name()), Ok(vec![bug]));
            assert_eq!(parse(&format!("planted-{}", bug.name())), Ok(vec![bug]));
        }
    }
}
