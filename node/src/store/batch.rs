//! The queue in front of a shared store's batching writer (group commit across bucket
//! sets), independent of the backend: PostgreSQL (`postgres/batch.rs`) and FoundationDB
//! (`fdb/batch.rs`) each write a batch their own way, in ONE transaction.
//!
//! Every actor of a node hands its commit to one queue. [`BatchConfig::writers`] writer
//! tasks each take whatever is queued (up to [`BatchConfig::max_batch`]) and give it to the
//! backend's writer, which answers every request only after its transaction committed
//! (or failed). A request whose requester stopped waiting before its batch began (its
//! deadline passed while queued, so it was told its fate is unknown) is dropped unwritten:
//! writing nothing is one of the fates it allowed, and the safest one.
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
    /// Batch transactions in flight at once (PostgreSQL: each holds one pooled connection).
    pub writers: usize,
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
        for _ in 0..config.writers.max(1) {
            let (rx, write) = (rx.clone(), write.clone());
            runtime.spawn(async move {
                loop {
                    // The first queued, and whatever queued meanwhile, up to `max_batch`.
                    let mut batch = Vec::new();
                    if rx.lock().await.recv_many(&mut batch, max_batch).await == 0 {
                        return;
                    }
                    batch.retain(|r| !r.abandoned());
                    if !batch.is_empty() {
                        write(batch).await;
                    }
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
