//! Group registration: first contacts of new devices from every request of a node share
//! store transactions (issue 16: a cold fleet ramps at thousands per second).
//!
//! A registration hands its [`NewDevice`] to one queue; a few writer tasks each take what
//! is queued (up to [`RegistrationBatching::max_batch`]) and write it with ONE
//! [`Store::register_new`] call — one transaction on every backend, one round trip on
//! PostgreSQL. Each device is answered only after that call returned (durable), with
//! whether it was written or refused (it then takes the general path). At most
//! [`RegistrationBatching::queue`] registrations wait; past that one fails at once with
//! [`StoreError::Overloaded`] (503 + `Retry-After`), never an unbounded wait.

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot, Mutex, OwnedSemaphorePermit, Semaphore};

use super::{NewDevice, Store, StoreError};

/// Limits of the registration batcher.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegistrationBatching {
    /// Most registrations queued or being written at once; more are refused.
    pub queue: usize,
    /// Batches in flight at once.
    pub writers: usize,
    /// Most devices written by one store call.
    pub max_batch: usize,
}

impl Default for RegistrationBatching {
    fn default() -> Self {
        RegistrationBatching {
            queue: 8192,
            writers: 2,
            max_batch: 256,
        }
    }
}

struct Pending {
    device: NewDevice,
    reply: oneshot::Sender<Result<bool, StoreError>>,
    _permit: OwnedSemaphorePermit,
}

/// The queue in front of [`Store::register_new`].
pub struct Registrations {
    tx: mpsc::UnboundedSender<Pending>,
    admission: Arc<Semaphore>,
    bound: usize,
}

impl std::fmt::Debug for Registrations {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registrations")
            .field("bound", &self.bound)
            .finish_non_exhaustive()
    }
}

impl Registrations {
    /// Starts the writer tasks on the current runtime.
    pub fn start(store: Arc<dyn Store>, config: RegistrationBatching) -> Self {
        let (tx, rx) = mpsc::unbounded_channel::<Pending>();
        let rx = Arc::new(Mutex::new(rx));
        for _ in 0..config.writers.max(1) {
            let (rx, store) = (rx.clone(), store.clone());
            let max_batch = config.max_batch.max(1);
            tokio::spawn(async move {
                loop {
                    // The first queued, and whatever queued meanwhile, up to `max_batch`.
                    let mut batch = Vec::new();
                    if rx.lock().await.recv_many(&mut batch, max_batch).await == 0 {
                        return;
                    }
                    // A requester that stopped waiting is not written for: writing nothing
                    // is one of the fates it was told were possible.
                    batch.retain(|p| !p.reply.is_closed());
                    if batch.is_empty() {
                        continue;
                    }
                    let devices = batch.iter().map(|p| p.device.clone()).collect();
                    match store.register_new(devices).await {
                        Ok(written) if written.len() == batch.len() => {
                            for (p, w) in batch.into_iter().zip(written) {
                                let _ = p.reply.send(Ok(w));
                            }
                        }
                        Ok(written) => {
                            let e = StoreError::Backend(format!(
                                "register_new answered {} of {} devices",
                                written.len(),
                                batch.len()
                            ));
                            for p in batch {
                                let _ = p.reply.send(Err(e.clone()));
                            }
                        }
                        Err(e) => {
                            for p in batch {
                                let _ = p.reply.send(Err(e.clone()));
                            }
                        }
                    }
                }
            });
        }
        Registrations {
            tx,
            admission: Arc::new(Semaphore::new(config.queue.max(1))),
            bound: config.queue.max(1),
        }
    }

    /// Queues a first contact and waits until its batch was written: `true` when the device
    /// was registered, `false` when the store refused it (nothing of it written).
    pub async fn register(&self, device: NewDevice) -> Result<bool, StoreError> {
        let permit = match self.admission.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(tokio::sync::TryAcquireError::Closed) => return Err(StoreError::Closed),
            Err(tokio::sync::TryAcquireError::NoPermits) => {
                return Err(StoreError::Overloaded(format!(
                    "{} registrations already queued",
                    self.bound
                )))
            }
        };
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(Pending {
                device,
                reply,
                _permit: permit,
            })
            .map_err(|_| StoreError::Closed)?;
        answer.await.map_err(|_| StoreError::Closed)?
    }
}
