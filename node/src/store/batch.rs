//! The queue in front of a shared store's batching writer (group commit across bucket
//! sets), independent of the backend: PostgreSQL (`postgres/batch.rs`) and FoundationDB
//! (`fdb/batch.rs`) each write a batch their own way, in ONE transaction.
//!
//! Every actor of a node hands its commit to one queue. [`BatchConfig::writers`] writer
//! tasks each take whatever is queued (up to [`BatchConfig::max_batch`]) and give it to the
//! backend's writer, which answers every request only after its transaction committed
//! (or failed). While a batch is being written, the next one gathers until it ends (or
//! until it has been out [`BatchConfig::overlap_after`]): idle writers grabbing a commit
//! or two each would split the load into many small transactions, each costing the store
//! its fixed price (on PostgreSQL, 4 writers made batches of 2.7 commits against 6.7 for
//! one, and the store spent twice the CPU per commit). The other writers overlap a batch
//! that is slow (a lock wait, a stalled store), so one slow transaction does not hold up
//! every commit of the node.
//!
//! A request whose requester stopped waiting before its batch began (its deadline passed
//! while queued, so it was told its fate is unknown) is dropped unwritten: writing nothing
//! is one of the fates it allowed, and the safest one.
//!
//! Admission: at most [`BatchConfig::queue`] commits wait or are being written; past that
//! a commit fails at once with [`StoreError::Overloaded`] (503 + `Retry-After`), never an
//! unbounded wait.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use tether_proto::SetKey;
use tokio::sync::{mpsc, oneshot, Mutex, OwnedSemaphorePermit, Semaphore};

use super::{Commit, Epoch, StoreError};

/// Limits of a batching writer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchConfig {
    /// Most commits queued or being written at once; more are refused (overloaded).
    pub queue: usize,
    /// Batch transactions in flight at once, at most (PostgreSQL: each holds one pooled
    /// connection).
    pub writers: usize,
    /// While a batch is being written, the next one starts only once that one ended or
    /// has been out this long; until then it gathers commits.
    pub overlap_after: std::time::Duration,
    /// Most commits folded into one transaction.
    pub max_batch: usize,
    /// FoundationDB: the most bytes (keys and values written, as encoded) one batch
    /// transaction may carry; a batch past it is split into several transactions, one
    /// after the other. Well below FDB's 10 MB transaction limit, which also counts the
    /// retention clears and the transaction marker. PostgreSQL has no such limit and
    /// ignores it.
    pub max_batch_bytes: usize,
    /// How long a batch's transaction may take (`--store-timeout-ms`). Past it the batch
    /// is abandoned and every commit in it told its fate is unknown
    /// ([`StoreError::FateUnknown`]), never that it failed.
    pub deadline: std::time::Duration,
}

impl Default for BatchConfig {
    fn default() -> Self {
        BatchConfig {
            queue: 8192,
            writers: 4,
            overlap_after: std::time::Duration::from_millis(10),
            max_batch: 512,
            max_batch_bytes: 4_000_000,
            deadline: super::deadline::DEFAULT_DEADLINE,
        }
    }
}

/// A commit waiting for its batch.
pub(crate) struct Request {
    pub(crate) set: SetKey,
    pub(crate) epoch: Epoch,
    pub(crate) commit: Commit,
    reply: oneshot::Sender<Result<(), StoreError>>,
    /// Its place in the admission bound, given back when it is answered.
    _permit: OwnedSemaphorePermit,
}

impl std::fmt::Debug for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Request").field("set", &self.set).finish()
    }
}

impl Request {
    /// Answers the requester (a requester that gave up is not told anything).
    pub(crate) fn answer(self, result: Result<(), StoreError>) {
        let _ = self.reply.send(result);
    }

    /// The requester stopped waiting: nobody takes the answer.
    pub(crate) fn abandoned(&self) -> bool {
        self.reply.is_closed()
    }
}

/// A backend's batch writer: writes the batch and answers every request in it.
pub(crate) type WriteBatch =
    Arc<dyn Fn(Vec<Request>) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

/// The batch transactions being written, and when the oldest of them started.
#[derive(Debug, Default)]
struct InFlight {
    /// Start of each batch being written.
    started: std::sync::Mutex<Vec<tokio::time::Instant>>,
    ended: tokio::sync::Notify,
}

impl InFlight {
    /// A batch starts now; returns its start, to give to [`Self::ended`].
    fn started(&self) -> tokio::time::Instant {
        let now = tokio::time::Instant::now();
        self.lock().push(now);
        now
    }

    /// The batch that started at `start` ended.
    fn ended(&self, start: tokio::time::Instant) {
        let mut started = self.lock();
        if let Some(i) = started.iter().position(|t| *t == start) {
            started.swap_remove(i);
        }
        drop(started);
        self.ended.notify_waiters();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<tokio::time::Instant>> {
        self.started
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Group commit: while another batch is being written, `batch` (already holding the
    /// first queued) waits until one ends or the oldest has been out `overlap_after`, then
    /// takes what queued meanwhile, up to `max_batch`. Nothing is received while it waits,
    /// so the commits queuing meanwhile do not wake it one by one.
    async fn gather(
        &self,
        rx: &mut mpsc::UnboundedReceiver<Request>,
        batch: &mut Vec<Request>,
        max_batch: usize,
        overlap_after: std::time::Duration,
    ) {
        let ended = self.ended.notified();
        tokio::pin!(ended);
        // Registered before the batches in flight are read: an end in between still wakes it.
        ended.as_mut().enable();
        let oldest = self.lock().iter().min().copied();
        if let Some(oldest) = oldest {
            tokio::select! {
                _ = &mut ended => {}
                _ = tokio::time::sleep_until(oldest + overlap_after) => {}
            }
        }
        while batch.len() < max_batch {
            match rx.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
    }
}

/// The queue in front of the writer tasks.
#[derive(Debug)]
pub(crate) struct Queue {
    tx: mpsc::UnboundedSender<Request>,
    admission: Arc<Semaphore>,
    bound: usize,
    /// Named in the overload answer ("PostgreSQL", "FoundationDB").
    backend: &'static str,
}

impl Queue {
    /// Starts `config.writers` writer tasks on `runtime`, each handing the batches it
    /// takes to `write`. They live as long as that runtime (or until the queue is
    /// dropped): the node's main runtime, not an actor's, which may stop before the store.
    pub(crate) fn start(
        config: BatchConfig,
        backend: &'static str,
        write: WriteBatch,
        runtime: &tokio::runtime::Handle,
    ) -> Self {
        let (tx, rx) = mpsc::unbounded_channel::<Request>();
        let rx = Arc::new(Mutex::new(rx));
        let max_batch = config.max_batch.max(1);
        let in_flight = Arc::new(InFlight::default());
        for _ in 0..config.writers.max(1) {
            let (rx, write, in_flight) = (rx.clone(), write.clone(), in_flight.clone());
            runtime.spawn(async move {
                loop {
                    let mut batch = Vec::new();
                    let start = {
                        let mut rx = rx.lock().await;
                        if rx.recv_many(&mut batch, max_batch).await == 0 {
                            return;
                        }
                        in_flight
                            .gather(&mut rx, &mut batch, max_batch, config.overlap_after)
                            .await;
                        // Counted before the next writer may look.
                        in_flight.started()
                    };
                    batch.retain(|r| !r.abandoned());
                    if !batch.is_empty() {
                        write(batch).await;
                    }
                    in_flight.ended(start);
                }
            });
        }
        Queue {
            tx,
            admission: Arc::new(Semaphore::new(config.queue.max(1))),
            bound: config.queue.max(1),
            backend,
        }
    }

    /// Queues a commit and waits until its batch committed (or it failed).
    pub(crate) async fn commit(
        &self,
        set: &SetKey,
        epoch: Epoch,
        commit: Commit,
    ) -> Result<(), StoreError> {
        let permit = match self.admission.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(tokio::sync::TryAcquireError::Closed) => return Err(StoreError::Closed),
            Err(tokio::sync::TryAcquireError::NoPermits) => {
                return Err(StoreError::Overloaded(format!(
                    "{} commits already queued for {}",
                    self.bound, self.backend
                )))
            }
        };
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(Request {
                set: set.clone(),
                epoch,
                commit,
                reply,
                _permit: permit,
            })
            .map_err(|_| StoreError::Closed)?;
        answer.await.map_err(|_| StoreError::Closed)?
    }

    /// Refuses new commits and waits (bounded) until every admitted one was answered.
    pub(crate) async fn close(&self) {
        let all = u32::try_from(self.bound).unwrap_or(u32::MAX);
        // Every permit back means nothing is queued or being written.
        let drained = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            self.admission.acquire_many(all),
        )
        .await;
        drop(drained);
        self.admission.close();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex as StdMutex;
    use std::time::Duration;

    use super::*;

    /// A writer that records each batch's size and keeps the first batch open until
    /// `release` is notified; it answers every commit `Ok`.
    fn recording(
        sizes: Arc<StdMutex<Vec<usize>>>,
        release: Arc<tokio::sync::Notify>,
    ) -> WriteBatch {
        Arc::new(move |batch: Vec<Request>| {
            let (sizes, release) = (sizes.clone(), release.clone());
            Box::pin(async move {
                let first = {
                    let mut sizes = sizes.lock().unwrap_or_else(|e| e.into_inner());
                    sizes.push(batch.len());
                    sizes.len() == 1
                };
                if first {
                    release.notified().await;
                }
                for r in batch {
                    r.answer(Ok(()));
                }
            })
        })
    }

    fn queue(write: WriteBatch) -> Arc<Queue> {
        let config = BatchConfig {
            writers: 4,
            overlap_after: Duration::from_millis(10),
            ..BatchConfig::default()
        };
        Arc::new(Queue::start(
            config,
            "test",
            write,
            &tokio::runtime::Handle::current(),
        ))
    }

    fn commit(q: &Arc<Queue>, n: usize) -> tokio::task::JoinHandle<Result<(), StoreError>> {
        let (q, set) = (
            q.clone(),
            SetKey::parse(&format!("S{n:03}")).expect("valid"),
        );
        tokio::spawn(async move { q.commit(&set, Epoch(1), Commit::default()).await })
    }

    fn sizes_of(sizes: &Arc<StdMutex<Vec<usize>>>) -> Vec<usize> {
        sizes.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    #[tokio::test(start_paused = true)]
    async fn commits_queued_while_a_batch_is_written_go_into_one_next_batch() {
        let (sizes, release) = (Arc::default(), Arc::new(tokio::sync::Notify::new()));
        let q = queue(recording(Arc::clone(&sizes), release.clone()));
        let first = commit(&q, 0);
        tokio::time::sleep(Duration::from_micros(100)).await;
        assert_eq!(
            sizes_of(&sizes),
            vec![1],
            "the first commit is written at once"
        );
        // Five more, one every 100 µs, while the first batch is out (idle writers would
        // each take one or two).
        let mut rest = Vec::new();
        for n in 1..=5 {
            rest.push(commit(&q, n));
            tokio::time::sleep(Duration::from_micros(100)).await;
        }
        assert_eq!(
            sizes_of(&sizes),
            vec![1],
            "nothing starts while the first is out"
        );
        release.notify_one();
        first.await.expect("task").expect("committed");
        for r in rest {
            r.await.expect("task").expect("committed");
        }
        assert_eq!(sizes_of(&sizes), vec![1, 5]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_out_longer_than_overlap_after_does_not_hold_up_the_next() {
        let (sizes, release) = (Arc::default(), Arc::new(tokio::sync::Notify::new()));
        let q = queue(recording(Arc::clone(&sizes), release.clone()));
        let started = tokio::time::Instant::now();
        let _stuck = commit(&q, 0);
        tokio::time::sleep(Duration::from_micros(100)).await;
        // The first batch never ends: the second is written anyway, once the first has
        // been out 10 ms.
        commit(&q, 1).await.expect("task").expect("committed");
        assert_eq!(sizes_of(&sizes), vec![1, 1]);
        assert!(started.elapsed() >= Duration::from_millis(10));
    }
}
